"""A site's privacy ledger: every differentially private release, on the site's own disk, append-only.

One JSON line per release (a round of DP-SGD, or any other subsampled Gaussian mechanism run on the
site's subjects): stage, round, run, sampling rate q, noise multiplier σ, steps, δ, clipping bound, the
number of subjects, and ε after it. The cumulative ε is never carried as a number from round to round:
it is recomputed from the whole history by ONE accountant (Opacus' RDP accountant by default, PRV on
request), so rounds, stages and runs compose, and a restarted client (a fresh Ray actor, a fresh
SuperNode process) reads the same ε back. A fresh `PrivacyEngine` per round would forget the past —
the mistake of Flower's Opacus example.

Crash safety:
- an entry is one `os.write` of one line on an `O_APPEND` descriptor, followed by `fsync`;
- every entry carries the sha256 of its canonical form and of the previous entry (a hash chain), so an
  edited, reordered or deleted line is detected;
- a torn last line (the process died mid-write: bytes after the last newline) is detected and
  dropped by an atomic rewrite of the intact prefix. This is correct, not lenient: the entry is written
  before the update leaves the site, so a torn entry belongs to an update that was never sent;
- anything wrong before the last line is a `LedgerError`: the site cannot know what it has spent and
  must not train (the hard budget would be meaningless).
Writers take an exclusive `flock` on `<ledger>.lock` (two processes serving one site serialise), and
re-check the budget under the lock before appending.

The first entry pins δ, the accountant and the site id: ε values at different δ do not add up, so a
later release at another δ is refused with a message saying how to proceed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from braing3n_core.fileio import append_line, atomic_write_bytes, exclusive_lock

ACCOUNTANTS = ("rdp", "prv")
GENESIS = "0" * 64  # `prev` of the first entry


class LedgerError(RuntimeError):
    """The ledger cannot be trusted (corrupt line, broken chain, another site's, another δ); names the file."""


class PrivacyBudgetExceeded(RuntimeError):
    """The next release would take the site's cumulative ε above its budget; the message gives the numbers."""

    def __init__(self, message: str, epsilon_now: float, epsilon_after: float, budget: float) -> None:
        super().__init__(message)
        self.epsilon_now, self.epsilon_after, self.budget = epsilon_now, epsilon_after, budget


@dataclass(frozen=True)
class Release:
    """One subsampled Gaussian mechanism on the site's subjects: `steps` steps at rate q with noise σ."""

    stage: str
    server_round: int
    sample_rate: float  # q: each subject's probability of being in a step's batch
    noise_multiplier: float  # σ: noise std / clipping bound
    steps: int
    max_grad_norm: float  # C, the per-subject clipping bound (recorded, not needed by the accountant)
    subjects: int  # n, the population the rate refers to
    run: str = ""
    mechanism: str = "dp-sgd"

    def __post_init__(self) -> None:
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must lie in (0, 1], got {self.sample_rate}")
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be positive and finite, got {self.noise_multiplier}")
        if self.steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {self.steps}")

    @property
    def history_item(self) -> tuple[float, float, int]:
        """Opacus accountants' history format: (σ, q, steps)."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class LedgerEntry:
    site_id: str
    accountant: str
    delta: float
    epsilon_before: float
    epsilon_after: float
    release: Release
    time: float
    prev: str
    sha256: str = ""

    def body(self) -> dict[str, Any]:
        """The canonical content (everything but the entry's own hash), flat for readable lines."""
        data = {k: v for k, v in asdict(self).items() if k not in ("release", "sha256")}
        return {**data, **asdict(self.release)}

    def line(self) -> bytes:
        return (json.dumps({**self.body(), "sha256": self.sha256}, sort_keys=True) + "\n").encode()

    @staticmethod
    def digest(body: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    @classmethod
    def parse(cls, data: dict[str, Any]) -> LedgerEntry:
        release_keys = {f for f in Release.__dataclass_fields__}
        release = Release(**{k: data[k] for k in release_keys if k in data})
        own = {k: data[k] for k in ("site_id", "accountant", "delta", "epsilon_before", "epsilon_after", "time", "prev")}
        return cls(**own, release=release, sha256=str(data["sha256"]))


def epsilon_of(history: Sequence[Release], delta: float, accountant: str = "rdp") -> float:
    """Cumulative ε at δ of a sequence of releases, by one accountant over the whole sequence.

    RDP: Opacus' analysis at Opacus' default orders; the RDP of k steps is k times that of one step at
    the same (q, σ), and the one-step vector is memoised per (q, σ), so re-reading a long ledger costs a
    sum, not a recomputation (fractional orders cost seconds each in Opacus). PRV: Opacus' accountant.
    """
    if not history:
        return 0.0
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of {ACCOUNTANTS}")
    if accountant == "rdp":
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis.rdp import get_privacy_spent

        orders = RDPAccountant.DEFAULT_ALPHAS
        total = sum(r.steps * np.asarray(_rdp_one_step(r.sample_rate, r.noise_multiplier)) for r in history)
        return float(get_privacy_spent(orders=orders, rdp=total, delta=delta)[0])
    from opacus.accountants import PRVAccountant

    engine = PRVAccountant()
    engine.history = [r.history_item for r in history]
    return float(engine.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=1024)
def _rdp_one_step(sample_rate: float, noise_multiplier: float) -> tuple[float, ...]:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    # Opacus logs a warning for each low fractional order whose series does not converge and leaves that
    # order out (the bound stays valid); one line per order and per process is noise in a site's log.
    analysis_log = logging.getLogger(compute_rdp.__module__)
    level = analysis_log.level
    analysis_log.setLevel(logging.ERROR)
    try:
        return tuple(float(v) for v in compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                                   orders=RDPAccountant.DEFAULT_ALPHAS))
    finally:
        analysis_log.setLevel(level)


@dataclass
class LedgerState:
    entries: list[LedgerEntry] = field(default_factory=list)
    repaired: bool = False  # a torn last line was dropped while reading

    @property
    def releases(self) -> list[Release]:
        return [e.release for e in self.entries]

    @property
    def last_hash(self) -> str:
        return self.entries[-1].sha256 if self.entries else GENESIS


class PrivacyLedger:
    """The ledger file of one site (see the module docstring for the guarantees)."""

    def __init__(self, path: Path, site_id: str, accountant: str = "rdp") -> None:
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {accountant!r}; choose one of {ACCOUNTANTS}")
        self.path, self.site_id, self.accountant = Path(path), site_id, accountant

    # --- reading ---------------------------------------------------------------------------------------

    def read(self, repair: bool = False) -> LedgerState:
        """Parse and verify the whole ledger. With `repair`, a torn last line is removed from the file
        (callers hold the lock); without, it is only skipped."""
        if not self.path.is_file():
            return LedgerState()
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # `tail` is b"" when the file ends with a newline
        state = LedgerState()
        for number, line in enumerate(complete, start=1):
            entry = self._verify(line, number, state.last_hash)
            if entry is None:  # a complete line (newline written) is never a torn write
                raise LedgerError(f"{self.path}: line {number} is corrupt (unparsable or its hash does not match); "
                                  "the ledger cannot be trusted, so this site will not train until it is restored")
            state.entries.append(entry)
        if tail:  # bytes after the last newline: a write cut short
            state.repaired = True
        if state.repaired and repair:
            atomic_write_bytes(self.path, b"".join(e.line() for e in state.entries))
        return state

    def _verify(self, line: bytes, number: int, prev: str) -> LedgerEntry | None:
        try:
            data = json.loads(line)
            entry = LedgerEntry.parse(data)
        except (ValueError, KeyError, TypeError):
            return None
        if LedgerEntry.digest(entry.body()) != entry.sha256:
            return None
        if entry.prev != prev:
            raise LedgerError(f"{self.path}: line {number} does not follow line {number - 1} (hash chain broken: "
                              "an entry was removed, reordered or edited)")
        if entry.site_id != self.site_id:
            raise LedgerError(f"{self.path}: line {number} belongs to site {entry.site_id!r}, not {self.site_id!r}; "
                              "each site needs its own ledger")
        return entry

    def entries(self) -> list[LedgerEntry]:
        return self.read().entries

    def pinned_delta(self) -> float | None:
        entries = self.entries()
        return entries[0].delta if entries else None

    def epsilon(self) -> float:
        """Cumulative ε of everything recorded, at the ledger's pinned δ (0 for an empty ledger)."""
        state = self.read()
        if not state.entries:
            return 0.0
        return epsilon_of(state.releases, state.entries[0].delta, state.entries[0].accountant)

    # --- projecting and recording ------------------------------------------------------------------------

    def resolve_delta(self, requested: float | None, default: float) -> float:
        """The δ every release of this site is accounted at: the pinned one; else `requested`, else `default`."""
        pinned = self.pinned_delta()
        if pinned is None:
            return requested if requested is not None else default
        if requested is not None and not math.isclose(requested, pinned, rel_tol=1e-12):
            raise LedgerError(f"{self.path}: the site config asks δ={requested:g} but this ledger was started at "
                              f"δ={pinned:g}; ε at different δ do not compose. Restore δ={pinned:g} in the site "
                              "config (or leave it unset), or archive this ledger and start a new privacy budget")
        return pinned

    def project(self, release: Release, delta: float) -> tuple[float, float]:
        """(ε now, ε after `release`) at δ, without recording anything."""
        state = self.read()
        self._check_compatible(state, delta)
        now = epsilon_of(state.releases, delta, self.accountant)
        return now, epsilon_of(state.releases + [release], delta, self.accountant)

    def check(self, release: Release, delta: float, budget: float) -> tuple[float, float]:
        """(ε now, ε after) if `release` fits in `budget`; `PrivacyBudgetExceeded` otherwise."""
        now, after = self.project(release, delta)
        if after > budget:
            raise PrivacyBudgetExceeded(
                f"site {self.site_id}: privacy budget reached: {release.stage} round {release.server_round} would "
                f"raise ε from {now:.3f} to {after:.3f} (δ={delta:g}), above the site's budget ε={budget:g}; "
                "declining this round", now, after, budget)
        return now, after

    def record(self, release: Release, delta: float, budget: float | None = None) -> LedgerEntry:
        """Append `release` (fsynced) and return its entry; with `budget`, re-checked under the lock first."""
        with exclusive_lock(self.path):
            state = self.read(repair=True)
            self._check_compatible(state, delta)
            now = epsilon_of(state.releases, delta, self.accountant)
            after = epsilon_of(state.releases + [release], delta, self.accountant)
            if budget is not None and after > budget:
                raise PrivacyBudgetExceeded(
                    f"site {self.site_id}: privacy budget reached while this round trained (another run spent it): "
                    f"ε would go from {now:.3f} to {after:.3f} > {budget:g}; the update is discarded", now, after, budget)
            entry = LedgerEntry(self.site_id, self.accountant, delta, now, after, release, time.time(), state.last_hash)
            entry = LedgerEntry(**{**entry.__dict__, "sha256": LedgerEntry.digest(entry.body())})
            append_line(self.path, entry.line())
            return entry

    def _check_compatible(self, state: LedgerState, delta: float) -> None:
        if not state.entries:
            return
        first = state.entries[0]
        if first.accountant != self.accountant:
            raise LedgerError(f"{self.path}: this ledger is accounted with {first.accountant!r}, the site config asks "
                              f"{self.accountant!r}; one ledger has one accountant")
        if not math.isclose(first.delta, delta, rel_tol=1e-12):
            raise LedgerError(f"{self.path}: started at δ={first.delta:g}, asked to account at δ={delta:g}")

    def summary(self) -> dict[str, Any]:
        """What a data card or report shows: cumulative ε, δ, and spending per stage."""
        state = self.read()
        if not state.entries:
            return {"site_id": self.site_id, "epsilon": 0.0, "delta": None, "releases": 0, "stages": {}}
        delta, accountant = state.entries[0].delta, state.entries[0].accountant
        stages: dict[str, dict[str, Any]] = {}
        for entry in state.entries:
            stage = stages.setdefault(entry.release.stage, {"rounds": 0, "steps": 0})
            stage["rounds"] += 1
            stage["steps"] += entry.release.steps
        return {"site_id": self.site_id, "epsilon": epsilon_of(state.releases, delta, accountant), "delta": delta,
                "accountant": accountant, "releases": len(state.entries), "stages": stages}
