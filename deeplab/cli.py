"""The edge every command shares: a mistake a user can fix becomes one line and an exit code, never a
traceback; Ctrl-C becomes one line and exit 130. Programming errors keep their traceback.

    @command
    def main(argv=None) -> int: ...
"""
from __future__ import annotations

import functools
import re
import sys

USAGE = 2  # a mistake in what the user asked for: config, paths, files
INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


class UserError(Exception):
    """Base of every error a user causes and can fix (config, checkpoint, dataset, output path, engine);
    ``str(e)`` is one line naming the file or option."""

    exit_code = USAGE


class OutputError(UserError, OSError):
    """An output cannot be written: a file where a folder is needed (or the reverse), no permission, a full
    disk. The message names the output path the user gave, not a temporary name."""

    def __init__(self, path, reason: str, exit_code: int = USAGE):
        super().__init__(f"{path}: cannot write ({reason})")
        self.path, self.reason, self.exit_code = path, reason, exit_code


_RAISED = re.compile(r"^[\w.]+(Error|Exception|Interrupt|Exit|Failed|Invalid)\b")  # a traceback's last line
_LOCATION = ("Exception from", "Check '")  # C++ runtimes' lines that say where, not what (OpenVINO)


def error_line(error: BaseException, limit: int = 200, with_type: bool = False) -> str:
    """What went wrong, in one line for a message that must stay one line: the first informative line of the
    error's text, or for a traceback's text (Ray wraps a worker's error in one) the line that names what was
    raised; the type's name when the text is empty. ``with_type`` prefixes the type (not for a UserError,
    whose text is already written for the user)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if any(line.endswith("Traceback (most recent call last):") for line in lines):
        lines = [line for line in lines if _RAISED.match(line)][-1:] or lines[-1:]
    line = next((line for line in lines if not line.startswith(_LOCATION)), lines[0] if lines else "")
    if not line:
        return type(error).__name__
    return (f"{type(error).__name__}: {line}" if with_type and not isinstance(error, UserError) else line)[:limit]


def command(main):
    """Wrap a command's ``main(argv) -> int``: UserError -> ``error: <line>`` on stderr and its exit code;
    KeyboardInterrupt -> ``interrupted; nothing half-written`` and 130 (writes are atomic, so that holds)."""

    @functools.wraps(main)
    def run(argv=None) -> int:
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            print("interrupted; nothing half-written", file=sys.stderr)
            return INTERRUPTED

    return run
