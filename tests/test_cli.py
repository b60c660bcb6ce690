"""The command lines on bad input: one line, no traceback, no native logs, exit 1.

Each case runs a script as a user would (a subprocess, no TF_CPP_MIN_LOG_LEVEL
set) and checks that stderr is a single `error: ...` line naming what is
wrong, that nothing of TensorFlow's or LiteRT's own logging shows, and that
no output file is left.
"""

from concurrent import futures
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
import numpy as np

from converters import old_runtime
from converters import smtm_converter
from smtm_tf.fitting import data as data_lib
from smtm_tf.fitting import progress
from smtm_tf.runtime import descriptor as desc
from smtm_tf.runtime import metadata
import testing_utils as tu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What TensorFlow's, absl's C++ and LiteRT's logging print (glog-style lines,
# the absl pre-init notice, LiteRT's "INFO: ..." lines).
NATIVE_LOG = re.compile(r"^(?:[IWEF]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before "
                        r"absl|INFO: |VERBOSE: |.*oneDNN custom operations)", re.MULTILINE)


def run_script(name, *args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", name), *args],
                          cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _write_png(path, image):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tf.io.write_file(path, tf.io.encode_png(np.asarray(image, np.uint8)))


class CommandLineErrorTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp(prefix="smtm-cli-")
        t = lambda *p: os.path.join(cls.tmp, *p)  # noqa: E731
        model = t("model.keras")
        tu.trained_residual("tf_keras").save(model)
        x, y = tu.stripes(200, seed=60)
        xt, yt = tu.stripes(60, seed=61)
        np.savez(t("labels_4_to_7.npz"), x_train=x, y_train=y + 4, x_test=xt, y_test=yt + 4)
        np.savez(t("one_class.npz"), x_train=x, y_train=0 * y, x_test=xt, y_test=0 * yt)
        np.savez(t("fractional.npz"), x_train=x, y_train=y + 0.5, x_test=xt, y_test=yt)
        with open(t("text.keras"), "w") as f:
            f.write("not a model\n")
        pixels = (np.clip(x[:6, ..., 0], 0, 1) * 255).astype(np.uint8)[..., None]
        for folder, classes in (("empty_class", ("a", "b")), ("corrupt", ("a", "b"))):
            for c in classes:
                os.makedirs(t(folder, c))
            for i in range(3):
                _write_png(t(folder, "a", f"{i}.png"), pixels[i])
        for i in range(3):
            _write_png(t("corrupt", "b", f"{i}.png"), pixels[3 + i])
        with open(t("corrupt", "b", "1.png"), "r+b") as f:
            f.seek(30)
            f.write(b"\0" * 40)
        flat, _ = tu.exiting_converted("tf_keras")
        with open(t("random.tflite"), "wb") as f:
            f.write(np.random.default_rng(0).bytes(3000))
        damaged = bytearray(flat)
        raw = flat.index(metadata.read_metadata(flat, desc.METADATA_NAME))
        damaged[raw + 40] ^= 0x04
        with open(t("damaged.tflite"), "wb") as f:
            f.write(bytes(damaged))
        out = t("out", "m.smtm.tflite")
        convert = lambda data, m=model: ("convert.py", f"--model={m}",  # noqa: E731
                                         f"--data={data}", f"--output={out}")
        cls.out = out
        cls.cases = {
            "text_keras": (convert(t("labels_4_to_7.npz"), t("text.keras")),
                           r"text\.keras is not a Keras model: a \.keras file is a zip"),
            "missing_model": (convert(t("one_class.npz"), t("absent.keras")),
                              r"No such model file: .*absent\.keras"),
            "labels_out_of_range": (convert(t("labels_4_to_7.npz")),
                                    r"The data has 8 classes but the model outputs 4"),
            "one_class": (convert(t("one_class.npz")), r"images of 1 class: .* at least 2"),
            "fractional_labels": (convert(t("fractional.npz")),
                                  r"y_train must hold whole-number class indices"),
            "empty_class_folder": (convert(t("empty_class")),
                                   r"The class folder .*empty_class/b holds no images"),
            "corrupt_png": (convert(t("corrupt")), r"corrupt/b/1\.png is not a readable image"),
            "random_tflite": (("validate.py", f"--model={t('random.tflite')}",
                               "--frames=10"), r"Not a \.tflite flatbuffer"),
            "damaged_tflite": (("validate.py", f"--model={t('damaged.tflite')}",
                                "--frames=10"), r"The model file is damaged"),
            "missing_tflite": (("validate.py", f"--model={t('absent.tflite')}"),
                               r"No such file or directory: .*absent\.tflite"),
            "old_runtime_python_missing": (
                ("check_old_runtime.py", f"--old_runtime_python={t('no-venv', 'bin', 'python')}",
                 t("random.tflite")), r"No old-runtime Python at .*no-venv/bin/python\. "
                r"Create one with: .* --old_runtime_python=VENV/bin/python"),
            "old_runtime_model_missing": (
                ("check_old_runtime.py", t("absent.tflite")),
                r"No such model file: .*absent\.tflite"),
            "state_is_a_directory": (("validate.py", f"--model={t('damaged.tflite')}",
                                      f"--state={cls.tmp}"), r"is a directory"),
        }
        # Loads the model, so TensorFlow starts (and logs) before the error.
        cls.debug_case = convert(t("labels_4_to_7.npz")) + ("--debug",)
        with futures.ThreadPoolExecutor(2) as pool:
            runs = {name: pool.submit(run_script, *args) for name, (args, _) in
                    cls.cases.items()}
            debug = pool.submit(run_script, *cls.debug_case)
            cls.results = {name: r.result() for name, r in runs.items()}
            cls.debug = debug.result()

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def test_each_bad_input_is_one_line_and_exit_1(self):
        for name, (_, pattern) in self.cases.items():
            with self.subTest(name):
                proc = self.results[name]
                text = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
                self.assertEqual(proc.returncode, 1, text)
                lines = proc.stderr.strip().splitlines()
                self.assertLen(lines, 1, text)
                self.assertTrue(lines[0].startswith("error: "), text)
                self.assertRegex(lines[0], pattern)
                self.assertNotRegex(proc.stdout + proc.stderr, NATIVE_LOG)
        self.assertFalse(os.path.exists(os.path.dirname(self.out))
                         and os.listdir(os.path.dirname(self.out)))

    def test_debug_shows_the_traceback_and_the_native_logs(self):
        # The other cases' checks could fail: without the quieting these show.
        self.assertNotEqual(self.debug.returncode, 0)
        self.assertIn("Traceback (most recent call last)", self.debug.stderr)
        self.assertIn("DataMismatchError: ", self.debug.stderr)
        self.assertRegex(self.debug.stderr, NATIVE_LOG)


class RunTest(absltest.TestCase):
    """`command_line.run` on what a main can raise, in a subprocess (flags are global)."""

    def _run(self, body, *args):
        code = ("from scripts import command_line\n"
                "def main(argv):\n"
                f"    {body}\n"
                "command_line.run(main)\n")
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120, check=False)

    def test_ctrl_c_is_one_line_and_exit_130(self):
        proc = self._run("raise KeyboardInterrupt")
        self.assertEqual((proc.returncode, proc.stderr), (130, "interrupted\n"))
        proc = self._run("raise KeyboardInterrupt", "--debug")
        self.assertIn("Traceback", proc.stderr)

    def test_an_unexpected_error_names_its_type(self):
        proc = self._run("raise TypeError('bad\\nthing')")
        self.assertEqual(proc.returncode, 1)
        self.assertEqual(proc.stderr,
                         "error: TypeError: bad thing (--debug shows the traceback)\n")

    def test_a_usage_error_is_one_line_not_the_usage_text(self):
        body = "from absl import app; raise app.UsageError('--a and --b exclude each other.')"
        proc = self._run(body)
        self.assertEqual(proc.returncode, 1)
        self.assertEqual(proc.stderr, "error: --a and --b exclude each other. "
                                      "(--helpshort lists the flags)\n")

    def test_tensorflows_interpreter_deprecation_is_not_shown(self):
        # What TensorFlow's int8 calibration warns on every conversion.
        warn = ("import warnings; warnings.warn('    Warning: tf.lite.Interpreter is "
                "deprecated and is scheduled for deletion', UserWarning)")
        proc = self._run(warn)
        self.assertEqual((proc.returncode, proc.stderr), (0, ""))
        proc = self._run(warn, "--debug")
        self.assertIn("tf.lite.Interpreter is deprecated", proc.stderr)

    def test_the_projects_own_errors_print_their_message(self):
        proc = self._run("from converters import old_runtime; "
                         "raise old_runtime.OldRuntimeUnavailable('no venv')")
        self.assertEqual((proc.returncode, proc.stderr), (1, "error: no venv\n"))


