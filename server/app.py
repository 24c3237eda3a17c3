"""ServerApp: reads the Flower run config and hands the federation to `server.run`.

Flower's `[tool.flwr.app.config]` carries paths and two deployment settings (`protocol.AppSettings`); the
recipe itself is the run YAML:
- `run-config`: the run YAML (`braing3n_core.federation.run_config.RunConfig`);
- `run-dir`: the run folder (default `runs/<name>`); resuming = running again with the same folder;
- `site-configs`: comma-separated site YAMLs, virtual node `partition-id` i ↦ the i-th (simulation;
  in deployment each SuperNode names its own with `--node-config "site-config='…'"`);
- `expected-sites` (deployment): how many sites to wait for before the run starts (0: the number of
  `site-configs`; at least `min_sites` either way);
- `signing-key` (deployment): the consortium's Ed25519 release key; when set, the finished run's final
  checkpoints are released signed in `<run-dir>/release/` (`braing3n_core.ops.release.sign_run`).
- `tensorboard`, `mlflow-tracking-uri`, `mlflow-experiment`: where the metrics also go as rounds finish
  (`braing3n_core.federation.metric_sinks`).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from braing3n_core.federation.protocol import AppSettings
from braing3n_core.ops.consortium import load_release_private_key
from braing3n_core.ops.release import sign_run
from braing3n_core.runtime import set_threads
from server.run import run_federation
from server.session import say

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = AppSettings.from_config(context.run_config)
    if not settings.run_config:
        raise ValueError("set the run config: flwr run . <connection> --run-config \"run-config='/abs/run.yaml' ...\"")
    expected = settings.expected_sites or len(settings.site_config_paths()) or None
    key = load_release_private_key(Path(settings.signing_key)) if settings.signing_key else None  # fails before training
    set_threads(None)  # BRAING3N_NUM_THREADS when set; the server mostly waits and averages arrays
    complete = run_federation(grid, Path(settings.run_config), Path(settings.run_dir) if settings.run_dir else None,
                              expected, settings)
    if key is not None:
        say(f"release signed: {sign_run(complete.parent, key)}")
