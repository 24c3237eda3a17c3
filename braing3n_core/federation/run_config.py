"""The federated run configuration: one YAML file, validated once, at the edge.

A run trains some of the stages mae → decoder → dit in that order, each with its own rounds, local
steps, learning-rate schedule and aggregation strategy, then (optionally) benchmarks the frozen encoder
with federated linear probes. Example (`runs-config/tiny.yaml`):

```yaml
name: tiny
preset: tiny
min_sites: 2
update_norm_bound: 50.0
stages:
  - {name: mae, rounds: 3, local_steps: 4, batch_size: 2}
  - {name: decoder, rounds: 2, local_steps: 3, strategy: {name: fedprox, mu: 0.01}}
  - {name: dit, rounds: 2, local_steps: 3, strategy: {name: fedadam, eta: 0.01}}
probes: {enabled: true, rounds: 3, local_steps: 20}
```

`start_from: {mae: path/to/checkpoint.json}` takes a finished stage from a checkpoint (written by this
run's server or by `braing3n train`) instead of training it, e.g. to train the DiT only. A stage given
there must not also be listed under `stages`.

Privacy layers (see `braing3n_core/privacy/` for the sites' own DP-SGD, set in each site YAML):
`client_dp` adds client-level DP through Flower's DP strategy wrappers; `secure_aggregation` runs a
stage's rounds through SecAgg+ (docs/secure-aggregation.md); `audit` makes the run a federated privacy
audit of a synthetic set staged by `braing3n synthesize`.

`fault_injection` exists for tests and drills only: each entry makes one site misbehave on purpose from
a given round (send NaN weights, an oversized update, decline, crash, or answer late) so that the server's
rejection and drop-out handling can be exercised in a real simulation. It is empty unless set, and the
server logs every injected fault.

Errors are `ConfigError`s naming the file and the field, like the site configuration's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, field_validator, model_validator

from braing3n_core.config import ConfigError, StrictModel, _read_yaml_mapping, _validate
from braing3n_core.fileio import atomic_write_bytes
from braing3n_core.models.diffusion import DEFAULT_STEPS
from braing3n_core.presets import PRESETS
from braing3n_core.runtime import cosine_lr
from braing3n_core.stage_names import DECODER, DIT, STAGE_NAMES, FederatedStep, StageName
from braing3n_core.training.stages import get_stage

# --- strategies ------------------------------------------------------------------------------------------


class FedAvgConfig(StrictModel):
    name: Literal["fedavg"] = "fedavg"


class FedProxConfig(StrictModel):
    name: Literal["fedprox"]
    mu: float = Field(0.01, gt=0.0, description="weight of the proximal term (μ/2)·‖w − w_global‖²")


class FedAvgMConfig(StrictModel):
    """Server momentum on the averaged update (Hsu et al. 2019): m ← β·m + (w − w_avg), w ← w − η_s·m.
    Not a free win: on the bench's non-IID cohort (tiny MAE, 10 × 75 steps, 3 seeds of real simulations)
    β = 0.5 probed below FedAvg (diagnosis bAcc 0.432 vs 0.463, age MAE 14.85 vs 14.35 years)."""

    name: Literal["fedavgm"]
    server_lr: float = Field(1.0, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)


class FedOptConfig(StrictModel):
    """Server-side adaptive optimisers (Reddi et al. 2021); `eta_l` is informational (clients use `lr`)."""

    name: Literal["fedadam", "fedyogi", "fedadagrad"]
    eta: float = Field(1e-2, gt=0.0)
    eta_l: float = Field(1e-1, gt=0.0)
    beta_1: float = Field(0.9, ge=0.0, lt=1.0)
    beta_2: float = Field(0.99, ge=0.0, lt=1.0)
    tau: float = Field(1e-3, gt=0.0)


class FedMedianConfig(StrictModel):
    name: Literal["fedmedian"]


class FedTrimmedAvgConfig(StrictModel):
    name: Literal["fedtrimmedavg"]
    beta: float = Field(0.2, ge=0.0, lt=0.5, description="fraction cut from each end per coordinate")


class KrumConfig(StrictModel):
    name: Literal["krum"]
    num_malicious_nodes: int = Field(0, ge=0)


class MultiKrumConfig(StrictModel):
    name: Literal["multikrum"]
    num_malicious_nodes: int = Field(0, ge=0)
    num_nodes_to_select: int = Field(1, ge=1)


StrategyConfig = Annotated[
    Union[FedAvgConfig, FedAvgMConfig, FedProxConfig, FedOptConfig, FedMedianConfig, FedTrimmedAvgConfig, KrumConfig, MultiKrumConfig],
    Field(discriminator="name"),
]
STRATEGY_NAMES: tuple[str, ...] = (
    "fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg", "krum", "multikrum",
)


# --- stages, probes, faults ---------------------------------------------------------------------------------


class StageRunConfig(StrictModel):
    """One federated stage. `lr`, `weight_decay` and `batch_size` default to the stage's own defaults."""

    name: StageName
    rounds: int = Field(ge=1)
    local_steps: int = Field(ge=1, description="optimizer steps each site runs per round")
    batch_size: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0.0, description="peak learning rate of the per-round cosine schedule")
    weight_decay: float | None = Field(None, ge=0.0)
    warmup_rounds: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    strategy: StrategyConfig = FedAvgConfig()
    evaluate_every: int = Field(1, ge=0, description="federated validation every k rounds (0: last round only)")

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy_shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):  # `strategy: fedmedian` is short for `strategy: {name: fedmedian}`
            value = {"name": value}
        if isinstance(value, dict) and value.get("name") not in STRATEGY_NAMES:
            raise ValueError(f"unknown strategy {value.get('name')!r}; choose one of {list(STRATEGY_NAMES)}")
        return value

    @model_validator(mode="after")
    def _warmup_fits(self) -> "StageRunConfig":
        if self.warmup_rounds >= self.rounds and self.rounds > 1:
            raise ValueError(f"warmup_rounds ({self.warmup_rounds}) must be fewer than rounds ({self.rounds})")
        return self

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else get_stage(self.name).defaults.lr

    @property
    def resolved_weight_decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else get_stage(self.name).defaults.weight_decay

    @property
    def resolved_batch_size(self) -> int:
        return self.batch_size if self.batch_size is not None else get_stage(self.name).defaults.batch_size

    def lr_at_round(self, server_round: int) -> float:
        """The sites' learning rate in round `server_round` (1-based): warm-up, then cosine over rounds."""
        return cosine_lr(self.resolved_lr, server_round - 1, self.rounds, self.warmup_rounds, self.min_lr_ratio)

    def evaluates_in(self, server_round: int) -> bool:
        last = server_round == self.rounds
        return last or (self.evaluate_every > 0 and server_round % self.evaluate_every == 0)


