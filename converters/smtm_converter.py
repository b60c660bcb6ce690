"""Keras classifier + semantic memory -> one multi-signature SMTM .tflite.

Signatures (all batch 1):
  stage_i: activation, centres [K, D] -> next_activation, semantic [D], similarities [K]
  head:    activation -> probabilities [C]
  full:    image -> probabilities [C]
The weights are stored once, shared by the signatures. The descriptor is
embedded in the metadata table under `descriptor.METADATA_NAME`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os

import numpy as np

from smtm_tf.runtime import metadata
from converters import quantization as quant
from delegates.compiled import run_compiled
from delegates import temp_files
from smtm_tf.runtime import cache as cache_lib
from smtm_tf.runtime import descriptor as desc
from smtm_tf.fitting import encoders as enc
from smtm_tf.runtime import io_utils
from smtm_tf.fitting import data as data_lib
from smtm_tf.fitting import kerascompat
from smtm_tf.fitting import memory as memory_lib
from smtm_tf.runtime import preprocessing as prep
from smtm_tf.fitting import stages as stages_lib
from smtm_tf.fitting.memory import SemanticMemory
from converters import gpu_gate
from converters import stage_times as stage_times_lib
from converters import old_runtime
from delegates.cpu import CpuBackend
from smtm_tf.runtime import SmtmRuntime


class ConversionError(RuntimeError):
    """Raised when the converted model does not match the Keras model."""


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """What the converter checked."""

    size_bytes: int
    full_max_abs_diff: float  # `full` vs Keras.
    chain_max_abs_diff: float  # stage_0..head vs Keras.
    similarity_max_abs_diff: float  # stage similarities vs the memory's numpy encoders.
    compiled_max_abs_diff: float  # `full` in LiteRT's CompiledModel vs the Interpreter.
    num_check_images: int
    quantization: str = "float32"
    # Keras's own float32 spread: its probabilities for each check image run
    # alone against in the batch (float32 results move with the kernels and
    # summation orders a batch size picks).
    keras_batch_spread: float = 0.0
    # Quantized variants: share of check images whose top-1 answer (`full`,
    # and the stage chain) equals the Keras model's.
    full_top1_agreement: float = 1.0
    chain_top1_agreement: float = 1.0
    exit_rule: "ExitRuleCheck | None" = None
    gpu_gate: object = None  # converters.gpu_gate.GateReport, when the gate ran.
    accuracy: "AccuracyCheck | None" = None  # The Keras model on the data, before fitting.
    old_runtime: object = None  # converters.old_runtime.ModelResult, when checked.
    stage_times: "stage_times_lib.StageTimes | None" = None  # Measured on this CPU.


def _outputs_probabilities(model) -> bool:
    """True when the model's last layer is a softmax (a layer or an activation)."""
    last = model.layers[-1]
    if type(last).__name__ == "Softmax":
        return True
    activation = getattr(last, "activation", None)
    return getattr(activation, "__name__", "") == "softmax"


