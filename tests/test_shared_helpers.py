"""The helpers every layer shares instead of writing its own (issue 22): progress/ETA lines, the one-line error,
and the remote-path test. Fast: no Ray, no model."""
import io
import math
import re
from pathlib import Path

import pytest

from deeplab import progress
from deeplab.cli import UserError, error_line
from deeplab.fileio import is_uri
from deeplab.progress import Progress, eta_text

ROOT = Path(__file__).parents[1]
# deeplab/config/experiment.py (deeplab/config.py before issue 32 split it, moving code unchanged) still has
# two idioms (a YAML error's first line, a remote data.root) that are to move to error_line/is_uri; this
# exception goes with them.
CONFIG_FOR_22CFG = ("deeplab/config/experiment.py",)


def _product_lines(pattern: str, allowed=()) -> list:
    """``file:line: text`` of every product-code line matching ``pattern``, outside the ``allowed`` files."""
    found = []
    for package in ("deeplab", "export", "cluster", "tuning"):
        for f in sorted((ROOT / package).rglob("*.py")):
            name = f.relative_to(ROOT).as_posix()
            for number, text in enumerate(f.read_text().splitlines(), 1):
                if name not in allowed and re.search(pattern, text):
                    found.append(f"{name}:{number}: {text.strip()}")
    return found


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress.time, "monotonic", c)
    return c


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59.9, "59s"), (60, "1m00s"), (125, "2m05s"),
                                           (3599, "59m59s"), (3600, "1h00m"), (7380, "2h03m"), (-5, "0s"),
                                           (math.inf, "?")])
def test_eta_text_reads_as_seconds_minutes_or_hours(seconds, text):
    assert eta_text(seconds) == text


def test_a_log_progress_prints_a_line_per_interval_with_count_rate_and_eta_and_always_the_last(clock):
    out = io.StringIO()
    bar = Progress(10, "segment", interval=5, stream=out, redraw=False)
    clock.now += 2
    bar.update(done=2, note="1 failed")  # before the interval: nothing
    clock.now += 3
    bar.update(done=4, note="1 failed")  # 4 in 5 s: 0.8/s, 6 left at that pace: 7.5 s
    bar.update(done=4, final=True)  # same count again: nothing new
    clock.now += 1
    bar.update(done=10)  # the end prints at once: 10 in 6 s
    assert out.getvalue().splitlines() == ["segment: 4/10 images (1 failed), 0.80 images/s, ETA 7s",
                                           "segment: 10/10 images, 1.67 images/s, ETA 0s"]


def test_a_terminal_progress_redraws_one_line_with_a_bar_and_ends_it(clock):
    out = io.StringIO()
    bar = Progress(4, "predict", stream=out)
    for _ in range(4):
        clock.now += 1
        bar.update()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert text.split("\r")[1:] == ["predict: [######..................] 1/4 images, 1.00 images/s, ETA 3s",
                                    "predict: [############............] 2/4 images, 1.00 images/s, ETA 2s",
                                    "predict: [##################......] 3/4 images, 1.00 images/s, ETA 1s",
                                    "predict: [########################] 4/4 images, 1.00 images/s, ETA 0s\n"]


def test_a_disabled_progress_counts_and_prints_nothing(clock):
    out = io.StringIO()
    bar = Progress(2, "x", stream=out, enabled=False)
    bar.update(2)
    assert bar.done == 2 and out.getvalue() == ""


def test_the_four_long_jobs_show_progress_through_the_one_helper():
    """No second progress/ETA implementation in product code: one ETA formatter, one Progress."""
    assert _product_lines(r"ETA \{|eta \{\(|def _eta|class _?Progress", allowed=("deeplab/progress.py",)) == []


class WrappedError(Exception):
    pass


@pytest.mark.parametrize("error, line", [
    (ValueError("bad value\nsecond line"), "bad value"),
    (ValueError("  \n  indented first  \n"), "indented first"),
    (KeyError(), "KeyError"),
    (RuntimeError("Exception from src/inference/src/core.cpp:99:\nCheck 'x' failed at core.cpp:12:\n"
                  "the model has no input 'images'"), "the model has no input 'images'"),
    (WrappedError("ray::TrainWorker.run() (pid=42)\nTraceback (most recent call last):\n  File \"w.py\", "
                  "line 3, in f\n    raise ValueError('x')\nValueError: data.root=/nope: no such folder"),
     "ValueError: data.root=/nope: no such folder"),
    (RuntimeError("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                  "  File \"io.py\", line 9, in f\ndeeplab.data.io.DatasetError: a.png: truncated"),
     "deeplab.data.io.DatasetError: a.png: truncated"),
])
def test_error_line_is_the_informative_first_line_or_a_tracebacks_raised_line(error, line):
    assert error_line(error) == line


def test_error_line_is_bounded_and_names_the_type_when_asked_but_not_for_a_users_error():
    assert error_line(ValueError("x" * 500), limit=50) == "x" * 50
    assert error_line(ValueError("bad\nmore"), with_type=True) == "ValueError: bad"
    assert error_line(KeyError(), with_type=True) == "KeyError"
    assert error_line(UserError("data.root: no such folder"), with_type=True) == "data.root: no such folder"


def test_one_error_line_helper_in_product_code():
    """The first-line idioms the issue found (~18 formats, four helpers) are gone from product code."""
    idioms = (r"splitlines\(\)( or \[[^]]*\])?\)?\[(0|-1)\]|str\(e\)\.split\("
              r"|def _?(first_line|one_line|first_error_line)\(")
    assert _product_lines(idioms, allowed=CONFIG_FOR_22CFG) == []


@pytest.mark.parametrize("path, remote", [("s3://bucket/runs", True), ("gs://b/x.ckpt", True),
                                          ("file:///tmp/x", True), ("/tmp/runs", False), ("runs/demo", False),
                                          ("C:\\runs", False), ("weird:name", False)])
def test_is_uri_tells_pyarrow_uris_from_local_paths(path, remote):
    assert is_uri(path) is remote
    if not remote:
        assert is_uri(Path(path)) is False


def test_one_remote_path_test_in_product_code():
    assert _product_lines(r'"://" in', allowed=("deeplab/fileio.py",) + CONFIG_FOR_22CFG) == []
