"""The demo at `tiny` size end to end (real cohort, real Flower simulation, real checkpoints), and the
HTML report it writes: every figure referenced and readable, tables equal to the run folder's files.

One demo run is shared by the assertions below (module fixture); the pure helpers are tested alone.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from braing3n_core.figures import mid_slices, plot_montage
from braing3n_core.jobs.report import (
    AGGREGATE,
    FIGURE_DIR,
    ReportError,
    fmt,
    probe_rows,
    read_run,
    series,
    write_report,
)

TINY_RUN = {
    "name": "demo-tiny", "preset": "tiny", "seed": 0, "min_sites": 2, "round_timeout_s": 300, "update_norm_bound": 100.0,
    "stages": [
        {"name": "mae", "rounds": 2, "local_steps": 2, "batch_size": 2},
        {"name": "decoder", "rounds": 2, "local_steps": 2, "batch_size": 2},
        {"name": "dit", "rounds": 2, "local_steps": 2, "batch_size": 4},
    ],
    "probes": {"enabled": True, "rounds": 2, "local_steps": 10},
}


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (and a check that it is a PNG at all)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR" and data.rstrip().endswith(b"IEND\xaeB`\x82"), f"{path} is truncated"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


# --- pure helpers ---------------------------------------------------------------------------------------------


def test_mid_slices_are_the_three_orthogonal_centre_planes() -> None:
    volume = np.zeros((10, 12, 14), dtype=np.float32)
    volume[5, :, :] += 1  # sagittal centre plane
    volume[:, 6, :] += 2  # coronal
    volume[:, :, 7] += 4  # axial
    planes = dict(mid_slices(volume))
    assert planes["sagittal"].shape == (14, 12) and planes["coronal"].shape == (14, 10) and planes["axial"].shape == (12, 10)
    assert np.all(planes["sagittal"] >= 1) and np.all(planes["coronal"] >= 2) and np.all(planes["axial"] >= 4)
    with pytest.raises(ValueError, match="expected a"):
        mid_slices(np.zeros((3, 3)))


def test_montage_is_a_valid_png(tmp_path: Path) -> None:
    rows = [[("a", np.random.default_rng(0).normal(size=(8, 10, 8))), ("b", np.zeros((8, 10, 8)))]]
    path = plot_montage(rows, tmp_path / "m.png", ["row"])
    width, height = png_size(path)
    assert width > height > 50


def test_a_folder_that_is_not_a_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no run.yaml"):
        write_report(tmp_path)
    (tmp_path / "run.yaml").write_text("name: x\n")
    with pytest.raises(ReportError, match="metrics.jsonl"):
        write_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"stage": "mae"\n{"stage": "mae", "round": 1}\n')
    with pytest.raises(ReportError, match="line 1 is not valid JSON"):
        write_report(tmp_path)


def test_fmt() -> None:
    assert fmt(None) == fmt(math.nan) == "—"
    assert fmt(0.12345) == "0.123" and fmt(3) == "3" and fmt(1000.0) == "1000" and fmt(1.5e-5) == "1.5e-05"


# --- the demo at tiny size ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from braing3n_core.jobs.demo import run_demo

    root = tmp_path_factory.mktemp("demo")
    config = root / "tiny-demo.yaml"
    config.write_text(yaml.safe_dump(TINY_RUN))
    out = root / "demo"
    code = run_demo(out, subjects_per_site=4, voxel_mm=4.0, run_config=config)
    assert code == 0
    return out


slow = pytest.mark.slow


@slow
def test_demo_writes_a_report_of_a_complete_run(demo_run: Path) -> None:
    assert (demo_run / "run_complete.json").is_file()
    for stage in ("mae", "decoder", "dit"):
        assert (demo_run / "checkpoints" / stage / "final.json").is_file()
    demo = json.loads((demo_run / "demo.json").read_text())
    names = [p["name"] for p in demo["phases"]]
    assert len(names) == 5 and names[0].startswith("synthetic cohort") and names[-1] == "report"
    assert demo["total_seconds"] >= sum(p["seconds"] for p in demo["phases"]) * 0.99
    assert sorted(demo["cohort"]["usable_scans"]) == ["site-a", "site-b", "site-c", "site-d"]


@slow
def test_every_referenced_figure_exists_and_is_a_png(demo_run: Path) -> None:
    page = (demo_run / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert f"{FIGURE_DIR}/curves-mae.png" in sources and f"{FIGURE_DIR}/samples.png" in sources
    pngs = sorted(p.relative_to(demo_run).as_posix() for p in (demo_run / FIGURE_DIR).glob("*.png"))
    assert sorted(sources) == pngs  # every figure is on the page, nothing on the page is missing
    for source in sources:
        width, height = png_size(demo_run / source)
        assert width > 100 and height > 100, source
    assert "is missing" not in page


@slow
def test_curves_are_drawn_from_the_ledger(demo_run: Path) -> None:
    contents = read_run(demo_run)
    plotted = json.loads((demo_run / FIGURE_DIR / "curves.json").read_text())
    assert set(plotted) == {"mae", "decoder", "dit"}
    for stage in ("mae", "decoder", "dit"):
        lines = plotted[stage]["train:train/loss"]
        assert set(lines) == {"site-a", "site-b", "site-c", "site-d", AGGREGATE}
        for site, points in lines.items():
            from_ledger = [(r["round"], r["train/loss"]) for r in contents.records
                           if r["kind"] == "train" and r["stage"] == stage and r["site"] == site]
            assert [tuple(p) for p in points] == sorted(from_ledger) and len(points) == 2
    # the validation table shows the pooled value of the last evaluated round
    last = [r for r in contents.records if r["kind"] == "evaluate" and r["stage"] == "decoder" and r["site"] == AGGREGATE][-1]
    page = (demo_run / "report.html").read_text()
    assert f"<td>{fmt(last['val/psnr'], 4)}</td>" in page
    assert series(contents.records, "mae", "train", "train/loss", "site-a") == [tuple(p) for p in plotted["mae"]["train:train/loss"]["site-a"]]


@slow
def test_probe_table_reflects_probes_json(demo_run: Path) -> None:
    probes = json.loads((demo_run / "probes.json").read_text())
    showcase = json.loads((demo_run / FIGURE_DIR / "showcase.json").read_text())
    headers, rows = probe_rows(probes, showcase["centralized_probes"])
    assert headers[:4] == ["task", "metric", "pooled", "chance"] and "site-d" in headers and "centralized" in headers
    age = next(row for row in rows if row[0].startswith("age"))
    assert age[1] == "mae" and age[2] == fmt(probes["pooled"]["probe/age_mae"]) and age[3] == fmt(probes["pooled"]["probe/age_mae_chance"])
    assert age[4] == fmt(probes["sites"]["site-a"]["probe/age_mae"])
    page = (demo_run / "report.html").read_text()
    for row in rows:
        assert "".join(f"<td{' class=l' if i < 2 else ''}>{cell}</td>" for i, cell in enumerate(row)) in page


@slow
def test_showcase_numbers_are_real(demo_run: Path) -> None:
    from braing3n_core.jobs.showcase import DEMO_REQUESTS

    showcase = json.loads((demo_run / FIGURE_DIR / "showcase.json").read_text())
    recon = showcase["reconstructions"]
    assert len(recon["items"]) == 4 and {i["site"] for i in recon["items"]} == {"site-a", "site-b", "site-c", "site-d"}
    assert all(math.isfinite(i["psnr"]) and -1 <= i["ssim"] <= 1 for i in recon["items"])
    assert math.isclose(recon["mean_psnr"], np.mean([i["psnr"] for i in recon["items"]]))
    assert [i["label"] for i in showcase["samples"]["items"]] == [r.label for r in DEMO_REQUESTS]
    import nibabel as nib

    first = nib.load(demo_run / showcase["samples"]["items"][0]["nifti"])
    assert first.shape == (40, 48, 40) and np.isfinite(np.asarray(first.dataobj)).all()
    forecast = showcase.get("forecast")
    if forecast is not None:  # the tiny cohort may hold no held-out follow-up
        assert forecast["followup_age"] > forecast["baseline_age"] and forecast["interval"] > 0
    page = (demo_run / "report.html").read_text()
    assert fmt(recon["mean_psnr"], 2) in page and "this machine" in page


@slow
def test_report_cli_embeds_figures_for_a_copy_elsewhere(demo_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy.html"
    done = subprocess.run([sys.executable, "-m", "braing3n_core.cli", "report", str(demo_run), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    assert 'src="data:image/png;base64,' in page and f'src="{FIGURE_DIR}/' not in page


@slow
def test_demo_refuses_to_mix_runs(demo_run: Path) -> None:
    from braing3n_core.jobs.demo import DemoError, run_demo

    with pytest.raises(DemoError, match="--resume"):
        run_demo(demo_run)
