"""Federation benchmark (issue 4): Flower's overhead, bytes on the wire, and what federation buys.

Everything runs on the real code paths: `braing3n_core.simulate.simulate` (what `braing3n simulate`
calls: a self-started SuperLink, `flwr run`, Flower's Ray simulation engine, our ServerApp/ClientApp)
and `braing3n_core.train.train_centralized` (what `braing3n train` calls), over a synthetic non-IID
cohort from `braing3n_core.data.cohort` (4 archetype sites: memory clinic 60–90 y CN/MCI/AD at 1.5 T,
neuro-oncology glioma at 3 T, young healthy research volunteers at 3 T, general hospital; different
modalities, scanners, age ranges and diagnosis mixes).

**Equal compute.** The whole benchmark is pinned to one CPU core (`--core`, inherited by the SuperLink,
Ray and its actors) with one torch thread per process (`simulate(cpus_per_site=1)` /
`torch.set_num_threads(1)`). Both sides therefore get the same single core; Flower's own processes
(SuperLink, ServerApp, Ray) share it, so their CPU use counts as federation overhead. Without the pin
the simulation would run two sites at once on two cores against a one-thread centralized loop, and
the ratio would measure parallelism, not overhead. (Two torch threads on this shared 2-core machine
are 5–30× slower per step than one while colleagues' jobs run: OpenMP spin-waits.)

1. **Overhead.** K-site simulations of the MAE stage (R rounds × L local steps × batch B at each site,
   FedAvg, one federated validation at the end) against centralized MAE training on the pooled
   training subjects for R·L·K steps of batch B (the same R·L·B·K sample-steps, one validation at the
   end), alternating C F C F C (`--repeats` 2): each simulation is compared with the mean of the
   centralized runs around it, because the shared machine's load drifts. Both timed regions include
   data loading from a warm preprocessing cache (filled before anything is timed) and their checkpoint
   writes. The fixed cost of the federation (SuperLink, `flwr run` + app install, Ray, ServerApp start,
   Ray actors' start-up and the `hello` handshake, shutdown) is reported on its own; ratios are given
   with and without it, in wall time and in CPU seconds of the whole process tree (`TreeCPU`), which
   also says where the extra time goes per process kind and phase. Per-message pieces (a site's data
   check, model rebuild, array record conversion, round checkpoint) are timed in this process.
2. **Bytes.** A second, short simulation runs mae → decoder → dit (K sites). From `messages.jsonl`
   (the server records each message's records, array shapes and bytes) the bytes sent to and received
   from each site per round and stage are compared with 4 × the stage's trainable parameters, and the
   frozen encoder is checked to reach each site exactly once per run (an `install_encoder` query) and
   never to ride in a decoder or DiT round.
3. **Quality.** For each of `--quality-seeds` training seeds, every arm from that seed's initialisation and
   with the same per-step learning-rate schedule: (a) a federated MAE (the real simulation, R rounds of L
   steps at each site; part 1's for its seed), (b) a centralized MAE on the pooled training subjects for
   R·L·K steps (part 1's for its seed), (c) an MAE trained on each site alone for R·L·K steps, (d) the
   random initialisation all of them start from, and (e) a federated MAE trained for `--quality-rounds` N
   rounds (default N = R·K: every site performs the R·L·K steps that the centralized run and each site alone
   perform, the same wall time when sites train in parallel; 0 leaves this arm out). Arm (a) sees the
   centralized run's samples but gives each site a K-th of its steps. The sites' updates agree (FedExP's
   adaptive server step, Jhunjhunwala et al. 2023, tried on two seeds, stayed at 1.0–1.1), so an averaged
   round moves the model about as far as one site's L steps: (a) ends at the loss the centralized run had
   near step 900 of 3,000. Arm (e) is the comparison at equal per-site compute. Linear probes
   (`probes.run_probes`, subject-grouped 5-fold CV with that seed's folds, on pooled mean tokens of every
   usable scan of all K sites) score each encoder identically; each encoder's final validation masked L1 and
   the spectrum of its probe features (effective rank, share of the first principal component) say how far
   it trained and how many directions its features use. One training seed's encoders differ from another's
   about as much as the arms differ (the federated arm's diagnosis bAcc spans 0.42–0.53 over seeds 0–9), so
   the verdict compares means over seeds (ten by default: about 2.5 h on 2 cores) and reports the paired
   federated − centralized and − site-average differences with 95% t-intervals. The trainings run `--jobs`
   at a time, one core each, longest first. `--resume` reuses the trainings a stopped run of the same
   arguments completed in `--out`; `--combine` judges the quality parts of several result files (further
   seeds of the same cohort and recipe) together.

Prints one summary line; writes bench/results/federation.json with the machine (CPUs, load averages
before/after each phase, torch/flwr/ray versions).

    python bench/bench_federation.py [--preset tiny] [--sites 4] [--subjects 30] [--rounds 10]
        [--local-steps 75] [--batch-size 8] [--lr 3e-3] [--warmup-rounds 1] [--repeats 2] [--core N] [--seed 0]
        [--quality-seeds 0,1,...,9] [--quality-rounds N] [--jobs 2] [--out /tmp/federation-bench]
        [--skip-overhead] [--skip-bytes] [--skip-quality] [--resume] [--results bench/results/federation.json]
    python bench/bench_federation.py --combine RESULTS.json... --results COMBINED.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import load_average, machine_info
from braing3n_core.data.datasets import SiteData, load_site
from braing3n_core.fileio import atomic_write_json
from braing3n_core.models.mae import MAEEncoder
from braing3n_core.presets import Preset, get_preset
from braing3n_core.site_config import SiteConfig
from braing3n_core.stage_names import STAGE_NAMES
from braing3n_core.training.loop import trainable_state
from braing3n_core.training.stages import get_stage

RESULTS = Path(__file__).resolve().parent / "results" / "federation.json"
TARGET_RATIO = 1.15
QUALITY_TOLERANCE = 0.05  # "within 5% of centralized"
PROBE_METRICS = ("probe/age_mae", "probe/age_r2", "probe/diagnosis_bacc", "probe/sex_bacc", "probe/sex_auroc",
                 "probe/modality_bacc")


# --- machine -------------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    """Flower's side of the stack (bench.common.machine_info records python and torch)."""
    found = {}
    for package in ("flwr", "ray", "numpy"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


class PhaseLog:
    """Wall time and load averages around each phase (the machine is shared; load explains noise)."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, Any]] = {}

    def run(self, name: str, work: Callable[[], Any]) -> Any:
        before, started = os.getloadavg(), time.perf_counter()
        print(f"[federation bench] {name} (load {before[0]:.1f}) …", file=sys.stderr, flush=True)
        result = work()
        self.phases[name] = {"seconds": time.perf_counter() - started, "load_average_before": before,
                             "load_average_after": os.getloadavg()}
        return result


def pin_to_core(core: int | None) -> int:
    """Pin this process (and so every process it starts) to one core; returns the core."""
    allowed = sorted(os.sched_getaffinity(0))
    chosen = allowed[-1] if core is None else core
    if chosen not in allowed:
        raise SystemExit(f"--core {chosen}: not among this process's CPUs {allowed}")
    os.sched_setaffinity(0, {chosen})
    torch.set_num_threads(1)
    return chosen


# --- cohort and site files -----------------------------------------------------------------------------------


def make_cohort(out: Path, sites: int, subjects: int, seed: int, voxel_mm: float) -> list[Path]:
    """The synthetic cohort (reused when `out/cohort` holds one of this size)."""
    from braing3n_core.data.cohort import CohortSpec
    from braing3n_core.data.cohort import make_cohort as generate

    marker = out / "cohort" / "bench-spec.json"
    spec = {"sites": sites, "subjects": subjects, "seed": seed, "voxel_mm": voxel_mm}
    existing = sorted((out / "cohort" / "sites").glob("*.yaml"))
    if marker.is_file() and json.loads(marker.read_text()) == spec and len(existing) == sites:
        return existing
    paths = generate(CohortSpec(n_sites=sites, subjects_per_site=subjects, seed=seed, voxel_mm=voxel_mm,
                                progress=False), out_dir=out / "cohort")
    atomic_write_json(marker, spec)
    return sorted(paths)


def fresh_cache_sites(cohort: Sequence[Path], folder: Path) -> list[Path]:
    """Site YAMLs whose cache folder is new (no installed encoders, no tokens) but whose preprocessed
    volumes are the cohort's (a symlink), so a run starts as a first run without preprocessing again."""
    shutil.rmtree(folder, ignore_errors=True)
    paths = []
    for source in cohort:
        site = SiteConfig.from_yaml(source)
        cache = folder / "cache" / site.site_id
        cache.mkdir(parents=True)
        (cache / "volumes").symlink_to(site.resolved_cache_dir / "volumes", target_is_directory=True)
        target = folder / f"{site.site_id}.yaml"
        target.write_text(yaml.safe_dump({**site.to_yaml_dict(), "cache_dir": str(cache)}))
        paths.append(target)
    return paths


def warm_caches(cohort: Sequence[Path], preset: Preset) -> list[SiteData]:
    """Checks + preprocessing of every scan (cache fill), outside every timed region."""
    return [load_site(SiteConfig.from_yaml(p), preset, progress=False) for p in cohort]


def write_run_yaml(path: Path, name: str, preset: str, seed: int, sites: int, stages: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({
        "name": name, "preset": preset, "seed": seed, "min_sites": sites, "round_timeout_s": 3600.0,
        "stages": stages, "probes": {"enabled": False},
    }, sort_keys=False))
    return path


def central_warmup_steps(args: argparse.Namespace, sites: int) -> int:
    """The federated warm-up in samples seen: K sites' `--warmup-rounds` are K·rounds·L centralized steps."""
    return args.warmup_rounds * args.local_steps * sites


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- CPU time of the process tree ------------------------------------------------------------------------------

PROCESS_KINDS = (  # cmdline fragment → what the process is, first match wins
    ("ClientAppActor", "client_actors"), ("flower-superlink", "superlink"), ("flower-superexec", "superexec"),
    ("flwr-simulation", "serverapp_and_ray_driver"), ("flwr run", "flwr_cli"), ("/flwr run", "flwr_cli"),
    ("ray", "ray_daemons"),
)


def _process_kind(cmdline: str) -> str:
    for fragment, kind in PROCESS_KINDS:
        if fragment in cmdline:
            return kind
    return "other"


class TreeCPU:
    """CPU seconds (user + system) of every process below this one, sampled from /proc every `interval`.

    Wall time on a shared machine moves with other people's load (the same centralized run took 54–107 s
    here); CPU seconds move much less (47–53 s for it: on this VM they still rise ~10–20 % under load), so
    they show the federation's own cost more steadily. The sampler thread runs on the other cores (the benchmark's core is left
    to the measured work). A process is credited up to its last sample (≤ `interval` lost per process).
    """

    def __init__(self, avoid_core: int, interval: float = 0.25) -> None:
        import threading

        self.interval, self.avoid_core = interval, avoid_core
        self.tick = os.sysconf("SC_CLK_TCK")
        self.series: dict[int, list[tuple[float, float]]] = defaultdict(list)
        self.kinds: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        from braing3n_core.ops.flower import descendants

        others = sorted(os.sched_getaffinity(0) - {self.avoid_core})  # this thread only (Linux: pid 0)
        if others:
            os.sched_setaffinity(0, set(others))
        while not self._stop.is_set():
            now = time.time()
            for pid in descendants(os.getpid()):
                try:
                    stat = Path(f"/proc/{pid}/stat").read_text()
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                fields = stat.rsplit(")", 1)[1].split()
                self.series[pid].append((now, (int(fields[11]) + int(fields[12])) / self.tick))
                kind = _process_kind(cmdline)
                if self.kinds.get(pid) in (None, "other", "ray_daemons") or kind == "client_actors":
                    self.kinds[pid] = kind  # a Ray worker becomes `ray::ClientAppActor` once it hosts one
            self._stop.wait(self.interval)

    def cpu_between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds per process kind spent in [start, end] (from the samples around the bounds)."""
        def at(samples: list[tuple[float, float]], t: float) -> float:
            before = [cpu for when, cpu in samples if when <= t]
            return before[-1] if before else 0.0

        out: dict[str, float] = defaultdict(float)
        for pid, samples in self.series.items():
            out[self.kinds.get(pid, "other")] += at(samples, end) - at(samples, start)
        return {k: round(v, 3) for k, v in sorted(out.items())}


# --- part 1: overhead ----------------------------------------------------------------------------------------


def run_simulation(site_yamls: Sequence[Path], run_yaml: Path, run_dir: Path,
                   resume: bool = False) -> tuple[float, float, float]:
    """(start, end, seconds) of one `simulate` call, wall clock; the run folder is new unless `resume`
    (then a stopped run continues; `simulate` refuses a folder pinned to another recipe). Flower's output
    goes to the run folder's logs/ (the simulate wrapper writes it there), not to this terminal."""
    from braing3n_core.ops.simulate import simulate

    if not resume:
        shutil.rmtree(run_dir, ignore_errors=True)
    started = time.time()
    simulate(list(site_yamls), run_yaml, run_dir, resume=resume, echo=lambda _line: None)
    ended = time.time()
    return started, ended, ended - started


def federated_timeline(run_dir: Path, stage: str, started: float, ended: float) -> dict[str, Any]:
    """Where the simulation's wall time went, from the run's own ledgers (server-side timestamps)."""
    messages = read_jsonl(run_dir / "messages.jsonl")
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    complete = json.loads((run_dir / "run_complete.json").read_text())
    hello = [m for m in messages if m["stage"] == "setup"]
    train = [m for m in messages if m["stage"] == stage and m["type"] == "train"]
    evaluate = [m for m in messages if m["stage"] == stage and m["type"] == "evaluate"]
    rounds = sorted({m["round"] for m in train})
    per_round = []
    for server_round in rounds:
        out = [m["time"] for m in train if m["round"] == server_round and m["direction"] == "out"]
        back = [m["time"] for m in train if m["round"] == server_round and m["direction"] == "in"]
        sites = [r for r in metrics if r["stage"] == stage and r["round"] == server_round and r["kind"] == "train"
                 and r["site"] != "aggregate"]
        per_round.append({"round": server_round, "sent": min(out), "all_replies": max(back),
                          "exchange_s": max(back) - min(out),
                          "site_loop_seconds": {r["site"]: r["train/seconds"] for r in sites}})
    for before, after in pairwise(per_round):
        before["server_between_rounds_s"] = after["sent"] - before["all_replies"]
    eval_out = [m["time"] for m in evaluate if m["direction"] == "out"]
    eval_in = [m["time"] for m in evaluate if m["direction"] == "in"]
    hello_out = min(m["time"] for m in hello if m["direction"] == "out")
    hello_in = max(m["time"] for m in hello if m["direction"] == "in")
    first_train = per_round[0]["sent"]
    timeline = {
        "total_s": ended - started,
        # SuperLink, `flwr run` (app install), Ray start, ServerApp start up to its first message
        "startup_processes_s": hello_out - started,
        # Ray actors start, ClientApp import, each site's data check (the `hello` query)
        "startup_handshake_s": hello_in - hello_out,
        "setup_to_first_round_s": first_train - hello_in,
        "rounds_s": per_round[-1]["all_replies"] - first_train,
        "exchanges_s": sum(r["exchange_s"] for r in per_round),
        "server_between_rounds_s": sum(r.get("server_between_rounds_s", 0.0) for r in per_round),
        "final_evaluation_s": (max(eval_in) - min(eval_out)) if eval_out else 0.0,
        "after_last_reply_s": complete["finished"] - per_round[-1]["all_replies"],
        "shutdown_s": ended - complete["finished"],
        "rounds": per_round,
    }
    timeline["fixed_cost_s"] = (timeline["startup_processes_s"] + timeline["startup_handshake_s"]
                                + timeline["setup_to_first_round_s"] + timeline["shutdown_s"])
    return timeline


def run_centralized(configs: Sequence[SiteConfig], args: argparse.Namespace, steps: int, warmup_steps: int,
                    out_dir: Path, resume: bool = False) -> dict[str, Any]:
    """`train_centralized` (MAE) timed as a whole; its own ledger splits the loop from the rest. A fresh
    folder unless `resume` (then the trainer continues from, or returns, the last checkpoint it finds)."""
    from braing3n_core.training.centralized import TrainOptions, train_centralized

    if not resume:
        shutil.rmtree(out_dir, ignore_errors=True)  # the trainer resumes from checkpoints it finds
    options = TrainOptions(stage="mae", preset=args.preset, steps=steps, batch_size=args.batch_size, seed=args.seed,
                           lr=args.lr, warmup_steps=warmup_steps, out_dir=out_dir, resume=resume)
    started, cpu = time.perf_counter(), time.process_time()
    checkpoint = train_centralized(list(configs), options)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    records = read_jsonl(out_dir / "metrics.jsonl")
    loop = sum(r["train/seconds"] for r in records)
    final = records[-1]
    return {"seconds": seconds, "cpu_seconds": cpu, "loop_seconds": loop, "seconds_per_step": loop / steps,
            "outside_loop_seconds": seconds - loop, "steps": steps, "checkpoint": str(checkpoint),
            "final_train_loss": final.get("train/loss"), "val_masked_l1": final.get("val/masked_l1")}


def message_costs(site_yamls: Sequence[Path], preset_name: str, repeats: int = 3) -> dict[str, float]:
    """Per-message work of a train round, timed here on the same core (median of `repeats`)."""
    from flwr.app import Array, ArrayRecord

    from braing3n_core.federation.arrays import load_arrays, module_arrays
    from braing3n_core.federation.run_folder import RoundCheckpoint, RunFolder
    from client.site import SiteRuntime

    stage, preset = get_stage("mae"), get_preset(preset_name)
    listed = ",".join(str(p) for p in site_yamls)
    model = stage.build(preset)
    arrays = module_arrays(model)
    config = json.loads(json.dumps(stage.model_config(model)))

    def median(work: Callable[[], Any]) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            work()
            times.append(time.perf_counter() - started)
        return float(np.median(times))

    data_check = [median(lambda i=i: SiteRuntime.from_context({"partition-id": i}, {"site-configs": listed})
                         .inputs(stage, preset_name)) for i in range(len(site_yamls))]
    rebuild = median(lambda: load_arrays(stage.from_config(config), arrays))
    to_record = median(lambda: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}))
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    from_record = median(lambda: {k: v.numpy() for k, v in record.items()})
    folder = RunFolder(Path(os.environ.get("TMPDIR", "/tmp")) / f"federation-bench-ckpt-{os.getpid()}")
    try:
        checkpoint = median(lambda: folder.save_round(RoundCheckpoint("mae", 1, arrays, {}, {"model_config": config})))
    finally:
        shutil.rmtree(folder.root, ignore_errors=True)
    return {"site_data_check_s_per_site": dict(zip([p.stem for p in site_yamls], data_check)),
            "site_data_check_s_all_sites": float(sum(data_check)),
            "model_rebuild_and_load_s": rebuild, "arrays_to_record_s": to_record, "record_to_arrays_s": from_record,
            "round_checkpoint_s": checkpoint, "mae_bytes": int(sum(v.nbytes for v in arrays.values()))}


