"""Generation with a trained DiT and decoder: the one home of conditional sampling and forecasting.

Everything that turns checkpoints into volumes goes through here (`braing3n sample`, `braing3n
forecast`, `braing3n synthesize`, the demo's showcase):

- **models**: `load_run_models(run folder or DiT checkpoint)` / `load_generation_models(dit, decoder,
  encoder)`. The DiT and the decoder must have been trained on the same frozen encoder (the weight
  hash each checkpoint records); the encoder itself is needed only to forecast (a baseline scan's
  tokens) and is checked against that hash too.
- **condition rows**: `ConditionRow` (the six variables, modality required, any other one missing)
  and `read_conditions(tsv)`, whose errors name the file, line and column.
- **sampling**: `generate(models, rows)`: DiT tokens [B, N, E] from noise under each row's
  conditions, decoded to volumes [B, 1, D, H, W] (z-score units, the preset's LPS grid).
- **forecasting**: `forecast(models, site, tokens, baseline, years)`: a baseline scan + an interval →
  the follow-up's tokens → volume, scored against the real follow-up when the site holds one.
- **files**: `write_nifti` (the preset's LPS grid, `preset_affine`), `write_samples`,
  `write_forecast` (NIfTI + mid-slice montage PNGs), and `export_samples` / `export_forecast`, which
  the CLI calls.

Determinism: samples depend on (seed, batch_size, conditions, steps, guidance). One CPU generator,
seeded once, draws every batch's initial noise in turn, so CPU and CUDA start from the same noise.
"""

from __future__ import annotations

import csv
import gzip
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from braing3n_core.checkpoint import latest_checkpoint
from braing3n_core.conditions import CONDITION_SCHEMA, ConditionBatch, ContinuousVariable, conditions_from_labels
from braing3n_core.config import ConfigError, SiteConfig
from braing3n_core.data.bids import ScanRecord
from braing3n_core.data.cache import preprocess_scan
from braing3n_core.data.datasets import SiteData, load_site
from braing3n_core.diffusion import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, sample
from braing3n_core.fileio import atomic_write_bytes, atomic_write_json, file_sha256
from braing3n_core.labels import Modality, ScanLabels
from braing3n_core.metrics import psnr, ssim
from braing3n_core.models import CNNDecoder, DiT, MAEEncoder
from braing3n_core.presets import Preset, get_preset
from braing3n_core.runtime import autocast, resolve_device
from braing3n_core.tokens import TokenCache, encoder_sha256

CONDITION_COLUMNS: tuple[str, ...] = tuple(v.name for v in CONDITION_SCHEMA)
MISSING = "n/a"  # BIDS' missing value; an empty cell means the same
STAGES = ("dit", "decoder", "mae")


class GenerationError(RuntimeError):
    """Generation cannot run (missing or mismatched checkpoints, unknown scan…); the message names the file."""


# --- models ----------------------------------------------------------------------------------------------------


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


def stage_checkpoint(run_dir: Path, stage: str) -> Path | None:
    """A run folder's checkpoint of `stage`: a federated run's `final.json`, else a centralized run's
    newest `step-*.json`, else the run's `start_from.<stage>` (a stage taken from another run)."""
    folder = Path(run_dir) / "checkpoints" / stage
    if (folder / "final.json").is_file():
        return folder / "final.json"
    found = latest_checkpoint(folder, "step-")
    if found is not None:
        return found
    pinned = Path(run_dir) / "run.yaml"
    if pinned.is_file():
        from braing3n_core.runconfig import RunConfig

        start_from = RunConfig.from_yaml(pinned).start_from.get(stage)
        return Path(start_from) if start_from is not None else None
    return None


