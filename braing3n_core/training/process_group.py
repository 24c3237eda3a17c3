"""Starting a site's data-parallel workers the way torchrun does, and ending them whatever happens.

The process that talks to Flower (the ClientApp; `braing3n train` when centralized) is the *agent*, as
torchrun's elastic agent is: it never joins the process group, so no collective can hang it. For each
round (`run_data_parallel`) it

1. hosts the rendezvous store: a `TCPStore` on a port the OS picks, so two sites on one host never
   collide;
2. starts W workers with `torch.multiprocessing.start_processes`, each with RANK, LOCAL_RANK, WORLD_SIZE,
   LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT and TORCHELASTIC_USE_AGENT_STORE set as torchrun's agent
   sets them (one host: RANK = LOCAL_RANK); a worker joins with `init_process_group(env://)`: gloo on CPU,
   NCCL with one GPU per worker (cuda:LOCAL_RANK);
3. waits until they all return, one fails, or the deadline passes. A failure or the deadline stops the
   others (SIGTERM, then SIGKILL after a short grace) and raises `DataParallelError` naming the worker and
   the cause (its exception, or the signal that killed it), which the site turns into a declined round.
   Collectives time out at the same deadline, and a worker exits by itself if the agent dies, so nothing
   outlives a round.

torch's elastic launcher (`torch.distributed.elastic.multiprocessing`) does the same, but takes over the
agent's SIGTERM/SIGINT handlers and, on a failure, waits 30 s for a stuck worker before killing it; the
agent here is a ClientApp process or a Ray actor, so it uses the `torch.multiprocessing` layer elastic is
built on, with its own grace.

Only rank 0's return value comes back; every worker ran the same entry and knows the round's number of
steps, so all of them stop together without being told.

**Where the process group lives: per round.** A round's group is formed, used and destroyed inside the
round. In deployment every Flower message runs in a fresh `flwr-clientapp` process, so a group that
outlived a round would need a daemon beside the SuperNode; per round, a worker that dies can only ever cost
the one round it died in. What costs time is starting Python with torch and MONAI (seconds), not forming
the group (milliseconds): workers are therefore forked from a *forkserver* that imported those once per
agent process. In simulation, where a Ray actor serves many rounds, only the first round pays the
imports; a deployed site pays them every round (bench/bench_scale.py measures both). The forkserver is a
fresh interpreter (never a fork of the Ray actor, whose threads make forking unsafe), and workers are
forked from it before any of them touches a GPU. Like any spawned process, a worker re-imports the agent's
main script: a script that trains data-parallel must guard its entry point with `if __name__ == "__main__"`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from braing3n_core.training.data_parallel import ParallelGroup
from braing3n_core.training.forkserver import forkserver

T = TypeVar("T")
Entry = Callable[[ParallelGroup, torch.device], T]

HOST = "127.0.0.1"
DEFAULT_TIMEOUT_S = 1800.0  # a round without a deadline from the server
_POLL_S = 0.05
_STOP_GRACE_S = 1.0  # after a failure: time for the others to exit by themselves, then for SIGTERM, then SIGKILL
_AGENT_WATCH_S = 1.0
# Forming a gloo group over loopback failed now and then on a heavily loaded shared machine ("Connection closed
# by peer" inside connectFullMesh, about 1 formation in 50 at load 12 on 2 cores): a failure before any worker
# ran is retried with a fresh store and fresh workers (torchrun's --max-restarts, for formation only).
FORMATION_ATTEMPTS = 2
FORMATION_FAILED = 75  # a worker's exit code when init_process_group failed (EX_TEMPFAIL)


class DataParallelError(RuntimeError):
    """A data-parallel round failed: a worker died or raised, or the group missed its deadline."""


@dataclass(frozen=True)
class WorkerPlan:
    """How a site runs data-parallel: `workers` processes on `device_type` (cpu: gloo; cuda: NCCL, one GPU
    each), `threads` intra-op threads per worker, every collective bounded by `timeout_s`."""

    workers: int
    device_type: str = "cpu"
    threads: int = 1
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.device_type not in ("cpu", "cuda"):
            raise ValueError(f"data-parallel workers run on cpu or cuda, not {self.device_type!r}")

    @property
    def backend(self) -> str:
        return "nccl" if self.device_type == "cuda" else "gloo"


@dataclass(frozen=True)
class ParallelRun(Generic[T]):
    """Rank 0's result, and what the group cost beyond it: `startup_s` from the call until every worker had
    joined the group, `seconds` for the whole call."""

    value: T
    startup_s: float
    seconds: float


@dataclass(frozen=True)
class _RankReturn:
    value: Any
    joined_at: float  # time.time() when the group was formed (all workers on one host: one clock)


def check_gpus(plan: WorkerPlan) -> None:
    """One GPU per worker must be visible (CUDA_VISIBLE_DEVICES, or Ray's `--gpus-per-site` in simulation)."""
    if plan.device_type != "cuda":
        return
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < plan.workers:
        raise DataParallelError(f"{plan.workers} workers on cuda need {plan.workers} GPUs, this process sees {visible}")


def run_data_parallel(entry: Entry[T], plan: WorkerPlan, deadline_s: float | None = None) -> ParallelRun[T]:
    """Run `entry(group, device)` on `plan.workers` workers; returns rank 0's value (see the module doc).

    `entry` must be picklable (a module-level function, or a `functools.partial` of one over picklable
    arguments): it travels to every worker. The whole call must end within `deadline_s` (default: the
    plan's collective timeout, what a federated round allows; `math.inf` for a centralized run).
    """
    check_gpus(plan)
    limit = plan.timeout_s if deadline_s is None else deadline_s
    started = time.time()
    for attempt in range(1, FORMATION_ATTEMPTS + 1):
        try:
            leader = _launch(entry, plan, started + limit)
            break
        except _GroupNotFormed as error:  # nothing ran yet: start the group afresh, as torchrun restarts workers
            logging.getLogger(__name__).warning("data-parallel group not formed (attempt %d of %d): %s", attempt,
                                                FORMATION_ATTEMPTS, error)
            if attempt == FORMATION_ATTEMPTS:
                raise DataParallelError(f"the {plan.workers} data-parallel workers could not form their group "
                                        f"({FORMATION_ATTEMPTS} attempts): {error}") from None
    if leader is None:
        raise DataParallelError(f"the {plan.workers} data-parallel workers did not finish within {limit:g} s")
    return ParallelRun(leader.value, startup_s=max(0.0, leader.joined_at - started), seconds=time.time() - started)


class _GroupNotFormed(Exception):
    """`init_process_group` failed in a worker (a failed connection while the group formed)."""


def _launch(entry: Entry[T], plan: WorkerPlan, deadline: float) -> _RankReturn | None:
    """One attempt: a fresh store and fresh workers; rank 0's return, None at the deadline."""
    from torch.distributed import TCPStore

    store = TCPStore(HOST, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=plan.timeout_s))
    processes = forkserver(_module_of(entry))
    results, received = processes.SimpleQueue(), processes.Event()
    context = torch_mp.start_processes(_rank_main, args=(entry, plan, os.getpid(), store.port, results, received),
                                       nprocs=plan.workers, join=False, daemon=False, start_method="forkserver")
    try:
        return _wait(context, results, received, deadline)
    finally:
        _stop(context)
        results.close()
        del store


