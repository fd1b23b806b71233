"""The mini-world: seeded, captioned scenes of coloured shapes, with a mask per object.

Why it exists: offline, nobody can reach real CLIP weights, yet SAFE's point (re-weight *where*
the attention pooling looks) needs a model whose pooling learned something, in a world where we
know which region matters. This module draws that world; `safelib.experiments.miniclip_pretrain` pretrains a small
ResNet CLIP on its captions, and the few-shot tasks in `safelib.data.miniworld_tasks` ask about
one designated object while others distract.

Everything is a pure function of a `numpy.random.Generator`, so a seed fixes every pixel,
caption and mask. `Style` holds the knobs for distribution shift (background textures, object
sizes, outlines, clutter): train in one style, test in another, the offline analogue of
ImageNet -> ImageNet-R/Sketch. The "pretrain" style also varies each shape's proportions and
orientation, fills (solid, hollow, shaded, speckled), stroke widths, corner roundings and blur, so
the mini-CLIP learns a shape rather than one drawing of it; the tasks' styles keep the canonical
drawing (and draw the same random numbers as before those knobs existed: every task image is unchanged).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 215, 40),
    "purple": (145, 60, 185),
    "orange": (245, 140, 25),
}
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUNDS: tuple[str, ...] = ("plain", "noise", "stripes", "checker", "gradient", "clouds")
# How an object's inside is painted (a dark outline is a separate knob, `SceneObject.outline`).
FILLS: tuple[str, ...] = ("solid", "hollow", "shaded", "speckled")
# How far each shape may turn (degrees) when a style varies shapes. Why these: the classes must
# stay distinct. A square turned 45 degrees is a diamond with equal diagonals, so squares and
# diamonds turn at most 15 degrees each way: a square's edges stay within 15 degrees of level, a
# diamond's corners within 15 degrees of vertical, leaving at least 15 degrees between the two.
# A cross turned 45 degrees reads as an "x", so 25. A triangle (pointing up or down, a triangle)
# and a circle may turn freely; a 5-pointed star repeats every 72 degrees, so +-36 is every star.
ROTATION_LIMITS: dict[str, float] = {"circle": 180.0, "square": 15.0, "triangle": 180.0, "star": 36.0,
                                     "cross": 25.0, "diamond": 15.0}
# A hollow shape's stroke and an outline's width, as fractions of the radius (outline: half of it).
STROKE = 0.25
# Rounding a corner by more than this would turn a square into a circle.
MAX_ROUNDING = 0.35
# 3 x 3 regions of the image, named as a caption would say them (row, column).
POSITIONS: tuple[tuple[str, ...], ...] = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
# Radius as a fraction of the image side, before Style.size_scale.
SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (0.09, 0.13), "large": (0.2, 0.27)}

# Zero-shot prompt templates matching the caption grammar below (no vowel-initial shape name,
# so "a {}" is always correct; colours go through "something {}" to avoid "a orange").
SHAPE_TEMPLATES: tuple[str, ...] = ("a {}.", "a picture of a {}.", "an image of a {}.", "a photo of a {}.")
COLOUR_TEMPLATES: tuple[str, ...] = (
    "something {}.",
    "a picture of something {}.",
    "an image of something {}.",
    "a photo of something {}.",
)


@dataclass(frozen=True)
class Style:
    """Rendering knobs; vary one to make a distribution shift.

    backgrounds: textures drawn uniformly from `BACKGROUNDS`.
    size_scale: multiplies every object radius.
    outline_prob: chance an object gets a dark outline.
    clutter: maximum number of grey lines / dots scattered over the background.
    colour_jitter: per-channel jitter of object colours, as a fraction of 255.
    varied_shapes: draw each shape with random proportions (`SceneObject.proportions`) and turn
        it within `ROTATION_LIMITS`; False keeps the canonical drawing, turned +-15 degrees.
    fills: fills drawn uniformly from `FILLS`.
    size_ranges: (small, large) radius ranges as fractions of the image side; None: `SIZE_RANGES`.
    blur: maximum Gaussian blur radius in pixels, applied to half of the images (soft edges).
    rounding: with varied shapes, half of the objects get corners rounded by up to this fraction of
        the radius (`SceneObject.rounding`): a drawn or printed square often has soft corners.
    strokes: with varied shapes, the (low, high) range of `SceneObject.stroke`: hollow shapes from
        thin pen lines to thick bands, outlines from hairlines to heavy.
    """

    backgrounds: tuple[str, ...] = ("plain",)
    size_scale: float = 1.0
    outline_prob: float = 0.0
    clutter: int = 0
    colour_jitter: float = 0.06
    varied_shapes: bool = False
    fills: tuple[str, ...] = ("solid",)
    size_ranges: tuple[tuple[float, float], tuple[float, float]] | None = None
    blur: float = 0.0
    rounding: float = 0.0
    strokes: tuple[float, float] = (STROKE, STROKE)

    def __post_init__(self) -> None:
        unknown = [b for b in self.backgrounds if b not in BACKGROUNDS]
        if not self.backgrounds or unknown:
            raise ValueError(f"Style.backgrounds must be a non-empty subset of {BACKGROUNDS}, got {self.backgrounds}")
        if not 0.3 <= self.size_scale <= 1.6:
            raise ValueError(f"Style.size_scale must be in [0.3, 1.6], got {self.size_scale}")
        if not 0.0 <= self.outline_prob <= 1.0:
            raise ValueError(f"Style.outline_prob must be a probability in [0, 1], got {self.outline_prob}")
        if self.clutter < 0:
            raise ValueError(f"Style.clutter must be >= 0, got {self.clutter}")
        if not 0.0 <= self.colour_jitter <= 0.3:
            raise ValueError(f"Style.colour_jitter must be in [0, 0.3], got {self.colour_jitter}")
        if not self.fills or any(f not in FILLS for f in self.fills):
            raise ValueError(f"Style.fills must be a non-empty subset of {FILLS}, got {self.fills}")
        if self.size_ranges is not None and (
                len(self.size_ranges) != 2
                or not all(0.02 <= lo <= hi <= 0.45 for lo, hi in self.size_ranges)):
            raise ValueError("Style.size_ranges must be ((lo, hi) small, (lo, hi) large) with "
                             f"0.02 <= lo <= hi <= 0.45, got {self.size_ranges}")
        if not 0.0 <= self.blur <= 3.0:
            raise ValueError(f"Style.blur must be in [0, 3] pixels, got {self.blur}")
        if not 0.0 <= self.rounding <= MAX_ROUNDING:
            raise ValueError(f"Style.rounding must be in [0, {MAX_ROUNDING}], got {self.rounding}")
        if len(self.strokes) != 2 or not 0.05 <= self.strokes[0] <= self.strokes[1] <= 0.5:
            raise ValueError(f"Style.strokes must be (low, high) with 0.05 <= low <= high <= 0.5, got {self.strokes}")


STYLES: dict[str, Style] = {
    "plain": Style(),
    "textured": Style(backgrounds=("noise", "stripes", "checker", "gradient")),
    "outlined": Style(outline_prob=1.0),
    "cluttered": Style(backgrounds=("plain", "noise"), clutter=8),
    "small": Style(size_scale=0.75),
    # The issue-5 pretraining mixture (phases 1-2 of the recipe in safelib.experiments.miniclip_pretrain).
    "pretrain_v1": Style(backgrounds=("plain", "noise", "stripes", "checker", "gradient"), outline_prob=0.25, clutter=2),
    # What the mini-CLIP is pretrained on: a mixture, so every style is in-distribution-ish, and
    # every shape in many proportions, sizes, fills, strokes, corner roundings and orientations (issue 11).
    "pretrain": Style(backgrounds=BACKGROUNDS, outline_prob=0.3, clutter=2, colour_jitter=0.08,
                      varied_shapes=True, fills=("solid", "solid", "hollow", "hollow", "shaded", "speckled"),
                      size_ranges=((0.07, 0.14), (0.18, 0.38)), blur=1.2, rounding=0.3, strokes=(0.08, 0.4)),
}


def get_style(style: str | Style) -> Style:
    """A `Style` from itself or from its name in `STYLES`."""
    if isinstance(style, Style):
        return style
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; valid: {sorted(STYLES)}")
    return STYLES[style]


@dataclass(frozen=True)
class SceneObject:
    """One shape: what a caption says about it, and where it is drawn (pixels)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    radius: float
    angle: float = 0.0
    outline: bool = False
    # Two numbers in [0, 1] that set the shape's proportions (see `_unit_polygon`); None: canonical.
    proportions: tuple[float, float] | None = None
    fill: str = "solid"
    rounding: float = 0.0  # corner radius as a fraction of the radius (0: sharp corners)
    stroke: float = STROKE  # hollow stroke width as a fraction of the radius; an outline is half as wide

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; valid: {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; valid: {tuple(COLOURS)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; valid: {SIZES}")
        if self.radius <= 0:
            raise ValueError(f"radius must be > 0, got {self.radius}")
        if self.fill not in FILLS:
            raise ValueError(f"unknown fill {self.fill!r}; valid: {FILLS}")
        if self.proportions is not None and (len(self.proportions) != 2
                                             or not all(0.0 <= p <= 1.0 for p in self.proportions)):
            raise ValueError(f"proportions must be two numbers in [0, 1] or None, got {self.proportions}")
        if not 0.0 <= self.rounding <= MAX_ROUNDING:
            raise ValueError(f"rounding must be in [0, {MAX_ROUNDING}], got {self.rounding}")
        if not 0.0 < self.stroke <= 0.5:
            raise ValueError(f"stroke must be in (0, 0.5], got {self.stroke}")

    def position(self, image_size: int) -> str:
        """Which third of the image (row, column) holds the centre, as words."""
        row = min(2, int(3 * self.y / image_size))
        col = min(2, int(3 * self.x / image_size))
        return POSITIONS[row][col]


@dataclass(frozen=True)
class Scene:
    """A rendered scene: image, objects (drawing order), visible masks, caption."""

    image: Image.Image
    objects: tuple[SceneObject, ...]
    masks: np.ndarray = field(repr=False)  # n_objects x S x S bool, occlusion removed
    caption: str = ""
    background: str = "plain"


# ----------------------------------------------------------------------------- geometry


def _unit_polygon(shape: str, proportions: tuple[float, float] | None) -> list[tuple[float, float]]:
    """Vertices of a shape of circumradius about 1 at the origin, y down.

    proportions None gives the canonical drawing; otherwise (p, q) in [0, 1] sweep each class's
    range of shapes that still carry its name: a circle's aspect 0.85-1.15; a square's aspect
    0.85-1.15; a triangle's height 0.7-1.4 x an equilateral one's, apex shifted up to 0.6 of the
    half base (scalene); a star's spike depth (inner radius 0.3-0.6); a cross's arm half-width
    0.15-0.42, raised crossbar (a Latin cross) when q > 0.6; a diamond's width 0.4-1.0 of its
    height (1.0: equal diagonals).
    """
    p, q = proportions if proportions is not None else (None, None)
    if shape == "circle":
        aspect = 1.0 if p is None else 0.85 + 0.3 * p
        return [(aspect * math.cos(a), math.sin(a) / aspect) for a in np.linspace(0, 2 * math.pi, 32, endpoint=False)]
    if shape == "square":
        aspect = 1.0 if p is None else 0.85 + 0.3 * p
        h = 0.75  # side ~ 1.5 r: area close to a circle's
        return [(-h * aspect, -h / aspect), (h * aspect, -h / aspect), (h * aspect, h / aspect), (-h * aspect, h / aspect)]
    if shape == "triangle":
        if p is None:
            return [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        height = math.sqrt(3) * (0.7 + 0.7 * p)  # base half-width 1; equilateral height sqrt(3)
        apex = 0.6 * (2 * q - 1)
        pts = [(apex, -2 * height / 3), (1.0, height / 3), (-1.0, height / 3)]  # centroid near the origin
        scale = max(math.hypot(x, y) for x, y in pts)
        return [(x / scale, y / scale) for x, y in pts]
    if shape == "diamond":
        w = 0.62 if p is None else 0.4 + 0.6 * p
        return [(0, -1), (w, 0), (0, 1), (-w, 0)]
    if shape == "star":
        inner = 0.42 if p is None else 0.3 + 0.3 * p
        return [((1.0 if k % 2 == 0 else inner) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 (1.0 if k % 2 == 0 else inner) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    if shape == "cross":
        w = 0.33 if p is None else 0.15 + 0.27 * p
        bar = 0.0 if q is None or q <= 0.6 else -(q - 0.6)  # crossbar raised up to 0.4
        side = 1.0 if bar == 0.0 else 0.8
        return [(-w, -1), (w, -1), (w, bar - w), (side, bar - w), (side, bar + w), (w, bar + w), (w, 1), (-w, 1),
                (-w, bar + w), (-side, bar + w), (-side, bar - w), (-w, bar - w)]
    raise ValueError(f"no polygon for shape {shape!r}; shapes: {SHAPES}")


def _rounded(points: list[tuple[float, float]], radius: float, n: int = 4) -> list[tuple[float, float]]:
    """The polygon with each corner cut by a quadratic Bezier arc reaching `radius` along both edges.

    The arc never takes more than 45% of an edge, so short edges (a star's spikes) round less.
    """
    if radius <= 0:
        return points
    pts = np.asarray(points, dtype=np.float64)
    out: list[tuple[float, float]] = []
    for i, v in enumerate(pts):
        to_prev, to_next = pts[i - 1] - v, pts[(i + 1) % len(pts)] - v
        len_prev, len_next = np.hypot(*to_prev), np.hypot(*to_next)
        d = min(radius, 0.45 * len_prev, 0.45 * len_next)
        a, b = v + to_prev / len_prev * d, v + to_next / len_next * d
        for t in np.linspace(0, 1, n):
            p = (1 - t) ** 2 * a + 2 * t * (1 - t) * v + t ** 2 * b
            out.append((float(p[0]), float(p[1])))
    return out


def _polygon(shape: str, x: float, y: float, r: float, angle: float,
             proportions: tuple[float, float] | None = None, rounding: float = 0.0) -> list[tuple[float, float]]:
    """Vertices of a shape of circumradius r centred at (x, y), rotated by `angle` radians."""
    c, s = math.cos(angle), math.sin(angle)
    unit = _unit_polygon(shape, proportions)
    if shape != "circle":
        unit = _rounded(unit, rounding)
    return [(x + r * (px * c - py * s), y + r * (px * s + py * c)) for px, py in unit]


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, fill, outline) -> None:
    """Draw one object; a hollow one is a thick stroke in its colour (`outline` then goes outside it)."""
    width = max(1 if obj.stroke < STROKE else 2, round(obj.radius * obj.stroke / 2)) if outline is not None else 0
    if obj.fill == "hollow":
        stroke = max(2, round(obj.radius * obj.stroke))
        if outline is not None:  # the dark outline first, a little wider, then the colour inside it
            _shape(draw, obj, None, outline, stroke + width)
        _shape(draw, obj, None, fill, stroke)
        return
    _shape(draw, obj, fill, outline, width)


def _shape(draw: ImageDraw.ImageDraw, obj: SceneObject, fill, outline, width: int) -> None:
    if obj.shape == "circle" and obj.proportions is None:
        box = [obj.x - obj.radius, obj.y - obj.radius, obj.x + obj.radius, obj.y + obj.radius]
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    else:
        pts = _polygon(obj.shape, obj.x, obj.y, obj.radius, obj.angle, obj.proportions, obj.rounding)
        draw.polygon(pts, fill=fill, outline=outline, width=width)


def turn_for(shape: str, unit: float) -> float:
    """An angle (radians) for a shape from a unit draw in [-1, 1], within `ROTATION_LIMITS`."""
    return math.radians(unit * ROTATION_LIMITS[shape])


# ----------------------------------------------------------------------------- sampling


def sample_object(
    rng: np.random.Generator,
    image_size: int,
    style: Style,
    *,
    shape: str | None = None,
    colour: str | None = None,
    size: str | None = None,
    avoid: tuple[SceneObject, ...] = (),
) -> SceneObject:
    """Draw one object; fixed attributes are kept, the rest random. Avoids heavy overlap with `avoid`."""
    shape = shape if shape is not None else SHAPES[rng.integers(len(SHAPES))]
    colour = colour if colour is not None else tuple(COLOURS)[rng.integers(len(COLOURS))]
    size = size if size is not None else SIZES[rng.integers(len(SIZES))]
    lo, hi = SIZE_RANGES[size] if style.size_ranges is None else style.size_ranges[SIZES.index(size)]
    radius = float(rng.uniform(lo, hi)) * style.size_scale * image_size
    margin = radius * 0.9
    best, best_overlap = None, math.inf
    for _ in range(20):  # rejection sampling: the placement whose worst overlap is smallest
        x, y = rng.uniform(margin, image_size - margin, size=2)
        overlap = max((o.radius + radius * 0.8 - math.hypot(o.x - x, o.y - y) for o in avoid), default=-1.0)
        if overlap < best_overlap:
            best, best_overlap = (float(x), float(y)), overlap
        if overlap <= 0:
            break
    if style.varied_shapes:  # per-shape limits (ROTATION_LIMITS) and random proportions
        angle = turn_for(shape, float(rng.uniform(-1, 1)))
        proportions = (float(rng.random()), float(rng.random()))
    else:
        angle = float(rng.uniform(-0.26, 0.26))  # +-15 degrees: a square never turns into a diamond
        proportions = None
    outline = bool(rng.random() < style.outline_prob)
    fill = style.fills[rng.integers(len(style.fills))] if len(style.fills) > 1 else style.fills[0]
    rounding, stroke = 0.0, STROKE
    if style.varied_shapes:  # drawn only here, so the canonical styles' random streams stay as they were
        rounding = float(rng.uniform(0, style.rounding)) if rng.random() < 0.5 else 0.0
        stroke = float(rng.uniform(*style.strokes))
    return SceneObject(shape, colour, size, best[0], best[1], radius, angle, outline, proportions, fill,
                       rounding, stroke)


def sample_objects(rng: np.random.Generator, n: int, image_size: int, style: Style) -> tuple[SceneObject, ...]:
    """n random objects, placed to overlap little."""
    objs: list[SceneObject] = []
    for _ in range(n):
        objs.append(sample_object(rng, image_size, style, avoid=tuple(objs)))
    return tuple(objs)


# ----------------------------------------------------------------------------- rendering


def _background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """S x S x 3 float background of low saturation, so it never reads as an object colour."""
    def grey() -> np.ndarray:
        level = rng.uniform(40, 225)
        return np.clip(level + rng.uniform(-12, 12, size=3), 0, 255)

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    a, b = grey(), grey()
    if kind == "plain":
        img = np.broadcast_to(a, (size, size, 3)).copy()
    elif kind == "noise":
        img = a + rng.normal(0, 22, size=(size, size, 1)) + rng.normal(0, 6, size=(size, size, 3))
    elif kind == "stripes":
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(6, 20)
        t = (xx * math.cos(theta) + yy * math.sin(theta)) / period
        img = np.where((np.floor(t) % 2 == 0)[..., None], a, b)
    elif kind == "checker":
        cell = rng.uniform(6, 20)
        img = np.where(((np.floor(xx / cell) + np.floor(yy / cell)) % 2 == 0)[..., None], a, b)
    elif kind == "gradient":
        theta = rng.uniform(0, 2 * math.pi)
        t = ((xx - size / 2) * math.cos(theta) + (yy - size / 2) * math.sin(theta)) / size + 0.5
        img = a + np.clip(t, 0, 1)[..., None] * (b - a)
    elif kind == "clouds":  # smooth blotches: a coarse random grey grid, upsampled bicubically
        n = int(rng.integers(3, 8))
        coarse = rng.uniform(40, 225, size=(n, n)).astype(np.float32)
        smooth = np.asarray(Image.fromarray(coarse, "F").resize((size, size), Image.BICUBIC))
        img = smooth[..., None] + rng.uniform(-8, 8, size=3)
    else:
        raise ValueError(f"unknown background {kind!r}; valid: {BACKGROUNDS}")
    return np.clip(img, 0, 255)


def _clutter(rng: np.random.Generator, draw: ImageDraw.ImageDraw, n: int, size: int) -> None:
    for _ in range(n):
        g = int(rng.uniform(20, 235))
        x0, y0, x1, y1 = rng.uniform(0, size, size=4)
        if rng.random() < 0.5:
            draw.line([x0, y0, x1, y1], fill=(g, g, g), width=int(rng.integers(1, 3)))
        else:
            r = rng.uniform(1, 3)
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=(g, g, g))


def render(
    rng: np.random.Generator,
    objects: tuple[SceneObject, ...],
    image_size: int,
    style: Style,
) -> tuple[Image.Image, np.ndarray, str]:
    """Draw objects in order on a background. Returns (RGB image, visible masks n x S x S, background)."""
    kind = style.backgrounds[rng.integers(len(style.backgrounds))]
    image = Image.fromarray(_background(rng, kind, image_size).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    if style.clutter:
        _clutter(rng, draw, int(rng.integers(0, style.clutter + 1)), image_size)
    masks = np.zeros((len(objects), image_size, image_size), dtype=bool)
    for i, obj in enumerate(objects):
        base = np.array(COLOURS[obj.colour], dtype=np.float64)
        fill = tuple(int(v) for v in np.clip(base + rng.normal(0, style.colour_jitter * 255, size=3), 0, 255))
        outline = (15, 15, 15) if obj.outline else None
        _draw_object(draw, obj, fill, outline)
        layer = Image.new("L", (image_size, image_size), 0)
        _draw_object(ImageDraw.Draw(layer), obj, 255, 255 if obj.outline else None)
        m = np.asarray(layer) > 0
        masks[:i] &= ~m  # later objects occlude earlier ones
        masks[i] = m
        if obj.fill in ("shaded", "speckled"):
            image = _texture_fill(rng, image, m, obj, fill)
            draw = ImageDraw.Draw(image)
    if style.blur > 0 and rng.random() < 0.5:  # soft, anti-aliased-looking edges
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, style.blur))))
    return image, masks, kind


