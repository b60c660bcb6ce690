"""Atomic file output: a reader never sees a half-written file."""

from __future__ import annotations

import contextlib
import glob
import io
import os
import tempfile

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary path beside `path`; renames it onto `path` on success.

    The temporary file keeps `path`'s extension (Keras picks the format from
    it). On any exception the temporary file is removed and `path` is left as
    it was.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=suffix, dir=directory)
    os.close(fd)
    # mkstemp creates the file 0600; give it the mode a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes_atomic(path: str, content: bytes) -> None:
    """Writes `content` to `path` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())


def _temporary_prefix(path: str) -> str:
    # Named after the target, so that the leftovers of a killed writer of
    # one file can be told from another file's.
    return f".{os.path.basename(path)}.tmp-"


def remove_stale_temporaries(path: str) -> list[str]:
    """Removes temporary files that a killed `atomic_path(path)` left; returns them.

    Call it when no other process is writing `path`, e.g. at start-up.
    """
    directory = os.path.dirname(os.path.abspath(path))
    pattern = os.path.join(glob.escape(directory),
                           glob.escape(_temporary_prefix(path)) + "*")
    stale = [p for p in glob.glob(pattern) if os.path.isfile(p)]
    for p in stale:
        os.remove(p)
    return stale


def write_npz_atomic(path: str, arrays: dict, compressed: bool = False) -> None:
    """Writes named arrays to `path` as an .npz, atomically."""
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())
