"""Site-level privacy on real data: per-subject clipping in Opacus' per-sample gradients, the ledger's ε
against independent accountants, crash safety (a torn write; a client killed with SIGKILL mid-run), the
hard budget, the memorisation audit with planted copies, and the client's `privacy_audit` query."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from braing3n_core.config import ConfigError
from braing3n_core.data.datasets import load_site
from braing3n_core.data.tokens import TokenCache
from braing3n_core.data.transforms import preprocess_scan
from braing3n_core.federation.arrays import module_arrays
from braing3n_core.federation.protocol import RoundParams, SiteDeclined
from braing3n_core.federation.run_config import RunConfig
from braing3n_core.federation.site_round import site_ledger, train_site_round
from braing3n_core.models import MAEConfig, MaskedAutoencoder
from braing3n_core.presets import get_preset
from braing3n_core.privacy.audit import (
    BOOTSTRAP,
    audit_site,
    mae_losses,
    membership_auc,
    membership_result,
    pooled_membership,
    pooled_membership_auc,
    run_site_audit,
)
from braing3n_core.privacy.dp import (
    DPRound,
    SubjectPoissonSampler,
    default_delta,
    example_subjects,
    make_private,
    resolve_round,
    subject_loader,
)
from braing3n_core.privacy.ledger import LedgerError, PrivacyBudgetExceeded, PrivacyLedger, Release, epsilon_of
from braing3n_core.site_config import SiteConfig
from braing3n_core.training.examples import SiteInputs, token_moments
from braing3n_core.training.stages import get_stage, stage_dataset

TINY = get_preset("tiny")
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing", "ignore:Secure RNG turned off")


def site_yaml(source: Path, folder: Path, privacy: dict | None = None) -> Path:
    site = SiteConfig.from_yaml(source)
    data = {**site.to_yaml_dict(), "cache_dir": str(folder / "cache" / site.site_id)}
    if privacy is not None:
        data["privacy"] = privacy
    path = folder / f"{site.site_id}.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def site(synthetic_cohort, tmp_path_factory) -> SiteInputs:
    """site-a with a token cache of a (seeded, untrained) tiny encoder: every stage's dataset is real."""
    folder = tmp_path_factory.mktemp("privacy-site")
    config = SiteConfig.from_yaml(site_yaml(synthetic_cohort[0], folder))
    data = load_site(config, TINY, progress=False)
    torch.manual_seed(0)
    encoder = MaskedAutoencoder(MAEConfig.from_preset(TINY)).encoder
    return SiteInputs(data, TokenCache(config.resolved_cache_dir, encoder, TINY, data.cache))


# --- per-subject sampling and clipping -----------------------------------------------------------------------


def test_dit_examples_are_grouped_by_subject_and_a_batch_holds_a_subject_once(site) -> None:
    dataset = stage_dataset(get_stage("dit"), [site], "train")
    subjects = example_subjects(dataset)
    assert len(dataset.pairs) > 0 and len(subjects) == len(dataset) > len(set(subjects))  # pairs + sessions + modalities
    sampler = SubjectPoissonSampler([[0, 1, 2], [3], [4, 5]], sample_rate=0.5, steps=400,
                                    generator=torch.Generator().manual_seed(0))
    batches = list(sampler)
    groups = {0: 0, 1: 0, 2: 0, 3: 1, 4: 2, 5: 2}
    assert all(len({groups[i] for i in b}) == len(b) for b in batches)  # never two examples of one subject
    assert any(len(b) == 0 for b in batches) and any(len(b) == 3 for b in batches)  # Poisson batch sizes
    assert abs(np.mean([len(b) for b in batches]) - 1.5) < 0.2  # E[|B|] = q · n