def _texture_fill(rng: np.random.Generator, image: Image.Image, mask: np.ndarray, obj: SceneObject,
                  fill: tuple[int, int, int]) -> Image.Image:
    """Repaint an object's fill-coloured pixels with a shading (a linear light-to-dark ramp) or speckle."""
    pixels = np.asarray(image).astype(np.float32)
    inside = mask & (pixels == np.array(fill, dtype=np.float32)).all(-1)  # not its dark outline
    if obj.fill == "shaded":
        theta = rng.uniform(0, 2 * math.pi)
        yy, xx = np.nonzero(inside)
        t = ((xx - obj.x) * math.cos(theta) + (yy - obj.y) * math.sin(theta)) / (2 * obj.radius) + 0.5
        factor = (1.15 - 0.35 * np.clip(t, 0, 1))[:, None]
    else:
        factor = 1 + rng.normal(0, 0.1, size=(int(inside.sum()), 1))
    pixels[inside] = np.clip(pixels[inside] * factor, 0, 255)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(obj: SceneObject, image_size: int, rng: np.random.Generator, *, p_drop: float = 0.3) -> str:
    """A noun phrase for one object, e.g. 'a large red star in the top left'.

    Each attribute is dropped at random (the shape least often), so the text tower learns what
    each word means on its own, which is what zero-shot prompts like 'a star' rely on.
    """
    keep_size = rng.random() > p_drop
    keep_colour = rng.random() > p_drop * 0.5
    keep_shape = rng.random() > p_drop * 0.3 or not keep_colour
    keep_pos = rng.random() > p_drop * 1.5
    words = []
    if keep_size:
        words.append(obj.size)
    if keep_colour:
        words.append(obj.colour)
    if keep_shape:
        words.append(obj.shape)
        phrase = " ".join(words)
        phrase = f"{_article(phrase)} {phrase}"
    else:  # colour without a shape: 'something red', 'something small and red'
        phrase = "something " + " and ".join(words)
    if obj.outline and rng.random() < 0.3:
        phrase += " with an outline"
    if obj.fill == "hollow" and keep_shape and rng.random() < 0.3:
        phrase += " drawn as an outline"
    if keep_pos:
        pos = obj.position(image_size)
        prep = "at the" if pos in ("top", "bottom", "center") else "in the" if " " in pos else "on the"
        phrase += f" {prep} {pos}"
    return phrase


