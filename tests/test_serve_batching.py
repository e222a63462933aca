"""cluster.serve's dynamic batcher without Ray (real asyncio, a real model thread, a stand-in model call that
records what it was given), and the bench's breakdown and flag rules. Asserts on what the batcher records (the
batch-wait part of each request's time, the images per call), never on how long a test took."""
import asyncio
import threading

import pytest

from cluster.bench_serve import BREAKDOWN, breakdown, flags, parse_ab
from cluster.serve_batch import DynamicBatcher, parse_server_timing, server_timing


class Model:
    """Records each call's items; ``gate`` (a threading.Event) holds a call until the test releases it."""

    def __init__(self, gate=None, fail_on=()):
        self.calls, self.gate, self.fail_on, self.started = [], gate, set(fail_on), threading.Event()

    def __call__(self, items):
        self.started.set()
        if self.gate is not None:
            self.gate.wait(30)
        self.calls.append(list(items))
        if set(items) & self.fail_on:
            raise RuntimeError("this call fails")
        return [f"labels of {item}" for item in items]


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 60))


def test_a_lone_request_is_dispatched_at_once_not_held_for_the_batch_wait():
    model = Model()
    batcher = DynamicBatcher(model, max_batch_size=8, max_wait_s=30.0)

    async def lone():
        batcher.arrived()
        return await batcher.submit("a", (64, 64))

    answer = run(lone())
    assert answer.result == "labels of a" and answer.images == 1 and model.calls == [["a"]]
    assert answer.batch_ms < 1000 and answer.queue_ms < 1000  # held for the 30 s wait it would be 30000


async def _arrive_then_submit(batcher, item, delay_s):
    await asyncio.sleep(delay_s)
    return await batcher.submit(item, (64, 64))


def test_company_already_at_the_replica_is_waited_for_and_shares_the_call():
    """Three requests arrived (being decoded); the first ready one waits for the others, then the call takes half
    of them rounded up (two), and the third runs next."""
    model = Model()
    batcher = DynamicBatcher(model, max_batch_size=8, max_wait_s=30.0)

    async def three():
        for _ in range(3):
            batcher.arrived()
        return await asyncio.gather(*(_arrive_then_submit(batcher, item, delay)
                                      for item, delay in (("a", 0), ("b", 0.2), ("c", 0.3))))

    first, second, third = run(three())
    assert model.calls == [["a", "b"], ["c"]] and first.images == second.images == 2
    assert first.batch_ms > 200 and second.batch_ms < first.batch_ms  # "a" was held for the others, never 30 s
    assert first.batch_ms < 30000 and third.images == 1


def test_a_request_on_its_way_that_would_not_join_the_call_is_not_waited_for():
    """Two waiting would make a call of one (half, rounded up) either way: nothing to wait for."""
    model = Model()
    batcher = DynamicBatcher(model, max_batch_size=8, max_wait_s=30.0)

    async def pair():
        batcher.arrived()
        batcher.arrived()
        return await asyncio.gather(_arrive_then_submit(batcher, "a", 0), _arrive_then_submit(batcher, "b", 0.2))

    first, _ = run(pair())
    assert model.calls == [["a"], ["b"]] and first.batch_ms < 1000


def test_company_that_never_comes_holds_a_call_at_most_the_batch_wait():
    model = Model()
    batcher = DynamicBatcher(model, max_batch_size=8, max_wait_s=0.3)

    async def one_of_three():
        for _ in range(3):
            batcher.arrived()  # two of them announced, but they never submit (e.g. slow uploads)
        return await batcher.submit("a", (64, 64))

    answer = run(one_of_three())
    assert model.calls == [["a"]] and 250 <= answer.batch_ms < 5000


def test_a_request_that_fails_before_its_submit_stops_holding_the_others():
    model = Model()
    batcher = DynamicBatcher(model, max_batch_size=8, max_wait_s=30.0)

    async def bad_neighbours():
        for _ in range(3):
            batcher.arrived()
        waiting = asyncio.ensure_future(batcher.submit("a", (64, 64)))
        await asyncio.sleep(0.1)
        batcher.left()  # the others were bad uploads: nobody else is coming
        batcher.left()
        return await waiting

    answer = run(bad_neighbours())
    assert model.calls == [["a"]] and 50 <= answer.batch_ms < 5000


