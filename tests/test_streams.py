"""Tests for smtm_tf.fitting.streams: seeded frame streams with class statistics."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from smtm_tf.fitting import streams

NUM_CLASSES = 10
LABELS = np.repeat(np.arange(NUM_CLASSES), 100)
np.random.default_rng(0).shuffle(LABELS)

KINDS = (("uniform", "uniform"), ("zipf", "zipf"), ("video", "video"),
         ("camera", "camera"), ("camera_pan", "camera_pan"))


def _holds(s):
    """(start, end) of each run of one image (at one brightness) in a stream."""
    changed = s.indices[1:] != s.indices[:-1]
    if s.gain is not None:
        changed |= s.gain[1:] != s.gain[:-1]
    cuts = np.flatnonzero(changed) + 1
    edges = np.concatenate([[0], cuts, [len(s)]])
    return list(zip(edges[:-1], edges[1:]))


def _mean_distinct_per_window(labels, window=50):
    return np.mean([len(np.unique(labels[i:i + window]))
                    for i in range(0, len(labels) - window + 1, window)])


class StreamsTest(parameterized.TestCase):

    @parameterized.named_parameters(*KINDS)
    def test_reproducible_with_a_seed(self, kind):
        a = streams.make_stream(kind, LABELS, 500, seed=3)
        b = streams.make_stream(kind, LABELS, 500, seed=3)
        np.testing.assert_array_equal(a.indices, b.indices)
        self.assertEqual(a.kind, streams.StreamKind(kind))
        self.assertLen(a, 500)

    @parameterized.named_parameters(*KINDS)
    def test_differs_across_seeds(self, kind):
        a = streams.make_stream(kind, LABELS, 500, seed=3)
        b = streams.make_stream(kind, LABELS, 500, seed=4)
        self.assertGreater(np.mean(a.indices != b.indices), 0.5)

    @parameterized.named_parameters(*KINDS)
    def test_labels_are_those_of_the_indices(self, kind):
        s = streams.make_stream(kind, LABELS, 800, seed=1)
        self.assertEqual(s.indices.shape, (800,))
        self.assertTrue(np.all((s.indices >= 0) & (s.indices < len(LABELS))))
        np.testing.assert_array_equal(s.labels, LABELS[s.indices])

    def test_uniform_covers_all_classes_evenly(self):
        s = streams.uniform(LABELS, 20000, seed=0)
        shares = np.bincount(s.labels, minlength=NUM_CLASSES) / len(s)
        np.testing.assert_allclose(shares, 0.1, atol=0.015)

    def test_video_has_long_runs_of_few_classes(self):
        video = streams.video(LABELS, 3000, seed=0)
        uniform = streams.uniform(LABELS, 3000, seed=0)
        v = _mean_distinct_per_window(video.labels)
        u = _mean_distinct_per_window(uniform.labels)
        self.assertGreater(u, 9.0)  # 50 uniform frames over 10 classes: ~9.9 distinct.
        self.assertLess(v, 4.5)  # 1-3 hot classes per scene plus 5% passers-by.
        # Consecutive frames repeat the class far more often than by chance.
        self.assertGreater(np.mean(video.labels[1:] == video.labels[:-1]), 0.4)

    def test_video_single_hot_class(self):
        s = streams.video(LABELS, 2000, seed=1, hot_classes=(1, 1), scene_length=(100, 100),
                          background=0.0)
        for start in range(0, 2000, 100):
            self.assertLen(np.unique(s.labels[start:start + 100]), 1)

    def test_video_background(self):
        s = streams.video(LABELS, 4000, seed=2, hot_classes=(1, 1), scene_length=(200, 200),
                          background=0.2)
        off_scene = []
        for start in range(0, 4000, 200):
            scene = s.labels[start:start + 200]
            off_scene.append(np.mean(scene != np.bincount(scene).argmax()))
        # A passer-by draws any class, the scene's own included: 0.2 * 0.9.
        self.assertAlmostEqual(float(np.mean(off_scene)), 0.18, delta=0.03)

    def test_camera_holds_each_image_at_one_brightness(self):
        s = streams.make_stream("camera", LABELS, 3000, seed=2)
        # A new image comes with a new brightness (every hold draws its own).
        new_image = s.indices[1:] != s.indices[:-1]
        new_gain = s.gain[1:] != s.gain[:-1]
        np.testing.assert_array_equal(new_image, new_gain & new_image)
        lengths = np.array([e - b for b, e in _holds(s)])  # Scene ends cut some short.
        self.assertLessEqual(lengths.max(), 40)
        self.assertGreater(np.mean(lengths >= 5), 0.9)
        self.assertBetween(float(np.median(lengths)), 15, 30)
        self.assertTrue(np.all((s.gain >= 0.85) & (s.gain <= 1.15)))
        self.assertLessEqual(np.abs(s.shifts).max(), 1)  # Jitter only.
        self.assertAlmostEqual(s.noise, 4 / 255)
        # Scenes of 1-4 classes.
        bounds = list(s.scene_starts) + [len(s)]
        for b, e in zip(bounds[:-1], bounds[1:]):
            self.assertBetween(len(np.unique(s.labels[b:e])), 1, 4)

    def test_camera_pan_slides_each_held_object(self):
        s = streams.make_stream("camera_pan", LABELS, 3000, seed=2)
        self.assertAlmostEqual(s.noise, 8 / 255)
        self.assertLessEqual(np.abs(s.shifts).max(), 3)  # 2 px of panning + 1 of jitter.
        travelled = [np.abs(s.shifts[e - 1] - s.shifts[b]).max()
                     for b, e in _holds(s) if e - b >= 20]
        # Over a long hold the object crosses the 4 px of the pan, give or take the jitter.
        self.assertGreaterEqual(float(np.median(travelled)), 3)
        frames = s.render(np.full((len(LABELS), 8, 8, 1), 100.0, np.float32))
        self.assertEqual(frames.shape, (3000, 8, 8, 1))
        self.assertTrue(np.all((frames >= 0) & (frames <= 255)))

    def test_camera_rejects_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "hold"):
            streams.camera(LABELS, 100, hold=(0, 5))
        with self.assertRaisesRegex(ValueError, "gain_range"):
            streams.camera(LABELS, 100, gain_range=(1.2, 1.1))
        with self.assertRaisesRegex(ValueError, ">= 0"):
            streams.camera(LABELS, 100, pan=-1)

    def test_zipf_skew(self):
        s = streams.zipf(LABELS, 20000, exponent=1.2, seed=0)
        shares = np.sort(np.bincount(s.labels, minlength=NUM_CLASSES))[::-1] / len(s)
        p = np.arange(1, NUM_CLASSES + 1) ** -1.2
        np.testing.assert_allclose(shares, p / p.sum(), atol=0.01)
        self.assertGreater(shares[0], 3 * 1 / NUM_CLASSES)

    def test_zipf_exponent_zero_is_uniform(self):
        s = streams.zipf(LABELS, 20000, exponent=0.0, seed=0)
        shares = np.bincount(s.labels, minlength=NUM_CLASSES) / len(s)
        np.testing.assert_allclose(shares, 0.1, atol=0.015)

    def test_make_stream_passes_the_zipf_exponent(self):
        a = streams.make_stream("zipf", LABELS, 300, seed=5, zipf_exponent=2.0)
        b = streams.zipf(LABELS, 300, exponent=2.0, seed=5)
        np.testing.assert_array_equal(a.indices, b.indices)

    @parameterized.named_parameters(
        ("no_frames", lambda: streams.uniform(LABELS, 0), "at least one frame"),
        ("zipf_no_frames", lambda: streams.zipf(LABELS, -1), "at least one frame"),
        ("negative_exponent", lambda: streams.zipf(LABELS, 10, exponent=-1.0),
         "exponent must be >= 0"),
        ("hot_zero", lambda: streams.video(LABELS, 10, hot_classes=(0, 2)), "hot_classes"),
        ("hot_reversed", lambda: streams.video(LABELS, 10, hot_classes=(3, 2)), "hot_classes"),
        ("scene_zero", lambda: streams.video(LABELS, 10, scene_length=(0, 5)), "scene_length"),
        ("scene_reversed", lambda: streams.video(LABELS, 10, scene_length=(9, 5)),
         "scene_length"),
        ("background", lambda: streams.video(LABELS, 10, background=1.5), "background"),
        ("video_no_frames", lambda: streams.video(LABELS, 0), "at least one frame"),
        ("unknown_kind", lambda: streams.make_stream("random", LABELS, 10),
         r"Unknown stream 'random'; choose one of \['uniform', 'zipf', 'video', "
         r"'open_set', 'scene_change', 'drift', 'object', 'camera', 'camera_pan'\]"),
        ("outside", lambda: streams.video(LABELS, 10, outside=1.5), "outside"),
    )
    def test_invalid_arguments(self, make, pattern):
        with self.assertRaisesRegex(ValueError, pattern):
            make()


if __name__ == "__main__":
    absltest.main()
