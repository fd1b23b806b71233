"""SAFE: fine-tune only CLIP's attention pooling on cached dense maps, then blend at inference.

The trunk is frozen, so training reads dense maps (V augmented views x N x C x H x W) from the
cache and runs only ``attention_pool`` (the exact, fast one-query form) forwards and backwards:

    f_ft   = attention_pool(trainable copy of attnpool, dense)         N x D
    loss   = CE(logit_scale * cos(f, W_text), y),   f = f_ft  (or the blend with f_orig)
    test:  f = normalize(blend * n(f_ft) + (1 - blend) * n(f_orig)),  blend chosen on validation

The paper's abstract fixes the idea; its full text was not available to us, so every other
choice below (which tensors train, the loss target, optimiser, schedule, epochs, learning rate)
is ours and named in ``SafeConfig``, so each can be varied.
Taught in the book's "SAFE, step by step" chapter (notebooks/02_safe.ipynb).
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..clip.attnpool import attention_pool
from ..clip.text import zero_shot_classifier
from ..features.augment import FEATURE_AUGMENTS, augment_generator, augment_maps
from ..features.extract import pooled_features
from ..features.maps import DenseMaps, MapsLike
from .base import FewShotData, FewShotMethod, FieldChecks, MethodConfig, SplitFeatures, check_epoch, loss_warnings
from .background import BackgroundPool, background_text
from .blend import BLEND_BY, DEFAULT_BLEND_GRID, blend_features, blended_logits, choose_blend, class_logits, fixed_blend
from .blend import sweep_blend

# Trainable tensor sets, by attnpool submodule / parameter name prefix.
TRAINABLE_SETS: dict[str, tuple[str, ...]] = {
    "all": ("positional_embedding", "q_proj", "k_proj", "v_proj", "c_proj"),
    "attention": ("positional_embedding", "q_proj", "k_proj"),  # where the pooling looks
    "values": ("v_proj", "c_proj"),                             # what it reads out
    "positional": ("positional_embedding",),                    # the ablations' smallest sets
    "query": ("q_proj",),
}
# The key bias adds the same score to every token, so softmax cancels it: it never learns.
INERT = ("k_proj.bias",)
LOSS_TARGETS = ("finetuned", "blended")
DECAY_TARGETS = ("zero", "pretrained")
SAFE_PRESETS = ("ours", "raft")  # "raft": RAFT's recipe, filled in by safelib.methods.presets.resolve_preset
# RAFT's fixed weights of its background terms (train_datasets.py: tau2 = 3, lambda1 = 0.1)
BACKGROUND_TEMPERATURE = 3.0
SEPARATION_WEIGHT = 0.1
BACKGROUND_PROMPT = "the background of {}."


@dataclass(frozen=True)
class SafeConfig(MethodConfig):
    """SAFE's choices. All defaults are ours (the paper's full text was not available).

    epochs, lr, batch_size: AdamW with a cosine schedule over ``epochs`` passes, one random cached
        view of each image per pass.
    weight_decay, decay_to: decoupled decay (0 by default) towards zero or the pretrained weights.
    trainable: which attnpool tensors learn (a key of ``TRAINABLE_SETS``).
    loss_on: "finetuned" trains f_ft alone; "blended" trains the blend with ``train_blend``.
    blend: a fixed inference blend, or None to choose it on validation from ``blend_grid``.
    amp: mixed precision (fp16 autocast + grad scaling), used only on CUDA.
    feature_augment: views drawn from the cached maps while training (``safelib.features.augment``):
        "none", "flip", "crop" or "flip+crop"; lets one cached view per image stand in for K.

    Knobs notebooks/06_ablations varies; their defaults leave SAFE as it was:
    consistency: weight of RAFT's L1 term between the fine-tuned logits and frozen CLIP's (0: off).
    background: RAFT's background query token, trained towards a "background" text class (cross-entropy
        at temperature 3) and away from the class feature (cosine, weight 0.1); see ``background.py``.
    ce_temperature: the class cross-entropy reads logits / T (RAFT: 2).
    lr_warmup_epochs, lr_min: a linear warm-up from 0 over that many epochs, then cosine to ``lr_min``.
    adam_eps: AdamW's epsilon (RAFT: 1e-4).
    blend_by: "features" (ours: mix unit features) or "logits" (RAFT: mix each pooling's logits).
    preset: "ours", or "raft" for RAFT's recipe (``safelib.methods.presets``; fields set by hand win).
    The seed is not here: it comes with the data (``FewShotData.seed``), shared by every method.

    epochs=30 and lr=1e-3 are what the mini-CLIP acceptance runs used (``safelib.experiments.miniclip_eval``);
    a first choice of 20 epochs at 1e-4 left SAFE under-trained there (about 60 steps at 16 shots:
    +8 points over zero-shot on the shape task instead of +16). They are not measured on OpenAI's
    RN50, whose weights are out of reach offline: sweep ``lr`` when you change backbone.
    """

    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 0.0
    decay_to: str = "zero"
    trainable: str = "all"
    loss_on: str = "finetuned"
    train_blend: float = 0.5
    blend: float | None = None
    blend_grid: tuple[float, ...] = DEFAULT_BLEND_GRID
    amp: bool = True
    feature_augment: str = "none"
    consistency: float = 0.0
    background: bool = False
    ce_temperature: float = 1.0
    lr_warmup_epochs: int = 0
    lr_min: float = 0.0
    adam_eps: float = 1e-8
    blend_by: str = "features"
    preset: str = "ours"

    @property
    def safe_config(self) -> "SafeConfig":
        """The SAFE training settings this config runs (itself; SAFE-A's configs return their nested one)."""
        return self

    def __post_init__(self) -> None:
        check = FieldChecks(self)
        if check.grid("blend_grid", low=0.0, high=1.0):
            object.__setattr__(self, "blend_grid", tuple(float(b) for b in self.blend_grid))
        for name in ("epochs", "batch_size"):
            check.integer(name, low=1)
        check.number("lr", above=0.0)
        check.number("weight_decay", low=0.0)
        check.choice("decay_to", DECAY_TARGETS)
        check.choice("trainable", TRAINABLE_SETS)
        check.choice("feature_augment", FEATURE_AUGMENTS)
        check.choice("loss_on", LOSS_TARGETS)
        check.number("train_blend", low=0.0, high=1.0)
        check.number("blend", low=0.0, high=1.0, optional=True)
        check.flag("amp")
        check.number("consistency", low=0.0)
        check.flag("background")
        check.number("ce_temperature", above=0.0)
        check.integer("lr_warmup_epochs", low=0)
        check.number("lr_min", low=0.0)
        check.number("adam_eps", above=0.0)
        check.choice("blend_by", BLEND_BY)
        check.choice("preset", (*SAFE_PRESETS, "raft:resolved"), "raft:resolved is what resolve_preset returns")
        if isinstance(self.lr_warmup_epochs, int) and isinstance(self.epochs, int) and self.lr_warmup_epochs > self.epochs:
            check.add(f"lr_warmup_epochs={self.lr_warmup_epochs} exceeds epochs={self.epochs}")
        if self.loss_on == "blended" and self.train_blend == 0:
            check.add("train_blend must be > 0 with loss_on='blended': at 0 the loss does not see the fine-tuned "
                      "pooling, so nothing would train")
        check.raise_any()


def trainable_attnpool(attnpool: nn.Module, trainable: str = "all") -> nn.Module:
    """A deep copy of ``attnpool`` in which exactly the tensors of set ``trainable`` require grad.

    ``k_proj.bias`` never does: it has no effect on the pooled feature (see ``INERT``).
    """
    if trainable not in TRAINABLE_SETS:
        raise ValueError(f"trainable={trainable!r}; valid: {', '.join(TRAINABLE_SETS)}")
    pool = copy.deepcopy(attnpool).train()
    prefixes = TRAINABLE_SETS[trainable]
    for name, param in pool.named_parameters():
        param.requires_grad_(name.split(".")[0] in prefixes and name not in INERT)
    return pool


def adamw(params: list[nn.Parameter], **options) -> torch.optim.AdamW:
    """AdamW, fused where this torch build supports it: RN50's attnpool has 14.8M parameters, and
    stepping them one tensor at a time costs more than the whole forward and backward on cached maps."""
    try:
        return torch.optim.AdamW(params, fused=True, **options)
    except (RuntimeError, TypeError):  # older torch, or a device without a fused kernel
        return torch.optim.AdamW(params, **options)


class SafeStep:
    """One SAFE optimiser step, and the state it updates: the trainable copy of ``attnpool`` (``pool``),
    AdamW, its cosine schedule over ``steps`` steps, and the fp16 gradient scaler.

    ``train_safe`` calls it once per batch; ``safelib.perf.calibration`` times it, so the planner's
    rates are those of this very step. A batch is B x C x H x W float32 on ``attnpool``'s device.
    """

    def __init__(self, attnpool: nn.Module, text_weights: Tensor, logit_scale: float, config: SafeConfig,
                 steps: int, warmup_steps: int = 0, background: Tensor | None = None):
        device = next(attnpool.parameters()).device
        self.original, self.logit_scale, self.config = attnpool, logit_scale, config
        self.text_weights = text_weights.to(device, torch.float32)
        self.pool = trainable_attnpool(attnpool, config.trainable)
        if config.background:  # RAFT: a background query, scored against K classes + "background"
            if background is None:
                raise ValueError("background=True needs the background text embedding (D); Safe computes it "
                                 "from the CLIP head's text tower")
            self.pool = BackgroundPool(self.pool)
            self.background_weights = torch.cat([self.text_weights, background.to(device, torch.float32)[:, None]], 1)
        self.trainable = [p for p in self.pool.parameters() if p.requires_grad]
        self.pretrained = [p.detach().clone() for p in self.trainable]
        self.use_amp = config.amp and device.type == "cuda"
        decay_in_adamw = config.weight_decay if config.decay_to == "zero" else 0.0
        self.optimizer = adamw(self.trainable, lr=config.lr, weight_decay=decay_in_adamw, eps=config.adam_eps)
        if warmup_steps or config.lr_min:
            self.schedule = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, warmup_cosine(config.lr, config.lr_min, steps, warmup_steps))
        else:  # ours: cosine to 0, no warm-up
            self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=steps)
        self.scaler = (torch.amp.GradScaler("cuda", enabled=self.use_amp) if hasattr(torch.amp, "GradScaler")
                       else torch.cuda.amp.GradScaler(enabled=self.use_amp))  # torch < 2.3

    def __call__(self, batch: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Forward, backward and update on one batch; returns its loss and logits B x K."""
        config = self.config
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.use_amp else contextlib.nullcontext()
        with autocast:
            if config.background:
                features, background = self.pool(batch)                                  # B x D each
            else:
                features = attention_pool(self.pool, batch)                              # B x D
            fine_tuned, original = features, None
            if config.loss_on == "blended":
                with torch.no_grad():
                    original = attention_pool(self.original, batch)
                if config.blend_by == "logits":
                    logits = blended_logits(features.float(), original.float(), self.text_weights,
                                            self.logit_scale, config.train_blend, "logits")
                else:
                    features = blend_features(features.float(), original.float(), config.train_blend)
            if config.loss_on != "blended" or config.blend_by != "logits":
                logits = class_logits(features.float(), self.text_weights, self.logit_scale)  # B x K
            loss = F.cross_entropy(logits if config.ce_temperature == 1 else logits / config.ce_temperature, target)
            if config.consistency:  # RAFT's L1 towards frozen CLIP's logits, on the fine-tuned logits
                if original is None:
                    with torch.no_grad():
                        original = attention_pool(self.original, batch)
                tuned_logits = logits if config.loss_on != "blended" else class_logits(
                    fine_tuned.float(), self.text_weights, self.logit_scale)
                clip_logits = class_logits(original.float(), self.text_weights, self.logit_scale)
                loss = loss + config.consistency * F.l1_loss(tuned_logits, clip_logits)
            if config.background:  # RAFT's background cross-entropy and its separation term
                background_logits = class_logits(background.float(), self.background_weights, self.logit_scale)
                background_class = torch.full_like(target, self.text_weights.shape[1])
                loss = loss + F.cross_entropy(background_logits / BACKGROUND_TEMPERATURE, background_class)
                loss = loss + SEPARATION_WEIGHT * (F.cosine_similarity(fine_tuned.float(), background.float()).mean() - 1)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if config.weight_decay and config.decay_to == "pretrained":
            lr = self.optimizer.param_groups[0]["lr"]
            with torch.no_grad():  # decoupled, like AdamW's, but pulling towards CLIP's weights
                for p, p0 in zip(self.trainable, self.pretrained):
                    p.sub_(lr * config.weight_decay * (p - p0))
        self.schedule.step()
        return loss, logits


def warmup_cosine(lr: float, lr_min: float, steps: int, warmup_steps: int):
    """The factor of ``lr`` at each step (``LambdaLR``): RAFT's ``my_scheduler``, a linear warm-up from 0
    to ``lr`` over ``warmup_steps`` steps (``linspace(0, lr, warmup_steps)``), then a cosine from ``lr``
    to ``lr_min`` over the remaining steps."""
    cosine_steps = max(steps - warmup_steps, 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / (warmup_steps - 1) if warmup_steps > 1 else 0.0
        done = min(step - warmup_steps, cosine_steps)
        return (lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * done / cosine_steps))) / lr

    return factor


@dataclass
class SafeTraining:
    """What ``train_safe`` returns: the fine-tuned pooling and how training went."""

    attnpool: nn.Module
    losses: list[float] = field(default_factory=list)      # mean train loss per epoch
    accuracies: list[float] = field(default_factory=list)  # train accuracy per epoch, in percent
    seconds: float = 0.0


def train_safe(attnpool: nn.Module, dense: MapsLike, labels: Tensor, text_weights: Tensor,
               logit_scale: float, config: SafeConfig | None = None, seed: int = 1,
               progress: bool = False, method: str = "safe", background: Tensor | None = None) -> SafeTraining:
    """Fine-tune a copy of ``attnpool`` on cached dense maps; ``attnpool`` itself is left untouched.

    dense: views x N x C x H x W, a ``DenseMaps`` or anything ``DenseMaps.of`` takes (a tensor
    anywhere, a ``CacheEntry``); training runs on ``attnpool``'s device. Each epoch shows every
    image once, through a cached view drawn at random. Deterministic under ``seed`` on a CPU.
    A non-finite loss or weight after an epoch raises `TrainingDivergedError` naming ``method``.
    ``background``: the background text embedding (D) that ``config.background`` needs.
    """
    config = SafeConfig() if config is None else config
    maps = DenseMaps.of(dense)
    n = maps.num_images
    if labels.ndim != 1 or len(labels) != n:
        raise ValueError(f"labels must be N={n} class indices, got shape {tuple(labels.shape)}")
    device = next(attnpool.parameters()).device
    labels = labels.to(device)
    steps_per_epoch = -(-n // config.batch_size)
    step = SafeStep(attnpool, text_weights, logit_scale, config, steps=config.epochs * steps_per_epoch,
                    warmup_steps=config.lr_warmup_epochs * steps_per_epoch, background=background)
    generator = torch.Generator().manual_seed(seed)
    augment_rng = augment_generator(seed)  # its own stream: "none" draws exactly as before
    result = SafeTraining(step.pool)
    start_time = time.perf_counter()
    for epoch in tqdm(range(config.epochs), desc="SAFE epochs", disable=not progress):
        order = torch.randperm(n, generator=generator)
        view_of_row = torch.randint(maps.num_views, (n,), generator=generator)  # a fresh cached view per image
        total_loss, correct = 0.0, 0
        for rows, batch in maps.epoch_batches(order, view_of_row, config.batch_size, device):  # B x C x H x W
            target = labels[rows.to(device)]
            loss, logits = step(augment_maps(batch, config.feature_augment, augment_rng), target)
            total_loss += loss.item() * len(rows)
            correct += int((logits.argmax(-1) == target).sum())
        result.losses.append(total_loss / n)
        result.accuracies.append(100.0 * correct / n)
        check_epoch(method, epoch + 1, config.epochs, result.losses[-1], step.trainable, lr=config.lr,
                    weight_decay=config.weight_decay, amp=step.use_amp)
    result.seconds = time.perf_counter() - start_time
    step.pool.eval()
    for p in step.pool.parameters():
        p.requires_grad_(False)
    return result


def pool_with_both(pool_ft: nn.Module, pool_orig: nn.Module, dense: Tensor,
                   batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """Fine-tuned and original features N x D of dense maps N x C x H x W: one pass of each pooling."""
    if isinstance(pool_ft, BackgroundPool):  # RAFT's pooling: its class query's features
        return pool_ft.pooled_features(dense, batch_size), pooled_features(pool_orig, dense, batch_size)
    return pooled_features(pool_ft, dense, batch_size), pooled_features(pool_orig, dense, batch_size)


def safe_features(pool_ft: nn.Module, pool_orig: nn.Module, dense: Tensor, blend: float,
                  batch_size: int = 512) -> Tensor:
    """SAFE's blended unit features N x D of dense maps N x C x H x W (any dtype, any device)."""
    f_ft, f_orig = pool_with_both(pool_ft, pool_orig, dense, batch_size)
    return blend_features(f_ft.float(), f_orig.float(), blend)


def safe_logits(pool_ft: nn.Module, pool_orig: nn.Module, dense: Tensor, text_weights: Tensor,
                logit_scale: float, blend: float, batch_size: int = 512, blend_by: str = "features") -> Tensor:
    """SAFE's prediction, the one path ``Safe`` and ``SafeClassifier`` share: logits N x K of dense maps
    (``blend_by="logits"``: RAFT's mix of the two poolings' logits instead of their features)."""
    if blend_by == "logits":
        f_ft, f_orig = pool_with_both(pool_ft, pool_orig, dense, batch_size)
        return blended_logits(f_ft.float(), f_orig.float(), text_weights, logit_scale, blend, "logits")
    features = safe_features(pool_ft, pool_orig, dense, blend, batch_size)
    return class_logits(features, text_weights.to(features.device), logit_scale)


class Safe(FewShotMethod):
    """SAFE as a few-shot method: train on ``data.train.dense``, choose ``blend`` on ``data.val``."""

    name = "safe"
    config_class = SafeConfig
    feature_kind = "dense"  # SAFE pools the cached dense maps itself

    def _fit(self, data: FewShotData) -> None:
        head = data.head
        if head.attnpool is None:
            raise ValueError("SAFE needs the original attnpool: build the ClipHead with attnpool=clip.attnpool")
        for split_name, split in (("train", data.train), ("val", data.val)):
            if split.dense is None:
                raise ValueError(f"SAFE trains and selects on dense maps, but the {split_name} split has only "
                                 "pooled features: cache it with kind='dense'")
        config = self.config
        if config.preset == "raft":
            raise ValueError(f"{self.name}: preset='raft' is filled in by safelib.methods.presets.resolve_preset "
                             "(sl.run does this); resolve it first")
        background = None
        if config.background:
            if head.clip is None or not head.classnames:
                raise ValueError("background=True encodes RAFT's background prompt: build the ClipHead with clip= "
                                 "and classnames= (sl.run does)")
            background = background_text(zero_shot_classifier(head.clip, head.classnames, [BACKGROUND_PROMPT]))
        self.training = train_safe(head.attnpool, data.train.dense, data.train.labels, head.classifier,
                                   head.logit_scale, config, seed=data.seed, method=self.name, background=background)
        self.training_warnings += loss_warnings(self.name, self.training.losses, head.num_classes)
        self.original, self.head = head.attnpool, head
        if config.blend is not None:
            self.blend = fixed_blend(config.blend)
        else:
            f_ft, f_orig = self.pool_both(data.val.dense.eval_view())
            self.blend = choose_blend(f_ft, f_orig, data.val.labels, head.classifier, head.logit_scale,
                                      config.blend_grid, by=config.blend_by)
        self.chosen = {"blend": self.blend.as_record(), "train_losses": self.training.losses,
                       "train_seconds": self.training.seconds}

    def pool_both(self, dense: Tensor) -> tuple[Tensor, Tensor]:
        """Fine-tuned and original features N x D of dense maps N x C x H x W: one pass each."""
        return pool_with_both(self.training.attnpool, self.original, dense)

    def _predict(self, test: SplitFeatures) -> Tensor:
        if test.dense is None:
            raise ValueError("SAFE pools dense maps; the test split has only pooled features (cache kind='dense')")
        return safe_logits(self.training.attnpool, self.original, test.dense.eval_view(), self.head.classifier,
                           self.head.logit_scale, self.blend.blend, blend_by=self.config.blend_by)

    def attention_pools(self) -> tuple[nn.Module, nn.Module] | None:
        """(fine-tuned, original) attention poolings, for measuring where each looks; None for RAFT's
        background pooling, whose class query also attends to an extra token."""
        if not self.fitted:
            raise RuntimeError(f"{self.name}: call fit(data) before attention_pools")
        if isinstance(self.training.attnpool, BackgroundPool):
            return None
        return self.training.attnpool, self.original

    def blend_sweep_accuracy(self, split: SplitFeatures, classes: Tensor | None = None) -> list[dict]:
        """Accuracy (percent) at every blend of ``blend_grid`` on a labelled split, e.g. the test split, for
        the fixed-blend variants of notebooks/06_ablations without retraining. Never for choosing anything:
        the blend is chosen on validation in ``fit``. ``classes``: the logit columns scored (None: all)."""
        if not self.fitted:
            raise RuntimeError(f"{self.name}: call fit(data) before blend_sweep_accuracy")
        f_ft, f_orig = self.pool_both(split.dense.eval_view())
        weights = self.head.classifier if classes is None else self.head.classifier[:, classes.to(self.head.classifier.device)]
        points = sweep_blend(f_ft, f_orig, split.labels, weights, self.head.logit_scale, self.config.blend_grid,
                             self.config.blend_by)
        return [{"blend": p.blend, "accuracy": p.accuracy} for p in points]

