"""What cluster.serve's replicas count, for two readers: Prometheus (the project's metrics next to Ray Serve's
own, exported by each node's Ray metrics agent) and the console's traffic line (a small actor the replicas
tell about each request and the driver reads every serve.stats_interval_s)."""
from __future__ import annotations

import time
from collections import Counter
from typing import Optional

import numpy as np

LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64]
REASONS = {400: "bad_request", 404: "not_found", 405: "bad_method", 408: "read_timeout", 413: "too_large",
           415: "unsupported_type", 500: "internal_error", 504: "timeout"}


def reason(status: int) -> str:
    return REASONS.get(status, f"http_{status}")


class ReplicaMetrics:
    """The project's metrics, recorded in a replica (ray.serve.metrics adds the deployment and replica tags;
    Ray's exporter prefixes the names with ray_)."""

    def __init__(self):
        from ray.serve import metrics

        self.latency = metrics.Histogram(
            "deeplab_request_latency_ms", description="POST /segment: arrival at the replica to the answer, by status",
            boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("status",))
        self.batch = metrics.Histogram("deeplab_batch_size", description="images per model call",
                                       boundaries=BATCH_BOUNDARIES)
        self.rejected = metrics.Counter("deeplab_rejected_requests",
                                        description="requests answered 4xx/5xx by the replica, by reason",
                                        tag_keys=("reason",))

    def request(self, status: int, seconds: float) -> None:
        self.latency.observe(seconds * 1000, tags={"status": str(status)})
        if status >= 400:
            self.rejected.inc(tags={"reason": reason(status)})

    def model_call(self, images: int) -> None:
        self.batch.observe(images)


class TrafficStats:
    """Requests and model calls since the last take(); run as a Ray actor (num_cpus=0) by the driver."""

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self.latencies, self.batches, self.statuses = [], [], Counter()

    def record(self, status: int, seconds: float) -> None:
        self.latencies.append(seconds)
        self.statuses[status // 100] += 1

    def record_call(self, images: int) -> None:
        self.batches.append(images)

    def record_many(self, requests: list, calls: list) -> None:
        """What a replica gathered since its last message: (status, seconds) per request, images per call."""
        for status, seconds in requests:
            self.record(status, seconds)
        self.batches.extend(calls)

    def take(self) -> dict:
        """The window's summary, and a fresh window."""
        ms = np.asarray(self.latencies) * 1000
        summary = {"requests": len(self.latencies),
                   "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
                   "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
                   "mean_batch": float(np.mean(self.batches)) if self.batches else None,
                   "4xx": self.statuses[4], "5xx": self.statuses[5]}
        self._reset()
        return summary


def traffic_line(summary: dict, interval_s: float, now: Optional[float] = None) -> Optional[str]:
    """One console line for a window with traffic (None for a quiet one)."""
    if not summary["requests"]:
        return None
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    batch = "-" if summary["mean_batch"] is None else f"{summary['mean_batch']:.1f}"
    return (f"{stamp} last {interval_s:g}s: {summary['requests']} requests, p50 {summary['p50_ms']:.0f} ms, "
            f"p99 {summary['p99_ms']:.0f} ms, mean batch {batch}, 4xx {summary['4xx']}, 5xx {summary['5xx']}")
