"""The embedded default dataset: scenes generated from (seed, split, index), no files.

It is built to be a real segmentation problem rather than a toy:
- each object class has a shape (disc, square, triangle, ring, cross, star, crescent, bar, ...) and a
  preferred colour and texture, but only *usually*: a third of the objects take a random texture and hue,
  and the background sometimes wears the same textures, so local appearance is ambiguous and the shape
  (its outline, often far from the pixel being labelled) settles the class;
- object sizes are log-uniform from ~3% to ~45% of the image side (what atrous rates and ASPP are for):
  a crop smaller than a big object, or a field of view too small, cannot see the outline;
- objects overlap (painting order is depth, the mask is the visible one), leave the frame, and sit on
  textured backgrounds (gratings, low-frequency blotches, clutter strokes) with sensor noise.
Everything is vectorised numpy on the object's bounding box; see ``python -m deeplab.data.bench``.
"""
from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image

SHAPES = ("disc", "square", "triangle", "ring", "cross", "star", "crescent", "bar", "ellipse", "hexagon", "L")
TEXTURES = ("flat", "stripes", "checker", "dots", "gradient", "blotch")
MAX_CLASSES = len(SHAPES) + 1  # == config.SYNTHETIC_MAX_CLASSES, which bounds data.synthetic_classes


def class_names(num_classes: int) -> list:
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"data.synthetic_classes={num_classes} must be 2-{MAX_CLASSES} (background + shapes)")
    return ["background", *SHAPES[: num_classes - 1]]


def _class_style(k: int):
    """Class k's preferred hue and texture (fixed, so they are learnable cues)."""
    return (k * 0.61803) % 1.0, TEXTURES[k % len(TEXTURES)]


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, aux: float) -> np.ndarray:
    """Inside-test on rotated coordinates scaled so the shape fits the unit disc."""
    if shape == "disc":
        return u * u + v * v <= 1
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if shape == "triangle":
        c = 0.8660254
        return (v >= -0.5) & (c * u - 0.5 * v >= -0.5) & (-c * u - 0.5 * v >= -0.5)
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1) & (r2 >= 0.55 ** 2)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.28) & (av <= 1)) | ((av <= 0.28) & (au <= 1))
    if shape == "star":
        r = np.sqrt(u * u + v * v)
        theta = np.arctan2(v, u)
        return r <= 0.45 + 0.55 * np.abs(np.cos(2.5 * theta)) ** 3
    if shape == "crescent":
        return (u * u + v * v <= 1) & ((u - 0.45 - 0.2 * aux) ** 2 + v * v > 0.8 ** 2)
    if shape == "bar":
        return (np.abs(u) <= 1) & (np.abs(v) <= 0.22)
    if shape == "ellipse":
        return (u * u) + (v * v) * (3.0 + aux) <= 1
    if shape == "hexagon":
        au, av = np.abs(u), np.abs(v)
        return (av <= 0.866) & (0.866 * au + 0.5 * av <= 0.866)
    if shape == "L":
        return ((u >= -0.8) & (u <= -0.3) & (np.abs(v) <= 0.9)) | ((v >= 0.4) & (v <= 0.9) & (u >= -0.8) & (u <= 0.8))
    raise ValueError(shape)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255


