"""Tests for smtm_tf.stages: cut points, stage plans, splitting and chain checks."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from smtm_tf import stages
import testing_utils as tu

FLAVOURS = (("keras3", "keras"), ("tf_keras", "tf_keras"))


def _random_images(n=6, seed=0):
    return np.random.default_rng(seed).normal(size=(n, tu.IMAGE_SIZE, tu.IMAGE_SIZE, 1)).astype(
        np.float32)


def _subclassed(k):
    class Sub(k.Model):

        def __init__(self):
            super().__init__()
            self.conv = k.layers.Conv2D(4, 3)
            self.pool = k.layers.GlobalAveragePooling2D()
            self.dense = k.layers.Dense(2)

        def call(self, x):
            return self.dense(self.pool(self.conv(x)))

    model = Sub()
    model(np.zeros((1, 8, 8, 1), np.float32))
    return model


def _multi_input(k):
    a = k.Input((8, 8, 1))
    b = k.Input((8, 8, 1))
    x = k.layers.Conv2D(4, 3)(k.layers.Concatenate()([a, b]))
    x = k.layers.GlobalAveragePooling2D()(x)
    return k.Model([a, b], k.layers.Dense(2)(x))


def _multi_output(k):
    a = k.Input((8, 8, 1))
    x = k.layers.GlobalAveragePooling2D()(k.layers.Conv2D(4, 3)(a))
    return k.Model(a, [k.layers.Dense(2)(x), k.layers.Dense(3)(x)])


class PlanAndSplitTest(parameterized.TestCase):

    @parameterized.named_parameters(*FLAVOURS)
    def test_cut_points_exclude_layers_inside_the_residual_block(self, flavour):
        model = tu.residual_cnn(tu.keras_module(flavour))
        names = [c.layer for c in stages.find_cut_points(model)]
        # r0 feeds both c1 and the shortcut, but it is the only live tensor after it.
        self.assertIn("r0", names)
        self.assertIn("out1", names)
        self.assertIn("r2", names)
        # After c1 the shortcut (r0's output) is still live: not a cut point.
        self.assertNotIn("c1", names)
        # The last layer is the output, never a cut point.
        self.assertNotIn("logits", names)

    @parameterized.named_parameters(*FLAVOURS)
    def test_cut_point_costs_and_shapes(self, flavour):
        model = tu.residual_cnn(tu.keras_module(flavour))
        cuts = {c.layer: c for c in stages.find_cut_points(model)}
        total = sum(tu.RESIDUAL_MACS.values())
        self.assertAlmostEqual(cuts["r0"].cumulative_cost, tu.RESIDUAL_MACS["c0"] / total)
        self.assertAlmostEqual(
            cuts["out1"].cumulative_cost,
            (tu.RESIDUAL_MACS["c0"] + tu.RESIDUAL_MACS["c1"]) / total)
        self.assertEqual(cuts["r0"].shape, (12, 12, 8))
        self.assertEqual(cuts["r2"].shape, (6, 6, 16))
        self.assertEqual(cuts["gap"].shape, (16,))

    @parameterized.named_parameters(*FLAVOURS)
    def test_residual_model_splits_into_an_exact_chain(self, flavour):
        model = tu.residual_cnn(tu.keras_module(flavour))
        plan = stages.plan_stages(model, num_stages=3)
        # The 3 distinct spatial cut points (ReLU kept over its conv / add).
        self.assertEqual(plan.cut_layers, ("r0", "out1", "r2"))
        total = sum(tu.RESIDUAL_MACS.values())
        expected = np.array([tu.RESIDUAL_MACS["c0"], tu.RESIDUAL_MACS["c1"],
                             tu.RESIDUAL_MACS["c2"]]) / total
        np.testing.assert_allclose(plan.stage_costs, expected, rtol=1e-9)
        self.assertAlmostEqual(plan.head_cost, tu.RESIDUAL_MACS["logits"] / total)
        self.assertAlmostEqual(sum(plan.stage_costs) + plan.head_cost, 1.0)

        stage_models, head = stages.split_model(model, plan)
        self.assertLen(stage_models, 3)
        self.assertEqual(tuple(stage_models[0].inputs[0].shape[1:]), (12, 12, 1))
        self.assertEqual(tuple(stage_models[1].outputs[0].shape[1:]), (12, 12, 8))
        self.assertEqual(tuple(stage_models[2].outputs[0].shape[1:]), (6, 6, 16))
        self.assertEqual(tuple(head.outputs[0].shape[1:]), (tu.NUM_CLASSES,))
        x = _random_images()
        diff = stages.check_chain(model, stage_models, head, x)
        self.assertLessEqual(diff, 1e-5)
        # Independently of check_chain: feed the chain by hand.
        a = x
        for m in stage_models:
            a = m(a, training=False)
        np.testing.assert_allclose(np.asarray(head(a)), np.asarray(model(x)), atol=1e-5)

    @parameterized.named_parameters(*FLAVOURS)
    def test_stage_models_share_weights_with_the_model(self, flavour):
        model = tu.residual_cnn(tu.keras_module(flavour))
        plan = stages.plan_stages(model, num_stages=2)
        stage_models, head = stages.split_model(model, plan)
        x = _random_images(2)
        conv = model.get_layer("c0")
        kernel = conv.get_weights()[0]
        conv.set_weights([kernel * 2.0, conv.get_weights()[1]])
        # The chain still reproduces the (changed) model: weights are shared.
        self.assertLessEqual(stages.check_chain(model, stage_models, head, x), 1e-5)

    @parameterized.named_parameters(*FLAVOURS)
    def test_sequential_model(self, flavour):
        model = tu.sequential_cnn(tu.keras_module(flavour))
        plan = stages.plan_stages(model, num_stages=2)
        self.assertEqual(plan.cut_layers, ("a_relu", "b_relu"))
        stage_models, head = stages.split_model(model, plan)
        self.assertLessEqual(stages.check_chain(model, stage_models, head, _random_images()),
                             1e-5)

    @parameterized.named_parameters(*FLAVOURS)
    def test_explicit_cut_layers(self, flavour):
        model = tu.residual_cnn(tu.keras_module(flavour))
        plan = stages.plan_stages(model, cut_layers=["r0", "r2"])
        self.assertEqual(plan.cut_layers, ("r0", "r2"))
        total = sum(tu.RESIDUAL_MACS.values())
        np.testing.assert_allclose(
            plan.stage_costs,
            [tu.RESIDUAL_MACS["c0"] / total,
             (tu.RESIDUAL_MACS["c1"] + tu.RESIDUAL_MACS["c2"]) / total], rtol=1e-9)
        stage_models, head = stages.split_model(model, plan)
        self.assertLen(stage_models, 2)
        self.assertLessEqual(stages.check_chain(model, stage_models, head, _random_images()),
                             1e-5)
        # A single explicit stage, at the add (before the ReLU), also works.
        plan = stages.plan_stages(model, cut_layers=["add"])
        self.assertEqual(plan.num_stages, 1)
        stage_models, head = stages.split_model(model, plan)
        self.assertLessEqual(stages.check_chain(model, stage_models, head, _random_images()),
                             1e-5)

    @parameterized.named_parameters(*FLAVOURS)
    def test_fewer_stages_spread_over_compute(self, flavour):
        model = tu.residual_cnn(tu.keras_module(flavour))
        plan = stages.plan_stages(model, num_stages=1)
        # One stage: the whole backbone, up to the last spatial cut point.
        self.assertEqual(plan.cut_layers, ("r2",))
        plan = stages.plan_stages(model, num_stages=2)
        # Target half of the backbone: out1 (69% of it) is nearer than r0 (8%).
        self.assertEqual(plan.cut_layers, ("out1", "r2"))

    def test_check_chain_detects_a_wrong_chain(self):
        k = tu.keras_module("tf_keras")
        model = tu.residual_cnn(k)
        other = tu.residual_cnn(k)  # Same architecture, other random weights.
        plan = stages.plan_stages(model, num_stages=2)
        stage_models, _ = stages.split_model(model, plan)
        _, other_head = stages.split_model(other, plan)
        with self.assertRaisesRegex(stages.StagePlanError, "differs from the model"):
            stages.check_chain(model, stage_models, other_head, _random_images())

    def test_plan_round_trip_and_validation(self):
        plan = stages.StagePlan(("a", "b"), (0.25, 0.5), 0.25)
        self.assertEqual(stages.StagePlan.from_dict(plan.to_dict()), plan)
        self.assertEqual(plan.cumulative_costs, (0.25, 0.75))
        with self.assertRaisesRegex(stages.StagePlanError, "at least one cut layer"):
            stages.StagePlan((), (), 1.0)
        with self.assertRaisesRegex(stages.StagePlanError, "stage_costs has 1 entries"):
            stages.StagePlan(("a", "b"), (0.5,), 0.5)


class PlanErrorsTest(parameterized.TestCase):

    @parameterized.named_parameters(*FLAVOURS)
    def test_subclassed_model(self, flavour):
        model = _subclassed(tu.keras_module(flavour))
        with self.assertRaisesRegex(stages.StagePlanError, "subclassed"):
            stages.plan_stages(model)

    @parameterized.named_parameters(*FLAVOURS)
    def test_multi_input_model(self, flavour):
        model = _multi_input(tu.keras_module(flavour))
        with self.assertRaisesRegex(stages.StagePlanError, "2 inputs.*single-input"):
            stages.plan_stages(model)

    @parameterized.named_parameters(*FLAVOURS)
    def test_multi_output_model(self, flavour):
        model = _multi_output(tu.keras_module(flavour))
        with self.assertRaisesRegex(stages.StagePlanError, "2 outputs"):
            stages.plan_stages(model)

    def test_not_a_keras_model(self):
        with self.assertRaisesRegex(stages.StagePlanError, "not a Keras model"):
            stages.plan_stages(object())

    @parameterized.named_parameters(*FLAVOURS)
    def test_cut_inside_residual_block(self, flavour):
        model = tu.residual_cnn(tu.keras_module(flavour))
        with self.assertRaises(stages.StagePlanError) as cm:
            stages.plan_stages(model, cut_layers=["c1"])
        message = str(cm.exception)
        self.assertIn("'c1' is not a cut point", message)
        self.assertIn("residual", message)
        # The message lists the valid choices.
        self.assertIn("out1", message)
        self.assertIn("r2", message)

    @parameterized.named_parameters(*FLAVOURS)
    def test_unknown_layer(self, flavour):
        model = tu.residual_cnn(tu.keras_module(flavour))
        with self.assertRaisesRegex(stages.StagePlanError, "No layer named 'nope'"):
            stages.plan_stages(model, cut_layers=["r0", "nope"])

    @parameterized.named_parameters(*FLAVOURS)
    def test_more_stages_than_cut_points(self, flavour):
        model = tu.residual_cnn(tu.keras_module(flavour))
        with self.assertRaises(stages.StagePlanError) as cm:
            stages.plan_stages(model, num_stages=4)
        message = str(cm.exception)
        self.assertIn("3 spatial cut points", message)
        self.assertIn("num_stages=4", message)

    @parameterized.named_parameters(
        ("out_of_order", ["r2", "r0"]),
        ("repeated", ["r0", "r0"]),
    )
    def test_cut_layers_order(self, cut_layers):
        model = tu.residual_cnn(tu.keras_module("tf_keras"))
        with self.assertRaisesRegex(stages.StagePlanError, "distinct and in execution order"):
            stages.plan_stages(model, cut_layers=cut_layers)

    @parameterized.named_parameters(*FLAVOURS)
    def test_non_spatial_cut_layer_is_rejected(self, flavour):
        # Stages must end in [H, W, C] feature maps: the encoders pool them
        # (reduce over H and W) and automatic plans use only such cut points.
        # An explicit cut after global pooling must be refused here, with a
        # clear StagePlanError, not later by TensorFlow inside the encoders.
        model = tu.residual_cnn(tu.keras_module(flavour))
        with self.assertRaisesRegex(stages.StagePlanError, "gap"):
            stages.plan_stages(model, cut_layers=["r0", "gap"])

    def test_zero_stages(self):
        model = tu.residual_cnn(tu.keras_module("keras"))
        with self.assertRaisesRegex(stages.StagePlanError, "num_stages must be >= 1"):
            stages.plan_stages(model, num_stages=0)


if __name__ == "__main__":
    absltest.main()
