"""ClientApp: translates Flower messages into SiteRuntime / braing3n_core calls and back.

- train (`config["stage"]` ∈ mae | decoder | dit | probes): local steps from the global weights;
  reply = exactly one ArrayRecord ("arrays") + one MetricRecord ("metrics") + the site id ("site").
- evaluate (same stages): validation metrics on the site's val split (probes: held-out test split).
- query (`config["action"]`): hello, install_encoder, token_moments, probe_census, privacy_audit.
- train messages pass `client.mods.privacy_mod` first: client-side clipping for client-level DP, and
  the SecAgg+ protocol steps (whose fit step runs this same train handler).

A site that cannot take part (no usable scans, data unavailable, encoder missing) replies with an
`Error(code=DECLINED)` whose reason names the site and the cause, instead of failing the round.
Fault injection (`config["fault"]`, test drills only, see `braing3n_core.federation.run_config`) is honoured here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from braing3n_core.config import ConfigError
from braing3n_core.evaluation.heads import FeatureStats
from braing3n_core.federation.arrays import load_arrays
from braing3n_core.federation.probes import (
    heads_from_arrays,
    label_census,
    score_heads,
    site_probe_data,
    tasks_from_json,
    train_heads,
)
from braing3n_core.federation.protocol import RoundParams, SiteDeclined, moments_to_arrays
from braing3n_core.federation.site_round import evaluate_site, site_token_moments, train_site_round
from braing3n_core.training.stages import get_stage
from client.mods import privacy_mod
from client.site import SiteRuntime, configure_threads

DECLINED = 4001  # Error code of a clean refusal (vs Flower's own codes for crashes)
app = ClientApp()


def _arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _reply(msg: Message, site_id: str, arrays: dict[str, np.ndarray] | None, metrics: dict[str, float],
           **config: object) -> Message:
    # `privacy/*` values travel in their own ConfigRecord: strategies average every MetricRecord key and
    # refuse replies whose keys differ, while a site's ε is its own (and only DP sites have one).
    privacy = {k: v for k, v in metrics.items() if k.startswith("privacy/")}
    metrics = {k: v for k, v in metrics.items() if not k.startswith("privacy/")}
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"site-id": site_id, **config})})
    if privacy:
        content["privacy"] = ConfigRecord(privacy)
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return Message(content, reply_to=msg)


def _guarded(handler: Callable[[Message, Context, SiteRuntime], Message]) -> Callable[[Message, Context], Message]:
    def run(msg: Message, context: Context) -> Message:
        configure_threads()
        try:
            runtime = SiteRuntime.from_context(context.node_config, context.run_config)
            fault = str(msg.content["config"].get("fault", "")) if "config" in msg.content else ""
            if fault and msg.content["config"].get("fault-site", runtime.site_id) != runtime.site_id:
                fault = ""  # a drill in a round whose one config goes to every site (SecAgg+) names its site
            if fault == "decline":
                raise SiteDeclined(f"site {runtime.site_id}: declines this round (fault injection)")
            if fault == "crash":
                raise RuntimeError(f"site {runtime.site_id}: handler crashed (fault injection)")
            if fault == "delay":  # a slow site: it answers, `fault-factor` seconds late
                time.sleep(float(msg.content["config"].get("fault-factor", 0.0)))
            return handler(msg, context, runtime)
        except (SiteDeclined, ConfigError) as error:
            return Message(Error(code=DECLINED, reason=str(error)), reply_to=msg)
    return run


def _faulty(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray], config: ConfigRecord,
            site_id: str) -> dict[str, np.ndarray]:
    """Test drills: corrupt the reply on purpose, as a broken or malicious site would."""
    fault = str(config.get("fault", ""))
    if config.get("fault-site", site_id) != site_id:
        return arrays
    if fault == "nan":
        first = next(iter(arrays))
        arrays[first] = np.full_like(arrays[first], np.nan)
    elif fault == "scale":
        factor = float(config.get("fault-factor", 1000.0))
        arrays = {k: (reference[k] + factor * (v - reference[k])).astype(v.dtype) for k, v in arrays.items()}
    return arrays


@app.train(mods=[privacy_mod])  # client-side DP clipping and SecAgg+ (client/mods.py); train only
@_guarded
def train(msg: Message, context: Context, runtime: SiteRuntime) -> Message:
    config = msg.content["config"]
    reference = _arrays(msg.content["arrays"])
    if config["stage"] == "probes":
        tasks = [task for task, _ in tasks_from_json(str(config["tasks"]))]
        data = site_probe_data(runtime.probe_inputs(str(config["preset"]), str(config["encoder-sha256"])))
        arrays, metrics = train_heads(
            heads_from_arrays(tasks, reference), data, steps=int(config["local-steps"]), lr=float(config["lr"]),
            batch_size=int(config["batch-size"]), weight_decay=float(config["weight-decay"]),
            seed=int(config["seed"]) + int(config["server-round"]),
        )
    else:
        stage, params = get_stage(str(config["stage"])), RoundParams.from_config(config)
        site = runtime.inputs(stage, str(config["preset"]), str(config.get("encoder-sha256", "")))
        model = load_arrays(stage.from_config(json.loads(str(config["model-config"]))), reference)
        arrays, metrics = train_site_round(stage, model, site, params, runtime.device)
    return _reply(msg, runtime.site_id, _faulty(arrays, reference, config, runtime.site_id), metrics)


@app.evaluate()
@_guarded
def evaluate(msg: Message, context: Context, runtime: SiteRuntime) -> Message:
    config = msg.content["config"]
    if config["stage"] == "probes":
        pairs = tasks_from_json(str(config["tasks"]))
        heads = heads_from_arrays([t for t, _ in pairs], _arrays(msg.content["arrays"]))
        data = site_probe_data(runtime.probe_inputs(str(config["preset"]), str(config["encoder-sha256"])))
        return _reply(msg, runtime.site_id, None, score_heads(heads, {t.name: p for t, p in pairs}, data))
    stage = get_stage(str(config["stage"]))
    site = runtime.inputs(stage, str(config["preset"]), str(config.get("encoder-sha256", "")))
    model = load_arrays(stage.from_config(json.loads(str(config["model-config"]))), _arrays(msg.content["arrays"]))
    return _reply(msg, runtime.site_id, None, evaluate_site(stage, model, site, int(config["batch-size"]), runtime.device))


@app.query()
@_guarded
def query(msg: Message, context: Context, runtime: SiteRuntime) -> Message:
    config = msg.content["config"]
    action, preset, sha = str(config["action"]), str(config["preset"]), str(config.get("encoder-sha256", ""))
    if action == "hello":
        described = runtime.describe(preset, sha)
        return _reply(msg, runtime.site_id, None, {"problems": float(described.pop("problems"))},
                      **{k: v for k, v in described.items() if k != "site-id"})
    if action == "install_encoder":
        runtime.install_encoder(sha, _arrays(msg.content["encoder"]), json.loads(str(config["encoder-config"])))
        return _reply(msg, runtime.site_id, None, {"installed": 1.0})
    if action == "token_moments":
        stage = get_stage("dit")
        moments = site_token_moments(stage, runtime.inputs(stage, preset, sha), int(config["token-dim"]))
        return _reply(msg, runtime.site_id, moments_to_arrays(moments), {"num-examples": float(moments.count)})
    if action == "probe_census":
        data = site_probe_data(runtime.probe_inputs(preset, sha))
        if len(data.fit_table) == 0:
            raise SiteDeclined(f"site {runtime.site_id}: no usable train/val scans for the probes")
        stats = FeatureStats.from_features(data.fit_features)
        return _reply(msg, runtime.site_id, stats.to_arrays(), {"num-examples": float(stats.count)},
                      census=json.dumps(label_census(data)))
    if action == "privacy_audit":
        return _privacy_audit(msg, runtime, preset, sha)
    raise SiteDeclined(f"site {runtime.site_id}: unknown query action {action!r}")


def _privacy_audit(msg: Message, runtime: SiteRuntime, preset: str, sha: str) -> Message:
    """The synthetic set against this site's scans: aggregates and one flag per synthetic scan only."""
    import torch

    from braing3n_core.models import DiT, DiTConfig
    from braing3n_core.privacy.audit import run_site_audit

    config = msg.content["config"]
    site = runtime.inputs(get_stage("dit"), preset, sha)  # the data and the token cache of the frozen encoder
    volumes = torch.from_numpy(_arrays(msg.content["synthetic"])["volumes"].astype(np.float32))
    if volumes.shape[0] != int(config["n-synthetic"]) or tuple(volumes.shape[1:]) != (1, *site.data.preset.shape):
        raise SiteDeclined(f"site {runtime.site_id}: synthetic volumes {tuple(volumes.shape)} do not fit preset {preset}")
    dit = None
    if "dit" in msg.content:
        dit = load_arrays(DiT(DiTConfig.from_dict(json.loads(str(config["dit-config"])))), _arrays(msg.content["dit"]))
    audit = run_site_audit(site, site.tokens.encoder, volumes, dit)
    return _reply(msg, runtime.site_id, None, {"num-examples": float(audit.n_train + audit.n_held),
                                               "flagged": float(sum(audit.flags))}, audit=json.dumps(audit.to_json()))
