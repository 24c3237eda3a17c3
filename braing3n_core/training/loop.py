"""The training step shared by every face of the system: `train_steps` and `evaluate` on a `Stage`.

The centralized trainer, a federated site's round and the benchmarks all run this loop, so a stage trains
the same way wherever it runs (bf16 autocast on CUDA, gradient clipping, optional FedProx term).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from braing3n_core.runtime import autocast
from braing3n_core.training.data_parallel import ParallelGroup, ShardedBatch, reduce_step, step_seed
from braing3n_core.training.examples import Batch
from braing3n_core.training.stages import Stage
from braing3n_core.worker_rows import WorkerRows, holding


@dataclass
class ProximalTerm:
    """FedProx: (μ/2)·‖w − w_global‖², keeping a site's local steps near the global model."""

    mu: float
    global_params: list[Tensor]

    @classmethod
    def of(cls, model: nn.Module, mu: float) -> "ProximalTerm":
        return cls(mu, [p.detach().clone() for p in model.parameters() if p.requires_grad])

    def __call__(self, model: nn.Module) -> Tensor:
        params = [p for p in model.parameters() if p.requires_grad]
        return 0.5 * self.mu * sum((p - g).pow(2).sum() for p, g in zip(params, self.global_params))


@dataclass
class TrainResult:
    steps: int
    examples: int
    loss: float  # mean training loss over the steps
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        return {"train/loss": self.loss, "train/examples": float(self.examples), "train/seconds": self.seconds,
                "train/examples_per_s": self.examples_per_second, **self.extra}


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def train_steps(
    stage: Stage,
    model: nn.Module,
    batches: Iterator[Batch | ShardedBatch],
    optimizer: torch.optim.Optimizer,
    steps: int,
    lr_at: Callable[[int], float],
    device: torch.device,
    generator: torch.Generator | None = None,
    proximal: ProximalTerm | None = None,
    on_step: Callable[[int, float, int], None] | None = None,
    max_grad_norm: float | None = 1.0,
    group: ParallelGroup | None = None,
    optimizer_reduces: bool = False,
) -> TrainResult:
    """Run `steps` optimizer steps of `stage` on `model`.

    `lr_at(i)` gives the learning rate of local step i (the caller owns the schedule: a global cosine in
    centralized training, the round's rate in federated training). `on_step(i, loss, examples)` feeds
    progress bars. Gradients are clipped to `max_grad_norm` (None disables; under DP-SGD the privacy
    engine clips per sample instead, see `privacy.dp`). An empty batch (`{}`, which DP-SGD's Poisson
    sampling can draw) takes an optimizer step without a loss; a round of only empty batches reports NaN
    for the loss and for each of the stage's `train_metrics`.

    Data-parallel (`group` of several workers, `batches` yielding this worker's `ShardedBatch`es): every
    worker runs this same loop; gradients are averaged over the global batch after each backward pass
    (`data_parallel.reduce_step`; with `optimizer_reduces` the optimizer does it, as Opacus'
    `DistributedDPOptimizer`), and the result's loss, metrics and example count are the global batch's.
    The loss's randomness is re-seeded each step from `generator` (`data_parallel.step_seed`), so the
    run is the same whatever the number of workers.
    """
    group = group if group is not None else ParallelGroup.single()
    model.train()
    step_generator = torch.Generator(device=generator.device) if generator is not None else None
    started = time.perf_counter()
    losses: list[float] = []
    extras: dict[str, list[float]] = {name: [] for name in stage.train_metrics}
    examples = 0
    for step in range(steps):
        batch, rows = _share(next(batches))
        batch = to_device(batch, device)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr_at(step)
        if step_generator is not None:
            step_generator.manual_seed(step_seed(generator))
        optimizer.zero_grad(set_to_none=True)
        size = next(iter(batch.values())).shape[0] if batch else 0  # {}: DP-SGD's Poisson sampling drew nobody here
        loss_value, extra, finite = 0.0, {}, True
        if size:
            with autocast(device), holding(rows):
                loss, extra = stage.loss(model, batch, step_generator)
                if proximal is not None:
                    loss = loss + proximal(model)
            loss_value, finite = float(loss.detach()), bool(torch.isfinite(loss.detach()))
            if undeclared := set(extra) - set(extras):
                raise KeyError(f"stage {stage.name}: loss returned {sorted(undeclared)}, not in its train_metrics")
            if finite:
                loss.backward()
        totals = reduce_step(group, model, size, loss_value, extra, stage.train_metrics, finite,
                             gradients=not optimizer_reduces)
        if not totals.finite:
            raise FloatingPointError(f"stage {stage.name}: non-finite training loss {loss_value} at step {step}")
        if max_grad_norm is not None and totals.examples:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()  # also when nobody was drawn: DP-SGD's step then adds noise only
        examples += totals.examples
        if totals.examples:
            losses.append(totals.loss)
            for key, value in totals.extra().items():
                extras[key].append(value)
        if on_step is not None:
            on_step(step, totals.loss, totals.examples)
    return TrainResult(
        steps=steps,
        examples=examples,
        loss=float(np.mean(losses)) if losses else math.nan,
        seconds=time.perf_counter() - started,
        extra={k: float(np.mean(v)) if v else math.nan for k, v in extras.items()},
    )


def _share(item: Batch | ShardedBatch) -> tuple[Batch, WorkerRows | None]:
    """A data-parallel loader yields this worker's share and its rows; any other loader, whole batches."""
    return (item.batch, item.rows) if isinstance(item, ShardedBatch) else (item, None)


@torch.no_grad()
def evaluate(stage: Stage, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Example-weighted means of the stage's validation metrics over `loader`, plus `val/examples`."""
    model.eval()
    totals: dict[str, float] = {}
    count = 0
    for batch in loader:
        batch = to_device(batch, device)
        size = next(iter(batch.values())).shape[0]
        with autocast(device):
            values = stage.evaluate_batch(model, batch)
        for key, value in values.items():
            totals[key] = totals.get(key, 0.0) + value * size
        count += size
    return {**{k: v / count for k, v in totals.items()}, "val/examples": float(count)} if count else {"val/examples": 0.0}


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW without weight decay on biases, norm scales and lookup tables (CLS/mask tokens, condition
    embeddings), as in the MAE and DiT recipes: decaying those only shrinks them towards zero."""
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2 and id(p) not in lookups]
    no_decay = [p for p in model.parameters() if p.requires_grad and (p.ndim < 2 or id(p) in lookups)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95))


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """What a stage sends and checkpoints: the model's persistent state (fp32, CPU)."""
    # contiguous: a decoder trained channels-last (`training.compute`) still sends and stores plain arrays
    return {k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in model.state_dict().items()}


def make_loader(dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, drop_last=False, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
