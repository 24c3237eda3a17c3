"""What privacy costs and what it buys: utility and membership-inference attacks against ε (issue 19).

One synthetic cohort (`--sites` × `--subjects`, `tiny`, 4 mm), one schedule, one set of seeds. For each
privacy setting and training seed, the real pipeline of a consortium runs, each step a Flower simulation:

1. `simulate`: mae → federated probes → decoder → dit, every site with the same rounds × local steps ×
   batch (the same sample-steps at every ε). **Sample-level** DP: DP-SGD at every site (its site YAML's
   `privacy` block), the target ε split evenly over the three stages (`target_epsilon` calibrates σ over
   each stage's whole schedule); the ε reported is what the sites' ledgers reached (RDP composition, so a
   little below the target). **Client-level** DP: the run YAML's `client_dp` (server-side fixed clipping at
   `--client-clip`, Flower's RDP accountant, no sampling amplification since every site takes part each
   round), its noise multiplier z calibrated so the run's releases reach the target ε; the ε reported is
   the server's accountant's. ε = ∞ is the same run without DP.
2. `evaluate-generation` on that run: condition adherence of generated scans read back by the run's own
   federated probes (age MAE, diagnosis balanced accuracy), Fréchet distance in the frozen encoder's token
   space against the sites' held-out scans next to the real-vs-real floor.
3. `synthesize` on that run: the federated audit, which attacks the DiT (flow-matching loss) and the MAE
   (masked-reconstruction loss) with the loss-threshold membership test, pooled over sites with a 95 %
   bootstrap interval, flags synthetic scans nearer to a training scan than new people come (DCR), and
   checks each site's private planted copy is caught.

Utility beside them: the federated probes on every site's test subjects (age MAE and R², diagnosis and sex
AUROC, each with its chance value) and the decoder's PSNR / SSIM on the sites' validation subjects.

Each (setting, seed) writes `<out>/results/<setting>-seed<s>.json` and is skipped when it exists, so an
interrupted benchmark continues where it stopped. The summary pools seeds (mean, standard deviation)
and checks the issue's goals: the MAE and DiT attack AUC ≤ 0.55 at ε = 8 while the diagnosis AUROC keeps
≥ 90 % of its no-DP margin over chance. Prints one summary line; writes bench/results/privacy_utility.json
and the figure bench/results/privacy_utility.png (also copied to docs/privacy_utility.png).

    python bench/bench_privacy_utility.py [--out /tmp/privacy-utility] [--sites 4] [--subjects 30]
        [--epsilons inf,8,4,1] [--client-epsilons 8] [--seeds 0,1,2] [--only-missing-report]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cohort_sites, load_average, machine_info
from braing3n_core.fileio import atomic_write_json, read_jsonl
from braing3n_core.jobs.report_figures import ATTACK_GOAL_AUC, privacy_utility_figure
from braing3n_core.stage_names import STAGE_NAMES

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "privacy_utility.json"
FIGURE = ROOT / "bench" / "results" / "privacy_utility.png"
DOCS_FIGURE = ROOT / "docs" / "privacy_utility.png"
DELTA = 1e-5
GOAL_AUC = ATTACK_GOAL_AUC
GOAL_MARGIN = 0.90
INF = math.inf


def schedule(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The stages every setting trains with: the same rounds × local steps × batch whatever the ε."""
    return [
        {"name": "mae", "rounds": args.mae_rounds, "local_steps": args.local_steps, "batch_size": 8, "lr": 3e-3,
         "evaluate_every": 0},
        {"name": "decoder", "rounds": args.rounds, "local_steps": args.local_steps, "batch_size": 4,
         "evaluate_every": args.rounds},
        {"name": "dit", "rounds": args.rounds, "local_steps": args.local_steps, "batch_size": 16,
         "evaluate_every": args.rounds},
    ]


def setting_name(mode: str, epsilon: float) -> str:
    return "no-dp" if math.isinf(epsilon) else f"{mode}-eps{epsilon:g}"


