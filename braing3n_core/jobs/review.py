"""`braing3n site review`: what a job would do with this site's data, in plain words, before anyone approves it.

It reads the job (`ops.job_file`: a signed job file, or a run YAML) and the site file, and says:
- who proposed it (the consortium key that signed it, checked or not) and which code runs (the app's bundle
  hash, and whether it is the app installed here);
- each federated step in order: rounds, local steps, batch, strategy;
- what leaves the site: the model update of each stage, with its size in bytes computed from the preset's
  networks (fp32, as they travel), once per round; the aggregates each query returns; never a scan;
- the ε this site would spend under its own privacy settings, by the ledger's own accountant over its
  history (`privacy.dp.resolve_round` and `privacy.ledger.epsilon_of`, as a DP round computes it), on the
  subjects the site's split puts in training (the site counts them again at every round);
- the DP and secure aggregation the recipe asks of the site, and whether this site has approved it already.
Reading the job and listing the site's subjects reads no scan.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from braing3n_core.data.bids import discover_scans
from braing3n_core.data.datasets import split_subjects
from braing3n_core.federation.approval_log import Approval, ApprovalLog, local_time
from braing3n_core.federation.arrays import module_arrays
from braing3n_core.federation.run_config import RunConfig
from braing3n_core.jobs.status import size
from braing3n_core.ops.flower import APP_DIR, FlowerError, fab_sha256
from braing3n_core.ops.job_file import Job
from braing3n_core.presets import get_preset
from braing3n_core.privacy.dp import default_delta, resolve_round
from braing3n_core.privacy.ledger import LedgerError, PrivacyLedger, epsilon_of
from braing3n_core.site_config import SiteConfig
from braing3n_core.stage_names import PROBES
from braing3n_core.training.stages import get_stage

NETWORKS = {"mae": "the masked autoencoder (its encoder becomes the frozen encoder)",
            "decoder": "the CNN decoder on the frozen encoder's tokens",
            "dit": "the diffusion transformer on the frozen encoder's tokens",
            PROBES: "linear-probe heads on the frozen encoder's features"}
NEVER_LEAVES = ("scans or images", "per-scan tokens or features", "subject identifiers or per-subject labels",
                "file paths")


@dataclass
class StepPlan:
    name: str  # a stage or `probes`
    rounds: int
    local_steps: int
    batch_size: int
    strategy: str
    update_bytes: int | None  # one model update (fp32) as it leaves the site; None: the probes' small heads
    epsilon_after: float | None = None  # this site's cumulative ε once the step is done (DP sites)

    @property
    def total_bytes(self) -> int | None:
        return None if self.update_bytes is None else self.update_bytes * self.rounds


@dataclass
class PrivacyPlan:
    enabled: bool
    budget: float
    delta: float | None = None
    spent: float = 0.0  # ε in the ledger now
    after: float | None = None  # ε after this job
    subjects: int = 0
    problem: str = ""


@dataclass
class Review:
    site_id: str
    job: str
    run: str
    recipe_sha256: str
    fab_sha256: str
    app: str
    signed_by: str
    signature_checked: bool
    same_as_installed: bool | None  # None: the installed app's bundle could not be built here
    preset: str
    steps: list[StepPlan]
    aggregates: list[str]
    asked: list[str]  # DP and secure aggregation the recipe asks of the sites
    privacy: PrivacyPlan
    required: bool
    approvals: list[str] = field(default_factory=list)  # active approvals that already cover this job

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "never_leaves": list(NEVER_LEAVES)}


def _update_bytes(stage: str, preset: str) -> int:
    """Bytes of one model update of `stage`: every array the site sends back, fp32 (`module_arrays`)."""
    return int(sum(array.nbytes for array in module_arrays(get_stage(stage).build(get_preset(preset))).values()))


def _training_subjects(site: SiteConfig) -> int:
    """Subjects the site's split puts in training (scans listed by name, none read)."""
    records, _ = discover_scans(site)
    wanted = set(site.modalities)
    train = split_subjects([r for r in records if r.modality in wanted], site.split)["train"]
    return len({r.subject for r in train})


