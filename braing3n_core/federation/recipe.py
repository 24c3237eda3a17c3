"""A run's recipe as a site approves it: the run YAML in canonical form, its hashes, and the check that a
request follows it.

Canonical form: the resolved `RunConfig` (stage defaults written out) as JSON data, without `source_file`,
serialised with sorted keys and no whitespace. Two YAML files that say the same thing (comments, key order,
a default written out or left implicit, `1e-3` or `0.001`) have one hash; a change to what runs (one byte
of a value) changes it. The recipe holds every setting the run YAML has: stages, rounds, local steps,
strategies, what leaves the site (probes, token moments, audits, generation scores), the client-level DP
and secure aggregation asked of the site, fault drills, `start_from` checkpoints (by path).

Shape: the canonical form with every round count blanked (`stages[*].rounds`, `probes.rounds`), for an
approval that allows more rounds of the same stages (`approvals`: scope `rounds`).

What travels: every message of a run carries its canonical recipe (`Record.JOB`, stamped by the server's
`server.transport.JobGrid`). The site hashes it itself (a hash sent by the server could be anything) and
checks the request against it (`check_request`): a stage the recipe lists, a round within its rounds, its
local steps, batch size, learning rate and preset, a query the recipe implies. A server cannot send an
approved recipe and ask for something else.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from braing3n_core.federation.protocol import Action, ProbeRoundRequest, ProtocolError, TrainRequest
from braing3n_core.federation.run_config import RunConfig
from braing3n_core.stage_names import PROBES


def canonical_bytes(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _sha256(data: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_bytes(data)).hexdigest()


@dataclass(frozen=True)
class Recipe:
    """A run configuration in its canonical form, with its two hashes."""

    config: RunConfig
    data: dict[str, Any]

    @classmethod
    def of(cls, config: RunConfig) -> Recipe:
        data = config.resolved().model_dump(mode="json", exclude={"source_file"})
        return cls(config, json.loads(canonical_bytes(data)))

    @classmethod
    def from_data(cls, data: Any) -> Recipe:
        """A recipe received (in a message or a job file): validated, then canonicalised again here."""
        if not isinstance(data, Mapping):
            raise ProtocolError(f"a recipe is a mapping, got {type(data).__name__}")
        try:
            config = RunConfig.model_validate(dict(data))
        except ValidationError as error:
            raise ProtocolError(f"the recipe is not a valid run configuration: {error.errors()[0]['msg']}") from None
        return cls.of(config)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as error:
            raise ProtocolError(f"the recipe is not JSON ({error})") from None
        return cls.from_data(data)

    def to_json(self) -> str:
        return canonical_bytes(self.data).decode()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def sha256(self) -> str:
        return _sha256(self.data)

    @property
    def shape_sha256(self) -> str:
        """The hash of everything but the round counts (what a `rounds`-scope approval pins)."""
        shape = copy.deepcopy(self.data)
        for stage in shape["stages"]:
            stage["rounds"] = None
        shape["probes"]["rounds"] = None
        return _sha256(shape)

    @property
    def rounds(self) -> dict[str, int]:
        """Rounds per federated step: each stage, and the probes when enabled."""
        rounds = {stage.name: stage.rounds for stage in self.config.stages}
        if self.config.probes.enabled:
            rounds[PROBES] = self.config.probes.rounds
        return rounds


# --- does a request follow the recipe? --------------------------------------------------------------------------


def _queries_allowed(config: RunConfig) -> set[Action]:
    """The queries a run of this recipe sends (server/: run, session, rounds, probes, audit, generation_eval)."""
    allowed = {Action.HELLO, Action.INSTALL_ENCODER}
    if any(stage.name == "dit" for stage in config.stages):
        allowed.add(Action.TOKEN_MOMENTS)
    if config.probes.enabled:
        allowed.add(Action.PROBE_CENSUS)
    if config.audit is not None:
        allowed.add(Action.PRIVACY_AUDIT)
    if config.generation_eval is not None:
        allowed.add(Action.GENERATION_SCORES)
        if config.generation_eval.forecast:
            allowed |= {Action.TREND_CENSUS, Action.FORECAST_SCORES}
    return allowed


def _differs(asked: float, recipe: float) -> bool:
    return not math.isclose(asked, recipe, rel_tol=1e-9, abs_tol=1e-12)


def _train_outside(recipe: RunConfig, config: Mapping[str, Any]) -> str | None:
    stage = str(config.get("stage", ""))
    if stage == PROBES:
        probes, request = recipe.probes, ProbeRoundRequest.from_config(config)
        if request.server_round > probes.rounds:
            return f"probes round {request.server_round}, but the recipe has {probes.rounds} probe rounds"
        if request.local_steps != probes.local_steps or request.batch_size != probes.batch_size:
            return (f"probes with {request.local_steps} local steps of batch {request.batch_size}, but the recipe says "
                    f"{probes.local_steps} of {probes.batch_size}")
        return None
    spec, request = recipe.stage(stage), TrainRequest.from_config(config)
    if request.server_round > spec.rounds or request.rounds != spec.rounds:
        return f"{stage} round {request.server_round} of {request.rounds}, but the recipe has {spec.rounds} rounds"
    if request.local_steps != spec.local_steps or request.batch_size != spec.resolved_batch_size:
        return (f"{stage} with {request.local_steps} local steps of batch {request.batch_size}, but the recipe says "
                f"{spec.local_steps} of {spec.resolved_batch_size}")
    if _differs(request.lr, spec.lr_at_round(request.server_round)) or _differs(request.weight_decay,
                                                                              spec.resolved_weight_decay):
        return f"{stage} round {request.server_round} at lr {request.lr:g}, but the recipe's schedule gives " \
               f"{spec.lr_at_round(request.server_round):g}"
    return None


def check_request(recipe: Recipe, kind: str, config: Mapping[str, Any]) -> str | None:
    """Why a request (message kind `train`/`evaluate`/`query` and its `config` record) is outside the
    recipe, or None when it follows it."""
    run = recipe.config
    preset = config.get("preset")
    if preset is not None and str(preset) != run.preset:
        return f"preset {preset!r}, but the recipe's preset is {run.preset!r}"
    if kind == "query":
        try:
            action = Action(str(config.get("action", "")))
        except ValueError:
            return f"an unknown query {config.get('action')!r}"
        if action not in _queries_allowed(run):
            return f"a {action.value} query, which this recipe does not include"
        return None
    if kind not in ("train", "evaluate"):
        return f"a {kind!r} message, which no recipe includes"
    stage = str(config.get("stage", ""))
    listed = {s.name for s in run.stages} | ({PROBES} if run.probes.enabled else set())
    if stage not in listed:
        return f"{kind} of stage {stage or '(none)'!r}, which the recipe does not list ({sorted(listed)})"
    return _train_outside(run, config) if kind == "train" else None
