"""Tests for backend selection, the GPU path, the CPU agreement check and quantization.

Tests that need Mesa's software Vulkan driver (or a GPU) or the old
tflite-runtime skip with the reason when the machine lacks them; everything
about fallback, refusals and the agreement check runs without either.
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest

import delegates
from converters import gpu_gate
from converters import quantization as quant
from converters import smtm_converter
from converters import agreement
from delegates import cpu
from delegates import external
from delegates import gpu
from delegates import model_utils
from converters import old_runtime
from smtm_tf.runtime import descriptor as desc
from smtm_tf.fitting import memory as memory_lib
from smtm_tf.fitting import stages as stages_lib
from smtm_tf.runtime import host as runtime
import testing_utils as tu

pytestmark = pytest.mark.slow

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def _gpu_unavailable_reason() -> str | None:
    """None when LiteRT's GPU accelerator opens an adapter here, else why not."""
    flat, _ = tu.converted("tf_keras")
    try:
        gpu.signature_acceleration(model_utils.single_signature_model(flat, "head"))
    except gpu.GpuUnavailableError as e:
        return f"no GPU adapter (install mesa-vulkan-drivers >= 25): {e}"
    return None


_skip_or_fail = tu.skip_or_fail


def _require_gpu(test):
    reason = _gpu_unavailable_reason()
    if reason:
        _skip_or_fail(test, "SMTM_REQUIRE_GPU", reason)


@functools.cache
def _quantized(variant: str):
    x, _ = tu.train_data()
    return smtm_converter.convert(tu.trained_residual("tf_keras"), tu.fitted_memory("tf_keras"),
                                  tu.check_images(), quantization=variant, train_images=x[:200])


_VGG_SIZE = 16


@functools.cache
def _tiny_vgg():
    """A VGG-style tf_keras Sequential trained on stripes (~3 s).

    4 x [Conv2D 3x3 relu, Conv2D 3x3 relu, MaxPool 2], Flatten, Dense relu,
    Dense softmax: the shape of the user model whose int8 conversion failed.
    Some ReLUs of its last block never fire, so the last stage has dead
    channels (pooled features that are always 0).
    """
    import tf_keras  # pylint: disable=import-outside-toplevel
    tf_keras.utils.set_random_seed(0)
    layers = tf_keras.layers
    stack = [tf_keras.Input((_VGG_SIZE, _VGG_SIZE, 1))]
    for width in (4, 8, 8, 8):
        stack += [layers.Conv2D(width, 3, padding="same", activation="relu"),
                  layers.Conv2D(width, 3, padding="same", activation="relu"),
                  layers.MaxPool2D(2)]
    stack += [layers.Flatten(), layers.Dense(16, activation="relu"),
              layers.Dense(tu.NUM_CLASSES, activation="softmax")]
    model = tf_keras.Sequential(stack, name="tiny_vgg")
    x, y = tu.stripes(1500, seed=0, size=_VGG_SIZE)
    return tu.train(model, tf_keras, x, y, epochs=4)


@functools.cache
def _tiny_vgg_memory(feed: float):
    """A memory fitted on `feed` x the stripes (1: values ~[0, 1]; 255: pixel-like)."""
    x, _ = tu.stripes(1500, seed=0, size=_VGG_SIZE)
    xc, _ = tu.stripes(400, seed=1, size=_VGG_SIZE)
    return memory_lib.fit_semantic_memory(_tiny_vgg(), feed * x, feed * xc,
                                          class_names=tu.CLASS_NAMES, num_stages=4,
                                          embedding_dim=8, encoder_epochs=5,
                                          target_agreement=0.95)


def _dead_rows(encoder) -> np.ndarray:
    """Rows of the encoder's first kernel (the one on pooled features) that are zero."""
    return np.flatnonzero(np.all(encoder.kernels[0] == 0, axis=1))


class _WrongSignature:
    """Wraps a CPU signature and corrupts one output after every invoke."""

    def __init__(self, inner, output, delta):
        self._inner, self._output, self._delta = inner, output, delta

    def set_input(self, name, value):
        self._inner.set_input(name, value)

    def invoke(self):
        self._inner.invoke()

    def output(self, name):
        out = self._inner.output(name)
        return out + self._delta if name == self._output else out

    def __call__(self, **inputs):
        for name, value in inputs.items():
            self.set_input(name, value)
        self.invoke()
        return {n: self.output(n) for n in self._inner.output_details}


