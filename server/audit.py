"""The federated privacy audit of a synthetic data set (`audit` in the run YAML; `braing3n synthesize`).

The staged synthetic volumes (and the DiT, for membership inference) go to every site; each site
compares them with its own scans and answers aggregates and one flag per synthetic scan only
(`braing3n_core.privacy.audit`). The combined result is `<run>/privacy_audit.json`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from braing3n_core.federation.arrays import module_arrays
from braing3n_core.federation.protocol import Action, AuditReply, PrivacyAuditQuery, Record
from braing3n_core.fileio import atomic_write_json
from braing3n_core.jobs.synthesize import load_staged, staged_sha256
from braing3n_core.privacy.audit import SiteAudit, combine_audits
from braing3n_core.stage_names import DIT, MAE
from braing3n_core.training.checkpoints import load_stage_model
from server.aggregation import to_array_record
from server.session import Federation

STAGE = "audit"  # how the audit's messages and ledger lines are labelled


def run_audit(federation: Federation) -> Path:
    settings = federation.config.audit
    federation.ensure_encoder(STAGE)
    volumes, _, _ = load_staged(settings.synthetic)
    records = {Record.SYNTHETIC: to_array_record({"volumes": volumes.numpy()})}
    query = PrivacyAuditQuery(n_synthetic=int(volumes.shape[0]))
    if settings.dit is not None:
        dit, checkpoint = load_stage_model(Path(settings.dit), expected_stage=DIT)
        records[Record.DIT] = to_array_record(module_arrays(dit))
        query = replace(query, dit_config=checkpoint.meta["model_config"])
    if settings.mae is not None:
        mae, checkpoint = load_stage_model(Path(settings.mae), expected_stage=MAE)
        records[Record.MAE] = to_array_record(module_arrays(mae))
        query = replace(query, mae_config=checkpoint.meta["model_config"])
    audits = []
    for reply in federation.query(Action.PRIVACY_AUDIT, STAGE, query, arrays=records):
        answer = AuditReply.from_config(reply.content.config_records[Record.SITE])
        audit = SiteAudit.from_json(answer.audit)
        if len(audit.flags) != int(volumes.shape[0]):
            federation.run.log(STAGE, 0, answer.site_id, "rejected", reason="audit of a different number of synthetic scans")
            continue
        audits.append(audit)
        federation.run.log(STAGE, 0, answer.site_id, "privacy_audit", flagged=sum(audit.flags), n_train=audit.n_train,
                           n_held=audit.n_held, **_space_values(audit),
                           **{f"privacy/membership_auc_{attack}": result["auc"] for attack, result in audit.membership.items()})
    if not audits:
        raise RuntimeError("privacy audit: no site returned an audit")
    result = {**combine_audits(audits), "staged": str(settings.synthetic), "staged_sha256": staged_sha256(settings.synthetic)}
    atomic_write_json(federation.run.audit_path, result)
    federation.run.log(STAGE, 0, "aggregate", "privacy_audit", excluded=len(result["excluded"]),
                       sites=len(audits), **{f"privacy/membership_auc_{attack}": pooled["auc"]
                                             for attack, pooled in result["membership"].items()})
    return federation.run.audit_path


def _space_values(audit: SiteAudit) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for space, stats in audit.spaces.items():
        values[f"audit/{space}_threshold"] = stats.threshold
        values[f"audit/{space}_control_flagged"] = float(stats.control_flagged)
    return values