class _Terminal(io.StringIO):
    def isatty(self):
        return True


class ProgressTest(absltest.TestCase):
    """Bars show when a command line turns them on and stderr is a terminal."""

    def tearDown(self):
        progress.enable(False)
        super().tearDown()

    def _shown(self, enabled, stream):
        progress.enable(enabled)
        with mock.patch.object(sys, "stderr", stream):
            self.assertEqual(list(progress.bar(range(3), desc="steps")), [0, 1, 2])
        return stream.getvalue()

    def test_on_a_terminal(self):
        self.assertIn("steps", self._shown(True, _Terminal()))

    def test_off_by_default_and_off_a_terminal(self):
        self.assertEqual(self._shown(False, _Terminal()), "")
        self.assertEqual(self._shown(True, io.StringIO()), "")


class OldRuntimePythonTest(absltest.TestCase):
    """Which Python runs the tflite-runtime 2.14 check: the flag's, else the
    environment variable's, else the checkout's .venv-tflite214."""

    def _fake_python(self, name):
        # Answers the probe (`-c "import tflite_runtime.interpreter"`) with success.
        path = os.path.join(self.create_tempdir().full_path, name)
        with open(path, "w") as f:
            f.write("#!/bin/sh\nexit 0\n")
        os.chmod(path, 0o755)
        return path

    def test_the_flag_wins_over_the_environment(self):
        flag, env = self._fake_python("flag_python"), self._fake_python("env_python")
        with mock.patch.dict(os.environ, {old_runtime.ENV_VAR: env}):
            self.assertEqual(old_runtime.find_python(flag), flag)
            self.assertEqual(old_runtime.find_python(), env)
            self.assertEqual(old_runtime.find_python(None), env)

    def test_without_flag_or_environment_the_checkout_venv(self):
        with mock.patch.dict(os.environ):
            os.environ.pop(old_runtime.ENV_VAR, None)
            try:
                self.assertEqual(old_runtime.find_python(), old_runtime.DEFAULT_PYTHON)
            except old_runtime.OldRuntimeUnavailable as e:
                self.assertIn(old_runtime.DEFAULT_PYTHON, str(e))

    def test_a_python_without_the_runtime_is_named(self):
        with self.assertRaisesRegex(old_runtime.OldRuntimeUnavailable,
                                    f"{sys.executable} cannot import tflite_runtime"):
            old_runtime.find_python(sys.executable)


