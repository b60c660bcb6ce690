"""Loads and runs every signature of .tflite models on an older runtime.

Runs INSIDE the old runtime's own environment (e.g. a virtualenv with
tflite-runtime==2.14.0 and numpy<2), so it imports only numpy and
tflite_runtime. `delegates/old_runtime.py` starts it and reads its JSON.

Usage: python old_runtime_check.py INPUTS.npz MODEL.tflite [MODEL.tflite ...]
  INPUTS.npz holds `<signature>/<input>` arrays; missing inputs are zeros.
Prints one JSON object: {"runtime": version, "models": {path: {"error": str} |
  {"signatures": {key: {"error": str} | {"outputs": {name: [values...]}}}}}}.
"""

import json
import sys

import numpy as np


def _run_model(path, inputs, interpreter_cls):
    try:
        interp = interpreter_cls(model_path=path, num_threads=1)
        keys = list(interp.get_signature_list())
    except Exception as e:  # pylint: disable=broad-except
        return {"error": f"{type(e).__name__}: {e}"}
    result = {}
    for key in keys:
        try:
            runner = interp.get_signature_runner(key)
            feed = {}
            for name, d in runner.get_input_details().items():
                value = inputs.get(f"{key}/{name}")
                if value is None:
                    value = np.zeros(d["shape"], d["dtype"])
                feed[name] = np.asarray(value, d["dtype"]).reshape(d["shape"])
            out = runner(**feed)
            result[key] = {"outputs": {n: np.asarray(v, np.float64).reshape(-1).tolist()
                                       for n, v in out.items()}}
        except Exception as e:  # pylint: disable=broad-except
            result[key] = {"error": f"{type(e).__name__}: {e}"}
    return {"signatures": result}


def main(argv):
    import tflite_runtime  # pylint: disable=import-outside-toplevel
    from tflite_runtime.interpreter import Interpreter  # pylint: disable=import-outside-toplevel

    with np.load(argv[1]) as f:
        inputs = {k: f[k] for k in f.files}
    report = {"runtime": getattr(tflite_runtime, "__version__", "unknown"),
              "numpy": np.__version__,
              "models": {p: _run_model(p, inputs, Interpreter) for p in argv[2:]}}
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv)
