"""Issue 13: the baselines as the field runs them (reference settings, presets, lpclip, CoOp's trainer).

The expected numbers below are typed from the reference repositories (not from safelib), so a
wrong entry in ``safelib.methods.reference`` fails here:
gaopengcuhk/Tip-Adapter@d0e2d6f configs/<dataset>.yaml lines 17-21 and 29-31.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

import safelib as sl
from safelib.methods import (
    ClipHead,
    FewShotData,
    LinearProbe,
    SplitFeatures,
    TipAdapter,
    TipAdapterConfig,
    method_config,
    resolve_preset,
)
from safelib.methods.feature_training import dassl_lr
from safelib.methods.reference import TIP_ADAPTER, coop_epochs, reference_grid
from safelib.methods.tip_adapter import DEFAULT_ALPHAS, DEFAULT_BETAS
from safelib.runs import RunConfig, run

# dataset: (search_scale [beta_max, alpha_max], init_alpha, init_beta, lr, augment_epoch, train_epoch)
TIP_YAML = {
    "imagenet": ((7, 3), 1.17, 1, 0.001, 10, 20),
    "oxford_flowers": ((50, 50), 10, 1, 0.001, 10, 20),
    "fgvc_aircraft": ((30, 30), 5, 1, 0.001, 10, 20),  # Tip-Adapter's configs/fgvc.yaml
    "eurosat": ((12, 10), 2, 1, 0.001, 10, 100),
    "dtd": ((13, 13), 2, 1, 0.001, 10, 20),
    "stanford_cars": ((20, 10), 3, 1, 0.001, 10, 20),
    "sun397": ((12, 10), 1.17, 1, 0.001, 10, 20),
    "food101": ((10, 10), 1.17, 1, 0.001, 10, 20),
    "caltech101": ((12, 5), 3, 1, 0.001, 10, 20),
    "oxford_pets": ((7, 3), 1.17, 1, 0.001, 10, 20),
    "ucf101": ((7, 3), 3, 1, 0.001, 10, 20),
}


# --- the reference settings as data ---------------------------------------------------------------

@pytest.mark.parametrize("dataset", sorted(TIP_YAML))
def test_tip_adapter_settings_are_the_reference_configs(dataset):
    scale, init_alpha, init_beta, lr, augment, train = TIP_YAML[dataset]
    got = TIP_ADAPTER[dataset]
    assert (tuple(got.search_scale), got.search_step) == (scale, (200, 20))
    assert (got.init_alpha, got.init_beta, got.lr, got.augment_epoch, got.train_epoch) == (
        init_alpha, init_beta, lr, augment, train)


def test_every_benchmark_has_reference_settings():
    assert sorted(sl.data.list_datasets("benchmark")) == sorted(TIP_YAML)


def test_reference_grid_is_tip_adapters_construction():
    """utils.py:103-104: ``i * (max - 0.1) / step + 0.1`` for i < step, so the maximum is never reached."""
    grid = reference_grid(7, 200)
    assert len(grid) == 200 and grid[0] == 0.1 and grid[-1] < 7
    assert grid[1] == pytest.approx(0.1 + 6.9 / 200) and grid[-1] == pytest.approx(0.1 + 199 * 6.9 / 200)


def test_coop_epochs_follow_coops_scripts():
    """COOP.md:13-22: rn50_ep50 at 1 shot, rn50_ep100 at 2 and 4, rn50 (200) at 8 and 16; ImageNet 50 always."""
    assert [coop_epochs(k) for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert [coop_epochs(k, "imagenet") for k in (1, 2, 4, 8, 16)] == [50] * 5


def test_dassl_schedule_warms_up_then_cosine_per_epoch():
    lrs = [dassl_lr(e, 0.002, 200, 1, 1e-5) for e in range(200)]
    assert lrs[0] == 1e-5 and lrs[1] == pytest.approx(0.002)
    assert lrs[101] == pytest.approx(0.001) and lrs[-1] == pytest.approx(0.001 * (1 + math.cos(math.pi * 198 / 200)))


# --- preset resolution -----------------------------------------------------------------------------

def test_ours_resolves_to_todays_config_unchanged():
    for name in ("tip_adapter", "tip_adapter_f", "clip_adapter", "safe_a_tip", "safe_a_clip_adapter"):
        config = method_config(name)
        resolved, fields = resolve_preset(config, "oxford_flowers", 16, 10)
        assert resolved == config, name
    _, fields = resolve_preset(method_config("tip_adapter"), "oxford_flowers", 16, 10)
    assert fields["search_scale"] == [7.0, 3.0] and fields["preset"] == "ours"


def test_reference_preset_takes_the_datasets_settings_under_the_references_names():
    resolved, fields = resolve_preset(method_config("tip_adapter_f", {"preset": "reference"}), "oxford_flowers", 16, 10)
    assert resolved.alphas == reference_grid(50, 20) and resolved.betas == reference_grid(50, 200)
    assert (resolved.init_alpha, resolved.init_beta, resolved.epochs) == (10, 1, 20)
    assert fields["search_scale"] == [50, 50] and fields["search_step"] == [200, 20]
    assert fields["init_alpha"] == 10 and fields["preset_dataset"] == "oxford_flowers"
    assert fields["preset_source"].endswith("configs/oxford_flowers.yaml")
    eurosat, _ = resolve_preset(method_config("tip_adapter_f", {"preset": "reference"}), "eurosat", 16, 10)
    assert eurosat.epochs == 100


def test_explicit_grids_win_over_the_preset():
    config = method_config("tip_adapter", {"preset": "reference", "alphas": [1.0, 2.0]})
    resolved, fields = resolve_preset(config, "fgvc_aircraft", 4, 10)
    assert resolved.alphas == (1.0, 2.0) and resolved.betas == reference_grid(30, 200)
    assert fields["search_scale"] == [30, 2.0] and fields["preset_overridden"] == ["alphas"]


def test_a_dataset_the_references_never_ran_gets_imagenets_settings_and_says_so():
    resolved, fields = resolve_preset(method_config("tip_adapter_f", {"preset": "reference"}),
                                      "miniworld_shape_largest", 4, 2)
    assert resolved.init_alpha == 1.17 and resolved.alphas == reference_grid(3, 20)
    assert fields["preset_dataset"] == "imagenet" and "never ran 'miniworld_shape_largest'" in fields["preset_note"]
    assert "2 augmented views" in fields["augment_epoch_note"]
    assert resolved.preset == "reference:imagenet"


def test_safe_a_resolves_its_adapters_preset():
    config = method_config("safe_a_tip", {"adapter": {"preset": "reference"}})
    resolved, fields = resolve_preset(config, "dtd", 8, 10)
    assert resolved.adapter.init_alpha == 2 and fields["adapter"]["search_scale"] == [13, 13]


def test_clip_adapter_reference_is_coops_trainer_with_ratio_02():
    resolved, fields = resolve_preset(method_config("clip_adapter", {"preset": "reference"}), "dtd", 8, 10)
    assert (resolved.ratios, resolved.trainer, resolved.lr, resolved.epochs, resolved.batch_size) == (
        (0.2,), "coop", 0.002, 200, 32)
    assert resolved.weight_decay == 5e-4 and fields["optim"] == "sgd" and fields["momentum"] == 0.9


def test_bad_preset_and_selection_are_named():
    with pytest.raises(ValueError, match="preset must be 'ours' or 'reference'"):
        TipAdapterConfig(preset="field")
    with pytest.raises(ValueError, match="selection='test'; valid: few_shot_val, full_val"):
        TipAdapterConfig(selection="test")


def _toy_data(seed: int = 0, views: int = 1, classes: int = 3, dim: int = 8, shots: int = 4) -> FewShotData:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    labels = torch.arange(classes).repeat_interleave(shots)

    def split(v: int) -> SplitFeatures:
        return SplitFeatures(labels=labels, pooled=centres[labels] + torch.randn(v, len(labels), dim, generator=g))

    head = ClipHead(classifier=torch.nn.functional.normalize(torch.randn(dim, classes, generator=g), dim=0),
                    logit_scale=100.0)
    return FewShotData(train=split(views), val=split(1), head=head, seed=1)


def test_a_method_refuses_an_unresolved_reference_preset():
    with pytest.raises(ValueError, match="resolve it first"):
        TipAdapter(TipAdapterConfig(preset="reference")).fit(_toy_data())


# --- lpclip ---------------------------------------------------------------------------------------

def test_lpclip_fits_raw_features_and_keeps_the_last_bisection_winner():
    data = _toy_data(seed=3)
    probe = LinearProbe().fit(data)
    c = probe.chosen["C"]
    assert c == probe.chosen["bisection"][-1]["C"]
    x = data.train.pooled[0].double().numpy()  # raw: not normalised
    reference = LogisticRegression(C=c, max_iter=1000).fit(x, data.train.labels.numpy())
    np.testing.assert_allclose(probe._model.coef_, reference.coef_, rtol=1e-6, atol=1e-8)


def test_lpclip_coarse_ties_go_to_the_larger_c():
    """Separable toy data: every C reaches 100 % on validation, so lpclip's argmax picks 1e6."""
    probe = LinearProbe().fit(_toy_data(seed=4))
    assert all(row["val_acc"] == 100.0 for row in probe.chosen["coarse"])
    assert probe.chosen["bisection"][0]["C_right"] == pytest.approx(1e7)


