"""Tests for the exit metrics of smtm_tf.runtime.exit_policy and the rule comparison table.

Covers `score` (TOP1, MARGIN, LAYER_AWARE), `fit_layer_aware`, ExitRule with
cold thresholds and metric parameters, `calibrate` with hot flags,
`calibrate_global`, `budget_to_target` and `rule_comparison.format_rule_table`.
Everything runs on synthetic similarities: no model is needed.
"""

import json
import math

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from smtm_tf.runtime import exit_policy as ep
from smtm_tf.evaluation import rule_comparison
from smtm_tf.evaluation import validation
from testing_utils import synthetic_cascade

COSTS = (0.2, 0.3, 0.45)


def make_similarities(top1, margin, num_classes, rng):
    """`[n, K]` float32 similarities whose top-1 class and margin are the given ones."""
    n = len(top1)
    rows = np.arange(n)
    second = (top1 + rng.integers(1, num_classes, n)) % num_classes
    sim = rng.uniform(-0.5, 0.45, (n, num_classes)).astype(np.float32)
    sim[rows, second] = 0.5
    sim[rows, top1] = 0.5 + margin
    return sim


def hot_cascade(n, seed, num_classes=5, spreads=(0.3, 0.5, 0.8), hot_bonus=0.3):
    """Per-stage similarities with hot flags; a hot top-1 class is more often right.

    At every stage a frame's margin m is uniform on [0, spread), a fair coin
    says whether its top-1 class is hot, and the top-1 class is the full
    model's with probability min(1, 0.4 + 2 m + hot_bonus * hot).

    Returns:
      (similarities per stage [n, K], full predictions [n], hot flags per stage [n]).
    """
    rng = np.random.default_rng(seed)
    full = rng.integers(0, num_classes, n)
    sims, hots = [], []
    for spread in spreads:
        margin = rng.uniform(0.0, spread, n)
        hot = rng.random(n) < 0.5
        right = rng.random(n) < np.clip(0.4 + 2.0 * margin + hot_bonus * hot, 0.0, 1.0)
        top1 = np.where(right, full, (full + rng.integers(1, num_classes, n)) % num_classes)
        sims.append(make_similarities(top1, margin, num_classes, rng))
        hots.append(hot)
    return sims, full, hots


def layer_aware_params(num_stages=3, num_classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.normal(size=(num_classes, 2)).astype(np.float32)
                 for _ in range(num_stages))


def agreement_bound(rule, sims, full, hot=None, z=1.645):
    _, pred = ep.simulate(rule, sims, full, hot)
    return ep.wilson_lower_bound(int((pred == full).sum()), len(full), z)


def effective(threshold):
    """A threshold as a number: None (never exits) is +inf."""
    return math.inf if threshold is None else threshold


