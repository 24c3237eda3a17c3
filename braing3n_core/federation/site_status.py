"""What a hospital can see of the federation from its own disk: `braing3n site status SITE_YAML`.

A site does not hold the server's run folder; what it has is its own:
- its **privacy ledger** (`privacy/ledger.py`): ε spent so far of its budget, δ, releases per stage;
- its **journal** (`federation/site_journal.py`): the last messages it answered or declined, with loss,
  update norm and ε per training round;
- its **cache** (`<cache_dir>`): checked verdicts, preprocessed volumes, token caches and the frozen
  encoders the server installed (by weight hash), and their size on disk;
- its **approval log** (`federation/approval_log.py`): whether it requires approval, the active approvals.
Reading them changes nothing (the ledger and the log are verified, never repaired, here).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from braing3n_core.federation.approval_log import ApprovalLog, ApprovalLogError
from braing3n_core.federation.site_journal import JournalEntry, SiteJournal, journal_path
from braing3n_core.privacy.ledger import LedgerError, PrivacyLedger
from braing3n_core.site_config import SiteConfig

RECENT_ENTRIES = 12


@dataclass(frozen=True)
class PrivacyStatus:
    enabled: bool
    budget: float
    epsilon: float  # spent so far, over every round, stage and run
    delta: float | None
    releases: int
    stages: dict[str, dict[str, int]]
    ledger: str
    error: str | None = None  # the ledger cannot be trusted: the site must not train

    @property
    def left(self) -> float:
        return max(0.0, self.budget - self.epsilon)


@dataclass(frozen=True)
class CacheStatus:
    path: str
    exists: bool
    bytes: int = 0
    check_verdicts: int = 0
    volumes: int = 0
    token_entries: int = 0
    encoders: list[dict[str, Any]] = field(default_factory=list)  # {"sha256", "installed"}


@dataclass(frozen=True)
class ApprovalStatus:
    required: bool
    log: str
    active: list[str]  # `Approval.describe()` of each active approval
    revoked: int
    error: str | None = None  # the log cannot be trusted: the site refuses every job


@dataclass(frozen=True)
class SiteSnapshot:
    site_id: str
    data_root: str
    data_present: bool
    privacy: PrivacyStatus
    cache: CacheStatus
    approval: ApprovalStatus
    journal: str
    recent: list[JournalEntry]
    answered: int  # messages in the journal, all time
    declined: int

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["privacy"]["left"] = self.privacy.left
        return data


def cache_status(site: SiteConfig) -> CacheStatus:
    """Counts by the cache's own folders (`checks/`, `volumes/`, `tokens-*/`, `encoders/`) and its whole size."""
    root = site.resolved_cache_dir
    if not root.is_dir():
        return CacheStatus(str(root), False)
    total, counts = 0, {"checks": 0, "volumes": 0, "tokens": 0}
    for folder, _, files in os.walk(root):
        top = Path(folder).relative_to(root).parts[:1]
        kind = "tokens" if top and top[0].startswith("tokens-") else (top[0] if top else "")
        for name in files:
            try:
                total += os.stat(os.path.join(folder, name)).st_size
            except OSError:  # replaced while walking
                continue
            if kind in counts and name.endswith(".json" if kind == "checks" else ".npy"):
                counts[kind] += 1
    encoders = []
    for manifest in sorted((root / "encoders").glob("*.json")):
        try:
            sha = json.loads(manifest.read_text())["meta"]["encoder_sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        encoders.append({"sha256": sha, "installed": manifest.stat().st_mtime})
    return CacheStatus(str(root), True, total, counts["checks"], counts["volumes"], counts["tokens"], encoders)


def privacy_status(site: SiteConfig) -> PrivacyStatus:
    settings = site.privacy
    ledger = PrivacyLedger(site.privacy_ledger_path, site.site_id, settings.accountant)
    try:
        summary = ledger.summary()
    except LedgerError as error:
        return PrivacyStatus(settings.enabled, settings.epsilon_budget, float("nan"), None, 0, {}, str(ledger.path),
                             error=str(error))
    return PrivacyStatus(settings.enabled, settings.epsilon_budget, float(summary["epsilon"]), summary["delta"],
                         int(summary["releases"]), summary["stages"], str(ledger.path))


def approval_status(site: SiteConfig) -> ApprovalStatus:
    log = ApprovalLog.of(site)
    try:
        approvals = log.approvals()
    except ApprovalLogError as error:
        return ApprovalStatus(site.approval.required, str(log.path), [], 0, error=str(error))
    return ApprovalStatus(site.approval.required, str(log.path), [a.describe() for a in approvals if a.active],
                          sum(not a.active for a in approvals))


def site_snapshot(site: SiteConfig, recent: int = RECENT_ENTRIES) -> SiteSnapshot:
    journal = SiteJournal(journal_path(site))
    entries = journal.entries()
    return SiteSnapshot(
        site_id=site.site_id, data_root=str(site.data_root), data_present=Path(site.data_root).is_dir(),
        privacy=privacy_status(site), cache=cache_status(site), approval=approval_status(site), journal=str(journal.path),
        recent=entries[-recent:], answered=len(entries), declined=sum(e.outcome != "ok" for e in entries),
    )


__all__ = ["ApprovalStatus", "CacheStatus", "PrivacyStatus", "SiteSnapshot", "approval_status", "cache_status",
           "privacy_status", "site_snapshot"]