def test_lpclip_refuses_augmented_views():
    with pytest.raises(ValueError, match="one un-augmented view"):
        LinearProbe().fit(_toy_data(views=3))


# --- under sl.run on the mini world -----------------------------------------------------------------

MINI = dict(dataset="miniworld_shape_largest", dataset_options={"per_class": [4, 3, 5]}, backbone="miniclip",
            weights="shipped", train_views=2)


@pytest.fixture(scope="module")
def miniclip():
    from safelib.clip.miniclip import CHECKPOINT

    if not CHECKPOINT.is_file():
        pytest.skip("the mini-CLIP checkpoint is not shipped in this checkout")
    return sl.load_clip("miniclip", "shipped")


def _run(tmp_path, miniclip, **changes):
    values = dict(MINI, shots=2, seed=1, cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "runs"))
    values.update(changes)
    return run(RunConfig(**values), clip=miniclip, return_method=True)


def test_the_run_caches_one_eval_view_of_the_train_images_for_lpclip(tmp_path, miniclip):
    record, fitted = _run(tmp_path, miniclip, method="linear_probe")
    assert fitted.splits["train"].num_views == 1
    eval_train = sl.features.extract.cache_image_features(
        miniclip, fitted.train_set, str(tmp_path / "cache"), split="train", kind="pooled", views=0,
        dataset="miniworld_shape_largest", dataset_options='{"per_class": [4, 3, 5]}')
    torch.testing.assert_close(torch.tensor(np.asarray(fitted.splits["train"].pooled[0])),
                               torch.tensor(np.asarray(eval_train[0])))


def test_the_record_names_the_resolved_preset_and_full_val_selection(tmp_path, miniclip):
    record, fitted = _run(tmp_path, miniclip, method="tip_adapter_f",
                          method_config={"preset": "reference", "selection": "full_val", "epochs": 1})
    preset = record["preset"]
    assert preset["preset_dataset"] == "imagenet" and preset["init_alpha"] == 1.17
    assert preset["train_epoch"] == 1  # set by hand: wins over the preset's 20
    assert preset["selection_used"] == "full_val" and record["num_images"]["val"] == 6 * 3  # the whole val split
    assert len(fitted.val_set) == 18 and record["config"]["method_config"]["preset"] == "reference"
