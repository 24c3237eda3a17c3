"""The federated evaluation of generation and forecasting (`generation_eval` in the run YAML).

1. The server loads the DiT and decoder, generates every set of `generation.evaluation` (guidance sweep,
   swapped-conditions control, unconditioned, noise) and scores their adherence with the federated probe
   heads (the training run's, or this run's own when `probes.enabled`).
2. `generation_scores` query: the generated *features* and the heads go to every site; each answers
   distances between sets, the probes' ceiling on its test subjects, and sums for pooling.
3. With `forecast`: `trend_census` (training subjects' annual change sums) → one federated trend →
   `forecast_scores` with the DiT, decoder and trend: each site forecasts its held-out subjects and
   answers sums of errors. No patient's feature, distance or error leaves a site.

Everything lands in `<run>/generation_eval.json` and as `generation_eval` lines in metrics.jsonl.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from braing3n_core.checkpoint import load_checkpoint
from braing3n_core.federation.arrays import module_arrays
from braing3n_core.federation.probes import head_arrays, heads_from_arrays, pooled_probe_metrics, tasks_from_json
from braing3n_core.federation.protocol import (
    Action,
    ForecastScoresQuery,
    GenerationScoresQuery,
    Record,
    ScoresReply,
)
from braing3n_core.federation.run_folder import RunFolder
from braing3n_core.figures import plot_montage
from braing3n_core.fileio import atomic_write_json, json_safe
from braing3n_core.generation.condition_table import balanced_conditions
from braing3n_core.generation.evaluation import (
    SWAPPED,
    UNCONDITIONED,
    adherence,
    diversity,
    features_to_arrays,
    fourier_kernels,
    generate_sets,
    guided_set,
    pooled_distances,
    pooled_diversity,
)
from braing3n_core.generation.forecast_eval import TrendModel, pooled_forecast
from braing3n_core.generation.models import GenerationModels, load_generation_models
from braing3n_core.labels import DIAGNOSES
from braing3n_core.stage_names import DECODER, DIT, MAE, PROBES
from server.aggregation import reply_site, to_array_record
from server.session import Federation, FederationError, say

STAGE = "generation_eval"


def _heads(federation: Federation) -> tuple[dict, dict, str, Path]:
    """The federated probe heads, their priors and tasks JSON: the given checkpoint or this run's probes."""
    settings = federation.config.generation_eval
    path = settings.probes if settings.probes is not None else federation.run.final_path(PROBES)
    if not Path(path).with_suffix(".json").is_file():
        raise FederationError(f"generation_eval: no probe heads at {path}")
    checkpoint = RunFolder.read(load_checkpoint(path))
    if checkpoint.meta.get("encoder_sha256") not in (None, federation.encoder_sha):
        raise FederationError(f"{path}: probes of another encoder than this run's {federation.encoder_sha[:12]}…")
    pairs = tasks_from_json(checkpoint.meta["tasks_json"])
    heads = heads_from_arrays([task for task, _ in pairs], checkpoint.model)
    return heads, {task.name: prior for task, prior in pairs}, checkpoint.meta["tasks_json"], Path(path)


def _scores(reply) -> dict[str, Any]:
    return ScoresReply.from_config(reply.content.config_records[Record.SITE]).scores


def _generation(federation: Federation, models: GenerationModels, heads, priors, tasks_json: str) -> dict[str, Any]:
    settings = federation.config.generation_eval
    started = time.perf_counter()
    rows = balanced_conditions(settings.n, settings.seed)
    sets = generate_sets(models, rows, guidances=settings.guidance, default_guidance=settings.default_guidance,
                         steps=settings.steps, seed=settings.seed)
    seconds = time.perf_counter() - started
    say(f"generation_eval: {len(sets)} sets of {settings.n} generated in {seconds:.0f} s")
    montage = _montage(federation.run, sets, guided_set(settings.default_guidance))
    kernels = fourier_kernels(sets, guided_set(settings.default_guidance) if settings.default_guidance in settings.guidance
                              else sets[0].name, settings.seed)
    query = GenerationScoresQuery(kernels={space: {"width": k.width, "bandwidth": k.bandwidth, "seed": k.seed,
                                                   "features": k.features} for space, k in kernels.items()},
                                  tasks=tasks_json, seed=settings.seed)
    arrays = {Record.FEATURES: to_array_record(features_to_arrays(sets))}
    if heads:
        arrays[Record.ARRAYS] = to_array_record(head_arrays(heads))
    per_site, sums = {}, []
    for reply in federation.query(Action.GENERATION_SCORES, STAGE, query, arrays=arrays):
        site = reply_site(reply, federation.node_sites)
        per_site[site] = _scores(reply)
        sums.append({k: v.numpy() for k, v in reply.content.array_records.get(Record.ARRAYS, {}).items()})
        federation.run.log(STAGE, 0, site, "generation_scores", n_held=per_site[site]["n_held"])
    if not per_site:
        raise FederationError("generation_eval: no site returned generation scores")
    probes = {s: v["probes"] for s, v in per_site.items() if "probes" in v}
    tasks = [task for task, _ in tasks_from_json(tasks_json)]
    return {
        "n": settings.n, "steps": settings.steps, "guidance": list(settings.guidance),
        "default_guidance": settings.default_guidance, "seed": settings.seed, "seconds_generating": seconds,
        "conditions": [r.to_dict() for r in rows],
        "adherence": adherence(heads, sets),
        "ceiling": {"pooled": pooled_probe_metrics(tasks, probes),
                    "sites": {s: {k: v for k, v in m.items() if not k.startswith("sums/")} for s, m in probes.items()}},
        "pooled": pooled_distances(sums, sets, kernels, settings.seed),
        "sites": {s: {k: v for k, v in m.items() if k != "probes"} for s, m in per_site.items()},
        "diversity": {"generated": diversity(sets, settings.seed), "real": pooled_diversity(per_site)},
        "kernels": query.kernels, "montage": montage,
    }


