"""An independent renderer of single coloured shapes, for testing the mini-CLIP only.

Why it exists: the mini-CLIP is pretrained on `safelib.data.miniworld`'s drawings; measuring it on
the same renderer rewards memorising that renderer's proportions. This module draws the same six
shapes and six colours with other code (numpy polygon rasterisation with 3 x 3 supersampling, so
edges are anti-aliased; no PIL drawing), other proportions (oval-ish circles, rounded squares,
scalene triangles, Latin crosses, thin-to-wide diamonds, shallow-to-deep stars), other colour
shades, and other styles (gradient and speckled fills, hollow outlines, thin dark strokes, paper,
dark, vignette and blotchy backgrounds). It lives in the tests and nothing in `safelib` imports
it, so pretraining never sees it.

Every image is a pure function of its seed. Orientation stays within +-15 degrees of upright
(+-12 for squares and diamonds): a square turned 45 degrees would be a diamond.
"""
from __future__ import annotations

import math

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOUR_NAMES: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
# Other shades than the training palette (a reader's "red" is not one RGB value).
SHADES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": ((200, 30, 45), (230, 55, 35), (180, 20, 30)),
    "green": ((50, 150, 70), (70, 180, 50), (30, 130, 90)),
    "blue": ((30, 60, 200), (50, 110, 230), (25, 45, 160)),
    "yellow": ((245, 225, 60), (250, 205, 30), (230, 230, 80)),
    "purple": ((130, 50, 170), (160, 70, 200), (110, 40, 140)),
    "orange": ((250, 130, 30), (235, 150, 45), (255, 115, 20)),
}
FILLS: tuple[str, ...] = ("solid", "gradient", "speckled", "hollow", "stroked")
BACKGROUNDS: tuple[str, ...] = ("paper", "dark", "vignette", "blotches")
SUPERSAMPLE = 3


