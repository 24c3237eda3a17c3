"""Which Flower strategy aggregates a stage, and which replies it may see.

Every train reply is screened before aggregation (`screen_replies`): an error reply is a *declined*
site; a reply without exactly one ArrayRecord and one MetricRecord, with keys / shapes / dtypes that
differ from the global arrays, NaN or Inf values, a non-positive example count, or an update
‖w_site − w_global‖₂ above the run's `update_norm_bound` is *rejected*. Each verdict names its site.
Only accepted replies reach the strategy, so one broken hospital never spoils a round; differing metric
names (sites on different client versions) are no reason to reject one.

Strategies come from Flower's Message API (`flwr.serverapp.strategy`); FedAdam/FedYogi/FedAdagrad keep
moments (`m_t`, `v_t`) and FedAvgM its momentum across rounds, which `strategy_state` /
`restore_strategy_state` move in and out of the per-round checkpoint so a resumed run continues the same
optimiser trajectory.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from braing3n_core.federation.arrays import ArraysView
from braing3n_core.federation.protocol import Record, SiteReply
from braing3n_core.federation.replies import check_metrics, check_reply_arrays, weighted_mean
from braing3n_core.federation.run_config import (
    FedAvgConfig,
    FedAvgMConfig,
    FedMedianConfig,
    FedOptConfig,
    FedProxConfig,
    FedTrimmedAvgConfig,
    KrumConfig,
    MultiKrumConfig,
    StrategyConfig,
)

_FEDOPT = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}
_STATE = ("m_t", "v_t", "momentum")  # named optimiser state of the strategies above and of ServerMomentum


class ServerMomentum(FedAvgM):
    """Flower's FedAvgM, with two changes for this server. Each round steps from the global weights the
    round loop hands it (Flower's keeps its own last aggregate, which the loop may change afterwards, e.g.
    with central DP noise). Its momentum is named by array (Flower's is a list in array order), so it is
    checkpointed and restored like FedAdam's moments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.momentum: dict[str, np.ndarray] | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current_arrays = arrays
        self.momentum_vector = None if self.momentum is None else [self.momentum[k] for k in arrays]
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        keys = list(self.current_arrays or {})
        result = super().aggregate_train(server_round, replies)
        if self.momentum_vector is not None:
            self.momentum = dict(zip(keys, (np.asarray(v) for v in self.momentum_vector), strict=True))
        return result


def aggregate_train_metrics(replies: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Flower's example-weighted mean of each train metric, over the sites whose value is finite: a
    DP-SGD round that drew nobody has no loss (NaN), which must not turn the round's mean into NaN."""
    metrics = [metric_record(reply) for reply in replies]
    weights = [float(m[weighting_key]) for m in metrics]
    names = [name for name in metrics[0] if name != weighting_key]
    return MetricRecord({name: weighted_mean([(float(m[name]), w) for m, w in zip(metrics, weights)]) for name in names})


def build_strategy(config: StrategyConfig, min_sites: int) -> FedAvg:
    """A fresh strategy object per stage (strategies hold per-stage state such as FedAdam's moments)."""
    common = dict(min_train_nodes=min_sites, min_evaluate_nodes=min_sites, min_available_nodes=min_sites,
                  train_metrics_aggr_fn=aggregate_train_metrics)
    if isinstance(config, FedAvgConfig):
        return FedAvg(**common)
    if isinstance(config, FedAvgMConfig):
        return ServerMomentum(**common, server_learning_rate=config.server_lr, server_momentum=config.momentum)
    if isinstance(config, FedProxConfig):
        return FedProx(**common, proximal_mu=config.mu)
    if isinstance(config, FedOptConfig):
        return _FEDOPT[config.name](**common, eta=config.eta, eta_l=config.eta_l, beta_1=config.beta_1,
                                    beta_2=config.beta_2, tau=config.tau)
    if isinstance(config, FedMedianConfig):
        return FedMedian(**common)
    if isinstance(config, FedTrimmedAvgConfig):
        return FedTrimmedAvg(**common, beta=config.beta)
    if isinstance(config, KrumConfig):
        return Krum(**common, num_malicious_nodes=config.num_malicious_nodes)
    if isinstance(config, MultiKrumConfig):
        return MultiKrum(**common, num_malicious_nodes=config.num_malicious_nodes,
                         num_nodes_to_select=config.num_nodes_to_select)
    raise ValueError(f"no strategy for {config!r}")


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """Optimiser state a strategy carries between rounds, as named arrays (empty for stateless ones)."""
    state: dict[str, np.ndarray] = {}
    for name in _STATE:
        for key, value in (getattr(strategy, name, None) or {}).items():
            state[f"{name}.{key}"] = np.asarray(value)
    return state


def restore_strategy_state(strategy: Strategy, state: Mapping[str, np.ndarray]) -> None:
    for name in _STATE:
        values = {k[len(name) + 1 :]: np.array(v) for k, v in state.items() if k.startswith(name + ".")}
        if values:
            setattr(strategy, name, values)


def as_reference_dtypes(arrays: ArrayRecord, reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Aggregates in the global arrays' dtypes (FedOpt's numpy arithmetic may promote fp32 to fp64).

    Consumes `arrays`: each serialized array leaves the record as it is converted, so the aggregate is
    never held twice (at `paper` the DiT's 2.6 GB)."""
    return {k: arrays.pop(k).numpy().astype(reference[k].dtype, copy=False) for k in reference}


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


@dataclass(frozen=True)
class Verdict:
    node_id: int
    site: str
    kind: str  # "accepted" | "rejected" | "declined"
    reason: str = ""
    update_norm: float = float("nan")


_REFUSED_BY = re.compile(r"^site ([A-Za-z0-9][A-Za-z0-9_-]*)[: ]")


def reply_site(message: Message, node_sites: Mapping[int, str]) -> str:
    """The site a reply speaks for: the one it names, else the one its node introduced itself as, else (a site
    that refused even `hello`, e.g. a job it has not approved) the one its refusal names."""
    node = message.metadata.src_node_id
    if message.has_content() and Record.SITE in message.content.config_records:
        named = message.content.config_records[Record.SITE].get(SiteReply.key("site_id"))
        if named is not None:
            return str(named)
    if node in node_sites:
        return node_sites[node]
    refused = _REFUSED_BY.match(message.error.reason or "") if message.has_error() else None
    return refused.group(1) if refused else f"node-{node}"


def short_reason(reason: str | None, limit: int = 400) -> str:
    """The informative end of an error reason (a crash's reason is a whole traceback)."""
    lines = [line.strip() for line in (reason or "no reason given").strip().splitlines() if line.strip()]
    text = lines[-1] if lines else "no reason given"
    for line in reversed(lines):  # Flower wraps the handler's exception; prefer the original message
        if "Error" in line and ":" in line and "ClientAppException" not in line:
            text = line
            break
    return text[:limit]


def screen_replies(
    replies: Sequence[Message], reference: Mapping[str, np.ndarray], norm_bound: float | None,
    node_sites: Mapping[int, str], arrays_key: str = Record.ARRAYS,
) -> tuple[list[Message], list[Verdict]]:
    """Split train replies into those the strategy may aggregate and a verdict for every reply."""
    verdicts: list[Verdict] = []
    accepted: list[Message] = []
    candidates: list[tuple[Message, str, float]] = []
    for message in replies:
        site, node = reply_site(message, node_sites), message.metadata.src_node_id
        if message.has_error():
            verdicts.append(Verdict(node, site, "declined", short_reason(message.error.reason)))
            continue
        content = message.content
        if list(content.array_records) != [arrays_key] or len(content.metric_records) != 1:
            verdicts.append(Verdict(node, site, "rejected",
                                    f"reply must hold one ArrayRecord {arrays_key!r} and one MetricRecord, got "
                                    f"{list(content.array_records)} / {list(content.metric_records)}"))
            continue
        metrics = metric_record(content)
        reason = check_metrics(metrics)
        norm = float("nan")
        if reason is None:
            reason, norm = check_reply_arrays(ArraysView(content[arrays_key]), reference, norm_bound)
        if reason is not None:
            verdicts.append(Verdict(node, site, "rejected", reason, norm))
            continue
        candidates.append((message, site, norm))
    # Flower aggregates only replies with the same metric names. Sites on different client versions may
    # report different metrics, which must not cost a hospital its update: a metric a site does not
    # report is NaN in the copy the strategy sees, and `aggregate_train_metrics` averages each metric
    # over the sites that report it.
    names = set().union(*(metric_record(m.content).keys() for m, _, _ in candidates))
    for message, site, norm in candidates:
        missing = sorted(names - set(metric_record(message.content).keys()))
        note = f"does not report {missing}; left out of those metrics' means" if missing else ""
        accepted.append(_with_metrics(message, {n: math.nan for n in missing}) if missing else message)
        verdicts.append(Verdict(message.metadata.src_node_id, site, "accepted", note, norm))
    return accepted, verdicts


def metric_record(content: RecordDict) -> MetricRecord:
    """A reply's one MetricRecord (screening rejects replies with any other number)."""
    return next(iter(content.metric_records.values()))


def _with_metrics(message: Message, extra: Mapping[str, float]) -> Message:
    """A copy of `message` whose MetricRecord also holds `extra` (the original is left as it came)."""
    name = next(iter(message.content.metric_records))
    duplicate = copy.copy(message)
    duplicate.content = RecordDict({**message.content, name: MetricRecord({**metric_record(message.content), **extra})})
    return duplicate
