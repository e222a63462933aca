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

import datetime
import hashlib
import logging
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from deeplab.cli import USAGE, UserError, command
from deeplab.config import Alias
from deeplab.fileio import atomic_path, ensure_dir

from .cli import parse_and_run, say_unwritten_on_stop, source_and_config, source_parser
from .config import ExportConfig
from .metadata import file_sha256, read_metadata, set_metadata
from .opset import TENSORRT_MAX_OPSET
from .runners import ENGINE_HASH_KEY, OnnxRunner, TensorRTRunner, device_info, sidecar_path, write_sidecar

log = logging.getLogger("export.to_tensorrt")  # not __name__: run as -m it would be __main__, outside "export"
PRECISIONS = ExportConfig.PRECISIONS


class BuildError(UserError, RuntimeError):
    """TensorRT refused to parse or build; one line with TensorRT's reason."""

    exit_code = 1


class Unsupported(UserError, RuntimeError):
    """This machine cannot build an engine (no GPU, no tensorrt); exit code 2, the CPU-side files are kept."""

    exit_code = USAGE


# ------------------------------------------------------------------------------------------ shapes
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
                 input_name: str = "images", record: Optional[dict] = None) -> bytes:
    """Parse the ONNX and build a serialized engine (TensorRT 10 or 11); raises BuildError. ``record`` gets
    what the sidecar should say of the build: whether fp32 layers may run as TF32 (TensorRT's default)."""
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
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the engine inspector can name layer precisions
    for name in builder_flags(precision, path):
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is None:
            raise BuildError(f"TensorRT {trt.__version__} has no BuilderFlag.{name}; use TensorRT 11 with a typed ONNX")
        config.set_flag(flag)
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if record is not None:
        record["tf32"] = bool(config.get_flag(tf32)) if tf32 is not None else None
    if shapes:
        profile = builder.create_optimization_profile()
        profile.set_shape(input_name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)
    log.info(f"building a {precision} engine with TensorRT {trt.__version__} ({path} path); this takes minutes...")
    data = builder.build_serialized_network(network, config)
    if data is None:
        raise BuildError(f"{onnx_path}: TensorRT failed to build the engine (see the messages above)")
    return bytes(memoryview(data))


def engine_parity(engine_path, onnx_path, shape) -> dict:
    """Engine vs the FP32 ONNX in onnxruntime on one seeded input at the profile's opt shape."""
    import torch

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ref = OnnxRunner(onnx_path, ["CPUExecutionProvider"])(x)
    out = TensorRTRunner(engine_path, check=False)(x).float().cpu().numpy()
    return {"shape": list(shape), "max_abs_diff": float(np.abs(out - ref).max()),
            "max_abs_logit": float(np.abs(ref).max()),
            "argmax_agreement": float((out.argmax(1) == ref.argmax(1)).mean())}


