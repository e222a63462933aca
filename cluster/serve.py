"""python -m cluster.serve MODEL [--host 127.0.0.1] [--port 8000] [--replicas N | --autoscale MIN MAX]

A Ray Serve HTTP endpoint for a model file (.ckpt, .onnx FP32/FP16/INT8, OpenVINO IR .xml + .bin, TensorRT
engine + sidecar; every file of it is shipped to the replicas' nodes):

  POST /segment        an image as the raw body (Content-Type image/* or application/octet-stream) or as a
                       multipart/form-data file field; answers the label PNG (pixel value = class id), or with
                       ?format=json: {"width", "height", "pixels": {class: count}, "color_png": base64, ...}
  GET  /info           the model's metadata: classes, output stride, backend, precision, batching
  GET  /healthz        "ok" while the replica serves

Concurrent requests are batched (serve.batch; same-size images share a model call). Bad input answers 4xx
with a one-line reason (400 not an image or truncated, 413 too large, 415 wrong content type) and the
replica keeps serving. The endpoint binds 127.0.0.1 unless --host says otherwise. Ctrl-C stops it.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import os
import signal
import sys
import time
import urllib.request
from typing import Optional

from deeplab.cli import command
from deeplab.config import Alias, ServeConfig, add_config_args, config_from_args
from export.runtime import formats_help

APP_NAME = "deeplab"
RAW_TYPES = ("application/octet-stream", "")  # and image/*
USAGE = ("send the image as the raw body with Content-Type: image/jpeg (curl --data-binary @photo.jpg "
         "-H 'Content-Type: image/jpeg') or as multipart/form-data (curl -F image=@photo.jpg)")


class Problem(Exception):
    """A request the endpoint refuses: HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


