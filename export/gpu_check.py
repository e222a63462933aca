"""A prepared GPU check (``make gpu-check``): every GPU figure this project quotes, from one command that
fits in under 8 minutes on one GPU machine with CUDA torch, onnx and onnxruntime (CPU), without Ray and
without TensorRT (the case of a lent GPU machine).

    python -m export.gpu_check                  # writes $OUT/gpu_check.json (else runs/gpu_check.json)

Sections, each timed with CUDA synchronization, written to the JSON as soon as it is done (a run cut short
keeps what it measured), skipped with a reason when the time budget (--budget-s) is spent:
1. inference, R-101 (--backbone) at output stride 8, --size 513, batch 1 and 8: eager fp32, fp16 and bf16
   autocast (channels_last), torch.compile (inductor) in bf16: median latency and images/s;
2. training steps of the full model at --size crops with torch.nn.SyncBatchNorm in a process group of 1
   (nccl): fp32, and AMP bf16 + channels_last: images/s;
3. ONNX export parity: the exported ONNX in onnxruntime (CPU) against the model on the GPU;
4. where tensorrt imports: FP16 and INT8 engines built and timed with export.runtime.TensorRTRunner.
Without a CUDA GPU it prints one line, ``no CUDA GPU``, and exits 2.
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
            self.skip(section, f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}")
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
    p.add_argument("--backbone", default="resnet101", choices=["resnet50", "resnet101", "resnet152"])
    p.add_argument("--size", type=int, default=513, help="image side for inference and training crops")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="inference batch sizes")
    p.add_argument("--train-batch", type=int, default=8, help="training images per step")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per inference variant")
    p.add_argument("--train-steps", type=int, default=10, help="timed training steps per variant")
    p.add_argument("--budget-s", type=float, default=420, help="stop starting sections after this (default 7 min)")
    args = p.parse_args(argv)
    if args.size < 33 or min(args.batches) < 1 or args.train_batch < 2 or args.repeats < 1 or args.train_steps < 1:
        p.error("--size >= 33, --batches >= 1, --train-batch >= 2 (BatchNorm), --repeats and --train-steps >= 1")
    args.output = args.output or default_output()
    return args


# ------------------------------------------------------------------------------------------ sections
def build(backbone: str, output_stride: int):
    from deeplab import build_model
    from deeplab.config import ModelConfig

    return build_model(ModelConfig(backbone=backbone, num_classes=21, output_stride=output_stride))


def inference(args) -> dict:
    import torch

    model = build(args.backbone, 8).cuda().eval().to(memory_format=torch.channels_last)
    compiled = torch.compile(model, dynamic=False)  # one static graph per batch size, compiled in the warm-up
    variants = {"eager_fp32": (model, None), "eager_fp16": (model, torch.float16),
                "eager_bf16": (model, torch.bfloat16), "compile_bf16": (compiled, torch.bfloat16)}
    out = {}
    for batch in args.batches:
        x = torch.randn(batch, 3, args.size, args.size, device="cuda").contiguous(memory_format=torch.channels_last)
        for name, (net, dtype) in variants.items():
            def call():
                with torch.inference_mode(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                    net(x)

            m = measure(call, warmup=3, repeats=args.repeats, sync=torch.cuda.synchronize)
            m["images_per_s"] = 1000 * batch / m["median_ms"]
            out[f"{name}_batch{batch}"] = m
            print(f"  {name} batch {batch}: {m['median_ms']:.1f} ms, {m['images_per_s']:.1f} images/s", flush=True)
    return out


def _process_group_of_one() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        store = tempfile.NamedTemporaryFile(prefix="gpu_check_pg_", delete=False).name
        dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)


def train_steps(args, dtype, memory_format) -> dict:
    """Images/s of SGD steps on the full model with SyncBatchNorm (the process group of one) on the GPU."""
    import torch

    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(build(args.backbone, 16)).cuda().train()
    model = model.to(memory_format=memory_format)
    opt = torch.optim.SGD(model.parameters(), lr=0.007, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(args.train_batch, 3, args.size, args.size, device="cuda").contiguous(memory_format=memory_format)
    y = torch.randint(0, 21, (args.train_batch, args.size, args.size), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    torch.cuda.reset_peak_memory_stats()
    m = measure(step, warmup=3, repeats=args.train_steps, sync=torch.cuda.synchronize)
    m["images_per_s"] = 1000 * args.train_batch / m["median_ms"]
    m["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return m


def training(args) -> dict:
    import torch

    _process_group_of_one()
    out = {}
    for name, dtype, memory_format in (("fp32", None, torch.contiguous_format),
                                       ("amp_bf16_channels_last", torch.bfloat16, torch.channels_last)):
        out[name] = train_steps(args, dtype, memory_format)
        torch.cuda.empty_cache()
        print(f"  train {name}: {out[name]['images_per_s']:.1f} images/s", flush=True)
    return out


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
            ref = model.cuda()(x.cuda()).float().cpu().numpy()
        return compare(ref, OnnxRunner(path, ["CPUExecutionProvider"])(x), x.shape, "onnxruntime (CPU) vs CUDA")


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


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU", file=sys.stderr)
        return NO_GPU_EXIT
    report = Report(args.output, args.budget_s)
    report.add("environment", {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(),
                               "capability": ".".join(map(str, torch.cuda.get_device_capability())),
                               "backbone": args.backbone, "size": args.size})
    torch.backends.cudnn.benchmark = True
    report.run("inference", 150, lambda: inference(args))
    report.run("training", 90, lambda: training(args))
    report.run("onnx_parity", 90, lambda: onnx_parity(args))
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        report.skip("tensorrt", "tensorrt is not importable here")
    else:
        report.run("tensorrt", 150, lambda: tensorrt_engines(args))
    print(f"wrote {args.output} ({report.data['elapsed_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
