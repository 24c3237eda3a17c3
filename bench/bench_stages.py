"""Stage throughput: training volumes/s, FLOP utilisation, the embedding cache's gain, sampling and decoding.

For each preset (default `small`, the demo's; `--presets small,tiny` adds the test preset), on a small
synthetic cohort (made with `braing3n_core.data.cohort`, or the one in `--data`):

1. **Training throughput per stage** (mae, decoder, dit): the stage's real training examples (the
   `stages.stage_dataset` of every site's train split, token cache included) go through the one
   `stages.train_steps` that centralized and federated training call, with the stage's default batch
   size, AdamW and learning rate. `--warmup` steps are run and dropped; the next `--steps` are timed
   per step (data loading included). An example is a volume for mae and decoder, and one scan's token
   set (an embedded volume) for the DiT.
2. **FLOP utilisation**: the FLOPs of one training step (forward + backward matrix multiplies,
   convolutions and attention, counted by `torch.utils.flop_counter.FlopCounterMode`) over the median
   step time, as a fraction of a matrix-multiply peak measured in this run: a large fp32 `torch.mm`
   loop on the same device and threads (on CUDA, where training runs in bf16 autocast, the bf16 peak
   is measured too and is the one the fraction uses).
3. **Embedding cache** (decoder and DiT): one epoch over the training examples with the cache (tokens
   read from `tokens.TokenCache`) against one without it (the same examples carry their volumes and
   every step first runs the frozen encoder on them, baseline scans of longitudinal DiT pairs
   included). Both modes run the same `train_steps`, alternating, after one untimed step each; the
   ratio is uncached / cached epoch time. Filling the cache once (one encoder pass) is timed too.
4. **Generation**: DiT sampling time per volume (Heun ODE, the default step count and guidance scale of
   `diffusion.sample`) and decoding time per volume (`CNNDecoder` on the sampled tokens), after an
   untimed warm-up. Weights are random: the cost of a network call does not depend on them.

Prints one summary line; writes bench/results/stages.json.

    python bench/bench_stages.py [--presets small[,tiny]] [--device cpu|cuda] [--data FOLDER]
                                 [--sites 2] [--subjects 6] [--warmup 2] [--steps 5] [--epochs 2]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cohort_sites, count_flops, load_average, machine_info
from braing3n_core.data.datasets import load_site
from braing3n_core.data.tokens import TokenCache
from braing3n_core.data.transforms import preprocess_scan
from braing3n_core.fileio import atomic_write_json
from braing3n_core.models import MAEEncoder
from braing3n_core.models.diffusion import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, sample
from braing3n_core.presets import Preset, get_preset
from braing3n_core.runtime import autocast, infinite, resolve_device, seed_everything
from braing3n_core.site_config import SiteConfig
from braing3n_core.stage_names import STAGE_NAMES
from braing3n_core.training.examples import (
    Batch,
    SiteInputs,
    TokenConditionDataset,
    TokenVolumeDataset,
    condition_batch,
    token_moments,
)
from braing3n_core.training.loop import make_loader, make_optimizer, train_steps
from braing3n_core.training.stages import Stage, get_stage, stage_dataset

RESULTS = Path(__file__).resolve().parent / "results" / "stages.json"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- peak ---------------------------------------------------------------------------------------------------


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 3.0) -> dict[str, float]:
    """FLOP/s of a loop of large square `torch.mm` on `device` with the current threads (after one
    untimed product): the practical ceiling the training steps are compared with."""
    size = 2048 if device.type == "cpu" else 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    synchronize(device)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.mm(a, b)
        count += 1
        if device.type == "cuda" and count % 20:
            continue  # queue several products between synchronisations
        synchronize(device)
    synchronize(device)
    elapsed = time.perf_counter() - started
    return {"size": size, "products": count, "seconds": elapsed, "flop_per_s": 2.0 * size**3 * count / elapsed}


# --- data ---------------------------------------------------------------------------------------------------


def random_init_encoder(preset: Preset, seed: int) -> MAEEncoder:
    """The encoder `braing3n train mae --seed S` starts from; its tokens cost what trained ones cost."""
    seed_everything(seed)
    return get_stage("mae").build(preset).encoder.eval().requires_grad_(False)


class VolumesInsteadOfTokens(Dataset):
    """The examples of a decoder or DiT dataset part, carrying volumes where the cached part carries
    tokens: what a training step reads when there is no embedding cache.

    decoder: `{"volume": [1, D, H, W]}` (the encoder input is also the target);
    DiT: `{"volume", "baseline_volume" (zeros when none), "has_baseline": [] bool, "interval", conditions}`.
    """

    def __init__(self, part: Dataset) -> None:
        if not isinstance(part, (TokenVolumeDataset, TokenConditionDataset)):
            raise TypeError(f"expected a decoder or DiT dataset, got {type(part).__name__}")
        self.part = part
        cache = part.tokens
        self.preset, self.volume_cache = cache.preset, cache.volume_cache

    def __len__(self) -> int:
        return len(self.part)

    def _volume(self, index: int) -> torch.Tensor:
        return torch.from_numpy(preprocess_scan(self.part.records[index].path, self.preset, self.volume_cache))

    def __getitem__(self, index: int) -> Batch:
        if isinstance(self.part, TokenVolumeDataset):
            return {"volume": self._volume(index)}
        target, baseline = self.part.examples[index]
        volume = self._volume(target)
        item = {"volume": volume}
        if baseline is None:
            item |= {"baseline_volume": torch.zeros_like(volume), "has_baseline": torch.tensor(False),
                     "interval": torch.tensor(math.nan)}
        else:
            records = self.part.records
            item |= {"baseline_volume": self._volume(baseline), "has_baseline": torch.tensor(True),
                     "interval": torch.tensor(records[target].labels.age - records[baseline].labels.age)}
        for name, values in self.part.conditions.tensors().items():
            item[name] = values[target]
        return item


def uncached(dataset: Dataset) -> Dataset:
    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    wrapped = [VolumesInsteadOfTokens(p) for p in parts]
    return ConcatDataset(wrapped) if len(wrapped) != 1 else wrapped[0]


def encoding_stage(stage: Stage, encoder: MAEEncoder) -> Stage:
    """`stage` whose loss first runs the frozen encoder on the batch's volumes (target and, for DiT
    pairs, baseline scans in one call), then computes the stage's own loss on the tokens."""

    def loss(model: nn.Module, batch: Batch, generator: torch.Generator | None):
        volume = batch["volume"]  # [B, 1, D, H, W]
        if "has_baseline" not in batch:  # decoder: the volume is both the encoder input and the target
            with torch.no_grad():
                tokens = encoder(volume)  # [B, N, E]
            return stage.loss(model, {"tokens": tokens, "volume": volume}, generator)
        with torch.no_grad():
            has = batch["has_baseline"]  # [B]
            tokens = encoder(torch.cat([volume, batch["baseline_volume"][has]]))  # [B + k, N, E]
            target = tokens[: len(volume)]
            baseline = torch.full_like(target, math.nan)
            baseline[has] = tokens[len(volume):]
        rest = {k: v for k, v in batch.items() if k not in ("volume", "baseline_volume", "has_baseline")}
        return stage.loss(model, {**rest, "tokens": target, "baseline": baseline}, generator)

    return replace(stage, loss=loss)


