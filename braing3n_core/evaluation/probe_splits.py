"""Subject-level splits for probes: one train/test split, or outer folds grouped by subject.

Every session and modality of a subject lands on one side; folds are stratified by class, or by value
quantile for regressions, so small cohorts still give every fold both sides of a task.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

from braing3n_core.evaluation.probe_tasks import ProbeTable, ProbeTask, TaskKind


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
