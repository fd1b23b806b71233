"""Feature-space augmentation (safelib.features.augment) and its SafeConfig switch."""
import dataclasses

import pytest
import torch

from safelib.features.augment import (
    FEATURE_AUGMENTS,
    augment_generator,
    augment_maps,
    crop_boxes,
    crop_maps,
    flip_maps,
)
from safelib.methods.safe import SafeConfig, train_safe


def maps(n: int = 6, c: int = 5, side: int = 4) -> torch.Tensor:
    return torch.randn(n, c, side, side, generator=torch.Generator().manual_seed(0))


def test_flip_is_a_left_right_mirror_of_the_map_or_the_map_itself() -> None:
    x = maps(64)
    out = flip_maps(x, torch.Generator().manual_seed(3))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(out[i], x[i]) for i in range(len(x))]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 16 < sum(flipped) < 48  # about half of them, p = 1/2
    # column j of a flipped map is column W-1-j of the original
    i = flipped.index(True)
    assert torch.equal(out[i][..., 0], x[i][..., -1])


def test_crop_keeps_the_shape_and_the_full_box_gives_the_map_back() -> None:
    x = maps(4, side=7)
    boxes = crop_boxes(4, torch.Generator().manual_seed(1))
    assert crop_maps(x, boxes).shape == x.shape
    assert ((boxes[:, 2] * boxes[:, 3]) >= 0.5 - 1e-6).all() and (boxes[:, 2:] <= 1).all()
    full = torch.tensor([[0.5, 0.5, 1.0, 1.0]]).repeat(4, 1)
    torch.testing.assert_close(crop_maps(x, full), x, atol=1e-5, rtol=1e-5)


def test_crop_of_a_corner_reads_that_corner() -> None:
    """A box over the left half of a map that is 0 on the left and 1 on the right reads only 0."""
    x = torch.zeros(1, 1, 4, 4)
    x[..., 2:] = 1.0
    left = torch.tensor([[0.25, 0.5, 0.5, 1.0]])
    assert crop_maps(x, left).max() < 0.5  # bilinear: the box edge cell mixes in at most a little
    assert crop_maps(x, left)[..., 0].max() == 0


@pytest.mark.parametrize("mode", FEATURE_AUGMENTS)
def test_same_seed_same_views_and_shapes(mode: str) -> None:
    x = maps()
    a = augment_maps(x, mode, augment_generator(5))
    b = augment_maps(x, mode, augment_generator(5))
    assert a.shape == x.shape and torch.equal(a, b)
    if mode == "none":
        assert a is x
    else:
        assert not torch.equal(augment_maps(x, mode, augment_generator(6)), a)


def test_bad_mode_and_shape_are_refused_with_the_valid_choices() -> None:
    with pytest.raises(ValueError, match=r"feature_augment='mirror'; valid: none, flip, crop, flip\+crop"):
        augment_maps(maps(), "mirror", augment_generator(0))
    with pytest.raises(ValueError, match="B x C x H x W"):
        augment_maps(torch.zeros(5, 4, 4), "flip", augment_generator(0))
    with pytest.raises(ValueError, match=r"invalid SafeConfig: feature_augment='mirror'; valid: none, flip"):
        SafeConfig(feature_augment="mirror")


def test_train_safe_uses_the_option_deterministically() -> None:
    """flip+crop changes SAFE's training; the same seed repeats it bit for bit; "none" is the default."""
    from open_clip.modified_resnet import AttentionPool2d

    torch.manual_seed(0)
    pool = AttentionPool2d(4, 128, 2, 16).eval()
    dense = torch.randn(1, 12, 128, 4, 4).relu()
    labels = torch.arange(12) % 3
    text = torch.nn.functional.normalize(torch.randn(16, 3), dim=0)
    base = dataclasses.replace(SafeConfig(), epochs=2, batch_size=4)
    assert base.feature_augment == "none"
    plain = train_safe(pool, dense, labels, text, 10.0, base, seed=1).losses
    aug = dataclasses.replace(base, feature_augment="flip+crop")
    first = train_safe(pool, dense, labels, text, 10.0, aug, seed=1).losses
    again = train_safe(pool, dense, labels, text, 10.0, aug, seed=1).losses
    assert first == again and first != plain
