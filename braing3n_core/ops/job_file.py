"""A job as the consortium hands it to a hospital: the app's bundle hash and the run recipe, signed.

`braing3n consortium job CONSORTIUM_DIR --run-config RUN_YAML` writes one JSON file, by default
`<consortium>/jobs/<run name>-<recipe sha256[:12]>.job.json`:

```json
{"payload": {"format": "braing3n-job/1", "created": "…",
             "app": {"id": "braing3n/braing3n-fl 0.1.0", "fab_sha256": "<the bundle `flwr run` submits>"},
             "recipe": {…the run YAML, canonical…}, "recipe_sha256": "…"},
 "signature": {"algorithm": "Ed25519", "public_key": "…", "key_fingerprint": "SHA256:…", "value": "…"}}
```

signed like a release (`ops/release.canonical`) with the consortium's Ed25519 release key, whose public half
every site's bundle holds (`release.pub`). The hospital reviews it (`braing3n site review SITE_YAML JOB`) and
approves it (`braing3n site approve`); with `--public-key <bundle>/release.pub` both refuse a job the
consortium did not sign or that was changed after signing.

A run YAML is a job too, unsigned, whose app is the one installed here (the bundle `flwr run` would submit
from this installation): what `braing3n simulate` runs, where the sites and the consortium are one machine.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from braing3n_core.config import ConfigError
from braing3n_core.errors import JobFailed
from braing3n_core.federation.protocol import ProtocolError
from braing3n_core.federation.recipe import Recipe
from braing3n_core.federation.run_config import RunConfig
from braing3n_core.fileio import atomic_write_json
from braing3n_core.ops.consortium import load_consortium, load_release_private_key, load_release_public_key, ssh_fingerprint
from braing3n_core.ops.flower import APP_DIR, app_id, fab_sha256
from braing3n_core.ops.release import canonical

FORMAT = "braing3n-job/1"
SUFFIX = ".job.json"


class JobFileError(ConfigError):
    """A job file that cannot be read as one (names the file and the problem; exit code 2)."""


class JobSignatureError(JobFailed, RuntimeError):
    """A job whose signature does not verify with the key the site trusts (exit code 1, like `verify`)."""


@dataclass(frozen=True)
class Job:
    source: Path
    recipe: Recipe
    fab_sha256: str
    app: str  # `publisher/name version`
    signed_by: str = ""  # fingerprint of the key that signed it ("" = unsigned, e.g. a run YAML)
    trusted: bool = False  # its signature was checked against the key the site trusts


def write_job(consortium_dir: Path, run_config: Path, out: Path | None = None, app_dir: Path = APP_DIR) -> Job:
    """The job of `run_config` with the app in `app_dir`, signed with the consortium's release key."""
    consortium = load_consortium(consortium_dir)
    recipe = Recipe.of(RunConfig.from_yaml(run_config))
    fab = fab_sha256(app_dir)
    payload = {"format": FORMAT, "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
               "app": {"id": app_id(app_dir), "fab_sha256": fab}, "recipe": recipe.data, "recipe_sha256": recipe.sha256}
    key = load_release_private_key(consortium.layout.release_key)
    public = key.public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    document = {"payload": payload, "signature": {"algorithm": "Ed25519", "public_key": base64.b64encode(raw).decode(),
                                                  "key_fingerprint": ssh_fingerprint(public),
                                                  "value": base64.b64encode(key.sign(canonical(payload))).decode()}}
    target = out or consortium.layout.root / "jobs" / f"{recipe.name}-{recipe.sha256[:12]}{SUFFIX}"
    atomic_write_json(target, document)
    return Job(target, recipe, fab, payload["app"]["id"], ssh_fingerprint(public), trusted=True)


def read_job(path: Path, public_key: Path | None = None) -> Job:
    """A job file (its signature checked, and against `public_key` when given) or a run YAML (this app)."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        if public_key is not None:
            raise JobSignatureError(f"{path}: a run YAML is not signed; ask the consortium for its job file "
                                    "(`braing3n consortium job`), or leave out --public-key")
        return Job(path, Recipe.of(RunConfig.from_yaml(path)), fab_sha256(APP_DIR), app_id(APP_DIR))
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        payload, signature = document["payload"], document.get("signature")
        if payload.get("format") != FORMAT:
            raise ValueError(f"format {payload.get('format')!r}, expected {FORMAT!r}")
        recipe = Recipe.from_data(payload["recipe"])
        fab, app = str(payload["app"]["fab_sha256"]), str(payload["app"]["id"])
    except FileNotFoundError:
        raise JobFileError(f"{path}: file not found") from None
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, ProtocolError) as error:
        raise JobFileError(f"{path}: not a braing3n job file ({type(error).__name__}: {error}); the consortium writes "
                           "one with `braing3n consortium job`, or give a run YAML") from None
    if recipe.sha256 != payload["recipe_sha256"]:
        raise JobSignatureError(f"{path}: its recipe hashes to {recipe.sha256[:12]}…, the file says "
                                f"{str(payload['recipe_sha256'])[:12]}…: it was edited after it was written")
    signed_by, trusted = _check_signature(path, payload, signature, public_key)
    return Job(path, recipe, fab, app, signed_by, trusted)


def _check_signature(path: Path, payload: dict[str, Any], signature: Any, public_key: Path | None) -> tuple[str, bool]:
    if not signature:
        if public_key is not None:
            raise JobSignatureError(f"{path}: the job is not signed, so it cannot be checked against {public_key}")
        return "", False
    try:
        signer = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(signature["public_key"], validate=True))
        signer.verify(base64.b64decode(signature["value"], validate=True), canonical(payload))
    except (InvalidSignature, ValueError, KeyError, TypeError):
        raise JobSignatureError(f"{path}: bad signature: the job was changed after it was signed") from None
    fingerprint = ssh_fingerprint(signer)
    if public_key is None:
        return fingerprint, False
    trusted = load_release_public_key(public_key)
    if ssh_fingerprint(trusted) != fingerprint:
        raise JobSignatureError(f"{path}: signed by {fingerprint}, not by the consortium key {ssh_fingerprint(trusted)} "
                                f"({public_key})")
    return fingerprint, True
