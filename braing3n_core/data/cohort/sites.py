"""Site profiles: who a hospital scans and how (non-IID by design).

Four archetypes, used in this order so that any two sites already cover all four diagnoses, all four
modalities and both field strengths:

| site   | archetype         | field | ages  | diagnoses                  | modalities            |
|--------|-------------------|-------|-------|----------------------------|-----------------------|
| site-a | memory clinic     | 1.5 T | 60–90 | CN / MCI / AD              | T1w, T2w, FLAIR       |
| site-b | neuro-oncology    | 3 T   | 25–80 | glioma, some CN            | all four              |
| site-c | young research    | 3 T   | 18–45 | CN                         | T1w, T2w              |
| site-d | general hospital  | 1.5 T | 20–90 | CN / MCI / AD / glioma     | T1w, T1c, FLAIR       |

Beyond four sites the archetypes repeat with seeded variation (age range, diagnosis mix, field
strength, vendor), so a 12-site federation is still heterogeneous but not a copy of the first four.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, replace

import numpy as np

from braing3n_core.labels import DIAGNOSES, Modality


@dataclass(frozen=True)
class SiteProfile:
    """What makes a site's population and protocol differ from the others'."""

    archetype: str
    description: str
    age_range: tuple[float, float]  # years at baseline
    diagnosis_mix: tuple[float, ...]  # fractions, aligned with labels.DIAGNOSES
    modalities: tuple[Modality, ...]
    field_strength: float  # tesla
    manufacturer: str
    model: str
    followup_probs: tuple[float, float, float, float]  # P(0, 1, 2, 3 follow-up sessions)
    mmse_recorded: float  # probability that a subject's MMSE is on record at this site


_T1, _T1C, _T2, _FLAIR = Modality.T1W, Modality.T1C, Modality.T2W, Modality.FLAIR

ARCHETYPES: tuple[SiteProfile, ...] = (
    SiteProfile(
        archetype="memory-clinic",
        description="elderly memory-clinic cohort on a 1.5 T scanner, CN/MCI/AD, long follow-up",
        age_range=(60.0, 90.0),
        diagnosis_mix=(0.35, 0.35, 0.30, 0.0),
        modalities=(_T1, _T2, _FLAIR),
        field_strength=1.5,
        manufacturer="GE",
        model="SIGNA Artist",
        followup_probs=(0.1, 0.3, 0.3, 0.3),
        mmse_recorded=1.0,
    ),
    SiteProfile(
        archetype="neuro-oncology",
        description="3 T neuro-oncology centre, mostly glioma with control scans",
        age_range=(25.0, 80.0),
        diagnosis_mix=(0.3, 0.0, 0.0, 0.7),
        modalities=(_T1, _T1C, _T2, _FLAIR),
        field_strength=3.0,
        manufacturer="Siemens",
        model="MAGNETOM Skyra",
        followup_probs=(0.2, 0.4, 0.3, 0.1),
        mmse_recorded=0.5,
    ),
    SiteProfile(
        archetype="young-research",
        description="3 T research centre scanning young, mostly healthy volunteers",
        age_range=(18.0, 45.0),
        diagnosis_mix=(1.0, 0.0, 0.0, 0.0),
        modalities=(_T1, _T2),
        field_strength=3.0,
        manufacturer="Siemens",
        model="MAGNETOM Prisma",
        followup_probs=(0.6, 0.3, 0.1, 0.0),
        mmse_recorded=0.3,
    ),
    SiteProfile(
        archetype="general-hospital",
        description="1.5 T general hospital with a mixed clinical population",
        age_range=(20.0, 90.0),
        diagnosis_mix=(0.4, 0.2, 0.2, 0.2),
        modalities=(_T1, _T1C, _FLAIR),
        field_strength=1.5,
        manufacturer="Philips",
        model="Ingenia",
        followup_probs=(0.4, 0.3, 0.2, 0.1),
        mmse_recorded=0.8,
    ),
)

_SCANNERS = {
    1.5: (("GE", "SIGNA Artist"), ("Siemens", "MAGNETOM Aera"), ("Philips", "Ingenia")),
    3.0: (("Siemens", "MAGNETOM Prisma"), ("GE", "SIGNA Premier"), ("Philips", "Achieva dStream")),
}


def site_id(site_index: int) -> str:
    """site-a … site-z, then site-aa, site-ab, … (BIDS-safe, sorts with the index up to 702 sites)."""
    letters = string.ascii_lowercase
    if site_index < 26:
        return f"site-{letters[site_index]}"
    first, second = divmod(site_index - 26, 26)
    return f"site-{letters[first]}{letters[second]}"


def site_profile(site_index: int, rng: np.random.Generator) -> SiteProfile:
    """The archetype for this index; from the fifth site on, a seeded variation of it."""
    base = ARCHETYPES[site_index % len(ARCHETYPES)]
    if site_index < len(ARCHETYPES):
        return base
    low, high = base.age_range
    shift = float(rng.uniform(-8.0, 8.0))
    age_range = (float(np.clip(low + shift, 18.0, 70.0)), float(np.clip(high + shift, low + shift + 15.0, 95.0)))
    mix = np.asarray(base.diagnosis_mix)
    # Dirichlet around the archetype's mix; diagnoses it never sees stay absent.
    varied = np.where(mix > 0, rng.dirichlet(mix * 20.0 + 1e-9), 0.0)
    varied = varied / varied.sum()
    field = float(rng.choice([1.5, 3.0], p=[0.3, 0.7] if base.field_strength == 3.0 else [0.7, 0.3]))
    manufacturer, model = _SCANNERS[field][int(rng.integers(len(_SCANNERS[field])))]
    return replace(
        base,
        description=f"{base.description} (variant {site_index // len(ARCHETYPES)})",
        age_range=age_range,
        diagnosis_mix=tuple(float(v) for v in varied),
        field_strength=field,
        manufacturer=manufacturer,
        model=model,
    )


def diagnosis_quota(profile: SiteProfile, n_subjects: int, rng: np.random.Generator) -> list[str]:
    """Each subject's baseline diagnosis: the site's mix rounded by largest remainder, then shuffled.

    A quota rather than independent draws keeps small test cohorts representative (a 6-subject memory
    clinic still has CN, MCI and AD subjects) and makes the diagnosis of subject k independent of how
    subjects are distributed over worker processes.
    """
    mix = np.asarray(profile.diagnosis_mix, dtype=np.float64)
    exact = mix / mix.sum() * n_subjects
    counts = np.floor(exact).astype(int)
    remainder = exact - counts
    for index in np.argsort(-remainder, kind="stable")[: n_subjects - counts.sum()]:
        counts[index] += 1
    labels = [diagnosis for diagnosis, count in zip(DIAGNOSES, counts) for _ in range(count)]
    order = rng.permutation(n_subjects)
    return [labels[i] for i in order]
