"""Compares exit metrics and calibrations on a converted model.

For each budget (points of agreement with the full model) every rule is
calibrated on the same held-out frames and measured with the harness on the
same test streams, side by side with `full`.

Example:
  python scripts/compare_exit_rules.py --model=models/demo_resnet.keras \
      --tflite=out/demo_resnet.smtm.tflite
"""

from scripts import command_line  # First: quiets native logs before TensorFlow loads.

from absl import flags

from converters import smtm_converter
from delegates import make_backend
from smtm_tf.fitting import data as data_lib
from smtm_tf.runtime import io_utils
from smtm_tf.fitting import kerascompat
from smtm_tf.fitting import memory as memory_lib
from smtm_tf.evaluation import rule_comparison
from smtm_tf.fitting import streams as streams_lib
from smtm_tf.runtime import SmtmRuntime

_MODEL = flags.DEFINE_string("model", "models/demo_resnet.keras", "The Keras model.")
_TFLITE = flags.DEFINE_string("tflite", "out/demo_resnet.smtm.tflite",
                              "Its SMTM .tflite (converted with the memory beside the model).")
_DATA = flags.DEFINE_string("data", "fashion_mnist", "Data (see convert.py).")
_BUDGETS = flags.DEFINE_list("budgets", ["0.5", "1", "2"], "Budgets in points.")
_STREAMS = flags.DEFINE_list("stream", ["video", "zipf", "uniform"], "Streams.")
_FRAMES = flags.DEFINE_integer("frames", 2000, "Frames per stream.")
_HOLDOUT = flags.DEFINE_float("holdout", 0.1, "Calibration share of the train split.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the table (markdown) here.")


def main(argv):
    del argv
    model = kerascompat.load_model(_MODEL.value)
    memory = memory_lib.SemanticMemory.load(smtm_converter.memory_path_for(_MODEL.value))
    data = data_lib.load_data(_DATA.value, image_size=tuple(model.inputs[0].shape[1:3]),
                              channels=int(model.inputs[0].shape[-1]))
    (x_fit, _), (x_cal, _) = data.holdout(_HOLDOUT.value)
    budgets = [float(b) for b in _BUDGETS.value]
    print(f"calibrating {len(rule_comparison.RULES)} rules x {len(budgets)} budgets ...",
          flush=True)
    rules, (train, calib) = rule_comparison.fit_rules(model, memory, x_fit, x_cal, budgets)
    runtime = SmtmRuntime.from_file(_TFLITE.value, make_backend("cpu", num_threads=1))
    streams = {k: streams_lib.make_stream(k, data.y_test, _FRAMES.value, seed=0)
               for k in _STREAMS.value}
    print(f"measuring on {', '.join(streams)} ({_FRAMES.value} frames each) ...", flush=True)
    results = rule_comparison.measure_rules(runtime, rules, streams, data.x_test, data.y_test)
    table = rule_comparison.format_rule_table(results, memory.plan.stage_costs)
    softmax = rule_comparison.softmax_head_agreement(train, calib)
    lines = [table, "", "Agreement with the full model per stage (calibration frames):", "",
             "| stage | " + " | ".join(f"s{s}" for s in range(len(softmax))) + " |",
             "|---|" + "---|" * len(softmax),
             "| nearest centre | " + " | ".join(f"{100 * a:.1f}%"
                                               for a in memory.stage_accuracy) + " |",
             "| softmax head, same features | " + " | ".join(f"{100 * a:.1f}%"
                                                             for a in softmax) + " |"]
    rule, policy = rules[("layer-aware + cache", 1.0)] if ("layer-aware + cache",
                                                            1.0) in rules else (None, None)
    if rule is not None and "video" in streams:
        lines += ["", "Lock-in guard: the budget-1 cached rule on `video`, with early exits "
                  "counting w in the cache (1 = like a full-model answer):", "",
                  "| w | speed-up | top-1 vs full | agree w/ full |", "|---|---|---|---|"]
        for w, c in rule_comparison.lock_in_study(runtime, rule, policy, streams["video"],
                                                  data.x_test, data.y_test):
            lines.append(f"| {w:g} | {c.speedup:.2f}x | {-c.accuracy_drop:+.2f} | "
                         f"{100 * c.smtm.agreement:.2f}% |")
    table = "\n".join(lines)
    print(table)
    if _OUTPUT.value:
        io_utils.write_bytes_atomic(_OUTPUT.value, (table + "\n").encode())


def run():
    command_line.run(main)


if __name__ == "__main__":
    run()
