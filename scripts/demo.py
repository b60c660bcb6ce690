"""The demo: demo model -> SMTM .tflite -> side-by-side speed-up table.

Loads the committed demo model (trains it first if it is missing), converts it
(reusing its committed semantic memory), and validates the .tflite on
Fashion-MNIST test streams, printing the table.

Example:
  python scripts/demo.py
"""

from scripts import command_line  # First: quiets native logs before TensorFlow loads.

import os

from absl import flags

from converters import smtm_converter
from delegates import backend_flags
from smtm_tf.fitting import data as data_lib
from smtm_tf.fitting import kerascompat
from smtm_tf.fitting import models
from smtm_tf.fitting import streams
from smtm_tf.evaluation import validation
from smtm_tf.runtime import SmtmRuntime

_MODEL = flags.DEFINE_string("model", "models/demo_resnet.keras", "Demo Keras model.")
_OUTPUT = flags.DEFINE_string("output", "out/demo_resnet.smtm.tflite", "Converted model.")
_STREAMS = flags.DEFINE_list("stream", ["video", "open_set", "zipf", "uniform"],
                            "Streams to run.")
_FRAMES = flags.DEFINE_integer("frames", 3000, "Frames per stream.")
_SEED = flags.DEFINE_integer("seed", 0, "Stream seed.")


def main(argv):
    del argv
    data = data_lib.load_fashion_mnist()
    if os.path.exists(_MODEL.value):
        model = kerascompat.load_model(_MODEL.value)
        print(f"[1/3] demo model: {_MODEL.value}")
    else:
        print(f"[1/3] {_MODEL.value} is missing: training the demo model (~16 min on 2 cores)")
        (x_fit, y_fit), (x_val, y_val) = data.holdout(0.1)
        model = models.train_demo_model(x_fit, y_fit, x_val, y_val, blocks_per_stage=2)
        models.save_model_atomic(model, _MODEL.value)
    # The demo keeps its memory beside its model: reused while its key matches.
    memory_file = smtm_converter.memory_path_for(_MODEL.value)
    print(f"[2/3] converting to {_OUTPUT.value}", flush=True)
    # Six stages over the model's eight residual blocks, at near-equal
    # compute shares (used only when the memory is fitted anew).
    memory, report = smtm_converter.convert_model(
        model, data, _OUTPUT.value, num_stages=6, memory_candidates=[memory_file],
        memory_output=memory_file, progress=lambda line: print("      " + line, flush=True))
    print(f"      {report.size_bytes} bytes; full vs Keras max diff "
          f"{report.full_max_abs_diff:.1e}, stage chain {report.chain_max_abs_diff:.1e}")
    print("      nearest-centre agreement with full per stage: "
          + ", ".join(f"{100 * a:.1f}%" for a in memory.stage_accuracy))
    runtime = SmtmRuntime.from_file(_OUTPUT.value, backend_flags.make_backend())
    rows = []
    for kind in _STREAMS.value:
        stream = streams.make_stream(kind, data.y_test, _FRAMES.value, seed=_SEED.value)
        print(f"[3/3] {kind}: {len(stream)} frames, full and SMTM interleaved "
              f"({backend_flags.describe()})", flush=True)
        rows.append((kind, validation.compare(runtime, stream.render(data.x_test),
                                              stream.labels)))
    print()
    print(validation.format_table(rows))
    overhead = validation.host_work_us(runtime, data.x_test[:500])
    print(f"host work per frame (copies, lookup, decision): {overhead:.1f} us, "
          f"{100 * overhead / rows[0][1].full.mean_us:.1f}% of full")
    print()
    for kind, c in rows:
        print(f"{kind}: {c.speedup:.2f}x faster than full, top-1 accuracy "
              f"{-c.accuracy_drop:+.2f} points vs full")


def run():
    command_line.run(main)


if __name__ == "__main__":
    run()
