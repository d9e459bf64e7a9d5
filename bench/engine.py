"""Benchmark the inference engine (genrecls.models.engine) against TensorFlow, side by side.

For each thread count (1, and the default: the CPUs this process may use) one child process
holds every contender and times them **interleaved** (contender A, B, C, then again, 3 times;
the median is reported), each on the same stored segments in batches of 16:

* ``tensorflow``: TensorFlow fp32 (the Keras backbone in a traced function, as
  ``transfer.Embedder`` runs it today);
* ``openvino-fp32``, ``openvino-auto`` (its native reduced precision where the CPU has it),
  ``openvino-auto-throughput`` (``PERFORMANCE_HINT`` THROUGHPUT, more than one thread only),
  ``onnxruntime-fp32``.

Each contender computes the same thing: every candidate layer (taggram, penultimate,
max/mean pool) and the band statistics.  One process per thread count because TensorFlow's
thread pools cannot be resized once it has run.

Also measured: start-up, whole processes timed as a command is: a cold start (empty cache:
import, TensorFlow, conversion to ONNX, compile) and a cached start (no TensorFlow), against
TensorFlow's own start (import, build, load the weights).  Agreement, on every segment of
the tracks: the maximum relative difference per layer (``max |x - tf| / max |tf|``) and the
share of tracks whose top tag (mean taggram over the track's segments) equals TensorFlow's;
with ``--run RUN``, also the share of tracks whose top class equals the SavedModel's when the
run's ``model.onnx`` runs on the engine (``model.onnx`` is written first if missing).

Tracks: ``--real DIR`` (default ``/tmp/game-music``, the development set of
``shared/data/build-game-music.sh``, when it exists), else a generated library
(``genrecls.audio.sample_data``) plus the real-encoder fixtures of ``tests/data/encoders``.  At most
``--segments-per-track`` evenly spaced segments per track.  Writes ``bench/results/engine.json``
with the load average beside every figure and the CPU's flags.

    .venv/bin/python bench/engine.py --quick     # a minute or two: a smoke run
    .venv/bin/python bench/engine.py             # the figures (run it on an idle machine)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from _results import load, save

BATCH = 16
TARGETS = {"auto_speedup": 3.0, "fp32_speedup": 1.5, "top1_agreement": 0.99}
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def cpu_info() -> dict:
    info = {"cores": os.cpu_count(), "usable": len(os.sched_getaffinity(0)), "machine": platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        model = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
        flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
        info.update(model=model[0] if model else None, flags=[fl for fl in FLAGS if fl in flags])
    except OSError:
        pass
    return info


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("tensorflow", "tf-keras", "openvino", "onnxruntime", "onnx", "tf2onnx", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


# ---------------------------------------------------------------------------- data (parent)

def library(args, work: str) -> list[tuple[str, str]]:
    """(track id, path) of the tracks to use."""
    exts = (".mp3", ".ogg", ".opus", ".flac", ".wav", ".aiff", ".aifc", ".mp2", ".m4a")
    if args.real and os.path.isdir(args.real):
        paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(args.real) for f in fs if f.lower().endswith(exts))
        return [(os.path.relpath(p, args.real), p) for p in paths[: args.max_tracks or None]]
    from genrecls.audio import make_sample_collection

    gen = os.path.join(work, "library")
    make_sample_collection(gen, genres=args.genres, tracks_per_genre=args.tracks_per_genre, seconds=args.seconds, seed=3)
    tracks = sorted((os.path.relpath(p, gen), p) for p in (os.path.join(d, f) for d, _, fs in os.walk(gen) for f in fs)
                    if p.endswith(exts))
    enc = os.path.join(ROOT, "tests", "data", "encoders")
    with open(os.path.join(enc, "manifest.json")) as f:
        tracks += [("encoders/" + e["path"], os.path.join(enc, e["path"])) for e in json.load(f)["files"]
                   if e["state"] == "intact"]
    return tracks[: args.max_tracks or None]


def featurise(tracks, per_track: int, out: str) -> dict:
    """Stored segments (float16, musicnn preset, at most ``per_track`` evenly spaced per track) into ``out``."""
    import numpy as np

    from genrecls.audio import AudioError, sampled_track_features
    from genrecls.core import feature_preset

    cfg = feature_preset("musicnn")
    mels, owners, skipped = [], [], 0
    for i, (tid, path) in enumerate(tracks):
        try:
            m = sampled_track_features(path, cfg, per_track).mels
        except AudioError:
            skipped += 1
            continue
        mels.append(m.astype(np.float16))
        owners += [i] * len(m)
    np.savez(out, mels=np.concatenate(mels), owners=np.asarray(owners))
    return {"tracks": len(mels), "segments": len(owners), "skipped": skipped}


# ---------------------------------------------------------------------------- one process, every contender

def contenders(threads: int, cache: str) -> dict:
    """Every engine of this process, TensorFlow first (its threads are set before its first op)."""
    from genrecls.models import BackboneEngine

    found = {"tensorflow": BackboneEngine("tensorflow", threads=threads)}
    wanted = [("openvino-fp32", "openvino", "fp32", "LATENCY"), ("openvino-auto", "openvino", "auto", "LATENCY"),
              ("onnxruntime-fp32", "onnxruntime", "fp32", "LATENCY")]
    if threads > 1:
        wanted.append(("openvino-auto-throughput", "openvino", "auto", "THROUGHPUT"))
    for label, engine, precision, hint in wanted:
        eng = BackboneEngine(engine, precision, threads=threads, hint=hint, cache=cache)
        if eng.describe()["engine"] == engine:  # not installed or failing: not a contender
            found[label] = eng
    return found


def child(args) -> dict:
    import numpy as np

    from genrecls.models import NETWORK_OUTPUTS, transfer_embedding

    data = np.load(args.data)
    mels, owners = data["mels"], data["owners"]
    engines = contenders(args.threads, args.cache)
    timing = mels[: args.timing_segments]
    for eng in engines.values():  # warm-up: first calls allocate and (TensorFlow) trace
        eng(timing[:BATCH])
        eng(timing[:BATCH])
    times: dict[str, list[float]] = {k: [] for k in engines}
    loads: list[float] = [load()]
    for _ in range(args.reps):
        for label, eng in engines.items():
            t = time.perf_counter()
            for i in range(0, len(timing), BATCH):
                eng(timing[i:i + BATCH])
            times[label].append((time.perf_counter() - t) / len(timing) * 1000)
        loads.append(load())
    result = {"threads": args.threads, "segments_timed": len(timing), "batch": BATCH, "reps": args.reps,
              "load": loads, "engines": {k: e.describe() for k, e in engines.items()},
              "ms_per_segment": {k: round(statistics.median(v), 2) for k, v in times.items()},
              "ms_per_segment_all": {k: [round(x, 2) for x in v] for k, v in times.items()}}
    tf_ms = result["ms_per_segment"]["tensorflow"]
    result["speedup_vs_tensorflow"] = {k: round(tf_ms / v, 2) for k, v in result["ms_per_segment"].items()}
    if args.agreement:
        outs = {}
        for label, eng in engines.items():
            parts = [eng(mels[i:i + BATCH]) for i in range(0, len(mels), BATCH)]
            outs[label] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            outs[label]["embedding_945"] = transfer_embedding(outs[label])
        ref = outs["tensorflow"]
        n_tracks = int(owners.max()) + 1
        counts = np.bincount(owners, minlength=n_tracks)[:, None]

        def track_top1(taggram):
            sums = np.zeros((n_tracks, taggram.shape[1]))
            np.add.at(sums, owners, taggram)
            return (sums / np.maximum(counts, 1)).argmax(1)

        ref_top = track_top1(ref["taggram"])
        agree = {}
        for label, out in outs.items():
            if label == "tensorflow":
                continue
            diffs = {k: float(np.abs(out[k].astype(np.float64) - ref[k]).max() / max(np.abs(ref[k]).max(), 1e-12))
                     for k in (*NETWORK_OUTPUTS, "embedding_945")}
            agree[label] = {"max_rel_diff": {k: float(f"{v:.3g}") for k, v in diffs.items()},
                            "top1_tracks": float(np.mean(track_top1(out["taggram"]) == ref_top)),
                            "top1_segments": float(np.mean(out["taggram"].argmax(1) == ref["taggram"].argmax(1)))}
        result["agreement"] = {"tracks": n_tracks, "segments": len(mels), "vs_tensorflow": agree}
        if args.run:
            result["run"] = run_agreement(args, mels, owners, n_tracks)
    return result


def run_agreement(args, mels, owners, n_tracks) -> dict:
    """A trained run: model.onnx on the engine (auto, fp32) against its SavedModel on TensorFlow, per track."""
    import numpy as np

    from genrecls.models import RunEngine

    run = args.run
    if not os.path.isfile(os.path.join(run, "model.onnx")):
        from genrecls.models import export_onnx, load_keras_model

        export_onnx(load_keras_model(os.path.join(run, "model.keras")), os.path.join(run, "model.onnx"))
    with open(os.path.join(run, "run.json")) as f:
        shape = tuple(json.load(f)["input"]["shape"][1:])
    if shape != tuple(mels.shape[1:]):
        return {"skipped": f"the run takes {shape} segments, not musicnn's"}
    probs = {}
    for label, engine, precision in (("savedmodel", "tensorflow", "fp32"), ("auto", "auto", "auto"),
                                     ("fp32", "auto", "fp32")):
        eng = RunEngine(run, input_shape=shape, engine=engine, precision=precision, threads=args.threads)
        probs[label] = (eng.predict(mels), eng.describe())
    counts = np.bincount(owners, minlength=n_tracks)[:, None]

    def tracks(p):
        sums = np.zeros((n_tracks, p.shape[1]))
        np.add.at(sums, owners, p)
        return sums / np.maximum(counts, 1)

    ref = tracks(probs["savedmodel"][0])
    return {k: {"engine": d, "top1_tracks": float(np.mean(tracks(p).argmax(1) == ref.argmax(1))),
                "max_abs_diff": float(np.abs(p - probs["savedmodel"][0]).max())}
            for k, (p, d) in probs.items() if k != "savedmodel"}


# ---------------------------------------------------------------------------- start-up (fresh processes)

STARTUP = r"""
import sys, time, json
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
import numpy as np
x = np.zeros((1, 96, 187), np.float16)
if {engine!r} == "tensorflow-keras":
    from genrecls.models import build_backbone
    import tensorflow as tf
    m = build_backbone(); m(x.astype(np.float32), training=False)
    d = {{"engine": "tensorflow"}}
