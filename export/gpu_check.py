"""A prepared GPU check (``make gpu-check``): every GPU figure this project quotes, from one command that
fits in under 8 minutes on one GPU machine with CUDA torch, onnx and onnxruntime (CPU), without Ray and
without TensorRT (the case of a lent GPU machine).

    python -m export.gpu_check                  # writes $OUT/gpu_check.json (else runs/gpu_check.json)

Each section runs in its own fresh interpreter (``python -m export.gpu_check --section NAME``) under a hard
time limit: a hang, a crash or an out-of-memory in one (a TensorRT build, torch.compile) loses that section
only, and no section runs past the time budget (--budget-s, checked while a section runs, not only before
it starts). Each section's figures are written to the JSON as soon as it is done (a run cut short keeps what
it measured). The JSON holds "sections" (figures), "skipped" (expected, with the reason: no TensorRT here,
fp16 in a CPU dry run) and "failed" (an error, a crash, its time limit, or not started for lack of budget);
any failed section makes the check exit 1. The sections:
1. inference, R-101 (--backbone) at output stride 8, --size 513, batch 1 and 8, one section per variant:
   eager fp32, fp16 and bf16 autocast (channels_last), torch.compile (inductor) in bf16;
2. training, one section per variant (AMP fp16 with GradScaler, AMP bf16, both channels_last; fp32 NCHW):
   a few iterations of the project's own loop (`deeplab.train_loop.train`, which needs no Ray and no cluster
   section) on synthetic --size crops with SyncBatchNorm converted, one evaluation, its checkpoint saved,
   loaded and resumed for one more iteration. With 2+ GPUs it runs as 2 processes under DDP and NCCL; on one
   GPU a group of one runs SyncBatchNorm as plain BatchNorm, and the JSON says so. The variant `demo_step` is
   configs/demo.yaml's step (ResNet-50 OS16, 81 px crops, global batch 8, amp auto), the one
   `python -m cluster.bench --scaling` times on CPUs: its images/s (median per step after 2 warm-up steps) is
   the comparable GPU figure;
3. ONNX export parity: the exported ONNX in onnxruntime (CPU) against the model on the GPU in fp32 with TF32
   off (recorded);
4. where tensorrt is installed: FP16 and INT8 engines built by `export.to_tensorrt` itself (the converter it
   picks for this TensorRT: ModelOpt or onnxruntime's quantizer, AutoCast or builder flags), timed with
   export.runners.TensorRTRunner, with the TensorRT, CUDA, driver and onnxruntime versions and the precision
   of every layer group of each engine.
fp32 figures carry the TF32 switches they ran under (torch.backends.cuda.matmul / cudnn.allow_tf32).
Without a CUDA GPU it prints one line, ``no CUDA GPU``, and exits 2; ``--cpu-dry-run`` runs the same sections
on the CPU with a tiny model instead (what the tests use). Test-only: ``GPU_CHECK_FAULT=SECTION:raise`` (or
``:hang``, ``:crash``; several comma-separated) makes that section's interpreter fail that way, to test that
the check reports it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path
from typing import Callable, Optional

from deeplab.backbones import backbone_names
from deeplab.cli import command, error_line, on_interrupt
from deeplab.config import ModelConfig, load_config
from deeplab.fileio import ensure_dir, write_text_atomic

from . import to_tensorrt
from .metadata import build_metadata
from .runners import OnnxRunner, TensorRTRunner, engine_precisions, read_sidecar, tensorrt_version

ROOT = Path(__file__).resolve().parents[1]
NO_GPU_EXIT = 2
FAILED_EXIT = 1
FAULT_ENV = "GPU_CHECK_FAULT"  # test-only: SECTION:raise|hang|crash


class Report:
    """One JSON file of every figure, rewritten atomically after each section."""

    def __init__(self, path, budget_s: float):
        self.path, self.budget_s, self.start = Path(path), budget_s, time.monotonic()
        self.data = {"sections": {}, "skipped": {}, "failed": {}}

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def add(self, section: str, figures) -> None:
        self.data["sections"][section] = figures
        self.write()

    def skip(self, section: str, why: str) -> None:
        """An expected gap (no TensorRT here, fp16 in a CPU dry run): the check still passes."""
        self.data["skipped"][section] = why
        print(f"{section}: skipped: {why}", flush=True)
        self.write()

    def fail(self, section: str, why: str) -> None:
        """A section that should have given figures and did not: the check exits non-zero."""
        self.data["failed"][section] = why
        print(f"{section}: FAILED: {why}", flush=True)
        self.write()

    def write(self) -> None:
        ensure_dir(self.path.parent)
        self.data["elapsed_s"] = round(time.monotonic() - self.start, 1)
        write_text_atomic(self.path, json.dumps(self.data, indent=2) + "\n")

    def run(self, section: str, needs_s: float, limit_s: float, argv: list) -> None:
        """Run one section in a fresh interpreter (``python -m export.gpu_check --section ...``), killed (with
        every process it started) at ``limit_s`` or when the budget runs out, whichever comes first; it starts
        only if the budget has ``needs_s`` seconds left. Its figures, a skip, or why it failed are recorded."""
        left = self.left_s()
        if left < needs_s:
            self.fail(section, f"not started: time budget: {max(left, 0):.0f}s left, the section needs about "
                               f"{needs_s:.0f}s")
            return
        timeout = min(limit_s, left)
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="gpu_check_section_") as folder:
            figures_file, stderr_file = Path(folder) / "figures.json", Path(folder) / "stderr.txt"
            cmd = [sys.executable, "-X", "faulthandler", "-m", "export.gpu_check", *argv, "--section", section,
                   "--figures-to", str(figures_file)]  # faulthandler: a crash prints its Python stack to the log
            with open(stderr_file, "w") as err:
                code = run_killing_group(cmd, timeout, err)
            stderr = stderr_file.read_text(errors="replace")
            result = json.loads(figures_file.read_text()) if figures_file.is_file() else {}
        took = time.monotonic() - t0
        if code is None:
            why = "its own limit" if timeout == limit_s else "the time budget"
            self.fail(section, f"killed after {took:.0f}s ({why}: {timeout:.0f}s)")
        elif "error" in result:
            self.fail(section, result["error"])
        elif code != 0 or not ("figures" in result or "skipped" in result):
            said = error_line(RuntimeError(stderr), 300) if stderr.strip() else ""  # a traceback's raised line
            self.fail(section, f"its interpreter {exit_text(code)}" + (f": {said}" if said else ""))
        elif "skipped" in result:
            self.skip(section, result["skipped"])
            return
        else:
            print(f"{section}: done in {took:.0f}s", flush=True)
            self.add(section, result["figures"])
            return
        if stderr.strip():  # what a failed section printed, for whoever reads the log
            print("\n".join(f"  | {line}" for line in stderr.rstrip().splitlines()[-25:]), file=sys.stderr, flush=True)


def run_killing_group(cmd: list, timeout: float, stderr) -> Optional[int]:
    """Run ``cmd`` in its own process group; its exit code, or None when it ran past ``timeout`` seconds and
    was killed with every process it started (DDP ranks, compile workers). A stop of this process kills it too."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, stdout=None, stderr=stderr, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    finally:
        _kill_group(proc)  # also what it left behind (a DataLoader worker) once it exited


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own group (start_new_session): nothing of ours, nothing else
    except ProcessLookupError:
        pass
    proc.wait()


def exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"died of {signal.Signals(-code).name}"
        except ValueError:
            return f"died of signal {-code}"
    return f"exited with code {code}"


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
    argv = list(sys.argv[1:] if argv is None else argv)
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
    p.add_argument("--budget-s", type=float, default=420,
                   help="the whole check's time (default: 420 s, 7 min): a section still running then is killed, "
                        "later ones are not started (both count as failed)")
    p.add_argument("--sections", nargs="+", metavar="NAME", choices=SECTION_NAMES, default=None,
                   help=f"run only these (default: all): {', '.join(SECTION_NAMES)}")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="no GPU needed: every section on the CPU with a tiny model at 65 px (checks the check)")
    p.add_argument("--section", choices=SECTION_NAMES, help=argparse.SUPPRESS)  # one section, in this interpreter
    p.add_argument("--figures-to", type=Path, help=argparse.SUPPRESS)  # where that section writes its result
    args = p.parse_args(argv)
    if args.size < 33 or min(args.batches) < 1 or args.train_batch < 2 or args.repeats < 1 or args.train_steps < 1:
        p.error("--size >= 33, --batches >= 1, --train-batch >= 2 (BatchNorm), --repeats and --train-steps >= 1")
    if args.budget_s <= 0:
        p.error("--budget-s must be > 0")
    if bool(args.section) != bool(args.figures_to):
        p.error("--section and --figures-to go together (the check passes them to each section's interpreter)")
    args.argv = argv  # what each section's interpreter is started with
    if args.cpu_dry_run:
        args.backbone, args.size, args.batches, args.train_batch = "resnet_tiny", 65, [1], 2
        args.repeats, args.train_steps = min(args.repeats, 2), min(args.train_steps, 2)
    args.device = "cpu" if args.cpu_dry_run else "cuda"
    args.output = args.output or default_output()
    return args


