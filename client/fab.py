"""The Flower app bundle (FAB) hash of this app, as Flower computes it: sha256 of the bundle `flwr run` submits.

`flwr run APP_DIR` builds the bundle with `flwr.cli.build.build_fab_from_disk` (a zip with fixed dates and sorted
entries, the files `[tool.flwr.app] fab-include` selects) and the SuperLink names the run's app by
`sha256(bundle)`. A ClientApp cannot read that hash in Flower 1.42: `Context` has no FAB field, and
`flwr-clientapp` keeps its `Run`/`Fab` objects to itself. What the ClientApp can see is where its code was
loaded from: the folder Flower unpacked the bundle into (`$FLWR_HOME/apps/<publisher>.<name>.<version>.<hash[:8]>`,
in deployment and in simulation alike). Building that folder again with Flower's own builder gives the same
bytes (checked in tests/test_approval.py: build, install, rebuild), so the hash below is the submitted
bundle's, and the folder name's 8-character prefix is checked against it as well.

`python -m client.fab [APP_DIR]` prints the hash of an app folder: how `braing3n` (whose core never imports
Flower) asks for it (`braing3n_core.ops.flower.fab_sha256`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
from pathlib import Path

from flwr.cli.build import build_fab_from_files

# `<publisher>.<name>.<version>.<8 hex>`: how Flower 1.42 names an installed bundle (flwr/cli/install.py)
_INSTALLED = re.compile(r"^.+\.(?P<short>[0-9a-f]{8})$")


def app_dir() -> Path:
    """The folder this app's code was loaded from (it holds the pyproject.toml of the bundle)."""
    return Path(__file__).resolve().parents[1]


# Folders Flower's own filter always drops (`APP_PUBLISH_EXCLUDE_PATTERNS`: `.flwr/**`, `.venv/**`,
# `**/__pycache__/**`). `build_fab_from_disk` walks them first and drops them after: in a checkout with its
# virtual environment that walk is ~20 s of a loaded 2-core machine, for the same bytes.
_NEVER_SHIPPED_TOP, _NEVER_SHIPPED = {".venv", ".flwr"}, {"__pycache__"}


def _candidate_files(root: Path) -> dict[str, Path]:
    """`flwr.cli.utils.collect_files(root)` without descending into folders Flower never ships."""
    files: dict[str, Path] = {}
    for folder, dirs, names in os.walk(root, followlinks=False):
        dirs[:] = [d for d in dirs if d not in _NEVER_SHIPPED and not (Path(folder) == root and d in _NEVER_SHIPPED_TOP)]
        for name in names:
            path = Path(folder) / name
            if path.is_symlink() or not path.resolve().is_relative_to(root):  # as collect_files: no links, nothing outside
                continue
            files[path.relative_to(root).as_posix()] = path
    return files


@functools.lru_cache(maxsize=8)
def fab_sha256(folder: Path) -> str:
    """sha256 of the bundle Flower builds from `folder` (memoised: a Ray actor answers many messages)."""
    return hashlib.sha256(build_fab_from_files(_candidate_files(folder.resolve()))[0]).hexdigest()


def installed_fab_sha256(folder: Path) -> str:
    """The bundle hash of an app folder; for a folder Flower installed, also checked against the hash prefix in its
    name, so a bundle whose files were changed after installation is reported instead of trusted."""
    digest = fab_sha256(folder)
    installed = _INSTALLED.match(folder.name)
    if installed and not digest.startswith(installed.group("short")):
        raise RuntimeError(f"the app files in {folder} were changed after Flower installed them (they hash to "
                           f"{digest[:12]}…, the bundle to {installed.group('short')}…)")
    return digest


def running_fab_sha256() -> str:
    """The bundle hash of the app this process runs."""
    return installed_fab_sha256(app_dir())


def main(argv: list[str]) -> int:
    folder = Path(argv[0]) if argv else app_dir()
    print(fab_sha256(folder.resolve()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
