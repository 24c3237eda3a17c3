"""GPU check: every stage's training steps on CUDA in bf16, data-parallel over all visible GPUs, and sampling,
for the `small` and `paper` presets; volumes/s, the fraction of the GPU's bf16 matmul peak measured in the
same run, and peak GPU memory per stage. Run it as `bash bench/gpu_check.sh` (it finds Python and the
packages; ≤ 8 min on one GPU).

What runs (per preset):
1. **Stage steps** (mae, decoder, dit): the one `train_steps` every trainer runs, bf16 autocast, fused
   attention (`scaled_dot_product_attention`), AdamW, on random inputs of the preset's shapes (a step's cost
   does not depend on the values), through the data-parallel loader (`share_loader`) with pinned memory.
   `--warmup` untimed steps, then `--steps` timed ones (each ends with a host sync: the loss is read).
   FLOPs of one step (forward + backward matmuls, convolutions, attention; `bench.common.count_flops`) over
   the median step time give the achieved FLOP/s, reported as a fraction of the bf16 matmul peak measured
   first (a loop of 8192² products). Peak memory: `torch.cuda.max_memory_allocated` over the timed steps.
   With activation checkpointing too (`compute.activation_checkpointing`): the memory it saves, the time
   it costs. The decoder runs channels-last (`compute.channels_last`, the default on every device).
2. **Data-parallel**: the MAE's steps on one worker per visible GPU (NCCL), started the way a site starts
   them (`training.process_group`), global batch = per-GPU batch × GPUs; volumes/s of the group and the
   start-up cost of the group. With one GPU this still runs the launcher and NCCL, but no all-reduce.
3. **Sampling**: DiT sampling (default solver and steps, classifier-free guidance) plus decoding to volumes,
   bf16: volumes/s.
4. **torch.compile** (`small` only, `--no-compile` skips): the DiT's steps with each block compiled, against
   eager; reports the compile time, or the error where it does not work.

Without CUDA the same script runs on the CPU with the `tiny` preset (fp32, 2 gloo workers for the data-
parallel part, no compile) so that it stays runnable; what needs CUDA is reported as skipped.

Prints one summary line; writes bench/results/gpu_check.json (gpu_check-cpu.json on a CPU).

    python bench/gpu_check.py [--presets small,paper] [--warmup 3] [--steps 8] [--short] [--no-compile]
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import count_flops, load_average, machine_info  # noqa: E402
from braing3n_core.fileio import atomic_write_json  # noqa: E402
from braing3n_core.models.conditions import CONDITION_SCHEMA, ContinuousVariable  # noqa: E402
from braing3n_core.models.diffusion import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, sample  # noqa: E402
from braing3n_core.presets import Preset, get_preset  # noqa: E402
from braing3n_core.runtime import inference_autocast, infinite  # noqa: E402
from braing3n_core.site_config import ComputeConfig  # noqa: E402
from braing3n_core.training.compute import prepare_network  # noqa: E402
from braing3n_core.training.data_parallel import ParallelGroup, share_loader, shuffled_batches  # noqa: E402
from braing3n_core.training.loop import make_optimizer, train_steps  # noqa: E402
from braing3n_core.training.process_group import WorkerPlan, run_data_parallel  # noqa: E402
from braing3n_core.training.stages import get_stage  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("mae", "decoder", "dit")
# Per-GPU batch of each stage, sized for an 80 GB card (estimated, not yet measured: the decoder's full-
# resolution maps and the paper DiT's 28 blocks of 1,200 tokens are the largest activations).
BATCH = {"paper": {"mae": 8, "decoder": 4, "dit": 16}, "small": {"mae": 16, "decoder": 16, "dit": 32},
         "tiny": {"mae": 4, "decoder": 4, "dit": 8}}
SAMPLES = {"paper": 8, "small": 16, "tiny": 2}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- inputs --------------------------------------------------------------------------------------------------


class RandomExamples(Dataset):
    """`size` random examples of a stage at a preset, made once (cheap to read: the check times the GPU, not
    the disk or the augmentation)."""

    def __init__(self, stage: str, preset: Preset, size: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        volume = (1, *preset.shape)
        tokens = (preset.num_tokens, preset.mae.width)
        pool = min(size, 4)
        self.size = size
        self.items: list[dict[str, torch.Tensor]] = []
        for index in range(pool):
            item: dict[str, torch.Tensor] = {}
            if stage in ("mae", "decoder"):
                item["volume"] = torch.randn(volume, generator=generator)
            if stage in ("decoder", "dit"):
                item["tokens"] = torch.randn(tokens, generator=generator)
            if stage == "dit":
                longitudinal = index % 2 == 1
                item["baseline"] = torch.randn(tokens, generator=generator) if longitudinal else torch.full(tokens, math.nan)
                item["interval"] = torch.tensor(1.5 if longitudinal else math.nan)
                for variable in CONDITION_SCHEMA:
                    item[variable.name] = (torch.tensor(70.0) if isinstance(variable, ContinuousVariable)
                                           else torch.tensor(0, dtype=torch.long))
            self.items.append(item)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index % len(self.items)]


def build(stage: str, preset: Preset, device: torch.device, compute: ComputeConfig) -> nn.Module:
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: the paper DiT has 0.7 G parameters
        model = get_stage(stage).build(preset)
    return prepare_network(model, compute, device)


# --- measurements --------------------------------------------------------------------------------------------


def matmul_peak(device: torch.device, seconds: float) -> dict[str, Any]:
    """bf16 (CUDA) or fp32 (CPU) FLOP/s of a loop of large square products: the ceiling steps are compared with."""
    size, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    synchronize(device)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(10 if device.type == "cuda" else 1):
            torch.mm(a, b)
            count += 1
        synchronize(device)
    elapsed = time.perf_counter() - started
    return {"dtype": str(dtype).removeprefix("torch."), "size": size, "products": count,
            "flop_per_s": 2.0 * size**3 * count / elapsed}


def stage_steps(stage_name: str, preset: Preset, device: torch.device, compute: ComputeConfig,
                args: argparse.Namespace, peak: float, group: ParallelGroup | None = None,
                batch: int | None = None) -> dict[str, Any]:
    """Timed training steps of one stage (see the module doc); on a worker of `group` when given."""
    group = group or ParallelGroup.single()
    stage = get_stage(stage_name)
    batch = batch or BATCH[preset.name][stage_name]
    model = build(stage_name, preset, device, compute)
    optimizer = make_optimizer(model, stage.defaults.lr, stage.defaults.weight_decay)
    examples = RandomExamples(stage_name, preset, size=batch * group.world * 64)
    loader = share_loader(examples, shuffled_batches(len(examples), batch * group.world, 0), 0, group,
                          pin_memory=device.type == "cuda")
    batches = infinite(loader)
    generator = torch.Generator(device=device).manual_seed(0)

    def run(steps: int, on_step: Callable[..., None] | None = None) -> None:
        train_steps(stage, model, batches, optimizer, steps, lambda _: stage.defaults.lr, device, generator=generator,
                    on_step=on_step, group=group)

    run(args.warmup)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stamps = [time.perf_counter()]
    run(args.steps, on_step=lambda *_: stamps.append(time.perf_counter()))  # the loss read syncs each step
    step_s = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
    result: dict[str, Any] = {"batch_per_worker": batch, "workers": group.world, "steps": args.steps,
                              "median_step_s": step_s, "volumes_per_s": batch * group.world / step_s}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if group.is_single:  # FLOPs of this process's step (the all-reduce does none)
        flops = count_flops(lambda: run(1))
        result |= {"flop_per_step": flops, "flop_per_s": flops / step_s, "fraction_of_peak": flops / step_s / peak}
    return result


def fitting_steps(stage_name: str, preset: Preset, device: torch.device, compute: ComputeConfig,
                  args: argparse.Namespace, peak: float) -> dict[str, Any]:
    """`stage_steps` at the stage's batch, halved until it fits the GPU's memory (the result says so)."""
    batch = BATCH[preset.name][stage_name]
    while True:
        try:
            result = stage_steps(stage_name, preset, device, compute, args, peak, batch=batch)
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
            torch.cuda.empty_cache()
            batch //= 2
            continue
        if batch != BATCH[preset.name][stage_name]:
            result["note"] = f"batch {BATCH[preset.name][stage_name]} did not fit; measured at {batch}"
        return result


def _parallel_steps(preset_name: str, args: argparse.Namespace, group: ParallelGroup,
                    device: torch.device) -> dict[str, Any]:
    """One data-parallel worker's MAE steps (a module-level function: it travels to the workers)."""
    return stage_steps("mae", get_preset(preset_name), device, ComputeConfig(), args, peak=math.nan, group=group)