_PREFIXES = ("", "", "a picture of ", "an image of ", "a photo of ")
# More ways to start a caption, for the pretraining style (the tasks' captions keep the first five).
_MORE_PREFIXES = _PREFIXES + ("a drawing of ", "a sketch of ", "there is ", "a clipart of ", "this shows ")


def caption(objects: tuple[SceneObject, ...], image_size: int, rng: np.random.Generator, background: str = "plain") -> str:
    """A plain-English caption naming every object, in random order."""
    order = rng.permutation(len(objects))
    phrases = [describe(objects[i], image_size, rng) for i in order]
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    prefixes = _MORE_PREFIXES if any(o.proportions is not None for o in objects) else _PREFIXES
    text = prefixes[rng.integers(len(prefixes))] + body
    if background != "plain" and rng.random() < 0.25:
        text += {"noise": " on a noisy background", "stripes": " on a striped background",
                 "checker": " on a checkered background", "gradient": " on a shaded background",
                 "clouds": " on a blotchy background"}[background]
    return text + "."


# ----------------------------------------------------------------------------- scenes


def make_scene(
    rng: np.random.Generator | int,
    *,
    n_objects: int | tuple[int, int] = (1, 3),
    image_size: int = 128,
    style: str | Style = "plain",
    objects: tuple[SceneObject, ...] | None = None,
) -> Scene:
    """One captioned scene. `n_objects` is a count or an inclusive (low, high) range.

    Pass `objects` to render a fixed layout (the tasks do, to control the target).
    """
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    style = get_style(style)
    if objects is None:
        lo, hi = (n_objects, n_objects) if isinstance(n_objects, int) else n_objects
        if not 1 <= lo <= hi:
            raise ValueError(f"n_objects must be >= 1 (a count or a (low, high) range), got {n_objects}")
        objects = sample_objects(rng, int(rng.integers(lo, hi + 1)), image_size, style)
    image, masks, kind = render(rng, objects, image_size, style)
    return Scene(image, objects, masks, caption(objects, image_size, rng, kind), kind)


