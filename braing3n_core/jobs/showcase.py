"""What a finished federated run's models do, shown on the sites' own scans.

For the report (`braing3n_core.report`) of a run folder holding final MAE, decoder and DiT checkpoints:

- **reconstructions**: held-out (test-split) scans → frozen encoder tokens → decoder, with PSNR/SSIM;
- **conditional samples**: the DiT samples encoder tokens for a few condition sets (e.g. CN at 30 vs AD
  at 80, glioma on T1c and FLAIR), decoded to volumes and written as NIfTI;
- **a longitudinal forecast**: a held-out subject's baseline scan + the interval to its real follow-up
  → forecast tokens → volume, next to the real follow-up;
- **centralized probes** (comparison only): scikit-learn probes on the same frozen features pooled on
  one machine, trained on every site's train+val subjects and scored on the same held-out subjects as
  the federated benchmark; also used to read age/diagnosis/modality back from the samples' tokens.

Where it runs: every step reads scans, so in a deployment each part runs at the hospital that holds
them (a forecast at the patient's own site). In a simulation all virtual sites live on this machine, so
this module reads their data here; it never writes into a site's data, only into the run folder (the
sites' own token caches are read, or filled, exactly as the site clients do).

Outputs (`<run>/report/`): `reconstructions.png`, `samples.png`, `forecast.png`, `samples/*.nii.gz`,
and `showcase.json`, which the report reads. Models, sampling, forecasting and NIfTI/montage writing
are `braing3n_core.generate`'s; this module chooses what to show and describes it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from braing3n_core.data.bids import ScanRecord
from braing3n_core.data.datasets import SiteData, load_site
from braing3n_core.data.tokens import TokenCache
from braing3n_core.data.transforms import preprocess_scan
from braing3n_core.errors import BadInput
from braing3n_core.evaluation.features import pooled_features, probe_table
from braing3n_core.evaluation.probe_splits import SubjectSplit
from braing3n_core.evaluation.probe_tasks import ProbeTable, ProbeTask, SkippedTask, TaskKind, select_tasks
from braing3n_core.evaluation.probes import ProbeReport, fit_probes, run_probes
from braing3n_core.federation.run_folder import RunFolder
from braing3n_core.figures import plot_montage
from braing3n_core.fileio import atomic_write_json, json_safe
from braing3n_core.generation.condition_table import ConditionRow
from braing3n_core.generation.forecasting import forecast as forecast_scan
from braing3n_core.generation.forecasting import volume_scores
from braing3n_core.generation.models import GenerationError, GenerationModels, load_run_models
from braing3n_core.generation.output import write_forecast, write_samples
from braing3n_core.generation.sampling import decode, generate
from braing3n_core.jobs.report import FIGURE_DIR
from braing3n_core.labels import Modality
from braing3n_core.models.diffusion import DEFAULT_STEPS
from braing3n_core.site_config import SiteConfig
from braing3n_core.training.examples import longitudinal_pairs

WHERE = (
    "In a deployment each of these steps runs at the hospital that holds the scans (the forecast at the "
    "patient's own site); no scan leaves it. This run was a simulation: all virtual sites' data lies on this "
    "machine, so reconstructions, samples and the forecast were computed here, from each site's own files and "
    "caches, with the run's final global checkpoints."
)


class ShowcaseError(BadInput, RuntimeError):
    """The run folder lacks what a showcase needs; the message names the file."""


DEMO_REQUESTS: tuple[ConditionRow, ...] = (
    ConditionRow(Modality.T1W, age=30.0, sex="F", diagnosis="CN", field_strength=3.0, label="CN, 30 y, T1w"),
    ConditionRow(Modality.T1W, age=80.0, sex="F", diagnosis="AD", field_strength=3.0, label="AD, 80 y, T1w"),
    ConditionRow(Modality.T1C, age=55.0, sex="M", diagnosis="glioma", field_strength=3.0, label="glioma, 55 y, T1c"),
    ConditionRow(Modality.FLAIR, age=55.0, sex="M", diagnosis="glioma", field_strength=3.0, label="glioma, 55 y, FLAIR"),
)


@dataclass(frozen=True)
class ShowcaseOptions:
    reconstructions: int = 4  # held-out scans, one per site in turn
    requests: tuple[ConditionRow, ...] = DEMO_REQUESTS
    sample_steps: int = DEFAULT_STEPS  # one network call each (the ab2 solver)
    guidance: float = 1.5
    seed: int = 0
    centralized_probes: bool = True


@dataclass
class ShowcaseSite:
    data: SiteData
    tokens: TokenCache


# --- loading ---------------------------------------------------------------------------------------------------


def load_models(run_dir: Path) -> GenerationModels:
    """The run's decoder, frozen encoder and (when trained) DiT, checked to share the encoder."""
    try:
        return load_run_models(run_dir, need_dit=False, need_encoder=True)
    except GenerationError as error:
        raise ShowcaseError(f"{error}; the run must finish the mae and decoder stages") from None


