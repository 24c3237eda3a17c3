"""Named presets: the volume geometry every stage agrees on.

`paper` is the BrainG3N input contract (160×192×160 at 1 mm, 16³ patches → a 10×12×10 token grid).
`small` keeps the same field of view and the same 10×12×10 token grid at 2 mm, so that the end-to-end
demo runs on two CPU cores. `tiny` is for tests only (4 mm, 5×6×5 tokens).

Each preset also names the size of the three networks (`mae`, `decoder`, `dit`). `paper` is the
reference encoder exactly (model-spec §4–5); the decoder and DiT sizes are project choices (spec §6–7
leave them open). `small` is sized from throughput measured on a 2-core CPU so the federated demo fits
its time budget; `tiny` keeps tests fast.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MAESize:
    """3D MAE ViT: encoder (shipped to sites, frozen after stage 1) and its pre-training decoder."""

    width: int  # token dimension E; divisible by 6 (3D sin-cos positions) and by `heads`
    depth: int
    heads: int
    mlp_dim: int
    decoder_width: int
    decoder_depth: int
    decoder_heads: int
    decoder_mlp_dim: int


@dataclass(frozen=True)
class DecoderSize:
    """CNN voxel decoder: `latent_channels` after the per-token projection, then one entry of
    `channels` per feature resolution, token grid first (log2(patch_size) entries; the last ×2 is a
    sub-voxel convolution straight to the output)."""

    latent_channels: int
    channels: tuple[int, ...]
    token_noise_std: float  # upper bound of the RAE-style Gaussian noise added to tokens in training
    ssim_window: int  # odd SSIM window in voxels, ≈ 11–16 mm
    ssim_fraction: float = 1.0  # training SSIM on a random box of this fraction of each side (1: all)


@dataclass(frozen=True)
class DiTSize:
    """Conditional DiT over patches of the token grid."""

    width: int  # divisible by 6 and by `heads`
    depth: int
    heads: int
    mlp_dim: int
    patch_size: int = 1  # encoder tokens per DiT token along each axis; must divide the token grid


@dataclass(frozen=True)
class Preset:
    name: str
    shape: tuple[int, int, int]  # (D, H, W) voxels after preprocessing, LPS
    spacing_mm: float  # isotropic voxel size after preprocessing
    patch_size: int  # isotropic ViT patch edge, voxels
    mae: MAESize
    decoder: DecoderSize
    dit: DiTSize

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
        stages = self.patch_size.bit_length() - 1
        if 2**stages != self.patch_size or len(self.decoder.channels) != stages:
            raise ValueError(
                f"preset {self.name!r}: the decoder needs a power-of-two patch and {stages} channel entries, "
                f"got patch {self.patch_size} and channels {self.decoder.channels}"
            )


PRESETS: dict[str, Preset] = {
    "paper": Preset(
        "paper", shape=(160, 192, 160), spacing_mm=1.0, patch_size=16,
        mae=MAESize(width=1152, depth=12, heads=16, mlp_dim=4608,
                    decoder_width=1152, decoder_depth=6, decoder_heads=16, decoder_mlp_dim=4608),
        decoder=DecoderSize(latent_channels=32, channels=(512, 256, 128, 64), token_noise_std=0.5, ssim_window=11,
                            ssim_fraction=0.5),
        dit=DiTSize(width=1152, depth=28, heads=16, mlp_dim=4608),
    ),
    "small": Preset(
        "small", shape=(80, 96, 80), spacing_mm=2.0, patch_size=8,
        mae=MAESize(width=192, depth=4, heads=4, mlp_dim=768,
                    decoder_width=96, decoder_depth=2, decoder_heads=4, decoder_mlp_dim=384),
        decoder=DecoderSize(latent_channels=16, channels=(32, 16, 8), token_noise_std=0.5, ssim_window=7,
                            ssim_fraction=0.5),
        dit=DiTSize(width=192, depth=4, heads=4, mlp_dim=768),
    ),
    "tiny": Preset(
        "tiny", shape=(40, 48, 40), spacing_mm=4.0, patch_size=8,
        mae=MAESize(width=48, depth=2, heads=4, mlp_dim=192,
                    decoder_width=48, decoder_depth=1, decoder_heads=4, decoder_mlp_dim=192),
        decoder=DecoderSize(latent_channels=8, channels=(32, 16, 8), token_noise_std=0.5, ssim_window=5),
        dit=DiTSize(width=96, depth=2, heads=4, mlp_dim=384),
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
