"""Find a site's anatomical scans in its BIDS dataset and attach what is known about each.

Layout read (anything else under the data root is ignored: `derivatives/`, `sourcedata/`, `code/`,
dotfiles, other BIDS datatypes such as `func/`):

    participants.tsv                      participant_id, sex, age (baseline), diagnosis, mmse
    sub-X/sub-X_sessions.tsv              session_id, age, diagnosis, mmse (also accepted: sessions.tsv)
    sub-X/[ses-Y/]anat/sub-X_[ses-Y_]<modality>.nii[.gz]    <modality> ∈ labels.Modality values
    sub-X/[ses-Y/]anat/<same stem>.json   optional sidecar: MagneticFieldStrength (tesla)

This module reads names and tables only, never voxels (that is `checks.py`), so listing a site with
thousands of scans takes a moment. Every problem it finds names the file and says what is wrong; a
problem in a table never hides a scan: the scan loads with that label missing.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from braing3n_core.data.inspection import Problem
from braing3n_core.labels import AGE_RANGE_YEARS, DIAGNOSES, MMSE_RANGE, SEXES, Modality, ScanLabels
from braing3n_core.site_config import SiteConfig

MISSING_VALUES = frozenset({"", "n/a", "na", "nan"})
FIELD_STRENGTH_RANGE_T: tuple[float, float] = (0.05, 12.0)  # low-field portables up to 11.7 T research magnets
SESSIONS_TABLE_NAMES = ("{subject}_sessions.tsv", "sessions.tsv")

_NIFTI_NAME = re.compile(
    r"^(?P<subject>sub-[A-Za-z0-9]+)(?:_(?P<session>ses-[A-Za-z0-9]+))?_(?P<rest>[^.]+)\.(?P<ext>nii|nii\.gz)$"
)
_SUBJECT_DIR = re.compile(r"^sub-[A-Za-z0-9]+$")
_SESSION_DIR = re.compile(r"^ses-[A-Za-z0-9]+$")
_MODALITY_NAMES = {m.value: m for m in Modality}
_SEX_ALIASES = {"f": "F", "female": "F", "m": "M", "male": "M"}


@dataclass(frozen=True)
class ScanRecord:
    """One anatomical scan of one subject at one session, with its labels."""

    site_id: str
    subject: str  # "sub-01"
    session: str | None  # "ses-01", or None for a dataset without sessions
    modality: Modality
    path: Path
    labels: ScanLabels

    @property
    def key(self) -> str:
        """Stable name within a site, e.g. "sub-01/ses-01/T1w"; unique after duplicate removal."""
        return "/".join(part for part in (self.subject, self.session, self.modality.value) if part)


@dataclass(frozen=True)
class _TableLabels:
    """Labels read from one row of participants.tsv or sessions.tsv; None = not recorded."""

    age: float | None = None
    sex: str | None = None
    diagnosis: str | None = None
    mmse: float | None = None


def discover_scans(config: SiteConfig) -> tuple[list[ScanRecord], list[Problem]]:
    """Every recognised anatomical scan under `config.data_root`, and every naming or table problem.

    Returns scans of all modalities (the caller filters by `config.modalities`), sorted by key. Scans
    with an unusable name or a duplicate key are left out and reported (`excluded=True`); table
    problems are warnings (`excluded=False`) and only blank the affected label.
    """
    root = config.data_root
    problems: list[Problem] = []
    if not root.exists():
        return [], [Problem(root, "data root does not exist (check data_root in the site YAML)", excluded=True)]
    if not root.is_dir():
        return [], [Problem(root, "data root is not a folder (check data_root in the site YAML)", excluded=True)]

    participants = _read_participants(root / "participants.tsv", problems)
    records: list[ScanRecord] = []
    for subject_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("sub-")):
        if not _SUBJECT_DIR.match(subject_dir.name):
            problems.append(Problem(subject_dir, "subject folder name is not sub-<letters/digits>; ignored", True))
            continue
        records.extend(_discover_subject(config, subject_dir, participants, problems))
    records = _drop_duplicate_keys(records, problems)
    return records, problems


def _discover_subject(
    config: SiteConfig,
    subject_dir: Path,
    participants: dict[str, _TableLabels] | None,
    problems: list[Problem],
) -> list[ScanRecord]:
    subject = subject_dir.name
    base = participants.get(subject) if participants is not None else None
    if participants is not None and base is None:
        # Kept, not excluded: an unlabelled scan still trains the self-supervised encoder; label-using
        # stages (probes, conditional DiT) skip missing labels anyway. Dropping it would lose data.
        problems.append(
            Problem(subject_dir, "subject has no row in participants.tsv; its scans load without labels", False)
        )
    base = base or _TableLabels()
    sessions = _read_sessions(subject_dir, problems)

    anat_dirs: list[tuple[str | None, Path]] = []
    session_dirs = sorted(p for p in subject_dir.iterdir() if p.is_dir() and _SESSION_DIR.match(p.name))
    for folder, session in [(subject_dir, None), *((d, d.name) for d in session_dirs)]:
        _report_stray_images(folder, problems)
        if (folder / "anat").is_dir():
            anat_dirs.append((session, folder / "anat"))

    records: list[ScanRecord] = []
    for session, anat_dir in anat_dirs:
        for path in sorted(anat_dir.iterdir()):
            if path.name.startswith(".") or path.is_dir() or path.suffix == ".json":
                continue
            modality = _parse_scan_name(path, subject, session, problems)
            if modality is None:
                continue
            session_labels = (sessions or {}).get(session) if session else None
            labels = _labels_for(base, session_labels, _read_field_strength(path, problems))
            records.append(ScanRecord(config.site_id, subject, session, modality, path, labels))

    if not records:
        problems.append(Problem(subject_dir, "no anatomical scans found for this subject", False))
    elif sessions is None and len({r.session for r in records}) > 1 and base.age is not None:
        problems.append(
            Problem(
                subject_dir,
                "several sessions but no sessions.tsv: every session gets the baseline age from participants.tsv",
                False,
            )
        )
    return records


def _labels_for(base: _TableLabels, session: _TableLabels | None, field_strength: float | None) -> ScanLabels:
    """Session values override the subject's baseline values; sex is a subject property."""
    session = session or _TableLabels()
    return ScanLabels(
        age=session.age if session.age is not None else base.age,
        sex=base.sex,
        diagnosis=session.diagnosis if session.diagnosis is not None else base.diagnosis,
        mmse=session.mmse if session.mmse is not None else base.mmse,
        field_strength=field_strength,
    )


