"""What a user asks to generate: one `ConditionRow` per sample (the DiT's six variables).

`modality` is required, any other variable may be missing (`n/a`, unconditioned); `read_conditions` reads
a TSV whose errors name the file, line and column.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from braing3n_core.config import ConfigError
from braing3n_core.labels import DIAGNOSES, FIELD_STRENGTHS_T, MODALITIES, SEXES, Modality, ScanLabels
from braing3n_core.models.conditions import (
    CONDITION_SCHEMA,
    ConditionBatch,
    ContinuousVariable,
    conditions_from_labels,
)

CONDITION_COLUMNS: tuple[str, ...] = tuple(v.name for v in CONDITION_SCHEMA)


MISSING = "n/a"  # BIDS' missing value; an empty cell means the same


@dataclass(frozen=True)
class ConditionRow:
    """The requested value of each of the six variables; `None` leaves a variable unconditioned. The
    modality is always given: it decides the contrast and names the file a sample is written to."""

    modality: Modality
    age: float | None = None
    sex: str | None = None
    diagnosis: str | None = None
    field_strength: float | None = None
    mmse: float | None = None
    label: str = ""  # display name (montages, report); not a condition

    @classmethod
    def checked(cls, values: Mapping[str, Any], locate: Callable[[str], str], label: str = "") -> ConditionRow:
        """A row from raw values (text or numbers; `None`, "" or "n/a" = missing), each checked against the
        conditioning schema; `locate(column)` says where a value came from, for the error message."""
        out: dict[str, Any] = {}
        for variable in CONDITION_SCHEMA:
            raw = values.get(variable.name)
            text = "" if raw is None else str(raw).strip()
            where = locate(variable.name)
            if text in ("", MISSING):
                if variable.name == "modality":
                    raise ConfigError(f"{where}: modality is required (one of {[m.value for m in Modality]})")
                out[variable.name] = None
                continue
            numeric = isinstance(variable, ContinuousVariable) or variable.name == "field_strength"
            try:
                value: Any = float(text) if numeric else text
            except ValueError:
                raise ConfigError(f"{where}: {text!r} is not a number") from None
            try:
                if isinstance(variable, ContinuousVariable):
                    out[variable.name] = variable.check(value, where)
                else:
                    category = variable.categories[variable.index(value, where)]
                    out[variable.name] = float(category) if numeric else category
            except ValueError as error:
                raise ConfigError(str(error)) from None
        return cls(modality=Modality(out.pop("modality")), label=label, **out)

    def labels(self) -> ScanLabels:
        return ScanLabels(age=self.age, sex=self.sex, diagnosis=self.diagnosis, mmse=self.mmse,
                          field_strength=self.field_strength)

    def to_dict(self) -> dict[str, Any]:
        """The six variables (modality as its BIDS value), the form staged sets and JSON files keep."""
        return {"age": self.age, "sex": self.sex, "diagnosis": self.diagnosis, "modality": self.modality.value,
                "field_strength": self.field_strength, "mmse": self.mmse}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str) -> ConditionRow:
        return cls.checked(values, lambda column: f"{where}, {column}", str(values.get("label") or ""))

    def describe(self) -> str:
        if self.label:
            return self.label
        parts = [self.diagnosis, f"{self.age:g} y" if self.age is not None else None, self.sex, self.modality.short]
        return ", ".join(p for p in parts if p)


def read_conditions(path: Path) -> list[ConditionRow]:
    """Rows of a conditions TSV: a header among `age, sex, diagnosis, modality, field_strength, mmse`
    (modality required), one row per sample, `n/a` or an empty cell for "unconditioned". Every value is
    checked; an error names the file, the line and the column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: conditions file not found")
    # utf-8-sig: a spreadsheet's byte-order mark would otherwise make the first column unknown
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter="\t")
        header = [h.strip() for h in next(reader, [])]
        unknown = [h for h in header if h not in CONDITION_COLUMNS]
        repeated = sorted({h for h in header if header.count(h) > 1})
        if not header or unknown or repeated or "modality" not in header:
            raise ConfigError(f"{path}: line 1 (header): columns must be tab-separated names among "
                              f"{list(CONDITION_COLUMNS)}, 'modality' included, each once (unknown {unknown}, "
                              f"repeated {repeated}, modality {'present' if 'modality' in header else 'missing'})")
        rows = []
        for cells in reader:
            line = reader.line_num
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                raise ConfigError(f"{path}: line {line}: {len(cells)} tab-separated cells, the header has {len(header)}")
            values = dict(zip(header, cells))
            rows.append(ConditionRow.checked(values, lambda column, line=line: f"{path}: line {line}, column {column!r}"))
    if not rows:
        raise ConfigError(f"{path}: no condition rows under the header")
    return rows


def condition_batch(rows: Sequence[ConditionRow]) -> ConditionBatch:
    """Rows → the DiT's batch form (`None` → missing)."""
    if not rows:
        raise ValueError("no condition rows")
    return conditions_from_labels([r.labels() for r in rows], [r.modality for r in rows])


# Plausible ranges per diagnosis (years; MMSE points): the cohort the models learn from looks like this.
AGE_BY_DIAGNOSIS = {"CN": (55.0, 85.0), "MCI": (60.0, 88.0), "AD": (62.0, 90.0), "glioma": (25.0, 75.0)}
MMSE_BY_DIAGNOSIS = {"CN": (27.0, 30.0), "MCI": (22.0, 27.0), "AD": (12.0, 22.0), "glioma": None}


def balanced_conditions(n: int, seed: int = 0) -> list[ConditionRow]:
    """N rows cycling diagnosis fastest, then sex, modality and field strength (even in every prefix)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        diagnosis = DIAGNOSES[i % len(DIAGNOSES)]
        low, high = AGE_BY_DIAGNOSIS[diagnosis]
        mmse_range = MMSE_BY_DIAGNOSIS[diagnosis]
        rows.append(ConditionRow(
            age=round(float(rng.uniform(low, high)), 1),
            sex=SEXES[(i // len(DIAGNOSES)) % len(SEXES)],
            diagnosis=diagnosis,
            modality=MODALITIES[(i // (len(DIAGNOSES) * len(SEXES))) % len(MODALITIES)],
            field_strength=FIELD_STRENGTHS_T[(i // (len(DIAGNOSES) * len(SEXES) * len(MODALITIES))) % len(FIELD_STRENGTHS_T)],
            mmse=None if mmse_range is None else float(round(rng.uniform(*mmse_range))),
        ))
    return rows
