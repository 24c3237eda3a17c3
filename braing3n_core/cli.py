"""The `braing3n` command.

Each sub-command is a thin function that parses its arguments and calls one core function; the heavy
imports happen inside the handlers so that `braing3n --help` stays instant. Arguments that name files are
checked while parsing (cheap `type=` functions), so a mistyped path fails in a fraction of a second with a
message naming it instead of after torch has loaded. `main` maps every error to the one exit-code contract
of `braing3n_core.errors`: results go to stdout, messages and progress to stderr, never a traceback unless
`-v` asks for one.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from braing3n_core.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, BadInput, JobFailed

if TYPE_CHECKING:
    from braing3n_core.generation.condition_table import ConditionRow

Handler = Callable[[argparse.Namespace], int]

# The sampler's defaults (models/diffusion.DEFAULT_STEPS, generation/sampling.DEFAULT_BATCH_SIZE), restated
# here so that `--help` needs no torch import; tests/test_diffusion.py checks that they agree.
SAMPLE_STEPS = 12
SAMPLE_BATCH = 8

DESCRIPTION = """\
braing3n: federated training of a 3D brain-MRI foundation model across hospitals, on Flower.

A hospital checks its BIDS data and joins the consortium's federation; the consortium trains an MAE
encoder, a decoder and a conditional diffusion model without any scan leaving a site, then probes,
generates, forecasts and signs releases."""

EPILOG = """\
examples:
  braing3n site check sites/site-a.yaml                 list a site's scans and every problem found
  braing3n simulate --sites sites/demo/*.yaml --run-config runs-config/tiny.yaml --out runs/tiny
  braing3n sample runs/tiny --modality T1w --age 75 --sex F --diagnosis AD --out samples

exit codes (every command):
  0    success
  1    the job ran and failed (a process died, no usable scan, a release that does not verify)
  2    bad usage or bad input (a missing or invalid file, setting or argument: the message names it)
  130  interrupted (Ctrl-C or SIGTERM)

-q/--quiet and -v/--verbose may come before or after the command. `braing3n COMMAND --help` shows a
command's options; a command without its action (`braing3n site`) lists its actions."""


# --- help ----------------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks; every option shows its default unless the help already says
    what happens without it (None defaults) or it is an on/off flag."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS  # 0 is a value
        if ("default" in text or not action.option_strings or unset
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        return f"{text} (default: %(default)s)"


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("braing3n-fl")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        from braing3n_core import __version__

        return __version__


# --- arguments checked while parsing ---------------------------------------------------------------------------


def _existing_file(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: is a folder, not a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{path}: file not found" if not path.exists() else f"{path}: not a regular file")
    return path


def _existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{path}: does not exist")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: is a file, not a folder")
    return path


def _existing_path(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{path}: does not exist")
    return path


def _yaml_file(text: str) -> Path:
    """A readable YAML mapping (UTF-8 text, not a folder or a scan); its settings are validated later."""
    from braing3n_core.config import ConfigError, read_yaml_mapping

    try:
        read_yaml_mapping(Path(text))
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return Path(text)


def _release_path(text: str) -> Path:
    path = _existing_path(text)
    if path.is_file() and path.name != "RELEASE.json":
        raise argparse.ArgumentTypeError(f"{path}: a file, not a release; give the release folder (the one holding "
                                         "RELEASE.json) or its RELEASE.json")
    return path


_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(\d{1,5})$")


def _host_port(text: str) -> str:
    match = _HOST_PORT.match(text.strip())
    if match is None or not 1 <= int(match.group(2)) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: give HOST:PORT, e.g. fl.consortium.example:9092 "
                                         "(the port `consortium serve` listens on)")
    return text.strip()


def _voxel_mm(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of millimetres between 1 and 4") from None
    if not 1.0 <= value <= 4.0:
        raise argparse.ArgumentTypeError(f"{text}: the template is simulated at 1 to 4 mm")
    return value


def _number(kind: type[int | float], minimum: float, inclusive: bool, bound: str) -> Callable[[str], float]:
    """An argparse `type=` for a number of `kind` at least (or, not `inclusive`, more than) `minimum`."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give {'a whole number' if kind is int else 'a number'}") from None
        if not (value >= minimum if inclusive else value > minimum):
            raise argparse.ArgumentTypeError(f"{text}: must be {bound}")
        return value
    return parse


_positive_int = _number(int, 1, True, "at least 1")
_positive_float = _number(float, 0.0, False, "more than 0")
_non_negative_float = _number(float, 0.0, True, "0 or more")


# --- output ----------------------------------------------------------------------------------------------------


def _say(args: argparse.Namespace, text: str) -> None:
    """An informational line on stdout; `-q` silences it (errors and --json output are never silenced)."""
    if not args.quiet:
        print(text, flush=True)


def _note(args: argparse.Namespace, text: str) -> None:
    """A message about the run rather than its result, on stderr so stdout stays the result."""
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


def _print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, sort_keys=False, default=str))


def _console() -> Any:
    """rich's console as the environment asks: no colour with NO_COLOR, plain text into a pipe or a log."""
    from rich.console import Console

    return Console()


def _comma_list(values: list[str] | None) -> list[str]:
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def _optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None


# --- data ------------------------------------------------------------------------------------------------------


def _cohort_make(args: argparse.Namespace) -> int:
    from braing3n_core.config import ConfigError
    from braing3n_core.data.cohort import CohortSpec, existing_cohort, make_cohort, summarize_cohort

    spec = CohortSpec(n_sites=args.sites, subjects_per_site=args.subjects, seed=args.seed, voxel_mm=args.voxel_mm,
                      workers=args.workers, progress=not args.quiet)
    out, sites_dir = Path(args.out), _optional_path(args.sites_dir)
    existing = existing_cohort(spec, out, sites_dir)
    if existing and not args.force:
        shown = ", ".join(str(p) for p in existing[:4]) + (f" and {len(existing) - 4} more" if len(existing) > 4 else "")
        raise ConfigError(f"{out}: holds a cohort already ({shown}); pass --force to replace it, or choose another --out")
    started = time.perf_counter()
    site_yamls = make_cohort(spec, out_dir=out, sites_dir=sites_dir)
    for path in site_yamls:
        _say(args, str(path))
    summary = summarize_cohort(site_yamls)
    _note(args, f"cohort: {summary.sites} sites, {summary.subjects} subjects, {summary.sessions} sessions, "
                f"{summary.scans} scans in {time.perf_counter() - started:.1f} s: {out}")
    return EXIT_OK


def _site_check(args: argparse.Namespace) -> int:
    from braing3n_core.config import ConfigError
    from braing3n_core.data.checks import check_site, render_site_report, site_report_json
    from braing3n_core.site_config import SiteConfig

    config = SiteConfig.from_yaml(args.site_yaml)
    if not config.data_root.is_dir():
        raise ConfigError(f"{args.site_yaml}: data_root {config.data_root} does not exist (or is not a folder)")
    # A hospital's dataset may be read-only: the check writes a cache only where the user chose one.
    cache = Path(args.cache_dir) if args.cache_dir else config.cache_dir
    report = check_site(config, progress=False if (args.quiet or args.json) else None, cache=cache)
    if args.json:
        _print_json(site_report_json(report, cache))
    elif args.quiet:
        print(f"{len(report.usable_scans)} usable scans, {len(report.excluded_files)} files excluded")
    else:
        render_site_report(report, verbose=args.verbose > 0, console=_console(), cache=cache)
    return EXIT_OK if report.usable_scans else EXIT_FAILED


# --- the consortium ----------------------------------------------------------------------------------------------


def _consortium_init(args: argparse.Namespace) -> int:
    from braing3n_core.ops.consortium import init_consortium

    consortium = init_consortium(Path(args.dir), _comma_list([args.sites]), args.host, _comma_list(args.ip),
                                 _comma_list(args.dns), server_days=args.days, force=args.force)
    layout = consortium.layout
    _say(args, f"consortium folder {layout.root}")
    _say(args, f"  SuperLink certificate {layout.server_cert}: DNS {', '.join(consortium.dns_names)}; "
               f"IP {', '.join(consortium.ip_addresses)}")
    _say(args, f"  release signing key {layout.release_key} (public: {layout.release_pub})")
    for site, entry in sorted(consortium.sites.items()):
        _say(args, f"  site {site}: hand over {layout.bundle(site)} (key {entry.fingerprint})")
    _say(args, "Keep ca/ca.key, superlink/server.key and release/release.key on the consortium server only.")
    return EXIT_OK


def _sync_if_running(args: argparse.Namespace) -> int:
    """Register a new or changed key now when the SuperLink runs here; otherwise `consortium serve` does at start."""
    from braing3n_core.ops.consortium import load_consortium
    from braing3n_core.ops.deploy import running_superlink, sync_registrations

    consortium = load_consortium(Path(args.dir))
    if running_superlink(consortium) is not None:
        sync_registrations(consortium, echo=lambda text: _say(args, text))
    return EXIT_OK


def _consortium_add_site(args: argparse.Namespace) -> int:
    from braing3n_core.ops.consortium import add_site, load_consortium

    entry = add_site(Path(args.dir), args.site, _optional_path(args.public_key))
    consortium = load_consortium(Path(args.dir))
    _say(args, f"site {args.site}: hand over {consortium.layout.bundle(args.site)} (key {entry.fingerprint})")
    return _sync_if_running(args)


def _consortium_rekey(args: argparse.Namespace) -> int:
    from braing3n_core.ops.consortium import load_consortium, rekey_site

    entry = rekey_site(Path(args.dir), args.site, _optional_path(args.public_key))
    consortium = load_consortium(Path(args.dir))
    _say(args, f"site {args.site}: new key {entry.fingerprint}; hand over {consortium.layout.bundle(args.site)}")
    return _sync_if_running(args)


def _consortium_revoke(args: argparse.Namespace) -> int:
    from braing3n_core.ops.deploy import revoke

    revoke(Path(args.dir), args.site, echo=lambda text: _say(args, text))
    return EXIT_OK


def _consortium_serve(args: argparse.Namespace) -> int:
    from braing3n_core.ops.deploy import serve

    page = None
    if args.status_port and not args.print_command:
        from braing3n_core.jobs.status_page import consortium_page

        page = consortium_page(Path(args.dir), args.status_address, args.status_port).start()
        print(f"status page (the latest `consortium run`): {page.url_with_token} (token also in "
              f"{Path(args.dir) / 'state' / 'status-token'})", flush=True)
    try:
        return serve(Path(args.dir), args.address, args.port, print_only=args.print_command,
                     echo=lambda text: _say(args, text) if not args.print_command else print(text))
    finally:
        if page is not None:
            page.close()


def _status_run_dir(path: Path) -> Path:
    """A run folder, or a consortium folder's latest submitted run."""
    if (path / "consortium.json").is_file():
        from braing3n_core.jobs.status import StatusError
        from braing3n_core.ops.deploy import latest_run

        latest = latest_run(path)
        if latest is None:
            raise StatusError(f"{path}: no run submitted from this consortium folder yet (`braing3n consortium run`)")
        return latest
    return path


def _consortium_status(args: argparse.Namespace) -> int:
    from braing3n_core.jobs.status import open_run, watch_run

    run_dir = _status_run_dir(Path(args.path))
    try:
        if args.serve is not None:
            from braing3n_core.jobs.status_page import run_page

            with run_page(run_dir, args.address, args.serve, refresh_s=args.interval) as server:
                print(f"status page of {run_dir.resolve()}: {server.url_with_token} (Ctrl-C stops it)", flush=True)
                while True:
                    time.sleep(3600)
        if args.json:
            _print_json(open_run(run_dir).snapshot().to_json())
        else:
            watch_run(run_dir, _console(), args.interval, once=args.once)
    except KeyboardInterrupt:  # how a live view is left: not an error
        return EXIT_OK
    return EXIT_OK


def _site_status(args: argparse.Namespace) -> int:
    from braing3n_core.federation.site_status import site_snapshot
    from braing3n_core.jobs.status import watch_site
    from braing3n_core.ops.deploy import supernode_record
    from braing3n_core.site_config import SiteConfig

    if args.json:
        site = SiteConfig.from_yaml(args.site_yaml)
        _print_json({**site_snapshot(site).to_json(), "supernode": supernode_record(site)})
        return EXIT_OK
    try:
        watch_site(Path(args.site_yaml), _console(), args.interval, once=args.once, supernode=supernode_record)
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK


def _consortium_run(args: argparse.Namespace) -> int:
    from braing3n_core.ops.deploy import submit

    result = submit(Path(args.dir), Path(args.run_config), _optional_path(args.out), resume=args.resume,
                    superlink=args.superlink, expected_sites=args.expect_sites, sign=not args.no_sign,
                    print_only=args.print_command, echo=print if args.print_command else lambda text: _say(args, text),
                    tensorboard=_optional_path(args.tensorboard))
    if result is not None:
        _say(args, f"federated run complete in {result.seconds:.0f} s: {result.run_dir}"
                   + (f"; signed release {result.release}" if result.release else ""))
    return EXIT_OK


def _site_join(args: argparse.Namespace) -> int:
    from braing3n_core.ops.deploy import join

    return join(Path(args.site_yaml), Path(args.credentials), args.superlink, args.port, rejoin_wait_s=args.rejoin_wait,
                print_only=args.print_command, echo=print if args.print_command else lambda text: _say(args, text))


# --- a site's approvals of jobs ---------------------------------------------------------------------------------


def _job_file(text: str) -> Path:
    """A job file (`consortium job`) or a run YAML; its content is checked when it is read."""
    path = _existing_file(text)
    if path.suffix in (".yaml", ".yml"):
        return _yaml_file(text)
    if not path.name.endswith(".json"):
        raise argparse.ArgumentTypeError(f"{path}: not a job: give the consortium's job file (*.job.json, from "
                                         "`braing3n consortium job`) or a run YAML")
    return path


def _max_rounds(text: str) -> dict[str, int]:
    """`N` (every stage and the probes) or `STAGE=N[,STAGE=N…]`; `*` stands for every step."""
    limits: dict[str, int] = {}
    for part in _comma_list([text]):
        step, _, value = part.rpartition("=")
        try:
            rounds = int(value)
        except ValueError:
            rounds = 0
        if rounds < 1 or (step and not re.fullmatch(r"[a-z]+", step)):
            raise argparse.ArgumentTypeError(f"{text!r}: give a number of rounds (e.g. 20) or STAGE=N pairs "
                                             "(e.g. mae=20,dit=40)")
        limits[step or "*"] = rounds
    return limits


def _who(args: argparse.Namespace) -> str:
    import getpass
    import socket

    return args.by or f"{getpass.getuser()}@{socket.gethostname()}"


def _read_site_and_job(args: argparse.Namespace) -> tuple[Any, Any]:
    from braing3n_core.ops.job_file import read_job
    from braing3n_core.site_config import SiteConfig

    return SiteConfig.from_yaml(args.site_yaml), read_job(Path(args.job), args.public_key)


def _site_review(args: argparse.Namespace) -> int:
    from braing3n_core.jobs.review import render_review, review_job

    site, job = _read_site_and_job(args)
    review = review_job(job, site)
    if args.json:
        _print_json(review.to_json())
    else:
        print(render_review(review))
    return EXIT_OK


def _site_approve(args: argparse.Namespace) -> int:
    from braing3n_core.federation.approval_log import ApprovalLog

    site, job = _read_site_and_job(args)
    limits = None
    if args.max_rounds:
        every = args.max_rounds.get("*")
        limits = {step: args.max_rounds.get(step, every or rounds) for step, rounds in job.recipe.rounds.items()}
        limits |= {step: n for step, n in args.max_rounds.items() if step != "*"}  # an unknown step is refused below
    approval = ApprovalLog.of(site).approve(job.fab_sha256, job.recipe, _who(args), app=job.app, max_rounds=limits,
                                            signed_by=job.signed_by if job.trusted else "", job=str(Path(args.job).resolve()))
    _say(args, f"site {site.site_id}: {approval.describe()} recorded in {site.approval_log_path}")
    if not site.approval.required:
        _note(args, f"note: {args.site_yaml} does not require approval (approval.required: false), so it runs any job")
    print(approval.id)
    return EXIT_OK


def _site_approvals(args: argparse.Namespace) -> int:
    from braing3n_core.federation.approval_log import ApprovalLog
    from braing3n_core.jobs.review import render_approvals
    from braing3n_core.site_config import SiteConfig

    site = SiteConfig.from_yaml(args.site_yaml)
    approvals = ApprovalLog.of(site).approvals()
    if args.json:
        _print_json({"site_id": site.site_id, "required": site.approval.required, "log": str(site.approval_log_path),
                     "approvals": [{**a.entry.body(), "id": a.id, "sha256": a.entry.sha256, "active": a.active,
                                    "revoked": a.revoked.body() if a.revoked else None} for a in approvals]})
    else:
        print(render_approvals(approvals, str(site.approval_log_path)))
        if not site.approval.required:
            _note(args, f"note: {args.site_yaml} does not require approval (approval.required: false)")
    return EXIT_OK


def _site_revoke(args: argparse.Namespace) -> int:
    from braing3n_core.federation.approval_log import ApprovalLog
    from braing3n_core.site_config import SiteConfig

    site = SiteConfig.from_yaml(args.site_yaml)
    approval = ApprovalLog.of(site).revoke(args.approval, _who(args), args.reason or "")
    _say(args, f"site {site.site_id}: {approval.describe()} revoked; its job is refused from the next message on")
    return EXIT_OK


def _consortium_job(args: argparse.Namespace) -> int:
    from braing3n_core.ops.job_file import write_job

    job = write_job(Path(args.dir), Path(args.run_config), _optional_path(args.out))
    _say(args, f"job {job.recipe.name!r}: recipe {job.recipe.sha256[:12]}…, app {job.app} (bundle "
               f"{job.fab_sha256[:12]}…), signed by {job.signed_by}")
    _say(args, "hand it to each site; they run `braing3n site review SITE_YAML JOB --public-key <bundle>/release.pub`, "
               "then `braing3n site approve` with the same arguments")
    print(job.source)
    return EXIT_OK


def _release_sign(args: argparse.Namespace) -> int:
    from braing3n_core.ops.release import sign_directory, sign_run

    path = Path(args.path)
    if (path / "server_state.json").is_file() and (path / "run.yaml").is_file():
        manifest = sign_run(path, Path(args.key), _optional_path(args.out))
    else:
        manifest = sign_directory(path, Path(args.key), {"kind": args.kind, "name": path.resolve().name})
    _say(args, str(manifest))
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from braing3n_core.config import ConfigError

    if args.public_key is None and not args.integrity_only:
        raise ConfigError("verify: pass --public-key release.pub (the consortium's key) to check who signed the "
                          "release, or --integrity-only to check its files against the manifest only")
    from braing3n_core.ops.release import verify_directory

    report = verify_directory(Path(args.path), args.public_key)
    if args.json:
        _print_json({"path": str(report.path), "ok": report.ok, "trusted": report.trusted, "files": report.files,
                     "key_fingerprint": report.key_fingerprint,
                     "problems": [{"kind": p.kind, "path": p.path, "detail": p.detail} for p in report.problems]})
    elif not args.quiet or not report.ok:
        print(report.summary())  # the verdict is the result, found or not: stdout
    return EXIT_OK if report.ok else EXIT_FAILED


# --- training and probes -------------------------------------------------------------------------------------------


def _train(args: argparse.Namespace) -> int:
    from braing3n_core.site_config import load_site_configs
    from braing3n_core.training.centralized import TrainOptions, train_centralized

    configs = load_site_configs(args.sites)
    options = TrainOptions(
        stage=args.stage, preset=args.preset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=args.warmup_steps, seed=args.seed, device=args.device, out_dir=Path(args.out),
        encoder=_optional_path(args.encoder), checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every, num_workers=args.num_workers, resume=not args.restart,
        workers=args.workers if args.workers is not None else configs[0].workers,
    )
    final = train_centralized(configs, options)
    _say(args, str(final))
    return EXIT_OK


def _probe(args: argparse.Namespace) -> int:
    from braing3n_core.site_config import load_site_configs

    configs = load_site_configs(args.sites)  # before the heavy imports: a bad site file fails at once
    if args.encoder is not None:
        from braing3n_core.checkpoint import read_manifest

        read_manifest(args.encoder)  # a file that is no checkpoint is named before the encoder is built
    from braing3n_core.jobs.probe import ProbeOptions, probe_sites

    options = ProbeOptions(
        preset=args.preset, encoder=args.encoder, random_init=args.random_init, seed=args.seed, folds=args.folds,
        device=args.device, batch_size=args.batch_size, tasks=tuple(_comma_list(args.tasks)) if args.tasks else None,
    )
    run = probe_sites(configs, options, Path(args.out))
    if args.json:
        _print_json({"path": str(run.path), "encoder": run.encoder.label, "encoder_sha256": run.encoder.sha256,
                     "scans": run.scans, "subjects": run.subjects, "excluded": run.excluded,
                     "seconds": run.seconds, "metrics": run.report.metrics()})
    else:
        _say(args, run.summary())
    return EXIT_OK


def _simulate(args: argparse.Namespace) -> int:
    from braing3n_core.ops.simulate import simulate

    try:
        result = simulate(list(args.sites), Path(args.run_config), _optional_path(args.out), resume=args.resume,
                          cpus_per_site=args.cpus_per_site, gpus_per_site=args.gpus_per_site,
                          ray_address=args.ray_address, echo=not args.quiet, tensorboard=_optional_path(args.tensorboard))
    except KeyboardInterrupt:
        print("interrupted; the SuperLink was stopped. Continue later with --resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    _say(args, f"federated run complete in {result.seconds:.0f} s: {result.run_dir}")
    return EXIT_OK


# --- generation ------------------------------------------------------------------------------------------------------


def _synthesize(args: argparse.Namespace) -> int:
    from braing3n_core.jobs.synthesize import synthesize

    result = synthesize(
        Path(args.run_dir), args.n, Path(args.out), conditions=_optional_path(args.conditions),
        sites=list(args.sites or []), audit=_optional_path(args.audit), skip_audit=args.no_audit,
        stage_only=args.stage_only, steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
        membership=not args.no_membership, signing_key=_optional_path(args.signing_key),
    )
    if args.stage_only:
        _say(args, f"{result.generated} synthetic scans staged in {result.out / 'staging'}; run the federated audit "
                   f"with the run config {result.datacard}, then call again with --audit <run-dir>/privacy_audit.json")
        return EXIT_OK
    _say(args, f"{result.exported} of {result.generated} synthetic scans exported to {result.bids} "
               f"({len(result.excluded)} excluded by the audit); data card {result.datacard}")
    if result.release is not None:
        _say(args, f"signed: {result.release} (check with `braing3n verify {result.bids} --public-key release.pub`)")
    return EXIT_OK


def _evaluate_generation(args: argparse.Namespace) -> int:
    from braing3n_core.config import ConfigError

    try:
        guidance = [float(g) for g in args.guidance.split(",") if g.strip()]
    except ValueError:
        raise ConfigError(f"--guidance {args.guidance!r}: give numbers separated by commas, e.g. 1.0,1.5,3.0") from None
    from braing3n_core.jobs.evaluate_generation import evaluate_generation, summary_line

    result = evaluate_generation(Path(args.run_dir), list(args.sites or []), Path(args.out), n=args.n,
                                 steps=args.steps, guidance=guidance, default_guidance=args.default_guidance,
                                 forecast=args.forecast, seed=args.seed, config_only=args.config_only)
    if args.config_only:
        _say(args, f"evaluation run config written to {result}; submit it with `flwr run` (braing3n consortium run)")
        return EXIT_OK
    _say(args, summary_line(result))
    _say(args, f"full results: {Path(args.out) / 'generation_eval.json'}")
    return EXIT_OK


def _device(name: str) -> str:
    """`--device` resolved, or a bad-input error naming it (CUDA asked for where there is none)."""
    import torch

    from braing3n_core.config import ConfigError
    from braing3n_core.runtime import resolve_device

    try:
        device = resolve_device(name)
    except (RuntimeError, ValueError) as error:
        raise ConfigError(f"--device: {error}") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device: {name!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(device)


_CONDITION_OPTIONS = ("age", "sex", "diagnosis", "modality", "field_strength", "mmse")


def _sample(args: argparse.Namespace) -> int:
    from braing3n_core.config import ConfigError
    from braing3n_core.generation.condition_table import ConditionRow, read_conditions

    given = [f"--{name.replace('_', '-')}" for name in _CONDITION_OPTIONS if getattr(args, name) is not None]
    if args.conditions and given:
        raise ConfigError(f"--conditions and {', '.join(given)}: give the conditions either as a table or as options")
    if args.conditions:
        rows = read_conditions(Path(args.conditions))
        rows = [rows[i % len(rows)] for i in range(args.n)] if args.n else rows
    else:
        values = {name: getattr(args, name) for name in _CONDITION_OPTIONS}
        row = ConditionRow.checked(values, lambda column: f"--{column.replace('_', '-')}")
        rows = [row] * (args.n or 1)
    device = _device(args.device)
    from braing3n_core.jobs.sample import export_samples

    path = export_samples(Path(args.run_dir), rows, Path(args.out), decoder=_optional_path(args.decoder),
                          conditions_file=_optional_path(args.conditions), steps=args.steps,
                          guidance_scale=args.guidance, seed=args.seed, batch_size=args.batch_size, device=device)
    record = json.loads(path.read_text())
    _say(args, f"{len(rows)} samples in {path.parent} ({record['seconds_per_volume']:.2f} s per volume on "
               f"{record['settings']['device']}); montage {path.parent / record['montage']}; {path}")
    return EXIT_OK


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

    if not (args.years > 0 and args.years < float("inf")):
        raise ConfigError(f"--years: the forecast interval must be a positive number of years, got {args.years}")
    scan_row = _scan_forecast_row(args)
    device = _device(args.device)
    from braing3n_core.jobs.forecast import export_forecast, export_scan_forecast
    from braing3n_core.labels import Modality

    if scan_row is not None:
        path = export_scan_forecast(Path(args.run_dir), Path(args.scan), scan_row, args.years, Path(args.out),
                                    draw=args.draw, steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                                    device=device)
    else:
        path = export_forecast(Path(args.run_dir), Path(args.site), args.subject, args.session, Modality(args.modality),
                               args.years, Path(args.out), draw=args.draw, steps=args.steps,
                               guidance_scale=args.guidance, seed=args.seed, device=device)
    record = json.loads(path.read_text())
    scores = record["scores"]
    scored = (f"PSNR vs the real follow-up {scores['forecast/residual_psnr']:.2f} dB (baseline as-is "
              f"{scores['forecast/baseline_psnr']:.2f} dB; the decoded forecast tokens alone "
              f"{scores['forecast/psnr']:.2f} dB)" if scores else record["scores_note"])
    who = Path(args.scan).name if scan_row is not None else args.subject
    _say(args, f"forecast of {who} +{args.years:g} y: {path.parent / record['nifti']}; {scored}; {path}")
    return EXIT_OK


def _embed(args: argparse.Namespace) -> int:
    device = _device(args.device)
    from braing3n_core.jobs.embed import export_embeddings

    path, embeddings = export_embeddings(Path(args.encoder), Path(args.out), paths=list(args.paths),
                                         site=_optional_path(args.site), device=device)
    for problem in embeddings.skipped:
        print(f"skipped {problem.path.name}: {problem.reason}", file=sys.stderr)
    _say(args, f"{len(embeddings.scans)} scans embedded (tokens {tuple(embeddings.tokens.shape)}, pooled "
               f"{tuple(embeddings.pooled.shape)}), {len(embeddings.skipped)} skipped: "
               f"{path.parent / 'embeddings.safetensors'}; {path}")
    return EXIT_OK


def _reconstruct(args: argparse.Namespace) -> int:
    device = _device(args.device)
    from braing3n_core.jobs.reconstruct import export_reconstruction

    path = export_reconstruction(Path(args.scan), Path(args.run), Path(args.out), decoder=_optional_path(args.decoder),
                                 device=device)
    record = json.loads(path.read_text())
    metrics, files = record["metrics"], record["files"]
    _say(args, f"reconstruction of {Path(args.scan).name}: PSNR {metrics['val/psnr_brain']:.2f} dB, SSIM "
               f"{metrics['val/ssim_brain']:.3f} in the brain; {path.parent / files['reconstruction_native']} (the "
               f"scan's own grid), {path.parent / files['reconstruction']} (the model's); {path}")
    return EXIT_OK


# --- the demo and the report -----------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from braing3n_core.jobs.demo import DemoError, run_demo

    try:
        sized = {"subjects_per_site": args.subjects} if args.subjects else {}
        return run_demo(out_dir=Path(args.out), seed=args.seed, resume=args.resume, **sized)
    except DemoError as error:  # an earlier demo in --out, or no usable scan: the demo cannot go on
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted; continue later with `braing3n demo --resume`.", file=sys.stderr)
        return EXIT_INTERRUPTED


def _report(args: argparse.Namespace) -> int:
    from braing3n_core.jobs.report import write_report

    if args.sites:
        from braing3n_core.jobs.showcase import run_showcase
        from braing3n_core.site_config import load_site_configs

        run_showcase(Path(args.run_dir), load_site_configs(args.sites))
    path = write_report(Path(args.run_dir), _optional_path(args.out), embed_images=args.embed)
    _say(args, str(path))
    return EXIT_OK


# --- the parser ------------------------------------------------------------------------------------------------------


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """-q/-v on the top-level parser and again on every command, so they work before or after it. On a
    command their default is SUPPRESS: argparse would otherwise reset the top-level value."""
    quiet = False if top else argparse.SUPPRESS
    verbose = 0 if top else argparse.SUPPRESS
    parser.add_argument("-q", "--quiet", action="store_true", default=quiet,
                        help="only errors, and the result a script reads (--json, or the verdict)")
    parser.add_argument("-v", "--verbose", action="count", default=verbose,
                        help="more detail (site check: every scan); on an unexpected error, its traceback")


class _Commands:
    """Adds commands and actions with the shared formatter and global options."""

    def __init__(self, subparsers: Any) -> None:
        self.subparsers = subparsers

    def command(self, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        parser = self.subparsers.add_parser(name, help=help, description=description or help,
                                            formatter_class=_HelpFormatter)
        _global_options(parser, top=False)
        return parser

    def group(self, name: str, help: str) -> _Commands:
        parser = self.command(name, help)
        parser.set_defaults(handler=None, help_of=parser)
        return _Commands(parser.add_subparsers(dest="action", metavar="ACTION"))


_DEVICE_HELP = "cpu, cuda, cuda:N or auto (bf16 autocast on CUDA)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="braing3n", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _global_options(parser, top=True)
    parser.set_defaults(handler=None, help_of=parser)
    commands = _Commands(parser.add_subparsers(dest="command", metavar="COMMAND"))

    cohort = commands.group("cohort", "synthetic multi-site cohorts")
    make = cohort.command("make", "write one BIDS dataset per site plus matching site YAML files",
                          "Write one synthetic BIDS dataset per site (real ICBM152 anatomy, non-IID sites) and one "
                          "site YAML each; prints the YAML paths, then a summary on stderr.")
    make.add_argument("--out", required=True, metavar="DIR", help="output folder; one BIDS dataset per site inside")
    make.add_argument("--sites", type=_positive_int, default=4, help="number of sites")
    make.add_argument("--subjects", type=_positive_int, default=20, help="subjects per site")
    make.add_argument("--seed", type=int, default=0, help="the cohort is the same for the same seed")
    make.add_argument("--voxel-mm", type=_voxel_mm, default=2.0,
                      help="simulation grid in mm, 1 to 4 (1: finest and slowest; 4: coarse, for tests)")
    make.add_argument("--workers", type=int, default=0, help="processes (0: one per available core)")
    make.add_argument("--sites-dir", default=None, metavar="DIR", help="where to write site YAML files (default: OUT/sites)")
    make.add_argument("--force", action="store_true", help="replace a cohort this command wrote before in --out")
    make.set_defaults(handler=_cohort_make)

    site = commands.group("site", "a hospital's data and its SuperNode")
    check = site.command("check", "list scans and every problem found in a site's BIDS dataset",
                         "Read every scan of a site's BIDS dataset and list what is usable and every problem found "
                         "(exit 0: usable scans found; 1: none usable; 2: bad site file). Writes nothing unless a "
                         "cache folder is given (--cache-dir, or cache_dir in the site YAML).")
    check.add_argument("site_yaml", metavar="SITE_YAML", type=_yaml_file, help="site config, e.g. sites/site-a.yaml")
    check.add_argument("--cache-dir", default=None, metavar="DIR",
                       help="cache the verdicts by file content in DIR/checks (default: the site YAML's cache_dir; "
                            "none when it has none)")
    check.add_argument("--json", action="store_true", help="print the report as JSON (for scripts)")
    check.set_defaults(handler=_site_check)
    join = site.command("join", "run this site's Flower SuperNode (TLS, site key) until stopped")
    join.add_argument("site_yaml", metavar="SITE_YAML", type=_yaml_file,
                      help="site config, e.g. sites/site-a.yaml (its site_id must match the credentials)")
    join.add_argument("--credentials", required=True, metavar="DIR", type=_existing_dir,
                      help="this site's bundle from `consortium init` (ca.crt, supernode.key)")
    join.add_argument("--superlink", required=True, metavar="HOST:PORT", type=_host_port,
                      help="the consortium's SuperLink, e.g. fl.consortium.example:9092")
    join.add_argument("--port", type=int, default=9094, help="local port of the SuperNode's ClientApp API (loopback)")
    join.add_argument("--rejoin-wait", type=float, default=120.0, metavar="SECONDS",
                      help="keep retrying while the SuperLink refuses the key (a crashed session expires in <= 60 s)")
    join.add_argument("--print-command", action="store_true", help="print the flower-supernode command and exit")
    join.set_defaults(handler=_site_join)
    sstatus = site.command("status", "what this site sees: ε spent of its budget, its last rounds, its cache, its SuperNode",
                           "This site's own view of the federation, from its disk: its privacy ledger (ε spent of the "
                           "budget), its journal of the messages it answered or declined (loss, update norm, ε per "
                           "round), its cache and whether its SuperNode runs. Live on a terminal until Ctrl-C.")
    sstatus.add_argument("site_yaml", metavar="SITE_YAML", type=_yaml_file, help="site config, e.g. sites/site-a.yaml")
    sstatus.add_argument("--once", action="store_true", help="print one snapshot and exit")
    sstatus.add_argument("--json", action="store_true", help="print one snapshot as JSON and exit (for scripts)")
    sstatus.add_argument("--interval", type=_positive_float, default=5.0, metavar="SECONDS", help="refresh interval")
    sstatus.set_defaults(handler=_site_status)
    review = site.command("review", "what a job would do with this site's data and what would leave it, before approving",
                          "Say in plain words what a federated job would do with this site's data: each stage's "
                          "rounds and local steps, what leaves the site (model updates with their size in bytes, "
                          "aggregates), the ε it would spend under this site's privacy settings, the DP and secure "
                          "aggregation it asks for, who signed it and whether this site approved it. Reads no scan.")
    review.add_argument("site_yaml", metavar="SITE_YAML", type=_yaml_file, help="site config, e.g. sites/site-a.yaml")
    review.add_argument("job", metavar="JOB", type=_job_file,
                        help="the consortium's job file (`consortium job`), or a run YAML (the app installed here)")
    review.add_argument("--public-key", default=None, metavar="FILE", type=_existing_file,
                        help="your bundle's release.pub: the job must be signed by the consortium")
    review.add_argument("--json", action="store_true", help="print the review as JSON (for scripts)")
    review.set_defaults(handler=_site_review)
    approve = site.command("approve", "approve a job: its app and recipe may then use this site's data",
                           "Record, in this site's append-only approval log, that the job's app (its Flower bundle "
                           "hash) and recipe (its canonical hash) may use this site's data; prints the approval id. A "
                           "site with approval.required refuses every other job before reading any scan.")
    approve.add_argument("site_yaml", metavar="SITE_YAML", type=_yaml_file, help="site config, e.g. sites/site-a.yaml")
    approve.add_argument("job", metavar="JOB", type=_job_file,
                         help="the consortium's job file (`consortium job`), or a run YAML (the app installed here)")
    approve.add_argument("--public-key", default=None, metavar="FILE", type=_existing_file,
                         help="your bundle's release.pub: the job must be signed by the consortium")
    approve.add_argument("--max-rounds", default=None, metavar="N|STAGE=N,…", type=_max_rounds,
                         help="also allow the same recipe with more rounds, up to N per stage (or per STAGE=N); "
                              "default: exactly this recipe")
    approve.add_argument("--by", default=None, metavar="NAME", help="who approves (default: your user name @ this host)")
    approve.set_defaults(handler=_site_approve)
    approvals = site.command("approvals", "list this site's approvals (active and revoked) from its approval log")
    approvals.add_argument("site_yaml", metavar="SITE_YAML", type=_yaml_file, help="site config, e.g. sites/site-a.yaml")
    approvals.add_argument("--json", action="store_true", help="print them as JSON (for scripts)")
    approvals.set_defaults(handler=_site_approvals)
    srevoke = site.command("revoke", "withdraw an approval: its job is refused from the next message on")
    srevoke.add_argument("site_yaml", metavar="SITE_YAML", type=_yaml_file, help="site config, e.g. sites/site-a.yaml")
    srevoke.add_argument("approval", metavar="APPROVAL_ID", help="the id `site approve` printed (or a unique prefix)")
    srevoke.add_argument("--reason", default=None, help="why (recorded in the log and shown to the consortium)")
    srevoke.add_argument("--by", default=None, metavar="NAME", help="who revokes (default: your user name @ this host)")
    srevoke.set_defaults(handler=_site_revoke)

    train = commands.command("train", "centralized training of one stage on the pooled sites")
    train.add_argument("stage", metavar="STAGE", choices=["mae", "decoder", "dit"], help="mae, decoder or dit")
    train.add_argument("--sites", nargs="+", required=True, metavar="SITE_YAML", type=_yaml_file,
                       help="site YAML files (their data is pooled)")
    train.add_argument("--preset", default="small", choices=["paper", "small", "tiny"], help="model and input size")
    train.add_argument("--steps", type=int, default=200, help="optimizer steps")
    train.add_argument("--batch-size", type=int, default=None, help="volumes per step (default: the stage's)")
    train.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the stage's)")
    train.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up before the cosine decay")
    train.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    train.add_argument("--device", default="cpu", help=_DEVICE_HELP)
    train.add_argument("--out", default="runs/central", metavar="RUN_DIR", help="run folder (checkpoints, metrics.jsonl)")
    train.add_argument("--encoder", default=None, metavar="CKPT",
                       help="MAE checkpoint for the decoder and DiT (default: the latest in --out)")
    train.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    train.add_argument("--eval-every", type=int, default=0, help="validation interval in steps (0: at the end)")
    train.add_argument("--num-workers", type=int, default=0,
                       help="data-loading processes per training worker (0: the first site file's compute.loader_workers)")
    train.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                       help="data-parallel training processes, gloo on cpu or one GPU each on cuda "
                            "(default: the first site file's `workers`)")
    train.add_argument("--restart", action="store_true", help="ignore existing checkpoints instead of resuming")
    train.set_defaults(handler=_train)

    probe = commands.command("probe", "linear probes (age, sex, diagnosis, ...) on a frozen or random-init encoder")
    probe.add_argument("--sites", nargs="+", required=True, metavar="SITE_YAML", type=_yaml_file,
                       help="site YAML files (their scans are pooled)")
    which = probe.add_mutually_exclusive_group(required=True)
    which.add_argument("--encoder", default=None, metavar="CKPT", type=Path,
                       help="stage-1 (mae) checkpoint, e.g. runs/x/checkpoints/mae/final.json")
    which.add_argument("--random-init", action="store_true", help="the untrained encoder `train mae --seed` starts from")
    probe.add_argument("--preset", default=None, choices=["paper", "small", "tiny"],
                       help="default: the one the --encoder checkpoint records; small with --random-init")
    probe.add_argument("--out", required=True, metavar="DIR",
                       help="folder for the JSON report (probes-<encoder>-seed<S>.json)")
    probe.add_argument("--seed", type=int, default=0, help="random-init weights and cross-validation folds")
    probe.add_argument("--folds", type=int, default=5, help="outer subject-grouped cross-validation folds")
    probe.add_argument("--tasks", action="append", default=None,
                       help="task names, comma-separated (default: all the labels support)")
    probe.add_argument("--batch-size", type=int, default=4, help="volumes per encoder call")
    probe.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    probe.add_argument("--json", action="store_true", help="print the result as JSON (for scripts)")
    probe.set_defaults(handler=_probe)

    consortium = commands.group("consortium", "the consortium's keys, SuperLink and federated jobs")
    init = consortium.command("init", "CA, SuperLink TLS certificate, site keys and bundles, release key")
    init.add_argument("dir", metavar="CONSORTIUM_DIR", help="new (or empty) consortium folder; private keys are 0600")
    init.add_argument("--sites", required=True, help="comma-separated site ids, e.g. site-a,site-b")
    init.add_argument("--host", required=True, help="the SuperLink's DNS name (or IP) as sites dial it")
    init.add_argument("--ip", action="append", help="extra IP address SAN(s), comma-separated or repeated")
    init.add_argument("--dns", action="append", help="extra DNS name SAN(s), comma-separated or repeated")
    init.add_argument("--days", type=int, default=825, help="SuperLink certificate validity in days")
    init.add_argument("--force", action="store_true", help="write into a folder that holds other files")
    init.set_defaults(handler=_consortium_init)
    add = consortium.command("add-site", "a credentials bundle for a new site")
    add.add_argument("dir", metavar="CONSORTIUM_DIR", type=_existing_dir, help="the folder `consortium init` wrote")
    add.add_argument("site", metavar="SITE_ID", help="site id (must match site_id in the site's YAML)")
    add.add_argument("--public-key", default=None, metavar="FILE", type=_existing_file,
                     help="the site's own OpenSSH ECDSA public key instead of a new key pair")
    add.set_defaults(handler=_consortium_add_site)
    rekey = consortium.command("rekey", "a new key for a site (lost, leaked or revoked key); the old one is unregistered")
    rekey.add_argument("dir", metavar="CONSORTIUM_DIR", type=_existing_dir, help="the folder `consortium init` wrote")
    rekey.add_argument("site", metavar="SITE_ID", help="the site to rekey")
    rekey.add_argument("--public-key", default=None, metavar="FILE", type=_existing_file,
                       help="the site's own OpenSSH ECDSA public key instead of a new key pair")
    rekey.set_defaults(handler=_consortium_rekey)
    revoke = consortium.command("revoke", "revoke a site: its key is unregistered and refused from then on")
    revoke.add_argument("dir", metavar="CONSORTIUM_DIR", type=_existing_dir, help="the folder `consortium init` wrote")
    revoke.add_argument("site", metavar="SITE_ID", help="the site to revoke")
    revoke.set_defaults(handler=_consortium_revoke)
    serve = consortium.command("serve", "run the SuperLink (TLS, SuperNode authentication) until stopped")
    serve.add_argument("dir", metavar="CONSORTIUM_DIR", type=_existing_dir, help="the folder `consortium init` wrote")
    serve.add_argument("--address", default="0.0.0.0", help="interface to listen on")
    serve.add_argument("--port", type=int, default=9092, help="the one port sites connect to")
    serve.add_argument("--print-command", action="store_true", help="print the Flower commands and exit")
    serve.add_argument("--status-port", type=int, default=None, metavar="PORT",
                       help="also serve the live status page of the latest `consortium run` on this port (read-only, "
                            "bearer token; TLS with the consortium's certificate off loopback)")
    serve.add_argument("--status-address", default="127.0.0.1", help="interface of the status page")
    serve.set_defaults(handler=_consortium_serve)
    cstatus = consortium.command("status", "live view of a federated run: stages, rounds, every site, bytes, ETA",
                                 "A live view of a federated run from its run folder: stage and round, each site's "
                                 "state (connected, training, declined and why), its last loss, update norm and ε "
                                 "spent of its budget, bytes sent, time per round and ETA. Redrawn in place on a "
                                 "terminal until the run completes; into a pipe, printed again as rounds finish.")
    cstatus.add_argument("path", metavar="RUN_DIR", type=_existing_dir,
                         help="run folder (`simulate --out`, `consortium run --out`) or a consortium folder (its "
                              "latest submitted run)")
    cstatus.add_argument("--once", action="store_true", help="print one snapshot and exit")
    cstatus.add_argument("--json", action="store_true", help="print one snapshot as JSON and exit (for scripts)")
    cstatus.add_argument("--interval", type=_positive_float, default=2.0, metavar="SECONDS",
                         help="refresh interval (also the web page's)")
    cstatus.add_argument("--serve", type=int, default=None, metavar="PORT",
                         help="serve the live web page of this run instead (read-only, bearer token printed) until Ctrl-C")
    cstatus.add_argument("--address", default="127.0.0.1", help="with --serve: interface to listen on")
    cstatus.set_defaults(handler=_consortium_status)
    crun = consortium.command("run", "submit a federated job to the SuperLink and stream its progress")
    crun.add_argument("dir", metavar="CONSORTIUM_DIR", type=_existing_dir, help="the folder `consortium init` wrote")
    crun.add_argument("--run-config", required=True, metavar="RUN_YAML", type=_yaml_file,
                      help="run YAML (stages, rounds, strategies, probes)")
    crun.add_argument("--out", default=None, metavar="RUN_DIR", help="run folder on this server (default: runs/<name>)")
    crun.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    crun.add_argument("--superlink", default=None, metavar="HOST:PORT", type=_host_port,
                      help="default: the SuperLink `serve` runs here (with --print-command and none running: "
                           "the consortium host on port 9092)")
    crun.add_argument("--expect-sites", type=int, default=None, help="sites to wait for (default: every active site)")
    crun.add_argument("--no-sign", action="store_true", help="do not sign the finished run's release")
    crun.add_argument("--tensorboard", default=None, metavar="DIR",
                      help="also write the metrics as TensorBoard event files (per site and aggregate) under DIR/<run>; "
                           "MLFLOW_TRACKING_URI in the environment sends them to MLflow")
    crun.add_argument("--print-command", action="store_true",
                      help="pin the run YAML in --out, print the flwr run command and exit")
    crun.set_defaults(handler=_consortium_run)
    cjob = consortium.command("job", "write a signed job file (app bundle hash + recipe) for the sites to review and approve",
                              "Write the job the sites approve before it may use their data: the hash of the Flower app "
                              "bundle `consortium run` will submit and the run YAML's canonical recipe, signed with the "
                              "consortium's release key. Prints the file's path.")
    cjob.add_argument("dir", metavar="CONSORTIUM_DIR", type=_existing_dir, help="the folder `consortium init` wrote")
    cjob.add_argument("--run-config", required=True, metavar="RUN_YAML", type=_yaml_file,
                      help="run YAML (stages, rounds, strategies, probes)")
    cjob.add_argument("--out", default=None, metavar="FILE",
                      help="the job file (default: CONSORTIUM_DIR/jobs/<name>-<recipe hash>.job.json)")
    cjob.set_defaults(handler=_consortium_job)

    release = commands.group("release", "signed releases")
    sign = release.command("sign", "sign a finished run (into RUN_DIR/release/) or a dataset folder")
    sign.add_argument("path", metavar="RUN_DIR_OR_FOLDER", type=_existing_dir, help="run folder or dataset folder")
    sign.add_argument("--key", required=True, metavar="FILE", type=_existing_file,
                      help="the consortium's Ed25519 key (release/release.key)")
    sign.add_argument("--out", default=None, metavar="DIR", help="release folder for a run (default: RUN_DIR/release)")
    sign.add_argument("--kind", default="dataset", help="what a signed folder holds (metadata)")
    sign.set_defaults(handler=_release_sign)
    verify = commands.command("verify", "check a signed release: names missing, extra or changed files and bad "
                              "signatures", "Check a signed release (exit 0: every file matches a manifest signed by "
                              "the trusted key; 1: it does not; 2: bad input).")
    verify.add_argument("path", metavar="RELEASE", type=_release_path, help="release folder or its RELEASE.json")
    trust = verify.add_mutually_exclusive_group()
    trust.add_argument("--public-key", default=None, metavar="FILE", type=_existing_file,
                       help="the consortium's release.pub: the release must be signed by it")
    trust.add_argument("--integrity-only", action="store_true",
                       help="check the files against the manifest without checking who signed it")
    verify.add_argument("--json", action="store_true", help="print the verdict as JSON (for scripts)")
    verify.set_defaults(handler=_verify)

    sim = commands.command("simulate", "federated run of N virtual sites on Flower's simulation engine")
    sim.add_argument("--sites", nargs="+", required=True, metavar="SITE_YAML", type=_yaml_file,
                     help="site YAML files, one virtual site each")
    sim.add_argument("--run-config", required=True, metavar="RUN_YAML", type=_yaml_file,
                     help="run YAML (stages, rounds, strategies, probes)")
    sim.add_argument("--out", default=None, metavar="RUN_DIR", help="run folder (default: runs/<name from the run config>)")
    sim.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    sim.add_argument("--cpus-per-site", type=_positive_int, default=1, help="CPU cores reserved per virtual site")
    sim.add_argument("--gpus-per-site", type=_non_negative_float, default=0.0,
                     help="GPUs reserved per virtual site (0.5: two sites share one); set `device: cuda` in the site YAMLs")
    sim.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                     help="run the sites on an existing Ray cluster (`ray start --head`; `auto`: the one on this "
                          "machine) instead of a Ray started for this run; every node needs this environment and "
                          "the sites' data paths")
    sim.add_argument("--tensorboard", default=None, metavar="DIR",
                     help="also write the metrics as TensorBoard event files (per site and aggregate) under DIR/<run>; "
                          "MLFLOW_TRACKING_URI in the environment sends them to MLflow")
    sim.set_defaults(handler=_simulate)

    synth = commands.command("synthesize", "audited synthetic scans (BIDS + data card) from a trained DiT")
    synth.add_argument("run_dir", metavar="RUN_DIR", type=_existing_path,
                       help="run folder, or a DiT checkpoint (.json) inside one")
    synth.add_argument("--n", type=_positive_int, required=True, help="number of scans to generate (before the audit)")
    synth.add_argument("--out", required=True, metavar="DIR",
                       help="output folder: bids/, datacard.json/.md, staging/, audit-run/")
    synth.add_argument("--conditions", default=None, metavar="TSV", type=_existing_file,
                       help="age, sex, diagnosis, modality, field_strength, mmse (n/a = missing), cycled to --n "
                            "(default: a balanced table)")
    synth.add_argument("--sites", nargs="+", default=None, metavar="SITE_YAML", type=_yaml_file,
                       help="site YAMLs: run the federated audit in a simulation")
    synth.add_argument("--audit", default=None, metavar="JSON", type=_existing_file,
                       help="privacy_audit.json of a deployment's audit run of this set")
    synth.add_argument("--no-audit", action="store_true", help="export without an audit (the data card says so)")
    synth.add_argument("--stage-only", action="store_true",
                       help="generate and stage only, and write the audit run config for a deployment's `flwr run`")
    synth.add_argument("--no-membership", action="store_true", help="skip the membership-inference tests (DiT and MAE loss thresholds)")
    synth.add_argument("--steps", type=_positive_int, default=SAMPLE_STEPS, help="ODE steps")
    synth.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale")
    synth.add_argument("--seed", type=int, default=0, help="noise and condition table")
    synth.add_argument("--signing-key", default=None, metavar="FILE", type=_existing_file,
                       help="the consortium's Ed25519 release key: sign the exported BIDS folder (bids/RELEASE.json)")
    synth.set_defaults(handler=_synthesize)

    from braing3n_core.labels import MODALITIES  # stdlib-only module: --help stays instant

    modalities = [m.value for m in MODALITIES]
    smp = commands.command("sample", "conditional samples from a trained DiT + decoder (NIfTI, montage, JSON)")
    smp.add_argument("run_dir", metavar="RUN_DIR", type=_existing_path,
                     help="run folder, or a DiT checkpoint (.json) inside one")
    smp.add_argument("--out", required=True, metavar="DIR", help="output folder: sample-NNNN.nii.gz, samples.png, sample.json")
    smp.add_argument("--conditions", default=None, metavar="TSV", type=_existing_file,
                     help="TSV with a header among age, sex, diagnosis, modality, field_strength, mmse (modality "
                          "required; n/a = unconditioned), one sample per row")
    smp.add_argument("--age", default=None, help="years")
    smp.add_argument("--sex", default=None, help="F or M")
    smp.add_argument("--diagnosis", default=None, help="CN, MCI, AD or glioma")
    smp.add_argument("--modality", default=None, choices=modalities, help="required unless --conditions")
    smp.add_argument("--field-strength", dest="field_strength", default=None, help="tesla: 1.5 or 3")
    smp.add_argument("--mmse", default=None, help="0-30")
    smp.add_argument("--n", type=_positive_int, default=None,
                     help="samples (default: 1, or one per --conditions row; rows cycle)")
    smp.add_argument("--decoder", default=None, metavar="CKPT", help="decoder checkpoint (default: the run folder's)")
    smp.add_argument("--steps", type=_positive_int, default=SAMPLE_STEPS, help="ODE steps")
    smp.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale")
    smp.add_argument("--seed", type=int, default=0, help="the noise the ODE starts from")
    smp.add_argument("--batch-size", type=_positive_int, default=SAMPLE_BATCH, help="samples per ODE solve")
    smp.add_argument("--device", default="cpu", help=_DEVICE_HELP)
    smp.set_defaults(handler=_sample)

    fct = commands.command("forecast", "a subject's follow-up scan forecast from a baseline scan")
    fct.add_argument("run_dir", metavar="RUN_DIR", type=_existing_path,
                     help="run folder (DiT, decoder and frozen encoder), or a DiT checkpoint (.json) inside one")
    fct.add_argument("--site", default=None, metavar="SITE_YAML", type=_yaml_file,
                     help="the subject's site YAML (run where that site's data is)")
    fct.add_argument("--subject", default=None, help="e.g. sub-a001 (with --site)")
    fct.add_argument("--scan", default=None, metavar="NIFTI", type=_existing_file,
                     help="instead of --site/--subject: a baseline NIfTI in no site, with --age [--sex --diagnosis "
                          "--field-strength] as known at that scan")
    fct.add_argument("--age", default=None, help="with --scan: years at the scan")
    fct.add_argument("--sex", default=None, help="with --scan: F or M")
    fct.add_argument("--diagnosis", default=None, help="with --scan: CN, MCI, AD or glioma")
    fct.add_argument("--field-strength", dest="field_strength", default=None, help="with --scan: tesla, 1.5 or 3")
    fct.add_argument("--session", default=None, help="baseline session, e.g. ses-01 (default: the earliest)")
    fct.add_argument("--modality", required=True, choices=modalities, help="the baseline's (and forecast's) sequence")
    fct.add_argument("--years", type=float, required=True, help="interval after the baseline, in years")
    fct.add_argument("--out", required=True, metavar="DIR", help="output folder: forecast.nii.gz, forecast.png, forecast.json")
    fct.add_argument("--draw", action="store_true", default=None,
                     help="one random follow-up from the DiT (an ODE from noise) instead of its conditional mean, the "
                          "default: a draw adds detail no baseline predicts, which reads as change (README: Defaults); "
                          "a DiT trained before pairs diffused their change draws anyway")
    fct.add_argument("--steps", type=_positive_int, default=SAMPLE_STEPS, help="ODE steps of a --draw")
    fct.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale")
    fct.add_argument("--seed", type=int, default=0, help="the noise the ODE starts from")
    fct.add_argument("--device", default="cpu", help=_DEVICE_HELP)
    fct.set_defaults(handler=_forecast)

    evg = commands.command("evaluate-generation", "federated proof of generation and forecasting: adherence, "
                           "FD/MMD vs real-vs-real, guidance sweep, forecasts vs no-change and a linear trend")
    evg.add_argument("run_dir", metavar="RUN_DIR", type=_existing_dir,
                     help="the trained run folder (DiT, decoder, frozen encoder, probes)")
    evg.add_argument("--sites", nargs="+", metavar="SITE_YAML", type=_yaml_file,
                     help="site YAMLs: the evaluation runs as a Flower simulation of these sites")
    evg.add_argument("--out", required=True, metavar="RUN_DIR", help="the evaluation's run folder (generation_eval.json)")
    evg.add_argument("--n", type=_positive_int, default=32, help="samples per generated set")
    evg.add_argument("--steps", type=_positive_int, default=SAMPLE_STEPS, help="ODE steps")
    evg.add_argument("--guidance", default="1.0,1.5,3.0", help="guidance sweep, comma-separated")
    evg.add_argument("--default-guidance", dest="default_guidance", type=float, default=1.5,
                     help="guidance of the swapped-conditions control and of forecasts")
    evg.add_argument("--forecast", action="store_true", help="also forecast every held-out subject with a follow-up")
    evg.add_argument("--seed", type=int, default=0, help="condition table and noise")
    evg.add_argument("--config-only", dest="config_only", action="store_true",
                     help="write <out>.yaml for a deployment's `flwr run` instead of simulating")
    evg.set_defaults(handler=_evaluate_generation)

    demo = commands.command("demo", "the end-to-end demo (README command 1)")
    demo.add_argument("--out", default="runs/demo", metavar="DIR", help="demo folder: cohort, federated run, report")
    demo.add_argument("--seed", type=int, default=0, help="cohort and training seed")
    demo.add_argument("--subjects", type=_positive_int, default=None,
                      help="subjects per site (default: sized for 15 min on 2 cores)")
    demo.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out and rewrite its report")
    demo.set_defaults(handler=_demo)

    report = commands.command("report", "HTML report of a federated run folder (curves, probes, samples)")
    report.add_argument("run_dir", metavar="RUN_DIR", type=_existing_dir,
                        help="run folder written by `braing3n simulate` or `braing3n demo`")
    report.add_argument("--sites", nargs="+", default=None, metavar="SITE_YAML", type=_yaml_file,
                        help="site YAMLs of the run: first compute reconstructions, samples and a forecast on their data")
    report.add_argument("--out", default=None, metavar="HTML", help="HTML path (default: RUN_DIR/report.html)")
    report.add_argument("--embed", action="store_true", help="embed the figures in the HTML (one self-contained file)")
    report.set_defaults(handler=_report)

    embed = commands.command("embed", "frozen-encoder features of any scans (safetensors + manifest)")
    embed.add_argument("paths", nargs="*", metavar="SCAN", type=_existing_file, help="NIfTI files (or use --site)")
    embed.add_argument("--site", default=None, metavar="SITE_YAML", type=_yaml_file,
                       help="a site YAML: embed every usable scan of that site instead")
    embed.add_argument("--encoder", required=True, metavar="CKPT",
                       help="stage-1 (mae) checkpoint; its preset fixes the preprocessing")
    embed.add_argument("--out", required=True, metavar="DIR", help="output folder: embeddings.safetensors, manifest.json")
    embed.add_argument("--device", default="cpu", help=_DEVICE_HELP)
    embed.set_defaults(handler=_embed)

    rec = commands.command("reconstruct", "a scan through a run's encoder and decoder, on the model's grid and the scan's own")
    rec.add_argument("scan", metavar="SCAN", type=_existing_file, help="NIfTI file (.nii or .nii.gz), any orientation and voxel size")
    rec.add_argument("--run", required=True, metavar="RUN_DIR", type=_existing_dir, help="run folder (frozen encoder and decoder)")
    rec.add_argument("--out", required=True, metavar="DIR", help="output folder: reconstruction[_native].nii.gz, "
                     "input.nii.gz, reconstruction.png, reconstruct.json")
    rec.add_argument("--decoder", default=None, metavar="CKPT", help="decoder checkpoint (default: the run folder's)")
    rec.add_argument("--device", default="cpu", help=_DEVICE_HELP)
    rec.set_defaults(handler=_reconstruct)
    return parser


# --- errors and exit codes -------------------------------------------------------------------------------------------


def _configure_logging(args: argparse.Namespace) -> None:
    import logging

    level = logging.ERROR if args.quiet else logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _os_error(error: OSError) -> str:
    where = f"{error.filename}: " if error.filename else ""
    return f"{where}{error.strerror or error}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error (argparse printed usage and the problem)
        return done.code if isinstance(done.code, int) else EXIT_BAD_INPUT
    if args.handler is None:  # `braing3n`, `braing3n site`: what is there to run
        args.help_of.print_help()
        return EXIT_OK
    _configure_logging(args)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print("interrupted; every process started here was stopped.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (BadInput, JobFailed) as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:  # a file the job could not read or write: named, never a traceback
        print(f"error: {_os_error(error)}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as error:  # noqa: BLE001 (a bug: said plainly, no traceback unless -v asks)
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"error: unexpected {type(error).__name__}: {error} (a bug in braing3n; rerun with -v for the "
              "traceback and report it)", file=sys.stderr)
        return EXIT_FAILED


__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_OK", "build_parser", "main"]


if __name__ == "__main__":
    sys.exit(main())
