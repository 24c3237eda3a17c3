"""Generation (`braing3n_core.generate`, `braing3n sample`, `braing3n forecast`) with real tiny models.

The models are trained by the real CLI (`braing3n train mae/decoder/dit`, two steps each, `tiny`
preset) on site-a of the conftest cohort, once per module; a second MAE and a DiT on it give the
mismatched-encoder case. Everything else is read from the files those commands write.
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
from braing3n_core.config import ConfigError
from braing3n_core.data.datasets import load_site
from braing3n_core.data.transforms import preprocess_volume
from braing3n_core.federation.run_folder import RunFolder
from braing3n_core.generation.condition_table import ConditionRow, read_conditions
from braing3n_core.generation.models import GenerationError, load_generation_models, load_run_models


def stage_checkpoint(run_dir: Path, stage: str) -> Path | None:
    return RunFolder(run_dir).stage_checkpoint(stage)
from braing3n_core.generation.output import preset_affine, write_nifti
from braing3n_core.generation.sampling import generate
from braing3n_core.labels import Modality
from braing3n_core.presets import get_preset
from braing3n_core.site_config import SiteConfig

TINY = get_preset("tiny")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def train(stage: str, site: Path, out: Path, *extra: str) -> None:
    args = ["train", stage, "--sites", str(site), "--preset", "tiny", "--steps", "2", "--batch-size", "2",
            "--checkpoint-every", "2", "--out", str(out), *extra]
    assert main(args) == 0


@pytest.fixture(scope="module")
def runs(synthetic_cohort, tmp_path_factory) -> dict[str, Path]:
    """`run`: mae → decoder → dit on site-a; `other`: another MAE (seed 1) and a DiT on it."""
    root = tmp_path_factory.mktemp("generate")
    source = SiteConfig.from_yaml(synthetic_cohort[0])  # site-a: memory clinic, 1-4 sessions per subject
    site = root / "site-a.yaml"  # own cache: the shared cohort folder stays read-only
    site.write_text(yaml.safe_dump({**source.to_yaml_dict(), "cache_dir": str(root / "cache")}))
    run, other = root / "run", root / "other"
    for stage in ("mae", "decoder", "dit"):
        train(stage, site, run)
    train("mae", site, other, "--seed", "1")
    train("dit", site, other)
    return {"site": site, "run": run, "other": other, "root": root}


def nifti_checks(path: Path) -> np.ndarray:
    """The written file reloads with the preset's grid, spacing and LPS orientation; returns its data."""
    image = nib.load(path)
    assert image.shape == TINY.shape
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
    np.testing.assert_allclose(image.header.get_zooms(), [TINY.spacing_mm] * 3)
    np.testing.assert_allclose(image.affine, preset_affine(TINY))
    assert int(image.header["qform_code"]) == int(image.header["sform_code"]) == 2
    assert image.header.get_xyzt_units()[0] == "mm"
    data = np.asarray(image.dataobj)
    assert data.dtype == np.float32 and np.isfinite(data).all()
    return data


# --- condition tables (no models) -------------------------------------------------------------------------------


def test_condition_table_rows(tmp_path: Path) -> None:
    path = tmp_path / "ok.tsv"
    path.write_text("age\tsex\tdiagnosis\tmodality\tfield_strength\tmmse\n"
                    "71.5\tF\tAD\tT1w\t2.9\t19\n"
                    "n/a\t\tglioma\tce-gadolinium_T1w\tn/a\tn/a\n\n")
    first, second = read_conditions(path)
    assert first == ConditionRow(Modality.T1W, age=71.5, sex="F", diagnosis="AD", field_strength=3.0, mmse=19.0)
    assert second == ConditionRow(Modality.T1C, diagnosis="glioma")
    assert first.to_dict()["modality"] == "T1w" and ConditionRow.from_dict(first.to_dict(), "x") == first


