"""Reading one image and one label mask. Every problem a user's files can have becomes a DatasetError whose
message is one line naming the file, so `deeplab.data check`, the training loop and a DataLoader worker all
say the same thing."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..cli import UserError, error_line

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never half a picture


class DatasetError(UserError, ValueError):
    """A dataset file or layout a user can fix; ``str(e)`` is one line naming the file."""

    def __init__(self, message: str = "", *args):
        # A DataLoader worker re-raises as DatasetError("Caught DatasetError in DataLoader worker ...\n
        # Original Traceback ...\n...DatasetError: <line>"): keep only the line that names the file.
        message = str(message)
        if message.startswith("Caught ") and "\n" in message:
            message = error_line(Exception(message), limit=len(message)).split("DatasetError: ", 1)[-1]
        super().__init__(message, *args)


class ImageTooLargeError(DatasetError):
    """An image over the pixel limit (a decompression bomb, or more pixels than a caller accepts)."""


class UnsupportedImageFormat(DatasetError):
    """A file in an image format outside IMAGE_FORMATS (serve answers 415; segment lists it as failed)."""


# The formats docs/serving.md names (deeplab.predict.IMAGE_SUFFIXES), Pillow's names. Every decoder here opens files
# with only these plugins, so no other plugin ever parses a user's file: EPS/PS (which Pillow renders by
# starting Ghostscript), PDF, PSD, FITS, TGA, ... are refused from their first bytes. JPEG includes MPO (the
# multi-picture JPEG of phone cameras, opened by the JPEG plugin).
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF")
ACCEPTED = "JPEG, PNG, BMP, WebP or TIFF"


def _other_format(prefix: bytes) -> Optional[str]:
    """The format outside IMAGE_FORMATS whose signature ``prefix`` (a file's first 16 bytes) carries, if any:
    judged by the plugins' own signature checks alone, which read bytes and open nothing."""
    Image.init()
    for fmt, (_, accept) in Image.OPEN.items():
        if fmt in IMAGE_FORMATS or accept is None:
            continue
        try:
            if accept(prefix) is True:
                return fmt
        except Exception:  # a check that needs more bytes than there are
            continue
    return None


def _head(source) -> bytes:
    """The first 16 bytes of a path or of bytes (what Pillow's signature checks look at)."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source[:16])
    try:
        with open(source, "rb") as f:
            return f.read(16)
    except OSError:
        return b""


def _open(path, name=None, max_pixels=None) -> Image.Image:
    """Open a path, or bytes / a binary file (``name`` is what messages call it), with the bomb limit and
    ``max_pixels`` (a caller's lower limit) checked before any pixel is decoded."""
    name = name or path
    try:
        im = Image.open(io.BytesIO(path) if isinstance(path, (bytes, bytearray)) else path, formats=IMAGE_FORMATS)
    except FileNotFoundError:
        raise DatasetError(f"{name}: file not found") from None
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name}: refused as a decompression bomb ({error_line(e)})") from None
    except UnidentifiedImageError:
        other = _other_format(_head(path))
        if other:
            raise UnsupportedImageFormat(f"{name}: {other} images are not accepted (only {ACCEPTED})") from None
        raise DatasetError(f"{name}: unreadable or truncated image "  # Pillow's text names a file object
                           f"(not an image in an accepted format: {ACCEPTED})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{name}: unreadable or truncated image ({error_line(e)})") from None
    limit = Image.MAX_IMAGE_PIXELS
    if max_pixels and (not limit or max_pixels < limit) and im.width * im.height > max_pixels:
        im.close()
        raise ImageTooLargeError(f"{name}: {im.width}x{im.height} is over the limit of {max_pixels} pixels")
    if limit and im.width * im.height > limit:
        im.close()
        raise ImageTooLargeError(f"{name}: {im.width}x{im.height} pixels is over Pillow's decompression-bomb "
                                 f"limit ({limit} pixels, PIL.Image.MAX_IMAGE_PIXELS)")
    return im


def _scaled_to_uint8(values: np.ndarray, bits16: bool) -> np.ndarray:
    """A high-bit-depth gray image as 8 bits, as viewers display it: 16-bit data over its full range
    (65535 -> 255); 32-bit data by the range its values use (0-255 as is, 0-65535 as 16-bit, floats in 0-1
    as fractions); anything else stretched over its own min..max."""
    v = values.astype(np.float64)
    low, high = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    floating = np.issubdtype(values.dtype, np.floating)
    if bits16 or (not floating and low >= 0 and 255 < high <= 65535):
        scaled = v / 257.0
    elif low >= 0 and high <= (1.0 if floating else 255):
        scaled = v * 255.0 if floating else v
    else:
        scaled = (v - low) * (255.0 / max(high - low, 1e-12))
    return np.round(scaled).clip(0, 255).astype(np.uint8)


def to_rgb(im: Image.Image, name) -> np.ndarray:
    """HxWx3 uint8 RGB as a viewer shows the picture: EXIF orientation applied, 16/32-bit gray scaled to 8
    bits, palette and CMYK converted, transparency composited over white."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        gray = _scaled_to_uint8(np.asarray(im), bits16=im.mode.startswith("I;16"))
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    try:
        return np.asarray(im.convert("RGB"))
    except ValueError as e:
        raise DatasetError(f"{name}: image mode {im.mode} cannot be converted to RGB ({error_line(e)})") from None


def read_image(source: Union[str, Path, bytes], name=None, max_pixels=None) -> np.ndarray:
    """HxWx3 uint8 RGB from a path or the bytes of an image file (``name`` labels errors for bytes);
    ``max_pixels``: refuse larger images (ImageTooLargeError) before decoding them."""
    name = name or (source if not isinstance(source, (bytes, bytearray)) else "image")
    im = _open(Path(source) if isinstance(source, str) else source, name, max_pixels)
    try:
        with im:
            return to_rgb(im, name)
    except (OSError, SyntaxError) as e:
        raise DatasetError(f"{name}: unreadable or truncated image ({error_line(e)})") from None
    except ValueError as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{name}: unreadable or truncated image ({error_line(e)})") from None


def read_mask(path) -> np.ndarray:
    """HxW uint8 class ids from an indexed (palette) or grayscale PNG. RGB masks are refused: their colours
    are not class ids (convert them with the dataset's palette first)."""
    path = Path(path)
    im = _open(path)
    try:
        with im:
            if im.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LA", "PA"):
                raise DatasetError(f"{path}: mask is an {im.mode} image; expected an indexed (palette) or "
                                   "grayscale PNG whose pixel values are class ids")
            mask = np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{path}: unreadable or truncated mask ({error_line(e)})") from None
    if mask.ndim != 2:
        raise DatasetError(f"{path}: mask has shape {mask.shape}; expected one channel of class ids")
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise DatasetError(f"{path}: mask values {int(mask.min())}..{int(mask.max())} do not fit class ids 0-255")
        mask = mask.astype(np.uint8)
    return mask


class LabelMap:
    """How a dataset's stored label values become training ids: a 256-entry lookup table plus which stored
    values are legal at all (anything else is a defect the file must be named for)."""

    def __init__(self, lut: np.ndarray, valid: np.ndarray, describe: str):
        self.lut = lut.astype(np.uint8)
        self.valid = valid.astype(bool)
        self.describe = describe  # e.g. "class ids 0-20 or 255"

    @classmethod
    def identity(cls, num_classes: int, ignore_index: int = 255) -> "LabelMap":
        lut = np.full(256, ignore_index, dtype=np.uint8)
        lut[:num_classes] = np.arange(num_classes)
        valid = np.zeros(256, dtype=bool)
        valid[:num_classes] = True
        valid[ignore_index] = True
        return cls(lut, valid, f"class ids 0-{num_classes - 1} or {ignore_index}")

    def apply(self, mask: np.ndarray, path) -> np.ndarray:
        """Map stored values to training ids; raise naming the file when a value is not allowed."""
        counts = np.bincount(mask.ravel(), minlength=256)
        bad = np.flatnonzero((counts > 0) & ~self.valid)
        if bad.size:
            shown = ", ".join(str(v) for v in bad[:8]) + (" ..." if bad.size > 8 else "")
            raise DatasetError(f"{path}: label values {shown} are not {self.describe}")
        return self.lut[mask]


def load_pair(image_path, mask_path, labels: LabelMap):
    """(HxWx3 uint8 image, HxW uint8 training ids) with size and label checks."""
    image = read_image(image_path)
    mask = read_mask(mask_path)
    if image.shape[:2] != mask.shape:
        raise DatasetError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                           f"{Path(image_path).name} is {image.shape[1]}x{image.shape[0]}")
    return image, labels.apply(mask, mask_path)
