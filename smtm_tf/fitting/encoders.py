"""Semantic encoders: pooled stage features -> low-dimensional unit vectors.

Each stage's encoder is `pool -> [Dense(H) -> ReLU] -> Dense(D) -> L2 normalise`
(the hidden layer optional). The pooling has no weights, so the features it
yields are extracted once, streaming the data through the frozen backbone in
batches, and the dense layers are trained on them with a cosine-margin
(CosFace) loss. A class's semantic centre at a stage is the normalised mean of
its training vectors there, or the class's weight vector in that cosine
classifier (the default).
"""

from __future__ import annotations

import dataclasses
import enum
import logging

import numpy as np

from smtm_tf.fitting import progress

EPSILON = 1e-12

# Input standardisation of the encoders, relative to the largest per-channel
# standard deviation of the pooled features, so that it does not depend on
# the input's units (a model fed 0..255 pixels gets the same encoder, scaled,
# as one fed [0, 1]):
# - a channel whose std is at most DEAD_CHANNEL_STD of it is dead (constant,
#   e.g. a ReLU that never fires): its kernel row is zero. Dividing by its
#   ~0 std gave weights up to ~1e6 that XNNPACK's int8 kernels refuse and
#   that amplify float rounding.
# - a live channel is divided by at least STD_FLOOR of it, so the folded
#   weights of a near-constant channel are at most ~10x those of the widest
#   one (for equal trained weights). Int8 kernels have one weight scale per
#   output, set by its largest weight: with a floor of 0.01, a 1-epoch VGG's
#   int8 nearest centre was float's on 57% of held-out frames at its worst
#   stage, 94% with 0.1; float nearest-centre accuracy lost 5 points at its
#   stage 0 and < 1 point elsewhere and on the demo VGG.
DEAD_CHANNEL_STD = 1e-4
STD_FLOOR = 0.1


class Pooling(str, enum.Enum):
    """How a stage's feature map `[H, W, C]` becomes a vector."""

    AVG = "avg"  # Global average: [C].
    AVG_MAX = "avg_max"  # Global average and max, concatenated: [2C].
    # The means of the map's four quadrants (top left, top right, bottom left,
    # bottom right; the middle row/column of an odd size goes to the bottom/
    # right) and the global max: [5C]. Where an object sits and what is next
    # to it is what tells early feature maps apart: with it, stage-0 nearest-
    # centre agreement with the full model rose from 76.4 to 89.8% on the zoo
    # VGG (docs/model_zoo.md). A map smaller than 2x2 is pooled as AVG_MAX.
    GRID = "grid"


class Centres(str, enum.Enum):
    """What stands for a class at a stage."""

    # The normalised class weights of the cosine classifier trained with the
    # encoder: nearest-centre lookup then is that classifier (closer to a
    # softmax head's accuracy than class means; see docs/).
    CLASS_WEIGHTS = "class_weights"
    # The normalised mean semantic vector of the class's training frames.
    MEAN = "mean"


