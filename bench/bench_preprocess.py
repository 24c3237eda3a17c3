"""Preprocessing throughput at the `small` and `paper` presets, and the cache-hit speed-up.

Inputs are site-like scans made from nilearn's 1 mm ICBM152 template (197×233×189): stored RAS, LAS
and at an anisotropic 1.2×1.2×1.5 mm voxel size, each twice with different intensity scales so that
every file has its own content hash. Each input is preprocessed from its file (no cache) to measure
volumes/s; then the paper preset runs through an `ArrayCache` twice, the file-hash memo cleared in
between, as a second process would start: miss (preprocess + write) against hit (hash + read).

Prints one summary line; writes bench/results/preprocess.json.

    python bench/bench_preprocess.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import load_average, machine_info
from braing3n_core.data import cache as cache_module
from braing3n_core.data.cache import ArrayCache
from braing3n_core.data.transforms import preprocess_scan, preprocess_volume
from braing3n_core.fileio import atomic_write_bytes
from braing3n_core.presets import PRESETS

RESULTS = Path(__file__).resolve().parent / "results" / "preprocess.json"


def make_inputs(folder: Path) -> list[Path]:
    from nilearn import datasets, image

    template = datasets.load_mni152_template(resolution=1)  # 197×233×189, 1 mm, RAS
    ras = nib.Nifti1Image(np.asarray(template.dataobj, np.float32), template.affine)
    las = ras.as_reoriented(
        nib.orientations.ornt_transform(
            nib.orientations.io_orientation(ras.affine), nib.orientations.axcodes2ornt(("L", "A", "S"))
        )
    )
    anisotropic = image.resample_img(
        ras, target_affine=np.diag([1.2, 1.2, 1.5]), interpolation="continuous", force_resample=True, copy_header=True
    )
    paths = []
    for name, variant in (("ras", ras), ("las", las), ("aniso", anisotropic)):
        for scale in (1000.0, 1700.0):  # scanner-like units; distinct content per file
            path = folder / f"sub-{name}{int(scale)}_T1w.nii.gz"
            nib.save(nib.Nifti1Image(np.asarray(variant.dataobj, np.float32) * scale, variant.affine), path)
            paths.append(path)
    return paths


def time_fresh(paths: list[Path], preset_name: str, repeats: int) -> float:
    """Seconds per volume, preprocessing from the file every time."""
    preset = PRESETS[preset_name]
    preprocess_volume(paths[0], preset)  # warm-up: imports, allocator, thread pool
    start = time.perf_counter()
    for _ in range(repeats):
        for path in paths:
            preprocess_volume(path, preset)
    return (time.perf_counter() - start) / (repeats * len(paths))


def time_cache(paths: list[Path], preset_name: str, root: Path) -> tuple[float, float]:
    """(miss, hit) seconds per volume through an ArrayCache, as two separate runs would see them."""
    preset = PRESETS[preset_name]
    cache = ArrayCache(root)
    cache_module._sha256_of_file.cache_clear()
    start = time.perf_counter()
    fresh = [preprocess_scan(p, preset, cache) for p in paths]
    miss = (time.perf_counter() - start) / len(paths)
    cache_module._sha256_of_file.cache_clear()  # a new process has no memo: it hashes every file
    start = time.perf_counter()
    cached = [preprocess_scan(p, preset, cache) for p in paths]
    hit = (time.perf_counter() - start) / len(paths)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(fresh, cached)), "cache returned different volumes"
    return miss, hit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="passes over the inputs per preset")
    args = parser.parse_args()
    load_before = load_average()

    with tempfile.TemporaryDirectory() as folder:
        paths = make_inputs(Path(folder))
        per_volume = {name: time_fresh(paths, name, args.repeats) for name in ("small", "paper")}
        miss, hit = time_cache(paths, "paper", Path(folder) / "cache")

    result = {
        "machine": machine_info(load_before),
        "inputs": {"count": len(paths), "source": "nilearn ICBM152 1 mm; RAS, LAS, 1.2x1.2x1.5 mm; float32 .nii.gz"},
        "presets": {
            name: {
                "shape": list(PRESETS[name].shape),
                "spacing_mm": PRESETS[name].spacing_mm,
                "seconds_per_volume": round(seconds, 4),
                "volumes_per_s": round(1.0 / seconds, 3),
            }
            for name, seconds in per_volume.items()
        },
        "cache": {
            "preset": "paper",
            "miss_seconds_per_volume": round(miss, 4),
            "hit_seconds_per_volume": round(hit, 4),
            "hit_speedup": round(miss / hit, 1),
        },
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    atomic_write_bytes(RESULTS, (json.dumps(result, indent=2) + "\n").encode())
    print(
        f"preprocess: small {result['presets']['small']['volumes_per_s']:.2f} vol/s, "
        f"paper {result['presets']['paper']['volumes_per_s']:.2f} vol/s, "
        f"cache hit {result['cache']['hit_speedup']:.0f}x faster than a miss (paper); "
        f"{os.cpu_count()} CPUs, peak RSS {result['peak_rss_mib']:.0f} MiB -> {RESULTS}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
