"""A hospital's site file: where its BIDS dataset lives, how it is split and used, its privacy settings.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from braing3n_core.config import ConfigError, StrictModel, _read_yaml_mapping, _validate
from braing3n_core.labels import Modality
from braing3n_core.stage_names import StageName


class SplitConfig(StrictModel):
    """Subject-level split: every session and modality of a subject lands in the same split."""

    seed: int = 0
    train: float = Field(0.7, ge=0.0, le=1.0)
    val: float = Field(0.15, ge=0.0, le=1.0)
    test: float = Field(0.15, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> "SplitConfig":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1.0, got {total:.4f}")
        if self.train <= 0.0:
            raise ValueError("train fraction must be positive")
        return self


class StagePrivacyConfig(StrictModel):
    """DP-SGD settings of one stage: a noise multiplier σ, or a target ε from which σ is calibrated.

    `target_epsilon` is what this stage's whole schedule (its rounds × local steps at the site's sampling
    rate) may spend on its own; the site's `epsilon_budget` caps the total over every stage and run.
    """

    noise_multiplier: float | None = Field(None, gt=0.0, description="σ: noise std / max_grad_norm")
    target_epsilon: float | None = Field(None, gt=0.0, description="calibrate σ so the stage spends this ε")
    max_grad_norm: float = Field(1.0, gt=0.0, description="per-subject gradient clipping bound C")

    @model_validator(mode="after")
    def _one_noise_setting(self) -> "StagePrivacyConfig":
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier and target_epsilon")
        return self


class SitePrivacyConfig(StrictModel):
    """Site-side, subject-level differential privacy (DP-SGD with Opacus) and the site's hard ε budget.

    ```yaml
    privacy:
      enabled: true
      epsilon_budget: 8.0        # cumulative, over every round, stage and run; a round that would pass it is declined
      delta: 1.0e-5              # default: min(1e-5, 0.1 / n) for the site's n training subjects
      accountant: rdp            # rdp (default) or prv
      stages:
        mae: {noise_multiplier: 1.0, max_grad_norm: 1.0}
        decoder: {target_epsilon: 2.0}
        dit: {noise_multiplier: 1.2, max_grad_norm: 0.5}
    ```
    A stage left out of `stages` uses `default_stage`. The ledger (`braing3n_core.privacy.ledger`) lives
    at `ledger` or, by default, beside the cache folder (not inside it: clearing a cache must never reset ε).

    `min_subjects_per_cell` holds whether or not DP is enabled: a per-cell sum the site sends outside the
    trained weights (the DiT's trend: each (modality, diagnosis) cell's token change over its pairs) must
    come from at least that many subjects, else the cell is withheld. With `enabled`, the site sends no such
    sums at all (they would be released outside ε).
    """

    enabled: bool = False
    epsilon_budget: float = Field(8.0, gt=0.0)
    delta: float | None = Field(None, gt=0.0, lt=1.0)
    accountant: Literal["rdp", "prv"] = "rdp"
    stages: dict[StageName, StagePrivacyConfig] = Field(default_factory=dict)
    default_stage: StagePrivacyConfig = StagePrivacyConfig(noise_multiplier=1.0)
    ledger: Path | None = None
    min_subjects_per_cell: int = Field(3, ge=1)

    def stage(self, name: str) -> StagePrivacyConfig:
        return self.stages.get(name, self.default_stage)  # type: ignore[call-overload]


class ComputeConfig(StrictModel):
    """How a site's training uses its hardware. None of it changes what is trained, only its speed and memory.

    ```yaml
    compute:
      loader_workers: 4              # data-loading processes per training worker (0: in the worker itself)
      pin_memory: true               # page-locked batches, copied to the GPU asynchronously (CUDA only)
      activation_checkpointing: true # recompute transformer blocks / decoder stages in backward: less memory
      compile: false                 # torch.compile each block (CUDA; the first steps pay the compilation)
      channels_last: true            # the decoder's 3D convolutions in NDHWC (faster on CUDA and CPU)
    ```
    """

    loader_workers: int = Field(0, ge=0, le=64, description="data-loading processes per training worker")
    pin_memory: bool = Field(True, description="page-locked host batches (used on CUDA only)")
    activation_checkpointing: bool = Field(False, description="recompute blocks in the backward pass")
    compile: bool = Field(False, description="torch.compile each transformer block and decoder stage")
    channels_last: bool = Field(True, description="NDHWC memory layout for the decoder (faster than NCDHW on CUDA and on CPU)")


class ApprovalConfig(StrictModel):
    """Which federated jobs may use this site's scans: only those the site approved (`braing3n site approve`).

    ```yaml
    approval:
      required: true               # the default: refuse every job this site has not approved
      log: /var/lib/braing3n/approvals.jsonl   # default beside the privacy ledger (never inside the cache)
    ```
    With `required`, the ClientApp refuses every message of a job whose app (the Flower app bundle's hash) or
    recipe (the run YAML's canonical hash) no active approval in the log covers, before it reads any scan
    (`braing3n_core.federation.approvals`). On by default because a hospital's site file guards patients'
    scans: a site that forgets the setting must not run whatever the consortium sends. Synthetic cohorts
    (`braing3n cohort make`: no patients, the demo and the tests run unattended) write `required: false`.
    """

    required: bool = True
    log: Path | None = None


_DEVICE_PATTERN = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")


_SITE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class SiteConfig(StrictModel):
    """One hospital: where its BIDS dataset lives and how it is used."""

    site_id: str
    data_root: Path
    modalities: tuple[Modality, ...] = tuple(Modality)
    split: SplitConfig = SplitConfig()
    device: str = "cpu"
    workers: int = Field(1, ge=1, le=64, description="data-parallel training processes (DDP); cuda: one GPU each")
    compute: ComputeConfig = ComputeConfig()
    cache_dir: Path | None = None
    privacy: SitePrivacyConfig = SitePrivacyConfig()
    approval: ApprovalConfig = ApprovalConfig()
    source_file: Path | None = Field(default=None, exclude=True)

    @field_validator("site_id")
    @classmethod
    def _site_id_is_a_name(cls, value: str) -> str:
        if not _SITE_ID_PATTERN.match(value):
            raise ValueError(f"{value!r} must be letters, digits, '-' or '_' (it names folders and metrics)")
        return value

    @field_validator("modalities", mode="before")
    @classmethod
    def _modalities_known(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            known = {m.value for m in Modality}
            unknown = [v for v in value if v not in known and not isinstance(v, Modality)]
            if unknown:
                raise ValueError(f"unknown modalities {unknown}; known: {sorted(known)}")
            if not value:
                raise ValueError("at least one modality is required")
        return value

    @field_validator("device")
    @classmethod
    def _device_known(cls, value: str) -> str:
        if not _DEVICE_PATTERN.match(value):
            raise ValueError(f"{value!r} is not a device; use cpu, cuda, cuda:N or auto")
        return value

    @model_validator(mode="after")
    def _workers_fit_the_device(self) -> "SiteConfig":
        if self.workers > 1 and self.device.startswith("cuda:"):
            raise ValueError(f"device {self.device!r} pins one GPU, but workers: {self.workers} takes one GPU per worker; "
                             "use device: cuda (workers use cuda:0 … cuda:N-1 of the visible GPUs)")
        if self.privacy.enabled and (self.compute.activation_checkpointing or self.compute.compile):
            raise ValueError("compute.activation_checkpointing and compute.compile cannot be used with privacy.enabled: "
                             "Opacus' per-sample gradient hooks need each layer's forward pass to run once, uncompiled")
        return self

    @property
    def resolved_cache_dir(self) -> Path:
        """Preprocessed-volume and token caches live on the site's own disk, beside its data."""
        return self.cache_dir if self.cache_dir is not None else self.data_root / "derivatives" / "braing3n-cache"

    @property
    def privacy_ledger_path(self) -> Path:
        """The site's privacy ledger: `privacy.ledger`, else beside (never inside) the cache folder."""
        if self.privacy.ledger is not None:
            return self.privacy.ledger
        return self.resolved_cache_dir.parent / "braing3n-privacy" / f"{self.site_id}-ledger.jsonl"

    @property
    def approval_log_path(self) -> Path:
        """The site's approval log: `approval.log`, else beside the privacy ledger (clearing a cache must
        never drop an approval, nor a revocation)."""
        if self.approval.log is not None:
            return self.approval.log
        return self.privacy_ledger_path.parent / f"{self.site_id}-approvals.jsonl"

    @classmethod
    def from_yaml(cls, path: str | Path) -> "SiteConfig":
        path = Path(path)
        raw = _read_yaml_mapping(path)
        base = path.parent.resolve()
        for key in ("data_root", "cache_dir"):
            if isinstance(raw.get(key), str):
                raw[key] = str((base / raw[key]).resolve()) if not Path(raw[key]).is_absolute() else raw[key]
        privacy = raw.get("privacy")
        if isinstance(privacy, dict) and isinstance(privacy.get("ledger"), str) and not Path(privacy["ledger"]).is_absolute():
            raw["privacy"] = {**privacy, "ledger": str((base / privacy["ledger"]).resolve())}
        approval = raw.get("approval")
        if isinstance(approval, dict) and isinstance(approval.get("log"), str) and not Path(approval["log"]).is_absolute():
            raw["approval"] = {**approval, "log": str((base / approval["log"]).resolve())}
        config = _validate(cls, raw, path)
        return config.model_copy(update={"source_file": path.resolve()})

    def to_yaml_dict(self, relative_to: Path | None = None) -> dict[str, Any]:
        """Plain mapping for writing a site YAML; paths relative to `relative_to` when given."""
        data = self.model_dump(mode="json", exclude_none=True)
        # Privacy settings left at their defaults stay out of the file, so a written site YAML shows only
        # the choices a person made.
        data["privacy"] = {"enabled": self.privacy.enabled,
                           **self.privacy.model_dump(mode="json", exclude_none=True, exclude_defaults=True)}
        if self.workers == 1:
            data.pop("workers")
        compute = self.compute.model_dump(mode="json", exclude_defaults=True)
        if compute:
            data["compute"] = compute
        else:
            data.pop("compute")
        if relative_to is not None:
            for key in ("data_root", "cache_dir"):
                if key in data:
                    data[key] = _relative_path(Path(data[key]), relative_to)
            if "ledger" in data.get("privacy", {}):
                data["privacy"]["ledger"] = _relative_path(Path(data["privacy"]["ledger"]), relative_to)
            if "log" in data.get("approval", {}):
                data["approval"]["log"] = _relative_path(Path(data["approval"]["log"]), relative_to)
        return data


def _relative_path(path: Path, base: Path) -> str:
    try:
        import os

        return os.path.relpath(path.resolve(), base.resolve())
    except ValueError:  # different drives on Windows
        return str(path)


def load_site_configs(paths: list[str | Path]) -> list[SiteConfig]:
    """Load several site YAML files; site ids must be unique across the federation."""
    configs = [SiteConfig.from_yaml(p) for p in paths]
    seen: dict[str, Path | None] = {}
    for config in configs:
        if config.site_id in seen:
            raise ConfigError(
                f"{config.source_file}: site_id {config.site_id!r} is also used by {seen[config.site_id]}"
            )
        seen[config.site_id] = config.source_file
    return configs
