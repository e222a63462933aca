"""A prepared GPU check (``make gpu-check``): every GPU figure this project quotes, from one command that
fits in under 8 minutes on one GPU machine with CUDA torch, onnx and onnxruntime (CPU), without Ray and
without TensorRT (the case of a lent GPU machine).

    python -m export.gpu_check                  # writes $OUT/gpu_check.json (else runs/gpu_check.json)

Sections, each timed with CUDA synchronization, written to the JSON as soon as it is done (a run cut short
keeps what it measured), each failing alone (its reason in "skipped", the others' figures kept), skipped with
a reason when the time budget (--budget-s) is spent:
1. inference, R-101 (--backbone) at output stride 8, --size 513, batch 1 and 8, one section per variant:
   eager fp32, fp16 and bf16 autocast (channels_last), torch.compile (inductor) in bf16;
2. training, one section per variant (AMP fp16 with GradScaler, AMP bf16, both channels_last; fp32 NCHW):
   a few iterations of the project's own loop (`deeplab.train_loop.train`) on synthetic --size crops with
   SyncBatchNorm converted, one evaluation, its checkpoint saved, loaded and resumed for one more iteration.
   With 2+ GPUs it runs as 2 processes under DDP and NCCL; on one GPU a group of one runs SyncBatchNorm as
   plain BatchNorm, and the JSON says so. The variant `demo_step` is configs/demo.yaml's step (ResNet-50 OS16,
   81 px crops, global batch 8, amp auto), the one `python -m cluster.bench --scaling` times on CPUs: its
   images/s (median per step after 2 warm-up steps) is the comparable GPU figure;
3. ONNX export parity: the exported ONNX in onnxruntime (CPU) against the model on the GPU;
4. where tensorrt imports: FP16 and INT8 engines built and timed with export.runtime.TensorRTRunner.
fp32 figures carry the TF32 switches they ran under (torch.backends.cuda.matmul / cudnn.allow_tf32).
Without a CUDA GPU it prints one line, ``no CUDA GPU``, and exits 2; ``--cpu-dry-run`` runs the same sections
on the CPU with a tiny model instead (what the tests use).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from deeplab.backbones import backbone_names
from deeplab.cli import error_line

NO_GPU_EXIT = 2


class Report:
    """One JSON file of every figure, rewritten atomically after each section."""

    def __init__(self, path, budget_s: float):
        self.path, self.budget_s, self.start = Path(path), budget_s, time.monotonic()
        self.data = {"sections": {}, "skipped": {}}

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def add(self, section: str, figures) -> None:
        self.data["sections"][section] = figures
        self.write()

    def skip(self, section: str, why: str) -> None:
        self.data["skipped"][section] = why
        self.write()

    def write(self) -> None:
        from deeplab.fileio import ensure_dir, write_text_atomic

        ensure_dir(self.path.parent)
        self.data["elapsed_s"] = round(time.monotonic() - self.start, 1)
        write_text_atomic(self.path, json.dumps(self.data, indent=2) + "\n")

    def run(self, section: str, needs_s: float, fn: Callable[[], object]) -> None:
        """Run one section if the budget has `needs_s` seconds left; a failure is recorded, not raised."""
        if self.left_s() < needs_s:
            self.skip(section, f"time budget: {self.left_s():.0f}s left, the section needs about {needs_s:.0f}s")
            return
        t0 = time.monotonic()
        try:
            figures = fn()
        except Exception as e:  # one section's failure (out of memory, a missing package) must not lose the rest
            self.skip(section, f"failed: {error_line(e, 300, with_type=True)}")
            return
        print(f"{section}: done in {time.monotonic() - t0:.0f}s", flush=True)
        self.add(section, figures)


def measure(fn: Callable[[], object], warmup: int, repeats: int, sync: Optional[Callable[[], None]] = None) -> dict:
    """Median and min latency of `fn` in ms after `warmup` calls; `sync` (torch.cuda.synchronize) ends each."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - t0))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "n": repeats}


