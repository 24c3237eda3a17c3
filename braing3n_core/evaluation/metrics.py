"""Reconstruction, generation and conditioning metrics (MONAI where it has them).

Volumes are `B, C, D, H, W` z-scored intensities (per volume over brain voxels; background 0).
z-scores have no natural maximum, so PSNR and SSIM use one fixed window for every model and preset:

- `Z_SCORE_WINDOW = (-5, 5)`, data range 10. On the ICBM152 T1 template, brain voxels span z ∈ [-3.5, 2.1]
  (0.1–99.9 %: [-3.4, 1.7]); the window leaves room for hyperintense lesions (T1c enhancement, FLAIR).
  Values outside it are not clipped: the range only fixes PSNR's peak and SSIM's stabilisers.
- SSIM/MS-SSIM see both volumes shifted by −low (to [0, 10] inside the window). SSIM's luminance term
  (2μxμy + c1)/(μx² + μy² + c1) is meant for non-negative intensities; on signed z-scores local means
  near 0 of opposite sign would swing it between −1 and 1. The shift leaves the contrast/structure
  terms unchanged (they are shift-invariant).
- SSIM is MONAI's (`compute_ssim_and_cs`: Gaussian window 11, σ 1.5, k1 0.01, k2 0.03) computed with the
  Gaussian applied as three 1-D passes (`_gaussian_filter`) instead of MONAI's dense 11³ kernel: the window
  is separable, so the map is the same (to float rounding; tested against MONAI) at 33 instead of 1,331
  multiply-adds per voxel. MONAI's dense conv3d took 3.4 s of a decoder's 3.7 s validation step per volume
  at `small`; the whole map now takes a few percent of it.

Metric names: `val/*` for reconstruction, `gen/*` for generation (see `VAL_METRICS`, `GEN_METRICS`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch
from monai.metrics import MAEMetric, MultiScaleSSIMMetric, PSNRMetric
from scipy.stats import norm

from braing3n_core.evaluation.probe_tasks import ProbeTable, evaluate_predictions
from braing3n_core.evaluation.probes import Probe

Z_SCORE_WINDOW: tuple[float, float] = (-5.0, 5.0)
Z_SCORE_DATA_RANGE: float = Z_SCORE_WINDOW[1] - Z_SCORE_WINDOW[0]

SSIM_KERNEL_SIZE = 11  # MONAI's SSIMMetric default (Gaussian, σ 1.5)
SSIM_KERNEL_SIGMA = 1.5
MS_SSIM_KERNEL_SIZE = 4  # as in MONAI's generative 3D tutorials and the brain LDM evaluation
MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003

VAL_METRICS: tuple[str, ...] = (
    "val/psnr",
    "val/ssim",
    "val/msssim",
    "val/mae",
    "val/psnr_brain",
    "val/ssim_brain",
    "val/mae_brain",
)
GEN_METRICS: tuple[str, ...] = (
    "gen/fd",
    "gen/fd_ci_low",
    "gen/fd_ci_high",
    "gen/mmd",
    "gen/mmd_ci_low",
    "gen/mmd_ci_high",
    "gen/diversity_msssim",
    "gen/diversity_msssim_real",
)


def adherence_metric_name(probe_metric: str) -> str:
    """`probe/age_mae` → `gen/adherence_age_mae`."""
    return "gen/adherence_" + probe_metric.removeprefix("probe/")


# ---------------------------------------------------------------------------------------------------
# Voxel metrics
# ---------------------------------------------------------------------------------------------------


def _volumes(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    pred, target = torch.as_tensor(pred).float(), torch.as_tensor(target).float()
    if pred.ndim != 5 or pred.shape != target.shape:
        raise ValueError(
            f"volumes must both be B, C, D, H, W of one shape; got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if not (torch.isfinite(pred).all() and torch.isfinite(target).all()):
        raise ValueError("volumes contain non-finite values")
    return pred, target


def _mask(mask: torch.Tensor | np.ndarray, like: torch.Tensor) -> torch.Tensor:
    mask = torch.as_tensor(mask).to(like.device).bool()
    try:
        mask = mask.expand_as(like)
    except RuntimeError:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to volumes {tuple(like.shape)}"
        ) from None
    if (mask.flatten(1).sum(1) == 0).any():
        raise ValueError("mask is empty for at least one volume")
    return mask


def _masked_batch_metric(metric, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A MONAI mean-error metric over the mask's voxels: MONAI averages over all non-batch dimensions,
    so each volume's masked voxels are passed as a 1 × 1 × M "image" (masks differ in size)."""
    return torch.cat([metric(p[m].view(1, 1, -1), t[m].view(1, 1, -1)).view(1) for p, t, m in zip(pred, target, mask)])


