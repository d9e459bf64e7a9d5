"""The end-to-end demo behind the README's quickstart: sample data -> ingest -> train -> classify.

Everything runs on one embedded local Ray; nothing is downloaded.  The demo writes:

    OUT/library/      a synthetic labelled collection (MP3, WAV, FLAC, OGG)
    OUT/dataset/      its Parquet shards (genrecls ingest)
    OUT/run/          the trained model, metrics, curves.png, confusion_matrix.png, report.md
    OUT/new-library/  other tracks of the same genres, never seen in training
    OUT/predictions/  one row per new track (genrecls classify), plus predictions.csv
"""

from __future__ import annotations

import os
import time
from typing import Any

from genrecls.core.config import Config

__all__ = ["run_demo"]


def run_demo(out: str, *, genres: int = 4, tracks_per_genre: int = 10, seconds: float = 20.0,
             epochs: int | None = None, workers: int | None = None, cfg: Config | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Run the whole pipeline on a generated collection; returns the key figures.

    ``epochs`` defaults to the configuration's for the musicnn model (a frozen backbone's head
    has no epochs: it is fit on the embeddings ingest stored) and to 12 for the CNNs.
    """
    from genrecls.audio.sample_data import make_sample_collection
    from genrecls.core.runtime import ray_session
    from genrecls.jobs.classify import classify
    from genrecls.jobs.ingest import ingest
    from genrecls.jobs.inspection import describe
    from genrecls.jobs.training import train
    from genrecls.storage.dataset import Dataset
    from genrecls.storage.predictions import read_predictions

    cfg = cfg or Config()
    if epochs is None:
        epochs = cfg.train.epochs if cfg.train.model == "musicnn" else 12
    cfg = cfg.override([f"train.epochs={epochs}"])
    t0 = time.monotonic()
    paths = {k: os.path.join(out, k) for k in ("library", "dataset", "run", "new-library", "predictions")}

    def step(msg: str) -> None:
        print(f"\n== {msg} [{time.monotonic() - t0:.0f}s]", flush=True)

    step(f"1/4 sample data: {genres} genres x {tracks_per_genre} tracks x {seconds:g} s -> {paths['library']}")
    make_sample_collection(paths["library"], genres=genres, tracks_per_genre=tracks_per_genre, seconds=seconds, seed=0)
    make_sample_collection(paths["new-library"], genres=genres, tracks_per_genre=max(2, tracks_per_genre // 4),
                           seconds=seconds, seed=1)
    with ray_session(None, workers):
        step(f"2/4 ingest -> {paths['dataset']}")
        summary = ingest(paths["library"], paths["dataset"], cfg, progress=progress)
        print(describe(Dataset(paths["dataset"])))
        how = ("a linear head on the frozen backbone, chosen on validation tracks" if cfg.train.model == "musicnn"
               and not cfg.train.fine_tune else f"{cfg.train.epochs} epochs")
        step(f"3/4 train ({cfg.train.model} model, {how}) -> {paths['run']}")
        result = train(paths["dataset"], paths["run"], cfg, progress=progress)
        m = result["metrics"]
        print(f"test accuracy: {m['test_track_accuracy']:.1%} per track, {m['test_segment_accuracy']:.1%} per segment "
              f"({m.get('test_tracks', '?')} test tracks); pictures and report in {paths['run']}")
        step(f"4/4 classify the unseen library {paths['new-library']} -> {paths['predictions']}")
        pred = classify(paths["new-library"], paths["run"], paths["predictions"], cfg, csv=True, progress=progress)
    table = read_predictions(paths["predictions"], columns=["path", "genre"])
    truth = [p.split("/")[0] for p in table.column("path").to_pylist()]
    correct = sum(t == g for t, g in zip(truth, table.column("genre").to_pylist()))
    acc = correct / max(1, table.num_rows)
    print(f"unseen tracks classified: {table.num_rows}, {correct} correct ({acc:.1%}); "
          f"see {os.path.join(paths['predictions'], 'predictions.csv')}")
    print(f"\ndemo finished in {time.monotonic() - t0:.0f}s")
    return {"ingested_tracks": summary.added, "test_track_accuracy": m["test_track_accuracy"],
            "unseen_accuracy": acc, "predictions": table.num_rows, "seconds": time.monotonic() - t0,
            "classified": pred.get("classified")}
