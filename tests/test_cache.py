"""Tests for the hot-class cache: smtm_tf.cache and where it is wired in.

CachePolicy and HotSet, `replay` and `calibrate_with_cache` on synthetic
similarities; `memory.calibration_streams` / `calibrate_rule`; the cache
policy in SemanticMemory files and in the descriptor; the runtime with the
cache in the loop, bit for bit against `replay`; `convert_model` with a
metric and a cache policy.
"""

import dataclasses
import json
import math
import os

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from converters import smtm_converter
from smtm_tf import cache
from smtm_tf import descriptor as desc
from smtm_tf import encoders as enc
from smtm_tf import exit_policy as ep
from smtm_tf import memory as memory_lib
from smtm_tf import runtime
from smtm_tf import stages
from smtm_tf import streams as streams_lib
import testing_utils as tu

COSTS = (0.2, 0.3, 0.45)


# --- Synthetic frames and streams --------------------------------------------

def frame_pool(n, seed, num_classes=10, spreads=(0.3, 0.5, 0.8), attract=0.5):
    """tu.synthetic_cascade with 10 classes, where wrong answers of frames of
    other classes than 0 point at class 0 with probability `attract`: when
    class 0 is hot, those are the frames a relaxed hot threshold would wrongly
    let out.

    Returns:
      (similarities: one [n, K] float32 array per stage, full predictions [n]).
    """
    return tu.synthetic_cascade(n, seed, num_classes=num_classes, spreads=spreads,
                                attract=attract)


