"""Search ASPP rates, Multi-Grid and crop size with Ray Tune; every trial is one distributed Ray Train run.

    python -m tuning.search_rates --config configs/search_demo.yaml
    python -m tuning.search_rates --config configs/search_paper.yaml --space paper --workers-per-trial 8 --max-concurrent 8

The space is expanded into configurations, impossible ones are pruned with a printed reason, the rest run
as trials (ASHA stops weak ones early on val mIoU). Results land in STORAGE/NAME/: results.md, results.csv,
results.png, best_config.yaml; the best trial's best checkpoint is copied to --output and its path printed
last. Run the same command again after Ctrl-C or a dead driver and the search continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from deeplab.config import ConfigError, ExperimentConfig, add_config_args, experiment_from_dict, load_config, \
    save_config, to_plain

from . import spaces

STATE_FILE = "search.json"  # what the search was started with: config, kept points, pruned points
RUNS_DIR = "runs"  # Ray Train runs, one per trial, named after the trial id
COMPLETE_SUFFIX = ".complete"  # runs/<trial_id>.complete: the trial ran to its end or was stopped by the scheduler


class SearchError(Exception):
    """A problem a user can fix; main() prints it as one line and exits 2."""


class TrialDiverged(RuntimeError):
    """The trial's loss went NaN/inf. Recorded as failed; retrying would diverge again, so it is not re-run."""


def _divergence(error: BaseException):
    """The worker's FloatingPointError message if a Ray Train run failed because the loss went NaN/inf, else None.
    Ray wraps them (ControllerError.controller_failure, WorkerGroupError.worker_failures, RayTaskError.cause,
    chained causes); walk them."""
    seen, stack = set(), [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, FloatingPointError):
            return (str(e).strip().splitlines() or ["non-finite loss"])[-1]
        line = next((ln for ln in str(e).splitlines() if "FloatingPointError" in ln), None)
        if line:
            return line.split("FloatingPointError:")[-1].strip() or "non-finite loss"
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None), getattr(e, "controller_failure", None)]
        stack += list((getattr(e, "worker_failures", None) or {}).values())
    return None