def _manifest(path: Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".json" else path.with_suffix(".json")


def _run_dir_of(checkpoint: Path) -> Path | None:
    """`<run>` for a checkpoint at `<run>/checkpoints/<stage>/<name>.json`, else None."""
    if checkpoint.parent.parent.name == "checkpoints":
        return checkpoint.parents[2]
    return None


def load_run_models(source: Path, *, decoder: Path | None = None, need_dit: bool = True, need_encoder: bool = False,
                    device: str | torch.device = "cpu") -> GenerationModels:
    """Models from a run folder or from a DiT checkpoint inside one (`<run>/checkpoints/dit/<name>.json`);
    `decoder` overrides the run's decoder."""
    source = Path(source)
    if source.is_dir():
        run_dir: Path | None = source
        dit = stage_checkpoint(source, "dit")
    else:
        dit = _manifest(source)
        if not dit.is_file():
            raise GenerationError(f"{source}: neither a run folder nor a checkpoint manifest (.json)")
        run_dir = _run_dir_of(dit)
    if dit is None and need_dit:
        raise GenerationError(f"{source}: no DiT checkpoint (checkpoints/dit/final.json or step-*.json, or "
                              "start_from.dit in run.yaml); train the dit stage first")
    decoder = _manifest(decoder) if decoder is not None else (stage_checkpoint(run_dir, "decoder") if run_dir else None)
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
    (`stage_checkpoint(run_dir, "mae")`); the first with the right hash is taken, and `None` when there
    is none (sampling does not need it)."""
    from braing3n_core.train import load_stage_model

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
        in_run = stage_checkpoint(run_dir, "mae") if run_dir is not None else None
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
        encoder_model, sha, {s: checkpoints[s] for s in STAGES if s in checkpoints}, run_dir, device,
    )


def model_hashes(models: GenerationModels) -> dict[str, dict[str, str]]:
    """stage -> manifest path and weights sha256: what a data card or a sample's JSON records."""
    return {stage: {"path": str(path), "sha256": file_sha256(path.with_suffix(".safetensors"))}
            for stage, path in models.checkpoints.items()}


# --- condition rows ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConditionRow:
    """The requested value of each of the six variables; `None` leaves a variable unconditioned. The
    modality is always given: it decides the contrast and names the file a sample is written to."""

    modality: Modality
    age: float | None = None
    sex: str | None = None
    diagnosis: str | None = None
    field_strength: float | None = None
    mmse: float | None = None
    label: str = ""  # display name (montages, report); not a condition

    @classmethod
    def checked(cls, values: Mapping[str, Any], locate: Callable[[str], str], label: str = "") -> ConditionRow:
        """A row from raw values (text or numbers; `None`, "" or "n/a" = missing), each checked against the
        conditioning schema; `locate(column)` says where a value came from, for the error message."""
        out: dict[str, Any] = {}
        for variable in CONDITION_SCHEMA:
            raw = values.get(variable.name)
            text = "" if raw is None else str(raw).strip()
            where = locate(variable.name)
            if text in ("", MISSING):
                if variable.name == "modality":
                    raise ConfigError(f"{where}: modality is required (one of {[m.value for m in Modality]})")
                out[variable.name] = None
                continue
            numeric = isinstance(variable, ContinuousVariable) or variable.name == "field_strength"
            try:
                value: Any = float(text) if numeric else text
            except ValueError:
                raise ConfigError(f"{where}: {text!r} is not a number") from None
            try:
                if isinstance(variable, ContinuousVariable):
                    out[variable.name] = variable.check(value, where)
                else:
                    category = variable.categories[variable.index(value, where)]
                    out[variable.name] = float(category) if numeric else category
            except ValueError as error:
                raise ConfigError(str(error)) from None
        return cls(modality=Modality(out.pop("modality")), label=label, **out)

    def labels(self) -> ScanLabels:
        return ScanLabels(age=self.age, sex=self.sex, diagnosis=self.diagnosis, mmse=self.mmse,
                          field_strength=self.field_strength)

    def to_dict(self) -> dict[str, Any]:
        """The six variables (modality as its BIDS value), the form staged sets and JSON files keep."""
        return {"age": self.age, "sex": self.sex, "diagnosis": self.diagnosis, "modality": self.modality.value,
                "field_strength": self.field_strength, "mmse": self.mmse}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str) -> ConditionRow:
        return cls.checked(values, lambda column: f"{where}, {column}", str(values.get("label") or ""))

    def describe(self) -> str:
        if self.label:
            return self.label
        parts = [self.diagnosis, f"{self.age:g} y" if self.age is not None else None, self.sex, self.modality.short]
        return ", ".join(p for p in parts if p)


