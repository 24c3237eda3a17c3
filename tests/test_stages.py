"""The stage layer and the centralized trainer on a real (synthetic, tiny) BIDS cohort."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from braing3n_core.data.alignment import align_by_brain_mask
from braing3n_core.data.datasets import load_site
from braing3n_core.data.tokens import TokenCache, encoder_sha256
from braing3n_core.data.transforms import preprocess_scan
from braing3n_core.presets import get_preset
from braing3n_core.site_config import SiteConfig
from braing3n_core.training.centralized import TrainOptions, train_centralized
from braing3n_core.training.checkpoints import load_encoder, load_stage_model
from braing3n_core.training.examples import SiteInputs, longitudinal_pairs
from braing3n_core.training.stages import get_stage, stage_dataset

TINY = get_preset("tiny")


@pytest.fixture(scope="module")
def site_configs(synthetic_cohort, tmp_path_factory) -> list[SiteConfig]:
    """The shared cohort with caches redirected to this module's temp folder (the cohort is read-only)."""
    cache = tmp_path_factory.mktemp("stage-caches")
    return [
        SiteConfig.from_yaml(p).model_copy(update={"cache_dir": cache / SiteConfig.from_yaml(p).site_id})
        for p in synthetic_cohort
    ]


@pytest.fixture(scope="module")
def trained_run(site_configs, tmp_path_factory) -> Path:
    """All three stages trained centrally for a few steps each, in one run folder."""
    out = tmp_path_factory.mktemp("central-run")
    for stage, steps in (("mae", 6), ("decoder", 4), ("dit", 4)):
        train_centralized(site_configs, TrainOptions(stage=stage, preset="tiny", steps=steps, checkpoint_every=3,
                                                     out_dir=out, batch_size=2))
    return out


def test_all_three_stages_train_and_log(trained_run: Path) -> None:
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    stages = {r["stage"] for r in records}
    assert stages == {"mae", "decoder", "dit"}
    finals = {r["stage"]: r for r in records if r["step"] in (6, 4)}
    assert "val/masked_l1" in finals["mae"] and "val/psnr" in finals["decoder"] and "val/flow_loss" in finals["dit"]
    for record in records:
        assert record["train/examples"] > 0 and torch.isfinite(torch.tensor(record["train/loss"]))
    # Decoder and DiT checkpoints name the encoder they were trained on.
    decoder_meta = json.loads((trained_run / "checkpoints/decoder/step-000004.json").read_text())["meta"]
    encoder = load_encoder(trained_run / "checkpoints/mae/step-000006.json")
    assert decoder_meta["encoder_sha256"] == encoder_sha256(encoder)


def test_checkpoint_round_trips_bit_exactly(trained_run: Path) -> None:
    for stage, step in (("mae", 6), ("decoder", 4), ("dit", 4)):
        path = trained_run / f"checkpoints/{stage}/step-{step:06d}.json"
        model, checkpoint = load_stage_model(path, expected_stage=stage)
        for name, value in model.state_dict().items():
            if name in checkpoint.sub_state_dict("model"):
                assert torch.equal(value, checkpoint.sub_state_dict("model")[name]), (stage, name)


def test_training_resumes_from_the_last_checkpoint(site_configs, tmp_path: Path) -> None:
    options = TrainOptions(stage="mae", preset="tiny", steps=4, checkpoint_every=2, out_dir=tmp_path, batch_size=2)
    train_centralized(site_configs, options)
    first = (tmp_path / "metrics.jsonl").read_text().splitlines()
    final = train_centralized(site_configs, TrainOptions(**{**options.__dict__, "steps": 6}))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6]  # steps 1-4 were not repeated
    assert len(first) == 2 and final.name == "step-000006.json"


