"""Data-parallel training inside one site: how W workers split each global batch and agree on every step.

The contract is *the single-process run, exactly*: W workers with the same seed and global batch end a
round with the weights one process would have, to float tolerance (tests/test_data_parallel.py).

- **Batches.** One global batch sampler (a seeded shuffle, or DP-SGD's Poisson draw by subject) is
  iterated identically by every worker; worker r keeps positions r, r + W, … of each global batch
  (`DistributedSampler`'s stride), so the examples per round are those of one process, never padded or
  dropped. Each example carries an augmentation seed drawn with the global batch, so its augmentation does
  not depend on which worker (or data-loading process) reads it.
- **Randomness of the loss.** Per-example draws go through `worker_rows` (each worker draws for the global
  batch, keeps its rows); the loss's generator is re-seeded every step from a stream all workers advance
  alike, so a worker whose share of a step is empty stays in step with the others.
- **Gradients.** After each backward pass, worker r's gradient of its local mean loss is weighted by its
  example count b_r and summed over workers in buckets (one all-reduce per ~32 MB), then divided by the
  global count: Σ_r b_r·g_r / Σ_r b_r is the gradient of the global batch's mean loss even when shares are
  unequal (DDP's plain average is not). A parameter no worker touched keeps no gradient, as in one
  process. The loss, the stage's metrics and a non-finite flag travel in the same step's statistics, so
  every worker raises together rather than leaving the others waiting in a collective.
  DDP's module wrapper is not used: it syncs only through `forward()`, while the stages train through
  their own methods (`CNNDecoder.loss`, the DiT's flow loss) and Opacus' per-sample hooks; the explicit
  all-reduce is what DDP does, without overlapping it with the backward pass.
- **DP-SGD.** Per-sample clipping runs on every worker; Opacus' `DistributedDPOptimizer` adds the noise on
  rank 0 only and sums the clipped gradients over workers (see `privacy.dp`), so a step draws one noise
  vector for the global batch, as the ledger's (q, σ) assume.

`ParallelGroup.single()` (world 1) runs the same code path in one process without collectives.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler
from torch.utils.data._utils.collate import default_collate

from braing3n_core.training.examples import Batch
from braing3n_core.training.forkserver import forkserver
from braing3n_core.worker_rows import WorkerRows

BUCKET_ELEMENTS = 2**23  # 32 MB of fp32 gradients per all-reduce (DDP's default bucket is 25 MB)
_SEED_RANGE = 2**31 - 1


@dataclass(frozen=True)
class ParallelGroup:
    """This process's place in its site's data-parallel group (the default process group when world > 1)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def single(cls) -> "ParallelGroup":
        return cls(0, 1)

    @classmethod
    def current(cls) -> "ParallelGroup":
        """The initialised default process group, or a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls.single()

    @property
    def is_single(self) -> bool:
        return self.world == 1

    @property
    def is_leader(self) -> bool:
        """Rank 0: the one whose result leaves the group (weights, metrics)."""
        return self.rank == 0


# --- batches ------------------------------------------------------------------------------------------------


class ShardedBatch(NamedTuple):
    """One worker's share of a global batch, and where its examples sit in it (None: an empty share)."""

    batch: Batch
    rows: WorkerRows | None


class GlobalBatchShards(Sampler[list[tuple[int, int, int, int]]]):
    """This worker's share of each batch of `batches`: items (index, augmentation seed, position, total).

    Every worker iterates `batches` (a seeded batch sampler) and the augmentation-seed stream identically
    and keeps positions `rank::world`; an empty share is an empty list (the step still happens).
    """

    def __init__(self, batches: Iterable[list[int]], augment_seed: int, group: ParallelGroup) -> None:
        self.batches = batches
        self.group = group
        self.generator = torch.Generator().manual_seed(augment_seed)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        rank, world = self.group.rank, self.group.world
        for batch in self.batches:
            seeds = torch.randint(0, _SEED_RANGE, (len(batch),), generator=self.generator).tolist()
            yield [(int(batch[p]), seeds[p], p, len(batch)) for p in range(rank, len(batch), world)]


