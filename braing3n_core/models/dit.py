"""Stage 3: the conditional diffusion transformer over the frozen encoder's token grid (spec §7).

The network predicts a velocity for noisy tokens at time t (the objective and the sampler live in
`braing3n_core/diffusion.py`; this module never imports them). It is a DiT with adaLN-Zero blocks over
patches of the (d, h, w) token grid (`patch_size` p: p³ neighbouring tokens per DiT token, as DiT patchifies
its latent), fixed 3D sin-cos positions. Every preset uses p = 1. Patch 2 makes a `small` step 9× cheaper
(150 DiT tokens instead of 1,200) but each DiT token must then emit p³·E = 1,536 values from a width of 192,
and at equal CPU time it lost clearly (bench/bench_dit_patch.py on the demo's tokens, 300 CPU-s each:
validation flow loss 0.68 after 140 patch-1 steps, 1.43 after 1,240 patch-2 steps). Patches pay only with a
width of at least p³·E, as in DiT, whose latents have 4 channels.

Working space: the full, per-channel normalised encoder tokens [B, N, E], not the decoder's projected
latent [B, N, C]. Measured on the 2-core CPU sandbox (`tiny` preset; 96 MNI152-derived volumes whose
central intensity follows a continuous "age"; frozen tiny MAE and noise-trained decoder; two DiTs of
identical size; samples decoded, re-encoded and compared with the decoded real tokens by RBF-MMD of
pooled features; adherence = correlation of the decoded samples' central intensity with the age asked):

    DiT steps (batch 32)      step time        MMD full / latent   adherence r full / latent (real data)
    1500, seed 0              equal ±10 %      0.060 / 0.016        −0.955 / −0.941 (−0.941)
    3000, seed 1              equal ±10 %      0.018 / 0.009        −0.90  / −0.90  (−0.93)
                              (48-vs-48 MMD at 3000 steps: 0.028 / 0.026; real-vs-real floor 0.016)

The step time is the same because the cost sits in the width-W transformer over N tokens, not in the
E- vs C-channel input/output layers. The latent converges about twice as fast; the full-token DiT
catches up with twice the steps, with equal adherence. The full tokens are kept because (1) samples
live in the encoder's own space, so probes, the Fréchet/MMD metrics and the forecasting baseline (read
straight from the embedding cache) use them without a decode → re-encode round trip; (2) stage 3 does
not depend on one particular decoder: improving or retraining the decoder does not invalidate the DiT;
(3) it is what the paper describes (a DiT trained on the frozen embeddings) and what the representation-
autoencoder work shows scales, given a DiT width ≥ E (true for every preset) and a noise-trained
decoder. Budget the DiT stage for the slower convergence.

Conditioning: `c = timestep embedding + Σ embeddings of the six variables + interval embedding +
baseline-presence embedding`, fed to every block through adaLN-Zero. Longitudinal mode concatenates the
normalised baseline tokens channel-wise to the noisy input (zeros and the learned "no baseline" flag
when a sample has none), so cross-sectional samples and pairs train in one model.

What a pair diffuses (`change_scale`): the follow-up's *change* from its baseline, (x − b) / change_scale in
normalised token space, and the sampler adds it back to the baseline (`diffusion.py`). When the pair's
target was the follow-up's tokens themselves, the network had to rebuild the whole baseline through every
block to forecast a small change, and did not: on the long run's held-out pairs its forecasts moved the
tokens 0.50–0.62 RMS from the baseline where the real follow-ups moved 0.11–0.60 (correlation with the real
change ≈ 0.1; even its conditional mean moved 0.43–0.51), and the residual forecast lost to no-change. The
change parametrisation makes "nothing changes" the zero of the flow, as a residual forecast is of the volume.

What "nothing changes" is measured from (`trend`): the population's expected change, interval × the annual
token change of the pair's (modality, diagnosis) cell, fitted federated on the training pairs by least
squares through the origin (`ChangeTrendSums`: the regional trend of `generation.forecast_eval`, done per
token), is subtracted too, so the flow diffuses a pair's *deviation from its cell's trend* and the
conditional-mean forecast starts from the trend instead of from no change. Without it the network had to
learn a mean change of 0.055 RMS (normalised) under a session-to-session spread of 0.43 from 186 pairs and,
in 12 × 25 local steps, did not: on the long run's 18 held-out pairs its conditional mean scored 8.5 ml of
regional change error against 7.9 for no change, where the trend alone scores 5.0 ml (+37 %; per modality
only, pooled over diagnoses, +9 %; rank-1, a modality's direction with a gain per diagnosis, +23 %:
`bench/bench_forecast_ceiling.py`). Retrained with the trend (same encoder, decoder and schedule), the DiT's
conditional mean scores 5.3 ml (+33 %). The table is a buffer, [modalities, diagnoses, N, E] (14.7 MB at
`small`, 88 MB at `paper`), set once before the first round; as a buffer it travels with the weights in
every message of the stage.

Token normalisation statistics (per-channel mean and std of the training tokens) are buffers of this
module, so a checkpoint carries everything needed to turn samples back into encoder tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from braing3n_core.labels import DIAGNOSES, MODALITIES
from braing3n_core.models.blocks import (
    MLP,
    Attention,
    LearnedTokens,
    check_tokens,
    grid_of,
    patchify,
    run_block,
    sincos_position_embedding,
    tokens_to_grid,
    unpatchify,
)
from braing3n_core.models.conditions import (
    CONDITION_SCHEMA,
    INTERVAL,
    CategoricalVariable,
    ConditionBatch,
    ContinuousVariable,
)
from braing3n_core.presets import Preset, get_preset

# The spread of a follow-up's normalised tokens around its baseline's: measured 0.43 (per channel 0.28–0.56)
# over the long run's 186 training pairs (`runs-config/long.yaml`), so the diffused change has about the unit
# scale of the noise, like the cross-sectional tokens.
PAIR_CHANGE_SCALE = 0.5
# A trend cell needs this many pairs, else it falls back to its modality's pairs, then to all pairs (a site
# also withholds its cells of fewer subjects than its `privacy.min_subjects_per_cell`, 3 by default).
MIN_TREND_PAIRS = 3


@dataclass(frozen=True)
class DiTConfig:
    grid: tuple[int, int, int]  # token grid (d, h, w)
    token_dim: int  # channels of the diffused tokens (the encoder width E)
    width: int
    depth: int
    heads: int
    mlp_dim: int
    frequency_dim: int = 256  # sinusoidal features of t before the timestep MLP
    fourier_features: int = 8  # sin/cos octaves for each continuous condition
    patch_size: int = 1  # p: each DiT token is a p×p×p block of encoder tokens
    # A longitudinal pair diffuses the follow-up's change from its baseline, (x − baseline) / change_scale in
    # normalised token space, not the follow-up's tokens (module docstring); None: the tokens themselves
    # (checkpoints from before the change was introduced).
    change_scale: float | None = PAIR_CHANGE_SCALE
    # A pair diffuses its change minus its (modality, diagnosis) cell's trend × interval (module docstring);
    # False: the change itself (checkpoints from before the trend was introduced).
    trend: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        if self.change_scale is not None and not self.change_scale > 0:
            raise ValueError(f"DiTConfig.change_scale={self.change_scale} must be positive (or None)")
        if self.trend and self.change_scale is None:
            raise ValueError("DiTConfig.trend needs a change_scale (the trend shifts a pair's diffused change)")
        if self.width % 6 or self.width % self.heads:
            raise ValueError(f"DiTConfig.width={self.width} must be divisible by 6 and by heads={self.heads}")
        if self.patch_size < 1 or any(g % self.patch_size for g in self.grid):
            raise ValueError(f"DiTConfig.patch_size={self.patch_size} must divide the token grid {self.grid}")

    @property
    def num_tokens(self) -> int:
        d, h, w = self.grid
        return d * h * w

    @property
    def patch_grid(self) -> tuple[int, int, int]:
        """The grid the transformer runs on: (d/p, h/p, w/p)."""
        return grid_of(self.grid, self.patch_size)

    @classmethod
    def from_preset(cls, preset: str | Preset, **overrides: Any) -> "DiTConfig":
        preset = get_preset(preset) if isinstance(preset, str) else preset
        values = dict(grid=preset.grid, token_dim=preset.mae.width, **asdict(preset.dit))
        return cls(**{**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DiTConfig":
        # A config saved before `change_scale` (or `trend`) existed describes a DiT whose pairs diffuse the
        # tokens (or their change without a trend).
        return cls(**{"change_scale": None, "trend": False, **data})


class TokenMoments:
    """Per-channel sums of tokens (float64), mergeable across batches and sites, so the normalisation
    statistics of a federated training set can be computed without pooling any tokens."""

    def __init__(self, dim: int) -> None:
        self.count = 0  # number of token vectors summed
        self.total = torch.zeros(dim, dtype=torch.float64)  # [E] Σ x
        self.total_sq = torch.zeros(dim, dtype=torch.float64)  # [E] Σ x²

    def add(self, tokens: Tensor) -> "TokenMoments":
        """Accumulate tokens [B, N, E] (or [M, E]) in place; returns self."""
        flat = tokens.detach().reshape(-1, self.total.shape[0]).to("cpu", torch.float64)
        self.count += flat.shape[0]
        self.total += flat.sum(0)
        self.total_sq += (flat * flat).sum(0)
        return self

    def merge(self, other: "TokenMoments") -> "TokenMoments":
        """A new accumulator holding both sets of sums."""
        merged = TokenMoments(self.total.shape[0])
        merged.count = self.count + other.count
        merged.total = self.total + other.total
        merged.total_sq = self.total_sq + other.total_sq
        return merged

    def mean_std(self, floor: float = 1e-6) -> tuple[Tensor, Tensor]:
        """(mean [E], unbiased std [E]) as float32; std is floored so constant channels stay finite."""
        if self.count < 2:
            raise ValueError("token statistics need at least two token vectors")
        mean = self.total / self.count
        var = (self.total_sq / self.count - mean * mean).clamp_min(0.0) * self.count / (self.count - 1)
        return mean.float(), var.sqrt().clamp_min(floor).float()


class ChangeTrendSums:
    """Sums over longitudinal pairs per (modality, diagnosis) cell, mergeable across sites: Σ Δ·t of the token
    change Δ = follow-up − baseline (raw encoder tokens [N, E]) times the interval t in years, Σ t² and the
    number of pairs; `rates` fits each cell's annual change by least squares through the origin."""

    def __init__(self, num_tokens: int, dim: int) -> None:
        cells = (len(MODALITIES), len(DIAGNOSES))
        self.change_years = torch.zeros(*cells, num_tokens, dim, dtype=torch.float64)  # [M, D, N, E] Σ Δ·t
        self.years_sq = torch.zeros(cells, dtype=torch.float64)  # [M, D] Σ t²
        self.pairs = torch.zeros(cells, dtype=torch.float64)  # [M, D]
        self._subjects: dict[tuple[int, int], set[str]] = {}

    def add(self, modality: int, diagnosis: int, change: Tensor, years: float, subject: str) -> ChangeTrendSums:
        """One pair (change [N, E]) of `subject`; a pair with an unknown modality or diagnosis (−1) counts in
        no cell. Returns self."""
        if modality < 0 or diagnosis < 0 or not years > 0:
            return self
        self.change_years[modality, diagnosis] += change.detach().to("cpu", torch.float64) * years
        self.years_sq[modality, diagnosis] += years**2
        self.pairs[modality, diagnosis] += 1
        self._subjects.setdefault((modality, diagnosis), set()).add(subject)
        return self

    def without_small_cells(self, min_subjects: int) -> ChangeTrendSums:
        """The sums with every cell of pairs from fewer than `min_subjects` subjects emptied (what a site
        sends: no cell that is one or two people's change)."""
        kept = ChangeTrendSums(*self.change_years.shape[2:])
        for (m, d), subjects in self._subjects.items():
            if len(subjects) >= min_subjects:
                kept.change_years[m, d] = self.change_years[m, d]
                kept.years_sq[m, d], kept.pairs[m, d] = self.years_sq[m, d], self.pairs[m, d]
                kept._subjects[(m, d)] = set(subjects)
        return kept

    def merge(self, other: ChangeTrendSums) -> ChangeTrendSums:
        merged = ChangeTrendSums(*self.change_years.shape[2:])
        merged.change_years = self.change_years + other.change_years
        merged.years_sq, merged.pairs = self.years_sq + other.years_sq, self.pairs + other.pairs
        return merged

    def rates(self, token_std: Tensor, min_pairs: int = MIN_TREND_PAIRS) -> Tensor:
        """[M, D, N, E] annual change in normalised token units (÷ the per-channel std): each cell's own
        least-squares slope when it has `min_pairs` pairs, else its modality's over all diagnoses, else all
        pairs', else zero (no trend)."""
        def slope(change_years: Tensor, years_sq: Tensor, pairs: Tensor) -> Tensor | None:
            return change_years / years_sq if pairs >= min_pairs and years_sq > 0 else None

        pooled = slope(self.change_years.sum((0, 1)), self.years_sq.sum(), self.pairs.sum())
        out = torch.zeros(self.change_years.shape, dtype=torch.float64)
        for m in range(out.shape[0]):
            by_modality = slope(self.change_years[m].sum(0), self.years_sq[m].sum(), self.pairs[m].sum())
            for d in range(out.shape[1]):
                rate = slope(self.change_years[m, d], self.years_sq[m, d], self.pairs[m, d])
                rate = next((r for r in (rate, by_modality, pooled) if r is not None), None)
                if rate is not None:
                    out[m, d] = rate
        return (out / token_std.double()).float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # x [B, N, W]; shift, scale [B, W]


