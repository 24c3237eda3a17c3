"""`braing3n synthesize`: audited synthetic scans for sharing, as a BIDS dataset with a data card.

1. **Models** from a run folder (its final DiT, decoder and frozen encoder) or from a DiT checkpoint
   (the decoder and encoder are looked up in the same run folder), through `generate.load_run_models`,
   which checks that all three share the frozen encoder.
2. **Conditions**: a balanced table by default (diagnosis × sex × modality × field strength cycled so
   every prefix is as even as possible; ages and MMSE drawn in clinically plausible ranges per
   diagnosis), or the rows of `--conditions table.tsv` (`generate.read_conditions`: columns age, sex,
   diagnosis, modality, field_strength, mmse; `n/a` for missing), cycled to N.
3. **Generation** (`generate.generate`): the DiT samples encoder tokens (flow-matching ODE,
   classifier-free guidance), the decoder turns them into volumes in the preprocessed space (LPS,
   z-scored, the preset's grid).
4. **Staging**: the volumes and their conditions are written to `<out>/staging/` (safetensors + JSON),
   nothing is exported yet.
5. **Federated privacy audit** (`braing3n_core.privacy.audit`): the staged set goes to every site,
   which answers with aggregates and one flag per synthetic scan. With `--sites` the audit runs as a
   Flower simulation of those sites (the same ServerApp/ClientApp as a deployment: an audit-only run
   in `<out>/audit-run/`). In a deployment: `--stage-only` stages the set and writes
   `<out>/audit-run.yaml`; run it with `flwr run` against the consortium; then
   `--audit <run-dir>/privacy_audit.json` exports the very set the sites audited.
6. **Export**: the scans no site flagged → `<out>/bids/` (one subject per synthetic scan), and the data
   card `<out>/datacard.json` + `datacard.md`: model and config hashes, each site's ε spent (from the
   run's metrics) and the client-level ε, the conditioning distribution, the audit's results.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from braing3n_core.checkpoint import load_checkpoint, save_checkpoint
from braing3n_core.config import ConfigError
from braing3n_core.data.cohort.bids_writer import write_json, write_text, write_tsv
from braing3n_core.errors import BadInput
from braing3n_core.federation.run_folder import RunFolder
from braing3n_core.fileio import atomic_write_bytes, atomic_write_json, file_sha256, json_safe
from braing3n_core.generation.condition_table import MISSING, ConditionRow, balanced_conditions, read_conditions
from braing3n_core.generation.models import GenerationError, GenerationModels, load_run_models, model_hashes
from braing3n_core.generation.output import nifti_bytes
from braing3n_core.generation.sampling import generate, sampling_progress
from braing3n_core.labels import DIAGNOSES, SEXES, Modality
from braing3n_core.models.conditions import CONDITION_SCHEMA, ContinuousVariable
from braing3n_core.models.diffusion import DEFAULT_STEPS
from braing3n_core.ops.consortium import load_release_private_key
from braing3n_core.ops.release import sign_directory
from braing3n_core.ops.simulate import simulate
from braing3n_core.presets import Preset


class SynthesisError(BadInput, RuntimeError):
    """Synthesis cannot go on (missing checkpoint, audit that does not match the staged set…)."""


# --- models -----------------------------------------------------------------------------------------------


def load_synthesis_models(checkpoint: Path) -> GenerationModels:
    """DiT, decoder and frozen encoder (the audit encodes the synthetic scans) from a run folder, or a DiT
    checkpoint inside one (`<run>/checkpoints/dit/<name>.json`)."""
    try:
        models = load_run_models(checkpoint, need_encoder=True)
    except GenerationError as error:
        raise SynthesisError(str(error)) from None
    if models.run_dir is None:
        raise SynthesisError(f"{checkpoint}: not inside a run folder (<run>/checkpoints/dit/); the data card reads "
                             "the run's privacy ledger")
    return models


# --- conditions -------------------------------------------------------------------------------------------


def distribution(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What the data card shows of the conditions: counts per category, summaries of the numbers."""
    out: dict[str, Any] = {"n": len(rows)}
    for variable in CONDITION_SCHEMA:
        values = [r[variable.name] for r in rows]
        if isinstance(variable, ContinuousVariable):
            known = [float(v) for v in values if v is not None]
            out[variable.name] = {"missing": len(values) - len(known), **({"min": min(known), "mean": float(np.mean(known)),
                                                                          "max": max(known)} if known else {})}
        else:
            out[variable.name] = {str(k if k is not None else MISSING): c for k, c in sorted(
                Counter(values).items(), key=lambda kv: str(kv[0]))}
    return out


# --- staging ----------------------------------------------------------------------------------------------


