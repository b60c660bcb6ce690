"""Tests for smtm_tf.fitting.zoo: every entry builds tiny, trains, saves, reloads and
plans; its flavour, preprocessing and logits metadata match the model."""

import dataclasses
import json
import os

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest

from smtm_tf.fitting import data as data_lib
from smtm_tf.fitting import kerascompat
from smtm_tf.fitting import models
from smtm_tf.runtime import preprocessing
from smtm_tf.fitting import stages
from smtm_tf.fitting import zoo
from smtm_tf.evaluation import native_bench
from smtm_tf.evaluation import validation
from smtm_tf.evaluation import zoo_benchmark

pytestmark = pytest.mark.slow

ENTRIES = tuple((name, name) for name in zoo.names())
# Two steps of 64 images: enough to move every weight and BatchNorm statistic.
FEW_STEPS = zoo.TrainConfig(epochs=1, train_examples=128, batch_size=64)

_FMNIST = None


def _fmnist(num_train: int = 256, num_test: int = 64) -> data_lib.LabelledData:
    """The first images of real Fashion-MNIST (loaded once)."""
    global _FMNIST
    if _FMNIST is None:
        _FMNIST = data_lib.load_fashion_mnist()
    return dataclasses.replace(
        _FMNIST, x_train=_FMNIST.x_train[:num_train], y_train=_FMNIST.y_train[:num_train],
        x_test=_FMNIST.x_test[:num_test], y_test=_FMNIST.y_test[:num_test])


def _layer_types(model) -> list[str]:
    return [type(layer).__name__ for layer in model.layers]


def _has_softmax(model) -> bool:
    for layer in model.layers:
        if type(layer).__name__ == "Softmax":
            return True
        activation = getattr(layer, "activation", None)
        if getattr(activation, "__name__", None) == "softmax":
            return True
    return False


class ZooEntryTest(parameterized.TestCase):

    @parameterized.named_parameters(*ENTRIES)
    def test_tiny_entry_trains_saves_reloads_and_plans(self, name):
        entry = zoo.get(name)
        k = entry.keras()
        k.utils.set_random_seed(0)
        model = entry.build(True)
        self.assertEqual(kerascompat.flavour_of(model), entry.flavour)
        input_shape = tuple(int(d) for d in model.inputs[0].shape[1:])
        self.assertEqual(input_shape[-1], entry.input_shape[-1])
        if entry.train is not None:  # Only the untrained scale test shrinks its input.
            self.assertEqual(input_shape, entry.input_shape)

        fmnist = _fmnist()
        x = zoo.model_inputs(entry, fmnist.x_train[:FEW_STEPS.train_examples], input_shape)
        self.assertEqual(x.shape[1:], input_shape)
        before = [w.copy() for w in model.get_weights()]
        zoo.fit_model(model, entry, x, fmnist.y_train[:len(x)], FEW_STEPS, verbose=0,
                      run_eagerly=entry.flavour == "keras")
        after = model.get_weights()
        changed = [not np.array_equal(b, a) for b, a in zip(before, after)]
        self.assertGreater(np.mean(changed), 0.5, "training left most weights unchanged")
        for layer in model.layers:
            if type(layer).__name__ == "BatchNormalization":
                self.assertEqual(layer.momentum, zoo.BN_MOMENTUM, layer.name)

        path = os.path.join(self.create_tempdir().full_path, f"{name}.keras")
        models.save_model_atomic(model, path)
        loaded = kerascompat.load_model(path)
        self.assertEqual(kerascompat.flavour_of(loaded), entry.flavour)
        probe = x[:4]
        out = np.asarray(loaded(probe, training=False))
        np.testing.assert_allclose(out, np.asarray(model(probe, training=False)),
                                   rtol=1e-4, atol=1e-5)
        for layer in loaded.layers:
            if type(layer).__name__ == "BatchNormalization":
                self.assertAlmostEqual(layer.momentum, zoo.BN_MOMENTUM, msg=layer.name)

        # Preprocessing: a leading Rescaling/Normalization exactly when the
        # entry says the model takes pixels, and resolve() agrees with the entry.
        leading = preprocessing.leading_rescaling_layer(loaded)
        if entry.preprocessing is None:
            self.assertIsNotNone(leading, "model said to rescale itself has no Rescaling")
        else:
            self.assertIsNone(leading, f"model expecting {entry.preprocessing} rescales "
                              f"itself in {leading}")
        self.assertEqual(preprocessing.resolve(loaded, entry.preprocessing).to_dict(),
                         entry.preprocessor().to_dict())

        sums = out.sum(axis=-1)
        if entry.logits:
            self.assertFalse(_has_softmax(loaded))
            self.assertGreater(np.abs(sums - 1).max(), 1e-3)
        else:
            self.assertTrue(_has_softmax(loaded))
            self.assertGreaterEqual(out.min(), 0.0)
            np.testing.assert_allclose(sums, 1.0, atol=1e-5)

        plan = stages.plan_stages(loaded, num_stages=4)
        self.assertLen(plan.cut_layers, 4)
        self.assertTrue(all(c > 0 for c in plan.stage_costs), plan.stage_costs)


