"""`braing3n reconstruct`: one scan through a run's frozen encoder and decoder, on the model's grid and on the scan's own.

The reconstruction shows what the foundation model keeps of a scan it has never seen (a clinic's file
in any orientation and voxel size). It is written twice: on the preprocessed grid (LPS, the preset's
spacing), where it is scored against the preprocessed input with the decoder stage's own validation
metrics, and resampled back onto the input file's voxel grid (same shape and affine as the input), so
that it overlays the original in any viewer. The way back is MONAI's inverse of the preprocessing
(`PreprocessedScan.to_original`); intensities stay in z-score units (the z-score has no inverse).

    DIR/reconstruction.nii.gz            the preset's grid (LPS, centred), z-score units
    DIR/reconstruction_native.nii.gz     the input's grid: its shape, affine and header geometry
    DIR/input.nii.gz                     the preprocessed input, for side-by-side viewing
    DIR/reconstruction.png               montage: preprocessed input | reconstruction | |difference|
    DIR/reconstruct.json                 metrics, models, files
"""

from __future__ import annotations

import gzip
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from braing3n_core.data.tokens import encode_volumes
from braing3n_core.data.transforms import PreprocessedScan, preprocess_invertible, preprocessing_fingerprint
from braing3n_core.evaluation.metrics import reconstruction_metrics
from braing3n_core.figures import plot_montage
from braing3n_core.fileio import atomic_write_bytes, atomic_write_json, file_sha256
from braing3n_core.generation.models import GenerationModels, load_run_models, model_hashes
from braing3n_core.generation.output import write_nifti
from braing3n_core.generation.sampling import decode

INTENSITY_NOTE = ("z-score units of the preprocessed input (mean 0, sd 1 over its brain voxels; background 0): "
                  "the preprocessing's background suppression and z-score have no inverse, so the native-space file "
                  "is the reconstruction on the input's voxel grid, not in its scanner units")


@dataclass
class Reconstruction:
    scan: PreprocessedScan
    volume: np.ndarray  # [D, H, W] reconstruction on the preset grid
    native: np.ndarray  # the reconstruction on the input's voxel grid (the input's array shape)
    metrics: dict[str, float]  # val/* names, brain = non-zero voxels of the preprocessed input
    seconds: float


@torch.no_grad()
def reconstruct(models: GenerationModels, scan: Path) -> Reconstruction:
    """Preprocess (as training does) → encode → decode one scan, score it, and map it back to the scan's grid."""
    encoder = models.require_encoder(f"reconstructing {scan}")
    started = time.perf_counter()
    prepared = preprocess_invertible(scan, models.preset)
    tokens = encode_volumes(encoder, torch.from_numpy(prepared.volume)[None], models.device)  # [1, N, E]
    volume = decode(models.decoder, tokens)  # [1, 1, D, H, W]
    target = torch.from_numpy(prepared.volume)[None]  # [1, 1, D, H, W]
    metrics = reconstruction_metrics(volume, target, mask=target != 0)
    native = prepared.to_original(volume[0, 0].numpy())
    return Reconstruction(prepared, volume[0, 0].numpy(), native, metrics, time.perf_counter() - started)


def native_nifti_bytes(volume: np.ndarray, original: Path) -> bytes:
    """`volume` (the input's array shape) as gzipped float32 NIfTI with the input file's affine and
    geometry header (qform/sform and their codes, units), so it lines up with the input wherever both
    are shown."""
    source = nib.load(original)
    header = source.header.copy()
    header.set_data_dtype(np.float32)
    image = type(source)(np.asarray(volume, dtype=np.float32), source.affine, header)
    image.header.set_slope_inter(1.0, 0.0)  # the values are stored as they are, not rescaled to the input's
    return gzip.compress(image.to_bytes(), compresslevel=6)


def write_reconstruction(result: Reconstruction, models: GenerationModels, out: Path) -> dict[str, str]:
    """The four image files; returns role → file name."""
    out = Path(out)
    input_volume = result.scan.volume[0]
    files = {"reconstruction": "reconstruction.nii.gz", "reconstruction_native": "reconstruction_native.nii.gz",
             "input": "input.nii.gz", "montage": "reconstruction.png"}
    write_nifti(result.volume, models.preset, out / files["reconstruction"])
    write_nifti(input_volume, models.preset, out / files["input"])
    atomic_write_bytes(out / files["reconstruction_native"], native_nifti_bytes(result.native, result.scan.path))
    difference = np.abs(result.volume - input_volume)
    plot_montage([[("preprocessed input", input_volume), ("reconstruction", result.volume),
                   ("|difference|", difference)]], out / files["montage"], [result.scan.path.name])
    return files


def export_reconstruction(scan: Path, run: Path, out: Path, *, decoder: Path | None = None,
                          device: str = "cpu") -> Path:
    """`braing3n reconstruct`: the files above in `out`; returns `reconstruct.json`'s path. Bad input (no
    decoder or encoder in the run, an unusable scan) raises `GenerationError` / `PreprocessingError`."""
    models = load_run_models(Path(run), decoder=decoder, need_dit=False, need_encoder=True, device=device)
    scan = Path(scan)
    result = reconstruct(models, scan)
    files = write_reconstruction(result, models, Path(out))
    record: dict[str, Any] = {
        "command": "reconstruct", "run": str(run), "models": model_hashes(models),
        "scan": {"path": str(scan), "sha256": file_sha256(scan), "shape": list(result.scan.original_shape),
                 "affine": result.scan.original_affine.tolist(),
                 "orientation": "".join(nib.aff2axcodes(result.scan.original_affine))},
        "preset": models.preset.name, "preprocessing_fingerprint": preprocessing_fingerprint(models.preset),
        "encoder_sha256": models.encoder_sha256,
        "metrics": result.metrics,
        "metrics_note": "on the preprocessed grid, the decoder stage's validation metrics (same names); *_brain "
                        "inside the non-zero voxels of the preprocessed input; PSNR/SSIM on the fixed z-score window",
        "intensity_units": INTENSITY_NOTE,
        "files": files, "seconds": result.seconds, "device": str(models.device),
    }
    path = Path(out) / "reconstruct.json"
    atomic_write_json(path, record)
    return path
