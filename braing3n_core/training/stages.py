"""Training stages as data: MAE → decoder → DiT are three values of one `Stage` description.

A stage says which network it trains, whether it needs the frozen encoder, what one training example
is (a volume; tokens + volume; tokens + conditions + an optional baseline), its loss, its validation
metrics and its default hyper-parameters. The centralized trainer (`braing3n train`), the federated
site client and the benchmarks all run the same `train_steps` / `evaluate` on these descriptions, so a
new stage never touches the server loop or the client.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset

from braing3n_core.data.bids import ScanRecord
from braing3n_core.data.datasets import VolumeDataset
from braing3n_core.evaluation import metrics as metric_fns
from braing3n_core.models import CNNDecoder, DecoderConfig, DiT, DiTConfig, MAEConfig, MaskedAutoencoder
from braing3n_core.models.diffusion import training_loss
from braing3n_core.presets import Preset
from braing3n_core.stage_names import DECODER, DIT, MAE, STAGE_NAMES, StageName
from braing3n_core.training.examples import (
    Batch,
    SiteInputs,
    TokenConditionDataset,
    TokenVolumeDataset,
    condition_batch,
)

EVAL_SEED = 1234  # fixed masks / noise in validation, so successive rounds are comparable


@dataclass(frozen=True)
class StageDefaults:
    lr: float
    weight_decay: float
    batch_size: int


@dataclass(frozen=True)
class Stage:
    name: str
    needs_encoder: bool
    defaults: StageDefaults
    build: Callable[[Preset], nn.Module]
    model_config: Callable[[nn.Module], dict[str, Any]]
    from_config: Callable[[dict[str, Any]], nn.Module]
    dataset: Callable[[SiteInputs, Sequence[ScanRecord], bool], Dataset]  # (site, records, train) -> examples
    loss: Callable[[nn.Module, Batch, torch.Generator | None], tuple[Tensor, dict[str, float]]]
    evaluate_batch: Callable[[nn.Module, Batch], dict[str, float]]
    # The extra training metrics `loss` returns. Every round reports all of them (NaN when no step drew
    # an example, as a DP-SGD round can), so every site's reply carries the same metric names.
    train_metrics: tuple[str, ...] = ()


def _mae_loss(model: nn.Module, batch: Batch, generator: torch.Generator | None) -> tuple[Tensor, dict[str, float]]:
    output = model(batch["volume"], generator=generator)
    return output.loss, {}


def _mae_eval(model: nn.Module, batch: Batch) -> dict[str, float]:
    generator = torch.Generator(device=batch["volume"].device).manual_seed(EVAL_SEED)
    return {"val/masked_l1": float(model(batch["volume"], generator=generator).loss)}


def _decoder_loss(model: nn.Module, batch: Batch, generator: torch.Generator | None) -> tuple[Tensor, dict[str, float]]:
    result = model.loss(batch["tokens"], batch["volume"], generator)
    return result.loss, {"train/l1": float(result.l1), "train/ssim": float(result.ssim)}


def _decoder_eval(model: nn.Module, batch: Batch) -> dict[str, float]:
    recon = model(batch["tokens"]).float()
    target = batch["volume"].float()
    brain = target != 0
    return {
        "val/l1": float((recon - target).abs().mean()),
        "val/psnr": float(metric_fns.psnr(recon, target, mask=brain).mean()),
        "val/ssim": float(metric_fns.ssim(recon, target).mean()),
    }


def _dit_loss(model: nn.Module, batch: Batch, generator: torch.Generator | None) -> tuple[Tensor, dict[str, float]]:
    loss = training_loss(
        model, batch["tokens"], condition_batch(batch), baseline=batch["baseline"], interval=batch["interval"],
        generator=generator,
    )
    return loss, {}


def _dit_eval(model: nn.Module, batch: Batch) -> dict[str, float]:
    generator = torch.Generator(device=batch["tokens"].device).manual_seed(EVAL_SEED)
    loss = training_loss(
        model, batch["tokens"], condition_batch(batch), baseline=batch["baseline"], interval=batch["interval"],
        p_drop=0.0, p_drop_all=0.0, generator=generator,
    )
    return {"val/flow_loss": float(loss)}


def _volume_dataset(site: SiteInputs, records: Sequence[ScanRecord], train: bool) -> Dataset:
    return VolumeDataset(records, site.data.preset, site.data.cache, augment=train)


def _build_dit(preset: Preset) -> DiT:
    return DiT(DiTConfig.from_preset(preset))


STAGES: dict[StageName, Stage] = {
    MAE: Stage(
        name=MAE,
        needs_encoder=False,
        # AdamW 1e-4 / wd 0.05 is the reference recipe at batch 12 (spec §5); small batches on CPU sites
        # train faster with a higher rate, so the default is 1.5e-4 and the run config may override it.
        defaults=StageDefaults(lr=1.5e-4, weight_decay=0.05, batch_size=4),
        build=lambda preset: MaskedAutoencoder(MAEConfig.from_preset(preset)),
        model_config=lambda model: model.config.to_dict(),
        from_config=lambda config: MaskedAutoencoder(MAEConfig.from_dict(config)),
        dataset=_volume_dataset,
        loss=_mae_loss,
        evaluate_batch=_mae_eval,
    ),
    DECODER: Stage(
        name=DECODER,
        needs_encoder=True,
        defaults=StageDefaults(lr=3e-4, weight_decay=0.0, batch_size=4),
        build=lambda preset: CNNDecoder(DecoderConfig.from_preset(preset)),
        model_config=lambda model: model.config.to_dict(),
        from_config=lambda config: CNNDecoder(DecoderConfig.from_dict(config)),
        dataset=lambda site, records, train: TokenVolumeDataset(site, records),
        loss=_decoder_loss,
        evaluate_batch=_decoder_eval,
        train_metrics=("train/l1", "train/ssim"),
    ),
    DIT: Stage(
        name=DIT,
        needs_encoder=True,
        defaults=StageDefaults(lr=3e-4, weight_decay=0.0, batch_size=8),
        build=_build_dit,
        model_config=lambda model: model.config.to_dict(),
        from_config=lambda config: DiT(DiTConfig.from_dict(config)),
        dataset=lambda site, records, train: TokenConditionDataset(site, records),
        loss=_dit_loss,
        evaluate_batch=_dit_eval,
    ),
}


if tuple(STAGES) != STAGE_NAMES:  # the registry and the names every config validates against must agree
    raise ImportError(f"training.stages.STAGES describes {list(STAGES)}, stage_names declares {list(STAGE_NAMES)}")


def get_stage(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; choose one of {list(STAGE_NAMES)}") from None


def stage_dataset(stage: Stage, sites: Sequence[SiteInputs], split: str, train: bool | None = None) -> Dataset:
    """The split's examples of every given site (one site on a federated client; all when pooled)."""
    train = split == "train" if train is None else train
    parts = [stage.dataset(site, site.data.splits[split], train) for site in sites]
    parts = [p for p in parts if len(p)]
    return ConcatDataset(parts) if len(parts) != 1 else parts[0]
