"""The live status web page: the snapshot of `federation.run_status`, served read-only over HTTP(S).

Two ways to serve it, one server:
- `braing3n consortium serve CONSORTIUM_DIR --status-port 8443` beside the SuperLink: the page shows the
  run last submitted with `consortium run` (`ops.deploy.latest_run`), and the next one as soon as it is
  submitted. It listens on loopback unless `--status-address` says otherwise, and any other address is
  served over TLS with the consortium's SuperLink certificate (`superlink/server.crt`; browsers trust it
  once `ca/ca.crt` is imported);
- `braing3n consortium status RUN_DIR --serve 8765`: one run folder (a simulation's, a copy of a
  deployment's), plain HTTP on loopback.

Every request needs the page's bearer token, compared in constant time (`hmac.compare_digest`): the
`Authorization: Bearer <token>` header (scripts), or the `braing3n_status` cookie that opening
`/?token=<token>` once sets (HttpOnly, SameSite=Strict, Secure under TLS) before redirecting to `/`, so
the token leaves the address bar. A request without it gets 401. The token is `BRAING3N_STATUS_TOKEN`
when set, else a fresh random one per start, printed in the page's URL (and, for a consortium, written
0600 to `state/status-token`). Only GET and HEAD exist; everything else is 405.

Routes: `/` (the page), `/status.js` (its script: it polls `/status.json` every `refresh` seconds and
redraws), `/status.json` (the snapshot, plus the figures' addresses), `/curves/<stage>.png` (the training
curves of `report.html`, drawn by `jobs.report.plot_stage_curves` into a private temporary folder
whenever the run's ledgers grew, never into the run folder).
"""

from __future__ import annotations

import hashlib
import hmac
import html
import ipaddress
import json
import os
import secrets
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from braing3n_core.errors import BadInput
from braing3n_core.federation.run_status import RunStatusError, RunWatcher
from braing3n_core.fileio import atomic_write_bytes
from braing3n_core.jobs.report import CSS, plot_stage_curves, read_run
from braing3n_core.jobs.status import run_headline

TOKEN_ENV = "BRAING3N_STATUS_TOKEN"
COOKIE = "braing3n_status"
REFRESH_S = 2.0
SNAPSHOT_TTL_S = 0.5  # requests within this of each other share one snapshot
FIGURE_MIN_INTERVAL_S = 2.0  # at most one redraw of the curves this often, however fast rounds go


class StatusPageError(BadInput, ValueError):
    """The page cannot be served as asked (a port in use, a certificate missing); the message says why."""


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return os.environ.get(TOKEN_ENV, "").strip() or secrets.token_urlsafe(32)


@dataclass
class _Run:
    watcher: RunWatcher
    snapshot: dict[str, Any] | None = None
    taken: float = 0.0
    drawn_version: int = -1
    drawn_at: float = 0.0
    curves: dict[str, str] = field(default_factory=dict)  # stage → file name in the figures folder


