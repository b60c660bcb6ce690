"""A zoo of Keras classifiers that smtm_tf was not tuned on.

Each entry names a builder from Keras sources only (`keras.applications` with
`weights=None`, or a network written with Keras layers), the Keras flavour it
is built with, its input shape, the preprocessing it expects OUTSIDE the graph
(a `smtm_tf.runtime.preprocessing` preset name, or None when its own first layer
rescales pixels) and whether it ends in logits rather than probabilities.
Together the entries cover: both Keras flavours, Sequential and functional
graphs, residual adds (identity and projected), concatenations, branches,
separable and depthwise convolutions, squeeze-and-excitation, every
preprocessing convention and a logits output.

`train_entry` fits one entry briefly on Fashion-MNIST, brought to the model's
input by `data.adapt_images` and then preprocessed as the entry says;
`build_zoo` trains several and writes `<name>.keras` files and `zoo.json`.

Example:
  entry = zoo.get("inception_branchy")
  model = entry.build(tiny=False)   # a Keras 3 model taking x / 255
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Iterable

import numpy as np

from smtm_tf.fitting import data as data_lib
from smtm_tf.fitting import kerascompat
from smtm_tf.fitting import models
from smtm_tf.runtime import preprocessing

FLAVOURS = ("keras", "tf_keras")
# Fashion-MNIST's classes; the zoo's classifiers all predict them.
NUM_CLASSES = len(data_lib.FASHION_MNIST_CLASSES)
# keras.applications' default BatchNorm momentum (0.99 / 0.999) left
# MobileNetV2 at chance after 10 epochs here (PLATFORM-NOTES); 0.9 lets the
# moving statistics catch up within the zoo's one or two epochs.
BN_MOMENTUM = 0.9


class ZooError(ValueError):
    """Raised for unknown or malformed zoo entries."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How an entry is trained for the zoo (full, not tiny, build).

    Attributes:
      epochs: passes over the training subset.
      train_examples: how many Fashion-MNIST training images to use (the first ones).
      batch_size: images per step.
      learning_rate: Adam's initial learning rate (cosine decay to 0).
    """

    epochs: int = 1
    train_examples: int = 60000
    batch_size: int = 128
    learning_rate: float = 2e-3

    def __post_init__(self):
        for field in ("epochs", "train_examples", "batch_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ZooError(f"TrainConfig.{field} must be a positive int, got {value!r}.")
        if not self.learning_rate > 0:
            raise ZooError(
                f"TrainConfig.learning_rate must be > 0, got {self.learning_rate!r}.")


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo.

    Attributes:
      name: registry key and file stem.
      build: `build(tiny)` returns a fresh, uncompiled model; `tiny=True`
        gives a narrow (same-topology where the source allows) version that
        trains in seconds.
      flavour: "keras" (Keras 3) or "tf_keras".
      input_shape: (H, W, C) of the full build.
      preprocessing: a `preprocessing.Preset` name: what to do to pixels
        before the model; None when the model's first layer rescales pixels.
      logits: True when the model outputs logits (no softmax).
      description: one line on what the entry exercises.
      train: how `train_entry` fits it; None for entries kept untrained.
    """

    name: str
    build: Callable[[bool], object]
    flavour: str
    input_shape: tuple[int, int, int]
    preprocessing: str | None
    logits: bool
    description: str
    train: TrainConfig | None = TrainConfig()

    def __post_init__(self):
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ZooError(f"ZooEntry.name must be a word (letters, digits, _), "
                           f"got {self.name!r}.")
        if self.flavour not in FLAVOURS:
            raise ZooError(f"ZooEntry.flavour must be one of {FLAVOURS}, got "
                           f"{self.flavour!r} ({self.name}).")
        if len(self.input_shape) != 3:
            raise ZooError(f"ZooEntry.input_shape must be (H, W, C), got "
                           f"{self.input_shape!r} ({self.name}).")
        if self.preprocessing is not None:
            try:
                preprocessing.Preset(self.preprocessing)
            except ValueError as e:
                raise ZooError(
                    f"ZooEntry.preprocessing must be a preset name or None, got "
                    f"{self.preprocessing!r} ({self.name}).") from e

    def keras(self):
        """The Keras module of this entry's flavour."""
        if self.flavour == "keras":
            import keras  # pylint: disable=import-outside-toplevel
            return keras
        import tf_keras  # pylint: disable=import-outside-toplevel
        return tf_keras

    def preprocessor(self, channels: int | None = None) -> preprocessing.Preprocessing:
        """What turns pixels into this model's input."""
        if self.preprocessing is None:
            return preprocessing.Preprocessing.raw(source="model")
        return preprocessing.Preprocessing.preset(
            self.preprocessing, self.input_shape[-1] if channels is None else channels)


