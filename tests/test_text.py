"""The zero-shot classifier follows the field's prompt-ensemble convention."""
import pytest
import torch
import torch.nn.functional as F

import safelib as sl


def test_classifier_is_normalise_average_renormalise(tiny_clip: sl.ClipModel) -> None:
    classnames = ["cat", "dog", "golden retriever"]
    templates = ["a photo of a {}.", "art of the {}.", "{} texture."]
    weights = sl.zero_shot_classifier(tiny_clip, classnames, templates)
    assert weights.shape == (tiny_clip.embed_dim, 3) and weights.dtype == torch.float32
    torch.testing.assert_close(weights.norm(dim=0), torch.ones(3))
    with torch.no_grad():
        for k, name in enumerate(classnames):
            text = tiny_clip.model.encode_text(tiny_clip.tokenizer([t.format(name) for t in templates]))
            expected = F.normalize(F.normalize(text, dim=-1).mean(0), dim=0)
            torch.testing.assert_close(weights[:, k], expected, rtol=1e-4, atol=1e-5)


def test_batching_does_not_change_the_classifier(tiny_clip: sl.ClipModel) -> None:
    names = [f"class {i}" for i in range(5)]
    full = sl.zero_shot_classifier(tiny_clip, names, sl.IMAGENET_TEMPLATES)
    tiny = sl.zero_shot_classifier(tiny_clip, names, sl.IMAGENET_TEMPLATES, batch_size=3)
    torch.testing.assert_close(full, tiny, rtol=1e-4, atol=1e-5)


def test_the_fields_templates() -> None:
    assert len(sl.IMAGENET_TEMPLATES) == 7
    assert set(sl.TEMPLATES) == {
        "imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r", "caltech101", "oxford_pets",
        "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101",
    }
    assert sl.TEMPLATES["oxford_pets"] == ("a photo of a {}, a type of pet.",)
    assert all(t.count("{}") == 1 for ts in sl.TEMPLATES.values() for t in ts)


@pytest.mark.parametrize(
    "classnames,templates,message",
    [([], ["a {}."], "classnames"), ("cat", ["a {}."], "classnames"), (["cat"], [], "templates"),
     (["cat"], ["a photo."], "exactly one")],
)
def test_bad_prompts_are_refused(rn50: sl.ClipModel, classnames, templates, message) -> None:
    with pytest.raises(ValueError, match=message):
        sl.zero_shot_classifier(rn50, classnames, templates)
