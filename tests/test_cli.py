"""The `braing3n` command as a new user meets it: bad input gets a message naming the problem and the
contract's exit code (0 success, 1 job failed, 2 bad usage or input), never a traceback; every option has help.

The bad-input table runs the real command (`python -m braing3n_core`) in subprocesses, this checkout's code
first on the path; the fixtures (a copy of one site of the session's synthetic cohort, a consortium, a signed release, broken
scans and YAMLs) are built once for the module, and all the commands run concurrently so that the table costs
little more than its slowest row.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from braing3n_core.cli import build_parser

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]  # `{x}` is replaced by the fixture path x
    code: int
    says: tuple[str, ...]  # phrases the output (stdout + stderr) must hold
    never: tuple[str, ...] = ()  # phrases it must not hold


CASES = [
    # files that are not what they claim to be
    Case("site YAML saved as Latin-1", ("site", "check", "{latin1_yaml}"), 2,
         ("latin1.yaml", "not UTF-8 text (byte 0xf4 at line 1, column 4)", "save it as UTF-8")),
    Case("site YAML saved as UTF-16 (with its byte-order mark) is read", ("site", "check", "{utf16_yaml}"), 0,
         ("usable scans",)),
    Case("a .nii.gz passed as the site YAML", ("site", "check", "{scan}"), 2, ("gzip-compressed file",)),
    Case("run YAML not UTF-8", ("simulate", "--sites", "{site_yaml}", "--run-config", "{latin1_yaml}"), 2,
         ("not UTF-8 text",)),
    Case("a folder as the site YAML", ("site", "check", "{tmp}"), 2, ("is a folder, not a YAML file",)),
    Case("probe --encoder some.bin", ("probe", "--sites", "{site_yaml}", "--encoder", "{some_bin}", "--out", "{tmp}/p"),
         2, ("some.bin: not a braing3n checkpoint (.bin file)",)),
    Case("probe --encoder other.json", ("probe", "--sites", "{site_yaml}", "--encoder", "{other_json}", "--out",
                                        "{tmp}/p"), 2, ("not a braing3n checkpoint manifest (no \"format\" field",),
         ("None",)),
    # the consortium
    Case("consortium init into a non-empty folder", ("consortium", "init", "{full_dir}", "--sites", "a", "--host",
                                                     "fl.example"), 2, ("not empty (notes.txt)", "--force")),
    Case("consortium init over a consortium, even with --force", ("consortium", "init", "{consortium}", "--sites", "a",
                                                                 "--host", "fl.example", "--force"), 2,
         ("already holds a consortium",)),
    Case("site join --superlink without a port", ("site", "join", "{site_yaml}", "--credentials", "{tmp}",
                                                  "--superlink", "fl.example", "--print-command"), 2,
         ("give HOST:PORT",)),
    Case("consortium run --print-command with no SuperLink running",
         ("consortium", "run", "{consortium}", "--run-config", "{run_yaml}", "--out", "{tmp}/printed-run",
          "--print-command"), 0, ("flwr run", "run-config=", "printed-run/run.yaml", "fl.example:9092")),
    # a site's approvals of jobs (tests/test_approval.py checks the rest of what can go wrong with a job)
    Case("site review of a job file that does not exist", ("site", "review", "{site_yaml}", "{tmp}/missing.job.json"), 2,
         ("missing.job.json: file not found",)),
    Case("site review of a JSON file that is not a job", ("site", "review", "{site_yaml}", "{other_json}"), 2,
         ("x.json: not a braing3n job file", "braing3n consortium job")),
    Case("site approve of a scan", ("site", "approve", "{site_yaml}", "{scan}"), 2, ("not a job",)),
    Case("site approve --max-rounds zero", ("site", "approve", "{site_yaml}", "{job}", "--max-rounds", "mae=0"), 2,
         ("give a number of rounds",)),
    Case("site review of a job changed after signing", ("site", "review", "{site_yaml}", "{tampered_job}", "--public-key",
                                                        "{release_pub}"), 1, ("tampered.job.json: bad signature",)),
    Case("site revoke of an unknown approval", ("site", "revoke", "{site_yaml}", "ffff"), 2,
         ("no approval with id 'ffff' (approvals: none)",)),
    Case("all-NaN and random-bytes scans", ("site", "check", "{bad_scans_yaml}"), 0,
         ("contains", "NaN", "named .gz but not gzip-compressed", "2 files excluded"),
         ("all voxels are zero", "File the file", "4 excluded")),
    # paths that do not exist, or are the wrong kind
    Case("sample on a path that does not exist", ("sample", "{tmp}/nowhere", "--modality", "T1w", "--out", "{tmp}/o"), 2,
         ("nowhere: does not exist",), ("not a run",)),
    Case("verify a path that does not exist", ("verify", "{tmp}/nowhere", "--integrity-only"), 2,
         ("nowhere: does not exist",), ("not a signed release",)),
    Case("verify x.json", ("verify", "{other_json}", "--integrity-only"), 2, ("a file, not a release",),
         ("Errno",)),
    Case("verify --public-key missing", ("verify", "{release}", "--public-key", "{tmp}/missing.pub"), 2,
         ("missing.pub: file not found",), ("PEM", "Errno")),
    Case("verify without a key", ("verify", "{release}"), 2, ("--public-key", "--integrity-only")),
    Case("verify a tampered release", ("verify", "{tampered}", "--public-key", "{release_pub}"), 1,
         ("changed hash: data.txt",)),
    Case("verify an intact release", ("verify", "{release}", "--public-key", "{release_pub}"), 0,
         ("signed by the trusted key",)),
    Case("verify --integrity-only of an intact release", ("verify", "{release}", "--integrity-only"), 0,
         ("NOT checked",)),
    # settings
    Case("modalities given as a string", ("site", "check", "{string_modalities_yaml}"), 2,
         ("modalities: expected a list, e.g. [T1w], got the text 'T1w'",), ("valid tuple",)),
    Case("run YAML errors name the stage", ("simulate", "--sites", "{site_yaml}", "--run-config", "{bad_stage_yaml}"),
         2, ("stages[decoder].rounds: expected a whole number",), ("stages.1",)),
    Case("site data root missing", ("site", "check", "{missing_root_yaml}"), 2, ("does not exist",)),
    Case("data-parallel workers on one pinned GPU", ("site", "check", "{pinned_gpu_yaml}"), 2,
         ("pinned-gpu.yaml", "pins one GPU", "use device: cuda")),
    Case("train --workers 0", ("train", "mae", "--sites", "{site_yaml}", "--workers", "0"), 2, ("--workers", "at least 1")),
    Case("forecast checks --site before the run", ("forecast", "{tmp}", "--site", "{tmp}/missing.yaml", "--subject",
                                                   "sub-a001", "--modality", "T1w", "--years", "2", "--out", "{tmp}/f"),
         2, ("missing.yaml: file not found",), ("DiT",)),
    Case("cohort make --voxel-mm 5", ("cohort", "make", "--voxel-mm", "5", "--out", "{tmp}/c"), 2, ("1 to 4 mm",)),
    Case("cohort make into an existing cohort", ("cohort", "make", "--sites", "1", "--out", "{cohort}"), 2,
         ("holds a cohort already", "--force")),
    # conventions
    Case("bare braing3n prints help", (), 0, ("COMMAND", "examples:", "exit codes")),
    Case("a group without its action prints its help", ("consortium",), 0, ("init", "serve")),
    Case("--version", ("--version",), 0, ("braing3n 0.1.0",)),
    Case("usage error", ("site", "check"), 2, ("the following arguments are required: SITE_YAML",)),
]


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "braing3n_core", *argv], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


def _env() -> dict[str, str]:
    # This checkout first: the code under test, not whichever copy is installed. No TTY, no colour.
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "NO_COLOR": "1",
            "COLUMNS": "80"}


def _fixtures(root: Path, shared_site_yaml: Path) -> dict[str, Path]:
    from braing3n_core.federation.recipe import Recipe
    from braing3n_core.ops.consortium import init_consortium
    from braing3n_core.ops.job_file import write_job
    from braing3n_core.ops.release import sign_directory

    paths: dict[str, Path] = {"tmp": root}
    # A copy of one site of the session's synthetic cohort: `cohort make` may be pointed at it, the original never.
    cohort = root / "cohort"
    site = yaml.safe_load(shared_site_yaml.read_text())
    shutil.copytree((shared_site_yaml.parent / site["data_root"]).resolve(), cohort / "site-a")
    (cohort / "sites").mkdir()
    site_yaml = cohort / "sites" / "site-a.yaml"
    shutil.copy(shared_site_yaml, site_yaml)  # its data_root (../site-a) now points at the copy
    data_root = (site_yaml.parent / site["data_root"]).resolve()
    assert data_root == (cohort / "site-a").resolve()
    paths.update(cohort=cohort, site_yaml=site_yaml)
    paths["scan"] = next(data_root.glob("sub-*/ses-*/anat/*_T1w.nii.gz"))

    def site_file(name: str, text: bytes) -> Path:
        path = root / name
        path.write_bytes(text)
        return path

    paths["latin1_yaml"] = site_file("latin1.yaml", f"# H\xf4pital\nsite_id: site-a\ndata_root: {data_root}\n".encode("latin-1"))
    paths["utf16_yaml"] = site_file("utf16.yaml", f"# Hôpital\nsite_id: site-a\ndata_root: {data_root}\n".encode("utf-16"))
    paths["string_modalities_yaml"] = site_file("modalities.yaml", f"site_id: a\ndata_root: {data_root}\nmodalities: T1w\n".encode())
    paths["missing_root_yaml"] = site_file("missing-root.yaml", f"site_id: a\ndata_root: {root / 'no-data'}\n".encode())
    paths["pinned_gpu_yaml"] = site_file("pinned-gpu.yaml",
                                         f"site_id: a\ndata_root: {data_root}\nworkers: 2\ndevice: cuda:1\n".encode())
    run_config = yaml.safe_load((REPO / "runs-config" / "tiny.yaml").read_text())
    run_config["stages"][1]["rounds"] = "two"
    paths["run_yaml"] = REPO / "runs-config" / "tiny.yaml"
    paths["bad_stage_yaml"] = site_file("bad-stage.yaml", yaml.safe_dump(run_config).encode())
    paths["some_bin"] = site_file("some.bin", bytes(range(256)) * 4)
    paths["other_json"] = site_file("x.json", json.dumps({"model": "resnet", "weights": "w.pt"}).encode())

    # A site with one good scan, an all-NaN one and random bytes named .nii.gz.
    bad = root / "bad-scans"
    shutil.copytree(data_root, bad)
    reference = nib.load(paths["scan"])
    nan_scan = bad / "sub-a900" / "anat" / "sub-a900_T1w.nii.gz"
    nan_scan.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.full(reference.shape, np.nan, np.float32), reference.affine), nan_scan)
    noise = bad / "sub-a901" / "anat" / "sub-a901_T1w.nii.gz"
    noise.parent.mkdir(parents=True)
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    paths["bad_scans_yaml"] = site_file("bad-scans.yaml", f"site_id: site-x\ndata_root: {bad}\n".encode())

    paths["full_dir"] = root / "full"
    paths["full_dir"].mkdir()
    (paths["full_dir"] / "notes.txt").write_text("not a consortium")
    consortium = init_consortium(root / "consortium", ["site-a"], "fl.example")
    paths.update(consortium=consortium.layout.root, release_pub=consortium.layout.release_pub)
    job = write_job(consortium.layout.root, paths["run_yaml"])
    document = json.loads(job.source.read_text())
    document["payload"]["recipe"]["stages"][0]["rounds"] = 20  # and its hash with it: only the signature tells
    document["payload"]["recipe_sha256"] = Recipe.from_data(document["payload"]["recipe"]).sha256
    paths.update(job=job.source, tampered_job=site_file("tampered.job.json", json.dumps(document).encode()))

    release = root / "release"
    release.mkdir()
    (release / "data.txt").write_text("signed\n")
    sign_directory(release, consortium.layout.release_key, {"kind": "dataset"})
    tampered = root / "tampered"
    shutil.copytree(release, tampered)
    (tampered / "data.txt").write_text("changed\n")
    paths.update(release=release, tampered=tampered)
    assert gzip.decompress(paths["scan"].read_bytes())  # the good scan is a real .nii.gz
    return paths


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory, synthetic_cohort: list[Path]) -> dict[str, str]:
    return {k: str(v) for k, v in _fixtures(tmp_path_factory.mktemp("cli"), synthetic_cohort[0]).items()}


@pytest.fixture(scope="module")
def results(paths: dict[str, str]) -> dict[str, subprocess.CompletedProcess]:
    """Every case's completed process; run concurrently (most rows wait on interpreter start-up)."""
    env = _env()

    def run(case: Case) -> subprocess.CompletedProcess:
        return _run([part.format(**paths) for part in case.argv], env)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip([c.name for c in CASES], pool.map(run, CASES)))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_a_message_and_the_contract_exit_code(case: Case, results) -> None:
    done = results[case.name]
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    assert done.returncode == case.code, output
    for phrase in case.says:
        assert phrase in output, f"{phrase!r} not in:\n{output}"
    for phrase in case.never:
        assert phrase not in output, f"{phrase!r} in:\n{output}"


