"""A real deployment on loopback: `braing3n consortium serve` (flower-superlink with TLS and SuperNode
authentication), one `braing3n site join` (flower-supernode) per site, `braing3n consortium run`.

Every process is one of Flower's own, started through our CLI wrappers in their own sessions and
stopped with everything under them by PID. Both sites require approval of the jobs they run
(`approval.required`): each job is written and signed by the consortium (`consortium job`) and approved by
each site for its app (the Flower bundle hash, recomputed by the real SuperNode's ClientApp from the bundle
Flower installed) and its recipe. Two federated jobs share the deployment:
- `trained`: 2 sites × mae → decoder → dit (`tiny`), with site-a's SuperNode SIGKILLed while its
  first training message is out and restarted at once: Flower keeps the crashed session "online" for up
  to two missed heartbeats, the restarted SuperNode is let back in after that, and the server sends it
  the lost message again, so every (stage, round, site) still trains exactly once;
- `restarted`: a 2-round MAE job with a slow site (a `delay` fault longer than `round_timeout_s` in round
  1) whose server side (SuperLink, ServerApp, `consortium run`) is SIGKILLed after round 1 and then
  restarted and resubmitted: it resumes after round 1 without changing or repeating a committed round.
  While the server is down, site-a revokes its approval of the job: its SuperNode refuses round 2, before
  touching its cache, and the round goes on with site-b.
Alone on 2 idle cores these take about 5 minutes; most of it is one ClientApp process per message
(~4 s of imports each), the ≤ 60 s before Flower lets a crashed SuperNode back in, and the slow round.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from braing3n_core.federation.approval_log import ApprovalLog
from braing3n_core.fileio import file_sha256
from braing3n_core.ops.consortium import add_site, init_consortium, load_consortium
from braing3n_core.ops.deploy import _listed_nodes, stop
from braing3n_core.ops.flower import descendants, free_port
from braing3n_core.ops.job_file import read_job, write_job
from braing3n_core.ops.release import verify_directory
from braing3n_core.site_config import SiteConfig

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "braing3n_core.cli"]


@dataclass
class Deployment:
    root: Path
    consortium: Path
    port: int
    sites: dict[str, Path]  # site id → site YAML
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)  # name → running wrapper
    logs: dict[str, Path] = field(default_factory=dict)  # name → output of its latest start
    starts: Counter = field(default_factory=Counter)

    @property
    def superlink(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, name: str, *args: str) -> subprocess.Popen:
        """Start `braing3n ARGS` in its own session; its output goes to `<name>-<n>.log`."""
        self.starts[name] += 1
        log = self.root / f"{name}-{self.starts[name]}.log"
        with open(log, "wb") as handle:
            process = subprocess.Popen([*CLI, *args], stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes[name] = process
        self.logs[name] = log
        return process

    def serve(self) -> subprocess.Popen:
        process = self.start("serve", "consortium", "serve", str(self.consortium), "--address", "127.0.0.1",
                             "--port", str(self.port))
        wait_for(lambda: "listening on" in self.logs["serve"].read_text(), 120, process, self.logs["serve"])
        return process

    def join(self, site: str, rejoin_wait: float = 120.0) -> subprocess.Popen:
        return self.start(f"join-{site}", "site", "join", str(self.sites[site]), "--credentials",
                          str(self.consortium / "sites" / site), "--superlink", self.superlink,
                          "--port", str(free_port()), "--rejoin-wait", str(rejoin_wait))

    def connected(self, site: str, timeout: float = 120.0) -> None:
        name = f"join-{site}"
        wait_for(lambda: "connected to" in self.logs[name].read_text(), timeout, self.processes[name], self.logs[name])

    def crash(self, name: str) -> None:
        """SIGKILL a wrapper and every process under it at once (a machine losing power)."""
        process = self.processes.pop(name)
        tree = [process.pid] + descendants(process.pid)
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()

    def stop_all(self) -> None:
        for name in list(self.processes):
            stop(self.processes.pop(name))


def wait_for(condition, timeout: float, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"process exited with {process.returncode}: {log.read_text()[-3000:] if log else ''}")
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s; {log.read_text()[-3000:] if log else ''}")


def site_yaml(source: Path, folder: Path, site_id: str | None = None) -> Path:
    site = SiteConfig.from_yaml(source)
    site_id = site_id or site.site_id
    data = {**site.to_yaml_dict(), "site_id": site_id, "cache_dir": str(folder / "cache" / site_id),
            "approval": {"required": True}}
    path = folder / f"{site_id}.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def deployment(synthetic_cohort, tmp_path_factory):
    root = tmp_path_factory.mktemp("deployment")
    consortium = root / "consortium"
    init_consortium(consortium, ["site-a", "site-b", "site-c"], "localhost")
    sites = {path.stem: site_yaml(path, root / "sites") for path in synthetic_cohort}
    sites["site-c"] = site_yaml(synthetic_cohort[0], root / "sites", "site-c")  # a third hospital, revoked below
    deployed = Deployment(root, consortium, free_port(), sites)
    started = time.perf_counter()
    try:
        deployed.serve()
        for site in ("site-a", "site-b"):
            deployed.join(site)
        for site in ("site-a", "site-b"):
            deployed.connected(site)
        print(f"deployment up in {time.perf_counter() - started:.1f} s (SuperLink, 3 registrations, 2 SuperNodes)")
        yield deployed
    finally:
        deployed.stop_all()


def test_every_site_key_is_registered_and_the_superlink_speaks_tls_only(deployment) -> None:
    registrations = json.loads((deployment.consortium / "state" / "registrations.json").read_text())
    assert sorted(registrations) == ["site-a", "site-b", "site-c"]
    listed = _listed_nodes(load_consortium(deployment.consortium))
    assert {listed[registrations[s]["node_id"]] for s in ("site-a", "site-b")} == {"online"}
    # A client that does not trust the consortium CA cannot even finish the TLS handshake.
    with socket.create_connection(("127.0.0.1", deployment.port)) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ssl.create_default_context().wrap_socket(raw, server_hostname="localhost")


def flower_supernode(*args: str, home: Path, timeout: float = 180) -> tuple[int, str]:
    """Run flower-supernode directly (output to a file: its SuperExec child would hold a pipe open)."""
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    log = home / f"supernode-{time.monotonic_ns()}.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen([str(Path(sys.executable).parent / "flower-supernode"), *args], stdout=handle,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        status = process.wait(timeout=timeout)
    finally:
        stop(process)
    return status, log.read_text()


def test_a_plaintext_client_is_refused(deployment, tmp_path: Path) -> None:
    status, output = flower_supernode("--insecure", "--superlink", deployment.superlink, "--port", str(free_port()),
                                      "--max-retries", "1", "--max-wait-time", "5", home=tmp_path)
    assert status != 0 and "Exit Code: 305" in output and "SuperNode ID" not in output
    # Authentication over plaintext is refused by Flower before it connects at all.
    key = deployment.consortium / "sites" / "site-a" / "supernode.key"
    status, output = flower_supernode("--insecure", "--superlink", deployment.superlink, "--port", str(free_port()),
                                      "--auth-supernode-private-key", str(key), home=tmp_path)
    assert status != 0 and "Exit Code: 303" in output


def test_an_unregistered_key_is_refused(deployment) -> None:
    """A bundle the consortium never registered (its key is unknown to the SuperLink) cannot join."""
    own = ec.generate_private_key(ec.SECP384R1())
    stranger = deployment.root / "stranger.pub"
    stranger.write_bytes(own.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    add_site(deployment.consortium, "site-x")  # a bundle on disk, never registered (serve is not restarted)
    deployment.sites["site-x"] = site_yaml(deployment.sites["site-a"], deployment.root / "sites", "site-x")
    process = deployment.join("site-x", rejoin_wait=0)
    assert process.wait(timeout=180) == 1
    output = deployment.logs["join-site-x"].read_text()
    assert "refuses this site's key" in output and "connected to" not in output
    assert "No SuperNode found with the given public key" in (deployment.consortium / "state" / "superlink.log").read_text()


def test_a_revoked_site_is_stopped_and_refused(deployment) -> None:
    deployment.join("site-c")
    deployment.connected("site-c")
    node = json.loads((deployment.consortium / "state" / "registrations.json").read_text())["site-c"]["node_id"]
    revoke = subprocess.run([*CLI, "consortium", "revoke", str(deployment.consortium), "site-c"], capture_output=True,
                            text=True, timeout=180, check=False)
    assert revoke.returncode == 0, revoke.stderr
    assert f"flwr supernode unregister {node} consortium" in revoke.stdout
    assert load_consortium(deployment.consortium).sites["site-c"].revoked
    assert _listed_nodes(load_consortium(deployment.consortium))[node] == "unregistered"
    # Flower stops the connected SuperNode of a revoked key by itself (its next heartbeat is refused) …
    deployment.processes["join-site-c"].wait(timeout=120)
    assert "stopped" in deployment.logs["join-site-c"].read_text()
    # … and a restart is refused.
    process = deployment.join("site-c", rejoin_wait=0)
    assert process.wait(timeout=180) == 1 and "refuses this site's key" in deployment.logs["join-site-c"].read_text()


TRAINED = {
    "name": "deployed", "preset": "tiny", "seed": 0, "min_sites": 2, "round_timeout_s": 240, "update_norm_bound": 100.0,
    "stages": [
        {"name": "mae", "rounds": 1, "local_steps": 2, "batch_size": 2},
        {"name": "decoder", "rounds": 1, "local_steps": 2, "batch_size": 2},
        {"name": "dit", "rounds": 1, "local_steps": 2, "batch_size": 4},
    ],
}


def _first(path: Path, predicate) -> dict | None:
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if predicate(record):
            return record
    return None


def approve(deployment: Deployment, run_yaml: Path, sites: tuple[str, ...]) -> dict[str, str]:
    """The consortium writes and signs the job; each site checks the signature with its bundle and approves it."""
    job = write_job(deployment.consortium, run_yaml)
    approvals = {}
    for site in sites:
        checked = read_job(job.source, deployment.consortium / "sites" / site / "release.pub")
        config = SiteConfig.from_yaml(deployment.sites[site])
        approvals[site] = ApprovalLog.of(config).approve(checked.fab_sha256, checked.recipe, f"dpo@{site}",
                                                         signed_by=checked.signed_by, job=str(job.source)).id
    return approvals


@pytest.fixture(scope="module")
def trained(deployment) -> dict:
    (deployment.root / "trained.yaml").write_text(yaml.safe_dump(TRAINED))
    approve(deployment, deployment.root / "trained.yaml", ("site-a", "site-b"))
    run_dir = deployment.root / "trained"
    started = time.perf_counter()
    submit = deployment.start("run-trained", "consortium", "run", str(deployment.consortium), "--run-config",
                              str(deployment.root / "trained.yaml"), "--out", str(run_dir), "--expect-sites", "2")
    out_to_a = lambda r: r["direction"] == "out" and r["stage"] == "mae" and r["type"] == "train" and r["site"] == "site-a"
    wait_for(lambda: _first(run_dir / "messages.jsonl", out_to_a) is not None, 300, submit, deployment.logs["run-trained"])
    time.sleep(2.0)  # its ClientApp is running now
    killed_at = time.perf_counter()
    deployment.crash("join-site-a")
    deployment.join("site-a")  # restarted at once; Flower lets it back in once the old session expired
    assert submit.wait(timeout=900) == 0, deployment.logs["run-trained"].read_text()[-3000:]
    deployment.processes.pop("run-trained")
    print(f"trained run: {time.perf_counter() - started:.0f} s (site-a killed after {killed_at - started:.0f} s)")
    return {"dir": run_dir, "seconds": time.perf_counter() - started, "killed_after": killed_at - started,
            "output": deployment.logs["run-trained"].read_text(), "rejoin_log": deployment.logs["join-site-a"].read_text()}


def test_tls_and_authenticated_sites_train_all_three_stages(deployment, trained) -> None:
    run_dir = trained["dir"]
    complete = json.loads((run_dir / "run_complete.json").read_text())
    assert complete["sites"] == ["site-a", "site-b"]
    state = json.loads((run_dir / "server_state.json").read_text())
    assert all(state["stages"][s]["done"] and state["stages"][s]["completed_round"] == 1 for s in ("mae", "decoder", "dit"))
    trains = Counter((r["stage"], r["round"], r["site"]) for r in records(run_dir) if r["kind"] == "train")
    assert trains == Counter({(s, 1, site): 1 for s in ("mae", "decoder", "dit") for site in ("site-a", "site-b", "aggregate")})
    evaluations = {(r["stage"], r["site"]) for r in records(run_dir) if r["kind"] == "evaluate"}
    assert {("dit", "site-a"), ("dit", "site-b"), ("decoder", "aggregate")} <= evaluations
    # The ServerApp signed the release with the consortium key; sites verify it with their bundle's release.pub.
    report = verify_directory(run_dir / "release", deployment.consortium / "sites" / "site-a" / "release.pub")
    assert report.ok and report.trusted, report.summary()
    assert report.metadata["sites"] == ["site-a", "site-b"] and report.metadata["stages"]["dit"]["done"]
    link_log = (deployment.consortium / "state" / "superlink.log").read_text()
    assert f"Uvicorn running on https://127.0.0.1:{deployment.port}" in link_log
    assert "flwr run" in trained["output"] and "signing-key=" in trained["output"]


def test_a_supernode_killed_mid_round_rejoins_and_the_round_completes(trained) -> None:
    lines = records(trained["dir"])
    resent = [r for r in lines if r["kind"] == "resent"]
    assert [(r["stage"], r["round"], r["site"]) for r in resent] == [("mae", 1, "site-a")], resent
    assert not [r for r in lines if r["kind"] == "declined"]
    aggregate = next(r for r in lines if r["kind"] == "train" and r["site"] == "aggregate" and r["stage"] == "mae")
    assert aggregate["sites"] == 2
    # The restarted SuperNode was refused while its crashed session still counted as online, then let in
    # under the same node id (bound to the site's key).
    assert "connected to" in trained["rejoin_log"]
    node_ids = set(re.findall(r"as SuperNode (\d+)", trained["rejoin_log"]))
    assert len(node_ids) == 1


def test_a_tampered_release_is_detected_by_verify(deployment, trained, tmp_path: Path) -> None:
    public = deployment.consortium / "sites" / "site-b" / "release.pub"
    copy = tmp_path / "release"
    shutil.copytree(trained["dir"] / "release", copy)
    weights = copy / "checkpoints" / "dit" / "final.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    verify = subprocess.run([*CLI, "verify", str(copy), "--public-key", str(public)], capture_output=True, text=True, timeout=120, check=False)
    assert verify.returncode == 1 and "changed hash: checkpoints/dit/final.safetensors" in verify.stdout
    manifest = json.loads((copy / "RELEASE.json").read_text())
    manifest["payload"]["metadata"]["sites"] = ["site-a", "site-b", "site-z"]
    (copy / "RELEASE.json").write_text(json.dumps(manifest))
    verify = subprocess.run([*CLI, "verify", str(copy), "--public-key", str(public)], capture_output=True, text=True, timeout=120, check=False)
    assert verify.returncode == 1 and "bad signature: RELEASE.json" in verify.stdout


ROUND_TIMEOUT_S = 60.0  # above a normal exchange even on a loaded 2-core host (each message starts a ClientApp process)
DELAY_S = 75.0
RESTARTED = {
    "name": "restarted", "preset": "tiny", "seed": 1, "min_sites": 1, "round_timeout_s": ROUND_TIMEOUT_S,
    "stages": [{"name": "mae", "rounds": 2, "local_steps": 1, "batch_size": 2, "evaluate_every": 0}],
    "fault_injection": [{"site": "site-b", "stage": "mae", "kind": "delay", "factor": DELAY_S, "until_round": 1}],
}


def cache_files(site: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file of a site's cache but its journal and Flower's own folder."""
    root = SiteConfig.from_yaml(site).resolved_cache_dir
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and p.name != "activity.jsonl" and p.relative_to(root).parts[0] != "flower-home"}


