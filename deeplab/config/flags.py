"""Command lines: ``--config``, ``--set`` and the shorthand flags (`Alias`) every command shares, through one
override path.

Apart from the experiment so that reading a config (a file, a checkpoint's experiment) needs no argparse, and a
command's flags read as one small module: a shorthand flag is one config field, so a flag and its field can never
disagree.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields
from typing import Optional

from .experiment import SECTION_CLASSES, ExperimentConfig, experiment_with_overrides, load_config
from .sections import PAPER_SCALES
from .values import show_value


def _default(cls, name):
    f = next(f for f in fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default



@dataclass(frozen=True)
class Alias:
    """A shorthand flag for one config field: ``--output-stride 8`` means ``--set inference.output_stride=8``.

    The value goes through the same override path as ``--set`` (parsed as YAML, checked by the section's
    dataclass), so a flag and its field can never disagree. ``switch``: a flag without a value that sets the
    field to ``value`` (true unless given, e.g. --multi-scale: the paper's scales); ``nargs="+"``: several
    values become a YAML list.
    """

    flag: str
    key: str  # SECTION.FIELD
    help: str = ""
    nargs: Optional[str] = None
    switch: bool = False
    metavar: Optional[str] = None
    choices: Optional[tuple] = None  # the words argparse accepts (the field's check still applies)
    value: str = "true"  # what a switch sets, as YAML
    default_note: Optional[str] = None  # --help's words for the default, where the field's own would mislead

    def default(self):
        section, name = self.key.split(".", 1)
        return _default(SECTION_CLASSES[section], name)

    def override(self, value) -> Optional[str]:
        """The ``SECTION.FIELD=VALUE`` text for a parsed command-line value (None: flag not given)."""
        if value is None:
            return None
        if self.switch:
            return f"{self.key}={self.value}"
        if isinstance(value, list):
            return f"{self.key}=[{', '.join(value)}]"
        return f"{self.key}={value}"

    def label(self, value) -> str:
        """The flag as the user typed it, for error messages."""
        if self.switch:
            return self.flag
        return f"{self.flag} {' '.join(value) if isinstance(value, list) else value}"


# The inference section's flags, shared by every command that predicts or evaluates (the section checks them).
INFERENCE_ALIASES = [
    Alias("--output-stride", "inference.output_stride",
          "run at this output stride (default: the model's own; the paper evaluates at 8)"),
    Alias("--scales", "inference.scales", "input scales whose softmax probabilities are averaged",
          nargs="+", metavar="S"),
    Alias("--multi-scale", "inference.scales", f"the paper's scales {', '.join(map(str, PAPER_SCALES))}",
          switch=True, value=show_value(PAPER_SCALES)),
    Alias("--flip", "inference.flip", "also average left-right flipped inputs", switch=True),
    Alias("--window", "inference.window", "sliding windows of PX x PX (1/3 overlap) for inputs larger than that",
          metavar="PX"),
]
ALPHA_ALIAS = Alias("--alpha", "inference.alpha", "overlay opacity of the class colours (0-1)")


def add_config_args(parser: argparse.ArgumentParser, required: bool = False, aliases=()) -> None:
    """The config flags every command shares: --config FILE, repeated --set SECTION.FIELD=VALUE, and the
    command's shorthand ``aliases`` (each one config field; --help shows the field and its default)."""
    parser.add_argument("--config", required=required,
                        help=f"experiment YAML (sections {'/'.join(SECTION_CLASSES)})" + ("" if required else
                             "; default: a model file's own experiment where the command reads one, else the "
                             "built-in defaults"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config field, e.g. --set model.output_stride=8 (repeatable; none by "
                             "default)")
    for alias in aliases:
        section, name = alias.key.split(".", 1)
        if section not in SECTION_CLASSES or name not in {f.name for f in fields(SECTION_CLASSES[section])}:
            raise ValueError(f"alias {alias.flag}: {alias.key} is not a config field")
        text = f"{alias.help} ({alias.key}; {alias.default_note or f'config default: {alias.default()}'})".lstrip()
        if alias.switch:
            parser.add_argument(alias.flag, action="store_const", const=True, default=None, help=text)
        else:
            parser.add_argument(alias.flag, nargs=alias.nargs, default=None, metavar=alias.metavar,
                                choices=alias.choices, help=text)
    parser.set_defaults(_config_aliases=tuple(aliases))


def _labelled_overrides(args: argparse.Namespace) -> list:
    """(SECTION.FIELD=VALUE, what the user typed) for ``--set`` items, then the shorthand flags given."""
    items = [(item, f"--set {item}") for item in getattr(args, "overrides", None) or []]
    for alias in getattr(args, "_config_aliases", ()):
        value = getattr(args, alias.flag.lstrip("-").replace("-", "_"), None)
        item = alias.override(value)
        if item is not None:
            items.append((item, alias.label(value)))
    return items


def config_from_args(args: argparse.Namespace, base: Optional[ExperimentConfig] = None,
                     extra: tuple = ()) -> ExperimentConfig:
    """The experiment a command runs: ``--config`` (else ``base``, e.g. a checkpoint's own experiment, else the
    defaults), then ``--set`` and the shorthand flags, through one override path. ``extra``: further
    ``(SECTION.FIELD=VALUE, label)`` items a command derives from its own flags, applied last."""
    overrides = _labelled_overrides(args) + list(extra)
    if getattr(args, "config", None) or base is None:
        return load_config(getattr(args, "config", None), overrides)
    return experiment_with_overrides(base.to_dict(), "checkpoint config", overrides, all_paths=False)
