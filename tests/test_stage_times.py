"""Tests for converters/stage_times.py (the figures; the timing itself runs in test_converter)."""

from absl.testing import absltest
import numpy as np

from converters import stage_times
from smtm_tf.fitting import stages as stages_lib


class StageTimesTest(absltest.TestCase):

    def test_shares_and_the_line_for_people(self):
        times = stage_times.StageTimes((10.0, 20.0), 30.0, 50.0)
        self.assertEqual(times.chain_us, 60.0)
        np.testing.assert_allclose(times.shares(), (1 / 6, 2 / 6, 3 / 6))
        line = times.format(stages_lib.StagePlan(("a", "b"), (0.2, 0.3), 0.5))
        self.assertIn("stage 0 10.0 us, stage 1 20.0 us, head 30.0 us", line)
        self.assertIn("shares 17/33/50% against multiply-adds 20/30/50%", line)
        self.assertIn("the whole chain 1.20x `full` (50.0 us)", line)
        self.assertNotIn("multiply-adds", times.format())

    def test_nothing_to_time_is_refused_before_loading(self):
        with self.assertRaisesRegex(ValueError, "rounds >= 1 and inputs"):
            stage_times.measure(b"not a model", np.zeros((0, 8, 8, 1), np.float32))
        with self.assertRaisesRegex(ValueError, "rounds >= 1"):
            stage_times.measure(b"not a model", np.zeros((1, 8, 8, 1), np.float32), rounds=0)


if __name__ == "__main__":
    absltest.main()
