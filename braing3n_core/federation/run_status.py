"""A live snapshot of a federated run, computed from its run folder alone (no Flower, no server process).

`RunWatcher(run_dir).snapshot()` reads what the ServerApp writes as the run goes (`run.yaml`,
`metrics.jsonl`, `messages.jsonl`, `server_state.json`, `run_complete.json`; see `run_folder.py`) and
answers what `braing3n consortium status` and the status web page show: the stage and round, every
site's state, the last round's loss and update norm per site, ε spent of budget, bytes on the wire,
time per round and an ETA. The watcher keeps its place in the two ledgers and parses only the lines
appended since the last snapshot, so a view that refreshes every second stays cheap on a long run; a
ledger rewritten on resume (`RunFolder.prune_uncommitted`) is read again from the start.

A site's state is the latest thing that happened to it:

| state | after |
|---|---|
| `waiting` | a message was sent to a node that has never answered |
| `training` / `evaluating` / `querying` | a train / evaluate / query message went out and no reply came back yet |
| `connected` | it answered (its update was accepted, it evaluated, it answered a query) |
| `declined` | it refused (the reason it gave) or did not answer within `round_timeout_s` |
| `rejected` | the server screened its reply out (wrong shapes, NaN, an update beyond the norm bound) |
| `done` | the run is complete |

The run's state is `complete` (`run_complete.json`), `running`, `waiting` (nothing sent yet), or
`stopped` when nothing was written for longer than a round may take (1.5 × `round_timeout_s` + 60 s):
the ServerApp is gone, or waits for sites; `--resume` continues it.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from braing3n_core.federation.run_folder import RunFolder
from braing3n_core.stage_names import MAE, PROBES

AGGREGATE = "aggregate"
SERVER = "server"  # records of the server itself (client-level DP accountant)
EVENT_KINDS = ("declined", "rejected", "resent", "fault_injected", "encoder_installed")
RECENT_EVENTS = 12
_STATE_OF_MESSAGE = {"train": "training", "evaluate": "evaluating", "query": "querying"}


class RunStatusError(ValueError):
    """The folder is not a run folder (no run.yaml), or its run.yaml cannot be read."""


@dataclass(frozen=True)
class SiteStatus:
    site: str
    state: str
    reason: str | None = None  # why it declined or was rejected
    stage: str | None = None  # of its latest activity
    round: int | None = None
    loss: float | None = None  # its last accepted update's train/loss
    update_norm: float | None = None  # ‖w_site − w_global‖ of that update
    examples: float | None = None  # its num-examples (FedAvg weight)
    epsilon: float | None = None  # ε its privacy ledger reported with its last DP round
    budget: float | None = None  # its ε budget
    worker: str | None = None  # where its last update was computed
    rounds_accepted: int = 0
    rounds_declined: int = 0
    bytes_sent: int = 0  # array bytes the server sent it
    bytes_received: int = 0  # array bytes it sent back
    last_reply: float | None = None  # time of its last answer


@dataclass(frozen=True)
class StageStatus:
    name: str
    rounds: int
    completed: int  # rounds whose aggregate was logged
    done: bool
    last_round_s: float | None = None  # wall time of its latest round (send → aggregate, incl. evaluation)
    mean_round_s: float | None = None
    loss: float | None = None  # the aggregate's train/loss at its latest round
    validation: dict[str, float] = field(default_factory=dict)  # pooled val/* of its latest evaluation


@dataclass(frozen=True)
class Event:
    time: float
    stage: str
    round: int
    site: str
    kind: str
    detail: str


@dataclass(frozen=True)
class RunStatus:
    run_dir: str
    name: str
    preset: str
    state: str  # waiting | running | stopped | complete
    stage: str | None  # the stage in progress (or the last one)
    round: int  # its round in progress (or its last completed round)
    rounds: int  # of that stage
    round_in_progress: bool
    stages: list[StageStatus]
    sites: list[SiteStatus]
    bytes_sent: int
    bytes_received: int
    started: float | None
    updated: float | None  # time of the last ledger line
    now: float
    eta_s: float | None  # remaining rounds × their measured (or, for stages not started, estimated) time
    eta_estimated: bool  # part of the ETA comes from other stages' round times
    progress: float  # completed rounds / all rounds
    client_epsilon: float | None  # the server's client-level DP accountant, when the run uses it
    events: list[Event]
    version: int  # grows with every ledger line read; views redraw figures when it changes

    def to_json(self) -> dict[str, Any]:
        return _finite(asdict(self))

    def site(self, name: str) -> SiteStatus:
        for site in self.sites:
            if site.site == name:
                return site
        raise KeyError(name)


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


class LedgerTail:
    """The lines appended to an append-only JSONL ledger since the last call. A file replaced (a new inode,
    as an atomic rewrite makes) or shorter than what was read is read again from its start (`reset`)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.offset = 0
        self.identity: tuple[int, int] | None = None
        self.pending = b""

    def read(self) -> tuple[bool, list[dict[str, Any]]]:
        """(reset, new records); a line not yet finished by its writer waits for the next call."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            reset = self.identity is not None
            self.offset, self.identity, self.pending = 0, None, b""
            return reset, []
        identity = (stat.st_dev, stat.st_ino)
        reset = self.identity is not None and (identity != self.identity or stat.st_size < self.offset)
        if reset:
            self.offset, self.pending = 0, b""
        self.identity = identity
        if stat.st_size == self.offset:
            return reset, []
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read(stat.st_size - self.offset)
        self.offset += len(chunk)
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        records = []
        for line in lines:
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash, followed by later lines: skipped
                continue
            if isinstance(value, dict):
                records.append(value)
        return reset, records


@dataclass
class _Message:
    time: float
    direction: str
    stage: str
    round: int
    type: str
    node: int | None
    site: str | None
    bytes: int
    error: bool


def _message(entry: Mapping[str, Any]) -> _Message:
    records = entry.get("records") or {}
    size = sum(int(r.get("bytes", 0)) for r in records.values() if isinstance(r, Mapping))
    node = entry.get("node")
    return _Message(float(entry.get("time", 0.0)), str(entry.get("direction", "")), str(entry.get("stage", "")),
                    int(entry.get("round", 0) or 0), str(entry.get("type", "")).split(".")[0],
                    int(node) if isinstance(node, int) else None, entry.get("site"), size, "error" in entry)


def stage_order(stages: Iterable[str], probes: bool, probes_first: bool) -> list[str]:
    """The order the ServerApp runs the run's stages in (server/run.py): probes right after the MAE, or
    first when the encoder comes from `start_from`."""
    order = [PROBES] if probes and probes_first else []
    for name in stages:
        order.append(name)
        if name == MAE and probes and not probes_first:
            order.append(PROBES)
    if probes and PROBES not in order:
        order.append(PROBES)
    return order


class RunWatcher:
    """Keeps up with one run folder; `snapshot()` is cheap to call again and again."""

    def __init__(self, run_dir: Path) -> None:
        self.run = RunFolder(Path(run_dir))
        if not self.run.is_run():
            raise RunStatusError(f"{self.run.root}: not a run folder (no run.yaml); give the --out of "
                                 "`braing3n simulate` or `braing3n consortium run`")
        self._metrics = LedgerTail(self.run.metrics_path)
        self._messages = LedgerTail(self.run.messages_path)
        self.records: list[dict[str, Any]] = []
        self.messages: list[_Message] = []
        self.version = 0
        self._config_stamp: tuple[float, int] | None = None
        self._config: dict[str, Any] = {}

    def _read_config(self) -> dict[str, Any]:
        import yaml

        stat = self.run.config_path.stat()
        stamp = (stat.st_mtime, stat.st_size)
        if stamp != self._config_stamp:
            try:
                config = yaml.safe_load(self.run.config_path.read_text(encoding="utf-8")) or {}
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
                raise RunStatusError(f"{self.run.config_path}: cannot be read ({error})") from None
            if not isinstance(config, dict):
                raise RunStatusError(f"{self.run.config_path}: expected a mapping")
            self._config, self._config_stamp = config, stamp
        return self._config

    def update(self) -> None:
        """Read what was appended to the ledgers since the last call."""
        reset, new = self._metrics.read()
        if reset:
            self.records = []
        self.records.extend(new)
        changed = reset or bool(new)
        reset, entries = self._messages.read()
        if reset:
            self.messages = []
        self.messages.extend(_message(e) for e in entries)
        if changed or reset or entries:
            self.version += 1

    def snapshot(self, now: float | None = None) -> RunStatus:
        self.update()
        return compute_status(self.run, self._read_config(), self.records, self.messages, self.version,
                              time.time() if now is None else now)


def run_status(run_dir: Path, now: float | None = None) -> RunStatus:
    """One snapshot of the run in `run_dir`."""
    return RunWatcher(run_dir).snapshot(now)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, or being replaced right now: the next snapshot sees it
        return {}
    return value if isinstance(value, dict) else {}


def compute_status(run: RunFolder, config: Mapping[str, Any], records: list[dict[str, Any]],
                   messages: list[_Message], version: int, now: float) -> RunStatus:
    state_file = _read_json(run.state_path)
    complete = _read_json(run.complete_path) if run.complete_path.is_file() else None
    stage_rounds = {str(s.get("name")): int(s.get("rounds", 0)) for s in config.get("stages", []) if isinstance(s, Mapping)}
    probes = config.get("probes") or {}
    probes_on = bool(probes.get("enabled", False))
    if probes_on:
        stage_rounds[PROBES] = int(probes.get("rounds", 0))
    order = stage_order([s for s in stage_rounds if s != PROBES], probes_on, MAE in (config.get("start_from") or {}))

    # --- stages: rounds completed, their wall times, the latest aggregate values --------------------------
    aggregates: dict[str, list[dict[str, Any]]] = {name: [] for name in order}
    validation: dict[str, dict[str, float]] = {}
    client_epsilon = None
    for record in records:
        stage, kind, site = record.get("stage"), record.get("kind"), record.get("site")
        if site == AGGREGATE and kind == "train" and stage in aggregates and int(record.get("round", 0)) > 0:
            aggregates[stage].append(record)
        elif site == AGGREGATE and kind == "evaluate" and stage in aggregates:
            validation[stage] = {k: v for k, v in record.items() if k.startswith("val/") and _number(v) is not None}
        elif site == SERVER and kind == "client_dp":
            client_epsilon = _number(record.get("privacy/epsilon"))
    sent_at: dict[tuple[str, int], float] = {}
    for message in messages:
        if message.direction == "out" and message.type == "train":
            sent_at.setdefault((message.stage, message.round), message.time)
    stages = []
    for name in order:
        done_rounds = {int(r["round"]): r for r in aggregates[name]}
        times = []
        for rnd, record in sorted(done_rounds.items()):
            start = sent_at.get((name, rnd))
            previous = done_rounds.get(rnd - 1)
            if previous is not None:  # the round's whole wall time: from the last aggregate (evaluation, checkpoint)
                times.append(float(record["time"]) - float(previous["time"]))
            elif start is not None:
                times.append(float(record["time"]) - start)
            elif _number(record.get("round_seconds")) is not None:
                times.append(float(record["round_seconds"]))
        last = done_rounds[max(done_rounds)] if done_rounds else None
        stage_state = (state_file.get("stages") or {}).get(name) if name != PROBES else state_file.get("probes")
        done = bool(isinstance(stage_state, Mapping) and stage_state.get("done")) or run.is_final(name)
        stages.append(StageStatus(
            name=name, rounds=stage_rounds[name], completed=max(done_rounds, default=0), done=done,
            last_round_s=times[-1] if times else None, mean_round_s=sum(times) / len(times) if times else None,
            loss=_number(last.get("train/loss")) if last else None, validation=validation.get(name, {}),
        ))

    # --- where the run is ------------------------------------------------------------------------------------
    current = None
    in_progress = False
    latest_sent = max((m for m in messages if m.direction == "out" and m.stage in stage_rounds and m.round > 0),
                      key=lambda m: m.time, default=None)
    by_name = {s.name: s for s in stages}
    if latest_sent is not None:
        current = by_name[latest_sent.stage]
        in_progress = latest_sent.round > current.completed and not current.done
        round_now = latest_sent.round if in_progress else current.completed
    else:
        started = [s for s in stages if s.completed]
        current = started[-1] if started else None
        round_now = current.completed if current else 0
    if complete is not None:
        current = stages[-1] if stages else None
        round_now, in_progress = (current.completed if current else 0), False

    # --- sites ---------------------------------------------------------------------------------------------------
    node_site: dict[int, str] = {int(n): str(s) for n, s in (state_file.get("sites") or {}).items() if str(n).isdigit()}
    for message in messages:
        if message.node is not None and message.site:
            node_site.setdefault(message.node, message.site)
    sites: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> dict[str, Any]:
        return sites.setdefault(name, {"site": name, "state": "waiting", "rounds_accepted": 0, "rounds_declined": 0,
                                       "bytes_sent": 0, "bytes_received": 0, "answered": False})

    for name in node_site.values():
        entry(name)
    timeline: list[tuple[float, int, str, Any]] = []  # (time, order, what, payload): records after messages at a tie
    for message in messages:
        name = message.site or node_site.get(message.node or -1) or f"node-{message.node}"
        timeline.append((message.time, 0, name, message))
    for record in records:
        name = record.get("site")
        if isinstance(name, str) and name not in (AGGREGATE, SERVER):
            timeline.append((float(record.get("time", 0.0)), 1, name, record))
    timeline.sort(key=lambda item: (item[0], item[1]))
    events: list[Event] = []
    for when, _, name, item in timeline:
        site = entry(name)
        if isinstance(item, _Message):
            site["stage"], site["round"] = item.stage, item.round
            if item.direction == "out":
                site["bytes_sent"] += item.bytes
                site["state"], site["reason"] = _STATE_OF_MESSAGE.get(item.type, "querying"), None
            else:
                site["bytes_received"] += item.bytes
                site["last_reply"] = item.time
                if not item.error:
                    site["state"], site["reason"], site["answered"] = "connected", None, True
            continue
        kind = item.get("kind")
        if kind in ("train", "evaluate", "probe", "encoder_installed", "privacy_audit"):
            site["state"], site["reason"], site["answered"] = "connected", None, True
        if kind == "train":
            site["rounds_accepted"] += 1
            site["stage"], site["round"] = item.get("stage"), item.get("round")
            site["loss"] = _number(item.get("train/loss"))
            site["update_norm"] = _number(item.get("update_norm"))
            site["examples"] = _number(item.get("num-examples"))
            site["worker"] = item.get("worker") or None
            if _number(item.get("privacy/epsilon")) is not None:
                site["epsilon"] = _number(item.get("privacy/epsilon"))
                site["budget"] = _number(item.get("privacy/budget"))
        elif kind in ("declined", "rejected"):
            site["state"], site["reason"] = kind, str(item.get("reason", "")) or None
            site["stage"], site["round"] = item.get("stage"), item.get("round")
            site["rounds_declined"] += kind == "declined"
            if kind == "rejected":
                site["update_norm"] = _number(item.get("update_norm"))
        elif kind == "resent":
            site["state"] = "training"
        if kind in EVENT_KINDS:
            detail = str(item.get("reason") or item.get("fault") or item.get("encoder_sha256", ""))[:300]
            events.append(Event(when, str(item.get("stage")), int(item.get("round", 0) or 0), name, str(kind), detail))
    site_list = []
    for name in sorted(sites):
        values = sites[name]
        if complete is not None:
            values["state"] = "done" if values["state"] not in ("declined", "rejected") or values["answered"] else values["state"]
        values.pop("answered")
        site_list.append(SiteStatus(**values))

    # --- totals, time, ETA ---------------------------------------------------------------------------------------
    times = [float(r["time"]) for r in records if _number(r.get("time")) is not None]
    times += [m.time for m in messages]
    started, updated = (min(times), max(times)) if times else (None, None)
    simulation = _read_json(run.simulation_record)
    if _number(simulation.get("started")) is not None:
        started = min(started or math.inf, float(simulation["started"]))
    timeout = float(config.get("round_timeout_s", 3600.0))
    if complete is not None:
        state = "complete"
    elif updated is None:
        state = "waiting"
    elif now - updated > 1.5 * timeout + 60.0:
        state = "stopped"
    else:
        state = "running"
    measured = [s.mean_round_s for s in stages if s.mean_round_s is not None]
    fallback = sum(measured) / len(measured) if measured else None
    eta, estimated = 0.0, False
    for stage in stages:
        left = max(stage.rounds - stage.completed, 0) if not stage.done else 0
        if not left:
            continue
        per_round = stage.mean_round_s if stage.mean_round_s is not None else fallback
        if per_round is None:
            eta = math.nan
            break
        estimated |= stage.mean_round_s is None
        eta += left * per_round
    total_rounds = sum(s.rounds for s in stages)
    done_rounds = sum(s.rounds if s.done else min(s.completed, s.rounds) for s in stages)
    return RunStatus(
        run_dir=str(run.root), name=str(config.get("name", run.root.name)), preset=str(config.get("preset", "")),
        state=state, stage=current.name if current else None, round=round_now, rounds=current.rounds if current else 0,
        round_in_progress=in_progress, stages=stages, sites=site_list,
        bytes_sent=sum(m.bytes for m in messages if m.direction == "out"),
        bytes_received=sum(m.bytes for m in messages if m.direction == "in"),
        started=started, updated=updated, now=now,
        eta_s=(0.0 if state == "complete" else None if math.isnan(eta) else eta), eta_estimated=estimated,
        progress=done_rounds / total_rounds if total_rounds else (1.0 if complete is not None else 0.0),
        client_epsilon=client_epsilon, events=events[-RECENT_EVENTS:], version=version,
    )


__all__ = ["Event", "LedgerTail", "RunStatus", "RunStatusError", "RunWatcher", "SiteStatus", "StageStatus",
           "run_status", "stage_order"]
