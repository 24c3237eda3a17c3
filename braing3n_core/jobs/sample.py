"""`braing3n sample`: generate scans from a finished run under asked conditions; NIfTI, montage and a record.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from braing3n_core.fileio import atomic_write_json
from braing3n_core.generation.condition_table import ConditionRow
from braing3n_core.generation.models import load_run_models, model_hashes
from braing3n_core.generation.output import write_samples
from braing3n_core.generation.sampling import DEFAULT_BATCH_SIZE, generate, sampling_progress
from braing3n_core.models.diffusion import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS


def export_samples(source: Path, rows: Sequence[ConditionRow], out: Path, *, decoder: Path | None = None,
                   conditions_file: Path | None = None, steps: int = DEFAULT_STEPS,
                   guidance_scale: float = DEFAULT_GUIDANCE_SCALE, seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE,
                   device: str = "cpu") -> Path:
    """`braing3n sample`: NIfTI per row, `samples.png` and `sample.json` (what was asked, the models,
    the settings and the sampling time per volume) in `out`; returns the JSON's path."""
    models = load_run_models(source, decoder=decoder, device=device)
    with sampling_progress("sampling", len(rows)) as progress:
        samples = generate(models, rows, steps=steps, guidance_scale=guidance_scale, seed=seed, batch_size=batch_size,
                           progress=progress)
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