def set_batchnorm_momentum(model, momentum: float = BN_MOMENTUM):
    """Sets every BatchNormalization layer's momentum (it is read at call time
    and saved in the layer config, so a reloaded model keeps it)."""
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            layer.momentum = momentum
    return model


# ---------------------------------------------------------------------------
# keras.applications (Keras 3, weights=None: nothing is downloaded).


def mobilenet_v2_035(tiny: bool = False):
    """keras.applications.MobileNetV2, alpha 0.35, 32x32x3, softmax.

    No preprocessing layer: like its ImageNet weights it expects [-1, 1]
    (`mobilenet_v2.preprocess_input`, "symmetric") outside the graph.
    """
    import keras  # pylint: disable=import-outside-toplevel
    # alpha 0.35 is the narrowest width keras.applications builds; tiny keeps it.
    del tiny
    model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=NUM_CLASSES,
        name="mobilenet_v2_035")
    return set_batchnorm_momentum(model)


def mobilenet_v3_small(tiny: bool = False):
    """keras.applications.MobileNetV3Small, 32x32x3, softmax.

    `include_preprocessing=True` (the default) puts `Rescaling(1/127.5, -1)`
    first, so the model takes pixels 0..255. Its hard-sigmoid is written with
    `x + 3` and `x * (1/6)` tensor ops, which are graph nodes but not layers.
    """
    import keras  # pylint: disable=import-outside-toplevel
    model = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), alpha=0.75 if tiny else 1.0, minimalistic=False,
        weights=None, classes=NUM_CLASSES, include_preprocessing=True,
        name="mobilenet_v3_small")
    return set_batchnorm_momentum(model)


def efficientnet_b0(tiny: bool = False):
    """keras.applications.EfficientNetB0, 32x32x3, softmax.

    Always starts with `Rescaling(1/255)` and a `Normalization` layer; with
    `weights=None` the Normalization is not adapted (mean 0, variance 1), so
    the model takes pixels 0..255 and sees [0, 1]. keras.applications has no
    public width argument for it, so `tiny` builds the same model (4 M
    parameters, a few seconds to trace).
    """
    import keras  # pylint: disable=import-outside-toplevel
    del tiny
    model = keras.applications.EfficientNetB0(
        input_shape=(32, 32, 3), weights=None, classes=NUM_CLASSES, name="efficientnet_b0")
    return set_batchnorm_momentum(model)


def mobilenet_v2_imagenet_untrained(tiny: bool = False):
    """An untrained 1000-class keras.applications.MobileNetV2 at 224x224x3
    (alpha 1.0, 3.5 M parameters): a scale test for conversion, not a classifier.

    `tiny` keeps the 1000 classes but takes 96x96 at alpha 0.35.
    """
    import keras  # pylint: disable=import-outside-toplevel
    size, alpha = (96, 0.35) if tiny else (224, 1.0)
    model = keras.applications.MobileNetV2(
        input_shape=(size, size, 3), alpha=alpha, weights=None, classes=1000,
        name="mobilenet_v2_imagenet_untrained")
    return set_batchnorm_momentum(model)


# ---------------------------------------------------------------------------
# Networks written with Keras layers.


