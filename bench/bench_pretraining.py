"""What MAE pre-training buys: age and diagnosis probes of the pre-trained encoder vs the same seed's random
initialisation, on the same scans and the same subject-grouped folds.

This was the suite's longest test (≈ 6.5 min on 2 cores, a third of the whole suite's time); it is a
measured scientific result, not a behaviour check, so it lives here and records its numbers.

Cohort: 4 sites × 30 subjects at 4 mm (all four archetypes, 779 scans of every modality, 120 subjects);
the `tiny` MAE trains on the sites' train splits through the real `train_centralized` path (3,000 steps,
batch 8, peak learning rate 3e-3 with 100 warm-up steps: the stage default 1.5e-4, the precursor's value for
a 196 M-parameter ViT, leaves the tiny MAE on its predict-zero plateau for thousands of steps). Earlier
measurements on the 2-core CPU sandbox, seeds 0-5 (random → trained):

    seed   age R²           diagnosis AUROC
    0      0.007 → 0.225    0.631 → 0.752
    1      0.071 → 0.236    0.683 → 0.724
    2      0.051 → 0.117    0.654 → 0.747
    3      0.018 → 0.275    0.592 → 0.744
    4      0.144 → 0.364    0.621 → 0.749
    5      0.179 → 0.327    0.677 → 0.764

Shorter schedules gain too on average but not for every seed (1,500 steps: age R² −0.02 to +0.28; 2,500:
−0.04 to +0.29); diagnosis AUROC rose for every seed at every schedule.

Goal (about half the smallest gain over six seeds): age R² +0.03 and diagnosis AUROC +0.02 for every seed.
Prints one summary line; writes bench/results/pretraining.json; exits 1 when a goal is missed.

    python bench/bench_pretraining.py [--seeds 0] [--steps 3000] [--out bench/results]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import load_average, machine_info
from braing3n_core.data.cohort import CohortSpec, make_cohort
from braing3n_core.fileio import atomic_write_json
from braing3n_core.jobs.probe import ProbeOptions, probe_sites
from braing3n_core.site_config import SiteConfig
from braing3n_core.training.centralized import TrainOptions, train_centralized

RESULTS = Path(__file__).resolve().parent / "results"
AGE_R2_MARGIN = 0.03
DIAGNOSIS_AUROC_MARGIN = 0.02


def one_seed(configs: list[SiteConfig], seed: int, steps: int, work: Path) -> dict[str, float]:
    checkpoint = train_centralized(configs, TrainOptions(stage="mae", preset="tiny", seed=seed, out_dir=work / f"run-{seed}",
                                                         checkpoint_every=steps, steps=steps, batch_size=8, lr=3e-3,
                                                         warmup_steps=100))
    common = {"preset": "tiny", "seed": seed, "tasks": ("age", "diagnosis")}
    random = probe_sites(configs, ProbeOptions(random_init=True, **common), work / "probes").report.metrics()
    trained = probe_sites(configs, ProbeOptions(encoder=checkpoint, **common), work / "probes").report.metrics()
    return {"age_r2_random": random["probe/age_r2"], "age_r2_trained": trained["probe/age_r2"],
            "diagnosis_auroc_random": random["probe/diagnosis_auroc"],
            "diagnosis_auroc_trained": trained["probe/diagnosis_auroc"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0", help="comma-separated pre-training seeds")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    load_before, started = load_average(), time.perf_counter()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-pretraining-") as tmp:
        work = Path(tmp)
        spec = CohortSpec(n_sites=4, subjects_per_site=30, seed=0, voxel_mm=4.0, workers=1, progress=False)
        configs = [SiteConfig.from_yaml(p) for p in make_cohort(spec, out_dir=work / "cohort")]
        for seed in (int(s) for s in args.seeds.split(",")):
            row = one_seed(configs, seed, args.steps, work)
            row["goal_met"] = (row["age_r2_trained"] >= row["age_r2_random"] + AGE_R2_MARGIN
                               and row["diagnosis_auroc_trained"] >= row["diagnosis_auroc_random"] + DIAGNOSIS_AUROC_MARGIN)
            rows[str(seed)] = row
    summary = "pretraining: " + "; ".join(
        f"seed {s}: age R² {r['age_r2_random']:.3f} → {r['age_r2_trained']:.3f}, diagnosis AUROC "
        f"{r['diagnosis_auroc_random']:.3f} → {r['diagnosis_auroc_trained']:.3f}{'' if r['goal_met'] else ' (goal missed)'}"
        for s, r in rows.items()) + f"; {time.perf_counter() - started:.0f} s"
    result = {"benchmark": "pretraining", "summary": summary, "steps": args.steps,
              "goals": {"age_r2_margin": AGE_R2_MARGIN, "diagnosis_auroc_margin": DIAGNOSIS_AUROC_MARGIN},
              "seeds": rows, "seconds": time.perf_counter() - started, "machine": machine_info(load_before)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "pretraining.json", result)
    print(summary + f" → {out / 'pretraining.json'}")
    return 0 if all(r["goal_met"] for r in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
