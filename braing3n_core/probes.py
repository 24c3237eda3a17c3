"""Linear probes on frozen pooled embeddings: the clinical-task evaluation of any encoder.

A probe is a standardiser plus one linear layer (logistic regression for labels, ridge for numbers),
fitted on a train split of subjects and scored on held-out subjects. Inputs are plain arrays
(`features [n, F]`, one row per scan) and a `ProbeTable` of labels, so features from any encoder
(our MAE, MONAI's AutoencoderKL, BrainIAC, …) go through the same code.

Protocol (spec §9, the author's earlier probes, made leakage-free and less noisy):
- subject-level splits: every session and modality of a subject lands on one side;
- without a given split, outer k-fold cross-validation grouped by subject (stratified by class, or by
  value quantile for regressions); the out-of-fold predictions of all folds are pooled and scored once
  over every row. A single seeded 80/20 split is too noisy on small cohorts: measured on 3 sites × 24
  subjects, one split gave age R² −0.16 / 0.20 for two encoders where 5-fold CV on the same features gave
  0.29 / 0.67, because with ~10 held-out subjects the test set's own variance decides R². The spread of
  each metric over the folds is reported beside it. A given split (a site's own, the federated
  benchmark's) is still honoured as one train/test split;
- features standardised with train statistics only (the scaler lives inside the sklearn pipeline, so
  the inner cross-validation also standardises on its own inner-train folds);
- the regularisation strength (logistic `C`, ridge `alpha`) is chosen on a small log grid by inner
  cross-validation on the train split, grouped by subject. A grid search over a pipeline is used rather
  than `LogisticRegressionCV`/`RidgeCV` because those standardise outside the folds (or not at all) and
  `RidgeCV`'s fast leave-one-out path cannot group by subject;
- logistic regression uses balanced class weights, since it is scored by balanced accuracy.

Federated use: sites never pool features. `FeatureStats` (n, Σx, Σx²) add up across sites into the
exact centralised mean/std, and `LinearHead` is the same linear model in torch, trained by SGD steps
on each site. Both paths score with the one function `evaluate_predictions`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from rich.table import Table
from scipy.stats import pearsonr
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import log_loss, mean_absolute_error, r2_score, recall_score, roc_auc_score
from sklearn.model_selection import GridSearchCV, GroupKFold, GroupShuffleSplit, StratifiedGroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import nn

from braing3n_core.fileio import atomic_write_json
from braing3n_core.labels import AGE_RANGE_YEARS, DIAGNOSES, MMSE_RANGE, SEXES, Modality, ScanLabels

LOGISTIC_C_GRID: tuple[float, ...] = tuple(np.logspace(-4, 2, 7).tolist())
RIDGE_ALPHA_GRID: tuple[float, ...] = tuple(np.logspace(-2, 5, 8).tolist())
REGRESSION_METRICS: tuple[str, ...] = ("mae", "r2", "pearson_r")
CLASSIFICATION_METRICS: tuple[str, ...] = ("auroc", "bacc")


def probe_metric_name(task: str, metric: str) -> str:
    """`probe/<task>_<metric>`, e.g. `probe/age_mae`, `probe/ad_vs_cn_auroc`."""
    return f"probe/{task}_{metric}"


# ---------------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------
# Subject-level splits
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubjectSplit:
    """Boolean train/test masks [n] over the rows of one table; no subject on both sides."""

    train: np.ndarray
    test: np.ndarray

    @classmethod
    def from_masks(cls, train: np.ndarray, test: np.ndarray, subjects: np.ndarray) -> SubjectSplit:
        """A given split (e.g. each site's own); refused if a subject straddles it."""
        train, test = np.asarray(train, dtype=bool), np.asarray(test, dtype=bool)
        if not (len(train) == len(test) == len(subjects)):
            raise ValueError(f"split masks of {len(train)}/{len(test)} rows for a table of {len(subjects)} rows")
        if np.any(train & test):
            raise ValueError(f"split: {int(np.sum(train & test))} rows are in both train and test")
        leaked = sorted(set(subjects[train]) & set(subjects[test]))
        if leaked:
            raise ValueError(f"split: subjects in both train and test: {leaked[:10]}{' …' if len(leaked) > 10 else ''}")
        return cls(train, test)


def subject_split(
    subjects: np.ndarray, *, test_fraction: float = 0.2, seed: int = 0, stratify: np.ndarray | None = None
) -> SubjectSplit:
    """Seeded subject-level split. With `stratify` (class per row), class proportions are kept per side
    as far as whole subjects allow (StratifiedGroupKFold, first fold as test)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    subjects = np.asarray(subjects, dtype=object)
    n = len(subjects)
    if len(set(subjects)) < 2:
        raise ValueError(f"a subject-level split needs ≥ 2 subjects, got {len(set(subjects))}")
    rows = np.arange(n)
    if stratify is not None:
        n_folds = min(max(2, round(1.0 / test_fraction)), len(set(subjects)))
        folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        with warnings.catch_warnings():
            # Rare classes with fewer subjects than folds are legal here; sklearn warns about them.
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            _, test_rows = next(folds.split(rows, np.asarray(stratify), groups=subjects))
    else:
        splitter = GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
        _, test_rows = next(splitter.split(rows, groups=subjects))
    test = np.zeros(n, dtype=bool)
    test[test_rows] = True
    return SubjectSplit(~test, test)


def task_split(
    task: ProbeTask,
    table: ProbeTable,
    *,
    split: SubjectSplit | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> SubjectSplit:
    """The split a task is probed on, as masks over the whole table (rows outside the task are in neither)."""
    mask, y = task.targets(table)
    subjects = table.subjects
    if split is not None:
        split = SubjectSplit.from_masks(split.train, split.test, subjects)
        return SubjectSplit(split.train & mask, split.test & mask)
    stratify = y if task.kind is TaskKind.CLASSIFICATION else None
    inner = subject_split(subjects[mask], test_fraction=test_fraction, seed=seed, stratify=stratify)
    train, test = np.zeros(len(table), dtype=bool), np.zeros(len(table), dtype=bool)
    train[mask], test[mask] = inner.train, inner.test
    return SubjectSplit(train, test)


def outer_folds(task: ProbeTask, table: ProbeTable, *, folds: int = 5, seed: int = 0) -> list[SubjectSplit]:
    """Subject-grouped outer cross-validation folds of one task, as masks over the whole table.

    Every row of the task is in exactly one test fold, and no subject is on both sides of any fold.
    Classification folds are stratified by class (at most as many folds as the rarest class has
    subjects, so every class has a subject in every test fold); regression folds are stratified by
    value quintile, so each fold spans the whole age (MMSE) range instead of, by chance, only part of it.
    """
    if folds < 2:
        raise ValueError(f"outer cross-validation needs ≥ 2 folds, got {folds}")
    mask, y = task.targets(table)
    subjects = table.subjects[mask]
    if task.kind is TaskKind.CLASSIFICATION:
        strata = y
        per_class = [len(set(subjects[y == c])) for c in np.unique(y)]
        n_folds = min(folds, min(per_class)) if len(per_class) >= 2 else 0
    else:
        edges = np.quantile(y, np.linspace(0.0, 1.0, 6)[1:-1])
        strata = np.searchsorted(edges, y, side="right")  # quintile index 0..4
        n_folds = min(folds, len(set(subjects)))
    if n_folds < 2:
        raise ValueError(f"probe {task.name!r}: too few subjects per class for {folds}-fold cross-validation")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    rows = np.flatnonzero(mask)
    result = []
    with warnings.catch_warnings():
        # Strata with fewer subjects than folds are legal (they just cannot be in every fold).
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for train_rows, test_rows in splitter.split(rows, strata, groups=subjects):
            train, test = np.zeros(len(table), dtype=bool), np.zeros(len(table), dtype=bool)
            train[rows[train_rows]], test[rows[test_rows]] = True, True
            result.append(SubjectSplit(train, test))
    return result


# ---------------------------------------------------------------------------------------------------
# Metrics from predictions: the one place probe scores are computed
# ---------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------
# Fitting (scikit-learn)
# ---------------------------------------------------------------------------------------------------


class Probe(Protocol):
    """Anything that maps features [n, F] to task predictions/probabilities (sklearn or torch)."""

    task: ProbeTask

    def predict_scores(self, features: np.ndarray) -> np.ndarray: ...


@dataclass
class FittedProbe:
    task: ProbeTask
    pipeline: Pipeline  # "scale": StandardScaler fitted on train only → "model": LogisticRegression | Ridge
    regularisation: float  # chosen logistic C or ridge alpha
    n_train: int

    def predict_scores(self, features: np.ndarray) -> np.ndarray:
        """Regression: predictions [n]; classification: probabilities [n, K] in `task.classes` order."""
        features = _check_features(features)
        if self.task.kind is TaskKind.REGRESSION:
            return self.pipeline.predict(features)
        proba = self.pipeline.predict_proba(features)
        # The model only knows the classes it saw in training; put its columns where the task expects them.
        full = np.zeros((len(features), len(self.task.classes)))
        full[:, self.pipeline.classes_] = proba
        return full


def _check_features(features: np.ndarray, n_rows: int | None = None) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be [n, F], got shape {features.shape}")
    if n_rows is not None and len(features) != n_rows:
        raise ValueError(f"features have {len(features)} rows but the label table has {n_rows}")
    if not np.all(np.isfinite(features)):
        raise ValueError(f"features contain {int(np.sum(~np.isfinite(features)))} non-finite values")
    return features


def _neg_log_loss(estimator: Pipeline, x: np.ndarray, y: np.ndarray) -> float:
    """`neg_log_loss` over the classes of the fold's model and of `y`. sklearn's own scorer raises when a
    validation fold lacks a class the model knows, which grouped folds allow: with one subject holding
    several modalities, a fold of site-a subjects has no T1c scan at all. A class the model never saw gets
    probability 0 (clipped by `log_loss`), the penalty it deserves."""
    classes = np.union1d(estimator.classes_, y)
    proba = np.zeros((len(x), len(classes)))
    proba[:, np.searchsorted(classes, estimator.classes_)] = estimator.predict_proba(x)
    return -float(log_loss(y, proba, labels=classes))


def fit_probe(
    task: ProbeTask,
    features: np.ndarray,
    table: ProbeTable,
    *,
    train_mask: np.ndarray | None = None,
    inner_folds: int = 5,
    seed: int = 0,
    n_jobs: int | None = None,
) -> FittedProbe:
    """Fit one probe on the task's rows within `train_mask` (all rows when None)."""
    features = _check_features(features, len(table))
    mask, _ = task.targets(table)
    rows = mask if train_mask is None else mask & np.asarray(train_mask, dtype=bool)
    _, y = task.targets(table.subset(rows))
    x, groups = features[rows], table.subjects[rows]
    if task.kind is TaskKind.REGRESSION:
        n_folds = min(inner_folds, len(set(groups)))
        if n_folds < 2:
            raise ValueError(f"probe {task.name!r}: needs ≥ 2 train subjects for inner cross-validation")
        model, grid_key, grid = Ridge(), "model__alpha", RIDGE_ALPHA_GRID
        folds: Any = GroupKFold(n_splits=n_folds)  # deterministic: balances scans per fold
        scoring = "neg_mean_squared_error"
    else:
        per_class = [len(set(groups[y == c])) for c in np.unique(y)]
        n_folds = min(inner_folds, min(per_class))
        if len(per_class) < 2 or n_folds < 2:
            raise ValueError(f"probe {task.name!r}: needs ≥ 2 classes with ≥ 2 train subjects each")
        model = LogisticRegression(max_iter=2000, class_weight="balanced")
        grid_key, grid = "model__C", LOGISTIC_C_GRID
        folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        scoring = _neg_log_loss  # a proper score: smooth in C, unlike accuracy on small folds
    search = GridSearchCV(
        Pipeline([("scale", StandardScaler()), ("model", model)]),
        {grid_key: list(grid)},
        cv=folds,
        scoring=scoring,
        error_score="raise",
        n_jobs=n_jobs,
    )
    # One BLAS thread: probe fits are small matrices (hundreds of rows × ≤ a few hundred features), where
    # BLAS worker threads cost more than they save. Measured on the 2-core sandbox under load: 0.55 CPU-s
    # per grid search with OpenBLAS's default 2 threads, 0.19 with 1.
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        search.fit(x, y, groups=groups)
    return FittedProbe(task, search.best_estimator_, float(search.best_params_[grid_key]), int(rows.sum()))


def fit_probes(
    features: np.ndarray,
    table: ProbeTable,
    *,
    tasks: Sequence[ProbeTask] | None = None,
    requirements: ProbeRequirements = ProbeRequirements(),
    inner_folds: int = 5,
    seed: int = 0,
) -> dict[str, FittedProbe]:
    """Probes fitted on every row (no held-out split), e.g. on real scans to judge generated ones."""
    tasks = select_tasks(table, requirements)[0] if tasks is None else list(tasks)
    return {t.name: fit_probe(t, features, table, inner_folds=inner_folds, seed=seed) for t in tasks}


# ---------------------------------------------------------------------------------------------------
# Evaluation and reporting
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeResult:
    task: str
    kind: str
    classes: tuple[str, ...]
    metrics: dict[str, float]  # probe/<task>_<metric>, over every scored row (out-of-fold rows pooled)
    chance: dict[str, float]  # the same metrics for a features-blind probe (train mean / class prior)
    n_train: int  # rows fitted on (cross-validation: mean over folds)
    n_test: int  # rows scored (cross-validation: every row of the task, each once, out of fold)
    n_train_subjects: int
    n_test_subjects: int
    regularisation: float  # chosen C / alpha (cross-validation: median over folds)
    note: str = ""
    folds: int = 0  # outer cross-validation folds; 0 = one train/test split
    fold_std: dict[str, float] = field(default_factory=dict)  # spread of each metric over the folds


@dataclass(frozen=True)
class ProbeReport:
    results: tuple[ProbeResult, ...]
    skipped: tuple[SkippedTask, ...]
    encoder: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        return {k: v for r in self.results for k, v in r.metrics.items()}

    def result(self, task: str) -> ProbeResult:
        for r in self.results:
            if r.task == task:
                return r
        raise KeyError(f"no probe result for task {task!r}; probed: {[r.task for r in self.results]}")

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self))


