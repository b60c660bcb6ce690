"""Labelled image data: the built-in Fashion-MNIST, `.npz` files and image folders."""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct

import numpy as np

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Where Debian's `dataset-fashion-mnist` package puts the files.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
_INSTALL_HINT = (
    "Install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
    "or run once with internet access so Keras can download it.")


class DataError(ValueError):
    """Raised when a data source cannot be read."""


@dataclasses.dataclass(frozen=True)
class LabelledData:
    """Train and test splits of an image classification data set.

    Images are float32 in the value range of the source (0..255 for 8-bit
    images), shaped `[N, H, W, C]`; labels are int64 class indices.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.ndim != 4:
                raise DataError(
                    f"x_{split} must be [N, H, W, C] images, got shape {x.shape}.")
            if y.shape != (x.shape[0],):
                raise DataError(
                    f"y_{split} must hold one label per image: shape {y.shape} "
                    f"for {x.shape[0]} images.")
            if y.size and (y.min() < 0 or y.max() >= len(self.class_names)):
                raise DataError(
                    f"y_{split} has labels outside 0..{len(self.class_names) - 1} "
                    f"({len(self.class_names)} class names).")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def holdout(self, fraction: float) -> tuple[tuple[np.ndarray, np.ndarray],
                                                 tuple[np.ndarray, np.ndarray]]:
        """Splits the train split into (fit, held-out) parts; the tail is held out."""
        if not 0.0 < fraction < 1.0:
            raise DataError(f"holdout fraction must be in (0, 1), got {fraction}.")
        n_hold = max(1, int(round(len(self.x_train) * fraction)))
        cut = len(self.x_train) - n_hold
        return ((self.x_train[:cut], self.y_train[:cut]),
                (self.x_train[cut:], self.y_train[cut:]))


def _read_idx(path: str) -> np.ndarray:
    """Reads a gzip-compressed IDX file (the MNIST format)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file.")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: {data.size} values for dims {dims}.")
    return data.reshape(dims)


def _fashion_mnist_from_dir(directory: str) -> LabelledData:
    arrays = {k: _read_idx(os.path.join(directory, f))
              for k, f in _FASHION_MNIST_FILES.items()}
    return LabelledData(
        x_train=arrays["x_train"][..., None].astype(np.float32),
        y_train=arrays["y_train"].astype(np.int64),
        x_test=arrays["x_test"][..., None].astype(np.float32),
        y_test=arrays["y_test"].astype(np.int64),
        class_names=FASHION_MNIST_CLASSES)


def load_fashion_mnist(directory: str | None = None) -> LabelledData:
    """Loads Fashion-MNIST, as 28x28x1 float32 images with values 0..255.

    Looks in `directory` if given, else in the Debian package's folder, else in
    the Keras cache (`~/.keras/datasets/fashion-mnist`), else downloads it with
    Keras.

    Raises:
      DataError: when no source works; the message names the install command.
    """
    candidates = [directory] if directory else [
        DEBIAN_FASHION_MNIST_DIR,
        os.path.join(os.path.expanduser("~"), ".keras", "datasets", "fashion-mnist"),
    ]
    for d in candidates:
        if d and all(os.path.exists(os.path.join(d, f))
                     for f in _FASHION_MNIST_FILES.values()):
            return _fashion_mnist_from_dir(d)
    if directory:
        raise DataError(f"No Fashion-MNIST IDX files in {directory}. {_INSTALL_HINT}")
    try:
        import keras  # pylint: disable=import-outside-toplevel
        (xt, yt), (xv, yv) = keras.datasets.fashion_mnist.load_data()
    except Exception as e:  # pylint: disable=broad-except
        raise DataError(
            f"Fashion-MNIST not found in {DEBIAN_FASHION_MNIST_DIR} or the Keras "
            f"cache, and the download failed ({type(e).__name__}: {e}). "
            f"{_INSTALL_HINT}") from e
    return LabelledData(xt[..., None].astype(np.float32), yt.astype(np.int64),
                        xv[..., None].astype(np.float32), yv.astype(np.int64),
                        FASHION_MNIST_CLASSES)


