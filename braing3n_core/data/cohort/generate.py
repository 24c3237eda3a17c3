"""`make_cohort`: sites × subjects × visits × sequences, in parallel, deterministic per seed.

Randomness is partitioned so that nothing depends on the number of worker processes:
- site-level choices (profile variation, scanner, diagnosis quota) come from
  `SeedSequence([seed, site_index], spawn_key=(SITE_STREAM,))`;
- everything about subject k of site s comes from `default_rng([seed, s, k])`.

Workers are forked after the template anatomy is loaded, so they share it instead of each loading it.
Each site is written into a hidden staging folder and moved into place when complete; re-running over
an earlier generated cohort replaces it, while a folder this generator did not write is never touched.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from threadpoolctl import threadpool_limits

from braing3n_core.config import ConfigError
from braing3n_core.data.cohort import bids_writer as bids
from braing3n_core.data.cohort.anatomy import load_anatomy
from braing3n_core.data.cohort.effects import label_map, session_tissues, subject_geometry, truth_volumes
from braing3n_core.data.cohort.scanner import Scanner, build_scanner, encode_nifti, render_session, site_geometry
from braing3n_core.data.cohort.sites import SiteProfile, diagnosis_quota, site_id, site_profile
from braing3n_core.data.cohort.subjects import (
    SessionState,
    SubjectPlan,
    participant_label,
    plan_subject,
    session_states,
)
from braing3n_core.site_config import ApprovalConfig, SiteConfig, SplitConfig

SITE_STREAM = 7  # spawn key separating site-level randomness from every subject's stream


@dataclass(frozen=True)
class CohortSpec:
    """What to generate. `voxel_mm` is the simulation grid (1–4 mm); sites store it with their own
    voxel-size factors and orientation. `workers` 0 means one process per available core."""

    n_sites: int = 4
    subjects_per_site: int = 20
    seed: int = 0
    voxel_mm: float = 2.0
    workers: int = 0
    truth_maps: bool = True  # also write hard label maps (dseg) under derivatives/
    progress: bool = True  # rich progress bar when writing to a terminal

    def __post_init__(self) -> None:
        problems = []
        if self.n_sites < 1:
            problems.append(f"n_sites must be at least 1, got {self.n_sites}")
        if self.subjects_per_site < 1:
            problems.append(f"subjects_per_site must be at least 1, got {self.subjects_per_site}")
        if not 1.0 <= float(self.voxel_mm) <= 4.0:
            problems.append(f"voxel_mm must be between 1 and 4 mm, got {self.voxel_mm}")
        if self.workers < 0:
            problems.append(f"workers must be 0 (all cores) or positive, got {self.workers}")
        if self.seed < 0:
            problems.append(f"seed must be non-negative, got {self.seed}")
        if problems:
            raise ConfigError("invalid cohort specification: " + "; ".join(problems))


@dataclass(frozen=True, eq=False)
class Site:
    index: int
    site_id: str
    profile: SiteProfile
    scanner: Scanner
    diagnoses: tuple[str, ...]  # baseline diagnosis of each subject
    staging: Path  # folder being written; renamed to the final one when the site is complete


@dataclass(frozen=True)
class SubjectResult:
    site_index: int
    subject_index: int
    participant: dict[str, Any]
    truth_rows: list[dict[str, Any]]


def make_cohort(spec: CohortSpec, out_dir: Path, sites_dir: Path | None = None) -> list[Path]:
    """Write `spec.n_sites` BIDS datasets under `out_dir` and one site YAML each; return the YAML paths."""
    out_dir = Path(out_dir)
    sites_dir = Path(sites_dir) if sites_dir is not None else out_dir / "sites"
    out_dir.mkdir(parents=True, exist_ok=True)
    anatomy = load_anatomy(float(spec.voxel_mm))  # loaded before forking: workers share it

    sites = []
    for index in range(spec.n_sites):
        final = out_dir / site_id(index)
        _check_replaceable(final, sites_dir / f"{site_id(index)}.yaml")
        staging = out_dir / f".{site_id(index)}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        sites.append(_build_site(spec, index, staging, anatomy))

    tasks = [(site.index, k) for site in sites for k in range(spec.subjects_per_site)]
    try:
        results = _run_tasks(spec, sites, tasks)
    except BaseException:
        for site in sites:  # leave no half-written site behind
            shutil.rmtree(site.staging, ignore_errors=True)
        raise

    yamls = []
    for site in sites:
        site_results = sorted((r for r in results if r.site_index == site.index), key=lambda r: r.subject_index)
        _write_site_files(spec, site, site_results)
        final = out_dir / site.site_id
        retired = out_dir / f".{site.site_id}.retired"
        shutil.rmtree(retired, ignore_errors=True)
        if final.exists():
            os.replace(final, retired)  # the old dataset stays whole until the new one is in place
        os.replace(site.staging, final)
        shutil.rmtree(retired, ignore_errors=True)
        yamls.append(_write_site_yaml(spec, site, final, sites_dir))
    return yamls


def existing_cohort(spec: CohortSpec, out_dir: Path, sites_dir: Path | None = None) -> list[Path]:
    """The site datasets and YAMLs `make_cohort(spec, out_dir, sites_dir)` would replace (`cohort make`
    asks for --force before replacing a cohort someone may be using)."""
    out_dir = Path(out_dir)
    sites_dir = Path(sites_dir) if sites_dir is not None else out_dir / "sites"
    targets = [path for index in range(spec.n_sites)
               for path in (out_dir / site_id(index), sites_dir / f"{site_id(index)}.yaml")]
    return [path for path in targets if path.exists()]


@dataclass(frozen=True)
class CohortSummary:
    sites: int
    subjects: int
    sessions: int
    scans: int


def summarize_cohort(site_yamls: list[Path]) -> CohortSummary:
    """What a written cohort holds, counted on disk (each site's data root from its YAML)."""
    subjects = sessions = scans = 0
    for path in site_yamls:
        root = SiteConfig.from_yaml(path).data_root
        subjects += sum(1 for _ in root.glob("sub-*/"))
        sessions += sum(1 for _ in root.glob("sub-*/ses-*/"))
        scans += sum(1 for _ in root.glob("sub-*/ses-*/anat/*.nii.gz"))
    return CohortSummary(len(site_yamls), subjects, sessions, scans)


def _check_replaceable(folder: Path, site_yaml: Path) -> None:
    """Only a dataset and a site YAML this generator wrote may be replaced; checked before any work."""
    refusal = f"exists and was not written by '{bids.GENERATOR_NAME}'; refusing to overwrite it"
    if site_yaml.exists() and not site_yaml.read_text(encoding="utf-8").startswith(_YAML_MARK):
        raise ConfigError(f"{site_yaml}: {refusal}")
    if not folder.exists():
        return
    description = folder / "dataset_description.json"
    try:
        generated_by = json.loads(description.read_text(encoding="utf-8")).get("GeneratedBy", [])
        ours = any(entry.get("Name") == bids.GENERATOR_NAME for entry in generated_by)
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ConfigError(f"{folder}: {refusal}")


def _build_site(spec: CohortSpec, index: int, staging: Path, anatomy: Any) -> Site:
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, index], spawn_key=(SITE_STREAM,)))
    profile = site_profile(index, rng)
    scanner = build_scanner(index, profile, site_geometry(index, rng), float(spec.voxel_mm), anatomy, rng)
    diagnoses = tuple(diagnosis_quota(profile, spec.subjects_per_site, rng))
    return Site(index, site_id(index), profile, scanner, diagnoses, staging)