# ------------------------------------------------------------------------------------------ request bodies
async def read_body(request, limit: int) -> bytes:
    """The body, refusing (413) more than ``limit`` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise Problem(413, f"upload of {int(declared)} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(413, f"upload is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def multipart_file(content_type: str, body: bytes) -> bytes:
    """The first file field of a multipart/form-data body (or a field named image/file)."""
    from email.parser import BytesParser
    from email.policy import HTTP

    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") +
                                                  b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise Problem(400, "multipart/form-data body without a boundary or parts; " + USAGE)
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if part.get_filename() or name in ("image", "file"):
            return part.get_payload(decode=True) or b""
    raise Problem(400, "multipart/form-data body has no file field; " + USAGE)


def upload_bytes(content_type_header: str, body: bytes) -> bytes:
    """The image bytes of a request, by content type (415 for a type that cannot carry an image)."""
    ctype = content_type_header.split(";", 1)[0].strip().lower()
    if ctype == "multipart/form-data":
        data = multipart_file(content_type_header, body)
    elif ctype.startswith("image/") or ctype in RAW_TYPES:
        data = body
    else:
        raise Problem(415, f"content type {ctype} cannot carry an image; " + USAGE)
    if not data:
        raise Problem(400, "empty upload; " + USAGE)
    return data


def png_bytes(picture) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def route(method: str, path: str, fmt: str) -> str:
    """The endpoint a request asks for ("/segment", "/info" or "/healthz"), or a Problem saying why not."""
    path = path.rstrip("/") or "/"
    if path in ("/healthz", "/info"):
        if method != "GET":
            raise Problem(405, f"{path} answers GET only")
        return path
    if path != "/segment":
        raise Problem(404, f"no endpoint {path}; use POST /segment, GET /info or GET /healthz")
    if method != "POST":
        raise Problem(405, "/segment answers POST with an image; " + USAGE)
    if fmt not in ("png", "json"):
        raise Problem(400, f"format={fmt}: use png (default) or json")
    return path


def json_answer(image, labels, color_picture, info, batch: int, seconds: float) -> dict:
    """The ?format=json body: size, per-class pixel counts, the colour mask as base64 PNG, how it ran."""
    from cluster.infer import class_pixels

    return {"width": int(image.shape[1]), "height": int(image.shape[0]),
            "pixels": class_pixels(labels, info.class_names), "classes": info.class_names,
            "color_png": base64.b64encode(png_bytes(color_picture)).decode("ascii"),
            "backend": info.backend, "batch": batch, "seconds": round(seconds, 4)}


# ----------------------------------------------------------------------------------------------- replica
def _deployment_class():
    """The Serve deployment, defined on first use so `--help` and the request helpers need no Ray (hence one
    function holding the class; each method stays short: routing and answers are the module functions above)."""
    from ray import serve
    from starlette.responses import JSONResponse, PlainTextResponse, Response

    from cluster.infer import first_line

    @serve.deployment(name="SegmentService")
    class SegmentService:
        def __init__(self, model, output_stride: Optional[int], num_gpus: float, cpus: float, max_batch_size: int,
                     batch_wait_s: float, max_pixels: int, max_upload_bytes: int):
            from cluster.infer import open_model, set_threads, worker_device
            from deeplab.data import palette_for_classes

            threads = set_threads(cpus)
            self.runner = open_model(model, output_stride=output_stride, device=worker_device(num_gpus),
                                     threads=threads)
            self.palette = palette_for_classes(self.runner.info.class_names)
            self.max_pixels, self.max_upload_bytes = max_pixels, max_upload_bytes
            self.segment_batch.set_max_batch_size(max_batch_size)
            self.segment_batch.set_batch_wait_timeout_s(batch_wait_s)
            self.info = {**self.runner.info.to_dict(), "max_batch_size": max_batch_size,
                         "batch_wait_ms": batch_wait_s * 1000, "max_pixels": max_pixels,
                         "max_upload_bytes": max_upload_bytes}
            self.info["path"] = os.path.basename(self.info["path"])

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
        async def segment_batch(self, images: list) -> list:
            """Concurrent requests' images -> (labels, how many requests shared the batch) each."""
            from cluster.infer import predict_labels

            labels = await asyncio.to_thread(predict_labels, self.runner, images, True)
            return [(one, len(images)) for one in labels]  # a failed size gets its exception, alone

        async def __call__(self, request):
            fmt = request.query_params.get("format", "png")
            try:
                endpoint = route(request.method, request.url.path, fmt)
                if endpoint == "/healthz":
                    return PlainTextResponse("ok\n")
                return JSONResponse(self.info) if endpoint == "/info" else await self._segment(request, fmt)
            except Exception as e:  # a Problem is the client's; anything else is ours: 500, one line, logged
                if not isinstance(e, Problem):
                    logging.getLogger("ray.serve").exception("segment request failed")
                    e = Problem(500, f"internal error: {first_line(e)}")
                body = json.dumps({"error": e.reason}) if fmt == "json" else f"error: {e.reason}\n"
                return Response(body, status_code=e.status,
                                media_type="application/json" if fmt == "json" else "text/plain")

        async def _segment(self, request, fmt: str):
            from deeplab.data.io import DatasetError, ImageTooLargeError, read_image
            from deeplab.predict import prediction_images

            start = time.perf_counter()
            body = await read_body(request, self.max_upload_bytes)
            data = upload_bytes(request.headers.get("content-type", ""), body)
            try:
                image = await asyncio.to_thread(read_image, data, name="upload", max_pixels=self.max_pixels)
            except ImageTooLargeError as e:
                raise Problem(413, str(e)) from None
            except DatasetError as e:
                raise Problem(400, str(e)) from None
            labels, batch = await self.segment_batch(image)
            if isinstance(labels, Exception):  # the model could not run this image: say why, keep serving
                status = 413 if "out of memory" in str(labels).lower() else 400
                raise Problem(status, f"the model cannot run this {image.shape[1]}x{image.shape[0]} image "
                                      f"({first_line(labels)})")
            kinds = ("labels",) if fmt == "png" else ("color",)
            picture = prediction_images(image, labels, self.palette, kinds=kinds)[kinds[0]]
            if fmt == "png":
                return Response(png_bytes(picture), media_type="image/png")
            return JSONResponse(json_answer(image, labels, picture, self.runner.info, batch,
                                            time.perf_counter() - start))

    return SegmentService


