"""The field's settings as data, and the one function that turns a method's ``preset`` into them.

Each baseline takes ``preset``: ``"ours"`` (the default: the settings this library chose and
documents in each method) or ``"reference"`` (the settings of the method's own repository for the
run's dataset). Methods never see the dataset's name, so the *run* resolves the preset with
:func:`resolve_preset` (``sl.run`` does) and records the resolved settings under the reference's
own names (Tip-Adapter: ``search_scale = [beta_max, alpha_max]``, ``search_step``,
``init_alpha``, ``init_beta``). Fields set by hand win over a preset: a preset only fills fields
still at ours' default value. A dataset the references never ran (the mini world, textile,
skimage, ...) gets the reference's ImageNet settings, and the record says so.

The resolution itself is :func:`safelib.methods.presets.resolve_preset`; this module holds the
numbers only, so every method's config can import its checks without a cycle.

Sources (the numbers are facts read from these files; the code is ours):
  Tip-Adapter  gaopengcuhk/Tip-Adapter@d0e2d6f ``configs/<dataset>.yaml`` (search_scale,
               search_step, init_beta, init_alpha, lr, augment_epoch, train_epoch), grid built in
               ``utils.py:103-104``: ``v_i = i * (max - 0.1) / step + 0.1`` for ``i < step``.
  CoOp         KaiyangZhou/CoOp@ff61507 ``configs/trainers/CoOp/rn50{,_ep50,_ep100}.yaml``,
               shots -> config in ``COOP.md:18-22`` (ImageNet: ``*_ep50`` for every shot count,
               ``COOP.md:13``), context in ``train.py:91-95`` and ``trainers/coop.py:90``;
               SGD momentum 0.9, weight decay 5e-4 and crop scale 0.08-1 are Dassl's defaults
               (KaiyangZhou/Dassl.pytorch ``dassl/config/defaults.py:40,153-154``).
  CLIP-Adapter gaopengcuhk/CLIP-Adapter@08d07f8 ``clip_adapter.py:104`` (ratio 0.2), trained in
               CoOp's trainer (``README.md:11,14``): CoOp's ``rn50.yaml`` recipe (200 epochs).
  Linear probe CoOp ``lpclip/feat_extractor.py:131,155`` (one un-augmented view, raw features),
               ``lpclip/linear_probe.py:25,54-118`` (val shots, C search).
  RAFT         WideStars/RA-FT@dcf5115 ``trainer.py`` (losses, AdamW eps 1e-4, ``my_scheduler`` with
               10 warm-up epochs, final lr 1e-6), ``train_datasets.py`` (lambda1 0.1, lambda2 0.5,
               tau1 2, tau2 3), ``configs/<dataset>.yaml`` (lr 1e-4, 50 epochs, batch 64, alpha
               searched in 50 steps over [0, 1]), ``eval.py`` (logit fusion), ``clip/MyPooling.py``
               (background query), ``utils.py:clip_classifier`` (background prompt). AdamW's
               weight decay is torch's default, 0.01 (the optimiser is built without one).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import MethodConfig

TIP_ADAPTER_REPO = "gaopengcuhk/Tip-Adapter@d0e2d6f"
COOP_REPO = "KaiyangZhou/CoOp@ff61507"
CLIP_ADAPTER_REPO = "gaopengcuhk/CLIP-Adapter@08d07f8"
DASSL_REPO = "KaiyangZhou/Dassl.pytorch@c61a1b5"
FALLBACK_DATASET = "imagenet"  # what "reference" means on a dataset the references never ran
PRESETS = ("ours", "reference")
SELECTIONS = ("few_shot_val", "full_val")
# Method-config fields added with the presets, and the values that give the earlier behaviour.
LATER_FIELDS = {"preset": "ours", "selection": "few_shot_val", "trainer": "adamw", "feature_augment": "none",
                # SAFE's ablation knobs (issue 14)
                "consistency": 0.0, "background": False, "ce_temperature": 1.0, "lr_warmup_epochs": 0,
                "lr_min": 0.0, "adam_eps": 1e-8, "blend_by": "features"}

RAFT_REPO = "WideStars/RA-FT@dcf5115"
# RAFT's recipe as SafeConfig fields (the preset "raft"); see the module docstring for the sources.
RAFT = {
    "trainable": "all", "background": True, "consistency": 0.5, "ce_temperature": 2.0,
    "lr": 1e-4, "adam_eps": 1e-4, "weight_decay": 0.01, "epochs": 50, "lr_warmup_epochs": 10, "lr_min": 1e-6,
    "batch_size": 64, "blend_by": "logits", "blend_grid": tuple(round(i / 50, 2) for i in range(51)),
}
RAFT_NOTE = ("RAFT's class prompts are GPT-3 descriptions we do not ship: our prompt templates are used; its "
             "background prompt is 'the background of {}.'; its augmentation (RandomResizedCrop 0.8-1 + flip per "
             "epoch) is this run's cached train views; ties in the alpha search go to the lower validation "
             "cross-entropy, then nearer 0.5 (RAFT: the lowest alpha)")


def reference_grid(maximum: float, steps: int) -> tuple[float, ...]:
    """Tip-Adapter's search grid ``i * (max - 0.1) / steps + 0.1`` for ``i < steps`` (end point excluded)."""
    return tuple(round(i * (maximum - 0.1) / steps + 0.1, 6) for i in range(steps))


