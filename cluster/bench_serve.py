"""python -m cluster.bench_serve [MODEL] [--requests 48] [--image-size 129] [--segment-images 48]

Figures for the two ways to run a model on Ray, bounded and on loopback only:
  cluster.serve    requests/s and p50/p90/p99 latency at 1 and 8 concurrent clients, with dynamic batching
                   (up to 8 requests per model call) and without (batch 1), one replica
  cluster.segment  images/s with 1 and 2 model actors over a folder of generated images

MODEL is any model file (.ckpt, .onnx, engine); without it the config's model (--config / --set
model.backbone=...) is built with random weights, which time the same as trained ones. A fresh local Ray
instance is started unless cluster.address is set. Every request goes to 127.0.0.1; each setting sends
exactly --requests requests after a short warm-up.
"""
from __future__ import annotations

import argparse
import http.client
import io
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from deeplab.cli import command
from deeplab.config import ConfigError, add_config_args, config_from_args


def make_images(folder: Path, count: int, size: int, seed: int = 0) -> list:
    """``count`` JPEGs of size x size (smooth colour fields plus noise, so JPEG sizes are realistic)."""
    from PIL import Image

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


def load(url_host: str, port: int, bodies: list, requests: int, clients: int, timeout_s: float = 120) -> dict:
    """``requests`` POST /segment calls from ``clients`` threads (one keep-alive connection each)."""
    lock, next_index = threading.Lock(), [0]
    latencies, errors = [], []

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
                try:
                    conn.request("POST", "/segment", body=bodies[i % len(bodies)],
                                 headers={"Content-Type": "image/jpeg"})
                    response = conn.getresponse()
                    response.read()
                    outcome = response.status
                except OSError as e:
                    outcome = str(e)
                    conn.close()
                elapsed = time.perf_counter() - start
                with lock:
                    if outcome == 200:
                        latencies.append(elapsed)
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
            "p99": percentile_ms(latencies, 99), "errors": len(errors)}


def bench_serve(model: str, exp, bodies: list, requests: int, clients_list, cpus: float, port: int) -> list:
    from ray import serve

    from cluster.serve import APP_NAME, start

    rows = []
    for batching in (True, False):
        cfg = exp.serve
        cfg.port, cfg.host, cfg.replicas, cfg.autoscale = port, "127.0.0.1", 1, None
        cfg.max_batch_size, cfg.cpus_per_replica = (8 if batching else 1), cpus
        start(model, cfg)
        load("127.0.0.1", port, bodies, max(4, min(requests, 8)), 2)  # warm-up: first calls allocate
        for clients in clients_list:
            row = load("127.0.0.1", port, bodies, requests, clients)
            row["batching"] = "on (8)" if batching else "off"
            rows.append(row)
            print(f"serve  batching {row['batching']:<7s} clients {clients:2d}: {row['requests']} requests in "
                  f"{row['seconds']:6.1f}s  {row['rps']:7.2f} req/s  p50 {row['p50']:8.1f} ms  p90 "
                  f"{row['p90']:8.1f} ms  p99 {row['p99']:8.1f} ms  errors {row['errors']}", flush=True)
        serve.delete(APP_NAME)
    return rows


def vm_high_water_mib(pid: int) -> float:
    """A process's peak resident memory so far (VmHWM), in MiB; the replica runs on this machine."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def bench_peak_rss(model: str, exp, uploads: int, cpus: float, port: int) -> dict:
    """The replica's peak RSS while ``uploads`` concurrent uploads of serve.max_batch_pixels pixels each (the
    largest image it accepts) arrive: the budget makes them run one model call at a time."""
    import ray
    from PIL import Image
    from ray import serve
    from ray.util.state import list_actors

    from cluster.serve import APP_NAME, image_limit, start

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

    from cluster.segment import list_inputs, segment

    rows = []
    total = float(ray.cluster_resources().get("CPU", 1))
    for actors in actors_list:
        cfg = exp.segment
        cfg.workers, cfg.progress_interval_s = actors, 1e9
        cfg.cpus_per_worker = min(cpus, (total - cfg.cpus_per_decode) / actors)
        out = workdir / f"segment_{actors}"
        inputs = list_inputs(str(folder), exclude=str(out))
        summary = segment(model, inputs, out, cfg, log=lambda *_: None)
        rows.append({"actors": actors, "images": summary.ok, "seconds": summary.seconds,
                     "images_per_s": summary.images_per_s, "steady_images_per_s": summary.steady_images_per_s,
                     "failed": summary.failed})
        print(f"segment  actors {actors} ({cfg.cpus_per_worker:.2g} CPU each): {summary.ok} images in {summary.seconds:6.1f}s  "
              f"{summary.images_per_s:6.2f} images/s whole run (actor start and model load included), "
              f"{summary.steady_images_per_s:6.2f} images/s after the first results"
              f"{'  FAILED ' + str(summary.failed) if summary.failed else ''}", flush=True)
    return rows


def random_model(exp, folder: Path) -> str:
    import torch

    from deeplab import build_model, save_checkpoint

    torch.manual_seed(0)
    path = folder / f"random_{exp.model.backbone}.ckpt"
    save_checkpoint(path, build_model(exp.model).eval(), exp.model)
    return str(path)


@command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.bench_serve", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", metavar="MODEL", help="model file (default: the config's model, random weights)")
    p.add_argument("--requests", type=int, default=48, help="requests per serving setting (default 48)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrent clients (default 1 8)")
    p.add_argument("--image-size", type=int, default=129, help="side of the test images (default 129)")
    p.add_argument("--segment-images", type=int, default=48, help="images for each segment run (default 48)")
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="segment actor counts (default 1 2)")
    p.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs (threads) per replica / actor (default 1)")
    p.add_argument("--port", type=int, default=0, help="loopback port for Serve (default: a free one)")
    p.add_argument("--peak-rss", type=int, default=0, metavar="N",
                   help="only measure the replica's peak RSS under N concurrent uploads at the pixel limit (default: "
                        "off, the full benchmark)")
    add_config_args(p)
    args = p.parse_args(argv)
    exp = config_from_args(args)
    if min(args.requests, args.image_size, args.segment_images, *args.clients, *args.actors) < 1:
        raise ConfigError("--requests, --image-size, --segment-images, --clients and --actors must be >= 1")
    if args.model and not os.path.isfile(args.model):
        raise ConfigError(f"{args.model}: no such model file")

    from cluster.train import _free_port, init_ray

    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        work = Path(tmp)
        model = args.model or random_model(exp, work)
        images = make_images(work / "images", args.segment_images, args.image_size)
        bodies = [path.read_bytes() for path in images[:8]]
        init_ray(exp, local=exp.cluster.address is None)
        print(f"model {model}; images {args.image_size}x{args.image_size}; {os.cpu_count()} CPUs here; "
              f"{args.cpus_per_worker:g} CPU(s) per replica/actor", flush=True)
        if args.peak_rss:
            bench_peak_rss(model, exp, args.peak_rss, args.cpus_per_worker, args.port or _free_port())
            return 0
        bench_serve(model, exp, bodies, args.requests, args.clients, args.cpus_per_worker, args.port or _free_port())
        bench_segment(model, exp, work / "images", work, args.actors, args.cpus_per_worker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
