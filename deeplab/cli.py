"""The edge every command shares: a mistake a user can fix becomes one line and an exit code, never a
traceback; Ctrl-C (SIGINT) and SIGTERM become one line saying what was kept and what a rerun does, and exit
130 or 143. Programming errors keep their traceback.

    @command
    def main(argv=None) -> int:
        ...
        on_interrupt("checkpoint at iteration 60 kept in runs/x; the same command resumes from it")
"""
from __future__ import annotations

import contextlib
import functools
import re
import signal
import sys
import threading

USAGE = 2  # a mistake in what the user asked for: config, paths, files
INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
TERMINATED = 143  # 128 + SIGTERM, what a scheduler, `kill` or `timeout` sends
NOTHING_LOST = "nothing half-written"  # every write is atomic, so this holds wherever a command is stopped


class Stopped(KeyboardInterrupt):
    """A stop signal as an exception, so the command unwinds through its ``finally`` blocks (Ray shut down,
    temporary files removed) exactly as for Ctrl-C. ``signum`` says which signal."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_interrupt_note = [NOTHING_LOST]


def on_interrupt(note: str) -> None:
    """Say, as the command goes, what a stop now would keep and what running it again does: printed after
    ``interrupted (SIGINT): `` if a stop comes. Reset to "nothing half-written" for each command.

    Also where a stop that was lost is delivered again: a signal that lands while Python runs a finalizer or
    an extension module's import raises ``Stopped`` where it is only reported ("Exception ignored ...") and
    the command would run on. Outside any ``except`` block, a stop received earlier is raised here."""
    _interrupt_note[0] = note
    _deliver_lost_stop()


_received = [None]  # the stop signal that came: a KeyboardInterrupt raised inside ray.get reaches us as a new,
# plain one (Ray's C++ wait checks for signals and raises its own), without the Stopped's signum


_holding = [0]  # how many stops_held blocks the main thread is in


@contextlib.contextmanager
def stops_held():
    """A stop that comes inside the block is raised when it ends: for a write and the on_interrupt line that
    counts it, which must agree (a stop between them would say one image less than the manifest keeps)."""
    _holding[0] += 1
    try:
        yield
    finally:
        _holding[0] -= 1
    _deliver_lost_stop()


def _raise_stopped(signum, _frame):
    _received[0] = signum
    if not _holding[0]:
        raise Stopped(signum)


def _deliver_lost_stop() -> None:
    """Raise a stop received earlier whose ``Stopped`` Python dropped, or that came inside ``stops_held``; never
    inside an ``except`` block, where the stop being handled is that one, nor inside ``stops_held``."""
    if _received[0] is not None and not _holding[0] and sys.exc_info()[0] is None:
        raise Stopped(_received[0])


def _quiet_lost_stop(hook):
    """``sys.unraisablehook`` that drops a ``Stopped`` Python could not raise (it is delivered later: one line,
    no traceback) and passes anything else to ``hook``."""
    def quiet(unraisable):
        if not isinstance(unraisable.exc_value, Stopped):
            hook(unraisable)

    return quiet


def answer_stop_signals() -> dict:
    """SIGINT and SIGTERM raise ``Stopped`` in the main thread, also in a command started with SIGINT ignored
    (a background job of a non-interactive shell inherits SIG_IGN). Returns the handlers it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGINT, signal.SIGTERM)}


def keeps_stop_signals(start):
    """For a function that starts a library which takes SIGTERM for itself (``ray.init`` sets it to
    ``sys.exit(15)``, then Ray's core worker to a crash handler that aborts the process with a stack dump: exit
    134 and no line). Inside a ``@command`` the command's handlers are back when ``start`` returns, and a
    SIGTERM caught by the library's ``sys.exit`` meanwhile is a ``Stopped`` like any other."""

    @functools.wraps(start)
    def run(*args, **kwargs):
        if signal.getsignal(signal.SIGTERM) is not _raise_stopped:  # not inside a command: leave them be
            return start(*args, **kwargs)
        try:
            started = start(*args, **kwargs)
        except SystemExit as e:
            if e.code == signal.SIGTERM:
                raise Stopped(signal.SIGTERM) from None
            raise
        finally:
            answer_stop_signals()
        _deliver_lost_stop()  # a signal in the library's compiled imports (Ray's) is dropped by Python
        return started

    return run


def interrupted_exit(error: KeyboardInterrupt) -> int:
    """The one line and the exit code for a stop: 130 for SIGINT (or a plain KeyboardInterrupt), 143 for
    SIGTERM."""
    signum = getattr(error, "signum", None) or _received[0] or signal.SIGINT
    print(f"interrupted ({signal.Signals(signum).name}): {_interrupt_note[0]}", file=sys.stderr)
    return 128 + signum


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
    SIGINT/SIGTERM -> ``interrupted (SIGINT): <what on_interrupt said>`` and 130/143. The signal handlers it
    installs are put back when the command returns (tests call commands in-process)."""

    @functools.wraps(main)
    def run(argv=None) -> int:
        _interrupt_note[0], _received[0], _holding[0] = NOTHING_LOST, None, 0
        replaced, unraisable = answer_stop_signals(), sys.unraisablehook
        sys.unraisablehook = _quiet_lost_stop(unraisable)
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt as e:
            return interrupted_exit(e)
        finally:
            sys.unraisablehook = unraisable
            for sig, handler in replaced.items():
                signal.signal(sig, handler)

    return run
