"""SiteRuntime: everything a hospital node needs to answer one federated request, without Flower.

The node's site config is resolved from the node config (deployment: `--node-config
"site-config='/path/site.yaml'"`) or, in simulation, from the run config's comma-separated
`site-configs` list indexed by the virtual node's `partition-id`. Data, preprocessing cache, the frozen
encoder and its token cache all live on the site's disk under the site's cache folder, keyed by
content hashes. Answers never depend on process state: in deployment every message runs in a fresh
process, in simulation Ray actors are reused; both give the same answers (a process reuses a site's
checked data only while none of its files changed).

The frozen encoder is installed once per site (`install_encoder`): stored as a checkpoint named by its
weight hash under `<cache_dir>/encoders/`, verified against the hash the server announced, and later
requests name it by hash only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from braing3n_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, tensors_sha256
from braing3n_core.config import ConfigError
from braing3n_core.data.datasets import SiteData, load_site
from braing3n_core.data.tokens import TokenCache, encoder_sha256
from braing3n_core.federation.protocol import AppSettings, NodeSettings, SiteDeclined
from braing3n_core.models import MAEConfig, MAEEncoder
from braing3n_core.presets import get_preset
from braing3n_core.runtime import resolve_device, set_threads
from braing3n_core.site_config import SiteConfig
from braing3n_core.training.examples import SiteInputs
from braing3n_core.training.stages import Stage


def configure_threads() -> None:
    """Torch threads = the cores this process was given: BRAING3N_NUM_THREADS, else OMP_NUM_THREADS (Ray
    sets it to the actor's `num_cpus`); without either, torch's default."""
    value = os.environ.get("BRAING3N_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    set_threads(int(value) if value and value.isdigit() else None)


def resolve_site_config(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> SiteConfig:
    """The node's own `site-config` wins; otherwise `site-configs[partition-id]` (simulation)."""
    node, app = NodeSettings.from_config(node_config), AppSettings.from_config(run_config)
    if node.site_config:
        return SiteConfig.from_yaml(node.site_config)
    listed = app.site_config_paths()
    if node.partition_id < 0 or not listed:
        raise ConfigError(
            "this node has no site: start the SuperNode with --node-config \"site-config='/path/site.yaml'\" "
            "(deployment) or set the run config's site-configs list (simulation)"
        )
    index = node.partition_id
    if not 0 <= index < len(listed):
        raise ConfigError(f"partition-id {index} has no entry in site-configs ({len(listed)} files listed)")
    return SiteConfig.from_yaml(listed[index])


# A simulated site answers every message of a run from one reused Ray actor, and `load_site` (site checks
# plus a pass over the preprocessing cache) costs ~0.1 s of CPU per message for a 200-scan site, about a
# third of the federation's per-round overhead at the `tiny` preset (bench/bench_federation.py). So a
# process keeps each site's result while its data folder is unchanged; in deployment, where a message
# runs in a fresh process, nothing is kept and nothing changes.
_LOADED: dict[tuple[str, str], tuple[tuple[tuple[str, str, int, int], ...], SiteData]] = {}


def data_fingerprint(config: SiteConfig) -> tuple[tuple[str, str, int, int], ...]:
    """(folder, name, size, mtime_ns) of every file under the site's data folder, without the folders the
    site writes to itself (its cache, privacy ledger and approval log), so any change to the scans or their labels shows."""
    root = os.path.realpath(config.data_root)
    skip = {os.path.realpath(config.resolved_cache_dir), os.path.realpath(config.privacy_ledger_path.parent),
            os.path.realpath(config.approval_log_path.parent)}
    entries = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(folder, d) not in skip]
        for name in files:
            try:
                stat = os.stat(os.path.join(folder, name))
            except OSError:  # vanished while walking: the next call sees the folder as changed again
                continue
            entries.append((folder, name, stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))


