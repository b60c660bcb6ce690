"""Demo classifiers for Fashion-MNIST-sized inputs."""

from __future__ import annotations

import os
import types

import numpy as np
from smtm_tf.fitting import kerascompat
from smtm_tf.runtime import io_utils


def _default_keras():
    import tf_keras  # pylint: disable=import-outside-toplevel
    return tf_keras


def resnet_demo(input_shape=(28, 28, 1), num_classes: int = 10,
                widths=(24, 48, 96, 192), blocks_per_stage: int = 1,
                bn_momentum: float = 0.9, keras: types.ModuleType | None = None):
    """A ResNet-style CNN with one basic block per stage.

    Inputs are raw pixel values (0..255); the model rescales them itself, so a
    .tflite made from it takes camera pixels as they come. Each residual block
    ends in a layer named `stage{i}_out` (`stage{i}_{j}_out` with several
    blocks per stage), the natural cut points of the model.

    Args:
      input_shape: image shape `(H, W, C)`.
      num_classes: number of output classes.
      widths: channels of the four stages; stages 2.. halve the resolution.
      blocks_per_stage: basic blocks in each stage.
      bn_momentum: BatchNorm momentum (0.9 trains reliably in few epochs).
      keras: the Keras module to build with (`tf_keras` by default, or `keras`).

    Returns:
      An uncompiled functional model with softmax outputs.
    """
    k = keras or _default_keras()
    layers = k.layers

    def conv_bn(x, filters, stride, name, relu=True):
        x = layers.Conv2D(filters, 3, strides=stride, padding="same",
                          use_bias=False, name=f"{name}_conv")(x)
        x = layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x) if relu else x

    inputs = k.Input(input_shape, name="image")
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    x = conv_bn(x, widths[0], 1, "stem")
    for i, width in enumerate(widths):
        for j in range(blocks_per_stage):
            name = f"stage{i}" if blocks_per_stage == 1 else f"stage{i}_{j}"
            stride = 2 if i > 0 and j == 0 else 1
            shortcut = x
            y = conv_bn(x, width, stride, f"{name}_a")
            y = conv_bn(y, width, 1, f"{name}_b", relu=False)
            if stride != 1 or shortcut.shape[-1] != width:
                shortcut = layers.Conv2D(width, 1, strides=stride, use_bias=False,
                                         name=f"{name}_proj")(shortcut)
                shortcut = layers.BatchNormalization(
                    momentum=bn_momentum, name=f"{name}_proj_bn")(shortcut)
            x = layers.Add(name=f"{name}_add")([y, shortcut])
            x = layers.ReLU(name=f"{name}_out")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="logits")(x)
    return k.Model(inputs, outputs, name="smtm_resnet_demo")


def shift_augment(images, max_shift: int = 2, seed: int | None = None):
    """Randomly shifts a batch of images by up to `max_shift` pixels (zero fill).

    Frames from a moving camera are never centred; training with small shifts
    keeps the model (and so its early exits) robust to that.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    h, w = images.shape[1], images.shape[2]
    padded = tf.pad(images, [[0, 0], [max_shift, max_shift],
                             [max_shift, max_shift], [0, 0]])
    return tf.map_fn(
        lambda im: tf.image.random_crop(im, [h, w, images.shape[3]], seed=seed),
        padded)


def train_demo_model(x_train: np.ndarray, y_train: np.ndarray,
                     x_val: np.ndarray, y_val: np.ndarray, epochs: int = 8,
                     batch_size: int = 128, seed: int = 0, blocks_per_stage: int = 1,
                     keras=None, verbose=2):
    """Trains `resnet_demo` with shift augmentation and a cosine learning rate."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    k = keras or _default_keras()
    k.utils.set_random_seed(seed)
    model = resnet_demo(input_shape=x_train.shape[1:], num_classes=int(y_train.max()) + 1,
                        blocks_per_stage=blocks_per_stage, keras=k)
    steps = epochs * int(np.ceil(len(x_train) / batch_size))
    schedule = k.optimizers.schedules.CosineDecay(2e-3, decay_steps=steps)
    model.compile(optimizer=k.optimizers.Adam(schedule),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    train = (tf.data.Dataset.from_tensor_slices((x_train, y_train))
             .shuffle(len(x_train), seed=seed).batch(batch_size)
             .map(lambda x, y: (shift_augment(x), y),
                  num_parallel_calls=tf.data.AUTOTUNE)
             .prefetch(tf.data.AUTOTUNE))
    model.fit(train, validation_data=(x_val, y_val), epochs=epochs, verbose=verbose)
    return model


def save_model_atomic(model, path: str) -> None:
    """Saves a Keras model so that `path` is either complete or untouched.

    The model is saved without its optimizer state (3x the weights' size in
    tf_keras), which converting it does not need.
    """

    k = kerascompat.keras_of(model)
    bare = k.models.clone_model(model)
    bare.set_weights(model.get_weights())
    with io_utils.atomic_path(path) as tmp:
        os.remove(tmp)  # Keras refuses to overwrite without asking.
        bare.save(tmp)


def vgg_demo(input_shape=(28, 28, 1), num_classes: int = 10, widths=(32, 64, 128),
             convs_per_block: int = 2, bn_momentum: float = 0.9,
             keras: types.ModuleType | None = None):
    """A VGG-style plain CNN: blocks of 3x3 convolutions, each block ending in
    2x2 max pooling, then global average pooling and a dense softmax.

    No shortcuts, so every layer is a cut point. BatchNorm after each
    convolution (VGG-BN) lets it train in a few epochs. Layers are named
    `block{i}_conv{j}` / `block{i}_pool`.

    Args:
      input_shape: image shape `(H, W, C)`; raw pixels (0..255), rescaled inside.
      num_classes: number of output classes.
      widths: channels of each block.
      convs_per_block: 3x3 convolutions per block.
      bn_momentum: BatchNorm momentum.
      keras: the Keras module to build with (`tf_keras` by default).

    Returns:
      An uncompiled functional model with softmax outputs.
    """
    k = keras or _default_keras()
    layers = k.layers
    inputs = k.Input(input_shape, name="image")
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    for i, width in enumerate(widths):
        for j in range(convs_per_block):
            name = f"block{i}_conv{j}"
            x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=name)(x)
            x = layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn")(x)
            x = layers.ReLU(name=f"{name}_relu")(x)
        x = layers.MaxPooling2D(2, padding="same", name=f"block{i}_pool")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="logits")(x)
    return k.Model(inputs, outputs, name="smtm_vgg_demo")


