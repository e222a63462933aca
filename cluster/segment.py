"""python -m cluster.segment MODEL INPUT -o OUTPUT [--workers N] [--color]

Segment a whole image collection on a Ray cluster with Ray Data: the files are read through pyarrow's
filesystems and decoded in parallel tasks, then a pool of model actors (map_batches with a callable class)
runs the model on batches of same-size images. MODEL is a checkpoint (.ckpt), an ONNX file (FP32, FP16 or
INT8 Q/DQ), an OpenVINO IR (.xml + .bin) or a TensorRT engine (+ its sidecar); every file of it is shipped to
the nodes, and classes, output stride and mean/std come from the file itself. A one-file MODEL may be an
object-store URL (the ``s3://.../best.ckpt`` cluster.train prints): the driver fetches it first. INPUT is a
folder (recursive), a text file listing paths (one a line, relative to the list's folder or absolute), or
an object-store prefix such as s3://bucket/photos/.

For every image OUTPUT gets NAME.png (class ids) and, with --color, NAME_color.png and NAME_overlay.png,
at the image's relative path, plus manifest.jsonl (one JSON line per image: path, size, seconds, pixels per
class, or the reason it failed) and model.json (the model, by content hash). OUTPUT is a folder (on a multi-node
cluster one every node mounts at the same path) or an object-store prefix (s3://bucket/masks, gs://...) that
the model actors write to with their node's credentials; there the manifest's records go to part objects
(manifest.parts/) as they arrive, merged into manifest.jsonl at the end or at a stop. Running the same command again
skips images already done; with another model it stops before any work unless --overwrite (which redoes
every image). A killed actor is replaced and its images redone, each output written once. Unreadable files are listed as failed and the
run goes on; it exits 1 at the end if any failed (2 for a bad command line, model or input).
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Optional

from cluster.infer import CHECKPOINT_STRIDE_ALIAS, fetch_model, model_parser
from cluster.storage import RunFolder, storage_folder
from deeplab.cli import OutputError, UserError, command, error_line, on_interrupt
from deeplab.config import ALPHA_ALIAS, Alias, InferenceConfig, add_config_args, config_from_args
from deeplab.fileio import atomic_path, ensure_dir, is_uri
from deeplab.predict import PREDICTION_KINDS  # in expected_outputs' order; deeplab.predict loads no torch
from deeplab.progress import Progress

from cluster.config import SegmentConfig

MANIFEST = "manifest.jsonl"
MANIFEST_PARTS = "manifest.parts"  # on an object store: the records of a run not yet merged into manifest.jsonl
# temporary names of atomic writes: deeplab.predict's .NAME.png.PID.tmp and deeplab.fileio's .NAME.tmpPID.png
STALE_TEMP = re.compile(r"^\..+(\.\d+\.tmp|\.tmp\d+\.png)$")


class InputError(UserError, ValueError):
    """INPUT cannot be listed (missing, empty, mixed filesystems); one line naming it."""


# ------------------------------------------------------------------------------------------------- input
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
        from deeplab.checkpoint import _remote_filesystem  # torch: not in the workers that only decode

        try:
            return _remote_filesystem(location)
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
        links_last = lambda name: (os.path.islink(os.path.join(folder, name)), name)  # noqa: E731
        dirs[:] = sorted((d for d in dirs if not d.startswith(".")), key=links_last)
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
    from deeplab.predict import IMAGE_SUFFIXES

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
    from deeplab.predict import IMAGE_SUFFIXES

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


# ------------------------------------------------------------------------------------------------ output
class Output:
    """OUTPUT: a local folder, or a prefix on an object store (s3://bucket/masks, with
    ?endpoint_override=HOST:PORT&scheme=http for an S3-compatible server; gs://...). A local file is written
    atomically (temporary name, then rename); an object is one PUT (s3:// opens with allow_delayed_open), so it
    is whole or absent and needs no temporary. ``url`` names OUTPUT in messages (its query kept, credentials
    left out); the model actors open it again from ``url`` on their node with that node's credentials (the
    environment, as Ray Train's storage), so no filesystem object or secret travels from the driver."""

    def __init__(self, location):
        location = str(location)
        if location.startswith("file://"):
            location = location[len("file://"):]
        try:
            self.folder: RunFolder = storage_folder(location)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for bad URIs and unreachable stores
            raise OutputError(location, f"cannot open it: {error_line(e)}") from None
        self.local, self.path, self.url = self.folder.local, self.folder.path, self.folder.url

    def __str__(self) -> str:
        return self.url

    def url_of(self, rel: str) -> str:
        return self.folder.child(rel).url

    def _key(self, rel: str) -> str:
        return f"{self.path}/{rel}"

    @contextmanager
    def _store(self, rel: str = ""):
        """A store's refusal (credentials, no such bucket, unreachable) as one line naming OUTPUT or the file."""
        try:
            yield
        except (FileNotFoundError, OutputError):
            raise
        except OSError as e:
            raise OutputError(self.url_of(rel) if rel else self.url, error_line(e)) from None

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        if self.local:
            return os.path.isdir(self.path)
        with self._store():
            return self.folder.filesystem.get_file_info(self.path).type != pafs.FileType.NotFound

    def make(self) -> None:
        """A local folder is made; a prefix needs nothing but its bucket, which must exist (checked once here,
        not found by every image failing)."""
        import pyarrow.fs as pafs

        if self.local:
            ensure_dir(self.path)
            return
        bucket = self.path.split("/", 1)[0]
        with self._store():
            missing = self.folder.filesystem.get_file_info(bucket).type == pafs.FileType.NotFound
        if missing:
            raise OutputError(self.url, f"no bucket {bucket}; create it first")

    def files(self, under: str = "") -> set:
        """Every file under OUTPUT (or its folder ``under``), relative (posix): one walk or one listing, not a
        request per image."""
        import pyarrow.fs as pafs

        root = self._key(under) if under else self.path
        if self.local:
            found = set()
            for folder, _, files in os.walk(root):
                rel = os.path.relpath(folder, self.path).replace(os.sep, "/")
                found.update(f if rel == "." else f"{rel}/{f}" for f in files)
            return found
        selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
        with self._store(under):
            listed = self.folder.filesystem.get_file_info(selector)
        return {f.path[len(self.path) + 1:] for f in listed if f.type == pafs.FileType.File}

    def read(self, rel: str) -> Optional[bytes]:
        """A file's bytes, or None when it does not exist."""
        if self.local:
            path = Path(self.path, rel)
            return path.read_bytes() if path.is_file() else None
        try:
            with self._store(rel), self.folder.filesystem.open_input_stream(self._key(rel)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write(self, rel: str, data: bytes) -> None:
        """Whole or not at all: locally a temporary name renamed over ``rel`` (its folder made), on a store one PUT."""
        if self.local:
            path = Path(self.path, rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
            return
        with self._store(rel), self.folder.filesystem.open_output_stream(self._key(rel)) as f:
            f.write(data)

    def remove(self, rels, present: Optional[set] = None) -> None:
        """Delete these files where they exist; ``present``: OUTPUT's listing (files()), so that on a store
        only the objects there cost a request."""
        for rel in dict.fromkeys(rels):
            if present is not None and rel not in present:
                continue
            if self.local:
                Path(self.path, rel).unlink(missing_ok=True)
                continue
            try:
                with self._store(rel):
                    self.folder.filesystem.delete_file(self._key(rel))
            except FileNotFoundError:
                pass

    def remove_folder(self, rel: str) -> None:
        """Delete the folder ``rel`` and everything in it (on S3: batched deletes, and no empty folder marker left,
        as deleting its last object one by one leaves)."""
        if self.local:
            shutil.rmtree(Path(self.path, rel), ignore_errors=True)
            return
        try:
            with self._store(rel):
                self.folder.filesystem.delete_dir(self._key(rel))
        except FileNotFoundError:
            pass


def as_output(out) -> Output:
    """OUTPUT as given to the library functions: an Output, or a local folder (Path or str) or URL."""
    return out if isinstance(out, Output) else Output(out)


# ---------------------------------------------------------------------------------------------- manifest
def _parse_records(text: str, records: dict) -> None:
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed driver
        if isinstance(record, dict) and "path" in record:
            records[record["path"]] = record


def _lines(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


class Manifest:
    """OUTPUT/manifest.jsonl in a local folder: one JSON record per image (the last one for a path wins).
    Appended as results arrive, so a killed driver loses nothing written; rewritten at the end with one line
    per image."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: dict = {}
        if self.path.is_file():
            _parse_records(self.path.read_text(), self.records)
        self._file = None

    def append(self, records: list) -> None:
        if self._file is None:
            self._file = open(self.path, "a")
        for r in records:
            self.records[r["path"]] = r
            self._file.write(json.dumps(r) + "\n")
        self._file.flush()

    def close(self) -> None:
        """One line per image, atomically (temporary name, then rename)."""
        from deeplab.fileio import write_text_atomic

        if self._file is not None:
            self._file.close()
            self._file = None
        write_text_atomic(self.path, _lines(self.records.values()))

    def clear(self) -> None:
        """--overwrite: every record goes (the file too)."""
        self.records.clear()
        self.path.unlink(missing_ok=True)


class StoreManifest(Manifest):
    """manifest.jsonl on an object store, where an object cannot be appended to. Records arriving are put in
    part objects, OUTPUT/manifest.parts/<run start, ms>-<n>.jsonl, one PUT every PART_SECONDS or PART_RECORDS
    records; at the end of a run, and at any stop (Ctrl-C, SIGTERM), the rest goes in a last part, then
    manifest.jsonl and every part are merged into manifest.jsonl (one PUT) and the parts deleted. Whoever reads
    it (a rerun, this class) takes manifest.jsonl and then the parts in name order, the last record for a path
    winning: a driver killed outright (SIGKILL) loses at most the records of its last PART_SECONDS, whose masks
    a rerun finds in its listing and counts again without writing them."""

    PART_SECONDS, PART_RECORDS = 10.0, 2000

    def __init__(self, output: Output):
        self.output, self.path, self.records = output, output.url_of(MANIFEST), {}
        self.parts = sorted(output.files(MANIFEST_PARTS))  # relative to OUTPUT
        for rel in [MANIFEST, *self.parts]:
            data = self.output.read(rel)
            if data is not None:
                _parse_records(data.decode(errors="replace"), self.records)
        self._pending, self._flushed, self._run = [], time.monotonic(), f"{int(time.time() * 1000):013d}"

    def append(self, records: list) -> None:
        for r in records:
            self.records[r["path"]] = r
        self._pending += records
        if len(self._pending) >= self.PART_RECORDS or time.monotonic() - self._flushed >= self.PART_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            part = f"{MANIFEST_PARTS}/{self._run}-{len(self.parts):06d}.jsonl"
            self.output.write(part, _lines(self._pending).encode())
            self.parts.append(part)
        self._pending, self._flushed = [], time.monotonic()

    def close(self) -> None:
        """The last part first (a stop during the merge loses nothing), then one manifest.jsonl, then no parts."""
        self.flush()
        self.output.write(MANIFEST, _lines(self.records.values()).encode())
        if self.parts:  # every one merged: read when opened, or written since
            self.output.remove_folder(MANIFEST_PARTS)
        self.parts = []

    def clear(self) -> None:
        self.records.clear()
        self._pending = []
        self.output.remove([MANIFEST])
        if self.parts:
            self.output.remove_folder(MANIFEST_PARTS)
        self.parts = []


def open_manifest(out) -> Manifest:
    output = as_output(out)
    return Manifest(Path(output.path, MANIFEST)) if output.local else StoreManifest(output)


def expected_outputs(name: str, color: bool) -> list:
    """Output files of one image, relative to OUTPUT (posix)."""
    suffixes = ("", "_color", "_overlay") if color else ("",)
    return [f"{name}{s}.png" for s in suffixes]


def output_escape(out_dir: Path, name: str, color: bool, folders: Optional[dict] = None) -> Optional[str]:
    """Why the outputs of ``name`` would land outside OUTPUT (a '..' or absolute name, or a link under OUTPUT
    that leads elsewhere), or None. ``folders`` caches resolved folders across calls (one resolve per folder)."""
    out_dir = Path(out_dir)
    folders = {} if folders is None else folders
    root = folders.setdefault("", out_dir.resolve())
    for rel in expected_outputs(name, color):
        pure = PurePosixPath(rel)
        parent = str(pure.parent)
        if parent not in folders:
            folders[parent] = (out_dir / parent).resolve() if ".." not in pure.parts else None
        folder = folders[parent]
        target = (folder / pure.name).resolve() if folder is not None else None
        if pure.is_absolute() or target is None or not target.is_relative_to(root):
            return f"its output {rel} resolves to {target or rel}, outside OUTPUT {root}; not written"
    return None


def split_done(items: list, manifest: Manifest, out, color: bool) -> tuple:
    """(to do, done): done means a manifest record says ok and every output file exists (writes are atomic,
    so an existing file is a complete one). OUTPUT is listed once, not asked per image. Outputs without a
    record are redone by the actors, which keep the files and only compute the record, so nothing is written
    twice: locally they look at the files, on an object store at the listing's (``kept`` of each item to do)."""
    files = as_output(out).files()
    todo, done = [], []
    for item in items:
        outputs = expected_outputs(item.name, color)
        record = manifest.records.get(item.uri)
        if record is not None and record.get("status") == "ok" and all(f in files for f in outputs):
            done.append(item)
        else:
            kept = [kind for kind, f in zip(PREDICTION_KINDS, outputs) if f in files]
            todo.append(replace(item, kept=",".join(kept)))
    return todo, done


def remove_stale_temps(out) -> int:
    """Temporary files a killed writer left in a local OUTPUT (a finished write renames its temporary away);
    an object store has none (an object is one PUT)."""
    output = as_output(out)
    if not output.local:
        return 0
    removed = 0
    for folder, _, files in os.walk(output.path):
        for f in files:
            if STALE_TEMP.match(f):
                Path(folder, f).unlink(missing_ok=True)
                removed += 1
    return removed


# ------------------------------------------------------------------------------------------ model identity
MODEL_RECORD = "model.json"


class ModelMismatch(UserError, ValueError):
    """OUTPUT holds another model's results; one line naming both models."""


def _recorded_model(output: Output, manifest: Manifest) -> Optional[dict]:
    """OUTPUT's model record; {} for results a run before the record existed left (no model.json)."""
    data = output.read(MODEL_RECORD)
    if data is not None:
        try:
            record = json.loads(data.decode())
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if isinstance(record, dict) and "sha256" in record:
            return record
        return {}
    return {} if manifest.records else None


def _clear_outputs(output: Output, items: list, manifest: Manifest) -> None:
    """--overwrite: every result of the other model goes (its PNGs, its manifest) before the new model runs,
    so an interrupted overwrite never leaves the other model's masks to be taken as this one's."""
    names = [f"{item.name}{s}.png" for item in items for s in ("", "_color", "_overlay")]
    names += [out for record in manifest.records.values() for out in record.get("outputs", [])]
    output.remove(names, present=None if output.local else output.files())
    manifest.clear()


def claim_output(out, model, items: list, manifest: Manifest, overwrite: bool) -> dict:
    """OUTPUT belongs to one model (by content: cluster.infer.model_identity). The same model resumes; another
    stops here, before any work, unless ``overwrite`` (its results are removed and every image is redone).
    ``model``: a path, or export.model_file.open_model_file's handle (not read again)."""
    from cluster.infer import model_identity

    output = as_output(out)
    identity = {"model": os.path.abspath(getattr(model, "path", model)), **model_identity(model)}
    recorded = _recorded_model(output, manifest)
    if recorded is not None and recorded.get("sha256") == identity["sha256"]:
        return identity
    if recorded is not None and not overwrite:
        theirs = (f"model {recorded.get('model')} (sha256 {recorded['sha256'][:12]})" if recorded
                  else "a model it did not record (segmented before OUTPUT recorded its model)")
        raise ModelMismatch(f"{output}: holds the results of {theirs}, not of {identity['model']} (sha256 "
                            f"{identity['sha256'][:12]}); choose another -o, or add --overwrite to redo every "
                            "image with this model")
    if recorded is not None:
        _clear_outputs(output, items, manifest)
    output.write(MODEL_RECORD, (json.dumps(identity, indent=2) + "\n").encode())
    return identity


# ------------------------------------------------------------------------------------- Ray Data stages
def read_and_decode(row: dict, filesystem, max_pixels: Optional[int]) -> dict:
    """A Ray Data task: read one file through pyarrow and decode it; a bad file becomes an error string."""
    from deeplab.data import DatasetError, read_image

    start = time.perf_counter()
    out = {"path": row["path"], "uri": row["uri"], "name": row["name"], "kept": row.get("kept", ""), "error": "",
           "pixels": b"", "height": 0, "width": 0}
    try:
        with filesystem.open_input_stream(row["path"]) as f:
            data = f.read()
        image = read_image(data, name=row["uri"], max_pixels=max_pixels)
    except DatasetError as e:
        out["error"] = str(e)
    except OSError as e:  # vanished since listing, permissions, network
        out["error"] = f"{row['uri']}: cannot read ({error_line(e)})"
    else:
        out.update(pixels=image.tobytes(), height=image.shape[0], width=image.shape[1])
    out["decode_seconds"] = time.perf_counter() - start
    return out


class SegmentWorker:
    """A Ray Data actor: the model, opened once, run on batches; writes the PNGs into OUTPUT (``out_dir``: a
    local folder or an object-store URL, opened here on the node) and returns one JSON record per image.
    Outputs that already exist are kept, not rewritten: locally those on disk now (an earlier run's, or a
    killed attempt's), on an object store those OUTPUT's listing held (an image a lost actor had written is
    PUT again, whole, with the same pixels: a HEAD per output would cost as much as the PUT)."""

    def __init__(self, model, out_dir: str, color: bool, alpha: float, output_stride: Optional[int],
                 num_gpus: float, cpus: float, max_batch_pixels: Optional[int] = None):
        self.startup = {"init": time.time()}  # for the driver's start-up phases
        from cluster.infer import open_model, set_threads, worker_device
        from deeplab.data import palette_for_classes
        threads = set_threads(cpus)
        self.runner = open_model(model, output_stride=output_stride, device=worker_device(num_gpus), threads=threads)
        self.names = self.runner.info.class_names
        self.palette = palette_for_classes(self.names)
        self.kinds = PREDICTION_KINDS if color else ("labels",)
        self.output, self.alpha = Output(out_dir), alpha
        self.max_batch_pixels = max_batch_pixels  # same-size images share a call up to this many pixels
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.startup["ready"] = time.time()

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from cluster.infer import predict_labels

        rows = [{key: batch[key][i] for key in batch} for i in range(len(batch["uri"]))]
        good = [row for row in rows if not row["error"]]
        images = [np.frombuffer(r["pixels"], np.uint8).reshape(int(r["height"]), int(r["width"]), 3) for r in good]
        missing = [self._missing(str(r["name"]), str(r.get("kept", ""))) for r in good]
        run = [i for i, m in enumerate(missing) if m]  # images with outputs to write
        start = time.perf_counter()
        labels = dict(zip(run, predict_labels(self.runner, [images[i] for i in run], keep_errors=True,
                                                     max_batch_pixels=self.max_batch_pixels)))
        seconds = (time.perf_counter() - start) / max(1, len(run))
        records = {}
        for i, row in enumerate(good):
            uri = str(row["uri"])
            if isinstance(labels.get(i), Exception):
                records[uri] = {"path": uri, "status": "failed",
                                "error": f"{uri}: the model cannot run it ({error_line(labels[i])})"}
            else:
                records[uri] = self._finish(uri, str(row["name"]), images[i], labels.get(i), missing[i],
                                            seconds + float(row["decode_seconds"]))
        for row in rows:
            if row["error"]:
                records[str(row["uri"])] = {"path": str(row["uri"]), "status": "failed", "error": str(row["error"])}
        startup = [""] * len(rows)  # the first batch of each actor tells the driver how it started
        if self.startup is not None and rows:
            startup[0], self.startup = json.dumps(self.startup), None
        return {"record": np.array([json.dumps(records[str(row["uri"])]) for row in rows], dtype=object),
                "startup": np.array(startup, dtype=object)}

    def _missing(self, name: str, kept: str) -> list:
        if not self.output.local:
            return [k for k in self.kinds if k not in kept.split(",")]
        outputs = dict(zip(PREDICTION_KINDS, expected_outputs(name, color=True)))
        return [k for k in self.kinds if not os.path.isfile(os.path.join(self.output.path, outputs[k]))]

    def _finish(self, uri: str, name: str, image, labels, missing: list, seconds: float) -> dict:
        from cluster.infer import class_pixels

        start = time.perf_counter()
        if self.output.local:
            escape = output_escape(Path(self.output.path), name, len(self.kinds) > 1)  # a link made under OUTPUT
            if escape:  # mid-run
                return {"path": uri, "status": "failed", "error": f"{uri}: {escape}"}
        try:
            if labels is None:  # every output exists already: count the pixels of the label map there
                labels = self._read_labels(name)
            else:
                self._write(name, image, labels, missing)
        except (OSError, ValueError) as e:
            return {"path": uri, "status": "failed", "error": f"{uri}: cannot write its outputs ({e})"}
        outputs = expected_outputs(name, color=len(self.kinds) > 1)
        written = [out for kind, out in zip(PREDICTION_KINDS, outputs) if kind in missing]
        return {"path": uri, "status": "ok", "outputs": outputs, "width": int(image.shape[1]),
                "height": int(image.shape[0]), "seconds": round(seconds + time.perf_counter() - start, 4),
                "pixels": class_pixels(labels, self.names), "written": written, "worker": self.worker}

    def _write(self, name: str, image, labels, kinds: list) -> None:
        """The pictures of ``kinds``: locally with deeplab.predict's atomic writer, on a store one PUT each."""
        import io

        from deeplab.predict import prediction_images, write_prediction

        rel = PurePosixPath(name)
        if self.output.local:
            folder = Path(self.output.path, rel.parent)
            folder.mkdir(parents=True, exist_ok=True)
            write_prediction(folder, rel.name, image, labels, self.palette, self.alpha, kinds=kinds)
            return
        outputs = dict(zip(PREDICTION_KINDS, expected_outputs(name, color=True)))
        for kind, picture in prediction_images(image, labels, self.palette, self.alpha, kinds).items():
            data = io.BytesIO()
            picture.save(data, format="PNG")
            self.output.write(outputs[kind], data.getvalue())

    def _read_labels(self, name: str):
        import io

        import numpy as np
        from PIL import Image

        from deeplab.data import read_mask

        rel = expected_outputs(name, color=False)[0]
        if self.output.local:
            return read_mask(Path(self.output.path, rel))
        data = self.output.read(rel)
        if data is None:
            raise FileNotFoundError(f"{self.output.url_of(rel)}: gone since OUTPUT was listed")
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:  # our own grayscale PNG of class ids
            return np.asarray(im)


# ------------------------------------------------------------------------------------------------ driver
@dataclass
class Summary:
    total: int
    skipped: int
    ok: int = 0
    failed: int = 0
    seconds: float = 0.0
    first_result_s: float = 0.0  # actors starting, the model loading, the first batch
    first_count: int = 0  # images in the first results
    failures: list = field(default_factory=list)
    startup: dict = field(default_factory=dict)  # phase -> seconds, up to the first results (startup_phases)

    def count(self, records: list) -> None:
        for r in records:
            if r["status"] == "ok":
                self.ok += 1
            else:
                self.failed += 1
                self.failures.append(r["error"])

    @property
    def images_per_s(self) -> float:
        return (self.ok + self.failed) / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """Throughput once the pool is up: images after the first results over the time after them."""
        rest, span = self.ok + self.failed - self.first_count, self.seconds - self.first_result_s
        return rest / span if rest > 0 and span > 0 else 0.0


def startup_phases(pipeline_start: float, first_results: float, actors: list) -> dict:
    """Seconds per phase before the first results (epoch times): from the pipeline's start to the first ready
    actor's constructor (Ray Data's start, scheduling, the worker process and its imports), its model load
    (imports, open, compile), then the first batch (reading, decoding, the model, writing, the hop back).
    ``actors``: the startup records of the actors seen so far (the block carrying an actor's record may arrive
    after the first results)."""
    if not actors:
        return {}
    first = min(actors, key=lambda a: a["ready"])
    return {"actor start": max(0.0, first["init"] - pipeline_start), "model load": first["ready"] - first["init"],
            "first batch": max(0.0, first_results - first["ready"])}


def startup_line(phases: dict) -> str:
    return "start-up: " + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in phases.items())


def build_dataset(inputs: list, filesystem, model, output: Output, cfg: SegmentConfig, inference: InferenceConfig):
    """The Ray Data pipeline: items -> read + decode tasks -> model actor pool -> JSON records. The actors get
    OUTPUT as its URL (they open it on their node), never the driver's filesystem object."""
    import ray.data

    rows = [{"path": i.path, "uri": i.uri, "name": i.name, "kept": i.kept} for i in inputs]
    blocks = max(1, min(len(rows), -(-len(rows) // cfg.batch_size), 4096))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map(read_and_decode, fn_kwargs={"filesystem": filesystem, "max_pixels": cfg.max_pixels},
                num_cpus=cfg.cpus_per_decode)
    return ds.map_batches(
        SegmentWorker, batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.workers),
        num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker or None,
        fn_constructor_kwargs={"model": model, "out_dir": output.url, "color": cfg.color, "alpha": inference.alpha,
                               "output_stride": inference.output_stride, "num_gpus": cfg.gpus_per_worker,
                               "cpus": cfg.cpus_per_worker, "max_batch_pixels": cfg.max_batch_pixels})


def size_pool(cfg: SegmentConfig, resources: dict, log=print) -> int:
    """The actor pool's size: segment.workers, or as many actors as the cluster holds now next to one read
    task. Warns when the request does not fit (the run then waits for an autoscaler to add nodes)."""
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    room = cpus - cfg.cpus_per_decode
    if cfg.workers is None:
        fits = [room / cfg.cpus_per_worker if cfg.cpus_per_worker else float("inf"),
                gpus / cfg.gpus_per_worker if cfg.gpus_per_worker else float("inf")]
        cfg.workers = max(1, int(min(fits))) if min(fits) != float("inf") else 1
    need_cpu = cfg.workers * cfg.cpus_per_worker + cfg.cpus_per_decode
    need_gpu = cfg.workers * cfg.gpus_per_worker
    if need_cpu > cpus + 1e-9 or need_gpu > gpus + 1e-9:
        log(f"warning: {cfg.workers} actors x ({cfg.cpus_per_worker:g} CPU, {cfg.gpus_per_worker:g} GPU) plus "
            f"{cfg.cpus_per_decode:g} CPU to read need {need_cpu:g} CPUs and {need_gpu:g} GPUs; the cluster has "
            f"{cpus:g} and {gpus:g} now, so the run waits for an autoscaler to add nodes (without one, lower "
            "--workers or --cpus-per-worker)")
    return cfg.workers


def refuse_escaping(todo: list, refused: list, out, color: bool) -> tuple:
    """(items to run, (uri, reason) of every input never to read nor write): the listing's refusals plus the
    items whose outputs would resolve outside a local OUTPUT (an object store has no links, and output names
    are normalized keys without '..')."""
    output = as_output(out)
    if not output.local:
        return list(todo), list(refused)
    folders: dict = {}
    run, refused = [], list(refused)
    for item in todo:
        why = output_escape(Path(output.path), item.name, color, folders)
        if why:
            refused.append((item.uri, f"{item.uri}: {why}"))
        else:
            run.append(item)
    return run, refused


def segment(model_path, inputs: InputSet, out_dir, cfg: SegmentConfig, log=print, overwrite: bool = False,
            inference: Optional[InferenceConfig] = None) -> Summary:
    """Run the pipeline over the images of ``inputs`` not done yet; Ray must be initialized. OUTPUT records the
    model (claim_output): another model's OUTPUT is refused unless ``overwrite``. ``inference``: the output
    stride and overlay alpha (default: the model's own stride, alpha 0.5). ``model_path``: a path, or
    open_model_file's handle (claimed and shipped from the bytes it read)."""
    import ray.data

    from cluster.infer import ship_model

    output = as_output(out_dir)
    output.make()
    manifest = open_manifest(output)
    claim_output(output, model_path, inputs.items, manifest, overwrite)
    remove_stale_temps(output)
    todo, done = split_done(inputs.items, manifest, output, cfg.color)
    todo, refused = refuse_escaping(todo, inputs.refused, output, cfg.color)
    summary = Summary(total=len(inputs.items) + len(inputs.refused), skipped=len(done))
    log(f"{summary.total} images: {len(todo)} to segment, {len(done)} already done"
        + (f", {len(refused)} refused" if refused else "")
        + (f" ({inputs.ignored} files with other extensions ignored)" if inputs.ignored else ""))
    if refused:
        manifest.append([{"path": uri, "status": "failed", "error": why} for uri, why in refused])
        summary.failed, summary.failures = len(refused), [why for _, why in refused]
    if not todo:
        manifest.close()
        return summary
    _say_kept(summary, output)
    size_pool(cfg, ray.cluster_resources(), log)
    log(f"{cfg.workers} model actor{'s' * (cfg.workers != 1)} ({cfg.cpus_per_worker:g} CPU"
        f"{f', {cfg.gpus_per_worker:g} GPU' if cfg.gpus_per_worker else ''} each), batches of {cfg.batch_size}")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our one line every few seconds instead of Ray Data's bars
    start, epoch = time.perf_counter(), time.time()
    shipped = ship_model(model_path)
    summary.startup["ship model"] = time.perf_counter() - start
    ds = build_dataset(todo, inputs.filesystem, shipped, output, cfg, inference or InferenceConfig())
    wanted, actors, first_results = {i.uri for i in todo}, [], 0.0
    bar = Progress(len(todo), "segment", interval=cfg.progress_interval_s, redraw=False)  # lines: Ray's console
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            actors += [json.loads(a) for a in batch.get("startup", ()) if a]
            records = [json.loads(r) for r in batch["record"]]
            records = [r for r in records if r["path"] in wanted]  # a re-executed block is counted once
            wanted.difference_update(r["path"] for r in records)
            if records and not summary.first_count:
                summary.first_result_s, summary.first_count = time.perf_counter() - start, len(records)
                first_results = time.time()
            if summary.first_count and actors and "actor start" not in summary.startup:  # may come after them
                summary.startup.update(startup_phases(epoch + summary.startup["ship model"], first_results, actors))
            manifest.append(records)
            summary.count(records)
            bar.update(done=summary.ok + summary.failed, note=f"{summary.failed} failed")
            _say_kept(summary, output)
    finally:
        summary.seconds = time.perf_counter() - start
        manifest.close()
        remove_stale_temps(output)
    bar.update(done=summary.ok + summary.failed, note=f"{summary.failed} failed", final=True)
    return summary


def _say_kept(summary: Summary, output: Output) -> None:
    """What a stop now keeps (every image segmented: manifest record and files) and what the same command does
    then (a failed image is tried again)."""
    kept = summary.skipped + summary.ok
    on_interrupt(f"{kept} of {summary.total} images segmented in {output} (manifest.jsonl); the same command "
                 f"skips them and segments the other {summary.total - kept}")


def _stop_actors(output: Output) -> None:
    """After a stop: this job's actors end with Ray (a cluster this command started goes entirely), then the
    temporary files of writes they had under way go too; every finished output is whole (written atomically)."""
    import ray

    ray.shutdown()
    remove_stale_temps(output)


# --------------------------------------------------------------------------------------------------- CLI
ALIASES = [
    Alias("--workers", "segment.workers", "model actors (default: as many as the cluster's CPUs, or GPUs, hold)"),
    Alias("--batch-size", "segment.batch_size", "images per actor call"),
    Alias("--cpus-per-worker", "segment.cpus_per_worker", "CPUs (and intra-op threads) per model actor"),
    Alias("--num-gpus-per-worker", "segment.gpus_per_worker", "GPUs per model actor (0: run on CPU)"),
    CHECKPOINT_STRIDE_ALIAS,
    Alias("--color", "segment.color", "also write NAME_color.png (palette) and NAME_overlay.png", switch=True),
    ALPHA_ALIAS,
    Alias("--max-pixels", "segment.max_pixels", "images with more pixels fail (default: Pillow's bomb limit)"),
]


def parse_args(argv):
    p = model_parser("python -m cluster.segment", __doc__)
    p.add_argument("input", metavar="INPUT", help="a folder, a text file listing paths, one image, or "
                   "s3://bucket/prefix/")
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                   help="folder for the PNGs and manifest.jsonl (on a multi-node cluster: a folder every node "
                        "mounts at the same path), or an object-store prefix such as s3://bucket/masks (credentials "
                        "from each node's environment)")
    p.add_argument("--extensions", help="only files with these suffixes in a folder or prefix, e.g. jpg,png "
                   "(default: every file; a file that is not an image is listed as failed)")
    p.add_argument("--overwrite", action="store_true",
                   help="OUTPUT holds another model's results: remove them and segment every image with MODEL "
                        "(without it, such a run stops before any work)")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's and Ray Data's own INFO lines too (always in Ray's session logs)")
    add_config_args(p, aliases=ALIASES)
    return p.parse_args(argv)


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    from export.model_file import open_model_file

    exp = config_from_args(args)
    cfg = exp.segment
    output = Output(args.output)
    if is_uri(args.model):  # the driver fetches it once, then ships it to the nodes as any local model
        print(f"fetching {args.model}", flush=True)
        args.model = fetch_model(args.model)
    phases, clock = {}, time.perf_counter()
    model = open_model_file(args.model, exp.inference.output_stride)  # read once: claimed, shipped, shown
    info = model.info
    phases["model info"], clock = time.perf_counter() - clock, time.perf_counter()
    on_interrupt(f"{output} is as it was (nothing segmented by this run yet); the same command starts again")
    extensions = [e.strip() for e in args.extensions.split(",") if e.strip()] if args.extensions else None
    same_store = not output.local and args.input.split("://", 1)[0] == output.folder.scheme
    inputs = list_inputs(args.input, exclude=output.path if output.local or same_store else None,
                         extensions=extensions)
    phases["listing"] = time.perf_counter() - clock
    print(f"model: {args.model} ({info.backend.split(' ')[0]}, {info.precision}, {info.num_classes} classes, "
          f"output stride {info.output_stride})", flush=True)
    if output.exists():  # another model's OUTPUT stops here, before Ray starts
        claim_output(output, model, inputs.items, open_manifest(output), args.overwrite)

    from cluster.console import ACTOR_ARGUMENTS_NOISE, quiet_ray_data, quiet_stderr, ray_init_options
    from cluster.ray_session import init_ray

    clock = time.perf_counter()
    init_ray(exp, **ray_init_options(args.verbose))
    phases["Ray start"] = time.perf_counter() - clock
    quiet_ray_data(args.verbose)
    try:
        with quiet_stderr(ACTOR_ARGUMENTS_NOISE, args.verbose):
            summary = segment(model, inputs, output, cfg, log=lambda m: print(m, flush=True),
                              overwrite=args.overwrite, inference=exp.inference)
    except KeyboardInterrupt:
        _stop_actors(output)
        raise
    done = summary.ok + summary.failed
    manifest = output.url_of(MANIFEST)
    print(f"segmented {done} images in {summary.seconds:.1f}s: {summary.images_per_s:.2f} images/s "
          f"({summary.ok} ok, {summary.failed} failed, {summary.skipped} already done); manifest: {manifest}",
          flush=True)
    if summary.first_count:
        print(startup_line({**phases, **summary.startup}) + f"; then {summary.steady_images_per_s:.2f} images/s",
              flush=True)
    if summary.failed:
        for reason in summary.failures[:5]:
            print(f"  failed: {reason}", file=sys.stderr)
        print(f"error: {summary.failed} of {done} images failed (reasons in {manifest})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
