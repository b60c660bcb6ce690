"""Tests for smtm_tf.runtime.exit_policy: margins, rules, simulation and calibration."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from smtm_tf.runtime import exit_policy as ep
from testing_utils import synthetic_cascade

COSTS = (0.2, 0.3, 0.45)


class MarginsTest(absltest.TestCase):

    def test_hand_made_values(self):
        sims = np.array([[0.1, 0.5, 0.3],
                         [0.9, -0.2, 0.7],
                         [0.4, 0.4, 0.1],  # A tie: margin 0.
                         [-0.3, -0.1, -0.6]], np.float32)
        top1, margin = ep.margins(sims)
        np.testing.assert_array_equal(top1, [1, 0, 0, 1])
        np.testing.assert_allclose(margin, [0.2, 0.2, 0.0, 0.2], atol=1e-6)
        self.assertEqual(margin.dtype, np.float32)

    def test_float32_whatever_the_input(self):
        rng = np.random.default_rng(0)
        sims = rng.normal(size=(50, 7))
        _, m64 = ep.margins(sims)
        _, m32 = ep.margins(sims.astype(np.float32))
        # Both computed in float32: identical, so calibration (batch) and the
        # runtime (per frame, float32 tensors) agree bit for bit.
        np.testing.assert_array_equal(m64, m32)
        self.assertEqual(m64.dtype, np.float32)

    def test_batch_axes_and_single_frame(self):
        rng = np.random.default_rng(1)
        sims = rng.normal(size=(2, 3, 6)).astype(np.float32)
        top1, margin = ep.margins(sims)
        self.assertEqual(top1.shape, (2, 3))
        self.assertEqual(margin.shape, (2, 3))
        t, m = ep.margins(sims[1, 2])
        self.assertEqual(int(t), int(top1[1, 2]))
        self.assertEqual(float(m), float(margin[1, 2]))
        s = np.sort(sims[1, 2])
        self.assertAlmostEqual(float(m), float(s[-1] - s[-2]), places=6)


class ExitRuleTest(parameterized.TestCase):

    @parameterized.named_parameters(("zero", 0.0), ("above_one", 1.5), ("negative", -1.0))
    def test_invalid_target_agreement(self, target):
        with self.assertRaisesRegex(ValueError, "target_agreement must be in"):
            ep.ExitRule(ep.Metric.MARGIN, (0.1,), target)

    @parameterized.named_parameters(("nan", math.nan), ("inf", math.inf),
                                    ("minus_inf", -math.inf), ("string", "0.1"))
    def test_non_finite_threshold(self, threshold):
        with self.assertRaisesRegex(ValueError, r"thresholds\[1\] must be a finite number"):
            ep.ExitRule(ep.Metric.MARGIN, (0.1, threshold), 0.9)

    def test_round_trip(self):
        rule = ep.ExitRule("margin", (0.25, None, 0.125), 0.97)
        self.assertIs(rule.metric, ep.Metric.MARGIN)
        self.assertEqual(ep.ExitRule.from_dict(rule.to_dict()), rule)

    def test_from_dict_rejects_unknown_fields_and_metrics(self):
        with self.assertRaisesRegex(ValueError, "Unknown exit rule fields"):
            ep.ExitRule.from_dict({"metric": "margin", "thresholds": [0.1],
                                   "target_agreement": 0.9, "extra": 1})
        with self.assertRaises(ValueError):
            ep.ExitRule("entropy", (0.1,), 0.9)

    def test_target_one_is_allowed(self):
        self.assertEqual(ep.ExitRule(ep.Metric.MARGIN, (None,), 1.0).target_agreement, 1.0)


class SimulateTest(absltest.TestCase):

    def test_hand_made(self):
        stage0 = np.array([[0.9, 0.1, 0.0],   # margin 0.8 -> exits at stage 0 with 0
                           [0.5, 0.4, 0.0],   # margin 0.1 -> goes on
                           [0.2, 0.3, 0.0],   # margin 0.1 -> goes on
                           [0.0, 0.0, 0.05]], np.float32)  # margin 0.05 -> goes on
        stage1 = np.array([[0.0, 0.0, 1.0],   # never seen: exited already
                           [0.0, 0.9, 0.0],   # margin 0.9 -> exits at stage 1 with 1
                           [0.3, 0.2, 0.0],   # margin 0.1 -> below 0.2, goes on
                           [0.0, 0.6, 0.0]], np.float32)  # margin 0.6 -> exits with 1
        fallback = np.array([7, 7, 7, 7])
        rule = ep.ExitRule(ep.Metric.MARGIN, (0.5, 0.2), 0.9)
        stage, pred = ep.simulate(rule, [stage0, stage1], fallback)
        np.testing.assert_array_equal(stage, [0, 1, 2, 1])
        np.testing.assert_array_equal(pred, [0, 1, 7, 1])
        # The caller's fallback is not modified.
        np.testing.assert_array_equal(fallback, [7, 7, 7, 7])

    def test_none_never_exits(self):
        sims = [np.eye(3, dtype=np.float32)] * 2
        rule = ep.ExitRule(ep.Metric.MARGIN, (None, None), 0.9)
        stage, pred = ep.simulate(rule, sims, np.array([2, 0, 1]))
        np.testing.assert_array_equal(stage, [2, 2, 2])
        np.testing.assert_array_equal(pred, [2, 0, 1])
        rule = ep.ExitRule(ep.Metric.MARGIN, (None, 0.5), 0.9)
        stage, pred = ep.simulate(rule, sims, np.array([2, 0, 1]))
        np.testing.assert_array_equal(stage, [1, 1, 1])
        np.testing.assert_array_equal(pred, [0, 1, 2])

    def test_threshold_is_inclusive(self):
        sims = [np.array([[0.75, 0.25]], np.float32)]
        _, margin = ep.margins(sims[0])
        rule = ep.ExitRule(ep.Metric.MARGIN, (float(margin[0]),), 0.9)
        stage, _ = ep.simulate(rule, sims, np.array([1]))
        self.assertEqual(stage[0], 0)


class OracleTest(absltest.TestCase):

    def test_each_frame_stops_at_its_first_right_stage(self):
        full = np.array([0, 1, 2, 3])
        answers = [np.array([0, 0, 0, 0]),  # Frame 0 is right at stage 0.
                   np.array([1, 1, 0, 0]),  # Frame 1 first at stage 1.
                   np.array([0, 0, 2, 3])]  # Frames 2 and 3 at stage 2.
        costs = (0.2, 0.3, 0.1)  # Exits cost 0.2, 0.5, 0.6; the head 1.
        want = 1.0 / np.mean([0.2, 0.5, 0.6, 0.6])
        self.assertAlmostEqual(ep.oracle_speedup(answers, full, costs), want)
        # A frame no stage gets right runs the head.
        answers[2] = np.array([0, 0, 2, 0])
        want = 1.0 / np.mean([0.2, 0.5, 0.6, 1.0])
        self.assertAlmostEqual(ep.oracle_speedup(answers, full, costs), want)
        self.assertEqual(ep.oracle_speedup([full * 0 + 9], full, (0.5,)), 1.0)


class WilsonTest(absltest.TestCase):

    def test_known_values(self):
        # p = 0.9, n = 100, z = 1.645: 0.8396 (Wilson score, worked by hand).
        self.assertAlmostEqual(ep.wilson_lower_bound(90, 100), 0.8396, places=3)
        # All successes: closed form n / (n + z^2).
        self.assertAlmostEqual(ep.wilson_lower_bound(100, 100), 100 / (100 + 1.645 ** 2))
        self.assertEqual(ep.wilson_lower_bound(0, 10), 0.0)
        self.assertEqual(ep.wilson_lower_bound(0, 0), 0.0)

    def test_below_the_ratio_and_tightens_with_trials(self):
        previous = 0.0
        for n in (10, 100, 1000, 10000, 100000):
            bound = ep.wilson_lower_bound(int(0.95 * n), n)
            self.assertLess(bound, 0.95)
            self.assertGreater(bound, previous)
            previous = bound
        self.assertGreater(previous, 0.948)

    def test_zero_z_is_the_ratio(self):
        self.assertAlmostEqual(ep.wilson_lower_bound(37, 50, z=0.0), 37 / 50)

    def test_more_confidence_lower_bound(self):
        self.assertLess(ep.wilson_lower_bound(95, 100, z=2.33),
                        ep.wilson_lower_bound(95, 100, z=1.645))


class CalibrateTest(parameterized.TestCase):

    @parameterized.named_parameters(("t90", 0.90), ("t95", 0.95), ("t99", 0.99))
    def test_target_holds_on_fresh_data(self, target):
        sims, full = synthetic_cascade(4000, seed=1)
        rule = ep.calibrate(sims, full, COSTS, target_agreement=target)
        self.assertEqual(rule.target_agreement, target)
        self.assertLen(rule.thresholds, 3)
        fresh_sims, fresh_full = synthetic_cascade(100_000, seed=12345)
        stage, pred = ep.simulate(rule, fresh_sims, fresh_full)
        agreement = float((pred == fresh_full).mean())
        # 100k fresh frames: the sampling error is ~0.001; the calibration's
        # own uncertainty (4000 frames) is what the Wilson bound covers.
        self.assertGreaterEqual(agreement, target - 0.005)
        # ... and it is not trivially safe: a large share exits early.
        self.assertGreater(float((stage < 3).mean()), 0.5)

    def test_target_counts_all_frames_with_weak_early_stages(self):
        # target_agreement is the share of ALL frames answered as the full
        # model does (frames that ran the whole model agree). With weak early
        # stages the budget is spent on few exits, which then agree less often
        # than the target themselves; the overall share must still hold.
        spreads = (0.1, 0.2, 0.35)
        sims, full = synthetic_cascade(20_000, seed=1, spreads=spreads)
        rule = ep.calibrate(sims, full, COSTS, target_agreement=0.95)
        fresh_sims, fresh_full = synthetic_cascade(100_000, seed=7, spreads=spreads)
        stage, pred = ep.simulate(rule, fresh_sims, fresh_full)
        exited = stage < 3
        self.assertGreater(exited.mean(), 0.1)
        self.assertGreaterEqual(float((pred == fresh_full).mean()), 0.95 - 0.005)
        # Every disagreement is an exit: frames that ran everything agree.
        self.assertTrue((pred[~exited] == fresh_full[~exited]).all())

    def test_higher_target_exits_less(self):
        sims, full = synthetic_cascade(4000, seed=2)
        fresh_sims, fresh_full = synthetic_cascade(50_000, seed=3)
        costs, agreements = [], []
        for target in (0.85, 0.95, 0.995):
            rule = ep.calibrate(sims, full, COSTS, target_agreement=target)
            stage, pred = ep.simulate(rule, fresh_sims, fresh_full)
            cost = np.where(stage < 3, np.cumsum(COSTS)[np.minimum(stage, 2)], 1.0).mean()
            costs.append(cost)
            agreements.append((pred == fresh_full).mean())
        self.assertEqual(costs, sorted(costs))  # Mean compute grows with the target.
        self.assertEqual(agreements, sorted(agreements))

    def test_calibrated_rule_is_cheaper_than_running_everything(self):
        sims, full = synthetic_cascade(4000, seed=4)
        rule = ep.calibrate(sims, full, COSTS, target_agreement=0.95)
        stage, _ = ep.simulate(rule, sims, full)
        cumulative = np.cumsum(COSTS)
        cost = np.where(stage < 3, cumulative[np.minimum(stage, 2)], 1.0).mean()
        self.assertLess(cost, 0.8)

    def test_stages_that_save_too_little_never_exit(self):
        sims, full = synthetic_cascade(4000, seed=5)
        # Cumulative 0.2, 0.5, 0.99: after stage 2 only 1% of compute is left.
        rule = ep.calibrate(sims, full, (0.2, 0.3, 0.49), target_agreement=0.9,
                            min_saving=0.02)
        self.assertIsNone(rule.thresholds[2])
        self.assertIsNotNone(rule.thresholds[1])

    def test_too_few_frames_for_the_target_means_no_exits(self):
        sims, full = synthetic_cascade(4000, seed=6)
        # The Wilson lower bound of any finite sample is below 1.
        rule = ep.calibrate(sims, full, COSTS, target_agreement=1.0)
        self.assertEqual(rule.thresholds, (None, None, None))
        sims, full = synthetic_cascade(20, seed=6)
        rule = ep.calibrate(sims, full, COSTS, target_agreement=0.99)
        self.assertEqual(rule.thresholds, (None, None, None))

    def test_raw_ratio_with_zero_z(self):
        # A stage that always agrees with the full model, with z = 0 and a
        # target of 1, must let every frame exit there.
        n, k = 500, 4
        rng = np.random.default_rng(7)
        full = rng.integers(0, k, n)
        perfect = np.full((n, k), 0.1, np.float32)
        perfect[np.arange(n), full] = 0.9
        rule = ep.calibrate([perfect, perfect], full, (0.3, 0.5), target_agreement=1.0,
                            confidence_z=0.0)
        stage, pred = ep.simulate(rule, [perfect, perfect], full)
        np.testing.assert_array_equal(stage, np.zeros(n))
        np.testing.assert_array_equal(pred, full)

    @parameterized.named_parameters(("zero", 0.0), ("above_one", 1.5), ("negative", -1.0))
    def test_invalid_target(self, target):
        sims, full = synthetic_cascade(100, seed=0)
        with self.assertRaisesRegex(ValueError, "target_agreement must be in"):
            ep.calibrate(sims, full, COSTS, target_agreement=target)

    def test_invalid_arguments(self):
        sims, full = synthetic_cascade(100, seed=0)
        with self.assertRaisesRegex(ValueError, "confidence_z"):
            ep.calibrate(sims, full, COSTS, confidence_z=-1.0)
        with self.assertRaisesRegex(ValueError, "3 stages of similarities for 2 costs"):
            ep.calibrate(sims, full, (0.5, 0.3))


if __name__ == "__main__":
    absltest.main()
