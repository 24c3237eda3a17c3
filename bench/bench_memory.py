"""Memory benchmark (issue 15, item 5): peak host RAM of a federated simulation against the model size.

**What is measured.** A sampler thread reads `/proc/PID/smaps_rollup` of the measured process and every
process below it (`ops.flower.descendants`) every `--interval` s (0.2): PSS, which splits each shared page
between the processes mapping it, so torch's and MONAI's libraries and Ray's shared-memory object store
(`/dev/shm`) count once, and RSS for comparison (it counts shared pages in every process). The tree's sum
per sample, per process kind (wrapper = `braing3n simulate`, `flwr run`, SuperLink, SuperExec, ServerApp =
`flwr-simulation` with the Ray driver, Ray's daemons, each ClientApp actor) and per run phase (startup,
setup = hello and site checks, mae, probes, decoder, dit, shutdown: windows from the server's own
`messages.jsonl`, a phase running from its first message out to the next phase's) gives the peaks. A guard
stops a measured tree that passes `--limit-gib` or leaves the shared machine less than `--floor-gib`, and
every measured process is the OOM killer's first choice (`oom_score_adj` 1000).

**Model size**: the fp32 bytes of the three networks (MAE with its pre-training decoder, CNN decoder, DiT),
parameters and buffers, built on the `meta` device; and each stage's trainable bytes.

**Parts** (each saved in `--out/parts/`, so they can be measured in separate runs; `--reuse` keeps them):
- `small`: a real `python -m braing3n_core simulate` of 4 sites of the synthetic cohort (2 mm), every stage
  mae → decoder → dit, 2 rounds × 3 local steps of batch 2, validation in the last round, FedAvg, and the
  federated probes on (2 rounds): a real run has them, and they are the one phase that holds features of
  every scan of a site. On 2 cores Flower runs 2 Ray actors, which serve the 4 sites in turn.
- `tiny`: the same run at `tiny` (networks of 2.7 MiB): the fixed cost of the processes. The tree's PSS at
  the end of setup (every process up, each site's data checked, no network built) is the fixed cost the
  ratio `(peak − fixed) / model size` subtracts.
- `steps`: the `small` run with 1 round × 1 local step: a peak that does not move with rounds and steps is
  what lets a 1-step run stand for a long one.
- `paper`: 2 sites of `paper` (1 mm) do not fit this 24 GiB machine (the DiT alone is 2.6 GB; a site training
  it holds weights, gradients and two AdamW moments, ≥ 10.4 GB, and two sites train at once), so the run is
  measured in pieces, each in a fresh process: one site's setup (hello: checks and 1 mm preprocessing; the
  encoder's installation), each stage's site round through the real ClientApp (`client.app.app` on the train
  message the server sends: 1 local step of batch 1, then the stage's evaluate message), and the ServerApp's
  whole run (`server.run.run_federation`, 2 rounds per stage: strategy, screening, aggregation, validation
  round, checkpoints) against `SyntheticSites`, a Grid whose 2 sites answer at once with replies of the
  real size. The estimate of the simulation's peak is, per stage: the fixed cost (`tiny`) + the server's
  working memory + 2 × a site's (both actors train at once) + the messages in flight in Ray's object
  store (copies per weight byte as measured in `small`'s shared memory). `small_pieces` measures the same
  pieces at `small`, so the composition is checked against the measured `small` simulation.
- `before`: the `tiny` simulation and the `paper` pieces that fit (site mae; server mae + decoder) with the
  code of `--before` (default: the merge base with main, exported with `git archive`): each fix as
  before/after in the same benchmark run.

Prints one summary line; writes bench/results/memory.json (figures first, then every part's samples).

    python bench/bench_memory.py [--parts tiny,small,steps,small_pieces,paper,before] [--reuse]
        [--out /tmp/memory-bench] [--sites 4] [--subjects 8] [--rounds 2] [--local-steps 3] [--batch-size 2]
        [--paper-subjects 3] [--paper-batch-size 1] [--before REF] [--limit-gib 17] [--floor-gib 2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import torch
import yaml

# BENCH_MEMORY_CODE: another checkout's code (the "before" of a fix) for this process; see `export_code`.
sys.path.insert(0, os.environ.get("BENCH_MEMORY_CODE") or str(Path(__file__).resolve().parents[1]))

from bench.common import cohort_sites, load_average, machine_info
from braing3n_core.fileio import atomic_write_json
from braing3n_core.ops.flower import descendants, kill_process_tree
from braing3n_core.presets import get_preset
from braing3n_core.stage_names import STAGE_NAMES
from braing3n_core.training.stages import get_stage

RESULTS = Path(__file__).resolve().parent / "results" / "memory.json"
GOAL_RATIO = 8.0  # peak host RAM ≤ 8 × model size (issue 15)
MIB = 2**20
GIB = 2**30


# --- the model size --------------------------------------------------------------------------------------------


def model_size(preset_name: str) -> dict[str, Any]:
    """fp32 bytes of the three networks at `preset_name` (built on the `meta` device: no memory, no init),
    parameters and buffers, and each stage's trainable bytes (what a site's optimizer holds state for)."""
    preset = get_preset(preset_name)
    networks = {}
    for name in STAGE_NAMES:
        with torch.device("meta"):
            model = get_stage(name).build(preset)
        params = sum(p.numel() for p in model.parameters())
        buffers = sum(b.numel() for b in model.buffers())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        networks[name] = {"parameters": params, "buffers": buffers, "bytes": 4 * (params + buffers),
                          "trainable_bytes": 4 * trainable}
    largest = max(networks, key=lambda n: networks[n]["trainable_bytes"])
    return {"networks": networks, "bytes": sum(n["bytes"] for n in networks.values()),
            "largest_stage": largest, "largest_stage_trainable_bytes": networks[largest]["trainable_bytes"]}


# --- sampling a process tree's memory from /proc -----------------------------------------------------------------

# cmdline fragment → process kind; first match wins. Ray renames its processes after they start (a worker
# becomes `ray::IDLE`, then `ray::ClientAppActor` once it hosts a site), so a kind is re-read at every
# sample; an actor stays an actor.
PROCESS_KINDS = (
    ("ClientAppActor", "client_actor"), ("flower-superlink", "superlink"), ("flower-superexec", "superexec"),
    ("flwr-simulation", "serverapp"), ("/flwr run", "flwr_cli"), ("flwr run", "flwr_cli"),
    ("ray::IDLE", "ray_idle_worker"), ("default_worker.py", "ray_idle_worker"), ("DashboardAgent", "ray_dashboard"),
    ("dashboard", "ray_dashboard"), ("gcs_server", "ray_gcs"), ("raylet/raylet", "raylet"), ("ray", "ray_other"),
    ("braing3n_core simulate", "wrapper"), ("bench_memory.py", "measured_process"),
)
ROLLUP_FIELDS = {"Rss:": "rss", "Pss:": "pss", "Pss_Anon:": "pss_anon", "Pss_File:": "pss_file",
                 "Pss_Shmem:": "pss_shmem"}


def process_kind(cmdline: str) -> str:
    for fragment, kind in PROCESS_KINDS:
        if fragment in cmdline:
            return kind
    return "other"


def read_rollup(pid: int) -> dict[str, int] | None:
    """Rss, Pss (and its anonymous / file / shmem parts) of one process in bytes, from smaps_rollup: PSS
    splits each shared page between the processes that map it, so a tree's sum counts torch's libraries
    and Ray's shared-memory object store once."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:  # gone, or a kernel thread
        return None
    values = {}
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] in ROLLUP_FIELDS:
            values[ROLLUP_FIELDS[parts[0]]] = int(parts[1]) * 1024
    return values or None


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


