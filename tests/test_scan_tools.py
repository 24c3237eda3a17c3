"""Tools for any real scan: `braing3n embed`, `braing3n reconstruct` and `braing3n forecast --scan`.

The models are trained by the real CLI (`braing3n train mae/decoder/dit`, two steps each, `tiny` preset)
on site-a of the conftest cohort, once per module. The scans are nibabel's real anatomy: its LAS 2 mm
`anatomical.nii` as stored, and the same head rewritten PSR with anisotropic voxels and an offset origin
(a layout no site of the cohort has), plus files that cannot be used.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from braing3n_core.cli import main
from braing3n_core.data.datasets import load_site
from braing3n_core.data.tokens import TokenCache, encoder_sha256
from braing3n_core.data.transforms import preprocess_invertible, preprocess_volume, preprocessing_fingerprint
from braing3n_core.federation.run_folder import RunFolder
from braing3n_core.generation.output import preset_affine
from braing3n_core.jobs.embed import load_embeddings
from braing3n_core.presets import get_preset
from braing3n_core.site_config import SiteConfig
from braing3n_core.training.checkpoints import load_encoder

TINY = get_preset("tiny")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def train(stage: str, site: Path, out: Path) -> None:
    args = ["train", stage, "--sites", str(site), "--preset", "tiny", "--steps", "2", "--batch-size", "2",
            "--checkpoint-every", "2", "--out", str(out)]
    assert main(args) == 0


@pytest.fixture(scope="module")
def runs(synthetic_cohort, tmp_path_factory) -> dict[str, Path]:
    """`run`: mae → decoder → dit on site-a (its own cache: the shared cohort folder stays read-only)."""
    root = tmp_path_factory.mktemp("scan_tools")
    source = SiteConfig.from_yaml(synthetic_cohort[0])
    site = root / "site-a.yaml"
    site.write_text(yaml.safe_dump({**source.to_yaml_dict(), "cache_dir": str(root / "cache")}))
    run = root / "run"
    for stage in ("mae", "decoder", "dit"):
        train(stage, site, run)
    return {"site": site, "run": run, "mae": RunFolder(run).stage_checkpoint("mae")}


@pytest.fixture(scope="module")
def scans(nibabel_data_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """Real anatomy in two layouts, and four files that cannot be used (each for another reason)."""
    folder = tmp_path_factory.mktemp("scans")
    anatomical = nibabel_data_dir / "anatomical.nii"  # 33×41×25, 2 mm, big-endian int16, LAS
    image = nib.load(anatomical)
    # PSR: axis 0 grows toward Posterior, 1 toward Superior, 2 toward Right; then 1.6 × 2.8 × 2.2 mm voxels
    reoriented = nib.as_closest_canonical(image).as_reoriented(
        nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt("PSR")))
    affine = reoriented.affine @ np.diag([0.8, 1.4, 1.1, 1.0])
    affine[:3, 3] += [12.5, -7.0, 31.0]
    psr = nib.Nifti1Image(np.asarray(reoriented.dataobj, dtype=np.float32), affine)
    assert nib.aff2axcodes(psr.affine) == ("P", "S", "R")
    nib.save(psr, folder / "psr_aniso.nii.gz")
    (folder / "notes.nii.gz").write_text("not an image\n")
    nib.save(nib.Nifti1Image(np.zeros((20, 24, 20), np.float32), np.eye(4)), folder / "empty.nii.gz")
    with_nan = np.asarray(image.dataobj, dtype=np.float32)
    with_nan[10, 10, 10] = np.nan
    nib.save(nib.Nifti1Image(with_nan, image.affine), folder / "nan.nii.gz")
    return {"anatomical": anatomical, "psr": folder / "psr_aniso.nii.gz", "not_nifti": folder / "notes.nii.gz",
            "empty": folder / "empty.nii.gz", "nan": folder / "nan.nii.gz",
            "4d": nibabel_data_dir / "example4d.nii.gz"}


# --- braing3n embed ---------------------------------------------------------------------------------------------


def test_embed_writes_features_skips_unusable_scans_and_repeats_exactly(runs, scans, tmp_path: Path, capsys) -> None:
    order = ["anatomical", "not_nifti", "psr", "4d", "empty", "nan"]
    out = tmp_path / "embed"
    code = main(["embed", *(str(scans[name]) for name in order), "--encoder", str(runs["mae"]), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    tensors, manifest = load_embeddings(out)
    encoder = load_encoder(runs["mae"])
    n_tokens, width = encoder.config.num_tokens, encoder.config.width
    assert tensors["tokens"].shape == (2, n_tokens, width) and tensors["tokens"].dtype == np.float32
    np.testing.assert_allclose(tensors["pooled"], tensors["tokens"].mean(axis=1), rtol=1e-6, atol=1e-6)
    assert [(r["index"], Path(r["path"]).name) for r in manifest["scans"]] == [(0, "anatomical.nii"),
                                                                             (1, "psr_aniso.nii.gz")]
    assert manifest["preprocessing_fingerprint"] == preprocessing_fingerprint(TINY) and manifest["preset"] == "tiny"
    assert manifest["encoder"]["sha256"] == encoder_sha256(encoder)
    assert len(manifest["scans"][0]["sha256"]) == 64
    skipped = {s["name"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"notes.nii.gz", "example4d.nii.gz", "empty.nii.gz", "nan.nii.gz"}
    assert "not a NIfTI" in skipped["notes.nii.gz"] and "volumes" in skipped["example4d.nii.gz"]
    assert "zero" in skipped["empty.nii.gz"] and "NaN" in skipped["nan.nii.gz"]
    assert all(f"skipped {name}" in err for name in skipped), err
    # the features are the training pipeline's: preprocess_volume + the frozen encoder
    direct = encoder(torch.from_numpy(preprocess_volume(scans["anatomical"], TINY))[None])[0]
    np.testing.assert_array_equal(tensors["tokens"][0], direct.numpy())

    # the same scans again, in another call and another order: identical features
    again = tmp_path / "again"
    assert main(["embed", str(scans["psr"]), str(scans["anatomical"]), "--encoder", str(runs["mae"]),
                 "--out", str(again)]) == 0
    repeated, _ = load_embeddings(again)
    np.testing.assert_array_equal(repeated["tokens"][[1, 0]], tensors["tokens"])
    np.testing.assert_array_equal(repeated["pooled"][[1, 0]], tensors["pooled"])


def test_embed_a_site_gives_its_token_cache_features(runs, tmp_path: Path) -> None:
    out = tmp_path / "site"
    assert main(["embed", "--site", str(runs["site"]), "--encoder", str(runs["mae"]), "--out", str(out)]) == 0
    tensors, manifest = load_embeddings(out)
    data = load_site(SiteConfig.from_yaml(runs["site"]), TINY, prepare=False, progress=False)
    assert len(manifest["scans"]) == len(data.records) == len(tensors["pooled"])
    assert manifest["source"]["site_file"] == str(runs["site"].resolve())
    first = manifest["scans"][0]
    record = next(r for r in data.records if str(r.path) == first["path"])
    assert (first["subject"], first["session"], first["modality"]) == (record.subject, record.session,
                                                                       record.modality.value)
    cache = TokenCache(tmp_path / "tokens", load_encoder(runs["mae"]), TINY, data.cache)
    np.testing.assert_allclose(tensors["tokens"][0], cache.tokens(record).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("args", "named"), [
    (["{not_nifti}", "{empty}"], "no usable scan"),
    ([], "one of the two"),
    (["{anatomical}", "--encoder", "{missing}"], "missing.json"),
])
def test_embed_bad_input_is_exit_code_2(runs, scans, tmp_path: Path, capsys, args: list[str], named: str) -> None:
    names = {**{k: str(v) for k, v in scans.items()}, "missing": str(tmp_path / "missing.json")}
    argv = ["embed", *(a.format(**names) for a in args)]
    if "--encoder" not in argv:
        argv += ["--encoder", str(runs["mae"])]
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err, err
    assert not (tmp_path / "x" / "manifest.json").exists()


# --- braing3n reconstruct ---------------------------------------------------------------------------------------


def test_inverse_preprocessing_puts_the_head_back_where_it_was(scans) -> None:
    """Not only the header: the preprocessed input mapped back overlays the original voxels (at `small`'s
    2 mm, near this scan's own resolution), and does so far better than any axis flip of it would."""
    prepared = preprocess_invertible(scans["psr"], get_preset("small"))
    original = nib.load(scans["psr"])
    back = prepared.to_original(prepared.volume)
    assert back.shape == original.shape
    values = np.asarray(original.dataobj, dtype=np.float32)

    def overlap(volume: np.ndarray) -> float:  # over either image's head: a misplaced head is penalised
        head = (values > 0) | (volume != 0)
        return float(np.corrcoef(values[head], volume[head])[0, 1])

    assert overlap(back) > 0.9
    assert all(overlap(back) > overlap(np.flip(back, axis)) + 0.15 for axis in range(3))


def test_reconstruct_writes_both_spaces_with_the_input_geometry(runs, scans, tmp_path: Path, capsys) -> None:
    out = tmp_path / "rec"
    code = main(["reconstruct", str(scans["psr"]), "--run", str(runs["run"]), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "reconstruct.json").read_text())
    files = record["files"]
    source = nib.load(scans["psr"])
    native = nib.load(out / files["reconstruction_native"])
    assert native.shape == source.shape
    np.testing.assert_allclose(native.affine, source.affine, atol=1e-5)
    assert nib.aff2axcodes(native.affine) == ("P", "S", "R") and native.get_data_dtype() == np.float32
    data = np.asarray(native.dataobj)
    assert np.isfinite(data).all() and np.count_nonzero(data) > 0
    model_grid = nib.load(out / files["reconstruction"])
    assert model_grid.shape == TINY.shape
    np.testing.assert_allclose(model_grid.affine, preset_affine(TINY))
    assert nib.load(out / files["input"]).shape == TINY.shape
    assert (out / files["montage"]).read_bytes()[:8] == PNG_MAGIC
    metrics = record["metrics"]
    assert {"val/psnr_brain", "val/ssim_brain", "val/psnr", "val/ssim"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values()) and -1 <= metrics["val/ssim_brain"] <= 1
    assert "z-score" in record["intensity_units"] and record["scan"]["orientation"] == "PSR"
    assert record["preprocessing_fingerprint"] == preprocessing_fingerprint(TINY)
    assert f"{metrics['val/psnr_brain']:.2f} dB" in capsys.readouterr().out


def test_reconstruct_keeps_an_uncompressed_big_endian_input_geometry(runs, scans, tmp_path: Path) -> None:
    out = tmp_path / "las"
    assert main(["reconstruct", str(scans["anatomical"]), "--run", str(runs["run"]), "--out", str(out)]) == 0
    native = nib.load(out / "reconstruction_native.nii.gz")
    source = nib.load(scans["anatomical"])
    assert native.shape == source.shape
    np.testing.assert_allclose(native.affine, source.affine, atol=1e-5)


@pytest.mark.parametrize(("scan", "run", "named"), [
    ("{nan}", "{run}", "nan.nii.gz"),
    ("{missing}", "{run}", "file not found"),
    ("{anatomical}", "{empty_run}", "no decoder checkpoint"),
])
def test_reconstruct_bad_input_is_exit_code_2(runs, scans, tmp_path: Path, capsys, scan: str, run: str,
                                              named: str) -> None:
    (tmp_path / "empty-run").mkdir()
    names = {**{k: str(v) for k, v in scans.items()}, "run": str(runs["run"]), "missing": str(tmp_path / "no.nii.gz"),
             "empty_run": str(tmp_path / "empty-run")}
    assert main(["reconstruct", scan.format(**names), "--run", run.format(**names), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err, err
    assert not (tmp_path / "x" / "reconstruct.json").exists()


# --- braing3n forecast --scan -----------------------------------------------------------------------------------


def test_forecast_of_a_scan_in_no_site(runs, scans, tmp_path: Path, capsys) -> None:
    out = tmp_path / "forecast"
    code = main(["forecast", str(runs["run"]), "--scan", str(scans["psr"]), "--age", "70", "--sex", "F",
                 "--diagnosis", "MCI", "--field-strength", "3", "--modality", "T1w", "--years", "2",
                 "--out", str(out), "--steps", "2"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "forecast.json").read_text())
    assert record["scores"] == {} and record["follow_up"] is None and "no real follow-up" in record["scores_note"]
    assert record["settings"]["conditioned_age"] == pytest.approx(72.0) and record["settings"]["scan"] == str(scans["psr"])
    assert record["baseline"]["conditions"] == {"age": 70.0, "sex": "F", "diagnosis": "MCI", "modality": "T1w",
                                                "field_strength": 3.0, "mmse": None}
    image = nib.load(out / record["nifti"])
    assert image.shape == TINY.shape and np.isfinite(np.asarray(image.dataobj)).all()
    np.testing.assert_allclose(image.affine, preset_affine(TINY))
    assert (out / record["montage"]).read_bytes()[:8] == PNG_MAGIC
    assert "psr_aniso.nii.gz +2 y" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "named"), [
    (["--scan", "{psr}"], "--age"),
    (["--scan", "{missing}", "--age", "70"], "file not found"),
    (["--scan", "{empty}", "--age", "70"], "empty.nii.gz"),
    (["--scan", "{psr}", "--age", "200"], "--age"),
    (["--scan", "{psr}", "--age", "70", "--sex", "X"], "--sex"),
    (["--scan", "{psr}", "--age", "70", "--site", "{site}"], "--scan"),
    (["--site", "{site}", "--subject", "sub-a001", "--age", "70"], "--age"),
    ([], "--site and --subject"),
])
def test_forecast_scan_bad_input_is_exit_code_2(runs, scans, tmp_path: Path, capsys, args: list[str],
                                                named: str) -> None:
    names = {**{k: str(v) for k, v in scans.items()}, "site": str(runs["site"]), "missing": str(tmp_path / "no.nii")}
    argv = ["forecast", str(runs["run"]), *(a.format(**names) for a in args), "--modality", "T1w", "--years", "2",
            "--out", str(tmp_path / "x"), "--steps", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err, err
    assert not (tmp_path / "x" / "forecast.json").exists()
