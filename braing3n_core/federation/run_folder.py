"""The run folder: the one module that knows every path in it, and its crash-safe ledgers.

```
<run-dir>/run.yaml                       resolved run configuration (pinned: a resumed run keeps its recipe)
<run-dir>/metrics.jsonl                  {"time","stage","round","site","kind", metric names…} per line
<run-dir>/messages.jsonl                 what crossed the wire: every message's record names, array keys/shapes, bytes
<run-dir>/checkpoints/<stage>/round-0007.{safetensors,json}   global weights (+ strategy state) after round 7
<run-dir>/checkpoints/<stage>/final.{safetensors,json}        the stage's last round, once the stage is done
<run-dir>/checkpoints/<stage>/step-000400.*                   a centralized run's checkpoints (`braing3n train`)
<run-dir>/checkpoints/probes/round-0003.*                    probe heads (+ the task plan in the manifest)
<run-dir>/server_state.json              summary: completed round per stage, encoder hash, probes
<run-dir>/probes.json                    federated probe results, per site and pooled
<run-dir>/privacy_audit.json             federated audit of a synthetic set (`audit` in the run YAML)
<run-dir>/run_complete.json              written last: the run finished
<run-dir>/logs/                          the Flower processes' output (`simulate`, `consortium run`)
<run-dir>/release/                       the signed release of a finished deployed run
<run-dir>/report.html, report/           `braing3n report` and its figures (report/showcase.json: the showcase)
<run-dir>/demo.json, cohort/             `braing3n demo`: phase timings and its synthetic cohort
```

A round checkpoint is the commit point of a round: its manifest is written last (checkpoint.py), so a
crash leaves either the whole round or none of it. Global weights are stored as `model.<name>` (the
format `training.checkpoints.load_stage_model` reads) and strategy state as `strategy.<name>`. On resume
the checkpoints are the truth: `server_state.json` is rewritten from them, and metrics lines of rounds
that never reached their checkpoint are dropped, so a resumed round is logged once.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from braing3n_core.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from braing3n_core.config import ConfigError
from braing3n_core.federation.run_config import RunConfig, write_resolved
from braing3n_core.fileio import atomic_write_bytes, atomic_write_json, json_safe, read_jsonl
from braing3n_core.stage_names import PROBES
from braing3n_core.training.checkpoints import STEP_PREFIX, stage_checkpoint_dir

ROUND_PREFIX = "round-"  # federated round checkpoints


@dataclass
class RoundCheckpoint:
    stage: str
    server_round: int
    model: dict[str, np.ndarray]
    strategy: dict[str, np.ndarray]
    meta: dict[str, Any]


class RunFolder:
    """A run folder, for writing (the ServerApp, `simulate`, the jobs) or reading (report, generation, release).

    Constructing one touches nothing on disk; the first write creates the folder. `sinks` receive every
    metrics record as it is logged (`federation.metric_sinks`: TensorBoard, MLflow)."""

    FIGURES = "report"  # the report's figures and the showcase's files; HTML refers to them relatively

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.sinks: list[Any] = []

    config_path = property(lambda self: self.root / "run.yaml")
    metrics_path = property(lambda self: self.root / "metrics.jsonl")
    messages_path = property(lambda self: self.root / "messages.jsonl")
    state_path = property(lambda self: self.root / "server_state.json")
    complete_path = property(lambda self: self.root / "run_complete.json")
    probes_path = property(lambda self: self.root / "probes.json")
    audit_path = property(lambda self: self.root / "privacy_audit.json")
    generation_eval_path = property(lambda self: self.root / "generation_eval.json")
    checkpoints_dir = property(lambda self: self.root / "checkpoints")
    logs_dir = property(lambda self: self.root / "logs")
    simulation_record = property(lambda self: self.root / "logs" / "simulation.json")
    release_dir = property(lambda self: self.root / "release")
    report_path = property(lambda self: self.root / "report.html")
    figures_dir = property(lambda self: self.root / self.FIGURES)
    showcase_path = property(lambda self: self.root / self.FIGURES / "showcase.json")
    demo_path = property(lambda self: self.root / "demo.json")
    cohort_dir = property(lambda self: self.root / "cohort")

    def stage_dir(self, stage: str) -> Path:
        return stage_checkpoint_dir(self.root, stage)

    def is_run(self) -> bool:
        """Whether the folder holds a run (its pinned configuration)."""
        return self.config_path.is_file()

    def has_started(self) -> bool:
        return self.state_path.is_file() or self.checkpoints_dir.is_dir()

    # --- configuration --------------------------------------------------------------------------------------

    def pin(self, config: RunConfig, *, resume: bool = True) -> Path:
        """Pin the resolved run config in `run.yaml`; a folder holding another recipe (or, without `resume`,
        any started run) is refused, so a resumed run can never change its recipe."""
        if self.has_started() and not resume:
            raise ConfigError(f"{self.root}: holds a run already; pass --resume to continue it or choose another --out")
        if self.config_path.is_file():
            previous = RunConfig.from_yaml(self.config_path)
            if not previous.same_recipe(config):
                raise ConfigError(f"{config.source_file}: differs from the configuration pinned in {self.config_path}; "
                                  "a run is resumed with its own configuration (or use a new run folder)")
            return self.config_path
        write_resolved(config, self.config_path)
        return self.config_path

    def run_config(self) -> RunConfig:
        return RunConfig.from_yaml(self.config_path)

    def stage_checkpoint(self, stage: str) -> Path | None:
        """The run's checkpoint of `stage`: a federated run's `final.json`, else a centralized run's newest
        `step-*.json`, else the run's `start_from.<stage>` (a stage taken from another run)."""
        if self.is_final(stage):
            return self.final_path(stage)
        found = latest_checkpoint(self.stage_dir(stage), STEP_PREFIX)
        if found is not None:
            return found
        if self.config_path.is_file():
            start_from = self.run_config().start_from.get(stage)
            return Path(start_from) if start_from is not None else None
        return None

    @staticmethod
    def of_checkpoint(manifest: Path) -> "RunFolder | None":
        """The run folder holding a checkpoint at `<run>/checkpoints/<stage>/<name>.json`, else None."""
        manifest = Path(manifest)
        return RunFolder(manifest.parents[2]) if manifest.parent.parent.name == "checkpoints" else None

    # --- ledgers --------------------------------------------------------------------------------------------

    def log(self, stage: str, server_round: int, site: str, kind: str, **values: Any) -> dict[str, Any]:
        record = {"time": time.time(), "stage": stage, "round": server_round, "site": site, "kind": kind,
                  **{k: json_safe(v) for k, v in values.items()}}
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        for sink in list(self.sinks):
            try:
                sink.write(record)
            except Exception as error:  # noqa: BLE001 (a metrics tool that fails must never stop the federation)
                self.sinks.remove(sink)
                logging.getLogger(__name__).warning("%s dropped after an error: %s", type(sink).__name__, error)
        return record

    def close_sinks(self, status: str) -> None:
        """End the sinks' runs (`FINISHED`, `FAILED`); a sink that fails to close is only reported."""
        for sink in self.sinks:
            try:
                sink.close(status)
            except Exception as error:  # noqa: BLE001
                logging.getLogger(__name__).warning("%s did not close: %s", type(sink).__name__, error)
        self.sinks = []

    def log_message(self, entry: Mapping[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.messages_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"time": time.time(), **entry}) + "\n")

    def records(self) -> list[dict[str, Any]]:
        """`metrics.jsonl`, one dict per line (a last line cut by a crash is skipped)."""
        return read_jsonl(self.metrics_path)

    def messages(self) -> list[dict[str, Any]]:
        return read_jsonl(self.messages_path)

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

    def final_meta(self, stage: str) -> dict[str, Any]:
        return load_checkpoint(self.final_path(stage)).meta

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

    def write_summary(self, config: RunConfig, encoder_sha: str, node_sites: Mapping[int, str]) -> None:
        """`server_state.json` from the checkpoints (the truth on resume), for humans and `release`."""
        names = [s.name for s in config.stages]
        committed = self.committed_rounds(names + [PROBES])
        self.write_state({
            "run": config.name,
            "preset": config.preset,
            "stages": {s.name: {"rounds": s.rounds, "completed_round": committed[s.name], "done": self.is_final(s.name),
                                "strategy": s.strategy.name} for s in config.stages},
            "probes": {"enabled": config.probes.enabled, "rounds": config.probes.rounds,
                       "completed_round": committed[PROBES], "done": self.is_final(PROBES)},
            "start_from": {k: str(v) for k, v in config.start_from.items()},
            "encoder_sha256": encoder_sha or None,
            "sites": {str(n): s for n, s in sorted(node_sites.items())},
        })

    def write_complete(self, config: RunConfig, seconds: float, encoder_sha: str, sites: Sequence[str]) -> Path:
        """`run_complete.json`, written last: what `simulate` and `consortium run` take as success."""
        finals = {s.name: str(self.final_path(s.name).relative_to(self.root)) for s in config.stages}
        atomic_write_json(self.complete_path, {
            "run": config.name, "finished": time.time(), "seconds": seconds, "final_checkpoints": finals,
            "probes": self.probes_path.name if config.probes.enabled else None, "encoder_sha256": encoder_sha or None,
            "sites": sorted(sites),
        })
        return self.complete_path

    def read_state(self) -> dict[str, Any]:
        return json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
