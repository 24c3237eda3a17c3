"""ClientApp: dispatches Flower messages to this site's handlers (`SiteRuntime` and the core) and back.

- train (`TrainRequest.stage` ∈ mae | decoder | dit, or a `ProbeRoundRequest`): local steps from the global
  weights; reply = exactly one ArrayRecord (`arrays`) + one MetricRecord (`metrics`) + the site's `site` record;
- evaluate (same stages): validation metrics on the site's val split (probes: held-out test split);
- query (`Query.action`): one handler per `protocol.Action` (hello, encoder install, token moments, probe
  census, privacy audit, and the generation evaluation's scores, trend census and forecast scores).
Train messages pass `client.mods.privacy_mod` first: client-side clipping for client-level DP, and the
SecAgg+ protocol steps (whose fit step runs this same train handler).

A site that cannot take part (no usable scans, data unavailable, encoder missing) replies with an
`Error(code=DECLINED)` whose reason names the site and the cause, instead of failing the round. A site whose
file requires approval first checks every message's app (its Flower bundle hash, `client.fab`) and recipe
against its approval log (`federation.approvals.admit`), before anything reads a scan or its cache. Every
payload is read through `braing3n_core.federation.protocol`; drills live in `client.faults`.

Every answer, or refusal, is also written to the site's own journal (`federation.site_journal`,
`<cache_dir>/activity.jsonl`), which `braing3n site status` shows at the hospital.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from braing3n_core.config import ConfigError
from braing3n_core.evaluation.heads import FeatureStats
from braing3n_core.evaluation.pooled import FourierKernel
from braing3n_core.federation.approvals import admit
from braing3n_core.federation.arrays import Arrays, ArraysView, load_arrays
from braing3n_core.federation.probes import (
    heads_from_arrays,
    label_census,
    ridge_census,
    score_heads,
    site_probe_data,
    tasks_from_json,
    train_heads,
)
from braing3n_core.federation.protocol import (
    DECLINED,
    NUM_EXAMPLES,
    Action,
    AuditReply,
    EvaluateRequest,
    ForecastScoresQuery,
    GenerationScoresQuery,
    Hello,
    InstallEncoder,
    JobRecipe,
    PrivacyAuditQuery,
    ProbeCensus,
    ProbeRoundRequest,
    ProtocolError,
    Query,
    Record,
    ScoresReply,
    SiteDeclined,
    SiteReply,
    TokenMomentsQuery,
    TrainRequest,
    moments_to_arrays,
    trend_to_arrays,
)
from braing3n_core.federation.replies import update_norm
from braing3n_core.federation.site_journal import JournalEntry, SiteJournal, journal_path
from braing3n_core.federation.site_round import evaluate_site, site_change_trend, site_token_moments, train_site_round
from braing3n_core.generation.evaluation import site_generation_scores
from braing3n_core.generation.forecast_eval import TrendModel, site_forecast_scores, trend_census
from braing3n_core.generation.models import GenerationModels
from braing3n_core.models import CNNDecoder, DecoderConfig, DiT, DiTConfig, MAEConfig, MaskedAutoencoder
from braing3n_core.privacy.audit import run_site_audit
from braing3n_core.runtime import worker_placement
from braing3n_core.stage_names import DIT, PROBES
from braing3n_core.training.stages import get_stage
from client import faults
from client.fab import running_fab_sha256
from client.mods import privacy_mod
from client.site import SiteRuntime, configure_threads, resolve_site_config

app = ClientApp()
Handler = Callable[[Message, ConfigRecord, SiteRuntime], Message]


def _arrays(record: ArrayRecord) -> Arrays:
    return {k: v.numpy() for k, v in record.items()}


def _reply(msg: Message, reply: SiteReply, arrays: Arrays | None, metrics: Mapping[str, float]) -> Message:
    # `privacy/*` values travel in their own ConfigRecord: strategies average every MetricRecord key, while a
    # site's ε is its own (and only DP sites have one).
    privacy = {k: v for k, v in metrics.items() if k.startswith("privacy/")}
    metrics = {k: v for k, v in metrics.items() if not k.startswith("privacy/")}
    reply = replace(reply, worker=worker_placement())
    content = RecordDict({Record.METRICS: MetricRecord(metrics), Record.SITE: ConfigRecord(reply.to_config())})
    if privacy:
        content[Record.PRIVACY] = ConfigRecord(privacy)
    if arrays is not None:
        content[Record.ARRAYS] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return Message(content, reply_to=msg)


def _admit(msg: Message, config: ConfigRecord, runtime: SiteRuntime) -> None:
    """Refuse (`NotApproved`) a job this site has not approved, before anything reads its data."""
    job = msg.content.config_records.get(Record.JOB)
    recipe = JobRecipe.from_config(job).recipe if job is not None else None
    admit(runtime.config, running_fab_sha256, recipe, msg.metadata.message_type.split(".")[0], config)


def _guarded(handler: Handler) -> Callable[[Message, Context], Message]:
    def run(msg: Message, context: Context) -> Message:
        configure_threads()
        try:
            runtime = SiteRuntime.from_context(context.node_config, context.run_config)
            config = msg.content.config_records.get(Record.CONFIG, ConfigRecord())
            _admit(msg, config, runtime)
            faults.before_handler(config, runtime.site_id)
            return handler(msg, config, runtime)
        except (SiteDeclined, ConfigError) as error:
            return Message(Error(code=DECLINED, reason=str(error)), reply_to=msg)
        except ProtocolError as error:  # a server of another version, or a bug: say so instead of crashing
            return Message(Error(code=DECLINED, reason=f"site {runtime.site_id}: {error}"), reply_to=msg)
    return _journaled(run)


def _journaled(answer: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Write each answer (or refusal) to the site's journal; a journal that cannot be written costs the entry only."""
    def run(msg: Message, context: Context) -> Message:
        started = time.perf_counter()
        reply = answer(msg, context)
        try:
            site = resolve_site_config(context.node_config, context.run_config)
            SiteJournal(journal_path(site)).append(_journal_entry(msg, reply, time.perf_counter() - started))
        except (ConfigError, OSError, ValueError) as error:
            logging.getLogger(__name__).warning("site journal not written: %s", error)
        return reply
    return run


