"""Tests for converters.smtm_converter and smtm_tf.runtime.metadata."""

import dataclasses
import os
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
from ai_edge_litert import interpreter as litert
from ai_edge_litert import schema_py_generated as schema
import numpy as np
import pytest

from smtm_tf.runtime import metadata
from converters import smtm_converter
from smtm_tf.fitting import data as data_lib
from smtm_tf.runtime import descriptor as desc
from smtm_tf.fitting import encoders as enc
from smtm_tf.runtime import exit_policy
from smtm_tf.fitting import memory as memory_lib
from smtm_tf.runtime import preprocessing as prep
from smtm_tf.runtime import host as runtime
from smtm_tf.fitting import stages
import testing_utils as tu

pytestmark = pytest.mark.slow

SIGNATURES = {"stage_0", "stage_1", "stage_2", "head", "full"}


def _interpreter(flat):
    return litert.Interpreter(model_content=flat, num_threads=1)


def _with_other_encoders(mem):
    return dataclasses.replace(mem, encoders=tuple(
        dataclasses.replace(e, kernel=e.kernel * 1.5 + 0.05) for e in mem.encoders))


def _with_other_centres(mem):
    # Every class's centre swapped with another class's: same unit vectors,
    # different memory.
    return dataclasses.replace(mem, centres=tuple(np.roll(c, 1, axis=0) for c in mem.centres))


