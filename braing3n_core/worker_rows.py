"""Which rows of a global batch a data-parallel worker holds, and random draws that do not depend on it.

A stage's loss draws randomness per example (the MAE's masks, the decoder's token noise, the DiT's time,
noise and condition dropout), always as one tensor whose first dimension is the batch. When W workers
split a global batch of B examples (worker r holds positions r, r + W, r + 2W, …, the `DistributedSampler`
stride), each worker draws the tensor for all B rows from the same generator state and keeps the rows at
its positions: the union of the workers' draws is then exactly what one process drew for the whole batch,
so data-parallel training reproduces single-process training example for example (the cost is drawing W×
the random numbers, small next to the network).

`training.data_parallel` sets the rows around each loss call (`holding`); models draw through
`per_example`, which without rows set is a plain draw.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class WorkerRows:
    """This worker's `positions` (ascending) in a global batch of `total` examples."""

    positions: tuple[int, ...]
    total: int

    def __post_init__(self) -> None:
        if any(not 0 <= p < self.total for p in self.positions):
            raise ValueError(f"positions {self.positions} outside a batch of {self.total}")

    @classmethod
    def stride(cls, rank: int, world: int, total: int) -> "WorkerRows":
        """Positions rank, rank + world, … (how `DistributedSampler` deals examples to workers)."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a group of {world} workers")
        return cls(tuple(range(rank, total, world)), total)

    @property
    def count(self) -> int:
        return len(self.positions)

    @property
    def everything(self) -> bool:
        return self.count == self.total

    def take(self, rows: Tensor) -> Tensor:
        """This worker's rows of a tensor drawn for the whole global batch ([total, ...] -> [count, ...])."""
        return rows[torch.tensor(self.positions, dtype=torch.long, device=rows.device)]


_CURRENT: ContextVar[WorkerRows | None] = ContextVar("braing3n_worker_rows", default=None)


@contextlib.contextmanager
def holding(rows: WorkerRows | None) -> Iterator[None]:
    """Within this block, `per_example` draws for the global batch and keeps `rows` (None: plain draws)."""
    token = _CURRENT.set(rows)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def per_example(draw: Callable[[int], Tensor], batch: int) -> Tensor:
    """`draw(n)` returns n rows of random numbers; this returns the `batch` rows that belong to this worker."""
    rows = _CURRENT.get()
    if rows is None:
        return draw(batch)
    if rows.count != batch:
        raise ValueError(f"this worker holds {rows.count} of the {rows.total} rows of its global batch, "
                         f"but its batch has {batch}")
    full = draw(rows.total)
    return full if rows.everything else rows.take(full)