def shape_variants(
    rng: np.random.Generator,
    n_variants: int = 6,
    *,
    n_objects: int | tuple[int, int] = (1, 3),
    image_size: int = 128,
    style: str | Style = "pretrain",
) -> tuple[Scene, ...]:
    """`n_variants` scenes identical in layout, colours, sizes and background; one object's shape differs.

    Why: in random batches colour, size and position already tell captions apart, so a
    contrastive model can ignore shape altogether (a first run learned colours to 99% and shapes
    not at all). Variants in the same batch are hard negatives that only shape can separate: for
    a one-object scene, matching 6 variants to their captions is 6-way shape classification.
    """
    if not 2 <= n_variants <= len(SHAPES):
        raise ValueError(f"n_variants must be in 2..{len(SHAPES)} (one distinct shape each), got {n_variants}")
    style = get_style(style)
    lo, hi = (n_objects, n_objects) if isinstance(n_objects, int) else n_objects
    objects = sample_objects(rng, int(rng.integers(lo, hi + 1)), image_size, style)
    vary = int(rng.integers(len(objects)))
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n_variants]]
    render_seed = int(rng.integers(2**63))  # one render stream for all: same background and jitter
    # With varied shapes, each variant turns by the same share of its own rotation limit: a triangle
    # turned 120 degrees must not become a square turned 120 (which would be a diamond).
    unit_turn = float(rng.uniform(-1, 1)) if style.varied_shapes else None
    scenes = []
    for shape in shapes:
        changes = {"shape": shape} if unit_turn is None else {"shape": shape, "angle": turn_for(shape, unit_turn)}
        objs = tuple(replace(o, **changes) if i == vary else o for i, o in enumerate(objects))
        image, masks, kind = render(np.random.default_rng(render_seed), objs, image_size, style)
        scenes.append(Scene(image, objs, masks, caption(objs, image_size, rng, kind), kind))
    return tuple(scenes)