class ProbeRunConfig(StrictModel):
    """Federated linear probes on the frozen encoder (runs as soon as an encoder exists)."""

    enabled: bool = False
    rounds: int = Field(5, ge=1)
    local_steps: int = Field(20, ge=1, description="SGD steps per head per site per round")
    lr: float = Field(0.5, gt=0.0, description="SGD rate per feature: heads step with lr / F")
    batch_size: int = Field(32, ge=1)
    weight_decay: float = Field(1e-3, ge=0.0)


FaultKind = Literal["nan", "scale", "decline", "crash", "delay", "worker_crash"]


class FaultInjection(StrictModel):
    """Test/drill only: `site` misbehaves in `stage` from round `from_round` to `until_round` (inclusive).

    nan: replies with NaN weights; scale: multiplies its update by `factor` (trips the norm bound);
    decline: refuses the round with an error reply; crash: its handler raises (Flower reports an error);
    delay: trains normally but answers `factor` seconds late (a slow site; `round_timeout_s` bounds the wait);
    worker_crash: data-parallel worker 1 of the site (`workers` ≥ 2) is killed with SIGKILL as it starts the
    round, and the site declines it.
    """

    site: str
    stage: FederatedStep
    kind: FaultKind
    from_round: int = Field(1, ge=1)
    until_round: int | None = Field(None, ge=1)
    factor: float = 1000.0

    def active(self, stage: str, server_round: int) -> bool:
        return (stage == self.stage and server_round >= self.from_round
                and (self.until_round is None or server_round <= self.until_round))


