"""Anatomy of one subject at one visit: deformation, ageing, neurodegeneration, lesions and tumour.

Everything is a backward map: for each output voxel `x` (subject space, world mm) we find the template
point it shows and sample the template there. The chain, in template space:

    q0 = c + (x − c) / head_scale + u(x)        per subject: head size and a smooth random warp
    q1 = q0 + a(t) · v(q0)                      per visit: ventricles enlarge along v by a(t) mm
    q2 = M_t(q1)                                per visit: a glioma's mass pushes tissue away
    fractions = template maps at q2, then GM → CSF (atrophy), WM → lesion, tissue → tumour

Because q0 is fixed per subject, a subject's visits differ only by the disease course.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from braing3n_core.data.cohort.anatomy import BRAIN, Anatomy, hippocampal_weight
from braing3n_core.data.cohort.grid import COARSE_MM, SamplingGrid
from braing3n_core.data.cohort.subjects import MAX_VENTRICLE_PUSH_MM, SessionState, SubjectPlan, TumourPlan

TISSUES: tuple[str, ...] = ("csf", "gm", "wm", "wm_lesion", "necrosis", "enhancing", "oedema")
"""Tissue classes whose fractions sum to the brain fraction of a voxel; intensities are set per class."""

LABELS: tuple[str, ...] = (
    "background", "csf", "ventricle", "gm", "hippocampus", "wm", "wm_lesion", "necrosis", "enhancing", "oedema",
)
"""Index → name of the hard ground-truth label map (dseg)."""

_WARP_SIGMA_MM = 12.0  # smoothness of the anatomical-variability field
_WARP_RMS_MM = 2.5  # its typical displacement
_MASS_FRACTION = 0.7  # share of the tumour radius that displaces tissue (the rest infiltrates)
_MASS_DECAY_MM = 15.0  # the skull confines mass effect: it fades over this distance
_EDGE_MM = 0.8  # width of soft compartment edges (partial volume)
_NEGLIGIBLE_SHIFT_MM = 0.025  # a smaller shift changes the smooth template maps by well under 1 %


@dataclass(frozen=True, eq=False)
class SubjectGeometry:
    """Per-subject sampling state on the candidate voxels (those that can hold brain at any visit).

    Visits re-sample the template only where they move the sampling point by a measurable amount (around
    the ventricles and a tumour); elsewhere the visit-independent samples `static` at q0 are reused,
    which saves about half of the generator's interpolation work.
    """

    flat_index: np.ndarray  # (N,) int, C-order indices into the site grid
    points_mm: np.ndarray  # (3, N) float32 subject-space world coordinates
    template_mm: np.ndarray  # (3, N) float32 q0
    push: np.ndarray  # (3, N) float32 ventricle-enlargement direction at q0
    static: np.ndarray  # (4, N) float32 brain, GM, WM, ventricle sampled at q0
    push_size: np.ndarray  # (N,) float32 largest component of `push`


@dataclass(frozen=True, eq=False)
class TissueMaps:
    fractions: np.ndarray  # (len(TISSUES), N) float32
    ventricle: np.ndarray  # (N,) part of the CSF fraction
    hippocampus: np.ndarray  # (N,) part of the GM fraction
    inside: np.ndarray  # (K,) indices into N of voxels in the skull-stripped brain (fraction ≥ 0.5)


def subject_geometry(grid: SamplingGrid, anatomy: Anatomy, plan: SubjectPlan, rng: np.random.Generator) -> SubjectGeometry:
    coarse_x = grid.coarse_points_mm().astype(np.float32)  # (3, cx, cy, cz)
    warp = _random_warp(grid.coarse_shape, rng)
    centre = anatomy.brain_centre_mm.astype(np.float32)[:, None, None, None]
    coarse_q0 = centre + (coarse_x - centre) / plan.head_scale + warp

    # Candidate voxels: near template brain at q0, widened by the largest outward tumour push.
    reach = anatomy.sample((BRAIN,), coarse_q0.reshape(3, -1))[0].reshape(grid.coarse_shape) > 0.01
    margin_mm = 4.0 + (8.0 if plan.tumour is not None else 0.0)
    reach = ndimage.binary_dilation(reach, iterations=int(np.ceil(margin_mm / COARSE_MM)))
    # The dilation already adds a node of margin, so a voxel counts when its nearest node is reached.
    flat_index = np.flatnonzero(grid.nearest(reach))

    coarse_push = anatomy.sample_push(coarse_q0.reshape(3, -1)).reshape(coarse_q0.shape)
    template_mm = grid.upsample_at(coarse_q0, flat_index)
    push = grid.upsample_at(coarse_push, flat_index)
    static = anatomy.sample_tissue(template_mm)
    push_size = np.abs(push).max(axis=0)
    return SubjectGeometry(flat_index, grid.points_mm(flat_index), template_mm, push, static, push_size)


def _random_warp(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Smooth displacement (3, *shape) float32 in mm: Gaussian noise blurred to ~12 mm, 2.5 mm RMS."""
    noise = rng.standard_normal((3, *shape), dtype=np.float32)
    warp = np.stack([ndimage.gaussian_filter(noise[a], _WARP_SIGMA_MM / COARSE_MM, mode="nearest") for a in range(3)])
    warp *= _WARP_RMS_MM / max(float(warp.std()), 1e-6)
    return np.clip(warp, -3.0 * _WARP_RMS_MM, 3.0 * _WARP_RMS_MM)


