"""Real deployment: thin wrappers over Flower 1.42's own commands, one SuperLink and one SuperNode per site.

- `serve`: `flower-superlink` with TLS (the consortium's certificate) and SuperNode authentication
  (`--enable-supernode-auth`), state in a database so that registrations survive a restart, then
  `flwr supernode register` for every site that is not revoked (and `unregister` for revoked ones);
- `join` (at a hospital): `flower-supernode` with the consortium CA, the site's authentication key and
  `--node-config "site-config='…'"`; restarted while Flower still considers the previous session of
  the site online (after a crash, up to two missed heartbeats: ≤ 60 s);
- `run`: `flwr run` of this app against the SuperLink, progress streamed; the run folder is pinned like
  `braing3n simulate`'s, so submitting again with `resume=True` continues from the last checkpoint;
- `revoke`: the site is marked revoked and its key unregistered (`flwr supernode unregister`).

Each wrapper prints the exact Flower command (`FlowerCommand.shell()`), so that a hospital's IT team can
run Flower directly instead. Every process gets its own `FLWR_HOME`, runtime dependency installation and
telemetry off (`simulate.FLOWER_ENV`), its own session, and is stopped with everything under it by PID.
Nothing here imports flwr.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from braing3n_core.config import ConfigError
from braing3n_core.errors import JobFailed
from braing3n_core.federation.metric_sinks import sink_settings
from braing3n_core.federation.protocol import AppSettings
from braing3n_core.federation.run_config import RunConfig
from braing3n_core.federation.run_folder import RunFolder
from braing3n_core.fileio import atomic_write_bytes, atomic_write_json
from braing3n_core.ops.consortium import Consortium, load_consortium, set_revoked
from braing3n_core.ops.flower import (
    APP_DIR,
    FLOWER_ENV,
    FlowerError,
    executable,
    is_alive,
    kill_process_tree,
    last_error,
    scripts_first_path,
    wait_for_port,
)
from braing3n_core.site_config import SiteConfig

CONNECTION = "consortium"  # the SuperLink connection's name in the flwr CLI's config.toml
DEFAULT_PORT = 9092  # the one port hospitals reach (Fleet API); Control and Runtime APIs share it in 1.42
SUPERNODE_RUNTIME_PORT = 9094  # the SuperNode's local Runtime API (ClientApp processes), loopback only
ACTIVATION_REFUSED = "Failed to activate SuperNode"  # what flower-supernode prints when the SuperLink refuses its key
Echo = Callable[[str], None]


class DeploymentError(JobFailed, RuntimeError):
    """A Flower process failed or refused; the message names the log to read."""


@dataclass(frozen=True)
class FlowerCommand:
    """A Flower command line and the environment it needs, printable for a hospital's IT team."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)  # only what differs from the caller's environment

    def shell(self) -> str:
        variables = " ".join(f"{k}={_quote(v)}" for k, v in sorted(self.env.items()))
        command = " ".join(_quote(a) for a in [Path(self.argv[0]).name, *self.argv[1:]])
        return f"{variables} {command}" if variables else command

    def process_env(self) -> dict[str, str]:
        return {**os.environ, **self.env, "PATH": scripts_first_path()}


def _quote(word: str) -> str:
    """Shell quoting that stays readable: `--node-config "site-config='/x.yaml'"` rather than shlex's '"'"'."""
    if shlex.quote(word) == word:
        return word
    if not any(c in word for c in '"$`\\!'):
        return f'"{word}"'
    return shlex.quote(word)


def _tool(name: str) -> str:
    try:
        return executable(name)
    except FlowerError as error:
        raise DeploymentError(str(error)) from None


def _flower_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    return {**FLOWER_ENV, "FLWR_HOME": str(home)}


def _print(text: str) -> None:
    print(text, flush=True)


def stop(process: subprocess.Popen) -> None:
    """Stop a Flower process started in its own session: its tree by PID, then what is left of its process
    group (a SuperNode's SuperExec outlives a SuperNode that exited by itself, and is reparented)."""
    kill_process_tree(process.pid)
    process.wait()
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass


