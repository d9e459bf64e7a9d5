#!/usr/bin/env python
"""Ingest as users run it: the whole ``genrecls ingest`` command against the tutorial, plain processes and the decoder.

Every method runs as a fresh process timed from outside (Python start-up, imports and, for
genrecls, Ray's start-up included), on libraries of generated 30-s 44.1 kHz stereo MP3
tracks: a few distinct tracks made once with :mod:`genrecls.audio.sample_data` (in ``--data``,
outside the repository) and hard-linked many times into label folders:

* ``1track``: one track, what ``genrecls ingest`` costs before any work (the default
  path, which for a run this small skips Ray) and, as ``1track-ray``, with
  ``--set ingest.in_process_mb=0`` (Ray's start-up, subtracted below);
* ``short``: 100 minutes of audio (200 tracks);
* ``long``: 5 hours (600 tracks), long enough for the steady state to dominate.

Methods, interleaved within each repeat (their order rotates), each run's wall time and
the machine's load average before and after recorded, the median of ``--repeats``:

* ``cli-wN``: ``python -m genrecls ingest LIB --out DS --workers N -q`` (N in ``--workers``);
* ``tutorial``: the tutorial's script as a user writes it: one process, default threads
  (no ``OMP_NUM_THREADS``), ``librosa.load(sr=22050)``, 100000-sample cuts,
  ``librosa.feature.melspectrogram`` + ``librosa.power_to_db`` per cut;
* ``plain-pN``: genrecls's own feature function (``genrecls.audio.pipeline.track_features``,
  one thread per native pool as in a worker) in N plain processes started at once, the
  files dealt out round-robin: the practical limit of this machine;
* ``decode-pN``: the decode-only floor, the product's decoder (PyAV/FFmpeg, one thread),
  every frame to a NumPy array, in N processes.

Figures: x real time (audio seconds / wall seconds) of each method; genrecls's steady state
``(audio) / (wall - wall of 1track-ray)`` with 1 and 2 workers; the ratios of the targets
(issue 13).  Wall times are only meaningful on an idle machine: check ``load``.

Usage::

    python bench/ingest.py                    # all sections, 3 repeats (about 15 minutes on 2 idle cores)
    python bench/ingest.py --quick            # smoke run: tiny libraries, 1 repeat
    python bench/ingest.py --sections 1track,short

Writes ``bench/results/ingest.json`` (``--json``); the figures of the former in-process
benchmark (now ``bench/ingest_parts.py``) that the file held are kept under ``previous``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

TARGETS = {"steady_2w_vs_plain_p2": 0.8, "steady_2w_vs_1w": 1.8, "short_vs_tutorial": 2.0, "long_vs_tutorial": 3.5,
           "one_track_seconds": 3.0}
SECTIONS = ("1track", "short", "long")

# -- the scripts each method runs, in a fresh process ------------------------------------
TUTORIAL = r"""
import sys, librosa
files = open(sys.argv[1]).read().split("\n")
out = []
for f in files:
    y, sr = librosa.load(f, sr=22050)
    for i in range(len(y) // 100000):
        S = librosa.feature.melspectrogram(y=y[i * 100000:(i + 1) * 100000], sr=sr)
        out.append(librosa.power_to_db(S))
print(len(out))
"""

PLAIN = r"""
import sys
from genrecls.core import FeatureConfig
from genrecls.audio import one_thread, track_features
files = open(sys.argv[1]).read().split("\n")
cfg = FeatureConfig()
n = 0
with one_thread():
    for f in files:
        n += len(track_features(f, cfg).starts)
print(n)
"""

DECODE = r"""
import sys, av
files = open(sys.argv[1]).read().split("\n")
n = 0
for f in files:
    with av.open(f) as c:
        s = c.streams.audio[0]
        s.thread_count = 1
        for frame in c.decode(s):
            n += frame.to_ndarray().shape[-1]
print(n)
"""


# -- libraries --------------------------------------------------------------------------
def base_tracks(folder: str, n: int, seconds: float) -> list[str]:
    """``n`` distinct MP3s (44.1 kHz stereo) in 4 genre folders, generated once."""
    from genrecls.audio import make_sample_collection

    per_genre = -(-n // 4)
    make_sample_collection(folder, genres=4, tracks_per_genre=per_genre, seconds=seconds, formats=("mp3",), seed=7)
    files = sorted(glob.glob(os.path.join(folder, "*", "*.mp3")))
    if len(files) < n:
        raise SystemExit(f"{folder} holds {len(files)} MP3s, {n} expected; remove it to regenerate")
    return files


def build_library(base: list[str], folder: str, tracks: int) -> list[str]:
    """``tracks`` hard links (copies across file systems) to the base tracks, in their label folders."""
    out = []
    for i in range(tracks):
        src = base[i % len(base)]
        label = os.path.basename(os.path.dirname(src))
        dst = os.path.join(folder, label, f"{i:05d}_{os.path.basename(src)}")
        if not os.path.exists(dst):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        out.append(dst)
    return out


def durations(files: list[str]) -> float:
    import av

    cache: dict[int, float] = {}
    total = 0.0
    for f in files:
        ino = os.stat(f).st_ino
        if ino not in cache:
            with av.open(f) as c:
                s = c.streams.audio[0]
                cache[ino] = float(s.duration * s.time_base) if s.duration else float(c.duration) / 1e6
        total += cache[ino]
    return total


# -- running ----------------------------------------------------------------------------
def child_env() -> dict[str, str]:
    """The environment a user's shell gives: this checkout on PYTHONPATH, no thread pins."""
    env = {k: v for k, v in os.environ.items() if k not in (
        "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS", "RAY_ADDRESS")}
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timed(cmds: list[list[str]], work: str) -> dict:
    """Start the commands at once, wait for all: wall seconds and CPU seconds of the reaped children."""
    before = os.times()
    l0 = load()
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(), cwd=work)
             for c in cmds]
    outs = [p.communicate() for p in procs]
    wall = time.perf_counter() - t0
    after = os.times()
    for p, (o, e) in zip(procs, outs):
        if p.returncode:
            raise RuntimeError(f"{' '.join(p.args)} exited {p.returncode}:\n{e.decode(errors='replace')[-3000:]}")
    return {"wall_seconds": round(wall, 3),
            "cpu_seconds_reaped": round(after.children_user + after.children_system
                                        - before.children_user - before.children_system, 2),
            "load_before": l0, "load_after": load()}


