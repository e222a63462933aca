"""This process's Ray session: join the cluster a user means, else start a local one; free ports on loopback.

Every command that needs Ray starts here: training and tuning, but also serving (cluster.serve), batch inference
(cluster.segment) and the benchmarks. It is apart from cluster.train so that those never import training.
"""
from __future__ import annotations

import os
import socket
from typing import Optional

from cluster import ray_internals
from deeplab.cli import UserError, error_line, keeps_stop_signals
from deeplab.config import ExperimentConfig


def port_in_use(port: int) -> bool:
    """Whether something on this machine accepts connections on 127.0.0.1:``port``."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recorded_cluster() -> Optional[str]:
    """The address ``ray start`` / ``ray up`` recorded on this machine (Ray's current-cluster file in its temp
    folder), or None. Not ``ray.init(address="auto")``: that joins *any* Ray instance it sees running here,
    another user's local one too. Ray has no public call for this record."""
    return ray_internals.recorded_cluster_address()


class ClusterUnreachable(UserError):
    """cluster.address / RAY_ADDRESS names a cluster this process cannot join (not running, another address, a
    port closed between the machines)."""


def _check_answers(address: str, named: str, timeout_s: float = 10.0) -> None:
    """A ``HOST:PORT`` address that nothing answers on fails here in one line: ``ray.init`` would retry for
    minutes, printing a warning a second. Other forms (``auto``, ``ray://``) are left to Ray."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "/" in host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ClusterUnreachable(f"cannot join the Ray cluster at {address} ({named}): nothing answers there "
                                 f"({e.strerror or e}); is it running, and is the port open from here?") from None


# Ray's raylet ends a worker process idle for 1 s while there are more worker processes than CPUs (each new
# actor makes one more). Ray 2.60's exit path for it can abort the exiting process: OpenCensus's metrics
# harvester thread (in _raylet.so) locks a mutex the exit has already freed ("mutex.cc: Lock: Mutex corrupt" +
# SIGABRT, seen in segment's decode workers and in a worker that had run no task; issue 20). A cluster we start
# keeps its idle workers instead: they end with the job, and no worker is started again to replace one ended.
LOCAL_SYSTEM_CONFIG = {"kill_idle_workers_interval_ms": 0}


@keeps_stop_signals  # Ray takes SIGTERM for itself; a command answers it
def init_ray(cfg: ExperimentConfig, local: bool = False, num_cpus: Optional[int] = None, **kwargs) -> None:
    """Join the cluster named by cluster.address / RAY_ADDRESS / the one started on this machine with ``ray start``
    or ``ray up``, else start a local one (``local``: always a fresh local one). ``kwargs`` go to ``ray.init``.

    A local cluster gets ``num_cpus`` logical CPUs (default: this machine's), no GPUs unless cluster.use_gpu,
    its dashboard on 8265 or a free port when that is taken, and its processes are told that address: Ray
    Train's placement-group cleaner (which frees an early-stopped trial's workers) finds the cluster through the
    dashboard, and with several local Ray instances on one machine it otherwise picks the newest one, never
    frees the resources and the next trial waits forever. Its raylet never ends idle workers (LOCAL_SYSTEM_CONFIG).
    """
    import ray

    if ray.is_initialized():
        return
    if local:  # its processes must not follow RAY_ADDRESS to another cluster
        os.environ.pop("RAY_ADDRESS", None)
    elif cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
        address = cfg.cluster.address or os.environ["RAY_ADDRESS"]
        named = "cluster.address" if cfg.cluster.address else "RAY_ADDRESS"
        _check_answers(address, named)
        ray_internals.send_this_machines_token()
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as e:
            raise ClusterUnreachable(f"cannot join the Ray cluster at {address} ({named}): {error_line(e)}") from None
        return
    elif _recorded_cluster():
        ray_internals.send_this_machines_token()
        try:
            ray.init(address=_recorded_cluster(), **kwargs)
            return
        except ConnectionError:  # the record of a cluster since stopped
            pass
    port = free_port() if port_in_use(8265) else 8265
    system = {**LOCAL_SYSTEM_CONFIG, **kwargs.pop("_system_config", {})}
    ray.init(address="local", num_cpus=num_cpus, num_gpus=None if cfg.cluster.use_gpu else 0,
             dashboard_port=port, runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
             _system_config=system, **kwargs)
