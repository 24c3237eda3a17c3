"""Real Flower simulations (self-started SuperLink, Ray, `braing3n simulate`), not mocks.

Two simulated federations are shared by the assertions below:
- `resumed_run`: 2 sites × `tiny` × mae → probes → decoder → dit, site-a training data-parallel on 2 gloo
  workers (`workers: 2`), site-b in one process. The first attempt is SIGKILLed (the wrapper, the
  SuperLink and everything under it) in the middle of the decoder stage; `--resume` finishes it.
  Checkpoints of rounds completed before the kill must survive byte for byte. In DiT round 1 one of
  site-a's workers is killed (a `worker_crash` drill): site-a declines and the round completes without it.
- `faulty_run`: 8 virtual sites on 2 cores, started from the first run's MAE (`start_from`), decoder
  stage + probes, with injected faults: NaN weights, an oversized update, and two sites dropping out; two
  sites require approval of the jobs they run: site-a-3 approved this one (its Flower bundle hash and recipe)
  and trains, site-b-3 did not and refuses every message before reading any scan.
Every SuperLink started here is killed by PID.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import write_site_yamls

from braing3n_core.checkpoint import load_checkpoint
from braing3n_core.federation.approval_log import ApprovalLog
from braing3n_core.federation.recipe import Recipe
from braing3n_core.federation.run_config import RunConfig
from braing3n_core.fileio import file_sha256
from braing3n_core.ops.flower import APP_DIR, descendants, fab_sha256
from braing3n_core.ops.simulate import simulate
from braing3n_core.site_config import SiteConfig
from braing3n_core.training.checkpoints import load_encoder, load_stage_model

pytestmark = pytest.mark.slow

RUN = {
    "name": "e2e", "preset": "tiny", "seed": 0, "min_sites": 1, "round_timeout_s": 300, "update_norm_bound": 100.0,
    "stages": [
        {"name": "mae", "rounds": 3, "local_steps": 2, "batch_size": 2},
        {"name": "decoder", "rounds": 3, "local_steps": 2, "batch_size": 2, "strategy": {"name": "fedprox", "mu": 0.01}},
        {"name": "dit", "rounds": 2, "local_steps": 2, "batch_size": 4, "strategy": {"name": "fedadam", "eta": 0.001}},
    ],
    "probes": {"enabled": True, "rounds": 2, "local_steps": 10},
    "fault_injection": [{"site": "site-a", "stage": "dit", "kind": "worker_crash", "from_round": 1, "until_round": 1}],
}
CRASHED = ("dit", 1, "site-a")  # the drill's round: site-a declines it
RUN_BATCH = {stage["name"]: stage["batch_size"] for stage in RUN["stages"]}




def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def messages(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "messages.jsonl").read_text().splitlines() if line.strip()]


def kill_hard(wrapper: subprocess.Popen, run_dir: Path) -> None:
    """A crash: SIGKILL the wrapper, then the SuperLink and every process under it (by PID)."""
    link = json.loads((run_dir / "logs" / "simulation.json").read_text())["superlink_pid"]
    tree = [link] + descendants(link)
    os.kill(wrapper.pid, signal.SIGKILL)
    wrapper.wait()
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def resumed_run(synthetic_cohort, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("federated-e2e")
    # Cells of one subject's pairs count towards the DiT's trend here: this small cohort has no cell of 3.
    sites = write_site_yamls(synthetic_cohort, root / "sites", settings={"site-a": {"workers": 2}},
                             privacy={site: {"min_subjects_per_cell": 1} for site in ("site-a", "site-b")})
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(RUN))
    run_dir = root / "run"
    command = [sys.executable, "-m", "braing3n_core.cli", "simulate", "--sites", *map(str, sites),
               "--run-config", str(config), "--out", str(run_dir)]
    started = time.perf_counter()
    wrapper = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        marker = run_dir / "checkpoints" / "decoder" / "round-0001.json"
        deadline = time.monotonic() + 240
        while not marker.is_file() and wrapper.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.is_file(), "the first attempt never reached decoder round 1"
    finally:
        if (run_dir / "logs" / "simulation.json").is_file():
            kill_hard(wrapper, run_dir)
        elif wrapper.poll() is None:
            os.killpg(wrapper.pid, signal.SIGKILL)
    killed_after = time.perf_counter() - started
    committed = {f"{p.parent.name}/{p.name}": file_sha256(p) for p in sorted((run_dir / "checkpoints").glob("*/round-*.safetensors"))}
    committed_rounds = {p.parent.name + "/" + p.stem for p in (run_dir / "checkpoints").glob("*/round-*.json")}
    assert not (run_dir / "run_complete.json").exists()
    first_home = Path(json.loads((run_dir / "logs" / "simulation.json").read_text())["flwr_home"])
    assert first_home.is_dir()  # the killed attempt never reached its clean-up
    resumed_started = time.perf_counter()
    result = simulate(sites, config, run_dir, resume=True, echo=False)
    return {"dir": run_dir, "committed": committed, "committed_rounds": committed_rounds, "result": result,
            "first_home": first_home, "sites": sites,
            "first_seconds": killed_after, "resume_seconds": time.perf_counter() - resumed_started}


def test_all_stages_reach_their_final_round_after_a_kill(resumed_run) -> None:
    run_dir = resumed_run["dir"]
    complete = json.loads((run_dir / "run_complete.json").read_text())
    assert complete["sites"] == ["site-a", "site-b"]
    assert not resumed_run["first_home"].exists()  # the resumed attempt removed the killed one's FLWR_HOME
    state = json.loads((run_dir / "server_state.json").read_text())
    for stage in RUN["stages"]:
        assert state["stages"][stage["name"]] == {"rounds": stage["rounds"], "completed_round": stage["rounds"],
                                                  "done": True, "strategy": stage["strategy"]["name"] if "strategy" in stage else "fedavg"}
        final = load_checkpoint(run_dir / "checkpoints" / stage["name"] / "final.json")
        assert final.meta["round"] == stage["rounds"]
        load_stage_model(run_dir / "checkpoints" / stage["name"] / "final.json", expected_stage=stage["name"])
    assert state["probes"]["done"] and state["probes"]["completed_round"] == 2
    # FedAdam's moments are checkpointed with the DiT weights.
    dit = load_checkpoint(run_dir / "checkpoints/dit/final.json")
    assert any(k.startswith("strategy.m_t.") for k in dit.tensors) and any(k.startswith("strategy.v_t.") for k in dit.tensors)
    # Decoder and DiT checkpoints name the encoder they were trained on: the MAE's.
    encoder = load_encoder(run_dir / "checkpoints/mae/final.json")
    from braing3n_core.data.tokens import encoder_sha256

    assert dit.meta["encoder_sha256"] == encoder_sha256(encoder) == state["encoder_sha256"]


def test_the_dits_trend_is_fitted_from_the_sites_pair_sums(resumed_run) -> None:
    """The DiT's trend buffer is what the sites' pair sums give, fitted on the server before round 1 (computed
    here again from the same scans and encoder), and it travels unchanged with every round's weights."""
    import torch

    from braing3n_core.federation.site_round import site_change_trend
    from braing3n_core.presets import get_preset
    from braing3n_core.site_config import load_site_configs
    from braing3n_core.stage_names import DIT
    from braing3n_core.training.centralized import prepare_sites
    from braing3n_core.training.stages import get_stage

    run_dir = resumed_run["dir"]
    final = load_checkpoint(run_dir / "checkpoints/dit/final.json").tensors
    encoder = load_encoder(run_dir / "checkpoints/mae/final.json")
    preset = get_preset("tiny")
    sites = prepare_sites(load_site_configs(resumed_run["sites"]), preset, get_stage(DIT), encoder, torch.device("cpu"))
    sums = [site_change_trend(get_stage(DIT), site, preset.num_tokens, preset.mae.width) for site in sites]
    merged = sums[0].merge(sums[1])
    assert merged.pairs.sum() > 0, "no longitudinal pairs: the test checks nothing"
    torch.testing.assert_close(final["model.change_trend"], merged.rates(final["model.token_std"]), rtol=1e-4, atol=1e-6)
    assert final["model.change_trend"].abs().sum() > 0
    for round_ in (1, 2):
        rates = load_checkpoint(run_dir / f"checkpoints/dit/round-000{round_}.json").tensors["model.change_trend"]
        assert torch.equal(rates, final["model.change_trend"])
    logged = [r for r in records(run_dir) if r["kind"] == "change_trend"]
    assert len(logged) == 1 and logged[0]["sites"] == 2 and logged[0]["pairs"] == int(merged.pairs.sum())