class ZooArchitectureTest(absltest.TestCase):

    def test_vgg_is_a_tf_keras_sequential_starting_with_rescaling(self):
        import tf_keras  # pylint: disable=import-outside-toplevel
        model = zoo.get("vgg_sequential").build(False)
        self.assertIsInstance(model, tf_keras.Sequential)
        first = model.layers[0]
        self.assertEqual(type(first).__name__, "Rescaling")
        self.assertAlmostEqual(first.scale, 1 / 255)
        types = _layer_types(model)
        self.assertEqual(types.count("Conv2D"), 8)
        self.assertEqual(types.count("MaxPooling2D"), 4)
        self.assertEqual(types[-3:], ["Flatten", "Dense", "Dense"])
        self.assertEqual(model.layers[-2].units, 64)
        self.assertNotIn("BatchNormalization", types)

    def test_inception_branchy_has_branches_both_residuals_and_no_rescaling(self):
        import keras  # pylint: disable=import-outside-toplevel
        model = zoo.get("inception_branchy").build(False)
        self.assertIsInstance(model, keras.Model)
        types = _layer_types(model)
        self.assertNotIn("Rescaling", types)
        self.assertNotIn("Normalization", types)
        for needed in ("SeparableConv2D", "AveragePooling2D", "Concatenate"):
            self.assertIn(needed, types)
        relus = [layer for layer in model.layers if type(layer).__name__ == "ReLU"]
        self.assertTrue(relus)
        self.assertTrue(all(float(r.max_value) == 6.0 for r in relus))
        adds = [layer for layer in model.layers if type(layer).__name__ == "Add"]
        # A block named X has a projected shortcut exactly when a layer X_proj exists.
        projected = [a for a in adds if f"{a.name[:-4]}_proj" in
                     [layer.name for layer in model.layers]]
        self.assertNotEmpty(projected)
        self.assertLess(len(projected), len(adds), "no identity residual add")
        concat = model.get_layer("stage1_block0_concat")
        self.assertLen(concat.input, 3)

    def test_applications_preprocessing_layers(self):
        v3 = zoo.get("mobilenet_v3_small").build(True)
        rescale = v3.get_layer(preprocessing.leading_rescaling_layer(v3))
        self.assertAlmostEqual(float(rescale.scale), 1 / 127.5)
        self.assertAlmostEqual(float(rescale.offset), -1.0)
        eff = zoo.get("efficientnet_b0").build(True)
        rescale = eff.get_layer(preprocessing.leading_rescaling_layer(eff))
        self.assertAlmostEqual(float(rescale.scale), 1 / 255)
        types = _layer_types(eff)
        self.assertEqual(types[types.index("Rescaling") + 1], "Normalization")
        v2 = zoo.get("mobilenet_v2_035").build(True)
        self.assertNotIn("Rescaling", _layer_types(v2))

    def test_untrained_scale_model(self):
        entry = zoo.get("mobilenet_v2_imagenet_untrained")
        self.assertIsNone(entry.train)
        model = entry.build(False)
        self.assertEqual(tuple(model.inputs[0].shape[1:]), (224, 224, 3))
        self.assertEqual(model.outputs[0].shape[-1], 1000)
        self.assertGreater(model.count_params(), 3_000_000)


class ZooRegistryTest(absltest.TestCase):

    def test_entries_cover_every_required_property(self):
        entries = [zoo.get(n) for n in zoo.names()]
        self.assertEqual({e.flavour for e in entries}, {"keras", "tf_keras"})
        presets = {e.preprocessing for e in entries}
        for needed in (None, "unit", "symmetric"):
            self.assertIn(needed, presets)
        self.assertTrue(any(e.logits for e in entries))
        self.assertEqual(zoo.get("inception_branchy").preprocessing, "unit")
        self.assertEqual(zoo.get("inception_branchy").flavour, "keras")
        self.assertEqual(zoo.get("vgg_sequential").flavour, "tf_keras")

    def test_invalid_entries_and_names(self):
        good = zoo.get("vgg_sequential")
        with self.assertRaisesRegex(zoo.ZooError, "flavour.*'torch'"):
            dataclasses.replace(good, flavour="torch")
        with self.assertRaisesRegex(zoo.ZooError, "preprocessing.*'bogus'"):
            dataclasses.replace(good, preprocessing="bogus")
        with self.assertRaisesRegex(zoo.ZooError, "input_shape"):
            dataclasses.replace(good, input_shape=(32, 32))
        with self.assertRaisesRegex(zoo.ZooError, "epochs"):
            zoo.TrainConfig(epochs=0)
        with self.assertRaisesRegex(zoo.ZooError, "No zoo entry 'nope'.*vgg_sequential"):
            zoo.get("nope")


