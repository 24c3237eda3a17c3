"""Federated privacy audit of a synthetic data set, and a membership-inference test of the DiT.

The synthetic scans travel to every site; each site compares them with its own scans and sends back
aggregate statistics and one flag per synthetic scan, never a distance to, or a feature of, a patient.

**Memorisation (distance to closest record).** For each synthetic scan s, in two spaces — the frozen
encoder's token maps (N·E numbers) and the preprocessed voxels (D·H·W) — the site computes
d_train(s), the RMS distance to its nearest *training* scan, and d_held(s), to its nearest *held-out*
scan (validation + test subjects: real people the models never saw). The reference is how close a
genuinely new person comes to the training set: for each held-out scan h, DCR(h) = distance to its
nearest training scan. A synthetic scan is flagged when d_train(s) is below the 1st percentile of the
DCR(h) in either space: it sits closer to a patient than new patients do, so it may be (part of) a copy.
Flagged scans are excluded from the export. A site with no held-out scans cannot calibrate and says so.

**Positive control.** Each site also plants, privately, one exact copy of a randomly chosen training
scan among the synthetic ones and reports only whether its own audit flagged it (it must), so every
audit proves it can catch the thing it looks for, at every site, without the copy leaving the site.

**Membership inference (loss threshold, Yeom et al. 2018).** A model's loss is lower on scans it trained
on if it memorised them. Two models are attacked: the DiT (its flow-matching loss) and the MAE (its
masked-reconstruction loss: the classic attack on the encoder). Each site scores its training scans
(members) and held-out scans (non-members) by the loss averaged over fixed noise or mask draws and
reports the AUC of "lower loss ⇒ member" with its counts, plus the AUCs of `BOOTSTRAP` resamplings of
its members and non-members (replicate b drawn with seed BOOTSTRAP_SEED + b at every site). The
federation's AUC is the pair-weighted mean of the sites' AUCs, which is exactly the fraction of
within-site (member, non-member) pairs ranked correctly; 0.5 means no membership signal. Its 95 %
interval is the percentile interval of the pooled replicates (replicate b pooled over sites like the AUC).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from braing3n_core.data.bids import ScanRecord
from braing3n_core.data.transforms import preprocess_scan
from braing3n_core.models import DiT, MAEEncoder, MaskedAutoencoder
from braing3n_core.models.conditions import conditions_from_labels
from braing3n_core.models.diffusion import training_loss

SPACES = ("feature", "voxel")
REFERENCE_PERCENTILE = 1.0
MIA_DRAWS = 8  # noise draws per scan for the membership score
MIA_SEED = 2024
BOOTSTRAP = 200  # resamplings of each site's members and non-members, for the pooled interval
BOOTSTRAP_SEED = 7
ATTACKS = ("dit", "mae")  # the models whose loss-threshold membership inference the audit measures


@dataclass(frozen=True)
class DistanceStats:
    """Aggregates of one space at one site (no per-patient values)."""

    threshold: float  # 1st percentile of held-out → nearest-training distances
    flagged: int
    d_train: list[float]  # 5th, 50th, 95th percentile over the synthetic scans
    d_held: list[float]
    ratio_median: float  # median over synthetic scans of d_train / d_held (≈ 1: no closer to training)
    control_flagged: bool


@dataclass(frozen=True)
class SiteAudit:
    site_id: str
    n_synthetic: int
    n_train: int
    n_held: int
    flags: list[bool]  # per synthetic scan: flagged in any space
    spaces: dict[str, DistanceStats]
    # per attacked model ("dit", "mae"; only those that came): auc, members, nonmembers, bootstrap [BOOTSTRAP]
    membership: dict[str, dict[str, Any]] = field(default_factory=dict)
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SiteAudit:
        spaces = {k: DistanceStats(**v) for k, v in data["spaces"].items()}
        return cls(**{**data, "spaces": spaces})


def rms_distances(queries: Tensor, references: Tensor, chunk: int = 64) -> Tensor:
    """RMS distance between every query row and every reference row: [Q, R] (float64 accumulate)."""
    q = queries.flatten(1).double()
    r = references.flatten(1).double()
    out = torch.empty(q.shape[0], r.shape[0], dtype=torch.float64)
    for start in range(0, q.shape[0], chunk):
        out[start:start + chunk] = torch.cdist(q[start:start + chunk], r)
    return out / math.sqrt(q.shape[1])


def _space_stats(synthetic: Tensor, train: Tensor, held: Tensor, control: Tensor) -> tuple[DistanceStats, np.ndarray]:
    d_train = rms_distances(synthetic, train).min(dim=1).values.numpy()
    d_held = rms_distances(synthetic, held).min(dim=1).values.numpy()
    reference = rms_distances(held, train).min(dim=1).values.numpy()  # DCR of genuinely new people
    threshold = float(np.percentile(reference, REFERENCE_PERCENTILE))
    flags = d_train < threshold
    control_distance = float(rms_distances(control, train).min())
    q = lambda values: [float(v) for v in np.percentile(values, [5, 50, 95])]
    ratio = d_train / np.maximum(d_held, 1e-12)
    return DistanceStats(threshold, int(flags.sum()), q(d_train), q(d_held), float(np.median(ratio)),
                         control_distance < threshold), flags


def audit_site(site_id: str, synthetic_volumes: Tensor, synthetic_tokens: Tensor, train_volumes: Tensor,
               train_tokens: Tensor, held_volumes: Tensor, held_tokens: Tensor) -> SiteAudit:
    """The memorisation audit on tensors: volumes [n, 1, D, H, W], tokens [n, N, E]."""
    n_syn = synthetic_volumes.shape[0]
    if len(train_volumes) == 0 or len(held_volumes) == 0:
        return SiteAudit(site_id, n_syn, len(train_volumes), len(held_volumes), [False] * n_syn, {},
                         note="no training or no held-out scans: this site cannot calibrate the audit")
    pick = int.from_bytes(os.urandom(4), "little") % len(train_volumes)  # the private positive control
    spaces, flags = {}, np.zeros(n_syn, dtype=bool)
    for space, (syn, train, held) in {"feature": (synthetic_tokens, train_tokens, held_tokens),
                                      "voxel": (synthetic_volumes, train_volumes, held_volumes)}.items():
        stats, space_flags = _space_stats(syn.float(), train.float(), held.float(), train[pick:pick + 1].float())
        spaces[space] = stats
        flags |= space_flags
    return SiteAudit(site_id, n_syn, len(train_volumes), len(held_volumes), flags.tolist(), spaces)


# --- membership inference ---------------------------------------------------------------------------------


@torch.no_grad()
def dit_losses(dit: DiT, tokens: Tensor, records: Sequence[ScanRecord], draws: int = MIA_DRAWS) -> np.ndarray:
    """Each scan's conditional flow-matching loss, averaged over `draws` (t, noise) draws: [n]. Draw k
    uses seed MIA_SEED + k for every scan, so members and non-members face the same noise."""
    cond = conditions_from_labels([r.labels for r in records], [r.modality for r in records])
    dit = dit.eval()
    losses = np.zeros(len(records))
    for i in range(len(records)):  # one scan per call: `training_loss` averages over its batch
        for draw in range(draws):
            generator = torch.Generator().manual_seed(MIA_SEED + draw)
            losses[i] += float(training_loss(dit, tokens[i:i + 1], cond.select(slice(i, i + 1)),
                                             p_drop=0.0, p_drop_all=0.0, generator=generator))
    return losses / draws


@torch.no_grad()
def mae_losses(mae: MaskedAutoencoder, volumes: Tensor, draws: int = MIA_DRAWS) -> np.ndarray:
    """Each scan's masked-reconstruction L1, averaged over `draws` masks: [n]. Draw k uses seed MIA_SEED + k
    for every scan, so members and non-members are masked alike."""
    mae = mae.eval()
    losses = np.zeros(len(volumes))
    for i in range(len(volumes)):  # one scan per call: the loss averages over its batch
        for draw in range(draws):
            generator = torch.Generator().manual_seed(MIA_SEED + draw)
            losses[i] += float(mae(volumes[i:i + 1].float(), generator=generator).loss)
    return losses / draws


def membership_result(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> dict[str, Any]:
    """What a site reports for one attack: its AUC, counts and bootstrap AUCs (no per-scan value)."""
    rng = [np.random.default_rng(BOOTSTRAP_SEED + b) for b in range(BOOTSTRAP)]
    m, n = np.asarray(member_losses), np.asarray(nonmember_losses)
    boots = [membership_auc(m[r.integers(0, len(m), len(m))], n[r.integers(0, len(n), len(n))]) for r in rng] \
        if len(m) and len(n) else []
    return {"auc": membership_auc(m, n), "members": float(len(m)), "nonmembers": float(len(n)), "bootstrap": boots}


def membership_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    """AUC of the score −loss for members vs non-members (Mann–Whitney, ties count ½)."""
    if len(member_losses) == 0 or len(nonmember_losses) == 0:
        return math.nan
    m = np.asarray(member_losses)[:, None]
    n = np.asarray(nonmember_losses)[None, :]
    return float(((m < n).sum() + 0.5 * (m == n).sum()) / (m.size * n.size))


def pooled_membership_auc(per_site: Sequence[Mapping[str, Any]]) -> float:
    """Pair-weighted mean of site AUCs: exactly the share of within-site pairs ranked correctly."""
    pairs = [(s["auc"], s["members"] * s["nonmembers"]) for s in per_site
             if s and math.isfinite(s.get("auc", math.nan)) and s["members"] * s["nonmembers"] > 0]
    total = sum(w for _, w in pairs)
    return sum(a * w for a, w in pairs) / total if total else math.nan


def pooled_membership(per_site: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The federation's AUC of one attack and its 95 % bootstrap interval (replicate b pooled like the AUC)."""
    usable = [s for s in per_site if s and s.get("bootstrap")]
    replicates = [pooled_membership_auc([{**s, "auc": s["bootstrap"][b]} for s in usable]) for b in range(BOOTSTRAP)] \
        if usable else []
    finite = [r for r in replicates if math.isfinite(r)]
    interval = [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))] if finite else [math.nan, math.nan]
    return {"auc": pooled_membership_auc(per_site), "ci95": interval, "sites": len(usable),
            "pairs": float(sum(s["members"] * s["nonmembers"] for s in usable))}