def _module_tracking(model, extra_models=()):
    """A tf.Module that tracks `model`'s variables (and `extra_models`'), so they are saved."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    module = tf.Module()
    if kerascompat.flavour_of(model) == "keras":
        # Keras 3 variables are not found by tf.Module's tracking: without
        # this the converter emits uninitialised variable reads (NaN).
        module.tracked_variables = [v.value for v in model.weights]
    else:
        module.keras_model = model
    module.extra_models = list(extra_models)
    return module


# In an int8 stage signature the encoder pools the feature map it also hands
# to the next stage. REDUCE_MAX, STRIDED_SLICE and CONCATENATION keep their
# input's scale, so the converter gave the map the range of its pooled values:
# a linear map's negative tail was clipped (MobileNetV2 0.35's first stage end,
# range [-5.1, 4.6], quantized to [-0.93, 5.2]; the stage chain agreed with
# Keras on 78% of images, `full` on 95%). Pooling a scaled copy (a MUL with its
# own output scale) leaves the map its own range. A power of two: exact in float.
INT8_POOL_SCALE = 0.5


class SignatureBuilder:
    """Builds the tf.functions of every signature around the Keras models."""

    def __init__(self, model, memory: SemanticMemory, quantized_models=None,
                 quantization: quant.Quantization = quant.Quantization.FLOAT32):
        self.stage_models, self.head_model = stages_lib.split_model(model, memory.plan)
        self.model = model
        self.memory = memory
        self.quantization = quantization
        self.apply_softmax = not _outputs_probabilities(model)
        if quantized_models is not None:
            # QAT: the fine-tuned quantized stage models, head and their chain
            # replace the float ones in every signature.
            self.stage_models, self.head_model, self.model = quantized_models
            self.module = _module_tracking(model, [self.model])
        else:
            self.module = _module_tracking(model)
        self.input_shape = tuple(int(d) for d in model.inputs[0].shape[1:])
        self.stage_shapes = [tuple(int(d) for d in m.outputs[0].shape[1:])
                             for m in self.stage_models]
        self.num_classes = len(memory.class_names)

    def _probabilities(self, out):
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        out = tf.nn.softmax(out) if self.apply_softmax else out
        return tf.reshape(out, [-1])

    def _stage_fn(self, stage, encoder: enc.Encoder):
        import tensorflow as tf  # pylint: disable=import-outside-toplevel

        # The encoder's numpy weights become graph constants; tf.function would
        # turn default arguments or captured eager tensors into extra inputs.
        def fn(activation, centres):
            a = stage(activation, training=False)
            if self.quantization == quant.Quantization.INT8:
                pooled = enc.pool(a * INT8_POOL_SCALE, self.memory.pooling) / INT8_POOL_SCALE
            else:
                pooled = enc.pool(a, self.memory.pooling)
            v = encoder.tf_encode(pooled)
            sims = tf.matmul(v, centres, transpose_b=True)
            return {"next_activation": a, "semantic": tf.reshape(v, [-1]),
                    "similarities": tf.reshape(sims, [-1])}
        return fn

    def signatures(self) -> dict:
        import tensorflow as tf  # pylint: disable=import-outside-toplevel

        sigs = {}
        in_shapes = [self.input_shape] + self.stage_shapes[:-1]
        for s, stage in enumerate(self.stage_models):
            sigs[f"stage_{s}"] = tf.function(
                self._stage_fn(stage, self.memory.encoders[s]), input_signature=[
                    tf.TensorSpec((1,) + in_shapes[s], tf.float32, name="activation"),
                    # K is fixed to all classes: every lookup sees the whole
                    # memory, and static shapes suit GPU delegates.
                    tf.TensorSpec((self.num_classes, self.memory.encoders[s].dim),
                                  tf.float32, name="centres")])

        def head(activation):
            return {"probabilities": self._probabilities(
                self.head_model(activation, training=False))}

        def full(image):
            if self.quantization != quant.Quantization.QAT:
                return {"probabilities": self._probabilities(self.model(image, training=False))}
            # QAT: the chain of quantized stage models, call for call. Converting
            # the nested chained Keras model instead gave a `full` whose top-1
            # matched Keras on only 86% of the demo's check images (the stage
            # chain: 100%).
            a = image
            for stage in self.stage_models:
                a = stage(a, training=False)
            return {"probabilities": self._probabilities(self.head_model(a, training=False))}

        sigs["head"] = tf.function(head, input_signature=[
            tf.TensorSpec((1,) + self.stage_shapes[-1], tf.float32, name="activation")])
        sigs["full"] = tf.function(full, input_signature=[
            tf.TensorSpec((1,) + self.input_shape, tf.float32, name="image")])
        return sigs

    def descriptor(self, model_name: str,
                   preprocessing: prep.Preprocessing) -> desc.Descriptor:
        in_shapes = [self.input_shape] + self.stage_shapes[:-1]
        k = self.num_classes
        stages = []
        for s, shape in enumerate(in_shapes):
            d = self.memory.encoders[s].dim
            sig = desc.SignatureSpec(
                f"stage_{s}",
                (desc.TensorSpec("activation", (1,) + shape),
                 desc.TensorSpec("centres", (k, d))),
                (desc.TensorSpec("next_activation", (1,) + self.stage_shapes[s]),
                 desc.TensorSpec("semantic", (d,)),
                 desc.TensorSpec("similarities", (k,))))
            stages.append(desc.StageSpec(sig, self.memory.plan.cut_layers[s],
                                         self.memory.plan.stage_costs[s],
                                         self.memory.centres[s]))
        head = desc.SignatureSpec(
            "head", (desc.TensorSpec("activation", (1,) + self.stage_shapes[-1]),),
            (desc.TensorSpec("probabilities", (k,)),))
        full = desc.SignatureSpec(
            "full", (desc.TensorSpec("image", (1,) + self.input_shape),),
            (desc.TensorSpec("probabilities", (k,)),))
        rule = self.memory.exit_rule
        # The operator's attributes are the exit rule and the cache policy, as
        # stored in the descriptor's exit_rule and cache fields.
        lookup = desc.LookupOpSpec(attributes={"compare_with": "all_classes",
                                               "exit_rule": "exit_rule", "cache": "cache"})
        return desc.Descriptor(model_name, self.memory.class_names, self.memory.pooling.value,
                               tuple(stages), head, full, rule, lookup,
                               quantization=self.quantization.value,
                               cache=self.memory.cache_policy, preprocessing=preprocessing)


def _plain_signature(model):
    """(module, signatures) of `model` alone: one signature, `image` -> `output`."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    shape = (1,) + tuple(int(d) for d in model.inputs[0].shape[1:])
    fn = tf.function(lambda image: {"output": model(image, training=False)},
                     input_signature=[tf.TensorSpec(shape, tf.float32, name="image")])
    return _module_tracking(model), {"serving_default": fn}


def convert_keras(model) -> bytes:
    """A plain single-signature conversion of `model` (the size baseline)."""
    return convert_module(*_plain_signature(model))


def int8_errors_by_op(model, images: np.ndarray) -> list[quant.OpError]:
    """Each op's int8 error in a plain conversion of `model`, largest first.

    TensorFlow's QuantizationDebugger runs the int8 model (calibrated on
    `images`, as the SMTM conversion's representative dataset is) beside its
    float ops and reports, per quantized op output, the RMSE of the
    difference in units of that tensor's quantization scale.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    images = np.asarray(images, np.float32)

    def dataset():
        for i in range(len(images)):
            yield [images[i:i + 1]]

    with _saved_model_converter(*_plain_signature(model)) as converter:
        quant.configure(converter, quant.Quantization.INT8, dataset)
        debugger = tf.lite.experimental.QuantizationDebugger(converter=converter,
                                                             debug_dataset=dataset)
        debugger.run()
        return quant.op_errors(debugger)


# Training images whose activations calibrate an int8 conversion's ranges.
# More is not better: 600 took EfficientNetB0's int8 top-1 agreement with
# Keras from 87.5% to 82.8% (64 check images).
INT8_CALIBRATION_IMAGES = 200

# The SavedModel each conversion goes through lives in the system's temp folder.
SAVED_MODEL_PREFIX = "smtm-savedmodel-"


def remove_leftovers(*outputs: str | None) -> None:
    """Removes what killed conversions left: temporaries beside `outputs`,
    SavedModel and old-runtime check folders of processes that are gone.
    Called at the start."""
    for path in outputs:
        if path:
            io_utils.remove_stale_temporaries(path)
    temp_files.remove_orphans(SAVED_MODEL_PREFIX)
    temp_files.remove_orphans(old_runtime.TEMP_PREFIX)


@contextlib.contextmanager
def _saved_model_converter(module, signatures: dict):
    """A TFLiteConverter of `module`'s `signatures`, through a SavedModel in a temp folder."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    with temp_files.process_temp_dir(SAVED_MODEL_PREFIX) as tmp:
        concrete = {k: f.get_concrete_function() for k, f in signatures.items()}
        tf.saved_model.save(module, tmp, signatures=concrete)
        yield tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=list(signatures))


