"""SMTM against the designs users would pick instead, on one harness.

Contenders (all on the same .tflite, the same frames, in one process):
  full           the `full` signature: the standard approach;
  branchynet     softmax branches after each stage, entropy exits;
  learned_cache  GATI-style learned caches predicting the full model's output;
  smtm_static    SMTM with a layer-aware rule calibrated without a cache
                 (every class alike);
  smtm_adaptive  SMTM as its descriptor says (the runtime's default: the
                 rule, cache and memory it was fitted with).
Every early-exit contender is calibrated on the same held-out frames to the
same budget (points of agreement with the full model, Wilson bound). They
run interleaved block by block, the order rotating every block, so machine
noise hits all alike (blocks, not frames: see `validation`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys

import numpy as np

from smtm_tf.evaluation import baselines as baselines_lib
from smtm_tf.evaluation import validation
from smtm_tf.runtime import exit_policy
from smtm_tf.fitting import memory as memory_lib
from delegates import cpu
from smtm_tf.runtime import host as runtime_lib
from smtm_tf.runtime import io_utils

FULL = "full"
BRANCHY = baselines_lib.Method.BRANCHY.value
LEARNED_CACHE = baselines_lib.Method.LEARNED_CACHE.value
SMTM_STATIC = "smtm_static"
SMTM_ADAPTIVE = "smtm_adaptive"
METHODS = (FULL, BRANCHY, LEARNED_CACHE, SMTM_STATIC, SMTM_ADAPTIVE)
METHOD_LABELS = {
    FULL: "1. full model",
    BRANCHY: "2. BranchyNet exits",
    LEARNED_CACHE: "3. learned cache (GATI)",
    SMTM_STATIC: "4. SMTM static",
    SMTM_ADAPTIVE: "5. SMTM adaptive",
}
BASELINES = (BRANCHY, LEARNED_CACHE)
SMTM_METHODS = (SMTM_STATIC, SMTM_ADAPTIVE)

# (name, stream kind, zipf exponent)
STREAMS = (
    ("uniform", "uniform", None),
    ("zipf0.8", "zipf", 0.8),
    ("zipf1.4", "zipf", 1.4),
    ("video", "video", None),
    ("object", "object", None),
    ("scene_change", "scene_change", None),
    ("camera", "camera", None),
    ("camera_pan", "camera_pan", None),
)


class FullRuntime:
    """The plain model through the `full` signature, with the harness's interface."""

    def __init__(self, session, num_stages: int):
        self._sig = session.signature("full")
        self._in = self._sig.input_view("image")
        self._out = self._sig.output_view("probabilities")
        self._invoke = self._sig.invoke
        self.num_stages = num_stages

    def reset_cache(self) -> None:
        """Stateless."""

    @property
    def stage_invokes(self) -> list:
        return []

    @property
    def head_invoke(self):
        return self._invoke

    def classify_fast(self, frame: np.ndarray) -> tuple[int, int]:
        np.copyto(self._in, frame)
        self._invoke()
        return int(self._out.argmax()), self.num_stages


@dataclasses.dataclass
class Contender:
    """One method at one budget (None for `full`), and the runtime that runs it."""

    method: str
    budget: float | None
    runtime: object

    @property
    def key(self) -> str:
        return self.method if self.budget is None else f"{self.method}@{self.budget:g}"