@pytest.mark.parametrize("stage_name", ["mae", "decoder", "dit"])
def test_per_sample_gradients_are_clipped_to_the_bound_before_noise(site, stage_name: str) -> None:
    stage = get_stage(stage_name)
    dataset = stage_dataset(stage, [site], "train")
    torch.manual_seed(0)
    model = stage.build(TINY)
    if stage_name == "dit":
        model.set_token_statistics(*token_moments(dataset, model.config.token_dim).mean_std())
    bound = 1e-3  # far below every per-sample gradient norm, so every sample is clipped
    settings = DPRound(Release(stage_name, 1, 1.0, 1.0, 1, bound, len(set(example_subjects(dataset)))), 1e-5)
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), settings)
    batch = next(iter(subject_loader(dataset, sample_rate=1.0, steps=1)))  # every subject, one example each
    loss, _ = stage.loss(model, batch, torch.Generator().manual_seed(0))
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    samples = [p.grad_sample.detach().clone() for p in params]  # Opacus' per-sample gradients, [B, *shape]
    size = samples[0].shape[0]
    assert size == settings.release.subjects
    for p, g in zip(params, samples):  # they are the real per-sample gradients of the mean loss
        torch.testing.assert_close(g.sum(0) / size, p.grad, atol=1e-6, rtol=1e-3)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in samples], dim=1).norm(dim=1)  # [B]
    assert bool((norms > bound).all())
    private.optimizer.clip_and_accumulate()  # the clipping step, before any noise
    factors = (bound / (norms + 1e-6)).clamp(max=1.0)
    for p, g in zip(params, samples):
        torch.testing.assert_close(p.summed_grad, torch.einsum("i,i...", factors, g), atol=1e-9, rtol=1e-5)
    clipped = norms * factors
    assert bool((clipped <= bound * (1 + 1e-5)).all())
    total = torch.cat([p.summed_grad.flatten() for p in params]).norm()
    assert float(total) <= size * bound * (1 + 1e-5)  # a subject moves the sum by at most C
    private.close()
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_conv3d_per_sample_gradients_match_opacus_unfold_sampler() -> None:
    from opacus.grad_sample.conv import compute_conv_grad_sample

    from braing3n_core.privacy.dp import conv3d_grad_sample

    generator = torch.Generator().manual_seed(0)
    layers = (torch.nn.Conv3d(3, 4, 3, padding=1), torch.nn.Conv3d(4, 2, 3, stride=2, dilation=1, padding=1),
              torch.nn.Conv3d(4, 6, 3, padding=2, dilation=2, groups=2))
    for layer in layers:
        for batch in (1, 5):
            for layout in (torch.contiguous_format, torch.channels_last_3d):  # the decoder's maps are NDHWC
                x = torch.randn(batch, layer.in_channels, 8, 10, 6, generator=generator)
                g = torch.randn(batch, layer.out_channels, *layer(x).shape[2:], generator=generator)
                x, g = x.contiguous(memory_format=layout), g.contiguous(memory_format=layout)
                ours, theirs = conv3d_grad_sample(layer, [x], g), compute_conv_grad_sample(layer, [x], g)
                for param in (layer.weight, layer.bias):
                    torch.testing.assert_close(ours[param], theirs[param], atol=1e-4, rtol=1e-4)
    empty = conv3d_grad_sample(layers[0], [torch.zeros(0, 3, 8, 10, 6)], torch.zeros(0, 4, 8, 10, 6))
    assert empty[layers[0].weight].shape == (0, *layers[0].weight.shape)


def test_an_empty_poisson_draw_still_steps_with_noise_only(site) -> None:
    stage = get_stage("mae")
    torch.manual_seed(0)
    model = stage.build(TINY)
    settings = DPRound(Release("mae", 1, 0.5, 2.0, 1, 1.0, 4), 1e-5)
    private = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), settings)
    before = [p.detach().clone() for p in model.parameters()]
    from braing3n_core.training.loop import train_steps

    result = train_steps(stage, model, iter([{}]), private.optimizer, 1, lambda _: 1.0, torch.device("cpu"),
                         max_grad_norm=None)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    # Noise only: std σ·C / E[|B|] = 2 / 2 per coordinate, times lr 1.
    assert result.examples == 0 and 0.8 < float(moved.std()) < 1.2
    private.close()


# --- the ledger -------------------------------------------------------------------------------------------------

RELEASES = [
    Release("mae", 1, 0.5, 1.0, 4, 1.0, 8, "r"), Release("mae", 2, 0.5, 1.0, 4, 1.0, 8, "r"),
    Release("decoder", 1, 0.25, 1.3, 10, 0.5, 8, "r"), Release("dit", 1, 1.0, 2.0, 3, 1.0, 8, "r2"),
]


