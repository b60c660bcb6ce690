"""Tests for smtm_tf.fitting.data: LabelledData, .npz files, image folders, Fashion-MNIST."""

import gzip
import os
import struct

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from smtm_tf.fitting import data as data_lib
import testing_utils as tu


def _arrays(n_train=6, n_test=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return dict(x_train=rng.integers(0, 256, (n_train, 5, 5)).astype(np.uint8),
                y_train=np.arange(n_train) % classes,
                x_test=rng.integers(0, 256, (n_test, 5, 5)).astype(np.uint8),
                y_test=np.arange(n_test) % classes)


class LabelledDataTest(parameterized.TestCase):

    def _make(self, **overrides):
        kwargs = dict(x_train=np.zeros((4, 2, 2, 1), np.float32), y_train=np.array([0, 1, 0, 1]),
                      x_test=np.zeros((2, 2, 2, 1), np.float32), y_test=np.array([1, 0]),
                      class_names=("a", "b"))
        kwargs.update(overrides)
        return data_lib.LabelledData(**kwargs)

    def test_valid(self):
        d = self._make()
        self.assertEqual(d.num_classes, 2)

    def test_images_must_be_4d(self):
        with self.assertRaisesRegex(data_lib.DataError, r"x_train must be \[N, H, W, C\]"):
            self._make(x_train=np.zeros((4, 2, 2), np.float32))

    def test_one_label_per_image(self):
        with self.assertRaisesRegex(data_lib.DataError, "y_test must hold one label per image"):
            self._make(y_test=np.array([0, 1, 1]))

    @parameterized.named_parameters(("too_big", 2), ("negative", -1))
    def test_labels_in_range(self, bad):
        with self.assertRaisesRegex(data_lib.DataError, r"y_train has labels outside 0..1"):
            self._make(y_train=np.array([0, 1, bad, 1]))

    def test_holdout(self):
        x = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
        d = self._make(x_train=x, y_train=np.arange(10) % 2)
        (xf, yf), (xh, yh) = d.holdout(0.3)
        np.testing.assert_array_equal(xf.ravel(), np.arange(7))
        np.testing.assert_array_equal(xh.ravel(), [7, 8, 9])
        np.testing.assert_array_equal(yh, [1, 0, 1])
        self.assertLen(yf, 7)
        for bad in (0.0, 1.0, -0.5):
            with self.assertRaisesRegex(data_lib.DataError, "holdout fraction"):
                d.holdout(bad)


class NpzTest(parameterized.TestCase):

    def _save(self, **arrays):
        path = os.path.join(self.create_tempdir().full_path, "data.npz")
        np.savez(path, **arrays)
        return path

    def test_load(self):
        arrays = _arrays()
        path = self._save(**arrays)
        d = data_lib.load_npz(path)
        # Grey images without a channel axis get one; values are kept.
        self.assertEqual(d.x_train.shape, (6, 5, 5, 1))
        self.assertEqual(d.x_train.dtype, np.float32)
        np.testing.assert_array_equal(d.x_test[..., 0], arrays["x_test"].astype(np.float32))
        self.assertEqual(d.y_train.dtype, np.int64)
        self.assertEqual(d.class_names, ("0", "1", "2"))

    def test_class_names_and_column_labels(self):
        arrays = _arrays()
        arrays["y_train"] = arrays["y_train"][:, None]  # [N, 1] labels are flattened.
        arrays["class_names"] = np.array(["cat", "dog", "owl", "emu"])
        d = data_lib.load_npz(self._save(**arrays))
        self.assertEqual(d.class_names, ("cat", "dog", "owl", "emu"))
        self.assertEqual(d.y_train.shape, (6,))

    @parameterized.named_parameters(("y_test", ["y_test"]), ("two", ["x_train", "y_train"]))
    def test_missing_arrays(self, missing):
        arrays = {k: v for k, v in _arrays().items() if k not in missing}
        path = self._save(**arrays)
        with self.assertRaises(data_lib.DataError) as cm:
            data_lib.load_npz(path)
        message = str(cm.exception)
        self.assertIn(f"lacks the arrays {missing}", message)
        self.assertIn("x_train, y_train, x_test and y_test", message)

    def test_not_an_npz(self):
        path = self.create_tempfile("data.npz", content="hello").full_path
        with self.assertRaisesRegex(data_lib.DataError, "Cannot read .* as a .npz file"):
            data_lib.load_npz(path)

    def test_missing_file(self):
        path = os.path.join(self.create_tempdir().full_path, "absent.npz")
        with self.assertRaisesRegex(data_lib.DataError, "Cannot read"):
            data_lib.load_npz(path)
        with self.assertRaisesRegex(data_lib.DataError, "no such .npz file"):
            data_lib.load_data(path)

    @parameterized.named_parameters(("nan", np.nan), ("inf", np.inf), ("minus_inf", -np.inf))
    def test_non_finite_pixels_are_refused(self, value):
        arrays = _arrays()
        x = arrays["x_test"].astype(np.float32)
        x[1, 2, 3] = value
        path = self._save(**dict(arrays, x_test=x))
        with self.assertRaisesRegex(data_lib.DataError, r"data\.npz: x_test holds non-finite "
                                    r"pixels \(NaN or Inf\) in 1 image, the first at index 1"):
            data_lib.load_npz(path)

    @parameterized.named_parameters(("fraction", 0.5), ("nan", np.nan))
    def test_labels_must_be_whole_numbers(self, offset):
        arrays = _arrays()
        path = self._save(**dict(arrays, y_train=arrays["y_train"] + offset))
        with self.assertRaisesRegex(data_lib.DataError,
                                    "y_train must hold whole-number class indices"):
            data_lib.load_npz(path)
        # Whole numbers stored as floats are labels.
        path = self._save(**dict(arrays, y_train=arrays["y_train"].astype(np.float32)))
        self.assertEqual(data_lib.load_npz(path).y_train.dtype, np.int64)

    def test_load_data_dispatch(self):
        path = self._save(**_arrays())
        self.assertEqual(data_lib.load_data(path).x_train.shape, (6, 5, 5, 1))
        with self.assertRaisesRegex(data_lib.DataError, "is neither 'fashion_mnist'"):
            data_lib.load_data("no_such_thing")


class ImageFolderTest(absltest.TestCase):

    def _folder(self, classes=("cats", "dogs"), per_class=5, size=(6, 7)):
        root = self.create_tempdir().full_path
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(root, name))
            for i in range(per_class):
                value = 40 + 100 * c  # Every pixel of a class has one value.
                image = np.full(size + (3,), value, np.uint8)
                image[0, 0] = i  # Images differ.
                png = tf.io.encode_png(image).numpy()
                with open(os.path.join(root, name, f"{i}.png"), "wb") as f:
                    f.write(png)
        return root

    def test_load(self):
        root = self._folder()
        d = data_lib.load_image_folder(root, image_size=(6, 7))
        self.assertEqual(d.class_names, ("cats", "dogs"))
        self.assertEqual(d.x_train.shape[1:], (6, 7, 3))
        self.assertEqual(len(d.x_train) + len(d.x_test), 10)
        # test_fraction 0.2 of 5 images per class: one test image per class.
        np.testing.assert_array_equal(np.sort(d.y_test), [0, 1])
        self.assertEqual(np.bincount(d.y_train).tolist(), [4, 4])
        # Labels follow the folders: the pixels tell which folder an image came from.
        for x, y in ((d.x_train, d.y_train), (d.x_test, d.y_test)):
            np.testing.assert_array_equal(x[:, 3, 3, 0], 40 + 100 * y)
        self.assertEqual(d.x_train.dtype, np.float32)

    def test_load_data_with_grey_channels(self):
        root = self._folder(classes=("a", "b", "c"), per_class=3)
        d = data_lib.load_data(root, image_size=(6, 7), channels=1)
        self.assertEqual(d.class_names, ("a", "b", "c"))
        self.assertEqual(d.x_train.shape[1:], (6, 7, 1))

    def test_folder_images_follow_the_one_adaptation_rule(self):
        # 6x7 images into 7x8: within the padding limit, so padded, as
        # Fashion-MNIST's 28x28 is into 32x32 (a resize would blur the border).
        root = self._folder()
        d = data_lib.load_image_folder(root, image_size=(7, 8), channels=3)
        self.assertEqual(d.x_train.shape[1:], (7, 8, 3))
        np.testing.assert_array_equal(d.x_train[:, -1], 0.0)
        np.testing.assert_array_equal(d.x_train[:, 3, 3, 0], 40 + 100 * d.y_train)

    def test_a_corrupt_image_is_named(self):
        root = self._folder()
        bad = os.path.join(root, "dogs", "broken.png")
        with open(bad, "wb") as f:
            f.write(b"not a png")
        with self.assertRaisesRegex(data_lib.DataError, f"{bad} is not a readable image"):
            data_lib.load_image_folder(root, image_size=(6, 7))

    def test_an_empty_class_folder_is_named(self):
        root = self._folder()
        os.makedirs(os.path.join(root, "owls"))
        with open(os.path.join(root, "owls", "notes.txt"), "w") as f:
            f.write("no images here")
        with self.assertRaisesRegex(data_lib.DataError,
                                    f"The class folder {root}/owls holds no images"):
            data_lib.load_image_folder(root, image_size=(6, 7))

    def test_a_folder_named_like_an_image_is_named(self):
        root = self._folder()
        bad = os.path.join(root, "dogs", "folder.png")
        os.makedirs(bad)
        with self.assertRaisesRegex(data_lib.DataError, f"{bad} is not a readable image"):
            data_lib.load_image_folder(root, image_size=(6, 7))

    def test_seeded_split(self):
        root = self._folder(per_class=10)
        a = data_lib.load_image_folder(root, image_size=(6, 7), seed=1)
        b = data_lib.load_image_folder(root, image_size=(6, 7), seed=1)
        np.testing.assert_array_equal(a.x_test, b.x_test)

    def test_errors(self):
        root = self._folder()
        with self.assertRaisesRegex(data_lib.DataError, "needs the model's input size"):
            data_lib.load_image_folder(root)
        one = self.create_tempdir().full_path
        os.makedirs(os.path.join(one, "only"))
        with self.assertRaisesRegex(data_lib.DataError, r"at least 2\); found \['only'\]"):
            data_lib.load_image_folder(one, image_size=(6, 7))


