"""Builds and briefly trains the model zoo on Fashion-MNIST.

Writes `<out_dir>/<name>.keras` for each model and `<out_dir>/zoo.json`
describing them (flavour, preprocessing, logits, input shape, parameters,
test accuracy, training seconds), then prints a table.

Example:
  python scripts/build_zoo.py --out_dir=out/zoo
  python scripts/build_zoo.py --out_dir=out/zoo_tiny --tiny
  python scripts/build_zoo.py --out_dir=out/zoo --models=vgg_sequential,inception_branchy
"""

from scripts import command_line  # First: quiets native logs before TensorFlow loads.

import os

from absl import app
from absl import flags

from smtm_tf.fitting import zoo

_OUT_DIR = flags.DEFINE_string("out_dir", None, "Folder for the models and zoo.json.",
                               required=True)
_MODELS = flags.DEFINE_list("models", None,
                            f"Entries to build (all by default), of {list(zoo.names())}.")
_TINY = flags.DEFINE_bool("tiny", False,
                          "Build the tiny versions, each trained on 256 images.")
_VERBOSE = flags.DEFINE_integer("verbose", 2, "Keras fit verbosity (0, 1 or 2).")


def main(argv):
    del argv
    names = _MODELS.value or list(zoo.names())
    unknown = [n for n in names if n not in zoo.ZOO]
    if unknown:
        raise app.UsageError(f"Unknown models {unknown}; known: {list(zoo.names())}.")
    results = zoo.build_zoo(_OUT_DIR.value, names, tiny=_TINY.value,
                            log=lambda line: print(line, flush=True),
                            verbose=_VERBOSE.value)
    print()
    print(zoo.format_table(results))
    print(f"\nWrote {os.path.join(_OUT_DIR.value, 'zoo.json')}")


if __name__ == "__main__":
    command_line.run(main)