class TreeMemory:
    """PSS and RSS of `root` and every process below it, every `interval` seconds, in a thread.

    Keeps the tree's total per sample, and per process kind and pid; the peak sample's breakdown. A guard
    protects the shared machine: when the tree's PSS passes `limit` bytes or the machine's MemAvailable
    falls below `floor`, the tree is stopped (SIGTERM to `root`, whose handler stops what it started; then
    SIGKILL) and `stopped` says why.
    """

    def __init__(self, root: int, interval: float = 0.2, limit: float = float("inf"), floor: float = 0.0) -> None:
        self.root, self.interval, self.limit, self.floor = root, interval, limit, floor
        self.samples: list[dict[str, Any]] = []
        self.kinds: dict[int, str] = {}
        self.cmdlines: dict[int, str] = {}
        self.stopped: str | None = None
        self.min_available = mem_available()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> dict[str, Any]:
        now = time.time()
        per_pid: dict[int, dict[str, int]] = {}
        for pid in [self.root, *descendants(self.root)]:
            values = read_rollup(pid)
            if values is None:
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            kind = process_kind(cmdline)
            self.cmdlines[pid] = cmdline[:160]
            if self.kinds.get(pid) != "client_actor":
                self.kinds[pid] = kind
            per_pid[pid] = values
        return {"time": now, "per_pid": per_pid,
                "pss": sum(v.get("pss", 0) for v in per_pid.values()),
                "rss": sum(v.get("rss", 0) for v in per_pid.values())}

    def _loop(self) -> None:
        while not self._stop.is_set():
            sample = self.sample()
            self.samples.append(sample)
            available = mem_available()
            self.min_available = min(self.min_available, available)
            if self.stopped is None and (sample["pss"] > self.limit or available < self.floor):
                self.stopped = (f"tree PSS {sample['pss'] / GIB:.1f} GiB > limit {self.limit / GIB:.1f} GiB"
                                if sample["pss"] > self.limit else
                                f"MemAvailable {available / GIB:.1f} GiB < floor {self.floor / GIB:.1f} GiB")
                print(f"[memory bench] stopping the measured tree: {self.stopped}", file=sys.stderr, flush=True)
                threading.Thread(target=self._stop_tree, daemon=True).start()
            self._stop.wait(self.interval)

    def _stop_tree(self) -> None:
        try:
            os.kill(self.root, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.time() + 30.0
        while time.time() < deadline and Path(f"/proc/{self.root}").exists():
            time.sleep(0.5)
        kill_process_tree(self.root)

    # --- summaries --------------------------------------------------------------------------------------------

    def kind_of(self, pid: int) -> str:
        return self.kinds.get(pid, "other")

    def by_kind(self, sample: dict[str, Any], field: str = "pss") -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for pid, values in sample["per_pid"].items():
            out[self.kind_of(pid)] += values.get(field, 0)
        return dict(sorted(out.items()))

    def peak(self, start: float = 0.0, end: float = float("inf"), field: str = "pss") -> dict[str, Any] | None:
        """The sample of largest total `field` in [start, end], with its breakdown per process kind."""
        window = [s for s in self.samples if start <= s["time"] <= end]
        if not window:
            return None
        top = max(window, key=lambda s: s[field])
        actors = {str(pid): v["pss"] for pid, v in top["per_pid"].items() if self.kind_of(pid) == "client_actor"}
        return {"time": top["time"], "pss": top["pss"], "rss": top["rss"], "pss_by_kind": self.by_kind(top),
                "rss_by_kind": self.by_kind(top, "rss"),
                "pss_anon": sum(v.get("pss_anon", 0) for v in top["per_pid"].values()),
                "pss_shmem": sum(v.get("pss_shmem", 0) for v in top["per_pid"].values()),
                "client_actor_pss": actors, "processes": len(top["per_pid"])}

    def kind_peaks(self, start: float = 0.0, end: float = float("inf")) -> dict[str, dict[str, int]]:
        """Per process kind, the largest PSS of one process of that kind and of all of them together."""
        single: dict[str, int] = defaultdict(int)
        together: dict[str, int] = defaultdict(int)
        for s in self.samples:
            if not start <= s["time"] <= end:
                continue
            for kind, value in self.by_kind(s).items():
                together[kind] = max(together[kind], value)
            for pid, values in s["per_pid"].items():
                kind = self.kind_of(pid)
                single[kind] = max(single[kind], values.get("pss", 0))
        return {kind: {"one_process": single[kind], "all_processes": together[kind]} for kind in sorted(together)}

    def processes(self) -> list[dict[str, Any]]:
        """Every process seen: its kind, the start of its command line, its own peak PSS and RSS."""
        peaks: dict[int, dict[str, int]] = defaultdict(lambda: {"pss": 0, "rss": 0})
        for s in self.samples:
            for pid, values in s["per_pid"].items():
                for field in ("pss", "rss"):
                    peaks[pid][field] = max(peaks[pid][field], values.get(field, 0))
        return [{"pid": pid, "kind": self.kind_of(pid), "cmdline": self.cmdlines.get(pid, ""), "peak_pss": p["pss"],
                 "peak_rss": p["rss"]} for pid, p in sorted(peaks.items(), key=lambda kv: -kv[1]["pss"])]


# --- a simulation, measured ------------------------------------------------------------------------------------


def series(memory: TreeMemory, started: float) -> dict[str, Any]:
    """The samples, compactly: seconds since start, the tree's PSS and RSS, and PSS per process kind (MiB)."""
    kinds = sorted({memory.kind_of(pid) for s in memory.samples for pid in s["per_pid"]})
    rows = []
    for s in memory.samples:
        by_kind = memory.by_kind(s)
        rows.append([round(s["time"] - started, 1), round(s["pss"] / MIB, 1), round(s["rss"] / MIB, 1),
                     *[round(by_kind.get(k, 0) / MIB, 1) for k in kinds]])
    return {"columns": ["seconds", "pss_mib", "rss_mib", *[f"{k}_pss_mib" for k in kinds]], "rows": rows}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_windows(run_dir: Path, started: float, ended: float) -> dict[str, tuple[float, float]]:
    """Wall-clock windows of the run's phases, from the server's own message ledger: a phase runs from its
    first message out to the next phase's first message (server work after a stage's last reply, such as
    aggregation and the checkpoint, belongs to that stage). `startup` is everything before the first
    message, `shutdown` everything after `run_complete.json`."""
    messages = read_jsonl(run_dir / "messages.jsonl")
    firsts: dict[str, float] = {}
    for m in messages:
        if m["direction"] == "out":
            firsts.setdefault(m["stage"], m["time"])
    order = sorted(firsts.items(), key=lambda kv: kv[1])
    complete = run_dir / "run_complete.json"
    finished = json.loads(complete.read_text())["finished"] if complete.is_file() else ended
    windows = {"startup": (started, order[0][1] if order else ended)}
    for (name, begin), nxt in zip(order, [*order[1:], ("shutdown", finished)]):
        windows[name] = (begin, nxt[1])
    windows["shutdown"] = (finished, ended)
    return windows


def write_run_yaml(path: Path, name: str, preset: str, sites: int, rounds: int, local_steps: int,
                   batch_size: int, probes: bool, stages: Sequence[str] = STAGE_NAMES) -> Path:
    """Every stage (mae → decoder → dit) for `rounds` rounds of `local_steps` steps, validation in the last
    round only (`evaluate_every: 0`), FedAvg; the probes with the same rounds and steps when `probes`."""
    stages = [{"name": stage, "rounds": rounds, "local_steps": local_steps, "batch_size": batch_size,
               "evaluate_every": 0} for stage in stages]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({
        "name": name, "preset": preset, "seed": 0, "min_sites": sites, "round_timeout_s": 7200.0, "stages": stages,
        "probes": {"enabled": probes, "rounds": rounds, "local_steps": local_steps},
    }, sort_keys=False))
    return path