@pytest.fixture(scope="module")
def restarted(deployment, trained) -> dict:
    (deployment.root / "restarted.yaml").write_text(yaml.safe_dump(RESTARTED))
    approvals = approve(deployment, deployment.root / "restarted.yaml", ("site-a", "site-b"))
    run_dir = deployment.root / "restarted"
    submit_args = ["consortium", "run", str(deployment.consortium), "--run-config",
                   str(deployment.root / "restarted.yaml"), "--out", str(run_dir), "--expect-sites", "2", "--no-sign"]
    submit = deployment.start("run-restarted", *submit_args)
    marker = run_dir / "checkpoints" / "mae" / "round-0001.json"
    wait_for(marker.is_file, 600, submit, deployment.logs["run-restarted"])
    deployment.crash("run-restarted")  # the server side goes down: the wrapper, SuperLink, SuperExec, ServerApp
    deployment.crash("serve")
    committed = {p.name: file_sha256(p) for p in sorted((run_dir / "checkpoints" / "mae").glob("round-*"))}
    assert not (run_dir / "run_complete.json").exists()
    # While the server is down, site-a withdraws its approval of this job (it trained round 1 under it).
    ApprovalLog.of(SiteConfig.from_yaml(deployment.sites["site-a"])).revoke(approvals["site-a"], "dpo@site-a",
                                                                             "consent withdrawn")
    cache_before = cache_files(deployment.sites["site-a"])
    restarted_at = time.perf_counter()
    deployment.serve()  # same database: the sites' registrations survive; the SuperNodes reconnect by themselves
    nodes = json.loads((deployment.consortium / "state" / "registrations.json").read_text())
    wait_for(lambda: {_listed_nodes(load_consortium(deployment.consortium))[nodes[s]["node_id"]]
                      for s in ("site-a", "site-b")} == {"online"}, 180)
    resubmit = deployment.start("run-restarted", *submit_args, "--resume")
    assert resubmit.wait(timeout=600) == 0, deployment.logs["run-restarted"].read_text()[-3000:]
    deployment.processes.pop("run-restarted")
    print(f"restarted run: resumed and finished {time.perf_counter() - restarted_at:.0f} s after the crash")
    return {"dir": run_dir, "committed": committed, "resume_seconds": time.perf_counter() - restarted_at,
            "output": deployment.logs["run-restarted"].read_text(), "revoked": approvals["site-a"],
            "cache_before": cache_before, "cache_after": cache_files(deployment.sites["site-a"])}


