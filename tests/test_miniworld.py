"""The mini-world generator and its target-among-distractors tasks."""
from __future__ import annotations

import math
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch

from safelib.data import miniworld as mw
from safelib.data import miniworld_tasks as mt
from safelib.data.targets import target_attention_mass, target_grid_masks


def test_scene_is_a_pure_function_of_the_seed():
    a = mw.make_scene(7, style="pretrain")
    b = mw.make_scene(7, style="pretrain")
    c = mw.make_scene(8, style="pretrain")
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.caption == b.caption and a.objects == b.objects
    assert np.array_equal(a.masks, b.masks)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_batches_are_deterministic_and_shaped():
    imgs1, caps1 = mw.scene_batch(np.random.default_rng([3, 5]), 4, image_size=64)
    imgs2, caps2 = mw.scene_batch(np.random.default_rng([3, 5]), 4, image_size=64)
    assert imgs1.shape == (4, 64, 64, 3) and imgs1.dtype == np.uint8
    assert np.array_equal(imgs1, imgs2) and caps1 == caps2


def test_visible_masks_carry_the_object_colour_and_do_not_overlap():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scene = mw.make_scene(rng, n_objects=3, style=mw.Style(colour_jitter=0.0))
        assert scene.masks.shape == (len(scene.objects), 128, 128)
        assert (scene.masks.sum(0) <= 1).all()  # occlusion removed: a pixel belongs to one object
        pixels = np.asarray(scene.image).astype(int)
        for obj, mask in zip(scene.objects, scene.masks):
            if mask.sum() < 10:
                continue
            median = np.median(pixels[mask], axis=0)
            assert np.abs(median - np.array(mw.COLOURS[obj.colour])).max() <= 1


def test_caption_names_objects_with_their_vocabulary():
    rng = np.random.default_rng(1)
    for _ in range(30):
        scene = mw.make_scene(rng, n_objects=(1, 3))
        assert scene.caption.endswith(".")
        for obj in scene.objects:  # each object is named by its shape or, failing that, its colour
            assert obj.shape in scene.caption or obj.colour in scene.caption


def test_position_words_follow_the_thirds():
    obj = mw.SceneObject("star", "red", "small", x=10, y=10, radius=5)
    assert obj.position(120) == "top left"
    assert mw.SceneObject("star", "red", "small", x=60, y=110, radius=5).position(120) == "bottom"


def test_bad_knobs_name_the_valid_values():
    with pytest.raises(ValueError, match="plain"):
        mw.Style(backgrounds=("marble",))
    with pytest.raises(ValueError, match="valid"):
        mw.get_style("nope")
    with pytest.raises(ValueError, match="circle"):
        mw.SceneObject("hexagon", "red", "small", 1, 1, 1)
    with pytest.raises(ValueError, match="divisible"):
        mw.mask_on_grid(np.zeros((10, 10)), 4)


def test_mask_on_grid_is_the_cell_coverage():
    mask = np.zeros((8, 8), dtype=bool)
    mask[:4, :4] = True  # the whole top-left cell of a 2 x 2 grid
    mask[4:6, 4:8] = True  # half of the bottom-right cell
    cov = mw.mask_on_grid(mask, 2)
    assert np.allclose(cov, [[1.0, 0.0], [0.0, 0.5]])


def test_styles_change_the_rendering():
    objs = mw.sample_objects(np.random.default_rng(0), 2, 128, mw.get_style("plain"))
    plain = np.asarray(mw.make_scene(0, objects=objs, style="plain").image).astype(float)
    textured = np.asarray(mw.make_scene(0, objects=objs, style=mw.Style(backgrounds=("checker",))).image).astype(float)
    background = ~mw.make_scene(0, objects=objs).masks.any(0)
    assert plain[background].std(0).max() < 1.0  # a plain background is flat
    assert textured[background].std(0).max() > 5.0


