"""A site's compute settings change speed and memory, never the function: activation checkpointing gives the
same gradients, channels-last the same outputs and gradients, and `compile` wraps exactly the blocks."""

from __future__ import annotations

import math

import pytest
import torch

from braing3n_core.models import CNNDecoder, DecoderConfig, DiT, DiTConfig, MAEConfig, MaskedAutoencoder
from braing3n_core.models.conditions import null_conditions
from braing3n_core.models.diffusion import training_loss
from braing3n_core.presets import get_preset
from braing3n_core.site_config import ComputeConfig
from braing3n_core.training.compute import compile_units, prepare_network
from braing3n_core.training.loop import trainable_state

TINY = get_preset("tiny")


def _mae_loss(model: torch.nn.Module) -> torch.Tensor:
    volume = torch.randn(2, 1, *TINY.shape, generator=torch.Generator().manual_seed(1))
    return model(volume, generator=torch.Generator().manual_seed(2)).loss


def _decoder_loss(model: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, TINY.num_tokens, TINY.mae.width, generator=generator)
    volume = torch.randn(2, 1, *TINY.shape, generator=generator)
    return model.loss(tokens, volume, torch.Generator().manual_seed(2)).loss


def _dit_loss(model: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(3, TINY.num_tokens, TINY.mae.width, generator=generator)
    baseline = torch.cat([torch.randn(1, TINY.num_tokens, TINY.mae.width, generator=generator),
                          torch.full((2, TINY.num_tokens, TINY.mae.width), math.nan)])
    return training_loss(model, tokens, null_conditions(3), baseline=baseline, interval=torch.tensor([2.0, math.nan, math.nan]),
                         generator=torch.Generator().manual_seed(2))


NETWORKS = {
    "mae": (lambda: MaskedAutoencoder(MAEConfig.from_preset(TINY)), _mae_loss),
    "decoder": (lambda: CNNDecoder(DecoderConfig.from_preset(TINY)), _decoder_loss),
    "dit": (lambda: DiT(DiTConfig.from_preset(TINY)), _dit_loss),
}


def _gradients(name: str, compute: ComputeConfig) -> tuple[float, dict[str, torch.Tensor]]:
    build, loss_of = NETWORKS[name]
    torch.manual_seed(0)
    model = prepare_network(build(), compute, torch.device("cpu"))
    loss = loss_of(model)
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["mae", "decoder", "dit"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(name: str) -> None:
    plain_loss, plain = _gradients(name, ComputeConfig())
    loss, checkpointed = _gradients(name, ComputeConfig(activation_checkpointing=True))
    assert loss == pytest.approx(plain_loss, rel=1e-6) and set(checkpointed) == set(plain)
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], atol=1e-6, rtol=1e-5, msg=key)


def test_checkpointing_reaches_every_transformer_stack_and_decoder_stage() -> None:
    for name, (build, _) in NETWORKS.items():
        model = prepare_network(build(), ComputeConfig(activation_checkpointing=True), torch.device("cpu"))
        flags = [m.activation_checkpointing for m in model.modules() if hasattr(m, "activation_checkpointing")]
        assert flags and all(flags), name


def test_channels_last_decoder_computes_the_same_volumes_and_gradients() -> None:
    tokens = torch.randn(2, TINY.num_tokens, TINY.mae.width, generator=torch.Generator().manual_seed(1))
    results = []
    for memory_format in (torch.contiguous_format, torch.channels_last_3d):  # `channels_last: false` / true
        torch.manual_seed(0)
        decoder = CNNDecoder(DecoderConfig.from_preset(TINY, channels=(8, 8, 8), latent_channels=4))
        decoder.memory_format = memory_format
        decoder.to(memory_format=memory_format)
        volume = decoder(tokens)
        volume.square().mean().backward()
        results.append((volume.detach(), {k: p.grad for k, p in decoder.named_parameters()}))
    (plain, plain_grads), (channels_last, channels_last_grads) = results
    torch.testing.assert_close(channels_last, plain, atol=1e-5, rtol=1e-4)
    for key in plain_grads:
        torch.testing.assert_close(channels_last_grads[key], plain_grads[key], atol=1e-5, rtol=1e-4, msg=key)
    # and a decoder trained channels-last still sends plain (contiguous) arrays
    assert all(v.is_contiguous() for v in trainable_state(decoder).values())


def test_channels_last_is_the_decoder_default_and_compile_wraps_each_block_in_place() -> None:
    decoder = prepare_network(CNNDecoder(DecoderConfig.from_preset(TINY)), ComputeConfig(), torch.device("cpu"))
    assert decoder.memory_format == torch.channels_last_3d  # on CPU too: oneDNN's NDHWC kernels are faster
    assert decoder.stem.weight.is_contiguous(memory_format=torch.channels_last_3d)
    maps = []  # every up-sampling stage's output: NDHWC feature maps (a batch of 2: one volume is both layouts)
    for stage in decoder.stages:
        stage.register_forward_hook(lambda _module, _inputs, output: maps.append(output))
    volume = decoder(torch.randn(2, TINY.num_tokens, TINY.mae.width))
    assert maps and all(m.is_contiguous(memory_format=torch.channels_last_3d) and not m.is_contiguous() for m in maps)
    assert volume.is_contiguous()  # the volume it returns is a plain NCDHW tensor
    plain = prepare_network(CNNDecoder(DecoderConfig.from_preset(TINY)), ComputeConfig(channels_last=False),
                            torch.device("cpu"))
    assert plain.memory_format == torch.contiguous_format and plain.stem.weight.is_contiguous()
    dit = DiT(DiTConfig.from_preset(TINY))
    keys = list(dit.state_dict())
    units = compile_units(dit)
    assert units == list(dit.blocks)
    prepare_network(dit, ComputeConfig(compile=True), torch.device("cpu"))
    assert all(block._compiled_call_impl is not None for block in dit.blocks)
    assert list(dit.state_dict()) == keys  # names, checkpoints and what travels are unchanged
    mae = MaskedAutoencoder(MAEConfig.from_preset(TINY))
    assert len(compile_units(mae)) == TINY.mae.depth + TINY.mae.decoder_depth
    assert len(compile_units(CNNDecoder(DecoderConfig.from_preset(TINY)))) == 1 + len(TINY.decoder.channels) - 1
