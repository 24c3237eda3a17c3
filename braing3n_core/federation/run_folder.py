"""The run folder: per-round checkpoints, the metrics ledger, server state, and resume.

```
<run-dir>/run.yaml                       resolved run configuration
<run-dir>/metrics.jsonl                  {"time","stage","round","site","kind", metric names…} per line
<run-dir>/messages.jsonl                 what crossed the wire: every message's record names, array keys/shapes, bytes
<run-dir>/checkpoints/<stage>/round-0007.{safetensors,json}   global weights (+ strategy state) after round 7
<run-dir>/checkpoints/<stage>/final.{safetensors,json}        the stage's last round, once the stage is done
<run-dir>/checkpoints/probes/round-0003.*                    probe heads (+ the task plan in the manifest)
<run-dir>/server_state.json              summary: completed round per stage, encoder hash, probes
<run-dir>/probes.json                    federated probe results, per site and pooled
<run-dir>/run_complete.json              written last: the run finished
```

A round checkpoint is the commit point of a round: its manifest is written last (checkpoint.py), so a
crash leaves either the whole round or none of it. Global weights are stored as `model.<name>` (the
format `train.load_stage_model` reads) and strategy state as `strategy.<name>`. On resume the
checkpoints are the truth: `server_state.json` is rewritten from them, and metrics lines of rounds that
never reached their checkpoint are dropped, so a resumed round is logged once.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from braing3n_core.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from braing3n_core.fileio import atomic_write_bytes, atomic_write_json

ROUND_PREFIX = "round-"


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _json_value(value.item())
    return value


@dataclass
class RoundCheckpoint:
    stage: str
    server_round: int
    model: dict[str, np.ndarray]
    strategy: dict[str, np.ndarray]
    meta: dict[str, Any]


class RunFolder:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    metrics_path = property(lambda self: self.root / "metrics.jsonl")
    messages_path = property(lambda self: self.root / "messages.jsonl")
    state_path = property(lambda self: self.root / "server_state.json")
    complete_path = property(lambda self: self.root / "run_complete.json")

    def stage_dir(self, stage: str) -> Path:
        return self.root / "checkpoints" / stage

    # --- ledgers --------------------------------------------------------------------------------------------

    def log(self, stage: str, server_round: int, site: str, kind: str, **values: Any) -> dict[str, Any]:
        record = {"time": time.time(), "stage": stage, "round": server_round, "site": site, "kind": kind,
                  **{k: _json_value(v) for k, v in values.items()}}
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        return record

    def log_message(self, entry: Mapping[str, Any]) -> None:
        with open(self.messages_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"time": time.time(), **entry}) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def prune_uncommitted(self, committed: Mapping[str, int]) -> int:
        """Drop ledger lines of rounds after each stage's last checkpoint (they will be run again)."""
        removed = 0
        for path in (self.metrics_path, self.messages_path):
            if not path.is_file():
                continue
            kept = []
            for line in path.read_text().splitlines():
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by the crash
                    removed += 1
                    continue
                limit, rnd = committed.get(record.get("stage")), record.get("round")
                if limit is not None and isinstance(rnd, int) and rnd > limit:
                    removed += 1
                    continue
                kept.append(line)
            atomic_write_bytes(path, ("\n".join(kept) + "\n").encode() if kept else b"")
        return removed

    # --- checkpoints --------------------------------------------------------------------------------------

    def save_round(self, checkpoint: RoundCheckpoint) -> Path:
        tensors = {f"model.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in checkpoint.model.items()}
        tensors |= {f"strategy.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in checkpoint.strategy.items()}
        meta = {**checkpoint.meta, "stage": checkpoint.stage, "round": checkpoint.server_round}
        return save_checkpoint(self.stage_dir(checkpoint.stage) / f"{ROUND_PREFIX}{checkpoint.server_round:04d}", tensors, meta)

    def latest_round(self, stage: str) -> RoundCheckpoint | None:
        path = latest_checkpoint(self.stage_dir(stage), ROUND_PREFIX)
        return None if path is None else self.read(load_checkpoint(path))

    @staticmethod
    def read(checkpoint: Checkpoint) -> RoundCheckpoint:
        model = {k: v.numpy() for k, v in checkpoint.sub_state_dict("model").items()}
        strategy = {k: v.numpy() for k, v in checkpoint.sub_state_dict("strategy").items()}
        return RoundCheckpoint(checkpoint.meta["stage"], int(checkpoint.meta["round"]), model, strategy, checkpoint.meta)

    def final_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / "final.json"

    def is_final(self, stage: str) -> bool:
        return self.final_path(stage).is_file()

    def mark_final(self, stage: str) -> Path:
        """Copy the stage's last round checkpoint to `final.*` (weights first, manifest last)."""
        last = latest_checkpoint(self.stage_dir(stage), ROUND_PREFIX)
        if last is None:
            raise FileNotFoundError(f"{self.stage_dir(stage)}: no round checkpoint to finalise")
        weights = last.with_suffix(".safetensors")
        target = self.stage_dir(stage) / "final.safetensors"
        temp = target.with_name(".final.safetensors.tmp")
        shutil.copyfile(weights, temp)
        temp.replace(target)
        manifest = json.loads(last.read_text())
        manifest["weights"] = target.name
        manifest["meta"] = {**manifest["meta"], "final": True, "from": last.name}
        atomic_write_json(self.final_path(stage), manifest)
        return self.final_path(stage)

    # --- summary --------------------------------------------------------------------------------------------

    def committed_rounds(self, stages: list[str]) -> dict[str, int]:
        out = {}
        for stage in stages:
            last = latest_checkpoint(self.stage_dir(stage), ROUND_PREFIX)
            out[stage] = int(json.loads(last.read_text())["meta"]["round"]) if last is not None else 0
        return out

    def write_state(self, state: Mapping[str, Any]) -> None:
        atomic_write_json(self.state_path, {**state, "updated": time.time()})

    def read_state(self) -> dict[str, Any]:
        return json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
