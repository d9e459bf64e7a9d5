"""What the benches share: the CPU, the load average, a timed genrecls command, the results file written
atomically, the fixed split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def load() -> float:
    """The 1-minute load average, rounded."""
    return round(os.getloadavg()[0], 2)


def cpu_model() -> str:
    """The CPU's model name (``lscpu``), to stand beside every figure."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "unknown")


def genrecls_command(args: list[str], what: str, log: str, *, ok: tuple[int, ...] | None = (0,),
                     pythonpath: str | None = None) -> dict:
    """Run ``python -m genrecls ARGS`` as a user does, timed from outside (start-up included).

    Its output is appended to ``log``; it runs in ``log``'s folder (not a checkout: ``python -m`` puts the
    current folder first on ``sys.path``), never on a ``RAY_ADDRESS`` of the environment; ``pythonpath``:
    the genrecls checkout to run (default: the installed one).  An exit code outside ``ok`` stops the
    bench (``ok=None``: any exit is recorded).  Returns the wall time, the exit code and the load around it.
    """
    env = dict(os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {}))
    env.pop("RAY_ADDRESS", None)
    before = load()
    t0 = time.monotonic()
    with open(log, "a") as out:
        out.write(f"\n$ {what}: genrecls {' '.join(args)}\n")
        out.flush()
        rc = subprocess.run([sys.executable, "-m", "genrecls", *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                            cwd=os.path.dirname(log)).returncode
    wall = time.monotonic() - t0
    print(f"  {what}: {wall:.1f} s (exit {rc}, load {before}-{load()})", flush=True)
    if ok is not None and rc not in ok:
        raise SystemExit(f"{what} failed (exit {rc}); see {log}")
    return {"what": what, "seconds": round(wall, 2), "exit": rc, "load_before": before, "load_after": load()}


def save(results: dict, path: str) -> None:
    """Write ``results`` as JSON to ``path`` through a temporary file, so a reader never sees half of it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)


def fixed_split(folder: str, dataset: str, cfg, *, again: bool = False) -> str:
    """FOLDER/splits.parquet: the product's assignment with seed 0, the split every fixed-split run uses.

    Written once (``again``: anew, for a folder that may have served another dataset).
    """
    from genrecls.jobs.training import check_dataset
    from genrecls.storage import Location, assign_splits, write_splits

    if again or not os.path.exists(os.path.join(folder, "splits.parquet")):
        check = check_dataset(dataset, cfg)
        t = cfg.train
        table = assign_splits(check.tracks, val_fraction=t.val_fraction, test_fraction=t.test_fraction, seed=0)
        loc = Location.parse(folder)
        loc.makedirs()
        write_splits(table, loc)
    return folder