def test_requests_queued_while_the_model_runs_form_the_next_call():
    gate = threading.Event()
    model = Model(gate)
    batcher = DynamicBatcher(model, max_batch_size=4, max_wait_s=0.0)

    async def burst():
        first = asyncio.ensure_future(batcher.submit("r0", (64, 64), counted=False))
        await asyncio.get_running_loop().run_in_executor(None, model.started.wait, 30)
        rest = [asyncio.ensure_future(batcher.submit(f"r{i}", (64, 64), counted=False)) for i in range(1, 7)]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(first, *rest)

    answers = run(burst())
    # half of those waiting, rounded up, at most 4: the rest run while the first half's answers travel
    assert model.calls == [["r0"], ["r1", "r2", "r3"], ["r4", "r5"], ["r6"]]
    assert [a.images for a in answers] == [1, 3, 3, 3, 2, 2, 1]
    for queued in answers[1:]:  # they waited for the model, not for company: queue, not batch wait
        assert queued.queue_ms > 10 * max(queued.batch_ms, 0.1)


def test_a_call_holds_one_image_size_and_the_pixel_budget_oldest_first():
    gate = threading.Event()
    model = Model(gate)
    batcher = DynamicBatcher(model, max_batch_size=8, max_wait_s=0.0, max_batch_pixels=2 * 64 * 64)
    calls = []
    batcher.on_call = calls.append

    async def mixed():
        first = asyncio.ensure_future(batcher.submit("busy", (8, 8), counted=False))
        await asyncio.get_running_loop().run_in_executor(None, model.started.wait, 30)
        shapes = [(64, 64)] * 2 + [(32, 32)] + [(64, 64)] * 5 + [(32, 32)] * 3
        rest = [asyncio.ensure_future(batcher.submit(f"{i}:{h}", (h, w), counted=False))
                for i, (h, w) in enumerate(shapes)]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(first, *rest)

    run(mixed())
    sizes = {call[0].split(":")[1]: [] for call in model.calls[1:]}
    for call in model.calls[1:]:
        assert len({item.split(":")[1] for item in call}) == 1  # one image size per call
        sizes[call[0].split(":")[1]].append(len(call))
    assert sizes == {"64": [2, 2, 2, 1], "32": [2, 1, 1]}  # 64x64: the budget of 2; 32x32: half of those waiting
    assert model.calls[1] == ["0:64", "1:64"] and model.calls[2] == ["2:32", "8:32"]  # oldest first
    assert calls == [len(call) for call in model.calls]


def test_a_failing_call_fails_its_own_requests_only():
    gate = threading.Event()
    model = Model(gate, fail_on={"bad"})
    batcher = DynamicBatcher(model, max_batch_size=8, max_wait_s=0.0)

    async def two_sizes():
        first = asyncio.ensure_future(batcher.submit("busy", (8, 8), counted=False))
        await asyncio.get_running_loop().run_in_executor(None, model.started.wait, 30)
        bad = asyncio.ensure_future(batcher.submit("bad", (64, 64), counted=False))
        good = asyncio.ensure_future(batcher.submit("good", (32, 32), counted=False))
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(first, bad, good)

    _, bad, good = run(two_sizes())
    assert isinstance(bad.result, RuntimeError) and good.result == "labels of good"


def test_a_request_that_timed_out_in_the_queue_is_not_run():
    gate = threading.Event()
    model = Model(gate)
    batcher = DynamicBatcher(model, max_batch_size=8, max_wait_s=0.0)

    async def timeout():
        first = asyncio.ensure_future(batcher.submit("busy", (8, 8), counted=False))
        await asyncio.get_running_loop().run_in_executor(None, model.started.wait, 30)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(batcher.submit("late", (8, 8), counted=False), 0.05)
        kept = asyncio.ensure_future(batcher.submit("kept", (8, 8), counted=False))
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(first, kept)

    run(timeout())
    assert model.calls == [["busy"], ["kept"]]


