"""Tests for smtm_tf.fitting.memory, smtm_tf.fitting.encoders and smtm_tf.runtime.io_utils."""

import dataclasses
import io
import json
import os
import stat
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from smtm_tf.fitting import encoders as enc
from smtm_tf.runtime import exit_policy
from smtm_tf.runtime import io_utils
from smtm_tf.fitting import memory as memory_lib
from smtm_tf.fitting import stages
import testing_utils as tu


def make_memory(seed=0, num_classes=3, dims=(4, 6)):
    rng = np.random.default_rng(seed)
    plan = stages.StagePlan(tuple(f"cut{s}" for s in range(len(dims))),
                            tuple(0.3 for _ in dims), 1.0 - 0.3 * len(dims))
    encoders = tuple(enc.Encoder(rng.normal(size=(10, d)).astype(np.float32),
                                 rng.normal(size=d).astype(np.float32)) for d in dims)
    centres = tuple(enc.l2_normalize_np(rng.normal(size=(num_classes, d))) for d in dims)
    rule = exit_policy.ExitRule(exit_policy.Metric.MARGIN,
                                (0.1 + seed,) + (None,) * (len(dims) - 1), 0.97)
    return memory_lib.SemanticMemory(plan, enc.Pooling.AVG_MAX, encoders, centres, rule,
                                     tuple(f"c{i}" for i in range(num_classes)),
                                     tuple(0.5 + 0.1 * s for s in range(len(dims))))


def assert_memory_equal(test, a, b):
    test.assertEqual(a.plan, b.plan)
    test.assertEqual(a.pooling, b.pooling)
    test.assertEqual(a.exit_rule, b.exit_rule)
    test.assertEqual(a.class_names, b.class_names)
    test.assertEqual(a.stage_accuracy, b.stage_accuracy)
    test.assertLen(a.encoders, len(b.encoders))
    for ea, eb in zip(a.encoders, b.encoders):
        np.testing.assert_array_equal(ea.kernel, eb.kernel)
        np.testing.assert_array_equal(ea.bias, eb.bias)
        test.assertEqual(ea.hidden_units, eb.hidden_units)
        if ea.hidden_units:
            np.testing.assert_array_equal(ea.hidden_kernel, eb.hidden_kernel)
            np.testing.assert_array_equal(ea.hidden_bias, eb.hidden_bias)
    for ca, cb in zip(a.centres, b.centres):
        np.testing.assert_array_equal(ca, cb)
        test.assertEqual(ca.dtype, cb.dtype)


class RenderTest(parameterized.TestCase):
    """Held objects for calibration move, brighten and add noise to pixels."""

    @parameterized.parameters("symmetric", "imagenet")
    def test_preprocessed_inputs_are_rendered_as_pixels(self, preset):
        from smtm_tf.fitting import streams  # pylint: disable=import-outside-toplevel
        from smtm_tf.runtime import preprocessing as prep  # pylint: disable=import-outside-toplevel
        rng = np.random.default_rng(0)
        pixels = rng.uniform(0, 255, (30, 8, 8, 3)).astype(np.float32)
        p = prep.Preprocessing.preset(preset, 3)
        stream = streams.held_object(rng.integers(0, 3, 30), 60, seed=1)
        want = p.apply(stream.render(pixels))
        np.testing.assert_allclose(memory_lib.render(stream, p.apply(pixels), p), want,
                                   atol=1e-3)
        # Rendered as they are, the inputs would be clipped to [0, peak]
        # and get noise at a pixel scale: other frames.
        self.assertGreater(np.abs(stream.render(p.apply(pixels)) - want).max(), 0.5)
        self.assertIs(type(memory_lib.render(stream, pixels, None)), np.ndarray)
        np.testing.assert_array_equal(memory_lib.render(stream, pixels, None),
                                      stream.render(pixels))


