"""Zero-shot accuracy of the shipped mini-CLIP on single objects from an independent renderer.

Why: a reader who draws their own picture meets shapes in proportions and styles the training
renderer never drew. `independent_renderer` (tests only, never seen by pretraining) draws the
6 shapes x 6 colours with other code, proportions and styles; this module measures 6-way shape
and 6-way colour zero-shot accuracy on 288 of its images, with the shipped prompt templates and
with one plain prompt, "a photo of a {}.".

Measured (seed 0, 288 images, fp16 weights), shipped templates / plain prompt (chance 16.7%):
    issue-5 checkpoint (recipe phases 1-2; 128 px, 4 x 4 grid):  shape 66.7% / 66.7%, colour 100% / 100%
    a first phase 3 (360 steps, no rounded corners or strokes):  shape 77.4% / 76.7%, colour 100% / 100%
    shipped issue-11 checkpoint (recipe phases 1-3):             shape 96.2% / 96.5%, colour 100% / 100%
The issue-5 checkpoint's worst cases: squares read as circles (22 of 48), hollow shapes (48%).
Run `python tests/test_miniclip_independent.py [checkpoint.safetensors]` to print the accuracies.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import independent_renderer as ir  # noqa: E402  (tests-only module, kept out of safelib)

import safelib as sl  # noqa: E402
from safelib.clip.miniclip import CHECKPOINT  # noqa: E402
from safelib.data import miniworld as mw  # noqa: E402

PLAIN = ("a photo of a {}.",)
PER_PAIR = 8  # 8 x 36 (shape, colour) pairs = 288 images

# The bars the shipped checkpoint must clear (issue 11), with the shipped templates and the plain prompt.
SHAPE_BAR = 0.90
COLOUR_BAR = 0.95


def zero_shot_accuracies(clip, per_pair: int = PER_PAIR, seed: int = 0) -> dict[str, float]:
    """Shape and colour accuracy with the shipped templates and with the plain prompt."""
    images, shapes, colours = ir.single_objects(per_pair, clip.image_size, seed=seed)
    pixels = torch.stack([clip.preprocess(_to_pil(im)) for im in images])
    with torch.no_grad():
        feats = torch.nn.functional.normalize(clip.encode_image(pixels).float(), dim=-1)
    out = {}
    for attr, names, templates, labels in (("shape", mw.SHAPES, mw.SHAPE_TEMPLATES, shapes),
                                           ("colour", tuple(mw.COLOURS), mw.COLOUR_TEMPLATES, colours)):
        assert tuple(names) == (ir.SHAPES if attr == "shape" else ir.COLOUR_NAMES)
        for tag, prompts in (("templates", templates), ("plain", PLAIN)):
            W = sl.zero_shot_classifier(clip, names, prompts)
            out[f"{attr}_{tag}"] = float(((feats @ W).argmax(1).numpy() == labels).mean())
    return out


def _to_pil(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(array, "RGB")


def test_renderer_is_deterministic_and_balanced():
    a, s, c = ir.single_objects(1, 64, seed=3)
    b, _, _ = ir.single_objects(1, 64, seed=3)
    assert a.shape == (36, 64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert np.bincount(s).tolist() == [6] * 6 and np.bincount(c).tolist() == [6] * 6
    assert not np.array_equal(a, ir.single_objects(1, 64, seed=4)[0])


def test_object_pixels_carry_the_colour():
    rng = np.random.default_rng(0)
    for colour in ir.COLOUR_NAMES:
        img = ir.draw("square", colour, 96, rng).astype(float)
        centre = img[40:56, 40:56].reshape(-1, 3)
        saturated = centre[(centre.max(1) - centre.min(1)) > 60]
        if len(saturated) > 20:  # a hollow square shows the background in the middle
            nearest = min(ir.COLOUR_NAMES, key=lambda n: np.abs(np.array(mw.COLOURS[n]) - saturated.mean(0)).sum())
            assert nearest == colour


@pytest.mark.skipif(not CHECKPOINT.is_file(), reason="the mini-CLIP checkpoint is not trained yet")
def test_shipped_miniclip_zero_shot_on_the_independent_renderer():
    acc = zero_shot_accuracies(sl.load_clip("miniclip"))
    print("independent renderer, zero-shot:", acc)
    assert min(acc["shape_templates"], acc["shape_plain"]) >= SHAPE_BAR
    assert min(acc["colour_templates"], acc["colour_plain"]) >= COLOUR_BAR


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "shipped"
    print(zero_shot_accuracies(sl.load_clip("miniclip", pretrained=path)))
