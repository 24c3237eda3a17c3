"""The end-to-end demo (README command 1): `braing3n demo [--out runs/demo]`.

An orchestrator; each phase is one call into the module that owns it:

1. synthetic cohort (`data.cohort.make_cohort`): 4 non-IID hospitals at 2 mm, BIDS, under `<out>/cohort`;
2. site checks (`data.checks.check_site`): what each hospital holds and what is wrong with it;
3. federated training (`simulate.simulate`, Flower's simulation engine): MAE → federated probes →
   decoder → DiT with `runs-config/demo.yaml`, the run folder being `<out>` itself;
4. showcase (`showcase.run_showcase`): centralized comparison probes, reconstructions of held-out scans,
   conditional samples and one longitudinal forecast, on the sites' own data;
5. report (`report.write_report`): `<out>/report.html` with its figures in `<out>/report/`.

Phase timings and the machine's load go to `<out>/demo.json` (the report shows them). The defaults are
sized so the whole demo fits 15 minutes on 2 CPU cores without a GPU; `run_config`, `voxel_mm` and
`subjects_per_site` exist so tests can run the same path at the `tiny` preset.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from braing3n_core.data.checks import check_site, render_site_report
from braing3n_core.data.cohort import CohortSpec, make_cohort
from braing3n_core.federation.run_folder import RunFolder
from braing3n_core.fileio import atomic_write_json
from braing3n_core.jobs.report import write_report
from braing3n_core.jobs.showcase import run_showcase
from braing3n_core.ops.flower import APP_DIR
from braing3n_core.ops.simulate import simulate
from braing3n_core.site_config import SiteConfig

DEMO_RUN_CONFIG = APP_DIR / "runs-config" / "demo.yaml"
DEMO_SUBJECTS_PER_SITE = 12


class DemoError(RuntimeError):
    """The demo cannot start or a phase failed; the message says what to do."""


@dataclass
class PhaseClock:
    """Wall time per phase, printed as each phase ends and kept for `demo.json`."""

    console: Console
    total: int
    started: float = field(default_factory=time.perf_counter)
    phases: list[dict] = field(default_factory=list)
    _current: tuple[str, float] | None = None

    def begin(self, title: str) -> None:
        self._current = (title, time.perf_counter())
        self.console.rule(f"[bold]{len(self.phases) + 1}/{self.total} {title}[/]  ({self.elapsed():.0f} s elapsed)")

    def end(self, summary: str = "") -> None:
        assert self._current is not None
        title, began = self._current
        seconds = time.perf_counter() - began
        self.phases.append({"name": title, "seconds": seconds})
        self.console.print(f"[green]✓[/] {title}: {seconds:.0f} s{(' — ' + summary) if summary else ''}  "
                           f"[dim](elapsed {self.elapsed():.0f} s)[/]")
        self._current = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def say(self, text: str) -> None:
        self.console.print(f"[dim]{self.elapsed():6.0f} s[/] {escape(text)}", highlight=False)


def _machine() -> dict:
    import torch

    return {"platform": platform.platform(), "cpus": os.cpu_count(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "load_average_before": [round(x, 2) for x in os.getloadavg()]}


def _server_lines(clock: PhaseClock):
    """Keep the ServerApp's own progress lines (`[braing3n …]`) and errors from Flower's stream."""

    def echo(line: str) -> None:
        text = line.rstrip()
        if "[braing3n" in text:
            clock.say(text[text.index("]") + 1 :].strip())
        elif "ERROR" in text or "Traceback" in text:
            clock.say(text)

    return echo


def run_demo(
    out_dir: Path = Path("runs/demo"),
    seed: int = 0,
    n_sites: int = 4,
    subjects_per_site: int = DEMO_SUBJECTS_PER_SITE,
    run_config: Path = DEMO_RUN_CONFIG,
    voxel_mm: float = 2.0,
    resume: bool = False,
    console: Console | None = None,
) -> int:
    """Run every phase; returns the process exit code (0 when the report was written)."""
    console = console or Console()
    out_dir = Path(out_dir).resolve()
    run = RunFolder(out_dir)
    existing = run.is_run() or run.has_started()
    if existing and not resume:
        raise DemoError(f"{out_dir} holds an earlier demo run: `braing3n demo --resume` continues it (and rewrites "
                        f"its report), `braing3n demo --out <another folder>` starts a new one, or delete {out_dir}")
    if not Path(run_config).is_file():
        raise DemoError(f"{run_config}: demo run configuration not found (the demo runs from a source checkout)")
    machine = _machine()
    clock = PhaseClock(console, total=5)
    console.print(f"[bold]BrainG3N-FL demo[/] → {out_dir}  ({machine['cpus']} CPU cores, {machine['device']}, "
                  f"load average {machine['load_average_before'][0]:.1f})")

    cohort_dir = run.cohort_dir
    site_yamls = sorted((cohort_dir / "sites").glob("*.yaml"))
    clock.begin(f"synthetic cohort: {n_sites} sites × {subjects_per_site} subjects at {voxel_mm:g} mm → {cohort_dir}")
    if resume and len(site_yamls) == n_sites:
        clock.end("kept the cohort of the run being resumed")
    else:
        site_yamls = make_cohort(CohortSpec(n_sites=n_sites, subjects_per_site=subjects_per_site, seed=seed,
                                            voxel_mm=voxel_mm, progress=console.is_terminal), out_dir=cohort_dir)
        clock.end(f"{len(site_yamls)} BIDS datasets and site YAMLs")

    clock.begin("site checks (each hospital's own data)")
    scans = {}
    for path in site_yamls:
        report = check_site(SiteConfig.from_yaml(path))
        render_site_report(report, console=console)
        scans[report.site_id] = len(report.usable_scans)
    usable = sum(scans.values())
    if not usable:
        raise DemoError(f"no usable scan in {cohort_dir}; see the site reports above")
    clock.end(f"{usable} usable scans: " + ", ".join(f"{k} {v}" for k, v in scans.items()))

    clock.begin(f"federated training on Flower's simulation engine ({len(site_yamls)} virtual sites, {run_config.name})")
    result = simulate(site_yamls, Path(run_config), out_dir, resume=resume or existing, echo=_server_lines(clock))
    clock.end(f"run folder {out_dir}")

    clock.begin("showcase: centralized probes, reconstructions, samples, forecast")
    configs = [SiteConfig.from_yaml(p) for p in site_yamls]
    run_showcase(out_dir, configs, say=clock.say)
    clock.end()

    clock.begin("report")
    machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    demo = {"phases": clock.phases, "total_seconds": clock.elapsed(), "machine": machine, "seed": seed,
            "cohort": {"sites": len(site_yamls), "subjects_per_site": subjects_per_site, "voxel_mm": voxel_mm,
                       "usable_scans": scans},
            "run_config": str(Path(run_config).resolve()), "federated_seconds": result.seconds}
    atomic_write_json(run.demo_path, demo)
    report_path = write_report(out_dir)
    clock.end(str(report_path))
    total = clock.elapsed()
    demo["phases"], demo["total_seconds"] = clock.phases, total
    atomic_write_json(run.demo_path, demo)
    write_report(out_dir)  # once more, so the page states the report phase and the final total too
    console.print(f"[bold green]demo finished in {total / 60:.1f} min ({total:.0f} s)[/]: report {report_path}")
    return 0