def _journal_entry(msg: Message, reply: Message, seconds: float) -> JournalEntry:
    config = msg.content.config_records.get(Record.CONFIG, ConfigRecord())
    kind = msg.metadata.message_type.split(".")[0]
    message = f"query:{config.get('action', '')}" if kind == "query" else kind
    if reply.has_error():
        return JournalEntry.of_reply(message, config, seconds, reason=reply.error.reason or "declined")
    content = reply.content
    metrics = {**content.metric_records.get(Record.METRICS, {}), **content.config_records.get(Record.PRIVACY, {})}
    site = content.config_records.get(Record.SITE, {})
    norm = None
    if kind == "train" and Record.ARRAYS in content.array_records and Record.ARRAYS in msg.content.array_records:
        # one array of each at a time: two whole copies of the model here were a site's memory peak at `paper`
        sent, back = ArraysView(msg.content[Record.ARRAYS]), ArraysView(content[Record.ARRAYS])
        norm = update_norm(back, sent) if set(sent) == set(back) else None
    return JournalEntry.of_reply(message, config, seconds, metrics=metrics, update_norm=norm,
                                 worker=str(site.get("worker", "")))


@app.train(mods=[privacy_mod])  # client-side DP clipping and SecAgg+ (client/mods.py); train only
@_guarded
def train(msg: Message, config: ConfigRecord, runtime: SiteRuntime) -> Message:
    reference = ArraysView(msg.content[Record.ARRAYS])  # the message holds the weights; no second copy while training
    if config.get("stage") == PROBES:
        request = ProbeRoundRequest.from_config(config)
        tasks = [task for task, _ in tasks_from_json(request.tasks)]
        data = site_probe_data(runtime.probe_inputs(request.preset, request.encoder_sha256))
        arrays, metrics = train_heads(
            heads_from_arrays(tasks, reference), data, steps=request.local_steps, lr=request.lr,
            batch_size=request.batch_size, weight_decay=request.weight_decay, seed=request.seed + request.server_round,
        )
    else:
        request = TrainRequest.from_config(config)
        stage = get_stage(request.stage)
        site = runtime.inputs(stage, request.preset, request.encoder_sha256)
        model = load_arrays(stage.from_config(request.model_config), reference)
        arrays, metrics = train_site_round(stage, model, site, request, runtime.device,
                                           kill_worker=faults.worker_to_kill(config, runtime.site_id))
    arrays = faults.corrupt_reply(arrays, reference, config, runtime.site_id)
    return _reply(msg, SiteReply(site_id=runtime.site_id), arrays, metrics)