def _report_stray_images(folder: Path, problems: list[Problem]) -> None:
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name.endswith((".nii", ".nii.gz")):
            problems.append(Problem(path, "image outside an anat/ folder; ignored (move it into anat/)", True))


def _parse_scan_name(path: Path, subject: str, session: str | None, problems: list[Problem]) -> Modality | None:
    """The scan's modality from its BIDS file name, or None (with a problem) when it is not usable."""
    if not path.name.endswith((".nii", ".nii.gz")):
        problems.append(Problem(path, "not a NIfTI file (.nii or .nii.gz); ignored", True))
        return None
    match = _NIFTI_NAME.match(path.name)
    if match is None:
        problems.append(Problem(path, "file name is not sub-<label>[_ses-<label>]_<modality>.nii[.gz]; ignored", True))
        return None
    if match["subject"] != subject:
        problems.append(Problem(path, f"file name says {match['subject']} but it lies in {subject}/", True))
        return None
    if match["session"] != session:
        said = match["session"] or "no session"
        where = f"{session}/" if session else "a folder without a session"
        problems.append(Problem(path, f"file name says {said} but it lies in {where}", True))
        return None
    parts = match["rest"].split("_")
    entities, suffix = parts[:-1], parts[-1]
    if any("-" not in entity for entity in entities):
        problems.append(Problem(path, f"malformed BIDS entities in {match['rest']!r}; ignored", True))
        return None
    # Only the contrast-agent entity is part of the modality; acq-/run-/rec- and the like describe how a
    # scan was taken, and a second run of the same modality is reported as a duplicate.
    name = "_".join([e for e in entities if e.startswith("ce-")] + [suffix])
    modality = _MODALITY_NAMES.get(name)
    if modality is None:
        known = ", ".join(_MODALITY_NAMES)
        problems.append(Problem(path, f"unknown modality suffix {name!r} (expected one of {known}); ignored", True))
    return modality


