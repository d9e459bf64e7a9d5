"""The end-to-end demo behind the README's quickstart: a library that teaches itself.

A generated library laid out as people keep one (``Artist/Album/NN Track.ext``, album and artist
tags, most albums tagged by genre in several spellings, some ``Unknown``, one file mistagged),
then the four commands of the README's "your own library" section, run on one embedded local Ray;
nothing is downloaded.  The demo writes::

    OUT/library/      the generated library (MP3, FLAC, Ogg Vorbis, WAV) and OUT/genres.toml, its vocabulary
    OUT/dataset/      its shards, embeddings and index (genrecls ingest --labels-from tags --labels genres.toml)
    OUT/run/          the trained model, metrics, report.md and its pictures (genrecls train)
    OUT/predictions/  one row per track, predictions.csv and review.csv (genrecls classify --dataset)

and finally writes the predicted genre into every file that had none (``genrecls tag --apply``),
leaving each genre a person wrote as it was.
"""

from __future__ import annotations

import os
import time
from typing import Any

from genrecls.core.config import Config

__all__ = ["run_demo"]


def run_demo(out: str, *, genres: int = 4, artists_per_genre: int = 3, tracks_per_album: int = 4,
             seconds: float = 20.0, workers: int | None = None, cfg: Config | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Run the whole flow on a generated library; returns the key figures."""
    from genrecls.audio.sample_data import GENRES, TAGGED_VOCABULARY, make_tagged_library
    from genrecls.audio.tags import read_track_tags
    from genrecls.core.runtime import one_ray_session
    from genrecls.jobs.classify import classify
    from genrecls.jobs.classify import format_summary as classify_summary
    from genrecls.jobs.ingest import ingest
    from genrecls.jobs.inspection import describe
    from genrecls.jobs.tagging import tag
    from genrecls.jobs.training import train
    from genrecls.storage.dataset import Dataset

    t0 = time.monotonic()
    paths = {k: os.path.join(out, k) for k in ("library", "dataset", "run", "predictions")}
    vocab = os.path.join(out, "genres.toml")
    names = list(GENRES)[:genres]
    cfg = (cfg or Config()).override(["ingest.labels_from=tags", f"ingest.labels={vocab}", f"classify.labels={vocab}",
                                      f"classify.dataset={paths['dataset']}"])

    def step(msg: str) -> None:
        print(f"\n== {msg} [{time.monotonic() - t0:.0f}s]", flush=True)

    step(f"1/5 a library as people keep one: {genres * artists_per_genre} artists, an album of {tracks_per_album} "
         f"tracks each, most albums tagged by genre in several spellings -> {paths['library']}")
    truth = make_tagged_library(paths["library"], genres=genres, artists_per_genre=artists_per_genre,
                                tracks_per_album=tracks_per_album, seconds=seconds, unknown=0.15, mistagged=1, seed=0)
    with open(vocab, "w") as f:
        f.write(TAGGED_VOCABULARY(names) + "\n")
    untagged = sorted(r for r, v in truth.items() if v["tag"] is None)
    print(f"{len(truth)} files, {len(truth) - len(untagged)} with a genre tag ({len({v['tag'] for v in truth.values()}) - 1} "
          f"spellings), {len(untagged)} without; the vocabulary that merges the spellings: {vocab}")
    with one_ray_session():
        step(f"2/5 genrecls ingest {paths['library']} --out {paths['dataset']} --labels-from tags --labels {vocab}")
        summary = ingest(paths["library"], paths["dataset"], cfg, workers=workers, progress=progress)
        print(describe(Dataset(paths["dataset"])))
        step(f"3/5 genrecls train {paths['dataset']} --out {paths['run']} --labels {vocab} (a linear head on the "
             "frozen musicnn backbone, every choice cross-validated on the tagged tracks)")
        result = train(paths["dataset"], paths["run"], cfg, workers=workers, progress=progress)
        m = result["metrics"]
        print(f"test accuracy: {m['test_track_accuracy']:.1%} per track ({m.get('test_tracks', '?')} test tracks); "
              f"report and pictures in {paths['run']}")
        step(f"4/5 genrecls classify {paths['library']} --model {paths['run']} --out {paths['predictions']} "
             f"--dataset {paths['dataset']} (every track, from the embedding store)")
        pred = classify(paths["library"], paths["run"], paths["predictions"], cfg, workers=workers, csv=True,
                        progress=progress)
        print(classify_summary(pred))
        step(f"5/5 genrecls tag {paths['predictions']} --apply (the files with no genre get one; a person's stay)")
        tagged = tag(paths["predictions"], apply=True, workers=workers, progress=progress)
    filled = {r: read_track_tags(os.path.join(paths["library"], r)).by_genrecls for r in untagged}
    right = sum(1 for r, g in filled.items() if g and g[0].casefold() == truth[r]["genre"].casefold()
                or (g and _spelled(g[0], truth[r]["genre"])))
    done = sum(1 for g in filled.values() if g)
    print(f"{tagged['written']} file(s) written: {done} of the {len(untagged)} untagged files got a genre, {right} of them "
          f"right; every genre a person wrote is as it was; undo: genrecls tag --undo {tagged.get('journal')}")
    print(f"\ndemo finished in {time.monotonic() - t0:.0f}s")
    return {"ingested_tracks": summary.added, "labelled": summary.labelled, "test_track_accuracy": m["test_track_accuracy"],
            "untagged": len(untagged), "filled": done, "filled_right": right, "review_rows": pred["review"]["rows"],
            "seconds": time.monotonic() - t0, "classified": pred.get("classified")}


def _spelled(written: str, genre: str) -> bool:
    """True when ``written`` is the vocabulary's name of the generator's ``genre`` (e.g. Hip-Hop for hiphop)."""
    from genrecls.audio.sample_data import SPELLINGS
    from genrecls.models.vocabulary import normalise_name

    return normalise_name(written) == normalise_name(SPELLINGS[genre][0])