def load_npz(path: str) -> LabelledData:
    """Loads `x_train`, `y_train`, `x_test`, `y_test` (and optional `class_names`)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise DataError(f"Cannot read {path} as a .npz file: {e}") from e
    missing = [k for k in _FASHION_MNIST_FILES if k not in arrays]
    if missing:
        raise DataError(
            f"{path} lacks the arrays {missing}; a data .npz needs x_train, y_train, "
            f"x_test and y_test (found {sorted(arrays)}).")
    x = {k: np.asarray(arrays[k], np.float32) for k in ("x_train", "x_test")}
    for k in x:
        if x[k].ndim == 3:  # Grey images without a channel axis.
            x[k] = x[k][..., None]
        finite = np.isfinite(x[k]).reshape(len(x[k]), -1).all(axis=1) if x[k].ndim else []
        if not np.all(finite):
            bad = np.flatnonzero(~finite)
            raise DataError(f"{path}: {k} holds non-finite pixels (NaN or Inf) in {len(bad)} "
                            f"image{'' if len(bad) == 1 else 's'}, the first at index "
                            f"{bad[0]}; pass camera pixels (e.g. 0..255).")
    y = {}
    for k in ("y_train", "y_test"):
        labels = np.asarray(arrays[k])
        if labels.dtype.kind not in "iub" and not (
                labels.dtype.kind == "f" and np.isfinite(labels).all()
                and (labels == np.round(labels)).all()):
            raise DataError(f"{path}: {k} must hold whole-number class indices, got "
                            f"{labels.dtype} values such as {labels.reshape(-1)[:3]}.")
        y[k] = labels.astype(np.int64).reshape(-1)
    if "class_names" in arrays:
        names = tuple(str(n) for n in arrays["class_names"])
    else:
        n = int(max(y["y_train"].max(initial=-1), y["y_test"].max(initial=-1))) + 1
        names = tuple(str(i) for i in range(n))
    return LabelledData(x["x_train"], y["y_train"], x["x_test"], y["y_test"], names)


def load_image_folder(path: str, image_size: tuple[int, int] | None = None,
                      channels: int = 3, test_fraction: float = 0.2,
                      seed: int = 0) -> LabelledData:
    """Loads a folder with one sub-folder of images per class.

    This is the layout `image_dataset_from_directory` reads; class names are
    the sub-folder names in sorted order. Each image is decoded at its own
    size (an alpha channel is dropped) and brought to `image_size` and
    `channels` by `adapt_images`, the rule every data source follows. A
    seeded `test_fraction` of each class forms the test split.

    Raises:
      DataError: for a folder without class sub-folders, a class folder
        without images, or a file that does not decode (each named).
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    if image_size is None:
        raise DataError("An image folder needs the model's input size (image_size).")
    class_names = sorted(d for d in os.listdir(path)
                         if os.path.isdir(os.path.join(path, d)))
    if len(class_names) < 2:
        raise DataError(
            f"{path} must hold one sub-folder of images per class (at least 2); "
            f"found {class_names}.")
    xs, ys = [], []
    for label, name in enumerate(class_names):
        folder = os.path.join(path, name)
        files = [f for f in sorted(os.listdir(folder))
                 if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
        if not files:
            # A class without images would be a class the model can never be
            # checked or calibrated on: refuse rather than guess.
            raise DataError(f"The class folder {folder} holds no images "
                            f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add its images.")
        for f in files:
            file = os.path.join(folder, f)
            try:
                image = tf.io.decode_image(tf.io.read_file(file),
                                           expand_animations=False).numpy()
            except (tf.errors.OpError, ValueError) as e:
                raise DataError(f"{file} is not a readable image ({e}).") from e
            if image.shape[-1] in (2, 4):  # Grey or RGB with alpha.
                image = image[..., :-1]
            xs.append(adapt_images(image[None].astype(np.float32), image_size, channels)[0])
            ys.append(label)
    x, y = np.stack(xs), np.asarray(ys, np.int64)
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(y), bool)
    for c in range(len(class_names)):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        is_test[idx[:int(round(len(idx) * test_fraction))]] = True
    return LabelledData(x[~is_test], y[~is_test], x[is_test], y[is_test],
                        tuple(class_names))


# What `image_dataset_from_directory` reads.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
# A source image at most this much smaller than the model's input (per side)
# is zero-padded around its centre; a smaller one is resized.
PAD_LIMIT = 1.25


def adapt_images(images: np.ndarray, image_size: tuple[int, int],
                 channels: int) -> np.ndarray:
    """Brings pixel images `[N, h, w, c]` to a model's input size and channels.

    The rule, applied to the built-in data sets and image folders alike:
      * channels: 1 -> 3 repeats the grey channel; 3 -> 1 takes the ITU-R
        BT.601 luma (0.299 R + 0.587 G + 0.114 B); equal counts are kept.
      * size: when the input is larger than the image by at most 25% on both
        sides (Fashion-MNIST's 28x28 into 32x32), the image is zero-padded
        around its centre, so no pixel is interpolated; otherwise it is
        resized bilinearly to (height, width), aspect ratio not kept.
    Values stay pixels (0..255 for 8-bit images): preprocessing comes after.

    Raises:
      DataError: for channel counts that have no rule (e.g. 2 or 4 -> 3).
    """
    x = np.asarray(images, np.float32)
    if x.ndim != 4:
        raise DataError(f"images must be [N, H, W, C], got shape {x.shape}.")
    c = x.shape[-1]
    if c != channels:
        if c == 1 and channels == 3:
            x = np.repeat(x, 3, axis=-1)
        elif c == 3 and channels == 1:
            x = (x @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
        else:
            raise DataError(
                f"The images have {c} channels and the model takes {channels}; only "
                "1 -> 3 (repeat) and 3 -> 1 (luma) are converted. Pass images with "
                f"{channels} channels.")
    h, w = int(image_size[0]), int(image_size[1])
    if x.shape[1:3] == (h, w):
        return x
    if (x.shape[1] <= h <= PAD_LIMIT * x.shape[1]
            and x.shape[2] <= w <= PAD_LIMIT * x.shape[2]):
        top, left = (h - x.shape[1]) // 2, (w - x.shape[2]) // 2
        return np.pad(x, ((0, 0), (top, h - x.shape[1] - top),
                          (left, w - x.shape[2] - left), (0, 0)))
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    out = [tf.image.resize(x[i:i + 256], (h, w), method="bilinear").numpy()
           for i in range(0, len(x), 256)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros(
        (0, h, w, x.shape[-1]), np.float32)


def adapt(data: LabelledData, image_size: tuple[int, int], channels: int) -> LabelledData:
    """`data` with both splits brought to the model's input by `adapt_images`."""
    return dataclasses.replace(data, x_train=adapt_images(data.x_train, image_size, channels),
                               x_test=adapt_images(data.x_test, image_size, channels))


def load_data(spec: str, image_size: tuple[int, int] | None = None,
              channels: int = 3) -> LabelledData:
    """Loads data named by a `--data` flag value.

    Args:
      spec: `fashion_mnist`, a `.npz` file, or a folder of per-class sub-folders.
      image_size: (height, width) of the model's input: images are brought to
        it (and to `channels`) by `adapt_images`; None keeps them as stored
        (a folder needs it).
      channels: the model's input channels.

    Raises:
      DataError: when the spec names nothing readable.
    """
    if spec == "fashion_mnist" or spec.endswith(".npz"):
        if spec == "fashion_mnist":
            data = load_fashion_mnist()
        elif not os.path.isfile(spec):
            raise DataError(f"--data={spec}: no such .npz file.")
        else:
            data = load_npz(spec)
        return data if image_size is None else adapt(data, image_size, channels)
    if os.path.isdir(spec):
        return load_image_folder(spec, image_size=image_size, channels=channels)
    raise DataError(
        f"--data={spec!r} is neither 'fashion_mnist', an existing .npz file, nor a "
        "folder with one sub-folder of images per class.")
