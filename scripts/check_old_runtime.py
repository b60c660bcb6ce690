"""Does tflite-runtime 2.14 (what older apps ship) load and run each model?

Example:
  python scripts/check_old_runtime.py --old_runtime_python=VENV/bin/python \
      model.smtm.tflite model.int8.smtm.tflite

Every signature of each model runs there on the same inputs as in the current
LiteRT interpreter (real chained activations for SMTM models), and the outputs
are compared (`converters.old_runtime`). The old runtime needs numpy<2, so it
lives in its own virtualenv: `python3 -m venv VENV && VENV/bin/pip install
'numpy<2' tflite-runtime==2.14.0`; its Python is `--old_runtime_python`, else
$SMTM_OLD_RUNTIME_PYTHON, else `.venv-tflite214/bin/python` in the repository.
Exits 1 unless every model loads and runs.
"""

from scripts import command_line  # First: quiets native logs before TensorFlow loads.

import os
import sys

from absl import app

from converters import old_runtime


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("Name the .tflite files to check.")
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"No such model file: {p}")
    results = old_runtime.check_models(paths, python=command_line.OLD_RUNTIME_PYTHON.value)
    for r in results:
        print(r.format())
    if not all(r.ok for r in results):
        sys.exit(1)


def run():
    command_line.run(main)


if __name__ == "__main__":
    run()
