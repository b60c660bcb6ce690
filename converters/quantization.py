"""Quantization variants of the SMTM .tflite.

Every variant keeps float32 signature inputs and outputs: the converter puts
QUANTIZE / DEQUANTIZE ops inside the graph, so a host runtime feeds the same
frames, activations and centres whatever the variant, and reads the same
similarities. The descriptor's `quantization` field records the variant.

  float32  no quantization.
  float16  weights stored as float16 (dequantized at load; float32 kernels).
  dynamic  dynamic-range int8: int8 weights, activations quantized on the fly.
  int8     full integer post-training quantization, calibrated with a
           representative dataset drawn from the training images (every
           signature's inputs, the centres included).
  qat      quantization-aware training with tensorflow-model-optimization
           (tf_keras models; each stage model is quantized separately), then
           an int8 conversion of the fine-tuned model.

Refused: `int16x8` (16-bit activations). tflite-runtime 2.14, which apps
still ship, has no INT16 kernels for ops the stages use (RSQRT), so such a
model would not load there.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import io
import math

from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils
import numpy as np
from smtm_tf.fitting import kerascompat

# Variants whose models load and run on tflite-runtime 2.14 (checked by
# tests/test_old_runtime.py and CI).
COMPATIBLE_WITH_TFLITE_2_14 = ("float32", "float16", "dynamic", "int8", "qat")


class Quantization(str, enum.Enum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    DYNAMIC = "dynamic"
    INT8 = "int8"
    QAT = "qat"


# Known to the converter but refused, with the reason.
REFUSED = {
    "int16x8": "16-bit activations need INT16 kernels (e.g. RSQRT) that tflite-runtime "
               "2.14 and other runtimes apps ship do not have; the model would not load "
               "there. Use int8 or qat.",
}


class QuantizationError(ValueError):
    """An unknown or refused quantization variant."""


def parse(name: str | Quantization) -> Quantization:
    """The variant named `name`; raises QuantizationError for refused or unknown ones."""
    if isinstance(name, Quantization):
        return name
    if name in REFUSED:
        raise QuantizationError(f"Quantization {name!r} is refused: {REFUSED[name]}")
    try:
        return Quantization(name)
    except ValueError:
        raise QuantizationError(
            f"Unknown quantization {name!r}; choose one of "
            f"{[q.value for q in Quantization]}.") from None


def configure(converter, quantization: Quantization, representative_dataset=None) -> None:
    """Sets a TFLiteConverter's options for the variant.

    Args:
      converter: a `tf.lite.TFLiteConverter`.
      quantization: the variant.
      representative_dataset: for int8, a callable returning an iterator of
        `(signature_key, {input_name: array})`.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    q = parse(quantization)
    if q == Quantization.FLOAT32:
        return
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if q == Quantization.FLOAT16:
        converter.target_spec.supported_types = [tf.float16]
    elif q == Quantization.INT8:
        if representative_dataset is None:
            raise QuantizationError("int8 quantization needs a representative dataset.")
        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    elif q == Quantization.DYNAMIC:
        # Per-channel int8 weights make hybrid FULLY_CONNECTED version 12,
        # which tflite-runtime 2.14 cannot load (measured on the demo model);
        # per-tensor weights give a version it has. (Tensors under 1024
        # elements stay float, so tiny models never showed it.)
        converter._experimental_disable_per_channel_quantization_for_dense_layers = True  # pylint: disable=protected-access
    # DYNAMIC: weights only. QAT: the fake-quant ranges learnt in training.
    # Signature inputs and outputs stay float32 in every case (the default
    # inference_input_type / inference_output_type).


# XNNPACK's int8 (QS8) operators refuse some ratios of their tensors' scales
# when the runtime is created ("failed to create XNNPACK runtime"); the TFLite
# converter does not check them. Limits from XNNPACK's operator constructors.
_MAX_REQUANTIZATION = 256.0  # input * weight / output scale, convolutions and FC.
_MUL_RANGE = (2.0 ** -16, 2.0 ** 8)  # input1 * input2 / output scale.
_ADD_RANGE = (2.0 ** -10, 2.0 ** 8)  # each input / output scale.
_WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")