def resnet_v2_bottleneck(tiny: bool = False, keras=None):
    """A ResNet50V2-style network at reduced width and depth (tf_keras).

    Pre-activation bottleneck blocks as in keras.applications' `block2`/
    `stack2`: BN-ReLU first, 1x1 -> 3x3 -> 1x1 (x4 expansion), a projected
    1x1 shortcut in each stage's first block, identity shortcuts after, and
    the stride (with a 1x1 max-pool shortcut) in a stage's last block. The
    7x7/2 stem and max-pool are replaced by one 3x3 convolution for 32x32
    input. Like ResNet50V2 it expects [-1, 1] outside ("symmetric").
    """
    if keras is None:
        import tf_keras as keras  # pylint: disable=import-outside-toplevel
    layers = keras.layers
    filters = (4, 8, 16, 32) if tiny else (16, 32, 64, 128)
    blocks = (2, 2, 2, 2) if tiny else (2, 3, 3, 2)

    def bn(x, name):
        return layers.BatchNormalization(epsilon=1.001e-5, momentum=BN_MOMENTUM,
                                         name=name)(x)

    def block(x, width, stride, conv_shortcut, name):
        preact = layers.Activation("relu", name=f"{name}_preact_relu")(
            bn(x, f"{name}_preact_bn"))
        if conv_shortcut:
            shortcut = layers.Conv2D(4 * width, 1, strides=stride,
                                     name=f"{name}_0_conv")(preact)
        elif stride > 1:
            shortcut = layers.MaxPooling2D(1, strides=stride, name=f"{name}_0_pool")(x)
        else:
            shortcut = x
        y = layers.Conv2D(width, 1, use_bias=False, name=f"{name}_1_conv")(preact)
        y = layers.Activation("relu", name=f"{name}_1_relu")(bn(y, f"{name}_1_bn"))
        y = layers.Conv2D(width, 3, strides=stride, padding="same", use_bias=False,
                          name=f"{name}_2_conv")(y)
        y = layers.Activation("relu", name=f"{name}_2_relu")(bn(y, f"{name}_2_bn"))
        y = layers.Conv2D(4 * width, 1, name=f"{name}_3_conv")(y)
        return layers.Add(name=f"{name}_out")([shortcut, y])

    inputs = keras.Input((32, 32, 3), name="image")
    x = layers.Conv2D(2 * filters[0], 3, padding="same", name="stem_conv")(inputs)
    for s, (width, repeats) in enumerate(zip(filters, blocks)):
        stride = 1 if s == len(filters) - 1 else 2
        for b in range(repeats):
            x = block(x, width, stride if b == repeats - 1 else 1,
                      conv_shortcut=b == 0, name=f"conv{s + 2}_block{b + 1}")
    x = layers.Activation("relu", name="post_relu")(bn(x, "post_bn"))
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="resnet_v2_bottleneck")


