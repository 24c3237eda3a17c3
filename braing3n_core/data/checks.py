"""Validate a site's scans: what `braing3n site check` prints and what the loader excludes.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from braing3n_core.data.bids import discover_scans
from braing3n_core.data.cache import JsonCache
from braing3n_core.data.inspection import CHECKS_VERSION, ImageInspection, Problem, inspect_image, quiet_nibabel
from braing3n_core.fileio import file_sha256
from braing3n_core.labels import Modality, ScanLabels

if TYPE_CHECKING:
    from rich.console import Console

    from braing3n_core.data.bids import ScanRecord
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
    def excluded_files(self) -> list[Path]:
        """Each excluded file once, however many problems it has (a count of files, not of reasons)."""
        return sorted({p.path for p in self.excluded})

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


SITE_CACHE = "site"
"""`check_site(cache=SITE_CACHE)`: verdicts cached in the site's own cache folder (`resolved_cache_dir`)."""


def check_site(config: SiteConfig, progress: bool | None = None,
               cache: Path | Literal["site"] | None = SITE_CACHE) -> SiteReport:
    """Discover, read and validate every scan of a site; never raises on bad data.

    `progress=None` shows a progress bar only when stderr is a terminal. Verdicts are cached by file content
    in `<cache>/checks`: the site's cache folder by default (what training and the SuperNode use), another
    folder, or `None` for none (`braing3n site check` on a read-only dataset writes nothing).
    """
    records, problems = discover_scans(config)
    selected = [r for r in records if r.modality in config.modalities]
    cache_root = config.resolved_cache_dir if cache == SITE_CACHE else cache
    # No scans, no cache: opening it would create folders under a mistyped or missing data root.
    cache = _open_check_cache(Path(cache_root), problems) if selected and cache_root is not None else None
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


def _open_check_cache(cache_root: Path, problems: list[Problem]) -> JsonCache | None:
    root = cache_root / "checks"
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


def render_site_report(report: SiteReport, verbose: bool = False, console: Console | None = None,
                       cache: Path | None = None) -> None:
    """Print the report with rich: scans per modality (per subject/session when verbose), metadata
    completeness, then every problem as `path: reason` (paths relative to the data root), and where the
    check cache is (`cache`; None: uncached).

    Modalities are named as the site YAML names them (`T1w`, `ce-gadolinium_T1w`…). On a terminal the
    tables are boxed; into a pipe or a log they are plain aligned columns (no box-drawing characters)."""
    from rich.console import Console

    console = console or Console()
    console.print(f"[bold]Site {report.site_id}[/bold]  data root: {report.data_root}", highlight=False, soft_wrap=True)

    inventory = report.inventory
    console.print("[bold]Usable scans[/bold]")
    summary = _table(console, ("modality", "scans", "subjects", "sessions"))
    for modality in Modality:
        scans = [r for r in report.usable_scans if r.modality is modality]
        if scans:
            summary.add_row(
                modality.value,
                str(len(scans)),
                str(len({r.subject for r in scans})),
                str(len({(r.subject, r.session) for r in scans})),
            )
    sessions = sum(len(s) for s in inventory.values())
    summary.add_row("all", str(len(report.usable_scans)), str(len(inventory)), str(sessions), style="bold")
    console.print(summary)

    if verbose and report.usable_scans:
        console.print("[bold]Scans per subject and session[/bold]")
        console.print(_scan_table(report, console))

    console.print("[bold]Metadata completeness[/bold] (% of usable scans)", highlight=False)
    completeness = _table(console, LABEL_NAMES)
    completeness.add_row(*(f"{100 * v:.0f}%" for v in report.completeness.values()))
    console.print(completeness)

    if report.skipped_modalities:
        console.print(f"{report.skipped_modalities} scans of modalities not selected in the site config were skipped")
    for title, problems in (("Excluded", report.excluded), ("Warnings", report.warnings)):
        if problems:
            count = f"{len(report.excluded_files)} files" if title == "Excluded" else str(len(problems))
            console.print(f"[bold]{title} ({count})[/bold]")
            for problem in problems:
                line = f"{_display_path(problem.path, report.data_root)}: {problem.reason}"
                console.print(line, markup=False, highlight=False, soft_wrap=True)
    where = (f"check cache: {cache}" if cache is not None else
             "check cache: none (nothing written; set cache_dir in the site YAML or pass --cache-dir to reuse verdicts)")
    console.print(where, markup=False, highlight=False, soft_wrap=True)
    verdict = f"{len(report.usable_scans)} usable scans" if report.usable_scans else "no usable scans"
    console.print(f"[bold]{verdict}[/bold], {len(report.excluded_files)} files excluded, {len(report.warnings)} warnings")


def site_report_json(report: SiteReport, cache: Path | None = None) -> dict[str, Any]:
    """`braing3n site check --json`: the report as plain data for scripts (paths relative to the data root)."""
    def problem(p: Problem) -> dict[str, str]:
        return {"path": _display_path(p.path, report.data_root), "reason": p.reason}

    modalities = {}
    for modality in Modality:
        scans = [r for r in report.usable_scans if r.modality is modality]
        if scans:
            modalities[modality.value] = {"scans": len(scans), "subjects": len({r.subject for r in scans}),
                                          "sessions": len({(r.subject, r.session) for r in scans})}
    return {
        "site_id": report.site_id, "data_root": str(report.data_root), "check_cache": str(cache) if cache else None,
        "usable_scans": len(report.usable_scans), "excluded_files": len(report.excluded_files),
        "warnings": [problem(p) for p in report.warnings], "excluded": [problem(p) for p in report.excluded],
        "modalities": modalities, "completeness": report.completeness,
        "skipped_modalities": report.skipped_modalities,
        "scans": [{"path": _display_path(r.path, report.data_root), "subject": r.subject, "session": r.session,
                   "modality": r.modality.value} for r in report.usable_scans],
    }


def _table(console: Console, columns: tuple[str, ...]) -> Any:
    """A table whose headers are never cut: each column is at least as wide as its header, and cells wrap
    instead (rich would otherwise shorten `modality` to `modali…` at 80 columns)."""
    from rich import box
    from rich.table import Table

    # One space between columns: the widest site table (four modalities) then fits 80 columns.
    boxed = console.is_terminal  # the box's own column separator is that one space
    table = Table(box=box.SIMPLE_HEAD if boxed else None, padding=(0, 0) if boxed else (0, 1, 0, 0), pad_edge=False,
                  show_edge=False)
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right", min_width=len(column))
    return table


def _scan_table(report: SiteReport, console: Console) -> Any:
    present_modalities = [m for m in Modality if any(r.modality is m for r in report.usable_scans)]
    table = _table(console, ("subject", "session", *(m.value for m in present_modalities), "age", "sex", "dx", "mmse", "B0"))
    mark = "✓" if console.is_terminal else "x"  # a log may not be UTF-8
    by_visit: dict[tuple[str, str | None], list[ScanRecord]] = {}
    for record in report.usable_scans:
        by_visit.setdefault((record.subject, record.session), []).append(record)
    for (subject, session), records in by_visit.items():
        present = {r.modality for r in records}
        labels = records[0].labels
        table.add_row(
            subject,
            session or "-",
            *(mark if m in present else "" for m in present_modalities),
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
