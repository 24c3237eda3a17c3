"""ε over the run, per site, for the report: read from the run's `metrics.jsonl`, drawn with matplotlib.

Site-level lines are the sites' own cumulative ε (their ledgers, reported with every DP round); the
client-level line is the server's accountant (`kind == "client_dp"`). Budgets are drawn as dashed
lines, and a round a site declined for its budget is marked with a cross.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from braing3n_core.stage_names import STAGE_NAMES


def privacy_series(run_dir: Path) -> dict[str, Any]:
    """{"sites": {site: [(step, ε)]}, "budgets": {site: ε}, "declined": {site: [step]}, "client": [(step, ε)],
    "ticks": [(step, "stage r")]}; `step` counts rounds across stages in training order."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    rounds = sorted({(r["stage"], r["round"]) for r in records if r.get("stage") in STAGE_NAMES and r.get("round", 0) > 0},
                    key=lambda sr: (STAGE_NAMES.index(sr[0]), sr[1]))
    step = {key: i + 1 for i, key in enumerate(rounds)}
    out: dict[str, Any] = {"sites": {}, "budgets": {}, "declined": {}, "client": [],
                           "ticks": [(i, f"{s} {r}") for (s, r), i in step.items()]}
    for record in records:
        key = (record.get("stage"), record.get("round"))
        if key not in step:
            continue
        if record.get("kind") == "train" and record.get("privacy/epsilon") is not None and record.get("site") != "aggregate":
            out["sites"].setdefault(record["site"], []).append((step[key], float(record["privacy/epsilon"])))
            if record.get("privacy/budget") is not None:
                out["budgets"][record["site"]] = float(record["privacy/budget"])
        elif record.get("kind") == "declined" and "privacy budget" in str(record.get("reason", "")):
            out["declined"].setdefault(record["site"], []).append(step[key])
        elif record.get("kind") == "client_dp":
            out["client"].append((step[key], float(record["privacy/epsilon"])))
    return out


def privacy_figure(run_dir: Path, path: Path | None = None) -> Path | None:
    """Draw ε per site (and client-level ε) to `path` (default `<run>/report/privacy.png`); None if the
    run has no DP at all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = privacy_series(run_dir)
    if not series["sites"] and not series["client"]:
        return None
    path = Path(path) if path is not None else Path(run_dir) / "report" / "privacy.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(7.5, 3.8), dpi=120)
    colours: Mapping[str, Any] = {}
    for index, (site, points) in enumerate(sorted(series["sites"].items())):
        colour = f"C{index % 10}"
        colours = {**colours, site: colour}
        xs, ys = zip(*sorted(points))
        axis.plot(xs, ys, marker="o", color=colour, label=f"{site} (site, per subject)")
        if site in series["budgets"]:
            axis.axhline(series["budgets"][site], color=colour, linestyle="--", linewidth=0.8)
        for x in series["declined"].get(site, []):
            axis.plot([x], [series["budgets"].get(site, ys[-1])], marker="x", color=colour, markersize=9)
    if series["client"]:
        xs, ys = zip(*sorted(series["client"]))
        axis.plot(xs, ys, marker="s", color="black", label="client-level (server accountant)")
    ticks = series["ticks"]
    axis.set_xticks([t for t, _ in ticks], [label for _, label in ticks], rotation=60, fontsize=7)
    axis.set_ylabel("cumulative ε")
    axis.set_title("Privacy spent (dashed: budget, ×: round declined for the budget)", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    temp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temp)
    plt.close(figure)
    temp.replace(path)
    return path


def _save(figure: Any, path: Path, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp.png")
    figure.tight_layout(rect=rect)
    figure.savefig(temp)
    plt.close(figure)
    temp.replace(path)
    return path


def guidance_figure(generation: Mapping[str, Any], path: Path, metric: str = "gen/adherence_age_mae") -> Path | None:
    """The guidance sweep: `metric` (token space) and pooled FD per guidance, with the real ceiling and
    real-vs-real lines; None when the sweep has a single value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    guidance = [float(g) for g in generation["guidance"]]
    if len(guidance) < 2:
        return None
    names = [f"guidance-{g:g}" for g in guidance]
    adherence = [generation["adherence"].get(n, {}).get("token", {}).get(metric) for n in names]
    fd = [generation["pooled"]["sets"].get(n, {}).get("token", {}).get("fd", {}).get("value") for n in names]
    figure, left = plt.subplots(figsize=(6.0, 3.4), dpi=120)
    left.plot(guidance, [math_nan(v) for v in adherence], marker="o", color="C0", label=metric.removeprefix("gen/adherence_"))
    ceiling = generation["ceiling"]["pooled"].get("probe/" + metric.removeprefix("gen/adherence_"))
    if ceiling is not None:
        left.axhline(ceiling, color="C0", linestyle="--", linewidth=0.8, label="real held-out (ceiling)")
    left.set_xlabel("classifier-free guidance")
    left.set_ylabel(metric.removeprefix("gen/adherence_"), color="C0")
    right = left.twinx()
    right.plot(guidance, [math_nan(v) for v in fd], marker="s", color="C1", label="FD (token)")
    rvr = generation["pooled"]["real_vs_real"].get("token", {}).get("fd")
    if rvr is not None:
        right.axhline(rvr, color="C1", linestyle=":", linewidth=0.8, label="FD real-vs-real")
    right.set_ylabel("Fréchet distance", color="C1")
    left.set_title("Guidance sweep (dashed: real ceiling; dotted: real-vs-real)", fontsize=9)
    left.grid(alpha=0.3)
    return _save(figure, path)