# --- measurements -------------------------------------------------------------------------------------------


def build_model(stage: Stage, preset: Preset, train_set: Dataset, device: torch.device, seed: int) -> nn.Module:
    seed_everything(seed)
    model = stage.build(preset)
    if stage.name == "dit":
        model.set_token_statistics(*token_moments(train_set, model.config.token_dim).mean_std())
    return model.to(device)


class TimedBatches:
    """An iterator of batches that records how long each `next` took (data loading inside a step)."""

    def __init__(self, batches: Iterator[Batch]) -> None:
        self.batches = batches
        self.seconds: list[float] = []

    def __iter__(self) -> TimedBatches:
        return self

    def __next__(self) -> Batch:
        started = time.perf_counter()
        batch = next(self.batches)
        self.seconds.append(time.perf_counter() - started)
        return batch


def timed_steps(stage: Stage, model: nn.Module, batches: Iterator[Batch], optimizer: torch.optim.Optimizer,
                steps: int, device: torch.device, seed: int) -> tuple[list[float], list[float]]:
    """Seconds of each of `steps` training steps (from one step's end to the next's, data loading
    included) and the data-loading seconds within each."""
    timed = TimedBatches(batches)
    synchronize(device)
    stamps = [time.perf_counter()]
    train_steps(stage, model, timed, optimizer, steps, lambda _: stage.defaults.lr, device,
                generator=torch.Generator().manual_seed(seed),
                on_step=lambda _i, _loss, _n: stamps.append(time.perf_counter()))  # float(loss) synchronises
    return np.diff(stamps).tolist(), timed.seconds


