"""Killed writers leave no partial file, and nothing that survives the next start.

A process saving runtime state in a loop, and `scripts/convert.py`, are
killed (SIGKILL) at random times. After each kill the file is either absent,
the previous complete one, or the new complete one; the temporaries a kill
leaves beside it (and a killed conversion's SavedModel folder) are removed
by the next start: `check_state_path` before a run, `convert_model` before
a conversion.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time

from absl.testing import absltest
import numpy as np
import pytest

from converters import old_runtime
from converters import smtm_converter
from delegates import temp_files
from smtm_tf.runtime import host
from smtm_tf.runtime import metadata
import testing_utils as tu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SAVER = """
import sys
import numpy as np
from converters import smtm_converter
from smtm_tf.runtime import host
model, frames, path = sys.argv[1:4]
rt = host.SmtmRuntime(open(model, "rb").read())
for f in np.load(frames):
    rt.classify_fast(f)
host.check_state_path(path)
n = 0
while True:
    rt.save_state(path)
    n += 1
    if n == 1:
        print("saving", flush=True)
"""


def _env(tmpdir):
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                TMPDIR=tmpdir, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")


@contextlib.contextmanager
def _temp_folder(tmpdir):
    """This process's temp folder is `tmpdir` inside the block."""
    with absltest.mock.patch.dict(os.environ, {"TMPDIR": tmpdir}):
        temp_files.tempfile.tempdir = None  # Read TMPDIR again.
        try:
            yield
        finally:
            temp_files.tempfile.tempdir = None


def _own_temporaries(directory):
    # TensorFlow's autograph leaves its generated modules in the temp folder
    # on every run, killed or not (and, where Python writes bytecode, as under
    # Bazel, their __pycache__): not this project's files.
    def autograph(name):
        return name.startswith("__autograph_generated_file")

    own = []
    for f in os.listdir(directory):
        path = os.path.join(directory, f)
        if f == "__pycache__" and os.path.isdir(path):
            own += [os.path.join(f, g) for g in os.listdir(path) if not autograph(g)]
        elif not autograph(f):
            own.append(f)
    return sorted(own)


def _temporaries(directory):
    return sorted(f for f in os.listdir(directory) if ".tmp-" in f)


