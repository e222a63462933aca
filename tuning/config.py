"""The search's config section (``tune``): what Ray Tune searches and how ASHA schedules trials. Registered
with deeplab's config on import (the package's __init__ imports this)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Union

from deeplab.config import ConfigError, ExperimentConfig, Section, register_section
from deeplab.train_batch import evaluations_per_run

SCHEDULERS = ("asha", "fifo")
SEARCH_MODES = ("grid", "sample")
# Scalars deeplab.train_loop reports at every evaluation, which a search can rank trials by (tune.metric).
SEARCH_METRICS = ("val_miou", "loss", "images_per_s", "lr", "iteration", "epoch")


@dataclass
class TuneConfig(Section):
    """What Ray Tune searches and how it schedules trials."""

    SECTION: ClassVar[str] = "tune"

    space: Union[str, dict] = "paper"  # a preset name or a YAML file, or the space itself (a mapping)
    num_samples: int = 1
    scheduler: str = "asha"  # asha | fifo
    workers_per_trial: int = 2
    max_concurrent: int = 1
    max_iterations: Optional[int] = None
    grace_period: int = 1  # evaluations before ASHA may stop a trial
    reduction_factor: int = 2
    metric: str = "val_miou"  # what ASHA ranks trials by, each trial's kept checkpoint and the best trial
    metric_mode: str = "max"  # max | min: whether a higher metric is better
    output: str = "best.ckpt"
    name: str = "search"
    mode: str = "grid"  # grid: every combination of the space | sample: num_samples random picks from it
    min_valid_weight: float = 0.15  # prune ASPP rates whose 3x3 filter keeps less (1/9: a 1x1 filter; Fig. 4)
    max_failures: int = 2  # retries of a trial whose driver died (lost node); divergence is never retried

    def check_values(self) -> None:
        self._need(bool(self.space), "space", "must name a preset or a YAML file, or be a non-empty mapping")
        self._need_at_least(1, "num_samples", "workers_per_trial", "max_concurrent", "max_iterations",
                            "grace_period")
        self._need_one_of("scheduler", SCHEDULERS)
        self._need_one_of("mode", SEARCH_MODES)
        self._need(self.reduction_factor >= 2, "reduction_factor", "must be >= 2 (ASHA keeps 1/reduction_factor)")
        self._need(self.metric in SEARCH_METRICS, "metric",
                   f"is not a metric training reports; use one of {', '.join(SEARCH_METRICS)}")
        self._need_one_of("metric_mode", ("max", "min"))
        self._need(bool(self.output), "output", "must name the file best.ckpt is copied to")
        self._need(bool(self.name) and "/" not in self.name, "name", "must be a folder name (no '/')")
        self._need(0 <= self.min_valid_weight <= 1, "min_valid_weight", "must be in [0, 1]")
        self._need_at_least(-1, "max_failures")


def check_grace_period(cfg: ExperimentConfig) -> None:
    """ASHA cannot stop a trial before it has reported grace_period evaluations."""
    t, tune = cfg.train, cfg.tune
    evaluations = evaluations_per_run(t, tune.max_iterations)
    if tune.scheduler == "asha" and tune.grace_period > evaluations:
        iterations = min(t.max_iterations, tune.max_iterations or t.max_iterations)
        raise ConfigError(f"tune.grace_period={tune.grace_period} is more than the {evaluations} evaluation(s) "
                          f"per trial ({iterations} iterations, train.eval_interval {t.eval_interval}): lower "
                          f"tune.grace_period to <= {evaluations} or run more iterations per trial",
                          ("tune.grace_period", "tune.max_iterations", "train.max_iterations", "train.eval_interval"))


register_section(TuneConfig, check_grace_period)
