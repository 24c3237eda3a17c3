"""Proof that generation works: condition adherence, fidelity and diversity, next to their baselines.

The server generates every set from one balanced condition table (`balanced_conditions`) and one seed,
so the sets differ only in what they were conditioned on:

| set | generated with | what it shows |
|---|---|---|
| `guidance-<g>` | the requested conditions, classifier-free guidance g (the sweep) | the model |
| `swapped` | deliberately wrong conditions (`swap_conditions`), guidance = the default | positive control: adherence must collapse |
| `unconditioned` | no condition at all (the CFG null branch) | the adherence floor |
| `noise` | no model: the DiT's starting noise with the token marginals (mean, std per dimension) | the fidelity floor |

Every set is scored against the *requested* table. Features are mean-pooled encoder tokens (what the
probes read) in two spaces: `token` (the DiT's tokens themselves) and `scan` (decode → frozen encoder
again: what someone holding only the generated volume would measure).

What each side computes (no patient's feature or distance leaves a site):
- server: adherence of every set with the federated probe heads (`condition_adherence`); the generated
  volumes' mean pairwise MS-SSIM; pooled FD and MMD from the sites' sums (`evaluation.pooled`).
- site (`site_generation_scores`): on its held-out subjects (val + test: the models never trained on
  them), FD and MMD of every generated set with bootstrap intervals, the real-vs-real value between two
  disjoint halves of its subjects, and FD of an equal-size generated subset against one half (FD is
  biased by n, so only equal sizes compare); the probes' scores on its test subjects (the ceiling,
  `score_heads`); mean pairwise MS-SSIM of its held-out scans. Replies: these numbers, plus moment and
  kernel sums of sets of ≥ `pooled.MIN_ROWS` scans for pooling.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from braing3n_core.data.bids import ScanRecord
from braing3n_core.data.tokens import encode_volumes
from braing3n_core.data.transforms import preprocess_scan
from braing3n_core.evaluation.heads import LinearHead
from braing3n_core.evaluation.metrics import (
    MMDKernel,
    condition_adherence,
    frechet_distance_bootstrap,
    mean_pairwise_ms_ssim,
    mmd_bootstrap,
)
from braing3n_core.evaluation.pooled import (
    MIN_ROWS,
    FeatureMoments,
    FourierKernel,
    KernelSums,
    frechet_from_moments,
    median_bandwidth,
    mmd_from_sums,
)
from braing3n_core.evaluation.probe_tasks import ProbeTable
from braing3n_core.federation.arrays import Arrays
from braing3n_core.federation.probes import SiteProbeData, score_heads
from braing3n_core.generation.condition_table import AGE_BY_DIAGNOSIS, MMSE_BY_DIAGNOSIS, ConditionRow
from braing3n_core.generation.models import GenerationModels
from braing3n_core.generation.sampling import decode, generate
from braing3n_core.labels import DIAGNOSES, FIELD_STRENGTHS_T, MODALITIES, SEXES
from braing3n_core.models import MAEEncoder
from braing3n_core.models.conditions import null_conditions
from braing3n_core.models.diffusion import sample
from braing3n_core.runtime import inference_autocast
from braing3n_core.training.examples import SiteInputs

SPACES: tuple[str, ...] = ("token", "scan")
GUIDANCE_SWEEP: tuple[float, ...] = (1.0, 1.5, 3.0)
SWAPPED, UNCONDITIONED, NOISE = "swapped", "unconditioned", "noise"
HELD_OUT_SPLITS: tuple[str, ...] = ("val", "test")
DIVERSITY_PAIRS = 45  # MS-SSIM pairs per set (all pairs of 10 volumes)
N_BOOT = 200


def guided_set(guidance: float) -> str:
    return f"guidance-{guidance:g}"


@dataclass
class GeneratedSet:
    name: str
    requested: list[ConditionRow]  # what every sample is scored against (for all sets)
    features: dict[str, np.ndarray]  # space → [n, E] pooled tokens
    volumes: torch.Tensor  # [n, 1, D, H, W]
    guidance: float | None = None


# --- conditions -------------------------------------------------------------------------------------------


def swap_conditions(rows: Sequence[ConditionRow]) -> list[ConditionRow]:
    """Each row turned into a clearly different one: diagnosis two steps on (CN↔AD, MCI↔glioma), the other
    sex, the next modality and field strength, the end of the new diagnosis' age range farther from the asked age, and an
    MMSE from the new diagnosis' range. A model that follows its conditions must miss the requested ones."""
    out = []
    for row in rows:
        diagnosis = DIAGNOSES[(DIAGNOSES.index(row.diagnosis) + 2) % len(DIAGNOSES)] if row.diagnosis else None
        low, high = AGE_BY_DIAGNOSIS[diagnosis or "CN"]
        age = None if row.age is None else (low if abs(row.age - low) > abs(high - row.age) else high)
        mmse_range = MMSE_BY_DIAGNOSIS[diagnosis] if diagnosis else None
        out.append(replace(
            row, diagnosis=diagnosis, age=age,
            sex=None if row.sex is None else SEXES[1 - SEXES.index(row.sex)],
            modality=MODALITIES[(MODALITIES.index(row.modality) + 1) % len(MODALITIES)],
            field_strength=None if row.field_strength is None else
            FIELD_STRENGTHS_T[1 - FIELD_STRENGTHS_T.index(row.field_strength)],
            mmse=None if mmse_range is None or row.mmse is None else float(sum(mmse_range) / 2.0)))
    return out