def read_conditions(path: Path) -> list[ConditionRow]:
    """Rows of a conditions TSV: a header among `age, sex, diagnosis, modality, field_strength, mmse`
    (modality required), one row per sample, `n/a` or an empty cell for "unconditioned". Every value is
    checked; an error names the file, the line and the column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: conditions file not found")
    # utf-8-sig: a spreadsheet's byte-order mark would otherwise make the first column unknown
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, delimiter="\t")
        header = [h.strip() for h in next(reader, [])]
        unknown = [h for h in header if h not in CONDITION_COLUMNS]
        repeated = sorted({h for h in header if header.count(h) > 1})
        if not header or unknown or repeated or "modality" not in header:
            raise ConfigError(f"{path}: line 1 (header): columns must be tab-separated names among "
                              f"{list(CONDITION_COLUMNS)}, 'modality' included, each once (unknown {unknown}, "
                              f"repeated {repeated}, modality {'present' if 'modality' in header else 'missing'})")
        rows = []
        for cells in reader:
            line = reader.line_num
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                raise ConfigError(f"{path}: line {line}: {len(cells)} tab-separated cells, the header has {len(header)}")
            values = dict(zip(header, cells))
            rows.append(ConditionRow.checked(values, lambda column, line=line: f"{path}: line {line}, column {column!r}"))
    if not rows:
        raise ConfigError(f"{path}: no condition rows under the header")
    return rows


def condition_batch(rows: Sequence[ConditionRow]) -> ConditionBatch:
    """Rows → the DiT's batch form (`None` → missing)."""
    if not rows:
        raise ValueError("no condition rows")
    return conditions_from_labels([r.labels() for r in rows], [r.modality for r in rows])


# --- sampling ---------------------------------------------------------------------------------------------------


