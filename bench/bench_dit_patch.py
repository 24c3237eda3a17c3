"""DiT patch size on the token grid: validation flow loss and condition adherence per CPU-second.

A DiT token can be one encoder token (patch 1: the 1,200 tokens of `small`) or a p×p×p block of them (patch 2:
150 DiT tokens), as DiT patchifies its latent. Fewer tokens make each step much cheaper (attention and MLPs
over 8× fewer positions); each position then has to predict 8 encoder tokens at once. Which buys the better
model in a fixed budget is measured here, on the real tokens of a trained run (the demo's, by default):

- both DiTs start from the same seed and train on the same pooled training tokens, same batches, same
  learning rate, in alternating chunks; each chunk's **process CPU time** is what the budget counts (one
  torch thread), so the comparison holds on a shared machine where wall time would not;
- after every chunk: the validation flow-matching loss on the sites' validation tokens (same noise and
  times for both; the loss is the velocity error in the same normalised token space, so it compares);
- at the end of the budget: condition adherence of 16 samples per model (balanced conditions, the run's
  federated probe heads on the samples' pooled tokens: age MAE, diagnosis and modality balanced accuracy).

Prints one summary line; writes bench/results/dit_patch.json.

    python bench/bench_dit_patch.py [--run runs/demo] [--budget-s 240] [--chunk 10]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import load_average, machine_info
from braing3n_core.checkpoint import load_checkpoint
from braing3n_core.evaluation.metrics import condition_adherence
from braing3n_core.federation.probes import heads_from_arrays, tasks_from_json
from braing3n_core.federation.run_config import RunConfig
from braing3n_core.federation.run_folder import RunFolder
from braing3n_core.fileio import atomic_write_json
from braing3n_core.generation.condition_table import balanced_conditions
from braing3n_core.generation.evaluation import requested_table
from braing3n_core.generation.condition_table import condition_batch
from braing3n_core.models import DiT, DiTConfig
from braing3n_core.models.diffusion import sample
from braing3n_core.presets import get_preset
from braing3n_core.runtime import cosine_lr, infinite, seed_everything
from braing3n_core.site_config import SiteConfig
from braing3n_core.stage_names import DIT, MAE, PROBES
from braing3n_core.training.centralized import prepare_sites
from braing3n_core.training.checkpoints import load_encoder
from braing3n_core.training.examples import token_moments
from braing3n_core.training.loop import evaluate, make_loader, make_optimizer, train_steps
from braing3n_core.training.stages import get_stage, stage_dataset

RESULTS = Path(__file__).resolve().parent / "results"
ADHERENCE = ("gen/adherence_age_mae", "gen/adherence_diagnosis_bacc", "gen/adherence_modality_bacc")


def probe_heads(run: RunFolder):
    checkpoint = RunFolder.read(load_checkpoint(run.final_path(PROBES)))
    pairs = tasks_from_json(checkpoint.meta["tasks_json"])
    return heads_from_arrays([task for task, _ in pairs], checkpoint.model)


@torch.no_grad()
def adherence(dit: DiT, heads, n: int, steps: int, guidance: float) -> dict[str, float]:
    rows = balanced_conditions(n, seed=0)
    tokens = sample(dit.eval(), (n, dit.config.num_tokens, dit.config.token_dim), condition_batch(rows),
                    steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(0))
    scores = condition_adherence(heads, tokens.float().mean(1).double().numpy(), requested_table(rows))
    return {k.removeprefix("gen/adherence_"): scores.get(k) for k in ADHERENCE}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/demo", help="a trained run folder (its encoder, sites and probes)")
    parser.add_argument("--patches", default="1,2", help="patch sizes to compare")
    parser.add_argument("--budget-s", type=float, default=240.0, help="CPU seconds of training per patch size")
    parser.add_argument("--chunk", type=int, default=10, help="optimizer steps between switches and evaluations")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--samples", type=int, default=16, help="samples per model for adherence")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    load_before = load_average()
    torch.set_num_threads(1)  # CPU time is the budget: one thread keeps it a fair measure of work
    run = RunFolder(Path(args.run))
    config = RunConfig.from_yaml(run.config_path)
    preset = get_preset(config.preset)
    stage = get_stage(DIT)
    encoder = load_encoder(run.final_path(MAE))
    sites = prepare_sites([SiteConfig.from_yaml(p) for p in sorted((run.cohort_dir / "sites").glob("*.yaml"))],
                          preset, stage, encoder, torch.device("cpu"))
    train_set, val_set = stage_dataset(stage, sites, "train"), stage_dataset(stage, sites, "val", train=False)
    moments = token_moments(train_set, encoder.config.width).mean_std()
    heads = probe_heads(run)
    patches = [int(p) for p in args.patches.split(",")]

    arms: dict[int, dict[str, Any]] = {}
    for patch in patches:
        seed_everything(0)
        model = DiT(DiTConfig.from_preset(preset, patch_size=patch))
        model.set_token_statistics(*moments)
        arms[patch] = {"model": model, "optimizer": make_optimizer(model, args.lr, stage.defaults.weight_decay),
                       "batches": infinite(make_loader(train_set, args.batch_size, True, seed=0)),
                       "generator": torch.Generator().manual_seed(0), "cpu_s": 0.0, "steps": 0, "curve": [],
                       "parameters": sum(p.numel() for p in model.parameters())}
    val_loader = make_loader(val_set, args.batch_size, False, seed=0)
    # The schedule is the same for both: a cosine over the steps the faster arm could reach is not known in
    # advance, so the rate is constant after a short warm-up.
    lr_at = lambda step: cosine_lr(args.lr, min(step, 20), 10**9, warmup_steps=20)  # noqa: E731
    started = time.perf_counter()
    while any(arm["cpu_s"] < args.budget_s for arm in arms.values()):
        for patch, arm in arms.items():
            if arm["cpu_s"] >= args.budget_s:
                continue
            before = time.process_time()
            result = train_steps(stage, arm["model"], arm["batches"], arm["optimizer"], args.chunk,
                                 lr_at=lambda i, s=arm["steps"]: lr_at(s + i), device=torch.device("cpu"),
                                 generator=arm["generator"])
            arm["cpu_s"] += time.process_time() - before
            arm["steps"] += args.chunk
            val = evaluate(stage, arm["model"], val_loader, torch.device("cpu"))["val/flow_loss"]
            arm["curve"].append({"cpu_s": round(arm["cpu_s"], 2), "steps": arm["steps"], "train_loss": result.loss,
                                 "val_flow_loss": val})
            print(f"  patch {patch}: {arm['steps']} steps, {arm['cpu_s']:.0f} CPU-s, val flow loss {val:.4f}",
                  flush=True)

    table = {}
    for patch, arm in arms.items():
        table[f"patch-{patch}"] = {
            "patch_size": patch, "dit_tokens": arm["model"].config.num_tokens // patch**3,
            "parameters": arm["parameters"], "steps": arm["steps"], "cpu_s": arm["cpu_s"],
            "cpu_s_per_step": arm["cpu_s"] / arm["steps"], "final_val_flow_loss": arm["curve"][-1]["val_flow_loss"],
            "adherence": adherence(arm["model"], heads, args.samples, steps=12, guidance=1.5), "curve": arm["curve"]}
    reference = table[f"patch-{patches[0]}"]
    for row in table.values():
        row["step_speedup_vs_first"] = reference["cpu_s_per_step"] / row["cpu_s_per_step"]
    result = {"benchmark": "dit_patch", "run": str(run.root), "preset": preset.name,
              "settings": {"budget_cpu_s": args.budget_s, "chunk": args.chunk, "batch_size": args.batch_size,
                           "lr": args.lr, "train_examples": len(train_set), "val_examples": len(val_set),
                           "adherence_samples": args.samples, "sampler": "ab2-12, guidance 1.5"},
               "seconds": time.perf_counter() - started, "table": table, "machine": machine_info(load_before)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "dit_patch.json", result)
    print("dit_patch: " + "; ".join(
        f"patch {r['patch_size']}: {r['steps']} steps in {r['cpu_s']:.0f} CPU-s ({r['step_speedup_vs_first']:.1f}×/step), "
        f"val flow loss {r['final_val_flow_loss']:.4f}, modality bAcc {r['adherence']['modality_bacc']}, "
        f"age MAE {r['adherence']['age_mae']}" for r in table.values()) + f" → {out / 'dit_patch.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
