#!/usr/bin/env python
"""Ingest throughput: the tutorial's approach, a decode-only floor and genrecls ingest, side by side.

On one folder of 44.1 kHz stereo MP3s (generated with :mod:`genrecls.audio.sample_data` into
``--data``, outside the repository), in one run:

1. **tutorial**: one process, ``librosa.load(path, sr=22050)``, 100000-sample cuts,
   ``librosa.feature.melspectrogram`` + ``librosa.power_to_db`` per segment;
2. **decode floor**: ``soundfile.read`` of every file and nothing else, on every core
   (a ``multiprocessing`` pool started before the clock starts), and on one core;
3. **genrecls**: ``genrecls.jobs.ingest.ingest`` on every core and on one worker (a local Ray
   started, and its workers warmed by a small ingest, before the clock starts: the
   steady state of a long run), plus one cold run of the CLI (``genrecls ingest``
   in a fresh process: Python, Ray start-up and worker imports included).

Throughput is audio-seconds per wall-second (x real time), the median of ``--repeats``
runs, the methods interleaved within each repeat.  Because the machine may be shared, the
CPU seconds spent by this process and all its children (pool and Ray workers) are also
recorded for every run, giving a load-independent audio-seconds-per-CPU-second figure.  Also measured: the peak RSS of a worker ingesting one long track (default 3 hours,
44.1 kHz stereo FLAC; ``process_batch`` run in a fresh process, exactly what a Ray task
runs), bytes per stored segment, and whether float16 storage holds up (max abs dB error
against float32; a logistic regression on mean-pooled mels trained on each).
``--profile`` adds a per-stage CPU profile of the hot path (decode, mono mix, resample,
features, float16 cast, Parquet write).

Usage::

    python bench/ingest_parts.py            # full run (about 10 minutes on 2 cores)
    python bench/ingest_parts.py --quick    # smoke run (about 2 minutes)

Writes ``bench/results/ingest_parts.json`` (``--json``) and prints a table.  The whole-command
benchmark (what a user runs, start-up included) is ``bench/ingest.py``.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
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
if REPO not in sys.path and not os.environ.get("GENRECLS_BENCH_NO_REPO_PATH"):
    sys.path.insert(0, REPO)

TARGETS = {"vs_tutorial": 3.5, "vs_decode_floor": 0.45, "scaling_2_vs_1": 1.8, "worker_peak_rss_gib": 1.0}


# -- data -------------------------------------------------------------------------------
def ensure_data(folder: str, tracks: int, seconds: float) -> list[str]:
    """``tracks`` MP3s of ``seconds`` s (44.1 kHz stereo) in 4 genre folders; generated once."""
    from genrecls.audio import make_sample_collection

    per_genre = -(-tracks // 4)
    make_sample_collection(folder, genres=4, tracks_per_genre=per_genre, seconds=seconds, formats=("mp3",), seed=7)
    files = sorted(glob.glob(os.path.join(folder, "*", "*.mp3")))
    return files[: per_genre * 4]


def ensure_long_track(path: str, hours: float) -> str:
    """A long 44.1 kHz stereo FLAC (music tiled from 60 s of synthesis), written once in blocks."""
    import numpy as np
    import soundfile as sf

    from genrecls.audio import synthesize

    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    base = synthesize("rock", 60.0, seed=3)
    frames = int(hours * 3600 * 44100)
    tmp = path + ".tmp.flac"
    with sf.SoundFile(tmp, "w", 44100, 2, format="FLAC", subtype="PCM_16") as f:
        done, k = 0, 0
        while done < frames:
            block = base[: min(base.shape[0], frames - done)] * np.float32(0.6 + 0.3 * ((k % 7) / 7))
            f.write(block)
            done += block.shape[0]
            k += 1
    os.replace(tmp, path)
    return path


def audio_seconds(files: list[str]) -> float:
    import soundfile as sf

    return sum(sf.info(f).duration for f in files)


# -- (1) the tutorial -------------------------------------------------------------------
def tutorial(files: list[str]) -> int:
    import librosa

    n = 0
    out = []
    for f in files:
        y, sr = librosa.load(f, sr=22050)
        for i in range(len(y) // 100000):
            S = librosa.feature.melspectrogram(y=y[i * 100000:(i + 1) * 100000], sr=sr)
            out.append(librosa.power_to_db(S))
            n += 1
    return n


# -- (2) decode-only floor --------------------------------------------------------------
def _decode(path: str) -> int:
    import soundfile as sf

    return sf.read(path, dtype="float32")[0].shape[0]


def _warm(_):
    import soundfile  # noqa: F401

    return os.getpid()


# -- (3) genrecls -----------------------------------------------------------------------
def _ray_start(workers: int) -> None:
    import ray

    from genrecls.core import quiet_environment, worker_env

    quiet_environment()
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": worker_env()})


def _warm_folder(files: list[str], root: str) -> str:
    """A small library of links to the first files (one per genre), to start Ray workers."""
    warm = os.path.join(root, "warm-src")
    os.makedirs(os.path.join(warm, "w"), exist_ok=True)
    for f in files[:4]:
        dst = os.path.join(warm, "w", os.path.basename(f))
        if not os.path.exists(dst):
            os.symlink(f, dst)
    return warm


def genrecls_run(data: str, out: str, workers: int):
    from genrecls.core import Config
    from genrecls.jobs import ingest

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = ingest(data, out, Config(), workers=workers, progress=False)
    wall = time.perf_counter() - t0
    if summary.failed:
        raise RuntimeError(f"genrecls ingest failed on {summary.failed} files: {summary.failures_by_kind}")
    return wall, summary


def _code_root() -> str:
    """The folder holding the ``genrecls`` package being measured (the checkout, or another copy on PYTHONPATH)."""
    import genrecls

    return os.path.dirname(os.path.dirname(os.path.abspath(genrecls.__file__)))


def cli_cold(data: str, out: str, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "genrecls", "ingest", data, "--out", out, "--workers", str(workers), "-q"],
                   check=True, stdout=subprocess.DEVNULL, cwd=_code_root())
    return time.perf_counter() - t0


# -- memory of a worker on a long track ---------------------------------------------------
_MEMORY_SCRIPT = r"""
import json, os, resource, sys, time
from genrecls.core import Config
from genrecls.jobs import TrackTask, process_batch
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            return int(line.split()[1]) * 1024
path, out = sys.argv[1], sys.argv[2]
base = hwm()
st = os.stat(path)
t0 = time.perf_counter()
res = process_batch([TrackTask(path, os.path.basename(path), 'long', st.st_size, st.st_mtime_ns)], Config().features, out, 'part-long.parquet')
wall = time.perf_counter() - t0
print(json.dumps({'peak_rss_bytes': hwm(), 'rss_after_imports_bytes': base, 'wall_seconds': wall,
                  'audio_seconds': res['audio_seconds'], 'segments': res['segments'], 'failures': res['failures'],
                  'shard_bytes': res['shard_bytes']}, default=str))
