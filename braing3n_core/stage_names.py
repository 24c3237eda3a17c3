"""The names of the training stages, in training order: the one registry every layer spells them from.

`training.stages.STAGES` holds what each stage *is* (network, examples, loss); it checks at import that
it describes exactly these names. Configs validate against `StageName`, run folders and messages use the
constants, so a misspelt stage is an error where it is written, not a silent mismatch.
"""

from __future__ import annotations

import typing
from typing import Literal

StageName = Literal["mae", "decoder", "dit"]
STAGE_NAMES: tuple[StageName, ...] = typing.get_args(StageName)
MAE, DECODER, DIT = STAGE_NAMES
PROBES = "probes"  # the federated linear probes: checkpointed and resumed like a stage, but train no network
FederatedStep = Literal["mae", "decoder", "dit", "probes"]  # what a federated round (or a fault drill) names


def check_stage_name(name: str) -> StageName:
    if name not in STAGE_NAMES:
        raise ValueError(f"unknown stage {name!r}; choose one of {list(STAGE_NAMES)}")
    return typing.cast(StageName, name)
