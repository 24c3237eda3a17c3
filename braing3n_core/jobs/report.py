"""`braing3n report RUN_DIR`: one HTML page that explains a federated run folder.

The report is a pure function of the run folder (`server/state.py` describes its layout): it reads
`run.yaml`, `metrics.jsonl`, `messages.jsonl`, `server_state.json`, `probes.json`, `run_complete.json`
and, when the demo (or `braing3n_core.jobs.showcase`) put them there, `report/showcase.json` (reconstructions,
conditional samples, a forecast, centralized probes) and `demo.json` (phase timings). Nothing is
recomputed and no number is typed in by hand: every value on the page comes from those files.

Output: `<run>/report.html` plus its figures in `<run>/report/*.png`, referenced relatively (the folder
can be moved or zipped as a whole), or embedded as base64 with `embed_images=True` (one file to mail).
`<run>/report/curves.json` holds the exact series each curve figure was drawn from.

Figures are small matplotlib functions (`plot_stage_curves`, `plot_montage`), each writing one PNG.
"""

from __future__ import annotations

import base64
import html
import json
import math
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import yaml

from braing3n_core.errors import BadInput
from braing3n_core.federation.run_folder import RunFolder
from braing3n_core.figures import DISPLAY_WINDOW, _save
from braing3n_core.fileio import atomic_write_bytes, atomic_write_json
from braing3n_core.jobs.report_figures import (
    forecast_figure,
    guidance_figure,
    privacy_figure,
    privacy_series,
    privacy_utility_figure,
)

matplotlib.use("Agg")  # files only: the report is written on servers without a display


FIGURE_DIR = RunFolder.FIGURES


AGGREGATE = "aggregate"


# Per stage: the validation metrics plotted and tabulated (metric name vocabulary of stages.py).
VALIDATION_METRICS: dict[str, tuple[str, ...]] = {
    "mae": ("val/masked_l1",),
    "decoder": ("val/psnr", "val/ssim", "val/l1"),
    "dit": ("val/flow_loss",),
}


HIGHER_IS_BETTER = {"val/psnr", "val/ssim"}


class ReportError(BadInput, RuntimeError):
    """The folder is not a readable run folder; the message names the file and the problem."""


