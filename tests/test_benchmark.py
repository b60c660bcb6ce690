"""Tests for smtm_tf.evaluation.benchmark: the interleaved harness, the figures, the checks."""

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
import numpy as np

from smtm_tf.evaluation import baselines
from smtm_tf.runtime import exit_policy
from smtm_tf.evaluation import benchmark
from smtm_tf.evaluation import validation
from smtm_tf.fitting import encoders as enc
from smtm_tf.fitting import stages
import testing_utils as tu


class _Recorder:
    """A fake runtime: answers frame[0] and exits at stage 1; logs every call."""

    def __init__(self, name, log, state=False):
        self.name, self.log, self.state = name, log, state
        self.seen = []
        self.resets = 0

    def reset_cache(self):
        self.resets += 1
        self.seen = []

    def classify_fast(self, frame):
        self.log.append(self.name)
        self.seen.append(int(frame[0]))
        return int(frame[0]), 1


class InterleaveTest(absltest.TestCase):

    def test_every_contender_sees_every_frame_in_order(self):
        log = []
        rts = [_Recorder(n, log) for n in "abc"]
        contenders = [benchmark.Contender(n, None if n == "a" else 1.0, r)
                      for n, r in zip("abc", rts)]
        frames = np.arange(1000).astype(np.float32)[:, None]
        out = benchmark.run_interleaved(contenders, frames, warmup=5, block=100)
        for c, r in zip(contenders, rts):
            self.assertEqual(r.resets, 1)  # After the warm-up, before timing.
            self.assertEqual(r.seen, list(range(1000)))
            pred, stage, ns, checks = out[c.key]
            self.assertEqual(checks, 0)  # No adaptive memory here.
            np.testing.assert_array_equal(pred, np.arange(1000))
            np.testing.assert_array_equal(stage, 1)
            self.assertTrue((ns > 0).all())

    def test_order_rotates_and_reverses(self):
        log = []
        contenders = [benchmark.Contender(n, 1.0, _Recorder(n, log)) for n in "abc"]
        benchmark.run_interleaved(contenders, np.zeros((600, 1), np.float32), warmup=0,
                                  block=100)
        firsts = [log[i * 300] for i in range(6)]
        lasts = [log[i * 300 + 299] for i in range(6)]
        # Blocks 0-2 forwards from a, b, c; blocks 3-5 backwards.
        self.assertEqual(firsts, ["a", "b", "c", "c", "a", "b"])
        self.assertEqual(len(set(firsts)), 3)
        self.assertEqual(len(set(lasts)), 3)

    def test_bad_block(self):
        with self.assertRaises(ValueError):
            benchmark.run_interleaved([], np.zeros((3, 1)), block=0)


