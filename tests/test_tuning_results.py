"""The results table, plot and best.ckpt hand-off, and the command line's edges; no Ray needed."""
import csv
import io
import subprocess
import sys
from pathlib import Path

import pytest

from deeplab.config import ExperimentConfig, ModelConfig
from tuning import results, search_rates

ROOT = Path(__file__).resolve().parents[1]


def _row(trial, point, miou, iterations, status, checkpoint=None, max_iterations=40):
    base = ExperimentConfig(model=ModelConfig(backbone="resnet_tiny"))
    base.train.max_iterations = max_iterations
    values = results._values(base, point)
    return {"trial_id": trial, "label": results.spaces.describe(point), "point": point, **values, "miou": miou,
            "best_miou": miou, "score": miou, "iterations": iterations, "stopped_early": status == "stopped early",
            "wall_s": 75.0, "status": status, "checkpoint": checkpoint}


@pytest.fixture
def rows(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "model.ckpt").write_bytes(b"weights")
    return [
        _row("a", {"multi_grid": [1, 2, 4], "aspp_rates": [6, 12, 18], "crop_size": 513}, 0.70, 40, "finished",
             str(ck)),
        _row("b", {"multi_grid": [1, 1, 1], "aspp_rates": [6, 12, 18], "crop_size": 513}, 0.60, 10, "stopped early"),
        _row("c", {"multi_grid": [2, 2, 2], "aspp_rates": [6, 12, 18], "crop_size": 513}, 0.90, 20,
             "failed: diverged: non-finite loss"),
        _row("", {"multi_grid": [1, 2, 4], "aspp_rates": [6, 12, 18, 24], "crop_size": 321}, None, 0,
             "pruned: ASPP rate 24 keeps 11% ..."),
    ]


def test_best_ignores_failed_trials_and_needs_a_checkpoint(rows):
    assert results.best(rows)["trial_id"] == "a"  # c scored higher before diverging, but it failed
    rows[0]["checkpoint"] = None
    assert results.best(rows) is None


def test_markdown_table_in_the_papers_format(rows):
    text = results.markdown(rows, "search x")
    lines = text.splitlines()
    header = next(ln for ln in lines if ln.startswith("| Multi-Grid"))
    assert header == ("| Multi-Grid | ASPP | Image Pooling | Crop | OS | mIoU | Iterations | Stopped early | "
                      "Wall time | Status |")
    table = [ln for ln in lines if ln.startswith("| (")]
    assert len(table) == 4
    assert table[0] == "| (1, 2, 4) | (6, 12, 18) | yes | 513 | 16 | **70.00** | 40/40 |  | 1m15s | finished |"
    assert "| 60.00 | 10/40 | yes |" in table[1]
    assert "failed: diverged" in table[2] and "pruned: ASPP rate 24" in table[3]
    # savings over the trials that trained to a result: a (40 of 40) and b (10 of 40)
    assert "2 trials trained 50 of 80 trial-iterations (1 stopped early): early stopping saved 30 (38%)" in text


def test_csv_has_one_row_per_configuration(rows):
    got = list(csv.DictReader(io.StringIO(results.to_csv(rows))))
    assert [r["trial_id"] for r in got] == ["a", "b", "c", ""]
    assert got[0]["multi_grid"] == "1 2 4" and got[0]["crop_size"] == "513" and float(got[0]["miou"]) == 0.70
    assert got[1]["stopped_early"] == "True" and got[3]["status"].startswith("pruned")


def test_write_makes_table_csv_and_png_atomically(rows, tmp_path, capsys):
    results.write(rows, tmp_path, "search x")
    assert "**70.00**" in capsys.readouterr().out
    assert (tmp_path / "results.md").read_text().startswith("# search x")
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "results.csv", "results.md", "results.png"]


def test_search_metric_ranks_trials_in_its_direction(rows, tmp_path):
    """tune.metric = loss, lower is better: the best trial, the bold cell and the Best line follow the loss,
    not val mIoU; the table gains the metric's column."""
    (tmp_path / "ck2").mkdir()
    rows[1]["checkpoint"] = str(tmp_path / "ck2")
    rows[0]["score"], rows[1]["score"], rows[2]["score"] = 0.9, 0.4, 0.1  # c failed: never the best
    assert results.best(rows, "max")["trial_id"] == "a"
    assert results.best(rows, "min")["trial_id"] == "b"
    text = results.markdown(rows, "", metric="loss", mode="min")
    header = next(ln for ln in text.splitlines() if ln.startswith("| Multi-Grid"))
    assert "| mIoU | loss | Iterations |" in header
    table = [ln for ln in text.splitlines() if ln.startswith("| (")]
    assert "| 60.00 | **0.4** | 10/40 |" in table[1] and "**" not in table[0]
    assert "Best: MG(1,1,1) ASPP(6,12,18)+IP crop 513, val mIoU 60.00, loss 0.4 (the search's metric, min)" in text
    rows[0]["point"]["lr"] = 0.1  # the search varies lr and ranks by it: two columns, told apart
    header = next(ln for ln in results.markdown(rows, "", "lr").splitlines() if ln.startswith("| Multi-Grid"))
    assert "| OS | lr | mIoU | final lr | Iterations |" in header


def test_unknown_metric_or_mode_is_refused_in_one_line(tmp_path, capsys):
    assert "tune.metric='val_mIoU'" in _fail(["--set", "tune.metric=val_mIoU", "--dry-run"], capsys)
    assert "tune.metric_mode='up'" in _fail(["--set", "tune.metric_mode=up", "--dry-run"], capsys)


def test_help_is_fast_and_does_not_import_ray():
    code = "import sys, tuning.search_rates as s; print('ray' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
    helped = subprocess.run([sys.executable, "-m", "tuning.search_rates", "--help"], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    for flag in ("--config", "--space", "--num-samples", "--scheduler", "--workers-per-trial", "--max-concurrent",
                 "--max-iterations", "--storage-path", "--resume", "--output", "--set"):
        assert flag in helped.stdout


def _fail(argv, capsys):
    assert search_rates.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert "no search to resume" in _fail(["--resume", "--storage-path", str(tmp_path)], capsys)
    assert "no/such.yaml" in _fail(["--space", "no/such.yaml", "--storage-path", str(tmp_path)], capsys)
    assert "tune.workers_per_trial=0" in _fail(["--workers-per-trial", "0", "--storage-path", str(tmp_path)], capsys)
    bad = tmp_path / "bad.yaml"
    bad.write_text("crop_size: [321]\nfoo: [1]\n")
    assert str(bad) in _fail(["--space", str(bad), "--storage-path", str(tmp_path)], capsys)
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text("crop_size: [33]\naspp_rates: [[6, 12, 18]]\n")
    assert "every configuration was pruned" in _fail(["--space", str(tiny), "--storage-path", str(tmp_path)], capsys)
    assert not list(tmp_path.glob("search*"))  # nothing written for a search that never started


def test_dry_run_lists_configurations_and_pruning_reasons(tmp_path, capsys):
    assert search_rates.main(["--config", str(ROOT / "configs" / "search_demo.yaml"), "--dry-run",
                              "--storage-path", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "8 configurations, 2 pruned, 6 to run" in out
    assert out.count("would run") == 6 and out.count("(paper Fig. 4)") == 2
    assert not list(tmp_path.iterdir())
