"""Crash-safe file writing and content hashing, shared by every cache, checkpoint and ledger.

A write goes to a temporary file in the target folder, is fsynced, and is moved into place with
`os.replace`, which is atomic on POSIX and Windows: a reader sees the old file or the new one, never a
partial one, and a crash mid-write leaves only a stray temporary file that nothing reads.

Append-only ledgers (the privacy ledger, the approval log) add one line at a time instead: one `os.write`
on an `O_APPEND` descriptor, then `fsync` (`append_line`), under an exclusive `flock` (`exclusive_lock`) so
two processes serving one site serialise. A crash can then only cut the last line short, which each
ledger's reader detects (no newline at its end) and repairs by rewriting the intact prefix atomically.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

try:  # POSIX; hospitals' nodes run Linux. Without fcntl the ledgers still work, unlocked.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_HASH_CHUNK_BYTES = 1 << 20


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, memoised per (path, size, mtime_ns) so a second look is free.

    A file rewritten in place changes its size or mtime, which misses the memo and is hashed again.
    """
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _sha256_of_file(str(resolved), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=65536)
def _sha256_of_file(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # part of the memo key only
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that no reader ever sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def append_line(path: Path, line: bytes) -> None:
    """Append one complete line (ending in a newline) to `path` and make it durable before returning."""
    if not line.endswith(b"\n"):
        raise ValueError("append_line writes whole lines: end it with a newline")
    created = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        view = memoryview(line)
        while view:  # one write in practice; a loop so a short write never drops bytes silently
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:  # make the new directory entry itself durable
        fsync_directory(path.parent)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `<path>.lock` (a sibling file: the ledger itself may be replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+b") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def json_safe(value: Any) -> Any:
    """A value JSON can hold: NaN/inf → None (JSON has neither), tuples → lists, numpy scalars → Python,
    mapping keys → str; recursive."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line of an append-only ledger. A last line cut by a crash is skipped; a bad line
    before it raises ValueError naming the file and line (the ledger was edited or corrupted)."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for number, line in enumerate(lines, 1):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                continue
            raise ValueError(f"{path}: line {number} is not valid JSON ({error})") from None
    return out
