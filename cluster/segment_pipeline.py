"""cluster.segment's Ray Data pipeline: read and decode tasks, a pool of model actors (SegmentWorker) that run
the shipped model and write each image's outputs, and the driver loop that records results, progress and the
start-up phases.

The one part of cluster.segment that needs Ray; the command (cluster/segment.py) parses arguments and calls
`segment`, and the inputs and outputs modules decide what is to be done."""
from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Optional

import numpy as np
from PIL import Image

from cluster.config import SegmentConfig
from cluster.infer import class_pixels, open_model, predict_labels, set_threads, ship_model, worker_device
from cluster.ray_internals import RAY_DATA_PARKED_THREADS
from cluster.segment_inputs import InputSet
from cluster.segment_outputs import (
    Output,
    as_output,
    claim_output,
    expected_outputs,
    open_manifest,
    output_escape,
    refuse_escaping,
    remove_stale_temps,
    split_done,
)
from deeplab.cli import error_line, on_interrupt, stops_held
from deeplab.config import InferenceConfig
from deeplab.data import DatasetError, palette_for_classes, read_image, read_mask
from deeplab.predict import (
    PREDICTION_KINDS,  # in expected_outputs' order; deeplab.predict loads no torch
    prediction_images,
    write_prediction,
)
from deeplab.progress import Progress


# ------------------------------------------------------------------------------------- Ray Data stages
def read_and_decode(row: dict, filesystem, max_pixels: Optional[int]) -> dict:
    """A Ray Data task: read one file through pyarrow and decode it; a bad file becomes an error string."""

    start = time.perf_counter()
    out = {"path": row["path"], "uri": row["uri"], "name": row["name"], "kept": row.get("kept", ""), "error": "",
           "pixels": b"", "height": 0, "width": 0}
    try:
        with filesystem.open_input_stream(row["path"]) as f:
            data = f.read()
        image = read_image(data, name=row["uri"], max_pixels=max_pixels)
    except DatasetError as e:
        out["error"] = str(e)
    except OSError as e:  # vanished since listing, permissions, network
        out["error"] = f"{row['uri']}: cannot read ({error_line(e)})"
    else:
        out.update(pixels=image.tobytes(), height=image.shape[0], width=image.shape[1])
    out["decode_seconds"] = time.perf_counter() - start
    return out


