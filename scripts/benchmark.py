"""SMTM against the full model, BranchyNet exits and GATI learned caches.

For each model (trained by scripts/train_models.py, with its semantic memory
and baseline heads committed beside it), converts one .tflite holding every
contender's signatures, calibrates every early-exit method to every budget on
the same held-out frames, and runs all contenders interleaved block by block
on the same test-split streams. Writes a markdown table, JSON and one PNG per
model (speed-up against accuracy drop, one curve per method over budgets).

`--model=PATH --data=SPEC` benchmarks a user's own Keras model instead: its
semantic memory is fitted (or reused from `--memory` when its key matches) and
every method's heads trained for it on `--data`, with the preprocessing flags
of scripts/convert.py; every method sees the same preprocessed frames.

Example:
  python3 scripts/benchmark.py                 # the documented run
  python3 scripts/benchmark.py --quick         # CI: every method produces numbers
  python3 scripts/benchmark.py --model=my.keras --data=my_digits.npz \
      --preprocessing=unit --output_dir=out/my_bench
"""

from scripts import command_line  # First: quiets native logs before TensorFlow loads.

import dataclasses
import functools
import os
import time

from absl import app
from absl import flags
from converters import smtm_converter
from delegates import cpu
from smtm_tf.evaluation import baselines
from smtm_tf.evaluation import benchmark
from smtm_tf.evaluation import validation
from smtm_tf.fitting import data as data_lib
from smtm_tf.fitting import encoders as enc
from smtm_tf.fitting import kerascompat
from smtm_tf.fitting import memory as memory_lib
from smtm_tf.fitting import models as models_lib
from smtm_tf.fitting import stages as stages_lib
from smtm_tf.fitting import streams as streams_lib
from smtm_tf.runtime import io_utils
from smtm_tf.runtime import preprocessing as prep
from scripts import model_flags

_MODELS = flags.DEFINE_list("models", ["resnet", "mobilenet_v2", "vgg"],
                            "Models (see scripts/train_models.py).")
_MODEL_DIR = flags.DEFINE_string("model_dir", "models", "Where the trained models are.")
_MODEL = flags.DEFINE_string(
    "model", None, "A user's trained Keras model (.keras or .h5) to benchmark instead of "
    "--models: its memory is fitted and every method's heads trained on --data.")
_DATA = flags.DEFINE_string(
    "data", "fashion_mnist", "With --model: 'fashion_mnist', a .npz with "
    "x_train/y_train/x_test/y_test, or a folder with one sub-folder of images per class.")
_MEMORY = flags.DEFINE_string(
    "memory", None, "With --model: a semantic memory file to reuse when its key matches "
    "(default <output_dir>/<model>.smtm.npz); a new fit is saved there.")
_STREAMS = flags.DEFINE_list("streams", None, "Streams (default: all the benchmark's).")
_BUDGETS = flags.DEFINE_list("budgets", ["0.5", "1", "2"],
                             "Budgets in points of agreement with the full model.")
_FRAMES = flags.DEFINE_integer("frames", 2000, "Frames per stream.")
_WARMUP = flags.DEFINE_integer("warmup", 50, "Untimed frames per contender per stream.")
_BLOCK = flags.DEFINE_integer("block", 100, "Frames a contender runs before the next.")
_SEED = flags.DEFINE_integer("seed", 0, "Stream seed.")
_HOLDOUT = flags.DEFINE_float("holdout", 0.1, "Calibration tail of the train split.")
_THREADS = flags.DEFINE_integer("num_threads", 1, "Interpreter threads.")
_CHECK_IMAGES = flags.DEFINE_integer("check_images", 16,
                                     "Test images the conversion checks run on.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "out/benchmark",
                                  "Where the table, JSON, plots and .tflite files go.")
_QUICK = flags.DEFINE_bool(
    "quick", False, "CI mode: 300 frames, the memories' own budget (1 point), 4 check "
    "images; fails unless every method produced finite numbers.")


