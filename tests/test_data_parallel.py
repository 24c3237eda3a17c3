"""Data-parallel site rounds on real processes: 2 gloo workers against 1 process on the same seed and global
batch (every stage, DP-SGD too), ε unchanged by the number of workers, and a worker that dies or hangs.

The multi-process tests share one forkserver per pytest process (`training.process_group`): the first of
them pays the imports (seconds), the others start their workers in a fraction of a second.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from braing3n_core.data.datasets import load_site
from braing3n_core.data.tokens import TokenCache
from braing3n_core.federation.protocol import RoundParams, SiteDeclined
from braing3n_core.federation.site_round import (
    PrivateRound,
    RoundJob,
    run_round_job,
    train_site_round,
)
from braing3n_core.models import MAEConfig, MaskedAutoencoder
from braing3n_core.ops.flower import descendants
from braing3n_core.presets import get_preset
from braing3n_core.privacy.dp import default_delta, resolve_round, subject_groups
from braing3n_core.site_config import SiteConfig, SitePrivacyConfig
from braing3n_core.training.data_parallel import GlobalBatchShards, ParallelGroup, reduce_step, shuffled_batches
from braing3n_core.training.examples import SiteInputs, token_moments
from braing3n_core.training.process_group import WorkerPlan, run_data_parallel
from braing3n_core.training.stages import get_stage, stage_dataset
from braing3n_core.worker_rows import WorkerRows, holding, per_example

TINY = get_preset("tiny")
CPU = torch.device("cpu")
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing", "ignore:Secure RNG turned off")


def write_site(source: Path, folder: Path, **settings) -> SiteConfig:
    site = SiteConfig.from_yaml(source)
    data = {**site.to_yaml_dict(), "cache_dir": str(folder / "cache"), **settings}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "site.yaml").write_text(yaml.safe_dump(data))
    return SiteConfig.from_yaml(folder / "site.yaml")


@pytest.fixture(scope="module")
def site(synthetic_cohort, tmp_path_factory) -> SiteInputs:
    """site-a with a token cache of a seeded, untrained tiny encoder: every stage's dataset is real."""
    config = write_site(synthetic_cohort[0], tmp_path_factory.mktemp("ddp-site"))
    data = load_site(config, TINY, progress=False)
    torch.manual_seed(0)
    encoder = MaskedAutoencoder(MAEConfig.from_preset(TINY)).encoder
    return SiteInputs(data, TokenCache(config.resolved_cache_dir, encoder, TINY, data.cache))


def with_workers(site: SiteInputs, workers: int, **changes) -> SiteInputs:
    config = site.data.config.model_copy(update={"workers": workers, **changes})
    return SiteInputs(replace(site.data, config=config), site.tokens)


def global_model(stage_name: str, site: SiteInputs) -> torch.nn.Module:
    stage = get_stage(stage_name)
    torch.manual_seed(3)
    model = stage.build(TINY)
    if stage_name == "decoder":  # SSIM on one random box per global batch, as at small and paper
        from braing3n_core.models import CNNDecoder, DecoderConfig

        torch.manual_seed(3)
        model = CNNDecoder(DecoderConfig.from_preset(TINY, ssim_fraction=0.5))
    if stage_name == "dit":
        model.set_token_statistics(*token_moments(stage_dataset(stage, [site], "train"), model.config.token_dim).mean_std())
    return model


def assert_same_weights(two: dict[str, np.ndarray], one: dict[str, np.ndarray], lr: float, steps: int) -> None:
    """Equal to float tolerance, except where AdamW amplifies rounding: it divides each element's update by
    that element's gradient RMS, so an element whose exact gradient is (near) zero — e.g. a bias that a
    per-channel GroupNorm subtracts out again — moves by up to ±lr per step with the sign of rounding noise,
    which depends on the order of the gradient sum (one process vs an all-reduce). Such elements must be
    rare and stay within AdamW's bound of ~lr per step."""
    assert set(two) == set(one)
    close = total = 0
    for key in one:
        difference = np.abs(two[key] - one[key])
        close += int((difference <= 2e-5 + 1e-4 * np.abs(one[key])).sum())
        total += difference.size
        assert float(difference.max()) <= 2.2 * lr * steps, key
    assert close >= 0.999 * total, f"{total - close} of {total} weights differ"


# --- units (one process) -------------------------------------------------------------------------------------


