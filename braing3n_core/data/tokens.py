"""The embedding cache: each scan's frozen-encoder tokens, computed once and kept on the site's disk.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from braing3n_core.checkpoint import tensors_sha256
from braing3n_core.data.alignment import align_by_brain_mask
from braing3n_core.data.bids import ScanRecord
from braing3n_core.data.cache import ArrayCache
from braing3n_core.data.inspection import Problem
from braing3n_core.data.transforms import PreprocessingError, preprocess_scan, preprocessed_volume_key
from braing3n_core.fileio import file_sha256
from braing3n_core.models import MAEEncoder
from braing3n_core.presets import Preset
from braing3n_core.runtime import autocast


def encoder_sha256(encoder: MAEEncoder) -> str:
    """The identity of a frozen encoder: a hash of its weights (what the server verifies at each site)."""
    return tensors_sha256(encoder.state_dict())


@torch.no_grad()
def encode_volumes(encoder: MAEEncoder, volumes: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Preprocessed volumes [B, 1, D, H, W] → frozen-encoder tokens [B, N, E], float32 on the CPU.

    The one encoding call the token cache, `braing3n embed`, `reconstruct` and `forecast --scan` share
    (bf16 autocast on CUDA), so a scan's tokens are the same whichever command asks for them. `device`:
    the encoder's (default: where its weights are).
    """
    device = device if device is not None else next(encoder.parameters()).device
    with autocast(device):
        tokens, _ = encoder.encode(volumes.to(device))  # [B, N, E]
    return tokens.float().cpu()


