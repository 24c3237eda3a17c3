"""A site's scans as PyTorch data: subject-level splits, a volume dataset, and `load_site`.

`load_site` is the one entry point the trainers and the federated client use: it checks the site,
preprocesses every usable scan once (into the on-disk cache, so later runs only hash files), leaves out
and reports scans that fail, and splits subjects into train / val / test.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from braing3n_core.data.bids import ScanRecord
from braing3n_core.data.cache import ArrayCache
from braing3n_core.data.checks import SiteReport, check_site
from braing3n_core.data.inspection import Problem
from braing3n_core.data.transforms import PreprocessingError, augmentation_transform, preprocess_scan
from braing3n_core.labels import DIAGNOSES, MODALITIES, SEXES
from braing3n_core.presets import Preset
from braing3n_core.site_config import SiteConfig, SplitConfig

SPLITS: tuple[str, ...] = ("train", "val", "test")
log = logging.getLogger(__name__)


# --- splits ------------------------------------------------------------------------------------------


def split_subjects(records: Iterable[ScanRecord], split: SplitConfig) -> dict[str, list[ScanRecord]]:
    """Assign whole subjects (every session and modality together) to train / val / test.

    Subjects are ordered by a seeded hash of (site, subject) and cut at the configured fractions
    (largest-remainder rounding; every split with a positive fraction gets a subject when there are
    enough). The order of a subject never depends on the others, so adding or removing subjects only
    moves subjects next to a cut, and then only into the neighbouring split; a plain shuffle would
    reassign everyone and leak former test subjects into training.
    """
    records = list(records)
    subjects = sorted({(r.site_id, r.subject) for r in records}, key=lambda s: _subject_rank(split.seed, *s))
    counts = _split_counts(len(subjects), (split.train, split.val, split.test))
    assignment: dict[tuple[str, str], str] = {}
    start = 0
    for name, count in zip(SPLITS, counts):
        for subject in subjects[start : start + count]:
            assignment[subject] = name
        start += count
    result: dict[str, list[ScanRecord]] = {name: [] for name in SPLITS}
    for record in sorted(records, key=lambda r: (r.site_id, r.key)):
        result[assignment[(record.site_id, record.subject)]].append(record)
    return result


def _subject_rank(seed: int, site_id: str, subject: str) -> str:
    return hashlib.sha256(f"{seed}/{site_id}/{subject}".encode()).hexdigest()


def _split_counts(n: int, fractions: tuple[float, float, float]) -> list[int]:
    raw = [n * f for f in fractions]
    counts = [math.floor(x) for x in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    wanted = [i for i, f in enumerate(fractions) if f > 0]
    if n >= len(wanted):
        for i in wanted:
            if counts[i] == 0:
                donor = max(range(len(counts)), key=lambda j: counts[j])
                counts[donor] -= 1
                counts[i] += 1
    return counts


# --- labels as tensors -------------------------------------------------------------------------------


def labels_to_tensors(records: Iterable[ScanRecord]) -> dict[str, torch.Tensor]:
    """Labels of `records` as `[N]` tensors for probes and conditioning.

    Missing values: NaN for the float labels (age, mmse, field_strength), -1 for the categorical ones
    (sex → index in labels.SEXES, diagnosis → index in labels.DIAGNOSES); modality is never missing
    (index in labels.MODALITIES).
    """
    records = list(records)

    def floats(name: str) -> torch.Tensor:
        values = [getattr(r.labels, name) for r in records]
        return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)

    def categories(name: str, vocabulary: tuple[str, ...]) -> torch.Tensor:
        values = [getattr(r.labels, name) for r in records]
        return torch.tensor([-1 if v is None else vocabulary.index(v) for v in values], dtype=torch.long)

    return {
        "age": floats("age"),
        "sex": categories("sex", SEXES),
        "diagnosis": categories("diagnosis", DIAGNOSES),
        "mmse": floats("mmse"),
        "field_strength": floats("field_strength"),
        "modality": torch.tensor([MODALITIES.index(r.modality) for r in records], dtype=torch.long),
    }


# --- dataset -----------------------------------------------------------------------------------------


class VolumeDataset(Dataset):
    """Preprocessed volumes of `records`: `{"volume": [1, D, H, W] float32, "index": int}`.

    Labels stay out of the sample (so default collation works) and are found through
    `dataset.records[sample["index"]]` or `labels_to_tensors(dataset.records)`.

    A scan that fails to preprocess here (it changed on disk since `load_site`, or the cache was
    cleared) does not end the epoch: it is logged, recorded in `failures` and replaced by the next
    scan that works; the returned `index` is that scan's, so labels still match the volume.
    """

    def __init__(
        self, records: Iterable[ScanRecord], preset: Preset, cache: ArrayCache | None, augment: bool = False
    ) -> None:
        self.records = list(records)
        self.preset = preset
        self.cache = cache
        self.augment = augment
        self.failures: list[Problem] = []
        self._failed: set[int] = set()
        self._augmentation = augmentation_transform() if augment else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} out of range for {len(self.records)} scans")
        for offset in range(len(self.records)):
            candidate = (index + offset) % len(self.records)
            if candidate in self._failed:
                continue
            volume = self._load(candidate)
            if volume is not None:
                return {"volume": volume, "index": candidate}
        raise RuntimeError(
            f"none of the {len(self.records)} scans of this dataset can be preprocessed: {self.failures}"
        )

    def _load(self, index: int) -> torch.Tensor | None:
        record = self.records[index]
        try:
            array = preprocess_scan(record.path, self.preset, self.cache)  # 1, D, H, W
        except (PreprocessingError, OSError) as error:
            self._failed.add(index)
            problem = Problem(
                record.path, f"preprocessing failed during training, scan skipped: {_reason(error)}", True
            )
            self.failures.append(problem)
            log.warning("%s", problem)
            return None
        volume = torch.from_numpy(np.ascontiguousarray(array))
        if self._augmentation is not None:
            # Seeded from torch's generator, which DataLoader seeds per worker and per epoch; MONAI's
            # own NumPy state would repeat the same augmentations in every worker.
            self._augmentation.set_random_state(seed=int(torch.randint(0, 2**31 - 1, ()).item()))
            volume = self._augmentation(volume)
        return _plain_tensor(volume).to(torch.float32).contiguous()


def _reason(error: Exception) -> str:
    return error.reason if isinstance(error, PreprocessingError) else f"{type(error).__name__}: {error}"


def _plain_tensor(volume: torch.Tensor) -> torch.Tensor:
    """MONAI returns MetaTensors; samples carry plain tensors so batches collate without metadata."""
    as_tensor = getattr(volume, "as_tensor", None)
    return as_tensor() if callable(as_tensor) else volume


# --- one site -----------------------------------------------------------------------------------------


@dataclass
class SiteData:
    """Everything a trainer needs from one site."""

    config: SiteConfig
    preset: Preset
    report: SiteReport
    records: list[ScanRecord]  # usable after checks and preprocessing
    problems: list[Problem]  # the check's problems plus preprocessing failures
    splits: dict[str, list[ScanRecord]]
    cache: ArrayCache | None

    def dataset(self, split: str, augment: bool | None = None) -> VolumeDataset:
        """The split's volumes; augmentation defaults to on for train, off otherwise."""
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; choose one of {list(self.splits)}")
        return VolumeDataset(
            self.splits[split], self.preset, self.cache, augment=split == "train" if augment is None else augment
        )


