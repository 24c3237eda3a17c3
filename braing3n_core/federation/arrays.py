"""What travels: a module's state as named fp32 numpy arrays, and back.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from braing3n_core.training.loop import trainable_state

Arrays = dict[str, np.ndarray]


def module_arrays(model: nn.Module) -> Arrays:
    """A module's persistent state as fp32 numpy arrays (what travels and what is checkpointed)."""
    return {k: v.numpy() for k, v in trainable_state(model).items()}


def load_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> nn.Module:
    """Load named arrays into `model` (strict: every key must match)."""
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, strict=True)
    return model
