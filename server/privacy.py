"""Client-level DP (Flower's DP strategy wrappers) and secure aggregation (SecAgg+) in our round loop.

**Client-level DP.** `ClientLevelDP` wraps a stage's FedAvg/FedProx in one of Flower's four wrappers
(`DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping`). Our loop calls the wrapper's own
`configure_train` / `aggregate_train`; what it adds around them, and why:
- screening first: only replies that passed `screen_replies` reach the wrapper, and a reply whose update
  is exactly zero is set aside (Flower's clipping divides by the update norm: flwrlabs/flower#7631);
- `num_sampled_clients` is set to the number of replies actually aggregated, so the noise std
  z·C/m matches the mean it is added to, also when a site declined or was rejected (the wrapper's own
  accounted mode would refuse such a round instead);
- every reply's weight is set to 1: the sensitivity C/m holds for a uniform mean, not for a mean
  weighted by data-dependent example counts (Flower's accounted mode demands the same);
- one Flower `RdpAccountant` per run (no amplification: every site takes part each round) composes one
  Gaussian release per aggregated round across all DP stages; adaptive clipping is accounted at the
  overall z, which Flower splits between update noise and clipped-count noise (Andrew et al. 2021);
  its state rides in every round checkpoint, so a resumed run continues the same ε;
- buffers that are not trained (the DiT's token statistics) are put back after the noise: the wrapper
  noises every array, and noise on a normalisation std could even make it negative.
Client-side clipping needs the site's train handler to clip its reply: `client/mods.py`.

**Secure aggregation.** Flower 1.42 runs SecAgg+ only on its legacy path (`SecAggPlusWorkflow` with a
`LegacyContext`; `secaggplus_mod` on the client). `secure_train_round` runs one stage round through it
from inside our loop: a legacy strategy hands the workflow our train config for every site, the
workflow runs setup → share keys → collect masked vectors → unmask over the same Grid, and our
legacy strategy receives only the unmasked weighted mean of the sites' *updates* (sites mask
w_site − w_global, so the quantisation range bounds update coordinates, not weights). Per-site
screening is impossible on a sum the server cannot take apart; sites check their own update (finite,
within the update-norm bound and the quantisation range) before masking, and the server checks the
aggregate. With client DP (client-side fixed clipping) the sites clip before masking and the server
adds the noise to the unmasked mean, so what leaves the server is private, and what the server sees is
only the sum. Every message of the protocol is logged to `messages.jsonl` like any other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import GaussianPrivacyEvent, Grid, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from braing3n_core.federation.protocol import ClientClipping
from braing3n_core.federation.run_config import ClientDPConfig, SecureAggregationConfig
from server.transport import WrappedGrid

# --- client-level DP -------------------------------------------------------------------------------------


class ClientLevelDP:
    """One run's client-level DP: wrappers per stage, one accountant, adaptive clipping norms per stage."""

    def __init__(self, config: ClientDPConfig, population: int, state: Mapping[str, Any] | None = None) -> None:
        self.config = config
        self.population = population
        self.clipping_norms: dict[str, float] = {}
        saved = dict(state or {})
        if saved.get("accountant"):  # the run's earlier rounds: same δ; the population it was started with
            population = int(saved["accountant"]["config"]["population_size"])
            self.population = population
        self.accountant = RdpAccountant(PrivacyConfig(
            target_delta=config.delta, population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=config.max_epsilon,
        ))
        if saved.get("accountant"):
            self.accountant.load_state_dict(saved["accountant"])
        self.clipping_norms = {str(k): float(v) for k, v in saved.get("clipping_norms", {}).items()}

    def wrap(self, strategy: Strategy, stage: str) -> Strategy:
        """A fresh Flower DP wrapper around the stage's strategy (no accountant of its own: see module doc)."""
        config, n = self.config, self.population
        if config.clipping == "fixed":
            wrapper = (DifferentialPrivacyServerSideFixedClipping if config.side == "server"
                       else DifferentialPrivacyClientSideFixedClipping)
            return wrapper(strategy, config.noise_multiplier, config.clipping_norm, n)
        wrapper = (DifferentialPrivacyServerSideAdaptiveClipping if config.side == "server"
                   else DifferentialPrivacyClientSideAdaptiveClipping)
        return wrapper(strategy, config.noise_multiplier, n,
                       initial_clipping_norm=self.clipping_norms.get(stage, config.clipping_norm),
                       target_clipped_quantile=config.target_clipped_quantile, clip_norm_lr=config.clip_norm_lr,
                       clipped_count_stddev=config.clipped_count_stddev or max(n / 20.0, config.noise_multiplier))

    def train_config(self, config: ConfigRecord) -> ConfigRecord:
        if self.config.side == "client":
            config.update(ClientClipping(client_dp_clipping=self.config.clipping).to_config())
        return config

    def event(self, sites: int) -> GaussianPrivacyEvent:
        return GaussianPrivacyEvent(noise_multiplier=self.config.noise_multiplier, sample_size=sites,
                                    population_size=self.population)

    def check_budget(self, sites: int) -> str | None:
        """Why the next release may not happen (it would pass `max_epsilon`), or None."""
        if self.config.max_epsilon is None or sites < 1:
            return None
        if self.accountant.would_exceed(self.event(min(sites, self.population))):
            return (f"client-level DP budget reached: the next round would take ε above max_epsilon="
                    f"{self.config.max_epsilon:g} (now {self.epsilon():.3f} at δ={self.config.delta:g})")
        return None

    def aggregate(self, wrapper: Strategy, stage: str, server_round: int, replies: Sequence[Message],
                  current: Mapping[str, np.ndarray], untrained: Iterable[str]) -> tuple[ArrayRecord | None, Any]:
        """The wrapper's clip-aggregate-noise over `replies` (uniform weights), then one accounted release."""
        for reply in replies:
            reply.content["metrics"]["num-examples"] = 1  # a uniform mean: the noise is calibrated to it
        wrapper.num_sampled_clients = len(replies)  # type: ignore[attr-defined]
        aggregated, metrics = wrapper.aggregate_train(server_round, list(replies))
        if aggregated is None:
            return None, metrics
        self.accountant.compose(self.event(min(len(replies), self.population)))
        if self.config.clipping == "adaptive":
            self.clipping_norms[stage] = float(wrapper.clipping_norm)  # type: ignore[attr-defined]
        for key in untrained:  # data-independent state the noise must not touch
            aggregated[key] = Array(np.ascontiguousarray(current[key]))
        return aggregated, metrics

    def noise_mean(self, arrays: dict[str, np.ndarray], sites: int, untrained: Iterable[str]) -> dict[str, np.ndarray]:
        """Gaussian noise on a mean of `sites` clipped updates (the SecAgg path, where no wrapper sees replies)."""
        from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_stdv

        keep = set(untrained)
        noisy = {k: v.copy() for k, v in arrays.items()}
        names = [k for k in noisy if k not in keep]
        values = [noisy[k] for k in names]
        add_gaussian_noise_inplace(values, compute_stdv(self.config.noise_multiplier, self.config.clipping_norm, sites))
        self.accountant.compose(self.event(min(sites, self.population)))
        return {**noisy, **dict(zip(names, values))}

    def epsilon(self) -> float:
        return float(self.accountant.get_privacy_spent().epsilon) if self.accountant.num_releases else 0.0

    def metrics(self, stage: str) -> dict[str, float]:
        spent = self.accountant.get_privacy_spent() if self.accountant.num_releases else None
        return {"privacy/epsilon": spent.epsilon if spent else 0.0, "privacy/delta": self.config.delta,
                "privacy/releases": float(self.accountant.num_releases),
                "privacy/noise_multiplier": self.config.noise_multiplier,
                "privacy/clipping_norm": self.clipping_norms.get(stage, self.config.clipping_norm)}

    def state(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict(), "clipping_norms": dict(self.clipping_norms)}