@pytest.mark.slow
class KillTest(absltest.TestCase):

    def test_killed_state_saves(self):
        flat, _ = tu.exiting_converted("tf_keras")
        work = self.create_tempdir().full_path
        model = os.path.join(work, "m.tflite")
        with open(model, "wb") as f:
            f.write(flat)
        frames, _ = tu.stripes(30, seed=70)
        np.save(os.path.join(work, "frames.npy"), np.ascontiguousarray(frames[:, None]))
        state_dir = os.path.join(work, "state")
        path = os.path.join(state_dir, "s.npz")
        rng = np.random.default_rng(0)
        kills, orphaned = 20, 0
        for _ in range(kills):
            proc = subprocess.Popen([sys.executable, "-c", _SAVER, model,
                                     os.path.join(work, "frames.npy"), path],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    text=True, env=_env(work))
            self.assertEqual(proc.stdout.readline().strip(), "saving")
            time.sleep(float(rng.uniform(0.0, 0.05)))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
            self.assertEqual(proc.returncode, -signal.SIGKILL)
            # Never a partial state: the last complete save restores.
            self.assertTrue(host.SmtmRuntime(flat).load_state(path))
            orphaned += bool(_temporaries(state_dir))
            # The next start (here: the next saver's check_state_path) cleans up;
            # check it directly too.
        host.check_state_path(path)
        self.assertEqual(_temporaries(state_dir), [])
        self.assertEqual(os.listdir(state_dir), ["s.npz"])
        print(f"\n{kills} killed savers: {orphaned} left a temporary file, removed at the "
              "next start")
        # The kills did land inside saves, so the clean-up was exercised.
        self.assertGreater(orphaned, 0)

    def test_killed_conversions(self):
        work = self.create_tempdir().full_path
        sys_tmp = os.path.join(work, "sys_tmp")
        os.makedirs(sys_tmp)
        x, y = tu.stripes(600, seed=71)
        xt, yt = tu.stripes(150, seed=72)
        data = os.path.join(work, "stripes.npz")
        np.savez(data, x_train=x, y_train=y, x_test=xt, y_test=yt)
        keras_path = os.path.join(work, "model.keras")
        tu.trained_residual("tf_keras").save(keras_path)
        out_dir = os.path.join(work, "out")
        out = os.path.join(out_dir, "m.smtm.tflite")
        args = [sys.executable, os.path.join(REPO, "scripts", "convert.py"),
                f"--model={keras_path}", f"--data={data}", f"--output={out}",
                "--num_stages=3", "--embedding_dim=8", "--target_agreement=0.95",
                "--nogpu_gate", "--noprogress", "--retrain"]

        def check_outputs():
            # The output and the memory are absent or complete, never partial.
            if os.path.exists(out):
                with open(out, "rb") as f:
                    content = f.read()
                self.assertEqual(metadata.check_digest(content), "ok")
                host.SmtmRuntime(content)
            memory_file = smtm_converter.memory_path_for(out)
            if os.path.exists(memory_file):
                with np.load(memory_file) as z:
                    self.assertNotEmpty(z.files)

        start = time.monotonic()
        done = subprocess.run(args, env=_env(sys_tmp), capture_output=True, text=True,
                              timeout=600, check=False)
        duration = time.monotonic() - start
        self.assertEqual(done.returncode, 0, done.stderr)
        os.remove(out)
        rng = np.random.default_rng(1)
        left = 0
        # Three kills at random moments, two while a SavedModel folder exists
        # (the conversion's largest temporary; random moments rarely hit it).
        for fraction in (0.3, 0.6, 0.9, "savedmodel", "savedmodel"):
            proc = subprocess.Popen(args, env=_env(sys_tmp), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            if fraction == "savedmodel":
                deadline = time.monotonic() + 3 * duration
                while time.monotonic() < deadline and not any(
                        f.startswith(smtm_converter.SAVED_MODEL_PREFIX)
                        for f in os.listdir(sys_tmp)):
                    time.sleep(0.01)
            else:
                time.sleep(duration * float(fraction + rng.uniform(-0.05, 0.05)))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            check_outputs()
            left += len(_own_temporaries(sys_tmp)) + len(_temporaries(out_dir))
        done = subprocess.run(args, env=_env(sys_tmp), capture_output=True, text=True,
                              timeout=600, check=False)
        self.assertEqual(done.returncode, 0, done.stderr)
        check_outputs()
        self.assertEqual(_temporaries(out_dir), [])
        self.assertEqual(_own_temporaries(sys_tmp), [])
        print(f"\n5 killed conversions ({duration:.0f} s each in full) left {left} "
              "temporaries in all, none after the next start")
        self.assertGreater(left, 0)  # The clean-up was exercised.


class ModelFileTest(absltest.TestCase):
    """The .tflite files CompiledModel loads (GPU backend, agreement checks)."""

    def test_a_killed_process_model_file_is_removed_by_the_next_one(self):
        sys_tmp = self.create_tempdir().full_path
        writer = ("import os, signal\n"
                  "from delegates import temp_files\n"
                  "print(temp_files.model_file(b'model'), flush=True)\n"
                  "os.kill(os.getpid(), signal.SIGKILL)\n")
        done = subprocess.run([sys.executable, "-c", writer], env=_env(sys_tmp),
                              capture_output=True, text=True, timeout=120, check=False)
        self.assertEqual(done.returncode, -signal.SIGKILL, done.stderr)
        orphan = done.stdout.strip()
        self.assertTrue(os.path.isfile(orphan))
        with _temp_folder(sys_tmp):
            mine = temp_files.model_file(b"model")
            self.assertFalse(os.path.exists(orphan))
            self.assertTrue(os.path.isfile(mine))  # This process's own stays.
            self.assertEqual(temp_files.remove_orphans(temp_files.MODEL_FILE_PREFIX), [])
            os.remove(mine)


class ConversionLeftoversTest(absltest.TestCase):
    """Folders a conversion keeps in the temp folder while it runs."""

    def test_a_killed_process_folders_are_removed_at_the_next_start(self):
        sys_tmp = self.create_tempdir().full_path
        prefixes = [smtm_converter.SAVED_MODEL_PREFIX, old_runtime.TEMP_PREFIX]
        # Enters each folder as the conversion does, then dies inside them.
        killed = ("import os, signal, contextlib\n"
                  "from delegates import temp_files\n"
                  "with contextlib.ExitStack() as stack:\n"
                  f"    for prefix in {prefixes!r}:\n"
                  "        print(stack.enter_context(temp_files.process_temp_dir(prefix)),\n"
                  "              flush=True)\n"
                  "    os.kill(os.getpid(), signal.SIGKILL)\n")
        done = subprocess.run([sys.executable, "-c", killed], env=_env(sys_tmp),
                              capture_output=True, text=True, timeout=120, check=False)
        self.assertEqual(done.returncode, -signal.SIGKILL, done.stderr)
        orphans = done.stdout.split()
        self.assertLen(orphans, 2)
        self.assertTrue(all(os.path.isdir(o) for o in orphans))
        with _temp_folder(sys_tmp):
            smtm_converter.remove_leftovers()
        self.assertEqual([o for o in orphans if os.path.exists(o)], [])


if __name__ == "__main__":
    absltest.main()
