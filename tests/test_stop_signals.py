"""deeplab.cli's stop contract where Python loses the exception: a signal handled while a finalizer runs raises
``Stopped`` only into "Exception ignored ...", and the command would run to its end. The next ``on_interrupt``
(every long command calls it as it goes) delivers it."""
import gc
import os
import signal

import pytest

from deeplab.cli import _raise_stopped, command, keeps_stop_signals, on_interrupt, stops_held

# the dropped exception is the point of these tests: pytest reports it as a warning
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


class _FinalizerHitBySignal:
    def __del__(self):
        _raise_stopped(signal.SIGINT, None)  # what the handler does when SIGINT lands in here


def _main_with_lost_stop(steps: list):
    @command
    def main(argv=None) -> int:
        victim = _FinalizerHitBySignal()
        del victim  # the Stopped raised in __del__ is reported and dropped by Python
        gc.collect()
        steps.append("after the lost stop")
        on_interrupt("3 of 9 images kept; the same command does the rest")
        steps.append("ran on")
        return 0

    return main


def test_a_stop_lost_in_a_finalizer_is_delivered_at_the_next_progress_point(capsys):
    steps = []
    assert _main_with_lost_stop(steps)() == 130
    assert steps == ["after the lost stop"]
    # one line: the dropped Stopped's "Exception ignored ... Traceback" is not shown to the user
    assert capsys.readouterr().err.splitlines() == [
        "interrupted (SIGINT): 3 of 9 images kept; the same command does the rest"]


def test_a_note_set_while_handling_the_stop_does_not_raise_again(capsys):
    """Commands set their note inside ``except KeyboardInterrupt`` (cluster.train, cluster.demo) and re-raise:
    the note must stick and the stop stay one."""
    @command
    def main(argv=None) -> int:
        try:
            _raise_stopped(signal.SIGTERM, None)
        except KeyboardInterrupt:
            on_interrupt("checkpoint kept")
            raise
        return 0

    assert main() == 143
    assert capsys.readouterr().err.strip() == "interrupted (SIGTERM): checkpoint kept"


def test_a_fresh_command_starts_without_an_old_stop():
    steps = []
    _main_with_lost_stop(steps)()

    @command
    def main(argv=None) -> int:
        on_interrupt("working")
        return 0

    assert main() == 0


def test_a_stop_lost_while_a_library_starts_is_delivered_when_it_returns(capsys):
    """init_ray (keeps_stop_signals) imports Ray, whose compiled modules drop a Stopped raised in their import:
    the stop comes out when it returns, with the note of the phase it came in (nothing done yet)."""
    @keeps_stop_signals
    def start_library():
        victim = _FinalizerHitBySignal()
        del victim
        gc.collect()
        return "started"

    steps = []

    @command
    def main(argv=None) -> int:
        on_interrupt("OUT is as it was")
        steps.append(start_library())
        on_interrupt("2 of 9 images kept")
        return 0

    assert main() == 130 and steps == []
    assert capsys.readouterr().err.splitlines() == ["interrupted (SIGINT): OUT is as it was"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_inside_stops_held_comes_when_the_block_ends_with_the_line_the_block_set(sig, capsys):
    """cluster.segment appends records to the manifest and then says how many it keeps: a stop between the two
    once said one image less than the manifest kept (CI). A real signal to this process inside the block; the
    block finishes, and its line is the one printed."""
    steps = []

    @command
    def main(argv=None) -> int:
        on_interrupt("3 of 9 images kept")
        with stops_held():
            os.kill(os.getpid(), sig)  # the handler runs here, before the next line: held, not raised
            steps.append("record 4 written")
            on_interrupt("4 of 9 images kept")  # a progress point inside the block does not raise either
            steps.append("line says 4")
        steps.append("after the block")
        return 0

    assert main() == 128 + sig
    assert steps == ["record 4 written", "line says 4"]
    assert capsys.readouterr().err.splitlines() == [f"interrupted ({signal.Signals(sig).name}): 4 of 9 images kept"]


def test_outside_stops_held_a_stop_is_raised_at_once_and_an_error_in_the_block_is_not_hidden():
    steps = []

    @command
    def main(argv=None) -> int:
        with pytest.raises(ZeroDivisionError):
            with stops_held():
                raise ZeroDivisionError("a bug in the block")
        os.kill(os.getpid(), signal.SIGINT)
        steps.append("ran on")
        return 0

    assert main() == 130 and steps == []
