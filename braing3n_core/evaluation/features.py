"""Probe inputs from a site's scans: mean-pooled frozen-encoder tokens and the matching label table.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from braing3n_core.data.bids import ScanRecord
from braing3n_core.data.tokens import TokenCache
from braing3n_core.evaluation.probe_tasks import ProbeSample, ProbeTable


def pooled_features(cache: TokenCache, records: Sequence[ScanRecord]) -> np.ndarray:
    """[n, E] mean of each scan's tokens (the probe feature, spec §9); records must be `ensure`d."""
    return np.stack([cache.tokens(r).mean(dim=0).numpy() for r in records]) if records else np.zeros((0, 0))


def probe_table(records: Sequence[ScanRecord]) -> ProbeTable:
    return ProbeTable([
        ProbeSample.from_scan_labels(subject=r.subject, site_id=r.site_id, modality=r.modality, labels=r.labels,
                                     session=r.session)
        for r in records
    ])
