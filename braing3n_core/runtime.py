"""Where and how tensors run: device from config, bf16 autocast on CUDA, thread count, seeds."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
from typing import Iterator

import numpy as np
import torch


def resolve_device(name: str = "cpu") -> torch.device:
    """`cpu`, `cuda`, `cuda:N` or `auto` (CUDA when present, else CPU). Asking for CUDA without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available on this machine; use 'cpu' or 'auto'")
    return device


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Training precision: bf16 autocast on CUDA (weights stay fp32); fp32 on CPU, where training was
    measured and tuned (sampling has its own choice: `inference_autocast`)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_supports_bf16() -> bool:
    """oneDNN runs bf16 matmuls natively (AVX512-BF16 or AMX) on this CPU."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def inference_bf16(device: torch.device) -> bool:
    """Sampling runs in bf16 autocast on CUDA, and on a CPU with native bf16 matmuls, where it measured
    1.2× faster with the same error against a 50-step fp32 reference (0.027 of the token spread either
    way; bench/bench_sampling.py)."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_supports_bf16())


def inference_autocast(device: torch.device, bf16: bool | None = None) -> contextlib.AbstractContextManager:
    """bf16 autocast where `inference_bf16` (bf16=None), or as asked (False: fp32, e.g. a reference solve)."""
    if not (inference_bf16(device) if bf16 is None else bf16):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def set_threads(num_threads: int | None) -> None:
    """Match torch's intra-op threads to the cores this process was given (a Ray actor gets 1 by default)."""
    if num_threads is None:
        env = os.environ.get("BRAING3N_NUM_THREADS")
        num_threads = int(env) if env else None
    if num_threads:
        torch.set_num_threads(max(1, num_threads))


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def cosine_lr(base_lr: float, step: int, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> float:
    """Linear warm-up then cosine decay to `min_ratio * base_lr`; `step` counts from 0."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return base_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def infinite(loader: torch.utils.data.DataLoader) -> Iterator:
    """Cycle a loader forever, reshuffling each pass (training is counted in steps, not epochs)."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise RuntimeError("the data loader is empty: no usable training scans")


def round_seed(seed: int, *parts: object) -> int:
    """A stable 63-bit seed per (run seed, stage, round, site): reproducible and different per site."""
    digest = hashlib.sha256("/".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def worker_placement() -> str:
    """Where this process runs, for the run's ledger: `host/pid`, plus `/ray:<node id>` inside a Ray worker
    (a simulation's site may run on any node of a cluster, and a different one each round)."""
    import socket
    import sys

    where = f"{socket.gethostname()}/{os.getpid()}"
    ray = sys.modules.get("ray")  # only a Ray worker has it loaded; never import Ray here
    if ray is not None and ray.is_initialized():
        where += f"/ray:{ray.get_runtime_context().get_node_id()}"
    return where