def forecast_figure(pooled: Mapping[str, Any], path: Path) -> Path | None:
    """Mean regional volume-change error (ml) per method and region, over the held-out subjects."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = pooled.get("mean") or {}
    methods = sorted({k.split("/")[1] for k in mean if k.startswith("change/")})
    regions = ["brain", "gm", "wm", "csf"]
    if not methods:
        return None
    figure, axis = plt.subplots(figsize=(6.5, 3.4), dpi=120)
    width = 0.8 / len(methods)
    for index, method in enumerate(methods):
        axis.bar([r + index * width for r in range(len(regions))],
                 [mean.get(f"change/{method}/{region}", float("nan")) for region in regions], width, label=method)
    axis.set_xticks([r + 0.4 - width / 2 for r in range(len(regions))], regions)
    axis.set_ylabel("|predicted − real change| (ml)")
    axis.set_title(f"Regional volume-change error, {pooled.get('n_subjects', 0)} held-out subjects", fontsize=9)
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3, axis="y")
    return _save(figure, path)


def math_nan(value: Any) -> float:
    return float("nan") if value is None else float(value)


ATTACK_GOAL_AUC = 0.55  # the consortium's bar for a membership attack: barely better than a coin


def privacy_utility_figure(settings: Mapping[str, Any], path: Path, run_epsilon: float | None = None) -> Path:
    """`bench/bench_privacy_utility.py`'s curve: the federated diagnosis AUROC against the ε spent, the
    membership attacks' AUC on a second axis, chance and the no-DP values drawn; `run_epsilon` marks where a
    run's own ε falls on it (the report of a DP run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, left = plt.subplots(figsize=(7.5, 5.6), dpi=120)
    right = left.twinx()
    none = settings.get("no-dp")
    finite = [e for e in settings.values() if e["epsilon_target"] is not None and e["mode"] != "untrained"]
    for mode, marker in (("sample", "o"), ("client", "s")):
        entries = sorted((e for e in finite if e["mode"] == mode), key=lambda e: e["epsilon_target"])
        if not entries:
            continue
        xs = [e["metrics"]["epsilon_spent"]["mean"] for e in entries]
        for metric, axis, color, label in (("diagnosis_auroc", left, "tab:blue", "diagnosis AUROC"),
                                           ("mia_auc_mae", right, "tab:red", "MIA AUC, MAE"),
                                           ("mia_auc_dit", right, "tab:orange", "MIA AUC, DiT")):
            ys = [e["metrics"][metric]["mean"] for e in entries]
            errs = [e["metrics"][metric]["std"] for e in entries]
            axis.errorbar(xs, ys, yerr=errs, marker=marker, color=color, capsize=3,
                          linestyle="-" if mode == "sample" else "--", label=f"{label} ({mode}-level DP)")
    if none:
        left.axhline(none["metrics"]["diagnosis_auroc"]["mean"], color="tab:blue", linestyle=":", label="diagnosis AUROC, no DP")
        right.axhline(none["metrics"]["mia_auc_mae"]["mean"], color="tab:red", linestyle=":", linewidth=1,
                      label="MIA AUC MAE, no DP")
        right.axhline(none["metrics"]["mia_auc_dit"]["mean"], color="tab:orange", linestyle=":", linewidth=1,
                      label="MIA AUC DiT, no DP")
    untrained = settings.get("untrained")
    if untrained:
        for attack, color in (("mae", "tab:red"), ("dit", "tab:orange")):
            right.axhline(untrained["metrics"][f"mia_auc_{attack}"]["mean"], color=color, linestyle=(0, (1, 3)),
                          linewidth=1.5, label=f"MIA AUC {attack.upper()}, untrained (the splits' floor)")
    left.axhline(0.5, color="grey", linewidth=0.8)
    right.axhline(ATTACK_GOAL_AUC, color="tab:red", linewidth=0.6, alpha=0.5)
    left.text(0.01, 0.51, "chance (both AUCs)", transform=left.get_yaxis_transform(), fontsize=7, color="grey")
    right.text(0.99, ATTACK_GOAL_AUC + 0.01, f"attack goal ≤ {ATTACK_GOAL_AUC}", transform=right.get_yaxis_transform(), fontsize=7,
               color="tab:red", ha="right")
    if run_epsilon is not None and math.isfinite(run_epsilon) and run_epsilon > 0:
        left.axvline(run_epsilon, color="black", linewidth=1.2, label=f"this run: ε = {run_epsilon:.3g}")
    left.set_xscale("log")
    left.set_xlabel("ε spent (δ = 1e-5), log scale")
    left.set_ylabel("federated diagnosis AUROC (test subjects)")
    right.set_ylabel("membership-inference AUC (pooled over sites)")
    for axis in (left, right):
        axis.set_ylim(0.0, 1.0)
    handles = [h for axis in (left, right) for h in axis.get_legend_handles_labels()[0]]
    labels = [lab for axis in (left, right) for lab in axis.get_legend_handles_labels()[1]]
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=3, frameon=False)
    left.set_title("What ε costs (utility) and buys (attack AUC); mean ± sd over seeds", fontsize=9)
    return _save(fig, path, rect=(0, 0.17, 1, 1))