def test_no_completed_round_was_lost_or_repeated(resumed_run) -> None:
    run_dir = resumed_run["dir"]
    assert "decoder/round-0001" in resumed_run["committed_rounds"] and "mae/round-0003" in resumed_run["committed_rounds"]
    for name, digest in resumed_run["committed"].items():  # rounds done before the kill are untouched
        assert file_sha256(run_dir / "checkpoints" / name) == digest, name
    trains = Counter((r["stage"], r["round"], r["site"]) for r in records(run_dir) if r["kind"] == "train")
    expected = {(s["name"], r, site) for s in RUN["stages"] for r in range(1, s["rounds"] + 1)
                for site in ("site-a", "site-b", "aggregate")} - {CRASHED}
    assert set(trains) - {k for k in trains if k[0] == "probes"} == expected
    assert all(count == 1 for count in trains.values()), trains


def test_metrics_per_site_and_round(resumed_run) -> None:
    lines = records(resumed_run["dir"])
    for line in lines:
        assert {"time", "stage", "round", "site", "kind"} <= set(line)
    evaluations = {(r["stage"], r["round"], r["site"]): r for r in lines if r["kind"] == "evaluate"}
    for stage, metric in (("mae", "val/masked_l1"), ("decoder", "val/psnr"), ("dit", "val/flow_loss")):
        for site in ("site-a", "site-b", "aggregate"):
            assert metric in evaluations[(stage, 2, site)], (stage, site)
    site_a = next(r for r in lines if r["kind"] == "train" and r["site"] == "site-a" and r["stage"] == "decoder")
    assert site_a["num-examples"] > 0 and site_a["train/loss"] > 0 and site_a["train/seconds"] > 0
    assert 0 <= site_a["update_norm"] < 100
    assert {r["lr"] for r in lines if r["kind"] == "train" and r["site"] == "aggregate" and r["stage"] == "mae"} != set()


