"""Content-addressed on-disk caches: preprocessed volumes now, encoder tokens later.

A cache entry is named by what determines its content (the input file's sha256 plus a fingerprint of
the computation), never by the input's path, so renaming a scan keeps its entry and editing a scan or a
preprocessing setting can never serve a stale one. Entries are written to a temporary file in the
target folder and moved into place with `os.replace`, which is atomic on POSIX and Windows: a reader
sees either no entry or a whole one, concurrent writers of the same key simply race to write identical
bytes, and a crash mid-write leaves only a stray temporary file that is never read.

Layout: `<root>/<key[:2]>/<key>.npy` (arrays) and `<root>/<key[:2]>/<key>.json` (small records); the
two-character fan-out keeps folders small on sites with tens of thousands of scans.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from braing3n_core.fileio import atomic_write_bytes

_KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,199}$")


def _check_key(key: str) -> str:
    if not _KEY_PATTERN.match(key):
        raise ValueError(
            f"cache key {key!r} must be 2-200 characters of letters, digits, '.', '_' or '-' (it names a file)"
        )
    return key


class _FileStore:
    """Shared layout and atomic writes for the array and record caches."""

    suffix = ""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path_for(self, key: str) -> Path:
        _check_key(key)
        return self.root / key[:2] / f"{key}{self.suffix}"

    def __contains__(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def _discard_unreadable(self, path: Path) -> None:
        # Only disk corruption or a foreign file can make a whole entry unreadable; recompute it.
        path.unlink(missing_ok=True)


class ArrayCache(_FileStore):
    """numpy arrays stored as `.npy` (no pickling), bit-exact round trip."""

    suffix = ".npy"

    def get(self, key: str) -> np.ndarray | None:
        path = self.path_for(key)
        try:
            return np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (ValueError, OSError, EOFError):
            self._discard_unreadable(path)
            return None

    def put(self, key: str, array: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
        atomic_write_bytes(self.path_for(key), buffer.getvalue())

    def get_or_compute(self, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        cached = self.get(key)
        if cached is not None:
            return cached
        array = compute()
        self.put(key, array)
        return array


class JsonCache(_FileStore):
    """Small JSON records (e.g. the result of checking one image), same layout and guarantees."""

    suffix = ".json"

    def get(self, key: str) -> Any | None:
        path = self.path_for(key)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            self._discard_unreadable(path)
            return None

    def put(self, key: str, record: Any) -> None:
        atomic_write_bytes(self.path_for(key), json.dumps(record, sort_keys=True).encode("utf-8"))

    def get_or_compute(self, key: str, compute: Callable[[], Any]) -> Any:
        cached = self.get(key)
        if cached is not None:
            return cached
        record = compute()
        self.put(key, record)
        return record
