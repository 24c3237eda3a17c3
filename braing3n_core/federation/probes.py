"""Framework-free pieces of federated training, shared by the site client and the server.

Flower only moves named numpy arrays and small config/metric mappings between processes; everything
that decides what a site computes, what a reply must look like and how probe heads are combined lives
here, on plain numpy arrays and torch modules, so it is unit-testable without a Flower process:

- `RoundParams`: what one train message asks of a site (stage, round, steps, lr, FedProx μ…);
- `train_site_round` / `evaluate_site`: one site's share of a stage round, through the very
  `stages.train_steps` / `stages.evaluate` the centralized trainer runs;
- `check_reply_arrays`: the server's checks on a reply (keys, shapes, dtypes, finiteness, update norm);
- the federated linear-probe protocol: per-site pooled features and a label *census* (counts and sums
  only), task selection from the summed census, closed-form ridge heads for regression tasks from summed
  second moments (`ridge_census`), SGD + FedAvg for classification heads, held-out scoring.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from braing3n_core.data.bids import ScanRecord
from braing3n_core.evaluation.heads import FeatureStats, LinearHead, RidgeFit, RidgeMoments, fit_ridge
from braing3n_core.evaluation.probe_tasks import (
    ProbeRequirements,
    ProbeSample,
    ProbeTable,
    ProbeTask,
    SkippedTask,
    TaskKind,
    _class_key,
    candidate_tasks,
    evaluate_predictions,
    probe_metric_name,
)
from braing3n_core.evaluation.probes import RIDGE_ALPHA_GRID
from braing3n_core.federation.arrays import Arrays, load_arrays, module_arrays
from braing3n_core.runtime import round_seed
from braing3n_core.training.examples import SiteInputs

CATEGORICAL_COLUMNS: tuple[str, ...] = ("sex", "diagnosis", "modality", "field_strength", "site_id")


NUMERIC_COLUMNS: tuple[str, ...] = ("age", "mmse")


@dataclass(frozen=True)
class SiteProbeData:
    """One site's probe inputs: pooled features [n, E] (mean of cached tokens) and labels, per side."""

    fit_features: np.ndarray
    fit_table: ProbeTable
    test_features: np.ndarray
    test_table: ProbeTable


def probe_sample(record: ScanRecord) -> ProbeSample:
    return ProbeSample.from_scan_labels(subject=record.subject, site_id=record.site_id, modality=record.modality,
                                        labels=record.labels, session=record.session)


def site_probe_data(site: SiteInputs) -> SiteProbeData:
    """Heads are fitted on the site's train + val subjects and scored on its test subjects."""
    assert site.tokens is not None, "probes need the token cache of the frozen encoder"

    def side(records: list[ScanRecord]) -> tuple[np.ndarray, ProbeTable]:
        usable = site.tokens.ensure(records)
        width = site.tokens.preset.mae.width  # the preset's, so that no encoder is loaded just for a shape
        features = np.stack([site.tokens.tokens(r).mean(0).numpy() for r in usable]) if usable else np.zeros((0, width))
        return features.astype(np.float64), ProbeTable(tuple(probe_sample(r) for r in usable))

    fit_x, fit_t = side(site.data.splits["train"] + site.data.splits["val"])
    test_x, test_t = side(site.data.splits["test"])
    return SiteProbeData(fit_x, fit_t, test_x, test_t)


RIDGE_FOLDS = 5  # as the centralized probe's inner cross-validation


def ridge_fold(subject: str) -> int:
    """A subject's cross-validation fold, the same at every site and in every run (no coordination needed)."""
    return zlib.crc32(subject.encode("utf-8")) % RIDGE_FOLDS


