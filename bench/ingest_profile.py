#!/usr/bin/env python
"""Where the CPU of a whole ``genrecls ingest`` goes: per process and per thread, load-independent.

Runs the CLI (``python -m genrecls ingest LIB --out DS --workers N``) in a fresh process and
samples its process tree with psutil every ``--interval`` seconds: CPU seconds (user +
system) of the driver, the raylet, the GCS, every Ray worker and Ray's helper processes
(agents, log monitor), and, per worker, its threads by name (``/proc/PID/task/TID``:
FFmpeg, OpenBLAS/OpenMP, pyarrow's pools, Ray's core-worker threads) with their CPU
seconds.  CPU seconds do not depend on the machine's load, so the profile is valid on a
shared machine; wall times are printed but are not figures.

Usage::

    python bench/ingest_profile.py LIB --workers 1 2 [--set ingest.in_process_mb=0]

Writes ``bench/results/ingest_profile.json`` (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def role(p: psutil.Process, root_pid: int) -> str:
    if p.pid == root_pid:
        return "driver"
    try:
        args = p.cmdline()
        name = p.name()
    except psutil.Error:
        return "gone"
    if name.startswith("ray::") or (args and args[0].startswith("ray::")):
        return "worker"
    exe = os.path.basename(args[0]) if args else name
    if exe in ("gcs_server", "raylet"):
        return "gcs" if exe == "gcs_server" else "raylet"
    script = next((a for a in args[1:] if a.endswith(".py")), "")
    if script.endswith("default_worker.py"):
        return "worker"
    if script:
        parts = script.split(os.sep)
        return "/".join(parts[-2:]).removesuffix(".py")
    return name or "other"


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """{tid: (thread name, CPU seconds)} from /proc."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                s = f.read()
        except OSError:
            continue
        name = s[s.index("(") + 1:s.rindex(")")]
        fields = s[s.rindex(")") + 2:].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def profile(cmd: list[str], interval: float, env: dict | None = None) -> dict:
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    root = psutil.Process(proc.pid)
    seen: dict[int, dict] = {}
    threads: dict[int, dict[int, tuple[str, float]]] = {}
    max_threads: dict[int, int] = defaultdict(int)
    while proc.poll() is None:
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                with p.oneshot():
                    ct = p.cpu_times()
                    nt = p.num_threads()
                    r = role(p, proc.pid)
                    if r == "workers/setup_worker" or seen.get(p.pid, {}).get("role") == "worker":
                        r = "worker"  # a worker started through a runtime env execs its default_worker.py
                    if r == "worker" or p.pid == proc.pid:
                        threads[p.pid] = thread_cpu(p.pid) or threads.get(p.pid, {})
                    else:
                        # a Ray helper renames itself late; keep the first clear role
                        pass
                seen[p.pid] = {"role": r if r != "gone" else seen.get(p.pid, {}).get("role", "gone"),
                               "cpu": ct.user + ct.system, "first": seen.get(p.pid, {}).get("first", time.monotonic() - t0)}
                max_threads[p.pid] = max(max_threads[p.pid], nt)
            except psutil.Error:
                pass
        time.sleep(interval)
    out_text = proc.stdout.read().decode(errors="replace")
    wall = time.monotonic() - t0
    # the driver's own final CPU (it was our child): exact from the OS
    by_role: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for pid, d in seen.items():
        by_role[d["role"]] += d["cpu"]
        count[d["role"]] += 1
    workers = []
    for pid, d in seen.items():
        if d["role"] != "worker" or d["cpu"] < 0.05:
            continue
        per_name: dict[str, float] = defaultdict(float)
        n_by_name: dict[str, int] = defaultdict(int)
        for name, cpu in threads.get(pid, {}).values():
            per_name[name] += cpu
            n_by_name[name] += 1
        workers.append({"pid": pid, "cpu_seconds": round(d["cpu"], 2), "max_threads": max_threads[pid],
                        "threads": {k: {"n": n_by_name[k], "cpu_seconds": round(v, 2)}
                                    for k, v in sorted(per_name.items(), key=lambda kv: -kv[1])}})
    workers.sort(key=lambda w: -w["cpu_seconds"])
    driver_threads: dict[str, float] = defaultdict(float)
    for name, cpu in threads.get(proc.pid, {}).values():
        driver_threads[name] += cpu
    return {"cmd": cmd, "rc": proc.returncode, "wall_seconds_not_a_figure": round(wall, 1),
            "cpu_seconds_by_role": {k: round(v, 2) for k, v in sorted(by_role.items(), key=lambda kv: -kv[1])},
            "processes_by_role": dict(count),
            "cpu_seconds_total": round(sum(by_role.values()), 2),
            "workers": workers,
            "driver_threads": {k: round(v, 2) for k, v in sorted(driver_threads.items(), key=lambda kv: -kv[1]) if v},
            "output_tail": out_text[-1500:]}