@dataclass
class GeneratedSamples:
    rows: list[ConditionRow]
    tokens: torch.Tensor  # [B, N, E] float32, CPU: encoder tokens
    volumes: torch.Tensor  # [B, 1, D, H, W] float32, CPU: z-score units, the preset's LPS grid
    seconds: float  # wall time of sampling and decoding (model loading excluded)
    settings: dict[str, Any]

    @property
    def seconds_per_volume(self) -> float:
        return self.seconds / max(1, len(self.rows))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode(decoder: CNNDecoder, tokens: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """tokens [B, N, E] → volumes [B, 1, D, H, W] float32 on the CPU (bf16 autocast on CUDA)."""
    device = next(decoder.parameters()).device
    parts = []
    with autocast(device):
        for start in range(0, len(tokens), batch_size):
            parts.append(decoder(tokens[start : start + batch_size].to(device).float()).float().cpu())
    return torch.cat(parts)


@torch.no_grad()
def generate(models: GenerationModels, rows: Sequence[ConditionRow], *, steps: int = DEFAULT_STEPS,
             guidance_scale: float = DEFAULT_GUIDANCE_SCALE, seed: int = 0, batch_size: int = 4) -> GeneratedSamples:
    """One sample per row: DiT tokens from noise under the row's conditions, decoded to a volume."""
    dit = models.require_dit()
    rows = list(rows)
    if batch_size < 1 or steps < 1:
        raise ValueError(f"need batch_size ≥ 1 and steps ≥ 1, got {batch_size} and {steps}")
    cond = condition_batch(rows)
    shape = (dit.config.num_tokens, dit.config.token_dim)
    generator = torch.Generator().manual_seed(seed)
    _synchronize(models.device)
    started = time.perf_counter()
    tokens = []
    with autocast(models.device):
        for start in range(0, len(rows), batch_size):
            part = cond.select(slice(start, start + batch_size))
            tokens.append(sample(dit, (part.batch_size, *shape), part, steps=steps, guidance_scale=guidance_scale,
                                 generator=generator).float().cpu())  # [b, N, E]
    all_tokens = torch.cat(tokens)
    volumes = decode(models.decoder, all_tokens, batch_size)
    _synchronize(models.device)
    settings = {"steps": steps, "guidance_scale": guidance_scale, "seed": seed, "batch_size": batch_size,
                "solver": "heun", "preset": models.preset.name, "encoder_sha256": models.encoder_sha256,
                "device": str(models.device), "autocast": "bf16" if models.device.type == "cuda" else None}
    return GeneratedSamples(rows, all_tokens, volumes, time.perf_counter() - started, settings)


# --- longitudinal forecasting -----------------------------------------------------------------------------------


@dataclass
class ForecastResult:
    baseline: ScanRecord
    follow_up: ScanRecord | None  # the real scan at the forecast interval, when the site holds one
    interval_years: float
    tokens: torch.Tensor  # [1, N, E] forecast tokens
    volume: np.ndarray  # [D, H, W] forecast
    baseline_volume: np.ndarray  # [D, H, W]
    follow_up_volume: np.ndarray | None  # [D, H, W]
    scores: dict[str, float]  # forecast/psnr, forecast/ssim and the baseline-as-forecast reference
    seconds: float
    settings: dict[str, Any]


def find_baseline(data: SiteData, subject: str, session: str | None, modality: Modality) -> ScanRecord:
    """The subject's scan of `modality` at `session` (its earliest such scan when `session` is None)."""
    source = data.config.source_file or data.config.data_root
    mine = [r for r in data.records if r.subject == subject]
    if not mine:
        subjects = sorted({r.subject for r in data.records})
        raise GenerationError(f"{source}: site {data.config.site_id} has no usable scan of subject {subject!r} "
                              f"(subjects: {', '.join(subjects[:12])}{' …' if len(subjects) > 12 else ''})")
    matches = [r for r in mine if Modality(r.modality) is modality and (session is None or r.session == session)]
    if not matches:
        known = sorted(f"{r.session or '(no session)'} {Modality(r.modality).value}" for r in mine)
        raise GenerationError(f"{source}: no usable {modality.value} scan of {subject} "
                              f"{session or 'in any session'}; its usable scans: {', '.join(known)}")
    return min(matches, key=lambda r: (math.inf if r.labels.age is None else r.labels.age, r.session or ""))


def matching_follow_up(records: Sequence[ScanRecord], baseline: ScanRecord, years: float,
                       tolerance: float = 0.25) -> ScanRecord | None:
    """The subject's later scan of the same modality taken `years` (± `tolerance`) after the baseline."""
    if baseline.labels.age is None:
        return None
    best: tuple[float, ScanRecord] | None = None
    for record in records:
        if (record.subject != baseline.subject or Modality(record.modality) is not Modality(baseline.modality)
                or record.session == baseline.session or record.labels.age is None):
            continue
        gap = abs(record.labels.age - baseline.labels.age - years)
        if gap <= tolerance and (best is None or gap < best[0]):
            best = (gap, record)
    return best[1] if best else None


def volume_scores(prediction: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> tuple[float, float]:
    """(PSNR inside the target's brain, SSIM over the whole volume) of two [D, H, W] volumes, both on the
    fixed z-score window (`metrics.py`); the brain is the target's non-zero voxels."""
    target = torch.as_tensor(np.ascontiguousarray(target), dtype=torch.float32).reshape(1, 1, *np.shape(target)[-3:])
    prediction = torch.as_tensor(np.ascontiguousarray(prediction), dtype=torch.float32).reshape(target.shape)
    return float(psnr(prediction, target, mask=target != 0)[0]), float(ssim(prediction, target)[0])


def _forecast_scores(forecast_volume: np.ndarray, baseline_volume: np.ndarray, follow_volume: np.ndarray) -> dict[str, float]:
    """The forecast against the real follow-up and, as the "nothing changes" reference, the baseline."""
    scores = {}
    for prefix, volume in (("forecast/", forecast_volume), ("forecast/baseline_", baseline_volume)):
        scores[f"{prefix}psnr"], scores[f"{prefix}ssim"] = volume_scores(volume, follow_volume)
    return scores


@torch.no_grad()
def forecast(models: GenerationModels, site: SiteData, tokens: TokenCache, baseline: ScanRecord, years: float, *,
             follow_up: ScanRecord | None = None, steps: int = DEFAULT_STEPS,
             guidance_scale: float = DEFAULT_GUIDANCE_SCALE, seed: int = 0) -> ForecastResult:
    """`baseline`'s scan `years` later, conditioned on the baseline's tokens, the interval and what is
    known at baseline (sex, diagnosis, sequence, field strength, the target age; not the follow-up's
    MMSE). Scored against `follow_up`, or the site's scan at that interval when there is one."""
    dit = models.require_dit()
    if not (math.isfinite(years) and years > 0):
        raise ValueError(f"the forecast interval must be a positive number of years, got {years}")
    if tokens.encoder_sha256 != models.encoder_sha256:
        raise GenerationError(f"{site.config.source_file}: the token cache is of encoder {tokens.encoder_sha256[:12]}…, "
                              f"not the models' {models.encoder_sha256[:12]}…")
    _synchronize(models.device)
    started = time.perf_counter()
    base_tokens = tokens.tokens(baseline)[None]  # [1, N, E]
    known = ScanLabels(age=None if baseline.labels.age is None else baseline.labels.age + years,
                       sex=baseline.labels.sex, diagnosis=baseline.labels.diagnosis,
                       field_strength=baseline.labels.field_strength)
    cond = conditions_from_labels([known], [Modality(baseline.modality)])
    with autocast(models.device):
        predicted = sample(dit, (1, dit.config.num_tokens, dit.config.token_dim), cond, steps=steps,
                           guidance_scale=guidance_scale, baseline=base_tokens, interval=torch.tensor([float(years)]),
                           generator=torch.Generator().manual_seed(seed)).float().cpu()  # [1, N, E]
    volume = decode(models.decoder, predicted)[0, 0].numpy()
    _synchronize(models.device)
    seconds = time.perf_counter() - started
    baseline_volume = preprocess_scan(baseline.path, models.preset, site.cache)[0]
    follow_up = follow_up if follow_up is not None else matching_follow_up(site.records, baseline, years)
    follow_volume, scores = None, {}
    if follow_up is not None:
        follow_volume = preprocess_scan(follow_up.path, models.preset, site.cache)[0]
        scores = _forecast_scores(volume, baseline_volume, follow_volume)
    settings = {"steps": steps, "guidance_scale": guidance_scale, "seed": seed, "site": site.config.site_id,
                "subject": baseline.subject, "session": baseline.session, "modality": Modality(baseline.modality).value,
                "years": float(years), "conditioned_age": known.age, "encoder_sha256": models.encoder_sha256,
                "device": str(models.device), "autocast": "bf16" if models.device.type == "cuda" else None}
    return ForecastResult(baseline, follow_up, float(years), predicted, volume, baseline_volume, follow_volume,
                          scores, seconds, settings)


def split_of(data: SiteData, record: ScanRecord) -> str:
    """Which of the site's splits holds the scan's subject ("train" means the models saw it)."""
    return next((name for name, records in data.splits.items() if any(r.subject == record.subject for r in records)),
                "unassigned")


# --- files ------------------------------------------------------------------------------------------------------


def preset_affine(preset: Preset) -> np.ndarray:
    """4 × 4 voxel → world (RAS+ mm, as NIfTI stores it) of the preset's grid, centred on the origin.

    Preprocessing (`data/transforms.py`) reorients every scan to LPS: array axis 0 grows toward the
    patient's Left, axis 1 toward Posterior, axis 2 toward Superior, so in RAS+ the first two columns
    are negative. It also centres the head's bounding box in the grid, hence the grid centre at 0.
    """
    spacing = preset.spacing_mm
    rotation = np.diag([-spacing, -spacing, spacing])
    centre = (np.asarray(preset.shape, dtype=np.float64) - 1.0) / 2.0
    affine = np.eye(4)
    affine[:3, :3] = rotation
    affine[:3, 3] = -rotation @ centre
    return affine


def nifti_bytes(volume: np.ndarray, preset: Preset, compress: bool = True) -> bytes:
    """A [D, H, W] volume of the preset's grid as NIfTI-1 bytes (gzipped unless `compress` is False)."""
    import nibabel as nib

    volume = np.asarray(volume, dtype=np.float32)
    if volume.shape != tuple(preset.shape):
        raise ValueError(f"volume of shape {volume.shape} is not preset {preset.name!r}'s grid {tuple(preset.shape)}")
    image = nib.Nifti1Image(volume, preset_affine(preset))
    image.header.set_xyzt_units("mm")
    # "aligned": the axes are anatomical (LPS), the origin is the grid centre, not a scanner's isocentre
    image.header.set_qform(image.affine, code=2)
    image.header.set_sform(image.affine, code=2)
    data = image.to_bytes()
    return gzip.compress(data, compresslevel=6) if compress else data


def write_nifti(volume: np.ndarray, preset: Preset, path: Path) -> Path:
    """`nifti_bytes` written atomically to `.nii` or `.nii.gz`."""
    path = Path(path)
    atomic_write_bytes(path, nifti_bytes(volume, preset, compress=path.name.endswith(".gz")))
    return path


def write_samples(samples: GeneratedSamples, preset: Preset, folder: Path, *, montage: Path | None = None,
                  per_row: int = 4, montage_limit: int = 16) -> tuple[list[Path], Path]:
    """`sample-0001.nii.gz`, … in `folder` and a montage of the first `montage_limit` samples (three
    mid-slices each; default `folder/samples.png`)."""
    from braing3n_core.report import plot_montage

    folder = Path(folder)
    paths = [write_nifti(volume[0].numpy(), preset, folder / f"sample-{i + 1:04d}.nii.gz")
             for i, volume in enumerate(samples.volumes)]
    cells = [(f"{i + 1}: {row.describe()}", samples.volumes[i, 0].numpy())
             for i, row in enumerate(samples.rows[:montage_limit])]
    image = plot_montage([cells[i : i + per_row] for i in range(0, len(cells), per_row)],
                         montage if montage is not None else folder / "samples.png")
    return paths, image


def write_forecast(result: ForecastResult, preset: Preset, nifti: Path, montage: Path) -> tuple[Path, Path]:
    """The forecast as NIfTI, and a montage: baseline | forecast | real follow-up (when there is one)."""
    from braing3n_core.report import plot_montage

    base, follow = result.baseline, result.follow_up
    age = f"{base.labels.age:.1f} y" if base.labels.age is not None else "age not recorded"
    cells = [(f"baseline, {age}", result.baseline_volume), (f"forecast, +{result.interval_years:.1f} y", result.volume)]
    if follow is not None and result.follow_up_volume is not None:
        cells.append((f"real follow-up, {follow.labels.age:.1f} y", result.follow_up_volume))
    label = f"{base.site_id} {base.subject} {Modality(base.modality).short}"
    return write_nifti(result.volume, preset, nifti), plot_montage([cells], Path(montage), [label])


# --- the CLI's two commands -------------------------------------------------------------------------------------


def _scan(record: ScanRecord | None) -> dict[str, Any] | None:
    if record is None:
        return None
    return {"subject": record.subject, "session": record.session, "modality": Modality(record.modality).value,
            "age": record.labels.age, "path": str(record.path)}


def export_samples(source: Path, rows: Sequence[ConditionRow], out: Path, *, decoder: Path | None = None,
                   conditions_file: Path | None = None, steps: int = DEFAULT_STEPS,
                   guidance_scale: float = DEFAULT_GUIDANCE_SCALE, seed: int = 0, batch_size: int = 4,
                   device: str = "cpu") -> Path:
    """`braing3n sample`: NIfTI per row, `samples.png` and `sample.json` (what was asked, the models,
    the settings and the sampling time per volume) in `out`; returns the JSON's path."""
    models = load_run_models(source, decoder=decoder, device=device)
    samples = generate(models, rows, steps=steps, guidance_scale=guidance_scale, seed=seed, batch_size=batch_size)
    out = Path(out)
    paths, montage = write_samples(samples, models.preset, out)
    record = {
        "command": "sample", "source": str(source), "conditions_file": str(conditions_file) if conditions_file else None,
        "models": model_hashes(models), "settings": samples.settings,
        "samples": [{"nifti": p.name, "label": row.describe(), "conditions": row.to_dict()}
                    for p, row in zip(paths, samples.rows)],
        "montage": montage.name, "seconds": samples.seconds, "seconds_per_volume": samples.seconds_per_volume,
    }
    path = out / "sample.json"
    atomic_write_json(path, record)
    return path


def export_forecast(source: Path, site_yaml: Path, subject: str, session: str | None, modality: Modality, years: float,
                    out: Path, *, steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
                    seed: int = 0, device: str = "cpu") -> Path:
    """`braing3n forecast`: `forecast.nii.gz`, `forecast.png` and `forecast.json` (scores against the
    real follow-up when the site holds one) in `out`; returns the JSON's path. Runs where the site's
    data is: only the baseline and follow-up scans are preprocessed and encoded."""
    models = load_run_models(source, need_encoder=True, device=device)
    encoder = models.require_encoder("forecasting (the baseline scan's tokens)")
    config = SiteConfig.from_yaml(site_yaml)
    data = load_site(config, models.preset, prepare=False, progress=False)
    baseline = find_baseline(data, subject, session, modality)
    tokens = TokenCache(config.resolved_cache_dir, encoder, models.preset, data.cache, models.device)
    result = forecast(models, data, tokens, baseline, years, steps=steps, guidance_scale=guidance_scale, seed=seed)
    out = Path(out)
    nifti, montage = write_forecast(result, models.preset, out / "forecast.nii.gz", out / "forecast.png")
    record = {
        "command": "forecast", "source": str(source), "site_file": str(config.source_file),
        "models": model_hashes(models), "settings": result.settings, "split": split_of(data, baseline),
        "baseline": _scan(baseline), "follow_up": _scan(result.follow_up), "scores": result.scores,
        "scores_note": None if result.follow_up else f"no {modality.value} scan of {subject} {years:g} y (± 0.25 y) "
                                                      "after the baseline: nothing to score against",
        "nifti": nifti.name, "montage": montage.name, "seconds": result.seconds,
    }
    path = out / "forecast.json"
    atomic_write_json(path, record)
    return path
