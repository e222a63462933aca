"""What every export command shares: progress lines on stdout (export's modules log them; a command shows
them), and a user's mistake answered in one line with an exit code instead of a traceback."""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Callable, Optional

from deeplab.config import Alias, ConfigError

EXIT_FAILED = 1  # the input was wrong or a check failed
EXIT_USAGE = 2  # a config value or flag is not allowed
EXIT_INTERRUPTED = 130


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


def run_command(prog: str, command: Callable[[], int], failures: tuple = (ValueError, FileNotFoundError)) -> int:
    """Run a command's body with progress shown; a mistake in ``failures`` is one line on stderr."""
    show_progress()
    try:
        return command()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (no partial file is left)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except failures as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_FAILED