def federated_costs(run_dir: Path, started: float, ended: float, cpu: TreeCPU, central: Sequence[dict[str, Any]],
                    costs: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One simulation against the centralized runs just before and after it: wall and CPU ratios, and
    where the federation's extra CPU went (per process kind and phase)."""
    k = args.sites
    timeline = federated_timeline(run_dir, "mae", started, ended)
    rounds = timeline["rounds"]
    first, last = rounds[0]["sent"], rounds[-1]["all_replies"]
    finished = last + timeline["after_last_reply_s"]
    phases = {"startup": cpu.cpu_between(started - 1.0, first), "rounds": cpu.cpu_between(first, last),
              "final_evaluation_and_checkpoint": cpu.cpu_between(last, finished),
              "shutdown": cpu.cpu_between(finished, ended + 60.0)}
    cpu_total = sum(sum(v.values()) for v in phases.values())
    cpu_steady = sum(phases["rounds"].values()) + sum(phases["final_evaluation_and_checkpoint"].values())
    central_wall = float(np.mean([c["seconds"] for c in central]))
    central_cpu = float(np.mean([c["cpu_seconds"] for c in central]))
    steady = timeline["total_s"] - timeline["fixed_cost_s"]
    actor_rounds = [cpu.cpu_between(r["sent"], r["all_replies"]).get("client_actors", 0.0) for r in rounds]
    actors = phases["rounds"].get("client_actors", 0.0) + phases["final_evaluation_and_checkpoint"].get("client_actors", 0.0)
    overhead_cpu = (cpu_steady - central_cpu) / len(rounds)
    training_cpu = central_cpu / len(rounds)  # one round's share of the same work done centrally
    walls = [r["exchange_s"] for r in rounds]
    return {
        "timeline": timeline,
        "round_exchange_s": {"median": float(np.median(walls)), "min": min(walls), "max": max(walls), "first": walls[0]},
        "centralized_around_s": [c["seconds"] for c in central],
        "ratio_with_fixed_cost": timeline["total_s"] / central_wall,
        "ratio_without_fixed_cost": steady / central_wall,
        "cpu": {
            "centralized_around_cpu_s": [c["cpu_seconds"] for c in central], "federated_cpu_s_by_phase": phases,
            "federated_cpu_s": cpu_total, "federated_cpu_s_without_fixed_cost": cpu_steady,
            "ratio_with_fixed_cost": cpu_total / central_cpu, "ratio_without_fixed_cost": cpu_steady / central_cpu,
            "overhead_s_per_round": overhead_cpu, "training_s_per_round": training_cpu,
            "per_round_overhead": {  # CPU seconds per round beyond the training itself
                "client_actors_beyond_centralized_s": (actors - central_cpu) / len(rounds),
                "first_round_actor_warmup_s": actor_rounds[0] - float(np.median(actor_rounds[1:] or actor_rounds)),
                **{f"{kind}_s": v / len(rounds) for kind, v in phases["rounds"].items() if kind != "client_actors"},
                "measured_pieces": {
                    "site_data_checks_s": costs["site_data_check_s_all_sites"],  # SiteRuntime.data per train message
                    "model_rebuild_and_load_s": k * costs["model_rebuild_and_load_s"],
                    "array_record_conversions_s": k * 2 * (costs["arrays_to_record_s"] + costs["record_to_arrays_s"]),
                    "round_checkpoint_s": costs["round_checkpoint_s"],
                },
            },
            "client_actor_s_per_round": actor_rounds,
            # If the per-round overhead stayed as measured while each site trained longer per round (it grows
            # a little with round length: idle daemons), the CPU ratio would reach the target from this many:
            "extrapolated_local_steps_for_target": args.local_steps * overhead_cpu / (training_cpu * (TARGET_RATIO - 1.0)),
        },
    }


def overhead(args: argparse.Namespace, cohort: Sequence[Path], out: Path, log: PhaseLog, core: int) -> dict[str, Any]:
    """Centralized and federated runs alternate (C F C F C for 2 repeats): the machine's load drifts, so
    each simulation is compared with the mean of the centralized runs just before and after it."""
    steps = args.rounds * args.local_steps * len(cohort)
    configs = [SiteConfig.from_yaml(p) for p in cohort]
    run_yaml = federated_yaml(args, out, len(cohort))

    def central(i: int) -> dict[str, Any]:
        return log.run(f"centralized MAE #{i + 1}", lambda: run_centralized(
            configs, args, steps, central_warmup_steps(args, len(configs)),
            out / ("central" if i == 0 else f"central-{i + 1}")))

    centrals, simulations = [central(0)], []
    for i in range(args.repeats):
        run_dir = out / ("federated" if i == 0 else f"federated-{i + 1}")
        with TreeCPU(avoid_core=core) as cpu:
            started, ended, _ = log.run(f"federated MAE simulation #{i + 1}",
                                        lambda d=run_dir: run_simulation(cohort, run_yaml, d))
        centrals.append(central(i + 1))
        simulations.append((run_dir, started, ended, cpu))
    costs = log.run("per-message costs", lambda: message_costs(cohort, args.preset))
    runs = [federated_costs(d, a, b, cpu, centrals[i : i + 2], costs, args)
            for i, (d, a, b, cpu) in enumerate(simulations)]
    mean = lambda f: float(np.mean([f(r) for r in runs]))
    with_fixed, without = mean(lambda r: r["ratio_with_fixed_cost"]), mean(lambda r: r["ratio_without_fixed_cost"])
    return {
        "sites": len(cohort), "rounds": args.rounds, "local_steps": args.local_steps, "batch_size": args.batch_size,
        "sample_steps": steps * args.batch_size, "centralized_steps": steps, "repeats": args.repeats,
        "centralized_runs": centrals, "federated_runs": runs, "message_costs": costs,
        "ratio_with_fixed_cost": with_fixed, "ratio_without_fixed_cost": without,
        "cpu_ratio_with_fixed_cost": mean(lambda r: r["cpu"]["ratio_with_fixed_cost"]),
        "cpu_ratio_without_fixed_cost": mean(lambda r: r["cpu"]["ratio_without_fixed_cost"]),
        "fixed_cost_s": mean(lambda r: r["timeline"]["fixed_cost_s"]),
        "target_ratio": TARGET_RATIO, "within_target_with_fixed_cost": with_fixed <= TARGET_RATIO,
        "within_target_without_fixed_cost": without <= TARGET_RATIO,
        "federated_final_checkpoint": str(out / "federated" / "checkpoints" / "mae" / "final.json"),
        "centralized_checkpoint": centrals[0]["checkpoint"],
    }


# --- part 2: bytes ---------------------------------------------------------------------------------------------


def wire_bytes(state: dict[str, torch.Tensor]) -> int:
    """The array payload of a message carrying `state`, as Flower serializes it (`Array.data`: each array
    in NumPy's .npy format, i.e. 4 bytes per fp32 element plus a header of ~128 bytes per array)."""
    from flwr.app import Array

    return sum(len(Array(np.ascontiguousarray(v.numpy())).data) for v in state.values())


def stage_sizes(preset: Preset) -> dict[str, dict[str, int]]:
    """Per stage (and for the frozen encoder): trainable parameters, what travels (parameters + buffers),
    and its exact serialized size."""
    sizes = {}
    for name in STAGE_NAMES:
        model = get_stage(name).build(preset)
        state = trainable_state(model)
        sizes[name] = {"trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                       "state_elements": sum(v.numel() for v in state.values()), "arrays": len(state),
                       "wire_bytes": wire_bytes(state)}
        if name == "mae":
            encoder = {k: v.detach().float() for k, v in model.encoder.state_dict().items()}
            sizes["encoder"] = {"trainable_parameters": sum(p.numel() for p in model.encoder.parameters()),
                                "state_elements": sum(v.numel() for v in encoder.values()), "arrays": len(encoder),
                                "wire_bytes": wire_bytes(encoder)}
    return sizes


def byte_accounting(run_dir: Path, preset: Preset) -> dict[str, Any]:
    messages = read_jsonl(run_dir / "messages.jsonl")
    sizes = stage_sizes(preset)
    table: dict[str, dict[str, Any]] = {}
    for stage in STAGE_NAMES:
        reference = 4 * sizes[stage]["trainable_parameters"]
        rows = defaultdict(lambda: {"to_site": [], "from_site": []})
        for m in messages:
            if m["stage"] != stage or m["type"] != "train" or "error" in m:
                continue
            arrays = sum(r["bytes"] for r in m["records"].values() if r["type"] == "arrays")
            rows[m["round"]]["to_site" if m["direction"] == "out" else "from_site"].append(arrays)
        per_round = {}
        for server_round, row in sorted(rows.items()):
            per_round[server_round] = {"to_each_site": sorted(set(row["to_site"])), "from_each_site": sorted(set(row["from_site"])),
                                       "sites": len(row["to_site"])}
        sent = [b for row in rows.values() for b in row["to_site"] + row["from_site"]]
        table[stage] = {
            "trainable_parameters": sizes[stage]["trainable_parameters"],
            "reference_bytes_4x_params": reference,
            "state_bytes_4x_elements": 4 * sizes[stage]["state_elements"],  # + buffers (DiT token statistics)
            "expected_wire_bytes": sizes[stage]["wire_bytes"],  # + .npy headers, one per array
            "per_round": per_round,
            "max_bytes_per_site_per_direction": max(sent) if sent else None,
            "ratio_to_4x_params": (max(sent) / reference) if sent else None,
            "evaluate_bytes_to_each_site": sorted({sum(r["bytes"] for r in m["records"].values() if r["type"] == "arrays")
                                                   for m in messages if m["stage"] == stage and m["type"] == "evaluate"
                                                   and m["direction"] == "out"}),
        }
    # The frozen encoder: every outgoing record that holds all of its arrays (bare names, as installed, or
    # `encoder.`-prefixed outside the MAE stage, whose own weights legitimately contain it).
    bare = {(k, tuple(v.shape)) for k, v in get_stage("mae").build(preset).encoder.state_dict().items()}
    prefixed = {(f"encoder.{k}", shape) for k, shape in bare}
    carried = defaultdict(list)
    for m in messages:
        if m["direction"] != "out" or "records" not in m:
            continue
        for name, record in m["records"].items():
            if record["type"] != "arrays":
                continue
            held = {(k, tuple(shape)) for k, (shape, _dtype) in record["arrays"].items()}
            if bare <= held or (m["stage"] != "mae" and prefixed <= held):
                carried[m["site"]].append({"stage": m["stage"], "round": m["round"], "type": m["type"], "record": name,
                                           "bytes": record["bytes"]})
    sites = sorted({m["site"] for m in messages if m.get("site")})
    in_later_rounds = [c for v in carried.values() for c in v if c["round"] > 0]
    table["encoder"] = {
        "bytes_4x_params": 4 * sizes["encoder"]["trainable_parameters"],
        "expected_wire_bytes": sizes["encoder"]["wire_bytes"],
        "deliveries_per_site": {s: len(carried.get(s, [])) for s in sites},
        "deliveries": {s: carried.get(s, []) for s in sites},
        "sent_once_per_site": all(len(carried.get(s, [])) == 1 for s in sites),
        "in_decoder_or_dit_rounds": in_later_rounds,
    }
    other = defaultdict(lambda: {"messages": 0, "array_bytes": 0})
    for m in messages:
        if m["type"] == "train" or "records" not in m:
            continue
        entry = other[f"{m['stage']}/{m['type']}/{m['direction']}"]
        entry["messages"] += 1
        entry["array_bytes"] += sum(r["bytes"] for r in m["records"].values() if r["type"] == "arrays")
    table["other_messages"] = dict(other)  # hello, encoder install, token moments, evaluation
    table["sizes"] = sizes
    return table


def bytes_run(args: argparse.Namespace, cohort: Sequence[Path], out: Path) -> dict[str, Any]:
    sites = fresh_cache_sites(cohort, out / "bytes-sites")  # no encoder installed yet anywhere
    run_yaml = write_run_yaml(out / "bytes.yaml", "bench-bytes", args.preset, args.seed, len(cohort), [
        {"name": "mae", "rounds": 2, "local_steps": 2, "batch_size": 2, "evaluate_every": 1},
        {"name": "decoder", "rounds": 2, "local_steps": 2, "batch_size": 2, "evaluate_every": 1},
        {"name": "dit", "rounds": 2, "local_steps": 2, "batch_size": 4, "evaluate_every": 1}])
    _, _, seconds = run_simulation(sites, run_yaml, out / "bytes")
    table = byte_accounting(out / "bytes", get_preset(args.preset))
    table["simulation_seconds"] = seconds
    later = table["encoder"]["in_decoder_or_dit_rounds"]
    assert not later, f"the encoder rode in decoder/DiT rounds: {later}"
    assert table["encoder"]["sent_once_per_site"], f"encoder deliveries per site: {table['encoder']['deliveries_per_site']}"
    for stage in STAGE_NAMES:  # each round moves exactly the stage's own weights, each way, per site
        for row in table[stage]["per_round"].values():
            assert row["to_each_site"] == row["from_each_site"] == [table[stage]["expected_wire_bytes"]], (stage, row)
    for deliveries in table["encoder"]["deliveries"].values():
        assert all(d["bytes"] == table["encoder"]["expected_wire_bytes"] for d in deliveries), deliveries
    return table


# --- part 3: quality --------------------------------------------------------------------------------------------


def with_seed(args: argparse.Namespace, seed: int) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "seed": seed})