def _wait(context: torch_mp.ProcessContext, results: Any, received: Any, deadline: float) -> _RankReturn | None:
    """Rank 0's return once every worker has exited cleanly; None at the deadline; a failure raises."""
    leader = None
    while time.time() < deadline:
        if leader is None and not results.empty():
            # Read while polling (a large result would block its writer on the pipe). Tensors arrive as shared
            # memory whose file descriptors rank 0 hands over on request: it waits for `received` to exit.
            leader = results.get()
            received.set()
        try:
            if context.join(timeout=_POLL_S, grace_period=_STOP_GRACE_S):
                return leader
        except (torch_mp.ProcessRaisedException, torch_mp.ProcessExitedException) as error:
            if _only_formation_failed(context):
                raise _GroupNotFormed(_failure_reason(context, error)) from None
            raise DataParallelError(_failure_reason(context, error)) from None
    return None


def _stop(context: torch_mp.ProcessContext) -> None:
    """SIGTERM what still runs, SIGKILL it after the grace (a stopped or wedged worker ignores SIGTERM)."""
    alive = [p for p in context.processes if p.is_alive()]
    for process in alive:
        process.terminate()
    end = time.monotonic() + _STOP_GRACE_S
    for process in alive:
        process.join(max(0.0, end - time.monotonic()))
    for process in alive:
        if process.is_alive():
            process.kill()
            process.join(_STOP_GRACE_S)


