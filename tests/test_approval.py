"""Site approval of jobs, at unit level (fast): the recipe's canonical hash, approval scopes, the gate the ClientApp
runs before it reads any scan, the approval log's crash safety (a writer SIGKILLed mid-write, a torn line, an
edited one), the signed job file, the review's numbers, and the Flower bundle hash as Flower computes it.

Real processes end to end: tests/test_federated_simulation.py (an unapproved virtual site refused while approved
ones train) and tests/test_deployment.py (approved SuperNodes train; a revocation refuses the next round).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from braing3n_core.config import ConfigError
from braing3n_core.federation.approval_log import ApprovalLog, ApprovalLogError
from braing3n_core.federation.approvals import NotApproved, admit
from braing3n_core.federation.protocol import DECLINED, Action, FaultDrill, JobRecipe, Query, Record, TrainRequest
from braing3n_core.federation.recipe import Recipe
from braing3n_core.federation.run_config import RunConfig
from braing3n_core.site_config import SiteConfig

REPO = Path(__file__).resolve().parents[1]
FAB = "ab" * 32  # a bundle hash (64 hex digits) for the tests that do not build one
RUN_YAML = """\
# a recipe as a person writes it: comments, short forms, defaults left out
name: approval-test
preset: tiny
min_sites: 2
stages:
  - {name: mae, rounds: 3, local_steps: 2, batch_size: 2}
  - {name: decoder, rounds: 2, local_steps: 2, strategy: fedprox}
probes: {enabled: true, rounds: 2, local_steps: 5}
"""


def recipe_of(tmp_path: Path, text: str = RUN_YAML, name: str = "run.yaml") -> Recipe:
    path = tmp_path / name
    path.write_text(text)
    return Recipe.of(RunConfig.from_yaml(path))


def site(tmp_path: Path, required: bool = True) -> SiteConfig:
    return SiteConfig.model_validate({"site_id": "site-x", "data_root": str(tmp_path / "data"),
                                      "cache_dir": str(tmp_path / "cache"), "approval": {"required": required}})


def train_config(recipe: Recipe, stage: str = "mae", server_round: int = 1, **change) -> dict:
    spec = recipe.config.stage(stage)
    request = TrainRequest(stage=stage, server_round=server_round, local_steps=spec.local_steps,
                           batch_size=spec.resolved_batch_size, lr=spec.lr_at_round(server_round),
                           weight_decay=spec.resolved_weight_decay, rounds=spec.rounds, run=recipe.name,
                           preset=recipe.config.preset, model_config={})
    return {**request.to_config(), **change}


# --- the recipe -------------------------------------------------------------------------------------------------


def test_the_recipe_hash_is_canonical_and_one_byte_of_a_value_changes_it(tmp_path: Path) -> None:
    recipe = recipe_of(tmp_path)
    # Same recipe, written differently: another comment, key order, block style, a default written out.
    same = recipe_of(tmp_path, """\
name: approval-test
min_sites: 2
preset: tiny   # the tests' preset
stages:
  - name: mae
    local_steps: 2
    rounds: 3
    batch_size: 2
    strategy: {name: fedavg}
  - {name: decoder, rounds: 2, local_steps: 2, strategy: {name: fedprox, mu: 0.01}}