@dataclasses.dataclass(frozen=True)
class Row:
    """Figures of one contender on one stream."""

    model: str
    stream: str
    method: str
    budget: float | None
    frames: int
    accuracy: float  # Top-1 against labels, %.
    drop: float  # Points of top-1 lost against `full` on the same frames.
    agreement: float  # % of frames answered as `full` answered them.
    mean_us: float
    p95_us: float
    speedup: float  # full's mean latency / this contender's, same run.
    compute_speedup: float  # 1 / expected share of full's multiply-adds.
    exit_shares: tuple[float, ...]  # Per stage, then the head.
    # Median over blocks of full's block mean / this contender's on the same
    # frames: the speed-up a burst of other work on the machine cannot move.
    block_speedup: float = float("nan")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def run_interleaved(contenders: list[Contender], frames: np.ndarray, warmup: int = 50,
                    block: int = 100) -> dict:
    """The contenders through the harness (`validation.run_interleaved`).

    Returns:
      {contender key: (predictions, exit stages, nanoseconds per frame,
      early exits the runtime also checked against the full model)}.
    """
    out = validation.run_interleaved([(c.key, c.runtime) for c in contenders], frames,
                                     warmup=warmup, block=block)
    # The adaptive memory counts its checks since the harness's reset.
    return {c.key: (*out[c.key], int(getattr(getattr(c.runtime, "memory", None), "checks", 0)))
            for c in contenders}


def rows_for(model: str, stream: str, contenders: list[Contender], results: dict,
             labels: np.ndarray, stage_costs, block: int = 100) -> list[Row]:
    """Turns one stream's raw results into rows, against its `full` contender."""
    num_stages = len(stage_costs)
    full_pred, _, full_ns, *_ = results[FULL]
    starts = np.arange(0, len(full_ns), block)

    def block_means(ns):
        return np.add.reduceat(ns.astype(np.float64), starts) / np.diff(
            np.append(starts, len(ns)))

    full_blocks = block_means(full_ns)
    full_acc = float((full_pred == labels).mean())
    full_mean = float(full_ns.mean()) / 1e3
    rows = []
    for c in contenders:
        pred, stage, ns, *checks = results[c.key]
        us = ns / 1e3
        shares = np.bincount(stage, minlength=num_stages + 1)[:num_stages + 1] / len(stage)
        acc = float((pred == labels).mean())
        rows.append(Row(model, stream, c.method, c.budget, len(pred), 100 * acc,
                        100 * (full_acc - acc), 100 * float((pred == full_pred).mean()),
                        float(us.mean()), float(np.percentile(us, 95)),
                        full_mean / float(us.mean()),
                        exit_policy.compute_speedup(shares, stage_costs,
                                        checks[0] / len(stage) if checks else 0.0),
                        tuple(float(s) for s in shares),
                        float(np.median(full_blocks / block_means(ns)))))
    return rows


@dataclasses.dataclass
class Calibrated:
    """Every early-exit method's rule at every budget, for one model."""

    rules: dict  # {(method, budget): (ExitRule, CachePolicy or None)}
    memory_budget: float  # The budget the memory's own rule was calibrated to.
    # {method: per stage, share of calibration frames whose top-1 there is
    # the full model's}: how good each method's lookup is, before any rule.
    stage_agreement: dict = dataclasses.field(default_factory=dict)
    # {method: compute speed-up of oracle exits on those frames}: each frame
    # stops at the first stage whose top-1 is the full model's
    # (`exit_policy.oracle_speedup`), the ceiling of any rule on that lookup.
    oracle_speedup: dict = dataclasses.field(default_factory=dict)


