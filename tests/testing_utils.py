"""Shared fixtures for the smtm_tf tests: tiny synthetic data and tiny models.

Expensive objects (trained models, fitted memories, converted .tflite bytes)
are cached per process, so every test module that needs one pays for it once.
Nothing here downloads anything.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

def skip_or_fail(test, variable: str, reason: str):
    """Skips, unless CI set `variable`=1 after providing the dependency (then fails)."""
    import os  # pylint: disable=import-outside-toplevel
    if os.environ.get(variable) == "1":
        test.fail(f"{variable}=1 but: {reason}")
    test.skipTest(reason)


def fashion_mnist_or_skip(test):
    """The Debian package's Fashion-MNIST; skips without it, fails in CI
    (SMTM_REQUIRE_DATA=1). Never downloads."""
    from smtm_tf.fitting import data as data_lib  # pylint: disable=import-outside-toplevel
    try:
        return data_lib.load_fashion_mnist(data_lib.DEBIAN_FASHION_MNIST_DIR)
    except data_lib.DataError as e:
        skip_or_fail(test, "SMTM_REQUIRE_DATA", f"Fashion-MNIST not installed: {e}")


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


def labelled_stripes(num_train: int, num_test: int, train_seed: int, test_seed: int):
    """A LabelledData of stripes: `num_train` and `num_test` images, own seeds."""
    from smtm_tf.fitting import data as data_lib  # pylint: disable=import-outside-toplevel
    x, y = stripes(num_train, seed=train_seed)
    xt, yt = stripes(num_test, seed=test_seed)
    return data_lib.LabelledData(x, y, xt, yt, CLASS_NAMES)


def synthetic_cascade(n, seed, num_classes=5, spreads=(0.3, 0.5, 0.8), attract=0.0):
    """Per-stage similarities from a process with a known margin/correctness law.

    At every stage a frame's margin m is uniform on [0, spread) and its top-1
    class is the full model's with probability min(1, 0.4 + 2 m): margins of
    0.3 and more are always right, small ones are often wrong. Later stages
    have larger margins (they are better). The similarities are built so that
    `margins` recovers exactly that top-1 class and margin.

    With `attract` > 0, a wrong top-1 of a frame of another class than 0
    points at class 0 with probability `attract`: when class 0 is hot, frames
    of other classes are the ones a relaxed hot threshold would wrongly let
    out. That takes one more random draw per stage, made only when `attract`
    is not 0, so the default draws the same numbers as without the option.

    Returns:
      (similarities: one [n, K] float32 array per stage, full predictions [n]).
    """
    rng = np.random.default_rng(seed)
    full = rng.integers(0, num_classes, n)
    rows = np.arange(n)
    sims = []
    for spread in spreads:
        margin = rng.uniform(0.0, spread, n)
        right = rng.random(n) < np.clip(0.4 + 2.0 * margin, 0.0, 1.0)
        other = (full + rng.integers(1, num_classes, n)) % num_classes
        if attract:
            to_zero = (full != 0) & (rng.random(n) < attract)
            other = np.where(to_zero, 0, other)
        top1 = np.where(right, full, other)
        second = (top1 + rng.integers(1, num_classes, n)) % num_classes
        sim = rng.uniform(-0.5, 0.45, (n, num_classes)).astype(np.float32)
        sim[rows, second] = 0.5
        sim[rows, top1] = 0.5 + margin
        sims.append(sim)
    return sims, full


# Activation shapes around the stages of synthetic_descriptor: stage s maps
# SYNTHETIC_SHAPES[s] to SYNTHETIC_SHAPES[s + 1] (so at most 3 stages).
SYNTHETIC_SHAPES = ((1, 8, 8, 1), (1, 8, 8, 4), (1, 4, 4, 8), (1, 2, 2, 8))


def unit_centres(rng, num_classes, dim):
    """Random float32 unit centres [num_classes, dim], normalised in float32."""
    centres = rng.normal(size=(num_classes, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return centres


def synthetic_descriptor(exit_rule, lookup_op, num_classes=3, dims=(4, 5), seed=0,
                         stage_cost=lambda s: 0.3, make_centres=unit_centres, **overrides):
    """A Descriptor of a made-up model "tiny" with one stage per entry of `dims`.

    Args:
      exit_rule, lookup_op: the descriptor's.
      num_classes: classes "class 0", "class 1", ...
      dims: the semantic dimension of every stage.
      seed: seeds the random generator passed to `make_centres`.
      stage_cost: stage index -> the stage's relative cost.
      make_centres: (rng, num_classes, dim) -> the stage's centres, called
        once per stage in order.
      **overrides: Descriptor fields that replace the ones built here.
    """
    from smtm_tf.runtime import descriptor as desc  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(seed)
    shapes = SYNTHETIC_SHAPES
    stage_specs = []
    for s, d in enumerate(dims):
        centres = make_centres(rng, num_classes, d)
        sig = desc.SignatureSpec(
            f"stage_{s}",
            (desc.TensorSpec("activation", shapes[s]),
             desc.TensorSpec("centres", (num_classes, d))),
            (desc.TensorSpec("next_activation", shapes[s + 1]),
             desc.TensorSpec("semantic", (d,)),
             desc.TensorSpec("similarities", (num_classes,))))
        stage_specs.append(desc.StageSpec(sig, f"cut{s}", stage_cost(s), centres))
    head = desc.SignatureSpec("head", (desc.TensorSpec("activation", shapes[len(dims)]),),
                              (desc.TensorSpec("probabilities", (num_classes,)),))
    full = desc.SignatureSpec("full", (desc.TensorSpec("image", shapes[0]),),
                              (desc.TensorSpec("probabilities", (num_classes,)),))
    kwargs = dict(model_name="tiny", class_names=tuple(f"class {i}" for i in range(num_classes)),
                  pooling="avg_max", stages=tuple(stage_specs), head=head, full=full,
                  exit_rule=exit_rule, lookup_op=lookup_op)
    kwargs.update(overrides)
    return desc.Descriptor(**kwargs)


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
    from smtm_tf.fitting import memory  # pylint: disable=import-outside-toplevel
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
    from smtm_tf.fitting import encoders
    from smtm_tf.fitting import stages  # pylint: disable=import-outside-toplevel
    model, mem = trained_residual(flavour, output), fitted_memory(flavour, output)
    stage_models, head = stages.split_model(model, mem.plan)
    feats = encoders.extract_features(stage_models, head, calibration_data()[0], mem.pooling)
    return mem.similarities(feats), feats.predictions


@functools.cache
def exiting_memory(flavour: str = "tf_keras"):
    """fitted_memory with thresholds at margin quantiles, so frames exit at every
    stage and some run the head: exercises every branch of the runtime."""
    from smtm_tf.runtime import exit_policy  # pylint: disable=import-outside-toplevel
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
