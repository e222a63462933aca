"""What cluster.segment segments: INPUT (a folder, a list file, one image or an object-store prefix) listed
once on the driver into InputItems, each with the relative name its outputs take, on one pyarrow filesystem.

Apart from the outputs and the pipeline because listing is pure bookkeeping over files: it runs before Ray
starts and is tested without it (tests/test_segment_inputs.py)."""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Optional

from deeplab.cli import UserError, error_line
from deeplab.fileio import is_uri
from deeplab.predict import IMAGE_SUFFIXES


class InputError(UserError, ValueError):
    """INPUT cannot be listed (missing, empty, mixed filesystems); one line naming it."""


@dataclass
class InputItem:
    path: str  # on `filesystem` (for s3: bucket/key), as listed: an object store reads the key as written
    uri: str  # as the user knows it, for messages and the manifest
    name: str  # relative output stem, posix, normalized ("city/0001" -> OUTPUT/city/0001.png)
    kept: str = ""  # kinds of output OUTPUT held when it was listed ("labels,color"): actors on a store keep them


@dataclass
class InputSet:
    filesystem: object  # a pyarrow.fs.FileSystem
    items: list
    ignored: int = 0  # files left out by --extensions
    refused: list = field(default_factory=list)  # (uri, reason): inputs never read nor written (manifest: failed)


def _filesystem(location: str):
    """(pyarrow filesystem, path on it) for a local path, file:// or an object-store URI (s3://, gs://)."""
    import pyarrow.fs as pafs

    if is_uri(location):
        from deeplab.checkpoint import remote_filesystem  # torch: not in the workers that only decode

        try:
            return remote_filesystem(location)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for bad URIs and unreachable stores
            raise InputError(f"{location}: cannot open ({error_line(e)})") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))


def _uri(scheme_root: str, path: str) -> str:
    """How a listed path is shown: with its scheme for object stores, as a plain path locally."""
    return f"{scheme_root}{path}" if scheme_root else path


def _relative(path: str, root: str) -> Optional[str]:
    """``path`` under ``root`` as a normalized relative posix path, or None when it is not inside root: an
    object-store key may hold '..' and '.' segments (S3 keeps them as written), which must never climb out
    of INPUT into an output name."""
    p, r = path.lstrip("/"), root.strip("/")
    if r and not p.startswith(r + "/"):
        return None
    rel = posixpath.normpath(p[len(r) + 1:] if r else p)
    return None if rel in (".", "..") or rel.startswith("../") or rel.startswith("/") else rel


OUTSIDE = "outside INPUT ('..' in its path climbs out of {root}); not segmented"


def _output_names(rels: list) -> list:
    """Output stems: the relative path without its suffix, or with it where two inputs would collide
    (a/x.jpg and a/x.png -> a/x.jpg, a/x.png)."""
    stems = [str(PurePosixPath(r).with_suffix("")) for r in rels]
    seen: dict = {}
    for s in stems:
        seen[s] = seen.get(s, 0) + 1
    return [s if seen[s] == 1 else r for s, r in zip(stems, rels)]


def _walk_local(root: str, exclude: Optional[str]) -> list:
    """(path, rel) of the regular files under a local folder, following links to folders but entering each
    real folder once and listing each real file once, so a link loop lists nothing twice; a file reached
    both as itself and through a link is named by itself. Hidden entries and OUTPUT (``exclude``) are skipped."""
    skip = os.path.realpath(exclude) if exclude else None
    seen_dirs, files_by_identity = set(), {}
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen_dirs or (skip and (real + "/").startswith(skip.rstrip("/") + "/")):
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs[:] = sorted((d for d in dirs if not d.startswith(".")),
                         key=lambda name, folder=folder: (os.path.islink(os.path.join(folder, name)), name))
        for f in (f for f in files if not f.startswith(".")):
            path = os.path.join(folder, f)
            if not os.path.isfile(path):  # regular files (or links to one) only: no FIFOs, no broken links
                continue
            link = os.path.islink(path) or os.path.islink(folder)
            identity = os.path.realpath(path) if os.path.islink(path) else os.path.join(real, f)
            rank = (link, path)
            if identity not in files_by_identity or rank < files_by_identity[identity]:
                files_by_identity[identity] = rank
    return [(path, os.path.relpath(path, root).replace(os.sep, "/")) for _, path in files_by_identity.values()]


def _walk_store(fs, root: str, exclude: Optional[str] = None):
    """(path, rel or None when the key climbs out of root) of the objects under a prefix, hidden ones and those
    under ``exclude`` (OUTPUT's prefix) skipped."""
    import pyarrow.fs as pafs

    skip = exclude.strip("/") + "/" if exclude else None
    for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if f.type != pafs.FileType.File or (skip and f.path.lstrip("/").startswith(skip)):
            continue
        rel = _relative(f.path, root)
        if rel is None or not any(part.startswith(".") for part in rel.split("/")):
            yield f.path, rel


