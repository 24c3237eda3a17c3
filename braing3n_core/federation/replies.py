"""The server's checks on a site's reply before any strategy sees it, and example-weighted means.

A reply is rejected when its arrays differ from the global model's keys, shapes or dtypes, hold NaN/Inf,
or move the model further than the run's update-norm bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def update_norm(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """‖w_site − w_global‖₂ over every floating-point array (in float64)."""
    total = 0.0
    for key, ref in reference.items():
        if np.issubdtype(ref.dtype, np.floating):
            diff = np.asarray(arrays[key], dtype=np.float64) - ref.astype(np.float64)
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def check_reply_arrays(
    arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], norm_bound: float | None = None
) -> tuple[str | None, float]:
    """(reason to reject or None, update norm). Checks keys, shapes, dtypes, NaN/Inf, then the norm bound.

    One pass, reading each array once: `arrays` may be an `ArraysView` over a reply's serialized arrays,
    which then never sits in memory whole beside the other replies."""
    missing, extra = sorted(set(reference) - set(arrays)), sorted(set(arrays) - set(reference))
    if missing or extra:
        return f"array keys differ from the global model (missing {missing[:5]}, unexpected {extra[:5]})", math.nan
    squares = 0.0
    for key, ref in reference.items():
        value = arrays[key]
        if value.shape != ref.shape:
            return f"array {key!r} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}", math.nan
        if value.dtype != ref.dtype:
            return f"array {key!r} has dtype {value.dtype}, expected {ref.dtype}", math.nan
        if np.issubdtype(value.dtype, np.floating):
            if not np.all(np.isfinite(value)):
                bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
                return f"array {key!r} holds {bad} NaN/Inf values", math.nan
            diff = np.asarray(value, dtype=np.float64) - ref.astype(np.float64)
            squares += float(np.dot(diff.ravel(), diff.ravel()))
    norm = math.sqrt(squares)
    if norm_bound is not None and norm > norm_bound:
        return f"update norm {norm:.4g} exceeds the bound {norm_bound:.4g}", norm
    return None, norm


def check_metrics(metrics: Mapping[str, Any]) -> str | None:
    examples = metrics.get("num-examples")
    if not isinstance(examples, (int, float)) or not math.isfinite(examples) or examples <= 0:
        return f"num-examples must be a positive number, got {examples!r}"
    loss = metrics.get("train/loss")
    # A DP-SGD round whose Poisson draws were all empty processed no example and has no loss (noise only).
    drew_nobody = metrics.get("train/examples") == 0
    if loss is not None and not (isinstance(loss, (int, float)) and math.isfinite(loss)) and not drew_nobody:
        return f"train/loss is not finite ({loss!r})"
    return None


def weighted_mean(values: Sequence[tuple[float, float]]) -> float:
    """Example-weighted mean of (value, weight) pairs, ignoring NaN values; NaN when nothing is left."""
    kept = [(v, w) for v, w in values if v is not None and math.isfinite(v) and w > 0]
    total = sum(w for _, w in kept)
    return sum(v * w for v, w in kept) / total if total > 0 else math.nan
