"""Tests for the adaptive memory: smtm_tf.runtime.cache and where it is wired in.

CachePolicy (and legacy policies), MemoryState (forgetting-curve cache,
adaptive capacity, prior shift, short-term tier, centre adaptation with
verification and revert, persistence), `replay` on semantic vectors and on
similarities, `calibrate_with_cache` in closed loop, the cache policy in
SemanticMemory files and in the descriptor, and the runtime (decisions equal
to `replay`, save_state / load_state, cache sizes).
"""

import dataclasses
import json
import math
import os

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from smtm_tf.runtime import cache
from smtm_tf.fitting import calibration
from smtm_tf.runtime import descriptor as desc
from smtm_tf.fitting import encoders as enc
from smtm_tf.runtime import exit_policy as ep
from smtm_tf.fitting import memory as memory_lib
from smtm_tf.runtime import host as runtime
from smtm_tf.fitting import stages
from smtm_tf.fitting import streams as streams_lib
import testing_utils as tu

COSTS = (0.2, 0.3, 0.45)
NEVER = 5.0  # Above any margin: a class-level threshold that never lets a frame out.


# --- Synthetic frames ---------------------------------------------------------

def frame_pool(n, seed, num_classes=10, spreads=(0.3, 0.5, 0.8), attract=0.5):
    """tu.synthetic_cascade with 10 classes (similarities, full predictions)."""
    return tu.synthetic_cascade(n, seed, num_classes=num_classes, spreads=spreads,
                                attract=attract)