def _first_to_die() -> None:
    """In a measured process (inherited by its tree): if the machine runs out of memory, the kernel's OOM
    killer picks this tree before colleagues' jobs."""
    Path("/proc/self/oom_score_adj").write_text("1000")


def code_env(code: Path | None) -> tuple[dict[str, str], str | None]:
    """Environment and working folder that make a subprocess import `code` (another checkout) first."""
    env = os.environ.copy()
    if code is None:
        return env, None
    env["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [env.get("PYTHONPATH")])])
    env["BENCH_MEMORY_CODE"] = str(code)
    return env, str(code)


def export_code(ref: str, out: Path) -> tuple[Path, str]:
    """`git archive` of `ref` into `out/code-<sha>` (the repository's state is left alone)."""
    root = Path(__file__).resolve().parents[1]
    sha = subprocess.run(["git", "rev-parse", ref], cwd=root, check=True, capture_output=True, text=True).stdout.strip()
    folder = out / f"code-{sha[:12]}"
    if not (folder / "pyproject.toml").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha], cwd=root, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder, sha


def run_measured(command: list[str], log_path: Path, args: argparse.Namespace,
                 code: Path | None) -> tuple[int, TreeMemory]:
    """Run `command` (with the code of `code`, or this checkout's) to completion, output to `log_path`, while
    sampling its process tree's memory under the benchmark's guard."""
    with open(log_path, "wb") as log:
        env, cwd = code_env(code)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                   preexec_fn=_first_to_die)
        with TreeMemory(process.pid, args.interval, args.limit_gib * GIB, args.floor_gib * GIB) as memory:
            return process.wait(), memory


def measure_simulation(label: str, site_yamls: Sequence[Path], run_yaml: Path, run_dir: Path, args: argparse.Namespace,
                       code: Path | None = None) -> dict[str, Any]:
    """`python -m braing3n_core simulate` as a subprocess, its whole process tree sampled from /proc."""
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    command = [sys.executable, "-m", "braing3n_core", "simulate", "--quiet", "--sites", *map(str, site_yamls),
               "--run-config", str(run_yaml), "--out", str(run_dir)]
    print(f"[memory bench] {label}: simulation (load {os.getloadavg()[0]:.1f}) …", file=sys.stderr, flush=True)
    load_before = load_average()
    started = time.time()
    returncode, memory = run_measured(command, run_dir.parent / f"{run_dir.name}.log", args, code)
    ended = time.time()
    windows = stage_windows(run_dir, started, ended)
    result = {
        "label": label, "run_dir": str(run_dir), "returncode": returncode, "stopped": memory.stopped,
        "completed": (run_dir / "run_complete.json").is_file(), "seconds": ended - started,
        "samples": len(memory.samples), "load_average_before": load_before, "load_average_after": load_average(),
        "min_mem_available": memory.min_available,
        "peak": memory.peak(), "peak_rss_sample": memory.peak(field="rss"),
        "kind_peaks": memory.kind_peaks(), "processes": memory.processes(),
        "stages": {name: {"window_s": [round(a - started, 1), round(b - started, 1)], "peak": memory.peak(a, b),
                          "kind_peaks": memory.kind_peaks(a, b)} for name, (a, b) in windows.items()},
        "series": series(memory, started),
    }
    if not result["completed"]:
        print(f"[memory bench] {label}: the simulation did not complete (exit {returncode}, "
              f"{memory.stopped or 'see ' + str(run_dir.parent / (run_dir.name + '.log'))})", file=sys.stderr)
    return result


# --- paper, piece by piece: one site's round and the server's side, each in a fresh process ----------------------


