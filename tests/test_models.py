"""Tests for smtm_tf.fitting.models (demo models, saving) and smtm_tf.fitting.kerascompat."""

import os
import zipfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from smtm_tf.fitting import kerascompat
from smtm_tf.fitting import models
from smtm_tf.fitting import stages
import testing_utils as tu

FLAVOURS = (("keras3", "keras"), ("tf_keras", "tf_keras"))


class KerasCompatTest(parameterized.TestCase):

    @parameterized.named_parameters(*FLAVOURS)
    def test_flavour_and_graph_models(self, flavour):
        k = tu.keras_module(flavour)
        functional = tu.residual_cnn(k)
        self.assertEqual(kerascompat.flavour_of(functional), flavour)
        self.assertIs(kerascompat.keras_of(functional), k)
        self.assertTrue(kerascompat.is_graph_model(functional))
        self.assertTrue(kerascompat.is_graph_model(tu.sequential_cnn(k)))

        class Sub(k.Model):

            def call(self, x):
                return x

        self.assertFalse(kerascompat.is_graph_model(Sub()))

    def test_not_keras(self):
        self.assertIsNone(kerascompat.flavour_of(object()))
        with self.assertRaisesRegex(TypeError, "not a Keras 3 or tf_keras model"):
            kerascompat.keras_of("model")

    @parameterized.named_parameters(*FLAVOURS)
    def test_load_model_keeps_the_flavour(self, flavour):
        k = tu.keras_module(flavour)
        k.utils.set_random_seed(3)
        model = tu.residual_cnn(k)
        path = os.path.join(self.create_tempdir().full_path, "m.keras")
        model.save(path)
        loaded = kerascompat.load_model(path)
        self.assertEqual(kerascompat.flavour_of(loaded), flavour)
        x = tu.check_images()[:3]
        np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), atol=1e-6)

    def test_files_that_are_no_keras_model_are_named(self):
        d = self.create_tempdir().full_path
        text = os.path.join(d, "text.keras")
        with open(text, "w") as f:
            f.write("not a model")
        archive = os.path.join(d, "other.keras")
        with zipfile.ZipFile(archive, "w") as z:
            z.writestr("readme.txt", "hello")
        h5 = os.path.join(d, "text.h5")
        with open(h5, "w") as f:
            f.write("not HDF5")
        for path, pattern in (
                (text, r"text\.keras is not a Keras model: a \.keras file is a zip archive"),
                (archive, r"other\.keras is a zip archive but not a Keras model: it holds no "
                          r"config\.json"),
                (h5, r"text\.h5 is not a Keras model: a \.h5 file is an HDF5 file"),
                (os.path.join(d, "m.onnx"), r"No such model file: .*m\.onnx")):
            with self.assertRaisesRegex(ValueError, pattern):
                kerascompat.load_model(path)
        pt = os.path.join(d, "model.pt")
        with open(pt, "wb") as f:
            f.write(b"\0" * 16)
        with self.assertRaisesRegex(ValueError, r"model\.pt is not a Keras model file: pass a "
                                    r"\.keras or \.h5 file"):
            kerascompat.load_model(pt)

    def test_load_model_error_names_both_loaders(self):
        # Looks like a Keras archive, but neither Keras reads it.
        path = os.path.join(self.create_tempdir().full_path, "bad.keras")
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("config.json", "{}")
        with self.assertRaises(ValueError) as cm:
            kerascompat.load_model(path)
        message = str(cm.exception)
        self.assertIn(f"Cannot load {path} as a Keras model", message)
        self.assertIn("tf_keras", message)
        self.assertIn("keras", message.replace("tf_keras", ""))


class ResnetDemoTest(parameterized.TestCase):

    @parameterized.named_parameters(*FLAVOURS)
    def test_stage_outputs_are_the_cut_points(self, flavour):
        model = models.resnet_demo((16, 16, 1), num_classes=5, widths=(4, 8, 8, 16),
                                   keras=tu.keras_module(flavour))
        self.assertEqual(kerascompat.flavour_of(model), flavour)
        self.assertEqual(tuple(model.outputs[0].shape[1:]), (5,))
        names = [c.layer for c in stages.find_cut_points(model)]
        for i in range(4):
            self.assertIn(f"stage{i}_out", names)
            # Inside a block the shortcut is live: never a cut point.
            for inner in (f"stage{i}_a_relu", f"stage{i}_b_conv", f"stage{i}_b_bn"):
                self.assertNotIn(inner, names)
        plan = stages.plan_stages(model, cut_layers=[f"stage{i}_out" for i in range(4)])
        stage_models, head = stages.split_model(model, plan)
        self.assertEqual(tuple(stage_models[3].outputs[0].shape[1:]), (2, 2, 16))
        x = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 1)).astype(np.float32)
        self.assertLessEqual(stages.check_chain(model, stage_models, head, x), 1e-5)
        # Raw pixels in: the model rescales them itself, outputs are probabilities.
        np.testing.assert_allclose(np.asarray(model(x)).sum(axis=1), 1.0, atol=1e-5)

    def test_default_flavour_is_tf_keras(self):
        model = models.resnet_demo((8, 8, 1), num_classes=2, widths=(2, 2, 2, 2))
        self.assertEqual(kerascompat.flavour_of(model), "tf_keras")


class SaveModelAtomicTest(parameterized.TestCase):

    @parameterized.named_parameters(*FLAVOURS)
    def test_save_keras_file(self, flavour):
        # scripts/train_demo_model.py saves the (tf_keras by default) demo
        # model this way, to a .keras path.
        k = tu.keras_module(flavour)
        model = tu.residual_cnn(k)
        directory = self.create_tempdir().full_path
        path = os.path.join(directory, "m.keras")
        models.save_model_atomic(model, path)
        self.assertEqual(os.listdir(directory), ["m.keras"])
        loaded = kerascompat.load_model(path)
        x = tu.check_images()[:2]
        np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), atol=1e-6)

    def test_save_h5_file(self):
        model = tu.residual_cnn(tu.keras_module("tf_keras"))
        directory = self.create_tempdir().full_path
        path = os.path.join(directory, "m.h5")
        models.save_model_atomic(model, path)
        self.assertEqual(os.listdir(directory), ["m.h5"])
        x = tu.check_images()[:2]
        np.testing.assert_allclose(np.asarray(kerascompat.load_model(path)(x)),
                                   np.asarray(model(x)), atol=1e-6)


class ShiftAugmentTest(absltest.TestCase):

    def test_shifts_are_translations_with_zero_fill(self):
        rng = np.random.default_rng(0)
        images = rng.uniform(1, 2, (16, 8, 8, 1)).astype(np.float32)
        shifted = np.asarray(models.shift_augment(images, max_shift=2, seed=1))
        self.assertEqual(shifted.shape, images.shape)
        moved = 0
        for original, out in zip(images, shifted):
            padded = np.pad(original, ((2, 2), (2, 2), (0, 0)))
            matches = [(dy, dx) for dy in range(5) for dx in range(5)
                       if np.array_equal(padded[dy:dy + 8, dx:dx + 8], out)]
            self.assertLen(matches, 1)
            moved += matches[0] != (2, 2)
        self.assertGreater(moved, 8)  # 24 of 25 offsets move the image.


if __name__ == "__main__":
    absltest.main()