def requested_table(rows: Sequence[ConditionRow]) -> ProbeTable:
    """The requested conditions as probe labels (each sample its own pseudo-subject)."""
    columns: dict[str, list[Any]] = {name: [] for name in ("age", "sex", "diagnosis", "modality", "field_strength", "mmse")}
    for row in rows:
        for name, value in row.to_dict().items():
            columns[name].append(value)
    return ProbeTable.for_generated(len(rows), **columns)


# --- generation (server) ---------------------------------------------------------------------------------------


@torch.no_grad()
def pooled_encoding(encoder: MAEEncoder, volumes: torch.Tensor, batch_size: int = 4) -> np.ndarray:
    """Mean-pooled frozen-encoder tokens [n, E] of volumes [n, 1, D, H, W] (the probes' features)."""
    parts = [encode_volumes(encoder, volumes[start:start + batch_size]).mean(1) for start in range(0, len(volumes), batch_size)]
    return torch.cat(parts).double().numpy()


def _features(models: GenerationModels, tokens: torch.Tensor, volumes: torch.Tensor) -> dict[str, np.ndarray]:
    encoder = models.require_encoder("generation evaluation (scan-space features)")
    return {"token": tokens.float().mean(1).double().numpy(), "scan": pooled_encoding(encoder, volumes)}


