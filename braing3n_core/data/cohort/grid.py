"""A site's sampling grid in world (RAS) millimetres, with a coarse companion grid for smooth fields.

Every smooth field of the generator (anatomical deformation, ventricle enlargement, head size) is
computed on the coarse grid (4 mm) and brought to the fine grid by separable linear interpolation —
three small matrix products instead of one `map_coordinates` call per field and voxel, which is what
makes 2 mm generation fast. Only the template tissue maps are sampled voxel by voxel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

COARSE_MM = 4.0


@dataclass(frozen=True, eq=False)
class SamplingGrid:
    """Voxel centres `origin_mm + index * spacing_mm` along the R, A, S axes (array axes 0, 1, 2)."""

    shape: tuple[int, int, int]
    origin_mm: np.ndarray  # (3,)
    spacing_mm: np.ndarray  # (3,)
    coarse_shape: tuple[int, int, int] = field(init=False)
    coarse_origin_mm: np.ndarray = field(init=False)
    _weights: tuple[np.ndarray, np.ndarray, np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # The coarse grid reaches one node beyond the fine grid on every side, so interpolation never
        # extrapolates.
        extent = (np.asarray(self.shape) - 1) * self.spacing_mm
        coarse_shape = tuple(int(n) for n in np.ceil(extent / COARSE_MM).astype(int) + 3)
        coarse_origin = self.origin_mm - COARSE_MM
        weights = tuple(
            _linear_weights(self.axis_mm(axis), coarse_origin[axis], coarse_shape[axis]) for axis in range(3)
        )
        object.__setattr__(self, "coarse_shape", coarse_shape)
        object.__setattr__(self, "coarse_origin_mm", coarse_origin)
        object.__setattr__(self, "_weights", weights)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing_mm)) / 1000.0

    def axis_mm(self, axis: int) -> np.ndarray:
        return self.origin_mm[axis] + np.arange(self.shape[axis]) * self.spacing_mm[axis]

    def coarse_points_mm(self) -> np.ndarray:
        """World coordinates (3, cx, cy, cz) of the coarse nodes."""
        axes = [self.coarse_origin_mm[a] + np.arange(self.coarse_shape[a]) * COARSE_MM for a in range(3)]
        return np.stack(np.meshgrid(*axes, indexing="ij"))

    def points_mm(self, flat_index: np.ndarray) -> np.ndarray:
        """World coordinates (3, N) float32 of fine voxels given by flat (C-order) index."""
        ijk = np.unravel_index(flat_index, self.shape)
        return np.stack([self.axis_mm(a).astype(np.float32)[ijk[a]] for a in range(3)])

    def nearest(self, coarse: np.ndarray) -> np.ndarray:
        """Coarse field (cx, cy, cz) → fine field (X, Y, Z), nearest node (for masks)."""
        index = [
            np.clip(np.rint((self.axis_mm(a) - self.coarse_origin_mm[a]) / COARSE_MM).astype(int), 0, self.coarse_shape[a] - 1)
            for a in range(3)
        ]
        return coarse[np.ix_(*index)]

    def upsample_at(self, coarse: np.ndarray, flat_index: np.ndarray) -> np.ndarray:
        """Coarse field (..., cx, cy, cz) → its values (..., N) at the fine voxels `flat_index`.

        Separable linear interpolation over the voxels' bounding box only: three small matrix products.
        """
        ijk = np.unravel_index(flat_index, self.shape)
        low = [int(axis.min()) for axis in ijk]
        high = [int(axis.max()) + 1 for axis in ijk]
        wx, wy, wz = (w[lo:hi] for w, lo, hi in zip(self._weights, low, high))  # (bx, cx), (by, cy), (bz, cz)
        out = coarse.astype(np.float32) @ wz.T  # (..., cx, cy, bz)
        out = np.swapaxes(np.swapaxes(out, -1, -2) @ wy.T, -1, -2)  # (..., cx, by, bz)
        out = np.moveaxis(np.moveaxis(out, -3, -1) @ wx.T, -1, -3)  # (..., bx, by, bz)
        block_shape = tuple(hi - lo for lo, hi in zip(low, high))
        local = np.ravel_multi_index(tuple(axis - lo for axis, lo in zip(ijk, low)), block_shape)
        return out.reshape(*out.shape[:-3], -1)[..., local]


def _linear_weights(fine_mm: np.ndarray, coarse_origin: float, coarse_n: int) -> np.ndarray:
    """(n_fine, coarse_n) float32 matrix of linear-interpolation weights."""
    position = (fine_mm - coarse_origin) / COARSE_MM
    left = np.clip(np.floor(position).astype(int), 0, coarse_n - 2)
    frac = (position - left).astype(np.float32)
    weights = np.zeros((fine_mm.size, coarse_n), dtype=np.float32)
    rows = np.arange(fine_mm.size)
    weights[rows, left] = 1.0 - frac
    weights[rows, left + 1] = frac
    return weights
