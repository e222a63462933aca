"""What every export command shares beyond deeplab.cli's edge (one-line errors, Ctrl-C): its progress lines
on stdout (export's modules log them; a command shows them), and the flag that sets a boolean field false."""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Optional

from deeplab.cli import UserError
from deeplab.config import Alias


class ExportError(UserError, RuntimeError):
    """An exported model failed a check (parity with PyTorch, accuracy); one line saying what and by how much."""

    exit_code = 1


@dataclass(frozen=True)
class SwitchOff(Alias):
    """A flag without a value that sets a boolean field to false (``--static``: ``export.dynamic=false``)."""

    switch: bool = True

    def override(self, value) -> Optional[str]:
        return None if value is None else f"{self.key}=false"


class _Stdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (a test's capture, a pipe), flushed after each line."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def show_progress(level: int = logging.INFO) -> None:
    """Print the ``export`` loggers' lines as plain lines on stdout (idempotent). They stop propagating to the
    root logger, which libraries such as onnxruntime's quantizer configure to print on stderr."""
    logger = logging.getLogger("export")
    logger.propagate = False
    if not any(isinstance(h, _Stdout) for h in logger.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
