"""python -m cluster.serve MODEL [--host 127.0.0.1] [--port 8000] [--replicas N | --autoscale MIN MAX]
                         [--ingress auto|haproxy|proxy] [--verbose]

A Ray Serve HTTP endpoint for a model file (.ckpt, .onnx FP32/FP16/INT8, OpenVINO IR .xml + .bin, TensorRT
engine + sidecar; every file of it is shipped to the replicas' nodes):

  POST /segment        an image as the raw body (Content-Type image/* or application/octet-stream) or as a
                       multipart/form-data file field; answers the label PNG (pixel value = class id), or with
                       ?format=json: {"width", "height", "pixels": {class: count}, "color_png": base64, ...}
  GET  /info           the model's metadata: classes, output stride, backend, precision, batching, limits
  GET  /healthz        "ok" while the replica serves (liveness)
  GET  /readyz         200 once the model is loaded and warmed up (readiness), else 503

Concurrent requests are batched (cluster.serve_batch: a lone request runs at once, the requests that queue while
the model runs share its next call; same-size images only, up to serve.max_batch_pixels pixels per call); each
answer's Server-Timing header gives its time by part. Bad input answers 4xx with a one-line reason (400 not an
image or truncated, 408 upload too slow, 413 too large, 415 wrong content type) and the replica keeps serving;
a full queue answers 503 with Retry-After, a request over serve.request_timeout_s 504, an internal error 500
with a request id (details in the log). The console shows one traffic line per serve.stats_interval_s; Serve's
access lines stay in its log files unless --verbose. The endpoint binds 127.0.0.1 unless --host says otherwise.
Ctrl-C stops what the command started.
"""
from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import json
import logging
import math
import os
import sys
import time
import urllib.request
import uuid
from email.parser import BytesParser
from email.policy import HTTP
from typing import NoReturn, Optional

import numpy as np
from PIL import Image

from cluster import ray_internals
from cluster.config import ServeConfig
from cluster.console import SERVE_SHUTDOWN_NOISE, quiet_ray_reports, ray_init_options
from cluster.infer import (
    CHECKPOINT_STRIDE_ALIAS,
    class_pixels,
    model_parser,
    open_model,
    predict_labels,
    set_threads,
    ship_model,
    worker_device,
)
from cluster.ray_session import free_port, init_ray
from cluster.serve_batch import DynamicBatcher, server_timing
from cluster.serve_stats import ReplicaMetrics, TrafficStats, traffic_line
from deeplab.cli import UserError, command, error_line, on_interrupt
from deeplab.config import Alias, add_config_args, config_from_args
from deeplab.data import palette_for_classes
from deeplab.data.io import DatasetError, ImageTooLargeError, UnsupportedImageFormat, read_image
from deeplab.predict import prediction_images
from export.model_file import open_model_file

APP_NAME = "deeplab"
HAPROXY_WRAPPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "haproxy_loopback.sh")
INGRESS_KEY = "deeplab_serve_ingress_env"  # the running Serve's replica environment, for a later command's replicas
INGRESS_NAMES = {"haproxy": "HAProxy ingress", "proxy": "Serve's Python proxy"}
DRAIN_S = 1  # a stopping replica (Ctrl-C, scale-down) answers this long after HAProxy stops sending it requests
STATS_FLUSH_S = 0.5  # how often a replica sends the console's traffic figures to the stats actor
RAW_TYPES = ("application/octet-stream", "")  # and image/*
USAGE = ("send the image as the raw body with Content-Type: image/jpeg (curl --data-binary @photo.jpg "
         "-H 'Content-Type: image/jpeg') or as multipart/form-data (curl -F image=@photo.jpg)")


class Problem(Exception):
    """A request the endpoint refuses: HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


# ------------------------------------------------------------------------------------------ request bodies
async def read_body(request, limit: int, timeout_s: float = math.inf) -> bytes:
    """The body, refusing (413) more than ``limit`` bytes before reading them all, and (408) a body that takes
    longer than ``timeout_s`` to arrive: a slow client must not hold a replica's slot."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise Problem(413, f"upload of {int(declared)} bytes is over the limit of {limit} bytes")
    loop = asyncio.get_running_loop()
    deadline, chunks, size = loop.time() + timeout_s, [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), max(0.0, deadline - loop.time()))
        except StopAsyncIteration:
            return b"".join(chunks)
        except asyncio.TimeoutError:
            raise Problem(408, f"the upload did not arrive within serve.read_timeout_s={timeout_s:g} s") from None
        size += len(chunk)
        if size > limit:
            raise Problem(413, f"upload is over the limit of {limit} bytes")
        chunks.append(chunk)


