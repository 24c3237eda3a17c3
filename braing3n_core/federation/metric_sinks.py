"""The run's metrics, as they are logged, in the tools people already use: TensorBoard and MLflow.

`RunFolder.log` hands every `metrics.jsonl` record to the run folder's sinks (`RunFolder.sinks`), so the
ServerApp writes them as rounds finish; `simulate --tensorboard DIR` / `consortium run --tensorboard DIR`
and `MLFLOW_TRACKING_URI` in their environment turn them on (`protocol.AppSettings` carries both to the
ServerApp). Names follow the run's one vocabulary, prefixed by the stage: `mae/train/loss`,
`decoder/val/psnr`, `dit/privacy/epsilon`; a key without a `/` gets its record's kind (`mae/train/update_norm`,
`mae/train/round_seconds`, `decoder/evaluate/num-examples`). The step is the stage's round.

- **TensorBoard** (`TensorBoardSink`): one event-file folder per site and one for the aggregate (and the
  server's client-level DP accountant) under `DIR/<run name>/`, so `tensorboard --logdir DIR` overlays
  the sites on each chart. Written with torch's `SummaryWriter`, flushed after every record.
- **MLflow** (`MlflowSink`): one MLflow run per federated run (found again by its `braing3n.run_dir` tag
  when the run is resumed) holding the aggregate metrics and the recipe as parameters, and one nested run
  per site. Experiment: `MLFLOW_EXPERIMENT_NAME`, else `braing3n-fl`.

A sink that meets a fresh target (a new TensorBoard folder, a new MLflow run) first replays the records
already in `metrics.jsonl`, so turning it on for a resumed run still shows the whole run. A sink that fails
(a tracking server gone) is dropped with a warning by `RunFolder.log`: the federation never stops for it.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from braing3n_core.config import ConfigError

DEFAULT_EXPERIMENT = "braing3n-fl"
RUN_DIR_TAG = "braing3n.run_dir"
SITE_TAG = "braing3n.site"
AGGREGATE = "aggregate"
SERVER = "server"
METRIC_KINDS = ("train", "evaluate", "probe", "client_dp")
_NOT_METRICS = {"time", "stage", "round", "site", "kind"}


class MetricSink(Protocol):
    def write(self, record: Mapping[str, Any]) -> None: ...

    def close(self, status: str) -> None: ...


def metric_items(record: Mapping[str, Any]) -> list[tuple[str, float]]:
    """(name, value) of every finite number of a metrics record, named `<stage>/<metric>`."""
    if record.get("kind") not in METRIC_KINDS:
        return []
    stage, kind = record.get("stage"), record.get("kind")
    items = []
    for key, value in record.items():
        if key in _NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        items.append((f"{stage}/{key if '/' in key else f'{kind}/{key}'}", float(value)))
    return items


def absolute_tracking_uri(uri: str, base: Path | None = None) -> str:
    """A tracking URI that means the same from any working directory: a relative local path (`mlruns`,
    `file:mlruns`, `sqlite:///mlflow.db`) becomes absolute against `base` (default: here)."""
    base = Path(base or Path.cwd())
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str((base / uri.removeprefix("sqlite:///")).resolve())
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return "file:" + str((base / uri.removeprefix("file:")).resolve())
    if "://" not in uri and not uri.startswith("file:") and uri:
        return str((base / uri).resolve())
    return uri


class TensorBoardSink:
    """Event files under `<logdir>/<run name>/<site>` (sites, `aggregate`, `server`)."""

    def __init__(self, logdir: Path, run_name: str, existing: Sequence[Mapping[str, Any]] = ()) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer_class = SummaryWriter
        self.root = Path(logdir) / run_name
        fresh = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        self.writers: dict[str, Any] = {}
        if fresh:
            for record in existing:
                self._add(record)
            self._flush()

    def _add(self, record: Mapping[str, Any]) -> bool:
        items = metric_items(record)
        if not items:
            return False
        site = str(record.get("site"))
        writer = self.writers.get(site)
        if writer is None:
            writer = self.writers[site] = self._writer_class(log_dir=str(self.root / site), flush_secs=30)
        for name, value in items:
            writer.add_scalar(name, value, global_step=int(record.get("round", 0)), walltime=float(record["time"]))
        return True

    def _flush(self) -> None:
        for writer in self.writers.values():
            writer.flush()

    def write(self, record: Mapping[str, Any]) -> None:
        if self._add(record):
            self.writers[str(record.get("site"))].flush()

    def close(self, status: str) -> None:
        for writer in self.writers.values():
            writer.close()


def _flat_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """The recipe as MLflow parameters: `stages.mae.rounds = 3`, … (lists of stages keyed by name)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= _flat_params(value, f"{name}.")
        elif isinstance(value, list) and all(isinstance(v, Mapping) and "name" in v for v in value):
            for item in value:
                out |= _flat_params({k: v for k, v in item.items() if k != "name"}, f"{name}.{item['name']}.")
        elif value is not None:
            out[name] = str(value)[:500]
    return out