probes: {enabled: true, rounds: 2, local_steps: 5}
seed: 0
""", "same.yaml")
    assert same.sha256 == recipe.sha256 and same.to_json() == recipe.to_json()
    # One byte of what runs: another recipe (and another shape: it is not a round count).
    changed = recipe_of(tmp_path, RUN_YAML.replace("local_steps: 2, batch_size: 2", "local_steps: 3, batch_size: 2"),
                        "changed.yaml")
    assert changed.sha256 != recipe.sha256 and changed.shape_sha256 != recipe.shape_sha256
    # Round counts change the recipe, not its shape.
    longer = recipe_of(tmp_path, RUN_YAML.replace("rounds: 3", "rounds: 5"), "longer.yaml")
    assert longer.sha256 != recipe.sha256 and longer.shape_sha256 == recipe.shape_sha256
    assert longer.rounds == {"mae": 5, "decoder": 2, "probes": 2}
    # What travels is read back to the same recipe.
    assert Recipe.from_json(recipe.to_json()).sha256 == recipe.sha256


# --- the log and the gate ----------------------------------------------------------------------------------------


def test_an_exact_approval_covers_its_recipe_only_and_a_rounds_approval_more_rounds_of_the_same_stages(tmp_path: Path) -> None:
    recipe = recipe_of(tmp_path)
    log = ApprovalLog(tmp_path / "approvals.jsonl", "site-x")
    exact = log.approve(FAB, recipe, "dr-a")
    longer = recipe_of(tmp_path, RUN_YAML.replace("rounds: 3", "rounds: 5"), "longer.yaml")
    assert exact.covers_recipe(recipe) and not exact.covers_recipe(longer)
    ranged = log.approve(FAB, recipe, "dr-a", max_rounds={"mae": 5})
    assert ranged.entry.max_rounds == {"mae": 5, "decoder": 2, "probes": 2} and ranged.entry.scope == "rounds"
    assert ranged.covers_recipe(recipe) and ranged.covers_recipe(longer)
    assert not ranged.covers_recipe(recipe_of(tmp_path, RUN_YAML.replace("rounds: 3", "rounds: 6"), "six.yaml"))
    assert not ranged.covers_recipe(recipe_of(tmp_path, RUN_YAML.replace("rounds: 2, local_steps: 2", "rounds: 3, "
                                                                         "local_steps: 2"), "decoder3.yaml"))
    assert not ranged.covers_recipe(recipe_of(tmp_path, RUN_YAML.replace("local_steps: 5", "local_steps: 6"), "p.yaml"))
    with pytest.raises(ApprovalLogError, match="max rounds given for \\['dit'\\], which recipe 'approval-test' does not run"):
        log.approve(FAB, recipe, "dr-a", max_rounds={"dit": 4})
    with pytest.raises(ApprovalLogError, match="below recipe 'approval-test'"):
        log.approve(FAB, recipe, "dr-a", max_rounds={"mae": 2})
    with pytest.raises(ApprovalLogError, match="not a bundle hash"):
        log.approve("deadbeef", recipe, "dr-a")
    assert [a.id for a in log.approvals()] == [exact.id, ranged.id]
    revoked = log.revoke(exact.id[:5], "dr-b", "wrong cohort")
    assert not revoked.active and revoked.revoked.by == "dr-b"
    assert [a.active for a in ApprovalLog(tmp_path / "approvals.jsonl", "site-x").approvals()] == [False, True]
    with pytest.raises(ApprovalLogError, match="already revoked"):
        log.revoke(exact.id, "dr-b")
    with pytest.raises(ApprovalLogError, match="no approval with id 'ffff'"):
        log.revoke("ffff", "dr-b")


def test_the_gate_names_what_is_missing_and_checks_each_request_against_the_recipe(tmp_path: Path) -> None:
    recipe, config = recipe_of(tmp_path), site(tmp_path)
    called = []

    def fab() -> str:
        called.append(1)
        return FAB

    def gate(kind: str = "train", request: dict | None = None, recipe_json: str | None = recipe.to_json()):
        return admit(config, fab, recipe_json, kind, train_config(recipe) if request is None else request)

    assert admit(site(tmp_path, required=False), fab, None, "train", {}) is None and not called  # nothing asked
    with pytest.raises(NotApproved, match="site site-x: job not approved: the message carries no recipe"):
        gate(recipe_json=None)
    with pytest.raises(NotApproved, match=f"no approval in {config.approval_log_path} for the app ababab"):
        gate()
    log = ApprovalLog.of(config)
    other = recipe_of(tmp_path, RUN_YAML.replace("rounds: 3", "rounds: 4"), "other.yaml")
    first = log.approve(FAB, other, "dr-a")
    with pytest.raises(NotApproved, match=f"recipe 'approval-test' {recipe.sha256[:12]}… of app ababab.*not covered by "
                                          f"this site's approvals of that app \\({first.id}\\)"):
        gate()
    approval = log.approve(FAB, recipe, "dr-a")
    assert gate().id == approval.id
    # Requests outside the approved recipe are refused even though the recipe is approved.
    outside = {
        "round 4 of a 3-round stage": train_config(recipe, server_round=4),
        "more local steps": train_config(recipe, **{"local-steps": 20}),
        "another learning rate": train_config(recipe, lr=0.5),
        "another preset": train_config(recipe, preset="small"),
        "a stage the recipe lacks": {**train_config(recipe), "stage": "dit"},
    }
    for why, request in outside.items():
        with pytest.raises(NotApproved) as refused:
            gate(request=request)
        assert "request outside the approved recipe 'approval-test': the server asked for" in str(refused.value), why
    with pytest.raises(NotApproved, match="a token_moments query, which this recipe does not include"):
        gate("query", {**Query(action=Action.TOKEN_MOMENTS, preset="tiny").to_config()})
    assert gate("query", Query(action=Action.PROBE_CENSUS, preset="tiny").to_config()).id == approval.id
    assert gate("evaluate", {"stage": "decoder", "preset": "tiny"}).id == approval.id
    # A revocation takes effect at the next message; nothing is cached between messages.
    log.revoke(approval.id, "dr-b", "consent withdrawn")
    with pytest.raises(NotApproved, match=f"approval {approval.id} .* was revoked by dr-b on .*\\(consent withdrawn\\)"):
        gate()
    # A bundle hash that cannot be computed, and an edited log, refuse every job (fail closed).
    def changed_bundle() -> str:
        raise RuntimeError("changed")

    with pytest.raises(NotApproved, match="the app's bundle hash cannot be computed \\(changed\\)"):
        admit(config, changed_bundle, recipe.to_json(), "train", train_config(recipe))
    lines = config.approval_log_path.read_text().splitlines()
    config.approval_log_path.write_text("\n".join([lines[0].replace('"dr-a"', '"dr-z"'), *lines[1:]]) + "\n")
    with pytest.raises(NotApproved, match="line 1 was changed after it was written"):
        gate()


def test_a_torn_last_line_is_dropped_and_an_edited_or_removed_entry_is_refused(tmp_path: Path) -> None:
    recipe, path = recipe_of(tmp_path), tmp_path / "approvals.jsonl"
    log = ApprovalLog(path, "site-x")
    for by in ("a", "b", "c"):
        log.approve(FAB, recipe, by)
    whole = path.read_bytes()
    line = log.entries()[-1].line()
    with open(path, "ab") as handle:  # the writer died in the middle of a fourth entry
        handle.write(line[: len(line) // 2])
    assert [e.by for e in ApprovalLog(path, "site-x").entries()] == ["a", "b", "c"]
    log.approve(FAB, recipe, "d")  # the torn bytes are dropped under the lock, the chain continues
    assert path.read_bytes().startswith(whole) and [e.by for e in log.entries()] == ["a", "b", "c", "d"]
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    with pytest.raises(ApprovalLogError, match="line 2 does not follow line 1 \\(hash chain broken"):
        log.approvals()
    (tmp_path / "copied.jsonl").write_bytes(whole)  # another site's log is not this site's
    with pytest.raises(ApprovalLogError, match="belongs to site 'site-x', not 'site-y'"):
        ApprovalLog(tmp_path / "copied.jsonl", "site-y").approvals()


WRITER = """
import sys
from braing3n_core.federation.approval_log import ApprovalLog
class R:
    name, sha256, shape_sha256, rounds = "killed", "cd" * 32, "ef" * 32, {"mae": 1}
