"""Signed releases: a folder of files plus `RELEASE.json`, signed with the consortium's Ed25519 key.

A release is any folder whose every file is listed, with its sha256 and size, in `RELEASE.json`; the
manifest also says what the release is (metadata: run configuration, stages and rounds, participating
sites, ε per site when the run measured it, software versions) and carries an Ed25519 signature over
the canonical JSON of all of that:

```json
{"payload": {"format": "braing3n-release/1", "created": "…", "files": {"checkpoints/mae/final.json":
             {"sha256": "…", "bytes": 1234}, …}, "metadata": {…}},
 "signature": {"algorithm": "Ed25519", "public_key": "<base64 raw 32 bytes>",
               "key_fingerprint": "SHA256:…", "value": "<base64 64 bytes>"}}
```

`verify_directory` names each thing that does not match: a missing file, an extra file, a changed
hash (or size), a bad signature (the manifest was edited after signing), or the wrong key (signed, but
not by the key the verifier trusts). Without a trusted public key it can check integrity only, and
says so (`VerifyReport.trusted` is False).

A federated run is released with `sign_run`: its final checkpoints, probe heads and results, resolved
run configuration and server state are linked (or copied) into `<run>/release/`, which is then signed.
Synthetic datasets call `sign_directory` on their own folder with their own metadata.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata as package_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from braing3n_core.config import ConfigError
from braing3n_core.fileio import atomic_write_json
from braing3n_core.ops.consortium import load_release_private_key, load_release_public_key, ssh_fingerprint
from braing3n_core.stage_names import PROBES

if TYPE_CHECKING:
    from braing3n_core.federation.run_folder import RunFolder

FORMAT = "braing3n-release/1"
MANIFEST = "RELEASE.json"
ProblemKind = Literal["missing file", "extra file", "changed hash", "bad signature", "wrong key", "unreadable manifest"]


@dataclass(frozen=True)
class Problem:
    kind: ProblemKind
    path: str  # relative to the release folder
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind}: {self.path}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class VerifyReport:
    path: Path
    problems: list[Problem] = field(default_factory=list)
    key_fingerprint: str | None = None  # the key that signed the manifest
    trusted: bool = False  # the signature was checked against the verifier's own public key
    files: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.problems:
            return f"{self.path}: {len(self.problems)} problem(s):\n" + "\n".join(f"  {p}" for p in self.problems)
        who = (f"signed by the trusted key {self.key_fingerprint}" if self.trusted else
               f"signed by {self.key_fingerprint}, a key that was NOT checked: pass --public-key release.pub")
        return f"{self.path}: {self.files} files match their signed manifest; {who}"


PrivateKey = ed25519.Ed25519PrivateKey | Path | str
PublicKey = ed25519.Ed25519PublicKey | Path | str


def _private(key: PrivateKey) -> ed25519.Ed25519PrivateKey:
    return key if isinstance(key, ed25519.Ed25519PrivateKey) else load_release_private_key(Path(key))


def _public(key: PublicKey) -> ed25519.Ed25519PublicKey:
    return key if isinstance(key, ed25519.Ed25519PublicKey) else load_release_public_key(Path(key))


def _raw(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def canonical(payload: Mapping[str, Any]) -> bytes:
    """The signed bytes: sorted keys, no whitespace, UTF-8 (stable across platforms and Python versions)."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _plain(value: Any) -> Any:
    """JSON-safe metadata: paths and other objects as text, NaN/Inf as null (the signed bytes allow no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _plain(value.tolist())
    return str(value)


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:  # never memoised: a verifier must read what is on disk now
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _listing(root: Path) -> dict[str, Path]:
    """Every file under `root` except the manifest, by POSIX relative path."""
    found = {}
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            relative = path.relative_to(root).as_posix()
            if relative == MANIFEST:
                continue
            if path.is_symlink() or not path.is_file():
                raise ConfigError(f"{path}: a release holds regular files only (no links or special files)")
            found[relative] = path
    return found


def software_versions() -> dict[str, str]:
    versions = {}
    for name in ("braing3n-fl", "flwr", "torch", "monai", "opacus"):
        try:
            versions[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            continue
    return versions


def sign_directory(path: Path, private_key: PrivateKey, metadata: Mapping[str, Any]) -> Path:
    """Hash every file in `path`, sign the manifest with the Ed25519 `private_key`; returns `RELEASE.json`."""
    root = Path(path).resolve()
    if not root.is_dir():
        raise ConfigError(f"{root}: not a folder; a release is a folder of files")
    key = _private(private_key)
    files = {rel: {"sha256": _sha256(p), "bytes": p.stat().st_size} for rel, p in _listing(root).items()}
    if not files:
        raise ConfigError(f"{root}: nothing to sign (empty folder)")
    payload = {"format": FORMAT, "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
               "files": files, "metadata": _plain(metadata)}
    public = key.public_key()
    manifest = {"payload": payload, "signature": {
        "algorithm": "Ed25519",
        "public_key": base64.b64encode(_raw(public)).decode(),
        "key_fingerprint": ssh_fingerprint(public),
        "value": base64.b64encode(key.sign(canonical(payload))).decode(),
    }}
    target = root / MANIFEST
    atomic_write_json(target, manifest)
    os.chmod(target, 0o644)
    return target


def verify_directory(path: Path, public_key: PublicKey | None = None) -> VerifyReport:
    """Check a release folder (or its `RELEASE.json`) against its signed manifest; see `VerifyReport`."""
    path = Path(path).resolve()
    if not path.exists():
        raise ConfigError(f"{path}: does not exist")
    if path.is_file() and path.name != MANIFEST:
        raise ConfigError(f"{path}: a file, not a release; give the release folder (the one holding {MANIFEST}) "
                          f"or its {MANIFEST}")
    root = path.parent if path.name == MANIFEST else path
    report = VerifyReport(root)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        payload, signature = manifest["payload"], manifest["signature"]
        if payload.get("format") != FORMAT or signature.get("algorithm") != "Ed25519":
            raise ValueError(f"unknown format {payload.get('format')!r} / algorithm {signature.get('algorithm')!r}")
        signer = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(signature["public_key"], validate=True))
        value = base64.b64decode(signature["value"], validate=True)
        listed: dict[str, dict[str, Any]] = payload["files"]
    except FileNotFoundError:
        report.problems.append(Problem("unreadable manifest", MANIFEST,
                                       "not found: this folder is not a signed release"))
        return report
    except (OSError, ValueError, KeyError, TypeError) as error:
        report.problems.append(Problem("unreadable manifest", MANIFEST, str(error)))
        return report
    report.key_fingerprint = ssh_fingerprint(signer)
    report.metadata = dict(payload.get("metadata", {}))
    if public_key is not None:
        trusted = _public(public_key)
        if _raw(trusted) != _raw(signer):
            report.problems.append(Problem("wrong key", MANIFEST, f"signed by {report.key_fingerprint}, "
                                           f"expected {ssh_fingerprint(trusted)}"))
        else:
            report.trusted = True
    try:
        signer.verify(value, canonical(payload))
    except (InvalidSignature, ValueError):
        report.problems.append(Problem("bad signature", MANIFEST, "the manifest was changed after it was signed"))
        report.trusted = False
    on_disk = _listing(root)
    for relative, expected in sorted(listed.items()):
        if relative not in on_disk:
            report.problems.append(Problem("missing file", relative))
            continue
        actual, size = _sha256(on_disk[relative]), on_disk[relative].stat().st_size
        if actual != expected.get("sha256") or size != expected.get("bytes"):
            signed = str(expected.get("sha256"))
            report.problems.append(Problem("changed hash", relative, f"sha256 {actual[:12]}…, signed {signed[:12]}…"))
    for relative in sorted(set(on_disk) - set(listed)):
        report.problems.append(Problem("extra file", relative))
    report.files = len(listed)
    return report


# --- releasing a federated run -------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: cannot read ({error})") from None


def _run_folder(run_dir: Path) -> RunFolder:
    # Imported here, not at the top: the run folder pulls in torch, and `braing3n verify` (any folder, on any
    # machine) should answer in a second, not after loading a deep-learning stack it never uses.
    from braing3n_core.federation.run_folder import RunFolder

    return RunFolder(run_dir)


def epsilon_per_site(run_dir: Path) -> dict[str, Any]:
    """The largest ε each site reported (site-level DP: cumulative, so the largest is the latest), and the
    run's client-level ε (logged by the server), from `metrics.jsonl`; empty when no DP ran."""
    sites: dict[str, float] = {}
    client_level = None
    for record in _run_folder(run_dir).records():
        value = record.get("privacy/epsilon")
        if not isinstance(value, (int, float)):
            continue
        site = str(record.get("site"))
        if site == "server":
            client_level = max(client_level or 0.0, float(value))
        elif site != "aggregate":
            sites[site] = max(sites.get(site, 0.0), float(value))
    out: dict[str, Any] = {}
    if sites:
        out["site_level"] = dict(sorted(sites.items()))
    if client_level is not None:
        out["client_level"] = client_level
    return out


