"""Benchmark training: accuracy of the two models, and the cost of streaming the input through Ray Data.

(1) Accuracy: track-level test accuracy (mean of segment probabilities) of ``tutorial`` and
    ``default`` side by side, on a generated synthetic set and on the real-music development set
    (``../shared/data/build-game-music.sh``; ingested with the default features into
    ``--real``).  Target: default >= 90 % track accuracy on the real set.
(2) Input pipeline: training throughput (segments per second, the training phase of epochs 2..N,
    validation excluded) of the default model with one Ray Train worker streaming the Parquet
    shards through Ray Data (``train.cache=off``: the shards are read, filtered, decoded and
    shuffled again every epoch), against the same model and batch size fed from in-memory NumPy
    arrays in one process with the same number of TensorFlow threads.  Also shown: Ray Data with
    the decoded split cached in the object store (``train.cache=on``, the default for splits that
    fit).  Target: streaming >= 0.9 x in-memory.

Writes ``bench/results/train.json`` and prints tables.  ``--quick`` runs the synthetic set only,
small, in a few minutes.  The machine is shared: the JSON records the load average around each
measurement.

    .venv/bin/python bench/train.py --quick
    .venv/bin/python bench/train.py                 # full: synthetic + real set, tens of minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time

os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"  # as the training workers use it (genrecls.training.train_func)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from genrecls.runtime import quiet_environment, runtime_env  # noqa: E402

quiet_environment()


def load() -> float:
    return round(os.getloadavg()[0], 2)


def save(results: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)


def ensure_synthetic(root: str, genres: int, tracks: int, seconds: float, cfg) -> str:
    from genrecls.dataset import Dataset
    from genrecls.ingest import ingest
    from genrecls.sample_data import make_sample_collection

    name = f"synth-{genres}x{tracks}x{seconds:g}s"
    lib, ds = os.path.join(root, name, "lib"), os.path.join(root, name, "ds")
    if not Dataset(ds).exists():
        print(f"generating and ingesting the synthetic set {name} ...", flush=True)
        make_sample_collection(lib, genres=genres, tracks_per_genre=tracks, seconds=seconds, seed=11)
        ingest(lib, ds, cfg, progress=False)
    return ds


def ensure_real(dataset: str, source: str, cfg) -> str | None:
    from genrecls.dataset import Dataset
    from genrecls.ingest import ingest

    if Dataset(dataset).exists():
        return dataset
    if not os.path.isdir(source):
        print(f"no real-music set: {dataset} is not a dataset and {source} does not exist "
              "(build it with ../shared/data/build-game-music.sh)", file=sys.stderr)
        return None
    print(f"ingesting {source} into {dataset} (default features) ...", flush=True)
    t0 = time.monotonic()
    s = ingest(source, dataset, cfg, progress=True)
    print(f"  {s.added} tracks, {s.segments_added} segments in {time.monotonic() - t0:.0f} s", flush=True)
    return dataset


def run_training(dataset: str, run: str, cfg, workers: int) -> dict:
    from genrecls.training import train

    shutil.rmtree(run, ignore_errors=True)
    load_before = load()
    t0 = time.monotonic()
    r = train(dataset, run, cfg, workers=workers, progress=True)
    wall = time.monotonic() - t0
    m = r["metrics"]
    sps = [h["segments_per_s"] for h in r["history"][1:]] or [h["segments_per_s"] for h in r["history"]]
    return {
        "run": run, "model": cfg.train.model, "test_track_accuracy": m["test_track_accuracy"],
        "test_segment_accuracy": m["test_segment_accuracy"], "test_macro_f1": m["test_macro_f1"],
        "val_track_accuracy": m["val_track_accuracy"], "test_tracks": m["test_tracks"], "val_tracks": m["val_tracks"],
        "epochs_run": r["epochs_run"], "best_epoch": r["best_epoch"], "train_seconds": round(r["train_seconds"], 1),
        "wall_seconds": round(wall, 1), "median_segments_per_s": round(statistics.median(sps), 1),
        "parameters": json.load(open(os.path.join(run, "run.json")))["model"]["parameters"],
        "timings": r.get("timings"), "load_before": load_before, "load_after": load(),
    }


def in_memory_throughput(dataset: str, run: str, epochs: int, batch: int) -> dict:
    """The default model of ``run`` (same normalisation, batch, class weights) fed from NumPy arrays."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from genrecls.dataset import Dataset, mel_array
    from genrecls.models import build_model, import_tensorflow

    tf = import_tensorflow()
    threads = os.cpu_count() or 1  # what one training worker alone on this node uses
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    plan = json.load(open(os.path.join(run, "plan.json")))
    splits = pq.read_table(os.path.join(run, "splits.parquet")).to_pydict()
    train_ids = [t for t, s in zip(splits["track_id"], splits["split"]) if s == "train"]
    ds = Dataset(dataset)
    table = pads.dataset(ds.shard_paths(), format="parquet").to_table(
        columns=["label", "mel"], filter=pc.field("track_id").isin(train_ids))
    shape = tuple(ds.feature_config().mel_shape)
    x = mel_array(table.column("mel"), shape, np.float32)
    index = {l: i for i, l in enumerate(plan["labels"])}
    y = np.array([index[l] for l in table.column("label").to_pylist()], np.int32)
    w = np.asarray(plan["class_weights"], np.float32)[y]
    model = build_model("default", shape, len(plan["labels"]), mean=plan["mean"], std=plan["std"],
                        augment=plan["augment"], learning_rate=plan["learning_rate"])
    steps = len(x) // batch
    rates = []
    for e in range(epochs):
        t0 = time.perf_counter()
        model.fit(x, y, sample_weight=w, batch_size=batch, epochs=1, steps_per_epoch=steps, shuffle=True, verbose=0)
        dt = time.perf_counter() - t0
        rates.append(steps * batch / dt)
        print(f"  in-memory epoch {e + 1}: {rates[-1]:.1f} segments/s", file=sys.stderr, flush=True)
    return {"segments": int(len(x)), "threads": threads, "per_epoch_segments_per_s": [round(r, 1) for r in rates],
            "median_segments_per_s": round(statistics.median(rates[1:] or rates), 1)}


