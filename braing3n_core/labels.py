"""The label vocabulary shared by the cohort generator, the data layer, the probes and the DiT.

One place defines what a modality, a diagnosis or a sex is called, so that a value written to a BIDS
file by the generator is the value the loader parses and the DiT conditions on.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Modality(str, Enum):
    """MR sequences, named by their BIDS file-name ending (entities before the suffix included)."""

    T1W = "T1w"
    T1C = "ce-gadolinium_T1w"  # post-gadolinium T1w: BIDS entity `ce-gadolinium` + suffix `T1w`
    T2W = "T2w"
    FLAIR = "FLAIR"

    @property
    def short(self) -> str:
        return {"T1w": "T1", "ce-gadolinium_T1w": "T1c", "T2w": "T2", "FLAIR": "FLAIR"}[self.value]


MODALITIES: tuple[Modality, ...] = tuple(Modality)

DIAGNOSES: tuple[str, ...] = ("CN", "MCI", "AD", "glioma")
"""Cognitively normal, mild cognitive impairment, Alzheimer's disease, glioma."""

SEXES: tuple[str, ...] = ("F", "M")

FIELD_STRENGTHS_T: tuple[float, ...] = (1.5, 3.0)

AGE_RANGE_YEARS: tuple[float, float] = (0.0, 110.0)
"""Ages outside this range are implausible and reported by `site check`."""

MMSE_RANGE: tuple[float, float] = (0.0, 30.0)


@dataclass(frozen=True)
class ScanLabels:
    """What is known about one scan; `None` means not recorded (never a sentinel number)."""

    age: float | None = None  # years at this session
    sex: str | None = None  # one of SEXES
    diagnosis: str | None = None  # one of DIAGNOSES, at this session
    mmse: float | None = None  # Mini-Mental State Examination, 0–30, at this session
    field_strength: float | None = None  # tesla, from the JSON sidecar's MagneticFieldStrength