def _texture(kind: str, u: np.ndarray, v: np.ndarray, freq: float, rng: np.random.Generator) -> np.ndarray:
    """A 2-D field in [0, 1] over a patch (0 -> first colour, 1 -> second); u, v are rotated pixel coordinates."""
    if kind == "flat":
        return np.zeros(np.broadcast(u, v).shape, np.float32)
    if kind == "stripes":
        return (np.sin(u * freq) > 0).astype(np.float32)
    if kind == "checker":
        return ((np.sin(u * freq) * np.sin(v * freq)) > 0).astype(np.float32)
    if kind == "dots":
        return ((np.cos(u * freq) * np.cos(v * freq)) > 0.55).astype(np.float32)
    if kind == "gradient":
        span = max(float(np.ptp(u)), 1.0)
        return ((u - u.min()) / span).astype(np.float32)
    return _smooth_noise(rng, *np.broadcast(u, v).shape, cells=4)  # blotch


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bilinearly (Pillow, fast)."""
    grid = rng.random((cells, cells), dtype=np.float32)
    return _upsample(grid, h, w)


def _upsample(field: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(field, mode="F").resize((max(w, 1), max(h, 1)), Image.BILINEAR))


_NOISE_BANK = {}


def _noise(rng: np.random.Generator, s: int) -> np.ndarray:
    """An s x s window of a fixed Gaussian noise bank at a random offset: deterministic, and far cheaper than
    drawing s*s normals for every image."""
    bank = _NOISE_BANK.get("bank")
    if bank is None:
        bank = _NOISE_BANK["bank"] = np.random.default_rng(12345).standard_normal((1031, 1031), dtype=np.float32)
    if s > bank.shape[0] // 2:
        return rng.standard_normal((s, s), dtype=np.float32)
    oy, ox = rng.integers(0, bank.shape[0] - s, 2)
    return bank[oy:oy + s, ox:ox + s]


def _background(rng: np.random.Generator, s: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """3 x s x s float: a muted base colour, two gratings and blotches (smooth, so drawn at 1/4 size and
    upsampled), sometimes an object's texture, and clutter strokes that look like bars but are background."""
    q = max(s // 4, 8)
    qy, qx = yy[:q] * (s / q), xx[:, :q] * (s / q)
    lum = np.zeros((q, q), np.float32)
    for _ in range(2):
        a, f = rng.uniform(0, np.pi), rng.uniform(0.02, 0.25)
        lum += rng.uniform(4, 18) * np.sin(f * (np.cos(a) * qx + np.sin(a) * qy) + rng.uniform(0, 6.3))
    blotch = rng.random((int(rng.integers(3, 9)),) * 2, dtype=np.float32)
    blotch = _upsample(blotch, q, q) - 0.5
    tint = rng.uniform(0.5, 1.0, 3).astype(np.float32) * rng.uniform(30, 90)
    base = _hsv(rng.random(), rng.uniform(0.05, 0.35), rng.uniform(0.3, 0.8))
    small = base[:, None, None] + lum[None] + blotch[None] * tint[:, None, None]
    img = np.stack([_upsample(np.ascontiguousarray(c), s, s) for c in small])
    if rng.random() < 0.35:  # background in an object's clothes: texture alone cannot decide the class
        kind = TEXTURES[int(rng.integers(1, len(TEXTURES)))]
        c1, c2 = _hsv(rng.random(), 0.6, 0.8), _hsv(rng.random(), 0.5, 0.35)
        a = rng.uniform(0, np.pi)
        t = _texture(kind, np.cos(a) * xx + np.sin(a) * yy, -np.sin(a) * xx + np.cos(a) * yy,
                     rng.uniform(0.15, 0.6), rng)
        img = 0.5 * img + 0.5 * (c1[:, None, None] + (c2 - c1)[:, None, None] * t[None])
    for _ in range(int(rng.integers(0, 4))):
        a = rng.uniform(0, np.pi)
        d = np.cos(a) * (xx - rng.uniform(0, s)) + np.sin(a) * (yy - rng.uniform(0, s))
        color = _hsv(rng.random(), rng.uniform(0.2, 0.9), rng.uniform(0.2, 1))
        np.copyto(img, color[:, None, None], where=(np.abs(d) < rng.uniform(1, 3.5))[None])
    return img


def _objects(rng: np.random.Generator, s: int, num_classes: int, yy: np.ndarray, xx: np.ndarray) -> tuple:
    """Objects, back to front (later ones occlude earlier ones), as 2-D fields only: (owner: 0 background or
    object j, texture value, shading, each object's two colours, each object's class)."""
    n = int(rng.integers(2, 8))
    classes = rng.integers(1, num_classes, n)
    radii = np.exp(rng.uniform(np.log(0.035 * s), np.log(0.45 * s), n))
    if rng.random() < 0.7:
        order = np.argsort(-radii)  # mostly big behind small, as in photos
        classes, radii = classes[order], radii[order]
    owner = np.zeros((s, s), np.uint8)
    field = np.zeros((s, s), np.float32)
    shade = np.ones((s, s), np.float32)
    c1s, c2s = np.zeros((n + 1, 3), np.float32), np.zeros((n + 1, 3), np.float32)
    labels = np.zeros(n + 1, np.uint8)
    for j, (k, r) in enumerate(zip(classes, radii), start=1):
        k, r = int(k), float(r)
        cy, cx = rng.uniform(-0.1 * s, 1.1 * s, 2)
        a = rng.uniform(0, 2 * np.pi)
        aux = rng.random()
        hue, kind = _class_style(k)
        if rng.random() < 0.33:  # off-style object: only the shape tells
            hue, kind = rng.random(), TEXTURES[int(rng.integers(len(TEXTURES)))]
        else:
            hue += rng.normal(0, 0.04)
        c1s[j] = _hsv(hue, rng.uniform(0.45, 1.0), rng.uniform(0.55, 1.0))
        c2s[j] = _hsv(hue + rng.uniform(-0.08, 0.08), rng.uniform(0.3, 1.0), rng.uniform(0.15, 0.5))
        labels[j] = k
        freq = rng.uniform(0.25, 0.9) * min(1.0, 24.0 / max(r, 1.0)) + 0.12
        y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, s)
        x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, s)
        if y0 >= y1 or x0 >= x1:
            continue
        dy, dx = yy[y0:y1] - cy, xx[:, x0:x1] - cx
        ca, sa = np.cos(a), np.sin(a)
        u, v = ca * dx + sa * dy, -sa * dx + ca * dy
        inside = _shape_mask(SHAPES[k - 1], u * (1 / r), v * (1 / r), aux)
        np.copyto(owner[y0:y1, x0:x1], j, where=inside)
        np.copyto(field[y0:y1, x0:x1], _texture(kind, u, v, freq, rng), where=inside)
        np.copyto(shade[y0:y1, x0:x1], 1.0 + (0.125 / r) * (u + v), where=inside)  # a little lighting
    return owner, field, shade, c1s, c2s, labels


