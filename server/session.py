"""The server's side of one run: who the sites are, every message it sends them, the frozen encoder.

`Federation` is what the round loop (`server.rounds`), the probes (`server.probes`) and the audit
(`server.audit`) share: the Grid, the run folder and config, the node → site map, and the one way to
send messages (`send`: logged to `messages.jsonl` by record names, shapes and bytes, exchanged within
`round_timeout_s`, unanswered sites logged `declined`). Queries are built from the typed payloads of
`braing3n_core.federation.protocol`.

Wire discipline: the frozen encoder travels once per site per run in an `install_encoder` query, sent
only to sites whose `hello` says they lack it; later messages name it by `encoder-sha256`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from braing3n_core.checkpoint import CheckpointError
from braing3n_core.data.tokens import encoder_sha256
from braing3n_core.federation.arrays import module_arrays
from braing3n_core.federation.protocol import (
    Action,
    FaultDrill,
    Hello,
    InstallEncoder,
    Payload,
    Query,
    Record,
    SiteReply,
)
from braing3n_core.federation.run_config import RunConfig
from braing3n_core.federation.run_folder import RunFolder
from braing3n_core.stage_names import MAE
from braing3n_core.training.checkpoints import load_stage_model
from server.aggregation import Verdict, metric_record, reply_site, short_reason, to_array_record
from server.privacy import ClientLevelDP
from server.transport import JobGrid, exchange, stamp


class FederationError(RuntimeError):
    """The federation cannot go on (too few sites, nothing aggregated); the run can be resumed later."""


_T0 = time.monotonic()


def say(text: str) -> None:
    print(f"[braing3n {time.monotonic() - _T0:6.1f}s] {text}", flush=True)


def summary(message: Message) -> dict[str, Any]:
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


def message(node: int, message_type: str, *payloads: Payload,
            arrays: Mapping[str, ArrayRecord] | None = None) -> Message:
    """A message whose `config` record holds `payloads` (each writes its own keys) and named ArrayRecords."""
    config: dict[str, Any] = {}
    for payload in payloads:
        config |= payload.to_config()
    return Message(RecordDict({Record.CONFIG: ConfigRecord(config), **(arrays or {})}), dst_node_id=node,
                   message_type=message_type)


@dataclass
class Federation:
    grid: Grid
    run: RunFolder
    config: RunConfig
    expected_sites: int | None = None
    node_sites: dict[int, str] = field(default_factory=dict)
    encoder_sha: str = ""
    encoder_config: dict[str, Any] = field(default_factory=dict)
    client_dp: ClientLevelDP | None = None  # one per run: its accountant spans every DP stage

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

    def site_of(self, node: int) -> str:
        return self.node_sites.get(node, f"node-{node}")

    def send(self, messages: Sequence[Message], stage: str, server_round: int) -> list[Message]:
        if isinstance(self.grid, JobGrid):  # stamped now (the grid would on push) so the log shows the record
            stamp(messages, self.grid.recipe_json)
        for out in messages:
            self.run.log_message({"direction": "out", "stage": stage, "round": server_round,
                                  "type": out.metadata.message_type, "node": out.metadata.dst_node_id,
                                  "site": self.node_sites.get(out.metadata.dst_node_id), **summary(out)})

        def resent(node: int, reason: str) -> None:
            self.run.log(stage, server_round, self.site_of(node), "resent", reason=reason)
            say(f"{stage} round {server_round}: site {self.site_of(node)} is back; message sent again ({reason})")

        replies = exchange(self.grid, messages, self.config.round_timeout_s, resent)
        for reply in replies:
            self.run.log_message({"direction": "in", "stage": stage, "round": server_round,
                                  "type": reply.metadata.message_type, "node": reply.metadata.src_node_id,
                                  "site": reply_site(reply, self.node_sites), **summary(reply)})
        answered = {r.metadata.src_node_id for r in replies}
        for out in messages:
            node = out.metadata.dst_node_id
            if node not in answered:
                self.run.log(stage, server_round, self.site_of(node), "declined",
                             reason=f"no reply within round_timeout_s={self.config.round_timeout_s:g}")
        return replies

    def query(self, action: Action, stage: str, *extra: Payload, nodes: Iterable[int] | None = None,
              arrays: Mapping[str, ArrayRecord] | None = None) -> list[Message]:
        """One query to `nodes` (default: every node); error replies are logged `declined` and dropped."""
        asked = Query(action=action, preset=self.config.preset, encoder_sha256=self.encoder_sha)
        nodes = list(self.wait_for_nodes() if nodes is None else nodes)
        messages = [message(n, MessageType.QUERY, asked, *extra, arrays=arrays) for n in nodes]
        return self.log_declines(self.send(messages, stage, 0), stage, 0)

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

    def log_verdicts(self, stage: str, server_round: int, verdicts: Sequence[Verdict], replies: Sequence[Message]) -> None:
        by_node = {r.metadata.src_node_id: r for r in replies}
        for verdict in verdicts:
            if verdict.kind == "accepted":
                content = by_node[verdict.node_id].content
                metrics = dict(metric_record(content))
                privacy = content.config_records.get(Record.PRIVACY)  # a DP site's ε etc. (never aggregated)
                site_record = content.config_records.get(Record.SITE)
                worker = SiteReply.from_config(site_record).worker if site_record is not None else ""
                self.run.log(stage, server_round, verdict.site, "train", update_norm=verdict.update_norm, worker=worker,
                             **metrics,
                             **(dict(privacy) if privacy is not None else {}),
                             **({"note": verdict.reason} if verdict.reason else {}))
                if verdict.reason:
                    say(f"{stage} round {server_round}: site {verdict.site} {verdict.reason}")
            else:
                self.run.log(stage, server_round, verdict.site, verdict.kind, reason=verdict.reason,
                             update_norm=verdict.update_norm)
                say(f"{stage} round {server_round}: site {verdict.site} {verdict.kind}: {verdict.reason}")

    def hello(self, stage: str) -> dict[int, bool]:
        """Who is who (node → site id) and which nodes hold the current encoder."""
        holds = {}
        for reply in self.query(Action.HELLO, stage):
            site = Hello.from_config(reply.content.config_records[Record.SITE])
            node = reply.metadata.src_node_id
            other = [n for n, s in self.node_sites.items() if s == site.site_id and n != node]
            if other:
                raise FederationError(f"nodes {other[0]} and {node} both claim site {site.site_id!r}")
            self.node_sites[node] = site.site_id
            holds[node] = site.has_encoder
        return holds

    def inject_faults(self, messages: list[Message], stage: str, server_round: int) -> list[Message]:
        """Drills the run config declares (`fault_injection`): the drilled site's message carries a `FaultDrill`."""
        faults = self.config.faults_for(stage, server_round)
        out = []
        for sent in messages:
            site = self.node_sites.get(sent.metadata.dst_node_id, "")
            if site not in faults:
                out.append(sent)
                continue
            fault = faults[site]
            content = RecordDict({k: v for k, v in sent.content.items() if k != Record.CONFIG})
            drill = FaultDrill(fault=fault.kind, fault_factor=fault.factor)
            content[Record.CONFIG] = ConfigRecord({**sent.content[Record.CONFIG], **drill.to_config()})
            out.append(Message(content, dst_node_id=sent.metadata.dst_node_id, message_type=sent.metadata.message_type))
            self.run.log(stage, server_round, site, "fault_injected", fault=fault.kind)
            say(f"{stage} round {server_round}: injecting fault {fault.kind!r} at site {site} (run config)")
        return out

    # --- encoder ------------------------------------------------------------------------------------------

    def load_encoder(self) -> dict[str, np.ndarray]:
        """The frozen encoder: this run's final MAE, or `start_from.mae`. Sets its hash and config and returns
        its arrays, which are not kept: a site needs them once per run, and at `paper` they are 0.8 GB that
        would stay in the server's memory through the decoder and DiT stages."""
        path = self.run.final_path(MAE) if self.run.is_final(MAE) else self.config.start_from.get(MAE)
        if path is None:
            raise FederationError("no encoder: the mae stage has not finished and start_from.mae is not set")
        try:
            model, checkpoint = load_stage_model(path, expected_stage=MAE)
        except CheckpointError as error:
            raise FederationError(str(error)) from None
        self.encoder_config = dict(checkpoint.meta["model_config"])
        self.encoder_sha = encoder_sha256(model.encoder)
        return module_arrays(model.encoder)

    def ensure_encoder(self, stage: str) -> None:
        """Install the encoder on every site that lacks it (normally once per site per run)."""
        arrays = None if self.encoder_sha else self.load_encoder()
        missing = [node for node, holds in self.hello(stage).items() if not holds]
        if not missing:
            return
        if arrays is None:
            arrays = self.load_encoder()
        replies = self.query(Action.INSTALL_ENCODER, stage, InstallEncoder(encoder_config=self.encoder_config),
                             nodes=missing, arrays={Record.ENCODER: to_array_record(arrays)})
        del arrays
        for reply in replies:
            site = SiteReply.from_config(reply.content.config_records[Record.SITE]).site_id
            self.run.log(stage, 0, site, "encoder_installed", encoder_sha256=self.encoder_sha)
        say(f"encoder {self.encoder_sha[:12]}… installed at {len(missing)} site(s)")

    # --- state ----------------------------------------------------------------------------------------------

    def write_state(self) -> None:
        self.run.write_summary(self.config, self.encoder_sha, self.node_sites)