def test_a_slow_site_does_not_stall_the_round_beyond_its_timeout(restarted) -> None:
    lines = records(restarted["dir"])
    by = {(r["round"], r["site"], r["kind"]): r for r in lines if r["stage"] == "mae"}
    assert by[(1, "site-b", "fault_injected")]["fault"] == "delay"
    assert f"no reply within round_timeout_s={ROUND_TIMEOUT_S:g}" in by[(1, "site-b", "declined")]["reason"]
    assert by[(1, "aggregate", "train")]["sites"] == 1 and (1, "site-a", "train") in by
    # The round waited for the slow site no longer than the timeout (plus one poll and the aggregation).
    assert ROUND_TIMEOUT_S <= by[(1, "aggregate", "train")]["round_seconds"] < ROUND_TIMEOUT_S + 15
    assert (2, "site-b", "train") in by  # the slow site is back in the next round


def test_a_restarted_server_side_resumes_without_losing_or_repeating_a_round(restarted) -> None:
    run_dir = restarted["dir"]
    assert "resuming after round 1" in restarted["output"]
    assert json.loads((run_dir / "server_state.json").read_text())["stages"]["mae"] == {
        "rounds": 2, "completed_round": 2, "done": True, "strategy": "fedavg"}
    assert set(restarted["committed"]) == {"round-0001.json", "round-0001.safetensors"}
    for name, digest in restarted["committed"].items():  # committed before the crash, untouched after it
        assert file_sha256(run_dir / "checkpoints" / "mae" / name) == digest, name
    trains = Counter((r["round"], r["site"]) for r in records(run_dir) if r["kind"] == "train")
    assert trains == Counter({(1, "site-a"): 1, (1, "aggregate"): 1, (2, "site-b"): 1, (2, "aggregate"): 1})
    assert (run_dir / "run_complete.json").is_file()


