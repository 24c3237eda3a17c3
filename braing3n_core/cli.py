"""The `braing3n` command.

Each sub-command is a thin function that parses its arguments and calls one core function; the heavy
imports happen inside the handlers so that `braing3n --help` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

Handler = Callable[[argparse.Namespace], int]


def _cohort_make(args: argparse.Namespace) -> int:
    from braing3n_core.data.cohort import CohortSpec, make_cohort

    spec = CohortSpec(
        n_sites=args.sites,
        subjects_per_site=args.subjects,
        seed=args.seed,
        voxel_mm=args.voxel_mm,
        workers=args.workers,
    )
    site_yamls = make_cohort(spec, out_dir=Path(args.out), sites_dir=Path(args.sites_dir) if args.sites_dir else None)
    for path in site_yamls:
        print(path)
    return 0


def _site_check(args: argparse.Namespace) -> int:
    from braing3n_core.config import SiteConfig
    from braing3n_core.data.checks import check_site, render_site_report

    config = SiteConfig.from_yaml(args.site_yaml)
    report = check_site(config)
    render_site_report(report, verbose=args.verbose)
    return 0 if report.usable_scans else 1


def _train(args: argparse.Namespace) -> int:
    from braing3n_core.config import load_site_configs
    from braing3n_core.train import TrainOptions, train_centralized

    options = TrainOptions(
        stage=args.stage, preset=args.preset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps, seed=args.seed, device=args.device, out_dir=Path(args.out),
        encoder=Path(args.encoder) if args.encoder else None, checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every, num_workers=args.num_workers, resume=not args.restart,
    )
    final = train_centralized(load_site_configs(args.sites), options)
    print(final)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from braing3n_core.simulate import SimulationError, simulate

    try:
        result = simulate([Path(p) for p in args.sites], Path(args.run_config), Path(args.out) if args.out else None,
                          resume=args.resume, cpus_per_site=args.cpus_per_site)
    except SimulationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the SuperLink was stopped. Continue later with --resume.", file=sys.stderr)
        return 130
    print(f"federated run complete in {result.seconds:.0f} s: {result.run_dir}")
    return 0


def _synthesize(args: argparse.Namespace) -> int:
    from braing3n_core.simulate import SimulationError
    from braing3n_core.synthesize import SynthesisError, synthesize

    try:
        result = synthesize(
            Path(args.checkpoint), args.n, Path(args.out), conditions=Path(args.conditions) if args.conditions else None,
            sites=[Path(p) for p in args.sites or []], audit=Path(args.audit) if args.audit else None,
            skip_audit=args.no_audit, steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
            membership=not args.no_membership,
        )
    except (SynthesisError, SimulationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{result.exported} of {result.generated} synthetic scans exported to {result.bids} "
          f"({len(result.excluded)} excluded by the audit); data card {result.datacard}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from braing3n_core.demo import run_demo

    return run_demo(out_dir=Path(args.out), seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="braing3n", description=__doc__.splitlines()[0])
    groups = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cohort = groups.add_parser("cohort", help="synthetic multi-site cohorts").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    make = cohort.add_parser("make", help="write one BIDS dataset per site plus matching site YAML files")
    make.add_argument("--sites", type=int, default=4, help="number of sites (default 4)")
    make.add_argument("--subjects", type=int, default=20, help="subjects per site (default 20)")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--voxel-mm", type=float, default=2.0, help="template resolution to simulate at: 1 or 2 mm")
    make.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    make.add_argument("--out", required=True, help="output folder; one BIDS dataset per site inside")
    make.add_argument("--sites-dir", default=None, help="where to write site YAML files (default OUT/sites)")
    make.set_defaults(handler=_cohort_make)

    site = groups.add_parser("site", help="a hospital's data").add_subparsers(dest="action", required=True, metavar="ACTION")
    check = site.add_parser("check", help="list scans and every problem found in a site's BIDS dataset")
    check.add_argument("site_yaml", help="site config, e.g. sites/site-a.yaml")
    check.add_argument("-v", "--verbose", action="store_true", help="list every scan, not only a summary")
    check.set_defaults(handler=_site_check)

    train = groups.add_parser("train", help="centralized training of one stage on the pooled sites")
    train.add_argument("stage", choices=["mae", "decoder", "dit"])
    train.add_argument("--sites", nargs="+", required=True, help="site YAML files (their data is pooled)")
    train.add_argument("--preset", default="small", choices=["paper", "small", "tiny"])
    train.add_argument("--steps", type=int, default=200)
    train.add_argument("--batch-size", type=int, default=None, help="default: the stage's")
    train.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the stage's)")
    train.add_argument("--warmup-steps", type=int, default=0)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    train.add_argument("--out", default="runs/central", help="run folder (checkpoints, metrics.jsonl)")
    train.add_argument("--encoder", default=None, help="MAE checkpoint (default: the latest in --out)")
    train.add_argument("--checkpoint-every", type=int, default=100)
    train.add_argument("--eval-every", type=int, default=0, help="validation interval in steps (0: at the end)")
    train.add_argument("--num-workers", type=int, default=0, help="data-loading processes")
    train.add_argument("--restart", action="store_true", help="ignore existing checkpoints instead of resuming")
    train.set_defaults(handler=_train)

    sim = groups.add_parser("simulate", help="federated run of N virtual sites on Flower's simulation engine")
    sim.add_argument("--sites", nargs="+", required=True, help="site YAML files, one virtual site each")
    sim.add_argument("--run-config", required=True, help="run YAML (stages, rounds, strategies, probes)")
    sim.add_argument("--out", default=None, help="run folder (default runs/<name from the run config>)")
    sim.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    sim.add_argument("--cpus-per-site", type=int, default=1, help="CPU cores reserved per virtual site (default 1)")
    sim.set_defaults(handler=_simulate)

    synth = groups.add_parser("synthesize", help="audited synthetic scans (BIDS + data card) from a trained DiT")
    synth.add_argument("--checkpoint", required=True, help="run folder, or a DiT checkpoint (.json) inside one")
    synth.add_argument("--n", type=int, required=True, help="number of scans to generate (before the audit)")
    synth.add_argument("--conditions", default=None, help="TSV of age, sex, diagnosis, modality, field_strength, "
                       "mmse (n/a = missing), cycled to --n (default: a balanced table)")
    synth.add_argument("--out", required=True, help="output folder: bids/, datacard.json/.md, staging/, audit-run/")
    synth.add_argument("--sites", nargs="+", default=None, help="site YAMLs: run the federated audit in a simulation")
    synth.add_argument("--audit", default=None, help="privacy_audit.json of a deployment's audit run of this set")
    synth.add_argument("--no-audit", action="store_true", help="export without an audit (the data card says so)")
    synth.add_argument("--no-membership", action="store_true", help="skip the DiT membership-inference test")
    synth.add_argument("--steps", type=int, default=25, help="ODE steps (default 25)")
    synth.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale (default 1.5)")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(handler=_synthesize)

    demo = groups.add_parser("demo", help="the end-to-end demo (README command 1)")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from braing3n_core.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
