"""Atomic writes: the one way every command writes a file that someone else reads.

A reader (a resumed run, Ray, a user, another command) sees either the old file or the whole new one, never
half of one: the content goes to a temporary name in the same folder, is flushed to disk, and is renamed over
the target. On any failure, Ctrl-C included, the temporary file is removed and the target is left untouched.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on a clean exit it replaces ``path``.

    The temporary name keeps the suffix (``.model.tmp123.onnx``) so writers that pick a format from the
    extension (Pillow, onnx) still do. The parent folder must exist.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def copy_file_atomic(source, destination) -> Path:
    with atomic_path(destination) as tmp:
        shutil.copyfile(source, tmp)
    return Path(destination)
