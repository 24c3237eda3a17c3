"""Subject-level DP-SGD on a site, with Opacus, through the one shared training loop.

**The privacy unit is the subject.** A subject has several sessions and modalities, and the DiT stage
adds longitudinal pairs of them, so a stage's examples are not independent records: counting them as
such would understate ε by the number of examples per subject (group privacy multiplies ε by k). We
therefore *sample by subject*: each DP-SGD step includes every training subject independently with
probability q = batch_size / n_subjects (Poisson sampling, the setting the RDP/PRV analysis of the
subsampled Gaussian mechanism assumes), and an included subject contributes exactly ONE of its examples,
drawn uniformly at random. With per-example gradients clipped to C, adding or removing a subject changes
the step's gradient sum by at most C, so the accountant's (q, σ) guarantee holds per subject, exactly —
no group-size factor. The random choice of example is the mechanism's internal randomness; over many
steps every session, modality and pair is still used.

What this module does:
- `subject_groups`: which examples belong to which subject, for every stage's dataset;
- `SubjectPoissonSampler`: the batch sampler above (a step may draw no subject at all; the step still
  happens, with noise only, because the accountant counts it);
- `resolve_round`: σ (given, or calibrated from a target ε over the stage's whole schedule), q and δ;
- `make_private`: Opacus' `GradSampleModule` hooks on the model's own layers plus a `DPOptimizer`
  around the site's AdamW. The model object itself goes into `stages.train_steps`, the loop every face
  of the system runs; the hooks record per-sample gradients and the optimizer clips each to C, sums,
  adds N(0, σ²C²) and divides by the expected batch size q·n. The loop's non-private global clip is off
  (`max_grad_norm=None`): the per-sample clip replaces it. FedProx's proximal gradient is data-
  independent, so it is added after the noise (post-processing), never through the per-sample path.

Randomness: the subject draw and the DP noise come from OS entropy, never from the run's seed. That
seed reaches the server in every train message; a server that could replay the noise or the sample
could subtract the noise and see which subjects were used. DP rounds are therefore not bit-reproducible.

Scope of the guarantee (what a site releases and whether DP covers it):
- the weights a DP-SGD round sends: yes, per subject, accounted in the ledger (`privacy/ledger.py`);
- the site's number of subjects and scans (`hello`, `num-examples`, q): no, treated as public;
- the DiT's token statistics query, the probe census and probe heads, validation metrics, and the
  privacy audit's aggregate distances: not covered by this ε; they are aggregates over many scans and
  are listed in the run's data card, but a strict deployment should disable them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from braing3n_core.privacy.ledger import Release
from braing3n_core.site_config import SitePrivacyConfig

DEFAULT_MAX_DELTA = 1e-5


# --- subjects ----------------------------------------------------------------------------------------


def _subject_of(record: Any) -> str:
    return f"{record.site_id}/{record.subject}"


def example_subjects(dataset: Dataset) -> list[str]:
    """The subject behind each example of a stage dataset (`site/subject`), in index order."""
    if isinstance(dataset, ConcatDataset):
        return [s for part in dataset.datasets for s in example_subjects(part)]
    records = getattr(dataset, "records", None)
    if records is None:
        raise TypeError(f"{type(dataset).__name__} does not say whose examples it holds (no `records`)")
    examples = getattr(dataset, "examples", None)
    if examples is not None:  # DiT: (target, baseline) index pairs, always of one subject
        return [_subject_of(records[target]) for target, _ in examples]
    return [_subject_of(r) for r in records]


def subject_groups(dataset: Dataset) -> list[list[int]]:
    """Example indices grouped by subject (groups in first-appearance order)."""
    groups: dict[str, list[int]] = {}
    for index, subject in enumerate(example_subjects(dataset)):
        groups.setdefault(subject, []).append(index)
    return list(groups.values())


def default_delta(subjects: int) -> float:
    """δ well below 1/n: min(1e-5, 0.1/n) for n subjects."""
    return min(DEFAULT_MAX_DELTA, 0.1 / max(1, subjects))


def os_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from OS entropy (see the module docstring: never from the run's public seed)."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little") & (2**63 - 1))


class SubjectPoissonSampler(Sampler[list[int]]):
    """`steps` batches; each includes every subject with probability `sample_rate`, one example each."""

    def __init__(self, groups: Sequence[Sequence[int]], sample_rate: float, steps: int,
                 generator: torch.Generator | None = None) -> None:
        if not groups or any(len(g) == 0 for g in groups):
            raise ValueError("need at least one subject, each with at least one example")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")
        self.groups = [list(g) for g in groups]
        self.sample_rate, self.steps = sample_rate, steps
        self.generator = generator if generator is not None else os_generator()

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        sizes = torch.tensor([len(g) for g in self.groups])
        for _ in range(self.steps):
            chosen = torch.rand(len(self.groups), generator=self.generator) < self.sample_rate  # [n subjects]
            picks = (torch.rand(len(self.groups), generator=self.generator) * sizes).long()  # one example each
            yield [self.groups[s][int(picks[s])] for s in torch.nonzero(chosen).flatten().tolist()]


class OwnExamples(Dataset):
    """A stage dataset whose examples are returned only if they are the ones asked for: `VolumeDataset`
    replaces an unreadable scan by the next one, which may be another subject's; under DP that example
    is dropped instead, so no subject enters a step twice."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if isinstance(item, dict) and "index" in item and int(item["index"]) != index:
            return None
        return item


