"""The one small interface every few-shot method follows, and the data it reads.

Every method in the book (zero-shot, linear probe, CLIP-Adapter, Tip-Adapter, SAFE, SAFE-A) is
fitted on the same few-shot train split and few-shot validation split and then predicts logits
for a test split it has never seen. Making that the *only* way in keeps the comparison honest:
`fit` cannot see test data, so no hyperparameter can be chosen on it (Tip-Adapter's published
numbers were; ours are not).

Inputs are features from the shared cache, never images: the frozen trunk runs once per image
view, so every method here costs seconds. A split carries the original attention-pooled
features (``V x N x D``), the dense maps below the pooling (``V x N x C x H x W``), or both;
a method that needs only pooled features asks for them with :meth:`FewShotData.pooled` and gets
them computed from dense maps when only those were cached.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..features.cache import stack_views
from ..clip.text import class_logits
from ..features.extract import pooled_features
from ..features.maps import DenseMaps

__all__ = [
    "SplitFeatures",
    "ClipHead",
    "FewShotData",
    "FewShotMethod",
    "MethodConfig",
    "FieldChecks",
    "TrainingDivergedError",
    "TrainingWarning",
    "check_epoch",
    "loss_warnings",
    "accuracy",
    "select_best",
    "validation_scores",
    "best_index",
]


@dataclass(frozen=True)
class SplitFeatures:
    """One split (train, val or test) as the feature cache holds it.

    ``pooled`` are the *original* attnpool outputs, unnormalised, one slice per image view:
    the train split carries the K augmented views, val and test one eval view each.
    ``dense`` are the frozen trunk's maps for the same views; SAFE trains on them.
    Either may be absent, not both. ``pooled`` is a tensor ``V x N x D`` on any device and in any
    float dtype (the cache stores fp16); per-view arrays (a ``CacheEntry``) are read into one once.
    ``dense`` is a ``DenseMaps``; anything ``DenseMaps.of`` takes (a tensor, a ``CacheEntry``,
    per-view arrays) is converted once, here, so memory-mapped maps need not fit in RAM.
    Methods cast to float32 where they compute.
    """

    labels: Tensor  # N, int64 class indices
    pooled: Tensor | None = None  # V x N x D
    dense: DenseMaps | None = None  # V x N x C x H x W

    def __post_init__(self) -> None:
        if not isinstance(self.labels, Tensor) or self.labels.ndim != 1:
            raise ValueError(f"labels must be a 1-D tensor of class indices, got {_describe(self.labels)}")
        if self.labels.dtype.is_floating_point or self.labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got dtype {self.labels.dtype}")
        if self.pooled is None and self.dense is None:
            raise ValueError("a split needs pooled features (V x N x D) or dense maps (V x N x C x H x W); got neither")
        n = self.labels.shape[0]
        if self.pooled is not None:
            pooled = self.pooled if isinstance(self.pooled, Tensor) else stack_views(self.pooled)
            if pooled.ndim != 3 or pooled.shape[1] != n:
                raise ValueError(f"pooled must be views x N x D with N = {n} labels, got shape {tuple(pooled.shape)}")
            object.__setattr__(self, "pooled", pooled)
        if self.dense is not None:
            dense = DenseMaps.of(self.dense)
            if dense.num_images != n:
                raise ValueError(f"dense must be views x N x C x H x W with N = {n} labels, got shape {dense.shape}")
            object.__setattr__(self, "dense", dense)
        if self.pooled is not None and self.dense is not None and self.pooled.shape[0] != self.dense.num_views:
            raise ValueError(
                f"pooled and dense must carry the same views, got {self.pooled.shape[0]} and {self.dense.num_views}"
            )

    @property
    def num_views(self) -> int:
        return self.pooled.shape[0] if self.pooled is not None else self.dense.num_views

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def permuted_labels(self, generator: torch.Generator | None = None) -> "SplitFeatures":
        """The same features with shuffled labels: the leakage check's control."""
        order = torch.randperm(len(self), generator=generator)
        return SplitFeatures(labels=self.labels[order.to(self.labels.device)], pooled=self.pooled, dense=self.dense)


