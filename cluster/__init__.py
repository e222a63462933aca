"""Where Ray meets the model: training runs on Ray Train (`cluster.train`), batch inference on Ray Data
(`cluster.segment`), an HTTP endpoint on Ray Serve (`cluster.serve`), the demo and the cluster configs; each
module's docstring says what it is for.

Nothing is imported here, so `import cluster.syncbn` does not pull in Ray.
"""
