"""Linear probes: planted signals are recovered, noise stays at chance, subjects never straddle splits or
folds, and cross-validation is a less noisy estimate than one split."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from rich.console import Console
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from braing3n_core.evaluation.heads import FeatureStats, LinearHead, RidgeMoments, fit_ridge
from braing3n_core.evaluation.probe_report import render_report
from braing3n_core.evaluation.probe_splits import SubjectSplit, outer_folds, subject_split, task_split
from braing3n_core.evaluation.probe_tasks import (
    ProbeRequirements,
    ProbeSample,
    ProbeTable,
    ProbeTask,
    TaskKind,
    evaluate_predictions,
    prior_predictions,
    select_tasks,
)
from braing3n_core.evaluation.probes import cross_validated_predictions, fit_probe, run_probes, write_report_json
from braing3n_core.labels import DIAGNOSES, Modality, ScanLabels

N_FEATURES = 24
MODALITIES = (Modality.T1W.value, Modality.T2W.value)


def planted_cohort(
    n_subjects: int = 60, sessions: int = 3, *, seed: int = 0, signal: float = 1.0, noise: float = 1.0
) -> tuple[np.ndarray, ProbeTable]:
    """Features = noise + a fixed linear map of (age, sex, diagnosis, modality), per scan.

    Every subject has `sessions` sessions × 2 modalities, ages rise by a year per session, and the
    diagnosis can progress (CN → MCI → AD) between sessions, as in ADNI. Site and field strength are
    recorded but carry no signal.
    """
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(7, N_FEATURES))  # (age, sex, MCI, AD, glioma, T1w, bias) → features
    rows, feats = [], []
    for s in range(n_subjects):
        site = f"site-{s % 3}"
        base_age, sex = rng.uniform(55.0, 85.0), SEXES_CYCLE[s % 2]
        dx_index = [0, 0, 1, 2, 3][s % 5]
        for ses in range(sessions):
            if dx_index in (1, 2) and ses == sessions - 1 and s % 4 == 0:
                dx_index = min(dx_index + 1, 2)  # some convert at their last visit
            dx = DIAGNOSES[dx_index]
            for modality in MODALITIES:
                age = base_age + ses
                rows.append(
                    ProbeSample(
                        subject=f"sub-{s:03d}",
                        session=f"ses-{ses}",
                        site_id=site,
                        age=age,
                        sex=sex,
                        diagnosis=dx,
                        modality=modality,
                        field_strength=(1.5, 3.0)[(s // 2) % 2],
                        mmse=float(np.clip(29.0 - 5.0 * dx_index + rng.normal(), 0, 30)) if dx != "glioma" else None,
                    )
                )
                planted = np.array(
                    [(age - 70.0) / 10.0, sex == "M", dx == "MCI", dx == "AD", dx == "glioma", modality == "T1w", 1.0]
                )
                feats.append(signal * planted @ mixing + noise * rng.normal(size=N_FEATURES))
    return np.array(feats), ProbeTable(tuple(rows))


SEXES_CYCLE = ("F", "M")


@pytest.fixture(scope="module")
def cohort() -> tuple[np.ndarray, ProbeTable]:
    return planted_cohort()


@pytest.fixture(scope="module")
def report(cohort):
    features, table = cohort
    return run_probes(features, table, inner_folds=3, seed=0, encoder="planted")


def test_planted_signal_is_recovered(report) -> None:
    m = report.metrics()
    by_task = {r.task: r for r in report.results}
    assert m["probe/age_mae"] < 0.5 * by_task["age"].chance["probe/age_mae"]
    assert m["probe/age_r2"] > 0.75 and m["probe/age_pearson_r"] > 0.9
    assert m["probe/sex_auroc"] > 0.95 and m["probe/sex_bacc"] > 0.9
    assert m["probe/diagnosis_bacc"] > 0.8 and m["probe/diagnosis_auroc"] > 0.9
    for task in ("mci_vs_cn", "ad_vs_cn", "glioma_vs_cn"):
        assert m[f"probe/{task}_auroc"] > 0.9, task
    assert m["probe/modality_bacc"] > 0.95
    assert m["probe/mmse_r2"] > 0.5  # MMSE follows diagnosis, which is planted
    # Chance levels come from a features-blind predictor through the same metric function.
    assert by_task["sex"].chance["probe/sex_auroc"] == pytest.approx(0.5)
    assert by_task["diagnosis"].chance["probe/diagnosis_bacc"] == pytest.approx(1 / len(by_task["diagnosis"].classes))
    assert all(re.fullmatch(r"probe/[a-z0-9_]+", k) for k in m)


def test_unplanted_labels_stay_near_chance(report) -> None:
    # Site and field strength carry no signal in the features: a probe must not find one.
    m = report.metrics()
    assert abs(m["probe/field_strength_auroc"] - 0.5) < 0.2
    assert m["probe/site_bacc"] < 0.6


def test_pure_noise_gives_chance_auroc() -> None:
    aurocs = []
    for seed in range(2):  # each estimate pools out-of-fold predictions of all 120 subjects
        features, table = planted_cohort(n_subjects=120, sessions=1, seed=seed, signal=0.0)
        sex = ProbeTask("sex", "sex", TaskKind.CLASSIFICATION, ("F", "M"))
        result = run_probes(features, table, tasks=[sex], inner_folds=3, seed=seed).results[0]
        aurocs.append(result.metrics["probe/sex_auroc"])
    assert abs(np.mean(aurocs) - 0.5) < 0.08, aurocs


def test_no_subject_straddles_any_split(cohort) -> None:
    _, table = cohort
    subjects = table.subjects
    tasks, _ = select_tasks(table)
    assert tasks
    for seed in range(3):
        for task in tasks:
            split = task_split(task, table, seed=seed)
            train, test = set(subjects[split.train]), set(subjects[split.test])
            assert train and test and not train & test, task.name
            # All of a subject's in-task rows (every session and modality) are on one side.
            in_task = task.targets(table)[0]
            for subject in test:
                rows = in_task & (subjects == subject)
                assert split.test[rows].all()


def test_outer_folds_cover_every_row_once_and_group_subjects(cohort) -> None:
    _, table = cohort
    subjects = table.subjects
    tasks, _ = select_tasks(table)
    for task in tasks:
        in_task = task.targets(table)[0]
        folds = outer_folds(task, table, folds=5, seed=0)
        assert 2 <= len(folds) <= 5
        held_out = np.sum([f.test for f in folds], axis=0)
        assert np.array_equal(held_out, in_task.astype(int)), task.name  # each task row held out exactly once
        for fold in folds:
            assert not (fold.train | fold.test)[~in_task].any()
            assert not set(subjects[fold.train]) & set(subjects[fold.test]), task.name
            assert np.array_equal(fold.train, in_task & ~fold.test)
    sex = next(t for t in tasks if t.name == "sex")
    seeded = [f.test for f in outer_folds(sex, table, seed=1)]
    assert all(np.array_equal(a.test, b) for a, b in zip(outer_folds(sex, table, seed=1), seeded))
    assert not all(np.array_equal(a.test, b) for a, b in zip(outer_folds(sex, table, seed=2), seeded))


def test_cross_validated_metrics_pool_the_out_of_fold_predictions(cohort, report) -> None:
    features, table = cohort
    age = report.result("age")
    assert age.folds == 5 and age.n_test == len(table) and age.n_test_subjects == len(set(table.subjects))
    assert 0 < age.fold_std["probe/age_r2"] < 0.2
    oof = cross_validated_predictions(ProbeTask("age", "age", TaskKind.REGRESSION), features, table, inner_folds=3)
    assert sorted(set(oof.fold)) == [0, 1, 2, 3, 4] and len(oof.regularisation) == 5
    assert evaluate_predictions(oof.task, oof.y, oof.predictions) == pytest.approx(age.metrics)
    # The features-blind chance level is also out of fold: each fold's train mean, so R² is ≤ 0.
    assert age.chance["probe/age_r2"] <= 0.0 and age.chance["probe/age_r2"] > -0.1


def test_cross_validation_is_less_noisy_than_one_split() -> None:
    """The measured motivation: with a few dozen subjects one 80/20 split's R² depends on which
    subjects land in the test set; pooling out-of-fold predictions over all subjects averages that out."""
    features, table = planted_cohort(n_subjects=40, sessions=1, seed=5, signal=0.35)
    age = ProbeTask("age", "age", TaskKind.REGRESSION)
    single, pooled = [], []
    for seed in range(8):
        one = task_split(age, table, seed=seed)
        given = run_probes(features, table, split=one, tasks=[age], inner_folds=3, seed=seed)
        single.append(given.results[0].metrics["probe/age_r2"])
        pooled.append(run_probes(features, table, tasks=[age], inner_folds=3, seed=seed).results[0].metrics["probe/age_r2"])
    assert np.std(pooled) < 0.5 * np.std(single), (pooled, single)
    assert min(pooled) > 0.3  # the planted signal is found whichever subjects land in which fold


def test_plain_subject_split_is_seeded_and_grouped() -> None:
    subjects = np.repeat([f"s{i}" for i in range(30)], 5)
    a, b = subject_split(subjects, seed=3), subject_split(subjects, seed=3)
    assert np.array_equal(a.test, b.test)
    assert not set(subjects[a.train]) & set(subjects[a.test])
    assert not np.array_equal(a.test, subject_split(subjects, seed=4).test)


def test_given_split_is_used_and_leaks_are_refused(cohort) -> None:
    features, table = cohort
    subjects = table.subjects
    test_subjects = set(sorted(set(subjects))[::4])
    test = np.array([s in test_subjects for s in subjects])
    age_task = ProbeTask("age", "age", TaskKind.REGRESSION)
    report = run_probes(features, table, split=SubjectSplit(~test, test), tasks=[age_task], inner_folds=3)
    age = report.results[0]
    assert age.n_test == int(test.sum()) and age.n_test_subjects == len(test_subjects)
    row = int(np.flatnonzero(~test)[0])  # one scan of a train subject moves to test
    train, leaking = ~test, test.copy()
    train[row], leaking[row] = False, True
    with pytest.raises(ValueError, match=f"subjects in both train and test: \\['{subjects[row]}'\\]"):
        run_probes(features, table, split=SubjectSplit(train, leaking), tasks=[age_task], inner_folds=3)


def test_tasks_are_skipped_with_reasons() -> None:
    rows = [
        ProbeSample(subject=f"sub-{i}", site_id="only-site", age=60.0 + i, sex="F", diagnosis=("CN", "AD")[i % 2])
        for i in range(30)
    ] + [ProbeSample(subject="sub-g", site_id="only-site", age=50.0, sex="F", diagnosis="glioma")]
    tasks, skipped = select_tasks(ProbeTable(tuple(rows)))
    reasons = {s.task: s.reason for s in skipped}
    assert {t.name for t in tasks} == {"age", "diagnosis", "ad_vs_cn"}
    assert "needs ≥ 2 classes" in reasons["sex"] and "F: 31" in reasons["sex"]
    assert "only-site" in reasons["site"]
    assert "0 labelled scans" in reasons["mmse"]
    assert "glioma: 1" in reasons["glioma_vs_cn"]
    assert "modality" in reasons and "field_strength" in reasons
    diagnosis = next(t for t in tasks if t.name == "diagnosis")
    assert diagnosis.classes == ("CN", "AD") and "dropped" in diagnosis.note
    strict = select_tasks(ProbeTable(tuple(rows)), ProbeRequirements(min_samples=40))[0]
    assert not strict


def test_standardisation_uses_train_rows_only(cohort) -> None:
    features, table = cohort
    task = ProbeTask("age", "age", TaskKind.REGRESSION)
    split = task_split(task, table, seed=0)
    shifted = features.copy()
    shifted[split.test] += 100.0  # would move the scaler if test rows leaked into it
    probe = fit_probe(task, shifted, table, train_mask=split.train, inner_folds=3)
    scaler = probe.pipeline.named_steps["scale"]
    np.testing.assert_allclose(scaler.mean_, features[split.train].mean(0))
    np.testing.assert_allclose(scaler.scale_, features[split.train].std(0))


def test_federated_stats_equal_centralised(cohort) -> None:
    features, table = cohort
    sites = np.array([s.site_id for s in table.samples])
    parts = [FeatureStats.from_features(features[sites == s]) for s in sorted(set(sites))]
    combined = FeatureStats.combine(FeatureStats.from_arrays(p.to_arrays()) for p in parts)
    central = StandardScaler().fit(features)
    assert combined.count == len(features)
    np.testing.assert_allclose(combined.mean, central.mean_, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(combined.scale, central.scale_, rtol=1e-9)
    np.testing.assert_allclose(combined.standardize(features), central.transform(features), atol=1e-9)
    constant = FeatureStats.from_features(np.ones((5, 2)))
    assert np.array_equal(constant.scale, [1.0, 1.0])  # as StandardScaler: no division by zero


def test_linear_head_trains_by_sgd_and_is_scored_by_the_shared_function(cohort) -> None:
    features, table = cohort
    for task, threshold in (
        (ProbeTask("sex", "sex", TaskKind.CLASSIFICATION, ("F", "M")), 0.95),
        (ProbeTask("age", "age", TaskKind.REGRESSION), 0.9),
    ):
        split = task_split(task, table, seed=1)
        _, y_train = task.targets(table.subset(split.train))
        _, y_test = task.targets(table.subset(split.test))
        stats = FeatureStats.from_features(features[split.train])
        head = LinearHead(
            task,
            stats,
            target_stats=FeatureStats.from_features(y_train) if task.kind is TaskKind.REGRESSION else None,
            class_counts=np.bincount(y_train) if task.kind is TaskKind.CLASSIFICATION else None,
        )
        assert torch.allclose(head.feature_mean, torch.as_tensor(stats.mean, dtype=torch.float32))
        losses = head.fit_steps(features[split.train], y_train, steps=200, lr=0.05, seed=0)
        assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:5])
        scores = head.predict_scores(features[split.test])
        metrics = evaluate_predictions(task, y_test, scores)
        key = "probe/sex_auroc" if task.name == "sex" else "probe/age_r2"
        assert metrics[key] > threshold, metrics


def _site_moments(features: np.ndarray, ages: np.ndarray, sites: np.ndarray) -> RidgeMoments:
    """Each site's moments, through their transport form, summed as the server sums them."""
    parts = [RidgeMoments.from_rows(features[sites == s], ages[sites == s]) for s in sorted(set(sites))]
    total = RidgeMoments.empty(features.shape[1])
    for part in parts:
        total = total + RidgeMoments.from_arrays(part.to_arrays("ridge.age.fold0"), "ridge.age.fold0")
    return total