def stage_synthetic(folder: Path, volumes: torch.Tensor, rows: Sequence[ConditionRow],
                    meta: Mapping[str, Any]) -> Path:
    """The staged set (before the audit): `synthetic.safetensors` (fp16 volumes) + `synthetic.json`."""
    return save_checkpoint(Path(folder) / "synthetic", {"volumes": volumes.to(torch.float16).contiguous()},
                           {**meta, "kind": "staged-synthetic", "conditions": [r.to_dict() for r in rows]})


def load_staged(path: Path) -> tuple[torch.Tensor, list[ConditionRow], dict[str, Any]]:
    checkpoint = load_checkpoint(path)
    if checkpoint.meta.get("kind") != "staged-synthetic":
        raise SynthesisError(f"{path}: not a staged synthetic set")
    rows = [ConditionRow.from_dict(row, f"{path}: conditions[{i}]") for i, row in enumerate(checkpoint.meta["conditions"])]
    return checkpoint.tensors["volumes"], rows, checkpoint.meta


def staged_sha256(path: Path) -> str:
    path = Path(path)
    return file_sha256(path.with_suffix(".safetensors"))


# --- audit --------------------------------------------------------------------------------------------------


def audit_run_config(models: GenerationModels, staged: Path, membership: bool = True) -> dict[str, Any]:
    """An audit-only run: the encoder from the training run, no stages, the `privacy_audit` query."""
    return {"name": "privacy-audit", "preset": models.preset.name, "min_sites": 1, "round_timeout_s": 3600.0,
            "start_from": {"mae": str(models.checkpoints["mae"].resolve())},
            "audit": {"synthetic": str(Path(staged).resolve()),
                      "dit": str(models.checkpoints["dit"].resolve()) if membership else None,
                      "mae": str(models.checkpoints["mae"].resolve()) if membership else None}}


