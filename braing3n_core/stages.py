"""Training stages as data: MAE → decoder → DiT are three values of one `Stage` description.

A stage says which network it trains, whether it needs the frozen encoder, what one training example
is (a volume; tokens + volume; tokens + conditions + an optional baseline), its loss, its validation
metrics and its default hyper-parameters. The centralized trainer (`braing3n train`), the federated
site client and the benchmarks all run the same `train_steps` / `evaluate` on these descriptions, so a
new stage never touches the server loop or the client.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from braing3n_core import metrics as metric_fns
from braing3n_core.conditions import ConditionBatch, conditions_from_labels
from braing3n_core.data.bids import ScanRecord
from braing3n_core.data.cache import preprocess_scan
from braing3n_core.data.datasets import SiteData
from braing3n_core.diffusion import training_loss
from braing3n_core.models import CNNDecoder, DecoderConfig, DiT, DiTConfig, MAEConfig, MaskedAutoencoder, TokenMoments
from braing3n_core.presets import Preset
from braing3n_core.runtime import autocast
from braing3n_core.tokens import TokenCache

Batch = dict[str, Tensor]
EVAL_SEED = 1234  # fixed masks / noise in validation, so successive rounds are comparable


@dataclass(frozen=True)
class StageDefaults:
    lr: float
    weight_decay: float
    batch_size: int


@dataclass(frozen=True)
class SiteInputs:
    """What one site contributes to a stage: its data, and (after stage 1) its token cache."""

    data: SiteData
    tokens: TokenCache | None = None


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


# --- datasets ------------------------------------------------------------------------------------------


class TokenVolumeDataset(Dataset):
    """Decoder examples: `{"tokens": [N, E], "volume": [1, D, H, W]}` from the two caches."""

    def __init__(self, site: SiteInputs, records: Sequence[ScanRecord]) -> None:
        if site.tokens is None:
            raise ValueError("the decoder stage needs a token cache (a frozen encoder)")
        self.tokens, self.data = site.tokens, site.data
        self.records = list(site.tokens.ensure(records))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Batch:
        record = self.records[index]
        volume = preprocess_scan(record.path, self.data.preset, self.data.cache)
        return {"tokens": self.tokens.tokens(record), "volume": torch.from_numpy(volume)}


class TokenConditionDataset(Dataset):
    """DiT examples: every scan cross-sectionally, plus every (earlier → later) pair of sessions of one
    subject and modality for longitudinal forecasting.

    `{"tokens": [N, E], "baseline": [N, E] (NaN when none), "interval": [] years (NaN when none),
    and one [] tensor per conditioning variable}`. The conditions are the follow-up scan's own.
    """

    def __init__(self, site: SiteInputs, records: Sequence[ScanRecord]) -> None:
        if site.tokens is None:
            raise ValueError("the DiT stage needs a token cache (a frozen encoder)")
        self.tokens = site.tokens
        self.records = list(site.tokens.ensure(records))
        self.pairs = longitudinal_pairs(self.records)
        self.examples: list[tuple[int, int | None]] = [(i, None) for i in range(len(self.records))] + self.pairs
        self.conditions = conditions_from_labels([r.labels for r in self.records], [r.modality for r in self.records])
        self._num_tokens = site.data.preset.num_tokens

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Batch:
        target, baseline = self.examples[index]
        tokens = self.tokens.tokens(self.records[target])
        item = {"tokens": tokens}
        if baseline is None:
            item["baseline"] = torch.full_like(tokens, math.nan)
            item["interval"] = torch.tensor(math.nan)
        else:
            item["baseline"] = self.tokens.tokens(self.records[baseline])
            item["interval"] = torch.tensor(self.records[target].labels.age - self.records[baseline].labels.age)
        for name, values in self.conditions.tensors().items():
            item[name] = values[target]
        return item


def longitudinal_pairs(records: Sequence[ScanRecord]) -> list[tuple[int, int]]:
    """(follow-up index, baseline index) for each pair of sessions of one subject and modality whose
    ages are known and increase."""
    by_subject: dict[tuple[str, str, str], list[int]] = {}
    for index, record in enumerate(records):
        if record.session is not None and record.labels.age is not None:
            by_subject.setdefault((record.site_id, record.subject, record.modality.value), []).append(index)
    pairs = []
    for indices in by_subject.values():
        indices.sort(key=lambda i: records[i].labels.age)
        for later_position, later in enumerate(indices):
            for earlier in indices[:later_position]:
                if records[later].labels.age > records[earlier].labels.age:
                    pairs.append((later, earlier))
    return sorted(pairs)


def condition_batch(batch: Batch) -> ConditionBatch:
    return ConditionBatch(**{f.name: batch[f.name] for f in fields(ConditionBatch)})


# --- losses and validation -----------------------------------------------------------------------------


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
    from braing3n_core.data.datasets import VolumeDataset

    return VolumeDataset(records, site.data.preset, site.data.cache, augment=train)


def _build_dit(preset: Preset) -> DiT:
    return DiT(DiTConfig.from_preset(preset))


STAGES: dict[str, Stage] = {
    "mae": Stage(
        name="mae",
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
    "decoder": Stage(
        name="decoder",
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
    "dit": Stage(
        name="dit",
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
STAGE_ORDER: tuple[str, ...] = ("mae", "decoder", "dit")


def get_stage(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; choose one of {list(STAGES)}") from None


def stage_dataset(stage: Stage, sites: Sequence[SiteInputs], split: str, train: bool | None = None) -> Dataset:
    """The split's examples of every given site (one site on a federated client; all when pooled)."""
    train = split == "train" if train is None else train
    parts = [stage.dataset(site, site.data.splits[split], train) for site in sites]
    parts = [p for p in parts if len(p)]
    return ConcatDataset(parts) if len(parts) != 1 else parts[0]


