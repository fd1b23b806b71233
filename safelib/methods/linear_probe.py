"""Linear probe: logistic regression on frozen, normalised CLIP features.

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

from .base import FewShotData, FewShotMethod, MethodConfig, SplitFeatures, eval_view, pool_split, select_best


@dataclass(frozen=True)
class LinearProbeConfig(MethodConfig):
    """``coarse_exponents``: log10 C of the first grid; ``refine_steps`` points per decade after."""

    coarse_exponents: tuple[float, ...] = (-6, -4, -2, 0, 2, 4, 6)
    refine_halfwidth: float = 1.0  # decades either side of the coarse best
    refine_step: float = 0.25  # decades between refined values
    max_iter: int = 1000
    views: str = "all"  # "all": every augmented view is a sample; "mean": one mean feature per shot

    def __post_init__(self) -> None:
        if self.views not in ("all", "mean"):
            raise ValueError(f"views must be 'all' or 'mean', got {self.views!r}")
        if len(self.coarse_exponents) == 0:
            raise ValueError("coarse_exponents must list at least one log10(C), e.g. (-6, -4, ..., 6)")
        if self.refine_halfwidth < 0 or self.refine_step <= 0:
            raise ValueError(
                f"refine_halfwidth must be >= 0 and refine_step > 0, got {self.refine_halfwidth}, {self.refine_step}"
            )
        if self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter}")


class LinearProbe(FewShotMethod):
    """Logistic regression on normalised pooled features, ``C`` swept on validation."""

    name = "linear_probe"
    config_class = LinearProbeConfig

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
        return model

    def _logits(self, model: LogisticRegression, x: np.ndarray) -> Tensor:
        """Log-probabilities as ``N x K`` logits; classes absent from train get ``-inf``."""
        logits = torch.full((x.shape[0], self._num_classes), -math.inf)
        if len(model.classes_) == 1:  # one class seen: every sample gets it
            logits[:, int(model.classes_[0])] = 0.0
            return logits
        logits[:, torch.as_tensor(model.classes_, dtype=torch.long)] = torch.as_tensor(
            model.predict_log_proba(x), dtype=torch.float32
        )
        return logits

    def _predict(self, test: SplitFeatures) -> Tensor:
        features = eval_view(pool_split(test, self._head, self._pool_batch)).float()
        return self._logits(self._model, _numpy(F.normalize(features, dim=-1)))


def _numpy(x: Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).numpy()
