"""`braing3n simulate --ray-address` on a real two-node Ray cluster on this machine.

`ray start --head` and a second `ray start --address` (each with one CPU and a resource naming it) are
started with `--block`, so each node's processes stay under one PID and are stopped by it; the run's
ledger says which Ray node ran each site's round, and both nodes must have run some.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import write_site_yamls

from braing3n_core.config import ConfigError
from braing3n_core.ops.flower import free_port, kill_process_tree
from braing3n_core.ops.simulate import RAY_ENV, check_ray_address, federation_config, start_ray_node

RUN = {
    "name": "ray-cluster", "preset": "tiny", "seed": 0, "min_sites": 2, "round_timeout_s": 300,
    "stages": [{"name": "mae", "rounds": 2, "local_steps": 1, "batch_size": 2}],
    "probes": {"enabled": False},
}


def test_federation_config_joins_a_cluster_without_sizing_it() -> None:
    assert federation_config(50, 2, 0.0, local_cores=8) == (
        "num-supernodes=50 client-resources-num-cpus=2 init-args-num-cpus=8")
    # Ray refuses num_cpus when `ray.init` joins an existing cluster: the cluster says what it has.
    assert federation_config(50, 2, 0.25, local_cores=None) == (
        "num-supernodes=50 client-resources-num-cpus=2 client-resources-num-gpus=0.25")


def test_a_ray_address_nobody_answers_is_refused_with_the_fix() -> None:
    port = free_port()
    with pytest.raises(ConfigError, match=rf"127\.0\.0\.1:{port}: no Ray head answers there.*ray start --head --port {port}"):
        check_ray_address(f"127.0.0.1:{port}")
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        check_ray_address("headnode")
    check_ray_address("auto")  # resolved by Ray itself


def _node_resources(address: str) -> dict[str, list[str]]:
    """Node id → the custom resources it was started with (asked of the cluster by a separate driver)."""
    probe = (f"import json, ray; ray.init(address={address!r}, logging_level='ERROR'); "
             "print(json.dumps({n['NodeID']: sorted(n['Resources']) for n in ray.nodes() if n['Alive']}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **RAY_ENV}, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_sites_run_on_both_nodes_of_a_two_node_cluster(synthetic_cohort, tmp_path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(start_ray_node(["--head", "--port", str(port), "--num-cpus", "1", "--resources", '{"head_node": 1}',
                                  "--include-dashboard", "false"], tmp_path / "head.log"))
        nodes.append(start_ray_node(["--address", address, "--num-cpus", "1", "--resources", '{"second_node": 1}'],
                                 tmp_path / "second.log"))
        resources = _node_resources(address)
        head = next(node for node, names in resources.items() if "head_node" in names)
        second = next(node for node, names in resources.items() if "second_node" in names)

        sites = write_site_yamls(synthetic_cohort, tmp_path / "sites")
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump(RUN))
        run_dir = tmp_path / "run"
        result = subprocess.run(
            [sys.executable, "-m", "braing3n_core", "-q", "simulate", "--sites", *map(str, sites), "--run-config",
             str(config), "--out", str(run_dir), "--ray-address", address],
            capture_output=True, text=True, timeout=420, env={**os.environ, **RAY_ENV}, check=False,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    finally:
        for node in reversed(nodes):
            kill_process_tree(node.pid)
            node.wait()

    assert json.loads((run_dir / "run_complete.json").read_text())["sites"] == ["site-a", "site-b"]
    trains = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"kind": "train"' in line and '"site": "aggregate"' not in line]
    assert {(r["round"], r["site"]) for r in trains} == {(1, "site-a"), (1, "site-b"), (2, "site-a"), (2, "site-b")}
    ran_on = {r["worker"].rsplit("/ray:", 1)[1] for r in trains}
    # One CPU per node and per site: the two sites of a round run at once, one on each node.
    assert ran_on == {head, second}, (ran_on, resources)
    assert json.loads((run_dir / "logs" / "simulation.json").read_text())["ray_address"] == address
