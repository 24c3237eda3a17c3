"""Subjects and their visits: demographics, disease course and the per-visit state the renderer draws.

A subject is planned once (`plan_subject`) from its own random stream; every visit is then a pure
function of that plan and the visit time (`session_states`). That is what keeps a subject's visits
consistent: the same anatomy, lesions that appear and grow but never vanish, a tumour that grows, a
disease severity that only increases, and an MMSE that therefore never improves in MCI or AD.

Disease model (one latent severity `s` per subject, growing linearly in time):
- CN: s = 0; glioma: s = 0 (its course is the tumour's growth);
- MCI: s ∈ [0.3, 0.9) at baseline; AD: s ∈ [1.0, 2.0); MCI converts to AD when s reaches 1;
- MMSE = 29.3 − 4 s − 1.6 s² + a subject offset, rounded and clipped to 0–30: CN ≈ 28–30, MCI ≈ 24–28,
  AD ≈ 12–24 at baseline and falling;
- medial-temporal (hippocampal) GM loss grows with s; ventricle enlargement and global GM loss grow
  with age and with s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from braing3n_core.data.cohort.anatomy import Anatomy
from braing3n_core.data.cohort.sites import SiteProfile, site_id

_DIAGNOSIS_AGES = {"CN": (18.0, 95.0), "MCI": (55.0, 92.0), "AD": (58.0, 95.0), "glioma": (22.0, 82.0)}
_FEMALE_SHARE = {"CN": 0.5, "MCI": 0.5, "AD": 0.6, "glioma": 0.42}
# Linear head scale about the brain centre: the ICBM152 mask (1,883 ml) is an enlarged average, so
# these bring intracranial volumes to about 1,440 ml (F) and 1,640 ml (M).
_HEAD_SCALE = {"F": 0.915, "M": 0.955}
_HEAD_SCALE_SD = 0.025
MAX_VENTRICLE_PUSH_MM = 8.5
"""Ventricle enlargement saturates below this shift, where the push field (anatomy.py) stays a
one-to-one map (its Jacobian determinant is still positive at 8.5 mm)."""


@dataclass(frozen=True)
class TumourPlan:
    centre_mm: np.ndarray  # (3,) template mm
    radius_mm: float  # outer radius of the enhancing rim at baseline
    growth_mm_per_year: float
    rim_thickness_mm: float  # enhancing rim; inside it lies the necrotic core
    oedema_margin_mm: float  # oedema extends this far beyond the rim at baseline (scales with radius)
    frame: np.ndarray  # (3, 3) rotation; rows are the tumour's axes in template coordinates
    axis_scale: np.ndarray  # (3,) elongation of the mass along its axes
    lobulation: np.ndarray  # (3, 4) low-order surface ripple: direction (3) + amplitude per lobe


@dataclass(frozen=True)
class SubjectPlan:
    participant_id: str  # "sub-a001"
    sex: str
    baseline_age: float
    baseline_diagnosis: str
    head_scale: float
    severity0: float
    severity_rate: float  # per year
    mmse_offset: float
    mmse_recorded: bool
    visit_years: tuple[float, ...]  # years since baseline, first is 0
    lesion_centres_mm: np.ndarray  # (L, 3) template mm
    lesion_onset_age: np.ndarray  # (L,)
    lesion_max_radius_mm: np.ndarray  # (L, 3) semi-axes when fully grown
    tumour: TumourPlan | None


@dataclass(frozen=True)
class SessionState:
    session_id: str  # "ses-01"
    years: float  # since baseline
    age: float
    diagnosis: str
    severity: float
    mmse: float | None
    ventricle_push_mm: float
    global_atrophy: float  # fraction of all GM turned into CSF
    hippocampal_atrophy: float  # extra fraction of hippocampal-region GM turned into CSF
    lesion_radii_mm: np.ndarray  # (L, 3) semi-axes now; 0 where the lesion has not appeared yet
    tumour_radius_mm: float  # 0 without a tumour


def participant_label(site_index: int, subject_index: int, n_subjects: int) -> str:
    """BIDS participant label, unique across the federation: sub-a001, sub-b017, …"""
    width = max(3, len(str(n_subjects)))
    return f"sub-{site_id(site_index).removeprefix('site-')}{subject_index + 1:0{width}d}"


def plan_subject(
    rng: np.random.Generator,
    participant_id: str,
    diagnosis: str,
    profile: SiteProfile,
    anatomy: Anatomy,
) -> SubjectPlan:
    low, high = profile.age_range
    dx_low, dx_high = _DIAGNOSIS_AGES[diagnosis]
    if max(low, dx_low) < min(high, dx_high):
        low, high = max(low, dx_low), min(high, dx_high)
    age = float(np.round(rng.uniform(low, high), 1))
    sex = "F" if rng.random() < _FEMALE_SHARE[diagnosis] else "M"
    head_scale = float(_HEAD_SCALE[sex] * np.exp(rng.normal(0.0, _HEAD_SCALE_SD / _HEAD_SCALE[sex])))

    if diagnosis == "MCI":
        severity0, rate = rng.uniform(0.3, 0.9), rng.uniform(0.03, 0.2)
    elif diagnosis == "AD":
        severity0, rate = rng.uniform(1.0, 2.0), rng.uniform(0.08, 0.25)
    else:
        severity0, rate = 0.0, 0.0

    n_followups = int(rng.choice(4, p=np.asarray(profile.followup_probs) / sum(profile.followup_probs)))
    gaps = np.round(rng.uniform(0.5, 3.0, size=n_followups), 2)
    visit_years = tuple(float(v) for v in np.concatenate([[0.0], np.cumsum(gaps)]))

    last_age = age + visit_years[-1]
    # White-matter hyperintensities: rare before 45, then about one more every three years; more with
    # neurodegeneration (shared vascular risk). About 3 ml at 75, as in population studies.
    expected = 0.3 + max(last_age - 45.0, 0.0) / 3.0 + 3.0 * (severity0 + rate * visit_years[-1])
    n_lesions = int(rng.poisson(expected))
    sites = anatomy.lesion_sites_mm[rng.integers(len(anatomy.lesion_sites_mm), size=n_lesions)]
    lesion_centres = sites + rng.normal(0.0, 1.0, size=(n_lesions, 3))
    earliest = min(age, 45.0) if last_age > 45.0 else age - 5.0
    lesion_onset = rng.uniform(earliest - 10.0, last_age, size=n_lesions)
    lesion_radius = rng.uniform(2.5, 7.0, size=(n_lesions, 1)) * rng.uniform(0.5, 1.0, size=(n_lesions, 3))

    tumour = _plan_tumour(rng, anatomy) if diagnosis == "glioma" else None
    return SubjectPlan(
        participant_id=participant_id,
        sex=sex,
        baseline_age=age,
        baseline_diagnosis=diagnosis,
        head_scale=head_scale,
        severity0=float(severity0),
        severity_rate=float(rate),
        mmse_offset=float(np.clip(rng.normal(0.0, 0.6), -1.0, 1.0)),
        mmse_recorded=bool(rng.random() < profile.mmse_recorded),
        visit_years=visit_years,
        lesion_centres_mm=lesion_centres,
        lesion_onset_age=lesion_onset,
        lesion_max_radius_mm=lesion_radius,
        tumour=tumour,
    )


def _plan_tumour(rng: np.random.Generator, anatomy: Anatomy) -> TumourPlan:
    centre = anatomy.tumour_sites_mm[rng.integers(len(anatomy.tumour_sites_mm))]
    frame, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    directions = rng.normal(size=(3, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    lobulation = np.concatenate([directions, rng.uniform(0.05, 0.15, size=(3, 1))], axis=1)
    return TumourPlan(
        centre_mm=centre + rng.normal(0.0, 2.0, size=3),
        radius_mm=float(rng.uniform(10.0, 18.0)),
        growth_mm_per_year=float(rng.uniform(2.0, 6.0)),
        rim_thickness_mm=float(rng.uniform(2.5, 6.0)),
        oedema_margin_mm=float(rng.uniform(6.0, 14.0)),
        frame=frame,
        axis_scale=rng.uniform(0.85, 1.15, size=3),
        lobulation=lobulation,
    )


def session_states(plan: SubjectPlan) -> list[SessionState]:
    return [_session_state(plan, index, years) for index, years in enumerate(plan.visit_years)]


def _session_state(plan: SubjectPlan, index: int, years: float) -> SessionState:
    age = plan.baseline_age + years
    severity = plan.severity0 + plan.severity_rate * years
    if plan.baseline_diagnosis in ("MCI", "AD"):
        diagnosis = "AD" if severity >= 1.0 else "MCI"
    else:
        diagnosis = plan.baseline_diagnosis

    ageing = max(age - 25.0, 0.0) / 55.0  # 0 at 25, 1 at 80
    lesion_growth = np.clip((age - plan.lesion_onset_age) / 3.0 + 0.3, 0.0, 1.0)
    lesion_growth = np.where(age >= plan.lesion_onset_age, lesion_growth, 0.0)
    tumour_radius = 0.0
    if plan.tumour is not None:
        tumour_radius = min(plan.tumour.radius_mm + plan.tumour.growth_mm_per_year * years, 32.0)
    return SessionState(
        session_id=f"ses-{index + 1:02d}",
        years=float(np.round(years, 2)),
        age=float(np.round(age, 2)),
        diagnosis=diagnosis,
        severity=float(severity),
        mmse=_mmse(plan, severity, age, tumour_radius) if plan.mmse_recorded else None,
        ventricle_push_mm=_ventricle_push(ageing, severity),
        global_atrophy=float(min(0.0025 * max(age - 30.0, 0.0) + 0.02 * severity, 0.35)),
        hippocampal_atrophy=float(min(0.002 * max(age - 50.0, 0.0) + 0.13 * severity, 0.6)),
        lesion_radii_mm=plan.lesion_max_radius_mm * lesion_growth[:, None],
        tumour_radius_mm=float(tumour_radius),
    )


def _ventricle_push(ageing: float, severity: float) -> float:
    """Ventricle-wall shift in mm: grows with age and severity, saturating (never decreasing) below
    MAX_VENTRICLE_PUSH_MM."""
    drive = 6.5 * ageing**1.5 + 4.0 * severity
    return float(MAX_VENTRICLE_PUSH_MM * (1.0 - np.exp(-drive / MAX_VENTRICLE_PUSH_MM)))


def _mmse(plan: SubjectPlan, severity: float, age: float, tumour_radius: float) -> float:
    score = 29.3 - 4.0 * severity - 1.6 * severity**2 + plan.mmse_offset
    score -= 0.03 * max(age - 75.0, 0.0)  # mild normal ageing
    if plan.tumour is not None:
        score -= 0.08 * max(tumour_radius - 12.0, 0.0)
    return float(np.clip(np.round(score), 0.0, 30.0))