@dataclass(frozen=True)
class ClipHead:
    """What every method shares from the frozen CLIP: the text classifier and its temperature.

    ``attnpool`` is the model's original (frozen) attention pooling; it is needed only to pool
    dense maps (SAFE, or a cache that holds dense maps only). ``clip`` is the frozen
    ``safelib.clip.ClipModel`` (text tower and tokenizer), for methods that encode prompts of
    their own (CoOp); the run fills it.
    """

    classifier: Tensor  # D x K, unit-norm columns (prompt-ensemble text embeddings)
    logit_scale: float
    attnpool: nn.Module | None = None
    classnames: tuple[str, ...] = ()
    clip: Any = field(default=None, repr=False, compare=False)  # a ClipModel, or None

    def __post_init__(self) -> None:
        if not isinstance(self.classifier, Tensor) or self.classifier.ndim != 2:
            raise ValueError(f"classifier must be a D x K tensor, got {_describe(self.classifier)}")
        if not (isinstance(self.logit_scale, (int, float)) and math.isfinite(self.logit_scale) and self.logit_scale > 0):
            raise ValueError(f"logit_scale must be a positive finite float (CLIP's is 100), got {self.logit_scale!r}")
        if self.classnames and len(self.classnames) != self.num_classes:
            raise ValueError(
                f"classnames has {len(self.classnames)} names but the classifier has {self.num_classes} columns"
            )

    @property
    def num_classes(self) -> int:
        return int(self.classifier.shape[1])

    @property
    def embed_dim(self) -> int:
        return int(self.classifier.shape[0])

    def text_logits(self, features: Tensor) -> Tensor:
        """Zero-shot logits of unit-norm features: ``logit_scale * f @ W``."""
        return class_logits(features, self.classifier, self.logit_scale, normalize=False)  # N x K


@dataclass(frozen=True)
class FewShotData:
    """Everything `fit` may see: the few-shot train and validation splits, the CLIP head, a seed.

    There is deliberately no test split here.
    """

    train: SplitFeatures
    val: SplitFeatures
    head: ClipHead
    seed: int = 1
    pool_batch: int = field(default=256, repr=False)

    def __post_init__(self) -> None:
        for name in ("train", "val"):
            split = getattr(self, name)
            if not isinstance(split, SplitFeatures):
                raise TypeError(f"{name} must be a SplitFeatures, got {type(split).__name__}")
            bad = split.labels[(split.labels < 0) | (split.labels >= self.head.num_classes)]
            if bad.numel():
                raise ValueError(
                    f"{name} labels must lie in 0..{self.head.num_classes - 1} (the classifier's columns); "
                    f"found {bad[0].item()}"
                )
        if self.val.num_views != 1:
            raise ValueError(f"val must carry exactly one (eval) view, got {self.val.num_views}")

    def pooled(self, split: SplitFeatures) -> Tensor:
        """``V x N x D`` original pooled features of a split, from the cache or pooled from dense maps."""
        return pool_split(split, self.head, self.pool_batch)


def pool_split(split: SplitFeatures, head: ClipHead, batch: int = 256) -> Tensor:
    """The split's original pooled features ``V x N x D``, pooling its dense maps if only those exist.

    They come back on the text classifier's device: methods compute where ``W`` lives, so a run
    on a GPU trains its adapters there even though the cache is read from disk.
    """
    device = head.classifier.device
    if split.pooled is not None:
        return split.pooled.to(device)
    if head.attnpool is None:
        raise ValueError("this split has only dense maps; pooling them needs ClipHead(attnpool=...)")
    maps = split.dense
    views = [pooled_features(head.attnpool, maps.view(v), batch) for v in range(maps.num_views)]
    return torch.stack(views).to(device)


def eval_view(pooled: Tensor) -> Tensor:
    """The single eval view of a val/test split's pooled features: ``1 x N x D -> N x D``.

    Dense maps have theirs as ``DenseMaps.eval_view()``.
    """
    if pooled.shape[0] != 1:
        raise ValueError(
            f"val and test splits carry exactly one eval view; got {pooled.shape[0]} views "
            "(the train split is the one with augmented views)"
        )
    return pooled[0]


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's frozen config; subclasses validate their fields in __post_init__
    with `FieldChecks`, so a wrong value stops a run before any feature is extracted."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# A float that YAML 1.1 (PyYAML) reads as a string: no dot in the mantissa, e.g. 1e-3 (the grid
# checker in safelib.reproduce uses it too).
LOST_FLOAT = re.compile(r"^[+-]?\d+[eE][+-]?\d+$")


