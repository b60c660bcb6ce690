"""Calibrating the adaptive memory: closed-loop replays of calibration streams.

`replay` runs a stream's frames through an exit rule with the runtime's own
`MemoryState` in the loop (no model: from semantic vectors or similarities),
and `calibrate_with_cache` searches hot, cold and short-term thresholds (and
which memory levels to keep) so the replayed streams meet the target
agreement at the least compute. Numpy only.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from smtm_tf.fitting import progress
from smtm_tf.runtime import exit_policy
from smtm_tf.runtime.cache import CachePolicy, MemoryState



@dataclasses.dataclass
class ReplayResult:
    """What `replay` saw, per stream frame (and per stage where noted)."""

    exit_stage: np.ndarray
    prediction: np.ndarray
    hit: np.ndarray  # The answer was cached when the frame came.
    # Per stage [S, N], as the frame would have been scored there (also
    # after its exit, for calibration):
    top1: np.ndarray
    value: np.ndarray  # The metric's score (on similarities shifted by the prior).
    hot: np.ndarray
    inst_match: np.ndarray  # Best short-term match (NaN: tier empty).
    inst_class: np.ndarray
    verified: np.ndarray  # Per frame: the early exit was checked (the full model ran too).


def replay(rule, policy: CachePolicy | None, semantics, centres, full_predictions,
           frames=None, oracle: bool = False, similarities=None,
           full_confidence=None) -> ReplayResult:
    """Runs a stream through the rule with the adaptive memory in the loop (no model).

    Args:
      rule: an `exit_policy.ExitRule`.
      policy: the cache policy (None: no cache).
      semantics: `[S, N, D]` semantic vectors of a pool of frames.
      centres: per stage, the `[K, D]` original centres.
      full_predictions: the full model's class for each frame of the pool.
      frames: the stream, as indices into the pool (default: the pool in order).
      oracle: feed the cache the full model's answer for every frame (as
        confirmed), whatever the rule decided: an ideal cache.
      similarities: instead of `semantics`, per stage the `[N, K]`
        similarities of the pool (then no short-term tier or adaptation).
      full_confidence: the full model's top probability for each frame of
        the pool (default 1: every confirmed frame may enter the tier).

    Returns:
      A ReplayResult. Decisions are those of the runtime, which shares
      `MemoryState`; similarities are computed here from the vectors.
    """
    if semantics is None:
        if policy is not None:
            policy = dataclasses.replace(policy, instance_slots=0, adapt_rate=0.0)
        sims_pool = [np.asarray(x, np.float32) for x in similarities]
        if centres is None:
            centres = [np.zeros((x.shape[1], 1), np.float32) for x in sims_pool]
        sem = np.zeros((len(sims_pool), len(sims_pool[0]), 1), np.float32)
    else:
        sims_pool = None
        sem = np.asarray(semantics, np.float32)
    state = MemoryState(policy, rule, centres)
    idx = np.arange(sem.shape[1]) if frames is None else np.asarray(frames)
    full = np.asarray(full_predictions)[idx]
    confidence = (np.ones(len(idx)) if full_confidence is None
                  else np.asarray(full_confidence, np.float64)[idx])
    n, num_stages = len(idx), state.num_stages
    out = ReplayResult(np.full(n, num_stages, np.int64), full.copy(), np.zeros(n, bool),
                       np.full((num_stages, n), -1, np.int64),
                       np.full((num_stages, n), np.nan, np.float32),
                       np.zeros((num_stages, n), bool),
                       np.full((num_stages, n), np.nan, np.float32),
                       np.full((num_stages, n), -1, np.int64), np.zeros(n, bool))
    for i, f in enumerate(idx):
        vectors = sem[:, f]
        answer = -1
        for s in range(num_stages):
            sims = state.centres[s] @ vectors[s] if sims_pool is None else sims_pool[s][f]
            top1, value, favoured = state.lookup(s, sims, vectors[s])
            out.top1[s, i], out.value[s, i], out.hot[s, i] = top1, value, favoured
            if state.inst_count[s]:
                match = state.inst[s, :state.inst_count[s]] @ vectors[s]
                j = int(match.argmax())
                out.inst_match[s, i], out.inst_class[s, i] = match[j], state.inst_class[s, j]
            if answer >= 0 or state.never[s]:
                continue  # Observed for calibration, not decided.
            if value >= (state.hot_t[s] if favoured else state.cold_t[s]):
                answer = top1
                out.exit_stage[i] = s
        confirmed = answer < 0
        if answer >= 0:
            if state.verify_due():
                out.verified[i] = True
                state.verified(answer, int(full[i]))
                if answer != full[i]:
                    answer, confirmed = int(full[i]), True
            out.prediction[i] = answer
        else:
            answer = int(full[i])
        if oracle:
            answer, confirmed = int(full[i]), True
        stage = int(out.exit_stage[i])
        state.record(answer, confirmed, vectors,
                     num_stages if (oracle or stage == num_stages) else stage + 1,
                     confidence[i])
        out.hit[i] = state.last_hit
    return out


# Errors come in runs: a camera holds one object for 5-40 frames, and a hard
# object is wrong on most of them. Per-frame bounds (Wilson) count such a run
# as many independent errors' worth of evidence; blocks of this many frames
# keep the runs whole.
RUN_BLOCK = 40
RUN_BOUND = (f"the lower of a Wilson bound per frame and a moving-block bootstrap bound "
             f"({RUN_BLOCK}-frame blocks), one-sided at 95%")


def block_bootstrap_lower_bound(agree: np.ndarray, z: float = 1.645,
                                block: int = RUN_BLOCK, resamples: int = 1000,
                                seed: int = 0) -> float:
    """One-sided lower bound of a stream's agreement with its errors in runs.

    Moving-block bootstrap: streams of the same length are rebuilt from
    `block`-frame blocks drawn with replacement (seeded: the same stream gives
    the same bound), and the bound is the quantile of their agreement at the
    one-sided level `z` stands for.
    """
    agree = np.asarray(agree, np.float64)
    n = len(agree)
    if n == 0:
        return 0.0
    block = min(block, n)
    sums = np.convolve(agree, np.ones(block), "valid")  # Every block's agreements.
    count = -(-n // block)
    picks = np.random.default_rng(seed).integers(0, len(sums), (resamples, count))
    means = sums[picks].sum(axis=1) / (count * block)
    level = 0.5 * math.erfc(z / math.sqrt(2.0))
    return float(np.quantile(means, level))


def stream_lower_bound(agree: np.ndarray, z: float = 1.645, runs: bool = False) -> float:
    """The bound a calibration stream's agreement must keep above the target.

    Wilson per frame; with `runs`, the lower of that and the block bootstrap
    (`RUN_BOUND`), for streams whose errors come in runs.
    """
    agree = np.asarray(agree, bool)
    wilson = exit_policy.wilson_lower_bound(int(agree.sum()), len(agree), z)
    return min(wilson, block_bootstrap_lower_bound(agree, z)) if runs else wilson


def _stream_bounds(agree: np.ndarray, lengths, z: float, runs: bool) -> list[float]:
    bounds, start = [], 0
    for length in lengths:
        part = agree[start:start + length]
        start += length
        bounds.append(stream_lower_bound(part, z, runs))
    return bounds


def calibrate_with_cache(semantics, centres, full_predictions: np.ndarray, stage_costs,
                         streams, policy: CachePolicy, target_agreement: float = 0.99,
                         metric="margin", metric_params=None, confidence_z: float = 1.645,
                         rounds: int = 3, instance_target: float = 0.998,
                         instance_streams=(), similarities=None, full_confidence=None,
                         runs: bool = False):
    """Calibrates hot and cold thresholds with the memory in the loop.

    The cache changes the decisions and the decisions change the cache, so
    thresholds are fitted on replayed streams: first with the hot sets an
    ideal cache would have, then, round by round, with the hot sets the rule
    itself produced. The result must meet the target on a closed-loop replay
    of every stream on its own; while it does not, the open-loop goal is
    raised by bisection. This is done without and with the short-term tier
    (whose matches favour their class like the cache does); the tier is kept
    if it lowers the compute over all streams, held-object streams included,
    without costing those more than 1 - instance_target of agreement. Centre
    adaptation, if the policy has it, runs in a final closed-loop check; if it
    breaks the target, it is switched off in the returned policy.

    Args:
      semantics: `[S, N, D]` semantic vectors of held-out frames.
      centres: per stage, the `[K, D]` centres.
      full_predictions: the full model's class for each of them.
      stage_costs: each stage's share of the full model's compute.
      streams: representative streams, as index arrays into the frames.
      policy: the cache policy.
      target_agreement: required share of stream frames answered as the full model does.
      metric, metric_params: the exit metric.
      confidence_z: z-score of the bound on each stream's closed-loop agreement
        (`stream_lower_bound`).
      rounds: refits with the rule's own hot sets.
      instance_target: 1 - the agreement the tier may cost a held-object stream.
      similarities: instead of `semantics`, per stage `[N, K]` similarities
        (then no short-term tier or adaptation is calibrated).
      full_confidence: the full model's top probability per frame.
      runs: some streams' errors come in runs (camera streams): each stream's
        bound is then `stream_lower_bound(..., runs=True)`.
      instance_streams: more streams (e.g. a held object: the same frame
        shifted and noisy) on which the short-term tier is calibrated too.
        Their errors come in runs (one hard object, many frames), so the
        class-level rule is not fitted on them; the tier must not lower their
        agreement by more than 1 - instance_target.

    Returns:
      (ExitRule with cold and instance thresholds, the policy as calibrated).
    """
    with progress.bar(desc="calibration replays", unit="frame") as bar:
        full_predictions = np.asarray(full_predictions)
        lengths = [len(s) for s in streams]
        stream_full = np.concatenate([full_predictions[np.asarray(s)] for s in streams])
        static = dataclasses.replace(policy, instance_slots=0, adapt_rate=0.0, verify_rate=0.0,
                                     verify_after=0)
        if semantics is None:
            policy = static

        def closed_loop(rule, pol, oracle=False):
            parts = [replay(rule, pol, semantics, centres, full_predictions, s, oracle,
                            similarities, full_confidence)
                     for s in streams]
            bar.update(sum(lengths))
            return ReplayResult(*(np.concatenate([getattr(p, f.name) for p in parts],
                                                 axis=-1)
                                  for f in dataclasses.fields(ReplayResult)))

        def worst(result):
            return min(_stream_bounds(result.prediction == stream_full, lengths, confidence_z,
                                      runs))

        num_stages = len(stage_costs)
        cumulative = exit_policy.exit_costs(stage_costs)

        def calibrate_levels(pol, inst):
            """Hot and cold thresholds for a policy (and instance thresholds), or None."""
            probe = exit_policy.ExitRule(metric, (None,) * num_stages, target_agreement,
                                         (None,) * num_stages, metric_params, inst)

            def fit(goal, seen):
                tops = [(seen.top1[s], seen.value[s]) for s in range(num_stages)]
                rule = exit_policy.calibrate_scores(tops, stream_full, stage_costs, goal,
                                                    confidence_z=confidence_z,
                                                    hot=list(seen.hot), metric=metric,
                                                    metric_params=metric_params)
                rule = dataclasses.replace(rule, target_agreement=target_agreement,
                                           instance_thresholds=inst)
                return rule, closed_loop(rule, pol)

            # Open loop on an ideal cache's hot sets, then refits on the rule's own.
            seen = closed_loop(probe, pol, oracle=True)
            for _ in range(rounds):
                rule, seen = fit(target_agreement, seen)
            if worst(seen) >= target_agreement:
                return rule
            # Every stream must meet the target on its own: raise the open-loop
            # goal, by bisection, until the closed loop does.
            best, lo, hi, base = None, target_agreement, 1.0, seen
            for _ in range(7):
                mid = 0.5 * (lo + hi)
                rule, result = fit(mid, base)
                if worst(result) >= target_agreement:
                    best, hi = rule, mid
                else:
                    lo = mid
            return best

        def on_held(rule, pol):
            """(mean compute share, agreement) per instance stream."""
            out = []
            for s in instance_streams:
                r = replay(rule, pol, semantics, centres, full_predictions, s,
                           full_confidence=full_confidence)
                bar.update(len(s))
                out.append((float(cumulative[r.exit_stage].mean()),
                            float((r.prediction == full_predictions[np.asarray(s)]).mean())))
            return out

        def cost(rule, pol):
            r = closed_loop(rule, pol)
            return (float(cumulative[r.exit_stage].sum()) + sum(
                c * len(s) for (c, _), s in zip(on_held(rule, pol), instance_streams)))

        no_exits = exit_policy.ExitRule(metric, (None,) * num_stages, target_agreement,
                                        (None,) * num_stages, metric_params)
        best = calibrate_levels(static, None)
        chosen = dataclasses.replace(policy, instance_slots=0)
        if best is None:  # The cache cannot be made safe here: no exits at all.
            return no_exits, chosen
        if policy.instance_slots > 0 and semantics is not None:
            tier = dataclasses.replace(static, instance_slots=policy.instance_slots)
            with_tier = calibrate_levels(tier, (policy.instance_match,) * num_stages)
            # The tier stays if it saves compute over all streams without losing
            # more than 1 - instance_target of agreement on any held-object stream.
            if with_tier is not None and cost(with_tier, tier) < cost(best, static) and all(
                    a >= b - (1.0 - instance_target) for (_, a), (_, b)
                    in zip(on_held(with_tier, tier), on_held(best, static))):
                best, chosen = with_tier, policy
        check = dataclasses.replace(chosen, verify_rate=policy.verify_rate,
                                    verify_after=policy.verify_after)
        if policy.adapt_rate > 0 and worst(closed_loop(best, check)) < target_agreement:
            chosen = dataclasses.replace(chosen, adapt_rate=0.0)
        return best, chosen
