"""Pieces shared by the three networks: pre-LN transformer block, 3D sin-cos positions, patchify.

Everything with a parameter is an `nn.Linear`, `nn.LayerNorm`, `nn.Conv3d` or `nn.Embedding`, the layers
for which Opacus has per-sample gradient samplers, so every model built from these pieces trains under
DP-SGD without functorch fall-backs. Attention is written with two `nn.Linear` layers around
`F.scaled_dot_product_attention` (no `nn.MultiheadAttention`, whose packed in-projection Opacus cannot
hook).

Shapes: tokens `B, N, D`; volumes `B, C, D, H, W`; the token order is row-major over the (d, h, w) grid,
which is the order `Conv3d(...).flatten(2)` produces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

Grid = tuple[int, int, int]


class Attention(nn.Module):
    """Multi-head self-attention from plain linear layers (per-sample gradients work through hooks)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape  # x: [B, N, D]
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, D/heads]
        x = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, D/heads]
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))  # [B, N, D]


def run_block(block: nn.Module, *inputs: Tensor, checkpointed: bool = False) -> Tensor:
    """`block(*inputs)`; `checkpointed` (when training) keeps only the block's inputs and recomputes its
    activations in the backward pass: the same gradients for a second forward pass' worth of compute, and
    the memory of one block's activations instead of all of them (`compute.activation_checkpointing`).
    No block draws random numbers, so the RNG state is not replayed."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(block, *inputs, use_reentrant=False, preserve_rng_state=False)
    return block(*inputs)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, approximate: str = "none") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(LN(x)); x + MLP(LN(x)). The MAE encoder and decoder use it."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, qkv_bias: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim)

    def forward(self, x: Tensor) -> Tensor:  # [B, N, D] -> [B, N, D]
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class LearnedTokens(nn.Module):
    """A few free learned vectors (CLS token, mask token, null embeddings), stored as an `nn.Embedding`.

    A bare `nn.Parameter` concatenated into the sequence has no Opacus grad sampler, so DP-SGD would
    either fail or fall back to functorch for the whole parent module. Looking the vectors up by index
    through `nn.Embedding` gives the same function with Opacus' exact, cheap embedding grad sampler.
    """

    def __init__(self, count: int, dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding(count, dim)

    def forward(self, index: Tensor) -> Tensor:  # index: [B, ...] long -> [B, ..., dim]
        return self.table(index)

    def repeat(self, batch: int, count: int, device: torch.device) -> Tensor:
        """Vector 0 repeated `count` times per sample: [B, count, dim]."""
        return self.table(torch.zeros(batch, count, dtype=torch.long, device=device))


def sincos_position_embedding(grid: Grid, dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 3D sine-cosine position embedding, [N, dim], tokens row-major over `grid` = (d, h, w).

    The channel layout matches MONAI's `build_sincos_position_embedding` (the one the reference MAE
    used): sin/cos of grid axis 1, then axis 0, then axis 2, `dim / 6` frequencies each. It is written
    out here only because MONAI's version calls `torch.meshgrid` without `indexing` and warns.
    """
    if dim % 6:
        raise ValueError(f"3D sin-cos position embedding needs a width divisible by 6, got {dim}")
    per_axis = dim // 6
    omega = 1.0 / temperature ** (torch.arange(per_axis, dtype=torch.float32) / per_axis)  # [dim/6]
    axes = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in grid), indexing="ij")
    parts = []
    for axis in (axes[1], axes[0], axes[2]):  # MONAI's channel order
        angles = axis.reshape(-1, 1) * omega  # [N, dim/6]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)  # [N, dim]


def grid_of(shape: Grid, patch: int) -> Grid:
    if any(s % patch for s in shape):
        raise ValueError(f"volume shape {shape} is not a multiple of the patch size {patch}")
    return shape[0] // patch, shape[1] // patch, shape[2] // patch


def patchify(volume: Tensor, patch: int) -> Tensor:
    """[B, C, D, H, W] -> [B, N, p³·C]; voxel order inside a patch is (pd, ph, pw, C)."""
    batch, channels, depth, height, width = volume.shape
    d, h, w = grid_of((depth, height, width), patch)
    x = volume.reshape(batch, channels, d, patch, h, patch, w, patch)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # [B, d, h, w, p, p, p, C]
    return x.reshape(batch, d * h * w, patch**3 * channels)


def unpatchify(patches: Tensor, grid: Grid, patch: int) -> Tensor:
    """Inverse of `patchify`: [B, N, p³·C] -> [B, C, D, H, W]."""
    batch, tokens, size = patches.shape
    d, h, w = grid
    if tokens != d * h * w or size % patch**3:
        raise ValueError(f"patches of shape {tuple(patches.shape)} do not fit grid {grid} with patch {patch}")
    channels = size // patch**3
    x = patches.reshape(batch, d, h, w, patch, patch, patch, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, d, p, h, p, w, p]
    return x.reshape(batch, channels, d * patch, h * patch, w * patch)


def tokens_to_grid(tokens: Tensor, grid: Grid) -> Tensor:
    """[B, N, C] -> [B, C, d, h, w] (row-major token order)."""
    batch, count, channels = tokens.shape
    if count != grid[0] * grid[1] * grid[2]:
        raise ValueError(f"{count} tokens do not fill a {grid} grid")
    return tokens.transpose(1, 2).reshape(batch, channels, *grid)


def check_volume(volume: Tensor, shape: Grid, what: str) -> None:
    """Clear error for a volume that is not [B, 1, D, H, W] with the model's (D, H, W)."""
    if volume.ndim != 5 or volume.shape[1] != 1 or tuple(volume.shape[2:]) != tuple(shape):
        raise ValueError(f"{what} expects volumes of shape [B, 1, {', '.join(map(str, shape))}], got {list(volume.shape)}")


def check_tokens(tokens: Tensor, count: int, dim: int, what: str) -> None:
    if tokens.ndim != 3 or tokens.shape[1] != count or tokens.shape[2] != dim:
        raise ValueError(f"{what} expects tokens of shape [B, {count}, {dim}], got {list(tokens.shape)}")
