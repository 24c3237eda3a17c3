"""Generated volumes as files: NIfTI on the preset's LPS grid and mid-slice montage PNGs.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np

from braing3n_core.data.bids import ScanRecord
from braing3n_core.figures import plot_montage
from braing3n_core.fileio import atomic_write_bytes
from braing3n_core.generation.forecasting import ForecastResult
from braing3n_core.generation.sampling import GeneratedSamples
from braing3n_core.labels import Modality
from braing3n_core.presets import Preset


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
    folder = Path(folder)
    paths = [write_nifti(volume[0].numpy(), preset, folder / f"sample-{i + 1:04d}.nii.gz")
             for i, volume in enumerate(samples.volumes)]
    cells = [(f"{i + 1}: {row.describe()}", samples.volumes[i, 0].numpy())
             for i, row in enumerate(samples.rows[:montage_limit])]
    image = plot_montage([cells[i : i + per_row] for i in range(0, len(cells), per_row)],
                         montage if montage is not None else folder / "samples.png")
    return paths, image


def write_forecast(result: ForecastResult, preset: Preset, nifti: Path, montage: Path) -> tuple[Path, Path]:
    """The forecast as NIfTI — the residual forecast, the default since it beat the direct decode on
    held-out subjects (README, `bench/results/generation.json`); the direct decode goes beside it as
    `<name>-direct.nii.gz` — and a montage: baseline | forecast | real follow-up (when there is one) |
    forecast − baseline."""
    base, follow = result.baseline, result.follow_up
    volume = result.residual_volume if result.residual_volume is not None else result.volume
    age = f"{base.labels.age:.1f} y" if base.labels.age is not None else "age not recorded"
    cells = [(f"baseline, {age}", result.baseline_volume), (f"forecast, +{result.interval_years:.1f} y", volume)]
    if follow is not None and result.follow_up_volume is not None:
        cells.append((f"real follow-up, {follow.labels.age:.1f} y", result.follow_up_volume))
    cells.append(("forecast − baseline", volume - result.baseline_volume))
    label = f"{base.site_id} {base.subject} {Modality(base.modality).short}"
    nifti = Path(nifti)
    write_nifti(result.volume, preset, nifti.with_name(nifti.name.replace(".nii.gz", "-direct.nii.gz")))
    return write_nifti(volume, preset, nifti), plot_montage([cells], Path(montage), [label])


def _scan(record: ScanRecord | None) -> dict[str, Any] | None:
    if record is None:
        return None
    return {"subject": record.subject, "session": record.session, "modality": Modality(record.modality).value,
            "age": record.labels.age, "path": str(record.path)}
