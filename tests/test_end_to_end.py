"""End-to-end tests: train -> fit memory -> convert -> run, and the scripts.

Fashion-MNIST comes from the Debian package (dataset-fashion-mnist); the
tests that need it are skipped, with a message, when it is not installed, and
fail instead in CI (SMTM_REQUIRE_DATA=1).
Nothing is downloaded.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
import numpy as np
import pytest

from converters import smtm_converter
from smtm_tf.fitting import data as data_lib
from smtm_tf.fitting import memory as memory_lib
from smtm_tf.fitting import models
from smtm_tf.runtime import host as runtime
from smtm_tf.fitting import stages
from smtm_tf.fitting import streams
from smtm_tf.evaluation import validation
import testing_utils as tu

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_DIR = data_lib.DEBIAN_FASHION_MNIST_DIR


_fashion_mnist_or_skip = tu.fashion_mnist_or_skip


class FashionMnistEndToEndTest(absltest.TestCase):
    """A small ResNet-style demo model trained on 4000 Fashion-MNIST images."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp(prefix="smtm-e2e-")
        try:
            cls.data = data_lib.load_fashion_mnist(FASHION_DIR)
        except data_lib.DataError:
            cls.data = None
            return
        import tf_keras  # pylint: disable=import-outside-toplevel
        d = cls.data
        x_fit, y_fit = d.x_train[:4000], d.y_train[:4000]
        x_cal = d.x_train[4000:5500]
        tf_keras.utils.set_random_seed(0)
        cls.model = models.resnet_demo((28, 28, 1), 10, widths=(8, 16, 24, 32))
        cls.model.compile(optimizer=tf_keras.optimizers.Adam(3e-3),
                          loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        cls.model.fit(x_fit, y_fit, epochs=3, batch_size=64, verbose=0)
        cls.memory = memory_lib.fit_semantic_memory(
            cls.model, x_fit, x_cal, class_names=d.class_names, num_stages=4,
            embedding_dim=16, encoder_epochs=10, target_agreement=0.97)
        cls.path = os.path.join(cls.tmp, "fashion.smtm.tflite")
        _, cls.report = smtm_converter.convert(cls.model, cls.memory, d.x_test[:16],
                                               output_path=cls.path)
        cls.runtime = runtime.SmtmRuntime.from_file(cls.path)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def setUp(self):
        super().setUp()
        if self.data is None:
            _fashion_mnist_or_skip(self)

    def test_model_and_conversion(self):
        acc = float((self.model.predict(self.data.x_test[:2000], verbose=0).argmax(axis=1)
                     == self.data.y_test[:2000]).mean())
        self.assertGreater(acc, 0.7)  # A real classifier, not chance (0.1).
        # The plan is at least as even as ending the stages on the blocks' outputs.
        by_blocks = stages.plan_stages(
            self.model, cut_layers=("stage0_out", "stage1_out", "stage2_out", "stage3_out"))
        self.assertEqual(self.memory.plan.num_stages, 4)
        self.assertLessEqual(max(self.memory.plan.stage_costs),
                             max(by_blocks.stage_costs) + 1e-9)
        self.assertLessEqual(self.report.full_max_abs_diff, 1e-5)
        self.assertLessEqual(self.report.chain_max_abs_diff, 1e-5)
        self.assertLessEqual(self.report.similarity_max_abs_diff, 1e-4)
        self.assertEqual(os.listdir(self.tmp), ["fashion.smtm.tflite"])
        self.assertEqual(self.runtime.descriptor.class_names, data_lib.FASHION_MNIST_CLASSES)

    def test_repetitive_stream_exits_early_and_agrees_with_full(self):
        d = self.data
        stream = streams.video(d.y_test, 1000, seed=0, hot_classes=(1, 1))
        c = validation.compare(self.runtime, d.x_test[stream.indices], stream.labels)
        early = float(sum(c.smtm.exit_shares[:-2]))  # Stages before the last one.
        self.assertGreater(early, 0.15, c.smtm.exit_shares)
        self.assertGreaterEqual(c.smtm.agreement, 0.93)
        self.assertLessEqual(c.accuracy_drop, 4.0)
        self.assertAlmostEqual(sum(c.smtm.exit_shares), 1.0)

    def test_same_images_repeated_exit_early(self):
        # A camera looking at the same few trousers (the easiest class).
        d = self.data
        idx = np.flatnonzero(d.y_test == 1)[:10]
        frames = np.tile(d.x_test[idx], (30, 1, 1, 1))
        labels = np.tile(d.y_test[idx], 30)
        c = validation.compare(self.runtime, frames, labels, warmup=0, block=7)
        self.assertGreater(float(sum(c.smtm.exit_shares[:-2])), 0.5, c.smtm.exit_shares)
        self.assertGreaterEqual(c.smtm.agreement, 0.9)
        self.assertEqual(c.smtm.frames, 300)

    def test_runtime_full_matches_keras(self):
        x = self.data.x_test[:300]
        want = self.model.predict(x, verbose=0).argmax(axis=1)
        got = np.array([self.runtime.classify_full(f[None]) for f in x])
        self.assertGreaterEqual(float((got == want).mean()), 0.995)


def _run_script(name, *args, timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", name), *args],
                          cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


class ScriptsTest(absltest.TestCase):
    """scripts/convert.py and scripts/validate.py, run as a user would."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp(prefix="smtm-scripts-")
        x, y = tu.stripes(800, seed=50)
        xt, yt = tu.stripes(200, seed=51)
        cls.data_path = os.path.join(cls.tmp, "stripes.npz")
        np.savez(cls.data_path, x_train=x, y_train=y, x_test=xt, y_test=yt,
                 class_names=np.array(tu.CLASS_NAMES))
        cls.other_data_path = os.path.join(cls.tmp, "other_stripes.npz")
        xo, yo = tu.stripes(800, seed=52)
        np.savez(cls.other_data_path, x_train=xo, y_train=yo, x_test=xt, y_test=yt,
                 class_names=np.array(tu.CLASS_NAMES))
        cls.shuffled_data_path = os.path.join(cls.tmp, "shuffled_labels.npz")
        np.savez(cls.shuffled_data_path, x_train=x, y_train=(y + 1) % 4, x_test=xt,
                 y_test=(yt + 1) % 4, class_names=np.array(tu.CLASS_NAMES))
        cls.bad_data_path = os.path.join(cls.tmp, "no_y_test.npz")
        np.savez(cls.bad_data_path, x_train=x, y_train=y, x_test=xt)
        cls.model_path = os.path.join(cls.tmp, "model.keras")
        tu.trained_residual("tf_keras").save(cls.model_path)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def _assert_ok(self, proc):
        self.assertEqual(proc.returncode, 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")

    def test_convert_then_validate(self):
        out_dir = os.path.join(self.tmp, "out")
        out = os.path.join(out_dir, "model.smtm.tflite")
        memory_file = os.path.join(out_dir, "model.smtm.npz")
        before = sorted(os.listdir(self.tmp))
        proc = _run_script("convert.py", f"--model={self.model_path}",
                           f"--data={self.data_path}", f"--output={out}", "--num_stages=3",
                           "--embedding_dim=8", "--target_agreement=0.95")
        self._assert_ok(proc)
        self.assertIn("fitting the semantic memory on", proc.stdout)
        self.assertIn("Keras model's own top-1 accuracy on 200 labelled test images",
                      proc.stdout)
        self.assertIn("stages end at: r0, out1, r2", proc.stdout)
        self.assertIn(f"wrote {out}", proc.stdout)
        self.assertTrue(os.path.isfile(out))
        # The memory goes beside the output, never into the model's folder.
        self.assertEqual(sorted(os.listdir(out_dir)), ["model.smtm.npz", "model.smtm.tflite"])
        self.assertEqual(sorted(os.listdir(self.tmp)), sorted(before + ["out"]))
        with open(out, "rb") as f:
            d = runtime.read_descriptor(f.read())
        self.assertEqual(d.class_names, tu.CLASS_NAMES)
        self.assertEqual(d.exit_rule, memory_lib.SemanticMemory.load(memory_file).exit_rule)

        json_path = os.path.join(self.tmp, "figures.json")
        proc = _run_script("validate.py", f"--model={out}", f"--data={self.data_path}",
                           "--stream=video,uniform", "--frames=300",
                           f"--json_output={json_path}")
        self._assert_ok(proc)
        self.assertIn("speed-up", proc.stdout)
        self.assertIn("integrity: the whole file matches its SHA-256 record", proc.stdout)
        self.assertIn("| video | smtm | 300 |", proc.stdout)
        self.assertIn("| uniform | full | 300 |", proc.stdout)
        with open(json_path) as f:
            figures = json.load(f)
        self.assertEqual([r["stream"] for r in figures], ["video", "uniform"])
        for row in figures:
            self.assertGreater(row["smtm"]["agreement"], 0.8)

        # A second conversion reuses the memory file: its key matches.
        out2 = os.path.join(out_dir, "again.smtm.tflite")
        proc = _run_script("convert.py", f"--model={self.model_path}",
                           f"--data={self.data_path}", f"--output={out2}",
                           f"--memory={memory_file}", "--target_agreement=0.95")
        self._assert_ok(proc)
        self.assertIn(f"using the semantic memory {memory_file}", proc.stdout)
        with open(out2, "rb") as f:
            self.assertEqual(runtime.read_descriptor(f.read()), d)

        # Other data: the file's key does not match, so it is refitted, and says why.
        out3 = os.path.join(out_dir, "other.smtm.tflite")
        proc = _run_script("convert.py", f"--model={self.model_path}",
                           f"--data={self.other_data_path}", f"--output={out3}",
                           f"--memory={memory_file}", "--num_stages=3", "--embedding_dim=8",
                           "--target_agreement=0.95")
        self._assert_ok(proc)
        self.assertIn(f"not using the semantic memory {memory_file}: it was fitted on other "
                      "data", proc.stdout)
        self.assertIn("fitting the semantic memory on", proc.stdout)

    def test_failed_conversion_leaves_no_file(self):
        # Labels in another order: the model scores near chance, so the
        # conversion stops before fitting, and writes nothing anywhere.
        out_dir = os.path.join(self.tmp, "failed")
        os.makedirs(out_dir)
        before = sorted(os.listdir(self.tmp))
        proc = _run_script("convert.py", f"--model={self.model_path}",
                           f"--data={self.shuffled_data_path}",
                           f"--output={os.path.join(out_dir, 'm.smtm.tflite')}")
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertIn("near chance", proc.stderr)
        self.assertIn("--preprocessing", proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)
        self.assertEqual(os.listdir(out_dir), [])
        self.assertEqual(sorted(os.listdir(self.tmp)), before)

    def test_missing_data_file(self):
        missing = os.path.join(self.tmp, "absent.npz")
        out = os.path.join(self.tmp, "never.tflite")
        proc = _run_script("convert.py", f"--model={self.model_path}", f"--data={missing}",
                           f"--output={out}")
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn(f"--data={missing}: no such .npz file", proc.stderr)
        self.assertFalse(os.path.exists(out))

    def test_npz_without_y_test(self):
        out = os.path.join(self.tmp, "never2.tflite")
        proc = _run_script("convert.py", f"--model={self.model_path}",
                           f"--data={self.bad_data_path}", f"--output={out}")
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("lacks the arrays ['y_test']", proc.stderr)
        self.assertFalse(os.path.exists(out))

    def test_validate_rejects_a_plain_tflite(self):
        plain = os.path.join(self.tmp, "plain.tflite")
        with open(plain, "wb") as f:
            f.write(smtm_converter.convert_keras(tu.trained_residual("tf_keras")))
        proc = _run_script("validate.py", f"--model={plain}", f"--data={self.data_path}",
                           "--frames=10")
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("not one made by smtm_tf's converter", proc.stderr)


if __name__ == "__main__":
    absltest.main()
