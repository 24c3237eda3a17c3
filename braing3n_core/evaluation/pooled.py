"""Distribution distances from additive sums: what a federation can pool without a scan's feature.

A site sends, per set of its scans, sums over rows only; the server adds them over sites and computes
the pooled distance as if all rows sat in one place:

- **Fréchet distance** from moments: n, Σx [F], Σxxᵀ [F, F] give the mean and covariance exactly, so the
  pooled FD equals `metrics.frechet_distance` on the concatenated features (to float rounding).
- **MMD²** with random Fourier features (Rahimi & Recht 2007): k(x, y) = exp(−‖x−y‖²/(2σ²)) ≈ φ(x)·φ(y)
  with φ(x) = √(2/D) cos(Wx + b), W ~ N(0, σ⁻² I), b ~ U[0, 2π). The unbiased estimate needs only
  Σφ(x) and Σ‖φ(x)‖² per set: Σ_{i≠j} k(xᵢ, xⱼ) = ‖Σφ‖² − Σ‖φ‖². One seed and σ are fixed by the server
  for the whole evaluation, so every site maps its rows with the same φ. With D = 2048 the kernel error
  is O(1/√D) ≈ 0.02 per pair, averaged over all pairs.

Sums of fewer than `MIN_ROWS` rows are not sent (a sum of one row is that row).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

MIN_ROWS = 3  # the smallest set a site sums and sends
FOURIER_FEATURES = 2048


def _rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or not np.all(np.isfinite(x)):
        raise ValueError(f"features must be a finite [n, F] array, got shape {x.shape}")
    return x


@dataclass(frozen=True)
class FeatureMoments:
    """n, Σx and Σxxᵀ of a set of feature rows (additive over disjoint sets)."""

    count: int
    total: np.ndarray  # [F]
    outer: np.ndarray  # [F, F]

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureMoments:
        x = _rows(features)
        return cls(len(x), x.sum(0), x.T @ x)

    def __add__(self, other: FeatureMoments) -> FeatureMoments:
        return FeatureMoments(self.count + other.count, self.total + other.total, self.outer + other.outer)

    @classmethod
    def combine(cls, parts: Iterable[FeatureMoments]) -> FeatureMoments:
        parts = list(parts)
        if not parts:
            raise ValueError("no moments to combine")
        out = parts[0]
        for part in parts[1:]:
            out = out + part
        return out

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ValueError(f"a covariance needs ≥ 2 rows, got {self.count}")
        mean = self.total / self.count
        cov = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return mean, (cov + cov.T) / 2.0

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.count": np.array([self.count], dtype=np.float64), f"{prefix}.total": self.total,
                f"{prefix}.outer": self.outer}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str) -> FeatureMoments:
        return cls(int(np.asarray(arrays[f"{prefix}.count"]).item()), np.asarray(arrays[f"{prefix}.total"], np.float64),
                   np.asarray(arrays[f"{prefix}.outer"], np.float64))


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_from_moments(a: FeatureMoments, b: FeatureMoments) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2√(Σa Σb)); tr√(Σa Σb) = Σ √eig(√Σa Σb √Σa) (symmetric, PSD)."""
    mean_a, cov_a = a.mean_cov()
    mean_b, cov_b = b.mean_cov()
    root = _sqrt_psd(cov_a)
    cross = float(np.sqrt(np.clip(np.linalg.eigvalsh(root @ cov_b @ root), 0.0, None)).sum())
    return max(float(np.square(mean_a - mean_b).sum()) + float(np.trace(cov_a) + np.trace(cov_b)) - 2.0 * cross, 0.0)


def median_bandwidth(features: np.ndarray, max_rows: int = 2000, seed: int = 0) -> float:
    """σ of the RBF kernel by the median heuristic (as `metrics.MMDKernel`), on rows the server holds."""
    x = _rows(features)
    x = x[np.random.default_rng(seed).permutation(len(x))[:max_rows]]
    sq = np.square(x).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)[np.triu_indices(len(x), k=1)]
    median = float(np.median(d2)) if d2.size else 0.0
    return math.sqrt(median) if median > 0 else 1.0


@dataclass(frozen=True)
class KernelSums:
    """n, Σφ(x) [D] and Σ‖φ(x)‖² of one set under a fixed Fourier map (additive over disjoint sets)."""

    count: int
    total: np.ndarray
    self_dot: float

    @classmethod
    def of_mapped(cls, phi: np.ndarray) -> KernelSums:
        """Sums of rows already mapped by a `FourierKernel` ([n, D])."""
        return cls(len(phi), phi.sum(0), float(np.square(phi).sum()))

    def __add__(self, other: KernelSums) -> KernelSums:
        return KernelSums(self.count + other.count, self.total + other.total, self.self_dot + other.self_dot)

    @classmethod
    def combine(cls, parts: Iterable[KernelSums]) -> KernelSums:
        parts = list(parts)
        if not parts:
            raise ValueError("no kernel sums to combine")
        out = parts[0]
        for part in parts[1:]:
            out = out + part
        return out

    def within(self) -> float:
        """Mean k(xᵢ, xⱼ) over pairs i ≠ j."""
        if self.count < 2:
            raise ValueError(f"MMD needs ≥ 2 rows per set, got {self.count}")
        return (float(self.total @ self.total) - self.self_dot) / (self.count * (self.count - 1))

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.kcount": np.array([self.count], np.float64), f"{prefix}.ktotal": self.total,
                f"{prefix}.kself": np.array([self.self_dot], np.float64)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str) -> KernelSums:
        return cls(int(np.asarray(arrays[f"{prefix}.kcount"]).item()), np.asarray(arrays[f"{prefix}.ktotal"], np.float64),
                   float(np.asarray(arrays[f"{prefix}.kself"]).item()))


@dataclass(frozen=True)
class FourierKernel:
    """The random Fourier map φ of an RBF kernel of bandwidth σ, fixed by (width, σ, seed)."""

    width: int
    bandwidth: float
    seed: int = 0
    features: int = FOURIER_FEATURES

    def map(self, x: np.ndarray) -> np.ndarray:
        x = _rows(x)
        if x.shape[1] != self.width:
            raise ValueError(f"features of width {x.shape[1]} for a kernel of width {self.width}")
        rng = np.random.default_rng(self.seed)
        w = rng.standard_normal((self.width, self.features)) / self.bandwidth
        b = rng.uniform(0.0, 2.0 * math.pi, self.features)
        return math.sqrt(2.0 / self.features) * np.cos(x @ w + b)

    def sums(self, x: np.ndarray) -> KernelSums:
        return KernelSums.of_mapped(self.map(x))


def mmd_from_sums(a: KernelSums, b: KernelSums) -> float:
    """Unbiased MMD² between two disjoint sets from their kernel sums."""
    return a.within() + b.within() - 2.0 * float(a.total @ b.total) / (a.count * b.count)