def densenet_concat(tiny: bool = False, keras=None):
    """A DenseNet-style network at reduced width and depth (tf_keras), ending
    in LOGITS (the classifier Dense has no activation).

    keras.applications' `conv_block` (BN-ReLU-1x1 to 4k, BN-ReLU-3x3 to k,
    concatenated onto its input) and `transition_block` (BN-ReLU-1x1 halving
    the channels, 2x2 average pool); a 3x3 stem replaces the 7x7/2 + pool for
    32x32 input. Like DenseNet's ImageNet weights it expects ImageNet mean/std
    outside ("imagenet").
    """
    if keras is None:
        import tf_keras as keras  # pylint: disable=import-outside-toplevel
    layers = keras.layers
    growth = 4 if tiny else 12
    blocks = (2, 2, 2) if tiny else (4, 6, 8)

    def bn_relu(x, name):
        x = layers.BatchNormalization(epsilon=1.001e-5, momentum=BN_MOMENTUM,
                                      name=f"{name}_bn")(x)
        return layers.Activation("relu", name=f"{name}_relu")(x)

    def conv_block(x, name):
        y = layers.Conv2D(4 * growth, 1, use_bias=False, name=f"{name}_1_conv")(
            bn_relu(x, f"{name}_0"))
        y = layers.Conv2D(growth, 3, padding="same", use_bias=False,
                          name=f"{name}_2_conv")(bn_relu(y, f"{name}_1"))
        return layers.Concatenate(name=f"{name}_concat")([x, y])

    def transition(x, name):
        x = layers.Conv2D(int(x.shape[-1]) // 2, 1, use_bias=False, name=f"{name}_conv")(
            bn_relu(x, name))
        return layers.AveragePooling2D(2, strides=2, name=f"{name}_pool")(x)

    inputs = keras.Input((32, 32, 3), name="image")
    # Stride 2 as in the original stem: dense blocks at full 32x32 resolution
    # cost 5x more per step on CPU for little accuracy.
    x = layers.Conv2D(2 * growth, 3, strides=2, padding="same", use_bias=False,
                      name="stem_conv")(inputs)
    for d, repeats in enumerate(blocks):
        for b in range(repeats):
            x = conv_block(x, f"conv{d + 2}_block{b + 1}")
        if d < len(blocks) - 1:
            x = transition(x, f"pool{d + 2}")
    x = layers.GlobalAveragePooling2D(name="avg_pool")(bn_relu(x, "final"))
    outputs = layers.Dense(NUM_CLASSES, name="logits")(x)
    return keras.Model(inputs, outputs, name="densenet_concat")


def inception_branchy(tiny: bool = False, keras=None):
    """An inception-style branchy network (Keras 3 functional), 28x28x1.

    Each block concatenates three branches, 1x1 conv | separable 3x3 conv |
    3x3 average pool + 1x1 conv, normalises them and adds a shortcut: the
    identity where shapes match, a strided 1x1 projection where they do not;
    ReLU6 throughout. No rescaling layer: trained on x / 255 ("unit").
    """
    if keras is None:
        import keras  # pylint: disable=import-outside-toplevel
    layers = keras.layers
    widths = (8, 16, 24) if tiny else (32, 64, 96)

    def bn(x, name):
        return layers.BatchNormalization(momentum=BN_MOMENTUM, name=name)(x)

    def block(x, width, stride, name):
        quarter = width // 4
        b1 = layers.Conv2D(quarter, 1, strides=stride, use_bias=False, name=f"{name}_b1")(x)
        b2 = layers.SeparableConv2D(width - 2 * quarter, 3, strides=stride, padding="same",
                                    use_bias=False, name=f"{name}_b2")(x)
        b3 = layers.AveragePooling2D(3, strides=stride, padding="same",
                                     name=f"{name}_b3_pool")(x)
        b3 = layers.Conv2D(quarter, 1, use_bias=False, name=f"{name}_b3")(b3)
        y = bn(layers.Concatenate(name=f"{name}_concat")([b1, b2, b3]), f"{name}_bn")
        if stride == 1 and int(x.shape[-1]) == width:
            shortcut = x
        else:
            shortcut = layers.Conv2D(width, 1, strides=stride, use_bias=False,
                                     name=f"{name}_proj")(x)
            shortcut = bn(shortcut, f"{name}_proj_bn")
        y = layers.Add(name=f"{name}_add")([y, shortcut])
        return layers.ReLU(6.0, name=f"{name}_out")(y)

    inputs = keras.Input((28, 28, 1), name="image")
    x = layers.Conv2D(widths[0], 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.ReLU(6.0, name="stem_relu")(bn(x, "stem_bn"))
    for s, width in enumerate(widths):
        x = block(x, width, 1 if s == 0 else 2, f"stage{s}_block0")
        x = block(x, width, 1, f"stage{s}_block1")
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name="inception_branchy")