def _only_formation_failed(context: torch_mp.ProcessContext) -> bool:
    """Every worker that failed did so while forming the group (exit code `FORMATION_FAILED`), none by a signal."""
    codes = [p.exitcode for p in context.processes if p.exitcode not in (None, 0, -signal.SIGTERM)]
    return bool(codes) and all(code == FORMATION_FAILED for code in codes)


def _failure_reason(context: torch_mp.ProcessContext, error: Exception) -> str:
    """The root cause first: a worker that died by a signal we did not send (its peers then fail in their
    collectives), else the exception a worker raised, else its exit code."""
    for rank, process in enumerate(context.processes):
        code = process.exitcode
        if code is not None and code < 0 and -code != signal.SIGTERM:
            return f"data-parallel worker {rank} (pid {process.pid}) was killed by {signal.Signals(-code).name}"
    rank = getattr(error, "error_index", -1)
    pid = getattr(error, "error_pid", "?")
    if getattr(error, "exit_code", None) == FORMATION_FAILED:
        return f"data-parallel worker {rank} (pid {pid}) could not join the process group (its stderr says why)"
    if isinstance(error, torch_mp.ProcessRaisedException):
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        return f"data-parallel worker {rank} (pid {pid}) failed: {lines[-1].strip()[:400] if lines else 'no message'}"
    return f"data-parallel worker {rank} (pid {pid}) {str(error).removeprefix(f'process {rank} ')}"


def _torchrun_env(rank: int, world: int, port: int) -> dict[str, str]:
    """What torchrun's agent exports to a worker on a single host, the agent holding the store."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
            "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "ROLE_WORLD_SIZE": str(world),
            "MASTER_ADDR": HOST, "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True"}


def _module_of(entry: Callable[..., Any]) -> str:
    return getattr(getattr(entry, "func", entry), "__module__", "")


# --- inside a worker ------------------------------------------------------------------------------------------


def _rank_main(local_rank: int, entry: Entry[Any], plan: WorkerPlan, agent_pid: int, port: int,
               results: Any, received: Any) -> None:
    os.environ.update(_torchrun_env(local_rank, plan.workers, port))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    _exit_with_agent(agent_pid)
    torch.set_num_threads(max(1, plan.threads))
    device = torch.device("cpu")
    if plan.device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # A collective past `timeout_s` raises (gloo) or has NCCL's watchdog end this worker: the agent reports either.
    try:
        dist.init_process_group(plan.backend, timeout=timedelta(seconds=plan.timeout_s),
                                device_id=device if device.type == "cuda" else None)
    except Exception as error:  # noqa: BLE001 - reported to the agent by the exit code and on stderr
        print(f"data-parallel worker {rank}: forming the group failed: {error}", file=sys.stderr, flush=True)
        sys.exit(FORMATION_FAILED)
    try:
        joined_at = time.time()
        value = entry(ParallelGroup(rank, world), device)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        results.put(_RankReturn(value, joined_at))
        received.wait(plan.timeout_s)


def _exit_with_agent(agent_pid: int) -> None:
    """A worker's parent is the forkserver, not the agent: watch the agent, and leave if it is gone (its
    result would have nowhere to go, and the queue it waits on would never be read)."""

    def watch() -> None:
        while True:
            time.sleep(_AGENT_WATCH_S)
            try:
                os.kill(agent_pid, 0)
            except ProcessLookupError:
                logging.getLogger(__name__).error("agent %s is gone; worker %s exits", agent_pid, os.getpid())
                os._exit(1)
            except PermissionError:  # a reused PID of another user: the agent is gone too
                os._exit(1)

    threading.Thread(target=watch, name="braing3n-agent-watch", daemon=True).start()
