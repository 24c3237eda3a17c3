"""What one training example of a stage is: tokens + volume (decoder), tokens + conditions and an
optional longitudinal baseline (DiT), read from a site's data and token cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset

from braing3n_core.data.bids import ScanRecord
from braing3n_core.data.datasets import SiteData
from braing3n_core.data.tokens import TokenCache
from braing3n_core.data.transforms import preprocess_scan
from braing3n_core.models import ChangeTrendSums, TokenMoments
from braing3n_core.models.conditions import ConditionBatch, conditions_from_labels

Batch = dict[str, Tensor]


@dataclass(frozen=True)
class SiteInputs:
    """What one site contributes to a stage: its data, and (after stage 1) its token cache."""

    data: SiteData
    tokens: TokenCache | None = None


class TokenVolumeDataset(Dataset):
    """Decoder examples: `{"tokens": [N, E], "volume": [1, D, H, W]}` from the two caches."""

    def __init__(self, site: SiteInputs, records: Sequence[ScanRecord]) -> None:
        if site.tokens is None:
            raise ValueError("the decoder stage needs a token cache (a frozen encoder)")
        self.tokens, self.data = site.tokens, site.data
        self.records = list(site.tokens.ensure(records))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Batch:
        record = self.records[index]
        volume = preprocess_scan(record.path, self.data.preset, self.data.cache)
        return {"tokens": self.tokens.tokens(record), "volume": torch.from_numpy(volume)}


class TokenConditionDataset(Dataset):
    """DiT examples: every scan cross-sectionally, plus every (earlier → later) pair of sessions of one
    subject and modality for longitudinal forecasting.

    `{"tokens": [N, E], "baseline": [N, E] (NaN when none), "interval": [] years (NaN when none),
    and one [] tensor per conditioning variable}`. The conditions are the follow-up scan's own; a pair's
    target tokens are the follow-up's on the baseline's voxels (`TokenCache.pair_tokens`).
    """

    def __init__(self, site: SiteInputs, records: Sequence[ScanRecord]) -> None:
        if site.tokens is None:
            raise ValueError("the DiT stage needs a token cache (a frozen encoder)")
        self.tokens = site.tokens
        self.records = list(site.tokens.ensure(records))
        pairs = longitudinal_pairs(self.records)
        self.tokens.ensure_pairs([(self.records[later], self.records[earlier]) for later, earlier in pairs])
        self.pairs = [(later, earlier) for later, earlier in pairs
                      if self.tokens.pair_key(self.records[later], self.records[earlier]) in self.tokens.store]
        self.examples: list[tuple[int, int | None]] = [(i, None) for i in range(len(self.records))] + self.pairs
        self.conditions = conditions_from_labels([r.labels for r in self.records], [r.modality for r in self.records])
        self._num_tokens = site.data.preset.num_tokens

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Batch:
        target, baseline = self.examples[index]
        if baseline is None:
            tokens = self.tokens.tokens(self.records[target])
            item = {"tokens": tokens, "baseline": torch.full_like(tokens, math.nan), "interval": torch.tensor(math.nan)}
        else:  # the follow-up on the baseline's voxels: the forecast is made in the baseline's space
            item = {"tokens": self.tokens.pair_tokens(self.records[target], self.records[baseline])}
            item["baseline"] = self.tokens.tokens(self.records[baseline])
            item["interval"] = torch.tensor(self.records[target].labels.age - self.records[baseline].labels.age)
        for name, values in self.conditions.tensors().items():
            item[name] = values[target]
        return item


def longitudinal_pairs(records: Sequence[ScanRecord]) -> list[tuple[int, int]]:
    """(follow-up index, baseline index) for each pair of sessions of one subject and modality whose
    ages are known and increase."""
    by_subject: dict[tuple[str, str, str], list[int]] = {}
    for index, record in enumerate(records):
        if record.session is not None and record.labels.age is not None:
            by_subject.setdefault((record.site_id, record.subject, record.modality.value), []).append(index)
    pairs = []
    for indices in by_subject.values():
        indices.sort(key=lambda i: records[i].labels.age)
        for later_position, later in enumerate(indices):
            for earlier in indices[:later_position]:
                if records[later].labels.age > records[earlier].labels.age:
                    pairs.append((later, earlier))
    return sorted(pairs)


def condition_batch(batch: Batch) -> ConditionBatch:
    return ConditionBatch(**{f.name: batch[f.name] for f in fields(ConditionBatch)})


def token_moments(dataset: Dataset, token_dim: int) -> TokenMoments:
    """Per-channel token sums over a DiT dataset's cross-sectional examples (each scan once)."""
    moments = TokenMoments(token_dim)
    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    for part in parts:
        for record in part.records:
            moments.add(part.tokens.tokens(record))
    return moments


def change_trend_sums(dataset: Dataset, num_tokens: int, token_dim: int) -> ChangeTrendSums:
    """The trend sums over a DiT dataset's longitudinal pairs, each in the cell of the conditions it trains
    with (the follow-up's modality and diagnosis); the change is the follow-up on the baseline's voxels
    less the baseline, in raw encoder tokens."""
    sums = ChangeTrendSums(num_tokens, token_dim)
    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    for part in parts:
        for later, earlier in part.pairs:
            follow_up, baseline = part.records[later], part.records[earlier]
            change = part.tokens.pair_tokens(follow_up, baseline) - part.tokens.tokens(baseline)  # [N, E]
            sums.add(int(part.conditions.modality[later]), int(part.conditions.diagnosis[later]), change,
                     follow_up.labels.age - baseline.labels.age, follow_up.subject)
    return sums
