"""Benchmark of ``genrecls classify``: throughput next to ingest, memory as the library grows, K.

Three measurements, all on one local Ray of ``--cpus`` CPUs started by this script:

1. **Throughput**: on a folder of real music (a subset of the game-music set, ``--real``)
   and a folder of synthetic tracks, ``ingest`` then ``classify`` (each on a fresh output,
   medians of ``--repeats`` runs): tracks/s and audio-seconds per wall-second end to end,
   and the ratio classify/ingest (target >= 0.8).  Each folder is also run at 4x its size
   (4 folders of symbolic links): the steady-state rate ``(N4 - N1) / (T4 - T1)`` cancels the
   start-up costs (Ray, and for classify the model actor's TensorFlow import and model load).
2. **Memory at 1x and 4x the library**: the peak memory of those runs (PSS summed over this
   process and every Ray process under it: raylet, GCS, workers, the model actors) must
   stay flat as the library grows.
3. **K (classify.max_segments)**: the real set is ingested (cached in ``--work``), a model
   (``genrecls.models.networks`` 'default' CNN) is trained on 60% of its tracks, and on the other 40%
   track accuracy is measured when a track is scored on K evenly spaced segments (the
   segments ``genrecls.audio.segments.segment_starts`` picks), next to the cost of featurising K
   sampled segments per track (``genrecls.audio.pipeline.sampled_track_features``).

4. With ``--large N``: ingest then classify once on N linked copies of the synthetic folder,
   a library big enough that start-up (Ray, the model actor's TensorFlow import and model
   load) no longer dominates the end-to-end ratio.

``--skip-k`` / ``--skip-throughput`` skip sections (the model must be cached in ``--work``);
the other sections of an existing results file are then kept.

The model used for throughput is the one trained in 3.  TensorFlow runs only in Ray
workers (training and scoring tasks exit after use), so this process stays small.

Run ``.venv/bin/python bench/classify.py`` (full) or ``--quick``; writes
``bench/results/classify.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from genrecls.core import quiet_environment  # noqa: E402

quiet_environment()

from genrecls.audio import make_sample_collection  # noqa: E402
from genrecls.core import (
    Config,  # noqa: E402
    format_table,  # noqa: E402
    ray_session,  # noqa: E402
)
from genrecls.jobs import ingest  # noqa: E402
from genrecls.storage import (  # noqa: E402
    Dataset,
    mel_array,
    read_predictions,  # noqa: E402
)

K_VALUES = [1, 2, 3, 4, 6, 8, 10, 15, 20, 0]  # 0 = every segment


# -- memory --------------------------------------------------------------------------
class TreeMemory:
    """Samples the summed PSS (and RSS) of a process (default: this one) and all its descendants.

    One sweep reads ``/proc/PID/smaps_rollup`` of every process, which costs the kernel about
    6 ms per Ray process (60-100 ms per sweep): at 5 sweeps a second that took a quarter of
    this 2-core machine from the commands being timed, so it samples once a second (memory
    plateaus within seconds; the peak is what matters).
    """

    def __init__(self, pid: int | None = None, interval: float = 1.0):
        import psutil

        self.psutil = psutil
        self.pid = pid
        self.interval = interval
        self.peak_pss = 0
        self.peak_uss = 0
        self.peak_rss = 0
        self.peak_driver_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            me = self.psutil.Process(self.pid)
            procs = [me] + me.children(recursive=True)
        except self.psutil.NoSuchProcess:
            return
        pss = uss = rss = 0
        for p in procs:
            try:
                m = p.memory_full_info()
                pss += getattr(m, "pss", m.rss)
                uss += getattr(m, "uss", m.rss)
                rss += m.rss
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                pass
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_uss = max(self.peak_uss, uss)
        self.peak_rss = max(self.peak_rss, rss)
        try:
            self.peak_driver_rss = max(self.peak_driver_rss, me.memory_info().rss)
        except self.psutil.NoSuchProcess:
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def mib(self) -> dict[str, float]:
        return {"peak_pss_mib": round(self.peak_pss / 2**20, 1), "peak_uss_mib": round(self.peak_uss / 2**20, 1),
                "peak_rss_mib": round(self.peak_rss / 2**20, 1),
                "peak_driver_rss_mib": round(self.peak_driver_rss / 2**20, 1)}


# -- data ------------------------------------------------------------------------------
def real_subset(real: Path, dest: Path, per_style: int, copies: int = 1) -> int:
    """Symbolic links to ``per_style`` tracks of each style (spread over lengths), in ``copies`` folders."""
    if dest.exists():
        shutil.rmtree(dest)
    n = 0
    for style in sorted(p for p in real.iterdir() if p.is_dir()):
        files = sorted(f for f in style.iterdir() if f.is_file())
        idx = np.unique(np.round(np.linspace(0, len(files) - 1, min(per_style, len(files)))).astype(int))
        for c in range(copies):
            folder = dest / (f"copy{c}" if copies > 1 else "") / style.name
            folder.mkdir(parents=True, exist_ok=True)
            for i in idx:
                (folder / files[i].name).symlink_to(files[i])
                n += 1
    return n


def linked_copies(src: Path, dest: Path, copies: int) -> int:
    """``copies`` folders of symbolic links to every file of ``src`` (same layout): a library ``copies`` times larger."""
    if dest.exists():
        shutil.rmtree(dest)
    n = 0
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        for c in range(copies):
            target = dest / f"copy{c}" / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(f)
            n += 1
    return n


def audio_seconds(folder: Path) -> float:
    import soundfile as sf

    return sum(sf.info(str(p)).duration for p in folder.rglob("*") if p.is_file())


# -- model (in a Ray worker that exits afterwards) ------------------------------------
def train_model(dataset: str, run: str, train_ids: list[str], epochs: int, per_track: int, seed: int = 0) -> dict:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import pyarrow.compute as pc

    from genrecls.models import export_model

    ds = Dataset(dataset)
    features = ds.feature_config()
    table = ds.read_segments(columns=["track_id", "segment_index", "label", "mel"],
                             filter=pc.field("track_id").isin(train_ids))
    # at most per_track evenly spaced segments of each track: long tracks do not dominate
    tids = table.column("track_id").to_pylist()
    seg = np.asarray(table.column("segment_index").to_pylist())
    counts = {t: 0 for t in tids}
    for t in tids:
        counts[t] += 1
    keep = []
    for i, t in enumerate(tids):
        n = counts[t]
        if n <= per_track or seg[i] in set(np.round(np.linspace(0, n - 1, per_track)).astype(int)):
            keep.append(i)
    table = table.take(keep)
    x = mel_array(table.column("mel"), features.mel_shape)
    labels = sorted(set(table.column("label").to_pylist()))
    y = np.array([labels.index(v) for v in table.column("label").to_pylist()])
    try:
        from genrecls.models import build_model, keras

        k = keras()
        k.utils.set_random_seed(seed)
        model = build_model("default", features.mel_shape, len(labels), mean=x.mean(axis=(0, 2)), std=x.std(axis=(0, 2)))
        name = "default"
    except ImportError:  # genrecls.models.networks not there: a small CNN of the same shape of input/output
        import tf_keras as k

        k.utils.set_random_seed(seed)
        norm = k.layers.Normalization(axis=None)
        norm.adapt(x[:2000])
        model = k.Sequential([k.Input(features.mel_shape), norm, k.layers.Reshape((*features.mel_shape, 1)),
                              k.layers.Conv2D(16, 3, padding="same", activation="relu"), k.layers.MaxPooling2D(2),
                              k.layers.Conv2D(32, 3, padding="same", activation="relu"), k.layers.MaxPooling2D(2),
                              k.layers.GlobalAveragePooling2D(), k.layers.Dense(len(labels), activation="softmax")])
        model.compile(k.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
        name = "small"
    counts_y = np.bincount(y, minlength=len(labels))
    weights = {i: len(y) / (len(labels) * max(c, 1)) for i, c in enumerate(counts_y)}
    t0 = time.perf_counter()
    model.fit(x, y, epochs=epochs, batch_size=32, shuffle=True, class_weight=weights, verbose=0)
    info = export_model(model, run, labels=labels, features=features, model_name=f"bench-{name}")
    return {"model": name, "parameters": int(model.count_params()), "train_segments": int(len(y)),
            "train_seconds": round(time.perf_counter() - t0, 1), "model_id": info["model_id"]}


def accuracy_vs_k(dataset: str, run: str, test_ids: list[str]) -> dict:
    """Track accuracy on held-out tracks when each is scored on K evenly spaced segments."""
    import pyarrow.compute as pc
    from sklearn.metrics import balanced_accuracy_score

    from genrecls.models import Predictor, aggregate_tracks

    ds = Dataset(dataset)
    shape = ds.feature_config().mel_shape
    pred = Predictor(run)
    table = ds.read_segments(columns=["track_id", "segment_index", "label", "mel"],
                             filter=pc.field("track_id").isin(test_ids))
    mels = mel_array(table.column("mel"), shape)
    pred.predict(mels[:8])
    t0 = time.process_time()  # CPU seconds: robust to other load on a shared machine
    probs = pred.predict(mels, batch_size=256)
    model_seconds = time.process_time() - t0
    tids = np.asarray(table.column("track_id").to_pylist())
    segs = np.asarray(table.column("segment_index").to_pylist())
    truth = dict(zip(tids.tolist(), table.column("label").to_pylist()))
    by_track: dict[str, list[int]] = {}
    for i, t in enumerate(tids):
        by_track.setdefault(t, []).append(i)
    out = []
    for k in K_VALUES:
        rows_t, rows_i = [], []
        for t, idx in by_track.items():
            idx = sorted(idx, key=lambda i: segs[i])
            n = len(idx)
            pick = range(n) if k == 0 or n <= k else np.unique(np.round(np.linspace(0, n - 1, k)).astype(int))
            for j in pick:
                rows_t.append(t)
                rows_i.append(idx[j])
        ids, tp = aggregate_tracks(rows_t, probs[rows_i])
        y_true = [truth[t] for t in ids]
        y_pred = [pred.labels[j] for j in tp.argmax(1)]
        out.append({"k": k, "segments": len(rows_i), "track_accuracy": round(float(np.mean(np.array(y_true) == np.array(y_pred))), 4),
                    "balanced_accuracy": round(float(balanced_accuracy_score(y_true, y_pred)), 4)})
    return {"tracks": len(by_track), "segments": int(len(tids)), "model_cpu_ms_per_segment": round(1000 * model_seconds / len(tids), 2),
            "by_k": out}


def featurise_cpu_ms_per_segment(files: list[str], features) -> float:
    """CPU milliseconds to decode and featurise one segment (whole tracks, as ingest does)."""
    from genrecls.audio import track_features

    t0, n = time.process_time(), 0
    for f in files:
        n += track_features(f, features).mels.shape[0]
    return round(1000 * (time.process_time() - t0) / n, 2)


def featurise_cost(files: list[str], features, k_values: list[int]) -> list[dict]:
    """Seconds to featurise each file with at most K sampled segments (one core, this process)."""
    from genrecls.audio import sampled_track_features

    out = []
    for k in k_values:
        t0 = time.perf_counter()
        segs = 0
        for f in files:
            segs += sampled_track_features(f, features, k).mels.shape[0]
        out.append({"k": k, "seconds_per_track": round((time.perf_counter() - t0) / len(files), 3), "segments": segs})
    return out


# -- runs --------------------------------------------------------------------------------
def run_command(args: list[str]) -> tuple[float, dict]:
    """Run ``python -m genrecls ARGS`` (its own local Ray), sampling the memory of its process tree."""
    import subprocess

    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "genrecls", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    with TreeMemory(proc.pid) as mem:
        out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"genrecls {' '.join(args)} failed ({proc.returncode}):\n{out}\n{err}")
    return wall, mem.mib()


def run_pair(folder: Path, run: Path, work: Path, cpus: int, sets: list[str], repeats: int, n_tracks: int,
             seconds: float) -> dict:
    """``genrecls ingest`` then ``genrecls classify`` on a folder, each from scratch, ``repeats`` times."""
    rows = {"ingest": [], "classify": []}
    common = ["--workers", str(cpus), "-q"] + [x for v in sets for x in ("--set", v)]
    for r in range(repeats):
        out = work / "out-ingest"
        shutil.rmtree(out, ignore_errors=True)
        wall, mem = run_command(["ingest", str(folder), "--out", str(out), *common])
        assert Dataset(str(out)).manifest()["counts"]["tracks"] == n_tracks
        rows["ingest"].append({"wall_s": wall, **mem})
        out = work / "out-classify"
        shutil.rmtree(out, ignore_errors=True)
        wall, mem = run_command(["classify", str(folder), "--model", str(run), "--out", str(out), *common])
        s = json.loads((out / "classify.json").read_text())["last_run"]
        assert s["classified"] == n_tracks == read_predictions(out).num_rows, s
        rows["classify"].append({"wall_s": wall, **mem, "segments": s["segments"]})
    result = {"tracks": n_tracks, "audio_hours": round(seconds / 3600, 3)}
    for name, runs in rows.items():
        wall = statistics.median(r["wall_s"] for r in runs)
        result[name] = {"wall_s": round(wall, 2), "runs_wall_s": [round(r["wall_s"], 2) for r in runs],
                        "tracks_per_s": round(n_tracks / wall, 3), "audio_s_per_s": round(seconds / wall, 1),
                        "peak_pss_mib": statistics.median(r["peak_pss_mib"] for r in runs),
                        "runs_peak_pss_mib": [r["peak_pss_mib"] for r in runs],
                        "peak_uss_mib": statistics.median(r["peak_uss_mib"] for r in runs),
                        "peak_driver_rss_mib": max(r["peak_driver_rss_mib"] for r in runs)}
        if name == "classify":
            result[name]["segments_scored"] = runs[0]["segments"]
    result["ratio_classify_to_ingest"] = round(result["ingest"]["wall_s"] / result["classify"]["wall_s"], 3)
    return result


def model_and_k(a, cfg, work: Path, results: dict) -> Path:
    """Section 3: ingest the real set (cached), train the CNN on 60% of its tracks, accuracy and cost vs K."""
    import ray
    from sklearn.model_selection import train_test_split

    real = Path(a.real)
    with ray_session(workers=a.cpus):
        # 3 first: the model is needed by everything else
        print("== model and K: ingest of the real set (cached), training, accuracy vs K", flush=True)
        per_style_k = 8 if a.quick else 1000
        k_lib = work / "k-library"
        if not k_lib.exists():
            real_subset(real, k_lib, per_style_k)
        k_ds = work / "k-dataset"
        t0 = time.perf_counter()
        s = ingest(str(k_lib), str(k_ds), cfg, progress=True)
        results["k_ingest" if not a.skip_k else "k_ingest_check"] = {"tracks": s.discovered, "added_now": s.added, "wall_s": round(time.perf_counter() - t0, 1)}
        tracks = Dataset(str(k_ds)).track_table()
        ids, labels = tracks.column("track_id").to_pylist(), tracks.column("label").to_pylist()
        train_ids, test_ids = train_test_split(ids, test_size=0.4, stratify=labels, random_state=0)
        run = work / "run"
        if not (run / "run.json").exists():
            task = ray.remote(num_cpus=a.cpus, max_calls=1)(train_model)
            results["model"] = ray.get(task.remote(str(k_ds), str(run), train_ids, 4 if a.quick else 8, 24 if a.quick else 30))
            (work / "model.json").write_text(json.dumps(results["model"]))
        else:
            results["model"] = json.loads((work / "model.json").read_text())
        print(f"model: {results['model']}", flush=True)
        if not a.skip_k:
            task = ray.remote(num_cpus=1, max_calls=1)(accuracy_vs_k)
            results["k_accuracy"] = ray.get(task.remote(str(k_ds), str(run), test_ids))
            # featurisation cost per track at each K: the longest held-out tracks (where K matters)
            test_set = set(test_ids)
            longest = sorted((e for e in Dataset(str(k_ds)).tracks().values() if e.track_id in test_set),
                             key=lambda e: -e.duration_seconds)[: 3 if a.quick else 8]
            results["k_cost"] = {"tracks": len(longest),
                                 "median_track_seconds": round(statistics.median(e.duration_seconds for e in longest), 1),
                                 "by_k": featurise_cost([str(k_lib / e.path) for e in longest], cfg.features, K_VALUES)}
            print(format_table([(r["k"] or "all", r["segments"], r["track_accuracy"], r["balanced_accuracy"], c["seconds_per_track"])
                                for r, c in zip(results["k_accuracy"]["by_k"], results["k_cost"]["by_k"])],
                               ("K", "segments", "track_acc", "balanced_acc", "featurise_s/long_track")), flush=True)
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small folders, 1 repeat, a short training")
    p.add_argument("--real", default="/tmp/game-music", help="real-music folder (<style>/<file>)")
    p.add_argument("--work", default="/tmp/genrecls-bench-classify", help="scratch folder (datasets and model are cached here)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--repeats", type=int, help="runs per measurement (median); default 3, 1 with --quick")
    p.add_argument("--actor-cpus", type=float, help="classify.actor_cpus for the throughput runs (default: the config default)")
    p.add_argument("--skip-k", action="store_true", help="skip the K measurement (needs a trained model already cached)")
    p.add_argument("--skip-throughput", action="store_true", help="skip the 1x/4x throughput and memory runs")
    p.add_argument("--large", type=int, default=0, metavar="N",
                   help="also run ingest and classify once on N linked copies of the synthetic folder (start-up amortised)")
    p.add_argument("--model-run", metavar="RUN",
                   help="use this trained run for the throughput runs (e.g. one of `genrecls train`'s default model) "
                        "instead of training the CNN of section 3; skips section 3")
    p.add_argument("--folders", default="real,synthetic", help="throughput folders (comma-separated: real, synthetic)")
    p.add_argument("--sizes", default="1x,4x", help="library sizes for the throughput runs (comma-separated: 1x, 4x)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="configuration for the throughput runs (e.g. classify.max_segments=10); repeatable")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "classify.json"))
    a = p.parse_args(argv)

    real, work = Path(a.real), Path(a.work) / ("quick" if a.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    repeats = a.repeats or (1 if a.quick else 3)
    sets = list(a.sets) + ([] if a.actor_cpus is None else [f"classify.actor_cpus={a.actor_cpus}"])
    cfg = Config().override(sets)
    import psutil

    results: dict = {"quick": a.quick, "cpus": a.cpus, "repeats": repeats, "config": cfg.to_dict()["classify"],
                     "load_average_start": list(os.getloadavg()), "machine_cpus": os.cpu_count(),
                     "machine_memory_gib": round(psutil.virtual_memory().total / 2**30, 1)}
    t_start = time.perf_counter()
    if a.model_run:
        run = Path(a.model_run)
        results["model"] = {"run": str(run), **{k: v for k, v in json.loads((run / "run.json").read_text())["model"].items()
                                                  if k in ("name", "parameters")}}
        print(f"== model: {run} (section 3 skipped)", flush=True)
    else:
        run = model_and_k(a, cfg, work, results)

    # 1. and 2. throughput next to ingest, and memory, at 1x and 4x the library: each command in its
    # own process with its own local Ray, as a user runs it, so its process tree is all it uses
    synth = work / "synth"
    make_sample_collection(str(synth), genres=4, tracks_per_genre=6 if a.quick else 12, seconds=30.0, seed=3)
    synth_files = sorted(str(p) for p in synth.rglob("*") if p.is_file())
    if a.large:
        print(f"== ingest vs classify on {a.large}x the synthetic folder (one run each)", flush=True)
        folder = work / f"synth-{a.large}x"
        n = linked_copies(synth, folder, a.large)
        res = run_pair(folder, run, work, a.cpus, sets, 1, n, audio_seconds(folder))
        results["throughput_large"] = {"copies": a.large, **res}
        print(f"synthetic {a.large}x ({n} tracks, {res['audio_hours']} h): ingest {res['ingest']['wall_s']} s, classify "
              f"{res['classify']['wall_s']} s, classify/ingest {res['ratio_classify_to_ingest']:.2f}; classify peak PSS "
              f"{res['classify']['peak_pss_mib']} MiB", flush=True)
    if a.skip_throughput:
        return _finish(results, a.out, t_start, merge=True)
    print("== throughput and memory: ingest vs classify at 1x and 4x", flush=True)
    per_style = 2 if a.quick else 3
    results["cpu_cost"] = {"featurise_ms_per_segment": featurise_cpu_ms_per_segment(synth_files[:8], cfg.features),
                           "model_ms_per_segment": (results.get("k_accuracy") or {}).get("model_cpu_ms_per_segment")}
    print(f"CPU cost per segment (synthetic, one core): {results['cpu_cost']}", flush=True)
    folders = {
        "real": {"1x": (work / "real-1x", real_subset(real, work / "real-1x", per_style)),
                 "4x": (work / "real-4x", real_subset(real, work / "real-4x", per_style, copies=4))},
        "synthetic": {"1x": (synth, len(synth_files)),
                      "4x": (work / "synth-4x", linked_copies(synth, work / "synth-4x", 4))},
    }
    folders = {name: {size: v for size, v in sizes.items() if size in a.sizes.split(",")}
               for name, sizes in folders.items() if name in a.folders.split(",")}
    results["throughput"] = {}
    for name, sizes in folders.items():
        res = {}
        for size, (folder, n) in sizes.items():
            res[size] = run_pair(folder, run, work, a.cpus, sets, repeats, n, audio_seconds(folder))
            print(f"{name} {size}: {res[size]}", flush=True)
        if "1x" in res and "4x" in res:
            one, four = res["1x"], res["4x"]
            marginal = {}
            for step in ("ingest", "classify"):  # start-up costs cancel out: steady-state rates
                dt = four[step]["wall_s"] - one[step]["wall_s"]
                marginal[step] = {"tracks_per_s": round((four["tracks"] - one["tracks"]) / dt, 3) if dt > 0 else None,
                                  "audio_s_per_s": round(3600 * (four["audio_hours"] - one["audio_hours"]) / dt, 1) if dt > 0 else None}
            res["marginal"] = marginal
            if marginal["ingest"]["tracks_per_s"] and marginal["classify"]["tracks_per_s"]:
                res["marginal"]["ratio_classify_to_ingest"] = round(
                    marginal["classify"]["tracks_per_s"] / marginal["ingest"]["tracks_per_s"], 3)
            res["classify_peak_pss_4x_to_1x"] = round(four["classify"]["peak_pss_mib"] / one["classify"]["peak_pss_mib"], 3)
            res["classify_peak_uss_4x_to_1x"] = round(four["classify"]["peak_uss_mib"] / one["classify"]["peak_uss_mib"], 3)
        results["throughput"][name] = res
    rows = []
    for name, res in results["throughput"].items():
        for size in [x for x in ("1x", "4x") if x in res]:
            r = res[size]
            for step in ("ingest", "classify"):
                rows.append((f"{name} {size} ({r['tracks']} tracks, {r['audio_hours']} h)", step, r[step]["wall_s"],
                             r[step]["tracks_per_s"], r[step]["audio_s_per_s"], r[step]["peak_pss_mib"]))
            rows.append(("", "classify/ingest", f"{r['ratio_classify_to_ingest']:.2f}", "", "", ""))
        m = res.get("marginal")
        if m:
            for step in ("ingest", "classify"):
                rows.append((f"{name} steady state (4x - 1x)", step, "", m[step]["tracks_per_s"], m[step]["audio_s_per_s"], ""))
            rows.append(("", "classify/ingest", f"{m.get('ratio_classify_to_ingest', float('nan')):.2f}", "", "", ""))
    print()
    print(format_table(rows, ("folder", "step", "wall_s", "tracks/s", "audio_s/s", "peak_pss_MiB")))
    for name, res in results["throughput"].items():
        if "marginal" not in res:
            continue
        c1, c4 = res["1x"]["classify"], res["4x"]["classify"]
        print(f"classify peak memory on {name}, driver + Ray processes: PSS 1x {c1['peak_pss_mib']} MiB, 4x {c4['peak_pss_mib']} MiB "
              f"(ratio {res['classify_peak_pss_4x_to_1x']}); private (USS, without the shared object store) "
              f"1x {c1['peak_uss_mib']} MiB, 4x {c4['peak_uss_mib']} MiB (ratio {res['classify_peak_uss_4x_to_1x']})")
    return _finish(results, a.out, t_start, merge=a.skip_k)


def _finish(results: dict, out: str, t_start: float, merge: bool) -> int:
    """Write the results; with ``merge`` (some sections skipped) the earlier file's other sections are kept."""
    results["load_average_end"] = list(os.getloadavg())
    results["bench_wall_s"] = round(time.perf_counter() - t_start, 1)
    path = Path(out)
    if merge and path.exists():
        results = {**json.loads(path.read_text()), **results}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
