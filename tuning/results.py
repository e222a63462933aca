"""Search results a person reads at a glance: the paper's table (Markdown, CSV, printed), a plot, the best trial.

A row is a plain dict per configuration, run or pruned: its values, final val mIoU, final value of the search
metric (``score``: tune.metric), iterations run, whether ASHA stopped it early, wall time, status and the path of
its best checkpoint (by tune.metric). The best trial is the one with the best final score (tune.metric_mode).
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from deeplab.cli import error_line
from deeplab.config import ConfigError, to_plain
from deeplab.fileio import atomic_path, write_text_atomic

from . import spaces

RAN = ("finished", "stopped early")  # statuses of trials that trained to a result worth comparing
CSV_FIELDS = ("trial_id", "label", "multi_grid", "aspp_rates", "image_pooling", "crop_size", "output_stride",
              "cascade_blocks", "lr", "seed", "miou", "best_miou", "score", "iterations", "max_iterations",
              "stopped_early", "wall_s", "status", "checkpoint")
RUNS_DIR = "runs"  # in the search folder: the Ray Train runs, one per trial named after its id, and trial markers
# a failed trial's marker -> whether a resumed search with --retry-errored runs it again: a diverged trial stays
# failed; one whose training code failed runs again (its cause, such as a bad file, may have been fixed)
FAILURE_MARKERS = {"diverged": False, "code_error": True}


def marker(runs_path, trial_id: str, what: str) -> Path:
    """``runs/<trial_id>.<what>``, a trial's record on disk. ``complete``: it ran to its end or the scheduler
    stopped it (Tune's ``done`` flag lives only in memory, so after a resume this tells a finished trial from
    one the interrupt cut short). ``diverged``: its loss went NaN/inf; ``code_error``: its training code failed (a
    bad data file); each holds the reason and stops Tune's retries; a diverged trial is never re-run."""
    return Path(runs_path) / f"{trial_id}.{what}"


def _values(base, point: dict) -> dict:
    """The paper's columns for a point: the point's values over the base config's (pruned points included)."""
    try:
        cfg = spaces.apply_point(base, point)
    except ConfigError:
        cfg = base
    v = {"multi_grid": cfg.model.multi_grid, "aspp_rates": cfg.model.aspp_rates,
         "image_pooling": cfg.model.image_pooling, "crop_size": cfg.data.crop_size,
         "output_stride": cfg.model.output_stride, "cascade_blocks": cfg.model.cascade_blocks, "lr": cfg.train.lr,
         "seed": cfg.train.seed, "max_iterations": cfg.train.max_iterations}
    v.update({k: point[k] for k in v if k in point})
    return to_plain(v)


def _trials(grid) -> dict:
    """trial id -> (Tune status: TERMINATED, ERROR, PENDING, RUNNING, PAUSED; config). ResultGrid has no public
    per-trial status, and no config for a trial that never started, so read both from the analysis it wraps."""
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or []
    return {t.trial_id: (t.status, t.config) for t in trials}


def _best_checkpoint(df, metric: str, mode: str):
    """(path, val mIoU) of the trial's checkpoint with the best ``metric`` that still exists on disk."""
    from deeplab.checkpoint import CHECKPOINT_FILE  # torch: not on the --help path

    if df is None or "checkpoint_path" not in df or metric not in df or "val_miou" not in df:
        return None, None
    rows = df.dropna(subset=["checkpoint_path", metric]).sort_values(metric, ascending=mode == "min")
    for path, miou in zip(rows["checkpoint_path"], rows["val_miou"]):
        if (Path(path) / CHECKPOINT_FILE).is_file():
            return str(path), float(miou)
    return None, None


def _status(result, tune_status, runs_path: Path, trial_id: str, max_iterations: int) -> str:
    """finished | stopped early | failed: reason | unfinished. A trial that trained to its end or was stopped by
    the scheduler has done=True in its last result (in memory only) and a ``complete`` marker (survives a
    resume); an interrupted search leaves running and pending trials TERMINATED but never done."""
    for kind in FAILURE_MARKERS:
        failed = marker(runs_path, trial_id, kind)
        if failed.exists():
            return f"failed: {failed.read_text().strip()}"
    if tune_status == "ERROR" or (result.error and tune_status != "TERMINATED"):
        cause = getattr(result.error, "cause", None) or result.error  # Ray's wrapper, else the error itself
        return f"failed: {error_line(cause)}" if result.error else "failed"
    metrics = result.metrics or {}
    if not (metrics.get("done") or marker(runs_path, trial_id, "complete").exists()):
        return "unfinished"
    iterations = metrics.get("iteration")
    return "stopped early" if iterations is not None and iterations < max_iterations else "finished"


