"""SAFE: blending, choosing the blend, training the attnpool copy, the few-shot method."""
import dataclasses
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import safelib.clip.attnpool
from safelib.features.cache import CacheWriter
from safelib.features.extract import dense_features, pooled_features
from safelib.features.maps import DenseMaps
from safelib.methods.base import ClipHead, FewShotData, SplitFeatures, accuracy
from safelib.methods.blend import (DEFAULT_BLEND_GRID, BlendChoice, blend_features, choose_blend, class_logits,
                                   fixed_blend, sweep_blend)
from safelib.methods.safe import INERT, TRAINABLE_SETS, Safe, SafeConfig, train_safe, trainable_attnpool

K = 3


@pytest.fixture(scope="module")
def clip(make_tiny_clip):
    return make_tiny_clip()


@pytest.fixture(scope="module")
def task(clip, make_channel_block_task):
    """A small separable task on dense maps (conftest's ``build_channel_block_task``)."""
    return make_channel_block_task(clip, K)


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


# --- blending -----------------------------------------------------------------------------------

def test_blend_zero_is_clip_and_one_is_the_finetuned_pooling(clip):
    images = torch.randn(4, 3, 64, 64)
    dense = dense_features(clip, images)
    f_orig = pooled_features(clip.attnpool, dense)
    tuned = trainable_attnpool(clip.attnpool)
    with torch.no_grad():
        tuned.c_proj.weight.add_(0.1 * torch.randn_like(tuned.c_proj.weight))
    f_ft = pooled_features(tuned, dense)
    with torch.no_grad():
        encoded = F.normalize(clip.model.encode_image(images), dim=-1)
    torch.testing.assert_close(blend_features(f_ft, f_orig, 0.0), encoded, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(blend_features(f_ft, f_orig, 1.0), F.normalize(f_ft, dim=-1))
    mid = blend_features(f_ft, f_orig, 0.5)
    torch.testing.assert_close(mid.norm(dim=-1), torch.ones(4))
    assert not torch.allclose(mid, encoded, atol=1e-3)


def test_blend_rejects_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        blend_features(torch.zeros(2, 4), torch.zeros(3, 4), 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        blend_features(torch.zeros(2, 4), torch.zeros(2, 4), 1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fixed_blend(-0.1)
    with pytest.raises(ValueError, match="D x K"):
        class_logits(torch.zeros(2, 4), torch.zeros(5, 3), 100.0)
    with pytest.raises(ValueError, match="empty"):
        sweep_blend(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), torch.eye(4), 1.0, [])
    with pytest.raises(ValueError, match="labels"):
        sweep_blend(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(3, dtype=torch.long), torch.eye(4), 1.0)


def _val_features(n=12):
    """Text weights = identity; f_orig is right with small margins on half the samples only."""
    labels = torch.arange(n) % K
    text = torch.eye(K)
    correct = F.one_hot(labels, K).float()
    wrong = F.one_hot((labels + 1) % K, K).float()
    f_orig = torch.where((torch.arange(n) % 2 == 0)[:, None], correct + 0.1, wrong + 0.1)
    f_ft = correct + 0.05
    return f_ft, f_orig, labels, text


def test_choose_blend_prefers_accuracy_then_cross_entropy_then_the_middle():
    f_ft, f_orig, labels, text = _val_features()
    choice = choose_blend(f_ft, f_orig, labels, text, 100.0)
    assert choice.selected_by == "validation" and len(choice.sweep) == 11
    best = max(p.correct for p in choice.sweep)
    point = next(p for p in choice.sweep if p.blend == choice.blend)
    assert point.correct == best
    tied = [p for p in choice.sweep if p.correct == best]
    assert len(tied) > 1 and point.cross_entropy == min(p.cross_entropy for p in tied)
    # identical features tie on accuracy and cross-entropy everywhere: the middle wins
    assert choose_blend(f_ft, f_ft, labels, text, 100.0).blend == 0.5
    assert choose_blend(f_ft, f_ft, labels, text, 100.0, grid=[0.2, 0.9, 0.6]).blend == 0.6
    record = choice.as_record()
    assert record["blend"] == choice.blend and len(record["sweep"]) == 11


def _count_pooled_rows(monkeypatch) -> list[int]:
    """Count the maps every safelib module pools, patching ``attention_pool`` where each module looks it up."""
    pooled: list[int] = []
    real = safelib.clip.attnpool.attention_pool

    def counting(attnpool, dense, *args, **kwargs):
        pooled.append(len(dense))
        return real(attnpool, dense, *args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith("safelib") and getattr(module, "attention_pool", None) is real:
            monkeypatch.setattr(module, "attention_pool", counting)
    return pooled


def test_choosing_the_blend_pools_the_val_maps_once(clip, task, monkeypatch):
    """Each pooling pools the val maps once; the sweep over the grid then costs only mixes of features."""
    pooled = _count_pooled_rows(monkeypatch)
    f_ft, f_orig, labels, text = _val_features()
    assert len(sweep_blend(f_ft, f_orig, labels, text, 100.0, grid=[0.0, 1.0])) == 2
    choose_blend(f_ft, f_orig, labels, text, 100.0)
    assert pooled == []
    data = _data(clip, task, attnpool=clip.attnpool)
    config = dataclasses.replace(FAST, epochs=1)
    train_rows = config.epochs * len(data.train)  # one fine-tuned forward per training image and epoch
    for grid in [(0.5,), DEFAULT_BLEND_GRID]:
        pooled.clear()
        Safe(dataclasses.replace(config, blend_grid=grid)).fit(data)
        assert sum(pooled) - train_rows == 2 * len(data.val), grid  # fine-tuned + original, once each


def test_fixed_blend_needs_no_data():
    assert fixed_blend(0.3) == BlendChoice(0.3, "fixed")


# --- training -----------------------------------------------------------------------------------

FAST = SafeConfig(epochs=15, lr=3e-3, batch_size=8)


def test_training_lowers_the_loss_and_fits_a_separable_task(clip, task):
    dense, labels, text = task
    original = _state(clip.attnpool)
    before = F.cross_entropy(class_logits(pooled_features(clip.attnpool, dense[0]), text, 100.0), labels).item()
    fit = train_safe(clip.attnpool, dense, labels, text, 100.0, FAST)
    assert fit.losses[-1] < 0.5 * fit.losses[0]
    assert 50.0 < fit.accuracies[-1] <= 100.0  # percent, like every accuracy
    after = class_logits(pooled_features(fit.attnpool, dense[1]), text, 100.0)
    assert F.cross_entropy(after, labels).item() < before
    assert (after.argmax(-1) == labels).float().mean() == 1.0
    for name, value in clip.attnpool.state_dict().items():  # the original pooling is untouched
        assert torch.equal(value, original[name])
    assert not any(p.requires_grad for p in fit.attnpool.parameters())


@pytest.mark.parametrize("trainable", ["all", "attention", "values"])
def test_frozen_tensors_stay_bit_identical(clip, task, trainable):
    dense, labels, text = task
    fit = train_safe(clip.attnpool, dense, labels, text, 100.0, dataclasses.replace(FAST, epochs=2,
                                                                                      trainable=trainable))
    original = clip.attnpool.state_dict()
    for name, value in fit.attnpool.state_dict().items():
        frozen = name.split(".")[0] not in TRAINABLE_SETS[trainable] or name in INERT
        assert torch.equal(value, original[name]) == frozen, name


def test_training_is_deterministic_under_a_seed(clip, task):
    dense, labels, text = task
    config = dataclasses.replace(FAST, epochs=2)
    a = train_safe(clip.attnpool, dense, labels, text, 100.0, config, seed=3)
    b = train_safe(clip.attnpool, dense, labels, text, 100.0, config, seed=3)
    c = train_safe(clip.attnpool, dense, labels, text, 100.0, config, seed=4)
    sa, sb, sc = a.attnpool.state_dict(), b.attnpool.state_dict(), c.attnpool.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_decay_towards_pretrained_stays_closer(clip, task):
    dense, labels, text = task
    config = dataclasses.replace(FAST, epochs=3)
    free = train_safe(clip.attnpool, dense, labels, text, 100.0, config)
    held = train_safe(clip.attnpool, dense, labels, text, 100.0,
                      dataclasses.replace(config, weight_decay=50.0, decay_to="pretrained"))

    def distance(pool):
        return sum((p - q).norm() ** 2 for p, q in zip(pool.parameters(), clip.attnpool.parameters()))

    assert distance(held.attnpool) < 0.5 * distance(free.attnpool)


def test_loss_on_the_blend_trains_too(clip, task):
    dense, labels, text = task
    fit = train_safe(clip.attnpool, dense, labels, text, 100.0,
                     dataclasses.replace(FAST, epochs=6, loss_on="blended", train_blend=0.7))
    assert fit.losses[-1] < fit.losses[0]


def test_every_old_form_of_dense_maps_trains_and_predicts_alike(clip, task, tmp_path):
    """A tensor, a cache entry or its per-view memmaps where a DenseMaps is expected: the same numbers."""
    dense, labels, text = task
    writer = CacheWriter(tmp_path, {"t": 1}, rows=dense.shape[1], item_shape=tuple(dense.shape[2:]), views=2)
    writer.write(dense)
    entry = writer.finish()
    stored = entry.to_tensor()  # fp16, as cached
    config = dataclasses.replace(FAST, epochs=1)
    reference = train_safe(clip.attnpool, DenseMaps.of(stored), labels, text, 100.0, config).attnpool.state_dict()
    for form in (stored, entry, entry.view_arrays, list(stored), DenseMaps.of(entry).placed("device")):
        trained = train_safe(clip.attnpool, form, labels, text, 100.0, config).attnpool.state_dict()
        for name, value in trained.items():
            assert torch.equal(value, reference[name]), (type(form).__name__, name)

    head = ClipHead(text, 100.0, clip.attnpool)
    logits = []
    for form in (dense, DenseMaps.of(dense)):
        split = SplitFeatures(labels=labels, dense=form)
        assert isinstance(split.dense, DenseMaps)
        val = SplitFeatures(labels=labels, dense=form[1:] if isinstance(form, torch.Tensor) else form[1])
        method = Safe(config).fit(FewShotData(split, val, head, seed=1))
        logits.append(method.predict(val))
    assert torch.equal(logits[0], logits[1])


def test_config_and_inputs_are_validated(clip, task):
    for bad, message in [(dict(epochs=0), "epochs"), (dict(lr=-1.0), "lr"), (dict(trainable="bias"), "valid: all"),
                         (dict(loss_on="both"), "valid: finetuned"), (dict(blend=2.0), "blend"),
                         (dict(decay_to="mean"), "valid: zero"), (dict(blend_grid=()), "blend_grid"),
                         (dict(weight_decay=-1.0), "weight_decay"), (dict(batch_size=2.5), "batch_size")]:
        with pytest.raises(ValueError, match=message):
            SafeConfig(**bad)
    with pytest.raises(ValueError, match="valid: all, attention, values"):
        trainable_attnpool(clip.attnpool, "everything")
    dense, labels, text = task
    with pytest.raises(ValueError, match="views x N x C x H x W"):
        train_safe(clip.attnpool, dense[0, 0], labels, text, 100.0, FAST)
    with pytest.raises(ValueError, match="labels"):
        train_safe(clip.attnpool, dense, labels[:5], text, 100.0, FAST)
    with pytest.raises(ValueError, match="share one"):
        train_safe(clip.attnpool, [np.zeros((2, 3, 2, 2)), np.zeros((3, 3, 2, 2))], labels, text, 100.0, FAST)


# --- the few-shot method ------------------------------------------------------------------------

def _data(clip, task, **head):
    dense, labels, text = task
    train = SplitFeatures(labels=labels, dense=dense)
    val = SplitFeatures(labels=labels, dense=dense[1:])
    return FewShotData(train, val, ClipHead(text, 100.0, **head), seed=1)


def test_safe_method_fits_selects_blend_and_predicts(clip, task):
    data = _data(clip, task, attnpool=clip.attnpool)
    method = Safe(dataclasses.replace(FAST, epochs=8)).fit(data)
    chosen = method.chosen["blend"]
    assert chosen["selected_by"] == "validation" and len(chosen["sweep"]) == 11
    logits = method.predict(SplitFeatures(labels=task[1], dense=task[0][:1]))
    assert logits.shape == (len(task[1]), K)
    best = max(p["accuracy"] for p in chosen["sweep"])  # percent, like every accuracy
    assert accuracy(logits, task[1]) == pytest.approx(best)  # val == test here

    fixed = Safe(dataclasses.replace(FAST, epochs=1, blend=0.0)).fit(data)
    assert fixed.chosen["blend"] == {"blend": 0.0, "selected_by": "fixed", "sweep": []}
    zero_shot = class_logits(pooled_features(clip.attnpool, task[0][0]), task[2], 100.0)
    torch.testing.assert_close(fixed.predict(SplitFeatures(labels=task[1], dense=task[0][:1])), zero_shot,
                               rtol=1e-4, atol=1e-4)


def test_safe_method_errors(clip, task):
    with pytest.raises(ValueError, match="attnpool=clip.attnpool"):
        Safe(FAST).fit(_data(clip, task))
    dense, labels, text = task
    pooled_only = FewShotData(SplitFeatures(labels=labels, pooled=torch.zeros(1, len(labels), clip.embed_dim)),
                              SplitFeatures(labels=labels, dense=dense[:1]), ClipHead(text, 100.0, clip.attnpool))
    with pytest.raises(ValueError, match="kind='dense'"):
        Safe(FAST).fit(pooled_only)
    fitted = Safe(dataclasses.replace(FAST, epochs=1)).fit(_data(clip, task, attnpool=clip.attnpool))
    with pytest.raises(ValueError, match="kind='dense'"):
        fitted.predict(SplitFeatures(labels=labels, pooled=torch.zeros(1, len(labels), clip.embed_dim)))