def open_set_stream(full, num_frames, seed, hot_class=0):
    """Every other frame of `hot_class`; the others drawn from all other classes."""
    rng = np.random.default_rng(seed)
    same = np.flatnonzero(full == hot_class)
    others = np.flatnonzero(full != hot_class)
    idx = np.empty(num_frames, np.int64)
    idx[0::2] = rng.choice(same, (num_frames + 1) // 2)
    idx[1::2] = rng.choice(others, num_frames // 2)
    return idx


def manual_hot_flags(policy, top1, full):
    """Hot flags [S, N] of a HotSet fed the full model's answers (the oracle)."""
    hot_set = cache.HotSet(policy, int(max(top1.max(), full.max())) + 1)
    flags = np.zeros(top1.shape, bool)
    for i in range(top1.shape[1]):
        flags[:, i] = hot_set.hot[top1[:, i]]
        hot_set.update(int(full[i]), confirmed=True)
    return flags


def manual_closed_loop(rule, policy, sims, full):
    """The cache in the loop, written out frame by frame from the documented rules."""
    num_stages, n = len(sims), len(full)
    hot_set = cache.HotSet(policy, sims[0].shape[1])
    stages_out, preds = [], []
    for i in range(n):
        exit_stage, pred = num_stages, int(full[i])
        for s in range(num_stages):
            c, value = ep.score(rule.metric, sims[s][i], rule.stage_params(s))
            hot = policy.max_hot > 0 and bool(hot_set.hot[c])
            threshold = rule.threshold_for(s, hot)
            if threshold is not None and value >= threshold:
                exit_stage, pred = s, int(c)
                break
        if policy.max_hot > 0:
            hot_set.update(pred, confirmed=exit_stage == num_stages)
        stages_out.append(exit_stage)
        preds.append(pred)
    return np.array(stages_out), np.array(preds)


def cached_rule(sims, hot_q=(0.5, 0.4, 0.3), cold_q=(0.9, 0.85, 0.8), metric="margin",
                params=None):
    """Hot and cold thresholds at quantiles of each stage's scores."""
    tops = ep.stage_scores(ep.Metric(metric), sims, params)
    hot = tuple(float(np.quantile(v, q)) for (_, v), q in zip(tops, hot_q))
    cold = tuple(float(np.quantile(v, q)) for (_, v), q in zip(tops, cold_q))
    return ep.ExitRule(metric, hot, 0.9, cold, params)


# --- CachePolicy and HotSet -----------------------------------------------------

class CachePolicyTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("decay_zero", dict(decay=0.0), "decay must be in"),
        ("decay_one", dict(decay=1.0), "decay must be in"),
        ("decay_nan", dict(decay=math.nan), "decay must be in"),
        ("exit_weight_above_one", dict(exit_weight=1.5), "exit_weight must be in"),
        ("exit_weight_negative", dict(exit_weight=-0.1), "exit_weight must be in"),
        ("hot_min_zero", dict(hot_min=0.0), "hot_min must be > 0"),
        ("hot_min_negative", dict(hot_min=-1.0), "hot_min must be > 0"),
        ("hot_min_nan", dict(hot_min=math.nan), "hot_min must be > 0"),
        ("max_hot_negative", dict(max_hot=-1), "max_hot must be >= 0"))
    def test_invalid(self, kwargs, pattern):
        with self.assertRaisesRegex(ValueError, pattern):
            cache.CachePolicy(**kwargs)

    def test_boundaries_are_valid(self):
        cache.CachePolicy(exit_weight=0.0)
        cache.CachePolicy(exit_weight=1.0)
        cache.CachePolicy(max_hot=0)
        cache.CachePolicy(decay=1e-6, hot_min=1e-6)

    def test_round_trip(self):
        policy = cache.CachePolicy(decay=0.8125, exit_weight=0.3, hot_min=0.7, max_hot=3)
        d = json.loads(json.dumps(policy.to_dict()))
        self.assertEqual(d, {"decay": 0.8125, "exit_weight": 0.3, "hot_min": 0.7, "max_hot": 3})
        self.assertEqual(cache.CachePolicy.from_dict(d), policy)
        self.assertEqual(cache.CachePolicy.from_dict(cache.CachePolicy().to_dict()),
                         cache.CachePolicy())
        self.assertNotEqual(cache.CachePolicy.from_dict(d), cache.CachePolicy())

    def test_from_dict_rejects_unknown_fields_and_bad_values(self):
        d = cache.CachePolicy().to_dict()
        with self.assertRaisesRegex(ValueError, r"Unknown cache policy fields: \['size'\]"):
            cache.CachePolicy.from_dict(dict(d, size=3))
        with self.assertRaisesRegex(ValueError, "decay must be in"):
            cache.CachePolicy.from_dict(dict(d, decay=1.0))
        # Missing fields take their defaults.
        self.assertEqual(cache.CachePolicy.from_dict({"max_hot": 2}), cache.CachePolicy(max_hot=2))

    def test_non_integer_max_hot_is_rejected(self):
        # LIBRARY BUG (fails at the time of writing): max_hot=1.5 (or 2.0 read
        # from JSON) is accepted, and HotSet.update later raises
        # "TypeError: slice indices must be integers" once more classes than
        # max_hot qualify, i.e. in the middle of a stream in the runtime.
        with self.assertRaisesRegex(ValueError, "max_hot"):
            cache.CachePolicy(max_hot=1.5)


class HotSetTest(absltest.TestCase):

    def test_confirmed_class_is_hot_after_one_frame(self):
        hot_set = cache.HotSet(cache.CachePolicy(), 4)
        self.assertFalse(hot_set.hot.any())
        hot_set.update(2, confirmed=True)
        np.testing.assert_array_equal(hot_set.hot, [False, False, True, False])
        np.testing.assert_allclose(hot_set.scores, [0, 0, 1.0, 0])

    def test_decay_forgets_old_classes(self):
        policy = cache.CachePolicy(decay=0.5, exit_weight=0.25, hot_min=0.3, max_hot=4)
        hot_set = cache.HotSet(policy, 3)
        hot_set.update(0, confirmed=True)  # class 0: 1
        hot_set.update(1, confirmed=True)  # class 0: 0.5, class 1: 1
        np.testing.assert_allclose(hot_set.scores, [0.5, 1.0, 0.0])
        np.testing.assert_array_equal(hot_set.hot, [True, True, False])
        hot_set.update(1, confirmed=True)  # class 0: 0.25 < 0.3: forgotten.
        np.testing.assert_allclose(hot_set.scores, [0.25, 1.5, 0.0])
        np.testing.assert_array_equal(hot_set.hot, [False, True, False])
        for _ in range(3):  # Class 1 stops being seen: it decays away too.
            hot_set.update(2, confirmed=False)
        np.testing.assert_allclose(hot_set.scores, [0.25 / 8, 1.5 / 8,
                                                    0.25 * (0.25 + 0.5 + 1.0)])
        np.testing.assert_array_equal(hot_set.hot, [False, False, True])

    def test_lowest_decayed_score_is_evicted_first(self):
        policy = cache.CachePolicy(decay=0.9, exit_weight=0.25, hot_min=0.5, max_hot=2)
        hot_set = cache.HotSet(policy, 4)
        expected = [
            # (class, confirmed) -> hot classes after the update.
            ((0, True), {0}),
            ((1, True), {0, 1}),
            # 0: 0.81, 1: 0.9, 2: 1 all qualify: the oldest (lowest) leaves.
            ((2, True), {1, 2}),
            # 0: 1.729, 1: 0.81, 2: 0.9: now class 1 is the lowest.
            ((0, True), {0, 2}),
            # 3 only reaches 0.25: it does not qualify, nothing changes.
            ((3, False), {0, 2}),
            # 0: 1.40, 1: 0.66, 2: 0.73, 3: 1.225: 3 qualifies and beats 2.
            ((3, True), {0, 3}),
        ]
        for step, ((c, confirmed), want) in enumerate(expected):
            hot_set.update(c, confirmed)
            self.assertEqual(set(np.flatnonzero(hot_set.hot)), want, step)
            # The hot ones are the top-scoring ones.
            qualifying = np.flatnonzero(hot_set.scores >= policy.hot_min)
            self.assertLessEqual(hot_set.hot.sum(), policy.max_hot)
            if len(qualifying) > policy.max_hot:
                lowest_hot = hot_set.scores[hot_set.hot].min()
                self.assertTrue((hot_set.scores[~hot_set.hot] <= lowest_hot).all(), step)

    def test_exits_need_more_frames_than_confirmations(self):
        def frames_to_hot(policy, confirmed):
            hot_set = cache.HotSet(policy, 3)
            for frames in range(1, 100):
                hot_set.update(1, confirmed)
                if hot_set.hot[1]:
                    return frames
            return None

        policy = cache.CachePolicy()  # decay 0.9, exit weight 0.25, hot_min 0.5.
        self.assertEqual(frames_to_hot(policy, True), 1)
        # 0.25, 0.475, 0.6775: three early exits make a class hot.
        self.assertEqual(frames_to_hot(policy, False), 3)
        # Any exit weight below hot_min: one confirmation, several exits.
        for weight in (0.1, 0.2, 0.3, 0.45):
            p = dataclasses.replace(policy, exit_weight=weight)
            self.assertGreater(frames_to_hot(p, False), frames_to_hot(p, True), weight)
        # Exits alone never make a class hot when their weight is 0, nor when
        # the steady state exit_weight / (1 - decay) stays below hot_min.
        self.assertIsNone(frames_to_hot(dataclasses.replace(policy, exit_weight=0.0), False))
        self.assertIsNone(frames_to_hot(dataclasses.replace(policy, exit_weight=0.04), False))
        self.assertEqual(frames_to_hot(dataclasses.replace(policy, exit_weight=1.0), False), 1)

    def test_max_hot_zero_is_never_hot(self):
        hot_set = cache.HotSet(cache.CachePolicy(max_hot=0), 3)
        for i in range(50):
            hot_set.update(i % 2, confirmed=True)
            self.assertFalse(hot_set.hot.any(), i)
        self.assertGreater(hot_set.scores[0], 1.0)  # Scores still count.

    def test_reset_and_in_place_updates(self):
        hot_set = cache.HotSet(cache.CachePolicy(), 4)
        hot, scores = hot_set.hot, hot_set.scores
        sequence = [(1, True), (2, False), (1, True), (3, True)]
        for c, confirmed in sequence:
            hot_set.update(c, confirmed)
        self.assertTrue(hot[1] and hot[3])  # The held reference sees updates.
        before = (hot.copy(), scores.copy())
        hot_set.reset()
        self.assertIs(hot_set.hot, hot)
        self.assertIs(hot_set.scores, scores)
        self.assertFalse(hot.any())
        np.testing.assert_array_equal(scores, np.zeros(4))
        for c, confirmed in sequence:
            hot_set.update(c, confirmed)
        np.testing.assert_array_equal(hot, before[0])
        np.testing.assert_array_equal(scores, before[1])


# --- replay ------------------------------------------------------------------

class ReplayTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.sims, cls.full = frame_pool(3000, seed=0)
        cls.stream = open_set_stream(cls.full, 1200, seed=1)
        cls.stream_sims = [s[cls.stream] for s in cls.sims]
        cls.stream_full = cls.full[cls.stream]
        cls.rule = cached_rule(cls.stream_sims)

    def test_max_hot_zero_equals_simulate(self):
        no_cache = cache.CachePolicy(max_hot=0)
        plain = ep.ExitRule(ep.Metric.MARGIN, self.rule.thresholds, 0.9)
        stage, pred, hot = cache.replay(plain, no_cache, self.sims, self.full, self.stream)
        want_stage, want_pred = ep.simulate(plain, self.stream_sims, self.stream_full)
        np.testing.assert_array_equal(stage, want_stage)
        np.testing.assert_array_equal(pred, want_pred)
        self.assertFalse(hot.any())
        self.assertEqual(hot.shape, (3, len(self.stream)))
        # With cold thresholds and no cache, every top-1 class is cold.
        stage, pred, _ = cache.replay(self.rule, no_cache, self.sims, self.full, self.stream)
        cold = [np.zeros(len(self.stream), bool)] * 3
        want_stage, want_pred = ep.simulate(self.rule, self.stream_sims, self.stream_full, cold)
        np.testing.assert_array_equal(stage, want_stage)
        np.testing.assert_array_equal(pred, want_pred)

    def test_rule_without_cold_thresholds_ignores_the_cache(self):
        plain = ep.ExitRule(ep.Metric.MARGIN, self.rule.thresholds, 0.9)
        stage, pred, hot = cache.replay(plain, cache.CachePolicy(), self.sims, self.full,
                                        self.stream)
        want_stage, want_pred = ep.simulate(plain, self.stream_sims, self.stream_full)
        np.testing.assert_array_equal(stage, want_stage)
        np.testing.assert_array_equal(pred, want_pred)
        self.assertTrue(hot.any())  # The cache ran, it just changed nothing.

    def test_oracle_hot_flags_are_those_of_the_full_model_answers(self):
        policy = cache.CachePolicy()
        top1 = np.stack([t for t, _ in ep.stage_scores(ep.Metric.MARGIN, self.stream_sims)])
        want_hot = manual_hot_flags(policy, top1, self.stream_full)
        self.assertTrue(want_hot.any() and not want_hot.all())
        # A rule that never exits scores every stage of every frame.
        never = ep.ExitRule(ep.Metric.MARGIN, (None,) * 3, 0.9, (None,) * 3)
        stage, pred, hot = cache.replay(never, policy, self.sims, self.full, self.stream,
                                        oracle=True)
        np.testing.assert_array_equal(hot, want_hot)
        np.testing.assert_array_equal(stage, np.full(len(self.stream), 3))
        np.testing.assert_array_equal(pred, self.stream_full)
        # With exits, the oracle's cache does not depend on the decisions: the
        # rule decides as `simulate` does on the oracle's hot flags.
        stage, pred, hot = cache.replay(self.rule, policy, self.sims, self.full, self.stream,
                                        oracle=True)
        want_stage, want_pred = ep.simulate(self.rule, self.stream_sims, self.stream_full,
                                            list(want_hot))
        np.testing.assert_array_equal(stage, want_stage)
        np.testing.assert_array_equal(pred, want_pred)
        scored = np.arange(3)[:, None] <= stage[None, :]
        np.testing.assert_array_equal(hot[scored], want_hot[scored])
        self.assertTrue(0 < (stage < 3).mean() < 1)

    def test_closed_loop_matches_a_manual_loop(self):
        for policy in (cache.CachePolicy(), cache.CachePolicy(decay=0.7, exit_weight=0.5,
                                                              hot_min=0.9, max_hot=1)):
            for rule in (self.rule, cached_rule(self.stream_sims, metric="top1")):
                stage, pred, _ = cache.replay(rule, policy, self.sims, self.full, self.stream)
                want_stage, want_pred = manual_closed_loop(rule, policy, self.stream_sims,
                                                           self.stream_full)
                np.testing.assert_array_equal(stage, want_stage)
                np.testing.assert_array_equal(pred, want_pred)
        # The cache matters: without it the same rule decides otherwise.
        with_cache, _, _ = cache.replay(self.rule, cache.CachePolicy(), self.sims, self.full,
                                        self.stream)
        without, _, _ = cache.replay(self.rule, cache.CachePolicy(max_hot=0), self.sims,
                                     self.full, self.stream)
        self.assertGreater((with_cache != without).sum(), 50)

    def test_frames_default_to_the_pool_in_order(self):
        sub = [s[:300] for s in self.sims]
        a = cache.replay(self.rule, cache.CachePolicy(), sub, self.full[:300])
        b = cache.replay(self.rule, cache.CachePolicy(), self.sims, self.full, np.arange(300))
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


# --- calibrate_with_cache ---------------------------------------------------------

class CalibrateWithCacheTest(absltest.TestCase):
    """Open-set safety: half the frames belong to classes never in the cache."""

    TARGET = 0.95

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.policy = cache.CachePolicy()
        # A large pool, so the streams reuse few frames.
        cls.sims, cls.full = frame_pool(20_000, seed=10)
        cls.streams = [open_set_stream(cls.full, 2000, seed=20 + k) for k in range(4)]
        cls.rule = cache.calibrate_with_cache(cls.sims, cls.full, COSTS, cls.streams,
                                              cls.policy, cls.TARGET)

    def test_rule_with_cold_thresholds(self):
        rule = self.rule
        self.assertTrue(rule.uses_cache)
        self.assertIs(rule.metric, ep.Metric.MARGIN)
        self.assertEqual(rule.target_agreement, self.TARGET)
        self.assertLen(rule.cold_thresholds, 3)
        # The prior relaxes the rule for hot classes, never the other way round.
        self.assertTrue(any(h is not None for h in rule.thresholds))
        self.assertTrue(any(c is not None for c in rule.cold_thresholds))
        self.assertTrue(any((math.inf if h is None else h) < (math.inf if c is None else c)
                            for h, c in zip(rule.thresholds, rule.cold_thresholds)))

    def test_meets_the_target_in_closed_loop_on_its_streams(self):
        preds = [cache.replay(self.rule, self.policy, self.sims, self.full, s)[1]
                 for s in self.streams]
        agree = sum(int((p == self.full[s]).sum()) for p, s in zip(preds, self.streams))
        n = sum(len(s) for s in self.streams)
        self.assertGreaterEqual(ep.wilson_lower_bound(agree, n), self.TARGET)

    def test_agreement_holds_on_a_fresh_open_set_stream(self):
        sims, full = frame_pool(20_000, seed=11)
        stream = open_set_stream(full, 30_000, seed=12)
        stage, pred, hot = cache.replay(self.rule, self.policy, sims, full, stream)
        agreement = float((pred == full[stream]).mean())
        self.assertGreaterEqual(agreement, self.TARGET - 0.01)
        self.assertGreater(float((stage < 3).mean()), 0.5)  # Not safe by never exiting.
        self.assertTrue(0.2 < hot[0].mean() < 0.8)  # Both kinds of frames are met.
        # The stream is hard: the hot thresholds for every class would not do.
        hot_only = ep.ExitRule(ep.Metric.MARGIN, self.rule.thresholds, self.TARGET,
                               self.rule.thresholds)
        _, pred, _ = cache.replay(hot_only, self.policy, sims, full, stream)
        self.assertLess(float((pred == full[stream]).mean()), self.TARGET - 0.005)

    def test_unreachable_target_means_no_exits(self):
        rule = cache.calibrate_with_cache(self.sims, self.full, COSTS, self.streams[:1],
                                          self.policy, 1.0)
        self.assertEqual(rule.thresholds, (None,) * 3)
        self.assertEqual(rule.cold_thresholds, (None,) * 3)
        self.assertEqual(rule.target_agreement, 1.0)


class CalibrationStreamsTest(absltest.TestCase):

    def test_scene_zipf_and_uniform_streams(self):
        _, full = frame_pool(2000, seed=3)
        streams = memory_lib.calibration_streams(full, num_frames=500, seed=4)
        self.assertLen(streams, 5)
        for s in streams:
            self.assertEqual(s.shape, (500,))
            self.assertTrue(((s >= 0) & (s < len(full))).all())
        # Two scene streams repeat classes; the zipf streams concentrate on a
        # few classes without scenes; the uniform stream does neither.
        repeats = [float((full[s][1:] == full[s][:-1]).mean()) for s in streams]
        for r in repeats[:2]:
            self.assertGreater(r, 0.3)
        top_share = [np.bincount(full[s]).max() / len(s) for s in streams]
        for share in top_share[2:4]:
            self.assertGreater(share, top_share[4])
        self.assertLess(repeats[4], 0.2)
        again = memory_lib.calibration_streams(full, num_frames=500, seed=4)
        for a, b in zip(streams, again):
            np.testing.assert_array_equal(a, b)
        other = memory_lib.calibration_streams(full, num_frames=500, seed=5)
        self.assertFalse(np.array_equal(streams[0], other[0]))

    def test_calibrate_rule_with_and_without_a_cache(self):
        sims, full = frame_pool(2000, seed=5)
        plain = memory_lib.calibrate_rule(sims, full, COSTS, 0.95, "margin", None, None)
        self.assertFalse(plain.uses_cache)
        self.assertEqual(plain, ep.calibrate(sims, full, COSTS, 0.95, metric="margin"))
        off = memory_lib.calibrate_rule(sims, full, COSTS, 0.95, "margin", None,
                                        cache.CachePolicy(max_hot=0))
        self.assertEqual(off, plain)
        cached = memory_lib.calibrate_rule(sims, full, COSTS, 0.95, "margin", None,
                                           cache.CachePolicy())
        self.assertTrue(cached.uses_cache)
        self.assertEqual(cached.target_agreement, 0.95)


# --- Files: SemanticMemory and the descriptor ---------------------------------

def layer_aware_cached_rule(num_stages, num_classes, seed=0):
    rng = np.random.default_rng(seed)
    params = tuple(rng.normal(size=(num_classes, 2)).astype(np.float32)
                   for _ in range(num_stages))
    hot = tuple(float(np.float32(rng.normal())) for _ in range(num_stages - 1)) + (None,)
    cold = tuple(float(np.float32(rng.normal())) for _ in range(num_stages - 1)) + (None,)
    return ep.ExitRule(ep.Metric.LAYER_AWARE, hot, 0.99, cold, params)


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

    def test_round_trip_with_a_cache_policy_and_layer_aware_rule(self):
        policy = cache.CachePolicy(decay=0.85, exit_weight=0.125, hot_min=0.75, max_hot=2)
        mem = self.make_memory(policy)
        path = os.path.join(self.create_tempdir().full_path, "m.smtm.npz")
        mem.save(path)
        back = memory_lib.SemanticMemory.load(path)
        self.assertEqual(back.cache_policy, policy)
        self.assertEqual(back.exit_rule, mem.exit_rule)
        self.assertIs(back.exit_rule.metric, ep.Metric.LAYER_AWARE)
        self.assertEqual(back.exit_rule.cold_thresholds, mem.exit_rule.cold_thresholds)
        for a, b in zip(back.exit_rule.metric_params, mem.exit_rule.metric_params):
            self.assertEqual(a.dtype, np.float32)
            np.testing.assert_array_equal(a, b)
        self.assertEqual(back.plan, mem.plan)
        self.assertEqual(back.class_names, mem.class_names)
        for a, b in zip(back.centres, mem.centres):
            np.testing.assert_array_equal(a, b)

    def test_without_a_cache_policy_reads_back_none(self):
        mem = self.make_memory(None)
        path = os.path.join(self.create_tempdir().full_path, "m.smtm.npz")
        mem.save(path)
        self.assertIsNone(memory_lib.SemanticMemory.load(path).cache_policy)

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
    """Random unit centres, normalised as the encoders normalise."""
    return enc.l2_normalize_np(rng.normal(size=(num_classes, dim))).astype(np.float32)


def make_descriptor(rule, cache_policy, num_classes=3, dims=(4, 5, 6)):
    return tu.synthetic_descriptor(
        rule, desc.LookupOpSpec(attributes={"exit_rule": "exit_rule", "cache": "cache"}),
        num_classes=num_classes, dims=dims, seed=0, stage_cost=lambda s: 0.3,
        make_centres=l2_centres, cache=cache_policy)


class DescriptorCacheTest(absltest.TestCase):

    def test_round_trip_with_a_cache(self):
        policy = cache.CachePolicy(decay=0.75, exit_weight=0.5, hot_min=0.625, max_hot=1)
        d = make_descriptor(layer_aware_cached_rule(3, 3), policy)
        text = d.to_json()
        back = desc.Descriptor.from_json(text)
        self.assertEqual(back, d)
        self.assertEqual(back.cache, policy)
        self.assertEqual(back.exit_rule, d.exit_rule)
        for a, b in zip(back.exit_rule.metric_params, d.exit_rule.metric_params):
            np.testing.assert_array_equal(a, b)
        self.assertEqual(back.to_json(), text)
        # The equality compared above sees the cache.
        self.assertNotEqual(back, dataclasses.replace(d, cache=cache.CachePolicy()))

    def test_without_a_cache(self):
        plain = ep.ExitRule(ep.Metric.MARGIN, (0.25, None, None), 0.99)
        d = make_descriptor(plain, None)
        self.assertIsNone(json.loads(d.to_json())["cache"])
        self.assertIsNone(desc.Descriptor.from_json(d.to_json()).cache)

    def test_cold_thresholds_without_a_cache_are_rejected(self):
        rule = layer_aware_cached_rule(3, 3)
        with self.assertRaisesRegex(desc.DescriptorError, "cold thresholds but the descriptor "
                                                          "no cache"):
            make_descriptor(rule, None)
        d = json.loads(make_descriptor(rule, cache.CachePolicy()).to_json())
        d["cache"] = None
        with self.assertRaisesRegex(desc.DescriptorError, "cold thresholds"):
            desc.Descriptor.from_dict(d)
        del d["cache"]
        with self.assertRaisesRegex(desc.DescriptorError, "cold thresholds"):
            desc.Descriptor.from_dict(d)

    def test_bad_cache_policy_is_a_descriptor_error(self):
        d = json.loads(make_descriptor(layer_aware_cached_rule(3, 3),
                                       cache.CachePolicy()).to_json())
        for bad, pattern in (({"max_hot": -1}, "max_hot must be"),
                             ({"colour": 1}, "Unknown cache policy fields"),
                             ({"decay": "0.9"}, "Invalid cache policy")):
            broken = json.loads(json.dumps(d))
            broken["cache"].update(bad)
            with self.assertRaisesRegex(desc.DescriptorError, pattern):
                desc.Descriptor.from_dict(broken)
        broken = json.loads(json.dumps(d))
        broken["exit_rule"]["cold_thresholds"] = [0.1, 0.2]
        with self.assertRaisesRegex(desc.DescriptorError, "Invalid exit_rule.*cold_thresholds"):
            desc.Descriptor.from_dict(broken)

    def test_layer_aware_params_must_cover_all_classes(self):
        # LIBRARY BUG (fails at the time of writing): the descriptor checks
        # that every stage holds centres for all classes, but not that the
        # layer_aware parameters do. With [2, 2] parameters for 3 classes it is
        # accepted, and a host runtime then fails in exit_policy.score with
        # "IndexError: index 2 is out of bounds" on the first frame whose
        # top-1 class is 2.
        rule = layer_aware_cached_rule(3, num_classes=2)
        with self.assertRaises(desc.DescriptorError):
            make_descriptor(rule, cache.CachePolicy(), num_classes=3)


# --- The runtime with the cache in the loop ----------------------------------------

class RuntimeCacheTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.flat, _ = tu.exiting_converted("tf_keras")
        cls.rt = runtime.SmtmRuntime(cls.flat)
        cls.frames, _ = tu.stripes(300, seed=40)
        rt = cls.rt
        sims = [rt.stage_similarities(f) for f in cls.frames]
        cls.pool = [np.stack([s[i] for s in sims]) for i in range(rt.num_stages)]
        # The runtime's own full answers: the head after all stages.
        rt.set_exit_rule(ep.ExitRule(ep.Metric.MARGIN, (None,) * rt.num_stages, 0.9))
        results = [rt.classify(f) for f in cls.frames]
        assert all(r.exit_stage == rt.num_stages for r in results)
        cls.head = np.array([r.class_id for r in results])
        cls.stream = streams_lib.video(cls.head, 400, seed=3).indices

    def setUp(self):
        super().setUp()
        self.rt.set_exit_rule(self.rt.descriptor.exit_rule, self.rt.descriptor.cache)

    def run_stream(self, rule, policy):
        rt = self.rt
        rt.set_exit_rule(rule, policy)
        rt.reset_cache()
        results = [rt.classify(self.frames[i]) for i in self.stream]
        return (np.array([r.exit_stage for r in results]),
                np.array([r.class_id for r in results]))

    def check_bit_for_bit(self, rule, policy):
        stage, classes = self.run_stream(rule, policy)
        want_stage, want_classes, hot = cache.replay(rule, policy, self.pool, self.head,
                                                     self.stream)
        np.testing.assert_array_equal(stage, want_stage)
        np.testing.assert_array_equal(classes, want_classes)
        # The check means something only if the cache changed decisions.
        no_cache, _, _ = cache.replay(rule, cache.CachePolicy(max_hot=0), self.pool, self.head,
                                      self.stream)
        self.assertGreater((no_cache != want_stage).sum(), 10)
        self.assertTrue(hot[0].any() and not hot[0].all())
        return stage

    def test_full_answers_match_the_full_signature(self):
        full = np.array([self.rt.classify_full(f[None]) for f in self.frames])
        self.assertGreaterEqual(float((full == self.head).mean()), 0.99)

    def test_hand_made_cached_rule_bit_for_bit(self):
        rule = cached_rule([s[self.stream] for s in self.pool])
        stage = self.check_bit_for_bit(rule, cache.CachePolicy())
        counts = np.bincount(stage, minlength=self.rt.num_stages + 1)
        self.assertTrue((counts > 0).all(), counts)  # Every path is taken.
        self.check_bit_for_bit(rule, cache.CachePolicy(decay=0.6, exit_weight=0.5,
                                                       hot_min=0.8, max_hot=1))

    def test_calibrated_layer_aware_rule_bit_for_bit(self):
        csims, cfull = tu.calibration_similarities("tf_keras")
        params = ep.fit_layer_aware(csims, cfull)
        policy = cache.CachePolicy()
        streams = memory_lib.calibration_streams(cfull, num_frames=1000)
        rule = cache.calibrate_with_cache(csims, cfull, tu.fitted_memory("tf_keras").plan
                                          .stage_costs, streams, policy, 0.95,
                                          metric="layer_aware", metric_params=params)
        self.assertTrue(rule.uses_cache)
        self.assertIs(rule.metric, ep.Metric.LAYER_AWARE)
        self.assertTrue(any(t is not None for t in rule.thresholds))
        self.check_bit_for_bit(rule, policy)

    def test_reset_cache(self):
        rule = cached_rule([s[self.stream] for s in self.pool])
        first = self.run_stream(rule, cache.CachePolicy())
        self.assertTrue(self.rt.cache.hot.any())
        self.rt.reset_cache()
        self.assertFalse(self.rt.cache.hot.any())
        np.testing.assert_array_equal(self.rt.cache.scores, 0.0)
        second = self.run_stream(rule, cache.CachePolicy())  # Resets again.
        np.testing.assert_array_equal(first[0], second[0])
        np.testing.assert_array_equal(first[1], second[1])
        # Switching rules empties the cache too.
        for i in self.stream[:20]:
            self.rt.classify(self.frames[i])
        self.assertTrue(self.rt.cache.scores.any())
        self.rt.set_exit_rule(rule, cache.CachePolicy())
        self.assertFalse(self.rt.cache.scores.any())
        self.assertFalse(self.rt.cache.hot.any())

    def test_set_exit_rule_rejections(self):
        rule = cached_rule([s[self.stream] for s in self.pool])
        with self.assertRaisesRegex(ValueError, "cold thresholds needs a cache policy"):
            self.rt.set_exit_rule(rule)
        for num_stages in (2, 4):
            wrong = ep.ExitRule(ep.Metric.MARGIN, (0.1,) * num_stages, 0.9)
            with self.assertRaisesRegex(ValueError, f"The rule has {num_stages} stages, the "
                                                    f"model {self.rt.num_stages}"):
                self.rt.set_exit_rule(wrong)
        # A rejected rule leaves the runtime as it was.
        self.assertEqual(self.rt.rule, self.rt.descriptor.exit_rule)

    def test_policy_is_ignored_for_a_rule_without_cold_thresholds(self):
        plain = ep.ExitRule(ep.Metric.MARGIN, cached_rule(self.pool).thresholds, 0.9)
        stage, classes = self.run_stream(plain, cache.CachePolicy())
        want_stage, want_classes = ep.simulate(plain, [s[self.stream] for s in self.pool],
                                               self.head[self.stream])
        np.testing.assert_array_equal(stage, want_stage)
        np.testing.assert_array_equal(classes, want_classes)
        self.assertFalse(self.rt.cache.hot.any())


# --- convert_model with a metric and a cache policy ------------------------------

class ConvertModelCacheTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model = tu.trained_residual("tf_keras")
        cls.data = tu.labelled_stripes(600, 200, train_seed=50, test_seed=51)
        cls.policy = cache.CachePolicy(decay=0.8, exit_weight=0.5, hot_min=0.6, max_hot=2)

    def test_memory_descriptor_and_runtime_carry_the_cache(self):
        directory = self.create_tempdir().full_path
        out = os.path.join(directory, "m.tflite")
        mem_path = os.path.join(directory, "m.smtm.npz")
        mem, _ = smtm_converter.convert_model(
            self.model, self.data, out, holdout=0.5, num_stages=3, embedding_dim=8,
            metric="margin", cache_policy=self.policy, num_check_images=4,
            memory_output=mem_path)
        # The metric and the policy reached fit_semantic_memory.
        self.assertIs(mem.exit_rule.metric, ep.Metric.MARGIN)
        self.assertTrue(mem.exit_rule.uses_cache)
        self.assertEqual(mem.cache_policy, self.policy)
        loaded = memory_lib.SemanticMemory.load(mem_path)
        self.assertEqual(loaded.cache_policy, self.policy)
        self.assertEqual(loaded.exit_rule, mem.exit_rule)
        rt = runtime.SmtmRuntime.from_file(out)
        self.assertEqual(rt.descriptor.cache, self.policy)
        self.assertEqual(rt.descriptor.exit_rule, mem.exit_rule)
        self.assertEqual(rt.rule, mem.exit_rule)
        # The runtime decides with the descriptor's rule and cache, as replay does.
        frames = self.data.x_test
        sims = [rt.stage_similarities(f) for f in frames]
        pool = [np.stack([s[i] for s in sims]) for i in range(rt.num_stages)]
        rt.set_exit_rule(ep.ExitRule(ep.Metric.MARGIN, (None,) * rt.num_stages, 0.9))
        head = np.array([rt.classify(f).class_id for f in frames])
        stream = streams_lib.video(head, 300, seed=5).indices
        rt.set_exit_rule(rt.descriptor.exit_rule, rt.descriptor.cache)
        rt.reset_cache()
        results = [rt.classify(frames[i]) for i in stream]
        want_stage, want_classes, _ = cache.replay(mem.exit_rule, self.policy, pool, head, stream)
        np.testing.assert_array_equal([r.exit_stage for r in results], want_stage)
        np.testing.assert_array_equal([r.class_id for r in results], want_classes)
        self.assertTrue((want_stage < rt.num_stages).any())  # Some frames exit early.


if __name__ == "__main__":
    absltest.main()