def federated_yaml(args: argparse.Namespace, out: Path, sites: int, rounds: int | None = None) -> Path:
    """The MAE stage every federated run of the benchmark trains: `args.rounds` rounds, or `rounds` with the
    warm-up stretched in proportion (every site then warms up over the same number of its own steps)."""
    rounds = rounds or args.rounds
    warmup = args.warmup_rounds * rounds // args.rounds
    return write_run_yaml(out / f"federated-{rounds}-seed{args.seed}.yaml", "bench-federated", args.preset,
                          args.seed, sites, [
        {"name": "mae", "rounds": rounds, "local_steps": args.local_steps, "batch_size": args.batch_size,
         "lr": args.lr, "warmup_rounds": warmup, "evaluate_every": 0}])  # 0: validate after the last round


def train_for_quality(kind: str, args: argparse.Namespace, cohort: Sequence[Path], out: Path,
                      site: str | None = None) -> str:
    """One training of part 3 (a worker process): the final MAE checkpoint of `kind` for `args.seed`.

    federated: the real simulation (R rounds); federated_long: the real simulation for `--quality-rounds`;
    centralized: pooled training subjects; alone: one site's subjects for the centralized run's R·L·K
    steps and schedule."""
    steps, folder = args.rounds * args.local_steps * len(cohort), out / "quality" / f"seed{args.seed}"
    if kind in ("federated", "federated_long"):
        rounds = args.quality_rounds if kind == "federated_long" else args.rounds
        run_dir, run_yaml = folder / kind, federated_yaml(args, folder, len(cohort), rounds)
        if not (args.resume and finished_run(run_dir, run_yaml)):
            run_simulation(cohort, run_yaml, run_dir, resume=args.resume)
        return str(run_dir / "checkpoints" / "mae" / "final.json")
    configs = [SiteConfig.from_yaml(p) for p in cohort]
    chosen = [c for c in configs if site is None or c.site_id == site]
    target = folder / ("centralized" if site is None else f"alone-{site}")
    return run_centralized(chosen, args, steps, central_warmup_steps(args, len(cohort)), target,
                           resume=args.resume)["checkpoint"]


