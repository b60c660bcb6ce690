"""Side-by-side measurement of SMTM and the plain full model on one stream.

Both run in the same process on the same frames, interleaved block by block
with the order alternating, so machine noise hits both alike. Blocks rather
than single frames: the CPU backend packs each signature's weights separately,
so alternating methods every frame would evict each other's weights from the
caches, a cost no app pays (it runs one method on every frame).
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from smtm_tf.runtime import SmtmRuntime


@dataclasses.dataclass(frozen=True)
class RunStats:
    """Figures for one method on one stream."""

    method: str
    frames: int
    accuracy: float  # Top-1 against labels.
    agreement: float  # Share of frames with the full model's class.
    mean_us: float
    p95_us: float
    exit_shares: tuple[float, ...]  # Per stage, then the head (frames that ran everything).

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Both methods on one stream, with SMTM's per-frame trace.

    Attributes:
      full, smtm: the figures of each method.
      hits: per frame, whether SMTM's answer was in the cache when it came.
      smtm_us, full_us: per-frame latencies in microseconds.
      checked: per frame, whether SMTM's early exit was also checked against
        the full model (a sampled or exit-run check; its time is in smtm_us).
    """

    full: RunStats
    smtm: RunStats
    hits: np.ndarray | None = None
    smtm_us: np.ndarray | None = None
    full_us: np.ndarray | None = None
    checked: np.ndarray | None = None

    @property
    def speedup(self) -> float:
        return self.full.mean_us / self.smtm.mean_us

    @property
    def accuracy_drop(self) -> float:
        """Top-1 points lost against the full model on the same frames."""
        return 100.0 * (self.full.accuracy - self.smtm.accuracy)


def _frames(runtime: SmtmRuntime, images: np.ndarray) -> np.ndarray:
    """Images as contiguous float32 frames shaped like the model's input."""
    return np.ascontiguousarray(images, np.float32).reshape(
        (len(images),) + tuple(runtime.descriptor.full.inputs[0].shape))