@dataclass
class SiteRuntime:
    config: SiteConfig

    @classmethod
    def from_context(cls, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> "SiteRuntime":
        return cls(resolve_site_config(node_config, run_config))

    @property
    def site_id(self) -> str:
        return self.config.site_id

    @property
    def device(self) -> torch.device:
        return resolve_device(self.config.device)

    # --- frozen encoder ----------------------------------------------------------------------------------

    @property
    def encoder_dir(self) -> Path:
        return self.config.resolved_cache_dir / "encoders"

    def has_encoder(self, sha256: str) -> bool:
        return bool(sha256) and (self.encoder_dir / f"{sha256}.json").is_file()

    def install_encoder(self, sha256: str, arrays: Mapping[str, np.ndarray], model_config: dict[str, Any]) -> Path:
        """Store the server's encoder after checking that its weights hash to the announced `sha256`."""
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        actual = tensors_sha256(tensors)
        if actual != sha256:
            raise SiteDeclined(f"site {self.site_id}: received encoder hashes to {actual[:12]}…, announced {sha256[:12]}…")
        encoder = MAEEncoder(MAEConfig.from_dict(model_config))
        encoder.load_state_dict(tensors)  # refuses weights that do not fit the announced architecture
        return save_checkpoint(self.encoder_dir / sha256, tensors, {"kind": "frozen-encoder", "model_config": model_config,
                                                                     "encoder_sha256": sha256})

    def encoder(self, sha256: str) -> MAEEncoder:
        if not self.has_encoder(sha256):
            raise SiteDeclined(f"site {self.site_id} does not hold encoder {sha256[:12]}…: the server must install it first")
        try:
            checkpoint = load_checkpoint(self.encoder_dir / f"{sha256}.json")
        except CheckpointError as error:
            raise SiteDeclined(f"site {self.site_id}: stored encoder {sha256[:12]}… is unusable ({error})") from None
        encoder = MAEEncoder(MAEConfig.from_dict(checkpoint.meta["model_config"]))
        encoder.load_state_dict(checkpoint.tensors)
        if encoder_sha256(encoder) != sha256:
            raise SiteDeclined(f"site {self.site_id}: stored encoder does not hash to {sha256[:12]}…")
        return encoder.eval().requires_grad_(False)

    # --- data ----------------------------------------------------------------------------------------------

    def data(self, preset: str) -> SiteData:
        """`load_site` (checks + preprocessing cache); a site whose data cannot be read declines clearly.

        Reused within this process while `data_fingerprint` is unchanged (see `_LOADED`)."""
        key, fingerprint = (self.config.model_dump_json(), preset), data_fingerprint(self.config)
        known = _LOADED.get(key)
        if known is not None and known[0] == fingerprint:
            return known[1]
        try:
            data = load_site(self.config, get_preset(preset), progress=False)
        except (OSError, ConfigError) as error:
            raise SiteDeclined(f"site {self.site_id}: data unavailable ({error})") from None
        if not data.records:
            reasons = "; ".join(str(p) for p in data.problems[:3])
            raise SiteDeclined(f"site {self.site_id}: no usable scans under {self.config.data_root} ({reasons})")
        _LOADED[key] = (fingerprint, data)
        return data

    def inputs(self, stage: Stage, preset: str, encoder_sha: str = "") -> SiteInputs:
        """The site's data and, for stages on the frozen encoder, its token cache."""
        data = self.data(preset)
        tokens = self._token_cache(data, encoder_sha) if stage.needs_encoder else None
        return SiteInputs(data, tokens)

    def probe_inputs(self, preset: str, encoder_sha: str) -> SiteInputs:
        data = self.data(preset)
        return SiteInputs(data, self._token_cache(data, encoder_sha))

    def _token_cache(self, data: SiteData, encoder_sha: str) -> TokenCache:
        """The token cache of the installed encoder `encoder_sha`, which is loaded (and verified) only if a scan
        has no cached tokens: a round on cached tokens keeps no encoder in memory."""
        if not self.has_encoder(encoder_sha):
            self.encoder(encoder_sha)  # declines, naming the missing encoder
        return TokenCache(self.config.resolved_cache_dir, lambda: self.encoder(encoder_sha), data.preset, data.cache,
                          self.device, sha256=encoder_sha)