def vgg_sequential(tiny: bool = False, keras=None):
    """A plain VGG as a tf_keras Sequential model, 32x32x3.

    `Rescaling(1/255)` first (so it takes pixels), then 4 x [conv3x3 ReLU,
    conv3x3 ReLU, 2x2 max-pool], flatten, dense 64 ReLU, dense softmax. No
    BatchNorm.
    """
    if keras is None:
        import tf_keras as keras  # pylint: disable=import-outside-toplevel
    layers = keras.layers
    widths = (4, 8, 8, 16) if tiny else (16, 32, 64, 64)
    stack = [keras.Input((32, 32, 3), name="image"),
             layers.Rescaling(1.0 / 255.0, name="rescale")]
    for i, width in enumerate(widths):
        stack += [layers.Conv2D(width, 3, padding="same", activation="relu",
                                name=f"block{i}_conv0"),
                  layers.Conv2D(width, 3, padding="same", activation="relu",
                                name=f"block{i}_conv1"),
                  layers.MaxPooling2D(2, name=f"block{i}_pool")]
    stack += [layers.Flatten(name="flatten"),
              layers.Dense(16 if tiny else 64, activation="relu", name="fc"),
              layers.Dense(NUM_CLASSES, activation="softmax", name="predictions")]
    return keras.Sequential(stack, name="vgg_sequential")


_ENTRIES = (
    ZooEntry("mobilenet_v2_035", mobilenet_v2_035, "keras", (32, 32, 3), "symmetric", False,
             "keras.applications MobileNetV2 a=0.35: inverted residuals, depthwise, ReLU6",
             TrainConfig(epochs=3, train_examples=40000, learning_rate=2e-3)),
    ZooEntry("mobilenet_v3_small", mobilenet_v3_small, "keras", (32, 32, 3), None, False,
             "keras.applications MobileNetV3Small: SE, hard-swish, own Rescaling",
             TrainConfig(epochs=2, train_examples=30000, learning_rate=2e-3)),
    ZooEntry("efficientnet_b0", efficientnet_b0, "keras", (32, 32, 3), None, False,
             "keras.applications EfficientNetB0: MBConv, SE, swish, Rescaling+Normalization",
             TrainConfig(epochs=2, train_examples=30000, learning_rate=2e-3)),
    ZooEntry("resnet_v2_bottleneck", resnet_v2_bottleneck, "tf_keras", (32, 32, 3),
             "symmetric", False,
             "ResNet50V2-style pre-activation bottlenecks, projected + identity shortcuts",
             TrainConfig(epochs=2, train_examples=30000, learning_rate=2e-3)),
    ZooEntry("densenet_concat", densenet_concat, "tf_keras", (32, 32, 3), "imagenet", True,
             "DenseNet-style concatenating blocks and transitions, logits output",
             TrainConfig(epochs=2, train_examples=24000, learning_rate=2e-3)),
    ZooEntry("inception_branchy", inception_branchy, "keras", (28, 28, 1), "unit", False,
             "Keras 3 branchy net: 1x1 | separable 3x3 | pool+1x1 concat, residual adds, ReLU6",
             TrainConfig(epochs=2, train_examples=30000, learning_rate=2e-3)),
    ZooEntry("vgg_sequential", vgg_sequential, "tf_keras", (32, 32, 3), None, False,
             "tf_keras Sequential plain VGG with a Rescaling layer, flatten + dense",
             TrainConfig(epochs=2, train_examples=30000, learning_rate=1e-3)),
    ZooEntry("mobilenet_v2_imagenet_untrained", mobilenet_v2_imagenet_untrained, "keras",
             (224, 224, 3), "symmetric", False,
             "UNTRAINED 1000-class 224x224 keras.applications MobileNetV2 (scale test)",
             train=None),
)
ZOO: dict[str, ZooEntry] = {e.name: e for e in _ENTRIES}


def names() -> tuple[str, ...]:
    """The zoo's entry names, in registry order."""
    return tuple(ZOO)


def get(name: str) -> ZooEntry:
    """The entry called `name`.

    Raises:
      ZooError: for an unknown name (the message lists the known ones).
    """
    try:
        return ZOO[name]
    except KeyError:
        raise ZooError(f"No zoo entry {name!r}; known: {', '.join(ZOO)}.") from None


