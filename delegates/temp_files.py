"""Temporaries named after the process that owns them, in the system's temp folder.

A killed process cannot clean up after itself; its temporaries carry its
process id (`<prefix><pid>-...`), so the next run removes those whose process
is gone (`remove_orphans`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile


@contextlib.contextmanager
def process_temp_dir(prefix: str):
    """A temporary directory `<prefix><pid>-...`, removed after the block."""
    with tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}-") as tmp:
        yield tmp


def process_temp_file(prefix: str, content: bytes, suffix: str = "") -> str:
    """Writes `content` to a new file `<prefix><pid>-...<suffix>`; returns its path.

    The caller removes it; `remove_orphans(prefix)` removes those a killed
    process left.
    """
    fd, path = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
    except BaseException:
        os.remove(path)
        raise
    return path


def remove_orphans(prefix: str) -> list[str]:
    """Removes `process_temp_*(prefix)` files and folders whose process is gone."""
    removed = []
    pattern = os.path.join(glob.escape(tempfile.gettempdir()), glob.escape(prefix) + "*-*")
    for path in glob.glob(pattern):
        pid = os.path.basename(path)[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Another user's process.
        return True
    return True


# CompiledModel keeps a pointer to the bytes it loads from a buffer: models
# are loaded from a file that outlives that concern, removed by its user.
MODEL_FILE_PREFIX = "smtm-model-"


def model_file(model_content: bytes) -> str:
    """Writes a .tflite for CompiledModel.from_file; returns its path.

    First removes the model files of processes that were killed.
    """
    remove_orphans(MODEL_FILE_PREFIX)
    return process_temp_file(MODEL_FILE_PREFIX, model_content, ".tflite")