def timestep_features(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of t ∈ [0, 1] (scaled by 1000, as DiT's integer timesteps): [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, frequency_dim: int) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:  # [B] -> [B, W]
        return self.mlp(timestep_features(t, self.frequency_dim))


class ContinuousEmbedder(nn.Module):
    """Scaled value -> Fourier features -> MLP; a learned null vector where the value is NaN."""

    def __init__(self, variable: ContinuousVariable, width: int, octaves: int) -> None:
        super().__init__()
        self.variable = variable
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(octaves, dtype=torch.float32), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(1 + 2 * octaves, width), nn.SiLU(), nn.Linear(width, width))
        self.null = LearnedTokens(1, width)

    def forward(self, values: Tensor) -> Tensor:  # [B] (NaN = missing) -> [B, W]
        missing = values.isnan()
        # Zero-fill before the MLP: a NaN input would make the MLP's weight gradient NaN even where
        # the output is replaced by the null embedding.
        scaled = self.variable.scale(torch.where(missing, torch.zeros_like(values), values)).float()[:, None]
        angles = scaled * self.frequencies
        embedded = self.mlp(torch.cat([scaled, angles.sin(), angles.cos()], dim=-1))  # [B, W]
        null = self.null(torch.zeros_like(values, dtype=torch.long))  # [B, W]
        return torch.where(missing[:, None], null.to(embedded.dtype), embedded)


class CategoricalEmbedder(nn.Module):
    """One table row per category plus a last row for "missing" (−1)."""

    def __init__(self, variable: CategoricalVariable, width: int) -> None:
        super().__init__()
        self.table = nn.Embedding(variable.size + 1, width)
        self.null_index = variable.size

    def forward(self, index: Tensor) -> Tensor:  # [B] long -> [B, W]
        return self.table(torch.where(index < 0, torch.full_like(index, self.null_index), index))


class ConditionEmbedder(nn.Module):
    def __init__(self, width: int, octaves: int) -> None:
        super().__init__()
        self.variables = nn.ModuleDict({
            v.name: ContinuousEmbedder(v, width, octaves) if isinstance(v, ContinuousVariable) else CategoricalEmbedder(v, width)
            for v in CONDITION_SCHEMA
        })
        self.interval = ContinuousEmbedder(INTERVAL, width, octaves)
        self.has_baseline = nn.Embedding(2, width)  # row 0: "no baseline", row 1: baseline present

    def forward(self, cond: ConditionBatch, interval: Tensor, has_baseline: Tensor) -> Tensor:  # -> [B, W]
        total = self.interval(interval) + self.has_baseline(has_baseline.long())
        for name, embedder in self.variables.items():
            total = total + embedder(getattr(cond, name))
        return total


class DiTBlock(nn.Module):
    """adaLN-Zero block: LayerNorms without affine, modulated by (shift, scale, gate) computed from c."""

    def __init__(self, width: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(width, mlp_dim, approximate="tanh")
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:  # x [B, N, W], c [B, W]
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(c).chunk(6, dim=-1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        width, dim, cells = config.width, config.token_dim, config.patch_size**3
        self.input_proj = nn.Linear(2 * cells * dim, width)  # [noisy tokens ‖ baseline tokens] per patch
        self.register_buffer("pos_embed", sincos_position_embedding(config.patch_grid, width)[None], persistent=False)
        self.t_embedder = TimestepEmbedder(width, config.frequency_dim)
        self.c_embedder = ConditionEmbedder(width, config.fourier_features)
        self.blocks = nn.ModuleList(DiTBlock(width, config.heads, config.mlp_dim) for _ in range(config.depth))
        self.final = FinalLayer(width, cells * dim)
        # Persistent: the statistics are part of the trained model (set once from the training tokens).
        self.register_buffer("token_mean", torch.zeros(dim))
        self.register_buffer("token_std", torch.ones(dim))
        if config.trend:  # [M, D, N, E] annual change per (modality, diagnosis), normalised (`ChangeTrendSums`)
            self.register_buffer("change_trend", torch.zeros(len(MODALITIES), len(DIAGNOSES), config.num_tokens, dim))
        self.activation_checkpointing = False  # a site's compute setting, not part of the architecture
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """All initialisation in one place (DiT recipe).

        * Every linear layer: Xavier-uniform weights, zero bias (transformer default).
        * Timestep MLP and condition tables / null vectors: N(0, 0.02), small so that at the start the
          conditioning vector c is dominated by no single input.
        * adaLN modulation of every block: zero, so shift = scale = gate = 0 and each block starts as
          the identity (x + 0·attn + 0·mlp); the network deepens smoothly as gates open.
        * Final modulation and output linear: zero, so the initial prediction is exactly 0.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for module in self.c_embedder.modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        for layer in (self.final.modulation[-1], self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # --- token normalisation ------------------------------------------------------------------------

    def set_token_statistics(self, mean: Tensor, std: Tensor) -> None:
        """Per-channel mean/std [E] of the training tokens (e.g. from `TokenMoments.mean_std()`)."""
        dim = self.config.token_dim
        if mean.shape != (dim,) or std.shape != (dim,) or not bool((std > 0).all()):
            raise ValueError(f"token statistics must be two [{dim}] tensors with std > 0")
        self.token_mean.copy_(mean)
        self.token_std.copy_(std)

    def set_change_trend(self, rates: Tensor) -> None:
        """The pairs' trend, [M, D, N, E] annual change in normalised units (`ChangeTrendSums.rates`)."""
        if not self.config.trend:
            raise ValueError("this DiT has no trend (DiTConfig.trend is False)")
        if rates.shape != self.change_trend.shape or not bool(rates.isfinite().all()):
            raise ValueError(f"the change trend must be a finite {list(self.change_trend.shape)} tensor, got {list(rates.shape)}")
        self.change_trend.copy_(rates)

    def expected_change(self, cond: ConditionBatch, interval: Tensor) -> Tensor | None:
        """The trend's change over `interval` [B] years for each row's (modality, diagnosis), [B, N, E] in
        normalised units; zero where the interval, modality or diagnosis is missing. None without a trend."""
        if not self.config.trend:
            return None
        modality, diagnosis = cond.modality.to(interval.device), cond.diagnosis.to(interval.device)
        known = (modality >= 0) & (diagnosis >= 0) & interval.isfinite()  # [B]
        rates = self.change_trend[modality.clamp_min(0), diagnosis.clamp_min(0)]  # [B, N, E]
        years = torch.where(known, interval, torch.zeros_like(interval)).to(rates.dtype)
        return rates * years[:, None, None]

    def normalize(self, tokens: Tensor) -> Tensor:  # encoder tokens [B, N, E] -> diffusion space
        return (tokens - self.token_mean) / self.token_std

    def denormalize(self, x: Tensor) -> Tensor:  # diffusion space -> encoder tokens [B, N, E]
        return x * self.token_std + self.token_mean

    # --- network ------------------------------------------------------------------------------------

    def forward(
        self, x: Tensor, t: Tensor, cond: ConditionBatch, baseline: Tensor | None = None, interval: Tensor | None = None
    ) -> Tensor:
        """Velocity for normalised noisy tokens.

        x [B, N, E] normalised noisy tokens; t [B] in [0, 1] (1 = pure noise); cond: B conditions;
        baseline [B, N, E] normalised baseline tokens, all-NaN rows (or None) = no baseline;
        interval [B] years, NaN (or None) = none. Returns [B, N, E].
        """
        config = self.config
        check_tokens(x, config.num_tokens, config.token_dim, "DiT")
        batch = x.shape[0]
        if cond.batch_size != batch or t.shape != (batch,):
            raise ValueError(f"DiT: {batch} token sets but t {list(t.shape)} and {cond.batch_size} conditions")
        if baseline is None:
            has_baseline = torch.zeros(batch, dtype=torch.bool, device=x.device)
            baseline = torch.zeros_like(x)
        else:
            check_tokens(baseline, config.num_tokens, config.token_dim, "DiT baseline")
            has_baseline = ~baseline.isnan().flatten(1).all(dim=1)  # [B]
            baseline = torch.where(has_baseline[:, None, None], baseline, torch.zeros_like(baseline))
            if baseline.device.type != "meta" and bool(baseline.isnan().any()):
                raise ValueError("DiT baseline: a present baseline must not contain NaN (NaN marks a whole absent row)")
        if interval is None:
            interval = torch.full((batch,), math.nan, device=x.device)
        pairs = torch.cat([x, baseline.to(x.dtype)], dim=-1)  # [B, N, 2E]
        h = self.input_proj(self._patchify(pairs)) + self.pos_embed  # [B, M, W], M = N / p³
        c = self.t_embedder(t) + self.c_embedder(cond, interval, has_baseline)  # [B, W]
        for block in self.blocks:
            h = run_block(block, h, c, checkpointed=self.activation_checkpointing)
        return self._unpatchify(self.final(h, c))  # [B, M, p³E] -> [B, N, E]

    def _patchify(self, tokens: Tensor) -> Tensor:  # [B, N, C] -> [B, M, p³·C]
        if self.config.patch_size == 1:
            return tokens
        return patchify(tokens_to_grid(tokens, self.config.grid), self.config.patch_size)

    def _unpatchify(self, patches: Tensor) -> Tensor:  # [B, M, p³·C] -> [B, N, C]
        if self.config.patch_size == 1:
            return patches
        grid = unpatchify(patches, self.config.patch_grid, self.config.patch_size)  # [B, C, d, h, w]
        return grid.flatten(2).transpose(1, 2)
