"""`braing3n probe`: embed every usable scan of some sites with one frozen encoder and probe the features.

The encoder is either a trained stage-1 checkpoint or a random initialisation. `random_init_encoder(preset,
seed)` is `train.initial_model("mae", preset, seed).encoder`: exactly the weights `braing3n train mae
--seed S` starts from, so "trained" against "random-init" with the same seed measures what pre-training
added to its own starting point (same scans, same cross-validation folds, since the folds are seeded by
the same seed too).

Scans are encoded through each site's token cache (`tokens.TokenCache`: computed once per encoder and
scan, kept on the site's disk), pooled to the probe feature (`tokens.pooled_features`: the mean of the
patch tokens, spec §9) and probed by `probes.run_probes` (subject-grouped cross-validation). A scan that
fails a site check, preprocessing or encoding is left out and reported; it never ends the run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from braing3n_core.data.bids import ScanRecord
from braing3n_core.data.datasets import load_site
from braing3n_core.data.inspection import Problem
from braing3n_core.data.tokens import TokenCache, encoder_sha256
from braing3n_core.errors import BadInput
from braing3n_core.evaluation.features import pooled_features, probe_table
from braing3n_core.evaluation.probe_tasks import ProbeTable, SkippedTask, candidate_tasks, select_tasks
from braing3n_core.evaluation.probes import ProbeReport, run_probes
from braing3n_core.fileio import atomic_write_json, json_safe
from braing3n_core.models import MAEEncoder
from braing3n_core.presets import Preset, get_preset
from braing3n_core.runtime import resolve_device
from braing3n_core.site_config import SiteConfig
from braing3n_core.training.checkpoints import initial_model, load_stage_model

# The tasks named in the one-line summary (when probed), with the metric each is judged by.
SUMMARY_METRICS: tuple[str, ...] = (
    "probe/age_r2", "probe/sex_auroc", "probe/diagnosis_auroc", "probe/diagnosis_bacc", "probe/modality_bacc",
)
# Site and field-strength classes come from the data, so they are not in the fixed vocabulary.
_DATA_DEFINED_TASKS: tuple[str, ...] = ("field_strength", "site")
DEFAULT_RANDOM_INIT_PRESET = "small"  # `--random-init` without `--preset`: the preset `braing3n train` defaults to


class ProbeError(BadInput, ValueError):
    """`braing3n probe` cannot run as asked; the message names the file or option at fault."""


def known_task_names() -> tuple[str, ...]:
    """Every task name `--tasks` accepts: the label vocabulary's tasks plus site and field strength."""
    fixed, _ = candidate_tasks(ProbeTable(()))
    return tuple(t.name for t in fixed) + _DATA_DEFINED_TASKS


@dataclass(frozen=True)
class ProbeOptions:
    preset: str | None = None  # None: the encoder checkpoint's own; `small` for random init
    encoder: Path | None = None  # stage-1 (mae) checkpoint; None with random_init
    random_init: bool = False
    seed: int = 0  # random-init weights, and the cross-validation folds
    folds: int = 5  # outer, subject-grouped
    inner_folds: int = 5  # regularisation choice inside each outer fold's train subjects
    device: str = "cpu"
    batch_size: int = 4  # volumes per encoder call
    tasks: tuple[str, ...] | None = None  # task names to probe; None = every task the labels support

    def __post_init__(self) -> None:
        if (self.encoder is None) == (not self.random_init):
            raise ProbeError("probe: give exactly one of an encoder checkpoint (--encoder) or --random-init")
        try:
            if self.preset is not None:
                get_preset(self.preset)
        except ValueError as error:
            raise ProbeError(f"probe: {error}") from None
        if self.folds < 2 or self.inner_folds < 2:
            raise ProbeError(f"probe: folds and inner folds must be at least 2, got {self.folds} and {self.inner_folds}")
        if self.batch_size < 1:
            raise ProbeError(f"probe: batch size must be positive, got {self.batch_size}")
        if self.tasks is not None:
            object.__setattr__(self, "tasks", tuple(self.tasks))
            unknown = sorted(set(self.tasks) - set(known_task_names()))
            if unknown or not self.tasks:
                raise ProbeError(f"probe: unknown task(s) {unknown or '(none given)'}; choose from {list(known_task_names())}")


