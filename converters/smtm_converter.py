"""Keras classifier + semantic memory -> one multi-signature SMTM .tflite.

Signatures (all batch 1):
  stage_i: activation, centres [K, D] -> next_activation, semantic [D], similarities [K]
  head:    activation -> probabilities [C]
  full:    image -> probabilities [C]
The weights are stored once, shared by the signatures. The descriptor is
embedded in the metadata table under `descriptor.METADATA_NAME`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile

import numpy as np

from converters import metadata
from converters import quantization as quant
from delegates.compiled import run_compiled
from smtm_tf import cache as cache_lib
from smtm_tf import descriptor as desc
from smtm_tf import encoders as enc
from smtm_tf import io_utils
from smtm_tf import kerascompat
from smtm_tf import stages as stages_lib
from smtm_tf.memory import SemanticMemory


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
    # Quantized variants: share of check images whose top-1 answer (`full`,
    # and the stage chain) equals the Keras model's.
    full_top1_agreement: float = 1.0
    chain_top1_agreement: float = 1.0
    exit_rule: "ExitRuleCheck | None" = None
    gpu_gate: object = None  # converters.gpu_gate.GateReport, when the gate ran.
    old_runtime: object = None  # delegates.old_runtime.ModelResult, when checked.


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


class _SmtmModule:
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
            v = enc.l2_normalize(
                tf.matmul(enc.pool(a, self.memory.pooling), encoder.kernel) + encoder.bias)
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

    def descriptor(self, model_name: str) -> desc.Descriptor:
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
                               cache=self.memory.cache_policy)


def convert_keras(model) -> bytes:
    """A plain single-signature conversion of `model` (the size baseline)."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    module = _module_tracking(model)
    shape = (1,) + tuple(int(d) for d in model.inputs[0].shape[1:])
    fn = tf.function(lambda image: {"output": model(image, training=False)},
                     input_signature=[tf.TensorSpec(shape, tf.float32, name="image")])
    return _convert_module(module, {"serving_default": fn})


def _convert_module(module, signatures: dict,
                    quantization: quant.Quantization = quant.Quantization.FLOAT32,
                    representative_dataset=None) -> bytes:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    with tempfile.TemporaryDirectory(prefix="smtm-savedmodel-") as tmp:
        concrete = {k: f.get_concrete_function() for k, f in signatures.items()}
        tf.saved_model.save(module, tmp, signatures=concrete)
        converter = tf.lite.TFLiteConverter.from_saved_model(
            tmp, signature_keys=list(signatures))
        quant.configure(converter, quantization, representative_dataset)
        return converter.convert()


def convert(model, memory: SemanticMemory, check_images: np.ndarray,
            output_path: str | None = None, model_name: str | None = None,
            atol: float = 1e-5, quantization: str | quant.Quantization = "float32",
            train_images: np.ndarray | None = None, train_labels: np.ndarray | None = None,
            qat_epochs: int = 1, min_top1_agreement: float = 0.9,
            seed: int = 0) -> tuple[bytes, ConversionReport]:
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
    builder = _SmtmModule(model, memory, qat, q)
    sigs = builder.signatures()
    descriptor = builder.descriptor(model_name or model.name)
    rep_data = None
    if q == quant.Quantization.INT8:
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(train_images), size=min(200, len(train_images)), replace=False)
        rep_data = quant.representative_dataset(builder.stage_models, memory.centres,
                                                train_images[np.sort(pick)])
    flat = _convert_module(builder.module, sigs, q, rep_data)
    flat = metadata.add_metadata(flat, desc.METADATA_NAME, descriptor.to_json().encode())
    if q == quant.Quantization.FLOAT32:
        report = check_conversion(flat, model, memory, check_images, builder.apply_softmax,
                                  atol)
    else:
        report = check_quantized(flat, builder, check_images, q, min_top1_agreement)
    if output_path:
        io_utils.write_bytes_atomic(output_path, flat)
        logging.info("Wrote %s (%d bytes).", output_path, len(flat))
    return flat, report


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
    full_diff = chain_diff = sim_diff = 0.0
    for i, image in enumerate(images.astype(np.float32)):
        x = image[None]
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
                              len(images))
    # Similarities pass through a whole stage of float32 convolutions and a
    # projection before the dot product: allow more there than on probabilities.
    sim_atol = max(100 * atol, 1e-4)
    if not (full_diff <= atol and chain_diff <= atol and sim_diff <= sim_atol
            and compiled_diff <= atol):
        raise ConversionError(
            f"The converted model does not match Keras: full differs by {full_diff:.3g}, "
            f"the stage chain by {chain_diff:.3g} (tolerance {atol}), similarities by "
            f"{sim_diff:.3g} (tolerance {sim_atol}), CompiledModel's full from the "
            f"Interpreter's by {compiled_diff:.3g}. Nothing was written.")
    return report