# ---------------------------------------------------------------------------
# Training.


def model_inputs(entry: ZooEntry, pixels: np.ndarray, input_shape=None) -> np.ndarray:
    """Pixel images `[N, h, w, c]` as `entry`'s model takes them: brought to its
    input size/channels by `data.adapt_images`, then preprocessed."""
    h, w, c = input_shape or entry.input_shape
    x = data_lib.adapt_images(pixels, (h, w), c)
    return entry.preprocessor(c).apply(x)


def fit_model(model, entry: ZooEntry, x: np.ndarray, y: np.ndarray,
              config: TrainConfig, verbose=2, run_eagerly: bool = False) -> None:
    """Compiles and fits `model` on model inputs `x` (already preprocessed).

    Adam with a cosine-decayed learning rate; the loss takes logits when the
    entry says so. Keras 3 models are compiled with `jit_compile=False`
    (XLA's auto mode was ~40% slower per step on CPU here).

    Args:
      model: a model built by `entry.build`.
      entry: its zoo entry.
      x, y: model inputs and int labels.
      config: epochs, examples, batch size and learning rate (`train_examples`
        is not applied here: pass the subset as `x`).
      verbose: Keras `fit` verbosity.
      run_eagerly: skip graph tracing (a few steps of a deep Keras 3 model
        run faster eagerly than they trace).
    """
    k = kerascompat.keras_of(model)
    steps = config.epochs * int(np.ceil(len(x) / config.batch_size))
    schedule = k.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps=steps)
    compile_args = {"jit_compile": False} if k.__name__ == "keras" else {}
    model.compile(
        optimizer=k.optimizers.Adam(schedule),
        loss=k.losses.SparseCategoricalCrossentropy(from_logits=entry.logits),
        metrics=["accuracy"], run_eagerly=run_eagerly, **compile_args)
    model.fit(x, y, batch_size=config.batch_size, epochs=config.epochs, shuffle=True,
              verbose=verbose)


def evaluate(model, x: np.ndarray, y: np.ndarray, batch_size: int = 500) -> float:
    """Top-1 accuracy of `model` on model inputs `x` (logits or probabilities)."""
    pred = np.concatenate([np.asarray(model(x[i:i + batch_size], training=False))
                           for i in range(0, len(x), batch_size)])
    return float(np.mean(pred.argmax(-1) == y))


@dataclasses.dataclass(frozen=True)
class ZooResult:
    """What `train_entry` measured for one entry."""

    name: str
    file: str
    flavour: str
    preprocessing: str | None
    logits: bool
    input_shape: tuple[int, ...]
    params: int
    trained: bool
    test_accuracy: float | None
    train_seconds: float
    train_examples: int
    epochs: int

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d


def train_entry(entry: ZooEntry, fmnist: data_lib.LabelledData, tiny: bool = False,
                config: TrainConfig | None = None, test_examples: int | None = None,
                seed: int = 0, verbose=2):
    """Builds `entry` and fits it on Fashion-MNIST.

    Args:
      entry: the zoo entry.
      fmnist: pixel data (28x28x1, 0..255), e.g. `data.load_fashion_mnist()`.
      tiny: build the tiny version.
      config: training settings; defaults to the entry's own (entries without
        one are returned untrained).
      test_examples: evaluate on the first this many test images (all by default).
      seed: seeds Keras (weights, shuffling).
      verbose: Keras `fit` verbosity.

    Returns:
      `(model, test_accuracy or None, train_seconds, config used or None)`.
    """
    k = entry.keras()
    k.utils.set_random_seed(seed)
    model = entry.build(tiny)
    config = config or entry.train
    if config is None:
        return model, None, 0.0, None
    input_shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    n = min(config.train_examples, len(fmnist.x_train))
    x = model_inputs(entry, fmnist.x_train[:n], input_shape)
    start = time.perf_counter()
    fit_model(model, entry, x, fmnist.y_train[:n], config, verbose)
    seconds = time.perf_counter() - start
    del x
    m = len(fmnist.x_test) if test_examples is None else test_examples
    x_test = model_inputs(entry, fmnist.x_test[:m], input_shape)
    return model, evaluate(model, x_test, fmnist.y_test[:m]), seconds, config


