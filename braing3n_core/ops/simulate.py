"""`braing3n simulate`: a federated run of N virtual sites on Flower's simulation engine (Ray).

It drives the ordinary Flower commands as subprocesses (nothing here imports flwr):

1. validates the run YAML and the site YAMLs, then pins the resolved run config in `<out>/run.yaml`;
2. sets a private, temporary `FLWR_HOME` with telemetry, update checks and per-run dependency
   installation off, and starts its own `flower-superlink --insecure --simulation` on a free port;
3. writes that connection into `$FLWR_HOME/config.toml` and calls
   `flwr run <app> sim --run-config "run-config=… run-dir=… site-configs=…"
   --federation-config "num-supernodes=N client-resources-num-cpus=1" --stream`, streaming progress;
4. always stops the SuperLink and every process under it (SuperExec, the simulation, Ray) by PID,
   also on Ctrl-C, SIGTERM and errors;
5. checks the outcome: a failed simulation can still exit 0, so success means the ServerApp wrote
   `<out>/run_complete.json` during this call.

`--resume` continues a run folder whose run stopped (crash, kill, too few sites): the ServerApp resumes
from the last round checkpoint. An attempt whose wrapper was killed outright leaves its SuperLink
running and its FLWR_HOME on disk; the next attempt on the folder stops and removes them first
(`stop_stale_attempt`, from the PIDs and start times in `<out>/logs/simulation.json`). One CPU per
virtual site keeps 8+ sites running on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from braing3n_core.config import ConfigError
from braing3n_core.federation.metric_sinks import sink_settings
from braing3n_core.federation.protocol import AppSettings
from braing3n_core.federation.run_config import RunConfig
from braing3n_core.federation.run_folder import RunFolder
from braing3n_core.fileio import atomic_write_json
from braing3n_core.ops.flower import (
    APP_DIR,
    FlowerError,
    executable,
    flower_env,
    free_port,
    kill_process_tree,
    last_error,
    same_process,
    start_superlink,
    started_at,
    usable_cpus,
    wait_for_port,
)
from braing3n_core.site_config import load_site_configs


class SimulationError(FlowerError):
    """The simulation did not complete; the message says where to look."""


@dataclass(frozen=True)
class SimulationResult:
    run_dir: Path
    seconds: float
    complete: dict


HOME_PREFIX = "braing3n-flwr-"  # each attempt's temporary FLWR_HOME


def stop_stale_attempt(record: Path) -> list[str]:
    """Clean up after an earlier attempt on this run folder (`record` is its logs/simulation.json).

    A wrapper that died without its `finally` (SIGKILL, the OOM killer, a lost terminal session) leaves
    its SuperLink running in its own session, still training into the same folder, and its temporary
    FLWR_HOME on disk. This stops that SuperLink and its tree, if the recorded process is still running,
    and removes the folder. A wrapper of another process that is still running means two attempts on one
    folder: refused. Returns what it did.
    """
    try:
        previous = json.loads(record.read_text())
    except (OSError, ValueError):
        return []
    wrapper = previous.get("wrapper_pid")
    if wrapper != os.getpid() and same_process(wrapper, previous.get("wrapper_started")):
        raise SimulationError(f"{record.parent.parent}: another braing3n simulate (PID {wrapper}) is running on "
                              "this run folder; wait for it or stop it first")
    done = []
    link = previous.get("superlink_pid")
    if same_process(link, previous.get("superlink_started")):
        kill_process_tree(link)
        done.append(f"stopped the SuperLink of an earlier attempt (PID {link}) and the processes under it")
    home = Path(str(previous.get("flwr_home", "")))
    if home.name.startswith(HOME_PREFIX) and home.parent == Path(tempfile.gettempdir()) and home.is_dir():
        shutil.rmtree(home, ignore_errors=True)
        done.append(f"removed the FLWR_HOME of an earlier attempt ({home})")
    return done


def _emit(echo: bool | Callable[[str], None], line: str) -> None:
    """One line of progress: to `echo` when it is a callable, to stdout when it is True."""
    if callable(echo):
        echo(line)
    elif echo:
        sys.stdout.write(line)
        sys.stdout.flush()


def check_ray_address(address: str) -> None:
    """Fail early, with the fix, when `address` (host:port of a Ray cluster's head) does not answer.
    `auto` (the cluster `ray start` last started on this machine) is left to Ray to resolve."""
    if address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--ray-address {address!r}: expected HOST:PORT of the head node (e.g. 10.0.0.5:6379) or auto")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise ConfigError(f"--ray-address {address}: no Ray head answers there ({error}); start the cluster with "
                          f"`ray start --head --port {port}` on that machine, then `ray start --address {address}` "
                          "on each worker machine") from None


RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}


def start_ray_node(arguments: Sequence[str], log: Path, timeout_s: float = 180.0) -> subprocess.Popen:
    """`ray start --block ARGUMENTS` in its own session (stop it with `kill_process_tree(node.pid)`), output
    to `log`; returns once the node is up, or raises with the log's tail. What a cluster test or benchmark on
    one machine starts: a head (`--head --port P`) and nodes joining it (`--address HOST:P`)."""
    with open(log, "wb") as handle:
        node = subprocess.Popen([executable("ray"), "start", "--block", "--disable-usage-stats", *arguments],
                                stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **RAY_ENV},
                                start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while "block forever" not in log.read_text(errors="replace"):
        if node.poll() is not None or time.monotonic() > deadline:
            kill_process_tree(node.pid)
            raise RuntimeError(f"ray start {' '.join(arguments)} did not come up: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.2)
    return node


def federation_config(n_sites: int, cpus_per_site: int, gpus_per_site: float, local_cores: int | None) -> str:
    """`flwr run --federation-config` of a simulation. `local_cores` is the Ray instance this run starts
    itself; None joins an existing cluster (RAY_ADDRESS), where Ray refuses `num_cpus` at `ray.init`."""
    settings = [f"num-supernodes={n_sites}", f"client-resources-num-cpus={cpus_per_site}"]
    if gpus_per_site:
        settings.append(f"client-resources-num-gpus={gpus_per_site:g}")
    if local_cores is not None:
        settings.append(f"init-args-num-cpus={local_cores}")
    return " ".join(settings)


def simulate(
    site_yamls: Sequence[Path], run_config: Path, out: Path | None = None, resume: bool = False,
    cpus_per_site: int = 1, gpus_per_site: float = 0.0, ray_address: str | None = None,
    app_dir: Path = APP_DIR, echo: bool | Callable[[str], None] = True, tensorboard: Path | None = None,
) -> SimulationResult:
    """Run the federation; `echo` True streams Flower's output to stdout, a callable receives each line.

    `ray_address` places the virtual sites on an existing Ray cluster (`ray start --head` / `ray start
    --address`) instead of a Ray instance started on this machine. The SuperLink and the simulation run
    here (the head node, or any machine that reaches it); every node needs this environment, this code at
    the same path and the site YAMLs' data paths, since each site's ClientApp may run on any node.

    `tensorboard` (a folder) and `MLFLOW_TRACKING_URI` in the environment send the metrics there too, as
    rounds finish (`federation.metric_sinks`).
    """
    config = RunConfig.from_yaml(run_config)
    sites = load_site_configs(list(site_yamls))  # validates every site file up front, ids unique
    if len(sites) < config.min_sites:
        raise ConfigError(f"{run_config}: min_sites is {config.min_sites} but only {len(sites)} site files were given")
    if not (Path(app_dir) / "pyproject.toml").is_file():
        raise SimulationError(f"{app_dir}: no pyproject.toml; `braing3n simulate` runs from a source checkout")
    if gpus_per_site < 0:
        raise ConfigError(f"gpus_per_site is {gpus_per_site}; expected 0 or more (a fraction shares a GPU)")
    cores = usable_cpus()
    if ray_address is not None:
        check_ray_address(ray_address)
    elif cpus_per_site > cores:
        raise ConfigError(f"cpus_per_site is {cpus_per_site} but this process may use only {cores} core(s)")
    out = Path(out if out is not None else Path("runs") / config.name).resolve()
    run = RunFolder(out)
    for line in stop_stale_attempt(run.simulation_record):  # before anything touches the folder
        _emit(echo, f"[braing3n] {line}\n")
    pinned = run.pin(config, resume=resume)
    run.complete_path.unlink(missing_ok=True)
    logs = run.logs_dir
    logs.mkdir(exist_ok=True)

    home = Path(tempfile.mkdtemp(prefix=HOME_PREFIX))
    env = flower_env(home, cpus_per_site)
    if ray_address is not None:
        # Flower's backend init-args keep only num_cpus/num_gpus/logging (an `address` is dropped); Ray's
        # `ray.init()` in the simulation process joins the cluster RAY_ADDRESS names.
        env["RAY_ADDRESS"] = ray_address
    else:
        # `ray.init()` without an address joins the cluster `ray start` last started on this machine, if
        # one runs; "local" makes a local run start its own Ray whatever runs beside it.
        env["RAY_ADDRESS"] = "local"
        # Ray prestarts one idle Python worker per CPU for the first driver; Flower's actors never run in
        # them (they carry the run's runtime env), so each is ~50 MB of host memory for nothing
        # (bench/bench_memory.py), 16 of them on a 16-core host.
        env.setdefault("RAY_prestart_worker_first_driver", "0")
    port = free_port()
    link_log = logs / "superlink.log"
    started = time.time()
    link: subprocess.Popen | None = None
    previous_term = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):  # turn SIGTERM into an exception so the finally clause runs
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, on_term)
        link = start_superlink(env, port, link_log, out)
        atomic_write_json(run.simulation_record, {"superlink_pid": link.pid, "superlink_started": started_at(link.pid),
                                                     "wrapper_pid": os.getpid(), "wrapper_started": started_at(os.getpid()),
                                                     "port": port, "flwr_home": str(home), "ray_address": ray_address,
                                                     "started": started, "sites": [str(p) for p in site_yamls]})
        wait_for_port(port, link, link_log)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        flower_config = AppSettings(run_config=str(pinned), run_dir=str(out),
                                    site_configs=",".join(str(Path(p).resolve()) for p in site_yamls),
                                    **sink_settings(tensorboard)).flwr_run_config()
        command = [
            executable("flwr"), "run", str(app_dir), "sim", "--run-config", flower_config,
            "--federation-config",
            federation_config(len(sites), cpus_per_site, gpus_per_site, None if ray_address is not None else cores),
            "--stream",
        ]
        with open(logs / "flwr-run.log", "ab") as run_log:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=out)
            assert process.stdout is not None
            for line in process.stdout:
                run_log.write(line)
                run_log.flush()
                _emit(echo, line.decode(errors="replace"))
            process.wait()
    finally:
        if link is not None:
            kill_process_tree(link.pid)
            link.wait()
        signal.signal(signal.SIGTERM, previous_term if previous_term is not None else signal.SIG_DFL)
        shutil.rmtree(home, ignore_errors=True)

    complete = run.complete_path
    if not complete.is_file():
        cause = last_error(logs / "flwr-run.log")
        raise SimulationError(
            f"the federated run did not complete (flwr run exit code {process.returncode})"
            f"{': ' + cause if cause else ''}; the run folder {out} can be resumed with --resume. "
            f"Logs: {logs / 'flwr-run.log'}, {link_log}"
        )
    return SimulationResult(out, time.time() - started, json.loads(complete.read_text()))
