"""BIDS discovery: names, tables and sidecars of a site, and every naming/table problem it reports."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from braing3n_core.data.bids import discover_scans
from braing3n_core.labels import Modality, ScanLabels
from braing3n_core.site_config import SiteConfig

PARTICIPANTS = (
    "participant_id\tsex\tage\tdiagnosis\tmmse\n"
    "sub-01\tF\t71.5\tAD\t19\n"
    "sub-02\tM\t64\tCN\tn/a\n"
    "sub-03\tm\t89+\tMCI\t26\n"
)


@pytest.fixture(scope="module")
def anatomy(nibabel_data_dir: Path) -> nib.Nifti1Image:
    return nib.load(nibabel_data_dir / "anatomical.nii")


def write_scan(root: Path, relative: str, anatomy: nib.Nifti1Image, scale: float = 1.0) -> Path:
    """A real (small) T1 crop at `root/relative`; `scale` makes each file's content distinct."""
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(anatomy.dataobj, dtype=np.float32) * scale
    nib.save(nib.Nifti1Image(data, anatomy.affine), path)
    return path


def site(root: Path, **overrides: object) -> SiteConfig:
    return SiteConfig(site_id="site-a", data_root=root, **overrides)


@pytest.fixture()
def good_site(tmp_path: Path, anatomy: nib.Nifti1Image) -> Path:
    """sub-01: two sessions (sessions.tsv), sub-02: no sessions, sub-03: one session, 'sessions.tsv' name."""
    root = tmp_path / "bids"
    root.mkdir()
    (root / "participants.tsv").write_text(PARTICIPANTS)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.9.0"}))
    write_scan(root, "sub-01/ses-01/anat/sub-01_ses-01_T1w.nii.gz", anatomy, 1.0)
    write_scan(root, "sub-01/ses-01/anat/sub-01_ses-01_FLAIR.nii.gz", anatomy, 1.1)
    write_scan(root, "sub-01/ses-02/anat/sub-01_ses-02_T1w.nii.gz", anatomy, 1.2)
    write_scan(root, "sub-01/ses-02/anat/sub-01_ses-02_ce-gadolinium_T1w.nii.gz", anatomy, 1.3)
    (root / "sub-01/ses-01/anat/sub-01_ses-01_T1w.json").write_text(json.dumps({"MagneticFieldStrength": 3}))
    (root / "sub-01/sub-01_sessions.tsv").write_text(
        "session_id\tacq_time\tage\tdiagnosis\tmmse\nses-01\t2020-01-01\t71.5\tMCI\t24\nses-02\t2022-01-01\t73.5\tn/a\tn/a\n"
    )
    write_scan(root, "sub-02/anat/sub-02_T2w.nii", anatomy, 1.4)
    write_scan(root, "sub-03/ses-01/anat/sub-03_ses-01_T1w.nii.gz", anatomy, 1.5)
    (root / "sub-03/sessions.tsv").write_text("session_id\tage\nses-01\t90\n")
    # Everything below must be ignored without a word.
    write_scan(root, "derivatives/braing3n/sub-01/anat/sub-01_T1w.nii.gz", anatomy, 2.0)
    write_scan(root, "sourcedata/sub-01/anat/sub-01_T1w.nii.gz", anatomy, 2.1)
    write_scan(root, "sub-02/func/sub-02_task-rest_bold.nii.gz", anatomy, 2.2)
    (root / "sub-02/anat/.sub-02_T2w.nii.swp").write_text("editor swap file")
    (root / ".git").mkdir()
    return root


def test_discovers_scans_with_labels_and_stable_keys(good_site: Path) -> None:
    records, problems = discover_scans(site(good_site))

    assert problems == []
    assert [r.key for r in records] == [
        "sub-01/ses-01/FLAIR",
        "sub-01/ses-01/T1w",
        "sub-01/ses-02/T1w",
        "sub-01/ses-02/ce-gadolinium_T1w",
        "sub-02/T2w",
        "sub-03/ses-01/T1w",
    ]
    by_key = {r.key: r for r in records}
    assert all(r.site_id == "site-a" and r.path.is_file() for r in records)
    assert by_key["sub-01/ses-02/ce-gadolinium_T1w"].modality is Modality.T1C
    # Session values override the baseline; a missing session value falls back to participants.tsv.
    assert by_key["sub-01/ses-01/T1w"].labels == ScanLabels(
        age=71.5, sex="F", diagnosis="MCI", mmse=24, field_strength=3.0
    )
    assert by_key["sub-01/ses-02/T1w"].labels == ScanLabels(age=73.5, sex="F", diagnosis="AD", mmse=19)
    assert by_key["sub-02/T2w"].labels == ScanLabels(age=64, sex="M", diagnosis="CN", mmse=None)
    assert by_key["sub-02/T2w"].session is None
    assert by_key["sub-03/ses-01/T1w"].labels == ScanLabels(age=90, sex="M", diagnosis="MCI", mmse=26)


def test_missing_data_root_is_one_excluding_problem(tmp_path: Path) -> None:
    records, problems = discover_scans(site(tmp_path / "nowhere"))
    assert records == []
    assert len(problems) == 1 and problems[0].excluded and "data root does not exist" in problems[0].reason


def test_missing_participants_table_is_a_warning_and_scans_still_load(good_site: Path) -> None:
    (good_site / "participants.tsv").unlink()
    records, problems = discover_scans(site(good_site))

    assert len(records) == 6
    assert [(p.path.name, p.excluded) for p in problems] == [("participants.tsv", False)]
    assert "missing" in problems[0].reason
    assert all(r.labels.sex is None for r in records)


