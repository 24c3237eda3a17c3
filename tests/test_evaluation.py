"""`braing3n probe`: frozen or random-init encoder → pooled tokens → subject-grouped linear probes → JSON.

The tests run on the shared conftest cohort (2 sites × 6 subjects at 4 mm, caches redirected into this
module's temp folder). Whether MAE pre-training beats the same seed's random initialisation is measured by
`bench/bench_pretraining.py` (a 4-site cohort and 3,000 steps: too long for the suite).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from braing3n_core import cli
from braing3n_core.data.datasets import load_site
from braing3n_core.data.tokens import encoder_sha256
from braing3n_core.jobs.probe import ProbeError, ProbeOptions, known_task_names, probe_sites, random_init_encoder
from braing3n_core.models import MAEConfig, MaskedAutoencoder
from braing3n_core.presets import get_preset
from braing3n_core.site_config import SiteConfig
from braing3n_core.training.centralized import TrainOptions, train_centralized
from braing3n_core.training.checkpoints import load_encoder, save_stage_checkpoint
from braing3n_core.training.stages import get_stage

INIT_SEED = 3


def _site_yaml(config: SiteConfig, folder: Path, **changes: object) -> Path:
    """A site YAML like `config`'s, with absolute paths and `changes` applied (e.g. its own cache_dir)."""
    data = {**config.to_yaml_dict(), "data_root": str(config.data_root), **changes}
    data = {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}
    path = folder / f"{config.site_id}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def site_yamls(synthetic_cohort, tmp_path_factory) -> list[Path]:
    """The conftest cohort's site YAMLs with caches in this module's temp folder (the cohort is read-only)."""
    folder = tmp_path_factory.mktemp("probe-sites")
    configs = [SiteConfig.from_yaml(p) for p in synthetic_cohort]
    return [_site_yaml(c, folder, cache_dir=folder / "cache" / c.site_id) for c in configs]


@pytest.fixture(scope="module")
def site_configs(site_yamls) -> list[SiteConfig]:
    return [SiteConfig.from_yaml(p) for p in site_yamls]


@pytest.fixture(scope="module")
def untrained_checkpoint(site_configs, tmp_path_factory) -> Path:
    """One step of `train mae` at learning rate 0: a real stage-1 checkpoint holding the initial weights."""
    out = tmp_path_factory.mktemp("mae-lr0")
    return train_centralized(site_configs, TrainOptions(stage="mae", preset="tiny", steps=1, lr=0.0, batch_size=2,
                                                        seed=INIT_SEED, out_dir=out, checkpoint_every=1))