class ExitRuleCacheAndParamsTest(parameterized.TestCase):

    def test_cold_thresholds_must_match_the_stages(self):
        with self.assertRaisesRegex(ValueError, "cold_thresholds has 2 entries for 3 stages"):
            ep.ExitRule(ep.Metric.MARGIN, (0.1, 0.2, 0.3), 0.9, (0.2, 0.3))
        with self.assertRaisesRegex(ValueError, "cold_thresholds has 4 entries for 3 stages"):
            ep.ExitRule(ep.Metric.MARGIN, (0.1, 0.2, 0.3), 0.9, (0.2, 0.3, 0.4, 0.5))

    @parameterized.named_parameters(("nan", math.nan), ("inf", math.inf), ("string", "0.1"))
    def test_cold_thresholds_must_be_finite(self, bad):
        with self.assertRaisesRegex(ValueError, r"cold_thresholds\[1\] must be a finite number"):
            ep.ExitRule(ep.Metric.MARGIN, (0.1, 0.2), 0.9, (0.3, bad))

    def test_layer_aware_needs_one_param_array_per_stage(self):
        with self.assertRaisesRegex(ValueError, "layer_aware metric needs metric_params"):
            ep.ExitRule(ep.Metric.LAYER_AWARE, (0.1, 0.2, 0.3), 0.9)
        with self.assertRaisesRegex(ValueError, "layer_aware metric needs metric_params"):
            ep.ExitRule(ep.Metric.LAYER_AWARE, (0.1, 0.2, 0.3), 0.9,
                        metric_params=layer_aware_params(num_stages=2))

    @parameterized.named_parameters(("margin", ep.Metric.MARGIN), ("top1", ep.Metric.TOP1))
    def test_other_metrics_take_no_params(self, metric):
        with self.assertRaisesRegex(ValueError,
                                    f"The {metric.value} metric takes no metric_params"):
            ep.ExitRule(metric, (0.1, 0.2, 0.3), 0.9, metric_params=layer_aware_params())

    @parameterized.named_parameters(("nan", math.nan), ("inf", math.inf),
                                    ("minus_inf", -math.inf))
    def test_params_must_be_finite(self, bad):
        params = list(layer_aware_params())
        params[1] = params[1].copy()
        params[1][2, 1] = bad
        with self.assertRaisesRegex(ValueError, r"metric_params\[1\] must be a finite \[C, 2\]"):
            ep.ExitRule(ep.Metric.LAYER_AWARE, (0.1, 0.2, 0.3), 0.9, metric_params=params)

    @parameterized.named_parameters(("three_columns", (4, 3)), ("flat", (8,)),
                                    ("three_axes", (4, 2, 1)))
    def test_params_must_be_c_by_2(self, shape):
        params = list(layer_aware_params())
        params[0] = np.zeros(shape, np.float32)
        with self.assertRaisesRegex(ValueError, r"metric_params\[0\] must be a finite \[C, 2\]"):
            ep.ExitRule(ep.Metric.LAYER_AWARE, (0.1, 0.2, 0.3), 0.9, metric_params=params)

    def test_params_are_stored_as_float32(self):
        params = tuple(p.astype(np.float64) for p in layer_aware_params())
        rule = ep.ExitRule(ep.Metric.LAYER_AWARE, (0.1, 0.2, 0.3), 0.9, metric_params=params)
        self.assertIsInstance(rule.metric_params, tuple)
        for got, want in zip(rule.metric_params, params):
            self.assertEqual(got.dtype, np.float32)
            np.testing.assert_array_equal(got, want.astype(np.float32))

    def test_layer_aware_round_trip_is_exact(self):
        rng = np.random.default_rng(3)
        # Arbitrary float32 values, tiny and large ones included.
        params = tuple((rng.normal(size=(5, 2)) * 10.0 ** rng.integers(-8, 8, (5, 2)))
                       .astype(np.float32) for _ in range(3))
        rule = ep.ExitRule(ep.Metric.LAYER_AWARE, (0.1 / 3, None, 2.0 / 7), 0.97,
                           cold_thresholds=(1.0 / 3, 0.7, None), metric_params=params)
        d = rule.to_dict()
        back = ep.ExitRule.from_dict(json.loads(json.dumps(d)))
        self.assertEqual(back, rule)
        self.assertIs(back.metric, ep.Metric.LAYER_AWARE)
        self.assertEqual(back.thresholds, rule.thresholds)
        self.assertEqual(back.cold_thresholds, rule.cold_thresholds)
        self.assertEqual(back.target_agreement, 0.97)
        self.assertLen(back.metric_params, 3)
        for got, want in zip(back.metric_params, params):
            self.assertEqual(got.dtype, np.float32)
            np.testing.assert_array_equal(got, want)  # Bit for bit.
        self.assertEqual(back.to_dict(), d)

    def test_cold_round_trip_without_params(self):
        rule = ep.ExitRule(ep.Metric.TOP1, (0.75, None), 0.95, cold_thresholds=(None, 0.875))
        d = json.loads(json.dumps(rule.to_dict()))
        self.assertNotIn("metric_params", d)
        self.assertEqual(d["cold_thresholds"], [None, 0.875])
        back = ep.ExitRule.from_dict(d)
        self.assertEqual(back, rule)
        self.assertEqual(back.cold_thresholds, (None, 0.875))
        self.assertIsNone(back.metric_params)
        # Without cold thresholds the field is left out and reads back as None.
        plain = ep.ExitRule(ep.Metric.MARGIN, (0.5, None), 0.95)
        self.assertNotIn("cold_thresholds", plain.to_dict())
        self.assertIsNone(ep.ExitRule.from_dict(plain.to_dict()).cold_thresholds)

    def test_equality_sees_params_and_cold_thresholds(self):
        params = layer_aware_params()
        rule = ep.ExitRule(ep.Metric.LAYER_AWARE, (0.1, 0.2, 0.3), 0.9, (0.2, 0.3, 0.4), params)
        same = ep.ExitRule(ep.Metric.LAYER_AWARE, (0.1, 0.2, 0.3), 0.9, (0.2, 0.3, 0.4),
                           tuple(p.copy() for p in params))
        self.assertEqual(rule, same)
        nudged = [p.copy() for p in params]
        nudged[2][1, 0] = np.nextafter(nudged[2][1, 0], np.float32(np.inf))
        self.assertNotEqual(
            rule, ep.ExitRule(ep.Metric.LAYER_AWARE, (0.1, 0.2, 0.3), 0.9, (0.2, 0.3, 0.4),
                              nudged))
        self.assertNotEqual(
            rule, ep.ExitRule(ep.Metric.LAYER_AWARE, (0.1, 0.2, 0.3), 0.9, (0.2, 0.3, 0.5),
                              params))
        self.assertNotEqual(
            rule, ep.ExitRule(ep.Metric.LAYER_AWARE, (0.1, 0.2, 0.3), 0.9, None, params))
        self.assertNotEqual(ep.ExitRule(ep.Metric.MARGIN, (0.1,), 0.9),
                            ep.ExitRule(ep.Metric.TOP1, (0.1,), 0.9))

    def test_unknown_metric_name(self):
        d = {"metric": "entropy", "thresholds": [0.1], "target_agreement": 0.9}
        with self.assertRaisesRegex(
                ValueError,
                r"Unknown exit metric 'entropy'; known: \['top1', 'margin', 'layer_aware'\]"):
            ep.ExitRule.from_dict(d)

    def test_threshold_for_and_properties(self):
        cached = ep.ExitRule(ep.Metric.MARGIN, (0.1, None, 0.3), 0.9, (0.4, 0.5, None))
        self.assertTrue(cached.uses_cache)
        self.assertEqual(cached.num_stages, 3)
        self.assertEqual([cached.threshold_for(s, True) for s in range(3)], [0.1, None, 0.3])
        self.assertEqual([cached.threshold_for(s, False) for s in range(3)], [0.4, 0.5, None])
        plain = ep.ExitRule(ep.Metric.MARGIN, (0.1, None, 0.3), 0.9)
        self.assertFalse(plain.uses_cache)
        self.assertEqual([plain.threshold_for(s, False) for s in range(3)], [0.1, None, 0.3])
        self.assertIsNone(plain.stage_params(1))
        params = layer_aware_params()
        la = ep.ExitRule(ep.Metric.LAYER_AWARE, (0.1, 0.2, 0.3), 0.9, metric_params=params)
        np.testing.assert_array_equal(la.stage_params(1), params[1])


