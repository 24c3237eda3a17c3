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
and `showcase.json`, which the report reads. Sampling goes through `diffusion.sample` + the decoder.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from braing3n_core.config import SiteConfig
from braing3n_core.conditions import conditions_from_labels
from braing3n_core.data.bids import ScanRecord
from braing3n_core.data.cache import preprocess_scan
from braing3n_core.data.datasets import SiteData, load_site
from braing3n_core.diffusion import sample
from braing3n_core.fileio import atomic_write_bytes, atomic_write_json
from braing3n_core.labels import Modality, ScanLabels
from braing3n_core.metrics import psnr, ssim
from braing3n_core.models import CNNDecoder, DiT, MAEEncoder
from braing3n_core.presets import Preset, get_preset
from braing3n_core.probes import (
    ProbeReport, ProbeTable, ProbeTask, SkippedTask, SubjectSplit, TaskKind, fit_probes, run_probes, select_tasks,
)
from braing3n_core.report import FIGURE_DIR, SHOWCASE_NAME, plot_montage
from braing3n_core.stages import longitudinal_pairs
from braing3n_core.tokens import TokenCache, pooled_features, probe_table
from braing3n_core.train import load_encoder, load_stage_model

WHERE = (
    "In a deployment each of these steps runs at the hospital that holds the scans (the forecast at the "
    "patient's own site); no scan leaves it. This run was a simulation: all virtual sites' data lies on this "
    "machine, so reconstructions, samples and the forecast were computed here, from each site's own files and "
    "caches, with the run's final global checkpoints."
)


class ShowcaseError(RuntimeError):
    """The run folder lacks what a showcase needs; the message names the file."""


@dataclass(frozen=True)
class SampleRequest:
    """One set of conditions for the DiT; `None` leaves a variable unconditioned."""

    label: str
    modality: Modality
    age: float | None = None
    sex: str | None = None
    diagnosis: str | None = None
    field_strength: float | None = None
    mmse: float | None = None

    def labels(self) -> ScanLabels:
        return ScanLabels(age=self.age, sex=self.sex, diagnosis=self.diagnosis, mmse=self.mmse,
                          field_strength=self.field_strength)


DEMO_REQUESTS: tuple[SampleRequest, ...] = (
    SampleRequest("CN, 30 y, T1w", Modality.T1W, age=30.0, sex="F", diagnosis="CN", field_strength=3.0),
    SampleRequest("AD, 80 y, T1w", Modality.T1W, age=80.0, sex="F", diagnosis="AD", field_strength=3.0),
    SampleRequest("glioma, 55 y, T1c", Modality.T1C, age=55.0, sex="M", diagnosis="glioma", field_strength=3.0),
    SampleRequest("glioma, 55 y, FLAIR", Modality.FLAIR, age=55.0, sex="M", diagnosis="glioma", field_strength=3.0),
)


@dataclass(frozen=True)
class ShowcaseOptions:
    reconstructions: int = 4  # held-out scans, one per site in turn
    requests: tuple[SampleRequest, ...] = DEMO_REQUESTS
    sample_steps: int = 10  # Heun steps (2 network calls each, the last one 1)
    guidance: float = 1.5
    seed: int = 0
    centralized_probes: bool = True


@dataclass
class TrainedModels:
    preset: Preset
    encoder: MAEEncoder
    decoder: CNNDecoder
    dit: DiT | None


@dataclass
class ShowcaseSite:
    data: SiteData
    tokens: TokenCache


# --- loading ---------------------------------------------------------------------------------------------------


def load_models(run_dir: Path) -> TrainedModels:
    """The final global models of a run folder (`checkpoints/<stage>/final.json`)."""
    checkpoints = Path(run_dir) / "checkpoints"
    missing = [s for s in ("mae", "decoder") if not (checkpoints / s / "final.json").is_file()]
    if missing:
        raise ShowcaseError(f"{checkpoints}: no final checkpoint for {missing}; the run must finish these stages")
    decoder, checkpoint = load_stage_model(checkpoints / "decoder" / "final.json", expected_stage="decoder")
    preset = get_preset(checkpoint.meta["preset"])
    dit = None
    if (checkpoints / "dit" / "final.json").is_file():
        dit, _ = load_stage_model(checkpoints / "dit" / "final.json", expected_stage="dit")
        dit = dit.eval()
    return TrainedModels(preset, load_encoder(checkpoints / "mae" / "final.json"), decoder.eval(), dit)