def scene_batch(
    rng: np.random.Generator,
    batch_size: int,
    *,
    n_objects: int | tuple[int, int] = (1, 3),
    image_size: int = 128,
    style: str | Style = "pretrain",
    variant_fraction: float = 0.0,
    n_variants: int = 6,
    variant_objects: int | tuple[int, int] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Images (B x S x S x 3 uint8) and captions for contrastive pretraining.

    `variant_fraction` of the batch comes in groups of `shape_variants` (hard negatives for shape),
    with `variant_objects` objects each (default: `n_objects`).
    """
    variant_objects = n_objects if variant_objects is None else variant_objects
    if not 0.0 <= variant_fraction <= 1.0:
        raise ValueError(f"variant_fraction must be in [0, 1], got {variant_fraction}")
    scenes: list[Scene] = []
    for _ in range(int(batch_size * variant_fraction) // n_variants):
        scenes.extend(shape_variants(rng, n_variants, n_objects=variant_objects, image_size=image_size, style=style))
    while len(scenes) < batch_size:
        scenes.append(make_scene(rng, n_objects=n_objects, image_size=image_size, style=style))
    return np.stack([np.asarray(s.image) for s in scenes]), [s.caption for s in scenes]


def mask_on_grid(mask: np.ndarray, grid: int) -> np.ndarray:
    """Fraction of each of grid x grid cells covered by a mask (S x S, or N x S x S).

    This is where a target sits in the attention pool's token grid (token 1 + r*grid + c).
    """
    mask = np.asarray(mask, dtype=np.float32)
    s = mask.shape[-1]
    if mask.shape[-2] != s or s % grid:
        raise ValueError(f"mask must be square with side divisible by grid={grid}, got shape {mask.shape}")
    k = s // grid
    return mask.reshape(*mask.shape[:-2], grid, k, grid, k).mean(axis=(-3, -1))


def with_style(style: str | Style, **changes) -> Style:
    """A copy of a style with some knobs changed (validated)."""
    return replace(get_style(style), **changes)


def single_object_set(n: int, seed: int = 0, image_size: int = 128) -> tuple[list[Scene], list[int]]:
    """`n` freshly drawn scenes of one shape each, and their labels (indices into `SHAPES`).

    Scene i is ``make_scene(seed * 100_000 + i, n_objects=1)``: the zero-shot check of notebook 01
    and ``python -m safelib.book.demo`` draw the same scenes for the same seed.
    """
    scenes = [make_scene(seed * 100_000 + i, n_objects=1, image_size=image_size) for i in range(n)]
    return scenes, [SHAPES.index(scene.objects[0].shape) for scene in scenes]