def ridge_census(data: SiteProbeData) -> dict[str, np.ndarray]:
    """Per numeric label and subject-grouped fold, the `RidgeMoments` of the site's labelled fit rows (keys
    `ridge.<column>.fold<k>.<moment>`): with them the server cross-validates and solves the regression heads."""
    arrays: dict[str, np.ndarray] = {}
    folds = np.array([ridge_fold(subject) for subject in data.fit_table.subjects], dtype=np.int64)
    for column in NUMERIC_COLUMNS:
        values = data.fit_table.column(column)
        labelled = np.array([v is not None for v in values], dtype=bool)
        for fold in range(RIDGE_FOLDS):
            rows = labelled & (folds == fold)
            moments = RidgeMoments.from_rows(data.fit_features[rows], values[rows].astype(np.float64))
            arrays |= moments.to_arrays(f"ridge.{column}.fold{fold}")
    return arrays


def _summed_folds(parts: Sequence[Mapping[str, np.ndarray]], column: str, width: int) -> list[RidgeMoments]:
    folds = []
    for fold in range(RIDGE_FOLDS):
        total = RidgeMoments.empty(width)
        for arrays in parts:
            total = total + RidgeMoments.from_arrays(arrays, f"ridge.{column}.fold{fold}")
        folds.append(total)
    return folds


def label_census(data: SiteProbeData) -> dict[str, Any]:
    """Counts and sums of the site's labels, per side: what task selection and standardisation need.

    Categorical columns: {class: [scans, subjects]}; numeric: [scans, subjects, Σy, Σy²]. Nothing per
    scan or per subject leaves the site.
    """
    census: dict[str, Any] = {}
    for side_name, table in (("fit", data.fit_table), ("test", data.test_table)):
        subjects = table.subjects
        sides: dict[str, Any] = {}
        for column in CATEGORICAL_COLUMNS:
            values = table.column(column)
            classes: dict[str, list[int]] = {}
            for key in sorted({_class_key(v) for v in values if v is not None}):
                rows = np.array([v is not None and _class_key(v) == key for v in values], dtype=bool)
                classes[key] = [int(rows.sum()), len(set(subjects[rows]))]
            sides[column] = classes
        for column in NUMERIC_COLUMNS:
            values = table.column(column)
            rows = np.array([v is not None for v in values], dtype=bool)
            y = values[rows].astype(np.float64)
            sides[column] = [int(rows.sum()), len(set(subjects[rows])), float(y.sum()), float(np.square(y).sum())]
        census[side_name] = sides
    return census