def multipart_file(content_type: str, body: bytes) -> bytes:
    """The first file field of a multipart/form-data body (or a field named image/file)."""

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
    """The endpoint a request asks for (/segment, /info, /healthz, /readyz), or a Problem saying why not."""
    path = path.rstrip("/") or "/"
    if path in ("/healthz", "/readyz", "/info"):
        if method != "GET":
            raise Problem(405, f"{path} answers GET only")
        return path
    if path != "/segment":
        raise Problem(404, f"no endpoint {path}; use POST /segment, GET /info, GET /healthz or GET /readyz")
    if method != "POST":
        raise Problem(405, "/segment answers POST with an image; " + USAGE)
    if fmt not in ("png", "json"):
        raise Problem(400, f"format={fmt}: use png (default) or json")
    return path


def json_answer(image, labels, color_picture, info, batch: int, seconds: float) -> dict:
    """The ?format=json body: size, per-class pixel counts, the colour mask as base64 PNG, how it ran."""

    return {"width": int(image.shape[1]), "height": int(image.shape[0]),
            "pixels": class_pixels(labels, info.class_names), "classes": info.class_names,
            "color_png": base64.b64encode(png_bytes(color_picture)).decode("ascii"),
            "backend": info.backend, "batch": batch, "seconds": round(seconds, 4)}


def as_problem(e: BaseException, request_timeout_s: float, request_id: str) -> Problem:
    """What the client is told: a Problem as it is; a timeout 504; anything else (ours) a generic 500 with the
    request id, its details in the replica's log under that id (never paths or library internals to a client)."""
    if isinstance(e, Problem):
        return e
    if isinstance(e, asyncio.TimeoutError):
        return Problem(504, f"no answer within serve.request_timeout_s={request_timeout_s:g} s (replica busy, or "
                            "the image too large for it); try again later")
    logging.getLogger("ray.serve").error("request %s failed", request_id, exc_info=e)
    return Problem(500, f"internal error (request id {request_id}; the details are in the replica's log)")


def error_response(problem: Problem, fmt: str):
    from starlette.responses import Response

    body = json.dumps({"error": problem.reason}) if fmt == "json" else f"error: {problem.reason}\n"
    return Response(body, status_code=problem.status, media_type="application/json" if fmt == "json" else "text/plain")


def request_id(request) -> str:
    """Serve's id for this request (the proxy's x-request-id answer header), or a fresh one."""
    try:
        return ray_internals.serve_request_id() or uuid.uuid4().hex
    except Exception:  # outside a replica
        return request.headers.get("x-request-id") or uuid.uuid4().hex


def warm_up(runner, side: int = 64) -> dict:
    """One model call at start, so the first request does not pay the model's first-call cost (allocations,
    kernel selection, lazy initialization); the replica takes no traffic before it returns."""

    start = time.perf_counter()
    try:
        predict_labels(runner, [np.zeros((side, side, 3), np.uint8)])
    except Exception as e:  # e.g. an engine whose profile excludes this size: it still serves what it can
        logging.getLogger("ray.serve").warning("warm-up call failed: %s", error_line(e))
        return {"warmed_up": False, "warmup_error": error_line(e)}
    return {"warmed_up": True, "warmup_ms": round((time.perf_counter() - start) * 1000, 1)}


def image_limit(cfg: ServeConfig) -> tuple:
    """(pixels, the option that sets it): an upload over the per-image limit or the per-call budget is 413."""
    if cfg.max_batch_pixels < cfg.max_pixels:
        return cfg.max_batch_pixels, "serve.max_batch_pixels"
    return cfg.max_pixels, "serve.max_pixels"


