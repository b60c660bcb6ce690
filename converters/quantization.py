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

import enum

import numpy as np

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
    from smtm_tf import kerascompat  # pylint: disable=import-outside-toplevel

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
        layer = next((l for l in nxt.layers if type(l).__name__ == "QuantizeLayer"), None)
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