def _aggregates(config: RunConfig) -> list[str]:
    said = ["counts of usable scans per split, and of problems found (at the start of each stage)",
            "per-round metrics: losses, validation scores, example counts, seconds, update norms"]
    if any(s.name == "dit" for s in config.stages):
        said.append("token sums before the DiT's first round: count, Σ and Σ² per token channel")
        if not (config.client_dp.applies_to("dit") or config.secure_aggregation.applies_to("dit")):
            said.append("with them, for the DiT's trend: the token change × interval summed over the training pairs of "
                        "each (modality, diagnosis) cell of at least privacy.min_subjects_per_cell subjects (none from "
                        "a site whose privacy is enabled)")
    if config.probes.enabled:
        said.append("linear-probe heads and, once, label counts, summed probe features (count, Σ, Σ²) and, for the age "
                    "and MMSE probes, the second moments of the probe features (XᵀX, Xᵀy) of labelled train/val scans, per fold of subjects")
    if config.audit is not None:
        said.append("a privacy audit of a synthetic set: aggregate distances and one flag per synthetic scan")
    if config.generation_eval is not None:
        said.append("generation scores against held-out scans: distances between sets, sums, probe scores"
                    + ("; forecast errors summed over held-out subjects" if config.generation_eval.forecast else ""))
    if any(get_stage(s.name).needs_encoder for s in config.stages) or config.probes.enabled:
        said.append("nothing about the frozen encoder: it arrives once and is checked against its announced hash")
    return said


def _asked(config: RunConfig) -> list[str]:
    asked = []
    dp, secure = config.client_dp, config.secure_aggregation
    if dp.enabled:
        where = "this site clips its update" if dp.side == "client" else "the server clips the updates"
        asked.append(f"client-level DP on {', '.join(dp.stages)}: {where} to norm {dp.clipping_norm:g} "
                     f"({dp.clipping}), the server adds noise z = {dp.noise_multiplier:g} to the mean at δ {dp.delta:g}")
    if secure.enabled:
        asked.append(f"secure aggregation (SecAgg+) on {', '.join(secure.stages)}: the server sees only the sum of "
                     f"the updates; coordinates beyond ±{secure.clipping_range:g} are refused")
    if config.fault_injection:
        asked.append(f"fault drills: {', '.join(f'{f.site} {f.kind} in {f.stage}' for f in config.fault_injection)}")
    return asked or ["no client-level DP, no secure aggregation: the server sees each site's update"]


def _privacy(site: SiteConfig, config: RunConfig, steps: list[StepPlan]) -> PrivacyPlan:
    settings = site.privacy
    plan = PrivacyPlan(settings.enabled, settings.epsilon_budget)
    if not settings.enabled:
        return plan
    ledger = PrivacyLedger(site.privacy_ledger_path, site.site_id, settings.accountant)
    try:
        history = [entry.release for entry in ledger.entries()]
        plan.subjects = _training_subjects(site)
        delta = ledger.resolve_delta(settings.delta, default_delta(plan.subjects))
    except (LedgerError, OSError) as error:
        plan.problem = str(error)
        return plan
    plan.delta = delta
    plan.spent = epsilon_of(history, delta, settings.accountant)
    if plan.subjects < 1:
        plan.problem = "no training subject listed: every DP round would be declined"
        return plan
    for step in steps:
        if step.name == PROBES:  # probe heads train on frozen features without DP-SGD
            continue
        for server_round in range(1, step.rounds + 1):
            history.append(resolve_round(settings, step.name, server_round, plan.subjects, step.batch_size,
                                         step.local_steps, step.rounds, delta, config.name).release)
        step.epsilon_after = epsilon_of(history, delta, settings.accountant)
    plan.after = epsilon_of(history, delta, settings.accountant)
    return plan


def review_job(job: Job, site: SiteConfig) -> Review:
    config = job.recipe.config
    steps = [StepPlan(s.name, s.rounds, s.local_steps, s.resolved_batch_size, s.strategy.name,
                      _update_bytes(s.name, config.preset)) for s in config.stages]
    if config.probes.enabled:  # they run right after the MAE (or first, when the encoder is given)
        at = next((i + 1 for i, s in enumerate(steps) if s.name == "mae"), 0)
        probes = config.probes
        steps.insert(at, StepPlan(PROBES, probes.rounds, probes.local_steps, probes.batch_size, "fedavg", None))
    same: bool | None = True  # a run YAML's app is the installed one by definition
    if job.source.suffix not in (".yaml", ".yml"):
        try:
            same = fab_sha256(APP_DIR) == job.fab_sha256
        except FlowerError:
            same = None
    covering: list[Approval] = []
    if site.approval_log_path.is_file():
        covering = [a for a in ApprovalLog.of(site).approvals()
                    if a.active and a.entry.fab_sha256 == job.fab_sha256 and a.covers_recipe(job.recipe)]
    return Review(site.site_id, str(job.source), job.recipe.name, job.recipe.sha256, job.fab_sha256, job.app,
                  job.signed_by, job.trusted, same, config.preset, steps, _aggregates(config), _asked(config),
                  _privacy(site, config, steps), site.approval.required, [a.describe() for a in covering])


