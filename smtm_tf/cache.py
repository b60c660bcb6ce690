"""The cache of hot classes: what the stream shows now, as a prior for exits.

Each class has a score that every frame multiplies by `decay` (a forgetting
curve) and that grows by 1 when the full model answers that class, and by
`exit_weight` when an early exit does. Classes scoring at least `hot_min`
(at most `max_hot` of them, the highest) are hot.

Lock-in guard: a wrong early exit would keep its class hot and make further
wrong exits of that class easier. Early exits therefore count for a fraction
of a full-model answer, so a class stays hot only while the full model keeps
confirming it, and frames whose top-1 class is not hot face the stricter
cold threshold against the whole memory.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class CachePolicy:
    """Parameters of the hot-class cache (stored in the descriptor).

    Attributes:
      decay: per-frame factor on every class score (0 < decay < 1).
      exit_weight: what an early exit adds to its class (0..1), against 1
        for a full-model answer.
      hot_min: score a class needs to be hot.
      max_hot: most classes hot at once (0 disables the cache).
    """

    decay: float = 0.9
    exit_weight: float = 0.25
    hot_min: float = 0.5
    max_hot: int = 4

    def __post_init__(self):
        for name in ("decay", "exit_weight", "hot_min"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise ValueError(f"{name} must be a number, got {value!r}.")
            object.__setattr__(self, name, float(value))  # numpy scalars -> JSON-safe.
        if (isinstance(self.max_hot, bool) or not isinstance(self.max_hot, (int, np.integer))):
            raise ValueError(f"max_hot must be a whole number, got {self.max_hot!r}.")
        object.__setattr__(self, "max_hot", int(self.max_hot))
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {self.decay}.")
        if not 0.0 <= self.exit_weight <= 1.0:
            raise ValueError(f"exit_weight must be in [0, 1], got {self.exit_weight}.")
        if not self.hot_min > 0.0:
            raise ValueError(f"hot_min must be > 0, got {self.hot_min}.")
        if self.max_hot < 0:
            raise ValueError(f"max_hot must be >= 0, got {self.max_hot}.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CachePolicy":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"Unknown cache policy fields: {sorted(unknown)}.")
        return cls(**d)


class HotSet:
    """The hot classes of a stream, updated frame by frame.

    `hot` is a bool array over classes, updated in place (the harness holds a
    reference to it).
    """

    def __init__(self, policy: CachePolicy, num_classes: int):
        self.policy = policy
        self.scores = np.zeros(num_classes, np.float64)
        self.hot = np.zeros(num_classes, bool)

    def reset(self) -> None:
        self.scores[:] = 0.0
        self.hot[:] = False

    def update(self, class_id: int, confirmed: bool) -> None:
        """Records the answer for one frame (confirmed: by the full model)."""
        p = self.policy
        self.scores *= p.decay
        self.scores[class_id] += 1.0 if confirmed else p.exit_weight
        np.greater_equal(self.scores, p.hot_min, out=self.hot)
        if self.hot.sum() > p.max_hot:
            keep = np.argsort(-self.scores, kind="stable")[:p.max_hot]
            self.hot[:] = False
            self.hot[keep] = True


def replay(rule, policy: CachePolicy, similarities, full_predictions: np.ndarray,
           frames: np.ndarray | None = None, oracle: bool = False):
    """Runs a stream through the rule with the cache in the loop (no model).

    Args:
      rule: an `exit_policy.ExitRule` (with cold thresholds for the cache to matter).
      policy: the cache policy.
      similarities: per stage, `[N, K]` similarities of a pool of frames.
      full_predictions: the full model's class for each frame of the pool.
      frames: the stream, as indices into the pool (default: the pool in order).
      oracle: feed the cache the full model's answer for every frame (weight 1),
        whatever the rule decided: the hot sets of an ideal cache.

    Returns:
      (exit_stage, prediction, hot): per stream frame, and per stage whether
      the frame's top-1 class was hot when it was scored.
    """
    from smtm_tf import exit_policy  # pylint: disable=import-outside-toplevel

    idx = np.arange(len(full_predictions)) if frames is None else np.asarray(frames)
    tops = exit_policy.stage_scores(rule, [s[idx] for s in similarities])
    full = np.asarray(full_predictions)[idx]
    n, num_stages = len(idx), len(tops)
    top1 = np.stack([t for t, _ in tops])
    value = np.stack([v for _, v in tops])
    inf = np.inf
    hot_t = [inf if t is None else t for t in (rule.threshold_for(s, True)
                                                for s in range(num_stages))]
    cold_t = [inf if t is None else t for t in (rule.threshold_for(s, False)
                                                 for s in range(num_stages))]
    cache = HotSet(policy, similarities[0].shape[-1])
    exit_stage = np.full(n, num_stages, np.int64)
    prediction = full.copy()
    hot = np.zeros((num_stages, n), bool)
    use_cache = policy.max_hot > 0
    for i in range(n):
        for s in range(num_stages):
            c = top1[s, i]
            is_hot = use_cache and cache.hot[c]
            hot[s, i] = is_hot
            if value[s, i] >= (hot_t[s] if is_hot else cold_t[s]):
                exit_stage[i], prediction[i] = s, c
                break
        if use_cache:
            confirmed = oracle or exit_stage[i] == num_stages
            cache.update(full[i] if oracle else prediction[i], confirmed)
    return exit_stage, prediction, hot


def calibrate_with_cache(similarities, full_predictions: np.ndarray, stage_costs,
                         streams, policy: CachePolicy, target_agreement: float = 0.99,
                         metric="margin", metric_params=None, confidence_z: float = 1.645,
                         rounds: int = 3):
    """Calibrates hot and cold thresholds with the cache in the loop.

    The cache changes the decisions and the decisions change the cache, so the
    thresholds are fitted on replayed streams: first with the hot sets an
    ideal cache would have, then, round by round, with the hot sets the rule
    itself produced. The result must meet the target on a closed-loop replay
    of every stream on its own; while it does not, the open-loop target is
    raised by the shortfall.

    Args:
      similarities: per stage, `[N, K]` similarities of held-out frames.
      full_predictions: the full model's class for each of them.
      stage_costs: each stage's share of the full model's compute.
      streams: representative streams, as index arrays into the frames (mix
        the kinds the model will see: scenes with few classes and frames of
        any class, so cold thresholds are fitted on uncached classes too).
      policy: the cache policy.
      target_agreement: required share of stream frames answered as the full model does.
      metric, metric_params: the exit metric.
      confidence_z: z-score of the Wilson bound on the closed-loop agreement.
      rounds: refits with the rule's own hot sets.

    Returns:
      An `ExitRule` with cold thresholds.
    """
    from smtm_tf import exit_policy  # pylint: disable=import-outside-toplevel

    full_predictions = np.asarray(full_predictions)
    idx = np.concatenate([np.asarray(s) for s in streams])
    stream_sims = [s[idx] for s in similarities]
    stream_full = full_predictions[idx]

    def closed_loop(rule, oracle=False):
        parts = [replay(rule, policy, similarities, full_predictions, s, oracle)
                 for s in streams]
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts], axis=1))

    probe = exit_policy.ExitRule(metric, (None,) * len(similarities), target_agreement,
                                 (None,) * len(similarities), metric_params)
    _, _, hot = closed_loop(probe, oracle=True)
    goal = target_agreement
    best = None
    for _ in range(rounds + 4):
        rule = exit_policy.calibrate(stream_sims, stream_full, stage_costs, goal,
                                     confidence_z=confidence_z, metric=metric,
                                     metric_params=metric_params, hot=list(hot))
        rule = dataclasses.replace(rule, target_agreement=target_agreement)
        _, pred, hot = closed_loop(rule)
        # Every stream must meet the target on its own: pooled, a kind where
        # the prior misleads (a long tail without scenes) hides behind the others.
        agree = pred == stream_full
        bounds, start = [], 0
        for st in streams:
            part = agree[start:start + len(st)]
            start += len(st)
            bounds.append(exit_policy.wilson_lower_bound(int(part.sum()), len(part),
                                                         confidence_z))
        bound = min(bounds)
        if bound >= target_agreement:
            best = rule
            rounds -= 1
            if rounds <= 0:
                break
        else:
            goal = min(1.0, goal + (target_agreement - bound) + 1e-4)
    if best is None:  # The cache cannot be made safe here: no exits at all.
        best = dataclasses.replace(probe, target_agreement=target_agreement)
    return best
