"""One site's share of a stage round, through the very training loop the centralized trainer runs.

`train_site_round` runs `local_steps` steps from the global weights (a fresh AdamW per round, FedProx when
asked, subject-level DP-SGD with the site's ledger when the site's config enables privacy);
`evaluate_site` gives the stage's validation metrics; `site_token_moments` the DiT's token sums and
`site_change_trend` its pairs' trend sums.

A site with `workers: N` > 1 trains data-parallel: this process (the one that talks to Flower) prepares
the round — data checked, token cache filled, ledger checked — and hands one picklable `RoundJob` to N
workers started for the round (`training.process_group`); each runs `run_round_job` on its share of every
global batch (`training.data_parallel`), rank 0's weights come back, and only this process writes the
ledger. With one worker the same `run_round_job` runs here, in process.
"""

from __future__ import annotations

import functools
import os
import signal
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from braing3n_core.federation.arrays import Arrays
from braing3n_core.federation.protocol import RoundParams, SiteDeclined
from braing3n_core.models import ChangeTrendSums, TokenMoments
from braing3n_core.privacy.dp import (
    DPRound,
    OwnExamples,
    SubjectPoissonSampler,
    default_delta,
    make_private,
    privacy_metrics,
    proximal_after_noise,
    resolve_round,
    subject_groups,
)
from braing3n_core.privacy.ledger import LedgerError, PrivacyBudgetExceeded, PrivacyLedger
from braing3n_core.runtime import infinite, round_seed
from braing3n_core.site_config import ComputeConfig
from braing3n_core.training.compute import prepare_network
from braing3n_core.training.data_parallel import ParallelGroup, check_replicas, share_loader, shuffled_batches
from braing3n_core.training.examples import SiteInputs, change_trend_sums, token_moments
from braing3n_core.training.loop import (
    ProximalTerm,
    TrainResult,
    evaluate,
    make_loader,
    make_optimizer,
    train_steps,
    trainable_state,
)
from braing3n_core.training.process_group import DEFAULT_TIMEOUT_S, DataParallelError, WorkerPlan, run_data_parallel
from braing3n_core.training.stages import get_stage, stage_dataset

if TYPE_CHECKING:
    from braing3n_core.privacy.ledger import PrivacyLedger
    from braing3n_core.training.stages import Stage


def _loader(dataset, batch_size: int, shuffle: bool, seed: int):
    return make_loader(dataset, batch_size, shuffle, seed)


@dataclass(frozen=True)
class PrivateRound:
    """A DP-SGD round: its settings, and the secret seeds of its Poisson draw and its noise (OS entropy, see
    `privacy.dp`; they go only to this site's own workers, which must all draw the same global sample)."""

    settings: DPRound
    sampling_seed: int
    noise_seed: int

    @classmethod
    def drawn(cls, settings: DPRound) -> "PrivateRound":
        return cls(settings, _secret_seed(), _secret_seed())


def _secret_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") & (2**63 - 1)


@dataclass(frozen=True)
class RoundJob:
    """One site round as data: what each data-parallel worker (or this process) needs to run it."""

    stage: str
    model_config: dict[str, Any]
    weights: dict[str, Tensor]
    dataset: Dataset  # the stage's training examples (token caches filled: workers only read them)
    params: RoundParams
    seed: int
    compute: ComputeConfig
    private: PrivateRound | None = None
    kill_worker: int | None = None  # a drill (`fault_injection: worker_crash`): this rank dies as the round starts


def run_round_job(job: RoundJob, group: ParallelGroup, device: torch.device,
                  model: nn.Module | None = None) -> tuple[dict[str, Tensor], TrainResult]:
    """The round on one worker of `group` (or alone): rank 0's (weights, result) is the round's. `model`: the
    network already holding `job.weights` (in process); a worker rebuilds it from the job."""
    if job.kill_worker == group.rank and not group.is_single:
        os.kill(os.getpid(), signal.SIGKILL)
    stage, params = get_stage(job.stage), job.params
    if model is None:
        model = stage.from_config(job.model_config)
        model.load_state_dict(job.weights)
    model = prepare_network(model.to(device), job.compute, device)
    optimizer = make_optimizer(model, params.lr, params.weight_decay)
    generator = torch.Generator(device=device).manual_seed(job.seed)
    loading = dict(augment_seed=round_seed(job.seed, "augment"), group=group,
                   loader_workers=job.compute.loader_workers, pin_memory=device.type == "cuda" and job.compute.pin_memory,
                   context=_loader_context(group))
    if job.private is None:
        proximal = ProximalTerm.of(model, params.proximal_mu) if params.proximal_mu > 0 else None
        batches = infinite(share_loader(job.dataset, shuffled_batches(len(job.dataset), params.batch_size, job.seed),
                                        **loading))
        result = train_steps(stage, model, batches, optimizer, params.local_steps, lr_at=lambda _: params.lr,
                             device=device, generator=generator, proximal=proximal, group=group)
    else:
        result = _train_private_steps(job, model, optimizer, generator, loading, group, device)
    check_replicas(group, model)
    return (trainable_state(model), result) if group.is_leader else ({}, result)