def test_token_cache_computes_each_scan_once_per_encoder(trained_run: Path, site_configs, tmp_path: Path) -> None:
    encoder = load_encoder(trained_run / "checkpoints/mae/step-000006.json")
    data = load_site(site_configs[0], TINY)
    calls = []
    encoder.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    cache = TokenCache(tmp_path, encoder, TINY, data.cache)
    records = data.splits["train"][:3]
    assert len(cache.ensure(records)) == 3
    assert sum(calls) == 3
    again = TokenCache(tmp_path, encoder, TINY, data.cache)
    again.ensure(records)
    assert sum(calls) == 3  # second run: no encoder call at all
    tokens = again.tokens(records[0])
    assert tokens.shape == (TINY.num_tokens, encoder.config.width)
    volume = torch.from_numpy(__import__("numpy").load(data.cache.path_for(cache.key(records[0]))))[None]
    with torch.no_grad():
        assert torch.allclose(encoder.encode(volume)[0][0], tokens, atol=1e-5)
    # A different encoder gets its own entries.
    other = load_encoder(trained_run / "checkpoints/mae/step-000003.json")
    assert TokenCache(tmp_path, other, TINY, data.cache).store.root != cache.store.root


def test_longitudinal_pairs_stay_within_a_subject_and_go_forward(trained_run: Path, site_configs) -> None:
    encoder = load_encoder(trained_run / "checkpoints/mae/step-000006.json")
    sites = []
    for config in site_configs:
        data = load_site(config, TINY)
        sites.append(SiteInputs(data, TokenCache(config.resolved_cache_dir, encoder, TINY, data.cache)))
    dataset = stage_dataset(get_stage("dit"), sites, "train")
    parts = dataset.datasets if hasattr(dataset, "datasets") else [dataset]
    n_pairs = 0
    for part in parts:
        for later, earlier in longitudinal_pairs(part.records):
            a, b = part.records[later], part.records[earlier]
            assert (a.site_id, a.subject, a.modality) == (b.site_id, b.subject, b.modality)
            assert a.labels.age > b.labels.age
            n_pairs += 1
    assert n_pairs > 0, "the shared cohort has follow-up sessions, so pairs must exist"
    item = parts[0][len(parts[0].records)]  # first pair example
    assert torch.isfinite(item["baseline"]).all() and item["interval"] > 0
    item = parts[0][0]  # cross-sectional example
    assert torch.isnan(item["baseline"]).all() and torch.isnan(item["interval"])


@pytest.mark.parametrize("name", ["mae", "decoder", "dit"])
def test_a_round_that_drew_nobody_reports_the_same_metric_names(name: str) -> None:
    """DP-SGD's Poisson sampling can leave every step of a round empty; the site still reports each of
    the stage's metrics (NaN), so the server sees the same names from every site and aggregates it."""
    from braing3n_core.training.loop import train_steps

    stage, preset = get_stage(name), get_preset("tiny")
    model = stage.build(preset)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    empty = train_steps(stage, model, iter([{}, {}]), optimizer, 2, lambda _: 0.0, torch.device("cpu"))
    assert empty.examples == 0 and set(empty.extra) == set(stage.train_metrics)
    assert all(math.isnan(v) for v in (empty.loss, *empty.extra.values()))
    if name == "decoder":  # a round with data names the same metrics, with values
        generator = torch.Generator().manual_seed(0)
        batch = {"tokens": torch.randn(2, preset.num_tokens, preset.mae.width, generator=generator),
                 "volume": torch.rand(2, 1, *preset.shape, generator=generator)}
        trained = train_steps(stage, model, iter([batch]), optimizer, 1, lambda _: 0.0, torch.device("cpu"))
        assert set(trained.metrics()) == set(empty.metrics()) and all(map(math.isfinite, trained.extra.values()))


