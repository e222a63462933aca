"""Ray Train on a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster, 2 nodes).

One cluster for the module. Runs use resnet_tiny on 65 px crops: behaviour, not accuracy.
"""
import json
import os
import signal
import sys

import pytest

ray = pytest.importorskip("ray")
from ray.train import UserCallback  # noqa: E402

import cluster  # noqa: F401,E402  (registers the cluster section these configs set)
from deeplab import load_checkpoint  # noqa: E402
from deeplab.config import load_config  # noqa: E402
from ray_nodes import one_cpu_nodes  # noqa: E402

pytestmark = pytest.mark.slow
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the callback below runs in the controller


@pytest.fixture(scope="module")
def two_nodes():
    with one_cpu_nodes(2) as cluster:
        yield cluster


def tiny_config(tmp_path, name, **train):
    cfg = load_config(None, [
        "model.backbone=resnet_tiny", "model.aspp_channels=16", "model.num_classes=4",
        "data.synthetic_classes=4", "data.synthetic_size=80", "data.crop_size=65",
        "data.synthetic_train=16", "data.synthetic_val=4", "data.loader_workers=0",
        "train.batch_size=4", "train.max_iterations=12", "train.eval_interval=4", "train.log_interval=4",
        "train.lr=0.05", "train.amp=off",
        "cluster.num_workers=2", "cluster.cpus_per_worker=1", "cluster.placement_strategy=STRICT_SPREAD",
        "cluster.collective_timeout_s=30", "cluster.max_failures=2",
        f"cluster.storage_path={tmp_path}", f"cluster.name={name}",
    ])
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


class Log(UserCallback):
    """Runs in the Ray Train controller: appends every report and every worker failure to a file."""

    def __init__(self, path, kill_after_first_report_below=None):
        self.path, self.kill_below = str(path), kill_after_first_report_below

    def _write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def after_report(self, run_context, metrics, checkpoint):
        self._write({"report": [m["iteration"] for m in metrics], "loss": metrics[0]["loss"],
                     "checkpoint": checkpoint is not None})
        if self.kill_below is not None:
            pid = self._training_worker(self.kill_below)
            self.kill_below = None  # once
            os.kill(pid, signal.SIGKILL)  # as when a node dies: no cleanup, no exception in the worker
            self._write({"killed": pid})

    @staticmethod
    def _training_worker(ancestor: int) -> int:
        """A Ray Train worker process of *this* test's cluster (a descendant of the pytest process)."""
        import psutil

        for proc in psutil.process_iter(["pid", "cmdline"]):
            if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
                if any(p.pid == ancestor for p in proc.parents()):
                    return proc.pid
        raise RuntimeError("no RayTrainWorker process found")

    def after_exception(self, run_context, worker_exceptions):
        self._write({"failure": {str(k): type(v).__name__ for k, v in worker_exceptions.items()}})


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_init_ray_joins_the_cluster_started_on_this_machine(two_nodes, tmp_path):
    from cluster.ray_session import init_ray

    ray.shutdown()
    try:
        init_ray(tiny_config(tmp_path, "join"))  # no cluster.address, no RAY_ADDRESS: the recorded cluster
    finally:
        if not ray.is_initialized():
            two_nodes.connect()
    assert ray.get_runtime_context().gcs_address == two_nodes.gcs_address
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2


