"""Atomic writes: the one way every command writes a file that someone else reads.

A reader (a resumed run, Ray, a user, another command) sees either the old file or the whole new one, never
half of one: the content goes to a temporary name in the same folder, is flushed to disk, and is renamed over
the target. On any failure, Ctrl-C included, the temporary file is removed and the target is left untouched.
"""
from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .cli import OutputError

FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_uri(path) -> bool:
    """Whether ``path`` is a URI that pyarrow's filesystems open (s3://, gs://, file://...) rather than a
    local path; the one test for it, so every command reads the same paths remotely."""
    return "://" in str(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path) -> Path:
    """Create an output folder (and its parents); one-line OutputError when a file stands in the way or the
    folder cannot be made."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(path, "it is a file; expected a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(path, e.strerror or type(e).__name__) from None
    return path


def _output_error(path: Path, tmp: Path, error: BaseException):
    """The OutputError for a failed write of ``path``, or None when ``error`` is not about writing it.
    The cause may sit in the exception chain: torch.save re-raises a file object's OSError as RuntimeError.
    A nested atomic write (a writer that is itself atomic, handed our temporary path) names our target."""
    if isinstance(error, OutputError) and str(error.path) == str(tmp):
        return OutputError(path, error.reason, error.exit_code)
    seen = error
    while seen is not None and not isinstance(seen, OutputError):
        if isinstance(seen, OSError):
            if seen.errno in FULL_DISK:
                return OutputError(path, "disk full or file size limit reached", exit_code=1)
            if str(seen.filename) in (str(tmp), str(path)):
                return OutputError(path, seen.strerror or type(seen).__name__)
        seen = seen.__cause__ or seen.__context__
    return None


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on a clean exit it replaces ``path``.

    The temporary name keeps the suffix (``.model.tmp123.onnx``) so writers that pick a format from the
    extension (Pillow, onnx) still do. A failure to write (no folder, a folder in the way, no permission,
    full disk) is an OutputError naming ``path``; the temporary file never stays behind. Writers in C++
    (torch.save) lose the errno of a path they open themselves: hand them ``open(tmp, "wb")`` instead.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    if path.is_dir():
        raise OutputError(path, "it is a folder; expected a file name")
    if not path.parent.is_dir():
        raise OutputError(path, f"{'no folder' if not path.parent.exists() else 'not a folder'}: {path.parent}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except Exception as e:
        translated = _output_error(path, tmp, e)
        if translated is None:
            raise
        raise translated from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def copy_file_atomic(source, destination) -> Path:
    with atomic_path(destination) as tmp:
        shutil.copyfile(source, tmp)
    return Path(destination)
