"""The package map holds: layers import only downwards, no package has an import cycle, the core never
imports Flower (the contracts in pyproject.toml's [tool.importlinter], checked by import-linter). The
check is shown to bite on a copy of the code with a planted cycle, an upward import and a Flower import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
        "--no-cache", "--config", "pyproject.toml"]


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}  # ahead of the editable install's path
    return subprocess.run(LINT, cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_the_layers_and_contracts_hold() -> None:
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the code with three planted violations."""
    root = tmp_path_factory.mktemp("planted")
    for package in ("braing3n_core", "server", "client"):
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")

    def plant(module: str, line: str) -> None:
        path = root / module
        path.write_text(path.read_text() + f"\n{line}  # planted\n")

    plant("braing3n_core/data/cohort/grid.py", "import braing3n_core.data.cohort.generate")  # generate → … → grid
    plant("braing3n_core/models/blocks.py", "import braing3n_core.jobs.report")  # a model importing a job
    plant("braing3n_core/labels.py", "import flwr")
    return root


def test_a_planted_cycle_an_upward_import_and_flower_in_the_core_are_each_refused(planted: Path) -> None:
    done = lint(planted)
    assert done.returncode != 0
    report = done.stdout
    for contract in ("no import cycle among the modules of any package BROKEN",
                     "braing3n_core: each layer imports only from the layers below it BROKEN",
                     "braing3n_core never imports Flower, the server or the client BROKEN"):
        assert contract in report, report[-4000:]
    assert "No cycles are allowed in braing3n_core.data.cohort" in report and ".grid -> .generate" in report
    assert "braing3n_core.models.blocks -> braing3n_core.jobs.report" in report
    assert "braing3n_core.labels -> flwr" in report
