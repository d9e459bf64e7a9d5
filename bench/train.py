"""Benchmark training: every model side by side, and the cost of streaming the input through Ray Data.

(1) Accuracy (issue 11): every model (``tutorial``, ``default``, ``cnn2d``, ``linear``,
    ``musicnn``) on the same track split, several seeds each (the split is the one of the
    first run, seed 0; the seed then changes initialisation, shuffling and augmentation),
    on a generated synthetic set and on the real-music development set (5 styles,
    ``/tmp/game-music``).  Each set is ingested twice, once per feature preset
    (``tutorial`` for the first four models, ``musicnn`` for ``musicnn``); track ids are
    the same, so the splits are.  Per run: test track accuracy (mean of segment
    probabilities, the epoch chosen on validation track accuracy), macro F1, training wall
    time (``genrecls train`` from start to report), segments/s, classify's K chosen on the
    validation tracks.  Per model: median, min and max over the seeds.  Also the musicnn
    backbone's CPU milliseconds per segment.  Targets (real set): the default model >= 0.90
    median track accuracy and >= 5 points above ``linear``; its training time no longer
    than the ``default`` CNN's (the default before issue 11).
(2) Input pipeline (issue 12): training throughput (segments per second, the training phase of
    epochs 2..N, validation excluded; the median of 3 epochs after the first by default) of the
    default model with one Ray Train worker, against the same model and batch size fed from
    in-memory NumPy arrays in one process with the same number of TensorFlow threads: Ray Data
    with the decoded split cached in the object store (``train.cache=on``, the default for
    splits that fit), then streamed from the Parquet shards every epoch (``train.cache=off``, as
    for a split that does not fit the object store: read, filtered, decoded again every epoch)
    in each ``train.shuffle`` order (``shards``, the automatic choice; ``files``; ``global``).
    The load average is recorded before and after every run.  Target: streaming >= 0.9 x
    in-memory.  ``--skip-accuracy`` runs this section alone (``--quick``: the small synthetic
    set, 2 epochs: a smoke run, not a measurement).

Writes ``bench/results/train.json`` (accuracy runs are merged by set, model and seed, so a
bench can be run in parts: ``--sets``, ``--models``, ``--seeds``) and prints tables.
``--quick`` runs a small synthetic set only.  The machine is shared: the JSON records the
load average around each run.

    .venv/bin/python bench/train.py --quick --skip-throughput
    .venv/bin/python bench/train.py --skip-accuracy --sets real        # the input section, on the real set
    .venv/bin/python bench/train.py --sets real --models musicnn,linear,default --skip-throughput
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

os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"  # as the training workers use it (genrecls.jobs.training.train_func)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from genrecls.core import quiet_environment, runtime_env  # noqa: E402

quiet_environment()

from _results import fixed_split, load, save  # noqa: E402  (bench/ is the script's folder)


def ensure_synthetic(root: str, genres: int, tracks: int, seconds: float, cfg) -> str:
    from genrecls.audio import make_sample_collection
    from genrecls.jobs import ingest
    from genrecls.storage import Dataset

    name = f"synth-{genres}x{tracks}x{seconds:g}s"
    lib, ds = os.path.join(root, name, "lib"), os.path.join(root, name, "ds")
    if not Dataset(ds).exists():
        print(f"generating and ingesting the synthetic set {name} ...", flush=True)
        make_sample_collection(lib, genres=genres, tracks_per_genre=tracks, seconds=seconds, seed=11)
        ingest(lib, ds, cfg, progress=False)
    return ds


def ensure_real(dataset: str, source: str, cfg) -> str | None:
    from genrecls.jobs import ingest
    from genrecls.storage import Dataset

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


def run_training(dataset: str, run: str, cfg, workers: int, splits: str | None = None) -> dict:
    from genrecls.jobs import train

    shutil.rmtree(run, ignore_errors=True)
    load_before = load()
    t0 = time.monotonic()
    r = train(dataset, run, cfg, workers=workers, progress=True, splits=splits)
    wall = time.monotonic() - t0
    m = r["metrics"]
    sps = [h["segments_per_s"] for h in r["history"][1:]] or [h["segments_per_s"] for h in r["history"]]
    return {
        "run": run, "model": cfg.train.model, "seed": cfg.train.seed, "test_track_accuracy": m["test_track_accuracy"],
        "test_segment_accuracy": m["test_segment_accuracy"], "test_macro_f1": m["test_macro_f1"],
        "val_track_accuracy": m["val_track_accuracy"], "test_tracks": m["test_tracks"], "val_tracks": m["val_tracks"],
        "epochs_run": r["epochs_run"], "best_epoch": r["best_epoch"], "train_seconds": round(r["train_seconds"], 1),
        "wall_seconds": round(wall, 1), "median_segments_per_s": round(statistics.median(sps), 1),
        "train_segments": json.load(open(os.path.join(run, "plan.json")))["segments_per_split"]["train"]["total"],
        "classify_max_segments": m.get("classify_max_segments"),
        "test_track_accuracy_at_classify_k": m.get("test_track_accuracy_at_classify_k"),
        "parameters": json.load(open(os.path.join(run, "run.json")))["model"]["parameters"],
        "timings": r.get("timings"), "load_before": load_before, "load_after": load(),
    }


def backbone_cost(dataset: str, n: int = 192) -> dict:
    """CPU milliseconds per segment of the frozen musicnn backbone (stored segments -> embedding), batches of 64."""
    from genrecls.models import build_backbone, import_tensorflow
    from genrecls.storage import Dataset, mel_array

    tf = import_tensorflow()
    table = Dataset(dataset).read_segments(columns=["mel"]).slice(0, n)
    x = mel_array(table.column("mel"), (96, 187))
    model = build_backbone()
    fn = tf.function(lambda v: model(v, training=False))
    fn(tf.constant(x[:64]))
    t0, w0 = time.process_time(), time.perf_counter()
    for i in range(0, len(x), 64):
        fn(tf.constant(x[i:i + 64])).numpy()
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    return {"segments": int(len(x)), "cpu_ms_per_segment": round(1000 * cpu / len(x), 2),
            "wall_ms_per_segment": round(1000 * wall / len(x), 2), "threads": os.cpu_count(), "load": load()}


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (set, model): median, min and max over the seeds."""
    rows = []
    keys = []
    for r in runs:
        if (r["set"], r["model"]) not in keys:
            keys.append((r["set"], r["model"]))
    order = ["tutorial", "default", "cnn2d", "linear", "musicnn"]
    keys.sort(key=lambda k: (k[0] != "synthetic", order.index(k[1]) if k[1] in order else len(order)))
    for set_name, model in keys:
        rs = [r for r in runs if r["set"] == set_name and r["model"] == model]
        acc = [r["test_track_accuracy"] for r in rs]
        rows.append({"set": set_name, "model": model, "seeds": sorted(r["seed"] for r in rs), "test_tracks": rs[0]["test_tracks"],
                     "track_accuracy_median": statistics.median(acc), "track_accuracy_min": min(acc),
                     "track_accuracy_max": max(acc), "macro_f1_median": statistics.median(r["test_macro_f1"] for r in rs),
                     "val_track_accuracy_median": statistics.median(r["val_track_accuracy"] for r in rs),
                     "wall_seconds_median": statistics.median(r["wall_seconds"] for r in rs),
                     "segments_per_s_median": statistics.median(r["median_segments_per_s"] for r in rs),
                     "epochs_run": [r["epochs_run"] for r in rs], "best_epochs": [r["best_epoch"] for r in rs],
                     "classify_k": [r["classify_max_segments"] for r in rs],
                     "track_accuracy_at_classify_k": [r.get("test_track_accuracy_at_classify_k") for r in rs],
                     "parameters": rs[0]["parameters"]})
    return rows


