"""Patient-specific forecasting: a baseline scan + an interval → the follow-up's tokens → a volume.

The baseline's tokens come from the site's frozen-encoder cache; the forecast is scored against the
subject's real follow-up when the site holds one at the asked interval (± 0.25 years). A scan in no site
(`forecast_scan`) is preprocessed and encoded on the spot, with the labels its caller gives.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from braing3n_core.data.bids import ScanRecord
from braing3n_core.data.datasets import SiteData
from braing3n_core.data.tokens import TokenCache, encode_volumes
from braing3n_core.data.transforms import check_scan_file, preprocess_scan, preprocess_volume
from braing3n_core.evaluation.metrics import psnr, ssim
from braing3n_core.generation.models import GenerationError, GenerationModels
from braing3n_core.generation.sampling import _synchronize, decode
from braing3n_core.labels import Modality, ScanLabels
from braing3n_core.models.conditions import conditions_from_labels
from braing3n_core.models.diffusion import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, conditional_mean, sample
from braing3n_core.models.dit import DiT
from braing3n_core.runtime import inference_autocast, inference_bf16

# A forecast is the DiT's conditional mean of the follow-up (`diffusion.conditional_mean`, one network
# evaluation), not a draw: a draw adds a session's unpredictable detail, which the regional measure reads as
# change. Measured on the long run's 18 held-out pairs (regional change error of the residual forecast,
# no-change 7.9 ml; bench_forecast_ceiling.py): the DiT whose pairs diffuse their deviation from the federated
# trend (`DiTConfig.trend`), conditional mean 5.3 ml (+33 %), a draw (ab2, 8 steps) 7.4 ml; the same run's DiT
# without the trend, mean 8.5 ml, draw 11.9 ml; guidance 1 / 1.5 / 3 / 5 on that DiT's mean: 8.5 / 8.5 / 8.8 /
# 9.5 ml.
# A draw (`draw=True`) integrates the flow on an unshifted time grid: the default shift
# (`diffusion.default_time_shift`, 7.5 at `small`) spends the steps near pure noise, which suits generation
# from nothing; a forecast is anchored by its baseline and its error lies in the low-noise detail (on the
# same pairs with the earlier DiT: shift 7.5 17.4 ml, shift 1 9.9 ml). A DiT trained before pairs diffused
# their change (`DiTConfig.change_scale` None) draws by default: its conditional mean regenerates the scan
# instead of editing the baseline (11.8 ml against 10.0 for its draws on the same pairs).
FORECAST_TIME_SHIFT = 1.0


def draws_by_default(dit: DiT) -> bool:
    """Whether a forecast from `dit` is a draw when the caller does not say (module comment above)."""
    return dit.config.change_scale is None


@dataclass
class ForecastResult:
    baseline: ScanRecord
    follow_up: ScanRecord | None  # the real scan at the forecast interval, when the site holds one
    interval_years: float
    tokens: torch.Tensor  # [1, N, E] forecast tokens
    volume: np.ndarray  # [D, H, W] forecast
    baseline_volume: np.ndarray  # [D, H, W]
    follow_up_volume: np.ndarray | None  # [D, H, W]
    scores: dict[str, float]  # forecast/psnr, forecast/ssim and the baseline-as-forecast reference
    seconds: float
    settings: dict[str, Any]
    residual_volume: np.ndarray | None = None  # [D, H, W] `residual_forecast` of the same tokens


def residual_forecast(baseline_volume: np.ndarray, forecast_volume: np.ndarray, reconstructed_baseline: np.ndarray) -> np.ndarray:
    """The real baseline + the decoded change, decode(forecast tokens) − decode(baseline tokens), inside
    the baseline's brain: the decoder's own reconstruction error cancels where nothing changes, so the
    forecast keeps the baseline's detail (the direct decode carries the decoder's whole error)."""
    mask = np.asarray(baseline_volume) != 0
    return np.where(mask, baseline_volume + forecast_volume - reconstructed_baseline, 0.0).astype(np.float32)


def find_baseline(data: SiteData, subject: str, session: str | None, modality: Modality) -> ScanRecord:
    """The subject's scan of `modality` at `session` (its earliest such scan when `session` is None)."""
    source = data.config.source_file or data.config.data_root
    mine = [r for r in data.records if r.subject == subject]
    if not mine:
        subjects = sorted({r.subject for r in data.records})
        raise GenerationError(f"{source}: site {data.config.site_id} has no usable scan of subject {subject!r} "
                              f"(subjects: {', '.join(subjects[:12])}{' …' if len(subjects) > 12 else ''})")
    matches = [r for r in mine if Modality(r.modality) is modality and (session is None or r.session == session)]
    if not matches:
        known = sorted(f"{r.session or '(no session)'} {Modality(r.modality).value}" for r in mine)
        raise GenerationError(f"{source}: no usable {modality.value} scan of {subject} "
                              f"{session or 'in any session'}; its usable scans: {', '.join(known)}")
    return min(matches, key=lambda r: (math.inf if r.labels.age is None else r.labels.age, r.session or ""))


