"""Seed anatomy for the synthetic cohort: nilearn's bundled ICBM152 2009a template and maps derived from it.

Everything here lives in template (MNI) world millimetres. The generator maps each output voxel to a
template point and samples these maps there, so the anatomy is loaded once per process (cached) and
shared by forked workers without copying.

Derived structures (nilearn ships none of them, see data-sources.md §1.3):
- CSF = brain mask − GM − WM;
- ventricles = connected components of deep CSF (CSF > 0.5, more than 12 mm inside the mask) near the
  mid-line, which keeps the lateral, third and fourth ventricles and drops the Sylvian fissures;
- hippocampal region = medial-temporal ellipsoids around (±28, −21, −13) mm along the hippocampal long
  axis, intersected with GM when it is used (`hippocampal_weight`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

# Lookup-map channels, in the order of `Anatomy.maps`.
BRAIN, GM, WM, VENTRICLE = 0, 1, 2, 3

# Hippocampal region: centre (mm, MNI), semi-axes (mm) along the rotated axes, pitch of the long axis.
# The hippocampus runs posterior-superior from the amygdala at about 35° to the AC-PC plane.
HIPPOCAMPUS_CENTRES_MM = np.array([[-28.0, -21.0, -13.0], [28.0, -21.0, -13.0]])
HIPPOCAMPUS_SEMI_AXES_MM = np.array([6.0, 19.0, 6.5])  # left-right, long axis, short vertical axis
HIPPOCAMPUS_PITCH_DEG = 30.0

_DEEP_CSF_MM = 12.0  # "deep" = farther than this inside the brain mask
_VENTRICLE_MIDLINE_MM = 20.0  # components centred farther from x = 0 are sulci/fissures, not ventricles
_VENTRICLE_PUSH_SIGMA_MM = 12.0  # smooth enough to stay one-to-one for shifts up to 8.5 mm
_TUMOUR_DEPTH_MM = 22.0  # glioma centres lie at least this far inside the brain


@dataclass(frozen=True)
class Anatomy:
    """Template maps on a regular lookup grid, plus sampling sites for lesions and tumours.

    `maps` is (4, X, Y, Z) float32 (brain, GM, WM, ventricle fractions) on the lookup grid whose voxel
    (i, j, k) sits at `origin_mm + (i, j, k) * grid_mm` (RAS, MNI). `ventricle_push` is (3, X, Y, Z): a
    smooth unit-maximum field pointing towards the ventricles; moving the sampling point along it by
    `a` mm enlarges the ventricles by about `a` mm at their wall.
    """

    grid_mm: float
    origin_mm: np.ndarray  # (3,)
    maps: np.ndarray  # (4, X, Y, Z) float32
    ventricle_push: np.ndarray  # (3, X, Y, Z) float32
    lesion_sites_mm: np.ndarray  # (L, 3) deep periventricular white matter
    tumour_sites_mm: np.ndarray  # (T, 3) cerebral white matter at least _TUMOUR_DEPTH_MM deep
    brain_centre_mm: np.ndarray  # (3,) centre of the brain's bounding box
    brain_min_mm: np.ndarray  # (3,) bounding box of the brain mask
    brain_max_mm: np.ndarray  # (3,)
    ventricle_box_mm: np.ndarray  # (2, 3) bounds of the ventricle map, with a margin of 2 grid voxels

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.maps.shape[1:])  # type: ignore[return-value]

    def to_grid(self, points_mm: np.ndarray) -> np.ndarray:
        """World mm (3, N) → fractional lookup-grid indices (3, N), as `map_coordinates` wants them."""
        return (points_mm - self.origin_mm[:, None]) / self.grid_mm

    def sample(self, channels: tuple[int, ...], points_mm: np.ndarray) -> np.ndarray:
        """Trilinear samples (len(channels), N) of the template maps at world points (3, N); 0 outside."""
        coords = self.to_grid(points_mm).astype(np.float32)
        out = np.empty((len(channels), points_mm.shape[1]), dtype=np.float32)
        for row, channel in enumerate(channels):
            ndimage.map_coordinates(self.maps[channel], coords, output=out[row], order=1, mode="constant", cval=0.0, prefilter=False)
        return out

    def sample_tissue(self, points_mm: np.ndarray) -> np.ndarray:
        """(4, N) brain, GM, WM and ventricle fractions at world points (3, N).

        The ventricle map is sampled only inside its bounding box (a few percent of the brain): the
        generator's hottest loop.
        """
        out = np.zeros((4, points_mm.shape[1]), dtype=np.float32)
        out[:3] = self.sample((BRAIN, GM, WM), points_mm)
        low, high = self.ventricle_box_mm.astype(np.float32)
        near = np.flatnonzero(((points_mm >= low[:, None]) & (points_mm <= high[:, None])).all(axis=0))
        out[VENTRICLE, near] = self.sample((VENTRICLE,), points_mm[:, near])[0]
        return out

    def sample_push(self, points_mm: np.ndarray) -> np.ndarray:
        """Ventricle-enlargement direction (3, N) at world points (3, N); 0 far from the ventricles."""
        coords = self.to_grid(points_mm).astype(np.float32)
        out = np.empty((3, points_mm.shape[1]), dtype=np.float32)
        for axis in range(3):
            ndimage.map_coordinates(self.ventricle_push[axis], coords, output=out[axis], order=1, mode="constant", cval=0.0, prefilter=False)
        return out


def hippocampal_weight(points_mm: np.ndarray) -> np.ndarray:
    """Soft membership (N,) of world points (3, N) in the medial-temporal (hippocampal) region.

    A smooth ellipsoid per hemisphere (1 inside, falling to 0 over about 2 mm at the surface); callers
    multiply it by the GM fraction, which is what makes it a grey-matter region.
    """
    pitch = np.deg2rad(HIPPOCAMPUS_PITCH_DEG)
    # Rows are the ellipsoid's axes in world coordinates: x; long axis tilted up towards posterior.
    axes = np.array([[1.0, 0.0, 0.0], [0.0, -np.cos(pitch), np.sin(pitch)], [0.0, np.sin(pitch), np.cos(pitch)]])
    weight = np.zeros(points_mm.shape[1], dtype=np.float32)
    reach = HIPPOCAMPUS_SEMI_AXES_MM.max() + 5.0
    for centre in HIPPOCAMPUS_CENTRES_MM:
        # Only points within the ellipsoid's bounding cube can have a non-negligible weight.
        near = np.flatnonzero((np.abs(points_mm - centre[:, None].astype(np.float32)) < reach).all(axis=0))
        local = axes @ (points_mm[:, near] - centre[:, None])  # (3, n) in the ellipsoid frame, mm
        radius = np.sqrt(((local / HIPPOCAMPUS_SEMI_AXES_MM[:, None]) ** 2).sum(axis=0))
        # Distance outside the surface, approximately in mm (scaled by the shortest semi-axis).
        outside = (radius - 1.0) * HIPPOCAMPUS_SEMI_AXES_MM.min()
        soft = 1.0 / (1.0 + np.exp(np.clip(outside, -30.0, 30.0) / 0.7))
        weight[near] = np.maximum(weight[near], soft.astype(np.float32))
    return weight


@lru_cache(maxsize=4)
def load_anatomy(voxel_mm: float) -> Anatomy:
    """Template anatomy for simulating at `voxel_mm` (1–4 mm), cached per process.

    Below 2 mm the 1 mm maps are used as they are; otherwise they are low-pass filtered and sampled on
    nilearn's 2 mm grid, with extra Gaussian smoothing for 3–4 mm outputs so coarse grids do not alias.
    """
    if not 1.0 <= voxel_mm <= 4.0:
        raise ValueError(f"voxel_mm must be between 1 and 4 mm, got {voxel_mm}")
    brain, gm, wm, affine = _load_icbm152_1mm()
    grid_mm = 1.0 if voxel_mm < 2.0 else 2.0
    if grid_mm == 2.0:
        # A [1, 2, 1]/4 tent filter then every second voxel: lands exactly on nilearn's 2 mm grid (same
        # origin) and is ten times faster than resampling each map with nilearn.
        brain, gm, wm = (_halve(volume) for volume in (brain, gm, wm))
    origin = affine[:3, 3].astype(np.float64)

    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    depth_mm = ndimage.distance_transform_edt(brain > 0.5) * grid_mm  # distance to the brain's surface
    ventricle_region = _ventricle_region(depth_mm, csf, grid_mm, origin)
    ventricle = csf * ventricle_region
    push = _ventricle_push_field(ventricle_region, grid_mm)

    extra_sigma_mm = np.sqrt(max(voxel_mm**2 - grid_mm**2, 0.0)) / 2.355
    maps = np.stack([brain, gm, wm, ventricle]).astype(np.float32)
    if extra_sigma_mm > 0.1:
        for channel in range(maps.shape[0]):
            maps[channel] = ndimage.gaussian_filter(maps[channel], extra_sigma_mm / grid_mm)

    ventricle_voxels = np.argwhere(maps[VENTRICLE] > 0.0)
    ventricle_box = np.stack([origin + (ventricle_voxels.min(axis=0) - 2) * grid_mm, origin + (ventricle_voxels.max(axis=0) + 2) * grid_mm])
    inside = np.argwhere(brain > 0.5)
    brain_min = origin + inside.min(axis=0) * grid_mm
    brain_max = origin + inside.max(axis=0) * grid_mm
    lesion_sites = _sites_mm((wm > 0.9) & (depth_mm > 8.0) & (ndimage.binary_dilation(ventricle_region, iterations=max(1, int(14 / grid_mm)))), origin, grid_mm)
    cerebrum = _cerebrum_mask(brain.shape, origin, grid_mm)
    tumour_sites = _sites_mm((wm > 0.6) & (depth_mm > _TUMOUR_DEPTH_MM) & cerebrum & ~ventricle_region, origin, grid_mm)
    return Anatomy(
        grid_mm=grid_mm,
        origin_mm=origin,
        maps=maps,
        ventricle_push=push,
        lesion_sites_mm=lesion_sites,
        tumour_sites_mm=tumour_sites,
        brain_centre_mm=(brain_min + brain_max) / 2.0,
        brain_min_mm=brain_min,
        brain_max_mm=brain_max,
        ventricle_box_mm=ventricle_box,
    )


def _load_icbm152_1mm() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Brain mask, GM and WM (float32, 1 mm, RAS) from nilearn's bundled files; tissue kept inside the mask."""
    from nilearn import datasets

    mask_img = datasets.load_mni152_brain_mask(resolution=1)
    brain = np.asarray(mask_img.dataobj, dtype=np.float32)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).dataobj, dtype=np.float32) * brain
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).dataobj, dtype=np.float32) * brain
    affine = mask_img.affine
    if not np.allclose(np.diag(affine)[:3], 1.0) or not np.allclose(affine[:3, :3], np.eye(3)):
        raise RuntimeError(f"nilearn's ICBM152 template is no longer 1 mm RAS (affine {affine.tolist()})")
    return brain, gm, wm, affine


