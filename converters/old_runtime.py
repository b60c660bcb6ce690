"""Checks that models load and run on an older TFLite runtime apps still ship.

tflite-runtime 2.14.0 needs numpy<2, so it lives in its own virtualenv; its
Python is the one passed (the command lines' `--old_runtime_python`), else
`$SMTM_OLD_RUNTIME_PYTHON`, else `.venv-tflite214/bin/python` in the
repository (CI creates it: see .ci/run). Each model's signatures run
there on the same inputs as in the current LiteRT interpreter, and the
outputs are compared. The command line is `scripts/check_old_runtime.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess

import numpy as np
from delegates import temp_files
from smtm_tf.runtime import read_descriptor

# Folders of the old-runtime check (inputs, the model under test): named by
# process, so a conversion's start removes those a killed one left
# (smtm_converter.remove_leftovers).
TEMP_PREFIX = "smtm-oldrt-"

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CHECK_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "old_runtime_check.py")
DEFAULT_PYTHON = os.path.join(_REPO, ".venv-tflite214", "bin", "python")


class OldRuntimeUnavailable(RuntimeError):
    """No Python with the old runtime was found."""


ENV_VAR = "SMTM_OLD_RUNTIME_PYTHON"


def find_python(python: str | None = None) -> str:
    """The old runtime's Python: `python`, else $SMTM_OLD_RUNTIME_PYTHON, else
    `.venv-tflite214/bin/python` in the repository.

    Raises:
      OldRuntimeUnavailable: there is none, or it cannot import tflite_runtime.
    """
    python = python or os.environ.get(ENV_VAR) or DEFAULT_PYTHON
    if not os.path.exists(python):
        raise OldRuntimeUnavailable(
            f"No old-runtime Python at {python}. Create one with: python3 -m venv "
            "VENV && VENV/bin/pip install 'numpy<2' tflite-runtime==2.14.0, and pass "
            f"--old_runtime_python=VENV/bin/python (or set {ENV_VAR}).")
    probe = subprocess.run([python, "-c", "import tflite_runtime.interpreter"],
                           capture_output=True, text=True, check=False)
    if probe.returncode:
        raise OldRuntimeUnavailable(f"{python} cannot import tflite_runtime: "
                                    f"{probe.stderr.strip()[-300:]}")
    return python


@dataclasses.dataclass(frozen=True)
class SignatureResult:
    key: str
    error: str | None  # None: loaded and ran.
    max_abs_diff: float  # Outputs vs the current LiteRT interpreter (nan when it failed).


@dataclasses.dataclass(frozen=True)
class ModelResult:
    path: str
    runtime: str
    error: str | None  # The model failed to load at all.
    signatures: tuple[SignatureResult, ...]

    @property
    def ok(self) -> bool:
        return self.error is None and all(s.error is None for s in self.signatures)

    def format(self) -> str:
        if self.error:
            return f"{os.path.basename(self.path)}: tflite-runtime {self.runtime} FAILED to load: {self.error}"
        bad = [s for s in self.signatures if s.error]
        worst = max((s.max_abs_diff for s in self.signatures if s.error is None), default=0.0)
        text = (f"{os.path.basename(self.path)}: tflite-runtime {self.runtime} ran "
                f"{len(self.signatures) - len(bad)}/{len(self.signatures)} signatures, "
                f"max diff vs current LiteRT {worst:.2e}")
        return text + "".join(f"\n  {s.key}: {s.error}" for s in bad)


def _sample_inputs(model_content: bytes, images: np.ndarray | None) -> dict[str, np.ndarray]:
    """Inputs for every signature: real images and chained activations when given."""
    from ai_edge_litert import interpreter as litert  # pylint: disable=import-outside-toplevel

    interp = litert.Interpreter(model_content=model_content, num_threads=1)
    feeds = {}
    rng = np.random.default_rng(0)
    for key in interp.get_signature_list():
        runner = interp.get_signature_runner(key)
        for name, d in runner.get_input_details().items():
            feeds[f"{key}/{name}"] = rng.uniform(0, 1, d["shape"]).astype(d["dtype"])
    try:
        descriptor = read_descriptor(model_content)
    except Exception:  # pylint: disable=broad-except
        return feeds  # Not an SMTM model: random inputs.
    a = (np.asarray(images[:1], np.float32).reshape(descriptor.full.inputs[0].shape)
         if images is not None else feeds[f"{descriptor.full.key}/image"])
    feeds[f"{descriptor.full.key}/image"] = a
    for spec in descriptor.stages:
        key = spec.signature.key
        feeds[f"{key}/activation"] = a
        feeds[f"{key}/centres"] = spec.centres
        a = interp.get_signature_runner(key)(activation=a, centres=spec.centres)["next_activation"]
    feeds[f"{descriptor.head.key}/activation"] = a
    return feeds


def check_models(paths: list[str], images: np.ndarray | None = None,
                 python: str | None = None, timeout_s: float = 600) -> list[ModelResult]:
    """Loads and runs every signature of each model on the old runtime.

    Raises:
      OldRuntimeUnavailable: no old-runtime Python.
    """
    from ai_edge_litert import interpreter as litert  # pylint: disable=import-outside-toplevel

    python = find_python(python)
    contents = {}
    for p in paths:
        with open(p, "rb") as f:
            contents[p] = f.read()
    results = []
    with temp_files.process_temp_dir(TEMP_PREFIX) as tmp:
        for i, path in enumerate(paths):
            feeds = _sample_inputs(contents[path], images)
            npz = os.path.join(tmp, f"inputs_{i}.npz")
            np.savez(npz, **feeds)
            proc = subprocess.run([python, _CHECK_SCRIPT, npz, os.path.abspath(path)],
                                  capture_output=True, text=True, timeout=timeout_s,
                                  check=False)
            if proc.returncode:
                results.append(ModelResult(path, "?", f"the check crashed (exit "
                                           f"{proc.returncode}): {proc.stderr.strip()[-500:]}",
                                           ()))
                continue
            report = json.loads(proc.stdout.strip().splitlines()[-1])
            model = report["models"][os.path.abspath(path)]
            if "error" in model:
                results.append(ModelResult(path, report["runtime"], model["error"], ()))
                continue
            interp = litert.Interpreter(model_content=contents[path], num_threads=1)
            sigs = []
            for key, r in model["signatures"].items():
                if "error" in r:
                    sigs.append(SignatureResult(key, r["error"], float("nan")))
                    continue
                runner = interp.get_signature_runner(key)
                inputs = {n: feeds[f"{key}/{n}"] for n in runner.get_input_details()}
                want = runner(**inputs)
                diff = max(float(np.max(np.abs(np.asarray(v) - np.asarray(
                    want[n], np.float64).reshape(-1)))) for n, v in r["outputs"].items())
                sigs.append(SignatureResult(key, None, diff))
            results.append(ModelResult(path, report["runtime"], None, tuple(sigs)))
    return results
