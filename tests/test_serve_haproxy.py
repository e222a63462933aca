"""cluster.serve as a user starts it on a machine without a cluster: its own local Ray instance, so Serve's HAProxy
ingress (serve.ingress=auto): HAProxy on the served port forwards each request to the HTTP server of one of two
replicas. The HTTP behaviour tests of test_serve_ray.py run again here against this endpoint (masks equal to
deeplab.predict's, JSON answers, concurrent requests, one-line 4xx, loopback only, the console's traffic line);
then what is particular to this ingress: every port it opens is on 127.0.0.1, answers carry the request id and
the Server-Timing breakdown, and Ctrl-C stops HAProxy and the replicas within seconds (Serve's default drain
is 30 s). The HAProxy wrapper's rewrite is checked with the real HAProxy binary's config check."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
import psutil  # noqa: E402  (installed with ray)

import test_serve_ray as http_tests  # noqa: E402
from cluster.serve_batch import PARTS, parse_server_timing  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
WRAPPER = ROOT / "cluster" / "haproxy_loopback.sh"

collection = http_tests.collection
# the same HTTP checks, answered through HAProxy instead of Serve's Python proxy (they use this module's endpoint)
test_info_and_health = http_tests.test_info_and_health
test_raw_upload_returns_the_label_png_equal_to_predict = (
    http_tests.test_raw_upload_returns_the_label_png_equal_to_predict)
test_multipart_upload_with_json_answer_has_counts_and_the_colour_png = (
    http_tests.test_multipart_upload_with_json_answer_has_counts_and_the_colour_png)
test_concurrent_requests_are_batched_and_each_gets_its_own_mask = (
    http_tests.test_concurrent_requests_are_batched_and_each_gets_its_own_mask)
test_bad_uploads_get_a_one_line_4xx_while_a_concurrent_good_request_succeeds = (
    http_tests.test_bad_uploads_get_a_one_line_4xx_while_a_concurrent_good_request_succeeds)
test_endpoint_binds_loopback_only = http_tests.test_endpoint_binds_loopback_only
test_the_console_keeps_a_traffic_line_and_the_access_lines_go_to_the_log_files = (
    http_tests.test_the_console_keeps_a_traffic_line_and_the_access_lines_go_to_the_log_files)


@pytest.fixture(scope="module")
def endpoint(collection):
    """("127.0.0.1", port, console lines, the command's process) of `python -m cluster.serve` on its own Ray."""
    from cluster.ray_session import free_port

    port = free_port()
    command = [sys.executable, "-m", "cluster.serve", str(collection["ckpt"]), "--port", str(port), "--replicas", "2",
               "--cpus-per-replica", "0.5", "--batch-wait-ms", "300", "--max-batch-size", "8",
               "--set", f"serve.max_pixels={http_tests.MAX_PIXELS}",
               "--set", f"serve.stats_interval_s={http_tests.STATS_INTERVAL_S}"]
    # RAY_ADDRESS=local: a Ray instance of its own even where `ray start` recorded a cluster on this machine
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": "local"}
    proc, lines = http_tests.serve_command(command, env, start_new_session=True)
    try:
        http_tests.wait_for_the_serving_line(proc, lines)
        yield "127.0.0.1", port, lines, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the command and the Ray it started
            proc.wait(timeout=60)


def served_by(proc) -> dict:
    """{pid: process} of the command's HAProxy processes and replicas (its descendants)."""
    family = psutil.Process(proc.pid).children(recursive=True)
    return {p.pid: p for p in family if _is_haproxy(p) or "ServeReplica" in " ".join(_cmdline(p))}


def _cmdline(p) -> list:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _is_haproxy(p) -> bool:
    line = _cmdline(p)
    return bool(line) and os.path.basename(line[0]) == "haproxy"


def test_the_start_line_names_the_haproxy_ingress(endpoint):
    assert any(line.startswith("serving ") and "HAProxy ingress" in line for line in endpoint[2]), endpoint[2]


def test_every_port_haproxy_and_the_replicas_listen_on_is_on_loopback(endpoint):
    """Ray's HAProxy config binds its stats page and metrics on every interface; cluster/haproxy_loopback.sh moves
    them to 127.0.0.1. The replicas' own HTTP servers bind serve.host (127.0.0.1). Ray's own worker ports are
    Ray's and are not counted here."""
    processes = served_by(endpoint[3])
    haproxies = [p for p in processes.values() if _is_haproxy(p)]
    assert haproxies, "no HAProxy process under the command"
    ports = {}
    for p in haproxies:
        for c in p.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                ports[c.laddr.port] = c.laddr.ip
    assert endpoint[1] in ports and len(ports) >= 3, ports  # the served port, the stats page, the metrics
    assert set(ports.values()) == {"127.0.0.1"}, ports
    replica_http = [c.laddr for p in processes.values() if not _is_haproxy(p)
                    for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.laddr.ip != "::"
                    and c.laddr.ip != "0.0.0.0"]
    assert len(replica_http) >= 2 and {a.ip for a in replica_http} == {"127.0.0.1"}, replica_http


def test_answers_carry_the_request_id_and_where_the_time_went(endpoint, collection):
    import http.client

    rel = collection["good"][0]
    conn = http.client.HTTPConnection("127.0.0.1", endpoint[1], timeout=120)
    try:
        conn.request("POST", "/segment", body=(collection["input"] / rel).read_bytes(),
                     headers={"Content-Type": "image/jpeg"})
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    assert response.status == 200
    assert len(response.getheader("x-request-id", "")) >= 16
    timing = parse_server_timing(response.getheader("Server-Timing", ""))
    assert set(PARTS) <= set(timing) and timing["replica"] >= timing["model"] > 0, timing


def test_ctrl_c_stops_haproxy_and_the_replicas_within_seconds(endpoint):
    """Last: it stops the endpoint. One `interrupted` line, exit 130, and every HAProxy and replica process gone."""
    proc, lines = endpoint[3], endpoint[2]
    processes = served_by(proc)
    assert any(_is_haproxy(p) for p in processes.values()) and len(processes) >= 3, processes
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, "".join(lines[-40:])
    stopped_s = time.monotonic() - start
    assert any(line.startswith("interrupted (SIGINT): the endpoint at ") for line in lines)
    _, alive = psutil.wait_procs(list(processes.values()), timeout=30)
    assert not alive, alive
    assert stopped_s < 25, f"Ctrl-C took {stopped_s:.1f} s"


def test_the_wrapper_moves_the_listeners_bound_everywhere_to_loopback_and_keeps_the_served_address(tmp_path):
    """The rewrite on a config shaped like Ray's (its stats and metrics binds, a frontend on 0.0.0.0), then the real
    HAProxy binary checks the result (-c) with the arguments Ray passes."""
    from cluster import ray_internals

    config = tmp_path / "haproxy.cfg"
    config.write_text("global\n    stats timeout 30s\ndefaults\n    mode http\n    timeout connect 1s\n"
                      "    timeout client 1s\n    timeout server 1s\nfrontend prometheus\n    bind :9101\n"
                      "    http-request use-service prometheus-exporter if { path /metrics }\n"
                      "frontend http_frontend\n    bind 0.0.0.0:8000\n    default_backend replicas\n"
                      "backend replicas\n    server replica1 127.0.0.1:30000\nlisten stats\n  bind *:8404\n"
                      "  stats enable\n")
    env = {**os.environ, "DEEPLAB_HAPROXY_BINARY": ray_internals.haproxy_binary()}
    done = subprocess.run([str(WRAPPER), "-db", "-c", "-f", str(config)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    binds = [line.split()[1] for line in config.read_text().splitlines() if line.strip().startswith("bind ")]
    assert binds == ["127.0.0.1:9101", "0.0.0.0:8000", "127.0.0.1:8404"]
    done = subprocess.run([str(WRAPPER), "-c", "-f", str(config)], env={k: v for k, v in env.items()
                          if k != "DEEPLAB_HAPROXY_BINARY"}, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "DEEPLAB_HAPROXY_BINARY" in done.stderr


def test_without_a_haproxy_binary_auto_serves_through_the_proxy_and_asking_for_haproxy_is_one_line():
    """Where Ray finds no HAProxy (ray[serve] ships one on Linux only; here Ray is pointed at a missing one),
    serve.ingress=auto falls back to Serve's proxy and the HAProxy environment refuses in one line."""
    code = ("import ray\nfrom cluster import ray_internals\nfrom cluster.config import ServeConfig\n"
            "from cluster.serve import chosen_ingress, haproxy_env\nassert ray_internals.haproxy_binary() is None\n"
            "ray.init(num_cpus=1, include_dashboard=False)\nassert ray_internals.started_here()\n"
            "assert chosen_ingress(ServeConfig()) == 'proxy', chosen_ingress(ServeConfig())\nray.shutdown()\n"
            "try:\n    haproxy_env()\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    env = {**os.environ, "RAY_SERVE_HAPROXY_BINARY_PATH": "/nonexistent/haproxy", "RAY_ADDRESS": "local"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("UserError serve.ingress=haproxy: no HAProxy binary here"), done.stdout
