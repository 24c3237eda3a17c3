"""Site YAML files: the documented example in `sites/` loads as written, and every kind of mistake is
refused with the file and the setting named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from braing3n_core.config import ConfigError
from braing3n_core.labels import Modality
from braing3n_core.site_config import SiteConfig, load_site_configs

EXAMPLE = Path(__file__).resolve().parents[1] / "sites" / "example-hospital.yaml"


def test_the_documented_example_loads_with_its_settings() -> None:
    config = SiteConfig.from_yaml(EXAMPLE)
    assert config.site_id == "example-hospital"
    assert config.data_root == Path("/data/mri/bids")
    assert config.modalities == tuple(Modality)
    assert config.device == "auto"
    assert config.privacy.enabled and config.privacy.epsilon_budget == 8.0
    assert config.privacy.stage("decoder").target_epsilon == 2.0
    assert config.privacy.stage("mae").noise_multiplier == 1.0
    assert config.resolved_cache_dir == Path("/data/mri/bids/derivatives/braing3n-cache")
    assert config.privacy_ledger_path.parent != config.resolved_cache_dir  # clearing the cache keeps the ledger
    assert config.approval.required and config.approval_log_path.parent == config.privacy_ledger_path.parent


def _write(tmp_path: Path, **change: object) -> Path:
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw.update(change)
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data_rooot": "x"}, r"data_rooot: unknown setting"),
        ({"device": "gpu"}, r"device: 'gpu' is not a device"),
        ({"site_id": "a b"}, r"site_id: 'a b' must be letters"),
        ({"modalities": ["T1w", "DWI"]}, r"unknown modalities \['DWI'\]"),
        ({"split": {"train": 0.8, "val": 0.15, "test": 0.15}}, r"split: train \+ val \+ test must be 1.0"),
        ({"privacy": {"enabled": True, "stages": {"mae": {"noise_multiplier": 1.0, "target_epsilon": 2.0}}}},
         r"privacy.stages.mae: give exactly one of noise_multiplier and target_epsilon"),
    ],
)
def test_mistakes_name_the_file_and_the_setting(tmp_path: Path, change: dict, message: str) -> None:
    path = _write(tmp_path, **change)
    with pytest.raises(ConfigError, match=message) as caught:
        SiteConfig.from_yaml(path)
    assert str(path) in str(caught.value)


def test_relative_paths_resolve_against_the_file_and_ids_are_unique(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    first = _write(tmp_path / "a", data_root="../bids")
    assert SiteConfig.from_yaml(first).data_root == (tmp_path / "bids").resolve()
    second = tmp_path / "b.yaml"
    second.write_text(first.read_text())
    with pytest.raises(ConfigError, match="example-hospital.*also used by"):
        load_site_configs([first, second])


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing.yaml: file not found"):
        SiteConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("site_id: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        SiteConfig.from_yaml(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml: expected a mapping"):
        SiteConfig.from_yaml(bad)
