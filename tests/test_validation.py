"""Tests for the harness's stream measurements: host work, recovery, plots."""

import dataclasses
import os
import tempfile

import time

import numpy as np
from absl.testing import absltest

from smtm_tf.runtime import host as runtime
from smtm_tf.evaluation import validation
import testing_utils as tu


class _SlowHost:
    """A runtime whose every frame does 200 us more host work (a busy wait)."""

    def __init__(self, rt, seconds):
        self._rt, self._seconds = rt, seconds
        self.stage_invokes, self.head_invoke = rt.stage_invokes, rt.head_invoke

    def reset_cache(self):
        self._rt.reset_cache()

    def classify_fast(self, frame):
        end = time.perf_counter() + self._seconds
        while time.perf_counter() < end:
            pass
        return self._rt.classify_fast(frame)


class RecoveryFramesTest(absltest.TestCase):

    def test_counts_frames_until_the_window_reaches_the_level(self):
        # 100 frames all hits, a change at 100, misses on frames 100-104 and
        # hits after: the 10-frame window 103-112 is the first at 80%.
        hits = np.r_[np.ones(100), np.zeros(5), np.ones(95)].astype(bool)
        self.assertEqual(validation.recovery_frames(hits, [0, 100]), [13])

    def test_scene_without_recovery_counts_its_length(self):
        hits = np.r_[np.ones(100), np.zeros(30), np.ones(50)].astype(bool)
        self.assertEqual(validation.recovery_frames(hits, [0, 100, 130]), [30, 10])

    def test_scenes_without_enough_history_are_skipped(self):
        hits = np.ones(300, bool)
        self.assertEqual(validation.recovery_frames(hits, [0, 50, 200]), [10])

    def test_lower_level_recovers_sooner(self):
        hits = np.r_[np.ones(100), np.zeros(5), np.ones(95)].astype(bool)
        strict = validation.recovery_frames(hits, [0, 100], level=0.9)[0]
        loose = validation.recovery_frames(hits, [0, 100], level=0.5)[0]
        self.assertLess(loose, strict)


class SteadyShareTest(absltest.TestCase):

    def test_counts_each_scenes_most_frequent_answer(self):
        # Scene 0: 3 of 4 frames say 2; scene 1 (from frame 4): 2 of 2 say 5.
        predictions = [2, 2, 7, 2, 5, 5]
        self.assertAlmostEqual(validation.steady_share(predictions, [0, 4]), 5 / 6)

    def test_an_answer_that_never_changes_within_a_scene_is_steady(self):
        self.assertEqual(validation.steady_share([1, 1, 3, 3], [0, 2]), 1.0)
        # Without scene starts the whole stream is one scene.
        self.assertEqual(validation.steady_share([1, 1, 3, 3], []), 0.5)

    def test_no_frames(self):
        with self.assertRaisesRegex(ValueError, "no frames"):
            validation.steady_share([], [0])


class DisagreementsTest(absltest.TestCase):

    def test_splits_disagreements_by_who_was_right(self):
        labels = [0, 0, 0, 1, 1, 2, 2, 2]
        full = [0, 1, 1, 1, 0, 2, 0, 2]
        smtm = [0, 0, 0, 2, 1, 2, 1, 2]
        # Frames 1, 2 and 4: full wrong; frame 3: SMTM wrong; frame 6: both.
        d = validation.Disagreements.of(smtm, full, labels)
        self.assertEqual((d.full_wrong, d.smtm_wrong, d.both_wrong), (3 / 8, 1 / 8, 1 / 8))
        self.assertEqual(d.total, 5 / 8)
        self.assertIn("full wrong on 37.50%, SMTM wrong on 12.50%, both on 12.50%", d.format())

    def test_refuses_arrays_that_do_not_match(self):
        with self.assertRaisesRegex(ValueError, "as many predictions"):
            validation.Disagreements.of([0, 1], [0, 1], [0])
        with self.assertRaisesRegex(ValueError, "at least one"):
            validation.Disagreements.of([], [], [])


class HarnessMeasurementTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.flat, _ = tu.converted("tf_keras")
        cls.frames, cls.labels = tu.stripes(120, seed=31)

    def test_host_work_is_small_and_leaves_the_runtime_intact(self):
        rt = runtime.SmtmRuntime(self.flat)
        rt.reset_cache()
        before = [rt.classify_fast(f) for f in validation.model_frames(rt, self.frames)]
        host = validation.host_work_us(rt, self.frames[:40])
        self.assertTrue(np.isfinite(host))
        self.assertLess(host, 5000.0)
        rt.reset_cache()
        after = [rt.classify_fast(f) for f in validation.model_frames(rt, self.frames)]
        self.assertEqual(before, after)

    def test_host_work_grows_with_work_outside_the_models(self):
        rt = runtime.SmtmRuntime(self.flat)
        base = validation.host_work_us(rt, self.frames[:60])
        slow = _SlowHost(rt, seconds=200e-6)
        frames = validation.model_frames(rt, self.frames[:60])
        self.assertGreater(validation.host_work_us(slow, frames), base + 150.0)

    def test_compare_records_hits_and_latencies_and_plots(self):
        rt = runtime.SmtmRuntime(self.flat)
        c = validation.compare(rt, self.frames, self.labels, warmup=5, block=30)
        self.assertLen(c.hits, len(self.frames))
        self.assertEqual(c.smtm_us.shape, (len(self.frames),))
        self.assertTrue((c.full_us > 0).all())
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "stream.png")
            validation.plot_stream(path, c, [0, 60], "title")
            with open(path, "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
            self.assertEqual(os.listdir(d), ["stream.png"])

    def test_compare_marks_the_exits_checked_against_full(self):
        rt = runtime.SmtmRuntime(self.flat)
        # Check the exit after every two in a row.
        rt.memory.policy = dataclasses.replace(rt.memory.policy, verify_after=2)
        c = validation.compare(rt, self.frames, self.labels, warmup=5, block=30)
        self.assertEqual(c.checked.shape, (len(self.frames),))
        self.assertEqual(int(c.checked.sum()), rt.memory.checks)
        exits = round(len(self.frames) * (1.0 - c.smtm.exit_shares[-1]))
        self.assertGreaterEqual(exits, 3, "the fixture must exit often enough for a run")
        self.assertGreater(c.checked.sum(), 0)
        self.assertLessEqual(c.checked.sum(), exits // 3)

    def test_keep_state_starts_from_the_runtime_memory(self):
        rt = runtime.SmtmRuntime(self.flat)
        self.assertIsNotNone(rt.cache_policy, "the fixture's memory must have a cache")
        frames = validation.model_frames(rt, self.frames)
        for f in frames[:60]:
            rt.classify_fast(f)
        decay = rt.cache_policy.decay
        scores = rt.memory.scores.copy()
        self.assertTrue(scores.any())
        validation.compare(rt, self.frames[:1], self.labels[:1], warmup=0, keep_state=True)
        # One frame later the memory went on from where it was, not from empty:
        # every class but the answered one decayed once.
        kept = np.isclose(rt.memory.scores, decay * scores)
        self.assertGreaterEqual(kept.sum(), len(scores) - 1)


if __name__ == "__main__":
    absltest.main()