def client_noise_multiplier(epsilon: float, releases: int) -> float:
    """z such that `releases` Gaussian releases without amplification spend `epsilon` at DELTA (RDP)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=DELTA, sample_rate=1.0, steps=releases,
                                      accountant="rdp", epsilon_tolerance=0.01))


def site_yamls(cohort: list[Path], folder: Path, mode: str, epsilon: float) -> list[Path]:
    """Site YAMLs over the shared cohort with caches (and ledgers) private to this setting."""
    from braing3n_core.site_config import SiteConfig

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for source in cohort:
        site = SiteConfig.from_yaml(source)
        data = {**site.to_yaml_dict(), "cache_dir": str(folder / "cache" / site.site_id)}
        if mode == "sample" and not math.isinf(epsilon):
            share = epsilon / len(STAGE_NAMES)
            data["privacy"] = {"enabled": True, "epsilon_budget": epsilon * 1.05, "delta": DELTA,
                               "stages": {stage: {"target_epsilon": share, "max_grad_norm": 1.0} for stage in STAGE_NAMES}}
        paths.append(folder / f"{site.site_id}.yaml")
        paths[-1].write_text(yaml.safe_dump(data))
    return paths


def run_config(args: argparse.Namespace, name: str, mode: str, epsilon: float, seed: int) -> dict[str, Any]:
    stages = schedule(args)
    config = {"name": name, "preset": "tiny", "seed": seed, "min_sites": args.sites, "round_timeout_s": 3600.0,
              "update_norm_bound": 1e4, "stages": stages,
              "probes": {"enabled": True, "rounds": 4, "local_steps": 25}}
    if mode == "client" and not math.isinf(epsilon):
        releases = sum(s["rounds"] for s in stages)
        config["client_dp"] = {"enabled": True, "side": "server", "clipping": "fixed", "clipping_norm": args.client_clip,
                               "noise_multiplier": client_noise_multiplier(epsilon, releases), "delta": DELTA}
    return config


# --- one setting and seed ------------------------------------------------------------------------------------


def _spent(run_dir: Path, mode: str) -> float:
    """The ε the run reached: the largest site ledger's (sample-level) or the server accountant's (client)."""
    lines = read_jsonl(run_dir / "metrics.jsonl")
    if mode == "client":
        values = [r["privacy/epsilon"] for r in lines if r["kind"] == "client_dp"]
    else:
        values = [r["privacy/epsilon"] for r in lines if r["kind"] == "train" and "privacy/epsilon" in r]
    return max(values) if values else INF


def _last(run_dir: Path, stage: str, key: str) -> float:
    values = [r[key] for r in read_jsonl(run_dir / "metrics.jsonl")
              if r["stage"] == stage and r["site"] == "aggregate" and r["kind"] == "evaluate" and key in r]
    return float(values[-1]) if values else math.nan


def _utility(run: Path, probes: dict[str, Any]) -> dict[str, Any]:
    return {key: probes.get(key) for key in (
        "probe/age_mae", "probe/age_mae_chance", "probe/age_r2", "probe/diagnosis_auroc", "probe/diagnosis_auroc_chance",
        "probe/diagnosis_bacc", "probe/sex_auroc", "probe/modality_bacc")} | {
        "val/psnr": _last(run, "decoder", "val/psnr"), "val/ssim": _last(run, "decoder", "val/ssim"),
        "dit/val_flow_loss": _last(run, "dit", "val/flow_loss")}


def one_run(args: argparse.Namespace, cohort: list[Path], mode: str, epsilon: float, seed: int) -> dict[str, Any]:
    from braing3n_core.generation.evaluation import guided_set
    from braing3n_core.jobs.evaluate_generation import evaluate_generation
    from braing3n_core.jobs.synthesize import synthesize
    from braing3n_core.ops.simulate import SimulationError, simulate

    name = f"{setting_name(mode, epsilon)}-seed{seed}"
    work = args.out / "runs" / name
    if work.exists():  # a half-finished attempt: its ledgers already spent ε, so start it over
        shutil.rmtree(work)
    sites = site_yamls(cohort, work / "sites", mode, epsilon)
    config_path = work / "run.yaml"
    config_path.write_text(yaml.safe_dump(run_config(args, name, mode, epsilon, seed)))
    timings = {}
    started = time.perf_counter()
    try:
        run = simulate(sites, config_path, work / "run", echo=False).run_dir
    except SimulationError as error:  # e.g. noise so large that training diverged: a result, not a crash
        spent, probes_json = _spent(work / "run", mode), work / "run" / "probes.json"
        partial = json.loads(probes_json.read_text())["pooled"] if probes_json.is_file() else {}
        return {"mode": mode, "epsilon_target": None if math.isinf(epsilon) else epsilon, "seed": seed,
                "epsilon_spent": None if math.isinf(spent) else spent, "failed": str(error)[-1500:],
                "utility": _utility(work / "run", partial),  # what the stages before the failure reached
                "seconds": {"train_s": time.perf_counter() - started}, "run_dir": str(work / "run")}
    timings["train_s"] = time.perf_counter() - started
    probes = json.loads((run / "probes.json").read_text())["pooled"]

    started = time.perf_counter()
    generation = evaluate_generation(run, sites, work / "generation-eval", n=args.n, steps=12, guidance=(1.5,),
                                     default_guidance=1.5, seed=seed)["generation"]
    timings["generation_eval_s"] = time.perf_counter() - started

    started = time.perf_counter()
    synthesize(run, args.n_synthetic, work / "synthetic", sites=sites, seed=seed)
    audit = json.loads((work / "synthetic" / "audit-run" / "privacy_audit.json").read_text())
    timings["audit_s"] = time.perf_counter() - started

    best, pooled, spent = guided_set(1.5), generation["pooled"], _spent(run, mode)
    adherence, ceiling = generation["adherence"].get(best, {}).get("token", {}), generation["ceiling"]["pooled"]
    return {
        "mode": mode, "epsilon_target": None if math.isinf(epsilon) else epsilon, "seed": seed,
        "epsilon_spent": None if math.isinf(spent) else spent,
        "utility": _utility(run, probes),
        "generation": {
            "adherence_age_mae": adherence.get("gen/adherence_age_mae"),
            "adherence_diagnosis_bacc": adherence.get("gen/adherence_diagnosis_bacc"),
            "real_age_mae": ceiling.get("probe/age_mae"),
            "fd_token": pooled["sets"].get(best, {}).get("token", {}).get("fd", {}).get("value"),
            "fd_token_real_vs_real": pooled["real_vs_real"]["token"]["fd"],
        },
        "attack": {
            "membership": audit["membership"],
            "dcr_excluded": len(audit["excluded"]), "n_synthetic": audit["n_synthetic"],
            "positive_controls_caught": audit["positive_controls_caught"], "calibrated_sites": audit["calibrated_sites"],
        },
        "seconds": timings,
        "run_dir": str(run),
    }


def untrained_attack(args: argparse.Namespace, cohort: list[Path], seed: int) -> dict[str, Any] | None:
    """The membership attack on the untrained networks of `seed` (exactly how every setting's training starts):
    what the attack reads from differences between a site's training and held-out scans alone, before any
    training could memorise anything. An attack AUC is only evidence of memorisation above this floor."""
    from braing3n_core.ops.simulate import simulate
    from braing3n_core.stage_names import DIT, MAE
    from braing3n_core.training.checkpoints import initial_model, save_stage_checkpoint
    from braing3n_core.training.stages import get_stage

    trained = args.out / "runs" / f"no-dp-seed{seed}"
    staged = trained / "synthetic" / "staging" / "synthetic.json"
    if not staged.is_file():
        return None  # needs the seed's no-DP run: its encoder tokenises, its synthetic set is what is audited
    work = args.out / "runs" / f"untrained-seed{seed}"
    shutil.rmtree(work, ignore_errors=True)
    checkpoints = {stage: save_stage_checkpoint(work / "init" / stage, get_stage(stage),
                                                initial_model(stage, "tiny", seed), {"preset": "tiny", "round": 0})
                   for stage in (MAE, DIT)}
    config = {"name": f"untrained-seed{seed}", "preset": "tiny", "min_sites": args.sites, "round_timeout_s": 3600.0,
              "start_from": {"mae": str(trained / "run" / "checkpoints" / "mae" / "final.json")},
              "audit": {"synthetic": str(staged), "dit": str(checkpoints[DIT]), "mae": str(checkpoints[MAE])}}
    (work / "run.yaml").write_text(yaml.safe_dump(config))
    sites = site_yamls(cohort, work / "sites", "sample", INF)
    started = time.perf_counter()
    run = simulate(sites, work / "run.yaml", work / "run", echo=False).run_dir
    audit = json.loads((run / "privacy_audit.json").read_text())
    return {"seed": seed, "membership": audit["membership"], "seconds": time.perf_counter() - started}


# --- summary ---------------------------------------------------------------------------------------------------


def _stat(values: list[float | None]) -> dict[str, float | int]:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": statistics.fmean(finite), "std": statistics.stdev(finite) if len(finite) > 1 else 0.0, "n": len(finite)}


METRICS = {
    "epsilon_spent": lambda r: r["epsilon_spent"],
    "diagnosis_auroc": lambda r: r["utility"]["probe/diagnosis_auroc"],
    "age_mae": lambda r: r["utility"]["probe/age_mae"],
    "age_mae_chance": lambda r: r["utility"]["probe/age_mae_chance"],
    "age_r2": lambda r: r["utility"]["probe/age_r2"],
    "sex_auroc": lambda r: r["utility"]["probe/sex_auroc"],
    "psnr": lambda r: r["utility"]["val/psnr"],
    "ssim": lambda r: r["utility"]["val/ssim"],
    "gen_adherence_age_mae": lambda r: r["generation"]["adherence_age_mae"],
    "gen_fd_token": lambda r: r["generation"]["fd_token"],
    "gen_fd_token_real_vs_real": lambda r: r["generation"]["fd_token_real_vs_real"],
    "mia_auc_dit": lambda r: r["attack"]["membership"].get("dit", {}).get("auc"),
    "mia_auc_mae": lambda r: r["attack"]["membership"].get("mae", {}).get("auc"),
    "dcr_excluded": lambda r: r["attack"]["dcr_excluded"],
    "positive_controls_caught": lambda r: r["attack"]["positive_controls_caught"] / max(1, r["attack"]["calibrated_sites"]),
}


# Known for a run whose later stage failed too: ε, and the probes and decoder trained before the failure.
EVERY_RUN_METRICS = ("epsilon_spent", "diagnosis_auroc", "age_mae", "age_mae_chance", "age_r2", "sex_auroc", "psnr", "ssim")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    settings: dict[str, dict[str, Any]] = {}
    for run in runs:
        key = setting_name(run["mode"], INF if run["epsilon_target"] is None else run["epsilon_target"])
        settings.setdefault(key, {"mode": run["mode"] if run["epsilon_target"] is not None else "none",
                                  "epsilon_target": run["epsilon_target"], "runs": []})["runs"].append(run)
    for entry in settings.values():
        entry["seeds"] = sorted(r["seed"] for r in entry["runs"])
        done = [r for r in entry["runs"] if "failed" not in r]
        entry["failed"] = {r["seed"]: r["failed"] for r in entry["runs"] if "failed" in r}
        entry["metrics"] = {name: _stat([get(r) for r in (entry["runs"] if name in EVERY_RUN_METRICS else done)])
                            for name, get in METRICS.items()}
        entry["mia_ci95"] = {attack: [r["attack"]["membership"][attack]["ci95"] for r in done
                                      if attack in r["attack"]["membership"]] for attack in ("dit", "mae")}
        del entry["runs"]
    return settings


def goals(settings: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals at ε = 8 (sample-level DP), measured against the no-DP runs of the same seeds."""
    none, dp = settings.get("no-dp"), settings.get("sample-eps8")
    if not none or not dp:
        return {"evaluated": False, "why": "needs the no-DP and the sample-level ε = 8 settings"}
    chance = 0.5
    margin_none = none["metrics"]["diagnosis_auroc"]["mean"] - chance
    margin_dp = dp["metrics"]["diagnosis_auroc"]["mean"] - chance
    kept = margin_dp / margin_none if margin_none > 0 else math.nan
    attacks = {a: dp["metrics"][f"mia_auc_{a}"]["mean"] for a in ("dit", "mae")}
    return {"evaluated": True, "diagnosis_auroc_margin_kept": kept, "margin_goal": GOAL_MARGIN,
            "margin_met": bool(kept >= GOAL_MARGIN), "mia_auc_at_eps8": attacks, "mia_goal": GOAL_AUC,
            "mia_met": {a: bool(v <= GOAL_AUC) for a, v in attacks.items()},
            "no_dp_mia_auc": {a: none["metrics"][f"mia_auc_{a}"]["mean"] for a in ("dit", "mae")},
            # what training added to the attack: the AUC above the one the untrained networks already give
            "mia_excess_over_untrained_at_eps8": {a: attacks[a] - settings["untrained"]["metrics"][f"mia_auc_{a}"]["mean"]
                                                  for a in ("dit", "mae")} if "untrained" in settings else None,
            "no_dp_mia_excess_over_untrained": {a: none["metrics"][f"mia_auc_{a}"]["mean"]
                                                - settings["untrained"]["metrics"][f"mia_auc_{a}"]["mean"]
                                                for a in ("dit", "mae")} if "untrained" in settings else None}


def summary_line(settings: dict[str, Any], verdict: dict[str, Any], seconds: float) -> str:
    parts = []
    for key, entry in sorted(settings.items(), key=lambda kv: (kv[1]["epsilon_target"] or INF, kv[1]["mode"])):
        m = entry["metrics"]
        if key == "untrained":
            parts.append(f"attack on the untrained networks (the split's floor) MAE/DiT {m['mia_auc_mae']['mean']:.3f}/"
                         f"{m['mia_auc_dit']['mean']:.3f}")
            continue
        if entry["failed"] and not m["mia_auc_mae"]["n"]:
            parts.append(f"{key} (ε {m['epsilon_spent']['mean']:.3g}): training failed for seeds {sorted(entry['failed'])} "
                         f"after probes (dx AUROC {m['diagnosis_auroc']['mean']:.3f}, PSNR {m['psnr']['mean']:.2f})")
            continue
        parts.append(f"{key} (ε {m['epsilon_spent']['mean']:.3g}, n={m['diagnosis_auroc']['n']}): dx AUROC "
                     f"{m['diagnosis_auroc']['mean']:.3f}±{m['diagnosis_auroc']['std']:.3f}, age MAE {m['age_mae']['mean']:.2f} "
                     f"(mean {m['age_mae_chance']['mean']:.2f}), PSNR {m['psnr']['mean']:.2f}, MIA MAE/DiT "
                     f"{m['mia_auc_mae']['mean']:.3f}/{m['mia_auc_dit']['mean']:.3f}")
    if verdict.get("evaluated"):
        parts.append(f"goals at ε=8: dx margin kept {verdict['diagnosis_auroc_margin_kept']:.2f} (≥ {GOAL_MARGIN}: "
                     f"{'met' if verdict['margin_met'] else 'missed'}), MIA ≤ {GOAL_AUC}: {verdict['mia_met']}")
    return "privacy-utility bench: " + "; ".join(parts) + f"; {seconds:.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/privacy-utility"))
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--subjects", type=int, default=30)
    parser.add_argument("--epsilons", default="inf,8,4,1", help="sample-level DP targets (inf: no DP)")
    parser.add_argument("--client-epsilons", default="8", help="client-level DP targets ('' for none)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--mae-rounds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4, help="decoder and DiT rounds")
    parser.add_argument("--local-steps", type=int, default=40)
    parser.add_argument("--client-clip", type=float, default=1.0, help="client-level DP clipping norm C")
    parser.add_argument("--n", type=int, default=16, help="generated scans per set in the evaluation")
    parser.add_argument("--n-synthetic", type=int, default=8, help="synthetic scans the audit checks")
    parser.add_argument("--only-missing-report", action="store_true",
                        help="run nothing: summarize the results already in --out")
    args = parser.parse_args()
    args.out = args.out.resolve()
    load_before, started = load_average(), time.perf_counter()
    cohort, _ = cohort_sites(args.out / "cohort", args.sites, args.subjects, seed=0, voxel_mm=4.0)
    parse = lambda text: [INF if v.strip() == "inf" else float(v) for v in text.split(",") if v.strip()]
    # Seed by seed, so an interrupted benchmark has whole curves for the seeds it finished.
    plan = [(mode, e, s) for s in map(int, args.seeds.split(","))
            for mode, targets in (("sample", parse(args.epsilons)), ("client", parse(args.client_epsilons)))
            for e in targets if mode == "sample" or not math.isinf(e)]
    results_dir = args.out / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    for mode, epsilon, seed in plan if not args.only_missing_report else []:
        target = results_dir / f"{setting_name(mode, epsilon)}-seed{seed}.json"
        if target.is_file():
            continue
        run_started = time.perf_counter()
        result = one_run(args, cohort, mode, epsilon, seed)
        result["load_average_after"] = load_average()
        atomic_write_json(target, result)
        print(f"[bench] {target.stem}: {time.perf_counter() - run_started:.0f} s", flush=True)
    baselines_dir = results_dir / "untrained"
    baselines_dir.mkdir(exist_ok=True)
    for seed in map(int, args.seeds.split(",")) if not args.only_missing_report else []:
        target = baselines_dir / f"seed{seed}.json"
        if not target.is_file() and (result := untrained_attack(args, cohort, seed)) is not None:
            atomic_write_json(target, result)
            print(f"[bench] untrained-seed{seed}: {result['seconds']:.0f} s", flush=True)
    by_name = {p.stem: json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))}
    settings = summarize(list(by_name.values()))
    untrained = [json.loads(p.read_text()) for p in sorted(baselines_dir.glob("*.json"))]
    if untrained:
        settings["untrained"] = {"mode": "untrained", "epsilon_target": None, "seeds": [u["seed"] for u in untrained],
                                 "failed": {}, "metrics": {f"mia_auc_{attack}": _stat(
                                     [u["membership"][attack]["auc"] for u in untrained]) for attack in ("dit", "mae")}}
    verdict = goals(settings)
    privacy_utility_figure(settings, FIGURE)
    shutil.copyfile(FIGURE, DOCS_FIGURE)
    seconds = time.perf_counter() - started
    line = summary_line(settings, verdict, seconds)
    atomic_write_json(RESULTS, {
        "benchmark": "privacy_utility", "summary": line, "settings": {k: str(v) for k, v in vars(args).items()},
        "schedule": schedule(args), "delta": DELTA, "results": settings, "goals": verdict,
        "untrained_attack": untrained,
        "per_run_seconds": {name: run["seconds"] for name, run in by_name.items()},
        "failed_runs": {name: run["failed"] for name, run in by_name.items() if "failed" in run},
        "seconds": seconds, "machine": machine_info(load_before),
    })
    print(line)


if __name__ == "__main__":
    main()