def check_quantized(flat: bytes, builder: "_SmtmModule", images: np.ndarray,
                    quantization: quant.Quantization,
                    min_top1_agreement: float = 0.9) -> ConversionReport:
    """Checks a quantized model against the Keras model it was made from.

    Quantized kernels cannot match float Keras to 1e-5; the check is that
    `full` and the stage chain give Keras's top-1 answer on at least
    `min_top1_agreement` of the images, that no output is NaN, and for
    float16 (float kernels, rounded weights) that probabilities stay within
    1e-2. The differences are reported either way.

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
            # XNNPACK (what apps run on the CPU) refuses some int8 scale ratios,
            # e.g. per-channel weight scales far above the input's.
            raise ConversionError(
                f"The {quantization.value} model's signature {key} does not run in the "
                f"LiteRT interpreter with XNNPACK ({e}). Nothing was written; try "
                "--quantize=dynamic or qat.") from e
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
    full_diff = chain_diff = sim_diff = 0.0
    full_agree = chain_agree = 0
    for i, image in enumerate(images.astype(np.float32)):
        x = image[None]
        got = runners["full"](image=x)["probabilities"]
        full_diff = max(full_diff, float(np.max(np.abs(got - want[i]))))
        full_agree += int(np.argmax(got) == np.argmax(want[i]))
        a = x
        for s in range(len(centres)):
            out = runners[f"stage_{s}"](activation=a, centres=centres[s])
            a = out["next_activation"]
            if not np.all(np.isfinite(out["similarities"])):
                sim_diff = float("nan")
        got = runners["head"](activation=a)["probabilities"]
        chain_diff = max(chain_diff, float(np.max(np.abs(got - want[i]))))
        chain_agree += int(np.argmax(got) == np.argmax(want[i]))
    first = images[:1].astype(np.float32)
    compiled = run_compiled(flat, "full", {"image": first})["probabilities"]
    compiled_diff = float(np.max(np.abs(compiled - runners["full"](image=first)["probabilities"])))
    n = len(images)
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
    if np.isnan(sim_diff) or not compiled_diff <= 1e-3:
        problems.append(f"NaN similarities or CompiledModel differs by {compiled_diff:.3g}")
    if problems:
        raise ConversionError(f"The {quantization.value} model fails its checks: "
                              + "; ".join(problems) + ". Nothing was written.")
    return report


def memory_path_for(model_path: str) -> str:
    """Where a model's semantic memory lives by convention: beside the model."""
    return os.path.splitext(model_path)[0] + ".smtm.npz"