def compare(runtime: SmtmRuntime, images: np.ndarray, labels: np.ndarray,
            warmup: int = 50, block: int = 100, keep_state: bool = False) -> Comparison:
    """Runs `full` and SMTM on every frame, interleaved, and measures both.

    Args:
      runtime: the loaded SMTM model.
      images: frames `[N, H, W, C]` in stream order.
      labels: their true classes.
      warmup: frames run (untimed) before measuring.
      block: frames each method runs before the other takes over.
      keep_state: start from the runtime's memory as it is (e.g. restored
        from a state file) instead of an empty one; warm-up then runs `full` only.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}.")
    n = len(images)
    frames = _frames(runtime, images)
    full_pred = np.empty(n, np.int64)
    smtm_pred = np.empty(n, np.int64)
    exit_stage = np.empty(n, np.int64)
    full_ns = np.empty(n, np.int64)
    smtm_ns = np.empty(n, np.int64)
    hits = np.zeros(n, bool)
    checked = np.zeros(n, bool)
    memory = runtime.memory
    for i in range(min(warmup, n)):
        runtime.classify_full(frames[i])
        if not keep_state:
            runtime.classify_fast(frames[i])
    if not keep_state:
        runtime.reset_cache()  # The stream starts with an empty cache.
    clock = time.perf_counter_ns
    classify, classify_full = runtime.classify_fast, runtime.classify_full
    for b, start in enumerate(range(0, n, block)):
        end = min(n, start + block)
        for method in ((0, 1) if b % 2 == 0 else (1, 0)):
            if method == 0:
                for i in range(start, end):
                    t0 = clock()
                    full_pred[i] = classify_full(frames[i])
                    full_ns[i] = clock() - t0
            else:
                for i in range(start, end):
                    checks = memory.checks
                    t0 = clock()
                    smtm_pred[i], exit_stage[i] = classify(frames[i])
                    smtm_ns[i] = clock() - t0
                    hits[i] = memory.last_hit
                    checked[i] = memory.checks != checks
    shares = np.bincount(exit_stage, minlength=runtime.num_stages + 1) / n
    no_exit = np.zeros(runtime.num_stages + 1)
    no_exit[-1] = 1.0
    return Comparison(
        full=_stats("full", full_pred, full_pred, labels, full_ns, no_exit),
        smtm=_stats("smtm", smtm_pred, full_pred, labels, smtm_ns, shares),
        hits=hits, smtm_us=smtm_ns / 1e3, full_us=full_ns / 1e3, checked=checked)


def recovery_frames(hits: np.ndarray, scene_starts, level: float = 0.8, before: int = 100,
                    window: int = 10) -> list[int]:
    """Frames each scene change takes until the cache's hit rate recovers.

    For every scene start after the first with `before` frames of history,
    the pre-change level is the hit rate over the `before` frames before it;
    recovery is the first frame after the change at which the hit rate over
    the last `window` frames reaches `level` times that. A scene that ends
    (or a stream that ends) first counts as its length.
    """
    hits = np.asarray(hits, np.float64)
    starts = [int(s) for s in scene_starts]
    out = []
    for k, start in enumerate(starts):
        if start < before:
            continue
        end = starts[k + 1] if k + 1 < len(starts) else len(hits)
        goal = level * hits[start - before:start].mean()
        frames = end - start
        for j in range(start, end):
            if hits[max(start, j - window + 1):j + 1].mean() >= goal and j - start + 1 >= min(
                    window, end - start):
                frames = j - start + 1
                break
        out.append(frames)
    return out


def plot_stream(path: str, comparison: Comparison, scene_starts=(), title: str = "",
                window: int = 20) -> None:
    """Writes a PNG of the cache's hit rate and both methods' latency over a stream.

    Needs matplotlib (`pip install -e '.[plots]'`).
    """
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel
        matplotlib.use("Agg")
        from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise RuntimeError("Plots need matplotlib: pip install -e '.[plots]'.") from e
    kernel = np.ones(window) / window
    x = np.arange(len(comparison.hits))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    ax1.plot(x, np.convolve(comparison.hits, kernel, mode="same"), lw=1)
    ax1.set_ylabel(f"cache hit rate ({window}-frame mean)")
    ax1.set_ylim(0, 1.05)
    ax2.plot(x, np.convolve(comparison.full_us, kernel, mode="same"), lw=1, label="full")
    ax2.plot(x, np.convolve(comparison.smtm_us, kernel, mode="same"), lw=1, label="SMTM")
    ax2.set_ylabel(f"latency us ({window}-frame mean)")
    ax2.set_xlabel("frame")
    ax2.legend()
    for ax in (ax1, ax2):
        for start in scene_starts:
            ax.axvline(start, color="grey", lw=0.5, ls=":")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def _stats(method, pred, full_pred, labels, ns, shares) -> RunStats:
    us = ns / 1e3
    return RunStats(method, len(pred), float((pred == labels).mean()),
                    float((pred == full_pred).mean()), float(us.mean()),
                    float(np.percentile(us, 95)), tuple(float(s) for s in shares))


def host_overhead_us(runtime: SmtmRuntime, images: np.ndarray, repeats: int = 3) -> float:
    """Median per-frame host work of the SMTM loop, in microseconds.

    Host work is everything but the model itself: copying activations between
    stages, the lookup on the similarities, the exit decision and the memory's
    updates (cache, short-term tier, adaptation). Each invocation is timed in
    place, inside `classify_fast`, and the frame's host work is its time minus
    its invocations' (the timer calls themselves count as host work, so the
    figure is an upper bound). Measured within each frame, it does not depend
    on how busy the machine was between frames; the median over frames and
    `repeats` passes keeps bursts out.
    """
    frames = _frames(runtime, images)
    clock = time.perf_counter_ns
    spent = [0]

    def timed(invoke):
        def call():
            t0 = clock()
            invoke()
            spent[0] += clock() - t0
        return call

    # pylint: disable=protected-access
    plan, models = runtime._plan, (runtime._head, runtime._full)
    # pylint: enable=protected-access
    original_plan = list(plan)
    plan[:] = [(timed(p[0]),) + tuple(p[1:]) for p in plan]
    for model in models:  # The head, and `full` for verified exits.
        model.invoke = timed(model.invoke)
    per_frame = []
    try:
        for _ in range(repeats):
            runtime.reset_cache()
            for f in frames:
                spent[0] = 0
                t0 = clock()
                runtime.classify_fast(f)
                per_frame.append(clock() - t0 - spent[0])
    finally:
        plan[:] = original_plan
        for model in models:
            del model.invoke  # Back to the class's method.
    return float(np.median(per_frame)) / 1e3


def format_table(rows: list[tuple[str, Comparison]]) -> str:
    """A markdown table: one SMTM row and one full row per stream."""
    num_stages = len(rows[0][1].smtm.exit_shares) - 1
    exits = " | ".join(f"exit s{s}" for s in range(num_stages)) + " | head"
    lines = [f"| stream | method | frames | top-1 | agree w/ full | mean us | p95 us | "
             f"speed-up | {exits} |",
             "|" + "---|" * (9 + num_stages)]
    for stream, c in rows:
        for stats, speedup in ((c.full, 1.0), (c.smtm, c.speedup)):
            shares = " | ".join(f"{100 * s:.1f}%" for s in stats.exit_shares)
            lines.append(
                f"| {stream} | {stats.method} | {stats.frames} | {100 * stats.accuracy:.2f}% | "
                f"{100 * stats.agreement:.2f}% | {stats.mean_us:.0f} | {stats.p95_us:.0f} | "
                f"{speedup:.2f}x | {shares} |")
    return "\n".join(lines)
