"""Outputs a user points at the wrong place, or a disk that fills up: one line naming the path the user gave,
nothing half-written left behind (deeplab.fileio, deeplab.cli)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deeplab.cli import OutputError, UserError, command
from deeplab.fileio import atomic_path, ensure_dir, write_text_atomic

ROOT = Path(__file__).parents[1]


def test_folder_where_a_file_belongs_and_the_reverse(tmp_path):
    (tmp_path / "out.json").mkdir()
    with pytest.raises(OutputError, match=r"out\.json: cannot write \(it is a folder; expected a file name\)"):
        write_text_atomic(tmp_path / "out.json", "{}")
    (tmp_path / "preds").write_text("a file")
    with pytest.raises(OutputError, match=r"preds: cannot write \(it is a file; expected a folder\)"):
        ensure_dir(tmp_path / "preds")
    with pytest.raises(OutputError, match="not a folder"):
        write_text_atomic(tmp_path / "preds" / "a.png", "x")
    with pytest.raises(OutputError, match="no folder"):
        write_text_atomic(tmp_path / "missing" / "a.png", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "preds"]


FULL_DISK_SCRIPT = r"""
import resource, signal, sys, torch
from deeplab import ModelConfig, build_model, save_checkpoint
from deeplab.cli import OutputError
model = build_model(ModelConfig(backbone="resnet_tiny", num_classes=3, aspp_channels=8))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
try:
    save_checkpoint(sys.argv[1], model, model.config)
except OutputError as e:
    print(e.exit_code, e)
"""


def test_full_disk_while_saving_a_checkpoint_names_it_and_leaves_nothing(tmp_path):
    """A size-limited file (RLIMIT_FSIZE) fails the write the way a full disk does, on any machine."""
    target = tmp_path / "model.ckpt"
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_SCRIPT, str(target)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.strip() == f"1 {target}: cannot write (disk full or file size limit reached)", proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_full_tmpfs(tmp_path):
    """A real full filesystem, where this machine lets the test mount a 64 KiB tmpfs (root on Linux)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        write_text_atomic(mount / "small.txt", "fits")
        with pytest.raises(OutputError, match=r"big\.pt: cannot write \(disk full") as info:
            with atomic_path(mount / "big.pt") as tmp, open(tmp, "wb") as f:
                torch.save(torch.zeros(100_000), f)
        assert info.value.exit_code == 1
        assert sorted(p.name for p in mount.iterdir()) == ["small.txt"]
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_command_edge(capsys):
    @command
    def interrupted(argv=None):
        raise KeyboardInterrupt

    @command
    def mistaken(argv=None):
        raise OutputError("/x/out.png", "it is a folder; expected a file name")

    @command
    def buggy(argv=None):
        raise ZeroDivisionError

    assert interrupted([]) == 130
    assert capsys.readouterr().err == "interrupted (SIGINT): nothing half-written\n"
    assert mistaken([]) == 2
    assert capsys.readouterr().err == "error: /x/out.png: cannot write (it is a folder; expected a file name)\n"
    with pytest.raises(ZeroDivisionError):  # programming errors keep their traceback
        buggy([])
    from deeplab.checkpoint import CheckpointError
    from deeplab.config import ConfigError
    from deeplab.data import DatasetError
    assert all(issubclass(e, UserError) for e in (ConfigError, CheckpointError, DatasetError, OutputError))


def test_command_answers_sigterm_with_its_note_and_restores_handlers(capsys):
    """SIGTERM (a scheduler, `timeout`) unwinds like Ctrl-C, prints the command's own note, exits 143; the
    process's handlers are back afterwards, and the next command starts with the default note."""
    import os
    import signal
    import time

    from deeplab.cli import on_interrupt

    cleaned = []
    note = "3 of 9 images kept in out/; the same command does the other 6"

    @command
    def long_job(argv=None):
        on_interrupt(note)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            cleaned.append(True)
        return 0

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert long_job([]) == 143
    assert capsys.readouterr().err == f"interrupted (SIGTERM): {note}\n"
    assert cleaned == [True]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before

    @command
    def quick(argv=None):
        raise KeyboardInterrupt

    assert quick([]) == 130
    assert capsys.readouterr().err == "interrupted (SIGINT): nothing half-written\n"


def test_a_nested_atomic_write_names_the_outer_target(tmp_path):
    """Export writes the ONNX through an atomic writer into another's temporary path: a failure names the
    file the user asked for, never a temporary name."""
    target = tmp_path / "model.onnx"
    with pytest.raises(OutputError) as info:
        with atomic_path(target) as outer:
            with atomic_path(outer) as inner:
                raise OSError(28, "No space left on device", str(inner))
    assert str(info.value) == f"{target}: cannot write (disk full or file size limit reached)"
    assert info.value.exit_code == 1 and list(tmp_path.iterdir()) == []
