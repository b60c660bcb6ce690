"""Tests for smtm_tf.runtime.descriptor: the versioned JSON stored in the .tflite."""

import json

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from smtm_tf.runtime import descriptor as desc
from smtm_tf.runtime import exit_policy
from smtm_tf.runtime import preprocessing as prep
import testing_utils as tu


def make_descriptor(num_classes=3, dims=(4, 5), seed=0, **overrides):
    rule = exit_policy.ExitRule(exit_policy.Metric.MARGIN,
                                (0.123456789,) + (None,) * (len(dims) - 1), 0.99)
    lookup_op = desc.LookupOpSpec(attributes={
        "metric": "margin", "thresholds": list(rule.thresholds),
        "compare_with": "all_classes"})
    # The lookup op keeps the default rule's thresholds even when the
    # exit_rule is overridden.
    return tu.synthetic_descriptor(overrides.pop("exit_rule", rule), lookup_op,
                                   num_classes=num_classes, dims=dims,
                                   seed=seed, stage_cost=lambda s: 0.3 + 0.1 * s,
                                   make_centres=tu.unit_centres, **overrides)


class RoundTripTest(absltest.TestCase):

    def test_json_round_trip_is_exact(self):
        d = make_descriptor()
        text = d.to_json()
        back = desc.Descriptor.from_json(text)
        self.assertEqual(back, d)
        # Centres (arbitrary float32 values) survive exactly, bit for bit.
        for a, b in zip(back.stages, d.stages):
            np.testing.assert_array_equal(a.centres, b.centres)
            self.assertEqual(a.centres.dtype, np.float32)
        self.assertEqual(back.exit_rule.thresholds, d.exit_rule.thresholds)
        self.assertEqual(back.to_json(), text)
        # Bytes are accepted too (that is what the metadata holds).
        self.assertEqual(desc.Descriptor.from_json(text.encode()), d)

    def test_rule_choice_json_is_the_descriptors_fields(self):
        d = make_descriptor()
        choice = json.loads(desc.rule_choice_json(d.exit_rule, d.cache))
        self.assertEqual(set(choice), {"exit_rule", "cache"})
        self.assertEqual(exit_policy.ExitRule.from_dict(choice["exit_rule"]), d.exit_rule)
        self.assertEqual(choice["exit_rule"], d.to_dict()["exit_rule"])
        self.assertEqual(choice["cache"], d.to_dict()["cache"])
        self.assertIsNone(json.loads(desc.rule_choice_json(d.exit_rule))["cache"])

    def test_equality_sees_centres(self):
        d = make_descriptor()
        other = make_descriptor(seed=1)
        self.assertNotEqual(d, other)

    def test_properties(self):
        d = make_descriptor(num_classes=5, dims=(4, 6))
        self.assertEqual(d.num_classes, 5)
        self.assertEqual([s.embedding_dim for s in d.stages], [4, 6])
        self.assertEqual(d.schema_version, desc.SCHEMA_VERSION)
        self.assertEqual(d.lookup_op.name, desc.LOOKUP_OP_NAME)


class PreprocessingTest(parameterized.TestCase):

    def test_round_trip_keeps_per_channel_values(self):
        p = prep.Preprocessing((0.5,), (-1.0,), "flags")
        d = make_descriptor(preprocessing=p)
        back = desc.Descriptor.from_json(d.to_json())
        self.assertEqual(back.preprocessing, p)
        np.testing.assert_allclose(back.preprocessing.apply(np.full((2, 1), 4.0)), 1.0)

    def test_per_channel_values_must_match_the_input(self):
        p = prep.Preprocessing((0.5, 0.25, 0.125), (-1.0, 0.0, 1.0), "flags")
        with self.assertRaisesRegex(desc.DescriptorError, "3 values for a model with 1"):
            make_descriptor(preprocessing=p)

    def test_version_1_reads_as_pixels_unchanged(self):
        d = json.loads(make_descriptor().to_json())
        d["schema_version"] = 1
        del d["preprocessing"]
        back = desc.Descriptor.from_json(json.dumps(d))
        self.assertTrue(back.preprocessing.is_identity)
        self.assertEqual(back.schema_version, desc.SCHEMA_VERSION)

    def test_version_1_with_preprocessing_is_rejected(self):
        d = json.loads(make_descriptor().to_json())
        d["schema_version"] = 1
        with self.assertRaisesRegex(desc.DescriptorError, "version-1 descriptor"):
            desc.Descriptor.from_json(json.dumps(d))

    @parameterized.named_parameters(
        ("zero_scale", {"scale": [0.0], "offset": [0.0], "source": "flags"}, "must not be 0"),
        ("nan", {"scale": [float("nan")], "offset": [0.0], "source": "flags"}, "finite"),
        ("extra", {"scale": [1.0], "offset": [0.0], "source": "x", "gamma": 2}, "exactly"),
        ("channels", {"scale": [1.0, 2.0], "offset": [0.0], "source": "x"}, "channels"),
    )
    def test_bad_preprocessing_is_rejected(self, value, pattern):
        d = json.loads(make_descriptor().to_json())
        d["preprocessing"] = value
        with self.assertRaisesRegex(desc.DescriptorError, pattern):
            desc.Descriptor.from_json(json.dumps(d, allow_nan=True))


