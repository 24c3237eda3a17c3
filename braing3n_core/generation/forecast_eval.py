"""Does forecasting beat doing nothing? Held-out subjects' real follow-ups against the forecast and two baselines.

For every held-out subject (val + test split) with two sessions of one modality (T1w where it has them),
the earliest scan is the baseline and the latest the follow-up, `years` apart. Four predictions of the follow-up, on the same pairs:

| method | the follow-up predicted as | its predicted regional change |
|---|---|---|
| `forecast` | decode(DiT forecast tokens) | ΔV(baseline → forecast) |
| `residual` | baseline + decode(forecast tokens) − decode(baseline tokens), inside the baseline's brain | ΔV(baseline → residual) |
| `no_change` | the baseline itself | 0 |
| `trend` | — (volumes only) | each region's annual change × years, by diagnosis and age band (least squares through the origin, cells of ≥ `MIN_TREND_PAIRS` pairs), fitted federated on the *training* subjects' real pairs (`trend_census` → `TrendModel`) |

ΔV is the paired change of `evaluation.tissue` (`BaselineTissue.change`) from the baseline to the scan in question (the same paired intensity
classification for the real follow-up and every prediction, inside the baseline's brain mask; the real
follow-up is first moved onto the baseline's voxels, where the predictions lie, and is scored there). Scores per pair: the regional change error |ΔV̂ − ΔV| in ml
against the real follow-up's measured change, and for the volume predictions voxel MAE and SSIM inside
the follow-up's brain. Where the site holds the synthetic cohort's ground truth
(`derivatives/braing3n-truth/truth.tsv`), the errors against the true change are reported too, as is the
measurement's own error (ΔV of the real pair vs the true change).

Per subject the errors are averaged over its pairs; a site returns sums over subjects (Σ, Σ², n) and its
own bootstrap interval, and nothing when it has fewer than `pooled.MIN_ROWS` such subjects.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from braing3n_core.data.alignment import align_by_brain_mask
from braing3n_core.data.bids import ScanRecord
from braing3n_core.data.transforms import preprocess_scan
from braing3n_core.evaluation.metrics import mae, ssim
from braing3n_core.evaluation.pooled import MIN_ROWS
from braing3n_core.evaluation.tissue import REGIONS, BaselineTissue
from braing3n_core.generation.forecasting import forecast
from braing3n_core.generation.models import GenerationModels
from braing3n_core.labels import MODALITIES, Modality
from braing3n_core.presets import Preset
from braing3n_core.training.examples import SiteInputs

METHODS: tuple[str, ...] = ("forecast", "residual", "no_change", "trend")
VOLUME_METHODS: tuple[str, ...] = ("forecast", "residual", "no_change")
AGE_BANDS: tuple[float, ...] = (60.0, 70.0, 80.0)  # band edges, years at baseline
TRAINING_SPLITS: tuple[str, ...] = ("train",)
HELD_OUT_SPLITS: tuple[str, ...] = ("val", "test")
TRUTH_FILE = Path("derivatives") / "braing3n-truth" / "truth.tsv"
N_BOOT = 1000


@dataclass(frozen=True)
class ScanPair:
    baseline: ScanRecord
    follow_up: ScanRecord

    @property
    def years(self) -> float:
        return float(self.follow_up.labels.age - self.baseline.labels.age)


def longitudinal_pairs(records: Sequence[ScanRecord]) -> list[ScanPair]:
    """One pair per subject: its earliest and latest scan of one modality (T1w first, then the order of
    `MODALITIES`) among the modalities with two ages, so every subject counts once."""
    groups: dict[str, dict[Modality, list[ScanRecord]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        if record.labels.age is not None:
            groups[record.subject][Modality(record.modality)].append(record)
    pairs = []
    for subject in sorted(groups):
        for modality in MODALITIES:
            scans = sorted(groups[subject].get(modality, []), key=lambda r: (r.labels.age, r.session or ""))
            if len(scans) >= 2 and scans[-1].labels.age - scans[0].labels.age > 0:
                pairs.append(ScanPair(scans[0], scans[-1]))
                break
    return pairs


def age_band(age: float | None) -> str:
    if age is None:
        return "unknown"
    edges = (-math.inf, *AGE_BANDS, math.inf)
    for low, high in itertools.pairwise(edges):
        if low <= age < high:
            return f"{'' if math.isinf(low) else f'{low:g}'}-{'' if math.isinf(high) else f'{high:g}'}"
    return "unknown"


def voxel_ml(preset: Preset) -> float:
    return preset.spacing_mm**3 / 1000.0


def _volume(record: ScanRecord, site: SiteInputs) -> np.ndarray:
    return preprocess_scan(record.path, site.data.preset, site.data.cache)[0]  # [D, H, W]


def baseline_tissue(baseline: np.ndarray, modality: Modality, preset: Preset) -> BaselineTissue:
    """The baseline classified once; `.change(other)` is ΔV to a scan on its voxels (a prediction, or an
    aligned follow-up)."""
    return BaselineTissue(baseline, modality, voxel_ml(preset))


def aligned_follow_up(baseline: np.ndarray, follow_up: np.ndarray) -> np.ndarray:
    """The real follow-up moved onto the baseline's voxels (`data.alignment.align_by_brain_mask`), where every
    prediction made from the baseline already lies."""
    return align_by_brain_mask(baseline, follow_up)[0]


# --- the linear-trend baseline -------------------------------------------------------------------------------


def trend_census(site: SiteInputs) -> dict[str, Any]:
    """Sums over the site's *training* subjects' real pairs, per (diagnosis at baseline, age band at
    baseline) cell: n, Σ years² and, per region, Σ change × years — what the federated trend is fitted from."""
    records = [r for name in TRAINING_SPLITS for r in site.data.splits[name]]
    cells: dict[str, dict[str, Any]] = {}
    pairs = longitudinal_pairs(records)
    for pair in pairs:
        modality = Modality(pair.baseline.modality)
        baseline = _volume(pair.baseline, site)
        change = baseline_tissue(baseline, modality, site.data.preset).change(
            aligned_follow_up(baseline, _volume(pair.follow_up, site)))
        cell = cells.setdefault(f"{pair.baseline.labels.diagnosis}|{age_band(pair.baseline.labels.age)}",
                                {"n": 0, "years_sq": 0.0, "change_years": dict.fromkeys(REGIONS, 0.0)})
        cell["n"] += 1
        cell["years_sq"] += pair.years**2
        for region in REGIONS:
            cell["change_years"][region] += change[region] * pair.years
    return {"cells": cells, "n_pairs": len(pairs), "subjects": len({p.baseline.subject for p in pairs})}


MIN_TREND_PAIRS = 3  # a cell with fewer pairs falls back to its diagnosis, then to all pairs


@dataclass(frozen=True)
class TrendModel:
    """Annual change per region, by (diagnosis, age band), with fallbacks to the diagnosis and then to all
    pairs when a cell has fewer than `MIN_TREND_PAIRS` pairs.

    The rate is the least-squares slope through the origin, Σ ΔV·t / Σ t²: the measured change's noise
    (tissue classification of two scans) does not shrink with the interval, so the mean of ΔV / t, which
    this baseline used before, let a pair a few months apart count ten times its evidence (measured on the
    long run: a CN cell's rate of +37 ml/year of brain growth, and a trend 3× worse than no change).
    """

    rates: dict[str, dict[str, float]]  # "diagnosis|band", "diagnosis|*", "*|*" → region → ml/year
    counts: dict[str, int]

    @classmethod
    def fit(cls, censuses: Sequence[Mapping[str, Any]]) -> TrendModel:
        change_years: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(REGIONS, 0.0))
        years_sq: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        for census in censuses:
            for key, cell in census["cells"].items():
                diagnosis = key.split("|")[0]
                for group in (key, f"{diagnosis}|*", "*|*"):
                    counts[group] += int(cell["n"])
                    years_sq[group] += float(cell["years_sq"])
                    for region in REGIONS:
                        change_years[group][region] += float(cell["change_years"][region])
        rates = {group: {r: change_years[group][r] / years_sq[group] for r in REGIONS}
                 for group in counts if counts[group] >= MIN_TREND_PAIRS and years_sq[group] > 0}
        return cls(rates, dict(counts))

    def rate(self, diagnosis: str | None, age: float | None) -> dict[str, float]:
        for group in (f"{diagnosis}|{age_band(age)}", f"{diagnosis}|*", "*|*"):
            if group in self.rates:
                return self.rates[group]
        return dict.fromkeys(REGIONS, 0.0)

    def change(self, pair: ScanPair) -> dict[str, float]:
        rate = self.rate(pair.baseline.labels.diagnosis, pair.baseline.labels.age)
        return {region: rate[region] * pair.years for region in REGIONS}

    def to_json(self) -> dict[str, Any]:
        return {"rates": self.rates, "counts": self.counts}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrendModel:
        return cls({k: dict(v) for k, v in data["rates"].items()}, {k: int(v) for k, v in data["counts"].items()})


# --- ground truth of the synthetic cohort ----------------------------------------------------------------------


def _ml(row: Mapping[str, str], name: str) -> float:
    return float(row[name]) if row.get(name) not in (None, "", "n/a") else 0.0


def truth_volumes(data_root: Path) -> dict[tuple[str, str, str], dict[str, float]]:
    """(subject, session, modality) → true {brain, gm, wm, csf} ml, when the dataset has the truth table."""
    path = Path(data_root) / TRUTH_FILE
    if not path.is_file():
        return {}
    out = {}
    with open(path, encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            gm = _ml(row, "gm_ml")
            wm = _ml(row, "wm_ml") + _ml(row, "wm_lesion_ml")
            out[(row["participant_id"], row["session_id"], row["modality"])] = {
                "brain": gm + wm, "gm": gm, "wm": wm, "csf": _ml(row, "csf_ml")}
    return out


def truth_of(truth: Mapping[tuple[str, str, str], dict[str, float]], record: ScanRecord) -> dict[str, float] | None:
    """The scan's true volumes from `truth_volumes`, or None."""
    return truth.get((record.subject, record.session or "", Modality(record.modality).value))


# --- a site's side -----------------------------------------------------------------------------------------------


def change_errors(predicted: Mapping[str, float], actual: Mapping[str, float]) -> dict[str, float]:
    """|predicted − actual| change per region, and their `mean` (the figure every table quotes)."""
    errors = {region: abs(predicted[region] - actual[region]) for region in REGIONS}
    return {**errors, "mean": float(np.mean([errors[r] for r in REGIONS]))}


def _voxel_scores(prediction: np.ndarray, target: np.ndarray) -> dict[str, float]:
    pred = torch.as_tensor(np.ascontiguousarray(prediction), dtype=torch.float32)[None, None]
    real = torch.as_tensor(np.ascontiguousarray(target), dtype=torch.float32)[None, None]
    mask = real != 0
    return {"mae": float(mae(pred, real, mask=mask)[0]), "ssim": float(ssim(pred, real, mask=mask)[0])}


def pair_scores(models: GenerationModels, site: SiteInputs, pair: ScanPair, trend: TrendModel, *, steps: int,
                guidance_scale: float, seed: int, truth: Mapping[tuple[str, str, str], dict[str, float]]) -> dict[str, Any]:
    """Every method's errors on one held-out pair (stays at the site)."""
    preset, modality = site.data.preset, Modality(pair.baseline.modality)
    result = forecast(models, site.data, site.tokens, pair.baseline, pair.years, follow_up=pair.follow_up, steps=steps,
                      guidance_scale=guidance_scale, seed=seed)
    baseline = result.baseline_volume
    follow = aligned_follow_up(baseline, result.follow_up_volume)
    volumes = {"forecast": result.volume, "residual": result.residual_volume, "no_change": baseline}
    tissue = baseline_tissue(baseline, modality, preset)  # classified once for the follow-up and each prediction
    actual = tissue.change(follow)
    changes = {m: tissue.change(v) for m, v in volumes.items() if m != "no_change"}
    changes["no_change"] = dict.fromkeys(REGIONS, 0.0)
    changes["trend"] = trend.change(pair)
    out: dict[str, Any] = {"change": {m: change_errors(changes[m], actual) for m in METHODS},
                           "voxel": {m: _voxel_scores(volumes[m], follow) for m in VOLUME_METHODS}}
    true_before, true_after = truth_of(truth, pair.baseline), truth_of(truth, pair.follow_up)
    if true_before is not None and true_after is not None:
        true_change = {r: true_after[r] - true_before[r] for r in REGIONS}
        out["truth"] = {m: change_errors(changes[m], true_change) for m in METHODS}
        out["truth"]["measured"] = change_errors(actual, true_change)
    return out


def _flatten(scores: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in scores.items():
        if isinstance(value, Mapping):
            flat |= _flatten(value, f"{prefix}{key}/")
        else:
            flat[f"{prefix}{key}"] = float(value)
    return flat


def _per_subject(pairs: Sequence[ScanPair], scores: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    by_subject: dict[str, list[dict[str, float]]] = defaultdict(list)
    for pair, score in zip(pairs, scores):
        by_subject[pair.baseline.subject].append(_flatten(score))
    return {s: {k: float(np.mean([row[k] for row in rows if k in row])) for k in rows[0]} for s, rows in by_subject.items()}


def site_forecast_scores(models: GenerationModels, site: SiteInputs, trend: TrendModel, *, steps: int, guidance_scale: float,
                         seed: int = 0) -> dict[str, Any]:
    """Sums over the site's held-out subjects of every error (module docstring), and the site's bootstrap
    interval of the relative improvement of `forecast` and `residual` over `no_change`."""
    assert site.tokens is not None, "forecasting needs the site's token cache of the frozen encoder"
    held = site.tokens.ensure([r for name in HELD_OUT_SPLITS for r in site.data.splits[name]])
    pairs = longitudinal_pairs(held)
    subjects = sorted({p.baseline.subject for p in pairs})
    out: dict[str, Any] = {"n_pairs": len(pairs), "n_subjects": len(subjects)}
    if len(subjects) < MIN_ROWS:
        out["note"] = f"{len(subjects)} held-out subjects with a follow-up; fewer than {MIN_ROWS} are not reported"
        return out
    truth = truth_volumes(site.data.config.data_root)
    scores = [pair_scores(models, site, pair, trend, steps=steps, guidance_scale=guidance_scale, seed=seed, truth=truth)
              for pair in pairs]
    per_subject = _per_subject(pairs, scores)
    for row in per_subject.values():  # the paired difference, so the pooled interval needs no subject's value
        row |= {f"diff/{m}": row["change/no_change/mean"] - row[f"change/{m}/mean"] for m in ("forecast", "residual", "trend")}
    keys = sorted({k for row in per_subject.values() for k in row})
    out["sums"] = {k: [float(sum(row[k] for row in per_subject.values() if k in row)),
                       float(sum(row[k] ** 2 for row in per_subject.values() if k in row)),
                       float(sum(k in row for row in per_subject.values()))] for k in keys}
    rng = np.random.default_rng(seed)
    base = np.array([per_subject[s]["change/no_change/mean"] for s in subjects])
    out["improvement"] = {}
    for method in ("forecast", "residual", "trend"):
        errors = np.array([per_subject[s][f"change/{method}/mean"] for s in subjects])
        boot = []
        for _ in range(N_BOOT):
            pick = rng.integers(0, len(subjects), len(subjects))
            boot.append(1.0 - errors[pick].sum() / max(base[pick].sum(), 1e-12))
        out["improvement"][method] = {"value": float(1.0 - errors.sum() / max(base.sum(), 1e-12)),
                                      "ci_low": float(np.quantile(boot, 0.025)), "ci_high": float(np.quantile(boot, 0.975))}
    return out


# --- the federation's view -------------------------------------------------------------------------------------


def pooled_forecast(per_site: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Means over all sites' held-out subjects, and the relative improvement over `no_change`
    (1 − error / no-change error) with a normal interval from the sums of the paired difference (a pooled
    bootstrap would need each subject's error; each site's own bootstrap interval is in its entry)."""
    sums: dict[str, np.ndarray] = {}
    for site in per_site.values():
        for key, value in site.get("sums", {}).items():
            sums[key] = sums.get(key, np.zeros(3)) + np.asarray(value, dtype=np.float64)
    if not sums:
        return {"n_subjects": 0}
    mean = {k: v[0] / v[2] for k, v in sums.items() if v[2] > 0}
    n = int(sums["change/no_change/mean"][2])
    out: dict[str, Any] = {"n_subjects": n, "mean": mean, "improvement": {}}
    base = sums["change/no_change/mean"][0] / n
    for method in ("forecast", "residual", "trend"):
        total, total_sq, _ = sums[f"diff/{method}"]
        mean_d = total / n
        sd = math.sqrt(max(total_sq / n - mean_d**2, 0.0) * n / max(n - 1, 1))
        half = 1.96 * sd / math.sqrt(n)
        scale = max(base, 1e-12)
        out["improvement"][method] = {"value": mean_d / scale, "ci_low": (mean_d - half) / scale,
                                      "ci_high": (mean_d + half) / scale,
                                      "method": "normal interval of the paired difference over subjects"}
    return out