def test_worker_shares_of_a_global_batch_and_their_draws_make_up_the_whole() -> None:
    batches = list(shuffled_batches(7, 3, seed=5))  # 3 + 3 + 1: the last batch is short, as in DataLoader
    assert [len(b) for b in batches] == [3, 3, 1]
    whole = list(GlobalBatchShards(shuffled_batches(7, 3, seed=5), 9, ParallelGroup.single()))
    shares = [list(GlobalBatchShards(shuffled_batches(7, 3, seed=5), 9, ParallelGroup(rank, 2))) for rank in (0, 1)]
    for step, items in enumerate(whole):
        joined = sorted(shares[0][step] + shares[1][step], key=lambda item: item[2])
        assert joined == items  # same examples, augmentation seeds and positions
    assert shares[1][2] == []  # a worker's share of the short batch is empty; its step still happens
    generator = torch.Generator().manual_seed(0)
    full = torch.rand(5, 4, generator=generator)
    parts = []
    for rank in (0, 1):
        generator.manual_seed(0)
        with holding(WorkerRows.stride(rank, 2, 5)):
            parts.append(per_example(lambda n: torch.rand(n, 4, generator=generator), 3 - rank))
    assert torch.equal(torch.cat([parts[0][0::1], parts[1]])[[0, 3, 1, 4, 2]], full)
    with pytest.raises(ValueError, match="holds 3 of the 5 rows"):
        with holding(WorkerRows.stride(0, 2, 5)):
            per_example(lambda n: torch.rand(n), 2)


def test_a_workers_copy_of_the_token_cache_reads_but_never_encodes(site, tmp_path) -> None:
    import pickle

    from braing3n_core.data.transforms import PreprocessingError

    torch.manual_seed(5)  # an encoder of its own: an empty token store
    cache = TokenCache(tmp_path, MaskedAutoencoder(MAEConfig.from_preset(TINY)).encoder, TINY, site.data.cache)
    first, second = site.data.splits["train"][:2]
    cache.ensure([first])
    copy = pickle.loads(pickle.dumps(cache))  # what travels to a data-parallel worker
    assert not copy.encoder_loaded and torch.equal(copy.tokens(first), cache.tokens(first))
    with pytest.raises(PreprocessingError, match="read-only copy"):
        copy.tokens(second)


def test_one_process_step_totals_are_its_own() -> None:
    totals = reduce_step(ParallelGroup.single(), torch.nn.Linear(2, 2), 4, 0.5, {"train/l1": 0.25}, ("train/l1",),
                         True, gradients=True)
    assert (totals.examples, totals.loss, totals.extra(), totals.finite) == (4, 0.5, {"train/l1": 0.25}, True)


def test_workers_setting_is_checked_against_the_device_and_privacy(tmp_path: Path) -> None:
    from braing3n_core.config import ConfigError

    def load(text: str) -> SiteConfig:
        path = tmp_path / "site.yaml"
        path.write_text(f"site_id: a\ndata_root: {tmp_path}\n{text}")
        return SiteConfig.from_yaml(path)

    assert load("workers: 4\ndevice: cuda\n").workers == 4
    with pytest.raises(ConfigError, match=r"(?s)site\.yaml.*pins one GPU.*use device: cuda"):
        load("workers: 2\ndevice: cuda:1\n")
    with pytest.raises(ConfigError, match=r"(?s)site\.yaml.*workers"):
        load("workers: 0\n")
    with pytest.raises(ConfigError, match=r"(?s)site\.yaml.*activation_checkpointing.*privacy\.enabled"):
        load("privacy: {enabled: true}\ncompute: {activation_checkpointing: true}\n")
    with pytest.raises(ConfigError, match=r"(?s)site\.yaml.*compute.*loader_wokers"):
        load("compute: {loader_wokers: 2}\n")


# --- real worker processes ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("stage_name, proximal_mu", [("mae", 0.0), ("decoder", 0.01), ("dit", 0.0)])
def test_two_gloo_workers_train_the_weights_one_process_trains(site, stage_name: str, proximal_mu: float) -> None:
    stage = get_stage(stage_name)
    # A global batch of 3 on 2 workers: shares of 2 and 1, so the count-weighted average is exercised.
    params = RoundParams(stage=stage_name, server_round=2, local_steps=3, batch_size=3, lr=1e-3, weight_decay=0.05,
                         seed=7, proximal_mu=proximal_mu, timeout_s=300)
    one, metrics_one = train_site_round(stage, global_model(stage_name, site), with_workers(site, 1), params, CPU)
    two, metrics_two = train_site_round(stage, global_model(stage_name, site), with_workers(site, 2), params, CPU)
    assert (metrics_one["train/workers"], metrics_two["train/workers"]) == (1.0, 2.0)
    assert metrics_two["train/examples"] == metrics_one["train/examples"] == 9
    assert metrics_two["train/loss"] == pytest.approx(metrics_one["train/loss"], rel=1e-5)
    for name in stage.train_metrics:
        assert metrics_two[name] == pytest.approx(metrics_one[name], rel=1e-5)
    assert_same_weights(two, one, params.lr, params.local_steps)
    if stage_name == "decoder":  # and the network the two runs trained computes the same volumes
        tokens = torch.stack([site.tokens.tokens(r) for r in site.data.splits["val"][:2]])
        volumes = []
        for arrays in (one, two):
            model = global_model(stage_name, site).eval()
            model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
            with torch.no_grad():
                volumes.append(model(tokens))
        torch.testing.assert_close(volumes[1], volumes[0], atol=1e-4, rtol=1e-4)


