"""Search ASPP rates, Multi-Grid and crop size with Ray Tune; every trial is one distributed Ray Train run.

    python -m tuning.search_rates --config configs/search_demo.yaml
    python -m tuning.search_rates --config configs/search_paper.yaml --space paper \\
        --workers-per-trial 8 --max-concurrent 8

The space is expanded into configurations, impossible ones are pruned with a printed reason, the rest run
as trials (ASHA stops weak ones early on tune.metric, val mIoU by default). Results land in STORAGE/NAME/:
results.md, results.csv, results.png, best_config.yaml; the best trial's best checkpoint is copied to --output
and its path printed last. Run the same command again after Ctrl-C or a dead driver and the search continues
where it stopped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

from cluster.console import project_console, quiet_tune, ray_init_options
from cluster.ray_session import init_ray
from cluster.train import build_trainer, check_storage_visible, copy_checkpoint, divergence_reason, training_code_reason
from deeplab.cli import Stopped, UserError, command, on_interrupt
from deeplab.config import (
    Alias,
    ConfigError,
    ExperimentConfig,
    add_config_args,
    config_from_args,
    experiment_from_dict,
    save_config,
    to_plain,
)
from deeplab.fileio import is_uri, write_text_atomic

from . import results, spaces

STATE_FILE = "search.json"  # what the search was started with: config, kept points, pruned points
ALIASES = [
    Alias("--space", "tune.space", "search space: a preset (paper) or a YAML file", metavar="SPACE"),
    Alias("--num-samples", "tune.num_samples", "grid: repeats with new seeds; sample: points drawn", metavar="N"),
    Alias("--scheduler", "tune.scheduler", "asha stops weak trials early; fifo runs all to the end",
          metavar="{asha,fifo}"),
    Alias("--workers-per-trial", "tune.workers_per_trial", "Ray Train workers (GPUs) per trial", metavar="N"),
    Alias("--max-concurrent", "tune.max_concurrent", "trials running at once", metavar="N"),
    Alias("--max-iterations", "tune.max_iterations", "cap every trial's iterations, for a quick look", metavar="N"),
    Alias("--storage-path", "cluster.storage_path", "where the search folder goes; shared storage on a cluster",
          metavar="P"),
    Alias("--name", "tune.name", "search folder name under the storage path"),
    Alias("--output", "tune.output", "where to copy the best checkpoint", metavar="FILE"),
]


class SearchError(UserError):
    """A problem a user can fix; printed as one line, exit 2."""


class TrialFailed(RuntimeError):
    """The trial's loss went NaN/inf, or its training code failed (a bad data file, a shape error). Recorded in a
    marker; a retry would fail the same way, so Tune's retries (tune.max_failures, meant for lost nodes) stop at
    the marker instead of training again."""


def run_trial(config: dict, base: dict, runs_path: str) -> None:
    """One Tune trial: build the distributed trainer for this point and run it; Train reports go to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    for kind in results.FAILURE_MARKERS:
        marker = results.marker(runs_path, trial_id, kind)
        if marker.exists():  # a retry (lost node, resumed search) of a trial that would fail again: not re-run
            raise TrialFailed(f"{marker.read_text().strip()} (recorded by an earlier attempt; not re-run)")
    cfg = spaces.apply_point(experiment_from_dict(base), config["point"])
    trainer = build_trainer(cfg, name=trial_id, storage_path=runs_path, callbacks=[TuneReportCallback()],
                            score=(cfg.tune.metric, cfg.tune.metric_mode))
    try:
        trainer.fit()
    except Exception as e:  # TrainingFailedError, or the reason itself raised by cluster.train's callback
        diverged, code_error = divergence_reason(e), training_code_reason(e)
        if diverged:
            kind, message = "diverged", f"diverged: {diverged} (lr {cfg.train.lr:g})"
        elif code_error:
            kind, message = "code_error", f"training failed: {code_error}"
        else:
            raise  # a lost node or worker: Tune retries it up to tune.max_failures
        write_text_atomic(results.marker(runs_path, trial_id, kind), message + "\n")
        raise TrialFailed(message) from None


def _progress_callback(max_iterations: int, runs_path: str):
    """A Tune callback printing one line per finished, stopped or failed trial (ray imported only here); it
    leaves the ``complete`` marker (see results.marker) for a trial that ran to its end or was stopped."""
    from ray.tune import Callback

    class Progress(Callback):
        def _line(self, trial, what: str) -> None:
            r = trial.last_result or {}
            miou = r.get("val_miou")
            label = spaces.describe(trial.config.get("point", {}))
            print(f"[search] trial {trial.trial_id} {what}: {label}"
                  + (f", val mIoU {100 * miou:.2f} at iteration {r.get('iteration')}" if miou is not None else ""),
                  flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            done = (trial.last_result or {}).get("iteration", max_iterations)
            Path(runs_path).mkdir(parents=True, exist_ok=True)
            write_text_atomic(results.marker(runs_path, trial.trial_id, "complete"), "")
            self._line(trial, "finished" if done >= max_iterations else "stopped early")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, "failed")

    return Progress()