def main(argv):
    del argv
    import numpy as np  # pylint: disable=import-outside-toplevel


    started = time.time()
    quick = _QUICK.value
    frames_per_stream = 300 if quick else _FRAMES.value
    warmup = 20 if quick else _WARMUP.value
    budgets = [1.0] if quick else [float(b) for b in _BUDGETS.value]
    check_images = 4 if quick else _CHECK_IMAGES.value
    stream_specs = [s for s in benchmark.STREAMS
                    if _STREAMS.value is None or s[0] in _STREAMS.value]
    if _STREAMS.value and len(stream_specs) != len(_STREAMS.value):
        raise app.UsageError(f"Known streams: {[s[0] for s in benchmark.STREAMS]}.")
    if _MODEL.value is None:
        if model_flags.given():
            raise app.UsageError(f"{', '.join(model_flags.given())} describe a model given "
                                 "with --model; the demo models (--models) carry their own.")
        unknown = [m for m in _MODELS.value if m not in models_lib.BENCHMARK_MODELS]
        if unknown:
            raise app.UsageError(f"Unknown models {unknown}; known: "
                                 f"{sorted(models_lib.BENCHMARK_MODELS)}.")
    out_dir = _OUTPUT_DIR.value
    os.makedirs(out_dir, exist_ok=True)
    info = benchmark.machine_info(_THREADS.value)
    info.update(frames=frames_per_stream, budgets=budgets, seed=_SEED.value,
                block=_BLOCK.value, warmup=warmup, quick=quick,
                streams=[s[0] for s in stream_specs])
    print(f"{info['machine']}; {info['cpu_count']} CPUs; {info['num_threads']} interpreter "
          f"thread(s); {info['versions']}", flush=True)

    def backend():
        return cpu.CpuBackend(num_threads=_THREADS.value)

    rows, model_info = [], []
    if _MODEL.value:
        subjects = [_user_subject(_MODEL.value, out_dir)]
    else:
        data = data_lib.load_fashion_mnist()
        subjects = [_demo_subject(name, data) for name in _MODELS.value]
    for subject in subjects:
        t0 = time.time()
        name, model, memory, heads = subject.name, subject.model, subject.memory, subject.heads
        x_test, y_test, x_cal = subject.x_test, subject.y_test, subject.x_cal
        test_pred = model.predict(x_test, verbose=0, batch_size=1000).argmax(1)
        test_acc = 100 * float((test_pred == y_test).mean())
        print(f"[{name}] {subject.path}: {model.count_params()} parameters, test accuracy "
              f"{test_acc:.2f}%; converting with the baselines' signatures "
              f"({time.time() - t0:.0f} s)", flush=True)
        flat = baselines.convert(model, memory, heads, x_test[:check_images])
        io_utils.write_bytes_atomic(os.path.join(out_dir, subject.stem + ".bench.tflite"), flat)
        if subject.save_memory_to:  # A new fit, kept once the conversion's checks passed.
            memory.save(subject.save_memory_to)
            print(f"[{name}] wrote the semantic memory to {subject.save_memory_to}")
        stage_models, head = stages_lib.split_model(model, memory.plan)
        calibration = enc.extract_features(stage_models, head, x_cal, memory.pooling)
        print(f"[{name}] calibrating {len(benchmark.METHODS) - 1} methods x "
              f"{len(budgets)} budgets on {len(x_cal)} held-out frames "
              f"({time.time() - t0:.0f} s)", flush=True)
        calibrated = benchmark.calibrate_all(memory, heads, calibration, budgets, model,
                                             x_cal, subject.preprocessing)
        contenders = benchmark.make_contenders(flat, calibrated, budgets,
                                               backend_factory=backend)
        input_shape = tuple(int(d) for d in model.inputs[0].shape[1:])
        model_info.append({
            "model": name, "path": subject.path, "parameters": int(model.count_params()),
            "preprocessing": subject.preprocessing.describe(),
            "test_accuracy": test_acc, "tflite_bytes": len(flat),
            "cut_layers": list(memory.plan.cut_layers),
            "stage_costs": [float(c) for c in memory.plan.stage_costs],
            "memory_budget": calibrated.memory_budget,
            "nearest_centre_agreement": [float(a) for a in memory.stage_accuracy],
            "baseline_train_agreement": {m.value: list(a)
                                         for m, a in heads.stage_agreement.items()},
            "calibration_agreement": {m: list(a)
                                      for m, a in calibrated.stage_agreement.items()},
            "oracle_speedup": calibrated.oracle_speedup,
            "thresholds": {f"{m}@{b:g}": (None if r is None else list(r[0].thresholds))
                           for (m, b), r in calibrated.rules.items()}})
        for stream_name, kind, exponent in stream_specs:
            ts = time.time()
            stream = streams_lib.make_stream(kind, y_test, frames_per_stream,
                                             seed=_SEED.value, zipf_exponent=exponent or 1.2)
            # Camera pixels, then what the model expects done to them.
            frames = np.ascontiguousarray(subject.preprocessing.apply(
                stream.render(subject.pixels_test)), np.float32).reshape(
                    (len(stream), 1) + input_shape)
            results = benchmark.run_interleaved(contenders, frames, warmup, _BLOCK.value)
            new = benchmark.rows_for(name, stream_name, contenders, results, stream.labels,
                                     memory.plan.stage_costs, _BLOCK.value)
            rows += new
            at = {r.method: r for r in new if r.budget in (None, budgets[0] if quick else 1.0)}
            print(f"[{name}] {stream_name}: {len(frames)} frames x {len(contenders)} "
                  f"contenders in {time.time() - ts:.0f} s; speed-up at 1 point: "
                  + ", ".join(f"{m} {r.speedup:.2f}x ({r.drop:+.2f})" for m, r in at.items()
                              if m != benchmark.FULL), flush=True)
        # Host work per frame of each contender at the summary budget, on the
        # first frames of the last stream (exits as that stream gives them).
        summary_budget = 1.0 if 1.0 in budgets else budgets[0]
        model_info[-1]["host_work_us"] = {
            c.method: validation.host_work_us(c.runtime, frames[:300])
            for c in contenders if c.budget in (None, summary_budget)}
        print(f"[{name}] ({time.time() - t0:.0f} s) host work per frame (us): " + ", ".join(
            f"{m} {v:.1f}" for m, v in model_info[-1]["host_work_us"].items()
            if v is not None), flush=True)
        model_info[-1]["seconds"] = time.time() - t0
        del contenders

    summary_budget = 1.0 if 1.0 in budgets else budgets[0]
    info["seconds"] = time.time() - started
    table = benchmark.format_rows(rows)
    summary = benchmark.format_summary(rows, summary_budget)
    targets = benchmark.check_targets(rows, summary_budget)
    host = ["| model | full us | " + " | ".join(benchmark.METHOD_LABELS[m]
                                               for m in benchmark.METHODS) + " |",
            "|---|---|" + "---|" * len(benchmark.METHODS)]
    for m in model_info:
        full_us = next(r.mean_us for r in rows if r.model == m["model"]
                       and r.method == benchmark.FULL)
        host.append(f"| {m['model']} | {full_us:.0f} | " + " | ".join(
            "-" if m["host_work_us"].get(k) is None else f"{m['host_work_us'][k]:.1f}"
            for k in benchmark.METHODS) + " |")
    lookup = ["| model | lookup | " + " | ".join(
        f"s{s}" for s in range(len(model_info[0]["cut_layers"]))) + " | oracle exits |",
              "|---|---|" + "---|" * (len(model_info[0]["cut_layers"]) + 1)]
    names = {"smtm": "SMTM nearest centre", benchmark.BRANCHY: "BranchyNet branch",
             benchmark.LEARNED_CACHE: "learned cache (GATI)"}
    for m in model_info:
        for k, label in names.items():
            lookup.append(f"| {m['model']} | {label} | " + " | ".join(
                f"{100 * a:.1f}%" for a in m["calibration_agreement"][k])
                + f" | {m['oracle_speedup'][k]:.2f}x |")
    accuracy = "\n".join(f"- {m['model']}: {m['test_accuracy']:.2f}% test accuracy, "
                         f"{m['parameters']} parameters, stages end at "
                         f"{', '.join(m['cut_layers'])}" for m in model_info)
    report = "\n".join([
        f"# Benchmark ({'quick' if quick else 'default'} run)", "",
        f"{info['machine']}, {info['cpu_count']} CPUs, {info['backend']}, "
        f"{info['num_threads']} thread(s); Python {info['python']}, "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
        + f"; {frames_per_stream} frames per stream, seed {_SEED.value}, blocks of "
        f"{_BLOCK.value}; commit {info['commit']}; {info['seconds']:.0f} s.", "",
        "Models:", "", accuracy, "",
        f"## Measured speed-up over full (top-1 drop in points) at budget "
        f"{summary_budget:g}", "",
        "Ratio of mean latencies, all contenders interleaved on the same frames.", "",
        summary, "",
        "Compute speed-up (1 / expected share of full's multiply-adds; free of timing "
        "noise):", "", benchmark.format_summary(rows, summary_budget, "compute_speedup"), "",
        "Targets: " if targets else "", *[f"- {t}" for t in targets], "",
        "## Per-stage agreement with the full model (held-out calibration frames)", "",
        "Share of frames whose top-1 class at the stage is the full model's, before any "
        "exit rule: how much each method's lookup knows at each depth. Oracle exits: the "
        "compute speed-up if every frame stopped at the first stage whose top-1 is the full "
        "model's (never wrong, never late), the ceiling of any exit rule on that lookup.", "",
        "\n".join(lookup), "",
        "## Host work per frame (us)", "",
        f"Copies, output reads and the decision, outside the model's invokes, at budget "
        f"{summary_budget:g} on the first 300 frames of the last stream "
        f"({stream_specs[-1][0]}):", "", "\n".join(host), "",
        "## All rows", "", table, ""])
    io_utils.write_bytes_atomic(os.path.join(out_dir, "benchmark.md"), report.encode())
    benchmark.write_json(os.path.join(out_dir, "benchmark.json"), info, model_info, rows)
    if len(budgets) > 1 or not quick:
        for name in (s.name for s in subjects):
            benchmark.plot(rows, name, os.path.join(out_dir, f"benchmark_{name}.png"))
    print()
    print(report)
    print(f"wrote {out_dir}/benchmark.md, benchmark.json"
          + ("" if quick and len(budgets) == 1 else ", benchmark_<model>.png")
          + f" in {time.time() - started:.0f} s")
    problems = benchmark.missing_numbers(rows, [s.name for s in subjects], [s[0] for s in stream_specs],
                                         budgets)
    if problems:
        raise SystemExit("Methods without numbers:\n  " + "\n  ".join(problems))