class SeededExamples(Dataset):
    """`dataset[index]` with torch's CPU generator seeded from the item's own seed (augmentations draw
    from it, `VolumeDataset`); returns (example or None, position, total)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int, int, int]) -> tuple[Any, int, int]:
        index, seed, position, total = item
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.dataset[index], position, total


def collate_share(items: list[tuple[Any, int, int]]) -> ShardedBatch:
    """Stack a share's examples; an example a dataset refused (None: DP-SGD's `privacy.dp.OwnExamples`) drops out."""
    kept = [(example, position) for example, position, _ in items if example is not None]
    if not kept:
        return ShardedBatch({}, None)
    rows = WorkerRows(tuple(position for _, position in kept), items[0][2])
    return ShardedBatch(default_collate([example for example, _ in kept]), rows)


def shuffled_batches(size: int, batch_size: int, seed: int) -> BatchSampler:
    """What `DataLoader(shuffle=True, drop_last=False, generator=seeded)` iterates: a new permutation per pass."""
    return BatchSampler(RandomSampler(range(size), generator=torch.Generator().manual_seed(seed)), batch_size,
                        drop_last=False)


def share_loader(dataset: Dataset, batches: Iterable[list[int]], augment_seed: int, group: ParallelGroup,
                 loader_workers: int = 0, pin_memory: bool = False, context: str | None = "forkserver") -> DataLoader:
    """This worker's shares of `batches` over `dataset`, as `ShardedBatch`es.

    `loader_workers` data-loading processes (started with `context`: never `fork` inside a Ray actor),
    `pin_memory` for asynchronous host-to-GPU copies.
    """
    if loader_workers > 0 and context == "forkserver":
        context = forkserver(type(dataset).__module__)
    return DataLoader(
        SeededExamples(dataset), batch_sampler=GlobalBatchShards(batches, augment_seed, group), collate_fn=collate_share,
        num_workers=loader_workers, pin_memory=pin_memory,
        multiprocessing_context=context if loader_workers > 0 else None,
    )


# --- one step's agreement -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepTotals:
    """A step over the whole global batch: examples, summed loss and stage metrics, and whether every
    worker's loss was finite."""

    examples: int
    loss_sum: float
    extra_sums: dict[str, float]
    finite: bool

    @property
    def loss(self) -> float:
        return self.loss_sum / self.examples if self.examples else float("nan")

    def extra(self) -> dict[str, float]:
        return {k: v / self.examples for k, v in self.extra_sums.items()} if self.examples else {}


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def reduce_step(group: ParallelGroup, model: nn.Module, examples: int, loss: float, extra: dict[str, float],
                extra_names: tuple[str, ...], finite: bool, gradients: bool) -> StepTotals:
    """Sum one step's statistics (and, with `gradients`, the count-weighted gradients) over the group.

    On return every worker holds the global batch's mean gradient (where `gradients`), and the totals.
    With one worker this only packages the local values.
    """
    if group.is_single:
        return StepTotals(examples, loss * examples if examples else 0.0,
                          {k: extra[k] * examples for k in extra_names if k in extra}, finite)
    params = _trainable(model)
    device = params[0].device if params else torch.device("cpu")
    local_extra = [extra.get(name, 0.0) * examples for name in extra_names]
    touched = [1.0 if p.grad is not None else 0.0 for p in params] if gradients else []
    stats = torch.tensor([float(examples), loss * examples if examples else 0.0, *local_extra,
                          0.0 if finite else 1.0, *touched], dtype=torch.float64, device=device)
    dist.all_reduce(stats)
    total = int(round(stats[0].item()))
    sums = stats[2 : 2 + len(extra_names)].tolist()
    any_nonfinite = stats[2 + len(extra_names)].item() > 0
    if gradients and not any_nonfinite:
        touched_any = (stats[3 + len(extra_names):] > 0).tolist()
        _all_reduce_gradients(params, examples, total, touched_any)
    return StepTotals(total, stats[1].item(), dict(zip(extra_names, sums)), not any_nonfinite)


def _all_reduce_gradients(params: list[nn.Parameter], examples: int, total: int, touched: list[bool]) -> None:
    """grad ← Σ_r b_r·g_r / Σ_r b_r for the parameters some worker touched; the others keep no gradient."""
    live = [p for p, used in zip(params, touched) if used]
    for p, used in zip(params, touched):
        if not used:
            p.grad = None
        elif p.grad is None:  # a parameter this worker's share did not reach (or an empty share)
            p.grad = torch.zeros_like(p)
    for bucket in _buckets(live):
        grads = [p.grad for p in bucket]
        flat = torch._utils._flatten_dense_tensors(grads).mul_(float(examples))
        dist.all_reduce(flat)
        flat.div_(float(max(total, 1)))
        for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(reduced)


def _buckets(params: list[nn.Parameter]) -> Iterator[list[nn.Parameter]]:
    bucket: list[nn.Parameter] = []
    size = 0
    for p in params:
        if bucket and (size + p.numel() > BUCKET_ELEMENTS or p.grad.dtype != bucket[0].grad.dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += p.numel()
    if bucket:
        yield bucket


def step_seed(generator: torch.Generator) -> int:
    """The next step's seed for the loss's randomness, from a stream every worker advances once per step."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


def check_replicas(group: ParallelGroup, model: nn.Module) -> None:
    """Every worker must end with the same weights (all-reduced gradients make the updates identical);
    a difference means a bug, and the round must not report either copy."""
    if group.is_single:
        return
    with torch.no_grad():
        params = [p.detach().double().sum() for p in model.parameters()]
        total = torch.stack(params).sum() if params else torch.zeros((), dtype=torch.float64)
        low, high = total.clone().reshape(1), total.clone().reshape(1)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if low.item() != high.item():
        raise RuntimeError(f"data-parallel replicas diverged (weight sums {low.item()!r} .. {high.item()!r})")