def convert_module(module, signatures: dict,
                   quantization: quant.Quantization = quant.Quantization.FLOAT32,
                   representative_dataset=None) -> bytes:
    with _saved_model_converter(module, signatures) as converter:
        quant.configure(converter, quantization, representative_dataset)
        return converter.convert()


def convert(model, memory: SemanticMemory, check_images: np.ndarray,
            output_path: str | None = None, model_name: str | None = None,
            atol: float = 1e-5, quantization: str | quant.Quantization = "float32",
            train_images: np.ndarray | None = None, train_labels: np.ndarray | None = None,
            qat_epochs: int = 1, min_top1_agreement: float = 0.9,
            seed: int = 0, preprocessing: prep.Preprocessing | None = None
            ) -> tuple[bytes, ConversionReport]:
    """Converts a Keras classifier and its semantic memory to an SMTM .tflite.

    After conversion, `full` and the chain stage_0..head are compared with
    Keras on `check_images`, and each stage's similarities with the memory's
    encoders; the model is written only if all agree.

    Args:
      model: the trained Keras classifier the memory was fitted on.
      memory: its semantic memory.
      check_images: real input images `[N, H, W, C]` for the numeric checks.
      output_path: where to write the .tflite (atomically); None to only return it.
      model_name: name recorded in the descriptor.
      atol: largest absolute difference tolerated in probabilities (float32).
      quantization: float32, float16, dynamic, int8 or qat (`converters.quantization`).
      train_images, train_labels: training data; int8 draws its representative
        dataset from the images, qat fine-tunes on both.
      qat_epochs: fine-tuning epochs for qat.
      min_top1_agreement: quantized variants are checked by the share of check
        images whose top-1 answer equals Keras's (float16: numerically too).
      preprocessing: what runtimes do to pixels before the model (recorded in
        the descriptor; default: pixels as they are). `check_images` and
        `train_images` are model inputs, i.e. already preprocessed.

    Returns:
      (model bytes, report).

    Raises:
      ConversionError: when a check fails; nothing is written then.
    """
    if len(check_images) == 0:
        raise ValueError("convert needs at least one check image.")
    q = quant.parse(quantization)
    if q in (quant.Quantization.INT8, quant.Quantization.QAT) and train_images is None:
        raise quant.QuantizationError(f"{q.value} quantization needs train_images.")
    qat = None
    if q == quant.Quantization.QAT:
        if train_labels is None:
            raise quant.QuantizationError("qat quantization needs train_labels.")
        stage_models, head_model = stages_lib.split_model(model, memory.plan)
        qat = quant.qat_models(stage_models, head_model, train_images, train_labels,
                               epochs=qat_epochs, seed=seed)
    builder = SignatureBuilder(model, memory, qat, q)
    sigs = builder.signatures()
    descriptor = builder.descriptor(model_name or model.name,
                                    preprocessing or prep.Preprocessing.raw())
    rep_data = None
    if q == quant.Quantization.INT8:
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(train_images), size=min(INT8_CALIBRATION_IMAGES, len(train_images)),
                          replace=False)
        rep_images = train_images[np.sort(pick)]
        rep_data = quant.representative_dataset(builder.stage_models, memory.centres,
                                                rep_images)
    flat = convert_module(builder.module, sigs, q, rep_data)
    flat = metadata.add_digest(
        metadata.add_metadata(flat, desc.METADATA_NAME, descriptor.to_json().encode()))
    if q == quant.Quantization.FLOAT32:
        report = check_conversion(flat, model, memory, check_images, builder.apply_softmax,
                                  atol)
    else:
        try:
            report = check_quantized(flat, builder, check_images, q, min_top1_agreement)
        except ConversionError as e:
            if q != quant.Quantization.INT8:
                raise
            try:
                why = quant.explain_int8_errors(int8_errors_by_op(model, rep_images))
            except Exception as diagnosis:  # pylint: disable=broad-except
                # The refusal stands; only its explanation is missing.
                why = f"(The per-op int8 diagnosis failed: {diagnosis}.)"
            raise ConversionError(f"{e} {why}") from e
    if output_path:
        io_utils.write_bytes_atomic(output_path, flat)
        logging.info("Wrote %s (%d bytes).", output_path, len(flat))
    return flat, report


# A converted model may differ from Keras by this many times Keras's own
# float32 spread between batch sizes. On most models that spread is below
# the absolute tolerance (the zoo's MobileNetV2 0.35: 1.4e-6, an untrained
# DenseNet121: 5.1e-7); on a deep net with saturated
# logits it is not: an untrained NASNetMobile's probabilities moved by 1.0e-4
# between batches of 64 and 1, and LiteRT's by 1.5e-4 from Keras's.
KERAS_SPREAD_FACTOR = 4.0


def probability_tolerance(atol: float, keras_spread: float) -> float:
    """The largest difference in probabilities from Keras that a conversion may show."""
    return max(atol, KERAS_SPREAD_FACTOR * keras_spread)


