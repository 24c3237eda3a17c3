"""The staged round loop, written on the Message-API strategy objects instead of `Strategy.start`.

`Strategy.start` cannot begin at round k nor checkpoint between rounds, so each round is driven here:
`strategy.configure_train` → `transport.exchange(timeout)` → `aggregation.screen_replies` →
`strategy.aggregate_train` → (every `evaluate_every` rounds) `configure_evaluate` + per-site metrics →
round checkpoint (global weights + strategy state) → `server_state.json`. A restarted run continues
after the last checkpointed round of the first unfinished stage; finished stages (`final.json`) are
skipped.

Wire discipline: a stage's messages carry only that stage's weights (fp32) and a ConfigRecord. The
frozen encoder travels once per site per run in an `install_encoder` query, sent only to sites whose
`hello` says they lack it; later messages name it by `encoder-sha256`. Before the DiT's first round, a
`token_moments` query gathers per-site token sums (count, Σ, Σ²) to set the DiT's token statistics.

A round counts when at least `min_sites` replies pass screening; otherwise the run stops with a
`FederationError` (the previous round's checkpoint stays the resume point).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from braing3n_core.checkpoint import load_checkpoint, tensors_sha256
from braing3n_core.federation.arrays import module_arrays
from braing3n_core.federation.protocol import RoundParams, moments_from_arrays
from braing3n_core.federation.replies import weighted_mean
from braing3n_core.federation.run_config import RunConfig, StageRunConfig
from braing3n_core.federation.run_folder import RoundCheckpoint, RunFolder
from braing3n_core.presets import get_preset
from braing3n_core.runtime import seed_everything
from braing3n_core.training.stages import STAGES, get_stage
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
from server.transport import exchange


class FederationError(RuntimeError):
    """The federation cannot go on (too few sites, nothing aggregated); the run can be resumed later."""


_T0 = time.monotonic()


def say(text: str) -> None:
    print(f"[braing3n {time.monotonic() - _T0:6.1f}s] {text}", flush=True)


def _summary(message: Message) -> dict[str, Any]:
    """What a message carries, without its values: record names, array keys/shapes/dtypes, bytes."""
    if message.has_error():
        return {"error": message.error.code}
    records: dict[str, Any] = {}
    content = message.content
    for name, record in content.array_records.items():
        records[name] = {"type": "arrays", "bytes": sum(len(a.data) for a in record.values()),
                         "arrays": {k: [list(a.shape), str(a.dtype)] for k, a in record.items()}}
    for name, record in content.config_records.items():
        records[name] = {"type": "config", "keys": sorted(record.keys())}
    for name, record in content.metric_records.items():
        records[name] = {"type": "metrics", "keys": sorted(record.keys())}
    return {"records": records}


@dataclass
class Federation:
    grid: Grid
    run: RunFolder
    config: RunConfig
    expected_sites: int | None = None
    node_sites: dict[int, str] = field(default_factory=dict)
    encoder_sha: str = ""
    encoder_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    encoder_config: dict[str, Any] = field(default_factory=dict)
    client_dp: ClientLevelDP | None = None  # one per run: its accountant spans every DP stage
    untrained: list[str] = field(default_factory=list)  # the current stage's arrays that are not parameters

    # --- transport ----------------------------------------------------------------------------------------

    def wait_for_nodes(self) -> list[int]:
        """All expected nodes, or at least `min_sites` once the round timeout has passed."""
        wanted = max(self.expected_sites or 0, self.config.min_sites)
        deadline = time.monotonic() + self.config.round_timeout_s
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= wanted or (time.monotonic() > deadline and len(nodes) >= self.config.min_sites):
                return nodes
            if time.monotonic() > deadline:
                raise FederationError(f"only {len(nodes)} nodes connected, min_sites is {self.config.min_sites}")
            time.sleep(0.2)

    def send(self, messages: Sequence[Message], stage: str, server_round: int) -> list[Message]:
        for message in messages:
            self.run.log_message({"direction": "out", "stage": stage, "round": server_round,
                                  "type": message.metadata.message_type, "node": message.metadata.dst_node_id,
                                  "site": self.node_sites.get(message.metadata.dst_node_id), **_summary(message)})
        def resent(node: int, reason: str) -> None:
            site = self.node_sites.get(node, f"node-{node}")
            self.run.log(stage, server_round, site, "resent", reason=reason)
            say(f"{stage} round {server_round}: site {site} is back; message sent again ({reason})")

        replies = exchange(self.grid, messages, self.config.round_timeout_s, resent)
        for reply in replies:
            self.run.log_message({"direction": "in", "stage": stage, "round": server_round,
                                  "type": reply.metadata.message_type, "node": reply.metadata.src_node_id,
                                  "site": reply_site(reply, self.node_sites), **_summary(reply)})
        answered = {r.metadata.src_node_id for r in replies}
        for message in messages:
            node = message.metadata.dst_node_id
            if node not in answered:
                self.run.log(stage, server_round, self.node_sites.get(node, f"node-{node}"), "declined",
                             reason=f"no reply within round_timeout_s={self.config.round_timeout_s:g}")
        return replies

    def message(self, node: int, message_type: str, config: Mapping[str, Any],
                arrays: Mapping[str, ArrayRecord] | None = None) -> Message:
        content = RecordDict({"config": ConfigRecord(dict(config)), **(arrays or {})})
        return Message(content, dst_node_id=node, message_type=message_type)

    def query(self, action: str, stage: str, nodes: Iterable[int] | None = None, extra: Mapping[str, Any] | None = None,
              arrays: Mapping[str, ArrayRecord] | None = None) -> list[Message]:
        config = {"action": action, "preset": self.config.preset, "encoder-sha256": self.encoder_sha, **(extra or {})}
        nodes = list(self.wait_for_nodes() if nodes is None else nodes)
        return self.send([self.message(n, MessageType.QUERY, config, arrays) for n in nodes], stage, 0)

    def log_declines(self, replies: Iterable[Message], stage: str, server_round: int) -> list[Message]:
        """Log error replies as declined; return the replies with content."""
        ok = []
        for reply in replies:
            if reply.has_error():
                site = reply_site(reply, self.node_sites)
                reason = short_reason(reply.error.reason)
                self.run.log(stage, server_round, site, "declined", reason=reason)
                say(f"{stage} round {server_round}: site {site} declined: {reason}")
            else:
                ok.append(reply)
        return ok

    def hello(self, stage: str) -> dict[int, bool]:
        """Who is who (node → site id) and which nodes hold the current encoder."""
        holds = {}
        for reply in self.log_declines(self.query("hello", stage), stage, 0):
            site = reply.content.config_records["site"]
            node = reply.metadata.src_node_id
            other = [n for n, s in self.node_sites.items() if s == site["site-id"] and n != node]
            if other:
                raise FederationError(f"nodes {other[0]} and {node} both claim site {site['site-id']!r}")
            self.node_sites[node] = str(site["site-id"])
            holds[node] = bool(site["has-encoder"])
        return holds

    def inject_faults(self, messages: list[Message], stage: str, server_round: int) -> list[Message]:
        faults = self.config.faults_for(stage, server_round)
        out = []
        for message in messages:
            site = self.node_sites.get(message.metadata.dst_node_id, "")
            if site not in faults:
                out.append(message)
                continue
            fault = faults[site]
            content = RecordDict({k: v for k, v in message.content.items() if k != "config"})
            content["config"] = ConfigRecord({**message.content["config"], "fault": fault.kind,
                                              "fault-factor": fault.factor})
            out.append(Message(content, dst_node_id=message.metadata.dst_node_id,
                               message_type=message.metadata.message_type))
            self.run.log(stage, server_round, site, "fault_injected", fault=fault.kind)
            say(f"{stage} round {server_round}: injecting fault {fault.kind!r} at site {site} (run config)")
        return out

    # --- encoder ------------------------------------------------------------------------------------------

    def load_encoder(self) -> None:
        """The frozen encoder: this run's final MAE, or `start_from.mae`."""
        path = self.run.final_path("mae") if self.run.is_final("mae") else self.config.start_from.get("mae")
        if path is None:
            raise FederationError("no encoder: the mae stage has not finished and start_from.mae is not set")
        checkpoint = load_checkpoint(path)
        if checkpoint.meta.get("stage") != "mae":
            raise FederationError(f"{path}: holds stage {checkpoint.meta.get('stage')!r}, not an MAE")
        model = checkpoint.sub_state_dict("model")
        encoder = {k[len("encoder.") :]: v.float() for k, v in model.items() if k.startswith("encoder.")}
        self.encoder_arrays = {k: v.numpy() for k, v in encoder.items()}
        self.encoder_config = dict(checkpoint.meta["model_config"])
        self.encoder_sha = tensors_sha256(encoder)

    def ensure_encoder(self, stage: str) -> None:
        """Install the encoder on every site that lacks it (normally once per site per run)."""
        if not self.encoder_sha:
            self.load_encoder()
        missing = [node for node, holds in self.hello(stage).items() if not holds]
        if not missing:
            return
        record = to_array_record(self.encoder_arrays)
        replies = self.query("install_encoder", stage, missing, {"encoder-config": json.dumps(self.encoder_config)},
                             {"encoder": record})
        for reply in self.log_declines(replies, stage, 0):
            site = reply_site(reply, self.node_sites)
            self.run.log(stage, 0, site, "encoder_installed", encoder_sha256=self.encoder_sha)
        say(f"encoder {self.encoder_sha[:12]}… installed at {len(missing)} site(s)")

    # --- one stage ----------------------------------------------------------------------------------------

    def stage_config(self, spec: StageRunConfig, model_config: str, server_round: int) -> dict[str, Any]:
        params = RoundParams(spec.name, server_round, spec.local_steps, spec.resolved_batch_size,
                             spec.lr_at_round(server_round), spec.resolved_weight_decay, 0.0, self.config.seed,
                             rounds=spec.rounds, run=self.config.name)
        return {**params.to_config(), "preset": self.config.preset, "model-config": model_config,
                "encoder-sha256": self.encoder_sha if get_stage(spec.name).needs_encoder else ""}

    def token_statistics(self, token_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        replies = self.log_declines(self.query("token_moments", "dit", extra={"token-dim": token_dim}), "dit", 0)
        parts = []
        for reply in replies:
            arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
            if any(not np.all(np.isfinite(v)) for v in arrays.values()) or arrays["total"].shape != (token_dim,):
                self.run.log("dit", 0, reply_site(reply, self.node_sites), "rejected", reason="bad token moments")
                continue
            parts.append(moments_from_arrays(arrays))
        if len(parts) < self.config.min_sites:
            raise FederationError(f"token statistics from {len(parts)} sites; min_sites is {self.config.min_sites}")
        merged = parts[0]
        for part in parts[1:]:
            merged = merged.merge(part)
        self.run.log("dit", 0, "aggregate", "token_moments", sites=len(parts), tokens=merged.count)
        return merged.mean_std()

    def run_stage(self, spec: StageRunConfig) -> None:
        run, stage = self.run, get_stage(spec.name)
        if run.is_final(spec.name):
            say(f"stage {spec.name}: already finished, skipped")
            return
        seed_everything(self.config.seed)
        model = stage.build(get_preset(self.config.preset))
        last = run.latest_round(spec.name)
        if last is not None and last.server_round > spec.rounds:
            raise FederationError(f"{run.stage_dir(spec.name)}: holds round {last.server_round}, the config asks {spec.rounds}")
        if stage.needs_encoder:
            self.ensure_encoder(spec.name)
        strategy = build_strategy(spec.strategy, self.config.min_sites)
        if self.config.client_dp.applies_to(spec.name):
            self.start_client_dp(spec.name, last)
            strategy = self.client_dp.wrap(strategy, spec.name)
        if last is None:
            if spec.name == "dit":
                model.set_token_statistics(*self.token_statistics(model.config.token_dim))
            arrays, start = module_arrays(model), 1
        else:
            arrays, start = last.model, last.server_round + 1
            restore_strategy_state(strategy, last.strategy)
            say(f"stage {spec.name}: resuming after round {last.server_round}")
        model_config = json.dumps(stage.model_config(model))
        trained = {name for name, _ in model.named_parameters()}
        self.untrained = [k for k in arrays if k not in trained]  # buffers (DiT token statistics)
        for server_round in range(start, spec.rounds + 1):
            started = time.perf_counter()
            if self.config.secure_aggregation.applies_to(spec.name):
                arrays = self.secure_train_round(spec, server_round, arrays, model_config)
            else:
                arrays = self.train_round(spec, strategy, server_round, arrays, model_config)
            if spec.evaluates_in(server_round):
                self.evaluate_round(spec, strategy, server_round, arrays, model_config)
            meta = {"model_config": json.loads(model_config), "preset": self.config.preset, "rounds": spec.rounds,
                    "strategy": spec.strategy.name, "encoder_sha256": self.encoder_sha if stage.needs_encoder else None,
                    "run": self.config.name}
            if self.client_dp is not None:
                meta["client_dp"] = self.client_dp.state()
            run.save_round(RoundCheckpoint(spec.name, server_round, arrays, strategy_state(strategy), meta))
            self.write_state()
            say(f"stage {spec.name}: round {server_round}/{spec.rounds} done in {time.perf_counter() - started:.1f} s")
        run.mark_final(spec.name)
        self.write_state()

    # --- privacy layers (server/privacy.py) -------------------------------------------------------------

    def start_client_dp(self, stage: str, last: RoundCheckpoint | None) -> None:
        """The run's client-level DP, with the accountant state of the newest committed DP round."""
        if self.client_dp is not None:
            return
        state = last.meta.get("client_dp") if last is not None else None
        if state is None:  # a fresh stage: the newest finished stage before it may have spent ε already
            names = [s.name for s in self.config.stages]
            for earlier in reversed(names[: names.index(stage)]):
                if self.run.is_final(earlier):
                    state = load_checkpoint(self.run.final_path(earlier)).meta.get("client_dp")
                    if state is not None:
                        break
        population = max(len(self.node_sites), self.config.min_sites)
        self.client_dp = ClientLevelDP(self.config.client_dp, population, state)

    def log_client_dp(self, stage: str, server_round: int) -> None:
        assert self.client_dp is not None
        values = self.client_dp.metrics(stage)
        self.run.log(stage, server_round, "server", "client_dp", **values)
        say(f"{stage} round {server_round}: client-level DP ε = {values['privacy/epsilon']:.3f} "
            f"(δ = {values['privacy/delta']:g}, {values['privacy/releases']:.0f} releases)")

    def secure_train_round(self, spec: StageRunConfig, server_round: int, arrays: dict[str, np.ndarray],
                           model_config: str) -> dict[str, np.ndarray]:
        """One round through SecAgg+: the server learns only the weighted mean of the sites' updates."""
        started = time.perf_counter()
        settings, dp = self.config.secure_aggregation, self.client_dp
        if dp is not None and (reason := dp.check_budget(len(self.node_sites))):
            raise FederationError(f"stage {spec.name} round {server_round}: {reason}")
        config = {**self.stage_config(spec, model_config, server_round),
                  "update-norm-bound": self.config.update_norm_bound or 0.0,
                  "secagg-clipping-range": settings.clipping_range, "secagg-max-weight": settings.max_weight}
        if dp is not None:
            config |= {"clipping_norm": dp.config.clipping_norm, "uniform-weight": True}
            config = dict(dp.train_config(ConfigRecord(config)))
        nodes = self.wait_for_nodes()
        faults = self.config.faults_for(spec.name, server_round)
        for site, fault in faults.items():  # one config for all: a drill names its site in the config
            config |= {"fault": fault.kind, "fault-site": site, "fault-factor": fault.factor}
            self.run.log(spec.name, server_round, site, "fault_injected", fault=fault.kind)

        def record(message: Message, direction: str) -> None:
            node = message.metadata.dst_node_id if direction == "out" else message.metadata.src_node_id
            self.run.log_message({"direction": direction, "stage": spec.name, "round": server_round,
                                  "type": message.metadata.message_type, "node": node, "site": self.node_sites.get(node),
                                  "secure_aggregation": True, **_summary(message)})

        names = list(arrays)
        mean, results, failures = secure_aggregate(
            LoggingGrid(self.grid, record), server_round, nodes, config, names, arrays, settings,
            timeout=self.config.round_timeout_s)
        for node, weight, metrics in results:
            site = str(metrics.pop("site-id", self.node_sites.get(node, f"node-{node}")))
            self.run.log(spec.name, server_round, site, "train", secure_aggregation=True, weight=weight, **metrics)
        for reason in failures:  # the protocol reports errors without their node; our reasons name the site
            named = re.search(r"site ([A-Za-z0-9][A-Za-z0-9_-]*)[: ]", short_reason(reason))
            site = named.group(1) if named else "unknown"
            self.run.log(spec.name, server_round, site, "declined", reason=short_reason(reason))
            say(f"{spec.name} round {server_round}: {site} left the secure round: {short_reason(reason)}")
        if mean is None or len(results) < self.config.min_sites:
            raise FederationError(f"stage {spec.name} round {server_round}: secure aggregation produced no sum from "
                                  f"{len(results)} sites (min_sites {self.config.min_sites}); "
                                  f"{'; '.join(short_reason(f) for f in failures) or 'see the ServerApp log'}")
        if dp is not None:
            mean = dp.noise_mean(mean, len(results), self.untrained)
        new = {k: (arrays[k].astype(np.float64) + mean[k]).astype(arrays[k].dtype) if k not in self.untrained
               else arrays[k] for k in names}  # quantisation would blur the (unchanged) buffers
        if not all(np.all(np.isfinite(v)) for v in new.values()):
            raise FederationError(f"stage {spec.name} round {server_round}: the secure aggregate has NaN/Inf")
        losses = [(float(m.get("train/loss", float("nan"))), float(w)) for _, w, m in results]
        self.run.log(spec.name, server_round, "aggregate", "train", sites=len(results), secure_aggregation=True,
                     lr=float(config["lr"]), round_seconds=time.perf_counter() - started,
                     **{"train/loss": weighted_mean(losses), "update_norm": update_within(mean, None)[1]})
        if dp is not None:
            self.log_client_dp(spec.name, server_round)
        say(f"{spec.name} round {server_round}: secure sum of {len(results)}/{len(nodes)} sites")
        return new

    def train_round(self, spec: StageRunConfig, strategy, server_round: int, arrays: dict[str, np.ndarray],
                    model_config: str) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        dp = self.client_dp if self.config.client_dp.applies_to(spec.name) else None
        config = ConfigRecord(self.stage_config(spec, model_config, server_round))
        if dp is not None:
            if reason := dp.check_budget(len(self.node_sites)):
                raise FederationError(f"stage {spec.name} round {server_round}: {reason}")
            config = dp.train_config(config)
        messages = list(strategy.configure_train(server_round, to_array_record(arrays), config, self.grid))
        replies = self.send(self.inject_faults(messages, spec.name, server_round), spec.name, server_round)
        accepted, verdicts = screen_replies(replies, arrays, self.config.update_norm_bound, self.node_sites)
        if dp is not None:  # Flower's DP clipping divides by the update norm (flwrlabs/flower#7631)
            zero = {v.node_id for v in verdicts if v.kind == "accepted" and v.update_norm == 0.0}
            accepted = [m for m in accepted if m.metadata.src_node_id not in zero]
            verdicts = [Verdict(v.node_id, v.site, "rejected", "zero update (nothing trained); left out of the DP mean",
                                0.0) if v.node_id in zero else v for v in verdicts]
        self.log_verdicts(spec.name, server_round, verdicts, replies)
        if len(accepted) < self.config.min_sites:
            raise FederationError(
                f"stage {spec.name} round {server_round}: {len(accepted)} accepted replies, min_sites is "
                f"{self.config.min_sites} ({'; '.join(f'{v.site}: {v.reason}' for v in verdicts if v.reason)})"
            )
        if dp is not None:
            aggregated, metrics = dp.aggregate(strategy, spec.name, server_round, accepted, arrays, self.untrained)
        else:
            aggregated, metrics = strategy.aggregate_train(server_round, accepted)
        if aggregated is None:
            raise FederationError(f"stage {spec.name} round {server_round}: the strategy aggregated nothing")
        new = as_reference_dtypes(aggregated, arrays)
        bad = [k for k, v in new.items() if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v))]
        if bad:
            raise FederationError(f"stage {spec.name} round {server_round}: aggregate has NaN/Inf in {bad[:3]}")
        values = dict(metrics or {})
        self.run.log(spec.name, server_round, "aggregate", "train", sites=len(accepted),
                     lr=float(config["lr"]), round_seconds=time.perf_counter() - started, **values)
        if dp is not None:
            self.log_client_dp(spec.name, server_round)
        say(f"{spec.name} round {server_round}: {len(accepted)}/{len(messages)} sites accepted, "
            f"train/loss {values.get('train/loss', float('nan')):.4f}")
        return new

    def log_verdicts(self, stage: str, server_round: int, verdicts: Sequence[Verdict], replies: Sequence[Message]) -> None:
        by_node = {r.metadata.src_node_id: r for r in replies}
        for verdict in verdicts:
            if verdict.kind == "accepted":
                content = by_node[verdict.node_id].content
                metrics = dict(metric_record(content))
                privacy = content.config_records.get("privacy")  # a DP site's ε etc. (never aggregated)
                self.run.log(stage, server_round, verdict.site, "train", update_norm=verdict.update_norm, **metrics,
                             **(dict(privacy) if privacy is not None else {}),
                             **({"note": verdict.reason} if verdict.reason else {}))
                if verdict.reason:
                    say(f"{stage} round {server_round}: site {verdict.site} {verdict.reason}")
            else:
                self.run.log(stage, server_round, verdict.site, verdict.kind, reason=verdict.reason,
                             update_norm=verdict.update_norm)
                say(f"{stage} round {server_round}: site {verdict.site} {verdict.kind}: {verdict.reason}")

    def evaluate_round(self, spec: StageRunConfig, strategy, server_round: int, arrays: dict[str, np.ndarray],
                       model_config: str) -> None:
        config = ConfigRecord({"stage": spec.name, "preset": self.config.preset, "model-config": model_config,
                               "batch-size": spec.resolved_batch_size,
                               "encoder-sha256": self.encoder_sha if get_stage(spec.name).needs_encoder else ""})
        messages = list(strategy.configure_evaluate(server_round, to_array_record(arrays), config, self.grid))
        replies = self.log_declines(self.send(messages, spec.name, server_round), spec.name, server_round)
        per_site = {}
        for reply in replies:
            metrics = dict(metric_record(reply.content))
            per_site[reply_site(reply, self.node_sites)] = metrics
            self.run.log(spec.name, server_round, reply_site(reply, self.node_sites), "evaluate", **metrics)
        if per_site:
            names = sorted({k for m in per_site.values() for k in m if k.startswith("val/")})
            pooled = {k: weighted_mean([(m.get(k, float("nan")), m["num-examples"]) for m in per_site.values()])
                      for k in names if k != "val/examples"}
            total = sum(m["num-examples"] for m in per_site.values())
            self.run.log(spec.name, server_round, "aggregate", "evaluate", sites=len(per_site),
                         **{"num-examples": total}, **pooled)
            say(f"{spec.name} round {server_round}: validation " + ", ".join(f"{k} {v:.4f}" for k, v in pooled.items()))

    # --- state ----------------------------------------------------------------------------------------------

    def write_state(self) -> None:
        names = [s.name for s in self.config.stages]
        committed = self.run.committed_rounds(names + ["probes"])
        self.run.write_state({
            "run": self.config.name,
            "preset": self.config.preset,
            "stages": {s.name: {"rounds": s.rounds, "completed_round": committed[s.name], "done": self.run.is_final(s.name),
                                "strategy": s.strategy.name} for s in self.config.stages},
            "probes": {"enabled": self.config.probes.enabled, "rounds": self.config.probes.rounds,
                       "completed_round": committed["probes"], "done": self.run.is_final("probes")},
            "start_from": {k: str(v) for k, v in self.config.start_from.items()},
            "encoder_sha256": self.encoder_sha or None,
            "sites": {str(n): s for n, s in sorted(self.node_sites.items())},
        })