def calibrate_all(memory: memory_lib.SemanticMemory, heads: baselines_lib.BaselineHeads,
                  calibration, budgets, model=None,
                  x_calibration: np.ndarray | None = None,
                  preprocessing=None) -> Calibrated:
    """Calibrates every method at every budget on the same held-out frames.

    Args:
      memory: the model's semantic memory (its layer-aware parameters are reused).
      heads: the baselines' heads.
      calibration: `encoders.StageFeatures` of the held-out frames.
      budgets: budgets in points of agreement with the full model.
      model, x_calibration: the Keras model and the held-out images, which
        `memory.recalibrate` needs for SMTM adaptive at other budgets (every
        level of the adaptive memory, its short-term tier on held-object
        streams rendered from these images); without them the hot-class
        cache's thresholds are recalibrated from the similarities alone.
      preprocessing: what was done to the pixels `x_calibration` came from
        (`memory.recalibrate`); None: they are pixels.

    Returns:
      The rules; SMTM adaptive at the memory's own budget is None: the
      runtime's default (the descriptor's rule, cache and memory) runs then.
    """
    rule = memory.exit_rule
    if rule.metric is not exit_policy.Metric.LAYER_AWARE:
        raise ValueError(f"The memory's rule uses the {rule.metric.value} metric; the "
                         "benchmark recalibrates SMTM with its layer_aware parameters.")
    sims = memory.similarities(calibration)
    full = calibration.predictions
    costs = memory.plan.stage_costs
    memory_budget = round(100 * (1 - rule.target_agreement), 6)
    policy = memory.cache_policy
    rules = {}
    for budget in budgets:
        target = exit_policy.budget_to_target(budget)
        for method in BASELINES:
            rules[(method, budget)] = (baselines_lib.calibrate(
                heads, method, calibration.pooled, full, costs, target), None)
        rules[(SMTM_STATIC, budget)] = (memory_lib.calibrate_rule(
            sims, full, costs, target, exit_policy.Metric.LAYER_AWARE, rule.metric_params,
            cache_policy=None), None)
        if abs(budget - memory_budget) < 1e-9:
            rules[(SMTM_ADAPTIVE, budget)] = None
        elif model is not None and x_calibration is not None and hasattr(
                memory_lib, "recalibrate"):
            again = memory_lib.recalibrate(model, memory, x_calibration, target, policy,
                                           features=calibration, preprocessing=preprocessing)
            rules[(SMTM_ADAPTIVE, budget)] = (again.exit_rule, again.cache_policy)
        else:
            rules[(SMTM_ADAPTIVE, budget)] = (memory_lib.calibrate_rule(
                sims, full, costs, target, exit_policy.Metric.LAYER_AWARE,
                rule.metric_params, cache_policy=policy), policy)
    answers = {m: [t for t, _ in heads.stage_tops(m, calibration.pooled)] for m in BASELINES}
    answers["smtm"] = [x.argmax(axis=1) for x in sims]
    agreement = {m: tuple(float((t == full).mean()) for t in a) for m, a in answers.items()}
    oracle = {m: exit_policy.oracle_speedup(a, full, costs) for m, a in answers.items()}
    return Calibrated(rules, memory_budget, agreement, oracle)


def make_contenders(model_bytes: bytes, calibrated: Calibrated, budgets,
                    methods=METHODS, backend_factory=None) -> list[Contender]:
    """One runtime per contender, each on its own interpreter, so none shares
    packed weights (or a cache) with another."""

    def backend():
        return backend_factory() if backend_factory else cpu.CpuBackend(num_threads=1)

    num_stages = len(runtime_lib.read_descriptor(model_bytes).stages)
    contenders = []
    if FULL in methods:
        contenders.append(Contender(FULL, None,
                                    FullRuntime(backend().load(model_bytes), num_stages)))
    for budget in budgets:
        for method in methods:
            if method == FULL:
                continue
            entry = calibrated.rules[(method, budget)]
            if method in BASELINES:
                runtime = baselines_lib.BaselineRuntime(backend().load(model_bytes), method,
                                                        entry[0])
            else:
                runtime = runtime_lib.SmtmRuntime(model_bytes, backend())
                if entry is not None:  # None: the descriptor's own rule and memory.
                    runtime.set_exit_rule(*entry)
            contenders.append(Contender(method, budget, runtime))
    return contenders