def test_the_printed_flwr_run_names_a_run_yaml_that_exists(paths: dict[str, str], results) -> None:
    printed = results["consortium run --print-command with no SuperLink running"].stdout
    assert "Traceback" not in printed
    assert (Path(paths["tmp"]) / "printed-run" / "run.yaml").is_file()  # so the printed command can be pasted


def test_site_check_json_and_no_writes_into_the_dataset(paths: dict[str, str], tmp_path: Path) -> None:
    done = _run(["site", "check", paths["bad_scans_yaml"], "--json"], _env())
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["usable_scans"] >= 1 and report["excluded_files"] == 2 and report["check_cache"] is None
    assert {"T1w"} <= set(report["modalities"])
    data_root = Path(report["data_root"])
    assert not (data_root / "derivatives" / "braing3n-cache").exists()  # nothing written unless asked

    cached = _run(["site", "check", paths["bad_scans_yaml"], "--cache-dir", str(tmp_path / "cache"), "-q"], _env())
    assert cached.returncode == 0 and cached.stdout.strip().endswith("2 files excluded")
    assert any((tmp_path / "cache" / "checks").iterdir())


def test_plain_tables_into_a_pipe(paths: dict[str, str]) -> None:
    done = _run(["site", "check", paths["site_yaml"], "-v"], _env())
    assert done.returncode == 0
    assert not any(ch in done.stdout for ch in "─│┃━✓"), done.stdout  # no box drawing into a pipe
    assert "modality" in done.stdout and "T1w" in done.stdout and "T1 " not in done.stdout
    assert max(len(line) for line in done.stdout.splitlines() if "check cache" not in line and "data root" not in line) <= 80


def _parsers(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """Every (command words, parser) pair of the command tree."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*prefix, name))


def test_every_command_has_help_and_every_option_says_what_it_does(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    seen = 0
    for words, sub in _parsers(parser):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([*words, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: braing3n {' '.join(words)}".rstrip())
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help and action.help != argparse.SUPPRESS, f"braing3n {' '.join(words)} {action.dest}: no help"
            unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS
            shown = not unset and action.option_strings
            if shown and action.dest not in ("verbose", "quiet"):
                formatted = sub.formatter_class(prog="braing3n")._get_help_string(action)
                assert "default" in formatted, f"braing3n {' '.join(words)} {action.dest}: default not shown"
            if not action.option_strings:
                assert action.metavar and action.metavar.isupper(), f"{words} {action.dest}: positional not NAMED"
        seen += 1
    assert seen > 25


def test_the_exit_codes_are_documented() -> None:
    text = build_parser().format_help()
    for line in ("0    success", "1    the job ran and failed", "2    bad usage or bad input"):
        assert line in text
    readme = (REPO / "README.md").read_text()
    assert "exit-code contract" in readme and "bad usage or bad input" in readme
