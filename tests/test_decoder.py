"""CNN voxel decoder: shapes per preset, the SSIM term against MONAI, token noise, a short overfit run on
tokens of real anatomy, bf16 autocast and one DP-SGD step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from braing3n_core.models import CNNDecoder, DecoderConfig, MAEConfig, MAEEncoder, ssim_3d
from braing3n_core.presets import PRESETS


def template_volumes(count: int, shape: tuple[int, int, int] = (40, 48, 40)) -> torch.Tensor:
    """[count, 1, D, H, W]: the z-scored MNI152 template at `shape`, odd copies flipped left-right."""
    from nilearn.datasets import load_mni152_template

    data = torch.from_numpy(np.asarray(load_mni152_template(resolution=2).get_fdata(), dtype=np.float32))
    volume = F.interpolate(data[None, None], size=shape, mode="trilinear", align_corners=False)[0, 0]
    brain = volume > 0.05 * volume.max()
    volume = torch.where(brain, (volume - volume[brain].mean()) / volume[brain].std(), torch.zeros_like(volume))
    return torch.stack([volume.flip(0) if i % 2 else volume for i in range(count)])[:, None]


@pytest.fixture(scope="module")
def tiny_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [2, 150, 48] of a frozen random-init tiny encoder, volumes [2, 1, 40, 48, 40])."""
    torch.manual_seed(0)
    encoder = MAEEncoder(MAEConfig.from_preset("tiny")).eval()
    volumes = template_volumes(2)
    with torch.no_grad():
        return encoder(volumes), volumes


@pytest.mark.parametrize("name", ["paper", "small", "tiny"])
def test_shapes_per_preset(name: str) -> None:
    preset = PRESETS[name]
    with torch.device("meta"):
        decoder = CNNDecoder(DecoderConfig.from_preset(name))
        tokens = torch.empty(2, preset.num_tokens, preset.mae.width)
        latent = decoder.project(tokens)
        volume = decoder(tokens)
    assert latent.shape == (2, preset.num_tokens, preset.decoder.latent_channels)
    assert volume.shape == (2, 1, *preset.shape)
    assert len(decoder.stages) == int(np.log2(preset.patch_size)) - 1  # + the sub-voxel head = log2(p) ×2 steps


def test_forward_is_decode_of_the_linear_projection(tiny_tokens) -> None:
    tokens, _ = tiny_tokens
    torch.manual_seed(0)
    decoder = CNNDecoder(DecoderConfig.from_preset("tiny")).eval()
    with torch.no_grad():
        torch.testing.assert_close(decoder(tokens), decoder.decode_latent(decoder.project(tokens)))
        latent = decoder.project(tokens)
    torch.testing.assert_close(latent, tokens @ decoder.proj.weight.T + decoder.proj.bias)