@dataclasses.dataclass
class Subject:
    """One model to benchmark, with its memory, heads and data.

    `pixels_test` are camera pixels (streams render them); `x_test` and
    `x_cal` are what the model takes (`preprocessing` applied).
    """
    name: str
    stem: str
    path: str
    model: object
    memory: memory_lib.SemanticMemory
    heads: baselines.BaselineHeads
    preprocessing: prep.Preprocessing
    pixels_test: object
    y_test: object
    x_cal: object
    save_memory_to: str | None = None

    @functools.cached_property
    def x_test(self):
        return self.preprocessing.apply(self.pixels_test)


def _demo_subject(name: str, data: data_lib.LabelledData) -> Subject:
    """A demo model with the memory and heads scripts/train_models.py committed."""
    stem = models_lib.BENCHMARK_MODELS[name][1]
    keras_path = os.path.join(_MODEL_DIR.value, stem + ".keras")
    memory_path = smtm_converter.memory_path_for(keras_path)
    heads_path = os.path.join(_MODEL_DIR.value, stem + ".baselines.npz")
    for p in (keras_path, memory_path, heads_path):
        if not os.path.exists(p):
            raise app.UsageError(f"{p} is missing: run python3 scripts/train_models.py "
                                 f"--models={name}")
    _, (x_cal, _) = data.holdout(_HOLDOUT.value)
    return Subject(name, stem, keras_path, kerascompat.load_model(keras_path),
                   memory_lib.SemanticMemory.load(memory_path),
                   baselines.BaselineHeads.load(heads_path), prep.Preprocessing.raw(),
                   data.x_test, data.y_test, x_cal)


