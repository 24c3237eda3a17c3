"""Scaling out: a site's local steps on 1 vs 2 gloo workers, what a round's process group costs, and a Flower
simulation on a two-node Ray cluster against the same simulation on this machine's own Ray.

1. **Site-local step throughput.** The real `federation.site_round.train_site_round` of each stage (a site
   of the synthetic cohort, the preset's shapes, the stage's own data and augmentation), with
   `workers: 1` and `workers: 2` (gloo, one intra-op thread per worker), and one process with two threads
   for reference. Volumes/s = training examples / the round's `train/seconds` (the loop only: start-up is
   item 2). The goal is 2 workers ≥ 1.7× one worker where the cores are free. The ceiling: each worker
   does half the examples' forward/backward, but every step also all-reduces the gradients (one bucket at
   these sizes: latency-bound on gloo over loopback, roughly the model's bytes twice through memory) and
   waits for the slower worker (with an odd global batch one worker has one more example), while the
   optimizer update is repeated in full on every worker; on a 2-core machine shared with other jobs, any
   other load takes a worker's core.
2. **Process-group start-up per round.** `train/startup_s` (from the call until every worker has joined
   the group) of successive data-parallel rounds in one process: the first round starts the forkserver
   (Python, torch and MONAI imports), later ones only fork and form the group; and the same first round
   in a fresh process, which is what a deployed site pays every round (Flower starts a new ClientApp
   process per message). Also each round's whole overhead: its wall time minus its training loop.
3. **Ray-cluster simulation overhead.** The same `braing3n simulate` run (2 sites, `--sim-rounds` MAE
   rounds of the `tiny` preset) on this machine's own Ray, then with `--ray-address` on a two-node Ray
   cluster started here (`ray start --head` and a second `ray start --address`, one CPU each, stopped by
   PID): wall times and their difference, alternated `--repeats` times.

Prints one summary line; writes bench/results/scale.json (machine block with load averages).

    python bench/bench_scale.py [--preset small] [--stages mae,decoder,dit] [--steps 8] [--batch 4]
                                [--rounds 3] [--sim-rounds 3] [--repeats 1] [--data FOLDER] [--skip-ray]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cohort_sites, load_average, machine_info  # noqa: E402
from braing3n_core.data.datasets import load_site  # noqa: E402
from braing3n_core.data.tokens import TokenCache  # noqa: E402
from braing3n_core.federation.protocol import RoundParams  # noqa: E402
from braing3n_core.federation.site_round import train_site_round  # noqa: E402
from braing3n_core.fileio import atomic_write_json  # noqa: E402
from braing3n_core.ops.flower import free_port, kill_process_tree  # noqa: E402
from braing3n_core.ops.simulate import RAY_ENV, start_ray_node  # noqa: E402
from braing3n_core.presets import get_preset  # noqa: E402
from braing3n_core.site_config import SiteConfig  # noqa: E402
from braing3n_core.training.examples import SiteInputs, token_moments  # noqa: E402
from braing3n_core.training.stages import get_stage, stage_dataset  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "scale.json"


# --- the site -------------------------------------------------------------------------------------------------


def prepare_site(site_yaml: Path, preset_name: str, cache: Path) -> SiteInputs:
    """One cohort site, its caches in `cache`, with the token cache of a seeded untrained encoder."""
    config = SiteConfig.from_yaml(site_yaml).model_copy(update={"cache_dir": cache})
    preset = get_preset(preset_name)
    data = load_site(config, preset, progress=False)
    torch.manual_seed(0)
    encoder = get_stage("mae").build(preset).encoder
    return SiteInputs(data, TokenCache(config.resolved_cache_dir, encoder, preset, data.cache))


def start_model(stage_name: str, site: SiteInputs) -> torch.nn.Module:
    stage = get_stage(stage_name)
    torch.manual_seed(1)
    model = stage.build(site.data.preset)
    if stage_name == "dit":
        model.set_token_statistics(*token_moments(stage_dataset(stage, [site], "train"), model.config.token_dim).mean_std())
    return model


def one_round(site: SiteInputs, stage_name: str, workers: int, threads: int, args: argparse.Namespace,
              server_round: int = 1) -> dict[str, float]:
    torch.set_num_threads(threads)
    config = site.data.config.model_copy(update={"workers": workers})
    params = RoundParams(stage=stage_name, server_round=server_round, local_steps=args.steps, batch_size=args.batch,
                         lr=1e-4, weight_decay=0.0, seed=0, timeout_s=3600)
    started = time.perf_counter()
    _, metrics = train_site_round(get_stage(stage_name), start_model(stage_name, site),
                                  SiteInputs(replace(site.data, config=config), site.tokens), params, torch.device("cpu"))
    wall = time.perf_counter() - started
    return {"workers": workers, "threads_per_worker": threads, "volumes_per_s": metrics["train/examples"] / metrics["train/seconds"],
            "train_seconds": metrics["train/seconds"], "startup_s": metrics["train/startup_s"], "round_wall_s": wall,
            "overhead_s": wall - metrics["train/seconds"], "examples": metrics["train/examples"]}


def throughput(site: SiteInputs, args: argparse.Namespace) -> dict[str, Any]:
    """Per stage: 1 worker × 1 thread, 2 workers × 1 thread, 1 worker × 2 threads (after one untimed round
    of each, which also starts the forkserver)."""
    out: dict[str, Any] = {}
    for stage in args.stages:
        print(f"[throughput] {stage} …", file=sys.stderr, flush=True)
        one_round(site, stage, 2, 1, args)  # warm: forkserver, imports, caches
        one_round(site, stage, 1, 1, args)
        runs = {"1x1": [], "2x1": [], "1x2": []}
        for _ in range(args.repeats):  # alternated, so load drifts hit every setting alike
            runs["1x1"].append(one_round(site, stage, 1, 1, args))
            runs["2x1"].append(one_round(site, stage, 2, 1, args))
            runs["1x2"].append(one_round(site, stage, 1, 2, args))
        best = {k: max(v, key=lambda r: r["volumes_per_s"]) for k, v in runs.items()}
        out[stage] = {"runs": runs, "best": best,
                      "ratio_2_workers_vs_1": best["2x1"]["volumes_per_s"] / best["1x1"]["volumes_per_s"],
                      "ratio_1_process_2_threads_vs_1": best["1x2"]["volumes_per_s"] / best["1x1"]["volumes_per_s"]}
    return out


def startup(site: SiteInputs, args: argparse.Namespace, site_yaml: Path, cache: Path) -> dict[str, Any]:
    """Successive data-parallel rounds in a fresh process (the first starts the forkserver), as a simulated
    site's Ray actor runs them; a deployed site runs every round in a fresh process, i.e. always the first."""
    command = [sys.executable, __file__, "--rounds-only", "--site-yaml", str(site_yaml), "--cache", str(cache),
               "--preset", args.preset, "--stages", args.stages[0], "--steps", str(args.steps), "--batch",
               str(args.batch), "--rounds", str(args.rounds)]
    print(f"[startup] {args.rounds} rounds of {args.stages[0]} in a fresh process …", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"rounds-only child failed: {done.stderr[-2000:]}")
    rounds = json.loads(done.stdout.strip().splitlines()[-1])
    later = [r["startup_s"] for r in rounds[1:]]
    return {"stage": args.stages[0], "rounds": rounds, "first_round_startup_s": rounds[0]["startup_s"],
            "later_rounds_startup_s": sum(later) / len(later) if later else None,
            "first_round_overhead_s": rounds[0]["overhead_s"],
            "later_rounds_overhead_s": sum(r["overhead_s"] for r in rounds[1:]) / len(later) if later else None}