@dataclass(frozen=True)
class OutOfFoldPredictions:
    """Each row of a task predicted once, by the probe of the fold that held it out."""

    task: ProbeTask
    rows: np.ndarray  # [m] indices into the table, the task's rows
    y: np.ndarray  # [m] targets (values or class indices)
    predictions: np.ndarray  # [m] values or [m, K] class probabilities
    chance: np.ndarray  # same shape: each fold's train mean / class prior
    fold: np.ndarray  # [m] which outer fold held the row out
    regularisation: tuple[float, ...]  # chosen C / alpha per fold
    n_train: tuple[int, ...]  # rows fitted per fold
    n_train_subjects: tuple[int, ...]


def cross_validated_predictions(
    task: ProbeTask,
    features: np.ndarray,
    table: ProbeTable,
    *,
    folds: int = 5,
    seed: int = 0,
    inner_folds: int = 5,
    n_jobs: int | None = None,
) -> OutOfFoldPredictions:
    """Outer subject-grouped cross-validation (`outer_folds`); each fold's probe chooses its own
    regularisation by inner cross-validation on its train rows only. Raises ValueError (with the reason)
    when a fold's train side cannot be probed."""
    features = _check_features(features, len(table))
    mask, y_all = task.targets(table)
    rows = np.flatnonzero(mask)
    position = np.full(len(table), -1)
    position[rows] = np.arange(len(rows))
    subjects = table.subjects
    k = len(task.classes)
    predictions = np.zeros(len(rows)) if task.kind is TaskKind.REGRESSION else np.zeros((len(rows), k))
    chance = np.zeros_like(predictions)
    fold_of = np.full(len(rows), -1)
    regularisation, n_train, n_train_subjects = [], [], []
    for index, sides in enumerate(outer_folds(task, table, folds=folds, seed=seed)):
        y_train, y_test = y_all[position[sides.train]], y_all[position[sides.test]]
        reason = _unprobeable(task, y_train, y_test, subjects[sides.train], need_both_classes_in_test=False)
        if reason:
            raise ValueError(f"probe {task.name!r}, outer fold {index + 1}: {reason}")
        probe = fit_probe(task, features, table, train_mask=sides.train, inner_folds=inner_folds, seed=seed,
                          n_jobs=n_jobs)
        test = position[sides.test]
        predictions[test] = probe.predict_scores(features[sides.test])
        chance[test] = prior_predictions(task, y_train, len(test))
        fold_of[test] = index
        regularisation.append(probe.regularisation)
        n_train.append(int(sides.train.sum()))
        n_train_subjects.append(len(set(subjects[sides.train])))
    return OutOfFoldPredictions(task, rows, y_all, predictions, chance, fold_of, tuple(regularisation),
                                tuple(n_train), tuple(n_train_subjects))


