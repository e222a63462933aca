"""The experiment: the registry of config sections, the ExperimentConfig holding one of each, and building it
from plain values (a YAML file, a checkpoint) with ``--set`` overrides and the path checks.

deeplab registers its own sections here; each package above it registers its sections when it is imported
(`register_section`), so deeplab names none of them. A section whose package is not imported in this process is
kept as written and saved back whole. A ConfigError from a file names the file; one from ``--set`` (or a
shorthand flag) names that item. Paths that must exist are checked only when a command builds its config from
the command line (`load_config`, deeplab.config.flags.config_from_args): a checkpoint's own experiment must still
load on a machine that lacks its training paths.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from ..fileio import write_text_atomic
from .sections import DataConfig, InferenceConfig, ModelConfig, TrainConfig
from .values import ConfigError

SECTION_CLASSES: dict = {}  # section name -> its dataclass, in the order registered
_CHECKS: list = []  # functions(ExperimentConfig) checking what spans sections, registered with a section


def register_section(cls, check_across: Optional[Callable] = None):
    """Make ``cls`` (a section dataclass with ``SECTION``) a section of every experiment from now on;
    ``check_across(cfg)`` checks what spans it and other sections. Idempotent (a module imported twice)."""
    name = cls.SECTION
    known = SECTION_CLASSES.get(name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"config section {name!r} is already {known.__module__}.{known.__qualname__}")
    SECTION_CLASSES[name] = cls
    if check_across is not None:
        _CHECKS[:] = [c for c in _CHECKS if c.__qualname__ != check_across.__qualname__] + [check_across]
    return cls


class ExperimentConfig:
    """One experiment: an attribute per registered section (``cfg.model``, ``cfg.train``, ...). A section read
    from a file or checkpoint whose package is not imported here is kept as written (``raw``): saved back
    whole, and checked when its package registers it and the code asks for it."""

    def __init__(self, _raw: Optional[dict] = None, **sections):
        unknown = sorted(set(sections) - set(SECTION_CLASSES))
        if unknown:
            raise TypeError(f"ExperimentConfig: no section(s) {', '.join(unknown)}")
        self._raw = dict(_raw or {})
        for name, cls in SECTION_CLASSES.items():
            setattr(self, name, sections[name] if sections.get(name) is not None else cls())
        self.check_across()

    def __getattr__(self, name: str):
        """A section registered after this config was built: built now from what was read (fields it gave up
        to another section dropped: that one is built already), or its defaults; then checked across sections."""
        if name.startswith("_") or name not in SECTION_CLASSES:
            raise AttributeError(f"ExperimentConfig has no section {name!r} (its package registers it on import)")
        cls, values = SECTION_CLASSES[name], self._raw.pop(name, None)
        if isinstance(values, dict):
            values = {k: v for k, v in values.items() if k not in getattr(cls, "MOVED", {})}
        setattr(self, name, _build(cls, values, name))
        self.check_across()
        return getattr(self, name)

    def replace(self, **sections) -> "ExperimentConfig":
        """A copy with some sections replaced (checked across sections again)."""
        return ExperimentConfig(self._raw, **{**self.sections(), **sections})

    def sections(self) -> dict:
        """Every registered section by name."""
        return {name: getattr(self, name) for name in SECTION_CLASSES}

    def check(self) -> "ExperimentConfig":
        """Check every section again, then what spans them: for code that changes fields after building."""
        for section in self.sections().values():
            section.check()
        self.check_across()
        return self

    def check_across(self) -> None:
        for check in _CHECKS:
            check(self)

    def to_dict(self) -> dict:
        """Every section as plain values, the ones kept as written included."""
        return {**{name: to_plain(s) for name, s in self.sections().items()}, **copy.deepcopy(self._raw)}

    def __eq__(self, other) -> bool:
        return isinstance(other, ExperimentConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"ExperimentConfig({', '.join(f'{k}={v!r}' for k, v in self.sections().items())})"


for _cls in (ModelConfig, DataConfig, TrainConfig, InferenceConfig):
    register_section(_cls)
OWN_SECTIONS = tuple(SECTION_CLASSES)  # what deeplab declares: model, data, train, inference; the rest come from above


def to_plain(obj: Any) -> Any:
    """Dataclasses and experiments -> dicts, tuples -> lists: what YAML and weights_only checkpoints can hold."""
    if isinstance(obj, ExperimentConfig):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj



# ---------------------------------------------------------------------------------------------------------
# Building a config from plain values, naming where a mistake came from


def _build(cls, values: dict, section: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected a mapping, got {type(values).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{section}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**values)


def _located(error: ConfigError, where: Optional[str], sources: Optional[dict] = None) -> ConfigError:
    """The error prefixed with what the user wrote it in: the --set items or flags that set its fields,
    else the file (``where``)."""
    labels = []
    for key in error.fields:
        labels += [label for label in (sources or {}).get(key, []) if label not in labels]
    prefix = ", ".join(labels) or where
    return ConfigError(f"{prefix}: {error}" if prefix else str(error), error.fields)


def model_config_from_dict(values: dict) -> ModelConfig:
    return _build(ModelConfig, values, "model")


def _moved_fields(values: dict) -> None:
    """Fields a section gave up to another (a class's ``MOVED``: old name -> SECTION.FIELD, e.g. an output
    stride -> inference.output_stride), moved in place so files written before the move still load. A moved
    value never overrides one written at its new place; null (the old default) is dropped."""
    for name, cls in SECTION_CLASSES.items():
        section = values.get(name)
        for old, new in getattr(cls, "MOVED", {}).items():
            if not isinstance(section, dict) or old not in section:
                continue
            value = section.pop(old)
            target, field_name = new.split(".")
            target_values = values.get(target) or {}
            if value is not None and isinstance(target_values, dict):
                target_values.setdefault(field_name, value)
                values[target] = target_values


def _raw_sections(values: dict) -> dict:
    """The sections no imported package registered, kept as written; a near-miss of a registered name is a
    typo, answered now."""
    raw = {}
    for name in sorted(set(values) - set(SECTION_CLASSES)):
        close = difflib.get_close_matches(str(name), list(SECTION_CLASSES), n=1, cutoff=0.75)
        if close or not isinstance(values[name], (dict, type(None))) or not str(name).isidentifier():
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"unknown section(s) {name}; {hint}known: {', '.join(SECTION_CLASSES)}")
        raw[name] = copy.deepcopy(values[name])
    return raw


def experiment_from_dict(values: dict, where: Optional[str] = "config", sources: Optional[dict] = None
                         ) -> ExperimentConfig:
    """An ExperimentConfig from plain values (YAML, a checkpoint); a ConfigError names ``where`` (or the
    ``--set`` items in ``sources``: SECTION.FIELD -> labels) and the field."""
    values = copy.deepcopy(values or {})
    try:
        _moved_fields(values)
        raw = _raw_sections(values)
        built = {name: _build(cls, values.get(name), name) for name, cls in SECTION_CLASSES.items()}
        return ExperimentConfig(raw, **built)
    except ConfigError as e:
        raise _located(e, where, sources) from None


def _parse_value(text: str):
    """A command-line value as YAML would read it: 8 -> int, [6,12,18] -> list, null -> None."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _apply(values: dict, overrides) -> dict:
    """Apply ``SECTION.FIELD=VALUE`` items (or ``(item, label)`` pairs, label naming the flag the user typed)
    to a plain config dict in place; returns SECTION.FIELD -> [labels] for error messages."""
    sources: dict = {}
    for entry in overrides or []:
        item, label = entry if isinstance(entry, tuple) else (entry, f"--set {entry}")
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or section not in SECTION_CLASSES:
            raise ConfigError(f"{label}: expected SECTION.FIELD=VALUE with SECTION one of "
                              f"{', '.join(SECTION_CLASSES)} (the sections this command knows)")
        known = [f.name for f in fields(SECTION_CLASSES[section])]
        if name not in known:
            raise ConfigError(f"{label}: {section} has no field {name!r}; known: {', '.join(sorted(known))}")
        if values.get(section) is None:
            values[section] = {}
        values[section][name] = _parse_value(raw)
        sources.setdefault(f"{section}.{name}", []).append(label)
    return sources