class ScoreTest(parameterized.TestCase):

    # Dyadic values: every result below is exact in float32.
    SIMS = np.array([[0.25, 0.75, 0.5, -0.25],
                     [0.5, -0.5, 0.125, 0.375],
                     [0.25, 0.25, -1.0, 0.0],    # A tie at the top: margin 0.
                     [-0.75, -0.5, -0.875, -1.0]], np.float32)

    def test_top1(self):
        top1, value = ep.score(ep.Metric.TOP1, self.SIMS)
        np.testing.assert_array_equal(top1, [1, 0, 0, 1])
        np.testing.assert_array_equal(value, np.array([0.75, 0.5, 0.25, -0.5], np.float32))
        self.assertEqual(value.dtype, np.float32)

    def test_margin(self):
        top1, value = ep.score(ep.Metric.MARGIN, self.SIMS)
        np.testing.assert_array_equal(top1, [1, 0, 0, 1])
        np.testing.assert_array_equal(value, np.array([0.25, 0.125, 0.0, 0.25], np.float32))
        self.assertEqual(value.dtype, np.float32)

    def test_layer_aware_hand_made(self):
        params = np.array([[-1.0, 4.0],     # class 0
                           [0.5, 2.0],      # class 1
                           [3.0, -1.0],     # class 2 (never top-1 here)
                           [0.0, 0.0]], np.float32)
        top1, value = ep.score(ep.Metric.LAYER_AWARE, self.SIMS, params)
        np.testing.assert_array_equal(top1, [1, 0, 0, 1])
        # a[c] + b[c] * margin: 0.5 + 2 * 0.25, -1 + 4 * 0.125, -1 + 4 * 0, 0.5 + 2 * 0.25.
        np.testing.assert_array_equal(value, np.array([1.0, -0.5, -1.0, 1.0], np.float32))
        self.assertEqual(value.dtype, np.float32)

    def test_layer_aware_is_the_float32_formula(self):
        rng = np.random.default_rng(5)
        sims = rng.uniform(-1, 1, (200, 7)).astype(np.float32)
        params = rng.normal(size=(7, 2)).astype(np.float32) * np.float32(3.3)
        top1, value = ep.score(ep.Metric.LAYER_AWARE, sims, params)
        _, margin = ep.margins(sims)
        for i in range(len(sims)):
            c = int(np.argmax(sims[i]))
            self.assertEqual(int(top1[i]), c)
            want = np.float32(params[c, 0]) + np.float32(params[c, 1]) * np.float32(margin[i])
            self.assertEqual(type(want), np.float32)
            self.assertEqual(value[i], want, i)  # Exactly, not approximately.
        self.assertEqual(value.dtype, np.float32)
        # float64 similarities give the same scores (computed in float32).
        _, value64 = ep.score(ep.Metric.LAYER_AWARE, sims.astype(np.float64), params)
        np.testing.assert_array_equal(value64, value)

    @parameterized.parameters(ep.Metric.TOP1, ep.Metric.MARGIN, ep.Metric.LAYER_AWARE)
    def test_single_frame_equals_batch(self, metric):
        # The runtime scores one `[K]` vector at a time, calibration `[N, K]` arrays.
        rng = np.random.default_rng(6)
        sims = rng.uniform(-1, 1, (30, 5)).astype(np.float32)
        params = rng.normal(size=(5, 2)).astype(np.float32) if metric is ep.Metric.LAYER_AWARE \
            else None
        top1, value = ep.score(metric, sims, params)
        for i in range(len(sims)):
            t, v = ep.score(metric, sims[i], params)
            self.assertEqual(int(t), int(top1[i]))
            self.assertEqual(np.float32(v), value[i])

    def test_stage_scores_takes_a_rule_or_a_metric(self):
        rng = np.random.default_rng(7)
        sims = [rng.uniform(-1, 1, (20, 4)).astype(np.float32) for _ in range(3)]
        params = layer_aware_params()
        rule = ep.ExitRule(ep.Metric.LAYER_AWARE, (0.0,) * 3, 0.9, metric_params=params)
        by_rule = ep.stage_scores(rule, sims)
        by_metric = ep.stage_scores("layer_aware", sims, params)
        self.assertLen(by_rule, 3)
        for s, ((t1, v1), (t2, v2)) in enumerate(zip(by_rule, by_metric)):
            want_t, want_v = ep.score(ep.Metric.LAYER_AWARE, sims[s], params[s])
            np.testing.assert_array_equal(t1, want_t)
            np.testing.assert_array_equal(v1, want_v)
            np.testing.assert_array_equal(t2, want_t)
            np.testing.assert_array_equal(v2, want_v)

    def test_simulate_with_layer_aware(self):
        # Two classes, one stage: class 0 needs margin >= 0.5 to score >= 0,
        # class 1 exits on any margin.
        params = (np.array([[-2.0, 4.0], [1.0, 0.0]], np.float32),)
        rule = ep.ExitRule(ep.Metric.LAYER_AWARE, (0.0,), 0.9, metric_params=params)
        sims = [np.array([[0.75, 0.0], [0.25, 0.0], [0.0, 0.125]], np.float32)]
        stage, pred = ep.simulate(rule, sims, np.array([1, 1, 0]))
        np.testing.assert_array_equal(stage, [0, 1, 0])
        np.testing.assert_array_equal(pred, [0, 1, 1])