@dataclass(frozen=True)
class TipAdapterSettings:
    """One ``configs/<dataset>.yaml`` of Tip-Adapter, under its own field names."""

    search_scale: tuple[float, float]  # [beta_max, alpha_max]
    search_step: tuple[int, int]  # [beta steps, alpha steps]
    init_alpha: float
    init_beta: float
    lr: float
    augment_epoch: int
    train_epoch: int
    source: str

    @property
    def betas(self) -> tuple[float, ...]:
        return reference_grid(self.search_scale[0], self.search_step[0])

    @property
    def alphas(self) -> tuple[float, ...]:
        return reference_grid(self.search_scale[1], self.search_step[1])


def _tip(file: str, scale: tuple[float, float], init_alpha: float, train_epoch: int = 20) -> TipAdapterSettings:
    return TipAdapterSettings(search_scale=scale, search_step=(200, 20), init_alpha=init_alpha, init_beta=1.0,
                              lr=0.001, augment_epoch=10, train_epoch=train_epoch,
                              source=f"{TIP_ADAPTER_REPO} configs/{file}")


# Keyed by our dataset names (Tip-Adapter calls FGVC-Aircraft "fgvc").
TIP_ADAPTER: dict[str, TipAdapterSettings] = {
    "imagenet": _tip("imagenet.yaml", (7, 3), 1.17),
    "caltech101": _tip("caltech101.yaml", (12, 5), 3),
    "oxford_pets": _tip("oxford_pets.yaml", (7, 3), 1.17),
    "stanford_cars": _tip("stanford_cars.yaml", (20, 10), 3),
    "oxford_flowers": _tip("oxford_flowers.yaml", (50, 50), 10),
    "food101": _tip("food101.yaml", (10, 10), 1.17),
    "fgvc_aircraft": _tip("fgvc.yaml", (30, 30), 5),
    "sun397": _tip("sun397.yaml", (12, 10), 1.17),
    "dtd": _tip("dtd.yaml", (13, 13), 2),
    "eurosat": _tip("eurosat.yaml", (12, 10), 2, train_epoch=100),
    "ucf101": _tip("ucf101.yaml", (7, 3), 3),
}


@dataclass(frozen=True)
class CoopSettings:
    """CoOp's prompt learner and its trainer (RN50, M=16, end, generic context)."""

    n_ctx: int = 16
    class_token_position: str = "end"
    init_std: float = 0.02
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 32
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    crop_scale: tuple[float, float] = (0.08, 1.0)
    source: str = (f"{COOP_REPO} configs/trainers/CoOp/rn50*.yaml, COOP.md:13-22, trainers/coop.py:90; "
                   f"{DASSL_REPO} dassl/config/defaults.py:40,153-154")


COOP = CoopSettings()
COOP_IMAGENET_EPOCHS = 50  # COOP.md:13: ImageNet uses *_ep50.yaml at every shot count


