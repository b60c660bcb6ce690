"""Exit rules: when a stage's match with the semantic memory is safe to return.

The harness and the calibration share `margins` and `ExitRule.exits`, so a
rule decides on a converted model exactly as it was calibrated.
"""

from __future__ import annotations

import dataclasses
import enum
import math

import numpy as np


class Metric(str, enum.Enum):
    """What is compared with a stage's threshold."""

    # Top-1 minus top-2 cosine similarity over all classes in memory.
    MARGIN = "margin"


@dataclasses.dataclass(frozen=True)
class ExitRule:
    """Per-stage thresholds on an exit metric.

    Attributes:
      metric: the metric the thresholds apply to.
      thresholds: one per stage; a frame exits at the first stage whose metric
        is >= its threshold. None means the stage never exits.
      target_agreement: the agreement with the full model the thresholds were
        calibrated for (share of exits that return the full model's class).
    """

    metric: Metric
    thresholds: tuple[float | None, ...]
    target_agreement: float

    def __post_init__(self):
        object.__setattr__(self, "metric", Metric(self.metric))
        if not 0.0 < self.target_agreement <= 1.0:
            raise ValueError(
                f"target_agreement must be in (0, 1], got {self.target_agreement}.")
        for s, t in enumerate(self.thresholds):
            if t is not None and not (isinstance(t, (int, float)) and math.isfinite(t)):
                raise ValueError(
                    f"thresholds[{s}] must be a finite number or None, got {t!r}.")

    def to_dict(self) -> dict:
        return {"metric": self.metric.value, "thresholds": list(self.thresholds),
                "target_agreement": self.target_agreement}

    @classmethod
    def from_dict(cls, d: dict) -> "ExitRule":
        unknown = set(d) - {"metric", "thresholds", "target_agreement"}
        if unknown:
            raise ValueError(f"Unknown exit rule fields: {sorted(unknown)}.")
        return cls(Metric(d["metric"]),
                   tuple(None if t is None else float(t) for t in d["thresholds"]),
                   float(d["target_agreement"]))


def margins(similarities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 class and top-1 minus top-2 similarity, for `[..., K]` similarities.

    Computed in float32 whatever the input, so batch calibration and the
    per-frame harness get identical values from identical similarities.
    """
    sims = np.asarray(similarities, np.float32)
    top2 = np.partition(sims, -2, axis=-1)[..., -2:]
    return sims.argmax(axis=-1), (top2[..., 1] - top2[..., 0]).astype(np.float32)


def simulate(rule: ExitRule, similarities: list[np.ndarray],
             fallback: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Applies `rule` to per-stage similarities `[N, K]` of N frames.

    Args:
      rule: the exit rule.
      similarities: one `[N, K]` array per stage.
      fallback: the class returned when no stage exits (the full model's).

    Returns:
      (exit_stage, prediction): exit_stage is the stage index, or the number of
      stages for frames that ran the whole model.
    """
    n = len(fallback)
    num_stages = len(similarities)
    exit_stage = np.full(n, num_stages, np.int64)
    prediction = np.asarray(fallback).copy()
    pending = np.ones(n, bool)
    for s, (sims, threshold) in enumerate(zip(similarities, rule.thresholds)):
        if threshold is None:
            continue
        top1, margin = margins(sims)
        go = pending & (margin >= threshold)
        exit_stage[go] = s
        prediction[go] = top1[go]
        pending &= ~go
    return exit_stage, prediction


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


def _best_threshold(margin, exit_value, stay_value):
    """The threshold on `margin` that minimises the summed value of the frames.

    Frames with margin >= threshold take `exit_value`, the others `stay_value`.
    Returns None when no exit at all is best.
    """
    if margin.size == 0:
        return None
    order = np.argsort(-margin, kind="stable")
    m = margin[order]
    gain = np.cumsum(exit_value[order] - stay_value[order])
    # Only cut between distinct margins: tied frames exit together.
    valid = np.flatnonzero(np.append(m[1:] < m[:-1], True))
    if valid.size == 0:
        return None
    k = valid[np.argmin(gain[valid])]
    return float(m[k]) if gain[k] < 0 else None


def _lagrangian_thresholds(tops, full_predictions, cumulative, allowed, lam, rounds=4):
    """Coordinate descent on mean(cost) + lam * mean(disagreement) over thresholds."""
    num_stages = len(tops)
    thresholds = [None] * num_stages
    wrong = [(t != full_predictions).astype(np.float64) for t, _ in tops]
    for _ in range(rounds):
        changed = False
        for s in range(num_stages):
            if not allowed[s]:
                continue
            # Value of a frame that reaches stage s+1 and goes on from there.
            stay = np.ones(len(full_predictions))  # Full model: cost 1, no error.
            for later in range(num_stages - 1, s, -1):
                t = thresholds[later]
                if t is not None:
                    go = tops[later][1] >= t
                    stay = np.where(go, cumulative[later] + lam * wrong[later], stay)
            pending = np.ones(len(full_predictions), bool)
            for earlier in range(s):
                t = thresholds[earlier]
                if t is not None:
                    pending &= tops[earlier][1] < t
            exit_value = cumulative[s] + lam * wrong[s]
            new = _best_threshold(tops[s][1][pending], exit_value[pending], stay[pending])
            if new != thresholds[s]:
                thresholds[s], changed = new, True
        if not changed:
            break
    return tuple(thresholds)


def calibrate(similarities: list[np.ndarray], full_predictions: np.ndarray,
              stage_costs: tuple[float, ...], target_agreement: float = 0.99,
              min_saving: float = 0.02, confidence_z: float = 1.645) -> ExitRule:
    """Picks per-stage margin thresholds on held-out frames.

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

    Returns:
      The calibrated rule.
    """
    if not 0.0 < target_agreement <= 1.0:
        raise ValueError(f"target_agreement must be in (0, 1], got {target_agreement}.")
    if confidence_z < 0:
        raise ValueError(f"confidence_z must be >= 0, got {confidence_z}.")
    if len(similarities) != len(stage_costs):
        raise ValueError(
            f"{len(similarities)} stages of similarities for {len(stage_costs)} costs.")
    full_predictions = np.asarray(full_predictions)
    n = len(full_predictions)
    cumulative = np.cumsum(stage_costs)
    allowed = [1.0 - c >= min_saving for c in cumulative]
    tops = [margins(s) for s in similarities]

    def solve(lam):
        thresholds = _lagrangian_thresholds(tops, full_predictions, cumulative, allowed, lam)
        rule = ExitRule(Metric.MARGIN, thresholds, target_agreement)
        _, pred = simulate(rule, similarities, full_predictions)
        return rule, wilson_lower_bound(int((pred == full_predictions).sum()), n, confidence_z)

    # Agreement grows with lambda (the price of a disagreement). The largest
    # useful price: one disagreement outweighs all the compute of n frames.
    lo, hi = 0.0, float(n)
    best, agreement = solve(hi)
    if agreement < target_agreement:  # Too few frames to show the target: no exits.
        return ExitRule(Metric.MARGIN, (None,) * len(similarities), target_agreement)
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
