"""`braing3n embed`: frozen-encoder features of any scans, written as one safetensors file and a manifest.

The features are the foundation model's output for downstream work outside this project (a clinic's own
classifier, a registry's similarity search). They are worth something only if they are the features the
DiT and the probes were trained on, so every scan goes through the training pipeline unchanged
(`preprocess_volume`, preset from the encoder checkpoint) and through the same encoding call
(`encode_volumes`); the manifest records the preprocessing fingerprint and the encoder's weight hash so
that features from two runs are compared only when both match.

    DIR/embeddings.safetensors   tokens [n, N, E] float32, pooled [n, E] float32 (mean over the N tokens)
    DIR/manifest.json            one row per embedded scan (index = row in both tensors), the skipped
                                 scans with their reason, the preset, fingerprint and encoder
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file
from safetensors.torch import save as safetensors_bytes

from braing3n_core.checkpoint import CheckpointError
from braing3n_core.config import ConfigError
from braing3n_core.data.cache import ArrayCache
from braing3n_core.data.datasets import load_site
from braing3n_core.data.inspection import Problem
from braing3n_core.data.tokens import encode_volumes, encoder_sha256
from braing3n_core.data.transforms import (
    PreprocessingError,
    check_scan_file,
    preprocess_scan,
    preprocessing_fingerprint,
)
from braing3n_core.fileio import atomic_write_bytes, atomic_write_json, file_sha256
from braing3n_core.models import MAEEncoder
from braing3n_core.presets import Preset, get_preset
from braing3n_core.runtime import resolve_device
from braing3n_core.site_config import SiteConfig
from braing3n_core.training.checkpoints import load_stage_model

EMBEDDINGS_FILE = "embeddings.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT = "braing3n-embeddings/1"


@dataclass(frozen=True)
class FrozenEncoder:
    """A stage-1 encoder with the preset its checkpoint was trained at (which fixes the preprocessing)."""

    encoder: MAEEncoder
    preset: Preset
    sha256: str  # weight hash: the identity every trainer and site checks
    checkpoint: Path


@dataclass(frozen=True)
class ScanToEmbed:
    """One input scan; the site fields are filled when it comes from a site's BIDS dataset."""

    path: Path
    subject: str | None = None
    session: str | None = None
    modality: str | None = None


@dataclass
class Embeddings:
    scans: list[ScanToEmbed]  # row i of the tensors is scans[i]
    tokens: torch.Tensor  # [n, N, E] float32
    pooled: torch.Tensor  # [n, E] float32
    skipped: list[Problem] = field(default_factory=list)


def load_frozen_encoder(checkpoint: Path, device: torch.device) -> FrozenEncoder:
    """The encoder of an MAE checkpoint and its preset (from the checkpoint's meta); a checkpoint whose
    network does not fit that preset's grid is refused rather than fed volumes of another shape."""
    checkpoint = Path(checkpoint)
    model, loaded = load_stage_model(checkpoint, expected_stage="mae")
    name = loaded.meta.get("preset")
    if name is None:
        raise CheckpointError(f"{loaded.path}: the checkpoint does not record its preset (meta.preset)")
    preset = get_preset(name)
    config = model.encoder.config
    if tuple(config.image_shape) != preset.shape:
        raise CheckpointError(f"{loaded.path}: encoder input {tuple(config.image_shape)} is not preset "
                              f"{preset.name!r}'s grid {preset.shape}")
    encoder = model.encoder.eval().requires_grad_(False)
    return FrozenEncoder(encoder.to(device), preset, encoder_sha256(encoder), Path(loaded.path or checkpoint))


def scans_from_site(site_yaml: Path, preset: Preset) -> tuple[list[ScanToEmbed], list[Problem], ArrayCache | None]:
    """A site's usable scans (after its site check), the files the check excluded, and its volume cache
    (preprocessed volumes the trainers already computed are reused, not recomputed)."""
    data = load_site(SiteConfig.from_yaml(site_yaml), preset, prepare=False, progress=False)
    scans = [ScanToEmbed(r.path, r.subject, r.session, r.modality.value) for r in data.records]
    return scans, [p for p in data.problems if p.excluded], data.cache


