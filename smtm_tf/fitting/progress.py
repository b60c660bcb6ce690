"""Progress bars on the library's long steps, off unless a command line turns them on.

Feature extraction, encoder training, calibration replays and validation
streams show a tqdm bar on stderr, when it is a terminal, while `enable()` is
in effect (the command lines do it; `--noprogress` turns it off). A library
caller and the tests see nothing: bars are off by default, as
`datasets.disable_progress_bar` and Keras's `verbose=0` leave a program's
output to the program.
"""

from __future__ import annotations

import sys
from typing import Iterable

import tqdm

_enabled = False


def enable(on: bool = True) -> None:
    """Turns the bars on (or off) for this process."""
    global _enabled  # pylint: disable=global-statement
    _enabled = bool(on)


def enabled() -> bool:
    return _enabled


def bar(iterable: Iterable | None = None, total: int | None = None, desc: str = "",
        unit: str = "it") -> tqdm.tqdm:
    """`iterable` wrapped in a bar (or a bar to `update()` by hand); silent when off."""
    # disable=None: tqdm's own rule, no bar when stderr is not a terminal
    # (a log file or a pipe would collect every redraw).
    return tqdm.tqdm(iterable, total=total, desc=desc, unit=unit,
                     disable=None if _enabled else True,
                     file=sys.stderr, leave=False, dynamic_ncols=True, mininterval=0.5)
