"""Centralized training: one machine, the sites' data pooled.

This is both a user feature (a single hospital training on its own scans) and the baseline every
federated run is compared against: it runs the very `train_steps` the federated client runs, over the
union of the sites' training subjects, with one global cosine schedule.

Run folder: `<out>/checkpoints/<stage>/step-000123.{safetensors,json}` (model + optimizer, written
atomically every `checkpoint_every` steps and at the end) and `<out>/metrics.jsonl`.

With `workers` > 1 the loop runs data-parallel (`training.process_group`, `training.data_parallel`): this
process prepares the data and token caches and the starting (or resumed) state, one process group lives
for the whole run, and rank 0 alone evaluates, logs and writes checkpoints. The machine's settings
(`compute`: activation checkpointing, data-loading processes, …) are those of the first site file.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from braing3n_core.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, unflatten_optimizer_state
from braing3n_core.data.datasets import load_site
from braing3n_core.data.tokens import TokenCache, encoder_sha256
from braing3n_core.models import MAEEncoder
from braing3n_core.presets import Preset, get_preset
from braing3n_core.errors import JobFailed
from braing3n_core.runtime import cosine_lr, infinite, resolve_device, round_seed, seed_everything
from braing3n_core.site_config import ComputeConfig, SiteConfig
from braing3n_core.stage_names import MAE
from braing3n_core.training.checkpoints import (
    STEP_PREFIX,
    initial_model,
    load_encoder,
    save_stage_checkpoint,
    stage_checkpoint_dir,
)
from braing3n_core.training.compute import prepare_network
from braing3n_core.training.data_parallel import ParallelGroup, check_replicas, share_loader, shuffled_batches
from braing3n_core.training.examples import SiteInputs, change_trend_sums, token_moments
from braing3n_core.training.loop import evaluate, make_loader, make_optimizer, train_steps
from braing3n_core.training.process_group import DataParallelError, WorkerPlan, run_data_parallel
from braing3n_core.training.stages import Stage, get_stage, stage_dataset


@dataclass(frozen=True)
class TrainOptions:
    stage: str
    preset: str = "small"
    steps: int = 200
    batch_size: int | None = None  # stage default when None
    lr: float | None = None
    weight_decay: float | None = None
    warmup_steps: int = 0
    seed: int = 0
    device: str = "cpu"
    out_dir: Path = Path("runs/central")
    encoder: Path | None = None  # MAE checkpoint for the decoder and DiT stages (default: latest in out_dir)
    checkpoint_every: int = 100
    eval_every: int = 0  # 0 = only at the end
    num_workers: int = 0  # data-loading processes per training worker (default: the first site's compute setting)
    resume: bool = True
    workers: int = 1  # data-parallel training processes (cuda: one GPU each)


def resolve_encoder_checkpoint(options: TrainOptions) -> Path:
    if options.encoder is not None:
        return Path(options.encoder)
    found = latest_checkpoint(stage_checkpoint_dir(options.out_dir, MAE), STEP_PREFIX)
    if found is None:
        raise CheckpointError(
            f"stage {options.stage!r} needs a trained encoder: pass --encoder or train the mae stage into "
            f"{options.out_dir} first"
        )
    return found


def prepare_sites(
    configs: Sequence[SiteConfig], preset: Preset, stage: Stage, encoder: MAEEncoder | None, device: torch.device
) -> list[SiteInputs]:
    """Load each site (checks, preprocessing cache) and, for stages after the first, its token cache."""
    sites = []
    for config in configs:
        data = load_site(config, preset)
        for problem in data.problems:
            print(f"[{config.site_id}] {problem}", file=sys.stderr)
        tokens = None
        if stage.needs_encoder:
            assert encoder is not None
            tokens = TokenCache(config.resolved_cache_dir, encoder, preset, data.cache, device)
        sites.append(SiteInputs(data, tokens))
    return sites


def train_centralized(configs: Sequence[SiteConfig], options: TrainOptions) -> Path:
    """Train one stage on the pooled training subjects of `configs`; returns the final checkpoint."""
    stage = get_stage(options.stage)
    preset = get_preset(options.preset)
    device = resolve_device(options.device)
    seed_everything(options.seed)
    out_dir = Path(options.out_dir)
    ckpt_dir = stage_checkpoint_dir(out_dir, stage.name)

    encoder, encoder_path = None, None
    if stage.needs_encoder:
        encoder_path = resolve_encoder_checkpoint(options)
        encoder = load_encoder(encoder_path).to(device)

    sites = prepare_sites(configs, preset, stage, encoder, device)
    train_set = stage_dataset(stage, sites, "train")
    if len(train_set) == 0:
        raise ValueError(f"stage {stage.name}: no usable training scans in {[c.site_id for c in configs]}")
    val_set = stage_dataset(stage, sites, "val")
    batch_size = options.batch_size or stage.defaults.batch_size
    lr = options.lr if options.lr is not None else stage.defaults.lr
    weight_decay = options.weight_decay if options.weight_decay is not None else stage.defaults.weight_decay

    model = initial_model(stage, preset, options.seed).to(device)
    if stage.name == "dit":
        model.set_token_statistics(*token_moments(train_set, model.config.token_dim).mean_std())
        if model.config.trend:
            sums = change_trend_sums(train_set, model.config.num_tokens, model.config.token_dim)
            model.set_change_trend(sums.rates(model.token_std))
    optimizer = make_optimizer(model, lr, weight_decay)
    start_step = 0
    resumed = latest_checkpoint(ckpt_dir, STEP_PREFIX) if options.resume else None
    if resumed is not None:
        checkpoint = load_checkpoint(resumed)
        model.load_state_dict(checkpoint.sub_state_dict("model"))
        optimizer.load_state_dict(unflatten_optimizer_state(checkpoint.tensors, checkpoint.meta["optimizer"]))
        start_step = int(checkpoint.meta["step"])
        print(f"resuming {stage.name} from {resumed} at step {start_step}", file=sys.stderr)
    if start_step >= options.steps:
        return resumed  # type: ignore[return-value]

    meta = {
        "preset": preset.name,
        "sites": [c.site_id for c in configs],
        "total_steps": options.steps,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        "encoder_sha256": encoder_sha256(encoder) if encoder is not None else None,
        "encoder_checkpoint": str(encoder_path) if encoder_path else None,
        "train_examples": len(train_set),
    }
    compute = configs[0].compute
    if options.num_workers:
        compute = compute.model_copy(update={"loader_workers": options.num_workers})
    job = CentralJob(stage.name, stage.model_config(model), {k: v.detach().cpu() for k, v in model.state_dict().items()},
                     optimizer.state_dict(), train_set, val_set, options, meta, start_step, batch_size, lr, compute,
                     resumed)
    if options.workers == 1:
        return train_on_worker(job, ParallelGroup.single(), device, model, optimizer)
    plan = WorkerPlan(options.workers, device.type, threads=max(1, torch.get_num_threads() // options.workers))
    try:
        return run_data_parallel(functools.partial(train_on_worker, job), plan, deadline_s=math.inf).value
    except DataParallelError as error:
        raise JobFailed(f"centralized training on {options.workers} workers failed: {error}") from None


@dataclass(frozen=True)
class CentralJob:
    """The training loop's inputs, picklable: what each data-parallel worker (or this process) runs from."""

    stage: str
    model_config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    train_set: Any
    val_set: Any
    options: TrainOptions
    meta: dict[str, Any]
    start_step: int
    batch_size: int
    lr: float
    compute: ComputeConfig
    resumed: Path | None