@torch.no_grad()
def _unconditioned(models: GenerationModels, n: int, steps: int, seed: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    dit = models.require_dit()
    generator = torch.Generator().manual_seed(seed)
    shape = (dit.config.num_tokens, dit.config.token_dim)
    parts = []
    with inference_autocast(models.device):
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            parts.append(sample(dit, (b, *shape), null_conditions(b), steps=steps, guidance_scale=1.0,
                                generator=generator).float().cpu())
    tokens = torch.cat(parts)
    return tokens, decode(models.decoder, tokens, batch_size)


@torch.no_grad()
def _noise(models: GenerationModels, n: int, seed: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    dit = models.require_dit()
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn((n, dit.config.num_tokens, dit.config.token_dim), generator=generator)
    tokens = dit.denormalize(x.to(dit.token_mean.device)).float().cpu()
    return tokens, decode(models.decoder, tokens, batch_size)


def generate_sets(models: GenerationModels, rows: Sequence[ConditionRow], *, guidances: Sequence[float], default_guidance: float,
                  steps: int, seed: int, batch_size: int = 8) -> list[GeneratedSet]:
    """The evaluation's sets (module docstring), all from the same seed: the guided sets start from the
    same noise, so the sweep compares guidance on paired samples."""
    rows = list(rows)
    sets = []
    for guidance in guidances:
        out = generate(models, rows, steps=steps, guidance_scale=guidance, seed=seed, batch_size=batch_size)
        sets.append(GeneratedSet(guided_set(guidance), rows, _features(models, out.tokens, out.volumes), out.volumes, guidance))
    swapped = generate(models, swap_conditions(rows), steps=steps, guidance_scale=default_guidance, seed=seed,
                       batch_size=batch_size)
    sets.append(GeneratedSet(SWAPPED, rows, _features(models, swapped.tokens, swapped.volumes), swapped.volumes,
                             default_guidance))
    tokens, volumes = _unconditioned(models, len(rows), steps, seed, batch_size)
    sets.append(GeneratedSet(UNCONDITIONED, rows, _features(models, tokens, volumes), volumes))
    tokens, volumes = _noise(models, len(rows), seed, batch_size)
    sets.append(GeneratedSet(NOISE, rows, _features(models, tokens, volumes), volumes))
    return sets


def set_key(name: str, space: str) -> str:
    return f"{name}/{space}"


def features_to_arrays(sets: Sequence[GeneratedSet]) -> Arrays:
    """What travels to the sites: generated features only (no volume, no patient)."""
    return {set_key(s.name, space): s.features[space].astype(np.float64) for s in sets for space in SPACES}


def adherence(heads: Mapping[str, LinearHead], sets: Sequence[GeneratedSet]) -> dict[str, dict[str, dict[str, float]]]:
    """set → space → `gen/adherence_*` of the probes on its features against the requested conditions."""
    return {s.name: {space: condition_adherence(heads, s.features[space], requested_table(s.requested))
                     for space in SPACES} for s in sets}


def diversity(sets: Sequence[GeneratedSet], seed: int = 0) -> dict[str, float]:
    """Mean pairwise MS-SSIM of each set's volumes (lower: more diverse)."""
    return {s.name: mean_pairwise_ms_ssim(s.volumes, max_pairs=DIVERSITY_PAIRS, seed=seed) for s in sets if len(s.volumes) >= 2}


# --- a site's side ----------------------------------------------------------------------------------------------


def held_out_records(site: SiteInputs) -> list[ScanRecord]:
    assert site.tokens is not None, "generation scores need the site's token cache of the frozen encoder"
    return site.tokens.ensure([r for name in HELD_OUT_SPLITS for r in site.data.splits[name]])


def split_halves(records: Sequence[ScanRecord]) -> tuple[list[int], list[int]]:
    """Row indices of two disjoint halves by subject (a subject's scans stay together; stable hash order)."""
    subjects = sorted({r.subject for r in records}, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    first = set(subjects[: len(subjects) // 2])
    a = [i for i, r in enumerate(records) if r.subject in first]
    return a, [i for i, r in enumerate(records) if r.subject not in first]


def _interval(estimate) -> dict[str, float]:
    return {"value": estimate.value, "ci_low": estimate.ci_low, "ci_high": estimate.ci_high}


def _distances(real: np.ndarray, generated: np.ndarray, bandwidth: float, seed: int) -> dict[str, dict[str, float]]:
    return {"fd": _interval(frechet_distance_bootstrap(real, generated, n_boot=N_BOOT, seed=seed)),
            "mmd": _interval(mmd_bootstrap(real, generated, kernel=MMDKernel(bandwidth=bandwidth), n_boot=N_BOOT, seed=seed))}


def site_generation_scores(site: SiteInputs, generated: Mapping[str, np.ndarray], kernels: Mapping[str, FourierKernel],
                           probe_data: SiteProbeData | None, heads: Mapping[str, LinearHead],
                           priors: Mapping[str, Sequence[float]], seed: int = 0) -> tuple[dict[str, Any], Arrays]:
    """Everything one site computes (module docstring): (per-site numbers, sums for pooling)."""
    held = held_out_records(site)
    real = np.stack([site.tokens.tokens(r).float().mean(0).double().numpy() for r in held]) if held else np.zeros((0, 1))
    a, b = split_halves(held)
    out: dict[str, Any] = {"n_held": len(held), "n_subjects": len({r.subject for r in held}), "n_half": [len(a), len(b)],
                           "sets": {}, "real_vs_real": {}}
    sums: Arrays = {}
    for space in SPACES:
        kernel = kernels[space]
        for part, rows in (("held", list(range(len(held)))), ("half_a", a), ("half_b", b)):
            if len(rows) >= MIN_ROWS:
                sums |= FeatureMoments.of(real[rows]).to_arrays(f"{part}/{space}")
                sums |= kernel.sums(real[rows]).to_arrays(f"{part}/{space}")
        if len(a) >= 2 and len(b) >= 2:
            out["real_vs_real"][space] = _distances(real[a], real[b], kernel.bandwidth, seed)
    if len(held) >= 2:
        for key, features in generated.items():
            name, space = key.rsplit("/", 1)
            scores = _distances(real, features, kernels[space].bandwidth, seed)
            if len(a) >= 2 and len(b) >= 2:  # equal-size comparison with real-vs-real
                subset = features[np.random.default_rng(seed).permutation(len(features))[: len(b)]]
                if len(subset) >= 2:
                    scores["fd_half"] = {"value": frechet_distance_bootstrap(real[a], subset, n_boot=N_BOOT, seed=seed).value}
            out["sets"].setdefault(name, {})[space] = scores
    volumes = [torch.from_numpy(np.ascontiguousarray(preprocess_scan(r.path, site.data.preset, site.data.cache)))
               for r in held[:10]]  # [1, D, H, W] each; 10 scans give the DIVERSITY_PAIRS pairs
    if len(volumes) >= 2:
        pairs = min(DIVERSITY_PAIRS, len(volumes) * (len(volumes) - 1) // 2)
        out["diversity_real"] = {"msssim": mean_pairwise_ms_ssim(torch.stack(volumes), max_pairs=pairs, seed=seed),
                                 "pairs": pairs}
    if probe_data is not None and heads:
        out["probes"] = score_heads(heads, priors, probe_data)
    return out, sums


# --- the federation's view (server) ------------------------------------------------------------------------------


def pooled_distances(site_sums: Sequence[Mapping[str, np.ndarray]], sets: Sequence[GeneratedSet],
                     kernels: Mapping[str, FourierKernel], seed: int = 0) -> dict[str, Any]:
    """FD and MMD of every generated set against all sites' held-out scans together, from their sums.

    The interval resamples the generated set only (the real side is a fixed sum: a pooled bootstrap over
    patients would need each patient's feature) and is normal, value ± 1.96 · bootstrap std, as in
    `metrics.frechet_distance_bootstrap`: resamples repeat rows, which biases FD (and the Fourier MMD, whose
    sums cannot tell a repeated row from a new one) upward, so percentiles would leave the estimate. The
    per-site intervals resample both sides."""
    out: dict[str, Any] = {"sets": {}, "real_vs_real": {}}
    rng = np.random.default_rng(seed)
    for space in SPACES:
        parts = {part: [s for s in site_sums if f"{part}/{space}.count" in s] for part in ("held", "half_a", "half_b")}
        if not parts["held"]:
            continue
        moments = {p: FeatureMoments.combine(FeatureMoments.from_arrays(s, f"{p}/{space}") for s in v)
                   for p, v in parts.items() if v}
        ksums = {p: KernelSums.combine(KernelSums.from_arrays(s, f"{p}/{space}") for s in v) for p, v in parts.items() if v}
        if "half_a" in moments and "half_b" in moments:
            out["real_vs_real"][space] = {"fd": frechet_from_moments(moments["half_a"], moments["half_b"]),
                                          "mmd": mmd_from_sums(ksums["half_a"], ksums["half_b"]),
                                          "n": [moments["half_a"].count, moments["half_b"].count]}
        for generated in sets:
            x = generated.features[space]
            if len(x) < 2:
                continue
            fd = frechet_from_moments(moments["held"], FeatureMoments.of(x))
            mmd = mmd_from_sums(ksums["held"], kernels[space].sums(x))
            phi = kernels[space].map(x)
            boot_fd, boot_mmd = [], []
            for _ in range(N_BOOT):
                pick = rng.integers(0, len(x), len(x))
                boot_fd.append(frechet_from_moments(moments["held"], FeatureMoments.of(x[pick])))
                boot_mmd.append(mmd_from_sums(ksums["held"], KernelSums.of_mapped(phi[pick])))
            fd_margin, mmd_margin = 1.96 * float(np.std(boot_fd, ddof=1)), 1.96 * float(np.std(boot_mmd, ddof=1))
            scores: dict[str, Any] = {
                "fd": {"value": fd, "ci_low": max(fd - fd_margin, 0.0), "ci_high": fd + fd_margin},
                "mmd": {"value": mmd, "ci_low": mmd - mmd_margin, "ci_high": mmd + mmd_margin},
                "n_real": moments["held"].count, "n_generated": len(x)}
            if "half_a" in moments and "half_b" in moments and moments["half_b"].count <= len(x):
                subset = x[np.random.default_rng(seed).permutation(len(x))[: moments["half_b"].count]]
                scores["fd_half"] = {"value": frechet_from_moments(moments["half_a"], FeatureMoments.of(subset))}
            out["sets"].setdefault(generated.name, {})[space] = scores
    return out


def pooled_diversity(per_site: Mapping[str, Mapping[str, Any]]) -> float:
    """Pair-weighted mean of the sites' within-site MS-SSIM (cross-site pairs would need both scans)."""
    parts = [(s["diversity_real"]["msssim"], s["diversity_real"]["pairs"]) for s in per_site.values() if "diversity_real" in s]
    total = sum(w for _, w in parts)
    return sum(v * w for v, w in parts) / total if total else math.nan


def fourier_kernels(sets: Sequence[GeneratedSet], reference: str, seed: int) -> dict[str, FourierKernel]:
    """One kernel per space, bandwidth by the median heuristic on the reference set (fixed for all sites)."""
    chosen = next(s for s in sets if s.name == reference)
    return {space: FourierKernel(chosen.features[space].shape[1], median_bandwidth(chosen.features[space], seed=seed), seed)
            for space in SPACES}
