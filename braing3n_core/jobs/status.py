"""`braing3n consortium status` and `braing3n site status`: the federation, live, in a terminal.

Both views draw a snapshot from the core (`federation.run_status` for a run folder, `federation.site_status`
for a site's own disk) with rich, and redraw it:
- on a terminal, in place (`rich.live.Live`) every `interval` seconds, until the run is complete (the
  consortium's view) or Ctrl-C;
- into a pipe or a log, as plain columns, once per change: a run's snapshot each time a round finishes
  (or a site changes state), a site's each time its journal or ledger grows;
- `once`: one snapshot and exit; the CLI's `--json` prints the snapshot's JSON instead.
The web page of the same snapshot is `jobs/status_page.py`.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from braing3n_core.errors import BadInput
from braing3n_core.federation.run_status import RunStatus, RunStatusError, RunWatcher
from braing3n_core.federation.site_status import SiteSnapshot, site_snapshot
from braing3n_core.site_config import SiteConfig

STATE_STYLES = {"training": "cyan", "evaluating": "cyan", "querying": "cyan", "connected": "green", "done": "green",
                "declined": "yellow", "rejected": "red", "waiting": "dim", "running": "cyan", "complete": "green",
                "stopped": "yellow", "ok": "green"}


class StatusError(BadInput, ValueError):
    """The folder is not a run folder, or not one this command can show."""


# --- formatting (shared with the web page) -------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def size(n: int | None) -> str:
    if not n:
        return "0 B"
    value, unit = float(n), "B"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            break
        value /= 1000
    return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"


def number(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.{digits}g}"


def clock(timestamp: float | None) -> str:
    return dt.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S") if timestamp else "—"


def epsilon_text(epsilon: float | None, budget: float | None) -> str:
    if epsilon is None:
        return "—"
    return f"{epsilon:.3g} of {budget:.3g}" if budget is not None else f"{epsilon:.3g}"


def run_headline(status: RunStatus) -> str:
    where = f"stage {status.stage} round {status.round}/{status.rounds}" if status.stage else "no round yet"
    if status.round_in_progress:
        where += " (in progress)"
    eta = "—" if status.eta_s is None else ("0 s" if status.state == "complete" else
                                            ("~" if status.eta_estimated else "") + duration(status.eta_s))
    elapsed = (status.updated if status.state in ("complete", "stopped") else status.now) - (status.started or status.now)
    return (f"run {status.name} ({status.preset}): {status.state} · {where} · {status.progress:.0%} of all rounds · "
            f"elapsed {duration(elapsed)} · ETA {eta}")


# --- the consortium's view of a run ----------------------------------------------------------------------------


def _table(console: Console, columns: tuple[str, ...]) -> Table:
    """Boxes on a terminal, plain columns into a pipe or a log (as `site check` does)."""
    from rich import box

    boxed = console.is_terminal
    table = Table(box=box.SIMPLE_HEAD if boxed else None, padding=(0, 1) if boxed else (0, 2, 0, 0), pad_edge=False,
                  show_edge=False)
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index in (0, 1) else "right", min_width=len(column))
    return table


def _styled(state: str) -> Text:
    return Text(state, style=STATE_STYLES.get(state, ""))


def render_run(status: RunStatus, console: Console) -> Group:
    header = Text(run_headline(status), style="bold")
    activity = "—" if status.updated is None else f"{duration(status.now - status.updated)} ago"
    traffic = Text(f"sent {size(status.bytes_sent)} to the sites, received {size(status.bytes_received)} · last activity "
                   f"{activity}" + (f" · client-level ε {status.client_epsilon:.3g}" if status.client_epsilon is not None
                                    else "") + f" · {status.run_dir}")
    stages = _table(console, ("stage", "state", "rounds", "time/round", "mean", "train/loss", "validation"))
    for stage in status.stages:
        state = "done" if stage.done else ("running" if stage.name == status.stage and status.state == "running"
                                           else "pending" if not stage.completed else "partial")
        validation = ", ".join(f"{k.removeprefix('val/')} {number(v)}" for k, v in stage.validation.items()) or "—"
        stages.add_row(stage.name, _styled(state), f"{stage.completed}/{stage.rounds}", duration(stage.last_round_s),
                       duration(stage.mean_round_s), number(stage.loss), validation)
    sites = _table(console, ("site", "state", "round", "train/loss", "update norm", "ε spent", "examples",
                             "sent", "received", "why"))
    for site in status.sites:
        where = f"{site.stage} {site.round}" if site.stage and site.round else (site.stage or "—")
        sites.add_row(site.site, _styled(site.state), where, number(site.loss), number(site.update_norm),
                      epsilon_text(site.epsilon, site.budget), number(site.examples, 6), size(site.bytes_sent),
                      size(site.bytes_received), site.reason or "")
    parts: list[Any] = [header, traffic, stages, sites]
    if status.events:
        events = _table(console, ("when", "event", "site", "stage/round", "detail"))
        for event in status.events[-6:]:
            events.add_row(clock(event.time)[11:], event.kind, event.site, f"{event.stage} {event.round}", event.detail)
        parts.append(events)
    return Group(*parts)


def open_run(run_dir: Path) -> RunWatcher:
    try:
        return RunWatcher(run_dir)
    except RunStatusError as error:
        raise StatusError(str(error)) from None


def _round_key(status: RunStatus) -> Hashable:
    """What a plain (non-terminal) view prints again for: a finished round, a site's new state, the run's state."""
    return (status.state, tuple((s.name, s.completed, s.done) for s in status.stages),
            tuple((s.site, s.state) for s in status.sites))


PLAIN_WIDTH = 240  # into a pipe or a log: lines as long as they are, never cut at 80 columns


def _print(console: Console, renderable: Any) -> None:
    if not console.is_terminal and console.width < PLAIN_WIDTH:
        console.width = PLAIN_WIDTH
    console.print(renderable)


def _follow(snapshot: Callable[[], Any], render: Callable[[Any], Any], key: Callable[[Any], Hashable],
            finished: Callable[[Any], bool], console: Console, interval: float) -> Any:
    """Redraw in place on a terminal; print again on each change of `key` elsewhere; stop when `finished`."""
    current = snapshot()
    if console.is_terminal:
        from rich.live import Live

        with Live(render(current), console=console, refresh_per_second=4, transient=False) as live:
            while not finished(current):
                time.sleep(interval)
                current = snapshot()
                live.update(render(current))
        return current
    _print(console, render(current))
    last = key(current)
    while not finished(current):
        time.sleep(interval)
        current = snapshot()
        if key(current) != last:
            last = key(current)
            _print(console, render(current))
    return current


def watch_run(run_dir: Path, console: Console, interval: float = 2.0, once: bool = False) -> RunStatus:
    """Show the run until it is complete (or once); returns the last snapshot."""
    watcher = open_run(run_dir)
    if once:
        status = watcher.snapshot()
        _print(console, render_run(status, console))
        return status
    return _follow(watcher.snapshot, lambda s: render_run(s, console), _round_key,
                   lambda s: s.state == "complete", console, interval)


# --- a site's view of itself ----------------------------------------------------------------------------------


def render_site(snapshot: SiteSnapshot, supernode: dict | None, console: Console) -> Group:
    privacy = snapshot.privacy
    if privacy.error:
        spent = Text(f"privacy ledger {privacy.ledger}: CANNOT BE TRUSTED ({privacy.error}); this site must not train",
                     style="bold red")
    elif privacy.enabled or privacy.releases:
        per_stage = ", ".join(f"{k} {v['rounds']} rounds" for k, v in privacy.stages.items()) or "no release yet"
        spent = Text(f"privacy: ε {privacy.epsilon:.3g} spent of {privacy.budget:.3g} ({privacy.left:.3g} left), "
                     f"δ {privacy.delta if privacy.delta is not None else '—'}, {privacy.releases} releases "
                     f"({per_stage}) · ledger {privacy.ledger}")
    else:
        spent = Text(f"privacy: off in the site file (no DP rounds; ledger {privacy.ledger} has none)")
    if supernode is None:
        node = "SuperNode: not started here (`braing3n site join`)"
    else:
        node = (f"SuperNode: {'running' if supernode['running'] else 'not running'} (PID {supernode.get('pid')}, "
                f"SuperLink {supernode.get('superlink')}, started {clock(supernode.get('started'))})")
    cache = snapshot.cache
    if cache.exists:
        encoders = ", ".join(e["sha256"][:12] + "…" for e in cache.encoders) or "none"
        cache_line = (f"cache {cache.path}: {size(cache.bytes)}; {cache.check_verdicts} checked scans, {cache.volumes} "
                      f"preprocessed volumes, {cache.token_entries} token entries; frozen encoders {encoders}")
    else:
        cache_line = f"cache {cache.path}: not created yet (the first round, or `braing3n site check`, fills it)"
    head = Text(f"site {snapshot.site_id} · data {snapshot.data_root}" + ("" if snapshot.data_present else " (MISSING)")
                + f" · {snapshot.answered} messages answered, {snapshot.declined} declined", style="bold")
    rounds = _table(console, ("when", "message", "outcome", "run", "stage/round", "train/loss", "update norm", "ε",
                              "examples", "seconds", "why"))
    for entry in snapshot.recent:
        rounds.add_row(clock(entry.time), entry.message, _styled(entry.outcome), entry.run or "—",
                       f"{entry.stage} {entry.round}" if entry.stage else "—", number(entry.loss),
                       number(entry.update_norm), number(entry.epsilon, 3), number(entry.examples, 6),
                       number(entry.seconds, 3), entry.reason or "")
    approval = snapshot.approval
    if approval.error:
        approved = Text(f"approval log {approval.log}: CANNOT BE TRUSTED ({approval.error}); every job is refused",
                        style="bold red")
    elif not approval.required:
        approved = Text(f"approval: not required in the site file (any job runs here; log {approval.log})")
    else:
        listed = "; ".join(approval.active) or "none: every job is refused (`braing3n site approve`)"
        approved = Text(f"approval: required · active {listed}" + (f" · {approval.revoked} revoked" if approval.revoked
                                                                     else "") + f" · log {approval.log}")
    parts: list[Any] = [head, Text(node), spent, approved, Text(cache_line)]
    parts.append(rounds if snapshot.recent else Text(f"journal {snapshot.journal}: no message answered yet"))
    return Group(*parts)


def watch_site(site_yaml: Path, console: Console, interval: float = 5.0, once: bool = False,
               supernode: Callable[[SiteConfig], dict | None] | None = None) -> SiteSnapshot:
    site = SiteConfig.from_yaml(site_yaml)
    node = supernode or (lambda _: None)

    def snapshot() -> tuple[SiteSnapshot, dict | None]:
        return site_snapshot(site), node(site)

    def render(pair: tuple[SiteSnapshot, dict | None]) -> Group:
        return render_site(pair[0], pair[1], console)

    if once:
        pair = snapshot()
        _print(console, render(pair))
        return pair[0]
    pair = _follow(snapshot, render, lambda p: (p[0].answered, p[0].privacy.releases, bool(p[1] and p[1]["running"])),
                   lambda _: False, console, interval)
    return pair[0]


__all__ = ["StatusError", "duration", "render_run", "render_site", "run_headline", "size", "watch_run", "watch_site"]
