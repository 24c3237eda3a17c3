"""Conditional sampling: DiT tokens [B, N, E] from noise under each row's conditions, decoded to
volumes [B, 1, D, H, W] (z-score units, the preset's LPS grid).

Determinism: samples depend on (seed, batch_size, conditions, steps, guidance, solver). One CPU
generator, seeded once, draws every batch's initial noise in turn, so CPU and CUDA start from the same
noise. The DiT runs in bf16 where the device does it natively (`inference_autocast`). Batch size barely
matters on a 2-core CPU (1.64 / 1.56 / 1.51 / 1.57 s per volume at 1 / 2 / 4 / 8 volumes per solve, the
CFG branches doubling each); 8 keeps a GPU busy.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

from braing3n_core.generation.condition_table import ConditionRow, condition_batch
from braing3n_core.generation.models import GenerationModels
from braing3n_core.models import CNNDecoder
from braing3n_core.models.diffusion import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_SOLVER,
    DEFAULT_STEPS,
    Solver,
    StepCallback,
    network_calls,
    sample,
)
from braing3n_core.runtime import autocast, inference_autocast, inference_bf16

DEFAULT_BATCH_SIZE = 8
ProgressCallback = StepCallback  # (network calls done, network calls in all) over the whole request


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


@contextlib.contextmanager
def sampling_progress(label: str, volumes: int) -> Iterator[ProgressCallback]:
    """A progress bar over network calls on a terminal's stderr (nothing in a pipe or a log)."""
    columns = (f"[bold]{label}[/] {volumes} volume{'s' * (volumes != 1)}", BarColumn(), MofNCompleteColumn(),
               "network calls", TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task(label, total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield advance


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
             guidance_scale: float = DEFAULT_GUIDANCE_SCALE, seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE,
             solver: Solver = DEFAULT_SOLVER, bf16: bool | None = None,
             progress: ProgressCallback | None = None) -> GeneratedSamples:
    """One sample per row: DiT tokens from noise under the row's conditions, decoded to a volume.
    bf16: None = where the device does it natively (`runtime.inference_bf16`). `progress(done, total)`
    counts network calls over all batches."""
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
    batches = range(0, len(rows), batch_size)
    per_batch = network_calls(steps, solver)
    bf16 = inference_bf16(models.device) if bf16 is None else bf16
    with inference_autocast(models.device, bf16):
        for index, start in enumerate(batches):
            part = cond.select(slice(start, start + batch_size))
            on_step = None if progress is None else (lambda done, _total, offset=index * per_batch:
                                                     progress(offset + done, per_batch * len(batches)))
            tokens.append(sample(dit, (part.batch_size, *shape), part, steps=steps, guidance_scale=guidance_scale,
                                 generator=generator, solver=solver, on_step=on_step).float().cpu())  # [b, N, E]
    all_tokens = torch.cat(tokens)
    volumes = decode(models.decoder, all_tokens, batch_size)
    _synchronize(models.device)
    settings = {"steps": steps, "guidance_scale": guidance_scale, "seed": seed, "batch_size": batch_size,
                "solver": solver, "preset": models.preset.name, "encoder_sha256": models.encoder_sha256,
                "device": str(models.device), "autocast": "bf16" if bf16 else None}
    return GeneratedSamples(rows, all_tokens, volumes, time.perf_counter() - started, settings)