class StatusSource:
    """What the page shows: the run folder `locate()` names now (it may change: a new consortium run)."""

    def __init__(self, locate: Callable[[], Path | None], refresh_s: float = REFRESH_S) -> None:
        self.locate = locate
        self.refresh_s = refresh_s
        self.figures = Path(tempfile.mkdtemp(prefix="braing3n-status-"))
        self._runs: dict[Path, _Run] = {}
        self._lock = threading.Lock()
        self._draw_lock = threading.Lock()  # matplotlib's pyplot is not thread-safe

    def close(self) -> None:
        shutil.rmtree(self.figures, ignore_errors=True)

    def _current(self) -> _Run | None:
        run_dir = self.locate()
        if run_dir is None:
            return None
        run_dir = Path(run_dir).resolve()
        with self._lock:
            if run_dir not in self._runs:
                try:
                    self._runs[run_dir] = _Run(RunWatcher(run_dir))
                except RunStatusError:
                    return None  # submitted, not pinned yet
            return self._runs[run_dir]

    def status(self) -> dict[str, Any]:
        """The snapshot as JSON, with `curves` (stage → address of its figure) and `headline`."""
        run = self._current()
        if run is None:
            return {"run": None, "refresh_s": self.refresh_s, "message": "no run submitted yet"}
        with self._lock:
            if run.snapshot is None or time.monotonic() - run.taken > SNAPSHOT_TTL_S:
                status = run.watcher.snapshot()
                run.snapshot = {**status.to_json(), "headline": run_headline(status), "refresh_s": self.refresh_s}
                run.taken = time.monotonic()
            snapshot = run.snapshot
        self._draw(run, snapshot)
        return {**snapshot, "run": snapshot["name"],
                "curves": {stage: f"curves/{name}?v={run.drawn_version}" for stage, name in run.curves.items()}}

    def _draw(self, run: _Run, snapshot: dict[str, Any]) -> None:
        version = int(snapshot["version"])
        if version == run.drawn_version or time.monotonic() - run.drawn_at < FIGURE_MIN_INTERVAL_S:
            return
        with self._draw_lock:
            if version == run.drawn_version:
                return
            try:
                contents = read_run(Path(snapshot["run_dir"]))
            except (BadInput, OSError, ValueError):  # no round logged yet, or a file being replaced
                return
            folder = self.figures / hashlib.sha256(snapshot["run_dir"].encode()).hexdigest()[:16]
            curves = {}
            for stage in [s["name"] for s in snapshot["stages"]]:
                if stage not in contents.stages:  # the probes have no curve figure in the report either
                    continue
                path = folder / f"{stage}.png"
                if plot_stage_curves(contents, stage, path):
                    curves[stage] = f"{folder.name}/{stage}.png"
            run.curves, run.drawn_version, run.drawn_at = curves, version, time.monotonic()

    def figure(self, name: str) -> bytes | None:
        """The PNG `name` (`<folder>/<stage>.png`) of the figures folder, nothing outside it."""
        path = (self.figures / name).resolve()
        if path.parent.parent != self.figures.resolve() or path.suffix != ".png" or not path.is_file():
            return None
        return path.read_bytes()


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>BrainG3N-FL status</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{css}
.state-connected,.state-done,.state-complete{{color:#1f7a3a}}.state-training,.state-evaluating,.state-querying,
.state-running{{color:#1c5fa8}}.state-declined,.state-stopped{{color:#9a6700}}.state-rejected{{color:#a3262b}}
.bar{{background:#e4e7eb;height:8px;width:320px;display:inline-block;vertical-align:middle}}
.bar>span{{background:#3b73b9;height:8px;display:block}}#curves img{{margin:4px 0;display:block}}
</style></head>
<body><h1 id="title">BrainG3N-FL</h1>
<p class="muted" id="headline">loading…</p>
<p><span class="bar"><span id="progress" style="width:0"></span></span> <span id="traffic" class="muted"></span></p>
<h2>Stages</h2><table id="stages"></table>
<h2>Sites</h2><table id="sites"></table>
<h2>Events</h2><table id="events"></table>
<h2>Training curves</h2><div id="curves" class="muted">no round finished yet</div>
<p class="muted" id="updated"></p>
<script src="status.js"></script></body></html>
"""

SCRIPT = r"""'use strict';
// Polls status.json and redraws; every value comes from the run folder's snapshot (federation/run_status.py).
const $ = (id) => document.getElementById(id);
const esc = (v) => String(v ?? '').replace(/[&<>"']/g, (c) => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c]));
const num = (v, d = 4) => (v === null || v === undefined) ? '—' : Number(v).toPrecision(d).replace(/\.?0+(e|$)/, '$1');
const dur = (s) => {
  if (s === null || s === undefined) return '—';
  s = Math.max(0, s);
  if (s < 60) return (s < 10 ? s.toFixed(1) : s.toFixed(0)) + ' s';
  const m = Math.floor(s / 60);
  return m < 60 ? `${m} min ${String(Math.round(s % 60)).padStart(2, '0')} s` : `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, '0')} min`;
};
const size = (n) => {
  let v = n || 0, u = 'B';
  for (u of ['B', 'kB', 'MB', 'GB', 'TB']) { if (v < 1000 || u === 'TB') break; v /= 1000; }
  return u === 'B' ? `${v} B` : `${v.toFixed(1)} ${u}`;
};
const row = (cells, head = false) => '<tr>' + cells.map((c, i) => head ? `<th class="${i < 2 ? 'l' : ''}">${c}</th>` : `<td class="${i < 2 ? 'l' : ''}">${c}</td>`).join('') + '</tr>';
const state = (s) => `<span class="state-${esc(s)}">${esc(s)}</span>`;
let shownCurves = '';

function draw(s) {
  if (!s.run) { $('headline').textContent = s.message; return; }
  $('title').textContent = `BrainG3N-FL · run ${s.name}`;
  $('headline').textContent = s.headline;
  document.body.dataset.state = s.state;
  document.body.dataset.version = s.version;
  $('progress').style.width = (100 * s.progress).toFixed(1) + '%';
  $('traffic').textContent = `sent ${size(s.bytes_sent)} to the sites, received ${size(s.bytes_received)}` +
    (s.client_epsilon !== null ? ` · client-level ε ${num(s.client_epsilon, 3)}` : '');
  $('stages').innerHTML = row(['stage', 'state', 'rounds', 'time/round', 'mean', 'train/loss', 'validation'], true) +
    s.stages.map((g) => row([esc(g.name), state(g.done ? 'done' : (g.name === s.stage && s.state === 'running' ? 'running' : (g.completed ? 'partial' : 'pending'))),
      `${g.completed}/${g.rounds}`, dur(g.last_round_s), dur(g.mean_round_s), num(g.loss),
      esc(Object.entries(g.validation).map(([k, v]) => `${k.replace('val/', '')} ${num(v)}`).join(', ') || '—')])).join('');
  $('sites').innerHTML = row(['site', 'state', 'round', 'train/loss', 'update norm', 'ε spent', 'examples', 'sent', 'received', 'why'], true) +
    s.sites.map((x) => row([esc(x.site), state(x.state), x.stage ? esc(`${x.stage} ${x.round ?? ''}`) : '—', num(x.loss), num(x.update_norm),
      x.epsilon === null ? '—' : (x.budget === null ? num(x.epsilon, 3) : `${num(x.epsilon, 3)} of ${num(x.budget, 3)}`),
      num(x.examples, 6), size(x.bytes_sent), size(x.bytes_received), esc(x.reason || '')])
      .replace('<tr>', `<tr id="site-${esc(x.site)}" data-state="${esc(x.state)}">`)).join('');
  $('events').innerHTML = s.events.length ? row(['when', 'event', 'site', 'stage/round', 'detail'], true) +
    s.events.slice().reverse().map((e) => row([new Date(e.time * 1000).toLocaleTimeString(), esc(e.kind), esc(e.site), esc(`${e.stage} ${e.round}`), esc(e.detail)])).join('') :
    '<tr><td class="l muted">none</td></tr>';
  const curves = JSON.stringify(s.curves);
  if (curves !== shownCurves && Object.keys(s.curves).length) {
    $('curves').innerHTML = Object.entries(s.curves).map(([stage, src]) => `<img alt="${esc(stage)} curves" data-stage="${esc(stage)}" src="${esc(src)}">`).join('');
    shownCurves = curves;
  }
  $('updated').textContent = `updated ${new Date().toLocaleTimeString()} · refreshes every ${s.refresh_s} s · ${s.run_dir}`;
}

async function poll() {
  let wait = 2000;
  try {
    const answer = await fetch('status.json', {cache: 'no-store', credentials: 'same-origin'});
    if (answer.status === 401) { $('headline').textContent = 'not authorised: open the address with ?token=… that the server printed'; return; }
    const s = await answer.json();
    wait = 1000 * (s.refresh_s || 2);
    draw(s);
  } catch (error) {
    $('updated').textContent = `cannot reach the server (${error}); retrying`;
  }
  setTimeout(poll, wait);
}
poll();
"""


class _Handler(BaseHTTPRequestHandler):
    server: StatusServer
    server_version = "braing3n-status"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        if self.server.log is not None:
            self.server.log(f"status page: {self.address_string()} {format % args}")

    def _authorised(self, query: dict[str, list[str]]) -> bool:
        expected = self.server.token.encode()
        offered = []
        header = self.headers.get("Authorization", "")
        if header.lower().startswith("bearer "):
            offered.append(header[7:].strip())
        cookie = SimpleCookie()
        try:
            cookie.load(self.headers.get("Cookie", ""))
        except Exception:  # noqa: BLE001 (a malformed cookie header is simply no cookie)
            pass
        if COOKIE in cookie:
            offered.append(cookie[COOKIE].value)
        offered += query.get("token", [])
        # Every candidate is compared, whatever the first gave: the time taken says nothing about the token.
        return any([hmac.compare_digest(o.encode(), expected) for o in offered])

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", "default-src 'none'; script-src 'self'; connect-src 'self'; "
                                                    "img-src 'self'; style-src 'unsafe-inline'; frame-ancestors 'none'")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:  # noqa: N802 (the stdlib's name)
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if not self._authorised(query):
            self._send(HTTPStatus.UNAUTHORIZED, b"401 unauthorised: this status page needs its token (open the address "
                       b"the server printed, with ?token=..., or send Authorization: Bearer <token>)\n",
                       "text/plain; charset=utf-8", {"WWW-Authenticate": 'Bearer realm="braing3n status"'})
            return
        if "token" in query:  # keep the token out of the address bar and history: a cookie, then the page
            secure = "; Secure" if self.server.tls else ""
            self._send(HTTPStatus.SEE_OTHER, b"", "text/plain",
                       {"Location": "/", "Set-Cookie": f"{COOKIE}={self.server.token}; HttpOnly; SameSite=Strict; "
                                                       f"Path=/{secure}"})
            return
        if url.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, PAGE.format(css=CSS).encode(), "text/html; charset=utf-8")
        elif url.path == "/status.js":
            self._send(HTTPStatus.OK, SCRIPT.encode(), "text/javascript; charset=utf-8")
        elif url.path == "/status.json":
            self._send(HTTPStatus.OK, json.dumps(self.server.source.status()).encode(), "application/json")
        elif url.path.startswith("/curves/") and (png := self.server.source.figure(url.path.removeprefix("/curves/"))):
            self._send(HTTPStatus.OK, png, "image/png")
        else:
            self._send(HTTPStatus.NOT_FOUND, f"404: {html.escape(url.path)} is not here\n".encode(), "text/plain; charset=utf-8")

    def _read_only(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"405: the status page is read-only\n", "text/plain; charset=utf-8",
                   {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _read_only  # noqa: N815


class StatusServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, source: StatusSource, address: str, port: int, token: str,
                 tls: tuple[Path, Path] | None = None, log: Callable[[str], None] | None = None) -> None:
        self.source, self.token, self.tls, self.log = source, token, tls is not None, log
        try:
            super().__init__((address, port), _Handler)
        except OSError as error:
            raise StatusPageError(f"status page: cannot listen on {address}:{port} ({error.strerror or error})") from None
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            # The handshake happens in the request's own thread: a slow client cannot stall the others.
            self.socket = context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in str(host) else host)
        return f"{'https' if self.tls else 'http'}://{shown}:{port}/"

    @property
    def url_with_token(self) -> str:
        return f"{self.url}?token={self.token}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up or failed the TLS handshake is no error of the page's."""
        if self.log is not None:
            import sys

            self.log(f"status page: request from {client_address[0]} failed: {sys.exc_info()[1]}")

    def start(self) -> StatusServer:
        self._thread = threading.Thread(target=self.serve_forever, name="braing3n-status", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.source.close()

    def __enter__(self) -> StatusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_page(run_dir: Path, address: str = "127.0.0.1", port: int = 8765, token: str | None = None,
             refresh_s: float = REFRESH_S, log: Callable[[str], None] | None = None) -> StatusServer:
    """The page of one run folder (not started: `with run_page(...) as server:`)."""
    try:
        RunWatcher(run_dir)
    except RunStatusError as error:
        raise StatusPageError(str(error)) from None
    fixed = Path(run_dir).resolve()
    return StatusServer(StatusSource(lambda: fixed, refresh_s), address, port, token or new_token(), log=log)


def consortium_page(root: Path, address: str = "127.0.0.1", port: int = 8443, refresh_s: float = REFRESH_S,
                    log: Callable[[str], None] | None = None) -> StatusServer:
    """The consortium's page (not started): its latest submitted run; TLS with its certificate off loopback,
    the token written 0600 to `state/status-token`."""
    from braing3n_core.ops.consortium import load_consortium
    from braing3n_core.ops.deploy import StateFiles, latest_run

    consortium = load_consortium(root)
    layout = consortium.layout
    tls = None
    if not is_loopback(address):
        for path in (layout.server_cert, layout.server_key):
            if not path.is_file():
                raise StatusPageError(f"{path}: missing; the status page off loopback is served over the consortium's TLS")
        tls = (layout.server_cert, layout.server_key)
    token = new_token()
    token_file = StateFiles(layout.state).status_token
    atomic_write_bytes(token_file, (token + "\n").encode())  # mkstemp: 0600 from creation
    os.chmod(token_file, 0o600)
    return StatusServer(StatusSource(lambda: latest_run(root), refresh_s), address, port, token, tls, log)


__all__ = ["COOKIE", "TOKEN_ENV", "StatusPageError", "StatusServer", "StatusSource", "consortium_page", "is_loopback",
           "new_token", "run_page"]