# --- text ------------------------------------------------------------------------------------------------------


def _size(n: int | None) -> str:
    return "a few kB" if n is None else size(n)


def render_review(review: Review) -> str:
    lines = [f"Job {review.run!r} for site {review.site_id} ({review.job})",
             f"  recipe  {review.recipe_sha256}",
             f"  app     {review.app}, Flower bundle {review.fab_sha256}"]
    if not review.signed_by:
        lines.append("  signed  no (a run YAML, or an unsigned job): check where it came from")
    elif review.signature_checked:
        lines.append(f"  signed  by the consortium key {review.signed_by} (checked against your release.pub)")
    else:
        lines.append(f"  signed  by {review.signed_by}: NOT checked; pass --public-key <your bundle>/release.pub")
    lines.append("  code    " + {True: "the same bundle as the app installed here",
                                 False: "NOT the app installed here: install the release the consortium names, read "
                                        "it, and review again",
                                 None: "could not compare with an app installed here"}[review.same_as_installed])
    lines += ["", f"What it does with this site's data (preset {review.preset}), in this order:"]
    for number, step in enumerate(review.steps, 1):
        what = NETWORKS.get(step.name, f"the {step.name} network")
        eps = f"; this site's ε reaches {step.epsilon_after:.3g}" if step.epsilon_after is not None else ""
        lines.append(f"  {number}. {step.name}: {step.rounds} rounds × {step.local_steps} local steps of batch "
                     f"{step.batch_size} ({step.strategy}) training {what}; sends {_size(step.update_bytes)}"
                     + (f" ({step.update_bytes:,} bytes)" if step.update_bytes is not None else "") + " per round"
                     + (f", {_size(step.total_bytes)} in all" if step.total_bytes is not None else "") + eps)
    total = sum(s.total_bytes or 0 for s in review.steps)
    lines += ["", "What leaves this site:",
              f"  - model updates: {_size(total)} in all (fp32 weights of each stage after local training)"]
    lines += [f"  - {item}" for item in review.aggregates]
    lines.append(f"  - never: {', '.join(NEVER_LEAVES)}")
    lines += ["", "What the recipe asks of the sites:"] + [f"  - {item}" for item in review.asked]
    lines += ["", "Privacy at this site:"]
    privacy = review.privacy
    if not privacy.enabled:
        lines.append("  - DP-SGD is off (privacy.enabled in the site file): the updates above are not noised here")
    elif privacy.problem:
        lines.append(f"  - cannot estimate ε: {privacy.problem}")
    else:
        assert privacy.after is not None
        verdict = ("within the budget" if privacy.after <= privacy.budget else
                   "ABOVE the budget: the rounds that would pass it will be declined")
        lines.append(f"  - DP-SGD on {privacy.subjects} training subjects at δ {privacy.delta:g}: ε {privacy.spent:.3g} "
                     f"spent so far, {privacy.after:.3g} after this job, of a budget of {privacy.budget:g} ({verdict})")
    lines += ["", "Approval at this site:"]
    if not review.required:
        lines.append("  - not required (approval.required: false in the site file): any job runs here")
    if review.approvals:
        lines += [f"  - already covered by {text}" for text in review.approvals]
    elif review.required:
        lines.append("  - not approved yet: `braing3n site approve SITE_YAML JOB` records it")
    return "\n".join(lines)


def render_approvals(approvals: list[Approval], log: str) -> str:
    if not approvals:
        return f"no approvals in {log}"
    lines = [f"approvals in {log}:"]
    for approval in approvals:
        entry = approval.entry
        scope = "exact" if entry.scope == "exact" else "rounds ≤ " + ",".join(f"{k}={v}" for k, v in entry.max_rounds.items())
        state = "active" if approval.active else f"REVOKED by {approval.revoked.by}" + (
            f" ({approval.revoked.reason})" if approval.revoked and approval.revoked.reason else "")
        signed = "signature checked" if entry.signed_by else "signature not checked"
        lines.append(f"  {approval.id}  {state:<10}  {entry.run!r}  {scope}  app {entry.fab_sha256[:12]}…  recipe "
                     f"{entry.recipe_sha256[:12]}…  by {entry.by} {local_time(entry.time)}  ({signed})")
    return "\n".join(lines)