def default_output() -> Path:
    return Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("runs/gpu_check.json")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--output", type=Path, default=None, help="JSON file (default: $OUT/gpu_check.json, "
                   "else runs/gpu_check.json)")
    p.add_argument("--backbone", default="resnet101", choices=backbone_names(real_only=True),
                   help="model timed (default: resnet101)")
    p.add_argument("--size", type=int, default=513, help="image side for inference and training crops (default: 513)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="inference batch sizes (default: 1 8)")
    p.add_argument("--train-batch", type=int, default=8, help="training images per step (default: 8)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per inference variant (default: 20)")
    p.add_argument("--train-steps", type=int, default=10, help="training iterations per variant (default: 10)")
    p.add_argument("--budget-s", type=float, default=420, help="stop starting sections after this (default 7 min)")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="no GPU needed: every section on the CPU with a tiny model at 65 px (checks the check)")
    args = p.parse_args(argv)
    if args.size < 33 or min(args.batches) < 1 or args.train_batch < 2 or args.repeats < 1 or args.train_steps < 1:
        p.error("--size >= 33, --batches >= 1, --train-batch >= 2 (BatchNorm), --repeats and --train-steps >= 1")
    if args.cpu_dry_run:
        args.backbone, args.size, args.batches, args.train_batch = "resnet_tiny", 65, [1], 2
        args.repeats, args.train_steps = min(args.repeats, 2), min(args.train_steps, 2)
    args.device = "cpu" if args.cpu_dry_run else "cuda"
    args.output = args.output or default_output()
    return args


# ------------------------------------------------------------------------------------------ sections
def build(backbone: str, output_stride: int):
    from deeplab import build_model
    from deeplab.config import ModelConfig

    small = {"aspp_channels": 16} if backbone == "resnet_tiny" else {}
    return build_model(ModelConfig(backbone=backbone, num_classes=21, output_stride=output_stride, **small))


def tf32_state() -> dict:
    """Whether fp32 convolutions and matmuls ran as TF32 (Ampere and newer; cuDNN's default allows it)."""
    import torch

    native = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
    return {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(), "gpu_has_tf32": native}


INFERENCE_VARIANTS = {"eager_fp32": ("eager", None), "eager_fp16": ("eager", "float16"),
                      "eager_bf16": ("eager", "bfloat16"), "compile_bf16": ("compile", "bfloat16")}


def inference(args, variant: str, models: dict) -> dict:
    """One variant at every batch size; the model is built once and shared by the variants (``models``)."""
    import torch

    mode, dtype_name = INFERENCE_VARIANTS[variant]
    dtype = getattr(torch, dtype_name) if dtype_name else None
    if "eager" not in models:
        models["eager"] = build(args.backbone, 8).to(args.device).eval().to(memory_format=torch.channels_last)
    if mode == "compile":  # one static graph per batch size, compiled in the warm-up
        models.setdefault("compile", torch.compile(models["eager"], dynamic=False))
    net = models[mode]
    sync = torch.cuda.synchronize if args.device == "cuda" else None
    out = {}
    for batch in args.batches:
        x = torch.randn(batch, 3, args.size, args.size, device=args.device).contiguous(memory_format=torch.channels_last)

        def call():
            with torch.inference_mode(), torch.autocast(args.device, dtype=dtype or torch.float32,
                                                        enabled=dtype is not None):
                net(x)

        m = measure(call, warmup=3, repeats=args.repeats, sync=sync)
        m["images_per_s"] = 1000 * batch / m["median_ms"]
        if dtype is None and args.device == "cuda":
            m["tf32"] = tf32_state()
        out[f"batch{batch}"] = m
        print(f"  {variant} batch {batch}: {m['median_ms']:.1f} ms, {m['images_per_s']:.1f} images/s", flush=True)
    return out


DEMO_STEP = "demo_step"  # the training variant that runs configs/demo.yaml's step, as cluster.bench --scaling does


# name: (train.amp, channels_last); fp16 needs CUDA (GradScaler), so the CPU dry run leaves it out
TRAIN_VARIANTS = {"fp16_channels_last": ("fp16", True), "bf16_channels_last": ("bf16", True),
                  "fp32_nchw": ("off", False), DEMO_STEP: (DEMO_STEP, True)}


def demo_step_config(args, iterations: int):
    """configs/demo.yaml's model, crops, global batch and amp (the step `cluster.bench --scaling` times on CPUs),
    for ``iterations`` steps and one evaluation; the cpu dry run shrinks the model and crops."""
    from deeplab.config import load_config

    tiny = ["model.backbone=resnet_tiny", "model.aspp_channels=16", "data.crop_size=65", "data.synthetic_size=80",
            "train.batch_size=2"] if args.device == "cpu" else []
    return load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml", [
        f"train.max_iterations={iterations}", f"train.eval_interval={iterations}", f"train.log_interval={iterations}",
        "data.synthetic_val=2", f"data.loader_workers={0 if args.device == 'cpu' else 4}", *tiny]).check()


