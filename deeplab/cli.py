"""The edge every command shares: a mistake a user can fix becomes one line and an exit code, never a
traceback; Ctrl-C becomes one line and exit 130. Programming errors keep their traceback.

    @command
    def main(argv=None) -> int: ...
"""
from __future__ import annotations

import functools
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