def check_conversion(flat: bytes, model, memory: SemanticMemory, images: np.ndarray,
                     apply_softmax: bool, atol: float = 1e-5) -> ConversionReport:
    """Compares the converted signatures with Keras and the memory's encoders."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from ai_edge_litert import interpreter as litert  # pylint: disable=import-outside-toplevel

    # Feed the centres the model carries, as a host runtime will: a descriptor
    # whose centres differ from the memory's fails the similarity check.
    embedded = desc.Descriptor.from_json(metadata.read_metadata(flat, desc.METADATA_NAME))
    centres = [st.centres for st in embedded.stages]
    interp = litert.Interpreter(model_content=flat, num_threads=1)
    runners = {k: interp.get_signature_runner(k) for k in interp.get_signature_list()}
    stage_models, head_model = stages_lib.split_model(model, memory.plan)
    want = np.asarray(model.predict(images, verbose=0, batch_size=64))
    if apply_softmax:
        want = np.asarray(tf.nn.softmax(want))
    full_diff = chain_diff = sim_diff = spread = 0.0
    for i, image in enumerate(images.astype(np.float32)):
        x = image[None]
        alone = np.asarray(model(x, training=False))
        if apply_softmax:
            alone = np.asarray(tf.nn.softmax(alone))
        spread = max(spread, float(np.max(np.abs(alone[0] - want[i]))))
        got = runners["full"](image=x)["probabilities"]
        full_diff = max(full_diff, float(np.max(np.abs(got - want[i]))))
        a = keras_a = x
        for s, stage_model in enumerate(stage_models):
            out = runners[f"stage_{s}"](activation=a, centres=centres[s])
            a = out["next_activation"]
            keras_a = np.asarray(stage_model(keras_a, training=False))
            pooled = np.asarray(enc.pool(keras_a, memory.pooling))
            sims = memory.encoders[s].encode(pooled)[0] @ memory.centres[s].T
            sim_diff = max(sim_diff, float(np.max(np.abs(out["similarities"] - sims))))
        got = runners["head"](activation=a)["probabilities"]
        chain_diff = max(chain_diff, float(np.max(np.abs(got - want[i]))))
    # Newer apps load models with CompiledModel: check it runs this one too.
    first = images[:1].astype(np.float32)
    compiled = run_compiled(flat, "full", {"image": first})["probabilities"]
    compiled_diff = float(np.max(np.abs(compiled - runners["full"](image=first)["probabilities"])))
    report = ConversionReport(len(flat), full_diff, chain_diff, sim_diff, compiled_diff,
                              len(images), keras_batch_spread=spread)
    # Similarities pass through a whole stage of float32 convolutions and a
    # projection before the dot product: allow more there than on probabilities.
    sim_atol = max(100 * atol, 1e-4)
    prob_atol = probability_tolerance(atol, spread)
    if not (full_diff <= prob_atol and chain_diff <= prob_atol and sim_diff <= sim_atol
            and compiled_diff <= atol):
        raise ConversionError(
            f"The converted model does not match Keras: full differs by {full_diff:.3g}, "
            f"the stage chain by {chain_diff:.3g} (tolerance {prob_atol:.3g}: {atol}, or "
            f"{KERAS_SPREAD_FACTOR}x Keras's own spread between batch sizes, "
            f"{spread:.3g}), similarities by "
            f"{sim_diff:.3g} (tolerance {sim_atol}), CompiledModel's full from the "
            f"Interpreter's by {compiled_diff:.3g}. Nothing was written.")
    return report


def check_quantized(flat: bytes, builder: "SignatureBuilder", images: np.ndarray,
                    quantization: quant.Quantization,
                    min_top1_agreement: float = 0.9) -> ConversionReport:
    """Checks a quantized model against the Keras model it was made from.

    Quantized kernels cannot match float Keras to 1e-5; the check is that
    `full` and the stage chain give Keras's top-1 answer on at least
    `min_top1_agreement` of the images, that no output is NaN, and for
    float16 (float kernels, rounded weights) that probabilities stay within
    1e-2. The differences are reported either way, the similarities' against
    the memory's float encoders on the Keras stage activations.

    Raises:
      ConversionError: when a check fails; nothing is written then.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from ai_edge_litert import interpreter as litert  # pylint: disable=import-outside-toplevel

    embedded = desc.Descriptor.from_json(metadata.read_metadata(flat, desc.METADATA_NAME))
    centres = [st.centres for st in embedded.stages]
    interp = litert.Interpreter(model_content=flat, num_threads=1)
    runners = {}
    for key in interp.get_signature_list():
        try:
            runners[key] = interp.get_signature_runner(key)
            runners[key](**{n: np.zeros(d["shape"], d["dtype"])
                            for n, d in runners[key].get_input_details().items()})
        except RuntimeError as e:
            stage = key[len("stage_"):] if key.startswith("stage_") else ""
            encoder = builder.memory.encoders[int(stage)] if stage.isdigit() else None
            raise ConversionError(
                f"The {quantization.value} model's signature {key} does not run in the "
                f"LiteRT interpreter with XNNPACK ({e}). "
                + quant.xnnpack_refusal(flat, key, encoder)) from e
    for key, runner in runners.items():
        for kind, details in (("input", runner.get_input_details()),
                              ("output", runner.get_output_details())):
            bad = {n: d["dtype"] for n, d in details.items() if d["dtype"] != np.float32}
            if bad:
                raise ConversionError(f"Signature {key} has non-float32 {kind}s {bad}: the "
                                      "harness feeds float32. Nothing was written.")
    want = np.asarray(builder.model.predict(images, verbose=0, batch_size=64))
    if builder.apply_softmax:
        want = np.asarray(tf.nn.softmax(want))
    memory = builder.memory
    full_diff = chain_diff = sim_diff = 0.0
    full_agree = chain_agree = 0
    nearest_agree = np.zeros(len(centres))
    for i, image in enumerate(images.astype(np.float32)):
        x = image[None]
        got = runners["full"](image=x)["probabilities"]
        full_diff = max(full_diff, float(np.max(np.abs(got - want[i]))))
        full_agree += int(np.argmax(got) == np.argmax(want[i]))
        a = keras_a = x
        for s in range(len(centres)):
            out = runners[f"stage_{s}"](activation=a, centres=centres[s])
            a = out["next_activation"]
            keras_a = np.asarray(builder.stage_models[s](keras_a, training=False))
            sims = memory.encoders[s].encode(
                np.asarray(enc.pool(keras_a, memory.pooling)))[0] @ centres[s].T
            sim_diff = float(np.maximum(sim_diff, np.max(np.abs(out["similarities"] - sims))))
            nearest_agree[s] += int(np.argmax(out["similarities"]) == np.argmax(sims))
        got = runners["head"](activation=a)["probabilities"]
        chain_diff = max(chain_diff, float(np.max(np.abs(got - want[i]))))
        chain_agree += int(np.argmax(got) == np.argmax(want[i]))
    first = images[:1].astype(np.float32)
    compiled = run_compiled(flat, "full", {"image": first})["probabilities"]
    compiled_diff = float(np.max(np.abs(compiled - runners["full"](image=first)["probabilities"])))
    n = len(images)
    logging.info("%s similarities: at most %.3g from the float encoders; nearest centre "
                 "the same on %s of %d images per stage.", quantization.value, sim_diff,
                 "/".join(str(int(c)) for c in nearest_agree), n)
    report = ConversionReport(len(flat), full_diff, chain_diff, sim_diff, compiled_diff, n,
                              quantization.value, full_agree / n, chain_agree / n)
    problems = []
    if min(report.full_top1_agreement, report.chain_top1_agreement) < min_top1_agreement:
        problems.append(f"top-1 agreement with Keras: full {report.full_top1_agreement:.1%}, "
                        f"chain {report.chain_top1_agreement:.1%} (need "
                        f"{min_top1_agreement:.0%})")
    if quantization == quant.Quantization.FLOAT16 and not max(full_diff, chain_diff) <= 1e-2:
        problems.append(f"float16 probabilities differ by {max(full_diff, chain_diff):.3g} "
                        "(tolerance 1e-2)")
    if not np.isfinite(sim_diff) or not compiled_diff <= 1e-3:
        problems.append(f"similarities differ by {sim_diff:.3g} from the float encoders "
                        f"(NaN or inf?) or CompiledModel differs by {compiled_diff:.3g}")
    if problems:
        raise ConversionError(f"The {quantization.value} model fails its checks: "
                              + "; ".join(problems) + ". Nothing was written.")
    return report