def _git_commit() -> str | None:
    """The checkout's commit (with `-dirty` when tracked files differ), if any."""
    import subprocess  # pylint: disable=import-outside-toplevel

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                                capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def machine_info(num_threads: int) -> dict:
    """Machine, thread count and versions, recorded with every result."""
    import ai_edge_litert  # pylint: disable=import-outside-toplevel
    import keras  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    import tf_keras  # pylint: disable=import-outside-toplevel

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        from importlib import metadata as im  # pylint: disable=import-outside-toplevel
        litert_version = im.version("ai-edge-litert")
    except Exception:  # pylint: disable=broad-except
        litert_version = getattr(ai_edge_litert, "__version__", "unknown")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "machine": f"{platform.system()} {platform.machine()}, {cpu}",
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "backend": "LiteRT Interpreter, XNNPACK, float32",
        "num_threads": num_threads,
        "python": sys.version.split()[0],
        "versions": {"tensorflow": tf.__version__, "tf_keras": tf_keras.__version__,
                     "keras": keras.__version__, "ai_edge_litert": litert_version,
                     "numpy": np.__version__},
    }


def _fmt_budget(b) -> str:
    return "-" if b is None else f"{b:g}"


def format_rows(rows: list[Row]) -> str:
    """The full markdown table: one line per model x stream x method (x budget)."""
    num_stages = len(rows[0].exit_shares) - 1
    exits = " / ".join(f"s{s}" for s in range(num_stages)) + " / head"
    lines = [f"| model | stream | method | budget | top-1 | drop vs full | agree w/ full | "
             f"mean us | p95 us | speed-up | block-median speed-up | compute speed-up | "
             f"exits % {exits} |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shares = " / ".join(f"{100 * s:.0f}" for s in r.exit_shares)
        lines.append(
            f"| {r.model} | {r.stream} | {METHOD_LABELS[r.method]} | {_fmt_budget(r.budget)} | "
            f"{r.accuracy:.2f}% | {r.drop:+.2f} | {r.agreement:.2f}% | {r.mean_us:.0f} | "
            f"{r.p95_us:.0f} | {r.speedup:.2f}x | {r.block_speedup:.2f}x | "
            f"{r.compute_speedup:.2f}x | {shares} |")
    return "\n".join(lines)


def format_summary(rows: list[Row], budget: float, figure: str = "speedup") -> str:
    """Speed-up (top-1 drop) of each method per model x stream at one budget,
    and SMTM's best over the better baseline.

    Args:
      figure: the Row field to show: `speedup` (measured, ratio of means),
        `block_speedup` or `compute_speedup`.
    """
    methods = [m for m in METHODS if m != FULL]
    head = ("| model | stream | full us | "
            + " | ".join(METHOD_LABELS[m] for m in methods)
            + " | SMTM best / best baseline |")
    lines = [head, "|---|---|---|" + "---|" * (len(methods) + 1)]
    keys = []
    for r in rows:
        if (r.model, r.stream) not in keys:
            keys.append((r.model, r.stream))
    for model, stream in keys:
        sel = {r.method: r for r in rows if r.model == model and r.stream == stream
               and (r.budget is None or abs(r.budget - budget) < 1e-9)}
        if FULL not in sel:
            continue
        cells = []
        for m in methods:
            r = sel.get(m)
            cells.append("-" if r is None else f"{getattr(r, figure):.2f}x ({r.drop:+.2f})")
        smtm = max((getattr(sel[m], figure) for m in SMTM_METHODS if m in sel),
                   default=float("nan"))
        base = max((getattr(sel[m], figure) for m in BASELINES if m in sel),
                   default=float("nan"))
        lines.append(f"| {model} | {stream} | {sel[FULL].mean_us:.0f} | " + " | ".join(cells)
                     + f" | {smtm / base:.2f}x |")
    return "\n".join(lines)


def check_targets(rows: list[Row], budget: float, streams=("video", "object"),
                  min_speedup: float = 2.0, max_drop: float = 1.0,
                  min_over_baseline: float = 1.3) -> list[str]:
    """Per model x stream, whether SMTM meets the targets: at least `min_speedup`
    within `max_drop` points, and `min_over_baseline` times the best baseline."""
    out = []
    keys = sorted({(r.model, r.stream) for r in rows if r.stream in streams})
    for model, stream in keys:
        sel = {r.method: r for r in rows if r.model == model and r.stream == stream
               and (r.budget is None or abs(r.budget - budget) < 1e-9)}
        smtm = [sel[m] for m in SMTM_METHODS if m in sel]
        base = [sel[m] for m in BASELINES if m in sel]
        if not smtm or not base:
            continue
        # Drops are differences of frame counts over the stream in points:
        # 20 frames of 2,000 must read as 1.0, not 1.0000000000000009.
        within = max_drop + 1e-9
        best = max(smtm, key=lambda r: r.speedup if r.drop <= within else -1)
        best_base = max(base, key=lambda r: r.speedup)
        ok_speed = best.speedup >= min_speedup and best.drop <= within
        ratio = best.speedup / best_base.speedup
        ok_ratio = ratio >= min_over_baseline
        out.append(f"{model} / {stream}: {best.method} {best.speedup:.2f}x at "
                   f"{best.drop:+.2f} points ({'meets' if ok_speed else 'misses'} "
                   f">= {min_speedup:g}x within {max_drop:g}); vs {best_base.method} "
                   f"{best_base.speedup:.2f}x: {ratio:.2f}x "
                   f"({'meets' if ok_ratio else 'misses'} >= {min_over_baseline:g}x)")
    return out


def missing_numbers(rows: list[Row], models, streams, budgets) -> list[str]:
    """What the --quick check demands: every method has finite numbers on every
    model and stream at every budget."""
    problems = []
    for model in models:
        for stream in streams:
            for method in METHODS:
                for budget in ([None] if method == FULL else budgets):
                    match = [r for r in rows if r.model == model and r.stream == stream
                             and r.method == method and r.budget == budget]
                    if not match:
                        problems.append(f"{model}/{stream}/{method}@{_fmt_budget(budget)}: "
                                        "no row")
                        continue
                    r = match[0]
                    values = (r.accuracy, r.agreement, r.mean_us, r.p95_us, r.speedup,
                              r.compute_speedup)
                    if not all(np.isfinite(v) for v in values) or r.mean_us <= 0:
                        problems.append(f"{model}/{stream}/{method}@{_fmt_budget(budget)}: "
                                        f"non-finite figures {values}")
    return problems


def plot(rows: list[Row], model: str, path: str) -> None:
    """Speed-up against accuracy drop, one curve per method over budgets, one
    panel per stream."""
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    streams = []
    for r in rows:
        if r.model == model and r.stream not in streams:
            streams.append(r.stream)
    cols = min(3, len(streams))
    nrows = int(np.ceil(len(streams) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False)
    markers = {FULL: "*", BRANCHY: "s", LEARNED_CACHE: "^", SMTM_STATIC: "o",
               SMTM_ADAPTIVE: "D"}
    for ax, stream in zip(axes.flat, streams):
        for method in METHODS:
            sel = sorted((r for r in rows if r.model == model and r.stream == stream
                          and r.method == method), key=lambda r: r.budget or 0)
            if not sel:
                continue
            line, = ax.plot([r.drop for r in sel], [r.speedup for r in sel],
                            marker=markers[method], label=METHOD_LABELS[method],
                            markersize=8 if method == FULL else 5)
            for r in sel:
                if r.budget is not None:  # Which budget each point is.
                    ax.annotate(f"{r.budget:g}", (r.drop, r.speedup), fontsize=6,
                                color=line.get_color(), xytext=(3, 3),
                                textcoords="offset points")
        ax.axvline(1.0, color="grey", lw=0.6, ls=":")
        ax.axhline(2.0, color="grey", lw=0.6, ls=":")
        ax.set_title(f"{model}: {stream}")
        ax.set_xlabel("top-1 drop vs full (points)")
        ax.set_ylabel("measured speed-up vs full")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(streams):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with io_utils.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_json(path: str, info: dict, models: list[dict], rows: list[Row]) -> None:
    payload = {"info": info, "models": models, "rows": [r.to_dict() for r in rows]}
    io_utils.write_bytes_atomic(path, (json.dumps(payload, indent=1) + "\n").encode())