def make_sidecar(device: dict, precision: str, path: str, shapes: Optional[dict], onnx_path, meta: dict,
                 **extra) -> dict:
    info = dict(device)
    info.update(precision=precision, build_path=path, onnx=str(Path(onnx_path).name),
                onnx_sha256=file_sha256(onnx_path), shapes={k: list(v) for k, v in (shapes or {}).items()},
                metadata=meta,
                built_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    info.update(extra)
    return info


def write_engine(engine_path, data: bytes, describe: Callable[[Path], dict]) -> dict:
    """Write the engine under a temporary name, `describe(temporary file)` it (parity runs on the real file),
    write its sidecar, and only then give the engine its name: an engine never exists without the sidecar
    that vouches for it (its sha256 included: the runner refuses other bytes), and a failure leaves no engine."""
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(data)
        sidecar = {**describe(tmp), ENGINE_HASH_KEY: hashlib.sha256(data).hexdigest()}
        write_sidecar(engine_path, sidecar)
    return sidecar


# ------------------------------------------------------------------------------------------ the command
def fp32_onnx_for(src: Path, ckpt, engine_path: Path, cfg) -> Path:
    """The FP32 ONNX the other files are made from: the source itself, or exported from the checkpoint."""
    if ckpt is None:
        return src
    from .to_onnx import export_checkpoint

    ex = cfg.export
    fp32_onnx = engine_path.with_name(engine_path.name.split(".")[0] + ".onnx")
    export_checkpoint(ckpt, fp32_onnx, ex.output_stride, dynamic=True, opset=ex.opset, tolerance=ex.tolerance,
                      data_cfg=cfg.data)
    return fp32_onnx


def modelopt_quantize():
    """modelopt.onnx.quantization.quantize, or None where ModelOpt is not installed."""
    try:
        from modelopt.onnx.quantization import quantize
    except Exception:
        return None
    return quantize


def int8_layout(path: Optional[str], modelopt: bool) -> dict:
    """Who writes the INT8 Q/DQ ONNX and in which precision TensorRT runs the layers outside the Q/DQ pairs.
    TensorRT 10 takes them to fp16 itself (BuilderFlag.FP16); on 11 the network is strongly typed, so they
    run in the ONNX's own type: fp16 only when ModelOpt wrote them so (high_precision_dtype), else fp32."""
    if path == "flags":
        return {"int8_quantizer": "onnxruntime.quantize_static", "int8_other_layers": "fp16 (BuilderFlag.FP16)"}
    if modelopt:
        return {"int8_quantizer": "modelopt.onnx.quantization", "int8_other_layers": "fp16 (high_precision_dtype)"}
    return {"int8_quantizer": "onnxruntime.quantize_static",
            "int8_other_layers": "fp32 (install nvidia-modelopt[onnx] for fp16)"}


def modelopt_int8(quantize: Callable, fp32_onnx: Path, dst: Path, calib: list, size: int) -> Path:
    """FP32 ONNX -> INT8 Q/DQ ONNX whose other layers are fp16 (ModelOpt, calibrated on CPU), atomically,
    with the source's metadata."""
    import onnx
    import torch

    # one calibration array: every image at the profile's opt size
    data = torch.cat([torch.nn.functional.interpolate(torch.as_tensor(a), size=(size, size), mode="bilinear",
                                                      align_corners=False) for a in calib]).numpy()
    meta = read_metadata(fp32_onnx)
    with atomic_path(dst) as tmp:
        quantize(onnx_path=str(fp32_onnx), quantize_mode="int8", calibration_data=data, calibration_method="max",
                 calibration_eps=["cpu"], high_precision_dtype="fp16", output_path=str(tmp))
        model = onnx.load(str(tmp))
        meta.update(precision="int8", quantization={"format": "QDQ", "tool": "modelopt", "high_precision": "fp16",
                                                    "calibration_images": int(len(data))})
        set_metadata(model, meta)
        onnx.save(model, str(tmp))
    return dst


def int8_onnx(fp32_onnx: Path, cfg, args, path: Optional[str]) -> tuple:
    """(INT8 Q/DQ ONNX, its int8_layout record): ModelOpt with fp16 other layers for TensorRT 11 (or when
    TensorRT is not here: the typed path's file), onnxruntime's quantizer for TensorRT 10 or without ModelOpt."""
    from . import precision as prec
    from .samples import calibration_images

    ex = cfg.export
    dst = Path(f"{fp32_onnx.with_suffix('')}.int8.onnx")
    quantize = modelopt_quantize() if path != "flags" else None
    opt_size = ex.profile()["opt"][2]
    size = opt_size if args.calib_data else None  # dataset images keep their own size
    calib = calibration_images(cfg.data, ex.calib_images, size, args.calib_data)
    if quantize is not None:
        return modelopt_int8(quantize, fp32_onnx, dst, calib, opt_size), int8_layout(path, True)
    layout = int8_layout(path, False)
    if path != "flags":
        log.info(f"note: the INT8 engine runs its other layers in {layout['int8_other_layers']}")
    return prec.quantize_int8(fp32_onnx, dst, calib), layout


def precision_onnx(fp32_onnx: Path, cfg, args, path: Optional[str]) -> tuple:
    """({variant: ONNX file} made on CPU: the INT8 Q/DQ or FP16/BF16 ONNX the builder (or the accuracy
    check) needs, beside the FP32 one; what the sidecar records of how they were made)."""
    from . import precision as prec

    ex = cfg.export
    variant = onnx_variant(ex.precision, path)
    files, record = {"fp32": fp32_onnx}, {}
    stem = fp32_onnx.with_suffix("")
    if variant == "int8" or (args.check_accuracy and ex.precision == "int8"):
        files["int8"], record = int8_onnx(fp32_onnx, cfg, args, path)
    if variant in ("fp16", "bf16") or (args.check_accuracy and ex.precision in ("fp16", "bf16")):
        try:
            files[ex.precision], _ = prec.lowp_onnx(fp32_onnx, Path(f"{stem}.{ex.precision}.onnx"), ex.precision)
        except prec.PrecisionError as e:
            if variant == ex.precision and path == "typed":
                raise
            log.info(f"note: no {ex.precision} ONNX written: {e}")
    return files, record


def check_accuracy(onnx_files: dict, cfg, num_classes: Optional[int], force: bool) -> Optional[dict]:
    """FP32 vs the reduced precision ONNX in onnxruntime on held-out images; refuses an INT8 model that
    loses more than export.max_int8_miou_drop unless forced."""
    from .precision import accuracy_report, gate_int8
    from .samples import labelled_batches

    ex = cfg.export
    if ex.precision == "bf16":
        log.info("note: --check-accuracy skips bf16: onnxruntime's CPU provider has no bf16 Conv kernel; "
                 "python export/bench.py reports bf16 (torch autocast) accuracy instead")
        return None
    if ex.precision == "fp32" or ex.precision not in onnx_files:
        return None
    if num_classes is None:
        raise UserError(f"{onnx_files['fp32']}: no deeplab.num_classes metadata; export it with export.to_onnx")
    log.info(f"checking accuracy on {ex.accuracy_images} held-out image(s) of "
             f"{cfg.data.dataset}/{cfg.data.val_split}...")
    batches = labelled_batches(cfg.data, cfg.data.val_split, ex.accuracy_images)
    accuracy = accuracy_report({k: onnx_files[k] for k in ("fp32", ex.precision)}, batches, num_classes,
                               cfg.data.ignore_index)
    if ex.precision == "int8":
        gate_int8(accuracy, ex.max_int8_miou_drop, force)
    return accuracy


def build_and_write(engine_path: Path, onnx_in: Path, fp32_onnx: Path, path: str, ex, **sidecar_extra) -> None:
    """Build the engine from `onnx_in`, check it against the FP32 ONNX, write engine and sidecar."""
    import onnx

    model_input = onnx.load(str(onnx_in), load_external_data=False).graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in model_input.type.tensor_type.shape.dim]
    fixed = static_profile(dims)
    profile = None if fixed else ex.profile()
    built: dict = {}
    data = build_engine(onnx_in, ex.precision, profile, ex.workspace_gb, model_input.name, built)

    def describe(tmp_engine: Path) -> dict:
        par = engine_parity(tmp_engine, fp32_onnx, fixed or profile["opt"])
        log.info(f"engine vs ONNX fp32: max |logit diff| {par['max_abs_diff']:.3g}, "
                 f"argmax agreement {100 * par['argmax_agreement']:.2f}%")
        meta = {**read_metadata(fp32_onnx), "precision": ex.precision}  # the record, for this engine
        return make_sidecar(device_info(), ex.precision, path, profile or {"fixed": fixed}, onnx_in, meta,
                            parity=par, workspace_gb=ex.workspace_gb, **built, **sidecar_extra)

    write_engine(engine_path, data, describe)
    log.info(f"wrote {engine_path} ({len(data) / 2**20:.1f} MiB) and {sidecar_path(engine_path).name}")


