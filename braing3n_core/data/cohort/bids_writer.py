"""Writing one site's cohort as a BIDS 1.9 raw dataset with a ground-truth derivative.

Layout of `OUT/site-a/`:

    dataset_description.json  README  participants.tsv/.json
    sub-a001/sub-a001_sessions.tsv/.json
    sub-a001/ses-01/anat/sub-a001_ses-01_{T1w,ce-gadolinium_T1w,T2w,FLAIR}.nii.gz (+ .json)
    derivatives/braing3n-truth/
        dataset_description.json  README  truth.tsv/.json  desc-truth_dseg.tsv
        sub-a001/ses-01/anat/sub-a001_ses-01_desc-truth_dseg.nii.gz

Every file is written atomically (temporary file + rename) and deterministically (sorted JSON keys,
gzip with mtime 0), so equal seeds give byte-identical datasets.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

from braing3n_core.data.cohort.effects import LABELS
from braing3n_core.data.cohort.sites import SiteProfile
from braing3n_core.labels import DIAGNOSES, Modality

BIDS_VERSION = "1.9.0"
TRUTH_PIPELINE = "braing3n-truth"
GENERATOR_NAME = "braing3n cohort make"

MISSING = "n/a"


def write_bytes(path: Path, data: bytes) -> None:
    """Atomic write: a crash leaves either the old file or the new one, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, content: Mapping[str, Any]) -> None:
    write_text(path, json.dumps(content, indent=2, sort_keys=True) + "\n")


def write_tsv(path: Path, columns: list[str], rows: Iterable[Mapping[str, Any]]) -> None:
    lines = ["\t".join(columns)]
    for row in rows:
        lines.append("\t".join(_cell(row.get(column)) for column in columns))
    write_text(path, "\n".join(lines) + "\n")


