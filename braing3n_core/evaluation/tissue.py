"""Regional volumes of a preprocessed scan by intensity clustering: the same function for real scans and
for forecasts, so a forecast's predicted atrophy and the real one are measured alike.

Method (deliberately simple and documented, not a segmentation model): inside the brain mask (the
preprocessed volume's non-zero voxels; preprocessing zeroes the background), the z-scored intensities are
clustered into three classes by 1-D k-means (Lloyd's iterations from the 15th/50th/85th percentiles, so
the result is deterministic). The classes are named by their intensity order, which depends on the
contrast:

| modality | dark → bright |
|---|---|
| T1w, ce-T1w | CSF, grey matter, white matter |
| T2w | white matter, grey matter, CSF |
| FLAIR | CSF, white matter, grey matter |

Volumes are voxel counts × voxel volume (ml). `brain` is the parenchyma (grey + white matter), `csf` the
ventricles and the sulcal CSF inside the mask: atrophy moves voxels from `brain` to `csf`. A decoded
volume has no exact-zero background, so a forecast is classified inside the mask of the scan it was
forecast from (`mask=`); its voxels are still clustered by its own intensities, like any scan's.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from braing3n_core.labels import Modality

REGIONS: tuple[str, ...] = ("brain", "gm", "wm", "csf")
_ORDER: Mapping[Modality, tuple[str, str, str]] = {
    Modality.T1W: ("csf", "gm", "wm"),
    Modality.T1C: ("csf", "gm", "wm"),
    Modality.T2W: ("wm", "gm", "csf"),
    Modality.FLAIR: ("csf", "wm", "gm"),
}
_ITERATIONS = 50


def brain_mask(volume: np.ndarray) -> np.ndarray:
    """The preprocessed scan's brain: its non-zero voxels (background is exactly 0 after preprocessing)."""
    return np.asarray(volume) != 0


def intensity_classes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-D k-means with three classes: (label per value in 0..2 by increasing centre, the three centres)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size < 3:
        raise ValueError(f"need at least 3 brain voxels to classify tissue, got {values.size}")
    centres = np.percentile(values, [15.0, 50.0, 85.0])
    labels = np.zeros(values.size, dtype=np.int64)
    for _ in range(_ITERATIONS):
        edges = (centres[:-1] + centres[1:]) / 2.0
        labels = np.searchsorted(edges, values)
        updated = np.array([values[labels == k].mean() if np.any(labels == k) else centres[k] for k in range(3)])
        if np.allclose(updated, centres):
            break
        centres = np.sort(updated)
    return labels, centres


def tissue_volumes(volume: np.ndarray, modality: Modality | str, voxel_ml: float,
                   mask: np.ndarray | None = None) -> dict[str, float]:
    """`{brain, gm, wm, csf}` in ml of one preprocessed scan [D, H, W] (z-score units, background 0),
    classified inside `mask` (default: the scan's non-zero voxels)."""
    volume = np.asarray(volume, dtype=np.float64)
    if volume.ndim != 3:
        raise ValueError(f"tissue_volumes takes one [D, H, W] volume, got shape {volume.shape}")
    mask = brain_mask(volume) if mask is None else np.asarray(mask, dtype=bool)
    labels, _ = intensity_classes(volume[mask])
    names = _ORDER[Modality(modality)]
    counts = np.bincount(labels, minlength=3)
    out = {names[k]: float(counts[k]) * voxel_ml for k in range(3)}
    return {"brain": out["gm"] + out["wm"], **out}