@dataclass(frozen=True)
class FrozenEncoder:
    encoder: MAEEncoder
    label: str  # "encoder 1a2b3c4d5e6f (runs/x/checkpoints/mae/step-000400.json)" or "random init, seed 0"
    sha256: str
    checkpoint: Path | None


@dataclass
class EncodedScans:
    """Pooled features of every usable scan of the given sites, row-aligned with their labels."""

    features: np.ndarray  # [n, E] float64
    table: ProbeTable
    records: list[ScanRecord]
    problems: list[Problem] = field(default_factory=list)  # site-check, preprocessing and encoding exclusions


def random_init_encoder(preset: Preset | str, seed: int) -> MAEEncoder:
    """The MAE encoder's initial weights for `seed`: those `train_centralized(stage="mae", seed=seed)` starts from."""
    return initial_model("mae", preset, seed).encoder.eval().requires_grad_(False)


def frozen_encoder(options: ProbeOptions) -> tuple[FrozenEncoder, Preset]:
    """The encoder to probe and its preset. A checkpoint trained at another preset than `options.preset`,
    or whose input geometry is not that preset's, is refused: its token grid would not fit the volumes.
    Without `options.preset` a checkpoint's preset is the one it records (`meta.preset`)."""
    if options.random_init:
        preset = get_preset(options.preset or DEFAULT_RANDOM_INIT_PRESET)
        encoder = random_init_encoder(preset, options.seed)
        return FrozenEncoder(encoder, f"random init, seed {options.seed}", encoder_sha256(encoder), None), preset
    path = Path(options.encoder)  # type: ignore[arg-type]
    model, checkpoint = load_stage_model(path, expected_stage="mae")
    trained_on = checkpoint.meta.get("preset")
    if options.preset is None and trained_on is None:
        raise ProbeError(f"{checkpoint.path}: the checkpoint does not record its preset (meta.preset); pass --preset")
    preset = get_preset(options.preset or trained_on)
    if trained_on is not None and trained_on != preset.name:
        raise ProbeError(f"{checkpoint.path}: encoder trained at preset {trained_on!r}, but --preset is {preset.name!r}")
    config = model.config
    if tuple(config.image_shape) != preset.shape or config.patch_size != preset.patch_size:
        raise ProbeError(
            f"{checkpoint.path}: encoder input {tuple(config.image_shape)} with {config.patch_size}³ patches does not "
            f"match preset {preset.name!r} ({preset.shape}, {preset.patch_size}³ patches)"
        )
    encoder = model.encoder.eval().requires_grad_(False)
    sha = encoder_sha256(encoder)
    return FrozenEncoder(encoder, f"encoder {sha[:12]} ({checkpoint.path})", sha, checkpoint.path), preset


def encode_sites(
    configs: Sequence[SiteConfig], preset: Preset, encoder: MAEEncoder, device: torch.device, batch_size: int = 4
) -> EncodedScans:
    """Every usable scan of every site → its pooled tokens. A scan that fails a check, preprocessing or
    encoding is left out and listed in `problems`; it never stops the others."""
    features, records, problems = [], [], []
    for config in configs:
        data = load_site(config, preset)
        problems += [p for p in data.problems if p.excluded]
        cache = TokenCache(config.resolved_cache_dir, encoder, preset, data.cache, device, batch_size=batch_size)
        usable = cache.ensure(data.records)
        problems += cache.failures
        if usable:
            features.append(pooled_features(cache, usable))
            records += usable
    if not records:
        where = ", ".join(str(c.source_file or c.data_root) for c in configs)
        raise ProbeError(f"no usable scans in {where}; excluded: {[str(p) for p in problems][:5]}")
    return EncodedScans(np.concatenate(features).astype(np.float64), probe_table(records), records, problems)