def train_on_worker(job: CentralJob, group: ParallelGroup, device: torch.device, model: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None) -> Path:
    """The loop on one worker of `group` (or alone); rank 0 evaluates, logs and checkpoints."""
    stage, options = get_stage(job.stage), job.options
    if model is None:
        model = stage.from_config(job.model_config)
        model.load_state_dict(job.weights)
    model = prepare_network(model.to(device), job.compute, device)
    if optimizer is None:
        weight_decay = options.weight_decay if options.weight_decay is not None else stage.defaults.weight_decay
        optimizer = make_optimizer(model, job.lr, weight_decay)
        optimizer.load_state_dict(job.optimizer_state)
    generator = torch.Generator().manual_seed(options.seed)
    seed = options.seed + job.start_step
    loader = share_loader(job.train_set, shuffled_batches(len(job.train_set), job.batch_size, seed),
                          augment_seed=round_seed(seed, "augment"), group=group, loader_workers=job.compute.loader_workers,
                          pin_memory=device.type == "cuda" and job.compute.pin_memory,
                          context="forkserver" if group.is_single else "fork")
    batches = infinite(loader)
    val_loader = make_loader(job.val_set, job.batch_size, False, options.seed) if len(job.val_set) else None
    out_dir = Path(options.out_dir)
    ckpt_dir = stage_checkpoint_dir(out_dir, stage.name)
    metrics_path = out_dir / "metrics.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    last_path = job.resumed

    def log(record: dict[str, Any]) -> None:
        with open(metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"stage": stage.name, "time": time.time(), **record}) + "\n")

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[speed]:.2f} vol/s"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not (sys.stderr.isatty() and group.is_leader)) as progress:
        task = progress.add_task(f"train {stage.name}", total=options.steps, completed=job.start_step, loss=float("nan"),
                                 speed=0.0)
        step = job.start_step
        while step < options.steps:
            chunk = min(options.checkpoint_every, options.steps - step)
            if options.eval_every:
                chunk = min(chunk, options.eval_every - step % options.eval_every)
            offset = step
            result = train_steps(
                stage, model, batches, optimizer, chunk,
                lr_at=lambda i: cosine_lr(job.lr, offset + i, options.steps, options.warmup_steps),
                device=device, generator=generator, group=group,
                on_step=lambda i, loss, n: progress.update(task, advance=1, loss=loss),
            )
            step += chunk
            if not group.is_leader:
                continue  # the others go on to the next collective while rank 0 evaluates and writes
            progress.update(task, speed=result.examples_per_second)
            record = {"step": step, **result.metrics(), "train/workers": float(group.world)}
            if val_loader is not None and (step == options.steps or (options.eval_every and step % options.eval_every == 0)):
                record |= evaluate(stage, model, val_loader, device)
            log(record)
            if step % options.checkpoint_every == 0 or step == options.steps:
                last_path = save_stage_checkpoint(ckpt_dir / f"step-{step:06d}", stage, model,
                                                  {**job.meta, "step": step}, optimizer)
    check_replicas(group, model)
    return last_path  # type: ignore[return-value]