class ConversionInputTest(absltest.TestCase):
    """The same checks through the library, with a memory given (no fitting)."""

    def test_one_class_is_refused_with_a_reused_memory(self):
        model = tu.trained_residual("tf_keras")
        memory = tu.fitted_memory("tf_keras")
        x, y = tu.stripes(100, seed=62)
        data = data_lib.LabelledData(x, 0 * y, x[:20], 0 * y[:20], tu.CLASS_NAMES)
        out = os.path.join(self.create_tempdir().full_path, "m.tflite")
        with self.assertRaisesRegex(smtm_converter.DataMismatchError, "at least 2 classes"):
            smtm_converter.convert_model(model, data, out, memory=memory, gpu_check=False,
                                         old_runtime_check=False, accuracy_check=False)
        self.assertFalse(os.path.exists(out))

    def test_labels_beyond_the_model_are_refused_with_a_reused_memory(self):
        model = tu.trained_residual("tf_keras")
        x, y = tu.stripes(100, seed=63)
        names = tu.CLASS_NAMES + ("e", "f")
        data = data_lib.LabelledData(x, y + 2, x[:20], y[:20] + 2, names)
        with self.assertRaisesRegex(smtm_converter.DataMismatchError,
                                    "The data has 6 classes but the model outputs 4"):
            smtm_converter.convert_model(model, data, None, memory=tu.fitted_memory("tf_keras"),
                                         gpu_check=False, old_runtime_check=False)


if __name__ == "__main__":
    absltest.main()
