"""Elastic training on a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster, one-CPU nodes).

`--num-workers 2-3` starts on 2 nodes; a third node joins and the group grows to 3; Ray is told the node is
being preempted (a drain, as on a spot reclaim) and the workers checkpoint at once; the node leaves and the
group shrinks back to 2. The run ends at train.max_iterations with each evaluation reported once, the loss
going down, and every iteration's global batch, summed from what each worker logged it trained on, equal to
train.batch_size (4 + 4 on two workers, 3 + 3 + 2 on three).

The test prints the time from the node's loss to training again (it goes in docs/benchmarks.md, measured under load).
"""
import json
import os
import subprocess
import sys
import threading
import time

import pytest

ray = pytest.importorskip("ray")
from ray.train import UserCallback  # noqa: E402

import cluster  # noqa: F401,E402  (registers the cluster section these configs set)
from deeplab.config import load_config, split_batch  # noqa: E402
from ray_nodes import one_cpu_nodes  # noqa: E402

pytestmark = pytest.mark.slow
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the callback below runs in the controller

BATCH, EVAL_INTERVAL = 8, 8
# Ray takes its time to see a node come or go (its free-resource view is refreshed every 20 s): the run must
# still be training when the group has grown and when the node leaves. On an idle 2-core machine the group grew
# at iteration 56 (25 s) and shrank at iteration 88 (68 s), most of it restarts, not training; in three more runs
# (load 2 to 7) it shrank at 48, 96 and 118; 2 workers then train about 4 iterations/s. 240 iterations leave 2x
# the most the resizes took; every iteration after the shrink is only waiting for the end (about a minute
# more at 480, and more time for a spurious restart: one 2 -> 2 at iteration 408 was seen under load).
MAX_ITERATIONS = 240


class Log(UserCallback):
    """Runs in the Ray Train controller: one JSON line per report, with what every rank logged."""

    def __init__(self, path):
        self.path = str(path)

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as f:
            f.write(json.dumps({"iteration": [m["iteration"] for m in metrics], "loss": metrics[0]["loss"],
                                "batches": [m["worker_batches"] for m in metrics], "time": time.time(),
                                "checkpoint": checkpoint is not None}) + "\n")


def _reports(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def _wait(what, condition, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def two_nodes(monkeypatch):
    # After a node leaves, Ray's view of free resources lags up to 20 s, and a restart planned for the old size
    # waits this long before it retries with what is there (Ray's default: 60 s). Ray passes it to its controller.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20")
    with one_cpu_nodes(2) as cluster:
        yield cluster


def _config(tmp_path, max_iterations):
    return load_config(None, [
        "model.backbone=resnet_tiny", "model.aspp_channels=16", "model.num_classes=4",
        "data.synthetic_classes=4", "data.synthetic_size=80", "data.crop_size=65",
        "data.synthetic_train=64", "data.synthetic_val=4", "data.loader_workers=0",
        f"train.batch_size={BATCH}", f"train.max_iterations={max_iterations}", f"train.eval_interval={EVAL_INTERVAL}",
        "train.log_interval=2", "train.lr=0.05", "train.amp=off", "train.channels_last=false",
        "cluster.num_workers=2-3", "cluster.resize_interval_s=2", "cluster.cpus_per_worker=1",
        "cluster.collective_timeout_s=30", "cluster.max_failures=5",
        f"cluster.storage_path={tmp_path}", "cluster.name=elastic",
    ])


def _drain(cluster, node):
    """What Ray's autoscaler does on a spot reclaim notice: mark the node as being preempted, with a deadline."""
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    subprocess.run([ray_cli, "drain-node", "--address", cluster.address, "--node-id", node.node_id,
                    "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)",
                    "--deadline-remaining-seconds", "120"], check=True, capture_output=True, timeout=60)


def _run(cluster, cfg, log):
    """Train in a thread; grow, drain and shrink the cluster from this one (Ray adds nodes from the main thread)."""
    from cluster.train import train

    out = {}
    thread = threading.Thread(target=lambda: out.update(result=train(cfg, callbacks=[Log(log)])), daemon=True)
    thread.start()
    _wait("the first report of 2 workers", lambda: _reports(log))
    third = cluster.add_node(num_cpus=1)
    _wait("the group to grow to 3", lambda: any(len(r["iteration"]) == 3 for r in _reports(log)))
    seen = len(_reports(log))
    _drain(cluster, third)
    _wait("the checkpoint on the preemption notice",
          lambda: any(r["iteration"][0] % EVAL_INTERVAL for r in _reports(log)[seen:]), timeout=120)
    cluster.remove_node(third)
    out["removed"] = time.time()
    thread.join(timeout=600)
    assert not thread.is_alive(), "the run did not finish"
    return out


def test_group_grows_and_shrinks_with_the_cluster_and_keeps_the_global_batch(two_nodes, tmp_path):
    log = tmp_path / "reports.jsonl"
    max_iterations = MAX_ITERATIONS
    out = _run(two_nodes, _config(tmp_path, max_iterations), log)
    reports = _reports(log)
    iterations = [r["iteration"][0] for r in reports]
    assert all(len(set(r["iteration"])) == 1 for r in reports)  # every rank reports the same iteration
    assert iterations == sorted(set(iterations)) and iterations[-1] == max_iterations  # each once, to the end
    sizes = [len(r["iteration"]) for r in reports]
    assert [s for i, s in enumerate(sizes) if i == 0 or s != sizes[i - 1]] == [2, 3, 2]

    # every iteration's global batch from what each rank logged: [images, iterations] runs since its last report,
    # or since the checkpoint a restart resumed from (the newest complete one, which Ray may not have recorded)
    resumed_from = [r["checkpoint_iteration"] for r in out["result"].metrics["resumes"]]
    previous = 0
    for report, iteration in zip(reports, iterations):
        previous = max([previous, *(c for c in resumed_from if previous < c < iteration)])
        per_rank = [[n for n, count in runs for _ in range(count)] for runs in report["batches"]]
        world = len(per_rank)
        assert all(len(sizes) == iteration - previous for sizes in per_rank), report
        assert all(sum(step) == BATCH for step in zip(*per_rank)), report
        assert [sizes[0] for sizes in per_rank] == [split_batch(BATCH, world, r) for r in range(world)]
        previous = iteration
    assert any(len(r["batches"]) == 3 for r in reports)  # 3, 3, 2 was trained

    losses = [r["loss"] for r in reports]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # it learns through the resizes

    result = out["result"]
    resumes = result.metrics["resumes"]
    assert [r["workers"] for r in resumes] == [[2, 3], [3, 2]]
    off_schedule = [i for i in iterations if i % EVAL_INTERVAL]
    # resumed from the preemption checkpoint, or from a newer complete one rank 0 wrote before the node went (which
    # Ray may not have recorded: cluster.checkpoints resumes from the newest complete checkpoint on disk)
    assert off_schedule and resumes[1]["checkpoint_iteration"] >= off_schedule[0]
    for r in resumes:
        assert r["reached_iteration"] >= r["checkpoint_iteration"]
    summary = json.loads((tmp_path / "elastic" / "summary.json").read_text())
    assert summary["resumes"] == resumes and summary["iterations"] == max_iterations
    assert (tmp_path / "elastic" / "best.ckpt").is_file()
    from deeplab.train_loop import describe_resume

    lost = resumes[1]["time"] - out["removed"]
    print(f"\nelastic: {max_iterations} iterations; {'; '.join(describe_resume(r) for r in resumes)}; from the "
          f"node's loss to training again {lost:.1f} s")
