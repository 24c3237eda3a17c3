"""The staged round loop, written on the Message-API strategy objects instead of `Strategy.start`.

`Strategy.start` cannot begin at round k nor checkpoint between rounds, so each round is driven here:
`strategy.configure_train` → `Federation.send` (within the round timeout) → `aggregation.screen_replies`
→ `strategy.aggregate_train` → (every `evaluate_every` rounds) `configure_evaluate` + per-site metrics →
round checkpoint (global weights + strategy state) → `server_state.json`. A restarted run continues
after the last checkpointed round of the first unfinished stage; finished stages (`final.json`) are
skipped.

Wire discipline: a stage's messages carry only that stage's weights (fp32) and a `TrainRequest`. Before
the DiT's first round, a `token_moments` query gathers per-site token sums (count, Σ, Σ²) and the pairs'
trend sums to set the DiT's token statistics and trend (buffers that then travel with its weights).

A round counts when at least `min_sites` replies pass screening; otherwise the run stops with a
`FederationError` (the previous round's checkpoint stays the resume point).
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.serverapp.strategy import Strategy

from braing3n_core.federation.arrays import Arrays, module_arrays
from braing3n_core.federation.protocol import (
    Action,
    EvaluateRequest,
    FaultDrill,
    ProtocolError,
    Record,
    SecureRound,
    TokenMomentsQuery,
    TrainRequest,
    moments_from_arrays,
    trend_from_arrays,
)
from braing3n_core.federation.replies import weighted_mean
from braing3n_core.federation.run_config import StageRunConfig
from braing3n_core.federation.run_folder import RoundCheckpoint
from braing3n_core.labels import DIAGNOSES, MODALITIES
from braing3n_core.models import ChangeTrendSums, DiT, TokenMoments
from braing3n_core.presets import get_preset
from braing3n_core.runtime import seed_everything
from braing3n_core.stage_names import DIT
from braing3n_core.training.stages import get_stage
from server.aggregation import (
    Verdict,
    as_reference_dtypes,
    build_strategy,
    metric_record,
    reply_site,
    restore_strategy_state,
    screen_replies,
    short_reason,
    strategy_state,
    to_array_record,
)
from server.privacy import ClientLevelDP, LoggingGrid, secure_aggregate, update_within
from server.session import Federation, FederationError, say, summary


def run_stage(federation: Federation, spec: StageRunConfig) -> None:
    """Every remaining round of one stage, then its `final` checkpoint."""
    run, stage = federation.run, get_stage(spec.name)
    if run.is_final(spec.name):
        say(f"stage {spec.name}: already finished, skipped")
        return
    seed_everything(federation.config.seed)
    model = stage.build(get_preset(federation.config.preset))
    last = run.latest_round(spec.name)
    if last is not None and last.server_round > spec.rounds:
        raise FederationError(f"{run.stage_dir(spec.name)}: holds round {last.server_round}, the config asks {spec.rounds}")
    if stage.needs_encoder:
        federation.ensure_encoder(spec.name)
    strategy = build_strategy(spec.strategy, federation.config.min_sites)
    if federation.config.client_dp.applies_to(spec.name):
        start_client_dp(federation, spec.name, last)
        strategy = federation.client_dp.wrap(strategy, spec.name)
    if last is None:
        if spec.name == DIT:
            set_data_statistics(federation, model)
        arrays, start = module_arrays(model), 1
    else:
        arrays, start = last.model, last.server_round + 1
        restore_strategy_state(strategy, last.strategy)
        say(f"stage {spec.name}: resuming after round {last.server_round}")
    trained = {name for name, _ in model.named_parameters()}
    rounds = StageRounds(federation, spec, strategy, stage.model_config(model),
                         untrained=[k for k in arrays if k not in trained])  # buffers (DiT token statistics)
    # From here the global weights are `arrays` alone: the network object (and a resumed run's checkpoint)
    # would keep the stage's first weights for the whole stage, a second model's worth from round 2 on.
    del model, last
    for server_round in range(start, spec.rounds + 1):
        started = time.perf_counter()
        if federation.config.secure_aggregation.applies_to(spec.name):
            arrays = rounds.secure_train_round(server_round, arrays)
        else:
            arrays = rounds.train_round(server_round, arrays)
        if spec.evaluates_in(server_round):
            rounds.evaluate_round(server_round, arrays)
        meta = {"model_config": rounds.model_config, "preset": federation.config.preset, "rounds": spec.rounds,
                "strategy": spec.strategy.name, "run": federation.config.name,
                "encoder_sha256": federation.encoder_sha if stage.needs_encoder else None}
        if federation.client_dp is not None:
            meta["client_dp"] = federation.client_dp.state()
        run.save_round(RoundCheckpoint(spec.name, server_round, arrays, strategy_state(strategy), meta))
        federation.write_state()
        say(f"stage {spec.name}: round {server_round}/{spec.rounds} done in {time.perf_counter() - started:.1f} s")
    run.mark_final(spec.name)
    federation.write_state()


def set_data_statistics(federation: Federation, dit: DiT) -> None:
    """The DiT's per-channel token mean and std and, when it has one, its pairs' trend, from every site's
    sums (aggregates only). Under client-level DP or secure aggregation of the DiT stage the trend is not
    asked for: its sums would reach the server outside what those layers protect."""
    config = dit.config
    layers = federation.config
    trend = config.trend and not (layers.client_dp.applies_to(DIT) or layers.secure_aggregation.applies_to(DIT))
    query = TokenMomentsQuery(token_dim=config.token_dim, num_tokens=config.num_tokens if trend else 0)
    replies = federation.query(Action.TOKEN_MOMENTS, DIT, query)
    moments, trends = [], []
    for reply in replies:
        arrays = {k: v.numpy() for k, v in reply.content[Record.ARRAYS].items()}
        site = reply_site(reply, federation.node_sites)
        if any(not np.all(np.isfinite(v)) for v in arrays.values()) or arrays["total"].shape != (config.token_dim,):
            federation.run.log(DIT, 0, site, "rejected", reason="bad token moments")
            continue
        moments.append(moments_from_arrays(arrays))
        if trend:
            try:
                trends.append(trend_from_arrays(arrays))
            except (KeyError, ProtocolError) as error:
                federation.run.log(DIT, 0, site, "rejected", reason=f"bad trend sums: {error}")
    if len(moments) < federation.config.min_sites:
        raise FederationError(f"token statistics from {len(moments)} sites; min_sites is {federation.config.min_sites}")
    merged = functools.reduce(TokenMoments.merge, moments)
    federation.run.log(DIT, 0, "aggregate", "token_moments", sites=len(moments), tokens=merged.count)
    dit.set_token_statistics(*merged.mean_std())
    if trends:
        sums = functools.reduce(ChangeTrendSums.merge, trends)
        dit.set_change_trend(sums.rates(dit.token_std))
        cells = {f"{m.value}|{d}": int(sums.pairs[i, j]) for i, m in enumerate(MODALITIES)
                 for j, d in enumerate(DIAGNOSES) if sums.pairs[i, j] > 0}
        federation.run.log(DIT, 0, "aggregate", "change_trend", sites=len(trends), pairs=int(sums.pairs.sum()), cells=cells)


# --- client-level DP (server/privacy.py) --------------------------------------------------------------------


def start_client_dp(federation: Federation, stage: str, last: RoundCheckpoint | None) -> None:
    """The run's client-level DP, with the accountant state of the newest committed DP round."""
    if federation.client_dp is not None:
        return
    state = last.meta.get("client_dp") if last is not None else None
    if state is None:  # a fresh stage: the newest finished stage before it may have spent ε already
        names = [s.name for s in federation.config.stages]
        for earlier in reversed(names[: names.index(stage)]):
            if federation.run.is_final(earlier):
                state = federation.run.final_meta(earlier).get("client_dp")
                if state is not None:
                    break
    population = max(len(federation.node_sites), federation.config.min_sites)
    federation.client_dp = ClientLevelDP(federation.config.client_dp, population, state)