def load_run_config(path: Path, run_dir: Path | None) -> tuple[RunConfig, RunFolder]:
    """The run's configuration, pinned in the run folder: a resumed run must not change its recipe."""
    config = RunConfig.from_yaml(path)
    run = RunFolder(run_dir if run_dir is not None else Path("runs") / config.name)
    pinned = run.root / "run.yaml"
    if pinned.is_file() and pinned.resolve() != Path(path).resolve():
        previous = RunConfig.from_yaml(pinned)
        if not previous.same_recipe(config):
            raise FederationError(f"{pinned}: the run folder holds a different run configuration than {path}; "
                                  "use a new run folder or the same configuration to resume")
    elif not pinned.is_file():
        from braing3n_core.federation.run_config import write_resolved

        write_resolved(config, pinned)
    return config, run


def run_federation(grid: Grid, config_path: Path, run_dir: Path | None, expected_sites: int | None) -> Path:
    """Everything the ServerApp does; returns the path of `run_complete.json`."""
    from server.probes import run_probes

    started = time.time()
    say(f"ServerApp started; run config {config_path}")
    config, run = load_run_config(config_path, run_dir)
    run.complete_path.unlink(missing_ok=True)
    committed = run.committed_rounds([s for s in STAGES] + ["probes"])
    if run.prune_uncommitted(committed):
        say("dropped ledger lines of rounds that never reached their checkpoint")
    federation = Federation(grid, run, config, expected_sites)
    nodes = federation.wait_for_nodes()
    federation.hello("setup")
    say(f"run {config.name!r}: {len(nodes)} nodes, sites {sorted(federation.node_sites.values())}, preset {config.preset}")
    probes_done = False
    if config.probes.enabled and "mae" in config.start_from:
        run_probes(federation)
        probes_done = True
    for spec in config.stages:
        federation.run_stage(spec)
        if spec.name == "mae" and config.probes.enabled and not probes_done:
            run_probes(federation)
            probes_done = True
    if config.audit is not None:
        from server.privacy import run_audit

        say(f"privacy audit written to {run_audit(federation)}")
    federation.write_state()
    finals = {s.name: str(run.final_path(s.name).relative_to(run.root)) for s in config.stages}
    from braing3n_core.fileio import atomic_write_json

    atomic_write_json(run.complete_path, {
        "run": config.name, "finished": time.time(), "seconds": time.time() - started, "final_checkpoints": finals,
        "probes": "probes.json" if config.probes.enabled else None, "encoder_sha256": federation.encoder_sha or None,
        "sites": sorted(federation.node_sites.values()),
    })
    say(f"run {config.name!r} complete: {run.root}")
    return run.complete_path