class BuildZooTest(absltest.TestCase):

    def test_build_zoo_writes_models_and_index(self):
        out = self.create_tempdir().full_path
        fmnist = _fmnist()
        logged = []
        results = zoo.build_zoo(out, ["vgg_sequential", "densenet_concat"], tiny=True,
                                fmnist=fmnist, log=logged.append, verbose=0)
        self.assertEqual([r.name for r in results], ["vgg_sequential", "densenet_concat"])
        with open(os.path.join(out, "zoo.json"), encoding="utf-8") as f:
            index = json.load(f)
        self.assertTrue(index["tiny"])
        by_name = {m["name"]: m for m in index["models"]}
        self.assertEqual(set(by_name), {"vgg_sequential", "densenet_concat"})
        dense = by_name["densenet_concat"]
        self.assertTrue(dense["logits"])
        self.assertEqual(dense["preprocessing"], "imagenet")
        self.assertEqual(dense["flavour"], "tf_keras")
        self.assertEqual(dense["input_shape"], [32, 32, 3])
        self.assertIsNone(by_name["vgg_sequential"]["preprocessing"])
        for m in index["models"]:
            self.assertTrue(m["trained"])
            self.assertBetween(m["test_accuracy"], 0.0, 1.0)
            self.assertGreater(m["train_seconds"], 0.0)
            loaded = kerascompat.load_model(os.path.join(out, m["file"]))
            self.assertEqual(loaded.count_params(), m["params"])
        self.assertLen([line for line in logged if "test accuracy" in line], 2)
        table = zoo.format_table(results)
        self.assertIn("densenet_concat", table)
        self.assertIn("logits", table)

        # A later run of one entry keeps the other's record.
        zoo.build_zoo(out, ["vgg_sequential"], tiny=True, fmnist=fmnist,
                      log=logged.append, verbose=0)
        with open(os.path.join(out, "zoo.json"), encoding="utf-8") as f:
            names = [m["name"] for m in json.load(f)["models"]]
        self.assertEqual(names, ["densenet_concat", "vgg_sequential"])


class TableTest(absltest.TestCase):

    def test_rows_show_the_compute_speedup_and_host_work_beside_the_measured(self):
        row = zoo_benchmark.ZooRow(
            "vgg_sequential", "", keras_accuracy=0.85, convert_seconds=70.0,
            stage_shares=(0.25, 0.11, 0.32, 0.22), time_shares=(0.3, 0.1, 0.18, 0.28, 0.14),
            full_vs_keras=1e-6,
            streams={"video": zoo_benchmark.StreamFigures(1.51, 0.9867, 0.1, 1.94, 0.99),
                     "object": zoo_benchmark.StreamFigures(
                         1.18, 0.9733, -1.26, 2.2, 0.8727,
                         validation.Disagreements(0.0213, 0.0047, 0.0007))},
            full_us=264.0, host_us=41.8,
            native_video=native_bench.NativeBench(300, 264.0, 148.0, 1.79, 2.0, 2.2, 0.9867,
                                                  (0.5, 0.2, 0.1, 0.1, 0.1)))
        failed = zoo_benchmark.ZooRow("densenet_concat", "--preprocessing=imagenet",
                                      error="ConversionError: no")
        lines = zoo_benchmark.format_markdown([row, failed]).splitlines()
        head = [c.strip() for c in lines[0].strip("|").split("|")]
        cells = [c.strip() for c in lines[2].strip("|").split("|")]
        self.assertLen(cells, len(head))
        by_column = dict(zip(head, cells))
        self.assertEqual(by_column["video speed-up / agree"], "1.51x / 98.67%")
        self.assertEqual(by_column["stage shares (of time, head last)"],
                         "25/11/32/22 (30/10/18/28/14)")
        self.assertEqual(by_column["video compute speed-up"], "1.94x")
        self.assertEqual(by_column["video host work / full us"], "41.8 / 264")
        self.assertEqual(by_column["video native speed-up / host us"], "1.79x / 2.2")
        self.assertEqual(by_column["uniform speed-up / agree"], "-")
        # SMTM 1.26 points more accurate than full; full kept its answer on 87.3%.
        self.assertEqual(by_column["object top-1 vs full / full steady"], "+1.26 pts / 87.3%")
        self.assertEqual(by_column["object disagreements: full wrong / SMTM wrong / both"],
                         "2.13% / 0.47% / 0.07%")
        self.assertEqual(lines[3].count("|"), lines[0].count("|"))
        self.assertIn("FAILED: ConversionError: no", lines[3])
        self.assertEqual(row.to_dict()["native_video"]["speedup"], 1.79)

    def test_native_column_says_why_it_is_missing(self):
        row = zoo_benchmark.ZooRow("vgg_sequential", "")
        self.assertEqual(row.native_cell(), "-")
        row.native_error = "NativeBenchError: smtm_cli bench exited with 1"
        self.assertEqual(row.native_cell(), "FAILED NativeBenchError: smtm_cli bench exited with 1")


if __name__ == "__main__":
    absltest.main()