class FitLayerAwareTest(absltest.TestCase):

    @staticmethod
    def logistic_data(n, seed, intercepts, slopes, num_classes=4):
        """Frames whose top-1 agrees with the full model w.p. sigmoid(a_s + b_s m)."""
        rng = np.random.default_rng(seed)
        full = rng.integers(0, num_classes, n)
        sims = []
        for a, b in zip(intercepts, slopes):
            margin = rng.uniform(0.0, 0.6, n)
            agree = rng.random(n) < 1.0 / (1.0 + np.exp(-(a + b * margin)))
            top1 = np.where(agree, full, (full + rng.integers(1, num_classes, n)) % num_classes)
            sims.append(make_similarities(top1, margin, num_classes, rng))
        return sims, full

    def test_slopes_positive_when_agreement_grows_with_margin(self):
        intercepts, slopes = (-1.0, -2.0, 0.5), (8.0, 12.0, 5.0)
        sims, full = self.logistic_data(16_000, seed=0, intercepts=intercepts, slopes=slopes)
        params = ep.fit_layer_aware(sims, full)
        self.assertLen(params, 3)
        for s, p in enumerate(params):
            self.assertEqual(p.shape, (4, 2))
            self.assertEqual(p.dtype, np.float32)
            self.assertTrue(np.isfinite(p).all())
            self.assertTrue((p[:, 1] > 0).all(), (s, p))
            # ~4000 frames per class: close to the law that generated them.
            np.testing.assert_allclose(p[:, 1], slopes[s], rtol=0.3, err_msg=f"stage {s}")
            np.testing.assert_allclose(p[:, 0], intercepts[s], atol=0.6, err_msg=f"stage {s}")
        # A rule built on the fitted parameters accepts them as they are.
        ep.ExitRule(ep.Metric.LAYER_AWARE, (0.0, 0.0, 0.0), 0.9, metric_params=params)

    def test_slopes_negative_when_agreement_falls_with_margin(self):
        sims, full = self.logistic_data(8_000, seed=1, intercepts=(2.0,), slopes=(-8.0,))
        (p,) = ep.fit_layer_aware(sims, full)
        self.assertTrue((p[:, 1] < 0).all(), p)

    @staticmethod
    def pooled_params(sims, full):
        """The stage's pooled fit, computed as one class's own fit: the same
        margins and agreements, with every frame's top-1 moved to class 0."""
        top1, margin = ep.margins(sims)
        agree = top1 == full
        rng = np.random.default_rng(0)
        one_class = make_similarities(np.zeros(len(full), np.int64), margin, sims.shape[1], rng)
        (p,) = ep.fit_layer_aware([one_class], np.where(agree, 0, 1), min_frames=1)
        return p[0]

    def test_class_never_top1_gets_the_pooled_fit(self):
        rng = np.random.default_rng(2)
        n = 500
        full = rng.integers(0, 3, n)  # Class 3 is never anybody's answer.
        margin = rng.uniform(0, 0.5, n)
        agree = rng.random(n) < 0.3 + margin
        top1 = np.where(agree, full, (full + 1) % 3)
        sims = [make_similarities(top1, margin, 4, rng)]
        np.testing.assert_array_equal(ep.margins(sims[0])[0], top1)  # The set-up is right.
        fit = ep.layer_aware_fit(sims, full)
        (p,) = fit.params
        np.testing.assert_allclose(p[3], self.pooled_params(sims[0], full), rtol=1e-5)
        self.assertGreater(p[3, 1], 0)  # It exits on large margins, not never.
        self.assertEqual(fit.status[0], (ep.FitStatus.OWN,) * 3 + (ep.FitStatus.NO_FRAMES,))
        np.testing.assert_array_equal(fit.frames[0], np.bincount(top1, minlength=4))
        # The other classes keep their own, different fits.
        for c in range(3):
            self.assertFalse(np.allclose(p[c], p[3]), c)
        np.testing.assert_array_equal(ep.fit_layer_aware(sims, full)[0], p)

    def test_degenerate_classes_get_the_pooled_fit(self):
        rng = np.random.default_rng(4)
        n, k = 3000, 5
        full = rng.integers(0, k, n)
        margin = rng.uniform(0.0, 0.6, n)
        agree = rng.random(n) < 1.0 / (1.0 + np.exp(-(-1.0 + 8.0 * margin)))
        top1 = np.where(agree, full, (full + 1) % k)
        agree = top1 == full
        # Class 1: every frame with top-1 1 agrees; class 2: none does;
        # class 3: only 7 frames have it as top-1 (all agreeing, or the fit
        # would be its own with min_frames=1).
        top1[(top1 == 1) & ~agree] = 0
        top1[(top1 == 2) & agree] = 0
        few = np.flatnonzero(top1 == 3)
        top1[few[7:]] = 0
        agree = top1 == full
        sims = [make_similarities(top1, margin, k, rng)]
        fit = ep.layer_aware_fit(sims, full, min_frames=20)
        self.assertEqual(fit.status[0], (ep.FitStatus.OWN, ep.FitStatus.ALL_AGREE,
                                         ep.FitStatus.NONE_AGREE, ep.FitStatus.TOO_FEW,
                                         ep.FitStatus.OWN))
        self.assertEqual(fit.frames[0][3], 7)
        self.assertEqual(fit.min_frames, 20)
        pooled = self.pooled_params(sims[0], full)
        p = fit.params[0]
        for c in (1, 2, 3):
            np.testing.assert_allclose(p[c], pooled, rtol=1e-5, err_msg=str(c))
        self.assertFalse(np.allclose(p[0], pooled))
        # Their own fits run off with the degenerate data: far higher (all
        # agree) or lower (none agrees) scores than the pooled fit gives.
        own = {c: self.pooled_params(sims[0][top1 == c], full[top1 == c]) for c in (1, 2)}
        self.assertGreater(own[1][0] - pooled[0], 3.0)
        self.assertLess(own[2][0] - pooled[0], -3.0)

    def test_min_frames_must_be_positive(self):
        sims, full = [np.eye(3, dtype=np.float32)], np.arange(3)
        with self.assertRaisesRegex(ValueError, "min_frames must be >= 1, got 0"):
            ep.layer_aware_fit(sims, full, min_frames=0)

    def test_separable_and_constant_groups_stay_finite(self):
        rng = np.random.default_rng(3)
        n = 2000
        full = rng.integers(0, 4, n)
        margin = rng.uniform(0.01, 0.5, n)
        always = [make_similarities(full, margin, 4, rng)]
        separable = [make_similarities(np.where(margin > 0.2, full, (full + 1) % 4), margin, 4,
                                       rng)]
        for sims in (always, separable):
            (p,) = ep.fit_layer_aware(sims, full)
            self.assertTrue(np.isfinite(p).all())
            self.assertTrue((p[:, 1] > 0).all(), p)


