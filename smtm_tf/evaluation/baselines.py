"""The early-exit designs a user would pick instead of SMTM, on SMTM's stages.

Two published designs, rebuilt on the same stage cut points as the semantic
memory, the same pooled features, the same held-out calibration frames and
the same budget calibration (`exit_policy.calibrate_scores`, Wilson bound):

* `BRANCHY` (BranchyNet, Teerapittayanon et al. 2016): a softmax classifier
  branch after each stage, trained on the true labels (as BranchyNet trains
  its branches); a frame exits where the prediction's entropy is below the
  stage's threshold.
* `LEARNED_CACHE` (GATI, Balasubramanian et al. 2021, "Accelerating Deep
  Learning Inference via Learned Caches"): after each stage a small learned
  model (an MLP with one hidden layer) that predicts the *full model's*
  output, trained on the model's own predictions; the cache "hits" when its
  confidence (top probability) passes the stage's threshold.

What differs from SMTM is only the decision: SMTM scores a stage's semantic
vector against class centres (with a layer-aware metric, and a cache of hot
classes that adapts to the stream); these heads are fixed classifiers whose
confidence ignores the stream.

Both heads read the stage's feature map pooled as the memory pools it
(global average and max), run inside the .tflite as extra signatures
`<method>_stage_<i>` (activation -> next_activation, probabilities), and are
decided on the host by `confidence`, the same function calibration uses.
"""

from __future__ import annotations

import dataclasses
import enum
import json

import numpy as np

from smtm_tf.fitting import encoders as enc
from smtm_tf.fitting import memory as memory_lib
from smtm_tf.runtime import exit_policy
from smtm_tf.runtime import io_utils
from smtm_tf.runtime import preprocessing as prep
from converters import smtm_converter as conv
from smtm_tf.fitting import stages as stages_lib
from smtm_tf.runtime import descriptor as desc
from smtm_tf.runtime import metadata

BASELINES_FORMAT_VERSION = 1
_TINY = np.float32(1e-30)


class Method(str, enum.Enum):
    """A baseline early-exit design."""

    BRANCHY = "branchynet"
    LEARNED_CACHE = "learned_cache"


class BaselineFileError(ValueError):
    """Raised when a baselines file is unreadable or of another version."""


@dataclasses.dataclass(frozen=True)
class Head:
    """A per-stage head on pooled features: dense layers, ReLU between them,
    softmax at the end. Input standardisation is folded into the first layer.

    Attributes:
      kernels: `[F, H1]`, ..., `[Hn, C]` weights.
      biases: one bias per kernel.
    """

    kernels: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]

    def __post_init__(self):
        enc.check_dense_layers(self.kernels, self.biases)

    def probabilities(self, pooled: np.ndarray) -> np.ndarray:
        """Softmax outputs `[N, C]` for pooled features `[N, F]` (numpy, float32)."""
        x = enc.dense_relu(np.asarray(pooled, np.float32), self.kernels, self.biases)
        x = x - x.max(axis=-1, keepdims=True)
        e = np.exp(x)
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)

    def tf_probabilities(self, pooled):
        """The same computation with TensorFlow ops (weights become constants)."""
        import tensorflow as tf  # pylint: disable=import-outside-toplevel

        return tf.nn.softmax(enc.tf_dense_relu(pooled, self.kernels, self.biases))

    @property
    def macs(self) -> int:
        return int(sum(k.size for k in self.kernels))


