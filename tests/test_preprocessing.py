"""Tests for smtm_tf.runtime.preprocessing and the pixel-adaptation rule in smtm_tf.fitting.data."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from smtm_tf.fitting import data as data_lib
from smtm_tf.runtime import preprocessing as prep
import testing_utils as tu


def _model(flavour, first_layer=None, channels=3):
    k = tu.keras_module(flavour)
    inputs = k.Input((8, 8, channels))
    x = inputs if first_layer is None else first_layer(k)(inputs)
    x = k.layers.Conv2D(4, 3)(x)
    x = k.layers.GlobalAveragePooling2D()(x)
    return k.Model(inputs, k.layers.Dense(3, activation="softmax")(x))


class PresetTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("raw", "raw", [0.0, 255.0]),
        ("unit", "unit", [0.0, 1.0]),
        ("symmetric", "symmetric", [-1.0, 1.0]),
    )
    def test_presets_map_the_pixel_range(self, name, want):
        p = prep.Preprocessing.preset(name, 3)
        got = p.apply(np.array([[0.0, 0.0, 0.0], [255.0, 255.0, 255.0]]))
        np.testing.assert_allclose(got[:, 0], want, atol=1e-6)

    def test_imagenet_is_per_channel_mean_and_std(self):
        p = prep.Preprocessing.preset("imagenet", 3)
        pixel = np.array([0.485, 0.456, 0.406]) * 255  # The mean: maps to 0.
        np.testing.assert_allclose(p.apply(pixel[None]), 0.0, atol=1e-5)
        one_std = (np.array(prep.IMAGENET_MEAN) + np.array(prep.IMAGENET_STD)) * 255
        np.testing.assert_allclose(p.apply(one_std[None]), 1.0, atol=1e-5)

    def test_imagenet_needs_rgb(self):
        with self.assertRaisesRegex(prep.PreprocessingError, "needs RGB input"):
            prep.Preprocessing.preset("imagenet", 1)

    def test_unknown_preset_names_the_choices(self):
        with self.assertRaisesRegex(prep.PreprocessingError, "raw.*unit.*symmetric.*imagenet"):
            prep.Preprocessing.preset("zero_one", 3)

    @parameterized.parameters("raw", "unit", "symmetric", "imagenet")
    def test_unapply_gives_back_the_pixels(self, name):
        p = prep.Preprocessing.preset(name, 3)
        pixels = np.random.default_rng(0).uniform(0, 255, (4, 5, 5, 3)).astype(np.float32)
        np.testing.assert_allclose(p.unapply(p.apply(pixels)), pixels, atol=2e-4)

    def test_dict_round_trip(self):
        p = prep.Preprocessing((0.5, 0.25, 2.0), (1.0, -1.0, 0.0), "flags")
        self.assertEqual(prep.Preprocessing.from_dict(p.to_dict()), p)


class ResolveTest(parameterized.TestCase):

    @parameterized.named_parameters(("keras", "keras"), ("tf_keras", "tf_keras"))
    def test_leading_rescaling_layer_means_pixels(self, flavour):
        model = _model(flavour, lambda k: k.layers.Rescaling(1 / 255.0, name="scale_in"))
        self.assertEqual(prep.leading_rescaling_layer(model), "scale_in")
        p = prep.resolve(model)
        self.assertTrue(p.is_identity)
        self.assertEqual(p.source, "model")
        with self.assertRaisesRegex(prep.PreprocessingError, "'scale_in' already rescales"):
            prep.resolve(model, "unit")
        with self.assertRaisesRegex(prep.PreprocessingError, "would rescale twice"):
            prep.resolve(model, scale=(0.5,))

    def test_normalization_layer_is_detected(self):
        model = _model("keras", lambda k: k.layers.Normalization(mean=0.0, variance=1.0,
                                                                 name="norm"))
        self.assertEqual(prep.leading_rescaling_layer(model), "norm")

    def test_a_rescaling_layer_deeper_in_does_not_count(self):
        k = tu.keras_module("keras")
        inputs = k.Input((8, 8, 3))
        x = k.layers.Conv2D(4, 3)(inputs)
        x = k.layers.Rescaling(2.0)(x)
        model = k.Model(inputs, k.layers.Dense(3)(k.layers.Flatten()(x)))
        self.assertIsNone(prep.leading_rescaling_layer(model))
        self.assertEqual(prep.resolve(model, "unit").source, "unit")

    def test_flags(self):
        model = _model("keras")
        self.assertEqual(prep.resolve(model).source, "raw")
        p = prep.resolve(model, scale=(1 / 255,), offset=(-0.5, -0.4, -0.3))
        np.testing.assert_allclose(p.apply(np.array([[255.0, 0.0, 255.0]])),
                                   [[0.5, -0.4, 0.7]], atol=1e-6)
        with self.assertRaisesRegex(prep.PreprocessingError, "not both"):
            prep.resolve(model, "unit", scale=(1.0,))
        with self.assertRaisesRegex(prep.PreprocessingError, "2 values for a model with 3"):
            prep.resolve(model, scale=(1.0, 2.0))
        with self.assertRaisesRegex(prep.PreprocessingError, "must not be 0"):
            prep.resolve(model, scale=(0.0,))


class AdaptImagesTest(absltest.TestCase):

    def test_pads_a_slightly_smaller_image_around_its_centre(self):
        x = np.ones((2, 28, 28, 1), np.float32) * 7
        out = data_lib.adapt_images(x, (32, 32), 3)
        self.assertEqual(out.shape, (2, 32, 32, 3))
        np.testing.assert_array_equal(out[:, 2:30, 2:30], 7)
        self.assertEqual(out[:, :2].sum() + out[:, 30:].sum(), 0)

    def test_resizes_a_much_smaller_image(self):
        x = np.random.default_rng(0).uniform(0, 255, (1, 8, 8, 3)).astype(np.float32)
        out = data_lib.adapt_images(x, (32, 32), 3)
        self.assertEqual(out.shape, (1, 32, 32, 3))
        self.assertAlmostEqual(float(out.mean()), float(x.mean()), delta=5.0)

    def test_rgb_to_grey_is_luma(self):
        x = np.zeros((1, 4, 4, 3), np.float32)
        x[..., 1] = 100.0
        out = data_lib.adapt_images(x, (4, 4), 1)
        np.testing.assert_allclose(out, 58.7, atol=1e-4)

    def test_unsupported_channels(self):
        with self.assertRaisesRegex(data_lib.DataError, "only 1 -> 3"):
            data_lib.adapt_images(np.zeros((1, 4, 4, 4)), (4, 4), 3)


if __name__ == "__main__":
    absltest.main()