def test_federated_ridge_is_the_ridge_of_all_sites_rows_pooled(cohort) -> None:
    features, table = cohort
    task = ProbeTask("age", "age", TaskKind.REGRESSION)
    _, ages = task.targets(table)
    sites = np.array([s.site_id for s in table.samples])
    # Sites see different age ranges (the non-IID case where FedAvg of local SGD drifts): shift one site's features.
    features = features + (sites == "site-0")[:, None] * 3.0
    stats, target = FeatureStats.from_features(features), FeatureStats.from_features(ages)
    for alpha in (0.1, 10.0, 1000.0):
        fit = fit_ridge([_site_moments(features, ages, sites)], stats, target, [alpha])
        head = LinearHead(task, stats, target_stats=target).set_ridge(fit)
        pooled = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(features, (ages - target.mean) / target.scale)
        expected = pooled.predict(features) * target.scale + target.mean
        np.testing.assert_allclose(head.predict_scores(features), expected, atol=2e-3)  # float32 head
        assert fit.alpha == alpha and np.isnan(fit.cv_rmse[alpha])  # one fold: nothing to validate on


def test_federated_ridge_cross_validates_alpha_exactly(cohort) -> None:
    features, table = cohort
    task = ProbeTask("age", "age", TaskKind.REGRESSION)
    _, ages = task.targets(table)
    sites = np.array([s.site_id for s in table.samples])
    fold_of = np.array([int(s.subject[-3:]) % 4 for s in table.samples])  # 4 subject-grouped folds
    noisy = features + np.random.default_rng(0).normal(scale=4.0, size=features.shape)  # regularisation matters
    stats, target = FeatureStats.from_features(noisy), FeatureStats.from_features(ages)
    alphas = (0.01, 1.0, 100.0, 1e4, 1e6)
    folds = [_site_moments(noisy[fold_of == k], ages[fold_of == k], sites[fold_of == k]) for k in range(4)]
    fit = fit_ridge(folds, stats, target, alphas)
    x = stats.standardize(noisy)
    for alpha in alphas:  # pooled out-of-fold RMSE of ridges fitted on the other folds, as sklearn computes it
        predictions = np.zeros(len(ages))
        for k in range(4):
            model = Ridge(alpha=alpha).fit(x[fold_of != k], ages[fold_of != k])
            predictions[fold_of == k] = model.predict(x[fold_of == k])
        assert fit.cv_rmse[alpha] == pytest.approx(np.sqrt(np.mean((predictions - ages) ** 2)), rel=1e-6), alpha
    assert fit.alpha == min(alphas, key=fit.cv_rmse.get)
    assert fit.cv_rmse[fit.alpha] < fit.cv_rmse[1e6]  # beats the nearly-constant predictor
    refit = Ridge(alpha=fit.alpha).fit(x, (ages - target.mean[0]) / target.scale[0])  # then refitted on every row
    np.testing.assert_allclose(fit.weight, refit.coef_, rtol=1e-6, atol=1e-9)