def _rot(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def outline_of(shape: str, rng: np.random.Generator) -> np.ndarray:
    """Vertices (K x 2) of one shape in a unit box (extent about +-1, y down), proportions drawn at random."""
    if shape == "circle":
        t = np.linspace(0, 2 * math.pi, 36, endpoint=False)
        aspect = rng.uniform(0.9, 1.1)  # a hand-drawn circle is rarely exact
        return np.stack([np.cos(t) * aspect, np.sin(t) / aspect], 1)
    if shape == "square":
        corner = rng.uniform(0.0, 0.25)  # rounded corners, radius as a fraction of the half side
        pts = []
        for cx, cy, a0 in ((1, 1, 0), (-1, 1, 90), (-1, -1, 180), (1, -1, 270)):
            for a in np.linspace(a0, a0 + 90, 5):
                r = math.radians(a)
                pts.append(((1 - corner) * cx + corner * math.cos(r), (1 - corner) * cy + corner * math.sin(r)))
        return np.array(pts) * 0.85
    if shape == "triangle":
        height = rng.uniform(0.8, 1.3)  # height / base: from squat to tall
        apex = rng.uniform(-0.45, 0.45)  # apex off-centre: scalene triangles
        return np.array([(apex, -height), (1.0, height * 0.6), (-1.0, height * 0.6)]) * 0.9
    if shape == "star":
        inner = rng.uniform(0.33, 0.55)  # spike depth
        pts = [((1.0 if k % 2 == 0 else inner) * math.cos(-math.pi / 2 + k * math.pi / 5),
                (1.0 if k % 2 == 0 else inner) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
        return np.array(pts)
    if shape == "cross":
        w = rng.uniform(0.17, 0.3)  # arm half-width
        bar = rng.choice([0.0, -0.3])  # 0: Greek cross; -0.3: Latin cross, crossbar raised
        top, bottom, side = -1.0, 1.0, 0.8 if bar else 1.0
        return np.array([(-w, top), (w, top), (w, bar - w), (side, bar - w), (side, bar + w), (w, bar + w), (w, bottom),
                         (-w, bottom), (-w, bar + w), (-side, bar + w), (-side, bar - w), (-w, bar - w)])
    if shape == "diamond":
        half_width = rng.uniform(0.45, 0.8)  # narrow to nearly square-on-its-corner
        return np.array([(0.0, -1.0), (half_width, 0.0), (0.0, 1.0), (-half_width, 0.0)])
    raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")


def _inside(poly: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon for arrays of points."""
    inside = np.zeros(x.shape, dtype=bool)
    x0, y0 = poly[:, 0], poly[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    for a, b, c, d in zip(x0, y0, x1, y1):
        crosses = (b > y) != (d > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xc = a + (y - b) * (c - a) / (d - b)
        inside ^= crosses & (x < xc)
    return inside


def _edge_distance(poly: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Distance from each point to the polygon's boundary."""
    best = np.full(x.shape, np.inf)
    x0, y0 = poly[:, 0], poly[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    for a, b, c, d in zip(x0, y0, x1, y1):
        dx, dy = c - a, d - b
        t = np.clip(((x - a) * dx + (y - b) * dy) / max(dx * dx + dy * dy, 1e-12), 0, 1)
        best = np.minimum(best, np.hypot(x - a - t * dx, y - b - t * dy))
    return best


def _background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    if kind == "paper":
        base = rng.uniform(225, 250) + rng.uniform(-5, 5, 3) * np.array([1.0, 0.8, -1.0])
        img = np.broadcast_to(base, (size, size, 3)) + rng.normal(0, 2.5, (size, size, 1))
    elif kind == "dark":
        img = np.broadcast_to(rng.uniform(20, 55) + rng.uniform(-4, 4, 3), (size, size, 3)).copy()
    elif kind == "vignette":
        centre = rng.uniform(120, 200)
        r = np.hypot(xx - 0.5, yy - 0.5)[..., None]
        img = centre - r * rng.uniform(90, 150) + np.zeros(3)
    elif kind == "blotches":  # smooth low-frequency grey noise: bilinear upsampling of a 5 x 5 grid
        coarse = rng.uniform(70, 190, (5, 5))
        g = np.linspace(0, 4, size)
        i = np.clip(g.astype(int), 0, 3)
        f = g - i
        rows = coarse[i] * (1 - f)[:, None] + coarse[i + 1] * f[:, None]
        img = (rows[:, i] * (1 - f) + rows[:, i + 1] * f)[..., None] + np.zeros(3)
    else:
        raise ValueError(f"unknown background {kind!r}; valid: {BACKGROUNDS}")
    return np.clip(img, 0, 255)


def draw(shape: str, colour: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One S x S x 3 uint8 image of a single shape of a colour, in a random style."""
    if colour not in SHADES:
        raise ValueError(f"unknown colour {colour!r}; valid: {COLOUR_NAMES}")
    fill_style = FILLS[rng.integers(len(FILLS))]
    img = _background(rng, BACKGROUNDS[rng.integers(len(BACKGROUNDS))], size)
    base = np.array(SHADES[colour][rng.integers(3)], dtype=float)

    poly = outline_of(shape, rng)
    limit = 12 if shape in ("square", "diamond") else 15
    poly = _rot(poly, math.radians(rng.uniform(-limit, limit)))
    scale = rng.uniform(0.24, 0.38) * size  # half-extent in pixels
    cx, cy = size / 2 + rng.uniform(-0.12, 0.12, 2) * size
    poly = poly * scale + np.array([cx, cy])

    # supersampled pixel centres within the object's bounding box
    pad = 0.1 * scale + 2
    x0, y0 = np.floor(np.maximum(poly.min(0) - pad, 0)).astype(int)
    x1, y1 = np.ceil(np.minimum(poly.max(0) + pad, size)).astype(int)
    k = SUPERSAMPLE
    sub = (np.arange(k) + 0.5) / k
    xs = (np.arange(x0, x1)[:, None] + sub).ravel()
    ys = (np.arange(y0, y1)[:, None] + sub).ravel()
    X, Y = np.meshgrid(xs, ys)
    inside = _inside(poly, X, Y)

    colour_img = np.broadcast_to(base, X.shape + (3,)).copy()
    if fill_style == "gradient":  # lighter at the top, darker at the bottom
        t = ((Y - Y.min()) / max(np.ptp(Y), 1))[..., None]
        colour_img = base * (1.12 - 0.3 * t)
    elif fill_style == "speckled":
        colour_img = base * (1 + rng.normal(0, 0.08, X.shape + (1,)))
    if fill_style == "hollow":  # a thick stroke in the colour, background inside
        cover = inside & (_edge_distance(poly, X, Y) <= rng.uniform(0.12, 0.2) * scale)
        paint = colour_img
    elif fill_style == "stroked":  # filled, with a thin near-black stroke
        dist = _edge_distance(poly, X, Y)
        stroke = dist <= rng.uniform(0.8, 1.8)
        cover = inside | stroke
        paint = np.where(stroke[..., None], np.array([25.0, 25.0, 30.0]), colour_img)
    else:
        cover = inside
        paint = colour_img

    def pool(a: np.ndarray) -> np.ndarray:  # k x k box filter: anti-aliasing
        h, w = a.shape[0] // k, a.shape[1] // k
        return a.reshape(h, k, w, k, *a.shape[2:]).mean(axis=(1, 3))

    alpha = pool(cover.astype(float))[..., None]
    paint = pool(np.clip(paint, 0, 255) * cover[..., None]) / np.maximum(alpha, 1e-6)
    region = img[y0:y1, x0:x1]
    img[y0:y1, x0:x1] = region * (1 - alpha) + paint * alpha
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def single_objects(per_pair: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`per_pair` images of each (shape, colour) pair: images N x S x S x 3, shape labels, colour labels."""
    rng = np.random.default_rng(seed)
    images, shapes, colours = [], [], []
    for _ in range(per_pair):
        for s, shape in enumerate(SHAPES):
            for c, colour in enumerate(COLOUR_NAMES):
                images.append(draw(shape, colour, size, rng))
                shapes.append(s)
                colours.append(c)
    return np.stack(images), np.array(shapes), np.array(colours)
