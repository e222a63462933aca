"""A real multi-node Ray cluster on this machine for the Ray tests: one-CPU nodes of ray.cluster_utils.Cluster."""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def one_cpu_nodes(count: int, added_nodes_cwd=None):
    """``count`` one-CPU nodes (the head is one), this process connected. Never joins another cluster; the
    dashboard gets a free port (Ray Train's placement-group cleaner needs its state API, 8265 may be taken).
    ``added_nodes_cwd``: the working directory of the nodes after the head (their tasks inherit it), so that
    a path through /proc/self/cwd names another folder there: a node-local folder, as on another machine."""
    import ray
    from ray.cluster_utils import Cluster

    saved = os.environ.pop("RAY_ADDRESS", None)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "dashboard_port": free_port()})
    here = os.getcwd()
    for _ in range(count - 1):
        os.chdir(added_nodes_cwd or here)
        try:
            cluster.add_node(num_cpus=1)
        finally:
            os.chdir(here)
    cluster.wait_for_nodes()
    cluster.connect()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved


@contextmanager
def nodes_for_commands(cpus: int, count: int = 1):
    """``count`` nodes of ``cpus`` CPUs each that commands run in subprocesses join (by ``nodes.address``); this
    process stays unconnected. Never joins another cluster; the dashboard gets a free port."""
    from ray.cluster_utils import Cluster

    saved = os.environ.pop("RAY_ADDRESS", None)
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "dashboard_port": free_port()})
    try:
        for _ in range(count - 1):
            nodes.add_node(num_cpus=cpus)
        nodes.wait_for_nodes()
        yield nodes
    finally:
        nodes.shutdown()
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved
