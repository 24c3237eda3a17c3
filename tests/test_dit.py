"""Conditional DiT network: shapes per preset, adaLN-Zero identity at init, gradients everywhere, missing
values, token statistics, bf16 autocast and one DP-SGD step."""

from __future__ import annotations

import math

import pytest
import torch

from braing3n_core.labels import Modality, ScanLabels
from braing3n_core.models import DiT, DiTConfig, TokenMoments, diffusion
from braing3n_core.models.conditions import ConditionBatch, conditions_from_labels, null_conditions
from braing3n_core.presets import PRESETS

TOY = DiTConfig(grid=(2, 3, 2), token_dim=12, width=48, depth=2, heads=4, mlp_dim=96)
# The same toy on patches: 2×2×2 encoder tokens per DiT token, a (1, 2, 1) grid of them.
TOY_PATCHED = DiTConfig(grid=(2, 4, 2), token_dim=12, width=48, depth=2, heads=4, mlp_dim=96, patch_size=2)


def mixed_conditions() -> ConditionBatch:
    """Four scans in which every variable is present at least once and missing at least once."""
    labels = [
        ScanLabels(age=71.0, sex="F", diagnosis="AD", mmse=19.0, field_strength=3.0),
        ScanLabels(age=None, sex=None, diagnosis=None, mmse=None, field_strength=None),
        ScanLabels(age=34.0, sex="M", diagnosis="glioma", mmse=None, field_strength=1.5),
        ScanLabels(age=None, sex="F", diagnosis="CN", mmse=29.0, field_strength=None),
    ]
    return conditions_from_labels(labels, [Modality.T1W, Modality.FLAIR, Modality.T1C, Modality.T2W])


