"""What travels: a module's state as named fp32 numpy arrays, and back.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from braing3n_core.training.loop import trainable_state

Arrays = dict[str, np.ndarray]


class SerializedArray(Protocol):
    def numpy(self) -> np.ndarray: ...


class ArraysView(Mapping[str, np.ndarray]):
    """Named arrays read one at a time from a record of serialized arrays (Flower's `ArrayRecord`, or any
    mapping whose values have `.numpy()`).

    `{k: v.numpy() for k, v in record.items()}` holds a second copy of a whole model while it is in use (at
    `paper` the DiT is 2.6 GB); checks, norms and loading through this view hold one array at a time.
    Each access deserializes again, so read a key once where that matters."""

    def __init__(self, record: Mapping[str, Any]) -> None:
        self.record = record

    def __getitem__(self, key: str) -> np.ndarray:
        value: SerializedArray = self.record[key]
        return value.numpy()

    def __iter__(self) -> Iterator[str]:
        return iter(self.record)

    def __len__(self) -> int:
        return len(self.record)


def module_arrays(model: nn.Module) -> Arrays:
    """A module's persistent state as fp32 numpy arrays (what travels and what is checkpointed)."""
    return {k: v.numpy() for k, v in trainable_state(model).items()}


def load_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> nn.Module:
    """Load named arrays into `model` (strict: every key must match)."""
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, strict=True)
    return model