def finished_run(run_dir: Path, run_yaml: Path) -> bool:
    """Whether `run_dir` holds a completed simulation of exactly `run_yaml`'s recipe."""
    from braing3n_core.federation.run_config import RunConfig

    pinned = run_dir / "run.yaml"
    return ((run_dir / "run_complete.json").is_file() and pinned.is_file()
            and RunConfig.from_yaml(pinned).same_recipe(RunConfig.from_yaml(run_yaml)))


def _pin_worker(cores: Any) -> None:
    os.sched_setaffinity(0, {cores.get()})
    torch.set_num_threads(1)


def train_all(jobs: list[tuple[str, argparse.Namespace, str | None]], cohort: Sequence[Path], out: Path,
              cores: Sequence[int]) -> list[str]:
    """Every training of part 3, one worker per core in `cores`, each pinned to its own (spawned processes:
    Ray and torch do not survive a fork)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    free = context.Queue()
    for core in cores:
        free.put(core)
    with ProcessPoolExecutor(len(cores), mp_context=context, initializer=_pin_worker, initargs=(free,)) as pool:
        futures = [pool.submit(train_for_quality, kind, seeded, list(cohort), out, site)
                   for kind, seeded, site in jobs]
        return [f.result() for f in futures]


def probe_encoder(encoder, preset: Preset, data: Sequence[SiteData], seed: int, label: str) -> dict[str, Any]:
    """Every usable scan of every site → mean tokens → `run_probes` (subject-grouped 5-fold CV)."""
    from braing3n_core.data.tokens import TokenCache, encoder_sha256
    from braing3n_core.evaluation.features import pooled_features, probe_table
    from braing3n_core.evaluation.probe_tasks import ProbeTable
    from braing3n_core.evaluation.probes import run_probes

    features, records = [], []
    for site in data:
        cache = TokenCache(site.config.resolved_cache_dir, encoder, preset, site.cache)
        usable = cache.ensure(site.records, progress=False)
        features.append(pooled_features(cache, usable))
        records += usable
    table: ProbeTable = probe_table(records)
    pooled = np.concatenate(features).astype(np.float64)
    report = run_probes(pooled, table, folds=5, inner_folds=5, seed=seed, encoder=label)
    metrics = {k: float(v) for k, v in report.metrics().items()}
    spread = {k: float(v) for r in report.results for k, v in (r.fold_std or {}).items() if k in PROBE_METRICS}
    chance = {k: float(v) for r in report.results for k, v in r.chance.items() if k in PROBE_METRICS}
    return {"encoder_sha256": encoder_sha256(encoder), "scans": len(records), "subjects": len(set(table.subjects)),
            "metrics": {k: metrics[k] for k in PROBE_METRICS if k in metrics}, "fold_std": spread, "chance": chance,
            "feature_spectrum": feature_spectrum(pooled),
            "skipped": [{"task": s.task, "reason": s.reason} for s in report.skipped]}


def final_validation(checkpoint: Path) -> float:
    """The run's last validation masked L1, from the metrics.jsonl of the run folder holding `checkpoint`
    (federated: the example-weighted mean over all sites' validation subjects, i.e. the centralized run's
    pooled validation set; a site alone: its own validation subjects)."""
    rows = read_jsonl(checkpoint.parents[2] / "metrics.jsonl")
    return [r["val/masked_l1"] for r in rows if "val/masked_l1" in r and r.get("site", "aggregate") == "aggregate"][-1]


def initial_encoder(preset: Preset, seed: int) -> MAEEncoder:
    """The encoder every trainer of `seed` starts from (`train.initial_model`: seeded right before it is
    built; building any other model first, even one a checkpoint then overwrites, would shift it)."""
    from braing3n_core.training.checkpoints import initial_model

    return initial_model("mae", preset, seed).encoder.eval().requires_grad_(False)


def paired_interval(differences: Sequence[float]) -> dict[str, Any]:
    """Mean of per-seed paired differences with its 95% t-interval (nan with a single seed)."""
    from scipy import stats

    n, mean = len(differences), float(np.mean(differences))
    half = float(stats.t.ppf(0.975, n - 1) * np.std(differences, ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return {"per_seed": [float(d) for d in differences], "mean": mean, "ci95": [mean - half, mean + half]}


def feature_spectrum(features: np.ndarray) -> dict[str, float]:
    """How many directions the probe features use: the effective rank (exp of the entropy of the
    normalised eigenvalues; Roy & Vetterli 2007) of the standardised features' covariance, and the
    first principal component's share of the raw variance."""
    centered = features - features.mean(axis=0)
    spread = centered.std(axis=0)
    raw = np.linalg.svd(centered, compute_uv=False) ** 2
    scaled = np.linalg.svd(centered / np.where(spread > 0, spread, 1.0), compute_uv=False) ** 2
    p = scaled / scaled.sum()
    return {"effective_rank": float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())),
            "first_component_share": float(raw[0] / raw.sum())}


