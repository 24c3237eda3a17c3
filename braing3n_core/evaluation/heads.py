"""Federated probe heads: summed feature statistics, the linear model, and the closed-form ridge.

`FeatureStats` (n, Σx, Σx²) add up across sites into the exact pooled mean and std, so no site shares
features; `LinearHead` is the same linear probe as the centralized one (logistic or ridge), in torch,
standardised with those federated statistics. Logistic heads are trained by federated SGD; a ridge head
has a closed form in the summed second moments (`RidgeMoments`: n, Σx, XᵀX, Xᵀy, Σy, Σy²), so
`fit_ridge` cross-validates α and solves it exactly — the very ridge of all sites' rows pooled, which FedAvg of local SGD is
not: sites whose age ranges differ pull their local solutions apart (measured: the SGD age head was worse
than predicting the mean while the pooled ridge beat it, on the same features).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from braing3n_core.evaluation.probe_tasks import ProbeTask, TaskKind
from braing3n_core.evaluation.probes import _check_features


@dataclass(frozen=True)
class FeatureStats:
    """Sufficient statistics (n, Σx, Σx²) per feature, in float64.

    Sums add across sites (also under secure aggregation), and the combined mean/std equal the
    centralised ones exactly, up to rounding; std is the population std, as `StandardScaler` uses.
    """

    count: int
    total: np.ndarray  # [F]
    total_sq: np.ndarray  # [F]

    @classmethod
    def from_features(cls, features: np.ndarray) -> FeatureStats:
        x = np.asarray(features, dtype=np.float64)
        x = x[:, None] if x.ndim == 1 else x
        if x.ndim != 2 or not np.all(np.isfinite(x)):
            raise ValueError(f"feature statistics need finite features [n, F], got shape {x.shape}")
        return cls(len(x), x.sum(axis=0), np.square(x).sum(axis=0))

    def __add__(self, other: FeatureStats) -> FeatureStats:
        if self.total.shape != other.total.shape:
            raise ValueError(f"cannot combine feature statistics of shapes {self.total.shape} and {other.total.shape}")
        return FeatureStats(self.count + other.count, self.total + other.total, self.total_sq + other.total_sq)

    @classmethod
    def combine(cls, parts: Iterable[FeatureStats]) -> FeatureStats:
        parts = list(parts)
        if not parts:
            raise ValueError("no feature statistics to combine")
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return out

    @property
    def mean(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("feature statistics of zero samples have no mean")
        return self.total / self.count

    @property
    def scale(self) -> np.ndarray:
        """Population std; constant features get 1 (as in StandardScaler) instead of dividing by 0."""
        var = np.maximum(self.total_sq / self.count - np.square(self.mean), 0.0)
        std = np.sqrt(var)
        return np.where(std < 1e-12 * np.maximum(1.0, np.abs(self.mean)), 1.0, std)

    def standardize(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, dtype=np.float64) - self.mean) / self.scale

    def to_arrays(self) -> dict[str, np.ndarray]:
        """For transport (e.g. as Flower `ArrayRecord` entries)."""
        return {"count": np.array([self.count], dtype=np.float64), "total": self.total, "total_sq": self.total_sq}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> FeatureStats:
        return cls(int(np.asarray(arrays["count"]).item()), np.asarray(arrays["total"]), np.asarray(arrays["total_sq"]))


@dataclass(frozen=True)
class RidgeMoments:
    """Second moments of one regression task's rows, in float64: what a ridge fit needs, summable across sites.

    An aggregate over the site's labelled rows ([F, F] for F features); like `FeatureStats`, it is
    released outside DP-SGD's accounting (`privacy/dp.py` lists the probe census among such aggregates).
    """

    count: int
    sum_x: np.ndarray  # [F]
    gram: np.ndarray  # [F, F]: Σ x xᵀ
    sum_xy: np.ndarray  # [F]: Σ x y
    sum_y: float
    sum_yy: float

    @classmethod
    def from_rows(cls, features: np.ndarray, targets: np.ndarray) -> RidgeMoments:
        x = np.asarray(features, dtype=np.float64)
        x = x[:, None] if x.ndim == 1 else x
        y = np.asarray(targets, dtype=np.float64).reshape(-1)
        if x.ndim != 2 or len(x) != len(y) or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            raise ValueError(f"ridge moments need finite features [n, F] and n targets, got {x.shape} and {y.shape}")
        return cls(len(y), x.sum(axis=0), x.T @ x, x.T @ y, float(y.sum()), float(y @ y))

    @classmethod
    def empty(cls, num_features: int) -> RidgeMoments:
        return cls(0, np.zeros(num_features), np.zeros((num_features, num_features)), np.zeros(num_features), 0.0, 0.0)

    def __add__(self, other: RidgeMoments) -> RidgeMoments:
        if self.gram.shape != other.gram.shape:
            raise ValueError(f"cannot combine ridge moments of shapes {self.gram.shape} and {other.gram.shape}")
        return RidgeMoments(self.count + other.count, self.sum_x + other.sum_x, self.gram + other.gram,
                            self.sum_xy + other.sum_xy, self.sum_y + other.sum_y, self.sum_yy + other.sum_yy)

    def __sub__(self, other: RidgeMoments) -> RidgeMoments:
        """The moments of the rows of `self` that are not in `other` (a cross-validation fold's complement)."""
        return self + RidgeMoments(-other.count, -other.sum_x, -other.gram, -other.sum_xy, -other.sum_y, -other.sum_yy)

    def standardized(self, features: FeatureStats, target: FeatureStats) -> RidgeMoments:
        """The same moments of x̃ = (x − μ)/s and ỹ = (y − m)/t, the coordinates `LinearHead` works in."""
        mu, s, m, t = features.mean, features.scale, float(target.mean[0]), float(target.scale[0])
        n = self.count
        gram = self.gram - np.outer(self.sum_x, mu) - np.outer(mu, self.sum_x) + n * np.outer(mu, mu)
        sum_xy = self.sum_xy - m * self.sum_x - mu * self.sum_y + n * mu * m
        return RidgeMoments(n, (self.sum_x - n * mu) / s, gram / np.outer(s, s), sum_xy / (s * t),
                            (self.sum_y - n * m) / t, (self.sum_yy - 2 * m * self.sum_y + n * m * m) / (t * t))

    def solve(self, alpha: float) -> tuple[np.ndarray, float]:
        """argmin_w,b Σ(y − xᵀw − b)² + α‖w‖² (intercept not penalised, as sklearn's `Ridge`)."""
        if self.count < 2:
            raise ValueError(f"a ridge fit needs ≥ 2 rows, has {self.count}")
        x_mean, y_mean = self.sum_x / self.count, self.sum_y / self.count
        covariance = self.gram - self.count * np.outer(x_mean, x_mean)
        cross = self.sum_xy - self.count * x_mean * y_mean
        weight = np.linalg.solve(covariance + alpha * np.eye(len(x_mean)), cross)
        return weight, float(y_mean - x_mean @ weight)

    def squared_error(self, weight: np.ndarray, bias: float) -> float:
        """Σ(y − xᵀw − b)² over these rows, exactly, from the moments alone."""
        return float(self.sum_yy - 2 * weight @ self.sum_xy - 2 * bias * self.sum_y + weight @ self.gram @ weight
                     + 2 * bias * weight @ self.sum_x + self.count * bias * bias)

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.count": np.array([float(self.count)]), f"{prefix}.sum_x": self.sum_x,
                f"{prefix}.gram": self.gram, f"{prefix}.sum_xy": self.sum_xy,
                f"{prefix}.sum_y": np.array([self.sum_y, self.sum_yy])}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str) -> RidgeMoments:
        sum_y, sum_yy = (float(v) for v in np.asarray(arrays[f"{prefix}.sum_y"]))
        return cls(int(np.asarray(arrays[f"{prefix}.count"]).item()), np.asarray(arrays[f"{prefix}.sum_x"]),
                   np.asarray(arrays[f"{prefix}.gram"]), np.asarray(arrays[f"{prefix}.sum_xy"]), sum_y, sum_yy)