def confidence(method: Method | str, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A baseline's (top-1 class, confidence) for `[..., C]` probabilities.

    Higher confidence is safer: BranchyNet's is minus the entropy (it exits
    when entropy < threshold), the learned cache's the top probability.
    Calibration and the harness both call this, so they decide alike.
    """
    p = np.asarray(probabilities, np.float32)
    top1 = p.argmax(axis=-1)
    if Method(method) is Method.BRANCHY:
        # p log p with 0 log 0 = 0 (the floor only guards the log).
        return top1, (p * np.log(np.maximum(p, _TINY))).sum(axis=-1).astype(np.float32)
    return top1, p.max(axis=-1).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class BaselineHeads:
    """The trained heads of both baselines, one per stage of a stage plan.

    Attributes:
      cut_layers: the stage plan's cut layers (checked against the memory's).
      pooling: how the stage feature maps are pooled (the memory's pooling).
      heads: per method, one `Head` per stage.
      stage_agreement: per method, each head's agreement with the full model
        on the frames it was trained on (for reports).
    """

    cut_layers: tuple[str, ...]
    pooling: enc.Pooling
    heads: dict
    stage_agreement: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "pooling", enc.Pooling(self.pooling))
        heads = {Method(m): tuple(h) for m, h in self.heads.items()}
        for m, h in heads.items():
            if len(h) != len(self.cut_layers):
                raise ValueError(f"{m.value} has {len(h)} heads for "
                                 f"{len(self.cut_layers)} stages.")
        object.__setattr__(self, "heads", heads)
        object.__setattr__(self, "stage_agreement",
                           {Method(m): tuple(a) for m, a in self.stage_agreement.items()})

    @property
    def methods(self) -> tuple[Method, ...]:
        return tuple(self.heads)

    def stage_tops(self, method: Method | str, pooled) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per stage (top-1, confidence) of `method` for pooled features `[N, F_s]`."""
        method = Method(method)
        return [confidence(method, h.probabilities(p))
                for h, p in zip(self.heads[method], pooled)]

    def summary(self) -> str:
        parts = []
        for m, a in self.stage_agreement.items():
            parts.append(f"{m.value} agreement with full per stage "
                         + "/".join(f"{100 * x:.1f}" for x in a))
        return "; ".join(parts)

    def save(self, path: str) -> None:
        """Writes the heads to `path` (.npz) atomically."""
        meta = {"format_version": BASELINES_FORMAT_VERSION,
                "cut_layers": list(self.cut_layers), "pooling": self.pooling.value,
                "layers": {m.value: [len(h.kernels) for h in hs] for m, hs in self.heads.items()},
                "stage_agreement": {m.value: list(a) for m, a in self.stage_agreement.items()}}
        arrays = {"meta": np.array(json.dumps(meta))}
        for m, hs in self.heads.items():
            for s, h in enumerate(hs):
                for i, (k, b) in enumerate(zip(h.kernels, h.biases)):
                    arrays[f"{m.value}_{s}_kernel_{i}"] = k
                    arrays[f"{m.value}_{s}_bias_{i}"] = b
        io_utils.write_npz_atomic(path, arrays)

    @classmethod
    def load(cls, path: str) -> "BaselineHeads":
        """Reads a baselines file.

        Raises:
          BaselineFileError: for a missing, damaged or other-version file.
        """
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
            meta = json.loads(str(arrays["meta"]))
            if meta.get("format_version") != BASELINES_FORMAT_VERSION:
                raise BaselineFileError(
                    f"{path} has baselines format version {meta.get('format_version')!r}; "
                    f"this smtm_tf reads version {BASELINES_FORMAT_VERSION}.")
            heads = {}
            for m, layers in meta["layers"].items():
                heads[m] = tuple(
                    Head(tuple(arrays[f"{m}_{s}_kernel_{i}"] for i in range(n)),
                         tuple(arrays[f"{m}_{s}_bias_{i}"] for i in range(n)))
                    for s, n in enumerate(layers))
            return cls(tuple(meta["cut_layers"]), meta["pooling"], heads,
                       meta.get("stage_agreement", {}))
        except BaselineFileError:
            raise
        except Exception as e:  # pylint: disable=broad-except
            raise BaselineFileError(
                f"{path} is not a baselines file ({type(e).__name__}: {e}). Recreate it "
                "with scripts/train_models.py --steps=baselines.") from e


def train_head(pooled: np.ndarray, targets: np.ndarray, num_classes: int,
               hidden: tuple[int, ...] = (), epochs: int = 10, batch_size: int = 256,
               learning_rate: float = 3e-3, seed: int = 0) -> Head:
    """Trains a softmax head (with optional hidden ReLU layers) on pooled features.

    Inputs are standardised with the training statistics, folded into the
    first kernel afterwards, so the head takes raw pooled features.
    """
    import tf_keras  # pylint: disable=import-outside-toplevel

    if pooled.shape[0] != targets.shape[0]:
        raise ValueError(f"{pooled.shape[0]} feature rows for {targets.shape[0]} targets.")
    tf_keras.utils.set_random_seed(seed)
    mean = pooled.mean(axis=0)
    std = pooled.std(axis=0) + 1e-6
    layers = [tf_keras.Input((pooled.shape[1],))]
    layers += [tf_keras.layers.Dense(h, activation="relu") for h in hidden]
    layers.append(tf_keras.layers.Dense(num_classes, activation="softmax"))
    model = tf_keras.Sequential(layers)
    steps = epochs * int(np.ceil(len(pooled) / batch_size))
    model.compile(tf_keras.optimizers.Adam(
        tf_keras.optimizers.schedules.CosineDecay(learning_rate, steps)),
        "sparse_categorical_crossentropy")
    model.fit(((pooled - mean) / std).astype(np.float32), targets.astype(np.int64),
              epochs=epochs, batch_size=batch_size, verbose=0, shuffle=True)
    weights = model.get_weights()
    kernels = [np.asarray(w, np.float32) for w in weights[0::2]]
    biases = [np.asarray(b, np.float32) for b in weights[1::2]]
    biases[0] = (biases[0] - (mean / std) @ kernels[0]).astype(np.float32)
    kernels[0] = (kernels[0] / std[:, None]).astype(np.float32)
    return Head(tuple(kernels), tuple(biases))


def train_baselines(model, plan, x_train: np.ndarray, y_train: np.ndarray,
                    pooling: enc.Pooling | str = memory_lib.POOLING,
                    learned_cache_hidden: int = 128, epochs: int = 10,
                    batch_size: int = 256, seed: int = 0) -> BaselineHeads:
    """Trains both baselines' heads on the stages of `plan`.

    Args:
      model: the trained Keras classifier.
      plan: the stage plan (the semantic memory's, so cut points are shared).
      x_train: the images the memory's encoders were trained on.
      y_train: their true labels (BranchyNet's targets); the learned cache
        learns the full model's predictions on the same images instead.
      pooling: the memory's pooling.
      learned_cache_hidden: hidden units of the learned cache's MLP.

    Returns:
      The trained heads.
    """

    stage_models, head = stages_lib.split_model(model, plan)
    features = enc.extract_features(stage_models, head, x_train, pooling, batch_size)
    full = features.predictions
    num_classes = features.probabilities.shape[1]
    heads = {Method.BRANCHY: [], Method.LEARNED_CACHE: []}
    for s, pooled in enumerate(features.pooled):
        heads[Method.BRANCHY].append(train_head(
            pooled, np.asarray(y_train), num_classes, (), epochs, batch_size, seed=seed + s))
        heads[Method.LEARNED_CACHE].append(train_head(
            pooled, full, num_classes, (learned_cache_hidden,), epochs, batch_size,
            seed=seed + 100 + s))
    result = BaselineHeads(plan.cut_layers, pooling, heads)
    agreement = {m: tuple(float((t == full).mean())
                          for t, _ in result.stage_tops(m, features.pooled))
                 for m in result.methods}
    return dataclasses.replace(result, stage_agreement=agreement)


def calibrate(heads: BaselineHeads, method: Method | str, pooled, full_predictions,
              stage_costs, target_agreement: float) -> exit_policy.ExitRule:
    """Per-stage confidence thresholds for `method`, calibrated as SMTM's rule is.

    The returned rule's metric only labels it; its thresholds apply to
    `confidence(method, ...)`.
    """
    return exit_policy.calibrate_scores(heads.stage_tops(method, pooled), full_predictions,
                                        stage_costs, target_agreement)


def signatures(heads: BaselineHeads, stage_models, input_shape) -> dict:
    """The baselines' `tf.function`s, to convert beside the SMTM signatures.

    Per method and stage `<method>_stage_<i>`: activation -> next_activation
    and the head's probabilities `[C]`.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    def stage_fn(stage, head):
        def fn(activation):
            a = stage(activation, training=False)
            p = head.tf_probabilities(enc.pool(a, heads.pooling))
            return {"next_activation": a, "probabilities": tf.reshape(p, [-1])}
        return fn

    sigs = {}
    shapes = [tuple(input_shape)] + [tuple(int(d) for d in m.outputs[0].shape[1:])
                                     for m in stage_models[:-1]]
    for method, hs in heads.heads.items():
        for s, (stage, head) in enumerate(zip(stage_models, hs)):
            sigs[signature_key(method, s)] = tf.function(stage_fn(stage, head), input_signature=[
                tf.TensorSpec((1,) + shapes[s], tf.float32, name="activation")])
    return sigs


def signature_key(method: Method | str, stage: int) -> str:
    return f"{Method(method).value}_stage_{stage}"


class BaselineRuntime:
    """Runs one baseline on a loaded model, frame by frame, as SmtmRuntime runs
    SMTM: zero-copy views, one invoke per stage, a host-side decision on the
    stage's output, the shared `head` signature when no stage exits.

    Args:
      session: a backend session of a .tflite holding the baseline's signatures.
      method: the baseline.
      rule: its calibrated thresholds on `confidence` (`exit_policy.ExitRule`).
      head_key: the signature that finishes the model from the last stage.
    """

    def __init__(self, session, method: Method | str, rule: exit_policy.ExitRule,
                 head_key: str = "head"):
        self.method = Method(method)
        self.rule = rule
        self.num_stages = rule.num_stages
        self._head = session.signature(head_key)
        self._head_in = self._head.input_view("activation")
        self._head_out = self._head.output_view("probabilities")
        inf = float("inf")
        self._plan = []
        for s in range(self.num_stages):
            st = session.signature(signature_key(self.method, s))
            t = rule.thresholds[s]
            self._plan.append((st.invoke, st.input_view("activation"),
                               st.output_view("probabilities"), st.output_view("next_activation"),
                               inf if t is None else t, t is None))

    def reset_cache(self) -> None:
        """Nothing to reset: the baselines keep no state between frames."""

    @property
    def stage_invokes(self) -> list:
        """The bare invoke of each stage signature (for overhead measurements)."""
        return [p[0] for p in self._plan]

    @property
    def head_invoke(self):
        return self._head.invoke

    def classify_fast(self, frame: np.ndarray) -> tuple[int, int]:
        """(class_id, exit_stage) for a float32 frame shaped like the model's input."""
        activation = frame
        copyto, log, maximum = np.copyto, np.log, np.maximum
        entropy = self.method is Method.BRANCHY
        for s, (invoke, act_in, probs, next_act, threshold, never) in enumerate(self._plan):
            copyto(act_in, activation)
            invoke()
            if not never:
                # `confidence` for one frame, without its generic checks.
                value = ((probs * log(maximum(probs, _TINY))).sum() if entropy
                         else probs.max())
                if value >= threshold:
                    return int(probs.argmax()), s
            activation = next_act
        copyto(self._head_in, activation)
        self._head.invoke()
        return int(self._head_out.argmax()), self.num_stages


def convert(model, memory, heads: BaselineHeads, check_images: np.ndarray,
            atol: float = 1e-5) -> bytes:
    """The SMTM .tflite of `model` and `memory` with the baselines' signatures added.

    Built by the SMTM converter's own steps (module, conversion, descriptor,
    checks), so the baselines run the same stage graphs through the same
    interpreter; the baselines' probabilities are checked against the numpy
    heads on `check_images`.

    Raises:
      ValueError: when the heads were trained on other cut points.
      converters.smtm_converter.ConversionError: when a check fails.
    """

    if tuple(heads.cut_layers) != tuple(memory.plan.cut_layers):
        raise ValueError(f"The baselines' heads were trained on stages ending at "
                         f"{heads.cut_layers}, the memory's end at {memory.plan.cut_layers}.")
    # pylint: disable=protected-access
    builder = conv.SignatureBuilder(model, memory)
    sigs = builder.signatures()
    sigs.update(signatures(heads, builder.stage_models, builder.input_shape))
    flat = conv.convert_module(builder.module, sigs)
    # pylint: enable=protected-access
    flat = metadata.add_digest(metadata.add_metadata(
        flat, desc.METADATA_NAME,
        builder.descriptor(model.name, prep.Preprocessing.raw()).to_json().encode()))
    conv.check_conversion(flat, model, memory, check_images, builder.apply_softmax, atol)
    # Like the similarities, the heads' outputs pass through a whole stage of
    # float32 convolutions (Keras vs XNNPACK) before the head: the same
    # allowance as the converter's similarity check.
    check_signatures(flat, heads, builder.stage_models, check_images, max(100 * atol, 1e-4))
    return flat


def check_signatures(flat: bytes, heads: BaselineHeads, stage_models, images: np.ndarray,
                     atol: float = 1e-5) -> float:
    """Compares the baselines' signatures with Keras stages and the numpy heads.

    Returns:
      The largest absolute difference of probabilities.

    Raises:
      converters.smtm_converter.ConversionError: beyond `atol`.
    """
    from ai_edge_litert import interpreter as litert  # pylint: disable=import-outside-toplevel

    interp = litert.Interpreter(model_content=flat, num_threads=1)
    diff = 0.0
    for image in images.astype(np.float32):
        keras_a = image[None]
        acts = {m: image[None] for m in heads.methods}
        for s, stage_model in enumerate(stage_models):
            keras_a = np.asarray(stage_model(keras_a, training=False))
            pooled = np.asarray(enc.pool(keras_a, heads.pooling))
            for m in heads.methods:
                out = interp.get_signature_runner(signature_key(m, s))(activation=acts[m])
                acts[m] = out["next_activation"]
                want = heads.heads[m][s].probabilities(pooled)[0]
                diff = max(diff, float(np.max(np.abs(out["probabilities"] - want))))
    if not diff <= atol:
        raise conv.ConversionError(
            f"The baselines' signatures differ from their numpy heads by {diff:.3g} "
            f"(tolerance {atol}).")
    return diff
