"""A site's own journal of what the federation asked of it: one JSON line per message its ClientApp answered.

The server's run folder is not at the hospital, so a site keeps its own account, on its own disk, at
`<cache_dir>/activity.jsonl`: when, which run, stage and round, what was asked (`train`, `evaluate`,
`query:<action>`), whether the site answered or declined (and why), how long it took, and for a training
round the loss, the number of examples, the norm of the update that left the site and, on a DP site, the
ε its privacy ledger stood at afterwards. `braing3n site status` shows the latest entries.

It is an operational log, not a ledger: the privacy ledger (`privacy/ledger.py`) stays the record of ε.
Each entry is one `write` on an `O_APPEND` descriptor, so concurrent ClientApp processes of one site
never interleave within a line; a line cut by a crash is skipped when read. Writing the journal never
fails a reply: a full or read-only disk costs the entry, not the round.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from braing3n_core.site_config import SiteConfig

JOURNAL_NAME = "activity.jsonl"
OK, DECLINED = "ok", "declined"


def journal_path(site: SiteConfig) -> Path:
    return site.resolved_cache_dir / JOURNAL_NAME


def _finite(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


@dataclass(frozen=True)
class JournalEntry:
    time: float
    message: str  # train | evaluate | query:<action>
    outcome: str  # ok | declined
    run: str = ""
    stage: str = ""
    round: int = 0
    seconds: float | None = None
    reason: str | None = None
    loss: float | None = None
    examples: float | None = None
    update_norm: float | None = None  # ‖w_sent − w_received‖ of a training round's reply
    epsilon: float | None = None  # the site's cumulative ε after a DP round
    worker: str = ""

    @classmethod
    def of_reply(cls, message: str, config: Mapping[str, Any], seconds: float, reason: str | None = None,
                 metrics: Mapping[str, Any] | None = None, update_norm: float | None = None,
                 worker: str = "") -> JournalEntry:
        """An entry from a message's `config` record (`stage`, `server-round`, `run`) and its reply's metrics."""
        metrics = metrics or {}
        server_round = config.get("server-round", 0)
        return cls(time=time.time(), message=message, outcome=DECLINED if reason is not None else OK,
                   run=str(config.get("run", "")), stage=str(config.get("stage", "")),
                   round=int(server_round) if isinstance(server_round, (int, float)) else 0,
                   seconds=round(seconds, 4), reason=reason[:500] if reason else None,
                   loss=_finite(metrics.get("train/loss")), examples=_finite(metrics.get("num-examples")),
                   update_norm=_finite(update_norm), epsilon=_finite(metrics.get("privacy/epsilon")), worker=worker)


class SiteJournal:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, entry: JournalEntry) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps({k: v for k, v in asdict(entry).items() if v not in (None, "")}) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def entries(self, last: int | None = None) -> list[JournalEntry]:
        """The journal's entries, oldest first (the `last` N); unreadable lines are skipped."""
        if not self.path.is_file():
            return []
        names = {f.name for f in fields(JournalEntry)}
        out = []
        with open(self.path, "rb") as handle:
            lines = handle.read().splitlines()
        for raw in lines[-last:] if last else lines:
            try:
                data = json.loads(raw)
                out.append(JournalEntry(**{k: v for k, v in data.items() if k in names}))
            except (ValueError, TypeError):  # a line cut by a crash
                continue
        return out


__all__ = ["DECLINED", "JOURNAL_NAME", "OK", "JournalEntry", "SiteJournal", "journal_path"]