def log_client_dp(federation: Federation, stage: str, server_round: int) -> None:
    assert federation.client_dp is not None
    values = federation.client_dp.metrics(stage)
    federation.run.log(stage, server_round, "server", "client_dp", **values)
    say(f"{stage} round {server_round}: client-level DP ε = {values['privacy/epsilon']:.3f} "
        f"(δ = {values['privacy/delta']:g}, {values['privacy/releases']:.0f} releases)")


# --- one stage's rounds ---------------------------------------------------------------------------------------


@dataclass
class StageRounds:
    """What every round of one stage shares: its strategy, its network's config, its untrained buffers."""

    federation: Federation
    spec: StageRunConfig
    strategy: Strategy
    model_config: dict[str, Any]
    untrained: list[str]

    @property
    def encoder_sha(self) -> str:
        return self.federation.encoder_sha if get_stage(self.spec.name).needs_encoder else ""

    def request(self, server_round: int) -> TrainRequest:
        spec, config = self.spec, self.federation.config
        return TrainRequest(stage=spec.name, server_round=server_round, local_steps=spec.local_steps,
                            batch_size=spec.resolved_batch_size, lr=spec.lr_at_round(server_round),
                            weight_decay=spec.resolved_weight_decay, seed=config.seed, rounds=spec.rounds,
                            run=config.name, preset=config.preset, model_config=self.model_config,
                            encoder_sha256=self.encoder_sha, timeout_s=config.round_timeout_s)

    def train_round(self, server_round: int, arrays: Arrays) -> Arrays:
        federation, spec, started = self.federation, self.spec, time.perf_counter()
        dp = federation.client_dp if federation.config.client_dp.applies_to(spec.name) else None
        request = self.request(server_round)
        config = ConfigRecord(request.to_config())
        if dp is not None:
            if reason := dp.check_budget(len(federation.node_sites)):
                raise FederationError(f"stage {spec.name} round {server_round}: {reason}")
            config = dp.train_config(config)
        messages = list(self.strategy.configure_train(server_round, to_array_record(arrays), config, federation.grid))
        replies = federation.send(federation.inject_faults(messages, spec.name, server_round), spec.name, server_round)
        asked = len(messages)
        del messages  # the serialized global weights (a model's worth) are not needed past the exchange
        accepted, verdicts = screen_replies(replies, arrays, federation.config.update_norm_bound, federation.node_sites)
        if dp is not None:  # Flower's DP clipping divides by the update norm (flwrlabs/flower#7631)
            zero = {v.node_id for v in verdicts if v.kind == "accepted" and v.update_norm == 0.0}
            accepted = [m for m in accepted if m.metadata.src_node_id not in zero]
            verdicts = [Verdict(v.node_id, v.site, "rejected", "zero update (nothing trained); left out of the DP mean",
                                0.0) if v.node_id in zero else v for v in verdicts]
        federation.log_verdicts(spec.name, server_round, verdicts, replies)
        if len(accepted) < federation.config.min_sites:
            raise FederationError(
                f"stage {spec.name} round {server_round}: {len(accepted)} accepted replies, min_sites is "
                f"{federation.config.min_sites} ({'; '.join(f'{v.site}: {v.reason}' for v in verdicts if v.reason)})"
            )
        if dp is not None:
            aggregated, metrics = dp.aggregate(self.strategy, spec.name, server_round, accepted, arrays, self.untrained)
        else:
            aggregated, metrics = self.strategy.aggregate_train(server_round, accepted)
        if aggregated is None:
            raise FederationError(f"stage {spec.name} round {server_round}: the strategy aggregated nothing")
        sites = len(accepted)
        del replies, accepted  # the sites' weights (a model's worth each) live on in the aggregate only
        new = as_reference_dtypes(aggregated, arrays)
        bad = [k for k, v in new.items() if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v))]
        if bad:
            raise FederationError(f"stage {spec.name} round {server_round}: aggregate has NaN/Inf in {bad[:3]}")
        values = dict(metrics or {})
        federation.run.log(spec.name, server_round, "aggregate", "train", sites=sites, lr=request.lr,
                           round_seconds=time.perf_counter() - started, **values)
        if dp is not None:
            log_client_dp(federation, spec.name, server_round)
        say(f"{spec.name} round {server_round}: {sites}/{asked} sites accepted, "
            f"train/loss {values.get('train/loss', float('nan')):.4f}")
        return new

    def secure_train_round(self, server_round: int, arrays: Arrays) -> Arrays:
        """One round through SecAgg+: the server learns only the weighted mean of the sites' updates."""
        federation, spec, started = self.federation, self.spec, time.perf_counter()
        settings, dp = federation.config.secure_aggregation, federation.client_dp
        if dp is not None and (reason := dp.check_budget(len(federation.node_sites))):
            raise FederationError(f"stage {spec.name} round {server_round}: {reason}")
        request = self.request(server_round)
        names = list(arrays)
        secure = SecureRound(secagg_array_names=names, secagg_clipping_range=settings.clipping_range,
                             secagg_max_weight=settings.max_weight, uniform_weight=dp is not None,
                             update_norm_bound=federation.config.update_norm_bound or 0.0)
        config = {**request.to_config(), **secure.to_config()}
        if dp is not None:
            config |= {"clipping_norm": dp.config.clipping_norm}  # Flower's fixedclipping_mod reads this key
            config = dict(dp.train_config(ConfigRecord(config)))
        nodes = federation.wait_for_nodes()
        for site, fault in federation.config.faults_for(spec.name, server_round).items():
            # one config goes to every site: a drill names its site
            config |= FaultDrill(fault=fault.kind, fault_factor=fault.factor, fault_site=site).to_config()
            federation.run.log(spec.name, server_round, site, "fault_injected", fault=fault.kind)

        def record(message: Message, direction: str) -> None:
            node = message.metadata.dst_node_id if direction == "out" else message.metadata.src_node_id
            federation.run.log_message({"direction": direction, "stage": spec.name, "round": server_round,
                                        "type": message.metadata.message_type, "node": node,
                                        "site": federation.node_sites.get(node), "secure_aggregation": True,
                                        **summary(message)})

        mean, results, failures = secure_aggregate(
            LoggingGrid(federation.grid, record), server_round, nodes, config, names, arrays, settings,
            timeout=federation.config.round_timeout_s)
        for node, weight, metrics in results:
            site = str(metrics.pop("site-id", federation.site_of(node)))
            federation.run.log(spec.name, server_round, site, "train", secure_aggregation=True, weight=weight, **metrics)
        for reason in failures:  # the protocol reports errors without their node; our reasons name the site
            named = re.search(r"site ([A-Za-z0-9][A-Za-z0-9_-]*)[: ]", short_reason(reason))
            site = named.group(1) if named else "unknown"
            federation.run.log(spec.name, server_round, site, "declined", reason=short_reason(reason))
            say(f"{spec.name} round {server_round}: {site} left the secure round: {short_reason(reason)}")
        if mean is None or len(results) < federation.config.min_sites:
            raise FederationError(f"stage {spec.name} round {server_round}: secure aggregation produced no sum from "
                                  f"{len(results)} sites (min_sites {federation.config.min_sites}); "
                                  f"{'; '.join(short_reason(f) for f in failures) or 'see the ServerApp log'}")
        if dp is not None:
            mean = dp.noise_mean(mean, len(results), self.untrained)
        new = {k: (arrays[k].astype(np.float64) + mean[k]).astype(arrays[k].dtype) if k not in self.untrained
               else arrays[k] for k in names}  # quantisation would blur the (unchanged) buffers
        if not all(np.all(np.isfinite(v)) for v in new.values()):
            raise FederationError(f"stage {spec.name} round {server_round}: the secure aggregate has NaN/Inf")
        losses = [(float(m.get("train/loss", float("nan"))), float(w)) for _, w, m in results]
        federation.run.log(spec.name, server_round, "aggregate", "train", sites=len(results), secure_aggregation=True,
                           lr=request.lr, round_seconds=time.perf_counter() - started,
                           **{"train/loss": weighted_mean(losses), "update_norm": update_within(mean, None)[1]})
        if dp is not None:
            log_client_dp(federation, spec.name, server_round)
        say(f"{spec.name} round {server_round}: secure sum of {len(results)}/{len(nodes)} sites")
        return new

    def evaluate_round(self, server_round: int, arrays: Arrays) -> None:
        federation, spec = self.federation, self.spec
        request = EvaluateRequest(stage=spec.name, preset=federation.config.preset, model_config=self.model_config,
                                  batch_size=spec.resolved_batch_size, encoder_sha256=self.encoder_sha)
        messages = list(self.strategy.configure_evaluate(server_round, to_array_record(arrays),
                                                         ConfigRecord(request.to_config()), federation.grid))
        replies = federation.log_declines(federation.send(messages, spec.name, server_round), spec.name, server_round)
        per_site = {}
        for reply in replies:
            metrics = dict(metric_record(reply.content))
            per_site[reply_site(reply, federation.node_sites)] = metrics
            federation.run.log(spec.name, server_round, reply_site(reply, federation.node_sites), "evaluate", **metrics)
        if per_site:
            names = sorted({k for m in per_site.values() for k in m if k.startswith("val/")})
            pooled = {k: weighted_mean([(m.get(k, float("nan")), m["num-examples"]) for m in per_site.values()])
                      for k in names if k != "val/examples"}
            total = sum(m["num-examples"] for m in per_site.values())
            federation.run.log(spec.name, server_round, "aggregate", "evaluate", sites=len(per_site),
                               **{"num-examples": total}, **pooled)
            say(f"{spec.name} round {server_round}: validation " + ", ".join(f"{k} {v:.4f}" for k, v in pooled.items()))
