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


def test_class_logits_is_scaled_cosine_similarity() -> None:
    """The one copy of CLIP's logits: ``logit_scale * cos(f, w_k)``, against a float64 computation."""
    features, weights = torch.randn(5, 8) * 3, F.normalize(torch.randn(8, 4), dim=0)
    logits = sl.class_logits(features, weights, 100.0)
    f64, w64 = features.double(), weights.double()
    expected = 100.0 * (f64 @ w64) / f64.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-4)
    assert logits.dtype == torch.float32


def test_class_logits_of_unit_features_are_not_normalised_again() -> None:
    """``normalize=False`` is bit for bit ``scale * f @ W``: the callers that hold unit features keep their numbers."""
    unit, weights = F.normalize(torch.randn(7, 8), dim=-1), F.normalize(torch.randn(8, 3), dim=0).double()
    got = sl.class_logits(unit, weights, 42.5, normalize=False)
    assert torch.equal(got, 42.5 * unit @ weights.float())  # W follows the features' dtype
    assert torch.equal(sl.class_logits(unit * 2, weights, 42.5), 42.5 * F.normalize(unit * 2, dim=-1) @ weights.float())
    with pytest.raises(ValueError, match="D=8 but text_weights are \\(5, 3\\)"):
        sl.class_logits(unit, torch.zeros(5, 3), 1.0)