def test_ssim_matches_monai() -> None:
    from monai.losses import SSIMLoss

    volume = template_volumes(2)
    noisy = volume + 0.3 * torch.randn(volume.shape, generator=torch.Generator().manual_seed(0))
    for window in (5, 7):
        reference = 1.0 - SSIMLoss(3, data_range=6.0, kernel_type="uniform", win_size=window, reduction="none")(noisy, volume)
        torch.testing.assert_close(ssim_3d(noisy, volume, window), reference.flatten(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ssim_3d(volume, volume, 5), torch.ones(2))


def test_training_ssim_on_random_boxes_weights_each_position_by_its_coverage() -> None:
    """The training SSIM on one random box per batch. Over boxes, its mean is the SSIM map weighted by how
    often a box covers each position: exactly the box-filtered map's mean (all corners equally likely), which
    200 boxes estimate to 0.01. Each box is the same for every sample of the batch and reproducible from the
    generator; validation (eval mode) still scores the whole volume."""
    from braing3n_core.models.decoder import random_box, ssim_map_3d

    volume = template_volumes(2)
    noisy = volume + 0.5 * torch.randn(volume.shape, generator=torch.Generator().manual_seed(0))
    config = DecoderConfig.from_preset("tiny", ssim_fraction=0.5)
    assert config.ssim_box == (20, 24, 20)
    generator = torch.Generator().manual_seed(0)
    boxes = [random_box((noisy, volume), config.ssim_box, generator) for _ in range(200)]
    assert {tuple(b[0].shape) for b in boxes} == {(2, 1, 20, 24, 20)}
    estimate = torch.stack([ssim_3d(x, y, config.ssim_window) for x, y in boxes]).mean(0)
    box_map = tuple(side - config.ssim_window + 1 for side in config.ssim_box)  # a box's SSIM map: [16, 20, 16]
    whole_map = ssim_map_3d(noisy, volume, config.ssim_window)  # [2, 1, 36, 44, 36]
    expected = F.avg_pool3d(whole_map, box_map, stride=1).flatten(1).mean(1)  # every corner, equally likely
    torch.testing.assert_close(estimate, expected, atol=0.01, rtol=0)
    again = random_box((noisy,), config.ssim_box, torch.Generator().manual_seed(0))[0]
    assert torch.equal(again, boxes[0][0])
    decoder = CNNDecoder(config).eval()
    tokens = torch.randn(2, config.num_tokens, config.token_dim)
    with torch.no_grad():
        whole = ssim_3d(decoder(tokens), volume, config.ssim_window).mean()
        assert torch.equal(decoder.loss(tokens, volume, torch.Generator().manual_seed(3)).ssim, whole)
    with pytest.raises(ValueError, match="ssim_fraction"):
        DecoderConfig.from_preset("tiny", ssim_fraction=0.1)  # a 4-voxel box cannot hold the 5-voxel window


def test_token_noise_only_in_training(tiny_tokens) -> None:
    tokens, volumes = tiny_tokens
    torch.manual_seed(0)
    decoder = CNNDecoder(DecoderConfig.from_preset("tiny"))
    decoder.eval()
    with torch.no_grad():
        clean = decoder.loss(tokens, volumes).loss
        assert torch.equal(clean, decoder.loss(tokens, volumes, generator=torch.Generator().manual_seed(1)).loss)
        decoder.train()
        noisy = decoder.loss(tokens, volumes, generator=torch.Generator().manual_seed(1)).loss
        again = decoder.loss(tokens, volumes, generator=torch.Generator().manual_seed(1)).loss
    assert not torch.equal(clean, noisy) and torch.equal(noisy, again)
    quiet = CNNDecoder(DecoderConfig.from_preset("tiny", token_noise_std=0.0))
    assert torch.equal(quiet.add_token_noise(tokens), tokens)


def test_short_overfit_on_template_tokens(tiny_tokens) -> None:
    """30 AdamW steps on two volumes: L1 + (1 − SSIM) falls by at least 1.6× (measured 1.9×)."""
    tokens, volumes = tiny_tokens
    torch.manual_seed(0)
    decoder = CNNDecoder(DecoderConfig.from_preset("tiny"))
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        out = decoder.loss(tokens, volumes, generator=generator)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[0] / np.mean(losses[-5:]) > 1.6, losses
    decoder.eval()
    with torch.no_grad():
        assert decoder.loss(tokens, volumes).ssim > 0.4


def test_every_parameter_gets_a_gradient(tiny_tokens) -> None:
    """Residual branches end in a zero-initialised conv, so their inner layers only get a gradient
    once that conv has moved: check after two optimiser steps."""
    tokens, volumes = tiny_tokens
    torch.manual_seed(0)
    decoder = CNNDecoder(DecoderConfig.from_preset("tiny"))
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        decoder.loss(tokens, volumes).loss.backward()
        optimizer.step()
    missing = [n for n, p in decoder.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing


def test_bf16_autocast_forward_backward(tiny_tokens) -> None:
    tokens, volumes = tiny_tokens
    decoder = CNNDecoder(DecoderConfig.from_preset("tiny"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = decoder.loss(tokens, volumes)
    out.loss.backward()
    assert out.recon.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert all(p.grad is not None and p.dtype == torch.float32 for p in decoder.parameters())


def test_bad_inputs_are_clear_errors(tiny_tokens) -> None:
    tokens, volumes = tiny_tokens
    decoder = CNNDecoder(DecoderConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match=r"tokens of shape \[B, 150, 48\]"):
        decoder(tokens[:, :100])
    with pytest.raises(ValueError, match="target volumes"):
        decoder.loss(tokens, volumes[..., :32])
    with pytest.raises(ValueError, match="channels needs 3 entries"):
        DecoderConfig.from_preset("tiny", channels=(32, 16))
    assert DecoderConfig.from_dict(DecoderConfig.from_preset("small").to_dict()) == DecoderConfig.from_preset("small")


@pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing")
def test_one_opacus_dp_sgd_step(tiny_tokens) -> None:
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    tokens, volumes = tiny_tokens
    torch.manual_seed(0)
    decoder = CNNDecoder(DecoderConfig.from_preset("tiny"))
    assert ModuleValidator.validate(decoder, strict=True) == []
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens, volumes), batch_size=2)
    optimizer = torch.optim.SGD(decoder.parameters(), lr=0.1)
    engine = PrivacyEngine(accountant="rdp")
    private, optimizer, loader = engine.make_private(
        module=decoder, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
        poisson_sampling=False,
    )
    before = {n: p.detach().clone() for n, p in decoder.named_parameters()}
    batch_tokens, batch_volumes = next(iter(loader))
    # The wrapper only forwards `forward`; methods such as `loss` are called on the wrapped module, whose
    # layers carry the per-sample hooks.
    assert private._module is decoder
    decoder.loss(batch_tokens, batch_volumes, generator=torch.Generator().manual_seed(0)).loss.backward()
    for name, param in decoder.named_parameters():
        assert param.grad_sample is not None and param.grad_sample.shape == (2, *param.shape), name
        torch.testing.assert_close(param.grad_sample.mean(0), param.grad, atol=1e-5, rtol=1e-3)
    optimizer.step()
    assert all(not torch.equal(before[n], p.detach()) for n, p in decoder.named_parameters())