# ----------------------------------------------------------------------------- tasks

TASK = mt.TargetTask(per_class=(2, 1, 3), seed=4)


def test_task_splits_are_balanced_deterministic_and_picklable():
    train, val, test = mt.task_splits(TASK)
    assert len(train) == 12 and len(val) == 6 and len(test) == 18
    assert train.class_counts() == (2,) * 6
    assert set(train.ids).isdisjoint(test.ids)
    again = pickle.loads(pickle.dumps(test))
    assert np.array_equal(np.asarray(again.load_image(5)), np.asarray(test.load_image(5)))


def test_target_has_the_label_and_is_the_only_large_object():
    train = mt.task_split(TASK, "train")
    for i, image_id in enumerate(train.ids):
        scene, t = mt.task_scene(TASK, image_id)
        assert scene.objects[t].shape == train.classnames[train.labels[i]]
        assert scene.objects[t].size == "large"
        assert all(o.size == "small" for j, o in enumerate(scene.objects) if j != t)
        assert 2 <= len(scene.objects) - 1 <= 3


def test_outlined_target_is_the_only_outlined_object():
    task = mt.TargetTask(attribute="colour", target="outlined", per_class=(1, 1, 1))
    for image_id in mt.task_split(task, "test").ids:
        scene, t = mt.task_scene(task, image_id)
        assert [o.outline for o in scene.objects].count(True) == 1 and scene.objects[t].outline


def test_test_style_shifts_only_the_test_split():
    task = mt.TargetTask(per_class=(1, 1, 1), style="plain", test_style="textured")
    assert mt.task_scene(task, "x/train/0")[0].background == "plain"
    assert {mt.task_scene(task, f"x/test/{i}")[0].background for i in range(6)} <= set(mw.STYLES["textured"].backgrounds)


def test_target_grid_masks_cover_the_target():
    test = mt.task_split(TASK, "test").subset(range(6))
    cov = target_grid_masks(test, 4)
    assert cov.shape == (6, 4, 4)
    assert (cov.max(axis=(1, 2)) > 0.3).all()  # a large target fills much of some cell
    assert ((cov >= 0) & (cov <= 1)).all()


def test_attention_mass_counts_only_target_cells():
    coverage = np.zeros((2, 2, 2), dtype=np.float32)
    coverage[:, 0, 0] = 1.0  # target in the top-left cell
    attention = torch.tensor([
        [[0.5, 0.5, 0.0, 0.0, 0.0]],   # all spatial attention on the target cell
        [[0.2, 0.2, 0.2, 0.2, 0.2]],   # uniform
    ])
    mass = target_attention_mass(attention, coverage)
    assert torch.allclose(mass, torch.tensor([1.0, 0.25]))


def test_registry_exposes_the_tasks():
    from safelib.data import get_dataset
    mt.register_miniworld()
    data = get_dataset("miniworld_colour_largest", per_class=(1, 1, 2), seed=2)
    assert data.classnames == tuple(mw.COLOURS)
    assert data.templates == mw.COLOUR_TEMPLATES
    assert len(data.test) == 12
    with pytest.raises(ValueError, match="valid"):
        mt.TargetTask(target="smallest")
    with pytest.raises(TypeError, match="TaskReader"):
        mt.task_of(data.test.__class__(("a",), (0,), ("c",), lambda i: None))


def test_shape_variants_differ_only_in_one_object_shape():
    # No blur: a blur spreads each shape's edge a pixel or two past its mask.
    scenes = mw.shape_variants(np.random.default_rng(9), 4, n_objects=3, style=mw.with_style("pretrain", blur=0.0))
    assert len(scenes) == 4
    a = scenes[0]
    for b in scenes[1:]:
        assert [(o.x, o.y, o.colour, o.size) for o in a.objects] == [(o.x, o.y, o.colour, o.size) for o in b.objects]
        assert sum(x.shape != y.shape for x, y in zip(a.objects, b.objects)) == 1
        differ = np.asarray(a.image) != np.asarray(b.image)
        union = a.masks.any(0) | b.masks.any(0)
        assert differ.any() and not differ.any(-1)[~union].any()  # the same background pixels
    with pytest.raises(ValueError, match="n_variants"):
        mw.shape_variants(np.random.default_rng(0), 7)