def train_config(args, amp: str, channels_last: bool, iterations: int):
    """Synthetic --size crops, --train-batch images per step, one evaluation at the end."""
    from deeplab.config import load_config

    if amp == DEMO_STEP:
        return demo_step_config(args, iterations)
    small = ["model.aspp_channels=16"] if args.backbone == "resnet_tiny" else []
    return load_config(None, [
        f"model.backbone={args.backbone}", "model.num_classes=6", "model.output_stride=16", *small,
        "data.dataset=synthetic", "data.synthetic_classes=6", f"data.synthetic_size={args.size}",
        f"data.crop_size={args.size}", f"data.synthetic_train={args.train_batch * iterations}",
        "data.synthetic_val=2", f"data.loader_workers={0 if args.device == 'cpu' else 4}",
        f"train.batch_size={args.train_batch}",
        f"train.max_iterations={iterations}", f"train.eval_interval={iterations}", f"train.log_interval={iterations}",
        f"train.amp={amp}", f"train.channels_last={str(channels_last).lower()}", "train.lr=0.001",
        "train.bn_momentum=0.5", "cluster.num_workers=1"]).check()  # a few iterations: running stats must move


def _loop_worker(device, rank: int, world_size: int, keep: Path, resume: Optional[Path], reports: list):
    """deeplab.train_loop's Worker as a runner gives it: SyncBatchNorm converted (DDP across 2+ processes), rank 0's
    checkpoint kept at ``keep``."""
    import shutil

    import torch

    from deeplab.checkpoint import CHECKPOINT_FILE
    from deeplab.train_loop import Worker

    def prepare(model):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if world_size > 1:
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
        return model

    def report(metrics, folder):
        reports.append(metrics)
        if folder:
            shutil.copyfile(Path(folder) / CHECKPOINT_FILE, keep)

    return Worker(rank=rank, world_size=world_size, device=device, prepare_model=prepare, report=report,
                  latest_checkpoint=lambda: str(resume) if resume else None, synchronized_bn=world_size > 1)


def training_loop(args, amp: str, channels_last: bool, device, folder: Path, rank: int = 0,
                  world_size: int = 1) -> dict:
    """--train-steps iterations of the project's loop, then its checkpoint loaded and resumed for one more."""
    import torch

    from deeplab.checkpoint import load_checkpoint
    from deeplab.train_loop import resolve_amp, train

    steps, keep = args.train_steps, folder / "model.ckpt"
    if amp == DEMO_STEP:  # a median over steps after 2 warm-up ones, as the CPU figure it is compared with
        steps = 3 if device.type == "cpu" else max(steps, 30)
    cfg, reports = train_config(args, amp, channels_last, steps), []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    metrics = train(cfg, _loop_worker(device, rank, world_size, keep, None, reports))
    wall = time.perf_counter() - t0
    if world_size > 1:
        torch.distributed.barrier()  # rank 0's checkpoint is written
    saved = load_checkpoint(keep, map_location=str(device))
    resumed = train(train_config(args, amp, channels_last, steps + 1),
                    _loop_worker(device, rank, world_size, folder / "resumed.ckpt", keep, []))
    dtype = resolve_amp(cfg.train.amp, device)
    sync = "SyncBatchNorm over NCCL, DDP" if world_size > 1 else (
        "SyncBatchNorm converted; a group of one runs it as BatchNorm (no NCCL, no DDP: they need 2+ GPUs)")
    figures = {"iterations": metrics["iteration"], "images_per_s": metrics["images_per_s"],
               "images_per_s_median": metrics["images_per_s_median"], "batch": cfg.train.batch_size,
               "crop": cfg.data.crop_size, "backbone": cfg.model.backbone,
               "loss": metrics["loss"], "val_miou": metrics["val_miou"], "evaluations": len(reports),
               "autocast": str(dtype).replace("torch.", "") if dtype else "off", "grad_scaler": dtype == torch.float16,
               "channels_last": channels_last, "world_size": world_size, "sync_bn": sync, "wall_s": wall,
               "checkpoint": {"saved_iteration": saved.state["iteration"], "bytes": keep.stat().st_size,
                              "has_scaler_state": bool(saved.state.get("scaler")),
                              "resumed_to_iteration": resumed["iteration"]}}
    if device.type == "cuda":
        figures["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if dtype is None:
            figures["tf32"] = tf32_state()
    return figures


def _spawned_rank(rank: int, args, amp: str, channels_last: bool, folder: str) -> None:
    """One of 2 processes (one GPU each) training under DDP with NCCL; rank 0 writes the figures."""
    import torch
    import torch.distributed as dist

    from deeplab.fileio import write_text_atomic

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{folder}/process_group", rank=rank, world_size=2)
    try:
        figures = training_loop(args, amp, channels_last, torch.device("cuda", rank), Path(folder), rank, 2)
        if rank == 0:
            write_text_atomic(Path(folder) / "figures.json", json.dumps(figures))
    finally:
        dist.destroy_process_group()


def training(args, variant: str) -> dict:
    """One training variant: 2 processes under DDP/NCCL where there are 2+ GPUs, else this process."""
    import torch

    amp, channels_last = TRAIN_VARIANTS[variant]
    with tempfile.TemporaryDirectory(prefix="gpu_check_train_") as folder:
        if args.device == "cuda" and torch.cuda.device_count() >= 2:
            torch.multiprocessing.spawn(_spawned_rank, args=(args, amp, channels_last, folder), nprocs=2, join=True)
            return json.loads((Path(folder) / "figures.json").read_text())
        figures = training_loop(args, amp, channels_last, torch.device(args.device), Path(folder))
    print(f"  train {variant}: {figures['images_per_s']:.1f} images/s", flush=True)
    return figures


def onnx_parity(args) -> dict:
    import torch

    from .metadata import build_metadata
    from .runtime import OnnxRunner
    from .to_onnx import compare, export_model

    model = build(args.backbone, 8).eval()
    with tempfile.TemporaryDirectory() as d:
        path = export_model(model, Path(d) / "model.onnx", build_metadata(model.config))
        x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            ref = model.to(args.device)(x.to(args.device)).float().cpu().numpy()
        return compare(ref, OnnxRunner(path, ["CPUExecutionProvider"])(x), x.shape,
                       f"onnxruntime (CPU) vs {args.device.upper()}")


def tensorrt_engines(args) -> dict:
    import torch

    import tensorrt as trt

    from .metadata import build_metadata
    from .precision import lowp_onnx, quantize_int8
    from .runtime import TensorRTRunner, device_info
    from .to_onnx import export_model
    from .to_tensorrt import build_engine, build_path, make_sidecar, onnx_variant, write_engine

    model = build(args.backbone, 8).eval()
    shape = (1, 3, args.size, args.size)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        fp32 = export_model(model, Path(d) / "model.onnx", build_metadata(model.config))
        calib = [torch.randn(*shape).numpy() for _ in range(4)]
        path = build_path(trt.__version__)  # TensorRT 10: precision flags on the FP32 ONNX; 11: a typed ONNX
        fp16 = lowp_onnx(fp32, Path(d) / "model.fp16.onnx")[0] if onnx_variant("fp16", path) == "fp16" else fp32
        sources = {"fp16": fp16, "int8": quantize_int8(fp32, Path(d) / "model.int8.onnx", calib)}
        profile = {"min": shape, "opt": shape, "max": shape}
        for precision, onnx_path in sources.items():
            engine = Path(d) / f"model.{precision}.engine"
            data = build_engine(onnx_path, precision, profile, 8.0)
            write_engine(engine, data, lambda tmp: make_sidecar(device_info(), precision, path, profile, onnx_path, {}))
            runner, x = TensorRTRunner(engine), torch.randn(*shape, device="cuda")
            out[precision] = measure(lambda: runner(x), warmup=5, repeats=args.repeats, sync=torch.cuda.synchronize)
    return out


def environment(args) -> dict:
    import torch

    if args.device == "cpu":
        return {"torch": torch.__version__, "gpu": None, "dry_run": "cpu: every section on the CPU, tiny model",
                "backbone": args.backbone, "size": args.size}
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(),
            "gpus": torch.cuda.device_count(), "capability": ".".join(map(str, torch.cuda.get_device_capability())),
            "backbone": args.backbone, "size": args.size, "tf32": tf32_state()}


