"""Sampling speed at equal quality: the old sampler (Heun, 25 steps, one volume per solve, fp32) against the
new default (`ab2`, 12 steps, 8 volumes per solve, bf16 where the CPU has native bf16), and the steps between.

On the demo's trained DiT and decoder (`braing3n demo --out runs/demo`), one run, alternating blocks:

1. **Seconds per volume** of `generation.sampling.generate` (DiT solve + decode) for each configuration,
   `--repeats` alternating rounds over the same `--n` balanced conditions; the speed-up is the old
   configuration's median over each other's, measured in this run. The load average is recorded.
2. **Quality, same noise**: every configuration starts from the same noise (one seed), so its tokens can be
   compared sample by sample to a reference solve (Heun, 50 steps, fp32): the RMS token difference in the
   DiT's normalised units, relative to the tokens' spread (`rel_error`). For scale, the same number
   between two *different* seeds (what one draw changes) is reported as `seed_spread`.
3. **Quality, what a reader of the samples sees**: condition adherence of each configuration's samples
   (the run's federated probe heads on the mean-pooled sampled tokens, against the requested conditions:
   age MAE, diagnosis and modality balanced accuracy), and the Fréchet distance of its pooled tokens to
   the reference's (0 = the same distribution).
4. **Solver order sweep** (rel_error only, one solve each): ab2 / heun / euler at 6, 8, 12, 16, 25 steps.

Prints one summary line; writes bench/results/sampling.json.

    python bench/bench_sampling.py [--run runs/demo] [--n 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import load_average, machine_info
from braing3n_core.checkpoint import load_checkpoint
from braing3n_core.evaluation.metrics import condition_adherence, frechet_distance
from braing3n_core.federation.probes import heads_from_arrays, tasks_from_json
from braing3n_core.federation.run_folder import RunFolder
from braing3n_core.fileio import atomic_write_json
from braing3n_core.generation.condition_table import balanced_conditions
from braing3n_core.generation.evaluation import requested_table
from braing3n_core.generation.models import GenerationModels, load_run_models
from braing3n_core.generation.sampling import GeneratedSamples, generate
from braing3n_core.models.diffusion import DEFAULT_SOLVER, DEFAULT_STEPS, network_calls
from braing3n_core.runtime import inference_bf16
from braing3n_core.stage_names import PROBES

RESULTS = Path(__file__).resolve().parent / "results" / "sampling.json"
GUIDANCE = 1.5


@dataclass(frozen=True)
class Config:
    name: str
    solver: str
    steps: int
    batch_size: int
    bf16: bool

    @property
    def calls(self) -> int:
        return network_calls(self.steps, self.solver)  # type: ignore[arg-type]


OLD = Config("old: heun-25, 1 per solve, fp32", "heun", 25, 1, False)
NEW = Config(f"new: {DEFAULT_SOLVER}-{DEFAULT_STEPS}, 8 per solve, bf16", DEFAULT_SOLVER, DEFAULT_STEPS, 8, True)
STEPS_ONLY = Config(f"{DEFAULT_SOLVER}-{DEFAULT_STEPS}, 1 per solve, fp32", DEFAULT_SOLVER, DEFAULT_STEPS, 1, False)
BATCHED = Config(f"{DEFAULT_SOLVER}-{DEFAULT_STEPS}, 8 per solve, fp32", DEFAULT_SOLVER, DEFAULT_STEPS, 8, False)
HEUN_12 = Config("heun-12, 8 per solve, fp32", "heun", 12, 8, False)
REFERENCE = Config("reference: heun-50, fp32", "heun", 50, 8, False)


def run(models: GenerationModels, rows, config: Config, seed: int = 0) -> GeneratedSamples:
    return generate(models, rows, steps=config.steps, guidance_scale=GUIDANCE, seed=seed, batch_size=config.batch_size,
                    solver=config.solver, bf16=config.bf16 and inference_bf16(models.device))  # type: ignore[arg-type]


def rel_error(models: GenerationModels, tokens: torch.Tensor, reference: torch.Tensor) -> float:
    dit = models.require_dit()
    a, b = dit.normalize(tokens.float()), dit.normalize(reference.float())
    return float((a - b).pow(2).mean().sqrt() / b.std())


def probe_heads(run_dir: Path):
    checkpoint = RunFolder.read(load_checkpoint(RunFolder(run_dir).final_path(PROBES)))
    pairs = tasks_from_json(checkpoint.meta["tasks_json"])
    return heads_from_arrays([task for task, _ in pairs], checkpoint.model)


def quality(models, heads, rows, samples: GeneratedSamples, reference: GeneratedSamples) -> dict[str, Any]:
    features = samples.tokens.float().mean(1).double().numpy()
    adherence = condition_adherence(heads, features, requested_table(rows))
    keep = ("gen/adherence_age_mae", "gen/adherence_diagnosis_bacc", "gen/adherence_modality_bacc")
    return {"rel_error": rel_error(models, samples.tokens, reference.tokens),
            "fd_to_reference": float(frechet_distance(features, reference.tokens.float().mean(1).double().numpy())),
            **{k.removeprefix("gen/adherence_"): adherence.get(k) for k in keep}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/demo", help="a trained run folder (the demo's)")
    parser.add_argument("--n", type=int, default=8, help="volumes per configuration")
    parser.add_argument("--repeats", type=int, default=2, help="alternating timed rounds")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    load_before = load_average()
    torch.manual_seed(0)
    models = load_run_models(Path(args.run))
    heads = probe_heads(Path(args.run))
    rows = balanced_conditions(args.n, seed=0)
    configs = [OLD, STEPS_ONLY, BATCHED, HEUN_12, NEW]

    generate(models, rows[:1], steps=2, guidance_scale=GUIDANCE, batch_size=1)  # warm-up (oneDNN kernels)
    reference = run(models, rows, REFERENCE)
    other_seed = run(models, rows, REFERENCE, seed=1)
    seconds: dict[str, list[float]] = {c.name: [] for c in configs}
    last: dict[str, GeneratedSamples] = {}
    for repeat in range(args.repeats):
        for config in configs if repeat % 2 == 0 else configs[::-1]:  # alternate the order between rounds
            samples = run(models, rows, config)
            seconds[config.name].append(samples.seconds_per_volume)
            last[config.name] = samples
            print(f"  {config.name}: {samples.seconds_per_volume:.2f} s/volume", flush=True)

    old_median = statistics.median(seconds[OLD.name])
    table = {}
    for config in configs:
        median = statistics.median(seconds[config.name])
        table[config.name] = {"solver": config.solver, "steps": config.steps, "batch_size": config.batch_size,
                              "bf16": config.bf16 and inference_bf16(models.device), "network_calls": config.calls,
                              "seconds_per_volume": seconds[config.name], "seconds_per_volume_median": median,
                              "speedup_vs_old": old_median / median,
                              **quality(models, heads, rows, last[config.name], reference)}
    table[REFERENCE.name] = {"solver": "heun", "steps": 50, **quality(models, heads, rows, reference, reference)}
    seed_spread = rel_error(models, other_seed.tokens, reference.tokens)
    table["another seed (heun-50)"] = {"solver": "heun", "steps": 50, **quality(models, heads, rows, other_seed, reference)}

    sweep = {}
    for solver in ("ab2", "heun", "euler"):
        for steps in (6, 8, 12, 16, 25):
            out = run(models, rows, Config("sweep", solver, steps, 8, False))
            sweep[f"{solver}-{steps}"] = {"network_calls": network_calls(steps, solver),  # type: ignore[arg-type]
                                          "rel_error": rel_error(models, out.tokens, reference.tokens)}

    new = table[NEW.name]
    result = {
        "benchmark": "sampling", "run": str(args.run), "n": args.n, "repeats": args.repeats, "guidance": GUIDANCE,
        "preset": models.preset.name, "configs": table, "seed_spread": seed_spread, "solver_sweep": sweep,
        "goal": {"speedup": new["speedup_vs_old"], "target": 4.0, "met": new["speedup_vs_old"] >= 4.0},
        "machine": machine_info(load_before, models.device),
    }
    atomic_write_json(Path(args.out), result)
    old = table[OLD.name]
    print(f"sampling ({models.preset.name}, n={args.n}): old {old_median:.2f} s/volume (heun-25, rel_error "
          f"{old['rel_error']:.3f}) → new {new['seconds_per_volume_median']:.2f} s/volume ({DEFAULT_SOLVER}-"
          f"{DEFAULT_STEPS}, bf16, batch 8, rel_error {new['rel_error']:.3f}; another seed {seed_spread:.2f}): "
          f"{new['speedup_vs_old']:.1f}× (goal 4×); age MAE {old['age_mae']:.1f} → {new['age_mae']:.1f}, modality "
          f"bAcc {old['modality_bacc']:.2f} → {new['modality_bacc']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