@dataclasses.dataclass(frozen=True)
class XnnpackScaleProblem:
    """An int8 op whose scales XNNPACK refuses."""

    signature: str
    index: int  # The op's position in the signature's subgraph.
    op: str  # e.g. "FULLY_CONNECTED".
    output: str  # Name of the op's output tensor.
    ratio: float
    allowed: str  # e.g. "< 256".
    what: str  # How the ratio is formed.
    weight_shape: tuple[int, ...] | None = None  # Constant weights' shape, if any.

    def format(self) -> str:
        return (f"{self.op} (op {self.index} of {self.signature}, output '{self.output}'): "
                f"{self.what} = {self.ratio:.4g}, XNNPACK needs {self.allowed}")


def xnnpack_scale_problems(model_content: bytes, signature: str) -> list[XnnpackScaleProblem]:
    """The int8 ops of `signature` whose scale ratios XNNPACK refuses to prepare.

    Args:
      model_content: a .tflite flatbuffer.
      signature: a signature key of it.

    Returns:
      One entry per refused op, in execution order (empty when none).
    """
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_content))
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    sigs = [sg for sg in model.signatureDefs or [] if _text(sg.signatureKey) == signature]
    if not sigs:
        raise KeyError(f"The model has no signature {signature!r}.")
    subgraph = model.subgraphs[sigs[0].subgraphIndex]
    tensors = subgraph.tensors

    def scales(index):
        if index < 0:
            return None
        t = tensors[index]
        if t.type != schema.TensorType.INT8 or t.quantization is None \
                or t.quantization.scale is None or not len(t.quantization.scale):
            return None
        return np.asarray(t.quantization.scale, np.float64)

    problems = []
    for i, op in enumerate(subgraph.operators or []):
        code = model.operatorCodes[op.opcodeIndex]
        name = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "")
        ins = [scales(t) for t in op.inputs]
        out = scales(op.outputs[0]) if len(op.outputs) else None
        if out is None or not ins or ins[0] is None:
            continue
        found = None
        if name in _WEIGHTED_OPS and len(ins) > 1 and ins[1] is not None:
            data, weights = (ins[2], ins[1]) if name == "TRANSPOSE_CONV" else (ins[0], ins[1])
            if data is None:
                continue
            ratio = float(np.max(data[0] * weights / out[0]))
            if not ratio < _MAX_REQUANTIZATION:
                w = tensors[op.inputs[1]]
                constant = w.buffer > 0 and model.buffers[w.buffer].data is not None
                found = (ratio, f"< {_MAX_REQUANTIZATION:g}",
                         "input scale x largest weight scale / output scale",
                         tuple(int(d) for d in w.shape) if constant else None)
        elif name == "MUL" and len(ins) == 2 and ins[1] is not None:
            ratio = float(ins[0][0] * ins[1][0] / out[0])
            if not _MUL_RANGE[0] <= ratio < _MUL_RANGE[1]:
                found = (ratio, "in [2**-16, 2**8)", "input1 x input2 / output scale", None)
        elif name in ("ADD", "SUB") and len(ins) == 2 and ins[1] is not None:
            for k, s_in in enumerate(ins):
                ratio = float(s_in[0] / out[0])
                if not _ADD_RANGE[0] <= ratio < _ADD_RANGE[1]:
                    found = (ratio, "in [2**-10, 2**8)", f"input{k + 1} / output scale", None)
                    break
        if found:
            problems.append(XnnpackScaleProblem(signature, i, name,
                                                _text(tensors[op.outputs[0]].name), *found))
    return problems