def semantic_pool(n, seed, num_classes=6, dim=16, noises=(1.0, 0.7, 0.4)):
    """Unit semantic vectors [S, n, D] around random unit centres, noisier early.

    Returns:
      (semantics [S, n, D] float32, centres: one [K, D] per stage, full [n]).
    """
    rng = np.random.default_rng(seed)
    full = rng.integers(0, num_classes, n)
    centres, sem = [], []
    for noise in noises:
        c = tu.unit_centres(rng, num_classes, dim)
        v = c[full] + rng.normal(0.0, noise / math.sqrt(dim), (n, dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        centres.append(c)
        sem.append(v.astype(np.float32))
    return np.stack(sem), centres, full


def cached_rule(sims, hot_q=(0.5, 0.4, 0.3), cold_q=(0.9, 0.85, 0.8), metric="margin",
                params=None, instance=None):
    """Hot and cold thresholds at quantiles of each stage's scores."""
    tops = ep.stage_scores(ep.Metric(metric), sims, params)
    hot = tuple(float(np.quantile(v, q)) for (_, v), q in zip(tops, hot_q))
    cold = tuple(float(np.quantile(v, q)) for (_, v), q in zip(tops, cold_q))
    return ep.ExitRule(metric, hot, 0.9, cold, params, instance)


def basis_centres(num_stages, num_classes, dim):
    """Class k's centre is the k-th basis vector at every stage."""
    return [np.eye(num_classes, dim, dtype=np.float32) for _ in range(num_stages)]


def unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def state_for(policy, num_classes=4, num_stages=2, dim=6, thresholds=(0.2, 0.2),
              cold=(0.4, 0.4), instance=None):
    rule = ep.ExitRule("margin", thresholds, 0.9, cold, None, instance)
    return cache.MemoryState(policy, rule, basis_centres(num_stages, num_classes, dim))


def manual_closed_loop(rule, policy, sims, full):
    """A fixed-size cache (no prior) in the loop, written out from the documented rules."""
    num_stages, n, k = len(sims), len(full), sims[0].shape[1]
    scores, hot = np.zeros(k), np.zeros(k, bool)
    stages_out, preds = [], []
    for i in range(n):
        exit_stage, pred = num_stages, int(full[i])
        for s in range(num_stages):
            c, value = ep.score(rule.metric, sims[s][i], rule.stage_params(s))
            threshold = rule.threshold_for(s, bool(hot[c]))
            if threshold is not None and value >= threshold:
                exit_stage, pred = s, int(c)
                break
        scores *= policy.decay
        scores[pred] += 1.0 if exit_stage == num_stages else policy.exit_weight
        hot[:] = False
        order = [c for c in np.argsort(-scores, kind="stable") if scores[c] >= policy.hot_min]
        hot[order[:policy.max_hot]] = True
        stages_out.append(exit_stage)
        preds.append(pred)
    return np.array(stages_out), np.array(preds)


def open_set_stream(full, num_frames, seed, hot_class=0):
    """Every other frame of `hot_class`; the others drawn from all other classes."""
    rng = np.random.default_rng(seed)
    same = np.flatnonzero(full == hot_class)
    others = np.flatnonzero(full != hot_class)
    idx = np.empty(num_frames, np.int64)
    idx[0::2] = rng.choice(same, (num_frames + 1) // 2)
    idx[1::2] = rng.choice(others, num_frames // 2)
    return idx


# --- CachePolicy --------------------------------------------------------------

class CachePolicyTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("decay_zero", dict(decay=0.0), "decay must be in"),
        ("decay_one", dict(decay=1.0), "decay must be in"),
        ("decay_nan", dict(decay=math.nan), "decay must be finite"),
        ("prior_weight_infinite", dict(prior_weight=math.inf), "prior_weight must be finite"),
        ("prior_weight_nan", dict(prior_weight=math.nan), "prior_weight must be finite"),
        ("window_huge", dict(window=2 ** 63), "window must be <="),
        ("exit_weight_above_one", dict(exit_weight=1.5), "exit_weight must be in"),
        ("hot_min_zero", dict(hot_min=0.0), "hot_min must be > 0"),
        ("max_hot_negative", dict(max_hot=-1, min_hot=0), "must be >= 0"),
        ("min_above_max", dict(min_hot=3, max_hot=2), "min_hot <= max_hot"),
        ("max_hot_float", dict(max_hot=1.5), "max_hot must be a whole number"),
        ("window_zero", dict(window=0), "window and grow_after"),
        ("grow_after_zero", dict(grow_after=0), "window and grow_after"),
        ("prior_negative", dict(prior_weight=-0.1), "prior_weight must be >= 0"),
        ("slots_negative", dict(instance_slots=-1), "instance_slots"),
        ("adapt_above_one", dict(adapt_rate=1.5), "adapt_rate must be in"),
        ("verify_negative", dict(verify_rate=-0.1), "verify_rate must be in"),
        ("verify_after_negative", dict(verify_after=-1), "verify_after must be >= 0"),
        ("verify_after_float", dict(verify_after=2.5), "verify_after must be a whole number"),
        ("drift_too_far", dict(max_drift=2.5), "max_drift must be in"),
        ("match_above_one", dict(instance_match=1.5), "instance_match must be in"),
        ("match_below_minus_one", dict(instance_match=-1.5), "instance_match must be in"),
        ("shift_negative", dict(instance_shift=-0.1), "instance_shift in"),
        ("shift_too_large", dict(instance_shift=2.5), "instance_shift in"),
        ("shift_string", dict(instance_shift="0.1"), "instance_shift must be a number"),
        ("confidence_above_one", dict(instance_min_confidence=1.5),
         "instance_min_confidence must be in"),
        ("confidence_negative", dict(instance_min_confidence=-0.1),
         "instance_min_confidence must be in"))
    def test_invalid(self, kwargs, pattern):
        with self.assertRaisesRegex(ValueError, pattern):
            cache.CachePolicy(**kwargs)

    def test_round_trip(self):
        policy = cache.CachePolicy(decay=0.8125, exit_weight=0.3, hot_min=0.7, min_hot=2,
                                   max_hot=3, window=7, grow_after=3, prior_weight=0.125,
                                   instance_slots=5, instance_match=0.875, instance_shift=0.3,
                                   instance_min_confidence=0.625, adapt_rate=0.25,
                                   max_drift=0.2, verify_rate=0.1, prior="share")
        d = json.loads(json.dumps(policy.to_dict()))
        self.assertEqual(d["prior"], "share")
        self.assertEqual(cache.CachePolicy.from_dict(d), policy)
        self.assertNotEqual(cache.CachePolicy.from_dict(d), cache.CachePolicy())

    def test_legacy_policy_is_a_fixed_size_hot_set(self):
        legacy = {"decay": 0.8, "exit_weight": 0.5, "hot_min": 0.6, "max_hot": 3}
        p = cache.CachePolicy.from_dict(legacy)
        self.assertEqual(p.prior_weight, 0.0)
        self.assertEqual(p.instance_slots, 0)
        self.assertEqual(p.adapt_rate, 0.0)
        self.assertEqual(p.verify_rate, 0.0)
        self.assertEqual(p.min_hot, 3)
        self.assertEqual(p.max_hot, 3)
        self.assertEqual((p.decay, p.exit_weight, p.hot_min), (0.8, 0.5, 0.6))
        # A legacy policy behaves as the fixed-size hot set: capacity never moves.
        state = state_for(cache.CachePolicy.from_dict(legacy), num_classes=6)
        for i in range(200):
            state.record(i % 6, True)
            self.assertEqual(state.capacity, 3)
            self.assertFalse(state.shift.any())

    def test_from_dict_rejects_unknown_and_partly_new_fields(self):
        d = cache.CachePolicy().to_dict()
        with self.assertRaisesRegex(ValueError, r"Unknown cache policy fields: \['size'\]"):
            cache.CachePolicy.from_dict(dict(d, size=3))
        partial = dict(d)
        del partial["verify_rate"]
        with self.assertRaisesRegex(ValueError, "Missing cache policy fields"):
            cache.CachePolicy.from_dict(partial)

    def test_policy_without_the_admission_gate_admits_every_answer(self):
        old = cache.CachePolicy().to_dict()
        del old["admit_min_confidence"]
        self.assertEqual(cache.CachePolicy.from_dict(old).admit_min_confidence, 0.0)
        self.assertEqual(cache.CachePolicy().admit_min_confidence, 0.9)
        with self.assertRaisesRegex(ValueError, "admit_min_confidence must be in"):
            cache.CachePolicy(admit_min_confidence=1.5)

    def test_policy_without_a_prior_field_keeps_the_share_prior(self):
        # Written before `prior` existed: its rule was calibrated with the share prior.
        old = cache.CachePolicy().to_dict()
        del old["prior"]
        self.assertIs(cache.CachePolicy.from_dict(old).prior, cache.Prior.SHARE)
        self.assertIs(cache.CachePolicy().prior, cache.Prior.SHARE)
        with self.assertRaisesRegex(ValueError, "prior must be one of"):
            cache.CachePolicy(prior="uniform")

    def test_adaptive_policy_without_the_instance_fields(self):
        # Written before instance_match / instance_shift / instance_min_confidence:
        # no confidence gate, the class defaults for match and shift.
        policy = cache.CachePolicy(decay=0.8, exit_weight=0.5, hot_min=0.6, min_hot=2,
                                   max_hot=3, window=7, grow_after=3, prior_weight=0.25,
                                   instance_slots=5, instance_match=0.5, instance_shift=0.5,
                                   instance_min_confidence=0.5, adapt_rate=0.25,
                                   max_drift=0.2, verify_rate=0.1)
        old = policy.to_dict()
        for name in ("instance_match", "instance_shift", "instance_min_confidence"):
            del old[name]
        p = cache.CachePolicy.from_dict(old)
        self.assertEqual(p.instance_min_confidence, 0.0)
        self.assertEqual(p.instance_match, cache.CachePolicy.instance_match)
        self.assertEqual(p.instance_shift, cache.CachePolicy.instance_shift)
        self.assertEqual(p, dataclasses.replace(
            policy, instance_match=cache.CachePolicy.instance_match,
            instance_shift=cache.CachePolicy.instance_shift, instance_min_confidence=0.0))
        # Each missing on its own: only that one is filled in.
        for name, want in (("instance_match", cache.CachePolicy.instance_match),
                           ("instance_shift", cache.CachePolicy.instance_shift),
                           ("instance_min_confidence", 0.0)):
            d = policy.to_dict()
            del d[name]
            self.assertEqual(cache.CachePolicy.from_dict(d),
                             dataclasses.replace(policy, **{name: want}), name)
        # An old adaptive policy lets every confirmed frame into the tier.
        state = state_for(p, instance=(0.9, 0.9))
        state.record(1, True, np.stack([unit(np.ones(6))] * 2), ran=2, confidence=0.01)
        self.assertEqual(state.inst_count, [1, 1])

    def test_legacy_policy_has_no_tier_whatever_the_instance_fields(self):
        legacy = {"decay": 0.8, "exit_weight": 0.5, "hot_min": 0.6, "max_hot": 3}
        p = cache.CachePolicy.from_dict(legacy)
        self.assertEqual((p.instance_slots, p.window, p.grow_after), (0, 20, 2))
        self.assertEqual(p.min_hot, p.max_hot)


# --- MemoryState: cache, capacity, prior ------------------------------------

class ForgettingCurveTest(absltest.TestCase):

    def test_lowest_score_is_evicted_first(self):
        policy = cache.CachePolicy(decay=0.9, exit_weight=0.25, hot_min=0.5, min_hot=2,
                                   max_hot=2, window=1000, prior_weight=0.0)
        state = state_for(policy)
        expected = [
            # (class, confirmed) -> scores after the update, hot classes.
            ((0, True), [1, 0, 0, 0], {0}),
            ((1, True), [0.9, 1, 0, 0], {0, 1}),
            # 0: 0.81, 1: 0.9, 2: 1 all qualify: the lowest (0) leaves.
            ((2, True), [0.81, 0.9, 1, 0], {1, 2}),
            # 0: 1.729, 1: 0.81, 2: 0.9: now class 1 is the lowest.
            ((0, True), [1.729, 0.81, 0.9, 0], {0, 2}),
            # An early exit adds exit_weight only: 3 reaches 0.25, not hot.
            ((3, False), [1.5561, 0.729, 0.81, 0.25], {0, 2}),
            # 3: 1.225 beats 2: 0.729.
            ((3, True), [1.40049, 0.6561, 0.729, 1.225], {0, 3}),
        ]
        for step, ((c, confirmed), scores, want) in enumerate(expected):
            state.record(c, confirmed)
            np.testing.assert_allclose(state.scores, scores, rtol=1e-9, err_msg=str(step))
            self.assertEqual(set(np.flatnonzero(state.hot)), want, step)

    def test_exits_need_more_frames_than_confirmations(self):
        def frames_to_hot(policy, confirmed):
            state = state_for(policy)
            for frames in range(1, 100):
                state.record(1, confirmed)
                if state.hot[1]:
                    return frames
            return None

        policy = cache.CachePolicy(decay=0.9, exit_weight=0.25, hot_min=0.5, min_hot=1,
                                   max_hot=6, window=1000, prior_weight=0.0)
        self.assertEqual(frames_to_hot(policy, True), 1)
        self.assertEqual(frames_to_hot(policy, False), 3)  # 0.25, 0.475, 0.6775.
        self.assertIsNone(frames_to_hot(dataclasses.replace(policy, exit_weight=0.04), False))
        # hot_min 0.3: two exits are enough (0.25, 0.475).
        self.assertEqual(frames_to_hot(dataclasses.replace(policy, hot_min=0.3), False), 2)

    def test_reset_forgets(self):
        state = state_for(cache.CachePolicy(decay=0.9, hot_min=0.5, min_hot=1, max_hot=3,
                                            window=1000, prior_weight=0.25))
        for c in (1, 2, 1, 3, 1):
            state.record(c, True)
        self.assertTrue(state.hot.any())
        self.assertTrue(state.shift.any())
        state.reset()
        self.assertFalse(state.hot.any())
        self.assertFalse(state.scores.any())
        self.assertFalse(state.shift.any())
        self.assertEqual(state.capacity, 1)


class CapacityTest(absltest.TestCase):

    def test_grows_after_answers_left_out(self):
        policy = cache.CachePolicy(decay=0.9, hot_min=0.5, min_hot=1, max_hot=3, window=5,
                                   grow_after=2, prior_weight=0.0)
        state = state_for(policy)
        # 0, 1: not qualified before. Then 0, 1, 0 each qualified (score
        # >= 0.5) but were left out of a cache of one: 3 >= grow_after.
        for k, c in enumerate((0, 1, 0, 1)):
            state.record(c, True)
            self.assertEqual(state.capacity, 1, k)
        self.assertEqual(state.left_out.tolist(), [1, 1, 0, 0])
        state.record(0, True)
        # Two distinct classes were left out: the capacity grows by two.
        self.assertEqual(state.capacity, 3)
        self.assertEqual(state.hot.sum(), 2)

    def test_grows_by_one_when_one_class_was_left_out(self):
        policy = cache.CachePolicy(decay=0.9, hot_min=0.5, min_hot=1, max_hot=3, window=8,
                                   grow_after=2, prior_weight=0.0)
        state = state_for(policy)
        # Class 0 holds the cache of one; class 1 qualifies (after its first
        # answer) and is left out at frames 6 and 8.
        for c in (0, 0, 1, 0, 0, 1, 0, 1):
            state.record(c, True)
        self.assertEqual(state.capacity, 2)

    def test_one_answer_left_out_is_not_enough(self):
        policy = cache.CachePolicy(decay=0.9, hot_min=0.5, min_hot=1, max_hot=3, window=5,
                                   grow_after=2, prior_weight=0.0)
        state = state_for(policy)
        for c in (0, 1, 0, 0, 0):  # Only the third answer was left out.
            state.record(c, True)
        self.assertEqual(state.capacity, 1)

    def test_growth_is_bounded_by_max_hot(self):
        policy = cache.CachePolicy(decay=0.99, hot_min=0.5, min_hot=1, max_hot=3, window=4,
                                   grow_after=1, prior_weight=0.0)
        state = state_for(policy, num_classes=6)
        history = []
        for i in range(200):
            state.record(i % 6, True)
            history.append(state.capacity)
            self.assertLessEqual(state.hot.sum(), state.capacity)
        self.assertEqual(max(history), 3)
        self.assertEqual(history[-1], 3)
        self.assertTrue(all(b >= a for a, b in zip(history, history[1:])))

    def test_shrinks_when_a_cached_class_gets_no_answer(self):
        policy = cache.CachePolicy(decay=0.99, hot_min=0.5, min_hot=2, max_hot=4, window=4,
                                   grow_after=1, prior_weight=0.0)
        state = state_for(policy, num_classes=6)
        for i in range(100):
            state.record(i % 6, True)
        self.assertEqual(state.capacity, 4)
        history = []
        for _ in range(40):  # Only class 0 now: the other cached classes go silent.
            state.record(0, True)
            history.append(state.capacity)
        self.assertEqual(history[3], 3)  # One step per window...
        self.assertEqual(history[7], 2)
        self.assertEqual(history[-1], 2)  # ... down to min_hot, no lower.
        self.assertTrue(all(a - b in (0, 1) for a, b in zip(history, history[1:])))

    def test_no_shrink_when_every_cached_class_answers(self):
        policy = cache.CachePolicy(decay=0.9, hot_min=0.5, min_hot=1, max_hot=4, window=4,
                                   grow_after=2, prior_weight=0.0)
        state = state_for(policy)
        state.capacity = 2
        for _ in range(40):
            for c in (0, 1):
                state.record(c, True)
        self.assertEqual(state.capacity, 2)


class AdmissionGateTest(absltest.TestCase):

    def test_unsure_full_answers_do_not_enter_the_cache(self):
        policy = cache.CachePolicy(admit_min_confidence=0.9, instance_slots=0)
        state = state_for(policy)
        for _ in range(10):
            state.record(2, True, confidence=0.6)  # The model is unsure: no evidence.
        self.assertFalse(state.hot.any())
        self.assertEqual(state.scores[2], 0.0)
        state.record(2, True, confidence=0.95)
        self.assertTrue(state.hot[2])
        self.assertEqual(state.scores[2], 1.0)

    def test_early_exits_still_count_as_exits(self):
        state = state_for(cache.CachePolicy(admit_min_confidence=0.9, instance_slots=0))
        state.record(1, False, confidence=0.1)  # Exits carry no full-model confidence.
        self.assertEqual(state.scores[1], 0.25)

    def test_gate_zero_admits_every_answer(self):
        state = state_for(cache.CachePolicy(admit_min_confidence=0.0, instance_slots=0))
        state.record(3, True, confidence=0.2)
        self.assertTrue(state.hot[3])


class PriorShiftTest(absltest.TestCase):

    SEQUENCE = (0, 0, 1, 0, 2, 0, 1, 3, 0, 0)

    def run_sequence(self, prior_weight, prior=cache.Prior.CONTRAST):
        policy = cache.CachePolicy(decay=0.9, exit_weight=0.25, hot_min=0.5,
                                   prior_weight=prior_weight, min_hot=2, max_hot=2,
                                   window=1000, prior=prior)
        state = state_for(policy, num_classes=5)
        shifts = []
        for c in self.SEQUENCE:
            state.record(c, c % 2 == 0)
            shifts.append((state.shift.copy(), state.hot.copy(), state.scores.copy()))
        return shifts

    def check_proportional(self, prior, want_evidence):
        one, two = self.run_sequence(1.0 / 16, prior), self.run_sequence(1.0 / 8, prior)
        for step, ((shift, hot, scores), (shift2, hot2, _)) in enumerate(zip(one, two)):
            np.testing.assert_array_equal(hot, hot2)
            self.assertTrue((shift >= 0).all(), step)
            np.testing.assert_array_equal(shift[~hot], 0.0)
            np.testing.assert_allclose(shift2, 2 * shift, rtol=1e-6, err_msg=str(step))
            want = np.where(hot, np.maximum(want_evidence(scores, hot), 0) / 16, 0)
            np.testing.assert_allclose(shift, want, rtol=1e-5, atol=1e-7)
        self.assertTrue(any(s[0][s[1]].max() > 0 for s in one))
        return one

    def test_share_prior_is_the_log_share_over_uniform(self):
        self.check_proportional(cache.Prior.SHARE, lambda scores, hot: np.log(
            (scores + 1 / 5) / (scores.sum() + 1) * 5))

    def test_contrast_prior_is_the_log_odds_against_uncached_classes(self):
        def evidence(scores, hot):
            rest = scores[~hot].mean() if (~hot).any() else 0.0
            return np.log((scores + 1 / 5) / (rest + 1 / 5))
        self.check_proportional(cache.Prior.CONTRAST, evidence)

    def test_contrast_prior_stays_strong_in_a_larger_scene(self):
        # Two classes seen equally often, nothing else: the share prior sees
        # half the uniform odds (log 5/2), the contrast prior the odds against
        # the unseen classes.
        shifts = {}
        for prior in cache.Prior:
            policy = cache.CachePolicy(max_hot=2, min_hot=2, prior=prior, prior_weight=1.0)
            state = state_for(policy, num_classes=5)
            for _ in range(30):
                for c in (0, 1):
                    state.record(c, True)
            shifts[prior] = state.shift[0]
        self.assertGreater(shifts[cache.Prior.CONTRAST], 2 * shifts[cache.Prior.SHARE])

    def test_zero_prior_weight_gives_no_shift(self):
        for shift, hot, _ in self.run_sequence(0.0):
            self.assertTrue(hot.any() or True)
            np.testing.assert_array_equal(shift, 0.0)

    def test_shift_raises_a_cached_class_over_its_threshold(self):
        # Class 0 cached with a strong prior: a frame just under the hot
        # threshold on raw similarities exits once shifted.
        policy = cache.CachePolicy(decay=0.9, exit_weight=0.25, hot_min=0.5, prior_weight=0.25,
                                   min_hot=1, max_hot=1, window=1000, instance_slots=0)
        state = state_for(policy, thresholds=(0.3, 0.3), cold=(0.9, 0.9))
        for _ in range(5):
            state.record(0, True)
        self.assertGreater(state.shift[0], 0.1)
        sims = np.array([0.5, 0.25, 0.0, 0.0], np.float32)  # Margin 0.25 < 0.3.
        self.assertEqual(state.decide(0, sims, np.zeros(6, np.float32)), 0)
        plain = state_for(dataclasses.replace(policy, prior_weight=0.0),
                          thresholds=(0.3, 0.3), cold=(0.9, 0.9))
        for _ in range(5):
            plain.record(0, True)
        self.assertEqual(plain.decide(0, sims, np.zeros(6, np.float32)), -1)
        # A cold class is never lowered: a cold top-1 still faces the cold threshold.
        sims = np.array([-1.0, 0.5, 0.25, 0.0], np.float32)
        self.assertLess(state.shift[0], 1.25)
        self.assertEqual(state.decide(0, sims, np.zeros(6, np.float32)), -1)


# --- Centre adaptation and verification -------------------------------------

class AdaptationTest(absltest.TestCase):

    def adapted_state(self, steps=200):
        policy = cache.CachePolicy(decay=0.9, hot_min=0.5, adapt_rate=0.5, max_drift=0.3,
                                   min_hot=2, max_hot=2, window=1000, verify_rate=0.25,
                                   instance_slots=2, instance_min_confidence=0.9)
        state = state_for(policy, instance=(0.99, 0.99))
        far = np.stack([unit([-1, 0, 0, 0, 0, 1])] * 2)  # Away from class 0's centre.
        for _ in range(steps):
            state.record(0, True, far, ran=2)
        return state

    def test_bounded_unit_and_originals_untouched(self):
        state = self.adapted_state()
        np.testing.assert_array_equal(state.original, np.stack(basis_centres(2, 4, 6)))
        norms = np.linalg.norm(state.offsets, axis=-1)
        self.assertTrue((norms <= 0.3 + 1e-6).all(), norms)
        self.assertAlmostEqual(float(norms[:, 0].max()), 0.3, places=5)
        np.testing.assert_allclose(np.linalg.norm(state.centres, axis=-1), 1.0, atol=1e-6)
        self.assertTrue(state.adapted[0])
        self.assertFalse(state.adapted[1:].any())
        self.assertFalse(np.allclose(state.centres[:, 0], state.original[:, 0]))
        np.testing.assert_array_equal(state.centres[:, 1:], state.original[:, 1:])

    def test_exits_and_unconfirmed_answers_do_not_adapt(self):
        policy = cache.CachePolicy(decay=0.9, hot_min=0.5, adapt_rate=0.5, max_drift=0.3,
                                   min_hot=2, max_hot=2, window=1000)
        state = state_for(policy)
        far = np.stack([unit([-1, 0, 0, 0, 0, 1])] * 2)
        for _ in range(10):
            state.record(0, False, far, ran=2)  # Early exits.
        for _ in range(10):
            state.record(0, True, far, ran=1)  # Not all stages ran.
        self.assertFalse(state.adapted.any())
        np.testing.assert_array_equal(state.centres, state.original)

    def test_verified_disagreement_reverts_and_forgets_instances(self):
        state = self.adapted_state()
        self.assertEqual(state.inst_count, [2, 2])
        state.verified(1, 1)  # Agreement: nothing changes.
        self.assertTrue(state.adapted[0])
        self.assertEqual(state.inst_count, [2, 2])
        state.verified(0, 2)
        self.assertFalse(state.adapted.any())
        np.testing.assert_array_equal(state.centres, state.original)
        np.testing.assert_array_equal(state.offsets, 0.0)
        self.assertEqual(state.inst_count, [0, 0])
        self.assertEqual((state.checks, state.disagreements, state.reverts), (2, 1, 1))

    def test_verified_disagreement_evicts_the_exit_class(self):
        policy = cache.CachePolicy(min_hot=3, max_hot=3, hot_min=0.5, prior_weight=0.0,
                                   instance_slots=0)
        state = state_for(policy)
        for c in (0, 0, 1, 0):
            state.record(c, True)
        self.assertTrue(state.hot[0] and state.hot[1])
        state.verified(1, 1)  # Agreement: class 1 stays.
        self.assertTrue(state.hot[1])
        state.verified(0, 1)  # Class 0 was wrong: out of the cache.
        self.assertEqual(state.scores[0], 0.0)
        self.assertFalse(state.hot[0])
        self.assertTrue(state.hot[1])

    def test_verify_due_every_round_one_over_rate(self):
        for rate, every in ((0.25, 4), (0.3, 3), (1.0, 1), (0.1, 10)):
            state = state_for(cache.CachePolicy(verify_rate=rate, verify_after=0))
            due = [state.verify_due() for _ in range(40)]
            self.assertEqual([i + 1 for i, d in enumerate(due) if d],
                             list(range(every, 41, every)), rate)
        state = state_for(cache.CachePolicy(verify_rate=0.0, verify_after=0))
        self.assertFalse(any(state.verify_due() for _ in range(100)))


class ExitRunTest(absltest.TestCase):
    """`verify_after`: a long run of early exits gets one checked."""

    def exit_frame(self, state, class_id):
        """What the runtime does for an early exit the full model agrees with;
        True if it was checked."""
        due = state.verify_due()
        if due:
            state.verified(class_id, class_id)
        state.record(class_id, False)
        return due

    def test_the_exit_after_a_run_of_verify_after_is_checked(self):
        state = state_for(cache.CachePolicy(verify_after=4, prior_weight=0.0))
        due = [self.exit_frame(state, 0) for _ in range(12)]
        self.assertEqual([i + 1 for i, d in enumerate(due) if d], [5, 10])

    def test_a_full_model_answer_restarts_the_run(self):
        state = state_for(cache.CachePolicy(verify_after=4, prior_weight=0.0))
        due = [self.exit_frame(state, 0) for _ in range(3)]
        state.record(0, True)  # The full model answered: a new run starts.
        due += [self.exit_frame(state, 0) for _ in range(5)]
        self.assertEqual([i + 1 for i, d in enumerate(due) if d], [8])

    def test_a_sampled_check_restarts_the_run(self):
        state = state_for(cache.CachePolicy(verify_after=4, verify_rate=1 / 3,
                                            prior_weight=0.0))
        due = [self.exit_frame(state, 0) for _ in range(12)]
        # Every third exit is sampled, so no run ever reaches five.
        self.assertEqual([i + 1 for i, d in enumerate(due) if d], [3, 6, 9, 12])

    def test_zero_never_checks(self):
        state = state_for(cache.CachePolicy(verify_after=0, prior_weight=0.0))
        self.assertFalse(any(self.exit_frame(state, 0) for _ in range(500)))

    def test_a_class_held_by_wrong_exits_is_evicted_within_the_run(self):
        # Class 0 was confirmed; then every frame is class 1 (the full model
        # says so) but exits as class 0, which the exits keep cached. The run
        # check catches it: the class leaves and the frame returns class 1.
        policy = cache.CachePolicy(verify_after=8, prior_weight=0.0, exit_weight=0.25)
        state = state_for(policy)
        for _ in range(3):
            state.record(0, True)
        wrong = 0
        for _ in range(30):
            if not state.hot[0]:
                break  # The next frame faces the cold threshold: no lock-in.
            if state.verify_due():
                state.verified(0, 1)
                state.record(1, True)
            else:
                state.record(0, False)
                wrong += 1
        self.assertFalse(state.hot[0])
        self.assertEqual(wrong, 8)

    def test_a_policy_without_the_field_never_checks(self):
        d = cache.CachePolicy().to_dict()
        del d["verify_after"]
        self.assertEqual(cache.CachePolicy.from_dict(d).verify_after, 0)

    def test_no_cache_never_checks(self):
        state = cache.MemoryState(None, ep.ExitRule("margin", (0.2, 0.2), 0.9),
                                  basis_centres(2, 4, 6))
        self.assertFalse(any(state.verify_due() for _ in range(500)))

    def test_the_run_survives_save_and_restore(self):
        policy = cache.CachePolicy(verify_after=4, prior_weight=0.0)
        state = state_for(policy)
        for _ in range(3):
            self.exit_frame(state, 0)
        restored = state_for(policy)
        restored.from_arrays(state.to_arrays())
        self.assertEqual(restored.exit_run, 3)
        self.assertFalse(self.exit_frame(restored, 0))
        self.assertTrue(self.exit_frame(restored, 0))


# --- Short-term tier --------------------------------------------------------

class ShortTermTierTest(absltest.TestCase):

    # No cache (max_hot 0), so only a tier match can favour a class.
    POLICY = cache.CachePolicy(max_hot=0, min_hot=0, prior_weight=0.0, instance_slots=2,
                               instance_match=0.99, instance_shift=0.1,
                               instance_min_confidence=0.9)
    V = unit([0.1, 0.2, 0.3, 0.9, 0.1, 0.2])  # Unit already. Top-1: class 3, margin 0.6.

    def tier_state(self, policy=None, hot=(0.65, 0.65), cold=(0.7, 0.7), instance=(0.99, None)):
        return state_for(policy or self.POLICY, thresholds=hot, cold=cold, instance=instance)

    def test_match_shifts_the_remembered_class_and_favours_it(self):
        state = self.tier_state()
        v = self.V
        sims = state.centres[0] @ v
        top1, value, favoured = state.lookup(0, sims, v)  # Tier empty.
        self.assertEqual(top1, 3)
        self.assertAlmostEqual(value, float(sims[3] - sims[2]), places=6)
        self.assertFalse(favoured)
        self.assertAlmostEqual(value, 0.6, places=5)
        self.assertEqual(state.decide(0, sims, v), -1)  # 0.6 < hot 0.65 < cold 0.7.
        state.record(3, True, np.stack([v, v]), ran=2)
        before = sims.copy()
        top1, value, favoured = state.lookup(0, sims, v)
        np.testing.assert_array_equal(sims, before)  # The caller's array is untouched.
        self.assertEqual(top1, 3)
        self.assertAlmostEqual(value, float(sims[3] + 0.1 - sims[2]), places=6)
        self.assertTrue(favoured)
        # Below the cold threshold, over the hot one once shifted: it exits.
        self.assertEqual(state.decide(0, sims, v), 3)
        # A near frame matches too.
        near = unit(v + np.float32(0.01) * unit([1, -1, 0, 0, 1, 0]))
        self.assertEqual(state.decide(0, state.centres[0] @ near, near), 3)
        # The shift is instance_shift: doubled, the margin grows by as much again.
        wide = self.tier_state(dataclasses.replace(self.POLICY, instance_shift=0.2))
        wide.record(3, True, np.stack([v, v]), ran=2)
        self.assertAlmostEqual(wide.lookup(0, sims, v)[1], float(sims[3] + 0.2 - sims[2]),
                               places=6)
        # The hot threshold still applies: a favoured frame under it goes on.
        strict = self.tier_state(hot=(0.75, 0.75))
        strict.record(3, True, np.stack([v, v]), ran=2)
        self.assertTrue(strict.lookup(0, sims, v)[2])
        self.assertEqual(strict.decide(0, sims, v), -1)

    def test_match_can_change_the_top1_class(self):
        state = self.tier_state()
        v = self.V
        sims = state.centres[0] @ v  # Class 2 is second, 0.6 below class 3.
        gap = float(sims[3] - sims[2])
        policy = dataclasses.replace(self.POLICY, instance_shift=gap + 0.4)
        state = self.tier_state(policy, hot=(0.3, 0.3))
        state.record(2, True, np.stack([v, v]), ran=2)  # The full model said class 2.
        top1, value, favoured = state.lookup(0, sims, v)
        self.assertEqual((top1, favoured), (2, True))
        self.assertAlmostEqual(value, 0.4, places=5)
        self.assertEqual(state.decide(0, sims, v), 2)
        # A smaller shift leaves class 3 on top: not the matched class, so not
        # favoured, and it faces the cold threshold (the conflict goes on).
        self.assertAlmostEqual(gap, 0.6, places=5)
        state = self.tier_state(dataclasses.replace(self.POLICY, instance_shift=gap / 2))
        state.record(2, True, np.stack([v, v]), ran=2)
        top1, value, favoured = state.lookup(0, sims, v)
        self.assertEqual((top1, favoured), (3, False))
        self.assertAlmostEqual(value, gap / 2, places=5)
        self.assertEqual(state.decide(0, sims, v), -1)

    def test_no_match_changes_nothing(self):
        v = self.V
        plain = self.tier_state()
        state = self.tier_state()
        state.record(1, True, np.stack([v, v]), ran=2)
        far = unit([1, 0, 0.3, 0, 0, 0])
        for stage, x in ((0, far), (1, v)):  # Too far; no instance threshold at stage 1.
            sims = state.centres[stage] @ x
            self.assertEqual(state.lookup(stage, sims, x), plain.lookup(stage, sims, x))
            self.assertFalse(state.lookup(stage, sims, x)[2])
        self.assertEqual(state.decide(1, state.centres[1] @ v, v), -1)
        # Just under the instance threshold: no match.
        state = self.tier_state(instance=(float(np.float32(far @ v)) + 1e-4, None))
        state.record(1, True, np.stack([v, v]), ran=2)
        sims = state.centres[0] @ far
        self.assertEqual(state.lookup(0, sims, far), plain.lookup(0, sims, far))

    def test_a_cached_class_is_favoured_as_before(self):
        policy = dataclasses.replace(self.POLICY, max_hot=1, min_hot=1, hot_min=0.5)
        state = self.tier_state(policy, hot=(0.5, 0.5))
        state.record(3, True)  # Cached, no vectors: the tier stays empty.
        self.assertEqual(state.inst_count, [0, 0])
        v = self.V
        top1, value, favoured = state.lookup(0, state.centres[0] @ v, v)
        self.assertEqual((top1, favoured), (3, True))
        self.assertEqual(state.decide(0, state.centres[0] @ v, v), 3)

    def test_low_confidence_confirmations_stay_out(self):
        v = np.stack([self.V, self.V])
        state = self.tier_state()
        state.record(3, True, v, ran=2, confidence=0.89)
        self.assertEqual(state.inst_count, [0, 0])
        self.assertEqual(state.decide(0, state.centres[0] @ self.V, self.V), -1)
        state.record(3, True, v, ran=2, confidence=0.9)  # At the gate: in.
        self.assertEqual(state.inst_count, [1, 1])
        state.record(3, True, v, ran=2)  # Default confidence 1.
        self.assertEqual(state.inst_count, [2, 2])
        # Early exits never enter: a wrong exit must not be copied to the
        # following frames of a held object.
        state = self.tier_state()
        state.record(3, False, v, ran=1, confidence=1.0)
        self.assertEqual(state.inst_count, [0, 0])
        # Without a gate, every confirmation enters.
        state = self.tier_state(dataclasses.replace(self.POLICY, instance_min_confidence=0.0))
        state.record(3, True, v, ran=2, confidence=0.0)
        self.assertEqual(state.inst_count, [1, 1])

    def test_ring_buffer_keeps_the_last_slots_per_stage(self):
        policy = cache.CachePolicy(instance_slots=3, instance_min_confidence=0.9)
        state = state_for(policy, instance=(0.9, 0.9), num_classes=6, dim=8)
        rng = np.random.default_rng(0)
        vectors, classes = [], []
        for i in range(8):
            v = np.stack([unit(rng.normal(size=8)) for _ in range(2)])
            if i == 2:  # An early exit: never remembered.
                state.record(i % 6, False, v, ran=1)
                continue
            if i == 7:  # A low-confidence confirmation: not remembered.
                state.record(5, True, v, ran=2, confidence=0.5)
                continue
            # Frame 6: a verified exit at stage 0 (only stage 0 ran).
            state.record(i % 6, True, v, ran=1 if i == 6 else 2)
            vectors.append(v)
            classes.append(i % 6)
        # Remembered: frames 0, 1, 3, 4, 5 at both stages, frame 6 at stage 0.
        self.assertEqual(state.inst_count, [3, 3])
        self.assertEqual(sorted(state.inst_class[0]), sorted(classes[3:6]))
        self.assertEqual(sorted(state.inst_class[1]), sorted(classes[2:5]))
        got0 = {tuple(np.round(x, 6)) for x in state.inst[0]}
        self.assertEqual(got0, {tuple(np.round(v[0], 6)) for v in vectors[3:6]})
        got1 = {tuple(np.round(x, 6)) for x in state.inst[1]}
        self.assertEqual(got1, {tuple(np.round(v[1], 6)) for v in vectors[2:5]})

    def test_no_tier_without_instance_thresholds_or_slots(self):
        v = np.stack([unit(np.arange(1, 7))] * 2)
        for policy, instance in ((cache.CachePolicy(instance_slots=3), None),
                                 (cache.CachePolicy(instance_slots=0), (0.5, 0.5))):
            state = state_for(policy, instance=instance)
            self.assertEqual(state.slots, 0)
            state.record(1, True, v, ran=2)
            self.assertEqual(state.inst_count, [0, 0])

    def test_replay_held_object_exits_at_stage_zero(self):
        sem, centres, full = semantic_pool(50, seed=3)
        # Cold thresholds no frame reaches; a hot one only a matched frame
        # reaches (a shift of 2 puts the matched class on top by a margin >= 0).
        rule = ep.ExitRule("margin", (0.0,) * 3, 0.9, (NEVER,) * 3, None,
                           (0.999, 0.999, None))
        policy = cache.CachePolicy(max_hot=0, min_hot=0, prior_weight=0.0, instance_slots=2,
                                   instance_match=0.999, instance_shift=2.0,
                                   instance_min_confidence=0.9)
        stream = np.repeat([4, 9, 17], 5)
        out = calibration.replay(rule, policy, sem, centres, full, stream)
        np.testing.assert_array_equal(out.exit_stage, np.tile([3, 0, 0, 0, 0], 3))
        np.testing.assert_array_equal(out.prediction, full[stream])
        np.testing.assert_array_equal(out.top1[0], full[stream])
        self.assertTrue(np.isnan(out.inst_match[:, 0]).all())
        np.testing.assert_allclose(out.inst_match[:2, 1], 1.0, atol=1e-5)
        np.testing.assert_array_equal(out.hot[0], np.tile([False, True, True, True, True], 3))
        # The observed value is the lookup's (shifted by 2 on a match).
        state = cache.MemoryState(policy, rule, centres)
        state.record(int(full[4]), True, sem[:, 4], ran=3)
        want = state.lookup(0, centres[0] @ sem[0, 4], sem[0, 4])
        self.assertAlmostEqual(float(out.value[0, 1]), want[1], places=5)
        # Frame 9 confirmed with low confidence never enters the tier; the
        # others do (confidence is per pool frame).
        confidence = np.ones(50)
        confidence[9] = 0.5
        out = calibration.replay(rule, policy, sem, centres, full, stream,
                           full_confidence=confidence)
        np.testing.assert_array_equal(out.exit_stage,
                                      [3, 0, 0, 0, 0, 3, 3, 3, 3, 3, 3, 0, 0, 0, 0])
        # Without slots the same rule never exits.
        out = calibration.replay(rule, dataclasses.replace(policy, instance_slots=0), sem, centres,
                           full, stream)
        np.testing.assert_array_equal(out.exit_stage, 3)


# --- Persistence of MemoryState ---------------------------------------------

class MemoryArraysTest(parameterized.TestCase):

    POLICY = cache.CachePolicy(decay=0.9, exit_weight=0.25, hot_min=0.5, min_hot=1,
                               max_hot=3, window=5, grow_after=2, prior_weight=1.0 / 16,
                               instance_slots=3, instance_match=0.95, instance_shift=0.1,
                               instance_min_confidence=0.9, adapt_rate=0.3, max_drift=0.3,
                               verify_rate=0.2)

    def busy_state(self):
        state = state_for(self.POLICY, instance=(0.95, 0.95))
        rng = np.random.default_rng(1)
        for i in range(37):
            c = int(rng.integers(0, 3))
            v = np.stack([unit(np.eye(6)[c] + rng.normal(0, 0.3, 6)) for _ in range(2)])
            state.record(c, i % 3 != 1, v, ran=2 if i % 3 != 1 else 1)
            if i % 5 == 0:
                state.verify_due()
        self.assertTrue(state.adapted.any())
        self.assertTrue(state.hot.any())
        return state

    def test_round_trip(self):
        state = self.busy_state()
        arrays = {k: np.array(v, copy=True) for k, v in state.to_arrays().items()}
        back = state_for(self.POLICY, instance=(0.95, 0.95))
        back.from_arrays(arrays)
        for k, v in back.to_arrays().items():
            np.testing.assert_allclose(v, arrays[k], atol=1e-6, err_msg=k)
        np.testing.assert_allclose(back.centres, state.centres, atol=1e-6)
        np.testing.assert_array_equal(back.hot, state.hot)
        np.testing.assert_allclose(back.shift, state.shift, atol=1e-7)
        self.assertEqual(back.capacity, state.capacity)
        # The same decisions and updates from here on.
        rng = np.random.default_rng(9)
        for _ in range(20):
            c = int(rng.integers(0, 4))
            v = np.stack([unit(np.eye(6)[c] + rng.normal(0, 0.3, 6)) for _ in range(2)])
            for st in (state, back):
                st.decisions = [st.decide(s, st.centres[s] @ v[s], v[s]) for s in range(2)]
                st.record(c, True, v, ran=2)
            self.assertEqual(state.decisions, back.decisions)
            np.testing.assert_array_equal(state.hot, back.hot)

    @parameterized.named_parameters(
        ("shape", lambda a: a.update(scores=np.zeros(5)), "shape"),
        ("nan", lambda a: a["inst"].__setitem__((0, 0, 0), np.nan), "non-finite"),
        ("capacity_high", lambda a: a.update(capacity=np.int64(4)), "capacity"),
        ("capacity_low", lambda a: a.update(capacity=np.int64(0)), "capacity"),
        ("class_high", lambda a: a["inst_class"].__setitem__((0, 0), 4), "slots"),
        ("class_negative", lambda a: a["inst_class"].__setitem__((1, 0), -1), "slots"),
        ("count", lambda a: a["inst_pos"].__setitem__((0, 0), 4), "slots"),
        ("drift", lambda a: a["offsets"].__setitem__((0, 0), [0.5, 0, 0, 0, 0, 0]),
         "max_drift"),
        ("negative_score", lambda a: a["scores"].__setitem__(0, -1.0), "scores"))
    def test_rejects(self, corrupt, pattern):
        state = self.busy_state()
        arrays = {k: np.array(v, copy=True) for k, v in state.to_arrays().items()}
        corrupt(arrays)
        target = state_for(self.POLICY, instance=(0.95, 0.95))
        target.record(1, True, np.stack([unit(np.ones(6))] * 2), ran=2)
        before = {k: np.array(v, copy=True) for k, v in target.to_arrays().items()}
        with self.assertRaisesRegex(ValueError, pattern):
            target.from_arrays(arrays)
        for k, v in target.to_arrays().items():  # Left as it was.
            np.testing.assert_array_equal(v, before[k], err_msg=k)


    def test_rejects_negative_window_and_answer_counts(self):
        # A state file with frame_in_window=-1000 would freeze capacity
        # adaptation for 1000 frames, answers=-3 would hide silent cached
        # classes from the shrink rule (answers == 0), a negative left-out
        # count would hold the capacity back, and a negative exits counter
        # would shift the verification schedule.
        state = self.busy_state()
        corruptions = {
            "frame_in_window": lambda a: a.__setitem__("frame_in_window", np.int64(-1000)),
            "answers": lambda a: a["answers"].__setitem__(slice(None), -3),
            "left_out": lambda a: a["left_out"].__setitem__(0, -5),
            "counters": lambda a: a["counters"].__setitem__(0, -1),
        }
        for name, corrupt in corruptions.items():
            with self.subTest(name):
                arrays = {k: np.array(v, copy=True) for k, v in state.to_arrays().items()}
                corrupt(arrays)
                target = state_for(self.POLICY, instance=(0.95, 0.95))
                with self.assertRaises(ValueError):
                    target.from_arrays(arrays)

    def test_rejects_a_state_with_missing_arrays(self):
        arrays = dict(self.busy_state().to_arrays())
        del arrays["left_out"]
        with self.assertRaisesRegex(ValueError, "left_out"):
            state_for(self.POLICY, instance=(0.95, 0.95)).from_arrays(arrays)


# --- replay -------------------------------------------------------------------

class StreamBoundTest(absltest.TestCase):
    """The bound each calibration stream's agreement must keep above the target."""

    def test_errors_in_a_run_weigh_more_than_the_same_errors_spread(self):
        spread = np.ones(3000, bool)
        spread[::100] = False  # 30 errors, each on its own.
        run = np.ones(3000, bool)
        run[1000:1030] = False  # The same 30 errors on one held object.
        wilson = ep.wilson_lower_bound(2970, 3000)
        self.assertAlmostEqual(calibration.stream_lower_bound(spread, runs=True), wilson,
                               places=9)
        self.assertEqual(calibration.stream_lower_bound(run), wilson)  # Per frame only.
        boot_spread = calibration.block_bootstrap_lower_bound(spread)
        boot_run = calibration.block_bootstrap_lower_bound(run)
        self.assertLess(boot_run, boot_spread)
        self.assertLess(boot_run, wilson)
        self.assertEqual(calibration.stream_lower_bound(run, runs=True), boot_run)
        self.assertLess(boot_run, 0.99)  # Observed 99.0%: the run is not evidence of 99%.

    def test_seeded_and_edge_cases(self):
        agree = np.random.default_rng(0).random(500) > 0.02
        self.assertEqual(calibration.block_bootstrap_lower_bound(agree),
                         calibration.block_bootstrap_lower_bound(agree))
        self.assertEqual(calibration.block_bootstrap_lower_bound(np.ones(100, bool)), 1.0)
        self.assertEqual(calibration.block_bootstrap_lower_bound(np.zeros(0, bool)), 0.0)
        self.assertEqual(calibration.block_bootstrap_lower_bound(np.ones(5, bool)), 1.0)


class ReplayTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.sims, cls.full = frame_pool(3000, seed=0)
        cls.stream = open_set_stream(cls.full, 1200, seed=1)
        cls.stream_sims = [s[cls.stream] for s in cls.sims]
        cls.stream_full = cls.full[cls.stream]
        cls.rule = cached_rule(cls.stream_sims)

    def replay_sims(self, rule, policy, **kwargs):
        return calibration.replay(rule, policy, None, None, self.full, self.stream,
                            similarities=self.sims, **kwargs)

    def test_no_cache_equals_simulate(self):
        plain = ep.ExitRule(ep.Metric.MARGIN, self.rule.thresholds, 0.9)
        for policy in (None, cache.CachePolicy(max_hot=0, min_hot=0), cache.CachePolicy()):
            out = self.replay_sims(plain, policy)
            want_stage, want_pred = ep.simulate(plain, self.stream_sims, self.stream_full)
            np.testing.assert_array_equal(out.exit_stage, want_stage)
            np.testing.assert_array_equal(out.prediction, want_pred)
            self.assertFalse(out.hot.any())
        # With cold thresholds and no cache, every top-1 class is cold.
        out = self.replay_sims(self.rule, cache.CachePolicy(max_hot=0, min_hot=0))
        cold = [np.zeros(len(self.stream), bool)] * 3
        want_stage, want_pred = ep.simulate(self.rule, self.stream_sims, self.stream_full, cold)
        np.testing.assert_array_equal(out.exit_stage, want_stage)
        np.testing.assert_array_equal(out.prediction, want_pred)

    def test_closed_loop_matches_a_manual_loop(self):
        for policy in (cache.CachePolicy(decay=0.9, exit_weight=0.25, hot_min=0.5,
                                         prior_weight=0.0, min_hot=6, max_hot=6),
                       cache.CachePolicy(decay=0.7, exit_weight=0.5, hot_min=0.9, min_hot=1,
                                         max_hot=1, prior_weight=0.0)):
            for rule in (self.rule, cached_rule(self.stream_sims, metric="top1")):
                out = self.replay_sims(rule, policy)
                want_stage, want_pred = manual_closed_loop(rule, policy, self.stream_sims,
                                                           self.stream_full)
                np.testing.assert_array_equal(out.exit_stage, want_stage)
                np.testing.assert_array_equal(out.prediction, want_pred)
        # The cache matters: without it the same rule decides otherwise.
        with_cache = self.replay_sims(self.rule, cache.CachePolicy(
            decay=0.9, exit_weight=0.25, hot_min=0.5, min_hot=1, max_hot=6, window=20,
            grow_after=2, prior_weight=1.0 / 16))
        without = self.replay_sims(self.rule, cache.CachePolicy(max_hot=0, min_hot=0))
        self.assertGreater((with_cache.exit_stage != without.exit_stage).sum(), 50)

    def test_oracle_scores_every_stage(self):
        never = ep.ExitRule(ep.Metric.MARGIN, (None,) * 3, 0.9, (None,) * 3)
        out = self.replay_sims(never, cache.CachePolicy(decay=0.9, hot_min=0.5, min_hot=1,
                                                        max_hot=6, window=20,
                                                        prior_weight=0.0), oracle=True)
        np.testing.assert_array_equal(out.exit_stage, 3)
        np.testing.assert_array_equal(out.prediction, self.stream_full)
        for s in range(3):
            top1, value = ep.score(ep.Metric.MARGIN, self.stream_sims[s])
            np.testing.assert_array_equal(out.top1[s], top1)
        self.assertTrue(out.hot.any() and not out.hot.all())
        self.assertTrue(out.hit.any())

    def test_frames_default_to_the_pool_in_order(self):
        sub = [s[:300] for s in self.sims]
        a = calibration.replay(self.rule, cache.CachePolicy(), None, None, self.full[:300],
                         similarities=sub)
        b = calibration.replay(self.rule, cache.CachePolicy(), None, None, self.full,
                         np.arange(300), similarities=self.sims)
        for f in dataclasses.fields(calibration.ReplayResult):
            np.testing.assert_array_equal(getattr(a, f.name), getattr(b, f.name))

    def test_semantics_equal_similarities_without_tier_or_adaptation(self):
        sem, centres, full = semantic_pool(800, seed=4)
        sims = [sem[s] @ centres[s].T for s in range(3)]
        stream = streams_lib.video(full, 600, seed=2).indices
        rule = cached_rule([x[stream] for x in sims])
        policy = cache.CachePolicy(instance_slots=0, adapt_rate=0.0)
        a = calibration.replay(rule, policy, sem, centres, full, stream)
        b = calibration.replay(rule, policy, None, None, full, stream, similarities=sims)
        np.testing.assert_array_equal(a.exit_stage, b.exit_stage)
        np.testing.assert_array_equal(a.prediction, b.prediction)
        self.assertTrue((a.exit_stage < 3).any())

    def test_cache_sizes(self):
        sem, centres, full = semantic_pool(400, seed=5, num_classes=6)
        stream = streams_lib.video(full, 500, seed=1).indices
        rule = cached_rule([sem[s][stream] @ centres[s].T for s in range(3)])
        for max_hot in (0, 1, 2, 6, 20):
            policy = cache.CachePolicy(min_hot=min(1, max_hot), max_hot=max_hot, window=5,
                                       grow_after=1, instance_slots=2)
            out = calibration.replay(rule, policy, sem, centres, full, stream)
            self.assertEqual(out.exit_stage.shape, (500,))
            if max_hot == 0:
                self.assertFalse(out.hot.any())
                self.assertFalse(out.hit.any())
            state = cache.MemoryState(policy, rule, centres)
            for c, stage in zip(out.prediction, out.exit_stage):
                state.record(int(c), stage == 3)
                self.assertLessEqual(state.hot.sum(), min(state.capacity, 6), max_hot)
                self.assertLessEqual(state.capacity, max_hot)
            if max_hot:
                self.assertTrue(state.hot.any(), max_hot)


# --- calibrate_with_cache -------------------------------------------------------

CALIBRATION_POLICY = cache.CachePolicy(
    decay=0.9, exit_weight=0.25, hot_min=0.3, min_hot=1, max_hot=6, window=10, grow_after=2,
    prior_weight=1.0 / 8, instance_slots=3, instance_match=0.97, instance_shift=0.1,
    instance_min_confidence=0.9, adapt_rate=0.0, max_drift=0.3, verify_rate=0.0)


def check_tier_contract(test, rule, policy, out_policy):
    """The tier is either dropped (no slots, no instance thresholds) or kept as given."""
    if out_policy.instance_slots == 0:
        test.assertIsNone(rule.instance_thresholds)
        test.assertEqual(out_policy, dataclasses.replace(policy, instance_slots=0))
    else:
        test.assertEqual(rule.instance_thresholds, (policy.instance_match,) * len(COSTS))
        test.assertEqual(out_policy, policy)


class CalibrateWithCacheTest(absltest.TestCase):

    TARGET = 0.95

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.sem, cls.centres, cls.full = semantic_pool(3000, seed=10)
        cls.streams = [s[:600] for s in memory_lib.calibration_streams(cls.full, 600, seed=3)]
        cls.policy = CALIBRATION_POLICY
        cls.rule, cls.out_policy = calibration.calibrate_with_cache(
            cls.sem, cls.centres, cls.full, COSTS, cls.streams, cls.policy, cls.TARGET)

    def check_meets_target(self, rule, policy, **kwargs):
        for k, s in enumerate(self.streams):
            out = calibration.replay(rule, policy, self.sem, self.centres, self.full, s, **kwargs)
            agree = int((out.prediction == self.full[s]).sum())
            self.assertGreaterEqual(ep.wilson_lower_bound(agree, len(s)), self.TARGET, k)

    def test_every_stream_meets_the_target_in_closed_loop(self):
        rule, policy = self.rule, self.out_policy
        self.assertTrue(rule.uses_cache)
        self.assertEqual(rule.target_agreement, self.TARGET)
        self.assertIsInstance(policy, cache.CachePolicy)
        self.check_meets_target(rule, policy)
        # Distinct frames (no held object): the tier cannot lower compute, so it
        # is dropped.
        check_tier_contract(self, rule, self.policy, policy)
        self.assertEqual(policy.instance_slots, 0)
        # Not safe by never exiting.
        out = calibration.replay(rule, policy, self.sem, self.centres, self.full, self.streams[0])
        self.assertGreater(float((out.exit_stage < 3).mean()), 0.2)

    def test_with_adaptation_and_verification(self):
        policy = dataclasses.replace(self.policy, adapt_rate=0.2, verify_rate=0.1)
        rule, out = calibration.calibrate_with_cache(self.sem, self.centres, self.full, COSTS,
                                               self.streams, policy, self.TARGET)
        self.assertIn(out.adapt_rate, (0.0, 0.2))
        self.assertEqual(out.verify_rate, 0.1)
        check_tier_contract(self, rule, dataclasses.replace(policy, adapt_rate=out.adapt_rate),
                            out)
        self.check_meets_target(rule, out)

    def test_on_similarities(self):
        sims = [self.sem[s] @ self.centres[s].T for s in range(3)]
        rule, out = calibration.calibrate_with_cache(None, None, self.full, COSTS, self.streams,
                                               self.policy, self.TARGET, similarities=sims)
        self.assertEqual(out.instance_slots, 0)
        self.assertEqual(out.adapt_rate, 0.0)
        self.assertIsNone(rule.instance_thresholds)
        for k, s in enumerate(self.streams):
            res = calibration.replay(rule, out, None, None, self.full, s, similarities=sims)
            agree = int((res.prediction == self.full[s]).sum())
            self.assertGreaterEqual(ep.wilson_lower_bound(agree, len(s)), self.TARGET, k)


class HeldObjectCalibrationTest(absltest.TestCase):
    """The short-term tier is kept when held objects make it pay."""

    TARGET = 0.95
    INSTANCE_TARGET = 0.995

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # Noisy early stages: the class-level rule sends many frames on.
        cls.sem, cls.centres, cls.full = semantic_pool(3000, seed=10, noises=(3.0, 1.5, 0.6))
        cls.streams = [s[:600] for s in memory_lib.calibration_streams(cls.full, 600, seed=3)]
        cls.policy = CALIBRATION_POLICY
        cls.without = calibration.calibrate_with_cache(cls.sem, cls.centres, cls.full, COSTS,
                                                 cls.streams, cls.policy, cls.TARGET,
                                                 instance_target=cls.INSTANCE_TARGET)
        # Held objects the class-level rule exits late: the tier (filled by
        # the full model's answers) is what could make them cheaper.
        pool = calibration.replay(*cls.without, cls.sem, cls.centres, cls.full)
        hard = np.flatnonzero(pool.exit_stage == pool.exit_stage.max())
        rng = np.random.default_rng(0)
        cls.held = [np.full(100, f) for f in rng.choice(hard, 4, replace=False)]
        cls.with_held = calibration.calibrate_with_cache(
            cls.sem, cls.centres, cls.full, COSTS, cls.streams, cls.policy, cls.TARGET,
            instance_target=cls.INSTANCE_TARGET, instance_streams=cls.held)

    def replays(self, rule, policy, streams):
        return [calibration.replay(rule, policy, self.sem, self.centres, self.full, s)
                for s in streams]

    def test_tier_dropped_without_held_objects(self):
        rule, out = self.without
        check_tier_contract(self, rule, self.policy, out)
        self.assertEqual(out.instance_slots, 0)
        self.assertTrue(rule.uses_cache)

    def test_tier_on_held_objects_pays_or_is_dropped(self):
        rule, out = self.with_held
        check_tier_contract(self, rule, self.policy, out)
        if out.instance_slots == 0:
            # Dropped: then the rule is the tier-free calibration's.
            self.assertEqual(rule, self.without[0])
            return
        self.assertEqual(rule.instance_thresholds, (0.97, 0.97, 0.97))
        # Every calibration stream still meets the target in closed loop.
        for k, r in enumerate(self.replays(rule, out, self.streams)):
            agree = int((r.prediction == self.full[self.streams[k]]).sum())
            self.assertGreaterEqual(ep.wilson_lower_bound(agree, 600), self.TARGET, k)
        # Less compute over all streams, held objects included, than without the tier...
        cumulative = np.append(np.cumsum(COSTS), 1.0)
        every = list(self.streams) + self.held

        def total(rule, policy):
            return sum(float(cumulative[r.exit_stage].sum())
                       for r in self.replays(rule, policy, every))

        base_rule, base_policy = self.without
        self.assertLess(total(rule, out), total(base_rule, base_policy))
        # ... and no held object loses more than 1 - instance_target of agreement.
        for s, a, b in zip(self.held, self.replays(rule, out, self.held),
                           self.replays(base_rule, base_policy, self.held)):
            want = self.full[s]
            self.assertGreaterEqual(float((a.prediction == want).mean()),
                                    float((b.prediction == want).mean())
                                    - (1.0 - self.INSTANCE_TARGET))
        # Held objects exit earlier with the tier.
        held_with = np.concatenate([r.exit_stage for r in self.replays(rule, out, self.held)])
        held_without = np.concatenate([r.exit_stage for r in self.replays(
            base_rule, base_policy, self.held)])
        self.assertLess(held_with.mean(), held_without.mean())


class CalibrationStreamsTest(absltest.TestCase):

    def test_calibrate_rule_with_and_without_a_cache(self):
        sims, full = frame_pool(2000, seed=5)
        plain = memory_lib.calibrate_rule(sims, full, COSTS, 0.95, "margin", None, None)
        self.assertFalse(plain.uses_cache)
        self.assertEqual(plain, ep.calibrate(sims, full, COSTS, 0.95, metric="margin"))
        off = memory_lib.calibrate_rule(sims, full, COSTS, 0.95, "margin", None,
                                        cache.CachePolicy(max_hot=0, min_hot=0))
        self.assertEqual(off, plain)


# --- Files: SemanticMemory and the descriptor ---------------------------------

def layer_aware_cached_rule(num_stages, num_classes, seed=0):
    rng = np.random.default_rng(seed)
    params = tuple(rng.normal(size=(num_classes, 2)).astype(np.float32)
                   for _ in range(num_stages))
    hot = tuple(float(np.float32(rng.normal())) for _ in range(num_stages - 1)) + (None,)
    cold = tuple(float(np.float32(rng.normal())) for _ in range(num_stages - 1)) + (None,)
    return ep.ExitRule(ep.Metric.LAYER_AWARE, hot, 0.99, cold, params, (0.9, None, 0.95))


class SemanticMemoryCacheTest(absltest.TestCase):

    def make_memory(self, cache_policy, num_classes=3, dims=(4, 6, 5)):
        rng = np.random.default_rng(1)
        plan = stages.StagePlan(tuple(f"cut{s}" for s in range(len(dims))),
                                (0.2, 0.3, 0.4), 0.1)
        encoders = tuple(enc.Encoder(rng.normal(size=(10, d)).astype(np.float32),
                                     rng.normal(size=d).astype(np.float32)) for d in dims)
        centres = tuple(enc.l2_normalize_np(rng.normal(size=(num_classes, d))) for d in dims)
        return memory_lib.SemanticMemory(
            plan, enc.Pooling.AVG_MAX, encoders, centres,
            layer_aware_cached_rule(len(dims), num_classes), ("a", "b", "c"), (0.5, 0.6, 0.7),
            cache_policy)

    def test_round_trip_with_a_cache_policy_and_instance_thresholds(self):
        policy = cache.CachePolicy(decay=0.85, exit_weight=0.125, hot_min=0.75, min_hot=1,
                                   max_hot=2, instance_slots=3, adapt_rate=0.1)
        mem = self.make_memory(policy)
        path = os.path.join(self.create_tempdir().full_path, "m.smtm.npz")
        mem.save(path)
        back = memory_lib.SemanticMemory.load(path)
        self.assertEqual(back.cache_policy, policy)
        self.assertEqual(back.exit_rule, mem.exit_rule)
        self.assertEqual(back.exit_rule.instance_thresholds, (0.9, None, 0.95))

    def test_legacy_policy_in_the_file(self):
        mem = self.make_memory(cache.CachePolicy())
        path = os.path.join(self.create_tempdir().full_path, "m.smtm.npz")
        mem.save(path)
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(str(arrays["meta"]))
        meta["cache_policy"] = {"decay": 0.9, "exit_weight": 0.25, "hot_min": 0.5,
                                "max_hot": 4}
        arrays["meta"] = np.array(json.dumps(meta))
        np.savez(path, **arrays)
        p = memory_lib.SemanticMemory.load(path).cache_policy
        self.assertEqual((p.min_hot, p.max_hot, p.prior_weight, p.instance_slots), (4, 4, 0, 0))

    def test_bad_cache_policy_in_the_file(self):
        mem = self.make_memory(cache.CachePolicy())
        path = os.path.join(self.create_tempdir().full_path, "m.smtm.npz")
        mem.save(path)
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(str(arrays["meta"]))
        meta["cache_policy"]["decay"] = 2.0
        arrays["meta"] = np.array(json.dumps(meta))
        np.savez(path, **arrays)
        with self.assertRaisesRegex(memory_lib.MemoryFileError, "decay must be in"):
            memory_lib.SemanticMemory.load(path)


def l2_centres(rng, num_classes, dim):
    return enc.l2_normalize_np(rng.normal(size=(num_classes, dim))).astype(np.float32)


def make_descriptor(rule, cache_policy, num_classes=3, dims=(4, 5, 6)):
    return tu.synthetic_descriptor(
        rule, desc.LookupOpSpec(attributes={"exit_rule": "exit_rule", "cache": "cache"}),
        num_classes=num_classes, dims=dims, seed=0, stage_cost=lambda s: 0.3,
        make_centres=l2_centres, cache=cache_policy)


class DescriptorCacheTest(absltest.TestCase):

    def test_round_trip_with_a_cache(self):
        policy = cache.CachePolicy(decay=0.75, exit_weight=0.5, hot_min=0.625, min_hot=1,
                                   max_hot=1, instance_slots=2)
        d = make_descriptor(layer_aware_cached_rule(3, 3), policy)
        back = desc.Descriptor.from_json(d.to_json())
        self.assertEqual(back, d)
        self.assertEqual(back.cache, policy)
        self.assertEqual(back.exit_rule.instance_thresholds, (0.9, None, 0.95))
        self.assertNotEqual(back, dataclasses.replace(d, cache=cache.CachePolicy()))

    def test_legacy_cache_dict(self):
        d = json.loads(make_descriptor(layer_aware_cached_rule(3, 3),
                                       cache.CachePolicy()).to_json())
        d["cache"] = {"decay": 0.9, "exit_weight": 0.25, "hot_min": 0.5, "max_hot": 2}
        p = desc.Descriptor.from_dict(d).cache
        self.assertEqual((p.min_hot, p.max_hot, p.prior_weight, p.instance_slots), (2, 2, 0, 0))

    def test_cold_thresholds_without_a_cache_are_rejected(self):
        rule = layer_aware_cached_rule(3, 3)
        with self.assertRaisesRegex(desc.DescriptorError, "cold thresholds"):
            make_descriptor(rule, None)

    def test_layer_aware_params_must_cover_all_classes(self):
        rule = layer_aware_cached_rule(3, num_classes=2)
        with self.assertRaises(desc.DescriptorError):
            make_descriptor(rule, cache.CachePolicy(), num_classes=3)


# --- The runtime with the adaptive memory in the loop ---------------------------

_CONVERTED = {}


def small_converted():
    """A small converted model, faster to build than tu.exiting_converted (no
    cache calibration, few encoder epochs); shared by the runtime tests.

    Its encoders are linear projections: with hidden layers the stage-0 lookup
    of this tiny model leaves the short-term tier 1 decision of 300 to change
    (RuntimeMemoryTest asks for more than 5, to see the tier replayed)."""
    if "flat" not in _CONVERTED:
        from converters import smtm_converter  # pylint: disable=import-outside-toplevel
        model = tu.trained_residual("tf_keras")
        x, _ = tu.train_data()
        xc, _ = tu.calibration_data()
        mem = memory_lib.fit_semantic_memory(
            model, x[:600], xc[:200], class_names=tu.CLASS_NAMES, num_stages=3,
            embedding_dim=8, encoder_hidden=0, encoder_epochs=4, metric="margin",
            cache_policy=None, target_agreement=0.95)
        _CONVERTED["flat"] = smtm_converter.convert(model, mem, tu.check_images())[0]
    return _CONVERTED["flat"]


def stage_outputs(rt, frame):
    """Per stage (similarities [K], semantic [D]) as the runtime's stages give them."""
    activation = np.asarray(frame, np.float32).reshape(rt.descriptor.full.inputs[0].shape)
    sims, sem = [], []
    for stage in rt._stages:  # pylint: disable=protected-access
        stage.set_input("activation", activation)
        stage.invoke()
        sims.append(stage.output("similarities").copy())
        sem.append(stage.output("semantic").copy())
        activation = stage.output("next_activation").copy()
    return sims, sem


class RuntimeMemoryTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.flat = small_converted()
        cls.rt = runtime.SmtmRuntime(cls.flat)
        rt = cls.rt
        frames, _ = tu.stripes(160, seed=40)
        outs = [stage_outputs(rt, f) for f in frames]
        cls.sims = [np.stack([o[0][s] for o in outs]) for s in range(rt.num_stages)]
        cls.sem = np.stack([np.stack([o[1][s] for o in outs]) for s in range(rt.num_stages)])
        cls.centres = [np.asarray(s.centres, np.float32) for s in rt.descriptor.stages]
        full = np.array([rt.classify_full(rt._frame(f)) for f in frames])  # pylint: disable=protected-access
        rt.set_exit_rule(ep.ExitRule(ep.Metric.MARGIN, (None,) * rt.num_stages, 0.9))
        head = np.array([rt.classify(f).class_id for f in frames])
        keep = head == full  # Verification and the head must give the same answer.
        cls.frames, cls.full = frames[keep], head[keep]
        cls.sims = [s[keep] for s in cls.sims]
        cls.sem = cls.sem[:, keep]
        # A video stream of held objects: runs of the same frame.
        base = streams_lib.video(cls.full, 120, seed=3).indices
        cls.stream = np.repeat(base, np.random.default_rng(0).integers(1, 4, len(base)))[:300]
        # instance_min_confidence 0: replay (full_confidence 1 by default) and
        # the runtime (the head's top probability) fill the tier alike.
        cls.policy = cache.CachePolicy(decay=0.9, exit_weight=0.25, hot_min=0.3, min_hot=1,
                                       max_hot=6, window=10, grow_after=2,
                                       prior_weight=1.0 / 16, instance_slots=3,
                                       instance_match=0.995, instance_shift=0.1,
                                       instance_min_confidence=0.0, adapt_rate=0.2,
                                       max_drift=0.3, verify_rate=0.25)
        stream_sims = [s[cls.stream] for s in cls.sims]
        cls.rule = cached_rule(stream_sims, instance=(0.995, 0.995, None))

    def setUp(self):
        super().setUp()
        self.rt.set_exit_rule(self.rule, self.policy)

    def run_frames(self, rt, indices):
        out = [rt.classify_fast(rt._frame(self.frames[i])) for i in indices]  # pylint: disable=protected-access
        return np.array([c for c, _ in out]), np.array([s for _, s in out])

    def test_runtime_decides_as_replay(self):
        for rule, policy in ((self.rule, self.policy),
                             (self.rule, dataclasses.replace(self.policy, adapt_rate=0.0,
                                                             verify_rate=0.0)),
                             (self.rule, dataclasses.replace(
                                 self.policy, max_hot=1, min_hot=1, instance_slots=1,
                                 adapt_rate=0.0, verify_rate=0.0))):
            self.rt.set_exit_rule(rule, policy)
            classes, stages_ = self.run_frames(self.rt, self.stream)
            want = calibration.replay(rule, policy, self.sem, self.centres, self.full, self.stream)
            np.testing.assert_array_equal(stages_, want.exit_stage)
            np.testing.assert_array_equal(classes, want.prediction)
            counts = np.bincount(stages_, minlength=4)
            self.assertTrue((counts[[0, 3]] > 0).all(), counts)
        # The short-term tier did something: without it, decisions differ.
        no_tier = calibration.replay(rule, dataclasses.replace(policy, instance_slots=0), self.sem,
                               self.centres, self.full, self.stream)
        self.assertGreater((no_tier.exit_stage != stages_).sum(), 5)

    def test_save_and_load_give_identical_decisions(self):
        rt = self.rt
        first, rest = self.stream[:150], self.stream[150:]
        self.run_frames(rt, first)
        self.assertTrue(rt.memory.hot.any())
        path = os.path.join(self.create_tempdir().full_path, "state.npz")
        rt.save_state(path)
        want = self.run_frames(rt, rest)
        after = {k: np.array(v, copy=True) for k, v in rt.memory.to_arrays().items()}
        other = runtime.SmtmRuntime(self.flat)
        other.set_exit_rule(self.rule, self.policy)
        self.assertTrue(other.load_state(path))
        got = self.run_frames(other, rest)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        for k, v in other.memory.to_arrays().items():
            np.testing.assert_allclose(v, after[k], atol=1e-6, err_msg=k)
        # The same runtime, after a reset, restored too.
        rt.reset_cache()
        self.assertTrue(rt.load_state(path))
        np.testing.assert_array_equal(self.run_frames(rt, rest)[1], want[1])

    def test_save_state_is_atomic(self):
        directory = self.create_tempdir().full_path
        path = os.path.join(directory, "state.npz")
        self.run_frames(self.rt, self.stream[:40])
        self.rt.save_state(path)
        self.rt.save_state(path)  # Over an existing file.
        self.assertEqual(os.listdir(directory), ["state.npz"])

    def check_fresh_after_bad_load(self, rt, path):
        self.run_frames(rt, self.stream[:100])  # Dirty memory (cache, tier, centres).
        self.assertTrue(rt.memory.scores.any())
        with self.assertLogs(level="WARNING") as logs:
            self.assertFalse(rt.load_state(path))
        self.assertIn("fresh", "\n".join(logs.output))
        m = rt.memory
        self.assertFalse(m.scores.any() or m.hot.any() or m.adapted.any())
        self.assertEqual(m.inst_count, [0] * rt.num_stages)
        np.testing.assert_array_equal(m.centres, m.original)
        # And it decides as a fresh replay does (the stages' centres were reset too).
        classes, stages_ = self.run_frames(rt, self.stream)
        want = calibration.replay(rt.rule, rt.cache_policy, self.sem, self.centres, self.full,
                            self.stream)
        np.testing.assert_array_equal(stages_, want.exit_stage)
        np.testing.assert_array_equal(classes, want.prediction)

    def saved(self):
        path = os.path.join(self.create_tempdir().full_path, "state.npz")
        self.run_frames(self.rt, self.stream[:60])
        self.rt.save_state(path)
        self.rt.reset_cache()
        return path

    def test_corrupted_file(self):
        path = self.saved()
        with open(path, "rb") as f:
            data = bytearray(f.read())
        data[len(data) // 2:len(data) // 2 + 64] = os.urandom(64)
        with open(path, "wb") as f:
            f.write(bytes(data))
        self.check_fresh_after_bad_load(self.rt, path)
        with open(path, "wb") as f:
            f.write(b"not a state at all")
        self.check_fresh_after_bad_load(self.rt, path)

    def test_truncated_file(self):
        path = self.saved()
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[:len(data) // 2])
        self.check_fresh_after_bad_load(self.rt, path)

    def test_state_of_another_rule(self):
        path = self.saved()
        other = dataclasses.replace(self.rule, instance_thresholds=(0.99, 0.99, None))
        self.rt.set_exit_rule(other, self.policy)
        self.check_fresh_after_bad_load(self.rt, path)
        self.rt.set_exit_rule(self.rule, dataclasses.replace(self.policy, window=11))
        self.check_fresh_after_bad_load(self.rt, path)

    def test_state_of_an_older_format(self):
        # Format 1 kept one left-out count for the window, not one per class.
        path = self.saved()
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(str(arrays["meta"]))
        meta["format_version"] = runtime.STATE_FORMAT_VERSION - 1
        arrays["meta"] = np.array(json.dumps(meta))
        with open(path, "wb") as f:
            np.savez(f, **arrays)
        self.check_fresh_after_bad_load(self.rt, path)

    def test_missing_file(self):
        path = os.path.join(self.create_tempdir().full_path, "nothing.npz")
        self.check_fresh_after_bad_load(self.rt, path)

    def test_cache_sizes_in_the_runtime(self):
        rt = self.rt
        k = len(self.centres[0])
        for max_hot in (0, 1, k + 3):
            policy = cache.CachePolicy(min_hot=min(1, max_hot), max_hot=max_hot, window=5,
                                       grow_after=1, instance_slots=2)
            rt.set_exit_rule(self.rule, policy)
            for i in self.stream[:150]:
                c, s = rt.classify_fast(rt._frame(self.frames[i]))  # pylint: disable=protected-access
                self.assertTrue(0 <= c < k and 0 <= s <= rt.num_stages)
                self.assertLessEqual(rt.memory.hot.sum(), min(rt.memory.capacity, k))
                if max_hot == 0:
                    self.assertFalse(rt.memory.hot.any())
            if max_hot:
                self.assertTrue(rt.memory.hot.any(), max_hot)
        self.assertIs(rt.cache, rt.memory)


if __name__ == "__main__":
    absltest.main()