def run_release_metadata(run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    run = _run_folder(run_dir)
    state = _read_json(run.state_path)
    config = yaml.safe_load(run.config_path.read_text())
    return {
        "kind": "federated-checkpoints",
        "run": state.get("run"),
        "preset": state.get("preset"),
        "config": config,
        "stages": state.get("stages", {}),
        "probes": state.get("probes"),
        "encoder_sha256": state.get("encoder_sha256"),
        "sites": sorted(set(state.get("sites", {}).values())),
        "epsilon": epsilon_per_site(run_dir),
        "software": software_versions(),
    }


def _place(source: Path, target: Path) -> None:
    """A hard link when possible (checkpoints are never rewritten in place), else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _stage_files(run_dir: Path, state: Mapping[str, Any]) -> list[Path]:
    """What a finished run releases; refuses a run whose stages or probes have not finished."""
    stages = state.get("stages", {})
    probes = state.get("probes") or {}
    unfinished = [s for s, v in stages.items() if not v.get("done")]
    if probes.get("enabled") and not probes.get("done"):
        unfinished.append(PROBES)
    if unfinished:
        raise ConfigError(f"{run_dir}: {unfinished} have not finished; only a finished run is released")
    if not stages and not probes.get("done"):
        raise ConfigError(f"{run_dir}: no finished stage to release")
    run = _run_folder(run_dir)
    paths = [run.config_path, run.state_path]
    for stage in list(stages) + ([PROBES] if probes.get("done") else []):
        paths += [run.final_path(stage), run.final_path(stage).with_suffix(".safetensors")]
    if run.probes_path.is_file():
        paths.append(run.probes_path)
    files = [p.relative_to(run.root) for p in paths]
    missing = [str(f) for f in files if not (run_dir / f).is_file()]
    if missing:
        raise ConfigError(f"{run_dir}: cannot release, missing {missing}")
    return files


def sign_run(run_dir: Path, private_key: PrivateKey, out: Path | None = None) -> Path:
    """Release a finished federated run into `out` (default `<run>/release/`, replacing an earlier release
    only once the new one is complete and signed); returns its `RELEASE.json`."""
    key = _private(private_key)  # a bad key fails before anything is written
    run_dir = Path(run_dir).resolve()
    files = _stage_files(run_dir, _read_json(_run_folder(run_dir).state_path))
    out = Path(out).resolve() if out is not None else _run_folder(run_dir).release_dir
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".release-", dir=out.parent))
    try:
        for relative in files:
            _place(run_dir / relative, staging / relative)
        sign_directory(staging, key, run_release_metadata(run_dir))
        os.chmod(staging, 0o755)  # mkdtemp makes 0700; a release is meant to be read
        if out.exists():
            retired = Path(tempfile.mkdtemp(prefix=".release-old-", dir=out.parent))
            os.replace(out, retired / "release")
            os.replace(staging, out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out / MANIFEST
