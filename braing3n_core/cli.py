"""The `braing3n` command.

Each sub-command is a thin function that parses its arguments and calls one core function; the heavy
imports happen inside the handlers so that `braing3n --help` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

# The sampler's defaults (models/diffusion.DEFAULT_STEPS, generation/sampling.DEFAULT_BATCH_SIZE), restated
# here so that `--help` needs no torch import; tests/test_diffusion.py checks that they agree.
SAMPLE_STEPS = 12
SAMPLE_BATCH = 8

if TYPE_CHECKING:
    from braing3n_core.generation.condition_table import ConditionRow

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
    from braing3n_core.data.checks import check_site, render_site_report
    from braing3n_core.site_config import SiteConfig

    config = SiteConfig.from_yaml(args.site_yaml)
    report = check_site(config)
    render_site_report(report, verbose=args.verbose)
    return 0 if report.usable_scans else 1


def _comma_list(values: list[str] | None) -> list[str]:
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def _deployment(run: Callable[[], int]) -> int:
    """Run a deployment command; Flower failures and Ctrl-C end it with a message, not a traceback."""
    from braing3n_core.ops.deploy import DeploymentError

    try:
        return run()
    except DeploymentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; every process started here was stopped.", file=sys.stderr)
        return 130


def _synced(consortium) -> int:
    from braing3n_core.ops.deploy import sync_registrations

    sync_registrations(consortium)
    return 0


def _consortium_init(args: argparse.Namespace) -> int:
    from braing3n_core.ops.consortium import init_consortium

    consortium = init_consortium(Path(args.dir), _comma_list([args.sites]), args.host, _comma_list(args.ip),
                                 _comma_list(args.dns), server_days=args.days)
    layout = consortium.layout
    print(f"consortium folder {layout.root}")
    print(f"  SuperLink certificate {layout.server_cert}: DNS {', '.join(consortium.dns_names)}; "
          f"IP {', '.join(consortium.ip_addresses)}")
    print(f"  release signing key {layout.release_key} (public: {layout.release_pub})")
    for site, entry in sorted(consortium.sites.items()):
        print(f"  site {site}: hand over {layout.bundle(site)} (key {entry.fingerprint})")
    print("Keep ca/ca.key, superlink/server.key and release/release.key on the consortium server only.")
    return 0


def _consortium_add_site(args: argparse.Namespace) -> int:
    from braing3n_core.ops.consortium import add_site, load_consortium
    from braing3n_core.ops.deploy import running_superlink

    entry = add_site(Path(args.dir), args.site, Path(args.public_key) if args.public_key else None)
    consortium = load_consortium(Path(args.dir))
    print(f"site {args.site}: hand over {consortium.layout.bundle(args.site)} (key {entry.fingerprint})")
    if running_superlink(consortium) is not None:  # register now; otherwise `consortium serve` does at start
        return _deployment(lambda: _synced(consortium))
    return 0


def _consortium_rekey(args: argparse.Namespace) -> int:
    from braing3n_core.ops.consortium import load_consortium, rekey_site
    from braing3n_core.ops.deploy import running_superlink

    entry = rekey_site(Path(args.dir), args.site, Path(args.public_key) if args.public_key else None)
    consortium = load_consortium(Path(args.dir))
    print(f"site {args.site}: new key {entry.fingerprint}; hand over {consortium.layout.bundle(args.site)}")
    if running_superlink(consortium) is not None:  # swap the keys now; otherwise `consortium serve` does at start
        return _deployment(lambda: _synced(consortium))
    return 0


def _consortium_revoke(args: argparse.Namespace) -> int:
    from braing3n_core.ops.deploy import revoke

    return _deployment(lambda: revoke(Path(args.dir), args.site) or 0)


def _consortium_serve(args: argparse.Namespace) -> int:
    from braing3n_core.ops.deploy import serve

    return _deployment(lambda: serve(Path(args.dir), args.address, args.port, print_only=args.print_command))


def _consortium_run(args: argparse.Namespace) -> int:
    from braing3n_core.ops.deploy import submit

    def run() -> int:
        result = submit(Path(args.dir), Path(args.run_config), Path(args.out) if args.out else None, resume=args.resume,
                        superlink=args.superlink, expected_sites=args.expect_sites, sign=not args.no_sign,
                        print_only=args.print_command)
        if result is not None:
            print(f"federated run complete in {result.seconds:.0f} s: {result.run_dir}"
                  + (f"; signed release {result.release}" if result.release else ""))
        return 0

    return _deployment(run)


def _site_join(args: argparse.Namespace) -> int:
    from braing3n_core.ops.deploy import join

    return _deployment(lambda: join(Path(args.site_yaml), Path(args.credentials), args.superlink, args.port,
                                    rejoin_wait_s=args.rejoin_wait, print_only=args.print_command))


def _release_sign(args: argparse.Namespace) -> int:
    from braing3n_core.ops.release import sign_directory, sign_run

    path = Path(args.path)
    if (path / "server_state.json").is_file() and (path / "run.yaml").is_file():
        manifest = sign_run(path, Path(args.key), Path(args.out) if args.out else None)
    else:
        manifest = sign_directory(path, Path(args.key), {"kind": args.kind, "name": path.resolve().name})
    print(manifest)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from braing3n_core.ops.release import verify_directory

    report = verify_directory(Path(args.path), Path(args.public_key) if args.public_key else None)
    print(report.summary())
    if not report.ok:
        return 1
    return 0 if report.trusted else 3


def _train(args: argparse.Namespace) -> int:
    from braing3n_core.site_config import load_site_configs
    from braing3n_core.training.centralized import TrainOptions, train_centralized

    options = TrainOptions(
        stage=args.stage, preset=args.preset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps, seed=args.seed, device=args.device, out_dir=Path(args.out),
        encoder=Path(args.encoder) if args.encoder else None, checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every, num_workers=args.num_workers, resume=not args.restart,
    )
    final = train_centralized(load_site_configs(args.sites), options)
    print(final)
    return 0


def _probe(args: argparse.Namespace) -> int:
    from braing3n_core.checkpoint import CheckpointError
    from braing3n_core.jobs.probe import ProbeError, ProbeOptions, probe_sites
    from braing3n_core.site_config import load_site_configs

    try:
        options = ProbeOptions(
            preset=args.preset, encoder=Path(args.encoder) if args.encoder else None, random_init=args.random_init,
            seed=args.seed, folds=args.folds, device=args.device, batch_size=args.batch_size,
            tasks=tuple(_comma_list(args.tasks)) if args.tasks else None,
        )
        run = probe_sites(load_site_configs(args.sites), options, Path(args.out))
    except (ProbeError, CheckpointError) as error:  # bad input exits 2, as a bad site YAML does in main()
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(run.summary())
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from braing3n_core.ops.simulate import SimulationError, simulate

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
    from braing3n_core.jobs.synthesize import SynthesisError, synthesize
    from braing3n_core.ops.simulate import SimulationError

    try:
        result = synthesize(
            Path(args.checkpoint), args.n, Path(args.out), conditions=Path(args.conditions) if args.conditions else None,
            sites=[Path(p) for p in args.sites or []], audit=Path(args.audit) if args.audit else None,
            skip_audit=args.no_audit, stage_only=args.stage_only, steps=args.steps, guidance_scale=args.guidance,
            seed=args.seed, membership=not args.no_membership,
            signing_key=Path(args.signing_key) if args.signing_key else None,
        )
    except (SynthesisError, SimulationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.stage_only:
        print(f"{result.generated} synthetic scans staged in {result.out / 'staging'}; run the federated audit with "
              f"the run config {result.datacard}, then call again with --audit <run-dir>/privacy_audit.json")
        return 0
    print(f"{result.exported} of {result.generated} synthetic scans exported to {result.bids} "
          f"({len(result.excluded)} excluded by the audit); data card {result.datacard}")
    if result.release is not None:
        print(f"signed: {result.release} (check with `braing3n verify {result.bids} --public-key release.pub`)")
    return 0


def _evaluate_generation(args: argparse.Namespace) -> int:
    from braing3n_core.config import ConfigError
    from braing3n_core.jobs.evaluate_generation import evaluate_generation, summary_line
    from braing3n_core.ops.simulate import SimulationError

    try:
        guidance = [float(g) for g in args.guidance.split(",") if g.strip()]
    except ValueError:
        print(f"error: --guidance {args.guidance!r}: give numbers separated by commas, e.g. 1.0,1.5,3.0", file=sys.stderr)
        return 2
    try:
        result = evaluate_generation(Path(args.run_dir), [Path(p) for p in args.sites or []], Path(args.out), n=args.n,
                                     steps=args.steps, guidance=guidance, default_guidance=args.default_guidance,
                                     forecast=args.forecast, seed=args.seed, config_only=args.config_only)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except SimulationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.config_only:
        print(f"evaluation run config written to {result}; submit it with `flwr run` (braing3n consortium run)")
        return 0
    print(summary_line(result))
    print(f"full results: {Path(args.out) / 'generation_eval.json'}")
    return 0


def _generation(run: Callable[[], int]) -> int:
    """Run `sample` / `forecast`: bad input (a checkpoint, site, scan or argument) is exit code 2 and a
    message naming the file or argument, not a traceback."""
    from braing3n_core.checkpoint import CheckpointError
    from braing3n_core.data.transforms import PreprocessingError
    from braing3n_core.generation.models import GenerationError

    try:
        return run()
    except (GenerationError, CheckpointError, PreprocessingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _device_or_error(name: str) -> str | None:
    import torch

    from braing3n_core.runtime import resolve_device

    try:
        device = resolve_device(name)
    except (RuntimeError, ValueError) as error:
        print(f"error: --device: {error}", file=sys.stderr)
        return None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        print(f"error: --device: {name!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)", file=sys.stderr)
        return None
    return str(device)


def _sample(args: argparse.Namespace) -> int:
    from braing3n_core.config import ConfigError
    from braing3n_core.generation.condition_table import ConditionRow, read_conditions
    from braing3n_core.jobs.sample import export_samples

    given = [f"--{name.replace('_', '-')}" for name in ("age", "sex", "diagnosis", "modality", "field_strength", "mmse")
             if getattr(args, name) is not None]
    if args.conditions and given:
        raise ConfigError(f"--conditions and {', '.join(given)}: give the conditions either as a table or as options")
    if args.n is not None and args.n < 1:
        raise ConfigError(f"--n: need at least one sample, got {args.n}")
    if args.conditions:
        rows = read_conditions(Path(args.conditions))
        rows = [rows[i % len(rows)] for i in range(args.n)] if args.n else rows
    else:
        values = {name: getattr(args, name) for name in ("age", "sex", "diagnosis", "modality", "field_strength", "mmse")}
        row = ConditionRow.checked(values, lambda column: f"--{column.replace('_', '-')}")
        rows = [row] * (args.n or 1)
    device = _device_or_error(args.device)
    if device is None:
        return 2

    def run() -> int:
        path = export_samples(Path(args.source), rows, Path(args.out), decoder=Path(args.decoder) if args.decoder else None,
                              conditions_file=Path(args.conditions) if args.conditions else None, steps=args.steps,
                              guidance_scale=args.guidance, seed=args.seed, batch_size=args.batch_size, device=device)
        import json

        record = json.loads(path.read_text())
        print(f"{len(rows)} samples in {path.parent} ({record['seconds_per_volume']:.2f} s per volume on "
              f"{record['settings']['device']}); montage {path.parent / record['montage']}; {path}")
        return 0

    return _generation(run)


def _scan_forecast_row(args: argparse.Namespace) -> ConditionRow | None:
    """`forecast --scan`: what is known at the scan, checked (None for the --site path); the two ways of
    naming the baseline are exclusive, and a scan in no site needs its age."""
    from braing3n_core.config import ConfigError
    from braing3n_core.generation.condition_table import ConditionRow

    labels = [f"--{n.replace('_', '-')}" for n in ("age", "sex", "diagnosis", "field_strength") if getattr(args, n)]
    if args.scan is None:
        if args.site is None or args.subject is None:
            raise ConfigError("forecast: give --site and --subject, or --scan with --age")
        if labels:
            raise ConfigError(f"{', '.join(labels)}: only with --scan (a site's tables give its subjects' labels)")
        return None
    if args.site is not None or args.subject is not None or args.session is not None:
        raise ConfigError("--scan: a scan in no site; leave out --site, --subject and --session")
    if args.age is None:
        raise ConfigError("--age: required with --scan (years at the scan; the forecast is conditioned on age + --years)")
    values = {"age": args.age, "sex": args.sex, "diagnosis": args.diagnosis, "modality": args.modality,
              "field_strength": args.field_strength}
    return ConditionRow.checked(values, lambda column: f"--{column.replace('_', '-')}")


def _forecast(args: argparse.Namespace) -> int:
    from braing3n_core.config import ConfigError
    from braing3n_core.jobs.forecast import export_forecast
    from braing3n_core.labels import Modality

    if not (args.years > 0 and args.years < float("inf")):
        raise ConfigError(f"--years: the forecast interval must be a positive number of years, got {args.years}")
    scan_row = _scan_forecast_row(args)
    device = _device_or_error(args.device)
    if device is None:
        return 2

    def run() -> int:
        import json

        if scan_row is not None:
            from braing3n_core.jobs.forecast import export_scan_forecast

            path = export_scan_forecast(Path(args.run_dir), Path(args.scan), scan_row, args.years, Path(args.out),
                                        steps=args.steps, guidance_scale=args.guidance, seed=args.seed, device=device)
        else:
            path = export_forecast(Path(args.run_dir), Path(args.site), args.subject, args.session,
                                   Modality(args.modality), args.years, Path(args.out), steps=args.steps,
                                   guidance_scale=args.guidance, seed=args.seed, device=device)
        record = json.loads(path.read_text())
        scores = record["scores"]
        scored = (f"PSNR vs the real follow-up {scores['forecast/psnr']:.2f} dB (baseline as-is "
                  f"{scores['forecast/baseline_psnr']:.2f} dB)" if scores else record["scores_note"])
        who = Path(args.scan).name if scan_row is not None else args.subject
        print(f"forecast of {who} +{args.years:g} y: {path.parent / record['nifti']}; {scored}; {path}")
        return 0

    return _generation(run)


def _demo(args: argparse.Namespace) -> int:
    from braing3n_core.jobs.demo import DemoError, run_demo
    from braing3n_core.ops.simulate import SimulationError

    try:
        sized = {"subjects_per_site": args.subjects} if args.subjects else {}
        return run_demo(out_dir=Path(args.out), seed=args.seed, resume=args.resume, **sized)
    except (DemoError, SimulationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; continue later with `braing3n demo --resume`.", file=sys.stderr)
        return 130


def _report(args: argparse.Namespace) -> int:
    from braing3n_core.jobs.report import ReportError, write_report

    run_dir = Path(args.run_dir)
    try:
        if args.sites:
            from braing3n_core.jobs.showcase import ShowcaseError, run_showcase
            from braing3n_core.site_config import load_site_configs

            try:
                run_showcase(run_dir, load_site_configs(args.sites))
            except ShowcaseError as error:
                print(f"error: {error}", file=sys.stderr)
                return 1
        path = write_report(run_dir, Path(args.out) if args.out else None, embed_images=args.embed)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _embed(args: argparse.Namespace) -> int:
    from braing3n_core.jobs.embed import export_embeddings

    device = _device_or_error(args.device)
    if device is None:
        return 2

    def run() -> int:
        path, embeddings = export_embeddings(Path(args.encoder), Path(args.out), paths=[Path(p) for p in args.paths],
                                             site=Path(args.site) if args.site else None, device=device)
        for problem in embeddings.skipped:
            print(f"skipped {problem.path.name}: {problem.reason}", file=sys.stderr)
        print(f"{len(embeddings.scans)} scans embedded (tokens {tuple(embeddings.tokens.shape)}, pooled "
              f"{tuple(embeddings.pooled.shape)}), {len(embeddings.skipped)} skipped: {path.parent / 'embeddings.safetensors'}; "
              f"{path}")
        return 0

    return _generation(run)


def _reconstruct(args: argparse.Namespace) -> int:
    from braing3n_core.jobs.reconstruct import export_reconstruction

    device = _device_or_error(args.device)
    if device is None:
        return 2

    def run() -> int:
        import json

        path = export_reconstruction(Path(args.scan), Path(args.run), Path(args.out),
                                     decoder=Path(args.decoder) if args.decoder else None, device=device)
        record = json.loads(path.read_text())
        metrics, files = record["metrics"], record["files"]
        print(f"reconstruction of {Path(args.scan).name}: PSNR {metrics['val/psnr_brain']:.2f} dB, SSIM "
              f"{metrics['val/ssim_brain']:.3f} in the brain; {path.parent / files['reconstruction_native']} (the "
              f"scan's own grid), {path.parent / files['reconstruction']} (the model's); {path}")
        return 0

    return _generation(run)


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
    join = site.add_parser("join", help="run this site's Flower SuperNode (TLS, site key) until stopped")
    join.add_argument("site_yaml", help="site config, e.g. sites/site-a.yaml (its site_id must match the credentials)")
    join.add_argument("--credentials", required=True, help="this site's bundle from `consortium init` (ca.crt, supernode.key)")
    join.add_argument("--superlink", required=True, help="the consortium SuperLink as HOST:PORT")
    join.add_argument("--port", type=int, default=9094, help="local port of the SuperNode's ClientApp API (loopback; default 9094)")
    join.add_argument("--rejoin-wait", type=float, default=120.0,
                      help="seconds to keep retrying while the SuperLink refuses the key (a crashed session expires in <= 60 s)")
    join.add_argument("--print-command", action="store_true", help="print the flower-supernode command and exit")
    join.set_defaults(handler=_site_join)

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

    probe = groups.add_parser("probe", help="linear probes (age, sex, diagnosis, ...) on a frozen or random-init encoder")
    probe.add_argument("--sites", nargs="+", required=True, help="site YAML files (their scans are pooled)")
    which = probe.add_mutually_exclusive_group(required=True)
    which.add_argument("--encoder", default=None, help="stage-1 (mae) checkpoint, e.g. runs/x/checkpoints/mae/final.json")
    which.add_argument("--random-init", action="store_true", help="the untrained encoder `train mae --seed` starts from")
    probe.add_argument("--preset", default="small", choices=["paper", "small", "tiny"], help="must be the encoder's")
    probe.add_argument("--out", required=True, help="folder for the JSON report (probes-<encoder>-seed<S>.json)")
    probe.add_argument("--seed", type=int, default=0, help="random-init weights and cross-validation folds")
    probe.add_argument("--folds", type=int, default=5, help="outer subject-grouped cross-validation folds (default 5)")
    probe.add_argument("--tasks", action="append", default=None, help="task names, comma-separated (default: all the labels support)")
    probe.add_argument("--batch-size", type=int, default=4, help="volumes per encoder call (default 4)")
    probe.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    probe.set_defaults(handler=_probe)

    consortium = groups.add_parser("consortium", help="the consortium's keys, SuperLink and federated jobs").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    init = consortium.add_parser("init", help="CA, SuperLink TLS certificate, site keys and bundles, release key")
    init.add_argument("dir", help="new consortium folder (private keys are written 0600)")
    init.add_argument("--sites", required=True, help="comma-separated site ids, e.g. site-a,site-b")
    init.add_argument("--host", required=True, help="the SuperLink's DNS name (or IP) as sites dial it")
    init.add_argument("--ip", action="append", help="extra IP address SAN(s), comma-separated or repeated")
    init.add_argument("--dns", action="append", help="extra DNS name SAN(s), comma-separated or repeated")
    init.add_argument("--days", type=int, default=825, help="SuperLink certificate validity (default 825 days)")
    init.set_defaults(handler=_consortium_init)
    add = consortium.add_parser("add-site", help="a credentials bundle for a new site")
    add.add_argument("dir")
    add.add_argument("site", help="site id (must match site_id in the site's YAML)")
    add.add_argument("--public-key", default=None, help="the site's own OpenSSH ECDSA public key instead of a new key pair")
    add.set_defaults(handler=_consortium_add_site)
    rekey = consortium.add_parser("rekey", help="a new key for a site (lost, leaked or revoked key); the old one is unregistered")
    rekey.add_argument("dir")
    rekey.add_argument("site")
    rekey.add_argument("--public-key", default=None, help="the site's own OpenSSH ECDSA public key instead of a new key pair")
    rekey.set_defaults(handler=_consortium_rekey)
    revoke = consortium.add_parser("revoke", help="revoke a site: its key is unregistered and refused from then on")
    revoke.add_argument("dir")
    revoke.add_argument("site")
    revoke.set_defaults(handler=_consortium_revoke)
    serve = consortium.add_parser("serve", help="run the SuperLink (TLS, SuperNode authentication) until stopped")
    serve.add_argument("dir")
    serve.add_argument("--address", default="0.0.0.0", help="interface to listen on (default 0.0.0.0)")
    serve.add_argument("--port", type=int, default=9092, help="the one port sites connect to (default 9092)")
    serve.add_argument("--print-command", action="store_true", help="print the Flower commands and exit")
    serve.set_defaults(handler=_consortium_serve)
    crun = consortium.add_parser("run", help="submit a federated job to the SuperLink and stream its progress")
    crun.add_argument("dir")
    crun.add_argument("--run-config", required=True, help="run YAML (stages, rounds, strategies, probes)")
    crun.add_argument("--out", default=None, help="run folder on this server (default runs/<name>)")
    crun.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    crun.add_argument("--superlink", default=None, help="HOST:PORT (default: the SuperLink `serve` runs here)")
    crun.add_argument("--expect-sites", type=int, default=None, help="sites to wait for (default: every active site)")
    crun.add_argument("--no-sign", action="store_true", help="do not sign the finished run's release")
    crun.add_argument("--print-command", action="store_true", help="print the flwr run command and exit")
    crun.set_defaults(handler=_consortium_run)

    release = groups.add_parser("release", help="signed releases").add_subparsers(dest="action", required=True, metavar="ACTION")
    sign = release.add_parser("sign", help="sign a finished run (into RUN_DIR/release/) or a dataset folder")
    sign.add_argument("path", help="run folder or dataset folder")
    sign.add_argument("--key", required=True, help="the consortium's Ed25519 key (release/release.key)")
    sign.add_argument("--out", default=None, help="release folder for a run (default RUN_DIR/release)")
    sign.add_argument("--kind", default="dataset", help="what a signed folder holds (metadata; default dataset)")
    sign.set_defaults(handler=_release_sign)
    verify = groups.add_parser("verify", help="check a signed release: names missing, extra or changed files and bad signatures")
    verify.add_argument("path", help="release folder or its RELEASE.json")
    verify.add_argument("--public-key", default=None, help="the consortium's release.pub (without it only integrity is checked)")
    verify.set_defaults(handler=_verify)

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
    synth.add_argument("--stage-only", action="store_true", help="generate and stage only, and write the audit "
                       "run config for a deployment's `flwr run`")
    synth.add_argument("--no-membership", action="store_true", help="skip the DiT membership-inference test")
    synth.add_argument("--steps", type=int, default=SAMPLE_STEPS, help=f"ODE steps (default {SAMPLE_STEPS})")
    synth.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale (default 1.5)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--signing-key", default=None,
                       help="the consortium's Ed25519 release key: sign the exported BIDS folder (bids/RELEASE.json)")
    synth.set_defaults(handler=_synthesize)

    from braing3n_core.labels import MODALITIES  # stdlib-only module: --help stays instant

    modalities = [m.value for m in MODALITIES]
    smp = groups.add_parser("sample", help="conditional samples from a trained DiT + decoder (NIfTI, montage, JSON)")
    smp.add_argument("source", metavar="RUN_DIR_OR_DIT_CKPT", help="run folder, or a DiT checkpoint (.json) inside one")
    smp.add_argument("--out", required=True, help="output folder: sample-NNNN.nii.gz, samples.png, sample.json")
    smp.add_argument("--conditions", default=None, help="TSV with a header among age, sex, diagnosis, modality, "
                     "field_strength, mmse (modality required; n/a = unconditioned), one sample per row")
    smp.add_argument("--age", default=None, help="years")
    smp.add_argument("--sex", default=None, help="F or M")
    smp.add_argument("--diagnosis", default=None, help="CN, MCI, AD or glioma")
    smp.add_argument("--modality", default=None, choices=modalities, help="required unless --conditions")
    smp.add_argument("--field-strength", dest="field_strength", default=None, help="tesla: 1.5 or 3")
    smp.add_argument("--mmse", default=None, help="0-30")
    smp.add_argument("--n", type=int, default=None, help="samples (default 1, or one per --conditions row; rows cycle)")
    smp.add_argument("--decoder", default=None, help="decoder checkpoint (default: the run folder's)")
    smp.add_argument("--steps", type=int, default=SAMPLE_STEPS, help=f"ODE steps (default {SAMPLE_STEPS})")
    smp.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale (default 1.5)")
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--batch-size", type=int, default=SAMPLE_BATCH, help=f"samples per ODE solve (default {SAMPLE_BATCH})")
    smp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (bf16 autocast on CUDA)")
    smp.set_defaults(handler=_sample)

    fct = groups.add_parser("forecast", help="a subject's follow-up scan forecast from a baseline scan")
    fct.add_argument("run_dir", metavar="RUN_DIR", help="run folder (DiT, decoder and frozen encoder), or a DiT checkpoint in one")
    fct.add_argument("--site", default=None, help="the subject's site YAML (run where that site's data is)")
    fct.add_argument("--subject", default=None, help="e.g. sub-001 (with --site)")
    fct.add_argument("--scan", default=None, help="instead of --site/--subject: a baseline NIfTI in no site, with --age "
                     "[--sex --diagnosis --field-strength] as known at that scan")
    fct.add_argument("--age", default=None, help="with --scan: years at the scan")
    fct.add_argument("--sex", default=None, help="with --scan: F or M")
    fct.add_argument("--diagnosis", default=None, help="with --scan: CN, MCI, AD or glioma")
    fct.add_argument("--field-strength", dest="field_strength", default=None, help="with --scan: tesla, 1.5 or 3")
    fct.add_argument("--session", default=None, help="baseline session, e.g. ses-01 (default: the earliest)")
    fct.add_argument("--modality", required=True, choices=modalities)
    fct.add_argument("--years", type=float, required=True, help="interval after the baseline, in years")
    fct.add_argument("--out", required=True, help="output folder: forecast.nii.gz, forecast.png, forecast.json")
    fct.add_argument("--steps", type=int, default=SAMPLE_STEPS, help=f"ODE steps (default {SAMPLE_STEPS})")
    fct.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale (default 1.5)")
    fct.add_argument("--seed", type=int, default=0)
    fct.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (bf16 autocast on CUDA)")
    fct.set_defaults(handler=_forecast)

    evg = groups.add_parser("evaluate-generation", help="federated proof of generation and forecasting: adherence, "
                            "FD/MMD vs real-vs-real, guidance sweep, forecasts vs no-change and a linear trend")
    evg.add_argument("run_dir", metavar="RUN_DIR", help="the trained run folder (DiT, decoder, frozen encoder, probes)")
    evg.add_argument("--sites", nargs="+", help="site YAMLs: the evaluation runs as a Flower simulation of these sites")
    evg.add_argument("--out", required=True, help="the evaluation's run folder (generation_eval.json)")
    evg.add_argument("--n", type=int, default=32, help="samples per generated set (default 32)")
    evg.add_argument("--steps", type=int, default=SAMPLE_STEPS, help=f"ODE steps (default {SAMPLE_STEPS})")
    evg.add_argument("--guidance", default="1.0,1.5,3.0", help="guidance sweep, comma-separated (default 1.0,1.5,3.0)")
    evg.add_argument("--default-guidance", dest="default_guidance", type=float, default=1.5,
                     help="guidance of the swapped-conditions control and of forecasts (default 1.5)")
    evg.add_argument("--forecast", action="store_true", help="also forecast every held-out subject with a follow-up")
    evg.add_argument("--seed", type=int, default=0)
    evg.add_argument("--config-only", dest="config_only", action="store_true",
                     help="write <out>.yaml for a deployment's `flwr run` instead of simulating")
    evg.set_defaults(handler=_evaluate_generation)

    demo = groups.add_parser("demo", help="the end-to-end demo (README command 1)")
    demo.add_argument("--out", default="runs/demo", help="demo folder: cohort, federated run, report (default runs/demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--subjects", type=int, default=None, help="subjects per site (default: sized for 15 min on 2 cores)")
    demo.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out and rewrite its report")
    demo.set_defaults(handler=_demo)

    report = groups.add_parser("report", help="HTML report of a federated run folder (curves, probes, samples)")
    report.add_argument("run_dir", help="run folder written by `braing3n simulate` or `braing3n demo`")
    report.add_argument("--sites", nargs="+", default=None,
                        help="site YAMLs of the run: first compute reconstructions, samples and a forecast on their data")
    report.add_argument("--out", default=None, help="HTML path (default RUN_DIR/report.html)")
    report.add_argument("--embed", action="store_true", help="embed the figures in the HTML (one self-contained file)")
    report.set_defaults(handler=_report)

    embed = groups.add_parser("embed", help="frozen-encoder features of any scans (safetensors + manifest)")
    embed.add_argument("paths", nargs="*", metavar="SCAN", help="NIfTI files (or use --site)")
    embed.add_argument("--site", default=None, help="a site YAML: embed every usable scan of that site instead")
    embed.add_argument("--encoder", required=True, help="stage-1 (mae) checkpoint; its preset fixes the preprocessing")
    embed.add_argument("--out", required=True, help="output folder: embeddings.safetensors, manifest.json")
    embed.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (bf16 autocast on CUDA)")
    embed.set_defaults(handler=_embed)

    rec = groups.add_parser("reconstruct", help="a scan through a run's encoder and decoder, on the model's grid and the scan's own")
    rec.add_argument("scan", metavar="SCAN", help="NIfTI file (.nii or .nii.gz), any orientation and voxel size")
    rec.add_argument("--run", required=True, help="run folder (frozen encoder and decoder)")
    rec.add_argument("--out", required=True, help="output folder: reconstruction[_native].nii.gz, input.nii.gz, "
                     "reconstruction.png, reconstruct.json")
    rec.add_argument("--decoder", default=None, help="decoder checkpoint (default: the run folder's)")
    rec.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (bf16 autocast on CUDA)")
    rec.set_defaults(handler=_reconstruct)
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
