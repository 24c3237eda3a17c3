"""The two kinds of failure the `braing3n` command tells apart, and the exit code of each.

Every error type of the core derives from one of them, so the command maps an error to its exit code by
kind and no command has its own convention: 0 success, 1 the job ran and failed, 2 bad usage or bad
input (a file, a setting or an argument the user can fix; argparse's own usage errors are 2 as well).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


class BadInput(Exception):
    """The input cannot be used as given; the message names the file, setting or argument and the problem."""

    exit_code = EXIT_BAD_INPUT


class JobFailed(Exception):
    """The input was accepted but the job did not succeed (a process died, a run did not complete)."""

    exit_code = EXIT_FAILED