def memory_path_for(path: str) -> str:
    """Where the semantic memory of a model or .tflite lives by convention: beside it.

    `model.keras` -> `model.smtm.npz`; `out/model.smtm.tflite` -> `out/model.smtm.npz`.
    """
    stem = os.path.splitext(path)[0]
    if stem.endswith(".smtm"):
        stem = stem[:-len(".smtm")]
    return stem + ".smtm.npz"


class DataMismatchError(ConversionError):
    """Raised when the labelled data does not look like what the model was trained on."""


@dataclasses.dataclass(frozen=True)
class AccuracyCheck:
    """The Keras model's own top-1 accuracy on the labelled data, before any fitting.

    Attributes:
      accuracy: with the preprocessing the conversion uses.
      images: how many test images were scored.
      chance: 1 / the number of classes present in the labels.
      alternatives: preset name -> accuracy with that preset instead (only
        when the preprocessing is not done by the model itself).
    """

    accuracy: float
    images: int
    chance: float
    alternatives: dict

    def best_alternative(self) -> tuple[str, float] | None:
        if not self.alternatives:
            return None
        return max(self.alternatives.items(), key=lambda kv: kv[1])

    def format(self) -> str:
        text = (f"Keras model's own top-1 accuracy on {self.images} labelled test images: "
                f"{100 * self.accuracy:.1f}% (chance {100 * self.chance:.1f}%)")
        if self.alternatives:
            text += "; with other --preprocessing presets: " + ", ".join(
                f"{k} {100 * v:.1f}%" for k, v in self.alternatives.items())
        return text


def check_accuracy(model, data, preprocessing: prep.Preprocessing,
                   num_images: int = 1000) -> AccuracyCheck:
    """Scores the Keras model on the data's test split with `preprocessing`, and
    with every preset too, unless the model preprocesses its input itself."""
    x = data.x_test[:num_images]
    y = data.y_test[:num_images]
    if not len(x):
        raise DataMismatchError("The data has no test images to check the model on.")

    def accuracy(p):
        pred = np.asarray(model.predict(p.apply(x), verbose=0, batch_size=128)).argmax(-1)
        return float((pred == y).mean())

    alternatives = {}
    if preprocessing.source != "model":
        channels = x.shape[-1]
        for preset in prep.Preset:
            if preset is prep.Preset.IMAGENET and channels != 3:
                continue
            candidate = prep.Preprocessing.preset(preset, channels)
            if candidate.scale != preprocessing.scale or candidate.offset != preprocessing.offset:
                alternatives[preset.value] = accuracy(candidate)
    return AccuracyCheck(accuracy(preprocessing), len(x), 1.0 / len(np.unique(y)), alternatives)


def judge_accuracy(check: AccuracyCheck) -> None:
    """Raises DataMismatchError when the data does not look like the model's own."""
    flags = ("Tell the converter what the model expects with --preprocessing="
             "raw|unit|symmetric|imagenet or --input_scale/--input_offset, or pass "
             "--nocheck_accuracy to convert anyway (e.g. an untrained model, for a "
             "structural conversion).")
    best = check.best_alternative()
    top = max(check.accuracy, best[1] if best else 0.0)
    if top < min(2.0 * check.chance, 0.5 * (1.0 + check.chance)):
        raise DataMismatchError(
            f"The Keras model scores {100 * check.accuracy:.1f}% on the labelled data, near "
            f"chance ({100 * check.chance:.1f}%), and no preprocessing preset does better: "
            "the data does not look like what the model was trained on (other images, "
            "labels in another order, or other preprocessing). " + flags)
    if best is not None and best[1] >= check.accuracy + 0.10:
        raise DataMismatchError(
            f"The Keras model scores {100 * check.accuracy:.1f}% on the labelled data with "
            f"this preprocessing but {100 * best[1]:.1f}% with --preprocessing={best[0]}: "
            "the data does not look like what the model was trained on. " + flags)


