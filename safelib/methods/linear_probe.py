"""Linear probes: logistic regression on frozen CLIP features.

``linear_probe`` is CoOp's "Linear probe CLIP" (``lpclip``), the row of every few-shot table: one
un-augmented view of each training image, raw features, C searched by lpclip's coarse list and
bisection (``LinearProbe`` at the end of this module). ``linear_probe_aug`` is the probe this
library used before (``LinearProbeAug``), described below; on the mini world it came out lower
than lpclip at 1, 4 and 16 shots.

The CLIP paper's linear-probe protocol (Radford et al. 2021, appendix A.3) fits scikit-learn's
L-BFGS logistic regression and sweeps the L2 strength on a validation split; CoOp's few-shot
version starts from ``C`` in ``1e-6 .. 1e6`` (every factor 100) and refines around the best.

Our sweep, stated: a coarse grid ``C = 10^-6, 10^-4, ..., 10^6`` (7 fits), then a refinement
``10^(e-1) .. 10^(e+1)`` in steps of ``10^0.25`` around the coarse best ``10^e`` (8 more fits),
all scored on the few-shot validation split only. Best = highest validation accuracy, ties to
the lower validation cross-entropy, then to the smaller ``C`` (the stronger regularisation).
The probe trains on every cached augmented view of each shot (V x N samples); ``views="mean"``
trains on each shot's mean feature instead (N samples, V times cheaper: for ImageNet-sized runs).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from torch import Tensor

from .base import (FewShotData, FewShotMethod, FieldChecks, MethodConfig, SplitFeatures, TrainingDivergedError,
                   accuracy, eval_view, pool_split, select_best)
from .reference import LPCLIP

# log10 C beyond this is no regularisation or nothing but regularisation, and 10.0**400 overflows.
MAX_LOG10_C = 20.0


@dataclass(frozen=True)
class LinearProbeAugConfig(MethodConfig):
    """``coarse_exponents``: log10 C of the first grid; ``refine_steps`` points per decade after."""

    coarse_exponents: tuple[float, ...] = (-6, -4, -2, 0, 2, 4, 6)
    refine_halfwidth: float = 1.0  # decades either side of the coarse best
    refine_step: float = 0.25  # decades between refined values
    max_iter: int = 1000
    views: str = "all"  # "all": every augmented view is a sample; "mean": one mean feature per shot

    def __post_init__(self) -> None:
        check = FieldChecks(self)
        check.choice("views", ("all", "mean"))
        check.grid("coarse_exponents", low=-MAX_LOG10_C, high=MAX_LOG10_C)  # log10(C), e.g. (-6, -4, ..., 6)
        check.number("refine_halfwidth", low=0.0, high=MAX_LOG10_C)
        check.number("refine_step", above=0.0)
        check.integer("max_iter", low=1)
        if not check.problems and self.refine_halfwidth / self.refine_step > 100:
            check.add(f"refine_halfwidth / refine_step must be at most 100 (fits either side of the coarse best), "
                      f"got {self.refine_halfwidth} / {self.refine_step}")
        check.raise_any()


class LinearProbeAug(FewShotMethod):
    """Logistic regression on normalised pooled features of every augmented view, ``C`` swept on validation."""

    name = "linear_probe_aug"
    config_class = LinearProbeAugConfig

    def _fit(self, data: FewShotData) -> None:
        cfg = self.config
        views = F.normalize(data.pooled(data.train).float(), dim=-1)  # V x N x D
        if cfg.views == "mean":
            views = views.mean(dim=0, keepdim=True)  # 1 x N x D
        x_train = _numpy(F.normalize(views, dim=-1).flatten(0, 1))  # (V N) x D
        y_train = np.tile(data.train.labels.cpu().numpy(), views.shape[0])  # view-major, as flatten(0, 1)
        x_val = _numpy(F.normalize(eval_view(data.pooled(data.val)).float(), dim=-1))
        y_val = data.val.labels.cpu()
        self._num_classes = data.head.num_classes
        self._head = data.head
        self._pool_batch = data.pool_batch

        fitted: dict[float, tuple[LogisticRegression, Tensor]] = {}

        def sweep(exponents: list[float]) -> tuple[float, list[dict]]:
            for e in exponents:
                if e not in fitted:
                    model = self._fit_one(10.0**e, x_train, y_train)
                    fitted[e] = (model, self._logits(model, x_val))
            ordered = sorted(fitted)  # ascending C: ties go to the stronger regularisation
            best, scores = select_best(ordered, [fitted[e][1] for e in ordered], y_val)
            return ordered[best], [{"C": 10.0**e, **s} for e, s in zip(ordered, scores)]

        coarse_best, _ = sweep([float(e) for e in cfg.coarse_exponents])
        steps = int(round(cfg.refine_halfwidth / cfg.refine_step))
        refine = [round(coarse_best + k * cfg.refine_step, 6) for k in range(-steps, steps + 1)]
        best, table = sweep(refine)
        self._model = fitted[best][0]
        self.chosen = {"C": 10.0**best, "sweep": table}

    def _fit_one(self, c: float, x: np.ndarray, y: np.ndarray) -> LogisticRegression:
        model = LogisticRegression(C=c, max_iter=self.config.max_iter)
        with warnings.catch_warnings():
            # Weak regularisation on separable few-shot data never fully converges; the
            # sweep then simply prefers a smaller C, so the warning is noise here.
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(x, y)
        if not (np.isfinite(model.coef_).all() and np.isfinite(model.intercept_).all()):
            raise TrainingDivergedError(f"{self.name}: the logistic regression at C={c:g} has non-finite weights "
                                        "(non-finite cached features, or an extreme C)", method=self.name)
        return model

    def _logits(self, model: LogisticRegression, x: np.ndarray) -> Tensor:
        """Log-probabilities as ``N x K`` logits; classes absent from train get ``-inf``."""
        logits = torch.full((x.shape[0], self._num_classes), -math.inf)
        if len(model.classes_) == 1:  # one class seen: every sample gets it
            logits[:, int(model.classes_[0])] = 0.0
            return logits
        with np.errstate(divide="ignore"):  # a probability that underflows to 0 is a logit of -inf
            log_proba = model.predict_log_proba(x)
        logits[:, torch.as_tensor(model.classes_, dtype=torch.long)] = torch.as_tensor(log_proba, dtype=torch.float32)
        return logits

    def _predict(self, test: SplitFeatures) -> Tensor:
        features = eval_view(pool_split(test, self._head, self._pool_batch)).float()
        return self._logits(self._model, _numpy(F.normalize(features, dim=-1)))


def _numpy(x: Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).numpy()


@dataclass(frozen=True)
class LinearProbeConfig(MethodConfig):
    """CoOp's lpclip search: ``coarse_c`` in its order (ties go to the first, the larger C), then
    ``num_step`` bisection steps in log10 C between 0.1x and 10x the coarse peak."""

    coarse_c: tuple[float, ...] = LPCLIP.coarse_c
    num_step: int = LPCLIP.num_step
    max_iter: int = LPCLIP.max_iter

    def __post_init__(self) -> None:
        check = FieldChecks(self)
        if check.grid("coarse_c", above=0.0) and not all(abs(math.log10(c)) <= MAX_LOG10_C for c in self.coarse_c):
            check.add(f"coarse_c must lie in [1e-{MAX_LOG10_C:g}, 1e{MAX_LOG10_C:g}], got {self.coarse_c!r}")
        check.integer("num_step", low=0)
        check.integer("max_iter", low=1)
        check.raise_any()


class LinearProbe(LinearProbeAug):
    """CoOp's "Linear probe CLIP" (``lpclip``): one un-augmented view per training image, raw
    (unnormalised) features, L-BFGS logistic regression, C searched on the few-shot validation split
    by accuracy alone: a coarse list, then a bisection in log10 C whose last winner is kept
    (``safelib.methods.reference.LPCLIP`` cites the files). The run caches the train split's eval
    view for it (``train_view = "eval"``)."""

    name = "linear_probe"
    config_class = LinearProbeConfig
    train_view = "eval"  # read by the run: cache one eval-transform view of each training image

    def _fit(self, data: FewShotData) -> None:
        cfg = self.config
        views = data.pooled(data.train)
        if views.shape[0] != 1:
            raise ValueError(f"{self.name} trains on one un-augmented view per image (CoOp's lpclip); the train "
                             f"split has {views.shape[0]} views: cache it with views=0 (sl.run does)")
        x_train, y_train = _numpy(views[0].float()), data.train.labels.cpu().numpy()
        x_val = _numpy(eval_view(data.pooled(data.val)).float())
        y_val = data.val.labels.cpu()
        self._num_classes, self._head, self._pool_batch = data.head.num_classes, data.head, data.pool_batch
        fitted: dict[float, tuple[LogisticRegression, float]] = {}

        def fit(c: float) -> tuple[LogisticRegression, float]:
            if c not in fitted:
                model = self._fit_one(c, x_train, y_train)
                fitted[c] = (model, accuracy(self._logits(model, x_val), y_val))
            return fitted[c]

        coarse = [fit(float(c))[1] for c in cfg.coarse_c]
        peak = float(cfg.coarse_c[int(np.argmax(coarse))])  # first maximum: ties to the larger C
        final, left, right = peak, math.log10(peak) - 1.0, math.log10(peak) + 1.0
        steps = []
        for _ in range(cfg.num_step):
            c_left, c_right = 10.0**left, 10.0**right
            acc_left, acc_right = fit(c_left)[1], fit(c_right)[1]
            if acc_left < acc_right:  # lpclip's rule: the right end only when strictly better
                final, left = c_right, 0.5 * (left + right)
            else:
                final, right = c_left, 0.5 * (left + right)
            steps.append({"C_left": c_left, "C_right": c_right, "val_acc_left": acc_left,
                          "val_acc_right": acc_right, "C": final})
        self._model = fit(final)[0]
        self.chosen = {"C": final, "val_acc": fitted[final][1],
                       "coarse": [{"C": float(c), "val_acc": a} for c, a in zip(cfg.coarse_c, coarse)],
                       "bisection": steps}

    def _predict(self, test: SplitFeatures) -> Tensor:
        features = eval_view(pool_split(test, self._head, self._pool_batch)).float()
        return self._logits(self._model, _numpy(features))