def xnnpack_refusal(model_content: bytes, signature: str, encoder=None) -> str:
    """Explains why XNNPACK refuses `signature`, and what works instead.

    Args:
      model_content: the quantized .tflite flatbuffer.
      signature: the refused signature's key.
      encoder: the stage's `smtm_tf.fitting.encoders.Encoder` when it is a stage
        signature, to tell when the refused op is its projection.

    Returns:
      Sentences for an error message.
    """
    advice = ("Nothing was written; float16 and dynamic keep float activations and run "
              "there (--quantize=float16 or dynamic).")
    problems = xnnpack_scale_problems(model_content, signature)
    if not problems:
        return advice
    text = "XNNPACK refuses the int8 scales of " + "; ".join(p.format() for p in problems)
    if encoder is not None and any(p.weight_shape == k.T.shape
                                   for p in problems for k in encoder.kernels):
        largest = max(float(np.max(np.abs(k))) for k in encoder.kernels)
        text += (f". That op is the stage's semantic encoder, whose largest weight is "
                 f"{largest:.3g}. An encoder's weights scale as 1 / the spread of its "
                 "stage's pooled features: a memory fitted before the encoders bounded "
                 "their weights (zero rows for dead channels, a relative std floor) has "
                 "huge weights on near-constant features (refit it), and so has a stage "
                 "whose features are all tiny, in a model whose activations fade through "
                 "the network (an untrained MobileNet v1 0.5's last stage: features of "
                 "2.4e-13, weights of 6.6e13)")
    return text + ". " + advice


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclasses.dataclass(frozen=True)
class OpError:
    """One quantized op output's int8 error (`QuantizationDebugger`'s layer statistics)."""
    op: str
    tensor: str
    rmse_per_scale: float  # RMSE against the float op, in quantization steps.


def op_errors(debugger) -> list[OpError]:
    """A `tf.lite.experimental.QuantizationDebugger`'s per-op errors, largest first."""
    buffer = io.StringIO()
    debugger.layer_statistics_dump(buffer)
    buffer.seek(0)
    errors = []
    for row in csv.DictReader(buffer):
        scale = float(row["scale"])
        if scale > 0:
            errors.append(OpError(row["op_name"], row["tensor_name"],
                                  math.sqrt(float(row["mean_squared_error"])) / scale))
    return sorted(errors, key=lambda e: -e.rmse_per_scale)