class ExitReportTest(parameterized.TestCase):

    # Per class (intercept, slope) at stage 0 with threshold 0: class 0 exits
    # from margin 0.5, class 1 at any margin, class 2 would need margin 2.5,
    # class 3 has a falling score that starts below the threshold.
    PARAMS = (np.array([[-2.0, 4.0], [1.0, 0.0], [-10.0, 4.0], [-1.0, -1.0]], np.float32),
              np.zeros((4, 2), np.float32))

    def rule(self):
        return ep.ExitRule(ep.Metric.LAYER_AWARE, (0.0, None), 0.9, metric_params=self.PARAMS)

    def test_layer_aware_reachability(self):
        report = ep.exit_report(self.rule())
        self.assertIs(report.metric, ep.Metric.LAYER_AWARE)
        self.assertEqual(report.thresholds, (0.0, None))
        np.testing.assert_array_equal(report.can_exit(), [[True, True, False, False],
                                                          [False] * 4])
        stage0 = report.classes[0]
        self.assertEqual([r.min_margin for r in stage0], [0.5, 0.0, None, None])
        self.assertEqual([r.reason for r in stage0],
                         [None, None, ep.NoExit.UNREACHABLE, ep.NoExit.UNREACHABLE])
        self.assertEqual({r.reason for r in report.classes[1]}, {ep.NoExit.NO_THRESHOLD})
        self.assertEqual([(r.stage, r.class_index) for r in report.classes[1]],
                         [(1, c) for c in range(4)])
        self.assertIsNone(stage0[0].fit)  # No fit given: where the params come from is unknown.

    def test_agrees_with_simulate(self):
        # Frames of each class at its smallest exit margin (and just under it)
        # exit or not at stage 0 exactly as the report says.
        rule = self.rule()
        rng = np.random.default_rng(0)
        for row in ep.exit_report(rule).classes[0]:
            c = np.array([row.class_index])
            margins = [2.0] if row.min_margin is None else [row.min_margin + 1e-3,
                                                             row.min_margin - 1e-3]
            for m in margins:
                if m < 0:
                    continue
                sims = [make_similarities(c, np.array([m / 2]), 4, rng) * 2 - 1.0] * 2
                _, got = ep.margins(sims[0])
                self.assertAlmostEqual(float(got[0]), m, places=5)
                stage, _ = ep.simulate(rule, sims, np.array([0]))
                want = row.can_exit and m > row.min_margin
                self.assertEqual(stage[0] == 0, want, (row, m))

    @parameterized.named_parameters(
        ("margin_reachable", ep.Metric.MARGIN, 0.3, True, 0.3),
        ("margin_above_2", ep.Metric.MARGIN, 2.5, False, None),
        ("top1_reachable", ep.Metric.TOP1, 0.9, True, None),
        ("top1_above_1", ep.Metric.TOP1, 1.2, False, None),
    )
    def test_margin_and_top1(self, metric, threshold, can_exit, min_margin):
        report = ep.exit_report(ep.ExitRule(metric, (threshold, None), 0.9), num_classes=3)
        np.testing.assert_array_equal(report.can_exit(), [[can_exit] * 3, [False] * 3])
        self.assertEqual({r.min_margin for r in report.classes[0]}, {min_margin})
        self.assertEqual({r.reason for r in report.classes[0]},
                         {None if can_exit else ep.NoExit.UNREACHABLE})

    def test_cached_rule_reports_hot_or_cold_thresholds(self):
        rule = ep.ExitRule(ep.Metric.MARGIN, (0.2, 0.3), 0.9, cold_thresholds=(None, 2.5))
        self.assertEqual(ep.exit_report(rule, 2).thresholds, (0.2, 0.3))
        cold = ep.exit_report(rule, 2, hot=False)
        self.assertEqual(cold.thresholds, (None, 2.5))
        np.testing.assert_array_equal(cold.can_exit(), [[False, False], [False, False]])
        self.assertEqual(cold.classes[0][0].reason, ep.NoExit.NO_THRESHOLD)
        self.assertEqual(cold.classes[1][0].reason, ep.NoExit.UNREACHABLE)

    def test_report_marks_pooled_classes_and_classes_without_frames(self):
        rng = np.random.default_rng(8)
        n = 2000
        full = rng.integers(0, 3, n)  # Class 3 is never anybody's answer.
        sims = []
        for _ in range(3):
            margin = rng.uniform(0.0, 0.6, n)
            agree = rng.random(n) < 1.0 / (1.0 + np.exp(-(-1.0 + 8.0 * margin)))
            sims.append(make_similarities(np.where(agree, full, (full + 1) % 3), margin, 4,
                                          rng))
        fit = ep.layer_aware_fit(sims, full)
        rule = ep.ExitRule(ep.Metric.LAYER_AWARE, (1.0, 1.0, None), 0.9,
                           metric_params=fit.params)
        report = ep.exit_report(rule, fit=fit)
        row = report.classes[0][3]
        self.assertEqual((row.fit, row.frames), (ep.FitStatus.NO_FRAMES, 0))
        # With the pooled fit (about -1 + 8 m, as generated) it exits from a
        # margin near 0.25, as an average class would; with (0, 0) it never did.
        self.assertTrue(row.can_exit)
        self.assertAlmostEqual(row.min_margin, 0.25, delta=0.05)
        self.assertEqual([r.fit for r in report.classes[1]],
                         [ep.FitStatus.OWN] * 3 + [ep.FitStatus.NO_FRAMES])
        self.assertEqual([r.frames for r in report.classes[1]], list(fit.frames[1]))
        lines = ep.format_exit_report(report, ("cat", "dog", "cow", "owl"))
        self.assertIn("  pooled fit (no fitting frame had it as top-1): 'owl'", lines)
        self.assertEqual(lines[-1], "stage 2: no class can exit: no threshold, the stage "
                                    "never exits")

    def test_format(self):
        rule = ep.ExitRule(ep.Metric.LAYER_AWARE, (0.0, None), 0.9, metric_params=self.PARAMS)
        lines = ep.format_exit_report(ep.exit_report(rule), ("a", "b", "c", "d"))
        self.assertEqual(lines, [
            "stage 0 (layer_aware >= 0): 2 of 4 classes can exit, from margin 0.000 ('b') "
            "to 0.500 ('a')",
            "  cannot exit, its score stays below the threshold for every margin in [0, 2]: "
            "'c', 'd'",
            "stage 1: no class can exit: no threshold, the stage never exits"])
        margin = ep.exit_report(ep.ExitRule(ep.Metric.MARGIN, (2.5,), 0.9), num_classes=20)
        lines = ep.format_exit_report(margin, max_names=3)
        self.assertEqual(lines, [
            "stage 0 (margin >= 2.5): 0 of 20 classes can exit",
            "  cannot exit, the threshold is above 2, the largest margin: 0, 1, 2 and 17 more"])

    def test_invalid_arguments(self):
        with self.assertRaisesRegex(ValueError, "pass num_classes"):
            ep.exit_report(ep.ExitRule(ep.Metric.MARGIN, (0.1,), 0.9))
        sims, full = synthetic_cascade(500, seed=2, num_classes=4)
        fit = ep.layer_aware_fit(sims, full)
        with self.assertRaisesRegex(ValueError, "metric is margin"):
            ep.exit_report(ep.ExitRule(ep.Metric.MARGIN, (0.1,) * 3, 0.9), fit=fit)
        other = ep.ExitRule(ep.Metric.LAYER_AWARE, (0.1,) * 3, 0.9,
                            metric_params=tuple(p + 1 for p in fit.params))
        with self.assertRaisesRegex(ValueError, "not the fit"):
            ep.exit_report(other, fit=fit)


class CalibrateWithHotTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.sims, cls.full, cls.hot = hot_cascade(6000, seed=0)
        cls.rule = ep.calibrate(cls.sims, cls.full, COSTS, target_agreement=0.95, hot=cls.hot)

    def test_rule_has_cold_thresholds(self):
        rule = self.rule
        self.assertTrue(rule.uses_cache)
        self.assertLen(rule.cold_thresholds, 3)
        self.assertIs(rule.metric, ep.Metric.MARGIN)
        self.assertEqual(rule.target_agreement, 0.95)
        # Calibrated without hot flags: one threshold per stage, no cold ones.
        plain = ep.calibrate(self.sims, self.full, COSTS, target_agreement=0.95)
        self.assertFalse(plain.uses_cache)
        self.assertIsNone(plain.cold_thresholds)

    def test_hot_thresholds_not_above_cold_ones(self):
        rule = self.rule
        both_set = 0
        for s in range(3):
            h, c = rule.thresholds[s], rule.cold_thresholds[s]
            if h is not None and c is not None:
                both_set += 1
                self.assertLessEqual(h, c, s)
            # A stage where cold frames exit but hot ones never would be backwards.
            self.assertFalse(h is None and c is not None, s)
        self.assertGreater(both_set, 0)
        # Hot top-1 classes are more often right here: strictly lower somewhere.
        self.assertTrue(any(effective(h) < effective(c)
                            for h, c in zip(rule.thresholds, rule.cold_thresholds)))

    def test_meets_the_target_on_the_calibration_frames(self):
        self.assertGreaterEqual(agreement_bound(self.rule, self.sims, self.full, self.hot), 0.95)

    def test_target_holds_on_fresh_data(self):
        sims, full, hot = hot_cascade(100_000, seed=99)
        stage, pred = ep.simulate(self.rule, sims, full, hot)
        self.assertGreaterEqual(float((pred == full).mean()), 0.95 - 0.01)
        exited = stage < 3
        self.assertGreater(exited.mean(), 0.5)
        # Hot frames exit earlier than cold ones: the hot thresholds are used.
        self.assertGreater(exited[hot[0]].mean(), exited[~hot[0]].mean())
        self.assertLess(stage[hot[0]].mean(), stage[~hot[0]].mean())

    def test_hot_flags_change_decisions(self):
        hot_everywhere = [np.ones_like(h) for h in self.hot]
        cold_everywhere = [np.zeros_like(h) for h in self.hot]
        s_hot, _ = ep.simulate(self.rule, self.sims, self.full, hot_everywhere)
        s_none, _ = ep.simulate(self.rule, self.sims, self.full)  # None: all hot.
        s_cold, _ = ep.simulate(self.rule, self.sims, self.full, cold_everywhere)
        np.testing.assert_array_equal(s_hot, s_none)
        self.assertGreater(s_cold.mean(), s_hot.mean())


