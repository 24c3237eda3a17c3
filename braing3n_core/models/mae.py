"""Stage 1: the 3D masked-autoencoder ViT (model-spec §4–5).

`MaskedAutoencoder` = `encoder` (an `MAEEncoder`: the part that is frozen after pre-training, shipped to
sites and used as the tokenizer) + `pretrain_decoder` (the MAE's own transformer decoder, used only for
pre-training). The pre-training loss lives with the model: L1 on the masked patches only, against the
z-scored voxels (no per-patch normalisation), as in the reference code.

Shapes: volumes `B, 1, D, H, W`; tokens `B, N, E` with N = (D/p)(H/p)(W/p) in row-major grid order;
patches `B, N, P` with P = p³ voxels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from braing3n_core.models.blocks import (
    Grid,
    LearnedTokens,
    TransformerBlock,
    check_volume,
    grid_of,
    patchify,
    run_block,
    sincos_position_embedding,
)
from braing3n_core.presets import Preset, get_preset
from braing3n_core.worker_rows import per_example


@dataclass(frozen=True)
class MAEConfig:
    image_shape: tuple[int, int, int]  # (D, H, W)
    patch_size: int
    width: int  # E
    depth: int
    heads: int
    mlp_dim: int
    decoder_width: int
    decoder_depth: int
    decoder_heads: int
    decoder_mlp_dim: int
    mask_ratio: float = 0.7

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
        grid_of(self.image_shape, self.patch_size)
        for name in ("width", "decoder_width"):
            if getattr(self, name) % 6:
                raise ValueError(f"MAEConfig.{name}={getattr(self, name)} must be divisible by 6 (3D sin-cos positions)")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"MAEConfig.mask_ratio must lie in (0, 1), got {self.mask_ratio}")

    @property
    def grid(self) -> Grid:
        return grid_of(self.image_shape, self.patch_size)

    @property
    def num_tokens(self) -> int:
        d, h, w = self.grid
        return d * h * w

    @property
    def patch_voxels(self) -> int:
        return self.patch_size**3

    @classmethod
    def from_preset(cls, preset: str | Preset, **overrides: Any) -> "MAEConfig":
        preset = get_preset(preset) if isinstance(preset, str) else preset
        config = cls(image_shape=preset.shape, patch_size=preset.patch_size, **asdict(preset.mae))
        return cls(**{**asdict(config), **overrides}) if overrides else config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MAEConfig":
        return cls(**data)


class MAEOutput(NamedTuple):
    loss: Tensor  # scalar: mean over samples of the L1 over that sample's masked patches
    pred: Tensor  # [B, N, P] predicted voxels of every patch (only masked ones are trained)
    mask: Tensor  # [B, N] 1 = masked (hidden from the encoder), 0 = visible


def masked_count(num_tokens: int, mask_ratio: float) -> int:
    """round(ratio · N) patches are masked; at least one stays visible and at least one is masked."""
    return min(num_tokens - 1, max(1, int(mask_ratio * num_tokens + 0.5)))


def random_masking(
    batch: int, num_tokens: int, mask_ratio: float, device: torch.device, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Independent random mask per sample (drawn per example: the same whichever data-parallel worker
    holds the sample, see `worker_rows`).

    Returns keep [B, K] (indices of visible patches, in shuffled order), restore [B, N] (puts the
    shuffled sequence back in grid order) and mask [B, N] (1 = masked).
    """
    keep_count = num_tokens - masked_count(num_tokens, mask_ratio)
    noise_device = generator.device if generator is not None else device
    noise = per_example(lambda n: torch.rand(n, num_tokens, generator=generator, device=noise_device), batch)
    noise = noise.to(device)  # [B, N]
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    mask = torch.ones(batch, num_tokens, device=device)
    mask[:, :keep_count] = 0.0
    mask = mask.gather(1, restore)  # back to grid order
    return shuffle[:, :keep_count], restore, mask