def _connect_host(address: str) -> str:
    """Where local tools reach a SuperLink listening on `address` (a bind-all address means loopback)."""
    return "127.0.0.1" if address in ("0.0.0.0", "::", "", "localhost") else address.strip("[]")


# --- the consortium side -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StateFiles:
    root: Path

    superlink = property(lambda self: self.root / "superlink.json")
    log = property(lambda self: self.root / "superlink.log")
    database = property(lambda self: self.root / "superlink.db")
    registrations = property(lambda self: self.root / "registrations.json")
    link_home = property(lambda self: self.root / "flower-home" / "superlink")
    cli_home = property(lambda self: self.root / "flower-home" / "cli")
    runs = property(lambda self: self.root / "runs.json")  # the run folders submitted here, newest last
    status_token = property(lambda self: self.root / "status-token")  # the status page's bearer token (0600)


def _state(consortium: Consortium) -> StateFiles:
    root = consortium.layout.state
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    return StateFiles(root)


def superlink_command(consortium: Consortium, address: str, port: int) -> FlowerCommand:
    layout, state = consortium.layout, _state(consortium)
    return FlowerCommand((
        _tool("flower-superlink"),
        "--ssl-ca-certfile", str(layout.ca_cert), "--ssl-certfile", str(layout.server_cert),
        "--ssl-keyfile", str(layout.server_key), "--enable-supernode-auth",
        "--disable-runtime-dependency-installation", "--database", str(state.database),
        "--host", address, "--port", str(port),
    ), _flower_env(state.link_home))


def write_cli_connection(home: Path, superlink: str, ca_cert: Path) -> Path:
    """`$FLWR_HOME/config.toml` of the flwr CLI: one TLS connection named `consortium`."""
    path = home / "config.toml"
    atomic_write_bytes(path, (f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                              f'address = "{superlink}"\nroot-certificates = "{Path(ca_cert).resolve()}"\n').encode())
    return path


def record_submitted_run(state: StateFiles, run_dir: Path) -> None:
    """Remember a submitted run folder (newest last), for `consortium status` and the status page."""
    runs = [r for r in submitted_runs(state) if r != str(run_dir)] + [str(run_dir)]
    atomic_write_json(state.runs, {"runs": runs})


def submitted_runs(state: StateFiles) -> list[str]:
    try:
        return [str(r) for r in json.loads(state.runs.read_text()).get("runs", [])]
    except (OSError, ValueError, AttributeError):
        return []


def latest_run(root: Path) -> Path | None:
    """The run folder last submitted with `consortium run` from the consortium folder `root`."""
    runs = submitted_runs(_state(load_consortium(root)))
    return Path(runs[-1]) if runs else None


def cli_command(consortium: Consortium, *args: str) -> FlowerCommand:
    return FlowerCommand((_tool("flwr"), *args), _flower_env(_state(consortium).cli_home))


