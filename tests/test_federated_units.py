"""Federated layer without a simulation: run-config validation, reply screening on numpy arrays and real
Flower messages, strategy state round trips, ledger pruning, and client handlers called with a real
Message + Context (flower-1.42 notes §7.2a)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, Metadata, MetricRecord, RecordDict

from braing3n_core.config import ConfigError
from braing3n_core.evaluation.heads import FeatureStats, RidgeMoments
from braing3n_core.federation.probes import (
    RIDGE_FOLDS,
    SiteProbeData,
    head_arrays,
    heads_from_arrays,
    plan_probes,
    pooled_probe_metrics,
    prediction_sums,
    ridge_census,
    ridge_fold,
)
from braing3n_core.federation.replies import check_reply_arrays, update_norm
from braing3n_core.federation.run_config import FedAvgConfig, FedOptConfig, RunConfig
from braing3n_core.federation.run_folder import RunFolder
from braing3n_core.site_config import SiteConfig
from server.aggregation import build_strategy, restore_strategy_state, screen_replies, strategy_state

REFERENCE = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# --- run config ------------------------------------------------------------------------------------------------


def test_run_config_resolves_defaults_and_schedule(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "run.yaml", {
        "name": "r", "preset": "tiny", "stages": [
            {"name": "mae", "rounds": 4, "local_steps": 2, "lr": 1e-3, "warmup_rounds": 1},
            {"name": "dit", "rounds": 2, "local_steps": 1, "strategy": "fedyogi"},
        ]})
    config = RunConfig.from_yaml(path)
    mae, dit = config.stages
    assert isinstance(dit.strategy, FedOptConfig) and dit.strategy.name == "fedyogi"
    assert [round(mae.lr_at_round(r), 6) for r in (1, 2, 4)] == [1e-3, 1e-3, 0.00025]  # warm-up, peak, cosine
    assert dit.resolved_batch_size == 8 and mae.evaluates_in(4) and mae.evaluates_in(1)
    pinned = RunConfig.from_yaml(write_yaml(tmp_path / "again.yaml", yaml.safe_load(config.to_yaml())))
    assert pinned.same_recipe(config) and pinned.stages[1].lr == 3e-4  # the stage default, written out
    assert not pinned.same_recipe(config.model_copy(update={"seed": 1}))
    # a generation evaluation of the models this run trains: no checkpoint paths needed
    trains_all = {**yaml.safe_load(config.to_yaml()), "probes": {"enabled": True}, "generation_eval": {"n": 4}}
    trains_all["stages"].insert(1, {"name": "decoder", "rounds": 1, "local_steps": 1})
    evaluated = RunConfig.from_yaml(write_yaml(tmp_path / "eval.yaml", trains_all)).generation_eval
    assert evaluated.dit is None and evaluated.decoder is None and evaluated.n == 4


@pytest.mark.parametrize("change, message", [
    ({"stages": [{"name": "dit", "rounds": 1, "local_steps": 1}]}, "need an encoder"),
    ({"stages": [{"name": "decoder", "rounds": 1, "local_steps": 1}, {"name": "mae", "rounds": 1, "local_steps": 1}]}, "order"),
    ({"stages": [{"name": "mae", "rounds": 1, "local_steps": 1, "strategy": {"name": "fedsgd"}}]}, "unknown strategy 'fedsgd'"),
    ({"stages": [{"name": "mae", "rounds": 1, "local_steps": 1, "strategy": {"name": "fedtrimmedavg", "beta": 0.7}}]}, "beta"),
    ({"stages": [{"name": "mae", "rounds": 0, "local_steps": 1}]}, "stages[mae].rounds"),
    ({"stages": [{"name": "mae", "rounds": 1, "local_steps": 1, "lr_rate": 1}]}, "unknown setting"),
    ({"preset": "huge", "stages": [{"name": "mae", "rounds": 1, "local_steps": 1}]}, "unknown preset"),
    ({"stages": [], "start_from": {"mae": "missing.json"}, "probes": {"enabled": True}}, "not found"),
    ({"stages": [{"name": "mae", "rounds": 1, "local_steps": 1}, {"name": "decoder", "rounds": 1, "local_steps": 1}],
      "probes": {"enabled": True}, "generation_eval": {"n": 4}}, "generation_eval.dit: give a checkpoint, or train"),
])
def test_run_config_errors_name_the_file_and_field(tmp_path: Path, change: dict, message: str) -> None:
    path = write_yaml(tmp_path / "bad-run.yaml", {"name": "r", "preset": "tiny", **change})
    with pytest.raises(ConfigError) as raised:
        RunConfig.from_yaml(path)
    assert str(path) in str(raised.value) and message in str(raised.value)


# --- reply screening -------------------------------------------------------------------------------------------


def test_check_reply_arrays_catches_each_defect() -> None:
    good = {"w": np.ones((3, 4), np.float32), "b": np.zeros(4, np.float32)}
    assert check_reply_arrays(good, REFERENCE, 10.0) == (None, pytest.approx(math.sqrt(12)))
    nan = {**good, "b": np.array([0, np.nan, 0, np.inf], np.float32)}
    cases = {
        "NaN/Inf": nan,
        "shape": {**good, "w": np.ones((4, 3), np.float32)},
        "dtype": {**good, "w": np.ones((3, 4), np.float64)},
        "keys": {"w": good["w"]},
    }
    for word, arrays in cases.items():
        reason, _ = check_reply_arrays(arrays, REFERENCE, None)
        assert reason is not None and word.split("/")[0] in reason, (word, reason)
    reason, norm = check_reply_arrays(good, REFERENCE, 3.0)
    assert "exceeds the bound" in reason and norm == pytest.approx(update_norm(good, REFERENCE))


def _reply(node: int, site: str, arrays: dict | None = None, metrics: dict | None = None, error: str = "") -> Message:
    metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="x",
                        group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    if error:
        return Message(Error(code=4001, reason=error), metadata=metadata)
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord(metrics or {"num-examples": 10, "train/loss": 0.5}),
                          "site": ConfigRecord({"site-id": site})})
    return Message(content, metadata=metadata)


def test_screen_replies_names_each_site_and_keeps_the_good_ones() -> None:
    good = {"w": np.full((3, 4), 0.1, np.float32), "b": np.zeros(4, np.float32)}
    replies = [
        _reply(1, "good-1", good),
        _reply(2, "nan-site", {**good, "w": np.full((3, 4), np.nan, np.float32)}),
        _reply(3, "far-site", {**good, "w": np.full((3, 4), 100.0, np.float32)}),
        _reply(4, "dropped", error="site dropped declines: data unavailable"),
        _reply(5, "no-examples", good, {"num-examples": 0, "train/loss": 0.5}),
        _reply(6, "odd-metrics", good, {"num-examples": 3, "train/other": 1.0}),
        _reply(7, "good-2", good),
    ]
    accepted, verdicts = screen_replies(replies, REFERENCE, norm_bound=5.0, node_sites={4: "dropped"})
    kinds = {v.site: (v.kind, v.reason) for v in verdicts}
    assert [m.metadata.src_node_id for m in accepted] == [1, 6, 7]
    assert kinds["nan-site"][0] == "rejected" and "NaN" in kinds["nan-site"][1]
    assert kinds["far-site"][0] == "rejected" and "exceeds" in kinds["far-site"][1]
    assert kinds["dropped"] == ("declined", "site dropped declines: data unavailable")
    assert "num-examples" in kinds["no-examples"][1]
    # Other metric names (another client version) cost no site its update; each metric is averaged over
    # the sites that report it, and the replies as they came stay untouched for the per-site log.
    assert kinds["odd-metrics"] == ("accepted", "does not report ['train/loss']; left out of those metrics' means")
    assert kinds["good-1"] == ("accepted", "does not report ['train/other']; left out of those metrics' means")
    assert set(replies[0].content["metrics"]) == {"num-examples", "train/loss"}
    arrays, metrics = build_strategy(FedAvgConfig(), 1).aggregate_train(1, accepted)  # a real Flower strategy
    assert np.allclose(arrays["w"].numpy(), 0.1)
    assert metrics["train/loss"] == pytest.approx(0.5) and metrics["train/other"] == pytest.approx(1.0)


def test_a_dp_round_that_drew_nobody_is_aggregated_with_the_others() -> None:
    """A DP-SGD site whose Poisson draws were all empty reports NaN loss and NaN stage metrics under the
    same names as the other sites: it is accepted, and the round's mean metrics skip its NaN."""
    good = {"w": np.full((3, 4), 0.1, np.float32), "b": np.zeros(4, np.float32)}
    trained = {"num-examples": 10, "train/loss": 0.5, "train/examples": 4.0, "train/l1": 0.2}
    nobody = {"num-examples": 30, "train/loss": math.nan, "train/examples": 0.0, "train/l1": math.nan}
    accepted, verdicts = screen_replies([_reply(1, "nobody", good, nobody), _reply(2, "trained", good, trained)],
                                        REFERENCE, norm_bound=5.0, node_sites={})
    assert [v.kind for v in verdicts] == ["accepted", "accepted"]
    _, metrics = build_strategy(FedAvgConfig(), 1).aggregate_train(1, accepted)
    assert metrics["train/loss"] == pytest.approx(0.5) and metrics["train/l1"] == pytest.approx(0.2)
    assert metrics["train/examples"] == pytest.approx((30 * 0.0 + 10 * 4.0) / 40)