def test_server_timing_round_trip():
    parts = {"read": 0.5, "decode": 1.25, "queue": 0.0, "model": 17.0, "replica": 19.0}
    assert parse_server_timing(server_timing(parts)) == pytest.approx(parts, abs=0.01)
    assert parse_server_timing('cache;desc="hit", db;dur=53, app;dur=47.2') == {"db": 53.0, "app": 47.2}


def test_the_breakdown_adds_up_to_the_clients_time():
    timings = [{"read": 1, "decode": 2, "queue": 3, "batch": 0, "model": 10, "encode": 1, "replica": 18},
               {"read": 1, "decode": 2, "queue": 5, "batch": 1, "model": 10, "encode": 1, "replica": 21}]
    parts = breakdown([25.0, 28.0], timings)
    assert list(parts)[:len(BREAKDOWN)] == list(BREAKDOWN)
    assert sum(parts[p] for p in BREAKDOWN) == pytest.approx(parts["total"]) == pytest.approx(26.5)
    assert parts["proxy"] == pytest.approx(26.5 - 19.5) and parts["other"] == pytest.approx(19.5 - 18.5)
    assert breakdown([25.0], [{}]) == {}  # a server without Server-Timing (an older version): no breakdown


def row(code="new", clients=8, batch=8, rps=10.0, p99=100.0):
    return {"code": code, "round": 1, "replicas": 1, "clients": clients, "max_batch_size": batch, "rps": rps,
            "p99": p99}


def test_batching_is_flagged_where_it_is_slower_or_its_tail_longer_than_batch_1():
    rows = [row(batch=8, rps=10.0, p99=100), row(batch=1, rps=9.0, p99=120),  # better on both: no flag
            row(clients=1, batch=8, rps=5.0, p99=30), row(clients=1, batch=1, rps=5.5, p99=25),  # worse on both
            row(code="old", batch=8, rps=9.0, p99=300), row(code="old", batch=1, rps=8.0, p99=200)]  # longer tail
    lines = flags(rows)
    assert len(lines) == 2
    assert "new round 1, 1 client(s)" in lines[0] and "5.00 req/s vs 5.50" in lines[0] and "p99 30 ms vs 25" in lines[0]
    assert "old round 1, 8 client(s)" in lines[1] and "p99 300 ms vs 200" in lines[1] and "req/s" not in lines[1]


AB_REPORT = """LOG: header received:
HTTP/1.1 200 OK
server-timing: read;dur=0.50, decode;dur=1.00, queue;dur=2.00, batch;dur=0.00, model;dur=15.00, \
encode;dur=0.50, replica;dur=19.50
content-type: image/png

LOG: header received:
HTTP/1.1 200 OK
server-timing: read;dur=0.50, decode;dur=1.00, queue;dur=4.00, batch;dur=0.00, model;dur=15.00, \
encode;dur=0.50, replica;dur=21.50
content-type: image/png

Time taken for tests:   0.100 seconds
Complete requests:      2
Failed requests:        0
Requests per second:    20.00 [#/sec] (mean)
Connection Times (ms)
              min  mean[+/-sd] median   max
Connect:        0    0   0.0      0       0
Processing:    22   25   2.0     25      28
Waiting:       22   25   2.0     25      28
Total:         22   25   2.0     25      28

Percentage of the requests served within a certain time (ms)
  50%     25
  90%     28
  99%     28
 100%     28 (longest request)
"""


def test_apache_bench_reports_are_read_with_their_server_timing():
    got = parse_ab(AB_REPORT)
    assert (got["requests"], got["rps"], got["p50"], got["p99"], got["errors"]) == (2, 20.0, 25.0, 28.0, 0)
    assert got["breakdown"]["queue"] == pytest.approx(3.0) and got["breakdown"]["proxy"] == pytest.approx(25 - 20.5)