def run(args) -> int:
    src, ckpt, cfg = source_and_config(args, "tensorrt")
    engine_path = Path(args.output) if args.output else src.with_suffix(f".{cfg.export.precision}.engine")
    ensure_dir(engine_path.parent)
    say_unwritten_on_stop(engine_path)
    blocker = machine_blocker()
    path = None
    if blocker is None:
        import tensorrt as trt

        path = build_path(trt.__version__)
    fp32_onnx = fp32_onnx_for(src, ckpt, engine_path, cfg)
    onnx_files, made = precision_onnx(fp32_onnx, cfg, args, path)
    num_classes = int(read_metadata(fp32_onnx).get("num_classes", 0)) or None
    accuracy = check_accuracy(onnx_files, cfg, num_classes, args.force) if args.check_accuracy else None
    if blocker:
        written = [p for p in onnx_files.values() if p != src]
        raise Unsupported(f"cannot build a TensorRT engine here: {blocker}; wrote "
                          f"{', '.join(map(str, written)) or 'nothing'}")
    build_and_write(engine_path, onnx_files[onnx_variant(cfg.export.precision, path)], fp32_onnx, path, cfg.export,
                    accuracy=accuracy, **made)
    return 0


ALIASES = [Alias("--precision", "export.precision", "fp32, fp16, bf16 or int8"),
           Alias("--output-stride", "export.output_stride", "inference output stride, for a checkpoint"),
           Alias("--calib-images", "export.calib_images", "INT8 calibration images"),
           Alias("--accuracy-images", "export.accuracy_images", "held-out images for --check-accuracy"),
           Alias("--min-shape", "export.min_shape", "NxCxHxW, smallest input", metavar="NxCxHxW"),
           Alias("--opt-shape", "export.opt_shape", "NxCxHxW the engine is tuned for", metavar="NxCxHxW"),
           Alias("--max-shape", "export.max_shape", "NxCxHxW, largest input", metavar="NxCxHxW"),
           Alias("--workspace", "export.workspace_gb", "builder workspace in GiB", metavar="GIB"),
           Alias("--opset", "export.opset",
                 f"ONNX opset for a checkpoint (TensorRT 10.0 parses up to {TENSORRT_MAX_OPSET}; "
                 "null: the exporter's, capped there)")]


@command
def main(argv=None) -> int:
    p = source_parser("python -m export.to_tensorrt", __doc__.split("\n\n")[0],
                      "engine file (default: SOURCE.<precision>.engine); sidecar: ENGINE.json",
                      "build even if INT8 loses more than export.max_int8_miou_drop")
    p.add_argument("--check-accuracy", action="store_true",
                   help="compare FP32 vs the reduced precision ONNX mIoU in onnxruntime on held-out images")
    return parse_and_run(p, ALIASES, argv, run)

if __name__ == "__main__":
    sys.exit(main())