def deployment_options(cfg: ServeConfig) -> dict:
    """Replicas (fixed, or autoscaled on requests in flight: one full batch per replica), their resources,
    and room for a full batch plus the next one queued."""
    options = {"ray_actor_options": {"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica},
               "max_ongoing_requests": max(8, 2 * cfg.max_batch_size)}
    if cfg.autoscale is not None:
        options["autoscaling_config"] = {"min_replicas": cfg.autoscale[0], "max_replicas": cfg.autoscale[1],
                                         "target_ongoing_requests": max(1, cfg.max_batch_size)}
    else:
        options["num_replicas"] = cfg.replicas
    return options


def build_app(model_path, cfg: ServeConfig):
    """The bound Serve application for ``model_path`` (shipped to the replicas through the object store)."""
    from cluster.infer import ship_model

    return _deployment_class().options(**deployment_options(cfg)).bind(
        ship_model(model_path), cfg.output_stride, cfg.gpus_per_replica, cfg.cpus_per_replica, cfg.max_batch_size,
        cfg.batch_wait_ms / 1000, cfg.max_pixels, int(cfg.max_upload_mb * 2**20))


def local_url(cfg: ServeConfig) -> str:
    """Where this machine reaches the endpoint (a wildcard bind is reached through loopback)."""
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else ("[::1]" if cfg.host == "::" else cfg.host)
    return f"http://{host}:{cfg.port}"


def wait_healthy(url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def start(model_path, cfg: ServeConfig, timeout_s: float = 300):
    """Deploy (Ray must be initialized) and wait until /healthz answers; returns the local URL."""
    from ray import serve

    serve.start(http_options={"host": cfg.host, "port": cfg.port}, proxy_location="HeadOnly")
    serve.run(build_app(model_path, cfg), name=APP_NAME, route_prefix="/")
    url = local_url(cfg)
    if not wait_healthy(url, timeout_s):
        raise RuntimeError(f"{url}/healthz did not answer within {timeout_s:.0f}s (is Serve already running on "
                           "this cluster with another host or port? `serve shutdown` stops it)")
    return url


# --------------------------------------------------------------------------------------------------- CLI
ALIASES = [
    Alias("--host", "serve.host", "address to bind (127.0.0.1: this machine only)"),
    Alias("--port", "serve.port", "HTTP port"),
    Alias("--replicas", "serve.replicas", "fixed number of replicas"),
    Alias("--autoscale", "serve.autoscale", "autoscale between MIN and MAX replicas on the requests in flight",
          nargs=2, metavar=("MIN", "MAX")),
    Alias("--max-batch-size", "serve.max_batch_size", "requests batched into one model call (1: no batching)"),
    Alias("--batch-wait-ms", "serve.batch_wait_ms", "how long a batch waits to fill"),
    Alias("--cpus-per-replica", "serve.cpus_per_replica", "CPUs (and intra-op threads) per replica"),
    Alias("--num-gpus-per-replica", "serve.gpus_per_replica", "GPUs per replica"),
    Alias("--output-stride", "serve.output_stride", "checkpoints only: run at this output stride "
          "(default: the checkpoint's)"),
    Alias("--max-pixels", "serve.max_pixels", "larger images answer 413"),
]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m cluster.serve", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help=formats_help())
    add_config_args(p, aliases=ALIASES)
    return p.parse_args(argv)


def _wait_for_signal() -> None:
    """Block until Ctrl-C or SIGTERM."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    try:
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    from export.runtime import read_model_info

    exp = config_from_args(args)
    cfg = exp.serve
    info = read_model_info(args.model, cfg.output_stride)

    from ray import serve

    from cluster.train import init_ray

    init_ray(exp)
    try:
        url = start(args.model, cfg)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    scale = (f"autoscaling {cfg.autoscale[0]}-{cfg.autoscale[1]} replicas" if cfg.autoscale is not None
             else f"{cfg.replicas} replica{'s' * (cfg.replicas != 1)}")
    print(f"serving {args.model} ({info.backend.split(' ')[0]}, {info.num_classes} classes, output stride "
          f"{info.output_stride}; {scale}, batches of up to {cfg.max_batch_size}) at {url}: POST /segment, "
          f"GET /info, GET /healthz; Ctrl-C stops", flush=True)
    _wait_for_signal()
    print("stopping...", flush=True)
    serve.delete(APP_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
