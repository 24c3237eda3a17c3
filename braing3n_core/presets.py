"""Named presets: the volume geometry every stage agrees on.

`paper` is the BrainG3N input contract (160×192×160 at 1 mm, 16³ patches → a 10×12×10 token grid).
`small` keeps the same field of view and the same 10×12×10 token grid at 2 mm, so that the end-to-end
demo runs on two CPU cores. `tiny` is for tests only (4 mm, 5×6×5 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    shape: tuple[int, int, int]  # (D, H, W) voxels after preprocessing, LPS
    spacing_mm: float  # isotropic voxel size after preprocessing
    patch_size: int  # isotropic ViT patch edge, voxels

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (d, h, w) = shape / patch_size."""
        d, h, w = (s // self.patch_size for s in self.shape)
        return d, h, w

    @property
    def num_tokens(self) -> int:
        d, h, w = self.grid
        return d * h * w

    @property
    def field_of_view_mm(self) -> tuple[float, float, float]:
        d, h, w = self.shape
        return d * self.spacing_mm, h * self.spacing_mm, w * self.spacing_mm

    def __post_init__(self) -> None:
        if any(s % self.patch_size for s in self.shape):
            raise ValueError(f"preset {self.name!r}: shape {self.shape} is not a multiple of patch {self.patch_size}")


PRESETS: dict[str, Preset] = {
    "paper": Preset("paper", shape=(160, 192, 160), spacing_mm=1.0, patch_size=16),
    "small": Preset("small", shape=(80, 96, 80), spacing_mm=2.0, patch_size=8),
    "tiny": Preset("tiny", shape=(40, 48, 40), spacing_mm=4.0, patch_size=8),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