def build_zoo(out_dir: str, entry_names: Iterable[str] | None = None, tiny: bool = False,
              fmnist: data_lib.LabelledData | None = None,
              log: Callable[[str], None] = print, verbose=2) -> list[ZooResult]:
    """Builds, trains and saves zoo entries; writes `<out_dir>/zoo.json`.

    Each model is saved as `<out_dir>/<name>.keras` (without optimizer state)
    and `zoo.json` is rewritten after each one, so a partial run keeps what it
    finished; entries already in an existing `zoo.json` but not rebuilt now
    are kept.

    Args:
      out_dir: output folder (created).
      entry_names: entries to build (all by default).
      tiny: build tiny versions and train each on 256 images for one epoch.
      fmnist: Fashion-MNIST pixels; loaded with `data.load_fashion_mnist()` if None.
      log: progress sink.
      verbose: Keras `fit` verbosity.

    Returns:
      One result per entry, in the order asked.
    """
    entries = [get(n) for n in (entry_names or names())]
    fmnist = fmnist or data_lib.load_fashion_mnist()
    os.makedirs(out_dir, exist_ok=True)
    index_path = os.path.join(out_dir, "zoo.json")
    index = {}
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            index = {m["name"]: m for m in json.load(f).get("models", [])}
    results = []
    for i, entry in enumerate(entries):
        config = None
        if entry.train is not None and tiny:
            config = TrainConfig(epochs=1, train_examples=256, batch_size=64,
                                 learning_rate=entry.train.learning_rate)
        log(f"[{i + 1}/{len(entries)}] {entry.name}: building and training "
            f"({entry.flavour}, {'tiny' if tiny else 'full'})")
        model, acc, seconds, used = train_entry(
            entry, fmnist, tiny=tiny, config=config,
            test_examples=500 if tiny else None, verbose=verbose)
        file = f"{entry.name}.keras"
        models.save_model_atomic(model, os.path.join(out_dir, file))
        result = ZooResult(
            name=entry.name, file=file, flavour=entry.flavour,
            preprocessing=entry.preprocessing, logits=entry.logits,
            input_shape=tuple(int(d) for d in model.inputs[0].shape[1:]),
            params=int(model.count_params()), trained=used is not None,
            test_accuracy=acc, train_seconds=round(seconds, 1),
            train_examples=used.train_examples if used else 0,
            epochs=used.epochs if used else 0)
        results.append(result)
        acc_text = "untrained" if acc is None else f"test accuracy {acc:.4f}"
        log(f"[{i + 1}/{len(entries)}] {entry.name}: {acc_text}, {seconds:.0f} s, "
            f"{result.params:,} params -> {file}")
        index[entry.name] = result.to_dict()
        order = [n for n in names() if n in index] + [n for n in index if n not in ZOO]
        with open(index_path + ".tmp", "w", encoding="utf-8") as f:
            json.dump({"tiny": tiny, "models": [index[n] for n in order]}, f, indent=2)
        os.replace(index_path + ".tmp", index_path)
    return results


def format_table(results: Iterable[ZooResult]) -> str:
    """Results as a fixed-width text table."""
    rows = [("model", "flavour", "input", "preproc", "out", "params", "test acc", "train s")]
    for r in results:
        rows.append((r.name, r.flavour, "x".join(str(d) for d in r.input_shape),
                     r.preprocessing or "(model)", "logits" if r.logits else "softmax",
                     f"{r.params:,}",
                     "-" if r.test_accuracy is None else f"{r.test_accuracy:.4f}",
                     f"{r.train_seconds:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
