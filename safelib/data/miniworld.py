"""The mini-world: seeded, captioned scenes of coloured shapes, with a mask per object.

Why it exists: offline, nobody can reach real CLIP weights, yet SAFE's point (re-weight *where*
the attention pooling looks) needs a model whose pooling learned something, in a world where we
know which region matters. This module draws that world; `safelib.experiments.miniclip_pretrain` pretrains a small
ResNet CLIP on its captions, and the few-shot tasks in `safelib.data.miniworld_tasks` ask about
one designated object while others distract.

Everything is a pure function of a `numpy.random.Generator`, so a seed fixes every pixel,
caption and mask. `Style` holds the knobs for distribution shift (background textures, object
sizes, outlines, clutter): train in one style, test in another, the offline analogue of
ImageNet -> ImageNet-R/Sketch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

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
BACKGROUNDS: tuple[str, ...] = ("plain", "noise", "stripes", "checker", "gradient")
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
    """

    backgrounds: tuple[str, ...] = ("plain",)
    size_scale: float = 1.0
    outline_prob: float = 0.0
    clutter: int = 0
    colour_jitter: float = 0.06

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


STYLES: dict[str, Style] = {
    "plain": Style(),
    "textured": Style(backgrounds=("noise", "stripes", "checker", "gradient")),
    "outlined": Style(outline_prob=1.0),
    "cluttered": Style(backgrounds=("plain", "noise"), clutter=8),
    "small": Style(size_scale=0.75),
    # What the mini-CLIP is pretrained on: a mixture, so every style is in-distribution-ish.
    "pretrain": Style(backgrounds=BACKGROUNDS, outline_prob=0.25, clutter=2),
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

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; valid: {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; valid: {tuple(COLOURS)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; valid: {SIZES}")
        if self.radius <= 0:
            raise ValueError(f"radius must be > 0, got {self.radius}")

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


def _polygon(shape: str, x: float, y: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape of circumradius r centred at (x, y), rotated by `angle` radians."""
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(px * 0.75, py * 0.75) for px, py in pts]  # side ~ 1.5 r: area close to a circle's
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "diamond":
        pts = [(0, -1), (0.62, 0), (0, 1), (-0.62, 0)]
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.42
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif shape == "cross":
        w = 0.33
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
    else:
        raise ValueError(f"no polygon for shape {shape!r}; polygon shapes: {SHAPES[1:]}")
    c, s = math.cos(angle), math.sin(angle)
    return [(x + r * (px * c - py * s), y + r * (px * s + py * c)) for px, py in pts]


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, fill, outline) -> None:
    width = max(2, round(obj.radius / 8)) if outline is not None else 0
    if obj.shape == "circle":
        box = [obj.x - obj.radius, obj.y - obj.radius, obj.x + obj.radius, obj.y + obj.radius]
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    else:
        draw.polygon(_polygon(obj.shape, obj.x, obj.y, obj.radius, obj.angle), fill=fill, outline=outline, width=width)


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
    lo, hi = SIZE_RANGES[size]
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
    angle = float(rng.uniform(-0.26, 0.26))  # +-15 degrees: a square never turns into a diamond
    outline = bool(rng.random() < style.outline_prob)
    return SceneObject(shape, colour, size, best[0], best[1], radius, angle, outline)


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
    return image, masks, kind


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
    if keep_pos:
        pos = obj.position(image_size)
        prep = "at the" if pos in ("top", "bottom", "center") else "in the" if " " in pos else "on the"
        phrase += f" {prep} {pos}"
    return phrase


_PREFIXES = ("", "", "a picture of ", "an image of ", "a photo of ")


def caption(objects: tuple[SceneObject, ...], image_size: int, rng: np.random.Generator, background: str = "plain") -> str:
    """A plain-English caption naming every object, in random order."""
    order = rng.permutation(len(objects))
    phrases = [describe(objects[i], image_size, rng) for i in order]
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    text = _PREFIXES[rng.integers(len(_PREFIXES))] + body
    if background != "plain" and rng.random() < 0.25:
        text += {"noise": " on a noisy background", "stripes": " on a striped background",
                 "checker": " on a checkered background", "gradient": " on a shaded background"}[background]
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
    scenes = []
    for shape in shapes:
        objs = tuple(replace(o, shape=shape) if i == vary else o for i, o in enumerate(objects))
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