def test_batch_variant_fraction_makes_groups():
    imgs, caps = mw.scene_batch(np.random.default_rng(0), 8, image_size=64, variant_fraction=1.0, n_variants=4)
    assert len(caps) == 8 and imgs.shape == (8, 64, 64, 3)
    with pytest.raises(ValueError, match="variant_fraction"):
        mw.scene_batch(np.random.default_rng(0), 8, variant_fraction=2.0)


def test_image_set_names_carry_what_changes_the_pixels() -> None:
    """Same ids, other pictures: caches keyed by ids must see the difference through the name."""
    from safelib.data.miniworld_tasks import TargetTask, task_split

    base = task_split(TargetTask(seed=0), "train")
    reseeded = task_split(TargetTask(seed=1), "train")
    restyled = task_split(TargetTask(seed=0, style="textured"), "train")
    more = task_split(TargetTask(seed=0, per_class=(40, 8, 50)), "train")
    assert base.ids == reseeded.ids[:len(base)]
    assert np.asarray(base.load_image(0)).tobytes() != np.asarray(reseeded.load_image(0)).tobytes()
    assert len({base.name, reseeded.name, restyled.name}) == 3
    assert more.name == base.name  # more images per class draws the same first pictures
    assert np.asarray(more.load_image(0)).tobytes() == np.asarray(base.load_image(0)).tobytes()


# ----------------------------------------------------------------------------- varied shapes (issue 11)


def test_rotation_limits_keep_squares_and_diamonds_apart():
    # A square turned 45 degrees is a diamond: the two limits must leave a gap between the classes.
    assert mw.ROTATION_LIMITS["square"] + mw.ROTATION_LIMITS["diamond"] <= 45 - 15
    rng = np.random.default_rng(0)
    style = mw.get_style("pretrain")
    for _ in range(200):
        obj = mw.sample_object(rng, 128, style)
        assert abs(math.degrees(obj.angle)) <= mw.ROTATION_LIMITS[obj.shape] + 1e-9
        assert obj.proportions is not None and obj.fill in mw.FILLS


def test_shape_variants_turn_each_shape_within_its_own_limit():
    """A triangle's 120-degree turn must not be handed on to its square variant (a diamond)."""
    rng = np.random.default_rng(1)
    for _ in range(30):
        for scene in mw.shape_variants(rng, 6, n_objects=1, image_size=64, style="pretrain"):
            obj = scene.objects[0]
            assert abs(math.degrees(obj.angle)) <= mw.ROTATION_LIMITS[obj.shape] + 1e-9


def test_task_styles_keep_the_canonical_drawing():
    task_scene, _ = mt.task_scene(mt.TargetTask(seed=2), "x/train/3")
    assert all(o.proportions is None and o.fill == "solid" for o in task_scene.objects)
    assert all(abs(o.angle) <= 0.26 for o in task_scene.objects)


def test_proportions_span_each_class():
    def extent(shape, p, q=0.0):
        pts = np.array(mw._unit_polygon(shape, (p, q)))
        return pts.max(0) - pts.min(0)

    assert np.allclose(*extent("diamond", 1.0))  # equal diagonals at the wide end
    assert extent("diamond", 0.0)[0] < 0.5 * extent("diamond", 0.0)[1]  # narrow at the other
    assert len(mw._unit_polygon("star", (0.0, 0.0))) == 10
    with pytest.raises(ValueError, match="proportions"):
        mw.SceneObject("star", "red", "small", 1, 1, 1, proportions=(0.5, 2.0))


