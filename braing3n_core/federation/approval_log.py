"""A site's approval log: every approval of a federated job and every revocation, append-only, on its own disk.

An approval names a job by two hashes: the app's code (the Flower app bundle's sha256, as Flower computes it
when `flwr run` submits the app; `client/fab.py`) and the run recipe (`federation.recipe`). Its scope:
- `exact`: that recipe only (one byte changed in what runs is another recipe);
- `rounds`: any recipe of the same shape (everything but the round counts) whose stages and probes run at
  most `max_rounds` each, so a resumed or extended run of the same stages needs no new approval.
A revocation names an approval by id. `federation.approvals.admit`, the gate every message passes, reads the
log at every message (nothing is cached between messages), so a revocation takes effect at the next round.

The log: one JSON line per approval or revocation: who, when, what (both hashes, the recipe's name, scope,
the consortium key that signed the job when it was checked). Lines are hash-chained like the privacy ledger
(`privacy/ledger.py`) and appended the same way (`fileio.append_line`: one O_APPEND write, then fsync;
`fileio.exclusive_lock` serialises writers). A torn last line (a SIGKILL mid-write) is dropped by an atomic
rewrite of the intact prefix: `approve` returns only after the fsync, so nothing ever acted on it. Anything
wrong before the last line (an edited, removed or reordered entry) makes the log untrusted: the gate then
refuses every job (it fails closed) until the log is restored.

This module reads and writes the log only (no torch, no Flower): a writer killed mid-write is tested in a
child process that imports just this.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from braing3n_core.errors import BadInput
from braing3n_core.fileio import append_line, atomic_write_bytes, exclusive_lock
from braing3n_core.site_config import SiteConfig

GENESIS = "0" * 64
ID_CHARS = 12  # an approval's id: the first characters of its entry's hash
Scope = Literal["exact", "rounds"]


class ApprovalLogError(BadInput, RuntimeError):
    """The approval log cannot be trusted or changed as asked; the message names the file (exit code 2)."""


class RecipeIdentity(Protocol):
    """What the log needs of a recipe (`federation.recipe.Recipe`)."""

    @property
    def name(self) -> str: ...
    @property
    def sha256(self) -> str: ...
    @property
    def shape_sha256(self) -> str: ...
    @property
    def rounds(self) -> dict[str, int]: ...


@dataclass(frozen=True)
class LogEntry:
    """One line of the log: an approval (`action` approve) or the revocation of one (`action` revoke)."""

    action: Literal["approve", "revoke"]
    site_id: str
    by: str
    time: float
    fab_sha256: str = ""
    app: str = ""  # the bundle's Flower app id and version, as the job said (informational)
    recipe_sha256: str = ""
    shape_sha256: str = ""
    run: str = ""  # the recipe's name
    scope: Scope = "exact"
    max_rounds: dict[str, int] = field(default_factory=dict)  # scope `rounds`: per stage (and `probes`)
    signed_by: str = ""  # fingerprint of the consortium key whose signature on the job was checked; "" if not
    job: str = ""  # the job file approved
    approval: str = ""  # revoke: the id of the approval withdrawn
    reason: str = ""  # revoke: why
    prev: str = GENESIS
    sha256: str = ""

    @property
    def id(self) -> str:
        return self.sha256[:ID_CHARS]

    def body(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "sha256"}

    @staticmethod
    def digest(body: Mapping[str, Any]) -> str:
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def sealed(self) -> LogEntry:
        return LogEntry(**{**self.body(), "sha256": self.digest(self.body())})

    def line(self) -> bytes:
        return (json.dumps({**self.body(), "sha256": self.sha256}, sort_keys=True) + "\n").encode()


@dataclass(frozen=True)
class Approval:
    entry: LogEntry
    revoked: LogEntry | None = None

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def active(self) -> bool:
        return self.revoked is None

    def covers_recipe(self, recipe: RecipeIdentity) -> bool:
        if self.entry.scope == "exact":
            return recipe.sha256 == self.entry.recipe_sha256
        return recipe.shape_sha256 == self.entry.shape_sha256 and all(
            rounds <= self.entry.max_rounds.get(step, 0) for step, rounds in recipe.rounds.items())

    def describe(self) -> str:
        scope = "exactly this recipe" if self.entry.scope == "exact" else "up to " + ", ".join(
            f"{n} {step} rounds" for step, n in self.entry.max_rounds.items())
        return f"approval {self.id} ({self.entry.run!r}, {scope}, by {self.entry.by} on {local_time(self.entry.time)})"


def local_time(seconds: float) -> str:
    """A log entry's time as people read it (local time, to the minute)."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