def _finite(value):
    return None if value is None or not math.isfinite(value) else float(value)


def collect(grid, points: list, pruned: list, base) -> list:
    """Rows in the space's order: every trial of the ResultGrid, then every pruned point with its reason.
    ``base`` is the trials' config: its tune.metric / tune.metric_mode score trials and pick checkpoints."""
    trials = _trials(grid)
    order = [to_plain(p) for p in points]
    taken = set()
    rows = []
    metric, mode = base.tune.metric, base.tune.metric_mode
    for result in grid:
        trial_id = Path(result.path).name
        tune_status, config = trials.get(trial_id, (None, None))
        point = to_plain((result.config or config or {}).get("point", {}))
        index = next((i for i, p in enumerate(order) if p == point and i not in taken), len(order) + len(rows))
        taken.add(index)
        m = result.metrics or {}
        v = _values(base, point)
        status = _status(result, tune_status, Path(result.path).parent / RUNS_DIR, trial_id, v["max_iterations"])
        checkpoint, best_miou = _best_checkpoint(result.metrics_dataframe, metric, mode)
        rows.append({"index": index, "trial_id": trial_id, "label": spaces.describe(point), "point": point, **v,
                     "miou": _finite(m.get("val_miou")), "best_miou": best_miou, "score": _finite(m.get(metric)),
                     "iterations": m.get("iteration"), "stopped_early": status == "stopped early",
                     "wall_s": m.get("time_total_s"), "status": status, "checkpoint": checkpoint})
    rows.sort(key=lambda r: r["index"])
    for point, reason in pruned:
        point = to_plain(point)
        rows.append({"trial_id": "", "label": spaces.describe(point), "point": point, **_values(base, point),
                     "miou": None, "best_miou": None, "score": None, "iterations": 0, "stopped_early": False,
                     "wall_s": None, "status": f"pruned: {reason}", "checkpoint": None})
    return rows


def best(rows: list, mode: str = "max"):
    """The trial that ran with the best final score (``mode`` max: the highest) and has a checkpoint on disk;
    None if there is none."""
    ran = [r for r in rows if r["status"] in RAN and r["score"] is not None and r["checkpoint"]]
    sign = 1 if mode == "max" else -1
    return max(ran, key=lambda r: sign * r["score"]) if ran else None


def asha_savings(rows: list):
    """What early stopping saved, in trial-iterations, against running every trial that ran to its end."""
    ran = [r for r in rows if r["status"] in RAN]
    if not ran:
        return None
    done = sum(r["iterations"] or 0 for r in ran)
    full = sum(r["max_iterations"] for r in ran)
    stopped = sum(r["stopped_early"] for r in ran)
    return (f"{len(ran)} trials trained {done} of {full} trial-iterations ({stopped} stopped early): early stopping "
            f"saved {full - done} ({100 * (full - done) / max(full, 1):.0f}%) against running every trial to the end")


def _tup(v) -> str:
    return "(" + ", ".join(str(x) for x in v) + ")"


