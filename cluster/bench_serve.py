"""python -m cluster.bench_serve [MODEL] [--client python|ab] [--clients 1 8] [--requests 48] [--rounds 1]

Figures for the two ways to run a model on Ray, bounded and on loopback only:
  cluster.serve    requests/s and p50/p90/p99 latency at each --clients count, with dynamic batching (up to 8
                   images per model call) and without (batch 1), one replica (--replicas), next to the bare
                   runner measured in the same run (decode, normalize, model, argmax, PNG encode; one process,
                   as many threads as a replica's CPUs) and the serve/bare ratio; where each request's time
                   went (the replica's Server-Timing header: read, decode, queue, batch wait, model, encode;
                   proxy = the client's time minus the replica's); a FLAG where batching is slower than batch 1
                   or its p99 longer
  cluster.segment  images/s with 1 and 2 model actors over a folder of generated images, and where the time
                   before the first results went (Ray start, listing, actor start, model load, first batch)

Each serving setting runs `python -m cluster.serve` in a fresh interpreter, as a user does, from this source
tree or from the trees given with --code LABEL=DIR (e.g. an older checkout: before/after figures in one run,
interleaved round by round). --client ab drives Apache Bench (`ab`, Debian's apache2-utils) instead of the
built-in Python client. MODEL is any model file (.ckpt, .onnx, .xml IR, engine); without it the config's
model (--config / --set model.backbone=...) is built with random weights, which time the same as trained
ones. Every request goes to 127.0.0.1; each setting sends exactly --requests requests after a warm-up.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from cluster.infer import open_model, set_threads
from cluster.ray_session import free_port, init_ray
from cluster.segment_inputs import list_inputs
from cluster.segment_pipeline import segment, startup_line
from cluster.serve import APP_NAME, image_limit, start
from cluster.serve_batch import PARTS, parse_server_timing
from deeplab.cli import UserError, command
from deeplab.config import ConfigError, add_config_args, config_from_args
from deeplab.data.io import read_image
from deeplab.fileio import write_text_atomic

BREAKDOWN = ("proxy",) + PARTS + ("other",)


def make_images(folder: Path, count: int, size: int, seed: int = 0) -> list:
    """``count`` JPEGs of size x size (smooth colour fields plus noise, so JPEG sizes are realistic)."""

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        base = np.stack([np.sin(6 * xx * rng.random() + c) * np.cos(5 * yy * rng.random()) for c in range(3)], -1)
        image = np.clip(127 + 100 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"bench_{i:04d}.jpg"
        Image.fromarray(image).save(path, quality=90)
        paths.append(path)
    return paths


def percentile_ms(latencies: list, q: float) -> float:
    return float(np.percentile(np.asarray(latencies) * 1000, q)) if latencies else float("nan")


# ------------------------------------------------------------------------------------------- the breakdown
def breakdown(totals_ms: list, timings: list) -> dict:
    """Mean ms per part over the answered requests: the replica's parts from its Server-Timing headers
    (``timings``: one {part: ms} each), ``other`` = the replica's time not in a part, ``proxy`` = the client's
    mean time minus the replica's mean. Empty when the server sent no Server-Timing (an older version)."""
    timings = [t for t in timings if "replica" in t]
    if not timings or not totals_ms:
        return {}
    mean = {part: float(np.mean([t.get(part, 0.0) for t in timings])) for part in PARTS}
    replica = float(np.mean([t["replica"] for t in timings]))
    mean["other"] = replica - sum(mean.values())
    mean["proxy"] = float(np.mean(totals_ms)) - replica
    return {part: mean[part] for part in BREAKDOWN} | {"total": float(np.mean(totals_ms))}


def breakdown_line(parts: dict) -> str:
    if not parts:
        return "breakdown: none (this server sends no Server-Timing header)"
    return "breakdown, mean ms: " + "  ".join(f"{part} {parts[part]:.1f}" for part in BREAKDOWN) + \
        f"  = {parts['total']:.1f}"