def test_evaluate_predictions_checks_its_inputs() -> None:
    task = ProbeTask("diagnosis", "diagnosis", TaskKind.CLASSIFICATION, ("CN", "MCI", "AD"))
    y = np.array([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="softmax"):
        evaluate_predictions(task, y, np.random.default_rng(0).normal(size=(6, 3)))
    with pytest.raises(ValueError, match="expected"):
        evaluate_predictions(task, y, np.full((6, 2), 0.5))
    perfect = np.eye(3)[y]
    assert evaluate_predictions(task, y, perfect) == {"probe/diagnosis_auroc": 1.0, "probe/diagnosis_bacc": 1.0}
    chance = evaluate_predictions(task, y, prior_predictions(task, y, 6))
    assert chance["probe/diagnosis_auroc"] == 0.5 and chance["probe/diagnosis_bacc"] == pytest.approx(1 / 3)
    # A class missing from y_true is left out of the macro averages rather than failing.
    partial = evaluate_predictions(task, y[y < 2], perfect[y < 2])
    assert partial["probe/diagnosis_bacc"] == 1.0


def test_report_renders_and_writes_json(report, cohort, tmp_path) -> None:
    path = tmp_path / "probes" / "report.json"
    write_report_json(report, path)
    loaded = json.loads(path.read_text())
    assert loaded["encoder"] == "planted" and loaded["settings"]["folds"] == 5
    assert {r["task"] for r in loaded["results"]} >= {"age", "sex", "diagnosis"}
    assert loaded["results"][0]["fold_std"]["probe/age_r2"] > 0
    # Strict JSON: NaN is written as null (one split's constant chance predictor has no Pearson r).
    features, table = cohort
    age = ProbeTask("age", "age", TaskKind.REGRESSION)
    one_split = run_probes(features, table, split=task_split(age, table), tasks=[age], inner_folds=3)
    write_report_json(one_split, path)
    assert json.loads(path.read_text())["results"][0]["chance"]["probe/age_pearson_r"] is None
    console = Console(record=True, width=160)
    console.print(render_report(report))
    text = console.export_text()
    assert "ad_vs_cn" in text and "pearson_r" in text and "5-fold" in text


def test_bad_labels_name_the_scan() -> None:
    with pytest.raises(ValueError, match="sub-7.*sex 'X'"):
        ProbeSample(subject="sub-7", session="ses-1", site_id="a", sex="X")
    with pytest.raises(ValueError, match="age"):
        ProbeSample(subject="sub-7", site_id="a", age=250.0)
    sample = ProbeSample.from_scan_labels(
        subject="sub-1", site_id="a", modality=Modality.FLAIR, labels=ScanLabels(age=70.0, sex="M")
    )
    assert sample.modality == "FLAIR" and sample.age == 70.0
    with pytest.raises(ValueError, match="rows but the label table"):
        run_probes(np.zeros((3, 4)), ProbeTable((sample,)))
