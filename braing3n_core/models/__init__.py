"""The three BrainG3N networks (model-spec §4–7), each built from a typed config:

* `MaskedAutoencoder` (`MAEConfig`): stage 1. `.encoder` (`MAEEncoder`) is the frozen tokenizer:
  `encoder.encode(volume [B, 1, D, H, W]) -> (tokens [B, N, E], pooled [B, E])`, always unmasked.
* `CNNDecoder` (`DecoderConfig`): stage 2, `tokens [B, N, E] -> volume [B, 1, D, H, W]`.
* `DiT` (`DiTConfig`): stage 3, velocity network over normalised tokens; the objective and the sampler
  are in `braing3n_core.models.diffusion`.

Every config has `from_preset(name)` (sizes from `braing3n_core.presets`), `to_dict()` and
`from_dict()` (JSON beside the safetensors weights). All parameters are float32 and live in
Opacus-supported layers (Linear, LayerNorm, GroupNorm, Conv3d, Embedding).
"""

from braing3n_core.models.decoder import CNNDecoder, DecoderConfig, DecoderLoss, ssim_3d
from braing3n_core.models.dit import ChangeTrendSums, DiT, DiTConfig, TokenMoments
from braing3n_core.models.mae import MAEConfig, MAEEncoder, MAEOutput, MaskedAutoencoder

__all__ = [
    "CNNDecoder",
    "ChangeTrendSums",
    "DecoderConfig",
    "DecoderLoss",
    "DiT",
    "DiTConfig",
    "MAEConfig",
    "MAEEncoder",
    "MAEOutput",
    "MaskedAutoencoder",
    "TokenMoments",
    "ssim_3d",
]
