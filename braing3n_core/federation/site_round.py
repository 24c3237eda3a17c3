"""One site's share of a stage round, through the very training loop the centralized trainer runs.

`train_site_round` runs `local_steps` steps from the global weights (a fresh AdamW per round, FedProx when
asked, subject-level DP-SGD with the site's ledger when the site's config enables privacy);
`evaluate_site` gives the stage's validation metrics; `site_token_moments` the DiT's token sums.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from braing3n_core.federation.arrays import Arrays, module_arrays
from braing3n_core.federation.protocol import RoundParams, SiteDeclined
from braing3n_core.models import TokenMoments
from braing3n_core.privacy.dp import (
    default_delta,
    make_private,
    os_generator,
    privacy_metrics,
    proximal_after_noise,
    resolve_round,
    subject_groups,
    subject_loader,
)
from braing3n_core.privacy.ledger import LedgerError, PrivacyBudgetExceeded, PrivacyLedger
from braing3n_core.runtime import infinite, round_seed
from braing3n_core.training.examples import SiteInputs, token_moments
from braing3n_core.training.loop import ProximalTerm, evaluate, make_loader, make_optimizer, train_steps
from braing3n_core.training.stages import Stage, stage_dataset

if TYPE_CHECKING:
    from braing3n_core.privacy.ledger import PrivacyLedger


def _loader(dataset, batch_size: int, shuffle: bool, seed: int):
    return make_loader(dataset, batch_size, shuffle, seed)


def train_site_round(
    stage: Stage, model: nn.Module, site: SiteInputs, params: RoundParams, device: torch.device
) -> tuple[Arrays, dict[str, float]]:
    """`params.local_steps` steps of `stage` on the site's training split, from the global weights in `model`.

    A fresh AdamW per round (optimizer state never crosses rounds or sites); FedProx adds μ/2‖w − w_g‖²
    when `proximal_mu` > 0. Returns the new weights and metrics: `num-examples` is the site's number of
    training examples (FedAvg's n_k), `train/examples` the examples actually processed.

    A site whose config enables `privacy` trains with subject-level DP-SGD instead (`_train_private`):
    same loop, privatised optimizer, the round recorded in the site's ledger before the weights leave,
    and `privacy/*` metrics; a round that would exceed the site's ε budget is declined before training.
    """
    dataset = stage_dataset(stage, [site], "train")
    if len(dataset) == 0:
        raise SiteDeclined(f"site {site.data.config.site_id}: no usable training scans for stage {stage.name}")
    seed = round_seed(params.seed, stage.name, params.server_round, site.data.config.site_id)
    # Augmentation draws its seeds from the process's global generator (VolumeDataset); a ClientApp process
    # serves many sites and rounds, so seed it per (run, stage, round, site) or reruns would differ.
    torch.manual_seed(seed)
    if site.data.config.privacy.enabled:  # DP noise and Poisson sampling use their own OS-seeded generators
        return _train_private(stage, model, site, params, device, dataset)
    model = model.to(device)
    optimizer = make_optimizer(model, params.lr, params.weight_decay)
    proximal = ProximalTerm.of(model, params.proximal_mu) if params.proximal_mu > 0 else None
    batches = infinite(_loader(dataset, params.batch_size, True, seed))
    result = train_steps(
        stage, model, batches, optimizer, params.local_steps, lr_at=lambda _: params.lr, device=device,
        generator=torch.Generator(device=device).manual_seed(seed), proximal=proximal,
    )
    metrics = {"num-examples": float(len(dataset)), **result.metrics(), "train/steps": float(result.steps)}
    return module_arrays(model.cpu()), metrics


def site_ledger(config) -> "PrivacyLedger":
    """The site's privacy ledger (on its own disk; see `braing3n_core.privacy.ledger`)."""
    return PrivacyLedger(config.privacy_ledger_path, config.site_id, config.privacy.accountant)


def _train_private(stage: Stage, model: nn.Module, site: SiteInputs, params: RoundParams, device: torch.device,
                   dataset) -> tuple[Arrays, dict[str, float]]:
    """One DP-SGD round (see `braing3n_core.privacy.dp` for the subject-level guarantee)."""
    config = site.data.config
    privacy = config.privacy
    ledger = site_ledger(config)
    subjects = len(subject_groups(dataset))
    try:
        delta = ledger.resolve_delta(privacy.delta, default_delta(subjects))
        settings = resolve_round(privacy, stage.name, params.server_round, subjects, params.batch_size,
                                 params.local_steps, params.rounds, delta, params.run)
        ledger.check(settings.release, delta, privacy.epsilon_budget)  # before any training
    except (LedgerError, PrivacyBudgetExceeded, ValueError) as error:
        raise SiteDeclined(str(error) if str(error).startswith("site ") else f"site {config.site_id}: {error}") from None
    model = model.to(device)
    optimizer = make_optimizer(model, params.lr, params.weight_decay)
    after_noise = proximal_after_noise(model, params.proximal_mu) if params.proximal_mu > 0 else None
    private = make_private(model, optimizer, settings, after_noise=after_noise)
    seed = round_seed(params.seed, stage.name, params.server_round, config.site_id)
    try:
        # The Poisson draw uses OS entropy (privacy.dp); the stage's own randomness (masks, diffusion
        # time and noise) keeps the round's seed.
        batches = iter(subject_loader(dataset, settings.release.sample_rate, params.local_steps, os_generator()))
        with warnings.catch_warnings():
            # Opacus' backward hooks on a first layer whose input needs no gradient: expected, harmless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            result = train_steps(
                stage, model, batches, private.optimizer, params.local_steps, lr_at=lambda _: params.lr,
                device=device, generator=torch.Generator(device=device).manual_seed(seed), max_grad_norm=None,
            )
    finally:
        private.close()
    arrays = module_arrays(model.cpu())
    try:  # recorded before the weights leave the site: a crash after this over-counts, never under-counts
        entry = ledger.record(settings.release, delta, privacy.epsilon_budget)
    except (LedgerError, PrivacyBudgetExceeded) as error:
        raise SiteDeclined(str(error)) from None
    metrics = {"num-examples": float(len(dataset)), **result.metrics(), "train/steps": float(result.steps),
               **privacy_metrics(entry.epsilon_after, settings, privacy.epsilon_budget)}
    return arrays, metrics


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
