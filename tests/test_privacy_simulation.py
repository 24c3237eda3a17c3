"""Privacy layers in real Flower simulations (self-started SuperLink, Ray, `braing3n simulate`).

- `dp_run`: 2 sites × `tiny` × mae → decoder → dit, both sites training with subject-level DP-SGD and
  the server adding client-level DP to the decoder and DiT. site-b's ε budget is set (from an
  independent accountant) so that exactly its DiT round 2 would exceed it: it must decline that round
  and the federation must finish without it. `braing3n synthesize` then runs on the finished run with a
  copy of a training scan planted in the synthetic set: the federated audit must exclude it.
- `secure_run`: 4 sites, the MAE stage aggregated with SecAgg+ and client-side clipping + central noise;
  one site drops out of round 2 (SecAgg+ must recover its masks) and no reply carries plaintext weights.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import write_site_yamls

from braing3n_core.checkpoint import load_checkpoint
from braing3n_core.data.datasets import load_site
from braing3n_core.data.transforms import preprocess_scan
from braing3n_core.federation.site_round import site_ledger
from braing3n_core.ops.simulate import simulate
from braing3n_core.presets import get_preset
from braing3n_core.privacy.dp import default_delta
from braing3n_core.privacy.ledger import Release
from braing3n_core.site_config import SiteConfig

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]
TINY = get_preset("tiny")
STAGES = [
    {"name": "mae", "rounds": 2, "local_steps": 2, "batch_size": 2, "evaluate_every": 0},
    {"name": "decoder", "rounds": 1, "local_steps": 2, "batch_size": 2},
    {"name": "dit", "rounds": 2, "local_steps": 2, "batch_size": 4, "evaluate_every": 0},
]
CLIENT_DP = {"enabled": True, "side": "server", "clipping": "fixed", "noise_multiplier": 0.8, "clipping_norm": 2.0,
             "stages": ["decoder", "dit"]}




def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def rdp_epsilon(releases: list[tuple[float, float, int]], delta: float) -> float:
    """The site accountant's number, recomputed with Opacus' own RDPAccountant (history = (σ, q, steps))."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(releases)
    return float(accountant.get_epsilon(delta=delta))


def planned(n_subjects: int) -> list[tuple[float, float, int]]:
    """σ = 1 (the default stage setting), q = batch / n, per round of STAGES."""
    return [(1.0, min(1.0, s["batch_size"] / n_subjects), s["local_steps"]) for s in STAGES for _ in range(s["rounds"])]