def _drop_duplicate_keys(records: list[ScanRecord], problems: list[Problem]) -> list[ScanRecord]:
    """Keep the first file (by name) of each subject/session/modality and report the others."""
    kept: dict[str, ScanRecord] = {}
    for record in sorted(records, key=lambda r: (r.key, r.path.name)):
        first = kept.get(record.key)
        if first is None:
            kept[record.key] = record
            continue
        problems.append(
            Problem(
                record.path,
                f"duplicate scan: {record.key} is already provided by {first.path.name}; only that one is used",
                True,
            )
        )
    return list(kept.values())


# --- tables -----------------------------------------------------------------------------------------


def _read_tsv(path: Path, problems: list[Problem]) -> list[tuple[int, dict[str, str]]] | None:
    """Rows of a tab-separated table as (line number, column → raw value); None if unreadable."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        problems.append(Problem(path, f"unreadable table ({error}); its labels are treated as missing", False))
        return None
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        problems.append(Problem(path, "empty table; its labels are treated as missing", False))
        return None
    header = [name.strip() for name in next(csv.reader([lines[0][1]], delimiter="\t"))]
    rows: list[tuple[int, dict[str, str]]] = []
    for number, line in lines[1:]:
        values = next(csv.reader([line], delimiter="\t"))
        if len(values) != len(header):
            problems.append(
                Problem(
                    path, f"line {number} has {len(values)} fields but the header has {len(header)}; row ignored", False
                )
            )
            continue
        rows.append((number, {name: value.strip() for name, value in zip(header, values)}))
    return rows


def _read_participants(path: Path, problems: list[Problem]) -> dict[str, _TableLabels] | None:
    """Subject → baseline labels; None when there is no usable participants table."""
    if not path.is_file():
        problems.append(Problem(path, "missing: scans load without age, sex, diagnosis or MMSE", False))
        return None
    rows = _read_tsv(path, problems)
    if rows is None:
        return None
    if rows and "participant_id" not in rows[0][1]:
        problems.append(Problem(path, "no participant_id column; labels are treated as missing", False))
        return None
    table: dict[str, _TableLabels] = {}
    first_line: dict[str, int] = {}
    for number, row in rows:
        subject = _with_prefix(row["participant_id"], "sub-")
        if subject in table:
            problems.append(
                Problem(
                    path, f"{subject} is listed twice (lines {first_line[subject]} and {number}); first row used", False
                )
            )
            continue
        first_line[subject] = number
        where = f"{subject} (line {number})"
        table[subject] = _TableLabels(
            age=_parse_age(row.get("age"), path, where, problems),
            sex=_parse_sex(row.get("sex"), path, where, problems),
            diagnosis=_parse_diagnosis(row.get("diagnosis"), path, where, problems),
            mmse=_parse_mmse(row.get("mmse"), path, where, problems),
        )
    return table


def _read_sessions(subject_dir: Path, problems: list[Problem]) -> dict[str, _TableLabels] | None:
    """Session → per-session labels from the subject's sessions table; None when there is none."""
    for pattern in SESSIONS_TABLE_NAMES:
        path = subject_dir / pattern.format(subject=subject_dir.name)
        if path.is_file():
            break
    else:
        return None
    rows = _read_tsv(path, problems)
    if rows is None:
        return None
    if rows and "session_id" not in rows[0][1]:
        problems.append(Problem(path, "no session_id column; per-session labels are treated as missing", False))
        return None
    table: dict[str, _TableLabels] = {}
    for number, row in rows:
        session = _with_prefix(row["session_id"], "ses-")
        where = f"{session} (line {number})"
        table[session] = _TableLabels(
            age=_parse_age(row.get("age"), path, where, problems),
            diagnosis=_parse_diagnosis(row.get("diagnosis"), path, where, problems),
            mmse=_parse_mmse(row.get("mmse"), path, where, problems),
        )
    return table


