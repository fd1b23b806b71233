"""SAFE-A: SAFE trained first and frozen, its blended features feeding Tip-Adapter-F or CLIP-Adapter."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from safelib.methods import ClipHead, FewShotData, SplitFeatures, accuracy, make_method, method_config
from safelib.methods.blend import blend_features
from safelib.methods.safe import Safe, SafeConfig
from safelib.methods.tip_adapter import tip_logits

K = 3
FAST = {
    "safe": {"epochs": 10, "lr": 1e-3, "batch_size": 8},
    "blends": [0.5, 1.0],
}
ADAPTERS = {
    "safe_a_tip": {"epochs": 4, "batch_size": 8, "alphas": [0.5, 1.0, 2.0], "betas": [1.0, 3.0, 5.0]},
    "safe_a_clip_adapter": {"epochs": 4, "ratios": [0.2, 0.6]},
}


@pytest.fixture(scope="module")
def clip(make_tiny_clip):
    return make_tiny_clip()


@pytest.fixture(scope="module")
def task(clip):
    """Dense maps where class k brightens its own block of channels; text weights are random, so only
    the shots (through SAFE and the adapter) carry the classes: a known-good task, not a known-good text."""
    g = torch.Generator().manual_seed(0)
    c, s = clip.dense_channels, clip.grid

    def split(per_class: int, views: int) -> SplitFeatures:
        labels = torch.arange(K).repeat_interleave(per_class)
        dense = torch.rand(views, len(labels), c, s, s, generator=g)
        block = c // K
        for k in range(K):
            dense[:, labels == k, k * block:(k + 1) * block] += 1.0
        return SplitFeatures(labels=labels, dense=dense)

    text = F.normalize(torch.randn(clip.embed_dim, K, generator=g), dim=0)
    head = ClipHead(classifier=text, logit_scale=clip.logit_scale, attnpool=clip.attnpool)
    data = FewShotData(train=split(4, 2), val=split(2, 1), head=head, seed=1)
    return data, split(6, 1)


def _fit(name, data):
    return make_method(name, {**FAST, "adapter": ADAPTERS[name]}).fit(data)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_safe_a_beats_chance_and_records_its_joint_search(name, task):
    data, test = task
    method = _fit(name, data)
    logits = method.predict(test)
    assert logits.shape == (len(test), K)
    assert accuracy(logits, test.labels) > 100.0 / K + 30.0
    chosen = method.chosen
    assert chosen["blend"] in FAST["blends"]
    assert [row["blend"] for row in chosen["sweep"]] == FAST["blends"]
    best = max(row["val_acc"] for row in chosen["sweep"])
    assert next(r for r in chosen["sweep"] if r["blend"] == chosen["blend"])["val_acc"] == best
    assert "blend" in chosen["safe"]  # SAFE's own choice, recorded


def test_safe_a_tip_predicts_the_formula_on_safe_features(task):
    data, test = task
    method = _fit("safe_a_tip", data)
    b, alpha, beta = method.chosen["blend"], method.chosen["adapter"]["alpha"], method.chosen["adapter"]["beta"]
    dense = test.dense[0]
    with torch.no_grad():
        from safelib.clip.attnpool import attention_pool

        f_ft = attention_pool(method.safe.training.attnpool, dense)
        f_orig = attention_pool(data.head.attnpool, dense)
    f = blend_features(f_ft, f_orig, b)
    expected = tip_logits(f, data.head.classifier, data.head.logit_scale, method.adapter._keys,
                          method.adapter._values, alpha, beta)
    torch.testing.assert_close(method.predict(test), expected, rtol=1e-4, atol=1e-4)


def test_safe_is_trained_first_and_frozen(task):
    """SAFE-A's SAFE is the plain SAFE fit (same seed, same weights): the adapter never trains it."""
    data, _ = task
    method = _fit("safe_a_tip", data)
    alone = Safe(method_config("safe", FAST["safe"])).fit(data)
    for (name, p), q in zip(method.safe.training.attnpool.named_parameters(), alone.training.attnpool.parameters()):
        assert torch.equal(p, q), name
        assert not p.requires_grad


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_safe_a_no_leakage(name, task):
    data, test = task
    shuffled = test.permuted_labels(torch.Generator().manual_seed(0))
    first, second = _fit(name, data), _fit(name, data)
    assert _choices(first.chosen) == _choices(second.chosen)
    assert torch.equal(first.predict(test), second.predict(shuffled))


def _choices(chosen):
    """Everything chosen, without wall-clock timings (which differ between identical fits)."""
    if isinstance(chosen, dict):
        return {k: _choices(v) for k, v in chosen.items() if not k.endswith("seconds")}
    if isinstance(chosen, list):
        return [_choices(v) for v in chosen]
    return chosen


def test_safe_a_config_errors():
    with pytest.raises(ValueError, match="blends"):
        method_config("safe_a_tip", {"blends": [1.5]})
    with pytest.raises(ValueError, match="unknown option.*'epoch'.*for adapter"):
        method_config("safe_a_clip_adapter", {"adapter": {"epoch": 1}})
    with pytest.raises(ValueError, match="invalid SafeConfig"):
        method_config("safe_a_tip", {"safe": {"epochs": 0}})
    config = method_config("safe_a_tip", {"safe": {"epochs": 2}})
    assert isinstance(config.safe, SafeConfig) and config.safe.epochs == 2
    assert method_config("safe_a_tip", config.to_dict()) == config  # a record's config rebuilds it


def test_safe_a_needs_dense_maps(task):
    data, test = task
    method = _fit("safe_a_clip_adapter", data)
    pooled_only = SplitFeatures(labels=test.labels, pooled=torch.randn(1, len(test), 32))
    with pytest.raises(ValueError, match="dense"):
        method.predict(pooled_only)
