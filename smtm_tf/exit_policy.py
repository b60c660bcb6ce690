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


def calibrate(similarities: list[np.ndarray], full_predictions: np.ndarray,
              stage_costs: tuple[float, ...], target_agreement: float = 0.99,
              min_exits: int = 20, min_saving: float = 0.02) -> ExitRule:
    """Picks per-stage margin thresholds on held-out frames.

    Stage by stage, on the frames that earlier stages did not take, the
    threshold is the lowest margin at which the frames above it agree with the
    full model at least `target_agreement` of the time.

    Args:
      similarities: one `[N, K]` array of similarities to all class centres per stage.
      full_predictions: the full model's class for each frame.
      stage_costs: each stage's share of the full model's compute.
      target_agreement: required share of exits that match the full model.
      min_exits: fewest calibration frames a stage must take to get a threshold
        (fewer are too few to estimate its agreement).
      min_saving: stages after which less than this share of compute remains
        never exit: an exit there saves nothing and can only be wrong.

    Returns:
      The calibrated rule.
    """
    if not 0.0 < target_agreement <= 1.0:
        raise ValueError(f"target_agreement must be in (0, 1], got {target_agreement}.")
    if len(similarities) != len(stage_costs):
        raise ValueError(
            f"{len(similarities)} stages of similarities for {len(stage_costs)} costs.")
    full_predictions = np.asarray(full_predictions)
    remaining_cost = 1.0 - np.cumsum(stage_costs)
    pending = np.ones(len(full_predictions), bool)
    thresholds = []
    for s, sims in enumerate(similarities):
        threshold = None
        if remaining_cost[s] >= min_saving and pending.any():
            top1, margin = margins(sims[pending])
            correct = top1 == full_predictions[pending]
            order = np.argsort(-margin, kind="stable")
            agree = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
            ok = np.flatnonzero(agree >= target_agreement)
            ok = ok[ok + 1 >= min_exits]
            if ok.size:
                k = ok[-1]
                threshold = float(margin[order][k])
                # Frames tied with the k-th margin exit too: re-check them all.
                taken = margin >= threshold
                if correct[taken].mean() < target_agreement:
                    threshold = float(np.nextafter(np.float32(threshold), np.float32(np.inf)))
                if threshold is not None:
                    idx = np.flatnonzero(pending)
                    pending[idx[margin >= threshold]] = False
        thresholds.append(threshold)
    return ExitRule(Metric.MARGIN, tuple(thresholds), target_agreement)
