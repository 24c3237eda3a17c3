"""The server↔site protocol: every message's kind, record names and typed payload, in one module.

Flower moves a `RecordDict` of named records between the ServerApp and a site's ClientApp. Both sides
build and read the `config` record, and the small `site` record of a reply, only through the payload
types below, so every key is spelled once: a field `local_steps` travels as the key `local-steps`, a
message that lacks a field raises `ProtocolError` naming the payload and the key at the first message,
and a misspelt field is a `TypeError` where the payload is built. Adding a query is one `Action`, one
payload class here, one handler in `client/app.py` and one caller in `server/`.

| Flower message | `config` record | other records, server → site | site → server |
|---|---|---|---|
| train, stage `mae`/`decoder`/`dit` | `TrainRequest` (+ `FaultDrill`, privacy keys) | `arrays`: the stage's global weights | `arrays`, `metrics`, `site` (`SiteReply`), `privacy` (DP sites) |
| train, stage `probes` | `ProbeRoundRequest` | `arrays`: the probe heads | `arrays`, `metrics`, `site` |
| evaluate, stage `mae`/`decoder`/`dit` | `EvaluateRequest` | `arrays` | `metrics`, `site` |
| evaluate, stage `probes` | `ProbeRoundRequest` | `arrays` | `metrics` (scores and additive sums), `site` |
| query `hello` | `Query` | — | `metrics` (problems), `site` (`Hello`) |
| query `install_encoder` | `Query` + `InstallEncoder` | `encoder` | `metrics` |
| query `token_moments` | `Query` + `TokenMomentsQuery` | — | `arrays` (count, Σ, Σ²; with `num_tokens`, the pairs' trend sums per cell), `metrics` |
| query `probe_census` | `Query` | — | `arrays` (feature sums, ridge moments), `metrics`, `site` (`ProbeCensus`) |
| query `privacy_audit` | `Query` + `PrivacyAuditQuery` | `synthetic`, `dit` (optional) | `metrics`, `site` (`AuditReply`) |
| query `generation_scores` | `Query` + `GenerationScoresQuery` | `features` (generated), `arrays` (probe heads) | `arrays` (moment and kernel sums), `metrics`, `site` (`ScoresReply`) |
| query `trend_census` | `Query` | — | `metrics`, `site` (`ScoresReply`: sums of annual change per cell) |
| query `forecast_scores` | `Query` + `ForecastScoresQuery` | `dit`, `decoder` | `metrics`, `site` (`ScoresReply`: sums of errors) |

Every message also carries the run's recipe in a `job` record (`JobRecipe`): a site that requires approval
refuses a message whose app or recipe it has not approved (`federation.approvals`), before reading any scan.

A site that cannot take part replies with Flower's `Error(code=DECLINED)` whose reason names the site and
the cause (`SiteDeclined`), instead of failing the round.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from enum import StrEnum
from functools import cache
from typing import Any, Self

import numpy as np
import torch

from braing3n_core.federation.arrays import Arrays
from braing3n_core.models import ChangeTrendSums, TokenMoments

DECLINED = 4001  # Error code of a clean refusal (vs Flower's own codes for crashes)
NUM_EXAMPLES = "num-examples"  # the metric every reply carries: FedAvg's weight n_k


class ProtocolError(ValueError):
    """A message lacks what its kind requires (a site and a server of different versions, or a bug)."""


class SiteDeclined(RuntimeError):
    """A site cannot take part in this request (no usable scans, missing encoder…); the message says why."""


class Record(StrEnum):
    """Names of the records of a message's RecordDict."""

    CONFIG = "config"  # ConfigRecord: the request's payload
    ARRAYS = "arrays"  # ArrayRecord: weights, heads or summed statistics
    METRICS = "metrics"  # MetricRecord: what strategies may average
    SITE = "site"  # ConfigRecord of a reply: who answered, and per-action results that are not metrics
    PRIVACY = "privacy"  # ConfigRecord of a DP site's reply: its ε (never averaged)
    ENCODER = "encoder"  # ArrayRecord: the frozen encoder (install_encoder)
    SYNTHETIC = "synthetic"  # ArrayRecord: the synthetic volumes to audit
    DIT = "dit"  # ArrayRecord: the DiT whose membership inference the audit measures, or which forecasts
    MAE = "mae"  # ArrayRecord: the whole MAE (encoder + pre-training decoder) the audit's membership test attacks
    DECODER = "decoder"  # ArrayRecord: the decoder (forecast evaluation)
    FEATURES = "features"  # ArrayRecord: pooled features of generated sets (generation evaluation)
    JOB = "job"  # ConfigRecord of every message the server sends: the run's recipe (`JobRecipe`)