def _halve(volume: np.ndarray) -> np.ndarray:
    """Tent-filter and subsample by 2 along every axis, keeping voxel 0 at the same world point."""
    for axis in range(3):
        padded = np.moveaxis(volume, axis, 0)
        padded = np.concatenate([np.zeros_like(padded[:1]), padded, np.zeros_like(padded[:1])])
        centre = padded[1::2]
        left = padded[0:-1:2][: centre.shape[0]]
        right = padded[2::2][: centre.shape[0]]
        volume = np.moveaxis(0.5 * centre + 0.25 * (left + right), 0, axis)
    return np.ascontiguousarray(volume, dtype=np.float32)


def _ventricle_region(depth_mm: np.ndarray, csf: np.ndarray, grid_mm: float, origin: np.ndarray) -> np.ndarray:
    """Binary region holding the ventricular system: mid-line components of deep CSF, dilated by 1 voxel."""
    deep = (csf > 0.5) & (depth_mm > _DEEP_CSF_MM) & ~_interhemispheric_fissure(csf.shape, origin, grid_mm)
    labels, count = ndimage.label(deep)
    if count == 0:
        raise RuntimeError("no deep CSF found in the ICBM152 template; cannot derive ventricles")
    index = np.arange(1, count + 1)
    sizes_ml = ndimage.sum_labels(deep, labels, index) * grid_mm**3 / 1000.0
    centres_x = np.array([c[0] for c in ndimage.center_of_mass(deep, labels, index)]) * grid_mm + origin[0]
    keep = index[(sizes_ml > 0.5) & (np.abs(centres_x) < _VENTRICLE_MIDLINE_MM)]
    region = np.isin(labels, keep)
    return ndimage.binary_dilation(region) & (csf > 0.05)


