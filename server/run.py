"""Everything the ServerApp does for one run: pin the recipe, meet the sites, run the stages in order.

Order: the federated probes run right after the MAE stage (or first, when the encoder comes from
`start_from.mae`), then the decoder and the DiT; an `audit`, then a `generation_eval`, in the run YAML run last. A run that stops
(too few sites, a crash) resumes from its last committed round when it is started again on the same
run folder with the same recipe.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from flwr.serverapp import Grid

from braing3n_core.federation.metric_sinks import open_sinks
from braing3n_core.federation.protocol import AppSettings
from braing3n_core.federation.recipe import Recipe
from braing3n_core.federation.run_config import RunConfig
from braing3n_core.federation.run_folder import RunFolder
from braing3n_core.stage_names import MAE, PROBES, STAGE_NAMES
from server.audit import run_audit
from server.generation_eval import run_generation_eval
from server.probes import run_probes
from server.rounds import run_stage
from server.session import Federation, say
from server.transport import JobGrid


def load_run_config(path: Path, run_dir: Path | None) -> tuple[RunConfig, RunFolder]:
    """The run's configuration, pinned in the run folder: a resumed run must not change its recipe."""
    config = RunConfig.from_yaml(path)
    run = RunFolder(run_dir if run_dir is not None else Path("runs") / config.name)
    run.pin(config)
    return config, run


def run_federation(grid: Grid, config_path: Path, run_dir: Path | None, expected_sites: int | None,
                   settings: AppSettings | None = None) -> Path:
    """Everything the ServerApp does; returns the path of `run_complete.json`. The metric sinks `settings`
    names (TensorBoard, MLflow: `federation.metric_sinks`) get every metrics record as it is logged, and
    their runs end FINISHED, or FAILED when the federation stops."""
    opened: list[RunFolder] = []
    try:
        complete = _federate(grid, config_path, run_dir, expected_sites, settings or AppSettings(), opened)
    except BaseException:
        for run in opened:
            run.close_sinks("FAILED")
        raise
    for run in opened:
        run.close_sinks("FINISHED")
    return complete


def _federate(grid: Grid, config_path: Path, run_dir: Path | None, expected_sites: int | None, settings: AppSettings,
              opened: list[RunFolder]) -> Path:
    started = time.time()
    say(f"ServerApp started; run config {config_path}")
    config, run = load_run_config(config_path, run_dir)
    run.complete_path.unlink(missing_ok=True)
    if run.prune_uncommitted(run.committed_rounds([*STAGE_NAMES, PROBES])):
        say("dropped ledger lines of rounds that never reached their checkpoint")
    # Every message carries the recipe: sites that run approved jobs only check it (federation/approvals.py).
    federation = Federation(JobGrid(grid, Recipe.of(config).to_json()), run, config, expected_sites)
    nodes = federation.wait_for_nodes()
    federation.hello("setup")
    say(f"run {config.name!r}: {len(nodes)} nodes, sites {sorted(federation.node_sites.values())}, preset {config.preset}")
    run.sinks = open_sinks(run.root, config.name, yaml.safe_load(run.config_path.read_text()), run.records(),
                           settings.tensorboard, settings.mlflow_tracking_uri, settings.mlflow_experiment)
    opened.append(run)
    probes_done = False
    if config.probes.enabled and MAE in config.start_from:
        run_probes(federation)
        probes_done = True
    for spec in config.stages:
        run_stage(federation, spec)
        if spec.name == MAE and config.probes.enabled and not probes_done:
            run_probes(federation)
            probes_done = True
    if config.audit is not None:
        say(f"privacy audit written to {run_audit(federation)}")
    if config.generation_eval is not None:
        say(f"generation evaluation written to {run_generation_eval(federation)}")
    federation.write_state()
    complete = run.write_complete(config, time.time() - started, federation.encoder_sha, federation.node_sites.values())
    say(f"run {config.name!r} complete: {run.root}")
    return complete