class SaveLoadTest(parameterized.TestCase):

    def test_round_trip(self):
        mem = make_memory()
        path = os.path.join(self.create_tempdir().full_path, "m.smtm.npz")
        mem.save(path)
        assert_memory_equal(self, memory_lib.SemanticMemory.load(path), mem)

    def test_round_trip_with_hidden_layers(self):
        mem = make_memory()
        rng = np.random.default_rng(5)
        mem = dataclasses.replace(mem, encoders=tuple(
            enc.Encoder(rng.normal(size=(7, e.dim)).astype(np.float32), e.bias,
                        rng.normal(size=(10, 7)).astype(np.float32),
                        rng.normal(size=7).astype(np.float32)) for e in mem.encoders))
        path = os.path.join(self.create_tempdir().full_path, "m.smtm.npz")
        mem.save(path)
        back = memory_lib.SemanticMemory.load(path)
        assert_memory_equal(self, back, mem)
        self.assertEqual(back.encoders[0].hidden_units, 7)

    def test_version_2_files_still_load(self):
        # Written before hidden layers: the same arrays, version 2.
        with np.load(io.BytesIO(self._valid_bytes())) as f:
            arrays = {k: f[k] for k in f.files}
        arrays["meta"] = np.array(json.dumps(dict(json.loads(str(arrays["meta"])),
                                                  format_version=2)))
        path = self._write(self._npz_bytes(**arrays))
        back = memory_lib.SemanticMemory.load(path)
        self.assertEqual([e.hidden_units for e in back.encoders], [0, 0])

    def test_save_leaves_only_the_file(self):
        directory = self.create_tempdir().full_path
        path = os.path.join(directory, "m.smtm.npz")
        make_memory(seed=0).save(path)
        make_memory(seed=1).save(path)  # Overwrites in place.
        self.assertEqual(os.listdir(directory), ["m.smtm.npz"])
        assert_memory_equal(self, memory_lib.SemanticMemory.load(path), make_memory(seed=1))

    def test_failed_save_keeps_the_old_file(self):
        directory = self.create_tempdir().full_path
        path = os.path.join(directory, "m.smtm.npz")
        make_memory(seed=0).save(path)
        with open(path, "rb") as f:
            before = f.read()
        with mock.patch.object(io_utils.os, "replace", side_effect=OSError("disk full")):
            with self.assertRaisesRegex(OSError, "disk full"):
                make_memory(seed=1).save(path)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertEqual(os.listdir(directory), ["m.smtm.npz"])

    def test_save_creates_the_directory(self):
        path = os.path.join(self.create_tempdir().full_path, "a", "b", "m.npz")
        make_memory().save(path)
        assert_memory_equal(self, memory_lib.SemanticMemory.load(path), make_memory())

    def _write(self, content: bytes) -> str:
        path = os.path.join(self.create_tempdir().full_path, "bad.smtm.npz")
        with open(path, "wb") as f:
            f.write(content)
        return path

    def _valid_bytes(self) -> bytes:
        path = os.path.join(self.create_tempdir().full_path, "m.npz")
        make_memory().save(path)
        with open(path, "rb") as f:
            return f.read()

    def _npz_bytes(self, **arrays) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    def test_not_a_memory_file(self):
        path = self._write(b"this is not a memory file" * 20)
        with self.assertRaisesRegex(memory_lib.MemoryFileError,
                                    "is not a semantic memory file.*Recreate it"):
            memory_lib.SemanticMemory.load(path)

    def test_missing_file(self):
        with self.assertRaisesRegex(memory_lib.MemoryFileError, "not a semantic memory file"):
            memory_lib.SemanticMemory.load(
                os.path.join(self.create_tempdir().full_path, "absent.npz"))

    def test_npz_without_meta(self):
        path = self._write(self._npz_bytes(x=np.zeros(3)))
        with self.assertRaisesRegex(memory_lib.MemoryFileError, "KeyError"):
            memory_lib.SemanticMemory.load(path)

    def test_meta_not_json(self):
        path = self._write(self._npz_bytes(meta=np.array("{not json")))
        with self.assertRaisesRegex(memory_lib.MemoryFileError, "not a semantic memory file"):
            memory_lib.SemanticMemory.load(path)

    def test_format_1_loads_without_a_key_and_is_never_reused(self):
        valid = self._valid_bytes()
        with np.load(io.BytesIO(valid)) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(str(arrays["meta"]))
        meta["format_version"] = 1
        del meta["key"], meta["class_frames"]
        arrays["meta"] = np.array(json.dumps(meta))
        loaded = memory_lib.SemanticMemory.load(self._write(self._npz_bytes(**arrays)))
        self.assertIsNone(loaded.key)
        self.assertEqual(loaded.mismatches(memory_lib.MemoryKey("any")),
                         ["it records no key (written by an older smtm_tf)"])

    def test_the_key_records_camera_calibration_and_a_mismatch_says_so(self):
        plain = memory_lib.MemoryKey("m", {"scale": [1.0]}, "d")
        camera = dataclasses.replace(plain, calibration=memory_lib.CAMERA)
        self.assertNotIn("calibration", plain.to_dict())  # As files written before it.
        for key in (plain, camera):
            self.assertEqual(memory_lib.MemoryKey.from_dict(key.to_dict()), key)
        with self.assertRaisesRegex(memory_lib.MemoryFileError, "Malformed memory key"):
            memory_lib.MemoryKey.from_dict({**plain.to_dict(), "calibration": "fog"})
        memory = dataclasses.replace(tu.fitted_memory("tf_keras"), key=plain)
        self.assertEqual(memory.mismatches(plain), [])
        self.assertEqual(memory.mismatches(camera), [
            "its exits were calibrated on the standard streams, not camera streams too"])
        self.assertEqual(memory.mismatches(plain, pooling=memory.pooling.value), [])
        other = next(p for p in enc.Pooling if p is not memory.pooling)
        self.assertEqual(memory.mismatches(plain, pooling=other), [
            f"its stage features are pooled {memory.pooling.value}, not {other.value}"])

    def test_camera_calibration_adds_camera_streams_with_a_bound_for_runs(self):
        model, memory = tu.trained_residual("tf_keras"), tu.fitted_memory("tf_keras")
        x, _ = tu.calibration_data()
        seen = []
        real = memory_lib.calibration.calibrate_with_cache

        def spy(*args, **kwargs):
            seen.append((len(args[4]), kwargs["runs"]))
            return real(*args, **kwargs)

        with mock.patch.object(memory_lib.calibration, "calibrate_with_cache", spy):
            memory_lib.recalibrate(model, memory, x, 0.95)
            again = memory_lib.recalibrate(model, memory, x, 0.95, camera_calibration=True)
        # 6 standard streams; camera and camera_pan join them, bounded for runs.
        self.assertEqual(seen, [(6, False), (8, True)])
        self.assertTrue(again.exit_rule.uses_cache)
        with self.assertRaisesRegex(ValueError, "camera_calibration calibrates the hot-class"):
            memory_lib.fit_semantic_memory(model, x, x, cache_policy=None,
                                           camera_calibration=True)

    @parameterized.named_parameters(("newer", memory_lib.MEMORY_FORMAT_VERSION + 1),
                                    ("older", 0), ("absent", None))
    def test_wrong_format_version(self, version):
        valid = self._valid_bytes()
        with np.load(io.BytesIO(valid)) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(str(arrays["meta"]))
        if version is None:
            del meta["format_version"]
        else:
            meta["format_version"] = version
        arrays["meta"] = np.array(json.dumps(meta))
        path = self._write(self._npz_bytes(**arrays))
        with self.assertRaises(memory_lib.MemoryFileError) as cm:
            memory_lib.SemanticMemory.load(path)
        message = str(cm.exception)
        self.assertIn(f"memory format version {version!r}", message)
        self.assertIn(f"reads version {memory_lib.MEMORY_FORMAT_VERSION}", message)

    # Damaged files must raise MemoryFileError too (the documented error, and
    # what callers such as scripts/convert.py can report cleanly).
    @parameterized.named_parameters(
        ("truncated", lambda b: b[: len(b) // 2]),
        ("empty", lambda b: b""),
        ("corrupted_bytes", lambda b: b[:200] + bytes(300) + b[500:]),
    )
    def test_damaged_file_raises_memory_file_error(self, damage):
        path = self._write(damage(self._valid_bytes()))
        with self.assertRaisesRegex(memory_lib.MemoryFileError, "not a semantic memory file"):
            memory_lib.SemanticMemory.load(path)

    def test_file_missing_an_array_raises_memory_file_error(self):
        valid = self._valid_bytes()
        with np.load(io.BytesIO(valid)) as f:
            arrays = {k: f[k] for k in f.files if k != "kernel_1"}
        path = self._write(self._npz_bytes(**arrays))
        with self.assertRaises(memory_lib.MemoryFileError):
            memory_lib.SemanticMemory.load(path)


class ValidationTest(absltest.TestCase):

    def test_counts_and_shapes(self):
        mem = make_memory()
        with self.assertRaisesRegex(ValueError, "encoders has 1 entries for 2 stages"):
            dataclasses.replace(mem, encoders=mem.encoders[:1])
        with self.assertRaisesRegex(ValueError, "centres has 1 entries for 2 stages"):
            dataclasses.replace(mem, centres=mem.centres[:1])
        with self.assertRaisesRegex(ValueError, "1 thresholds for 2 stages"):
            dataclasses.replace(mem, exit_rule=exit_policy.ExitRule("margin", (None,), 0.9))
        with self.assertRaisesRegex(ValueError, r"centres\[1\] has shape \(3, 5\)"):
            dataclasses.replace(mem, centres=(mem.centres[0], np.zeros((3, 5), np.float32)))
        with self.assertRaisesRegex(ValueError, r"expected \(4, 4\)"):
            dataclasses.replace(mem, class_names=("a", "b", "c", "d"))
        self.assertEqual(mem.embedding_dims, (4, 6))


def _separable_features(n=600, seed=2):
    """Pooled-like features `[n, 10]` (offset 50) of 3 classes, and the labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    means = rng.normal(scale=3.0, size=(3, 10))
    return (means[labels] + rng.normal(size=(n, 10)) + 50.0).astype(np.float32), labels


class EncodersTest(parameterized.TestCase):

    def test_l2_normalize(self):
        v = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
        got = enc.l2_normalize_np(v)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)
        np.testing.assert_allclose(got, v / np.linalg.norm(v, axis=1, keepdims=True), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(enc.l2_normalize(tf.constant(v))), got, rtol=1e-5)
        self.assertTrue(np.all(np.isfinite(enc.l2_normalize_np(np.zeros((2, 3))))))

    def test_pool(self):
        a = np.arange(2 * 3 * 3 * 2, dtype=np.float32).reshape(2, 3, 3, 2)
        avg = np.asarray(enc.pool(a, "avg"))
        np.testing.assert_allclose(avg, a.mean(axis=(1, 2)))
        both = np.asarray(enc.pool(a, enc.Pooling.AVG_MAX))
        np.testing.assert_allclose(both, np.concatenate([a.mean(axis=(1, 2)),
                                                         a.max(axis=(1, 2))], axis=1))
        with self.assertRaises(ValueError):
            enc.pool(a, "median")

    def test_grid_pool_is_the_quadrant_means_and_the_max(self):
        rng = np.random.default_rng(0)
        # An odd height (the middle row goes to the bottom quadrants) and
        # even sizes (pooled by one average pooling) alike.
        for shape in ((2, 5, 4, 3), (2, 6, 4, 3), (1, 28, 28, 8)):
            a = rng.normal(size=shape).astype(np.float32)
            got = np.asarray(enc.pool(a, enc.Pooling.GRID))
            rows, cols = shape[1] // 2, shape[2] // 2
            want = [a[:, :rows, :cols], a[:, :rows, cols:], a[:, rows:, :cols],
                    a[:, rows:, cols:]]
            np.testing.assert_allclose(got, np.concatenate(
                [q.mean(axis=(1, 2)) for q in want] + [a.max(axis=(1, 2))], axis=1),
                rtol=1e-5, atol=1e-6, err_msg=str(shape))
        # A map with one row (or column) has no quadrants: it is pooled avg_max.
        for thin in (a[:, :1], a[:, :, :1]):
            np.testing.assert_allclose(np.asarray(enc.pool(thin, "grid")),
                                       np.asarray(enc.pool(thin, "avg_max")))

    def test_encoder_encode(self):
        rng = np.random.default_rng(1)
        e = enc.Encoder(rng.normal(size=(6, 3)).astype(np.float32), np.ones(3, np.float32))
        x = rng.normal(size=(4, 6)).astype(np.float32)
        got = e.encode(x)
        want = x @ e.kernel + e.bias
        np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True),
                                   rtol=1e-5)
        self.assertEqual(e.dim, 3)

    def test_class_centres(self):
        semantic = np.array([[1, 0], [0.6, 0.8], [0, 1], [0, -1]], np.float32)
        labels = np.array([0, 0, 1, 1])
        centres = enc.class_centres(semantic, labels, 3)
        mean0 = np.array([0.8, 0.4]) / np.linalg.norm([0.8, 0.4])
        np.testing.assert_allclose(centres[0], mean0, rtol=1e-6)
        # Class 1's members cancel out and class 2 has none: zero centres.
        np.testing.assert_array_equal(centres[1], [0, 0])
        np.testing.assert_array_equal(centres[2], [0, 0])
        self.assertEqual(centres.dtype, np.float32)

    def test_train_encoder_separates_classes(self):
        rng = np.random.default_rng(2)
        labels = rng.integers(0, 3, 600)
        means = rng.normal(scale=3.0, size=(3, 10))
        pooled = (means[labels] + rng.normal(size=(600, 10)) + 50.0).astype(np.float32)
        encoder, weights = enc.train_encoder(pooled, labels, 3, dim=4, epochs=10,
                                             batch_size=32)
        self.assertEqual(encoder.kernel.shape, (10, 4))
        self.assertEqual(weights.shape, (3, 4))
        np.testing.assert_allclose(np.linalg.norm(weights, axis=1), 1.0, rtol=1e-5)
        # The standardisation is folded into the kernel: raw features go in.
        nearest = (encoder.encode(pooled) @ weights.T).argmax(axis=1)
        self.assertGreater((nearest == labels).mean(), 0.95)

    def test_dead_channels_get_zero_rows_and_live_ones_the_same_encoder(self):
        pooled, labels = _separable_features()
        n = len(pooled)
        rng = np.random.default_rng(3)
        dead = np.stack([np.zeros(n), np.full(n, 3.0),  # A dead ReLU; a constant.
                         2.0 + rng.normal(scale=1e-9, size=n)], axis=1)  # Rounding noise.
        # Dead channels interleaved with the live ones.
        order = np.argsort(np.r_[np.arange(10), [2.5, 5.5, 9.5]])
        with_dead = np.concatenate([pooled, dead], axis=1)[:, order].astype(np.float32)
        is_dead = order >= 10
        live_only, live_weights = enc.train_encoder(pooled, labels, 3, dim=4, epochs=5,
                                                    batch_size=32)
        encoder, weights = enc.train_encoder(with_dead, labels, 3, dim=4, epochs=5,
                                             batch_size=32)
        np.testing.assert_array_equal(encoder.kernel[is_dead], 0.0)
        np.testing.assert_allclose(encoder.kernel[~is_dead], live_only.kernel, rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(weights, live_weights, atol=1e-6)
        np.testing.assert_allclose(encoder.encode(with_dead) @ weights.T,
                                   live_only.encode(pooled) @ live_weights.T, atol=1e-5)
        # Before, the 1e-6 std offset made such rows ~1e6 (XNNPACK refused the
        # int8 model) and one more unit of a dead channel swung every vector.
        self.assertLess(np.max(np.abs(encoder.kernel)), 100.0)
        lit = with_dead.copy()
        lit[:, np.flatnonzero(is_dead)[0]] = 1.0
        np.testing.assert_allclose(encoder.encode(lit), encoder.encode(with_dead), atol=1e-6)

    def test_near_constant_channels_are_floored_relative_to_the_widest(self):
        pooled, labels = _separable_features()
        rng = np.random.default_rng(4)
        # Live, but 1e-3 of the widest channel's spread.
        quiet = 7.0 + 1e-3 * pooled.std(axis=0).max() * rng.normal(size=(len(pooled), 1))
        x = np.concatenate([pooled, quiet], axis=1).astype(np.float32)
        standardisation = enc.Standardisation.fit(x)
        self.assertTrue(np.all(standardisation.live))
        widest = x.std(axis=0).max()
        np.testing.assert_allclose(standardisation.scale[-1], enc.STD_FLOOR * widest,
                                   rtol=1e-6)
        np.testing.assert_allclose(standardisation.scale[:-1], x[:, :-1].std(axis=0),
                                   rtol=1e-4)
        encoder, _ = enc.train_encoder(x, labels, 3, dim=4, epochs=5, batch_size=32)
        row_max = np.abs(encoder.kernel).max(axis=1)
        self.assertLess(row_max[-1], 2.0 / (enc.STD_FLOOR * widest))
        self.assertLess(np.max(np.abs(encoder.bias)), 1e3)

    def test_encoder_does_not_depend_on_the_input_units(self):
        # A model fed 0..255 pixels instead of [0, 1] has pooled features
        # scaled by ~255: the encoder must be the same up to that scale.
        pooled, labels = _separable_features()
        pooled = np.concatenate([pooled / 60.0, np.full((len(pooled), 1), 1e-3),
                                 1e-6 * pooled[:, :1]], axis=1).astype(np.float32)
        unit, unit_w = enc.train_encoder(pooled, labels, 3, dim=4, epochs=5, batch_size=32)
        pixels, pixels_w = enc.train_encoder(255.0 * pooled, labels, 3, dim=4, epochs=5,
                                             batch_size=32)
        np.testing.assert_allclose(pixels.kernel * 255.0, unit.kernel, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(pixels.encode(255.0 * pooled) @ pixels_w.T,
                                   unit.encode(pooled) @ unit_w.T, atol=1e-4)
        np.testing.assert_array_equal(unit.kernel[-2:], 0.0)

    def test_all_channels_dead(self):
        encoder, weights = enc.train_encoder(np.ones((40, 5), np.float32),
                                             np.arange(40) % 2, 2, dim=3, epochs=1)
        np.testing.assert_array_equal(encoder.kernel, 0.0)
        self.assertTrue(np.all(np.isfinite(encoder.encode(np.ones((2, 5))))))
        self.assertEqual(weights.shape, (2, 3))

    def test_hidden_layer_learns_what_a_projection_cannot(self):
        # Classes by the signs of two features (XOR): no direction of a linear
        # projection of these features separates them by angle.
        rng = np.random.default_rng(6)
        x = rng.normal(size=(1200, 4)).astype(np.float32)
        labels = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).astype(np.int64)
        x += 5.0  # Standardised away; folded into the first layer.
        linear, linear_w = enc.train_encoder(x, labels, 2, dim=4, epochs=15, batch_size=64)
        deep, deep_w = enc.train_encoder(x, labels, 2, dim=4, hidden=16, epochs=15,
                                         batch_size=64)
        self.assertEqual((deep.hidden_units, linear.hidden_units), (16, 0))
        self.assertEqual(deep.hidden_kernel.shape, (4, 16))
        self.assertEqual(deep.kernel.shape, (16, 4))

        def accuracy(e, w):
            return float(((e.encode(x) @ w.T).argmax(axis=1) == labels).mean())
        self.assertLess(accuracy(linear, linear_w), 0.8)
        self.assertGreater(accuracy(deep, deep_w), 0.9)
        np.testing.assert_allclose(np.asarray(deep.tf_encode(tf.constant(x[:16]))),
                                   deep.encode(x[:16]), atol=1e-5)

    def test_hidden_layer_gets_zero_rows_for_dead_channels(self):
        pooled, labels = _separable_features()
        x = np.concatenate([pooled, np.zeros((len(pooled), 1))], axis=1).astype(np.float32)
        encoder, _ = enc.train_encoder(x, labels, 3, dim=4, hidden=8, epochs=3, batch_size=32)
        np.testing.assert_array_equal(encoder.hidden_kernel[-1], 0.0)
        self.assertLess(np.max(np.abs(encoder.hidden_kernel)), 100.0)
        dead, _ = enc.train_encoder(np.ones((40, 5), np.float32), np.arange(40) % 2, 2,
                                    dim=3, hidden=6, epochs=1)
        self.assertEqual(dead.hidden_units, 6)
        np.testing.assert_array_equal(dead.encode(np.ones((2, 5))), 0.0)

    def test_encoder_rejects_a_broken_hidden_layer(self):
        k = np.zeros((6, 3), np.float32)
        with self.assertRaisesRegex(ValueError, "needs both a kernel and a bias"):
            enc.Encoder(k, np.zeros(3, np.float32), np.zeros((4, 6), np.float32))
        with self.assertRaisesRegex(ValueError, "Layer 1 takes 6 inputs, the layer before gives 5"):
            enc.Encoder(k, np.zeros(3, np.float32), np.zeros((4, 5), np.float32),
                        np.zeros(5, np.float32))

    def test_train_encoder_rejects_bad_inputs(self):
        with self.assertRaisesRegex(ValueError, "3 feature rows for 2 labels"):
            enc.train_encoder(np.zeros((3, 4), np.float32), np.zeros(2, np.int64), 2)
        with self.assertRaisesRegex(ValueError, "dim must be >= 2"):
            enc.train_encoder(np.zeros((3, 4), np.float32), np.zeros(3, np.int64), 2, dim=1)


class FitSemanticMemoryTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model = tu.trained_residual("tf_keras")
        cls.memory = tu.fitted_memory("tf_keras")

    def test_fitted_memory(self):
        mem = self.memory
        self.assertEqual(mem.plan.cut_layers, ("r0", "out1", "r2"))
        self.assertEqual(mem.class_names, tu.CLASS_NAMES)
        self.assertEqual(mem.embedding_dims, (8, 8, 8))
        self.assertIs(mem.pooling, memory_lib.POOLING)
        for c in mem.centres:
            self.assertEqual(c.shape, (tu.NUM_CLASSES, 8))
            np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, rtol=1e-5)
        for e in mem.encoders:
            self.assertEqual(e.hidden_units, memory_lib.ENCODER_HIDDEN)
            # The grid's four quadrant means and the max of 8, 8 and 16 channels.
            self.assertEqual(e.kernels[0].shape[0], 40 if e is not mem.encoders[2] else 80)
            self.assertEqual(e.kernel.shape[1], 8)
        self.assertLen(mem.stage_accuracy, 3)
        # The last stage is the whole backbone: its nearest centre is (almost)
        # always the model's class.
        self.assertGreater(mem.stage_accuracy[2], 0.9)
        self.assertEqual(mem.exit_rule.target_agreement, 0.95)

    def test_stage_accuracy_is_measured_on_calibration_frames(self):
        sims, full = tu.calibration_similarities("tf_keras")
        got = tuple(float((s.argmax(axis=1) == full).mean()) for s in sims)
        np.testing.assert_allclose(got, self.memory.stage_accuracy, atol=1e-6)

    def test_calibrated_rule_meets_its_target_on_calibration_frames(self):
        sims, full = tu.calibration_similarities("tf_keras")
        _, pred = exit_policy.simulate(self.memory.exit_rule, sims, full)
        self.assertGreaterEqual((pred == full).mean(), self.memory.exit_rule.target_agreement)

    def test_mean_centres_and_class_name_check(self):
        x, _ = tu.train_data()
        xc, _ = tu.calibration_data()
        mem = memory_lib.fit_semantic_memory(self.model, x[:300], xc[:100], num_stages=2,
                                             embedding_dim=4, centres="mean",
                                             encoder_epochs=2, pooling="avg")
        self.assertEqual(mem.class_names, ("0", "1", "2", "3"))
        self.assertIs(mem.pooling, enc.Pooling.AVG)
        self.assertEqual(mem.encoders[0].kernels[0].shape[0], 8)
        self.assertEqual(mem.encoders[0].dim, 4)
        for c in mem.centres:
            np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, rtol=1e-5)
        with self.assertRaisesRegex(ValueError, "2 class names for a model with 4 outputs"):
            memory_lib.fit_semantic_memory(self.model, x[:64], xc[:16], class_names=("a", "b"),
                                           num_stages=1, embedding_dim=2, encoder_epochs=1)

    def test_dropping_stages_whose_exits_do_not_pay(self):
        xc, _ = tu.calibration_data()
        mem = tu.exiting_memory("tf_keras")  # Frames exit at every stage.
        stage_models, head = stages.split_model(self.model, mem.plan)
        features = enc.extract_features(stage_models, head, xc, mem.pooling)
        shares = memory_lib.calibration_exit_shares(mem, features)
        self.assertLen(shares, mem.plan.num_stages + 1)
        self.assertAlmostEqual(float(shares.sum()), 1.0)
        self.assertGreater(float(shares[:-1].min()), 0.1)
        # No overhead: an exit never costs more than it saves; nothing goes.
        self.assertIs(memory_lib.drop_unpaid_stages(
            self.model, mem, xc, features, 0.0, target_agreement=0.95), mem)
        # A stage as dear as the whole model: one stage is all that pays.
        said = []
        kept = memory_lib.drop_unpaid_stages(self.model, mem, xc, features, 1.0,
                                             target_agreement=0.95, say=said.append)
        self.assertEqual(kept.plan.num_stages, 1)
        k = mem.plan.cut_layers.index(kept.plan.cut_layers[0])
        self.assertEqual(kept.plan, stages.keep_stages(mem.plan, [k]))
        self.assertIs(kept.encoders[0], mem.encoders[k])
        np.testing.assert_array_equal(kept.centres[0], mem.centres[k])
        self.assertEqual(kept.stage_accuracy, (mem.stage_accuracy[k],))
        self.assertLen(kept.exit_rule.thresholds, 1)
        self.assertLen([line for line in said if line.startswith("dropping stage")], 2)
        # The rule was calibrated anew for the kept stage and meets its target.
        sims = kept.similarities(enc.StageFeatures((features.pooled[k],),
                                                   features.probabilities))
        _, pred = exit_policy.simulate(kept.exit_rule, sims, features.predictions)
        self.assertGreaterEqual((pred == features.predictions).mean(), 0.95)
        # Stages 1 and 2 take no exits: they go. If the rule calibrated for
        # stage 0 alone then exits later than the estimate assumed (here:
        # never), the planned stages stay.
        said = []
        planned, alone = np.array([0.9, 0.0, 0.0, 0.1]), np.array([0.0, 1.0])
        with mock.patch.object(memory_lib, "calibration_exit_shares",
                               side_effect=[planned, alone]):
            self.assertIs(memory_lib.drop_unpaid_stages(
                self.model, mem, xc, features, 0.05, target_agreement=0.95,
                say=said.append), mem)
        self.assertLen([line for line in said if line.startswith("dropping stage")], 2)
        self.assertStartsWith(said[-1], f"keeping all {mem.plan.num_stages} stages: ")

    def test_saved_fitted_memory_round_trips(self):
        path = os.path.join(self.create_tempdir().full_path, "fitted.smtm.npz")
        self.memory.save(path)
        assert_memory_equal(self, memory_lib.SemanticMemory.load(path), self.memory)


class AtomicWriteTest(absltest.TestCase):

    def test_failure_inside_leaves_nothing(self):
        directory = self.create_tempdir().full_path
        path = os.path.join(directory, "out.bin")
        with self.assertRaisesRegex(RuntimeError, "boom"):
            with io_utils.atomic_path(path) as tmp:
                self.assertEqual(os.path.dirname(tmp), directory)
                self.assertTrue(tmp.endswith(".bin"))
                with open(tmp, "wb") as f:
                    f.write(b"partial")
                raise RuntimeError("boom")
        self.assertEqual(os.listdir(directory), [])

    def test_write_bytes(self):
        directory = self.create_tempdir().full_path
        path = os.path.join(directory, "out.bin")
        io_utils.write_bytes_atomic(path, b"one")
        io_utils.write_bytes_atomic(path, b"two")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"two")
        self.assertEqual(os.listdir(directory), ["out.bin"])

    def test_atomic_write_keeps_normal_file_permissions(self):
        # A file written atomically should be as readable as one written with
        # open(): mkstemp's private 0600 mode must not leak into the result
        # (a .tflite or memory file shared with another user or a web server
        # would otherwise be unreadable to it).
        directory = self.create_tempdir().full_path
        old = os.umask(0o022)
        try:
            plain = os.path.join(directory, "plain.bin")
            with open(plain, "wb") as f:
                f.write(b"x")
            atomic = os.path.join(directory, "atomic.bin")
            io_utils.write_bytes_atomic(atomic, b"x")
        finally:
            os.umask(old)
        self.assertEqual(oct(stat.S_IMODE(os.stat(atomic).st_mode)),
                         oct(stat.S_IMODE(os.stat(plain).st_mode)))


if __name__ == "__main__":
    absltest.main()