class CalibrateGlobalTest(parameterized.TestCase):

    @parameterized.named_parameters(("top1", ep.Metric.TOP1), ("margin", ep.Metric.MARGIN))
    def test_one_shared_threshold_meeting_the_target(self, metric):
        sims, full, _ = hot_cascade(3000, seed=4, hot_bonus=0.0)
        # Cumulative costs 0.2, 0.5, 0.99: the last stage saves too little to exit.
        costs = (0.2, 0.3, 0.49)
        target = 0.93
        rule = ep.calibrate_global(sims, full, costs, target, metric)
        self.assertIs(rule.metric, metric)
        self.assertIsNone(rule.cold_thresholds)
        self.assertEqual(rule.target_agreement, target)
        t = rule.thresholds[0]
        self.assertIsNotNone(t)
        self.assertEqual(rule.thresholds, (t, t, None))
        self.assertGreaterEqual(agreement_bound(rule, sims, full), target)
        # The lowest such threshold: the next lower observed score fails.
        values = np.unique(np.concatenate([v for _, v in ep.stage_scores(metric, sims)]))
        k = int(np.searchsorted(values, np.float32(t)))
        self.assertEqual(float(values[k]), t)
        self.assertGreater(k, 0)
        lower = ep.ExitRule(metric, (float(values[k - 1]),) * 2 + (None,), target)
        self.assertLess(agreement_bound(lower, sims, full), target)
        # ... and it exits a lot: it is not trivially safe.
        stage, _ = ep.simulate(rule, sims, full)
        self.assertGreater(float((stage < 3).mean()), 0.3)

    def test_unreachable_target_means_no_exits(self):
        sims, full, _ = hot_cascade(500, seed=5, hot_bonus=0.0)
        rule = ep.calibrate_global(sims, full, COSTS, 1.0)
        self.assertEqual(rule.thresholds, (None, None, None))

    def test_layer_aware_and_bad_targets_are_rejected(self):
        sims, full, _ = hot_cascade(100, seed=6)
        with self.assertRaisesRegex(ValueError, "global threshold is a baseline"):
            ep.calibrate_global(sims, full, COSTS, 0.9, ep.Metric.LAYER_AWARE)
        for target in (0.0, 1.5, -0.1):
            with self.assertRaisesRegex(ValueError, "target_agreement must be in"):
                ep.calibrate_global(sims, full, COSTS, target)


