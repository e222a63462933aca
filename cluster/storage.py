"""Where a run or an OUTPUT lives: a local folder or an object-store URL, opened as Ray Train opens its storage.

Training writes its run folders here and batch inference (cluster.segment) its OUTPUT, so the resolution of a
storage path into a pyarrow filesystem and a path is one piece apart from both: serving and batch inference
use it without importing training (cluster.train).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from deeplab.fileio import is_uri


def resolve_storage_path(storage_path: str) -> str:
    """Remote URIs (s3://, gs://, ...) as given; local paths made absolute against the current directory."""
    return storage_path if is_uri(storage_path) else os.path.abspath(os.path.expanduser(storage_path))


@dataclass(frozen=True)
class RunFolder:
    """Where a run lives: ``path`` on ``filesystem`` (pyarrow) and ``url``, the same folder as a user types it.

    Built from the storage path the way Ray Train resolves it (the URL's filesystem), never by appending to
    the URL's text: ``s3://b/runs?endpoint_override=h:9000&scheme=http`` and NAME give ``b/runs/NAME`` on that
    filesystem (where Ray writes the checkpoints) and ``s3://b/runs/NAME?endpoint_override=h:9000&scheme=http``
    for the user, a URL every command that reads ``s3://`` opens on the same server. Credentials written into
    the URL (``s3://KEY:SECRET@b/...``) are left out of ``url``. A local folder is its absolute path."""
    filesystem: object
    path: str
    scheme: str = ""  # "" for a local folder
    query: str = ""

    @property
    def url(self) -> str:
        if not self.scheme:
            return self.path
        return f"{self.scheme}://{self.path}" + (f"?{self.query}" if self.query else "")

    @property
    def local(self) -> bool:
        return not self.scheme

    def child(self, name: str) -> "RunFolder":
        return replace(self, path=f"{self.path.rstrip('/')}/{name}")


def storage_folder(location: str) -> RunFolder:
    """A local folder or an object-store URL as a RunFolder, opened as Ray Train opens its storage_path: run
    storage here, cluster.segment's OUTPUT."""
    import pyarrow.fs

    storage = resolve_storage_path(location)
    if not is_uri(storage):
        return RunFolder(pyarrow.fs.LocalFileSystem(), storage)
    from deeplab.checkpoint import remote_filesystem  # pyarrow's own (s3, gs, file), else fsspec's

    filesystem, path = remote_filesystem(storage)
    parts = urlsplit(storage)
    return RunFolder(filesystem, path.rstrip("/"), parts.scheme, parts.query)


def run_folder(storage_path: str, name: str) -> RunFolder:
    """The run folder ``<storage_path>/<name>`` (see RunFolder); remote filesystems as Ray Train opens them."""
    return storage_folder(storage_path).child(name)
