"""Reads and writes named entries of a .tflite's metadata table."""

from __future__ import annotations

from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils


def add_metadata(model_bytes: bytes, name: str, content: bytes) -> bytes:
    """Returns the model with `content` stored under metadata `name`.

    An existing entry of that name is replaced.
    """
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_bytes))
    entries = [m for m in (model.metadata or []) if _name(m) != name]
    buffer = schema.BufferT()
    buffer.data = bytearray(content)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = name
    entry.buffer = len(model.buffers) - 1
    model.metadata = entries + [entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def read_metadata(model_bytes: bytes, name: str) -> bytes | None:
    """Returns the content stored under metadata `name`, or None."""
    model = schema.Model.GetRootAs(model_bytes, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() is not None and entry.Name().decode() == name:
            buffer = model.Buffers(entry.Buffer())
            if buffer.Offset():  # Large models keep buffers after the flatbuffer.
                return bytes(model_bytes[buffer.Offset():buffer.Offset() + buffer.Size()])
            return buffer.DataAsNumpy().tobytes() if buffer.DataLength() else b""
    return None


def _name(entry) -> str:
    n = entry.name
    return n.decode() if isinstance(n, bytes) else n
