"""Writes golden decision traces: the Python runtime's class and exit stage per frame.

Example:
  python scripts/golden_traces.py --output=tests/data/golden_traces.npz

For each demo model (its committed .keras and semantic memory, converted
here) and every stream kind, a seeded stream of Fashion-MNIST test frames is
run through `SmtmRuntime.classify`; the file records each stream's image
indices, seed and the (class, exit stage) of every frame. Any runtime that
follows the descriptor's contract must reproduce them (`tests/test_golden.py`).
"""

from scripts import command_line  # First: quiets native logs before TensorFlow loads.


from absl import flags
import numpy as np

from smtm_tf.fitting import data as data_lib
from smtm_tf.runtime import io_utils
from smtm_tf.evaluation import golden
from smtm_tf.runtime import SmtmRuntime

_OUTPUT = flags.DEFINE_string("output", None, "Where to write the traces (.npz).",
                              required=True)
_MODELS = flags.DEFINE_list("models", list(golden.DEMO_MODELS),
                            "Demo models under models/.")
_FRAMES = flags.DEFINE_integer("frames", 300, "Frames per stream.")
_SEED = flags.DEFINE_integer("seed", 7, "Stream seed.")


def main(argv):
    del argv
    data = data_lib.load_fashion_mnist()
    arrays = {"frames": np.array(_FRAMES.value), "seed": np.array(_SEED.value)}
    for name in _MODELS.value:
        print(f"{name}: converting with its committed memory", flush=True)
        runtime = SmtmRuntime(golden.convert_demo(name, data))
        for kind, decisions in golden.decision_traces(runtime, data, _FRAMES.value,
                                                      _SEED.value).items():
            arrays[f"{name}/{kind}"] = decisions
            print(f"{name} {kind}: exits per stage and head "
                  f"{np.bincount(decisions[:, 1], minlength=runtime.num_stages + 1)}",
                  flush=True)
    io_utils.write_npz_atomic(_OUTPUT.value, arrays, compressed=True)
    print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
    command_line.run(main)
