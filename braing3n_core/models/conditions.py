"""The DiT's conditioning schema: six declared variables, their batch form, and classifier-free dropout.

The six variables (model-spec §7 leaves their identity open; these are the project's choice, all present
in the label vocabulary of `labels.py` and in the public cohorts' metadata):

| variable         | kind        | values                                  | scaled for the network      |
|------------------|-------------|-----------------------------------------|-----------------------------|
| age              | continuous  | years, `labels.AGE_RANGE_YEARS`          | linearly to [−1, 1]         |
| sex              | categorical | `labels.SEXES`                           | index                       |
| diagnosis        | categorical | `labels.DIAGNOSES`                       | index                       |
| modality         | categorical | `labels.MODALITIES` (BIDS suffix values) | index                       |
| field_strength   | categorical | `labels.FIELD_STRENGTHS_T` (tesla)       | index of the nearest value  |
| mmse             | continuous  | points, `labels.MMSE_RANGE`              | linearly to [−1, 1]         |

Longitudinal forecasting adds one more continuous input, the `INTERVAL` in years between the baseline
and the follow-up session; it is not one of the six but is embedded, nulled and dropped the same way.

Batch form (`ConditionBatch`): one tensor `[B]` per variable. A missing continuous value is NaN, a
missing categorical value is −1. The network maps every missing value to a learned null embedding;
classifier-free guidance training "drops" a value by marking it missing, so "not recorded" and
"dropped" share the null embedding and unconditional sampling is simply "everything missing".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch import Tensor

from braing3n_core.labels import (
    AGE_RANGE_YEARS,
    DIAGNOSES,
    FIELD_STRENGTHS_T,
    MMSE_RANGE,
    MODALITIES,
    SEXES,
    Modality,
    ScanLabels,
)
from braing3n_core.worker_rows import per_example

MISSING_CATEGORY = -1


@dataclass(frozen=True)
class ContinuousVariable:
    name: str
    unit: str
    low: float
    high: float

    def scale(self, values: Tensor) -> Tensor:
        """Physical units -> roughly [−1, 1] (NaN stays NaN)."""
        return (values - self.low) / (self.high - self.low) * 2.0 - 1.0

    def check(self, value: float, where: str) -> float:
        if not math.isfinite(value) or not self.low <= value <= self.high:
            raise ValueError(f"{where}: {self.name} = {value} {self.unit} is outside [{self.low}, {self.high}]")
        return float(value)


@dataclass(frozen=True)
class CategoricalVariable:
    name: str
    categories: tuple[str, ...] | tuple[float, ...]
    tolerance: float = 0.0  # numeric categories: accept values this close (e.g. 2.89 T reads as 3.0 T)

    @property
    def size(self) -> int:
        return len(self.categories)

    def index(self, value: str | float, where: str) -> int:
        if self.tolerance and isinstance(value, (int, float)):
            distances = [abs(float(value) - float(c)) for c in self.categories]
            best = min(range(len(distances)), key=distances.__getitem__)
            if distances[best] <= self.tolerance:
                return best
        elif value in self.categories:
            return self.categories.index(value)
        raise ValueError(f"{where}: {self.name} = {value!r} is not one of {list(self.categories)}")


AGE = ContinuousVariable("age", "years", *AGE_RANGE_YEARS)
SEX = CategoricalVariable("sex", SEXES)
DIAGNOSIS = CategoricalVariable("diagnosis", DIAGNOSES)
MODALITY = CategoricalVariable("modality", tuple(m.value for m in MODALITIES))
FIELD_STRENGTH = CategoricalVariable("field_strength", FIELD_STRENGTHS_T, tolerance=0.25)
MMSE = ContinuousVariable("mmse", "points", *MMSE_RANGE)

CONDITION_SCHEMA: tuple[ContinuousVariable | CategoricalVariable, ...] = (AGE, SEX, DIAGNOSIS, MODALITY, FIELD_STRENGTH, MMSE)
"""The six conditioning variables, in the order of `ConditionBatch`'s fields."""

INTERVAL = ContinuousVariable("interval", "years", 0.0, 20.0)
"""Follow-up minus baseline, in years (longitudinal mode only)."""