class ConvertTest(parameterized.TestCase):
    """The tf_keras model (the default flavour of the demo models)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model = tu.trained_residual("tf_keras")
        cls.memory = tu.fitted_memory("tf_keras")
        cls.flat, cls.report = tu.converted("tf_keras")
        cls.images = tu.check_images()

    def test_report(self):
        r = self.report
        self.assertLessEqual(r.full_max_abs_diff, 1e-5)
        self.assertLessEqual(r.chain_max_abs_diff, 1e-5)
        # Similarities go through a stage of convolutions and a projection.
        self.assertLessEqual(r.similarity_max_abs_diff, 1e-4)
        self.assertEqual(r.size_bytes, len(self.flat))
        self.assertEqual(r.num_check_images, len(self.images))

    def test_output_file_is_written_atomically(self):
        directory = self.create_tempdir().full_path
        path = os.path.join(directory, "tiny.smtm.tflite")
        flat, report = smtm_converter.convert(self.model, self.memory, self.images[:4],
                                              output_path=path)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), flat)
        self.assertEqual(os.listdir(directory), ["tiny.smtm.tflite"])
        self.assertEqual(report.num_check_images, 4)
        self.assertEqual(report.size_bytes, os.path.getsize(path))

    def test_descriptor_reads_back(self):
        d = runtime.read_descriptor(self.flat)
        mem = self.memory
        self.assertEqual(d.model_name, self.model.name)
        self.assertEqual(d.class_names, tu.CLASS_NAMES)
        self.assertEqual(d.pooling, memory_lib.POOLING.value)
        self.assertEqual(tuple(s.cut_layer for s in d.stages), mem.plan.cut_layers)
        self.assertEqual(tuple(s.cost for s in d.stages), mem.plan.stage_costs)
        for s, stage in enumerate(d.stages):
            np.testing.assert_array_equal(stage.centres, mem.centres[s])
        self.assertEqual(d.exit_rule, mem.exit_rule)
        self.assertEqual(d.lookup_op.name, desc.LOOKUP_OP_NAME)
        self.assertEqual(d.full.inputs[0].shape, (1, 12, 12, 1))
        self.assertEqual(d.stages[0].signature.inputs[1].shape, (4, 8))
        self.assertEqual(d.stages[1].signature.inputs[0].shape, (1, 12, 12, 8))
        self.assertEqual(d.head.inputs[0].shape, (1, 6, 6, 16))
        self.assertEqual(d.head.outputs[0].shape, (4,))

    def test_model_name_can_be_set(self):
        flat, _ = smtm_converter.convert(self.model, self.memory, self.images[:1],
                                         model_name="my model")
        self.assertEqual(runtime.read_descriptor(flat).model_name, "my model")

    def test_signatures_match_the_descriptor(self):
        interp = _interpreter(self.flat)
        sigs = interp.get_signature_list()
        self.assertEqual(set(sigs), SIGNATURES)
        d = runtime.read_descriptor(self.flat)
        for spec in [s.signature for s in d.stages] + [d.head, d.full]:
            runner = interp.get_signature_runner(spec.key)
            inputs = runner.get_input_details()
            outputs = runner.get_output_details()
            self.assertEqual(set(inputs), {t.name for t in spec.inputs}, spec.key)
            self.assertEqual(set(outputs), {t.name for t in spec.outputs}, spec.key)
            for t in spec.inputs:
                self.assertEqual(tuple(inputs[t.name]["shape"]), t.shape, (spec.key, t.name))
            for t in spec.outputs:
                self.assertEqual(tuple(outputs[t.name]["shape"]), t.shape, (spec.key, t.name))

    def test_signatures_compute_what_keras_and_the_memory_compute(self):
        # Independent of check_conversion: run every signature by hand.
        interp = _interpreter(self.flat)
        stage_models, head_model = stages.split_model(self.model, self.memory.plan)
        want = self.model.predict(self.images[:4], verbose=0)
        for i in range(4):
            x = self.images[i:i + 1]
            a_lite, a_keras = x, x
            for s, stage_model in enumerate(stage_models):
                out = interp.get_signature_runner(f"stage_{s}")(
                    activation=a_lite, centres=self.memory.centres[s])
                a_keras = np.asarray(stage_model(a_keras, training=False))
                np.testing.assert_allclose(out["next_activation"], a_keras, atol=1e-5)
                semantic = self.memory.encoders[s].encode(
                    np.asarray(enc.pool(a_keras, self.memory.pooling)))[0]
                np.testing.assert_allclose(out["semantic"], semantic, atol=1e-4)
                self.assertAlmostEqual(float(np.linalg.norm(out["semantic"])), 1.0, places=5)
                np.testing.assert_allclose(out["similarities"],
                                           self.memory.centres[s] @ out["semantic"], atol=1e-5)
                a_lite = out["next_activation"]
            head = interp.get_signature_runner("head")(activation=a_lite)["probabilities"]
            full = interp.get_signature_runner("full")(image=x)["probabilities"]
            np.testing.assert_allclose(head, want[i], atol=1e-5)
            np.testing.assert_allclose(full, want[i], atol=1e-5)

    def test_check_conversion_rejects_other_encoders(self):
        with self.assertRaisesRegex(smtm_converter.ConversionError,
                                    "does not match Keras.*similarities by"):
            smtm_converter.check_conversion(self.flat, self.model,
                                            _with_other_encoders(self.memory), self.images[:4],
                                            apply_softmax=False)

    def test_check_conversion_passes_for_the_converted_memory(self):
        report = smtm_converter.check_conversion(self.flat, self.model, self.memory,
                                                 self.images[:4], apply_softmax=False)
        self.assertLessEqual(report.full_max_abs_diff, 1e-5)
        self.assertLess(report.keras_batch_spread, 1e-5)

    def test_check_conversion_rejects_other_weights(self):
        # Keras's own spread between batch sizes widens the tolerance only by
        # float32 noise: a model whose last weights moved is refused.
        other = type(self.model).from_config(self.model.get_config())
        other.set_weights(self.model.get_weights())
        kernel, bias = other.layers[-1].get_weights()
        other.layers[-1].set_weights([kernel * 1.01, bias])
        with self.assertRaisesRegex(smtm_converter.ConversionError,
                                    "full differs by .*Keras's own spread"):
            smtm_converter.check_conversion(self.flat, other, self.memory, self.images[:4],
                                            apply_softmax=False)

    def test_probability_tolerance(self):
        self.assertEqual(smtm_converter.probability_tolerance(1e-5, 1e-7), 1e-5)
        self.assertAlmostEqual(smtm_converter.probability_tolerance(1e-5, 1e-4),
                               smtm_converter.KERAS_SPREAD_FACTOR * 1e-4)

    def test_check_conversion_rejects_other_centres(self):
        # The centres are part of the converted model (its descriptor holds
        # them, and the runtime feeds them to the stages). A memory whose
        # centres differ from the converted ones must fail the check.
        with self.assertRaises(smtm_converter.ConversionError):
            smtm_converter.check_conversion(self.flat, self.model,
                                            _with_other_centres(self.memory), self.images[:4],
                                            apply_softmax=False)

    @parameterized.named_parameters(("new_file", False), ("existing_file", True))
    def test_failed_check_writes_nothing(self, existing):
        directory = self.create_tempdir().full_path
        path = os.path.join(directory, "model.tflite")
        if existing:
            with open(path, "wb") as f:
                f.write(b"previous model")
        real_check = smtm_converter.check_conversion
        other = _with_other_encoders(self.memory)

        def check_with_other_memory(flat, model, memory, *args, **kwargs):
            del memory
            return real_check(flat, model, other, *args, **kwargs)

        with mock.patch.object(smtm_converter, "check_conversion",
                               side_effect=check_with_other_memory):
            with self.assertRaisesRegex(smtm_converter.ConversionError, "Nothing was written"):
                smtm_converter.convert(self.model, self.memory, self.images[:2],
                                       output_path=path)
        if existing:
            self.assertEqual(os.listdir(directory), ["model.tflite"])
            with open(path, "rb") as f:
                self.assertEqual(f.read(), b"previous model")
        else:
            self.assertEqual(os.listdir(directory), [])

    def test_needs_check_images(self):
        with self.assertRaisesRegex(ValueError, "at least one check image"):
            smtm_converter.convert(self.model, self.memory, self.images[:0])


class HiddenEncoderTest(absltest.TestCase):
    """Encoders with a hidden layer convert to the stage signatures they compute."""

    def test_stage_signatures_compute_the_hidden_encoders(self):
        model = tu.trained_residual("tf_keras")
        x, _ = tu.train_data()
        xc, _ = tu.calibration_data()
        mem = memory_lib.fit_semantic_memory(model, x[:300], xc[:100], num_stages=2,
                                             embedding_dim=4, encoder_hidden=8,
                                             encoder_epochs=2, cache_policy=None)
        self.assertEqual([e.hidden_units for e in mem.encoders], [8, 8])
        images = tu.check_images()
        flat, report = smtm_converter.convert(model, mem, images)
        self.assertLessEqual(report.similarity_max_abs_diff, 1e-4)
        interp = _interpreter(flat)
        stage_models, _ = stages.split_model(model, mem.plan)
        a_lite = a_keras = images[:1]
        for s, stage_model in enumerate(stage_models):
            out = interp.get_signature_runner(f"stage_{s}")(activation=a_lite,
                                                            centres=mem.centres[s])
            a_keras = np.asarray(stage_model(a_keras, training=False))
            want = mem.encoders[s].encode(np.asarray(enc.pool(a_keras, mem.pooling)))[0]
            np.testing.assert_allclose(out["semantic"], want, atol=1e-4)
            a_lite = out["next_activation"]


class PoolingTest(parameterized.TestCase):
    """Every pooling converts to stage signatures that compute it."""

    @parameterized.parameters(*enc.Pooling)
    def test_stage_signatures_compute_the_pooling(self, pooling):
        model = tu.trained_residual("tf_keras")
        x, _ = tu.train_data()
        xc, _ = tu.calibration_data()
        mem = memory_lib.fit_semantic_memory(model, x[:300], xc[:100], num_stages=2,
                                             embedding_dim=4, pooling=pooling,
                                             encoder_epochs=2, cache_policy=None)
        self.assertIs(mem.pooling, pooling)
        images = tu.check_images()
        flat, report = smtm_converter.convert(model, mem, images)
        self.assertLessEqual(report.similarity_max_abs_diff, 1e-4)
        self.assertEqual(runtime.read_descriptor(flat).pooling, pooling.value)
        interp = _interpreter(flat)
        stage_models, _ = stages.split_model(model, mem.plan)
        a = images[:1]
        for s, stage_model in enumerate(stage_models):
            out = interp.get_signature_runner(f"stage_{s}")(activation=a,
                                                            centres=mem.centres[s])
            a = np.asarray(stage_model(a, training=False))
            features = np.asarray(enc.pool(a, pooling))
            np.testing.assert_allclose(out["semantic"], mem.encoders[s].encode(features)[0],
                                       atol=1e-4)


class ConvertKeras3Test(absltest.TestCase):
    """Keras 3 models: the converter must track their variables explicitly."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model = tu.trained_residual("keras")
        cls.memory = tu.fitted_memory("keras")
        cls.flat, cls.report = tu.converted("keras")

    def test_report(self):
        self.assertLessEqual(self.report.full_max_abs_diff, 1e-5)
        self.assertLessEqual(self.report.chain_max_abs_diff, 1e-5)
        self.assertLessEqual(self.report.similarity_max_abs_diff, 1e-4)

    def test_full_and_stages_are_finite_and_match_keras(self):
        interp = _interpreter(self.flat)
        self.assertEqual(set(interp.get_signature_list()), SIGNATURES)
        images, _ = tu.stripes(10, seed=9)
        want = np.asarray(self.model.predict(images, verbose=0))
        full = interp.get_signature_runner("full")
        stage_0 = interp.get_signature_runner("stage_0")
        for i in range(len(images)):
            got = full(image=images[i:i + 1])["probabilities"]
            self.assertTrue(np.all(np.isfinite(got)))
            np.testing.assert_allclose(got, want[i], atol=1e-5)
            out = stage_0(activation=images[i:i + 1], centres=self.memory.centres[0])
            for name, value in out.items():
                self.assertTrue(np.all(np.isfinite(value)), name)
            # Weights really are in the model: the activation is not all zeros.
            self.assertGreater(float(np.abs(out["next_activation"]).max()), 0.0)

    def test_descriptor(self):
        d = runtime.read_descriptor(self.flat)
        self.assertEqual(tuple(s.cut_layer for s in d.stages), ("r0", "out1", "r2"))
        self.assertEqual(d.exit_rule, self.memory.exit_rule)