def load_site(config: SiteConfig, preset: Preset, prepare: bool = True, progress: bool | None = None) -> SiteData:
    """Check a site, preprocess its usable scans into the cache, and split its subjects.

    With `prepare=True` every usable scan is preprocessed now (a cache hit after the first run), and
    one that fails is excluded with a problem naming the file, before any split is drawn, so an epoch
    never meets it. Splits are drawn over every subject the site names, usable or not, so fixing or
    breaking one file never moves other subjects between splits.
    """
    report = check_site(config, progress=progress)
    problems = list(report.problems)
    records = list(report.usable_scans)
    cache = _open_volume_cache(config, problems) if records else None
    if prepare:
        records = _prepare(records, preset, cache, problems, sys.stderr.isatty() if progress is None else progress)
    usable = {r.path for r in records}
    splits = {
        name: [r for r in split_records if r.path in usable]
        for name, split_records in split_subjects(report.all_scans, config.split).items()
    }
    return SiteData(config, preset, report, records, problems, splits, cache)


def _open_volume_cache(config: SiteConfig, problems: list[Problem]) -> ArrayCache | None:
    root = config.resolved_cache_dir / "volumes"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        problems.append(
            Problem(root, f"cache folder not writable ({error}); volumes are preprocessed every time", False)
        )
        return None
    return ArrayCache(root)


def _prepare(
    records: list[ScanRecord], preset: Preset, cache: ArrayCache | None, problems: list[Problem], show: bool
) -> list[ScanRecord]:
    if cache is None:
        return records  # nothing to keep the result in: preprocessing happens (and can fail) per sample
    iterable: Iterable[ScanRecord] = records
    if show and records:
        from rich.progress import track

        iterable = track(records, description=f"preprocessing ({preset.name})", transient=True)
    prepared: list[ScanRecord] = []
    for record in iterable:
        try:
            preprocess_scan(record.path, preset, cache)
        except (PreprocessingError, OSError) as error:
            problems.append(Problem(record.path, f"preprocessing failed, scan excluded: {_reason(error)}", True))
            continue
        prepared.append(record)
    return prepared