# ------------------------------------------------------------------------------------------ sections
def build(backbone: str, output_stride: int):
    from deeplab import build_model

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


def inference(args, variant: str) -> dict:
    """One variant at every batch size."""
    import torch

    mode, dtype_name = INFERENCE_VARIANTS[variant]
    dtype = getattr(torch, dtype_name) if dtype_name else None
    net = build(args.backbone, 8).to(args.device).eval().to(memory_format=torch.channels_last)
    if mode == "compile":  # one static graph per batch size, compiled in the warm-up
        net = torch.compile(net, dynamic=False)
    sync = torch.cuda.synchronize if args.device == "cuda" else None
    out = {}
    for batch in args.batches:
        x = torch.randn(batch, 3, args.size, args.size,
                        device=args.device).contiguous(memory_format=torch.channels_last)

        def call(x=x):
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

    tiny = ["model.backbone=resnet_tiny", "model.aspp_channels=16", "data.crop_size=65", "data.synthetic_size=80",
            "train.batch_size=2"] if args.device == "cpu" else []
    return load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml", [
        f"train.max_iterations={iterations}", f"train.eval_interval={iterations}", f"train.log_interval={iterations}",
        "data.synthetic_val=2", f"data.loader_workers={0 if args.device == 'cpu' else 4}", *tiny]).check()


def train_config(args, amp: str, channels_last: bool, iterations: int):
    """Synthetic --size crops, --train-batch images per step, one evaluation at the end. deeplab's sections only:
    the loop runs here without Ray, its world size is the Worker's (cluster's section is cluster's business)."""

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
        "train.bn_momentum=0.5"]).check()  # a few iterations: running stats must move


def _loop_worker(device, rank: int, world_size: int, keep: Path, resume: Optional[Path], reports: list):
    """deeplab.train_loop's Worker as a runner gives it: SyncBatchNorm converted (DDP across 2+ processes), rank 0's
    checkpoint kept at ``keep``."""

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
    """The exported ONNX in onnxruntime (CPU) against the model in fp32 on --device; on a GPU the reference runs
    with TF32 off (cuDNN allows it by default), and the entry records the switches it ran under."""
    import torch

    from .to_onnx import compare, export_model

    if args.device == "cuda":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    model = build(args.backbone, 8).eval()
    with tempfile.TemporaryDirectory() as d:
        path = export_model(model, Path(d) / "model.onnx", build_metadata(model.config))
        x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            ref = model.to(args.device)(x.to(args.device)).float().cpu().numpy()
        row = compare(ref, OnnxRunner(path, ["CPUExecutionProvider"])(x), x.shape,
                      f"onnxruntime (CPU) vs {args.device.upper()}")
    if args.device == "cuda":
        row["reference_tf32"] = tf32_state()
    return row


