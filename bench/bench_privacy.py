"""Privacy benchmark: the cost of DP-SGD per step, and the privacy–utility trade-off.

Part 1, **step time** (target: DP-SGD ≤ 2× the non-private step, per stage). For each stage the same
fixed batches (the stage's default batch size, random data of the preset's shapes) go through the one
shared `stages.train_steps`: once with AdamW and the global clip, once with Opacus' per-sample hooks
and the DP optimizer (`privacy.dp.make_private`). Blocks of steps alternate between the two modes and
the median step time of each is compared, all within this one process, so machine load hits both.

Part 2, **privacy–utility** on the synthetic cohort. For each ε in `--epsilons` (∞ = no DP), the MAE
and the decoder (and with `--with-dit` the DiT) are trained federated over the cohort's sites, in
process: each round every site runs `federated.train_site_round` (subject-level DP-SGD with a target ε
per stage, its ledger on disk), and the server averages the weights (FedAvg, weighted by examples).
The target ε is split evenly over the trained stages; the table reports the ε the sites' ledgers
actually reached. Utility: linear probes on the frozen encoder's pooled tokens (fit on train + val
subjects, scored on the held-out test subjects of every site: age MAE, diagnosis balanced accuracy),
the decoder's validation PSNR / SSIM, and (with `--with-dit`) the DiT's validation flow loss.

Prints one summary line; writes bench/results/privacy.json (with the load average: the machine is shared).

    python bench/bench_privacy.py [--timing-preset small] [--timing-stages mae,decoder,dit] [--preset tiny] [--sites 4] [--subjects 16]
                                  [--rounds 6] [--local-steps 4] [--epsilons 1,8,inf] [--with-dit]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import load_average, machine_info
from braing3n_core.fileio import atomic_write_json
from braing3n_core.presets import Preset, get_preset
from braing3n_core.site_config import SiteConfig
from braing3n_core.stage_names import STAGE_NAMES
from braing3n_core.training.examples import SiteInputs
from braing3n_core.training.loop import make_optimizer, train_steps
from braing3n_core.training.stages import get_stage

RESULTS = Path(__file__).resolve().parent / "results" / "privacy.json"
TARGET_RATIO = 2.0
warnings.filterwarnings("ignore", message="Full backward hook is firing")
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")


# --- part 1: step time ---------------------------------------------------------------------------------------


def random_batch(stage: str, preset: Preset, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    from braing3n_core.labels import Modality, ScanLabels
    from braing3n_core.models.conditions import conditions_from_labels

    volume = torch.randn(batch, 1, *preset.shape, generator=generator)
    tokens = torch.randn(batch, preset.num_tokens, preset.mae.width, generator=generator)
    if stage == "mae":
        return {"volume": volume}
    if stage == "decoder":
        return {"tokens": tokens, "volume": volume}
    labels = [ScanLabels(age=60.0 + i, sex="F" if i % 2 else "M", diagnosis="CN", mmse=29.0, field_strength=3.0)
              for i in range(batch)]
    cond = conditions_from_labels(labels, [Modality.T1W] * batch)
    half = batch // 2  # half longitudinal pairs, half cross-sectional, as in the DiT dataset
    baseline = torch.randn_like(tokens)
    baseline[half:] = math.nan
    interval = torch.full((batch,), math.nan)
    interval[:half] = 1.5
    return {"tokens": tokens, "baseline": baseline, "interval": interval, **cond.tensors()}


def time_steps(stage_name: str, preset: Preset, steps: int, blocks: int) -> dict[str, float]:
    from braing3n_core.privacy.dp import DPRound, make_private
    from braing3n_core.privacy.ledger import Release

    stage = get_stage(stage_name)
    batch_size = stage.defaults.batch_size
    generator = torch.Generator().manual_seed(0)
    batches = [random_batch(stage_name, preset, batch_size, generator) for _ in range(steps)]
    device = torch.device("cpu")
    times: dict[str, list[float]] = {"plain": [], "dp": []}
    models = {}
    for mode in ("plain", "dp"):
        torch.manual_seed(0)
        model = stage.build(preset)
        optimizer = make_optimizer(model, 1e-4, stage.defaults.weight_decay)
        if mode == "dp":
            settings = DPRound(Release(stage_name, 1, batch_size / 64, 1.0, steps, 1.0, 64), 1e-5)
            optimizer = make_private(model, optimizer, settings).optimizer
        models[mode] = (model, optimizer)
    for block in range(blocks + 1):  # block 0 warms both up and is not counted
        for mode in ("plain", "dp"):
            model, optimizer = models[mode]
            stamps: list[float] = [time.perf_counter()]
            train_steps(stage, model, iter(batches), optimizer, steps, lambda _: 1e-4, device,
                        generator=torch.Generator().manual_seed(block), max_grad_norm=None if mode == "dp" else 1.0,
                        on_step=lambda _i, _loss, _n, stamps=stamps: stamps.append(time.perf_counter()))
            if block:
                times[mode].extend(np.diff(stamps).tolist())
    plain, dp = statistics.median(times["plain"]), statistics.median(times["dp"])
    return {"batch_size": batch_size, "plain_s": plain, "dp_s": dp, "ratio": dp / plain, "steps_timed": len(times["dp"])}


# --- part 2: privacy–utility ------------------------------------------------------------------------------


def make_cohort(out: Path, sites: int, subjects: int, seed: int) -> list[Path]:
    from braing3n_core.data.cohort import CohortSpec
    from braing3n_core.data.cohort import make_cohort as generate

    existing = sorted((out / "cohort" / "sites").glob("*.yaml"))
    if len(existing) == sites:
        return existing
    return generate(CohortSpec(n_sites=sites, subjects_per_site=subjects, seed=seed, voxel_mm=4.0, progress=False),
                    out_dir=out / "cohort")


def site_configs(cohort: list[Path], out: Path, epsilon: float, stages: list[str]) -> list[SiteConfig]:
    configs = []
    for path in cohort:
        site = SiteConfig.from_yaml(path)
        data = {**site.to_yaml_dict(), "cache_dir": str(out / "cache" / site.site_id)}
        if math.isfinite(epsilon):
            share = epsilon / len(stages)
            data["privacy"] = {"enabled": True, "epsilon_budget": epsilon * 1.5,
                               "ledger": str(out / f"ledgers-eps{epsilon:g}" / f"{site.site_id}.jsonl"),
                               "stages": {s: {"target_epsilon": share, "max_grad_norm": 1.0} for s in stages}}
        target = out / "sites" / f"eps{epsilon:g}" / f"{site.site_id}.yaml"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(yaml.safe_dump(data))
        configs.append(SiteConfig.from_yaml(target))
    return configs


def fedavg(replies: list[tuple[dict[str, np.ndarray], dict[str, float]]]) -> dict[str, np.ndarray]:
    total = sum(m["num-examples"] for _, m in replies)
    return {k: sum(a[k].astype(np.float64) * (m["num-examples"] / total) for a, m in replies).astype(np.float32)
            for k in replies[0][0]}


def train_federated(stage_name: str, sites: list[SiteInputs], preset: Preset, rounds: int, local_steps: int,
                    seed: int, model: torch.nn.Module | None = None) -> torch.nn.Module:
    from braing3n_core.federation.arrays import load_arrays, module_arrays
    from braing3n_core.federation.protocol import RoundParams
    from braing3n_core.federation.site_round import train_site_round
    from braing3n_core.runtime import cosine_lr

    stage = get_stage(stage_name)
    torch.manual_seed(seed)
    model = model if model is not None else stage.build(preset)
    arrays = module_arrays(model)
    for server_round in range(1, rounds + 1):
        lr = cosine_lr(stage.defaults.lr * 3, server_round - 1, rounds)  # few rounds: a higher peak rate
        params = RoundParams(stage=stage_name, server_round=server_round, local_steps=local_steps,
                             batch_size=stage.defaults.batch_size, lr=lr, weight_decay=stage.defaults.weight_decay,
                             seed=seed, rounds=rounds, run="bench")
        replies = [train_site_round(stage, load_arrays(stage.from_config(stage.model_config(model)), arrays), site,
                                    params, torch.device("cpu")) for site in sites]
        arrays = fedavg(replies)
    return load_arrays(model, arrays)


def probe_quality(sites: list[SiteInputs]) -> dict[str, float]:
    from braing3n_core.evaluation.features import pooled_features, probe_table
    from braing3n_core.evaluation.probe_splits import SubjectSplit
    from braing3n_core.evaluation.probe_tasks import ProbeTable
    from braing3n_core.evaluation.probes import run_probes

    features, tables, fit = [], [], []
    for site in sites:
        records = site.tokens.ensure(site.data.splits["train"] + site.data.splits["val"] + site.data.splits["test"])
        test = {r.path for r in site.data.splits["test"]}
        features.append(pooled_features(site.tokens, records))
        tables.append(probe_table(records))
        fit.extend(r.path not in test for r in records)
    table = ProbeTable(tuple(s for t in tables for s in t.samples))
    fit_mask = np.array(fit, dtype=bool)
    split = SubjectSplit.from_masks(fit_mask, ~fit_mask, table.subjects)
    report = run_probes(np.concatenate(features), table, split=split, inner_folds=3)
    out = {}
    for result in report.results:
        out |= {k: float(v) for k, v in result.metrics.items()}
    return out


def utility_at(epsilon: float, cohort: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    from braing3n_core.data.datasets import load_site
    from braing3n_core.data.tokens import TokenCache
    from braing3n_core.federation.site_round import site_ledger
    from braing3n_core.training.examples import token_moments
    from braing3n_core.training.loop import evaluate, make_loader
    from braing3n_core.training.stages import stage_dataset

    started = time.perf_counter()
    preset = get_preset(args.preset)
    stages = ["mae", "decoder"] + (["dit"] if args.with_dit else [])
    configs = site_configs(cohort, Path(args.out), epsilon, stages)
    data = [load_site(c, preset, progress=False) for c in configs]
    mae = train_federated("mae", [SiteInputs(d) for d in data], preset, args.rounds, args.local_steps, args.seed)
    encoder = mae.encoder.eval().requires_grad_(False)
    sites = [SiteInputs(d, TokenCache(d.config.resolved_cache_dir, encoder, preset, d.cache)) for d in data]
    result: dict[str, Any] = {"epsilon_target": epsilon if math.isfinite(epsilon) else None}
    result |= {f"probe/{k.split('/', 1)[-1]}": v for k, v in probe_quality(sites).items()
               if k.split("/", 1)[-1].startswith(("age_mae", "age_r2", "diagnosis_bacc", "sex_bacc", "modality_bacc"))}
    decoder = train_federated("decoder", sites, preset, args.rounds, args.local_steps, args.seed)
    val = stage_dataset(get_stage("decoder"), sites, "val")
    result |= {k: v for k, v in evaluate(get_stage("decoder"), decoder, make_loader(val, 4, False, 0),
                                         torch.device("cpu")).items() if k in ("val/psnr", "val/ssim", "val/l1")}
    if args.with_dit:
        dit_stage = get_stage("dit")
        dit = dit_stage.build(preset)
        dit.set_token_statistics(*token_moments(stage_dataset(dit_stage, sites, "train"), dit.config.token_dim).mean_std())
        dit = train_federated("dit", sites, preset, args.rounds, args.local_steps, args.seed, model=dit)
        val = stage_dataset(dit_stage, sites, "val")
        result["val/flow_loss"] = evaluate(dit_stage, dit, make_loader(val, 8, False, 0), torch.device("cpu"))["val/flow_loss"]
    if math.isfinite(epsilon):
        spent = [site_ledger(c).epsilon() for c in configs]
        result |= {"epsilon_spent_max": max(spent), "epsilon_spent_mean": float(np.mean(spent))}
    result["seconds"] = time.perf_counter() - started
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timing-preset", default="small", help="preset for the step-time ratio (default small)")
    parser.add_argument("--timing-steps", type=int, default=4, help="steps per timed block")
    parser.add_argument("--timing-blocks", type=int, default=3, help="alternating blocks per mode")
    parser.add_argument("--timing-stages", default=",".join(STAGE_NAMES), help="stages whose step time is compared")
    parser.add_argument("--preset", default="tiny", help="preset for the privacy–utility table (default tiny)")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--subjects", type=int, default=16, help="subjects per site")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--epsilons", default="1,8,inf", help="comma-separated target ε; inf = no DP")
    parser.add_argument("--with-dit", action="store_true", help="also train and score the DiT per ε")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-utility", action="store_true",
                        help="step-time ratios only, written to bench/results/privacy_step_time.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/privacy-bench")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    load_before = load_average()
    started = time.perf_counter()

    timing = {} if args.skip_timing else {
        s: time_steps(s, get_preset(args.timing_preset), args.timing_steps, args.timing_blocks)
        for s in args.timing_stages.split(",")}
    torch.set_num_threads(1)  # the utility runs are many small steps; one thread wastes no spin-waits
    table = {}
    if not args.skip_utility:
        cohort = make_cohort(Path(args.out), args.sites, args.subjects, args.seed)
        epsilons = [float(e) for e in args.epsilons.split(",")]
        table = {f"{e:g}": utility_at(e, cohort, args) for e in epsilons}

    result = {
        "benchmark": "privacy", "timing_preset": args.timing_preset, "utility_preset": args.preset,
        "step_time": timing, "target_ratio": TARGET_RATIO,
        "ratios_within_target": all(t["ratio"] <= TARGET_RATIO for t in timing.values()) if timing else None,
        "privacy_utility": table,
        "settings": {k: v for k, v in vars(args).items()},
        "seconds": time.perf_counter() - started,
        "machine": machine_info(load_before),
    }
    atomic_write_json(RESULTS.with_name("privacy_step_time.json") if args.skip_utility else RESULTS, result)
    ratios = " ".join(f"{s} {t['ratio']:.2f}x" for s, t in timing.items())
    rows = " | ".join(
        f"eps={k}: age MAE {v.get('probe/age_mae', float('nan')):.1f} dx bAcc {v.get('probe/diagnosis_bacc', float('nan')):.2f} "
        f"PSNR {v.get('val/psnr', float('nan')):.1f} (spent {v.get('epsilon_spent_max', float('inf')):.2f})"
        for k, v in table.items())
    print(f"privacy bench ({os.cpu_count()} CPUs, load {load_before[0]:.1f}->{os.getloadavg()[0]:.1f}): "
          f"DP/non-DP step time [{args.timing_preset}] {ratios or 'skipped'}; {rows}; {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