def stage_throughput(stage_name: str, preset: Preset, sites: list[SiteInputs], device: torch.device,
                     peak: float, args: argparse.Namespace) -> dict[str, Any]:
    stage = get_stage(stage_name)
    train_set = stage_dataset(stage, sites, "train")
    batch_size = stage.defaults.batch_size
    model = build_model(stage, preset, train_set, device, args.seed)
    optimizer = make_optimizer(model, stage.defaults.lr, stage.defaults.weight_decay)
    batches = infinite(make_loader(train_set, batch_size, True, args.seed))
    times, data_times = timed_steps(stage, model, batches, optimizer, args.warmup + args.steps, device, args.seed)
    times, data_times = times[args.warmup:], data_times[args.warmup:]
    flops = count_flops(lambda: train_steps(stage, model, batches, optimizer, 1, lambda _: stage.defaults.lr, device,
                                            generator=torch.Generator().manual_seed(args.seed)))
    median = statistics.median(times)
    return {
        "batch_size": batch_size, "train_examples": len(train_set), "steps_timed": len(times),
        "step_seconds_median": median, "step_seconds_mean": float(np.mean(times)),
        "data_seconds_median": statistics.median(data_times),
        "data_share_of_step_time": float(np.sum(data_times) / np.sum(times)),
        "examples_per_s": batch_size / median, "flops_per_step": flops, "flops_per_example": flops / batch_size,
        "achieved_flop_per_s": flops / median, "fraction_of_matmul_peak": flops / median / peak,
    }


def cache_gain(stage_name: str, preset: Preset, sites: list[SiteInputs], encoder: MAEEncoder, device: torch.device,
               args: argparse.Namespace) -> dict[str, Any]:
    """Epoch seconds with and without the embedding cache; modes alternate so load drift hits both."""
    stage = get_stage(stage_name)
    cached_set = stage_dataset(stage, sites, "train")
    modes = {"cached": (stage, cached_set), "uncached": (encoding_stage(stage, encoder), uncached(cached_set))}
    batch_size = stage.defaults.batch_size
    steps = math.ceil(len(cached_set) / batch_size)
    state: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    for mode, (mode_stage, dataset) in modes.items():  # one untimed step each: allocations, first-call costs
        model = build_model(stage, preset, cached_set, device, args.seed)
        optimizer = make_optimizer(model, stage.defaults.lr, stage.defaults.weight_decay)
        timed_steps(mode_stage, model, iter(make_loader(dataset, batch_size, True, args.seed)), optimizer, 1, device,
                    args.seed)
        state[mode] = (model, optimizer)
    epochs: dict[str, list[float]] = {mode: [] for mode in modes}
    for epoch in range(args.epochs):
        for mode, (mode_stage, dataset) in modes.items():
            model, optimizer = state[mode]
            loader = make_loader(dataset, batch_size, True, args.seed + epoch)  # same order in both modes
            step_seconds, _ = timed_steps(mode_stage, model, iter(loader), optimizer, steps, device, args.seed + epoch)
            epochs[mode].append(sum(step_seconds))
    cached, without = statistics.median(epochs["cached"]), statistics.median(epochs["uncached"])
    return {"batch_size": batch_size, "examples_per_epoch": len(cached_set), "steps_per_epoch": steps,
            "epochs_timed": args.epochs, "epoch_seconds_cached": cached, "epoch_seconds_uncached": without,
            "uncached_over_cached": without / cached}


