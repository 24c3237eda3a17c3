"""Conditioning schema, flow-matching objective and sampler; the DiT fits small conditional and
longitudinal toy sets, guidance moves samples toward the condition, forecasting uses the baseline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from braing3n_core.labels import DIAGNOSES, MODALITIES, Modality, ScanLabels
from braing3n_core.models import ChangeTrendSums, DiT, DiTConfig, TokenMoments, diffusion
from braing3n_core.models.conditions import (
    CONDITION_SCHEMA,
    ConditionBatch,
    conditions_from_labels,
    drop_conditions,
    null_conditions,
    random_drop_mask,
)

TOY = DiTConfig(grid=(2, 3, 2), token_dim=12, width=48, depth=2, heads=4, mlp_dim=192)
MODALITY_INDEX = {m.value: i for i, m in enumerate(MODALITIES)}


def test_schema_declares_six_variables() -> None:
    assert [v.name for v in CONDITION_SCHEMA] == ["age", "sex", "diagnosis", "modality", "field_strength", "mmse"]


def test_conditions_from_labels() -> None:
    labels = [
        ScanLabels(age=70.5, sex="M", diagnosis="MCI", mmse=26.0, field_strength=2.89),
        ScanLabels(),
    ]
    batch = conditions_from_labels(labels, [Modality.FLAIR, Modality.T1C])
    assert batch.batch_size == 2
    assert batch.age[0].item() == 70.5 and math.isnan(batch.age[1].item())
    assert batch.sex.tolist() == [1, -1]
    assert batch.diagnosis.tolist() == [DIAGNOSES.index("MCI"), -1]
    assert batch.modality.tolist() == [3, 1]
    assert batch.field_strength.tolist() == [1, -1]  # 2.89 T (a common sidecar value) reads as 3 T
    assert batch.missing().tolist() == [[False] * 6, [True, True, True, False, True, True]]


@pytest.mark.parametrize(
    ("label", "message"),
    [
        (ScanLabels(sex="X"), "scan 0: sex = 'X' is not one of"),
        (ScanLabels(diagnosis="PD"), "diagnosis = 'PD'"),
        (ScanLabels(field_strength=7.0), "field_strength = 7.0"),
        (ScanLabels(age=140.0), "age = 140.0 years is outside"),
        (ScanLabels(mmse=31.0), "mmse = 31.0"),
    ],
)
def test_bad_labels_are_clear_errors(label: ScanLabels, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        conditions_from_labels([label], [Modality.T1W])


def test_condition_batch_validates_its_tensors() -> None:
    good = null_conditions(3).tensors()
    with pytest.raises(ValueError, match="sex must be int64"):
        ConditionBatch(**{**good, "sex": torch.zeros(3)})
    with pytest.raises(ValueError, match="diagnosis indices"):
        ConditionBatch(**{**good, "diagnosis": torch.tensor([0, 1, 9])})
    with pytest.raises(ValueError, match="different batch sizes"):
        ConditionBatch(**{**good, "age": torch.zeros(2)})


def test_classifier_free_dropout_rates() -> None:
    generator = torch.Generator().manual_seed(0)
    mask = random_drop_mask(20000, 7, p_each=0.1, p_all=0.1, generator=generator)
    all_dropped = mask.all(dim=1).float().mean().item()
    assert abs(all_dropped - (0.1 + 0.9 * 0.1**7)) < 0.01
    assert abs(mask.float().mean().item() - (0.1 + 0.9 * 0.1)) < 0.01
    full = conditions_from_labels([ScanLabels(age=50.0, sex="F", diagnosis="CN", mmse=30.0, field_strength=3.0)] * 1000,
                                  [Modality.T1W] * 1000)
    dropped = drop_conditions(full, generator=torch.Generator().manual_seed(1)).missing()
    assert 0.15 < dropped.float().mean().item() < 0.23
    assert torch.equal(drop_conditions(full, p_each=0.0, p_all=0.0).missing(), full.missing())


def test_time_shift() -> None:
    t = torch.linspace(0, 1, 11)
    shifted = diffusion.shift_time(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and bool((shifted[1:-1] > t[1:-1]).all())
    assert bool((shifted.diff() > 0).all())
    assert diffusion.default_time_shift(1200, 192) == pytest.approx(7.5)
    assert diffusion.default_time_shift(12, 12) == 1.0


def test_untrained_sampler_returns_the_denormalised_noise() -> None:
    """At init the velocity is exactly 0, so the ODE leaves the starting noise in place: the sample is
    that noise mapped through the stored token statistics, and the generator makes it reproducible."""
    torch.manual_seed(0)
    model = DiT(TOY)
    model.set_token_statistics(torch.full((12,), 5.0), torch.full((12,), 2.0))
    cond = null_conditions(3)
    first = diffusion.sample(model, (3, 12, 12), cond, steps=4, generator=torch.Generator().manual_seed(9))
    second = diffusion.sample(model, (3, 12, 12), cond, steps=4, generator=torch.Generator().manual_seed(9))
    noise = torch.randn((3, 12, 12), generator=torch.Generator().manual_seed(9))
    assert torch.equal(first, second)
    torch.testing.assert_close(first, noise * 2.0 + 5.0)
    with pytest.raises(ValueError, match="does not match"):
        diffusion.sample(model, (3, 10, 12), cond)
    with pytest.raises(ValueError, match="solver"):
        diffusion.sample(model, (3, 12, 12), cond, solver="rk4")  # type: ignore[arg-type]


def _pattern(seed: int) -> torch.Tensor:
    pattern = torch.randn(12, 12, generator=torch.Generator().manual_seed(seed))
    return pattern / pattern.norm()


def _train(model: DiT, step_batch, steps: int, lr: float = 3e-3) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = step_batch(generator)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _effect(sex: torch.Tensor, age: torch.Tensor) -> torch.Tensor:
    return (2.0 * sex.float() - 1.0) + (age - 50.0) / 30.0


def test_dit_fits_a_conditional_toy_set_and_guidance_moves_samples() -> None:
    """Toy tokens x = a·P + 0.1·ε, with a = ±1 for sex plus (age − 50)/30; the statistic <x, P> recovers a.
    Measured: loss 1.95 → 1.22 in 400 steps; correlation of the statistic with the requested a is 0.99
    conditional (w = 1), 0.995 guided (w = 3) and ≈ 0 for unconditional samples; guidance steepens the
    response (slope 1.04 → 1.48)."""
    torch.manual_seed(0)
    model = DiT(TOY)
    pattern = _pattern(0)
    generator = torch.Generator().manual_seed(0)
    sex = torch.randint(0, 2, (512,), generator=generator)
    age = 20.0 + 60.0 * torch.rand(512, generator=generator)
    tokens = _effect(sex, age)[:, None, None] * pattern + 0.1 * torch.randn(512, 12, 12, generator=generator)
    conditions = ConditionBatch(**{**null_conditions(512).tensors(), "sex": sex, "age": age})
    model.set_token_statistics(*TokenMoments(12).add(tokens).mean_std())

    def step(gen: torch.Generator) -> torch.Tensor:
        index = torch.randint(0, 512, (64,), generator=gen)
        return diffusion.training_loss(model, tokens[index], conditions.select(index), generator=gen)

    losses = _train(model, step, 400)
    assert np.mean(losses[:10]) / np.mean(losses[-20:]) > 1.3

    want_sex, want_age = torch.tensor([0, 1] * 32), torch.linspace(20.0, 80.0, 64)
    requested = _effect(want_sex, want_age)
    cond = ConditionBatch(**{**null_conditions(64).tensors(), "sex": want_sex, "age": want_age})

    def statistic(guidance: float, given: ConditionBatch) -> np.ndarray:
        samples = diffusion.sample(model, (64, 12, 12), given, steps=10, guidance_scale=guidance,
                                   generator=torch.Generator().manual_seed(2))
        return (samples * pattern).sum(dim=(1, 2)).numpy()

    conditional, guided, unconditional = statistic(1.0, cond), statistic(3.0, cond), statistic(1.0, null_conditions(64))
    r = {name: np.corrcoef(requested.numpy(), s)[0, 1] for name, s in
         [("conditional", conditional), ("guided", guided), ("unconditional", unconditional)]}
    assert r["conditional"] > 0.9 and r["guided"] > 0.9, r
    assert abs(r["unconditional"]) < 0.3, r
    slope = {name: np.polyfit(requested.numpy(), s, 1)[0] for name, s in [("conditional", conditional), ("guided", guided)]}
    assert slope["guided"] > 1.25 * slope["conditional"], slope


def test_longitudinal_forecast_uses_the_baseline_and_the_interval() -> None:
    """Subjects: baseline b ~ 0.5·N(0, I); follow-up = b + interval·D (+ small noise). Pairs and
    cross-sectional scans (no baseline) are mixed in every batch. Measured: forecast MSE 0.005 against
    0.03 for copying the baseline and 0.55 for the model without a baseline; the forecast's change along
    D tracks the requested interval (r = 0.99). With the pair diffusing the follow-up's tokens instead of
    its change (`change_scale` None): MSE 0.0066, r = 0.98."""
    torch.manual_seed(0)
    model = DiT(TOY)
    drift = _pattern(1)

    def subjects(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        baseline = 0.5 * torch.randn(count, 12, 12, generator=generator)
        interval = 0.5 + 2.5 * torch.rand(count, generator=generator)
        follow_up = baseline + interval[:, None, None] * drift + 0.05 * torch.randn(count, 12, 12, generator=generator)
        return baseline, follow_up, interval

    base_all, follow_all, interval_all = subjects(256, torch.Generator().manual_seed(0))
    model.set_token_statistics(*TokenMoments(12).add(torch.cat([base_all, follow_all])).mean_std())

    def step(gen: torch.Generator) -> torch.Tensor:
        index = torch.randint(0, 256, (64,), generator=gen)
        target, baseline, interval = follow_all[index].clone(), base_all[index].clone(), interval_all[index].clone()
        single = torch.rand(64, generator=gen) < 0.5  # cross-sectional: one scan, no baseline, no interval
        target[single] = base_all[index][single]
        baseline[single] = math.nan
        interval[single] = math.nan
        return diffusion.training_loss(model, target, null_conditions(64), baseline=baseline, interval=interval, generator=gen)

    losses = _train(model, step, 400)
    assert np.mean(losses[:10]) / np.mean(losses[-20:]) > 1.5

    baseline, follow_up, interval = subjects(64, torch.Generator().manual_seed(7))
    forecast = diffusion.sample(model, (64, 12, 12), null_conditions(64), steps=10, guidance_scale=1.0,
                                baseline=baseline, interval=interval, generator=torch.Generator().manual_seed(3))
    blind = diffusion.sample(model, (64, 12, 12), null_conditions(64), steps=10, guidance_scale=1.0,
                             generator=torch.Generator().manual_seed(3))
    error = ((forecast - follow_up) ** 2).mean().item()
    assert error < 0.5 * ((baseline - follow_up) ** 2).mean().item()
    assert error < 0.1 * ((blind - follow_up) ** 2).mean().item()
    change = ((forecast - baseline) * drift).sum(dim=(1, 2)).numpy()
    assert np.corrcoef(change, interval.numpy())[0, 1] > 0.9


def test_a_pair_diffuses_its_change_from_the_baseline() -> None:
    """A pair's flow runs on (x − b) / change_scale in normalised space; cross-sectional rows on x itself."""
    torch.manual_seed(0)
    model = DiT(TOY)
    model.set_token_statistics(torch.full((12,), 1.0), torch.full((12,), 2.0))
    generator = torch.Generator().manual_seed(0)
    baseline = 4.0 * torch.randn(64, 12, 12, generator=generator)
    baseline[::2] = math.nan  # every other row cross-sectional
    x = torch.randn(64, 12, 12, generator=generator)
    base = model.normalize(baseline)
    diffused = diffusion.to_diffused(model, x, base)
    torch.testing.assert_close(diffusion.from_diffused(model, diffused, base), x)
    torch.testing.assert_close(diffused[::2], x[::2])
    torch.testing.assert_close(diffused[1::2], (x[1::2] - base[1::2]) / TOY.change_scale)

    # At init the velocity is 0, so the loss is E[(ε − target)²]: ≈ 1 for a follow-up equal to its baseline
    # (no change to diffuse), ≈ 1 + E[b²] when the pair diffuses the follow-up's tokens themselves.
    same = baseline[1::2]
    cond = null_conditions(32)
    interval = torch.ones(32)
    loss = {scale: diffusion.training_loss(DiT(DiTConfig(**{**TOY.to_dict(), "change_scale": scale, "trend": bool(scale)})), same, cond,
                                           baseline=same, interval=interval, p_drop=0.0, p_drop_all=0.0,
                                           generator=torch.Generator().manual_seed(1)).item()
            for scale in (TOY.change_scale, None)}
    assert loss[TOY.change_scale] == pytest.approx(1.0, abs=0.1) and loss[None] > 10.0, loss

    # An untrained DiT forecasts the baseline plus change_scale × the starting noise.
    forecast = diffusion.sample(model, (32, 12, 12), cond, steps=2, guidance_scale=1.0, baseline=same,
                                interval=interval, generator=torch.Generator().manual_seed(5))
    noise = torch.randn((32, 12, 12), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(forecast, same + TOY.change_scale * 2.0 * noise)
    assert DiTConfig.from_dict({k: v for k, v in TOY.to_dict().items() if k not in ("change_scale", "trend")}).change_scale is None


def test_the_trend_fits_each_cell_by_least_squares_and_falls_back_where_a_cell_is_thin() -> None:
    """Σ Δ·t / Σ t² per (modality, diagnosis) cell in normalised units; a cell of fewer than 3 pairs takes its
    modality's slope, a modality without 3 pairs the slope of all pairs; a site drops every cell whose pairs
    come from fewer than 3 subjects."""
    t1, flair = MODALITY_INDEX["T1w"], MODALITY_INDEX["FLAIR"]
    cn, ad = DIAGNOSES.index("CN"), DIAGNOSES.index("AD")
    sums = ChangeTrendSums(2, 3)
    for subject, years in enumerate((1.0, 2.0, 4.0)):  # T1w CN: change 0.5 per year, exactly
        sums.add(t1, cn, torch.full((2, 3), 0.5 * years), years, f"cn-{subject}")
    sums.add(t1, ad, torch.full((2, 3), 3.0), 1.0, "ad-0")  # one T1w AD pair
    sums.add(flair, ad, torch.full((2, 3), 9.0), 1.0, "ad-0")  # one FLAIR pair
    sums.add(t1, -1, torch.full((2, 3), 99.0), 1.0, "unknown")  # no diagnosis: in no cell
    std = torch.tensor([1.0, 2.0, 4.0])
    rates = sums.rates(std)
    assert rates.shape == (len(MODALITY_INDEX), len(DIAGNOSES), 2, 3)
    torch.testing.assert_close(rates[t1, cn], 0.5 / std.expand(2, 3))
    t1_slope = (0.5 * (1 + 4 + 16) + 3.0) / (1 + 4 + 16 + 1)  # T1w over all its diagnoses: AD has 1 pair
    torch.testing.assert_close(rates[t1, ad], (t1_slope / std.expand(2, 3)).float())
    all_slope = (0.5 * 21 + 3.0 + 9.0) / 23  # FLAIR has 1 pair: all pairs
    torch.testing.assert_close(rates[flair, cn], (all_slope / std.expand(2, 3)).float())

    sent = sums.without_small_cells(3)  # the AD cells are one subject's change
    assert sent.pairs[t1, cn] == 3 and sent.pairs[t1, ad] == 0 and sent.pairs[flair, ad] == 0
    assert float(sent.change_years[t1, ad].abs().sum()) == 0.0
    merged = sent.merge(sent)
    torch.testing.assert_close(merged.rates(std)[t1, cn], rates[t1, cn])  # the same slope from twice the pairs
    assert ChangeTrendSums(2, 3).rates(std).abs().sum() == 0  # no pairs: no trend


def test_a_pair_diffuses_its_deviation_from_its_cells_trend() -> None:
    """With a trend set, a follow-up exactly on its cell's trend is the flow's zero (loss at init ≈ 1, as a
    pair without change is without a trend), whatever conditions the dropout hides from the network; the
    untrained forecast is the baseline + interval × the cell's rate + change_scale × the noise; rows with an
    unknown diagnosis, and cross-sectional rows, get no trend."""
    torch.manual_seed(0)
    model = DiT(TOY)
    rates = 0.3 * torch.randn(len(MODALITY_INDEX), len(DIAGNOSES), 12, 12, generator=torch.Generator().manual_seed(1))
    model.set_change_trend(rates)
    labels = [ScanLabels(age=70.0, diagnosis=DIAGNOSES[i % 4]) for i in range(32)]
    modalities = [list(Modality)[i % 3] for i in range(32)]
    cond = conditions_from_labels(labels, modalities)
    interval = torch.linspace(0.5, 4.0, 32)
    baseline = torch.randn(32, 12, 12, generator=torch.Generator().manual_seed(2))
    on_trend = baseline + interval[:, None, None] * rates[cond.modality, cond.diagnosis]  # token stats 0 / 1
    loss = {name: diffusion.training_loss(dit, on_trend, cond, baseline=baseline, interval=interval, p_drop=drop,
                                          p_drop_all=drop, generator=torch.Generator().manual_seed(3)).item()
            for name, dit, drop in (("trend", model, 0.0), ("trend, conditions dropped", model, 1.0),
                                    ("no trend", DiT(TOY), 0.0))}
    assert loss["trend"] == pytest.approx(1.0, abs=0.1) and loss["trend, conditions dropped"] == pytest.approx(loss["trend"])
    assert loss["no trend"] > 1.5 * loss["trend"], loss

    forecast = diffusion.sample(model, (32, 12, 12), cond, steps=2, guidance_scale=1.5, baseline=baseline,
                                interval=interval, generator=torch.Generator().manual_seed(5))
    noise = torch.randn((32, 12, 12), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(forecast, on_trend + TOY.change_scale * noise)
    unknown = conditions_from_labels([ScanLabels(age=70.0)] * 32, modalities)
    torch.testing.assert_close(model.expected_change(unknown, interval), torch.zeros(32, 12, 12))
    torch.testing.assert_close(model.expected_change(cond, torch.full((32,), math.nan)), torch.zeros(32, 12, 12))
    cross_sectional = diffusion.sample(model, (32, 12, 12), cond, steps=2, guidance_scale=1.0,
                                       generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(cross_sectional, noise)

    # A DiT saved before the trend existed has none, and loads without the buffer.
    old = DiTConfig.from_dict({k: v for k, v in TOY.to_dict().items() if k != "trend"})
    assert not old.trend and "change_trend" not in DiT(old).state_dict() and DiT(old).expected_change(cond, interval) is None
    with pytest.raises(ValueError, match="needs a change_scale"):
        DiTConfig(**{**TOY.to_dict(), "change_scale": None})


class _GaussianFlow(DiT):
    """The exact flow-matching velocity for data x0 ~ N(μ, s²·I): E[ε − x0 | x_t]. Its ODE maps the
    starting noise ε to μ + s·ε exactly, so a solver's error is measurable against the truth."""

    mu, s = 0.7, 0.4

    def forward(self, x, t, cond, baseline=None, interval=None):
        t = t[:, None, None]
        centred = x - (1 - t) * self.mu
        variance = (1 - t) ** 2 * self.s**2 + t**2
        return (t - (1 - t) * self.s**2) / variance * centred - self.mu


@pytest.mark.parametrize("solver", diffusion.SOLVERS)
def test_solvers_converge_to_the_exact_flow_at_their_order(solver: str) -> None:
    """Against the exact flow map: every solver's error falls with the step count, at first order for
    Euler and second order for Heun and Adams–Bashforth 2 (doubling the steps quarters the error).
    Measured (max error at 8/16/32 steps, shift 1): ab2 0.045/0.010/0.0024, heun 0.051/0.012/0.0028,
    euler 0.21/0.11/0.057."""
    model = _GaussianFlow(TOY)
    noise = torch.randn((2, 12, 12), generator=torch.Generator().manual_seed(3))
    truth = _GaussianFlow.mu + _GaussianFlow.s * noise

    def error(steps: int) -> float:
        out = diffusion.sample(model, (2, 12, 12), null_conditions(2), steps=steps, guidance_scale=1.0, solver=solver,
                               generator=torch.Generator().manual_seed(3), time_shift=1.0)
        return float((out - truth).abs().max())

    errors = [error(steps) for steps in (8, 16, 32)]
    order = math.log2(errors[1] / errors[2])
    assert errors[0] > errors[1] > errors[2], errors
    assert order == pytest.approx(1.0 if solver == "euler" else 2.0, abs=0.35), (errors, order)


def test_the_conditional_mean_is_one_step_from_noise_to_the_data_mean() -> None:
    """For data N(μ, s²·I) the flow's velocity at t = 1 is x − μ, so one Euler step lands on μ from any noise,
    where a draw lands on μ + s·ε."""
    model = _GaussianFlow(TOY)
    means = [diffusion.conditional_mean(model, (2, 12, 12), null_conditions(2), guidance_scale=1.0,
                                        generator=torch.Generator().manual_seed(seed)) for seed in (0, 1)]
    for mean in means:
        torch.testing.assert_close(mean, torch.full((2, 12, 12), _GaussianFlow.mu))
    draw = diffusion.sample(model, (2, 12, 12), null_conditions(2), steps=32, guidance_scale=1.0, time_shift=1.0,
                            generator=torch.Generator().manual_seed(0))
    assert (draw - _GaussianFlow.mu).std() == pytest.approx(_GaussianFlow.s, rel=0.2)


def test_a_forecast_draws_by_default_only_from_a_dit_trained_on_the_follow_ups_tokens() -> None:
    from braing3n_core.generation.forecasting import draws_by_default

    assert not draws_by_default(DiT(TOY))  # pairs diffuse their change: the conditional mean
    old = DiTConfig.from_dict({k: v for k, v in TOY.to_dict().items() if k not in ("change_scale", "trend")})
    assert draws_by_default(DiT(old))  # its mean regenerates the scan


def test_ab2_needs_half_the_network_calls_of_heun_for_the_same_error() -> None:
    model = _GaussianFlow(TOY)
    noise = torch.randn((2, 12, 12), generator=torch.Generator().manual_seed(4))
    truth = _GaussianFlow.mu + _GaussianFlow.s * noise
    calls: list[tuple[int, int]] = []
    errors = {}
    for solver, steps in (("ab2", 12), ("heun", 12)):
        calls.clear()
        out = diffusion.sample(model, (2, 12, 12), null_conditions(2), steps=steps, guidance_scale=1.5, solver=solver,
                               generator=torch.Generator().manual_seed(4), on_step=lambda done, total: calls.append((done, total)))
        errors[solver] = float((out - truth).abs().max())
        assert calls[-1] == (diffusion.network_calls(steps, solver),) * 2 and len(calls) == calls[-1][0]
    assert diffusion.network_calls(12, "ab2") == 12 and diffusion.network_calls(12, "heun") == 23
    assert errors["ab2"] < 1.2 * errors["heun"], errors


def test_the_cli_states_the_samplers_defaults() -> None:
    from braing3n_core import cli
    from braing3n_core.generation.sampling import DEFAULT_BATCH_SIZE

    assert (cli.SAMPLE_STEPS, cli.SAMPLE_BATCH) == (diffusion.DEFAULT_STEPS, DEFAULT_BATCH_SIZE)
