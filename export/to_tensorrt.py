"""Checkpoint or ONNX -> serialized TensorRT engine with an optimization profile and a JSON sidecar.

    python -m export.to_tensorrt best.ckpt --precision int8 --check-accuracy -o model.engine

TensorRT 10 and 11 differ in where precision lives. On 11 every network is strongly typed and the precision
flags are gone: FP16/BF16 come from an AutoCast ONNX and INT8 from a Q/DQ ONNX, both made here on CPU. On 10
the FP32 ONNX is built with BuilderFlag.FP16/BF16, and INT8 again from the Q/DQ ONNX (calibrators are
deprecated) with the INT8 flag. The CPU-side files (ONNX, Q/DQ ONNX, FP16 ONNX) are written first, so a
machine without a GPU or without tensorrt still produces them, then stops with exit code 2 and one line.
The engine and its sidecar (GPU, compute capability, TensorRT version, precision, shapes, the ONNX's
metadata, parity and accuracy figures) are written atomically; a failed build leaves no engine file.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from .runtime import EngineError, atomic_write_bytes, device_info, progress, sidecar_path, write_sidecar

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
EXIT_UNSUPPORTED = 2  # this machine cannot build engines (no GPU / no tensorrt); not the user's mistake


class BuildError(RuntimeError):
    """TensorRT refused to parse or build; one line with TensorRT's reason."""


class Unsupported(RuntimeError):
    """This machine cannot build an engine; exit code 2."""


