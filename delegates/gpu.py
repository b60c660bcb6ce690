"""GPU backend: LiteRT's CompiledModel with the GPU accelerator (WebGPU).

On a machine without a GPU the same accelerator runs on Mesa's software
Vulkan driver (lavapipe); see README.md for the setup. That gives real op
support and numerics, not phone timings.

Two modes:
  strict: every op of every signature must run on the GPU; loading fails
    with `GpuFallbackError` (naming the ops) otherwise.
  fallback: ops the GPU cannot take run on the CPU, and when no GPU can be
    opened at all the whole model runs on the CPU (`session.on_gpu` is False).

A session honours the harness's contract (`delegates.cpu.Signature`): inputs
live in host arrays (`input_view`) and are uploaded at every `invoke`;
outputs are downloaded into host arrays (`output_view`) before `invoke`
returns, which also makes `invoke` wait for the GPU to finish.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import enum
import glob
import json
import os
import re
import sys
import tempfile
import weakref

import numpy as np

from delegates import model_utils
from delegates import temp_files


class Precision(str, enum.Enum):
    """Arithmetic precision of the GPU kernels."""

    FP32 = "fp32"  # GpuOptions(enforce_f32=True).
    FP16 = "fp16"  # The accelerator's default.


class GpuUnavailableError(RuntimeError):
    """No GPU (or software Vulkan driver) could be opened."""


class GpuFallbackError(RuntimeError):
    """Strict GPU mode, and some ops would fall back to the CPU.

    Attributes:
      fallback_ops: the op names the GPU accelerator refused.
    """

    def __init__(self, message: str, fallback_ops: tuple[str, ...] = ()):
        super().__init__(message)
        self.fallback_ops = fallback_ops


# What the accelerator prints (to the process's stderr, from native code) for
# ops it refuses, and when no adapter can be opened.
_UNSUPPORTED_RE = re.compile(r"^(?:ERROR: )?([A-Z][A-Z0-9_]+): (.+)$", re.MULTILINE)
_UNSUPPORTED_HEADER = "are not supported by GPU delegate"
_NO_GPU_MARKERS = ("Failed to initialize WebGPU environment", "No adapters found",
                   "Failed to get or create delegate WebGPU environment")


@contextlib.contextmanager
def captured_native_output():
    """Captures what native code writes to fds 1 and 2 (the accelerator's
    messages; the OpenCL loader's goes to stdout, into a command line's results).

    Yields a list that holds the captured text after the block.
    """
    captured: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(tmp.fileno(), 1)
            os.dup2(tmp.fileno(), 2)
            yield captured
        finally:
            for fd, old in zip((1, 2), saved):
                os.dup2(old, fd)
                os.close(old)
            tmp.seek(0)
            captured.append(tmp.read().decode(errors="replace"))


def parse_fallback_ops(log: str) -> tuple[str, ...]:
    """The op names listed as unsupported in the accelerator's log, in order."""
    ops: list[str] = []
    for block in log.split(_UNSUPPORTED_HEADER)[1:]:
        for line in block.splitlines()[1:]:
            m = _UNSUPPORTED_RE.match(line.strip())
            if not m:
                break
            if m.group(1) not in ops:
                ops.append(m.group(1))
    return tuple(ops)


_ICD_DIRS = ("/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/usr/local/share/vulkan/icd.d")
_bound_drivers: list = []


def _bind_software_vulkan() -> None:
    """Loads Mesa's lavapipe with its own LLVM bound first (RTLD_DEEPBIND).

    lavapipe compiles shaders with LLVM. TensorFlow's libtensorflow_framework
    exports its own LLVM's symbols into the process; when the Vulkan loader
    later opens lavapipe, lavapipe binds to TensorFlow's LLVM and crashes in
    `vkCreateDevice` (measured: any process that imported tensorflow). Loading
    the driver first with RTLD_DEEPBIND makes it use the LLVM it was built
    with; the loader then reuses that handle. Idempotent; a no-op without lavapipe.
    """
    if _bound_drivers:
        return
    for directory in _ICD_DIRS:
        for icd in sorted(glob.glob(os.path.join(directory, "lvp_icd*.json"))):
            try:
                with open(icd, encoding="utf-8") as f:
                    library = json.load(f)["ICD"]["library_path"]
                _bound_drivers.append(ctypes.CDLL(
                    library, mode=os.RTLD_NOW | os.RTLD_LOCAL | os.RTLD_DEEPBIND))
                return
            except (OSError, KeyError, ValueError):
                continue
    _bound_drivers.append(None)