def test_two_nodes_strict_spread_trains_and_writes_best_checkpoint(two_nodes, tmp_path):
    from cluster.train import build_trainer, train

    cfg = tiny_config(tmp_path, "spread")
    assert build_trainer(cfg).scaling_config.placement_strategy == "STRICT_SPREAD"  # one worker per node
    log = tmp_path / "log.jsonl"
    result = train(cfg, callbacks=[Log(log)])
    reports = [r for r in read_log(log) if "report" in r]
    assert [r["report"] for r in reports] == [[4, 4], [8, 8], [12, 12]]  # every rank, once per evaluation
    assert all(r["checkpoint"] for r in reports)
    assert reports[-1]["loss"] < reports[0]["loss"]  # it learns
    assert result.metrics["iteration"] == 12 and len(result.metrics["val_iou"]) == 4
    for checkpoint, metrics in result.best_checkpoints:
        ck = load_checkpoint(os.path.join(checkpoint.path, "model.ckpt"))
        assert ck.state["metrics"]["val_miou"] == pytest.approx(metrics["val_miou"])
        assert ck.experiment.data.crop_size == 65 and ck.config.backbone == "resnet_tiny"
    best = load_checkpoint(tmp_path / "spread" / "best.ckpt")
    assert best.state["metrics"]["val_miou"] == pytest.approx(max(m["val_miou"] for _, m in result.best_checkpoints))
    assert list((tmp_path / "spread" / "tensorboard").iterdir())  # event files for TensorBoard


def test_sigkilled_worker_is_replaced_and_the_run_resumes(two_nodes, tmp_path):
    from cluster.train import build_trainer

    cfg = tiny_config(tmp_path, "killed")
    log = tmp_path / "log.jsonl"
    result = build_trainer(cfg, callbacks=[Log(log, kill_after_first_report_below=os.getpid())]).fit()
    records = read_log(log)
    assert any("killed" in r for r in records) and any("failure" in r for r in records)
    iterations = [r["report"][0] for r in records if "report" in r]
    # resumed from the newest complete checkpoint: 4, or 8 when the kill came after rank 0 had written it but
    # before Ray recorded that report (cluster.checkpoints); either way each iteration reported once, to the end
    resumed = result.metrics["resumes"][0]["checkpoint_iteration"]
    assert iterations == ([4, 8, 12] if resumed == 4 else [4, 12]) and resumed in (4, 8)
    assert result.metrics["iteration"] == 12


def test_nan_loss_fails_the_run_without_retries(two_nodes, tmp_path):
    from cluster.train import build_trainer

    cfg = tiny_config(tmp_path, "nan", lr=1e12, max_iterations=40, eval_interval=40)
    log = tmp_path / "log.jsonl"
    with pytest.raises(ray.train.TrainingFailedError, match=r"loss is (nan|inf) at iteration"):
        build_trainer(cfg, callbacks=[Log(log)], max_failures=3).fit()
    failures = [r for r in read_log(log) if "failure" in r]
    assert len(failures) == 1  # not retried max_failures times


def test_a_bad_file_found_mid_run_ends_the_run_at_once_in_one_line(two_nodes, tmp_path, capsys):
    """A deterministic error in the training code is not a lost node: no retries, one line on the driver."""
    from cluster.train import build_trainer, main
    from data_trees import make_folder
    from deeplab.config import save_config

    root = tmp_path / "ds"
    make_folder(root, names=("bg", "a", "b", "c"), stems=tuple("abcdefgh"), size=(70, 70),
                splits={"train": list("abcdefgh"), "val": list("ab")})
    bad = root / "images" / "e.jpg"
    bad.write_bytes(bad.read_bytes()[:300])  # preflight finds the pair; decoding it mid-run fails
    cfg = tiny_config(tmp_path, "badfile", max_iterations=40, eval_interval=40)
    cfg.data.dataset, cfg.data.root, cfg.data.num_classes = "folder", str(root), None
    log = tmp_path / "log.jsonl"
    with pytest.raises(ray.train.TrainingFailedError, match="unreadable or truncated image"):
        build_trainer(cfg.check(), callbacks=[Log(log)], max_failures=2).fit()
    assert len([r for r in read_log(log) if "failure" in r]) == 1  # not retried max_failures times

    cfg.cluster.name = "badfile-cli"
    save_config(cfg, tmp_path / "bad.yaml")
    assert main(["--config", str(tmp_path / "bad.yaml")]) == 1
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]  # not Ray's logs
    assert len(ours) == 1 and ours[0].startswith("error: training failed: worker ")
    assert f"{bad}: unreadable or truncated image" in ours[0]