def _user_subject(path: str, out_dir: str) -> Subject:
    """A user's model: its memory reused or fitted, the baselines' heads trained."""
    if not os.path.exists(path):
        raise app.UsageError(f"--model={path} does not exist.")
    stem = os.path.splitext(os.path.basename(path))[0]
    say = lambda line: print(f"[{stem}] {line}", flush=True)  # noqa: E731
    say(f"loading {path}")
    model = kerascompat.load_model(path)
    shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    data = data_lib.load_data(_DATA.value, image_size=shape[:2], channels=shape[2])
    say(f"data {_DATA.value}: {len(data.x_train)} train, {len(data.x_test)} test images, "
        f"brought to the model's input {shape}")
    data, preprocessing, class_names, _ = smtm_converter.check_data(
        model, data, model_flags.resolve(model), say)
    (x_fit, y_fit), (x_cal, _) = data.holdout(_HOLDOUT.value)
    x_fit, x_cal = preprocessing.apply(x_fit), preprocessing.apply(x_cal)
    memory_file = _MEMORY.value or os.path.join(out_dir, stem + ".smtm.npz")
    memory, fitted = smtm_converter.reuse_or_fit_memory(
        model, x_fit, x_cal, class_names, preprocessing, [memory_file], say, seed=_SEED.value,
        **model_flags.memory_choices())
    say(f"training the baselines' heads on {len(x_fit)} images")
    heads = baselines.train_baselines(model, memory.plan, x_fit, y_fit, pooling=memory.pooling,
                                      seed=_SEED.value)
    say(heads.summary())
    return Subject(stem, stem, path, model, memory, heads, preprocessing, data.x_test,
                   data.y_test, x_cal, memory_file if fitted else None)


def run():
    command_line.run(main)


if __name__ == "__main__":
    run()