# Worker state: set in the parent before forking (or by the pool initialiser under spawn).
_WORKER: dict[str, Any] = {}


def _init_worker(spec: CohortSpec, sites: list[Site], single_threaded: bool = False) -> None:
    _WORKER["spec"] = spec
    _WORKER["sites"] = {site.index: site for site in sites}
    load_anatomy(float(spec.voxel_mm))
    if single_threaded:
        # One process per core already; BLAS threads would only spin against the other workers
        # (measured: 35 % less CPU time per subject with one BLAS thread).
        threadpool_limits(limits=1)


def _run_tasks(spec: CohortSpec, sites: list[Site], tasks: list[tuple[int, int]]) -> list[SubjectResult]:
    workers = max(1, min(spec.workers or _available_cores(), len(tasks)))
    _init_worker(spec, sites)
    with _Progress(spec, len(tasks)) as advance:
        if workers == 1:
            results = []
            with threadpool_limits(limits=1):
                for task in tasks:
                    results.append(_generate_subject(task))
                    advance()
            return results
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        with context.Pool(workers, initializer=_init_worker, initargs=(spec, sites, True)) as pool:
            results = []
            for result in pool.imap_unordered(_generate_subject, tasks):
                results.append(result)
                advance()
            return results


def _available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class _Progress:
    """A rich progress bar on a terminal; silent otherwise (CI logs, pytest)."""

    def __init__(self, spec: CohortSpec, total: int) -> None:
        self.enabled = spec.progress and sys.stderr.isatty()
        self.total = total

    def __enter__(self):  # type: ignore[no-untyped-def]
        if not self.enabled:
            return lambda: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

        # On stderr, so that stdout (the site YAML paths) stays a clean list for scripts.
        self.bar = Progress("[bold]cohort[/]", BarColumn(), MofNCompleteColumn(), "subjects", TimeElapsedColumn(),
                            TimeRemainingColumn(), transient=False, console=Console(stderr=True))
        self.bar.__enter__()
        task = self.bar.add_task("subjects", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)


