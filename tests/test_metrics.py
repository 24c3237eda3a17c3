"""Reconstruction metrics on real anatomy, feature-space distances against closed forms, adherence."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.ndimage import zoom

from braing3n_core.evaluation.metrics import (
    GEN_METRICS,
    VAL_METRICS,
    MMDKernel,
    condition_adherence,
    diversity_metrics,
    feature_distribution_metrics,
    frechet_distance,
    frechet_distance_bootstrap,
    mae,
    mmd,
    mmd_bootstrap,
    ms_ssim,
    ms_ssim_settings,
    psnr,
    reconstruction_metrics,
    ssim,
)
from braing3n_core.evaluation.probe_tasks import ProbeSample, ProbeTable
from braing3n_core.evaluation.probes import fit_probes
from braing3n_core.presets import PRESETS

TINY = PRESETS["tiny"].shape


@pytest.fixture(scope="module")
def mni_tiny() -> tuple[torch.Tensor, torch.Tensor]:
    """ICBM152 2 mm T1 template at the tiny preset's size, z-scored over its brain mask (background 0)."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    t1 = load_mni152_template(resolution=2).get_fdata()
    brain = load_mni152_brain_mask(resolution=2).get_fdata() > 0
    factors = [s / o for s, o in zip(TINY, t1.shape)]
    t1, brain = zoom(t1, factors, order=1), zoom(brain.astype(np.float32), factors, order=0) > 0.5
    z = np.where(brain, (t1 - t1[brain].mean()) / t1[brain].std(), 0.0)
    return torch.tensor(z, dtype=torch.float32)[None, None], torch.tensor(brain)[None, None]  # 1, 1, D, H, W


def noisy(volume: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    return volume + sigma * torch.randn(volume.shape, generator=torch.Generator().manual_seed(seed))


def test_identical_volumes_score_perfectly(mni_tiny) -> None:
    volume, brain = mni_tiny
    assert volume.shape[2:] == TINY
    assert torch.isinf(psnr(volume, volume)).all() and torch.isinf(psnr(volume, volume, mask=brain)).all()
    assert ssim(volume, volume).item() == pytest.approx(1.0, abs=1e-5)
    assert ssim(volume, volume, mask=brain).item() == pytest.approx(1.0, abs=1e-5)
    assert ms_ssim(volume, volume).item() == pytest.approx(1.0, abs=1e-5)
    assert mae(volume, volume, mask=brain).item() == 0.0


def test_ssim_is_monais_gaussian_ssim(mni_tiny) -> None:
    """The separable SSIM equals MONAI's dense-kernel SSIM, whole-volume (`SSIMMetric`) and masked (its map).
    MONAI sums 1,331 float32 products per voxel: against a float64 map its mean is off by ~3e-5 (ours by ~3e-8),
    hence the tolerance."""
    from monai.metrics import SSIMMetric
    from monai.metrics.regression import compute_ssim_and_cs

    volume, brain = mni_tiny
    pred = torch.cat([noisy(volume, 0.3), torch.roll(volume, 2, dims=3) * 0.8]).clone()  # two different errors
    target, mask = volume.expand_as(pred), brain.expand_as(pred)
    low, high = (-5.0, 5.0)
    reference = SSIMMetric(3, data_range=high - low, win_size=11, kernel_sigma=1.5, reduction="none")(pred - low, target - low)
    torch.testing.assert_close(ssim(pred, target), reference.view(-1), atol=1e-4, rtol=0)
    dense_map, _ = compute_ssim_and_cs(pred - low, target - low, 3, (11,) * 3, (1.5,) * 3, data_range=high - low)
    centres = mask[:, :, 5:-5, 5:-5, 5:-5].float()
    masked = (dense_map * centres).flatten(1).sum(1) / centres.flatten(1).sum(1)
    torch.testing.assert_close(ssim(pred, target, mask=mask), masked, atol=1e-4, rtol=0)
    assert abs(float(ssim(pred, target)[0] - ssim(pred, target)[1])) > 1e-2  # two different errors, two values


def test_metrics_degrade_monotonically_with_noise(mni_tiny) -> None:
    volume, brain = mni_tiny
    rows = [reconstruction_metrics(noisy(volume, s), volume, mask=brain) for s in (0.05, 0.2, 0.8)]
    assert set(rows[0]) == set(VAL_METRICS)
    for key in ("val/psnr", "val/ssim", "val/msssim", "val/psnr_brain", "val/ssim_brain"):
        values = [r[key] for r in rows]
        assert values[0] > values[1] > values[2], (key, values)
    for key in ("val/mae", "val/mae_brain"):
        values = [r[key] for r in rows]
        assert values[0] < values[1] < values[2], (key, values)
    # Gaussian noise σ against the fixed data range 10: PSNR = 20 log10(10 / σ).
    for sigma, row in zip((0.05, 0.2, 0.8), rows):
        assert row["val/psnr"] == pytest.approx(20 * math.log10(10.0 / sigma), abs=0.1)
        assert row["val/mae"] == pytest.approx(sigma * math.sqrt(2 / math.pi), rel=0.02)


def test_ms_ssim_scales_fit_each_preset() -> None:
    assert len(ms_ssim_settings(PRESETS["tiny"].shape).weights) == 4
    assert len(ms_ssim_settings(PRESETS["small"].shape).weights) == 5
    assert len(ms_ssim_settings(PRESETS["paper"].shape).weights) == 5
    for preset in PRESETS.values():
        assert sum(ms_ssim_settings(preset.shape).weights) == pytest.approx(1.0)
    # The chosen settings really run at the small preset's size (80 × 96 × 80).
    a = torch.zeros(1, 1, *PRESETS["small"].shape)
    assert ms_ssim(a, a).item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="too small"):
        ms_ssim_settings((3, 3, 3))