@dataclass
class RunContents:
    root: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    messages: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    probes: dict[str, Any] | None = None
    complete: dict[str, Any] | None = None
    showcase: dict[str, Any] | None = None
    demo: dict[str, Any] | None = None

    @property
    def stages(self) -> list[str]:
        return [s["name"] for s in self.config.get("stages", [])]

    def sites(self) -> list[str]:
        return sorted({r["site"] for r in self.records if r.get("site") not in (None, AGGREGATE)})

    def of(self, kind: str, stage: str | None = None, site: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == kind and (stage is None or r.get("stage") == stage)
                and (site is None or r.get("site") == site)]


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ReportError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_run(run_dir: Path) -> RunContents:
    run = RunFolder(run_dir)
    if not run.is_run():
        raise ReportError(f"{run.root}: not a federated run folder (no run.yaml); run `braing3n simulate` first")
    try:
        config = yaml.safe_load(run.config_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ReportError(f"{run.config_path}: not valid YAML ({error})") from None
    if not isinstance(config, dict):
        raise ReportError(f"{run.config_path}: expected a mapping")
    try:
        records, messages = run.records(), run.messages()
    except ValueError as error:  # a ledger line cut or edited before its end
        raise ReportError(str(error)) from None
    if not records:
        raise ReportError(f"{run.metrics_path}: missing or empty; the run has not completed a round yet")
    return RunContents(
        root=run.root, config=config, records=records, messages=messages,
        state=_read_json(run.state_path) or {}, probes=_read_json(run.probes_path),
        complete=_read_json(run.complete_path), showcase=_read_json(run.showcase_path), demo=_read_json(run.demo_path),
    )


def series(records: Iterable[Mapping[str, Any]], stage: str, kind: str, metric: str, site: str) -> list[tuple[int, float]]:
    """(round, value) of one metric of one site (or the aggregate), in round order; missing/None skipped."""
    points = {}
    for record in records:
        if record.get("stage") == stage and record.get("kind") == kind and record.get("site") == site:
            value = record.get(metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                points[int(record["round"])] = float(value)
    return sorted(points.items())


def stage_panels(stage: str) -> list[tuple[str, str]]:
    """(kind, metric) of each panel of a stage's curve figure."""
    return [("train", "train/loss"), ("train", "update_norm")] + [("evaluate", m) for m in VALIDATION_METRICS.get(stage, ())]


def plot_stage_curves(contents: RunContents, stage: str, path: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """One figure per stage: training loss, update norm and validation metrics per round, one thin line
    per site and a thick black line for the aggregate (example-weighted mean of accepted replies for
    training, pooled validation). Returns the plotted series {"kind:metric": {site: [(round, value)]}}."""
    panels = [(k, m) for k, m in stage_panels(stage)
              if any(series(contents.records, stage, k, m, s) for s in contents.sites() + [AGGREGATE])]
    plotted: dict[str, dict[str, list[tuple[int, float]]]] = {}
    if not panels:
        return plotted
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    colours = plt.get_cmap("tab10")
    for axis, (kind, metric) in zip(axes[0], panels):
        lines: dict[str, list[tuple[int, float]]] = {}
        for index, site in enumerate(contents.sites()):
            points = series(contents.records, stage, kind, metric, site)
            if points:
                lines[site] = points
                axis.plot(*zip(*points), marker="o", markersize=3, linewidth=1, color=colours(index % 10), label=site)
        points = series(contents.records, stage, kind, metric, AGGREGATE)
        if points:
            lines[AGGREGATE] = points
            label = "pooled" if kind == "evaluate" else "aggregate"
            axis.plot(*zip(*points), marker="s", markersize=4, linewidth=2.2, color="black", label=label)
        plotted[f"{kind}:{metric}"] = lines
        axis.set_title(f"{stage}: {metric}" + (" (val)" if kind == "evaluate" else ""), fontsize=9)
        axis.set_xlabel("round", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, frameon=False)
    figure.tight_layout()
    _save(figure, path)
    return plotted


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1180px;margin:24px auto;
color:#1d232b;line-height:1.45;padding:0 16px}
h1{font-size:1.6em;margin-bottom:0}h2{border-bottom:1px solid #d7dce2;padding-bottom:4px;margin-top:2em}
table{border-collapse:collapse;margin:8px 0 16px;font-size:0.88em}th,td{border:1px solid #d7dce2;padding:3px 8px;
text-align:right}th{background:#f2f4f7}td.l,th.l{text-align:left}.muted{color:#66707c}.note{background:#f7f8fa;
border-left:3px solid #8aa4c8;padding:6px 12px;font-size:0.92em}img{max-width:100%;border:1px solid #e4e7eb}
.bad{color:#a3262b}code{background:#f2f4f7;padding:0 3px}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers as the tables show them: `digits` significant decimals, `—` for missing/NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) >= 100:
            return str(int(value))
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 10 ** -(digits)):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    return str(value)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], left: int = 1) -> str:
    head = "".join(f"<th{' class=l' if i < left else ''}>{_e(h)}</th>" for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f"<td{' class=l' if i < left else ''}>{c if isinstance(c, _Raw) else _e(c)}</td>"
                         for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


class _Raw(str):
    """Cell content that is already HTML."""


class _Images:
    """Image references: relative paths, or data URIs when embedding."""

    def __init__(self, root: Path, embed: bool) -> None:
        self.root, self.embed, self.used = root, embed, []

    def tag(self, relative: str, alt: str) -> str:
        path = self.root / relative
        if not path.is_file():
            return f"<p class=bad>figure {_e(relative)} is missing</p>"
        self.used.append(relative)
        source = ("data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()) if self.embed else relative
        return f'<img src="{_e(source)}" alt="{_e(alt)}">'


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    minutes, rest = divmod(float(seconds), 60.0)
    return f"{int(minutes)} min {rest:.0f} s" if minutes else f"{rest:.1f} s"


def _section_summary(c: RunContents) -> str:
    sites = c.sites()
    complete = c.complete
    status = "complete" if complete else "<span class=bad>not complete (resume with --resume)</span>"
    encoder = (complete or {}).get("encoder_sha256") or c.state.get("encoder_sha256")
    started = min((r["time"] for r in c.records if "time" in r), default=None)
    finished = (complete or {}).get("finished") or max((r["time"] for r in c.records if "time" in r), default=None)
    rows = [
        ("run", c.config.get("name", "—")), ("status", _Raw(status)), ("preset", c.config.get("preset", "—")),
        ("sites", f"{len(sites)}: {', '.join(sites)}"), ("seed", c.config.get("seed", "—")),
        ("min_sites / update-norm bound", f"{c.config.get('min_sites', '—')} / {fmt(c.config.get('update_norm_bound'))}"),
        ("federated run wall time", _duration((complete or {}).get("seconds"))),
        ("started / finished", f"{_clock(started)} / {_clock(finished)}"),
        ("frozen encoder (sha256)", (encoder[:16] + "…") if encoder else "—"),
    ]
    return "<h2>Run</h2>" + _table(["", ""], rows)


def _clock(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "—"


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"


def _section_settings(c: RunContents) -> str:
    rows = []
    for stage in c.config.get("stages", []):
        name = stage["name"]
        trains = c.of("train", name, AGGREGATE)
        seconds = [r["round_seconds"] for r in trains if isinstance(r.get("round_seconds"), (int, float))]
        sent = [m.get("records", {}) for m in c.messages if m.get("stage") == name and m.get("direction") == "out"
                and m.get("type") == "train"]
        sent_bytes = sum(rec.get("bytes", 0) for records in sent for rec in records.values() if rec.get("type") == "arrays")
        rounds_done = c.state.get("stages", {}).get(name, {}).get("completed_round", len(trains))
        strategy = stage.get("strategy", {})
        strategy_text = strategy.get("name", "fedavg") + "".join(
            f", {k} {fmt(v)}" for k, v in strategy.items() if k not in ("name", "eta_l"))
        rows.append((name, f"{rounds_done}/{stage['rounds']}", stage["local_steps"], stage.get("batch_size", "—"),
                     f"{stage['lr']:g}" if isinstance(stage.get("lr"), (int, float)) else "default", strategy_text, stage.get("warmup_rounds", 0),
                     f"{np.mean(seconds):.1f}" if seconds else "—",
                     _bytes(sent_bytes / max(1, len(trains))) if sent_bytes else "—"))
    probes = c.config.get("probes", {})
    html_out = "<h2>Settings</h2>" + _table(
        ["stage", "rounds done", "local steps", "batch", "peak lr", "strategy", "warm-up rounds", "s / round",
         "sent / round"], rows)
    if probes.get("enabled"):
        html_out += (f"<p>Federated linear probes: {probes.get('rounds')} rounds × {probes.get('local_steps')} local "
                     f"SGD steps per head (lr {fmt(probes.get('lr'))} / F, batch {probes.get('batch_size')}).</p>")
    if c.config.get("start_from"):
        html_out += "<p>Stages taken from checkpoints: " + ", ".join(
            f"<code>{_e(k)}</code> ← {_e(v)}" for k, v in c.config["start_from"].items()) + "</p>"
    html_out += "<details><summary>run.yaml (resolved)</summary><pre>" + _e(yaml.safe_dump(c.config, sort_keys=False)) + "</pre></details>"
    return html_out


def _section_timing(c: RunContents) -> str:
    if not c.demo:
        return ""
    phases = c.demo.get("phases", [])
    rows = [(p["name"], f"{p['seconds']:.1f}", f"{p.get('cpu_seconds', float('nan')):.0f}" if p.get("cpu_seconds") is not None else "—")
            for p in phases]
    total = c.demo.get("total_seconds")
    rows.append(("total", f"{total:.1f}" if total is not None else "—",
                 f"{sum(p.get('cpu_seconds') or 0 for p in phases):.0f}"))
    machine = c.demo.get("machine", {})
    load = machine.get("load_average_before"), machine.get("load_average_after")
    text = (f"<p class=muted>Machine: {_e(machine.get('cpus', '?'))} CPU cores, {_e(machine.get('device', 'cpu'))}; "
            f"load average before {_e(load[0])}, after {_e(load[1])} (other processes share the cores when it exceeds "
            f"the core count). CPU seconds count this process and its children (Flower, Ray, site clients).</p>")
    return "<h2>Timing</h2>" + _table(["phase", "wall s", "CPU s"], rows) + text


def _final_validation_rows(c: RunContents) -> list[tuple[Any, ...]]:
    rows = []
    for stage in c.stages:
        for metric in VALIDATION_METRICS.get(stage, ()):
            cells = []
            for site in c.sites() + [AGGREGATE]:
                points = series(c.records, stage, "evaluate", metric, site)
                cells.append(fmt(points[-1][1], 4) if points else "—")
            first = series(c.records, stage, "evaluate", metric, AGGREGATE)
            direction = "↑" if metric in HIGHER_IS_BETTER else "↓"
            rows.append((stage, f"{metric} {direction}", *cells,
                         f"{fmt(first[0][1], 4)} (round {first[0][0]})" if first else "—"))
    return rows


def _section_curves(c: RunContents, images: _Images, figures: Path) -> tuple[str, dict[str, Any]]:
    parts = ["<h2>Training and validation curves</h2>",
             "<p>Per stage and per site, from <code>metrics.jsonl</code>: the training loss of each site's local steps "
             "(mean over the round's steps), the norm of its update ‖w_site − w_global‖, and the validation metrics "
             "each site computes on its own validation subjects. Black: the aggregate (FedAvg weights by examples) "
             "and the pooled validation (example-weighted over sites).</p>"]
    plotted = {}
    for stage in c.stages:
        name = f"curves-{stage}.png"
        series_of_stage = plot_stage_curves(c, stage, figures / name)
        if series_of_stage:
            plotted[stage] = series_of_stage
            parts.append(f"<h3>{_e(stage)}</h3>" + images.tag(f"{FIGURE_DIR}/{name}", f"{stage} curves"))
    rows = _final_validation_rows(c)
    if rows:
        parts.append("<h3>Validation at the last evaluated round</h3>")
        parts.append(_table(["stage", "metric", *c.sites(), "pooled", "pooled, first evaluation"], rows, left=2))
    return "".join(parts), plotted


def probe_rows(probes: Mapping[str, Any], centralized: Mapping[str, Any] | None = None) -> tuple[list[str], list[tuple]]:
    """Headers and rows of the probe table: per task and metric, pooled (with chance), each site, and the
    centralized probe when given (ProbeReport.to_dict())."""
    sites = sorted(probes.get("sites", {}))
    central = {r["task"]: r for r in (centralized or {}).get("results", [])}
    headers = ["task", "metric", "pooled", "chance", *sites] + (["centralized", "chance (c.)"] if centralized else [])
    rows = []
    pooled = probes.get("pooled", {})
    for task in probes.get("tasks", []):
        name = task["name"]
        metrics = ("mae", "r2", "pearson_r") if task["kind"] == "regression" else ("auroc", "bacc")
        for i, metric in enumerate(metrics):
            key = f"probe/{name}_{metric}"
            label = name if i == 0 else ""
            if i == 0:
                counts = [int(probes["sites"][s].get(f"n/{name}") or 0) for s in sites]
                label = f"{name} (n={int(pooled.get(f'n/{name}') or sum(counts))} held-out)"
            row = [label, metric, fmt(pooled.get(key)), fmt(pooled.get(key + "_chance"))]
            row += [fmt(probes["sites"][s].get(key)) for s in sites]
            if centralized:
                result = central.get(name)
                row += [fmt(result["metrics"].get(key)), fmt(result["chance"].get(key))] if result else ["—", "—"]
            rows.append(tuple(row))
    return headers, rows


def _section_probes(c: RunContents) -> str:
    if not c.probes:
        return ""
    centralized = (c.showcase or {}).get("centralized_probes")
    headers, rows = probe_rows(c.probes, centralized)
    text = ["<h2>Linear probes on the frozen encoder</h2>",
            "<p>Federated benchmark: each site embeds its own scans with the frozen encoder (mean of the tokens), "
            "linear heads are trained by federated SGD, and each site scores them on its held-out test subjects; "
            "<b>pooled</b> = all sites' held-out scans together, computed from additive prediction sums (no "
            "prediction or label left a site). <b>chance</b> = a features-blind predictor (training mean or class "
            "prior). MAE in years (lower is better); R², Pearson r, AUROC and balanced accuracy higher is better.</p>"]
    if centralized:
        text.append("<p><b>centralized</b>: for comparison only, scikit-learn probes (inner cross-validated "
                    "regularisation) on the same frozen features pooled on one machine, trained on every site's "
                    "train+validation subjects and scored on the same held-out subjects — what federation avoids having "
                    "to do.</p>")
    text.append(_table(headers, rows, left=2))
    failed = (c.showcase or {}).get("centralized_probes_error")
    if failed:
        text.append(f"<p class=bad>The centralized comparison probes failed: {_e(failed)}</p>")
    skipped = c.probes.get("skipped", [])
    if skipped:
        text.append("<p class=muted>Tasks not probed: " + "; ".join(f"{_e(s['task'])} ({_e(s['reason'])})" for s in skipped) + "</p>")
    return "".join(text)


def _section_incidents(c: RunContents) -> str:
    incidents = [r for r in c.records if r.get("kind") in ("rejected", "declined", "fault_injected")]
    text = "<h2>Rejected and declined replies</h2>"
    if not incidents:
        return text + "<p>None: every site answered every round and every reply passed screening " \
                      "(finite values, expected shapes and dtypes, update norm within the bound).</p>"
    rows = [(r["stage"], r["round"], r["site"], r["kind"], r.get("reason") or r.get("fault") or "",
             fmt(r.get("update_norm"))) for r in incidents]
    return text + _table(["stage", "round", "site", "what", "reason", "update norm"], rows, left=5)


def _section_privacy(c: RunContents, images: _Images, figures: Path) -> str:
    """ε spent per site (DP-SGD at sites) and client-level ε, when the run used differential privacy."""
    drawn = privacy_figure(c.root, figures / "privacy.png")
    if drawn is None:
        return ""
    spent = privacy_series(c.root)
    rows = [(site, fmt(points[-1][1]), fmt(spent["budgets"].get(site))) for site, points in sorted(spent["sites"].items())]
    if spent["client"]:
        rows.append(("client-level (server accountant)", fmt(spent["client"][-1][1]), "—"))
    return ("<h2>Differential privacy</h2>" + images.tag(f"{FIGURE_DIR}/privacy.png", "privacy spent")
            + _table(["who", "ε spent at the end", "budget"], rows) + _privacy_utility_html(spent, images, figures))


PRIVACY_UTILITY = Path(__file__).resolve().parents[2] / "bench" / "results" / "privacy_utility.json"


def _privacy_utility_html(spent: Mapping[str, Any], images: _Images, figures: Path) -> str:
    """What this run's ε costs and buys, read off the measured curve (`bench/bench_privacy_utility.py`),
    when the checkout holds its result."""
    benchmark = _read_json(PRIVACY_UTILITY)
    if not benchmark or not benchmark.get("results"):
        return ""
    finals = [points[-1][1] for points in spent["sites"].values() if points] + [p[1] for p in spent["client"][-1:]]
    privacy_utility_figure(benchmark["results"], figures / "privacy_utility.png", max(finals) if finals else None)
    return ("<h3>What this ε costs and buys</h3><p>Measured by <code>bench/bench_privacy_utility.py</code> on the "
            "synthetic multi-site cohort (settings and seeds in its JSON). The vertical line marks this run's largest "
            "ε. The curve is the benchmark's, not this run's.</p>"
            + images.tag(f"{FIGURE_DIR}/privacy_utility.png", "privacy-utility curve"))


def _section_showcase(c: RunContents, images: _Images) -> str:
    show = c.showcase
    if not show:
        return ""
    parts = ["<h2>Reconstructions, samples and a forecast</h2>", f"<p class=note>{_e(show.get('where', ''))}</p>"]
    recon = show.get("reconstructions")
    if recon:
        parts.append("<h3>Reconstructions of held-out scans</h3><p>Input (preprocessed, z-scored) and the decoder's "
                     "output from the frozen encoder's tokens, three orthogonal mid-slices each, grey scale "
                     f"{DISPLAY_WINDOW[0]:g}…{DISPLAY_WINDOW[1]:g}. PSNR inside the brain mask, SSIM over the volume "
                     "(z-score window −5…5, `braing3n_core.evaluation.metrics`).</p>")
        parts.append(images.tag(recon["image"], "reconstructions"))
        rows = [(i["site"], i["subject"], i.get("session") or "—", i["modality"], fmt(i["psnr"], 2), fmt(i["ssim"]))
                for i in recon["items"]]
        rows.append(("mean", "", "", "", fmt(recon["mean_psnr"], 2), fmt(recon["mean_ssim"])))
        parts.append(_table(["site", "subject", "session", "modality", "PSNR dB", "SSIM"], rows, left=4))
    samples = show.get("samples")
    if samples:
        parts.append(f"<h3>Conditional samples</h3><p>The DiT samples encoder tokens for each set of conditions "
                     f"({samples['steps']} Heun steps, classifier-free guidance {fmt(samples['guidance'], 2)}, seed "
                     f"{samples['seed']}); the decoder turns them into volumes. Variables not listed are left "
                     f"unconditioned.</p>")
        parts.append(images.tag(samples["image"], "conditional samples"))
        probe_names = sorted({k for item in samples["items"] for k in item.get("probe_estimates", {})})
        if probe_names:
            parts.append("<p>What probes fitted on all real scans (centralized, comparison only) read from each "
                         "sample's tokens — a check that the conditions reached the sample:</p>")
            rows = [(item["label"], *[fmt(item["probe_estimates"].get(n), 1) if isinstance(item["probe_estimates"].get(n), float)
                                      else item["probe_estimates"].get(n, "—") for n in probe_names])
                    for item in samples["items"]]
            parts.append(_table(["requested", *[f"probe: {n}" for n in probe_names]], rows))
    forecast = show.get("forecast")
    if forecast:
        parts.append("<h3>Longitudinal forecast</h3>")
        parts.append(f"<p>{_e(forecast['description'])}</p>")
        parts.append(images.tag(forecast["image"], "forecast"))
        rows = [("forecast (baseline + decoded change) vs real follow-up", fmt(forecast.get("psnr_forecast"), 2),
                 fmt(forecast.get("ssim_forecast"))),
                ("baseline vs real follow-up (no-change reference)", fmt(forecast.get("psnr_baseline"), 2),
                 fmt(forecast.get("ssim_baseline")))]
        if forecast.get("psnr_direct") is not None:
            rows.append(("decoded forecast tokens alone vs real follow-up", fmt(forecast["psnr_direct"], 2),
                         fmt(forecast.get("ssim_direct"))))
        if forecast.get("psnr_forecast") is not None:
            parts.append(_table(["comparison", "PSNR dB", "SSIM"], rows))
    elif show.get("forecast_skipped"):
        parts.append(f"<h3>Longitudinal forecast</h3><p class=muted>{_e(show['forecast_skipped'])}</p>")
    return "".join(parts)


def find_generation_eval(root: Path) -> tuple[dict[str, Any], Path] | None:
    """The run's `generation_eval.json` and the run folder holding it: the run itself, or the evaluation
    run `braing3n evaluate-generation` writes beside it (`<run>-generation-eval/`)."""
    for folder in (root, root.with_name(root.name + "-generation-eval")):
        found = _read_json(RunFolder(folder).generation_eval_path)
        if found is not None:
            return found, folder
    return None


ADHERENCE_ROWS = ("age_mae", "age_pearson_r", "sex_auroc", "diagnosis_bacc", "modality_bacc", "field_strength_bacc", "mmse_mae")


def _section_generation(c: RunContents, images: _Images, figures: Path) -> str:
    """Adherence with its ceiling, floor and swapped control; FD/MMD with the real-vs-real floor; the sweep."""
    found = find_generation_eval(c.root)
    if found is None:
        return ""
    result, folder = found
    generation = result["generation"]
    best = f"guidance-{generation['default_guidance']:g}"
    adherence, ceiling = generation["adherence"], generation["ceiling"]["pooled"]
    guided = [n for n in adherence if n.startswith("guidance-")]
    headers = ["metric", *[f"generated g={n.removeprefix('guidance-')}" for n in guided], "swapped", "unconditioned",
               "real held-out", "chance"]
    rows = []
    for metric in ADHERENCE_ROWS:
        key = f"gen/adherence_{metric}"
        if not any(key in adherence[n]["token"] for n in adherence):
            continue
        rows.append((metric, *[fmt(adherence[n]["token"].get(key)) for n in guided], fmt(adherence["swapped"]["token"].get(key)),
                     fmt(adherence["unconditioned"]["token"].get(key)), fmt(ceiling.get(f"probe/{metric}")),
                     fmt(ceiling.get(f"probe/{metric}_chance"))))
    pooled = generation["pooled"]
    rvr = pooled["real_vs_real"].get("token", {})
    fidelity = []
    for name, spaces in pooled["sets"].items():
        for space, scores in spaces.items():
            fd, mm = scores["fd"], scores["mmd"]
            fidelity.append((name, space, f"{fmt(fd['value'])} [{fmt(fd['ci_low'])}, {fmt(fd['ci_high'])}]",
                             fmt(scores.get("fd_half", {}).get("value")), f"{fmt(mm['value'])} [{fmt(mm['ci_low'])}, {fmt(mm['ci_high'])}]",
                             fmt(generation["diversity"]["generated"].get(name))))
    parts = ["<h2>Generation: does a sample match what was asked?</h2>",
             f"<p class=note>{generation['n']} samples per set over a balanced condition table, {generation['steps']} "
             f"ODE steps; scored with the federated probes (token space) against the requested conditions. "
             f"Real held-out is the same probes on the sites' test scans (the ceiling); unconditioned is the floor; "
             f"swapped conditions are the positive control.</p>",
             _table(headers, rows),
             "<h3>Fidelity and diversity</h3>",
             f"<p class=note>Fréchet distance and MMD² of frozen-encoder features, generated vs all sites' held-out "
             f"scans (pooled from the sites' sums; interval: generated-side bootstrap). Real-vs-real between two "
             f"disjoint halves of the held-out subjects: FD {fmt(rvr.get('fd'))}, MMD² {fmt(rvr.get('mmd'))} at sizes "
             f"{_e(rvr.get('n'))}; compare it with the equal-size column. MS-SSIM of real held-out pairs: "
             f"{fmt(generation['diversity']['real'])}.</p>",
             _table(["set", "space", "FD [95 %]", "FD equal-size", "MMD² [95 %]", "MS-SSIM within set"], fidelity, left=2)]
    if guidance_figure(generation, figures / "guidance.png") is not None:
        parts.append(images.tag(f"{FIGURE_DIR}/guidance.png", "guidance sweep"))
    parts.append(f"<p class=note>Default guidance: {generation['default_guidance']:g} ({_e(best)}).</p>")
    montage = RunFolder(folder).figures_dir / str(generation.get("montage") or "generation_samples.png")
    if montage.is_file():
        if folder != c.root:  # the evaluation's own run folder: copy the figure to this report's
            shutil.copyfile(montage, figures / montage.name)
        parts.append("<h3>Samples per condition</h3>" + images.tag(f"{FIGURE_DIR}/{montage.name}", "generated samples"))
    forecast = result.get("forecast")
    if forecast:
        parts.append(_forecast_html(forecast, images, figures))
    return "".join(parts)


def _forecast_html(forecast: Mapping[str, Any], images: _Images, figures: Path) -> str:
    pooled = forecast["pooled"]
    parts = ["<h2>Forecasting: better than doing nothing?</h2>"]
    if not pooled.get("n_subjects"):
        notes = "; ".join(f"{s}: {v.get('note', '')}" for s, v in forecast["sites"].items())
        return parts[0] + f"<p class=bad>No site had enough held-out subjects with a follow-up ({_e(notes)}).</p>"
    mean = pooled["mean"]
    methods = ["forecast", "residual", "trend", "no_change"]
    rows = [(m, *[fmt(mean.get(f"change/{m}/{r}")) for r in ("brain", "gm", "wm", "csf", "mean")],
             fmt(mean.get(f"truth/{m}/mean")), fmt(mean.get(f"voxel/{m}/mae")), fmt(mean.get(f"voxel/{m}/ssim")))
            for m in methods]
    rows.append(("(measurement vs truth)", "", "", "", "", "", fmt(mean.get("truth/measured/mean")), "", ""))
    improvement = pooled.get("improvement", {})
    text = ", ".join(f"{m}: {100 * v['value']:+.0f} % [{100 * v['ci_low']:+.0f}, {100 * v['ci_high']:+.0f}]"
                     for m, v in improvement.items())
    parts += [f"<p class=note>{pooled['n_subjects']} held-out subjects with a real follow-up. Errors in ml of the "
              "predicted change of each region against the real follow-up's measured change (paired intensity "
              "classification from the baseline, evaluation/tissue.py); 'vs truth' against the synthetic cohort's true change. "
              f"Reduction of the mean error relative to no change: {_e(text)}.</p>",
              _table(["method", "brain", "GM", "WM", "CSF", "mean", "mean vs truth", "voxel MAE", "voxel SSIM"], rows)]
    if forecast_figure(pooled, figures / "forecast.png") is not None:
        parts.append(images.tag(f"{FIGURE_DIR}/forecast.png", "forecast errors"))
    return "".join(parts)


def write_report(run_dir: Path, out: Path | None = None, embed_images: bool = False) -> Path:
    """Write `<run_dir>/report.html` (or `out`) and its figures; returns the HTML path."""
    contents = read_run(run_dir)
    root = contents.root
    out = Path(out) if out is not None else RunFolder(root).report_path
    figures = RunFolder(root).figures_dir
    figures.mkdir(parents=True, exist_ok=True)
    # Relative references must resolve from the HTML's folder; a report written elsewhere embeds.
    embed = embed_images or out.resolve().parent != root.resolve()
    images = _Images(root, embed)
    curves_html, plotted = _section_curves(contents, images, figures)
    atomic_write_json(figures / "curves.json", plotted)
    title = f"BrainG3N-FL run {contents.config.get('name', root.name)}"
    body = "".join([
        f"<h1>{_e(title)}</h1><p class=muted>Written {_clock(time.time())} from {_e(root.resolve())} by "
        "<code>braing3n report</code>. Every number below is read from the run folder.</p>",
        _section_summary(contents), _section_timing(contents), _section_settings(contents), curves_html,
        _section_probes(contents), _section_showcase(contents, images), _section_generation(contents, images, figures),
        _section_privacy(contents, images, figures),
        _section_incidents(contents),
    ])
    page = f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title><style>{CSS}</style></head><body>{body}</body></html>"
    atomic_write_bytes(out, page.encode("utf-8"))
    return out