def _collate_possibly_empty(items: list[Any]) -> dict[str, Tensor]:
    items = [i for i in items if i is not None]
    return default_collate(items) if items else {}  # {}: a step that drew nobody


def subject_loader(dataset: Dataset, sample_rate: float, steps: int, generator: torch.Generator | None = None) -> DataLoader:
    """Exactly `steps` Poisson-by-subject batches of `dataset` (an empty batch is `{}`)."""
    sampler = SubjectPoissonSampler(subject_groups(dataset), sample_rate, steps, generator)
    return DataLoader(OwnExamples(dataset), batch_sampler=sampler, collate_fn=_collate_possibly_empty)


# --- one round's settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DPRound:
    """The DP-SGD settings of one site round, and the release the ledger records for it."""

    release: Release
    delta: float

    @property
    def expected_batch_size(self) -> float:
        return self.release.sample_rate * self.release.subjects


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """σ such that `steps` steps at rate q spend `target_epsilon` at δ (Opacus' binary search)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=accountant, epsilon_tolerance=0.005))


def resolve_round(config: SitePrivacyConfig, stage: str, server_round: int, subjects: int, batch_size: int,
                  local_steps: int, total_rounds: int, delta: float, run: str = "") -> DPRound:
    """σ, q and δ of one round. A target ε is spread over the stage's whole schedule (total_rounds ×
    local_steps at this q), so every round of the stage uses the same σ."""
    if subjects < 1:
        raise ValueError("DP-SGD needs at least one training subject")
    settings = config.stage(stage)
    sample_rate = min(1.0, batch_size / subjects)
    sigma = settings.noise_multiplier
    if sigma is None:
        if total_rounds < 1:
            raise ValueError(f"stage {stage}: privacy.target_epsilon needs the stage's number of rounds from the server")
        sigma = calibrate_noise(float(settings.target_epsilon), delta, sample_rate, total_rounds * local_steps,
                                config.accountant)
    release = Release(stage=stage, server_round=server_round, sample_rate=sample_rate, noise_multiplier=float(sigma),
                      steps=local_steps, max_grad_norm=settings.max_grad_norm, subjects=subjects, run=run)
    return DPRound(release, delta)


# --- Opacus -----------------------------------------------------------------------------------------------


def _dp_optimizer_class(distributed: bool = False) -> type:
    from opacus.optimizers import DistributedDPOptimizer, DPOptimizer

    class SubjectDPOptimizer(DistributedDPOptimizer if distributed else DPOptimizer):  # type: ignore[misc, valid-type]
        """Opacus' DPOptimizer (or, data-parallel, its `DistributedDPOptimizer`), plus: a step whose Poisson
        draw was empty adds noise only (the accountant counts every step), and a data-independent gradient
        (FedProx) can be added after the noise.

        Distributed, every worker clips its own examples' gradients, rank 0 alone adds N(0, σ²C²), and the
        sums are all-reduced: one noise draw per step for the global batch, as in one process. FedProx's
        term is added by every worker and averaged over them, so it counts once."""

        def __init__(self, *args: Any, after_noise: Callable[[], None] | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if after_noise is not None:
                self.attach_step_hook(lambda _optimizer: after_noise())

        def pre_step(self, closure: Callable[[], float] | None = None) -> bool | None:
            if all(getattr(p, "grad_sample", None) is None for p in self.params):
                for p in self.params:  # an empty batch: zero examples' gradients, i.e. [0, *shape]
                    p.grad_sample = p.new_zeros((0, *p.shape))
            return super().pre_step(closure)

    return SubjectDPOptimizer


@dataclass
class PrivateTraining:
    """The Opacus pieces of one DP round. `model` (hooked in place) goes into `train_steps` as is."""

    model: nn.Module
    grad_sample_module: Any
    optimizer: torch.optim.Optimizer

    def close(self) -> None:
        """Remove the hooks and the per-sample attributes: the model is a plain module again."""
        self.grad_sample_module.cleanup()


def conv3d_grad_sample(layer: nn.Conv3d, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradients of a Conv3d: all B weight gradients from one grouped weight-gradient convolution.

    Opacus' generic sampler unfolds the input (im2col: C_in·k³ numbers per output voxel per sample) and
    contracts it with the output gradients; for the decoder's full-resolution 3D convolutions that
    tensor is the cost of the whole DP step. Here the batch is folded into the channels ([1, B·C_in, …]
    against [1, B·C_out, …], groups = B·g), so the backend's own weight-gradient kernel computes every
    sample's gradient in one call. One call per sample computes the same (checked against Opacus' sampler
    in tests/test_privacy.py) but runs each at batch 1, where PyTorch's CPU dispatch leaves oneDNN for its
    slow im2col convolution on most `small` decoder layers: the grouped call took 2.2x less time at B = 2
    and 1.9x less at B = 4 over the `small` decoder's layers.
    """
    x = activations[0].to(backprops.dtype)  # [B, C_in, D, H, W]
    out: dict[nn.Parameter, Tensor] = {}
    batch = x.shape[0]
    if layer.weight.requires_grad:
        if batch == 0:
            out[layer.weight] = layer.weight.new_zeros((0, *layer.weight.shape))
        else:
            folded_input = x.contiguous().view(1, batch * x.shape[1], *x.shape[2:])
            folded_grads = backprops.contiguous().view(1, batch * backprops.shape[1], *backprops.shape[2:])
            weight = torch.nn.grad.conv3d_weight(
                folded_input, (batch * layer.weight.shape[0], *layer.weight.shape[1:]), folded_grads,
                stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=batch * layer.groups)
            out[layer.weight] = weight.view(batch, *layer.weight.shape)  # [B, C_out, C_in/g, k, k, k]
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dim=(2, 3, 4))  # [B, C_out]
    return out


