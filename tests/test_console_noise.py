"""Ray lines a user cannot act on, off the default console of segment and serve and kept under --verbose
(cluster/console.py). The commands themselves are run in tests/test_interrupts.py; here the two filters on
their own: a fresh interpreter whose file descriptor 2 is written directly (as Ray's C++ core worker does), and
the function through which Ray prints the errors its cluster reports to a driver."""
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import ray_internals
from cluster.console import ACTOR_ARGUMENTS_NOISE, SERVE_SHUTDOWN_NOISE, quiet_ray_reports

ROOT = Path(__file__).resolve().parents[1]
# Ray 2.60's lines as they reached the console (the ids and times vary)
ACTOR_LINE = ("[2026-12-07 06:23:20,496 E 5749 5749] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches("
              "SegmentWorker))' and ID: '6fd99bfc3529549b3a23e28e01000000' has constructor arguments in the object "
              "store and max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor "
              "restart will fail. See https://github.com/ray-project/ray/issues/53727 for more details.")
SHUTDOWN_LINE = ("Task ServeController.graceful_shutdown failed. There are infinite retries remaining, so the task "
                 "will be retried. Error: The actor is dead because it was killed by `ray.kill`.")

WRITER = """import os, sys
from cluster import ray_internals
from cluster.console import ACTOR_ARGUMENTS_NOISE, quiet_stderr
verbose = sys.argv[1] == "verbose"
with quiet_stderr(ACTOR_ARGUMENTS_NOISE, verbose):
    os.write(2, b"before\\n")
    os.write(2, sys.argv[2].encode() + b"\\n")
    print("from python", file=sys.stderr)
    os.write(2, b"[2026-12-07 06:23:21,000 E 1 1] core_worker.cc:99: a real error\\n")
os.write(2, b"after\\n")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_the_actor_arguments_line_written_on_fd_2_is_left_out_unless_verbose(verbose):
    out = subprocess.run([sys.executable, "-c", WRITER, "verbose" if verbose else "quiet", ACTOR_LINE], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    kept = ["before", "from python", "[2026-12-07 06:23:21,000 E 1 1] core_worker.cc:99: a real error", "after"]
    assert out.stderr.splitlines() == (kept[:1] + [ACTOR_LINE] + kept[1:] if verbose else kept)


@pytest.mark.parametrize("verbose", [False, True])
def test_serves_shutdown_report_is_left_out_unless_verbose(verbose):
    """Through Ray's printing hook (cluster.ray_internals.ray_printer; tests/test_ray_internals.py pins that Ray
    prints its cluster's reports through it)."""
    shown = []
    original = ray_internals.ray_printer()
    ray_internals.set_ray_printer(lambda data, ignore_prefix: shown.append(data["lines"]))
    try:
        quiet_ray_reports(SERVE_SHUTDOWN_NOISE, verbose)
        quiet_ray_reports(SERVE_SHUTDOWN_NOISE, verbose)  # a second call filters once, not twice over
        report = ray_internals.ray_printer()
        report({"lines": [SHUTDOWN_LINE], "pid": "raylet", "is_err": False}, ignore_prefix=False)
        report({"lines": ["A worker died or was killed while executing a task", SHUTDOWN_LINE], "pid": "raylet",
                "is_err": False}, ignore_prefix=False)
    finally:
        ray_internals.set_ray_printer(original)
    if verbose:
        assert shown == [[SHUTDOWN_LINE], ["A worker died or was killed while executing a task", SHUTDOWN_LINE]]
    else:
        assert shown == [["A worker died or was killed while executing a task"]]


def test_the_patterns_match_only_those_lines():
    assert ACTOR_ARGUMENTS_NOISE.search(ACTOR_LINE) and not ACTOR_ARGUMENTS_NOISE.search(SHUTDOWN_LINE)
    assert SERVE_SHUTDOWN_NOISE.search(SHUTDOWN_LINE) and not SERVE_SHUTDOWN_NOISE.search(ACTOR_LINE)
    assert not ACTOR_ARGUMENTS_NOISE.search("[2026-12-07 06:23:21,000 E 1 1] core_worker.cc:99: Actor died")
