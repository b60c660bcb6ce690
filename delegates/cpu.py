"""CPU backend: the LiteRT interpreter with XNNPACK, and fast signature calls."""

from __future__ import annotations

import numpy as np


class Signature:
    """One signature of a loaded model, called with as little host work as possible.

    `SignatureRunner.__call__` resizes and re-allocates every input and copies
    every output on every call; for a chain of small stage models that host
    work is a visible share of a frame. Shapes here are fixed, so this class
    allocates once and then only copies inputs in, invokes, and reads outputs.
    """

    def __init__(self, interpreter, key: str):
        runner = interpreter.get_signature_runner(key)
        self.key = key
        self._interpreter = interpreter
        # pylint: disable=protected-access
        self._wrapper = runner._interpreter_wrapper
        self._subgraph = runner._subgraph_index
        # pylint: enable=protected-access
        details = runner.get_input_details()
        self.input_details = details
        self.output_details = runner.get_output_details()
        for kind, dets in (("input", details), ("output", self.output_details)):
            for name, d in dets.items():
                if np.dtype(d["dtype"]) != np.float32:
                    # The harness copies float32 frames and centres into input
                    # views: an int8 input would silently take truncated values.
                    raise ValueError(
                        f"Signature {key!r} {kind} {name!r} is {np.dtype(d['dtype'])}; SMTM "
                        "models keep float32 signature inputs and outputs (quantized inside "
                        "the graph). Re-convert with scripts/convert.py --quantize=...")
        self._inputs = {name: d["index"] for name, d in details.items()}
        self._outputs = {name: d["index"] for name, d in self.output_details.items()}
        # One call through the public runner allocates the subgraph's tensors.
        runner(**{name: np.zeros(d["shape"], d["dtype"]) for name, d in details.items()})

    def set_input(self, name: str, value: np.ndarray) -> None:
        self._wrapper.SetTensor(self._inputs[name], value, self._subgraph)

    def invoke(self) -> None:
        self._wrapper.Invoke(self._subgraph)

    def output(self, name: str) -> np.ndarray:
        """A copy of an output."""
        return self._wrapper.GetTensor(self._outputs[name], self._subgraph)

    def output_view(self, name: str) -> np.ndarray:
        """A numpy view of an output's buffer; each invoke overwrites it in place."""
        return self._wrapper.tensor(self._interpreter, self._outputs[name], self._subgraph)

    def input_view(self, name: str) -> np.ndarray:
        """A writable numpy view of an input's buffer.

        Tensors are allocated once (shapes are fixed), so the buffers do not
        move and views stay valid for the life of the interpreter.
        """
        return self._wrapper.tensor(self._interpreter, self._inputs[name], self._subgraph)

    def __call__(self, **inputs) -> dict[str, np.ndarray]:
        for name, value in inputs.items():
            self.set_input(name, value)
        self.invoke()
        return {name: self.output(name) for name in self._outputs}


class CpuBackend:
    """Runs models with the LiteRT interpreter on the CPU (XNNPACK by default).

    Args:
      num_threads: CPU threads; 1 is often fastest for small models.
      use_xnnpack: False selects the reference kernels (for debugging).
    """

    name = "cpu"

    def __init__(self, num_threads: int = 1, use_xnnpack: bool = True):
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}.")
        self.num_threads = num_threads
        self.use_xnnpack = use_xnnpack

    def load(self, model_content: bytes) -> "CpuSession":
        from ai_edge_litert import interpreter as litert  # pylint: disable=import-outside-toplevel

        resolver = (litert.OpResolverType.AUTO if self.use_xnnpack
                    else litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        interp = litert.Interpreter(model_content=model_content,
                                    num_threads=self.num_threads,
                                    experimental_op_resolver_type=resolver)
        return CpuSession(interp)


class CpuSession:
    """A model loaded on the CPU backend."""

    def __init__(self, interpreter):
        self.interpreter = interpreter
        self._signatures = {}

    @property
    def signature_keys(self) -> list[str]:
        return list(self.interpreter.get_signature_list())

    def signature(self, key: str) -> Signature:
        if key not in self._signatures:
            if key not in self.interpreter.get_signature_list():
                raise KeyError(f"The model has no signature {key!r}; it has "
                               f"{self.signature_keys}.")
            self._signatures[key] = Signature(self.interpreter, key)
        return self._signatures[key]