def test_ledger_epsilon_matches_independent_accountants(tmp_path: Path) -> None:
    import dp_accounting
    from opacus.accountants.analysis import rdp as opacus_rdp

    ledger = PrivacyLedger(tmp_path / "ledger.jsonl", "site-x")
    for release in RELEASES:
        entry = ledger.record(release, 1e-5)
    assert entry.epsilon_after == pytest.approx(ledger.epsilon())
    # Google's dp_accounting: Poisson-subsampled Gaussian, composed step by step, its own RDP orders.
    accountant = dp_accounting.rdp.RdpAccountant()
    for release in RELEASES:
        event = dp_accounting.PoissonSampledDpEvent(release.sample_rate, dp_accounting.GaussianDpEvent(release.noise_multiplier))
        accountant.compose(event, release.steps)
    assert ledger.epsilon() == pytest.approx(accountant.get_epsilon(1e-5), rel=0.03)
    # Opacus' RDP analysis summed by hand over the same orders: the same number.
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = sum(opacus_rdp.compute_rdp(q=r.sample_rate, noise_multiplier=r.noise_multiplier, steps=r.steps, orders=orders)
              for r in RELEASES)
    assert ledger.epsilon() == pytest.approx(opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)[0], rel=1e-9)
    # One accountant over everything: the composition is far below the sum of per-round ε.
    assert ledger.epsilon() < sum(epsilon_of([r], 1e-5) for r in RELEASES)
    prv = PrivacyLedger(tmp_path / "prv.jsonl", "site-x", accountant="prv")
    for release in RELEASES:
        prv.record(release, 1e-5)
    assert prv.epsilon() == pytest.approx(ledger.epsilon(), rel=0.15)  # PRV is tighter, not different in kind


