"""Fault drills a run config may ask of one site (`fault_injection`: tests and rehearsals only).

Kept out of the production handlers: `client.app` calls `before_handler` once per message and
`corrupt_reply` on a train reply's arrays; a message without a `FaultDrill` for this site passes both
untouched.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from braing3n_core.federation.protocol import FaultDrill, SiteDeclined


def before_handler(config: Mapping[str, object], site_id: str) -> None:
    """decline / crash / delay: refuse, fail, or answer `fault-factor` seconds late."""
    drill = FaultDrill.from_config(config)
    if not drill.applies_to(site_id):
        return
    if drill.fault == "decline":
        raise SiteDeclined(f"site {site_id}: declines this round (fault injection)")
    if drill.fault == "crash":
        raise RuntimeError(f"site {site_id}: handler crashed (fault injection)")
    if drill.fault == "delay":
        time.sleep(drill.fault_factor)


def worker_to_kill(config: Mapping[str, object], site_id: str) -> int | None:
    """worker_crash: the rank of the data-parallel worker that dies this round (the training core kills it)."""
    drill = FaultDrill.from_config(config)
    return 1 if drill.applies_to(site_id) and drill.fault == "worker_crash" else None


def corrupt_reply(arrays: dict[str, np.ndarray], reference: Mapping[str, np.ndarray], config: Mapping[str, object],
                  site_id: str) -> dict[str, np.ndarray]:
    """nan / scale: the reply a broken or malicious site would send."""
    drill = FaultDrill.from_config(config)
    if not drill.applies_to(site_id):
        return arrays
    if drill.fault == "nan":
        first = next(iter(arrays))
        arrays[first] = np.full_like(arrays[first], np.nan)
    elif drill.fault == "scale":
        arrays = {k: (reference[k] + drill.fault_factor * (v - reference[k])).astype(v.dtype) for k, v in arrays.items()}
    return arrays