def _interhemispheric_fissure(shape: tuple[int, ...], origin: np.ndarray, grid_mm: float) -> np.ndarray:
    """The mid-sagittal band outside the third and fourth ventricles.

    Deep CSF in the interhemispheric fissure touches the third ventricle and aqueduct on the mid-line,
    so without this cut the fissure would count as ventricle; the boxes are generous bounds on the
    third ventricle (with the aqueduct) and the fourth ventricle in MNI space.
    """
    x, y, z = (origin[axis] + np.arange(shape[axis]) * grid_mm for axis in range(3))
    X, Y, Z = np.meshgrid(x, y, z, indexing="ij", sparse=True)
    third = (Y > -42.0) & (Y < 8.0) & (Z > -20.0) & (Z < 20.0)
    fourth = (Y > -62.0) & (Y < -30.0) & (Z > -52.0) & (Z < -15.0)
    return (np.abs(X) <= 5.0) & ~(third | fourth)


def _ventricle_push_field(region: np.ndarray, grid_mm: float) -> np.ndarray:
    """Gradient of the smoothed ventricle region, scaled so its largest magnitude is 1."""
    smooth = ndimage.gaussian_filter(region.astype(np.float32), _VENTRICLE_PUSH_SIGMA_MM / grid_mm)
    gradient = np.stack(np.gradient(smooth)).astype(np.float32)  # (3, X, Y, Z), per voxel
    magnitude = np.sqrt((gradient**2).sum(axis=0)).max()
    return np.ascontiguousarray(gradient / magnitude)


def _cerebrum_mask(shape: tuple[int, ...], origin: np.ndarray, grid_mm: float) -> np.ndarray:
    """Cerebral hemispheres, roughly: off the mid-line and above the tentorium (z > −10 mm)."""
    x = origin[0] + np.arange(shape[0]) * grid_mm
    z = origin[2] + np.arange(shape[2]) * grid_mm
    return (np.abs(x)[:, None, None] > 12.0) & (z[None, None, :] > -10.0) & np.ones(shape, dtype=bool)


def _sites_mm(mask: np.ndarray, origin: np.ndarray, grid_mm: float) -> np.ndarray:
    if not mask.any():
        raise RuntimeError("the ICBM152 template has no voxels for lesion or tumour sites")
    return (np.argwhere(mask) * grid_mm + origin).astype(np.float64)
