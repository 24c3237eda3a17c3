"""Federated probe heads: summed feature statistics and the linear model a site trains by SGD.

`FeatureStats` (n, Σx, Σx²) add up across sites into the exact pooled mean and std, so no site shares
features; `LinearHead` is the same linear probe as the centralized one (logistic or ridge), in torch,
standardised with those federated statistics.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
    def predict_scores(self, features: np.ndarray) -> np.ndarray:
        """Same contract as `FittedProbe.predict_scores`: values in label units, or probabilities [n, K]."""
        self.eval()
        out = self(torch.as_tensor(_check_features(features), dtype=torch.float32))
        if self.task.kind is TaskKind.REGRESSION:
            return (out * self.target_scale + self.target_mean).double().numpy()
        return torch.softmax(out.double(), dim=-1).numpy()
