"""Tests for smtm_tf.evaluation.baselines: BranchyNet exits and GATI-style learned caches."""

import dataclasses
import functools

from absl.testing import absltest
import numpy as np

from converters import smtm_converter
from delegates import cpu
from smtm_tf.evaluation import baselines
from smtm_tf.fitting import encoders as enc
from smtm_tf.runtime import exit_policy
from smtm_tf.fitting import stages
import testing_utils as tu


@functools.cache
def trained_heads():
    x, y = tu.train_data()
    memory = tu.fitted_memory("tf_keras")
    return baselines.train_baselines(tu.trained_residual("tf_keras"), memory.plan, x, y,
                                     pooling=memory.pooling, epochs=5)


@functools.cache
def converted_with_baselines():
    return baselines.convert(tu.trained_residual("tf_keras"), tu.fitted_memory("tf_keras"),
                             trained_heads(), tu.check_images()[:4])


@functools.cache
def calibration_features():
    model, memory = tu.trained_residual("tf_keras"), tu.fitted_memory("tf_keras")
    stage_models, head = stages.split_model(model, memory.plan)
    return enc.extract_features(stage_models, head, tu.calibration_data()[0], memory.pooling)


class ConfidenceTest(absltest.TestCase):

    def test_branchynet_is_minus_entropy(self):
        p = np.array([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]],
                     np.float32)
        top1, value = baselines.confidence("branchynet", p)
        np.testing.assert_array_equal(top1, [0, 0, 0])
        np.testing.assert_allclose(value, [-np.log(4), 0.0, -np.log(2)], rtol=1e-6)

    def test_learned_cache_is_top_probability(self):
        p = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], np.float32)
        top1, value = baselines.confidence("learned_cache", p)
        np.testing.assert_array_equal(top1, [1, 0])
        np.testing.assert_allclose(value, [0.7, 0.5])

    def test_unknown_method(self):
        with self.assertRaises(ValueError):
            baselines.confidence("oracle", np.ones((1, 3)) / 3)


class HeadsTest(absltest.TestCase):

    def test_head_checks_shapes(self):
        with self.assertRaisesRegex(ValueError, "do not fit"):
            baselines.Head((np.zeros((4, 3), np.float32),), (np.zeros(2, np.float32),))
        with self.assertRaisesRegex(ValueError, "takes"):
            baselines.Head((np.zeros((4, 3), np.float32), np.zeros((5, 2), np.float32)),
                           (np.zeros(3, np.float32), np.zeros(2, np.float32)))

    def test_heads_per_stage_and_design(self):
        heads = trained_heads()
        memory = tu.fitted_memory("tf_keras")
        self.assertEqual(heads.cut_layers, memory.plan.cut_layers)
        for m in baselines.Method:
            self.assertLen(heads.heads[m], memory.plan.num_stages)
        # BranchyNet: one softmax layer; the learned cache: an MLP.
        self.assertTrue(all(len(h.kernels) == 1 for h in heads.heads["branchynet"]))
        self.assertTrue(all(len(h.kernels) == 2 for h in heads.heads["learned_cache"]))

    def test_learned_cache_learns_the_model(self):
        # Stripes are easy: the last stage's learned cache must reproduce the
        # full model nearly always (standardisation folded in correctly).
        agreement = trained_heads().stage_agreement[baselines.Method.LEARNED_CACHE]
        self.assertGreater(agreement[-1], 0.9)

    def test_save_load_round_trip(self):
        heads = trained_heads()
        path = self.create_tempfile("h.baselines.npz").full_path
        heads.save(path)
        back = baselines.BaselineHeads.load(path)
        self.assertEqual(back.cut_layers, heads.cut_layers)
        self.assertEqual(back.stage_agreement, heads.stage_agreement)
        for m in baselines.Method:
            for a, b in zip(heads.heads[m], back.heads[m]):
                for x, y in zip(a.kernels + a.biases, b.kernels + b.biases):
                    np.testing.assert_array_equal(x, y)

    def test_load_rejects_other_files(self):
        path = self.create_tempfile("bad.npz", content="not a zip").full_path
        with self.assertRaises(baselines.BaselineFileError):
            baselines.BaselineHeads.load(path)
        other = self.create_tempfile("other.npz").full_path
        with open(other, "wb") as f:
            np.savez(f, meta=np.array('{"format_version": 99}'))
        with self.assertRaisesRegex(baselines.BaselineFileError, "version"):
            baselines.BaselineHeads.load(other)

    def test_calibrated_rule_meets_target_on_calibration_frames(self):
        feats = calibration_features()
        costs = tu.fitted_memory("tf_keras").plan.stage_costs
        for m in baselines.Method:
            rule = baselines.calibrate(trained_heads(), m, feats.pooled, feats.predictions,
                                       costs, 0.95)
            tops = trained_heads().stage_tops(m, feats.pooled)
            exits, pred = exit_policy.simulate_scores(rule, tops, feats.predictions)
            self.assertGreaterEqual((pred == feats.predictions).mean(), 0.95)
            self.assertLess(exits.mean(), len(costs), m)  # Some frames exit early.


