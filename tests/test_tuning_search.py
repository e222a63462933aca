"""One real search on a local Ray cluster: ASHA over a few tiny configurations, one pruned, one planted to
diverge. Every trial is a 2-worker Ray Train run on synthetic data. The checks read Tune's own result files
and the checkpoint itself, not only the table the search wrote.

The search ranks trials here by the learning rate they report rather than by val mIoU (tune.metric): eight
iterations of a tiny model give mIoU values that are noise, and the test must know that some trial is stopped.
ASHA's decisions are replayed by hand from what each trial reported, and the best trial and its checkpoint must
be the ones with the best learning rate, as tune.metric says.
"""
import contextlib
import csv
import io
import json
import re
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

MAX_ITERATIONS = 8  # what --max-iterations caps every trial to; the config itself says 100
EVAL_INTERVAL = 4  # 2 evaluations per trial: ASHA rungs at 1 and 2

POINTS = [  # run in this order, one at a time
    {"multi_grid": [1, 2, 4], "aspp_rates": [1, 2, 3], "crop_size": 97, "lr": 0.2},
    {"multi_grid": [2, 2, 2], "aspp_rates": [1, 2, 3], "crop_size": 65, "lr": 0.1},  # below the first at rung 1
    {"multi_grid": [1, 2, 4], "aspp_rates": [1, 2, 3], "crop_size": 65, "lr": 1.0e+30},  # diverges at once
    {"multi_grid": [1, 2, 4], "aspp_rates": [2, 4, 6], "crop_size": 65},  # rate 6 on a 5x5 map: pruned
]


def experiment(storage: Path, output: Path, points: list, **tune) -> dict:
    return {
        "model": {"backbone": "resnet_tiny", "num_classes": 4, "aspp_channels": 16, "output_stride": 16},
        "data": {"dataset": "synthetic", "synthetic_size": 97, "synthetic_train": 32, "synthetic_val": 4,
                 "synthetic_classes": 4, "loader_workers": 0, "val_size": 97, "crop_size": 97},
        "train": {"batch_size": 4, "max_iterations": 100, "eval_interval": EVAL_INTERVAL, "log_interval": 4,
                  "lr": 0.2, "amp": "off", "channels_last": False},
        "cluster": {"num_workers": 2, "cpus_per_worker": 1, "storage_path": str(storage), "max_failures": 0,
                    "collective_timeout_s": 60},
        "tune": {"name": "search", "space": {"points": points}, "scheduler": "asha", "grace_period": 1,
                 "metric": "lr", "reduction_factor": 2, "workers_per_trial": 2, "max_concurrent": 1, "max_failures": 1,
                 "output": str(output), **tune},
    }


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    import ray

    from deeplab.config import load_config
    from tuning import search_rates

    folder = tmp_path_factory.mktemp("tuning_search")
    config = folder / "search.yaml"
    config.write_text(yaml.safe_dump(experiment(folder / "runs", folder / "out" / "best.ckpt", POINTS)))
    search_rates.init_search_ray(load_config(str(config)))  # the module's one Ray cluster
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            rc = search_rates.main(["--config", str(config), "--max-iterations", str(MAX_ITERATIONS)])
        text = out.getvalue()
        print(text)
        search_dir = folder / "runs" / "search"
        with open(search_dir / "results.csv") as f:
            rows = list(csv.DictReader(f))
        yield {"rc": rc, "stdout": text, "dir": search_dir, "rows": rows, "output": folder / "out" / "best.ckpt",
               "config": config}
    finally:
        ray.shutdown()


def _reported(search_dir: Path, trial_id: str) -> list:
    """What the trial reported to Tune, read from Tune's own result.json (one JSON object per report)."""
    path = search_dir / trial_id / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _label_row(rows, **values):
    want = {k: " ".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in values.items()}
    found = [r for r in rows if all(r[k] == v for k, v in want.items())]
    assert len(found) == 1, (values, rows)
    return found[0]


def test_every_trial_ran_or_was_pruned_with_a_reason(search):
    assert search["rc"] == 0, search["stdout"][-3000:]
    rows = search["rows"]
    assert len(rows) == len(POINTS)
    pruned = [r for r in rows if r["status"].startswith("pruned")]
    assert len(pruned) == 1 and pruned[0]["aspp_rates"] == "2 4 6" and pruned[0]["crop_size"] == "65"
    assert "5x5 feature map" in pruned[0]["status"] and "Fig. 4" in pruned[0]["status"]
    assert "pruned MG(1,2,4) ASPP(2,4,6)+IP crop 65" in search["stdout"]
    ran = [r for r in rows if not r["status"].startswith("pruned")]
    assert len(ran) == 3 and len({r["trial_id"] for r in ran}) == 3
    for r in ran:
        reports = _reported(search["dir"], r["trial_id"])
        assert r["status"] in ("finished", "stopped early") or r["status"].startswith("failed"), r
        if not r["status"].startswith("failed"):
            # the table's numbers are the trial's last report to Tune
            assert reports and int(r["iterations"]) == reports[-1]["iteration"]
            assert float(r["miou"]) == pytest.approx(reports[-1]["val_miou"])


