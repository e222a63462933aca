"""Benchmark every inference backend this machine has, on the same input, and their accuracy next to speed.

    python export/bench.py --checkpoint best.ckpt               # output stride 8, 513x513, batch 1
    python export/bench.py --set model.backbone=resnet101 --repeats 5 --batch 1 2
    python export/bench.py --set model.backbone=mobilenet_v3_large --compare-backbone resnet101 --backends torch_fp32

Backends: PyTorch eager (fp32, channels_last, bf16 autocast NCHW/NHWC where the CPU has native bf16;
CUDA fp32/fp16 when there is a GPU), torch.compile (inductor, frozen weights), onnxruntime (CPU fp32, INT8
Q/DQ with 8-bit and 7-bit weights; CUDA and TensorRT providers where they load), OpenVINO (FP32 IR at f32
and, with native bf16, bf16; NNCF INT8 IR; the Q/DQ ONNX) and TensorRT engines given with --engine. Each is
warmed up, then all are timed interleaved (one call each per round, the order rotating) so a noisy shared
machine slows them alike. Every backend is timed from its input on its device to its output on its device
(GPU backends: the input is copied to the GPU untimed, onnxruntime's through I/O binding; each row's "timed"
says so). Reported per backend and batch size: latency min/median/p90/p99, images/s, peak memory measured the
same way for every backend of a device (CPU: process RSS; GPU: device memory in use as the driver reports it,
cudaMemGetInfo, which sees TensorRT's and onnxruntime's allocations as well as torch's) and what one call adds
to it (in use during the call minus just before), GFLOP/s of the
FLOPs no engine can skip (products with zero padding left out) and as a share (%limit) of this CPU's peak for
its arithmetic (fp32, bf16, int8: an upper bound from the instruction set, cores and clock, export.cpu's
peak_limits; GEMMs measured in the same run are reported against it), the median ratio to eager fp32 and,
on labelled validation images, mIoU and pixel agreement with fp32. The CPU's VNNI/bf16/AMX are detected and
reported. Prints a table, writes bench.json and bench.png; says what it skipped and why.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):  # `python export/bench.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataclasses import replace

import numpy as np
import torch

from deeplab import ModelConfig, build_model, load_checkpoint
from deeplab.backbones import backbone_names
from deeplab.cli import UserError, command, error_line, on_interrupt
from deeplab.config import Alias, add_config_args, config_from_args
from deeplab.data import DatasetError
from deeplab.fileio import atomic_path, ensure_dir, write_text_atomic
from export.cli import show_progress
from export.cpu import cpu_features, has_native_bf16, measured_limits, peak_limits
from export.metadata import build_metadata, read_metadata
from export.model_file import format_of
from export.runners import (
    EngineError,
    OnnxRunner,
    OpenVINORunner,
    TensorRTRunner,
    available_providers,
    read_sidecar,
    trt_provider_options,
)
from export.to_openvino import convert, quantize

log = logging.getLogger("export.bench")  # also when run as a script (__name__ is then "__main__")

# ------------------------------------------------------------------------------------------ measuring
def count_flops(model: torch.nn.Module, size: int) -> int:
    """FLOPs of one forward pass on one size x size image (a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(model).to("meta")  # shapes only: no arithmetic, so R-101 at 513 counts in a blink
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        meta(torch.zeros(1, 3, size, size, device="meta"))
    return int(counter.get_total_flops())


def taps_inside(size_in: int, size_out: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Along one axis of a convolution: the (output position, kernel tap) pairs whose input falls inside the
    image. A tap that reads zero padding needs no arithmetic, and engines skip it (an atrous rate larger
    than the feature map leaves only the centre tap)."""
    count = 0
    for tap in range(kernel):
        offset = tap * dilation - padding  # input index = output index * stride + offset
        first = max(0, -(offset // stride))  # ceil(-offset / stride)
        last = min(size_out - 1, (size_in - 1 - offset) // stride)
        count += max(0, last - first + 1)
    return count


def required_flops(model: torch.nn.Module, size: int) -> int:
    """FLOPs of one forward pass that no engine can avoid: `count_flops` less every convolution's products
    with zero padding (bench's GFLOP/s and %limit use this count, so skipping padding cannot pass 100%)."""
    from torch.utils.flop_counter import FlopCounterMode

    saved = []

    def hook(conv, inputs, output):
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            return
        (_, _, h, w), (_, c_out, oh, ow) = inputs[0].shape, output.shape
        per_pair = 2 * conv.in_channels // conv.groups * c_out * output.shape[0]
        inside = (taps_inside(h, oh, conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0])
                  * taps_inside(w, ow, conv.kernel_size[1], conv.stride[1], conv.padding[1], conv.dilation[1]))
        saved.append(per_pair * (conv.kernel_size[0] * conv.kernel_size[1] * oh * ow - inside))

    meta = copy.deepcopy(model).to("meta")
    for m in meta.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(hook)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        meta(torch.zeros(1, 3, size, size, device="meta"))
    return int(counter.get_total_flops()) - sum(saved)


def percentile(values, q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def latency_stats(seconds: list) -> dict:
    ms = [1000 * s for s in seconds]
    return {"n": len(ms), "min_ms": min(ms), "median_ms": statistics.median(ms), "p90_ms": percentile(ms, 90),
            "p99_ms": percentile(ms, 99), "mean_ms": statistics.fmean(ms)}


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def device_used_bytes() -> int:
    """GPU memory in use now, as the driver reports it (total - free, cudaMemGetInfo): every allocator's,
    torch's caching allocator, TensorRT's execution context and onnxruntime's arenas alike."""
    free, total = torch.cuda.mem_get_info()
    return total - free


class PeakMemory:
    """Samples ``read()`` (bytes in use) every few ms in a thread while active: the level just before (``start``)
    and the peak reached during a backend's call."""

    def __init__(self, read: Callable[[], int], interval: float = 0.005):
        self.read, self.interval, self.peak, self._stop = read, interval, 0, threading.Event()

    def __enter__(self):
        self.start = self.peak = self.read()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.read())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


class PeakRSS(PeakMemory):
    """This process's RSS (the CPU backends' memory)."""

    def __init__(self, interval: float = 0.005):
        super().__init__(rss_bytes, interval)


MEMORY = {"cpu": "process RSS", "cuda": "GPU memory in use (driver: cudaMemGetInfo, whole device)"}


# ------------------------------------------------------------------------------------------ backends
@dataclass
class Backend:
    """`prepare(x)` turns the fp32 NCHW CPU batch into this backend's input (untimed); `run(prepared)` is
    timed and must return when the result is ready; `logits(x)` returns fp32 CPU logits for accuracy."""

    name: str
    prepare: Callable
    run: Callable
    device: str = "cpu"
    note: str = ""
    logits: Optional[Callable] = None
    kind: str = "fp32"  # the arithmetic it mostly runs (fp32 | bf16 | int8): which machine limit it is held to
    refuses: Optional[Callable] = None  # refuses(shape) -> why it cannot run an input of that shape, or None
    model: Optional[str] = None  # another backbone than the subject's (--compare-backbone): its own FLOPs
    flops: Optional[int] = None
    timed: str = ""  # what its time includes; "" = from its input on its device to its output on its device

    def __post_init__(self):
        self.timed = self.timed or (f"{self.device.upper()} input to {self.device.upper()} output"
                                    + (" (input copied to the GPU untimed)" if self.device == "cuda" else ""))


class Skip(Exception):
    """A backend this machine cannot run; the message says why."""


def torch_backends(model, cuda: bool, bf16: bool = True) -> list:
    """Eager PyTorch variants: fp32, channels_last, bf16 autocast (CPU), and fp32/fp16 on CUDA."""
    out = []
    cl = torch.channels_last

    def make(name, net, dtype=None, memory_format=torch.contiguous_format, device="cpu", note="", kind="fp32"):
        def prepare(x):
            return x.to(device).contiguous(memory_format=memory_format)

        def run(x):
            with torch.inference_mode(), torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                y = net(x)
            if device == "cuda":
                torch.cuda.synchronize()
            return y

        return Backend(name, prepare, run, device, note, lambda x: run(prepare(torch.as_tensor(x))).float().cpu(), kind)

    out.append(make("torch_fp32", model, note="eager, NCHW"))
    model_cl = copy.deepcopy(model).to(memory_format=cl)
    out.append(make("torch_channels_last", model_cl, memory_format=cl, note="eager, NHWC"))
    if bf16:
        out.append(make("torch_bf16", model, torch.bfloat16, note="autocast bf16, NCHW", kind="bf16"))
        out.append(make("torch_bf16_channels_last", model_cl, torch.bfloat16, memory_format=cl,
                        note="autocast bf16, NHWC", kind="bf16"))
    if cuda:
        gpu = copy.deepcopy(model).cuda()
        tf32 = "on" if torch.backends.cudnn.allow_tf32 else "off"  # cuDNN's default: fp32 convolutions as TF32
        out.append(make("cuda_fp32", gpu, device="cuda", note=f"eager on GPU, TF32 convolutions {tf32}"))
        out.append(make("cuda_fp16", gpu, torch.float16, device="cuda", note="autocast fp16 on GPU"))
    return out


def backbone_backends(cfg, names: list) -> list:
    """Eager fp32 rows for other backbones (same head, output stride and size, random weights, which time as
    trained ones): their speed next to the subject's, in the same interleaved rounds."""

    from export.to_onnx import prepare_model

    out = []
    for name in names:
        model = prepare_model(build_model(ModelConfig(**{**cfg.model.__dict__, "backbone": name})),
                              cfg.export.output_stride)
        params = sum(p.numel() for p in model.parameters())
        fp32 = torch_backends(model, cuda=False, bf16=False)[0]
        out.append(replace(fp32, name=f"torch_fp32_{name}", note=f"eager, NCHW, {name} ({params / 1e6:.1f}M params)",
                           logits=None, model=name, flops=required_flops(model, cfg.export.image_size)))
    return out


def compiled_backend(model) -> Backend:
    """torch.compile (inductor, CPU) with frozen weights (constant-folded, prepacked for oneDNN); compiled at
    the first (warm-up) call of each input shape."""
    import torch._inductor.config as inductor

    inductor.freezing = True
    net = torch.compile(copy.deepcopy(model).to(memory_format=torch.channels_last), backend="inductor")

    def run(x):
        with torch.inference_mode():
            return net(x)

    def prepare(x):
        return x.contiguous(memory_format=torch.channels_last)

    return Backend("torch_compile", prepare, run, note="torch.compile inductor, frozen, NHWC",
                   logits=lambda x: run(prepare(torch.as_tensor(x))).float())


def ort_backend(name: str, onnx_path, provider: str, note: str, kind: str = "fp32",
                options: Optional[dict] = None) -> Backend:
    """onnxruntime with one provider. A GPU provider runs through I/O binding: its input copied to the GPU
    untimed (as torch's and TensorRT's are) and its output left there, so its time is device to device."""

    if provider not in available_providers():
        raise Skip(f"onnxruntime has no {provider} (available: {', '.join(available_providers())}; "
                   "GPU providers come with onnxruntime-gpu)")
    try:
        runner = OnnxRunner(onnx_path, [provider], threads=torch.get_num_threads(),  # as many threads as torch
                            provider_options={provider: options} if options else None)
    except Exception as e:
        raise Skip(f"{provider} did not load {Path(onnx_path).name}: {error_line(e)}") from None
    if runner.providers[0] != provider:
        raise Skip(f"{provider} fell back to {runner.providers[0]}")
    session, input_name = runner.session, runner.input_name
    def logits(x):
        return torch.from_numpy(runner(x))

    if provider == "CPUExecutionProvider":
        return Backend(name, prepare=lambda x: {input_name: np.ascontiguousarray(x.numpy(), np.float32)},
                       run=lambda feed: session.run(None, feed), note=note, logits=logits, kind=kind)

    def run_bound(binding):
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()  # returns when the logits are on the device, as the other GPU rows do

    return Backend(name, prepare=lambda x: runner.bind(x.numpy(), "cuda"), run=run_bound, device="cuda", note=note,
                   logits=logits, kind=kind, timed="GPU input to GPU output (I/O binding; input copied to the GPU "
                                                   "untimed)")


def trt_backend(engine_path) -> Backend:
    try:
        runner = TensorRTRunner(engine_path)
    except (EngineError, ImportError) as e:
        raise Skip(str(e)) from None
    sidecar = read_sidecar(engine_path)
    return Backend(f"tensorrt_{Path(engine_path).stem}", prepare=lambda x: x.cuda(), run=runner, device="cuda",
                   note=f"TensorRT engine ({sidecar.get('precision', '?')})",
                   logits=lambda x: runner(torch.as_tensor(x)).float().cpu(),
                   refuses=lambda shape: TensorRTRunner.outside_profile(sidecar, shape))


def _shape_text(shape) -> str:
    return "x".join(map(str, tuple(shape)))


def runnable(backends: list, shapes: list, skipped: dict, what: str) -> list:
    """The backends that accept every input shape; the others are recorded in `skipped` with the reason (an
    engine's optimization profile): one out-of-profile input must not cost the whole run its figures."""
    keep = []
    for b in backends:
        why = next(((shape, r) for shape in shapes if (r := b.refuses and b.refuses(shape))), None)
        if why is None:
            keep.append(b)
        else:
            skipped[f"{b.name} {what}"] = f"input {_shape_text(why[0])}: {why[1]}"
    return keep


# ------------------------------------------------------------------------------------------ the run
def interleaved(backends: list, inputs: dict, repeats: int, warmup: int) -> dict:
    """Time each backend `repeats` times, one call per backend per round, order rotating each round."""
    times = {b.name: [] for b in backends}
    peaks = {b.name: 0 for b in backends}
    extra = {b.name: 0 for b in backends}  # memory the call itself needs above what was resident before
    for b in backends:
        for _ in range(warmup):
            b.run(inputs[b.name])
    for r in range(repeats):
        k = r % len(backends)
        for b in backends[k:] + backends[:k]:
            with PeakMemory(device_used_bytes if b.device == "cuda" else rss_bytes) as mem:  # the same for all
                t0 = time.perf_counter()
                b.run(inputs[b.name])
                times[b.name].append(time.perf_counter() - t0)
            peaks[b.name] = max(peaks[b.name], mem.peak)
            extra[b.name] = max(extra[b.name], mem.peak - mem.start)
        log.info(f"  round {r + 1}/{repeats}: "
                 + ", ".join(f"{b.name} {1000 * times[b.name][-1]:.0f} ms" for b in backends))
    return {"times": times, "peak_bytes": peaks, "extra_bytes": extra}


def accuracy(backends: list, batches: list, num_classes: int, ignore_index: int) -> dict:
    """mIoU of each backend on labelled batches, its change and pixel agreement against the first (fp32)."""
    from export.precision import accuracy_report

    reference = backends[0].name
    report = accuracy_report({b.name: b.logits for b in backends if b.logits is not None}, batches, num_classes,
                             ignore_index, reference=reference)
    base = report[reference]["miou"]
    return {name: {"miou": r["miou"], "agreement": r["agreement"], "miou_change": r["miou"] - base}
            for name, r in report.items()}


def summarize(runs: dict, flops: int, backends: list, batch: int, reference: str = "torch_fp32",
              limits: Optional[dict] = None) -> list:
    """One row per backend; `limit_share` is its GFLOP/s over this CPU's peak for its kind of arithmetic (an
    upper bound, export.cpu.peak_limits; CPU backends only)."""
    rows, limits = [], limits or {}
    ref_med = statistics.median(runs["times"][reference]) if reference in runs["times"] else None
    for b in backends:
        t = runs["times"][b.name]
        s = latency_stats(t)
        med = s["median_ms"] / 1000
        # ratio of medians of per-round ratios: robust to rounds where the whole machine was slow
        if ref_med is not None:
            per_round = [a / r for a, r in zip(t, runs["times"][reference])]
            s["speedup_vs_fp32"] = 1 / statistics.median(per_round)
        s.update(backend=b.name, note=b.note, device=b.device, batch=batch, images_per_s=batch / med,
                 gflops_per_s=(b.flops or flops) * batch / med / 1e9, peak_mib=runs["peak_bytes"][b.name] / 2**20,
                 call_mib=runs["extra_bytes"][b.name] / 2**20, memory=MEMORY[b.device], timed=b.timed, kind=b.kind)
        if b.device == "cpu" and limits.get(b.kind):
            s["limit_share"] = s["gflops_per_s"] / limits[b.kind]
        if b.model:
            s["model"] = b.model
        rows.append(s)
    return rows


def recommend(rows: list, acc: dict, max_drop: float, device: str = "cpu") -> Optional[str]:
    """The fastest backend on `device` (by median speed-up at the first batch size) whose mIoU change, where
    measured, is no worse than -max_drop."""
    first = min(r["batch"] for r in rows)
    ok = [r for r in rows if r["batch"] == first and r["device"] == device and "speedup_vs_fp32" in r
          and "model" not in r  # another backbone's row (--compare-backbone) is no path for this model
          and (acc.get(r["backend"], {}).get("miou_change") is None
               or acc[r["backend"]]["miou_change"] >= -max_drop)]
    if not ok:
        return None
    best = max(ok, key=lambda r: r["speedup_vs_fp32"])
    change = acc.get(best["backend"], {}).get("miou_change")
    return (f"fastest {device.upper()} path within {max_drop} mIoU of fp32: {best['backend']} "
            f"({best['speedup_vs_fp32']:.2f}x eager fp32 at batch {first}, median {best['median_ms']:.0f} ms; "
            + (f"mIoU change {change:+.2f})" if change is not None else "accuracy not measured)"))


def describe_limits(peak: dict, measured: dict) -> str:
    """The %limit column's denominators and how they were found, with what GEMMs reached of them."""
    kinds = [k for k in ("fp32", "bf16", "int8") if k in peak]
    if not kinds:
        return f"no peak known for this CPU ({peak.get('clock_source')}, no vector unit recognized): %limit left out"
    per_cycle = "/".join(str(peak["ops_per_cycle"][k]) for k in kinds)
    reached = ", ".join(f"{k} {measured[k]:.0f} ({100 * measured[k] / peak[k]:.0f}%)" for k in kinds if k in measured)
    return ("peak, the %limit column's upper bound (G(FL)OP/s): " + ", ".join(f"{k} {peak[k]:.0f}" for k in kinds)
            + f" = {peak['cores']} core(s) x {per_cycle} {'/'.join(kinds)} operations per cycle x "
            f"{peak['clock_ghz']:.2f} GHz [{peak['clock_source']}]; GEMMs measured now reach {reached}")


def format_table(rows: list, acc: dict) -> str:
    head = (f"{'backend':<26}{'batch':>5}{'min ms':>9}{'median':>9}{'p90':>9}{'p99':>9}{'img/s':>8}"
            f"{'GFLOP/s':>9}{'%limit':>7}{'peak MiB':>9}{'+MiB':>7}{'x fp32':>8}{'mIoU':>7}{'dmIoU':>7}{'agree%':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        a = acc.get(r["backend"], {})
        mi = f"{a['miou']:.2f}" if "miou" in a else "-"
        dm = f"{a['miou_change']:+.2f}" if a.get("miou_change") is not None else "-"
        ag = f"{100 * a['agreement']:.2f}" if "agreement" in a else "-"
        sp = f"{r['speedup_vs_fp32']:.2f}" if "speedup_vs_fp32" in r else "-"
        share = f"{100 * r['limit_share']:.0f}" if "limit_share" in r else "-"
        lines.append(f"{r['backend']:<26}{r['batch']:>5}{r['min_ms']:>9.1f}{r['median_ms']:>9.1f}{r['p90_ms']:>9.1f}"
                     f"{r['p99_ms']:>9.1f}{r['images_per_s']:>8.2f}{r['gflops_per_s']:>9.1f}{share:>7}"
                     f"{r['peak_mib']:>9.0f}{r['call_mib']:>7.0f}{sp:>8}{mi:>7}{dm:>7}{ag:>8}")
    return "\n".join(lines)


def plot(rows: list, path, title: str) -> None:
    """Median latency per backend (bars, p90 whiskers), one group per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["backend"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names) * len(batches)), 4.5))
    width = 0.8 / len(batches)
    for j, bsz in enumerate(batches):
        sel = {r["backend"]: r for r in rows if r["batch"] == bsz}
        xs = [i + j * width for i, n in enumerate(names) if n in sel]
        med = [sel[n]["median_ms"] / bsz for n in names if n in sel]
        err = [(sel[n]["p90_ms"] - sel[n]["median_ms"]) / bsz for n in names if n in sel]
        ax.bar(xs, med, width, yerr=[[0] * len(err), err], capsize=3, label=f"batch {bsz}")
    ax.set_xticks([i + width * (len(batches) - 1) / 2 for i in range(len(names))])
    ax.set_xticklabels(names, rotation=25, ha="right")
    ax.set_ylabel("median latency per image (ms), whisker p90")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ CLI
ALIASES = [Alias("--output-stride", "export.output_stride", "inference output stride"),
           Alias("--size", "export.image_size", "square image side"),
           Alias("--calib-images", "export.calib_images", "calibration images for the INT8 ONNX"),
           Alias("--accuracy-images", "export.accuracy_images",
                 "labelled val images for mIoU / agreement per backend (0: skip)")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python export/bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="DeepLabv3 checkpoint (default: the config's model with random weights)")
    add_config_args(p, aliases=ALIASES)
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per batch size (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per backend first (default 1)")
    p.add_argument("--backends", help="comma-separated subset of backend names to run (default: all available)")
    p.add_argument("--onnx", help="FP32 ONNX to use (default: exported from the model into --out)")
    p.add_argument("--int8-onnx", help="INT8 Q/DQ ONNX to use (default: quantized from the FP32 ONNX)")
    p.add_argument("--openvino-int8", metavar="MODEL.xml",
                   help="INT8 IR to use, e.g. from export.to_openvino (default: NNCF on the FP32 IR, "
                   "no accuracy control)")
    p.add_argument("--engine", action="append", default=[],
                   help="a TensorRT engine you built, with its .engine.json sidecar (repeatable; default: none, "
                   "no TensorRT row)")
    p.add_argument("--compare-backbone", nargs="+", default=[], choices=backbone_names(real_only=True),
                   metavar="NAME", help="also time eager fp32 of the same model with these backbones (default: "
                   "none; random "
                   f"weights), interleaved with the rest: {', '.join(backbone_names(real_only=True))}")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", default="runs/bench",
                   help="folder for bench.json, bench.png and the ONNX files (default: runs/bench)")
    return p.parse_args(argv)


def load_subject(args) -> tuple:
    """(model in eval mode at the benchmark's output stride, experiment config): the checkpoint's model and,
    unless --config says otherwise, its own experiment; else the config's model with random weights."""

    from export.to_onnx import prepare_model

    ckpt = load_checkpoint(args.checkpoint) if args.checkpoint else None
    cfg = config_from_args(args, base=ckpt.experiment if ckpt is not None else None)
    if args.repeats < 1 or any(b < 1 for b in args.batch):
        raise UserError("--repeats and --batch must be >= 1")
    model = ckpt.model if ckpt is not None else build_model(cfg.model)
    return prepare_model(model, cfg.export.output_stride), cfg


class Artifacts:
    """The model files the onnxruntime and OpenVINO backends run, each made once on first use (into --out)."""

    def __init__(self, model, cfg, args):
        self.model, self.cfg, self.args = model, cfg, args
        self.out, self.stem = Path(args.out), f"model_os{cfg.export.output_stride}"
        self._int8 = {}

    @functools.cached_property
    def onnx(self) -> Path:
        from export.to_onnx import export_model

        if self.args.onnx:
            return Path(self.args.onnx)
        path = self.out / f"{self.stem}.onnx"
        log.info(f"exporting {path} (dynamic shapes)...")
        return export_model(self.model, path, build_metadata(self.model.config), torch.randn(2, 3, 65, 65))

    @functools.cached_property
    def calib(self) -> list:
        from export.samples import calibration_images

        n, size, data = self.cfg.export.calib_images, self.cfg.export.image_size, self.cfg.data
        try:
            calib, source = calibration_images(data, n, size), f"{data.dataset} train images"
        except DatasetError:
            calib, source = [torch.randn(1, 3, size, size).numpy() for _ in range(n)], "random noise (no dataset)"
        log.info(f"INT8 calibration on {len(calib)} {source}")
        return calib

    def int8_onnx(self, reduce_range: bool) -> Path:
        """The INT8 Q/DQ ONNX with 8-bit weights or, with `reduce_range`, 7-bit ones (--int8-onnx: that file)."""
        from export.precision import quantize_int8

        if self.args.int8_onnx:
            return Path(self.args.int8_onnx)
        if reduce_range not in self._int8:
            path = self.out / f"{self.stem}.int8{'.rr' if reduce_range else ''}.onnx"
            self._int8[reduce_range] = quantize_int8(self.onnx, path, self.calib, reduce_range=reduce_range)
        return self._int8[reduce_range]

    @functools.cached_property
    def ir(self):
        return convert(self.onnx, read_metadata(self.onnx))

    @functools.cached_property
    def ir_int8(self):
        if self.args.openvino_int8:  # opened as every command opens an IR: its .bin checked, one-line errors
            if format_of(self.args.openvino_int8).name != "openvino":
                raise UserError(f"--openvino-int8 {self.args.openvino_int8}: not an OpenVINO IR (.xml)")
            return OpenVINORunner(self.args.openvino_int8).model
        return quantize(self.ir, self.calib, None, self.cfg.export.max_int8_miou_drop,
                        self.model.config.num_classes)[0]


def onnx_backends(files: Artifacts, wanted: Callable, skipped: dict, shapes: Optional[list] = None) -> list:
    """onnxruntime backends: the FP32 ONNX, its INT8 Q/DQ twins (8-bit and 7-bit weights: this CPU's choice is
    marked), the GPU providers this build has; the TensorRT provider with an engine cache under --out and the
    shape profile of the benchmark's inputs (``shapes``)."""
    from export.precision import cpu_reduce_range

    chosen = cpu_reduce_range()
    why = "no VNNI: 7-bit weights avoid int16 saturation" if chosen else "VNNI: full 8-bit weights"
    candidates = [("ort_cpu_fp32", lambda: files.onnx, "CPUExecutionProvider", "onnxruntime CPU fp32", "fp32"),
                  ("ort_cpu_int8", lambda: files.int8_onnx(False), "CPUExecutionProvider",
                   "onnxruntime INT8 Q/DQ, 8-bit weights" + ("" if chosen else f" (this CPU's choice: {why})"), "int8"),
                  ("ort_cpu_int8_rr", lambda: files.int8_onnx(True), "CPUExecutionProvider",
                   "onnxruntime INT8 Q/DQ, 7-bit weights" + (f" (this CPU's choice: {why})" if chosen else ""), "int8"),
                  ("ort_cuda_fp32", lambda: files.onnx, "CUDAExecutionProvider", "onnxruntime CUDA", "fp32"),
                  ("ort_tensorrt_fp32", lambda: files.onnx, "TensorrtExecutionProvider", "onnxruntime TensorRT EP",
                   "fp32")]
    backends = []
    for name, path, provider, note, kind in candidates:
        if not wanted(name):
            continue
        if name == "ort_cpu_int8_rr" and files.args.int8_onnx:
            skipped[name] = "--int8-onnx gives the one INT8 ONNX to run (ort_cpu_int8)"
            continue
        options = None
        if provider == "TensorrtExecutionProvider" and shapes:
            options = trt_provider_options(onnx_input_name(path()), shapes, Path(files.args.out) / "ort_trt_cache")
        try:
            backends.append(ort_backend(name, path(), provider, note, kind, options))
        except Skip as e:
            skipped[name] = str(e)
    return backends


def onnx_input_name(onnx_path) -> str:
    import onnx

    return onnx.load(str(onnx_path), load_external_data=False).graph.input[0].name


def openvino_backend(name: str, model, precision: str, threads: int, note: str, kind: str) -> Backend:
    runner = OpenVINORunner(model, threads=threads, hint="latency", precision=precision)
    return Backend(name, prepare=lambda x: np.ascontiguousarray(x.numpy(), np.float32), run=runner, note=note,
                   logits=lambda x: torch.from_numpy(runner(x)), kind=kind)


def openvino_backends(files: Artifacts, wanted: Callable, skipped: dict, bf16: bool) -> list:
    """OpenVINO on the CPU (latency hint, static shape per input size, torch's thread count): the FP32 IR at
    f32, at bf16 where the CPU has it, NNCF's INT8 IR, and the onnxruntime INT8 Q/DQ ONNX read by OpenVINO."""
    try:
        import nncf  # noqa: F401
        import openvino as ov
    except ImportError as e:
        skipped["openvino_*"] = f"{e.name} is not installed (pip install 'deeplabv3-ray[cpu]')"
        return []
    from export.precision import cpu_reduce_range

    threads = torch.get_num_threads()
    rr = cpu_reduce_range() and not files.args.int8_onnx  # the Q/DQ file this CPU would pick
    candidates = [("openvino_fp32", lambda: files.ir, "f32", "OpenVINO FP32 IR", "fp32"),
                  ("openvino_bf16", lambda: files.ir, "bf16", "OpenVINO FP32 IR run in bf16", "bf16"),
                  ("openvino_int8", lambda: files.ir_int8, "f32", "OpenVINO NNCF INT8 IR", "int8"),
                  ("openvino_int8_qdq", lambda: ov.Core().read_model(str(files.int8_onnx(rr))), "f32",
                   f"OpenVINO on the onnxruntime Q/DQ ONNX ({'7' if rr else '8'}-bit weights)", "int8")]
    backends = []
    for name, model, precision, note, kind in candidates:
        if not wanted(name):
            continue
        if precision == "bf16" and not bf16:
            skipped[name] = "this CPU has no native bf16; name it in --backends to run anyway"
            continue
        backends.append(openvino_backend(name, model(), precision, threads, note, kind))
    return backends


def all_backends(model, cfg, args, skipped: dict) -> list:
    """Every backend this machine can run that --backends asks for; what it cannot run goes to `skipped`."""
    want = set(args.backends.split(",")) if args.backends else None

    def wanted(name):
        return want is None or name in want

    cuda = torch.cuda.is_available()
    # bf16 runs when the CPU has native bf16, or when --backends names it explicitly
    bf16 = has_native_bf16() or bool(want and want & {"torch_bf16", "torch_bf16_channels_last", "openvino_bf16"})
    backends = torch_backends(model, cuda, bf16) + backbone_backends(cfg, args.compare_backbone)
    if not bf16:
        skipped["torch_bf16, torch_bf16_channels_last"] = (
            "this CPU has no native bf16 (no avx512_bf16/AMX; oneDNN would emulate it 4-100x slower than fp32); "
            "name them in --backends to run anyway")
    if not cuda:
        skipped["cuda_fp32, cuda_fp16"] = "no CUDA GPU (torch.cuda.is_available() is False)"
    if wanted("torch_compile"):
        backends.append(compiled_backend(model))
    files = Artifacts(model, cfg, args)
    shapes = [(batch, 3, cfg.export.image_size, cfg.export.image_size) for batch in args.batch]
    backends += onnx_backends(files, wanted, skipped, shapes) + openvino_backends(files, wanted, skipped, bf16)
    for engine in args.engine:
        try:
            backends.append(trt_backend(engine))
        except Skip as e:
            skipped[f"tensorrt {engine}"] = str(e)
    if not args.engine:
        skipped["tensorrt engines"] = "none given (--engine model.engine; build one with python -m export.to_tensorrt)"
    return [b for b in backends if wanted(b.name) or b.model]  # --compare-backbone rows: asked for by name


def time_backends(backends: list, cfg, args, flops: int, limits: dict, skipped: Optional[dict] = None) -> list:
    """Summary rows of every backend at every --batch size, timed interleaved on the same real images; a
    backend that cannot take a batch's shape is skipped at that batch size (the reason in `skipped`)."""
    from export.samples import sample_images

    rows, size = [], cfg.export.image_size
    skipped = {} if skipped is None else skipped
    for batch in args.batch:
        x = sample_images(cfg.data, cfg.data.val_split, batch, size)
        x = x if x is not None else torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        now = runnable(backends, [x.shape], skipped, f"at batch {batch}")
        inputs = {b.name: b.prepare(x) for b in now}
        log.info(f"batch {batch}: {args.warmup} warm-up call(s) each, then {args.repeats} interleaved round(s) "
                 f"of {len(now)} backends")
        runs = interleaved(now, inputs, args.repeats, args.warmup)
        rows += summarize(runs, flops, now, batch, backends[0].name, limits)
    return rows


def measure_accuracy(backends: list, cfg, num_classes: int, skipped: dict) -> dict:
    from export.samples import labelled_batches

    n = cfg.export.accuracy_images
    if n <= 0:
        return {}
    try:
        batches = labelled_batches(cfg.data, cfg.data.val_split, n)
    except Exception as e:
        skipped["accuracy"] = f"no labelled images ({error_line(e, 160)})"
        return {}
    log.info(f"accuracy on {len(batches)} {cfg.data.dataset}/{cfg.data.val_split} image(s):")
    backends = runnable(backends, sorted({tuple(x.shape) for x, _ in batches}), skipped, "accuracy")
    return accuracy(backends, batches, num_classes, cfg.data.ignore_index)


def report(result: dict, out: Path) -> None:
    """Print the table, what was skipped and the recommendation; write bench.json and bench.png."""
    print()
    print(format_table(result["rows"], result["accuracy"]))
    for name, why in result["skipped"].items():
        print(f"skipped {name}: {why}")
    if result["recommendation"]:
        print(result["recommendation"])
    write_text_atomic(out / "bench.json", json.dumps(result, indent=2) + "\n")
    plot(result["rows"], out / "bench.png",
         f"DeepLabv3 {result['model']} OS{result['output_stride']} {result['size']}x{result['size']}")
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")


def benchmark(args) -> int:
    model, cfg = load_subject(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    ex, out = cfg.export, ensure_dir(args.out)
    on_interrupt(f"no figures written ({out / 'bench.json'} is as it was; model files finished in {out} are whole); "
                 "the same command measures everything again")
    dense, flops = count_flops(model, ex.image_size), required_flops(model, ex.image_size)
    cuda = torch.cuda.is_available()
    log.info(f"{model.config.backbone}, output stride {ex.output_stride}, {ex.image_size}x{ex.image_size}: "
             f"{flops / 1e9:.1f} GFLOP per image ({dense / 1e9:.1f} with the products with zero padding); "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"{'CUDA ' + torch.cuda.get_device_name() if cuda else 'no GPU'}")
    features, limits = cpu_features(), peak_limits(torch.get_num_threads())
    measured = measured_limits(torch.get_num_threads())
    log.info(f"CPU {features['cpu']}: VNNI {features['vnni']}, native bf16 {features['native_bf16']}, AMX "
             f"{features['amx']}; {describe_limits(limits, measured)}")
    skipped = {}
    backends = all_backends(model, cfg, args, skipped)
    if not backends:
        raise UserError("no backend left to run (check --backends)")
    rows = time_backends(backends, cfg, args, flops, limits, skipped)
    acc = measure_accuracy(backends, cfg, model.config.num_classes, skipped)
    report({"model": model.config.backbone, "output_stride": ex.output_stride, "size": ex.image_size,
            "flops_per_image": flops, "dense_flops_per_image": dense, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": features, "limits": limits, "measured_limits": measured,
            "tf32": {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                     "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32} if cuda else None,
            "rows": rows, "accuracy": acc, "skipped": skipped,
            "checkpoint": args.checkpoint, "recommendation": recommend(rows, acc, ex.max_int8_miou_drop)}, out)
    return 0


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    show_progress()
    return benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