def test_subject_without_participants_row_is_kept_unlabelled_and_reported(
    good_site: Path, anatomy: nib.Nifti1Image
) -> None:
    write_scan(good_site, "sub-09/anat/sub-09_T1w.nii.gz", anatomy, 3.0)
    records, problems = discover_scans(site(good_site))

    unlabelled = [r for r in records if r.subject == "sub-09"]
    assert len(unlabelled) == 1 and unlabelled[0].labels == ScanLabels()
    assert [(p.path, p.excluded) for p in problems] == [(good_site / "sub-09", False)]
    assert "no row in participants.tsv" in problems[0].reason


@pytest.mark.parametrize("name", ["sub-02_T3w.nii.gz", "sub-02_bold.nii.gz", "sub-02_ce-iodine_T1w.nii.gz"])
def test_unknown_modality_suffix_is_excluded_and_the_rest_loads(
    good_site: Path, anatomy: nib.Nifti1Image, name: str
) -> None:
    bad = write_scan(good_site, f"sub-02/anat/{name}", anatomy, 3.0)
    records, problems = discover_scans(site(good_site))

    assert len(records) == 6
    assert [(p.path, p.excluded) for p in problems] == [(bad, True)]
    assert "unknown modality suffix" in problems[0].reason and "T1w" in problems[0].reason


def test_same_subject_session_modality_twice_keeps_one_and_reports_the_other(
    good_site: Path, anatomy: nib.Nifti1Image
) -> None:
    second = write_scan(good_site, "sub-02/anat/sub-02_T2w.nii.gz", anatomy, 1.4)  # .nii already there
    extra_run = write_scan(good_site, "sub-03/ses-01/anat/sub-03_ses-01_run-2_T1w.nii.gz", anatomy, 4.0)
    records, problems = discover_scans(site(good_site))

    assert len(records) == 6
    assert next(r for r in records if r.key == "sub-02/T2w").path.name == "sub-02_T2w.nii"
    assert {(p.path, p.excluded) for p in problems} == {(extra_run, True), (second, True)}
    assert all("duplicate scan" in p.reason for p in problems)


def test_implausible_age_and_mmse_blank_the_label_and_name_the_row(good_site: Path) -> None:
    (good_site / "participants.tsv").write_text(
        "participant_id\tsex\tage\tdiagnosis\tmmse\n"
        "sub-01\tF\t171\tAD\t19\n"
        "sub-02\tX\t-3\tflu\t45\n"
        "sub-03\tM\tabc\tMCI\t26\n"
    )
    records, problems = discover_scans(site(good_site))

    assert len(records) == 6
    by_key = {r.key: r for r in records}
    assert by_key["sub-01/ses-01/T1w"].labels.age == 71.5  # the session table still knows
    assert by_key["sub-02/T2w"].labels == ScanLabels()
    reasons = [p.reason for p in problems]
    assert all(p.path.name == "participants.tsv" and not p.excluded for p in problems)
    assert any(r.startswith("sub-01 (line 2): implausible age 171") for r in reasons)
    assert any(r.startswith("sub-02 (line 3): implausible age -3") for r in reasons)
    assert any(r.startswith("sub-02 (line 3): implausible MMSE 45") for r in reasons)
    assert any("sex 'X'" in r for r in reasons) and any("diagnosis 'flu'" in r for r in reasons)
    assert any("age 'abc' is not a number" in r for r in reasons)


def test_session_table_problems_are_reported(good_site: Path) -> None:
    (good_site / "sub-01/sub-01_sessions.tsv").write_text("session_id\tage\nses-01\t150\nses-02\n")
    records, problems = discover_scans(site(good_site))

    assert len(records) == 6
    reasons = sorted(p.reason for p in problems)
    assert any("implausible age 150" in r for r in reasons)
    assert any("line 3 has 1 fields but the header has 2" in r for r in reasons)
    assert {r.labels.age for r in records if r.subject == "sub-01"} == {71.5}  # baseline fallback


def test_misplaced_and_misnamed_files_are_excluded(good_site: Path, anatomy: nib.Nifti1Image) -> None:
    wrong_subject = write_scan(good_site, "sub-02/anat/sub-01_T1w.nii.gz", anatomy, 5.0)
    wrong_session = write_scan(good_site, "sub-03/ses-01/anat/sub-03_ses-02_T1w.nii.gz", anatomy, 5.1)
    stray = write_scan(good_site, "sub-02/sub-02_FLAIR.nii.gz", anatomy, 5.2)
    not_nifti = good_site / "sub-02/anat/sub-02_T1w.mgz"
    not_nifti.write_bytes(b"\x00" * 10)
    records, problems = discover_scans(site(good_site))

    assert len(records) == 6
    reasons = {p.path: p.reason for p in problems}
    assert all(p.excluded for p in problems) and len(problems) == 4
    assert "says sub-01 but it lies in sub-02/" in reasons[wrong_subject]
    assert "says ses-02 but it lies in ses-01/" in reasons[wrong_session]
    assert "outside an anat/ folder" in reasons[stray]
    assert "not a NIfTI file" in reasons[not_nifti]


def test_bad_sidecar_is_a_warning(good_site: Path) -> None:
    (good_site / "sub-02/anat/sub-02_T2w.json").write_text("{not json")
    (good_site / "sub-01/ses-01/anat/sub-01_ses-01_T1w.json").write_text(json.dumps({"MagneticFieldStrength": 300}))
    records, problems = discover_scans(site(good_site))

    assert len(records) == 6 and all(r.labels.field_strength is None for r in records)
    assert sorted((p.path.name, p.excluded) for p in problems) == [
        ("sub-01_ses-01_T1w.json", False),
        ("sub-02_T2w.json", False),
    ]