def _fold_std(oof: OutOfFoldPredictions) -> dict[str, float]:
    """Standard deviation over folds of each metric computed on that fold's held-out rows alone."""
    per_fold: dict[str, list[float]] = {}
    for index in np.unique(oof.fold):
        held_out = oof.fold == index
        for name, value in evaluate_predictions(oof.task, oof.y[held_out], oof.predictions[held_out]).items():
            per_fold.setdefault(name, []).append(value)
    out = {}
    for name, values in per_fold.items():
        finite = np.array([v for v in values if math.isfinite(v)])
        out[name] = float(finite.std(ddof=1)) if len(finite) >= 2 else math.nan
    return out


def run_probes(
    features: np.ndarray,
    table: ProbeTable,
    *,
    split: SubjectSplit | None = None,
    tasks: Sequence[ProbeTask] | None = None,
    requirements: ProbeRequirements = ProbeRequirements(),
    folds: int = 5,
    seed: int = 0,
    inner_folds: int = 5,
    n_jobs: int | None = None,
    encoder: str = "",
) -> ProbeReport:
    """Probe every task the labels support; a task that cannot be probed is skipped with its reason.

    Without `split`: `folds`-fold subject-grouped outer cross-validation per task, out-of-fold
    predictions pooled and scored once (`cross_validated_predictions`). With `split` (e.g. the
    federated benchmark's, or a site's own): fit on its train rows, score its test rows.
    """
    features = _check_features(features, len(table))
    if tasks is None:
        tasks, skipped = select_tasks(table, requirements)
    else:
        tasks, skipped = list(tasks), []
    subjects = table.subjects
    results: list[ProbeResult] = []
    for task in tasks:
        if split is None:
            try:
                oof = cross_validated_predictions(task, features, table, folds=folds, seed=seed,
                                                  inner_folds=inner_folds, n_jobs=n_jobs)
            except ValueError as error:
                skipped.append(SkippedTask(task.name, str(error).removeprefix(f"probe {task.name!r}").lstrip(",: ")))
                continue
            results.append(
                ProbeResult(
                    task=task.name,
                    kind=task.kind.value,
                    classes=task.classes,
                    metrics=evaluate_predictions(task, oof.y, oof.predictions),
                    chance=evaluate_predictions(task, oof.y, oof.chance),
                    n_train=round(float(np.mean(oof.n_train))),
                    n_test=len(oof.rows),
                    n_train_subjects=round(float(np.mean(oof.n_train_subjects))),
                    n_test_subjects=len(set(subjects[oof.rows])),
                    regularisation=float(np.median(oof.regularisation)),
                    note=task.note,
                    folds=len(oof.regularisation),
                    fold_std=_fold_std(oof),
                )
            )
            continue
        sides = task_split(task, table, split=split)
        _, y_train = task.targets(table.subset(sides.train))
        _, y_test = task.targets(table.subset(sides.test))
        reason = _unprobeable(task, y_train, y_test, subjects[sides.train])
        if reason:
            skipped.append(SkippedTask(task.name, reason))
            continue
        probe = fit_probe(
            task, features, table, train_mask=sides.train, inner_folds=inner_folds, seed=seed, n_jobs=n_jobs
        )
        scores = probe.predict_scores(features[sides.test])
        results.append(
            ProbeResult(
                task=task.name,
                kind=task.kind.value,
                classes=task.classes,
                metrics=evaluate_predictions(task, y_test, scores),
                chance=evaluate_predictions(task, y_test, prior_predictions(task, y_train, len(y_test))),
                n_train=int(sides.train.sum()),
                n_test=int(sides.test.sum()),
                n_train_subjects=len(set(subjects[sides.train])),
                n_test_subjects=len(set(subjects[sides.test])),
                regularisation=probe.regularisation,
                note=task.note,
            )
        )
    settings = {
        "protocol": "given split" if split is not None else f"{folds}-fold subject-grouped cross-validation",
        "folds": 0 if split is not None else folds,
        "seed": seed,
        "inner_folds": inner_folds,
        "given_split": split is not None,
        **asdict(requirements),
    }
    return ProbeReport(tuple(results), tuple(skipped), encoder, settings)


