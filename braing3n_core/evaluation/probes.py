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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import log_loss
from sklearn.model_selection import GridSearchCV, GroupKFold, StratifiedGroupKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from braing3n_core.evaluation.probe_splits import SubjectSplit, outer_folds, task_split
from braing3n_core.evaluation.probe_tasks import (
    ProbeRequirements,
    ProbeTable,
    ProbeTask,
    SkippedTask,
    TaskKind,
    evaluate_predictions,
    prior_predictions,
    select_tasks,
)
from braing3n_core.fileio import atomic_write_json, json_safe

LOGISTIC_C_GRID: tuple[float, ...] = tuple(np.logspace(-4, 2, 7).tolist())


RIDGE_ALPHA_GRID: tuple[float, ...] = tuple(np.logspace(-2, 5, 8).tolist())


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
        return json_safe(asdict(self))


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



def write_report_json(report: ProbeReport, path: Path) -> None:
    atomic_write_json(Path(path), report.to_dict())