# --- secure aggregation ------------------------------------------------------------------------------------


class LoggingGrid(WrappedGrid):
    """A Grid that records every message it moves (the SecAgg+ workflow talks to the Grid directly)."""

    def __init__(self, grid: Grid, record: Callable[[Message, str], None]) -> None:
        super().__init__(grid)
        self.record = record

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for message in messages:
            self.record(message, "out")
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:
            self.record(reply, "in")
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for message in messages:
            self.record(message, "out")
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            self.record(reply, "in")
        return replies


def _legacy_strategy(nodes: Sequence[int], config: Mapping[str, Any]):
    """A legacy strategy that asks every node to train with our config and keeps what the workflow
    hands back: the unmasked aggregate, and each site's plaintext metrics (never its weights)."""
    from flwr.common import FitIns
    from flwr.server.strategy import FedAvg as LegacyFedAvg

    class SecureFit(LegacyFedAvg):
        def __init__(self) -> None:
            super().__init__(min_fit_clients=len(nodes), min_available_clients=len(nodes), fraction_evaluate=0.0)
            self.results: list[tuple[int, int, dict[str, Any]]] = []
            self.failures: list[str] = []
            self.aggregate: Any = None

        def configure_fit(self, server_round, parameters, client_manager):
            proxies = client_manager.all()
            return [(proxies[str(n)], FitIns(parameters, dict(config))) for n in nodes if str(n) in proxies]

        def aggregate_fit(self, server_round, results, failures):
            self.results = [(proxy.node_id, fit.num_examples, dict(fit.metrics)) for proxy, fit in results]
            # The workflow wraps each error reply as Exception(Error) (a site's error can be listed twice).
            reasons = [str(getattr(f.args[0], "reason", f)) if isinstance(f, Exception) and f.args else str(f)
                       for f in failures]
            self.failures = list(dict.fromkeys(reasons))
            if not results:
                return None, {}
            self.aggregate = results[0][1].parameters  # the workflow put the unmasked mean in every result
            return self.aggregate, {}

    return SecureFit()


