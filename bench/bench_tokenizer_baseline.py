"""The paper's central claim at our scale: MAE tokens are a better dual-purpose tokenizer than a VAE latent.

BrainG3N's claim is that one frozen MAE embedding serves both semantics (linear probes) and
reconstruction (a CNN decoder on a linear projection of the tokens). The standard alternative for
latent diffusion is a reconstruction-trained KL autoencoder. This benchmark trains both on the same
scans and compares them on both axes.

* **Ours**: the MAE and then the CNN decoder, trained centralized through the real trainer
  (`braing3n_core.train.train_centralized`, what `braing3n train mae|decoder` runs), or taken from an
  existing run folder (`--run`, its `checkpoints/{mae,decoder}`).
* **Baseline**: MONAI's `AutoencoderKL` (3D, GroupNorm, no attention), 2^3 down-sampling so its latent
  grid equals our token grid (10×12×10 at `small`), `latent_channels` equal to our decoder's projection
  width (16 at `small`: both voxel decoders read 16 numbers per grid cell), and channels chosen so its
  parameter count matches MAE encoder + MAE pre-training decoder + CNN decoder (both are stated in the
  JSON). Loss: L1 + a small KL term (MONAI's tutorial weight); no perceptual or adversarial loss (MONAI's
  perceptual loss downloads weights). It trains on the MAE stage's very training examples (same train
  subjects, same preprocessing and augmentation), AdamW, cosine schedule, gradient clipping at 1.
* **Budget: equal compute time.** A conv VAE at full resolution costs about 20× the FLOPs per training
  volume of the MAE + decoder pair (the FLOPs are counted and stored), so an equal *step* budget would
  give it 20× the compute. The fair question for a site with fixed hardware is "which tokenizer is better
  after the same time". The baseline therefore gets the CPU time (`time.process_time`, all threads) that
  our two `train_centralized` calls used, including their token caching, validation and checkpoints. CPU
  time rather than wall time because three other jobs share this machine's two cores and their load
  changes between phases; wall times are stored too. With `--run` the budget is `--budget-seconds`, else
  the run's logged training seconds.

Evaluation, on the same scans for every model:

(a) Linear probes (`probes.run_probes`, subject-grouped k-fold cross-validation over every usable scan
    of every site) on pooled features: the MAE's mean token (192-d at `small`); the same through our
    decoder's linear projection (16-d, matching the VAE latent's width); a random-init MAE (the
    reference a trained encoder must beat); the VAE's mean latent `z_mu` (16-d, what a latent
    diffusion model would use) and its mean deepest encoder features (the last residual output, 128-d
    at the defaults).
(b) Reconstruction of the held-out (test-split) scans: PSNR / SSIM / MS-SSIM / MAE from
    `braing3n_core.evaluation.metrics`, whole volume and brain-only.

Prints one summary line; writes bench/results/tokenizer_baseline.json.

    python bench/bench_tokenizer_baseline.py [--data FOLDER] [--out RUN_FOLDER] [--run RUN_FOLDER]
                                             [--mae-steps 50] [--decoder-steps 30] [--budget-seconds S]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.nets import AutoencoderKL
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cohort_sites, count_flops, load_average, machine_info
from braing3n_core.checkpoint import latest_checkpoint
from braing3n_core.data.bids import ScanRecord
from braing3n_core.data.datasets import SiteData, load_site
from braing3n_core.data.tokens import TokenCache
from braing3n_core.data.transforms import preprocess_scan
from braing3n_core.evaluation import metrics
from braing3n_core.evaluation.features import pooled_features, probe_table
from braing3n_core.evaluation.probe_tasks import ProbeTable
from braing3n_core.evaluation.probes import run_probes
from braing3n_core.fileio import atomic_write_json
from braing3n_core.models import CNNDecoder, MAEEncoder, MaskedAutoencoder
from braing3n_core.presets import Preset, get_preset
from braing3n_core.runtime import (
    autocast,
    cosine_lr,
    infinite,
    resolve_device,
    seed_everything,
)
from braing3n_core.site_config import SiteConfig
from braing3n_core.training.centralized import TrainOptions, train_centralized
from braing3n_core.training.checkpoints import load_stage_model
from braing3n_core.training.examples import SiteInputs
from braing3n_core.training.loop import make_loader, make_optimizer
from braing3n_core.training.stages import get_stage, stage_dataset

RESULTS = Path(__file__).resolve().parent / "results" / "tokenizer_baseline.json"
# The summary's probe metrics: (metric, higher is better).
HEADLINE_PROBES: tuple[tuple[str, bool], ...] = (
    ("probe/age_r2", True), ("probe/age_mae", False), ("probe/sex_auroc", True),
    ("probe/diagnosis_bacc", True), ("probe/modality_bacc", True),
)


def parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- ours: MAE → decoder through the real trainer --------------------------------------------------------------


@dataclass
class Phase:
    """One timed phase: CPU seconds of this process (all threads), wall seconds, load around it."""

    cpu_seconds: float
    wall_seconds: float
    load_before: list[float]
    load_after: list[float]

    @classmethod
    def run(cls, fn: Callable[[], Any]) -> tuple[Any, Phase]:
        load, cpu, wall = load_average(), time.process_time(), time.perf_counter()
        value = fn()
        return value, cls(time.process_time() - cpu, time.perf_counter() - wall, load, load_average())

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class Ours:
    mae: MaskedAutoencoder
    decoder: CNNDecoder
    checkpoints: dict[str, str]
    budget_seconds: float
    budget_source: str
    phases: dict[str, dict[str, Any]]


def stage_checkpoint(run: Path, stage: str) -> Path:
    """A federated run's `final.json`, else a centralized run's latest `step-*.json`."""
    folder = run / "checkpoints" / stage
    final = folder / "final.json"
    found = final if final.is_file() else latest_checkpoint(folder, "step-")
    if found is None:
        raise FileNotFoundError(f"{folder}: no checkpoint (final.json or step-*.json); train the {stage} stage first")
    return found


def logged_training_seconds(run: Path) -> float:
    """Sum of `train/seconds` over the run's mae and decoder records in `metrics.jsonl`."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics log to take the budget from; pass --budget-seconds")
    total = 0.0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error})") from None
        if record.get("stage") in ("mae", "decoder"):
            total += float(record.get("train/seconds", 0.0))
    if total <= 0:
        raise ValueError(f"{path}: no train/seconds for the mae and decoder stages; pass --budget-seconds")
    return total