# --- a site's side (called by the client's `privacy_audit` query) ------------------------------------------


def site_scans(site, split_names: Sequence[str]) -> list[ScanRecord]:
    return [r for name in split_names for r in site.data.splits[name]]


def run_site_audit(site, encoder: MAEEncoder, synthetic_volumes: Tensor, dit: DiT | None = None,
                   mae: MaskedAutoencoder | None = None) -> SiteAudit:
    """Everything a site computes for the audit, from its own data (`site`: a `stages.SiteInputs` whose
    token cache belongs to `encoder`); `dit` and `mae`, when given, are attacked by membership inference."""
    assert site.tokens is not None, "the audit needs the site's token cache of the frozen encoder"
    preset, cache = site.data.preset, site.data.cache
    train = site.tokens.ensure(site_scans(site, ["train"]))
    held = site.tokens.ensure(site_scans(site, ["val", "test"]))

    def volumes(records: Sequence[ScanRecord]) -> Tensor:
        shape = (0, 1, *preset.shape)
        arrays = [torch.from_numpy(np.ascontiguousarray(preprocess_scan(r.path, preset, cache))) for r in records]
        return torch.stack(arrays) if arrays else torch.zeros(shape)

    def tokens(records: Sequence[ScanRecord]) -> Tensor:
        empty = torch.zeros(0, preset.num_tokens, encoder.config.width)
        return torch.stack([site.tokens.tokens(r) for r in records]) if records else empty

    with torch.no_grad():
        synthetic_tokens = torch.cat([encoder(synthetic_volumes[i:i + 4].float())
                                      for i in range(0, len(synthetic_volumes), 4)]) if len(synthetic_volumes) else \
            torch.zeros(0, preset.num_tokens, encoder.config.width)
    result = audit_site(site.data.config.site_id, synthetic_volumes.float(), synthetic_tokens,
                        volumes(train), tokens(train), volumes(held), tokens(held))
    membership = {}
    if dit is not None and train and held:
        membership["dit"] = membership_result(dit_losses(dit, tokens(train), train), dit_losses(dit, tokens(held), held))
    if mae is not None and train and held:
        membership["mae"] = membership_result(mae_losses(mae, volumes(train)), mae_losses(mae, volumes(held)))
    return SiteAudit(**{**result.__dict__, "membership": membership}) if membership else result


