"""`braing3n evaluate-generation`: does the DiT generate what it is asked for, and forecast better than nothing?

An evaluation-only federated run (no stage is trained): the run YAML's `generation_eval` block names the
trained run's DiT, decoder and probe heads, `start_from.mae` its frozen encoder. With `--sites` it runs
as a Flower simulation of those sites (the same ServerApp/ClientApp as a deployment) in `<out>/`; in a
deployment the consortium submits the YAML this job writes (`--config-only`) with `flwr run`. What the
server and each site compute is in `braing3n_core/generation/evaluation.py` and `forecast_eval.py`;
the result is `<out>/generation_eval.json`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from braing3n_core.config import ConfigError
from braing3n_core.federation.run_folder import RunFolder
from braing3n_core.generation.evaluation import GUIDANCE_SWEEP, NOISE, SWAPPED, UNCONDITIONED, guided_set
from braing3n_core.generation.models import GenerationError, load_run_models
from braing3n_core.models.diffusion import DEFAULT_STEPS
from braing3n_core.ops.simulate import simulate
from braing3n_core.stage_names import PROBES


def evaluation_run_config(run_dir: Path, *, min_sites: int, n: int, steps: int, guidance: Sequence[float],
                          default_guidance: float, forecast: bool, seed: int) -> dict[str, Any]:
    """The evaluation run's YAML: the trained run's models, its probe heads when it has them (else the
    evaluation trains federated probes on the frozen encoder first)."""
    try:
        models = load_run_models(Path(run_dir), need_encoder=True)
    except GenerationError as error:
        raise ConfigError(str(error)) from None
    run = RunFolder(Path(run_dir))
    probes = run.final_path(PROBES) if run.is_final(PROBES) else None
    return {
        "name": f"{Path(run_dir).name}-generation-eval", "preset": models.preset.name, "seed": seed,
        "min_sites": min_sites, "round_timeout_s": 7200.0,
        "start_from": {"mae": str(models.checkpoints["mae"].resolve())},
        "probes": {"enabled": probes is None},
        "generation_eval": {"dit": str(models.checkpoints["dit"].resolve()), "decoder": str(models.checkpoints["decoder"].resolve()),
                            "probes": None if probes is None else str(probes.resolve()), "n": n, "steps": steps,
                            "guidance": [float(g) for g in guidance], "default_guidance": float(default_guidance),
                            "forecast": forecast, "seed": seed},
    }


def evaluate_generation(run_dir: Path, sites: Sequence[Path], out: Path, *, n: int = 32, steps: int = DEFAULT_STEPS,
                        guidance: Sequence[float] = GUIDANCE_SWEEP, default_guidance: float = 1.5, forecast: bool = False,
                        seed: int = 0, config_only: bool = False, echo: bool = False) -> dict[str, Any] | Path:
    """Write the evaluation's run YAML beside `out` and run it over `sites`; returns `generation_eval.json`'s
    content (or, with `config_only`, the YAML's path for a deployment)."""
    if not config_only and not sites:
        raise ConfigError("evaluate-generation: give --sites (a Flower simulation of those sites) or --config-only "
                          "(the run YAML for `flwr run` in a deployment)")
    out = Path(out)
    config = evaluation_run_config(run_dir, min_sites=max(1, len(sites)), n=n, steps=steps, guidance=guidance,
                                   default_guidance=default_guidance, forecast=forecast, seed=seed)
    path = out.with_name(out.name + ".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    if config_only:
        return path
    result = simulate(list(sites), path, out, resume=RunFolder(out).is_run(), echo=echo)
    return json.loads(RunFolder(result.run_dir).generation_eval_path.read_text())


def _value(tree: dict[str, Any], *keys: str) -> float:
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return float("nan")
        tree = tree[key]
    return float(tree) if isinstance(tree, (int, float)) else float("nan")


def summary_line(result: dict[str, Any]) -> str:
    """One line: FD vs real-vs-real, age adherence vs ceiling, floor and the swapped control, forecasts."""
    generation = result["generation"]
    best = guided_set(generation["default_guidance"])
    pooled, adherence, ceiling = generation["pooled"], generation["adherence"], generation["ceiling"]["pooled"]
    parts = [
        (f"FD (token) generated {_value(pooled, 'sets', best, 'token', 'fd', 'value'):.3g} "
        f"(equal-size {_value(pooled, 'sets', best, 'token', 'fd_half', 'value'):.3g}) vs real-vs-real "
        f"{_value(pooled, 'real_vs_real', 'token', 'fd'):.3g}, noise {_value(pooled, 'sets', NOISE, 'token', 'fd', 'value'):.3g}"),
        (f"age MAE generated {_value(adherence, best, 'token', 'gen/adherence_age_mae'):.3g} / real "
        f"{_value(ceiling, 'probe/age_mae'):.3g} / unconditioned {_value(adherence, UNCONDITIONED, 'token', 'gen/adherence_age_mae'):.3g}"
        f" / swapped {_value(adherence, SWAPPED, 'token', 'gen/adherence_age_mae'):.3g}"),
    ]
    if "forecast" in result:
        improvement = result["forecast"]["pooled"].get("improvement", {})
        parts.append("regional volume-change error reduced vs no-change by: " + ", ".join(
            f"{m} {100 * v['value']:+.0f}%" for m, v in improvement.items()))
    return "; ".join(parts)