@torch.no_grad()
def generation_cost(preset: Preset, sites: list[SiteInputs], device: torch.device, args: argparse.Namespace,
                    peak: float) -> dict[str, Any]:
    """Seconds per volume of `diffusion.sample` (defaults: Heun, DEFAULT_STEPS, guidance) and of decoding."""
    dit_stage, decoder_stage = get_stage("dit"), get_stage("decoder")
    train_set = stage_dataset(dit_stage, sites, "train")
    dit = build_model(dit_stage, preset, train_set, device, args.seed).eval()
    decoder = build_model(decoder_stage, preset, train_set, device, args.seed).eval()
    n = args.sample_volumes
    first = next(iter(make_loader(train_set, n, False, args.seed)))  # conditions of real training scans
    cond = condition_batch(first)
    shape = (n, preset.num_tokens, preset.mae.width)

    def run_sample(steps: int) -> torch.Tensor:
        with autocast(device):
            return sample(dit, shape, cond, steps=steps, generator=torch.Generator().manual_seed(args.seed))

    def run_decode(tokens: torch.Tensor) -> torch.Tensor:
        with autocast(device):
            return decoder(tokens.to(device)).float()

    tokens = run_sample(1)  # warm-up, untimed
    run_decode(tokens)
    synchronize(device)
    started = time.perf_counter()
    tokens = run_sample(DEFAULT_STEPS)
    synchronize(device)
    sample_seconds = time.perf_counter() - started
    started = time.perf_counter()
    run_decode(tokens)
    synchronize(device)
    decode_seconds = time.perf_counter() - started
    # Heun makes two network calls per step except the last (Euler to t = 0); one step = one call.
    evaluations = 2 * DEFAULT_STEPS - 1
    sample_flops = count_flops(lambda: run_sample(1)) * evaluations
    decode_flops = count_flops(lambda: run_decode(tokens))
    return {
        "volumes": n, "solver": "heun", "steps": DEFAULT_STEPS, "network_evaluations": evaluations,
        "guidance_scale": DEFAULT_GUIDANCE_SCALE,
        "sample_seconds_per_volume": sample_seconds / n, "decode_seconds_per_volume": decode_seconds / n,
        "sample_flops_per_volume": sample_flops / n, "decode_flops_per_volume": decode_flops / n,
        "sample_fraction_of_matmul_peak": sample_flops / sample_seconds / peak,
        "decode_fraction_of_matmul_peak": decode_flops / decode_seconds / peak,
    }


def bench_preset(name: str, site_yamls: list[Path], device: torch.device, peak: float, token_root: Path,
                 args: argparse.Namespace) -> dict[str, Any]:
    preset = get_preset(name)
    started = time.perf_counter()
    data = [load_site(SiteConfig.from_yaml(p), preset, progress=False) for p in site_yamls]
    prepare_seconds = time.perf_counter() - started
    encoder = random_init_encoder(preset, args.seed).to(device)
    # A fresh token cache per run, so filling it is measured rather than found done by an earlier run.
    sites = [SiteInputs(d, TokenCache(token_root / name / d.config.site_id, encoder, preset, d.cache, device))
             for d in data]
    train_scans = sum(len(d.splits["train"]) for d in data)
    synchronize(device)
    started = time.perf_counter()
    for site in sites:
        site.tokens.ensure(site.data.splits["train"], progress=False)
    synchronize(device)
    fill_seconds = time.perf_counter() - started
    result: dict[str, Any] = {
        "shape": list(preset.shape), "tokens": preset.num_tokens, "token_dim": preset.mae.width,
        "train_scans": train_scans, "preprocess_or_load_seconds": prepare_seconds,
        "cache_fill_seconds": fill_seconds, "cache_fill_seconds_per_scan": fill_seconds / max(train_scans, 1),
        "parameters": {s: sum(p.numel() for p in get_stage(s).build(preset).parameters()) for s in STAGE_NAMES},
    }
    result["throughput"] = {}
    for stage in STAGE_NAMES:
        print(f"[{name}] throughput {stage} …", file=sys.stderr, flush=True)
        result["throughput"][stage] = stage_throughput(stage, preset, sites, device, peak, args)
    result["embedding_cache"] = {}
    for stage in ("decoder", "dit"):
        print(f"[{name}] epoch with / without the embedding cache: {stage} …", file=sys.stderr, flush=True)
        result["embedding_cache"][stage] = cache_gain(stage, preset, sites, encoder, device, args)
    print(f"[{name}] sampling and decoding …", file=sys.stderr, flush=True)
    result["generation"] = generation_cost(preset, sites, device, args, peak)
    return result