def decode_upload(data: bytes, cfg: ServeConfig):
    """The upload's pixels, or a Problem: 413 over the pixel limit (naming the option), 415 an image format
    outside the allow-list (no other decoder ever sees it), 400 not an image or truncated."""

    limit, option = image_limit(cfg)
    try:
        return read_image(data, name="upload", max_pixels=limit)
    except ImageTooLargeError as e:
        raise Problem(413, f"{e} ({option})") from None
    except UnsupportedImageFormat as e:
        raise Problem(415, str(e)) from None
    except DatasetError as e:
        raise Problem(400, str(e)) from None


# ----------------------------------------------------------------------------------------------- replica
class Replica:
    """One replica of the endpoint, without Ray (`_deployment_class` makes it Serve's deployment):
    routing and answers are the module functions above, so each method stays short."""

    def __init__(self, model, cfg: ServeConfig, stats=None, output_stride: Optional[int] = None):
        num_gpus, cpus = cfg.gpus_per_replica, cfg.cpus_per_replica
        threads = set_threads(cpus)
        self.runner = open_model(model, output_stride=output_stride, device=worker_device(num_gpus),
                                 threads=threads)
        self.palette = palette_for_classes(self.runner.info.class_names)
        self.cfg, self.stats, self.metrics = cfg, stats, ReplicaMetrics()
        self._unsent, self._flush_due = {"requests": [], "calls": []}, False  # for the stats actor
        self.max_upload_bytes = int(cfg.max_upload_mb * 2**20)
        self.batcher = DynamicBatcher(self._run_call, cfg.max_batch_size, cfg.batch_wait_ms / 1000,
                                      cfg.max_batch_pixels, on_call=self._count_call)
        self.ready = warm_up(self.runner)
        self._warm_codecs()
        self.info = {**self.runner.info.to_dict(), "max_batch_size": cfg.max_batch_size,
                     "batch_wait_ms": cfg.batch_wait_ms, "max_pixels": image_limit(cfg)[0],
                     "max_batch_pixels": cfg.max_batch_pixels, "max_upload_bytes": self.max_upload_bytes,
                     "request_timeout_s": cfg.request_timeout_s, "read_timeout_s": cfg.read_timeout_s, **self.ready}
        self.info["path"] = os.path.basename(self.info["path"])

    def _warm_codecs(self) -> None:
        """Decode a small JPEG and encode both answers once at start: the first request otherwise pays the
        decoders' and encoders' first use (about a second here, docs/serving.md)."""
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (120, 60, 30)).save(buffer, "JPEG")
        image, _ = self._decode(buffer.getvalue())
        labels = np.zeros(image.shape[:2], np.uint8)
        for fmt in ("png", "json"):
            self._encode(image, labels, fmt, 1, time.perf_counter())

    def _run_call(self, inputs: list) -> list:
        """One model call (on the batcher's model thread): normalized images of one size -> label maps."""
        batch = inputs[0][None] if len(inputs) == 1 else np.stack(inputs)  # one image: a view, no copy
        return list(self.runner.labels(batch))

    def _decode(self, data: bytes) -> tuple:
        """(pixels, the normalized model input): done in a thread while the model runs other requests."""
        from deeplab.data import normalize

        image = decode_upload(data, self.cfg)
        return image, normalize(image).numpy()

    def _encode(self, image, labels, fmt: str, images: int, start: float) -> tuple:
        """(body, media type) of the answer: done in a thread, so the event loop keeps feeding the model."""

        kinds = ("labels",) if fmt == "png" else ("color",)
        picture = prediction_images(image, labels, self.palette, kinds=kinds)[kinds[0]]
        if fmt == "png":
            return png_bytes(picture), "image/png"
        answer = json_answer(image, labels, picture, self.runner.info, images, time.perf_counter() - start)
        return json.dumps(answer, separators=(",", ":")).encode(), "application/json"

    async def __call__(self, request):
        fmt, start = request.query_params.get("format", "png"), time.perf_counter()
        try:
            endpoint = route(request.method, request.url.path, fmt)
            if endpoint != "/segment":
                return self._status(endpoint)
            response = await asyncio.wait_for(self._segment(request, fmt), self.cfg.request_timeout_s)
        except Exception as e:  # a Problem is the client's; a timeout 504; anything else ours: 500 + id
            response = error_response(as_problem(e, self.cfg.request_timeout_s, request_id(request)), fmt)
            if request.url.path.rstrip("/") != "/segment":
                return response
        self._count(response.status_code, time.perf_counter() - start)
        return response

    def _status(self, endpoint: str):
        from starlette.responses import JSONResponse, PlainTextResponse

        if endpoint == "/healthz":  # liveness: the replica answers
            return PlainTextResponse("ok\n")
        if endpoint == "/readyz":  # readiness: the model is loaded and has run once
            return JSONResponse({"ready": self.ready["warmed_up"], "model_loaded": True, **self.ready},
                                status_code=200 if self.ready["warmed_up"] else 503)
        return JSONResponse(self.info)

    def _count(self, status: int, seconds: float) -> None:
        self.metrics.request(status, seconds)
        self._tell_stats("requests", (status, seconds))

    def _count_call(self, images: int) -> None:
        self.metrics.model_call(images)
        self._tell_stats("calls", images)

    def _tell_stats(self, kind: str, value) -> None:
        """The console's figures go to the stats actor in one message per STATS_FLUSH_S, not one per request
        (a Ray call each cost about 1 ms of CPU per request in the actor alone)."""
        if self.stats is None:
            return
        self._unsent[kind].append(value)
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_later(STATS_FLUSH_S, self._flush_stats)

    def _flush_stats(self) -> None:
        self._flush_due = False
        self.stats.record_many.remote(self._unsent["requests"], self._unsent["calls"])
        self._unsent = {"requests": [], "calls": []}

    async def _segment(self, request, fmt: str):
        """Read, decode (a thread), queue for the model (the batcher), encode (a thread); the answer carries
        the time of each part in a Server-Timing header (ms; cluster.serve_batch.PARTS)."""
        from starlette.responses import Response

        start = time.perf_counter()
        self.batcher.arrived()
        submitted = False
        try:
            body = await read_body(request, self.max_upload_bytes, self.cfg.read_timeout_s)
            data = upload_bytes(request.headers.get("content-type", ""), body)
            read = time.perf_counter()
            image, model_input = await asyncio.to_thread(self._decode, data)
            decoded = time.perf_counter()
            submitted = True
            call = await self.batcher.submit(model_input, image.shape[:2])
        finally:
            if not submitted:
                self.batcher.left()
        labels = call.result
        if isinstance(labels, Exception):  # the model could not run this image: say why, keep serving
            status = 413 if "out of memory" in str(labels).lower() else 400
            raise Problem(status, f"the model cannot run this {image.shape[1]}x{image.shape[0]} image "
                                  f"({error_line(labels)})")
        answered = time.perf_counter()
        content, media_type = await asyncio.to_thread(self._encode, image, labels, fmt, call.images, start)
        end = time.perf_counter()
        parts = {"read": read - start, "decode": decoded - read, "queue": call.queue_ms / 1000,
                 "batch": call.batch_ms / 1000, "model": call.model_ms / 1000, "encode": end - answered,
                 "replica": end - start}
        timing = server_timing({name: 1000 * seconds for name, seconds in parts.items()})
        return Response(content, media_type=media_type, headers={"Server-Timing": timing})


