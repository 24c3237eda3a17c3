"""Stage 2: the CNN voxel decoder that reads a linear projection of the frozen encoder tokens (spec §6).

tokens [B, N, E] --Linear(E→C) per token--> latent [B, N, C] --reshape--> [B, C, d, h, w] (token grid)
--> stem conv + residual block --> log2(p) ×2 up-sampling stages --> volume [B, 1, D, H, W].

Up-sampling stages 1 … log2(p)−1 are nearest ×2 + Conv3d + a residual block (GroupNorm + SiLU; no
BatchNorm, so DP-SGD's per-sample gradients are well defined). The last ×2 is a sub-voxel convolution
(Conv3d to 8 channels at half resolution, then a voxel shuffle to full resolution): one more
up-sampling stage with 8-channel feature maps at full resolution would cost about three times the rest
of the `small` decoder (3.3 against 1.0 GMAC per volume) to produce a single output channel.

Loss: L1 + (1 − SSIM), both per sample, in z-score units, SSIM with a fixed data range of 6 (see
`SSIM_DATA_RANGE`) and a uniform cubic window (see `ssim_3d`). In training the SSIM term is the mean over
one random box per batch (`ssim_fraction` of each side; see `random_box`): the full-volume SSIM maps were
half of a `small` training step, bound by memory traffic rather than arithmetic. Over many steps the boxes
weight each SSIM position by how often a box covers it, more in the centre, where the brain lies, than at
the (background) border. Training can add RAE-style Gaussian noise to the tokens so the decoder also
decodes the slightly off-manifold tokens the DiT samples.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from braing3n_core.models.blocks import Grid, check_tokens, grid_of, run_block, tokens_to_grid
from braing3n_core.presets import Preset, get_preset
from braing3n_core.worker_rows import per_example

SSIM_DATA_RANGE = 6.0
"""Z-scored brain voxels mostly lie within ±3 σ, so 6 is their effective dynamic range. SSIM only uses it
for the stabilising constants C1 = (0.01 L)², C2 = (0.03 L)². A constant (rather than each batch's
max − min) keeps each sample's loss independent of the other samples in the batch, which DP-SGD's
per-sample clipping needs, and keeps losses comparable between batches and sites."""


@dataclass(frozen=True)
class DecoderConfig:
    image_shape: tuple[int, int, int]  # (D, H, W)
    patch_size: int  # power of two; log2(patch) ×2 stages
    token_dim: int  # E, the encoder width
    latent_channels: int  # C of the per-token linear projection
    channels: tuple[int, ...]  # feature channels per resolution, token grid first; log2(patch) entries
    token_noise_std: float = 0.0  # σ_max: training adds N(0, σ²) to tokens, σ ~ U(0, σ_max) per sample
    ssim_window: int = 7  # odd; 7 voxels ≈ 14 mm at the `small` 2 mm spacing
    ssim_fraction: float = 1.0  # side of the training SSIM box / side of the volume (1: the whole volume)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        grid_of(self.image_shape, self.patch_size)
        stages = int(math.log2(self.patch_size))
        if 2**stages != self.patch_size or stages < 1:
            raise ValueError(f"DecoderConfig.patch_size must be a power of two ≥ 2, got {self.patch_size}")
        if len(self.channels) != stages:
            raise ValueError(f"DecoderConfig.channels needs {stages} entries for patch {self.patch_size}, got {self.channels}")
        if self.token_noise_std < 0:
            raise ValueError(f"DecoderConfig.token_noise_std must be ≥ 0, got {self.token_noise_std}")
        if self.ssim_window % 2 == 0 or self.ssim_window > min(self.image_shape):
            raise ValueError(f"DecoderConfig.ssim_window must be odd and fit the volume, got {self.ssim_window}")
        if not 0 < self.ssim_fraction <= 1 or self.ssim_window > min(self.ssim_box):
            raise ValueError(f"DecoderConfig.ssim_fraction must be in (0, 1] and leave a box of at least the "
                             f"SSIM window ({self.ssim_window}) per side, got {self.ssim_fraction}")

    @property
    def ssim_box(self) -> tuple[int, int, int]:
        """(D, H, W) of the box the training SSIM is computed on."""
        return tuple(max(1, round(s * self.ssim_fraction)) for s in self.image_shape)  # type: ignore[return-value]

    @property
    def grid(self) -> Grid:
        return grid_of(self.image_shape, self.patch_size)

    @property
    def num_tokens(self) -> int:
        d, h, w = self.grid
        return d * h * w

    @classmethod
    def from_preset(cls, preset: str | Preset, **overrides: Any) -> "DecoderConfig":
        preset = get_preset(preset) if isinstance(preset, str) else preset
        values = dict(image_shape=preset.shape, patch_size=preset.patch_size, token_dim=preset.mae.width,
                      **asdict(preset.decoder))
        return cls(**{**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DecoderConfig":
        return cls(**data)


class DecoderLoss(NamedTuple):
    loss: Tensor  # scalar: mean over samples of L1 + (1 − SSIM)
    l1: Tensor  # scalar, detached
    ssim: Tensor  # scalar, detached
    recon: Tensor  # [B, 1, D, H, W]


def _box_filter(volume: Tensor, window: int) -> Tensor:
    """Mean over every `window`³ cube ("valid" positions only), separable, by cumulative sums:
    [M, C, D, H, W] -> [M, C, D − w + 1, H − w + 1, W − w + 1]."""
    for dim in (2, 3, 4):
        padding = [0, 0] * (4 - dim) + [1, 0]  # one leading zero along `dim`
        total = F.pad(volume.cumsum(dim), padding)
        count = volume.shape[dim] - window + 1
        volume = (total.narrow(dim, window, count) - total.narrow(dim, 0, count)) / window
    return volume


def ssim_3d(prediction: Tensor, target: Tensor, window: int, data_range: float = SSIM_DATA_RANGE) -> Tensor:
    """Per-sample mean SSIM of [B, 1, D, H, W] volumes with a uniform `window`³ window: [B]."""
    return ssim_map_3d(prediction, target, window, data_range).flatten(1).mean(dim=1)


def ssim_map_3d(prediction: Tensor, target: Tensor, window: int, data_range: float = SSIM_DATA_RANGE) -> Tensor:
    """SSIM at every valid window position of [B, 1, D, H, W] volumes: [B, 1, D − w + 1, H − w + 1, W − w + 1].

    Equal (to float rounding; `tests/test_decoder.py` checks it) to MONAI's
    `SSIMLoss(spatial_dims=3, kernel_type="uniform", win_size=window, data_range=...)`, which computes the
    local means with a dense `window`³ Conv3d. On the 2-core CPU sandbox that costs 15 s forward +
    backward for 4 `small` volumes, 8× the decoder network itself; separable cumulative-sum box filters
    cost about 1 s (and 3× less than `avg_pool3d` on `tiny`). A uniform window is also scikit-image's
    SSIM default.
    """
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    maps = torch.cat([prediction, target, prediction * prediction, target * target, prediction * target])
    mu_x, mu_y, mu_xx, mu_yy, mu_xy = _box_filter(maps, window).split(prediction.shape[0])
    var_x, var_y, cov = mu_xx - mu_x * mu_x, mu_yy - mu_y * mu_y, mu_xy - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    structure = (2 * cov + c2) / (var_x + var_y + c2)
    return luminance * structure


def random_box(volumes: tuple[Tensor, ...], box: tuple[int, int, int],
               generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
    """The same random `box` [D', H', W'] cut out of each [B, C, D, H, W] volume. Its corner is uniform over
    every position where it fits and independent of the data, so each sample's loss still depends on that
    sample alone (DP-SGD's per-sample clipping needs that)."""
    shape = volumes[0].shape[2:]
    device = generator.device if generator is not None else torch.device("cpu")
    corner = [int(torch.randint(0, size - side + 1, (1,), generator=generator, device=device))
              for size, side in zip(shape, box)]
    return tuple(v[:, :, corner[0]:corner[0] + box[0], corner[1]:corner[1] + box[1], corner[2]:corner[2] + box[2]]
                 for v in volumes)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _norm(channels), nn.SiLU(), nn.Conv3d(channels, channels, 3, padding=1),
            _norm(channels), nn.SiLU(), nn.Conv3d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class UpStage(nn.Module):
    """×2: nearest up-sampling, Conv3d to the new width, residual block."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.block = ResidualBlock(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(self.conv(self.up(x)))


def voxel_shuffle(x: Tensor) -> Tensor:
    """[B, 8·C, d, h, w] -> [B, C, 2d, 2h, 2w] (3D pixel shuffle)."""
    batch, channels, d, h, w = x.shape
    x = x.reshape(batch, channels // 8, 2, 2, 2, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(batch, channels // 8, 2 * d, 2 * h, 2 * w)


class CNNDecoder(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        first, last = config.channels[0], config.channels[-1]
        self.proj = nn.Linear(config.token_dim, config.latent_channels)  # the "linear projection" of §6
        self.stem = nn.Conv3d(config.latent_channels, first, 3, padding=1)
        self.stem_block = ResidualBlock(first)
        self.stages = nn.ModuleList(UpStage(a, b) for a, b in zip(config.channels[:-1], config.channels[1:]))
        self.head = nn.Sequential(_norm(last), nn.SiLU(), nn.Conv3d(last, 8, 3, padding=1))  # + voxel_shuffle
        # A site's compute settings, not part of the architecture: checkpointed up-sampling stages, and the
        # memory layout of weights and feature maps (`use_memory_format`).
        self.activation_checkpointing = False
        self._init_weights()
        self.use_memory_format(torch.channels_last_3d)

    def use_memory_format(self, memory_format: torch.memory_format) -> None:
        """Lay out the weights and feature maps as `memory_format`; the function computed is the same.

        channels_last_3d (NDHWC) is the default: the layout of cuDNN's fast 3D kernels, and on CPU oneDNN's
        NDHWC convolutions made a `small` training step 1.3x faster than NCDHW (`bench/bench_decoder_step.py`).
        """
        self.memory_format = memory_format
        self.to(memory_format=memory_format)

    def _init_weights(self) -> None:
        # PyTorch's default (Kaiming-uniform) convolutions, except the last conv of every residual
        # branch, which starts at zero so each block starts as the identity and early training is
        # driven by the projection → stem → up-sampling path.
        for module in self.modules():
            if isinstance(module, ResidualBlock):
                nn.init.zeros_(module.body[-1].weight)
                nn.init.zeros_(module.body[-1].bias)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def project(self, tokens: Tensor) -> Tensor:
        """[B, N, E] -> latent [B, N, C]."""
        check_tokens(tokens, self.config.num_tokens, self.config.token_dim, "CNNDecoder")
        return self.proj(tokens)

    def decode_latent(self, latent: Tensor) -> Tensor:
        """latent [B, N, C] -> volume [B, 1, D, H, W] (z-score units)."""
        grid = tokens_to_grid(latent, self.config.grid).contiguous(memory_format=self.memory_format)
        x = self.stem_block(self.stem(grid))  # [B, c0, d, h, w]
        for stage in self.stages:
            x = run_block(stage, x, checkpointed=self.activation_checkpointing)  # ×2 each
        return voxel_shuffle(self.head(x)).contiguous()  # [B, 1, D, H, W]

    def forward(self, tokens: Tensor) -> Tensor:
        """Frozen encoder tokens [B, N, E] -> volume [B, 1, D, H, W]."""
        return self.decode_latent(self.project(tokens))

    def add_token_noise(self, tokens: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """tokens + σ·ε with σ ~ U(0, σ_max) drawn per sample (RAE-style noise augmentation)."""
        if self.config.token_noise_std == 0:
            return tokens
        device = generator.device if generator is not None else tokens.device
        batch, rest = tokens.shape[0], tuple(tokens.shape[1:])
        sigma = per_example(lambda n: torch.rand(n, 1, 1, generator=generator, device=device), batch)
        sigma = sigma * self.config.token_noise_std
        noise = per_example(lambda n: torch.randn((n, *rest), generator=generator, device=device), batch)
        return tokens + (sigma * noise).to(tokens.device, tokens.dtype)

    def loss(self, tokens: Tensor, volume: Tensor, generator: torch.Generator | None = None) -> DecoderLoss:
        """L1 + (1 − SSIM) of the reconstruction of `volume` [B, 1, D, H, W] from `tokens` [B, N, E].
        Token noise is added only in training mode."""
        if volume.shape[1:] != (1, *self.config.image_shape):
            raise ValueError(f"CNNDecoder expects target volumes [B, 1, {self.config.image_shape}], got {list(volume.shape)}")
        if self.training:
            tokens = self.add_token_noise(tokens, generator)
        recon = self(tokens)
        target = volume.float()
        l1 = (recon.float() - target).abs().flatten(1).mean(dim=1)  # [B]
        ssim_on = (recon.float(), target)
        if self.training and self.config.ssim_fraction < 1:
            ssim_on = random_box(ssim_on, self.config.ssim_box, generator)  # [B, 1, D', H', W'] each
        ssim = ssim_3d(*ssim_on, self.config.ssim_window)  # [B]
        return DecoderLoss((l1 + 1.0 - ssim).mean(), l1.mean().detach(), ssim.mean().detach(), recon)
