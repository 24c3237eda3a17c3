"""Conditional sampling: DiT tokens [B, N, E] from noise under each row's conditions, decoded to
volumes [B, 1, D, H, W] (z-score units, the preset's LPS grid).

Determinism: samples depend on (seed, batch_size, conditions, steps, guidance). One CPU generator,
seeded once, draws every batch's initial noise in turn, so CPU and CUDA start from the same noise.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from braing3n_core.generation.condition_table import ConditionRow, condition_batch
from braing3n_core.generation.models import GenerationModels
from braing3n_core.models import CNNDecoder
from braing3n_core.models.diffusion import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, sample
from braing3n_core.runtime import autocast


@dataclass
class GeneratedSamples:
    rows: list[ConditionRow]
    tokens: torch.Tensor  # [B, N, E] float32, CPU: encoder tokens
    volumes: torch.Tensor  # [B, 1, D, H, W] float32, CPU: z-score units, the preset's LPS grid
    seconds: float  # wall time of sampling and decoding (model loading excluded)
    settings: dict[str, Any]

    @property
    def seconds_per_volume(self) -> float:
        return self.seconds / max(1, len(self.rows))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode(decoder: CNNDecoder, tokens: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """tokens [B, N, E] → volumes [B, 1, D, H, W] float32 on the CPU (bf16 autocast on CUDA)."""
    device = next(decoder.parameters()).device
    parts = []
    with autocast(device):
        for start in range(0, len(tokens), batch_size):
            parts.append(decoder(tokens[start : start + batch_size].to(device).float()).float().cpu())
    return torch.cat(parts)


@torch.no_grad()
def generate(models: GenerationModels, rows: Sequence[ConditionRow], *, steps: int = DEFAULT_STEPS,
             guidance_scale: float = DEFAULT_GUIDANCE_SCALE, seed: int = 0, batch_size: int = 4) -> GeneratedSamples:
    """One sample per row: DiT tokens from noise under the row's conditions, decoded to a volume."""
    dit = models.require_dit()
    rows = list(rows)
    if batch_size < 1 or steps < 1:
        raise ValueError(f"need batch_size ≥ 1 and steps ≥ 1, got {batch_size} and {steps}")
    cond = condition_batch(rows)
    shape = (dit.config.num_tokens, dit.config.token_dim)
    generator = torch.Generator().manual_seed(seed)
    _synchronize(models.device)
    started = time.perf_counter()
    tokens = []
    with autocast(models.device):
        for start in range(0, len(rows), batch_size):
            part = cond.select(slice(start, start + batch_size))
            tokens.append(sample(dit, (part.batch_size, *shape), part, steps=steps, guidance_scale=guidance_scale,
                                 generator=generator).float().cpu())  # [b, N, E]
    all_tokens = torch.cat(tokens)
    volumes = decode(models.decoder, all_tokens, batch_size)
    _synchronize(models.device)
    settings = {"steps": steps, "guidance_scale": guidance_scale, "seed": seed, "batch_size": batch_size,
                "solver": "heun", "preset": models.preset.name, "encoder_sha256": models.encoder_sha256,
                "device": str(models.device), "autocast": "bf16" if models.device.type == "cuda" else None}
    return GeneratedSamples(rows, all_tokens, volumes, time.perf_counter() - started, settings)