def test_a_data_parallel_site_and_a_single_process_site_train_every_stage_together(resumed_run) -> None:
    trains = [r for r in records(resumed_run["dir"]) if r["kind"] == "train" and r["stage"] in ("mae", "decoder", "dit")]
    for site, workers in (("site-a", 2.0), ("site-b", 1.0)):
        mine = [r for r in trains if r["site"] == site]
        assert {r["stage"] for r in mine} == {"mae", "decoder", "dit"}
        assert {r["train/workers"] for r in mine} == {workers}, site
        assert all(r["train/examples"] == r["train/steps"] * RUN_BATCH[r["stage"]] for r in mine), site
    assert all(r["train/startup_s"] > 0 for r in trains if r["site"] == "site-a")  # measured per round
    # The drill: a killed worker makes site-a decline with the cause, and the round completes with site-b.
    by = {(r["stage"], r["round"], r["site"], r["kind"]): r for r in records(resumed_run["dir"])}
    reason = by[(*CRASHED, "declined")]["reason"]
    assert "site site-a: data-parallel worker 1" in reason and "was killed by SIGKILL" in reason, reason
    assert by[("dit", 1, "aggregate", "train")]["sites"] == 1
    assert by[("dit", 2, "site-a", "train")]["train/workers"] == 2  # and trains again the next round


