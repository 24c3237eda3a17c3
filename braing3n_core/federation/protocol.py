"""Server↔site message payloads: round parameters, declines, array payloads (typed payloads follow)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from braing3n_core.federation.arrays import Arrays
from braing3n_core.models import TokenMoments

# Train-config keys of the privacy protocols (server/privacy.py sets them, client/mods.py reads them).
CLIPPING_MODE_KEY = "client-dp-clipping"  # client-level DP with client-side clipping: "fixed" | "adaptive"


SECAGG_ARRAY_NAMES_KEY = "secagg-array-names"  # SecAgg+'s legacy Parameters have no names; JSON list


class SiteDeclined(RuntimeError):
    """A site cannot take part in this request (no usable scans, missing encoder…); the message says why."""


@dataclass(frozen=True)
class RoundParams:
    """The settings of one federated training round, as carried by the train message's ConfigRecord."""

    stage: str
    server_round: int
    local_steps: int
    batch_size: int
    lr: float
    weight_decay: float
    proximal_mu: float = 0.0
    seed: int = 0
    rounds: int = 0  # the stage's total rounds (a site calibrating DP noise to a target ε needs it)
    run: str = ""  # the run's name (recorded in a site's privacy ledger)

    def to_config(self) -> dict[str, Any]:
        return {"stage": self.stage, "server-round": self.server_round, "local-steps": self.local_steps,
                "batch-size": self.batch_size, "lr": self.lr, "weight-decay": self.weight_decay,
                "proximal-mu": self.proximal_mu, "seed": self.seed, "rounds": self.rounds, "run": self.run}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "RoundParams":
        try:
            return cls(
                stage=str(config["stage"]), server_round=int(config["server-round"]),
                local_steps=int(config["local-steps"]), batch_size=int(config["batch-size"]), lr=float(config["lr"]),
                weight_decay=float(config["weight-decay"]), proximal_mu=float(config.get("proximal-mu", 0.0)),
                seed=int(config.get("seed", 0)), rounds=int(config.get("rounds", 0)), run=str(config.get("run", "")),
            )
        except KeyError as error:
            raise ValueError(f"train message config lacks {error.args[0]!r}; has {sorted(config)}") from None


def moments_to_arrays(moments: TokenMoments) -> Arrays:
    return {"count": np.array([moments.count], dtype=np.float64), "total": moments.total.numpy(),
            "total_sq": moments.total_sq.numpy()}


def moments_from_arrays(arrays: Mapping[str, np.ndarray]) -> TokenMoments:
    total = torch.from_numpy(np.asarray(arrays["total"], dtype=np.float64))
    moments = TokenMoments(total.shape[0])
    moments.count = int(np.asarray(arrays["count"]).item())
    moments.total, moments.total_sq = total, torch.from_numpy(np.asarray(arrays["total_sq"], dtype=np.float64))
    return moments
