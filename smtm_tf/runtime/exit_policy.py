"""Exit metrics and rules: when a stage's match with the memory is safe to return.

Every frame is scored against the centres of ALL classes; the metric turns a
stage's similarities into the class it points at and a score. A frame exits at
the first stage whose score reaches that stage's threshold. With a cache of
hot classes, the threshold depends on whether the pointed-at class is hot:
the cache is a prior that relaxes the rule for its classes, and the memory of
all classes stays the safety net for the others.

Calibration and the harness share `score` and `ExitRule.threshold_for`, so a
rule decides on the same similarities exactly as it was calibrated.
`exit_report` says, per class and stage, whether a rule lets that class exit
at all, and why not; `format_exit_report` prints it.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence

import numpy as np


class Metric(str, enum.Enum):
    """What is compared with a stage's threshold."""

    # The top-1 cosine similarity.
    TOP1 = "top1"
    # Top-1 minus top-2 cosine similarity over all classes in memory.
    MARGIN = "margin"
    # Layer- and class-aware: the log-odds that the stage's top-1 class agrees
    # with the full model, from a logistic fit of agreement on the margin for
    # that class at that stage (intercept a[c], slope b[c]), so a margin
    # counts for what it is worth for this class at this depth.
    LAYER_AWARE = "layer_aware"