def test_encoder_reaches_each_site_once_and_only_weights_cross_the_wire(resumed_run) -> None:
    wire = messages(resumed_run["dir"])
    installs = Counter(m["site"] for m in wire if m["direction"] == "out" and "encoder" in m.get("records", {}))
    assert installs == {"site-a": 1, "site-b": 1}  # across both attempts of the run
    mae_keys = set(load_checkpoint(resumed_run["dir"] / "checkpoints/mae/final.json").sub_state_dict("model"))
    encoder_keys = {k.removeprefix("encoder.") for k in mae_keys if k.startswith("encoder.")}
    for stage in ("decoder", "dit"):
        stage_keys = set(load_checkpoint(resumed_run["dir"] / f"checkpoints/{stage}/final.json").sub_state_dict("model"))
        for message in (m for m in wire if m["stage"] == stage and m["direction"] == "out"):
            arrays = {k for record in message["records"].values() if record["type"] == "arrays" for k in record["arrays"]}
            assert arrays <= stage_keys and not arrays & encoder_keys - stage_keys, message["type"]


def test_probes_run_federated_and_no_raw_data_leaves_a_site(resumed_run) -> None:
    run_dir = resumed_run["dir"]
    probes = json.loads((run_dir / "probes.json").read_text())
    tasks = {t["name"]: t for t in probes["tasks"]}
    assert "age" in tasks and set(probes["sites"]) == {"site-a", "site-b"}
    assert probes["pooled"]["n/age"] == sum(probes["sites"][s]["n/age"] for s in probes["sites"]) > 0
    assert probes["pooled"]["probe/age_mae"] is not None
    lines = [r for r in records(run_dir) if r["kind"] == "probe"]
    assert {r["site"] for r in lines} == {"site-a", "site-b", "aggregate"}
    width = load_encoder(run_dir / "checkpoints/mae/final.json").config.width
    heads = {f"{name}.{p}" for name in tasks for p in
             ("linear.weight", "linear.bias", "feature_mean", "feature_scale", "target_mean", "target_scale", "class_weights")}
    moments = {f"ridge.{label}.{side}.{m}": [shape, "float64"] for label in ("age", "mmse") for side in (f"fold{k}" for k in range(5))
               for m, shape in (("count", [1]), ("sum_x", [width]), ("gram", [width, width]), ("sum_xy", [width]),
                                ("sum_y", [2]))}
    for message in (m for m in messages(run_dir) if m["direction"] == "in" and m["stage"] == "probes" and "records" in m):
        for name, record in message["records"].items():
            if record["type"] != "arrays":
                assert record["type"] in ("config", "metrics")
                continue
            keys = set(record["arrays"])
            # Heads (K x E weights, E-sized statistics) or summed feature statistics: never [n_scans, ...].
            assert keys <= heads or keys == {"count", "total", "total_sq"} | set(moments), keys
            for key, (shape, dtype) in record["arrays"].items():
                assert len(shape) <= 2 and (not shape or shape[-1] in (1, width) or key.endswith(("linear.bias", "class_weights", "target_mean", "target_scale", "count", "sum_y"))), (key, shape)
                if len(shape) == 2 and not key.endswith(".gram"):
                    assert shape[0] == len(tasks[key.split(".")[0]]["classes"]) or shape[0] == 1, (key, shape)
    censuses = [m for m in messages(run_dir) if m["direction"] == "in" and "census" in m.get("records", {}).get("site", {}).get("keys", [])]
    assert {m["site"] for m in censuses} == {"site-a", "site-b"}
    for census in censuses:  # per-site sums over E features (and E x E second moments), never a row per scan
        assert census["records"]["arrays"]["arrays"] == {"count": [[1], "float64"], "total": [[width], "float64"],
                                                         "total_sq": [[width], "float64"], **moments}
    # The age head is the closed-form ridge solved from those moments; only classification heads train in rounds.
    assert set(probes["ridge"]) == {"age", "mmse"} & set(tasks) and probes["ridge"]["age"]["alpha"] > 0
    trained = [m["records"]["arrays"]["arrays"] for m in messages(run_dir) if m["direction"] == "in"
               and m["stage"] == "probes" and m["type"] == "train" and "arrays" in m.get("records", {})]
    assert trained and all(not key.startswith(("age.", "mmse.")) for arrays in trained for key in arrays)


