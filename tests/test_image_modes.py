"""Images of every mode become the RGB picture a viewer shows (issue 15): each mode against a reference
computed here by hand from the stored pixels."""
import io

import numpy as np
import pytest
from PIL import Image

from deeplab.data import DatasetError, read_image

RNG = np.random.default_rng(0)


def _saved(tmp_path, image: Image.Image, name: str, **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return path


def test_16bit_gray_scales_full_range_to_8bit(tmp_path):
    values = RNG.integers(0, 65536, size=(12, 17), dtype=np.uint16)
    values[0, 0], values[0, 1] = 0, 65535
    out = read_image(_saved(tmp_path, Image.fromarray(values), "depth16.png"))
    expected = np.round(values / 257.0).astype(np.uint8)
    assert out.shape == (12, 17, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], expected) and np.array_equal(out[..., 2], expected)
    assert out.max() == 255 and out.min() == 0  # not clipped to white, not black


def test_32bit_gray_by_the_range_its_values_use(tmp_path):
    ints = RNG.integers(0, 65536, size=(9, 11)).astype(np.int32)
    out = read_image(_saved(tmp_path, Image.fromarray(ints), "i32.tif"))
    assert np.array_equal(out[..., 1], np.round(ints / 257.0).astype(np.uint8))
    floats = RNG.random((9, 11)).astype(np.float32)
    out = read_image(_saved(tmp_path, Image.fromarray(floats), "f32.tif"))
    assert np.array_equal(out[..., 0], np.round(floats.astype(np.float64) * 255).astype(np.uint8))
    wide = np.linspace(-1000, 3000, 99, dtype=np.float32).reshape(9, 11)
    out = read_image(_saved(tmp_path, Image.fromarray(wide), "wide.tif"))
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255


def test_palette_and_transparency_composited_over_white(tmp_path):
    index = RNG.integers(0, 4, size=(8, 8), dtype=np.uint8)
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], dtype=np.uint8)
    pal = Image.fromarray(index, mode="P")
    pal.putpalette(colours.ravel().tolist() + [0] * (768 - 12))
    assert np.array_equal(read_image(_saved(tmp_path, pal, "pal.png")), colours[index])

    rgba = RGB_A = RNG.integers(0, 256, size=(8, 8, 4), dtype=np.uint8)
    alpha = RGB_A[..., 3:].astype(np.float64) / 255
    expected = rgba[..., :3] * alpha + 255 * (1 - alpha)
    out = read_image(_saved(tmp_path, Image.fromarray(rgba, mode="RGBA"), "rgba.png"))
    assert np.abs(out.astype(int) - np.round(expected)).max() <= 1

    la = RNG.integers(0, 256, size=(8, 8, 2), dtype=np.uint8)
    a = la[..., 1].astype(np.float64) / 255
    out = read_image(_saved(tmp_path, Image.fromarray(la, mode="LA"), "la.png"))
    assert np.abs(out[..., 0].astype(int) - np.round(la[..., 0] * a + 255 * (1 - a))).max() <= 1


def test_cmyk_primaries(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], dtype=np.uint8)
    out = read_image(_saved(tmp_path, Image.fromarray(cmyk, mode="CMYK"), "cmyk.jpg", quality=100))
    expected = np.array([[[255, 255, 255], [0, 255, 255], [0, 0, 0]]])
    assert np.abs(out.astype(int) - expected).max() <= 8  # JPEG


def test_exif_orientation_applied_as_a_viewer_shows_it(tmp_path):
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (250, 0, 0)  # left half red as stored
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = _saved(tmp_path, image, "rotated.jpg", exif=exif, quality=95)
    raw = np.asarray(Image.open(path).convert("RGB"))
    out = read_image(path)
    assert out.shape == (40, 20, 3)
    assert np.array_equal(out, np.rot90(raw, k=-1))  # red now on top, as displayed


def test_bytes_and_unconvertible_mode_named_in_one_line(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.full((5, 6, 3), 7, dtype=np.uint8)).save(buf, format="PNG")
    assert read_image(buf.getvalue(), name="upload.png").shape == (5, 6, 3)
    with pytest.raises(DatasetError, match=r"^upload\.bin: unreadable or truncated image"):
        read_image(b"not an image", name="upload.bin")
    from deeplab.data.io import to_rgb

    odd = Image.new("La", (4, 4))  # premultiplied gray+alpha: Pillow has no conversion to RGB
    with pytest.raises(DatasetError, match=r"odd\.tif: image mode La cannot be converted to RGB") as info:
        to_rgb(odd, "odd.tif")
    assert "\n" not in str(info.value)