@pytest.mark.parametrize(("body", "where", "problem"), [
    ("age\tmodality\n70\tT1w\nabc\tT1w\n", "line 3, column 'age'", "not a number"),
    ("age\tmodality\n130\tT1w\n", "line 2, column 'age'", "outside"),
    ("sex\tmodality\nX\tT2w\n", "line 2, column 'sex'", "not one of"),
    ("diagnosis\tmodality\nCN\tT1w\nPD\tFLAIR\n", "line 3, column 'diagnosis'", "not one of"),
    ("age\tmodality\n70\tT1\n", "line 2, column 'modality'", "not one of"),
    ("age\tmodality\n70\tn/a\n", "line 2, column 'modality'", "required"),
    ("field_strength\tmodality\n2\tT1w\n", "line 2, column 'field_strength'", "not one of"),
    ("mmse\tmodality\n31\tT1w\n", "line 2, column 'mmse'", "outside"),
    ("age\tmodality\n70\tT1w\t3\n", "line 2", "3 tab-separated cells"),
    ("age\tmodality\tscanner\n70\tT1w\tx\n", "line 1", "unknown ['scanner']"),
    ("age,modality\n70,T1w\n", "line 1", "unknown ['age,modality']"),
    ("age\tsex\n70\tF\n", "line 1", "modality missing"),
    ("age\tmodality\n", "", "no condition rows"),
])
def test_condition_table_errors_name_file_line_and_column(tmp_path: Path, body: str, where: str, problem: str) -> None:
    path = tmp_path / "conditions.tsv"
    path.write_text(body)
    with pytest.raises(ConfigError) as caught:
        read_conditions(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:") and where in message and problem in message, message


# --- models -----------------------------------------------------------------------------------------------------


def test_same_seed_same_volumes(runs) -> None:
    models = load_run_models(runs["run"])
    assert set(models.checkpoints) == {"dit", "decoder", "mae"} and models.encoder is not None
    rows = [ConditionRow(Modality.T1W, age=70.0, sex="F", diagnosis="AD"), ConditionRow(Modality.FLAIR),
            ConditionRow(Modality.T2W, age=40.0, diagnosis="glioma", field_strength=3.0)]
    first = generate(models, rows, steps=2, seed=7, batch_size=2)
    again = generate(models, rows, steps=2, seed=7, batch_size=2)
    other = generate(models, rows, steps=2, seed=8, batch_size=2)
    assert first.volumes.shape == (3, 1, *TINY.shape) and first.tokens.shape[0] == 3
    assert torch.isfinite(first.volumes).all() and first.seconds_per_volume > 0
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.volumes, again.volumes)
    assert not torch.equal(first.volumes, other.volumes)


def test_bf16_sampling_stays_close_to_fp32_and_progress_counts_every_network_call(runs) -> None:
    """bf16 autocast (the default where the CPU has native bf16) moves a sample by a small fraction of
    the tokens' spread; the progress callback sees every network call of every batch, in order."""
    models = load_run_models(runs["run"])
    rows = [ConditionRow(Modality.T1W, age=60.0 + i, sex="F", diagnosis="CN") for i in range(3)]
    calls: list[tuple[int, int]] = []
    fp32 = generate(models, rows, steps=4, seed=3, batch_size=2, bf16=False, progress=lambda d, t: calls.append((d, t)))
    bf16 = generate(models, rows, steps=4, seed=3, batch_size=2, bf16=True)
    assert fp32.settings["autocast"] is None and bf16.settings["autocast"] == "bf16"
    assert calls == [(done, 8) for done in range(1, 9)]  # 2 batches × 4 ab2 steps
    spread = fp32.tokens.std()
    assert float((bf16.tokens - fp32.tokens).pow(2).mean().sqrt() / spread) < 0.05