class Action(StrEnum):
    """What a query message asks of a site."""

    HELLO = "hello"
    INSTALL_ENCODER = "install_encoder"
    TOKEN_MOMENTS = "token_moments"
    PROBE_CENSUS = "probe_census"
    PRIVACY_AUDIT = "privacy_audit"
    GENERATION_SCORES = "generation_scores"
    TREND_CENSUS = "trend_census"
    FORECAST_SCORES = "forecast_scores"


# --- typed payloads ------------------------------------------------------------------------------------------


def config_key(field_name: str) -> str:
    """The wire key of a payload field: `local_steps` → `local-steps` (Flower's FedProx adds `proximal-mu`)."""
    return field_name.replace("_", "-")


def _is_json(hint: Any) -> bool:
    """dict, list and optional ones travel as JSON text (a ConfigRecord holds only scalars and lists)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_json(arg) for arg in typing.get_args(hint) if arg is not type(None))
    return (typing.get_origin(hint) or hint) in (dict, list)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _decode(hint: Any, value: Any) -> Any:
    if _is_json(hint):
        return json.loads(str(value))
    scalar = typing.get_origin(hint) or hint
    if scalar is bool:
        return bool(value)
    if scalar in (int, float, str):
        return scalar(value)
    if isinstance(scalar, type) and issubclass(scalar, StrEnum):
        return scalar(str(value))
    raise TypeError(f"payload field of type {hint!r} cannot travel in a ConfigRecord")


@dataclass(frozen=True, kw_only=True)
class Payload:
    """Typed content of a ConfigRecord. Several payloads may share one record: each reads its own keys."""

    def to_config(self) -> dict[str, Any]:
        hints = _hints(type(self))
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[config_key(f.name)] = json.dumps(value) if _is_json(hints[f.name]) else value
        return out

    @classmethod
    def key(cls, field_name: str) -> str:
        """The wire key of one of this payload's fields; a field it does not have is an error."""
        if field_name not in {f.name for f in fields(cls)}:
            raise AttributeError(f"{cls.__name__} has no field {field_name!r}")
        return config_key(field_name)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        hints, values, missing = _hints(cls), {}, []
        for f in fields(cls):
            key = config_key(f.name)
            if key in config:
                try:
                    values[f.name] = _decode(hints[f.name], config[key])
                except (TypeError, ValueError) as error:
                    raise ProtocolError(f"{cls.__name__}: key {key!r} holds {config[key]!r} ({error})") from None
            elif f.default is MISSING and f.default_factory is MISSING:
                missing.append(key)
        if missing:
            raise ProtocolError(f"{cls.__name__} message lacks {missing}; it has {sorted(config)}")
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class RoundParams(Payload):
    """The settings of one federated training round of a stage (what `train_site_round` needs)."""

    stage: str
    server_round: int
    local_steps: int
    batch_size: int
    lr: float
    weight_decay: float
    proximal_mu: float = 0.0  # FedProx μ; Flower's FedProx strategy sets this key itself
    seed: int = 0
    rounds: int = 0  # the stage's total rounds (a site calibrating DP noise to a target ε needs it)
    run: str = ""  # the run's name (recorded in a site's privacy ledger)
    timeout_s: float = 0.0  # the server's round_timeout_s: a site's data-parallel workers give up by then (0: none)