def _mean_sd(values: Sequence[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def summarize_quality(per_seed: dict[int, dict[str, Any]], sites: Sequence[str]) -> dict[str, Any]:
    """Means over training seeds per arm, and the verdicts on the targets, from each seed's probe results
    (every seed must hold the same arms; `federated_long` is judged too where present)."""
    seeds = sorted(per_seed)

    def values(name: str, metric: str) -> list[float]:
        return [per_seed[s][name]["metrics"][metric] for s in seeds]

    long = ["federated_long"] if all("federated_long" in per_seed[s] for s in seeds) else []
    names = ["federated", *long, "centralized", *[f"alone/{x}" for x in sites], "random_init"]
    # A task too small to probe (skipped, with its reason, in per_seed) drops out of the comparison.
    metrics = [m for m in PROBE_METRICS if all(m in per_seed[s][n]["metrics"] for s in seeds for n in names)]
    site_mean = {m: [float(np.mean([per_seed[s][f"alone/{x}"]["metrics"][m] for x in sites])) for s in seeds]
                 for m in metrics}
    summary = {name: {m: _mean_sd(values(name, m)) for m in metrics} for name in names}
    summary["mean_single_site"] = {m: _mean_sd(v) for m, v in site_mean.items()}
    cen, one = summary["centralized"], summary["mean_single_site"]
    mean = lambda row, m: row[m]["mean"] if m in row else math.nan  # nan compares False: no verdict

    def verdict(arm: str) -> dict[str, Any]:
        fed = summary[arm]
        return {
            "federated_beats_mean_single_site": {
                "age_mae": mean(fed, "probe/age_mae") < mean(one, "probe/age_mae"),
                "diagnosis_bacc": mean(fed, "probe/diagnosis_bacc") > mean(one, "probe/diagnosis_bacc")},
            # lower is better for MAE: federated ≤ 1.05 × centralized; higher is better for bAcc: ≥ 0.95 ×
            "federated_within_5pct_of_centralized": {
                "age_mae": mean(fed, "probe/age_mae") <= (1 + QUALITY_TOLERANCE) * mean(cen, "probe/age_mae"),
                "diagnosis_bacc": (mean(fed, "probe/diagnosis_bacc")
                                   >= (1 - QUALITY_TOLERANCE) * mean(cen, "probe/diagnosis_bacc"))},
            "federated_minus_centralized": {
                m: paired_interval([a - b for a, b in zip(values(arm, m), values("centralized", m))]) for m in metrics},
            "federated_minus_mean_single_site": {
                m: paired_interval([a - b for a, b in zip(values(arm, m), site_mean[m])]) for m in metrics},
        }

    return {"summary": summary, "verdict": verdict("federated"),
            **({"verdict_federated_long": verdict("federated_long")} if long else {})}


def quality(args: argparse.Namespace, cohort: Sequence[Path], data: Sequence[SiteData], part1: dict[str, Any] | None,
            out: Path, log: PhaseLog) -> dict[str, Any]:
    """Part 3 over `--quality-seeds` training seeds: one seed's runs differ from another's (and from a
    replay whose aggregation rounds differently) by as much as the arms differ, so the verdict is on the
    means over seeds. Each seed's probes use that seed's folds; part 1's runs are reused for its seed."""
    from braing3n_core.training.checkpoints import load_encoder

    preset = get_preset(args.preset)
    seeds = [int(s) for s in args.quality_seeds.split(",")]
    sites = [SiteConfig.from_yaml(p).site_id for p in cohort]
    jobs: list[tuple[str, argparse.Namespace, str | None]] = []
    for seed in seeds:
        reuse = part1 is not None and seed == args.seed
        kinds = [*([("federated_long", None)] if args.quality_rounds else []),
                 *([] if reuse else [("federated", None), ("centralized", None)]), *[("alone", s) for s in sites]]
        jobs += [(kind, with_seed(args, seed), site) for kind, site in kinds]
    jobs.sort(key=lambda job: job[0] != "federated_long")  # the longest trainings first: the pool ends sooner
    cores = args.cores[-min(args.jobs, len(jobs), len(args.cores)):]
    paths = iter(log.run(f"{len(jobs)} trainings for {len(seeds)} seeds on cores {cores}",
                         lambda: train_all(jobs, cohort, out, cores)))
    checkpoints: dict[int, dict[str, str]] = {seed: {} for seed in seeds}
    for kind, seeded, site in jobs:
        checkpoints[seeded.seed][kind if site is None else f"alone/{site}"] = next(paths)
    if part1 is not None and args.seed in checkpoints:
        checkpoints[args.seed] |= {"federated": part1["federated_final_checkpoint"],
                                   "centralized": part1["centralized_checkpoint"]}

    per_seed: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        encoders = {"random_init": initial_encoder(preset, seed)}
        encoders |= {name: load_encoder(Path(path)) for name, path in sorted(checkpoints[seed].items())}
        per_seed[seed] = {name: log.run(f"probes: seed {seed} {name}",
                                        lambda e=encoder, n=name, s=seed: probe_encoder(e, preset, data, s, n))
                          for name, encoder in encoders.items()}
        for name, path in checkpoints[seed].items():
            per_seed[seed][name]["final_val_masked_l1"] = final_validation(Path(path))

    return {"seeds": seeds, "training_steps_each": args.rounds * args.local_steps * len(cohort),
            "batch_size": args.batch_size, "lr": args.lr,
            "federated_rounds": {"federated": args.rounds, **({"federated_long": args.quality_rounds}
                                                               if args.quality_rounds else {})},
            **summarize_quality(per_seed, sites),
            "per_seed": {str(s): per_seed[s] for s in seeds}, "checkpoints": {str(s): c for s, c in checkpoints.items()},
            "protocol": "per training seed, all from that seed's initialisation with batch B and the same per-step "
                        "learning-rate schedule: federated (real simulation, R rounds of L steps per site), "
                        "centralized and each site alone R*L*K steps; federated_long (--quality-rounds N) N "
                        "rounds; all usable scans of all sites pooled; mean patch token per scan; "
                        "probes.run_probes 5-fold subject-grouped CV (inner 5-fold for the regularisation) with "
                        "that seed's folds, identical for every encoder; the verdict compares means over seeds"}


# --- main ---------------------------------------------------------------------------------------------------------


# Settings that change what part 3 measures: results to be combined must agree on them.
QUALITY_SETTINGS = ("preset", "sites", "subjects", "voxel_mm", "rounds", "local_steps", "batch_size", "lr",
                    "warmup_rounds", "seed", "quality_rounds")


def combine_results(paths: Sequence[Path]) -> dict[str, Any]:
    """Part 3 of several runs (other training seeds of the same cohort and recipe) judged together."""
    runs = [(path, json.loads(Path(path).read_text())) for path in paths]
    per_seed: dict[int, dict[str, Any]] = {}
    first_path, first = runs[0]
    for path, run in runs:
        if "quality" not in run:
            raise SystemExit(f"{path}: no quality part to combine")
        differ = {k: (first["settings"].get(k), run["settings"].get(k)) for k in QUALITY_SETTINGS
                  if first["settings"].get(k) != run["settings"].get(k)}
        if differ:
            raise SystemExit(f"{path}: settings differ from {first_path}'s: {differ}")
        for seed, arms in run["quality"]["per_seed"].items():
            if int(seed) in per_seed:
                raise SystemExit(f"{path}: training seed {seed} is also in an earlier file")
            per_seed[int(seed)] = arms
    sites = sorted(name.split("/", 1)[1] for name in per_seed[min(per_seed)] if name.startswith("alone/"))
    quality = {"seeds": sorted(per_seed), **{k: first["quality"][k] for k in
                                              ("training_steps_each", "batch_size", "lr", "federated_rounds")},
               **summarize_quality(per_seed, sites), "per_seed": {str(s): per_seed[s] for s in sorted(per_seed)},
               "protocol": first["quality"]["protocol"]}
    sources = [{"file": str(path), "seeds": run["quality"]["seeds"], "summary": run.get("summary"),
                "machine": {k: v for k, v in run.get("machine", {}).items() if k != "phases"}} for path, run in runs]
    return {"benchmark": "federation (part 3 combined)", "settings": {k: first["settings"].get(k)
                                                                     for k in QUALITY_SETTINGS},
            "sources": sources, "quality": quality}


def quality_line(q: dict[str, Any]) -> str:
    """The probe part of the summary line."""
    m = q["summary"]
    row = lambda k: "/".join(f"{m[n][k]['mean']:.3g}" for n in ("federated", "centralized", "mean_single_site",
                                                                 "random_init"))
    yes = lambda d: "/".join("yes" if x else "no" for x in d.values())
    v = q["verdict"]
    ci = v["federated_minus_centralized"]["probe/diagnosis_bacc"]["ci95"]
    parts = [f"probes, mean of {len(q['seeds'])} training seeds, fed (equal samples)/central/site-avg/random: age MAE "
             f"{row('probe/age_mae')}, dx bAcc {row('probe/diagnosis_bacc')}; fed beats site-avg "
             f"{yes(v['federated_beats_mean_single_site'])}, within 5% of central "
             f"{yes(v['federated_within_5pct_of_centralized'])} (age/dx); fed - central dx bAcc 95% CI "
             f"[{ci[0]:.3f}, {ci[1]:.3f}]"]
    if "federated_long" in m:
        w = q["verdict_federated_long"]
        ci = w["federated_minus_centralized"]["probe/diagnosis_bacc"]["ci95"]
        parts.append(f"fed {q['federated_rounds']['federated_long']} rounds (equal per-site steps): age MAE "
                     f"{m['federated_long']['probe/age_mae']['mean']:.3g}, dx bAcc "
                     f"{m['federated_long']['probe/diagnosis_bacc']['mean']:.3g}; beats site-avg "
                     f"{yes(w['federated_beats_mean_single_site'])}, within 5% "
                     f"{yes(w['federated_within_5pct_of_centralized'])}; - central dx bAcc 95% CI "
                     f"[{ci[0]:.3f}, {ci[1]:.3f}]")
    return "; ".join(parts)


def summary_line(result: dict[str, Any]) -> str:
    machine = result["machine"]
    parts = [(f"federation bench ({machine['cpu_count']} CPUs, pinned to core {machine['pinned_core']}, load "
              f"{machine['load_average_before'][0]:.1f}->{machine['load_average_after'][0]:.1f})")]
    o = result.get("overhead")
    if o:
        federated = "/".join(f"{r['timeline']['total_s']:.0f}" for r in o["federated_runs"])
        central = "/".join(f"{c['seconds']:.0f}" for c in o["centralized_runs"])
        parts.append(
            f"K={o['sites']} {result['settings']['preset']} MAE {o['rounds']}x{o['local_steps']}x{o['batch_size']}: "
            f"federated {federated} s (fixed {o['fixed_cost_s']:.0f} s) vs centralized {central} s, alternating: "
            f"wall {o['ratio_with_fixed_cost']:.2f}x with / {o['ratio_without_fixed_cost']:.2f}x without fixed cost "
            f"(target {TARGET_RATIO}); CPU seconds {o['cpu_ratio_with_fixed_cost']:.2f}x / "
            f"{o['cpu_ratio_without_fixed_cost']:.2f}x")
    b = result.get("bytes")
    if b:
        ratios = " ".join(f"{s} {b[s]['ratio_to_4x_params']:.3f}" for s in STAGE_NAMES)
        parts.append(f"bytes/site/round ÷ 4·params: {ratios}; encoder once per site: "
                     f"{'yes' if b['encoder']['sent_once_per_site'] else 'NO'}")
    if result.get("quality"):
        parts.append(quality_line(result["quality"]))
    parts.append(f"{result['seconds']:.0f} s")
    return "; ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="tiny (default): the small preset's MAE steps cost ~2 s "
                        "each on one loaded core, too slow for the 7 trainings of this benchmark")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--subjects", type=int, default=30, help="subjects per site")
    parser.add_argument("--voxel-mm", type=float, default=4.0, help="cohort simulation grid (tiny works at 4 mm)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=75, help="10 rounds x 75 steps x 4 sites = 3000 steps "
                        "of batch 8: what the tiny MAE needs to learn (tests/test_evaluation.py)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak MAE learning rate of both arms (the stage "
                        "default, 1.5e-4, leaves the tiny MAE predicting zero; see README, probes)")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="federated warm-up rounds; centralized runs "
                        "warm up over the same number of samples")
    parser.add_argument("--repeats", type=int, default=2, help="federated runs, alternating with centralized ones")
    parser.add_argument("--core", type=int, default=None, help="CPU to pin everything to (default: the last one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/federation-bench")
    parser.add_argument("--quality-seeds", default=",".join(map(str, range(10))), help="training seeds of part 3 "
                        "(comma-separated); fewer than ~10 cannot resolve a 0.02 difference in diagnosis bAcc")
    parser.add_argument("--quality-rounds", type=int, default=None, help="rounds of part 3's federated arm at "
                        "equal per-site compute (default R*K: each site performs as many steps as the "
                        "centralized run; 0: leave the arm out)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="part 3 trainings at a time, one "
                        "core each (parts 1 and 2 stay pinned to --core)")
    parser.add_argument("--skip-overhead", action="store_true", help="part 3 then trains its own runs for every seed")
    parser.add_argument("--skip-bytes", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON goes (a run of other "
                        "seeds or parts only should not replace the full run's file)")
    parser.add_argument("--resume", action="store_true", help="part 3 reuses the trainings already complete "
                        "in --out and continues stopped ones (same arguments; a stopped training resumes from "
                        "its last checkpoint, so it is not bit-identical to an uninterrupted one)")
    parser.add_argument("--combine", nargs="+", type=Path, metavar="RESULTS", help="judge part 3 of these "
                        "result files (other seeds of the same cohort and recipe) together; writes --results")
    args = parser.parse_args()
    if args.combine:
        combined = combine_results(args.combine)
        combined["summary"] = quality_line(combined["quality"])
        atomic_write_json(Path(args.results), combined)
        print(combined["summary"])
        return 0

    if args.quality_rounds is None:
        args.quality_rounds = args.rounds * args.sites
    args.cores = sorted(os.sched_getaffinity(0))  # part 3's workers may use them all
    core = pin_to_core(args.core)
    load_before, started = load_average(), time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = PhaseLog()
    cohort = log.run("cohort", lambda: make_cohort(out, args.sites, args.subjects, args.seed, args.voxel_mm))
    data = log.run("site checks + preprocessing cache", lambda: warm_caches(cohort, get_preset(args.preset)))
    result: dict[str, Any] = {"benchmark": "federation", "settings": vars(args), "method": {
        "compute": f"everything pinned to CPU core {core}, one torch thread per process; Flower's own processes "
                   "share that core, so their CPU counts as overhead",
        "centralized_timed": "train_centralized(mae) call: site checks on a warm preprocessing cache, loader, "
                             "R*L*K steps of batch B, checkpoints every 100 steps, final validation; run before "
                             "and after the simulation, the ratio uses their mean",
        "federated_timed": "simulate() call: SuperLink, flwr run, Ray, ServerApp, R rounds (each site: data "
                           "check, L steps of batch B), round checkpoints, final federated validation, shutdown",
        "fixed_cost": "start-up up to the first train message (SuperLink, flwr run + app install, Ray, ServerApp, "
                      "Ray actors, ClientApp import, the hello handshake with one data check per site) + shutdown",
        "cpu_seconds": "process CPU time (centralized) vs CPU time of the benchmark's whole process tree sampled "
                       "from /proc (federated), split by process kind and phase",
        "bytes": "array payload of each message as recorded by the server in messages.jsonl (Array.data: .npy "
                 "per array, 4 bytes per fp32 element + ~128-byte header); config records are not counted",
        "quality": "linear probes on pooled mean tokens of every usable scan of all sites, 5-fold subject-grouped "
                   "CV, identical for every encoder; all trainings start from the same seeded initialisation",
    }}
    result["cohort"] = {d.config.site_id: {"scans": len(d.records), **{k: len(v) for k, v in d.splits.items()}}
                        for d in data}
    if not args.skip_overhead:
        result["overhead"] = overhead(args, cohort, out, log, core)
    if not args.skip_bytes:
        result["bytes"] = log.run("bytes simulation (mae → decoder → dit)", lambda: bytes_run(args, cohort, out))
    if not args.skip_quality:
        result["quality"] = quality(args, cohort, data, result.get("overhead"), out, log)
    result["seconds"] = time.perf_counter() - started
    result["machine"] = {**machine_info(load_before), **versions(), "pinned_core": core, "phases": log.phases}
    line = summary_line(result)
    result["summary"] = line
    atomic_write_json(Path(args.results), result)
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
