"""cluster.train's driver-side pieces that tuning shares (divergence reason, best-checkpoint copy, init_ray) and the
command lines' shorthand flags. Fast: no Ray cluster except the one test of a local start."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster import bench
from cluster.train import copy_checkpoint, divergence_reason, main

ROOT = Path(__file__).resolve().parents[1]


def test_divergence_is_found_however_ray_wraps_it():
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError
    from ray.train.v2.api.exceptions import WorkerGroupError

    nan = FloatingPointError("loss is nan at iteration 7")
    assert divergence_reason(nan) == "loss is nan at iteration 7"
    assert divergence_reason(ControllerError(nan)) == "loss is nan at iteration 7"
    assert divergence_reason(WorkerGroupError("failed", {1: nan})) == "loss is nan at iteration 7"
    wrapped = RuntimeError("worker died")
    wrapped.__cause__ = nan
    assert divergence_reason(wrapped) == "loss is nan at iteration 7"
    # as a worker's error reaches the controller: a RayTaskError subclassing the cause, text with its traceback
    remote = RayTaskError("train_fn", "Traceback ...\nFloatingPointError: loss is inf at iteration 3", nan)
    assert divergence_reason(remote.as_instanceof_cause()) == "loss is inf at iteration 3"
    assert divergence_reason(WorkerGroupError("failed", {0: RuntimeError("node lost")})) is None
    assert divergence_reason(ValueError("FloatingPoint but not an error line")) is None


def test_copy_checkpoint_is_atomic_and_exact(tmp_path):
    src = tmp_path / "trial" / "checkpoint_1"
    src.mkdir(parents=True)
    torch.save({"x": torch.arange(5)}, src / "model.ckpt")
    out = tmp_path / "deep" / "best.ckpt"
    assert copy_checkpoint(str(src), str(out)) == str(out)
    assert out.read_bytes() == (src / "model.ckpt").read_bytes()
    assert os.listdir(out.parent) == ["best.ckpt"]
    # a failed copy leaves the previous best.ckpt as it was and no temporary file
    before = out.read_bytes()
    with pytest.raises(FileNotFoundError):
        copy_checkpoint(str(tmp_path / "missing"), str(out))
    assert out.read_bytes() == before and os.listdir(out.parent) == ["best.ckpt"]


def test_train_flags_are_config_fields_and_bad_values_fail_in_one_line(capsys):
    helped = subprocess.run([sys.executable, "-m", "cluster.train", "--help"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    flat = " ".join(helped.split())
    for flag, key in (("--num-workers", "cluster.num_workers"), ("--cpus-per-worker", "cluster.cpus_per_worker"),
                      ("--storage-path", "cluster.storage_path"), ("--name", "cluster.name"),
                      ("--use-gpu", "cluster.use_gpu")):
        assert flag in flat and f"({key}; config default:" in flat
    assert main(["--config", str(ROOT / "configs" / "demo.yaml"), "--num-workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cluster.num_workers=0" in err
    # a flag and --set write the same field; the flag comes last and wins
    assert main(["--config", str(ROOT / "configs" / "demo.yaml"), "--set", "cluster.num_workers=2",
                 "--num-workers", "0"]) == 2
    assert "cluster.num_workers=0" in capsys.readouterr().err


def test_bench_flags_start_from_the_bench_settings_and_override_config_fields():
    parse = bench.build_parser().parse_args
    cfg = bench._config(parse([]))  # configs/demo.yaml with the bench's own settings
    assert (cfg.train.max_iterations, cfg.train.batch_size, cfg.cluster.cpus_per_worker) == (8, 4, 1)
    assert cfg.train.eval_interval == cfg.train.log_interval == 8 and cfg.cluster.num_workers == 1
    assert cfg.model.backbone == "resnet50"  # from demo.yaml
    cfg = bench._config(parse(["--set", "train.batch_size=6", "--iterations", "3", "--batch", "2", "--threads", "2"]))
    assert (cfg.train.max_iterations, cfg.train.batch_size, cfg.cluster.cpus_per_worker) == (3, 2, 2)
    assert cfg.train.eval_interval == 3
    assert bench._config(parse(["--set", "train.batch_size=6"])).train.batch_size == 6


def test_a_local_start_keeps_idle_workers_and_the_callers_system_config(monkeypatch):
    """The local cluster's system config turns Ray's idle-worker killing off; a caller's own _system_config
    entries are kept next to it. A joined cluster gets none (Ray refuses one when joining)."""
    import ray

    from cluster.ray_session import init_ray
    from deeplab.config import load_config

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    init_ray(load_config(None), local=True, _system_config={"metrics_report_interval_ms": 1000})
    assert calls[0]["_system_config"] == {"kill_idle_workers_interval_ms": 0, "metrics_report_interval_ms": 1000}
    with socket.socket() as listening:  # something answers there: init_ray checks that before ray.init
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        monkeypatch.setenv("RAY_ADDRESS", address)
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the user's choice: this process's Ray config stays as is
        init_ray(load_config(None))
    assert calls[1]["address"] == address and "_system_config" not in calls[1]


def _idle_workers_survive(ray, meeting: Path) -> None:
    """More task workers than CPUs, then idle for twice Ray's 1 s threshold: a raylet that ends idle workers
    ends one of them (the exit path that aborted segment's decode workers, issue 20); ours keeps them all."""
    import time

    import psutil

    @ray.remote(num_cpus=0.75)
    def meet(folder, count):  # returns once `count` tasks run at once: one process each
        (Path(folder) / str(os.getpid())).touch()
        deadline = time.monotonic() + 120
        while len(os.listdir(folder)) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return os.getpid()

    pids = set(ray.get([meet.remote(str(meeting), 4) for _ in range(4)]))  # 4 x 0.75 CPU: 3 CPUs
    assert len(pids) == 4
    time.sleep(2.5)
    alive = {p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}
    assert alive == pids


@pytest.mark.slow
def test_init_ray_starts_a_local_cluster_off_a_taken_dashboard_port(monkeypatch, tmp_path):
    """No cluster to join: a local one with the CPUs asked for, no GPUs, its dashboard moved off 8265 when that
    port is taken, its workers told the dashboard's address (Ray Train's placement-group cleaner uses it), and
    idle worker processes kept, not ended by the raylet."""
    import ray

    from cluster.ray_session import init_ray
    from deeplab.config import load_config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    holder = socket.socket()
    try:
        try:
            holder.bind(("127.0.0.1", 8265))
            holder.listen()
        except OSError:
            pass  # someone else holds 8265 already: the same situation
        init_ray(load_config(None), num_cpus=3)
        try:
            assert ray.cluster_resources().get("CPU") == 3 and "GPU" not in ray.cluster_resources()
            url = ray.get(ray.remote(lambda: os.environ.get("RAY_API_SERVER_ADDRESS")).remote())
            port = int(url.rsplit(":", 1)[1])
            assert port != 8265 and ray.get_runtime_context().gcs_address
            with socket.socket() as probe:  # the dashboard listens there
                assert probe.connect_ex(("127.0.0.1", port)) == 0
            _idle_workers_survive(ray, tmp_path)
        finally:
            ray.shutdown()
    finally:
        holder.close()


_WRITER = '''
import signal, sys, threading, time
from pathlib import Path
from cluster.worker import ExitGuard
from deeplab.fileio import atomic_path

signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # what Ray does in a worker process's main thread
guard, out = ExitGuard(grace_s=30), Path(sys.argv[1])

def checkpoints():  # as a training thread: checkpoint after checkpoint, each written in two halves
    for n in range(3):
        with guard.writing(), atomic_path(out / f"checkpoint{n}.bin") as tmp:
            tmp.write_bytes(b"a" * 1000)
            (out / f"writing{n}").touch()
            time.sleep(1.5)
            with open(tmp, "ab") as f:
                f.write(b"b" * 1000)

threading.Thread(target=checkpoints, daemon=True).start()
while True:
    time.sleep(0.1)
'''


def test_sigterm_lets_the_checkpoint_in_flight_finish_and_starts_no_other(tmp_path):
    """A worker process gets SIGTERM (its node shuts down) halfway through writing a checkpoint: the write
    completes, the next one never starts, no temporary file stays."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "writing0").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 1
    finally:
        proc.kill()
    assert (tmp_path / "checkpoint0.bin").read_bytes() == b"a" * 1000 + b"b" * 1000  # whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint0.bin", "writing0"]  # no second, no temp


def test_preflight_reads_remote_weights_as_the_workers_will(tmp_path, capsys):
    """A remote init_from / pretrained_backbone is opened on the driver through the same filesystem layer as
    the workers' (fsspec's in-memory store standing in for S3): a missing object fails here in one line."""
    import fsspec

    from cluster.train import preflight
    from deeplab import build_model, save_checkpoint
    from deeplab.config import load_config

    demo = str(ROOT / "configs" / "demo.yaml")
    store = fsspec.filesystem("memory")
    try:
        cfg = load_config(demo, ["train.init_from=memory://runs/stage1/best.ckpt"])
        assert main(["--config", demo, "--set", "train.init_from=memory://runs/stage1/best.ckpt"]) == 2
        assert capsys.readouterr().err.strip() == "error: memory://runs/stage1/best.ckpt: no such file"
        save_checkpoint(tmp_path / "best.ckpt", build_model(cfg.model), cfg)
        store.pipe("/runs/stage1/best.ckpt", (tmp_path / "best.ckpt").read_bytes())
        preflight(cfg)  # found and loadable
        cfg = load_config(demo, ["train.pretrained_backbone=memory://weights/resnet.pth"])
        with pytest.raises(Exception, match=r"^memory://weights/resnet.pth: no such file$"):
            preflight(cfg)
    finally:
        if store.exists("/runs"):
            store.rm("/runs", recursive=True)
