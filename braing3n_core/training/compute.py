"""A site's compute settings (`site_config.ComputeConfig`) applied to a stage's network before it trains.

None of them changes the function a network computes, only its speed and memory on the hardware:
- bf16 autocast on CUDA is always on (`runtime.autocast`; weights and what travels stay fp32), and
  attention is `F.scaled_dot_product_attention` (`models.blocks.Attention`), which dispatches to the flash
  or memory-efficient kernels on CUDA;
- `activation_checkpointing`: transformer blocks and the decoder's up-sampling stages keep only their
  inputs and recompute the rest in the backward pass (`models.blocks.run_block`);
- `channels_last`: the decoder's weights and feature maps in NDHWC, the layout of cuDNN's fast bf16 3D
  convolutions, and on CPU of oneDNN's faster ones (`models.decoder.CNNDecoder.use_memory_format`);
- `compile`: `torch.compile` of each transformer block and decoder stage in place (`nn.Module.compile`), so
  parameter names, checkpoints and what travels are unchanged; the first steps pay the compilation.
"""

from __future__ import annotations

import torch
from torch import nn

from braing3n_core.models.blocks import TransformerBlock
from braing3n_core.models.decoder import CNNDecoder, ResidualBlock, UpStage
from braing3n_core.models.dit import DiTBlock
from braing3n_core.site_config import ComputeConfig

COMPILED_UNITS = (TransformerBlock, DiTBlock, UpStage, ResidualBlock)


def prepare_network(model: nn.Module, compute: ComputeConfig, device: torch.device) -> nn.Module:
    """Apply `compute` to `model` (in place; already on `device`) and return it."""
    for module in model.modules():
        if hasattr(module, "activation_checkpointing"):
            module.activation_checkpointing = compute.activation_checkpointing
    for module in model.modules():
        if isinstance(module, CNNDecoder):
            module.use_memory_format(torch.channels_last_3d if compute.channels_last else torch.contiguous_format)
    if compute.compile:
        for unit in compile_units(model):
            unit.compile()
    return model


def compile_units(model: nn.Module) -> list[nn.Module]:
    """The outermost transformer blocks and decoder stages of `model` (each compiled on its own: one graph
    per block type, reused by every block of that shape, instead of one graph of the whole stage loss)."""
    units: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, COMPILED_UNITS):
                units.append(child)
            else:
                visit(child)

    visit(model)
    return units
