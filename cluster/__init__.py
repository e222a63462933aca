"""Where Ray meets the model: `cluster.train` (a config -> TorchTrainer run, fixed-size or elastic),
`cluster.worker` (what each Ray worker runs), `cluster.syncbn` (synchronized BatchNorm on CPU and GPU),
`cluster.bench` (Ray Train overhead), `cluster.demo` (what `make demo` runs), `cluster.segment` (Ray Data batch
inference over an image collection), `cluster.serve` (a Ray Serve HTTP endpoint), `cluster.infer` (what those
two share), `cluster.bench_serve` (their figures), `cluster.spot_watch` (spot notices to Ray preemption notices).

Only `cluster.config` is imported here (it registers the cluster, segment and serve config sections), so
`import cluster.syncbn` does not pull in Ray.
"""
from . import config  # noqa: F401