"""


def worker_memory(long_path: str, root: str) -> dict:
    out = os.path.join(root, "long-ds")
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, long_path, out], capture_output=True, text=True, env=env, cwd=_code_root())
    if r.returncode:
        raise RuntimeError(f"memory probe failed: {r.stderr[-2000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return res


# -- float16 storage ----------------------------------------------------------------------
def float16_check(data: str, root: str, workers: int, max_segments: int) -> dict:
    """Ingest ``data`` twice (float16, float32 storage) and compare values and a quick classifier."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from genrecls.core import Config
    from genrecls.jobs import ingest
    from genrecls.storage import Dataset, mel_array

    results = {"data": data, "max_segments_per_track": max_segments}
    pooled = {}
    for dtype in ("float32", "float16"):
        out = os.path.join(root, f"f16check-{dtype}")
        shutil.rmtree(out, ignore_errors=True)
        cfg = Config().with_section(features={"dtype": dtype, "max_segments_per_track": max_segments})
        ingest(data, out, cfg, workers=workers, progress=False)
        ds = Dataset(out)
        t = ds.read_segments(columns=["track_id", "segment_index", "label", "mel"])
        t = t.sort_by([("track_id", "ascending"), ("segment_index", "ascending")])
        mels = mel_array(t.column("mel"), ds.feature_config().mel_shape, np.float32)
        pooled[dtype] = (mels, t.column("label").to_pylist(), t.column("track_id").to_pylist())
        results[f"bytes_per_segment_{dtype}"] = sum(os.path.getsize(p) for p in ds.shard_paths()) / len(t)
        shutil.rmtree(out, ignore_errors=True)
    m32, labels, groups = pooled["float32"]
    m16 = pooled["float16"][0]
    assert pooled["float16"][2] == groups
    err = np.abs(m32 - m16)
    results.update(max_abs_db_error=float(err.max()), mean_abs_db_error=float(err.mean()),
                   segments=int(len(labels)), tracks=len(set(groups)), labels=sorted(set(labels)))
    n_splits = min(5, len(set(groups)))
    for dtype in ("float32", "float16"):
        X = pooled[dtype][0]
        feats = np.concatenate([X.mean(axis=2), X.std(axis=2)], axis=1)  # mean-pooled over time (+ spread)
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        scores = cross_val_score(clf, feats, labels, groups=groups, cv=GroupKFold(n_splits=n_splits))
        results[f"accuracy_{dtype}"] = float(scores.mean())
    results["accuracy_difference"] = results["accuracy_float16"] - results["accuracy_float32"]
    return results


