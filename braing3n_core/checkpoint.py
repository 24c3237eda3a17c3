"""Checkpoints: safetensors weights + a JSON manifest beside them, written atomically.

A checkpoint is the pair `<stem>.safetensors` + `<stem>.json`. The weights file is written first (temp
file + rename), the manifest second; the manifest records the weights file's sha256 and is the commit
marker, so a crash between the two leaves an orphan weights file that loaders ignore, never a
half-written checkpoint that loads. Nothing is pickled: optimizer state is flattened into named tensors
plus JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from braing3n_core.errors import BadInput
from braing3n_core.fileio import atomic_write_json, file_sha256

FORMAT = "braing3n-checkpoint/1"


class CheckpointError(BadInput, RuntimeError):
    """A checkpoint is missing, incomplete or does not match its manifest; the message names the file."""


@dataclass
class Checkpoint:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def sub_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under `prefix.` with the prefix removed (e.g. `model.`, `optim.`)."""
        cut = len(prefix) + 1
        return {k[cut:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """Content hash of named tensors, independent of file layout (used to verify frozen weights)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_checkpoint(stem: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Write `<stem>.safetensors` then `<stem>.json`; returns the manifest path."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights = stem.with_suffix(".safetensors")
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=stem.parent, prefix=f".{weights.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(contiguous, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, weights)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    manifest = {
        "format": FORMAT,
        "weights": weights.name,
        "weights_sha256": file_sha256(weights),
        "tensors_sha256": tensors_sha256(contiguous),
        "meta": dict(meta),
    }
    manifest_path = stem.with_suffix(".json")
    atomic_write_json(manifest_path, manifest)
    return manifest_path


def load_checkpoint(path: Path | str, map_location: str = "cpu") -> Checkpoint:
    """Load from a stem, a `.json` manifest or a `.safetensors` path; verifies the weights hash."""
    manifest_path, manifest = read_manifest(path)
    weights = manifest_path.parent / manifest["weights"]
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file named by {manifest_path.name} is missing")
    actual = file_sha256(weights)
    if actual != manifest.get("weights_sha256"):
        raise CheckpointError(f"{weights}: sha256 {actual[:12]}… does not match its manifest "
                              f"({str(manifest.get('weights_sha256'))[:12]}…)")
    tensors = load_file(str(weights), device=map_location)
    meta = manifest.get("meta", {})
    return Checkpoint(tensors=tensors, meta=meta if isinstance(meta, dict) else {}, path=manifest_path)


def read_manifest(path: Path | str) -> tuple[Path, dict[str, Any]]:
    """A checkpoint's manifest path and content, checked to be ours; nothing is loaded yet.

    People pass all sorts of files as a checkpoint (a PyTorch `.bin`, another tool's JSON, a folder), so each
    is named for what it is instead of failing on its bytes."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; give a checkpoint's .json manifest "
                              "(e.g. <run>/checkpoints/mae/final.json)")
    if path.suffix not in (".json", ".safetensors", ""):
        raise CheckpointError(f"{path}: not a braing3n checkpoint ({path.suffix} file); give the .json manifest "
                              "written beside its .safetensors weights")
    manifest_path = path.with_suffix(".json") if path.suffix in (".safetensors", "") else path
    if path.suffix == "" and not manifest_path.exists():
        manifest_path = Path(str(path) + ".json")
    if not manifest_path.is_file():
        what = "does not exist" if not path.exists() else "has no manifest beside it"
        raise CheckpointError(f"{manifest_path}: checkpoint manifest not found ({path} {what}; incomplete or "
                              "missing checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{manifest_path}: not a checkpoint manifest (not valid JSON: {error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        detail = f"format {found!r}" if found is not None else "no \"format\" field"
        raise CheckpointError(f"{manifest_path}: not a braing3n checkpoint manifest ({detail}; expected "
                              f"{FORMAT!r}, as written beside a .safetensors file by training)")
    if not isinstance(manifest.get("weights"), str):
        raise CheckpointError(f"{manifest_path}: checkpoint manifest names no weights file")
    return manifest_path, manifest


def list_checkpoints(directory: Path, prefix: str = "") -> list[Path]:
    """Complete checkpoints (those with a manifest) in `directory`, oldest name first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"{prefix}*.json") if p.with_suffix(".safetensors").is_file())


def latest_checkpoint(directory: Path, prefix: str = "") -> Path | None:
    found = list_checkpoints(directory, prefix)
    return found[-1] if found else None


# --- optimizer state without pickling -------------------------------------------------------------


def flatten_optimizer_state(state: Mapping[str, Any], prefix: str = "optim") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into named tensors and a JSON-able remainder."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{param_id}.{name}"] = value
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], prefix: str = "optim") -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith(prefix + "."):
            continue
        param_id, name = key[len(prefix) + 1 :].split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    for param_id, values in meta.get("scalars", {}).items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}
