"""cluster.segment's MODEL may be an object-store URL (the best.ckpt URL cluster.train prints): the driver fetches it
into the model cache, whole, and ships that file as any local model. (On S3 itself: tests/test_ray_up_onprem.py.)"""
import pytest

from cluster.infer import CACHE_ENV, fetch_model
from deeplab.checkpoint import CheckpointError


def test_fetch_model_copies_an_object_store_file_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    source = tmp_path / "run" / "best.ckpt"
    source.parent.mkdir()
    source.write_bytes(b"weights" * 1000)
    assert fetch_model(str(source)) == str(source)  # a local path as given
    fetched = fetch_model(f"file://{source}")
    assert fetched.startswith(str(tmp_path / "cache")) and fetched.endswith("/best.ckpt")
    assert open(fetched, "rb").read() == source.read_bytes()
    source.write_bytes(b"newer")
    assert open(fetch_model(f"file://{source}"), "rb").read() == b"newer"  # afresh each time
    with pytest.raises(CheckpointError, match=r"^file://.*/missing.ckpt: no such file$"):
        fetch_model(f"file://{tmp_path}/missing.ckpt")