class BudgetToTargetTest(parameterized.TestCase):

    def test_values(self):
        self.assertEqual(ep.budget_to_target(1.0), 0.99)
        self.assertEqual(ep.budget_to_target(1), 0.99)
        self.assertAlmostEqual(ep.budget_to_target(0.5), 0.995, places=12)
        self.assertAlmostEqual(ep.budget_to_target(99.5), 0.005, places=12)
        # The result is a valid calibration target.
        self.assertEqual(ep.ExitRule(ep.Metric.MARGIN, (0.1,), ep.budget_to_target(2.5))
                         .target_agreement, 0.975)

    @parameterized.named_parameters(("zero", 0.0), ("hundred", 100.0), ("minus_one", -1.0),
                                    ("nan", math.nan), ("inf", math.inf), ("above", 150.0),
                                    ("string", "1"), ("none", None))
    def test_rejected(self, budget):
        with self.assertRaisesRegex(ValueError, r"max_accuracy_drop must be a number of points "
                                                r"in \(0, 100\)"):
            ep.budget_to_target(budget)


class FormatRuleTableTest(absltest.TestCase):

    @staticmethod
    def result(rule, budget, stream, shares, full_acc, smtm_acc, agreement, full_us, smtm_us):
        full = validation.RunStats("full", 100, full_acc, 1.0, full_us, full_us,
                                   (0.0,) * (len(shares) - 1) + (1.0,))
        smtm = validation.RunStats("smtm", 100, smtm_acc, agreement, smtm_us, smtm_us, shares)
        return rule_comparison.RuleResult(rule, budget, stream,
                                          validation.Comparison(full, smtm))

    def test_one_row_per_result_naming_each_rule(self):
        results = [
            self.result("layer-aware + cache", 1.0, "video", (0.5, 0.25, 0.125, 0.125),
                        0.9, 0.895, 0.99, 300.0, 150.0),
            self.result("margin global", 1.0, "uniform", (0.0, 0.25, 0.25, 0.5),
                        0.9, 0.89, 0.985, 300.0, 200.0),
            self.result("layer-aware", 0.5, "video", (0.25, 0.25, 0.25, 0.25),
                        0.9, 0.9, 0.995, 300.0, 240.0),
        ]
        lines = rule_comparison.format_rule_table(results, (0.25, 0.25, 0.25)).split("\n")
        self.assertLen(lines, 2 + len(results))
        self.assertIn("exits % s0 / s1 / s2 / head", lines[0])
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
        for row in rows:
            self.assertLen(row, 8)
        # Sorted by budget, then stream; every rule named in exactly one row.
        self.assertEqual([(r[0], r[1], r[2]) for r in rows],
                         [("0.5", "video", "layer-aware"),
                          ("1", "uniform", "margin global"),
                          ("1", "video", "layer-aware + cache")])
        # Compute speed-up from the exit shares and cumulative costs .25/.5/.75/1.
        self.assertEqual(rows[0][3:], ["25 / 25 / 25 / 25", "+0.00", "99.50%", "1.60x",
                                       "1.25x"])
        self.assertEqual(rows[1][3:], ["0 / 25 / 25 / 50", "+1.00", "98.50%", "1.23x",
                                       "1.50x"])
        self.assertEqual(rows[2][3:], ["50 / 25 / 12 / 12", "+0.50", "99.00%", "2.13x",
                                       "2.00x"])

    def test_compute_speedup(self):
        self.assertAlmostEqual(ep.compute_speedup((0, 0, 1.0), (0.3, 0.5)), 1.0)
        self.assertAlmostEqual(ep.compute_speedup((1.0, 0, 0), (0.25, 0.5)), 4.0)
        self.assertAlmostEqual(
            ep.compute_speedup((0.5, 0.5, 0.0), (0.2, 0.3)), 1 / 0.35)


if __name__ == "__main__":
    absltest.main()