log = ApprovalLog(sys.argv[1], "site-x")
for n in range(100000):
    approval = log.approve("ab" * 32, R(), "writer-%d" % n, job="x" * 4000)  # ~5 kB lines
    print(approval.id, flush=True)  # returned: durable
"""


def test_the_approval_log_survives_a_writer_killed_mid_write(tmp_path: Path) -> None:
    path = tmp_path / "approvals.jsonl"
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not path.is_file() or path.read_bytes().count(b"\n") < 20):
            assert child.poll() is None, "the writer exited early"
            time.sleep(0.01)
    finally:
        os.kill(child.pid, signal.SIGKILL)  # mid-approval: reading, appending or fsyncing
        child.wait()
    done = child.stdout.read().split()
    log = ApprovalLog(path, "site-x")
    entries = log.entries()  # verified: an intact chain, a torn tail skipped
    # Every approval that returned is there, in order; at most one more (fsynced, killed before it printed its id).
    assert len(entries) >= 20 and [e.id for e in entries[: len(done)]] == done and len(entries) - len(done) <= 1
    after = log.approve("ab" * 32, recipe_of(tmp_path), "after-the-crash")  # the lock died with the writer
    assert log.entries()[-1].id == after.id and log.entries()[-1].prev == entries[-1].sha256


# --- the ClientApp's gate, before any data ------------------------------------------------------------------------


def test_the_client_app_refuses_an_unapproved_job_before_reading_anything(synthetic_cohort, tmp_path: Path) -> None:
    from client.app import app as client_app
    from client.fab import running_fab_sha256

    source = SiteConfig.from_yaml(synthetic_cohort[0])
    data = {**source.to_yaml_dict(), "cache_dir": str(tmp_path / "cache"), "approval": {"required": True,
                                                                                           "log": str(tmp_path / "log.jsonl")}}
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(data))
    config = SiteConfig.from_yaml(tmp_path / "site.yaml")
    recipe = recipe_of(tmp_path)
    context = Context(run_id=1, node_id=1, node_config={"site-config": str(tmp_path / "site.yaml")}, state=RecordDict(),
                      run_config={})

    def send(message_type: str, request: dict) -> Message:
        metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                            group_id="1", created_at=0.0, ttl=3600.0, message_type=message_type)
        content = RecordDict({Record.CONFIG: ConfigRecord(request), Record.JOB: ConfigRecord(
            JobRecipe(recipe=recipe.to_json()).to_config())})
        return client_app(Message(content, metadata=metadata), context)

    hello = send("query", Query(action=Action.HELLO, preset="tiny").to_config())
    assert hello.has_error() and hello.error.code == DECLINED
    assert hello.error.reason.startswith(f"site {source.site_id}: job not approved: no approval in {tmp_path / 'log.jsonl'} "
                                         "for the app")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["activity.jsonl"]  # the journal, nothing else
    journal = [json.loads(line) for line in (tmp_path / "cache" / "activity.jsonl").read_text().splitlines()]
    assert journal[-1]["message"] == "query:hello" and "job not approved" in journal[-1]["reason"]
    # Approved: the gate lets the message through to the handler (here a drill that declines before any data).
    ApprovalLog.of(config).approve(running_fab_sha256(), recipe, "dr-a")
    drill = send("train", {**train_config(recipe), **FaultDrill(fault="decline").to_config()})
    assert drill.error.reason == f"site {source.site_id}: declines this round (fault injection)"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["activity.jsonl"]


# --- the job file and the review -----------------------------------------------------------------------------------


def test_a_signed_job_file_is_checked_and_a_changed_one_refused(tmp_path: Path) -> None:
    from braing3n_core.ops.consortium import init_consortium
    from braing3n_core.ops.job_file import JobSignatureError, read_job, write_job

    consortium = init_consortium(tmp_path / "fl", ["site-x"], "fl.example")
    other = init_consortium(tmp_path / "other", ["site-x"], "fl.example")
    (tmp_path / "run.yaml").write_text(RUN_YAML)
    written = write_job(consortium.layout.root, tmp_path / "run.yaml")
    assert written.source.parent == consortium.layout.root / "jobs" and written.source.name.endswith(".job.json")
    job = read_job(written.source, consortium.layout.bundle("site-x") / "release.pub")
    assert job.trusted and job.recipe.sha256 == recipe_of(tmp_path).sha256 and job.fab_sha256 == written.fab_sha256
    assert job.app == "braing3n/braing3n-fl 0.1.0" and len(job.fab_sha256) == 64
    assert not read_job(written.source).trusted  # read, signature valid, but not checked against a trusted key
    with pytest.raises(JobSignatureError, match="not by the consortium key"):
        read_job(written.source, other.layout.release_pub)
    document = json.loads(written.source.read_text())
    document["payload"]["recipe"]["stages"][0]["rounds"] = 30  # edited: the recipe no longer matches its hash
    (tmp_path / "edited.job.json").write_text(json.dumps(document))
    with pytest.raises(JobSignatureError, match="it was edited after it was written"):
        read_job(tmp_path / "edited.job.json")
    document["payload"]["recipe_sha256"] = Recipe.from_data(document["payload"]["recipe"]).sha256  # consistent again
    (tmp_path / "edited.job.json").write_text(json.dumps(document))
    with pytest.raises(JobSignatureError, match="bad signature"):
        read_job(tmp_path / "edited.job.json")
    with pytest.raises(JobSignatureError, match="a run YAML is not signed"):  # refused before any bundle is built
        read_job(tmp_path / "run.yaml", consortium.layout.release_pub)
    with pytest.raises(ConfigError, match="no consortium.json"):
        write_job(tmp_path / "other" / "jobs", tmp_path / "run.yaml")


def test_the_review_counts_bytes_from_the_preset_and_epsilon_with_the_site_accountant(synthetic_cohort, tmp_path: Path) -> None:
    from opacus.accountants import RDPAccountant

    from braing3n_core.data.datasets import load_site
    from braing3n_core.federation.arrays import module_arrays
    from braing3n_core.jobs.review import render_review, review_job
    from braing3n_core.ops.job_file import Job
    from braing3n_core.presets import get_preset
    from braing3n_core.training.stages import get_stage

    source = SiteConfig.from_yaml(synthetic_cohort[0])
    config = SiteConfig.model_validate({**source.to_yaml_dict(), "cache_dir": str(tmp_path / "cache"), "privacy": {
        "enabled": True, "epsilon_budget": 50.0, "delta": 1e-5, "ledger": str(tmp_path / "ledger.jsonl"),
        "stages": {"decoder": {"noise_multiplier": 1.5}}}, "approval": {"required": True}})
    recipe = recipe_of(tmp_path)
    review = review_job(Job(tmp_path / "run.yaml", recipe, FAB, "braing3n/braing3n-fl 0.1.0"), config)
    steps = {s.name: s for s in review.steps}
    assert [s.name for s in review.steps] == ["mae", "probes", "decoder"]  # probes right after the MAE
    mae = get_stage("mae").build(get_preset("tiny"))
    assert steps["mae"].update_bytes == sum(4 * p.numel() for p in mae.state_dict().values()) == sum(
        a.nbytes for a in module_arrays(mae).values())
    assert steps["mae"].total_bytes == 3 * steps["mae"].update_bytes and steps["probes"].update_bytes is None
    subjects = {r.subject for r in load_site(config, get_preset("tiny"), prepare=False, progress=False).splits["train"]}
    assert review.privacy.subjects == len(subjects) >= 2
    # mae: σ 1 (the default stage), q = batch / n, 2 steps per round, 3 rounds: Opacus' own accountant agrees.
    accountant = RDPAccountant()
    accountant.history = [(1.0, 2 / len(subjects), 2 * 3)]
    assert steps["mae"].epsilon_after == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-6)
    assert review.privacy.after == steps["decoder"].epsilon_after > steps["mae"].epsilon_after  # composed, not added
    text = render_review(review)
    assert "not approved yet" in text and "never: scans or images" in text and f"{review.privacy.after:.3g} after this job" in text
    assert f"({steps['mae'].update_bytes:,} bytes) per round" in text
    assert f"{3 * steps['mae'].update_bytes / 1e6:.1f} MB in all" in text or f"{3 * steps['mae'].update_bytes / 1e3:.1f} kB in all" in text


# --- the bundle hash, as Flower computes it --------------------------------------------------------------------------


def test_the_bundle_hash_is_flowers_and_survives_installation(tmp_path: Path) -> None:
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.install import install_from_fab

    from client.fab import fab_sha256, installed_fab_sha256

    app = tmp_path / "app"
    shutil.copytree(REPO, app, ignore=shutil.ignore_patterns(".venv", ".git", "tests", "bench", "docs", "runs"))
    (app / ".venv" / "lib").mkdir(parents=True)  # what Flower never ships, and fab_sha256 does not walk
    (app / ".venv" / "lib" / "site.py").write_text("x = 1\n")
    (app / "client" / "__pycache__").mkdir(exist_ok=True)
    (app / "client" / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\0")
    bundle = build_fab_from_disk(app)  # what `flwr run` submits
    digest = hashlib.sha256(bundle).hexdigest()
    assert fab_sha256(app) == digest
    installed = install_from_fab(bundle, tmp_path / "home", skip_prompt=True)  # what a SuperNode runs the app from
    assert installed.name.endswith(digest[:8]) and installed_fab_sha256(installed) == digest
    with open(installed / "client" / "app.py", "a") as handle:
        handle.write("\n# changed after installation\n")
    fab_sha256.cache_clear()
    with pytest.raises(RuntimeError, match="were changed after Flower installed them"):
        installed_fab_sha256(installed)


def test_flowers_clipping_mod_still_sees_one_config_record_beside_the_recipe(tmp_path: Path) -> None:
    """The recipe travels as a second ConfigRecord; Flower's client-side clipping refuses more than one."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, MetricRecord

    from braing3n_core.federation.protocol import ClientClipping
    from client.mods import privacy_mod

    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1",
                        created_at=0.0, ttl=3600.0, message_type="train")
    config = {**ClientClipping(client_dp_clipping="fixed").to_config(), "clipping_norm": 1.0}
    sent = Message(RecordDict({Record.CONFIG: ConfigRecord(config), Record.ARRAYS: ArrayRecord({"w": Array(np.zeros(4, np.float32))}),
                               Record.JOB: ConfigRecord(JobRecipe(recipe=recipe_of(tmp_path).to_json()).to_config())}),
                   metadata=metadata)

    def handler(msg: Message, _context: Context) -> Message:
        assert Record.JOB in msg.content.config_records  # our handler (and its gate) still gets the recipe
        return Message(RecordDict({Record.ARRAYS: ArrayRecord({"w": Array(np.full(4, 3.0, np.float32))}),
                                   Record.METRICS: MetricRecord({"num-examples": 1.0})}), reply_to=msg)

    reply = privacy_mod(sent, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}), handler)
    assert not reply.has_error(), reply.error.reason
    assert np.linalg.norm(reply.content[Record.ARRAYS]["w"].numpy()) == pytest.approx(1.0)  # clipped to C