def _global_batch_gradient(shares: list[int], group: ParallelGroup, device: torch.device) -> list[torch.Tensor]:
    """The gradient a worker holds after `reduce_step`, its share being rows of one fixed global batch."""
    torch.manual_seed(0)
    model, inputs = torch.nn.Linear(5, 3), torch.randn(sum(shares), 5)
    mine = inputs[sum(shares[: group.rank]) : sum(shares[: group.rank + 1])]
    if len(mine):
        model(mine).pow(2).sum(dim=1).mean().backward()
    reduce_step(group, model, len(mine), 0.0, {}, (), True, gradients=True)
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("shares", [[3, 1], [2, 0]])
def test_all_reduced_gradient_is_the_global_batch_mean_also_for_unequal_shares(shares: list[int]) -> None:
    torch.manual_seed(0)
    model, inputs = torch.nn.Linear(5, 3), torch.randn(sum(shares), 5)
    model(inputs).pow(2).sum(dim=1).mean().backward()
    reduced = run_data_parallel(functools.partial(_global_batch_gradient, shares), WorkerPlan(2)).value
    for got, expected in zip(reduced, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, expected)


@pytest.mark.slow
def test_dp_sgd_on_two_workers_spends_the_epsilon_of_one_process_and_trains_the_same(site, tmp_path) -> None:
    stage = get_stage("mae")
    params = RoundParams(stage="mae", server_round=1, local_steps=4, batch_size=3, lr=1e-3, weight_decay=0.05,
                         seed=1, rounds=3, timeout_s=300)
    privacy = {"enabled": True, "stages": {"mae": {"target_epsilon": 3.0, "max_grad_norm": 0.5}}}
    ledgers = {}
    for workers in (1, 2):
        ledger = tmp_path / f"ledger-{workers}.jsonl"
        private_site = with_workers(site, workers, privacy=SitePrivacyConfig.model_validate({**privacy, "ledger": ledger}))
        _, metrics = train_site_round(stage, global_model("mae", site), private_site, params, CPU)
        assert metrics["train/workers"] == workers
        ledgers[workers] = json.loads(ledger.read_text().splitlines()[-1])
    keys = ("sample_rate", "noise_multiplier", "steps", "subjects", "max_grad_norm", "delta", "epsilon_after")
    assert {k: ledgers[2][k] for k in keys} == {k: ledgers[1][k] for k in keys}
    assert ledgers[1]["epsilon_after"] > 0

    # Given the same secret draws (Poisson sample and noise), 2 workers train what one process trains: per-
    # sample clipping on each worker, one noise vector for the global batch (rank 0), sums all-reduced.
    dataset = stage_dataset(stage, [site], "train")
    subjects = len(subject_groups(dataset))
    settings = resolve_round(SitePrivacyConfig.model_validate(privacy), "mae", 1, subjects, params.batch_size, params.local_steps, params.rounds, default_delta(subjects))
    model = global_model("mae", site)
    job = RoundJob("mae", model.config.to_dict(), {k: v.clone() for k, v in model.state_dict().items()}, dataset,
                   replace(params, proximal_mu=0.01), 11, site.data.config.compute, PrivateRound(settings, 123, 456))
    one, result_one = run_round_job(job, ParallelGroup.single(), CPU)
    two, result_two = run_data_parallel(functools.partial(run_round_job, job), WorkerPlan(2, timeout_s=300)).value
    assert result_two.examples == result_one.examples > 0
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=2e-5, rtol=1e-4, msg=key)


@pytest.mark.slow
def test_two_sites_on_one_host_form_their_groups_side_by_side() -> None:
    """Each round's store takes a port the OS picks: two groups at once never meet."""
    plan = WorkerPlan(2, timeout_s=120)
    outcomes = [_run_in_thread(lambda shares=shares: run_data_parallel(
        functools.partial(_global_batch_gradient, shares), plan).value) for shares in ([3, 1], [1, 2])]
    for outcome in outcomes:
        outcome["thread"].join(120)
    assert [sorted(o) for o in outcomes] == [["seconds", "thread", "value"]] * 2, outcomes
    torch.manual_seed(0)
    model, inputs = torch.nn.Linear(5, 3), torch.randn(4, 5)
    model(inputs).pow(2).sum(dim=1).mean().backward()
    torch.testing.assert_close(outcomes[0]["value"][0], model.weight.grad)