class _WrongBackend:
    """A fake accelerator: the CPU backend with one signature's output shifted."""

    def __init__(self, key, output, delta):
        self.key, self.output, self.delta = key, output, delta

    def load(self, model_content):
        session = cpu.CpuBackend().load(model_content)
        original = session.signature

        def signature(key):
            sig = original(key)
            return _WrongSignature(sig, self.output, self.delta) if key == self.key else sig
        session.signature = signature
        return session


class BackendSelectionTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("cpu", "cpu", cpu.CpuBackend, None),
        ("gpu", "gpu", gpu.GpuBackend, False),
        ("gpu_strict", "gpu_strict", gpu.GpuBackend, True))
    def test_make_backend(self, name, cls, strict):
        backend = delegates.make_backend(name, precision="fp16")
        self.assertIsInstance(backend, cls)
        if strict is not None:
            self.assertEqual(backend.strict, strict)
            self.assertEqual(backend.precision, gpu.Precision.FP16)

    def test_delegate_library_selects_the_interpreter_with_a_delegate(self):
        backend = delegates.make_backend("gpu_strict", delegate_library="/x/libgpu.so",
                                         delegate_options={"a": "1"}, num_threads=2)
        self.assertIsInstance(backend, external.DelegateBackend)
        self.assertEqual((backend.library, backend.options, backend.num_threads,
                          backend.strict), ("/x/libgpu.so", {"a": "1"}, 2, True))
        self.assertFalse(delegates.make_backend("gpu", delegate_library="/x/l.so").strict)

    def test_bad_names_are_refused(self):
        with self.assertRaisesRegex(ValueError, r"Unknown backend 'npu'"):
            delegates.make_backend("npu")
        with self.assertRaisesRegex(ValueError, "'fp8' is not a valid Precision"):
            delegates.make_backend("gpu", precision="fp8")

    def test_missing_delegate_library_is_a_clear_error(self):
        flat, _ = tu.converted("tf_keras")
        backend = delegates.make_backend("cpu", delegate_library="/nonexistent/libdelegate.so")
        with self.assertRaisesRegex(external.DelegateLibraryError,
                                    "Cannot load the delegate library '/nonexistent"):
            backend.load(flat)


class FallbackTest(absltest.TestCase):

    def test_without_a_gpu_fallback_mode_runs_on_the_cpu(self):
        flat, _ = tu.converted("tf_keras")
        with mock.patch.object(gpu, "compile_model",
                               side_effect=gpu.GpuUnavailableError("no adapter")):
            session = gpu.GpuBackend(strict=False).load(flat)
            with self.assertRaises(gpu.GpuUnavailableError):
                gpu.GpuBackend(strict=True).load(flat)
        self.assertFalse(session.on_gpu)
        self.assertFalse(session.fully_accelerated)
        image = tu.check_images()[:1].astype(np.float32)
        want = cpu.CpuBackend().load(flat).signature("full")(image=image)["probabilities"]
        got = session.signature("full")(image=image)["probabilities"]
        np.testing.assert_allclose(got, want, atol=1e-6)

    def test_fallback_ops_are_parsed_from_the_accelerator_log(self):
        log = ("INFO: Created LiteRT GpuEnvironment.\n"
               "ERROR: Following operations are not supported by GPU delegate:\n"
               "L2_NORMALIZATION: Operation is not supported.\n"
               "CUMSUM: Operation is not supported.\n"
               "8 operations will run on the GPU, and the remaining 4 operations will run "
               "on the CPU.\n"
               "ERROR: Following operations are not supported by GPU delegate:\n"
               "L2_NORMALIZATION: Operation is not supported.\n")
        self.assertEqual(gpu.parse_fallback_ops(log), ("L2_NORMALIZATION", "CUMSUM"))
        self.assertEqual(gpu.parse_fallback_ops("INFO: all fine\n"), ())

    def test_native_output_on_both_streams_is_captured_and_the_streams_restored(self):
        # The OpenCL loader writes to fd 1: it must not reach a command
        # line's results. What is written after the block goes out again.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            saved = os.dup(1), os.dup(2)
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            try:
                with gpu.captured_native_output() as log:
                    os.write(1, b"INFO: Failed to load OpenCL library\n")
                    os.write(2, b"ERROR: CUMSUM: Operation is not supported.\n")
                os.write(1, b"after\n")
            finally:
                for fd, old in zip((1, 2), saved):
                    os.dup2(old, fd)
                    os.close(old)
            out.seek(0)
            err.seek(0)
            self.assertEqual(out.read(), b"after\n")
            self.assertEqual(err.read(), b"")
        self.assertIn("Failed to load OpenCL library", log[0])
        self.assertIn("CUMSUM", log[0])

    def test_require_gpu_without_a_gpu_is_an_error_and_otherwise_reported(self):
        flat, _ = tu.converted("tf_keras")
        with mock.patch.object(gpu, "signature_acceleration",
                               side_effect=gpu.GpuUnavailableError("No adapter. More.")):
            report = gpu_gate.gpu_gate(flat)
            self.assertFalse(report.available)
            self.assertIn("no GPU available (No adapter)", report.format())
            with self.assertRaisesRegex(gpu_gate.GpuGateError, "--require_gpu: No adapter"):
                gpu_gate.gpu_gate(flat, require_gpu=True)

    def test_require_gpu_with_a_falling_back_signature_is_an_error(self):
        flat, _ = tu.converted("tf_keras")
        fake = {k: gpu.SignatureAcceleration(k, k != "stage_1",
                                             ("CUMSUM",) if k == "stage_1" else ())
                for k in model_utils.signature_keys(flat)}
        with mock.patch.object(gpu, "signature_acceleration", return_value=fake):
            report = gpu_gate.gpu_gate(flat)
            self.assertFalse(report.fully_accelerated)
            self.assertIn("stage_1    falls back: CUMSUM", report.format())
            with self.assertRaisesRegex(gpu_gate.GpuGateError, "falls back: CUMSUM"):
                gpu_gate.gpu_gate(flat, require_gpu=True)


