"""The ``deeplab.*`` metadata every exported model carries: what a runtime needs to use the file without the
checkpoint (classes, class names, output stride, rates, Multi-Grid, normalization mean/std, how it was made).

Values are JSON-encoded strings under ``deeplab.<key>`` in the ONNX ``metadata_props`` (and in an OpenVINO IR's
rt_info, an engine's sidecar). Everything below export's other modules imports this one, never the reverse.
"""
from __future__ import annotations

import json
from typing import Optional, Sequence

from deeplab.config import to_plain
from deeplab.data.transforms import IMAGENET_MEAN, IMAGENET_STD

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
META_PREFIX = "deeplab."


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
                   state: Optional[dict] = None, source: Optional[str] = None, data_cfg=None) -> dict:
    """What a runtime needs besides the graph; values are JSON-encodable Python objects. ``data_cfg``: the
    dataset the model was trained for, the default of ``export.evaluate`` as of ``deeplab.evaluate``."""
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