def class_names_for(model, data) -> tuple[str, ...]:
    """One name per model output: the data's names, then the output index.

    The class count is the model's: a calibration set need not hold every
    class (a 1,000-class model checked on a few hundred images).

    Raises:
      DataMismatchError: when the data has more classes than the model outputs.
    """
    k = int(model.outputs[0].shape[-1])
    names = tuple(data.class_names)
    if len(names) > k:
        raise DataMismatchError(
            f"The data has {len(names)} classes but the model outputs {k}: labels "
            f"{k}..{len(names) - 1} have no output. Pass data labelled 0..{k - 1}.")
    return names + tuple(str(i) for i in range(len(names), k))


def check_data(model, data, preprocessing: prep.Preprocessing | None = None, say=None,
               accuracy_check: bool = True):
    """What every use of a user's model and data checks before fitting anything.

    Brings the images to the model's input (`data.adapt`), resolves the
    preprocessing (None: `preprocessing.resolve`) and checks its channels,
    names the model's classes, needs labelled images of at least 2 classes,
    reports classes without any, and (with `accuracy_check`) scores the
    model on the data and stops when it looks like another model's data.

    Returns:
      (data, preprocessing, class_names, accuracy check or None).

    Raises:
      DataMismatchError, ValueError: saying what is wrong and how to fix it.
    """
    say = say or (lambda _: None)
    shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    data = data_lib.adapt(data, shape[:2], shape[2])
    if preprocessing is None:
        preprocessing = prep.resolve(model)
    preprocessing.check_channels(shape[2])
    say(f"preprocessing: {preprocessing.describe()}")
    class_names = class_names_for(model, data)
    present = np.unique(data.y_train)
    if len(present) < 2:
        raise DataMismatchError(
            f"The data's train split holds images of {len(present)} class"
            f"{'' if len(present) == 1 else 'es'}: fitting and calibrating the exits needs "
            "labelled images of at least 2 classes.")
    absent = len(class_names) - len(present)
    if absent:
        say(f"{absent} of the model's {len(class_names)} classes have no labelled training "
            "image; unless the model answers them anyway, they cannot exit")
    accuracy = None
    if accuracy_check:
        accuracy = check_accuracy(model, data, preprocessing)
        say(accuracy.format())
        judge_accuracy(accuracy)
    return data, preprocessing, class_names, accuracy


def convert_model(model, data, output_path: str, memory: SemanticMemory | None = None,
                  holdout: float = 0.1, num_stages: int | None = None, cut_layers=None,
                  embedding_dim: int | None = None, encoder_hidden: int | None = None,
                  pooling: str | None = None,
                  target_agreement: float = 0.99, metric: str = "layer_aware",
                  cache_policy: cache_lib.CachePolicy | None = cache_lib.CachePolicy(),
                  num_check_images: int = 64, memory_output: str | None = None,
                  memory_candidates=(), seed: int = 0, quantization: str = "float32",
                  qat_epochs: int = 1, qat_images: int = 6000,
                  gpu_check: bool = True, require_gpu: bool = False,
                  gpu_precision: str = "fp32", old_runtime_check: bool = True,
                  require_old_runtime: bool = False, old_runtime_python: str | None = None,
                  preprocessing: prep.Preprocessing | None = None,
                  accuracy_check: bool = True, progress=None, camera_calibration: bool = False
                  ) -> tuple[SemanticMemory, ConversionReport]:
    """Fits a semantic memory unless a matching one exists, then converts and checks.

    Nothing is written unless every check passes: then the memory (when newly
    fitted) goes to `memory_output` and the model to `output_path`.

    Args:
      model: the trained Keras classifier.
      data: `smtm_tf.fitting.data.LabelledData` of camera pixels; images are brought
        to the model's input (`data.adapt`) and preprocessed. The tail
        `holdout` of its train split calibrates the exits, the rest trains
        the encoders, and test images serve the checks.
      output_path: where the .tflite goes.
      memory: an already fitted memory to use as it is, or None.
      num_stages, cut_layers, embedding_dim, encoder_hidden, pooling: the
        stages, semantic size, encoders' hidden units and pooling to fit
        (None: the planner's stages, kept by their time (`drop_stages_by_time`),
        32 dimensions, `memory.ENCODER_HIDDEN`,
        `memory.POOLING`; a reused memory keeps its own).
      memory_output: where to save a newly fitted memory (None: do not save).
      memory_candidates: memory files to reuse, in order; one is used only
        when its key and choices match this conversion (`SemanticMemory.mismatches`).
      quantization: the variant (`converters.quantization`). For quantized
        variants the exit rule is replayed on the quantized model over streams
        of the calibration frames and recalibrated on its own similarities when
        it misses the target (`report.exit_rule`).
      qat_epochs, qat_images: QAT fine-tuning length (epochs over that many
        training images).
      gpu_check: run the GPU gate (`converters.gpu_gate`): compile every
        signature strictly on the GPU and compare with the CPU (`report.gpu_gate`).
      require_gpu: make a failed gate (or no GPU) an error; nothing is written then.
      gpu_precision: "fp32" or "fp16" kernels for the gate.
      old_runtime_check: when a tflite-runtime 2.14 environment is found
        (`converters.old_runtime`), load and run every signature there
        (`report.old_runtime`; a failure is flagged in the report).
      require_old_runtime: make that check mandatory and a failure an error.
      old_runtime_python: the old runtime's Python (`old_runtime.find_python`).
      preprocessing: what the model expects done to pixels (default: found
        from its first layer, else pixels as they are; `preprocessing.resolve`).
      accuracy_check: score the Keras model on the labelled data first and
        stop (DataMismatchError) when the data does not look like its own.
      progress: called with a line of text at each step (None: silent).
      camera_calibration: calibrate the exits on camera streams too
        (`memory.recalibrate`); a memory file is reused only if it was.

    Returns:
      (memory, report); `report.accuracy` holds the accuracy check.
    """
    say = progress or (lambda _: None)
    remove_leftovers(output_path, memory_output)
    data, preprocessing, class_names, accuracy = check_data(
        model, data, preprocessing, say, accuracy_check)
    (x_fit, y_fit), (x_cal, _) = data.holdout(holdout)
    x_fit_in, x_cal_in = preprocessing.apply(x_fit), preprocessing.apply(x_cal)
    x_check = preprocessing.apply(data.x_test[:num_check_images])
    fitted = False
    if memory is None:
        memory, fitted = reuse_or_fit_memory(
            model, x_fit_in, x_cal_in, class_names, preprocessing, memory_candidates, say,
            num_stages=num_stages, cut_layers=cut_layers, embedding_dim=embedding_dim,
            encoder_hidden=encoder_hidden, pooling=pooling, target_agreement=target_agreement,
            metric=metric, cache_policy=cache_policy, seed=seed,
            camera_calibration=camera_calibration)
    q = quant.parse(quantization)

    def convert_and_time(memory):
        say(f"converting ({q.value}) and checking against Keras")
        flat, report = convert(model, memory, x_check, None, quantization=q,
                               train_images=x_fit_in[:qat_images],
                               train_labels=y_fit[:qat_images], qat_epochs=qat_epochs,
                               seed=seed, preprocessing=preprocessing)
        if q != quant.Quantization.FLOAT32:
            say("replaying the exit rule on the quantized model")
            flat, rule_check = check_exit_rule(flat, memory, x_cal, seed=seed)
            report = dataclasses.replace(report, size_bytes=len(flat), exit_rule=rule_check)
        say("timing each signature on this CPU")
        times = stage_times_lib.measure(flat, x_check)
        return flat, dataclasses.replace(report, stage_times=times)

    flat, report = convert_and_time(memory)
    if fitted and num_stages is None and not cut_layers and memory.plan.num_stages > 1:
        # The planner's stages: those whose exits do not pay for their time go.
        kept = drop_stages_by_time(model, memory, report.stage_times, x_cal_in,
                                   target_agreement, cache_policy, seed, preprocessing, say)
        if kept is not memory:
            memory = kept
            flat, report = convert_and_time(memory)
    if gpu_check or require_gpu:
        say("GPU gate")
        gate = gpu_gate.gpu_gate(flat, x_check[:16], precision=gpu_precision,
                                 require_gpu=require_gpu)
        report = dataclasses.replace(report, gpu_gate=gate)
    if old_runtime_check or require_old_runtime:
        report = dataclasses.replace(
            report, old_runtime=_check_old_runtime(flat, x_check[:1], require_old_runtime,
                                                    old_runtime_python))
    report = dataclasses.replace(report, accuracy=accuracy)
    if fitted and memory_output:
        memory.save(memory_output)
        say(f"wrote the semantic memory to {memory_output}")
    io_utils.write_bytes_atomic(output_path, flat)
    logging.info("Wrote %s (%d bytes).", output_path, len(flat))
    return memory, report