@app.evaluate()
@_guarded
def evaluate(msg: Message, config: ConfigRecord, runtime: SiteRuntime) -> Message:
    weights = ArraysView(msg.content[Record.ARRAYS])
    if config.get("stage") == PROBES:
        request = ProbeRoundRequest.from_config(config)
        pairs = tasks_from_json(request.tasks)
        heads = heads_from_arrays([t for t, _ in pairs], weights)
        data = site_probe_data(runtime.probe_inputs(request.preset, request.encoder_sha256))
        return _reply(msg, SiteReply(site_id=runtime.site_id), None, score_heads(heads, {t.name: p for t, p in pairs}, data))
    request = EvaluateRequest.from_config(config)
    stage = get_stage(request.stage)
    site = runtime.inputs(stage, request.preset, request.encoder_sha256)
    model = load_arrays(stage.from_config(request.model_config), weights)
    return _reply(msg, SiteReply(site_id=runtime.site_id), None,
                  evaluate_site(stage, model, site, request.batch_size, runtime.device))


# --- queries: one handler per protocol.Action ------------------------------------------------------------------


def _hello(msg: Message, query: Query, config: ConfigRecord, runtime: SiteRuntime) -> Message:
    data = runtime.data(query.preset)
    hello = Hello(site_id=runtime.site_id, has_encoder=runtime.has_encoder(query.encoder_sha256),
                  scans={split: len(records) for split, records in data.splits.items()})
    return _reply(msg, hello, None, {"problems": float(len(data.problems))})


def _install_encoder(msg: Message, query: Query, config: ConfigRecord, runtime: SiteRuntime) -> Message:
    install = InstallEncoder.from_config(config)
    runtime.install_encoder(query.encoder_sha256, _arrays(msg.content[Record.ENCODER]), install.encoder_config)
    return _reply(msg, SiteReply(site_id=runtime.site_id), None, {"installed": 1.0})


def _token_moments(msg: Message, query: Query, config: ConfigRecord, runtime: SiteRuntime) -> Message:
    stage = get_stage(DIT)
    asked = TokenMomentsQuery.from_config(config)
    site = runtime.inputs(stage, query.preset, query.encoder_sha256)
    moments = site_token_moments(stage, site, asked.token_dim)
    arrays = moments_to_arrays(moments)
    if asked.num_tokens > 0:
        arrays |= trend_to_arrays(site_change_trend(stage, site, asked.num_tokens, asked.token_dim))
    return _reply(msg, SiteReply(site_id=runtime.site_id), arrays, {NUM_EXAMPLES: float(moments.count)})


def _probe_census(msg: Message, query: Query, config: ConfigRecord, runtime: SiteRuntime) -> Message:
    data = site_probe_data(runtime.probe_inputs(query.preset, query.encoder_sha256))
    if len(data.fit_table) == 0:
        raise SiteDeclined(f"site {runtime.site_id}: no usable train/val scans for the probes")
    stats = FeatureStats.from_features(data.fit_features)
    census = ProbeCensus(site_id=runtime.site_id, census=label_census(data))
    return _reply(msg, census, stats.to_arrays() | ridge_census(data), {NUM_EXAMPLES: float(stats.count)})


def _privacy_audit(msg: Message, query: Query, config: ConfigRecord, runtime: SiteRuntime) -> Message:
    """The synthetic set against this site's scans: aggregates and one flag per synthetic scan only."""
    asked = PrivacyAuditQuery.from_config(config)
    site = runtime.inputs(get_stage(DIT), query.preset, query.encoder_sha256)  # data + the frozen encoder's tokens
    volumes = torch.from_numpy(_arrays(msg.content[Record.SYNTHETIC])["volumes"].astype(np.float32))
    if volumes.shape[0] != asked.n_synthetic or tuple(volumes.shape[1:]) != (1, *site.data.preset.shape):
        raise SiteDeclined(f"site {runtime.site_id}: synthetic volumes {tuple(volumes.shape)} do not fit preset {query.preset}")
    dit = None
    if asked.dit_config is not None:
        dit = load_arrays(DiT(DiTConfig.from_dict(asked.dit_config)), _arrays(msg.content[Record.DIT]))
    mae = None
    if asked.mae_config is not None:
        mae = load_arrays(MaskedAutoencoder(MAEConfig.from_dict(asked.mae_config)), _arrays(msg.content[Record.MAE]))
    audit = run_site_audit(site, site.tokens.encoder, volumes, dit, mae)
    reply = AuditReply(site_id=runtime.site_id, audit=audit.to_json())
    return _reply(msg, reply, None, {NUM_EXAMPLES: float(audit.n_train + audit.n_held), "flagged": float(sum(audit.flags))})