PATH_FIELDS = {"train.init_from": "file", "train.pretrained_backbone": "file", "data.root": "folder"}


def _is_torch_file(path: Path) -> bool:
    """What torch.save writes: a zip archive (torch >= 1.6) or a pickle (protocol 2+ starts with 0x80)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _path_problem(cfg: ExperimentConfig, key: str) -> Optional[str]:
    """Why a path field's file or folder cannot be used on this machine, or None."""
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    if not value or "://" in value or (key == "data.root" and cfg.data.dataset == "synthetic"):
        return None  # unset, remote (s3://, gs://: the workers read it), or not needed
    path = Path(value).expanduser()
    if PATH_FIELDS[key] == "folder":
        return None if path.is_dir() else "dataset folder not found"
    if not path.is_file():
        return "is a folder, not a weights file" if path.is_dir() else "no such file"
    return None if _is_torch_file(path) else "is not a PyTorch weights file (torch.save / .pth / .ckpt)"


def _check_paths(cfg: ExperimentConfig, keys, where: Optional[str], sources: dict) -> None:
    for key in keys:
        problem = _path_problem(cfg, key)
        if problem:
            section, name = key.split(".")
            error = ConfigError(f"{key}={getattr(getattr(cfg, section), name)}: {problem}", (key,))
            raise _located(error, where, sources)


def experiment_with_overrides(values: dict, where: Optional[str], overrides, all_paths: bool) -> ExperimentConfig:
    """Values + overrides -> a checked ExperimentConfig; paths checked where the user gave them (every path
    field for a file the user named, only overridden ones on top of a checkpoint's experiment)."""
    sources = _apply(values, overrides)
    cfg = experiment_from_dict(values, where, sources)
    _check_paths(cfg, PATH_FIELDS if all_paths else [k for k in PATH_FIELDS if k in sources], where, sources)
    return cfg


def load_config(path: Optional[str] = None, overrides: Optional[list] = None) -> ExperimentConfig:
    """Read a YAML experiment file (None: the embedded defaults) and apply ``--set`` overrides; the paths it
    names must exist."""
    values: dict = {}
    where = None
    if path:
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{p}: expected a mapping of sections, got {type(values).__name__}")
    return experiment_with_overrides(values, where, overrides, all_paths=True)


def save_config(cfg: ExperimentConfig, path) -> None:
    """Write a config as YAML atomically."""
    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