# --- the federation's view ------------------------------------------------------------------------------------


def combine_audits(audits: Sequence[SiteAudit]) -> dict[str, Any]:
    """Exclusions (flagged at any site), per-site aggregates, the pooled membership AUC."""
    if not audits:
        raise ValueError("no site returned an audit")
    n = audits[0].n_synthetic
    if any(a.n_synthetic != n for a in audits):
        raise ValueError("sites audited different numbers of synthetic scans")
    flagged = [i for i in range(n) if any(a.flags[i] for a in audits if a.spaces)]
    calibrated = [a for a in audits if a.spaces]
    return {
        "n_synthetic": n,
        "excluded": flagged,
        "sites": {a.site_id: {k: v for k, v in a.to_json().items() if k != "flags"} for a in audits},
        "calibrated_sites": len(calibrated),
        "positive_controls_caught": sum(all(s.control_flagged for s in a.spaces.values()) for a in calibrated),
        "membership": {attack: pooled_membership([a.membership[attack] for a in audits if attack in a.membership])
                       for attack in ATTACKS if any(attack in a.membership for a in audits)},
        "membership_auc": pooled_membership_auc([a.membership["dit"] for a in audits if "dit" in a.membership]),
        "criterion": f"d_train < percentile {REFERENCE_PERCENTILE:g} of held-out→training distances, "
                     "in encoder-token or voxel space (RMS distances)",
    }