class OutputActivationTest(absltest.TestCase):
    """`probabilities` outputs must be probabilities whatever the model's last layer."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # Same architecture and layer names as the fitted model: its memory fits.
        cls.memory = tu.fitted_memory("tf_keras")
        cls.images = tu.check_images()[:4]

    def _full(self, model):
        flat, report = smtm_converter.convert(model, self.memory, self.images)
        runner = _interpreter(flat).get_signature_runner("full")
        return np.stack([runner(image=x[None])["probabilities"] for x in self.images]), report

    def test_logits_model_gets_a_softmax(self):
        k = tu.keras_module("tf_keras")
        k.utils.set_random_seed(1)
        model = tu.residual_cnn(k, output="logits")
        got, report = self._full(model)
        logits = np.asarray(model(self.images))
        want = np.exp(logits - logits.max(axis=1, keepdims=True))
        want /= want.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(got, want, atol=1e-5)
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
        self.assertLessEqual(report.full_max_abs_diff, 1e-5)

    def test_softmax_layer_model_is_not_softmaxed_twice(self):
        # A model ending in keras.layers.Softmax already outputs probabilities.
        k = tu.keras_module("tf_keras")
        k.utils.set_random_seed(1)
        model = tu.residual_cnn(k, output="softmax_layer")
        got, _ = self._full(model)
        np.testing.assert_allclose(got, np.asarray(model(self.images)), atol=1e-5)


def _nudged(model):
    """A copy of `model` with one weight changed by 1e-4 (the same answers)."""
    import tf_keras  # pylint: disable=import-outside-toplevel
    copy = tf_keras.models.clone_model(model)
    weights = model.get_weights()
    weights[-1] = weights[-1] + 1e-4
    copy.set_weights(weights)
    return copy


class ConvertModelTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model = tu.trained_residual("tf_keras")
        cls.data = tu.labelled_stripes(300, 40, train_seed=20, test_seed=21)

    def test_fits_saves_and_converts(self):
        directory = self.create_tempdir().full_path
        out = os.path.join(directory, "m.tflite")
        mem_path = os.path.join(directory, "m.smtm.npz")
        mem, report = smtm_converter.convert_model(
            self.model, self.data, out, holdout=0.2, num_stages=2, embedding_dim=4,
            num_check_images=8, memory_output=mem_path)
        self.assertEqual(mem.plan.num_stages, 2)
        self.assertEqual(mem.class_names, tu.CLASS_NAMES)
        self.assertEqual(report.num_check_images, 8)
        self.assertLessEqual(report.full_max_abs_diff, 1e-5)
        # Each signature was timed where a frame meets it (no speed asserted).
        times = report.stage_times
        self.assertLen(times.stages_us, 2)
        self.assertTrue(all(t > 0 for t in times.stages_us + (times.head_us, times.full_us)))
        self.assertAlmostEqual(sum(times.shares()), 1.0)
        self.assertIn("stage 1", times.format(mem.plan))
        self.assertEqual(sorted(os.listdir(directory)), ["m.smtm.npz", "m.tflite"])
        loaded = memory_lib.SemanticMemory.load(mem_path)
        self.assertEqual(loaded.exit_rule, mem.exit_rule)
        with open(out, "rb") as f:
            d = runtime.read_descriptor(f.read())
        self.assertEqual(d.exit_rule, mem.exit_rule)
        # With a memory given, it is used as is (no refit, no save).
        out2 = os.path.join(directory, "again.tflite")
        mem2, _ = smtm_converter.convert_model(self.model, self.data, out2, memory=loaded,
                                               num_check_images=2)
        self.assertIs(mem2, loaded)
        with open(out2, "rb") as f:
            self.assertEqual(runtime.read_descriptor(f.read()), d)

    def test_planned_stages_are_priced_by_their_time(self):
        directory = self.create_tempdir().full_path
        out = os.path.join(directory, "m.tflite")
        said = []
        mem, report = smtm_converter.convert_model(
            self.model, self.data, out, holdout=0.2, embedding_dim=4, num_check_images=8,
            gpu_check=False, progress=said.append)
        self.assertTrue([line for line in said if line.startswith("pricing the stages")])
        # Whatever was kept, the shipped model and its timing are the memory's.
        self.assertLen(report.stage_times.stages_us, mem.plan.num_stages)
        with open(out, "rb") as f:
            self.assertLen(runtime.read_descriptor(f.read()).stages, mem.plan.num_stages)
        # A chain no slower than `full` charges the stages nothing beyond
        # their layers: every exit saves time, and every stage stays (what
        # the drop does with the exits is memory.drop_unpaid_stages' tests).
        x_cal, quiet, n = self.data.x_train[-60:], [], mem.plan.num_stages
        free = smtm_converter.stage_times_lib.StageTimes((1.0,) * n, 1.0, 10.0 * n)
        self.assertIs(smtm_converter.drop_stages_by_time(
            self.model, mem, free, x_cal, 0.99, mem.cache_policy, 0,
            prep.Preprocessing.raw(), quiet.append), mem)

    def test_rejects_data_whose_channels_have_no_rule(self):
        x, y = tu.stripes(20, seed=0)
        x2 = np.concatenate([x, x], axis=-1)
        data = data_lib.LabelledData(x2, y, x2, y, tu.CLASS_NAMES)
        out = os.path.join(self.create_tempdir().full_path, "m.tflite")
        with self.assertRaisesRegex(data_lib.DataError, "2 channels and the model takes 1"):
            smtm_converter.convert_model(self.model, data, out)
        self.assertFalse(os.path.exists(out))

    def test_memory_path_for(self):
        self.assertEqual(smtm_converter.memory_path_for("a/b/model.keras"),
                         "a/b/model.smtm.npz")
        self.assertEqual(smtm_converter.memory_path_for("model.h5"), "model.smtm.npz")
        self.assertEqual(smtm_converter.memory_path_for("out/m.smtm.tflite"), "out/m.smtm.npz")
        self.assertEqual(smtm_converter.memory_path_for("out/m.tflite"), "out/m.smtm.npz")

    def test_failed_check_after_fitting_leaves_no_file(self):
        directory = self.create_tempdir().full_path
        out = os.path.join(directory, "m.tflite")
        failure = smtm_converter.ConversionError("differs")
        with mock.patch.object(smtm_converter, "check_conversion", side_effect=failure):
            with self.assertRaisesRegex(smtm_converter.ConversionError, "differs"):
                smtm_converter.convert_model(
                    self.model, self.data, out, holdout=0.2, num_stages=2, embedding_dim=4,
                    cache_policy=None, num_check_images=4, gpu_check=False,
                    memory_output=os.path.join(directory, "m.smtm.npz"))
        self.assertEqual(os.listdir(directory), [])

    def test_memory_is_reused_only_while_its_key_matches(self):
        directory = self.create_tempdir().full_path
        mem_path = os.path.join(directory, "m.smtm.npz")
        lines = []
        kwargs = dict(holdout=0.2, num_stages=2, embedding_dim=4, cache_policy=None,
                      num_check_images=4, gpu_check=False, memory_output=mem_path,
                      memory_candidates=[mem_path], progress=lines.append)
        first, _ = smtm_converter.convert_model(
            self.model, self.data, os.path.join(directory, "a.tflite"), **kwargs)
        self.assertTrue(any(line.startswith("fitting the semantic memory") for line in lines))
        lines.clear()
        again, _ = smtm_converter.convert_model(
            self.model, self.data, os.path.join(directory, "b.tflite"), **kwargs)
        self.assertIn(f"using the semantic memory {mem_path} (its key matches this model "
                      "and data)", lines)
        self.assertEqual(again.key, first.key)
        # The same model and data with another budget, other data, or other
        # weights: never reused.
        for change, why in (
                (dict(target_agreement=0.9), "calibrated for 99.00% agreement, not 90.00%"),
                (dict(data=tu.labelled_stripes(300, 40, train_seed=30, test_seed=21)),
                 "fitted on other data"),
                (dict(model=_nudged(self.model)), "fitted to other model weights"),
                (dict(encoder_hidden=memory_lib.ENCODER_HIDDEN + 4),
                 f"its encoders have {memory_lib.ENCODER_HIDDEN} hidden units, not "
                 f"{memory_lib.ENCODER_HIDDEN + 4}")):
            lines.clear()
            args = dict(kwargs, model=self.model, data=self.data,
                        output_path=os.path.join(directory, "c.tflite"))
            args.update(change)
            smtm_converter.convert_model(**args)
            self.assertTrue(any(line.startswith(f"not using the semantic memory {mem_path}")
                                and why in line for line in lines), (why, lines))
            self.assertTrue(any(line.startswith("fitting") for line in lines))
            smtm_converter.convert_model(**kwargs, model=self.model, data=self.data,
                                         output_path=os.path.join(directory, "d.tflite"))

    def test_preprocessing_is_recorded_and_applied_to_pixels(self):
        # The model was trained on stripes; the "camera" gives them as pixels x 255.
        pixels = dataclasses.replace(self.data, x_train=self.data.x_train * 255.0,
                                     x_test=self.data.x_test * 255.0)
        out = os.path.join(self.create_tempdir().full_path, "m.tflite")
        unit = prep.Preprocessing.preset("unit", 1)
        lines = []
        smtm_converter.convert_model(self.model, pixels, out, holdout=0.2, num_stages=2,
                                     embedding_dim=4, num_check_images=4, gpu_check=False,
                                     preprocessing=unit, progress=lines.append)
        self.assertIn("preprocessing: pixel * [0.00392157] + [0] (unit)", lines)
        with open(out, "rb") as f:
            rt = runtime.SmtmRuntime(f.read())
        self.assertEqual(rt.descriptor.preprocessing, unit)
        want = np.asarray(self.model(self.data.x_test[:20])).argmax(-1)
        got = [rt.classify_full(np.ascontiguousarray(x[None])) for x in pixels.x_test[:20]]
        np.testing.assert_array_equal(got, want)
        answers = [rt.classify(x).class_id for x in pixels.x_test[:20]]
        self.assertGreaterEqual(np.mean(np.array(answers) == want), 0.9)

    def test_classes_missing_from_the_data_are_reported_and_cannot_exit(self):
        # Five outputs, data of four classes: the class count is the model's.
        k = tu.keras_module("tf_keras")
        k.utils.set_random_seed(1)
        x, y = tu.train_data()
        model = tu.train(tu.residual_cnn(k, num_classes=5), k, x, y)
        lines = []
        memory, _ = smtm_converter.convert_model(
            model, self.data, os.path.join(self.create_tempdir().full_path, "m.tflite"),
            holdout=0.2, num_stages=2, embedding_dim=4, num_check_images=4,
            gpu_check=False, progress=lines.append)
        self.assertIn("1 of the model's 5 classes have no labelled training image; unless the "
                      "model answers them anyway, they cannot exit", lines)
        self.assertEqual(memory.class_names, tu.CLASS_NAMES + ("4",))
        self.assertEqual(memory.missing_classes, (4,))
        for centres in memory.centres:
            np.testing.assert_array_equal(centres[4], 0.0)
            self.assertGreater(float(np.linalg.norm(centres[:4], axis=1).min()), 0.99)
        report = exit_policy.exit_report(memory.exit_rule, 5)
        self.assertTrue(report.can_exit()[:, :4].any())  # Others can: the rule is live.
        self.assertFalse(report.can_exit()[:, 4].any())
        for hot in (True, False):
            cold = exit_policy.exit_report(memory.exit_rule, 5, hot=hot)
            self.assertFalse(cold.can_exit()[:, 4].any())

    def test_replay_rule_runs_the_runtime_on_pixel_frames(self):
        flat, _ = tu.converted("tf_keras")
        x, _ = tu.stripes(40, seed=9)
        agreement, rt, full = smtm_converter.replay_rule(
            flat, x, lambda answers: [np.arange(len(answers))])
        self.assertEqual(full.shape, (40,))
        want = np.asarray(tu.trained_residual("tf_keras")(x)).argmax(-1)
        np.testing.assert_array_equal(full, want)
        self.assertLen(agreement, 1)
        self.assertGreaterEqual(agreement[0], 0.8)
        self.assertEqual(rt.num_stages, 3)

    def test_accuracy_check_scores_every_preset(self):
        pixels = dataclasses.replace(self.data, x_test=self.data.x_test * 255.0)
        check = smtm_converter.check_accuracy(self.model, pixels, prep.Preprocessing.raw())
        self.assertEqual(sorted(check.alternatives), ["symmetric", "unit"])
        self.assertGreater(check.alternatives["unit"], 0.9)
        self.assertEqual(check.images, 40)
        self.assertAlmostEqual(check.chance, 0.25)
        own = smtm_converter.check_accuracy(self.model, pixels,
                                            prep.Preprocessing.preset("unit", 1))
        self.assertEqual(own.accuracy, check.alternatives["unit"])

    def test_judge_accuracy(self):
        judge = smtm_converter.judge_accuracy
        judge(smtm_converter.AccuracyCheck(0.9, 100, 0.1, {"unit": 0.95}))
        with self.assertRaisesRegex(smtm_converter.DataMismatchError,
                                    r"50.0% .* but 95.0% with --preprocessing=unit"):
            judge(smtm_converter.AccuracyCheck(0.5, 100, 0.1, {"unit": 0.95, "raw": 0.4}))
        with self.assertRaisesRegex(smtm_converter.DataMismatchError,
                                    r"near chance .*--nocheck_accuracy"):
            judge(smtm_converter.AccuracyCheck(0.15, 100, 0.1, {}))
        # A preset that also scores near chance is not suggested.
        with self.assertRaisesRegex(smtm_converter.DataMismatchError, "no preprocessing preset"):
            judge(smtm_converter.AccuracyCheck(0.0, 100, 0.25, {"unit": 0.245}))

    def test_convert_keras_is_a_plain_model(self):
        flat = smtm_converter.convert_keras(self.model)
        interp = _interpreter(flat)
        self.assertEqual(list(interp.get_signature_list()), ["serving_default"])
        x = tu.check_images()[:1]
        got = interp.get_signature_runner("serving_default")(image=x)["output"]
        np.testing.assert_allclose(got, np.asarray(self.model(x)), atol=1e-5)
        with self.assertRaisesRegex(runtime.ModelFileError, "no 'smtm_descriptor' metadata"):
            runtime.read_descriptor(flat)


class MetadataTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.plain = smtm_converter.convert_keras(tu.trained_residual("tf_keras"))

    def _entries(self, flat, name):
        model = schema.Model.GetRootAs(flat, 0)
        return [model.Metadata(i) for i in range(model.MetadataLength())
                if model.Metadata(i).Name().decode() == name]

    def test_add_read_replace(self):
        self.assertIsNone(metadata.read_metadata(self.plain, "note"))
        flat = metadata.add_metadata(self.plain, "note", b"first")
        self.assertEqual(metadata.read_metadata(flat, "note"), b"first")
        flat = metadata.add_metadata(flat, "other", b"")
        flat = metadata.add_metadata(flat, "note", b"second \x00 binary")
        self.assertEqual(metadata.read_metadata(flat, "note"), b"second \x00 binary")
        self.assertEqual(metadata.read_metadata(flat, "other"), b"")
        self.assertLen(self._entries(flat, "note"), 1)
        # The model still loads and runs.
        x = tu.check_images()[:1]
        runner = _interpreter(flat).get_signature_runner("serving_default")
        self.assertEqual(runner(image=x)["output"].shape, (1, tu.NUM_CLASSES))


if __name__ == "__main__":
    absltest.main()