@dataclass(frozen=True, kw_only=True)
class TrainRequest(RoundParams):
    """A stage's train message: the round's settings and the network to rebuild around the weights."""

    preset: str
    model_config: dict[str, Any]
    encoder_sha256: str = ""  # the frozen encoder, for the stages that read its tokens


@dataclass(frozen=True, kw_only=True)
class EvaluateRequest(Payload):
    stage: str
    preset: str
    model_config: dict[str, Any]
    batch_size: int
    encoder_sha256: str = ""


@dataclass(frozen=True, kw_only=True)
class ProbeRoundRequest(Payload):
    """A federated probe round (train) or the final scoring (evaluate) of the probe heads."""

    stage: str
    tasks: str  # JSON: the plan's tasks with their priors (`federation.probes.ProbePlan.tasks_json`)
    server_round: int
    local_steps: int
    lr: float
    batch_size: int
    weight_decay: float
    seed: int
    preset: str
    encoder_sha256: str


@dataclass(frozen=True, kw_only=True)
class FaultDrill(Payload):
    """A drill the run config asks of one site (`run_config.FaultInjection`); tests and rehearsals only."""

    fault: str = ""
    fault_factor: float = 0.0
    fault_site: str = ""  # the drilled site, where one config goes to every site (SecAgg+)

    def applies_to(self, site_id: str) -> bool:
        return bool(self.fault) and self.fault_site in ("", site_id)


@dataclass(frozen=True, kw_only=True)
class Query(Payload):
    action: Action
    preset: str
    encoder_sha256: str = ""


@dataclass(frozen=True, kw_only=True)
class InstallEncoder(Payload):
    encoder_config: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class TokenMomentsQuery(Payload):
    token_dim: int
    num_tokens: int = 0  # > 0: also the pairs' trend sums (`ChangeTrendSums`) over this many tokens


@dataclass(frozen=True, kw_only=True)
class PrivacyAuditQuery(Payload):
    n_synthetic: int
    dit_config: dict[str, Any] | None = None  # set when the DiT travels for membership inference
    mae_config: dict[str, Any] | None = None  # set when the whole MAE travels for membership inference


@dataclass(frozen=True, kw_only=True)
class GenerationScoresQuery(Payload):
    """Score generated sets against the site's held-out scans (`generation.evaluation`)."""

    kernels: dict[str, Any]  # space → FourierKernel fields: the MMD map every site shares
    tasks: str = ""  # JSON of the probe tasks with priors (the heads travel in `arrays`); empty: no ceiling
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class ForecastScoresQuery(Payload):
    """Forecast the site's held-out subjects and score them against their follow-ups (`generation.forecast_eval`)."""

    dit_config: dict[str, Any]
    decoder_config: dict[str, Any]
    trend: dict[str, Any]  # `TrendModel.to_json`, fitted on the training subjects of all sites
    steps: int
    guidance_scale: float
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class SiteReply(Payload):
    """The `site` record of every reply: who answered, and where it ran (`runtime.worker_placement`)."""

    site_id: str
    worker: str = ""


@dataclass(frozen=True, kw_only=True)
class Hello(SiteReply):
    has_encoder: bool
    scans: dict[str, int]  # usable scans per split


@dataclass(frozen=True, kw_only=True)
class ProbeCensus(SiteReply):
    census: dict[str, Any]  # label counts and sums only (`federation.probes.label_census`)


@dataclass(frozen=True, kw_only=True)
class AuditReply(SiteReply):
    audit: dict[str, Any]  # `privacy.audit.SiteAudit.to_json`: aggregates and one flag per synthetic scan


@dataclass(frozen=True, kw_only=True)
class ScoresReply(SiteReply):
    scores: dict[str, Any]  # aggregates over the site's scans only (counts, sums, distances between sets)


@dataclass(frozen=True, kw_only=True)
class ClientClipping(Payload):
    """Client-level DP with client-side clipping: the train handler's mod clips the reply's update."""

    client_dp_clipping: str = ""  # "fixed" | "adaptive"; empty: no clipping asked