def _cell(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 and value != 0 else f"{round(value, 3):g}"
    return str(value)


def generator_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("braing3n-fl")
    except PackageNotFoundError:
        return "0+unknown"


def write_dataset_description(root: Path, site_id: str, profile: SiteProfile, seed: int) -> None:
    write_json(
        root / "dataset_description.json",
        {
            "Name": f"BrainG3N-FL synthetic cohort, {site_id} ({profile.archetype})",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "raw",
            "License": "CC0",
            "Authors": ["BrainG3N-FL synthetic cohort generator"],
            "Acknowledgements": "Anatomy derived from the ICBM 2009a nonlinear symmetric template "
            "(Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological "
            "Institute, McGill University), as bundled with nilearn.",
            "GeneratedBy": [{"Name": GENERATOR_NAME, "Version": generator_version(), "Description": f"seed {seed}"}],
        },
    )


def write_readme(root: Path, site_id: str, profile: SiteProfile, scanner_summary: str, n_subjects: int) -> None:
    text = f"""# {site_id}: synthetic {profile.archetype} site

Synthetic brain MRI written by `{GENERATOR_NAME}` (BrainG3N-FL). No real person's data is included:
every subject is the ICBM152 2009a template deformed and altered by a simulated age and disease course,
then imaged by a simulated scanner.

- Population: {profile.description}; {n_subjects} subjects, baseline ages {profile.age_range[0]:g}-{profile.age_range[1]:g}.
- Scanner: {scanner_summary}.
- Sequences: {", ".join(m.value for m in profile.modalities)}.
- Images are skull-stripped (background exactly 0) and lie roughly in MNI position, in the site's own
  voxel grid and axis order.
- Ground truth (true tissue, ventricle, hippocampal, lesion and tumour volumes per session; hard label
  maps) is in derivatives/{TRUTH_PIPELINE}/.
"""
    write_text(root / "README", text)


def write_participants(root: Path, rows: list[Mapping[str, Any]]) -> None:
    write_tsv(root / "participants.tsv", ["participant_id", "sex", "age", "diagnosis", "mmse"], rows)
    write_json(
        root / "participants.json",
        {
            "sex": {"Description": "sex of the participant", "Levels": {"F": "female", "M": "male"}},
            "age": {"Description": "age at the first session", "Units": "year"},
            "diagnosis": _diagnosis_column("at the first session"),
            "mmse": _mmse_column("at the first session"),
        },
    )


def write_sessions(subject_dir: Path, participant_id: str, rows: list[Mapping[str, Any]]) -> None:
    write_tsv(subject_dir / f"{participant_id}_sessions.tsv", ["session_id", "age", "diagnosis", "mmse"], rows)
    write_json(
        subject_dir / f"{participant_id}_sessions.json",
        {
            "age": {"Description": "age at this session", "Units": "year"},
            "diagnosis": _diagnosis_column("at this session"),
            "mmse": _mmse_column("at this session"),
        },
    )


def _diagnosis_column(when: str) -> dict[str, Any]:
    names = {"CN": "cognitively normal", "MCI": "mild cognitive impairment", "AD": "Alzheimer's disease", "glioma": "glioma"}
    return {"Description": f"clinical diagnosis {when}", "Levels": {d: names[d] for d in DIAGNOSES}}


def _mmse_column(when: str) -> dict[str, Any]:
    return {"Description": f"Mini-Mental State Examination score {when} (0-30; n/a when not recorded)", "Units": "arbitrary"}


def scan_sidecar(profile: SiteProfile, modality: Modality, site_id: str, voxel_mm: tuple[float, ...]) -> dict[str, Any]:
    """BIDS sidecar of one scan: scanner and plausible sequence parameters for the field strength."""
    at_3t = profile.field_strength >= 3.0
    sequence = {
        Modality.T1W: {"RepetitionTime": 2.3 if at_3t else 2.4, "EchoTime": 0.00298 if at_3t else 0.0036, "InversionTime": 0.9 if at_3t else 1.0, "FlipAngle": 9 if at_3t else 8, "MRAcquisitionType": "3D", "PulseSequenceType": "MPRAGE"},
        Modality.T2W: {"RepetitionTime": 3.2 if at_3t else 4.0, "EchoTime": 0.409 if at_3t else 0.105, "FlipAngle": 120 if at_3t else 90, "MRAcquisitionType": "3D" if at_3t else "2D", "PulseSequenceType": "TSE"},
        Modality.FLAIR: {"RepetitionTime": 5.0 if at_3t else 9.0, "EchoTime": 0.393 if at_3t else 0.12, "InversionTime": 1.8 if at_3t else 2.5, "FlipAngle": 120 if at_3t else 150, "MRAcquisitionType": "3D" if at_3t else "2D", "PulseSequenceType": "FLAIR"},
    }
    fields: dict[str, Any] = dict(sequence[Modality.T1W if modality == Modality.T1C else modality])
    if modality == Modality.T1C:
        fields["ContrastBolusIngredient"] = "GADOLINIUM"
    fields.update(
        {
            "Manufacturer": profile.manufacturer,
            "ManufacturersModelName": profile.model,
            "MagneticFieldStrength": profile.field_strength,
            "InstitutionName": f"BrainG3N-FL synthetic {site_id} ({profile.archetype})",
            "SliceThickness": round(float(max(voxel_mm)), 3),
        }
    )
    return fields


TRUTH_COLUMNS = [
    "participant_id", "session_id", "modality", "filename", "site_id", "age", "sex", "diagnosis", "mmse",
    "field_strength", "years_since_baseline", "severity", "head_scale",
    "gm_ml", "wm_ml", "csf_ml", "ventricle_ml", "hippocampus_ml", "wm_lesion_ml",
    "tumour_ml", "tumour_necrosis_ml", "tumour_enhancing_ml", "oedema_ml", "brain_ml",
]


def write_truth_derivative(root: Path, rows: list[Mapping[str, Any]], seed: int) -> None:
    truth = root / "derivatives" / TRUTH_PIPELINE
    write_json(
        truth / "dataset_description.json",
        {
            "Name": "BrainG3N-FL synthetic cohort: ground truth",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "License": "CC0",
            "GeneratedBy": [{"Name": GENERATOR_NAME, "Version": generator_version(), "Description": f"seed {seed}"}],
            "SourceDatasets": [{"URL": "bids::"}],
        },
    )
    write_text(
        truth / "README",
        "Ground truth of the synthetic cohort: truth.tsv has one row per raw scan (volumes are per session and\n"
        "equal for all modalities of a session); *_desc-truth_dseg.nii.gz are hard tissue labels on each\n"
        "session's scan grid, indexed as in desc-truth_dseg.tsv.\n",
    )
    write_tsv(truth / "truth.tsv", TRUTH_COLUMNS, rows)
    volume = {"Units": "ml"}
    write_json(
        truth / "truth.json",
        {
            "participant_id": {"Description": "participant label in the raw dataset"},
            "session_id": {"Description": "session label in the raw dataset"},
            "modality": {"Description": "scan suffix (entities before the suffix included)", "Levels": {m.value: m.short for m in Modality}},
            "filename": {"Description": "scan path relative to the raw dataset root"},
            "site_id": {"Description": "site (hospital) that acquired the scan"},
            "age": {"Description": "age at the session", "Units": "year"},
            "sex": {"Description": "sex", "Levels": {"F": "female", "M": "male"}},
            "diagnosis": _diagnosis_column("at the session"),
            "mmse": _mmse_column("at the session"),
            "field_strength": {"Description": "MagneticFieldStrength of the scanner", "Units": "T"},
            "years_since_baseline": {"Description": "time since the first session", "Units": "year"},
            "severity": {"Description": "latent neurodegeneration severity (0 healthy; MCI below 1, AD from 1)"},
            "head_scale": {"Description": "linear scale of the subject's head relative to the ICBM152 template"},
            **{f"{name}_ml": {"Description": f"true {text} volume", **volume} for name, text in _VOLUME_TEXT.items()},
        },
    )
    write_tsv(
        truth / "desc-truth_dseg.tsv",
        ["index", "name"],
        [{"index": index, "name": name} for index, name in enumerate(LABELS)],
    )


_VOLUME_TEXT = {
    "gm": "grey-matter (hippocampal region included)",
    "wm": "normal-appearing white-matter",
    "csf": "cerebrospinal-fluid (ventricles included)",
    "ventricle": "ventricular CSF",
    "hippocampus": "hippocampal-region (medial temporal) grey-matter",
    "wm_lesion": "white-matter hyperintensity",
    "tumour": "tumour (necrotic core plus enhancing rim)",
    "tumour_necrosis": "necrotic tumour core",
    "tumour_enhancing": "enhancing tumour rim",
    "oedema": "peritumoural oedema",
    "brain": "total brain (all tissue classes and CSF inside the skull-stripped mask)",
}


def truth_map_path(root: Path, participant_id: str, session_id: str) -> Path:
    return root / "derivatives" / TRUTH_PIPELINE / participant_id / session_id / "anat" / f"{participant_id}_{session_id}_desc-truth_dseg.nii.gz"


def scan_path(root: Path, participant_id: str, session_id: str, modality: Modality) -> Path:
    return root / participant_id / session_id / "anat" / f"{participant_id}_{session_id}_{modality.value}.nii.gz"
