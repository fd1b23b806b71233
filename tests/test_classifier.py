"""SafeClassifier: images to logits, and a file that round-trips and refuses the wrong model."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import safelib as sl
from safelib.methods.classifier import SafeClassifier
from safelib.features.extract import dense_features, pooled_features
from safelib.methods.base import ClipHead, FewShotData, SplitFeatures
from safelib.methods.blend import blend_features
from safelib.methods.safe import Safe, SafeConfig, safe_logits, trainable_attnpool

CLASSES = ("circle", "square", "star")
TEMPLATES = ("a photo of a {}.", "a drawing of a {}.")


@pytest.fixture(scope="module")
def clip(make_tiny_clip):
    return make_tiny_clip()


@pytest.fixture()
def classifier(clip):
    tuned = trainable_attnpool(clip.attnpool)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    text = F.normalize(torch.randn(clip.embed_dim, len(CLASSES)), dim=0)
    return SafeClassifier(clip, tuned, text, CLASSES, TEMPLATES, blend=0.3)


def test_logits_are_the_blend_of_both_poolings(clip, classifier):
    images = torch.randn(3, 3, 64, 64)
    dense = dense_features(clip, images)
    f = blend_features(pooled_features(classifier.attnpool, dense), pooled_features(clip.attnpool, dense), 0.3)
    expected = clip.logit_scale * f @ classifier.text_weights
    torch.testing.assert_close(classifier(images), expected, rtol=1e-4, atol=1e-4)
    assert set(classifier.predict(images)) <= set(CLASSES)

    zero_shot = SafeClassifier(clip, classifier.attnpool, classifier.text_weights, CLASSES, TEMPLATES, blend=0.0)
    with torch.no_grad():
        encoded = F.normalize(clip.model.encode_image(images), dim=-1)
    torch.testing.assert_close(zero_shot(images), clip.logit_scale * encoded @ classifier.text_weights,
                               rtol=1e-4, atol=1e-4)


def test_save_load_round_trip(clip, classifier, tmp_path):
    path = classifier.save(tmp_path / "pets.safetensors")
    assert not list(tmp_path.glob("*.tmp"))
    loaded = SafeClassifier.load(path, clip)
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded(images), classifier(images))
    assert (loaded.classnames, loaded.templates, loaded.blend) == (CLASSES, TEMPLATES, 0.3)
    for name, value in classifier.attnpool.state_dict().items():
        assert torch.equal(loaded.attnpool.state_dict()[name], value)


def test_loading_onto_another_model_is_a_clear_error(clip, classifier, tmp_path, make_tiny_clip):
    path = classifier.save(tmp_path / "c.safetensors")
    other = make_tiny_clip(seed=1)
    with pytest.raises(ValueError, match="weights.*differ"):
        SafeClassifier.load(path, other)
    renamed = sl.ClipModel("RN50", None, clip.model, None, None)
    with pytest.raises(ValueError, match="backbone 'tiny'.*cannot run on 'RN50'"):
        SafeClassifier.load(path, renamed)


def test_bad_files_are_refused(clip, tmp_path):
    with pytest.raises(FileNotFoundError):
        SafeClassifier.load(tmp_path / "missing.safetensors", clip)
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="junk.safetensors is not a valid safetensors file"):
        SafeClassifier.load(tmp_path / "junk.safetensors", clip)
    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a SafeClassifier file"):
        SafeClassifier.load(tmp_path / "plain.safetensors", clip)


def test_construction_is_validated(clip, classifier):
    text = classifier.text_weights
    with pytest.raises(ValueError, match="D x K"):
        SafeClassifier(clip, classifier.attnpool, text.T, CLASSES, TEMPLATES, 0.5)
    with pytest.raises(ValueError, match="2 classnames for 3"):
        SafeClassifier(clip, classifier.attnpool, text, CLASSES[:2], TEMPLATES, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        SafeClassifier(clip, classifier.attnpool, text, CLASSES, TEMPLATES, 1.5)
    with pytest.raises(ValueError, match="attention pooling"):
        SafeClassifier(clip, torch.nn.Linear(2, 2), text, CLASSES, TEMPLATES, 0.5)


def test_from_a_fitted_safe_method(clip, tmp_path):
    n = 6
    dense = torch.rand(1, n, clip.dense_channels, clip.grid, clip.grid)
    labels = torch.arange(n) % 3
    text = F.normalize(torch.randn(clip.embed_dim, 3), dim=0)
    head = ClipHead(text, clip.logit_scale, clip.attnpool, CLASSES)
    data = FewShotData(SplitFeatures(labels, dense=dense), SplitFeatures(labels, dense=dense), head)
    with pytest.raises(RuntimeError, match="fit"):
        SafeClassifier.from_safe(clip, Safe(), TEMPLATES)
    with pytest.raises(TypeError, match="fitted Safe method"):
        SafeClassifier.from_safe(clip, sl.make_method("zero_shot"), TEMPLATES)
    method = Safe(dataclasses.replace(SafeConfig(), epochs=1, batch_size=4)).fit(data)
    packaged = SafeClassifier.from_safe(clip, method, TEMPLATES)
    assert packaged.blend == method.blend.blend and packaged.classnames == CLASSES
    # one predict path: the packaged state gives Safe's own logits, to the bit
    logits = safe_logits(packaged.attnpool, packaged.clip.attnpool, dense[0], packaged.text_weights,
                         packaged.clip.logit_scale, packaged.blend)
    assert torch.equal(logits, method.predict(SplitFeatures(labels, dense=dense)))


def test_load_without_a_model_loads_the_saved_backbone(clip, classifier, tmp_path, monkeypatch):
    import safelib.methods.classifier

    asked = []

    def fake_load_clip(name, pretrained):
        asked.append((name, pretrained))
        return clip

    monkeypatch.setattr(safelib.methods.classifier, "load_clip", fake_load_clip)  # where load() looks it up
    loaded = SafeClassifier.load(classifier.save(tmp_path / "c.safetensors"))
    assert asked == [("tiny", None)] and loaded.clip is clip
