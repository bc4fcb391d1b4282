"""Where a command's output goes: its own lines on the terminal, everything else in a log file when asked.

A command's own lines are stage lines, progress bars and summaries (:func:`say`, and the bars, which
write to :func:`stream`). By default they share the process's stdout and stderr with everything else.
Inside :func:`logs_to_file`, file descriptors 1 and 2 point at a log file, so whatever Ray (its driver
and what its workers send to the driver), vLLM's engine processes, DeepSpeed and native libraries
print lands there, while :func:`stream` still reaches the terminal.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

_terminal: TextIO | None = None


def stream() -> TextIO:
    """The terminal: the stream for stage lines, progress bars and summaries."""
    return _terminal if _terminal is not None else sys.stderr


def say(text: str = "") -> None:
    """Print one of the command's own lines to the terminal."""
    print(text, file=_terminal or sys.stdout, flush=True)


@contextlib.contextmanager
def logs_to_file(path: Path) -> Iterator[Path]:
    """Send everything written to stdout and stderr (by this process and its children) to ``path``, appending.

    :func:`say` and the progress bars still reach the terminal. Both descriptors are restored on
    the way out, also when the body raises, so errors are shown on the terminal.
    """
    global _terminal
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    try:
        with path.open("a") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            _terminal = terminal
            yield path
    finally:
        _terminal = None
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        terminal.close()