class Phases:
    """Named moments of a measured child process, written to a JSON file as they happen (the parent's
    sampler splits its samples by them)."""

    def __init__(self, path: Path) -> None:
        self.path, self.marks = path, []

    def mark(self, name: str) -> None:
        self.marks.append([name, time.time()])
        atomic_write_json(self.path, self.marks)
        print(f"[memory bench child] {name}", file=sys.stderr, flush=True)


def _set_task_identity() -> None:
    """Flower 1.42 builds a `Message` only inside one of its processes (flower-1.42.md §7.2(b))."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _to_site(message_type: str, content) -> Any:
    """A message as a site's ClientApp receives it (metadata as the SuperNode fills it)."""
    from flwr.app import Message, Metadata

    metadata = Metadata(run_id=1, message_id=f"m-{time.time_ns()}", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=7200.0, message_type=message_type)
    return Message(content, metadata=metadata)


def _query(action: str, preset: str, sha: str = "", arrays: dict | None = None, **extra: Any):
    from flwr.app import ConfigRecord, RecordDict

    from braing3n_core.federation.protocol import Action, Query

    config = {**Query(action=Action(action), preset=preset, encoder_sha256=sha).to_config()}
    for payload in extra.values():
        config |= payload.to_config()
    return _to_site("query", RecordDict({"config": ConfigRecord(config), **(arrays or {})}))


def seeded_encoder(preset_name: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The frozen encoder the site children share: a seeded, untrained MAE's encoder (arrays, config, hash)."""
    from braing3n_core.data.tokens import encoder_sha256
    from braing3n_core.federation.arrays import module_arrays
    from braing3n_core.runtime import seed_everything

    seed_everything(0)
    mae = get_stage("mae").build(get_preset(preset_name))
    return module_arrays(mae.encoder), mae.config.to_dict(), encoder_sha256(mae.encoder)


def child_install(preset: str, site_yaml: Path, sha_file: Path, phases: Phases) -> None:
    """hello (the site's checks and preprocessing) and the encoder's installation, as a real run starts."""
    from flwr.app import Context, RecordDict

    from braing3n_core.federation.protocol import InstallEncoder
    from client.app import app as client_app
    from server.aggregation import to_array_record

    context = Context(run_id=1, node_id=1, node_config={"site-config": str(site_yaml)}, state=RecordDict(), run_config={})
    phases.mark("imported")
    reply = client_app(_query("hello", preset), context)
    if reply.has_error():
        raise SystemExit(f"hello declined: {reply.error.reason}")
    phases.mark("hello")
    arrays, config, sha = seeded_encoder(preset)
    reply = client_app(_query("install_encoder", preset, sha, {"encoder": to_array_record(arrays)},
                              install=InstallEncoder(encoder_config=config)), context)
    if reply.has_error():
        raise SystemExit(f"install declined: {reply.error.reason}")
    sha_file.write_text(sha)
    phases.mark("installed")


def child_site_round(stage_name: str, preset: str, site_yaml: Path, run_yaml: Path, sha: str, phases: Phases) -> None:
    """One site's share of a stage's round through the real ClientApp: the train message (global weights as
    the server sends them), then the evaluate message of the stage's last round."""
    import gc

    from flwr.app import ConfigRecord, Context, RecordDict

    from braing3n_core.federation.arrays import module_arrays
    from braing3n_core.federation.protocol import EvaluateRequest, TrainRequest
    from braing3n_core.federation.run_config import RunConfig
    from braing3n_core.runtime import seed_everything
    from client.app import app as client_app
    from server.aggregation import to_array_record

    config = RunConfig.from_yaml(run_yaml)
    spec = next(s for s in config.stages if s.name == stage_name)
    stage = get_stage(stage_name)
    context = Context(run_id=1, node_id=1, node_config={"site-config": str(site_yaml)}, state=RecordDict(), run_config={})
    client_app(_query("hello", preset), context)  # the site's checked data, cached in the process as in an actor
    sha = sha if stage.needs_encoder else ""
    gc.collect()
    phases.mark("imported")
    seed_everything(config.seed)
    model = stage.build(get_preset(preset))
    model_config = stage.model_config(model)
    record = to_array_record(module_arrays(model))  # what arrives: the global weights, serialized
    del model
    gc.collect()
    request = TrainRequest(stage=stage_name, server_round=1, local_steps=spec.local_steps,
                           batch_size=spec.resolved_batch_size, lr=spec.lr_at_round(1),
                           weight_decay=spec.resolved_weight_decay, seed=config.seed, rounds=spec.rounds, run=config.name,
                           preset=preset, model_config=model_config, encoder_sha256=sha)
    message = _to_site("train", RecordDict({"config": ConfigRecord(request.to_config()), "arrays": record}))
    del record
    phases.mark("message")
    reply = client_app(message, context)
    if reply.has_error():
        raise SystemExit(f"train declined: {reply.error.reason}")
    phases.mark("trained")
    del reply
    gc.collect()
    phases.mark("reply_sent")
    evaluate = EvaluateRequest(stage=stage_name, preset=preset, model_config=model_config,
                               batch_size=spec.resolved_batch_size, encoder_sha256=sha)
    reply = client_app(_to_site("evaluate", RecordDict({"config": ConfigRecord(evaluate.to_config()),
                                                        "arrays": message.content["arrays"]})), context)
    if reply.has_error():
        raise SystemExit(f"evaluate declined: {reply.error.reason}")
    phases.mark("evaluated")


class SyntheticSites:
    """A Flower `Grid` whose sites answer at once with replies of the real size and kind (server-side
    measurement only: the sites' memory is measured by `child_site_round` with the real ClientApp).

    hello → not holding the encoder (first time) · install_encoder → installed · token_moments → sums of the
    right width · train → the global weights plus a small update, as new arrays · evaluate → metrics."""

    def __init__(self, sites: int) -> None:
        self.nodes = {100 + i: f"site-{i}" for i in range(sites)}
        self.installed: set[int] = set()
        self.replies: dict[str, Any] = {}
        self._run = None

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        from flwr.app import Message

        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self):
        return list(self.nodes)

    def get_nodes(self):
        from types import SimpleNamespace

        return [SimpleNamespace(node_id=n, last_activated_at="0") for n in self.nodes]

    def push_messages(self, messages):
        import uuid

        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.replies[message.metadata.message_id] = self.answer(message)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))

    def answer(self, message):
        import numpy as np
        from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

        from braing3n_core.federation.protocol import Hello, SiteReply, TokenMomentsQuery, moments_to_arrays
        from braing3n_core.models import TokenMoments

        node = message.metadata.dst_node_id
        site = self.nodes[node]
        kind = message.metadata.message_type.split(".")[0]
        config = message.content.config_records.get("config", {})
        arrays = None
        if kind == "query" and config.get("action") == "hello":
            reply, metrics = Hello(site_id=site, has_encoder=node in self.installed,
                                   scans={"train": 10, "val": 2, "test": 2}), {"problems": 0.0}
        elif kind == "query" and config.get("action") == "install_encoder":
            self.installed.add(node)
            reply, metrics = SiteReply(site_id=site), {"installed": 1.0}
        elif kind == "query" and config.get("action") == "token_moments":
            width = TokenMomentsQuery.from_config(config).token_dim
            moments = TokenMoments(width)
            import torch

            moments.add(torch.randn(64, width))
            reply, metrics, arrays = SiteReply(site_id=site), {"num-examples": float(moments.count)}, moments_to_arrays(moments)
        elif kind == "train":
            update = np.float32(1e-4 * (1 + len(self.replies)))
            arrays = {k: v.numpy() + update if v.dtype.startswith("float") else v.numpy()
                      for k, v in message.content["arrays"].items()}
            reply, metrics = SiteReply(site_id=site), {"num-examples": 10.0, "train/loss": 1.0, "train/examples": 1.0,
                                                       "train/seconds": 1.0, "train/steps": 1.0}
        elif kind == "evaluate":
            reply, metrics = SiteReply(site_id=site), {"num-examples": 2.0, "val/examples": 2.0, "val/loss": 1.0}
        else:
            raise ValueError(f"the synthetic sites do not answer {message.metadata.message_type} {dict(config)}")
        content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord(reply.to_config())})
        if arrays is not None:
            content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
        return Message(content, reply_to=message)