def token_moments(dataset: Dataset, token_dim: int) -> TokenMoments:
    """Per-channel token sums over a DiT dataset's cross-sectional examples (each scan once)."""
    moments = TokenMoments(token_dim)
    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    for part in parts:
        for record in part.records:
            moments.add(part.tokens.tokens(record))
    return moments


# --- the training step shared by every face of the system --------------------------------------------


@dataclass
class ProximalTerm:
    """FedProx: (μ/2)·‖w − w_global‖², keeping a site's local steps near the global model."""

    mu: float
    global_params: list[Tensor]

    @classmethod
    def of(cls, model: nn.Module, mu: float) -> "ProximalTerm":
        return cls(mu, [p.detach().clone() for p in model.parameters() if p.requires_grad])

    def __call__(self, model: nn.Module) -> Tensor:
        params = [p for p in model.parameters() if p.requires_grad]
        return 0.5 * self.mu * sum((p - g).pow(2).sum() for p, g in zip(params, self.global_params))


@dataclass
class TrainResult:
    steps: int
    examples: int
    loss: float  # mean training loss over the steps
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        return {"train/loss": self.loss, "train/examples": float(self.examples), "train/seconds": self.seconds,
                "train/examples_per_s": self.examples_per_second, **self.extra}


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def train_steps(
    stage: Stage,
    model: nn.Module,
    batches: Iterator[Batch],
    optimizer: torch.optim.Optimizer,
    steps: int,
    lr_at: Callable[[int], float],
    device: torch.device,
    generator: torch.Generator | None = None,
    proximal: ProximalTerm | None = None,
    on_step: Callable[[int, float, int], None] | None = None,
    max_grad_norm: float | None = 1.0,
) -> TrainResult:
    """Run `steps` optimizer steps of `stage` on `model`.

    `lr_at(i)` gives the learning rate of local step i (the caller owns the schedule: a global cosine in
    centralized training, the round's rate in federated training). `on_step(i, loss, examples)` feeds
    progress bars. Gradients are clipped to `max_grad_norm` (None disables; under DP-SGD the privacy
    engine clips per sample instead, see `privacy.dp`). An empty batch (`{}`, which DP-SGD's Poisson
    sampling can draw) takes an optimizer step without a loss; a round of only empty batches reports NaN
    for the loss and for each of the stage's `train_metrics`.
    """
    model.train()
    started = time.perf_counter()
    losses: list[float] = []
    extras: dict[str, list[float]] = {name: [] for name in stage.train_metrics}
    examples = 0
    for step in range(steps):
        batch = to_device(next(batches), device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        if not batch:  # DP-SGD's Poisson sampling drew nobody: the step still happens (noise only)
            optimizer.zero_grad(set_to_none=True)
            optimizer.step()
            if on_step is not None:
                on_step(step, math.nan, 0)
            continue
        with autocast(device):
            loss, extra = stage.loss(model, batch, generator)
            if proximal is not None:
                loss = loss + proximal(model)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"stage {stage.name}: non-finite training loss {float(loss)} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        batch_size = next(iter(batch.values())).shape[0]
        examples += batch_size
        losses.append(float(loss.detach()))
        if undeclared := set(extra) - set(extras):
            raise KeyError(f"stage {stage.name}: loss returned {sorted(undeclared)}, not in its train_metrics")
        for key, value in extra.items():
            extras[key].append(value)
        if on_step is not None:
            on_step(step, losses[-1], batch_size)
    return TrainResult(
        steps=steps,
        examples=examples,
        loss=float(np.mean(losses)) if losses else math.nan,
        seconds=time.perf_counter() - started,
        extra={k: float(np.mean(v)) if v else math.nan for k, v in extras.items()},
    )


@torch.no_grad()
def evaluate(stage: Stage, model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Example-weighted means of the stage's validation metrics over `loader`, plus `val/examples`."""
    model.eval()
    totals: dict[str, float] = {}
    count = 0
    for batch in loader:
        batch = to_device(batch, device)
        size = next(iter(batch.values())).shape[0]
        with autocast(device):
            values = stage.evaluate_batch(model, batch)
        for key, value in values.items():
            totals[key] = totals.get(key, 0.0) + value * size
        count += size
    return {**{k: v / count for k, v in totals.items()}, "val/examples": float(count)} if count else {"val/examples": 0.0}


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW without weight decay on biases, norm scales and lookup tables (CLS/mask tokens, condition
    embeddings), as in the MAE and DiT recipes: decaying those only shrinks them towards zero."""
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2 and id(p) not in lookups]
    no_decay = [p for p in model.parameters() if p.requires_grad and (p.ndim < 2 or id(p) in lookups)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95))


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """What a stage sends and checkpoints: the model's persistent state (fp32, CPU)."""
    return {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
            for k, v in model.state_dict().items()}