def _trial_dirname(trial) -> str:
    return trial.trial_id


def init_search_ray(cfg: ExperimentConfig, verbose: bool = False) -> None:
    """`cluster.ray_session.init_ray`, a local cluster counting logical CPUs so that one wave of trials fits (a 2-core
    laptop holds 1 trial x 2 workers plus the trial's driver)."""
    need = cfg.tune.max_concurrent * (cfg.tune.workers_per_trial * cfg.cluster.cpus_per_worker + 0.01)
    init_ray(cfg, num_cpus=max(os.cpu_count() or 1, math.ceil(need)), **ray_init_options(verbose))


def _build_tuner(cfg: ExperimentConfig, search_dir: Path, points: list, restore: bool, retry_errored: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    runs_path = str(search_dir / results.RUNS_DIR)
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=to_plain(cfg), runs_path=runs_path),
                                    {"cpu": 0.01})
    if restore:
        return tune.Tuner.restore(str(search_dir), trainable=trainable, resume_unfinished=True,
                                  resume_errored=retry_errored)
    t = cfg.tune
    evaluations = max(1, math.ceil(cfg.train.max_iterations / max(cfg.train.eval_interval, 1)))
    if t.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=evaluations, grace_period=t.grace_period,
                                  reduction_factor=t.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space={"point": tune.grid_search([to_plain(p) for p in points])},
        tune_config=tune.TuneConfig(metric=t.metric, mode=t.metric_mode, scheduler=scheduler, num_samples=1,
                                    max_concurrent_trials=t.max_concurrent, trial_dirname_creator=_trial_dirname,
                                    trial_name_creator=_trial_dirname),
        run_config=tune.RunConfig(name=search_dir.name, storage_path=str(search_dir.parent),
                                  failure_config=tune.FailureConfig(max_failures=t.max_failures),
                                  callbacks=[_progress_callback(cfg.train.max_iterations, runs_path)], verbose=0),
    )


def _checked(cfg: ExperimentConfig) -> ExperimentConfig:
    """The search's own limit on a loaded (hence checked) config: results are read back from a filesystem."""
    if is_uri(cfg.cluster.storage_path):
        raise ConfigError(f"cluster.storage_path={cfg.cluster.storage_path}: the search reads its results back from "
                          "a filesystem path; use a local or shared (NFS) directory")
    return cfg


def _trial_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """What every trial trains with: the search's workers per trial, iterations capped by tune.max_iterations."""
    values = to_plain(cfg)
    values["cluster"]["num_workers"] = cfg.tune.workers_per_trial
    if cfg.tune.max_iterations:
        values["train"]["max_iterations"] = min(cfg.train.max_iterations, cfg.tune.max_iterations)
    return experiment_from_dict(values)


def _space_name(cfg: ExperimentConfig) -> str:
    return "inline" if isinstance(cfg.tune.space, dict) else str(cfg.tune.space)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tuning.search_rates", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="--space ... --output are shorthands for the config fields shown; "
                                       "--set reaches any field.")
    add_config_args(p, aliases=ALIASES)
    p.add_argument("--resume", action="store_true",
                   help="continue the search in STORAGE/NAME (the default when it exists)")
    p.add_argument("--retry-errored", action="store_true",
                   help="on resume, run failed trials again (diverged ones stay failed)")
    p.add_argument("--dry-run", action="store_true", help="print the configurations and pruning reasons, run nothing")
    p.add_argument("--verbose", action="store_true",
                   help="Ray's and Tune's own lines and the trials' lines on the console too (the trials' lines are "
                        "always in STORAGE/NAME/logs/console.log)")
    return p.parse_args(argv)


@command
def main(argv=None) -> int:
    return _search(parse_args(argv))


def _plan(cfg: ExperimentConfig, search_dir: Path, args) -> tuple:
    """(config the search runs with, kept points, pruned (point, reason) pairs, whether it resumes): a new
    search expands and prunes its space; a resumed one reads what it was started with."""
    state_file = search_dir / STATE_FILE
    restore = state_file.is_file() and not args.dry_run
    if args.resume and not restore:
        raise SearchError(f"--resume: no search to resume in {search_dir} (no {STATE_FILE})")
    if restore:
        state = json.loads(state_file.read_text())
        full = experiment_from_dict(state["config"], where=str(state_file))
        kept, pruned = state["points"], [(p, r) for p, r in state["pruned"]]
        print(f"[search] resuming {search_dir}: {len(kept)} configurations, {len(pruned)} pruned "
              f"(space and config as first started; use --name for a new search)", flush=True)
    else:
        full = cfg
        points = spaces.expand(spaces.load_space(cfg.tune.space), cfg.tune.mode, cfg.tune.num_samples, cfg.train.seed)
        kept, pruned = spaces.prune(points, _trial_config(cfg), cfg.tune.min_valid_weight, cfg.tune.workers_per_trial)
        kept, pruned = [to_plain(p) for p in kept], [(to_plain(p), r) for p, r in pruned]
        print(f"[search] space {_space_name(cfg)} ({cfg.tune.mode}): {len(points)} configurations, "
              f"{len(pruned)} pruned, {len(kept)} to run", flush=True)
    for p, reason in pruned:
        print(f"[search] pruned {spaces.describe(p)}: {reason}", flush=True)
    return full, kept, pruned, restore