class FashionMnistTest(absltest.TestCase):

    def _write_idx(self, path, array, magic_type=0x08, truncate=0):
        header = bytes([0, 0, magic_type, array.ndim]) + struct.pack(
            f">{array.ndim}I", *array.shape)
        body = array.astype(np.uint8).tobytes()
        with gzip.open(path, "wb") as f:
            f.write(header + body[:len(body) - truncate])

    def _fake_dir(self, **kwargs):
        root = self.create_tempdir().full_path
        rng = np.random.default_rng(0)
        for name, shape in (("train-images-idx3-ubyte.gz", (6, 28, 28)),
                            ("train-labels-idx1-ubyte.gz", (6,)),
                            ("t10k-images-idx3-ubyte.gz", (4, 28, 28)),
                            ("t10k-labels-idx1-ubyte.gz", (4,))):
            array = rng.integers(0, 10 if len(shape) == 1 else 256, shape)
            extra = kwargs if name.startswith("t10k-images") else {}
            self._write_idx(os.path.join(root, name), array, **extra)
        return root

    def test_from_a_directory(self):
        d = data_lib.load_fashion_mnist(self._fake_dir())
        self.assertEqual(d.x_train.shape, (6, 28, 28, 1))
        self.assertEqual(d.x_test.shape, (4, 28, 28, 1))
        self.assertEqual(d.class_names, data_lib.FASHION_MNIST_CLASSES)

    def test_bad_idx_files(self):
        with self.assertRaisesRegex(data_lib.DataError, "not an unsigned-byte IDX file"):
            data_lib.load_fashion_mnist(self._fake_dir(magic_type=0x0D))
        with self.assertRaisesRegex(data_lib.DataError, "is truncated"):
            data_lib.load_fashion_mnist(self._fake_dir(truncate=10))

    def test_empty_directory_names_the_install_command(self):
        # An explicit directory never falls back to a download.
        with self.assertRaisesRegex(data_lib.DataError,
                                    "No Fashion-MNIST IDX files.*apt-get install "
                                    "dataset-fashion-mnist"):
            data_lib.load_fashion_mnist(self.create_tempdir().full_path)

    def test_debian_package(self):
        directory = data_lib.DEBIAN_FASHION_MNIST_DIR
        if not os.path.isfile(os.path.join(directory, "t10k-labels-idx1-ubyte.gz")):
            tu.skip_or_fail(self, "SMTM_REQUIRE_DATA",
                            f"Fashion-MNIST is not installed in {directory} "
                            "(apt-get install dataset-fashion-mnist)")
        d = data_lib.load_fashion_mnist()  # Finds the Debian files first.
        self.assertEqual(d.x_train.shape, (60000, 28, 28, 1))
        self.assertEqual(d.x_test.shape, (10000, 28, 28, 1))
        self.assertEqual(d.x_train.dtype, np.float32)
        self.assertEqual(float(d.x_train.min()), 0.0)
        self.assertEqual(float(d.x_train.max()), 255.0)
        self.assertEqual(np.bincount(d.y_train).tolist(), [6000] * 10)
        self.assertEqual(np.bincount(d.y_test).tolist(), [1000] * 10)
        self.assertEqual(d.num_classes, 10)


if __name__ == "__main__":
    absltest.main()
