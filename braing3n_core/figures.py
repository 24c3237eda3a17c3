"""Figures shared by the report, the generation commands and the showcase: mid-slice montages as PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from braing3n_core.fileio import atomic_write_bytes

# Display window of z-scored volumes: one fixed window for every panel, so inputs, reconstructions and
# samples are compared on the same grey scale (background is 0, i.e. mid-grey).
DISPLAY_WINDOW: tuple[float, float] = (-3.0, 3.0)


def _save(figure: plt.Figure, path: Path) -> Path:
    """Atomic PNG write (a half-written figure never replaces a good one)."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def mid_slices(volume: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Three orthogonal mid-slices of a (D, H, W) LPS volume, oriented for display (superior or anterior
    up, patient's left on the image's right: neurological view)."""
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim == 5:
        volume = volume[0, 0]
    if volume.ndim != 3:
        raise ValueError(f"mid_slices: expected a (D, H, W) volume, got shape {volume.shape}")
    d, h, w = (s // 2 for s in volume.shape)
    return [
        ("sagittal", volume[d, ::-1, :].T),  # rows: inferior→superior (drawn origin-lower), columns: posterior→anterior
        ("coronal", volume[:, h, :].T),  # rows: I→S (origin-lower), columns: right→left (L grows with D)
        ("axial", volume[:, :, w].T),  # rows: anterior→posterior (drawn origin-upper), columns: right→left
    ]


def plot_montage(rows: Sequence[Sequence[tuple[str, np.ndarray]]], path: Path, row_labels: Sequence[str] = (),
                 window: tuple[float, float] = DISPLAY_WINDOW) -> Path:
    """A grid of volumes, each shown as its three orthogonal mid-slices. `rows[i]` is a list of
    (title, volume (D, H, W)) cells; `row_labels[i]` is written beside row i."""
    columns = max(len(r) for r in rows)
    figure, axes = plt.subplots(len(rows), 3 * columns, figsize=(1.55 * 3 * columns, 1.75 * len(rows) + 0.3), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(columns):
            cells = axes[i][3 * j : 3 * j + 3]
            if j >= len(row):
                for axis in cells:
                    axis.axis("off")
                continue
            title, volume = row[j]
            for k, (axis, (plane, image)) in enumerate(zip(cells, mid_slices(volume))):
                origin = "upper" if plane == "axial" else "lower"
                axis.imshow(image, cmap="gray", vmin=window[0], vmax=window[1], origin=origin, interpolation="nearest")
                axis.set_xticks([])
                axis.set_yticks([])
                if k == 1:
                    axis.set_title(title, fontsize=7)
        if i < len(row_labels):
            axes[i][0].set_ylabel(row_labels[i], fontsize=7)
    figure.tight_layout(pad=0.3)
    return _save(figure, path)