class TokenCache:
    """Tokens `[N, E]` float32 per scan for one frozen encoder at one preset.

    `encoder` may also be a function that loads it, given with its `sha256`: it is then loaded only when a
    scan has no cached tokens yet, so a site whose tokens are cached (every round after its first) never
    holds the frozen encoder beside the network it trains (0.8 GB at `paper`)."""

    def __init__(
        self,
        root: Path,
        encoder: MAEEncoder | Callable[[], MAEEncoder],
        preset: Preset,
        volume_cache: ArrayCache | None,
        device: torch.device = torch.device("cpu"),
        batch_size: int = 4,
        sha256: str | None = None,
    ) -> None:
        if isinstance(encoder, MAEEncoder):
            self._encoder: MAEEncoder | None = encoder.eval().requires_grad_(False)
            self._load: Callable[[], MAEEncoder] | None = None
            self.encoder_sha256 = encoder_sha256(encoder)
        elif sha256 is None:
            raise ValueError("TokenCache: an encoder given as a loader needs its sha256")
        else:
            self._encoder, self._load, self.encoder_sha256 = None, encoder, sha256
        self.preset = preset
        self.volume_cache = volume_cache
        self.device = device
        self.batch_size = batch_size
        self.store = ArrayCache(Path(root) / f"tokens-{self.encoder_sha256[:16]}")
        self.failures: list[Problem] = []

    def __getstate__(self) -> dict:
        """A copy sent to a data-parallel worker only reads: the encoder (and its loader, which may not
        pickle) stays with the process that filled the cache (`ensure`) before the workers started, the
        only one that writes it."""
        return {**self.__dict__, "_encoder": None, "_load": None}

    @property
    def encoder(self) -> MAEEncoder:
        if self._encoder is None:
            if self._load is None:
                raise RuntimeError("this copy of the token cache only reads (a data-parallel worker's): it has no encoder")
            self._encoder = self._load().eval().requires_grad_(False)
        return self._encoder

    @property
    def encoder_loaded(self) -> bool:
        return self._encoder is not None

    def key(self, record: ScanRecord) -> str:
        return preprocessed_volume_key(record.path, self.preset)

    def get(self, record: ScanRecord) -> np.ndarray | None:
        return self.store.get(self.key(record))

    def tokens(self, record: ScanRecord) -> torch.Tensor:
        """[N, E] float32; computes (and caches) the entry when it is missing."""
        cached = self.get(record)
        if cached is None:
            self.ensure([record])
            cached = self.get(record)
        if cached is None:
            raise PreprocessingError(record.path, "no tokens: the scan could not be preprocessed")
        return torch.from_numpy(cached)

    def ensure(self, records: Sequence[ScanRecord], progress: bool | None = None) -> list[ScanRecord]:
        """Encode every record that has no cached tokens yet; returns the records that now have tokens.

        A scan that cannot be preprocessed is left out and recorded in `failures` (never fatal).
        """
        missing = [r for r in records if self.key(r) not in self.store]
        if missing and self._encoder is None and self._load is None:
            raise PreprocessingError(missing[0].path, "no cached tokens, and this read-only copy of the token cache "
                                     "(a data-parallel worker's) cannot encode; the cache changed during the round")
        show = sys.stderr.isatty() if progress is None else progress
        with Progress(transient=True, disable=not show or not missing) as bar:
            task = bar.add_task(f"encoding {len(missing)} scans", total=len(missing))
            for start in range(0, len(missing), self.batch_size):
                self._encode_batch(missing[start : start + self.batch_size])
                bar.advance(task, len(missing[start : start + self.batch_size]))
        failed = {p.path for p in self.failures}
        return [r for r in records if r.path not in failed and self.key(r) in self.store]

    def pair_key(self, record: ScanRecord, baseline: ScanRecord) -> str:
        return f"{self.key(record)}-on-{file_sha256(baseline.path)[:16]}"

    def pair_tokens(self, record: ScanRecord, baseline: ScanRecord) -> torch.Tensor:
        """[N, E] tokens of `record` moved onto `baseline`'s voxels first (`alignment.align_by_brain_mask`):
        a follow-up's tokens as a forecast from that baseline must produce them. Preprocessing crops each
        session to its own foreground, so without this a forecast's target would include an arbitrary
        voxel shift. Computed (one encode when the two are not already aligned) and cached on first use."""
        cached = self.store.get(self.pair_key(record, baseline))
        if cached is None:
            self.ensure_pairs([(record, baseline)])
            cached = self.store.get(self.pair_key(record, baseline))
        if cached is None:
            raise PreprocessingError(record.path, f"no tokens on the voxels of {baseline.path.name}: a scan could not be preprocessed")
        return torch.from_numpy(cached)

    def ensure_pairs(self, pairs: Sequence[tuple[ScanRecord, ScanRecord]]) -> None:
        """`pair_tokens` of every (record, baseline) not cached yet; a pair whose scans cannot be
        preprocessed is recorded in `failures` and left out (never fatal)."""
        for record, baseline in pairs:
            key = self.pair_key(record, baseline)
            if key in self.store:
                continue
            if self._encoder is None and self._load is None:
                raise PreprocessingError(record.path, "no cached pair tokens, and this read-only copy of the token "
                                         "cache (a data-parallel worker's) cannot encode")
            try:
                reference = preprocess_scan(baseline.path, self.preset, self.volume_cache)[0]
                moving = preprocess_scan(record.path, self.preset, self.volume_cache)
            except (PreprocessingError, OSError) as error:
                reason = error.reason if isinstance(error, PreprocessingError) else str(error)
                self.failures.append(Problem(record.path, f"no pair tokens, pair skipped: {reason}", True))
                continue
            aligned, shift = align_by_brain_mask(reference, moving[0])
            if shift == (0, 0, 0) and self.key(record) in self.store:
                value = self.store.get(self.key(record))
            else:
                value = encode_volumes(self.encoder, torch.from_numpy(np.ascontiguousarray(aligned))[None, None],
                                       self.device)[0].numpy()
            self.store.put(key, value)

    @torch.no_grad()
    def _encode_batch(self, records: Iterable[ScanRecord]) -> None:
        volumes, keys = [], []
        for record in records:
            try:
                volumes.append(torch.from_numpy(preprocess_scan(record.path, self.preset, self.volume_cache)))
                keys.append(self.key(record))
            except (PreprocessingError, OSError) as error:
                reason = error.reason if isinstance(error, PreprocessingError) else str(error)
                self.failures.append(Problem(record.path, f"not encoded, scan skipped: {reason}", True))
        if not volumes:
            return
        tokens = encode_volumes(self.encoder, torch.stack(volumes), self.device)  # [B, N, E]
        for key, value in zip(keys, tokens.numpy()):
            self.store.put(key, value)