def _grad_sample_module_class() -> type:
    from opacus import GradSampleModule

    class SubjectGradSampleModule(GradSampleModule):
        """Opacus' hooks with the faster Conv3d sampler above (a class attribute: no global registry change)."""

        GRAD_SAMPLERS = {**GradSampleModule.GRAD_SAMPLERS, nn.Conv3d: conv3d_grad_sample}

    return SubjectGradSampleModule


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, settings: DPRound,
                 after_noise: Callable[[], None] | None = None, noise_generator: torch.Generator | None = None,
                 distributed: bool = False) -> PrivateTraining:
    """Hook `model` for per-sample gradients and wrap `optimizer` to clip each to C and add N(0, σ²C²).

    `distributed`: this process is one worker of the initialised default process group, holding its share
    of each step's global Poisson sample; the noise is added once (rank 0) and the expected batch size
    q·n is the global one, split evenly over the workers as Opacus' distributed optimizer expects."""
    from opacus.validators import ModuleValidator

    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        raise ValueError(f"{type(model).__name__} cannot train under DP-SGD: {problems}")
    device = next(model.parameters()).device
    hooked = _grad_sample_module_class()(model, loss_reduction="mean")
    release = settings.release
    # Opacus divides each worker's noised sum by its expected batch size, then averages over the W workers:
    # (Σ_r sum_r + noise) / (q·n), the single-process gradient.
    world = torch.distributed.get_world_size() if distributed else 1
    dp_optimizer = _dp_optimizer_class(distributed)(
        optimizer, noise_multiplier=release.noise_multiplier, max_grad_norm=release.max_grad_norm,
        expected_batch_size=settings.expected_batch_size / world, loss_reduction="mean",
        generator=noise_generator if noise_generator is not None else os_generator(device), after_noise=after_noise,
    )
    return PrivateTraining(model, hooked, dp_optimizer)


def proximal_after_noise(model: nn.Module, mu: float) -> Callable[[], None]:
    """FedProx under DP: add μ(w − w_global) to the privatised gradient (it touches no data)."""
    anchors = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    def add() -> None:
        with torch.no_grad():
            for param, anchor in anchors:
                if param.grad is not None:
                    param.grad.add_(param - anchor, alpha=mu)

    return add


def privacy_metrics(entry_epsilon: float, settings: DPRound, budget: float) -> dict[str, float]:
    """The `privacy/*` values a site reports for a DP round (one vocabulary with the report)."""
    release = settings.release
    return {"privacy/epsilon": entry_epsilon, "privacy/delta": settings.delta, "privacy/budget": budget,
            "privacy/noise_multiplier": release.noise_multiplier, "privacy/sample_rate": release.sample_rate,
            "privacy/max_grad_norm": release.max_grad_norm, "privacy/steps": float(release.steps),
            "privacy/subjects": float(release.subjects),
            "privacy/budget_left": max(0.0, budget - entry_epsilon) if math.isfinite(entry_epsilon) else 0.0}