def _train_private_steps(job: RoundJob, model: nn.Module, optimizer: torch.optim.Optimizer,
                         generator: torch.Generator, loading: dict[str, Any], group: ParallelGroup,
                         device: torch.device) -> TrainResult:
    """DP-SGD steps (see `braing3n_core.privacy.dp` for the subject-level guarantee)."""
    private, params, stage = job.private, job.params, get_stage(job.stage)
    assert private is not None
    release = private.settings.release
    after_noise = proximal_after_noise(model, params.proximal_mu) if params.proximal_mu > 0 else None
    noise = torch.Generator(device=device).manual_seed(private.noise_seed) if group.is_leader else None
    hooks = make_private(model, optimizer, private.settings, after_noise=after_noise, noise_generator=noise,
                         distributed=not group.is_single)
    try:
        # The Poisson draw uses the round's secret seed (every worker draws the same global sample); the
        # stage's own randomness (masks, diffusion time and noise) keeps the round's seed.
        draw = SubjectPoissonSampler(subject_groups(job.dataset), release.sample_rate, params.local_steps,
                                     torch.Generator().manual_seed(private.sampling_seed))
        batches = iter(share_loader(OwnExamples(job.dataset), draw, **loading))
        with warnings.catch_warnings():
            # Opacus' backward hooks on a first layer whose input needs no gradient: expected, harmless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            return train_steps(stage, model, batches, hooks.optimizer, params.local_steps, lr_at=lambda _: params.lr,
                               device=device, generator=generator, max_grad_norm=None, group=group,
                               optimizer_reduces=not group.is_single)
    finally:
        hooks.close()


def _loader_context(group: ParallelGroup) -> str:
    """Data-loading processes: never forked from this process when it is the agent (a Ray actor's threads
    make fork unsafe); a worker started for the round is a plain single-purpose process and may fork."""
    return "forkserver" if group.is_single else "fork"


def train_site_round(
    stage: Stage, model: nn.Module, site: SiteInputs, params: RoundParams, device: torch.device,
    kill_worker: int | None = None,
) -> tuple[Arrays, dict[str, float]]:
    """`params.local_steps` steps of `stage` on the site's training split, from the global weights in `model`.

    A fresh AdamW per round (optimizer state never crosses rounds or sites); FedProx adds μ/2‖w − w_g‖²
    when `proximal_mu` > 0. Returns the new weights and metrics: `num-examples` is the site's number of
    training examples (FedAvg's n_k), `train/examples` the examples actually processed, `train/workers`
    the site's data-parallel workers and `train/startup_s` what starting them cost.

    A site whose config enables `privacy` trains with subject-level DP-SGD instead: same loop, privatised
    optimizer, the round recorded in the site's ledger before the weights leave, and `privacy/*` metrics;
    a round that would exceed the site's ε budget is declined before training.

    `kill_worker` (drills only): that data-parallel worker is killed as the round starts.
    """
    config = site.data.config
    if kill_worker is not None and not 0 < kill_worker < config.workers:
        raise SiteDeclined(f"site {config.site_id}: the worker_crash drill needs data-parallel workers "
                           f"(workers: {config.workers})")
    dataset = stage_dataset(stage, [site], "train")
    if len(dataset) == 0:
        raise SiteDeclined(f"site {config.site_id}: no usable training scans for stage {stage.name}")
    seed = round_seed(params.seed, stage.name, params.server_round, config.site_id)
    ledger, private, delta = None, None, 0.0
    if config.privacy.enabled:
        ledger = site_ledger(config)
        private, delta = _private_round(stage, config, ledger, dataset, params)
    job = RoundJob(stage.name, stage.model_config(model), {k: v.detach().cpu() for k, v in model.state_dict().items()},
                   dataset, params, seed, config.compute, private, kill_worker)
    state, result, startup = _run(job, config, device, params, model)
    arrays = {k: v.numpy() for k, v in state.items()}
    metrics = {"num-examples": float(len(dataset)), **result.metrics(), "train/steps": float(result.steps),
               "train/workers": float(config.workers), "train/startup_s": startup}
    if private is not None:
        try:  # recorded before the weights leave the site: a crash after this over-counts, never under-counts
            entry = ledger.record(private.settings.release, delta, config.privacy.epsilon_budget)
        except (LedgerError, PrivacyBudgetExceeded) as error:
            raise SiteDeclined(str(error)) from None
        metrics |= privacy_metrics(entry.epsilon_after, private.settings, config.privacy.epsilon_budget)
    return arrays, metrics


