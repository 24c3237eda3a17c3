"""Does a wider decoder, or a larger learning rate, buy reconstruction PSNR per second? (issue 15: the
demo's 24 dB target.)

The `small` decoder (108 k parameters) and wider ones train on the same frozen encoder's tokens (a trained
run's, default the demo's), pooled over its sites' training scans, from the same seed, each for the same
wall-clock seconds. A variant `name@lr` (e.g. `small@3e-3`) is that size at its own learning rate. They train in alternating blocks, so a change of machine load falls on every variant
alike, and each is scored on the sites' validation scans (PSNR inside the brain, SSIM) after every few
blocks: a curve of PSNR against training seconds per variant.

    python bench/bench_decoder_size.py --run runs/demo --seconds 300 [--variants small,2x,4x,small@3e-3]
                                       [--results bench/results/decoder_size.json]

Prints one summary line and writes the results JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine_info

from braing3n_core.generation.models import load_run_models
from braing3n_core.models.decoder import CNNDecoder, DecoderConfig
from braing3n_core.site_config import load_site_configs
from braing3n_core.stage_names import DECODER
from braing3n_core.training.centralized import prepare_sites
from braing3n_core.training.loop import evaluate, make_loader, make_optimizer, train_steps
from braing3n_core.training.stages import get_stage, stage_dataset

RESULTS = Path(__file__).resolve().parent / "results" / "decoder_size.json"
VARIANTS: dict[str, dict] = {  # overrides of the `small` preset's decoder
    "small": {},
    "2x": {"latent_channels": 32, "channels": (64, 32, 16)},
    "4x": {"latent_channels": 64, "channels": (128, 64, 32)},
}
STEPS_PER_CALL = 1  # a block ends within one step of its seconds


def _variant(name: str, default_lr: float) -> tuple[dict, float]:
    """`size` or `size@lr` -> (the size's decoder overrides, learning rate)."""
    size, _, lr = name.partition("@")
    if size not in VARIANTS:
        raise SystemExit(f"unknown decoder size {size!r} in variant {name!r}; known: {', '.join(VARIANTS)}")
    return VARIANTS[size], float(lr) if lr else default_lr


def _forever(loader) -> Iterator:
    while True:
        yield from loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="trained run (its encoder and cohort)")
    parser.add_argument("--sites", nargs="+", help="site YAMLs (default: <run>/cohort/sites/*.yaml)")
    parser.add_argument("--seconds", type=float, default=300.0, help="training seconds per variant")
    parser.add_argument("--block", type=float, default=20.0, help="seconds per alternating block")
    parser.add_argument("--evaluate-every", type=int, default=3, help="blocks between validations")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--lr", type=float, default=1e-3, help="the demo's decoder learning rate")
    parser.add_argument("--batch-size", type=int, default=2, help="the demo's decoder batch size")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    variants = {name: _variant(name, args.lr) for name in args.variants.split(",")}
    torch.manual_seed(0)
    load_before = load_average()
    device = torch.device("cpu")
    models = load_run_models(args.run, need_dit=False, need_encoder=True)
    site_files = args.sites or sorted(str(p) for p in (args.run / "cohort" / "sites").glob("*.yaml"))
    stage = get_stage(DECODER)
    sites = prepare_sites(load_site_configs(site_files), models.preset, stage, models.encoder, device)
    train = make_loader(stage_dataset(stage, sites, "train"), args.batch_size, shuffle=True, seed=0)
    val = make_loader(stage_dataset(stage, sites, "val", train=False), args.batch_size, shuffle=False, seed=0)

    runs = {}
    for name, (overrides, lr) in variants.items():
        torch.manual_seed(0)
        model = CNNDecoder(DecoderConfig.from_preset(models.preset, **overrides)).to(device)
        runs[name] = {"model": model, "optimizer": make_optimizer(model, lr, 0.0), "lr": lr, "batches": _forever(train),
                      "generator": torch.Generator().manual_seed(0), "seconds": 0.0, "steps": 0, "curve": [],
                      "parameters": sum(p.numel() for p in model.parameters())}
    blocks = round(args.seconds / args.block)
    for block in range(1, blocks + 1):
        for name, run in runs.items():
            deadline = time.perf_counter() + args.block
            while time.perf_counter() < deadline:
                result = train_steps(stage, run["model"], run["batches"], run["optimizer"], STEPS_PER_CALL,
                                     lambda _step, lr=run["lr"]: lr, device, generator=run["generator"])
                run["seconds"] += result.seconds
                run["steps"] += result.steps
            if block % args.evaluate_every == 0 or block == blocks:
                scores = evaluate(stage, run["model"], val, device)
                run["curve"].append({"seconds": round(run["seconds"], 1), "steps": run["steps"],
                                     "psnr": scores["val/psnr"], "ssim": scores["val/ssim"]})
                print(f"block {block}/{blocks} {name}: {run['steps']} steps {run['seconds']:.0f} s "
                      f"PSNR {scores['val/psnr']:.2f} SSIM {scores['val/ssim']:.3f}", file=sys.stderr, flush=True)

    base = runs["small"]["curve"][-1] if "small" in runs else None
    out = {
        "benchmark": "decoder_size",
        "run": str(args.run),
        "machine": machine_info(load_before, device),
        "settings": {"seconds_per_variant": args.seconds, "block_seconds": args.block, "lr": args.lr,
                     "batch_size": args.batch_size, "train_examples": len(train.dataset), "val_examples": len(val.dataset)},
        "variants": {name: {"overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in variants[name][0].items()},
                            "lr": run["lr"], "parameters": run["parameters"], "steps_per_second": run["steps"] / max(run["seconds"], 1e-9),
                            "curve": run["curve"], "final": run["curve"][-1]}
                     for name, run in runs.items()},
    }
    if base is not None:
        out["psnr_gain_db_vs_small"] = {name: run["curve"][-1]["psnr"] - base["psnr"] for name, run in runs.items()}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(out, indent=1) + "\n")
    summary = " ".join(f"{name}({run['parameters'] / 1e3:.0f}k) {run['curve'][-1]['psnr']:.2f} dB/{run['steps']} steps"
                       for name, run in runs.items())
    print(f"decoder_size: {args.seconds:.0f} s each, val PSNR {summary} -> {args.results}")


if __name__ == "__main__":
    main()