class SegmentWorker:
    """A Ray Data actor: the model, opened once, run on batches; writes the PNGs into OUTPUT (``out_dir``: a
    local folder or an object-store URL, opened here on the node) and returns one JSON record per image.
    Outputs that already exist are kept, not rewritten: locally those on disk now (an earlier run's, or a
    killed attempt's), on an object store those OUTPUT's listing held (an image a lost actor had written is
    PUT again, whole, with the same pixels: a HEAD per output would cost as much as the PUT)."""

    def __init__(self, model, out_dir: str, color: bool, alpha: float, output_stride: Optional[int],
                 num_gpus: float, cpus: float, max_batch_pixels: Optional[int] = None):
        self.startup = {"init": time.time()}  # for the driver's start-up phases
        threads = set_threads(cpus)
        self.runner = open_model(model, output_stride=output_stride, device=worker_device(num_gpus), threads=threads)
        self.names = self.runner.info.class_names
        self.palette = palette_for_classes(self.names)
        self.kinds = PREDICTION_KINDS if color else ("labels",)
        self.output, self.alpha = Output(out_dir), alpha
        self.max_batch_pixels = max_batch_pixels  # same-size images share a call up to this many pixels
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.startup["ready"] = time.time()

    def __call__(self, batch: dict) -> dict:

        rows = [{key: batch[key][i] for key in batch} for i in range(len(batch["uri"]))]
        good = [row for row in rows if not row["error"]]
        images = [np.frombuffer(r["pixels"], np.uint8).reshape(int(r["height"]), int(r["width"]), 3) for r in good]
        missing = [self._missing(str(r["name"]), str(r.get("kept", ""))) for r in good]
        run = [i for i, m in enumerate(missing) if m]  # images with outputs to write
        start = time.perf_counter()
        labels = dict(zip(run, predict_labels(self.runner, [images[i] for i in run], keep_errors=True,
                                                     max_batch_pixels=self.max_batch_pixels)))
        seconds = (time.perf_counter() - start) / max(1, len(run))
        records = {}
        for i, row in enumerate(good):
            uri = str(row["uri"])
            if isinstance(labels.get(i), Exception):
                records[uri] = {"path": uri, "status": "failed",
                                "error": f"{uri}: the model cannot run it ({error_line(labels[i])})"}
            else:
                records[uri] = self._finish(uri, str(row["name"]), images[i], labels.get(i), missing[i],
                                            seconds + float(row["decode_seconds"]))
        for row in rows:
            if row["error"]:
                records[str(row["uri"])] = {"path": str(row["uri"]), "status": "failed", "error": str(row["error"])}
        startup = [""] * len(rows)  # the first batch of each actor tells the driver how it started
        if self.startup is not None and rows:
            startup[0], self.startup = json.dumps(self.startup), None
        return {"record": np.array([json.dumps(records[str(row["uri"])]) for row in rows], dtype=object),
                "startup": np.array(startup, dtype=object)}

    def _missing(self, name: str, kept: str) -> list:
        if not self.output.local:
            return [k for k in self.kinds if k not in kept.split(",")]
        outputs = dict(zip(PREDICTION_KINDS, expected_outputs(name, color=True)))
        return [k for k in self.kinds if not os.path.isfile(os.path.join(self.output.path, outputs[k]))]

    def _finish(self, uri: str, name: str, image, labels, missing: list, seconds: float) -> dict:
        start = time.perf_counter()
        if self.output.local:
            escape = output_escape(Path(self.output.path), name, len(self.kinds) > 1)  # a link made under OUTPUT
            if escape:  # mid-run
                return {"path": uri, "status": "failed", "error": f"{uri}: {escape}"}
        try:
            if labels is None:  # every output exists already: count the pixels of the label map there
                labels = self._read_labels(name)
            else:
                self._write(name, image, labels, missing)
        except (OSError, ValueError) as e:
            return {"path": uri, "status": "failed", "error": f"{uri}: cannot write its outputs ({e})"}
        outputs = expected_outputs(name, color=len(self.kinds) > 1)
        written = [out for kind, out in zip(PREDICTION_KINDS, outputs) if kind in missing]
        return {"path": uri, "status": "ok", "outputs": outputs, "width": int(image.shape[1]),
                "height": int(image.shape[0]), "seconds": round(seconds + time.perf_counter() - start, 4),
                "pixels": class_pixels(labels, self.names), "written": written, "worker": self.worker}

    def _write(self, name: str, image, labels, kinds: list) -> None:
        """The pictures of ``kinds``: locally with deeplab.predict's atomic writer, on a store one PUT each."""

        rel = PurePosixPath(name)
        if self.output.local:
            folder = Path(self.output.path, rel.parent)
            folder.mkdir(parents=True, exist_ok=True)
            write_prediction(folder, rel.name, image, labels, self.palette, self.alpha, kinds=kinds)
            return
        outputs = dict(zip(PREDICTION_KINDS, expected_outputs(name, color=True)))
        for kind, picture in prediction_images(image, labels, self.palette, self.alpha, kinds).items():
            data = io.BytesIO()
            picture.save(data, format="PNG")
            self.output.write(outputs[kind], data.getvalue())

    def _read_labels(self, name: str):

        rel = expected_outputs(name, color=False)[0]
        if self.output.local:
            return read_mask(Path(self.output.path, rel))
        data = self.output.read(rel)
        if data is None:
            raise FileNotFoundError(f"{self.output.url_of(rel)}: gone since OUTPUT was listed")
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:  # our own grayscale PNG of class ids
            return np.asarray(im)


# ------------------------------------------------------------------------------------------------ driver
@dataclass
class Summary:
    total: int
    skipped: int
    ok: int = 0
    failed: int = 0
    seconds: float = 0.0
    first_result_s: float = 0.0  # actors starting, the model loading, the first batch
    first_count: int = 0  # images in the first results
    failures: list = field(default_factory=list)
    startup: dict = field(default_factory=dict)  # phase -> seconds, up to the first results (startup_phases)

    def count(self, records: list) -> None:
        for r in records:
            if r["status"] == "ok":
                self.ok += 1
            else:
                self.failed += 1
                self.failures.append(r["error"])

    @property
    def images_per_s(self) -> float:
        return (self.ok + self.failed) / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """Throughput once the pool is up: images after the first results over the time after them."""
        rest, span = self.ok + self.failed - self.first_count, self.seconds - self.first_result_s
        return rest / span if rest > 0 and span > 0 else 0.0


