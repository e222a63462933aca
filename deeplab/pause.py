"""Test-only: hold a process at a named point so that an interruption test can stop it exactly there.

``DEEPLAB_TEST_PAUSE=POINT`` or ``POINT@ITERATION`` (the tests set it; nothing else does): when the process
reaches POINT (at ITERATION, if given) it prints ``test-pause: POINT at iteration N`` and sleeps until it is
stopped. Points: ``before-ray`` (cluster.train, before Ray starts), ``step`` (before an optimizer step),
``checkpoint-write`` (a checkpoint half-copied into the run folder, under its temporary name),
``checkpoint-written`` (copied whole, not yet reported to Ray), ``evaluate`` (at the start of an evaluation).
Unset, it costs one dictionary lookup.
"""
from __future__ import annotations

import os
import time

ENV = "DEEPLAB_TEST_PAUSE"


def pause_for_test(point: str, iteration: int | None = None) -> None:
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    name, _, at = wanted.partition("@")
    if name != point or (at and iteration != int(at)):
        return
    print(f"test-pause: {point} at iteration {iteration}", flush=True)
    while True:
        time.sleep(3600)
