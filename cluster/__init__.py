"""Where Ray meets the model: `cluster.train` (a config -> TorchTrainer run), `cluster.syncbn` (synchronized
BatchNorm on CPU and GPU), `cluster.bench` (Ray Train overhead), `cluster.demo` (what `make demo` runs),
`cluster.segment` (Ray Data batch inference over an image collection), `cluster.serve` (a Ray Serve HTTP
endpoint), `cluster.infer` (what those two share), `cluster.bench_serve` (their figures).

Nothing is imported here, so `import cluster.syncbn` does not pull in Ray.
"""
