"""Live status of a real federated run: one `braing3n simulate` (real SuperLink, Ray, two sites, site-b on
DP-SGD) with `--tensorboard` and `MLFLOW_TRACKING_URI` set, then:
- TensorBoard's own reader (`EventAccumulator`) and MLflow's client read back what the ServerApp wrote, and
  it equals `metrics.jsonl`;
- each site's journal holds its rounds (loss, update norm, ε) and `site status` shows ε spent of its budget;
- the status page in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium): it
  shows every site, updates when a round finishes (the run folder is replayed into a copy line by line,
  as the ServerApp wrote it: first up to a round in progress, then the rest), and refuses a browser
  without the token (401). The browser test skips, saying how to install them, where they are absent.
The SuperLink the simulation starts is stopped by `simulate` itself (by PID); the page runs in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_site_yamls

from braing3n_core.federation.run_status import run_status
from braing3n_core.jobs.status_page import run_page

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RUN = {"name": "live", "preset": "tiny", "seed": 0, "min_sites": 2, "round_timeout_s": 300, "update_norm_bound": 100.0,
       "stages": [{"name": "mae", "rounds": 3, "local_steps": 1, "batch_size": 2, "evaluate_every": 1}]}
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def live_run(synthetic_cohort, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("status-live")
    sites = write_site_yamls(synthetic_cohort, root / "sites", privacy={"site-b": {"enabled": True, "epsilon_budget": 50.0}})
    (root / "run.yaml").write_text(yaml.safe_dump(RUN))
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": tracking, "MLFLOW_EXPERIMENT_NAME": "status-live"}
    done = subprocess.run([sys.executable, "-m", "braing3n_core", "simulate", "--sites", *map(str, sites), "--run-config",
                           str(root / "run.yaml"), "--out", str(root / "run"), "--tensorboard", str(root / "tb")],
                          capture_output=True, text=True, env=env, timeout=500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"root": root, "run": root / "run", "sites": sites, "tracking": tracking, "tb": root / "tb" / "live",
            "records": lines(root / "run" / "metrics.jsonl")}


def site_values(records: list[dict], site: str, kind: str, metric: str) -> list[tuple[int, float]]:
    return [(r["round"], r[metric]) for r in records if r["site"] == site and r["kind"] == kind and r.get(metric) is not None]


def test_tensorboard_holds_every_site_and_the_aggregate_as_metrics_jsonl_says(live_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert sorted(p.name for p in live_run["tb"].iterdir()) == ["aggregate", "site-a", "site-b"]
    for site in ("site-a", "site-b", "aggregate"):
        events = EventAccumulator(str(live_run["tb"] / site)).Reload()
        read = {e.step: e.value for e in events.Scalars("mae/train/loss")}
        assert read == pytest.approx(dict(site_values(live_run["records"], site, "train", "train/loss")))
        assert [e.step for e in events.Scalars("mae/val/masked_l1")] == [1, 2, 3]
    dp = EventAccumulator(str(live_run["tb"] / "site-b")).Reload()
    assert [e.value for e in dp.Scalars("mae/privacy/epsilon")] == pytest.approx(
        [v for _, v in site_values(live_run["records"], "site-b", "train", "privacy/epsilon")])


def test_mlflow_holds_the_run_its_recipe_and_one_nested_run_per_site(live_run) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(live_run["tracking"])
    experiment = client.get_experiment_by_name("status-live")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.tags["braing3n.run_dir"] == str(live_run["run"]) and parent.info.status == "FINISHED"
    assert parent.data.params["stages.mae.rounds"] == "3" and parent.data.params["preset"] == "tiny"
    history = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, "mae/train/loss")}
    assert history == pytest.approx(dict(site_values(live_run["records"], "aggregate", "train", "train/loss")))
    children = {r.data.tags["braing3n.site"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == ["site-a", "site-b"] and {c.info.status for c in children.values()} == {"FINISHED"}
    for site, child in children.items():
        history = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "mae/train/update_norm")}
        assert history == pytest.approx(dict(site_values(live_run["records"], site, "train", "update_norm")))


def test_each_site_journals_its_rounds_and_sees_its_epsilon_of_budget(live_run) -> None:
    from braing3n_core.federation.site_status import site_snapshot
    from braing3n_core.site_config import SiteConfig

    for path in live_run["sites"]:
        site = SiteConfig.from_yaml(path)
        snapshot = site_snapshot(site, recent=100)
        trained = [e for e in snapshot.recent if e.message == "train"]
        assert [e.round for e in trained] == [1, 2, 3] and snapshot.declined == 0
        assert {e.message for e in snapshot.recent} >= {"query:hello", "evaluate"}
        server = dict(site_values(live_run["records"], site.site_id, "train", "update_norm"))
        assert {e.round: e.update_norm for e in trained} == pytest.approx(server, rel=1e-6)  # the server measured the same update
        # a DP-SGD round whose Poisson draws took no example has no loss (NaN on the wire, none in either record)
        losses = {e.round: e.loss for e in trained if e.loss is not None}
        assert len(losses) == 3 or site.site_id == "site-b"
        assert losses == pytest.approx(dict(site_values(live_run["records"], site.site_id, "train", "train/loss")))
    dp = site_snapshot(SiteConfig.from_yaml(live_run["sites"][1]))
    last = dict(site_values(live_run["records"], "site-b", "train", "privacy/epsilon"))[3]
    assert dp.privacy.epsilon == pytest.approx(last) and dp.privacy.budget == 50.0 and dp.privacy.releases == 3
    assert [e.epsilon for e in dp.recent if e.message == "train"][-1] == pytest.approx(last)
    shown = subprocess.run([sys.executable, "-m", "braing3n_core", "site", "status", str(live_run["sites"][1]), "--once"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert shown.returncode == 0 and f"ε {last:.3g} spent of 50" in shown.stdout


def test_the_snapshot_of_the_finished_run(live_run) -> None:
    status = run_status(live_run["run"])
    assert (status.state, status.stage, status.round, status.progress, status.eta_s) == ("complete", "mae", 3, 1.0, 0.0)
    assert [s.site for s in status.sites] == ["site-a", "site-b"] and {s.state for s in status.sites} == {"done"}
    messages = lines(live_run["run"] / "messages.jsonl")
    sent = sum(r.get("bytes", 0) for m in messages if m["direction"] == "out" for r in m.get("records", {}).values())
    assert status.bytes_sent == sent > 0
    assert status.site("site-b").epsilon is not None and status.site("site-b").budget == 50.0
    assert status.stages[0].mean_round_s is not None


# --- the page in a real browser ---------------------------------------------------------------------------------


def partial_copy(run: Path, target: Path) -> tuple[list[str], list[str], float]:
    """A copy of the finished run as it stood when mae round 3's train messages had just gone out; returns the
    ledger lines still to come and the time of the cut."""
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("checkpoints", "logs", "run_complete.json", "server_state.json"))
    messages = (run / "messages.jsonl").read_text().splitlines()
    records = (run / "metrics.jsonl").read_text().splitlines()
    cut = max(json.loads(m)["time"] for m in messages if json.loads(m)["round"] == 3 and json.loads(m)["direction"] == "out"
              and json.loads(m)["type"] == "train")
    early = lambda line: json.loads(line)["time"] <= cut  # noqa: E731
    (target / "messages.jsonl").write_text("".join(m + "\n" for m in messages if early(m)))
    (target / "metrics.jsonl").write_text("".join(r + "\n" for r in records if early(r)))
    return [m for m in messages if not early(m)], [r for r in records if not early(r)], cut


@pytest.fixture
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("the status page's browser test needs Chromium and ChromeDriver: "
                    "apt-get install -y chromium chromium-driver (Debian; /usr/bin/chromium, /usr/bin/chromedriver)")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not try to download a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,2400"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_the_page_shows_every_site_updates_as_a_round_finishes_and_refuses_without_the_token(live_run, browser,
                                                                                              tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    copy = tmp_path / "run"
    messages, records, _ = partial_copy(live_run["run"], copy)
    wait = WebDriverWait(browser, 60, poll_frequency=0.2)
    with run_page(copy, port=0, token="tok-" + "x" * 30, refresh_s=0.5) as server:
        browser.get(server.url)  # no token: refused
        assert "401" in browser.find_element(By.TAG_NAME, "body").text
        assert browser.find_elements(By.ID, "sites") == []

        browser.get(server.url_with_token)  # sets the cookie, redirects to /
        assert browser.current_url == server.url
        wait.until(lambda d: d.find_elements(By.ID, "site-site-b"))
        headline = browser.find_element(By.ID, "headline").text
        assert "stage mae round 3/3 (in progress)" in headline and "running" in headline
        rows = {r.get_attribute("id"): r for r in browser.find_elements(By.CSS_SELECTOR, "#sites tr[id]")}
        assert sorted(rows) == ["site-site-a", "site-site-b"]
        assert {r.get_attribute("data-state") for r in rows.values()} == {"training"}
        assert "of 50" in rows["site-site-b"].text  # ε spent of its budget after round 2
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#curves img[data-stage=mae]"))
        version = int(browser.find_element(By.TAG_NAME, "body").get_attribute("data-version"))

        with open(copy / "messages.jsonl", "a") as out_messages, open(copy / "metrics.jsonl", "a") as out_records:
            for line in messages:  # the round finishes, as the ServerApp writes it
                out_messages.write(line + "\n")
            for line in records:
                out_records.write(line + "\n")
        shutil.copy(live_run["run"] / "run_complete.json", copy / "run_complete.json")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "complete")
        assert int(browser.find_element(By.TAG_NAME, "body").get_attribute("data-version")) > version
        assert "stage mae round 3/3" in browser.find_element(By.ID, "headline").text
        states = {r.get_attribute("id"): r.get_attribute("data-state")
                  for r in browser.find_elements(By.CSS_SELECTOR, "#sites tr[id]")}
        assert states == {"site-site-a": "done", "site-site-b": "done"}
        loss = dict(site_values(live_run["records"], "site-a", "train", "train/loss"))[3]
        assert f"{loss:.4g}" in browser.find_element(By.ID, "site-site-a").text
        wait.until(lambda d: d.execute_script(
            "const i = document.querySelector('#curves img[data-stage=mae]');"
            "return i !== null && i.complete && i.naturalWidth > 0 && i.src.includes('v=' + document.body.dataset.version)"))

        browser.delete_all_cookies()  # the same browser without its cookie is refused again
        browser.get(server.url + "status.json")
        assert "401" in browser.find_element(By.TAG_NAME, "body").text


def test_consortium_serve_runs_the_page_of_its_latest_run_beside_the_superlink(live_run, tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    from braing3n_core.ops.consortium import init_consortium
    from braing3n_core.ops.deploy import StateFiles, record_submitted_run, stop
    from braing3n_core.ops.flower import free_port, is_alive

    consortium = init_consortium(tmp_path / "fl", ["site-a", "site-b"], "localhost")
    state = StateFiles(consortium.layout.state)
    link_port, page_port = free_port(), free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as handle:
        serve = subprocess.Popen([sys.executable, "-m", "braing3n_core", "consortium", "serve", str(consortium.layout.root),
                                  "--address", "127.0.0.1", "--port", str(link_port), "--status-port", str(page_port)],
                                 stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 120
        while "listening on" not in log.read_text() and serve.poll() is None and time.monotonic() < deadline:
            time.sleep(0.25)
        assert "listening on" in log.read_text() and f"http://127.0.0.1:{page_port}/?token=" in log.read_text(), log.read_text()
        token = state.status_token.read_text().strip()

        def status() -> dict:
            request = urllib.request.Request(f"http://127.0.0.1:{page_port}/status.json",
                                             headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=30) as answer:
                return json.loads(answer.read())

        assert status()["run"] is None  # nothing submitted yet
        record_submitted_run(state, live_run["run"])  # what `consortium run` does before it submits
        shown = status()
        assert shown["run"] == "live" and shown["state"] == "complete" and len(shown["sites"]) == 2
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(f"http://127.0.0.1:{page_port}/status.json", timeout=30)
        link = json.loads(state.superlink.read_text())["pid"]
    finally:
        stop(serve)
    assert not is_alive(link)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{page_port}/status.json", timeout=5)