def method_commands(method: str, files: list[str], lib: str, work: str, python: str) -> list[list[str]]:
    kind, _, n = method.partition("-")
    if kind == "cli":
        ds = os.path.join(work, "ds")
        shutil.rmtree(ds, ignore_errors=True)
        return [[python, "-m", "genrecls", "ingest", lib, "--out", ds, "--workers", n[1:], "-q"]]
    if kind == "cliray":  # one track through Ray: its start-up
        ds = os.path.join(work, "ds")
        shutil.rmtree(ds, ignore_errors=True)
        return [[python, "-m", "genrecls", "ingest", lib, "--out", ds, "--workers", n[1:], "-q",
                 "--set", "ingest.in_process_mb=0"]]
    script = {"tutorial": TUTORIAL, "plain": PLAIN, "decode": DECODE}[kind]
    procs = int(n[1:]) if n else 1
    cmds = []
    for i in range(procs):
        lst = os.path.join(work, f"files-{kind}-{i}.txt")
        with open(lst, "w") as f:
            f.write("\n".join(files[i::procs]))
        cmds.append([python, "-c", script, lst])
    return cmds


def median(xs):
    return statistics.median(xs) if xs else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/tmp/bench-ingest-cli", help="folder for the generated tracks and libraries")
    p.add_argument("--base", type=int, default=16, help="distinct generated tracks (default 16)")
    p.add_argument("--seconds", type=float, default=30.0, help="length of each generated track")
    p.add_argument("--short-tracks", type=int, default=200, help="tracks of the short library (default 200: 100 min)")
    p.add_argument("--long-tracks", type=int, default=600, help="tracks of the long library (default 600: 5 h)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="--workers of the CLI, and plain/decode processes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}")
    p.add_argument("--no-tutorial-long", action="store_true", help="skip the tutorial on the long library")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 tracks of 10 s, libraries of 8 and 16, 1 repeat")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--json", default=os.path.join(HERE, "results", "ingest.json"))
    a = p.parse_args(argv)
    if a.quick:
        a.data = a.data.rstrip("/") + "-quick"
        a.base, a.seconds, a.short_tracks, a.long_tracks, a.repeats = 4, 10.0, 8, 16, 1
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    sys.path.insert(0, REPO)

    t_build = time.perf_counter()
    base = base_tracks(os.path.join(a.data, f"base-{a.base}x{a.seconds:g}s"), a.base, a.seconds)
    libs = {}
    sizes = {"1track": 1, "short": a.short_tracks, "long": a.long_tracks}
    for s in sections:
        folder = os.path.join(a.data, f"lib-{s}-{sizes[s]}x{a.seconds:g}s-of-{a.base}")
        files = build_library(base, folder, sizes[s])
        libs[s] = {"folder": folder, "files": files, "tracks": len(files), "audio_seconds": round(durations(files), 2)}
    build_seconds = time.perf_counter() - t_build

    methods: dict[str, list[str]] = {}
    for s in sections:
        if s == "1track":
            methods[s] = ["cli-w2", "cliray-w2"]
        else:
            methods[s] = [f"cli-w{n}" for n in a.workers]
            if s == "short" or not a.no_tutorial_long:
                methods[s].append("tutorial")
            if s == "long":
                methods[s] += [f"plain-p{n}" for n in a.workers] + [f"decode-p{n}" for n in a.workers]

    work = tempfile.mkdtemp(prefix="genrecls-bench-cli-")
    print("libraries: " + ", ".join(f"{s} {v['tracks']} tracks {v['audio_seconds'] / 60:.0f} min" for s, v in libs.items())
          + f" (built in {build_seconds:.0f} s); load {load()}", flush=True)
    runs = []
    try:
        # warm the page cache and Python's bytecode caches outside the clock
        warm = build_library(base, os.path.join(a.data, "lib-warm-1"), 1)
        timed(method_commands("cli-w2", warm, os.path.dirname(os.path.dirname(warm[0])), work, a.python), work)
        for r in range(a.repeats):
            for s in sections:
                order = methods[s][r % len(methods[s]):] + methods[s][:r % len(methods[s])]
                for m in order:
                    rec = timed(method_commands(m, libs[s]["files"], libs[s]["folder"], work, a.python), work)
                    rec.update(section=s, method=m, repeat=r)
                    runs.append(rec)
                    print(f"  [{r + 1}/{a.repeats}] {s:7s} {m:10s} {rec['wall_seconds']:8.2f} s  "
                          f"{libs[s]['audio_seconds'] / rec['wall_seconds']:7.0f}x  load {rec['load_before']} -> "
                          f"{rec['load_after']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {s: {m: median([x["wall_seconds"] for x in runs if x["section"] == s and x["method"] == m])
               for m in methods[s]} for s in sections}
    xrt = {s: {m: round(libs[s]["audio_seconds"] / w, 1) for m, w in med[s].items() if w} for s in sections}
    fig: dict[str, float | None] = {}
    if "1track" in med:
        fig["one_track_seconds"] = med["1track"].get("cli-w2")
        fig["ray_startup_seconds"] = med["1track"].get("cliray-w2")
    for s in ("short", "long"):
        if s not in med:
            continue
        if med[s].get("tutorial"):
            for n in a.workers:
                fig[f"{s}_w{n}_vs_tutorial"] = round(med[s]["tutorial"] / med[s][f"cli-w{n}"], 3)
        if "ray_startup_seconds" in fig and fig["ray_startup_seconds"]:
            for n in a.workers:
                steady = med[s][f"cli-w{n}"] - fig["ray_startup_seconds"]
                fig[f"{s}_steady_w{n}_x_realtime"] = round(libs[s]["audio_seconds"] / steady, 1) if steady > 0 else None
    if "long" in med:
        for n in a.workers:
            fig[f"long_plain_p{n}_x_realtime"] = xrt["long"].get(f"plain-p{n}")
            fig[f"long_decode_p{n}_x_realtime"] = xrt["long"].get(f"decode-p{n}")
        st = {n: fig.get(f"long_steady_w{n}_x_realtime") for n in a.workers}
        if st.get(2) and st.get(1):
            fig["steady_2w_vs_1w"] = round(st[2] / st[1], 3)
        if st.get(2) and fig.get("long_plain_p2_x_realtime"):
            fig["steady_2w_vs_plain_p2"] = round(st[2] / fig["long_plain_p2_x_realtime"], 3)
    best = max(a.workers)
    fig["short_vs_tutorial"] = fig.get(f"short_w{best}_vs_tutorial")
    fig["long_vs_tutorial"] = fig.get(f"long_w{best}_vs_tutorial")

    result = {
        "benchmark": "whole commands, timed from outside (bench/ingest.py)",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "setup": {"data": a.data, "base_tracks": a.base, "seconds_each": a.seconds, "format": "MP3 44.1 kHz stereo",
                  "repeats": a.repeats, "workers": a.workers, "quick": a.quick, "sections": sections,
                  "libraries": {s: {k: v for k, v in d.items() if k != "files"} for s, d in libs.items()},
                  "methods": methods, "build_seconds": round(build_seconds, 1)},
        "runs": runs, "median_wall_seconds": med, "x_realtime": xrt, "figures": fig,
        "targets": TARGETS,
        "met": {k: (fig.get(k) is not None and (fig[k] <= t if k == "one_track_seconds" else fig[k] >= t))
                for k, t in TARGETS.items()},
    }
    if os.path.exists(a.json):
        try:
            with open(a.json) as f:
                old = json.load(f)
            result["previous"] = old.get("previous", old) if "benchmark" not in old else old.get("previous")
        except (OSError, ValueError):
            pass
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)
    print("\nmedian x real time:")
    for s in sections:
        print(f"  {s:7s} " + "  ".join(f"{m} {v:.0f}x" for m, v in xrt[s].items()))
    print("figures:")
    for k, v in fig.items():
        t = TARGETS.get(k)
        print(f"  {k:28s} {v}" + (f"  (target {'<=' if k == 'one_track_seconds' else '>='} {t}: "
                                    f"{'met' if result['met'][k] else 'missed'})" if t is not None else ""))
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
