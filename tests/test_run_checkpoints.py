"""What a rerun resumes from and what the summary counts, without a cluster: the newest complete checkpoint in a
run folder (cluster.checkpoints), the restarts a stop must not lose (deeplab.train_loop with a recorded
progress), and redone iterations never counted as 0 when unknown (cluster.train._summary). The whole path, with
real stops of `python -m cluster.train`, is tests/test_train_interrupt.py."""
import os

import pyarrow.fs
import pytest
from ray.train import Result

from cluster.checkpoints import (
    checkpoint_iteration,
    newest_complete,
    read_progress,
    remove_incomplete,
    upload_atomically,
    write_progress,
)
from cluster.storage import run_folder
from cluster.train import _print_summary, _summary
from deeplab.checkpoint import CHECKPOINT_FILE, load_checkpoint
from deeplab.config import load_config
from deeplab.train_loop import Worker, train

LOCAL = pyarrow.fs.LocalFileSystem()


def tiny_config(max_iterations=4):
    return load_config(None, [
        "model.backbone=resnet_tiny", "model.aspp_channels=16", "model.num_classes=4",
        "data.synthetic_classes=4", "data.synthetic_size=80", "data.crop_size=65",
        "data.synthetic_train=8", "data.synthetic_val=2", "data.loader_workers=0",
        "train.batch_size=2", f"train.max_iterations={max_iterations}", "train.eval_interval=2",
        "train.log_interval=100", "train.lr=0.01", "train.amp=off", "cluster.num_workers=1",
    ]).check()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """model.ckpt of iterations 2 and 4 of one tiny run, as the loop reports them."""
    folder = tmp_path_factory.mktemp("saved")

    def report(metrics, checkpoint_dir):
        os.makedirs(folder / str(metrics["iteration"]))
        upload_atomically(checkpoint_dir, str(folder / str(metrics["iteration"])))

    train(tiny_config(), Worker(report=report))
    return {it: str(folder / str(it)) for it in (2, 4)}


def test_the_newest_complete_checkpoint_wins_whatever_ray_recorded(saved, tmp_path):
    run = tmp_path / "run"
    for name, source in (("checkpoint_2026-01-01_00-00-01.000000", saved[2]),
                         ("checkpoint_2026-01-01_00-00-02.000000", saved[4])):
        upload_atomically(source, str(run / name))
    half = run / "checkpoint_2026-01-01_00-00-03.000000"  # newest by name, its file cut short (Ray's in-place copy)
    half.mkdir()
    data = open(os.path.join(saved[4], CHECKPOINT_FILE), "rb").read()
    (half / CHECKPOINT_FILE).write_bytes(data[: len(data) // 2])
    assert checkpoint_iteration(LOCAL, str(half)) is None
    assert newest_complete(LOCAL, str(run)) == (f"{run}/checkpoint_2026-01-01_00-00-02.000000", 4)
    # Ray recorded the older one: the newer complete one is still found; folders older than Ray's are not opened
    assert newest_complete(LOCAL, str(run), "checkpoint_2026-01-01_00-00-01.000000")[1] == 4
    assert newest_complete(LOCAL, str(run), "checkpoint_2026-01-01_00-00-02.000000")[1] == 4
    assert newest_complete(LOCAL, str(tmp_path / "none")) is None

    cut = run / "checkpoint_2026-01-01_00-00-04.000000"  # an atomic upload cut short leaves a temporary name only
    cut.mkdir()
    (cut / ".model.tmp123.ckpt").write_bytes(data[:100])
    remove_incomplete(LOCAL, str(run))
    assert not cut.exists() and half.exists()  # a folder with a model.ckpt is never removed
    assert load_checkpoint(run / "checkpoint_2026-01-01_00-00-02.000000" / CHECKPOINT_FILE).state["iteration"] == 4


def test_progress_is_written_whole_and_read_back(tmp_path):
    assert read_progress(str(tmp_path)) is None
    write_progress(str(tmp_path), {"reached_iteration": 7, "resumes": [], "world_size": 2})
    assert read_progress(str(tmp_path)) == {"reached_iteration": 7, "resumes": [], "world_size": 2}
    assert os.listdir(tmp_path) == ["progress.json"]


def test_a_restart_lost_with_its_checkpoint_is_still_counted(saved):
    """The previous attempt had resumed from iteration 2 (a restart recorded only in its progress: the checkpoint
    that would hold it was never completed) and reached 4; this one resumes from 2 again."""
    earlier = {"workers": [1, 1], "checkpoint_iteration": 2, "reached_iteration": 3, "time": 0.0}
    progress = {"reached_iteration": 4, "resumes": [earlier], "world_size": 1}
    reports = []
    train(tiny_config(), Worker(report=lambda m, c: reports.append(m), recorded_progress=lambda: progress,
                                latest_checkpoint=lambda: os.path.join(saved[2], CHECKPOINT_FILE)))
    assert [(r["checkpoint_iteration"], r["reached_iteration"]) for r in reports[-1]["resumes"]] == [(2, 3), (2, 4)]


def test_a_run_stopped_before_its_first_checkpoint_counts_its_restart_from_the_beginning():
    reports = []
    train(tiny_config(2), Worker(report=lambda m, c: reports.append(m),
                                 recorded_progress=lambda: {"reached_iteration": 1, "world_size": 2}))
    (resume,) = reports[-1]["resumes"]
    assert resume["workers"] == [2, 1] and (resume["checkpoint_iteration"], resume["reached_iteration"]) == (0, 1)


def test_redone_iterations_are_unknown_not_zero_when_a_restart_did_not_record_them(tmp_path, capsys):
    resumes = [{"workers": [2, 2], "checkpoint_iteration": 40, "reached_iteration": 60, "time": 0.0},
               {"workers": [2, 2], "checkpoint_iteration": 80, "reached_iteration": None, "time": 0.0}]
    result = Result(metrics={"iteration": 100, "val_miou": 0.5, "resumes": resumes}, checkpoint=None, error=None,
                    path=str(tmp_path))
    summary = _summary(result, run_folder(str(tmp_path), "run"), None)
    assert summary["redone_iterations"] is None
    _print_summary(tiny_config(), summary)
    out = capsys.readouterr().out
    assert "restarted 2 time(s) from a checkpoint, an unknown number of iteration(s) done again" in out
    resumes[1]["reached_iteration"] = 85
    assert _summary(result, run_folder(str(tmp_path), "run"), None)["redone_iterations"] == 25


def test_a_finished_run_started_again_reports_its_result_once_more(saved):
    """A stop after the last report (a search stopped by SIGTERM before Tune saved that the trial ended): the run
    resumed from its last checkpoint trains nothing, but whoever waits for a result (Tune) gets it again."""
    reports = []
    last = train(tiny_config(4), Worker(report=lambda m, c: reports.append((m, c)),
                                        latest_checkpoint=lambda: os.path.join(saved[4], CHECKPOINT_FILE)))
    expected = load_checkpoint(os.path.join(saved[4], CHECKPOINT_FILE)).state["metrics"]
    assert reports == [(expected, None)] and last == expected and expected["iteration"] == 4
