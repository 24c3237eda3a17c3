"""The generation proof (`braing3n evaluate-generation`): pooled distances, tissue volumes, the trend
baseline and the federated evaluation itself, on real NIfTI files, real tiny models and a real Flower
simulation.

The federated run is trained and evaluated once per module: `braing3n train mae/decoder/dit` (4 steps
each, `tiny`) on both conftest sites with a split that leaves 2 held-out subjects of 6 per site, then
`braing3n evaluate-generation --forecast` over the same two sites.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
import pytest
import yaml

from braing3n_core.checkpoint import load_checkpoint
from braing3n_core.cli import main
from braing3n_core.data.alignment import align_by_brain_mask
from braing3n_core.data.datasets import load_site
from braing3n_core.evaluation.metrics import MMDKernel, condition_adherence, frechet_distance, mmd
from braing3n_core.evaluation.pooled import (
    FeatureMoments,
    FourierKernel,
    KernelSums,
    frechet_from_moments,
    mmd_from_sums,
)
from braing3n_core.evaluation.tissue import tissue_change, tissue_volumes
from braing3n_core.federation.probes import heads_from_arrays, tasks_from_json
from braing3n_core.federation.run_folder import RunFolder
from braing3n_core.generation.condition_table import ConditionRow, balanced_conditions
from braing3n_core.generation.evaluation import SPACES, requested_table, swap_conditions
from braing3n_core.generation.forecast_eval import METHODS, TrendModel, longitudinal_pairs, trend_census
from braing3n_core.labels import Modality
from braing3n_core.presets import get_preset
from braing3n_core.site_config import SiteConfig
from braing3n_core.training.examples import SiteInputs
from client.site import SiteRuntime

TINY = get_preset("tiny")
SPLIT = {"seed": 0, "train": 0.5, "val": 0.17, "test": 0.33}


# --- pooled distances ------------------------------------------------------------------------------------------


def test_frechet_from_summed_moments_equals_the_distance_on_all_rows() -> None:
    rng = np.random.default_rng(0)
    real = rng.normal(size=(90, 12)) @ rng.normal(size=(12, 12))
    generated = rng.normal(0.3, 1.2, size=(40, 12))
    parts = [FeatureMoments.of(real[:20]), FeatureMoments.of(real[20:55]), FeatureMoments.of(real[55:])]
    pooled = frechet_from_moments(FeatureMoments.combine(parts), FeatureMoments.of(generated))
    assert pooled == pytest.approx(frechet_distance(real, generated), rel=1e-6)


def test_fourier_mmd_from_sums_tracks_the_exact_estimate_and_is_additive() -> None:
    rng = np.random.default_rng(1)
    x, same, shifted = rng.normal(size=(120, 6)), rng.normal(size=(100, 6)), rng.normal(0.8, 1.0, size=(100, 6))
    kernel = FourierKernel(6, bandwidth=3.0, seed=0, features=4096)
    exact = MMDKernel(bandwidth=3.0)
    for y in (same, shifted):
        assert mmd_from_sums(kernel.sums(x), kernel.sums(y)) == pytest.approx(mmd(x, y, kernel=exact), abs=0.01)
    split = KernelSums.combine([kernel.sums(x[:50]), kernel.sums(x[50:])])
    assert mmd_from_sums(split, kernel.sums(shifted)) == pytest.approx(mmd_from_sums(kernel.sums(x), kernel.sums(shifted)))
    assert mmd_from_sums(kernel.sums(x), kernel.sums(shifted)) > 10 * abs(mmd_from_sums(kernel.sums(x), kernel.sums(same)))


# --- tissue volumes ------------------------------------------------------------------------------------------------


def _phantom(intensities: dict[str, float]) -> tuple[np.ndarray, dict[str, int]]:
    """Nested spheres: white-matter core, grey-matter shell, CSF shell (noisy intensities), 0 outside."""
    grid = np.indices((40, 48, 40)).astype(float)
    radius = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, (20, 24, 20), strict=True)))
    labels = np.select([radius < 8, radius < 12, radius < 15], ["wm", "gm", "csf"], "")
    noise = np.random.default_rng(0).normal(0, 0.1, labels.shape)
    volume = np.where(labels == "", 0.0, np.vectorize(lambda k: intensities.get(k, 0.0))(labels) + noise)
    return volume, {k: int((labels == k).sum()) for k in ("wm", "gm", "csf")}


@pytest.mark.parametrize("modality, intensities", [
    (Modality.T1W, {"csf": -2.0, "gm": 0.0, "wm": 1.2}),
    (Modality.T2W, {"wm": -1.2, "gm": 0.0, "csf": 2.0}),
    (Modality.FLAIR, {"csf": -2.0, "wm": -0.3, "gm": 0.8}),
])
def test_tissue_volumes_recover_a_phantom_in_every_contrast(modality: Modality, intensities: dict[str, float]) -> None:
    volume, truth = _phantom(intensities)
    found = tissue_volumes(volume, modality, voxel_ml=0.064)
    for region in ("wm", "gm", "csf"):
        assert found[region] == pytest.approx(truth[region] * 0.064, rel=0.01)
    assert found["brain"] == pytest.approx(found["gm"] + found["wm"])


def _atrophy_phantom(gm_radius: float, intensities: dict[str, float], seed: int,
                     drift: tuple[float, float, float] | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """Nested spheres with partial-volume boundaries (one voxel wide), the grey-matter shell's outer radius
    `gm_radius`; `drift` = (gain, gain slope along the first axis, offset) applied to the intensities, a
    follow-up session's z-score shift and bias-field change. Returns the volume and each class's true voxels."""
    grid = np.indices((40, 48, 40)).astype(float)
    radius = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, (20, 24, 20), strict=True)))

    def inside(r: float) -> np.ndarray:
        return np.clip(r - radius + 0.5, 0.0, 1.0)

    fractions = {"wm": inside(8.0), "gm": inside(gm_radius) - inside(8.0), "csf": inside(15.0) - inside(gm_radius)}
    mask = radius < 15.0
    volume = sum(fractions[k] * intensities[k] for k in fractions) + np.random.default_rng(seed).normal(0, 0.1, mask.shape)
    if drift is not None:
        gain, slope, offset = drift
        volume = (gain + slope * np.linspace(-1.0, 1.0, 40)[:, None, None]) * volume + offset
    return np.where(mask, volume, 0.0), {k: float(f[mask].sum()) for k, f in fractions.items()}


@pytest.mark.parametrize("modality, intensities", [
    (Modality.T1W, {"csf": -2.0, "gm": 0.0, "wm": 1.2}),
    (Modality.T2W, {"wm": -1.2, "gm": 0.0, "csf": 2.0}),
    (Modality.FLAIR, {"csf": -2.0, "wm": -0.3, "gm": 0.8}),
])
def test_tissue_change_measures_atrophy_through_a_session_intensity_drift(modality: Modality,
                                                                          intensities: dict[str, float]) -> None:
    baseline, before = _atrophy_phantom(12.0, intensities, seed=0)
    follow_up, after = _atrophy_phantom(11.5, intensities, seed=1, drift=(1.08, 0.06, 0.15))  # grey matter → CSF
    true_loss = before["gm"] - after["gm"]  # ≈ 870 voxels
    measured = tissue_change(baseline, follow_up, modality, voxel_ml=1.0)
    assert measured["brain"] == pytest.approx(-true_loss, rel=0.12)
    assert measured["csf"] == pytest.approx(true_loss, rel=0.12)
    assert measured["brain"] == pytest.approx(measured["gm"] + measured["wm"])
    assert all(value == pytest.approx(0.0, abs=1e-6) for value in tissue_change(baseline, baseline, modality, 1.0).values())
    if modality is Modality.T1W:  # classifying each scan on its own is fooled by the drift (why the pair is matched)
        separate = tissue_volumes(follow_up, modality, 1.0, mask=baseline != 0)["gm"] - tissue_volumes(baseline, modality, 1.0)["gm"]
        assert abs(separate + true_loss) > 3 * abs(measured["gm"] + true_loss)


def test_a_follow_up_cropped_elsewhere_is_moved_back_onto_the_baseline_voxels() -> None:
    baseline, _ = _atrophy_phantom(12.0, {"csf": -2.0, "gm": 0.0, "wm": 1.2}, seed=0)
    follow_up, _ = _atrophy_phantom(11.5, {"csf": -2.0, "gm": 0.0, "wm": 1.2}, seed=1)
    cropped = np.roll(follow_up, (2, -1, 0), axis=(0, 1, 2))  # the phantom's background margin keeps the roll exact
    moved, shift = align_by_brain_mask(baseline, cropped)
    assert shift == (-2, 1, 0)
    np.testing.assert_array_equal(moved, follow_up)
    misplaced = tissue_change(baseline, cropped, Modality.T1W, 1.0)["brain"]
    assert abs(tissue_change(baseline, moved, Modality.T1W, 1.0)["brain"] - misplaced) > 100  # why it matters


# --- conditions and the adherence measurement --------------------------------------------------------------------


def test_swapped_conditions_change_every_variable() -> None:
    rows = balanced_conditions(16, seed=0)
    for row, swapped in zip(rows, swap_conditions(rows), strict=True):
        assert all(getattr(swapped, k) != getattr(row, k) for k in ("diagnosis", "sex", "modality", "field_strength"))
        assert abs(swapped.age - row.age) >= 10


# --- the trend baseline reads training subjects only ----------------------------------------------------------------


@pytest.fixture(scope="module")
def site_a(synthetic_cohort, tmp_path_factory) -> SiteInputs:
    folder = tmp_path_factory.mktemp("trend")
    config = SiteConfig.from_yaml(synthetic_cohort[0])
    path = folder / "site-a.yaml"
    path.write_text(yaml.safe_dump({**config.to_yaml_dict(), "cache_dir": str(folder / "cache"), "split": SPLIT}))
    return SiteInputs(load_site(SiteConfig.from_yaml(path), TINY, progress=False))


def test_trend_census_counts_training_pairs_and_ignores_held_out_subjects(site_a: SiteInputs) -> None:
    census = trend_census(site_a)
    assert census["n_pairs"] == len(longitudinal_pairs(site_a.data.splits["train"])) > 0
    held = [r for name in ("val", "test") for r in site_a.data.splits[name]]
    assert longitudinal_pairs(held), "the fixture needs a held-out subject with a follow-up"
    # Whatever the held-out subjects hold, the census is the same …
    without_held = dataclasses.replace(site_a.data, splits={**site_a.data.splits, "val": [], "test": []})
    assert trend_census(SiteInputs(without_held)) == census
    # … and a held-out subject moved into training would change it (the test can fail).
    leaked = dataclasses.replace(site_a.data, splits={**site_a.data.splits, "train": site_a.data.splits["train"] + held})
    assert trend_census(SiteInputs(leaked))["n_pairs"] > census["n_pairs"]


def test_trend_is_the_least_squares_slope_and_sparse_cells_fall_back() -> None:
    def cell(pairs: list[tuple[float, float]]) -> dict:  # (change in ml of every region, years)
        return {"n": len(pairs), "years_sq": sum(t * t for _, t in pairs),
                "change_years": {r: sum(d * t for d, t in pairs) for r in ("brain", "gm", "wm", "csf")}}

    # Two sites' sums add up: a 0.2-year pair with a noisy +5 ml weighs (0.2/3)² of a 3-year pair.
    site_1 = {"cells": {"AD|70-80": cell([(-12.0, 3.0), (5.0, 0.2)])}}
    site_2 = {"cells": {"AD|70-80": cell([(-8.0, 2.0)]), "CN|-60": cell([(40.0, 0.5)])}}
    model = TrendModel.fit([site_1, site_2])
    slope = (-12.0 * 3.0 + 5.0 * 0.2 - 8.0 * 2.0) / (9.0 + 0.04 + 4.0)
    assert model.rate("AD", 75.0)["brain"] == pytest.approx(slope)  # not the mean of ΔV/t, which is +5.7
    # The one-pair CN cell and the CN diagnosis (1 pair) fall back to all 4 pairs.
    everything = (-12.0 * 3.0 + 5.0 * 0.2 - 8.0 * 2.0 + 40.0 * 0.5) / (9.0 + 0.04 + 4.0 + 0.25)
    assert "CN|-60" not in model.rates and model.rate("CN", 50.0)["gm"] == pytest.approx(everything)
    assert TrendModel.from_json(model.to_json()) == model


# --- the federated evaluation ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluation(synthetic_cohort, tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("generation-eval")
    sites = []
    for source in synthetic_cohort:
        config = SiteConfig.from_yaml(source)
        path = root / f"{config.site_id}.yaml"
        path.write_text(yaml.safe_dump({**config.to_yaml_dict(), "cache_dir": str(root / "cache" / config.site_id),
                                        "split": SPLIT}))
        sites.append(path)
    run = root / "run"
    for stage in ("mae", "decoder", "dit"):
        assert main(["train", stage, "--sites", *map(str, sites), "--preset", "tiny", "--steps", "4", "--batch-size", "2",
                     "--checkpoint-every", "4", "--out", str(run)]) == 0
    out = root / "eval"
    assert main(["evaluate-generation", str(run), "--sites", *map(str, sites), "--out", str(out), "--n", "8",
                 "--steps", "2", "--guidance", "1.0,1.5", "--forecast"]) == 0
    return {"result": json.loads(RunFolder(out).generation_eval_path.read_text()), "out": out, "sites": sites}


def _lists(tree: Any, path: str = "") -> list[tuple[str, int]]:
    if isinstance(tree, dict):
        return [item for key, value in tree.items() for item in _lists(value, f"{path}/{key}")]
    if isinstance(tree, list):
        return [(path, len(tree))]
    return []


@pytest.mark.slow
def test_evaluation_reports_every_set_against_its_baselines(evaluation) -> None:
    generation = evaluation["result"]["generation"]
    names = {"guidance-1", "guidance-1.5", "swapped", "unconditioned", "noise"}
    assert set(generation["adherence"]) == names
    assert set(generation["pooled"]["sets"]) == names
    for name in names:
        for space in SPACES:
            fd = generation["pooled"]["sets"][name][space]["fd"]
            assert fd["ci_low"] <= fd["value"] <= fd["ci_high"] or math.isclose(fd["value"], fd["ci_low"])
    assert "probe/modality_bacc" in generation["ceiling"]["pooled"]  # the real held-out ceiling
    assert set(generation["ceiling"]["sites"]) == {"site-a", "site-b"}
    assert generation["pooled"]["real_vs_real"]["token"]["fd"] > 0
    assert 0 < generation["diversity"]["real"] < 1
    for site in generation["sites"].values():
        assert "real_vs_real" in site and set(site["sets"]) == names


@pytest.mark.slow
def test_adherence_measurement_catches_swapped_conditions_on_real_scans(evaluation) -> None:
    """The measurement's positive control: the eval's federated probes on real held-out features score the
    true conditions far better than the swapped ones (a generator that ignores its conditions is caught)."""
    run = RunFolder(evaluation["out"])
    probes = RunFolder.read(load_checkpoint(run.final_path("probes")))
    pairs = tasks_from_json(probes.meta["tasks_json"])
    heads = {name: head for name, head in heads_from_arrays([t for t, _ in pairs], probes.model).items() if name == "modality"}
    runtime = SiteRuntime(SiteConfig.from_yaml(evaluation["sites"][0]))
    site = runtime.probe_inputs("tiny", evaluation["result"]["encoder_sha256"])
    records = site.tokens.ensure(site.data.splits["test"])
    features = np.stack([site.tokens.tokens(r).mean(0).numpy() for r in records]).astype(np.float64)
    rows = [ConditionRow(modality=Modality(r.modality), age=r.labels.age, sex=r.labels.sex, diagnosis=r.labels.diagnosis)
            for r in records]
    true = condition_adherence(heads, features, requested_table(rows))["gen/adherence_modality_bacc"]
    swapped = condition_adherence(heads, features, requested_table(swap_conditions(rows)))["gen/adherence_modality_bacc"]
    assert true > 0.5 and swapped < true - 0.3


@pytest.mark.slow
def test_real_vs_real_is_below_real_vs_noise(evaluation) -> None:
    pooled = evaluation["result"]["generation"]["pooled"]
    rvr = pooled["real_vs_real"]["token"]["fd"]
    # Noise with the token marginals but none of their structure, at the size of a real half.
    assert rvr < pooled["sets"]["noise"]["token"]["fd"]["value"]


@pytest.mark.slow
def test_forecast_baselines_share_subjects_and_the_trend_is_fitted_on_training_pairs(evaluation) -> None:
    forecast = evaluation["result"]["forecast"]
    for path, site_id in zip(evaluation["sites"], ("site-a", "site-b"), strict=True):
        data = load_site(SiteConfig.from_yaml(path), TINY, progress=False)
        assert forecast["trend"]["training_pairs"][site_id] == len(longitudinal_pairs(data.splits["train"]))
    pooled = forecast["pooled"]
    if pooled["n_subjects"]:
        sums_counts = {key.split("/")[1] for key in pooled["mean"] if key.startswith("change/")}
        assert sums_counts == set(METHODS)
        for site in forecast["sites"].values():
            if "sums" in site:  # every method's errors are summed over the same subjects
                counts = {site["sums"][f"change/{m}/mean"][2] for m in METHODS}
                assert counts == {site["n_subjects"]}


@pytest.mark.slow
def test_no_site_sends_a_per_scan_feature_or_distance(evaluation) -> None:
    run = RunFolder(evaluation["out"])
    generation = evaluation["result"]["generation"]
    n_held = {site: scores["n_held"] for site, scores in generation["sites"].items()}
    replies = [m for m in run.messages() if m["direction"] == "in" and m["stage"] == "generation_eval"]
    assert replies
    for reply in replies:
        for record in reply.get("records", {}).values():
            if record["type"] == "arrays":
                for name, (shape, _) in record["arrays"].items():
                    # sums only: counts [1], Σx [F], Σxxᵀ [F, F], Σφ [D] — never a row per scan
                    assert len(shape) <= 2 and (len(shape) < 2 or shape[0] == shape[1]), name
                    assert shape[0] not in (n_held[reply["site"]],) or shape == [1], name
            elif record["type"] == "config":
                # `worker` is where the reply was computed (host/pid), never a scan's property
                assert set(record["keys"]) <= {"site-id", "worker", "scores", "has-encoder", "scans"}
    for site, scores in {**generation["sites"], **evaluation["result"]["forecast"]["sites"]}.items():
        for path, length in _lists(scores):
            assert length <= 3, f"{site}: {path} is a list of {length} values"


@pytest.mark.slow
def test_report_shows_the_generation_and_forecast_sections(evaluation) -> None:
    out = evaluation["out"]
    assert main(["report", str(out)]) == 0
    html = RunFolder(out).report_path.read_text(encoding="utf-8")
    assert "Generation: does a sample match what was asked?" in html and "Forecasting: better than doing nothing?" in html
    for figure in ("guidance.png", "generation_samples.png"):
        assert (RunFolder(out).figures_dir / figure).is_file()
