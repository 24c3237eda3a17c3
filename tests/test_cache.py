"""Content-addressed caches: hashing, atomic writes under concurrency, and cached preprocessing."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from braing3n_core.data import transforms
from braing3n_core.data.cache import ArrayCache, JsonCache
from braing3n_core.data.transforms import preprocess_scan, preprocessed_volume_key
from braing3n_core.fileio import file_sha256
from braing3n_core.presets import PRESETS

TINY = PRESETS["tiny"]


def test_file_sha256_matches_hashlib_and_follows_rewrites(tmp_path: Path) -> None:
    path = tmp_path / "scan.nii"
    path.write_bytes(b"first version")
    assert file_sha256(path) == hashlib.sha256(b"first version").hexdigest()

    path.write_bytes(b"second, longer version")  # new size and mtime: the memo must not answer
    assert file_sha256(path) == hashlib.sha256(b"second, longer version").hexdigest()


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int16, np.uint8, np.float64])
def test_array_round_trip_is_bit_exact(tmp_path: Path, dtype: type) -> None:
    cache = ArrayCache(tmp_path)
    array = (np.random.default_rng(0).standard_normal((1, 5, 6, 7)) * 50).astype(dtype)
    assert cache.get("vol-abc") is None and "vol-abc" not in cache

    cache.put("vol-abc", array)

    loaded = cache.get("vol-abc")
    assert loaded is not None and loaded.dtype == array.dtype and loaded.shape == array.shape
    assert loaded.tobytes() == array.tobytes()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_get_or_compute_computes_once(tmp_path: Path) -> None:
    cache = ArrayCache(tmp_path)
    calls = []

    def compute() -> np.ndarray:
        calls.append(1)
        return np.arange(10, dtype=np.float32)

    first = cache.get_or_compute("key-1", compute)
    second = ArrayCache(tmp_path).get_or_compute("key-1", compute)  # a new process would see the same

    assert len(calls) == 1 and np.array_equal(first, second)


def test_corrupt_entry_is_a_miss_and_is_recomputed(tmp_path: Path) -> None:
    cache = ArrayCache(tmp_path)
    cache.put("key-2", np.ones(4, np.float32))
    cache.path_for("key-2").write_bytes(b"\x93NUMPY garbage")

    assert cache.get("key-2") is None
    assert not cache.path_for("key-2").exists()
    assert np.array_equal(cache.get_or_compute("key-2", lambda: np.zeros(3, np.float32)), np.zeros(3))


@pytest.mark.parametrize("bad_key", ["", "../escape", "a/b", "x" * 300, ".hidden"])
def test_keys_that_are_not_plain_file_names_are_refused(tmp_path: Path, bad_key: str) -> None:
    with pytest.raises(ValueError, match="cache key"):
        ArrayCache(tmp_path).put(bad_key, np.zeros(1))


def test_json_cache_round_trip(tmp_path: Path) -> None:
    cache = JsonCache(tmp_path)
    record = {"problems": [{"reason": "all voxels are zero", "excluded": True}], "shape": [3, 4, 5]}
    cache.put("check-1", record)
    assert cache.get("check-1") == record and cache.get("check-2") is None


_HAMMER = """
import sys
import numpy as np
from braing3n_core.data.cache import ArrayCache

root, worker, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cache = ArrayCache(root)
shared = np.arange(200_000, dtype=np.float32)  # ~800 kB: a write takes long enough to interleave
for i in range(rounds):
    cache.put("shared-key", shared)
    cache.put(f"own-{worker}", np.full(50_000, worker * 1000 + i, np.float32))
    seen = cache.get("shared-key")
    if seen is None or not np.array_equal(seen, shared):
        print(f"worker {worker} round {i}: shared entry torn or missing")
    own = cache.get(f"own-{worker}")
    if own is None or own[0] != worker * 1000 + i:
        print(f"worker {worker} round {i}: own entry wrong")
"""


def test_concurrent_writers_never_expose_partial_entries(tmp_path: Path) -> None:
    """Four processes (as a site's trainer and its checker might be) write and read the same keys."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _HAMMER, str(tmp_path), str(worker), "40"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for worker in range(4)
    ]
    outputs = [w.communicate(timeout=120) for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0, 0], [err for _, err in outputs]
    assert "".join(out for out, _ in outputs) == ""
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_preprocess_scan_second_call_is_a_bit_exact_cache_hit(
    nibabel_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scan = tmp_path / "sub-01_T1w.nii"
    scan.write_bytes((nibabel_data_dir / "anatomical.nii").read_bytes())
    cache = ArrayCache(tmp_path / "cache")
    calls = []
    real_preprocess = transforms.preprocess_volume

    def counting_preprocess(path: Path, preset: object) -> np.ndarray:
        calls.append(path)
        return real_preprocess(path, preset)

    monkeypatch.setattr(transforms, "preprocess_volume", counting_preprocess)

    start = time.perf_counter()
    fresh = preprocess_scan(scan, TINY, cache)
    fresh_seconds = time.perf_counter() - start
    start = time.perf_counter()
    cached = preprocess_scan(scan, TINY, cache)
    cached_seconds = time.perf_counter() - start

    assert len(calls) == 1
    assert cached.dtype == np.float32 and cached.shape == (1, *TINY.shape)
    assert cached.tobytes() == fresh.tobytes()
    assert cached.tobytes() == real_preprocess(scan, TINY).tobytes()  # cached == recomputed, bit for bit
    assert cached_seconds < fresh_seconds
    assert cache.path_for(preprocessed_volume_key(scan, TINY)).is_file()


def test_cache_key_follows_content_and_preset_not_path(nibabel_data_dir: Path, tmp_path: Path) -> None:
    original = nibabel_data_dir / "anatomical.nii"
    renamed = tmp_path / "renamed.nii"
    renamed.write_bytes(original.read_bytes())
    assert preprocessed_volume_key(renamed, TINY) == preprocessed_volume_key(original, TINY)
    assert preprocessed_volume_key(renamed, TINY) != preprocessed_volume_key(renamed, PRESETS["small"])

    image = nib.load(original)
    edited = np.asarray(image.dataobj).copy()
    edited[10, 10, 10] += 1
    nib.save(nib.Nifti1Image(edited, image.affine, image.header), renamed)
    os.utime(renamed, ns=(time.time_ns(), time.time_ns() + 1))
    assert preprocessed_volume_key(renamed, TINY) != preprocessed_volume_key(original, TINY)


def test_preprocess_scan_without_cache_still_works(nibabel_data_dir: Path) -> None:
    volume = preprocess_scan(nibabel_data_dir / "anatomical.nii", TINY, None)
    assert volume.shape == (1, *TINY.shape)
