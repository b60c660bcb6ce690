"""Shared fixtures for the smtm_tf tests: tiny synthetic data and tiny models.

Expensive objects (trained models, fitted memories, converted .tflite bytes)
are cached per process, so every test module that needs one pays for it once.
Nothing here downloads anything.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

IMAGE_SIZE = 12
NUM_CLASSES = 4
CLASS_NAMES = ("horizontal", "vertical", "diagonal", "anti_diagonal")


def stripes(n: int, seed: int, size: int = IMAGE_SIZE, noise: float = 0.35):
    """Noisy stripe images; the class is the stripe orientation.

    The phase of the stripes is random, so only local texture (which a 3x3
    convolution sees and global pooling keeps) tells the classes apart: the
    early stages of a CNN can classify these, which makes early exits real.

    Returns:
      (x [n, size, size, 1] float32, y [n] int64).
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, n)
    phase = rng.integers(0, 4, n)[:, None, None]
    ii, jj = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    coords = np.stack([ii, jj, ii + jj, ii - jj + size])  # One per class.
    pattern = ((coords[y] + phase) % 4 < 2).astype(np.float32)
    x = pattern + rng.normal(0.0, noise, (n, size, size)).astype(np.float32)
    return x[..., None].astype(np.float32), y.astype(np.int64)


def residual_cnn(k, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 1), num_classes=NUM_CLASSES,
                 output: str = "softmax"):
    """A functional CNN with one residual block, built with Keras module `k`.

    Layers: c0 -> r0 -> [c1 + shortcut] add -> out1 -> c2 (stride 2) -> r2 ->
    gap -> logits. `c1` lies inside the residual block (not a cut point).

    Args:
      output: "softmax" (Dense with softmax), "logits" (no activation) or
        "softmax_layer" (Dense then a separate keras.layers.Softmax).
    """
    layers = k.layers
    inputs = k.Input(input_shape, name="image")
    x = layers.Conv2D(8, 3, padding="same", name="c0")(inputs)
    x = layers.ReLU(name="r0")(x)
    y = layers.Conv2D(8, 3, padding="same", name="c1")(x)
    x = layers.Add(name="add")([x, y])
    x = layers.ReLU(name="out1")(x)
    x = layers.Conv2D(16, 3, strides=2, padding="same", name="c2")(x)
    x = layers.ReLU(name="r2")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    if output == "softmax":
        outputs = layers.Dense(num_classes, activation="softmax", name="logits")(x)
    elif output == "logits":
        outputs = layers.Dense(num_classes, name="logits")(x)
    elif output == "softmax_layer":
        x = layers.Dense(num_classes, name="logits")(x)
        outputs = layers.Softmax(name="probabilities")(x)
    else:
        raise ValueError(output)
    return k.Model(inputs, outputs, name=f"residual_{output}")


# Multiply-adds of residual_cnn's weighted layers (12x12x1 input, 4 classes).
RESIDUAL_MACS = {
    "c0": 12 * 12 * 3 * 3 * 1 * 8,
    "c1": 12 * 12 * 3 * 3 * 8 * 8,
    "c2": 6 * 6 * 3 * 3 * 8 * 16,
    "logits": 16 * 4,
}


def sequential_cnn(k, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 1), num_classes=NUM_CLASSES):
    return k.Sequential([
        k.Input(input_shape),
        k.layers.Conv2D(8, 3, padding="same", name="a"),
        k.layers.ReLU(name="a_relu"),
        k.layers.Conv2D(8, 3, strides=2, padding="same", name="b"),
        k.layers.ReLU(name="b_relu"),
        k.layers.GlobalAveragePooling2D(name="gap"),
        k.layers.Dense(num_classes, activation="softmax", name="logits"),
    ], name="sequential_cnn")


def keras_module(flavour: str):
    if flavour == "keras":
        import keras  # pylint: disable=import-outside-toplevel
        return keras
    if flavour == "tf_keras":
        import tf_keras  # pylint: disable=import-outside-toplevel
        return tf_keras
    raise ValueError(flavour)


def train(model, k, x, y, epochs: int = 4, seed: int = 0):
    model.compile(optimizer=k.optimizers.Adam(3e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
    return model


def train_data():
    return stripes(1500, seed=0)


def calibration_data():
    return stripes(400, seed=1)


def check_images():
    return stripes(16, seed=2)[0]


@functools.cache
def trained_residual(flavour: str, output: str = "softmax"):
    """A residual_cnn trained on stripes (about 1 s); shared, do not modify."""
    k = keras_module(flavour)
    k.utils.set_random_seed(0)
    x, y = train_data()
    return train(residual_cnn(k, output=output), k, x, y)


@functools.cache
def fitted_memory(flavour: str, output: str = "softmax"):
    """A 3-stage semantic memory for trained_residual(flavour)."""
    from smtm_tf import memory  # pylint: disable=import-outside-toplevel
    x, _ = train_data()
    xc, _ = calibration_data()
    return memory.fit_semantic_memory(
        trained_residual(flavour, output), x, xc, class_names=CLASS_NAMES, num_stages=3,
        embedding_dim=8, encoder_epochs=10, target_agreement=0.95)


@functools.cache
def converted(flavour: str, output: str = "softmax"):
    """(tflite bytes, report) for trained_residual + fitted_memory."""
    from converters import smtm_converter  # pylint: disable=import-outside-toplevel
    return smtm_converter.convert(trained_residual(flavour, output),
                                  fitted_memory(flavour, output), check_images())


def calibration_similarities(flavour: str = "tf_keras", output: str = "softmax"):
    """Per-stage similarities [N, K] of the calibration images, in numpy."""
    from smtm_tf import encoders, stages  # pylint: disable=import-outside-toplevel
    model, mem = trained_residual(flavour, output), fitted_memory(flavour, output)
    stage_models, head = stages.split_model(model, mem.plan)
    feats = encoders.extract_features(stage_models, head, calibration_data()[0], mem.pooling)
    return mem.similarities(feats), feats.predictions


@functools.cache
def exiting_memory(flavour: str = "tf_keras"):
    """fitted_memory with thresholds at margin quantiles, so frames exit at every
    stage and some run the head: exercises every branch of the runtime."""
    from smtm_tf import exit_policy  # pylint: disable=import-outside-toplevel
    mem = fitted_memory(flavour)
    sims, _ = calibration_similarities(flavour)
    thresholds = tuple(float(np.quantile(exit_policy.margins(s)[1], q))
                       for s, q in zip(sims, (0.75, 0.6, 0.5)))
    rule = exit_policy.ExitRule(exit_policy.Metric.MARGIN, thresholds, 0.9)
    return dataclasses.replace(mem, exit_rule=rule)


@functools.cache
def exiting_converted(flavour: str = "tf_keras"):
    from converters import smtm_converter  # pylint: disable=import-outside-toplevel
    return smtm_converter.convert(trained_residual(flavour), exiting_memory(flavour),
                                  check_images())