def matching_follow_up(records: Sequence[ScanRecord], baseline: ScanRecord, years: float,
                       tolerance: float = 0.25) -> ScanRecord | None:
    """The subject's later scan of the same modality taken `years` (± `tolerance`) after the baseline."""
    if baseline.labels.age is None:
        return None
    best: tuple[float, ScanRecord] | None = None
    for record in records:
        if (record.subject != baseline.subject or Modality(record.modality) is not Modality(baseline.modality)
                or record.session == baseline.session or record.labels.age is None):
            continue
        gap = abs(record.labels.age - baseline.labels.age - years)
        if gap <= tolerance and (best is None or gap < best[0]):
            best = (gap, record)
    return best[1] if best else None


def volume_scores(prediction: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> tuple[float, float]:
    """(PSNR inside the target's brain, SSIM over the whole volume) of two [D, H, W] volumes, both on the
    fixed z-score window (`metrics.py`); the brain is the target's non-zero voxels."""
    target = torch.as_tensor(np.ascontiguousarray(target), dtype=torch.float32).reshape(1, 1, *np.shape(target)[-3:])
    prediction = torch.as_tensor(np.ascontiguousarray(prediction), dtype=torch.float32).reshape(target.shape)
    return float(psnr(prediction, target, mask=target != 0)[0]), float(ssim(prediction, target)[0])


def _forecast_scores(forecast_volume: np.ndarray, residual_volume: np.ndarray, baseline_volume: np.ndarray,
                     follow_volume: np.ndarray) -> dict[str, float]:
    """The direct and the residual forecast against the real follow-up and, as the "nothing changes"
    reference, the baseline."""
    scores = {}
    for prefix, volume in (("forecast/", forecast_volume), ("forecast/residual_", residual_volume),
                           ("forecast/baseline_", baseline_volume)):
        scores[f"{prefix}psnr"], scores[f"{prefix}ssim"] = volume_scores(volume, follow_volume)
    return scores


@torch.no_grad()
def forecast(models: GenerationModels, site: SiteData, tokens: TokenCache, baseline: ScanRecord, years: float, *,
             follow_up: ScanRecord | None = None, draw: bool | None = None, steps: int = DEFAULT_STEPS,
             guidance_scale: float = DEFAULT_GUIDANCE_SCALE, seed: int = 0) -> ForecastResult:
    """`baseline`'s scan `years` later, conditioned on the baseline's tokens, the interval and what is
    known at baseline (sex, diagnosis, sequence, field strength, the target age; not the follow-up's
    MMSE). The conditional mean, or with `draw` one sample (an ODE of `steps` steps); `draw` None: as
    `draws_by_default` says for the run's DiT. Scored against `follow_up`, or the site's scan at that
    interval when there is one."""
    models.require_dit()
    if not (math.isfinite(years) and years > 0):
        raise ValueError(f"the forecast interval must be a positive number of years, got {years}")
    if tokens.encoder_sha256 != models.encoder_sha256:
        raise GenerationError(f"{site.config.source_file}: the token cache is of encoder {tokens.encoder_sha256[:12]}…, "
                              f"not the models' {models.encoder_sha256[:12]}…")
    _synchronize(models.device)
    started = time.perf_counter()
    base_tokens = tokens.tokens(baseline)[None]  # [1, N, E]
    known = _known_at_follow_up(baseline.labels, years)
    predicted, volume, reconstructed, draw = _sample_follow_up(models, base_tokens, known, Modality(baseline.modality),
                                                               years, draw=draw, steps=steps,
                                                               guidance_scale=guidance_scale, seed=seed)
    seconds = time.perf_counter() - started
    baseline_volume = preprocess_scan(baseline.path, models.preset, site.cache)[0]
    residual = residual_forecast(baseline_volume, volume, reconstructed)
    follow_up = follow_up if follow_up is not None else matching_follow_up(site.records, baseline, years)
    follow_volume, scores = None, {}
    if follow_up is not None:
        follow_volume = preprocess_scan(follow_up.path, models.preset, site.cache)[0]
        scores = _forecast_scores(volume, residual, baseline_volume, follow_volume)
    settings = {**_estimate_settings(draw, steps), "guidance_scale": guidance_scale, "seed": seed,
                "site": site.config.site_id,
                "subject": baseline.subject, "session": baseline.session, "modality": Modality(baseline.modality).value,
                "years": float(years), "conditioned_age": known.age, "encoder_sha256": models.encoder_sha256,
                "device": str(models.device), "autocast": "bf16" if inference_bf16(models.device) else None}
    return ForecastResult(baseline, follow_up, float(years), predicted, volume, baseline_volume, follow_volume,
                          scores, seconds, settings, residual)


def _known_at_follow_up(labels: ScanLabels, years: float) -> ScanLabels:
    """What the DiT is told about the follow-up: the baseline's labels at the target age, without the
    MMSE (a follow-up's cognition is what a forecast must not be handed)."""
    return ScanLabels(age=None if labels.age is None else labels.age + years, sex=labels.sex,
                      diagnosis=labels.diagnosis, field_strength=labels.field_strength)


def _estimate_settings(draw: bool, steps: int) -> dict[str, Any]:
    if draw:
        return {"estimate": "draw", "steps": steps, "time_shift": FORECAST_TIME_SHIFT}
    return {"estimate": "conditional mean", "steps": 1}


def _sample_follow_up(models: GenerationModels, base_tokens: torch.Tensor, known: ScanLabels, modality: Modality,
                      years: float, *, draw: bool | None, steps: int, guidance_scale: float,
                      seed: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray, bool]:
    """The DiT's follow-up tokens [1, N, E] (its conditional mean, or a draw) for baseline tokens [1, N, E],
    their decoded volume [D, H, W], the decoded baseline tokens [D, H, W] (for the residual forecast) and
    whether it drew."""
    dit = models.require_dit()
    draw = draws_by_default(dit) if draw is None else draw
    try:
        cond = conditions_from_labels([known], [modality])
    except ValueError as error:  # e.g. an age past the schema's range once the interval is added
        raise GenerationError(f"cannot condition the forecast: {error}") from None
    shape = (1, dit.config.num_tokens, dit.config.token_dim)
    given = {"guidance_scale": guidance_scale, "baseline": base_tokens, "interval": torch.tensor([float(years)]),
             "generator": torch.Generator().manual_seed(seed)}
    with inference_autocast(models.device):
        if draw:
            predicted = sample(dit, shape, cond, steps=steps, time_shift=FORECAST_TIME_SHIFT, **given)
        else:
            predicted = conditional_mean(dit, shape, cond, **given)
    predicted = predicted.float().cpu()  # [1, N, E]
    volumes = decode(models.decoder, torch.cat([predicted, base_tokens.float().cpu()]))  # [2, 1, D, H, W]
    _synchronize(models.device)
    return predicted, volumes[0, 0].numpy(), volumes[1, 0].numpy(), draw


SCAN_SITE = "(no site)"  # site_id of the record `forecast_scan` makes for a scan that belongs to no site


@torch.no_grad()
def forecast_scan(models: GenerationModels, scan: Path, labels: ScanLabels, modality: Modality, years: float, *,
                  draw: bool | None = None, steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
                  seed: int = 0) -> ForecastResult:
    """`forecast` for a scan that belongs to no site (a clinic's file): its tokens come from preprocessing
    and encoding it here with the run's encoder, its labels from the caller (`labels.age` is the age at
    the scan). Same DiT sampling as `forecast`; nothing to score against (no follow-up)."""
    models.require_dit()
    encoder = models.require_encoder("forecasting a scan (its tokens)")
    if not (math.isfinite(years) and years > 0):
        raise ValueError(f"the forecast interval must be a positive number of years, got {years}")
    scan = Path(scan)
    check_scan_file(scan)
    baseline_volume = preprocess_volume(scan, models.preset)  # [1, D, H, W]
    _synchronize(models.device)
    started = time.perf_counter()
    base_tokens = encode_volumes(encoder, torch.from_numpy(baseline_volume)[None], models.device)  # [1, N, E]
    known = _known_at_follow_up(labels, years)
    predicted, volume, reconstructed, draw = _sample_follow_up(models, base_tokens, known, modality, years, draw=draw,
                                                               steps=steps, guidance_scale=guidance_scale, seed=seed)
    seconds = time.perf_counter() - started
    baseline = ScanRecord(SCAN_SITE, scan.name, None, modality, scan, labels)
    settings = {**_estimate_settings(draw, steps), "guidance_scale": guidance_scale, "seed": seed,
                "site": None, "scan": str(scan),
                "modality": modality.value, "years": float(years), "conditioned_age": known.age,
                "encoder_sha256": models.encoder_sha256, "device": str(models.device),
                "autocast": "bf16" if inference_bf16(models.device) else None}
    return ForecastResult(baseline, None, float(years), predicted, volume, baseline_volume[0], None, {}, seconds,
                          settings, residual_forecast(baseline_volume[0], volume, reconstructed))


def split_of(data: SiteData, record: ScanRecord) -> str:
    """Which of the site's splits holds the scan's subject ("train" means the models saw it)."""
    return next((name for name, records in data.splits.items() if any(r.subject == record.subject for r in records)),
                "unassigned")
