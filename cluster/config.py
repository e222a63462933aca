"""cluster's config sections: how a run is laid out on Ray (``cluster``), batch inference with Ray Data
(``segment``) and the Ray Serve endpoint (``serve``). Registered with deeplab's config on import (the package's
__init__ imports this), so one experiment file holds them next to deeplab's sections. No Ray here: reading a
config stays cheap. How segment and serve run the model (output stride, scales, overlay alpha) is deeplab's
``inference`` section, shared with every command that predicts."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple, Union

from deeplab.config import ConfigError, ExperimentConfig, Section, register_section, show_value
from deeplab.train_batch import per_worker_batch

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
GRAD_COMPRESSIONS = ("none", "bf16")


@dataclass
class ClusterConfig(Section):
    """How the run is laid out on Ray."""

    SECTION: ClassVar[str] = "cluster"

    # N workers, or [MIN, MAX] (--num-workers MIN-MAX): elastic, starts once MIN fit, grows to MAX as nodes join
    num_workers: Union[int, Tuple[int, int]] = 2
    resize_interval_s: float = 60.0  # elastic: how often Ray looks for room to grow the worker group
    use_gpu: bool = False
    cpus_per_worker: float = 1
    storage_path: str = "runs"
    name: str = "deeplabv3"
    max_failures: int = 3
    collective_timeout_s: int = 120
    placement_strategy: str = "PACK"
    address: Optional[str] = None  # None: RAY_ADDRESS or an existing cluster, else a local one
    ddp_bucket_mb: float = 25.0  # DDP's gradient all-reduce bucket (torch's default 25)
    grad_compression: str = "none"  # none | bf16: DDP all-reduces bf16 gradients (half the bytes; not exact)

    def check(self) -> None:
        text = self.num_workers
        if isinstance(text, str) and text.count("-") == 1 and text.replace("-", "").strip().isdigit():
            self.num_workers = [int(n) for n in text.split("-")]  # the --num-workers MIN-MAX form
        super().check()

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    def check_values(self) -> None:
        self._need(self.min_workers >= 1, "num_workers", "must be >= 1")
        self._need(self.min_workers <= self.max_workers, "num_workers", "must be a range MIN-MAX with MIN <= MAX")
        if self.min_workers == self.max_workers:
            self.num_workers = self.min_workers  # [4, 4] is a fixed group of 4
        self._need(self.resize_interval_s >= 0, "resize_interval_s", "must be >= 0")
        self._need_at_least(1, "collective_timeout_s")
        self._need(0 < self.cpus_per_worker < math.inf, "cpus_per_worker", "must be > 0")
        self._need(bool(self.storage_path), "storage_path", "must name a folder or a URI (s3://...)")
        self._need(bool(self.name) and "/" not in self.name, "name", "must be a folder name (no '/')")
        self._need_at_least(-1, "max_failures")  # -1: retry forever, as in Ray
        self._need_one_of("placement_strategy", PLACEMENT_STRATEGIES)
        self._need(0 < self.ddp_bucket_mb < math.inf, "ddp_bucket_mb", "must be > 0 (MB), e.g. 25")
        self._need_one_of("grad_compression", GRAD_COMPRESSIONS)


@dataclass
class SegmentConfig(Section):
    """Batch inference over an image collection with Ray Data (python -m cluster.segment)."""

    SECTION: ClassVar[str] = "segment"
    MOVED: ClassVar[dict] = {"output_stride": "inference.output_stride", "alpha": "inference.alpha"}

    workers: Optional[int] = None  # model actors (None: as many as the cluster's CPUs or GPUs hold)
    batch_size: int = 4  # images per actor call; split into same-size groups, never resized
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    cpus_per_decode: float = 0.5  # each read + decode task
    color: bool = False  # also NAME_color.png and NAME_overlay.png
    max_pixels: Optional[int] = None  # larger images fail (None: Pillow's decompression-bomb limit)
    max_batch_pixels: int = 2048 * 2048  # pixels per model call (~0.6 KB each at OS8, R-101); a larger image runs alone
    progress_interval_s: float = 5.0

    def check_values(self) -> None:
        self._need_at_least(1, "workers", "batch_size", "max_pixels", "max_batch_pixels")
        for name in ("cpus_per_worker", "gpus_per_worker", "cpus_per_decode"):
            self._need(0 <= getattr(self, name) < math.inf, name, "must be >= 0")
        self._need(self.cpus_per_worker > 0 or self.gpus_per_worker > 0, "cpus_per_worker",
                   "must be > 0 unless segment.gpus_per_worker > 0")
        self._need(0 < self.progress_interval_s < math.inf, "progress_interval_s", "must be > 0")


INGRESSES = ("auto", "haproxy", "proxy")  # how HTTP reaches a replica (cluster.serve.chosen_ingress)


@dataclass
class ServeConfig(Section):
    """An HTTP endpoint on Ray Serve (python -m cluster.serve)."""

    SECTION: ClassVar[str] = "serve"
    MOVED: ClassVar[dict] = {"output_stride": "inference.output_stride"}

    host: str = "127.0.0.1"  # loopback unless you say otherwise
    port: int = 8000
    replicas: int = 1
    autoscale: Optional[Tuple[int, int]] = None  # [min, max] replicas: Serve scales between them instead
    max_batch_size: int = 8  # concurrent requests run as one batch (1: no batching)
    batch_wait_ms: float = 10.0  # the most a call waits for requests already at the replica (a lone one: none)
    cpus_per_replica: float = 1
    gpus_per_replica: float = 0
    max_pixels: int = 2048 * 2048  # larger uploads answer 413
    max_batch_pixels: int = 2048 * 2048  # pixels per model call (~0.6 KB each at OS8, R-101); an image over it: 413
    max_upload_mb: float = 32.0
    max_queued_requests: int = 32  # waiting at the proxy beyond each replica's batch slots; more: 503
    retry_after_s: float = 1.0  # the Retry-After header of a 503
    request_timeout_s: float = 60.0  # from the request's arrival at a replica to its answer; longer: 504
    read_timeout_s: float = 10.0  # to receive an upload's body; slower: 408 and the slot is freed
    stats_interval_s: float = 60.0  # the console's traffic line (requests, latency, batch size, errors)
    metrics_port: Optional[int] = None  # Prometheus /metrics of a local Ray instance (None: Ray picks one)
    ingress: str = "auto"  # haproxy | proxy | auto: haproxy on a Ray the command starts, on loopback; else proxy

    def check_values(self) -> None:
        self._need(bool(self.host), "host", "must be an address to bind, e.g. 127.0.0.1")
        self._need_one_of("ingress", INGRESSES)
        self._need(1 <= self.port <= 65535, "port", "must be 1-65535")
        self._need_at_least(1, "replicas", "max_batch_size", "max_pixels", "max_batch_pixels", "max_queued_requests")
        if self.autoscale is not None:
            low, high = self.autoscale
            self._need(0 <= low <= high and high >= 1, "autoscale",
                       "must be [MIN, MAX] replicas with 0 <= MIN <= MAX and MAX >= 1")
            if self.replicas != 1:
                raise ConfigError(f"serve.replicas={self.replicas} and serve.autoscale={show_value(self.autoscale)}: "
                                  "set one (a fixed count, or MIN and MAX)", ("serve.replicas", "serve.autoscale"))
        for name in ("batch_wait_ms", "cpus_per_replica", "gpus_per_replica"):
            self._need(0 <= getattr(self, name) < math.inf, name, "must be >= 0")
        for name in ("max_upload_mb", "request_timeout_s", "read_timeout_s", "stats_interval_s"):
            self._need(0 < getattr(self, name) < math.inf, name, "must be > 0")
        self._need(0 <= self.retry_after_s < math.inf, "retry_after_s", "must be >= 0")
        self._need(self.metrics_port is None or 1 <= self.metrics_port <= 65535, "metrics_port", "must be 1-65535")


def check_workers(cfg: ExperimentConfig) -> None:
    """What spans train and cluster: the global batch over every size an elastic group can have, and fp16
    only on GPU workers."""
    t, c = cfg.train, cfg.cluster
    for workers in range(c.min_workers, c.max_workers + 1):
        per_worker_batch(t.batch_size, workers, synchronized_bn=workers > 1, frozen_bn=t.freeze_bn,
                         workers_key="cluster.num_workers")
    if t.amp == "fp16" and not c.use_gpu:
        raise ConfigError("train.amp='fp16' needs GPUs (cluster.use_gpu, --use-gpu); use bf16, auto or off "
                          "on CPU workers", ("train.amp", "cluster.use_gpu"))


register_section(ClusterConfig, check_workers)
register_section(SegmentConfig)
register_section(ServeConfig)
