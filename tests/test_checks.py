"""Image and site checks on real files: every bad case is named, excluded, and the rest still loads."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from rich.console import Console

from braing3n_core.cli import main as cli_main
from braing3n_core.data import inspection
from braing3n_core.data.checks import check_site, render_site_report
from braing3n_core.data.inspection import Problem, check_image
from braing3n_core.labels import Modality
from braing3n_core.site_config import SiteConfig

PARTICIPANTS = "participant_id\tsex\tage\tdiagnosis\tmmse\n" + "".join(
    f"sub-{i:02d}\t{'FM'[i % 2]}\t{60 + i}\t{['CN', 'MCI', 'AD'][i % 3]}\t{20 + i % 10}\n" for i in range(1, 20)
)


@pytest.fixture(scope="module")
def anatomy(nibabel_data_dir: Path) -> nib.Nifti1Image:
    return nib.load(nibabel_data_dir / "anatomical.nii")  # 33×41×25, 2 mm, big-endian int16, LAS


def _float_image(anatomy: nib.Nifti1Image, scale: float = 1.0) -> nib.Nifti1Image:
    return nib.Nifti1Image(np.asarray(anatomy.dataobj, np.float32) * scale, anatomy.affine)


def _save(image: nib.Nifti1Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def _cut_in_half(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _save_with_raw_header(anatomy: nib.Nifti1Image, edit: Callable[[nib.Nifti1Header], None], path: Path) -> Path:
    """Save with a header edited byte-for-byte: nibabel would 'fix' the very fields under test."""
    encoded = _float_image(anatomy).to_bytes()  # header (348 bytes), extensions, voxels
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(encoded[:348]), check=False)
    edit(header)
    raw = header.binaryblock + encoded[348:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def _zero_voxel_size(header: nib.Nifti1Header) -> None:
    header["pixdim"][1:4] = [0.0, 2.0, 2.0]
    header["qform_code"] = header["sform_code"] = 0


def _negative_voxel_size(header: nib.Nifti1Header) -> None:
    header["pixdim"][1:4] = [2.0, -2.0, 2.0]
    header["qform_code"] = header["sform_code"] = 0


def _singular_affine(header: nib.Nifti1Header) -> None:
    header.set_sform(np.diag([2.0, 2.0, 0.0, 1.0]), code=1)
    header.set_qform(None, code=0)


def _write_bad(kind: str, anatomy: nib.Nifti1Image, folder: Path, stem: str) -> Path:
    """One broken file of each kind the site check must catch."""
    data = np.asarray(anatomy.dataobj, np.float32)
    if kind == "truncated-gz":
        return _cut_in_half(_save(anatomy, folder / f"{stem}.nii.gz"))
    if kind == "truncated-nii":
        return _cut_in_half(_save(anatomy, folder / f"{stem}.nii"))
    if kind == "text":
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.nii").write_text("participant_id\tage\nsub-01\t70\n")
        return folder / f"{stem}.nii"
    if kind == "4d":
        return _save(
            nib.Nifti1Image(np.stack([data, data * 1.1, data * 0.9], axis=-1), anatomy.affine),
            folder / f"{stem}.nii.gz",
        )
    if kind == "nan-inf":
        broken = data.copy()
        broken[10, 10, 10:13] = np.nan
        broken[11, 11, 11] = np.inf
        return _save(nib.Nifti1Image(broken, anatomy.affine), folder / f"{stem}.nii.gz")
    if kind == "all-zero":
        return _save(nib.Nifti1Image(np.zeros_like(data), anatomy.affine), folder / f"{stem}.nii.gz")
    if kind == "constant":
        return _save(nib.Nifti1Image(np.full_like(data, 7.0), anatomy.affine), folder / f"{stem}.nii.gz")
    if kind == "zero-voxel":
        return _save_with_raw_header(anatomy, _zero_voxel_size, folder / f"{stem}.nii.gz")
    if kind == "negative-voxel":
        return _save_with_raw_header(anatomy, _negative_voxel_size, folder / f"{stem}.nii.gz")
    if kind == "singular-affine":
        return _save_with_raw_header(anatomy, _singular_affine, folder / f"{stem}.nii.gz")
    raise AssertionError(kind)


BAD_IMAGES = {
    "truncated-gz": "truncated or corrupt image data",
    "truncated-nii": "truncated or corrupt image data",
    "text": "unreadable: not a NIfTI image",
    "4d": "4-D image (shape (33, 41, 25, 3)) holds 3 volumes",
    "nan-inf": "contains 3 NaN and 1 infinite voxels",
    "all-zero": "all voxels are zero",
    "constant": "every voxel has the same value (7)",
    "zero-voxel": "zero or negative voxel size (0.0, 2.0, 2.0) mm",
    "negative-voxel": "zero or negative voxel size (2.0, -2.0, 2.0) mm",
    "singular-affine": "singular affine",
}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_check_image_names_each_bad_case(kind: str, anatomy: nib.Nifti1Image, tmp_path: Path) -> None:
    path = _write_bad(kind, anatomy, tmp_path, "sub-01_T1w")
    problems = check_image(path)

    assert problems, f"{kind} not detected"
    assert all(p.path == path and p.excluded for p in problems)
    assert any(BAD_IMAGES[kind] in p.reason for p in problems), [p.reason for p in problems]


def test_good_images_pass(anatomy: nib.Nifti1Image, nibabel_data_dir: Path, tmp_path: Path) -> None:
    assert check_image(nibabel_data_dir / "anatomical.nii") == []
    single_volume_4d = np.asarray(anatomy.dataobj, np.float32)[..., None]  # X, Y, Z, 1 is one volume
    assert check_image(_save(nib.Nifti1Image(single_volume_4d, anatomy.affine), tmp_path / "one.nii.gz")) == []
    assert check_image(tmp_path / "absent.nii.gz")[0].reason == "file not found"


def _write_site(root: Path, anatomy: nib.Nifti1Image) -> dict[str, Path]:
    """Subjects 01-05 good; 06-15 one bad image each; plus naming/table problems and a content copy."""
    root.mkdir(parents=True)
    (root / "participants.tsv").write_text(PARTICIPANTS.replace("\t65\t", "\t265\t"))  # sub-05 implausible age
    paths: dict[str, Path] = {}
    for i in range(1, 6):
        paths[f"good-{i}"] = _save(
            _float_image(anatomy, 1 + i / 10), root / f"sub-{i:02d}/ses-01/anat/sub-{i:02d}_ses-01_T1w.nii.gz"
        )
    for i, kind in enumerate(sorted(BAD_IMAGES), start=6):
        paths[kind] = _write_bad(kind, anatomy, root / f"sub-{i:02d}/anat", f"sub-{i:02d}_T1w")
    # The same image content as sub-01's scan, under another subject's name (.nii this time).
    paths["copy"] = _save(_float_image(anatomy, 1.1), root / "sub-16/anat/sub-16_FLAIR.nii")
    paths["unknown-suffix"] = _save(_float_image(anatomy, 3.0), root / "sub-02/ses-01/anat/sub-02_ses-01_T3w.nii.gz")
    paths["not-in-participants"] = _save(_float_image(anatomy, 3.1), root / "sub-42/anat/sub-42_T2w.nii.gz")
    (root / "sub-01/ses-01/anat/sub-01_ses-01_T1w.json").write_text(json.dumps({"MagneticFieldStrength": 1.5}))
    return paths


def _site_yaml(tmp_path: Path, data_root: Path) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(
        yaml.safe_dump({"site_id": "site-x", "data_root": str(data_root), "cache_dir": str(tmp_path / "cache")})
    )
    return path


def test_site_check_excludes_every_bad_scan_and_keeps_the_rest(anatomy: nib.Nifti1Image, tmp_path: Path) -> None:
    paths = _write_site(tmp_path / "bids", anatomy)
    config = SiteConfig.from_yaml(_site_yaml(tmp_path, tmp_path / "bids"))

    report = check_site(config, progress=False)

    usable = {r.path for r in report.usable_scans}
    assert usable == {paths[f"good-{i}"] for i in range(1, 6)} | {paths["not-in-participants"]}
    excluded = {p.path: p.reason for p in report.excluded}
    for kind, reason in BAD_IMAGES.items():
        assert reason in excluded[paths[kind]], kind
    assert "same image content as sub-01/ses-01/T1w" in excluded[paths["copy"]]
    assert "unknown modality suffix 'T3w'" in excluded[paths["unknown-suffix"]]
    warnings = {(p.path.name, p.reason) for p in report.warnings}
    assert ("sub-42", "subject has no row in participants.tsv; its scans load without labels") in warnings
    assert any(name == "participants.tsv" and "implausible age 265" in reason for name, reason in warnings)

    # Inventory and completeness count usable scans only.
    assert report.inventory["sub-01"] == {"ses-01": [Modality.T1W]}
    assert report.completeness["age"] == pytest.approx(4 / 6)  # sub-05 blanked, sub-42 unlabelled
    assert report.completeness["sex"] == pytest.approx(5 / 6)
    assert report.completeness["field_strength"] == pytest.approx(1 / 6)


def test_loader_skips_every_bad_scan_and_loads_the_rest(anatomy: nib.Nifti1Image, tmp_path: Path) -> None:
    from braing3n_core.data.datasets import load_site
    from braing3n_core.presets import PRESETS

    paths = _write_site(tmp_path / "bids", anatomy)
    config = SiteConfig(site_id="site-x", data_root=tmp_path / "bids", cache_dir=tmp_path / "cache")
    data = load_site(config, PRESETS["tiny"], progress=False)

    assert {r.path for r in data.records} == {paths[f"good-{i}"] for i in range(1, 6)} | {paths["not-in-participants"]}
    volumes = [
        data.dataset(name, augment=False)[i]["volume"] for name in data.splits for i in range(len(data.splits[name]))
    ]
    assert len(volumes) == 6 and all(v.shape == (1, 40, 48, 40) for v in volumes)


def test_report_lists_every_problem_as_path_and_reason(anatomy: nib.Nifti1Image, tmp_path: Path) -> None:
    _write_site(tmp_path / "bids", anatomy)
    report = check_site(
        SiteConfig(site_id="site-x", data_root=tmp_path / "bids", cache_dir=tmp_path / "c"), progress=False
    )
    buffer = io.StringIO()

    render_site_report(report, verbose=True, console=Console(file=buffer, width=250, color_system=None))

    text = buffer.getvalue()
    for problem in report.problems:
        assert f"{problem.path.relative_to(tmp_path / 'bids')}: {problem.reason}" in text
    assert "Metadata completeness" in text and "67%" in text  # age
    assert "6 usable scans" in text and f"{len(report.excluded_files)} files excluded" in text
    assert "sub-42" in text  # verbose lists every subject/session


def test_second_check_reads_no_image(anatomy: nib.Nifti1Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_site(tmp_path / "bids", anatomy)
    config = SiteConfig(site_id="site-x", data_root=tmp_path / "bids", cache_dir=tmp_path / "cache")
    reads: list[Path] = []
    real_inspect = inspection._inspect

    def counting_inspect(path: Path) -> inspection.ImageInspection:
        reads.append(path)
        return real_inspect(path)

    monkeypatch.setattr(inspection, "_inspect", counting_inspect)
    first = check_site(config, progress=False)
    reads_first = len(reads)
    second = check_site(config, progress=False)

    assert reads_first == len(first.images) > 10
    assert len(reads) == reads_first  # every verdict came from the content-hash cache
    assert second.problems == first.problems and second.usable_scans == first.usable_scans


def test_cli_exit_status_follows_usable_scans(
    anatomy: nib.Nifti1Image, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = _write_site(tmp_path / "bids", anatomy)
    assert cli_main(["site", "check", str(_site_yaml(tmp_path, tmp_path / "bids"))]) == 0
    nan_scan = paths["nan-inf"].relative_to(tmp_path / "bids")
    assert f"{nan_scan}: contains 3 NaN and 1 infinite voxels" in capsys.readouterr().out

    only_bad = tmp_path / "only-bad"
    _write_bad("all-zero", anatomy, only_bad / "sub-01/anat", "sub-01_T1w")
    (only_bad / "participants.tsv").write_text(PARTICIPANTS)
    assert cli_main(["site", "check", str(_site_yaml(tmp_path, only_bad))]) == 1
    assert "no usable scans" in capsys.readouterr().out

    missing_yaml = tmp_path / "missing.yaml"  # default cache folder: inside the (missing) data root
    missing_yaml.write_text(yaml.safe_dump({"site_id": "site-x", "data_root": str(tmp_path / "missing")}))
    assert cli_main(["site", "check", str(missing_yaml)]) == 2  # a bad site file, not a failed check
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()  # checking never creates a mistyped data root


def test_problem_prints_as_path_and_reason() -> None:
    assert str(Problem(Path("/data/sub-01_T1w.nii"), "all voxels are zero (empty image)", True)) == (
        "/data/sub-01_T1w.nii: all voxels are zero (empty image)"
    )
