"""What every export command shares beyond deeplab.cli's edge (one-line errors, Ctrl-C): its progress lines
on stdout (export's modules log them; a command shows them), and the flag that sets a boolean field false."""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from deeplab.cli import UserError, on_interrupt
from deeplab.config import Alias, add_config_args, config_from_args

from .opset import check_onnx_file, check_opset


class ExportError(UserError, RuntimeError):
    """An exported model failed a check (parity with PyTorch, accuracy); one line saying what and by how much."""

    exit_code = 1


@dataclass(frozen=True)
class SwitchOff(Alias):
    """A flag without a value that sets a boolean field to false (``--static``: ``export.dynamic=false``)."""

    switch: bool = True

    def override(self, value) -> Optional[str]:
        return None if value is None else f"{self.key}=false"


class _Stdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (a test's capture, a pipe), flushed after each line."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def say_unwritten_on_stop(out) -> None:
    """A stop before ``out`` is written keeps nothing of it: its files are written under temporary names that
    are removed on the way out, an older file there stays as it was, and nothing is resumed."""
    on_interrupt(f"{out} not written (a file already there is unchanged); the same command starts over")


def show_progress(level: int = logging.INFO) -> None:
    """Print the ``export`` loggers' lines as plain lines on stdout (idempotent). They stop propagating to the
    root logger, which libraries such as onnxruntime's quantizer configure to print on stderr."""
    logger = logging.getLogger("export")
    logger.propagate = False
    if not any(isinstance(h, _Stdout) for h in logger.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)


def source_and_config(args, backend: str) -> tuple:
    """(source path, Checkpoint or None for an ONNX file, experiment) of a command that takes either: the
    experiment starts from the checkpoint's own unless --config says otherwise. The opset is checked against
    ``backend`` (the ONNX file's, or the one the checkpoint will be exported at) before any work."""
    from deeplab.checkpoint import load_checkpoint

    src = Path(args.source)
    if not src.is_file():
        raise UserError(f"{src}: no such file")
    ckpt = None if src.suffix == ".onnx" else load_checkpoint(src)
    cfg = config_from_args(args, base=ckpt.experiment if ckpt is not None else None)
    if ckpt is None:
        check_onnx_file(src, backend)
    else:
        cfg.export.opset = check_opset(cfg.export.opset, backend)
    return src, ckpt, cfg


def source_parser(prog: str, description: str, output_help: str, force_help: str) -> argparse.ArgumentParser:
    """The arguments of a command that turns a checkpoint or ONNX file into another model file."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("source", help="a checkpoint (exported to ONNX first) or an ONNX file from export.to_onnx")
    p.add_argument("-o", "--output", help=output_help)
    p.add_argument("--calib-data", metavar="FOLDER",
                   help="folder of INT8 calibration images (default: the config's data section, train split)")
    p.add_argument("--force", action="store_true", help=force_help)
    return p


def parse_and_run(parser: argparse.ArgumentParser, aliases, argv, run) -> int:
    """Add the config flags and `aliases`, parse `argv`, show progress, and run(args)."""
    add_config_args(parser, aliases=aliases)
    args = parser.parse_args(argv)
    show_progress()
    return run(args)
