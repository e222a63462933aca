"""A trial whose training code fails (a truncated image found mid-run) is not trained again by Tune's retries
(tune.max_failures is for lost nodes): the retries stop at the trial's marker, the table says why it failed,
and after the user fixes the file, `--resume --retry-errored` runs it again to the end. Real Ray, in-process."""
import csv
import shutil

import pytest
import yaml

pytestmark = pytest.mark.slow

MAX_FAILURES = 2


def _config(root, storage, output) -> dict:
    return {
        "model": {"backbone": "resnet_tiny", "num_classes": 4, "aspp_channels": 16, "output_stride": 16},
        "data": {"dataset": "folder", "root": str(root), "loader_workers": 0, "crop_size": 65, "val_size": 97},
        "train": {"batch_size": 2, "max_iterations": 8, "eval_interval": 4, "log_interval": 4, "lr": 0.1,
                  "amp": "off", "channels_last": False},
        "cluster": {"num_workers": 1, "cpus_per_worker": 1, "storage_path": str(storage), "max_failures": 0,
                    "collective_timeout_s": 60},
        "tune": {"name": "failures", "scheduler": "fifo", "workers_per_trial": 1, "max_concurrent": 1,
                 "max_failures": MAX_FAILURES, "output": str(output),
                 "space": {"multi_grid": [[1, 2, 4]], "aspp_rates": [[1, 2, 3]], "crop_size": [65]}},
    }


def _rows(search_dir):
    with open(search_dir / "results.csv") as f:
        return list(csv.DictReader(f))


def test_a_failing_trial_is_not_trained_again_until_the_user_retries_it(tmp_path, capsys):
    import ray

    from data_trees import make_folder
    from tuning import search_rates

    root = tmp_path / "ds"
    make_folder(root, names=("bg", "a", "b", "c"), stems=tuple("abcdefgh"), size=(70, 70),
                splits={"train": list("abcdefgh"), "val": list("ab")})
    bad = root / "images" / "e.jpg"
    whole = tmp_path / "e.jpg"
    shutil.copy(bad, whole)
    bad.write_bytes(bad.read_bytes()[:300])  # the data check finds the pair; decoding it mid-run fails
    config = tmp_path / "search.yaml"
    output = tmp_path / "best.ckpt"
    config.write_text(yaml.safe_dump(_config(root, tmp_path / "runs", output)))
    search_dir = tmp_path / "runs" / "failures"
    try:
        assert search_rates.main(["--config", str(config)]) == 2  # no trial produced a checkpoint
        [row] = _rows(search_dir)
        assert row["status"].startswith(f"failed: training failed: worker 0: {bad}: unreadable or truncated image")
        errors = (search_dir / row["trial_id"] / "error.txt").read_text()
        attempts = errors.split("Failure # ")[1:]
        assert len(attempts) == 1 + MAX_FAILURES  # Tune did retry...
        assert "unreadable or truncated image" in attempts[0] and "not re-run" not in attempts[0]
        assert all("not re-run" in a for a in attempts[1:])  # ...but each retry stopped at the marker, untrained
        assert not output.exists()
        assert "no trial produced a checkpoint" in capsys.readouterr().err

        shutil.copy(whole, bad)  # the user fixes the file and retries the failed trial
        assert search_rates.main(["--config", str(config), "--resume", "--retry-errored"]) == 0
        [row] = _rows(search_dir)
        assert row["status"] == "finished" and row["iterations"] == "8"
        assert output.is_file()
    finally:
        ray.shutdown()