# -- per-stage profile --------------------------------------------------------------------
def profile_stages(files: list[str], root: str) -> dict:
    """CPU time per stage of the hot path on ``files`` (one process, one BLAS thread)."""
    import numpy as np
    import soundfile as sf
    import soxr

    try:
        import threadpoolctl

        threadpoolctl.threadpool_limits(1)
    except ImportError:
        pass
    from genrecls.audio import feature_batch, iter_segments, log_mel, tune_allocator
    from genrecls.core import FeatureConfig
    from genrecls.storage import Location, ShardWriter

    tune_allocator()  # as the ingest and classify decoding tasks do in a worker

    cfg = FeatureConfig()
    names = ["decode", "mono mix", "peak/finite check", "resample", "segment", "features", "float16 cast", "parquet write"]
    clock = time.process_time
    batch = feature_batch(cfg)

    def run(paths, stages) -> float:
        total_audio = 0.0
        loc = Location.parse(os.path.join(root, "profile-ds"))
        writer = ShardWriter(loc, "part-profile.parquet", cfg)
        for path in paths:
            mono_blocks = []
            with sf.SoundFile(path) as f:
                rs = soxr.ResampleStream(f.samplerate, cfg.sample_rate, 1, dtype="float32", quality=cfg.resample_quality)
                total_audio += f.frames / f.samplerate
                while True:
                    t = clock()
                    block = f.read(1 << 16, dtype="float32", always_2d=True)
                    t1 = clock()
                    stages["decode"] += t1 - t
                    last = block.shape[0] < (1 << 16)
                    mono = block.mean(axis=1, dtype=np.float32) if block.shape[0] else np.zeros(0, np.float32)
                    t2 = clock()
                    stages["mono mix"] += t2 - t1
                    if mono.size:
                        float(np.max(np.abs(mono)))
                    t3 = clock()
                    stages["peak/finite check"] += t3 - t2
                    mono_blocks.append(rs.resample_chunk(mono, last=last))
                    stages["resample"] += clock() - t3
                    if last:
                        break
            t = clock()
            segs = [s.samples for s in iter_segments(mono_blocks, cfg)]
            t1 = clock()
            stages["segment"] += t1 - t
            mels = np.concatenate([log_mel(np.stack(segs[i:i + batch]), cfg) for i in range(0, len(segs), batch)])
            t2 = clock()
            stages["features"] += t2 - t1
            m16 = mels.astype(np.float16)
            t3 = clock()
            stages["float16 cast"] += t3 - t2
            writer.add_track(track_id=os.path.basename(path), path=path, label="x", fingerprint="0" * 32, size=0,
                             mtime_ns=0, duration=1.0, mels=m16, starts=[s * cfg.segment_seconds for s in range(len(segs))])
            stages["parquet write"] += clock() - t3
        t = clock()
        writer.close()
        stages["parquet write"] += clock() - t
        shutil.rmtree(loc.root, ignore_errors=True)
        return total_audio

    run(files[:1], dict.fromkeys(names, 0.0))  # imports and first-call costs outside the clock
    stages = dict.fromkeys(names, 0.0)
    total_audio = run(files, stages)
    total = sum(stages.values())
    return {"audio_seconds": total_audio, "cpu_seconds": total,
            "stages": {k: {"cpu_seconds": v, "share": v / total, "x_realtime": total_audio / v if v else None}
                       for k, v in stages.items()},
            "x_realtime_one_core": total_audio / total}