# (expansion, channels, blocks, first stride) per group, MobileNetV2 Table 2
# shrunk to 28x28 inputs: three stride-2 groups take 28 -> 4.
MOBILENET_V2_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 3, 1),
                       (6, 96, 2, 2))


def mobilenet_v2_demo(input_shape=(28, 28, 1), num_classes: int = 10,
                      blocks=MOBILENET_V2_BLOCKS, stem: int = 32, last: int = 320,
                      bn_momentum: float = 0.9, keras: types.ModuleType | None = None):
    """A MobileNetV2-style CNN: inverted residual blocks (1x1 expansion, 3x3
    depthwise, linear 1x1 projection; shortcut when shapes match), ReLU6.

    Built by hand rather than with `keras.applications.MobileNetV2`, whose
    BatchNorm momentum (0.999) left validation accuracy at chance for 10
    epochs here; `bn_momentum` defaults to 0.9. Each block ends in a layer
    named `block{i}_out` (the Add, or the projection's BatchNorm when there is
    no shortcut): the model's cut points.

    Args:
      input_shape: image shape `(H, W, C)`; raw pixels (0..255), rescaled inside.
      num_classes: number of output classes.
      blocks: (expansion, channels, repeats, first stride) per group.
      stem: channels of the first 3x3 convolution.
      last: channels of the final 1x1 convolution.
      bn_momentum: BatchNorm momentum.
      keras: the Keras module to build with (`tf_keras` by default).

    Returns:
      An uncompiled functional model with softmax outputs.
    """
    k = keras or _default_keras()
    layers = k.layers

    def bn(x, name):
        return layers.BatchNormalization(momentum=bn_momentum, name=name)(x)

    inputs = k.Input(input_shape, name="image")
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    x = layers.Conv2D(stem, 3, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.ReLU(6.0, name="stem_relu")(bn(x, "stem_bn"))
    index = 0
    for expansion, channels, repeats, first_stride in blocks:
        for r in range(repeats):
            name = f"block{index}"
            stride = first_stride if r == 0 else 1
            y = x
            if expansion != 1:
                y = layers.Conv2D(int(x.shape[-1]) * expansion, 1, use_bias=False,
                                  name=f"{name}_expand")(y)
                y = layers.ReLU(6.0, name=f"{name}_expand_relu")(bn(y, f"{name}_expand_bn"))
            y = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False,
                                       name=f"{name}_dw")(y)
            y = layers.ReLU(6.0, name=f"{name}_dw_relu")(bn(y, f"{name}_dw_bn"))
            y = layers.Conv2D(channels, 1, use_bias=False, name=f"{name}_project")(y)
            if stride == 1 and int(x.shape[-1]) == channels:
                y = bn(y, f"{name}_project_bn")
                x = layers.Add(name=f"{name}_out")([x, y])
            else:
                x = bn(y, f"{name}_out")
            index += 1
    x = layers.Conv2D(last, 1, use_bias=False, name="last_conv")(x)
    x = layers.ReLU(6.0, name="last_relu")(bn(x, "last_bn"))
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="logits")(x)
    return k.Model(inputs, outputs, name="smtm_mobilenet_v2_demo")


def train_classifier(model, x_train: np.ndarray, y_train: np.ndarray,
                     x_val: np.ndarray, y_val: np.ndarray, epochs: int = 5,
                     batch_size: int = 128, learning_rate: float = 2e-3, seed: int = 0,
                     verbose=2):
    """Trains any built classifier as `train_demo_model` trains the ResNet:
    Adam with a cosine learning rate and shift augmentation (up to 2 px).

    Returns:
      The trained model (the same object).
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    k = kerascompat.keras_of(model)
    k.utils.set_random_seed(seed)
    steps = epochs * int(np.ceil(len(x_train) / batch_size))
    schedule = k.optimizers.schedules.CosineDecay(learning_rate, decay_steps=steps)
    compile_args = {} if k.__name__ == "tf_keras" else {"jit_compile": False}
    model.compile(optimizer=k.optimizers.Adam(schedule),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                  **compile_args)
    train = (tf.data.Dataset.from_tensor_slices((x_train, y_train))
             .shuffle(len(x_train), seed=seed).batch(batch_size)
             .map(lambda x, y: (shift_augment(x), y),
                  num_parallel_calls=tf.data.AUTOTUNE)
             .prefetch(tf.data.AUTOTUNE))
    model.fit(train, validation_data=(x_val, y_val), epochs=epochs, verbose=verbose)
    return model


# The benchmark's models: name -> (builder, file stem under models/, stages
# of its semantic memory). scripts/train_models.py trains them.
BENCHMARK_MODELS = {
    "resnet": (lambda: resnet_demo(blocks_per_stage=2), "demo_resnet", 6),
    "mobilenet_v2": (mobilenet_v2_demo, "demo_mobilenet_v2", 6),
    "vgg": (vgg_demo, "demo_vgg", 6),
}
