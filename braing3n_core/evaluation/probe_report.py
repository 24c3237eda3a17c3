"""How a probe report reads in a terminal: one rich table per `ProbeReport`.
"""

from __future__ import annotations

import math

from rich.table import Table

from braing3n_core.evaluation.probes import ProbeReport


def render_report(report: ProbeReport) -> Table:
    """A rich table: one row per task metric with its score, its spread over folds and the chance level."""
    protocol = report.settings.get("protocol", "")
    title = "Linear probes" + (f" — {report.encoder}" if report.encoder else "") + (f" ({protocol})" if protocol else "")
    table = Table(title=title)
    for header in ("task", "metric", "value", "± folds", "chance", "train (subj.)", "scored (subj.)", "reg."):
        table.add_column(header, justify="left" if header in ("task", "metric") else "right")
    for r in report.results:
        for i, (name, value) in enumerate(r.metrics.items()):
            first = i == 0
            spread = r.fold_std.get(name, math.nan)
            table.add_row(
                r.task if first else "",
                name.split("/", 1)[1].removeprefix(f"{r.task}_"),
                f"{value:.3f}",
                f"{spread:.3f}" if math.isfinite(spread) else "",
                f"{r.chance[name]:.3f}",
                f"{r.n_train} ({r.n_train_subjects})" if first else "",
                f"{r.n_test} ({r.n_test_subjects})" if first else "",
                f"{r.regularisation:.3g}" if first else "",
            )
    for s in report.skipped:
        table.add_row(s.task, f"skipped: {s.reason}", "", "", "", "", "", "", style="dim")
    return table