class ModelUtilsTest(absltest.TestCase):

    def test_single_signature_model_keeps_one_runnable_signature(self):
        flat, _ = tu.converted("tf_keras")
        keys = model_utils.signature_keys(flat)
        self.assertCountEqual(keys, ["stage_0", "stage_1", "stage_2", "head", "full"])
        single = model_utils.single_signature_model(flat, "stage_1")
        self.assertEqual(model_utils.signature_keys(single), ["stage_1"])
        self.assertEqual(model_utils.signature_ops(single)["stage_1"],
                         model_utils.signature_ops(flat)["stage_1"])
        sig_in = cpu.CpuBackend().load(flat).signature("stage_1").input_details
        inputs = {n: np.random.default_rng(0).uniform(size=d["shape"]).astype(np.float32)
                  for n, d in sig_in.items()}
        want = cpu.CpuBackend().load(flat).signature("stage_1")(**inputs)
        got = cpu.CpuBackend().load(single).signature("stage_1")(**inputs)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
        with self.assertRaises(KeyError):
            model_utils.single_signature_model(flat, "stage_9")

    def test_stages_have_no_l2_normalization_op(self):
        # The GPU accelerator refuses L2_NORMALIZATION; the converter must not fuse it.
        flat, _ = tu.converted("tf_keras")
        for key, ops in model_utils.signature_ops(flat).items():
            self.assertNotIn("L2_NORMALIZATION", ops, key)


class AgreementTest(parameterized.TestCase):

    def test_identical_backend_agrees(self):
        flat, _ = tu.converted("tf_keras")
        report = agreement.compare_with_cpu(flat, cpu.CpuBackend(), tu.check_images()[:4])
        self.assertTrue(report.ok, report.format())
        self.assertEqual(report.max_diff("similarities"), 0.0)
        self.assertEqual(report.num_samples, 4)
        agreement.require_agreement(report)

    @parameterized.named_parameters(
        ("similarities_fp32", "stage_1", "similarities", 2e-5, "fp32"),
        ("probabilities_fp32", "head", "probabilities", 1e-4, "fp32"),
        ("similarities_fp16", "stage_2", "similarities", 5e-2, "fp16"),
        ("nan", "full", "probabilities", float("nan"), "fp32"))
    def test_a_wrong_output_is_caught(self, key, output, delta, precision):
        flat, _ = tu.converted("tf_keras")
        report = agreement.compare_with_cpu(flat, _WrongBackend(key, output, delta),
                                            tu.check_images()[:4], precision=precision)
        self.assertFalse(report.ok)
        self.assertEqual([(o.signature, o.output) for o in report.failures], [(key, output)])
        with self.assertRaisesRegex(agreement.AgreementError, f"{key}/{output} differs"):
            agreement.require_agreement(report)

    def test_within_the_stated_fp16_tolerance_passes(self):
        flat, _ = tu.converted("tf_keras")
        report = agreement.compare_with_cpu(flat, _WrongBackend("stage_1", "similarities", 1e-3),
                                            tu.check_images()[:2], precision="fp16")
        self.assertTrue(report.ok, report.format())
        self.assertAlmostEqual(report.max_diff("similarities"), 1e-3, places=6)

    def test_decisions_are_compared_frame_by_frame(self):
        flat, _ = tu.exiting_converted("tf_keras")
        frames = tu.stripes(40, seed=5)[0]
        same = agreement.compare_decisions(flat, cpu.CpuBackend(), frames)
        self.assertTrue(same.ok)
        self.assertEqual((same.frames, same.identical), (40, 40))
        # Similarities pushed far off at stage 0 change its exits.
        wrong = agreement.compare_decisions(flat, _StageShift(), frames)
        self.assertFalse(wrong.ok)
        self.assertIsNotNone(wrong.first_difference)


