"""Where cluster.segment's results go and what is already there: OUTPUT (a folder or an object-store prefix),
its manifest (manifest.jsonl, plus part objects on a store), model.json (which model owns OUTPUT) and the names
each image's outputs take.

Apart from the pipeline because a rerun's decisions (skip what is done, refuse another model's OUTPUT, clear
stale temps) are made from these files alone, on the driver, before any actor starts."""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Optional

from cluster.infer import model_identity
from cluster.storage import RunFolder, storage_folder
from deeplab.cli import OutputError, UserError, error_line
from deeplab.fileio import atomic_path, ensure_dir, write_text_atomic
from deeplab.predict import PREDICTION_KINDS  # in expected_outputs' order; deeplab.predict loads no torch

MANIFEST = "manifest.jsonl"


MANIFEST_PARTS = "manifest.parts"  # on an object store: the records of a run not yet merged into manifest.jsonl


# temporary names of atomic writes: deeplab.predict's .NAME.png.PID.tmp and deeplab.fileio's .NAME.tmpPID.png
STALE_TEMP = re.compile(r"^\..+(\.\d+\.tmp|\.tmp\d+\.png)$")


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
            else:
                self._delete_on_store(rel, self.folder.filesystem.delete_file)

    def remove_folder(self, rel: str) -> None:
        """Delete the folder ``rel`` and everything in it (on S3: batched deletes, and no empty folder marker left,
        as deleting its last object one by one leaves)."""
        if self.local:
            shutil.rmtree(Path(self.path, rel), ignore_errors=True)
        else:
            self._delete_on_store(rel, self.folder.filesystem.delete_dir)

    def _delete_on_store(self, rel: str, delete) -> None:
        """``delete`` (the store's delete_file or delete_dir) on ``rel``'s key; already gone is fine."""
        try:
            with self._store(rel):
                delete(self._key(rel))
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
    names = [name for item in items for name in expected_outputs(item.name, color=True)]
    names += [out for record in manifest.records.values() for out in record.get("outputs", [])]
    output.remove(names, present=None if output.local else output.files())
    manifest.clear()


def claim_output(out, model, items: list, manifest: Manifest, overwrite: bool) -> dict:
    """OUTPUT belongs to one model (by content: cluster.infer.model_identity). The same model resumes; another
    stops here, before any work, unless ``overwrite`` (its results are removed and every image is redone).
    ``model``: a path, or export.model_file.open_model_file's handle (not read again)."""

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
