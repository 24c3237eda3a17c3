"""Live status without a live federation: run folders written through the very `RunFolder` calls the ServerApp
makes (`log`, `log_message`, `write_complete`, `prune_uncommitted`), read back by the snapshot, the terminal
view, the web page's HTTP interface (token, cookie, TLS with a real consortium's certificate), the site's
journal and snapshot, and the TensorBoard sink read back with TensorBoard's own reader.

The real simulation, MLflow, and the page in a headless browser are in `test_status_live.py` (slow)."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from braing3n_core.federation.metric_sinks import TensorBoardSink, absolute_tracking_uri, metric_items, sink_settings
from braing3n_core.federation.run_config import RunConfig
from braing3n_core.federation.run_folder import RunFolder
from braing3n_core.federation.run_status import LedgerTail, RunStatusError, RunWatcher, run_status
from braing3n_core.federation.site_journal import JournalEntry, SiteJournal, journal_path
from braing3n_core.federation.site_status import site_snapshot
from braing3n_core.jobs.status_page import consortium_page, run_page
from braing3n_core.ops.deploy import StateFiles, latest_run, record_submitted_run
from braing3n_core.privacy.ledger import PrivacyLedger, Release
from braing3n_core.site_config import SiteConfig

REPO = Path(__file__).resolve().parents[1]
RECIPE = {"name": "status-unit", "preset": "tiny", "seed": 0, "min_sites": 2, "round_timeout_s": 60,
          "stages": [{"name": "mae", "rounds": 3, "local_steps": 1, "batch_size": 2},
                     {"name": "decoder", "rounds": 2, "local_steps": 1, "batch_size": 2}]}
WEIGHTS = 4096  # bytes of arrays per message


def pinned_run(root: Path) -> RunFolder:
    root.mkdir(parents=True, exist_ok=True)
    config_path = root / "recipe.yaml"
    config_path.write_text(yaml.safe_dump(RECIPE))
    run = RunFolder(root / "run")
    run.pin(RunConfig.from_yaml(config_path))
    return run


def send(run: RunFolder, stage: str, rnd: int, site: str, node: int, kind: str = "train") -> None:
    run.log_message({"direction": "out", "stage": stage, "round": rnd, "type": kind, "node": node, "site": site,
                     "records": {"arrays": {"type": "arrays", "bytes": WEIGHTS}}})


def reply(run: RunFolder, stage: str, rnd: int, site: str, node: int, kind: str = "train", error: bool = False) -> None:
    entry = {"direction": "in", "stage": stage, "round": rnd, "type": kind, "node": node, "site": site}
    run.log_message({**entry, "error": 4001} if error else {**entry, "records": {"arrays": {"type": "arrays", "bytes": WEIGHTS}}})


def round_one(run: RunFolder) -> None:
    """mae round 1: three sites trained, site-c on DP (ε reported), the aggregate logged."""
    for node, site in ((1, "site-a"), (2, "site-b"), (3, "site-c")):
        send(run, "mae", 1, site, node)
    for node, site, loss in ((1, "site-a", 0.5), (2, "site-b", 0.6), (3, "site-c", 0.7)):
        reply(run, "mae", 1, site, node)
        extra = {"privacy/epsilon": 1.25, "privacy/budget": 8.0} if site == "site-c" else {}
        run.log("mae", 1, site, "train", update_norm=0.1 * node, worker=f"host/{node}", **{"num-examples": 10.0,
                                                                                            "train/loss": loss}, **extra)
    run.log("mae", 1, "aggregate", "train", sites=3, lr=1e-3, round_seconds=0.2, **{"train/loss": 0.6})


def round_two_in_progress(run: RunFolder) -> None:
    """mae round 2: site-a answered, site-b refused (why), site-c has not answered yet."""
    for node, site in ((1, "site-a"), (2, "site-b"), (3, "site-c")):
        send(run, "mae", 2, site, node)
    reply(run, "mae", 2, "site-a", 1)
    run.log("mae", 2, "site-a", "train", update_norm=0.05, **{"num-examples": 10.0, "train/loss": 0.45})
    reply(run, "mae", 2, "site-b", 2, error=True)
    run.log("mae", 2, "site-b", "declined", reason="site site-b: job not approved at this site")


def test_a_round_in_progress_shows_every_site_its_state_and_why(tmp_path: Path) -> None:
    run = pinned_run(tmp_path)
    round_one(run)
    round_two_in_progress(run)
    status = run_status(run.root)
    assert (status.name, status.state, status.stage, status.round, status.rounds) == ("status-unit", "running", "mae", 2, 3)
    assert status.round_in_progress
    a, b, c = status.site("site-a"), status.site("site-b"), status.site("site-c")
    assert (a.state, a.loss, a.update_norm, a.rounds_accepted) == ("connected", 0.45, 0.05, 2)
    assert (b.state, b.reason, b.loss, b.rounds_declined) == ("declined", "site site-b: job not approved at this site", 0.6, 1)
    assert (c.state, c.round, c.epsilon, c.budget, c.worker) == ("training", 2, 1.25, 8.0, "host/3")
    assert a.bytes_sent == 2 * WEIGHTS and a.bytes_received == 2 * WEIGHTS and b.bytes_received == WEIGHTS
    assert status.bytes_sent == 6 * WEIGHTS and status.bytes_received == 4 * WEIGHTS
    assert [e.kind for e in status.events] == ["declined"]
    mae, decoder = status.stages
    assert (mae.completed, mae.done, mae.loss, decoder.completed) == (1, False, 0.6, 0)
    # ETA: mae's two rounds left at its measured time, the decoder's two estimated from it
    assert mae.mean_round_s is not None and status.eta_estimated
    assert status.eta_s == pytest.approx(4 * mae.mean_round_s)
    assert status.progress == pytest.approx(1 / 5)
    json.dumps(status.to_json(), allow_nan=False)  # what --json and the page send


def test_a_run_that_stopped_writing_is_stopped_and_a_complete_run_is_done(tmp_path: Path) -> None:
    run = pinned_run(tmp_path)
    round_one(run)
    quiet = run_status(run.root)
    assert quiet.state == "running"
    later = run_status(run.root, now=quiet.updated + 1.5 * RECIPE["round_timeout_s"] + 61)
    assert later.state == "stopped"
    run.write_complete(RunConfig.from_yaml(tmp_path / "recipe.yaml"), 1.0, "", ["site-a", "site-b", "site-c"])
    done = run_status(run.root, now=later.now)
    assert done.state == "complete" and done.eta_s == 0.0
    assert {s.state for s in done.sites} == {"done"}


def test_the_watcher_reads_appended_lines_only_and_rereads_a_ledger_rewritten_on_resume(tmp_path: Path) -> None:
    run = pinned_run(tmp_path)
    watcher = RunWatcher(run.root)
    assert watcher.snapshot().state == "waiting"
    round_one(run)
    first = watcher.snapshot()
    offset = watcher._metrics.offset
    round_two_in_progress(run)
    second = watcher.snapshot()
    assert second.version > first.version and watcher._metrics.offset > offset
    assert second.site("site-a").rounds_accepted == 2
    run.prune_uncommitted({"mae": 1})  # resume: round 2 never reached its checkpoint; atomically rewritten
    resumed = watcher.snapshot()
    assert resumed.site("site-a").rounds_accepted == 1 and resumed.site("site-b").state == "connected"
    assert len(watcher.records) == len(run.records())


def test_a_line_being_written_waits_for_its_end(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b"')
    tail = LedgerTail(path)
    assert tail.read() == (False, [{"a": 1}])
    with open(path, "ab") as handle:
        handle.write(b': 2}\n')
    assert tail.read() == (False, [{"b": 2}])


def test_a_folder_without_run_yaml_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(RunStatusError, match=f"{tmp_path}: not a run folder"):
        RunWatcher(tmp_path)


def braing3n(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "braing3n_core", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_consortium_status_prints_plain_columns_into_a_pipe_and_json_for_scripts(tmp_path: Path) -> None:
    run = pinned_run(tmp_path)
    round_one(run)
    round_two_in_progress(run)
    plain = braing3n("consortium", "status", str(run.root), "--once")
    assert plain.returncode == 0, plain.stderr
    assert "run status-unit (tiny): running · stage mae round 2/3 (in progress)" in plain.stdout
    assert "site site-b: job not approved at this site" in plain.stdout
    assert "─" not in plain.stdout and "\x1b[" not in plain.stdout  # no boxes, no colour into a pipe
    lines = {line.split()[0]: line for line in plain.stdout.splitlines() if line.startswith("site-")}
    assert "training" in lines["site-c"] and "1.25 of 8" in lines["site-c"] and "declined" in lines["site-b"]
    document = json.loads(braing3n("consortium", "status", str(run.root), "--json").stdout)
    assert [s["state"] for s in document["sites"]] == ["connected", "declined", "training"]
    bad = braing3n("consortium", "status", str(tmp_path), "--once")
    assert bad.returncode == 2 and "not a run folder (no run.yaml)" in bad.stderr and "Traceback" not in bad.stderr


# --- the web page's HTTP interface ------------------------------------------------------------------------------


def get(url: str, headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None,
        method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect, urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}, method=method), timeout=30) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_the_page_refuses_requests_without_its_token_and_is_read_only(tmp_path: Path) -> None:
    run = pinned_run(tmp_path)
    round_one(run)
    with run_page(run.root, port=0, token="right-token") as server:
        base = server.url
        for path in ("", "status.json", "status.js", "curves/x/mae.png"):
            status, headers, body = get(base + path)
            assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer") and b"needs its token" in body
        assert get(base + "status.json", {"Authorization": "Bearer wrong-token"})[0] == 401
        assert get(base + "status.json", {"Authorization": "Bearer right-token-and-more"})[0] == 401
        status, _, body = get(base + "status.json", {"Authorization": "Bearer right-token"})
        assert status == 200 and json.loads(body)["sites"][0]["site"] == "site-a"
        status, headers, _ = get(base + "?token=right-token")
        assert status == 303 and headers["Location"] == "/"
        cookie = headers["Set-Cookie"]
        assert cookie.startswith("braing3n_status=right-token;") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        status, headers, body = get(base, {"Cookie": "braing3n_status=right-token"})
        assert status == 200 and b"status.js" in body and "script-src 'self'" in headers["Content-Security-Policy"]
        auth = {"Authorization": "Bearer right-token"}
        curves = json.loads(get(base + "status.json", auth)[2])["curves"]
        status, headers, png = get(base + curves["mae"], auth)
        assert status == 200 and headers["Content-Type"] == "image/png" and png.startswith(b"\x89PNG")
        assert get(base + "curves/../../run/run.yaml", auth)[0] == 404
        assert get(base + "status.json", auth, method="POST")[0] == 405
    assert not (run.root / "report").exists()  # the page draws into its own folder, never into the run


def test_the_consortium_page_shows_its_latest_run_over_its_tls_with_a_private_token(tmp_path: Path) -> None:
    from braing3n_core.ops.consortium import init_consortium

    consortium = init_consortium(tmp_path / "consortium", ["site-a"], "localhost")
    state = StateFiles(consortium.layout.state)
    first, second = pinned_run(tmp_path / "one"), pinned_run(tmp_path / "two")
    record_submitted_run(state, first.root)
    record_submitted_run(state, second.root)
    assert latest_run(consortium.layout.root) == second.root
    round_one(second)
    with consortium_page(consortium.layout.root, address="0.0.0.0", port=0) as server:  # off loopback: TLS
        assert server.url.startswith("https://127.0.0.1:")
        token = state.status_token.read_text().strip()
        assert state.status_token.stat().st_mode & 0o077 == 0
        trusted = ssl.create_default_context(cafile=str(consortium.layout.ca_cert))
        assert get(server.url + "status.json", context=trusted)[0] == 401
        status, _, body = get(server.url + "status.json", {"Authorization": f"Bearer {token}"}, trusted)
        assert status == 200 and json.loads(body)["run_dir"] == str(second.root.resolve())
        status, headers, _ = get(server.url + f"?token={token}", context=trusted)
        assert status == 303 and "Secure" in headers["Set-Cookie"]
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            get(server.url + "status.json", context=ssl.create_default_context())  # not the system's CAs


# --- the site's own view ---------------------------------------------------------------------------------------


def test_the_site_sees_its_journal_its_epsilon_of_budget_and_its_cache(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    site = SiteConfig.model_validate({"site_id": "site-x", "data_root": str(data), "cache_dir": str(tmp_path / "cache"),
                                      "privacy": {"enabled": True, "epsilon_budget": 4.0}})
    journal = SiteJournal(journal_path(site))
    journal.append(JournalEntry.of_reply("query:hello", {"action": "hello"}, 0.01))
    journal.append(JournalEntry.of_reply("train", {"stage": "mae", "server-round": 1, "run": "r"}, 1.5,
                                         metrics={"train/loss": 0.4, "num-examples": 12.0, "privacy/epsilon": 0.9},
                                         update_norm=0.02))
    journal.append(JournalEntry.of_reply("train", {"stage": "mae", "server-round": 2, "run": "r"}, 0.1,
                                         reason="site site-x: privacy budget reached"))
    with open(journal.path, "ab") as handle:
        handle.write(b'{"time": 1, "mess')  # a line cut by a crash
    ledger = PrivacyLedger(site.privacy_ledger_path, "site-x")
    entry = ledger.record(Release("mae", 1, 0.1, 1.0, 10, 1.0, 50, run="r"), delta=1e-5, budget=4.0)
    snapshot = site_snapshot(site)
    assert snapshot.answered == 3 and snapshot.declined == 1
    last = snapshot.recent[-1]
    assert (last.message, last.outcome, last.round, last.reason) == ("train", "declined", 2, "site site-x: privacy budget reached")
    trained = snapshot.recent[1]
    assert (trained.loss, trained.update_norm, trained.epsilon, trained.examples) == (0.4, 0.02, 0.9, 12.0)
    assert snapshot.privacy.epsilon == pytest.approx(entry.epsilon_after) and snapshot.privacy.budget == 4.0
    assert snapshot.privacy.left == pytest.approx(4.0 - entry.epsilon_after) and snapshot.privacy.releases == 1
    assert snapshot.cache.exists and snapshot.cache.bytes > 0
    site_yaml = tmp_path / "site-x.yaml"
    site_yaml.write_text(yaml.safe_dump(site.to_yaml_dict()))
    shown = braing3n("site", "status", str(site_yaml), "--once")
    assert shown.returncode == 0, shown.stderr
    assert f"ε {entry.epsilon_after:.3g} spent of 4" in shown.stdout and "privacy budget reached" in shown.stdout
    assert "SuperNode: not started here" in shown.stdout
    document = json.loads(braing3n("site", "status", str(site_yaml), "--json").stdout)
    assert document["privacy"]["releases"] == 1 and document["supernode"] is None and len(document["recent"]) == 3


# --- TensorBoard ------------------------------------------------------------------------------------------------


def test_tensorboard_event_files_per_site_and_aggregate_load_with_tensorboards_reader(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = pinned_run(tmp_path)
    round_one(run)  # before the sink: replayed into a fresh folder
    run.sinks = [TensorBoardSink(tmp_path / "tb", "status-unit", run.records())]
    run.log("mae", 2, "site-a", "train", update_norm=0.05, **{"num-examples": 10.0, "train/loss": 0.45})
    run.log("mae", 2, "aggregate", "train", sites=1, **{"train/loss": 0.45})
    run.log("mae", 2, "aggregate", "evaluate", sites=1, **{"val/masked_l1": 0.3})
    run.log("mae", 2, "site-b", "declined", reason="no")  # not a metric
    run.close_sinks("FINISHED")
    assert sorted(p.name for p in (tmp_path / "tb" / "status-unit").iterdir()) == ["aggregate", "site-a", "site-b", "site-c"]
    site_a = EventAccumulator(str(tmp_path / "tb" / "status-unit" / "site-a")).Reload()
    assert [(e.step, round(e.value, 6)) for e in site_a.Scalars("mae/train/loss")] == [(1, 0.5), (2, 0.45)]
    assert [e.step for e in site_a.Scalars("mae/train/update_norm")] == [1, 2]
    aggregate = EventAccumulator(str(tmp_path / "tb" / "status-unit" / "aggregate")).Reload()
    assert [e.value for e in aggregate.Scalars("mae/val/masked_l1")] == [pytest.approx(0.3)]
    assert "mae/train/round_seconds" in aggregate.Tags()["scalars"]
    site_c = EventAccumulator(str(tmp_path / "tb" / "status-unit" / "site-c")).Reload()
    assert site_c.Scalars("mae/privacy/epsilon")[0].value == pytest.approx(1.25)


def test_a_failing_metrics_tool_is_dropped_and_the_run_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class FullDisk:  # stands for any tool that starts failing mid-run (a tracking server gone, a full disk)
        def write(self, record):
            raise OSError(28, "No space left on device")

        def close(self, status):
            raise AssertionError("a dropped sink is not closed")

    run = pinned_run(tmp_path)
    run.sinks = [FullDisk()]
    run.log("mae", 1, "site-a", "train", **{"train/loss": 0.5})
    run.log("mae", 1, "site-b", "train", **{"train/loss": 0.6})
    run.close_sinks("FINISHED")
    assert len(run.records()) == 2 and run.sinks == []
    assert "FullDisk dropped after an error: [Errno 28] No space left on device" in caplog.text


def test_metric_names_and_the_settings_the_serverapp_receives(tmp_path: Path) -> None:
    record = {"time": 1.0, "stage": "decoder", "round": 3, "site": "aggregate", "kind": "evaluate", "sites": 2,
              "num-examples": 8.0, "val/psnr": 21.5, "val/ssim": None, "secure_aggregation": True}
    assert metric_items(record) == [("decoder/evaluate/sites", 2.0), ("decoder/evaluate/num-examples", 8.0),
                                    ("decoder/val/psnr", 21.5)]
    assert metric_items({**record, "kind": "declined"}) == []
    assert absolute_tracking_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_tracking_uri("sqlite:////abs/mlflow.db", tmp_path) == "sqlite:////abs/mlflow.db"
    assert absolute_tracking_uri("mlruns", tmp_path) == str(tmp_path / "mlruns")
    assert absolute_tracking_uri("http://mlflow.example:5000", tmp_path) == "http://mlflow.example:5000"
    settings = sink_settings(Path("tb"), {"MLFLOW_TRACKING_URI": "http://mlflow.example:5000",
                                          "MLFLOW_EXPERIMENT_NAME": "brains"})
    assert settings == {"tensorboard": str(Path("tb").resolve()), "mlflow_tracking_uri": "http://mlflow.example:5000",
                        "mlflow_experiment": "brains"}
    assert sink_settings(None, {}) == {"tensorboard": "", "mlflow_tracking_uri": "", "mlflow_experiment": ""}