# -- main ---------------------------------------------------------------------------------
def tree_cpu() -> float:
    """CPU seconds (user + system) of this process and every live descendant (pool and Ray workers)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for p in me.children(recursive=True):
        try:
            total += sum(p.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def median(xs):
    return statistics.median(xs) if xs else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/tmp/bench-ingest/mp3", help="folder of generated MP3s (created if missing)")
    p.add_argument("--tracks", type=int, default=40)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="all cores (default: os.cpu_count())")
    p.add_argument("--long-hours", type=float, default=3.0, help="length of the memory-probe track (0 skips it)")
    p.add_argument("--float16-data", default="/tmp/game-music",
                   help="labelled library for the float16 check (default: the real-music dev set if present, else --data)")
    p.add_argument("--float16-segments", type=int, default=8, help="segments per track in the float16 check")
    p.add_argument("--profile", action="store_true", help="per-stage CPU profile of the hot path")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: tutorial,floor,genrecls,one,cold,memory,float16")
    p.add_argument("--quick", action="store_true", help="8 tracks x 10 s, 1 repeat, 20-minute memory track")
    p.add_argument("--json", default=os.path.join(HERE, "results", "ingest_parts.json"))
    a = p.parse_args(argv)
    if a.quick:
        a.data = a.data.rstrip("/") + "-quick"
        a.tracks, a.seconds, a.repeats = 8, 10.0, 1
        a.long_hours = min(a.long_hours, 1 / 3)
        a.float16_segments = min(a.float16_segments, 3)
        if a.float16_data == "/tmp/game-music":
            a.float16_data = ""
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    work = tempfile.mkdtemp(prefix="genrecls-bench-")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as inside Ray workers; avoids BLAS thread thrash on shared cores

    import genrecls

    print(f"genrecls from {os.path.dirname(genrecls.__file__)}", flush=True)
    files = ensure_data(a.data, a.tracks, a.seconds)
    secs = audio_seconds(files)
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_before": load()},
        "setup": {"data": a.data, "tracks": len(files), "seconds_each": a.seconds, "audio_seconds": secs,
                  "format": "MP3 44.1 kHz stereo", "repeats": a.repeats, "workers": a.workers, "quick": a.quick,
                  "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "runs": {}, "median_x_realtime": {},
    }
    runs = result["runs"]
    print(f"{len(files)} files, {secs / 60:.1f} min of audio; load average {result['machine']['load_before']}", flush=True)

    if a.profile:
        print("profiling the hot path (one process)...", flush=True)
        result["profile"] = profile_stages(files[: min(len(files), 12)], work)
        for k, v in result["profile"]["stages"].items():
            print(f"  {k:18s} {v['cpu_seconds']:7.3f} s cpu  {100 * v['share']:5.1f}%")
        print(f"  total: {result['profile']['x_realtime_one_core']:.0f}x real time on one core", flush=True)

    pool = None
    if "floor" not in skip:
        pool = mp.get_context("spawn").Pool(a.workers)
        pool.map(_warm, range(a.workers * 2))
    if "genrecls" not in skip:
        _ray_start(a.workers)
        warm = _warm_folder(files, work)
        genrecls_run(warm, os.path.join(work, "warm-ds"), a.workers)
    if "tutorial" not in skip:
        tutorial(files[:1])  # imports and first-call costs outside the clock

    # --workers limits concurrency on a running Ray (genrecls.core.scheduling.slots)
    one_in_same_ray = "genrecls" not in skip and "one" not in skip
    result["setup"]["one_worker_method"] = ("--workers 1 on the same 2-CPU Ray, interleaved" if one_in_same_ray
                                            else "a separate 1-CPU Ray, after the other runs")
    cpu = result["cpu_seconds"] = {}

    def timed(name, fn):
        """Run fn; record its wall time, and the CPU time of this process and all its children."""
        c0, t0 = tree_cpu(), time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t0
        runs.setdefault(name, []).append(wall)
        cpu.setdefault(name, []).append(tree_cpu() - c0)
        return out

    for r in range(a.repeats):
        if "tutorial" not in skip:
            timed("tutorial", lambda: tutorial(files))
        if pool is not None:
            timed("decode_floor_all_cores", lambda: pool.map(_decode, files, chunksize=1))
            timed("decode_floor_one_core", lambda: [_decode(f) for f in files])
        if "genrecls" not in skip:
            summary = timed("genrecls_all_cores", lambda: genrecls_run(a.data, os.path.join(work, "ds"), a.workers)[1])
            result["dataset"] = {"segments": summary.segments_added, "shards": summary.shards_written,
                                 "shard_bytes": summary.shard_bytes,
                                 "bytes_per_segment": summary.shard_bytes / max(summary.segments_added, 1),
                                 "worker_pids": len(summary.worker_pids)}
            if one_in_same_ray:  # --workers 1 on the same Ray: exactly one task at a time, interleaved
                timed("genrecls_one_worker", lambda: genrecls_run(a.data, os.path.join(work, "ds1"), 1))
        print(f"repeat {r + 1}/{a.repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in runs.items())
              + f"; load {load()[0]}", flush=True)
    if pool is not None:
        pool.close()
        pool.join()
    if "genrecls" not in skip and "one" not in skip and not one_in_same_ray:
        # code without a concurrency limit for --workers on a running Ray: a Ray of 1 CPU instead
        _ray_start(1)
        genrecls_run(warm, os.path.join(work, "warm-ds"), 1)
        for r in range(a.repeats):
            timed("genrecls_one_worker", lambda: genrecls_run(a.data, os.path.join(work, "ds1"), 1))
            print(f"1 worker, repeat {r + 1}/{a.repeats}: {runs['genrecls_one_worker'][-1]:.2f}s", flush=True)
    if "genrecls" not in skip:
        import ray

        ray.shutdown()
    if "cold" not in skip:
        runs["genrecls_cli_cold_all_cores"] = [cli_cold(a.data, os.path.join(work, "cold"), a.workers)]
        print(f"cold CLI run: {runs['genrecls_cli_cold_all_cores'][0]:.2f}s", flush=True)

    med = result["median_x_realtime"]
    for k, v in runs.items():
        med[k] = secs / median(v)
    ratios = {}
    g = med.get("genrecls_all_cores")
    if g and "tutorial" in med:
        ratios["vs_tutorial"] = g / med["tutorial"]
    if g and "decode_floor_all_cores" in med:
        ratios["vs_decode_floor"] = g / med["decode_floor_all_cores"]
    if g and "genrecls_one_worker" in med:
        ratios["scaling_2_vs_1"] = g / med["genrecls_one_worker"]
    if "genrecls_cli_cold_all_cores" in med and "tutorial" in med:
        ratios["cold_cli_vs_tutorial"] = med["genrecls_cli_cold_all_cores"] / med["tutorial"]
    result["ratios"] = ratios
    # load-independent view: audio seconds per CPU second spent (this process and its children)
    eff = result["x_realtime_per_cpu_second"] = {k: secs / median(v) for k, v in cpu.items() if median(v)}
    if "genrecls_all_cores" in eff:
        g = eff["genrecls_all_cores"]
        result["cpu_ratios"] = {
            k: v for k, v in {
                # with every core busy, genrecls would run at (cores x g); the tutorial uses one core
                "vs_tutorial_if_cores_free": a.workers * g / eff["tutorial"] if "tutorial" in eff else None,
                "vs_decode_floor": g / eff["decode_floor_all_cores"] if "decode_floor_all_cores" in eff else None,
            }.items() if v is not None}

    if "memory" not in skip and a.long_hours > 0:
        print(f"memory probe: a {a.long_hours:g} h track...", flush=True)
        long_path = ensure_long_track(os.path.join(os.path.dirname(a.data.rstrip("/")), f"long-{a.long_hours:g}h.flac"), a.long_hours)
        result["worker_memory"] = dict(worker_memory(long_path, work), track=long_path, hours=a.long_hours)
        print(f"  peak RSS {result['worker_memory']['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    if "float16" not in skip:
        data16 = a.float16_data if a.float16_data and os.path.isdir(a.float16_data) else a.data
        print(f"float16 check on {data16}...", flush=True)
        _ray_start(a.workers)
        result["float16"] = float16_check(data16, work, a.workers, a.float16_segments)
        import ray

        ray.shutdown()
    result["machine"]["load_after"] = load()
    result["targets"] = {}
    for k, target in TARGETS.items():
        if k == "worker_peak_rss_gib":
            if "worker_memory" in result:
                v = result["worker_memory"]["peak_rss_bytes"] / 2**30
                result["targets"][k] = {"target": f"< {target}", "value": v, "met": v < target}
        elif k in ratios:
            result["targets"][k] = {"target": f">= {target}", "value": ratios[k], "met": ratios[k] >= target}

    # -- report ---------------------------------------------------------------------------
    print()
    print(f"{'method':32s} {'median s':>9s} {'x real time':>12s}   runs")
    for k, v in runs.items():
        print(f"{k:32s} {median(v):9.2f} {med[k]:12.0f}   {', '.join(f'{x:.2f}' for x in v)}")
    for k, v in ratios.items():
        t = result["targets"].get(k)
        print(f"{k:32s} {v:9.2f}" + (f"   target {t['target']}: {'met' if t['met'] else 'MISSED'}" if t else ""))
    if eff:
        print("audio seconds per CPU second (load-independent): " + ", ".join(f"{k} {v:.0f}" for k, v in eff.items()))
        if result.get("cpu_ratios"):
            print("  CPU-time ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in result["cpu_ratios"].items()))
    if "dataset" in result:
        print(f"bytes per stored segment: {result['dataset']['bytes_per_segment']:.0f} "
              f"({result['dataset']['segments']} segments, {result['dataset']['shards']} shards)")
    if "worker_memory" in result:
        wm = result["worker_memory"]
        print(f"worker on a {a.long_hours:g} h track: peak RSS {wm['peak_rss_bytes'] / 2**20:.0f} MiB "
              f"(after imports {wm['rss_after_imports_bytes'] / 2**20:.0f} MiB), {wm['segments']} segments, "
              f"{wm['audio_seconds'] / max(wm['wall_seconds'], 1e-9):.0f}x real time")
    if "float16" in result:
        f = result["float16"]
        print(f"float16 vs float32 on {f['tracks']} tracks / {f['segments']} segments: max abs error {f['max_abs_db_error']:.4f} dB "
              f"(mean {f['mean_abs_db_error']:.5f}); logistic regression accuracy {f['accuracy_float32']:.3f} (float32) "
              f"vs {f['accuracy_float16']:.3f} (float16); bytes/segment {f['bytes_per_segment_float32']:.0f} vs {f['bytes_per_segment_float16']:.0f}")
    print(f"load average before {result['machine']['load_before']}, after {result['machine']['load_after']}")
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    print(f"wrote {a.json}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