def child_server(run_yaml: Path, run_dir: Path, sites: int, phases: Phases) -> None:
    """The ServerApp's whole run (`server.run.run_federation`: every stage's rounds, screening, aggregation,
    validation round, checkpoints) against `SyntheticSites`."""
    import shutil

    from server.run import run_federation

    _set_task_identity()
    shutil.rmtree(run_dir, ignore_errors=True)
    phases.mark("imported")
    run_federation(SyntheticSites(sites), run_yaml, run_dir, sites)
    phases.mark("finished")


def measure_child(label: str, argv: list[str], out: Path, args: argparse.Namespace, code: Path | None = None,
                  run_dir: Path | None = None) -> dict[str, Any]:
    """This script's `--child …` in a fresh process, sampled like a simulation; peaks per phase."""
    phases_path = out / f"{label}.phases.json"
    phases_path.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", *argv, "--phases", str(phases_path)]
    print(f"[memory bench] {label} (load {os.getloadavg()[0]:.1f}) …", file=sys.stderr, flush=True)
    started = time.time()
    returncode, memory = run_measured(command, out / f"{label}.log", args, code)
    ended = time.time()
    stages = {}
    if run_dir is not None and (run_dir / "messages.jsonl").is_file():  # the server's stages
        stages = {name: memory.peak(a, b) for name, (a, b) in stage_windows(run_dir, started, ended).items()}
    marks = json.loads(phases_path.read_text()) if phases_path.is_file() else []
    bounds = [*marks, ["end", ended]]
    phase_peaks = {name: memory.peak(begin, end) for (name, begin), (_, end) in zip(bounds, bounds[1:])}
    base = [s for s in memory.samples if marks and s["time"] <= marks[0][1]]
    return {"label": label, "returncode": returncode, "stopped": memory.stopped, "seconds": ended - started,
            "phases": {name: round(t - started, 2) for name, t in marks},
            "baseline_pss": base[-1]["pss"] if base else None, "peak": memory.peak(), "phase_peaks": phase_peaks,
            "stage_peaks": stages,
            "min_mem_available": memory.min_available,
            "series": series(memory, started)}


def measure_pieces(preset: str, site_yamls: Sequence[Path], out: Path, args: argparse.Namespace, label: str,
                   batch_size: int, code: Path | None = None, stages: Sequence[str] = STAGE_NAMES,
                   server_stages: Sequence[str] = STAGE_NAMES) -> dict[str, Any]:
    """The `preset` run in measured pieces, each in a fresh process: one site's setup (hello, encoder
    installation), each stage's site round (1 local step, then the validation), and the ServerApp's whole run
    against instant sites (2 rounds per stage, so that what the server keeps from round to round shows)."""
    run_yaml = write_run_yaml(out / f"{label}-site.yaml", f"memory-{label}", preset, len(site_yamls), 1, 1,
                              batch_size, probes=False)
    server_yaml = write_run_yaml(out / f"{label}-server.yaml", f"memory-{label}-server", preset, len(site_yamls), 2, 1,
                                 batch_size, probes=False, stages=server_stages)
    common = ["--preset", preset, "--site", str(site_yamls[0]), "--sha-file", str(out / f"{preset}-encoder.sha")]
    pieces = {}
    if stages and any(get_stage(s).needs_encoder for s in stages) or not (out / f"{preset}-encoder.sha").is_file():
        pieces["site_setup"] = measure_child(f"{label}-site-setup", ["install", *common], out, args, code)
    for stage in stages:
        pieces[f"site_{stage}"] = measure_child(f"{label}-site-{stage}", ["site", "--stage", stage, "--run-yaml",
                                                                          str(run_yaml), *common], out, args, code)
    if server_stages:
        server_dir = out / f"{label}-server-run"
        pieces["server"] = measure_child(f"{label}-server", ["server", "--run-yaml", str(server_yaml), "--run-dir",
                                                             str(server_dir), "--sites", str(len(site_yamls))],
                                         out, args, code, run_dir=server_dir)
    return {"preset": preset, "sites": len(site_yamls), "site_run_yaml": yaml.safe_load(run_yaml.read_text()),
            "server_run_yaml": yaml.safe_load(server_yaml.read_text()), "pieces": pieces}


# --- main -----------------------------------------------------------------------------------------------------