def _options(strict: bool, precision: Precision):
    from ai_edge_litert.hardware_accelerator import HardwareAccelerator  # pylint: disable=import-outside-toplevel
    from ai_edge_litert.options import CpuOptions, GpuOptions, Options  # pylint: disable=import-outside-toplevel

    accel = HardwareAccelerator.GPU
    if not strict:
        accel |= HardwareAccelerator.CPU
    return Options(hardware_accelerators=accel,
                   cpu_options=CpuOptions(num_threads=1),
                   gpu_options=GpuOptions(enforce_f32=precision == Precision.FP32))


def compile_model(model_content: bytes, strict: bool = True,
                  precision: Precision = Precision.FP32):
    """Compiles a model for the GPU accelerator.

    Returns:
      (CompiledModel, path of the temporary model file, captured log). The
      caller removes the file when done with the model.

    Raises:
      GpuUnavailableError: no GPU adapter (install the Vulkan driver).
      GpuFallbackError: strict, and ops fall back to the CPU.
    """
    from ai_edge_litert import compiled_model  # pylint: disable=import-outside-toplevel

    precision = Precision(precision)
    _bind_software_vulkan()
    path = temp_files.model_file(model_content)
    error = None
    with captured_native_output() as log:
        try:
            model = compiled_model.CompiledModel.from_file(
                path, options=_options(strict, precision))
        except RuntimeError as e:
            error, model = e, None
    text = log[0]
    if model is not None:
        return model, path, text
    os.remove(path)
    if any(m in text or m in str(error) for m in _NO_GPU_MARKERS):
        raise GpuUnavailableError(
            "No GPU adapter could be opened by LiteRT's GPU accelerator. Without a "
            "GPU, install Mesa's software Vulkan driver (>= 25, see README.md: "
            "'GPU and quantized models').") from error
    ops = parse_fallback_ops(text)
    if ops or "not accelerated" in str(error):
        raise GpuFallbackError(
            "Strict GPU mode: ops not supported by the GPU accelerator: "
            f"{', '.join(ops) or 'unknown'}.", ops) from error
    raise RuntimeError(f"GPU compilation failed: {error}\n{text[-2000:]}") from error


@dataclasses.dataclass(frozen=True)
class SignatureAcceleration:
    """Whether one signature runs wholly on the GPU, and what falls back."""

    key: str
    fully_accelerated: bool
    fallback_ops: tuple[str, ...]


def signature_acceleration(model_content: bytes,
                           precision: Precision = Precision.FP32
                           ) -> dict[str, SignatureAcceleration]:
    """Compiles every signature on its own, strictly on the GPU, and reports.

    A whole multi-signature model fails strict compilation as one piece, so
    each signature is cut out into a one-signature model first.

    Raises:
      GpuUnavailableError: no GPU adapter.
    """
    report = {}
    for key in model_utils.signature_keys(model_content):
        single = model_utils.single_signature_model(model_content, key)
        try:
            model, path, _ = compile_model(single, strict=True, precision=precision)
        except GpuFallbackError as e:
            report[key] = SignatureAcceleration(key, False, e.fallback_ops)
            continue
        try:
            report[key] = SignatureAcceleration(key, bool(model.is_fully_accelerated()), ())
        finally:
            del model
            os.remove(path)
    return report