def psnr(pred, target, *, mask=None, data_range: float = Z_SCORE_DATA_RANGE) -> torch.Tensor:
    """PSNR [B] in dB, over the whole volume or inside `mask`; +inf where the volumes are identical."""
    pred, target = _volumes(pred, target)
    metric = PSNRMetric(max_val=data_range, reduction="none")
    if mask is None:
        return metric(pred, target).view(-1)
    return _masked_batch_metric(metric, pred, target, _mask(mask, pred))


def mae(pred, target, *, mask=None) -> torch.Tensor:
    """Mean absolute error [B] in z-score units, over the whole volume or inside `mask`."""
    pred, target = _volumes(pred, target)
    metric = MAEMetric(reduction="none")
    if mask is None:
        return metric(pred, target).view(-1)
    return _masked_batch_metric(metric, pred, target, _mask(mask, pred))


def _gaussian_1d(size: int, sigma: float) -> torch.Tensor:
    """The normalised 1-D Gaussian MONAI builds its SSIM window from (its outer product in 3D)."""
    offsets = torch.arange((1 - size) / 2, (1 + size) / 2, 1.0)
    weights = torch.exp(-((offsets / sigma) ** 2) / 2)
    return weights / weights.sum()


def _gaussian_filter(volumes: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """'Valid' Gaussian filtering of every channel of [B, C, D, H, W] → [B, C, D-k+1, H-k+1, W-k+1], one axis at
    a time (the 3-D Gaussian window is the product of three 1-D ones)."""
    channels = volumes.shape[1]
    taps = _gaussian_1d(size, sigma).to(volumes)
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = size
        kernel = taps.view(1, 1, *shape).expand(channels, 1, *shape)
        volumes = torch.nn.functional.conv3d(volumes, kernel, groups=channels)
    return volumes


def ssim_map(pred: torch.Tensor, target: torch.Tensor, *, data_range: float, size: int = SSIM_KERNEL_SIZE,
             sigma: float = SSIM_KERNEL_SIGMA, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """MONAI's SSIM map (`compute_ssim_and_cs`) of [B, C, D, H, W] volumes → [B, C, D-k+1, H-k+1, W-k+1]."""
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    moments = _gaussian_filter(torch.cat([pred, target, pred * pred, target * target, pred * target], dim=1), size, sigma)
    mu_x, mu_y, mu_xx, mu_yy, mu_xy = moments.chunk(5, dim=1)
    sigma_x, sigma_y, sigma_xy = mu_xx - mu_x * mu_x, mu_yy - mu_y * mu_y, mu_xy - mu_x * mu_y
    contrast = (2 * sigma_xy + c2) / (sigma_x + sigma_y + c2)
    return (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1) * contrast


def ssim(pred, target, *, mask=None, window: tuple[float, float] = Z_SCORE_WINDOW) -> torch.Tensor:
    """3D SSIM [B] (Gaussian window 11, σ 1.5). With `mask`, the SSIM map is averaged over the voxels
    whose window centre lies in the mask (the map is 'valid' convolution: k // 2 smaller per side)."""
    pred, target = _volumes(pred, target)
    low, high = window
    if min(pred.shape[2:]) < SSIM_KERNEL_SIZE:
        raise ValueError(f"SSIM needs volumes of ≥ {SSIM_KERNEL_SIZE} voxels per side, got {tuple(pred.shape[2:])}")
    values = ssim_map(pred - low, target - low, data_range=high - low)  # B, C, D - k + 1, H - k + 1, W - k + 1
    if mask is None:
        return values.flatten(1).mean(1)
    r = SSIM_KERNEL_SIZE // 2
    centres = _mask(mask, pred)[:, :, r:-r, r:-r, r:-r].float()
    return (values * centres).flatten(1).sum(1) / centres.flatten(1).sum(1).clamp(min=1)


@dataclass(frozen=True)
class MSSSIMSettings:
    kernel_size: int
    weights: tuple[float, ...]


def ms_ssim_settings(spatial_shape: Sequence[int]) -> MSSSIMSettings:
    """The most scales (≤ 5) that the volume supports with a size-4 kernel.

    MONAI requires `side // (n_scales - 1)² > kernel - 1` on every side. 80×96×80 (`small`) and
    160×192×160 (`paper`) keep all five scales; 40×48×40 (`tiny`) keeps four (40 // 16 = 2 fails,
    40 // 9 = 4 passes). Dropped scales are the coarsest; the remaining weights are renormalised to 1.
    Values are only comparable between volumes of one preset.
    """
    smallest = min(spatial_shape)
    for n_scales in range(len(MS_SSIM_WEIGHTS), 0, -1):
        if smallest // max(1, n_scales - 1) ** 2 > MS_SSIM_KERNEL_SIZE - 1:
            weights = np.array(MS_SSIM_WEIGHTS[:n_scales])
            return MSSSIMSettings(MS_SSIM_KERNEL_SIZE, tuple((weights / weights.sum()).tolist()))
    raise ValueError(
        f"volume of shape {tuple(spatial_shape)} is too small for MS-SSIM (needs ≥ {MS_SSIM_KERNEL_SIZE} per side)"
    )


def ms_ssim(pred, target, *, window: tuple[float, float] = Z_SCORE_WINDOW) -> torch.Tensor:
    """3D multi-scale SSIM [B] with `ms_ssim_settings` for this volume size."""
    pred, target = _volumes(pred, target)
    low, high = window
    settings = ms_ssim_settings(pred.shape[2:])
    metric = MultiScaleSSIMMetric(
        spatial_dims=3,
        data_range=high - low,
        kernel_size=settings.kernel_size,
        kernel_sigma=SSIM_KERNEL_SIGMA,
        weights=settings.weights,
        reduction="none",
    )
    return metric(pred - low, target - low).view(-1)


def reconstruction_metrics(pred, target, *, mask=None) -> dict[str, float]:
    """Batch means of the `val/*` metrics; the `_brain` ones only when a brain mask is given."""
    out = {
        "val/psnr": float(psnr(pred, target).mean()),
        "val/ssim": float(ssim(pred, target).mean()),
        "val/msssim": float(ms_ssim(pred, target).mean()),
        "val/mae": float(mae(pred, target).mean()),
    }
    if mask is not None:
        out["val/psnr_brain"] = float(psnr(pred, target, mask=mask).mean())
        out["val/ssim_brain"] = float(ssim(pred, target, mask=mask).mean())
        out["val/mae_brain"] = float(mae(pred, target, mask=mask).mean())
    return out


# ---------------------------------------------------------------------------------------------------
# Distribution distances in feature space (frozen-encoder pooled features [n, F])
# ---------------------------------------------------------------------------------------------------


def _features(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"{name} features must be [n ≥ 2, F], got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} features contain non-finite values")
    return x


def _trace_sqrt_cov_product(xc: np.ndarray, yc: np.ndarray) -> float:
    """tr √(Σx Σy) for centred samples, without a general matrix square root.

    With Σx = XᵀX/(n−1), Σy = YᵀY/(m−1): the eigenvalues of XᵀX·YᵀY are the squared singular values of
    X Yᵀ (n × m), and also of Sx^½ Sy^½ (F × F). So tr √(Σx Σy) is a nuclear norm; we take whichever
    matrix is smaller. Real, exact and faster than `scipy.linalg.sqrtm` of the non-symmetric product
    (which MONAI's FIDMetric calls with an argument SciPy 1.18 removes).
    """
    n, m, f = len(xc), len(yc), xc.shape[1]
    if f < min(n, m):

        def sqrt_psd(s: np.ndarray) -> np.ndarray:
            vals, vecs = np.linalg.eigh(s)
            return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T

        core = sqrt_psd(xc.T @ xc) @ sqrt_psd(yc.T @ yc)
    else:
        core = xc @ yc.T
    return float(np.linalg.svd(core, compute_uv=False).sum()) / math.sqrt((n - 1) * (m - 1))


def frechet_distance(real: np.ndarray, generated: np.ndarray) -> float:
    """Fréchet distance ‖μr − μg‖² + tr(Σr + Σg − 2√(Σr Σg)) between Gaussian fits of two sets.

    Biased upward at small n (compare models at equal sample counts) and tied to the feature
    extractor: state which encoder produced the features.
    """
    x, y = _features(real, "real"), _features(generated, "generated")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature widths differ: real {x.shape[1]}, generated {y.shape[1]}")
    xc, yc = x - x.mean(0), y - y.mean(0)
    trace_x = float(np.square(xc).sum()) / (len(x) - 1)
    trace_y = float(np.square(yc).sum()) / (len(y) - 1)
    diff = float(np.square(x.mean(0) - y.mean(0)).sum())
    return max(diff + trace_x + trace_y - 2.0 * _trace_sqrt_cov_product(xc, yc), 0.0)


@dataclass(frozen=True)
class MMDKernel:
    """k(x, y): `rbf` exp(−‖x−y‖²/(2σ²)) with σ by the median heuristic on the pooled sets (scale-free,
    so features of any encoder work), or `polynomial` (xᵀy/F + 1)³ as in KID."""

    kind: str = "rbf"
    bandwidth: float | None = None  # rbf σ; None → median pairwise distance

    def __post_init__(self) -> None:
        if self.kind not in ("rbf", "polynomial"):
            raise ValueError(f"MMD kernel must be 'rbf' or 'polynomial', got {self.kind!r}")

    def matrix(self, z: np.ndarray, seed: int = 0) -> np.ndarray:
        """Kernel matrix [N, N] over the pooled rows z [N, F]."""
        if self.kind == "polynomial":
            return (z @ z.T / z.shape[1] + 1.0) ** 3
        sq = np.square(z).sum(1)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)
        sigma = self.bandwidth
        if sigma is None:
            # Median over off-diagonal pairs of at most 2,000 rows (seeded), to bound the cost.
            rows = np.random.default_rng(seed).permutation(len(z))[:2000]
            sub = d2[np.ix_(rows, rows)][np.triu_indices(len(rows), k=1)]
            sigma = math.sqrt(float(np.median(sub))) if np.median(sub) > 0 else 1.0
        return np.exp(-d2 / (2.0 * sigma**2))


def _mmd2_from_kernel(k: np.ndarray, ix: np.ndarray, iy: np.ndarray) -> float:
    """Unbiased MMD² from the pooled kernel matrix, rows `ix` (real) and `iy` (generated).

    Within-set sums skip pairs that are the same original sample: k(x, x) terms would bias the
    estimate upward, and bootstrap resamples repeat samples.
    """
    kxx, kyy, kxy = k[np.ix_(ix, ix)], k[np.ix_(iy, iy)], k[np.ix_(ix, iy)]
    wx, wy = ix[:, None] != ix[None, :], iy[:, None] != iy[None, :]
    return float((kxx * wx).sum() / wx.sum() + (kyy * wy).sum() / wy.sum() - 2.0 * kxy.mean())


def mmd(real: np.ndarray, generated: np.ndarray, *, kernel: MMDKernel = MMDKernel()) -> float:
    """Unbiased estimate of MMD² (≈ 0, possibly slightly negative, for one distribution)."""
    x, y = _features(real, "real"), _features(generated, "generated")
    k = kernel.matrix(np.concatenate([x, y]))
    return _mmd2_from_kernel(k, np.arange(len(x)), np.arange(len(x), len(x) + len(y)))


@dataclass(frozen=True)
class BootstrapEstimate:
    value: float  # on the full sets
    ci_low: float
    ci_high: float
    n_boot: int
    confidence: float
    method: str  # "percentile" or "normal" (value ± z · bootstrap std)


def _resample(rng: np.random.Generator, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Each set is resampled on its own (unpaired), with replacement, at its own size."""
    return rng.integers(0, n, n), rng.integers(0, m, m)


def _check_boot(n_boot: int, confidence: float) -> None:
    if n_boot < 10 or not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap needs n_boot ≥ 10 and confidence in (0, 1); got {n_boot}, {confidence}")


def frechet_distance_bootstrap(
    real: np.ndarray, generated: np.ndarray, *, n_boot: int = 200, confidence: float = 0.95, seed: int = 0
) -> BootstrapEstimate:
    """FD with a normal bootstrap interval: value ± z · std of the bootstrap FDs (lower end ≥ 0).

    Not the percentile interval: a resample holds only ~63 % distinct rows, and FD's small-sample bias
    grows as rows fall (at n = 500, F = 1152 the bootstrap FDs all lie ~25 % above the full-set value),
    so percentiles would move the whole interval off the estimate. The spread is still informative.
    """
    _check_boot(n_boot, confidence)
    x, y = _features(real, "real"), _features(generated, "generated")
    rng = np.random.default_rng(seed)
    samples = [frechet_distance(x[i], y[j]) for i, j in (_resample(rng, len(x), len(y)) for _ in range(n_boot))]
    value, half = frechet_distance(x, y), float(norm.ppf(0.5 + confidence / 2.0) * np.std(samples, ddof=1))
    return BootstrapEstimate(value, max(value - half, 0.0), value + half, n_boot, confidence, "normal")


def mmd_bootstrap(
    real: np.ndarray,
    generated: np.ndarray,
    *,
    kernel: MMDKernel = MMDKernel(),
    n_boot: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapEstimate:
    """Unbiased MMD² with a percentile bootstrap interval (the estimator is unbiased on resamples too,
    see `_mmd2_from_kernel`); the kernel and its bandwidth are fixed from the full sets, so the interval
    reflects sampling variability only. Resampling is by index into
    one kernel matrix (our own loop rather than `scipy.stats.bootstrap`, which hides the indices that
    the duplicate-pair exclusion needs)."""
    _check_boot(n_boot, confidence)
    x, y = _features(real, "real"), _features(generated, "generated")
    k = kernel.matrix(np.concatenate([x, y]), seed=seed)
    n, m = len(x), len(y)
    rng = np.random.default_rng(seed)
    samples = [_mmd2_from_kernel(k, i, n + j) for i, j in (_resample(rng, n, m) for _ in range(n_boot))]
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    value = _mmd2_from_kernel(k, np.arange(n), np.arange(n, n + m))
    return BootstrapEstimate(value, float(low), float(high), n_boot, confidence, "percentile")


def feature_distribution_metrics(
    real: np.ndarray,
    generated: np.ndarray,
    *,
    kernel: MMDKernel = MMDKernel(),
    n_boot: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """`gen/fd`, `gen/mmd` and their bootstrap intervals."""
    fd = frechet_distance_bootstrap(real, generated, n_boot=n_boot, confidence=confidence, seed=seed)
    mm = mmd_bootstrap(real, generated, kernel=kernel, n_boot=n_boot, confidence=confidence, seed=seed)
    return {
        "gen/fd": fd.value,
        "gen/fd_ci_low": fd.ci_low,
        "gen/fd_ci_high": fd.ci_high,
        "gen/mmd": mm.value,
        "gen/mmd_ci_low": mm.ci_low,
        "gen/mmd_ci_high": mm.ci_high,
    }


# ---------------------------------------------------------------------------------------------------
# Diversity and condition adherence
# ---------------------------------------------------------------------------------------------------


def mean_pairwise_ms_ssim(
    volumes,
    *,
    max_pairs: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    window: tuple[float, float] = Z_SCORE_WINDOW,
) -> float:
    """Mean MS-SSIM over pairs of distinct volumes [N, C, D, H, W] (all pairs, or `max_pairs` drawn
    without replacement, seeded). Lower means more diverse; compare with the same number on real scans."""
    volumes = torch.as_tensor(volumes).float()
    if volumes.ndim != 5 or len(volumes) < 2:
        raise ValueError(f"diversity needs ≥ 2 volumes as N, C, D, H, W; got shape {tuple(volumes.shape)}")
    pairs = np.array(list(combinations(range(len(volumes)), 2)))
    if max_pairs is not None and max_pairs < len(pairs):
        pairs = pairs[np.random.default_rng(seed).choice(len(pairs), size=max_pairs, replace=False)]
    values = [
        ms_ssim(volumes[chunk[:, 0]], volumes[chunk[:, 1]], window=window)
        for chunk in np.array_split(pairs, math.ceil(len(pairs) / batch_size))
    ]
    return float(torch.cat(values).mean())


def diversity_metrics(generated, real=None, *, max_pairs: int | None = None, seed: int = 0) -> dict[str, float]:
    """`gen/diversity_msssim` on generated volumes, and `gen/diversity_msssim_real` on real ones."""
    out = {"gen/diversity_msssim": mean_pairwise_ms_ssim(generated, max_pairs=max_pairs, seed=seed)}
    if real is not None:
        out["gen/diversity_msssim_real"] = mean_pairwise_ms_ssim(real, max_pairs=max_pairs, seed=seed)
    return out


def condition_adherence(
    probes: Mapping[str, Probe] | Sequence[Probe], generated_features: np.ndarray, requested: ProbeTable
) -> dict[str, float]:
    """How well probes trained on real scans recover the conditions generated scans were requested with.

    For each probe whose label was requested (at least 2 samples): the probe's predictions on the
    generated features are scored against the requested values by `evaluate_predictions`, e.g.
    `gen/adherence_age_mae`, `gen/adherence_age_pearson_r`, `gen/adherence_sex_auroc`,
    `gen/adherence_diagnosis_bacc`.
    """
    features = np.asarray(generated_features, dtype=np.float64)
    if features.ndim != 2 or len(features) != len(requested):
        raise ValueError(f"{len(requested)} requested conditions for generated features of shape {features.shape}")
    out: dict[str, float] = {}
    for probe in probes.values() if isinstance(probes, Mapping) else probes:
        mask, y = probe.task.targets(requested)
        if mask.sum() < 2:
            continue
        scores = probe.predict_scores(features[mask])
        out.update({adherence_metric_name(k): v for k, v in evaluate_predictions(probe.task, y, scores).items()})
    return out