class ConvertAndRunTest(absltest.TestCase):

    def test_signatures_added(self):
        keys = cpu.CpuBackend().load(converted_with_baselines()).signature_keys
        for m in baselines.Method:
            for s in range(3):
                self.assertIn(baselines.signature_key(m, s), keys)
        for k in ("stage_0", "head", "full"):
            self.assertIn(k, keys)

    def test_rejects_heads_of_other_stages(self):
        heads = dataclasses.replace(trained_heads(), cut_layers=("c0", "out1", "r2"))
        with self.assertRaisesRegex(ValueError, "stages"):
            baselines.convert(tu.trained_residual("tf_keras"), tu.fitted_memory("tf_keras"),
                              heads, tu.check_images()[:2])

    def test_check_catches_wrong_heads(self):
        heads = trained_heads()
        m = baselines.Method.BRANCHY
        h0 = heads.heads[m][0]
        other = baselines.Head((-h0.kernels[0],), h0.biases)  # Softmax ignores a shared shift.
        wrong = dataclasses.replace(heads, heads={**heads.heads, m: (other,) + heads.heads[m][1:]})
        model, memory = tu.trained_residual("tf_keras"), tu.fitted_memory("tf_keras")
        stage_models, _ = stages.split_model(model, memory.plan)
        with self.assertRaises(smtm_converter.ConversionError):
            baselines.check_signatures(converted_with_baselines(), wrong, stage_models,
                                       tu.check_images()[:2])

    def test_runtime_decides_as_simulation(self):
        flat = converted_with_baselines()
        session = cpu.CpuBackend().load(flat)
        frames, _ = tu.stripes(150, seed=40)
        frames = frames.astype(np.float32)
        for m in baselines.Method:
            # Per-stage probabilities from the .tflite itself, then thresholds at
            # quantiles so frames exit at every stage and some run the head.
            probs = [[] for _ in range(3)]
            for f in frames:
                a = f[None]
                for s in range(3):
                    out = session.signature(baselines.signature_key(m, s))(activation=a)
                    probs[s].append(out["probabilities"])
                    a = out["next_activation"]
            tops = [baselines.confidence(m, np.stack(p)) for p in probs]
            thresholds = tuple(float(np.quantile(v, q)) for (_, v), q in
                               zip(tops, (0.8, 0.7, 0.6)))
            rule = exit_policy.ExitRule(exit_policy.Metric.MARGIN, thresholds, 0.9)
            full = np.array([session.signature("full")(image=f[None])["probabilities"].argmax()
                             for f in frames])
            want_exit, want_pred = exit_policy.simulate_scores(rule, tops, full)
            rt = baselines.BaselineRuntime(cpu.CpuBackend().load(flat), m, rule)
            got = np.array([rt.classify_fast(f[None]) for f in frames])
            np.testing.assert_array_equal(got[:, 1], want_exit)
            np.testing.assert_array_equal(got[:, 0], want_pred)
            counts = np.bincount(got[:, 1], minlength=4)
            self.assertTrue(np.all(counts > 0), counts)


if __name__ == "__main__":
    absltest.main()