class GpuSignature:
    """One signature of a GPU session, with host-side input and output arrays."""

    def __init__(self, model, key: str):
        self.key = key
        self._model = model
        self._run = model.run_by_name
        in_details = model.get_input_tensor_details(key)
        out_details = model.get_output_tensor_details(key)
        for kind, details in (("input", in_details), ("output", out_details)):
            for name, d in details.items():
                if np.dtype(d.get("dtype", np.float32)) != np.float32:
                    raise ValueError(
                        f"Signature {key!r} {kind} {name!r} is {d['dtype']}; SMTM models keep "
                        "float32 signature inputs and outputs (quantized inside the graph).")
        self.input_details = in_details
        self.output_details = out_details
        self._in_host = {n: np.zeros(tuple(d["shape"]), np.float32) for n, d in in_details.items()}
        self._out_host = {n: np.zeros(tuple(d["shape"]), np.float32)
                          for n, d in out_details.items()}
        self._in_buf = {n: model.create_input_buffer_by_name(key, n) for n in in_details}
        self._out_buf = {n: model.create_output_buffer_by_name(key, n) for n in out_details}
        self._uploads = [(self._in_buf[n].write, a) for n, a in self._in_host.items()]
        self._downloads = [(self._out_buf[n].read, a, a.size) for n, a in self._out_host.items()]

    def set_input(self, name: str, value: np.ndarray) -> None:
        np.copyto(self._in_host[name], np.reshape(value, self._in_host[name].shape))

    def invoke(self) -> None:
        for write, host in self._uploads:
            write(host)
        self._run(self.key, self._in_buf, self._out_buf)
        # Reading the outputs waits for the GPU: a GPU-resident run returns early.
        for read, host, n in self._downloads:
            np.copyto(host.reshape(-1), read(n, np.float32))

    def output(self, name: str) -> np.ndarray:
        return self._out_host[name].copy()

    def output_view(self, name: str) -> np.ndarray:
        """The host array that holds this output after each invoke."""
        return self._out_host[name]

    def input_view(self, name: str) -> np.ndarray:
        """The host array uploaded to this input at each invoke."""
        return self._in_host[name]

    def __call__(self, **inputs) -> dict[str, np.ndarray]:
        for name, value in inputs.items():
            self.set_input(name, value)
        self.invoke()
        return {name: self.output(name) for name in self._out_host}


class GpuBackend:
    """Runs models with LiteRT's CompiledModel on the GPU accelerator.

    Args:
      strict: fail to load unless every op runs on the GPU.
      precision: `fp32` (enforce float32 kernels) or `fp16` (the default of
        mobile GPUs: faster, similarities off by ~1e-3).
    """

    def __init__(self, strict: bool = True, precision: Precision | str = Precision.FP32):
        self.strict = strict
        self.precision = Precision(precision)
        self.name = "gpu_strict" if strict else "gpu"

    def load(self, model_content: bytes) -> "GpuSession":
        try:
            model, path, log = compile_model(model_content, self.strict, self.precision)
        except GpuUnavailableError:
            if self.strict:
                raise
            return self._load_cpu(model_content)
        return GpuSession(model, path, on_gpu=True, log=log)

    def _load_cpu(self, model_content: bytes) -> "GpuSession":
        from ai_edge_litert import compiled_model  # pylint: disable=import-outside-toplevel
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator  # pylint: disable=import-outside-toplevel

        path = temp_files.model_file(model_content)
        model = compiled_model.CompiledModel.from_file(
            path, hardware_accel=HardwareAccelerator.CPU)
        return GpuSession(model, path, on_gpu=False, log="")


class GpuSession:
    """A model compiled for the GPU accelerator (or its CPU fallback)."""

    def __init__(self, model, path: str, on_gpu: bool, log: str):
        self.model = model
        self.on_gpu = on_gpu
        self.fallback_ops = parse_fallback_ops(log)
        self._signatures = {}
        # The model file is removed when the session goes (CompiledModel reads it lazily).
        self._cleanup = weakref.finalize(self, _remove_quietly, path)

    @property
    def fully_accelerated(self) -> bool:
        return self.on_gpu and bool(self.model.is_fully_accelerated())

    @property
    def signature_keys(self) -> list[str]:
        return list(self.model.get_signature_list())

    def signature(self, key: str) -> GpuSignature:
        if key not in self._signatures:
            if key not in self.model.get_signature_list():
                raise KeyError(f"The model has no signature {key!r}; it has "
                               f"{self.signature_keys}.")
            self._signatures[key] = GpuSignature(self.model, key)
        return self._signatures[key]



def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)