def _unprobeable(
    task: ProbeTask, y_train: np.ndarray, y_test: np.ndarray, train_subjects: np.ndarray,
    need_both_classes_in_test: bool = True,
) -> str:
    if len(y_test) < 2 or len(y_train) < 2:
        return f"split leaves {len(y_train)} train and {len(y_test)} test scans"
    if task.kind is TaskKind.REGRESSION:
        return "" if len(set(train_subjects)) >= 2 else "fewer than 2 train subjects"
    train_classes = {int(c): len(set(train_subjects[y_train == c])) for c in np.unique(y_train)}
    if len(train_classes) < 2 or min(train_classes.values()) < 2:
        named = {task.classes[c]: k for c, k in train_classes.items()}
        return f"train split needs ≥ 2 classes with ≥ 2 subjects each; has {named}"
    if need_both_classes_in_test and len(np.unique(y_test)) < 2:
        return f"test split holds one class only ({task.classes[int(y_test[0])]})"
    return ""


def _json_safe(value: Any) -> Any:
    """NaN/inf → None (JSON has neither), tuples → lists, numpy scalars → Python."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report_json(report: ProbeReport, path: Path) -> None:
    atomic_write_json(Path(path), report.to_dict())


def render_report(report: ProbeReport) -> Table:
    """A rich table: one row per task metric with its score, its spread over folds and the chance level."""
    protocol = report.settings.get("protocol", "")
    title = "Linear probes" + (f" — {report.encoder}" if report.encoder else "") + (f" ({protocol})" if protocol else "")
    table = Table(title=title)
    for header in ("task", "metric", "value", "± folds", "chance", "train (subj.)", "scored (subj.)", "reg."):
        table.add_column(header, justify="left" if header in ("task", "metric") else "right")
    for r in report.results:
        for i, (name, value) in enumerate(r.metrics.items()):
            first = i == 0
            spread = r.fold_std.get(name, math.nan)
            table.add_row(
                r.task if first else "",
                name.split("/", 1)[1].removeprefix(f"{r.task}_"),
                f"{value:.3f}",
                f"{spread:.3f}" if math.isfinite(spread) else "",
                f"{r.chance[name]:.3f}",
                f"{r.n_train} ({r.n_train_subjects})" if first else "",
                f"{r.n_test} ({r.n_test_subjects})" if first else "",
                f"{r.regularisation:.3g}" if first else "",
            )
    for s in report.skipped:
        table.add_row(s.task, f"skipped: {s.reason}", "", "", "", "", "", "", style="dim")
    return table


# ---------------------------------------------------------------------------------------------------
# Federated building blocks: additive standardisation statistics and a torch linear head
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureStats:
    """Sufficient statistics (n, Σx, Σx²) per feature, in float64.

    Sums add across sites (also under secure aggregation), and the combined mean/std equal the
    centralised ones exactly, up to rounding; std is the population std, as `StandardScaler` uses.
    """

    count: int
    total: np.ndarray  # [F]
    total_sq: np.ndarray  # [F]

    @classmethod
    def from_features(cls, features: np.ndarray) -> FeatureStats:
        x = np.asarray(features, dtype=np.float64)
        x = x[:, None] if x.ndim == 1 else x
        if x.ndim != 2 or not np.all(np.isfinite(x)):
            raise ValueError(f"feature statistics need finite features [n, F], got shape {x.shape}")
        return cls(len(x), x.sum(axis=0), np.square(x).sum(axis=0))

    def __add__(self, other: FeatureStats) -> FeatureStats:
        if self.total.shape != other.total.shape:
            raise ValueError(f"cannot combine feature statistics of shapes {self.total.shape} and {other.total.shape}")
        return FeatureStats(self.count + other.count, self.total + other.total, self.total_sq + other.total_sq)

    @classmethod
    def combine(cls, parts: Iterable[FeatureStats]) -> FeatureStats:
        parts = list(parts)
        if not parts:
            raise ValueError("no feature statistics to combine")
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return out

    @property
    def mean(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("feature statistics of zero samples have no mean")
        return self.total / self.count

    @property
    def scale(self) -> np.ndarray:
        """Population std; constant features get 1 (as in StandardScaler) instead of dividing by 0."""
        var = np.maximum(self.total_sq / self.count - np.square(self.mean), 0.0)
        std = np.sqrt(var)
        return np.where(std < 1e-12 * np.maximum(1.0, np.abs(self.mean)), 1.0, std)

    def standardize(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, dtype=np.float64) - self.mean) / self.scale

    def to_arrays(self) -> dict[str, np.ndarray]:
        """For transport (e.g. as Flower `ArrayRecord` entries)."""
        return {"count": np.array([self.count], dtype=np.float64), "total": self.total, "total_sq": self.total_sq}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> FeatureStats:
        return cls(int(np.asarray(arrays["count"]).item()), np.asarray(arrays["total"]), np.asarray(arrays["total_sq"]))


class LinearHead(nn.Module):
    """The probe as a torch module, trained by SGD steps on a site's own features (federated probes).

    forward: features [B, F] (raw) → standardised with the (federated) `FeatureStats` buffers →
    logits [B, K] (classification) or a standardised prediction [B] (regression).
    """

    def __init__(
        self,
        task: ProbeTask,
        feature_stats: FeatureStats,
        *,
        target_stats: FeatureStats | None = None,
        class_counts: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.task = task
        num_features = feature_stats.total.shape[0]
        regression = task.kind is TaskKind.REGRESSION
        if regression and target_stats is None:
            raise ValueError(f"probe {task.name!r}: a regression head needs target_stats (n, Σy, Σy²)")
        self.linear = nn.Linear(num_features, 1 if regression else len(task.classes))
        nn.init.zeros_(self.linear.weight)  # start at the prior: every site starts from the same point
        nn.init.zeros_(self.linear.bias)
        self.register_buffer("feature_mean", torch.as_tensor(feature_stats.mean, dtype=torch.float32))
        self.register_buffer("feature_scale", torch.as_tensor(feature_stats.scale, dtype=torch.float32))
        target = target_stats if target_stats is not None else FeatureStats(1, np.zeros(1), np.ones(1))
        self.register_buffer("target_mean", torch.as_tensor(target.mean, dtype=torch.float32))
        self.register_buffer("target_scale", torch.as_tensor(target.scale, dtype=torch.float32))
        # Balanced class weights (n / (K n_c)) as in the sklearn probe; counts are summable across sites.
        weights = torch.ones(len(task.classes)) if not regression else torch.ones(1)
        if class_counts is not None and not regression:
            counts = torch.as_tensor(np.asarray(class_counts, dtype=np.float64), dtype=torch.float32)
            weights = torch.where(counts > 0, counts.sum() / (len(counts) * counts.clamp(min=1)), torch.zeros(1))
        self.register_buffer("class_weights", weights)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = (features - self.feature_mean) / self.feature_scale  # [B, F]
        out = self.linear(x)  # [B, K] or [B, 1]
        return out.squeeze(-1) if self.task.kind is TaskKind.REGRESSION else out

    def loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        out = self(features)
        if self.task.kind is TaskKind.REGRESSION:
            return nn.functional.mse_loss(out, (targets.float() - self.target_mean) / self.target_scale)
        return nn.functional.cross_entropy(out, targets.long(), weight=self.class_weights)

    def fit_steps(
        self,
        features: np.ndarray,
        targets: np.ndarray,
        *,
        steps: int,
        lr: float = 0.1,
        batch_size: int = 64,
        weight_decay: float = 1e-4,
        seed: int = 0,
    ) -> list[float]:
        """`steps` SGD steps on mini-batches drawn with replacement; returns the loss per step.

        A fresh optimiser per call, as in a federated round: no optimiser state crosses rounds.
        Weight decay is the L2 penalty that `C`/`alpha` set in the sklearn probe.
        """
        x = torch.as_tensor(_check_features(features), dtype=torch.float32)
        y = torch.as_tensor(np.asarray(targets))
        if len(y) != len(x) or len(x) == 0:
            raise ValueError(f"probe {self.task.name!r}: {len(x)} feature rows for {len(y)} targets")
        optimiser = torch.optim.SGD(self.linear.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
        generator = torch.Generator().manual_seed(seed)
        losses = []
        self.train()
        for _ in range(steps):
            batch = torch.randint(len(x), (min(batch_size, len(x)),), generator=generator)
            loss = self.loss(x[batch], y[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        return losses

    @torch.no_grad()
    def predict_scores(self, features: np.ndarray) -> np.ndarray:
        """Same contract as `FittedProbe.predict_scores`: values in label units, or probabilities [n, K]."""
        self.eval()
        out = self(torch.as_tensor(_check_features(features), dtype=torch.float32))
        if self.task.kind is TaskKind.REGRESSION:
            return (out * self.target_scale + self.target_mean).double().numpy()
        return torch.softmax(out.double(), dim=-1).numpy()