def _probe_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["probe", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- the random-init baseline -----------------------------------------------------------------------------------


def test_random_init_is_exactly_where_training_starts(untrained_checkpoint: Path) -> None:
    """`--random-init --seed S` is the encoder `train mae --seed S` starts from (lr 0 leaves it unchanged)."""
    assert encoder_sha256(load_encoder(untrained_checkpoint)) == encoder_sha256(random_init_encoder("tiny", INIT_SEED))
    assert encoder_sha256(random_init_encoder("tiny", INIT_SEED)) != encoder_sha256(random_init_encoder("tiny", 0))


def test_random_init_is_reproducible_end_to_end(site_yamls, tmp_path: Path, capsys) -> None:
    """Same seed → the same weights (sha256) and the same probe results, also in a fresh output folder."""
    common = ["--sites", *map(str, site_yamls), "--random-init", "--preset", "tiny", "--tasks", "age", "--folds", "3"]
    documents = []
    for seed, out in ((0, "first"), (0, "second"), (1, "third")):
        code, _, err = _probe_cli(capsys, *common, "--seed", str(seed), "--out", str(tmp_path / out))
        assert code == 0, err
        documents.append(json.loads((tmp_path / out / f"probes-random-init-tiny-seed{seed}.json").read_text()))
    first, second, other = documents
    assert first["encoder"]["sha256"] == second["encoder"]["sha256"] != other["encoder"]["sha256"]
    assert first["metrics"] == second["metrics"] and first["report"]["results"][0]["folds"] == 3
    assert first["encoder"]["sha256"] == encoder_sha256(random_init_encoder("tiny", 0))


# --- the command ----------------------------------------------------------------------------------------------


def test_probe_command_end_to_end(site_yamls, untrained_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "probes"
    code, stdout, err = _probe_cli(capsys, "--sites", *map(str, site_yamls), "--encoder", str(untrained_checkpoint),
                                   "--preset", "tiny", "--out", str(out), "--seed", "0",
                                   "--tasks", "age,diagnosis", "--tasks", "modality")
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout  # one summary line
    sha = encoder_sha256(load_encoder(untrained_checkpoint))
    path = out / f"probes-encoder-{sha[:12]}-seed0.json"
    assert lines[0].startswith(f"probes (encoder {sha[:12]} ({untrained_checkpoint}); ")
    assert "scans of 12 subjects" in lines[0] and "age_r2 " in lines[0] and lines[0].endswith(f"-> {path}")

    document = json.loads(path.read_text())
    assert document["encoder"] == {"label": f"encoder {sha[:12]} ({untrained_checkpoint})", "sha256": sha,
                                   "checkpoint": str(untrained_checkpoint), "random_init": False, "seed": 0}
    assert document["preset"] == "tiny" and document["sites"] == ["site-a", "site-b"]
    assert document["subjects"] == 12 and document["excluded"] == []
    # Every asked-for task was probed: modality too, although with these (seed-0) folds some inner
    # validation folds hold no T1c scan (site-a has none), which sklearn's neg_log_loss scorer fails on.
    assert [r["task"] for r in document["report"]["results"]] == ["age", "diagnosis", "modality"]
    assert document["report"]["skipped"] == []
    # 5 outer folds by default; a classification has no more folds than its rarest class has subjects.
    assert [r["folds"] for r in document["report"]["results"]] == [5, 4, 5]
    assert {"probe/age_r2", "probe/diagnosis_auroc", "probe/modality_bacc"} <= set(document["metrics"])
    # Every usable scan of both sites was encoded and probed once (age is recorded for every scan).
    usable = sum(len(load_site(SiteConfig.from_yaml(p), get_preset("tiny")).records) for p in site_yamls)
    assert document["scans"] == usable == document["report"]["results"][0]["n_test"] > 100


def test_report_is_replaced_atomically(site_yamls, tmp_path: Path, capsys) -> None:
    """A rerun replaces the JSON by rename (a new file, never an in-place rewrite) and leaves no temp files."""
    out = tmp_path / "probes"
    path = out / "probes-random-init-tiny-seed0.json"
    out.mkdir()
    path.write_text('{"partial": ')  # what a crash during a non-atomic write would leave behind
    before = path.stat().st_ino
    args = ["--sites", *map(str, site_yamls), "--random-init", "--preset", "tiny", "--tasks", "age", "--out", str(out)]
    code, _, err = _probe_cli(capsys, *args)
    assert code == 0, err
    assert path.stat().st_ino != before
    assert json.loads(path.read_text())["encoder"]["random_init"] is True
    assert sorted(p.name for p in out.iterdir()) == [path.name]


def test_a_corrupt_scan_is_excluded_and_reported(site_configs, site_yamls, tmp_path: Path, capsys) -> None:
    site = site_configs[0]
    data_root = tmp_path / site.site_id
    shutil.copytree(site.data_root, data_root, ignore=shutil.ignore_patterns("derivatives"))
    broken = min(data_root.glob("sub-*/ses-*/anat/*_T1w.nii.gz"))
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])  # a transfer cut short
    yaml_path = _site_yaml(site, tmp_path / "sites", data_root=data_root, cache_dir=tmp_path / "cache")
    code, stdout, err = _probe_cli(capsys, "--sites", str(yaml_path), str(site_yamls[1]), "--random-init",
                                   "--preset", "tiny", "--tasks", "age", "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert ", 1 excluded;" in stdout and str(broken) in err
    document = json.loads((tmp_path / "out" / "probes-random-init-tiny-seed0.json").read_text())
    assert [e["path"] for e in document["excluded"]] == [str(broken)] and document["excluded"][0]["reason"]
    assert "probe/age_r2" in document["metrics"]


# --- refusals name the file or option ---------------------------------------------------------------------------


def test_preset_mismatch_names_the_checkpoint(site_yamls, untrained_checkpoint: Path, tmp_path: Path, capsys) -> None:
    code, stdout, err = _probe_cli(capsys, "--sites", *map(str, site_yamls), "--encoder", str(untrained_checkpoint),
                                   "--preset", "small", "--out", str(tmp_path))
    assert code == 2 and stdout == ""
    assert str(untrained_checkpoint) in err and "preset 'tiny'" in err and "'small'" in err
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_geometry_is_checked_without_a_preset_in_its_manifest(site_configs, tmp_path: Path) -> None:
    stage = get_stage("mae")
    stem = save_stage_checkpoint(tmp_path / "foreign", stage, MaskedAutoencoder(MAEConfig.from_preset("small")), {})
    with pytest.raises(ProbeError, match=r"foreign\.json: encoder input \(80, 96, 80\).*preset 'tiny'"):
        probe_sites(site_configs, ProbeOptions(preset="tiny", encoder=stem), tmp_path / "out")


def test_bad_checkpoints_are_refused_by_name(site_yamls, untrained_checkpoint: Path, tmp_path: Path, capsys) -> None:
    decoder_stage = get_stage("decoder")
    decoder = save_stage_checkpoint(tmp_path / "decoder", decoder_stage, decoder_stage.build("tiny"), {"preset": "tiny"})
    tampered = shutil.copytree(untrained_checkpoint.parent, tmp_path / "tampered") / untrained_checkpoint.name
    weights = tampered.with_suffix(".safetensors")
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))  # flipped bits in the last weights
    cases = {tmp_path / "missing.json": "not found", decoder: "holds stage 'decoder', expected 'mae'",
             tampered: "does not match its manifest"}
    for path, reason in cases.items():
        code, _, err = _probe_cli(capsys, "--sites", *map(str, site_yamls), "--encoder", str(path), "--preset", "tiny",
                                  "--out", str(tmp_path / "out"))
        assert code == 2 and reason in err and str(path.parent) in err, err
    assert not (tmp_path / "out").exists()