class MlflowSink:
    """One MLflow run per federated run (aggregate metrics, the recipe as parameters), a nested run per site."""

    def __init__(self, tracking_uri: str, run_dir: Path, run_name: str, recipe: Mapping[str, Any],
                 experiment: str = "", existing: Sequence[Mapping[str, Any]] = ()) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        found = self.client.get_experiment_by_name(name)
        self.experiment = found.experiment_id if found is not None else self.client.create_experiment(name)
        self.run_dir = str(Path(run_dir).resolve())
        self.children: dict[str, str] = {}
        runs = self._runs(f"tags.`{RUN_DIR_TAG}` = '{_quote(self.run_dir)}'")
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        if parents:
            self.parent = parents[0].info.run_id
            self.client.update_run(self.parent, status="RUNNING")
            for run in runs:
                if run.data.tags.get("mlflow.parentRunId") == self.parent and SITE_TAG in run.data.tags:
                    self.children[run.data.tags[SITE_TAG]] = run.info.run_id
                    self.client.update_run(run.info.run_id, status="RUNNING")
            return
        self.parent = self.client.create_run(self.experiment, run_name=run_name,
                                             tags={RUN_DIR_TAG: self.run_dir, "braing3n.run": run_name}).info.run_id
        params = sorted(_flat_params(recipe).items())
        from mlflow.entities import Param

        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.parent, params=[Param(k, v) for k, v in params[start:start + 100]])
        self._log(existing)

    def _runs(self, query: str) -> list[Any]:
        return list(self.client.search_runs([self.experiment], filter_string=query, max_results=1000))

    def _target(self, site: str) -> str:
        if site in (AGGREGATE, SERVER):
            return self.parent
        if site not in self.children:
            self.children[site] = self.client.create_run(
                self.experiment, run_name=site,
                tags={"mlflow.parentRunId": self.parent, SITE_TAG: site, RUN_DIR_TAG: self.run_dir}).info.run_id
        return self.children[site]

    def _log(self, records: Iterable[Mapping[str, Any]]) -> None:
        from mlflow.entities import Metric

        batches: dict[str, list[Any]] = {}
        for record in records:
            items = metric_items(record)
            if not items:
                continue
            site = str(record.get("site"))
            # The server's own records share the parent run with the aggregate: name them apart.
            prefix = "server/" if site == SERVER else ""
            when, step = int(float(record["time"]) * 1000), int(record.get("round", 0))
            batches.setdefault(self._target(site), []).extend(Metric(prefix + k, v, when, step) for k, v in items)
        for run_id, metrics in batches.items():
            for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
                self.client.log_batch(run_id, metrics=metrics[start:start + 1000])

    def write(self, record: Mapping[str, Any]) -> None:
        self._log([record])

    def close(self, status: str) -> None:
        for run_id in [*self.children.values(), self.parent]:
            self.client.set_terminated(run_id, status=status)


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def open_sinks(run_dir: Path, run_name: str, recipe: Mapping[str, Any], existing: Sequence[Mapping[str, Any]],
               tensorboard: str = "", mlflow_tracking_uri: str = "", mlflow_experiment: str = "") -> list[MetricSink]:
    """The sinks the run asks for (none when neither is set)."""
    sinks: list[MetricSink] = []
    if tensorboard:
        sinks.append(TensorBoardSink(Path(tensorboard), run_name, existing))
    if mlflow_tracking_uri:
        sinks.append(MlflowSink(mlflow_tracking_uri, run_dir, run_name, recipe, mlflow_experiment, existing))
    return sinks


def sink_settings(tensorboard: Path | None = None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The `AppSettings` fields that turn the sinks on: `--tensorboard DIR` (absolute), and the submitter's
    `MLFLOW_TRACKING_URI` / `MLFLOW_EXPERIMENT_NAME` (the ServerApp may run in another environment)."""
    environ = os.environ if environ is None else environ
    uri = environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri and importlib.util.find_spec("mlflow") is None:
        raise ConfigError(f"MLFLOW_TRACKING_URI is set ({uri}) but MLflow is not installed here: "
                          "pip install 'braing3n-fl[mlflow]' (mlflow-skinny), or unset it")
    return {"tensorboard": str(Path(tensorboard).resolve()) if tensorboard else "",
            "mlflow_tracking_uri": absolute_tracking_uri(uri) if uri else "",
            "mlflow_experiment": environ.get("MLFLOW_EXPERIMENT_NAME", "").strip()}


__all__ = ["MetricSink", "MlflowSink", "TensorBoardSink", "absolute_tracking_uri", "metric_items", "open_sinks",
           "sink_settings"]