def run_child(args: argparse.Namespace) -> int:
    phases = Phases(Path(args.phases))
    if args.child == "install":
        child_install(args.preset, Path(args.site), Path(args.sha_file), phases)
    elif args.child == "site":
        child_site_round(args.stage, args.preset, Path(args.site), Path(args.run_yaml),
                         Path(args.sha_file).read_text().strip(), phases)
    elif args.child == "server":
        child_server(Path(args.run_yaml), Path(args.run_dir), args.sites, phases)
    return 0


def _setup_end_pss(run: dict[str, Any]) -> float | None:
    """The tree's PSS at the end of a simulation's setup: every process up, each site's data checked, no
    network built yet (the last sample before the first stage's first message)."""
    end = run["stages"].get("setup", {}).get("window_s", [None, None])[1]
    rows = [r for r in run["series"]["rows"] if end is not None and r[0] <= end]
    return rows[-1][1] * MIB if rows else None


def _site_work(piece: dict[str, Any]) -> dict[str, Any] | None:
    """A site piece's working memory: its peak from the train message on (train, reply, evaluate) above the
    process's own PSS before the message (imports, the site's checked data)."""
    peaks = [p["pss"] for name, p in piece["phase_peaks"].items() if name in ("message", "trained", "reply_sent")
             and p is not None]
    if not peaks or piece["baseline_pss"] is None:
        return None
    train = piece["phase_peaks"].get("message")
    evaluate = piece["phase_peaks"].get("reply_sent")
    return {"baseline": piece["baseline_pss"], "peak": max(peaks), "work": max(peaks) - piece["baseline_pss"],
            "train_work": train["pss"] - piece["baseline_pss"] if train else None,
            "evaluate_work": evaluate["pss"] - piece["baseline_pss"] if evaluate else None,
            "complete": piece["returncode"] == 0 and piece["stopped"] is None, "stopped": piece["stopped"]}


def _server_work(piece: dict[str, Any], stage: str) -> dict[str, Any] | None:
    peak = piece.get("stage_peaks", {}).get(stage)
    if peak is None or piece["baseline_pss"] is None:
        return None
    return {"baseline": piece["baseline_pss"], "peak": peak["pss"], "work": peak["pss"] - piece["baseline_pss"],
            "complete": piece["returncode"] == 0 and piece["stopped"] is None}


def _shm_copies(run: dict[str, Any], stage: str, stage_bytes: int) -> float | None:
    """Copies of a stage's weights in Ray's object store (shared memory) at the stage's peak, in a simulation."""
    peak = run["stages"].get(stage, {}).get("peak")
    return peak["pss_shmem"] / stage_bytes if peak else None


def compose(pieces: dict[str, Any], fixed: float, actors: int, shm_copies: dict[str, float],
            sizes: dict[str, Any], concurrent: int) -> dict[str, Any]:
    """Peak of a simulation from measured pieces, per stage: the fixed cost of the processes, the server's
    working memory, `concurrent` sites' working memory (sites train at the same time, one per Ray actor), and
    the messages in flight in Ray's object store (copies per weight byte as measured at `small`)."""
    stages = {}
    for stage in STAGE_NAMES:
        site = _site_work(pieces[f"site_{stage}"]) if f"site_{stage}" in pieces else None
        server = _server_work(pieces["server"], stage) if "server" in pieces else None
        if site is None or server is None:
            continue
        trainable = sizes["networks"][stage]["trainable_bytes"]
        transport = shm_copies.get(stage, 0.0) * trainable
        peak = fixed + server["work"] + concurrent * site["work"] + transport
        stages[stage] = {"site_work": site["work"], "site_complete": site["complete"], "server_work": server["work"],
                         "transport": transport, "estimated_peak": peak}
    top = max(stages, key=lambda n: stages[n]["estimated_peak"]) if stages else None
    return {"fixed_cost": fixed, "actors": actors, "concurrent_sites": concurrent, "stages": stages,
            "peak_stage": top, "estimated_peak": stages[top]["estimated_peak"] if top else None}