def flags(rows: list) -> list:
    """One line per client count where batching on is slower than batch 1 or its p99 longer (same code, same
    round): the issue's rule that batching never costs throughput nor tail."""
    out = []
    by_key = {(r["code"], r["round"], r["replicas"], r["clients"], r["max_batch_size"] > 1): r for r in rows}
    for (code, rnd, replicas, clients, batching), on in by_key.items():
        off = by_key.get((code, rnd, replicas, clients, False))
        if not batching or off is None:
            continue
        why = []
        if on["rps"] < off["rps"]:
            why.append(f"{on['rps']:.2f} req/s vs {off['rps']:.2f} at batch 1")
        if on["p99"] > off["p99"]:
            why.append(f"p99 {on['p99']:.0f} ms vs {off['p99']:.0f} at batch 1")
        if why:
            out.append(f"FLAG {code} round {rnd}, {clients} client(s): batching up to {on['max_batch_size']} is "
                       + " and ".join(why))
    return out


# ------------------------------------------------------------------------------------------------ clients
def load(url_host: str, port: int, bodies: list, requests: int, clients: int, timeout_s: float = 120) -> dict:
    """``requests`` POST /segment calls from ``clients`` threads (one keep-alive connection each)."""
    lock, next_index = threading.Lock(), [0]
    latencies, errors, timings = [], [], []

    def client():
        conn = http.client.HTTPConnection(url_host, port, timeout=timeout_s)
        try:
            while True:
                with lock:
                    i = next_index[0]
                    next_index[0] += 1
                if i >= requests:
                    return
                start = time.perf_counter()
                timing = {}
                try:
                    conn.request("POST", "/segment", body=bodies[i % len(bodies)],
                                 headers={"Content-Type": "image/jpeg"})
                    response = conn.getresponse()
                    response.read()
                    outcome = response.status
                    timing = parse_server_timing(response.getheader("server-timing") or "")
                except OSError as e:
                    outcome = str(e)
                    conn.close()
                elapsed = time.perf_counter() - start
                with lock:
                    if outcome == 200:
                        latencies.append(elapsed)
                        timings.append(timing)
                    else:
                        errors.append(outcome)
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"requests": requests, "clients": clients, "seconds": wall, "rps": len(latencies) / wall,
            "p50": percentile_ms(latencies, 50), "p90": percentile_ms(latencies, 90),
            "p99": percentile_ms(latencies, 99), "errors": len(errors),
            "breakdown": breakdown([1000 * x for x in latencies], timings)}


def parse_ab(text: str) -> dict:
    """Apache Bench's report (run with -v 4: every answer's headers are in it too) as load()'s row."""
    def number(pattern, default=float("nan")):
        found = re.search(pattern, text, re.M)
        return float(found.group(1)) if found else default

    percent = {int(q): float(ms) for q, ms in re.findall(r"^\s+(\d+)%\s+(\d+)", text, re.M)}
    complete, failed = number(r"^Complete requests:\s+(\d+)", 0), number(r"^Failed requests:\s+(\d+)", 0)
    non_2xx = number(r"^Non-2xx responses:\s+(\d+)", 0)
    total_mean = number(r"^Total:\s+\d+\s+(\d+)")
    timings = [parse_server_timing(v) for v in re.findall(r"^server-timing:\s*(.+?)\s*$", text, re.M | re.I)]
    answered = int(complete - failed - non_2xx)
    return {"requests": int(complete), "seconds": number(r"^Time taken for tests:\s+([\d.]+)"),
            "rps": number(r"^Requests per second:\s+([\d.]+)") * answered / max(1, complete),
            "p50": percent.get(50, float("nan")), "p90": percent.get(90, float("nan")),
            "p99": percent.get(99, float("nan")), "errors": int(failed + non_2xx),
            "breakdown": breakdown([total_mean] * max(1, len(timings)), timings)}