def test_fedadam_moments_survive_a_checkpoint_round_trip() -> None:
    strategy = build_strategy(FedOptConfig(name="fedadam", eta=0.1), min_sites=1)
    strategy.m_t = {"w": np.full((3, 4), 0.5, np.float32)}
    strategy.v_t = {"w": np.full((3, 4), 0.25, np.float32)}
    state = strategy_state(strategy)
    assert set(state) == {"m_t.w", "v_t.w"}
    fresh = build_strategy(FedOptConfig(name="fedadam", eta=0.1), min_sites=1)
    restore_strategy_state(fresh, state)
    assert np.array_equal(fresh.m_t["w"], strategy.m_t["w"]) and np.array_equal(fresh.v_t["w"], strategy.v_t["w"])
    assert strategy_state(build_strategy(FedOptConfig(name="fedyogi"), 1)) == {}


def test_uncommitted_ledger_lines_are_dropped(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    for stage, rnd in (("mae", 1), ("mae", 2), ("mae", 3), ("decoder", 1), ("setup", 0)):
        run.log(stage, rnd, "site-a", "train")
    with open(run.metrics_path, "a") as handle:
        handle.write('{"stage": "mae", "rou')  # a line cut by the crash
    removed = run.prune_uncommitted({"mae": 2, "decoder": 0})
    assert removed == 3
    assert [(r["stage"], r["round"]) for r in run.records()] == [("mae", 1), ("mae", 2), ("setup", 0)]


# --- probes on summed statistics -------------------------------------------------------------------------------


def _census(n_fit: int, classes: dict[str, int], ages: list[float]) -> dict:
    side = {"sex": {}, "diagnosis": {c: [2 * k, k] for c, k in classes.items()}, "modality": {"T1w": [n_fit, n_fit // 2]},
            "field_strength": {}, "site_id": {}, "age": [len(ages), len(ages) // 2, sum(ages), sum(a * a for a in ages)],
            "mmse": [0, 0, 0.0, 0.0]}
    return {"fit": side, "test": json.loads(json.dumps(side))}


def test_probe_plan_from_two_censuses_and_pooled_metrics() -> None:
    a = _census(20, {"CN": 3, "AD": 3}, [60.0 + i for i in range(20)])
    b = _census(20, {"CN": 2, "AD": 1, "MCI": 1}, [70.0 + i for i in range(20)])
    rng = np.random.default_rng(0)
    features = [rng.normal(size=(20, 6)) for _ in range(2)]
    stats = [FeatureStats.from_features(x) for x in features]
    moments = []
    for x, ages in zip(features, ([60.0 + i for i in range(20)], [70.0 + i for i in range(20)])):
        arrays = {}
        for fold in range(RIDGE_FOLDS):  # 4 rows per fold
            rows = slice(4 * fold, 4 * fold + 4)
            arrays |= RidgeMoments.from_rows(x[rows], np.array(ages)[rows]).to_arrays(f"ridge.age.fold{fold}")
            arrays |= RidgeMoments.empty(6).to_arrays(f"ridge.mmse.fold{fold}")
        moments.append(arrays)
    plan = plan_probes([a, b], stats, moments)
    names = {t.name for t in plan.tasks}
    assert {"age", "diagnosis", "ad_vs_cn"} <= names and "mci_vs_cn" not in names  # MCI: 2 subjects < 4
    diagnosis = next(t for t in plan.tasks if t.name == "diagnosis")
    assert diagnosis.classes == ("CN", "AD") and "dropped rare classes" in diagnosis.note
    age_stats = plan.target_stats["age"]
    assert age_stats.count == 40 and age_stats.mean[0] == pytest.approx(np.mean([60.0 + i for i in range(20)] + [70.0 + i for i in range(20)]))
    heads = heads_from_arrays(plan.tasks, head_arrays(plan.heads()))
    assert set(heads) == names
    # The age head is solved at planning time (closed-form ridge, α by 5-fold CV); the others start at 0.
    assert not np.isnan(plan.ridge["age"].cv_rmse[plan.ridge["age"].alpha]) and set(plan.ridge) == {"age"}
    assert heads["age"].linear.weight.abs().sum() > 0 and heads["diagnosis"].linear.weight.abs().sum() == 0


def test_ridge_census_sums_the_labelled_rows_of_each_fold_of_subjects() -> None:
    from braing3n_core.evaluation.probe_tasks import ProbeSample, ProbeTable

    rng = np.random.default_rng(1)
    subjects = [f"sub-{i}" for i in range(40)]
    x = rng.normal(size=(80, 4))  # two scans per subject
    rows = [(subjects[i // 2], 20.0 + i, 29.0 if i < 4 else None) for i in range(80)]  # MMSE on 4 scans only
    table = ProbeTable(tuple(ProbeSample(subject=s, session=f"ses-{i % 2}", site_id="site-a", age=a, sex="F",
                                         diagnosis="CN", modality="T1w", field_strength=3.0, mmse=m)
                             for i, (s, a, m) in enumerate(rows)))
    arrays = ridge_census(SiteProbeData(x, table, np.zeros((0, 4)), ProbeTable(())))
    folds = np.array([ridge_fold(f"site-a/{s}") for s, _, _ in rows])
    assert len(set(folds[::2])) == RIDGE_FOLDS and np.array_equal(folds[::2], folds[1::2])  # a subject in one fold
    for fold in range(RIDGE_FOLDS):
        age = RidgeMoments.from_arrays(arrays, f"ridge.age.fold{fold}")
        mine = folds == fold
        assert age.count == mine.sum() and age.sum_y == pytest.approx(sum(a for (_, a, _), m in zip(rows, mine) if m))
        np.testing.assert_allclose(age.gram, x[mine].T @ x[mine])
    assert sum(RidgeMoments.from_arrays(arrays, f"ridge.mmse.fold{k}").count for k in range(RIDGE_FOLDS)) == 4
    assert all(v.ndim <= 2 and v.shape[0] in (1, 2, 4) for v in arrays.values())  # sums, never a row per scan


def test_pooled_probe_metrics_match_the_metrics_of_all_rows_together() -> None:
    from braing3n_core.evaluation.probe_tasks import ProbeTask, TaskKind, evaluate_predictions

    rng = np.random.default_rng(0)
    age = ProbeTask("age", "age", TaskKind.REGRESSION)
    dx = ProbeTask("diagnosis", "diagnosis", TaskKind.CLASSIFICATION, ("CN", "MCI", "AD"))
    sites, ys, ps, yc, pc = {}, [], [], [], []
    for i, n in enumerate((7, 12, 0)):  # the third site holds no held-out rows
        y, p = rng.uniform(50, 90, n), rng.uniform(50, 90, n)
        labels = rng.integers(0, 3 if i else 1, n)  # site 0 holds one class only: its own AUROC is undefined
        probs = rng.dirichlet(np.ones(3), n)
        sites[str(i)] = {"n/age": float(n), "n/diagnosis": float(n), "sums/age": prediction_sums(age, y, p),
                         "sums/diagnosis": prediction_sums(dx, labels, probs.reshape(n, 3))}
        ys.append(y), ps.append(p), yc.append(labels), pc.append(probs.reshape(n, 3))
    pooled = pooled_probe_metrics([age, dx], sites)
    exact = evaluate_predictions(age, np.concatenate(ys), np.concatenate(ps))
    for key, value in exact.items():
        assert pooled[key] == pytest.approx(value, abs=1e-9), key
    exact = evaluate_predictions(dx, np.concatenate(yc), np.concatenate(pc))
    assert pooled["probe/diagnosis_bacc"] == pytest.approx(exact["probe/diagnosis_bacc"], abs=1e-9)
    assert pooled["probe/diagnosis_auroc"] == pytest.approx(exact["probe/diagnosis_auroc"], abs=0.05)  # binned scores
    assert pooled["n/age"] == 19


# --- client handlers with a real Message + Context --------------------------------------------------------------


def _message(message_type: str, content: RecordDict) -> Message:
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1",
                        created_at=0.0, ttl=3600.0, message_type=message_type)
    return Message(content, metadata=metadata)


def test_client_hello_and_refused_encoder(synthetic_cohort, tmp_path: Path) -> None:
    from braing3n_core.federation.protocol import DECLINED
    from client.app import app as client_app

    site = SiteConfig.from_yaml(synthetic_cohort[0])
    site_yaml = write_yaml(tmp_path / "site.yaml", {**site.to_yaml_dict(), "cache_dir": str(tmp_path / "cache")})
    context = Context(run_id=1, node_id=1, node_config={"site-config": str(site_yaml)}, state=RecordDict(), run_config={})
    hello = client_app(_message("query", RecordDict({"config": ConfigRecord({"action": "hello", "preset": "tiny"})})), context)
    described = hello.content["site"]
    assert described["site-id"] == site.site_id and described["has-encoder"] is False
    assert sum(json.loads(described["scans"]).values()) > 0
    # An encoder whose weights do not hash to the announced value is refused, clearly, and not stored.
    install = ConfigRecord({"action": "install_encoder", "preset": "tiny", "encoder-sha256": "0" * 64,
                            "encoder-config": json.dumps({})})
    reply = client_app(_message("query", RecordDict({"config": install, "encoder": ArrayRecord(
        {"w": Array(np.zeros(2, np.float32))})})), context)
    assert reply.has_error() and reply.error.code == DECLINED and "hashes to" in reply.error.reason
    assert not (tmp_path / "cache" / "encoders").exists() or not any((tmp_path / "cache" / "encoders").iterdir())
    # A decoder round naming an encoder the site does not hold is declined with the reason.
    train = ConfigRecord({"stage": "decoder", "preset": "tiny", "encoder-sha256": "f" * 64, "server-round": 1,
                          "local-steps": 1, "batch-size": 2, "lr": 1e-3, "weight-decay": 0.0, "model-config": "{}"})
    reply = client_app(_message("train", RecordDict({"config": train, "arrays": ArrayRecord({"w": Array(np.zeros(2, np.float32))})})), context)
    assert reply.has_error() and "does not hold encoder ffffffffffff" in reply.error.reason


def test_site_data_reused_in_a_process_only_while_its_files_are_unchanged(synthetic_cohort, tmp_path: Path) -> None:
    import shutil

    from client.site import SiteRuntime

    site = SiteConfig.from_yaml(synthetic_cohort[0])
    root = tmp_path / "site"
    shutil.copytree(site.data_root, root, ignore=shutil.ignore_patterns("braing3n-cache"))
    for extra in sorted(root.glob("sub-*"))[2:]:  # two subjects keep the preprocessing short
        shutil.rmtree(extra)
    site_yaml = write_yaml(tmp_path / "site.yaml", {**site.to_yaml_dict(), "data_root": str(root),
                                                    "cache_dir": str(root / "derivatives" / "braing3n-cache")})
    runtime = SiteRuntime(SiteConfig.from_yaml(site_yaml))
    first = runtime.data("tiny")
    assert runtime.data("tiny") is first  # nothing changed: no second check
    (root / "derivatives" / "braing3n-cache" / "note.txt").write_text("the site's own writes do not count")
    assert SiteRuntime(SiteConfig.from_yaml(site_yaml)).data("tiny") is first
    assert runtime.data("small") is not first  # another preset is another preprocessing
    removed = first.records[0].path
    removed.unlink()  # a scan disappears between two messages: the site is checked again
    again = runtime.data("tiny")
    assert again is not first and len(again.records) == len(first.records) - 1
    assert removed not in {r.path for r in again.records}


def test_a_site_round_is_reproducible_whatever_the_process_ran_before(synthetic_cohort, tmp_path: Path) -> None:
    """A ClientApp process serves many sites and rounds: the same (seed, stage, round, site) must train to the
    same weights whatever the process's global generators went through before (augmentation draws from them)."""
    import torch

    from braing3n_core.data.datasets import load_site
    from braing3n_core.federation.protocol import RoundParams
    from braing3n_core.federation.site_round import train_site_round
    from braing3n_core.presets import get_preset
    from braing3n_core.training.examples import SiteInputs
    from braing3n_core.training.stages import get_stage

    preset = get_preset("tiny")
    site = SiteConfig.from_yaml(synthetic_cohort[0])
    site = site.model_copy(update={"cache_dir": tmp_path / "cache"})
    inputs = SiteInputs(load_site(site, preset, progress=False))
    stage = get_stage("mae")
    params = RoundParams(stage="mae", server_round=3, local_steps=2, batch_size=2, lr=1e-3, weight_decay=0.0, seed=7)

    def one_round(history: int) -> dict:
        torch.manual_seed(0)
        model = stage.build(preset)  # the same global weights
        torch.randn(history)  # what earlier messages left in this process's generators
        np.random.seed(history)
        arrays, _ = train_site_round(stage, model, inputs, params, torch.device("cpu"))
        return arrays

    first, second = one_round(1), one_round(99)
    assert first.keys() == second.keys()
    for name in first:
        assert np.array_equal(np.asarray(first[name]), np.asarray(second[name])), name


def test_simulation_refuses_more_cores_per_site_than_the_process_may_use(synthetic_cohort, tmp_path: Path) -> None:
    """Ray is given the cores of this process's affinity mask; a site asking for more could never start."""
    from conftest import write_site_yamls

    from braing3n_core.ops.flower import usable_cpus
    from braing3n_core.ops.simulate import simulate

    sites = write_site_yamls(synthetic_cohort, tmp_path / "sites")
    run = write_yaml(tmp_path / "run.yaml", {"name": "cores", "preset": "tiny", "min_sites": 2,
                                             "stages": [{"name": "mae", "rounds": 1, "local_steps": 1}]})
    with pytest.raises(ConfigError, match=rf"cpus_per_site is {usable_cpus() + 1} but this process may use only "):
        simulate(sites, run, tmp_path / "out", cpus_per_site=usable_cpus() + 1, echo=False)
    assert not (tmp_path / "out").exists()  # refused before a run folder or a SuperLink existed


def test_an_earlier_attempts_orphaned_superlink_is_stopped_and_its_flwr_home_removed(tmp_path: Path) -> None:
    """A wrapper killed outright leaves its SuperLink (own session) running and its FLWR_HOME behind; the
    next attempt on the run folder stops that SuperLink (only while its PID is still that process) and
    removes the folder, and refuses to start while another attempt's wrapper is alive."""
    import subprocess
    import tempfile

    from braing3n_core.ops.flower import (
        flower_env,
        free_port,
        kill_process_tree,
        start_superlink,
        started_at,
        wait_for_port,
    )
    from braing3n_core.ops.simulate import HOME_PREFIX, SimulationError, stop_stale_attempt

    home, port = Path(tempfile.mkdtemp(prefix=HOME_PREFIX)), free_port()
    link = start_superlink(flower_env(home), port, tmp_path / "superlink.log", tmp_path)
    other = subprocess.Popen(["sleep", "120"])  # stands for a live wrapper, then for a process reusing a PID
    record = tmp_path / "logs" / "simulation.json"
    record.parent.mkdir()

    def write(**values) -> None:
        record.write_text(json.dumps({"superlink_pid": link.pid, "superlink_started": started_at(link.pid),
                                      "wrapper_pid": 2**22 + 1, "wrapper_started": 1, "flwr_home": str(home)} | values))

    try:
        wait_for_port(port, link, tmp_path / "superlink.log")
        write(wrapper_pid=other.pid, wrapper_started=started_at(other.pid))
        with pytest.raises(SimulationError, match=rf"another braing3n simulate \(PID {other.pid}\) is running"):
            stop_stale_attempt(record)
        write(superlink_pid=other.pid, superlink_started=started_at(other.pid) + 1, flwr_home=str(tmp_path))
        assert stop_stale_attempt(record) == [] and other.poll() is None and tmp_path.is_dir()  # a reused PID
        assert link.poll() is None and home.is_dir()
        write()
        done = stop_stale_attempt(record)
        assert link.wait(timeout=15) is not None and not home.exists()
        assert len(done) == 2 and "SuperLink of an earlier attempt" in done[0] and "FLWR_HOME" in done[1]
        assert stop_stale_attempt(record) == []  # nothing left to do
    finally:
        for process in (link, other):
            if process.poll() is None:
                kill_process_tree(process.pid)
                process.wait()


def test_server_momentum_steps_from_the_given_weights_and_resumes_from_a_checkpoint(monkeypatch) -> None:
    """fedavgm: m ← β·m + (w − w_avg), w ← w − η_s·m; its momentum survives a checkpoint round trip."""
    from flwr.serverapp.strategy import FedAvgM
    from flwr.supercore.task_identity import TaskIdentity

    from braing3n_core.federation.run_config import FedAvgMConfig
    from server.aggregation import as_reference_dtypes, to_array_record

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # what a ServerApp's messages carry
        monkeypatch.setattr(TaskIdentity, name, value)
    config = FedAvgMConfig(name="fedavgm", server_lr=0.5, momentum=0.5)
    start = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}
    site = {"w": np.full((3, 4), -1.0, np.float32), "b": np.full(4, -1.0, np.float32)}  # each round: −1 from start

    def one_round(strategy, server_round: int, weights: dict) -> dict:
        list(strategy.configure_train(server_round, to_array_record(weights), ConfigRecord({}), _NoGrid()))
        replies = [_reply(1, "a", {k: weights[k] + site[k] for k in weights})]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        # as the round loop does: Flower's FedAvgM keeps the record it returns, which this conversion empties
        return as_reference_dtypes(arrays, weights)

    strategy = build_strategy(config, 1)
    assert isinstance(strategy, FedAvgM)
    first = one_round(strategy, 1, start)
    assert np.allclose(first["w"], -0.5)  # m = 1, w = 0 − 0.5·1
    noised = {k: v + 0.25 for k, v in first.items()}  # the round loop changed the global (central DP noise)
    state = strategy_state(strategy)
    assert set(state) == {"momentum.w", "momentum.b"}
    resumed = build_strategy(config, 1)
    restore_strategy_state(resumed, state)
    for run in (strategy, resumed):
        # From the weights it was given (−0.25): m = 0.5·1 + 1 = 1.5, w = −0.25 − 0.5·1.5. Flower's own FedAvgM
        # would step from its last aggregate (−0.5) and land on −1.125.
        second = one_round(run, 2, noised)
        assert np.allclose(second["w"], -1.0) and np.allclose(second["b"], -1.0)


class _NoGrid:
    """configure_train asks the grid which nodes are connected; one is all a unit test needs."""

    def get_node_ids(self):
        return [1]


def test_a_reply_is_checked_one_array_at_a_time_and_the_aggregate_converted_by_consuming_it() -> None:
    """Host memory at `paper` (bench/bench_memory.py): a stage's weights are GBs, so the server reads a reply's
    serialized arrays one at a time (each once: checks and norm in one pass) instead of a second whole copy,
    and converts the aggregate while dropping its serialized arrays."""
    from braing3n_core.federation.arrays import ArraysView
    from server.aggregation import as_reference_dtypes

    reads: list[str] = []

    class Counted:
        def __init__(self, key: str, value: np.ndarray) -> None:
            self.key, self.value = key, value

        def numpy(self) -> np.ndarray:
            reads.append(self.key)
            return self.value.copy()

    reply = {"w": np.full((3, 4), 0.5, np.float32), "b": np.ones(4, np.float32)}
    view = ArraysView({k: Counted(k, v) for k, v in reply.items()})
    assert len(view) == 2 and set(view) == {"w", "b"} and not reads  # keys without reading any array
    reason, norm = check_reply_arrays(view, REFERENCE, 10.0)
    assert reason is None and norm == pytest.approx(update_norm(reply, REFERENCE))
    assert sorted(reads) == ["b", "w"]  # each array read once
    aggregate = ArrayRecord({k: Array(v) for k, v in reply.items()})
    converted = as_reference_dtypes(aggregate, REFERENCE)
    assert len(aggregate) == 0  # the serialized copy is gone
    assert all(np.array_equal(converted[k], reply[k]) and converted[k].dtype == np.float32 for k in reply)


def test_a_site_round_on_cached_tokens_loads_no_encoder(synthetic_cohort, tmp_path: Path) -> None:
    """Host memory (bench/bench_memory.py): a site holds the frozen encoder (0.8 GB at `paper`) only while it
    encodes scans that have no cached tokens — each scan in its first round that needs tokens, and in the DiT's
    first round each follow-up whose crop differs from its baseline's (`TokenCache.pair_tokens`); a round on
    cached tokens does not load it, and an encoder the site does not hold is still refused up front."""
    from braing3n_core.data.tokens import encoder_sha256
    from braing3n_core.federation.arrays import module_arrays
    from braing3n_core.federation.protocol import SiteDeclined
    from braing3n_core.models import MAEConfig, MAEEncoder
    from braing3n_core.presets import get_preset
    from braing3n_core.training.stages import get_stage, stage_dataset
    from client.site import SiteRuntime

    site = SiteConfig.from_yaml(synthetic_cohort[0])
    site_yaml = write_yaml(tmp_path / "site.yaml", {**site.to_yaml_dict(), "cache_dir": str(tmp_path / "cache")})
    runtime = SiteRuntime(SiteConfig.from_yaml(site_yaml))
    encoder = MAEEncoder(MAEConfig.from_preset(get_preset("tiny")))
    sha = encoder_sha256(encoder)
    runtime.install_encoder(sha, module_arrays(encoder), encoder.config.to_dict())
    decoder, dit = get_stage("decoder"), get_stage("dit")
    first = runtime.inputs(decoder, "tiny", sha)
    assert not first.tokens.encoder_loaded
    assert len(stage_dataset(decoder, [first], "train")) > 0  # encodes the scans: the encoder is loaded
    assert first.tokens.encoder_loaded
    first_dit = runtime.inputs(dit, "tiny", sha)
    assert len(stage_dataset(dit, [first_dit], "train")) > 0  # may encode pairs' follow-ups on their baselines' voxels
    again = runtime.inputs(dit, "tiny", sha)
    assert len(stage_dataset(dit, [again], "train")) > 0
    assert not again.tokens.encoder_loaded and again.tokens.encoder_sha256 == sha
    with pytest.raises(SiteDeclined, match="does not hold encoder"):
        runtime.inputs(dit, "tiny", "f" * 64)
