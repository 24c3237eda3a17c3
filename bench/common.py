"""Shared by the benchmarks: the machine a result was measured on, FLOP counting, the synthetic cohort.

Every benchmark records the same `machine` block (cpu count, load average before and after, torch
version, device), because the sandbox is shared and absolute times only mean something next to the
load that other jobs put on it; ratios measured within one run are what the results quote.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode


def load_average() -> list[float]:
    """1-, 5- and 15-minute load averages, rounded for the JSON."""
    return [round(v, 2) for v in os.getloadavg()]


def machine_info(load_before: list[float], device: torch.device | None = None) -> dict[str, Any]:
    """The `machine` block of a result: call once at the end, with the load average taken at the start."""
    device = device or torch.device("cpu")
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_attention(query_shape, key_shape, value_shape, *_args, out_shape=None, **_kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *_args, out_shape=None,
                            **_kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's counter knows the CUDA attention kernels but not the CPU one `F.scaled_dot_product_attention`
# dispatches to; without these two entries attention (40 % of an MAE step at `small`) would count as 0.
_CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matrix multiplies, convolutions and attention that `fn` runs, forward and backward
    (`torch.utils.flop_counter`, plus the CPU attention kernel; element-wise ops, normalisation and the
    optimizer update are not counted)."""
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
        fn()
    return int(counter.get_total_flops())


def cohort_sites(folder: Path, sites: int, subjects: int, seed: int, voxel_mm: float) -> tuple[list[Path], bool]:
    """Site YAMLs of the synthetic cohort in `folder`: reused when `folder/sites/*.yaml` exist (whatever
    their size), else generated there with `braing3n_core.data.cohort`. Returns (paths, generated)."""
    from braing3n_core.data.cohort import CohortSpec, make_cohort

    existing = sorted((folder / "sites").glob("*.yaml"))
    if existing:
        return existing, False
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder}: neither a cohort (no sites/*.yaml) nor empty; give an empty or new folder")
    spec = CohortSpec(n_sites=sites, subjects_per_site=subjects, seed=seed, voxel_mm=voxel_mm, progress=False)
    return make_cohort(spec, out_dir=folder), True