def coop_epochs(shots: int, dataset: str | None = None) -> int:
    """CoOp's epochs: 50 at 1 shot (rn50_ep50), 100 at 2-4 (rn50_ep100), 200 at 8+ (rn50); ImageNet 50.

    Shot counts the field does not use fall to the config of the nearest lower one (3 -> 100).
    """
    if dataset == "imagenet":
        return COOP_IMAGENET_EPOCHS
    return 50 if shots < 2 else 100 if shots < 8 else 200


@dataclass(frozen=True)
class ClipAdapterSettings:
    """CLIP-Adapter's fixed ratio, trained with CoOp's RN50 trainer config."""

    ratio: float = 0.2
    optimizer: str = "sgd"
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 200
    batch_size: int = 32
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    source: str = (f"{CLIP_ADAPTER_REPO} clip_adapter.py:104, README.md:11-14; "
                   f"{COOP_REPO} configs/trainers/CoOp/rn50.yaml; {DASSL_REPO} dassl/config/defaults.py:153-154")


CLIP_ADAPTER = ClipAdapterSettings()


@dataclass(frozen=True)
class LpclipSettings:
    """CoOp's linear-probe protocol (the "Linear probe CLIP" rows)."""

    coarse_c: tuple[float, ...] = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)
    num_step: int = 8
    max_iter: int = 1000
    source: str = f"{COOP_REPO} lpclip/feat_extractor.py:131,155, lpclip/linear_probe.py:25,54-118"


LPCLIP = LpclipSettings()


def tip_adapter_settings(dataset: str | None) -> tuple[TipAdapterSettings, str]:
    """The reference settings for ``dataset`` and the dataset they were written for (ImageNet's
    where the reference never ran ``dataset``)."""
    if dataset in TIP_ADAPTER:
        return TIP_ADAPTER[dataset], dataset
    return TIP_ADAPTER[FALLBACK_DATASET], FALLBACK_DATASET


def reference_label(dataset: str | None) -> str:
    """``preset`` after resolution: ``"reference:<dataset whose settings were used>"``."""
    return f"reference:{dataset if dataset in TIP_ADAPTER else FALLBACK_DATASET}"


def preset_problem(preset: str) -> str | None:
    """What is wrong with a ``preset`` value, or None. Allowed: "ours", "reference", or a resolved
    "reference:<dataset>" (what a run records)."""
    if not isinstance(preset, str) or not (preset in PRESETS or preset.startswith("reference:")):
        return (f"preset must be 'ours' or 'reference' (the reference repository's settings for the "
                f"run's dataset), got {preset!r}")
    return None


def check_preset(preset: str) -> None:
    """Raise ``ValueError`` for a ``preset`` that `preset_problem` refuses."""
    problem = preset_problem(preset)
    if problem:
        raise ValueError(problem)


def require_resolved(config: MethodConfig, method: str) -> None:
    """A method refuses an unresolved ``preset="reference"``: only the run knows the dataset."""
    if getattr(config, "preset", "ours") == "reference":
        raise ValueError(
            f"{method}: preset='reference' depends on the dataset; resolve it first with "
            "safelib.methods.presets.resolve_preset(config, dataset, shots) (sl.run does this)"
        )


# The method configs that select each baseline's reference preset (a notebook's settings="reference").
REFERENCE_METHOD_CONFIGS: dict[str, dict] = {
    "tip_adapter": {"preset": "reference"},
    "tip_adapter_f": {"preset": "reference"},
    "clip_adapter": {"preset": "reference"},
    "coop": {"preset": "reference"},
    "safe_a_tip": {"adapter": {"preset": "reference"}},
    "safe_a_clip_adapter": {"adapter": {"preset": "reference"}},
}


def reference_method_configs(methods: list[str]) -> dict[str, dict]:
    """``method_configs`` for ``run_grid`` that run each of ``methods`` with its reference preset
    (methods without one, e.g. SAFE and zero-shot, keep their defaults)."""
    return {m: dict(REFERENCE_METHOD_CONFIGS[m]) for m in methods if m in REFERENCE_METHOD_CONFIGS}