class ApprovalLog:
    """The approval log of one site (see the module docstring for its guarantees)."""

    def __init__(self, path: Path, site_id: str) -> None:
        self.path, self.site_id = Path(path), site_id

    @classmethod
    def of(cls, site: SiteConfig) -> ApprovalLog:
        return cls(site.approval_log_path, site.site_id)

    # --- reading ---------------------------------------------------------------------------------------------

    def entries(self, repair: bool = False) -> list[LogEntry]:
        """Every entry, verified; a torn last line is skipped (with `repair`, removed from the file: callers
        hold the lock)."""
        if not self.path.is_file():
            return []
        lines = self.path.read_bytes().split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # `tail` is b"" when the file ends with a newline
        entries: list[LogEntry] = []
        for number, line in enumerate(complete, start=1):
            entries.append(self._verify(line, number, entries[-1].sha256 if entries else GENESIS))
        if tail and repair:
            atomic_write_bytes(self.path, b"".join(e.line() for e in entries))
        return entries

    def _verify(self, line: bytes, number: int, prev: str) -> LogEntry:
        try:
            entry = LogEntry(**json.loads(line))
            if entry.action not in ("approve", "revoke"):
                raise ValueError(f"unknown action {entry.action!r}")
        except (ValueError, TypeError) as error:
            raise ApprovalLogError(f"{self.path}: line {number} is not an approval entry ({error}); the log cannot "
                                   "be trusted, so this site refuses every job until it is restored") from None
        if LogEntry.digest(entry.body()) != entry.sha256:
            raise ApprovalLogError(f"{self.path}: line {number} was changed after it was written (its hash does not "
                                   "match); the log cannot be trusted, so this site refuses every job until it is restored")
        if entry.prev != prev:
            raise ApprovalLogError(f"{self.path}: line {number} does not follow line {number - 1} (hash chain broken: "
                                   "an entry was removed, reordered or edited)")
        if entry.site_id != self.site_id:
            raise ApprovalLogError(f"{self.path}: line {number} belongs to site {entry.site_id!r}, not {self.site_id!r}")
        return entry

    def approvals(self) -> list[Approval]:
        """Every approval in the order given, each with its revocation if there is one."""
        entries = self.entries()
        revoked = {e.approval: e for e in entries if e.action == "revoke"}
        return [Approval(e, revoked.get(e.id)) for e in entries if e.action == "approve"]

    def find(self, prefix: str) -> Approval:
        matches = [a for a in self.approvals() if a.id.startswith(prefix.lower())] if prefix else []
        if len(matches) != 1:
            known = ", ".join(a.id for a in self.approvals()) or "none"
            what = "no approval" if not matches else f"{len(matches)} approvals"
            raise ApprovalLogError(f"{self.path}: {what} with id {prefix!r} (approvals: {known})")
        return matches[0]

    # --- writing ---------------------------------------------------------------------------------------------

    def _append(self, entry: LogEntry, check: Callable[[list[LogEntry]], None] | None = None) -> LogEntry:
        with exclusive_lock(self.path):
            entries = self.entries(repair=True)
            if check is not None:
                check(entries)
            sealed = LogEntry(**{**entry.body(), "prev": entries[-1].sha256 if entries else GENESIS}).sealed()
            append_line(self.path, sealed.line())
            return sealed

    def approve(self, fab_sha256: str, recipe: RecipeIdentity, by: str, *, app: str = "", max_rounds: Mapping[str, int] | None = None,
                signed_by: str = "", job: str = "") -> Approval:
        """Record an approval of (app, recipe); with `max_rounds`, of any recipe of its shape within those rounds."""
        if len(fab_sha256) != 64 or any(c not in "0123456789abcdef" for c in fab_sha256):
            raise ApprovalLogError(f"{fab_sha256!r} is not a bundle hash (64 hex digits)")
        scope: Scope = "exact"
        limits: dict[str, int] = {}
        if max_rounds:
            unknown = sorted(set(max_rounds) - set(recipe.rounds))
            if unknown:
                raise ApprovalLogError(f"max rounds given for {unknown}, which recipe {recipe.name!r} does not run (it runs "
                                       f"{sorted(recipe.rounds)})")
            limits = {step: int(max_rounds.get(step, rounds)) for step, rounds in recipe.rounds.items()}
            short = {step: n for step, n in limits.items() if n < recipe.rounds[step]}
            if short:
                raise ApprovalLogError(f"max rounds {short} are below recipe {recipe.name!r}'s own {recipe.rounds}")
            scope = "rounds"
        entry = LogEntry("approve", self.site_id, by, time.time(), fab_sha256=fab_sha256, app=app,
                         recipe_sha256=recipe.sha256, shape_sha256=recipe.shape_sha256, run=recipe.name, scope=scope,
                         max_rounds=limits, signed_by=signed_by, job=job)
        return Approval(self._append(entry))

    def revoke(self, approval_id: str, by: str, reason: str = "") -> Approval:
        """Withdraw an active approval (by its id or a unique prefix of it)."""
        target = self.find(approval_id)

        def still_active(entries: list[LogEntry]) -> None:  # re-checked under the lock
            if any(e.action == "revoke" and e.approval == target.id for e in entries):
                raise ApprovalLogError(f"{self.path}: approval {target.id} is already revoked")

        entry = self._append(LogEntry("revoke", self.site_id, by, time.time(), approval=target.id, reason=reason),
                             still_active)
        return Approval(target.entry, entry)