def test_a_revoked_approval_makes_the_real_supernode_refuse_the_next_round_before_touching_its_cache(
        deployment, restarted) -> None:
    from braing3n_core.federation.run_status import run_status
    from braing3n_core.federation.site_status import site_snapshot

    by = {(r["stage"], r["round"], r["site"], r["kind"]): r for r in records(restarted["dir"])}
    refusal = f"site site-a: job not approved: approval {restarted['revoked']} ('restarted', exactly this recipe"
    for key in (("setup", 0, "site-a", "declined"), ("mae", 2, "site-a", "declined")):
        assert by[key]["reason"].startswith(refusal) and "was revoked by dpo@site-a" in by[key]["reason"], key
        assert "(consent withdrawn)" in by[key]["reason"]
    assert by[("mae", 2, "aggregate", "train")]["sites"] == 1  # the round went on with site-b
    assert restarted["cache_after"] == restarted["cache_before"]  # refused before reading or writing its cache
    journal = site_snapshot(SiteConfig.from_yaml(deployment.sites["site-a"]), recent=100).recent
    assert [e.round for e in journal if e.message == "train" and e.outcome == "declined" and e.run == "restarted"] == [2]
    status = run_status(restarted["dir"]).site("site-a")  # the run is complete: site-a is `done`, its refusals kept
    assert status.rounds_declined >= 2 and "was revoked by dpo@site-a" in (status.reason or "")
