"""The ``deeplab.*`` metadata every exported model carries: what a runtime needs to use the file without the
checkpoint (classes, class names, output stride, rates, Multi-Grid, normalization mean/std, how it was made).

Values are JSON-encoded strings under ``deeplab.<key>`` in the ONNX ``metadata_props`` (and in an OpenVINO IR's
rt_info, an engine's sidecar). Everything below export's other modules imports this one, never the reverse.
"""
from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from typing import Optional, Sequence

from deeplab.config import to_plain
from deeplab.data.imagenet import IMAGENET_MEAN, IMAGENET_STD

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
META_PREFIX = "deeplab."
INPUT_LAYOUT = "NCHW"  # float32 N x 3 x H x W, RGB, (pixel/255 - mean) / std

# The record every exporter writes and every runner reads. A file written before a field existed is read with
# the default below (align_corners and backbone from the file's model_config where it has one); see
# `complete_metadata`, which also says which fields were missing.
RECORD_DEFAULTS = {
    "class_names": None,  # class_0, class_1, ...
    "mean": list(IMAGENET_MEAN),
    "std": list(IMAGENET_STD),
    "output_stride": None,  # model_config.output_stride
    "align_corners": False,  # model_config.align_corners; False is what files before the field resized with
    "input_layout": INPUT_LAYOUT,
    "precision": "fp32",
    "backbone": None,  # model_config.backbone
    "dataset": None,  # data_config.dataset
    "source_sha256": None,  # unknown: the checkpoint it came from is not recorded
    "project_version": None,  # unknown: written before the project recorded its version
}


def project_version() -> str:
    """This project's installed version (pyproject.toml), or "unknown" when it runs from an uninstalled tree."""

    try:
        return version("deeplabv3-ray")
    except PackageNotFoundError:
        return "unknown"


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (checkpoints and engines can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_meta(data_cfg, num_classes: int):
    """(class names or None, mean, std) for the metadata, from the data package when it knows them."""
    names = None
    if data_cfg is not None:
        try:
            from deeplab.data import dataset_info

            names = list(dataset_info(data_cfg).class_names)
        except Exception:  # an unreachable dataset root must not stop an export: names are cosmetic
            names = None
    if names and len(names) != num_classes:
        names = None
    return names, IMAGENET_MEAN, IMAGENET_STD


def build_metadata(model_cfg, class_names: Optional[Sequence[str]] = None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   state: Optional[dict] = None, source: Optional[str] = None, data_cfg=None,
                   source_sha256: Optional[str] = None, precision: str = "fp32") -> dict:
    """What a runtime needs besides the graph (every RECORD_DEFAULTS field); values are JSON-encodable. ``data_cfg``:
    the dataset the model was trained for, the default of ``export.evaluate`` as of ``deeplab.evaluate``."""
    names = list(class_names) if class_names else []
    if len(names) != model_cfg.num_classes:
        names = [f"class_{i}" for i in range(model_cfg.num_classes)]
    meta = {
        "num_classes": model_cfg.num_classes,
        "class_names": names,
        "output_stride": model_cfg.output_stride,
        "aspp_rates": list(model_cfg.rates_at()),
        "multi_grid": list(model_cfg.multi_grid),
        "backbone": model_cfg.backbone,
        "align_corners": bool(model_cfg.align_corners),
        "input_layout": INPUT_LAYOUT,
        "precision": precision,
        "dataset": getattr(data_cfg, "dataset", None),
        "source_sha256": source_sha256,
        "project_version": project_version(),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "input": f"{INPUT_NAME}: float32 N x 3 x H x W, RGB, (pixel/255 - mean) / std",
        "output": f"{OUTPUT_NAME}: float32 N x num_classes x H x W (argmax over classes gives the label map)",
        "model_config": to_plain(model_cfg),
    }
    state = state or {}
    metrics = state.get("metrics") or {}
    val_miou = metrics.get("val_miou") if isinstance(metrics, dict) else None
    if val_miou is None:
        val_miou = state.get("val_miou")
    if val_miou is not None:
        meta["val_miou"] = float(val_miou)
    if source:
        meta["source"] = source
    if data_cfg is not None:
        meta["data_config"] = to_plain(data_cfg)
    return meta


def complete_metadata(meta: dict) -> tuple:
    """(the record with every RECORD_DEFAULTS field, the fields the file lacked): how a runner reads a file
    written before a field existed. Defaults come from the file's own model_config/data_config where it has them."""
    model_cfg = meta.get("model_config") if isinstance(meta.get("model_config"), dict) else {}
    data_cfg = meta.get("data_config") if isinstance(meta.get("data_config"), dict) else {}
    derived = {"output_stride": model_cfg.get("output_stride"), "backbone": model_cfg.get("backbone"),
               "align_corners": model_cfg.get("align_corners", RECORD_DEFAULTS["align_corners"]),
               "dataset": data_cfg.get("dataset")}
    missing = [key for key in RECORD_DEFAULTS if key not in meta]
    full = dict(meta)
    for key in missing:
        full[key] = derived.get(key) if derived.get(key) is not None else RECORD_DEFAULTS[key]
    return full, missing


def encode(meta: dict) -> dict:
    """``deeplab.<key>`` -> JSON text: the form every model format stores."""
    return {META_PREFIX + key: json.dumps(value) for key, value in meta.items()}


def decode(items) -> dict:
    """The ``deeplab.*`` entries of (key, text) pairs, JSON-decoded (text that is not JSON stays text)."""
    out = {}
    for key, text in items:
        if key.startswith(META_PREFIX):
            try:
                out[key[len(META_PREFIX):]] = json.loads(text)
            except (json.JSONDecodeError, TypeError):
                out[key[len(META_PREFIX):]] = text
    return out


def set_metadata(onnx_model, meta: dict) -> None:
    """Replace the ``deeplab.*`` metadata_props of an ONNX model (other entries are kept)."""
    import onnx

    keep = [p for p in onnx_model.metadata_props if not p.key.startswith(META_PREFIX)]
    del onnx_model.metadata_props[:]
    onnx_model.metadata_props.extend(keep)
    for key, text in encode(meta).items():
        onnx_model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=text))


def read_metadata(onnx_model_or_path) -> dict:
    """The ``deeplab.*`` metadata of an ONNX model (or file), JSON-decoded."""
    import onnx

    model = onnx_model_or_path
    if not hasattr(model, "metadata_props"):
        model = onnx.load(str(onnx_model_or_path), load_external_data=False)
    return decode((p.key, p.value) for p in model.metadata_props)


def set_ir_metadata(ov_model, meta: dict) -> None:
    """Store `meta` in an OpenVINO model's rt_info under ``deeplab`` (``<rt_info><deeplab><num_classes ...>``)."""
    for key, text in encode(meta).items():
        ov_model.set_rt_info(text, ["deeplab", key[len(META_PREFIX):]])


def read_ir_metadata(ov_model_or_path) -> dict:
    """The ``deeplab`` rt_info of an OpenVINO model (or IR .xml file), JSON-decoded."""
    model = ov_model_or_path
    if not hasattr(model, "get_rt_info"):
        import openvino as ov

        model = ov.Core().read_model(str(ov_model_or_path))
    if not model.has_rt_info("deeplab"):
        return {}
    section = model.get_rt_info()["deeplab"]
    return decode((META_PREFIX + key, value.astype(str)) for key, value in section.items())