def assemble(parts: dict[str, Any]) -> dict[str, Any]:
    """The figures the issue asks for, from the measured parts (see the module's docstring)."""
    sizes = {p: model_size(p) for p in ("tiny", "small", "paper")}
    result: dict[str, Any] = {"benchmark": "memory", "goal_ratio": GOAL_RATIO, "model_size": sizes}
    tiny, small, steps = parts.get("tiny"), parts.get("small"), parts.get("steps")
    fixed = None
    if tiny is not None:
        fixed = _setup_end_pss(tiny)
        result["fixed_cost"] = {
            "setup_end_pss": fixed, "peak_pss": tiny["peak"]["pss"], "peak_rss": tiny["peak"]["rss"],
            "setup_end_pss_by_kind": None, "peak_pss_by_kind": tiny["peak"]["pss_by_kind"],
            "processes_at_peak": tiny["peak"]["processes"],
            "note": "a 4-site simulation at `tiny` (networks of 2.7 MiB): the processes' own memory (Python, torch, "
                    "MONAI, Flower, Ray); setup_end_pss is the tree's PSS with every process up and each site's "
                    "data checked, before any network exists"}
    if small is not None:
        model = sizes["small"]["bytes"]
        peak = small["peak"]
        entry = {"peak_pss": peak["pss"], "peak_rss": peak["rss"], "model_bytes": model,
                 "ratio_pss": peak["pss"] / model, "ratio_rss": peak["rss"] / model,
                 "peak_pss_by_kind": peak["pss_by_kind"], "peak_rss_by_kind": peak["rss_by_kind"],
                 "client_actor_pss_at_peak": peak["client_actor_pss"], "pss_shmem_at_peak": peak["pss_shmem"],
                 "stage_peak_pss": {k: v["peak"]["pss"] for k, v in small["stages"].items() if v["peak"]},
                 "setup_end_pss": _setup_end_pss(small), "completed": small["completed"]}
        if fixed is not None:
            entry["fixed_cost_pss"] = fixed
            entry["ratio_above_fixed_cost"] = (peak["pss"] - fixed) / model
        result["small_4_sites"] = entry
    if small is not None and steps is not None:
        a, b = steps["peak"]["pss"], small["peak"]["pss"]
        result["steps_check"] = {
            "peak_pss_1_round_1_step": a, f"peak_pss_{small['rounds']}_rounds_{small['local_steps']}_steps": b,
            "difference": b - a, "difference_in_model_sizes": (b - a) / sizes["small"]["bytes"],
            "relative_difference": (b - a) / b,
            "stage_peaks_1x1": {k: v["peak"]["pss"] for k, v in steps["stages"].items() if v["peak"]},
            "stage_peaks": {k: v["peak"]["pss"] for k, v in small["stages"].items() if v["peak"]}}
    shm = {}
    if small is not None:
        shm = {stage: _shm_copies(small, stage, sizes["small"]["networks"][stage]["trainable_bytes"]) or 0.0
               for stage in STAGE_NAMES}
        result["transport_copies_at_small"] = shm
    actors = max((len(r["peak"]["client_actor_pss"]) for r in (tiny, small) if r), default=2)
    if fixed is not None and "small_pieces" in parts and small is not None:
        predicted = compose(parts["small_pieces"]["pieces"], fixed, actors, shm, sizes["small"], actors)
        measured = {k: v["peak"]["pss"] for k, v in small["stages"].items() if v["peak"]}
        for stage, row in predicted["stages"].items():
            row["measured_peak"] = measured.get(stage)
            row["predicted_over_measured"] = row["estimated_peak"] / measured[stage] if measured.get(stage) else None
        result["composition_check_at_small"] = predicted
    if fixed is not None and "paper" in parts:
        pieces = parts["paper"]["pieces"]
        model = sizes["paper"]["bytes"]
        together = compose(pieces, fixed, actors, shm, sizes["paper"], min(2, actors))
        one_at_a_time = compose(pieces, fixed - (actors - 1) * _actor_baseline(tiny), 1, shm, sizes["paper"], 1)
        per_machine = {}
        if "server" in pieces:
            per_machine["server"] = {"peak": pieces["server"]["peak"]["pss"],
                                     "ratio": pieces["server"]["peak"]["pss"] / model}
        for stage in STAGE_NAMES:
            site = pieces.get(f"site_{stage}")
            if site is not None and site["peak"] is not None:
                per_machine[f"site_{stage}"] = {"peak": site["peak"]["pss"], "ratio": site["peak"]["pss"] / model,
                                                "complete": site["returncode"] == 0 and site["stopped"] is None}
        result["paper_2_sites"] = {
            "model_bytes": model, "largest_stage": sizes["paper"]["largest_stage"],
            "largest_stage_trainable_bytes": sizes["paper"]["largest_stage_trainable_bytes"],
            "sites_concurrent": together, "ratio_sites_concurrent": (together["estimated_peak"] or 0) / model,
            "sites_one_at_a_time": one_at_a_time, "ratio_sites_one_at_a_time": (one_at_a_time["estimated_peak"] or 0) / model,
            "per_machine_deployment": per_machine,
            "pieces": {name: {"returncode": p["returncode"], "stopped": p["stopped"], "seconds": p["seconds"],
                              "baseline_pss": p["baseline_pss"], "peak_pss": p["peak"]["pss"] if p["peak"] else None,
                              "phase_peak_pss": {k: v["pss"] for k, v in p["phase_peaks"].items() if v},
                              "stage_peak_pss": {k: v["pss"] for k, v in p.get("stage_peaks", {}).items() if v}}
                       for name, p in pieces.items()},
        }
    if "before" in parts:
        result["fixes"] = before_after(parts, sizes)
    result["parts"] = parts
    return result


def _actor_baseline(run: dict[str, Any] | None) -> float:
    """One Ray actor's PSS with its imports and a site's data (the smallest actor at a run's peak)."""
    if not run or not run["peak"]["client_actor_pss"]:
        return 0.0
    return float(min(run["peak"]["client_actor_pss"].values()))


def before_after(parts: dict[str, Any], sizes: dict[str, Any]) -> dict[str, Any]:
    """The same measurements with the code before the fixes (`--before`) and now."""
    before = parts["before"]
    out: dict[str, Any] = {"before_commit": before["commit"]}
    tiny = parts.get("tiny")
    if tiny is not None:
        kinds = sorted(set(before["tiny"]["peak"]["pss_by_kind"]) | set(tiny["peak"]["pss_by_kind"]))
        out["tiny_simulation"] = {
            "before_peak_pss": before["tiny"]["peak"]["pss"], "after_peak_pss": tiny["peak"]["pss"],
            "before_setup_end_pss": _setup_end_pss(before["tiny"]), "after_setup_end_pss": _setup_end_pss(tiny),
            "before_processes": before["tiny"]["peak"]["processes"], "after_processes": tiny["peak"]["processes"],
            "peak_pss_by_kind": {k: [before["tiny"]["peak"]["pss_by_kind"].get(k, 0), tiny["peak"]["pss_by_kind"].get(k, 0)]
                                 for k in kinds}}
    paper = parts.get("paper")
    if paper is not None:
        old, new = before["paper"]["pieces"], paper["pieces"]
        rows = {}
        for stage in STAGE_NAMES:
            if "server" in old and "server" in new:
                a, b = _server_work(old["server"], stage), _server_work(new["server"], stage)
                if a and b:
                    trainable = sizes["paper"]["networks"][stage]["trainable_bytes"]
                    rows[f"server_{stage}"] = {"before_work": a["work"], "after_work": b["work"],
                                               "saved": a["work"] - b["work"],
                                               "saved_in_stage_weights": (a["work"] - b["work"]) / trainable}
            if f"site_{stage}" in old and f"site_{stage}" in new:
                a, b = _site_work(old[f"site_{stage}"]), _site_work(new[f"site_{stage}"])
                if a and b:
                    trainable = sizes["paper"]["networks"][stage]["trainable_bytes"]
                    rows[f"site_{stage}"] = {"before_work": a["work"], "after_work": b["work"],
                                             "saved": a["work"] - b["work"],
                                             "saved_in_stage_weights": (a["work"] - b["work"]) / trainable,
                                             "before_train_work": a["train_work"], "after_train_work": b["train_work"],
                                             "before_evaluate_work": a["evaluate_work"],
                                             "after_evaluate_work": b["evaluate_work"]}
        out["paper_pieces"] = rows
    return out


def _gib(value: float | None) -> str:
    return "?" if value is None else f"{value / GIB:.2f}"