def _list_folder(source: str, exclude: Optional[str], extensions, fs=None) -> InputSet:
    """``fs``: a pyarrow filesystem to list ``source`` (a path on it) with, in place of the one its URI names."""
    import pyarrow.fs as pafs

    fs, root = (fs, source) if fs is not None else _filesystem(source)
    scheme = source.split("://", 1)[0] + "://" if is_uri(source) else ""
    local = isinstance(fs, pafs.LocalFileSystem)
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"{source}: no such folder or prefix")
        if info.type == pafs.FileType.File:  # one object
            return InputSet(fs, [InputItem(root, _uri(scheme, root), PurePosixPath(root).stem)])
        listed = _walk_local(root, exclude) if local else list(_walk_store(fs, root, exclude))
    except OSError as e:
        raise InputError(f"{source}: cannot list ({error_line(e)})") from None
    paths, refused, ignored = {}, [], 0
    for path, rel in sorted(listed, key=lambda x: x[0]):
        if rel is None:
            refused.append((_uri(scheme, path), OUTSIDE.format(root=_uri(scheme, root))))
        elif extensions and PurePosixPath(rel).suffix.lower() not in extensions:
            ignored += 1
        elif rel in paths.values():  # two keys that normalize to one name ('a/../b.jpg' and 'b.jpg')
            refused.append((_uri(scheme, path), f"names the same output as another input ({rel}); not segmented"))
        else:
            paths[path] = rel
    names = _output_names(list(paths.values()))
    items = [InputItem(p, _uri(scheme, p), n) for p, n in zip(paths, names)]
    return InputSet(fs, items, ignored, [(uri, f"{uri}: {why}") for uri, why in refused])


def _list_entries(source: str, text: str) -> list:
    base = os.path.dirname(os.path.abspath(source))
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append(line if is_uri(line) or os.path.isabs(line) else os.path.join(base, line))
    if not entries:
        raise InputError(f"{source}: the list names no files")
    return entries


def _normalized(path: str, store: bool) -> tuple:
    """(normalized path, identity) of a listed path; (None, None) for an object-store key that climbs out of
    its bucket. A local file's identity is its real path, so a file listed through a link is one file."""
    if not store:
        return os.path.normpath(path), os.path.realpath(path)
    bucket = path.lstrip("/").split("/", 1)[0]
    rel = _relative(path, bucket)
    return (None, None) if rel is None else (f"{bucket}/{rel}",) * 2


def _list_file(source: str) -> InputSet:
    """A text file of paths: blank lines and # comments skipped; relative paths are relative to its folder.
    Outputs are named from the normalized paths relative to their common folder; a file listed twice (also
    through a link or '..') is segmented once; an object-store key that climbs out of its bucket is refused."""

    try:
        text = Path(source).read_text()
    except UnicodeDecodeError:
        raise InputError(f"{source}: not a text file listing paths (nor an image: its suffix is not one of "
                         f"{', '.join(IMAGE_SUFFIXES)})") from None
    entries = _list_entries(source, text)
    schemes = {e.split("://", 1)[0] if is_uri(e) else "" for e in entries}
    if len(schemes) > 1:
        raise InputError(f"{source}: mixes filesystems ({', '.join(sorted(s or 'local' for s in schemes))}); "
                         "list one kind of path per file")
    fs, _ = _filesystem(entries[0])
    prefix = next(iter(schemes)) + "://" if is_uri(entries[0]) else ""
    store = bool(prefix) and prefix != "file://"
    unique, seen, refused = {}, set(), []  # path to read -> its normalized path
    for path in (_filesystem(e)[1] if prefix else e for e in entries):
        normalized, identity = _normalized(path, store)
        if normalized is None:
            bucket = path.lstrip("/").split("/", 1)[0]
            refused.append((_uri(prefix, path), f"{_uri(prefix, path)}: " + OUTSIDE.format(root=prefix + bucket)))
        elif identity not in seen:
            seen.add(identity)
            unique[path] = normalized
    folders = [posixpath.dirname(n) for n in unique.values()]
    common = (posixpath.commonpath(folders) if len(folders) > 1 else folders[0]) if folders else ""
    names = _output_names([posixpath.relpath(n, common or ".") for n in unique.values()])
    items = [InputItem(p, _uri(prefix, p), n) for p, n in zip(unique, names)]
    return InputSet(fs, items, refused=refused)


def list_inputs(source: str, exclude: Optional[str] = None, extensions=None, filesystem=None) -> InputSet:
    """Every input image with its output name. ``exclude``: a folder or prefix never to list (OUTPUT);
    ``extensions``: keep only these suffixes (folders and prefixes; a list file is taken as written);
    ``filesystem``: a pyarrow filesystem on which ``source`` is a folder or prefix (tests, custom stores)."""
    extensions = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions or ()}

    if not is_uri(source) and os.path.isfile(source):
        if Path(source).suffix.lower() in IMAGE_SUFFIXES:  # one image: a list of one
            path = os.path.abspath(source)
            return InputSet(_filesystem(path)[0], [InputItem(path, path, Path(path).stem)])
        inputs = _list_file(source)
    elif filesystem is not None:
        inputs = _list_folder(source, exclude, extensions, filesystem)
    elif not is_uri(source) and not os.path.exists(source):
        raise InputError(f"{source}: no such folder or list file")
    else:
        inputs = _list_folder(source, exclude, extensions)
    if not inputs.items and not inputs.refused:
        raise InputError(f"{source}: no files to segment" + (f" ({inputs.ignored} with other extensions)"
                                                            if inputs.ignored else ""))
    return inputs
