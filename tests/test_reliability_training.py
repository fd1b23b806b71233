"""Nothing silently wrong in training (issue 16): the cases of the reliability review
(``shared/reviews/reliability-2026-12-01.md``), each named by its row.

A config that is wrong stops before any work with a message naming the field, the value and what
is allowed; a training that goes non-finite raises `TrainingDivergedError` naming the method, the
epoch and the likely cause; a training that ends above its start or at chance is flagged in
``training_warnings``; SAFE's blend 0 is CLIP's zero-shot whatever the fine-tuned pooling holds.
Everything here runs on constructed features or the tiny CLIP, in seconds.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import safelib.methods.safe
from safelib.clip.text import class_logits
from safelib.features.extract import pooled_features
from safelib.methods import (ClipHead, FewShotData, SafeConfig, SplitFeatures, TrainingDivergedError,
                             TrainingWarning, make_method, method_config)
from safelib.methods.blend import blend_features, choose_blend

K = 3


def pooled_task(num_classes: int = 6, dim: int = 16, shots: int = 2, logit_scale: float = 20.0,
                seed: int = 0) -> FewShotData:
    """Class prototypes plus noise, a noisy text classifier: a small task where training has work to do."""
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(num_classes, dim, generator=g), dim=-1)

    def split(per_class: int, views: int) -> SplitFeatures:
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        base = protos[labels] + 0.6 * torch.randn(len(labels), dim, generator=g) / math.sqrt(dim)
        return SplitFeatures(labels=labels, pooled=base + 0.1 * torch.randn(views, len(labels), dim, generator=g))

    text = F.normalize(protos + 3.0 * torch.randn(num_classes, dim, generator=g) / math.sqrt(dim), dim=-1)
    return FewShotData(split(shots, 2), split(2, 1), ClipHead(text.t().contiguous(), logit_scale), seed=1)


@pytest.fixture(scope="module")
def clip(make_tiny_clip):
    return make_tiny_clip()


@pytest.fixture(scope="module")
def dense_task(clip):
    """SAFE's input: dense maps of a separable 3-class task (class k brightens a channel block)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(12) % K
    c, s = clip.dense_channels, clip.grid
    dense = torch.rand(2, len(labels), c, s, s, generator=g)
    for k in range(K):
        dense[:, labels == k, k * (c // K):(k + 1) * (c // K)] += 1.0
    text = F.normalize(torch.randn(clip.embed_dim, K, generator=g), dim=0)
    data = FewShotData(SplitFeatures(labels=labels, dense=dense), SplitFeatures(labels=labels, dense=dense[1:]),
                       ClipHead(text, 100.0, clip.attnpool), seed=1)
    return data, SplitFeatures(labels=labels, dense=dense[:1])


# --- 1.15, 1.16, 1.19, 1.20, 1.21: typed config fields, refused before any work ------------------

@pytest.mark.parametrize("method", ["clip_adapter", "tip_adapter_f"])
def test_1_15_a_nan_learning_rate_is_refused(method):
    with pytest.raises(ValueError, match=r"lr must be a finite number > 0, got nan \(not finite\)"):
        method_config(method, {"lr": float("nan")})


@pytest.mark.parametrize("method, field", [("safe", "lr"), ("clip_adapter", "lr"), ("tip_adapter_f", "lr"),
                                           ("coop", "lr"), ("safe", "weight_decay"), ("coop", "momentum"),
                                           ("safe", "epochs"), ("clip_adapter", "epochs"), ("coop", "n_ctx")])
def test_1_16_a_boolean_is_not_a_number(method, field):
    with pytest.raises(ValueError, match=rf"{field} must be .*, got True \(a boolean, not a number\)"):
        method_config(method, {field: True})


def test_1_16_amp_must_be_a_bool():
    with pytest.raises(ValueError, match=r"amp must be true or false, got 'no' \(a string\)"):
        method_config("safe", {"amp": "no"})
    with pytest.raises(ValueError, match=r"amp must be true or false"):
        method_config("safe_a_tip", {"safe": {"amp": 1}})
    assert method_config("safe", {"amp": False}).amp is False


@pytest.mark.parametrize("method, field", [("safe", "blend_grid"), ("safe_a_tip", "blends"),
                                           ("clip_adapter", "ratios"), ("tip_adapter", "alphas")])
def test_1_19_a_grid_given_as_one_string_is_refused_clearly(method, field):
    with pytest.raises(ValueError, match=rf"{field} must be a non-empty list of .*got '0.5' \(a single string, "
                                         r"not a list; write \[0.5\]\)"):
        method_config(method, {field: "0.5"})
    with pytest.raises(ValueError, match=rf"{field} must be .*'x' is not a number"):
        method_config(method, {field: [0.5, "x"]})


@pytest.mark.parametrize("method", ["safe", "clip_adapter", "tip_adapter_f", "coop"])
def test_1_20_a_yaml_string_number_says_how_to_write_it(method):
    with pytest.raises(ValueError, match=r"lr must be a finite number > 0, got '1e-3' \(a string: PyYAML reads "
                                         r"1e-3, .* write 1\.0e-3\)"):
        method_config(method, {"lr": "1e-3"})
    with pytest.raises(ValueError, match=r"epochs must be an int >= 1( or None)?, got '4' \(a string; write the "
                                         r"number 4"):
        method_config(method, {"epochs": "4"})


def test_1_21_a_log10_c_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"coarse_exponents must be a non-empty list of numbers in \[-20, 20\], "
                                         r"got \(400,\): 400 is out of range"):
        method_config("linear_probe_aug", {"coarse_exponents": [400]})
    with pytest.raises(ValueError, match=r"coarse_c must lie in \[1e-20, 1e20\]"):
        method_config("linear_probe", {"coarse_c": [1e300]})


def test_every_problem_of_a_config_is_named_at_once():
    with pytest.raises(ValueError, match=r"invalid ClipAdapterConfig: trainer='sgd'.*; epochs must be an int >= 1, "
                                         r"got 2\.5; lr must be"):
        method_config("clip_adapter", {"trainer": "sgd", "epochs": 2.5, "lr": -1})


# --- 1.42, 1.45: non-finite training stops the run ------------------------------------------------

def test_1_42_tip_adapter_f_at_lr_1e6_stops_with_a_clear_error():
    with pytest.raises(TrainingDivergedError, match=r"tip_adapter_f: training diverged at epoch \d of 3: .*"
                                                    r"Likely cause: learning rate 1e\+06 too high") as caught:
        make_method("tip_adapter_f", {"epochs": 3, "lr": 1e6}).fit(pooled_task())
    assert isinstance(caught.value, RuntimeError) and caught.value.method == "tip_adapter_f"


def test_1_45_safe_with_a_huge_decay_stops_with_a_clear_error(dense_task):
    data, _ = dense_task
    config = {"epochs": 3, "weight_decay": 1e308, "decay_to": "pretrained"}
    with pytest.raises(TrainingDivergedError, match=r"safe: training diverged at epoch 1 of 3: .*"
                                                    r"Likely cause: weight_decay 1e\+308 too large") as caught:
        make_method("safe", config).fit(data)
    assert caught.value.epoch == 1


def test_safe_a_names_itself_and_its_stage(dense_task):
    data, _ = dense_task
    config = {"safe": {"epochs": 2, "weight_decay": 1e308, "decay_to": "pretrained"}}
    with pytest.raises(TrainingDivergedError, match=r"safe_a_tip, in its SAFE stage: safe: training diverged"):
        make_method("safe_a_tip", config).fit(data)


def test_coop_stops_when_its_context_diverges(tiny_clip):
    task = pooled_task(num_classes=K, dim=tiny_clip.embed_dim)
    head = ClipHead(task.head.classifier, 100.0, classnames=("apple", "boat", "cat"), clip=tiny_clip)
    data = FewShotData(task.train, task.val, head, seed=1)
    with pytest.raises(TrainingDivergedError, match=r"coop: training diverged at epoch 2 of 3: .*learning rate 1e\+30"):
        make_method("coop", {"epochs": 3, "lr": 1e30, "n_ctx": 4, "warmup_epochs": 0}).fit(data)


def test_nan_in_the_cached_features_is_named_as_such():
    data = pooled_task()
    train = SplitFeatures(labels=data.train.labels, pooled=data.train.pooled.clone())
    train.pooled[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="clip_adapter: the cached training features hold NaN"):
        make_method("clip_adapter", {"epochs": 2}).fit(dataclasses.replace(data, train=train))


def test_nan_logits_never_pass_as_a_prediction():
    data = pooled_task()
    method = make_method("zero_shot").fit(data)
    test = SplitFeatures(labels=data.val.labels, pooled=data.val.pooled.clone())
    test.pooled[0, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="zero_shot: 1 of 12 images got NaN logits"):
        method.predict(test)


# --- 1.43, 1.44: a training that did not fit is flagged, not failed --------------------------------

def test_1_43_clip_adapter_at_lr_1e6_is_flagged():
    method = make_method("clip_adapter", {"epochs": 3, "lr": 1e6, "ratios": [0.2]}).fit(pooled_task())
    losses = method.chosen["train_loss"]
    assert losses[-1] > losses[0]
    assert method.training_warnings == [
        f"clip_adapter (ratio 0.2): training loss went {losses[0]:.4g} -> {losses[-1]:.4g} over 3 epochs: the loss "
        "ended above where it started (learning rate too high? a low one or a 1-shot run can do this too)"]


def test_1_44_safe_at_lr_1e6_collapses_to_chance_and_is_flagged(dense_task):
    data, _ = dense_task
    method = make_method("safe", {"epochs": 3, "lr": 1e6}).fit(data)
    assert method.chosen["train_losses"][-1] == pytest.approx(math.log(K), abs=1e-4)
    assert len(method.training_warnings) == 1
    assert method.training_warnings[0].startswith("safe: training loss went")
    assert "ln 3 = 1.0986, the loss of uniform logits: the model collapsed to chance" in method.training_warnings[0]
    rising = make_method("safe", {"epochs": 3, "lr": 10.0}).fit(data)
    assert "ended above where it started" in rising.training_warnings[0]


def test_training_warnings_start_empty_and_are_reset_by_fit(dense_task):
    data, _ = dense_task
    method = make_method("safe", {"epochs": 3, "lr": 10.0})
    assert method.training_warnings == []
    method.fit(data)
    assert method.training_warnings
    method.config = SafeConfig(epochs=2)
    assert method.fit(data).training_warnings == []
    safe_a = make_method("safe_a_tip", {"safe": {"epochs": 3, "lr": 10.0}, "adapter": {"epochs": 2},
                                        "blends": [0.5]}).fit(data)
    assert safe_a.training_warnings[0].startswith("safe_a_tip, SAFE stage: safe: training loss went")


# --- blend 0 is CLIP, whatever the fine-tuned pooling holds ----------------------------------------

def test_blend_zero_ignores_a_nan_fine_tuned_feature():
    g = torch.Generator().manual_seed(0)
    f_ft, f_orig = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    expected = blend_features(f_ft, f_orig, 0.0)
    assert torch.equal(blend_features(torch.full_like(f_ft, float("nan")), f_orig, 0.0), expected)
    assert torch.isfinite(expected).all()


def _poisoned(pool: torch.nn.Module) -> torch.nn.Module:
    """``pool`` with every weight NaN: a fine-tuned pooling that gives NaN features everywhere."""
    with torch.no_grad():
        for p in pool.parameters():
            p.fill_(float("nan"))
    return pool


def test_safe_at_blend_zero_is_zero_shot_with_a_nan_pooling(clip, dense_task):
    data, test = dense_task
    finite = make_method("safe", {"epochs": 1, "blend": 0.0}).fit(data)
    expected = finite.predict(test)
    poisoned = make_method("safe", {"epochs": 1, "blend": 0.0}).fit(data)
    _poisoned(poisoned.training.attnpool)
    assert torch.equal(poisoned.predict(test), expected)
    zero_shot = class_logits(pooled_features(clip.attnpool, test.dense.eval_view()), data.head.classifier, 100.0)
    torch.testing.assert_close(expected, zero_shot, rtol=0, atol=1e-4)  # CLIP's logits, normalised once more


def test_choosing_the_blend_falls_back_to_the_finite_points_says_so_and_records_it(dense_task, monkeypatch):
    data, test = dense_task
    train_safe = safelib.methods.safe.train_safe

    def nan_pooling(*args, **kwargs):  # a training that ended finite, a pooling that is NaN on validation
        training = train_safe(*args, **kwargs)
        _poisoned(training.attnpool)
        return training

    monkeypatch.setattr(safelib.methods.safe, "train_safe", nan_pooling)
    with pytest.warns(TrainingWarning, match=r"blends \[0.1, 0.2, .*1.0\] were left out"):
        method = make_method("safe", {"epochs": 1}).fit(data)
    assert method.chosen["blend"]["blend"] == 0.0
    assert method.chosen["blend"]["fallback"].startswith("blends [0.1, 0.2")
    finite = make_method("safe", {"epochs": 1, "blend": 0.0}).fit(data)
    assert torch.equal(method.predict(test), finite.predict(test))
    f_ft, f_orig = method.pool_both(data.val.dense.eval_view())
    with pytest.raises(ValueError, match="CLIP's own .* validation features are not finite"):
        choose_blend(f_ft, torch.full_like(f_orig, float("nan")), data.val.labels, data.head.classifier, 100.0)
