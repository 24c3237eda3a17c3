"""The trained models generation needs, loaded from a run folder or from checkpoints.

The DiT and the decoder must have been trained on the same frozen encoder (the weight hash each
checkpoint records); the encoder itself is needed only to forecast (a baseline scan's tokens) and is
checked against that hash too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from braing3n_core.data.tokens import encoder_sha256
from braing3n_core.errors import BadInput
from braing3n_core.federation.run_folder import RunFolder
from braing3n_core.fileio import file_sha256
from braing3n_core.models import CNNDecoder, DiT, MAEEncoder
from braing3n_core.presets import Preset, get_preset
from braing3n_core.runtime import resolve_device
from braing3n_core.stage_names import DECODER, DIT, MAE, STAGE_NAMES
from braing3n_core.training.checkpoints import load_stage_model


class GenerationError(BadInput, RuntimeError):
    """Generation cannot run (missing or mismatched checkpoints, unknown scan…); the message names the file."""


@dataclass
class GenerationModels:
    preset: Preset
    decoder: CNNDecoder
    dit: DiT | None  # None: a run that has not trained its DiT (reconstructions only)
    encoder: MAEEncoder | None  # None: not found; sampling does not need it, forecasting does
    encoder_sha256: str  # the frozen encoder both the decoder and the DiT were trained on
    checkpoints: dict[str, Path]  # stage -> manifest (.json) of what was loaded
    run_dir: Path | None
    device: torch.device

    def require_dit(self) -> DiT:
        if self.dit is None:
            raise GenerationError(f"{self.run_dir or self.checkpoints['decoder']}: no DiT checkpoint; train the dit stage first")
        return self.dit

    def require_encoder(self, why: str) -> MAEEncoder:
        if self.encoder is None:
            raise GenerationError(f"{why}: needs the frozen encoder {self.encoder_sha256[:12]}… the decoder was "
                                  f"trained on; no MAE checkpoint with that hash where the trainers recorded it or in "
                                  f"{self.run_dir or 'a run folder'} (checkpoints/mae/ or start_from.mae in run.yaml)")
        return self.encoder


def _manifest(path: Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".json" else path.with_suffix(".json")


def load_run_models(source: Path, *, decoder: Path | None = None, need_dit: bool = True, need_encoder: bool = False,
                    device: str | torch.device = "cpu") -> GenerationModels:
    """Models from a run folder or from a DiT checkpoint inside one (`<run>/checkpoints/dit/<name>.json`);
    `decoder` overrides the run's decoder."""
    source = Path(source)
    if not source.exists():
        raise GenerationError(f"{source}: does not exist (give a run folder, or a DiT checkpoint's .json in one)")
    if source.is_dir():
        run_dir: Path | None = source
        dit = RunFolder(source).stage_checkpoint(DIT)
    else:
        dit = _manifest(source)
        if not dit.is_file():
            raise GenerationError(f"{source}: neither a run folder nor a checkpoint manifest (.json)")
        folder = RunFolder.of_checkpoint(dit)
        run_dir = folder.root if folder is not None else None
    if dit is None and need_dit:
        raise GenerationError(f"{source}: no DiT checkpoint (checkpoints/dit/final.json or step-*.json, or "
                              "start_from.dit in run.yaml); train the dit stage first")
    decoder = _manifest(decoder) if decoder is not None else (RunFolder(run_dir).stage_checkpoint(DECODER) if run_dir else None)
    if decoder is None:
        raise GenerationError(f"{run_dir or source}: no decoder checkpoint (checkpoints/decoder/final.json or "
                              "step-*.json, or start_from.decoder in run.yaml); pass one with --decoder")
    models = load_generation_models(dit, decoder, device=device, run_dir=run_dir)
    if need_encoder:
        models.require_encoder(f"{source}")
    return models


def load_generation_models(dit: Path | None, decoder: Path, encoder: Path | None = None, *,
                           device: str | torch.device = "cpu", run_dir: Path | None = None) -> GenerationModels:
    """Load a decoder, a DiT (optional) and their frozen encoder, checking that all three agree on the
    encoder (the DiT's samples live in that encoder's token space, which the decoder reads).

    Without `encoder`, the encoder is looked for where the trainers recorded it, then in `run_dir`
    (`RunFolder(run_dir).stage_checkpoint("mae")`); the first with the right hash is taken, and `None` when there
    is none (sampling does not need it)."""
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    decoder_path = _manifest(decoder)
    decoder_model, decoder_ckpt = load_stage_model(decoder_path, expected_stage="decoder")
    sha = decoder_ckpt.meta.get("encoder_sha256")
    if not sha:
        raise GenerationError(f"{decoder_path}: the decoder checkpoint does not name its encoder (encoder_sha256)")
    metas, checkpoints = {"decoder": decoder_ckpt.meta}, {"decoder": decoder_path}
    dit_model = None
    if dit is not None:
        dit_path = _manifest(dit)
        dit_model, dit_ckpt = load_stage_model(dit_path, expected_stage="dit")
        if dit_ckpt.meta.get("encoder_sha256") != sha:
            raise GenerationError(
                f"{dit_path} was trained on encoder {str(dit_ckpt.meta.get('encoder_sha256'))[:12]}… but the decoder "
                f"{decoder_path} on {sha[:12]}…: the DiT's samples would be decoded from another token space"
            )
        metas["dit"], checkpoints["dit"] = dit_ckpt.meta, dit_path
    presets = {stage: meta.get("preset") for stage, meta in metas.items()}
    if len(set(presets.values()) - {None}) > 1:
        raise GenerationError(f"checkpoints of different presets {presets}: {', '.join(map(str, checkpoints.values()))}")
    preset = get_preset(next((p for p in presets.values() if p), "small"))
    if encoder is not None:
        candidates, explicit = [_manifest(encoder)], True
    else:
        recorded = [_manifest(Path(m["encoder_checkpoint"])) for m in metas.values() if m.get("encoder_checkpoint")]
        in_run = RunFolder(run_dir).stage_checkpoint(MAE) if run_dir is not None else None
        candidates = list(dict.fromkeys(p for p in [*recorded, in_run] if p is not None and p.is_file()))
        explicit = False
    encoder_model = None
    for candidate in candidates:
        model, _ = load_stage_model(candidate, expected_stage="mae")
        found = encoder_sha256(model.encoder)
        if found == sha:
            encoder_model = model.encoder.eval().requires_grad_(False).to(device)
            checkpoints["mae"] = candidate
            break
        if explicit:
            raise GenerationError(f"{candidate}: encoder {found[:12]}… is not the one the decoder {decoder_path} "
                                  f"was trained on ({sha[:12]}…)")
    return GenerationModels(
        preset, decoder_model.eval().to(device), dit_model.eval().to(device) if dit_model is not None else None,
        encoder_model, sha, {s: checkpoints[s] for s in reversed(STAGE_NAMES) if s in checkpoints}, run_dir, device,
    )


def model_hashes(models: GenerationModels) -> dict[str, dict[str, str]]:
    """stage -> manifest path and weights sha256: what a data card or a sample's JSON records."""
    return {stage: {"path": str(path), "sha256": file_sha256(path.with_suffix(".safetensors"))}
            for stage, path in models.checkpoints.items()}
