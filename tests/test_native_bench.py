"""Tests for reading the native runtime's `smtm_cli bench` beside the harness.

The real CLI runs in native/tests (ctest smtm_validate_native, on the golden
models); here a stand-in script prints what smtm_cli prints, or fails.
"""

import os
import stat
import tempfile

import numpy as np
from absl.testing import absltest

from smtm_tf.evaluation import native_bench

_OUTPUT = """frames 300
full_mean_us 798.3
smtm_mean_us 392.9
speedup 2.032
host_work_us 1.16
host_self_us 1.30
agreement_with_full 0.9767
exit_shares 0.430 0.193 0.023 0.143 0.113 0.000 0.097
"""


class NativeBenchTest(absltest.TestCase):

    def _cli(self, body: str) -> str:
        """An executable script standing in for smtm_cli."""
        path = os.path.join(self.create_tempdir().full_path, "smtm_cli")
        with open(path, "w") as f:
            f.write("#!/bin/sh\n" + body)
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
        return path

    def test_parses_every_figure(self):
        b = native_bench.parse(_OUTPUT)
        self.assertEqual(b.frames, 300)
        self.assertAlmostEqual(b.full_mean_us, 798.3)
        self.assertAlmostEqual(b.speedup, 2.032)
        self.assertAlmostEqual(b.host_work_us, 1.16)
        self.assertAlmostEqual(b.host_self_us, 1.30)
        self.assertLen(b.exit_shares, 7)
        self.assertAlmostEqual(sum(b.exit_shares), 0.999)

    def test_missing_figure_is_named(self):
        with self.assertRaisesRegex(native_bench.NativeBenchError, "host_work_us"):
            native_bench.parse(_OUTPUT.replace("host_work_us 1.16\n", ""))

    def test_non_number_is_an_error(self):
        with self.assertRaisesRegex(native_bench.NativeBenchError, "not a number"):
            native_bench.parse(_OUTPUT.replace("798.3", "fast"))

    def test_passes_the_frames_and_flags_and_cleans_up(self):
        # The stand-in fails unless the frames file exists and the flags came.
        cli = self._cli('for a in "$@"; do case "$a" in --frames=*) test -s "${a#--frames=}" '
                        '|| exit 3;; esac; done\n'
                        'case "$*" in "bench --model=m.tflite --frames="*" --warmup=7 --block=9 '
                        '--threads=2 --backend=gpu16") ;; *) echo "args $*" >&2; exit 4;; esac\n'
                        f'cat <<EOF\n{_OUTPUT}EOF\n')
        before = set(os.listdir(tempfile.gettempdir()))
        b = native_bench.bench(cli, "m.tflite", np.zeros((3, 4, 4, 1), np.float32),
                               warmup=7, block=9, threads=2, backend="gpu16")
        self.assertAlmostEqual(b.smtm_mean_us, 392.9)
        self.assertEqual(set(os.listdir(tempfile.gettempdir())) - before, set())

    def test_failing_cli_reports_its_message(self):
        cli = self._cli('echo "smtm_cli: descriptor version 9 is unknown" >&2\nexit 1\n')
        with self.assertRaisesRegex(native_bench.NativeBenchError,
                                    "exited with 1: smtm_cli: descriptor version 9"):
            native_bench.bench(cli, "m.tflite", np.zeros((1, 4, 4, 1), np.float32))

    def test_missing_cli_says_how_to_build_it(self):
        with self.assertRaisesRegex(native_bench.NativeBenchError, "cmake -S native"):
            native_bench.bench("/nonexistent/smtm_cli", "m.tflite",
                               np.zeros((1, 4, 4, 1), np.float32))


if __name__ == "__main__":
    absltest.main()