def _asha_decisions(trials: list, metric: str, rungs=(2, 1), reduction_factor=2) -> dict:
    """Ray's asynchronous successive halving replayed by hand: trials in the order they ran, each report at a
    rung milestone compared with the (1 - 1/rf) quantile of the earlier trials' values at that rung.
    Returns trial id -> the evaluation at which it is stopped (None: ran to the end)."""
    import numpy as np

    recorded = {m: [] for m in rungs}
    stopped = {}
    for trial_id, reports in trials:
        stopped[trial_id] = None
        for rep in reports:
            t, value = rep["training_iteration"], rep[metric]
            milestone = next((m for m in rungs if t >= m and trial_id not in [i for i, _ in recorded[m]]), None)
            if milestone is None:
                continue
            values = [v for _, v in recorded[milestone]]
            cutoff = np.nanpercentile(values, (1 - 1 / reduction_factor) * 100) if values else None
            recorded[milestone].append((trial_id, value))
            if cutoff is not None and value < cutoff:
                stopped[trial_id] = t
                break
    return stopped


def test_asha_stopped_some_trials_early_and_they_ran_fewer_iterations(search):
    ran = sorted((r for r in search["rows"] if r["status"] in ("finished", "stopped early")),
                 key=lambda r: r["trial_id"])
    reports = {r["trial_id"]: _reported(search["dir"], r["trial_id"]) for r in ran}
    expected = _asha_decisions([(r["trial_id"], reports[r["trial_id"]]) for r in ran], "lr")
    assert [r["status"] for r in ran] == ["finished", "stopped early"]
    for r in ran:
        assert int(r["max_iterations"]) == MAX_ITERATIONS
        evaluations = [rep["iteration"] for rep in reports[r["trial_id"]]]
        assert evaluations == list(range(EVAL_INTERVAL, int(r["iterations"]) + 1, EVAL_INTERVAL))
        if r["status"] == "stopped early":
            assert r["stopped_early"] == "True" and int(r["iterations"]) < MAX_ITERATIONS
            assert expected[r["trial_id"]] == len(evaluations), (r, expected)
        else:
            assert int(r["iterations"]) == MAX_ITERATIONS and expected[r["trial_id"]] is None, (r, expected)
    done = sum(int(r["iterations"]) for r in ran)
    assert f"{len(ran)} trials trained {done} of {len(ran) * MAX_ITERATIONS} trial-iterations" in search["stdout"]


def test_best_ckpt_is_the_best_trial_and_carries_its_configuration(search):
    from deeplab import load_checkpoint
    from deeplab.config import load_config

    ran = [r for r in search["rows"] if r["status"] in ("finished", "stopped early")]
    best = max(ran, key=lambda r: float(r["score"]))  # tune.metric lr, tune.metric_mode max
    assert len({float(r["score"]) for r in ran}) == len(ran)  # no tie: the pick is decided
    for r in ran:  # the score is the metric's value in the trial's last report to Tune
        assert float(r["score"]) == pytest.approx(_reported(search["dir"], r["trial_id"])[-1]["lr"])
    md = (search["dir"] / "results.md").read_text()
    assert f"(trial {best['trial_id']})" in md and f"**{float(best['score']):.4g}**" in md
    output = search["output"]
    assert search["stdout"].strip().splitlines()[-1] == str(output)  # its path is printed last
    ckpt = load_checkpoint(output)
    assert list(ckpt.config.aspp_rates) == [int(x) for x in best["aspp_rates"].split()]
    assert list(ckpt.config.multi_grid) == [int(x) for x in best["multi_grid"].split()]
    assert ckpt.experiment.data.crop_size == int(best["crop_size"])
    # the trial's best checkpoint: the highest lr it reported to Tune (the poly schedule: its first report)
    reported = [rep["lr"] for rep in _reported(search["dir"], best["trial_id"])]
    assert ckpt.state["metrics"]["lr"] == pytest.approx(max(reported))
    assert float(best["best_miou"]) == pytest.approx(ckpt.state["metrics"]["val_miou"])
    # the YAML to train at full length: the best point, uncapped iterations
    best_cfg = load_config(str(search["dir"] / "best_config.yaml"))
    assert best_cfg.train.max_iterations == 100
    assert best_cfg.model.aspp_rates == ckpt.config.aspp_rates and best_cfg.data.crop_size == int(best["crop_size"])
    png = (search["dir"] / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert [p.name for p in output.parent.iterdir()] == ["best.ckpt"]  # nothing half-written left behind


def test_diverged_trial_is_recorded_failed_and_the_search_went_on(search):
    nan = _label_row(search["rows"], lr=1.0e+30)
    assert re.match(r"failed: diverged: loss is (nan|inf) at iteration \d+", nan["status"]), nan
    marker = search["dir"] / "runs" / f"{nan['trial_id']}.diverged"
    assert marker.exists() and "diverged: loss is" in marker.read_text()
    assert f"trial {nan['trial_id']} failed" in search["stdout"]
    assert search["rc"] == 0 and search["output"].exists()