@dataclass(frozen=True)
class RidgeFit:
    """A federated ridge head: α chosen by cross-validation over summed fold moments, then refitted on all rows."""

    alpha: float
    weight: np.ndarray  # [F], standardised coordinates
    bias: float
    cv_rmse: dict[float, float]  # α → cross-validated RMSE in label units (NaN: no fold to validate on)


def fit_ridge(folds: Sequence[RidgeMoments], features: FeatureStats, target: FeatureStats, alphas: Iterable[float]) -> RidgeFit:
    """K-fold cross-validation from moments alone: for each α, fit on all folds but k, score fold k exactly
    (`squared_error`), pool the squared errors; refit the α of least CV error on every row.

    This is the centralized probe's inner grid search, fold for fold, on summed statistics. Without a fold
    that can be validated (≥ 1 row, and ≥ 2 rows outside it), α is the middle of the grid.
    """
    alphas = [float(a) for a in alphas]
    parts = [fold.standardized(features, target) for fold in folds]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    splits = [(total - part, part) for part in parts if part.count >= 1 and total.count - part.count >= 2]
    curve = {a: math.nan for a in alphas}
    if splits:
        rows = sum(held.count for _, held in splits)
        for alpha in alphas:
            error = sum(max(held.squared_error(*rest.solve(alpha)), 0.0) for rest, held in splits)
            curve[alpha] = math.sqrt(error / rows) * float(target.scale[0])
        alpha = min(alphas, key=lambda a: curve[a])
    else:
        alpha = alphas[len(alphas) // 2]
    weight, bias = total.solve(alpha)
    return RidgeFit(alpha, weight, bias, curve)


class LinearHead(nn.Module):
    """The probe as a torch module, trained by SGD steps on a site's own features (federated probes).

    forward: features [B, F] (raw) → standardised with the (federated) `FeatureStats` buffers →
    logits [B, K] (classification) or a standardised prediction [B] (regression).
    """

    def __init__(
        self,
        task: ProbeTask,
        feature_stats: FeatureStats,
        *,
        target_stats: FeatureStats | None = None,
        class_counts: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.task = task
        num_features = feature_stats.total.shape[0]
        regression = task.kind is TaskKind.REGRESSION
        if regression and target_stats is None:
            raise ValueError(f"probe {task.name!r}: a regression head needs target_stats (n, Σy, Σy²)")
        self.linear = nn.Linear(num_features, 1 if regression else len(task.classes))
        nn.init.zeros_(self.linear.weight)  # start at the prior: every site starts from the same point
        nn.init.zeros_(self.linear.bias)
        self.register_buffer("feature_mean", torch.as_tensor(feature_stats.mean, dtype=torch.float32))
        self.register_buffer("feature_scale", torch.as_tensor(feature_stats.scale, dtype=torch.float32))
        target = target_stats if target_stats is not None else FeatureStats(1, np.zeros(1), np.ones(1))
        self.register_buffer("target_mean", torch.as_tensor(target.mean, dtype=torch.float32))
        self.register_buffer("target_scale", torch.as_tensor(target.scale, dtype=torch.float32))
        # Balanced class weights (n / (K n_c)) as in the sklearn probe; counts are summable across sites.
        weights = torch.ones(len(task.classes)) if not regression else torch.ones(1)
        if class_counts is not None and not regression:
            counts = torch.as_tensor(np.asarray(class_counts, dtype=np.float64), dtype=torch.float32)
            weights = torch.where(counts > 0, counts.sum() / (len(counts) * counts.clamp(min=1)), torch.zeros(1))
        self.register_buffer("class_weights", weights)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = (features - self.feature_mean) / self.feature_scale  # [B, F]
        out = self.linear(x)  # [B, K] or [B, 1]
        return out.squeeze(-1) if self.task.kind is TaskKind.REGRESSION else out

    def loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        out = self(features)
        if self.task.kind is TaskKind.REGRESSION:
            return nn.functional.mse_loss(out, (targets.float() - self.target_mean) / self.target_scale)
        return nn.functional.cross_entropy(out, targets.long(), weight=self.class_weights)

    def fit_steps(
        self,
        features: np.ndarray,
        targets: np.ndarray,
        *,
        steps: int,
        lr: float = 0.1,
        batch_size: int = 64,
        weight_decay: float = 1e-4,
        seed: int = 0,
    ) -> list[float]:
        """`steps` SGD steps on mini-batches drawn with replacement; returns the loss per step.

        A fresh optimiser per call, as in a federated round: no optimiser state crosses rounds.
        Weight decay is the L2 penalty that `C`/`alpha` set in the sklearn probe.
        """
        x = torch.as_tensor(_check_features(features), dtype=torch.float32)
        y = torch.as_tensor(np.asarray(targets))
        if len(y) != len(x) or len(x) == 0:
            raise ValueError(f"probe {self.task.name!r}: {len(x)} feature rows for {len(y)} targets")
        optimiser = torch.optim.SGD(self.linear.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
        generator = torch.Generator().manual_seed(seed)
        losses = []
        self.train()
        for _ in range(steps):
            batch = torch.randint(len(x), (min(batch_size, len(x)),), generator=generator)
            loss = self.loss(x[batch], y[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        return losses

    @torch.no_grad()
    def set_ridge(self, fit: RidgeFit) -> LinearHead:
        """Take a closed-form ridge solution (standardised coordinates) as this regression head's weights."""
        if self.task.kind is not TaskKind.REGRESSION:
            raise ValueError(f"probe {self.task.name!r}: a ridge solution fits a regression head only")
        self.linear.weight.copy_(torch.as_tensor(fit.weight, dtype=torch.float32).reshape(1, -1))
        self.linear.bias.fill_(fit.bias)
        return self

    @torch.no_grad()
    def predict_scores(self, features: np.ndarray) -> np.ndarray:
        """Same contract as `FittedProbe.predict_scores`: values in label units, or probabilities [n, K]."""
        self.eval()
        out = self(torch.as_tensor(_check_features(features), dtype=torch.float32))
        if self.task.kind is TaskKind.REGRESSION:
            return (out * self.target_scale + self.target_mean).double().numpy()
        return torch.softmax(out.double(), dim=-1).numpy()