def reuse_or_fit_memory(model, x_fit_in: np.ndarray, x_cal_in: np.ndarray, class_names,
                        preprocessing: prep.Preprocessing, candidates, say,
                        num_stages: int | None = None, cut_layers=None,
                        embedding_dim: int | None = None, encoder_hidden: int | None = None,
                        pooling: str | None = None,
                        target_agreement: float = 0.99, metric: str = "layer_aware",
                        cache_policy: cache_lib.CachePolicy | None = cache_lib.CachePolicy(),
                        seed: int = 0, camera_calibration: bool = False
                        ) -> tuple[SemanticMemory, bool]:
    """The first memory file among `candidates` whose key and choices match, else a new fit.

    The key is the model's weights, the preprocessing and the preprocessed
    fitting and calibration images; a file that does not match is never
    used, and `say` is told why. Nothing is written here.

    Returns:
      (memory, fitted): fitted is True for a new fit.
    """
    key = memory_lib.MemoryKey(memory_lib.fingerprint_model(model), preprocessing.to_dict(),
                               memory_lib.fingerprint_arrays(x_fit_in, x_cal_in),
                               memory_lib.CAMERA if camera_calibration else None)
    memory = _matching_memory(candidates, key, say, num_stages=num_stages,
                              cut_layers=cut_layers, embedding_dim=embedding_dim,
                              encoder_hidden=encoder_hidden, pooling=pooling,
                              target_agreement=target_agreement, metric=metric,
                              cache=cache_policy is not None)
    if memory is not None:
        return memory, False
    say(f"fitting the semantic memory on {len(x_fit_in)} images, calibrating on "
        f"{len(x_cal_in)}")
    memory = memory_lib.fit_semantic_memory(
        model, x_fit_in, x_cal_in, class_names=class_names,
        num_stages=num_stages, cut_layers=cut_layers,
        embedding_dim=32 if embedding_dim is None else embedding_dim,
        encoder_hidden=(memory_lib.ENCODER_HIDDEN if encoder_hidden is None
                        else encoder_hidden),
        pooling=memory_lib.POOLING if pooling is None else pooling,
        target_agreement=target_agreement, metric=metric, cache_policy=cache_policy,
        seed=seed, key=key, progress=say, preprocessing=preprocessing,
        camera_calibration=camera_calibration)
    return memory, True


def drop_stages_by_time(model, memory: SemanticMemory, times: stage_times_lib.StageTimes,
                        x_cal_in: np.ndarray, target_agreement: float,
                        cache_policy: cache_lib.CachePolicy | None, seed: int,
                        preprocessing: prep.Preprocessing, say) -> SemanticMemory:
    """The memory without the stages whose exits do not pay for their measured time.

    `times` were measured on the memory's conversion (`stage_times.measure`);
    the stages are priced by them (`stages.priced_by_time`) and dropped as
    `memory.drop_unpaid_stages` says, on the calibration images `x_cal_in`.
    Returns `memory` itself when every stage stays.
    """
    prices, overhead = stages_lib.priced_by_time(memory.plan, times.stages_us, times.head_us,
                                                 times.full_us)
    say("pricing the stages by their time: beside its layers each stage costs "
        f"{100 * overhead:.1f}% of `full` (the chain's time over `full`'s, per stage)")
    stage_models, head = stages_lib.split_model(model, memory.plan)
    features = enc.extract_features(stage_models, head, x_cal_in, memory.pooling)
    return memory_lib.drop_unpaid_stages(
        model, memory, x_cal_in, features, overhead, target_agreement, cache_policy,
        seed=seed, preprocessing=preprocessing, say=say, prices=prices)


