"""One allow-list of image formats for every decoder (issue 20): a file in any other format is refused from
its first bytes, before Pillow's plugin for it runs, so no upload or listed file ever starts a program
(Pillow renders EPS/PS by running Ghostscript)."""
import io
import os

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from deeplab.data import DatasetError, read_image, read_mask
from deeplab.data.io import IMAGE_FORMATS, UnsupportedImageFormat

EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 64 64
%%EndComments
0 0 moveto 64 64 lineto stroke
showpage
"""


def _saved(fmt: str, mode: str = "RGB", **kw) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (8, 8), 90).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def fake_ghostscript(tmp_path, monkeypatch):
    """A `gs` first on PATH that only leaves a mark when it runs; Pillow looks it up afresh."""
    mark = tmp_path / "gs-ran"
    gs = tmp_path / "bin" / "gs"
    gs.parent.mkdir()
    gs.write_text(f"#!/bin/sh\necho \"$@\" >> {mark}\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{gs.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    return mark


def test_pillow_alone_runs_ghostscript_on_an_eps_file(tmp_path, fake_ghostscript):
    """The reference: what a plain Image.open does with the file the tests below refuse."""
    with pytest.raises(Exception):  # noqa: B017  (whatever Pillow makes of the fake program's output)
        Image.open(io.BytesIO(EPS)).load()
    assert fake_ghostscript.is_file()  # Pillow started the program


@pytest.mark.parametrize("name", ["drawing.eps", "photo.png", "photo.jpg"])
def test_eps_is_refused_before_ghostscript_whatever_its_name(tmp_path, fake_ghostscript, name):
    path = tmp_path / name
    path.write_bytes(EPS)
    for source, label in ((path, str(path)), (EPS, "upload")):
        with pytest.raises(UnsupportedImageFormat) as e:
            read_image(source, name=label if source is EPS else None)
        assert str(e.value) == f"{label}: EPS images are not accepted (only JPEG, PNG, BMP, WebP or TIFF)"
    with pytest.raises(UnsupportedImageFormat):
        read_mask(path)
    assert not fake_ghostscript.exists()


OTHER = ["GIF", "PPM", "ICO", "PCX", "SGI", "DDS", "QOI", "JPEG2000", "EPS"]


@pytest.mark.parametrize("fmt", OTHER)
def test_other_formats_are_refused_before_their_plugin_runs(tmp_path, monkeypatch, fmt):
    data = EPS if fmt == "EPS" else _saved(fmt)
    opened = []
    Image.init()
    for other, (_factory, accept) in list(Image.OPEN.items()):  # every plugin outside the list records a call
        if other not in IMAGE_FORMATS:
            monkeypatch.setitem(Image.OPEN, other, (lambda *a, f=other: opened.append(f), accept))
    path = tmp_path / "picture.png"
    path.write_bytes(data)
    with pytest.raises(UnsupportedImageFormat, match=r"picture\.png: \w+ images are not accepted"):
        read_image(path)
    with pytest.raises(UnsupportedImageFormat):
        read_mask(path)
    assert opened == []
    assert issubclass(UnsupportedImageFormat, DatasetError)  # callers that know only DatasetError still catch it


@pytest.mark.parametrize("fmt, mode", [("JPEG", "RGB"), ("PNG", "P"), ("BMP", "RGB"), ("WEBP", "RGB"), ("TIFF", "L"),
                                       ("MPO", "RGB")])  # MPO: a phone camera's multi-picture JPEG
def test_the_formats_the_readme_names_still_decode(fmt, mode):
    extra = {"save_all": True, "append_images": [Image.new(mode, (8, 8))]} if fmt == "MPO" else {}
    out = read_image(_saved(fmt, mode, **extra), name=f"x.{fmt.lower()}")
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8


def test_bytes_in_no_known_format_stay_a_plain_unreadable_image():
    with pytest.raises(DatasetError) as e:
        read_image(b"plain words, no picture" * 4, name="upload")
    assert not isinstance(e.value, UnsupportedImageFormat)
    assert "upload: unreadable or truncated image (not an image in an accepted format" in str(e.value)