def load_ours(run: Path, preset: Preset, budget: float | None) -> Ours:
    paths = {stage: stage_checkpoint(run, stage) for stage in ("mae", "decoder")}
    mae, checkpoint = load_stage_model(paths["mae"], expected_stage="mae")
    decoder, _ = load_stage_model(paths["decoder"], expected_stage="decoder")
    if checkpoint.meta.get("preset", preset.name) != preset.name:
        raise ValueError(f"{paths['mae']}: trained at preset {checkpoint.meta['preset']!r}, but --preset is {preset.name!r}")
    source = "--budget-seconds" if budget is not None else f"{run / 'metrics.jsonl'} train/seconds (mae + decoder)"
    budget = budget if budget is not None else logged_training_seconds(run)
    return Ours(mae, decoder, {k: str(v) for k, v in paths.items()}, budget, source, {})


def train_ours(site_yamls: Sequence[Path], preset: Preset, out: Path, args: argparse.Namespace) -> Ours:
    configs = [SiteConfig.from_yaml(p) for p in site_yamls]
    phases, paths = {}, {}
    for stage, steps, batch, lr in (("mae", args.mae_steps, args.mae_batch, args.mae_lr),
                                    ("decoder", args.decoder_steps, args.decoder_batch, args.decoder_lr)):
        print(f"training {stage}: {steps} steps of {batch} …", file=sys.stderr, flush=True)
        options = TrainOptions(stage=stage, preset=preset.name, steps=steps, batch_size=batch, lr=lr,
                               warmup_steps=args.warmup_steps if stage == "mae" else 0, seed=args.seed,
                               device=args.device, out_dir=out, checkpoint_every=steps, resume=False)
        paths[stage], phase = Phase.run(lambda options=options: train_centralized(configs, options))
        phases[stage] = phase.to_dict()
    mae, _ = load_stage_model(paths["mae"], expected_stage="mae")
    decoder, _ = load_stage_model(paths["decoder"], expected_stage="decoder")
    budget = sum(p["cpu_seconds"] for p in phases.values())
    return Ours(mae, decoder, {k: str(v) for k, v in paths.items()}, budget,
                "CPU seconds of train_centralized(mae) + train_centralized(decoder) in this run", phases)