def tensorrt_engines(args) -> dict:
    """FP16 and INT8 engines as `python -m export.to_tensorrt` builds them (its converter for this TensorRT, its
    sidecar), each timed and described: converter, parity with the FP32 ONNX, precision of every layer group."""
    import torch

    from .to_onnx import export_model

    model = build(args.backbone, 8).eval()
    shape = (1, 3, args.size, args.size)
    text = "x".join(map(str, shape))
    out = {"versions": versions()}
    with tempfile.TemporaryDirectory() as d:
        onnx_path = export_model(model, Path(d) / "model.onnx", build_metadata(model.config))
        for precision in ("fp16", "int8"):
            engine = Path(d) / f"model.{precision}.engine"
            code = to_tensorrt.main([str(onnx_path), "-o", str(engine), "--precision", precision, "--min-shape", text,
                                     "--opt-shape", text, "--max-shape", text, "--calib-images", "8"])
            if code != 0:
                raise RuntimeError(f"python -m export.to_tensorrt --precision {precision} exited {code}")
            sidecar, runner = read_sidecar(engine), TensorRTRunner(engine)
            x = torch.randn(*shape, device="cuda")
            row = measure(lambda runner=runner, x=x: runner(x), warmup=5, repeats=args.repeats,
                          sync=torch.cuda.synchronize)
            row.update(converter={k: sidecar[k] for k in ("build_path", "int8_quantizer", "int8_other_layers", "tf32")
                                  if k in sidecar},
                       parity=sidecar.get("parity"), layer_precisions=engine_precisions(runner.engine),
                       engine_mib=engine.stat().st_size / 2**20)
            out[precision] = row
            print(f"  tensorrt {precision}: {row['median_ms']:.2f} ms", flush=True)
    return out


def package_version(name: str) -> Optional[str]:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def driver_version() -> Optional[str]:
    """The NVIDIA driver's version (nvidia-smi, else /proc/driver/nvidia/version), None without one."""
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        return Path("/proc/driver/nvidia/version").read_text().partition("\n")[0].strip() or None
    except OSError:
        return None


def versions() -> dict:
    """What GPU figures depend on: torch and its CUDA and cuDNN, the driver, TensorRT, onnxruntime (its build's
    providers), ModelOpt (which converter to_tensorrt picks)."""
    import torch

    try:
        import onnxruntime as ort

        onnxruntime = {"version": ort.__version__, "providers": list(ort.get_available_providers())}
    except Exception as e:
        onnxruntime = {"version": None, "error": error_line(e, 200, with_type=True)}
    onnxruntime["wheel"] = "onnxruntime-gpu" if package_version("onnxruntime-gpu") else "onnxruntime"
    return {"torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "driver": driver_version(), "tensorrt": tensorrt_version(), "onnxruntime": onnxruntime,
            "modelopt": package_version("nvidia-modelopt")}


def environment(args) -> dict:
    import torch

    if args.device == "cpu":
        return {"gpu": None, "dry_run": "cpu: every section on the CPU, tiny model", "versions": versions(),
                "backbone": args.backbone, "size": args.size}
    return {"gpu": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(),
            "capability": ".".join(map(str, torch.cuda.get_device_capability())), "versions": versions(),
            "backbone": args.backbone, "size": args.size, "tf32": tf32_state()}


