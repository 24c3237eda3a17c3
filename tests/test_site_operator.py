"""The site operator's runbook (docs/site-operator.md): every command in it is run here, in the order written, on
a real site (a copy of the session's synthetic cohort, approval required, DP-SGD on), a real consortium bundle
and a real signed job; the two that run until stopped are run elsewhere, and `COVERED` names where.

Commands run in-process through `braing3n_core.cli.main` (the console script's own entry point) to spare an
interpreter start per command; the live `site status` view, which only Ctrl-C ends, gets a KeyboardInterrupt in
the main thread, as Ctrl-C delivers it.
"""

from __future__ import annotations

import _thread
import json
import re
import shlex
import signal
import threading
from pathlib import Path

import pytest
import yaml

from braing3n_core.cli import main
from braing3n_core.site_config import SiteConfig

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RUNBOOK = REPO / "docs" / "site-operator.md"
INSTALL = "python3 -m venv .venv && .venv/bin/pip install -e ."
JOIN = "braing3n site join sites/site-a.yaml --credentials site-a-bundle/ --superlink fl.consortium.example:9092"
LIVE_STATUS = "braing3n site status sites/site-a.yaml"
# What is not run below, and where it is.
COVERED = {
    INSTALL: "the README's demo set-up command begins with it (checked below); CI installs the same package",
    JOIN: "tests/test_deployment.py: `Deployment.join` runs it for every SuperNode of the real loopback deployment",
}


def runbook_commands() -> list[str]:
    """Every command of the runbook's bash blocks, comments dropped, continuation lines joined."""
    commands, block = [], None
    for line in RUNBOOK.read_text().splitlines():
        if line.startswith("```"):
            block = [] if block is None and line.strip() == "```bash" else None
            continue
        if block is not None:
            text = line.split(" #")[0].rstrip()
            if commands and commands[-1].endswith("\\"):
                commands[-1] = commands[-1][:-1].rstrip() + " " + text.strip()
            elif text.strip():
                commands.append(text.strip())
    return commands


@pytest.fixture(scope="module")
def operator(synthetic_cohort, tmp_path_factory) -> dict:
    from braing3n_core.ops.consortium import init_consortium
    from braing3n_core.ops.job_file import write_job
    from braing3n_core.ops.release import sign_directory

    root = tmp_path_factory.mktemp("site-operator")
    source = SiteConfig.from_yaml(synthetic_cohort[0])
    site = {**source.to_yaml_dict(), "cache_dir": str(root / "cache"), "approval": {"required": True},
            "privacy": {"enabled": True, "epsilon_budget": 10.0, "stages": {"mae": {"noise_multiplier": 1.5}}}}
    (root / "site-a.yaml").write_text(yaml.safe_dump(site))
    consortium = init_consortium(root / "fl", [source.site_id], "fl.consortium.example")
    job = write_job(consortium.layout.root, REPO / "runs-config" / "tiny.yaml")
    release = root / "tiny-release"
    release.mkdir()
    (release / "model.txt").write_text("weights\n")
    sign_directory(release, consortium.layout.release_key, {"kind": "test"})
    return {"root": root, "sites/site-a.yaml": str(root / "site-a.yaml"), "site-a-bundle/release.pub":
            str(consortium.layout.bundle(source.site_id) / "release.pub"), "site-a-bundle/":
            str(consortium.layout.bundle(source.site_id)) + "/", "tiny-cebc8dc9ac2f.job.json": str(job.source),
            "tiny-release/": str(release) + "/"}


def _argv(command: str, names: dict) -> list[str]:
    words = shlex.split(command)
    assert words[0] == "braing3n", command
    for example, real in names.items():
        if isinstance(real, str):
            words = [real if w == example else w for w in words]
    return words[1:]


def test_the_install_command_is_the_readmes() -> None:
    readme = (REPO / "README.md").read_text()
    assert f"{INSTALL} && .venv/bin/braing3n demo" in readme
    assert INSTALL in runbook_commands()


def test_every_runbook_command_runs_as_written(operator, capsys: pytest.CaptureFixture[str]) -> None:
    commands = runbook_commands()
    assert len(commands) >= 14 and JOIN in commands and LIVE_STATUS in commands
    names, ran = dict(operator), []
    for command in commands:
        if command in COVERED or command == LIVE_STATUS:
            continue
        assert command.startswith("braing3n "), f"{command!r}: neither run here nor named in COVERED"
        if "3f2a9c1d0b7e" in command:  # the runbook's example id: revoke the first approval made above
            names["3f2a9c1d0b7e"] = said(ran, "site", "approve")[0].split()[-1][:8]
        argv = _argv(command, names)
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 0 and "Traceback" not in out + err, f"{command}\n{out}\n{err}"
        ran.append((argv, out, err))
    assert len(ran) == len(commands) - len(COVERED) - 1
    review = said(ran, "site", "review")[0]
    assert "What leaves this site" in review and "this site's ε reaches" in review
    assert "checked against your release.pub" in review and "the same bundle as the app installed here" in review
    assert "revoked; its job is refused" in said(ran, "site", "revoke")[0]
    listed = json.loads(said(ran, "site", "approvals", "--json")[0])
    assert [a["active"] for a in listed["approvals"]] == [False, True] and listed["required"]
    assert listed["approvals"][1]["scope"] == "rounds" and listed["approvals"][1]["max_rounds"]["dit"] == 20
    snapshot = json.loads(said(ran, "site", "status", "--json")[0])
    assert snapshot["approval"]["required"] and len(snapshot["approval"]["active"]) == 1
    assert snapshot["privacy"]["enabled"] and snapshot["privacy"]["epsilon"] == 0.0
    assert "approval: required" in said(ran, "site", "status", "--once")[0]
    assert "signed by the trusted key" in said(ran, "verify")[0]
    assert "flower-supernode" in said(ran, "site", "join")[0]


def said(ran: list[tuple[list[str], str, str]], *words: str, stream: int = 1) -> list[str]:
    """What the commands whose argv starts with (or, for an option, holds) `words` printed, in order."""
    chosen = [(out, err) for argv, out, err in ran
              if argv[: len([w for w in words if not w.startswith("-")])] == [w for w in words if not w.startswith("-")]
              and all(w in argv for w in words if w.startswith("-"))]
    assert chosen, words
    return [pair[stream - 1] for pair in chosen]


def test_the_live_site_status_runs_until_ctrl_c(operator, capsys: pytest.CaptureFixture[str]) -> None:
    # `interrupt_main` does nothing while SIGINT is ignored, and code an earlier test ran in the same pytest
    # worker can leave it so (a full run hung here until its timeout with the worker's SIGINT ignored): give
    # the test the handler a terminal's `braing3n` has, whatever ran before.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    ctrl_c = threading.Timer(1.5, _thread.interrupt_main)  # what Ctrl-C does: KeyboardInterrupt in the main thread
    ctrl_c.start()
    try:
        code = main(_argv(LIVE_STATUS, operator))
    finally:
        ctrl_c.cancel()
        signal.signal(signal.SIGINT, previous)
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"site site-a · data .* messages answered", out) and "approval: required" in out