def rounds_only(args: argparse.Namespace) -> int:
    site = prepare_site(Path(args.site_yaml), args.preset, Path(args.cache))
    rounds = [one_round(site, args.stages[0], 2, 1, args, server_round=r) for r in range(1, args.rounds + 1)]
    print(json.dumps(rounds))
    return 0


# --- simulation: local Ray vs a two-node Ray cluster ------------------------------------------------------------


def simulate_once(sites: list[Path], run_yaml: Path, out: Path, address: str | None) -> dict[str, Any]:
    command = [sys.executable, "-m", "braing3n_core", "-q", "simulate", "--sites", *map(str, sites), "--run-config",
               str(run_yaml), "--out", str(out)] + (["--ray-address", address] if address else [])
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600, env={**os.environ, **RAY_ENV},
                          check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"simulate ({'cluster' if address else 'local'}) failed: {done.stdout[-1500:]}{done.stderr[-1500:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    trains = [r for r in lines if r.get("kind") == "train" and r.get("site") == "aggregate" and r.get("stage") == "mae"]
    rounds = sorted(r["time"] for r in trains)
    return {"wall_s": wall, "rounds": len(trains),
            "seconds_per_round": (rounds[-1] - rounds[0]) / (len(rounds) - 1) if len(rounds) > 1 else None,
            "nodes": sorted({r.get("worker", "").rsplit("/ray:", 1)[-1] for r in lines
                             if r.get("kind") == "train" and r.get("site") != "aggregate"})}