def test_ledger_survives_a_torn_write_and_refuses_a_tampered_one(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(path, "site-x")
    for release in RELEASES[:3]:
        ledger.record(release, 1e-5)
    whole = path.read_bytes()
    line = ledger.entries()[-1].line()
    with open(path, "ab") as handle:  # the process died in the middle of writing a fourth entry
        handle.write(line[: len(line) // 2])
    restarted = PrivacyLedger(path, "site-x")
    assert len(restarted.entries()) == 3 and restarted.epsilon() == pytest.approx(epsilon_of(RELEASES[:3], 1e-5))
    entry = restarted.record(RELEASES[3], 1e-5)  # the torn bytes are dropped, the chain continues
    assert path.read_bytes().startswith(whole) and len(restarted.entries()) == 4
    assert entry.epsilon_after == pytest.approx(epsilon_of(RELEASES, 1e-5))
    # An edited line in the middle cannot be repaired: the site must not train on an unknown ε.
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('"steps": 4', '"steps": 1')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerError, match=r"ledger.jsonl: line 2 is corrupt"):
        restarted.epsilon()
    path.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # a deleted entry breaks the chain
    with pytest.raises(LedgerError, match="hash chain broken"):
        restarted.epsilon()


def test_ledger_pins_delta_and_site(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl", "site-x")
    ledger.record(RELEASES[0], 1e-5)
    assert ledger.resolve_delta(None, 1e-7) == 1e-5  # the pinned δ wins over a new default
    with pytest.raises(LedgerError, match="δ=1e-06 but this ledger was started at δ=1e-05"):
        ledger.resolve_delta(1e-6, 1e-7)
    with pytest.raises(LedgerError, match="belongs to site 'site-x'"):
        PrivacyLedger(tmp_path / "ledger.jsonl", "site-y").epsilon()
    assert default_delta(20) == 1e-5 and default_delta(10**6) == pytest.approx(1e-7)


def test_budget_check_refuses_before_recording(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl", "site-x")
    now, after = ledger.check(RELEASES[0], 1e-5, budget=100.0)
    assert now == 0.0 and after == pytest.approx(epsilon_of(RELEASES[:1], 1e-5))
    ledger.record(RELEASES[0], 1e-5)
    with pytest.raises(PrivacyBudgetExceeded, match=r"mae round 2 would raise ε from"):
        ledger.check(RELEASES[1], 1e-5, budget=after + 0.1)
    with pytest.raises(PrivacyBudgetExceeded):
        ledger.record(RELEASES[1], 1e-5, budget=after + 0.1)
    assert len(ledger.entries()) == 1


# --- DP rounds on a real site: budget stop, restart after SIGKILL ----------------------------------------------


def dp_site(source: Path, folder: Path, budget: float) -> SiteInputs:
    config = SiteConfig.from_yaml(site_yaml(source, folder, {"enabled": True, "epsilon_budget": budget,
                                                             "stages": {"mae": {"noise_multiplier": 1.2}}}))
    return SiteInputs(load_site(config, TINY, progress=False))


def mae_round(server_round: int) -> RoundParams:
    return RoundParams(stage="mae", server_round=server_round, local_steps=2, batch_size=2, lr=1e-3, weight_decay=0.05, seed=0,
                       rounds=10, run="test")


def test_budget_stops_the_site_at_the_round_that_would_exceed_it(synthetic_cohort, tmp_path: Path) -> None:
    site = dp_site(synthetic_cohort[0], tmp_path, budget=1e9)
    subjects = len({r.subject for r in site.data.splits["train"]})
    release = Release("mae", 1, min(1.0, 2 / subjects), 1.2, 2, 1.0, subjects)
    per_round = [epsilon_of([release] * k, default_delta(subjects)) for k in (1, 2, 3, 4)]
    budget = (per_round[2] + per_round[3]) / 2  # room for exactly three rounds
    site = dp_site(synthetic_cohort[0], tmp_path, budget=budget)
    stage = get_stage("mae")
    for server_round in (1, 2, 3):
        model = stage.build(TINY)
        arrays, metrics = train_site_round(stage, model, site, mae_round(server_round), torch.device("cpu"))
        assert set(arrays) == set(module_arrays(stage.build(TINY)))  # unwrapped: no `_module.` prefix
        assert metrics["privacy/epsilon"] == pytest.approx(per_round[server_round - 1])
    with pytest.raises(SiteDeclined, match=r"privacy budget reached: mae round 4 would raise ε from [0-9.]+ to"):
        train_site_round(stage, stage.build(TINY), site, mae_round(4), torch.device("cpu"))
    assert len(site_ledger(site.data.config).entries()) == 3


CHILD = textwrap.dedent("""
    import sys, torch
    from braing3n_core.data.datasets import load_site
    from braing3n_core.federation.protocol import RoundParams
    from braing3n_core.federation.site_round import train_site_round
    from braing3n_core.presets import get_preset
    from braing3n_core.site_config import SiteConfig
    from braing3n_core.training.examples import SiteInputs
    from braing3n_core.training.stages import get_stage
    torch.set_num_threads(1)
    site = SiteInputs(load_site(SiteConfig.from_yaml(sys.argv[1]), get_preset("tiny"), progress=False))
    stage = get_stage("mae")
    for server_round in range(1, 1000):
        train_site_round(stage, stage.build(get_preset("tiny")), site,
                         RoundParams(stage="mae", server_round=server_round, local_steps=2, batch_size=2, lr=1e-3,
                                     weight_decay=0.05, rounds=10, run="child"), torch.device("cpu"))
""")


@pytest.mark.slow
def test_ledger_survives_a_client_killed_mid_run(synthetic_cohort, tmp_path: Path) -> None:
    site = dp_site(synthetic_cohort[0], tmp_path, budget=1e9)
    ledger = site_ledger(site.data.config)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(site.data.config.source_file)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            if ledger.path.is_file() and len(ledger.path.read_bytes().splitlines()) >= 2:
                break
            time.sleep(0.02)
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        time.sleep(0.3)  # somewhere inside the next round: training, or writing its entry
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    entries = PrivacyLedger(ledger.path, site.data.config.site_id).entries()  # a fresh "process" reads it
    assert len(entries) >= 2
    assert entries[-1].epsilon_after == pytest.approx(epsilon_of([e.release for e in entries], entries[0].delta))
    stage = get_stage("mae")
    _, metrics = train_site_round(stage, stage.build(TINY), site, mae_round(99), torch.device("cpu"))
    after = ledger.entries()
    assert len(after) == len(entries) + 1 and after[-1].release.run == "test"
    assert metrics["privacy/epsilon"] == pytest.approx(epsilon_of([e.release for e in after], entries[0].delta))


def test_target_epsilon_is_spread_over_the_stage_schedule() -> None:
    from braing3n_core.site_config import SitePrivacyConfig

    config = SitePrivacyConfig(enabled=True, stages={"dit": {"target_epsilon": 3.0}})
    settings = resolve_round(config, "dit", 1, subjects=40, batch_size=8, local_steps=5, total_rounds=6, delta=1e-5)
    assert settings.release.sample_rate == 0.2
    assert epsilon_of([settings.release] * 6, 1e-5) == pytest.approx(3.0, abs=0.05)
    with pytest.raises(ValueError, match="needs the stage's number of rounds"):
        resolve_round(config, "dit", 1, 40, 8, 5, 0, 1e-5)


def test_privacy_config_errors_name_the_file(synthetic_cohort, tmp_path: Path) -> None:
    path = site_yaml(synthetic_cohort[0], tmp_path, {"enabled": True, "stages": {"mae": {"noise_multiplier": 1.0,
                                                                                        "target_epsilon": 2.0}}})
    with pytest.raises(ConfigError, match=r"site-a.yaml: invalid SiteConfig:\n  privacy.stages.mae: give exactly one"):
        SiteConfig.from_yaml(path)
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"name": "r", "preset": "tiny", "min_sites": 3, "secure_aggregation": {"enabled": True},
                                   "stages": [{"name": "mae", "rounds": 1, "local_steps": 1, "strategy": "fedadam"}]}))
    with pytest.raises(ConfigError, match="secure_aggregation: stage mae uses fedadam"):
        RunConfig.from_yaml(run)


# --- memorisation audit ---------------------------------------------------------------------------------------


def test_audit_flags_a_planted_copy_of_a_training_scan(site) -> None:
    train, held = site.data.splits["train"], site.data.splits["val"] + site.data.splits["test"]
    copy = torch.from_numpy(preprocess_scan(train[3].path, TINY, site.data.cache))
    near_copy = copy + 0.02 * torch.randn(copy.shape, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    novel = [torch.from_numpy(preprocess_scan(h.path, TINY, site.data.cache)).flip(-1) * 0.8 for h in held[:2]]
    novel.append(torch.randn(copy.shape, generator=generator) * 0.5)
    synthetic = torch.stack([novel[0], copy, novel[1], near_copy, novel[2]])
    result = run_site_audit(site, site.tokens.encoder, synthetic)
    assert result.flags == [False, True, False, True, False]
    for space in ("feature", "voxel"):
        stats = result.spaces[space]
        assert stats.threshold > 0 and stats.control_flagged  # the site's own positive control is caught
        assert stats.flagged >= 2
    json.dumps(result.to_json())  # what travels: aggregates and flags only
    assert set(result.to_json()) == {"site_id", "n_synthetic", "n_train", "n_held", "flags", "spaces", "membership", "note"}


def test_membership_auc_and_its_pooling() -> None:
    assert membership_auc(np.array([0.1, 0.2]), np.array([0.3, 0.4])) == 1.0
    assert membership_auc(np.array([0.5, 0.5]), np.array([0.5])) == 0.5
    a = {"auc": membership_auc(np.array([0.1, 0.5, 0.3]), np.array([0.2, 0.4])), "members": 3, "nonmembers": 2}
    b = {"auc": membership_auc(np.array([0.6]), np.array([0.1, 0.9, 0.3])), "members": 1, "nonmembers": 3}
    within = (sum(m < n for m in (0.1, 0.5, 0.3) for n in (0.2, 0.4)) + sum(0.6 < n for n in (0.1, 0.9, 0.3))) / (6 + 3)
    assert pooled_membership_auc([a, b]) == pytest.approx(within)
    assert math.isnan(pooled_membership_auc([]))


def test_pooled_membership_interval_covers_the_pooled_auc_and_narrows_with_more_pairs() -> None:
    rng = np.random.default_rng(0)

    def site(n: int, shift: float) -> dict:  # members' losses lower by `shift`: a real membership signal
        return membership_result(rng.normal(0.0, 1.0, n) - shift, rng.normal(0.0, 1.0, n))

    small = pooled_membership([site(10, 1.0), site(12, 1.0)])
    large = pooled_membership([site(200, 1.0), site(240, 1.0)])
    for pooled in (small, large):
        low, high = pooled["ci95"]
        assert low <= pooled["auc"] <= high and pooled["sites"] == 2
    assert large["ci95"][1] - large["ci95"][0] < (small["ci95"][1] - small["ci95"][0]) / 2
    assert large["ci95"][0] > 0.65  # N(−1, 1) vs N(0, 1): true AUC Φ(1/√2) ≈ 0.76
    nothing = pooled_membership([site(200, 0.0), site(200, 0.0)])
    assert nothing["ci95"][0] < 0.5 < nothing["ci95"][1]


def test_mae_loss_attack_separates_scans_the_mae_was_fitted_to() -> None:
    torch.manual_seed(0)
    mae = MaskedAutoencoder(MAEConfig.from_preset(TINY))
    members = torch.randn(4, 1, *TINY.shape)
    nonmembers = torch.randn(4, 1, *TINY.shape)
    optimizer = torch.optim.Adam(mae.parameters(), lr=3e-3)
    for step in range(60):  # memorise the members
        optimizer.zero_grad()
        mae(members, generator=torch.Generator().manual_seed(step)).loss.backward()
        optimizer.step()
    member, nonmember = mae_losses(mae, members, draws=2), mae_losses(mae, nonmembers, draws=2)
    assert membership_auc(member, nonmember) == 1.0
    again = mae_losses(mae, members, draws=2)
    np.testing.assert_array_equal(member, again)  # fixed masks: the same score every time


def test_audit_without_held_out_scans_says_it_cannot_calibrate() -> None:
    volumes, tokens = torch.randn(2, 1, 4, 4, 4), torch.randn(2, 3, 6)
    result = audit_site("s", volumes, tokens, volumes, tokens, volumes[:0], tokens[:0])
    assert result.flags == [False, False] and "cannot calibrate" in result.note


def _query(content: RecordDict) -> Message:
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1",
                        created_at=0.0, ttl=3600.0, message_type="query")
    return Message(content, metadata=metadata)


def test_client_privacy_audit_query_returns_aggregates_and_flags_only(synthetic_cohort, tmp_path: Path) -> None:
    from braing3n_core.checkpoint import tensors_sha256
    from braing3n_core.models import DiT, DiTConfig
    from client.app import app as client_app

    torch.manual_seed(0)
    mae = MaskedAutoencoder(MAEConfig.from_preset(TINY))
    encoder = mae.encoder
    state = {k: v.float() for k, v in encoder.state_dict().items()}
    sha = tensors_sha256(state)
    path = site_yaml(synthetic_cohort[1], tmp_path)
    context = Context(run_id=1, node_id=1, node_config={"site-config": str(path)}, state=RecordDict(), run_config={})
    install = ConfigRecord({"action": "install_encoder", "preset": "tiny", "encoder-sha256": sha,
                            "encoder-config": json.dumps(encoder.config.to_dict())})
    reply = client_app(_query(RecordDict({"config": install, "encoder": ArrayRecord(
        {k: Array(v.numpy()) for k, v in state.items()})})), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    config = SiteConfig.from_yaml(path)
    train = load_site(config, TINY, progress=False).splits["train"]
    planted = torch.from_numpy(preprocess_scan(train[0].path, TINY, None))
    volumes = torch.stack([torch.zeros_like(planted), planted]).numpy().astype(np.float16)
    dit = DiT(DiTConfig.from_preset(TINY))
    query = ConfigRecord({"action": "privacy_audit", "preset": "tiny", "encoder-sha256": sha, "n-synthetic": 2,
                          "dit-config": json.dumps(dit.config.to_dict()), "mae-config": json.dumps(mae.config.to_dict())})
    reply = client_app(_query(RecordDict({
        "config": query, "synthetic": ArrayRecord({"volumes": Array(volumes)}),
        "dit": ArrayRecord({k: Array(v) for k, v in module_arrays(dit).items()}),
        "mae": ArrayRecord({k: Array(v) for k, v in module_arrays(mae).items()}),
    })), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert list(reply.content.array_records) == []  # nothing per scan or per patient goes back
    audit = json.loads(reply.content["site"]["audit"])
    assert audit["site_id"] == "site-b" and audit["flags"] == [False, True]
    for attack in ("dit", "mae"):
        result = audit["membership"][attack]
        assert 0.0 <= result["auc"] <= 1.0 and result["members"] > 0 and result["nonmembers"] > 0
        assert len(result["bootstrap"]) == BOOTSTRAP and all(0.0 <= b <= 1.0 for b in result["bootstrap"])