def _is_number(value: Any) -> bool:
    """A real number, not a bool (``True`` is an int in Python; as a learning rate it is a typo)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _why_not(value: Any) -> str:
    """What is wrong with a value that should have been a number, for the error message."""
    if isinstance(value, (bool, np.bool_)):
        return " (a boolean, not a number)"
    if isinstance(value, str):
        text = value.strip()
        if LOST_FLOAT.match(text):
            mantissa, exponent = re.split(r"[eE]", text)
            return (f" (a string: PyYAML reads {text}, a float without a dot in its mantissa, as text; "
                    f"write {mantissa}.0e{exponent})")
        try:
            float(text)
        except ValueError:
            return " (a string)"
        return f" (a string; write the number {text} without quotes)"
    if _is_number(value) and not math.isfinite(value):
        return " (not finite)"
    return "" if value is None or _is_number(value) else f" ({_type_name(value)})"


def _type_name(value: Any, article: bool = True) -> str:
    """"a string", "an int", ...: the value's type as a message says it."""
    name = {str: "string", bool: "boolean", tuple: "list", dict: "dict"}.get(type(value), type(value).__name__)
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}" if article else name


class FieldChecks:
    """Every problem of one config's fields, collected and raised together as one ``ValueError``.

    Each check names the field, the value and what is allowed; a string where a number belongs
    says how to write it (the YAML ``1e-3`` trap), a bool is never a number and NaN never a value.
    """

    def __init__(self, config: Any) -> None:
        self.config = config
        self.problems: list[str] = []

    def _value(self, name: str) -> Any:
        return getattr(self.config, name)

    def number(self, name: str, *, low: float | None = None, high: float | None = None,
               above: float | None = None, below: float | None = None, optional: bool = False) -> None:
        """A finite real number within the given bounds (``low``/``high`` inclusive, ``above``/``below`` not)."""
        value = self._value(name)
        if optional and value is None:
            return
        ok = (_is_number(value) and math.isfinite(value) and (low is None or value >= low)
              and (high is None or value <= high) and (above is None or value > above)
              and (below is None or value < below))
        if not ok:
            self.problems.append(f"{name} must be {_allowed(low, high, above, below, optional)}, "
                                 f"got {value!r}{_why_not(value)}")

    def integer(self, name: str, *, low: int, optional: bool = False) -> None:
        """An int >= ``low`` (not a bool, not a float such as 2.5 or 3.0)."""
        value = self._value(name)
        if optional and value is None:
            return
        if not (isinstance(value, numbers.Integral) and _is_number(value) and value >= low):
            extra = " or None" if optional else ""
            self.problems.append(f"{name} must be an int >= {low}{extra}, got {value!r}{_why_not(value)}")

    def flag(self, name: str) -> None:
        """A bool: ``amp: "no"`` is a non-empty string, which Python would take for True."""
        value = self._value(name)
        if not isinstance(value, bool):
            self.problems.append(f"{name} must be true or false, got {value!r} ({_type_name(value)})")

    def choice(self, name: str, choices: Iterable[str], note: str = "") -> None:
        """One of ``choices``; ``note`` says what they mean, after the list."""
        value, choices = self._value(name), tuple(choices)
        if not (isinstance(value, str) and value in choices):
            self.problems.append(f"{name}={value!r}; valid: {', '.join(choices)}{f' ({note})' if note else ''}")

    def grid(self, name: str, *, low: float | None = None, high: float | None = None,
             above: float | None = None) -> bool:
        """A non-empty list of finite numbers within the bounds; True when it is one."""
        value = self._value(name)
        allowed = f"a non-empty list of {_allowed(low, high, above, None, False, plural=True)}"
        if isinstance(value, str) or _is_number(value):  # "0.5" would otherwise be read as "0", ".", "5"
            self.problems.append(f"{name} must be {allowed}, got {value!r} (a single "
                                 f"{_type_name(value, article=False)}, not a list; write [{value}])")
            return False
        if not isinstance(value, (tuple, list)) or len(value) == 0:
            self.problems.append(f"{name} must be {allowed}, got {value!r}")
            return False
        for v in value:
            if not (_is_number(v) and math.isfinite(v)):
                why = "not finite" if _is_number(v) else f"not a number{_why_not(v)}"
            elif not ((low is None or v >= low) and (high is None or v <= high) and (above is None or v > above)):
                why = "out of range"
            else:
                continue
            self.problems.append(f"{name} must be {allowed}, got {value!r}: {v!r} is {why}")
            return False
        return True

    def add(self, problem: str | None) -> None:
        """A problem found by a check of the config's own (relations between fields); None: no problem."""
        if problem:
            self.problems.append(problem)

    def raise_any(self) -> None:
        if self.problems:
            raise ValueError(f"invalid {type(self.config).__name__}: " + "; ".join(self.problems))