FAULTS = [
    {"site": "site-a-0", "stage": "decoder", "kind": "nan", "from_round": 2, "until_round": 2},
    {"site": "site-b-0", "stage": "decoder", "kind": "scale", "factor": 1.0e6, "from_round": 2, "until_round": 2},
    {"site": "site-a-1", "stage": "decoder", "kind": "decline", "from_round": 3},  # drops out from round 3 on
    {"site": "site-b-1", "stage": "decoder", "kind": "crash", "from_round": 3},  # its handler fails from round 3 on
    {"site": "site-a-2", "stage": "probes", "kind": "nan", "from_round": 1, "until_round": 1},
]


def require_approval(site_yaml: Path, log: Path) -> SiteConfig:
    data = yaml.safe_load(site_yaml.read_text())
    site_yaml.write_text(yaml.safe_dump({**data, "approval": {"required": True, "log": str(log)}}))
    return SiteConfig.from_yaml(site_yaml)


@pytest.fixture(scope="module")
def faulty_run(resumed_run, synthetic_cohort, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("federated-faults")
    sites = write_site_yamls(synthetic_cohort, root / "sites", copies=4)  # 8 virtual sites on 2 cores
    approving, refusing = (require_approval(root / "sites" / f"{s}.yaml", root / "approvals" / f"{s}.jsonl")
                           for s in ("site-a-3", "site-b-3"))
    config = {"name": "faults", "preset": "tiny", "min_sites": 5, "round_timeout_s": 300, "update_norm_bound": 100.0,
              "start_from": {"mae": str(resumed_run["dir"] / "checkpoints/mae/final.json")},
              "stages": [{"name": "decoder", "rounds": 4, "local_steps": 1, "batch_size": 2, "evaluate_every": 0}],
              "probes": {"enabled": True, "rounds": 2, "local_steps": 5}, "fault_injection": FAULTS}
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    # The bundle `simulate`'s `flwr run` submits, as Flower builds it, and this run's recipe.
    approval = ApprovalLog.of(approving).approve(fab_sha256(APP_DIR), Recipe.of(RunConfig.from_yaml(root / "run.yaml")),
                                                 "test")
    started = time.perf_counter()
    result = simulate(sites, root / "run.yaml", root / "run", echo=False)
    return {"dir": result.run_dir, "seconds": time.perf_counter() - started, "approved": approving,
            "approval": approval, "unapproved": refusing}


def test_rejected_and_dropped_sites_do_not_stop_the_federation(faulty_run) -> None:
    lines = records(faulty_run["dir"])
    by = {(r["stage"], r["round"], r["site"], r["kind"]): r for r in lines}
    assert "NaN" in by[("decoder", 2, "site-a-0", "rejected")]["reason"]
    assert "exceeds the bound" in by[("decoder", 2, "site-b-0", "rejected")]["reason"]
    assert by[("decoder", 2, "aggregate", "train")]["sites"] == 5  # 8, less the two above and the unapproved site-b-3
    for server_round in (3, 4):
        assert "declines this round" in by[("decoder", server_round, "site-a-1", "declined")]["reason"]
        assert "handler crashed" in by[("decoder", server_round, "site-b-1", "declined")]["reason"]
        assert by[("decoder", server_round, "aggregate", "train")]["sites"] == 5
    assert "NaN" in by[("probes", 1, "site-a-2", "rejected")]["reason"]
    state = json.loads((faulty_run["dir"] / "server_state.json").read_text())
    assert state["stages"]["decoder"]["completed_round"] == 4 and state["probes"]["done"]
    assert len(state["sites"]) == 7 and "site-b-3" not in state["sites"].values() and "mae" not in state["stages"]
    # Faults were injected on purpose and say so in the ledger.
    assert sum(r["kind"] == "fault_injected" for r in lines) == 2 + 2 + 2 + 1
    # Probes ran by themselves from the given MAE checkpoint: the encoder reached each site once.
    installs = Counter(m["site"] for m in messages(faulty_run["dir"]) if m["direction"] == "out" and "encoder" in m.get("records", {}))
    assert len(installs) == 7 and set(installs.values()) == {1} and "site-b-3" not in installs


def test_an_unapproved_site_refuses_the_job_before_reading_any_scan_while_an_approved_one_trains(faulty_run) -> None:
    from braing3n_core.federation.run_status import run_status
    from braing3n_core.federation.site_status import site_snapshot

    lines = records(faulty_run["dir"])
    refusing = faulty_run["unapproved"]
    refused = [r for r in lines if r["site"] == "site-b-3"]
    assert refused and {r["kind"] for r in refused} == {"declined"}
    assert {(r["stage"], r["round"]) for r in refused} >= {("setup", 0), *{("decoder", n) for n in range(1, 5)},
                                                           ("probes", 1), ("probes", 2)}
    assert all(r["reason"].startswith(f"site site-b-3: job not approved: no approval in {refusing.approval_log_path} "
                                      "for the app") for r in refused)
    # Before any scan is read: its cache holds its journal and nothing else (no check verdict, no volume, no token).
    assert sorted(p.name for p in refusing.resolved_cache_dir.iterdir()) == ["activity.jsonl"]
    journal = site_snapshot(refusing, recent=100)
    assert journal.answered == journal.declined > 0 and all("job not approved" in e.reason for e in journal.recent)
    status = run_status(faulty_run["dir"]).site("site-b-3")
    assert status.state == "declined" and "job not approved" in status.reason
    # The approved site ran every round of the recipe it approved, with the app Flower submitted.
    trained = {r["round"] for r in lines if r["site"] == "site-a-3" and r["kind"] == "train" and r["stage"] == "decoder"}
    assert trained == {1, 2, 3, 4} and faulty_run["approval"].active
    assert not [r for r in lines if r["site"] == "site-a-3" and r["kind"] == "declined"]


def test_a_round_without_enough_sites_stops_the_run_resumably(synthetic_cohort, tmp_path: Path) -> None:
    from braing3n_core.ops.simulate import SimulationError

    sites = write_site_yamls(synthetic_cohort, tmp_path / "sites")
    faults = [{"site": s, "stage": "mae", "kind": "decline", "from_round": 2} for s in ("site-a", "site-b")]
    config = {"name": "stops", "preset": "tiny", "min_sites": 1, "fault_injection": faults,
              "stages": [{"name": "mae", "rounds": 3, "local_steps": 1, "batch_size": 2, "evaluate_every": 0}]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SimulationError) as raised:
        simulate(sites, tmp_path / "run.yaml", tmp_path / "run", echo=False)
    assert "FederationError" in str(raised.value) and "0 accepted replies, min_sites is 1" in str(raised.value)
    assert "--resume" in str(raised.value)
    state = json.loads((tmp_path / "run" / "server_state.json").read_text())
    assert state["stages"]["mae"]["completed_round"] == 1 and not state["stages"]["mae"]["done"]
    assert not (tmp_path / "run" / "run_complete.json").exists()
    assert {r["site"] for r in records(tmp_path / "run") if r["kind"] == "declined" and r["round"] == 2} == {"site-a", "site-b"}