def pool(activation, pooling: Pooling | str):
    """Pools a batch of feature maps `[B, H, W, C]` with TensorFlow ops."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    pooling = Pooling(pooling)
    # Two short means (over W, then H) instead of one over H*W: a float32 sum
    # of 784 values in sequence (TFLite's CPU kernels) is off by ~1e-5 in the
    # stage-0 similarities from a tree reduction (the GPU's); two sums of 28
    # keep every backend within 1e-6 of float64 (docs/gpu_and_quantization.md).
    height, width = activation.shape[1], activation.shape[2]
    if pooling is Pooling.GRID and height >= 2 and width >= 2:
        rows, cols = height // 2, width // 2
        channels = activation.shape[-1]
        if height % 2 == 0 and width % 2 == 0:
            # Equal quadrants: one AVERAGE_POOL_2D (a [rows, cols] window,
            # its own stride) gives their means in this order; on the CPU it
            # costs 2.5 us against 6.0 us for the slices and means below at
            # 28x28x32, and its float32 sums of rows * cols values stay as
            # close to float64 (1.6e-6 against 2.4e-6 on one such map).
            means = tf.nn.avg_pool2d(activation, [rows, cols], [rows, cols], "VALID")
            return tf.concat([tf.reshape(means, [-1, 4 * channels]),
                              tf.reduce_max(activation, axis=[1, 2])], axis=-1)
        left = tf.reduce_mean(activation[:, :, :cols], axis=2)  # [B, H, C]
        right = tf.reduce_mean(activation[:, :, cols:], axis=2)
        quadrants = [tf.reduce_mean(half[:, r], axis=1)
                     for r in (slice(None, rows), slice(rows, None)) for half in (left, right)]
        return tf.concat(quadrants + [tf.reduce_max(activation, axis=[1, 2])], axis=-1)
    avg = tf.reduce_mean(tf.reduce_mean(activation, axis=2), axis=1)
    if pooling is Pooling.AVG:
        return avg
    return tf.concat([avg, tf.reduce_max(activation, axis=[1, 2])], axis=-1)


def l2_normalize(v):
    """v / |v| written as v * rsqrt(max(sum(v * v), eps)): ops every GPU path supports.

    TFLite's L2_NORMALIZATION op is not supported by the GPU accelerator, and
    the converter fuses `v * rsqrt(sum(square(v)) + eps)` (and the `sqrt` and
    `maximum` forms) back into it; with `v * v` instead of `square` it keeps
    MUL, SUM, MAXIMUM and RSQRT (the converter's GPU gate checks this).
    `maximum` rather than `+ eps`: in a full-int8 model the added constant gets
    a scale ~1e-8 of the sum's, which XNNPACK's int8 ADD refuses to prepare;
    MAXIMUM requantizes eps to the sum's own scale.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    return v * tf.math.rsqrt(tf.maximum(tf.reduce_sum(v * v, axis=-1, keepdims=True), EPSILON))


def l2_normalize_np(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.sqrt(np.sum(v * v, axis=-1, keepdims=True) + EPSILON)


def check_dense_layers(kernels, biases) -> None:
    """Raises ValueError unless `kernels[i]` `[in, out]` and `biases[i]` `[out]` chain."""
    if not kernels or len(kernels) != len(biases):
        raise ValueError(f"Dense layers need one bias per kernel, got {len(kernels)} "
                         f"kernels and {len(biases)} biases.")
    for i, (k, b) in enumerate(zip(kernels, biases)):
        if k.ndim != 2 or b.shape != (k.shape[1],):
            raise ValueError(f"Layer {i}: kernel {k.shape} and bias {b.shape} do not fit.")
        if i and k.shape[0] != kernels[i - 1].shape[1]:
            raise ValueError(f"Layer {i} takes {k.shape[0]} inputs, the layer before "
                             f"gives {kernels[i - 1].shape[1]}.")


def dense_relu(x: np.ndarray, kernels, biases) -> np.ndarray:
    """Dense layers with ReLU between them (none after the last), in numpy."""
    for i, (k, b) in enumerate(zip(kernels, biases)):
        x = x @ k + b
        if i < len(kernels) - 1:
            x = np.maximum(x, 0.0)
    return x


def tf_dense_relu(x, kernels, biases):
    """`dense_relu` with TensorFlow ops (numpy weights become graph constants)."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    for i, (k, b) in enumerate(zip(kernels, biases)):
        x = tf.matmul(x, k) + b
        if i < len(kernels) - 1:
            x = tf.nn.relu(x)
    return x


@dataclasses.dataclass(frozen=True)
class StageFeatures:
    """Pooled features of every stage for a set of images, and the model's answer."""

    pooled: tuple[np.ndarray, ...]  # One [N, F_s] array per stage.
    probabilities: np.ndarray  # [N, C] output of the full model.

    @property
    def predictions(self) -> np.ndarray:
        return self.probabilities.argmax(axis=-1)


def extract_features(stage_models, head_model, images: np.ndarray,
                     pooling: Pooling | str, batch_size: int = 256) -> StageFeatures:
    """Runs the stage chain over `images` in batches and keeps pooled features.

    Only pooled vectors are kept, never whole feature maps, so memory stays
    proportional to N x channels.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    @tf.function(reduce_retracing=True)
    def forward(x):
        pooled = []
        a = x
        for stage in stage_models:
            a = stage(a, training=False)
            pooled.append(pool(a, pooling))
        return pooled, head_model(a, training=False)

    per_stage = [[] for _ in stage_models]
    probs = []
    ds = tf.data.Dataset.from_tensor_slices(images).batch(batch_size).prefetch(2)
    batches = -(-len(images) // batch_size)
    for batch in progress.bar(ds, total=batches, desc=f"stage features of {len(images)} images",
                              unit="batch"):
        pooled, p = forward(batch)
        for s, f in enumerate(pooled):
            per_stage[s].append(f.numpy())
        probs.append(np.asarray(p))
    return StageFeatures(tuple(np.concatenate(f) for f in per_stage),
                         np.concatenate(probs))


@dataclasses.dataclass(frozen=True)
class Encoder:
    """One stage's trained encoder: semantic = normalise(h @ kernel + bias).

    `h` is the pooled features, or with a hidden layer
    `relu(pool(a) @ hidden_kernel + hidden_bias)`.
    """

    kernel: np.ndarray  # [F, D], or [H, D] after a hidden layer.
    bias: np.ndarray  # [D]
    hidden_kernel: np.ndarray | None = None  # [F, H]
    hidden_bias: np.ndarray | None = None  # [H]

    def __post_init__(self):
        if (self.hidden_kernel is None) != (self.hidden_bias is None):
            raise ValueError("An encoder's hidden layer needs both a kernel and a bias.")
        check_dense_layers(self.kernels, self.biases)

    @classmethod
    def from_layers(cls, layers) -> "Encoder":
        """The encoder of one or two (kernel, bias) layers, first to last."""
        (kernel, bias), hidden = layers[-1], tuple(layers[:-1])
        return cls(kernel, bias, *(hidden[0] if hidden else ()))

    @property
    def dim(self) -> int:
        return int(self.kernel.shape[1])

    @property
    def hidden_units(self) -> int:
        """Units of the hidden layer (0: a linear projection)."""
        return 0 if self.hidden_kernel is None else int(self.hidden_kernel.shape[1])

    @property
    def kernels(self) -> tuple[np.ndarray, ...]:
        """The weight matrices in the order they apply."""
        return (self.kernel,) if self.hidden_kernel is None else (self.hidden_kernel,
                                                                  self.kernel)

    @property
    def biases(self) -> tuple[np.ndarray, ...]:
        return (self.bias,) if self.hidden_bias is None else (self.hidden_bias, self.bias)

    def encode(self, pooled: np.ndarray) -> np.ndarray:
        return l2_normalize_np(dense_relu(pooled, self.kernels, self.biases))

    def tf_encode(self, pooled):
        """`encode` as TensorFlow ops, the weights as graph constants."""
        return l2_normalize(tf_dense_relu(pooled, self.kernels, self.biases))


@dataclasses.dataclass(frozen=True)
class Standardisation:
    """Per-channel `(x - mean) / scale` of pooled features; dead channels dropped."""

    mean: np.ndarray  # [F]
    scale: np.ndarray  # [F], >= STD_FLOOR * the largest std; 1 on dead channels.
    live: np.ndarray  # [F] bool: False for channels with ~0 variance.

    @classmethod
    def fit(cls, pooled: np.ndarray) -> "Standardisation":
        """Statistics of `pooled` `[N, F]` (computed in float64)."""
        x = np.asarray(pooled, np.float64)
        mean = x.mean(axis=0)
        std = x.std(axis=0)
        widest = float(std.max()) if std.size else 0.0
        live = std > DEAD_CHANNEL_STD * widest
        scale = np.where(live, np.maximum(std, STD_FLOOR * widest), 1.0)
        return cls(mean, scale, live)

    def apply(self, pooled: np.ndarray) -> np.ndarray:
        """The live channels of `pooled`, standardised: `[N, live channels]`."""
        x = np.asarray(pooled, np.float64)[:, self.live]
        return ((x - self.mean[self.live]) / self.scale[self.live]).astype(np.float32)

    def fold(self, kernel: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The layer on raw pooled features equal to `kernel`, `bias` on standardised ones.

        `kernel` has one row per live channel; dead channels get zero rows.
        """
        kernel = np.asarray(kernel, np.float64)
        folded = np.zeros((self.live.size, kernel.shape[1]))
        folded[self.live] = kernel / self.scale[self.live, None]
        b = np.asarray(bias, np.float64) - (self.mean[self.live] / self.scale[self.live]) @ kernel
        return folded.astype(np.float32), b.astype(np.float32)


def train_encoder(pooled: np.ndarray, labels: np.ndarray, num_classes: int,
                  dim: int = 32, hidden: int = 0, epochs: int = 30, scale: float = 16.0,
                  margin: float = 0.2, batch_size: int = 256,
                  learning_rate: float = 3e-3, seed: int = 0) -> tuple[Encoder, np.ndarray]:
    """Trains an encoder with the CosFace loss on pooled features.

    CosFace: logits = scale * (cos(v, w_y) - margin) for the true class and
    scale * cos(v, w_j) otherwise, with v and the class weights w normalised,
    so classes separate by angle: what the nearest-centre lookup relies on.

    The encoder is trained on standardised live channels
    (`Standardisation`) and the standardisation folded into its first kernel:
    dead channels get zero rows, and no weight exceeds the trained one by
    more than 1 / (STD_FLOOR * the largest channel std).

    Args:
      hidden: units of a ReLU layer before the projection (0: none).

    Returns:
      (encoder, class weights): the weights are unit vectors `[C, D]`, the
      classifier's own view of where each class lies.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    import tf_keras  # pylint: disable=import-outside-toplevel

    if pooled.shape[0] != labels.shape[0]:
        raise ValueError(f"{pooled.shape[0]} feature rows for {labels.shape[0]} labels.")
    if dim < 2:
        raise ValueError(f"embedding dim must be >= 2, got {dim}.")
    if hidden < 0:
        raise ValueError(f"hidden units must be >= 0, got {hidden}.")
    tf.random.set_seed(seed)
    rng = np.random.default_rng(seed)
    standardisation = Standardisation.fit(pooled)
    x_std = standardisation.apply(pooled)
    feat_dim = x_std.shape[1]
    widths = [feat_dim] + ([hidden] if hidden else []) + [dim]
    if feat_dim == 0:
        # Every channel is constant: nothing to learn. A zero semantic vector
        # is similar to no class (0 to every centre), so the stage never exits.
        logging.warning("All %d pooled channels are constant on the training images; "
                        "the stage's encoder is zero.", pooled.shape[1])
        widths[0] = pooled.shape[1]
        return (Encoder.from_layers([(np.zeros((i, o), np.float32), np.zeros(o, np.float32))
                                     for i, o in zip(widths[:-1], widths[1:])]),
                l2_normalize_np(rng.normal(size=(num_classes, dim))))
    kernels, biases = [], []  # Variables, first layer to last.
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        glorot = np.sqrt(6.0 / (fan_in + fan_out))
        kernels.append(tf.Variable(rng.uniform(-glorot, glorot, (fan_in, fan_out))
                                   .astype(np.float32)))
        biases.append(tf.Variable(np.zeros(fan_out, np.float32)))

    def embed(x):
        return l2_normalize(tf_dense_relu(x, kernels, biases))

    weights0 = rng.normal(size=(dim, num_classes)).astype(np.float32)
    # Class weights start at the classes' mean initial embeddings (the
    # nearest-centre classifier of the random encoder), not at random
    # directions that a short training may not untangle.
    means = class_centres(embed(x_std).numpy(), labels, num_classes)
    present = np.linalg.norm(means, axis=1) > 0
    weights0[:, present] = means[present].T
    weights = tf.Variable(weights0)
    variables = [v for layer in zip(kernels, biases) for v in layer] + [weights]
    steps = epochs * int(np.ceil(len(pooled) / batch_size))
    schedule = tf_keras.optimizers.schedules.CosineDecay(learning_rate, steps)
    optimizer = tf_keras.optimizers.Adam(schedule)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            v = embed(x)
            w = weights * tf.math.rsqrt(
                tf.reduce_sum(tf.square(weights), axis=0, keepdims=True) + EPSILON)
            cos = tf.matmul(v, w)
            logits = scale * (cos - margin * tf.one_hot(y, num_classes))
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    ds = (tf.data.Dataset.from_tensor_slices((x_std, labels.astype(np.int32)))
          .shuffle(len(x_std), seed=seed).batch(batch_size))
    with progress.bar(total=steps, desc="encoder training", unit="step") as bar:
        for _ in range(epochs):
            for xb, yb in ds:
                step(xb, yb)
                bar.update()
    class_weights = l2_normalize_np(weights.numpy().T)
    layers = [(k.numpy(), b.numpy()) for k, b in zip(kernels, biases)]
    layers[0] = standardisation.fold(*layers[0])
    return Encoder.from_layers(layers), class_weights


def class_centres(semantic: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Normalised mean semantic vector per class, `[C, D]`.

    A class with no samples gets a zero centre (similarity 0 to everything), so
    it can never be the nearest with a margin.
    """
    centres = np.zeros((num_classes, semantic.shape[1]), np.float32)
    for c in range(num_classes):
        members = semantic[labels == c]
        if len(members):
            centres[c] = members.mean(axis=0)
    norms = np.linalg.norm(centres, axis=1, keepdims=True)
    return np.where(norms > 0, centres / np.maximum(norms, EPSILON), 0.0).astype(np.float32)