def _run(job: RoundJob, config, device: torch.device, params: RoundParams,
         model: nn.Module) -> tuple[dict[str, Tensor], TrainResult, float]:
    """The job here (one worker), or on `config.workers` data-parallel workers (a failure declines the round)."""
    if config.workers == 1:
        state, result = run_round_job(job, ParallelGroup.single(), device, model)
        return state, result, 0.0
    plan = WorkerPlan(workers=config.workers, device_type=device.type, threads=max(1, torch.get_num_threads() // config.workers),
                      timeout_s=params.timeout_s if params.timeout_s > 0 else DEFAULT_TIMEOUT_S)
    try:
        run = run_data_parallel(functools.partial(run_round_job, job), plan)
    except DataParallelError as error:
        raise SiteDeclined(f"site {config.site_id}: {error}") from None
    state, result = run.value
    return state, result, run.startup_s


def site_ledger(config) -> "PrivacyLedger":
    """The site's privacy ledger (on its own disk; see `braing3n_core.privacy.ledger`)."""
    return PrivacyLedger(config.privacy_ledger_path, config.site_id, config.privacy.accountant)


def _private_round(stage: Stage, config, ledger: PrivacyLedger, dataset: Dataset,
                   params: RoundParams) -> tuple[PrivateRound, float]:
    """σ, q, δ of a DP round (from the global batch: the same whatever the number of workers), checked
    against the ledger before any training."""
    privacy = config.privacy
    subjects = len(subject_groups(dataset))
    try:
        delta = ledger.resolve_delta(privacy.delta, default_delta(subjects))
        settings = resolve_round(privacy, stage.name, params.server_round, subjects, params.batch_size,
                                 params.local_steps, params.rounds, delta, params.run)
        ledger.check(settings.release, delta, privacy.epsilon_budget)  # before any training
    except (LedgerError, PrivacyBudgetExceeded, ValueError) as error:
        raise SiteDeclined(str(error) if str(error).startswith("site ") else f"site {config.site_id}: {error}") from None
    return PrivateRound.drawn(settings), delta


def evaluate_site(stage: Stage, model: nn.Module, site: SiteInputs, batch_size: int, device: torch.device) -> dict[str, float]:
    """The stage's validation metrics on the site's val split (`num-examples` = validation examples)."""
    dataset = stage_dataset(stage, [site], "val")
    if len(dataset) == 0:
        raise SiteDeclined(f"site {site.data.config.site_id}: no usable validation scans for stage {stage.name}")
    values = evaluate(stage, model.to(device), _loader(dataset, batch_size, False, 0), device)
    return {"num-examples": values["val/examples"], **values}


def site_token_moments(dit_stage: Stage, site: SiteInputs, token_dim: int) -> TokenMoments:
    """Per-channel token sums over the site's DiT training scans (aggregates only)."""
    dataset = stage_dataset(dit_stage, [site], "train")
    if len(dataset) == 0:
        raise SiteDeclined(f"site {site.data.config.site_id}: no usable training scans for token statistics")
    return token_moments(dataset, token_dim)


def site_change_trend(dit_stage: Stage, site: SiteInputs, num_tokens: int, token_dim: int) -> ChangeTrendSums:
    """The trend sums over the site's DiT training pairs, without the cells of fewer subjects than the site's
    `privacy.min_subjects_per_cell`; empty at a site whose config enables privacy (DP-SGD bounds what its
    weights say of a subject, and these sums are outside that bound)."""
    privacy = site.data.config.privacy
    if privacy.enabled:
        return ChangeTrendSums(num_tokens, token_dim)
    sums = change_trend_sums(stage_dataset(dit_stage, [site], "train"), num_tokens, token_dim)
    return sums.without_small_cells(privacy.min_subjects_per_cell)