def _montage(run: RunFolder, sets, default: str) -> str:
    """Mid-slices of the first sample per diagnosis: one row per set (generated, swapped, unconditioned)."""
    rows, labels = [], []
    for generated in sets:
        if generated.name not in (default, SWAPPED, UNCONDITIONED):
            continue
        picks = list(range(min(len(DIAGNOSES), len(generated.volumes))))
        rows.append([(generated.requested[i].describe(), generated.volumes[i, 0].numpy()) for i in picks])
        labels.append(generated.name)
    path = run.figures_dir / "generation_samples.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_montage(rows, path, labels)
    return path.name


def _forecast(federation: Federation, models: GenerationModels) -> dict[str, Any]:
    settings = federation.config.generation_eval
    censuses = {reply_site(r, federation.node_sites): _scores(r) for r in federation.query(Action.TREND_CENSUS, STAGE)}
    trend = TrendModel.fit(list(censuses.values()))
    say(f"generation_eval: linear trend from {sum(c['n_pairs'] for c in censuses.values())} training pairs")
    dit = models.require_dit()
    query = ForecastScoresQuery(dit_config=dit.config.to_dict(), decoder_config=models.decoder.config.to_dict(),
                                trend=trend.to_json(), steps=settings.steps, guidance_scale=settings.default_guidance,
                                seed=settings.seed)
    arrays = {Record.DIT: to_array_record(module_arrays(dit)), Record.DECODER: to_array_record(module_arrays(models.decoder))}
    per_site = {}
    for reply in federation.query(Action.FORECAST_SCORES, STAGE, query, arrays=arrays):
        site = reply_site(reply, federation.node_sites)
        per_site[site] = _scores(reply)
        federation.run.log(STAGE, 0, site, "forecast_scores", n_subjects=per_site[site]["n_subjects"])
    return {"trend": {"model": trend.to_json(), "training_pairs": {s: c["n_pairs"] for s, c in censuses.items()}},
            "pooled": pooled_forecast(per_site), "sites": per_site}


def run_generation_eval(federation: Federation) -> Path:
    settings = federation.config.generation_eval
    federation.ensure_encoder(STAGE)
    dit, decoder = (getattr(settings, stage) or federation.config.start_from.get(stage)
                    or federation.run.final_path(stage) for stage in (DIT, DECODER))  # given, or this run's own
    models = load_generation_models(dit, decoder, encoder=federation.config.start_from.get(MAE)
                                    or federation.run.final_path(MAE))
    if models.encoder_sha256 != federation.encoder_sha:
        raise FederationError(f"{decoder}: trained on encoder {models.encoder_sha256[:12]}…, this run's is "
                              f"{federation.encoder_sha[:12]}…")
    heads, priors, tasks_json, probes_path = _heads(federation)
    result: dict[str, Any] = {"models": {k: str(v) for k, v in models.checkpoints.items()}, "probes": str(probes_path),
                              "encoder_sha256": federation.encoder_sha,
                              "generation": _generation(federation, models, heads, priors, tasks_json)}
    if settings.forecast:
        result["forecast"] = _forecast(federation, models)
    atomic_write_json(federation.run.generation_eval_path, json_safe(result))
    federation.run.log(STAGE, 0, "aggregate", "generation_eval", **_headline(result))
    return federation.run.generation_eval_path


def _headline(result: dict[str, Any]) -> dict[str, float]:
    """The few numbers metrics.jsonl carries (the JSON has everything)."""
    out: dict[str, float] = {}
    generation = result["generation"]
    for name, spaces in generation["pooled"]["sets"].items():
        fd = spaces.get("token", {}).get("fd", {}).get("value")
        if fd is not None:
            out[f"gen/fd_{name}"] = float(fd)
    rvr = generation["pooled"]["real_vs_real"].get("token")
    if rvr:
        out["gen/fd_real_vs_real"] = float(rvr["fd"])
    if "forecast" in result:
        for method, value in result["forecast"]["pooled"].get("improvement", {}).items():
            out[f"forecast/improvement_{method}"] = float(value["value"])
    return {k: v for k, v in out.items() if np.isfinite(v)}