# --- client-level DP and secure aggregation -------------------------------------------------------------


class ClientDPConfig(StrictModel):
    """Client-level (site-level) central DP through Flower's DP strategy wrappers.

    Each round's site updates are clipped to `clipping_norm` (on the server, or on the site with
    `side: client`) and the uniform mean gets N(0, (z·C/m)²) noise for m aggregated sites. ε is
    accounted over every DP round of the run by Flower's `RdpAccountant` (no sampling amplification:
    every site takes part) at `delta`; adaptive clipping (Andrew et al. 2021) is accounted at the same
    overall noise multiplier z, which Flower splits between the update and the clipped-count bits.
    """

    enabled: bool = False
    clipping: Literal["fixed", "adaptive"] = "fixed"
    side: Literal["server", "client"] = "server"
    noise_multiplier: float = Field(1.0, gt=0.0, description="z: noise std / clipping norm, for the sum")
    clipping_norm: float = Field(1.0, gt=0.0, description="C (adaptive: the initial C)")
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    max_epsilon: float | None = Field(None, gt=0.0, description="stop the run before a round would pass it")
    target_clipped_quantile: float = Field(0.5, ge=0.0, le=1.0)
    clip_norm_lr: float = Field(0.2, gt=0.0)
    clipped_count_stddev: float | None = Field(
        None, gt=0.0, description="adaptive; default max(n_sites / 20, noise_multiplier) (Flower needs z < 2σ_b)")
    stages: tuple[StageName, ...] = STAGE_NAMES

    def applies_to(self, stage: str) -> bool:
        return self.enabled and stage in self.stages


class SecureAggregationConfig(StrictModel):
    """SecAgg+ (Flower's legacy `SecAggPlusWorkflow` + `secaggplus_mod`): the server learns only the
    weighted sum of the sites' updates. Sites mask quantised updates w_site − w_global, so
    `clipping_range` bounds an update coordinate (a site whose update exceeds it declines the round),
    not a weight."""

    enabled: bool = False
    stages: tuple[StageName, ...] = STAGE_NAMES
    num_shares: float = Field(1.0, gt=0.0, description="≤ 1: fraction of the round's sites; > 2: a count")
    reconstruction_threshold: float = Field(0.67, gt=0.0, description="≤ 1: fraction of the shares; ≥ 2: a count")
    clipping_range: float = Field(1.0, gt=0.0, description="max |update coordinate| before quantisation")
    quantization_range: int = Field(2**22, gt=0)
    modulus_range: int = Field(2**32, gt=0)
    max_weight: float = Field(10000.0, gt=0.0, description="largest num-examples a site may weigh")

    def applies_to(self, stage: str) -> bool:
        return self.enabled and stage in self.stages

    def shares(self) -> int | float:
        return int(self.num_shares) if self.num_shares > 2 else float(min(self.num_shares, 1.0))

    def threshold(self) -> int | float:
        value = self.reconstruction_threshold
        return int(value) if value >= 2 else float(min(value, 1.0))


class AuditRunConfig(StrictModel):
    """A federated privacy audit of a staged synthetic set (written by `braing3n synthesize`): every site
    answers a `privacy_audit` query with aggregates and flags (`braing3n_core.privacy.audit`)."""

    synthetic: Path = Field(description="the staged set's manifest, <synthesize out>/staging/synthetic.json")
    dit: Path | None = Field(None, description="the DiT checkpoint, for the membership-inference test")
    mae: Path | None = Field(None, description="the MAE checkpoint, for its loss-threshold membership-inference test")


