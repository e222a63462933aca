"""cluster.serve on a real 2-node Ray cluster (ray.cluster_utils.Cluster), started as a user types it, bound to
127.0.0.1 on a free port, with two replicas (the model reaches the second node through the object store).
Real HTTP requests with http.client, each bounded by a timeout: masks equal to deeplab.predict's, JSON with
pixel counts and the colour PNG, batching of concurrent requests, and bad uploads answered 4xx in one line
while a concurrent good request still succeeds."""
import base64
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from inference_files import image_collection, jpeg_bytes, photo, read_png, reference_predictions, tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
MAX_PIXELS = 100 * 100
STATS_INTERVAL_S = 3


def serve_controllers(address) -> list:
    from ray.util.state import list_actors

    ray.init(address=address)
    try:
        alive = list_actors(address=address, filters=[("state", "=", "ALIVE")], timeout=60)
        return [a for a in alive if a.class_name == "ServeController"]
    finally:
        ray.shutdown()


def serve_command(command: list, env: dict, **popen) -> tuple:
    """(process, the list its console lines are appended to as they come) of a started `cluster.serve`."""
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def wait_for_the_serving_line(proc, lines, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(line.startswith("serving ") for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "serve did not start:\n" + "".join(lines[-40:])
        time.sleep(0.5)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    ckpt = tiny_checkpoint(folder / "tiny.ckpt")
    good = image_collection(folder / "photos", count=8)
    reference = reference_predictions(ckpt, folder / "photos", good, folder / "reference")
    return {"ckpt": ckpt, "input": folder / "photos", "good": good, "reference": reference}


@pytest.fixture(scope="module")
def endpoint(collection):
    """(host, port) of a running `python -m cluster.serve`; Ctrl-C and the cluster's shutdown at the end."""
    from cluster.ray_session import free_port

    saved = os.environ.pop("RAY_ADDRESS", None)
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "dashboard_port": free_port()})
    nodes.add_node(num_cpus=2)
    nodes.wait_for_nodes()
    port = free_port()
    command = [sys.executable, "-m", "cluster.serve", str(collection["ckpt"]), "--port", str(port), "--replicas", "2",
               "--batch-wait-ms", "300", "--max-batch-size", "8", "--set", f"serve.max_pixels={MAX_PIXELS}",
               "--set", f"cluster.address={nodes.address}", "--set", f"serve.stats_interval_s={STATS_INTERVAL_S}"]
    proc, lines = serve_command(command, {**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for_the_serving_line(proc, lines)
        yield "127.0.0.1", port, lines, nodes.address
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, "".join(lines[-40:])
        assert any(line.startswith("interrupted (SIGINT): the endpoint at ") for line in lines)
        assert serve_controllers(nodes.address) == []  # it started Serve, so it stopped it
    finally:
        if proc.poll() is None:
            proc.kill()
        nodes.shutdown()
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved


def request(endpoint, method, path, body=None, content_type=None):
    """(status, content type, body bytes); every call bounded by a 120 s timeout."""
    host, port = endpoint[:2]
    conn = http.client.HTTPConnection(host, port, timeout=120)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": content_type} if content_type else {})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        conn.close()


def multipart(field: str, filename: str, data: bytes, boundary: str = "deeplabBoundary7MA4YWxk") -> tuple:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def png_array(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def reference(collection, rel, suffix=""):
    return read_png(collection["reference"] / f"{os.path.splitext(os.path.basename(rel))[0]}{suffix}.png")


def test_replicas_run_on_both_nodes(endpoint):
    """The model file exists on this machine only as far as Ray knows: a replica on the second node got it
    through the object store (ship_model)."""
    from ray.util.state import list_actors

    ray.init(address=endpoint[3])
    try:
        alive = list_actors(address=endpoint[3], filters=[("state", "=", "ALIVE")], timeout=60)
        replicas = [a for a in alive if "SegmentService" in a.class_name]
    finally:
        ray.shutdown()
    assert len(replicas) == 2 and len({a.node_id for a in replicas}) == 2, replicas


def test_info_and_health(endpoint):
    assert request(endpoint, "GET", "/healthz")[:1] == (200,)
    status, ctype, body = request(endpoint, "GET", "/info")
    info = json.loads(body)
    assert status == 200 and ctype.startswith("application/json")
    assert (info["num_classes"], info["output_stride"], info["backend"], info["max_batch_size"]) == (
        5, 16, "pytorch (cpu)", 8)
    assert info["class_names"] == [f"class_{i}" for i in range(5)] and info["max_pixels"] == MAX_PIXELS


def test_raw_upload_returns_the_label_png_equal_to_predict(endpoint, collection):
    for rel in collection["good"][:3]:
        ctype_in = "image/png" if rel.endswith(".png") else "image/jpeg"
        status, ctype, body = request(endpoint, "POST", "/segment", (collection["input"] / rel).read_bytes(), ctype_in)
        assert status == 200 and ctype == "image/png"
        np.testing.assert_array_equal(png_array(body), reference(collection, rel))


def test_multipart_upload_with_json_answer_has_counts_and_the_colour_png(endpoint, collection):
    rel = collection["good"][1]
    body, ctype_in = multipart("image", os.path.basename(rel), (collection["input"] / rel).read_bytes())
    status, ctype, answer = request(endpoint, "POST", "/segment?format=json", body, ctype_in)
    assert status == 200 and ctype.startswith("application/json")
    result = json.loads(answer)
    labels = reference(collection, rel)
    assert (result["height"], result["width"]) == labels.shape
    counts = np.bincount(labels.ravel(), minlength=5)
    assert result["pixels"] == {f"class_{k}": int(counts[k]) for k in np.argsort(-counts, kind="stable") if counts[k]}
    colour = png_array(base64.b64decode(result["color_png"]))
    np.testing.assert_array_equal(colour, reference(collection, rel, "_color"))


def test_concurrent_requests_are_batched_and_each_gets_its_own_mask(endpoint, collection):
    rels = collection["good"][:8]
    results, barrier = {}, threading.Barrier(len(rels))

    def send(rel):
        barrier.wait(timeout=60)
        status, _, body = request(endpoint, "POST", "/segment?format=json", (collection["input"] / rel).read_bytes(),
                                  "application/octet-stream")
        results[rel] = (status, json.loads(body))

    threads = [threading.Thread(target=send, args=(rel,)) for rel in rels]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert sorted(results) == sorted(rels)
    for rel, (status, result) in results.items():
        assert status == 200
        np.testing.assert_array_equal(png_array(base64.b64decode(result["color_png"])),
                                      reference(collection, rel, "_color"))
    # whether they shared a model call depends on timing: the batcher never holds a request for company (a tiny
    # model on an idle machine finishes each before the next arrives); sharing is tested in test_serve_batching
    assert all(1 <= result["batch"] <= 8 for _, result in results.values())


def test_bad_uploads_get_a_one_line_4xx_while_a_concurrent_good_request_succeeds(endpoint, collection):
    good_rel = collection["good"][0]
    whole = jpeg_bytes(photo((64, 64), seed=5))
    too_big = jpeg_bytes(photo((120, 120), seed=6))  # 14,400 pixels > MAX_PIXELS
    bad = {
        "truncated": (400, "POST", "/segment", whole[: len(whole) // 2], "image/jpeg", "truncated"),
        "not an image": (400, "POST", "/segment", b"plain words, no picture" * 4, "image/png", "not an image"),
        "too many pixels": (413, "POST", "/segment", too_big, "image/jpeg", f"limit of {MAX_PIXELS} pixels"),
        "wrong type": (415, "POST", "/segment", whole, "text/plain", "content type text/plain"),
        "EPS as a PNG": (415, "POST", "/segment", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n",
                         "image/png", "not accepted"),
        "empty": (400, "POST", "/segment", b"", "image/jpeg", "empty upload"),
        "no file field": (400, "POST", "/segment", *_no_file_field(), "no file field"),
        "GET /segment": (405, "GET", "/segment", None, None, "answers POST"),
        "unknown path": (404, "GET", "/predict", None, None, "no endpoint /predict"),
        "unknown format": (400, "POST", "/segment?format=xml", whole, "image/jpeg", "format=xml"),
    }
    answers = {}

    def send(key, method, path, body, ctype):
        answers[key] = request(endpoint, method, path, body, ctype)

    threads = [threading.Thread(target=send, args=("good", "POST", "/segment", (collection["input"] / good_rel)
                                                   .read_bytes(), "image/jpeg"))]
    threads += [threading.Thread(target=send, args=(k, *v[1:5])) for k, v in bad.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    status, _, body = answers["good"]
    assert status == 200
    np.testing.assert_array_equal(png_array(body), reference(collection, good_rel))
    for key, (want, *_, needle) in bad.items():
        status, ctype, body = answers[key]
        text = body.decode()
        assert status == want, (key, status, text)
        assert text.startswith("error: ") and text.count("\n") == 1 and needle in text, (key, text)
    # and the replicas keep serving
    assert request(endpoint, "GET", "/healthz")[0] == 200
    status, _, body = request(endpoint, "POST", "/segment", (collection["input"] / good_rel).read_bytes(), "image/jpeg")
    assert status == 200 and np.array_equal(png_array(body), reference(collection, good_rel))


def _no_file_field():
    boundary = "b0undary"
    body = f"--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n--{boundary}--\r\n"
    return body.encode(), f"multipart/form-data; boundary={boundary}"


def test_endpoint_binds_loopback_only(endpoint):
    """The default host is 127.0.0.1: the port is not reachable on the address Ray's nodes use."""
    import socket

    _, port, lines, _ = endpoint
    assert any(f"at http://127.0.0.1:{port}" in line for line in lines)
    node_ip = ray.util.get_node_ip_address()
    if node_ip.startswith("127."):
        pytest.skip("this machine has no non-loopback address to try")
    with socket.socket() as s:
        s.settimeout(5)
        assert s.connect_ex((node_ip, port)) != 0
    with socket.socket() as s:  # the check can fail: the same port answers on loopback
        s.settimeout(5)
        assert s.connect_ex(("127.0.0.1", port)) == 0


def test_a_second_serve_with_other_http_options_is_refused_in_one_line_and_the_first_keeps_serving(endpoint):
    """Serve already runs bound to the first port: Ray would ignore a new port and keep the old proxy, so the
    command refuses in one line and prints no URL; the same for another ingress than the running Serve's (this
    cluster was joined, so auto chose Serve's proxy), and for the same endpoint while the first command serves
    there (it would take that command's endpoint over); the running endpoint is left alone."""
    from cluster.ray_session import free_port

    other = free_port()
    done = subprocess.run([sys.executable, "-m", "cluster.serve", "MODEL_UNUSED", "--port", str(other), "--set",
                           f"cluster.address={endpoint[3]}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 2
    assert "MODEL_UNUSED: no such model file" in done.stderr  # the model is checked before Ray
    model = next(line.split()[1] for line in endpoint[2] if line.startswith("serving "))
    done = subprocess.run([sys.executable, "-m", "cluster.serve", model, "--port", str(other), "--set",
                           f"cluster.address={endpoint[3]}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and err[-1].startswith("error: Serve already runs") and f":{endpoint[1]}" in err[-1]
    assert "http://" not in done.stdout and "serving" not in done.stdout
    done = subprocess.run([sys.executable, "-m", "cluster.serve", model, "--port", str(endpoint[1]), "--ingress",
                           "haproxy", "--set", f"cluster.address={endpoint[3]}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and err[-1].startswith("error: Serve already runs on this cluster with the proxy "
                                                       "ingress, not haproxy"), done.stderr[-2000:]
    assert request(endpoint, "GET", "/healthz")[0] == 200
    info = request(endpoint, "GET", "/info")
    done = subprocess.run([sys.executable, "-m", "cluster.serve", model, "--port", str(endpoint[1]),
                           "--max-batch-size", "2", "--set", f"cluster.address={endpoint[3]}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and err[-1].startswith(f"error: Serve on this cluster already serves application "
                                                       f"deeplab at 127.0.0.1:{endpoint[1]}"), done.stderr[-2000:]
    assert "http://" not in done.stdout and "serving" not in done.stdout
    assert request(endpoint, "GET", "/info") == info  # max_batch_size 8 still: the first command's deployment


def test_the_console_keeps_a_traffic_line_and_the_access_lines_go_to_the_log_files(endpoint, collection):
    """After the requests above: a line per stats interval with traffic (requests, p50/p99, mean batch, 4xx/5xx),
    no Serve access line on the console, and the access lines in the log folder the start line names."""
    import glob
    import re

    rel = collection["good"][0]
    for _ in range(3):
        assert request(endpoint, "POST", "/segment", (collection["input"] / rel).read_bytes(), "image/jpeg")[0] == 200
    time.sleep(2 * STATS_INTERVAL_S + 1)
    lines = endpoint[2]
    traffic = [line for line in lines if re.search(r"requests, p50 \d+ ms, p99 \d+ ms, mean batch [\d.]+, "
                                                  r"4xx \d+, 5xx \d+$", line.strip())]
    assert traffic, "".join(lines[-20:])
    assert sum(int(line.split(": ", 1)[1].split()[0]) for line in traffic) >= 3
    assert not [line for line in lines if "POST / " in line or "ServeReplica" in line or "GET / " in line]
    pointers = next(line for line in lines if line.startswith("metrics (Prometheus): "))
    logs = re.search(r"errors by request id: (\S+)/ on the head node", pointers).group(1)
    access = [f for f in glob.glob(os.path.join(logs, "replica_*.log")) if " 200 " in Path(f).read_text()]
    assert access, logs