def _with_prefix(value: str, prefix: str) -> str:
    return value if value.startswith(prefix) else f"{prefix}{value}"


def _is_missing(raw: str | None) -> bool:
    return raw is None or raw.strip().lower() in MISSING_VALUES


def _parse_number(
    raw: str | None, name: str, unit: str, allowed: tuple[float, float], path: Path, where: str, problems: list[Problem]
) -> float | None:
    if _is_missing(raw):
        return None
    assert raw is not None
    text = raw.strip().removesuffix("+")  # BIDS de-identified ages are written "89+"
    try:
        value = float(text)
    except ValueError:
        problems.append(Problem(path, f"{where}: {name} {raw!r} is not a number; treated as missing", False))
        return None
    low, high = allowed
    if not math.isfinite(value) or not low <= value <= high:
        problems.append(
            Problem(
                path, f"{where}: implausible {name} {raw} (allowed {low:g}–{high:g}{unit}); treated as missing", False
            )
        )
        return None
    return value


def _parse_age(raw: str | None, path: Path, where: str, problems: list[Problem]) -> float | None:
    return _parse_number(raw, "age", " years", AGE_RANGE_YEARS, path, where, problems)


def _parse_mmse(raw: str | None, path: Path, where: str, problems: list[Problem]) -> float | None:
    return _parse_number(raw, "MMSE", "", MMSE_RANGE, path, where, problems)


def _parse_sex(raw: str | None, path: Path, where: str, problems: list[Problem]) -> str | None:
    if _is_missing(raw):
        return None
    assert raw is not None
    sex = _SEX_ALIASES.get(raw.strip().lower())
    if sex is None or sex not in SEXES:
        problems.append(
            Problem(path, f"{where}: sex {raw!r} is not one of {', '.join(SEXES)}; treated as missing", False)
        )
    return sex


def _parse_diagnosis(raw: str | None, path: Path, where: str, problems: list[Problem]) -> str | None:
    if _is_missing(raw):
        return None
    assert raw is not None
    by_lower = {d.lower(): d for d in DIAGNOSES}
    diagnosis = by_lower.get(raw.strip().lower())
    if diagnosis is None:
        problems.append(
            Problem(path, f"{where}: diagnosis {raw!r} is not one of {', '.join(DIAGNOSES)}; treated as missing", False)
        )
    return diagnosis


def _read_field_strength(image_path: Path, problems: list[Problem]) -> float | None:
    """MagneticFieldStrength from the image's JSON sidecar (same stem), if there is one."""
    stem = image_path.name.removesuffix(".gz").removesuffix(".nii")
    sidecar = image_path.with_name(f"{stem}.json")
    if not sidecar.is_file():
        return None
    try:
        metadata = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        problems.append(Problem(sidecar, f"not valid JSON ({error}); field strength unknown", False))
        return None
    if not isinstance(metadata, dict) or "MagneticFieldStrength" not in metadata:
        return None
    value = metadata["MagneticFieldStrength"]
    low, high = FIELD_STRENGTH_RANGE_T
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        problems.append(
            Problem(
                sidecar,
                f"MagneticFieldStrength {value!r} is not a field strength in tesla ({low:g}–{high:g}); ignored",
                False,
            )
        )
        return None
    return float(value)