@dataclass(frozen=True)
class Section:
    """One section: ``run(args) -> figures`` in its own interpreter, started only with ``needs_s`` of the budget
    left and killed after ``limit_s``; ``cpu_skip``: why a CPU dry run leaves it out (an expected skip)."""

    name: str
    needs_s: float
    limit_s: float
    run: Callable[[argparse.Namespace], dict]
    cpu_skip: Optional[str] = None


def _inference(variant: str) -> Section:
    slow = variant.startswith("compile")
    return Section(f"inference_{variant}", 60 if slow else 30, 180 if slow else 120,
                   lambda args: inference(args, variant),
                   "cpu dry run: fp16 autocast is a GPU variant" if variant == "eager_fp16" else None)


def _training(variant: str) -> Section:
    return Section(f"training_{variant}", 45, 150, lambda args: training(args, variant),
                   "cpu dry run: fp16 with GradScaler needs CUDA" if TRAIN_VARIANTS[variant][0] == "fp16" else None)


def _tensorrt(args) -> dict:
    if find_spec("tensorrt") is None:
        return {"skipped": "tensorrt is not installed here"}  # installed but broken: its import fails the section
    return {"figures": tensorrt_engines(args)}


SECTIONS = [Section("environment", 5, 60, environment),
            *[_inference(v) for v in INFERENCE_VARIANTS if not v.startswith("compile")],
            *[_training(v) for v in TRAIN_VARIANTS],
            Section("onnx_parity", 60, 180, onnx_parity),
            _inference("compile_bf16"),
            Section("tensorrt", 120, 360, _tensorrt, "cpu dry run")]
SECTION_NAMES = [s.name for s in SECTIONS]
RESULT_OF = {"tensorrt"}  # sections whose run() returns {"figures": ...} or {"skipped": why} itself


def fault(section: str) -> None:
    """Test-only (GPU_CHECK_FAULT=SECTION:raise|hang|crash[,SECTION:...]): make this section fail as a real one
    can (an error, a hang, a crash of the interpreter)."""
    faults = dict(item.partition(":")[::2] for item in os.environ.get(FAULT_ENV, "").split(",") if item)
    how = faults.get(section)
    if how is None:
        return
    if how == "hang":
        time.sleep(24 * 3600)
    if how == "crash":
        os.abort()
    raise RuntimeError(f"made to fail by {FAULT_ENV}")


def run_one(args) -> int:
    """The interpreter of one section: its figures (or skip) to --figures-to; an error there too, exit 1."""
    section = next(s for s in SECTIONS if s.name == args.section)
    import torch

    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes throughout
    try:
        fault(section.name)
        result = section.run(args) if section.name in RESULT_OF else {"figures": section.run(args)}
    except Exception as e:  # the parent records it; the traceback goes to stderr for the log
        traceback.print_exc()
        write_text_atomic(args.figures_to, json.dumps({"error": error_line(e, 300, with_type=True)}))
        return FAILED_EXIT
    write_text_atomic(args.figures_to, json.dumps(result))
    return 0


def run_sections(args, report: Report) -> None:
    """Each section in its own interpreter, in order; one failing keeps the others."""
    for section in SECTIONS:
        if args.sections and section.name not in args.sections:
            continue
        if args.device == "cpu" and section.cpu_skip:
            report.skip(section.name, section.cpu_skip)
        else:
            report.run(section.name, section.needs_s, section.limit_s, args.argv)


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.section:
        return run_one(args)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU", file=sys.stderr)
        return NO_GPU_EXIT
    on_interrupt(f"{args.output} keeps every section finished; a rerun measures them all again")
    report = Report(args.output, args.budget_s)
    report.write()
    run_sections(args, report)
    failed = report.data["failed"]
    print(f"wrote {args.output} ({report.data['elapsed_s']:.0f}s); "
          + (f"{len(failed)} section(s) FAILED: {', '.join(failed)}" if failed else "no section failed"))
    return FAILED_EXIT if failed else 0


if __name__ == "__main__":
    sys.exit(main())