def in_memory_subprocess(dataset: str, run: str, epochs: int, batch: int) -> dict:
    """:func:`in_memory_throughput` in a fresh process (TensorFlow's thread pools are set once per process)."""
    import subprocess

    out = subprocess.run([sys.executable, __file__, "--in-memory", dataset, run, str(epochs), str(batch)],
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def streaming_throughput(dataset: str, run: str, cfg, workers: int) -> dict:
    from genrecls.training import train

    shutil.rmtree(run, ignore_errors=True)
    r = train(dataset, run, cfg, workers=workers, progress=True)
    rates = [h["segments_per_s"] for h in r["history"]]
    return {"cache": cfg.train.cache, "shuffle": json.load(open(os.path.join(run, "plan.json")))["shuffle"],
            "per_epoch_segments_per_s": rates, "median_segments_per_s": round(statistics.median(rates[1:] or rates), 1),
            "epoch_seconds": [h["epoch_seconds"] for h in r["history"]]}


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "--in-memory":  # the baseline's own process
        print(json.dumps(in_memory_throughput(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="synthetic set only, small and short")
    p.add_argument("--real", default="/tmp/bench-data/game-ds", help="real-music dataset (ingested if missing)")
    p.add_argument("--source", default="/tmp/game-music", help="real-music library to ingest into --real")
    p.add_argument("--work", default="/tmp/bench-data/train", help="folder for synthetic data and runs")
    p.add_argument("--epochs", type=int, help="epochs per accuracy run on the synthetic set (default 15, quick 6)")
    p.add_argument("--real-epochs", type=int, default=10, help="epochs per accuracy run on the real set (default 10)")
    p.add_argument("--throughput-epochs", type=int, help="epochs per throughput run (default 3, quick 3)")
    p.add_argument("--workers", type=int, default=1, help="training workers for the accuracy runs")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results", "train.json"))
    a = p.parse_args()

    import ray

    from genrecls.config import Config
    from genrecls.progress import format_table

    # the workers' environment (genrecls.runtime.worker_env) turns oneDNN on, as in the in-memory baseline
    ray.init(address="local", num_cpus=a.cpus, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", runtime_env=runtime_env())
    t_all = time.monotonic()
    epochs = a.epochs or (6 if a.quick else 15)
    tp_epochs = a.throughput_epochs or 3
    base = Config()
    results: dict = {"quick": a.quick, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                   "python": platform.python_version()},
                     "load_at_start": load(), "accuracy": [], "throughput": {}}
    os.makedirs(a.work, exist_ok=True)
    if a.quick:
        synth = ensure_synthetic(a.work, 4, 10, 45.0, base)  # 10 segments per track, 400 in all
    else:
        synth = ensure_synthetic(a.work, 8, 12, 60.0, base)  # 13 segments per track, 1248 in all
    sets = [("synthetic", synth)]
    if not a.quick:
        real = ensure_real(a.real, a.source, base)
        if real:
            sets.append(("real (game-music)", real))
    train_cfg = {"epochs": epochs, "batch_size": 32, "learning_rate": 1e-3, "early_stopping_patience": max(3, epochs // 4)}

    if not a.skip_accuracy:
        for set_name, ds in sets:
            n_epochs = epochs if set_name == "synthetic" else a.real_epochs
            for model in ("tutorial", "default"):
                print(f"\n== accuracy: {model} on {set_name} ({n_epochs} epochs max)", flush=True)
                cfg = base.with_section(train={**train_cfg, "model": model, "epochs": n_epochs,
                                               "early_stopping_patience": max(3, n_epochs // 3)})
                r = run_training(ds, os.path.join(a.work, "runs", f"{set_name.split()[0]}-{model}"), cfg, a.workers)
                r["set"] = set_name
                results["accuracy"].append(r)
                save(results, a.out + ".partial")
                print(f"   test track accuracy {r['test_track_accuracy']:.3f} ({r['test_tracks']} tracks), "
                      f"segment {r['test_segment_accuracy']:.3f}, {r['epochs_run']} epochs, {r['wall_seconds']:.0f} s", flush=True)

    if not a.skip_throughput:
        ds = sets[-1][1]
        set_name = sets[-1][0]
        print(f"\n== throughput on {set_name}: default model, 1 worker, {tp_epochs} epochs each", flush=True)
        tp: dict = {"set": set_name, "epochs": tp_epochs, "batch_size": 32, "load_before": load()}
        cfg = base.with_section(train={**train_cfg, "epochs": tp_epochs, "early_stopping_patience": 0, "model": "default"})
        work = os.path.join(a.work, "runs", "throughput")
        # the cached run first: its plan (split, normalisation, class weights) feeds the in-memory baseline,
        # which runs before and after the Ray runs (the machine is shared: its load drifts)
        tp["ray_data_cached"] = streaming_throughput(ds, work + "-cached", cfg.with_section(train={"cache": "on"}), 1)
        before = in_memory_subprocess(ds, work + "-cached", tp_epochs, 32)
        tp["streaming_global_shuffle"] = streaming_throughput(
            ds, work + "-stream", cfg.with_section(train={"cache": "off", "shuffle": "global"}), 1)
        tp["streaming_local_shuffle"] = streaming_throughput(
            ds, work + "-stream-local", cfg.with_section(train={"cache": "off", "shuffle": "local"}), 1)
        after = in_memory_subprocess(ds, work + "-cached", tp_epochs, 32)
        tp["in_memory_numpy"] = {"before": before, "after": after, "median_segments_per_s": round(
            (before["median_segments_per_s"] + after["median_segments_per_s"]) / 2, 1)}
        base_rate = tp["in_memory_numpy"]["median_segments_per_s"]
        for k in ("streaming_global_shuffle", "streaming_local_shuffle", "ray_data_cached"):
            tp[k]["ratio_to_in_memory"] = round(tp[k]["median_segments_per_s"] / base_rate, 3)
        tp["load_after"] = load()
        results["throughput"] = tp

    results["total_seconds"] = round(time.monotonic() - t_all, 1)
    results["load_at_end"] = load()
    save(results, a.out)

    print("\n" + "=" * 80)
    if results["accuracy"]:
        print("accuracy (test split, tracks = mean of segment probabilities):")
        print(format_table([(r["set"], r["model"], f"{r['parameters']:,}", r["test_tracks"], f"{r['test_track_accuracy']:.3f}",
                             f"{r['test_segment_accuracy']:.3f}", f"{r['test_macro_f1']:.3f}", f"{r['epochs_run']} (best {r['best_epoch']})",
                             f"{r['median_segments_per_s']:.0f}", f"{r['wall_seconds']:.0f}")
                            for r in results["accuracy"]],
                           ("set", "model", "weights", "test tracks", "track acc", "segment acc", "macro F1", "epochs",
                            "segments/s", "wall s")))
    if results["throughput"]:
        tp = results["throughput"]
        print(f"\ninput pipeline ({tp['set']}, default model, 1 worker, batch 32, median of epochs 2..{tp['epochs']}):")
        rows = [("in-memory NumPy arrays", tp["in_memory_numpy"]["median_segments_per_s"], "1.000")]
        for k, label in (("streaming_global_shuffle", "Ray Data from Parquet, global shuffle"),
                         ("streaming_local_shuffle", "Ray Data from Parquet, file order + buffer"),
                         ("ray_data_cached", "Ray Data, cached in object store")):
            rows.append((label, tp[k]["median_segments_per_s"], f"{tp[k]['ratio_to_in_memory']:.3f}"))
        print(format_table(rows, ("input", "segments/s", "ratio")))
    print(f"\nload average: {results['load_at_start']} at start, {results['load_at_end']} at end; "
          f"total {results['total_seconds'] / 60:.1f} min; written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
