"""Stage checkpoints: a stage's network saved with its config, and rebuilt from any stage checkpoint.

`save_stage_checkpoint` / `load_stage_model` are the one place that knows the layout (`model.<name>`
tensors, the stage name and model config in the manifest); the centralized trainer, the server's round
checkpoints and every job read stage checkpoints through them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from braing3n_core.checkpoint import (
    Checkpoint,
    CheckpointError,
    flatten_optimizer_state,
    load_checkpoint,
    save_checkpoint,
)
from braing3n_core.models import MAEEncoder
from braing3n_core.presets import Preset, get_preset
from braing3n_core.runtime import seed_everything
from braing3n_core.training.loop import trainable_state
from braing3n_core.training.stages import Stage, get_stage

STEP_PREFIX = "step-"  # a centralized run's checkpoints: <out>/checkpoints/<stage>/step-000400.*


def stage_checkpoint_dir(out_dir: Path, stage: str) -> Path:
    """Where a run folder (centralized or federated, `federation.run_folder`) keeps a stage's checkpoints."""
    return Path(out_dir) / "checkpoints" / stage


def save_stage_checkpoint(stem: Path, stage: Stage, model: nn.Module, meta: dict[str, Any],
                          optimizer: torch.optim.Optimizer | None = None) -> Path:
    tensors = {f"model.{k}": v for k, v in trainable_state(model).items()}
    meta = {**meta, "stage": stage.name, "model_config": stage.model_config(model)}
    if optimizer is not None:
        optim_tensors, optim_meta = flatten_optimizer_state(optimizer.state_dict())
        tensors |= optim_tensors
        meta["optimizer"] = optim_meta
    return save_checkpoint(stem, tensors, meta)


def load_stage_model(path: Path | Checkpoint, expected_stage: str | None = None) -> tuple[nn.Module, Checkpoint]:
    """Rebuild a stage's network from a checkpoint (its config is in the manifest)."""
    checkpoint = path if isinstance(path, Checkpoint) else load_checkpoint(path)
    name = checkpoint.meta.get("stage")
    if expected_stage is not None and name != expected_stage:
        raise CheckpointError(f"{checkpoint.path}: holds stage {name!r}, expected {expected_stage!r}")
    stage = get_stage(name)
    model = stage.from_config(checkpoint.meta["model_config"])
    model.load_state_dict(checkpoint.sub_state_dict("model"))
    return model, checkpoint


def initial_model(stage: Stage | str, preset: Preset | str, seed: int) -> nn.Module:
    """A stage's network exactly as `train_centralized(seed=seed)` starts it: the global generators are
    seeded with `seed` right before it is built, so nothing that runs earlier (site checks, data loading)
    can shift its weights. `braing3n probe --random-init --seed S` uses it as the untrained baseline."""
    stage = get_stage(stage) if isinstance(stage, str) else stage
    preset = get_preset(preset) if isinstance(preset, str) else preset
    seed_everything(seed)
    return stage.build(preset)


def load_encoder(path: Path) -> MAEEncoder:
    """The frozen tokenizer from a stage-1 (MAE) checkpoint."""
    model, _ = load_stage_model(path, expected_stage="mae")
    return model.encoder.eval().requires_grad_(False)