def render(seed: int, index: int, size: int = 513, num_classes: int = 6, split: str = "train"):
    """One scene: (HxWx3 uint8 image, HxW uint8 mask with class ids 0..num_classes-1), a pure function of
    (seed, split, index, size, num_classes).

    Drawn planar (3 x H x W) and in two passes: objects first write 2-D fields (who is on top, texture value,
    shading), then colours are composed once, so no per-object work touches three channels."""
    class_names(num_classes)  # validates
    salt = sum(ord(ch) * 31 ** i for i, ch in enumerate(split)) % (2 ** 31)
    rng = np.random.default_rng([int(seed), salt, int(index)])
    s = size
    yy = np.arange(s, dtype=np.float32)[:, None]
    xx = np.arange(s, dtype=np.float32)[None, :]
    img = _background(rng, s, yy, xx)
    owner, field, shade, c1s, c2s, labels = _objects(rng, s, num_classes, yy, xx)
    # Compose colours once (per channel: np.take on a tiny table is far faster than 3-D fancy indexing),
    # then the camera: contrast/brightness and sensor noise.
    fg = owner > 0
    gain = rng.uniform(0.8, 1.2)
    grain = rng.uniform(-20, 20) + _noise(rng, s) * rng.uniform(2, 10)
    image = np.empty((s, s, 3), np.uint8)
    for c in range(3):
        plane = img[c]
        np.copyto(plane, (np.take(c1s[:, c], owner) + np.take(c2s[:, c] - c1s[:, c], owner) * field) * shade,
                  where=fg)
        plane *= gain
        plane += grain
        image[..., c] = np.clip(plane, 0, 255)
    return image, np.take(labels, owner)