class FiguresTest(absltest.TestCase):

    def _results(self):
        n = 10
        labels = np.array([0, 1] * 5)
        full = (labels.copy(), np.full(n, 2), np.full(n, 4000))
        fast_pred = labels.copy()
        fast_pred[0] = 1  # One disagreement, one label wrong.
        fast = (fast_pred, np.array([0] * 5 + [1] * 3 + [2] * 2), np.full(n, 1000))
        contenders = [benchmark.Contender(benchmark.FULL, None, None),
                      benchmark.Contender(benchmark.SMTM_ADAPTIVE, 1.0, None)]
        return contenders, {benchmark.FULL: full, "smtm_adaptive@1": fast}, labels

    def test_rows(self):
        contenders, results, labels = self._results()
        rows = benchmark.rows_for("m", "video", contenders, results, labels, (0.25, 0.25))
        full, fast = rows
        self.assertEqual((full.speedup, full.drop, full.agreement), (1.0, 0.0, 100.0))
        self.assertEqual(full.exit_shares, (0.0, 0.0, 1.0))
        self.assertAlmostEqual(fast.speedup, 4.0)
        self.assertAlmostEqual(fast.drop, 10.0)
        self.assertAlmostEqual(fast.agreement, 90.0)
        self.assertEqual(fast.exit_shares, (0.5, 0.3, 0.2))
        # Expected compute share: 0.5 * 0.25 + 0.3 * 0.5 + 0.2 * 1.
        self.assertAlmostEqual(fast.compute_speedup, 1 / 0.475)
        self.assertAlmostEqual(fast.mean_us, 1.0)

    def test_compute_speedup(self):
        self.assertAlmostEqual(exit_policy.compute_speedup((1, 0, 0), (0.25, 0.25)), 4.0)
        self.assertAlmostEqual(exit_policy.compute_speedup((0, 0, 1), (0.25, 0.25)), 1.0)
        # A tenth of the frames exited at stage 0 and were checked by `full`.
        self.assertAlmostEqual(exit_policy.compute_speedup((1, 0, 0), (0.25, 0.25), 0.1),
                               1 / 0.35)

    def test_checked_exits_count_in_the_compute(self):
        contenders, results, labels = self._results()
        results["smtm_adaptive@1"] = (*results["smtm_adaptive@1"], 2)  # 2 of 10 checked.
        rows = benchmark.rows_for("m", "video", contenders, results, labels, (0.25, 0.25))
        self.assertAlmostEqual(rows[1].compute_speedup, 1 / (0.475 + 0.2))

    def test_missing_numbers(self):
        contenders, results, labels = self._results()
        rows = benchmark.rows_for("m", "video", contenders, results, labels, (0.25, 0.25))
        problems = benchmark.missing_numbers(rows, ["m"], ["video"], [1.0])
        # Only the two baselines and SMTM static are missing.
        self.assertLen(problems, 3)
        self.assertTrue(all("no row" in p for p in problems))
        self.assertFalse(any("smtm_adaptive" in p for p in problems))
        bad = [rows[0], benchmark.Row(**{**rows[1].to_dict(), "mean_us": float("nan")})]
        problems = benchmark.missing_numbers(bad, ["m"], ["video"], [1.0])
        self.assertTrue(any("non-finite" in p for p in problems))

    def test_tables_and_targets(self):
        contenders, results, labels = self._results()
        rows = benchmark.rows_for("m", "video", contenders, results, labels, (0.25, 0.25))
        base = benchmark.Row(**{**rows[1].to_dict(), "method": benchmark.BRANCHY,
                                "speedup": 2.0, "drop": 0.5})
        rows.append(base)
        summary = benchmark.format_summary(rows, 1.0)
        self.assertIn("| m | video | 4 |", summary)
        self.assertIn("2.00x", summary)  # SMTM 4x over the baseline's 2x.
        table = benchmark.format_rows(rows)
        self.assertLen(table.splitlines(), 2 + len(rows))
        targets = benchmark.check_targets(rows, 1.0)
        # SMTM is 4x but 10 points off: it misses the accuracy condition.
        self.assertLen(targets, 1)
        self.assertIn("misses >= 2x within 1", targets[0])

    def test_a_drop_of_exactly_the_budget_is_within_it(self):
        contenders, results, labels = self._results()
        rows = benchmark.rows_for("m", "video", contenders, results, labels, (0.25, 0.25))
        smtm = next(r for r in rows if r.method == benchmark.SMTM_ADAPTIVE)
        drop = 100 * (1900 / 2000 - 1880 / 2000)  # 20 frames of 2,000, as float math gives it.
        self.assertGreater(drop, 1.0)
        at_budget = benchmark.Row(**{**smtm.to_dict(), "speedup": 2.5, "drop": drop})
        over = benchmark.Row(**{**smtm.to_dict(), "speedup": 2.5, "drop": 1.05})
        base = benchmark.Row(**{**smtm.to_dict(), "method": benchmark.BRANCHY, "speedup": 2.0})
        self.assertIn("meets >= 2x within 1", benchmark.check_targets([at_budget, base], 1.0)[0])
        self.assertIn("misses >= 2x within 1", benchmark.check_targets([over, base], 1.0)[0])


