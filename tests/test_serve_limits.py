"""cluster.serve's bounds on a real Ray cluster (ray.cluster_utils.Cluster, one node), real HTTP on loopback,
every request bounded by a client timeout: the project's Prometheus metrics scraped from the node's metrics
agent, the pixel budget per model call, 64 concurrent requests against a queue of 16 (200 or 503, none hangs),
slow uploads losing their slot (408), a request over its timeout (504), and readiness after the warm-up."""
import http.client
import json
import select
import threading
import time
import urllib.request

import numpy as np
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from inference_files import jpeg_bytes, photo, tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow
SIDE = 64


@pytest.fixture(scope="module", params=["proxy", "haproxy"])
def env(request, tmp_path_factory):
    """A one-node cluster this process joins, served through each ingress in turn (serve.ingress; auto would be
    proxy here: the test did not start the cluster from this process)."""
    import os

    from cluster.ray_session import free_port

    saved = os.environ.pop("RAY_ADDRESS", None)
    metrics_port, http_port = free_port(), free_port()
    nodes = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 4, "dashboard_port": free_port(), "metrics_export_port": metrics_port,
        "_system_config": {"metrics_report_interval_ms": 1000}})
    ray.init(address=nodes.address)
    try:
        yield {"ckpt": tiny_checkpoint(tmp_path_factory.mktemp("limits") / "tiny.ckpt"), "port": http_port,
               "ingress": request.param,
               "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        nodes.shutdown()
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved


def deploy(env, **options):
    from cluster.config import ServeConfig
    from cluster.serve import start

    cfg = ServeConfig(port=env["port"], ingress=env["ingress"], **{"batch_wait_ms": 50, **options})
    start(env["ckpt"], cfg, timeout_s=120)
    return cfg


def request(env, method, path, body=None, ctype="image/jpeg", timeout=120):
    """(status, headers, body bytes, seconds)."""
    conn = http.client.HTTPConnection("127.0.0.1", env["port"], timeout=timeout)
    start = time.monotonic()
    try:
        conn.request(method, path, body=body, headers={"Content-Type": ctype} if body is not None else {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read(), time.monotonic() - start
    finally:
        conn.close()


def concurrently(count, send):
    """``send(i)`` from ``count`` threads released together; every thread must end within 180 s."""
    results, barrier = {}, threading.Barrier(count)

    def run(i):
        barrier.wait(timeout=60)
        results[i] = send(i)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "a request hung"
    return [results[i] for i in range(count)]


def scrape(url) -> dict:
    """{(name, frozenset(labels)): value} of a Prometheus text page."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples, name, **labels) -> float:
    return sum(v for (n, lab), v in samples.items() if n == name and set(labels.items()) <= lab)


def test_metrics_and_the_pixel_budget(env):
    """6 concurrent 64x64 uploads under a budget of two such images per call: every call holds at most 2, each
    mask equals the one the image gets alone; one larger upload is 413 naming the budget; the scrape counts
    them all (the project's latency histogram, batch sizes, rejections by reason) next to Serve's own."""
    deploy(env, max_batch_pixels=2 * SIDE * SIDE, batch_wait_ms=500)
    bodies = [jpeg_bytes(photo((SIDE, SIDE), seed=s)) for s in range(6)]
    answers = concurrently(6, lambda i: request(env, "POST", "/segment?format=json", bodies[i]))
    assert [a[0] for a in answers] == [200] * 6
    batches = [json.loads(a[2])["batch"] for a in answers]
    assert max(batches) == 2 and min(batches) >= 1, batches
    alone = [json.loads(request(env, "POST", "/segment?format=json", body)[2])["color_png"] for body in bodies[:2]]
    assert alone == [json.loads(a[2])["color_png"] for a in answers[:2]]
    status, _, body, _ = request(env, "POST", "/segment", jpeg_bytes(photo((2 * SIDE + 8, SIDE), seed=7)))
    assert status == 413 and f"limit of {2 * SIDE * SIDE} pixels" in body.decode()
    assert "serve.max_batch_pixels" in body.decode()
    assert request(env, "POST", "/segment", b"words", ctype="text/plain")[0] == 415
    sizes = batches + [1, 1]  # the two sent alone
    calls = {n: sizes.count(n) // n for n in (1, 2)}  # a call of 2 answers 2 requests
    want = {"requests": 10, "too_large": 1, "unsupported_type": 1, "calls": calls[1] + calls[2], "calls of 1": calls[1]}
    deadline, got = time.monotonic() + 90, {}
    while time.monotonic() < deadline:
        samples = scrape(env["metrics"])
        got = {"requests": total(samples, "ray_deeplab_request_latency_ms_count"),
               "too_large": total(samples, "ray_deeplab_rejected_requests_total", reason="too_large"),
               "unsupported_type": total(samples, "ray_deeplab_rejected_requests_total", reason="unsupported_type"),
               "calls": total(samples, "ray_deeplab_batch_size_count"),
               "calls of 1": total(samples, "ray_deeplab_batch_size_bucket", le="1.0")}
        if got == want and total(samples, "ray_serve_num_http_requests_total") >= 10:
            break
        time.sleep(2)
    assert got == want, got
    assert total(samples, "ray_deeplab_request_latency_ms_count", status="200") == 8


def test_overload_64_requests_against_a_queue_of_16_get_200_or_503_and_none_hangs(env):
    """One replica holds 16 requests (two batches of 8), 16 more queue (at Serve's proxy, or at the replica behind
    HAProxy); the rest are told 503 with Retry-After at once. A 1 s batch wait keeps the replica busy while all 64
    arrive."""
    deploy(env, max_queued_requests=16, max_batch_size=8, batch_wait_ms=1000, request_timeout_s=60, retry_after_s=2)
    body = jpeg_bytes(photo((SIDE, SIDE), seed=1))
    answers = concurrently(64, lambda i: request(env, "POST", "/segment", body, timeout=90))
    statuses = [a[0] for a in answers]
    counts = {s: statuses.count(s) for s in set(statuses)}
    print(f"64 concurrent requests, queue of 16: {counts}, slowest {max(a[3] for a in answers):.1f}s")
    assert set(counts) <= {200, 503} and counts.get(200, 0) >= 16 and counts.get(503, 0) >= 1, counts
    assert all(a[1].get("retry-after") == "2" for a in answers if a[0] == 503)
    assert all(a[3] < 60 for a in answers)
    assert request(env, "GET", "/healthz")[0] == 200


def slow_upload(env, size: int, seconds: float) -> tuple:
    """Headers promising ``size`` bytes, then one byte a second until the server answers (at most ``seconds``
    bytes); (status, body, seconds) of the answer."""
    conn = http.client.HTTPConnection("127.0.0.1", env["port"], timeout=60)
    start = time.monotonic()
    try:
        conn.putrequest("POST", "/segment")
        conn.putheader("Content-Type", "image/jpeg")
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
        for _ in range(int(seconds)):
            try:
                conn.send(b"\xff")
            except OSError:
                break
            if select.select([conn.sock], [], [], 1)[0]:  # answered (or closed): no need to dribble on
                break
        r = conn.getresponse()
        return r.status, r.read().decode(), time.monotonic() - start
    finally:
        conn.close()


def test_slow_uploads_lose_their_slot_after_the_read_timeout(env):
    """8 clients dribbling a byte a second hold all 8 slots of the replica; after serve.read_timeout_s each is
    answered 408 and a normal upload sent meanwhile is served."""
    deploy(env, read_timeout_s=3, max_batch_size=1, max_queued_requests=8)  # 8 slots
    good = jpeg_bytes(photo((SIDE, SIDE), seed=2))
    results = {}
    slow = [threading.Thread(target=lambda i=i: results.__setitem__(i, slow_upload(env, 10_000, 12)), daemon=True)
            for i in range(8)]
    for t in slow:
        t.start()
    time.sleep(1)
    status, _, _, seconds = request(env, "POST", "/segment", good, timeout=60)
    for t in slow:
        t.join(timeout=60)
    assert status == 200 and seconds < 20
    assert len(results) == 8
    for code, text, took in results.values():
        assert code == 408 and "serve.read_timeout_s=3" in text and took < 15, (code, text, took)


def test_a_lone_request_is_not_held_for_the_batch_wait_and_its_answer_says_where_its_time_went(env):
    """With a 5 s batch wait, a request alone is run at once (the batch-wait part of its Server-Timing is ~0, not
    5000 ms); the parts add up to the replica's time, which is within the client's."""
    from cluster.serve_batch import PARTS, parse_server_timing

    deploy(env, batch_wait_ms=5000)
    status, headers, _, seconds = request(env, "POST", "/segment", jpeg_bytes(photo((SIDE, SIDE), seed=4)))
    timing = parse_server_timing({k.lower(): v for k, v in headers.items()}.get("server-timing", ""))
    assert status == 200 and set(PARTS) | {"replica"} <= set(timing), timing
    assert timing["batch"] < 1000, timing
    assert 0.7 * timing["replica"] <= sum(timing[p] for p in PARTS) <= timing["replica"] + 0.05, timing
    assert timing["replica"] <= 1000 * seconds


def test_a_request_over_its_timeout_is_504_and_the_replica_is_ready(env):
    """A 1024x1024 upload takes the tiny model longer than serve.request_timeout_s=0.1 (0.3-1 s here)."""
    deploy(env, request_timeout_s=0.1)
    status, _, body, seconds = request(env, "POST", "/segment", jpeg_bytes(photo((1024, 1024), seed=3)))
    assert status == 504 and "serve.request_timeout_s=0.1" in body.decode() and seconds < 4.5, (status, seconds)
    status, _, body, _ = request(env, "GET", "/readyz")
    ready = json.loads(body)
    assert status == 200 and ready["ready"] and ready["model_loaded"] and ready["warmed_up"]
    assert ready["warmup_ms"] > 0
    assert request(env, "GET", "/healthz")[:1] == (200,)
    assert np.isfinite(json.loads(request(env, "GET", "/info")[2])["warmup_ms"])
