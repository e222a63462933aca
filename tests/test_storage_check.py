"""The driver refuses, before training, a storage_path that a node where workers may run cannot see (what Ray
Train finds only at the first checkpoint upload). A real 2-node Ray cluster on this machine: the second node's
processes run in another folder, so a path through /proc/self/cwd is a node-local folder that differs between
the nodes, as on two hosts."""
import os
from pathlib import Path

import pytest

from ray_nodes import one_cpu_nodes

pytestmark = pytest.mark.slow  # a real 2-node Ray cluster (~20 s)
DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
NODE_LOCAL = "/proc/self/cwd/runs"  # each process's own working folder: the head's (and the driver's) or node 2's


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """The head (and this driver) working in head/, the second node in other/."""
    head, other = tmp_path_factory.mktemp("head"), tmp_path_factory.mktemp("other")
    before = os.getcwd()
    os.chdir(head)
    try:
        with one_cpu_nodes(2, added_nodes_cwd=str(other)) as cluster:
            yield cluster, head, other
    finally:
        os.chdir(before)


def _cfg(storage: str):
    import cluster.config  # noqa: F401  (registers the cluster section this config sets)
    from deeplab.config import load_config

    cfg = load_config(None, [f"cluster.storage_path={storage}", "cluster.num_workers=2"])
    return cfg


def test_a_folder_only_the_driver_sees_is_refused_naming_the_node_and_the_fix(two_nodes):
    import ray

    from cluster.train import check_storage_visible
    from deeplab.config import ConfigError

    cluster, head, other = two_nodes
    assert os.getcwd() == str(head)
    second = next(n for n in ray.nodes() if n["NodeID"] != ray.get_runtime_context().get_node_id())
    with pytest.raises(ConfigError) as e:
        check_storage_visible(_cfg(NODE_LOCAL), NODE_LOCAL)
    line = str(e.value)
    assert "\n" not in line and "cluster.storage_path=/proc/self/cwd/runs is not visible on node" in line
    assert second["NodeID"][:12] in line and "s3://" in line and "NFS" in line
    assert os.listdir(head / "runs") == []  # the marker is gone
    assert not (other / "runs").exists()  # node 2 only looked


def test_a_folder_every_node_sees_and_an_object_store_pass(two_nodes, tmp_path):
    from cluster.train import check_storage_visible

    shared = str(tmp_path / "nfs" / "runs")  # one path for every node: what an NFS mount is
    check_storage_visible(_cfg(shared), shared)
    assert os.listdir(shared) == []
    check_storage_visible(_cfg("s3://bucket/runs"), "s3://bucket/runs")  # no node is asked, nothing written


def test_the_train_command_refuses_in_one_line_before_training(two_nodes, capsys):
    from cluster.train import main

    cluster, head, other = two_nodes
    assert main(["--config", DEMO, "--storage-path", NODE_LOCAL, "--num-workers", "2", "--name", "never"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cluster.storage_path=/proc/self/cwd/runs is not visible on node")
    assert len(err.splitlines()) == 1
    assert not (head / "runs" / "never").exists()  # no run folder: training never started
