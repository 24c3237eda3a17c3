"""Validate a site's scans: what `braing3n site check` prints and what the loader excludes.

Two kinds of problem, both naming the file and giving a plain reason:
- `excluded=True`: the scan is not used (unreadable, truncated, 4-D, NaN/Inf, empty, broken geometry,
  unknown modality, duplicate, misplaced or misnamed file, missing data root);
- `excluded=False`: a warning; the data still loads, possibly with a label missing (no participants
  row, implausible age or MMSE, unreadable sidecar…).

`check_image` reads every voxel, so its result is cached by the file's content hash (plus
`CHECKS_VERSION`): a second `site check` only hashes files. Nothing here raises on bad data.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import sys
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener

from braing3n_core.labels import Modality, ScanLabels

if TYPE_CHECKING:
    from rich.console import Console

    from braing3n_core.config import SiteConfig
    from braing3n_core.data.bids import ScanRecord
    from braing3n_core.data.cache import JsonCache

CHECKS_VERSION = 1
"""Bump when `check_image` would judge the same bytes differently; it invalidates cached results."""

MIN_AFFINE_DETERMINANT = 1e-6  # mm³ per voxel; below this the voxel-to-world map is not invertible
LABEL_NAMES: tuple[str, ...] = tuple(f.name for f in fields(ScanLabels))


@dataclass(frozen=True)
class Problem:
    """Something wrong with one file; `excluded` says whether that file is left out."""

    path: Path
    reason: str
    excluded: bool

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class ImageInspection:
    """What reading one image taught us: its problems and, when readable, its geometry."""

    problems: tuple[Problem, ...]
    voxel_sha256: str | None = None  # hash of the voxel values: equal for the same scan saved twice
    shape: tuple[int, ...] | None = None
    voxel_size_mm: tuple[float, ...] | None = None
    orientation: str | None = None  # nibabel axis codes of the stored array, e.g. "LAS"

    @property
    def usable(self) -> bool:
        return not any(p.excluded for p in self.problems)


def check_image(path: str | Path) -> list[Problem]:
    """Read one image fully and list what makes it unusable; never raises on bad data."""
    return list(inspect_image(path).problems)


def inspect_image(path: str | Path) -> ImageInspection:
    """`check_image` plus the geometry and voxel hash, for reports and duplicate detection."""
    with _quiet_nibabel():
        return _inspect_guarded(Path(path))


@contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """nibabel logs header fixes ("pixdim[1,2,3] should be non-zero…") to stderr without naming the
    file; the checks report those conditions themselves, with the file name."""
    previous = nib.imageglobals.logger.level
    nib.imageglobals.logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        nib.imageglobals.logger.setLevel(previous)


def _inspect_guarded(path: Path) -> ImageInspection:
    try:
        return _inspect(path)
    except Exception as error:  # a check must never take the site check down
        return ImageInspection((Problem(path, f"unreadable ({type(error).__name__}: {error})", True),))


def _inspect(path: Path) -> ImageInspection:
    def failed(reason: str, **geometry: Any) -> ImageInspection:
        return ImageInspection((Problem(path, reason, True),), **geometry)

    if not path.is_file():
        return failed("file not found")
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises many types for non-images
        return failed(f"unreadable: not a NIfTI image ({_one_line(error, path)})")
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        return failed(f"not a NIfTI image (read as {type(image).__name__})")

    shape = tuple(int(s) for s in image.shape)
    if len(shape) < 3:
        return failed(f"{len(shape)}-D image (shape {shape}); expected a 3-D volume", shape=shape)
    if len(shape) > 3 and int(np.prod(shape[3:])) > 1:
        return failed(
            f"{len(shape)}-D image (shape {shape}) holds {int(np.prod(shape[3:]))} volumes; expected one 3-D volume",
            shape=shape,
        )

    problems: list[Problem] = []
    voxel_size = _stored_voxel_size(path, image)
    if any(not np.isfinite(s) or s <= 0 for s in voxel_size):
        problems.append(Problem(path, f"zero or negative voxel size {voxel_size} mm in the header", True))
    affine = image.affine
    determinant = float(np.linalg.det(affine[:3, :3])) if np.isfinite(affine).all() else float("nan")
    orientation = None
    if not np.isfinite(determinant) or abs(determinant) < MIN_AFFINE_DETERMINANT:
        problems.append(
            Problem(path, f"singular affine (determinant {determinant:.3g}): voxel positions are undefined", True)
        )
    else:
        orientation = "".join(nib.aff2axcodes(affine))
    geometry = {"shape": shape, "voxel_size_mm": voxel_size, "orientation": orientation}

    try:
        data = np.asanyarray(image.dataobj).reshape(shape[:3])  # scaling (scl_slope/inter) applied
    except (EOFError, zlib.error, OSError, ValueError) as error:
        return ImageInspection(
            (*problems, Problem(path, f"truncated or corrupt image data ({_one_line(error, path)})", True)), **geometry
        )

    if np.issubdtype(data.dtype, np.floating):
        n_nan, n_inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
        if n_nan or n_inf:
            problems.append(Problem(path, f"contains {n_nan} NaN and {n_inf} infinite voxels", True))
    finite = data[np.isfinite(data)] if np.issubdtype(data.dtype, np.floating) else data
    if not finite.any():
        problems.append(Problem(path, "all voxels are zero (empty image)", True))
    elif finite.min() == finite.max():
        problems.append(Problem(path, f"every voxel has the same value ({finite.min():g}); no anatomy", True))

    digest = hashlib.sha256(f"{data.dtype.str}{data.shape}".encode())
    digest.update(np.ascontiguousarray(data).tobytes())
    return ImageInspection(tuple(problems), voxel_sha256=digest.hexdigest(), **geometry)


def _stored_voxel_size(path: Path, image: nib.Nifti1Image) -> tuple[float, ...]:
    """Voxel size as written in the file: nibabel silently turns zero or negative sizes into valid ones
    on load, which would hide exactly what this check looks for."""
    header_class = type(image.header)
    with ImageOpener(path) as handle:
        raw = handle.read(header_class.sizeof_hdr)
    header = header_class.from_fileobj(io.BytesIO(raw), check=False)
    return tuple(float(s) for s in header["pixdim"][1:4])


def _one_line(error: BaseException, path: Path) -> str:
    """The library's message on one line, without repeating the path the problem already names."""
    message = str(error)
    for spelling in (f'"{path}"', f"'{path}'", str(path)):
        message = message.replace(spelling, "the file")
    return " ".join(message.split()) or type(error).__name__


# --- a whole site ------------------------------------------------------------------------------------


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
    from braing3n_core.data.bids import discover_scans

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
    from braing3n_core.data.cache import JsonCache

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
    with _quiet_nibabel(), ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda p: _cached_inspection(p, cache), paths)
        if show_progress and paths:
            from rich.progress import track

            results = track(results, total=len(paths), description="checking images", transient=True)
        inspections = list(results)
    return inspections


def _cached_inspection(path: Path, cache: JsonCache | None) -> ImageInspection:
    from braing3n_core.fileio import file_sha256

    if cache is None:
        return _inspect_guarded(path)
    try:
        key = f"check-v{CHECKS_VERSION}-{file_sha256(path)}"
    except OSError:
        return _inspect_guarded(path)  # unreadable files are reported by the inspection itself
    record = cache.get(key)
    if record is not None:
        return _inspection_from_json(path, record)
    inspection = _inspect_guarded(path)
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


# --- rendering ---------------------------------------------------------------------------------------


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