def test_encoder_mismatch_is_refused_naming_both_files(runs, capsys) -> None:
    run_dit, run_decoder = stage_checkpoint(runs["run"], "dit"), stage_checkpoint(runs["run"], "decoder")
    other_dit, other_mae = stage_checkpoint(runs["other"], "dit"), stage_checkpoint(runs["other"], "mae")
    with pytest.raises(GenerationError) as caught:
        load_generation_models(other_dit, run_decoder)
    assert str(other_dit) in str(caught.value) and str(run_decoder) in str(caught.value)
    with pytest.raises(GenerationError) as caught:
        load_generation_models(run_dit, run_decoder, encoder=other_mae)
    assert str(other_mae) in str(caught.value) and str(run_decoder) in str(caught.value)
    # the CLI: exit code 2, both files named, no traceback
    code = main(["sample", str(other_dit), "--decoder", str(run_decoder), "--modality", "T1w", "--out",
                 str(runs["root"] / "refused")])
    err = capsys.readouterr().err
    assert code == 2 and str(other_dit) in err and str(run_decoder) in err and "Traceback" not in err
    assert not (runs["root"] / "refused").exists()


# --- files ------------------------------------------------------------------------------------------------------


def test_written_volume_keeps_the_patient_side(tmp_path: Path) -> None:
    """A bright cube at MNI (x=-40, y=+40, z=+40) mm (left, anterior, superior) → preprocessing →
    write_nifti → nibabel: the cube's world position is still left, anterior and superior."""
    datasets = pytest.importorskip("nilearn.datasets", reason="nilearn provides the ICBM152 template")
    template = datasets.load_mni152_template(resolution=2)
    data = np.asarray(template.dataobj, dtype=np.float32).copy()
    i, j, k = np.round(np.linalg.inv(template.affine) @ [-40.0, 40.0, 40.0, 1.0])[:3].astype(int)
    data[i - 2 : i + 3, j - 2 : j + 3, k - 2 : k + 3] = 10.0 * data.max()
    nib.save(nib.Nifti1Image(data, template.affine), tmp_path / "marked.nii.gz")
    volume = preprocess_volume(tmp_path / "marked.nii.gz", TINY)[0]  # [D, H, W], LPS
    written = nifti_checks(write_nifti(volume, TINY, tmp_path / "out.nii.gz"))
    np.testing.assert_array_equal(written, volume)
    image = nib.load(tmp_path / "out.nii.gz")
    x, y, z = (image.affine @ [*np.unravel_index(np.argmax(written), TINY.shape), 1])[:3]
    assert x < -20 and y > 20 and z > 20, (x, y, z)  # RAS+ world: left is -x, anterior +y, superior +z
    with pytest.raises(ValueError, match="not preset 'tiny'"):
        write_nifti(volume[:-1], TINY, tmp_path / "bad.nii.gz")


# --- braing3n sample --------------------------------------------------------------------------------------------


def test_sample_cli_writes_readable_nifti_montage_and_request(runs, tmp_path: Path) -> None:
    out = tmp_path / "samples"
    code = main(["sample", str(runs["run"]), "--out", str(out), "--age", "75", "--sex", "F", "--diagnosis", "AD",
                 "--modality", "T1w", "--field-strength", "1.5", "--mmse", "20", "--n", "2", "--steps", "2",
                 "--seed", "3"])
    assert code == 0
    record = json.loads((out / "sample.json").read_text())
    asked = {"age": 75.0, "sex": "F", "diagnosis": "AD", "modality": "T1w", "field_strength": 1.5, "mmse": 20.0}
    assert [s["conditions"] for s in record["samples"]] == [asked, asked]
    assert record["settings"]["steps"] == 2 and record["settings"]["seed"] == 3 and record["settings"]["device"] == "cpu"
    assert record["seconds_per_volume"] > 0 and math.isclose(record["seconds_per_volume"] * 2, record["seconds"])
    assert set(record["models"]) == {"dit", "decoder", "mae"}
    assert (out / record["montage"]).read_bytes()[:8] == PNG_MAGIC
    written = [nifti_checks(out / s["nifti"]) for s in record["samples"]]
    # the files hold exactly what generate() returns for the same request
    expected = generate(load_run_models(runs["run"]), [ConditionRow.from_dict(asked, "test")] * 2, steps=2, seed=3)
    np.testing.assert_array_equal(np.stack(written), expected.volumes[:, 0].numpy())

    table = tmp_path / "conditions.tsv"
    table.write_text("age\tdiagnosis\tmodality\n30\tCN\tT1w\nn/a\tglioma\tFLAIR\n")
    assert main(["sample", str(stage_checkpoint(runs["run"], "dit")), "--out", str(tmp_path / "table"),
                 "--conditions", str(table), "--n", "3", "--steps", "1"]) == 0
    record = json.loads((tmp_path / "table" / "sample.json").read_text())
    assert [s["conditions"]["modality"] for s in record["samples"]] == ["T1w", "FLAIR", "T1w"]
    assert record["conditions_file"] == str(table) and len(list((tmp_path / "table").glob("*.nii.gz"))) == 3


