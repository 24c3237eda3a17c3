"""Shared fixtures: real anatomy from nibabel and nilearn, and one small synthetic cohort per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

# One intra-op thread: CI has two cores, and the Flower simulation tests run Ray actors beside pytest.
# With torch's default of one thread per core, tiny-model steps spin-wait on a busy core and ran 5x
# slower (measured: a tiny DiT step 17 ms with one thread, 80-1100 ms with two under load).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def nibabel_data_dir() -> Path:
    import nibabel

    return Path(nibabel.__file__).parent / "tests" / "data"


@pytest.fixture(scope="session")
def synthetic_cohort(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A small synthetic cohort, generated once per test session; returns its two site YAML paths.

    `braing3n cohort make --sites 2 --subjects 6 --seed 0 --voxel-mm 4` into a session temp folder
    (`site-a/`, `site-b/`, and the YAMLs in `sites/`; `data_root` in each YAML points at its site):
    - site-a: 1.5 T memory clinic, CN/MCI/AD (2 each), ages 60-90; T1w, T2w, FLAIR; stored LAS,
      4x4x4.8 mm, int16;
    - site-b: 3 T neuro-oncology, 4 glioma + 2 CN, ages 25-80; T1w, ce-gadolinium_T1w, T2w, FLAIR;
      stored PSR, 3.6x3.6x4.4 mm, int16;
    - subjects sub-a001..a006 / sub-b001..b006, 1-4 sessions each (ses-01..), so longitudinal pairs
      exist; participants.tsv (sex, age, diagnosis, mmse with n/a), sub-*/sub-*_sessions.tsv;
    - ground truth per scan in <site>/derivatives/braing3n-truth/truth.tsv (volumes in ml) and label
      maps sub-*/ses-*/anat/*_desc-truth_dseg.nii.gz.
    Images are skull-stripped (background exactly 0). Treat the folder as read-only: it is shared, also by
    the pytest-xdist workers of one session: the first worker writes it under a file lock (~40 s on CI), the
    others wait for it and read the same folder.
    """
    import json

    from filelock import FileLock

    from braing3n_core.data.cohort import CohortSpec, make_cohort

    session = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        session = session.parent  # the folder all workers of this session share
    out, done = session / "synthetic_cohort", session / "synthetic_cohort.json"
    with FileLock(str(session / "synthetic_cohort.lock")):
        if not done.is_file():
            # One process: forking a test process that may already run torch threads is not worth the risk.
            spec = CohortSpec(n_sites=2, subjects_per_site=6, seed=0, voxel_mm=4.0, workers=1, progress=False)
            done.write_text(json.dumps([str(p) for p in make_cohort(spec, out_dir=out)]))
    return [Path(p) for p in json.loads(done.read_text())]


def write_site_yamls(cohort: list[Path], folder: Path, privacy: dict[str, dict] | None = None,
                     copies: int = 1, settings: dict[str, dict] | None = None) -> list[Path]:
    """Site YAMLs over the shared (read-only) cohort with caches in `folder`; `copies` > 1 makes more
    virtual sites over the same scans (distinct ids and caches); `privacy` sets a site's privacy block,
    `settings` any other top-level settings of a site (e.g. `{"site-a": {"workers": 2}}`)."""
    import yaml

    from braing3n_core.site_config import SiteConfig

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for copy in range(copies):
        for source in cohort:
            site = SiteConfig.from_yaml(source)
            site_id = site.site_id if copies == 1 else f"{site.site_id}-{copy}"
            data = {**site.to_yaml_dict(), "site_id": site_id, "cache_dir": str(folder / "cache" / site_id)}
            if privacy and site_id in privacy:
                data["privacy"] = privacy[site_id]
            data |= (settings or {}).get(site_id, {})
            paths.append(folder / f"{site_id}.yaml")
            paths[-1].write_text(yaml.safe_dump(data))
    return paths