def test_the_preset_comes_from_the_checkpoint(untrained_checkpoint: Path) -> None:
    from braing3n_core.jobs.probe import frozen_encoder

    _, preset = frozen_encoder(ProbeOptions(encoder=untrained_checkpoint))  # no --preset: the checkpoint's own
    assert preset.name == "tiny"
    _, preset = frozen_encoder(ProbeOptions(random_init=True))
    assert preset.name == "small"  # random init has no checkpoint: the documented default


def test_options_are_validated() -> None:
    with pytest.raises(ProbeError, match="exactly one"):
        ProbeOptions(preset="tiny")
    with pytest.raises(ProbeError, match="exactly one"):
        ProbeOptions(preset="tiny", encoder=Path("x.json"), random_init=True)
    with pytest.raises(ProbeError, match=r"unknown task\(s\) \['brain_age'\]; choose from \['age', 'sex'"):
        ProbeOptions(preset="tiny", random_init=True, tasks=("age", "brain_age"))
    with pytest.raises(ProbeError, match="unknown preset 'huge'"):
        ProbeOptions(preset="huge", random_init=True)
    with pytest.raises(ProbeError, match="folds"):
        ProbeOptions(preset="tiny", random_init=True, folds=1)
    assert {"age", "diagnosis", "ad_vs_cn", "site", "field_strength"} <= set(known_task_names())


def test_command_line_refuses_both_or_neither_encoder(site_yamls, tmp_path: Path, capsys) -> None:
    for which in ([], ["--random-init", "--encoder", "x.json"]):
        assert cli.main(["probe", "--sites", str(site_yamls[0]), *which, "--preset", "tiny", "--out", str(tmp_path)]) == 2
    code, _, err = _probe_cli(capsys, "--sites", str(site_yamls[0]), "--random-init", "--preset", "tiny",
                              "--tasks", "brain_age", "--out", str(tmp_path))
    assert code == 2 and "brain_age" in err
    code, _, err = _probe_cli(capsys, "--sites", str(tmp_path / "nowhere.yaml"), "--random-init", "--preset", "tiny",
                              "--out", str(tmp_path))
    assert code == 2 and "nowhere.yaml" in err