@pytest.mark.parametrize(("args", "named"), [
    (["--conditions", "{bad}"], "{bad}: line 2, column 'age'"),
    (["--conditions", "{bad}", "--age", "40"], "--conditions and --age"),
    (["--modality", "T1w", "--age", "-3"], "--age"),
    (["--age", "40"], "--modality"),
    (["--modality", "T1w", "--sex", "female"], "--sex"),
    (["--modality", "T1w", "--n", "0"], "--n"),
    (["--modality", "T1w", "--device", "cuda:99"], "--device"),
    (["--modality", "T1w", "--device", "tpu"], "--device"),
])
def test_sample_cli_bad_input_is_exit_code_2(runs, tmp_path: Path, capsys, args: list[str], named: str) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("age\tmodality\nold\tT1w\n")
    args = [a.format(bad=bad) for a in args]
    assert main(["sample", str(runs["run"]), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert named.format(bad=bad) in err and "Traceback" not in err, err


def test_sample_cli_without_models_names_the_folder(tmp_path: Path, capsys) -> None:
    assert main(["sample", str(tmp_path), "--modality", "T1w", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "no DiT checkpoint" in err


# --- braing3n forecast ------------------------------------------------------------------------------------------


def test_forecast_cli_scores_against_the_real_follow_up(runs, tmp_path: Path, capsys) -> None:
    data = load_site(SiteConfig.from_yaml(runs["site"]), TINY, prepare=False, progress=False)
    t1 = sorted((r for r in data.records if r.modality is Modality.T1W and r.labels.age is not None),
                key=lambda r: (r.subject, r.labels.age))
    base, follow = next((a, b) for a, b in zip(t1, t1[1:]) if a.subject == b.subject)
    years = round(follow.labels.age - base.labels.age, 3)
    out = tmp_path / "forecast"
    code = main(["forecast", str(runs["run"]), "--site", str(runs["site"]), "--subject", base.subject, "--session",
                 base.session, "--modality", "T1w", "--years", str(years), "--out", str(out), "--steps", "2"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "forecast.json").read_text())
    assert record["baseline"]["session"] == base.session and record["follow_up"]["session"] == follow.session
    scores = record["scores"]
    assert set(scores) == {"forecast/psnr", "forecast/ssim", "forecast/residual_psnr", "forecast/residual_ssim",
                           "forecast/baseline_psnr", "forecast/baseline_ssim"}
    assert all(math.isfinite(v) for v in scores.values()) and -1 <= scores["forecast/ssim"] <= 1
    assert record["settings"]["conditioned_age"] == pytest.approx(follow.labels.age, abs=1e-3)
    assert record["split"] in {"train", "val", "test"} and record["site_file"] == str(runs["site"].resolve())
    nifti_checks(out / record["nifti"])
    assert (out / record["montage"]).read_bytes()[:8] == PNG_MAGIC
    assert record["settings"]["estimate"] == "conditional mean"  # the default, for a DiT trained on pair changes
    # the message quotes the file it wrote (the residual forecast), then the decoded tokens alone
    assert f"follow-up {scores['forecast/residual_psnr']:.2f} dB" in capsys.readouterr().out

    # an interval with no real scan: written, not scored, and the JSON says why
    assert main(["forecast", str(runs["run"]), "--site", str(runs["site"]), "--subject", base.subject, "--modality",
                 "T1w", "--years", "15", "--out", str(tmp_path / "far"), "--steps", "1"]) == 0
    far = json.loads((tmp_path / "far" / "forecast.json").read_text())
    assert far["scores"] == {} and far["follow_up"] is None and "nothing to score" in far["scores_note"]


@pytest.mark.parametrize(("args", "named"), [
    (["--subject", "sub-nobody"], "{site}"),
    (["--subject", "sub-a001", "--session", "ses-99"], "{site}"),
    (["--subject", "sub-a001", "--years", "-1"], "--years"),
])
def test_forecast_cli_bad_input_is_exit_code_2(runs, tmp_path: Path, capsys, args: list[str], named: str) -> None:
    full = {"--years": "2", **dict(zip(args[::2], args[1::2]))}
    argv = ["forecast", str(runs["run"]), "--site", str(runs["site"]), "--modality", "T1w", "--out", str(tmp_path / "x")]
    argv += [item for pair in full.items() for item in pair]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert named.format(site=runs["site"].resolve()) in err and "Traceback" not in err, err
    assert not (tmp_path / "x" / "forecast.json").exists()


# --- synthesize shares the parser and the writers ---------------------------------------------------------------


def test_synthesize_uses_the_shared_conditions_and_nifti(runs, tmp_path: Path) -> None:
    from braing3n_core.jobs.synthesize import synthesize

    bad = tmp_path / "bad.tsv"
    bad.write_text("age\tsex\tmodality\n70\tF\tT1w\n60\tX\tT2w\n")
    with pytest.raises(ConfigError, match=r"line 3, column 'sex'"):
        synthesize(runs["run"], n=2, out=tmp_path / "refused", conditions=bad, skip_audit=True)
    with pytest.raises(ConfigError, match=r"line 3, column 'sex'"):  # read before any model is loaded
        synthesize(tmp_path / "no-such-run", n=2, out=tmp_path / "refused", conditions=bad, skip_audit=True)
    good = tmp_path / "good.tsv"
    good.write_text("age\tsex\tmodality\n70\tF\tT1w\n")
    result = synthesize(runs["run"], n=1, out=tmp_path / "synthetic", conditions=good, skip_audit=True, steps=1)
    assert result.exported == 1
    (scan,) = result.bids.rglob("*_T1w.nii.gz")
    nifti_checks(scan)


def test_a_signed_synthetic_dataset_verifies_and_carries_its_data_card(runs, tmp_path: Path, capsys) -> None:
    from braing3n_core.jobs.synthesize import synthesize
    from braing3n_core.ops.consortium import init_consortium
    from braing3n_core.ops.release import verify_directory

    layout = init_consortium(tmp_path / "fl", ["a"], "localhost").layout
    broken = tmp_path / "broken.key"
    broken.write_text("not a key\n")
    with pytest.raises(ConfigError, match=r"broken.key: not an unencrypted PEM private key"):
        synthesize(runs["run"], n=1, out=tmp_path / "refused", skip_audit=True, steps=1, signing_key=broken)
    assert not (tmp_path / "refused").exists()  # refused before anything was generated

    out = tmp_path / "shared"
    code = main(["synthesize", str(runs["run"]), "--n", "2", "--out", str(out), "--no-audit",
                 "--steps", "1", "--signing-key", str(layout.release_key)])
    assert code == 0, capsys.readouterr().err
    assert "signed:" in capsys.readouterr().out
    report = verify_directory(out / "bids", layout.release_pub)
    assert report.ok, report.summary()
    card = json.loads((out / "datacard.json").read_text())
    signed = json.loads((out / "bids" / "RELEASE.json").read_text())["payload"]
    assert signed["metadata"]["kind"] == "synthetic dataset"
    assert signed["metadata"]["datacard"]["models"] == card["models"]
    assert signed["metadata"]["datacard"]["privacy"] == card["privacy"]
    assert (out / "bids" / ".bidsignore").read_text().split() == ["RELEASE.json"]

    (scan, *_) = sorted((out / "bids").rglob("*.nii.gz"))
    scan.write_bytes(scan.read_bytes()[:-10])
    report = verify_directory(out / "bids", layout.release_pub)
    assert not report.ok and scan.relative_to(out / "bids").as_posix() in report.summary()
