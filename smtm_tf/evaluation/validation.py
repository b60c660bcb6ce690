"""The one measurement harness: interleaved timing and host work.

`run_interleaved` runs any set of contenders on the same frames in one
process, block by block with the order rotating, so machine noise hits all
alike; `compare` is SMTM against its own `full` on one stream;
`host_work_us` is the one host-work figure. The benchmark, the zoo table and
the command lines all measure through these.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from smtm_tf.fitting import progress
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
class Disagreements:
    """Frames where SMTM and `full` answer differently, by who was right.

    Shares of all the stream's frames. Agreement with `full` counts every
    disagreement against SMTM; on a held object `full` itself changes its
    answer from frame to frame, and SMTM, which keeps the object's class, is
    often the one that is right.
    """

    full_wrong: float  # SMTM answered the label, `full` did not.
    smtm_wrong: float  # `full` answered the label, SMTM did not.
    both_wrong: float  # Neither answered the label.

    @classmethod
    def of(cls, smtm_predictions, full_predictions, labels) -> "Disagreements":
        smtm, full, labels = (np.asarray(a, np.int64) for a in (
            smtm_predictions, full_predictions, labels))
        if not smtm.shape == full.shape == labels.shape or not len(labels):
            raise ValueError(f"Disagreements.of: need as many predictions of each as labels "
                             f"(at least one), got {smtm.shape}, {full.shape}, {labels.shape}.")
        differ = smtm != full
        return cls(float((differ & (smtm == labels)).mean()),
                   float((differ & (full == labels)).mean()),
                   float((differ & (smtm != labels) & (full != labels)).mean()))

    def format(self) -> str:
        return (f"disagreements with full on {100 * self.total:.2f}% of frames: full wrong "
                f"on {100 * self.full_wrong:.2f}%, SMTM wrong on {100 * self.smtm_wrong:.2f}%, "
                f"both on {100 * self.both_wrong:.2f}%")

    @property
    def total(self) -> float:
        return self.full_wrong + self.smtm_wrong + self.both_wrong


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Both methods on one stream, with SMTM's per-frame trace.

    Attributes:
      full, smtm: the figures of each method.
      hits: per frame, whether SMTM's answer was in the cache when it came.
      smtm_us, full_us: per-frame latencies in microseconds.
      checked: per frame, whether SMTM's early exit was also checked against
        the full model (a sampled or exit-run check; its time is in smtm_us).
      full_predictions: per frame, the full model's class.
      disagreements: where SMTM and `full` differ, by who was right.
    """

    full: RunStats
    smtm: RunStats
    hits: np.ndarray | None = None
    smtm_us: np.ndarray | None = None
    full_us: np.ndarray | None = None
    checked: np.ndarray | None = None
    full_predictions: np.ndarray | None = None
    disagreements: Disagreements | None = None

    @property
    def speedup(self) -> float:
        return self.full.mean_us / self.smtm.mean_us

    @property
    def accuracy_drop(self) -> float:
        """Top-1 points lost against the full model on the same frames."""
        return 100.0 * (self.full.accuracy - self.smtm.accuracy)


def model_frames(runtime: SmtmRuntime, images: np.ndarray) -> np.ndarray:
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
    frames = model_frames(runtime, images)
    n = len(frames)
    hits = np.zeros(n, bool)
    checked = np.zeros(n, bool)
    memory = runtime.memory
    checks = [memory.checks]

    def observe(key, i):
        if key == "smtm":
            hits[i] = memory.last_hit
            checked[i] = memory.checks != checks[0]
            checks[0] = memory.checks

    if not keep_state:
        runtime.reset_cache()
    out = run_interleaved([("full", FullOf(runtime)), ("smtm", runtime)], frames,
                          warmup=warmup, block=block, observe=observe,
                          keep_state=keep_state)
    full_pred, _, full_ns = out["full"]
    smtm_pred, exit_stage, smtm_ns = out["smtm"]
    shares = np.bincount(exit_stage, minlength=runtime.num_stages + 1) / n
    no_exit = np.zeros(runtime.num_stages + 1)
    no_exit[-1] = 1.0
    return Comparison(
        full=_stats("full", full_pred, full_pred, labels, full_ns, no_exit),
        smtm=_stats("smtm", smtm_pred, full_pred, labels, smtm_ns, shares),
        hits=hits, smtm_us=smtm_ns / 1e3, full_us=full_ns / 1e3, checked=checked,
        full_predictions=np.asarray(full_pred),
        disagreements=Disagreements.of(smtm_pred, full_pred, labels))


class FullOf:
    """A runtime's `full` signature with the contender interface of `run_interleaved`."""

    def __init__(self, runtime: SmtmRuntime):
        self._classify_full = runtime.classify_full
        self.num_stages = runtime.num_stages

    def reset_cache(self) -> None:
        """Stateless."""

    def classify_fast(self, frame: np.ndarray) -> tuple[int, int]:
        return self._classify_full(frame), self.num_stages


def reset(runtime) -> None:
    """Empties a contender's stream state where it keeps any."""
    fn = getattr(runtime, "reset_cache", None)
    if fn is not None:
        fn()


