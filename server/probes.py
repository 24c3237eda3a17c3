"""The federated linear-probe benchmark of the frozen encoder.

1. `probe_census` query: each site embeds its own scans with the frozen encoder (pooled = mean of its
   cached tokens) and returns only aggregates: feature sums (n, Σx, Σx²) over its train+val subjects
   and label counts/sums (`federated.label_census`), and for each numeric label the second moments of its
   labelled train+val rows per subject-grouped fold (`federated.ridge_census`).
2. The server picks the tasks the federation can probe (same thresholds as the centralised
   `probes.select_tasks`) and builds one `LinearHead` per task, standardised with the combined sums.
   Regression heads are solved there in closed form: the ridge of all sites' rows pooled, α chosen by
   5-fold cross-validation computed exactly from the fold sums (`heads.fit_ridge`), the centralised
   probe's α grid.
3. `rounds` rounds of FedAvg for the classification heads only: sites run `LinearHead.fit_steps` on their
   own rows; each head is averaged over the sites holding rows of its task, weighted by those rows. Heads
   are checkpointed per round (`checkpoints/probes/round-NNNN`, the plan in the manifest), so probes
   resume too.
4. An evaluate message: each site scores every head on its held-out test subjects with
   `probes.evaluate_predictions`, and returns additive prediction summaries (`federated.prediction_sums`:
   error sums, confusion matrix, class-probability histograms) from which the server computes the
   pooled metrics of all held-out rows together (exact for MAE/R²/r/balanced accuracy, AUROC to
   histogram resolution); per-site and pooled results go to metrics.jsonl (kind "probe") and `probes.json`.

No scan, embedding or label leaves a site: replies carry head weights, sums and counts only.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from flwr.app import MessageType

from braing3n_core.evaluation.heads import FeatureStats
from braing3n_core.federation.probes import (
    aggregate_heads,
    head_arrays,
    plan_probes,
    plan_to_json,
    pooled_probe_metrics,
    sgd_tasks,
    task_arrays,
    tasks_from_json,
)
from braing3n_core.federation.protocol import Action, ProbeCensus, ProbeRoundRequest, Record
from braing3n_core.federation.run_folder import RoundCheckpoint
from braing3n_core.fileio import atomic_write_json, json_safe
from braing3n_core.stage_names import PROBES
from server.aggregation import metric_record, reply_site, screen_replies, to_array_record
from server.session import Federation, FederationError, message, say

STAGE = PROBES


def _census(federation: Federation) -> dict[str, Any]:
    replies = federation.query(Action.PROBE_CENSUS, STAGE)
    censuses, stats, moments = [], [], []
    for reply in replies:
        arrays = {k: v.numpy() for k, v in reply.content[Record.ARRAYS].items()}
        if not all(np.all(np.isfinite(v)) for v in arrays.values()):
            federation.run.log(STAGE, 0, reply_site(reply, federation.node_sites), "rejected", reason="non-finite feature sums")
            continue
        stats.append(FeatureStats.from_arrays(arrays))
        moments.append({k: v for k, v in arrays.items() if k.startswith("ridge.")})
        censuses.append(ProbeCensus.from_config(reply.content.config_records[Record.SITE]).census)
    if len(stats) < federation.config.min_sites:
        raise FederationError(f"probe census from {len(stats)} sites; min_sites is {federation.config.min_sites}")
    plan = plan_probes(censuses, stats, moments)
    return {"plan": plan_to_json(plan), "tasks_json": plan.tasks_json(), "arrays": head_arrays(plan.heads())}


def run_probes(federation: Federation) -> None:
    run, settings = federation.run, federation.config.probes
    if run.is_final(STAGE):
        say("probes: already finished, skipped")
        return
    federation.ensure_encoder(STAGE)
    last = run.latest_round(STAGE)
    if last is None:
        setup = _census(federation)
        plan, tasks_json, arrays, start = setup["plan"], setup["tasks_json"], setup["arrays"], 1
        for skipped in plan["skipped"]:
            say(f"probes: task {skipped['task']} skipped: {skipped['reason']}")
        for name, fit in plan["ridge"].items():
            say(f"probes: {name}: closed-form ridge, alpha {fit['alpha']:g} by cross-validation")
    else:
        plan, tasks_json, arrays, start = last.meta["plan"], last.meta["tasks_json"], last.model, last.server_round + 1
        say(f"probes: resuming after round {last.server_round}")
    tasks = [task for task, _ in tasks_from_json(tasks_json)]
    if not tasks:
        raise FederationError(f"probes: no task can be probed on this federation ({plan['skipped']})")
    trained = sgd_tasks(tasks)
    trained_names = {task.name for task in trained}
    trained_json = json.dumps([item for item in json.loads(tasks_json) if item["name"] in trained_names])
    meta = {"plan": plan, "tasks_json": tasks_json, "rounds": settings.rounds, "encoder_sha256": federation.encoder_sha,
            "run": federation.config.name}
    if not trained and last is None:  # only closed-form heads: the plan is the result, checkpointed as round 1
        run.save_round(RoundCheckpoint(STAGE, 1, arrays, {}, meta))
    last_round = settings.rounds if trained else 0
    request = lambda server_round, asked=tasks_json: ProbeRoundRequest(  # noqa: E731
        stage=STAGE, tasks=asked, server_round=server_round, local_steps=settings.local_steps, lr=settings.lr,
        batch_size=settings.batch_size, weight_decay=settings.weight_decay, seed=federation.config.seed,
        preset=federation.config.preset, encoder_sha256=federation.encoder_sha)
    for server_round in range(start, last_round + 1):
        started = time.perf_counter()
        sent = task_arrays(arrays, trained)  # the closed-form ridge heads do not travel in training rounds
        record = to_array_record(sent)
        messages = [message(n, MessageType.TRAIN, request(server_round, trained_json), arrays={Record.ARRAYS: record})
                    for n in federation.wait_for_nodes()]
        replies = federation.send(federation.inject_faults(messages, STAGE, server_round), STAGE, server_round)
        accepted, verdicts = screen_replies(replies, sent, federation.config.update_norm_bound, federation.node_sites)
        federation.log_verdicts(STAGE, server_round, verdicts, replies)
        if len(accepted) < federation.config.min_sites:
            raise FederationError(f"probes round {server_round}: {len(accepted)} accepted replies, "
                                  f"min_sites is {federation.config.min_sites}")
        contributions = [({k: v.numpy() for k, v in m.content[Record.ARRAYS].items()},
                          dict(metric_record(m.content))) for m in accepted]
        arrays = {**arrays, **aggregate_heads(trained, sent, contributions)}
        run.log(STAGE, server_round, "aggregate", "train", sites=len(accepted), round_seconds=time.perf_counter() - started)
        run.save_round(RoundCheckpoint(STAGE, server_round, arrays, {}, meta))
        federation.write_state()
        say(f"probes: round {server_round}/{settings.rounds} ({len(accepted)} sites)")
    evaluate(federation, tasks, arrays, plan, request(settings.rounds))
    run.mark_final(STAGE)
    federation.write_state()


def _readable(metrics: dict[str, Any]) -> dict[str, Any]:
    """A site's probe metrics without the prediction sums used for pooling."""
    return {k: v for k, v in metrics.items() if not k.startswith("sums/")}


