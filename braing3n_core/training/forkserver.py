"""The start method of every process a training process starts: a forkserver with torch (and the caller's
modules) already imported.

Data-parallel workers (`training.process_group`) and data-loading processes (`compute.loader_workers`)
must never be forked from a Ray actor or a ClientApp process (their threads make fork unsafe) and must
not pay Python + torch + MONAI imports each time (seconds per process). A forkserver is a fresh interpreter
that imports those once per process that uses it; each new process is then forked from it in
milliseconds. `multiprocessing` starts one forkserver per process, on first use, with the preload list
set before that: so every user goes through `forkserver()`, whichever comes first.
"""

from __future__ import annotations

import multiprocessing
import sys
from multiprocessing.context import BaseContext

# torch._dynamo: the first optimizer a process builds imports it (~800 modules, seconds): paid once here.
BASE_PRELOAD = ("torch", "torch._dynamo", "torch.distributed", "braing3n_core.training.process_group")


def forkserver(*modules: str) -> BaseContext:
    """The forkserver context, its preload being torch, `modules` that this process has imported and, in a
    Ray actor, Ray: each started process re-runs its parent's main script (Ray's default_worker inside an
    actor), whose imports are then already loaded. The preload only counts before the forkserver starts."""
    context = multiprocessing.get_context("forkserver")
    extra = [m for m in (*modules, "ray") if m and m in sys.modules]
    context.set_forkserver_preload([*BASE_PRELOAD, *extra])
    return context
