"""The probe tasks: the label table, which tasks a set of scans supports, and how a task is scored.

`ProbeTable` holds one row of labels per scan; `candidate_tasks` / `select_tasks` decide which tasks
have enough labelled subjects per class; `evaluate_predictions` scores any predictions of a task (the
centralized probes, the federated heads and generation adherence all use it), with metric names
`probe/<task>_<metric>`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
from scipy.stats import pearsonr
from sklearn.metrics import mean_absolute_error, r2_score, recall_score, roc_auc_score

from braing3n_core.labels import AGE_RANGE_YEARS, DIAGNOSES, MMSE_RANGE, SEXES, Modality, ScanLabels

REGRESSION_METRICS: tuple[str, ...] = ("mae", "r2", "pearson_r")


CLASSIFICATION_METRICS: tuple[str, ...] = ("auroc", "bacc")


def probe_metric_name(task: str, metric: str) -> str:
    """`probe/<task>_<metric>`, e.g. `probe/age_mae`, `probe/ad_vs_cn_auroc`."""
    return f"probe/{task}_{metric}"


_MODALITY_VALUES = frozenset(m.value for m in Modality)


@dataclass(frozen=True)
class ProbeSample:
    """The labels of one scan (one row of `features`); `None` means not recorded."""

    subject: str
    site_id: str
    age: float | None = None
    sex: str | None = None
    diagnosis: str | None = None
    modality: str | None = None  # a `Modality` value, e.g. "T1w"
    field_strength: float | None = None  # tesla
    mmse: float | None = None
    session: str | None = None  # only used in error messages

    def __post_init__(self) -> None:
        where = f"probe sample subject={self.subject!r} session={self.session!r}"
        if not self.subject or not self.site_id:
            raise ValueError(f"{where}: subject and site_id must be non-empty")
        if isinstance(self.modality, Modality):
            object.__setattr__(self, "modality", self.modality.value)
        # numpy scalars (np.str_, np.float32) → plain str/float, so class names and JSON are stable.
        for name in ("subject", "site_id", "sex", "diagnosis", "modality", "session"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, str(getattr(self, name)))
        for name in ("age", "mmse", "field_strength"):
            if getattr(self, name) is not None:
                try:
                    object.__setattr__(self, name, float(getattr(self, name)))
                except (TypeError, ValueError):
                    raise ValueError(f"{where}: {name} {getattr(self, name)!r} is not a number") from None
        if self.sex is not None and self.sex not in SEXES:
            raise ValueError(f"{where}: sex {self.sex!r} is not one of {SEXES}")
        if self.diagnosis is not None and self.diagnosis not in DIAGNOSES:
            raise ValueError(f"{where}: diagnosis {self.diagnosis!r} is not one of {DIAGNOSES}")
        if self.modality is not None and self.modality not in _MODALITY_VALUES:
            raise ValueError(f"{where}: modality {self.modality!r} is not one of {sorted(_MODALITY_VALUES)}")
        for name, bounds in (("age", AGE_RANGE_YEARS), ("mmse", MMSE_RANGE), ("field_strength", (0.0, 20.0))):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and bounds[0] <= value <= bounds[1]):
                raise ValueError(f"{where}: {name} {value!r} is outside {bounds}")

    @classmethod
    def from_scan_labels(
        cls, *, subject: str, site_id: str, modality: Modality | str, labels: ScanLabels, session: str | None = None
    ) -> ProbeSample:
        return cls(
            subject=subject,
            site_id=site_id,
            modality=Modality(modality).value,
            session=session,
            age=labels.age,
            sex=labels.sex,
            diagnosis=labels.diagnosis,
            field_strength=labels.field_strength,
            mmse=labels.mmse,
        )


LABEL_COLUMNS: tuple[str, ...] = ("age", "sex", "diagnosis", "modality", "field_strength", "mmse", "site_id")


@dataclass(frozen=True)
class ProbeTable:
    """One `ProbeSample` per row of the feature matrix, in the same order."""

    samples: tuple[ProbeSample, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples", tuple(self.samples))

    def __len__(self) -> int:
        return len(self.samples)

    def column(self, name: str) -> np.ndarray:
        """Values of one field as an object array [n]; `None` where not recorded."""
        if name not in ProbeSample.__dataclass_fields__:
            raise KeyError(f"unknown probe column {name!r}; columns are {sorted(ProbeSample.__dataclass_fields__)}")
        return np.array([getattr(s, name) for s in self.samples], dtype=object)

    @property
    def subjects(self) -> np.ndarray:
        """Subject keys [n], qualified by site: two hospitals may both have a `sub-001`."""
        return np.array([f"{s.site_id}/{s.subject}" for s in self.samples], dtype=object)

    def subset(self, mask: np.ndarray) -> ProbeTable:
        return ProbeTable(tuple(s for s, keep in zip(self.samples, mask, strict=True) if keep))

    @classmethod
    def for_generated(cls, n: int, **columns: Sequence[Any]) -> ProbeTable:
        """Requested conditions of `n` generated samples; each sample is its own pseudo-subject."""
        unknown = set(columns) - set(LABEL_COLUMNS)
        if unknown:
            raise ValueError(f"unknown condition columns {sorted(unknown)}; use {LABEL_COLUMNS}")
        for name, values in columns.items():
            if len(values) != n:
                raise ValueError(f"condition {name!r} has {len(values)} values for {n} generated samples")
        rows = []
        for i in range(n):
            row: dict[str, Any] = {"subject": f"generated-{i:06d}", "site_id": "generated"}
            row.update({name: values[i] for name, values in columns.items()})
            rows.append(ProbeSample(**row))
        return cls(tuple(rows))


def _class_key(value: Any) -> str:
    """Class name of a label value: strings as is, field strengths (the only numeric class) as `1.5T`/`3T`."""
    return f"{value:g}T" if isinstance(value, float) else str(value)


class TaskKind(str, Enum):
    REGRESSION = "regression"
    CLASSIFICATION = "classification"


@dataclass(frozen=True)
class ProbeTask:
    """One probe: a label column and, for classification, the classes in score-column order.

    Rows whose label is missing, or (classification) not among `classes`, are not part of the task:
    `ad_vs_cn` reads the diagnosis column but keeps only CN (class 0) and AD (class 1) rows.
    """

    name: str
    column: str
    kind: TaskKind
    classes: tuple[str, ...] = ()
    note: str = ""  # e.g. which rare classes were dropped

    def __post_init__(self) -> None:
        if self.kind is TaskKind.CLASSIFICATION and len(self.classes) < 2:
            raise ValueError(f"probe task {self.name!r}: a classification needs ≥ 2 classes, got {self.classes}")
        if self.kind is TaskKind.REGRESSION and self.classes:
            raise ValueError(f"probe task {self.name!r}: a regression has no classes")

    @property
    def metric_names(self) -> tuple[str, ...]:
        metrics = REGRESSION_METRICS if self.kind is TaskKind.REGRESSION else CLASSIFICATION_METRICS
        return tuple(probe_metric_name(self.name, m) for m in metrics)

    def targets(self, table: ProbeTable) -> tuple[np.ndarray, np.ndarray]:
        """(mask [n] bool: rows in the task, y [mask.sum()]: float values or int class indices)."""
        values = table.column(self.column)
        if self.kind is TaskKind.REGRESSION:
            mask = np.array([v is not None for v in values], dtype=bool)
            return mask, values[mask].astype(np.float64)
        index = {c: i for i, c in enumerate(self.classes)}
        keys = [None if v is None else _class_key(v) for v in values]
        mask = np.array([k in index for k in keys], dtype=bool)
        return mask, np.array([index[k] for k in keys if k in index], dtype=np.int64)


@dataclass(frozen=True)
class SkippedTask:
    task: str
    reason: str


@dataclass(frozen=True)
class ProbeRequirements:
    """How much label a task needs to be probed at all (counts over the whole table)."""

    min_samples: int = 20
    min_subjects: int = 8  # regression: distinct subjects with a value
    min_subjects_per_class: int = 4  # ≥ 1 held-out and ≥ 3 train subjects per class at a 20 % split


def candidate_tasks(table: ProbeTable) -> tuple[list[ProbeTask], list[SkippedTask]]:
    """Every task the label vocabulary defines; site and field-strength classes come from the table
    (a table with one site or one field strength cannot define those tasks: they come back skipped)."""
    tasks = [
        ProbeTask("age", "age", TaskKind.REGRESSION),
        ProbeTask("sex", "sex", TaskKind.CLASSIFICATION, SEXES),
        ProbeTask("diagnosis", "diagnosis", TaskKind.CLASSIFICATION, DIAGNOSES),
    ]
    reference = DIAGNOSES[0]  # CN: each disease is probed against cognitively normal controls
    tasks += [
        ProbeTask(f"{d.lower()}_vs_{reference.lower()}", "diagnosis", TaskKind.CLASSIFICATION, (reference, d))
        for d in DIAGNOSES[1:]
    ]
    tasks.append(ProbeTask("modality", "modality", TaskKind.CLASSIFICATION, tuple(m.value for m in Modality)))
    skipped: list[SkippedTask] = []
    for name, column in (("field_strength", "field_strength"), ("site", "site_id")):
        present = tuple(sorted({_class_key(v) for v in table.column(column) if v is not None}))
        if len(present) >= 2:
            tasks.append(ProbeTask(name, column, TaskKind.CLASSIFICATION, present))
        else:
            skipped.append(SkippedTask(name, f"needs ≥ 2 classes, the table has {list(present) or 'none'}"))
    tasks.append(ProbeTask("mmse", "mmse", TaskKind.REGRESSION))
    return tasks, skipped


def select_tasks(
    table: ProbeTable, requirements: ProbeRequirements = ProbeRequirements()
) -> tuple[list[ProbeTask], list[SkippedTask]]:
    """Tasks with enough labels; classes with too few subjects are dropped (and named in `note`)."""
    candidates, skipped = candidate_tasks(table)
    tasks: list[ProbeTask] = []
    subjects = table.subjects
    for task in candidates:
        mask, y = task.targets(table)
        if task.kind is TaskKind.REGRESSION:
            n_subjects = len(set(subjects[mask]))
            if mask.sum() < requirements.min_samples or n_subjects < requirements.min_subjects:
                skipped.append(
                    SkippedTask(
                        task.name,
                        f"{int(mask.sum())} labelled scans of {n_subjects} subjects; needs ≥ "
                        f"{requirements.min_samples} scans and ≥ {requirements.min_subjects} subjects",
                    )
                )
            elif np.ptp(y) == 0:
                skipped.append(SkippedTask(task.name, f"every labelled scan has the same value {y[0]:g}"))
            else:
                tasks.append(task)
            continue
        per_class = {c: len(set(subjects[mask][y == i])) for i, c in enumerate(task.classes)}
        kept = tuple(c for c in task.classes if per_class[c] >= requirements.min_subjects_per_class)
        counts = ", ".join(f"{c}: {k}" for c, k in per_class.items())
        if len(kept) < 2:
            skipped.append(
                SkippedTask(
                    task.name,
                    f"needs ≥ 2 classes with ≥ {requirements.min_subjects_per_class} subjects each; "
                    f"subjects per class: {counts}",
                )
            )
            continue
        dropped = [c for c in task.classes if c not in kept and per_class[c] > 0]
        # A binary task (sex, ad_vs_cn) that loses a class is skipped above; only multi-class tasks shrink.
        note = f"dropped rare classes ({counts})" if dropped else ""
        narrowed = ProbeTask(task.name, task.column, task.kind, kept, note)
        n_rows = int(narrowed.targets(table)[0].sum())
        if n_rows < requirements.min_samples:
            skipped.append(SkippedTask(task.name, f"{n_rows} labelled scans; needs ≥ {requirements.min_samples}"))
            continue
        tasks.append(narrowed)
    return tasks, skipped


def evaluate_predictions(task: ProbeTask, y_true: np.ndarray, y_pred_or_scores: np.ndarray) -> dict[str, float]:
    """Probe metrics from predictions, for the sklearn probes, `LinearHead` and condition adherence alike.

    Regression: `y_true` [n] floats, predictions [n] in the same units → MAE, R², Pearson r.
    Classification: `y_true` [n] class indices into `task.classes`, scores [n, K] class probabilities
    (rows sum to 1) → AUROC (binary; macro one-vs-rest over the classes present for K > 2) and balanced
    accuracy over the classes present in `y_true`. Undefined values (one class only, constant
    predictions) are NaN.
    """
    y_true = np.asarray(y_true)
    scores = np.asarray(y_pred_or_scores, dtype=np.float64)
    n = len(y_true)
    if n == 0:
        raise ValueError(f"probe {task.name!r}: no samples to evaluate")
    if task.kind is TaskKind.REGRESSION:
        if scores.shape != (n,):
            raise ValueError(f"probe {task.name!r}: predictions of shape {scores.shape}, expected ({n},)")
        y = y_true.astype(np.float64)
        constant = np.ptp(y) == 0 or np.ptp(scores) == 0
        values = {
            "mae": float(mean_absolute_error(y, scores)),
            "r2": float(r2_score(y, scores)) if n >= 2 and np.ptp(y) > 0 else math.nan,
            "pearson_r": math.nan if n < 2 or constant else float(pearsonr(y, scores).statistic),
        }
    else:
        k = len(task.classes)
        if scores.shape != (n, k):
            raise ValueError(f"probe {task.name!r}: scores of shape {scores.shape}, expected ({n}, {k})")
        if np.any(scores < -1e-6) or not np.allclose(scores.sum(axis=1), 1.0, atol=1e-4):
            raise ValueError(f"probe {task.name!r}: scores must be class probabilities (apply softmax to logits)")
        y = y_true.astype(np.int64)
        if y.min() < 0 or y.max() >= k:
            raise ValueError(f"probe {task.name!r}: class indices must lie in [0, {k}), got {y.min()}..{y.max()}")
        present = np.unique(y)
        bacc = recall_score(y, scores.argmax(axis=1), labels=present, average="macro", zero_division=0.0)
        if len(present) < 2:
            auroc = math.nan
        elif k == 2:
            auroc = roc_auc_score(y, scores[:, 1])
        else:
            auroc = float(np.mean([roc_auc_score(y == c, scores[:, c]) for c in present]))
        values = {"auroc": float(auroc), "bacc": float(bacc)}
    return {probe_metric_name(task.name, m): v for m, v in values.items()}


def prior_predictions(task: ProbeTask, y_train: np.ndarray, n: int) -> np.ndarray:
    """What a probe that ignores the features predicts: the train mean, or the train class frequencies.
    Scored by `evaluate_predictions` this is the chance level of a task (AUROC 0.5, bacc 1/K)."""
    if task.kind is TaskKind.REGRESSION:
        return np.full(n, float(np.mean(y_train)))
    prior = np.bincount(np.asarray(y_train, dtype=np.int64), minlength=len(task.classes)) / len(y_train)
    return np.tile(prior, (n, 1))