def run_interleaved(contenders, frames: np.ndarray, warmup: int = 50, block: int = 100,
                    observe=None, keep_state: bool = False) -> dict:
    """The one timing harness: every contender on every frame, block by block.

    Block b runs the contenders starting from b mod n, forwards on even
    rounds and backwards on odd ones, so no contender always follows the
    same one (whose weights it would find in or evict from the caches), and
    machine noise hits all alike. Blocks rather than single frames: the CPU
    backend packs each signature's weights separately, so alternating every
    frame would evict them, a cost no app pays.

    Args:
      contenders: (key, runtime) pairs; a runtime has `classify_fast(frame)
        -> (class, exit stage)` and may have `reset_cache()`.
      frames: float32 frames shaped like the model's input, in stream order.
      warmup: frames each contender runs (untimed) first; its stream state
        is then reset.
      block: frames a contender runs before the next takes over.
      observe: called as observe(key, frame index) after each frame, outside
        the timed span (e.g. to read a cache's state).
      keep_state: keep the contenders' stream state as it is: contenders with
        a `memory` are neither warmed up nor reset.

    Returns:
      {key: (predictions, exit stages, nanoseconds per frame)}.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}.")
    n, k = len(frames), len(contenders)
    out = {key: (np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64))
           for key, _ in contenders}
    for _, rt in contenders:
        if keep_state and getattr(rt, "memory", None) is not None:
            continue
        for i in range(min(warmup, n)):
            rt.classify_fast(frames[i])
        reset(rt)  # Each stream starts with an empty cache.
    clock = time.perf_counter_ns
    # The bar moves between blocks, outside the timed spans.
    with progress.bar(total=n * k, desc=f"{k} contenders x {n} frames", unit="frame") as bar:
        for b, start in enumerate(range(0, n, block)):
            end = min(n, start + block)
            order = [contenders[(b + j) % k] for j in range(k)]
            if (b // k) % 2:
                order.reverse()
            for key, rt in order:
                pred, stage, ns = out[key]
                classify = rt.classify_fast
                for i in range(start, end):
                    t0 = clock()
                    pred[i], stage[i] = classify(frames[i])
                    ns[i] = clock() - t0
                    if observe is not None:
                        observe(key, i)
                bar.update(end - start)
    return out


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


def steady_share(predictions: np.ndarray, scene_starts) -> float:
    """Share of frames answered with their scene's most frequent answer.

    On a held object (each scene one image, shifted and noisy frame to frame)
    it says how steady a classifier is: an answer that never changed within a
    hold scores 1, and any method that answers a hold with one class agrees
    with these predictions on at most this share of frames.
    """
    predictions = np.asarray(predictions, np.int64)
    if not len(predictions):
        raise ValueError("steady_share: no frames.")
    bounds = sorted({0, *(int(s) for s in scene_starts)} | {len(predictions)})
    steady = sum(int(np.bincount(predictions[a:b]).max())
                 for a, b in zip(bounds[:-1], bounds[1:]) if b > a)
    return steady / len(predictions)


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


def host_work_us(runtime, frames: np.ndarray) -> float | None:
    """The one host-work measurement: per-frame work of a contender's loop
    besides its models, in microseconds.

    Host work is everything but the model: preprocessing, copies between
    stages, reading outputs, the lookup and decision, the memory's updates.
    Per frame, the time of `classify_fast` minus that of the bare invokes of
    the signatures it ran, timed back to back. The second of the two runs
    finds the weights warm, so one pass times classify first and bare
    invokes second, another the reverse (replaying the first pass's exits;
    every pass starts from an empty memory), and the figure is the mean of
    the two passes' medians: the warmth cancels, and medians keep bursts of
    other work on a shared machine out. None when the runtime does not
    expose its invokes (`stage_invokes`, `head_invoke`).
    """
    stage_invokes = getattr(runtime, "stage_invokes", None)
    head_invoke = getattr(runtime, "head_invoke", None)
    if stage_invokes is None or head_invoke is None:
        return None
    if isinstance(runtime, SmtmRuntime):
        frames = model_frames(runtime, frames)
    invokes = list(stage_invokes) + [head_invoke]
    num_stages = len(stage_invokes)
    clock = time.perf_counter_ns

    def path(e):
        return invokes[:e + 1] if e < num_stages else invokes

    reset(runtime)
    exits, first = [], []
    for f in frames:
        t0 = clock()
        _, e = runtime.classify_fast(f)
        t1 = clock()
        for invoke in path(e):
            invoke()
        t2 = clock()
        exits.append(e)
        first.append((t1 - t0) - (t2 - t1))
    reset(runtime)
    second = []
    for f, e in zip(frames, exits):
        t0 = clock()
        for invoke in path(e):
            invoke()
        t1 = clock()
        runtime.classify_fast(f)
        t2 = clock()
        second.append((t2 - t1) - (t1 - t0))
    reset(runtime)
    return float(np.median(first) + np.median(second)) / 2e3


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