@pytest.fixture(scope="module")
def dp_run(synthetic_cohort, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("privacy-e2e")
    b_config = SiteConfig.from_yaml(synthetic_cohort[1])
    n_b = len({r.subject for r in load_site(b_config.model_copy(update={"cache_dir": root / "probe-cache"}), TINY,
                                                progress=False).splits["train"]})
    steps = planned(n_b)
    delta_b = default_delta(n_b)
    before, after = rdp_epsilon(steps[:-1], delta_b), rdp_epsilon(steps, delta_b)  # after DiT round 1 / round 2
    budget_b = (before + after) / 2
    sites = write_site_yamls(synthetic_cohort, root / "sites", {
        "site-a": {"enabled": True, "epsilon_budget": 1000.0},
        "site-b": {"enabled": True, "epsilon_budget": budget_b},
    })
    config = {"name": "dp", "preset": "tiny", "seed": 0, "min_sites": 1, "round_timeout_s": 600,
              "update_norm_bound": 1000.0, "stages": STAGES, "client_dp": CLIENT_DP}
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    result = simulate(sites, root / "run.yaml", root / "run", echo=False)
    return {"dir": result.run_dir, "sites": sites, "budget_b": budget_b, "n_b": n_b, "seconds": result.seconds}


def test_dp_sgd_runs_in_all_three_stages_and_epsilon_matches_the_accountant(dp_run) -> None:
    run_dir = dp_run["dir"]
    assert (run_dir / "run_complete.json").is_file()
    lines = records(run_dir)
    site_a = [r for r in lines if r["kind"] == "train" and r["site"] == "site-a"]
    incidents = [r for r in lines if r["site"] == "site-a" and r["kind"] in ("declined", "rejected")]
    assert [(r["stage"], r["round"]) for r in site_a] == [("mae", 1), ("mae", 2), ("decoder", 1), ("dit", 1), ("dit", 2)], incidents
    config = SiteConfig.from_yaml(dp_run["sites"][0])
    ledger = site_ledger(config).entries()  # the ledger on site-a's own disk
    assert [e.release.stage for e in ledger] == ["mae", "mae", "decoder", "dit", "dit"]
    history = [e.release.history_item for e in ledger]
    for k, record in enumerate(site_a, start=1):
        assert record["privacy/epsilon"] == pytest.approx(rdp_epsilon(history[:k], ledger[0].delta), rel=1e-9)
        assert record["privacy/noise_multiplier"] == 1.0 and record["privacy/max_grad_norm"] == 1.0
    assert all(b["privacy/epsilon"] > a["privacy/epsilon"] for a, b in itertools.pairwise(site_a))


def test_site_over_budget_declines_and_the_federation_finishes_without_it(dp_run) -> None:
    lines = records(dp_run["dir"])
    declined = [r for r in lines if r["kind"] == "declined" and r["site"] == "site-b"]
    assert [(r["stage"], r["round"]) for r in declined] == [("dit", 2)]
    assert "privacy budget reached: dit round 2 would raise ε" in declined[0]["reason"]
    trained_b = [r for r in lines if r["kind"] == "train" and r["site"] == "site-b"]
    assert trained_b[-1]["stage"] == "dit" and trained_b[-1]["round"] == 1
    assert trained_b[-1]["privacy/epsilon"] <= dp_run["budget_b"]
    ledger_b = site_ledger(SiteConfig.from_yaml(dp_run["sites"][1])).entries()
    assert len(ledger_b) == 4 and ledger_b[-1].epsilon_after == pytest.approx(trained_b[-1]["privacy/epsilon"])
    next_release = Release("dit", 2, min(1.0, 4 / dp_run["n_b"]), 1.0, 2, 1.0, dp_run["n_b"])
    assert rdp_epsilon([e.release.history_item for e in ledger_b] + [next_release.history_item], ledger_b[0].delta) > dp_run["budget_b"]
    aggregate = {(r["stage"], r["round"]): r for r in lines if r["kind"] == "train" and r["site"] == "aggregate"}
    assert aggregate[("dit", 1)]["sites"] == 2 and aggregate[("dit", 2)]["sites"] == 1
    state = json.loads((dp_run["dir"] / "server_state.json").read_text())
    assert all(state["stages"][s["name"]]["done"] for s in STAGES)


def test_client_level_dp_epsilon_and_untouched_token_statistics(dp_run) -> None:
    import dp_accounting

    lines = [r for r in records(dp_run["dir"]) if r["kind"] == "client_dp"]
    assert [(r["stage"], r["round"]) for r in lines] == [("decoder", 1), ("dit", 1), ("dit", 2)]
    for k, record in enumerate(lines, start=1):
        accountant = dp_accounting.rdp.RdpAccountant()
        accountant.compose(dp_accounting.GaussianDpEvent(CLIENT_DP["noise_multiplier"]), k)
        assert record["privacy/epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-6)
    # The accountant state rides in the checkpoints, so a resumed run would continue from it.
    final = load_checkpoint(dp_run["dir"] / "checkpoints/dit/final.json")
    assert final.meta["client_dp"]["accountant"]["compositions"][0]["count"] == 1
    assert len(final.meta["client_dp"]["accountant"]["compositions"]) == 3
    # Noise goes on trained weights only: the DiT's token statistics are the same after every round.
    rounds = [load_checkpoint(dp_run["dir"] / f"checkpoints/dit/round-000{r}.json") for r in (1, 2)]
    for name in ("model.token_mean", "model.token_std"):
        assert torch.equal(rounds[0].tensors[name], rounds[1].tensors[name])
    assert bool((rounds[1].tensors["model.token_std"] > 0).all())
    # Under client-level DP the sites are not asked for the trend's pair sums (they would be released outside ε).
    assert float(rounds[1].tensors["model.change_trend"].abs().sum()) == 0.0
    assert not [r for r in records(dp_run["dir"]) if r["kind"] == "change_trend"]


def test_privacy_figure_draws_every_site(dp_run) -> None:
    from braing3n_core.jobs.report_figures import privacy_figure, privacy_series

    series = privacy_series(dp_run["dir"])
    assert set(series["sites"]) == {"site-a", "site-b"} and series["declined"]["site-b"] == [5]
    assert len(series["client"]) == 3
    path = privacy_figure(dp_run["dir"])
    assert path is not None and path.stat().st_size > 10_000


def test_report_of_a_dp_run_places_its_epsilon_on_the_measured_privacy_utility_curve(dp_run) -> None:
    from braing3n_core.jobs.report import PRIVACY_UTILITY, write_report

    assert PRIVACY_UTILITY.is_file(), "bench/results/privacy_utility.json (bench/bench_privacy_utility.py) is committed"
    from braing3n_core.federation.run_folder import RunFolder

    page = write_report(dp_run["dir"]).read_text()
    assert "What this ε costs and buys" in page and "privacy_utility.png" in page
    figure = RunFolder(dp_run["dir"]).figures_dir / "privacy_utility.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 20_000


def test_synthesize_exports_audited_bids_and_excludes_a_planted_training_copy(dp_run, tmp_path: Path) -> None:
    from bids_validator import BIDSValidator

    from braing3n_core.jobs.synthesize import synthesize

    site_a = SiteConfig.from_yaml(dp_run["sites"][0])
    data = load_site(site_a, TINY, progress=False)
    copy = torch.from_numpy(preprocess_scan(data.splits["train"][0].path, TINY, data.cache))
    result = synthesize(dp_run["dir"], n=4, out=tmp_path / "synthetic", sites=dp_run["sites"], steps=3, plant={2: copy})
    assert 2 in result.excluded and result.exported == 4 - len(result.excluded)
    validator = BIDSValidator()
    files = sorted(p for p in result.bids.rglob("*") if p.is_file())
    assert sum(p.name.endswith(".nii.gz") for p in files) == result.exported
    for path in files:
        assert validator.is_bids("/" + str(path.relative_to(result.bids))), path
    card = json.loads(result.datacard.read_text())
    lines = records(dp_run["dir"])
    last = {r["site"]: r["privacy/epsilon"] for r in lines if r["kind"] == "train" and "privacy/epsilon" in r}
    assert {s: v["epsilon"] for s, v in card["privacy"]["site_level"].items()} == last
    assert card["privacy"]["site_level"]["site-b"]["declined"] == "dit round 2"
    assert card["privacy"]["client_level"]["releases"] == 3
    assert set(card["models"]) == {"dit", "decoder", "mae"} and all(len(m["sha256"]) == 64 for m in card["models"].values())
    audit = card["audit"]
    assert audit["positive_controls_caught"] == audit["calibrated_sites"] == 2
    assert 0.0 <= audit["membership_auc"] <= 1.0 and audit["membership_auc"] == audit["membership"]["dit"]["auc"]
    for attack in ("dit", "mae"):  # both loss-threshold attacks, pooled over the two sites with an interval
        pooled = audit["membership"][attack]
        assert pooled["sites"] == 2 and pooled["ci95"][0] <= pooled["auc"] <= pooled["ci95"][1]
    assert "MAE loss threshold" in (tmp_path / "synthetic" / "datacard.md").read_text()
    assert card["conditions"]["generated"]["diagnosis"] == {"AD": 1, "CN": 1, "MCI": 1, "glioma": 1}
    assert (tmp_path / "synthetic" / "datacard.md").read_text().count("| site-") == 2
    # The audit crossed the wire as a query: volumes out, aggregates and flags back, no arrays.
    wire = [json.loads(line) for line in (tmp_path / "synthetic/audit-run/messages.jsonl").read_text().splitlines()]
    back = [m for m in wire if m["direction"] == "in" and m["stage"] == "audit" and "records" in m]
    assert back and all(r["type"] != "arrays" or not r["arrays"] for m in back for r in m["records"].values())


@pytest.fixture(scope="module")
def secure_run(synthetic_cohort, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("secure-e2e")
    sites = write_site_yamls(synthetic_cohort, root / "sites", copies=2)  # site-a-0, site-b-0, site-a-1, site-b-1
    config = {"name": "secure", "preset": "tiny", "min_sites": 3, "round_timeout_s": 600, "update_norm_bound": 100.0,
              "stages": [{"name": "mae", "rounds": 2, "local_steps": 1, "batch_size": 2, "evaluate_every": 0}],
              "secure_aggregation": {"enabled": True, "clipping_range": 1.0},
              "client_dp": {"enabled": True, "side": "client", "clipping": "fixed", "noise_multiplier": 0.05,
                            "clipping_norm": 1.0},
              "fault_injection": [{"site": "site-b-1", "stage": "mae", "kind": "decline", "from_round": 2}]}
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    result = simulate(sites, root / "run.yaml", root / "run", echo=False)
    return {"dir": result.run_dir, "seconds": result.seconds}


def test_secure_aggregation_server_sees_only_the_sum(secure_run) -> None:
    run_dir = secure_run["dir"]
    lines = records(run_dir)
    aggregate = {r["round"]: r for r in lines if r["kind"] == "train" and r["site"] == "aggregate"}
    assert aggregate[1]["secure_aggregation"] and aggregate[1]["sites"] == 4
    assert aggregate[2]["sites"] == 3  # site-b-1 dropped out; SecAgg+ removed its masks from the sum
    assert any("declines this round" in r.get("reason", "") for r in lines if r["kind"] == "declined" and r["round"] == 2)
    trained = {(r["round"], r["site"]) for r in lines if r["kind"] == "train" and r["site"] != "aggregate"}
    assert {s for r, s in trained if r == 2} == {"site-a-0", "site-b-0", "site-a-1"}
    wire = [json.loads(line) for line in (run_dir / "messages.jsonl").read_text().splitlines()]
    secure = [m for m in wire if m.get("secure_aggregation")]
    replies = [m for m in secure if m["direction"] == "in" and "records" in m]
    assert len(replies) >= 4 * 4  # four protocol steps per site per round
    for reply in replies:  # masked vectors travel as bytes in a ConfigRecord; no reply holds weights
        assert all(r["type"] != "arrays" or r["bytes"] == 0 for r in reply["records"].values()), reply
        assert "secaggplus_configs" in reply["records"]
    client_dp = [r for r in lines if r["kind"] == "client_dp"]
    assert [r["round"] for r in client_dp] == [1, 2] and client_dp[1]["privacy/epsilon"] > client_dp[0]["privacy/epsilon"]
    rounds = [load_checkpoint(run_dir / f"checkpoints/mae/round-000{r}.json").sub_state_dict("model") for r in (1, 2)]
    assert all(np.isfinite(v.numpy()).all() for v in rounds[1].values())
    assert any(not torch.equal(rounds[0][k], rounds[1][k]) for k in rounds[0])