def _generate_subject(task: tuple[int, int]) -> SubjectResult:
    """Plan, render and write every session and sequence of one subject."""
    site_index, subject_index = task
    spec: CohortSpec = _WORKER["spec"]
    site: Site = _WORKER["sites"][site_index]
    anatomy = load_anatomy(float(spec.voxel_mm))
    scanner = site.scanner
    rng = np.random.default_rng([spec.seed, site_index, subject_index])

    participant_id = participant_label(site_index, subject_index, spec.subjects_per_site)
    plan = plan_subject(rng, participant_id, site.diagnoses[subject_index], site.profile, anatomy)
    geometry = subject_geometry(scanner.grid, anatomy, plan, rng)
    voxel_mm = scanner.stored_voxel_mm

    session_rows, truth_rows = [], []
    for state in session_states(plan):
        tissues = session_tissues(geometry, anatomy, plan, state)
        volumes = truth_volumes(tissues, scanner.grid.voxel_ml)
        session_rows.append({"session_id": state.session_id, "age": state.age, "diagnosis": state.diagnosis, "mmse": state.mmse})
        images = render_session(scanner, site.profile.modalities, tissues, geometry.points_mm, rng)
        brain_voxels = geometry.flat_index[tissues.inside]
        for modality, values in images.items():
            path = bids.scan_path(site.staging, participant_id, state.session_id, modality)
            bids.write_bytes(path, encode_nifti(scanner, values, brain_voxels))
            bids.write_json(path.with_name(path.name.replace(".nii.gz", ".json")), bids.scan_sidecar(site.profile, modality, site.site_id, voxel_mm))
            truth_rows.append(_truth_row(site, plan, state, modality.value, path.relative_to(site.staging).as_posix(), volumes))
        if spec.truth_maps:
            labels = encode_nifti(scanner, label_map(tissues), geometry.flat_index, labels=True)
            bids.write_bytes(bids.truth_map_path(site.staging, participant_id, state.session_id), labels)

    bids.write_sessions(site.staging / participant_id, participant_id, session_rows)
    baseline = session_rows[0]
    participant = {"participant_id": participant_id, "sex": plan.sex, "age": plan.baseline_age, "diagnosis": baseline["diagnosis"], "mmse": baseline["mmse"]}
    return SubjectResult(site_index, subject_index, participant, truth_rows)


def _truth_row(site: Site, plan: SubjectPlan, state: SessionState, modality: str, filename: str, volumes: dict[str, float]) -> dict[str, Any]:
    return {
        "participant_id": plan.participant_id,
        "session_id": state.session_id,
        "modality": modality,
        "filename": filename,
        "site_id": site.site_id,
        "age": state.age,
        "sex": plan.sex,
        "diagnosis": state.diagnosis,
        "mmse": state.mmse,
        "field_strength": site.profile.field_strength,
        "years_since_baseline": state.years,
        "severity": round(state.severity, 4),
        "head_scale": round(plan.head_scale, 4),
        **volumes,
    }


def _write_site_files(spec: CohortSpec, site: Site, results: list[SubjectResult]) -> None:
    profile, scanner = site.profile, site.scanner
    voxel = "x".join(f"{v:g}" for v in scanner.stored_voxel_mm)
    summary = (
        f"{profile.manufacturer} {profile.model}, {profile.field_strength:g} T; stored {scanner.geometry.orientation}, "
        f"{voxel} mm voxels, {scanner.geometry.dtype}"
    )
    bids.write_dataset_description(site.staging, site.site_id, profile, spec.seed)
    bids.write_readme(site.staging, site.site_id, profile, summary, len(results))
    bids.write_participants(site.staging, [r.participant for r in results])
    bids.write_truth_derivative(site.staging, [row for r in results for row in r.truth_rows], spec.seed)


def _write_site_yaml(spec: CohortSpec, site: Site, data_root: Path, sites_dir: Path) -> Path:
    config = SiteConfig(
        site_id=site.site_id,
        data_root=data_root.resolve(),
        modalities=site.profile.modalities,
        split=SplitConfig(seed=spec.seed),
        approval=ApprovalConfig(required=False),  # synthetic scans, no patients: the demo and tests run unattended
    )
    sites_dir.mkdir(parents=True, exist_ok=True)
    path = sites_dir / f"{site.site_id}.yaml"
    header = f"{_YAML_MARK} for a synthetic {site.profile.archetype} site ({site.profile.description}).\n"
    bids.write_text(path, header + yaml.safe_dump(config.to_yaml_dict(relative_to=sites_dir), sort_keys=False))
    return path


_YAML_MARK = f"# Written by {bids.GENERATOR_NAME}"
