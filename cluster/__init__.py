"""Ray Train for DeepLabv3: `cluster.train` (a config -> TorchTrainer run, fixed-size or elastic),
`cluster.worker` (what each Ray worker runs), `cluster.syncbn` (synchronized BatchNorm on CPU and GPU),
`cluster.bench` (Ray Train overhead), `cluster.demo` (what `make demo` runs).

Nothing is imported here, so `import cluster.syncbn` does not pull in Ray.
"""
