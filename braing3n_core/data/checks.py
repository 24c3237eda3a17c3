"""Validate a site's scans: what `braing3n site check` prints and what the loader excludes.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from braing3n_core.data.bids import discover_scans
from braing3n_core.data.cache import JsonCache
from braing3n_core.data.inspection import CHECKS_VERSION, ImageInspection, Problem, inspect_image, quiet_nibabel
from braing3n_core.fileio import file_sha256
from braing3n_core.labels import Modality, ScanLabels

if TYPE_CHECKING:
    from rich.console import Console

    from braing3n_core.data.bids import ScanRecord
    from braing3n_core.data.cache import JsonCache
    from braing3n_core.site_config import SiteConfig


"""Bump when `check_image` would judge the same bytes differently; it invalidates cached results."""


LABEL_NAMES: tuple[str, ...] = tuple(f.name for f in fields(ScanLabels))


@dataclass(frozen=True)
class SiteReport:
    """Result of checking one site: usable scans, every problem, and what each image looks like."""

    site_id: str
    data_root: Path
    usable_scans: list[ScanRecord]
    problems: list[Problem]
    all_scans: list[ScanRecord] = field(default_factory=list)  # every recognised name, usable or not
    images: dict[Path, ImageInspection] = field(default_factory=dict)
    skipped_modalities: int = 0  # readable names of modalities this site's config does not select

    @property
    def excluded(self) -> list[Problem]:
        return [p for p in self.problems if p.excluded]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if not p.excluded]

    @property
    def inventory(self) -> dict[str, dict[str | None, list[Modality]]]:
        """subject → session → modalities present (usable scans only)."""
        table: dict[str, dict[str | None, list[Modality]]] = {}
        for record in self.usable_scans:
            table.setdefault(record.subject, {}).setdefault(record.session, []).append(record.modality)
        return table

    @property
    def completeness(self) -> dict[str, float]:
        """Fraction of usable scans that have each label (age, sex, diagnosis, MMSE, field strength)."""
        total = len(self.usable_scans)
        return {
            name: (sum(getattr(r.labels, name) is not None for r in self.usable_scans) / total if total else 0.0)
            for name in LABEL_NAMES
        }


def check_site(config: SiteConfig, progress: bool | None = None) -> SiteReport:
    """Discover, read and validate every scan of a site; never raises on bad data.

    `progress=None` shows a progress bar only when stderr is a terminal.
    """
    records, problems = discover_scans(config)
    selected = [r for r in records if r.modality in config.modalities]
    # No scans, no cache: opening it would create folders under a mistyped or missing data root.
    cache = _open_check_cache(config, problems) if selected else None
    show = sys.stderr.isatty() if progress is None else progress
    inspections = _inspect_all([r.path for r in selected], cache, problems, show)

    usable: list[ScanRecord] = []
    first_with_content: dict[str, ScanRecord] = {}
    for record, inspection in zip(selected, inspections):
        problems.extend(inspection.problems)
        if not inspection.usable:
            continue
        first = first_with_content.get(inspection.voxel_sha256 or "")
        if first is not None:
            problems.append(
                Problem(record.path, f"duplicate scan: same image content as {first.key} ({first.path.name})", True)
            )
            continue
        if inspection.voxel_sha256:
            first_with_content[inspection.voxel_sha256] = record
        usable.append(record)

    return SiteReport(
        site_id=config.site_id,
        data_root=config.data_root,
        usable_scans=usable,
        problems=sorted(problems, key=lambda p: (str(p.path), p.reason)),
        all_scans=records,
        images={r.path: i for r, i in zip(selected, inspections)},
        skipped_modalities=len(records) - len(selected),
    )


def _open_check_cache(config: SiteConfig, problems: list[Problem]) -> JsonCache | None:
    root = config.resolved_cache_dir / "checks"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        problems.append(Problem(root, f"cache folder not writable ({error}); images are checked uncached", False))
        return None
    return JsonCache(root)


def _inspect_all(
    paths: list[Path], cache: JsonCache | None, problems: list[Problem], show_progress: bool
) -> list[ImageInspection]:
    # Threads, not processes: decompression, hashing and numpy reductions release the GIL.
    workers = max(1, min(8, os.cpu_count() or 1))
    with quiet_nibabel(), ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda p: _cached_inspection(p, cache), paths)
        if show_progress and paths:
            from rich.progress import track

            results = track(results, total=len(paths), description="checking images", transient=True)
        inspections = list(results)
    return inspections


def _cached_inspection(path: Path, cache: JsonCache | None) -> ImageInspection:
    if cache is None:
        return inspect_image(path, quiet=False)
    try:
        key = f"check-v{CHECKS_VERSION}-{file_sha256(path)}"
    except OSError:
        return inspect_image(path, quiet=False)  # unreadable files are reported by the inspection itself
    record = cache.get(key)
    if record is not None:
        return _inspection_from_json(path, record)
    inspection = inspect_image(path, quiet=False)
    with suppress(OSError):  # a full or read-only disk costs speed on the next check, never correctness
        cache.put(key, _inspection_to_json(inspection))
    return inspection


def _inspection_to_json(inspection: ImageInspection) -> dict[str, Any]:
    return {
        "problems": [{"reason": p.reason, "excluded": p.excluded} for p in inspection.problems],
        "voxel_sha256": inspection.voxel_sha256,
        "shape": inspection.shape,
        "voxel_size_mm": inspection.voxel_size_mm,
        "orientation": inspection.orientation,
    }


def _inspection_from_json(path: Path, record: dict[str, Any]) -> ImageInspection:
    """The cached verdict applies to identical bytes wherever they now lie: re-attach the current path."""
    return ImageInspection(
        problems=tuple(Problem(path, p["reason"], bool(p["excluded"])) for p in record["problems"]),
        voxel_sha256=record["voxel_sha256"],
        shape=tuple(record["shape"]) if record["shape"] is not None else None,
        voxel_size_mm=tuple(record["voxel_size_mm"]) if record["voxel_size_mm"] is not None else None,
        orientation=record["orientation"],
    )


def render_site_report(report: SiteReport, verbose: bool = False, console: Console | None = None) -> None:
    """Print the report with rich: scans per modality (per subject/session when verbose), metadata
    completeness, then every problem as `path: reason` (paths relative to the data root)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    console.print(f"[bold]Site {report.site_id}[/bold]  data root: {report.data_root}", highlight=False)

    inventory = report.inventory
    summary = Table(title="Usable scans", title_justify="left")
    for column in ("modality", "scans", "subjects", "sessions"):
        summary.add_column(column, justify="left" if column == "modality" else "right")
    for modality in Modality:
        scans = [r for r in report.usable_scans if r.modality is modality]
        if scans:
            summary.add_row(
                modality.short,
                str(len(scans)),
                str(len({r.subject for r in scans})),
                str(len({(r.subject, r.session) for r in scans})),
            )
    sessions = sum(len(s) for s in inventory.values())
    summary.add_row("all", str(len(report.usable_scans)), str(len(inventory)), str(sessions), style="bold")
    console.print(summary)

    if verbose and report.usable_scans:
        console.print(_scan_table(report))

    completeness = Table(title="Metadata completeness (% of usable scans)", title_justify="left")
    for name in LABEL_NAMES:
        completeness.add_column(name, justify="right")
    completeness.add_row(*(f"{100 * v:.0f}%" for v in report.completeness.values()))
    console.print(completeness)

    if report.skipped_modalities:
        console.print(f"{report.skipped_modalities} scans of modalities not selected in the site config were skipped")
    for title, problems in (("Excluded", report.excluded), ("Warnings", report.warnings)):
        if problems:
            console.print(f"[bold]{title} ({len(problems)})[/bold]")
            for problem in problems:
                line = f"{_display_path(problem.path, report.data_root)}: {problem.reason}"
                console.print(line, markup=False, highlight=False, soft_wrap=True)
    verdict = f"{len(report.usable_scans)} usable scans" if report.usable_scans else "no usable scans"
    console.print(f"[bold]{verdict}[/bold], {len(report.excluded)} excluded, {len(report.warnings)} warnings")


def _scan_table(report: SiteReport) -> Any:
    from rich.table import Table

    table = Table(title="Scans per subject and session", title_justify="left")
    for column in ("subject", "session"):
        table.add_column(column, no_wrap=True)
    for column in (*(m.short for m in Modality), "age", "sex", "dx", "mmse", "B0"):
        table.add_column(column)
    by_visit: dict[tuple[str, str | None], list[ScanRecord]] = {}
    for record in report.usable_scans:
        by_visit.setdefault((record.subject, record.session), []).append(record)
    for (subject, session), records in by_visit.items():
        present = {r.modality for r in records}
        labels = records[0].labels
        table.add_row(
            subject,
            session or "-",
            *("✓" if m in present else "" for m in Modality),
            *(_fmt(getattr(labels, name)) for name in LABEL_NAMES),
        )
    return table


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _display_path(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