class GenerationEvalRunConfig(StrictModel):
    """A federated evaluation of a trained DiT + decoder (`braing3n evaluate-generation`): the server generates,
    every site scores against its held-out scans and answers aggregates (`braing3n_core.generation.evaluation`)."""

    dit: Path | None = Field(None, description="the DiT checkpoint manifest (None: the DiT this run trains or "
                                               "starts from)")
    decoder: Path | None = Field(None, description="the decoder checkpoint manifest (None: this run's decoder)")
    probes: Path | None = Field(None, description="federated probe heads (<run>/checkpoints/probes/final.json); "
                                                  "None: the evaluation trains them first (probes.enabled)")
    n: int = Field(32, ge=4, description="samples per generated set")
    steps: int = Field(DEFAULT_STEPS, ge=1, description="ODE steps of the default solver")
    guidance: tuple[float, ...] = Field((1.0, 1.5, 3.0), min_length=1, description="the guidance sweep")
    default_guidance: float = Field(1.5, ge=1.0, description="guidance of the swapped positive control and forecasts")
    forecast: bool = Field(False, description="also forecast every held-out subject with a follow-up")
    seed: int = 0


class RunConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    preset: str = "small"
    seed: int = 0
    min_sites: int = Field(2, ge=1, description="fewest accepted replies for a round to count")
    round_timeout_s: float = Field(3600.0, gt=0.0)
    update_norm_bound: float | None = Field(None, gt=0.0, description="max L2 norm of ‖w_site − w_global‖")
    stages: tuple[StageRunConfig, ...] = ()
    probes: ProbeRunConfig = ProbeRunConfig()
    start_from: dict[StageName, Path] = Field(default_factory=dict)
    fault_injection: tuple[FaultInjection, ...] = ()
    client_dp: ClientDPConfig = ClientDPConfig()
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()
    audit: AuditRunConfig | None = None
    generation_eval: GenerationEvalRunConfig | None = None
    source_file: Path | None = Field(default=None, exclude=True)

    @field_validator("preset")
    @classmethod
    def _preset_known(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; choose one of {sorted(PRESETS)}")
        return value

    @model_validator(mode="after")
    def _stages_consistent(self) -> "RunConfig":
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages: each stage may appear once, got {names}")
        if names != sorted(names, key=STAGE_NAMES.index):
            raise ValueError(f"stages must run in the order {list(STAGE_NAMES)}, got {names}")
        both = sorted(set(names) & set(self.start_from))
        if both:
            raise ValueError(f"start_from: {both} are also listed under stages; a stage is either trained or given")
        evaluates = self.audit is not None or self.generation_eval is not None
        if (any(get_stage(n).needs_encoder for n in names) or self.probes.enabled or evaluates) and not (
            "mae" in names or "mae" in self.start_from
        ):
            raise ValueError("the decoder, dit, probes, audit and generation_eval need an encoder: train the mae "
                             "stage or give start_from.mae")
        if not names and not self.probes.enabled and not evaluates:
            raise ValueError("nothing to do: list stages, enable probes or give an audit or a generation_eval")
        if self.generation_eval is not None and self.generation_eval.probes is None and not self.probes.enabled:
            raise ValueError("generation_eval: give probes (a federated probes checkpoint) or enable probes, so the "
                             "evaluation has heads to measure condition adherence with")
        for stage in (DECODER, DIT):
            if self.generation_eval is not None and getattr(self.generation_eval, stage) is None and not (
                    stage in names or stage in self.start_from):
                raise ValueError(f"generation_eval.{stage}: give a checkpoint, or train the {stage} stage in this run "
                                 f"(or give start_from.{stage})")
        self._privacy_layers_consistent()
        return self

    def _privacy_layers_consistent(self) -> None:
        dp, secagg = self.client_dp, self.secure_aggregation
        for stage in self.stages:
            strategy = stage.strategy.name
            if secagg.applies_to(stage.name) and strategy not in ("fedavg", "fedprox"):
                raise ValueError(f"secure_aggregation: stage {stage.name} uses {strategy}, which needs each site's "
                                 "update; under SecAgg+ the server sees only their sum: use fedavg or fedprox")
            if dp.applies_to(stage.name) and strategy not in ("fedavg", "fedprox"):
                raise ValueError(f"client_dp: stage {stage.name} uses {strategy}; the DP noise is calibrated to a "
                                 "uniform mean of clipped updates (FedAvg/FedProx aggregation)")
            if secagg.applies_to(stage.name) and dp.applies_to(stage.name) and (
                dp.side != "client" or dp.clipping != "fixed"
            ):
                raise ValueError("client_dp with secure_aggregation needs side: client and clipping: fixed (the "
                                 "server cannot clip, or count clipped updates, in a sum it cannot see)")
        if secagg.enabled and self.min_sites < 3:
            raise ValueError("secure_aggregation needs min_sites ≥ 3: with two sites each one can subtract its own "
                             "update from the sum and read the other's")

    def stage(self, name: str) -> StageRunConfig:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def faults_for(self, stage: str, server_round: int) -> dict[str, FaultInjection]:
        """Active injected faults by site id."""
        return {f.site: f for f in self.fault_injection if f.active(stage, server_round)}

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        raw = _read_yaml_mapping(path)
        base = path.parent.resolve()
        if isinstance(raw.get("start_from"), dict):  # checkpoint paths are relative to the YAML file
            raw["start_from"] = {
                k: str(v if Path(str(v)).is_absolute() else (base / str(v)).resolve()) for k, v in raw["start_from"].items()
            }
        for block, keys in (("audit", ("synthetic", "dit")), ("generation_eval", ("dit", "decoder", "probes"))):
            if isinstance(raw.get(block), dict):
                raw[block] = {k: (str(v if Path(str(v)).is_absolute() else (base / str(v)).resolve())
                                  if v and k in keys else v) for k, v in raw[block].items()}
        config = _validate(cls, raw, path)
        for stage, checkpoint in config.start_from.items():
            manifest = checkpoint if checkpoint.suffix == ".json" else checkpoint.with_suffix(".json")
            if not manifest.is_file():
                raise ConfigError(f"{path}: start_from.{stage}: checkpoint {manifest} not found")
        for block, keys in (("audit", ("synthetic", "dit")), ("generation_eval", ("dit", "decoder", "probes"))):
            settings = getattr(config, block)
            for key in keys if settings is not None else ():
                target = getattr(settings, key)
                if target is not None and not Path(target).with_suffix(".json").is_file():
                    raise ConfigError(f"{path}: {block}.{key}: {target} not found")
        return config.model_copy(update={"source_file": path.resolve()})

    def resolved(self) -> "RunConfig":
        """Stage defaults (lr, weight decay, batch size) written out, so the run folder states what ran."""
        stages = tuple(s.model_copy(update={"lr": s.resolved_lr, "weight_decay": s.resolved_weight_decay,
                                            "batch_size": s.resolved_batch_size}) for s in self.stages)
        return self.model_copy(update={"stages": stages})

    def same_recipe(self, other: "RunConfig") -> bool:
        """Whether two configurations describe the same run (what a resume requires)."""
        dump = lambda c: c.resolved().model_dump(mode="json", exclude={"source_file"})  # noqa: E731
        return dump(self) == dump(other)

    def to_yaml(self) -> str:
        """The resolved configuration (defaults filled in, absolute checkpoint paths), as written to the run folder."""
        return yaml.safe_dump(self.resolved().model_dump(mode="json"), sort_keys=False)


def write_resolved(config: RunConfig, path: Path) -> None:
    atomic_write_bytes(Path(path), config.to_yaml().encode())


__all__ = [
    "AuditRunConfig", "ClientDPConfig", "ConfigError", "FaultInjection", "GenerationEvalRunConfig", "ProbeRunConfig", "RunConfig",
    "SecureAggregationConfig", "StageRunConfig", "StrategyConfig", "write_resolved",
]