def embed_scans(frozen: FrozenEncoder, scans: Sequence[ScanToEmbed], *, cache: ArrayCache | None = None,
                checked: bool = False) -> Embeddings:
    """Preprocess and encode each scan; one that cannot be used is skipped with its reason.

    Scans are encoded one at a time: a scan's features then never depend on which other scans share its
    batch (batched matrix products may round differently), so embedding a scan twice gives identical
    features. `checked`: the scans passed a site check already (otherwise each file is checked first).
    """
    kept: list[ScanToEmbed] = []
    tokens: list[torch.Tensor] = []
    skipped: list[Problem] = []
    device = next(frozen.encoder.parameters()).device
    for scan in scans:
        try:
            if not checked:
                check_scan_file(scan.path)
            volume = preprocess_scan(scan.path, frozen.preset, cache)  # [1, D, H, W]
        except (PreprocessingError, OSError) as error:
            skipped.append(Problem(scan.path, error.reason if isinstance(error, PreprocessingError) else str(error), True))
            continue
        tokens.append(encode_volumes(frozen.encoder, torch.from_numpy(volume)[None], device)[0])  # [N, E]
        kept.append(scan)
    if not tokens:
        return Embeddings([], torch.empty(0), torch.empty(0), skipped)
    stacked = torch.stack(tokens)  # [n, N, E]
    return Embeddings(kept, stacked, stacked.mean(dim=1), skipped)


def manifest(frozen: FrozenEncoder, embeddings: Embeddings, source: dict[str, Any]) -> dict[str, Any]:
    """What a reader needs to trust and match the features: per row the file and its hash, and the
    preprocessing and encoder they were computed with."""
    rows = []
    for index, scan in enumerate(embeddings.scans):
        row = {"index": index, "path": str(scan.path), "sha256": file_sha256(scan.path)}
        if scan.subject is not None:
            row |= {"subject": scan.subject, "session": scan.session, "modality": scan.modality}
        rows.append(row)
    return {
        "format": FORMAT, "command": "embed", "source": source,
        "preset": frozen.preset.name, "preprocessing_fingerprint": preprocessing_fingerprint(frozen.preset),
        "encoder": {"checkpoint": str(frozen.checkpoint), "sha256": frozen.sha256,
                    "weights_file_sha256": file_sha256(frozen.checkpoint.with_suffix(".safetensors"))},
        "tensors": {"tokens": list(embeddings.tokens.shape), "pooled": list(embeddings.pooled.shape),
                    "dtype": "float32", "pooled_is": "mean of the tokens over N"},
        "scans": rows,
        "skipped": [{"path": str(p.path), "name": p.path.name, "reason": p.reason} for p in embeddings.skipped],
    }


def write_embeddings(embeddings: Embeddings, record: dict[str, Any], out: Path) -> Path:
    """`embeddings.safetensors` (atomically; its sha256 goes into the manifest) then `manifest.json`,
    last, so a manifest always describes the tensors beside it. Returns the manifest's path."""
    out = Path(out)
    tensors = {"tokens": embeddings.tokens.contiguous(), "pooled": embeddings.pooled.contiguous()}
    metadata = {"format": FORMAT, "preprocessing_fingerprint": record["preprocessing_fingerprint"],
                "encoder_sha256": record["encoder"]["sha256"], "preset": record["preset"]}
    atomic_write_bytes(out / EMBEDDINGS_FILE, safetensors_bytes(tensors, metadata=metadata))
    path = out / MANIFEST_FILE
    atomic_write_json(path, {**record, "embeddings": EMBEDDINGS_FILE,
                             "embeddings_sha256": file_sha256(out / EMBEDDINGS_FILE)})
    return path


def export_embeddings(encoder: Path, out: Path, *, paths: Sequence[Path] = (), site: Path | None = None,
                      device: str = "cpu") -> tuple[Path, Embeddings]:
    """`braing3n embed`: the scans in `paths`, or every usable scan of `site`, → `out`. Raises
    `ConfigError` when no scan at all is usable (after listing why each was skipped)."""
    if bool(paths) == (site is not None):
        raise ConfigError("embed: give scan paths or --site SITE.yaml (one of the two)")
    frozen = load_frozen_encoder(encoder, resolve_device(device))
    if site is not None:
        scans, excluded, cache = scans_from_site(Path(site), frozen.preset)
        embeddings = embed_scans(frozen, scans, cache=cache, checked=True)
        embeddings.skipped[:0] = excluded
        source: dict[str, Any] = {"site_file": str(Path(site).resolve())}
    else:
        embeddings = embed_scans(frozen, [ScanToEmbed(Path(p)) for p in paths])
        source = {"paths": [str(p) for p in paths]}
    if not embeddings.scans:
        reasons = "; ".join(f"{p.path.name}: {p.reason}" for p in embeddings.skipped[:5]) or "no scans found"
        raise ConfigError(f"embed: no usable scan ({len(embeddings.skipped)} skipped: {reasons})")
    return write_embeddings(embeddings, manifest(frozen, embeddings, source), Path(out)), embeddings


def load_embeddings(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The tensors and manifest `export_embeddings` wrote (for readers and tests)."""
    folder = Path(folder)
    return load_file(str(folder / EMBEDDINGS_FILE)), json.loads((folder / MANIFEST_FILE).read_text())
