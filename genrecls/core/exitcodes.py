"""The exit codes of every ``genrecls`` command and ``jobs/*.py`` entry point: the one table.

The table of docs/usage.md is this one; ``tests/test_exitcodes.py`` runs a real command for each code.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["ExitCode", "TABLE"]


class ExitCode(IntEnum):
    OK = 0           #: success; for ``retrain``: a challenger (or the first model) was promoted
    FAILURES = 1     #: finished, but files failed under ``--strict``, or training/retraining failed
    USAGE = 2        #: bad usage or input (one line names the reason)
    KEPT = 3         #: ``retrain`` kept the champion (not strictly better, or nothing changed)
    LOCKED = 4       #: the output is locked by another run (the message names the holder)
    INTERRUPTED = 130  #: stopped with Ctrl-C (SIGINT); re-running the same command resumes
    TERMINATED = 143   #: stopped with SIGTERM; re-running the same command resumes


TABLE: dict[ExitCode, str] = {
    ExitCode.OK: "success (retrain: the challenger or the first model was promoted)",
    ExitCode.FAILURES: "the run finished with failed files under --strict, or it failed (training, retraining, the local Ray did not start)",
    ExitCode.USAGE: "bad usage or input, with a one-line reason",
    ExitCode.KEPT: "retrain kept the champion (the challenger was not strictly better, or nothing changed)",
    ExitCode.LOCKED: "the output is locked by another run; the message names the holder",
    ExitCode.INTERRUPTED: "stopped by Ctrl-C (SIGINT), with one line saying what is kept; the same command resumes",
    ExitCode.TERMINATED: "stopped by SIGTERM, with one line saying what is kept; the same command resumes",
}