class RejectionTest(parameterized.TestCase):

    def _dict(self):
        return json.loads(make_descriptor().to_json())

    @parameterized.named_parameters(("newer", 3), ("zero", 0), ("string", "1"), ("none", None))
    def test_unknown_schema_version(self, version):
        d = self._dict()
        d["schema_version"] = version
        with self.assertRaisesRegex(desc.DescriptorError,
                                    f"schema_version {version!r} is not supported"):
            desc.Descriptor.from_json(json.dumps(d))

    def test_missing_schema_version(self):
        d = self._dict()
        del d["schema_version"]
        with self.assertRaisesRegex(desc.DescriptorError, "schema_version None"):
            desc.Descriptor.from_json(json.dumps(d))

    def test_constructing_another_version_is_rejected(self):
        with self.assertRaisesRegex(desc.DescriptorError, "schema_version 1"):
            make_descriptor(schema_version=1)

    def test_unknown_top_level_field(self):
        d = self._dict()
        d["colour"] = "blue"
        with self.assertRaisesRegex(desc.DescriptorError, r"unknown fields \['colour'\]"):
            desc.Descriptor.from_json(json.dumps(d))

    @parameterized.named_parameters(
        ("stage", lambda d: d["stages"][0].__setitem__("extra", 1), "StageSpec"),
        ("signature", lambda d: d["head"].__setitem__("extra", 1), "SignatureSpec"),
        ("tensor", lambda d: d["full"]["inputs"][0].__setitem__("extra", 1), "TensorSpec"),
        ("lookup_op", lambda d: d["lookup_op"].__setitem__("extra", 1), "LookupOpSpec"),
    )
    def test_unknown_nested_field(self, mutate, where):
        d = self._dict()
        mutate(d)
        with self.assertRaisesRegex(desc.DescriptorError, f"{where}: unknown fields"):
            desc.Descriptor.from_json(json.dumps(d))

    @parameterized.named_parameters(
        ("top", lambda d: d.pop("full"), r"missing fields \['full'\]"),
        ("stage", lambda d: d["stages"][1].pop("centres"), r"missing fields \['centres'\]"),
    )
    def test_missing_field(self, mutate, pattern):
        d = self._dict()
        mutate(d)
        with self.assertRaisesRegex(desc.DescriptorError, pattern):
            desc.Descriptor.from_json(json.dumps(d))

    def test_unknown_exit_rule_field(self):
        d = self._dict()
        d["exit_rule"]["speed"] = "fast"
        with self.assertRaisesRegex(desc.DescriptorError, "^exit_rule: Unknown exit rule"):
            desc.Descriptor.from_json(json.dumps(d))

    def test_non_finite_threshold(self):
        d = self._dict()
        d["exit_rule"]["thresholds"][0] = float("nan")
        with self.assertRaisesRegex(desc.DescriptorError, r"^exit_rule\.thresholds\[0\]: "):
            desc.Descriptor.from_json(json.dumps(d))
        # Built from a dict, not parsed: the rule itself refuses it.
        with self.assertRaisesRegex(desc.DescriptorError, r"^exit_rule: thresholds\[0\]"):
            desc.Descriptor.from_dict(d)

    @parameterized.named_parameters(
        ("truncated", lambda text: text[: len(text) // 2]),
        ("empty", lambda text: ""),
        ("trailing_garbage", lambda text: text + "}"),
        ("not_utf8", lambda text: b"\xff\xfe" + text.encode()),
    )
    def test_malformed_json(self, corrupt):
        with self.assertRaisesRegex(desc.DescriptorError, "not valid JSON"):
            desc.Descriptor.from_json(corrupt(make_descriptor().to_json()))

    @parameterized.named_parameters(("list", "[1, 2]"), ("number", "3"), ("null", "null"))
    def test_json_that_is_not_an_object(self, text):
        with self.assertRaisesRegex(desc.DescriptorError, "must be a JSON object"):
            desc.Descriptor.from_json(text)

    def test_threshold_count_must_match_stages(self):
        rule = exit_policy.ExitRule(exit_policy.Metric.MARGIN, (None,), 0.99)
        with self.assertRaisesRegex(desc.DescriptorError, "1 thresholds for 2 stages"):
            make_descriptor(exit_rule=rule)

    def test_centres_must_cover_all_classes(self):
        d = make_descriptor()
        with self.assertRaisesRegex(desc.DescriptorError, "3 centres for 4 classes"):
            make_descriptor(class_names=("a", "b", "c", "d"), stages=d.stages)

    def test_needs_a_stage(self):
        rule = exit_policy.ExitRule(exit_policy.Metric.MARGIN, (), 0.99)
        with self.assertRaisesRegex(desc.DescriptorError, "at least one stage"):
            make_descriptor(stages=(), exit_rule=rule)

    def test_centres_must_be_a_matrix(self):
        with self.assertRaisesRegex(desc.DescriptorError, r"must be \[C, D\]"):
            desc.StageSpec(make_descriptor().stages[0].signature, "x", 0.5, np.zeros(3))

    def test_tensor_needs_a_name(self):
        with self.assertRaisesRegex(desc.DescriptorError, "needs a name"):
            desc.TensorSpec("", (1,))

    # DescriptorError is documented as "Raised for a descriptor that is
    # malformed". A syntactically valid JSON document with fields of the wrong
    # type is malformed too, and a runtime reading an untrusted .tflite should
    # get the one documented error, not an arbitrary TypeError/ValueError.
    @parameterized.named_parameters(
        ("stage_is_a_number", lambda d: d["stages"].__setitem__(0, 42)),
        ("stages_is_null", lambda d: d.__setitem__("stages", None)),
        ("centres_is_a_string", lambda d: d["stages"][0].__setitem__("centres", "x")),
        ("shape_is_a_string", lambda d: d["full"]["inputs"][0].__setitem__("shape", "abc")),
    )
    def test_wrongly_typed_fields_raise_descriptor_error(self, mutate):
        d = self._dict()
        mutate(d)
        with self.assertRaises(desc.DescriptorError):
            desc.Descriptor.from_json(json.dumps(d))


if __name__ == "__main__":
    absltest.main()