# --- baseline: MONAI AutoencoderKL ---------------------------------------------------------------------------


def build_autoencoder(preset: Preset, channels: Sequence[int], latent_channels: int) -> AutoencoderKL:
    """3D AutoencoderKL whose latent grid is the token grid (one ×2 down-sampling per level after the first)."""
    if 2 ** (len(channels) - 1) != preset.patch_size:
        raise ValueError(f"AutoencoderKL channels {tuple(channels)}: need log2(patch {preset.patch_size}) + 1 = "
                         f"{preset.patch_size.bit_length()} levels so the latent grid is the token grid {preset.grid}")
    groups = math.gcd(*channels)
    return AutoencoderKL(
        spatial_dims=3, in_channels=1, out_channels=1, channels=tuple(channels), num_res_blocks=1,
        attention_levels=(False,) * len(channels), latent_channels=latent_channels, norm_num_groups=min(groups, 8),
        with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False,
    )


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) summed over the latent [B, C, d, h, w], mean over samples (MONAI's tutorials)."""
    kl = 0.5 * (z_mu.float() ** 2 + z_sigma.float() ** 2 - torch.log(z_sigma.float() ** 2) - 1.0)
    return kl.flatten(1).sum(dim=1).mean()


def autoencoder_loss(model: AutoencoderKL, volume: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1 + kl_weight · KL, the L1 term detached)."""
    recon, z_mu, z_sigma = model(volume)  # [B, 1, D, H, W], [B, C, d, h, w] ×2
    l1 = (recon.float() - volume.float()).abs().mean()
    return l1 + kl_weight * kl_divergence(z_mu, z_sigma), l1.detach()


def train_autoencoder(model: AutoencoderKL, sites: Sequence[SiteInputs], budget_cpu: float, device: torch.device,
                      args: argparse.Namespace) -> dict[str, Any]:
    """Train until `budget_cpu` CPU seconds are spent: a step starts while at least half of an average
    step's CPU time is left, so the overshoot or shortfall is at most half a step either way. The cosine
    schedule's length is re-estimated each step from the CPU time per step so far, so the rate reaches
    its floor as the budget runs out."""
    train_set = stage_dataset(get_stage("mae"), sites, "train")  # the MAE's examples, augmentation included
    batches = infinite(make_loader(train_set, args.akl_batch, True, args.seed))
    optimizer = make_optimizer(model, args.akl_lr, 0.0)
    seed_everything(args.seed)  # the forward's reparameterisation noise comes from torch's global generator
    model.train()
    cpu0, wall0, load0 = time.process_time(), time.perf_counter(), load_average()
    step, examples, curve = 0, 0, []
    while (spent := time.process_time() - cpu0) + (0.5 * spent / step if step else 0.0) < budget_cpu:
        planned = step + 1 if step == 0 else max(step + 1, round(step * budget_cpu / spent))
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(args.akl_lr, step, planned, warmup_steps=min(args.warmup_steps, planned // 4))
        volume = next(batches)["volume"].to(device)
        with autocast(device):
            loss, l1 = autoencoder_loss(model, volume, args.kl_weight)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"AutoencoderKL: non-finite loss at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step, examples = step + 1, examples + volume.shape[0]
        curve.append(float(l1))
    return {"steps": step, "examples": examples, "batch_size": args.akl_batch, "lr": args.akl_lr,
            "kl_weight": args.kl_weight, "train_examples": len(train_set),
            "train_l1_first10": float(np.mean(curve[:10])) if curve else math.nan,
            "train_l1_last10": float(np.mean(curve[-10:])) if curve else math.nan,
            "cpu_seconds": time.process_time() - cpu0, "wall_seconds": time.perf_counter() - wall0,
            "load_before": load0, "load_after": load_average()}


# --- features ------------------------------------------------------------------------------------------------


def load_volumes(data: SiteData, records: Sequence[ScanRecord]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(preprocess_scan(r.path, data.preset, data.cache)) for r in records])


@torch.no_grad()
def autoencoder_features(model: AutoencoderKL, data: SiteData, records: Sequence[ScanRecord], device: torch.device,
                         batch_size: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Per scan: mean latent z_mu [n, C_latent] and mean deepest encoder features [n, C_last] (the
    encoder's last residual output, before its closing GroupNorm + conv to the latent width)."""
    model.eval()
    blocks = model.encoder.blocks
    if not isinstance(blocks[-2], nn.GroupNorm):
        raise TypeError("unexpected MONAI AutoencoderKL encoder layout: its second-to-last block is not a GroupNorm")
    latents, features = [], []
    for start in range(0, len(records), batch_size):
        x = load_volumes(data, records[start : start + batch_size]).to(device)  # [B, 1, D, H, W]
        with autocast(device):
            for block in blocks[:-2]:
                x = block(x)
            h = x  # [B, C_last, d, h, w]
            z_mu = model.quant_conv_mu(blocks[-1](blocks[-2](h)))  # [B, C_latent, d, h, w], as model.encode
        latents.append(z_mu.float().mean(dim=(2, 3, 4)).cpu().numpy())
        features.append(h.float().mean(dim=(2, 3, 4)).cpu().numpy())
    return np.concatenate(latents), np.concatenate(features)


def encoder_features(encoder: MAEEncoder, data: Sequence[SiteData], preset: Preset, device: torch.device,
                     records: dict[str, list[ScanRecord]] | None = None) -> tuple[np.ndarray, dict[str, list[ScanRecord]]]:
    """Pooled tokens of every usable scan, through each site's token cache. Returns the features and the
    records per site (all of them, or the given ones)."""
    features, used = [], {}
    for site in data:
        cache = TokenCache(site.config.resolved_cache_dir, encoder, preset, site.cache, device)
        wanted = records[site.config.site_id] if records is not None else site.records
        usable = cache.ensure(wanted, progress=False)
        if records is not None and len(usable) != len(wanted):
            raise RuntimeError(f"{site.config.site_id}: {len(wanted) - len(usable)} scans could not be encoded")
        used[site.config.site_id] = usable
        features.append(pooled_features(cache, usable))
    return np.concatenate(features).astype(np.float64), used


def probe(features: np.ndarray, table: ProbeTable, label: str, args: argparse.Namespace) -> dict[str, Any]:
    report = run_probes(features, table, folds=args.folds, inner_folds=args.inner_folds, seed=args.seed, encoder=label)
    chance = {k: v for r in report.results for k, v in r.chance.items()}
    spread = {k: v for r in report.results for k, v in (r.fold_std or {}).items()}  # across the CV folds
    return {"features": int(features.shape[1]), "metrics": report.metrics(), "fold_std": spread, "chance": chance,
            "skipped": [f"{s.task}: {s.reason}" for s in report.skipped]}


# --- reconstruction -------------------------------------------------------------------------------------------


@torch.no_grad()
def reconstruction_scores(reconstruct: Callable[[torch.Tensor, list[ScanRecord], SiteData], torch.Tensor],
                          data: Sequence[SiteData], test: dict[str, list[ScanRecord]], device: torch.device,
                          batch_size: int = 2) -> dict[str, float]:
    """Scan-weighted means of `metrics.reconstruction_metrics` (brain = non-zero target voxels)."""
    totals: dict[str, float] = {}
    count = 0
    for site in data:
        records = test[site.config.site_id]
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            target = load_volumes(site, chunk)  # [B, 1, D, H, W]
            with autocast(device):
                recon = reconstruct(target.to(device), chunk, site).float().cpu()
            for key, value in metrics.reconstruction_metrics(recon, target, mask=target != 0).items():
                totals[key] = totals.get(key, 0.0) + value * len(chunk)
            count += len(chunk)
    return {**{k: v / count for k, v in totals.items()}, "scans": count}


# --- FLOPs per training volume --------------------------------------------------------------------------------


def training_flops_per_volume(ours: Ours, autoencoder: AutoencoderKL, preset: Preset) -> dict[str, float]:
    """Forward + backward FLOPs of one training volume (copies of the models, on the CPU)."""
    volume = torch.randn(1, 1, *preset.shape)
    tokens = torch.randn(1, preset.num_tokens, preset.mae.width)
    mae, decoder, vae = (copy.deepcopy(m).cpu().train() for m in (ours.mae, ours.decoder, autoencoder))
    return {
        "mae": count_flops(lambda: mae(volume).loss.backward()),
        "decoder": count_flops(lambda: decoder.loss(tokens, volume).loss.backward()),
        "encoder_forward_once_per_scan": count_flops(lambda: mae.encoder(volume)),
        "autoencoder_kl": count_flops(lambda: autoencoder_loss(vae, volume, 1e-6)[0].backward()),
    }


# --- main ------------------------------------------------------------------------------------------------------


def compare(rows: dict[str, dict[str, Any]], ours: str, theirs: str) -> dict[str, str]:
    out = {}
    for metric, higher in HEADLINE_PROBES:
        a, b = rows[ours]["metrics"].get(metric), rows[theirs]["metrics"].get(metric)
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
            out[metric] = "not probed"
        else:
            out[metric] = "tie" if a == b else (ours if (a > b) == higher else theirs)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--data", default=None, help="cohort folder: reused when it holds sites/*.yaml, else made there")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--subjects", type=int, default=8, help="subjects per site of a generated cohort")
    parser.add_argument("--voxel-mm", type=float, default=2.0)
    parser.add_argument("--out", default=None, help="run folder for our MAE and decoder (default: temporary)")
    parser.add_argument("--run", default=None, help="existing run folder with checkpoints/{mae,decoder}: skip training")
    parser.add_argument("--budget-seconds", type=float, default=None,
                        help="the baseline's CPU-second budget (default: what our two stages used in this run)")
    parser.add_argument("--mae-steps", type=int, default=50)
    parser.add_argument("--mae-batch", type=int, default=4)
    parser.add_argument("--mae-lr", type=float, default=3e-4, help="peak rate (the demo's)")
    parser.add_argument("--decoder-steps", type=int, default=30)
    parser.add_argument("--decoder-batch", type=int, default=2)
    parser.add_argument("--decoder-lr", type=float, default=1e-3, help="peak rate (the demo's)")
    parser.add_argument("--warmup-steps", type=int, default=5, help="MAE and baseline warm-up steps")
    parser.add_argument("--akl-channels", default="8,16,32,128", help="AutoencoderKL channels per level")
    parser.add_argument("--akl-latent", type=int, default=None, help="latent channels (default: the decoder's projection width)")
    parser.add_argument("--akl-batch", type=int, default=2)
    parser.add_argument("--akl-lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--folds", type=int, default=5, help="outer subject-grouped folds of the probes")
    parser.add_argument("--inner-folds", type=int, default=3, help="inner folds choosing the probe regularisation")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    preset = get_preset(args.preset)
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    load_before = load_average()
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="bench-tokenizer-") as scratch:
        folder = Path(args.data) if args.data else Path(scratch) / "cohort"
        (site_yamls, generated), cohort_phase = Phase.run(
            lambda: cohort_sites(folder, args.sites, args.subjects, args.seed, args.voxel_mm))
        print(f"cohort: {len(site_yamls)} sites ({'generated' if generated else 'reused'}); preprocessing …",
              file=sys.stderr, flush=True)
        data, prepare_phase = Phase.run(
            lambda: [load_site(SiteConfig.from_yaml(p), preset, progress=False) for p in site_yamls])
        inputs = [SiteInputs(d) for d in data]

        if args.run:
            ours = load_ours(Path(args.run), preset, args.budget_seconds)
        else:
            ours = train_ours(site_yamls, preset, Path(args.out) if args.out else Path(scratch) / "run", args)
            if args.budget_seconds is not None:
                ours.budget_seconds, ours.budget_source = args.budget_seconds, "--budget-seconds"
        ours.mae.to(device).eval()
        ours.decoder.to(device).eval()

        latent = args.akl_latent or ours.decoder.config.latent_channels
        torch.manual_seed(args.seed)
        autoencoder = build_autoencoder(preset, [int(c) for c in args.akl_channels.split(",")], latent).to(device)
        print(f"training AutoencoderKL for {ours.budget_seconds:.0f} CPU seconds …", file=sys.stderr, flush=True)
        baseline_training = train_autoencoder(autoencoder, inputs, ours.budget_seconds, device, args)
        flops = training_flops_per_volume(ours, autoencoder, preset)
        autoencoder.eval()

        print("probes …", file=sys.stderr, flush=True)
        mae_features, records = encoder_features(ours.mae.encoder, data, preset, device)
        seed_everything(args.seed)  # the weights `braing3n train mae --seed S` starts from
        random_mae = MaskedAutoencoder(ours.mae.config).encoder.eval().requires_grad_(False).to(device)
        random_features, _ = encoder_features(random_mae, data, preset, device, records)
        vae_latent, vae_features = zip(*(autoencoder_features(autoencoder, d, records[d.config.site_id], device)
                                         for d in data))
        projection = ours.decoder.proj
        projected = (mae_features @ projection.weight.detach().cpu().double().T.numpy()
                     + projection.bias.detach().cpu().double().numpy())  # the mean commutes with the linear map
        table = ProbeTable(tuple(s for d in data for s in probe_table(records[d.config.site_id]).samples))
        probe_rows = {
            "mae": probe(mae_features, table, "MAE pooled tokens", args),
            "mae_decoder_projection": probe(projected, table, "MAE pooled tokens through the decoder's projection", args),
            "mae_random_init": probe(random_features, table, "random-init MAE pooled tokens", args),
            "autoencoder_kl_latent": probe(np.concatenate(vae_latent).astype(np.float64), table,
                                           "AutoencoderKL pooled z_mu", args),
            "autoencoder_kl_features": probe(np.concatenate(vae_features).astype(np.float64), table,
                                             "AutoencoderKL pooled encoder features", args),
        }

        print("reconstructions …", file=sys.stderr, flush=True)
        encoded = {r.path for site_records in records.values() for r in site_records}
        test = {d.config.site_id: [r for r in d.splits["test"] if r.path in encoded] for d in data}
        caches = {d.config.site_id: TokenCache(d.config.resolved_cache_dir, ours.mae.encoder, preset, d.cache, device)
                  for d in data}
        recon = {
            "ours": reconstruction_scores(
                lambda volume, chunk, site: ours.decoder(torch.stack([caches[site.config.site_id].tokens(r)
                                                                      for r in chunk]).to(device)),
                data, test, device),
            "autoencoder_kl": reconstruction_scores(lambda volume, chunk, site: autoencoder.reconstruct(volume),
                                                    data, test, device),
        }

    probe_verdict = compare(probe_rows, "mae", "autoencoder_kl_latent")
    feature_verdict = compare(probe_rows, "mae", "autoencoder_kl_features")
    recon_verdict = {k: ("ours" if recon["ours"][k] > recon["autoencoder_kl"][k] else "autoencoder_kl")
                     for k in ("val/psnr", "val/ssim", "val/psnr_brain", "val/ssim_brain")}
    sizes = {"mae_encoder": parameters(ours.mae.encoder), "mae_pretrain_decoder": parameters(ours.mae.pretrain_decoder),
             "cnn_decoder": parameters(ours.decoder), "autoencoder_kl": parameters(autoencoder),
             "autoencoder_kl_encoder": parameters(autoencoder.encoder) + parameters(autoencoder.quant_conv_mu)
             + parameters(autoencoder.quant_conv_log_sigma),
             "autoencoder_kl_decoder": parameters(autoencoder.decoder) + parameters(autoencoder.post_quant_conv)}
    flop_ratio = flops["autoencoder_kl"] / (flops["mae"] + flops["decoder"])
    sizes["ours_total"] = sizes["mae_encoder"] + sizes["mae_pretrain_decoder"] + sizes["cnn_decoder"]
    document = {
        "benchmark": "tokenizer_baseline",
        "preset": preset.name,
        "cohort": {"folder": str(folder) if args.data else "temporary", "generated": generated,
                   "sites": len(site_yamls), "scans": len(table), "subjects": len(set(table.subjects)),
                   "test_scans": recon["ours"]["scans"], "train_scans": baseline_training["train_examples"],
                   "generate": cohort_phase.to_dict(), "preprocess": prepare_phase.to_dict()},
        "parameters": sizes,
        "budget": {"kind": "cpu_seconds", "seconds": ours.budget_seconds, "source": ours.budget_source,
                   "why": f"equal compute time: the conv VAE costs {flop_ratio:.0f}x the FLOPs per training volume of "
                          f"MAE + decoder, so equal steps would give it {flop_ratio:.0f}x the compute; CPU time, not "
                          f"wall time, because the 2 cores are shared with other jobs"},
        "ours": {"checkpoints": ours.checkpoints, "phases": ours.phases, "run": args.run,
                 "mae_steps": None if args.run else args.mae_steps, "decoder_steps": None if args.run else args.decoder_steps},
        "autoencoder_kl": {"channels": [int(c) for c in args.akl_channels.split(",")], "latent_channels": latent,
                           "num_res_blocks": 1, "attention": False, "training": baseline_training},
        "training_flops_per_volume": flops,
        "probes": probe_rows,
        "probe_winner_vs_latent": probe_verdict,
        "probe_winner_vs_encoder_features": feature_verdict,
        "reconstruction": recon,
        "reconstruction_winner": recon_verdict,
        "settings": vars(args),
        "seconds": time.perf_counter() - started,
        "machine": machine_info(load_before, device),
    }
    atomic_write_json(RESULTS, document)

    def row(name: str) -> str:
        m = probe_rows[name]["metrics"]
        return "/".join(f"{m.get(k, math.nan):.2f}" for k in ("probe/age_r2", "probe/sex_auroc", "probe/diagnosis_bacc",
                                                               "probe/modality_bacc"))

    akl_wins = [k for k, v in probe_verdict.items() if v != "mae" and v != "not probed"]
    akl_wins += [k for k, v in recon_verdict.items() if v == "autoencoder_kl"]
    print(f"tokenizer baseline [{preset.name}] ({os.cpu_count()} CPUs, load {load_before[0]:.1f}->{load_average()[0]:.1f}; "
          f"{len(table)} scans/{len(set(table.subjects))} subjects): equal budget {ours.budget_seconds:.0f} CPU-s "
          f"(AKL {baseline_training['steps']} steps of {args.akl_batch}); params ours {sizes['ours_total'] / 1e6:.2f}M vs "
          f"AKL {sizes['autoencoder_kl'] / 1e6:.2f}M; probes age R2/sex AUROC/dx bAcc/modality bAcc: "
          f"MAE {row('mae')}, random MAE {row('mae_random_init')}, AKL z {row('autoencoder_kl_latent')}, "
          f"AKL feat {row('autoencoder_kl_features')}; held-out PSNR/SSIM ours {recon['ours']['val/psnr']:.1f}/"
          f"{recon['ours']['val/ssim']:.3f} vs AKL {recon['autoencoder_kl']['val/psnr']:.1f}/"
          f"{recon['autoencoder_kl']['val/ssim']:.3f}; AutoencoderKL wins: {', '.join(akl_wins) or 'nothing'}; "
          f"{document['seconds']:.0f} s -> {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