def explain_int8_errors(errors: list[OpError], top: int = 3) -> str:
    """Which ops lose most in int8, whether one stands out, and what works instead."""
    instead = ("Instead: --quantize=float16 (float math, half-size weights), dynamic (int8 "
               "weights, float activations), or qat (fine-tunes the model for int8).")
    if not errors:
        return instead
    worst = errors[:top]
    named = ", ".join(f"{e.op} {e.tensor.split(';')[0]} ({e.rmse_per_scale:.2f})"
                      for e in worst)
    median = errors[len(errors) // 2].rmse_per_scale
    if worst[0].rmse_per_scale > 4 * max(median, 1e-6):
        where = (f"{worst[0].op} at {worst[0].tensor.split(';')[0]} stands out (the median "
                 f"op: {median:.2f}): its range suits int8 badly.")
    else:
        where = (f"No op stands out (the median op: {median:.2f}): the error is spread over "
                 f"the {len(errors)} quantized ops and adds up along the graph.")
    return (f"Largest int8 errors (RMSE in quantization steps, TensorFlow's "
            f"QuantizationDebugger): {named}. {where} {instead}")


def representative_dataset(stage_models, centres, images: np.ndarray, full_key: str = "full",
                           head_key: str = "head"):
    """A multi-signature representative dataset from real training images.

    Each image yields samples for `full`, every stage (its real input
    activation, computed by the float Keras stage models, and the centres the
    runtime feeds) and the head.

    Args:
      stage_models: the Keras stage models, in order.
      centres: per stage, the `[K, D]` centres array fed to its signature.
      images: training images `[N, H, W, C]` (a few hundred are plenty).

    Returns:
      A callable for `converter.representative_dataset`.
    """
    images = np.asarray(images, np.float32)
    activations = []
    a = images
    for stage in stage_models:
        activations.append(a)
        a = np.asarray(stage.predict(a, verbose=0, batch_size=64), np.float32)
    last = a

    def gen():
        for i in range(len(images)):
            yield full_key, {"image": images[i:i + 1]}
            for s, acts in enumerate(activations):
                yield f"stage_{s}", {"activation": acts[i:i + 1],
                                     "centres": np.asarray(centres[s], np.float32)}
            yield head_key, {"activation": last[i:i + 1]}
    return gen


def qat_models(stage_models, head_model, x_train: np.ndarray, y_train: np.ndarray,
               epochs: int = 1, batch_size: int = 64, learning_rate: float = 1e-4,
               seed: int = 0):
    """Quantization-aware fine-tuning of a tf_keras model split into stages.

    tensorflow-model-optimization refuses nested models, so each stage model
    (and the head) is quantized on its own; the quantized pieces are chained
    and fine-tuned together end to end. tfmot is imported here only: its
    import switches the whole process to tf_keras (TF_USE_LEGACY_KERAS=1).

    Layers tfmot has no quantize config for (input rescaling) stay float.

    Args:
      stage_models, head_model: from `stages.split_model` of a tf_keras model.
      x_train, y_train: fine-tuning data (integer labels).

    Returns:
      (quantized stage models, quantized head, chained full model).

    Raises:
      QuantizationError: the model is not a tf_keras model, or tfmot is missing.
    """

    if kerascompat.flavour_of(head_model) != "tf_keras":
        raise QuantizationError(
            "Quantization-aware training needs a tf_keras functional model (tfmot rejects "
            "Keras 3 models); rebuild the model with tf_keras and copy the weights, or use "
            "--quantize=int8.")
    try:
        import tensorflow_model_optimization as tfmot  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise QuantizationError(
            "Quantization-aware training needs tensorflow-model-optimization==0.8.1: "
            "pip install -e '.[qat]' && pip install --no-deps "
            "tensorflow-model-optimization==0.8.1 (see pyproject.toml).") from e
    import tf_keras  # pylint: disable=import-outside-toplevel

    qk = tfmot.quantization.keras
    float_only = ("InputLayer", "Rescaling")

    def annotate(layer):
        return layer if type(layer).__name__ in float_only else qk.quantize_annotate_layer(layer)

    quantized = []
    for model in list(stage_models) + [head_model]:
        clone = tf_keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
        annotated = tf_keras.models.clone_model(clone, clone_function=annotate)
        with qk.quantize_scope():
            quantized.append(qk.quantize_apply(annotated))
    inputs = tf_keras.Input(tuple(stage_models[0].inputs[0].shape[1:]))
    x = inputs
    for q in quantized:
        x = q(x)
    full = tf_keras.Model(inputs, x, name="qat_full")
    tf_keras.utils.set_random_seed(seed)
    full.compile(optimizer=tf_keras.optimizers.Adam(learning_rate),
                 loss=tf_keras.losses.SparseCategoricalCrossentropy(
                     from_logits=not _ends_with_softmax(head_model)))
    full.fit(x_train, y_train, epochs=epochs, batch_size=batch_size, verbose=2)
    _tie_boundary_ranges(quantized)
    return quantized[:-1], quantized[-1], full


def _tie_boundary_ranges(quantized) -> None:
    """Gives each model's input quantizer the range of the previous model's output.

    Between two stages the activation is quantized twice in a row (the
    previous stage's output quantizer, then the next stage's input
    QuantizeLayer, which learnt its own moving-average range). The stage
    signatures dequantize and requantize there; a converted chain of the two
    (the `full` signature) keeps only one of them. With equal ranges both
    paths compute the same thing.
    """
    for prev, nxt in zip(quantized[:-1], quantized[1:]):
        out = {w.name.rsplit("/", 1)[-1].split(":")[0]: w for w in prev.layers[-1].weights}
        layer = next((q for q in nxt.layers if type(q).__name__ == "QuantizeLayer"), None)
        if layer is None or "output_min" not in out or "output_max" not in out:
            continue
        for w in layer.weights:
            name = w.name.rsplit("/", 1)[-1].split(":")[0]
            if name.endswith("_min"):
                w.assign(out["output_min"])
            elif name.endswith("_max"):
                w.assign(out["output_max"])


def _ends_with_softmax(model) -> bool:
    last = model.layers[-1]
    if type(last).__name__ == "Softmax":
        return True
    return getattr(getattr(last, "activation", None), "__name__", "") == "softmax"