class _StageShift:
    """A backend whose stage_0 similarities are all raised (so it exits there more)."""

    def load(self, model_content):
        session = cpu.CpuBackend().load(model_content)
        sig = session.signature("stage_0")
        invoke = sig.invoke
        sims = sig.output_view("similarities")
        view = np.array(sims)  # A separate buffer the runtime will read.

        def shifted_invoke():
            invoke()
            np.copyto(view, sims)
            view[np.argmax(view)] += 1.0
        sig.invoke = shifted_invoke
        sig.output_view = lambda name: view if name == "similarities" else \
            cpu.Signature.output_view(sig, name)
        return session


class QuantizationTest(parameterized.TestCase):

    @parameterized.named_parameters(("float16", "float16"), ("dynamic", "dynamic"),
                                    ("int8", "int8"))
    def test_variant_records_quantization_and_keeps_float_io(self, variant):
        flat, report = _quantized(variant)
        d = runtime.read_descriptor(flat)
        self.assertEqual(d.quantization, variant)
        self.assertEqual(report.quantization, variant)
        self.assertGreaterEqual(report.full_top1_agreement, 0.9)
        types = model_utils.tensor_types(flat)
        if variant == "int8":
            self.assertIn("INT8", types["stage_1"])
        if variant == "float16":
            self.assertIn("FLOAT16", types["full"])
        session = cpu.CpuBackend().load(flat)
        for key in session.signature_keys:
            sig = session.signature(key)
            for details in (sig.input_details, sig.output_details):
                self.assertEqual({np.dtype(d["dtype"]) for d in details.values()},
                                 {np.dtype(np.float32)})
        # Similarities of the fitted encoders survive quantization. Dynamic
        # range quantizes both of an encoder's matmuls (hidden layer and
        # projection): 0.052 measured here, against < 0.05 with one.
        self.assertLess(report.similarity_max_abs_diff,
                        {"float16": 1e-2, "dynamic": 8e-2, "int8": 0.3}[variant])
        # The harness runs it unchanged, early exits included.
        rt = runtime.SmtmRuntime(flat)
        images, labels = tu.stripes(64, seed=3)
        answers = [rt.classify(x).class_id for x in images]
        self.assertGreater(np.mean(np.array(answers) == labels), 0.8)
        answers = [rt.classify_full(x[None].astype(np.float32)) for x in images]
        self.assertGreater(np.mean(np.array(answers) == labels), 0.8)

    def test_quantized_descriptor_round_trip(self):
        flat, _ = _quantized("int8")
        d = runtime.read_descriptor(flat)
        again = desc.Descriptor.from_json(d.to_json())
        self.assertEqual(again, d)
        self.assertEqual(again.quantization, "int8")
        raw = json.loads(d.to_json())
        raw["quantization"] = "int4"
        with self.assertRaisesRegex(desc.DescriptorError, "quantization 'int4' is not one of"):
            desc.Descriptor.from_dict(raw)

    def test_descriptor_values_match_the_converter(self):
        self.assertEqual(tuple(q.value for q in quant.Quantization), desc.QUANTIZATIONS)

    def test_refusals(self):
        with self.assertRaisesRegex(quant.QuantizationError, "'int16x8' is refused: .*RSQRT"):
            quant.parse("int16x8")
        with self.assertRaisesRegex(quant.QuantizationError, "Unknown quantization 'int4'"):
            quant.parse("int4")
        with self.assertRaisesRegex(quant.QuantizationError, "int8 quantization needs"):
            smtm_converter.convert(tu.trained_residual("tf_keras"),
                                   tu.fitted_memory("tf_keras"), tu.check_images(),
                                   quantization="int8")

    def test_an_int8_model_that_misses_agreement_names_its_worst_ops(self):
        x, _ = tu.train_data()
        # No int8 model agrees with Keras on more than every image: refused,
        # with the ops that lose most and what to use instead.
        with self.assertRaisesRegex(
                smtm_converter.ConversionError,
                r"(?s)The int8 model fails its checks: top-1 agreement.*Nothing was written\. "
                r"Largest int8 errors \(RMSE in quantization steps.*\): [A-Z_0-9]+ .*\(\d\.\d\d\)"
                r".*Instead: --quantize=float16"):
            smtm_converter.convert(tu.trained_residual("tf_keras"), tu.fitted_memory("tf_keras"),
                                   tu.check_images(), quantization="int8", train_images=x[:200],
                                   min_top1_agreement=1.01)

    def test_int8_errors_say_whether_one_op_stands_out(self):
        spread = [quant.OpError("CONV_2D", f"t{i}", 0.3) for i in range(10)]
        self.assertIn("No op stands out", quant.explain_int8_errors(spread))
        one = [quant.OpError("LOGISTIC", "se/Sigmoid;x", 5.0)] + spread
        text = quant.explain_int8_errors(one)
        self.assertIn("LOGISTIC at se/Sigmoid stands out (the median op: 0.30)", text)
        self.assertIn("Instead: --quantize=float16", quant.explain_int8_errors([]))
        errors = smtm_converter.int8_errors_by_op(tu.trained_residual("tf_keras"),
                                                  tu.train_data()[0][:50])
        self.assertGreater(len(errors), 3)
        values = [e.rmse_per_scale for e in errors]
        self.assertEqual(values, sorted(values, reverse=True))
        self.assertTrue(all(np.isfinite(v) and v >= 0 for v in values))

    def test_a_signature_xnnpack_cannot_prepare_is_refused(self):
        flat, _ = _quantized("dynamic")
        builder = mock.Mock(model=tu.trained_residual("tf_keras"), apply_softmax=False,
                            memory=tu.fitted_memory("tf_keras"))
        failing = mock.Mock(side_effect=RuntimeError("Node number 19 failed to prepare."))
        failing.get_input_details.return_value = {}
        with mock.patch("ai_edge_litert.interpreter.Interpreter.get_signature_runner",
                        return_value=failing):
            with self.assertRaisesRegex(smtm_converter.ConversionError,
                                        "does not run in the LiteRT interpreter with XNNPACK"):
                smtm_converter.check_quantized(flat, builder, tu.check_images(),
                                               quant.Quantization.INT8)

    @parameterized.named_parameters(("unit_inputs", 1.0), ("pixel_inputs", 255.0))
    def test_vgg_sequential_with_dead_channels_converts_to_every_variant(self, feed):
        model, memory = _tiny_vgg(), _tiny_vgg_memory(feed)
        # Dead channels get zero rows, and no encoder weight is huge whatever
        # the input units (they were ~5e5 here, and XNNPACK refused int8).
        self.assertTrue(any(len(_dead_rows(e)) for e in memory.encoders))
        for e in memory.encoders:
            self.assertLess(feed * np.max(np.abs(e.kernels[0])), 100.0)
            self.assertLess(np.max(np.abs(e.kernels[-1])), 100.0)
        x, _ = tu.stripes(200, seed=0, size=_VGG_SIZE)
        images, labels = tu.stripes(64, seed=2, size=_VGG_SIZE)
        _, report = smtm_converter.convert(model, memory, feed * images)
        self.assertLessEqual(report.similarity_max_abs_diff, 1e-4)
        for variant, sim_limit in (("float16", 1e-2), ("int8", 0.3)):
            flat, report = smtm_converter.convert(model, memory, feed * images,
                                                  quantization=variant,
                                                  train_images=feed * x)
            self.assertLess(report.similarity_max_abs_diff, sim_limit)
            self.assertGreaterEqual(report.chain_top1_agreement, 0.9)
            for key in model_utils.signature_keys(flat):
                self.assertEqual(quant.xnnpack_scale_problems(flat, key), [])
            if variant == "int8":
                self.assertIn("INT8", model_utils.tensor_types(flat)["stage_3"])
            rt = runtime.SmtmRuntime(flat)
            answers = np.array([rt.classify(feed * im).class_id for im in images])
            self.assertGreater(np.mean(answers == labels), 0.9)

    def test_int8_stage_ends_keep_their_range_when_linear(self):
        # Stages ending at a linear conv and at a residual add (negative
        # values). The encoder's max pooling once gave the map the range of
        # its pooled values, clipping the negative tail of what the next
        # stage reads.
        model = tu.trained_residual("tf_keras")
        x, _ = tu.train_data()
        memory = memory_lib.fit_semantic_memory(
            model, x, tu.calibration_data()[0], class_names=tu.CLASS_NAMES,
            cut_layers=("c0", "add"), embedding_dim=8, encoder_epochs=2)
        flat, report = smtm_converter.convert(model, memory, tu.check_images(),
                                              quantization="int8", train_images=x[:200])
        self.assertGreaterEqual(report.chain_top1_agreement, 0.9)
        session = cpu.CpuBackend().load(flat)
        a = tu.check_images()[:16]
        for s, stage in enumerate(stages_lib.split_model(model, memory.plan)[0]):
            want = np.asarray(stage(a), np.float32)
            self.assertLess(want.min(), -0.2 * want.max())  # a negative tail to keep
            run = session.signature(f"stage_{s}")
            got = np.stack([run(activation=a[i:i + 1], centres=memory.centres[s])
                            ["next_activation"][0] for i in range(len(a))])
            self.assertLess(np.sqrt(np.mean((got - want) ** 2)), 0.05 * np.std(want),
                            f"stage_{s}")
            a = want

    def test_an_encoder_xnnpack_refuses_is_named(self):
        # An encoder as the old fit made them: a huge row on a dead channel.
        memory = _tiny_vgg_memory(1.0)
        s = next(i for i, e in enumerate(memory.encoders) if len(_dead_rows(e)))
        e = memory.encoders[s]
        kernel = e.kernels[0].copy()
        kernel[_dead_rows(e)[0]] = 1e5
        encoders = list(memory.encoders)
        encoders[s] = dataclasses.replace(
            e, **{"hidden_kernel" if e.hidden_units else "kernel": kernel})
        x, _ = tu.stripes(200, seed=0, size=_VGG_SIZE)
        with self.assertRaisesRegex(
                smtm_converter.ConversionError,
                rf"signature stage_{s} does not run .*XNNPACK refuses the int8 scales of "
                rf"FULLY_CONNECTED \(op \d+ of stage_{s}, .* XNNPACK needs < 256\. That op "
                r"is the stage's semantic encoder, whose largest weight is 1e\+05.*"
                r"near-constant features \(refit it\).*features are all tiny.*"
                r"--quantize=float16 or dynamic"):
            smtm_converter.convert(_tiny_vgg(),
                                   dataclasses.replace(memory, encoders=tuple(encoders)),
                                   tu.stripes(16, seed=2, size=_VGG_SIZE)[0],
                                   quantization="int8", train_images=x)

    def test_exit_rule_kept_when_the_quantized_model_meets_its_target(self):
        flat, _ = tu.exiting_converted("tf_keras")
        with mock.patch.object(smtm_converter, "replay_rule",
                               return_value=((0.95, 0.97), mock.Mock(), np.zeros(3))):
            same, check = smtm_converter.check_exit_rule(flat, tu.exiting_memory("tf_keras"),
                                                         tu.calibration_data()[0])
        self.assertIs(same, flat)
        self.assertFalse(check.recalibrated)
        self.assertIn("kept", check.format())

    def test_exit_rule_recalibrated_on_quantized_similarities_when_it_misses(self):
        flat, _ = tu.exiting_converted("tf_keras")
        mem = tu.exiting_memory("tf_keras")
        old_rule = runtime.read_descriptor(flat).exit_rule
        new_rule = dataclasses.replace(old_rule, thresholds=tuple(
            None if t is None else t + 0.5 for t in old_rule.thresholds))
        x_cal = tu.calibration_data()[0][:50]
        rt = runtime.SmtmRuntime(flat)
        replays = [((0.85, 0.95), rt, np.arange(50) % tu.NUM_CLASSES),
                   ((0.93, 0.96), rt, np.arange(50) % tu.NUM_CLASSES)]
        with mock.patch.object(smtm_converter, "replay_rule", side_effect=replays), \
                mock.patch("smtm_tf.fitting.memory.calibrate_rule", return_value=new_rule) as calib:
            rewritten, check = smtm_converter.check_exit_rule(flat, mem, x_cal)
        self.assertTrue(check.recalibrated)
        self.assertEqual((check.agreement_before, check.agreement_after),
                         ((0.85, 0.95), (0.93, 0.96)))
        self.assertEqual(runtime.read_descriptor(rewritten).exit_rule, new_rule)
        sims, full = calib.call_args.args[:2]
        self.assertLen(sims, rt.num_stages)
        self.assertEqual(sims[0].shape, (50, tu.NUM_CLASSES))
        self.assertEqual(calib.call_args.args[3], old_rule.target_agreement)

    def test_dynamic_uses_per_tensor_dense_weights(self):
        # Per-channel hybrid FULLY_CONNECTED (version 12) does not load on
        # tflite-runtime 2.14 (the demo's dynamic model failed there).
        converter = mock.Mock()
        quant.configure(converter, quant.Quantization.DYNAMIC)
        self.assertIs(
            converter._experimental_disable_per_channel_quantization_for_dense_layers, True)
        converter = mock.Mock()
        quant.configure(converter, quant.Quantization.INT8, representative_dataset=list)
        self.assertIs(converter.representative_dataset, list)

    def test_qat_refuses_keras3_models_before_importing_tfmot(self):
        x, y = tu.train_data()
        with self.assertRaisesRegex(quant.QuantizationError, "needs a tf_keras functional"):
            smtm_converter.convert(tu.trained_residual("keras"), tu.fitted_memory("keras"),
                                   tu.check_images(), quantization="qat", train_images=x,
                                   train_labels=y)
        self.assertNotIn("tensorflow_model_optimization", sys.modules)

    def test_non_float_signature_io_is_refused_by_the_gpu_session(self):
        model = mock.Mock()
        model.get_input_tensor_details.return_value = {
            "image": {"shape": [1, 4], "dtype": np.int8}}
        model.get_output_tensor_details.return_value = {}
        with self.assertRaisesRegex(ValueError, "keep float32 signature inputs"):
            gpu.GpuSignature(model, "full")