else:
    from genrecls.models import BackboneEngine
    e = BackboneEngine({engine!r}, threads=1, cache={cache!r}); e(x)
    d = e.describe()
print(json.dumps({{"seconds": time.perf_counter() - t0, "tensorflow_imported": "tensorflow" in sys.modules, **d}}))
"""


def startup(engine: str, cache: str) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", STARTUP.format(root=ROOT, engine=engine, cache=cache)],
                          capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    inner = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"process_seconds": round(wall, 2), "inside_seconds": round(inner["seconds"], 2),
            "tensorflow_imported": inner["tensorflow_imported"], "engine": inner.get("engine"),
            "precision": inner.get("precision"), "load": load()}


def startups(reps: int, work: str) -> dict:
    out: dict[str, list] = {"tensorflow": [], "cold_openvino": [], "cached_openvino": [], "cached_onnxruntime": []}
    for r in range(reps):
        cache = os.path.join(work, f"cache-{r}")  # empty: the first start converts
        out["tensorflow"].append(startup("tensorflow-keras", cache))
        out["cold_openvino"].append(startup("openvino", cache))
        out["cached_openvino"].append(startup("openvino", cache))
        out["cached_onnxruntime"].append(startup("onnxruntime", cache))
    summary = {k: {"process_seconds_median": statistics.median(x["process_seconds"] for x in v), "runs": v}
               for k, v in out.items()}
    return summary


# ---------------------------------------------------------------------------- main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: fewer tracks and segments, 1 start-up rep")
    p.add_argument("--real", default="/tmp/game-music", help="real-music folder (<style>/<file>), used if present")
    p.add_argument("--max-tracks", type=int, default=0, help="at most this many tracks (0 = all)")
    p.add_argument("--segments-per-track", type=int, default=10)
    p.add_argument("--timing-segments", type=int, default=96, help="segments timed per contender and rep")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--startup-reps", type=int, default=3)
    p.add_argument("--genres", type=int, default=5)
    p.add_argument("--tracks-per-genre", type=int, default=6)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--threads", type=int, default=0, help="(internal) a child's thread count")
    p.add_argument("--run", default=None, help="also compare a trained run's model.onnx on the engine with its SavedModel")
    p.add_argument("--out", default=os.path.join(HERE, "results", "engine.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--agreement", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    from genrecls.core import quiet_environment

    quiet_environment()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.quick:
        args.max_tracks = args.max_tracks or 12
        args.segments_per_track = min(args.segments_per_track, 4)
        args.timing_segments = min(args.timing_segments, 48)
        args.startup_reps = 1
        args.genres, args.tracks_per_genre, args.seconds = 3, 2, 15.0

    from genrecls.models import available_threads

    results = {"bench": "engine", "quick": args.quick, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "cpu": cpu_info(), "versions": versions(), "load_start": load(), "targets": TARGETS}
    with tempfile.TemporaryDirectory(prefix="genrecls-bench-engine-") as work:
        tracks = library(args, work)
        data = os.path.join(work, "segments.npz")
        t = time.perf_counter()
        results["data"] = {"source": args.real if args.real and os.path.isdir(args.real) else
                           "generated library + tests/data/encoders", **featurise(tracks, args.segments_per_track, data),
                           "seconds": round(time.perf_counter() - t, 1)}
        print(f"data: {results['data']}", flush=True)
        cache = os.path.join(work, "cache")
        results["threads"] = {}
        for i, threads in enumerate(sorted({1, available_threads()})):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--threads", str(threads), "--data", data,
                   "--cache", cache, "--reps", str(args.reps), "--timing-segments", str(args.timing_segments)]
            if i == 0:
                cmd.append("--agreement")
                if args.run:
                    cmd += ["--run", args.run]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"the child for {threads} thread(s) failed")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results["threads"][str(threads)] = res
            print(f"threads {threads}: ms/segment {res['ms_per_segment']} speedup {res['speedup_vs_tensorflow']} "
                  f"load {res['load']}", flush=True)
            if "agreement" in res:
                print(f"agreement: {json.dumps(res['agreement']['vs_tensorflow'])}", flush=True)
        results["startup"] = startups(args.startup_reps, work)
        print("startup (median process seconds): "
              + ", ".join(f"{k} {v['process_seconds_median']}" for k, v in results["startup"].items()), flush=True)
    one = results["threads"]["1"]
    agree = one["agreement"]["vs_tensorflow"]
    results["verdict"] = {
        "auto_speedup_1_thread": one["speedup_vs_tensorflow"].get("openvino-auto"),
        "fp32_speedup_1_thread": one["speedup_vs_tensorflow"].get("openvino-fp32"),
        "auto_precision": one["engines"].get("openvino-auto", {}).get("precision"),
        "auto_top1_tracks": agree.get("openvino-auto", {}).get("top1_tracks"),
        "note": "speedups are TensorFlow fp32 ms / engine ms, same process, interleaved, median of reps"}
    results["load_end"] = load()
    save(results, args.out)
    print(f"verdict: {results['verdict']}\nwrote {args.out}")


if __name__ == "__main__":
    main()