@dataclass(frozen=True)
class ConditionBatch:
    """Conditions of B samples; continuous float tensors (NaN = missing), categorical long (−1 = missing)."""

    age: Tensor  # [B] float, years
    sex: Tensor  # [B] long, index into SEXES
    diagnosis: Tensor  # [B] long, index into DIAGNOSES
    modality: Tensor  # [B] long, index into MODALITIES
    field_strength: Tensor  # [B] long, index into FIELD_STRENGTHS_T
    mmse: Tensor  # [B] float, points

    def __post_init__(self) -> None:
        sizes = set()
        for variable in CONDITION_SCHEMA:
            value = getattr(self, variable.name)
            if not isinstance(value, Tensor) or value.ndim != 1:
                raise ValueError(f"ConditionBatch.{variable.name} must be a 1-D tensor [B], got {type(value).__name__} "
                                 f"{getattr(value, 'shape', '')}")
            if isinstance(variable, ContinuousVariable) and not value.is_floating_point():
                raise ValueError(f"ConditionBatch.{variable.name} must be floating point (NaN = missing), got {value.dtype}")
            if isinstance(variable, CategoricalVariable):
                if value.dtype != torch.long:
                    raise ValueError(f"ConditionBatch.{variable.name} must be int64 (−1 = missing), got {value.dtype}")
                # Range check only on CPU, where batches are built: elsewhere it would force a device sync.
                on_cpu = value.device.type == "cpu" and value.numel() > 0
                if on_cpu and (value.min() < MISSING_CATEGORY or value.max() >= variable.size):
                    raise ValueError(f"ConditionBatch.{variable.name} indices must lie in [−1, {variable.size - 1}]")
            sizes.add(value.shape[0])
        if len(sizes) != 1:
            raise ValueError(f"ConditionBatch fields have different batch sizes: {sorted(sizes)}")

    @property
    def batch_size(self) -> int:
        return self.age.shape[0]

    @property
    def device(self) -> torch.device:
        return self.age.device

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to(self, device: torch.device | str) -> "ConditionBatch":
        return ConditionBatch(**{k: v.to(device) for k, v in self.tensors().items()})

    def select(self, index: Tensor | slice) -> "ConditionBatch":
        return ConditionBatch(**{k: v[index] for k, v in self.tensors().items()})

    def missing(self) -> Tensor:
        """[B, 6] bool, True where a variable is missing, columns in `CONDITION_SCHEMA` order."""
        columns = []
        for variable in CONDITION_SCHEMA:
            value = getattr(self, variable.name)
            columns.append(value.isnan() if isinstance(variable, ContinuousVariable) else value == MISSING_CATEGORY)
        return torch.stack(columns, dim=1)

    def without(self, drop: Tensor) -> "ConditionBatch":
        """Mark as missing where `drop` [B, 6] (bool, schema order) is True."""
        if drop.shape != (self.batch_size, len(CONDITION_SCHEMA)):
            raise ValueError(f"drop mask must be [{self.batch_size}, {len(CONDITION_SCHEMA)}], got {list(drop.shape)}")
        values = {}
        for column, variable in enumerate(CONDITION_SCHEMA):
            value = getattr(self, variable.name)
            null = torch.full_like(value, math.nan if isinstance(variable, ContinuousVariable) else MISSING_CATEGORY)
            values[variable.name] = torch.where(drop[:, column].to(value.device), null, value)
        return ConditionBatch(**values)

    @staticmethod
    def cat(batches: Sequence["ConditionBatch"]) -> "ConditionBatch":
        return ConditionBatch(**{f.name: torch.cat([getattr(b, f.name) for b in batches]) for f in fields(ConditionBatch)})


def null_conditions(batch_size: int, device: torch.device | str = "cpu") -> ConditionBatch:
    """Every variable missing: the unconditional branch of classifier-free guidance."""
    values = {}
    for variable in CONDITION_SCHEMA:
        if isinstance(variable, ContinuousVariable):
            values[variable.name] = torch.full((batch_size,), math.nan, device=device)
        else:
            values[variable.name] = torch.full((batch_size,), MISSING_CATEGORY, dtype=torch.long, device=device)
    return ConditionBatch(**values)


def conditions_from_labels(labels: Sequence[ScanLabels], modalities: Sequence[Modality]) -> ConditionBatch:
    """One row per scan; `None` labels become missing. Out-of-vocabulary or implausible values raise
    ValueError naming the row and the variable."""
    if len(labels) != len(modalities):
        raise ValueError(f"conditions_from_labels: {len(labels)} labels but {len(modalities)} modalities")
    rows: dict[str, list] = {v.name: [] for v in CONDITION_SCHEMA}
    for row, (label, modality) in enumerate(zip(labels, modalities)):
        where = f"scan {row}"
        values = {
            "age": label.age,
            "sex": label.sex,
            "diagnosis": label.diagnosis,
            "modality": Modality(modality).value,
            "field_strength": label.field_strength,
            "mmse": label.mmse,
        }
        for variable in CONDITION_SCHEMA:
            value = values[variable.name]
            if isinstance(variable, ContinuousVariable):
                rows[variable.name].append(math.nan if value is None else variable.check(value, where))
            else:
                rows[variable.name].append(MISSING_CATEGORY if value is None else variable.index(value, where))
    return ConditionBatch(**{
        v.name: torch.tensor(rows[v.name], dtype=torch.float32 if isinstance(v, ContinuousVariable) else torch.long)
        for v in CONDITION_SCHEMA
    })


def random_drop_mask(
    batch_size: int, variables: int, p_each: float, p_all: float, generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """[B, variables] bool: each entry dropped with probability `p_each`, and every entry of a row
    dropped with probability `p_all` (so the model also learns the fully unconditional distribution)."""
    if not (0.0 <= p_each <= 1.0 and 0.0 <= p_all <= 1.0):
        raise ValueError(f"drop probabilities must lie in [0, 1], got p_each={p_each}, p_all={p_all}")
    source = generator.device if generator is not None else device
    each = per_example(lambda n: torch.rand(n, variables, generator=generator, device=source), batch_size) < p_each
    whole = per_example(lambda n: torch.rand(n, 1, generator=generator, device=source), batch_size) < p_all
    return (each | whole).to(device)


def drop_conditions(
    batch: ConditionBatch, p_each: float = 0.1, p_all: float = 0.1, generator: torch.Generator | None = None
) -> ConditionBatch:
    """Classifier-free-guidance dropout of the six variables (see `random_drop_mask`)."""
    mask = random_drop_mask(batch.batch_size, len(CONDITION_SCHEMA), p_each, p_all, generator, batch.device)
    return batch.without(mask)