class GpuTest(absltest.TestCase):
    """Needs LiteRT's GPU accelerator to open an adapter (a GPU or lavapipe)."""

    def setUp(self):
        super().setUp()
        _require_gpu(self)

    def test_every_signature_is_fully_accelerated_and_matches_the_cpu(self):
        flat, _ = tu.converted("tf_keras")
        report = gpu_gate.gpu_gate(flat, tu.check_images()[:4], require_gpu=True)
        self.assertTrue(report.fully_accelerated, report.format())
        self.assertLessEqual(report.agreement.max_diff("similarities"), 1e-5)

    def test_strict_mode_names_the_op_that_falls_back(self):
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        fn = tf.function(lambda x: {"y": tf.math.l2_normalize(x, axis=-1)},
                         input_signature=[tf.TensorSpec((1, 8), tf.float32, name="x")])
        conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()])
        flat = conv.convert()
        with self.assertRaises(gpu.GpuFallbackError) as cm:
            gpu.GpuBackend(strict=True).load(flat)
        self.assertEqual(cm.exception.fallback_ops, ("L2_NORMALIZATION",))
        session = gpu.GpuBackend(strict=False).load(flat)
        self.assertTrue(session.on_gpu)
        self.assertFalse(session.fully_accelerated)

    def test_session_honours_the_harness_contract(self):
        flat, _ = tu.converted("tf_keras")
        d = runtime.read_descriptor(flat)
        g = gpu.GpuBackend(strict=True).load(flat).signature("stage_1")
        c = cpu.CpuBackend().load(flat).signature("stage_1")
        act, centres = g.input_view("activation"), g.input_view("centres")
        out = g.output_view("similarities")
        rng = np.random.default_rng(1)
        for step in range(3):
            a = rng.uniform(0, 1, act.shape).astype(np.float32)
            cen = np.array(d.stages[1].centres)
            if step == 2:  # The runtime rewrites centre rows between frames.
                cen[0] = -cen[0]
            np.copyto(act, a)
            np.copyto(centres, cen)
            g.invoke()
            want = c(activation=a, centres=cen)["similarities"]
            np.testing.assert_allclose(out, want, atol=1e-5)
        self.assertIs(g.output_view("similarities"), out)

    def test_exit_decisions_match_the_cpu(self):
        flat, _ = tu.exiting_converted("tf_keras")
        result = agreement.compare_decisions(flat, gpu.GpuBackend(strict=True),
                                             tu.stripes(100, seed=6)[0])
        self.assertTrue(result.ok, result)