def session_tissues(geometry: SubjectGeometry, anatomy: Anatomy, plan: SubjectPlan, state: SessionState) -> TissueMaps:
    if state.ventricle_push_mm > MAX_VENTRICLE_PUSH_MM:
        raise ValueError(f"ventricle push {state.ventricle_push_mm} mm exceeds the modelled {MAX_VENTRICLE_PUSH_MM} mm")
    # Only voxels whose sampling point moves by a measurable amount are sampled again.
    moved = np.flatnonzero(geometry.push_size * np.float32(state.ventricle_push_mm) > _NEGLIGIBLE_SHIFT_MM)
    q1 = geometry.template_mm.copy()
    q1[:, moved] += np.float32(state.ventricle_push_mm) * geometry.push[:, moved]
    q2 = q1
    core = rim = oedema = None
    if plan.tumour is not None and state.tumour_radius_mm > 0:
        q2, core, rim, oedema, near = _tumour(q1, plan.tumour, state.tumour_radius_mm)
        is_moved = np.zeros(q1.shape[1], dtype=bool)
        is_moved[moved] = True
        is_moved[near] = True
        moved = np.flatnonzero(is_moved)

    samples = geometry.static.copy()
    samples[:, moved] = anatomy.sample_tissue(q2[:, moved])
    brain, gm, wm, ventricle = samples
    csf = np.maximum(brain - gm - wm, 0.0)
    ventricle = np.minimum(ventricle, csf)

    # Atrophy: GM becomes CSF, everywhere with age, and more in the medial temporal lobe with disease.
    hippocampal = hippocampal_weight(q2)
    loss = gm * np.minimum(state.global_atrophy + state.hippocampal_atrophy * hippocampal, 0.9)
    gm -= loss
    csf += loss
    hippocampus = gm * hippocampal

    lesion = _lesion_fraction(anatomy, plan, state, q2, wm)
    wm -= lesion

    necrosis = enhancing = oedema_fraction = np.zeros_like(gm)
    if core is not None:
        mass = np.clip(core + rim, 0.0, 1.0)
        keep = 1.0 - mass
        for array in (csf, gm, wm, lesion, ventricle, hippocampus):
            array *= keep
        necrosis, enhancing = core * brain, rim * brain
        oedema_wm, oedema_gm = oedema * wm, 0.3 * oedema * gm
        wm -= oedema_wm
        gm -= oedema_gm
        hippocampus = np.minimum(hippocampus, gm)
        oedema_fraction = oedema_wm + oedema_gm
    fractions = np.stack([csf, gm, wm, lesion, necrosis, enhancing, oedema_fraction]).astype(np.float32)
    inside = np.flatnonzero(fractions.sum(axis=0) >= 0.5)
    return TissueMaps(fractions, ventricle.astype(np.float32), hippocampus.astype(np.float32), inside)