# ------------------------------------------------------------------------------------------ shapes
def parse_shape(text: str, option: str = "--shape") -> tuple:
    """'1x3x513x513' -> (1, 3, 513, 513); a clear error naming the option otherwise."""
    parts = str(text).lower().replace(",", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected NxCxHxW, e.g. 1x3x513x513") from None
    if len(shape) != 4 or any(d < 1 for d in shape):
        raise ValueError(f"{option} {text!r}: expected 4 positive sizes NxCxHxW, e.g. 1x3x513x513")
    if shape[1] != 3:
        raise ValueError(f"{option} {text!r}: the model takes 3 channels (RGB), got {shape[1]}")
    return shape


def profile_shapes(min_shape: str, opt_shape: str, max_shape: str) -> dict:
    """The optimization profile from the three flags; each dimension must satisfy min <= opt <= max."""
    shapes = {"min": parse_shape(min_shape, "--min-shape"), "opt": parse_shape(opt_shape, "--opt-shape"),
              "max": parse_shape(max_shape, "--max-shape")}
    for i, dim in enumerate("NCHW"):
        lo, mid, hi = shapes["min"][i], shapes["opt"][i], shapes["max"][i]
        if not lo <= mid <= hi:
            raise ValueError(f"--min-shape/--opt-shape/--max-shape: {dim} must satisfy min <= opt <= max, "
                             f"got {lo}, {mid}, {hi}")
    return shapes


def static_profile(onnx_input_shape) -> Optional[tuple]:
    """The fixed input shape of a static ONNX (all dims known), else None."""
    dims = tuple(onnx_input_shape)
    return dims if all(isinstance(d, int) and d > 0 for d in dims) else None


# ------------------------------------------------------------------------------------------ versions
def trt_major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise ValueError(f"cannot read a TensorRT version from {version!r}") from None


def build_path(version: str) -> str:
    """'flags' for TensorRT 10 (weakly typed, precision builder flags), 'typed' for 11+ (strongly typed:
    precision is in the ONNX)."""
    major = trt_major(version)
    if major < 10:
        raise Unsupported(f"TensorRT {version} is too old; this project needs TensorRT 10 or 11 (pip install tensorrt)")
    return "flags" if major == 10 else "typed"


def builder_flags(precision: str, path: str) -> list:
    """BuilderFlag names to set: none on the typed path; on TensorRT 10 the precision flags (INT8 also
    allows FP16 for the layers the Q/DQ ONNX leaves unquantized)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if path == "typed":
        return []
    return {"fp32": [], "fp16": ["FP16"], "bf16": ["BF16"], "int8": ["INT8", "FP16"]}[precision]


def onnx_variant(precision: str, path: Optional[str]) -> str:
    """Which ONNX the builder parses: 'fp32', 'int8' (Q/DQ), 'fp16' or 'bf16' (AutoCast). With path None
    (TensorRT not here) the typed path's files are made, the ones to carry to a TensorRT 11 machine."""
    if precision == "int8":
        return "int8"
    if precision in ("fp16", "bf16") and path != "flags":
        return precision
    return "fp32"


# ------------------------------------------------------------------------------------------ machine
def machine_blocker() -> Optional[str]:
    """Why this machine cannot build an engine (one line), or None."""
    try:
        import tensorrt  # noqa: F401
    except Exception as e:
        return f"tensorrt is not installed ({type(e).__name__}); pip install tensorrt on a machine with an NVIDIA GPU"
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU is visible to torch (torch.cuda.is_available() is False)"
    except Exception as e:  # pragma: no cover
        return f"cannot query CUDA ({e})"
    return None


# ------------------------------------------------------------------------------------------ building
def build_engine(onnx_path, precision: str, shapes: Optional[dict], workspace_gb: float,
                 input_name: str = "images", log=progress) -> bytes:
    """Parse the ONNX and build a serialized engine (TensorRT 10 or 11); raises BuildError."""
    import tensorrt as trt

    path = build_path(trt.__version__)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # 10: flags 0 = explicit batch, weakly typed (precision from builder flags); 11: always strongly typed
    network = builder.create_network(0) if path == "flags" else builder.create_network()
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"{onnx_path}: TensorRT could not parse the ONNX: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    for name in builder_flags(precision, path):
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is None:
            raise BuildError(f"TensorRT {trt.__version__} has no BuilderFlag.{name}; use TensorRT 11 with a typed ONNX")
        config.set_flag(flag)
    if shapes:
        profile = builder.create_optimization_profile()
        profile.set_shape(input_name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)
    log(f"building a {precision} engine with TensorRT {trt.__version__} ({path} path); this takes minutes...")
    data = builder.build_serialized_network(network, config)
    if data is None:
        raise BuildError(f"{onnx_path}: TensorRT failed to build the engine (see the messages above)")
    return bytes(memoryview(data))


def engine_parity(engine_path, onnx_path, shape) -> dict:
    """Engine vs the FP32 ONNX in onnxruntime on one seeded input at the profile's opt shape."""
    import torch

    from .runtime import OnnxRunner, TensorRTRunner

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ref = OnnxRunner(onnx_path, ["CPUExecutionProvider"])(x)
    out = TensorRTRunner(engine_path, check=False)(x).float().cpu().numpy()
    return {"shape": list(shape), "max_abs_diff": float(np.abs(out - ref).max()),
            "max_abs_logit": float(np.abs(ref).max()),
            "argmax_agreement": float((out.argmax(1) == ref.argmax(1)).mean())}


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_sidecar(device: dict, precision: str, path: str, shapes: Optional[dict], onnx_path, meta: dict,
                 **extra) -> dict:
    info = dict(device)
    info.update(precision=precision, build_path=path, onnx=str(Path(onnx_path).name), onnx_sha256=sha256(onnx_path),
                shapes={k: list(v) for k, v in (shapes or {}).items()}, metadata=meta,
                built_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    info.update(extra)
    return info


def write_engine(engine_path, data: bytes, sidecar: dict) -> None:
    """Sidecar first, engine last: an engine file never exists without the sidecar that vouches for it."""
    write_sidecar(engine_path, sidecar)
    atomic_write_bytes(engine_path, data)


# ------------------------------------------------------------------------------------------ CLI
def _experiment(args, ckpt=None):
    from deeplab.config import apply_overrides, experiment_from_dict, to_plain
    import yaml

    values = to_plain(ckpt.experiment) if ckpt is not None and ckpt.experiment is not None else {}
    if args.config:
        p = Path(args.config)
        if not p.is_file():
            raise ValueError(f"{p}: config file not found")
        values = yaml.safe_load(p.read_text()) or {}
    values.pop("model", None)  # the model always comes from the checkpoint / ONNX
    apply_overrides(values, args.overrides)
    values.pop("model", None)
    return experiment_from_dict(values, args.config or "config")


def run(args, log=progress) -> int:
    from .to_onnx import export_checkpoint, read_metadata
    from . import precision as prec

    src = Path(args.source)
    if not src.is_file():
        raise ValueError(f"{src}: no such file")
    engine_path = Path(args.output) if args.output else src.with_suffix(f".{args.precision}.engine")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    cfg = _experiment(args)
    ex = cfg.export
    shapes = profile_shapes(args.min_shape or ex.min_shape, args.opt_shape or ex.opt_shape,
                            args.max_shape or ex.max_shape)
    blocker = machine_blocker()
    path = None
    if blocker is None:
        import tensorrt as trt

        path = build_path(trt.__version__)
    written = []

    # 1. FP32 ONNX (from a checkpoint) -------------------------------------------------------------
    if src.suffix == ".onnx":
        fp32_onnx = src
    else:
        from deeplab.checkpoint import load_checkpoint

        cfg = _experiment(args, load_checkpoint(src))
        fp32_onnx = engine_path.with_name(engine_path.name.split(".")[0] + ".onnx")
        export_checkpoint(src, fp32_onnx, args.output_stride or ex.output_stride, dynamic=True, opset=ex.opset,
                          tolerance=ex.tolerance, data_cfg=cfg.data, log=log)
        written.append(fp32_onnx)
    meta = read_metadata(fp32_onnx)
    num_classes = int(meta.get("num_classes", 0)) or None

    # 2. the precision's ONNX, made on CPU ---------------------------------------------------------
    variant = onnx_variant(args.precision, path)
    onnx_files = {"fp32": fp32_onnx}
    stem = fp32_onnx.with_suffix("")
    if variant == "int8" or (args.check_accuracy and args.precision == "int8"):
        calib_size = shapes["opt"][2]
        if args.calib_data:
            calib = prec.folder_images(args.calib_data, args.calib_images or ex.calib_images, calib_size,
                                       meta.get("mean", (0.485, 0.456, 0.406)), meta.get("std", (0.229, 0.224, 0.225)))
        else:
            calib = [img for img, _ in prec.labelled_samples(cfg.data, cfg.data.train_split,
                                                              args.calib_images or ex.calib_images)]
        onnx_files["int8"] = prec.quantize_int8(fp32_onnx, Path(f"{stem}.int8.onnx"), calib, log=log)
        written.append(onnx_files["int8"])
    if variant in ("fp16", "bf16") or (args.check_accuracy and args.precision in ("fp16", "bf16")):
        try:
            onnx_files[args.precision], _ = prec.lowp_onnx(fp32_onnx, Path(f"{stem}.{args.precision}.onnx"),
                                                           args.precision, log=log)
            written.append(onnx_files[args.precision])
        except ValueError as e:
            if variant == args.precision and path == "typed":
                raise
            log(f"note: no {args.precision} ONNX written: {e}")

    # 3. accuracy of the reduced precision in onnxruntime --------------------------------------------
    accuracy = None
    if args.check_accuracy and args.precision == "bf16":
        log("note: --check-accuracy skips bf16: onnxruntime's CPU provider has no bf16 Conv kernel; "
            "python export/bench.py reports bf16 (torch autocast) accuracy instead")
    elif args.check_accuracy and args.precision != "fp32" and args.precision in onnx_files:
        if num_classes is None:
            raise ValueError(f"{fp32_onnx}: no deeplab.num_classes metadata; export it with export.to_onnx")
        n = args.accuracy_images or ex.accuracy_images
        log(f"checking accuracy on {n} held-out image(s) of {cfg.data.dataset}/{cfg.data.val_split}...")
        samples = prec.labelled_samples(cfg.data, cfg.data.val_split, n)
        accuracy = prec.accuracy_report({k: onnx_files[k] for k in ("fp32", args.precision)}, samples, num_classes,
                                        cfg.data.ignore_index, log=log)
        drop = accuracy[args.precision]["miou_drop"]
        if args.precision == "int8" and drop > ex.max_int8_miou_drop:
            msg = (f"INT8 loses {drop:.2f} mIoU points (> export.max_int8_miou_drop={ex.max_int8_miou_drop}); "
                   "calibrate on more / more typical images (--calib-images, --calib-data) or pass --force")
            if not args.force:
                raise ValueError(msg)
            log(f"warning: {msg}; building anyway (--force)")

    # 4. the engine ---------------------------------------------------------------------------------
    if blocker:
        files = ", ".join(str(p) for p in written) or "nothing"
        raise Unsupported(f"cannot build a TensorRT engine here: {blocker}; wrote {files}")
    import onnx

    onnx_in = onnx_files[variant]
    model_input = onnx.load(str(onnx_in), load_external_data=False).graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in model_input.type.tensor_type.shape.dim]
    fixed = static_profile(dims)
    profile = None if fixed else shapes
    data = build_engine(onnx_in, args.precision, profile, args.workspace or ex.workspace_gb, model_input.name, log=log)
    tmp_engine = engine_path.with_name(f".{engine_path.name}.tmp{os.getpid()}")
    try:
        atomic_write_bytes(tmp_engine, data)  # parity runs on the real file before it takes the final name
        par = engine_parity(tmp_engine, fp32_onnx, fixed or shapes["opt"])
        log(f"engine vs ONNX fp32: max |logit diff| {par['max_abs_diff']:.3g}, "
            f"argmax agreement {100 * par['argmax_agreement']:.2f}%")
        sidecar = make_sidecar(device_info(), args.precision, path, profile or {"fixed": fixed}, onnx_in, meta,
                               parity=par, accuracy=accuracy, workspace_gb=args.workspace or ex.workspace_gb)
        write_engine(engine_path, data, sidecar)
    finally:
        tmp_engine.unlink(missing_ok=True)
    log(f"wrote {engine_path} ({len(data) / 2**20:.1f} MiB) and {sidecar_path(engine_path).name}")
    return 0


def main(argv=None) -> int:
    from deeplab.config import ConfigError, add_config_args

    p = argparse.ArgumentParser(prog="python -m export.to_tensorrt", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a checkpoint (exported to ONNX first) or an ONNX file from export.to_onnx")
    p.add_argument("-o", "--output", help="engine file (default: SOURCE.<precision>.engine); sidecar: ENGINE.json")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--output-stride", type=int, default=None, help="for a checkpoint (default export.output_stride, 8)")
    p.add_argument("--calib-data", metavar="FOLDER",
                   help="folder of calibration images (default: the config's data section, train split)")
    p.add_argument("--calib-images", type=int, default=None, help="calibration images (default export.calib_images)")
    p.add_argument("--check-accuracy", action="store_true",
                   help="compare FP32 vs the reduced precision ONNX mIoU in onnxruntime on held-out images")
    p.add_argument("--accuracy-images", type=int, default=None, help="held-out images (default export.accuracy_images)")
    p.add_argument("--force", action="store_true", help="build even if INT8 loses more than export.max_int8_miou_drop")
    p.add_argument("--min-shape", help="NxCxHxW (default export.min_shape)")
    p.add_argument("--opt-shape", help="NxCxHxW the engine is tuned for (default export.opt_shape, 1x3x513x513)")
    p.add_argument("--max-shape", help="NxCxHxW (default export.max_shape)")
    p.add_argument("--workspace", type=float, default=None, help="builder workspace in GiB (default export.workspace_gb)")
    add_config_args(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except Unsupported as e:
        print(f"to_tensorrt: {e}", file=sys.stderr)
        return EXIT_UNSUPPORTED
    except (ValueError, ConfigError, BuildError, EngineError, FileNotFoundError) as e:
        print(f"to_tensorrt: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
