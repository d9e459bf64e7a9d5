#!/usr/bin/env python
"""Scaling: ingest throughput on 1 and 2 workers of one node and on a 2-node local cluster.

On one library, in one run, ``genrecls.jobs.ingest.ingest`` into a fresh dataset on:

1. **one node, 1 worker**: a local Ray with 1 CPU (the baseline);
2. **one node, 2 workers**: a local Ray with 2 CPUs;
3. **two nodes, 1 worker each**: a Ray cluster of a head and one more node started on this
   machine with ``ray.cluster_utils.Cluster`` (separate raylets, object stores and worker
   pools, tasks spread over both; the ``nodes`` column says how many ran tasks).

Each timed ingest runs in a freshly started Ray whose workers were warmed by a small ingest
before the clock starts (the steady state of a long run), into an empty dataset.  The
configurations take turns, ``--repeats`` rounds in the order 1-2-3, 3-2-1, 1-2-3..., so that
the drifting load of a shared machine hits them alike.  Throughput is audio-seconds per
wall-second (x real time), the median of the rounds; ratios are against configuration 1.
Also measured: the stored bytes per segment and what the driver alone spends per track and
per shard footer (a no-op re-run), the inputs of the scaling estimate in docs/cluster.md.

The library: ``--source`` (a folder of ``<label>/<file>``), by default a balanced subset of
about ``--hours`` of audio (tracks up to ``--max-track-seconds``) from the real-music dev set at /tmp/game-music when it exists
(listed in a manifest, the files are read in place), else a generated collection.  On a
machine with 2 cores the two nodes share those cores: configuration 3 measures the
overhead of a second raylet and cross-node scheduling, not extra hardware.

A second section, ``retrain``, times a scheduled ``genrecls retrain`` after 10 % new tracks
against a full retrain from scratch on the same library (see :func:`bench_retrain`).
``--sections`` picks sections; the JSON keeps the earlier results of sections not run.

Usage::

    python bench/scale.py            # ~0.5 h of real music, 3 repeats (about 6 minutes on 2 cores)
    python bench/scale.py --sections retrain --repeats 1   # the retrain timing alone
    python bench/scale.py --quick    # generated 16 x 15 s, 1 repeat (about 2 minutes)

Writes ``bench/results/scale.json`` (``--json``) and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

DEV_SET = "/tmp/game-music"
AUDIO_EXT = (".ogg", ".opus", ".mp3", ".flac", ".wav")


# -- the library --------------------------------------------------------------------------
@dataclass
class Library:
    source: str  # folder or manifest, as given to ingest
    root: str  # root of the manifests' paths
    tracks: int
    audio_seconds: float
    description: str
    warm: str  # a tiny library (a manifest of the first tracks) to warm the workers
    rows: list[tuple[str, str]]  # (path, label) of every track, in a stable order


def _duration(path: str) -> float:
    import soundfile as sf

    info = sf.info(path)
    return info.frames / info.samplerate


def _manifest(path: str, rows: list[tuple[str, str]]) -> str:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return path


def prepare_library(a: argparse.Namespace, work: str) -> Library:
    """The library every configuration ingests: a folder, a subset of the dev set, or generated."""
    if a.source:
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(a.source) for f in fs if f.lower().endswith(AUDIO_EXT))
        rows = [(f, os.path.relpath(f, a.source).split(os.sep)[0]) for f in files]
        return Library(a.source, a.source, len(files), sum(_duration(f) for f in files), f"folder {a.source}",
                       _manifest(os.path.join(work, "warm.csv"), rows[:4]), rows)
    if not a.quick and os.path.isdir(DEV_SET):
        # round-robin over the labels, in sorted order, tracks of at most --max-track-seconds
        # (many tracks of similar length: the work divides into even tasks), until --hours
        by_label: dict[str, list[tuple[str, float]]] = {}
        for label in sorted(os.listdir(DEV_SET)):
            folder = os.path.join(DEV_SET, label)
            if os.path.isdir(folder):
                files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(AUDIO_EXT))
                by_label[label] = [(f, d) for f in files if (d := _duration(f)) <= a.max_track_seconds]
        rows, total, i = [], 0.0, 0
        while total < a.hours * 3600 and any(i < len(v) for v in by_label.values()):
            for label, files in by_label.items():
                if i < len(files) and total < a.hours * 3600:
                    rows.append((files[i][0], label))
                    total += files[i][1]
            i += 1
        source = _manifest(os.path.join(work, "library.csv"), rows)
        return Library(source, DEV_SET, len(rows), total,
                       f"{len(rows)} tracks of {DEV_SET} ({len(by_label)} labels, each <= {a.max_track_seconds:g} s; "
                       "Ogg Vorbis/Opus, 44.1/48 kHz stereo)",
                       _manifest(os.path.join(work, "warm.csv"), rows[:4]), rows)
    from genrecls.audio import make_sample_collection

    folder = os.path.join(work, "generated")
    per_genre, seconds = (4, 15.0) if a.quick else (10, 60.0)
    files = make_sample_collection(folder, genres=4, tracks_per_genre=per_genre, seconds=seconds, seed=11)
    rows = [(f, os.path.basename(os.path.dirname(f))) for f in files]
    return Library(folder, folder, len(files), len(files) * seconds,
                   f"generated: 4 genres x {per_genre} tracks x {seconds:g} s (MP3/WAV/FLAC/OGG, 44.1 kHz stereo)",
                   _manifest(os.path.join(work, "warm.csv"), rows[:4]), rows)


# -- Ray set-ups ----------------------------------------------------------------------------
def _init(**kwargs) -> None:
    import ray

    from genrecls.core import runtime_env

    ray.init(log_to_driver=False, logging_level="ERROR", runtime_env=runtime_env(), **kwargs)


class OneNode:
    """A local Ray with ``cpus`` CPUs."""

    def __init__(self, cpus: int):
        self.cpus = cpus

    def __enter__(self):
        _init(num_cpus=self.cpus, include_dashboard=False)
        return self

    def __exit__(self, *exc):
        import ray

        ray.shutdown()


class TwoNodes:
    """A head and one more node on this machine (``ray.cluster_utils.Cluster``), ``cpus`` CPUs each."""

    def __init__(self, cpus: int, nodes: int = 2):
        self.cpus, self.nodes, self.cluster = cpus, nodes, None

    def __enter__(self):
        from ray.cluster_utils import Cluster

        args = {"num_cpus": self.cpus, "object_store_memory": 200 * 2**20}
        self.cluster = Cluster(initialize_head=True, head_node_args=dict(args, include_dashboard=False))
        for _ in range(self.nodes - 1):
            self.cluster.add_node(**args)
        self.cluster.wait_for_nodes()
        _init(address=self.cluster.address)
        return self

    def __exit__(self, *exc):
        import ray

        ray.shutdown()
        self.cluster.shutdown()


CONFIGS: dict[str, tuple[str, Callable[[], Any]]] = {
    "1_node_1_worker": ("one node, 1 worker", lambda: OneNode(1)),
    "1_node_2_workers": ("one node, 2 workers", lambda: OneNode(2)),
    "2_nodes_1_worker_each": ("two nodes, 1 worker each", lambda: TwoNodes(1)),
}
BASELINE = "1_node_1_worker"


# -- sections -------------------------------------------------------------------------------
def _ingest_once(lib: Library, source: str, out: str, *, fresh: bool = True):
    from genrecls.core import Config
    from genrecls.jobs import ingest

    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = ingest(source, out, Config(), root=lib.root, progress=False)
    wall = time.perf_counter() - t0
    if summary.failed:
        raise RuntimeError(f"ingest failed on {summary.failed} files: {summary.failures_by_kind}")
    return wall, summary


def bench_ingest(a: argparse.Namespace, lib: Library, work: str) -> dict[str, Any]:
    """Ingest throughput of each configuration in CONFIGS on the same library.

    The machine may be shared, and its load drifts: the configurations take turns, one
    timed run each per round, in the order 1-2-3 then 3-2-1 (so a drift hits them alike),
    each round in a freshly started and warmed Ray.
    """
    keys = list(CONFIGS)
    acc: dict[str, dict[str, Any]] = {k: {"runs": [], "nodes": 0, "pids": 0} for k in keys}
    stored = None
    for r in range(a.repeats):
        for key in (keys if r % 2 == 0 else keys[::-1]):
            label, make = CONFIGS[key]
            with make():
                _ingest_once(lib, lib.warm, os.path.join(work, "warm-ds"))
                wall, s = _ingest_once(lib, lib.source, os.path.join(work, "ds"))
            acc[key]["runs"].append(wall)
            acc[key]["nodes"] = max(acc[key]["nodes"], len(s.nodes))
            acc[key]["pids"] = max(acc[key]["pids"], len(s.worker_pids))
            stored = (s.shard_bytes, s.segments_added)
            print(f"round {r + 1}/{a.repeats}, {label}: {wall:.2f} s, {s.audio_seconds / wall:.0f}x real time, "
                  f"{len(s.nodes)} node(s), {s.shards_written} shards; load {load()[0]}", flush=True)
    out: dict[str, Any] = {"configs": {}, "order": "rounds alternating 1-2-3 / 3-2-1, fresh Ray per run"}
    for key in keys:
        runs = acc[key]["runs"]
        med = statistics.median(runs)
        out["configs"][key] = {"label": CONFIGS[key][0], "runs_seconds": runs, "median_seconds": med,
                               "audio_seconds_per_second": lib.audio_seconds / med,
                               "tracks_per_second": lib.tracks / med,
                               "nodes_used": acc[key]["nodes"], "worker_processes": acc[key]["pids"]}
    out["bytes_per_segment"] = stored[0] / max(stored[1], 1)
    out["segments"] = stored[1]
    base = out["configs"][BASELINE]["audio_seconds_per_second"]
    out["ratios_vs_1_worker"] = {k: v["audio_seconds_per_second"] / base for k, v in out["configs"].items()}
    out["driver"] = driver_costs(lib, os.path.join(work, "ds"))
    return out


def driver_costs(lib: Library, dataset: str) -> dict[str, Any]:
    """What the driver alone spends per track and per shard (no Ray task runs), for extrapolation.

    A re-run on the complete dataset finds every track unchanged: discovery (a stat per
    file), the track index read from every shard's footer (several passes: reconcile,
    plan, reconcile, manifest), the failures compaction and the manifest, and nothing else.
    """
    from genrecls.audio import discover
    from genrecls.storage import Dataset

    runs, footer, disc = [], [], []
    for _ in range(3):
        t0 = time.perf_counter()
        found = discover(lib.source, lib.root)
        disc.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        index = Dataset(dataset).tracks()
        footer.append(time.perf_counter() - t0)
        wall, s = _ingest_once(lib, lib.source, dataset, fresh=False)
        assert s.processed == 0 and s.skipped_unchanged == lib.tracks, s
        runs.append(wall)
    shards = len(Dataset(dataset).shard_names())
    res = {"tracks": len(found.tracks), "shards": shards, "index_entries": len(index),
           "noop_rerun_seconds": statistics.median(runs),
           "discovery_seconds": statistics.median(disc),
           "index_read_seconds": statistics.median(footer)}
    res["noop_rerun_ms_per_track"] = 1000 * res["noop_rerun_seconds"] / max(lib.tracks, 1)
    res["discovery_ms_per_track"] = 1000 * res["discovery_seconds"] / max(lib.tracks, 1)
    res["footer_read_ms_per_shard"] = 1000 * res["index_read_seconds"] / max(shards, 1)
    return res


def _copy_tracks(rows: list[tuple[str, str]], folder: str) -> None:
    for path, label in rows:
        os.makedirs(os.path.join(folder, label), exist_ok=True)
        shutil.copy2(path, os.path.join(folder, label, os.path.basename(path)))


def bench_retrain(a: argparse.Namespace, lib: Library, work: str) -> dict[str, Any]:
    """A scheduled retrain after 10 % new tracks against a full retrain from scratch.

    The library is split into the first 90 % of each label's tracks and the rest.  (1) A
    registry is seeded with ``retrain`` on the 90 % (untimed: the state a schedule starts from);
    (2) the rest is copied in and ``retrain`` runs again: it ingests only the new tracks, trains
    a challenger on the registry's fixed splits, scores champion and challenger on the same
    holdout and decides (timed); (3) a fresh dataset and registry, ``retrain`` on the whole
    library (timed: ingest of every track plus the same training).  Both timed runs train the
    same model for the same fixed number of epochs (no early stopping), in the same local Ray.
    ``--repeats`` pairs, alternating the order; medians.
    """
    from genrecls.core import Config
    from genrecls.jobs import retrain

    by_label: dict[str, list[tuple[str, str]]] = {}
    for r in lib.rows:
        by_label.setdefault(r[1], []).append(r)
    old, new = [], []
    for label, rs in by_label.items():
        k = max(1, round(len(rs) * 0.1))
        old.extend(rs[:-k])
        new.extend(rs[-k:])
    epochs = 2 if a.quick else a.retrain_epochs
    cfg = Config().with_section(train={"epochs": epochs, "early_stopping_patience": 0, "workers": 1})
    timings: dict[str, list[float]] = {"incremental": [], "full": []}
    details: dict[str, Any] = {}
    with OneNode(os.cpu_count() or 1):
        for r in range(a.repeats):
            order = ("incremental", "full") if r % 2 == 0 else ("full", "incremental")
            for kind in order:
                base = os.path.join(work, f"retrain-{kind}")
                shutil.rmtree(base, ignore_errors=True)
                src, ds, reg = (os.path.join(base, x) for x in ("lib", "ds", "registry"))
                if kind == "incremental":
                    _copy_tracks(old, src)
                    first = retrain(src, ds, reg, cfg, progress=False)
                    assert first["decision"] == "promoted", first
                    _copy_tracks(new, src)
                else:
                    _copy_tracks(old + new, src)
                t0 = time.perf_counter()
                d = retrain(src, ds, reg, cfg, progress=False)
                wall = time.perf_counter() - t0
                timings[kind].append(wall)
                details[kind] = {"decision": d["decision"], "tracks_ingested": d["ingest"]["processed"],
                                 "segments_added": d["ingest"]["segments_added"],
                                 "challenger_metrics": {k: d["challenger_metrics"].get(k) for k in
                                                        ("test_track_accuracy", "test_tracks")},
                                 "champion_scored": d["champion_metrics"] is not None}
                print(f"round {r + 1}/{a.repeats}, {kind} retrain: {wall:.1f} s ({d['decision']}, "
                      f"{d['ingest']['processed']} tracks ingested); load {load()[0]}", flush=True)
                shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in timings.items()}
    return {"tracks_before": len(old), "tracks_new": len(new), "epochs": epochs, "model": cfg.train.model,
            "runs_seconds": timings, "median_seconds": med, "ratio_incremental_to_full": med["incremental"] / med["full"],
            "details": details}


def print_retrain(res: dict[str, Any]) -> None:
    m = res["median_seconds"]
    print(f"retrain with {res['tracks_new']} new tracks on top of {res['tracks_before']} ({res['epochs']} epochs of "
          f"{res['model']}): {m['incremental']:.1f} s; full retrain from scratch: {m['full']:.1f} s; "
          f"ratio {res['ratio_incremental_to_full']:.2f}")


#: name -> function(args, library, work folder) -> dict; run in this order.
SECTIONS: dict[str, Callable[[argparse.Namespace, Library, str], dict[str, Any]]] = {
    "ingest": bench_ingest,
    "retrain": bench_retrain,
}


def print_ingest(res: dict[str, Any]) -> None:
    print(f"{'configuration':28s} {'median s':>9s} {'x real time':>12s} {'ratio':>6s} {'nodes':>6s}   runs")
    for key, c in res["configs"].items():
        print(f"{c['label']:28s} {c['median_seconds']:9.2f} {c['audio_seconds_per_second']:12.0f} "
              f"{res['ratios_vs_1_worker'][key]:6.2f} {c['nodes_used']:6d}   {', '.join(f'{x:.2f}' for x in c['runs_seconds'])}")


    print(f"stored: {res['segments']} segments, {res['bytes_per_segment'] / 1024:.1f} KiB per segment")
    d = res["driver"]
    print(f"driver, no-op re-run of {d['tracks']} tracks / {d['shards']} shards (local disk): {d['noop_rerun_seconds']:.2f} s "
          f"({d['noop_rerun_ms_per_track']:.1f} ms per track); discovery {d['discovery_ms_per_track']:.2f} ms per track, "
          f"track index {d['footer_read_ms_per_shard']:.2f} ms per shard footer")


PRINTERS = {"ingest": print_ingest, "retrain": print_retrain}


# -- main -------------------------------------------------------------------------------------
def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", help="library folder (<label>/<file>); default: a subset of the dev set, or generated")
    p.add_argument("--hours", type=float, default=0.5, help="audio taken from the dev set (default 0.5 h)")
    p.add_argument("--max-track-seconds", type=float, default=120.0, help="longest dev-set track taken (default 120)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from: {', '.join(SECTIONS)}")
    p.add_argument("--retrain-epochs", type=int, default=4, help="epochs of each training in the retrain section")
    p.add_argument("--quick", action="store_true", help="generated 16 x 15 s tracks, 1 repeat")
    p.add_argument("--json", default=os.path.join(HERE, "results", "scale.json"))
    a = p.parse_args(argv)
    if a.quick:
        a.repeats = 1
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")

    from genrecls.core import quiet_environment

    quiet_environment()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = tempfile.mkdtemp(prefix="genrecls-scale-")
    try:
        lib = prepare_library(a, work)
        result: dict[str, Any] = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                        "load_before": load()},
            "setup": {"library": lib.description, "tracks": lib.tracks, "audio_seconds": lib.audio_seconds,
                      "repeats": a.repeats, "quick": a.quick, "features": "default (22.05 kHz, 128 mels, float16)"},
        }
        print(f"library: {lib.description}; {lib.tracks} tracks, {lib.audio_seconds / 3600:.2f} h of audio; "
              f"load average {result['machine']['load_before']}", flush=True)
        for name in sections:
            result[name] = SECTIONS[name](a, lib, work)
        result["machine"]["load_after"] = load()
        print()
        for name in sections:
            if name in PRINTERS:
                PRINTERS[name](result[name])
        print(f"load average before {result['machine']['load_before']}, after {result['machine']['load_after']} "
              f"({os.cpu_count()} CPUs, shared)")
        os.makedirs(os.path.dirname(a.json), exist_ok=True)
        if os.path.exists(a.json):  # sections not run this time keep their earlier results
            with open(a.json) as fh:
                earlier = json.load(fh)
            for name in SECTIONS:
                if name not in sections and name in earlier:
                    result[name] = earlier[name]
                    result.setdefault("earlier_runs", {})[name] = {"machine": earlier.get("machine"),
                                                                   "setup": earlier.get("setup")}
        with open(a.json + ".tmp", "w") as fh:
            json.dump(result, fh, indent=2, default=str)
        os.replace(a.json + ".tmp", a.json)
        print(f"wrote {a.json}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