def mixed_longitudinal(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Baselines for samples 0 and 2 (1 and 3 are cross-sectional: NaN rows), intervals for 0 only."""
    baseline = tokens.roll(1, dims=0).clone()
    baseline[1] = math.nan
    baseline[3] = math.nan
    return baseline, torch.tensor([1.5, math.nan, math.nan, math.nan])


@pytest.mark.parametrize("name", ["paper", "small", "tiny"])
def test_shapes_per_preset(name: str) -> None:
    preset = PRESETS[name]
    with torch.device("meta"):
        model = DiT(DiTConfig.from_preset(name))
        x = torch.empty(2, preset.num_tokens, preset.mae.width)
        out = model(x, torch.zeros(2), null_conditions(2, "meta"), baseline=x, interval=torch.zeros(2))
    assert out.shape == (2, preset.num_tokens, preset.mae.width)
    assert model.pos_embed.shape == (1, preset.num_tokens // preset.dit.patch_size**3, preset.dit.width)


@pytest.mark.parametrize("config", [TOY, TOY_PATCHED], ids=["patch-1", "patch-2"])
def test_every_block_is_the_identity_at_init(config: DiTConfig) -> None:
    torch.manual_seed(0)
    model = DiT(config)
    n = config.num_tokens
    x = torch.randn(4, n // config.patch_size**3, 48)
    c = torch.randn(4, 48)
    for block in model.blocks:
        assert torch.equal(block(x, c), x)
    tokens = torch.randn(4, n, 12)
    baseline, interval = mixed_longitudinal(tokens)
    out = model(tokens, torch.rand(4), mixed_conditions(), baseline, interval)
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised final layer


@pytest.mark.parametrize("config", [TOY, TOY_PATCHED], ids=["patch-1", "patch-2"])
def test_every_parameter_gets_a_gradient(config: DiTConfig) -> None:
    """Zero-init means most gradients are exactly 0 at step 0; after a few optimiser steps every
    parameter (including every null embedding, the baseline flag and the interval MLP) must get one."""
    torch.manual_seed(0)
    model = DiT(config)
    tokens = torch.randn(4, config.num_tokens, 12)
    baseline, interval = mixed_longitudinal(tokens)
    cond = mixed_conditions()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(4):
        optimizer.zero_grad()
        loss = diffusion.training_loss(model, tokens, cond, baseline=baseline, interval=interval, p_drop=0.0,
                                       p_drop_all=0.0, generator=torch.Generator().manual_seed(0))
        loss.backward()
        optimizer.step()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing


def test_missing_values_use_the_null_embedding_and_present_values_matter() -> None:
    torch.manual_seed(0)
    model = DiT(TOY)
    for parameter in model.parameters():  # leave the zero-init regime so outputs depend on c
        torch.nn.init.normal_(parameter, std=0.05)
    x, t = torch.randn(2, 12, 12), torch.rand(2)
    cond = mixed_conditions().select(slice(0, 2))
    cond = cond.without(torch.tensor([[False] * 6, [False, False, False, True, False, False]]))  # modality of 1
    assert bool(cond.missing()[1].all()) and not bool(cond.missing()[0].any())
    reference = model(x, t, cond)
    nothing = model(x, t, null_conditions(2))
    # Sample 1 has every variable missing already: identical to the all-null batch.
    torch.testing.assert_close(reference[1], nothing[1])
    assert not torch.allclose(reference[0], nothing[0])
    older = ConditionBatch(**{**cond.tensors(), "age": torch.tensor([85.0, math.nan])})
    assert not torch.allclose(model(x, t, older)[0], reference[0])
    # No baseline given == baseline rows of NaN; a present baseline changes the output.
    torch.testing.assert_close(model(x, t, cond, torch.full_like(x, math.nan)), reference)
    assert not torch.allclose(model(x, t, cond, torch.randn_like(x)), reference)


def test_patches_are_blocks_of_neighbouring_tokens_and_come_back_in_place() -> None:
    """Each DiT token of a patch-2 DiT reads the 2×2×2 block of encoder tokens at its grid position (tokens are
    row-major over the (d, h, w) grid), and its output goes back to the same positions."""
    model = DiT(TOY_PATCHED)
    tokens = torch.arange(16 * 12, dtype=torch.float32).reshape(1, 16, 12)  # grid (2, 4, 2), row-major
    patches = model._patchify(tokens)  # [1, 2, 8·12]: h = 0..1 and h = 2..3
    assert patches.shape == (1, 2, 96)
    first = {int(v) // 12 for v in patches[0, 0]}  # the token indices in the first patch
    assert first == {d * 8 + h * 2 + w for d in (0, 1) for h in (0, 1) for w in (0, 1)}
    assert torch.equal(model._unpatchify(patches), tokens)
    with pytest.raises(ValueError, match="patch_size=2 must divide the token grid"):
        DiTConfig(grid=(2, 3, 2), token_dim=12, width=48, depth=2, heads=4, mlp_dim=96, patch_size=2)


def test_bad_inputs_are_clear_errors() -> None:
    model = DiT(TOY)
    with pytest.raises(ValueError, match=r"\[B, 12, 12\]"):
        model(torch.zeros(2, 10, 12), torch.zeros(2), null_conditions(2))
    with pytest.raises(ValueError, match="conditions"):
        model(torch.zeros(2, 12, 12), torch.zeros(2), null_conditions(3))
    partial = torch.zeros(2, 12, 12)
    partial[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        model(torch.zeros(2, 12, 12), torch.zeros(2), null_conditions(2), baseline=partial)
    with pytest.raises(ValueError, match="divisible by 6"):
        DiTConfig(grid=(2, 2, 2), token_dim=8, width=64, depth=1, heads=4, mlp_dim=64)


def test_token_statistics_merge_and_travel_with_the_state_dict() -> None:
    tokens = torch.randn(6, 12, 12) * 3.0 + 2.0
    whole = TokenMoments(12).add(tokens)
    merged = TokenMoments(12).add(tokens[:2]).merge(TokenMoments(12).add(tokens[2:]))
    mean, std = merged.mean_std()
    torch.testing.assert_close(mean, whole.mean_std()[0])
    torch.testing.assert_close(mean, tokens.reshape(-1, 12).mean(0))
    torch.testing.assert_close(std, tokens.reshape(-1, 12).std(0))
    model = DiT(TOY)
    model.set_token_statistics(mean, std)
    torch.testing.assert_close(model.denormalize(model.normalize(tokens)), tokens)
    state = model.state_dict()
    assert torch.equal(state["token_mean"], mean) and torch.equal(state["token_std"], std)
    assert "pos_embed" not in state
    restored = DiT(DiTConfig.from_dict(TOY.to_dict()))
    restored.load_state_dict(state)
    assert torch.equal(restored.token_std, std)
    with pytest.raises(ValueError, match="std > 0"):
        model.set_token_statistics(mean, torch.zeros(12))


def test_init_is_deterministic_given_the_seed() -> None:
    torch.manual_seed(4)
    first = DiT(TOY).state_dict()
    torch.manual_seed(4)
    second = DiT(TOY).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert all(v.dtype == torch.float32 for v in first.values())


def test_bf16_autocast_forward_backward() -> None:
    torch.manual_seed(0)
    model = DiT(TOY)
    tokens = torch.randn(4, 12, 12)
    baseline, interval = mixed_longitudinal(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = diffusion.training_loss(model, tokens, mixed_conditions(), baseline=baseline, interval=interval,
                                       generator=torch.Generator().manual_seed(0))
        samples = diffusion.sample(model, (4, 12, 12), mixed_conditions(), steps=2, guidance_scale=2.0,
                                   baseline=baseline, interval=interval)
    loss.backward()
    assert torch.isfinite(loss) and samples.dtype == torch.float32 and bool(torch.isfinite(samples).all())
    assert all(p.grad is not None and p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing")
def test_one_opacus_dp_sgd_step() -> None:
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    torch.manual_seed(0)
    model = DiT(TOY)
    assert ModuleValidator.validate(model, strict=True) == []
    tokens = torch.randn(4, 12, 12)
    baseline, interval = mixed_longitudinal(tokens)
    cond = mixed_conditions()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens, baseline, interval), batch_size=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine(accountant="rdp")
    private, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
        poisson_sampling=False,
    )
    batch_tokens, batch_baseline, batch_interval = next(iter(loader))
    diffusion.training_loss(private, batch_tokens, cond, baseline=batch_baseline, interval=batch_interval,
                            p_drop=0.0, p_drop_all=0.0, generator=torch.Generator().manual_seed(0)).backward()
    for name, param in model.named_parameters():
        assert param.grad_sample is not None and param.grad_sample.shape == (4, *param.shape), name
        torch.testing.assert_close(param.grad_sample.mean(0), param.grad, atol=1e-6, rtol=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    assert all(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters())
