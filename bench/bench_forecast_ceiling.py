"""What limits the forecast: the error a *perfect* token forecast would have, next to the DiT's and no-change.

Issue 14's forecast goal is a regional volume-change error ≥ 30 % below no-change. The residual forecast
(baseline + decode(forecast tokens) − decode(baseline tokens)) misses it. This benchmark separates the
DiT's share of that miss from the share of the encoder → decoder path and of the preprocessing, by scoring
on the same held-out pairs, with the same paired tissue measure (`generation.forecast_eval`):

| method | the follow-up predicted as |
|---|---|
| `no_change` | the baseline |
| `draw` | the residual of one forecast drawn from the DiT (ab2, `--steps`, unshifted time grid, guidance) |
| `mean` | the residual of the DiT's *conditional mean* forecast (`diffusion.conditional_mean`: one Euler step from t = 1, E[tokens | baseline, conditions]), the minimum-squared-error point forecast without a draw's unpredictable detail; what `forecast` makes by default |
| `oracle_cached` | the residual with the real follow-up's own cached tokens (what the DiT is trained to produce; the follow-up cropped to its own foreground) |
| `oracle_aligned` | the residual with the tokens of the real follow-up moved onto the baseline's voxels first, then encoded (`TokenCache.pair_tokens`: what the DiT now trains on) |
| `token_trend` | the residual of baseline tokens + interval × the annual token change of the pair's (modality, diagnosis) cell, least squares through the origin over every training pair the DiT trains on, pooled over sites; a cell of < 3 pairs takes its modality's, then all pairs' |
| `token_trend_pooled` | the same per modality only (all diagnoses pooled) |
| `token_trend_rank1` | `token_trend`'s rate projected on its modality's pooled direction (one pattern per modality, one gain per cell) |
| `token_trend_sites` | what the DiT's trend buffer holds (`DiTConfig.trend`): each site's sums without its cells of < 3 subjects (`site_change_trend`), merged, with the model's fallbacks; no network |

The two oracles are ceilings no DiT can pass through this decoder: if they do not beat no-change, a
better DiT cannot either. The token trends are population forecasts with no network: the prior the DiT's
flow now starts from (`ChangeTrendSums`; each cell keyed by the follow-up's conditions, as the DiT trains).
`--no-dit` scores the oracles and trends of a run whose DiT is not trained yet. Prints one summary line;
writes bench/results/forecast_ceiling[-NAME].json.

    python bench/bench_forecast_ceiling.py --run runs/long --sites runs/long-cohort/sites/*.yaml --name long
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine_info

from braing3n_core.data.transforms import preprocess_scan
from braing3n_core.evaluation.tissue import REGIONS
from braing3n_core.federation.site_round import site_change_trend
from braing3n_core.generation.forecast_eval import (
    HELD_OUT_SPLITS,
    aligned_follow_up,
    baseline_tissue,
    change_errors,
    longitudinal_pairs,
    truth_of,
    truth_volumes,
)
from braing3n_core.generation.forecasting import FORECAST_TIME_SHIFT, _known_at_follow_up, residual_forecast
from braing3n_core.generation.models import load_run_models
from braing3n_core.generation.sampling import decode
from braing3n_core.labels import DIAGNOSES, MODALITIES, Modality
from braing3n_core.models import ChangeTrendSums
from braing3n_core.models.conditions import conditions_from_labels
from braing3n_core.models.diffusion import conditional_mean, sample
from braing3n_core.site_config import load_site_configs
from braing3n_core.stage_names import DIT
from braing3n_core.training.centralized import prepare_sites
from braing3n_core.training.examples import change_trend_sums
from braing3n_core.training.stages import get_stage, stage_dataset

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("no_change", "draw", "mean", "oracle_cached", "oracle_aligned", "token_trend", "token_trend_pooled",
           "token_trend_rank1", "token_trend_sites")


def trend_rates(sites, num_tokens: int, dim: int) -> dict[str, torch.Tensor]:
    """Each token-trend method's annual change [M, D, N, E] in raw token units, all fitted by
    `ChangeTrendSums.rates` (least squares through the origin, a cell of < 3 pairs falling back to its
    modality's, then to all pairs') over the training pairs the DiT trains on."""
    stage, ones = get_stage(DIT), torch.ones(dim)
    pooled = functools.reduce(ChangeTrendSums.merge, [
        change_trend_sums(stage_dataset(stage, [site], "train"), num_tokens, dim) for site in sites])
    held = functools.reduce(ChangeTrendSums.merge, [site_change_trend(stage, site, num_tokens, dim) for site in sites])
    by_modality = ChangeTrendSums(num_tokens, dim)  # every cell holds its modality's pairs, all diagnoses
    by_modality.change_years[:] = pooled.change_years.sum(1, keepdim=True)
    by_modality.years_sq[:], by_modality.pairs[:] = pooled.years_sq.sum(1, keepdim=True), pooled.pairs.sum(1, keepdim=True)
    per_cell, per_modality = pooled.rates(ones), by_modality.rates(ones)
    gain = (per_cell * per_modality).sum((2, 3), keepdim=True) / (per_modality**2).sum((2, 3), keepdim=True).clamp_min(1e-12)
    print(f"token trends: {int(pooled.pairs.sum())} training pairs; as the DiT holds them {int(held.pairs.sum())} "
          f"in {int((held.pairs > 0).sum())} cells", file=sys.stderr)
    return {"token_trend": per_cell, "token_trend_pooled": per_modality, "token_trend_rank1": gain * per_modality,
            "token_trend_sites": held.rates(ones)}


def _bootstrap(statistic, *arrays: np.ndarray, seed: int = 0, n_boot: int = 1000) -> list[float]:
    """95 % percentile interval of `statistic(*arrays)` over pairs resampled with replacement."""
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    boot = [statistic(*(a[pick] for a in arrays)) for pick in (rng.integers(0, n, n) for _ in range(n_boot))]
    return [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--sites", nargs="*", help="site YAMLs (default: <run>/cohort/sites/*.yaml)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--name", default="")
    parser.add_argument("--no-dit", action="store_true", help="score the oracles and token trends only (no DiT yet)")
    args = parser.parse_args()
    load_before = load_average()
    started = time.perf_counter()
    models = load_run_models(args.run, need_encoder=True, need_dit=not args.no_dit)
    dit, encoder = models.dit, models.require_encoder("the aligned oracle")
    methods = tuple(m for m in METHODS if not (args.no_dit and m in ("draw", "mean")))
    site_files = args.sites or sorted(str(p) for p in (args.run / "cohort" / "sites").glob("*.yaml"))
    sites = prepare_sites(load_site_configs(site_files), models.preset, get_stage(DIT), encoder, models.device)
    shape = (1, models.preset.num_tokens, models.preset.mae.width)
    trends = trend_rates(sites, shape[1], shape[2])
    rows: list[dict[str, Any]] = []
    for site in sites:
        truth = truth_volumes(site.data.config.data_root)
        held = site.tokens.ensure([r for name in HELD_OUT_SPLITS for r in site.data.splits[name]])
        for pair in longitudinal_pairs(held):
            modality = Modality(pair.baseline.modality)
            baseline = preprocess_scan(pair.baseline.path, site.data.preset, site.data.cache)[0]  # [D, H, W]
            follow = aligned_follow_up(baseline, preprocess_scan(pair.follow_up.path, site.data.preset, site.data.cache)[0])
            base_tokens = site.tokens.tokens(pair.baseline)[None]
            cond = conditions_from_labels([_known_at_follow_up(pair.baseline.labels, pair.years)], [modality])
            interval = torch.tensor([pair.years])
            common = {"guidance_scale": args.guidance, "baseline": base_tokens, "interval": interval}
            tokens = {} if dit is None else {
                "draw": sample(dit, shape, cond, steps=args.steps, generator=torch.Generator().manual_seed(0),
                               time_shift=FORECAST_TIME_SHIFT, **common),
                "mean": conditional_mean(dit, shape, cond, generator=torch.Generator().manual_seed(0), **common),
            }
            tokens |= {
                "oracle_cached": site.tokens.tokens(pair.follow_up)[None],
                "oracle_aligned": site.tokens.pair_tokens(pair.follow_up, pair.baseline)[None],
                **{name: base_tokens + pair.years * rates[MODALITIES.index(modality),
                                                          DIAGNOSES.index(pair.baseline.labels.diagnosis)][None]
                   for name, rates in trends.items()},
            }
            names = list(tokens)
            decoded = decode(models.decoder, torch.cat([tokens[n].float().cpu() for n in names] + [base_tokens.float()]))
            reconstructed = decoded[-1, 0].numpy()
            volumes = {n: residual_forecast(baseline, decoded[i, 0].numpy(), reconstructed) for i, n in enumerate(names)}
            tissue = baseline_tissue(baseline, modality, site.data.preset)
            actual = tissue.change(follow)
            changes = {"no_change": dict.fromkeys(REGIONS, 0.0)} | {n: tissue.change(v) for n, v in volumes.items()}
            row: dict[str, Any] = {"site": site.data.config.site_id, "subject": pair.baseline.subject,
                                   "years": pair.years, "actual": actual,
                                   "error": {m: change_errors(changes[m], actual)["mean"] for m in methods}}
            before, after = truth_of(truth, pair.baseline), truth_of(truth, pair.follow_up)
            if before is not None and after is not None:
                true_change = {r: after[r] - before[r] for r in REGIONS}
                changes["measured"] = actual
                row["truth_error"] = {m: change_errors(changes[m], true_change)["mean"] for m in (*methods, "measured")}
            rows.append(row)
            print(f"{row['site']} {row['subject']} {pair.years:.1f} y: "
                  + " ".join(f"{m} {row['error'][m]:.1f}" for m in methods), file=sys.stderr, flush=True)
    errors = {m: np.array([row["error"][m] for row in rows]) for m in methods}
    base = errors["no_change"]
    summary = {m: {"mean_ml": float(errors[m].mean()), "ci": _bootstrap(np.mean, errors[m]),
                   "vs_no_change": float(1 - errors[m].sum() / base.sum()),
                   "vs_no_change_ci": _bootstrap(lambda e, b: 1 - e.sum() / b.sum(), errors[m], base)}
               for m in methods}
    with_truth = [row for row in rows if "truth_error" in row]
    truth_summary = {m: float(np.mean([row["truth_error"][m] for row in with_truth]))
                     for m in (*methods, "measured")} if with_truth else {}
    result = {"benchmark": "forecast_ceiling", "run": str(args.run), "steps": args.steps, "guidance": args.guidance,
              "time_shift": FORECAST_TIME_SHIFT, "n_pairs": len(rows), "summary": summary, "truth": truth_summary,
              "pairs": rows, "seconds": time.perf_counter() - started, "machine": machine_info(load_before)}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"forecast_ceiling{'-' + args.name if args.name else ''}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"forecast ceiling ({len(rows)} held-out pairs): regional change error vs no-change "
          + ", ".join(f"{m} {summary[m]['mean_ml']:.1f} ml ({100 * summary[m]['vs_no_change']:+.0f} %)" for m in methods)
          + f" -> {out}")


if __name__ == "__main__":
    main()
