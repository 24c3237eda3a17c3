"""ServerApp: reads the Flower run config and hands the federation to `server.rounds`.

Flower's `[tool.flwr.app.config]` carries three paths only; the recipe itself is the run YAML:
- `run-config`: the run YAML (`braing3n_core.runconfig.RunConfig`);
- `run-dir`: the run folder (default `runs/<name>`); resuming = running again with the same folder;
- `site-configs`: comma-separated site YAMLs, virtual node `partition-id` i ↦ the i-th (simulation;
  in deployment each SuperNode names its own with `--node-config "site-config='…'"`).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from braing3n_core.runtime import set_threads
from server.rounds import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = context.run_config
    config_path = str(settings.get("run-config", "") or "")
    if not config_path:
        raise ValueError("set the run config: flwr run . <connection> --run-config \"run-config='/abs/run.yaml' ...\"")
    run_dir = str(settings.get("run-dir", "") or "")
    sites = [p for p in str(settings.get("site-configs", "") or "").split(",") if p.strip()]
    set_threads(None)  # BRAING3N_NUM_THREADS when set; the server mostly waits and averages arrays
    run_federation(grid, Path(config_path), Path(run_dir) if run_dir else None, len(sites) or None)