def load_sites(site_configs: Sequence[SiteConfig], models: GenerationModels) -> list[ShowcaseSite]:
    sites = []
    for config in site_configs:
        data = load_site(config, models.preset, progress=False)
        tokens = TokenCache(config.resolved_cache_dir, models.require_encoder("the showcase"), models.preset, data.cache)
        sites.append(ShowcaseSite(data, tokens))
    return sites


# --- pieces ------------------------------------------------------------------------------------------------------


def _describe(record: ScanRecord) -> dict[str, Any]:
    return {"site": record.site_id, "subject": record.subject, "session": record.session,
            "modality": Modality(record.modality).short, "age": record.labels.age, "diagnosis": record.labels.diagnosis}


@torch.no_grad()
def reconstructions(models: GenerationModels, sites: Sequence[ShowcaseSite], count: int, out: Path) -> dict[str, Any]:
    """`count` held-out scans (sites in turn, modalities varied) → tokens → decoder."""
    queues = [list(site.tokens.ensure(site.data.splits["test"])) for site in sites]
    chosen: list[tuple[ShowcaseSite, ScanRecord]] = []
    seen_modalities: set[str] = set()
    while len(chosen) < count and any(queues):
        for site, queue in zip(sites, queues):
            if not queue or len(chosen) >= count:
                continue
            # prefer a modality not shown yet, so the montage covers the sequences the sites hold
            pick = next((r for r in queue if Modality(r.modality).value not in seen_modalities), queue[0])
            queue.remove(pick)
            seen_modalities.add(Modality(pick.modality).value)
            chosen.append((site, pick))
    if not chosen:
        return {}
    items, rows, labels = [], [], []
    for site, record in chosen:
        target = preprocess_scan(record.path, site.data.preset, site.data.cache)[0]  # [D, H, W]
        output = decode(models.decoder, site.tokens.tokens(record)[None])[0, 0].numpy()  # [D, H, W]
        value_psnr, value_ssim = volume_scores(output, target)
        items.append({**_describe(record), "psnr": value_psnr, "ssim": value_ssim})
        rows.append([("input", target), ("reconstruction", output)])
        labels.append(f"{record.site_id} {record.subject} {Modality(record.modality).short}")
    image = plot_montage(rows, out / "reconstructions.png", labels)
    return {"image": f"{FIGURE_DIR}/{image.name}", "items": items,
            "mean_psnr": float(np.mean([i["psnr"] for i in items])), "mean_ssim": float(np.mean([i["ssim"] for i in items]))}


@torch.no_grad()
def conditional_samples(models: GenerationModels, options: ShowcaseOptions, out: Path) -> tuple[dict[str, Any], torch.Tensor]:
    """One sample per request (one batched ODE solve), decoded; returns the showcase entry and the tokens."""
    requests = list(options.requests)
    samples = generate(models, requests, steps=options.sample_steps, guidance_scale=options.guidance,
                       seed=options.seed, batch_size=len(requests))
    paths, image = write_samples(samples, models.preset, out / "samples", montage=out / "samples.png", per_row=2)
    items = [{"label": request.describe(), "conditions": {k: v for k, v in request.to_dict().items() if v is not None},
              "nifti": f"{FIGURE_DIR}/samples/{path.name}"} for request, path in zip(requests, paths)]
    entry = {"image": f"{FIGURE_DIR}/{image.name}", "items": items, "steps": options.sample_steps,
             "guidance": options.guidance, "seed": options.seed, "seconds_per_volume": samples.seconds_per_volume}
    return entry, samples.tokens