def _at_k(row: dict) -> str:
    """Test track accuracy at classify's K (chosen on validation tracks), per seed: 'K=6: 0.83, ...'."""
    pairs = [(k, a) for k, a in zip(row.get("classify_k", []), row.get("track_accuracy_at_classify_k", [])) if a is not None]
    return ", ".join(f"K={k or 'all'}: {a:.2f}" for k, a in pairs) or "-"


def in_memory_throughput(dataset: str, run: str, epochs: int, batch: int) -> dict:
    """The default model of ``run`` (same normalisation, batch, class weights) fed from NumPy arrays."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from genrecls.models import build_model, import_tensorflow
    from genrecls.storage import Dataset, mel_array

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
    load_before = load()
    rates = []
    for e in range(epochs):
        t0 = time.perf_counter()
        model.fit(x, y, sample_weight=w, batch_size=batch, epochs=1, steps_per_epoch=steps, shuffle=True, verbose=0)
        dt = time.perf_counter() - t0
        rates.append(steps * batch / dt)
        print(f"  in-memory epoch {e + 1}: {rates[-1]:.1f} segments/s", file=sys.stderr, flush=True)
    return {"segments": int(len(x)), "threads": threads, "per_epoch_segments_per_s": [round(r, 1) for r in rates],
            "median_segments_per_s": round(statistics.median(rates[1:] or rates), 1), "load_before": load_before,
            "load_after": load()}


def in_memory_subprocess(dataset: str, run: str, epochs: int, batch: int) -> dict:
    """:func:`in_memory_throughput` in a fresh process (TensorFlow's thread pools are set once per process)."""
    import subprocess

    out = subprocess.run([sys.executable, __file__, "--in-memory", dataset, run, str(epochs), str(batch)],
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def ray_throughput(dataset: str, run: str, cfg, workers: int) -> dict:
    """One training run with ``cfg``'s input settings: segments/s of each epoch's training phase."""
    from genrecls.jobs import train

    shutil.rmtree(run, ignore_errors=True)
    before = load()
    r = train(dataset, run, cfg, workers=workers, progress=True)
    rates = [h["segments_per_s"] for h in r["history"]]
    plan = json.load(open(os.path.join(run, "plan.json")))
    return {"cache": plan["cache"], "shuffle": plan["shuffle"], "per_epoch_segments_per_s": rates,
            "median_segments_per_s": round(statistics.median(rates[1:] or rates), 1),
            "epoch_seconds": [h["epoch_seconds"] for h in r["history"]],
            "train_data_wait_seconds": [h["train_data_wait_seconds"] for h in r["history"]],
            "load_before": before, "load_after": load()}


#: the inputs compared (label, train settings): cached in the object store, then streamed from the
#: shards every epoch (train.cache=off, as for a split larger than the object store) in each order
INPUTS = (("Ray Data, cached in the object store", {"cache": "on"}),
          ("streamed, shard order shuffled each epoch + buffer", {"cache": "off", "shuffle": "shards"}),
          ("streamed, file order + buffer", {"cache": "off", "shuffle": "files"}),
          ("streamed, global shuffle each epoch", {"cache": "off", "shuffle": "global"}))


def input_throughput(dataset: str, set_name: str, work: str, base, epochs: int) -> dict:
    """Training segments/s of each input against in-memory NumPy arrays (same model, batch, threads).

    The in-memory baseline runs before and after the Ray runs (a shared machine's load drifts; the
    ratio uses their mean); the cached run goes first: its plan (split, normalisation, class
    weights) feeds the baseline.  ``train.shuffle=auto`` streams in shard order.
    """
    cfg = base.with_section(train={"batch_size": 32, "learning_rate": 1e-3, "epochs": epochs,
                                   "early_stopping_patience": 0, "model": "default"})
    tp: dict = {"set": set_name, "epochs": epochs, "batch_size": 32, "statistic": "median of epochs 2..N",
                "auto_shuffle": "shards", "runs": []}
    raw = []
    for i, (label, settings) in enumerate(INPUTS):
        r = ray_throughput(dataset, f"{work}-{i}", cfg.with_section(train=settings), 1)
        raw.append((label, r))
        if i == 0:
            before = in_memory_subprocess(dataset, f"{work}-0", epochs, 32)
    after = in_memory_subprocess(dataset, f"{work}-0", epochs, 32)
    rate = round((before["median_segments_per_s"] + after["median_segments_per_s"]) / 2, 1)
    tp["in_memory_numpy"] = {"before": before, "after": after, "median_segments_per_s": rate}
    tp["runs"].append({"input": "in-memory NumPy arrays", "median_segments_per_s": rate, "ratio_to_in_memory": 1.0,
                       "load_before": before["load_before"], "load_after": after["load_after"]})
    for label, r in raw:
        tp["runs"].append({"input": label, **r, "ratio_to_in_memory": round(r["median_segments_per_s"] / rate, 3)})
    return tp


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "--in-memory":  # the baseline's own process
        print(json.dumps(in_memory_throughput(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small synthetic set only, short runs")
    p.add_argument("--real", default="/tmp/bench-data/game-ds", help="real-music dataset, tutorial preset (ingested if missing)")
    p.add_argument("--real-musicnn", default="/tmp/bench-data/game-ds-musicnn", help="the same, musicnn preset")
    p.add_argument("--source", default="/tmp/game-music", help="real-music library to ingest")
    p.add_argument("--work", default="/tmp/bench-data/train", help="folder for synthetic data and runs")
    p.add_argument("--sets", default="synthetic,real", help="accuracy sets: synthetic, real (comma-separated)")
    p.add_argument("--models", default="tutorial,default,cnn2d,linear,musicnn", help="models to run (comma-separated)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per model (0..N-1)")
    p.add_argument("--first-seed", type=int, default=0, help="first seed (to run seeds in parallel processes)")
    p.add_argument("--epochs", type=int, help="epochs per accuracy run on the synthetic set (default 15, quick 6)")
    p.add_argument("--real-epochs", type=int, default=12, help="epochs per accuracy run on the real set (default 12)")
    p.add_argument("--throughput-epochs", type=int, help="epochs per input run (default 4: the median of the 3 after the first; quick 2)")
    p.add_argument("--workers", type=int, default=1, help="training workers for the accuracy runs")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results", "train.json"))
    p.add_argument("--merge", metavar="JSON", action="append", default=[],
                   help="also take the accuracy runs of another results file (a bench run in parallel; repeatable)")
    a = p.parse_args()

    import ray

    from genrecls.core import Config, format_table

    # the workers' environment (genrecls.core.runtime.worker_env) turns oneDNN on, as in the in-memory baseline
    ray.init(address="local", num_cpus=a.cpus, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", runtime_env=runtime_env())
    t_all = time.monotonic()
    epochs = a.epochs or (6 if a.quick else 15)
    tp_epochs = a.throughput_epochs or (2 if a.quick else 4)
    base = Config().override(["features.preset=tutorial"])
    mnn = Config().override(["features.preset=musicnn"])
    previous = json.load(open(a.out)) if os.path.exists(a.out) else {}
    results: dict = {"quick": a.quick, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                   "python": platform.python_version()},
                     "load_at_start": load(), "accuracy_runs": list(previous.get("accuracy_runs", [])),
                     "backbone": previous.get("backbone"), "throughput": previous.get("throughput", {})}
    for path in a.merge:
        other = json.load(open(path))
        keys = {(r["set"], r["model"], r["seed"]) for r in other.get("accuracy_runs", [])}
        results["accuracy_runs"] = [r for r in results["accuracy_runs"] if (r["set"], r["model"], r["seed"]) not in keys]
        results["accuracy_runs"] += other.get("accuracy_runs", [])
        results["backbone"] = other.get("backbone") or results["backbone"]
    os.makedirs(a.work, exist_ok=True)
    wanted = [s.strip() for s in a.sets.split(",") if s.strip()]
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    sets = []  # (name, {preset: dataset}, epochs)
    if "synthetic" in wanted or a.quick:
        shape = (4, 10, 45.0) if a.quick else (8, 12, 60.0)  # 10 (13) tutorial segments per track
        sets.append(("synthetic", {"tutorial": ensure_synthetic(a.work, *shape, base),
                                   "musicnn": ensure_synthetic(a.work + "/musicnn", *shape, mnn)}, epochs))
    if "real" in wanted and not a.quick:  # only the presets the models asked for
        need_t = any(m != "musicnn" for m in models) or not a.skip_throughput
        real = ensure_real(a.real, a.source, base) if need_t else None
        real_m = ensure_real(a.real_musicnn, a.source, mnn) if "musicnn" in models else None
        if (real or not need_t) and (real_m or "musicnn" not in models):
            sets.append(("real (game-music)", {"tutorial": real, "musicnn": real_m}, a.real_epochs))

    if not a.skip_accuracy:
        for set_name, datasets, n_epochs in sets:
            tag = set_name.split()[0]
            split_run = fixed_split(os.path.join(a.work, "runs", f"{tag}-split"),
                                    next(d for d in datasets.values() if d), base)
            for model in models:
                ds = datasets["musicnn" if model == "musicnn" else "tutorial"]
                for seed in range(a.first_seed, a.seeds):
                    print(f"\n== accuracy: {model} seed {seed} on {set_name} ({n_epochs} epochs max)", flush=True)
                    cfg = (mnn if model == "musicnn" else base).with_section(train={
                        "model": model, "epochs": n_epochs, "seed": seed, "batch_size": 32,
                        "early_stopping_patience": max(3, n_epochs // 3)})
                    run = os.path.join(a.work, "runs", f"{tag}-{model}-s{seed}")
                    r = run_training(ds, run, cfg, a.workers, splits=split_run)
                    r["set"] = set_name
                    r["dataset"] = ds
                    results["accuracy_runs"] = [x for x in results["accuracy_runs"] if not (
                        x["set"] == set_name and x["model"] == model and x["seed"] == seed)] + [r]
                    results["accuracy"] = summarise(results["accuracy_runs"])
                    save(results, a.out)
                    print(f"   test track accuracy {r['test_track_accuracy']:.3f} ({r['test_tracks']} tracks), "
                          f"macro F1 {r['test_macro_f1']:.3f}, {r['epochs_run']} epochs (best {r['best_epoch']}), "
                          f"{r['wall_seconds']:.0f} s", flush=True)
        if "musicnn" in models and sets:
            print("\n== musicnn backbone: CPU ms per segment", flush=True)
            results["backbone"] = backbone_cost(sets[-1][1]["musicnn"])
            print(f"   {results['backbone']}", flush=True)
    results["accuracy"] = summarise(results["accuracy_runs"])

    if not a.skip_throughput:
        ds = sets[-1][1]["tutorial"]
        set_name = sets[-1][0]
        print(f"\n== training input on {set_name}: default model, 1 worker, {tp_epochs} epochs each", flush=True)
        results["throughput"] = input_throughput(ds, set_name, os.path.join(a.work, "runs", "throughput"), base,
                                                 tp_epochs)
    results["total_seconds"] = round(time.monotonic() - t_all, 1)
    results["load_at_end"] = load()
    save(results, a.out)

    print("\n" + "=" * 80)
    if results["accuracy"]:
        print("accuracy (test split, tracks = mean of segment probabilities; epoch chosen on validation track accuracy):")
        print(format_table([(r["set"], r["model"], f"{r['parameters']:,}", len(r["seeds"]), r["test_tracks"],
                             f"{r['track_accuracy_median']:.3f}", f"{r['track_accuracy_min']:.3f}-{r['track_accuracy_max']:.3f}",
                             f"{r['macro_f1_median']:.3f}", _at_k(r), f"{r['wall_seconds_median']:.0f}",
                             f"{r['segments_per_s_median']:.0f}")
                            for r in results["accuracy"]],
                           ("set", "model", "weights", "seeds", "test tracks", "track acc (median)", "min-max",
                            "macro F1", "at classify's K", "train wall s", "segments/s")))
    if results.get("backbone"):
        b = results["backbone"]
        print(f"musicnn backbone: {b['cpu_ms_per_segment']} CPU ms per segment ({b['wall_ms_per_segment']} ms wall, "
              f"{b['threads']} threads, load {b['load']})")
    if results["throughput"].get("runs"):
        tp = results["throughput"]
        print(f"\ntraining input ({tp['set']}, default model, 1 worker, batch {tp['batch_size']}, "
              f"median of epochs 2..{tp['epochs']}):")
        print(format_table([(r["input"], r["median_segments_per_s"], f"{r['ratio_to_in_memory']:.3f}",
                             f"{r['load_before']} -> {r['load_after']}") for r in tp["runs"]],
                           ("input", "segments/s", "ratio to in-memory", "load average")))
    print(f"\nload average: {results['load_at_start']} at start, {results['load_at_end']} at end; "
          f"total {results['total_seconds'] / 60:.1f} min; written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
