"""Writes golden decision traces: the Python runtime's class and exit stage per frame.

Example:
  python scripts/golden_traces.py --output=tests/data/golden_traces.npz

For each demo model (its committed .keras and semantic memory, converted
here) and every stream kind, a seeded stream of Fashion-MNIST test frames is
run through `SmtmRuntime.classify`; the file records each stream's image
indices, seed and the (class, exit stage) of every frame. Any runtime that
follows the descriptor's contract must reproduce them (`tests/test_golden.py`).
"""

import io
import os
import sys
import tempfile

from absl import app
from absl import flags
import numpy as np

from converters import smtm_converter
from smtm_tf.fitting import data as data_lib
from smtm_tf.runtime import io_utils
from smtm_tf.fitting import kerascompat
from smtm_tf.fitting import streams as streams_lib
from smtm_tf.runtime import SmtmRuntime

_OUTPUT = flags.DEFINE_string("output", None, "Where to write the traces (.npz).",
                              required=True)
_MODELS = flags.DEFINE_list("models", ["demo_resnet", "demo_mobilenet_v2", "demo_vgg"],
                            "Demo models under models/.")
_FRAMES = flags.DEFINE_integer("frames", 300, "Frames per stream.")
_SEED = flags.DEFINE_integer("seed", 7, "Stream seed.")


def main(argv):
    del argv
    data = data_lib.load_fashion_mnist()
    arrays = {}
    for name in _MODELS.value:
        path = os.path.join("models", name + ".keras")
        model = kerascompat.load_model(path)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, name + ".tflite")
            smtm_converter.convert_model(
                model, data, out, memory_candidates=[smtm_converter.memory_path_for(path)],
                gpu_check=False, old_runtime_check=False, accuracy_check=False)
            with open(out, "rb") as f:
                runtime = SmtmRuntime(f.read())
        for kind in streams_lib.StreamKind:
            stream = streams_lib.make_stream(kind, data.y_test, _FRAMES.value, seed=_SEED.value)
            frames = stream.render(data.x_test)
            runtime.reset_cache()
            decisions = np.array([[r.class_id, r.exit_stage]
                                  for r in map(runtime.classify, frames)], np.int32)
            arrays[f"{name}/{kind.value}"] = decisions
            print(f"{name} {kind.value}: exits per stage "
                  f"{np.bincount(decisions[:, 1], minlength=runtime.num_stages + 1)}",
                  flush=True)
    arrays["frames"] = np.array(_FRAMES.value)
    arrays["seed"] = np.array(_SEED.value)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    io_utils.write_bytes_atomic(_OUTPUT.value, buf.getvalue())
    print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
    sys.exit(app.run(main))