def run_sections(args, report: Report) -> None:
    """Each variant its own section: one failing (a torch.compile error, out of memory) keeps the others."""
    models: dict = {}
    for variant in INFERENCE_VARIANTS:
        if args.device == "cpu" and variant == "eager_fp16":
            report.skip(f"inference_{variant}", "cpu dry run: fp16 autocast is a GPU variant")
            continue
        if not variant.startswith("compile"):
            report.run(f"inference_{variant}", 40, lambda v=variant: inference(args, v, models))
    for variant in TRAIN_VARIANTS:
        if args.device == "cpu" and TRAIN_VARIANTS[variant][0] == "fp16":
            report.skip(f"training_{variant}", "cpu dry run: fp16 with GradScaler needs CUDA")
            continue
        report.run(f"training_{variant}", 60, lambda v=variant: training(args, v))
    report.run("onnx_parity", 90, lambda: onnx_parity(args))
    report.run("inference_compile_bf16", 90, lambda: inference(args, "compile_bf16", models))
    if args.device == "cpu":
        report.skip("tensorrt", "cpu dry run")
        return
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        report.skip("tensorrt", "tensorrt is not importable here")
    else:
        report.run("tensorrt", 150, lambda: tensorrt_engines(args))


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU", file=sys.stderr)
        return NO_GPU_EXIT
    report = Report(args.output, args.budget_s)
    report.add("environment", environment(args))
    torch.backends.cudnn.benchmark = args.device == "cuda"
    run_sections(args, report)
    print(f"wrote {args.output} ({report.data['elapsed_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