def evaluate(federation: Federation, tasks, arrays, plan: dict[str, Any], request: ProbeRoundRequest) -> None:
    rounds = federation.config.probes.rounds
    record = to_array_record(arrays)
    messages = [message(n, MessageType.EVALUATE, request, arrays={Record.ARRAYS: record})
                for n in federation.wait_for_nodes()]
    replies = federation.log_declines(federation.send(messages, STAGE, rounds), STAGE, rounds)
    per_site: dict[str, dict[str, float]] = {}
    for reply in replies:
        site = reply_site(reply, federation.node_sites)
        per_site[site] = dict(metric_record(reply.content))
        federation.run.log(STAGE, rounds, site, "probe", **_readable(per_site[site]))
    pooled = pooled_probe_metrics(tasks, per_site)
    federation.run.log(STAGE, rounds, "aggregate", "probe", sites=len(per_site), **pooled)
    atomic_write_json(federation.run.probes_path, {
        "encoder_sha256": federation.encoder_sha, "rounds": rounds, "settings": federation.config.probes.model_dump(),
        "tasks": plan["tasks"], "skipped": plan["skipped"], "ridge": plan["ridge"],
        "pooled": json_safe(pooled), "sites": {s: json_safe(_readable(m)) for s, m in sorted(per_site.items())},
    })
    for task in tasks:
        main = task.metric_names[0]
        say(f"probes: {task.name}: pooled {main.split('/')[1]} {pooled[main]:.3f} (chance {pooled[main + '_chance']:.3f})")