def _forecast_pair(sites: Sequence[ShowcaseSite]) -> tuple[ShowcaseSite, ScanRecord, ScanRecord] | None:
    """The held-out (test-split) baseline → follow-up pair with the longest interval, T1w preferred;
    validation subjects when no test subject has a follow-up."""
    for split in ("test", "val"):
        best = None
        for site in sites:
            records = site.tokens.ensure(site.data.splits[split])
            for later, earlier in longitudinal_pairs(records):
                follow, base = records[later], records[earlier]
                key = (Modality(follow.modality) is Modality.T1W, follow.labels.age - base.labels.age)
                if best is None or key > best[0]:
                    best = (key, site, base, follow)
        if best is not None:
            return best[1], best[2], best[3]
    return None


def forecast(models: GenerationModels, sites: Sequence[ShowcaseSite], options: ShowcaseOptions, out: Path) -> dict[str, Any] | None:
    """The chosen held-out subject's baseline + the interval to its real follow-up → forecast
    (`generate.forecast`), scored against that follow-up."""
    found = _forecast_pair(sites)
    if found is None:
        return None
    site, base, follow = found
    interval = float(follow.labels.age - base.labels.age)
    result = forecast_scan(models, site.data, site.tokens, base, interval, follow_up=follow, steps=options.sample_steps,
                           guidance_scale=options.guidance, seed=options.seed)
    _, image = write_forecast(result, models.preset, out / "samples" / "forecast.nii.gz", out / "forecast.png")
    short = Modality(follow.modality).short
    split = "test" if base in site.data.splits["test"] else "validation"
    description = (
        f"Subject {base.subject} of {site.data.config.site_id} ({split} split, never trained on), {short}, "
        f"{base.labels.diagnosis or 'diagnosis not recorded'}: baseline at {base.labels.age:.1f} y ({base.session}), "
        f"forecast {interval:.1f} years ahead, real follow-up at {follow.labels.age:.1f} y ({follow.session}). The "
        f"forecast conditions on the baseline's tokens, the interval, and what is known at baseline (sex, diagnosis, "
        f"sequence, field strength, target age). It ran with {site.data.config.site_id}'s data on its own machine — "
        f"in this simulation, this machine."
    )
    scores = result.scores
    # The forecast shown and written is the residual one (`write_forecast`); the direct decode is its baseline.
    return {"image": f"{FIGURE_DIR}/{image.name}", "site": site.data.config.site_id, "subject": base.subject,
            "modality": short, "baseline_age": base.labels.age, "followup_age": follow.labels.age, "interval": interval,
            "split": split, "psnr_forecast": scores["forecast/residual_psnr"],
            "ssim_forecast": scores["forecast/residual_ssim"],
            "psnr_direct": scores["forecast/psnr"], "ssim_direct": scores["forecast/ssim"],
            "psnr_baseline": scores["forecast/baseline_psnr"], "ssim_baseline": scores["forecast/baseline_ssim"],
            "description": description, "nifti": f"{FIGURE_DIR}/samples/forecast.nii.gz"}


def _pooled(sites: Sequence[ShowcaseSite]) -> tuple[np.ndarray, ProbeTable, np.ndarray]:
    """Pooled features [n, E], their labels, and a held-out mask (each site's test subjects)."""
    features, records, held_out = [], [], []
    for site in sites:
        for split in ("train", "val", "test"):
            usable = site.tokens.ensure(site.data.splits[split])
            features.append(pooled_features(site.tokens, usable) if usable else np.zeros((0, site.tokens.encoder.config.width)))
            records += usable
            held_out += [split == "test"] * len(usable)
    return np.concatenate(features).astype(np.float64), probe_table(records), np.asarray(held_out, dtype=bool)


@dataclass
class CentralizedProbes:
    report: ProbeReport
    tasks: dict[str, ProbeTask]
    features: np.ndarray  # [n, E] pooled real features
    table: ProbeTable


def centralized_probes(sites: Sequence[ShowcaseSite], encoder_sha: str) -> CentralizedProbes:
    """One task at a time, so that a task whose fit fails (e.g. too few subjects of a class for the inner
    cross-validation) is reported as skipped with the reason instead of costing every other task."""
    features, table, held_out = _pooled(sites)
    split = SubjectSplit.from_masks(~held_out, held_out, table.subjects)
    tasks, skipped = select_tasks(table)
    results, fitted, settings = [], {}, {}
    for task in tasks:
        try:
            report = run_probes(features, table, split=split, tasks=[task])
        except ValueError as error:
            skipped.append(SkippedTask(task.name, f"probe fit failed: {error}"))
            continue
        results += report.results
        skipped += report.skipped
        settings = report.settings
        fitted[task.name] = task
    report = ProbeReport(tuple(results), tuple(skipped), f"frozen encoder {encoder_sha[:12]}, pooled", settings)
    return CentralizedProbes(report, fitted, features, table)


