"""The test suite as CI runs it: ``bash .ci/run`` in fresh clones, one after another.

Each run clones the repository's HEAD into a new folder, runs ``.ci/run`` there (a new venv,
``pip install -e '.[dev]'``, ``pytest -q``), and records the pytest time it prints, the whole
command's time, the counts, the load average before, and how idle the machine's CPUs were
while it ran (``/proc/stat``).  Results go to ``bench/results/suite.json`` after every run.

    python bench/suite.py --runs 3
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import save  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_times() -> tuple[float, float]:
    """(busy, idle) jiffies of all CPUs."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, idle


def one_run(i: int) -> dict:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    folder = tempfile.mkdtemp(prefix=f"genrecls-suite-{i}-")
    clone = os.path.join(folder, "repo")
    subprocess.run(["git", "clone", "-q", REPO, clone], check=True)
    load_before = os.getloadavg()
    busy0, idle0 = cpu_times()
    t0 = time.monotonic()
    proc = subprocess.run(["bash", ".ci/run"], cwd=clone, capture_output=True, text=True)
    wall = time.monotonic() - t0
    busy1, idle1 = cpu_times()
    out = proc.stdout + proc.stderr
    summary = re.findall(r"^(\d+ passed.*) in ([\d.]+)s", out, re.M)
    slowest = re.findall(r"^([\d.]+)s (call|setup|teardown)\s+(\S+)", out, re.M)[:15]
    shutil.rmtree(folder, ignore_errors=True)
    return {"run": i, "commit": commit, "exit_code": proc.returncode,
            "counts": summary[-1][0] if summary else None,
            "pytest_seconds": float(summary[-1][1]) if summary else None,
            "command_seconds": round(wall, 1),
            "cpu_idle_fraction": round((idle1 - idle0) / max(1, (busy1 - busy0) + (idle1 - idle0)), 3),
            "load_average_before": [round(x, 2) for x in load_before],
            "slowest": [{"seconds": float(s), "phase": p, "test": t} for s, p, t in slowest],
            "tail": out[-1500:] if proc.returncode else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "suite.json"))
    a = ap.parse_args()
    runs = []
    for i in range(1, a.runs + 1):
        r = one_run(i)
        runs.append(r)
        print(f"run {i}: exit {r['exit_code']}, {r['counts']}, pytest {r['pytest_seconds']} s, "
              f"command {r['command_seconds']} s, CPUs idle {r['cpu_idle_fraction']:.0%}, "
              f"load before {r['load_average_before'][0]}", flush=True)
        done = [x["pytest_seconds"] for x in runs if x["pytest_seconds"] is not None]
        save({"what": "bash .ci/run in fresh clones, one after another", "runs": runs,
                              "pytest_seconds_median": sorted(done)[len(done) // 2] if done else None,
                              "all_green": all(x["exit_code"] == 0 for x in runs), "target_seconds": 480}, a.out)


if __name__ == "__main__":
    main()
