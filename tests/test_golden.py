"""The runtime's decisions, frame by frame, against the committed golden traces.

`tests/data/golden_traces.npz` was written by `scripts/golden_traces.py`; a
change that moves any frame's class or exit stage on the demo models fails
here (regenerate the file only for a deliberate change of behaviour, and say
so in the commit).
"""

import os

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest

from smtm_tf.evaluation import golden
from smtm_tf.runtime import SmtmRuntime
import testing_utils as tu

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACES = os.path.join(REPO, "tests", "data", "golden_traces.npz")


class GoldenTracesTest(parameterized.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        with np.load(TRACES) as f:
            cls.traces = {k: f[k] for k in f.files}

    def setUp(self):
        super().setUp()
        self.data = tu.fashion_mnist_or_skip(self)

    @parameterized.parameters(*golden.DEMO_MODELS)
    def test_same_class_and_exit_stage_on_every_frame(self, name):
        runtime = SmtmRuntime(golden.convert_demo(name, self.data,
                                                  os.path.join(REPO, "models")))
        got = golden.decision_traces(runtime, self.data, int(self.traces["frames"]),
                                     int(self.traces["seed"]))
        for kind, decisions in got.items():
            want = self.traces[f"{name}/{kind}"]
            differ = np.flatnonzero((decisions != want).any(axis=1))
            self.assertEqual(len(differ), 0,
                             f"{name} {kind}: {len(differ)} of {len(want)} frames differ, "
                             f"first at frame {differ[:1]}: {decisions[differ[:1]]} vs "
                             f"{want[differ[:1]]}")
            self.assertGreater(int((want[:, 1] < runtime.num_stages).sum()), 0)


if __name__ == "__main__":
    absltest.main()
