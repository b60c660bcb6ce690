"""The `--backend` flags shared by the command lines (import defines them).

  --backend=cpu|gpu|gpu_strict   (see `delegates.make_backend`)
  --threads=N                    CPU threads
  --gpu_precision=fp32|fp16      GPU kernel precision
  --delegate_library=PATH        a TFLite delegate shared library (load_delegate)
  --delegate_options=k=v,...     options for that library

Example:
  from delegates import backend_flags
  runtime = SmtmRuntime.from_file(path, backend_flags.make_backend())
"""

from absl import flags

from delegates import BACKEND_NAMES
from delegates import make_backend as _make_backend

BACKEND = flags.DEFINE_enum(
    "backend", "cpu", list(BACKEND_NAMES),
    "cpu: XNNPACK. gpu: LiteRT's GPU accelerator, unsupported ops (or no GPU) fall back to "
    "the CPU. gpu_strict: every op on the GPU or loading fails.")
THREADS = flags.DEFINE_integer("threads", 1, "CPU threads.")
GPU_PRECISION = flags.DEFINE_enum("gpu_precision", "fp32", ["fp32", "fp16"],
                                  "GPU kernel precision.")
DELEGATE_LIBRARY = flags.DEFINE_string(
    "delegate_library", None, "A TFLite delegate shared library to load by path (as Android "
    "and Linux builds attach GPU delegates); --backend=gpu_strict refuses models it does not "
    "fully take.")
DELEGATE_OPTIONS = flags.DEFINE_list("delegate_options", [],
                                     "key=value options for --delegate_library.")


def make_backend():
    """The backend the flags describe."""
    options = dict(o.split("=", 1) for o in DELEGATE_OPTIONS.value)
    return _make_backend(BACKEND.value, num_threads=THREADS.value,
                         precision=GPU_PRECISION.value,
                         delegate_library=DELEGATE_LIBRARY.value, delegate_options=options)


def describe() -> str:
    """A short label for tables: the backend and its settings."""
    if DELEGATE_LIBRARY.value:
        return f"delegate {DELEGATE_LIBRARY.value} ({BACKEND.value})"
    if BACKEND.value == "cpu":
        return f"XNNPACK, {THREADS.value} thread(s)"
    return f"{BACKEND.value}, {GPU_PRECISION.value}"