def fmt_time(s) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def table_columns(rows: list, metric: str = "val_miou") -> list:
    """(header, row -> text) pairs: the paper's columns, plus block/lr/seed when the search varies them and the
    search metric when it is not val mIoU."""
    cols = [("Multi-Grid", lambda r: _tup(r["multi_grid"])), ("ASPP", lambda r: _tup(r["aspp_rates"])),
            ("Image Pooling", lambda r: "yes" if r["image_pooling"] else "no"), ("Crop", lambda r: str(r["crop_size"])),
            ("OS", lambda r: str(r["output_stride"]))]
    varied = {k for r in rows for k in r["point"]}
    if "cascade_blocks" in varied:
        cols.append(("Blocks", lambda r: f"block{4 + r['cascade_blocks']}"))
    if "lr" in varied:
        cols.append(("lr", lambda r: f"{r['lr']:g}"))
    if "seed" in varied:
        cols.append(("Seed", lambda r: str(r["seed"])))
    for key in sorted(k for k in varied if k not in spaces.SHORT_NAMES):
        cols.append((key, lambda r, key=key: str(r["point"].get(key, ""))))
    cols.append(("mIoU", lambda r: "-" if r["miou"] is None else f"{100 * r['miou']:.2f}"))
    if metric != "val_miou":  # right after mIoU; "final lr" where the search also varies lr
        header = f"final {metric}" if metric in (h for h, _ in cols) else metric
        cols.append((header, lambda r: "-" if r["score"] is None else f"{r['score']:.4g}"))
    cols += [("Iterations", lambda r: f"{r['iterations'] or 0}/{r['max_iterations']}"),
             ("Stopped early", lambda r: "yes" if r["stopped_early"] else ""),
             ("Wall time", lambda r: fmt_time(r["wall_s"])), ("Status", lambda r: r["status"])]
    return cols


def describe_best(row: dict, metric: str = "val_miou", mode: str = "max") -> str:
    """The best trial in one phrase: its configuration, val mIoU and, when the search ranks by another metric,
    that metric's value."""
    by = "" if metric == "val_miou" else f", {metric} {row['score']:.4g} (the search's metric, {mode})"
    return f"{row['label']}, val mIoU {100 * row['miou']:.2f}{by} (trial {row['trial_id']})"


def markdown(rows: list, title: str = "", metric: str = "val_miou", mode: str = "max") -> str:
    top = best(rows, mode)
    cols = table_columns(rows, metric)
    bold = [h for h, _ in cols].index("mIoU") + (metric != "val_miou")  # the paper marks its best in bold
    lines = [f"# {title}", ""] if title else []
    lines += ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for r in rows:
        cells = [f(r).replace("|", "/") for _, f in cols]
        if r is top:
            cells[bold] = f"**{cells[bold]}**"
        lines.append("| " + " | ".join(cells) + " |")
    saved = asha_savings(rows)
    if top:
        lines += ["", f"Best: {describe_best(top, metric, mode)}."]
    if saved:
        lines += ["", saved[0].upper() + saved[1:] + "."]
    return "\n".join(lines) + "\n"


def to_csv(rows: list) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (" ".join(map(str, r[k])) if isinstance(r[k], list) else r[k]) for k in CSV_FIELDS})
    return buf.getvalue()


def plot(rows: list, path: Path, title: str = "", mode: str = "max") -> None:
    """Horizontal bars of val mIoU per configuration; the best trial outlined, stopped-early lighter, failed and
    pruned marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = best(rows, mode)
    colors = {"finished": "#1f77b4", "stopped early": "#9ecae1"}
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.32 * len(rows)))
    ys = list(range(len(rows)))[::-1]
    values = [100 * r["miou"] if r["miou"] is not None else 0.0 for r in rows]
    xmax = max(values + [1.0])
    for y, r, x in zip(ys, rows, values):
        status = r["status"].split(":")[0]
        if status in colors:
            ax.barh(y, x, color=colors[status], edgecolor="#d4a017" if r is top else "none", linewidth=2.5)
            ax.text(x + 0.01 * xmax, y, f"{x:.2f}" + (" best" if r is top else "")
                    + (f" ({r['iterations']} it)" if r["stopped_early"] else ""), va="center", fontsize=8)
        else:
            ax.text(0.01 * xmax, y, status, va="center", fontsize=8, color="#c0392b" if status == "failed" else "#777")
    ax.set_yticks(ys)
    ax.set_yticklabels([r["label"] for r in rows], fontsize=8)
    ax.set_xlim(0, xmax * 1.25)
    ax.set_xlabel("val mIoU (%)")
    ax.set_title(title or "search", fontsize=10, loc="left")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, list(colors), loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)


def write(rows: list, folder: Path, title: str = "", metric: str = "val_miou", mode: str = "max") -> None:
    """Print the table and write results.md, results.csv and results.png into the search folder."""
    text = markdown(rows, title, metric, mode)
    print(text, flush=True)
    write_text_atomic(folder / "results.md", text)
    write_text_atomic(folder / "results.csv", to_csv(rows))
    plot(rows, folder / "results.png", title, mode)
