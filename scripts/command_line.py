"""What every command line shares: quiet native logs, one-line errors, progress.

Import this module first in a script, before anything that loads TensorFlow
or LiteRT: when the process is one of the command lines, importing it sends
what native code writes to stderr (TensorFlow's and LiteRT's C++ logs:
oneDNN, CUDA, accelerator registry) to /dev/null, while Python's own stderr
(errors, warnings, progress bars) still reaches the terminal. TensorFlow
logs some of those lines from its libraries' static initialisers, before
TF_CPP_MIN_LOG_LEVEL is read, so only the file descriptor can hold them back.
`--native_logs` (or `--debug`) keeps them.

`run(main)` runs an absl main: errors print as one line, `error: ...`, and
exit 1 (Ctrl-C: one line, exit 130); `--debug` (or `--verbosity=1`) shows
the traceback instead. Progress bars are on when stderr is a terminal
(`--noprogress` turns them off).
"""

from __future__ import annotations

import faulthandler
import logging as std_logging
import os
import sys
import warnings

from absl import app
from absl import flags
from absl import logging

# Nothing here may load TensorFlow or LiteRT (this module quiets them first).
from smtm_tf.fitting import progress

_SCRIPTS_DIR = os.path.dirname(os.path.abspath(__file__))
_PROJECT_PACKAGES = ("delegates", "smtm_tf", "converters", "scripts")

DEBUG = flags.DEFINE_bool(
    "debug", False, "Show the traceback of an error, and TensorFlow's and LiteRT's own "
    "log lines (implies --native_logs).")
NATIVE_LOGS = flags.DEFINE_bool(
    "native_logs", False, "Show TensorFlow's and LiteRT's C++ log lines (hidden by default).")
PROGRESS = flags.DEFINE_bool("progress", True,
                             "Progress bars on long steps (on stderr, when a terminal).")
OLD_RUNTIME_PYTHON = flags.DEFINE_string(
    "old_runtime_python", None, "Python of a virtualenv with tflite-runtime==2.14.0 and "
    "numpy<2 for the old-runtime check (default $SMTM_OLD_RUNTIME_PYTHON, else "
    ".venv-tflite214/bin/python in the repository).")
NATIVE_CLI = flags.DEFINE_string(
    "native_cli", None, "Also measure the native runtime on the same frames: the path of "
    "smtm_cli (built by cmake in native/, e.g. native/build/smtm_cli). Its figures print "
    "beside the Python harness's.")


def is_command_line(argv0: str) -> bool:
    """Whether the process runs one of the command lines (a script here or an
    `smtm-*` entry point), not a program that imported a script's module."""
    if not argv0:
        return False
    path = os.path.abspath(argv0)
    return os.path.dirname(path) == _SCRIPTS_DIR or os.path.basename(path).startswith("smtm-")


def _asked(argv: list[str], name: str) -> bool:
    # Read before absl parses flags: the logs start when TensorFlow loads.
    return any(a in (f"--{name}", f"--{name}=true", f"--{name}=1", f"--{name}=True")
               for a in argv[1:])


def quiet_native_logs() -> None:
    """Sends fd 2 (native code's stderr) to /dev/null; Python keeps the terminal.

    TF_CPP_MIN_LOG_LEVEL=3 (unless set) quiets TensorFlow's later logs in
    child processes too. A crash still reports: faulthandler writes Python's
    stack to the real stderr on a fatal signal.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    real = os.dup(2)
    sys.stderr = os.fdopen(real, "w", buffering=1, encoding="utf-8",
                           errors="backslashreplace")
    sink = os.open(os.devnull, os.O_WRONLY)
    os.dup2(sink, 2)
    os.close(sink)
    faulthandler.enable(file=sys.stderr)


if (is_command_line(sys.argv[0] if sys.argv else "")
        and not (_asked(sys.argv, "native_logs") or _asked(sys.argv, "debug"))):
    quiet_native_logs()


def one_line(error: BaseException) -> str:
    """The error as one line: its message, lines joined; its type for unexpected kinds."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    # The project's own errors (and the ValueError/OSError kinds they derive
    # from) say what is wrong and how to fix it: their message is enough.
    own = type(error).__module__.split(".")[0] in _PROJECT_PACKAGES
    if own or isinstance(error, (ValueError, OSError)):
        return text or type(error).__name__
    return (f"{type(error).__name__}: {text} (--debug shows the traceback)" if text
            else f"{type(error).__name__} (--debug shows the traceback)")


def run(main) -> None:
    """`app.run(main)` with the command lines' error and progress behaviour."""

    def guarded(argv):
        progress.enable(PROGRESS.value)
        if not (DEBUG.value or NATIVE_LOGS.value):
            # TensorFlow's Python-side warnings (retracing, deprecations).
            std_logging.getLogger("tensorflow").setLevel(std_logging.ERROR)
            # TensorFlow's int8 calibration runs its own deprecated
            # tf.lite.Interpreter, which says so on every conversion.
            warnings.filterwarnings("ignore", message=r"\s*Warning: tf\.lite\.Interpreter is "
                                    "deprecated", category=UserWarning)
        debug = DEBUG.value or logging.get_verbosity() >= logging.DEBUG
        try:
            return main(argv)
        except app.UsageError as e:
            # absl would print the whole usage text; one line says what is wrong.
            if debug:
                raise
            print(f"error: {' '.join(str(e).split())} (--helpshort lists the flags)",
                  file=sys.stderr, flush=True)
            sys.exit(e.exitcode)
        except SystemExit:
            raise
        except KeyboardInterrupt:
            if debug:
                raise
            print("interrupted", file=sys.stderr, flush=True)
            sys.exit(130)
        except Exception as e:  # pylint: disable=broad-except
            if debug:
                raise
            print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
            sys.exit(1)

    app.run(guarded)