def run_trial(config: dict, base: dict, runs_path: str) -> None:
    """One Tune trial: build the distributed trainer for this point and run it; Train reports go to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cluster.train import build_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    marker = Path(runs_path) / f"{trial_id}.diverged"
    if marker.exists():  # a retry (lost node, resumed search) of a trial that diverged: do not spend it again
        raise TrialDiverged(marker.read_text().strip())
    cfg = spaces.apply_point(experiment_from_dict(base), config["point"])
    trainer = build_trainer(cfg, name=trial_id, storage_path=runs_path, callbacks=[TuneReportCallback()])
    try:
        trainer.fit()
    except Exception as e:  # TrainingFailedError, or the divergence itself raised by cluster.train's callback
        reason = _divergence(e)
        if reason is None:
            raise
        message = f"diverged: {reason} (lr {cfg.train.lr:g})"
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(message + "\n")
        os.replace(tmp, marker)
        raise TrialDiverged(message) from None


def _progress_callback(max_iterations: int, runs_path: str):
    """A Tune callback printing one line per finished, stopped or failed trial (ray imported only here).

    It also leaves ``runs/<trial_id>.complete``: Tune's ``done`` flag lives only in memory (result.json and a
    restored experiment lack it), so after a resume this marker is what tells a finished trial from one the
    interrupt cut short."""
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
            marker = Path(runs_path) / f"{trial.trial_id}{COMPLETE_SUFFIX}"
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            self._line(trial, "finished" if done >= max_iterations else "stopped early")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, "failed")

    return Progress()


def _trial_dirname(trial) -> str:
    return trial.trial_id


def init_ray(cfg: ExperimentConfig) -> None:
    """Join the configured cluster (cluster.address, RAY_ADDRESS; ``auto`` for one started with ``ray start``)
    or start a local one big enough for one wave of trials: logical CPUs, so a 2-core laptop can hold
    1 trial x 2 workers plus the trial driver.

    A local cluster gets its own dashboard port, and its processes are told that address: Ray Train's
    placement-group cleaner (which frees an ASHA-stopped trial's workers) finds the cluster through the
    dashboard, and with several local Ray instances on one machine (CI, shared boxes) it otherwise picks
    the newest one, never frees the resources and the next trial waits forever.
    """
    import socket

    import ray

    if ray.is_initialized():
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    need = cfg.tune.max_concurrent * (cfg.tune.workers_per_trial * cfg.cluster.cpus_per_worker + 0.01)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(need)), num_gpus=None if cfg.cluster.use_gpu else 0,
             dashboard_port=port,
             runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})


def _build_tuner(cfg: ExperimentConfig, search_dir: Path, points: list, restore: bool, retry_errored: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=to_plain(cfg), runs_path=str(search_dir / RUNS_DIR)), {"cpu": 0.01})
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
        tune_config=tune.TuneConfig(metric=t.metric, mode="max", scheduler=scheduler, num_samples=1,
                                    max_concurrent_trials=t.max_concurrent, trial_dirname_creator=_trial_dirname,
                                    trial_name_creator=_trial_dirname),
        run_config=tune.RunConfig(name=search_dir.name, storage_path=str(search_dir.parent),
                                  failure_config=tune.FailureConfig(max_failures=t.max_failures),
                                  callbacks=[_progress_callback(cfg.train.max_iterations, str(search_dir / RUNS_DIR))], verbose=0),
    )


def _apply_flags(cfg: ExperimentConfig, args) -> ExperimentConfig:
    """Flags are shorthands for tune.* / cluster.* fields; re-validate through the one config system."""
    values = to_plain(cfg)
    for flag, (section, name) in {"space": ("tune", "space"), "num_samples": ("tune", "num_samples"),
                                  "scheduler": ("tune", "scheduler"), "workers_per_trial": ("tune", "workers_per_trial"),
                                  "max_concurrent": ("tune", "max_concurrent"), "max_iterations": ("tune", "max_iterations"),
                                  "storage_path": ("cluster", "storage_path"), "output": ("tune", "output"),
                                  "name": ("tune", "name")}.items():
        if getattr(args, flag) is not None:
            values[section][name] = getattr(args, flag)
    cfg = experiment_from_dict(values, where=args.config or "config")  # checks every tune.* field
    if "://" in cfg.cluster.storage_path:
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


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tuning.search_rates", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Every flag is a shorthand for a tune.*/cluster.* config field (--set works too).")
    add_config_args(p)
    p.add_argument("--space", help="search space: a preset (paper) or a YAML file (tune.space)")
    p.add_argument("--num-samples", type=int, help="grid: repeats with new seeds; sample: points drawn (tune.num_samples)")
    p.add_argument("--scheduler", choices=["asha", "fifo"], help="asha stops weak trials early; fifo runs all to the end")
    p.add_argument("--workers-per-trial", type=int, help="Ray Train workers (GPUs) per trial (tune.workers_per_trial)")
    p.add_argument("--max-concurrent", type=int, help="trials running at once (tune.max_concurrent)")
    p.add_argument("--max-iterations", type=int, help="cap every trial's iterations, for a quick look (tune.max_iterations)")
    p.add_argument("--storage-path", help="where the search folder goes (cluster.storage_path); shared storage on a cluster")
    p.add_argument("--name", help="search folder name under the storage path (tune.name)")
    p.add_argument("--output", help="where to copy the best checkpoint (tune.output, default best.ckpt)")
    p.add_argument("--resume", action="store_true", help="continue the search in STORAGE/NAME (the default when it exists)")
    p.add_argument("--retry-errored", action="store_true", help="on resume, run failed trials again (diverged ones stay failed)")
    p.add_argument("--dry-run", action="store_true", help="print the configurations and pruning reasons, run nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return _search(args)
    except (ConfigError, SearchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _search(args) -> int:
    import time

    from . import results

    started = time.monotonic()
    cfg = _apply_flags(load_config(args.config, args.overrides), args)
    search_dir = Path(cfg.cluster.storage_path).expanduser().resolve() / cfg.tune.name
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
        base = _trial_config(cfg)
        points = spaces.expand(spaces.load_space(cfg.tune.space), cfg.tune.mode, cfg.tune.num_samples, cfg.train.seed)
        kept, pruned = spaces.prune(points, base, cfg.tune.min_valid_weight, cfg.tune.workers_per_trial)
        kept = [to_plain(p) for p in kept]
        pruned = [(to_plain(p), r) for p, r in pruned]
        print(f"[search] space {_space_name(cfg)} ({cfg.tune.mode}): {len(points)} configurations, "
              f"{len(pruned)} pruned, {len(kept)} to run", flush=True)
    for p, reason in pruned:
        print(f"[search] pruned {spaces.describe(p)}: {reason}", flush=True)
    if args.dry_run:
        for p in kept:
            print(f"[search] would run {spaces.describe(p)}")
        return 0
    if not kept:
        raise SearchError("every configuration was pruned; widen the space or lower tune.min_valid_weight")
    base = _trial_config(full)
    if base.train.eval_interval >= base.train.max_iterations and full.tune.scheduler == "asha":
        print(f"[search] note: train.eval_interval {base.train.eval_interval} >= {base.train.max_iterations} "
              "iterations: one evaluation per trial, so ASHA cannot stop any trial early", flush=True)
    if not restore:
        search_dir.mkdir(parents=True, exist_ok=True)
        (search_dir / RUNS_DIR).mkdir(exist_ok=True)
        _write_json(state_file, {"config": to_plain(full), "points": kept, "pruned": [list(x) for x in pruned]})

    init_ray(base)
    from ray import tune

    if restore and not tune.Tuner.can_restore(str(search_dir)):
        restore = False  # the driver died before Tune saved its first state: start the trials afresh
    print(f"[search] {len(kept)} trials x {base.tune.workers_per_trial} workers, {base.tune.max_concurrent} at a time, "
          f"scheduler {base.tune.scheduler}, up to {base.train.max_iterations} iterations each; folder {search_dir}",
          flush=True)
    tuner = _build_tuner(base, search_dir, kept, restore, args.retry_errored)
    grid = tuner.fit()

    rows = results.collect(grid, kept, pruned, base)
    unfinished = [r for r in rows if r["status"] == "unfinished"]
    results.write(rows, search_dir, title=f"search {cfg.tune.name}: space {_space_name(full)}")
    saved = results.asha_savings(rows)
    if saved:
        print(f"[search] {saved}")
    print(f"[search] wall time {results._fmt_time(time.monotonic() - started)} for this run of the search", flush=True)
    if unfinished:
        print(f"[search] interrupted with {len(unfinished)} of {len(kept)} trials unfinished; run the same command "
              f"(or add --resume) to continue", flush=True)
        return 130
    best = results.best(rows)
    if best is None:
        raise SearchError(f"no trial produced a checkpoint; see {search_dir / 'results.md'}")
    best_cfg = spaces.apply_point(full, best["point"])  # full length, not the --max-iterations cap
    save_config(best_cfg, search_dir / "best_config.yaml")
    print(f"[search] best: {best['label']} val mIoU {100 * best['miou']:.2f} (trial {best['trial_id']}); "
          f"config to train at full length: {search_dir / 'best_config.yaml'}")
    print(f"[search] results: {search_dir / 'results.md'}, {search_dir / 'results.csv'}, {search_dir / 'results.png'}")
    output = Path(cfg.tune.output).expanduser().resolve()
    results.copy_checkpoint(best["checkpoint"], output)
    print(output, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
