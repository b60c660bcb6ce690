"""Runs every zoo model through the converter and the runtime, and prints the table.

Example:
  python scripts/build_zoo.py --out_dir=out/zoo          # train the zoo (once)
  python scripts/zoo.py --zoo_dir=out/zoo --markdown=docs/model_zoo.md \
      --json=out/zoo/results.json

Each model is converted the default way plus the preprocessing flag its zoo
entry states (and the memory flags given here, e.g. --pooling, for an ablation), then measured on `video`, `uniform` and `object` streams of
Fashion-MNIST test images (speed-up and agreement with `full`), converted to
int8 and float16, checked on tflite-runtime 2.14 (when its virtualenv exists)
and through the strict GPU gate (when a GPU or software Vulkan is present).
With --native_cli=native/build/smtm_cli the native runtime runs the same video
frames (`smtm_cli bench`) and its speed-up and host work get a column.
"""

from scripts import command_line  # First: quiets native logs before TensorFlow loads.

import json
import os
import platform
import sys
import time

from absl import app
from absl import flags

from smtm_tf.fitting import data as data_lib
from smtm_tf.evaluation import native_bench
from smtm_tf.evaluation import zoo_benchmark
from scripts import model_flags

_ZOO_DIR = flags.DEFINE_string("zoo_dir", None, "Folder written by scripts/build_zoo.py "
                               "(zoo.json and the .keras files).", required=True)
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the .tflite files and memories go "
                               "(default: <zoo_dir>/converted).")
_MODELS = flags.DEFINE_list("models", None, "Zoo models to run (default: all in zoo.json).")
_FRAMES = flags.DEFINE_integer("frames", 1500, "Frames per stream.")
_MARKDOWN = flags.DEFINE_string("markdown", None, "Write the table here (markdown).")
_JSON = flags.DEFINE_string("json", None, "Write the figures here (JSON).")


def main(argv):
    del argv
    stated = [f for f in model_flags.given()
              if f in ("--preprocessing", "--input_scale", "--input_offset")]
    if stated:
        raise app.UsageError(f"{', '.join(stated)}: each zoo entry states its own "
                             "preprocessing in zoo.json; drop the flag.")
    if command_line.NATIVE_CLI.value:
        native_bench.require_cli(command_line.NATIVE_CLI.value)  # Before the long run.
    index_path = os.path.join(_ZOO_DIR.value, "zoo.json")
    if not os.path.isfile(index_path):
        print(f"error: {index_path} not found; build the zoo first: python3 "
              f"scripts/build_zoo.py --out_dir={_ZOO_DIR.value}", file=sys.stderr)
        sys.exit(1)
    with open(index_path) as f:
        index = json.load(f)
    entries = index["models"] if isinstance(index, dict) else index
    if _MODELS.value:
        unknown = set(_MODELS.value) - {e["name"] for e in entries}
        if unknown:
            raise app.UsageError(f"--models: {sorted(unknown)} are not in {index_path}.")
        entries = [e for e in entries if e["name"] in _MODELS.value]
    out_dir = _OUT_DIR.value or os.path.join(_ZOO_DIR.value, "converted")
    os.makedirs(out_dir, exist_ok=True)
    data = data_lib.load_fashion_mnist()
    rows, scale = [], []
    t0 = time.time()
    for i, entry in enumerate(entries):
        print(f"== {i + 1}/{len(entries)} {entry['name']} ({time.time() - t0:.0f} s)",
              flush=True)
        path = os.path.join(_ZOO_DIR.value, entry["file"])
        say = lambda line: print(line, flush=True)  # noqa: E731
        if entry.get("trained", True):
            rows.append(zoo_benchmark.evaluate(
                entry["name"], path, entry["preprocessing"], data, out_dir,
                frames=_FRAMES.value, progress=say,
                old_runtime_python=command_line.OLD_RUNTIME_PYTHON.value,
                memory_choices=model_flags.memory_choices(),
                native_cli=command_line.NATIVE_CLI.value))
        else:  # An untrained many-class model: the scale check.
            scale.append(zoo_benchmark.evaluate_scale(
                entry["name"], path, entry["preprocessing"], data, out_dir, progress=say))
    print()
    print(zoo_benchmark.format_markdown(rows))
    for row in scale:
        print(row.format())
    header = (f"Produced by `python3 scripts/zoo.py {' '.join(sys.argv[1:])}` on "
              f"{platform.machine()}, {os.cpu_count()} CPUs, "
              f"XNNPACK 1 thread, in {time.time() - t0:.0f} s. Speed-up and agreement with "
              "`full` at the default budget (1 point), streams of Fashion-MNIST test "
              "images brought to each model's input.\n\n")
    zoo_benchmark.write_results(rows, scale, _MARKDOWN.value, _JSON.value, header)


def run():
    command_line.run(main)


if __name__ == "__main__":
    run()