def data_parallel(preset: Preset, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    workers = torch.cuda.device_count() if device.type == "cuda" else 2
    plan = WorkerPlan(workers, device.type, threads=max(1, torch.get_num_threads() // workers), timeout_s=600)
    run = run_data_parallel(functools.partial(_parallel_steps, preset.name, args), plan)
    note = "one GPU: launcher and NCCL group, no all-reduce" if device.type == "cuda" and workers == 1 else ""
    return {**run.value, "group_startup_s": run.startup_s, "group_seconds": run.seconds, "backend": plan.backend,
            **({"note": note} if note else {})}


def sampling(preset: Preset, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """DiT sampling + decoding of `SAMPLES` volumes at once (random weights: a call costs the same)."""
    count = SAMPLES[preset.name]
    dit = build("dit", preset, device, ComputeConfig()).eval()
    decoder = build("decoder", preset, device, ComputeConfig(channels_last=True)).eval()
    conditions = RandomExamples("dit", preset, 1).items[0]
    cond = get_condition_batch(conditions, count, device)
    shape = (count, preset.num_tokens, preset.mae.width)

    def once() -> None:
        with torch.no_grad(), inference_autocast(device):
            tokens = sample(dit, shape, cond, steps=DEFAULT_STEPS, guidance_scale=DEFAULT_GUIDANCE_SCALE,
                            generator=torch.Generator(device=device).manual_seed(0))
            decoder(tokens)
        synchronize(device)

    once()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    repeats = 1 if args.short else 3
    for _ in range(repeats):
        once()
    seconds = (time.perf_counter() - started) / repeats
    result = {"volumes": count, "ode_steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE_SCALE,
              "seconds": seconds, "volumes_per_s": count / seconds}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def get_condition_batch(item: dict[str, torch.Tensor], count: int, device: torch.device):
    from braing3n_core.models.conditions import ConditionBatch

    return ConditionBatch(**{v.name: item[v.name].repeat(count).to(device) for v in CONDITION_SCHEMA})


def compiled_dit(preset: Preset, device: torch.device, args: argparse.Namespace, peak: float) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        compiled = stage_steps("dit", preset, device, ComputeConfig(compile=True), args, peak)
    except Exception as error:  # noqa: BLE001 - "where it works": report why it does not
        return {"works": False, "error": f"{type(error).__name__}: {error}".splitlines()[0][:300]}
    return {"works": True, **compiled, "seconds_with_compilation": time.perf_counter() - started}


# --- the run ---------------------------------------------------------------------------------------------------


def guarded(name: str, call: Callable[[], dict[str, Any]], results: dict[str, Any], deadline: float) -> None:
    """One measurement: its result, its error, or why it was skipped; the check goes on either way."""
    if time.monotonic() > deadline:
        results[name] = {"skipped": "time budget spent"}
        return
    print(f"  {name} …", file=sys.stderr, flush=True)
    try:
        results[name] = call()
    except Exception as error:  # noqa: BLE001 - a failing part is a finding, not the end of the check
        results[name] = {"error": f"{type(error).__name__}: {error}".splitlines()[0][:400],
                         "traceback": traceback.format_exc()[-2000:]}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=None, help="comma-separated (default: small,paper on CUDA, tiny on CPU)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per measurement")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    parser.add_argument("--short", action="store_true", help="1 warm-up and 2 timed steps (a smoke run)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement")
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip what is left after this many seconds")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default under bench/results/)")
    args = parser.parse_args()
    if args.short:
        args.warmup, args.steps = 1, 2
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    presets = (args.presets or ("small,paper" if cuda else "tiny")).split(",")
    load_before, started = load_average(), time.perf_counter()
    deadline = time.monotonic() + args.budget_s
    print(f"gpu check on {torch.cuda.get_device_name(device) if cuda else 'CPU (no CUDA)'}: {presets}", file=sys.stderr)
    peak = matmul_peak(device, seconds=1.0 if args.short else 3.0)
    document: dict[str, Any] = {"device": str(device), "cuda": cuda, "matmul_peak": peak, "presets": {},
                                "skipped": [] if cuda else ["bf16 autocast, NCCL, channels-last, torch.compile, GPU memory: "
                                                            "no CUDA on this machine"]}
    for name in presets:
        preset = get_preset(name)
        print(f"[{name}]", file=sys.stderr)
        results: dict[str, Any] = {}
        for stage in STAGES:
            guarded(f"{stage}", lambda stage=stage: fitting_steps(stage, preset, device, ComputeConfig(), args,
                                                                  peak["flop_per_s"]), results, deadline)
            guarded(f"{stage}_checkpointed", lambda stage=stage: fitting_steps(
                stage, preset, device, ComputeConfig(activation_checkpointing=True), args, peak["flop_per_s"]),
                results, deadline)
        guarded("data_parallel", lambda: data_parallel(preset, device, args), results, deadline)
        guarded("sampling", lambda: sampling(preset, device, args), results, deadline)
        if cuda and name == "small" and not args.no_compile:
            guarded("dit_compiled", lambda: compiled_dit(preset, device, args, peak["flop_per_s"]), results, deadline)
        document["presets"][name] = results
    document |= {"seconds": time.perf_counter() - started, "machine": machine_info(load_before, device),
                 "settings": {"warmup": args.warmup, "steps": args.steps, "batch": {p: BATCH[p] for p in presets}}}
    out = args.out or RESULTS / ("gpu_check.json" if cuda else "gpu_check-cpu.json")
    atomic_write_json(out, document)
    errors = [f"{p}/{k}" for p, r in document["presets"].items() for k, v in r.items() if "error" in v]
    print(summary(document, presets) + (f"; ERRORS in {', '.join(errors)}" if errors else "") + f" -> {out}")
    return 1 if errors else 0


def summary(document: dict[str, Any], presets: list[str]) -> str:
    parts = []
    for name in presets:
        results = document["presets"][name]
        cells = []
        for stage in STAGES:
            r = results.get(stage, {})
            if "volumes_per_s" in r:
                memory = f" {r['peak_memory_gib']:.1f}GiB" if "peak_memory_gib" in r else ""
                cells.append(f"{stage} {r['volumes_per_s']:.1f} vol/s {100 * r.get('fraction_of_peak', math.nan):.0f}%{memory}")
        ddp = results.get("data_parallel", {})
        if "volumes_per_s" in ddp:
            cells.append(f"ddp×{ddp['workers']} {ddp['volumes_per_s']:.1f} vol/s")
        sampled = results.get("sampling", {})
        if "volumes_per_s" in sampled:
            cells.append(f"sampling {sampled['volumes_per_s']:.2f} vol/s")
        parts.append(f"{name}: " + ", ".join(cells))
    where = document["machine"].get("gpu", "CPU")
    peak = document["matmul_peak"]["flop_per_s"]
    peak_text = f"{peak / 1e12:.0f} TFLOP/s" if peak >= 1e12 else f"{peak / 1e9:.0f} GFLOP/s"
    return (f"gpu check ({where}, {document['matmul_peak']['dtype']} matmul peak {peak_text}, {document['seconds']:.0f} s): "
            + "; ".join(parts))


if __name__ == "__main__":
    sys.exit(main())