def secure_aggregate(grid: Grid, server_round: int, nodes: Sequence[int], config: Mapping[str, Any],
                     names: Sequence[str], reference: Mapping[str, np.ndarray], settings: SecureAggregationConfig,
                     timeout: float) -> tuple[dict[str, np.ndarray] | None, list[tuple[int, int, dict[str, Any]]], list[str]]:
    """One SecAgg+ fit round over `nodes`: (weighted mean update per array or None, per-site (node,
    num_examples, metrics), failure reasons). The update is what the sites masked: w_site − w_global."""
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    strategy = _legacy_strategy(nodes, config)  # `config` names the arrays (protocol.SecureRound)
    manager = SimpleClientManager()
    for node in nodes:
        manager.register(GridClientProxy(node, grid, 0))
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=strategy, client_manager=manager)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    # The global weights travel in the fit instructions; the sites send back masked updates.
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([np.ascontiguousarray(reference[k]) for k in names]), keep_input=True)
    workflow = SecAggPlusWorkflow(settings.shares(), settings.threshold(), max_weight=settings.max_weight,
                                  clipping_range=settings.clipping_range, quantization_range=settings.quantization_range,
                                  modulus_range=settings.modulus_range, timeout=timeout)
    workflow(grid, context)
    if strategy.aggregate is None:
        return None, strategy.results, strategy.failures
    mean = parameters_to_ndarrays(strategy.aggregate)
    return ({k: np.asarray(v, dtype=np.float64) for k, v in zip(names, mean, strict=True)},
            strategy.results, strategy.failures)


def finite(arrays: Mapping[str, np.ndarray]) -> bool:
    return all(bool(np.all(np.isfinite(v))) for v in arrays.values())


def update_within(update: Mapping[str, np.ndarray], bound: float | None) -> tuple[bool, float]:
    norm = math.sqrt(sum(float(np.dot(v.ravel().astype(np.float64), v.ravel().astype(np.float64))) for v in update.values()))
    return (bound is None or norm <= bound), norm
