"""The frozen backbone's head (issue 20): chosen on validation tracks, refit on training and validation tracks.

The libraries here are built from synthetic signals planted in the embedding store: every
stored layer of every segment is noise, except one, where each genre's segments are shifted
along a few dimensions of their own.  A head can then separate the genres on that layer (and
on concatenations holding it) only, so the choice is known in advance; the rest of the run is
the product's (the store read by Ray tasks, the selection grid as Ray tasks, the refit, the
export with the real backbone).  The shards hold random spectrograms.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import numpy as np
import pytest

from genrecls.core.config import Config, feature_preset
from genrecls.storage.dataset import ShardWriter
from genrecls.storage.embeddings import EmbeddingStore, EmbeddingWriter, embedding_schema
from genrecls.storage.location import Location

GENRES = ["ambient", "metal", "polka"]
TRACKS, SEGMENTS = 20, 3
#: a quick grid: every default candidate, two strengths
CFG = Config().override(["train.head_c=[0.01,0.1]"])


def planted_dataset(path, layer: str, *, seed: int = 0, relabel: dict[str, str] | None = None) -> str:
    """A musicnn dataset of 3 genres x 20 tracks x 3 segments whose stored embeddings separate the genres on
    ``layer`` only; ``relabel`` (track_id -> label) gives some tracks another label (same embeddings)."""
    from genrecls.models.engine import BACKBONE_OUTPUTS, backbone_id

    features = feature_preset("musicnn")
    loc = Location.parse(str(path))
    loc.makedirs()
    rng = np.random.default_rng(seed)
    tracks = [(f"{g}-{i:02d}", g) for g in GENRES for i in range(TRACKS)]
    labels = {t: (relabel or {}).get(t, g) for t, g in tracks}
    loc.write_json("manifest.json", {"format": "genrecls-dataset", "features": asdict(features),
                                     "labels": sorted(set(labels.values())), "counts": {}})
    shards = ShardWriter(loc, "part-0.parquet", features)
    store = EmbeddingWriter(loc, "part-0.parquet", embedding_schema(BACKBONE_OUTPUTS, backbone=backbone_id(),
                                                                   features=features))
    for tid, genre in tracks:
        shards.add_track(track_id=tid, path=f"{labels[tid]}/{tid}.wav", label=labels[tid], fingerprint=f"fp-{tid}",
                         size=1, mtime_ns=1, duration=9.0, starts=[0.0, 3.0, 6.0],
                         mels=rng.normal(2, 1, (SEGMENTS, *features.mel_shape)).astype(np.float16))
        values = {n: rng.normal(0, 1, (SEGMENTS, w)) for n, w in BACKBONE_OUTPUTS.items()}
        g = GENRES.index(genre)  # the genre's own dimensions, shifted by 3 standard deviations
        values[layer][:, 4 * g:4 * g + 4] += 3.0
        store.add_track(tid, f"fp-{tid}", values)
    shards.close()
    store.close()
    return str(path)


def candidates(run) -> dict[tuple[str, float], float]:
    info = json.load(open(os.path.join(run, "run.json")))
    return {(r["candidate"], r["c"]): r["val_track_accuracy"] for r in info["selection"]["candidates"]}


@pytest.fixture(scope="module")
def mid_run(tmp_path_factory, ray_local):
    """A library only the mid-level features (mean_pool) separate, trained with the defaults (but a 2-C grid)."""
    from genrecls.jobs.training import train

    root = tmp_path_factory.mktemp("head-mid")
    ds = planted_dataset(root / "ds", "mean_pool")
    summary = train(ds, str(root / "run"), CFG, progress=False)
    return ds, str(root / "run"), summary


def test_genres_only_the_mid_level_features_separate_select_them(mid_run):
    ds, run, summary = mid_run
    info = json.load(open(os.path.join(run, "run.json")))
    chosen = info["selection"]["chosen"]
    assert (chosen["candidate"], chosen["layers"], chosen["dims"]) == ("mean_pool", ["mean_pool"], 753)
    scores = candidates(run)
    assert len(scores) == 9 * 2  # every candidate's validation score is recorded
    assert max(scores[("mean_pool", c)] for c in (0.01, 0.1)) == 1.0
    for name in ("taggram", "bands", "penultimate", "penultimate+bands", "max_pool"):  # the noise layers
        assert max(scores[(name, c)] for c in (0.01, 0.1)) < 0.8, name
    assert info["embeddings"]["from_store"] == 60 and info["embeddings"]["computed"] == 0  # no backbone pass
    assert summary["metrics"]["test_track_accuracy"] == 1.0
    report = open(os.path.join(run, "report.md")).read()
    assert "## Head selection (validation tracks)" in report and "gain of the refit alone" in report


def test_genres_the_tags_separate_select_the_taggram(tmp_path, ray_local):
    from genrecls.jobs.training import train

    ds = planted_dataset(tmp_path / "ds", "taggram", seed=1)
    train(ds, str(tmp_path / "run"), CFG, progress=False)
    chosen = json.load(open(tmp_path / "run" / "run.json"))["selection"]["chosen"]
    assert (chosen["candidate"], chosen["dims"]) == ("taggram", 50)


def test_selection_never_looks_at_test_tracks(mid_run, tmp_path):
    """The same library with every test track's label changed: every choice and validation score is the same,
    while the test accuracy shows the labels did change."""
    from genrecls.jobs.training import train
    from genrecls.storage.split import read_splits

    ds, run, summary = mid_run
    splits = read_splits(os.path.join(run, "splits.parquet"))
    test = [t for t, s in zip(splits.column("track_id").to_pylist(), splits.column("split").to_pylist()) if s == "test"]
    relabel = {t: GENRES[(GENRES.index(t.split("-")[0]) + 1) % 3] for t in test}
    other = planted_dataset(tmp_path / "ds", "mean_pool", relabel=relabel)
    again = train(other, str(tmp_path / "run"), CFG, splits=os.path.join(run, "splits.parquet"), progress=False)
    a = json.load(open(os.path.join(run, "run.json")))
    b = json.load(open(tmp_path / "run" / "run.json"))
    assert candidates(run) == candidates(tmp_path / "run")
    assert a["selection"]["chosen"] == b["selection"]["chosen"]
    assert a["classify"] == b["classify"]  # K too
    assert summary["metrics"]["val_track_accuracy"] == again["metrics"]["val_track_accuracy"]
    assert again["metrics"]["test_track_accuracy"] == 0.0  # the test tracks now carry another genre's label


def test_the_refit_is_fit_on_training_and_validation_tracks_and_scores_unseen_test_tracks(mid_run):
    from genrecls.models.selection import standardisation
    from genrecls.models.transfer import head_probabilities, load_head
    from genrecls.storage.split import read_splits

    ds, run, summary = mid_run
    head = load_head(run)
    assert head.layers == ("mean_pool",) and head.labels == tuple(GENRES)
    splits = read_splits(os.path.join(run, "splits.parquet"))
    side = dict(zip(splits.column("track_id").to_pylist(), splits.column("split").to_pylist()))
    store = EmbeddingStore(ds)
    table = store.read(store.index().values(), ["mean_pool"])
    x = np.stack(table.column("mean_pool").to_numpy(zero_copy_only=False)).astype(np.float32)
    where = np.array([side[t] for t in table.column("track_id").to_pylist()])
    fit_on = np.isin(where, ["train", "val"])
    mean, _ = standardisation(x[fit_on])
    np.testing.assert_allclose(head.mean, mean, rtol=1e-5, atol=1e-5)  # the refit's rows: training + validation
    assert not np.allclose(head.mean, standardisation(x[where == "train"])[0], atol=1e-4)
    assert not np.allclose(head.mean, standardisation(x)[0], atol=1e-4)  # the test tracks were not in it
    refit = json.load(open(os.path.join(run, "run.json")))["refit"]
    n = {s: sum(1 for v in side.values() if v == s) for s in ("train", "val", "test")}
    assert refit["done"] and refit["tracks"] == n["train"] + n["val"] and refit["segments"] == 3 * refit["tracks"]
    # the head alone scores the test tracks as metrics.json says
    probs = head_probabilities({"mean_pool": x[where == "test"]}, head)
    tracks = np.array(table.column("track_id").to_pylist())[where == "test"]
    truth = {t: t.split("-")[0] for t in tracks}
    correct = [GENRES[int(probs[tracks == t].mean(axis=0).argmax())] == truth[t] for t in sorted(set(tracks))]
    assert np.mean(correct) == summary["metrics"]["test_track_accuracy"] and len(correct) == n["test"]
    assert summary["metrics"]["test_track_accuracy_before_refit"] == refit["test_track_accuracy_before"]


def test_refit_off_keeps_the_training_fit(mid_run, tmp_path):
    """train.refit=false: the exported head is the one the selection scored (validation figures unchanged)."""
    from genrecls.jobs.training import train
    from genrecls.models.transfer import load_head

    ds, run, summary = mid_run
    off = train(ds, str(tmp_path / "run"), CFG.override(["train.refit=false", "train.head_candidates=mean_pool",
                                                          "train.head_c=0.1"]), splits=os.path.join(run, "splits.parquet"),
                progress=False)
    info = json.load(open(tmp_path / "run" / "run.json"))
    assert info["refit"]["done"] is False and len(info["selection"]["candidates"]) == 1
    assert off["metrics"]["test_track_accuracy_before_refit"] == off["metrics"]["test_track_accuracy"]
    assert load_head(str(tmp_path / "run")).info["fit_on"] == "training tracks (train.refit=false)"


def test_rows_per_track_bounds_a_split():
    from genrecls.jobs.training.head import rows_per_track

    assert rows_per_track([10, 3, 50], 0) == 0 and rows_per_track([10, 3, 50], 63) == 0  # everything fits
    k = rows_per_track([10, 3, 50], 20)
    assert k == 8 and sum(min(n, k) for n in (10, 3, 50)) <= 20 < sum(min(n, k + 1) for n in (10, 3, 50))
    assert rows_per_track([10, 10], 1) == 1  # at least one segment per track