def _deployment_class():
    """The Serve deployment, made on first use so `--help` and the request helpers need no Ray. Batching is the
    replica's own (cluster.serve_batch.DynamicBatcher), not serve.batch: Serve's batch queue holds a lone
    request for batch_wait_timeout_s and runs the model on the replica's event loop thread's executor."""
    from ray import serve

    return serve.deployment(name="SegmentService")(Replica)


def deployment_options(cfg: ServeConfig, env: Optional[dict] = None) -> dict:
    """Replicas (fixed, or autoscaled on requests in flight: one full batch per replica), their resources and
    environment (``env``), room for a full batch plus the next one in each replica, and at most
    serve.max_queued_requests waiting at the proxy beyond that (more: 503 with Retry-After)."""
    from ray.serve.config import BackpressureConfig

    actor = {"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica}
    options = {"ray_actor_options": {**actor, "runtime_env": {"env_vars": env}} if env else actor,
               "max_ongoing_requests": max(8, 2 * cfg.max_batch_size),
               "max_queued_requests": cfg.max_queued_requests,
               "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=cfg.retry_after_s)}
    if cfg.autoscale is not None:
        options["autoscaling_config"] = {"min_replicas": cfg.autoscale[0], "max_replicas": cfg.autoscale[1],
                                         "target_ongoing_requests": max(1, cfg.max_batch_size)}
    else:
        options["num_replicas"] = cfg.replicas
    return options


def build_app(model_path, cfg: ServeConfig, stats=None, output_stride: Optional[int] = None,
              env: Optional[dict] = None):
    """The bound Serve application for ``model_path`` (a path or open_model_file's handle; shipped to the
    replicas through the object store);
    ``stats``: a TrafficStats actor the replicas tell about each request (the console's traffic line);
    ``env``: the replicas' environment for Serve's ingress (start_serve)."""

    deployment = _deployment_class().options(**deployment_options(cfg, env))
    return deployment.bind(ship_model(model_path), cfg, stats, output_stride)


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


class ServeConflict(UserError):
    """Serve already runs on the cluster with other HTTP options: Ray would keep them and serve elsewhere."""


def chosen_ingress(cfg: ServeConfig) -> str:
    """How HTTP reaches the replicas (serve.ingress). haproxy: Serve's HAProxy ingress forwards each request to the
    HTTP server of a replica; proxy: Serve's Python HTTP proxy calls the replica as a Ray actor, which then fetches
    the body from the proxy in another call (about 6 ms of CPU more per request: docs/serving.md). auto: haproxy on
    a Ray instance this command started (every replica on this machine) serving on loopback, else proxy: a
    replica's own HTTP server binds serve.host too, so on 0.0.0.0 its port (30000-31000) would be open beside the
    one asked for, and a replica on another node answers HAProxy only where serve.host makes it reachable; proxy
    too where there is no HAProxy binary (ray[serve] ships one on Linux only)."""
    if cfg.ingress != "auto":
        return cfg.ingress
    here = ray_internals.started_here() and is_loopback(cfg.host)
    return "haproxy" if here and ray_internals.haproxy_binary() else "proxy"


def is_loopback(host: str) -> bool:
    """Whether serve.host is this machine's loopback (127.0.0.0/8, ::1, localhost)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def haproxy_env() -> dict:
    """The environment of Serve's controller (and so of HAProxy's manager) and of the replicas for the HAProxy
    ingress: Ray's switches; HAProxy started through haproxy_loopback.sh, so its stats and metrics listeners are
    on 127.0.0.1, each on a free port (two endpoints on one machine do not collide); a stopping replica drains
    DRAIN_S, not Serve's 30 s; each access line is written when its request ends (the optimized mode holds
    1000 of them, so the log folder the start line names would lag far behind)."""
    binary = ray_internals.haproxy_binary()
    if binary is None:
        raise UserError("serve.ingress=haproxy: no HAProxy binary here (ray[serve] ships one on Linux; elsewhere put "
                        "haproxy on PATH), or use --ingress proxy")
    return {**ray_internals.HAPROXY_INGRESS_SWITCHES,
            ray_internals.HAPROXY_BINARY_ENV: HAPROXY_WRAPPER, "DEEPLAB_HAPROXY_BINARY": binary,
            ray_internals.HAPROXY_STATS_PORT_ENV: str(free_port()),
            ray_internals.HAPROXY_METRICS_PORT_ENV: str(free_port()), ray_internals.DRAIN_ENV: str(DRAIN_S),
            ray_internals.LOG_BUFFER_ENV: "1"}


def start_serve(cfg: ServeConfig, replace: bool = True) -> tuple:
    """Start Serve on serve.host:serve.port with the chosen ingress, or join a running Serve bound there; returns
    (whether this call started it, so only then does the command stop it; the environment our replicas need for
    that Serve's ingress). A Serve bound elsewhere, or with another ingress than serve.ingress names, is refused
    (ServeConflict): serve.start would ignore the new options, log that, and the endpoint would not be what the
    user asked for. Without ``replace``, so is a Serve that already serves this project's application: deploying
    would take another command's endpoint over, and that command's Ctrl-C would then remove this one's."""
    from ray import serve

    running = ray_internals.running_serve_address()
    if running is None:
        env = haproxy_env() if chosen_ingress(cfg) == "haproxy" else {}
        serve.start(http_options={"host": cfg.host, "port": cfg.port}, proxy_location="HeadOnly",
                    controller_options={"runtime_env": {"env_vars": env}} if env else None)
        ray_internals.kv_put(INGRESS_KEY, json.dumps(env))
        return True, env
    if running != (cfg.host, cfg.port):
        host, port = running
        raise ServeConflict(f"Serve already runs on this cluster bound to {host}:{port}, not "
                            f"{cfg.host}:{cfg.port} as asked (serve.host/serve.port): use --host {host} "
                            f"--port {port}, or stop it first (serve shutdown)")
    env = json.loads(ray_internals.kv_get(INGRESS_KEY) or b"{}")
    ingress = "haproxy" if env else "proxy"
    if cfg.ingress not in ("auto", ingress):
        raise ServeConflict(f"Serve already runs on this cluster with the {ingress} ingress, not {cfg.ingress} as "
                            f"asked (serve.ingress): use --ingress {ingress}, or stop it first (serve shutdown)")
    if not replace and APP_NAME in serve.status().applications:
        raise ServeConflict(f"Serve on this cluster already serves application {APP_NAME} at {cfg.host}:{cfg.port} "
                            f"(another cluster.serve command): stop that command first (its Ctrl-C removes it), or "
                            f"remove the application (serve shutdown)")
    return False, env


def start(model_path, cfg: ServeConfig, timeout_s: float = 300, stats=None, output_stride: Optional[int] = None,
          replace: bool = True) -> tuple:
    """Deploy (Ray must be initialized) and wait until /healthz answers; returns (the local URL, whether this
    call started Serve itself, the ingress: haproxy or proxy). ``replace``: deploy over this project's application
    where it already runs (a new model or options in place); the command refuses that instead (start_serve)."""
    from ray import serve

    started, env = start_serve(cfg, replace)
    serve.run(build_app(model_path, cfg, stats, output_stride, env), name=APP_NAME, route_prefix="/")
    url = local_url(cfg)
    if not wait_healthy(url, timeout_s):
        raise RuntimeError(f"{url}/healthz did not answer within {timeout_s:.0f}s")
    return url, started, "haproxy" if env else "proxy"


# --------------------------------------------------------------------------------------------------- CLI
ALIASES = [
    Alias("--host", "serve.host", "address to bind (127.0.0.1: this machine only)"),
    Alias("--port", "serve.port", "HTTP port"),
    Alias("--ingress", "serve.ingress", "how HTTP reaches a replica: haproxy (Serve's HAProxy, straight to the "
          "replica's HTTP server), proxy (Serve's Python proxy, an actor call), auto (haproxy on a Ray instance this "
          "command starts serving on loopback, else proxy)"),
    Alias("--replicas", "serve.replicas", "fixed number of replicas"),
    Alias("--autoscale", "serve.autoscale", "autoscale between MIN and MAX replicas on the requests in flight",
          nargs=2, metavar=("MIN", "MAX")),
    Alias("--max-batch-size", "serve.max_batch_size", "requests batched into one model call (1: no batching)"),
    Alias("--batch-wait-ms", "serve.batch_wait_ms", "the most a model call waits for requests already being "
          "read or decoded (a lone request never waits)"),
    Alias("--cpus-per-replica", "serve.cpus_per_replica", "CPUs (and intra-op threads) per replica"),
    Alias("--num-gpus-per-replica", "serve.gpus_per_replica", "GPUs per replica"),
    CHECKPOINT_STRIDE_ALIAS,
    Alias("--max-pixels", "serve.max_pixels", "larger images answer 413"),
    Alias("--max-batch-pixels", "serve.max_batch_pixels", "pixels per model call; a larger image answers 413"),
    Alias("--max-queued-requests", "serve.max_queued_requests", "requests waiting beyond the replicas' slots; "
          "more answer 503 with Retry-After"),
    Alias("--request-timeout-s", "serve.request_timeout_s", "longer requests answer 504"),
    Alias("--read-timeout-s", "serve.read_timeout_s", "an upload slower than this answers 408"),
]


def parse_args(argv):
    p = model_parser("python -m cluster.serve", __doc__)
    add_config_args(p, aliases=ALIASES)
    p.add_argument("--verbose", action="store_true",
                   help="Serve's own lines on the console too (an access line per request; always in its log files)")
    return p.parse_args(argv)


def _watch(stats, interval_s: float) -> NoReturn:
    """Until Ctrl-C or SIGTERM (deeplab.cli's Stopped, also when started with SIGINT ignored): every
    ``interval_s``, one console line for the traffic since the last one."""
    import ray

    next_line = time.monotonic() + interval_s
    while True:
        time.sleep(min(0.5, interval_s))
        if time.monotonic() >= next_line:
            next_line += interval_s
            try:
                line = traffic_line(ray.get(stats.take.remote(), timeout=30), interval_s)
            except (ray.exceptions.RayError, TimeoutError) as e:  # the endpoint keeps serving without it
                line = f"no traffic figures this time ({type(e).__name__})"
            if line:
                print(line, flush=True)


def where_to_look() -> str:
    """The start line's pointers: the Prometheus endpoint of the head node (where the proxy runs) and the
    folder of Serve's log files (access lines, errors by request id)."""
    head = ray_internals.head_node()
    metrics = (f"http://{head['NodeManagerAddress']}:{head['MetricsExportPort']}/metrics" if head
               else "each node's Ray metrics port")
    logs = ray_internals.logs_dir()
    logs = os.path.join(logs, "serve") if logs else "the Ray session's logs/serve folder"
    return f"metrics (Prometheus): {metrics}; access lines and errors by request id: {logs}/ on the head node"


def quiet_serve_console(verbose: bool) -> dict:
    """Serve's lines (an access line per request, deployment INFO lines) stay in its log files unless
    ``verbose``; returns ray.init's options for that."""

    if not verbose:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    return {**ray_init_options(verbose), "log_to_driver": verbose}


@command
def main(argv=None) -> int:
    args = parse_args(argv)

    exp = config_from_args(args)
    cfg = exp.serve
    model = open_model_file(args.model, exp.inference.output_stride)  # read once: shipped and shown
    info = model.info

    import ray
    from ray import serve

    joins = exp.cluster.address or os.environ.get("RAY_ADDRESS")
    local = {} if joins or cfg.metrics_port is None else {"_metrics_export_port": cfg.metrics_port}
    on_interrupt("the endpoint was not up yet; nothing is written; the same command starts it")
    init_ray(exp, **quiet_serve_console(args.verbose), **local)
    quiet_ray_reports(SERVE_SHUTDOWN_NOISE, args.verbose)
    stats = ray.remote(num_cpus=0)(TrafficStats).remote()
    try:
        url, started, ingress = start(model, cfg, stats=stats, output_stride=exp.inference.output_stride,
                                      replace=False)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    scale = (f"autoscaling {cfg.autoscale[0]}-{cfg.autoscale[1]} replicas" if cfg.autoscale is not None
             else f"{cfg.replicas} replica{'s' * (cfg.replicas != 1)}")
    print(f"serving {args.model} ({info.backend.split(' ')[0]}, {info.num_classes} classes, output stride "
          f"{info.output_stride}; {scale}, batches of up to {cfg.max_batch_size}; {INGRESS_NAMES[ingress]}) at "
          f"{url}: POST /segment, "
          f"GET /info, GET /healthz, GET /readyz; Ctrl-C stops", flush=True)
    print(where_to_look(), flush=True)
    on_interrupt(f"the endpoint at {url} stopped ("
                 + ("Serve shut down" if started else f"application {APP_NAME} removed; the Serve running before stays")
                 + "); nothing is written; the same command serves again")
    try:
        _watch(stats, cfg.stats_interval_s)
    finally:
        if started:
            serve.shutdown()
            ray_internals.kv_put(INGRESS_KEY, "{}")  # no Serve runs: a later one is not ours until we start it
        else:  # Serve was running before: only this command's application goes
            serve.delete(APP_NAME)


if __name__ == "__main__":
    sys.exit(main())