@dataclass
class ProbeRun:
    report: ProbeReport
    path: Path  # the JSON written
    encoder: FrozenEncoder
    scans: int
    subjects: int
    excluded: int
    seconds: float

    def summary(self) -> str:
        """One line: which encoder, how much data, the headline metrics and where the JSON is."""
        metrics = self.report.metrics()
        parts = [f"{name.removeprefix('probe/')} {metrics[name]:.3f}" for name in SUMMARY_METRICS if name in metrics]
        if not parts:  # none of the headline tasks was probed: name what was
            parts = [f"{name.removeprefix('probe/')} {value:.3f}" for name, value in list(metrics.items())[:4]]
        excluded = f", {self.excluded} excluded" if self.excluded else ""
        return (f"probes ({self.encoder.label}; {self.scans} scans of {self.subjects} subjects{excluded}; "
                f"{self.seconds:.0f} s): {', '.join(parts) or 'no task could be probed'} -> {self.path}")


def probe_run_name(encoder: FrozenEncoder, preset: Preset, seed: int) -> str:
    """File stem of a probe run, so runs of several encoders (and seeds) can share one folder."""
    if encoder.checkpoint is None:
        return f"probes-random-init-{preset.name}-seed{seed}"
    return f"probes-encoder-{encoder.sha256[:12]}-seed{seed}"


def probe_sites(configs: Sequence[SiteConfig], options: ProbeOptions, out_dir: Path) -> ProbeRun:
    """Encode, probe, and write `<out_dir>/<probe_run_name>.json` (report + what was probed), atomically."""
    started = time.perf_counter()
    if not configs:
        raise ProbeError("probe: no site configs given")
    frozen, preset = frozen_encoder(options)
    try:
        device = resolve_device(options.device)
    except RuntimeError as error:  # CUDA asked for on a machine without it
        raise ProbeError(f"probe: {error}") from None
    frozen.encoder.to(device)
    scans = encode_sites(configs, preset, frozen.encoder, device, options.batch_size)
    for problem in scans.problems:
        print(f"[probe] excluded {problem}", file=sys.stderr)
    tasks, skipped = select_tasks(scans.table)
    if options.tasks is not None:
        skipped = [s for s in skipped if s.task in options.tasks]
        skipped += [SkippedTask(name, "not among the probed scans' labels") for name in options.tasks
                    if name not in {t.name for t in tasks} and name not in {s.task for s in skipped}]
        tasks = [t for t in tasks if t.name in options.tasks]
    report = run_probes(scans.features, scans.table, tasks=tasks, folds=options.folds,
                        inner_folds=options.inner_folds, seed=options.seed, encoder=frozen.label)
    # Tasks filtered out for too few labels are reported as skipped beside those the probes skipped.
    report = ProbeReport(report.results, tuple(skipped) + report.skipped, report.encoder, report.settings)
    seconds = time.perf_counter() - started
    document: dict[str, Any] = {
        "encoder": {"label": frozen.label, "sha256": frozen.sha256,
                    "checkpoint": str(frozen.checkpoint) if frozen.checkpoint else None,
                    "random_init": frozen.checkpoint is None, "seed": options.seed},
        "preset": preset.name,
        "sites": [c.site_id for c in configs],
        "site_configs": [str(c.source_file) if c.source_file else None for c in configs],
        "scans": len(scans.records),
        "subjects": len(set(scans.table.subjects)),
        "excluded": [{"path": str(p.path), "reason": p.reason} for p in scans.problems],
        "options": {"folds": options.folds, "inner_folds": options.inner_folds, "seed": options.seed,
                    "tasks": list(options.tasks) if options.tasks is not None else None, "device": str(device)},
        "metrics": report.metrics(),
        "seconds": seconds,
        "report": report.to_dict(),
    }
    path = Path(out_dir) / f"{probe_run_name(frozen, preset, options.seed)}.json"
    atomic_write_json(path, json_safe(document))
    return ProbeRun(report, path, frozen, len(scans.records), document["subjects"], len(scans.problems), seconds)



__all__ = [
    "EncodedScans", "FrozenEncoder", "ProbeError", "ProbeOptions", "ProbeRun", "encode_sites",
    "frozen_encoder", "known_task_names", "probe_run_name", "probe_sites", "random_init_encoder",
]