def test_a_pairs_target_tokens_are_the_follow_up_on_the_baselines_voxels(trained_run: Path, site_configs,
                                                                          tmp_path: Path) -> None:
    """Preprocessing crops each session to its own foreground, so a follow-up whose head lost a slab at one
    edge (a field of view cut short) lands voxels away from its baseline; its target tokens for a forecast
    from that baseline are those of the follow-up moved back, and a follow-up already in place keeps its own."""
    encoder = load_encoder(trained_run / "checkpoints/mae/step-000006.json")
    data = load_site(site_configs[0], TINY)
    cache = TokenCache(tmp_path / "tokens", encoder, TINY, data.cache)
    baseline = data.splits["train"][0]
    image = nib.load(baseline.path)
    voxels = np.asarray(image.dataobj).copy()
    head = np.argwhere(voxels > np.percentile(voxels, 60))
    cut = int(head[:, 2].max() - 0.25 * (head[:, 2].max() - head[:, 2].min()))
    voxels[:, :, cut:] = 0  # the vertex cut short: the foreground box shrinks on one side
    cut_path = tmp_path / baseline.path.name
    nib.save(nib.Nifti1Image(voxels, image.affine, image.header), cut_path)
    follow_up = dataclasses.replace(baseline, session="ses-cut", path=cut_path)

    reference = preprocess_scan(baseline.path, TINY, data.cache)[0]
    aligned, shift = align_by_brain_mask(reference, preprocess_scan(cut_path, TINY, data.cache)[0])
    assert shift != (0, 0, 0)
    pair = cache.pair_tokens(follow_up, baseline)
    with torch.no_grad():
        expected = encoder.encode(torch.from_numpy(np.ascontiguousarray(aligned))[None, None])[0][0]
    assert torch.allclose(pair, expected, atol=1e-5)
    assert not torch.allclose(pair, cache.tokens(follow_up), atol=1e-3)
    assert torch.equal(cache.pair_tokens(baseline, baseline), cache.tokens(baseline))  # nothing to move


def test_a_sites_trend_sums_hold_only_cells_of_enough_subjects_and_nothing_under_privacy(trained_run: Path,
                                                                                        site_configs) -> None:
    """The sums a site sends for the DiT's trend equal Σ Δ·t and Σ t² over its training pairs, per
    (modality, diagnosis) cell, for the cells of at least `privacy.min_subjects_per_cell` subjects (3 by
    default: in this small cohort, none; 1: every cell) and nothing when the site trains under DP."""
    from braing3n_core.federation.site_round import site_change_trend

    encoder = load_encoder(trained_run / "checkpoints/mae/step-000006.json")
    stage = get_stage("dit")
    kept_cells = {1: 0, 3: 0}
    for config in site_configs:
        data = load_site(config, TINY)
        tokens = TokenCache(config.resolved_cache_dir, encoder, TINY, data.cache)
        dataset = stage_dataset(stage, [SiteInputs(data, tokens)], "train")
        expected: dict[tuple[int, int], list] = {}  # cell → [Σ Δ·t, Σ t², pairs, subjects]
        for later, earlier in dataset.pairs:
            follow_up, baseline = dataset.records[later], dataset.records[earlier]
            cell = (int(dataset.conditions.modality[later]), int(dataset.conditions.diagnosis[later]))
            years = follow_up.labels.age - baseline.labels.age
            change = tokens.pair_tokens(follow_up, baseline).double() - tokens.tokens(baseline).double()
            entry = expected.setdefault(cell, [0.0, 0.0, 0, set()])
            entry[0], entry[1], entry[2] = entry[0] + change * years, entry[1] + years**2, entry[2] + 1
            entry[3].add(follow_up.subject)

        def site_with(config=config, data=data, tokens=tokens, **privacy) -> SiteInputs:
            changed = config.model_copy(update={"privacy": config.privacy.model_copy(update=privacy)})
            return SiteInputs(dataclasses.replace(data, config=changed), tokens)

        for threshold in (1, 3):
            sent = site_change_trend(stage, site_with(min_subjects_per_cell=threshold), TINY.num_tokens, TINY.mae.width)
            for (m, d), (change_years, years_sq, pairs, subjects) in expected.items():
                if len(subjects) >= threshold:
                    kept_cells[threshold] += 1
                    torch.testing.assert_close(sent.change_years[m, d], change_years, rtol=1e-5, atol=1e-6)
                    assert (float(sent.years_sq[m, d]), int(sent.pairs[m, d])) == (pytest.approx(years_sq), pairs)
                else:
                    assert float(sent.pairs[m, d]) == 0.0 and float(sent.change_years[m, d].abs().sum()) == 0.0
        private = site_with(enabled=True, min_subjects_per_cell=1)
        assert float(site_change_trend(stage, private, TINY.num_tokens, TINY.mae.width).pairs.sum()) == 0.0
    assert kept_cells[1] > kept_cells[3], kept_cells  # some cells are of one or two subjects, and were withheld