def _rank_of(group: ParallelGroup, device: torch.device) -> int:
    return group.rank


def _workers_of(agent: int) -> list[int]:
    """The data-parallel workers below this process: children of its forkserver."""
    from multiprocessing import forkserver

    server = forkserver._forkserver._forkserver_pid  # started by the first data-parallel round of this process
    return [pid for pid in descendants(agent) if server is not None and pid in descendants(server)]


def _run_in_thread(call) -> dict:
    outcome: dict = {}

    def run() -> None:
        started = time.monotonic()
        try:
            outcome["value"] = call()
        except Exception as error:  # noqa: BLE001 - the test inspects it
            outcome["error"] = error
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    outcome["thread"] = thread
    return outcome


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["killed", "stopped"])
def test_a_worker_that_dies_or_hangs_declines_the_round_with_the_reason(site, fault: str) -> None:
    stage = get_stage("mae")
    # Many steps, so the round is surely still running when one worker is hit; a short deadline for the hang.
    params = RoundParams(stage="mae", server_round=1, local_steps=100_000, batch_size=2, lr=1e-4, weight_decay=0.0,
                         timeout_s=300 if fault == "killed" else 3)
    assert run_data_parallel(_rank_of, WorkerPlan(2)).value == 0  # the forkserver runs: the deadline is the round's
    outcome = _run_in_thread(lambda: train_site_round(stage, global_model("mae", site), with_workers(site, 2), params, CPU))
    deadline = time.monotonic() + 120
    while len(workers := _workers_of(os.getpid())) < 2 and time.monotonic() < deadline and outcome["thread"].is_alive():
        time.sleep(0.05)
    assert len(workers) == 2, outcome
    time.sleep(0.5)  # inside the training loop by now
    hit = max(workers)
    hit_at = time.monotonic()
    os.kill(hit, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
    outcome["thread"].join(60)
    assert not outcome["thread"].is_alive()
    error = outcome.get("error")
    assert isinstance(error, SiteDeclined), outcome
    assert str(error).startswith(f"site {site.data.config.site_id}: ")
    if fault == "killed":
        assert f"(pid {hit}) was killed by SIGKILL" in str(error)
        assert time.monotonic() - hit_at < 15  # noticed at once, not at the deadline
    else:  # a stopped worker: the others time out in their collective, or the round misses its deadline
        assert "data-parallel worker" in str(error) or "did not finish within 3 s" in str(error)
    deadline = time.monotonic() + 15
    while any(pid in descendants(os.getpid()) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if pid in descendants(os.getpid())]  # nothing outlives the round


@pytest.mark.slow
def test_centralized_training_on_two_workers_writes_the_checkpoint_one_process_writes(site, tmp_path) -> None:
    from braing3n_core.checkpoint import load_checkpoint
    from braing3n_core.training.centralized import TrainOptions, train_centralized

    finals = {}
    for workers in (1, 2):
        options = TrainOptions(stage="mae", preset="tiny", steps=3, batch_size=3, lr=1e-3, seed=4, checkpoint_every=2,
                               out_dir=tmp_path / f"w{workers}", workers=workers)
        final = train_centralized([site.data.config], options)
        assert final.name == "step-000003.json"
        finals[workers] = load_checkpoint(final).sub_state_dict("model")
        logged = [json.loads(line) for line in (tmp_path / f"w{workers}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in logged] == [2, 3] and {r["train/workers"] for r in logged} == {workers}
    assert_same_weights({k: v.numpy() for k, v in finals[2].items()}, {k: v.numpy() for k, v in finals[1].items()},
                        lr=1e-3, steps=3)


@pytest.mark.slow
def test_data_loading_processes_give_the_batches_loading_in_process_gives(site) -> None:
    """Augmentation is seeded per example, so where an example is read (this process, or one of
    `compute.loader_workers` forked from the forkserver) does not change it."""
    from braing3n_core.training.data_parallel import share_loader

    dataset = stage_dataset(get_stage("mae"), [site], "train")  # augmented volumes
    batches = []
    for loader_workers in (0, 2):
        loader = share_loader(dataset, shuffled_batches(len(dataset), 3, seed=2), 5, ParallelGroup.single(),
                              loader_workers=loader_workers)
        shares = iter(loader)
        batches.append([next(shares), next(shares)])
    for (plain, rows), (loaded, loaded_rows) in zip(*batches):
        assert rows == loaded_rows and torch.equal(plain["index"], loaded["index"])
        torch.testing.assert_close(loaded["volume"], plain["volume"], atol=0, rtol=0)