def convert_model(model, data, output_path: str, memory: SemanticMemory | None = None,
                  holdout: float = 0.1, num_stages: int = 4, cut_layers=None,
                  embedding_dim: int = 32, target_agreement: float = 0.99,
                  metric: str = "layer_aware",
                  cache_policy: cache_lib.CachePolicy | None = cache_lib.CachePolicy(),
                  num_check_images: int = 64, memory_output: str | None = None,
                  seed: int = 0, quantization: str = "float32",
                  qat_epochs: int = 1, qat_images: int = 6000,
                  gpu_check: bool = True, require_gpu: bool = False,
                  gpu_precision: str = "fp32", old_runtime_check: bool = True,
                  require_old_runtime: bool = False
                  ) -> tuple[SemanticMemory, ConversionReport]:
    """Fits a semantic memory if none is given, then converts and checks.

    Args:
      model: the trained Keras classifier.
      data: `smtm_tf.data.LabelledData`; the tail `holdout` of its train split
        calibrates the exits, the rest trains the encoders, and test images
        serve the numeric checks.
      output_path: where the .tflite goes.
      memory: an already fitted memory (from the callback), or None.
      memory_output: where to save a newly fitted memory (None: do not save).
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
        (`delegates.old_runtime`), load and run every signature there
        (`report.old_runtime`; a failure is flagged in the report).
      require_old_runtime: make that check mandatory and a failure an error.

    Returns:
      (memory, report).
    """
    from smtm_tf import memory as memory_lib  # pylint: disable=import-outside-toplevel

    expected = tuple(int(d) for d in model.inputs[0].shape[1:])
    if tuple(data.x_train.shape[1:]) != expected:
        raise ValueError(
            f"The data's images are {tuple(data.x_train.shape[1:])} but the model takes "
            f"{expected}; pass data of the model's input shape.")
    if memory is None:
        (x_fit, _), (x_cal, _) = data.holdout(holdout)
        memory = memory_lib.fit_semantic_memory(
            model, x_fit, x_cal, class_names=data.class_names, num_stages=num_stages,
            cut_layers=cut_layers, embedding_dim=embedding_dim,
            target_agreement=target_agreement, metric=metric, cache_policy=cache_policy,
            seed=seed)
        if memory_output:
            memory.save(memory_output)
    q = quant.parse(quantization)
    (x_fit, y_fit), (x_cal, _) = data.holdout(holdout)
    flat, report = convert(model, memory, data.x_test[:num_check_images], None,
                           quantization=q, train_images=x_fit[:qat_images],
                           train_labels=y_fit[:qat_images], qat_epochs=qat_epochs, seed=seed)
    if q != quant.Quantization.FLOAT32:
        flat, rule_check = check_exit_rule(flat, memory, x_cal, seed=seed)
        report = dataclasses.replace(report, size_bytes=len(flat), exit_rule=rule_check)
    if gpu_check or require_gpu:
        from converters import gpu_gate  # pylint: disable=import-outside-toplevel
        gate = gpu_gate.gpu_gate(flat, data.x_test[:min(16, num_check_images)],
                                 precision=gpu_precision, require_gpu=require_gpu)
        report = dataclasses.replace(report, gpu_gate=gate)
    if old_runtime_check or require_old_runtime:
        report = dataclasses.replace(
            report, old_runtime=_check_old_runtime(flat, data.x_test[:1], require_old_runtime))
    io_utils.write_bytes_atomic(output_path, flat)
    logging.info("Wrote %s (%d bytes).", output_path, len(flat))
    return memory, report


def _check_old_runtime(flat: bytes, images: np.ndarray, required: bool):
    """tflite-runtime 2.14 loads and runs every signature? None when not installed."""
    from delegates import old_runtime  # pylint: disable=import-outside-toplevel

    try:
        old_runtime.find_python()
    except old_runtime.OldRuntimeUnavailable as e:
        if required:
            raise ConversionError(f"--require_old_runtime: {e}") from e
        return None
    with tempfile.TemporaryDirectory(prefix="smtm-oldrt-") as tmp:
        path = os.path.join(tmp, "model.tflite")
        with open(path, "wb") as f:
            f.write(flat)
        (result,) = old_runtime.check_models([path], images)
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


def _replay_rule(flat: bytes, x_cal: np.ndarray, stream_indices) -> tuple[
        tuple[float, ...], list[np.ndarray], np.ndarray]:
    from delegates.cpu import CpuBackend  # pylint: disable=import-outside-toplevel
    from smtm_tf.runtime import SmtmRuntime  # pylint: disable=import-outside-toplevel

    runtime = SmtmRuntime(flat, CpuBackend(num_threads=1))
    shape = runtime.descriptor.full.inputs[0].shape
    frames = np.asarray(x_cal, np.float32).reshape((-1,) + tuple(shape))
    full = np.array([runtime.classify_full(f[None]) for f in frames])
    agreement = []
    for indices in stream_indices(full):
        runtime.reset_cache()
        agree = sum(runtime.classify_fast(frames[i][None])[0] == full[i] for i in indices)
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
    from smtm_tf import memory as memory_lib  # pylint: disable=import-outside-toplevel

    def streams_of(full):
        return memory_lib.calibration_streams(full, num_frames=num_frames, seed=seed)

    descriptor = desc.Descriptor.from_json(metadata.read_metadata(flat, desc.METADATA_NAME))
    rule = descriptor.exit_rule
    before, runtime, full = _replay_rule(flat, x_cal, streams_of)
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
    flat = metadata.add_metadata(flat, desc.METADATA_NAME, descriptor.to_json().encode())
    after, _, _ = _replay_rule(flat, x_cal, streams_of)
    return flat, ExitRuleCheck(rule.target_agreement, before, True, after)
