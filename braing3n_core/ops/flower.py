"""Flower's processes from Python: finding its commands, its environment, starting a SuperLink,
waiting for a port, and stopping a process tree by PID (`simulate` and `deploy` both use these).

Nothing here imports flwr: Flower runs as its own commands, as a user would run them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from braing3n_core.errors import JobFailed


class FlowerError(JobFailed, RuntimeError):
    """A Flower process (SuperLink, SuperNode, the flwr CLI) could not be found, started or reached."""




APP_DIR = Path(__file__).resolve().parents[2]  # the Flower app: pyproject.toml with [tool.flwr.app]


FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (Linux /proc walk; SuperExec starts its own session, so a process
    group kill would miss the simulation and Ray)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def kill_process_tree(pid: int, grace_s: float = 5.0) -> None:
    """SIGTERM `pid` and everything under it, wait up to `grace_s`, then SIGKILL what is left."""
    tree = [pid] + descendants(pid)
    for target in tree:
        try:
            os.kill(target, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(is_alive(p) for p in tree):
        time.sleep(0.1)
    for target in tree + [p for p in descendants(pid) if p not in tree]:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass


def is_alive(pid: int) -> bool:
    return started_at(pid) is not None


def started_at(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (/proc/<pid>/stat field 22); with the PID it
    names one process, never a later one that reuses the PID. None when no such process is running."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[19]) if fields[0] != "Z" else None


def same_process(pid: object, started: object) -> bool:
    return isinstance(pid, int) and started is not None and started_at(pid) == started


def usable_cpus() -> int:
    """The cores this process may run on: its affinity mask (taskset, a cgroup cpuset), not the machine's.

    Ray counts `multiprocessing.cpu_count()`, so under a one-core mask it would still start two sites at
    once and have them time-share that core.
    """
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout_s: float = 60.0,
                   host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FlowerError(f"flower-superlink exited with {process.returncode}; see {log}")
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise FlowerError(f"flower-superlink did not listen on port {port} within {timeout_s:.0f} s; see {log}")


def executable(name: str) -> str:
    beside = Path(sys.executable).parent / name  # the venv's own console scripts first
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise FlowerError(f"{name} not found; install the project (pip install -e .) in this environment")
    return found


def last_error(log: Path) -> str:
    """The last exception line the ServerApp printed (e.g. `FederationError: …`), if any."""
    if not log.is_file():
        return ""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    errors = [line for line in lines if line.split(":", 1)[0].endswith(("Error", "Exception")) and ": " in line]
    return errors[-1][:500] if errors else ""


def scripts_first_path() -> str:
    """PATH with this environment's console scripts first: Flower's processes start each other
    (`flower-superexec`, `flwr-simulation`, `flwr-serverapp`, `flwr-clientapp`) through PATH, also when
    the venv was never activated, as in CI's `.venv/bin/python`."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def flower_env(home: Path, cpus_per_site: int = 1) -> dict[str, str]:
    """The environment of every Flower process of one attempt: its own FLWR_HOME, Flower's network
    features off, this environment's scripts first on PATH."""
    return {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(home), "BRAING3N_NUM_THREADS": str(cpus_per_site),
            "PATH": scripts_first_path()}


def start_superlink(env: dict[str, str], port: int, log: Path, cwd: Path) -> subprocess.Popen:
    """Start a simulation SuperLink on 127.0.0.1:`port`, logging to `log` (`wait_for_port` says when it
    listens)."""
    with open(log, "ab") as handle:
        link = subprocess.Popen(
            [executable("flower-superlink"), "--insecure", "--simulation", "--disable-runtime-dependency-installation",
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd,
            # Its own session: a terminal's Ctrl-C reaches only this wrapper, which then stops the
            # SuperLink and its tree in order (a SuperLink dying first would orphan Ray).
            start_new_session=True,
        )
    return link


def app_id(app_dir: Path = APP_DIR) -> str:
    """`publisher/name version` of the Flower app in `app_dir` (its pyproject.toml), as Flower names it."""
    import tomllib

    try:
        project = tomllib.loads((app_dir / "pyproject.toml").read_text(encoding="utf-8"))
        return f"{project['tool']['flwr']['app']['publisher']}/{project['project']['name']} {project['project']['version']}"
    except (OSError, ValueError, KeyError) as error:
        raise FlowerError(f"{app_dir / 'pyproject.toml'}: not a Flower app ({error})") from None


def fab_sha256(app_dir: Path = APP_DIR) -> str:
    """sha256 of the Flower app bundle `flwr run` would submit from `app_dir`: computed by Flower's own
    builder in a child process (`python -m client.fab`), since the core never imports Flower."""
    done = subprocess.run([sys.executable, "-m", "client.fab", str(Path(app_dir).resolve())], capture_output=True,
                          text=True, env={**os.environ, **FLOWER_ENV}, timeout=300, check=False)
    digest = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if done.returncode != 0 or len(digest) != 64:
        problem = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise FlowerError(f"{app_dir}: Flower could not build the app bundle ({problem})")
    return digest
