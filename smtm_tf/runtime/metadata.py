"""Reads and writes named entries of a .tflite's metadata table."""

from __future__ import annotations

import hashlib

from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils


def add_metadata(model_bytes: bytes, name: str, content: bytes) -> bytes:
    """Returns the model with `content` stored under metadata `name`.

    An existing entry of that name is replaced.
    """
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_bytes))
    entries = [m for m in (model.metadata or []) if _name(m) != name]
    old = [m for m in (model.metadata or []) if _name(m) == name]
    buffer = schema.BufferT()
    buffer.data = bytearray(content)
    if old:
        # The entry's buffer is reused: an orphaned old one would stay in the
        # file (and in its content digest).
        model.buffers[old[0].buffer] = buffer
        entry = old[0]
    else:
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
            return _buffer(model, model_bytes, entry.Buffer())
    return None


# The SHA-256 of every buffer (weights, constants and other metadata, the
# descriptor included) but its own, as hex: `add_digest` writes it last.
DIGEST_NAME = "smtm_digest"


def content_digest(model_bytes: bytes) -> str:
    """SHA-256 over the model's buffers (the digest entry's excepted), in order.

    It covers the weights and the descriptor, not the graph's structure
    (tensor shapes, operators), which the interpreter and the runtime's
    checks against the descriptor refuse when it is damaged.
    """
    model = schema.Model.GetRootAs(model_bytes, 0)
    skip = {model.Metadata(i).Buffer() for i in range(model.MetadataLength())
            if model.Metadata(i).Name() == DIGEST_NAME.encode()}
    digest = hashlib.sha256()
    for i in range(model.BuffersLength()):
        if i not in skip:
            data = _buffer(model, model_bytes, i)
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    return digest.hexdigest()


def add_digest(model_bytes: bytes) -> bytes:
    """Returns the model with its `content_digest` stored under `DIGEST_NAME`."""
    return add_metadata(model_bytes, DIGEST_NAME, content_digest(model_bytes).encode())


def _buffer(model, model_bytes: bytes, index: int) -> bytes:
    buffer = model.Buffers(index)
    if buffer.Offset():  # Large models keep buffers after the flatbuffer.
        return bytes(model_bytes[buffer.Offset():buffer.Offset() + buffer.Size()])
    return buffer.DataAsNumpy().tobytes() if buffer.DataLength() else b""


def _name(entry) -> str:
    n = entry.name
    return n.decode() if isinstance(n, bytes) else n