def probe_estimates(probes: CentralizedProbes, tokens: torch.Tensor,
                    task_names: Sequence[str] = ("age", "diagnosis", "modality")) -> list[dict[str, Any]]:
    """What probes fitted on all real scans read from generated tokens [B, N, E]: a number for regression
    tasks, the most likely class otherwise."""
    tasks = [probes.tasks[name] for name in task_names if name in probes.tasks]
    estimates: list[dict[str, Any]] = [{} for _ in range(len(tokens))]
    if not tasks:
        return estimates
    try:
        fitted = fit_probes(probes.features, probes.table, tasks=tasks)
    except ValueError as error:  # the estimates are a check, not a result: say why they are missing
        return [{"error": f"probe fit failed: {error}"} for _ in range(len(tokens))]
    pooled = tokens.float().mean(dim=1).numpy().astype(np.float64)  # [B, E], the probe feature
    for name, probe in fitted.items():
        scores = probe.predict_scores(pooled)
        for row, estimate in enumerate(estimates):
            if probe.task.kind is TaskKind.REGRESSION:
                estimate[name] = float(scores[row])
            else:
                label = probe.task.classes[int(np.argmax(scores[row]))]
                estimate[name] = Modality(label).short if name == "modality" else label
    return estimates


# --- the whole showcase ------------------------------------------------------------------------------------------


def run_showcase(run_dir: Path, site_configs: Sequence[SiteConfig], options: ShowcaseOptions = ShowcaseOptions(),
                 say=print) -> Path:
    """Compute every part the run supports and write `<run>/report/showcase.json`; returns its path."""
    started = time.perf_counter()
    out = RunFolder(run_dir).figures_dir
    out.mkdir(parents=True, exist_ok=True)
    models = load_models(run_dir)
    sites = load_sites(site_configs, models)
    result: dict[str, Any] = {"where": WHERE, "preset": models.preset.name}
    probes = None
    if options.centralized_probes:
        try:
            probes = centralized_probes(sites, models.encoder_sha256)
        except ValueError as error:  # a comparison only: the federated results stand without it
            result["centralized_probes_error"] = str(error)
            say(f"centralized probes (comparison) failed: {error}")
        else:
            result["centralized_probes"] = probes.report.to_dict()
            say(f"centralized probes (comparison): {len(probes.report.results)} tasks on {len(probes.table)} pooled scans")
    result["reconstructions"] = reconstructions(models, sites, options.reconstructions, out)
    if result["reconstructions"]:
        say(f"reconstructions: {len(result['reconstructions']['items'])} held-out scans, mean PSNR "
            f"{result['reconstructions']['mean_psnr']:.2f} dB, SSIM {result['reconstructions']['mean_ssim']:.3f}")
    if models.dit is None:
        result["forecast_skipped"] = "the run has no final DiT checkpoint"
    else:
        entry, tokens = conditional_samples(models, options, out)
        if probes is not None:
            for item, estimate in zip(entry["items"], probe_estimates(probes, tokens)):
                item["probe_estimates"] = estimate
        result["samples"] = entry
        say(f"conditional samples: {len(entry['items'])} ({', '.join(i['label'] for i in entry['items'])})")
        predicted = forecast(models, sites, options, out)
        if predicted is None:
            result["forecast_skipped"] = "no held-out subject with a follow-up scan in any site"
        else:
            result["forecast"] = predicted
            say(f"forecast: {predicted['site']} {predicted['subject']} +{predicted['interval']:.1f} y, PSNR vs real "
                f"follow-up {predicted['psnr_forecast']:.2f} dB (baseline as-is: {predicted['psnr_baseline']:.2f} dB; "
                f"the decoded forecast tokens alone: {predicted['psnr_direct']:.2f} dB)")
    result["seconds"] = time.perf_counter() - started
    path = RunFolder(run_dir).showcase_path
    atomic_write_json(path, json_safe(result))
    return path