def federated_audit(models: GenerationModels, staged: Path, sites: Sequence[Path], out: Path,
                    membership: bool = True) -> dict[str, Any]:
    """Run the audit as a Flower simulation of `sites` and return its `privacy_audit.json`."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    config = out.with_name(out.name + ".yaml")
    config.write_text(yaml.safe_dump(audit_run_config(models, staged, membership)))
    result = simulate(list(sites), config, out, resume=RunFolder(out).is_run(), echo=False)
    return json.loads(RunFolder(result.run_dir).audit_path.read_text())


# --- export -------------------------------------------------------------------------------------------------


def privacy_spent(run_dir: Path) -> dict[str, Any]:
    """Each site's cumulative ε at the end of the run (its ledger's value reported in the last DP round),
    the client-level ε, and whether updates were securely aggregated."""
    sites: dict[str, dict[str, Any]] = {}
    client: dict[str, Any] | None = None
    run = RunFolder(run_dir)
    for record in run.records():
        if record.get("kind") == "train" and record.get("privacy/epsilon") is not None and record.get("site") != "aggregate":
            sites[record["site"]] = {"epsilon": record["privacy/epsilon"], "delta": record.get("privacy/delta"),
                                     "budget": record.get("privacy/budget"), "stage": record["stage"],
                                     "round": record["round"]}
        if record.get("kind") == "client_dp":
            client = {"epsilon": record.get("privacy/epsilon"), "delta": record.get("privacy/delta"),
                      "releases": record.get("privacy/releases")}
        if record.get("kind") == "declined" and "privacy budget" in str(record.get("reason", "")):
            sites.setdefault(record["site"], {})["declined"] = f"{record['stage']} round {record['round']}"
    secure = run.is_run() and run.run_config().secure_aggregation.enabled
    return {"site_level": sites, "client_level": client, "secure_aggregation": secure,
            "note": "site-level ε is per subject (DP-SGD, see braing3n_core/privacy/dp.py), cumulative over "
                    "the site's whole ledger at the end of this run; sites without an entry trained without DP"}


def write_bids(root: Path, volumes: torch.Tensor, rows: Sequence[ConditionRow], keep: Sequence[int],
               preset: Preset, description: Mapping[str, Any]) -> list[Path]:
    """One subject per kept synthetic scan: `sub-synthNNNN/anat/sub-synthNNNN_<suffix>.nii.gz` + sidecar."""
    root.mkdir(parents=True, exist_ok=True)
    written, participants = [], []
    for number, index in enumerate(keep, start=1):
        row = rows[index].to_dict()
        subject = f"sub-synth{number:04d}"
        stem = root / subject / "anat" / f"{subject}_{Modality(row['modality']).value}"
        atomic_write_bytes(stem.with_name(stem.name + ".nii.gz"), nifti_bytes(volumes[index, 0].float().numpy(), preset))
        sidecar = {"GeneratedBy": "braing3n synthesize", "SyntheticIndex": index,
                   "Units": "z-score of brain voxels (BrainG3N preprocessed space)"}
        if row.get("field_strength") is not None:
            sidecar["MagneticFieldStrength"] = row["field_strength"]
        write_json(stem.with_name(stem.name + ".json"), sidecar)
        written.append(stem.with_name(stem.name + ".nii.gz"))
        participants.append({"participant_id": subject, "age": row["age"], "sex": row["sex"],
                             "diagnosis": row["diagnosis"], "mmse": row["mmse"]})
    write_tsv(root / "participants.tsv", ["participant_id", "age", "sex", "diagnosis", "mmse"], participants)
    write_json(root / "participants.json", {
        "age": {"Description": "age the scan was generated for", "Units": "year"},
        "sex": {"Description": "sex the scan was generated for", "Levels": {s: s for s in SEXES}},
        "diagnosis": {"Description": "diagnosis the scan was generated for", "Levels": {d: d for d in DIAGNOSES}},
        "mmse": {"Description": "Mini-Mental State Examination score the scan was generated for"},
    })
    write_json(root / "dataset_description.json", {
        "Name": "BrainG3N synthetic brain MRI", "BIDSVersion": "1.9.0", "DatasetType": "raw",
        "License": "CC0", "GeneratedBy": [{"Name": "braing3n synthesize", **description}],
        "HowToAcknowledge": "Synthetic data; see datacard.json beside this folder for its provenance and audit.",
    })
    write_text(root / "README", "Synthetic brain MRI generated by a federated BrainG3N DiT and decoder.\n"
               "No scan here is a patient's. Every scan passed a federated memorisation audit at each site;\n"
               "see ../datacard.md for the models, the sites' privacy budgets and the audit.\n")
    return written


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if math.isfinite(value) else "n/a"
    return "n/a" if value is None else str(value)


def data_card_markdown(card: Mapping[str, Any]) -> str:
    audit = card.get("audit") or {}
    privacy = card["privacy"]
    summary = (f"Generated {card['created']}; {card['exported']} of {card['generated']} synthetic scans exported "
               f"({len(card['excluded'])} excluded by the audit).")
    lines = [f"# Data card: {card['name']}", "", summary, "", "## Models", ""]
    lines += [f"- {stage}: `{info['path']}` sha256 `{info['sha256'][:16]}…`" for stage, info in card["models"].items()]
    lines += ["", "## Privacy", "", "| site | ε | δ | budget |", "|---|---|---|---|"]
    for site, spent in sorted(privacy["site_level"].items()):
        lines.append(f"| {site} | {_fmt(spent.get('epsilon'))} | {_fmt(spent.get('delta'))} | {_fmt(spent.get('budget'))} |")
    if privacy.get("client_level"):
        client = privacy["client_level"]
        lines += ["", f"Client-level DP: ε = {_fmt(client['epsilon'])} at δ = {_fmt(client['delta'])}."]
    lines += ["", f"Secure aggregation: {'yes' if privacy['secure_aggregation'] else 'no'}.", "", "## Audit", ""]
    if audit:
        lines += [f"- criterion: {audit.get('criterion')}", f"- excluded synthetic scans: {audit.get('excluded')}",
                  f"- positive controls caught: {audit.get('positive_controls_caught')} of {audit.get('calibrated_sites')} sites",
                  *[f"- membership-inference AUC ({attack.upper()} loss threshold, pooled within sites): "
                    f"{_fmt(pooled['auc'])} (95 % bootstrap interval {_fmt(pooled['ci95'][0])}–{_fmt(pooled['ci95'][1])})"
                    for attack, pooled in audit.get("membership", {}).items()]]
    else:
        lines += ["**Not audited.**"]
    lines += ["", "## Conditions", "", "```", json.dumps(card["conditions"], indent=1), "```", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class SynthesisResult:
    out: Path
    bids: Path
    datacard: Path
    generated: int
    exported: int
    excluded: list[int]
    release: Path | None = None  # bids/RELEASE.json when signed


def synthesize(checkpoint: Path, n: int, out: Path, conditions: Path | None = None, sites: Sequence[Path] = (),
               audit: Path | None = None, skip_audit: bool = False, stage_only: bool = False, steps: int = DEFAULT_STEPS,
               guidance_scale: float = 1.5, seed: int = 0, membership: bool = True,
               plant: Mapping[int, torch.Tensor] | None = None, signing_key: Path | None = None) -> SynthesisResult:
    """Generate, stage, audit, export (module docstring). `plant` (drills: index → volume) overwrites
    staged scans before the audit, e.g. with a copy of a training scan as a positive control.

    Deployment, in three steps: `stage_only` generates and stages the set and writes
    `<out>/audit-run.yaml`; the consortium runs that audit with `flwr run`; a second call with
    `audit=<run-dir>/privacy_audit.json` exports the staged set the sites audited (not a new one).

    `signing_key` (the consortium's Ed25519 release key) signs the exported BIDS folder: `bids/RELEASE.json`
    holds every file's sha256 and, as signed metadata, the data card (model hashes, run config hash, ε
    spent per site, conditions, audit), so `braing3n verify` checks a shared dataset end to end."""
    if not (sites or audit or skip_audit or stage_only):
        raise ConfigError("synthesize: give --sites (federated audit in a simulation), --stage-only then --audit "
                          "privacy_audit.json (a deployment's audit run), or --no-audit (the data card then says so)")
    out = Path(out)
    # A bad key or conditions table fails now, not after the models load, generation and the audit.
    release_key = load_release_private_key(Path(signing_key)) if signing_key is not None else None
    table = read_conditions(conditions) if conditions is not None else None
    models = load_synthesis_models(checkpoint)
    hashes = model_hashes(models)
    started = time.time()
    staged = out / "staging" / "synthetic.json"
    if audit is not None and staged.is_file():  # export what was audited
        volumes, rows, meta = load_staged(staged)
        if meta.get("models") != hashes:
            raise SynthesisError(f"{staged}: staged from other models than {checkpoint}")
        steps, guidance_scale, seed = meta["steps"], meta["guidance_scale"], meta["seed"]
    else:
        rows = table if table is not None else balanced_conditions(n, seed)
        if table is not None and n > 0:
            rows = [rows[i % len(rows)] for i in range(n)]
        with sampling_progress("synthesizing", len(rows)) as progress:
            generated = generate(models, rows, steps=steps, guidance_scale=guidance_scale, seed=seed, progress=progress)
        volumes = generated.volumes
        for index, volume in (plant or {}).items():
            volumes[index] = volume.reshape(volumes.shape[1:]).to(volumes.dtype)
        staged = stage_synthetic(out / "staging", volumes, rows, {"models": hashes, "seed": seed, "steps": steps,
                                                                  "guidance_scale": guidance_scale,
                                                                  "solver": generated.settings["solver"]})
    if stage_only:
        import yaml

        (out / "audit-run.yaml").write_text(yaml.safe_dump(audit_run_config(models, staged, membership)))
        return SynthesisResult(out, out / "bids", out / "audit-run.yaml", len(rows), 0, [])
    if sites:
        result = federated_audit(models, staged, sites, out / "audit-run", membership)
    elif audit is not None:
        result = json.loads(Path(audit).read_text())
    else:
        result = None
    if result is not None and result.get("staged_sha256") != staged_sha256(staged):
        raise SynthesisError(f"{audit}: this audit is of another synthetic set (staged sha256 differs); audit "
                             f"{staged} itself")
    excluded = sorted(result["excluded"]) if result is not None else []
    keep = [i for i in range(len(rows)) if i not in set(excluded)]
    volumes = load_staged(staged)[0]  # exactly what was audited (fp16)
    assert models.run_dir is not None  # load_synthesis_models refuses a DiT outside a run folder
    run_yaml = RunFolder(models.run_dir).config_path
    card = {
        "name": out.name, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": time.time() - started,
        "generated": len(rows), "exported": len(keep), "excluded": excluded,
        "models": hashes, "run": {"folder": str(models.run_dir),
                                  "run_yaml_sha256": file_sha256(run_yaml) if run_yaml.is_file() else None},
        "generation": {"steps": steps, "guidance_scale": guidance_scale, "seed": seed, "preset": models.preset.name,
                       "solver": "heun"},
        "privacy": privacy_spent(models.run_dir),
        "conditions": {"generated": distribution([r.to_dict() for r in rows]),
                       "exported": distribution([rows[i].to_dict() for i in keep])},
        "audit": result,
        "staged_sha256": staged_sha256(staged),
    }
    bids = out / "bids"
    write_bids(bids, volumes, rows, keep, models.preset, {"Version": "0.1.0", "Description": f"{len(keep)} scans"})
    atomic_write_json(out / "datacard.json", json_safe(card))
    atomic_write_bytes(out / "datacard.md", data_card_markdown(card).encode())
    release = None
    if release_key is not None:
        atomic_write_bytes(bids / ".bidsignore", b"RELEASE.json\n")  # BIDS' own way to name a non-BIDS file
        release = sign_directory(bids, release_key, {"kind": "synthetic dataset", "name": out.name,
                                                     "datacard": json_safe(card)})
    return SynthesisResult(out, bids, out / "datacard.json", len(rows), len(keep), excluded, release)