def _init_vit_weights(module: nn.Module) -> None:
    """Reference-MAE initialisation: xavier-uniform linears (and the patch conv seen as a linear map),
    unit LayerNorms, N(0, 0.02) learned tokens."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv3d):
        nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, LearnedTokens):
        nn.init.normal_(module.table.weight, std=0.02)


class MAEEncoder(nn.Module):
    """The tokenizer: conv patch embedding + fixed sin-cos positions + CLS + pre-LN blocks + LayerNorm."""

    def __init__(self, config: MAEConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.patch_embed = nn.Conv3d(1, width, kernel_size=config.patch_size, stride=config.patch_size)
        # Fixed, so a non-persistent buffer: rebuilt from the config, never federated or checkpointed.
        self.register_buffer("pos_embed", sincos_position_embedding(config.grid, width)[None], persistent=False)
        self.cls_token = LearnedTokens(1, width)
        self.blocks = nn.ModuleList(
            TransformerBlock(width, config.heads, config.mlp_dim, qkv_bias=False) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(width)
        self.activation_checkpointing = False  # a site's compute setting, not part of the architecture
        self.apply(_init_vit_weights)

    def embed_patches(self, volume: Tensor) -> Tensor:
        """[B, 1, D, H, W] -> [B, N, E] patch tokens with positions (no CLS yet)."""
        check_volume(volume, self.config.image_shape, "MAEEncoder")
        x = self.patch_embed(volume).flatten(2).transpose(1, 2)  # [B, N, E]
        return x + self.pos_embed

    def run_blocks(self, patch_tokens: Tensor) -> Tensor:
        """Prepend CLS (no position), run the blocks, normalise: [B, K, E] -> [B, 1 + K, E]."""
        cls = self.cls_token.repeat(patch_tokens.shape[0], 1, patch_tokens.device).to(patch_tokens.dtype)
        x = torch.cat([cls, patch_tokens], dim=1)
        for block in self.blocks:
            x = run_block(block, x, checkpointed=self.activation_checkpointing)
        return self.norm(x)

    def forward(self, volume: Tensor) -> Tensor:
        """Unmasked encoding, CLS dropped: [B, 1, D, H, W] -> tokens [B, N, E]."""
        return self.run_blocks(self.embed_patches(volume))[:, 1:]

    def encode(self, volume: Tensor) -> tuple[Tensor, Tensor]:
        """(tokens [B, N, E], pooled [B, E]); pooled = mean of the patch tokens (the probe feature)."""
        tokens = self(volume)
        return tokens, tokens.mean(dim=1)


class MAEPretrainDecoder(nn.Module):
    """The MAE's transformer decoder: visible tokens + mask tokens -> voxels of every patch."""

    def __init__(self, config: MAEConfig) -> None:
        super().__init__()
        self.config = config
        width = config.decoder_width
        self.embed = nn.Linear(config.width, width)
        self.mask_token = LearnedTokens(1, width)
        self.register_buffer("pos_embed", sincos_position_embedding(config.grid, width)[None], persistent=False)
        self.blocks = nn.ModuleList(
            TransformerBlock(width, config.decoder_heads, config.decoder_mlp_dim, qkv_bias=False)
            for _ in range(config.decoder_depth)
        )
        self.norm = nn.LayerNorm(width)
        self.pred = nn.Linear(width, config.patch_voxels)
        self.activation_checkpointing = False
        self.apply(_init_vit_weights)

    def forward(self, encoded: Tensor, restore: Tensor) -> Tensor:
        """encoded [B, 1 + K, E] (CLS first, visible patches in shuffled order), restore [B, N] -> [B, N, P]."""
        x = self.embed(encoded)  # [B, 1 + K, Dd]
        batch, kept = x.shape[0], x.shape[1] - 1
        hidden = self.mask_token.repeat(batch, restore.shape[1] - kept, x.device).to(x.dtype)  # [B, N - K, Dd]
        patches = torch.cat([x[:, 1:], hidden], dim=1)  # [B, N, Dd], shuffled order
        patches = patches.gather(1, restore.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))  # grid order
        x = torch.cat([x[:, :1], patches + self.pos_embed], dim=1)  # CLS passes through, no position
        for block in self.blocks:
            x = run_block(block, x, checkpointed=self.activation_checkpointing)
        return self.pred(self.norm(x))[:, 1:]  # drop CLS: [B, N, P]


class MaskedAutoencoder(nn.Module):
    def __init__(self, config: MAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = MAEEncoder(config)
        self.pretrain_decoder = MAEPretrainDecoder(config)

    def forward(
        self, volume: Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None
    ) -> MAEOutput:
        """Masked pre-training step on z-scored volumes [B, 1, D, H, W]."""
        ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1) for pre-training, got {ratio}; use encode() for no mask")
        patch_tokens = self.encoder.embed_patches(volume)  # [B, N, E]
        batch, count, width = patch_tokens.shape
        keep, restore, mask = random_masking(batch, count, ratio, volume.device, generator)
        visible = patch_tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, width))  # [B, K, E]
        pred = self.pretrain_decoder(self.encoder.run_blocks(visible), restore)  # [B, N, P]
        return MAEOutput(self.masked_l1(pred, volume, mask), pred, mask)

    def masked_l1(self, pred: Tensor, volume: Tensor, mask: Tensor) -> Tensor:
        """Mean over samples of the L1 over each sample's masked patches (each sample's loss depends on
        that sample only, as DP-SGD's per-sample clipping assumes)."""
        target = patchify(volume, self.config.patch_size)  # [B, N, P]
        per_patch = (pred.float() - target.float()).abs().mean(dim=-1)  # [B, N]
        per_sample = (per_patch * mask).sum(dim=1) / mask.sum(dim=1)  # [B]
        return per_sample.mean()

    def encode(self, volume: Tensor) -> tuple[Tensor, Tensor]:
        """Unmasked: (tokens [B, N, E], pooled [B, E])."""
        return self.encoder.encode(volume)
