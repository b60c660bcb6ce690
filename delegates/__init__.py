"""Execution backends for SMTM models, chosen in one place.

  cpu         the LiteRT interpreter with XNNPACK (`num_threads`).
  gpu         LiteRT's CompiledModel on the GPU accelerator; ops it cannot
              take (or a machine without a GPU) fall back to the CPU.
  gpu_strict  the same, but loading fails unless every op runs on the GPU.
  a delegate library by path (`delegate_library=`): the interpreter with
              `load_delegate(path)`, as Android/Linux builds attach GPU delegates.
"""

from __future__ import annotations
from delegates.cpu import CpuBackend
from delegates.external import DelegateBackend
from delegates.gpu import GpuBackend

BACKEND_NAMES = ("cpu", "gpu", "gpu_strict")


def make_backend(name: str = "cpu", *, num_threads: int = 1, precision: str = "fp32",
                 delegate_library: str | None = None, delegate_options: dict | None = None):
    """Returns a backend by name (the `--backend` flag).

    Args:
      name: "cpu", "gpu" or "gpu_strict".
      num_threads: CPU threads (cpu, and a delegate library's CPU fallback).
      precision: GPU precision, "fp32" or "fp16".
      delegate_library: a delegate shared library; with it `name` picks
        strict ("gpu_strict") or fallback ("cpu"/"gpu") delegation.
      delegate_options: options passed to the delegate library.
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"Unknown backend {name!r}; available: {list(BACKEND_NAMES)}.")
    if delegate_library:
        return DelegateBackend(delegate_library, delegate_options, num_threads=num_threads,
                               strict=name == "gpu_strict")
    if name == "cpu":
        return CpuBackend(num_threads=num_threads)
    return GpuBackend(strict=name == "gpu_strict", precision=precision)