def test_hollow_objects_mask_only_their_stroke():
    obj = mw.SceneObject("square", "blue", "large", 64, 64, 40, fill="hollow")
    image, masks, _ = mw.render(np.random.default_rng(0), (obj,), 128, mw.Style(colour_jitter=0.0))
    assert masks[0, 20:108, 20:108].any() and not masks[0, 64, 64]  # the inside is background
    assert np.abs(np.asarray(image)[masks[0]].astype(int) - np.array(mw.COLOURS["blue"])).max() <= 1


def test_texture_fills_keep_the_hue():
    for fill in ("shaded", "speckled"):
        obj = mw.SceneObject("circle", "red", "large", 64, 64, 40, fill=fill)
        image, masks, _ = mw.render(np.random.default_rng(0), (obj,), 128, mw.Style(colour_jitter=0.0))
        pixels = np.asarray(image)[masks[0]].astype(float)
        assert pixels.std(0).max() > 3  # not flat
        assert (pixels[:, 0] > pixels[:, 1] + 60).mean() > 0.95  # still red


def test_new_style_knobs_are_validated():
    with pytest.raises(ValueError, match="fills"):
        mw.Style(fills=("glitter",))
    with pytest.raises(ValueError, match="size_ranges"):
        mw.Style(size_ranges=((0.1, 0.05), (0.2, 0.3)))
    with pytest.raises(ValueError, match="blur"):
        mw.Style(blur=5.0)


def test_rounded_corners_stay_inside_the_sharp_polygon_and_keep_the_task_styles_sharp():
    from PIL import Image, ImageDraw

    def area(obj):
        layer = Image.new("L", (128, 128), 0)
        mw._draw_object(ImageDraw.Draw(layer), obj, 255, None)
        return np.asarray(layer) > 0

    sharp = mw.SceneObject("square", "red", "large", 64, 64, 40)
    soft = mw.SceneObject("square", "red", "large", 64, 64, 40, rounding=0.3)
    a, b = area(sharp), area(soft)
    assert not (b & ~a).any()  # rounding only cuts corners
    assert 0.02 < (a & ~b).sum() / a.sum() < 0.15  # and cuts some, not most: still a square
    assert b[64, 64] and not b[64 - 29, 64 - 29]  # the corner region is gone, the middle stays
    with pytest.raises(ValueError, match="rounding"):
        mw.SceneObject("square", "red", "large", 64, 64, 40, rounding=0.9)
    task_scene, _ = mt.task_scene(mt.TargetTask(seed=2), "x/train/3")
    assert all(o.rounding == 0.0 and o.stroke == mw.STROKE for o in task_scene.objects)


def test_pretrain_style_varies_strokes_and_corners_within_its_ranges():
    rng = np.random.default_rng(3)
    style = mw.get_style("pretrain")
    objs = [mw.sample_object(rng, 128, style) for _ in range(300)]
    strokes = np.array([o.stroke for o in objs])
    roundings = np.array([o.rounding for o in objs])
    assert style.strokes[0] <= strokes.min() and strokes.max() <= style.strokes[1] and np.ptp(strokes) > 0.2
    assert 0.3 < (roundings > 0).mean() < 0.7 and roundings.max() <= style.rounding
    hollow = mw.SceneObject("circle", "blue", "large", 64, 64, 40, fill="hollow", stroke=0.1, proportions=(0.5, 0.5))
    thick = replace(hollow, stroke=0.4)
    _, thin_mask, _ = mw.render(np.random.default_rng(0), (hollow,), 128, mw.Style())
    _, thick_mask, _ = mw.render(np.random.default_rng(0), (thick,), 128, mw.Style())
    assert 2.5 < thick_mask.sum() / thin_mask.sum() < 4.5  # the band's width follows the stroke
    with pytest.raises(ValueError, match="strokes"):
        mw.Style(strokes=(0.3, 0.1))