@dataclass(frozen=True, kw_only=True)
class SecureRound(Payload):
    """What a site needs to put its update into a SecAgg+ sum (the server cannot screen a masked one)."""

    secagg_array_names: list[str]  # SecAgg+'s legacy Parameters carry no names
    secagg_clipping_range: float
    secagg_max_weight: float
    update_norm_bound: float = 0.0  # 0: none
    uniform_weight: bool = False  # client-level DP: every site weighs 1


@dataclass(frozen=True, kw_only=True)
class JobRecipe(Payload):
    """The run's canonical recipe (`federation.recipe.Recipe.to_json`), on every message: a site that runs
    approved jobs only hashes it itself and checks the request against it (`federation.approvals.admit`)."""

    recipe: str


# --- the Flower app's own settings -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AppSettings(Payload):
    """The run config of the Flower app (`[tool.flwr.app.config]` in pyproject.toml, `flwr run --run-config`)."""

    run_config: str = ""  # the run YAML (absolute path)
    run_dir: str = ""
    site_configs: str = ""  # simulation: comma-separated site YAMLs, indexed by the virtual node's partition-id
    expected_sites: int = 0  # deployment: sites to wait for (0: as many as site-configs lists)
    signing_key: str = ""  # deployment: Ed25519 key that signs the finished run's release
    tensorboard: str = ""  # TensorBoard log folder the ServerApp writes the metrics to (federation.metric_sinks)
    mlflow_tracking_uri: str = ""  # MLflow tracking URI (the submitter's MLFLOW_TRACKING_URI)
    mlflow_experiment: str = ""  # its MLFLOW_EXPERIMENT_NAME

    def site_config_paths(self) -> list[str]:
        return [p.strip() for p in self.site_configs.split(",") if p.strip()]

    def flwr_run_config(self) -> str:
        """The `flwr run --run-config` argument: every setting that is set, strings quoted."""
        return " ".join(f"{k}='{v}'" if isinstance(v, str) else f"{k}={v}"
                        for k, v in self.to_config().items() if v not in ("", 0))


@dataclass(frozen=True, kw_only=True)
class NodeSettings(Payload):
    """A SuperNode's node config: its site file (deployment) or its partition (simulation)."""

    site_config: str = ""
    partition_id: int = -1


# --- array payloads ----------------------------------------------------------------------------------------------


def moments_to_arrays(moments: TokenMoments) -> Arrays:
    return {"count": np.array([moments.count], dtype=np.float64), "total": moments.total.numpy(),
            "total_sq": moments.total_sq.numpy()}


def trend_to_arrays(sums: ChangeTrendSums) -> Arrays:
    # float32 on the wire: sums over a handful of pairs per cell lose nothing a trend can use, at half the bytes
    return {"trend_change_years": sums.change_years.float().numpy(), "trend_years_sq": sums.years_sq.numpy(),
            "trend_pairs": sums.pairs.numpy()}


def trend_from_arrays(arrays: Mapping[str, np.ndarray]) -> ChangeTrendSums:
    change_years = torch.from_numpy(np.asarray(arrays["trend_change_years"], dtype=np.float64))
    sums = ChangeTrendSums(*change_years.shape[2:])
    if change_years.shape != sums.change_years.shape:
        raise ProtocolError(f"trend sums of shape {list(change_years.shape)}, expected {list(sums.change_years.shape)}")
    sums.change_years = change_years
    sums.years_sq = torch.from_numpy(np.asarray(arrays["trend_years_sq"], dtype=np.float64)).reshape(sums.years_sq.shape)
    sums.pairs = torch.from_numpy(np.asarray(arrays["trend_pairs"], dtype=np.float64)).reshape(sums.pairs.shape)
    return sums


def moments_from_arrays(arrays: Mapping[str, np.ndarray]) -> TokenMoments:
    total = torch.from_numpy(np.asarray(arrays["total"], dtype=np.float64))
    moments = TokenMoments(total.shape[0])
    moments.count = int(np.asarray(arrays["count"]).item())
    moments.total, moments.total_sq = total, torch.from_numpy(np.asarray(arrays["total_sq"], dtype=np.float64))
    return moments
