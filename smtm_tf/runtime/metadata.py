"""Reads and writes named entries of a .tflite's metadata table."""

from __future__ import annotations

import hashlib

import flatbuffers

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


# The integrity record, written last by `add_digest`: "sha256-file:" and the
# SHA-256 of the whole file but the record's own bytes (see `file_digest`).
# Files converted earlier hold the bare hex SHA-256 of their buffers
# (`content_digest`) and are checked that way; files without a record load
# unchecked.
DIGEST_NAME = "smtm_digest"
DIGEST_PREFIX = "sha256-file:"
_PLACEHOLDER = (DIGEST_PREFIX + "0" * 64).encode()


def content_digest(model_bytes: bytes) -> str:
    """SHA-256 over the model's buffers (the digest entry's excepted), in order.

    The record of files converted before `file_digest`: it covers the weights
    and the descriptor, not the graph's structure (tensors, operators).
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


def file_digest(model_bytes: bytes, region: tuple[int, int]) -> str:
    """SHA-256 of every byte of the file but `region` (the record's own bytes),
    with the region's place and length, as hex.

    Weights, descriptor and graph structure (tensors, operators, signatures,
    padding, anything appended) are all covered: a change anywhere but in
    the record changes this; a change in the record changes the record.
    """
    start, end = region
    digest = hashlib.sha256()
    digest.update(start.to_bytes(8, "little") + (end - start).to_bytes(8, "little"))
    digest.update(memoryview(model_bytes)[:start])
    digest.update(memoryview(model_bytes)[end:])
    return digest.hexdigest()


def _digest_records(model_bytes: bytes) -> list[tuple[bytes, tuple[int, int]]]:
    """(content, file region) of each metadata entry named DIGEST_NAME or
    holding a "sha256-file:" record (so a damaged name does not hide one)."""
    model = schema.Model.GetRootAs(model_bytes, 0)
    records = []
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        region = _buffer_region(model, entry.Buffer())
        content = bytes(model_bytes[region[0]:region[1]])
        if entry.Name() == DIGEST_NAME.encode() or content.startswith(DIGEST_PREFIX.encode()):
            records.append((content, region))
    return records


def check_digest(model_bytes: bytes) -> str:
    """"ok", "absent" (no record: an older file) or "mismatch" (damaged).

    Raises what the flatbuffer reader raises for bytes that do not parse.
    """
    records = _digest_records(model_bytes)
    if not records:
        return "absent"
    if len(records) > 1:
        return "mismatch"
    ((content, region),) = records
    text = content.decode("ascii", errors="replace")
    if text.startswith(DIGEST_PREFIX):
        ok = text[len(DIGEST_PREFIX):] == file_digest(model_bytes, region)
    else:  # An earlier file's record: its buffers only.
        ok = text == content_digest(model_bytes)
    return "ok" if ok else "mismatch"


def record_kind(model_bytes: bytes) -> str:
    """Which integrity record the file carries: "file" (the whole file),
    "buffers" (an earlier file: weights and descriptor only) or "none"."""
    record = read_metadata(model_bytes, DIGEST_NAME)
    if record is None:
        return "none"
    return "file" if record.startswith(DIGEST_PREFIX.encode()) else "buffers"


INTEGRITY_NOTES = {
    "file": "the whole file matches its SHA-256 record",
    "buffers": "weights and descriptor match their SHA-256 record (an earlier file: its "
               "graph's structure is not covered; convert it again to cover it)",
    "none": "NOT CHECKED: the file has no integrity record (converted before records "
            "existed; convert it again to get one)",
}


def add_digest(model_bytes: bytes) -> bytes:
    """Returns the model with its integrity record stored under `DIGEST_NAME`.

    The entry is written twice through the flatbuffer writer: with a
    placeholder of the record's length, whose file digest is then stored in
    its place (same length, so the same layout; checked).
    """
    staged = add_metadata(model_bytes, DIGEST_NAME, _PLACEHOLDER)
    ((_, region),) = _digest_records(staged)
    value = DIGEST_PREFIX + file_digest(staged, region)
    final = add_metadata(staged, DIGEST_NAME, value.encode())
    if _digest_records(final) != [(value.encode(), region)] or check_digest(final) != "ok":
        raise RuntimeError("Writing the integrity record moved the model's layout.")
    return final


def buffer_regions(model_bytes: bytes) -> list[tuple[int, int]]:
    """Where each buffer's bytes (weights, constants, metadata) lie: [start, end)."""
    model = schema.Model.GetRootAs(model_bytes, 0)
    return [_buffer_region(model, i) for i in range(model.BuffersLength())]


def _buffer_region(model, index: int) -> tuple[int, int]:
    """Where buffer `index`'s bytes lie in the file: [start, end)."""
    buffer = model.Buffers(index)
    if buffer.Offset():  # Large models keep buffers after the flatbuffer.
        return buffer.Offset(), buffer.Offset() + buffer.Size()
    if not buffer.DataLength():
        return 0, 0
    # The data vector's first byte, as the generated DataAsNumpy reads it.
    o = flatbuffers.number_types.UOffsetTFlags.py_type(buffer._tab.Offset(4))  # pylint: disable=protected-access
    start = buffer._tab.Vector(o)  # pylint: disable=protected-access
    return start, start + buffer.DataLength()


def _buffer(model, model_bytes: bytes, index: int) -> bytes:
    buffer = model.Buffers(index)
    if buffer.Offset():  # Large models keep buffers after the flatbuffer.
        return bytes(model_bytes[buffer.Offset():buffer.Offset() + buffer.Size()])
    return buffer.DataAsNumpy().tobytes() if buffer.DataLength() else b""


def _name(entry) -> str:
    n = entry.name
    return n.decode() if isinstance(n, bytes) else n