THREADS_CHECK = r"""
import glob, json, resource, sys
from threadpoolctl import threadpool_info, threadpool_limits
from genrecls.core import FeatureConfig
from genrecls.audio import one_thread, track_features
files = sorted(glob.glob(sys.argv[1] + "/**/*.mp3", recursive=True))[:int(sys.argv[2])]
cfg = FeatureConfig()
track_features(files[0], cfg)
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
out = {"tracks": len(files), "blas_threads_default": [p["num_threads"] for p in threadpool_info()]}
for rep in range(2):
    for name in ("default_threads", "one_thread"):
        with (one_thread() if name == "one_thread" else threadpool_limits(None)):
            c = cpu()
            for f in files:
                track_features(f, cfg)
            out.setdefault(name + "_cpu_seconds", []).append(round(cpu() - c, 2))
print(json.dumps(out))
"""


def threads_check(library: str, tracks: int, python: str, env: dict) -> dict:
    """CPU seconds of track_features on the same tracks in one process: default native threads vs one_thread()."""
    r = subprocess.run([python, "-c", THREADS_CHECK, library, str(tracks)], env=env, capture_output=True, text=True,
                       check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("library")
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="--workers of each profiled run (none: only --threads-check)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--threads-check", type=int, default=0, metavar="TRACKS",
                   help="also time track_features on TRACKS tracks in one process, default threads vs one_thread()")
    p.add_argument("--code", default=REPO, help="folder holding the genrecls package to run (default: this checkout)")
    p.add_argument("--label", default="", help="a name for this profile in the JSON (e.g. before, after)")
    p.add_argument("--json", default=os.path.join(HERE, "results", "ingest_profile.json"))
    a = p.parse_args(argv)
    env = dict(os.environ)
    env["PYTHONPATH"] = a.code + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    runs = {}
    if a.threads_check:
        runs["threads_check"] = threads_check(a.library, a.threads_check, a.python, env)
        print("threads check:", runs["threads_check"])
    for n in a.workers:
        out = tempfile.mkdtemp(prefix="genrecls-prof-")
        try:
            cmd = [a.python, "-m", "genrecls", "ingest", a.library, "--out", os.path.join(out, "ds"),
                   "--workers", str(n), "-q"]
            for o in a.overrides:
                cmd += ["--set", o]
            r = profile(cmd, a.interval, env)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        runs[f"workers_{n}"] = r
        print(f"--workers {n}: rc {r['rc']}, CPU s by role {r['cpu_seconds_by_role']}, total {r['cpu_seconds_total']}")
        for w in r["workers"]:
            top = ", ".join(f"{k} x{v['n']} {v['cpu_seconds']}" for k, v in list(w["threads"].items())[:6])
            print(f"   worker {w['pid']}: {w['cpu_seconds']} s, {w['max_threads']} threads: {top}")
        if r["rc"]:
            print(r["output_tail"])
    data = {}
    if os.path.exists(a.json):
        with open(a.json) as f:
            data = json.load(f)
    data[a.label or time.strftime("%Y-%m-%dT%H:%M:%S")] = {"library": a.library, "load_before": os.getloadavg(),
                                                            "runs": runs}
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(data, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