def _allowed(low: float | None, high: float | None, above: float | None, below: float | None,
             optional: bool, plural: bool = False) -> str:
    """"a finite number > 0", "a number in [0, 1]", ... for `FieldChecks` messages."""
    noun = "finite numbers" if plural else "a finite number"
    if low is not None and high is not None:
        text = f"{'numbers' if plural else 'a number'} in [{low:g}, {high:g}]"
    elif low is not None and below is not None:
        text = f"{'numbers' if plural else 'a number'} in [{low:g}, {below:g})"
    else:
        bounds = [f">= {low:g}" if low is not None else "", f"> {above:g}" if above is not None else "",
                  f"<= {high:g}" if high is not None else "", f"< {below:g}" if below is not None else ""]
        text = " ".join([noun, *[b for b in bounds if b]])
    return text + (" or None" if optional else "")


def config_from_dict(config_class: type, overrides: dict[str, Any], what: str) -> Any:
    """``config_class(**overrides)`` with unknown keys named and JSON lists turned into tuples."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {what}; valid options: {sorted(fields) or 'none'}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return config_class(**overrides)


class TrainingDivergedError(RuntimeError):
    """Training reached a non-finite loss or parameter: the run stops, rather than end at chance and be
    recorded as a result. The message names the method, the epoch and the likely cause."""

    def __init__(self, message: str, *, method: str = "", epoch: int | None = None) -> None:
        super().__init__(message)
        self.method, self.epoch = method, epoch


class TrainingWarning(UserWarning):
    """A method fell back (e.g. left out non-finite points of a validation sweep): said on the console,
    and recorded in the method's ``chosen``."""


def likely_cause(lr: float, weight_decay: float = 0.0, amp: bool = False) -> str:
    """The likeliest reason a training went non-finite, for `TrainingDivergedError` messages.

    A learning rate of 1 or more is far above any these methods use, so it is named first. Below it, a
    decoupled decay step multiplies the weights by ``1 - lr * weight_decay``: at ``lr * weight_decay >= 1``
    every step overshoots and the weights blow up whatever the loss.
    """
    fp16 = "; or fp16 overflow under mixed precision (try amp=false)" if amp else ""
    if lr >= 1.0:
        return f"learning rate {lr:g} too high (the methods' defaults are about 1e-3){fp16}"
    if lr * weight_decay >= 1.0:
        return (f"weight_decay {weight_decay:g} too large (lr x weight_decay = {lr * weight_decay:g} >= 1: "
                "every decay step overshoots)")
    return (f"learning rate {lr:g} too high or weight_decay {weight_decay:g} too large, or non-finite cached "
            f"features{fp16}")


def check_epoch(method: str, epoch: int, epochs: int, loss: float, params: Iterable[Tensor], *,
                lr: float, weight_decay: float = 0.0, amp: bool = False) -> None:
    """Stop a training whose mean loss or parameters are no longer finite after ``epoch`` (1-based).

    NaN never recovers: every later step reads it. Checked once per epoch (one sync per tensor), so
    the cost is nothing next to the epoch; the values trained are untouched.
    """
    if not math.isfinite(loss):
        what = f"the mean training loss is {loss}"
    elif not all(bool(torch.isfinite(p).all()) for p in params):
        what = "the trained parameters hold NaN or inf"
    else:
        return
    raise TrainingDivergedError(
        f"{method}: training diverged at epoch {epoch} of {epochs}: {what}. Likely cause: "
        f"{likely_cause(lr, weight_decay, amp)}. No result is recorded for a diverged run.",
        method=method, epoch=epoch)


def loss_warnings(method: str, losses: Sequence[float], num_classes: int, what: str = "training loss") -> list[str]:
    """Warnings for a training that did not fit: its loss ended above where it started, or at ``ln K``
    (uniform logits: the model collapsed to chance). Not errors: low learning rates and 1-shot runs
    can end above their start too."""
    if len(losses) < 2:
        return []
    first, last, chance = losses[0], losses[-1], math.log(num_classes) if num_classes > 1 else None
    collapsed = chance is not None and abs(last - chance) < 1e-3 and abs(first - chance) >= 1e-3
    if not (collapsed or last > first):
        return []
    trend = f"{what} went {first:.4g} -> {last:.4g} over {len(losses)} epochs"
    if collapsed:
        return [f"{method}: {trend}, which is ln {num_classes} = {chance:.4f}, the loss of uniform logits: the "
                "model collapsed to chance (learning rate too high?)"]
    return [f"{method}: {trend}: the loss ended above where it started (learning rate too high? a low "
            "one or a 1-shot run can do this too)"]