class OldRuntimeTest(parameterized.TestCase):
    """Needs a virtualenv with tflite-runtime==2.14.0 (see delegates/old_runtime.py)."""

    def setUp(self):
        super().setUp()
        try:
            old_runtime.find_python()
        except old_runtime.OldRuntimeUnavailable as e:
            _skip_or_fail(self, "SMTM_REQUIRE_OLD_RUNTIME", str(e))

    @parameterized.named_parameters(("float32", "float32"), ("float16", "float16"),
                                    ("dynamic", "dynamic"), ("int8", "int8"))
    def test_variant_loads_and_runs_on_tflite_runtime_2_14(self, variant):
        flat = tu.converted("tf_keras")[0] if variant == "float32" else _quantized(variant)[0]
        path = os.path.join(self.create_tempdir().full_path, f"{variant}.tflite")
        with open(path, "wb") as f:
            f.write(flat)
        (result,) = old_runtime.check_models([path], tu.check_images())
        self.assertTrue(result.ok, result.format())
        self.assertEqual(result.runtime, "2.14.0")
        self.assertLen(result.signatures, 5)
        # Integer kernels of the two runtimes may round an output one
        # quantization step apart (int8 steps here are ~0.01-0.07).
        limit = {"float32": 1e-4, "float16": 1e-4, "dynamic": 0.1, "int8": 0.1}[variant]
        for s in result.signatures:
            self.assertLessEqual(s.max_abs_diff, limit, s)

    def test_a_model_it_cannot_load_is_reported(self):
        path = os.path.join(self.create_tempdir().full_path, "broken.tflite")
        with open(path, "wb") as f:
            f.write(tu.converted("tf_keras")[0][:2000])
        with mock.patch.object(old_runtime, "_sample_inputs", return_value={}):
            (result,) = old_runtime.check_models([path])
        self.assertFalse(result.ok)
        self.assertIn("FAILED to load", result.format())


