"""`braing3n forecast`: forecast a subject's follow-up at its site, scored against the real one when it exists,
or the follow-up of a scan in no site (`--scan`, labels from the command line; nothing to score against).
"""

from __future__ import annotations

from pathlib import Path

from braing3n_core.data.datasets import load_site
from braing3n_core.data.tokens import TokenCache
from braing3n_core.fileio import atomic_write_json, file_sha256
from braing3n_core.generation.condition_table import ConditionRow
from braing3n_core.generation.forecasting import find_baseline, forecast, forecast_scan, split_of
from braing3n_core.generation.models import load_run_models, model_hashes
from braing3n_core.generation.output import _scan, write_forecast
from braing3n_core.labels import Modality
from braing3n_core.models.diffusion import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS
from braing3n_core.site_config import SiteConfig


def export_forecast(source: Path, site_yaml: Path, subject: str, session: str | None, modality: Modality, years: float,
                    out: Path, *, draw: bool | None = None, steps: int = DEFAULT_STEPS,
                    guidance_scale: float = DEFAULT_GUIDANCE_SCALE, seed: int = 0, device: str = "cpu") -> Path:
    """`braing3n forecast`: `forecast.nii.gz`, `forecast.png` and `forecast.json` (scores against the
    real follow-up when the site holds one) in `out`; returns the JSON's path. Runs where the site's
    data is: only the baseline and follow-up scans are preprocessed and encoded."""
    config = SiteConfig.from_yaml(site_yaml)  # first: a wrong --site is the cheaper mistake to report
    models = load_run_models(source, need_encoder=True, device=device)
    encoder = models.require_encoder("forecasting (the baseline scan's tokens)")
    data = load_site(config, models.preset, prepare=False, progress=False)
    baseline = find_baseline(data, subject, session, modality)
    tokens = TokenCache(config.resolved_cache_dir, encoder, models.preset, data.cache, models.device)
    result = forecast(models, data, tokens, baseline, years, draw=draw, steps=steps, guidance_scale=guidance_scale,
                      seed=seed)
    out = Path(out)
    nifti, montage = write_forecast(result, models.preset, out / "forecast.nii.gz", out / "forecast.png")
    record = {
        "command": "forecast", "source": str(source), "site_file": str(config.source_file),
        "models": model_hashes(models), "settings": result.settings, "split": split_of(data, baseline),
        "baseline": _scan(baseline), "follow_up": _scan(result.follow_up), "scores": result.scores,
        "scores_note": None if result.follow_up else f"no {modality.value} scan of {subject} {years:g} y (± 0.25 y) "
                                                      "after the baseline: nothing to score against",
        "nifti": nifti.name, "montage": montage.name, "seconds": result.seconds,
    }
    path = out / "forecast.json"
    atomic_write_json(path, record)
    return path


def export_scan_forecast(source: Path, scan: Path, row: ConditionRow, years: float, out: Path, *,
                         draw: bool | None = None, steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
                         seed: int = 0, device: str = "cpu") -> Path:
    """`braing3n forecast --scan`: the same three files as the site path for a scan in no site. `row`
    holds what is known at the scan (its `age` is the age at the scan, the modality the scan's; its MMSE
    is not used). The JSON has no scores: there is no real follow-up to compare with."""
    models = load_run_models(source, need_encoder=True, device=device)
    result = forecast_scan(models, scan, row.labels(), row.modality, years, draw=draw, steps=steps,
                           guidance_scale=guidance_scale, seed=seed)
    out = Path(out)
    nifti, montage = write_forecast(result, models.preset, out / "forecast.nii.gz", out / "forecast.png")
    record = {
        "command": "forecast", "source": str(source), "site_file": None, "models": model_hashes(models),
        "settings": result.settings, "split": None,
        "baseline": {"path": str(scan), "sha256": file_sha256(scan), "modality": row.modality.value,
                     "conditions": row.to_dict()},
        "follow_up": None, "scores": {},
        "scores_note": "a scan in no site (--scan): no real follow-up to score against",
        "nifti": nifti.name, "montage": montage.name, "seconds": result.seconds,
    }
    path = out / "forecast.json"
    atomic_write_json(path, record)
    return path
