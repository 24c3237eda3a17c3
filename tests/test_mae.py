"""3D MAE ViT: shapes per preset, the paper's parameter count, masking, unmasked encoding, a short overfit
run on real anatomy (nilearn's MNI152 template at the `tiny` geometry), bf16 autocast and one DP-SGD step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from braing3n_core.models import MAEConfig, MaskedAutoencoder
from braing3n_core.models.blocks import patchify, sincos_position_embedding, unpatchify
from braing3n_core.models.mae import masked_count
from braing3n_core.presets import PRESETS


def template_volumes(count: int, shape: tuple[int, int, int] = (40, 48, 40), seed: int = 0) -> torch.Tensor:
    """[count, 1, D, H, W] z-scored brains: the MNI152 template resampled to `shape`, each copy with its
    own smooth bias field and every other one flipped left-right."""
    from nilearn.datasets import load_mni152_template

    data = torch.from_numpy(np.asarray(load_mni152_template(resolution=2).get_fdata(), dtype=np.float32))
    base = F.interpolate(data[None, None], size=shape, mode="trilinear", align_corners=False)[0, 0]
    generator = torch.Generator().manual_seed(seed)
    volumes = []
    for index in range(count):
        volume = base.flip(0) if index % 2 else base.clone()
        field = torch.rand(1, 1, 3, 3, 3, generator=generator)
        volume = volume * (0.8 + 0.4 * F.interpolate(field, size=shape, mode="trilinear", align_corners=True)[0, 0])
        brain = volume > 0.05 * volume.max()
        volumes.append(torch.where(brain, (volume - volume[brain].mean()) / volume[brain].std(), torch.zeros_like(volume)))
    return torch.stack(volumes)[:, None]


@pytest.fixture(scope="module")
def tiny_mae() -> MaskedAutoencoder:
    torch.manual_seed(0)
    return MaskedAutoencoder(MAEConfig.from_preset("tiny"))


@pytest.mark.parametrize("name", ["paper", "small", "tiny"])
def test_shapes_and_token_counts_per_preset(name: str) -> None:
    preset = PRESETS[name]
    with torch.device("meta"):  # the paper model is built and run without allocating memory
        model = MaskedAutoencoder(MAEConfig.from_preset(name))
        volume = torch.empty(2, 1, *preset.shape)
        tokens, pooled = model.encode(volume)
        out = model(volume)
    expected_tokens = {"paper": 1200, "small": 1200, "tiny": 150}[name]
    assert preset.num_tokens == expected_tokens
    assert tokens.shape == (2, expected_tokens, preset.mae.width)
    assert pooled.shape == (2, preset.mae.width)
    assert out.pred.shape == (2, expected_tokens, preset.patch_size**3)
    assert out.mask.shape == (2, expected_tokens) and out.loss.shape == ()


def test_paper_encoder_matches_the_spec_parameter_count() -> None:
    with torch.device("meta"):
        model = MaskedAutoencoder(MAEConfig.from_preset("paper"))
    width = 1152
    block = 12 * width**2 + 10 * width  # qkv (no bias) + proj + 4× MLP + two LayerNorms
    expected = 12 * block + (16**3 + 1) * width + width + 2 * width  # blocks + patch conv + CLS + final LN
    encoder = sum(p.numel() for p in model.encoder.parameters())
    assert encoder == expected
    assert abs(encoder - 196e6) / 196e6 < 0.01  # spec §4: ≈ 196 M
    config = model.config
    assert (config.depth, config.heads, config.mlp_dim, config.decoder_depth, config.decoder_width) == (12, 16, 4608, 6, 1152)


def test_positions_are_fixed_buffers_matching_monai_layout() -> None:
    from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding

    with pytest.warns(UserWarning):  # MONAI's meshgrid call warns; ours does not
        reference = build_sincos_position_embedding([5, 6, 5], 48, spatial_dims=3).detach()[0]
    torch.testing.assert_close(sincos_position_embedding((5, 6, 5), 48), reference)
    model = MaskedAutoencoder(MAEConfig.from_preset("tiny"))
    names = {name for name, _ in model.named_parameters()}
    assert not any("pos_embed" in name for name in names)
    assert "encoder.pos_embed" not in model.state_dict()  # rebuilt from the config, never federated


def test_patchify_round_trip_and_token_order() -> None:
    volume = torch.randn(2, 1, 16, 24, 8)
    patches = patchify(volume, 8)
    assert patches.shape == (2, 6, 512)
    torch.testing.assert_close(unpatchify(patches, (2, 3, 1), 8), volume)
    # Row-major over (d, h, w): patch 1 is the second patch along H, the same order as Conv3d.flatten(2).
    torch.testing.assert_close(patches[:, 1], volume[:, 0, :8, 8:16, :8].reshape(2, -1))


def test_mask_count_and_loss_covers_only_masked_patches(tiny_mae: MaskedAutoencoder) -> None:
    volume = template_volumes(3)
    out = tiny_mae(volume, generator=torch.Generator().manual_seed(1))
    n = tiny_mae.config.num_tokens
    assert masked_count(n, 0.7) == round(0.7 * n) == 105
    assert (out.mask.sum(dim=1) == 105).all()
    assert not torch.equal(out.mask[0], out.mask[1])  # independent per sample
    pred = out.pred.detach()
    loss = tiny_mae.masked_l1(pred, volume, out.mask)
    torch.testing.assert_close(loss, out.loss.detach())

    target = patchify(volume, 8)
    visible, masked = out.mask == 0, out.mask == 1
    perturbed_visible = unpatchify(torch.where(visible[..., None], target + 5.0, target), (5, 6, 5), 8)
    perturbed_masked = unpatchify(torch.where(masked[..., None], target + 5.0, target), (5, 6, 5), 8)
    torch.testing.assert_close(tiny_mae.masked_l1(pred, perturbed_visible, out.mask), loss)
    assert tiny_mae.masked_l1(pred, perturbed_masked, out.mask) > loss + 1.0


def test_masking_is_reproducible_with_a_generator(tiny_mae: MaskedAutoencoder) -> None:
    volume = template_volumes(2)
    first = tiny_mae(volume, generator=torch.Generator().manual_seed(5))
    second = tiny_mae(volume, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first.mask, second.mask) and torch.equal(first.loss, second.loss)
    assert not torch.equal(first.mask, tiny_mae(volume, generator=torch.Generator().manual_seed(6)).mask)


def test_encode_is_unmasked_and_sees_every_patch(tiny_mae: MaskedAutoencoder) -> None:
    base = template_volumes(1)
    grid, patch = tiny_mae.config.grid, tiny_mae.config.patch_size
    n = tiny_mae.config.num_tokens
    # Volume i has patch i replaced by noise: its token i must change (and encode must be deterministic).
    patches = patchify(base, patch).repeat(n, 1, 1)
    patches[torch.arange(n), torch.arange(n)] = torch.randn(n, patch**3)
    with torch.no_grad():
        tokens, pooled = tiny_mae.encode(unpatchify(patches, grid, patch))
        reference, _ = tiny_mae.encode(base)
        again, _ = tiny_mae.encode(base)
    assert torch.equal(reference, again)
    change = (tokens - reference).norm(dim=-1)  # [n volumes, n tokens]
    assert bool((change.diagonal() > 1e-3).all())
    torch.testing.assert_close(pooled, tokens.mean(dim=1))


def test_bad_volume_shape_is_a_clear_error(tiny_mae: MaskedAutoencoder) -> None:
    with pytest.raises(ValueError, match=r"\[B, 1, 40, 48, 40\]"):
        tiny_mae.encode(torch.zeros(1, 1, 40, 48, 32))
    with pytest.raises(ValueError, match="mask_ratio"):
        tiny_mae(template_volumes(1), mask_ratio=0.0)


def test_init_is_deterministic_given_the_seed() -> None:
    torch.manual_seed(3)
    first = MaskedAutoencoder(MAEConfig.from_preset("tiny")).state_dict()
    torch.manual_seed(3)
    second = MaskedAutoencoder(MAEConfig.from_preset("tiny")).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert all(v.dtype == torch.float32 for v in first.values())


def test_config_round_trips_through_a_dict() -> None:
    config = MAEConfig.from_preset("small", mask_ratio=0.6)
    assert MAEConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="divisible by 6"):
        MAEConfig.from_preset("tiny", width=64)


def test_short_overfit_on_template_volumes() -> None:
    """40 AdamW steps on four volumes: the masked-patch L1 falls by at least 2× (measured 2.6×)."""
    torch.manual_seed(0)
    model = MaskedAutoencoder(MAEConfig.from_preset("tiny"))
    volumes = template_volumes(4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = model(volumes, generator=generator).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] / np.mean(losses[-5:]) > 2.0, losses


def test_bf16_autocast_forward_backward(tiny_mae: MaskedAutoencoder) -> None:
    tiny_mae.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_mae(template_volumes(2), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert out.pred.dtype == torch.bfloat16 and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert all(p.grad is not None and p.dtype == torch.float32 for p in tiny_mae.parameters())
    tiny_mae.zero_grad()


def test_every_parameter_gets_a_gradient(tiny_mae: MaskedAutoencoder) -> None:
    tiny_mae.zero_grad()
    tiny_mae(template_volumes(2), generator=torch.Generator().manual_seed(0)).loss.backward()
    missing = [n for n, p in tiny_mae.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    tiny_mae.zero_grad()
    assert not missing


@pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing")
def test_one_opacus_dp_sgd_step() -> None:
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    torch.manual_seed(0)
    model = MaskedAutoencoder(MAEConfig.from_preset("tiny"))
    assert ModuleValidator.validate(model, strict=True) == []
    volumes = template_volumes(4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(volumes), batch_size=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine(accountant="rdp")
    private, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
        poisson_sampling=False,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    (batch,) = next(iter(loader))
    loss = private(batch, generator=torch.Generator().manual_seed(0)).loss
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad_sample is not None and param.grad_sample.shape == (4, *param.shape), name
        # The hooks' per-sample gradients average to the ordinary gradient of the mean loss.
        torch.testing.assert_close(param.grad_sample.mean(0), param.grad, atol=1e-5, rtol=1e-3)
    optimizer.step()
    assert all(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters())
    assert engine.get_epsilon(delta=1e-5) > 0