@functools.cache
def tiny_setup():
    model, memory = tu.trained_residual("tf_keras"), tu.fitted_memory("tf_keras")
    x, y = tu.train_data()
    heads = baselines.train_baselines(model, memory.plan, x, y, pooling=memory.pooling,
                                      epochs=3)
    flat = baselines.convert(model, memory, heads, tu.check_images()[:2])
    stage_models, head = stages.split_model(model, memory.plan)
    calib = enc.extract_features(stage_models, head, tu.calibration_data()[0], memory.pooling)
    return memory, heads, flat, calib


class EndToEndTest(absltest.TestCase):

    def test_all_methods_produce_numbers(self):
        memory, heads, flat, calib = tiny_setup()
        own = round(100 * (1 - memory.exit_rule.target_agreement), 6)
        budgets = [own, 10.0]
        calibrated = benchmark.calibrate_all(memory, heads, calib, budgets)
        self.assertIsNone(calibrated.rules[(benchmark.SMTM_ADAPTIVE, own)])
        self.assertIsNone(calibrated.rules[(benchmark.SMTM_STATIC, own)][0].cold_thresholds)
        # The oracle exits bound what any rule on each lookup gets.
        self.assertEqual(set(calibrated.oracle_speedup), {"smtm", *benchmark.BASELINES})
        for method, ceiling in calibrated.oracle_speedup.items():
            self.assertGreater(ceiling, 1.0, method)
        contenders = benchmark.make_contenders(flat, calibrated, budgets)
        self.assertLen(contenders, 1 + 4 * len(budgets))
        adaptive = [c for c in contenders if c.method == benchmark.SMTM_ADAPTIVE]
        # At the memory's own budget the runtime keeps its descriptor's rule.
        self.assertEqual(adaptive[0].runtime.rule, adaptive[0].runtime.descriptor.exit_rule)
        frames, labels = tu.stripes(300, seed=50)
        frames = frames.astype(np.float32)[:, None]
        results = benchmark.run_interleaved(contenders, frames, warmup=10, block=50)
        rows = benchmark.rows_for("tiny", "uniform", contenders, results, labels,
                                  memory.plan.stage_costs)
        self.assertEqual(benchmark.missing_numbers(rows, ["tiny"], ["uniform"], budgets), [])
        full = rows[0]
        self.assertEqual(full.method, benchmark.FULL)
        self.assertGreater(full.accuracy, 90.0)
        # A loose budget lets every method exit somewhere.
        for r in rows[1:]:
            if r.budget == 10.0:
                self.assertGreater(r.compute_speedup, 1.0, r.method)
        path = os.path.join(self.create_tempdir().full_path, "p.png")
        benchmark.plot(rows, "tiny", path)
        with open(path, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

    def test_host_work(self):
        memory, heads, flat, calib = tiny_setup()
        calibrated = benchmark.calibrate_all(memory, heads, calib, [10.0])
        frames = tu.stripes(40, seed=51)[0].astype(np.float32)[:, None]
        for c in benchmark.make_contenders(flat, calibrated, [10.0]):
            value = validation.host_work_us(c.runtime, frames)
            self.assertTrue(np.isfinite(value), c.key)
        # A runtime that does not expose its invokes has no figure.
        self.assertIsNone(validation.host_work_us(_Recorder("a", []), frames))

    def test_machine_info(self):
        info = benchmark.machine_info(1)
        self.assertEqual(info["num_threads"], 1)
        self.assertIn("tensorflow", info["versions"])


class UserModelTest(absltest.TestCase):
    """`scripts/benchmark.py --model=PATH --data=SPEC`: a model outside the repository."""

    def test_every_method_on_a_users_model_with_its_preprocessing(self):
        tmp = tempfile.mkdtemp(prefix="smtm-bench-user-")
        self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
        model_dir, out_dir = os.path.join(tmp, "mine"), os.path.join(tmp, "out")
        os.makedirs(model_dir)
        model_path = os.path.join(model_dir, "stripes.keras")
        tu.trained_residual("keras").save(model_path)
        # Stored as pixels the model does not take: it sees pixel * 0.01 - 1.
        data = tu.labelled_stripes(1500, 300, 0, 3)
        np.savez(os.path.join(tmp, "stripes.npz"), x_train=(data.x_train + 1) * 100,
                 y_train=data.y_train, x_test=(data.x_test + 1) * 100, y_test=data.y_test)
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

        def run():
            return subprocess.run(
                [sys.executable, os.path.join(repo, "scripts", "benchmark.py"), "--quick",
                 f"--model={model_path}", f"--data={os.path.join(tmp, 'stripes.npz')}",
                 "--input_scale=0.01", "--input_offset=-1", "--num_stages=3",
                 "--embedding_dim=8", "--streams=video",
                 f"--output_dir={out_dir}", "--noprogress"],
                cwd=repo, capture_output=True, text=True, timeout=600, check=False,
                env={**os.environ, "PYTHONPATH": repo, "CUDA_VISIBLE_DEVICES": ""})

        first = run()
        self.assertEqual(first.returncode, 0, first.stderr[-3000:])
        self.assertIn("fitting the semantic memory", first.stdout)
        with open(os.path.join(out_dir, "benchmark.json"), encoding="utf-8") as f:
            result = json.load(f)
        methods = {r["method"] for r in result["rows"] if r["model"] == "stripes"}
        self.assertEqual(methods, set(benchmark.METHODS))
        for row in result["rows"]:
            self.assertTrue(np.isfinite(row["speedup"]), row)
        # The model is scored on what it takes: near its training accuracy.
        self.assertGreater(result["models"][0]["test_accuracy"], 80)
        # Written where asked only; the memory is reused by the next run.
        self.assertEqual(os.listdir(model_dir), ["stripes.keras"])
        self.assertTrue(os.path.exists(os.path.join(out_dir, "stripes.smtm.npz")))
        second = run()
        self.assertEqual(second.returncode, 0, second.stderr[-3000:])
        self.assertIn("using the semantic memory", second.stdout)
        self.assertNotIn("fitting the semantic memory", second.stdout)

    def test_data_of_one_class_is_refused_before_anything_is_fitted(self):
        tmp = tempfile.mkdtemp(prefix="smtm-bench-one-class-")
        self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
        model_path = os.path.join(tmp, "stripes.keras")
        tu.trained_residual("keras").save(model_path)
        data = tu.labelled_stripes(200, 50, 0, 3)
        np.savez(os.path.join(tmp, "one.npz"), x_train=data.x_train,
                 y_train=0 * data.y_train, x_test=data.x_test, y_test=0 * data.y_test)
        out_dir = os.path.join(tmp, "out")
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        done = subprocess.run(
            [sys.executable, os.path.join(repo, "scripts", "benchmark.py"), "--quick",
             f"--model={model_path}", f"--data={os.path.join(tmp, 'one.npz')}",
             f"--output_dir={out_dir}", "--noprogress"],
            cwd=repo, capture_output=True, text=True, timeout=600, check=False,
            env={**os.environ, "PYTHONPATH": repo, "CUDA_VISIBLE_DEVICES": ""})
        self.assertEqual(done.returncode, 1, done.stderr[-3000:])
        self.assertIn("error: The data's train split holds images of 1 class", done.stderr)
        self.assertIn("at least 2 classes", done.stderr)
        self.assertNotIn("fitting the semantic memory", done.stdout)
        self.assertFalse(os.path.exists(os.path.join(out_dir, "stripes.smtm.npz")))


if __name__ == "__main__":
    absltest.main()