def summary(name: str, r: dict[str, Any]) -> str:
    tp, cache, gen = r["throughput"], r["embedding_cache"], r["generation"]
    rates = " ".join(f"{s} {t['examples_per_s']:.2f}/s ({100 * t['fraction_of_matmul_peak']:.1f}% of peak, "
                     f"{100 * t['data_share_of_step_time']:.0f}% data)" for s, t in tp.items())
    gains = " ".join(f"{s} {c['uncached_over_cached']:.2f}x" for s, c in cache.items())
    return (f"{name}: train vol/s (of mm peak) {rates}; epoch without/with cache {gains}; "
            f"sample {gen['sample_seconds_per_volume']:.1f} s/vol (Heun {gen['steps']}, cfg {gen['guidance_scale']:g}), "
            f"decode {gen['decode_seconds_per_volume']:.2f} s/vol")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="small", help="comma-separated presets (default small; e.g. small,tiny)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (bf16 autocast on CUDA)")
    parser.add_argument("--data", default=None, help="cohort folder: reused when it holds sites/*.yaml, else made there "
                                                     "(default: a temporary folder)")
    parser.add_argument("--sites", type=int, default=2, help="sites of a generated cohort")
    parser.add_argument("--subjects", type=int, default=6, help="subjects per site of a generated cohort")
    parser.add_argument("--voxel-mm", type=float, default=2.0, help="simulation grid of a generated cohort")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps per stage")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per stage")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per mode in the cache comparison (alternating)")
    parser.add_argument("--sample-volumes", type=int, default=1, help="volumes sampled (one batch) for the timing")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if min(args.steps, args.epochs, args.sample_volumes) < 1 or args.warmup < 0:
        parser.error("--steps, --epochs and --sample-volumes must be ≥ 1 and --warmup ≥ 0")
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    for name in presets:
        get_preset(name)  # unknown names fail before any work
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    load_before = load_average()
    started = time.perf_counter()

    peaks = {"fp32": matmul_peak(device, torch.float32)}
    if device.type == "cuda":
        peaks["bf16"] = matmul_peak(device, torch.bfloat16)
    precision = "bf16" if device.type == "cuda" else "fp32"  # what the training steps run in (runtime.autocast)
    peak = peaks[precision]["flop_per_s"]

    with tempfile.TemporaryDirectory(prefix="bench-stages-") as scratch:
        folder = Path(args.data) if args.data else Path(scratch) / "cohort"
        cohort_started = time.perf_counter()
        site_yamls, generated = cohort_sites(folder, args.sites, args.subjects, args.seed, args.voxel_mm)
        cohort = {"folder": str(folder) if args.data else "temporary", "generated": generated, "sites": len(site_yamls),
                  "seconds": time.perf_counter() - cohort_started}
        if generated:
            cohort |= {"subjects_per_site": args.subjects, "voxel_mm": args.voxel_mm, "seed": args.seed}
        results = {name: bench_preset(name, site_yamls, device, peak, Path(scratch) / "tokens", args)
                   for name in presets}

    load_after = load_average()
    document = {
        "benchmark": "stages",
        "presets": results,
        "matmul_peak": peaks,
        "peak_precision": precision,
        "cohort": cohort,
        "settings": vars(args),
        "seconds": time.perf_counter() - started,
        "machine": machine_info(load_before, device),
    }
    atomic_write_json(RESULTS, document)
    print(f"stages bench ({os.cpu_count()} CPUs, {device}, load {load_before[0]:.1f}->{load_after[0]:.1f}, "
          f"{precision} mm peak {peak / 1e9:.0f} GFLOP/s): " + " | ".join(summary(n, r) for n, r in results.items())
          + f"; {document['seconds']:.0f} s -> {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