class FewShotMethod(ABC):
    """Fit on few-shot train + validation, then predict test logits.

    Subclasses set ``name`` and ``config_class`` and fill ``self.chosen`` during `fit` with every
    hyperparameter they selected on validation (JSON-serialisable), so a run record can say why a
    number came out as it did. Trained methods add to ``self.training_warnings`` (`loss_warnings`)
    what a record should flag without failing the run; a non-finite training raises
    `TrainingDivergedError`.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    # What the run must cache for it: "pooled" features, or "dense" maps for methods that pool
    # themselves (SAFE). Dense-map splits also serve pooled features (pooled on demand).
    feature_kind: ClassVar[str] = "pooled"
    # Which views of the training images the run caches: "augmented" (its train_views random
    # crops) or "eval" (one un-augmented view, as CoOp's linear probe trains on).
    train_view: ClassVar[str] = "augmented"

    def __init__(self, config: MethodConfig | None = None) -> None:
        config = self.config_class() if config is None else config
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config = config
        self.chosen: dict[str, Any] = {}
        self.training_warnings: list[str] = []
        self._fitted = False

    def fit(self, data: FewShotData) -> "FewShotMethod":
        """Learn from train, select on val; never sees test."""
        if not isinstance(data, FewShotData):
            raise TypeError(f"fit takes a FewShotData (train, val, head), got {type(data).__name__}")
        self.chosen = {}
        self.training_warnings = []
        self._fitted = False
        self._fit(data)
        self._fitted = True
        return self

    @property
    def fitted(self) -> bool:
        """Whether ``fit`` has run (``predict`` refuses until it has)."""
        return self._fitted

    def predict(self, test: SplitFeatures) -> Tensor:
        """``N x K`` logits of the test split (its labels are never read)."""
        if not self._fitted:
            raise RuntimeError(f"{self.name}: call fit(data) before predict(test)")
        if not isinstance(test, SplitFeatures):
            raise TypeError(f"predict takes a SplitFeatures, got {type(test).__name__}")
        # Hide the labels: a method has no business reading them at test time.
        hidden = SplitFeatures(
            labels=torch.zeros_like(test.labels), pooled=test.pooled, dense=test.dense
        )
        with torch.no_grad():
            logits = self._predict(hidden).float()
        nan_rows = int(torch.isnan(logits).any(dim=-1).sum())
        if nan_rows:  # -inf is allowed: a probe gives it to classes it never saw
            raise FloatingPointError(
                f"{self.name}: {nan_rows} of {len(logits)} images got NaN logits although the fit was finite: "
                "their features (or the fitted model on them) are not finite; check the feature cache")
        return logits

    @abstractmethod
    def _fit(self, data: FewShotData) -> None: ...

    @abstractmethod
    def _predict(self, test: SplitFeatures) -> Tensor: ...


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (logits.argmax(dim=1) == labels.to(logits.device)).float().mean().item()


def validation_scores(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy (percent) and mean cross-entropy of one candidate's validation logits."""
    logits = logits.float()
    return {
        "val_acc": accuracy(logits, labels),
        "val_loss": F.cross_entropy(logits, labels.to(logits.device).long()).item(),
    }


def batch_validation_scores(logits: Tensor, labels: Tensor) -> list[dict[str, float]]:
    """`validation_scores` of many candidates at once: logits ``C x N x K`` -> C score dicts."""
    logits = logits.float()
    labels = labels.to(logits.device).long()
    acc = 100.0 * (logits.argmax(dim=-1) == labels).float().mean(dim=-1)  # C
    loss = F.cross_entropy(logits.transpose(1, 2), labels.expand(logits.shape[0], -1), reduction="none").mean(-1)
    return [{"val_acc": a, "val_loss": l} for a, l in zip(acc.tolist(), loss.tolist())]


def best_index(scores: Sequence[dict[str, float]]) -> int:
    """Best = highest accuracy; ties (frequent on a few-shot validation set) go to the lower
    cross-entropy, then to the earlier candidate, so callers list their preferred default first."""
    if len(scores) == 0:
        raise ValueError("no candidates to select from")
    return min(range(len(scores)), key=lambda i: (-scores[i]["val_acc"], scores[i]["val_loss"], i))


def select_best(
    candidates: Sequence[Any], logits: Sequence[Tensor], labels: Tensor
) -> tuple[int, list[dict[str, float]]]:
    """Index of the best candidate on validation (see `best_index`) and every candidate's scores."""
    if len(candidates) == 0 or len(candidates) != len(logits):
        raise ValueError(f"need one logits tensor per candidate, got {len(candidates)} and {len(logits)}")
    scores = [validation_scores(lg, labels) for lg in logits]
    return best_index(scores), scores


def one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return F.one_hot(labels.long(), num_classes).to(dtype)  # N x K


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return type(x).__name__