def _merge_census(censuses: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {"fit": {}, "test": {}}
    for census in censuses:
        for side in ("fit", "test"):
            for column, value in census[side].items():
                if column in CATEGORICAL_COLUMNS:
                    target = merged[side].setdefault(column, {})
                    for key, counts in value.items():
                        target[key] = [a + b for a, b in zip(target.get(key, [0, 0]), counts)]
                else:
                    merged[side][column] = [a + b for a, b in zip(merged[side].get(column, [0, 0, 0.0, 0.0]), value)]
    return merged


@dataclass
class ProbePlan:
    """The tasks the federation can probe, with the summed statistics their heads start from."""

    tasks: list[ProbeTask]
    skipped: list[SkippedTask]
    feature_stats: FeatureStats
    target_stats: dict[str, FeatureStats] = field(default_factory=dict)  # regression tasks
    class_counts: dict[str, np.ndarray] = field(default_factory=dict)  # classification tasks (fit side)
    ridge: dict[str, RidgeFit] = field(default_factory=dict)  # regression tasks: their closed-form heads

    def heads(self) -> dict[str, LinearHead]:
        heads = {t.name: LinearHead(t, self.feature_stats, target_stats=self.target_stats.get(t.name),
                                    class_counts=self.class_counts.get(t.name)) for t in self.tasks}
        for name, fit in self.ridge.items():
            heads[name].set_ridge(fit)
        return heads

    def prior(self, task: ProbeTask) -> list[float]:
        """Features-blind prediction: the pooled train mean, or the pooled train class frequencies."""
        if task.kind is TaskKind.REGRESSION:
            return [float(self.target_stats[task.name].mean[0])]
        counts = self.class_counts[task.name]
        return (counts / counts.sum()).tolist()

    def tasks_json(self) -> str:
        return json.dumps([{**_task_dict(t), "prior": self.prior(t)} for t in self.tasks])


def _task_dict(task: ProbeTask) -> dict[str, Any]:
    return {"name": task.name, "column": task.column, "kind": task.kind.value, "classes": list(task.classes),
            "note": task.note}


def tasks_from_json(text: str) -> list[tuple[ProbeTask, list[float]]]:
    out = []
    for item in json.loads(text):
        task = ProbeTask(item["name"], item["column"], TaskKind(item["kind"]), tuple(item["classes"]), item.get("note", ""))
        out.append((task, [float(p) for p in item["prior"]]))
    return out


def plan_probes(
    censuses: Sequence[Mapping[str, Any]], feature_stats: Sequence[FeatureStats],
    ridge_moments: Sequence[Mapping[str, np.ndarray]], requirements: ProbeRequirements = ProbeRequirements(),
) -> ProbePlan:
    """Choose tasks from the summed census with the same thresholds as `probes.select_tasks`, and solve
    each regression head from the sites' summed `ridge_census` (α from the centralized probe's grid)."""
    census = _merge_census(censuses)
    fit, test = census["fit"], census["test"]
    fixed, skipped = candidate_tasks(ProbeTable(()))  # the label vocabulary's tasks; site/field strength below
    skipped = [s for s in skipped if s.task not in ("field_strength", "site")]
    candidates = list(fixed)
    for name, column in (("field_strength", "field_strength"), ("site", "site_id")):
        present = tuple(sorted(set(fit.get(column, {})) | set(test.get(column, {}))))
        if len(present) >= 2:
            candidates.append(ProbeTask(name, column, TaskKind.CLASSIFICATION, present))
        else:
            skipped.append(SkippedTask(name, f"needs ≥ 2 classes, the federation has {list(present) or 'none'}"))
    tasks: list[ProbeTask] = []
    target_stats: dict[str, FeatureStats] = {}
    class_counts: dict[str, np.ndarray] = {}
    for task in candidates:
        if task.kind is TaskKind.REGRESSION:
            n_fit, s_fit, total, total_sq = fit[task.column]
            n_test, s_test = test[task.column][:2]
            n, subjects = n_fit + n_test, s_fit + s_test
            variance = total_sq / n_fit - (total / n_fit) ** 2 if n_fit else 0.0
            if n < requirements.min_samples or subjects < requirements.min_subjects:
                skipped.append(SkippedTask(task.name, f"{n} labelled scans of {subjects} subjects; needs ≥ "
                                           f"{requirements.min_samples} scans and ≥ {requirements.min_subjects} subjects"))
            elif n_fit < 2 or n_test < 1 or variance <= 1e-12:
                skipped.append(SkippedTask(task.name, f"{n_fit} fit and {n_test} test scans, variance {variance:.3g}"))
            else:
                tasks.append(task)
                target_stats[task.name] = FeatureStats(n_fit, np.array([total]), np.array([total_sq]))
            continue
        per_class = {c: fit[task.column].get(c, [0, 0])[1] + test[task.column].get(c, [0, 0])[1] for c in task.classes}
        kept = tuple(c for c in task.classes if per_class[c] >= requirements.min_subjects_per_class)
        counts = ", ".join(f"{c}: {k}" for c, k in per_class.items())
        if len(kept) < 2:
            skipped.append(SkippedTask(task.name, f"needs ≥ 2 classes with ≥ {requirements.min_subjects_per_class} "
                                       f"subjects each; subjects per class: {counts}"))
            continue
        fit_counts = np.array([fit[task.column].get(c, [0, 0])[0] for c in kept], dtype=np.float64)
        test_rows = sum(test[task.column].get(c, [0, 0])[0] for c in kept)
        if fit_counts.sum() + test_rows < requirements.min_samples or np.count_nonzero(fit_counts) < 2 or test_rows < 1:
            skipped.append(SkippedTask(task.name, f"{int(fit_counts.sum())} fit and {test_rows} test scans in classes {kept}"))
            continue
        dropped = [c for c in task.classes if c not in kept and per_class[c] > 0]
        tasks.append(ProbeTask(task.name, task.column, task.kind, kept, f"dropped rare classes ({counts})" if dropped else ""))
        class_counts[task.name] = fit_counts
    combined = FeatureStats.combine(feature_stats)
    width = combined.total.shape[0]
    ridge = {task.name: fit_ridge(_summed_folds(ridge_moments, task.column, width), combined, target_stats[task.name],
                                  RIDGE_ALPHA_GRID)
             for task in tasks if task.kind is TaskKind.REGRESSION}
    return ProbePlan(tasks, skipped, combined, target_stats, class_counts, ridge)


def sgd_tasks(tasks: Sequence[ProbeTask]) -> list[ProbeTask]:
    """The tasks whose heads the probe rounds train (classification); regression heads are closed-form."""
    return [task for task in tasks if task.kind is TaskKind.CLASSIFICATION]


def task_arrays(arrays: Mapping[str, np.ndarray], tasks: Sequence[ProbeTask]) -> Arrays:
    """The entries of `head_arrays` that belong to these tasks' heads."""
    return {k: v for k, v in arrays.items() if any(k.startswith(t.name + ".") for t in tasks)}


def head_arrays(heads: Mapping[str, LinearHead]) -> Arrays:
    """All heads in one flat mapping: `<task>.<parameter or buffer>`."""
    return {f"{name}.{k}": v for name, head in heads.items() for k, v in module_arrays(head).items()}


def heads_from_arrays(tasks: Sequence[ProbeTask], arrays: Mapping[str, np.ndarray]) -> dict[str, LinearHead]:
    """Rebuild heads from their arrays (the buffers carry the federated standardisation)."""
    heads = {}
    for task in tasks:
        own = {k[len(task.name) + 1 :]: v for k, v in arrays.items() if k.startswith(task.name + ".")}
        width = own["feature_mean"].shape[0]
        # Unit statistics only size the buffers; load_arrays then overwrites them with the federated ones.
        unit_features, unit_target = FeatureStats(1, np.zeros(width), np.ones(width)), FeatureStats(1, np.zeros(1), np.ones(1))
        heads[task.name] = load_arrays(LinearHead(task, unit_features, target_stats=unit_target), own)
    return heads


def task_rows(task: ProbeTask, features: np.ndarray, table: ProbeTable) -> tuple[np.ndarray, np.ndarray]:
    mask, y = task.targets(table) if len(table) else (np.zeros(0, dtype=bool), np.zeros(0))
    return features[mask], y


def train_heads(
    heads: Mapping[str, LinearHead], data: SiteProbeData, *, steps: int, lr: float, batch_size: int,
    weight_decay: float, seed: int,
) -> tuple[Arrays, dict[str, float]]:
    """Local SGD on every head with the site's fit rows; per-task example counts weight the FedAvg.

    `lr` is per feature: each head steps with lr / F. Mean-pooled tokens are strongly correlated, so after
    standardisation the curvature of a linear head reaches ~F; a fixed rate that is stable at F = 48
    diverged at F = 192 (measured), a rate scaled by 1/F is stable at every preset.
    """
    metrics: dict[str, float] = {"num-examples": float(len(data.fit_table))}
    lr = lr / max(1, data.fit_features.shape[1])
    for name, head in heads.items():
        x, y = task_rows(head.task, data.fit_features, data.fit_table)
        metrics[f"n/{name}"] = float(len(y))
        if len(y) == 0:
            metrics[f"probe/{name}_train_loss"] = math.nan
            continue
        losses = head.fit_steps(x, y, steps=steps, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                                seed=round_seed(seed, name))
        metrics[f"probe/{name}_train_loss"] = float(np.mean(losses[-max(1, steps // 4):]))
    return head_arrays(heads), metrics


def aggregate_heads(
    tasks: Sequence[ProbeTask], current: Mapping[str, np.ndarray], replies: Sequence[tuple[Arrays, Mapping[str, float]]]
) -> Arrays:
    """FedAvg per task: each head averaged over the sites that hold rows of its task, weighted by those rows."""
    out = {k: v.copy() for k, v in current.items()}
    for task in tasks:
        weighted = [(arrays, float(metrics.get(f"n/{task.name}", 0.0))) for arrays, metrics in replies]
        weighted = [(a, w) for a, w in weighted if w > 0]
        total = sum(w for _, w in weighted)
        if total <= 0:
            continue
        for key in (k for k in current if k.startswith(task.name + ".")):
            out[key] = sum(a[key].astype(np.float64) * (w / total) for a, w in weighted).astype(current[key].dtype)
    return out


SCORE_BINS = 20  # class-probability histogram resolution for the pooled AUROC


def prediction_sums(task: ProbeTask, y: np.ndarray, scores: np.ndarray) -> list[float]:
    """Additive summaries of one site's held-out predictions, from which pooled metrics follow exactly
    (MAE, R², Pearson r, balanced accuracy) or to histogram resolution (AUROC); counts and sums only.

    Regression: [n, Σ|e|, Σe², Σy, Σy², Σŷ, Σŷ², Σyŷ]. Classification with K classes: the K×K confusion
    matrix (true × predicted), then for each true class t and score column c a SCORE_BINS histogram of
    scores[:, c], flattened.
    """
    if task.kind is TaskKind.REGRESSION:
        y, p = np.asarray(y, dtype=np.float64), np.asarray(scores, dtype=np.float64)
        e = p - y
        return [float(len(y)), float(np.abs(e).sum()), float((e * e).sum()), float(y.sum()), float((y * y).sum()),
                float(p.sum()), float((p * p).sum()), float((y * p).sum())]
    k = len(task.classes)
    y = np.asarray(y, dtype=np.int64)
    confusion = np.zeros((k, k))
    np.add.at(confusion, (y, scores.argmax(axis=1)), 1.0)
    bins = np.minimum((np.asarray(scores) * SCORE_BINS).astype(np.int64), SCORE_BINS - 1)
    histogram = np.zeros((k, k, SCORE_BINS))
    for column in range(k):
        np.add.at(histogram[:, column], (y, bins[:, column]), 1.0)
    return confusion.ravel().tolist() + histogram.ravel().tolist()


def metrics_from_sums(task: ProbeTask, sums: Sequence[float]) -> dict[str, float]:
    """`evaluate_predictions`' metrics of the union of sites, from their summed `prediction_sums`."""
    values: dict[str, float]
    if task.kind is TaskKind.REGRESSION:
        n, abs_err, sq_err, sy, syy, sp, spp, syp = sums
        if n == 0:
            return {m: math.nan for m in task.metric_names}
        sst = syy - sy * sy / n
        cov, var_y, var_p = syp - sy * sp / n, sst, spp - sp * sp / n
        values = {"mae": abs_err / n, "r2": 1.0 - sq_err / sst if sst > 1e-12 else math.nan,
                  "pearson_r": cov / math.sqrt(var_y * var_p) if var_y > 1e-12 and var_p > 1e-12 else math.nan}
    else:
        k = len(task.classes)
        confusion = np.asarray(sums[: k * k]).reshape(k, k)
        histogram = np.asarray(sums[k * k :]).reshape(k, k, SCORE_BINS)
        support = confusion.sum(axis=1)
        present = np.flatnonzero(support > 0)
        if len(present) == 0:
            return {m: math.nan for m in task.metric_names}
        bacc = float(np.mean([confusion[c, c] / support[c] for c in present]))
        columns = [1] if k == 2 else list(present)
        aurocs = [_binned_auroc(histogram[c, c], histogram[np.arange(k) != c, c].sum(axis=0)) for c in columns]
        values = {"auroc": float(np.mean(aurocs)) if len(present) >= 2 else math.nan, "bacc": bacc}
    return {probe_metric_name(task.name, m): float(v) for m, v in values.items()}


def _binned_auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score_pos > score_neg) + ½ P(same bin), from two score histograms (Mann–Whitney on bins)."""
    n_pos, n_neg = positive.sum(), negative.sum()
    if n_pos == 0 or n_neg == 0:
        return math.nan
    below = np.concatenate([[0.0], np.cumsum(negative)[:-1]])  # negatives in strictly lower bins
    return float((positive * (below + 0.5 * negative)).sum() / (n_pos * n_neg))


def score_heads(
    heads: Mapping[str, LinearHead], priors: Mapping[str, Sequence[float]], data: SiteProbeData
) -> dict[str, float | list[float]]:
    """Each task's metrics on the site's held-out (test) rows, and the features-blind chance level.

    Keys: `probe/<task>_<metric>`, `probe/<task>_<metric>_chance`, `n/<task>` (NaN where undefined: no
    rows, one class only), and `sums/<task>`, `sums/<task>_chance` (`prediction_sums`) for pooling.
    """
    metrics: dict[str, float | list[float]] = {"num-examples": float(len(data.test_table))}
    for name, head in heads.items():
        x, y = task_rows(head.task, data.test_features, data.test_table)
        metrics[f"n/{name}"] = float(len(y))
        names = head.task.metric_names
        prior = np.asarray(priors[name], dtype=np.float64)
        if len(y) == 0:
            empty = prediction_sums(head.task, np.zeros(0), np.zeros((0,) if head.task.kind is TaskKind.REGRESSION
                                                                     else (0, len(head.task.classes))))
            metrics |= {m: math.nan for m in names} | {f"{m}_chance": math.nan for m in names}
            metrics |= {f"sums/{name}": empty, f"sums/{name}_chance": empty}
            continue
        scores = head.predict_scores(x)
        chance = np.full(len(y), prior[0]) if head.task.kind is TaskKind.REGRESSION else np.tile(prior, (len(y), 1))
        metrics |= evaluate_predictions(head.task, y, scores)
        metrics |= {f"{k}_chance": v for k, v in evaluate_predictions(head.task, y, chance).items()}
        metrics |= {f"sums/{name}": prediction_sums(head.task, y, scores),
                    f"sums/{name}_chance": prediction_sums(head.task, y, chance)}
    return metrics


def pooled_probe_metrics(tasks: Sequence[ProbeTask], per_site: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The metrics of all sites' held-out rows together, from the summed `prediction_sums`."""
    pooled: dict[str, float] = {}
    for task in tasks:
        pooled[f"n/{task.name}"] = float(sum(m.get(f"n/{task.name}", 0.0) for m in per_site.values()))
        for suffix in ("", "_chance"):
            parts = [np.asarray(m[f"sums/{task.name}{suffix}"], dtype=np.float64) for m in per_site.values()
                     if f"sums/{task.name}{suffix}" in m]
            if not parts:
                continue
            values = metrics_from_sums(task, np.sum(parts, axis=0).tolist())
            pooled |= {f"{k}{suffix}": v for k, v in values.items()}
    return pooled


def plan_to_json(plan: ProbePlan) -> dict[str, Any]:
    ridge = {name: {"alpha": fit.alpha, "cv_rmse": {f"{a:g}": v for a, v in fit.cv_rmse.items()}}
             for name, fit in plan.ridge.items()}
    return {"tasks": json.loads(plan.tasks_json()), "skipped": [asdict(s) for s in plan.skipped], "ridge": ridge}
