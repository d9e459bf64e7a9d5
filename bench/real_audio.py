#!/usr/bin/env python
"""Real-world decoding: what genrecls keeps and rejects of files from real encoders and real music.

Two sets:

(a) the **encoder corpus** (``bench/encoder_corpus.py``; built into ``--corpus`` if absent):
    files from lame, ffmpeg, sox, flac, oggenc and opusenc, intact and truncated, with
    FFmpeg's reference length in its ``manifest.json``;
(b) the developers' **real music** (``--real``, default ``/tmp/game-music``: Ogg/Opus game
    soundtracks in 5 style folders; skipped with a note where it is absent).

Each set goes through the product as a user runs it: by default the real ``genrecls
ingest`` CLI in a fresh process (``--method ingest``; a run that outlives ``--timeout`` is
stopped with SIGTERM, then SIGKILL, and recorded as needing a kill), or
``genrecls.audio.decode.read_mono`` file by file in a worker process with a per-file deadline
(``--method decode``).  For every file it records the outcome (kept, kept with a
warning, rejected with its kind and reason) beside FFmpeg's opinion (does ``ffmpeg -i f
-f f32le -ac 1 -`` decode it, and how many seconds), and flags kept files whose length is
more than 1% off FFmpeg's.

An *intact* file is one the corpus made whole; in the real set, one FFmpeg decodes
without error.  Target: **0 intact files rejected** (and none kept more than 1% short)
and no run that needs a kill.  A dataset's warnings table (rows path, label, kind,
reason) is read where the dataset has one (``Dataset.warnings``).

Usage::

    python bench/real_audio.py                       # both sets, genrecls ingest CLI
    python bench/real_audio.py --method decode       # read_mono per file instead
    python bench/real_audio.py --quick               # smoke: 3 files per label of each set

Writes ``bench/results/real_audio.json`` (``--json``) and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from encoder_corpus import build as build_corpus  # noqa: E402
from encoder_corpus import ffmpeg_reference  # noqa: E402

TOLERANCE = 0.01
RATE = 22050


# -- what is in a set -----------------------------------------------------------------------
def corpus_files(folder: str) -> list[dict]:
    """Files of the encoder corpus with their state and FFmpeg reference, from its manifest."""
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    return [{"path": e["path"], "label": e["category"], "state": e["state"], "note": e.get("note", ""),
             "ffmpeg": e["ffmpeg"]} for e in manifest["files"]]


def real_files(folder: str, workers: int, limit: int | None) -> tuple[list[dict], int]:
    """Files under the label folders of the real set (the first ``limit`` of each label), with FFmpeg's
    reference computed here; and how many files the set holds in all."""
    rels = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")))
        for name in sorted(filenames):
            if not name.startswith((".", "_")):
                rels.append(os.path.relpath(os.path.join(dirpath, name), folder))
    total = len(rels)
    if limit is not None:
        seen: Counter = Counter()
        kept = []
        for r in rels:
            label = r.split(os.sep)[0]
            seen[label] += 1
            if seen[label] <= limit:
                kept.append(r)
        rels = kept
    with ThreadPoolExecutor(max(1, workers)) as pool:  # each reference is an ffmpeg subprocess
        refs = list(pool.map(lambda r: ffmpeg_reference(os.path.join(folder, r)), rels))
    out = []
    for rel, ref in zip(rels, refs):
        intact = ref["decodes"] and ref["exit_code"] == 0
        out.append({"path": rel.replace(os.sep, "/"), "label": rel.split(os.sep)[0], "state": "intact" if intact else
                    "damaged", "note": "", "ffmpeg": ref})
    return out, total


def limit_per_label(files: list[dict], n: int | None) -> list[dict]:
    """The first ``n`` files of each label (``n`` None: all), keeping intact and damaged files alike."""
    if n is None:
        return files
    seen: Counter = Counter()
    out = []
    for f in files:
        key = (f["label"], f["state"])
        if seen[key] < n:
            seen[key] += 1
            out.append(f)
    return out


# -- running the product -------------------------------------------------------------------
def run_ingest(folder: str, files: list[dict], all_files: bool, workers: int, timeout: float, scratch: str) -> dict:
    """``genrecls ingest`` over the set in a fresh process; each file's outcome from the dataset."""
    out = os.path.join(scratch, "ds")
    if all_files:
        source, root = folder, []
    else:  # a subset: a manifest of relative paths under the set's folder
        source = os.path.join(scratch, "subset.csv")
        with open(source, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            for e in files:
                w.writerow([e["path"], e["label"]])
        root = ["--root", folder]
    cmd = [sys.executable, "-m", "genrecls", "ingest", source, *root, "--out", out, "--workers", str(workers), "-q"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    killed = None
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        killed = "SIGTERM"
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            log, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            killed = "SIGKILL"
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
    wall = time.monotonic() - t0

    from genrecls.storage import Dataset

    outcomes: dict[str, dict] = {}
    try:
        ds = Dataset(out)
        for t in ds.track_entries():
            outcomes[t.path] = {"outcome": "kept", "seconds": t.duration_seconds}
        for r in ds.failures().to_pylist():
            outcomes[r["path"]] = {"outcome": "rejected", "kind": r["kind"], "reason": r["reason"]}
        for r in ds.warnings().to_pylist():
            o = outcomes.setdefault(r["path"], {"outcome": "kept"})
            o.setdefault("warnings", []).append({"kind": r.get("kind"), "reason": r.get("reason")})
    except Exception as exc:  # noqa: BLE001 - a dataset the run could not finish is part of the result
        log += f"\n(bench: cannot read the dataset: {type(exc).__name__}: {exc})"
    return {"command": " ".join(cmd[1:]).replace(scratch, "TMP"), "exit_code": proc.returncode,
            "needed_kill": killed, "wall_seconds": round(wall, 1), "log_tail": log[-2000:].replace(scratch, "TMP"),
            "outcomes": outcomes}


def _decode_one(path: str) -> dict:
    from genrecls.audio import AudioError, read_mono

    try:
        audio = read_mono(path, sample_rate=RATE)
    except AudioError as exc:
        return {"outcome": "rejected", "kind": exc.kind, "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a crash is a result here
        return {"outcome": "rejected", "kind": "crash", "reason": f"{type(exc).__name__}: {exc}"}
    warnings = getattr(audio, "warnings", None)  # in case the fixed decoder attaches them
    out = {"outcome": "kept", "seconds": len(audio) / RATE}
    if warnings:
        out["warnings"] = [{"kind": getattr(w, "kind", None), "reason": str(w)} for w in warnings]
    return out


def run_decode(folder: str, files: list[dict], workers: int, deadline: float) -> dict:
    """``read_mono`` per file in worker processes; a file past ``deadline`` seconds is recorded as timed out."""
    ctx = mp.get_context("spawn")
    outcomes: dict[str, dict] = {}
    t0 = time.monotonic()
    pending = list(files)
    timed_out = 0
    while pending:
        pool = ctx.Pool(workers)
        jobs = [(e, pool.apply_async(_decode_one, (os.path.join(folder, e["path"]),))) for e in pending]
        pending = []
        broken = False
        for e, job in jobs:
            if broken:
                pending.append(e)
                continue
            try:
                outcomes[e["path"]] = job.get(timeout=deadline)
            except mp.TimeoutError:
                timed_out += 1
                outcomes[e["path"]] = {"outcome": "rejected", "kind": "timed_out",
                                       "reason": f"read_mono still running after {deadline:.0f} s (killed)"}
                broken = True  # the worker is stuck: restart the pool for the rest
        pool.terminate()
        pool.join()
    return {"command": f"genrecls.audio.read_mono(path, sample_rate={RATE}) in {workers} worker process(es)",
            "exit_code": 0, "needed_kill": f"{timed_out} file(s)" if timed_out else None,
            "wall_seconds": round(time.monotonic() - t0, 1), "outcomes": outcomes}


# -- the report -----------------------------------------------------------------------------
def assess(files: list[dict], run: dict) -> dict:
    rows = []
    for e in files:
        o = run["outcomes"].get(e["path"], {"outcome": "missing"})
        ff = e["ffmpeg"]
        outcome = o["outcome"]
        if outcome == "kept" and o.get("warnings"):
            outcome = "kept_with_warning"
        row = {"path": e["path"], "state": e["state"], "outcome": outcome, "kind": o.get("kind"),
               "reason": o.get("reason"), "warnings": o.get("warnings", []), "seconds": o.get("seconds"),
               "ffmpeg_decodes": ff["decodes"], "ffmpeg_seconds": ff["seconds"],
               "ffmpeg_errors": ff.get("decode_errors"), "note": e.get("note", "")}
        if row["seconds"] is not None and ff["seconds"]:
            row["off"] = round((row["seconds"] - ff["seconds"]) / ff["seconds"], 4)
            row["length_off"] = abs(row["off"]) > TOLERANCE
        rows.append(row)
    intact = [r for r in rows if r["state"] == "intact"]
    damaged = [r for r in rows if r["state"] != "intact"]

    def counts(rs: list[dict]) -> dict:
        return {"found": len(rs),
                "kept": sum(r["outcome"] == "kept" for r in rs),
                "kept_with_warning": sum(r["outcome"] == "kept_with_warning" for r in rs),
                "rejected": sum(r["outcome"] == "rejected" for r in rs),
                "missing": sum(r["outcome"] == "missing" for r in rs),
                "rejected_by_kind": dict(Counter(r["kind"] for r in rs if r["outcome"] == "rejected").most_common()),
                "kept_length_off_1pct": sum(bool(r.get("length_off")) for r in rs)}

    return {"all": counts(rows), "intact": counts(intact), "damaged": counts(damaged),
            "intact_rejected": sum(r["outcome"] in ("rejected", "missing") for r in intact),
            "intact_length_off_1pct": sum(bool(r.get("length_off")) for r in intact),
            "run": {k: v for k, v in run.items() if k != "outcomes"}, "files": rows}


def print_set(name: str, res: dict) -> None:
    if "skipped" in res:
        print(f"\n== {name}: skipped ({res['skipped']})")
        return
    run = res["run"]
    print(f"\n== {name}: {res['source']}   ({run['command']}; exit {run['exit_code']}, {run['wall_seconds']} s"
          f"{', NEEDED ' + run['needed_kill'] if run['needed_kill'] else ''})")
    print(f"   {'':8s} {'found':>6s} {'kept':>6s} {'warned':>7s} {'rejected':>9s} {'len>1%':>7s}  rejected by kind")
    for part in ("intact", "damaged", "all"):
        c = res[part]
        kinds = ", ".join(f"{k} {n}" for k, n in c["rejected_by_kind"].items()) or "-"
        print(f"   {part:8s} {c['found']:6d} {c['kept']:6d} {c['kept_with_warning']:7d} {c['rejected']:9d} "
              f"{c['kept_length_off_1pct']:7d}  {kinds}")
    bad = [r for r in res["files"] if r["outcome"] in ("rejected", "missing") or r.get("length_off")]
    if bad:
        print("   rejected, or kept more than 1% off FFmpeg's length (FFmpeg's opinion beside each):")
    for r in bad:
        ff = f"ffmpeg {r['ffmpeg_seconds']:.2f} s" if r["ffmpeg_decodes"] else "ffmpeg decodes nothing"
        if r["outcome"] in ("rejected", "missing"):
            what = f"{r['kind']}: {r['reason']}" if r["outcome"] == "rejected" else "neither kept nor recorded"
        else:
            what = f"kept {r['seconds']:.2f} s ({r['off']:+.1%})"
        print(f"   {r['state']:7s} {r['path'][:58]:58s} {ff:>18s} | {what[:150]}")
    print(f"   target: 0 intact files rejected -> {res['intact_rejected']}; intact kept >1% off FFmpeg -> "
          f"{res['intact_length_off_1pct']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="/tmp/encoder-corpus", help="encoder corpus folder (built there if absent)")
    ap.add_argument("--real", default="/tmp/game-music", help="real music folder (skipped if absent)")
    ap.add_argument("--sets", default="corpus,real", help="which sets to run (comma-separated: corpus, real)")
    ap.add_argument("--method", choices=("ingest", "decode"), default="ingest",
                    help="the genrecls ingest CLI (default) or read_mono per file")
    ap.add_argument("--workers", type=int, default=2, help="ingest workers / decode processes (default 2)")
    ap.add_argument("--limit", type=int, help="only the first N intact and N damaged files of each label")
    ap.add_argument("--quick", action="store_true", help="smoke run: --limit 3")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds an ingest run may take before it is killed")
    ap.add_argument("--deadline", type=float, default=120, help="seconds one read_mono may take (--method decode)")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "real_audio.json"), help="where to write results")
    args = ap.parse_args(argv)
    limit = 3 if args.quick and args.limit is None else args.limit
    sets = {s.strip() for s in args.sets.split(",") if s.strip()}

    results: dict = {"when": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
                     "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                     "method": args.method, "limit_per_label": limit, "tolerance": TOLERANCE, "sets": {}}
    for name in ("corpus", "real"):
        if name not in sets:
            continue
        folder = os.path.abspath(args.corpus if name == "corpus" else args.real)
        key = "encoder_corpus" if name == "corpus" else "real_music"
        if name == "corpus" and not os.path.isfile(os.path.join(folder, "manifest.json")):
            print(f"building the encoder corpus in {folder} ...", file=sys.stderr)
            build_corpus(folder, seconds=12.0, short=3.7, fixtures=False, cover_kb=500)
        if name == "real":
            log = "/tmp/gm.log"
            if not os.path.isdir(folder):
                results["sets"][key] = {"skipped": f"{folder} does not exist"}
                continue
            if folder == "/tmp/game-music" and os.path.exists(log) and "gmdone" not in open(log).read():
                results["sets"][key] = {"skipped": f"{folder} is still being built ({log} has no 'gmdone')"}
                continue
        t0 = time.monotonic()
        if name == "corpus":
            everything = corpus_files(folder)
            files, total = limit_per_label(everything, limit), len(everything)
        else:
            files, total = real_files(folder, args.workers, limit)
        ref_seconds = time.monotonic() - t0
        with tempfile.TemporaryDirectory(prefix="real-audio-") as scratch:
            if args.method == "ingest":
                run = run_ingest(folder, files, len(files) == total, args.workers, args.timeout, scratch)
            else:
                run = run_decode(folder, files, args.workers, args.deadline)
        res = {"source": folder, **assess(files, run)}
        res["run"]["ffmpeg_reference_seconds"] = round(ref_seconds, 1)
        results["sets"][key] = res
        print_set(key, res)
    for key, res in results["sets"].items():
        if "skipped" in res:
            print_set(key, res)

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    os.replace(tmp, args.json)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
