"""Signed releases: every kind of mismatch is named, and a finished run releases what it claims."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from braing3n_core.checkpoint import load_checkpoint
from braing3n_core.cli import main
from braing3n_core.config import ConfigError
from braing3n_core.federation.run_config import RunConfig, write_resolved
from braing3n_core.federation.run_folder import RoundCheckpoint, RunFolder
from braing3n_core.ops.consortium import init_consortium
from braing3n_core.ops.release import MANIFEST, epsilon_per_site, sign_directory, sign_run, verify_directory


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    consortium = init_consortium(tmp_path_factory.mktemp("keys") / "c", ["a"], "localhost")
    return consortium.layout.release_key, consortium.layout.release_pub


def _dataset(root: Path) -> Path:
    (root / "sub-01" / "anat").mkdir(parents=True)
    (root / "sub-01" / "anat" / "sub-01_T1w.nii.gz").write_bytes(bytes(range(256)) * 40)
    (root / "participants.tsv").write_text("participant_id\tage\nsub-01\t71\n")
    (root / "datacard.json").write_text(json.dumps({"n": 1}))
    return root


def _kinds(report) -> list[tuple[str, str]]:
    return [(p.kind, p.path) for p in report.problems]


def test_signed_folder_verifies_against_the_trusted_key(tmp_path: Path, keys) -> None:
    private, public = keys
    manifest = sign_directory(_dataset(tmp_path / "set"), private, {"kind": "synthetic-dataset", "n": 1,
                                                                    "auroc": float("nan"), "source": tmp_path})
    assert manifest == (tmp_path / "set" / MANIFEST).resolve()
    report = verify_directory(tmp_path / "set", public)
    assert report.ok and report.trusted and report.files == 3
    assert report.metadata == {"kind": "synthetic-dataset", "n": 1, "auroc": None, "source": str(tmp_path)}
    assert verify_directory(manifest, public).ok  # the manifest path works too
    untrusted = verify_directory(tmp_path / "set")
    assert untrusted.ok and not untrusted.trusted and "NOT checked" in untrusted.summary()


def test_each_kind_of_tampering_is_named(tmp_path: Path, keys) -> None:
    private, public = keys
    root = _dataset(tmp_path / "set")
    sign_directory(root, private, {"kind": "synthetic-dataset"})
    scan = root / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    data = bytearray(scan.read_bytes())
    data[100] ^= 1  # one bit, same size
    scan.write_bytes(bytes(data))
    (root / "participants.tsv").unlink()
    (root / "sub-01" / "notes.txt").write_text("added later")
    report = verify_directory(root, public)
    assert _kinds(report) == [("missing file", "participants.tsv"), ("changed hash", "sub-01/anat/sub-01_T1w.nii.gz"),
                              ("extra file", "sub-01/notes.txt")]
    assert "changed hash: sub-01/anat/sub-01_T1w.nii.gz" in report.summary()


def test_an_edited_manifest_breaks_the_signature(tmp_path: Path, keys) -> None:
    private, public = keys
    root = _dataset(tmp_path / "set")
    sign_directory(root, private, {"kind": "synthetic-dataset", "epsilon": 2.0})
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["payload"]["metadata"]["epsilon"] = 0.5  # a nicer privacy claim
    (root / MANIFEST).write_text(json.dumps(manifest))
    report = verify_directory(root, public)
    assert _kinds(report) == [("bad signature", MANIFEST)] and not report.trusted
    # Re-hashing a changed file into the manifest does not help either.
    (root / "datacard.json").write_text("{}")
    manifest["payload"]["metadata"]["epsilon"] = 2.0
    manifest["payload"]["files"]["datacard.json"]["sha256"] = "0" * 64
    (root / MANIFEST).write_text(json.dumps(manifest))
    assert ("bad signature", MANIFEST) in _kinds(verify_directory(root, public))


def test_a_release_signed_by_another_key_is_refused(tmp_path: Path, keys) -> None:
    _, public = keys
    root = _dataset(tmp_path / "set")
    sign_directory(root, ed25519.Ed25519PrivateKey.generate(), {"kind": "synthetic-dataset"})
    report = verify_directory(root, public)
    assert _kinds(report) == [("wrong key", MANIFEST)] and not report.trusted
    assert verify_directory(root).ok  # intact, but by an unknown signer: integrity only


def test_unsigned_or_unreadable(tmp_path: Path, keys) -> None:
    root = _dataset(tmp_path / "set")
    assert _kinds(verify_directory(root, keys[1])) == [("unreadable manifest", MANIFEST)]
    (root / MANIFEST).write_text("{not json")
    assert _kinds(verify_directory(root, keys[1]))[0][0] == "unreadable manifest"
    with pytest.raises(ConfigError, match="not an Ed25519 private key|not an unencrypted PEM"):
        sign_directory(root, keys[1], {})  # a public key is not a signing key
    with pytest.raises(ConfigError, match="empty folder"):
        (tmp_path / "empty").mkdir()
        sign_directory(tmp_path / "empty", keys[0], {})


def _finished_run(root: Path, with_dp: bool = True) -> Path:
    """A run folder as the ServerApp leaves it: MAE rounds 1-2, final checkpoint, state, ledger."""
    config = RunConfig.model_validate({"name": "rel", "preset": "tiny", "stages": [{"name": "mae", "rounds": 2, "local_steps": 1}]})
    run = RunFolder(root)
    write_resolved(config, root / "run.yaml")
    for server_round in (1, 2):
        run.save_round(RoundCheckpoint("mae", server_round, {"w": np.full(4, server_round, np.float32)}, {}, {"run": "rel"}))
        for site, eps in (("site-a", 0.4 * server_round), ("site-b", 0.3 * server_round)):
            run.log("mae", server_round, site, "train", **({"privacy/epsilon": eps} if with_dp else {}))
        run.log("mae", server_round, "aggregate", "train", sites=2)
    run.mark_final("mae")
    run.write_state({"run": "rel", "preset": "tiny", "stages": {"mae": {"rounds": 2, "completed_round": 2, "done": True}},
                     "probes": {"enabled": False, "done": False}, "sites": {"11": "site-a", "12": "site-b"},
                     "encoder_sha256": None})
    return root


def test_a_finished_run_is_released_with_its_facts(tmp_path: Path, keys) -> None:
    private, public = keys
    run_dir = _finished_run(tmp_path / "run")
    manifest = sign_run(run_dir, private)
    release = manifest.parent
    report = verify_directory(release, public)
    assert report.ok and report.trusted
    assert sorted(json.loads(manifest.read_text())["payload"]["files"]) == [
        "checkpoints/mae/final.json", "checkpoints/mae/final.safetensors", "run.yaml", "server_state.json"]
    meta = report.metadata
    assert meta["kind"] == "federated-checkpoints" and meta["run"] == "rel" and meta["sites"] == ["site-a", "site-b"]
    assert meta["stages"]["mae"]["completed_round"] == 2 and meta["config"]["stages"][0]["rounds"] == 2
    assert meta["epsilon"] == {"site_level": {"site-a": 0.8, "site-b": 0.6}}
    assert "flwr" in meta["software"] and "torch" in meta["software"]
    assert load_checkpoint(release / "checkpoints/mae/final.json").meta["round"] == 2  # a usable checkpoint
    # Releasing again replaces the release whole; a tampered copy is caught.
    sign_run(run_dir, private)
    copy = tmp_path / "copy"
    shutil.copytree(release, copy)
    weights = copy / "checkpoints/mae/final.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    assert _kinds(verify_directory(copy, public)) == [("changed hash", "checkpoints/mae/final.safetensors")]


def test_only_a_finished_run_is_released(tmp_path: Path, keys) -> None:
    run_dir = _finished_run(tmp_path / "run", with_dp=False)
    assert epsilon_per_site(run_dir) == {}
    state = json.loads((run_dir / "server_state.json").read_text())
    state["stages"]["mae"]["done"] = False
    (run_dir / "server_state.json").write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=r"\['mae'\] have not finished"):
        sign_run(run_dir, keys[0])
    assert not (run_dir / "release").exists()


def test_cli_sign_and_verify_exit_codes(tmp_path: Path, keys, capsys) -> None:
    private, public = keys
    root = _dataset(tmp_path / "set")
    assert main(["release", "sign", str(root), "--key", str(private)]) == 0
    assert main(["verify", str(root), "--public-key", str(public)]) == 0
    assert main(["verify", str(root)]) == 2  # bad usage: say which key to trust, or that none is checked
    assert main(["verify", str(root), "--integrity-only"]) == 0  # intact; the signer was not checked
    (root / "participants.tsv").write_text("changed")
    assert main(["verify", str(root), "--public-key", str(public)]) == 1
    out = capsys.readouterr().out
    assert "changed hash: participants.tsv" in out
    run_dir = _finished_run(tmp_path / "run")
    assert main(["release", "sign", str(run_dir), "--key", str(private)]) == 0
    assert main(["verify", str(run_dir / "release"), "--public-key", str(public)]) == 0