def startup_phases(pipeline_start: float, first_results: float, actors: list) -> dict:
    """Seconds per phase before the first results (epoch times): from the pipeline's start to the first ready
    actor's constructor (Ray Data's start, scheduling, the worker process and its imports), its model load
    (imports, open, compile), then the first batch (reading, decoding, the model, writing, the hop back).
    ``actors``: the startup records of the actors seen so far (the block carrying an actor's record may arrive
    after the first results)."""
    if not actors:
        return {}
    first = min(actors, key=lambda a: a["ready"])
    return {"actor start": max(0.0, first["init"] - pipeline_start), "model load": first["ready"] - first["init"],
            "first batch": max(0.0, first_results - first["ready"])}


def startup_line(phases: dict) -> str:
    return "start-up: " + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in phases.items())


def build_dataset(inputs: list, filesystem, model, output: Output, cfg: SegmentConfig, inference: InferenceConfig):
    """The Ray Data pipeline: items -> read + decode tasks -> model actor pool -> JSON records. The actors get
    OUTPUT as its URL (they open it on their node), never the driver's filesystem object."""
    import ray.data

    rows = [{"path": i.path, "uri": i.uri, "name": i.name, "kept": i.kept} for i in inputs]
    blocks = max(1, min(len(rows), -(-len(rows) // cfg.batch_size), 4096))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map(read_and_decode, fn_kwargs={"filesystem": filesystem, "max_pixels": cfg.max_pixels},
                num_cpus=cfg.cpus_per_decode)
    return ds.map_batches(
        SegmentWorker, batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.workers),
        num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker or None,
        fn_constructor_kwargs={"model": model, "out_dir": output.url, "color": cfg.color, "alpha": inference.alpha,
                               "output_stride": inference.output_stride, "num_gpus": cfg.gpus_per_worker,
                               "cpus": cfg.cpus_per_worker, "max_batch_pixels": cfg.max_batch_pixels})


def size_pool(cfg: SegmentConfig, resources: dict, log=print) -> int:
    """The actor pool's size: segment.workers, or as many actors as the cluster holds now next to one read
    task. Warns when the request does not fit (the run then waits for an autoscaler to add nodes)."""
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    workers = cfg.workers
    if workers is None:
        fits = [(cpus - cfg.cpus_per_decode) / cfg.cpus_per_worker if cfg.cpus_per_worker else float("inf"),
                gpus / cfg.gpus_per_worker if cfg.gpus_per_worker else float("inf")]
        workers = max(1, int(min(fits))) if min(fits) != float("inf") else 1
    need_cpu = workers * cfg.cpus_per_worker + cfg.cpus_per_decode
    need_gpu = workers * cfg.gpus_per_worker
    if need_cpu > cpus + 1e-9 or need_gpu > gpus + 1e-9:
        log(f"warning: {workers} actors x ({cfg.cpus_per_worker:g} CPU, {cfg.gpus_per_worker:g} GPU) plus "
            f"{cfg.cpus_per_decode:g} CPU to read need {need_cpu:g} CPUs and {need_gpu:g} GPUs; the cluster has "
            f"{cpus:g} and {gpus:g} now, so the run waits for an autoscaler to add nodes (without one, lower "
            "--workers or --cpus-per-worker)")
    return workers


def segment(model_path, inputs: InputSet, out_dir, cfg: SegmentConfig, log=print, overwrite: bool = False,
            inference: Optional[InferenceConfig] = None) -> Summary:
    """Run the pipeline over the images of ``inputs`` not done yet; Ray must be initialized. OUTPUT records the
    model (claim_output): another model's OUTPUT is refused unless ``overwrite``. ``inference``: the output
    stride and overlay alpha (default: the model's own stride, alpha 0.5). ``model_path``: a path, or
    open_model_file's handle (claimed and shipped from the bytes it read)."""
    output = as_output(out_dir)
    output.make()
    manifest = open_manifest(output)
    claim_output(output, model_path, inputs.items, manifest, overwrite)
    remove_stale_temps(output)
    todo, done = split_done(inputs.items, manifest, output, cfg.color)
    todo, refused = refuse_escaping(todo, inputs.refused, output, cfg.color)
    summary = Summary(total=len(inputs.items) + len(inputs.refused), skipped=len(done))
    log(f"{summary.total} images: {len(todo)} to segment, {len(done)} already done"
        + (f", {len(refused)} refused" if refused else "")
        + (f" ({inputs.ignored} files with other extensions ignored)" if inputs.ignored else ""))
    if refused:
        manifest.append([{"path": uri, "status": "failed", "error": why} for uri, why in refused])
        summary.failed, summary.failures = len(refused), [why for _, why in refused]
    if not todo:
        manifest.close()
        return summary
    _say_kept(summary, output)
    cfg = _pool_for_this_cluster(cfg, log)
    start, epoch = time.perf_counter(), time.time()
    shipped = ship_model(model_path)
    summary.startup["ship model"] = time.perf_counter() - start
    ds = build_dataset(todo, inputs.filesystem, shipped, output, cfg, inference or InferenceConfig())
    wanted, actors, first_results = {i.uri for i in todo}, [], 0.0
    bar = Progress(len(todo), "segment", interval=cfg.progress_interval_s, redraw=False)  # lines: Ray's console
    threads_before = set(threading.enumerate())
    batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
    try:
        for batch in batches:
            actors += [json.loads(a) for a in batch.get("startup", ()) if a]
            records = [json.loads(r) for r in batch["record"]]
            records = [r for r in records if r["path"] in wanted]  # a re-executed block is counted once
            wanted.difference_update(r["path"] for r in records)
            if records and not summary.first_count:
                summary.first_result_s, summary.first_count = time.perf_counter() - start, len(records)
                first_results = time.time()
            if summary.first_count and actors and "actor start" not in summary.startup:  # may come after them
                summary.startup.update(startup_phases(epoch + summary.startup["ship model"], first_results, actors))
            with stops_held():  # the stop line counts exactly the records the manifest keeps
                manifest.append(records)
                summary.count(records)
                _say_kept(summary, output)
            bar.update(done=summary.ok + summary.failed, note=f"{summary.failed} failed")
    except BaseException:
        stop_pipeline(batches, threads_before)
        raise
    finally:
        summary.seconds = time.perf_counter() - start
        manifest.close()
        remove_stale_temps(output)
    bar.update(done=summary.ok + summary.failed, note=f"{summary.failed} failed", final=True)
    return summary


def _pool_for_this_cluster(cfg: SegmentConfig, log) -> SegmentConfig:
    """segment.workers sized to the cluster's resources (size_pool), said in one line; Ray Data's progress bars
    off (the command prints its own line every few seconds)."""
    import ray.data

    cfg = replace(cfg, workers=size_pool(cfg, ray.cluster_resources(), log))
    log(f"{cfg.workers} model actor{'s' * (cfg.workers != 1)} ({cfg.cpus_per_worker:g} CPU"
        f"{f', {cfg.gpus_per_worker:g} GPU' if cfg.gpus_per_worker else ''} each), batches of {cfg.batch_size}")
    ray.data.DataContext.get_current().enable_progress_bars = False
    return cfg


def _say_kept(summary: Summary, output: Output) -> None:
    """What a stop now keeps (every image segmented: manifest record and files) and what the same command does
    then (a failed image is tried again)."""
    kept = summary.skipped + summary.ok
    on_interrupt(f"{kept} of {summary.total} images segmented in {output} (manifest.jsonl); the same command "
                 f"skips them and segments the other {summary.total - kept}")


def stop_pipeline(batches, threads_before: set, timeout: float = 10.0) -> None:
    """After a stop or an error mid-run: shut Ray Data's executor down and wait (at most ``timeout``) for the
    driver threads it started to end, before anyone shuts Ray down. A thread still inside a Ray call when
    ``ray.shutdown`` removes the core worker makes Ray end the whole process at once, with exit 1 and no line
    ("The core worker has already been shutdown ... The process will exit")."""
    try:
        batches.close()  # the iterator's ``finally`` shuts the executor down and tells its threads to stop
    except Exception:  # the run is ending anyway: what stopped it is what the user sees
        pass
    deadline = time.monotonic() + timeout
    for thread in set(threading.enumerate()) - threads_before:
        if thread.name not in RAY_DATA_PARKED_THREADS:
            thread.join(max(0.0, deadline - time.monotonic()))


def stop_actors(output: Output) -> None:
    """After a stop: this job's actors end with Ray (a cluster this command started goes entirely), then the
    temporary files of writes they had under way go too; every finished output is whole (written atomically)."""
    import ray

    ray.shutdown()
    remove_stale_temps(output)