def _generation_scores(msg: Message, query: Query, config: ConfigRecord, runtime: SiteRuntime) -> Message:
    """Generated sets against this site's held-out scans: distances between sets and sums only."""
    asked = GenerationScoresQuery.from_config(config)
    site = runtime.inputs(get_stage(DIT), query.preset, query.encoder_sha256)
    kernels = {space: FourierKernel(**fields) for space, fields in asked.kernels.items()}
    heads, priors, probe_data = {}, {}, None
    if asked.tasks:
        pairs = tasks_from_json(asked.tasks)
        heads = heads_from_arrays([t for t, _ in pairs], _arrays(msg.content[Record.ARRAYS]))
        priors = {t.name: p for t, p in pairs}
        probe_data = site_probe_data(runtime.probe_inputs(query.preset, query.encoder_sha256))
    scores, sums = site_generation_scores(site, _arrays(msg.content[Record.FEATURES]), kernels, probe_data, heads, priors,
                                          seed=asked.seed)
    reply = ScoresReply(site_id=runtime.site_id, scores=scores)
    return _reply(msg, reply, sums or None, {NUM_EXAMPLES: float(scores["n_held"])})


def _trend_census(msg: Message, query: Query, config: ConfigRecord, runtime: SiteRuntime) -> Message:
    census = trend_census(runtime.inputs(get_stage(DIT), query.preset, query.encoder_sha256))
    return _reply(msg, ScoresReply(site_id=runtime.site_id, scores=census), None, {NUM_EXAMPLES: float(census["n_pairs"])})


def _forecast_scores(msg: Message, query: Query, config: ConfigRecord, runtime: SiteRuntime) -> Message:
    """Forecasts of this site's held-out subjects against their follow-ups: sums of errors only."""
    asked = ForecastScoresQuery.from_config(config)
    site = runtime.inputs(get_stage(DIT), query.preset, query.encoder_sha256)
    dit = load_arrays(DiT(DiTConfig.from_dict(asked.dit_config)), _arrays(msg.content[Record.DIT])).eval()
    decoder = load_arrays(CNNDecoder(DecoderConfig.from_dict(asked.decoder_config)), _arrays(msg.content[Record.DECODER])).eval()
    models = GenerationModels(site.data.preset, decoder.to(runtime.device), dit.to(runtime.device), site.tokens.encoder,
                              site.tokens.encoder_sha256, {}, None, runtime.device)
    scores = site_forecast_scores(models, site, TrendModel.from_json(asked.trend), steps=asked.steps,
                                  guidance_scale=asked.guidance_scale, seed=asked.seed)
    return _reply(msg, ScoresReply(site_id=runtime.site_id, scores=scores), None, {NUM_EXAMPLES: float(scores["n_subjects"])})


QUERIES: dict[Action, Callable[[Message, Query, ConfigRecord, SiteRuntime], Message]] = {
    Action.HELLO: _hello,
    Action.INSTALL_ENCODER: _install_encoder,
    Action.TOKEN_MOMENTS: _token_moments,
    Action.PROBE_CENSUS: _probe_census,
    Action.PRIVACY_AUDIT: _privacy_audit,
    Action.GENERATION_SCORES: _generation_scores,
    Action.TREND_CENSUS: _trend_census,
    Action.FORECAST_SCORES: _forecast_scores,
}
if set(QUERIES) != set(Action):  # a new Action without a handler is an error at import, not at the first query
    raise ImportError(f"client.app: no handler for {sorted(set(Action) - set(QUERIES))}")


@app.query()
@_guarded
def query(msg: Message, config: ConfigRecord, runtime: SiteRuntime) -> Message:
    asked = Query.from_config(config)
    return QUERIES[asked.action](msg, asked, config, runtime)