def _kept_note(search_dir: Path) -> str:
    return (f"finished trials and every trial's checkpoints kept in {search_dir}; the same command (or --resume) "
            "continues the search")


def _run_trials(base: ExperimentConfig, search_dir: Path, kept: list, restore: bool, retry_errored: bool,
                verbose: bool = False):
    """Tune's ResultGrid for the kept points (restoring Tune's own state when the search resumes). Ctrl-C is
    Tune's: it stops the trials, saves its state and returns; SIGTERM stops Ray at once (Tune saves its state
    as it goes)."""
    if base.train.eval_interval >= base.train.max_iterations and base.tune.scheduler == "asha":
        print(f"[search] note: train.eval_interval {base.train.eval_interval} >= {base.train.max_iterations} "
              "iterations: one evaluation per trial, so ASHA cannot stop any trial early", flush=True)
    on_interrupt(_kept_note(search_dir))
    try:
        return _fit_trials(base, search_dir, kept, restore, retry_errored, verbose)
    except KeyboardInterrupt:
        import ray

        ray.shutdown()  # every trial's driver and workers end with this job
        raise


def _fit_trials(base: ExperimentConfig, search_dir: Path, kept: list, restore: bool, retry_errored: bool,
                verbose: bool):
    init_search_ray(base, verbose)
    check_storage_visible(base, str(search_dir))  # every node's trials write there: refuse a node-local folder now
    from ray import tune

    if restore and not tune.Tuner.can_restore(str(search_dir)):
        restore = False  # the driver died before Tune saved its first state: start the trials afresh
    t = base.tune
    print(f"[search] {len(kept)} trials x {t.workers_per_trial} workers, {t.max_concurrent} at a time, "
          f"scheduler {t.scheduler}, up to {base.train.max_iterations} iterations each; folder {search_dir}",
          flush=True)
    if restore and retry_errored:
        for marker in (search_dir / results.RUNS_DIR).glob("*.*"):
            if results.FAILURE_MARKERS.get(marker.suffix[1:]):
                marker.unlink()  # run it again
    quiet_tune(verbose)
    tuner = _build_tuner(base, search_dir, kept, restore, retry_errored)
    with project_console(str(search_dir / "logs"), verbose, processes=()):  # trials' lines: in logs/console.log
        return tuner.fit()


def _write_best(full: ExperimentConfig, rows: list, search_dir: Path, output: Path) -> None:
    """best_config.yaml (the best point at full length, not the --max-iterations cap) and the best trial's
    checkpoint copied to ``output``, whose path is printed last."""
    t = full.tune
    best = results.best(rows, t.metric_mode)
    if best is None:
        raise SearchError(f"no trial produced a checkpoint; see {search_dir / 'results.md'}")
    save_config(spaces.apply_point(full, best["point"]), search_dir / "best_config.yaml")
    print(f"[search] best: {results.describe_best(best, t.metric, t.metric_mode)}; "
          f"config to train at full length: {search_dir / 'best_config.yaml'}")
    print(f"[search] results: {search_dir / 'results.md'}, {search_dir / 'results.csv'}, {search_dir / 'results.png'}")
    copy_checkpoint(best["checkpoint"], str(output))
    print(output, flush=True)


def _search(args) -> int:
    started = time.monotonic()
    cfg = _checked(config_from_args(args))
    search_dir = Path(cfg.cluster.storage_path).expanduser().resolve() / cfg.tune.name
    full, kept, pruned, restore = _plan(cfg, search_dir, args)
    if args.dry_run:
        for p in kept:
            print(f"[search] would run {spaces.describe(p)}")
        return 0
    if not kept:
        raise SearchError("every configuration was pruned; widen the space or lower tune.min_valid_weight")
    if not restore:
        (search_dir / results.RUNS_DIR).mkdir(parents=True, exist_ok=True)
        write_text_atomic(search_dir / STATE_FILE, json.dumps(
            {"config": to_plain(full), "points": kept, "pruned": [list(x) for x in pruned]}, indent=1))
    base = _trial_config(full)
    rows = results.collect(_run_trials(base, search_dir, kept, restore, args.retry_errored, args.verbose), kept,
                           pruned, base)
    results.write(rows, search_dir, f"search {cfg.tune.name}: space {_space_name(full)}", base.tune.metric,
                  base.tune.metric_mode)
    saved = results.asha_savings(rows)
    if saved:
        print(f"[search] {saved}")
    print(f"[search] wall time {results.fmt_time(time.monotonic() - started)} for this run of the search", flush=True)
    unfinished = [r for r in rows if r["status"] == "unfinished"]
    if unfinished:  # Tune answered Ctrl-C: it stopped the trials and returned
        on_interrupt(f"{len(unfinished)} of {len(kept)} trials unfinished; {_kept_note(search_dir)}")
        raise Stopped(signal.SIGINT)
    _write_best(full, rows, search_dir, Path(cfg.tune.output).expanduser().resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
