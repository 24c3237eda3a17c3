"""Generation proof benchmark: `braing3n evaluate-generation --forecast` on a trained run, against its baselines.

On a run trained as the demo trains it (`braing3n demo --out runs/demo`, the default), over the demo's
own four sites: the adherence table (generated / real-held-out ceiling / unconditioned floor / swapped
control), FD and MMD against real-vs-real at equal sizes, the guidance sweep, and the forecasting table
(forecast, residual forecast, linear trend vs no-change). Goals (issue 14):
- adherence error on generated ≤ 1.2× that on real for age, diagnosis and modality;
- FD generated-vs-real within 2× of real-vs-real (equal sizes);
- forecast regional volume-change error ≥ 30 % below no-change.

Prints one summary line; writes bench/results/generation.json, or generation-NAME.json with `--name` (the
longer run of `runs-config/long.yaml` is `--name long`), with the machine's load: it is shared.

    python bench/bench_generation.py [--run runs/demo] [--n 8] [--steps 8] [--guidance 1.0,1.5,3.0] [--name NAME]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine_info

from braing3n_core.generation.evaluation import NOISE, SWAPPED, UNCONDITIONED, guided_set
from braing3n_core.jobs.evaluate_generation import evaluate_generation, summary_line

RESULTS = Path(__file__).resolve().parent / "results"
# (probe metric, lower is better): the adherence errors the goals speak of
GOAL_METRICS = {"age_mae": True, "diagnosis_bacc": False, "modality_bacc": False}


def _get(tree: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def adherence_table(generation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """metric → generated at each guidance, swapped, unconditioned, real ceiling, chance (token space)."""
    table = {}
    ceiling = generation["ceiling"]["pooled"]
    metrics = sorted({k.removeprefix("gen/adherence_") for spaces in generation["adherence"].values()
                      for k in spaces["token"]})
    for metric in metrics:
        row = {name: _get(generation, "adherence", name, "token", f"gen/adherence_{metric}")
               for name in generation["adherence"]}
        row |= {"real": ceiling.get(f"probe/{metric}"), "chance": ceiling.get(f"probe/{metric}_chance")}
        table[metric] = row
    return table


def goals(result: dict[str, Any]) -> dict[str, Any]:
    generation = result["generation"]
    best = guided_set(generation["default_guidance"])
    table = adherence_table(generation)
    out: dict[str, Any] = {}
    for metric, lower_better in GOAL_METRICS.items():
        row = table.get(metric, {})
        generated, real = row.get(best), row.get("real")
        if generated is None or real is None:
            out[f"adherence_{metric}"] = {"met": None, "note": "not measured (task not probed)"}
            continue
        # error: MAE itself; for accuracies, 1 − accuracy
        error_gen, error_real = (generated, real) if lower_better else (1 - generated, 1 - real)
        ratio = error_gen / max(error_real, 1e-12)
        out[f"adherence_{metric}"] = {"generated_error": error_gen, "real_error": error_real, "ratio": ratio,
                                      "met": ratio <= 1.2}
    pooled = generation["pooled"]
    fd_half, rvr = _get(pooled, "sets", best, "token", "fd_half", "value"), _get(pooled, "real_vs_real", "token", "fd")
    # Pooled, the equal-size FD needs as many samples as half the federation's held-out scans; each site's own
    # equal-size comparison needs only half of that site's.
    per_site = {}
    for site, scores in generation["sites"].items():
        half, floor = _get(scores, "sets", best, "token", "fd_half", "value"), _get(scores, "real_vs_real", "token", "fd", "value")
        if half is not None and floor:
            per_site[site] = {"generated_equal_size": half, "real_vs_real": floor, "ratio": half / floor}
    out["fd_within_2x_real_vs_real"] = {"generated_equal_size": fd_half, "real_vs_real": rvr,
                                        "ratio": None if fd_half is None or not rvr else fd_half / rvr,
                                        "met": None if fd_half is None or not rvr else fd_half / rvr <= 2.0,
                                        "per_site": per_site,
                                        "met_per_site": {site: v["ratio"] <= 2.0 for site, v in per_site.items()}}
    improvement = _get(result, "forecast", "pooled", "improvement") or {}
    for method, value in improvement.items():
        out[f"forecast_{method}_30pct_below_no_change"] = {**value, "met": value["value"] >= 0.30}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="a trained run folder (default: the demo's)")
    parser.add_argument("--sites", nargs="+", help="site YAMLs (default: <run>/cohort/sites/*.yaml)")
    parser.add_argument("--out", default=None, help="evaluation run folder (default: <run>-generation-eval)")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--guidance", default="1.0,1.5,3.0")
    parser.add_argument("--no-forecast", dest="forecast", action="store_false")
    parser.add_argument("--name", default="", help="results file generation-NAME.json (default: generation.json)")
    args = parser.parse_args()
    run = Path(args.run)
    sites = [Path(p) for p in args.sites] if args.sites else sorted((run / "cohort" / "sites").glob("*.yaml"))
    out = Path(args.out) if args.out else run.with_name(run.name + "-generation-eval")
    load = load_average()
    started = time.perf_counter()
    result = evaluate_generation(run, sites, out, n=args.n, steps=args.steps,
                                 guidance=[float(g) for g in args.guidance.split(",")], forecast=args.forecast)
    seconds = time.perf_counter() - started
    generation = result["generation"]
    record = {
        "run": str(run), "sites": [str(s) for s in sites], "n": args.n, "steps": args.steps,
        "guidance": generation["guidance"], "seconds": seconds, "summary": summary_line(result),
        "adherence": adherence_table(generation),
        "fidelity": {name: _get(generation, "pooled", "sets", name) for name in generation["pooled"]["sets"]},
        "real_vs_real": generation["pooled"]["real_vs_real"],
        "diversity": generation["diversity"],
        "forecast": _get(result, "forecast", "pooled"),
        "goals": goals(result),
        "sets": {"swapped": SWAPPED, "unconditioned": UNCONDITIONED, "noise": NOISE},
        "machine": machine_info(load),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / (f"generation-{args.name}.json" if args.name else "generation.json")).write_text(
        json.dumps(record, indent=1, default=str))
    print(f"generation ({args.n} per set, {args.steps} steps, {seconds:.0f} s): {record['summary']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
