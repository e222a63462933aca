"""Progress of long work, the one way every command shows it (docs/design.md: iterations or images, rate, ETA).

    bar = Progress(len(files), "predict")          # a terminal: one line rewritten in place
    bar = Progress(n, "segment", redraw=False, interval=5)   # a log or Ray's console: a new line each time
    bar.update()                                   # one more done; bar.update(done=k, note="2 failed")
"""
from __future__ import annotations

import math
import sys
import time


def eta_text(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``; ``?`` when not known yet (no rate measured)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    if h:
        return f"{h}h{rem // 60:02d}m"
    return f"{rem // 60}m{rem % 60:02d}s" if rem >= 60 else f"{rem}s"


def remaining_seconds(done: float, total: float, elapsed: float) -> float:
    """Time left at the average pace so far; infinite before any work is done."""
    return (total - done) * elapsed / done if done > 0 else math.inf


class Progress:
    """``label done/total unit, rate unit/s, ETA t`` on stderr, at most every ``interval`` seconds and always
    at the end. ``redraw`` rewrites one line in place (with a bar); without it each update is a new line, for
    consoles that keep every line (Ray's driver log, a pipe). ``enabled=False`` counts but prints nothing."""

    def __init__(self, total: int, label: str, unit: str = "images", interval: float = 0.5, stream=None,
                 redraw: bool = True, enabled: bool = True):
        self.total, self.label, self.unit, self.interval = total, label, unit, interval
        self.stream, self.redraw, self.enabled = stream, redraw, enabled
        self.done, self.start, self.shown = 0, time.monotonic(), -1
        self.last = self.start

    def rate(self, now: float = None) -> float:
        """Units per second since the start."""
        return self.done / max((time.monotonic() if now is None else now) - self.start, 1e-9)

    def line(self, note: str = "", now: float = None) -> str:
        now = time.monotonic() if now is None else now
        eta = eta_text(remaining_seconds(self.done, self.total, now - self.start))
        bar = ""
        if self.redraw:
            filled = int(24 * self.done / self.total) if self.total else 24
            bar = f"[{'#' * filled}{'.' * (24 - filled)}] "
        return (f"{self.label}: {bar}{self.done}/{self.total} {self.unit}{f' ({note})' if note else ''}, "
                f"{self.rate(now):.2f} {self.unit}/s, ETA {eta}")

    def update(self, n: int = 1, done: int = None, note: str = "", final: bool = False) -> None:
        """Count ``n`` more units done (or set ``done``); print the line if ``interval`` has passed, the work
        is complete or ``final`` (then once per count: a repeated final update prints nothing new)."""
        self.done = self.done + n if done is None else done
        now = time.monotonic()
        end = final or self.done >= self.total
        if not self.enabled or self.done == self.shown or (not end and now - self.last < self.interval):
            return
        self.last, self.shown = now, self.done
        print(("\r" if self.redraw else "") + self.line(note, now), end="\n" if end or not self.redraw else "",
              file=self.stream or sys.stderr, flush=True)
