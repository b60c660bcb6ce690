"""Tests for smtm_tf.runtime, delegates and smtm_tf.evaluation.validation."""

import hashlib
import json
import os

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from smtm_tf.runtime import metadata
from converters import smtm_converter
import delegates
from delegates import cpu
from smtm_tf.runtime import descriptor as desc
from smtm_tf.runtime import exit_policy
from smtm_tf.runtime import host as runtime
from smtm_tf.evaluation import validation
import testing_utils as tu


class RuntimeTest(parameterized.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model = tu.trained_residual("tf_keras")
        cls.memory = tu.exiting_memory("tf_keras")
        cls.flat, _ = tu.exiting_converted("tf_keras")
        cls.frames, cls.labels = tu.stripes(200, seed=30)

    def setUp(self):
        super().setUp()
        self.rt = runtime.SmtmRuntime(self.flat)

    def _run_all(self, rt):
        results = [rt.classify(f) for f in self.frames]
        return (np.array([r.class_id for r in results]),
                np.array([r.exit_stage for r in results]))

    def test_classify_agrees_with_simulate_on_its_own_similarities(self):
        rt = self.rt
        classes, exits = self._run_all(rt)
        sims = [rt.stage_similarities(f) for f in self.frames]
        per_stage = [np.stack([s[i] for s in sims]) for i in range(rt.num_stages)]
        full = np.array([rt.classify_full(f[None]) for f in self.frames])
        rule = rt.descriptor.exit_rule
        want_exits, want_classes = exit_policy.simulate(rule, per_stage, full)
        np.testing.assert_array_equal(exits, want_exits)
        np.testing.assert_array_equal(classes, want_classes)
        # The test means something only if every path is taken.
        counts = np.bincount(exits, minlength=rt.num_stages + 1)
        self.assertTrue(np.all(counts > 0), counts)

    def test_results_do_not_depend_on_call_history(self):
        rt = self.rt
        classes, exits = self._run_all(rt)
        for f in self.frames[:20]:
            rt.stage_similarities(f)
            rt.classify_full(f[None])
        classes2, exits2 = self._run_all(rt)
        np.testing.assert_array_equal(classes, classes2)
        np.testing.assert_array_equal(exits, exits2)
        # A fresh runtime gives the same answers.
        classes3, exits3 = self._run_all(runtime.SmtmRuntime(self.flat))
        np.testing.assert_array_equal(classes, classes3)
        np.testing.assert_array_equal(exits, exits3)

    def test_frame_shapes_and_classify_fast(self):
        rt = self.rt
        f = self.frames[3]
        a = rt.classify(f)
        b = rt.classify(f[None])
        c = rt.classify_fast(np.ascontiguousarray(f[None], np.float32))
        self.assertEqual(a, b)
        self.assertEqual((a.class_id, a.exit_stage), c)
        self.assertIsInstance(a.class_id, int)
        self.assertIsInstance(a.exit_stage, int)

    def test_full_matches_keras(self):
        want = self.model.predict(self.frames, verbose=0).argmax(axis=1)
        got = np.array([self.rt.classify_full(f[None]) for f in self.frames])
        np.testing.assert_array_equal(got, want)

    def test_centres_persist_between_invocations(self):
        rt = self.rt
        centres = [s.centres for s in rt.descriptor.stages]
        for f in self.frames[:10]:
            sims = rt.stage_similarities(f)
            self.assertLen(sims, rt.num_stages)
            for s in range(rt.num_stages):
                semantic = rt.session.signature(f"stage_{s}").output("semantic")
                self.assertAlmostEqual(float(np.linalg.norm(semantic)), 1.0, places=5)
                np.testing.assert_allclose(sims[s], centres[s] @ semantic, atol=1e-5)
                # Not trivially zero: unit vectors against unit centres.
                self.assertGreater(float(np.abs(sims[s]).max()), 0.1)

    def test_similarities_match_the_memory(self):
        sims_np, _ = tu.calibration_similarities("tf_keras")
        xc, _ = tu.calibration_data()
        for i in range(0, 40, 4):
            got = self.rt.stage_similarities(xc[i])
            for s in range(self.rt.num_stages):
                np.testing.assert_allclose(got[s], sims_np[s][i], atol=1e-4)

    def test_reference_kernels_give_the_same_similarities(self):
        reference = runtime.SmtmRuntime(self.flat, cpu.CpuBackend(use_xnnpack=False))
        for f in self.frames[:10]:
            for a, b in zip(self.rt.stage_similarities(f), reference.stage_similarities(f)):
                np.testing.assert_allclose(a, b, atol=1e-5)

    def test_from_file(self):
        path = self.create_tempfile("m.tflite", content=self.flat, mode="wb").full_path
        rt = runtime.SmtmRuntime.from_file(path)
        self.assertEqual(rt.descriptor, self.rt.descriptor)
        self.assertEqual(rt.classify(self.frames[0]), self.rt.classify(self.frames[0]))

    def test_plain_tflite_is_rejected(self):
        plain = smtm_converter.convert_keras(self.model)
        with self.assertRaises(runtime.ModelFileError) as cm:
            runtime.SmtmRuntime(plain)
        message = str(cm.exception)
        self.assertIn("not one made by smtm_tf's converter", message)
        self.assertIn("scripts/convert.py", message)

    @parameterized.named_parameters(("garbage", b"definitely not a flatbuffer"), ("empty", b""))
    def test_not_a_tflite(self, content):
        with self.assertRaisesRegex(runtime.ModelFileError, "Not a .tflite flatbuffer"):
            runtime.read_descriptor(content)

    def test_descriptor_naming_missing_signatures(self):
        d = runtime.read_descriptor(self.flat).to_dict()
        d["stages"][1]["signature"]["key"] = "stage_9"
        flat = metadata.add_digest(metadata.add_metadata(
            self.flat, desc.METADATA_NAME, json.dumps(d).encode()))
        with self.assertRaisesRegex(runtime.ModelFileError,
                                    r"^stages\[1\]\.signature: key 'stage_9'"):
            runtime.SmtmRuntime(flat)
        d = runtime.read_descriptor(self.flat).to_dict()
        d["head"]["key"] = "tail"
        flat = metadata.add_digest(metadata.add_metadata(
            self.flat, desc.METADATA_NAME, json.dumps(d).encode()))
        with self.assertRaisesRegex(runtime.ModelFileError, r"descriptor names .*'tail'"):
            runtime.SmtmRuntime(flat)

    def test_state_fingerprint_is_the_sha256_of_the_stored_descriptor(self):
        # Native runtimes compute it from the file alone, so states move between them.
        text = metadata.read_metadata(self.flat, desc.METADATA_NAME)
        path = os.path.join(self.create_tempdir().full_path, "state.npz")
        self.rt.save_state(path)
        with np.load(path) as f:
            meta = json.loads(str(f["meta"]))
        self.assertEqual(meta, {"format_version": 3, "model": hashlib.sha256(text).hexdigest()})
        self.assertEqual(runtime.STATE_FORMAT_VERSION, 3)
        # Another rule: the text, a newline and the rule and policy's canonical JSON.
        rule = exit_policy.ExitRule(exit_policy.Metric.MARGIN,
                                    (None,) * self.rt.num_stages, 0.99)
        self.rt.set_exit_rule(rule)
        canonical = json.dumps([rule.to_dict(), None], sort_keys=True, separators=(",", ":"))
        self.rt.save_state(path)
        with np.load(path) as f:
            meta = json.loads(str(f["meta"]))
        self.assertEqual(meta["model"],
                         hashlib.sha256(text + b"\n" + canonical.encode()).hexdigest())
        self.assertTrue(self.rt.load_state(path))
        # Back to the descriptor's own rule: the state of the other rule does not fit.
        self.rt.set_exit_rule(self.rt.descriptor.exit_rule, self.rt.descriptor.cache)
        with self.assertLogs(level="WARNING"):
            self.assertFalse(self.rt.load_state(path))

    def test_corrupted_descriptor(self):
        flat = metadata.add_digest(
            metadata.add_metadata(self.flat, desc.METADATA_NAME, b"{broken"))
        with self.assertRaisesRegex(desc.DescriptorError, "not valid JSON"):
            runtime.SmtmRuntime(flat)


class BackendTest(absltest.TestCase):

    def test_make_backend(self):
        backend = delegates.make_backend("cpu", num_threads=2)
        self.assertIsInstance(backend, cpu.CpuBackend)
        self.assertEqual(backend.num_threads, 2)
        with self.assertRaisesRegex(ValueError, r"Unknown backend 'tpu'; available: \['cpu', "):
            delegates.make_backend("tpu")
        with self.assertRaisesRegex(ValueError, "num_threads must be >= 1"):
            cpu.CpuBackend(num_threads=0)

    def test_session_signatures(self):
        flat, _ = tu.exiting_converted("tf_keras")
        session = cpu.CpuBackend().load(flat)
        self.assertEqual(set(session.signature_keys),
                         {"stage_0", "stage_1", "stage_2", "head", "full"})
        self.assertIs(session.signature("full"), session.signature("full"))
        with self.assertRaisesRegex(KeyError, "no signature 'nope'"):
            session.signature("nope")
        x = tu.check_images()[:1]
        out = session.signature("full")(image=x)
        want = tu.trained_residual("tf_keras").predict(x, verbose=0)[0]
        np.testing.assert_allclose(out["probabilities"], want, atol=1e-5)


class ValidationTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        flat, _ = tu.exiting_converted("tf_keras")
        cls.rt = runtime.SmtmRuntime(flat)
        cls.frames, cls.labels = tu.stripes(150, seed=31)

    def test_compare_counts_what_classify_does(self):
        c = validation.compare(self.rt, self.frames, self.labels, warmup=5, block=40)
        results = [self.rt.classify(f) for f in self.frames]
        exits = np.array([r.exit_stage for r in results])
        classes = np.array([r.class_id for r in results])
        full = np.array([self.rt.classify_full(f[None]) for f in self.frames])
        n = len(self.frames)
        np.testing.assert_allclose(
            c.smtm.exit_shares, np.bincount(exits, minlength=self.rt.num_stages + 1) / n)
        self.assertAlmostEqual(c.smtm.agreement, float((classes == full).mean()))
        self.assertAlmostEqual(c.smtm.accuracy, float((classes == self.labels).mean()))
        self.assertAlmostEqual(c.full.accuracy, float((full == self.labels).mean()))
        self.assertEqual(c.full.agreement, 1.0)
        self.assertEqual(c.full.exit_shares, (0.0, 0.0, 0.0, 1.0))
        self.assertEqual(c.smtm.frames, n)
        self.assertGreater(c.smtm.mean_us, 0)
        self.assertGreaterEqual(c.smtm.p95_us, 0)
        self.assertAlmostEqual(c.speedup, c.full.mean_us / c.smtm.mean_us)
        self.assertAlmostEqual(c.accuracy_drop, 100 * (c.full.accuracy - c.smtm.accuracy))
        self.assertEqual(c.smtm.to_dict()["method"], "smtm")
        # Every disagreement is split by who was right, and nothing else is.
        d = c.disagreements
        self.assertAlmostEqual(d.total, 1.0 - c.smtm.agreement)
        self.assertAlmostEqual(d.full_wrong - d.smtm_wrong, c.smtm.accuracy - c.full.accuracy)

    def test_format_table(self):
        c = validation.compare(self.rt, self.frames[:30], self.labels[:30], warmup=0)
        table = validation.format_table([("video", c), ("uniform", c)])
        lines = table.splitlines()
        self.assertLen(lines, 2 + 4)
        self.assertIn("speed-up", lines[0])
        self.assertIn("exit s0 | exit s1 | exit s2 | head", lines[0])
        columns = lines[0].count("|")
        for line in lines[1:]:
            self.assertEqual(line.count("|"), columns, line)
        self.assertTrue(lines[2].startswith("| video | full | 30 |"))
        self.assertTrue(lines[3].startswith("| video | smtm | 30 |"))
        self.assertIn("| 1.00x |", lines[2])

    def test_invalid_block(self):
        with self.assertRaisesRegex(ValueError, "block must be >= 1"):
            validation.compare(self.rt, self.frames[:2], self.labels[:2], block=0)


if __name__ == "__main__":
    absltest.main()