def load_sites(site_configs: Sequence[SiteConfig], models: TrainedModels) -> list[ShowcaseSite]:
    sites = []
    for config in site_configs:
        data = load_site(config, models.preset, progress=False)
        tokens = TokenCache(config.resolved_cache_dir, models.encoder, models.preset, data.cache)
        sites.append(ShowcaseSite(data, tokens))
    return sites


# --- pieces ------------------------------------------------------------------------------------------------------


def _volume(site: ShowcaseSite, record: ScanRecord) -> torch.Tensor:
    return torch.from_numpy(preprocess_scan(record.path, site.data.preset, site.data.cache))[None]  # [1, 1, D, H, W]


def _describe(record: ScanRecord) -> dict[str, Any]:
    return {"site": record.site_id, "subject": record.subject, "session": record.session,
            "modality": Modality(record.modality).short, "age": record.labels.age, "diagnosis": record.labels.diagnosis}


def _scores(prediction: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(PSNR inside the target's brain mask, SSIM over the volume), both on the fixed z-score window."""
    mask = target != 0
    return float(psnr(prediction, target, mask=mask)[0]), float(ssim(prediction, target)[0])


@torch.no_grad()
def reconstructions(models: TrainedModels, sites: Sequence[ShowcaseSite], count: int, out: Path) -> dict[str, Any]:
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
        target = _volume(site, record)
        output = models.decoder(site.tokens.tokens(record)[None]).float()
        value_psnr, value_ssim = _scores(output, target)
        items.append({**_describe(record), "psnr": value_psnr, "ssim": value_ssim})
        rows.append([("input", target[0, 0].numpy()), ("reconstruction", output[0, 0].numpy())])
        labels.append(f"{record.site_id} {record.subject} {Modality(record.modality).short}")
    image = plot_montage(rows, out / "reconstructions.png", labels)
    return {"image": f"{FIGURE_DIR}/{image.name}", "items": items,
            "mean_psnr": float(np.mean([i["psnr"] for i in items])), "mean_ssim": float(np.mean([i["ssim"] for i in items]))}


def write_nifti(volume: np.ndarray, preset: Preset, path: Path) -> Path:
    """A (D, H, W) LPS volume as NIfTI (nibabel's affine is RAS+, hence the two negative axes)."""
    import nibabel as nib

    spacing = preset.spacing_mm
    affine = np.diag([-spacing, -spacing, spacing, 1.0])
    image = nib.Nifti1Image(np.asarray(volume, dtype=np.float32), affine)
    image.header.set_xyzt_units("mm")
    atomic_write_bytes(path, image.to_bytes() if path.suffix == ".nii" else _gzip(image.to_bytes()))
    return path


def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, compresslevel=6)


@torch.no_grad()
def conditional_samples(models: TrainedModels, options: ShowcaseOptions, out: Path) -> tuple[dict[str, Any], torch.Tensor]:
    """One sample per request (one batched ODE solve), decoded; returns the showcase entry and the tokens."""
    assert models.dit is not None
    requests = options.requests
    cond = conditions_from_labels([r.labels() for r in requests], [r.modality for r in requests])
    generator = torch.Generator().manual_seed(options.seed)
    config = models.dit.config
    tokens = sample(models.dit, (len(requests), config.num_tokens, config.token_dim), cond, steps=options.sample_steps,
                    guidance_scale=options.guidance, generator=generator)  # [B, N, E]
    volumes = models.decoder(tokens).float()  # [B, 1, D, H, W]
    items = []
    for index, request in enumerate(requests):
        name = f"sample-{index + 1}.nii.gz"
        write_nifti(volumes[index, 0].numpy(), models.preset, out / "samples" / name)
        conditions = {k: v for k, v in asdict(request).items() if k != "label" and v is not None}
        conditions["modality"] = request.modality.value
        items.append({"label": request.label, "conditions": conditions, "nifti": f"{FIGURE_DIR}/samples/{name}"})
    per_row = 2
    cells = [(request.label, volumes[i, 0].numpy()) for i, request in enumerate(requests)]
    rows = [cells[i : i + per_row] for i in range(0, len(cells), per_row)]
    image = plot_montage(rows, out / "samples.png")
    entry = {"image": f"{FIGURE_DIR}/{image.name}", "items": items, "steps": options.sample_steps,
             "guidance": options.guidance, "seed": options.seed}
    return entry, tokens


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


@torch.no_grad()
def forecast(models: TrainedModels, sites: Sequence[ShowcaseSite], options: ShowcaseOptions, out: Path) -> dict[str, Any] | None:
    """Baseline tokens + interval + what is known at baseline (sex, diagnosis, sequence, field strength,
    the target age) → the follow-up's tokens → volume; scored against the real follow-up."""
    assert models.dit is not None
    found = _forecast_pair(sites)
    if found is None:
        return None
    site, base, follow = found
    interval = float(follow.labels.age - base.labels.age)
    known = ScanLabels(age=follow.labels.age, sex=base.labels.sex, diagnosis=base.labels.diagnosis,
                       field_strength=base.labels.field_strength)
    cond = conditions_from_labels([known], [follow.modality])
    config = models.dit.config
    tokens = sample(models.dit, (1, config.num_tokens, config.token_dim), cond, steps=options.sample_steps,
                    guidance_scale=options.guidance, baseline=site.tokens.tokens(base)[None],
                    interval=torch.tensor([interval]), generator=torch.Generator().manual_seed(options.seed))
    predicted = models.decoder(tokens).float()
    baseline_volume, follow_volume = _volume(site, base), _volume(site, follow)
    psnr_forecast, ssim_forecast = _scores(predicted, follow_volume)
    psnr_baseline, ssim_baseline = _scores(baseline_volume, follow_volume)
    write_nifti(predicted[0, 0].numpy(), models.preset, out / "samples" / "forecast.nii.gz")
    short = Modality(follow.modality).short
    rows = [[(f"baseline, {base.labels.age:.1f} y", baseline_volume[0, 0].numpy()),
             (f"forecast, +{interval:.1f} y", predicted[0, 0].numpy()),
             (f"real follow-up, {follow.labels.age:.1f} y", follow_volume[0, 0].numpy())]]
    image = plot_montage(rows, out / "forecast.png", [f"{site.data.config.site_id} {base.subject} {short}"])
    split = "test" if base in site.data.splits["test"] else "validation"
    description = (
        f"Subject {base.subject} of {site.data.config.site_id} ({split} split, never trained on), {short}, "
        f"{base.labels.diagnosis or 'diagnosis not recorded'}: baseline at {base.labels.age:.1f} y ({base.session}), "
        f"forecast {interval:.1f} years ahead, real follow-up at {follow.labels.age:.1f} y ({follow.session}). The "
        f"forecast conditions on the baseline's tokens, the interval, and what is known at baseline (sex, diagnosis, "
        f"sequence, field strength, target age). It ran with {site.data.config.site_id}'s data on its own machine — "
        f"in this simulation, this machine."
    )
    return {"image": f"{FIGURE_DIR}/{image.name}", "site": site.data.config.site_id, "subject": base.subject,
            "modality": short, "baseline_age": base.labels.age, "followup_age": follow.labels.age, "interval": interval,
            "split": split, "psnr_forecast": psnr_forecast, "ssim_forecast": ssim_forecast,
            "psnr_baseline": psnr_baseline, "ssim_baseline": ssim_baseline, "description": description,
            "nifti": f"{FIGURE_DIR}/samples/forecast.nii.gz"}


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
    out = Path(run_dir) / FIGURE_DIR
    out.mkdir(parents=True, exist_ok=True)
    models = load_models(run_dir)
    sites = load_sites(site_configs, models)
    from braing3n_core.tokens import encoder_sha256

    result: dict[str, Any] = {"where": WHERE, "preset": models.preset.name}
    probes = None
    if options.centralized_probes:
        try:
            probes = centralized_probes(sites, encoder_sha256(models.encoder))
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
                f"follow-up {predicted['psnr_forecast']:.2f} dB (baseline as-is: {predicted['psnr_baseline']:.2f} dB)")
    result["seconds"] = time.perf_counter() - started
    path = out / SHOWCASE_NAME
    atomic_write_json(path, _finite(result))
    return path


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