def _matching_memory(paths, key: memory_lib.MemoryKey, say, **wanted) -> SemanticMemory | None:
    """The first memory file among `paths` that matches the conversion, or None."""
    for path in paths:
        if not path or not os.path.exists(path):
            continue
        try:
            candidate = memory_lib.SemanticMemory.load(path)
        except memory_lib.MemoryFileError as e:
            say(f"not using {path}: {e}")
            continue
        why = candidate.mismatches(key, **wanted)
        if why:
            say(f"not using the semantic memory {path}: " + "; ".join(why))
            continue
        say(f"using the semantic memory {path} (its key matches this model and data)")
        return candidate
    return None


def _check_old_runtime(flat: bytes, images: np.ndarray, required: bool,
                       python: str | None = None):
    """tflite-runtime 2.14 loads and runs every signature? None when not installed."""
    try:
        python = old_runtime.find_python(python)
    except old_runtime.OldRuntimeUnavailable as e:
        if required:
            raise ConversionError(f"--require_old_runtime: {e}") from e
        return None
    with temp_files.process_temp_dir(old_runtime.TEMP_PREFIX) as tmp:
        path = os.path.join(tmp, "model.tflite")
        with open(path, "wb") as f:
            f.write(flat)
        (result,) = old_runtime.check_models([path], images, python=python)
    if required and not result.ok:
        raise ConversionError("--require_old_runtime: " + result.format()
                              + "\nNothing was written.")
    return result


@dataclasses.dataclass(frozen=True)
class ExitRuleCheck:
    """The descriptor's exit rule replayed on a quantized model.

    Agreement is of early-exit answers with the same model's `full` answers,
    closed loop (cache included), on streams of held-out calibration frames.
    """

    target: float
    agreement_before: tuple[float, ...]  # Per calibration stream.
    recalibrated: bool
    agreement_after: tuple[float, ...] | None = None

    def format(self) -> str:
        before = ", ".join(f"{100 * a:.2f}%" for a in self.agreement_before)
        text = f"exit rule on the quantized model: agreement {before} (target {100 * self.target:.2f}%)"
        if self.recalibrated:
            after = ", ".join(f"{100 * a:.2f}%" for a in self.agreement_after)
            text += f"; recalibrated on its similarities: {after}"
        else:
            text += "; kept"
        return text


def replay_rule(flat: bytes, x_cal: np.ndarray, stream_indices) -> tuple[
        tuple[float, ...], list[np.ndarray], np.ndarray]:
    """Replays the model's exit rule on streams of `x_cal` (pixels).

    Returns:
      (agreement with the model's own `full` per stream, the runtime, the
      `full` answers per frame).
    """
    runtime = SmtmRuntime(flat, CpuBackend(num_threads=1))
    shape = runtime.descriptor.full.inputs[0].shape
    # Each frame shaped as the model's input, [1, H, W, C].
    frames = np.ascontiguousarray(x_cal, np.float32).reshape((-1,) + tuple(shape))
    full = np.array([runtime.classify_full(f) for f in frames])
    agreement = []
    for indices in stream_indices(full):
        runtime.reset_cache()
        agree = sum(runtime.classify_fast(frames[i])[0] == full[i] for i in indices)
        agreement.append(agree / len(indices))
    return tuple(agreement), runtime, full


def check_exit_rule(flat: bytes, memory: SemanticMemory, x_cal: np.ndarray,
                    num_frames: int = 3000, seed: int = 0) -> tuple[bytes, ExitRuleCheck]:
    """Replays the exit rule on a (quantized) model; recalibrates it if it misses its target.

    Quantization moves the similarities, and the rule was calibrated on the
    float ones. The rule is kept when every calibration stream (video, zipf,
    uniform, scene_change; `memory.calibration_streams`) still meets the rule's target
    agreement with the model's own `full` answers; otherwise it is
    recalibrated on the quantized model's similarities and full answers
    (`memory.calibrate_rule`) and the descriptor is rewritten.

    Returns:
      (model bytes, possibly with a new exit rule; the check).
    """
    def streams_of(full):
        return memory_lib.calibration_streams(full, num_frames=num_frames, seed=seed)

    descriptor = desc.Descriptor.from_json(metadata.read_metadata(flat, desc.METADATA_NAME))
    rule = descriptor.exit_rule
    before, runtime, full = replay_rule(flat, x_cal, streams_of)
    if min(before) >= rule.target_agreement:
        return flat, ExitRuleCheck(rule.target_agreement, before, False)
    sims = [[] for _ in range(runtime.num_stages)]
    for frame in np.asarray(x_cal, np.float32):
        for s, v in enumerate(runtime.stage_similarities(frame)):
            sims[s].append(v)
    new_rule = memory_lib.calibrate_rule(
        [np.stack(v) for v in sims], full, memory.plan.stage_costs, rule.target_agreement,
        metric=rule.metric, metric_params=rule.metric_params, cache_policy=descriptor.cache,
        seed=seed)
    descriptor = dataclasses.replace(descriptor, exit_rule=new_rule)
    flat = metadata.add_digest(
        metadata.add_metadata(flat, desc.METADATA_NAME, descriptor.to_json().encode()))
    after, _, _ = replay_rule(flat, x_cal, streams_of)
    return flat, ExitRuleCheck(rule.target_agreement, before, True, after)