class QatTest(absltest.TestCase):
    """QAT runs in a child process: importing tfmot switches the process to tf_keras."""

    def test_qat_variant_converts_and_runs(self):
        try:
            import importlib.util  # pylint: disable=import-outside-toplevel
            if importlib.util.find_spec("tensorflow_model_optimization") is None:
                raise ImportError
        except ImportError:
            _skip_or_fail(self, "SMTM_REQUIRE_QAT",
                          "tensorflow-model-optimization is not installed (pip install -e "
                          "'.[qat]' && pip install --no-deps "
                          "tensorflow-model-optimization==0.8.1).")
        out = os.path.join(self.create_tempdir().full_path, "qat.tflite")
        script = (
            "import sys; sys.path.insert(0, 'tests')\n"
            "import testing_utils as tu\n"
            "from converters import smtm_converter\n"
            "x, y = tu.train_data()\n"
            "flat, report = smtm_converter.convert(tu.trained_residual('tf_keras'),"
            " tu.fitted_memory('tf_keras'), tu.check_images(), quantization='qat',"
            " train_images=x, train_labels=y, qat_epochs=2)\n"
            f"open({out!r}, 'wb').write(flat)\n"
            "print('AGREEMENT', report.full_top1_agreement, report.chain_top1_agreement)\n")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
        proc = subprocess.run([sys.executable, "-c", script], cwd=_REPO, env=env,
                              capture_output=True, text=True, timeout=600, check=False)
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        with open(out, "rb") as f:
            flat = f.read()
        self.assertEqual(runtime.read_descriptor(flat).quantization, "qat")
        self.assertIn("INT8", model_utils.tensor_types(flat)["stage_1"])
        images, labels = tu.stripes(64, seed=3)
        rt = runtime.SmtmRuntime(flat)
        self.assertGreater(np.mean([rt.classify(x).class_id == y
                                    for x, y in zip(images, labels)]), 0.8)
        self.assertNotIn("tensorflow_model_optimization", sys.modules)


if __name__ == "__main__":
    absltest.main()