def _check_thresholds(name: str, values) -> tuple[float | None, ...]:
    out = []
    for s, t in enumerate(values):
        if t is not None and (isinstance(t, bool) or not (
                isinstance(t, (int, float, np.floating)) and math.isfinite(float(t)))):
            raise ValueError(f"{name}[{s}] must be a finite number or None, got {t!r}.")
        out.append(None if t is None else float(t))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class ExitRule:
    """Per-stage thresholds on an exit metric.

    Attributes:
      metric: the metric the thresholds apply to.
      thresholds: one per stage; a frame exits at the first stage whose score
        is >= its threshold. None means the stage never exits. With a cache,
        these apply when the frame's top-1 class is hot.
      target_agreement: the agreement with the full model the thresholds were
        calibrated for: the share of ALL frames (those that run the whole model
        agree by construction) answered as the full model does.
      cold_thresholds: with a cache, the thresholds when the top-1 class is
        not hot (None: the same as `thresholds`).
      metric_params: for LAYER_AWARE, one `[C, 2]` float32 array per stage
        holding (intercept, slope) per class.
      instance_thresholds: with a short-term tier, per stage the cosine
        similarity to a recently confirmed frame's semantic vector at which
        that frame's class is favoured (raised, and held to the hot
        threshold; None: never).
    """

    metric: Metric
    thresholds: tuple[float | None, ...]
    target_agreement: float
    cold_thresholds: tuple[float | None, ...] | None = None
    metric_params: tuple[np.ndarray, ...] | None = None
    instance_thresholds: tuple[float | None, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "metric", Metric(self.metric))
        if not 0.0 < self.target_agreement <= 1.0:
            raise ValueError(
                f"target_agreement must be in (0, 1], got {self.target_agreement}.")
        object.__setattr__(self, "thresholds", _check_thresholds("thresholds", self.thresholds))
        if self.cold_thresholds is not None:
            cold = _check_thresholds("cold_thresholds", self.cold_thresholds)
            if len(cold) != len(self.thresholds):
                raise ValueError(f"cold_thresholds has {len(cold)} entries for "
                                 f"{len(self.thresholds)} stages.")
            object.__setattr__(self, "cold_thresholds", cold)
        if self.instance_thresholds is not None:
            inst = _check_thresholds("instance_thresholds", self.instance_thresholds)
            if len(inst) != len(self.thresholds):
                raise ValueError(f"instance_thresholds has {len(inst)} entries for "
                                 f"{len(self.thresholds)} stages.")
            object.__setattr__(self, "instance_thresholds", inst)
        if self.metric is Metric.LAYER_AWARE:
            if self.metric_params is None or len(self.metric_params) != len(self.thresholds):
                raise ValueError(
                    "The layer_aware metric needs metric_params: one [C, 2] array per stage.")
            params = tuple(np.asarray(p, np.float32) for p in self.metric_params)
            for s, p in enumerate(params):
                if p.ndim != 2 or p.shape[1] != 2 or not np.isfinite(p).all():
                    raise ValueError(
                        f"metric_params[{s}] must be a finite [C, 2] array, got shape {p.shape}.")
            object.__setattr__(self, "metric_params", params)
        elif self.metric_params is not None:
            raise ValueError(f"The {self.metric.value} metric takes no metric_params.")

    @property
    def num_stages(self) -> int:
        return len(self.thresholds)

    @property
    def uses_cache(self) -> bool:
        return self.cold_thresholds is not None

    def threshold_for(self, stage: int, hot: bool) -> float | None:
        if hot or self.cold_thresholds is None:
            return self.thresholds[stage]
        return self.cold_thresholds[stage]

    def stage_params(self, stage: int) -> np.ndarray | None:
        return None if self.metric_params is None else self.metric_params[stage]

    def __eq__(self, other):
        if not isinstance(other, ExitRule):
            return NotImplemented
        same_params = (self.metric_params is None) == (other.metric_params is None) and (
            self.metric_params is None or all(
                np.array_equal(a, b) for a, b in zip(self.metric_params, other.metric_params)))
        return (self.metric == other.metric and self.thresholds == other.thresholds
                and self.target_agreement == other.target_agreement
                and self.cold_thresholds == other.cold_thresholds and same_params
                and self.instance_thresholds == other.instance_thresholds)

    def to_dict(self) -> dict:
        d = {"metric": self.metric.value, "thresholds": list(self.thresholds),
             "target_agreement": self.target_agreement}
        if self.cold_thresholds is not None:
            d["cold_thresholds"] = list(self.cold_thresholds)
        if self.instance_thresholds is not None:
            d["instance_thresholds"] = list(self.instance_thresholds)
        if self.metric_params is not None:
            d["metric_params"] = [[[float(str(v)) for v in row] for row in p]
                                  for p in self.metric_params]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ExitRule":
        known = {"metric", "thresholds", "target_agreement", "cold_thresholds",
                 "metric_params", "instance_thresholds"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Unknown exit rule fields: {sorted(unknown)}.")
        try:
            metric = Metric(d["metric"])
        except ValueError as e:
            raise ValueError(f"Unknown exit metric {d['metric']!r}; known: "
                             f"{[m.value for m in Metric]}.") from e
        cold = d.get("cold_thresholds")
        params = d.get("metric_params")
        inst = d.get("instance_thresholds")
        return cls(metric, tuple(d["thresholds"]), float(d["target_agreement"]),
                   None if cold is None else tuple(cold),
                   None if params is None else tuple(np.asarray(p, np.float32)
                                                     for p in params),
                   None if inst is None else tuple(inst))


def margins(similarities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 class and top-1 minus top-2 similarity, for `[..., K]` similarities.

    Computed in float32 whatever the input, so batch calibration and the
    per-frame harness get identical values from identical similarities.
    """
    sims = np.asarray(similarities, np.float32)
    top2 = np.partition(sims, -2, axis=-1)[..., -2:]
    return sims.argmax(axis=-1), (top2[..., 1] - top2[..., 0]).astype(np.float32)


def score(metric: Metric, similarities: np.ndarray,
          params: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The metric's (top-1 class, float32 score) for `[..., K]` similarities."""
    sims = np.asarray(similarities, np.float32)
    if metric is Metric.TOP1:
        top1 = sims.argmax(axis=-1)
        return top1, np.take_along_axis(sims, np.expand_dims(top1, -1), -1)[..., 0]
    top1, margin = margins(sims)
    if metric is Metric.MARGIN:
        return top1, margin
    p = np.asarray(params, np.float32)
    return top1, (p[top1, 0] + p[top1, 1] * margin).astype(np.float32)


class FitStatus(str, enum.Enum):
    """Where a class's LAYER_AWARE parameters at a stage come from."""

    # Its own logistic fit.
    OWN = "own"
    # The pooled fit of all classes at the stage, because the class's own
    # would be degenerate: no frame has it as top-1 there, ...
    NO_FRAMES = "no_frames"
    # ... fewer than `min_frames` do, ...
    TOO_FEW = "too_few"
    # ... or they all agree with the full model, or none does (the fit would
    # run off to a score that ignores the margin).
    ALL_AGREE = "all_agree"
    NONE_AGREE = "none_agree"


@dataclasses.dataclass(frozen=True)
class LayerAwareFit:
    """The LAYER_AWARE parameters and how each was fitted.

    Attributes:
      params: per stage, a `[C, 2]` float32 array of (intercept, slope).
      status: per stage, one FitStatus per class.
      frames: per stage, an int `[C]` array: the fitting frames whose top-1
        class at that stage was each class.
      min_frames: the fewest frames a class's own fit needed.
    """

    params: tuple[np.ndarray, ...]
    status: tuple[tuple[FitStatus, ...], ...]
    frames: tuple[np.ndarray, ...]
    min_frames: int


def _logistic(margin: np.ndarray, agree: np.ndarray, l2: float, iterations: int) -> np.ndarray:
    """(intercept, slope) of a logistic regression of `agree` on `margin` (Newton)."""
    x = np.stack([np.ones(len(margin)), margin.astype(np.float64)], axis=1)
    w = np.zeros(2)
    for _ in range(iterations):
        prob = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
        grad = x.T @ (prob - agree) + l2 * w
        hess = (x * (prob * (1 - prob))[:, None]).T @ x + l2 * np.eye(2)
        w -= np.linalg.solve(hess, grad)
    return w


def layer_aware_fit(similarities: Sequence[np.ndarray], full_predictions: np.ndarray,
                    l2: float = 1e-3, iterations: int = 25,
                    min_frames: int = 20) -> LayerAwareFit:
    """Fits the LAYER_AWARE parameters, and says where each comes from.

    Per stage and class: a logistic regression of "the stage's top-1 class is
    the full model's" on the margin, over the frames whose top-1 is that class
    (Newton's method, small L2 penalty). A class whose own fit would be
    degenerate (no frames, fewer than `min_frames`, all agreeing or none) gets
    the stage's pooled fit over the frames of all classes instead: its score
    then reads its margin as an average class's would, rather than never
    exiting (no frames) or exiting on any margin (a few frames that agree).

    Args:
      similarities: one `[N, K]` array of similarities per stage.
      full_predictions: the full model's class for each frame.
      l2: L2 penalty of the regressions.
      iterations: Newton steps.
      min_frames: the fewest frames for a class's own fit.

    Returns:
      The parameters with each class's FitStatus and frame count.
    """
    if min_frames < 1:
        raise ValueError(f"min_frames must be >= 1, got {min_frames}.")
    full_predictions = np.asarray(full_predictions)
    params, status, frames = [], [], []
    for sims in similarities:
        top1, margin = margins(sims)
        agree = (top1 == full_predictions).astype(np.float64)
        num_classes = sims.shape[-1]
        counts = np.bincount(top1.ravel(), minlength=num_classes)
        pooled = (_logistic(margin, agree, l2, iterations) if len(margin)
                  else np.zeros(2))
        p = np.zeros((num_classes, 2), np.float32)
        st = []
        for c in range(num_classes):
            mask = top1 == c
            agreeing = int(agree[mask].sum())
            if counts[c] == 0:
                st.append(FitStatus.NO_FRAMES)
            elif counts[c] < min_frames:
                st.append(FitStatus.TOO_FEW)
            elif agreeing == counts[c]:
                st.append(FitStatus.ALL_AGREE)
            elif agreeing == 0:
                st.append(FitStatus.NONE_AGREE)
            else:
                st.append(FitStatus.OWN)
            p[c] = (_logistic(margin[mask], agree[mask], l2, iterations)
                    if st[-1] is FitStatus.OWN else pooled)
        params.append(p)
        status.append(tuple(st))
        frames.append(counts)
    return LayerAwareFit(tuple(params), tuple(status), tuple(frames), min_frames)


def fit_layer_aware(similarities: Sequence[np.ndarray], full_predictions: np.ndarray,
                    l2: float = 1e-3, iterations: int = 25,
                    min_frames: int = 20) -> tuple[np.ndarray, ...]:
    """The LAYER_AWARE parameters alone: `layer_aware_fit(...).params`.

    Fitted on frames the encoders were trained on; classes whose own fit
    would be degenerate get their stage's pooled fit (see `layer_aware_fit`).
    """
    return layer_aware_fit(similarities, full_predictions, l2, iterations, min_frames).params


# Cosine similarities lie in [-1, 1]: a margin (top-1 minus top-2) in [0, 2].
MAX_MARGIN = 2.0
MAX_SIMILARITY = 1.0


class NoExit(str, enum.Enum):
    """Why frames of a class cannot exit at a stage."""

    # The stage's threshold is None: no frame exits there.
    NO_THRESHOLD = "no_threshold"
    # No reachable score meets the threshold: for LAYER_AWARE, a + b * margin
    # stays below it for every margin in [0, 2]; for MARGIN, it is above 2;
    # for TOP1, above 1.
    UNREACHABLE = "unreachable"


@dataclasses.dataclass(frozen=True)
class ClassExit:
    """Whether frames whose top-1 class is `class_index` can exit at `stage`.

    Attributes:
      stage: the stage.
      class_index: the class.
      can_exit: some reachable score meets the stage's threshold.
      min_margin: MARGIN and LAYER_AWARE: the smallest margin in [0, 2] that
        exits (None when none does); TOP1: None.
      reason: why it cannot exit; None when it can.
      fit: LAYER_AWARE with a fit given: where its parameters come from.
      frames: with a fit given: the fitting frames whose top-1 it was there.
    """

    stage: int
    class_index: int
    can_exit: bool
    min_margin: float | None
    reason: NoExit | None
    fit: FitStatus | None = None
    frames: int | None = None


@dataclasses.dataclass(frozen=True)
class ExitReport:
    """Per stage and class, whether a rule lets the class exit there.

    Attributes:
      metric: the rule's metric.
      thresholds: the thresholds the report is for (a cached rule's hot or
        cold ones).
      classes: `classes[stage][class]`.
    """

    metric: Metric
    thresholds: tuple[float | None, ...]
    classes: tuple[tuple[ClassExit, ...], ...]

    def can_exit(self) -> np.ndarray:
        """`[stages, classes]` bool: whether each class can exit at each stage."""
        return np.array([[c.can_exit for c in stage] for stage in self.classes], bool)


def exit_report(rule: ExitRule, num_classes: int | None = None,
                fit: LayerAwareFit | None = None, hot: bool = True) -> ExitReport:
    """Says, per stage and class, whether `rule` lets frames of that class exit.

    A frame exits when its score reaches the threshold; this asks whether any
    reachable score does, for frames whose top-1 class is the class: for
    LAYER_AWARE, whether a[c] + b[c] * margin meets it for some margin in
    [0, 2]; for MARGIN and TOP1, whether the threshold is at most 2 (the
    largest margin) or 1 (the largest similarity).

    Args:
      rule: the exit rule.
      num_classes: the number of classes; needed unless the rule has
        LAYER_AWARE parameters or `fit` is given.
      fit: for a LAYER_AWARE rule, the fit its parameters come from: the
        report then says which classes got the pooled fit, and why.
      hot: with a cache, report the thresholds for a hot top-1 class (True)
        or a cold one.

    Returns:
      The report.

    Raises:
      ValueError: without a number of classes, or for a `fit` that is not the
        one the rule's parameters come from.
    """
    if fit is not None:
        if rule.metric is not Metric.LAYER_AWARE:
            raise ValueError(f"A LayerAwareFit describes layer_aware parameters; the rule's "
                             f"metric is {rule.metric.value}.")
        if len(fit.params) != rule.num_stages or not all(
                np.array_equal(np.asarray(a, np.float32), b)
                for a, b in zip(fit.params, rule.metric_params)):
            raise ValueError("fit is not the fit the rule's metric_params come from.")
    if num_classes is None:
        if rule.metric_params is not None:
            num_classes = rule.metric_params[0].shape[0]
        elif fit is not None:
            num_classes = fit.params[0].shape[0]
        else:
            raise ValueError(f"The {rule.metric.value} metric has no per-class parameters: "
                             "pass num_classes.")
    thresholds = tuple(rule.threshold_for(s, hot) for s in range(rule.num_stages))
    stages = []
    for s, t in enumerate(thresholds):
        rows = []
        for c in range(num_classes):
            min_margin = None
            if t is None:
                can_exit = False
            elif rule.metric is Metric.TOP1:
                can_exit = t <= MAX_SIMILARITY
            elif rule.metric is Metric.MARGIN:
                can_exit = t <= MAX_MARGIN
                min_margin = max(t, 0.0) if can_exit else None
            else:
                a, b = (float(v) for v in rule.metric_params[s][c])
                if a >= t:  # Margin 0 exits already.
                    min_margin = 0.0
                elif b > 0 and (t - a) / b <= MAX_MARGIN:
                    min_margin = (t - a) / b
                can_exit = min_margin is not None
            reason = None if can_exit else (
                NoExit.NO_THRESHOLD if t is None else NoExit.UNREACHABLE)
            rows.append(ClassExit(
                s, c, can_exit, min_margin, reason,
                None if fit is None else fit.status[s][c],
                None if fit is None else int(fit.frames[s][c])))
        stages.append(tuple(rows))
    return ExitReport(rule.metric, thresholds, tuple(stages))


_UNREACHABLE_TEXT = {
    Metric.LAYER_AWARE: "its score stays below the threshold for every margin in [0, 2]",
    Metric.MARGIN: "the threshold is above 2, the largest margin",
    Metric.TOP1: "the threshold is above 1, the largest similarity",
}

_FIT_TEXT = {
    FitStatus.NO_FRAMES: "no fitting frame had it as top-1",
    FitStatus.TOO_FEW: "too few fitting frames",
    FitStatus.ALL_AGREE: "all its fitting frames agree with the full model",
    FitStatus.NONE_AGREE: "none of its fitting frames agrees with the full model",
}


def _names(indices: Sequence[int], class_names: Sequence[str] | None, at_most: int) -> str:
    shown = [repr(class_names[i]) if class_names is not None else str(i)
             for i in indices[:at_most]]
    more = len(indices) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def format_exit_report(report: ExitReport, class_names: Sequence[str] | None = None,
                       max_names: int = 12) -> list[str]:
    """The report as lines to print: per stage, how many classes can exit
    (with the range of margins they need), then the classes that cannot and
    why, and the classes whose LAYER_AWARE parameters are the pooled fit.

    Args:
      report: from `exit_report`.
      class_names: names of the classes (None: their indices).
      max_names: the most class names listed on one line.
    """
    lines = []
    for s, (rows, t) in enumerate(zip(report.classes, report.thresholds)):
        if t is None:
            lines.append(f"stage {s}: no class can exit: no threshold, the stage never exits")
            continue
        able = [r for r in rows if r.can_exit]
        line = (f"stage {s} ({report.metric.value} >= {t:.4g}): {len(able)} of {len(rows)} "
                "classes can exit")
        needed = [r for r in able if r.min_margin is not None]
        if needed and report.metric is Metric.LAYER_AWARE:
            low, high = (f(needed, key=lambda r: r.min_margin) for f in (min, max))
            line += (f", from margin {low.min_margin:.3f} "
                     f"({_names([low.class_index], class_names, 1)}) to "
                     f"{high.min_margin:.3f} ({_names([high.class_index], class_names, 1)})")
        lines.append(line)
        unable = [r.class_index for r in rows if not r.can_exit]
        if unable:
            lines.append(f"  cannot exit, {_UNREACHABLE_TEXT[report.metric]}: "
                         + _names(unable, class_names, max_names))
        for status, text in _FIT_TEXT.items():
            pooled = [r for r in rows if r.fit is status]
            if pooled:
                names = _names([r.class_index for r in pooled], class_names, max_names)
                if status is FitStatus.TOO_FEW:
                    text += " (" + ", ".join(str(r.frames) for r in pooled[:max_names]) + ")"
                lines.append(f"  pooled fit ({text}): {names}")
    return lines


def stage_scores(rule_or_metric, similarities: Sequence[np.ndarray],
                 metric_params=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(top-1, score) per stage for `[N, K]` similarities."""
    if isinstance(rule_or_metric, ExitRule):
        metric, metric_params = rule_or_metric.metric, rule_or_metric.metric_params
    else:
        metric = Metric(rule_or_metric)
    return [score(metric, s, None if metric_params is None else metric_params[i])
            for i, s in enumerate(similarities)]


def simulate(rule: ExitRule, similarities: Sequence[np.ndarray], fallback: np.ndarray,
             hot: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Applies `rule` to per-stage similarities `[N, K]` of N frames.

    Args:
      rule: the exit rule.
      similarities: one `[N, K]` array per stage.
      fallback: the class returned when no stage exits (the full model's).
      hot: for a rule with a cache, one bool array per stage: whether the
        frame's top-1 class at that stage was hot. None: all hot.

    Returns:
      (exit_stage, prediction): exit_stage is the stage index, or the number of
      stages for frames that ran the whole model.
    """
    return simulate_scores(rule, stage_scores(rule, similarities), fallback, hot)


def simulate_scores(rule: ExitRule, tops: Sequence[tuple[np.ndarray, np.ndarray]],
                    fallback: np.ndarray,
                    hot: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`simulate` on precomputed per-stage (top-1 class, score) pairs.

    The rule's metric is not applied: `tops` already holds its scores (or
    those of any other decision method, e.g. a baseline's confidence).
    """
    n = len(fallback)
    num_stages = len(tops)
    exit_stage = np.full(n, num_stages, np.int64)
    prediction = np.asarray(fallback).copy()
    pending = np.ones(n, bool)
    for s, (top1, value) in enumerate(tops):
        hot_t, cold_t = rule.threshold_for(s, True), rule.threshold_for(s, False)
        go = _passes(value, hot_t)
        if hot is not None:
            go = np.where(hot[s], go, _passes(value, cold_t))
        go &= pending
        exit_stage[go] = s
        prediction[go] = top1[go]
        pending &= ~go
    return exit_stage, prediction


def _passes(value: np.ndarray, threshold: float | None) -> np.ndarray:
    if threshold is None:
        return np.zeros(value.shape, bool)
    return value >= threshold


def exit_costs(stage_costs) -> np.ndarray:
    """Share of the full model's multiply-adds a frame costs by where it stops:
    index s for an exit after stage s (the cumulative stage costs), and
    index num_stages for a frame that ran the head (1)."""
    return np.append(np.cumsum(stage_costs), 1.0)


def oracle_speedup(stage_answers, full_predictions, stage_costs) -> float:
    """The compute speed-up of exits that are never wrong and never late.

    Each frame stops at the first stage whose answer (`stage_answers[s]`,
    `[N]` classes) is the full model's, else runs the head: the bound that no
    exit rule over these answers can pass at 100% agreement.
    """
    full = np.asarray(full_predictions)
    stage = np.full(len(full), len(stage_answers))
    for s in reversed(range(len(stage_answers))):
        stage = np.where(np.asarray(stage_answers[s]) == full, s, stage)
    return float(1.0 / exit_costs(stage_costs)[stage].mean())


def compute_speedup(exit_shares, stage_costs, checked: float = 0.0) -> float:
    """1 / the expected share of full's multiply-adds, given where frames exited.

    `exit_shares` are per stage, then the head. `checked` is the share of
    frames whose early exit was also checked against the full model, which
    then ran as well. It depends only on where frames exit, not on the
    machine's timing noise.
    """
    return float(1.0 / (np.dot(exit_shares, exit_costs(stage_costs)) + checked))


def wilson_lower_bound(successes: int, trials: int, z: float = 1.645) -> float:
    """One-sided lower confidence bound of a binomial proportion (Wilson score).

    z = 1.645 gives 95% confidence. A few thousand calibration frames leave an
    observed 99% agreement uncertain by a few tenths of a point; the bound,
    not the raw ratio, is what must meet the target.
    """
    if trials <= 0:
        return 0.0
    p = successes / trials
    denom = 1.0 + z * z / trials
    centre = p + z * z / (2 * trials)
    spread = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return float((centre - spread) / denom)


def _best_threshold(value, exit_value, stay_value):
    """The threshold on `value` that minimises the summed cost of the frames.

    Frames with value >= threshold cost `exit_value`, the others `stay_value`.
    Returns None when no exit at all is best.
    """
    if value.size == 0:
        return None
    order = np.argsort(-value, kind="stable")
    v = value[order]
    gain = np.cumsum(exit_value[order] - stay_value[order])
    # Only cut between distinct values: tied frames exit together.
    valid = np.flatnonzero(np.append(v[1:] < v[:-1], True))
    k = valid[np.argmin(gain[valid])]
    return float(v[k]) if gain[k] < 0 else None


def _lagrangian_thresholds(tops, full_predictions, cumulative, allowed, lam, groups=None,
                           rounds=4):
    """Coordinate descent on mean(cost) + lam * mean(disagreement).

    `groups[s]` (bool per frame: top-1 hot at stage s) splits each stage's
    threshold in two (hot, cold); None keeps one threshold per stage. Returns
    thresholds[s] = [hot, cold].
    """
    num_stages = len(tops)
    n = len(full_predictions)
    thresholds = [[None, None] for _ in range(num_stages)]
    wrong = [(t != full_predictions).astype(np.float64) for t, _ in tops]
    hot = groups if groups is not None else [np.ones(n, bool)] * num_stages

    def exits(s):
        h, c = thresholds[s]
        return np.where(hot[s], _passes(tops[s][1], h), _passes(tops[s][1], c))

    for _ in range(rounds):
        changed = False
        for s in range(num_stages):
            if not allowed[s]:
                continue
            stay = np.ones(n)  # The full model: cost 1, never disagrees.
            for later in range(num_stages - 1, s, -1):
                stay = np.where(exits(later), cumulative[later] + lam * wrong[later], stay)
            pending = np.ones(n, bool)
            for earlier in range(s):
                pending &= ~exits(earlier)
            exit_value = cumulative[s] + lam * wrong[s]
            for g, members in ((0, hot[s]), (1, ~hot[s])):
                m = pending & members
                new = _best_threshold(tops[s][1][m], exit_value[m], stay[m])
                if groups is None and g == 1:
                    new = thresholds[s][0]
                if new != thresholds[s][g]:
                    thresholds[s][g], changed = new, True
        if not changed:
            break
    return thresholds


def calibrate(similarities: Sequence[np.ndarray], full_predictions: np.ndarray,
              stage_costs: Sequence[float], target_agreement: float = 0.99,
              min_saving: float = 0.02, confidence_z: float = 1.645,
              metric: Metric | str = Metric.MARGIN, metric_params=None,
              hot: Sequence[np.ndarray] | None = None) -> ExitRule:
    """Picks per-stage thresholds on held-out frames.

    Finds the cheapest cascade (mean compute per frame) whose answers agree
    with the full model on at least `target_agreement` of the calibration
    frames, disagreements summed over all stages, with confidence: the Wilson
    lower bound of the observed agreement must reach the target. It minimises
    cost + lambda * disagreement by coordinate descent over the thresholds
    (each stage's optimum given the others is exact), and bisects lambda to
    the largest disagreement within the target.

    Args:
      similarities: one `[N, K]` array of similarities to all class centres per stage.
      full_predictions: the full model's class for each frame.
      stage_costs: each stage's share of the full model's compute.
      target_agreement: required share of all frames answered as the full model does.
      min_saving: stages after which less than this share of compute remains
        never exit: an exit there saves nothing and can only be wrong.
      confidence_z: z-score of the one-sided bound (1.645: 95%; 0: raw ratio).
      metric: the exit metric.
      metric_params: the metric's parameters (LAYER_AWARE: from `fit_layer_aware`).
      hot: per stage, whether each frame's top-1 class was hot; given, the rule
        gets separate thresholds for hot and cold top-1 classes.

    Returns:
      The calibrated rule.
    """
    if len(similarities) != len(stage_costs):
        raise ValueError(
            f"{len(similarities)} stages of similarities for {len(stage_costs)} costs.")
    metric = Metric(metric)
    return calibrate_scores(stage_scores(metric, similarities, metric_params),
                            full_predictions, stage_costs, target_agreement, min_saving,
                            confidence_z, hot, metric, metric_params)


def calibrate_scores(tops: Sequence[tuple[np.ndarray, np.ndarray]],
                     full_predictions: np.ndarray, stage_costs: Sequence[float],
                     target_agreement: float = 0.99, min_saving: float = 0.02,
                     confidence_z: float = 1.645,
                     hot: Sequence[np.ndarray] | None = None,
                     metric: Metric | str = Metric.MARGIN,
                     metric_params=None) -> ExitRule:
    """`calibrate` on precomputed per-stage (top-1 class, score) pairs.

    Any decision method that turns a stage into a class and a confidence
    (higher: safer) is calibrated the same way; `metric` and `metric_params`
    only label the returned rule.
    """
    if not 0.0 < target_agreement <= 1.0:
        raise ValueError(f"target_agreement must be in (0, 1], got {target_agreement}.")
    if confidence_z < 0:
        raise ValueError(f"confidence_z must be >= 0, got {confidence_z}.")
    if len(tops) != len(stage_costs):
        raise ValueError(f"{len(tops)} stages of scores for {len(stage_costs)} costs.")
    metric = Metric(metric)
    full_predictions = np.asarray(full_predictions)
    n = len(full_predictions)
    cumulative = np.cumsum(stage_costs)
    allowed = [1.0 - c >= min_saving for c in cumulative]

    def make_rule(t):
        return ExitRule(metric, tuple(h for h, _ in t), target_agreement,
                        None if hot is None else tuple(c for _, c in t), metric_params)

    def solve(lam):
        rule = make_rule(_lagrangian_thresholds(tops, full_predictions, cumulative,
                                                allowed, lam, hot))
        _, pred = simulate_scores(rule, tops, full_predictions, hot)
        return rule, wilson_lower_bound(int((pred == full_predictions).sum()), n, confidence_z)

    # Agreement grows with lambda (the price of a disagreement). The largest
    # useful price: one disagreement outweighs all the compute of n frames.
    lo, hi = 0.0, float(n)
    best, agreement = solve(hi)
    if agreement < target_agreement:  # Too few frames to show the target: no exits.
        return make_rule([[None, None]] * len(tops))
    for _ in range(40):
        mid = np.sqrt(max(lo, 1e-3) * hi) if lo > 0 else hi / 16
        rule, agreement = solve(mid)
        if agreement >= target_agreement:
            best, hi = rule, mid
        else:
            lo = mid
        if hi - lo < 1e-3 * hi:
            break
    return best


def budget_to_target(max_accuracy_drop: float) -> float:
    """Turns a budget in points of agreement with the full model into a target share.

    Raises:
      ValueError: for a budget outside (0, 100) points.
    """
    if not (isinstance(max_accuracy_drop, (int, float)) and math.isfinite(max_accuracy_drop)
            and 0.0 < max_accuracy_drop < 100.0):
        raise ValueError(
            f"max_accuracy_drop must be a number of points in (0, 100), got "
            f"{max_accuracy_drop!r}; e.g. 1.0 allows 1 point less agreement with the "
            "full model.")
    return 1.0 - max_accuracy_drop / 100.0


def calibrate_global(similarities: Sequence[np.ndarray], full_predictions: np.ndarray,
                     stage_costs: Sequence[float], target_agreement: float = 0.99,
                     metric: Metric | str = Metric.MARGIN, min_saving: float = 0.02,
                     confidence_z: float = 1.645) -> ExitRule:
    """The baseline: one threshold shared by every stage, the lowest that meets the target.

    Agreement falls as the shared threshold falls, so it is found by bisection
    over the observed scores.
    """
    if not 0.0 < target_agreement <= 1.0:
        raise ValueError(f"target_agreement must be in (0, 1], got {target_agreement}.")
    metric = Metric(metric)
    if metric is Metric.LAYER_AWARE:
        raise ValueError("A single global threshold is a baseline for top1 or margin.")
    full_predictions = np.asarray(full_predictions)
    allowed = [1.0 - c >= min_saving for c in np.cumsum(stage_costs)]
    values = np.unique(np.concatenate([v for _, v in stage_scores(metric, similarities)]))

    def rule_at(t):
        return ExitRule(metric, tuple(t if a else None for a in allowed), target_agreement)

    def ok(t):
        _, pred = simulate(rule_at(t), similarities, full_predictions)
        return wilson_lower_bound(int((pred == full_predictions).sum()), len(pred),
                                  confidence_z) >= target_agreement

    lo, hi = 0, len(values) - 1  # Search the lowest passing index.
    if not ok(float(values[hi])):
        return ExitRule(metric, (None,) * len(similarities), target_agreement)
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(float(values[mid])):
            hi = mid
        else:
            lo = mid + 1
    return rule_at(float(values[lo]))
