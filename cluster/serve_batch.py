"""cluster.serve's dynamic batcher and the per-request time breakdown it reports, without Ray (tested alone).

The batcher runs one model call at a time on its own thread, so the event loop, decoding and encoding go on
while the model runs. When the model is idle it dispatches at once: a lone request never waits for company
it will not get. A call takes at most half of the requests waiting for it (rounded up): the other half runs
next while the first half's answers travel back and their clients' next requests arrive, so the model is not
left idle for a round trip, as it is when every client's request shares one call (with as many clients as the
batch size, that costs more than batching saves: simulated and measured). Under load the calls grow to
max_batch_size. A call is held back (at most ``max_wait_s``, serve.batch_wait_ms) only while requests that
have already arrived at the replica and are still being read or decoded would join it. Triton's dynamic
batcher, by contrast, waits its max_queue_delay for a preferred batch size whether or not more are coming.

A call takes the queue's oldest request and the others of its image size (images are never resized to
share a call) up to ``max_batch_size`` images and ``max_batch_pixels`` pixels; the rest wait for the next
call, oldest first.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

# The parts of one request's time at the replica, in the order they happen (Server-Timing names).
PARTS = ("read", "decode", "queue", "batch", "model", "encode")
PART_HELP = {"proxy": "HTTP proxy, Ray's hop to the replica and back, loopback (the client's time minus the "
                      "replica's)",
             "read": "receiving the upload", "decode": "decoding and normalizing the image",
             "queue": "waiting while the model ran earlier calls", "batch": "held back for company (model idle)",
             "model": "the model call the request was in (all its images)", "encode": "encoding the answer",
             "other": "the replica's own overhead (event loop, Serve)"}


@dataclass
class Waiting:
    item: object
    shape: tuple
    enqueued: float
    future: asyncio.Future = field(repr=False, default=None)


@dataclass
class CallResult:
    """What a request learns from its model call: its result (or the call's exception), the images in the
    call, and its times in ms."""

    result: object
    images: int
    queue_ms: float
    batch_ms: float
    model_ms: float


class DynamicBatcher:
    """``await submit(item, shape)`` -> CallResult. ``run(items) -> results`` runs one model call on the model
    thread; an exception fails that call's requests only. ``on_call(images)`` is told each call's size."""

    def __init__(self, run: Callable[[list], Sequence], max_batch_size: int = 8, max_wait_s: float = 0.01,
                 max_batch_pixels: Optional[int] = None, on_call: Callable[[int], None] = lambda images: None,
                 clock: Callable[[], float] = time.perf_counter):
        self.run, self.max_batch_size, self.max_wait_s = run, max(1, int(max_batch_size)), max(0.0, max_wait_s)
        self.max_batch_pixels, self.on_call, self.clock = max_batch_pixels, on_call, clock
        self.pending: list = []
        self.arriving = 0  # requests at the replica still being read or decoded: company on its way
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._wake: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._idle_since = -float("inf")  # when the model last finished a call

    # ---- what the replica calls
    def arrived(self) -> None:
        """A request reached the replica; it will be submitted (or fail) soon: call left() or submit()."""
        self.arriving += 1

    def left(self) -> None:
        """A request that arrived() will not be submitted (bad upload, timeout)."""
        self.arriving = max(0, self.arriving - 1)
        self._poke()

    async def submit(self, item, shape: tuple, counted: bool = True) -> CallResult:
        """Queue ``item`` (an image of ``shape``) for the model. ``counted``: it was announced with arrived()."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._dispatch_forever())
        waiting = Waiting(item, tuple(shape), self.clock(), loop.create_future())
        self.pending.append(waiting)
        if counted:
            self.arriving = max(0, self.arriving - 1)
        self._poke()
        return await waiting.future

    # ---- the dispatch loop
    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _pixels(self, shape: tuple) -> int:
        return int(shape[0]) * int(shape[1])

    def _room(self, shape: tuple) -> int:
        """How many images of ``shape`` one call may hold: max_batch_size and the pixel budget."""
        room = self.max_batch_size
        if self.max_batch_pixels:
            room = min(room, max(1, self.max_batch_pixels // max(1, self._pixels(shape))))
        return room

    def _call_size(self, waiting: int, shape: tuple) -> int:
        """Images in the next call when ``waiting`` requests of its size wait: half of them, rounded up."""
        return min(self._room(shape), max(1, -(-waiting // 2)))

    def take(self) -> list:
        """The next call: the oldest request and others of its size (_call_size of them), oldest first."""
        self.pending = [w for w in self.pending if not w.future.done()]  # requests that timed out are gone
        if not self.pending:
            return []
        first = self.pending[0]
        same = [w for w in self.pending if w.shape == first.shape]
        call = same[:self._call_size(len(same), first.shape)]
        taken = {id(w) for w in call}
        self.pending = [w for w in self.pending if id(w) not in taken]
        return call

    def _would_grow(self) -> bool:
        """Whether requests on their way (being read or decoded) would join the next call: only then is it
        worth holding. Their size is not known yet: counted as the oldest request's."""
        first = self.pending[0]
        same = sum(1 for w in self.pending if w.shape == first.shape)
        return self._call_size(same + self.arriving, first.shape) > self._call_size(same, first.shape)

    async def _dispatch_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self.pending:
                continue
            # The model is idle. Wait only for company on its way that would join, and at most max_wait_s.
            deadline = self.clock() + self.max_wait_s
            while self.pending and self._would_grow() and self.clock() < deadline:
                try:
                    await asyncio.wait_for(self._wake.wait(), deadline - self.clock())
                except asyncio.TimeoutError:
                    break
                self._wake.clear()
            call = self.take()
            if not call:
                continue
            start = self.clock()
            self.on_call(len(call))
            try:
                results = list(await loop.run_in_executor(self.model_thread, self.run, [w.item for w in call]))
            except Exception as e:  # the model failed this call: its requests are told, the others go on
                results = [e] * len(call)
            end = self.clock()
            for waiting, result in zip(call, results):
                held_from = max(waiting.enqueued, self._idle_since)
                batch = max(0.0, start - held_from)
                if not waiting.future.done():  # a request that timed out meanwhile is gone
                    waiting.future.set_result(CallResult(result, len(call), 1000 * (start - waiting.enqueued - batch),
                                                         1000 * batch, 1000 * (end - start)))
            self._idle_since = end
            if self.pending:
                self._wake.set()


# ------------------------------------------------------------------------------- the breakdown, as a header
def server_timing(parts: dict) -> str:
    """A Server-Timing header value (W3C; browsers' developer tools show it): ``read;dur=0.12, ...`` in ms."""
    return ", ".join(f"{name};dur={ms:.2f}" for name, ms in parts.items())


def parse_server_timing(value: str) -> dict:
    """{name: ms} of a Server-Timing header value (entries without a dur are left out)."""
    out = {}
    for entry in value.split(","):
        name, *params = [p.strip() for p in entry.split(";")]
        for param in params:
            key, _, number = param.partition("=")
            if key.strip() == "dur" and name:
                try:
                    out[name] = float(number)
                except ValueError:
                    pass
    return out