def test_bad_volumes_and_masks_are_refused(mni_tiny) -> None:
    volume, brain = mni_tiny
    with pytest.raises(ValueError, match="B, C, D, H, W"):
        psnr(volume[0], volume[0])
    with pytest.raises(ValueError, match="empty"):
        psnr(volume, volume, mask=torch.zeros_like(brain))
    with pytest.raises(ValueError, match="does not broadcast"):
        mae(volume, volume, mask=brain[..., :10])


def gaussian_features(n: int, mean: np.ndarray, std: np.ndarray, seed: int) -> np.ndarray:
    return mean + std * np.random.default_rng(seed).normal(size=(n, len(mean)))


def test_frechet_distance_matches_closed_form_and_sqrtm() -> None:
    f = 6
    x = gaussian_features(400, np.zeros(f), np.ones(f), seed=0)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    # Large samples of N(μ1, diag a) and N(μ2, diag b): FD → ‖μ1 − μ2‖² + Σ(√a − √b)².
    a, b = np.linspace(0.5, 2.0, f), np.linspace(1.0, 3.0, f)
    shift = np.full(f, 0.5)
    expected = float(np.sum(shift**2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    big_x = gaussian_features(40_000, np.zeros(f), np.sqrt(a), seed=1)
    big_y = gaussian_features(40_000, shift, np.sqrt(b), seed=2)
    assert frechet_distance(big_x, big_y) == pytest.approx(expected, rel=0.03)
    # The distance grows with a mean shift.
    shifts = [frechet_distance(x, gaussian_features(400, np.full(f, d), np.ones(f), seed=3)) for d in (0.0, 0.5, 1.0)]
    assert shifts[0] < shifts[1] < shifts[2]
    # Both internal routes (F < n and F ≥ n) agree with the textbook scipy.linalg.sqrtm formula.
    rng = np.random.default_rng(4)
    for n, width in ((300, 8), (20, 40)):
        p = rng.normal(size=(n, width)) @ rng.normal(size=(width, width))
        q = rng.normal(size=(n + 5, width)) + 0.3
        s1, s2 = np.cov(p, rowvar=False), np.cov(q, rowvar=False)
        reference = np.sum((p.mean(0) - q.mean(0)) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
        assert frechet_distance(p, q) == pytest.approx(reference, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("kernel", [MMDKernel("rbf"), MMDKernel("polynomial")])
def test_mmd_separates_shifted_sets_with_bootstrap_intervals(kernel: MMDKernel) -> None:
    f = 8
    real = gaussian_features(150, np.zeros(f), np.ones(f), seed=0)
    same = gaussian_features(150, np.zeros(f), np.ones(f), seed=1)
    shifted = gaussian_features(150, np.full(f, 0.5), np.ones(f), seed=2)
    null, alt = mmd(real, same, kernel=kernel), mmd(real, shifted, kernel=kernel)
    assert abs(null) < 0.2 * alt and alt > 0
    null_ci = mmd_bootstrap(real, same, kernel=kernel, n_boot=100, seed=0)
    alt_ci = mmd_bootstrap(real, shifted, kernel=kernel, n_boot=100, seed=0)
    for estimate in (null_ci, alt_ci):
        assert estimate.ci_low <= estimate.value <= estimate.ci_high
    # Resamples repeat rows; the estimator skips repeated pairs, so it stays unbiased and the interval
    # stays centred on the estimate instead of drifting upward.
    half_width = (null_ci.ci_high - null_ci.ci_low) / 2
    assert abs((null_ci.ci_low + null_ci.ci_high) / 2 - null_ci.value) < 0.3 * half_width
    assert null_ci.value == pytest.approx(null)
    assert null_ci.ci_low <= 0.0 <= null_ci.ci_high  # the same distribution: zero is plausible
    assert alt_ci.ci_low > null_ci.ci_high  # a shift of 0.5 σ per feature is detected
    assert mmd_bootstrap(real, shifted, kernel=kernel, n_boot=100, seed=0) == alt_ci  # seeded


def test_feature_distribution_metrics_use_the_vocabulary() -> None:
    real = gaussian_features(60, np.zeros(4), np.ones(4), seed=0)
    gen = gaussian_features(50, np.ones(4), np.ones(4), seed=1)
    out = feature_distribution_metrics(real, gen, n_boot=20, seed=0)
    assert set(out) <= set(GEN_METRICS)
    assert out["gen/fd_ci_low"] < out["gen/fd"] < out["gen/fd_ci_high"] and out["gen/fd"] > 2.0
    assert out["gen/mmd_ci_low"] <= out["gen/mmd"] <= out["gen/mmd_ci_high"]
    # More features than samples: the regime where FD's resampling bias is largest.
    wide_real, wide_gen = np.random.default_rng(5).normal(size=(2, 40, 120))
    wide = frechet_distance_bootstrap(wide_real, wide_gen + 0.1, n_boot=20, seed=0)
    assert wide.ci_low <= wide.value <= wide.ci_high and wide.method == "normal"
    with pytest.raises(ValueError, match="widths differ"):
        frechet_distance(real, gen[:, :3])


def test_diversity_is_one_for_copies_and_lower_for_different_volumes(mni_tiny) -> None:
    volume, _ = mni_tiny
    copies = volume.repeat(3, 1, 1, 1, 1)
    varied = torch.cat([noisy(volume, 0.8, seed=s) for s in range(3)])
    out = diversity_metrics(varied, real=copies)
    assert out["gen/diversity_msssim_real"] == pytest.approx(1.0, abs=1e-5)
    assert out["gen/diversity_msssim"] < 0.9


def conditioned_features(age, sex, diagnosis, *, seed: int, mixing: np.ndarray) -> np.ndarray:
    """A stand-in 'encoder': features carry (age, sex, diagnosis) linearly, plus noise."""
    rng = np.random.default_rng(seed)
    age, sex, diagnosis = np.asarray(age), np.asarray(sex), np.asarray(diagnosis)
    planted = np.stack([(age - 70) / 10, sex == "M", diagnosis == "MCI", diagnosis == "AD"], axis=1).astype(float)
    return planted @ mixing + rng.normal(size=(len(age), mixing.shape[1]))


def test_condition_adherence_high_when_carried_chance_when_shuffled() -> None:
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(4, 16))
    n = 240
    age = rng.uniform(55, 90, n)
    sex = rng.choice(["F", "M"], n)
    dx = rng.choice(["CN", "MCI", "AD"], n)
    real_table = ProbeTable(
        tuple(
            ProbeSample(subject=f"sub-{i}", site_id="a", age=float(age[i]), sex=str(sex[i]), diagnosis=str(dx[i]))
            for i in range(n)
        )
    )
    probes = fit_probes(conditioned_features(age, sex, dx, seed=1, mixing=mixing), real_table, inner_folds=3)
    assert {"age", "sex", "diagnosis"} <= set(probes)
    # "Generated" samples that truly carry their requested conditions.
    g_age, g_sex, g_dx = rng.uniform(55, 90, 120), rng.choice(["F", "M"], 120), rng.choice(["CN", "MCI", "AD"], 120)
    generated = conditioned_features(g_age, g_sex, g_dx, seed=2, mixing=mixing)
    requested = ProbeTable.for_generated(120, age=g_age, sex=g_sex, diagnosis=g_dx)
    good = condition_adherence(probes, generated, requested)
    assert all(re.fullmatch(r"gen/adherence_[a-z0-9_]+", k) for k in good)
    assert good["gen/adherence_age_pearson_r"] > 0.8 and good["gen/adherence_age_mae"] < 6.0
    assert good["gen/adherence_sex_auroc"] > 0.95 and good["gen/adherence_sex_bacc"] > 0.85
    assert good["gen/adherence_diagnosis_bacc"] > 0.75
    # The same samples judged against shuffled requests: the conditions were ignored.
    order = np.random.default_rng(3).permutation(120)
    shuffled = ProbeTable.for_generated(120, age=g_age[order], sex=g_sex[order], diagnosis=g_dx[order])
    bad = condition_adherence(probes, generated, shuffled)
    assert abs(bad["gen/adherence_age_pearson_r"]) < 0.25
    assert abs(bad["gen/adherence_sex_auroc"] - 0.5) < 0.15
    assert abs(bad["gen/adherence_diagnosis_bacc"] - 1 / 3) < 0.15
    with pytest.raises(ValueError, match="requested conditions"):
        condition_adherence(probes, generated[:10], requested)
