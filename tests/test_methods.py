"""Tests of the few-shot methods on constructed features (no model, no download)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from safelib.methods import (
    METHODS,
    ClipAdapterConfig,
    ClipHead,
    FewShotData,
    FewShotMethod,
    LinearProbeAugConfig,
    SplitFeatures,
    TipAdapterConfig,
    TipAdapterFConfig,
    ZeroShotConfig,
    accuracy,
    adapter_mix,
    cache_logits,
    make_method,
    tip_logits,
    method_config,
)
from safelib.methods.clip_adapter import Adapter

# Small, fast settings for every method (the defaults are for real runs).
FAST = {
    "zero_shot": {},
    "linear_probe_aug": {},
    "clip_adapter": {"ratios": (0.2, 0.6), "epochs": 10},
    "tip_adapter": {},
    "tip_adapter_f": {"epochs": 10, "batch_size": 16},
}
BASE_METHODS = tuple(FAST)


def make_task(
    num_classes: int = 4,
    dim: int = 16,
    shots: int = 8,
    views: int = 3,
    val_per_class: int = 4,
    test_per_class: int = 25,
    noise: float = 0.6,
    text_noise: float = 0.0,
    logit_scale: float = 100.0,
    seed: int = 0,
) -> tuple[FewShotData, SplitFeatures]:
    """Features = class prototype (times a random norm) + noise; the text classifier = prototypes.

    A known-good model by construction: zero-shot works when ``text_noise`` is 0, and the shots
    carry the information to fix a noisy text classifier.
    """
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(num_classes, dim, generator=g), dim=-1)  # K x D

    def split(per_class: int, num_views: int) -> SplitFeatures:
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        labels = labels[torch.randperm(len(labels), generator=g)]
        base = protos[labels] + noise * torch.randn(len(labels), dim, generator=g) / math.sqrt(dim)
        jitter = 0.2 * noise * torch.randn(num_views, len(labels), dim, generator=g) / math.sqrt(dim)
        scale = 1.0 + 4.0 * torch.rand(len(labels), 1, generator=g)  # unnormalised, like CLIP's
        return SplitFeatures(labels=labels, pooled=(base + jitter) * scale)

    text = protos + text_noise * torch.randn(num_classes, dim, generator=g) / math.sqrt(dim)
    head = ClipHead(classifier=F.normalize(text, dim=-1).t().contiguous(), logit_scale=logit_scale)
    data = FewShotData(train=split(shots, views), val=split(val_per_class, 1), head=head, seed=1)
    return data, split(test_per_class, 1)


def fit_predict(name: str, data: FewShotData, test: SplitFeatures):
    method = make_method(name, FAST[name]).fit(data)
    return method, method.predict(test)


# --- formulas ---------------------------------------------------------------------------------

def test_cache_logits_match_the_formula_computed_independently():
    g = torch.Generator().manual_seed(3)
    f = F.normalize(torch.randn(5, 8, generator=g), dim=-1).double()
    keys = F.normalize(torch.randn(7, 8, generator=g), dim=-1).double()
    labels = torch.randint(0, 3, (7,), generator=g)
    values = F.one_hot(labels, 3).double()
    beta = 2.7
    fn, kn = f.numpy(), keys.numpy()
    expected = np.zeros((5, 3))
    for n in range(5):
        for m in range(7):
            expected[n, labels[m]] += math.exp(-beta * (1 - float(np.dot(fn[n], kn[m]))))
    np.testing.assert_allclose(cache_logits(f, keys, values, beta).numpy(), expected, rtol=1e-12)


def test_tip_adapter_predicts_its_formula_with_the_chosen_alpha_beta():
    data, test = make_task(seed=4)
    method, logits = fit_predict("tip_adapter", data, test)
    alpha, beta = method.chosen["alpha"], method.chosen["beta"]
    train = data.train.pooled.double().numpy()  # V x M x D
    keys = train.mean(axis=0)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    f = test.pooled[0].double().numpy()
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    values = np.eye(4)[data.train.labels.numpy()]
    w = data.head.classifier.double().numpy()
    expected = 100 * f @ w + alpha * np.exp(-beta * (1 - f @ keys.T)) @ values
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-4, atol=1e-3)
    assert alpha in TipAdapterConfig().alphas and beta in TipAdapterConfig().betas


def test_tip_logits_use_the_model_logit_scale_for_the_text_term_only():
    g = torch.Generator().manual_seed(4)
    f = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    w = F.normalize(torch.randn(8, 3, generator=g), dim=0)
    keys = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    values = F.one_hot(torch.randint(0, 3, (6,), generator=g), 3).float()
    cache = cache_logits(f, keys, values, 2.0)
    torch.testing.assert_close(tip_logits(f, w, 100.0, keys, values, alpha=1.3, beta=2.0), 100 * f @ w + 1.3 * cache)
    torch.testing.assert_close(tip_logits(f, w, 25.0, keys, values, alpha=1.3, beta=2.0), 25 * f @ w + 1.3 * cache)


def test_clip_adapter_mixing_matches_the_formula():
    g = torch.Generator().manual_seed(5)
    adapter = Adapter(12, reduction=4)
    f = torch.randn(6, 12, generator=g)
    a = torch.relu(torch.relu(f @ adapter.down.weight.t()) @ adapter.up.weight.t())
    torch.testing.assert_close(adapter(f), a)
    torch.testing.assert_close(adapter_mix(f, adapter(f), 0.3), 0.3 * a + 0.7 * f)
    # No bias + ReLU: A(c f) = c A(f), so normalising the input first changes nothing after the mix.
    torch.testing.assert_close(adapter(2.5 * f), 2.5 * adapter(f))


def test_clip_adapter_predicts_its_formula_with_the_chosen_ratio():
    data, test = make_task(seed=6)
    method, logits = fit_predict("clip_adapter", data, test)
    r = method.chosen["ratio"]
    assert r in FAST["clip_adapter"]["ratios"]
    f = F.normalize(test.pooled[0], dim=-1)
    mixed = r * method._model.adapter(f) + (1 - r) * f
    expected = 100 * F.normalize(mixed, dim=-1) @ data.head.classifier
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)


# --- selection ------------------------------------------------------------------------------

def test_linear_probe_sweep_picks_the_best_value_on_validation():
    data, test = make_task(noise=2.0, seed=7)  # noisy enough that C matters
    method, _ = fit_predict("linear_probe_aug", data, test)
    table = method.chosen["sweep"]
    best = max(row["val_acc"] for row in table)
    chosen_row = next(row for row in table if row["C"] == method.chosen["C"])
    assert chosen_row["val_acc"] == best
    assert len({row["val_acc"] for row in table}) > 1, "the task should make C matter"
    # Recompute a few rows with scikit-learn directly.
    x = F.normalize(data.train.pooled, dim=-1).flatten(0, 1).double().numpy()
    y = np.tile(data.train.labels.numpy(), data.train.num_views)
    xv = F.normalize(data.val.pooled[0], dim=-1).double().numpy()
    for row in table[:: max(1, len(table) // 4)]:
        model = LogisticRegression(C=row["C"], max_iter=1000).fit(x, y)
        acc = 100.0 * (model.predict(xv) == data.val.labels.numpy()).mean()
        assert acc == pytest.approx(row["val_acc"])
    # Refinement happened around the coarse best.
    cs = sorted(row["C"] for row in table)
    assert len(cs) > len(LinearProbeAugConfig().coarse_exponents)


class _Cheat(FewShotMethod):
    """A method that would score 100 % from the test labels, if it were ever given them."""

    name = "cheat"
    config_class = ZeroShotConfig

    def _fit(self, data: FewShotData) -> None:
        self.num_classes = data.head.num_classes

    def _predict(self, test: SplitFeatures) -> torch.Tensor:
        return 10.0 * F.one_hot(test.labels, self.num_classes).float()


def test_no_leakage_a_method_that_would_read_test_labels_cannot():
    """``predict`` hands methods the test features only: permuting the labels changes no logit."""
    data, test = make_task(seed=8)
    shuffled = test.permuted_labels(torch.Generator().manual_seed(0))
    assert not torch.equal(shuffled.labels, test.labels)
    cheat = _Cheat().fit(data)
    logits = cheat.predict(test)
    assert torch.equal(logits, cheat.predict(shuffled))
    assert accuracy(logits, test.labels) < 50.0  # no better than a guess: it never saw a label


# --- known-good tasks --------------------------------------------------------------------------

@pytest.mark.parametrize("name", BASE_METHODS)
def test_every_method_beats_chance_on_a_separable_task(name):
    data, test = make_task(seed=9)
    _, logits = fit_predict(name, data, test)
    assert logits.shape == (len(test), 4)
    assert accuracy(logits, test.labels) > 25.0 + 40.0


@pytest.mark.parametrize("name", ["linear_probe_aug", "tip_adapter", "tip_adapter_f"])
def test_few_shot_methods_repair_a_poor_text_classifier(name):
    data, test = make_task(text_noise=4.0, noise=0.5, seed=10)
    _, zero = fit_predict("zero_shot", data, test)
    _, adapted = fit_predict(name, data, test)
    assert accuracy(adapted, test.labels) > accuracy(zero, test.labels) + 10.0


def test_tip_adapter_f_training_lowers_the_loss():
    data, test = make_task(text_noise=4.0, seed=11)
    method = make_method("tip_adapter_f", {"epochs": 15, "batch_size": 8}).fit(data)
    losses = method.chosen["train_loss"]
    assert losses[-1] < losses[0]


def test_training_is_deterministic_under_the_seed():
    data, test = make_task(seed=12)
    a = make_method("clip_adapter", FAST["clip_adapter"]).fit(data).predict(test)
    b = make_method("clip_adapter", FAST["clip_adapter"]).fit(data).predict(test)
    assert torch.equal(a, b)


# --- interface and errors -----------------------------------------------------------------------

def test_registry_and_configs():
    assert set(BASE_METHODS) <= set(METHODS)
    with pytest.raises(ValueError, match="valid methods: .*linear_probe"):
        make_method("tip")
    with pytest.raises(ValueError, match="unknown option.*'epoch'.*valid options.*epochs"):
        method_config("tip_adapter_f", {"epoch": 3})
    assert method_config("clip_adapter", {"ratios": [0.5]}).ratios == (0.5,)
    with pytest.raises(ValueError, match="ratios"):
        ClipAdapterConfig(ratios=(1.5,))
    with pytest.raises(ValueError, match="epochs"):
        TipAdapterFConfig(epochs=0)
    with pytest.raises(TypeError, match="TipAdapterConfig"):
        make_method("tip_adapter", LinearProbeAugConfig())


def test_split_and_data_validation():
    labels = torch.arange(3)
    with pytest.raises(ValueError, match="neither"):
        SplitFeatures(labels=labels)
    with pytest.raises(ValueError, match="views x N x D with N = 3"):
        SplitFeatures(labels=labels, pooled=torch.zeros(1, 4, 8))
    with pytest.raises(ValueError, match="integer"):
        SplitFeatures(labels=labels.float(), pooled=torch.zeros(1, 3, 8))
    with pytest.raises(ValueError, match="logit_scale"):
        ClipHead(classifier=torch.zeros(8, 3), logit_scale=-1.0)
    head = ClipHead(classifier=torch.zeros(8, 3), logit_scale=100.0)
    split = SplitFeatures(labels=labels, pooled=torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="exactly one"):
        FewShotData(train=split, val=split, head=head)
    with pytest.raises(ValueError, match="0..2"):
        FewShotData(train=SplitFeatures(labels=labels + 1, pooled=torch.randn(2, 3, 8)), val=split, head=head)
    with pytest.raises(RuntimeError, match="fit"):
        make_method("zero_shot").predict(split)
    with pytest.raises(ValueError, match="attnpool"):
        FewShotData(
            train=SplitFeatures(labels=labels, dense=torch.zeros(1, 3, 4, 2, 2)),
            val=SplitFeatures(labels=labels, pooled=torch.zeros(1, 3, 8)), head=head,
        ).pooled(SplitFeatures(labels=labels, dense=torch.zeros(1, 3, 4, 2, 2)))


def test_test_split_with_many_views_is_rejected():
    data, test = make_task(seed=13)
    method = make_method("zero_shot").fit(data)
    with pytest.raises(ValueError, match="one eval view"):
        method.predict(data.train)


def test_dense_only_splits_are_pooled_with_the_original_attnpool():
    """A cache holding only dense maps (tensor or per-view memmaps) still serves pooled-feature methods."""
    from open_clip.modified_resnet import AttentionPool2d

    torch.manual_seed(0)
    pool = AttentionPool2d(spacial_dim=2, embed_dim=16, num_heads=2, output_dim=8).eval()
    dense = torch.randn(2, 5, 16, 2, 2)  # V x N x C x H x W
    labels = torch.arange(5) % 3
    head = ClipHead(classifier=F.normalize(torch.randn(8, 3), dim=0), logit_scale=100.0, attnpool=pool)
    with torch.no_grad():
        expected = torch.stack([pool(view) for view in dense])  # open_clip's own forward
    for stored in (dense, [view.numpy() for view in dense]):
        split = SplitFeatures(labels=labels, dense=stored)
        assert split.num_views == 2
        val = SplitFeatures(labels=labels, dense=[dense[0].numpy()])
        data = FewShotData(train=split, val=val, head=head)
        torch.testing.assert_close(data.pooled(split), expected, rtol=1e-4, atol=1e-5)
    logits = make_method("zero_shot").fit(data).predict(val)
    torch.testing.assert_close(logits, 100 * F.normalize(expected[0], dim=-1) @ head.classifier, rtol=1e-4, atol=1e-3)


def test_batched_validation_scores_match_one_at_a_time():
    from safelib.methods.base import batch_validation_scores, validation_scores

    g = torch.Generator().manual_seed(14)
    logits, labels = torch.randn(5, 7, 3, generator=g), torch.randint(0, 3, (7,), generator=g)
    for batched, one in zip(batch_validation_scores(logits, labels), [validation_scores(lg, labels) for lg in logits]):
        assert batched["val_acc"] == pytest.approx(one["val_acc"])
        assert batched["val_loss"] == pytest.approx(one["val_loss"], rel=1e-6)


def test_linear_probe_on_mean_views_is_sklearn_on_the_mean_features():
    data, test = make_task(seed=15)
    config = {"coarse_exponents": (0.0,), "refine_halfwidth": 0.0, "views": "mean"}
    method = make_method("linear_probe_aug", config).fit(data)
    assert method.chosen["C"] == 1.0 and len(method.chosen["sweep"]) == 1
    mean = F.normalize(F.normalize(data.train.pooled, dim=-1).mean(0), dim=-1).double().numpy()
    model = LogisticRegression(C=1.0, max_iter=1000).fit(mean, data.train.labels.numpy())
    expected = model.predict_log_proba(F.normalize(test.pooled[0], dim=-1).double().numpy())
    np.testing.assert_allclose(method.predict(test).numpy(), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="views='first'; valid: all, mean"):
        LinearProbeAugConfig(views="first")
