"""Does the DiT learn the token distribution, and how fast? Samples against real tokens along a training run.

The demo's DiT (FedAvg, 48 local steps) samples no closer to the real held-out tokens than marginal-matched
noise (`generation.json`). This benchmark separates "the sampler or the conditioning is broken" from "the
network is undertrained": one DiT of the run's preset trains centrally on the pooled training tokens of the
run's sites (same recipe as the DiT stage: AdamW, cosine schedule, condition dropout), and at every
checkpoint of `--steps` it records

- the validation flow-matching loss;
- **samples** (a balanced condition table, ab2 at 12 steps, guidance 1.0 and 1.5): Fréchet distance of their
  pooled tokens to the validation scans' pooled tokens, next to the same FD for an equal number of real
  *training* scans (the real-vs-real floor at equal size) and for marginal-matched noise (the ceiling a
  useless model reaches); the spread of the pooled features around the real mean (real: the validation
  scans'); the standard deviation of the samples in the DiT's normalised space (real ≈ 1); and the
  federated probes' adherence (age MAE, diagnosis and modality balanced accuracy) next to the same probes on
  the real validation scans (ceiling) and chance;
- **round trips**: validation tokens noised to t (0.3, 0.7) and integrated back with the DiT (no
  conditions): if these land near the real tokens while samples from t = 1 do not, the network has learned
  the local, low-noise part of the flow and not yet the global one.

Also the variance decomposition of the normalised training tokens: the per-position template (mean over
scans), the subject-specific remainder, and the pooled features (what the probes read) — the share of the
loss the clinically informative signal carries.

Prints one summary line; writes bench/results/dit_learning.json.

    python bench/bench_dit_learning.py [--run runs/demo] [--steps 100,300,600] [--samples 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_dit_patch import probe_heads
from bench.common import load_average, machine_info
from braing3n_core.evaluation.features import probe_table
from braing3n_core.evaluation.metrics import condition_adherence, frechet_distance
from braing3n_core.federation.run_config import RunConfig
from braing3n_core.federation.run_folder import RunFolder
from braing3n_core.fileio import atomic_write_json
from braing3n_core.generation.condition_table import balanced_conditions, condition_batch
from braing3n_core.generation.evaluation import requested_table
from braing3n_core.models import DiT, DiTConfig
from braing3n_core.models.conditions import null_conditions
from braing3n_core.models.diffusion import sample
from braing3n_core.presets import get_preset
from braing3n_core.runtime import cosine_lr, infinite, seed_everything
from braing3n_core.site_config import SiteConfig
from braing3n_core.stage_names import DIT, MAE
from braing3n_core.training.centralized import prepare_sites
from braing3n_core.training.checkpoints import load_encoder
from braing3n_core.training.examples import token_moments
from braing3n_core.training.loop import evaluate, make_loader, make_optimizer, train_steps
from braing3n_core.training.stages import get_stage, stage_dataset

RESULTS = Path(__file__).resolve().parent / "results"
ADHERENCE = ("age_mae", "diagnosis_bacc", "modality_bacc")
CPU = torch.device("cpu")


def scans_of(dataset) -> tuple[torch.Tensor, list]:
    """Raw tokens [S, N, E] of each scan once (a DiT dataset also holds longitudinal pairs) and its records."""
    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    records = [(part, r) for part in parts for r in part.records]
    return torch.stack([part.tokens.tokens(r) for part, r in records]).float(), [r for _, r in records]


def pooled(tokens: torch.Tensor) -> np.ndarray:
    return tokens.float().mean(1).double().numpy()


def adherence_of(heads, features: np.ndarray, table) -> dict[str, float | None]:
    scores = condition_adherence(heads, features, table)
    return {name: scores.get(f"gen/adherence_{name}") for name in ADHERENCE}


def variance_decomposition(model: DiT, tokens: torch.Tensor) -> dict[str, float]:
    z = model.normalize(tokens.double())  # [S, N, E]
    template = z.mean(0)
    return {"total": z.var().item(), "template": template.var().item(), "subject": (z - template).var(0).mean().item(),
            "pooled": z.mean(1).var(0).mean().item()}


@torch.no_grad()
def round_trip(model: DiT, tokens: torch.Tensor, t_start: float, steps: int, seed: int) -> torch.Tensor:
    """Noise raw tokens to t_start, integrate the unconditional flow back to t = 0 (Euler), raw tokens out."""
    x0 = model.normalize(tokens)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    x = (1.0 - t_start) * x0 + t_start * noise
    times = torch.linspace(t_start, 0.0, steps + 1).tolist()
    batch = x.shape[0]
    for t, t_next in zip(times[:-1], times[1:]):
        v = model(x, torch.full((batch,), t), null_conditions(batch), None, torch.full((batch,), math.nan))
        x = x + (t_next - t) * v
    return model.denormalize(x)


@torch.no_grad()
def checkpoint_report(model: DiT, heads, val_tokens: torch.Tensor, real_small: torch.Tensor, n: int) -> dict[str, Any]:
    model.eval()
    val = pooled(val_tokens)
    center = val.mean(0)
    spread = lambda f: float(np.linalg.norm(f - center, axis=1).mean())  # noqa: E731
    rows = balanced_conditions(n, seed=0)
    out: dict[str, Any] = {"samples": {}, "round_trips": {}}
    for guidance in (1.0, 1.5):
        tokens = sample(model, (n, model.config.num_tokens, model.config.token_dim), condition_batch(rows),
                        steps=12, guidance_scale=guidance, generator=torch.Generator().manual_seed(0))
        features = pooled(tokens)
        out["samples"][f"guidance-{guidance:g}"] = {
            "fd_to_val": frechet_distance(val, features), "pooled_spread": spread(features),
            "normalised_std": model.normalize(tokens.float()).std().item(),
            "adherence": adherence_of(heads, features, requested_table(rows))}
    for t_start in (0.3, 0.7):
        tokens = round_trip(model, val_tokens[:n], t_start, 12, seed=1)
        features = pooled(tokens)
        out["round_trips"][f"t-{t_start:g}"] = {"fd_to_val": frechet_distance(val, features), "pooled_spread": spread(features),
                                               "normalised_std": model.normalize(tokens.float()).std().item()}
    out["real_train_equal_size"] = {"fd_to_val": frechet_distance(val, pooled(real_small)),
                                    "pooled_spread": spread(pooled(real_small)),
                                    "normalised_std": model.normalize(real_small).std().item()}
    noise = model.denormalize(torch.randn((n, *val_tokens.shape[1:]), generator=torch.Generator().manual_seed(2)))
    out["noise"] = {"fd_to_val": frechet_distance(val, pooled(noise)), "pooled_spread": spread(pooled(noise))}
    model.train()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/demo", help="a trained run folder (its encoder, sites and probes)")
    parser.add_argument("--steps", default="100,300,600", help="checkpoints (optimizer steps); the last is the schedule's length")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    load_before, started = load_average(), time.perf_counter()
    torch.set_num_threads(args.threads)
    run = RunFolder(Path(args.run))
    preset = get_preset(RunConfig.from_yaml(run.config_path).preset)
    stage = get_stage(DIT)
    encoder = load_encoder(run.final_path(MAE))
    sites = prepare_sites([SiteConfig.from_yaml(p) for p in sorted((run.cohort_dir / "sites").glob("*.yaml"))],
                          preset, stage, encoder, CPU)
    train_set, val_set = stage_dataset(stage, sites, "train"), stage_dataset(stage, sites, "val", train=False)
    train_tokens, _ = scans_of(train_set)
    val_tokens, val_records = scans_of(val_set)
    heads = probe_heads(run)
    real_small = train_tokens[torch.randperm(len(train_tokens), generator=torch.Generator().manual_seed(3))[:args.samples]]

    seed_everything(0)
    model = DiT(DiTConfig.from_preset(preset))
    model.set_token_statistics(*token_moments(train_set, encoder.config.width).mean_std())
    optimizer = make_optimizer(model, args.lr, stage.defaults.weight_decay)
    batches = infinite(make_loader(train_set, args.batch_size, True, seed=0))
    generator = torch.Generator().manual_seed(0)
    val_loader = make_loader(val_set, args.batch_size, False, seed=0)
    checkpoints = [int(s) for s in args.steps.split(",")]
    total = checkpoints[-1]
    curve, done = [], 0
    for target in checkpoints:
        tick = time.perf_counter()
        result = train_steps(stage, model, batches, optimizer, target - done,
                             lr_at=lambda i, s=done: cosine_lr(args.lr, s + i, total, warmup_steps=20), device=CPU,
                             generator=generator)
        train_s = time.perf_counter() - tick
        done = target
        row = {"steps": done, "train_seconds": train_s, "train_loss": result.loss,
               "val_flow_loss": evaluate(stage, model, val_loader, CPU)["val/flow_loss"],
               **checkpoint_report(model, heads, val_tokens, real_small, args.samples)}
        curve.append(row)
        s = row["samples"]["guidance-1"]
        print(f"  {done} steps: val flow {row['val_flow_loss']:.3f}, sample FD {s['fd_to_val']:.4f} (real "
              f"{row['real_train_equal_size']['fd_to_val']:.4f}, noise {row['noise']['fd_to_val']:.4f}), std "
              f"{s['normalised_std']:.2f}, adherence {s['adherence']}", flush=True)
    ceiling = adherence_of(heads, pooled(val_tokens), probe_table(val_records))
    last = curve[-1]
    result = {
        "benchmark": "dit_learning", "run": str(run.root), "preset": preset.name,
        "settings": {"steps": checkpoints, "batch_size": args.batch_size, "lr": args.lr, "samples": args.samples,
                     "train_scans": len(train_tokens), "val_scans": len(val_tokens), "sampler": "ab2-12"},
        "variance_decomposition": variance_decomposition(model, train_tokens),
        "real_val_adherence": ceiling, "curve": curve,
        "seconds": time.perf_counter() - started, "machine": machine_info(load_before)}
    g1 = last["samples"]["guidance-1"]
    vd = result["variance_decomposition"]
    result["summary"] = (
        f"dit_learning ({preset.name}, {len(train_tokens)} training scans): FD of samples to validation at "
        + ", ".join(f"{r['steps']} steps {r['samples']['guidance-1']['fd_to_val']:.4f}" for r in curve)
        + f" (real-vs-real at equal size {last['real_train_equal_size']['fd_to_val']:.4f}, noise {last['noise']['fd_to_val']:.4f}); "
        f"samples' normalised std {g1['normalised_std']:.2f} (real {last['real_train_equal_size']['normalised_std']:.2f}), "
        f"round trip from t=0.3 FD {last['round_trips']['t-0.3']['fd_to_val']:.4f}; adherence at {last['steps']} steps "
        f"age MAE {g1['adherence']['age_mae']:.1f} / modality bAcc {g1['adherence']['modality_bacc']:.2f} vs real "
        f"{ceiling['age_mae']:.1f} / {ceiling['modality_bacc']:.2f}; pooled features carry "
        f"{100 * vd['pooled'] / vd['total']:.2f}% of the token variance (template {100 * vd['template'] / vd['total']:.0f}%)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "dit_learning.json", result)
    print(result["summary"] + f" → {out / 'dit_learning.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
