"""Where Ray meets the model: training runs on Ray Train (`cluster.train`), batch inference on Ray Data
(`cluster.segment`), an HTTP endpoint on Ray Serve (`cluster.serve`), the demo and the cluster configs. All of them
reach Ray through `cluster.ray_session` (join or start a cluster), run storage through `cluster.storage`, and
Ray's private APIs only through `cluster.ray_internals`; each module's docstring says what it is for.

Only `cluster.config` is imported here (it registers the cluster, segment and serve config sections), so
`import cluster.syncbn` does not pull in Ray.
"""
from . import config  # noqa: F401