def _run_cli(command: FlowerCommand, what: str) -> dict:
    """Run a `flwr … --format json` command; its JSON answer, or a DeploymentError naming `what` failed."""
    done = subprocess.run(list(command.argv), capture_output=True, text=True, env=command.process_env(), timeout=120,
                          check=False)
    start = done.stdout.find("{")
    try:
        answer = json.loads(done.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        answer = {}
    if done.returncode != 0 or not answer.get("success", False):
        detail = answer.get("error-message") or (done.stderr or done.stdout).strip()[-600:]
        raise DeploymentError(f"{what} failed (`{command.shell()}` exit {done.returncode}): {detail}")
    return answer


def _read_registrations(state: StateFiles) -> dict[str, dict]:
    return json.loads(state.registrations.read_text()) if state.registrations.is_file() else {}


def _listed_nodes(consortium: Consortium) -> dict[int, str]:
    command = cli_command(consortium, "supernode", "list", CONNECTION, "--format", "json")
    answer = _run_cli(command, "listing SuperNodes")
    return {int(n["node-id"]): str(n["status"]) for n in answer.get("nodes", [])}


def sync_registrations(consortium: Consortium, echo: Echo = _print) -> dict[str, dict]:
    """Register every active site's key that the SuperLink does not hold, unregister revoked ones."""
    state = _state(consortium)
    registrations = _read_registrations(state)
    listed = _listed_nodes(consortium) if registrations else {}  # a fresh database holds nobody
    for site, entry in sorted(consortium.sites.items()):
        known = registrations.get(site)
        live = known is not None and listed.get(int(known["node_id"]), "unregistered") != "unregistered"
        if entry.revoked:
            if live:
                unregister(consortium, site, int(known["node_id"]), echo)
            if known is not None:
                registrations[site] = {**known, "revoked": True}
            continue
        if live and known.get("fingerprint") == entry.fingerprint:
            continue
        if live:  # the site was given a new key (`consortium rekey`): its old key goes first
            unregister(consortium, site, int(known["node_id"]), echo)
        command = cli_command(consortium, "supernode", "register", str(entry.public_key), CONNECTION,
                              "--name", site, "--format", "json")
        echo(f"$ {command.shell()}")
        answer = _run_cli(command, f"registering site {site}")
        registrations[site] = {"node_id": int(answer["node-id"]), "fingerprint": entry.fingerprint, "revoked": False}
        echo(f"site {site}: key {entry.fingerprint} registered as SuperNode {answer['node-id']}")
        atomic_write_json(state.registrations, registrations)
    atomic_write_json(state.registrations, registrations)
    return registrations


def unregister(consortium: Consortium, site: str, node_id: int, echo: Echo = _print) -> None:
    command = cli_command(consortium, "supernode", "unregister", str(node_id), CONNECTION, "--format", "json")
    echo(f"$ {command.shell()}")
    _run_cli(command, f"unregistering site {site}")
    echo(f"site {site}: SuperNode {node_id} unregistered; its key is refused from now on")


def running_superlink(consortium: Consortium) -> dict | None:
    """The SuperLink `serve` started, if it is still alive."""
    path = _state(consortium).superlink
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    return info if is_alive(int(info["pid"])) else None


@dataclass
class Stopper:
    """SIGTERM turns into KeyboardInterrupt so that `finally` stops the processes in order."""

    previous: object = None

    def __enter__(self) -> Stopper:
        self.previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")

        if self._active():
            signal.signal(signal.SIGTERM, on_term)
        return self

    def __exit__(self, *exc) -> None:
        if self._active():
            signal.signal(signal.SIGTERM, self.previous if self.previous is not None else signal.SIG_DFL)

    def _active(self) -> bool:
        # Only the main thread may set handlers; None means a handler not installed from Python.
        return self.previous is not None and threading.current_thread() is threading.main_thread()


def serve(root: Path, address: str = "0.0.0.0", port: int = DEFAULT_PORT, echo: Echo = _print,
          print_only: bool = False) -> int:
    """Start the consortium's SuperLink and keep it running until Ctrl-C / SIGTERM (then stop its tree)."""
    consortium = load_consortium(root)
    layout = consortium.layout
    for path in (layout.ca_cert, layout.server_cert, layout.server_key):
        if not path.is_file():
            raise ConfigError(f"{path}: missing; the consortium folder {layout.root} is incomplete")
    command = superlink_command(consortium, address, port)
    connect = f"{_connect_host(address)}:{port}"
    if print_only:
        echo(command.shell())
        for site in consortium.active_sites:
            echo(f"flwr supernode register {consortium.sites[site].public_key} {CONNECTION} --name {site}   # flwr's "
                 f"config.toml: [superlink.{CONNECTION}] address=\"{connect}\" root-certificates=\"{layout.ca_cert}\"")
        return 0
    if (running := running_superlink(consortium)) is not None:
        raise DeploymentError(f"a SuperLink for {layout.root} is running already "
                              f"(PID {running['pid']}, port {running['port']})")
    state = _state(consortium)
    echo(f"$ {command.shell()}")
    link: subprocess.Popen | None = None
    with Stopper():
        try:
            with open(state.log, "ab") as log:
                link = subprocess.Popen(list(command.argv), stdout=log, stderr=subprocess.STDOUT,
                                        env=command.process_env(), cwd=state.root, start_new_session=True)
            atomic_write_json(state.superlink, {"pid": link.pid, "wrapper_pid": os.getpid(), "address": address,
                                                "port": port, "connect": connect, "started": time.time()})
            try:
                wait_for_port(port, link, state.log, host=_connect_host(address))
            except FlowerError as error:
                raise DeploymentError(str(error)) from None
            write_cli_connection(state.cli_home, connect, layout.ca_cert)
            sync_registrations(consortium, echo)
            echo(f"SuperLink PID {link.pid} listening on {address}:{port} (TLS, SuperNode authentication); "
                 f"log {state.log}. Sites join with: braing3n site join sites/<site>.yaml --credentials "
                 f"<bundle> --superlink {consortium.host}:{port}")
            return link.wait()
        except KeyboardInterrupt:
            echo("stopping the SuperLink")
            return 0
        finally:
            if link is not None:
                stop(link)
            state.superlink.unlink(missing_ok=True)


def revoke(root: Path, site: str, echo: Echo = _print) -> None:
    """Mark `site` revoked; unregister its key now if the SuperLink runs, else when `serve` next starts."""
    consortium = set_revoked(root, site)
    if running_superlink(consortium) is None:
        echo(f"site {site} marked revoked; no SuperLink is running: `consortium serve` unregisters its key at start")
        return
    sync_registrations(consortium, echo)


# --- the hospital side ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    folder: Path
    site_id: str
    ca_cert: Path
    private_key: Path


def load_credentials(folder: Path, site_id: str) -> Credentials:
    """The site's bundle from `consortium init`; refuses another site's bundle and a key others can read."""
    folder = Path(folder).resolve()
    try:
        info = json.loads((folder / "site.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"{folder / 'site.json'}: not a credentials bundle ({error})") from None
    if info.get("site_id") != site_id:
        raise ConfigError(f"{folder}: credentials of site {info.get('site_id')!r}, "
                          f"but the site YAML says site_id {site_id!r}")
    credentials = Credentials(folder, site_id, folder / "ca.crt", folder / "supernode.key")
    for path in (credentials.ca_cert, credentials.private_key):
        if not path.is_file():
            raise ConfigError(f"{path}: missing from the credentials bundle")
    if credentials.private_key.stat().st_mode & 0o077:
        raise ConfigError(f"{credentials.private_key}: readable by other users; run chmod 600 on it")
    return credentials


def supernode_home(site: SiteConfig) -> Path:
    return site.resolved_cache_dir / "flower-home"


def supernode_record(site: SiteConfig) -> dict | None:
    """What `join` recorded of this site's SuperNode (pid, SuperLink, start time) and whether it still runs."""
    try:
        info = json.loads((supernode_home(site) / "supernode.json").read_text())
    except (OSError, ValueError):
        return None
    return {**info, "running": is_alive(int(info.get("pid", 0))) if info.get("pid") else False}


def supernode_command(site: SiteConfig, credentials: Credentials, superlink: str,
                      port: int = SUPERNODE_RUNTIME_PORT) -> FlowerCommand:
    if site.source_file is None:
        raise ConfigError("the site config must come from a YAML file (the SuperNode names it in its node config)")
    home = supernode_home(site)
    return FlowerCommand((
        _tool("flower-supernode"),
        "--root-certificates", str(credentials.ca_cert), "--superlink", superlink,
        "--auth-supernode-private-key", str(credentials.private_key),
        "--port", str(port), "--node-config", f"site-config='{site.source_file}'",
    ), _flower_env(home))


def join(site_yaml: Path, credentials_dir: Path, superlink: str, port: int = SUPERNODE_RUNTIME_PORT,
         rejoin_wait_s: float = 120.0, echo: Echo = _print, print_only: bool = False) -> int:
    """Run this site's SuperNode until Ctrl-C / SIGTERM; returns its exit status.

    A crashed SuperNode's session stays "online" at the SuperLink for up to two missed heartbeats, and
    Flower refuses a second activation meanwhile; so while the SuperLink refuses the key, the start is
    retried for up to `rejoin_wait_s`. A key that is still refused after that is not registered (or was
    revoked).
    """
    site = SiteConfig.from_yaml(site_yaml)
    credentials = load_credentials(credentials_dir, site.site_id)
    command = supernode_command(site, credentials, superlink, port)
    if print_only:
        echo(command.shell())
        return 0
    home = Path(command.env["FLWR_HOME"])
    log_path = home / "supernode.log"
    echo(f"$ {command.shell()}")
    echo(f"site {site.site_id}: Flower's output goes to {log_path}")
    first_refusal: float | None = None
    with Stopper():
        while True:
            offset = log_path.stat().st_size if log_path.is_file() else 0
            with open(log_path, "ab") as log:  # a file, not a pipe: SuperExec children keep a pipe open after a refusal
                node = subprocess.Popen(list(command.argv), stdout=log, stderr=subprocess.STDOUT,
                                        env=command.process_env(), cwd=home, start_new_session=True)
            atomic_write_json(home / "supernode.json", {"pid": node.pid, "wrapper_pid": os.getpid(),
                                                        "site": site.site_id, "superlink": superlink,
                                                        "started": time.time()})
            refused, pending = False, b""
            try:
                while True:
                    status = node.poll()
                    with open(log_path, "rb") as handle:
                        handle.seek(offset)
                        chunk = handle.read()
                    offset += len(chunk)
                    *lines, pending = (pending + chunk).split(b"\n")
                    for raw in lines:
                        line = raw.decode(errors="replace")
                        refused |= ACTIVATION_REFUSED in line
                        if "SuperNode ID:" in line:
                            node_id = line.split("SuperNode ID:")[-1].strip()
                            echo(f"site {site.site_id}: connected to {superlink} as SuperNode {node_id}")
                            first_refusal = None
                    if status is not None:
                        break
                    time.sleep(0.5)
            except KeyboardInterrupt:
                echo(f"site {site.site_id}: stopping the SuperNode")
                return 0
            finally:
                stop(node)
            if not refused:  # Flower also stops a connected SuperNode whose key was just unregistered (revoked)
                echo(f"site {site.site_id}: flower-supernode stopped (exit status {status}); if the consortium "
                     f"revoked this site, its key is no longer accepted. Log: {log_path}")
                return status or 1
            first_refusal = first_refusal or time.monotonic()
            waited = time.monotonic() - first_refusal
            if waited >= rejoin_wait_s:
                raise DeploymentError(
                    f"site {site.site_id}: the SuperLink {superlink} refuses this site's key (for {waited:.0f} s): "
                    f"it is not registered there, or it was revoked; ask the consortium (key "
                    f"{credentials.private_key}). Log: {log_path}")
            echo(f"site {site.site_id}: the SuperLink refused the key; a previous session may still count as "
                 f"online, retrying ({waited:.0f}/{rejoin_wait_s:.0f} s)")
            time.sleep(3.0)


# --- submitting a federated job ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeployedRun:
    run_dir: Path
    seconds: float
    complete: dict
    release: Path | None


def run_command(consortium: Consortium, pinned: Path, run_dir: Path, expected_sites: int,
                signing_key: Path | None, app_dir: Path = APP_DIR, tensorboard: Path | None = None) -> FlowerCommand:
    settings = AppSettings(run_config=str(pinned), run_dir=str(run_dir), expected_sites=expected_sites,
                           signing_key=str(signing_key) if signing_key is not None else "", **sink_settings(tensorboard))
    return cli_command(consortium, "run", str(app_dir), CONNECTION, "--run-config", settings.flwr_run_config(), "--stream")


def submit(root: Path, run_config: Path, out: Path | None = None, resume: bool = False, superlink: str | None = None,
           expected_sites: int | None = None, sign: bool = True, app_dir: Path = APP_DIR, echo: Echo = _print,
           print_only: bool = False, tensorboard: Path | None = None) -> DeployedRun | None:
    """`flwr run` this app on the consortium's SuperLink, stream progress, check the outcome.

    Success means the ServerApp wrote `<out>/run_complete.json` during this call (and, with the
    consortium's release key present and `sign`, a signed `<out>/release/`). Resubmitting with
    `resume=True` continues the same run folder from its last completed round.
    """
    consortium = load_consortium(root)
    config = RunConfig.from_yaml(run_config)
    out = Path(out if out is not None else Path("runs") / config.name).resolve()
    expected = expected_sites if expected_sites is not None else len(consortium.active_sites)
    key = consortium.layout.release_key if sign and consortium.layout.release_key.is_file() else None
    if superlink is None:
        running = running_superlink(consortium)
        if running is not None:
            superlink = running["connect"]
        elif print_only:  # the command is for later, when `serve` runs: its default address
            superlink = f"{consortium.host}:{DEFAULT_PORT}"
            echo(f"# no SuperLink of {consortium.layout.root} runs here yet: the command dials {superlink} "
                 "(pass --superlink HOST:PORT for another)")
        else:
            raise DeploymentError(f"no SuperLink of {consortium.layout.root} is running here; start it with "
                                  f"`braing3n consortium serve {consortium.layout.root}` or pass --superlink HOST:PORT")
    state = _state(consortium)
    write_cli_connection(state.cli_home, superlink, consortium.layout.ca_cert)
    run = RunFolder(out)
    # Pinned even when only printing: the printed `flwr run` names this run.yaml, so it must exist.
    pinned = run.pin(config, resume=resume)
    if print_only:
        echo(run_command(consortium, pinned, out, expected, key, app_dir, tensorboard).shell())
        return None
    run.complete_path.unlink(missing_ok=True)
    logs = run.logs_dir
    logs.mkdir(exist_ok=True)
    command = run_command(consortium, pinned, out, expected, key, app_dir, tensorboard)
    record_submitted_run(state, out)
    echo(f"$ {command.shell()}")
    started = time.time()
    with Stopper(), open(logs / "flwr-run.log", "ab") as log:
        process = subprocess.Popen(list(command.argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   env=command.process_env(), cwd=out, start_new_session=True)
        try:
            assert process.stdout is not None
            for raw in process.stdout:
                log.write(raw)
                log.flush()
                echo(raw.decode(errors="replace").rstrip("\n"))
            process.wait()
        finally:  # `flwr run` only streams; stopping it leaves the run on the SuperLink (`flwr stop` ends it)
            if process.poll() is None:
                stop(process)
    complete = run.complete_path
    if not complete.is_file():
        cause = last_error(logs / "flwr-run.log")
        raise DeploymentError(
            f"the federated run did not complete (flwr run exit code {process.returncode})"
            f"{': ' + cause if cause else ''}; submit again with --resume to continue {out}. "
            f"Log: {logs / 'flwr-run.log'}")
    release = run.release_dir / "RELEASE.json"
    if key is not None and not (release.is_file() and release.stat().st_mtime >= started):
        raise DeploymentError(f"the run completed but its release was not signed; see {logs / 'flwr-run.log'}")
    return DeployedRun(out, time.time() - started, json.loads(complete.read_text()),
                       release if key is not None else None)


__all__ = [
    "Credentials", "DeployedRun", "DeploymentError", "FlowerCommand", "join", "load_credentials", "revoke",
    "run_command", "serve", "submit", "superlink_command", "supernode_command", "sync_registrations",
]