def summary_line(result: dict[str, Any]) -> str:
    machine = result.get("machine", {})
    parts = [f"memory bench ({machine.get('cpu_count')} CPUs, load {machine.get('load_average_before', ['?'])[0]}"
             f"->{machine.get('load_average_after', ['?'])[0]})"]
    small = result.get("small_4_sites")
    if small:
        text = (f"small 4 sites: peak PSS {_gib(small['peak_pss'])} GiB (RSS {_gib(small['peak_rss'])}) = "
                f"{small['ratio_pss']:.0f}x model ({small['model_bytes'] / MIB:.1f} MiB)")
        if "fixed_cost_pss" in small:
            text += (f"; fixed process cost {_gib(small['fixed_cost_pss'])} GiB, peak - fixed = "
                     f"{small['ratio_above_fixed_cost']:.1f}x model")
        parts.append(text)
    steps = result.get("steps_check")
    if steps:
        parts.append(f"1x1 vs 2x3 rounds x steps: peak differs by {steps['difference'] / MIB:+.0f} MiB "
                     f"({100 * steps['relative_difference']:+.1f}%)")
    paper = result.get("paper_2_sites")
    if paper:
        model = paper["model_bytes"]
        together, alone = paper["sites_concurrent"], paper["sites_one_at_a_time"]
        parts.append(f"paper 2 sites (model {_gib(model)} GiB), estimated from measured pieces: peak "
                     f"{_gib(together['estimated_peak'])} GiB = {paper['ratio_sites_concurrent']:.1f}x with both sites "
                     f"training at once, {_gib(alone['estimated_peak'])} GiB = {paper['ratio_sites_one_at_a_time']:.1f}x "
                     f"one at a time (goal {GOAL_RATIO:g}x); per machine: " + ", ".join(
                         f"{k} {v['ratio']:.1f}x" for k, v in paper["per_machine_deployment"].items()))
    fixes = result.get("fixes", {}).get("paper_pieces")
    if fixes:
        parts.append("fixes at paper (working memory saved, in stage weights): " + ", ".join(
            f"{k} {v['saved_in_stage_weights']:.1f}" for k, v in fixes.items()))
    tiny = result.get("fixes", {}).get("tiny_simulation")
    if tiny:
        parts.append(f"tiny simulation peak {_gib(tiny['before_peak_pss'])} -> {_gib(tiny['after_peak_pss'])} GiB")
    return "; ".join(parts)


PARTS = ("tiny", "small", "steps", "small_pieces", "paper", "before")


def measure_part(part: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One part of the benchmark (each is saved on its own, so parts can be measured in separate runs)."""
    if part in ("tiny", "small", "steps", "small_pieces", "before"):
        cohort, _ = cohort_sites(out / "cohort-2mm", args.sites, args.subjects, 0, 2.0)
    if part in ("paper", "before"):
        paper_sites, _ = cohort_sites(out / "cohort-1mm-2sites", 2, args.paper_subjects, 0, 1.0)
    if part in ("tiny", "small", "steps"):
        preset = "tiny" if part == "tiny" else "small"
        rounds, steps = (1, 1) if part == "steps" else (args.rounds, args.local_steps)
        run_yaml = write_run_yaml(out / f"{part}.yaml", f"memory-{part}", preset, len(cohort), rounds, steps,
                                  args.batch_size, not args.no_probes)
        return {"preset": preset, "sites": len(cohort), "rounds": rounds, "local_steps": steps,
                "run_yaml": yaml.safe_load(run_yaml.read_text()),
                **measure_simulation(part, cohort, run_yaml, out / f"run-{part}", args)}
    if part == "small_pieces":
        return measure_pieces("small", cohort, out, args, "small-pieces", args.batch_size)
    if part == "paper":
        return measure_pieces("paper", paper_sites, out, args, "paper-pieces", args.paper_batch_size)
    code, sha = export_code(args.before, out)
    print(f"[memory bench] before: the code of {sha[:12]} ({args.before}) in {code}", file=sys.stderr, flush=True)
    run_yaml = write_run_yaml(out / "before-tiny.yaml", "memory-before-tiny", "tiny", len(cohort), args.rounds,
                              args.local_steps, args.batch_size, not args.no_probes)
    return {"commit": sha, "ref": args.before,
            "tiny": measure_simulation("before-tiny", cohort, run_yaml, out / "run-before-tiny", args, code),
            "paper": measure_pieces("paper", paper_sites, out, args, "before-paper", args.paper_batch_size, code,
                                    stages=("mae",),
                                    server_stages=("mae", "decoder"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    child = parser.add_argument_group("one measured piece (what the benchmark runs in a fresh process)")
    child.add_argument("--child", choices=("install", "site", "server"))
    for name in ("--stage", "--preset", "--site", "--run-yaml", "--run-dir", "--sha-file", "--phases"):
        child.add_argument(name)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--reuse", action="store_true", help="take parts already measured in --out instead of "
                        "measuring them again (a part measures once; the summary is rebuilt from what is there)")
    parser.add_argument("--sites", type=int, default=4, help="sites of the 2 mm cohort (tiny, small simulations)")
    parser.add_argument("--subjects", type=int, default=8, help="subjects per site of the 2 mm cohort")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--no-probes", action="store_true")
    parser.add_argument("--paper-subjects", type=int, default=3, help="subjects per site of the 1 mm cohort")
    parser.add_argument("--paper-batch-size", type=int, default=1)
    parser.add_argument("--before", default=None, help="git ref of the code before the fixes (default: the merge "
                        "base of HEAD and main)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("--limit-gib", type=float, default=17.0, help="stop a measured tree above this PSS")
    parser.add_argument("--floor-gib", type=float, default=2.0, help="stop a measured tree when the machine's "
                        "MemAvailable falls below this (the machine is shared)")
    parser.add_argument("--out", default="/tmp/memory-bench")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    if args.child:
        return run_child(args)
    if args.before is None:
        root = Path(__file__).resolve().parents[1]
        args.before = subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=root, check=True, capture_output=True,
                                     text=True).stdout.strip()
    out = Path(args.out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    load_before, started = load_average(), time.perf_counter()
    for part in args.parts.split(","):
        if part not in PARTS:
            raise SystemExit(f"--parts: unknown part {part!r}; choose from {', '.join(PARTS)}")
        saved = out / "parts" / f"{part}.json"
        if args.reuse and saved.is_file():
            continue
        atomic_write_json(saved, {"measured_with": vars(args), **measure_part(part, args, out)})
    parts = {p.stem: json.loads(p.read_text()) for p in sorted((out / "parts").glob("*.json"))}
    result = assemble(parts)
    result["settings"] = vars(args)
    result["seconds"] = time.perf_counter() - started
    result["machine"] = machine_info(load_before)
    result["summary"] = summary_line(result)
    atomic_write_json(Path(args.results), result)
    print(result["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