def load_ab(port: int, body_file: Path, requests: int, clients: int, timeout_s: float = 120) -> dict:
    """The same load from Apache Bench: ``ab -c CLIENTS -n REQUESTS`` POSTing one JPEG (a new connection per
    request, as `ab` does without -k)."""
    args = ["ab", "-v", "4", "-s", str(int(timeout_s)), "-c", str(clients), "-n", str(requests),
            "-p", str(body_file), "-T", "image/jpeg", f"http://127.0.0.1:{port}/segment"]
    done = subprocess.run(args, capture_output=True, timeout=timeout_s * (requests // clients + 2))
    text = done.stdout.decode("latin-1")
    if done.returncode != 0 or "Requests per second" not in text:
        raise RuntimeError(f"ab failed (exit {done.returncode}): {done.stderr.decode('latin-1').strip()[-300:]}")
    return {**parse_ab(text), "clients": clients}


# --------------------------------------------------------------------------------------------- bare runner
class BareRunner:
    """The model as one process runs it, no server: decode the JPEG, normalize, one model call per batch,
    argmax, PNG encode; ``threads`` intra-op threads (a replica's CPUs)."""

    def __init__(self, model: str, threads: int):
        self.runner = open_model(model, threads=set_threads(threads))
        self.cpu_ms: dict = {}  # batch -> CPU ms per image of the last measurement (this process: all threads)

    def images_per_s(self, bodies: list, batch: int, images: int) -> float:
        from deeplab.data import normalize

        def run(count):
            for k in range(0, count, batch):
                decoded = [read_image(bodies[(k + j) % len(bodies)], name="bench") for j in range(batch)]
                labels = self.runner.labels(np.stack([normalize(image).numpy() for image in decoded]))
                for one in labels:
                    Image.fromarray(one, mode="L").save(io.BytesIO(), format="PNG")

        run(batch)  # the first call of a shape compiles or allocates
        start, cpu = time.perf_counter(), time.process_time()
        count = max(batch, images // batch * batch)
        run(count)
        self.cpu_ms[batch] = 1000 * (time.process_time() - cpu) / count
        return count / (time.perf_counter() - start)


# --------------------------------------------------------------------------------------- CPU time by process
def _stat(pid: str) -> tuple:
    """(parent pid, CPU seconds) of a process from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int) -> dict:
    """CPU seconds used so far by ``root`` and its descendants, by role: the replica(s) (Ray names their
    processes ServeReplica), the ingress ("proxy": Serve's HTTP proxy and HAProxy, whichever serves), and the
    rest (the serve command, Ray's own processes)."""
    parents, cpu = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            parents[int(pid)], cpu[int(pid)] = _stat(pid)
        except (OSError, IndexError, ValueError):
            continue
    children: dict = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    out, todo = {"replica": 0.0, "proxy": 0.0, "ray": 0.0}, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                name = f.read().decode(errors="replace")
        except OSError:
            continue
        ingress = "ProxyActor" in name or os.path.basename(name.split("\0", 1)[0]) == "haproxy"
        role = "replica" if "ServeReplica" in name else "proxy" if ingress else "ray"
        out[role] += cpu.get(pid, 0.0)
    return out


def cpu_per_request(before: dict, after: dict, requests: int) -> dict:
    """CPU ms per answered request by role, between two tree_cpu() readings."""
    return {role: 1000 * (after[role] - before[role]) / max(1, requests) for role in before}


# ------------------------------------------------------------------------------------------ serving setting
class ServeProcess:
    """`python -m cluster.serve MODEL ...` in a fresh interpreter from source tree ``code`` (its own local Ray),
    ready once /readyz answers 200; stopped with SIGTERM as a user's Ctrl-C would."""

    def __init__(self, code: Path, model: str, port: int, max_batch_size: int, cpus: float, replicas: int,
                 log: Path, timeout_s: float = 300):
        # RAY_ADDRESS=local: a fresh Ray instance of its own, never a cluster that `ray start` or a test recorded
        # on this machine (the serve command would join it, and its processes would not be this command's)
        env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(code)}
        args = [sys.executable, "-m", "cluster.serve", os.path.abspath(model), "--port", str(port),
                "--max-batch-size", str(max_batch_size), "--cpus-per-replica", f"{cpus:g}",
                "--replicas", str(replicas)]
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(args, cwd=code, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"cluster.serve from {code} exited {self.process.returncode}: "
                                   f"{log.read_text(errors='replace').strip()[-400:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"cluster.serve from {code} was not ready within {timeout_s:.0f}s (log: {log})")

    def stop(self, timeout_s: float = 60) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # its own session: the serve command and its Ray
                self.process.wait()


def row_line(row: dict) -> str:
    batching = f"up to {row['max_batch_size']}" if row["max_batch_size"] > 1 else "off"
    return (f"serve  {row['code']:<8s} batching {batching:<9s}"
            f" clients {row['clients']:2d}: {row['rps']:7.2f} req/s  p50 {row['p50']:7.1f}  p90 {row['p90']:7.1f}  "
            f"p99 {row['p99']:7.1f} ms  errors {row['errors']}  serve/bare {row['ratio']:.2f}x")


def bench_serve(model: str, codes: dict, bodies: list, body_file: Path, args, work: Path) -> list:
    """Every (round, code, batching, replicas) setting, interleaved; the bare runner measured right before each
    setting (batch 1 and the largest batch), its best images/s the ratio's denominator."""

    bare = BareRunner(model, max(1, int(args.cpus_per_worker)))
    rows = []
    for rnd in range(1, args.rounds + 1):
        for label, code in codes.items():
            for max_batch_size in args.batch_sizes:
                for replicas in args.replicas:
                    figures = {b: bare.images_per_s(bodies, b, args.bare_images)
                               for b in sorted({1, max(args.batch_sizes)})}
                    best = max(figures.values())
                    print(f"bare   round {rnd}: " + ", ".join(f"batch {b}: {v:.2f} images/s"
                                                          for b, v in figures.items()), flush=True)
                    port = free_port()
                    log = work / f"serve_{label}_{rnd}_{max_batch_size}_{replicas}.log"
                    server = ServeProcess(code, model, port, max_batch_size, args.cpus_per_worker, replicas, log)
                    try:
                        warm = max(8, 2 * max(args.clients))
                        load("127.0.0.1", port, bodies, warm, max(args.clients))  # first calls compile/allocate
                        for clients in args.clients:
                            cpu_before = tree_cpu(server.process.pid)
                            row = (load_ab(port, body_file, args.requests, clients) if args.client == "ab"
                                   else load("127.0.0.1", port, bodies, args.requests, clients))
                            cpu = cpu_per_request(cpu_before, tree_cpu(server.process.pid),
                                                  row["requests"] - row["errors"])
                            row.update(code=label, round=rnd, max_batch_size=max_batch_size, replicas=replicas,
                                       bare=figures, ratio=row["rps"] / best, cpu_ms=cpu)
                            rows.append(row)
                            print(row_line(row) + (f"  ({replicas} replicas)" if replicas > 1 else ""), flush=True)
                            print("       " + breakdown_line(row["breakdown"]), flush=True)
                            print(f"       CPU ms per request: replica {cpu['replica']:.1f}, proxy {cpu['proxy']:.1f},"
                                  f" Ray and the command {cpu['ray']:.1f}; bare runner per image: "
                                  + ", ".join(f"batch {b} {bare.cpu_ms[b]:.1f}" for b in figures), flush=True)
                    finally:
                        server.stop()
    for line in flags(rows):
        print(line, flush=True)
    summary(rows)
    return rows


def summary(rows: list) -> None:
    """The median over rounds of each setting (the figures to quote)."""
    keys = sorted({(r["code"], r["replicas"], -r["max_batch_size"], r["clients"]) for r in rows})
    if not rows or rows[-1]["round"] == 1:
        return
    print("median over rounds:", flush=True)
    for code, replicas, neg_batch, clients in keys:
        mine = [r for r in rows if (r["code"], r["replicas"], -r["max_batch_size"], r["clients"]) ==
                (code, replicas, neg_batch, clients)]
        med = {k: float(np.median([r[k] for r in mine])) for k in ("rps", "p50", "p99", "ratio")}
        print(f"  {code:<8s} batching {'up to ' + str(-neg_batch) if neg_batch < -1 else 'off':<9s} replicas "
              f"{replicas} clients {clients:2d}: {med['rps']:7.2f} req/s  p50 {med['p50']:7.1f}  p99 "
              f"{med['p99']:7.1f} ms  p99/p50 {med['p99'] / med['p50']:.2f}  serve/bare {med['ratio']:.2f}x",
              flush=True)


def vm_high_water_mib(pid: int) -> float:
    """A process's peak resident memory so far (VmHWM), in MiB; the replica runs on this machine."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def bench_peak_rss(model: str, exp, uploads: int, cpus: float, port: int) -> dict:
    """The replica's peak RSS while ``uploads`` concurrent uploads of serve.max_batch_pixels pixels each (the
    largest image it accepts) arrive: the budget makes them run one model call at a time."""
    import ray
    from ray import serve
    from ray.util.state import list_actors

    cfg = exp.serve
    cfg.port, cfg.host, cfg.replicas, cfg.autoscale, cfg.cpus_per_replica = port, "127.0.0.1", 1, None, cpus
    cfg.request_timeout_s = max(cfg.request_timeout_s, 3600.0)  # images at the limit take minutes on a small CPU
    pixels = image_limit(cfg)[0]
    width = int(pixels ** 0.5)
    height = pixels // width
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), np.uint8)).save(buffer, "PNG")
    start(model, cfg)
    alive = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")], timeout=60)
    pid = next(a.pid for a in alive if "SegmentService" in a.class_name)
    loaded = vm_high_water_mib(pid)
    row = load("127.0.0.1", port, [buffer.getvalue()], uploads, uploads, timeout_s=cfg.request_timeout_s + 60)
    row.update(peak_mib=vm_high_water_mib(pid), loaded_mib=loaded, width=width, height=height,
               max_batch_pixels=cfg.max_batch_pixels)
    serve.delete(APP_NAME)
    print(f"peak RSS of the replica: {row['peak_mib']:.0f} MiB under {uploads} concurrent {width}x{height} uploads "
          f"(serve.max_batch_pixels={cfg.max_batch_pixels}; {loaded:.0f} MiB after loading and warm-up); "
          f"{uploads - row['errors']} answered 200 in {row['seconds']:.0f}s", flush=True)
    return row


def bench_segment(model: str, exp, folder: Path, workdir: Path, actors_list, cpus: float) -> list:
    """Each actor gets ``cpus``, or less where the cluster cannot hold the actors next to a read task."""
    import ray

    rows = []
    total = float(ray.cluster_resources().get("CPU", 1))
    for index, actors in enumerate(actors_list):
        cfg = exp.segment
        cfg.workers, cfg.progress_interval_s = actors, 1e9
        cfg.cpus_per_worker = min(cpus, (total - cfg.cpus_per_decode) / actors)
        out = workdir / f"segment_{index}_{actors}"
        clock = time.perf_counter()
        inputs = list_inputs(str(folder), exclude=str(out))
        listing = time.perf_counter() - clock
        summary = segment(model, inputs, out, cfg, log=lambda *_: None)
        rows.append({"actors": actors, "images": summary.ok, "seconds": summary.seconds,
                     "images_per_s": summary.images_per_s, "steady_images_per_s": summary.steady_images_per_s,
                     "failed": summary.failed, "startup": {"listing": listing, **summary.startup}})
        print(f"segment  actors {actors} ({cfg.cpus_per_worker:.2g} CPU each): "
              f"{summary.ok} images in {summary.seconds:6.1f}s  "
              f"{summary.images_per_s:6.2f} images/s whole run (actor start and model load included), "
              f"{summary.steady_images_per_s:6.2f} images/s after the first results"
              f"{'  FAILED ' + str(summary.failed) if summary.failed else ''}", flush=True)
        steady = summary.steady_images_per_s
        print(f"         {startup_line(rows[-1]['startup'])}; whole run / steady "
              f"{summary.images_per_s / steady if steady else float('nan'):.2f}x", flush=True)
    return rows


def random_model(exp, folder: Path) -> str:
    import torch

    from deeplab import build_model, save_checkpoint

    torch.manual_seed(0)
    path = folder / f"random_{exp.model.backbone}.ckpt"
    save_checkpoint(path, build_model(exp.model).eval(), exp.model)
    return str(path)


def code_trees(items: list) -> dict:
    """--code LABEL=DIR items -> {label: tree}; without any, this source tree as "this"."""
    here = Path(__file__).resolve().parent.parent
    if not items:
        return {"this": here}
    trees = {}
    for item in items:
        label, sep, folder = item.partition("=")
        tree = Path(folder if sep else label).expanduser().resolve()
        if not (tree / "cluster" / "serve.py").is_file():
            raise ConfigError(f"--code {item}: {tree} is not a source tree of this project (no cluster/serve.py)")
        trees[label if sep else tree.name] = tree
    return trees


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m cluster.bench_serve", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", metavar="MODEL", help="model file (default: the config's model, random weights)")
    p.add_argument("--requests", type=int, default=48, help="requests per serving setting (default 48)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrent clients (default 1 8)")
    p.add_argument("--client", choices=("python", "ab"), default="python",
                   help="who sends the requests: the built-in Python client (keep-alive connections) or Apache "
                        "Bench, `ab -c CLIENTS -n REQUESTS` (a connection per request; apt-get install apache2-utils); "
                        "default: python")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 1], metavar="N",
                   help="serve.max_batch_size settings to compare (default 8 1: batching on and off)")
    p.add_argument("--replicas", type=int, nargs="+", default=[1], help="replica counts (default 1)")
    p.add_argument("--rounds", type=int, default=1, help="repeat every serving setting, interleaved (default 1)")
    p.add_argument("--code", action="append", default=[], metavar="LABEL=DIR",
                   help="run cluster.serve from this source tree (repeatable: e.g. --code before=/tmp/main "
                        "--code after=.); default: this tree")
    p.add_argument("--bare-images", type=int, default=48, help="images per bare-runner measurement (default 48)")
    p.add_argument("--only", choices=("serve", "segment"), help="run one half of the bench (default: both)")
    p.add_argument("--json", metavar="FILE", help="also write every figure to FILE (JSON; default: none)")
    p.add_argument("--image-size", type=int, default=129, help="side of the test images (default 129)")
    p.add_argument("--segment-images", type=int, default=48, help="images for each segment run (default 48)")
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="segment actor counts (default 1 2)")
    p.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs (threads) per replica / actor (default 1)")
    p.add_argument("--port", type=int, default=0, help="loopback port for --peak-rss (default: a free one)")
    p.add_argument("--peak-rss", type=int, default=0, metavar="N",
                   help="only measure the replica's peak RSS under N concurrent uploads at the pixel limit (default: "
                        "off, the full benchmark)")
    add_config_args(p)
    args = p.parse_args(argv)
    counts = [args.requests, args.image_size, args.segment_images, args.rounds, args.bare_images, *args.clients,
              *args.actors, *args.batch_sizes, *args.replicas]
    if min(counts) < 1:
        raise ConfigError("--requests, --image-size, --segment-images, --rounds, --bare-images, --clients, "
                          "--actors, --batch-sizes and --replicas must be >= 1")
    if args.model and not os.path.isfile(args.model):
        raise ConfigError(f"{args.model}: no such model file")
    if args.client == "ab" and shutil.which("ab") is None:
        raise UserError("--client ab: no `ab` on PATH (Debian: apt-get install apache2-utils)")
    return args


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    exp = config_from_args(args)
    codes = code_trees(args.code)

    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        work = Path(tmp)
        model = args.model or random_model(exp, work)
        images = make_images(work / "images", args.segment_images, args.image_size)
        bodies = [path.read_bytes() for path in images[:8]]
        print(f"model {model}; images {args.image_size}x{args.image_size}; {os.cpu_count()} CPUs here; "
              f"{args.cpus_per_worker:g} CPU(s) per replica/actor; client {args.client}; code "
              + ", ".join(f"{label}={tree}" for label, tree in codes.items()), flush=True)
        figures = {}
        if args.peak_rss:
            init_ray(exp, local=exp.cluster.address is None)
            bench_peak_rss(model, exp, args.peak_rss, args.cpus_per_worker, args.port or free_port())
            return 0
        if args.only != "segment":
            figures["serve"] = bench_serve(model, codes, bodies, images[0], args, work)
        if args.only != "serve":
            init_ray(exp, local=exp.cluster.address is None)
            figures["segment"] = bench_segment(model, exp, work / "images", work, args.actors, args.cpus_per_worker)
        if args.json:
            write_text_atomic(args.json, json.dumps(figures, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
