"""A TFLite delegate shared library given by path (`load_delegate`).

This is how Android and Linux builds attach a GPU (or NPU) delegate to the
interpreter: `libtensorflowlite_gpu_delegate.so` and the like. The model then
runs in the LiteRT interpreter as on the CPU backend, with the delegate
taking the ops it supports.
"""

from __future__ import annotations

from delegates import cpu
from delegates import gpu
from delegates import model_utils


class DelegateLibraryError(RuntimeError):
    """The delegate library could not be loaded, or (strict) did not take every op."""


class DelegateBackend:
    """Runs models in the LiteRT interpreter with a delegate library.

    Args:
      library: path of the delegate shared library.
      options: delegate options (strings), as the library documents them.
      num_threads: CPU threads for ops the delegate leaves to the CPU.
      strict: refuse a model unless every signature is fully delegated.
    """

    name = "delegate"

    def __init__(self, library: str, options: dict | None = None, num_threads: int = 1,
                 strict: bool = False):
        self.library = library
        self.options = dict(options or {})
        self.num_threads = num_threads
        self.strict = strict

    def _delegate(self):
        from ai_edge_litert import interpreter as litert  # pylint: disable=import-outside-toplevel
        try:
            return litert.load_delegate(self.library, self.options)
        except (ValueError, OSError) as e:
            raise DelegateLibraryError(
                f"Cannot load the delegate library {self.library!r}: {e}") from e

    def _interpreter(self, model_content: bytes):
        from ai_edge_litert import interpreter as litert  # pylint: disable=import-outside-toplevel
        with gpu.captured_native_output() as log:
            interp = litert.Interpreter(model_content=model_content,
                                        num_threads=self.num_threads,
                                        experimental_delegates=[self._delegate()])
        return interp, log[0]

    def signature_acceleration(self, model_content: bytes
                               ) -> dict[str, gpu.SignatureAcceleration]:
        """Per signature, whether the delegate took every op (from its log)."""
        report = {}
        for key in model_utils.signature_keys(model_content):
            single = model_utils.single_signature_model(model_content, key)
            # The interpreter applies the delegate while it is constructed, and
            # the delegate logs the ops it leaves to the CPU then.
            _, log = self._interpreter(single)
            ops = gpu.parse_fallback_ops(log)
            report[key] = gpu.SignatureAcceleration(key, not ops, ops)
        return report

    def load(self, model_content: bytes) -> cpu.CpuSession:
        if self.strict:
            refused = {k: r.fallback_ops for k, r in
                       self.signature_acceleration(model_content).items()
                       if not r.fully_accelerated}
            if refused:
                raise DelegateLibraryError(
                    f"Strict mode: the delegate leaves ops to the CPU: {refused}.")
        interp, _ = self._interpreter(model_content)
        return cpu.CpuSession(interp)
