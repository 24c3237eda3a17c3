"""Two preprocessed scans of one subject on the same voxels.

Preprocessing crops each scan to its own head's bounding box (`transforms.py`), so two sessions of one
subject land a voxel or two apart (on the long run's cohort, 9 of 46 first/last pairs are one voxel, 2 mm,
apart). Longitudinal work needs them on one grid: the forecast's training target (`tokens.TokenCache.
pair_tokens`) and the measured change a forecast is scored against (`evaluation.tissue`). The two crops
differ by a whole-voxel translation of the same head, so that is all this module estimates.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import shift as nd_shift

MAX_SHIFT_VOXELS = 8  # per axis; two sessions' foreground crops differ by a voxel or two


def brain_mask(volume: np.ndarray) -> np.ndarray:
    """The preprocessed scan's brain: its non-zero voxels (background is exactly 0 after preprocessing)."""
    return np.asarray(volume) != 0


def align_by_brain_mask(reference: np.ndarray, moving: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """`moving` [D, H, W] translated by the whole-voxel shift (≤ `MAX_SHIFT_VOXELS` per axis) that best
    overlaps its brain mask with `reference`'s, and the shift."""
    fixed = brain_mask(reference).astype(np.float64)
    moved = brain_mask(moving).astype(np.float64)
    overlap = np.fft.irfftn(np.fft.rfftn(fixed) * np.conj(np.fft.rfftn(moved)), s=fixed.shape, axes=(0, 1, 2))  # circular
    limit = MAX_SHIFT_VOXELS
    window = np.full(fixed.shape, -np.inf)
    index = tuple(np.r_[0:limit + 1, n - limit:n] for n in fixed.shape)
    window[np.ix_(*index)] = overlap[np.ix_(*index)]
    peak = np.unravel_index(int(np.argmax(window)), fixed.shape)
    shift = tuple(int(p if p <= n // 2 else p - n) for p, n in zip(peak, fixed.shape, strict=True))
    if shift == (0, 0, 0):
        return np.asarray(moving), shift
    return nd_shift(np.asarray(moving), shift, order=0, mode="constant", cval=0.0), shift