def ray_overhead(sites: list[Path], args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    run = {"name": "scale", "preset": "tiny", "seed": 0, "min_sites": 2, "round_timeout_s": 600,
           "stages": [{"name": "mae", "rounds": args.sim_rounds, "local_steps": 2, "batch_size": 2, "evaluate_every": 0}],
           "probes": {"enabled": False}}
    run_yaml = scratch / "sim.yaml"
    run_yaml.write_text(yaml.safe_dump(run))
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes: list[subprocess.Popen] = []
    results: dict[str, list[dict[str, Any]]] = {"local": [], "cluster": []}
    try:
        print("[ray] starting a two-node cluster …", file=sys.stderr, flush=True)
        started = time.perf_counter()
        nodes.append(start_ray_node(["--head", "--port", str(port), "--num-cpus", "1", "--include-dashboard", "false"],
                                    scratch / "head.log"))
        nodes.append(start_ray_node(["--address", address, "--num-cpus", "1"], scratch / "second.log"))
        cluster_start = time.perf_counter() - started
        for repeat in range(args.repeats):
            for where, ray_address in (("local", None), ("cluster", address)):
                print(f"[ray] simulate {where} ({repeat + 1}/{args.repeats}) …", file=sys.stderr, flush=True)
                out = scratch / f"run-{where}-{repeat}"
                shutil.rmtree(out, ignore_errors=True)
                results[where].append(simulate_once(sites, run_yaml, out, ray_address))
    finally:
        for node in reversed(nodes):
            kill_process_tree(node.pid)
            node.wait()
    best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in results.items()}
    per_round = {k: v["seconds_per_round"] for k, v in best.items()}
    # A local run starts (and stops) its own Ray inside `simulate`; the cluster was started beforehand, so
    # its start is reported beside the run rather than inside it. Per-round times compare the rounds alone.
    return {"runs": results, "cluster_start_s": cluster_start, "sim_rounds": args.sim_rounds,
            "overhead_s": best["cluster"]["wall_s"] - best["local"]["wall_s"],
            "overhead_ratio": best["cluster"]["wall_s"] / best["local"]["wall_s"],
            "overhead_with_cluster_start_s": best["cluster"]["wall_s"] + cluster_start - best["local"]["wall_s"],
            "seconds_per_round": per_round,
            "per_round_ratio": (per_round["cluster"] / per_round["local"]
                                if per_round["cluster"] and per_round["local"] else None)}


# --- main -------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="preset of the throughput and start-up parts")
    parser.add_argument("--stages", default="mae,decoder,dit", help="stages of the throughput part (first: start-up)")
    parser.add_argument("--steps", type=int, default=8, help="local steps per round")
    parser.add_argument("--batch", type=int, default=4, help="global batch (split over the workers)")
    parser.add_argument("--rounds", type=int, default=3, help="successive data-parallel rounds for the start-up part")
    parser.add_argument("--sim-rounds", type=int, default=3, help="MAE rounds of each simulation")
    parser.add_argument("--repeats", type=int, default=1, help="alternated repetitions of each measurement")
    parser.add_argument("--data", type=Path, default=None, help="cohort folder (default: a temporary one)")
    parser.add_argument("--subjects", type=int, default=8, help="subjects per site of a generated cohort")
    parser.add_argument("--skip-ray", action="store_true", help="leave out the Ray-cluster part")
    parser.add_argument("--out", type=Path, default=RESULTS, help="result JSON")
    parser.add_argument("--rounds-only", action="store_true", help=argparse.SUPPRESS)  # the fresh-process child
    parser.add_argument("--site-yaml", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.stages = [s for s in args.stages.split(",") if s]
    if args.rounds_only:
        return rounds_only(args)

    load_before, started = load_average(), time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="braing3n-bench-scale-"))
    try:
        folder = args.data or scratch / "cohort"
        voxel_mm = min(4.0, get_preset(args.preset).spacing_mm * 2)
        sites, _ = cohort_sites(folder, sites=2, subjects=args.subjects, seed=0, voxel_mm=voxel_mm)
        cache = scratch / "cache"
        site = prepare_site(sites[0], args.preset, cache)
        document: dict[str, Any] = {"preset": args.preset, "steps": args.steps, "global_batch": args.batch,
                                    "throughput": throughput(site, args),
                                    "startup": startup(site, args, sites[0], cache)}
        document["ray"] = {"skipped": True} if args.skip_ray else ray_overhead(sites, args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    document |= {"seconds": time.perf_counter() - started, "machine": machine_info(load_before)}
    atomic_write_json(args.out, document)
    print(summary(document) + f" -> {args.out}")
    return 0


def summary(document: dict[str, Any]) -> str:
    machine = document["machine"]
    ratios = ", ".join(f"{stage} {r['best']['1x1']['volumes_per_s']:.2f}→{r['best']['2x1']['volumes_per_s']:.2f} vol/s "
                       f"({r['ratio_2_workers_vs_1']:.2f}×)" for stage, r in document["throughput"].items())
    start = document["startup"]
    later = start["later_rounds_startup_s"]
    later_text = f" / {later:.2f} s later rounds" if later is not None else ""
    text = (f"scale bench ({machine['cpu_count']} CPUs, load {machine['load_average_before'][0]:.1f}->"
            f"{machine['load_average_after'][0]:.1f}, {document['preset']}): 2 gloo workers vs 1: {ratios}; "
            f"group start-up {start['first_round_startup_s']:.2f} s first round{later_text}")
    ray = document["ray"]
    if not ray.get("skipped"):
        local, cluster = (min(r["wall_s"] for r in ray["runs"][k]) for k in ("local", "cluster"))
        rounds = ray["per_round_ratio"]
        text += (f"; simulation on a 2-node Ray cluster {cluster:.0f} s vs local Ray {local:.0f} s "
                 f"(cluster started beforehand in {ray['cluster_start_s']:.0f} s"
                 + (f"; per round {rounds:.2f}×)" if rounds else ")"))
    return text + f"; {document['seconds']:.0f} s"


if __name__ == "__main__":
    sys.exit(main())
