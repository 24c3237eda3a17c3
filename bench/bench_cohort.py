"""Synthetic cohort generation speed: `braing3n cohort make` end to end, as a user runs it.

Target (issue 2): 4 sites × 60 subjects at 2 mm in at most 2 minutes on 2 cores. The command runs as a
child process (all cores, the CLI's default); wall time, CPU time and the largest process's peak RSS
come from the operating system, and the output tree is counted afterwards.

Prints one summary line; writes bench/results/cohort.json.

    python bench/bench_cohort.py [--sites 4] [--subjects 60] [--voxel-mm 2] [--out /tmp/cohort-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import load_average, machine_info
from braing3n_core.data.cohort.bids_writer import write_text

RESULTS = Path(__file__).resolve().parent / "results" / "cohort.json"
TARGET_SECONDS = 120.0


def count_outputs(out: Path) -> dict[str, float]:
    sites = sorted(out.glob("site-*"))
    scans = [p for site in sites for p in site.glob("sub-*/ses-*/anat/*.nii.gz")]
    return {
        "sites": len(sites),
        "subjects": sum(len(list(site.glob("sub-*"))) for site in sites),
        "sessions": sum(len(list(site.glob("sub-*/ses-*"))) for site in sites),
        "scans": len(scans),
        "scan_megabytes": round(sum(p.stat().st_size for p in scans) / 1e6, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--subjects", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--voxel-mm", type=float, default=2.0)
    parser.add_argument("--out", default="/tmp/cohort-bench")
    args = parser.parse_args()

    command = [
        sys.executable, "-m", "braing3n_core.cli", "cohort", "make",
        "--sites", str(args.sites), "--subjects", str(args.subjects), "--seed", str(args.seed),
        "--voxel-mm", f"{args.voxel_mm:g}", "--out", args.out,
    ]  # fmt: skip
    load_before = load_average()
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        print(run.stderr, file=sys.stderr)
        return run.returncode
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    counts = count_outputs(Path(args.out))

    result = {
        # Other jobs on a shared machine slow the wall time but hardly the CPU time: both are reported.
        "machine": machine_info(load_before),
        "command": " ".join(["braing3n", *command[3:]]),
        **counts,
        "seconds": round(seconds, 1),
        "seconds_per_subject": round(seconds / max(counts["subjects"], 1), 3),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "cpu_seconds_per_subject": round((usage.ru_utime + usage.ru_stime) / max(counts["subjects"], 1), 3),
        "peak_rss_mib_largest_process": round(usage.ru_maxrss / 1024, 1),
        "target_seconds": TARGET_SECONDS,
        "meets_target": bool(seconds <= TARGET_SECONDS),
    }
    write_text(RESULTS, json.dumps(result, indent=2) + "\n")
    print(
        f"cohort: {counts['sites']} sites x {counts['subjects'] // max(counts['sites'], 1)} subjects at {args.voxel_mm:g} mm "
        f"({counts['sessions']} sessions, {counts['scans']} scans, {counts['scan_megabytes']:.0f} MB) in {seconds:.1f} s "
        f"= {result['seconds_per_subject']:.2f} s/subject ({result['cpu_seconds_per_subject']:.2f} CPU-s); "
        f"{os.cpu_count()} CPUs, peak RSS {result['peak_rss_mib_largest_process']:.0f} MiB/process; "
        f"target {TARGET_SECONDS:.0f} s {'met' if result['meets_target'] else 'MISSED'} -> {RESULTS}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
