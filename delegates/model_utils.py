"""Reads and cuts .tflite flatbuffers by signature (through ai_edge_litert's schema)."""

from __future__ import annotations

from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils

_BUILTIN_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items()
                  if not k.startswith("_")}
# Ops that call other subgraphs: a signature using one cannot be cut out alone.
_CALLING_OPS = {"WHILE", "IF", "CALL_ONCE", "STABLEHLO_COMPOSITE", "CALL"}


def _read(model_content: bytes):
    return flatbuffer_utils.read_model_from_bytearray(bytearray(model_content))


def _name(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def signature_keys(model_content: bytes) -> list[str]:
    """The model's signature keys, in file order."""
    return [_name(s.signatureKey) for s in (_read(model_content).signatureDefs or [])]


def _op_name(model, op) -> str:
    code = model.operatorCodes[op.opcodeIndex]
    builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
    if builtin == schema.BuiltinOperator.CUSTOM:
        return _name(code.customCode)
    return _BUILTIN_NAMES.get(builtin, str(builtin))


def signature_ops(model_content: bytes) -> dict[str, list[str]]:
    """Signature key -> op names of its subgraph, in execution order."""
    model = _read(model_content)
    return {_name(s.signatureKey): [_op_name(model, op)
                                     for op in model.subgraphs[s.subgraphIndex].operators or []]
            for s in model.signatureDefs or []}


def single_signature_model(model_content: bytes, key: str) -> bytes:
    """The model reduced to one signature and its subgraph (weights stay shared).

    Raises:
      KeyError: no such signature.
      ValueError: the signature's subgraph calls other subgraphs.
    """
    model = _read(model_content)
    sigs = [s for s in model.signatureDefs or [] if _name(s.signatureKey) == key]
    if not sigs:
        raise KeyError(f"The model has no signature {key!r}.")
    sig = sigs[0]
    subgraph = model.subgraphs[sig.subgraphIndex]
    calling = {_op_name(model, op) for op in subgraph.operators or []} & _CALLING_OPS
    if calling:
        raise ValueError(f"Signature {key!r} calls other subgraphs ({sorted(calling)}).")
    model.subgraphs = [subgraph]
    sig.subgraphIndex = 0
    model.signatureDefs = [sig]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def tensor_types(model_content: bytes) -> dict[str, set[str]]:
    """Signature key -> the element types of its subgraph's tensors (e.g. INT8)."""
    model = _read(model_content)
    names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    return {_name(s.signatureKey): {names.get(t.type, str(t.type))
                                    for t in model.subgraphs[s.subgraphIndex].tensors or []}
            for s in model.signatureDefs or []}