def _lesion_fraction(anatomy: Anatomy, plan: SubjectPlan, state: SessionState, q: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Lesion fraction (N,), taken from WM: active ellipsoids painted on the template grid, then sampled."""
    lesion = np.zeros(q.shape[1], dtype=np.float32)
    active = np.flatnonzero(state.lesion_radii_mm.max(axis=1) > 0.3)
    if active.size == 0:
        return lesion
    painted = np.zeros(anatomy.shape, dtype=np.float32)
    for index in active:
        _paint_ellipsoid(painted, anatomy, plan.lesion_centres_mm[index], state.lesion_radii_mm[index])
    in_wm = np.flatnonzero(wm > 0.01)
    coords = anatomy.to_grid(q[:, in_wm]).astype(np.float32)
    lesion[in_wm] = wm[in_wm] * ndimage.map_coordinates(painted, coords, order=1, mode="constant", cval=0.0, prefilter=False)
    return lesion


def _paint_ellipsoid(volume: np.ndarray, anatomy: Anatomy, centre_mm: np.ndarray, semi_axes_mm: np.ndarray) -> None:
    """Soft axis-aligned ellipsoid added (by maximum) into the lookup-grid volume, inside its bounding box."""
    low = np.floor((centre_mm - semi_axes_mm - 2.0 - anatomy.origin_mm) / anatomy.grid_mm).astype(int)
    high = np.ceil((centre_mm + semi_axes_mm + 2.0 - anatomy.origin_mm) / anatomy.grid_mm).astype(int) + 1
    low, high = np.maximum(low, 0), np.minimum(high, anatomy.shape)
    if np.any(high <= low):
        return
    axes = [anatomy.origin_mm[a] + np.arange(low[a], high[a]) * anatomy.grid_mm - centre_mm[a] for a in range(3)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    radius = np.sqrt((x / semi_axes_mm[0]) ** 2 + (y / semi_axes_mm[1]) ** 2 + (z / semi_axes_mm[2]) ** 2)
    soft = _inside(radius, 1.0, _EDGE_MM / max(float(semi_axes_mm.min()), 0.5))
    box = volume[low[0] : high[0], low[1] : high[1], low[2] : high[2]]
    np.maximum(box, soft, out=box)


def _tumour(q1: np.ndarray, tumour: TumourPlan, radius_mm: float) -> tuple[np.ndarray, ...]:
    """Mass effect and compartments of a glioma of rim radius `radius_mm` at visit coordinates q1 (3, N).

    Returns (q2, core, rim, oedema, near): displaced template coordinates, per-voxel compartment
    fractions, and the indices of the voxels the tumour affects at all.
    """
    offset = q1 - tumour.centre_mm.astype(np.float32)[:, None]
    distance = np.sqrt((offset**2).sum(axis=0))
    scale = radius_mm / tumour.radius_mm
    oedema_outer = radius_mm + tumour.oedema_margin_mm * np.sqrt(scale)
    near = np.flatnonzero(distance < 5.0 * radius_mm)

    q2 = q1.copy()
    core, rim, oedema = (np.zeros(q1.shape[1], dtype=np.float32) for _ in range(3))
    d = np.maximum(distance[near], 1e-3)
    # Inserting a ball of radius R_m moves a point at distance d from cbrt(d³ − R_m³); the skull limits
    # how far that reaches, so the push decays with distance beyond the ball.
    mass_radius = _MASS_FRACTION * radius_mm
    pushed = np.cbrt(np.maximum(d**3 - mass_radius**3, 0.0))
    shift = (d - pushed) * np.exp(-np.maximum(d - mass_radius, 0.0) / _MASS_DECAY_MM)
    q2[:, near] = tumour.centre_mm.astype(np.float32)[:, None] + offset[:, near] * ((d - shift) / d)

    # Compartments: an elongated, lobulated ball in the tumour's own frame.
    local = (tumour.frame @ offset[:, near]) / tumour.axis_scale[:, None]
    local_distance = np.sqrt((local**2).sum(axis=0))
    direction = local / np.maximum(local_distance, 1e-3)
    ripple = 1.0 + sum(lobe[3] * (2.0 * (lobe[:3] @ direction) ** 2 - 1.0) for lobe in tumour.lobulation)
    normalised = local_distance / ripple  # mm, compared with the radii below
    edge = _EDGE_MM
    inside_rim = _inside(normalised, radius_mm, edge)
    core[near] = _inside(normalised, max(radius_mm - tumour.rim_thickness_mm, 0.0), edge)
    rim[near] = inside_rim - core[near]
    oedema[near] = _inside(normalised, oedema_outer, 2.0 * edge) - inside_rim
    return q2, core, np.clip(rim, 0.0, 1.0), np.clip(oedema, 0.0, 1.0), near


def _inside(distance: np.ndarray, radius: float, width: float) -> np.ndarray:
    """Soft indicator of distance < radius, falling from 1 to 0 over about `width`."""
    return (1.0 / (1.0 + np.exp(np.clip((distance - radius) / (0.3 * width), -30.0, 30.0)))).astype(np.float32)


def truth_volumes(tissues: TissueMaps, voxel_ml: float) -> dict[str, float]:
    """True volumes in ml, from the fractions (partial volume counted, not thresholded)."""
    totals = dict(zip(TISSUES, tissues.fractions.sum(axis=1, dtype=np.float64) * voxel_ml))
    volumes = {
        "gm_ml": totals["gm"],
        "wm_ml": totals["wm"],
        "csf_ml": totals["csf"],
        "ventricle_ml": float(tissues.ventricle.sum(dtype=np.float64) * voxel_ml),
        "hippocampus_ml": float(tissues.hippocampus.sum(dtype=np.float64) * voxel_ml),
        "wm_lesion_ml": totals["wm_lesion"],
        "tumour_necrosis_ml": totals["necrosis"],
        "tumour_enhancing_ml": totals["enhancing"],
        "tumour_ml": totals["necrosis"] + totals["enhancing"],
        "oedema_ml": totals["oedema"],
        "brain_ml": float(sum(totals.values())),
    }
    return {key: round(float(value), 3) for key, value in volumes.items()}


def label_map(tissues: TissueMaps) -> np.ndarray:
    """Hard labels (N,) uint8 indexing LABELS: the largest class per voxel, 0 outside the brain."""
    inside = tissues.inside
    fractions = tissues.fractions[:, inside]
    ventricle, hippocampus = tissues.ventricle[inside], tissues.hippocampus[inside]
    classes = np.stack(
        [
            fractions[0] - ventricle,  # csf outside the ventricles
            ventricle,
            fractions[1] - hippocampus,  # gm outside the hippocampal region
            hippocampus,
            *fractions[2:],
        ]
    )
    labels = np.zeros(tissues.fractions.shape[1], dtype=np.uint8)
    labels[inside] = classes.argmax(axis=0) + 1
    return labels
