"""The musicnn model: feature preset check, a frozen-backbone run (embeddings from the dataset's store), the export.

Real local Ray, real Parquet shards, the real pretrained network with its shipped weights.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from genrecls.core.config import Config
from genrecls.storage.dataset import Dataset, DatasetError, mel_array


@pytest.fixture(scope="module")
def musicnn_cfg():
    return Config().override(["features.preset=musicnn", "train.model=musicnn", "train.epochs=10",
                              "train.batch_size=8", "train.learning_rate=1e-2", "train.early_stopping_patience=0"])


@pytest.fixture(scope="module")
def musicnn_dataset(tmp_path_factory, musicnn_cfg, ray_local):
    """3 genres x 12 tracks x 7 s (16 kHz WAV), musicnn preset: 2 segments of 187 frames per track."""
    from genrecls.audio.sample_data import make_sample_collection
    from genrecls.jobs.ingest import ingest

    root = tmp_path_factory.mktemp("mnn")
    make_sample_collection(str(root / "lib"), genres=3, tracks_per_genre=12, seconds=7.0, sr=16000,
                           formats=("wav",), seed=5)
    summary = ingest(str(root / "lib"), str(root / "ds"), musicnn_cfg, progress=False)
    assert summary.failed == 0 and summary.added == 36
    return str(root / "ds")


def test_the_dataset_records_its_preset(musicnn_dataset):
    f = Dataset(musicnn_dataset).manifest()["features"]
    assert f["preset"] == "musicnn" and f["log_scale"] == "log10_10000"
    assert Dataset(musicnn_dataset).feature_config().mel_shape == (96, 187)


def test_musicnn_on_another_preset_stops_before_any_worker_with_the_ingest_command(sample_dataset, tmp_path):
    from genrecls.jobs.training import train

    run = tmp_path / "run"
    with pytest.raises(DatasetError, match=r"genrecls ingest SOURCE --out NEW_DATASET --set features.preset=musicnn"):
        train(str(sample_dataset), str(run), Config().override(["train.model=musicnn"]), progress=False)
    assert not (run / "plan.json").exists()  # nothing planned, no worker started


@pytest.fixture(scope="module")
def frozen_run(musicnn_dataset, musicnn_cfg, tmp_path_factory):
    """The default model (frozen backbone, a linear head chosen by cross-validation; a 2-C grid) on the dataset."""
    from genrecls.jobs.training import train

    run = tmp_path_factory.mktemp("frozen") / "run"
    summary = train(musicnn_dataset, str(run), musicnn_cfg.override(["train.head_c=[0.01,0.1]"]), workers=1,
                    progress=False)
    return run, summary


def test_frozen_backbone_run_fits_a_head_on_stored_embeddings_and_exports_the_whole_network(musicnn_dataset, frozen_run):
    from genrecls.models.engine import BackboneEngine, backbone_id
    from genrecls.models.inference import Predictor
    from genrecls.models.networks import load_keras_model
    from genrecls.models.transfer import head_probabilities, load_head

    run, summary = frozen_run
    plan = json.load(open(run / "plan.json"))
    assert plan["input"] == "embedding"
    info = json.load(open(run / "run.json"))
    assert info["model_name"] == "musicnn" and info["input"]["shape"] == [None, 96, 187]
    # every embedding came from the store ingest filled: no backbone pass in training
    assert info["embeddings"]["from_store"] == 36 and info["embeddings"]["computed"] == 0
    assert info["embeddings"]["backbone"] == backbone_id() == info["head"]["backbone"]
    assert info["embeddings"]["store_engines"][0]["engine"] in ("openvino", "onnxruntime", "tensorflow")
    chosen = info["selection"]["chosen"]
    assert len(info["selection"]["first_round"]["candidates"]) == 9 * 2 and info["head"]["candidate"] == chosen["candidate"]
    best = max(r["oof_track_accuracy"] for r in info["selection"]["candidates"])  # the finalists, on every segment
    assert info["selection"]["oof_track_accuracy"] == best  # chosen on the out-of-fold tracks
    assert info["model"]["parameters"] > 450_000  # the backbone is inside the exported model
    # the export scores raw stored segments: the same as the head on the backbone's layers (TensorFlow, fp32)
    ds = Dataset(musicnn_dataset)
    table = ds.read_segments(columns=["track_id", "mel"])
    mels = mel_array(table.column("mel"), (96, 187))[:6]
    probs = Predictor(str(run), engine="tensorflow").predict(mels)  # the SavedModel, fp32
    assert probs.shape == (6, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    head = load_head(str(run))
    assert head.layers == tuple(chosen["layers"]) and head.labels == tuple(info["labels"])
    np.testing.assert_allclose(probs, head_probabilities(BackboneEngine("tensorflow")(mels), head), atol=1e-4)
    np.testing.assert_allclose(load_keras_model(str(run / "model.keras"))(mels).numpy(), probs, atol=1e-5)
    assert info["export_check"]["segments"] > 0 and info["export_check"]["max_abs_difference"] < 0.1
    # the synthetic genres are distinct: the pretrained embedding separates them on held-out tracks
    m = summary["metrics"]
    assert m["test_track_accuracy"] >= 0.7 and m["oof_track_accuracy"] == best, m
    by_k = {r["k"]: r["track_accuracy"] for r in m["oof_track_accuracy_by_k"]}  # K chosen on the out-of-fold tracks
    assert by_k[m["classify_max_segments"]] == max(by_k.values())
    assert info["classify"]["max_segments"] == m["classify_max_segments"]
    assert np.abs(Predictor(str(run)).predict(mels) - probs).max() < 0.05  # model.onnx on the engine (bf16 here)
    for name in ("report.md", "head.npz", "model.onnx", "normalisation.json", "history.json", "curves.png", "confusion_matrix.png",
                 "metrics.json", "splits.parquet", "config.json", "model.keras", "model"):
        assert os.path.exists(run / name), name
    assert not os.path.exists(run / "checkpoints")  # no epochs: nothing to resume from


def test_classify_with_a_frozen_head_runs_the_backbone_and_writes_each_tracks_embedding(musicnn_dataset, frozen_run,
                                                                                       tmp_path, ray_local):
    """classify on a frozen-head run: the backbone on the engine, the head in NumPy; each track's embedding (the
    mean of its scored segments' penultimate layer) in the predictions, named with the backbone's id."""
    import pyarrow.parquet as pq

    from genrecls.jobs.classify import classify
    from genrecls.models.engine import backbone_id
    from genrecls.storage.predictions import read_predictions

    run, summary = frozen_run
    lib = os.path.join(os.path.dirname(musicnn_dataset), "lib")
    out = tmp_path / "pred"
    s = classify(lib, str(run), str(out), Config().override(["classify.max_segments=0"]), progress=False)
    assert s["classified"] == 36 and s["failed"] == 0
    assert s["engine"]["head"] == "numpy (head.npz)" and s["embedding"]["backbone"] == backbone_id()
    table = read_predictions(str(out))
    emb = table.column("embedding").to_pylist()
    assert all(len(v) == 200 for v in emb)
    meta = json.loads(pq.read_schema(os.path.join(out, "parts", os.listdir(out / "parts")[0])).metadata[b"genrecls.embedding"])
    assert meta["layer"] == "penultimate" and meta["backbone"] == backbone_id()
    # the same tracks' mean stored penultimate (the store's engine, the same stored segments: bf16 noise apart)
    from genrecls.storage.embeddings import EmbeddingStore, layer_array

    store = EmbeddingStore(musicnn_dataset)
    stored = store.read(store.index().values(), ["penultimate"])
    ids = np.array(stored.column("track_id").to_pylist())
    x = layer_array(stored.column("penultimate"))
    by_id = dict(zip(table.column("track_id").to_pylist(), emb))
    for tid in sorted(set(ids))[:5]:
        ref = x[ids == tid].mean(axis=0)
        assert np.abs(np.array(by_id[tid]) - ref).max() <= 0.05 * np.abs(ref).max() + 1e-3
    acc = np.mean([g == p.split("/")[0] for g, p in zip(table.column("top_genre").to_pylist(), table.column("path").to_pylist())])
    assert acc >= 0.8  # most of these tracks were seen in training; the head scores them as it should


def test_train_without_a_store_computes_the_embeddings_and_never_writes_the_dataset(musicnn_dataset, musicnn_cfg,
                                                                                    tmp_path):
    """A dataset ingested with ingest.embeddings=off: train embeds its segments itself (Ray tasks on the engine)
    and leaves the dataset folder as it was (it holds the run's lock, not the dataset's)."""
    import shutil

    from genrecls.jobs.training import train
    from genrecls.storage.dataset import Dataset
    from genrecls.storage.index import EMBEDDING_COLUMNS

    ds = tmp_path / "ds"
    shutil.copytree(musicnn_dataset, ds)
    # as if ingested with ingest.embeddings=off: no track has an entry in the store
    Dataset(str(ds)).commit(update={t: dict.fromkeys(EMBEDDING_COLUMNS) for t in Dataset(str(ds)).tracks()})
    shutil.rmtree(ds / "embeddings")
    before = sorted(os.listdir(ds))
    cfg = musicnn_cfg.override(["train.head_candidates=penultimate,mean_pool+bands", "train.head_c=0.1"])
    summary = train(str(ds), str(tmp_path / "run"), cfg, workers=1, progress=False)
    info = json.load(open(tmp_path / "run" / "run.json"))
    assert info["embeddings"]["computed"] == 36 and info["embeddings"]["from_store"] == 0
    assert info["embeddings"]["computed_engines"][0]["threads"] == 1  # one CPU per Ray task, set on the runtime
    assert sorted(os.listdir(ds)) == before and not (ds / "embeddings").exists()
    assert summary["metrics"]["test_track_accuracy"] >= 0.7


def test_classify_with_the_pretrained_tagger_needs_no_training(musicnn_dataset, tmp_path, ray_local):
    """`classify LIBRARY --model musicnn-tags`: one row per track with the tagger's top tags."""
    import pyarrow.dataset as pads

    from genrecls.audio.sample_data import make_sample_collection
    from genrecls.jobs.classify import classify
    from genrecls.models.musicnn import MSD_TAGS

    lib = tmp_path / "unlabelled"
    make_sample_collection(str(lib), genres=2, tracks_per_genre=2, seconds=7.0, sr=22050, formats=("mp3", "flac"), seed=9)
    out = tmp_path / "tags"
    summary = classify(str(lib), "musicnn-tags", str(out), Config().override(["classify.top_k=5"]), progress=False)
    assert summary["classified"] == 4 and summary["failed"] == 0
    table = pads.dataset(str(out / "parts"), format="parquet").to_table()
    assert table.num_rows == 4
    for row in table.to_pylist():
        assert row["genre"] in MSD_TAGS and len(row["top_k"]) == 5
        probs = [t["probability"] for t in row["top_k"]]
        assert probs == sorted(probs, reverse=True) and row["confidence"] == probs[0] and 0 < probs[0] <= 1
        assert row["model_id"] == "musicnn-tags-msd-1" and row["n_segments"] == 2
    again = classify(str(lib), "musicnn-tags", str(out), Config(), progress=False)
    assert again["classified"] == 0 and again["skipped_done"] == 4  # a stable model id: nothing re-tagged


def test_fine_tuning_trains_the_backbone_too(musicnn_dataset, musicnn_cfg, tmp_path):
    """train.fine_tune: the workers train the whole network on the stored segments; its weights move."""
    from genrecls.jobs.training import train
    from genrecls.models.musicnn import load_musicnn
    from genrecls.models.networks import load_keras_model

    run = tmp_path / "ft"
    cfg = musicnn_cfg.override(["train.fine_tune=true", "train.epochs=1", "train.learning_rate=1e-4"])
    summary = train(musicnn_dataset, str(run), cfg, workers=1, progress=False)
    assert json.load(open(run / "plan.json"))["input"] == "mel" and len(summary["history"]) == 1
    model = load_keras_model(str(run / "model.keras"))
    tuned = model.get_layer("musicnn_embedding").get_layer("musicnn_backbone").get_layer("timbral_74").get_weights()[0]
    pretrained = load_musicnn().get_layer("timbral_74").get_weights()[0]
    assert tuned.shape == pretrained.shape and not np.allclose(tuned, pretrained)


def test_a_scheduled_retrain_embeds_only_the_new_tracks_and_scores_from_the_store(musicnn_dataset, musicnn_cfg, tmp_path):
    """retrain on the musicnn library: the first cycle embeds every track; after 3 new tracks the second embeds
    those 3 only, and champion and challenger are scored from the stored embeddings with their heads."""
    import shutil

    from genrecls.audio.sample_data import make_sample_collection
    from genrecls.jobs.retrain import PROMOTED, retrain

    lib = tmp_path / "lib"
    shutil.copytree(os.path.join(os.path.dirname(musicnn_dataset), "lib"), lib)
    cfg = musicnn_cfg.override(["train.head_candidates=penultimate,mean_pool+bands", "train.head_c=0.1"])
    ds, reg = str(tmp_path / "ds"), str(tmp_path / "reg")
    first = retrain(str(lib), ds, reg, cfg, progress=False)
    assert first["decision"] == PROMOTED and first["ingest"]["embedded_tracks"] == 36
    extra = tmp_path / "extra"
    make_sample_collection(str(extra), genres=3, tracks_per_genre=1, seconds=7.0, sr=16000, formats=("wav",), seed=77)
    for genre in os.listdir(extra):
        for f in os.listdir(extra / genre):
            shutil.copy(extra / genre / f, lib / genre / f"new-{f}")
    second = retrain(str(lib), ds, reg, cfg, progress=False)
    assert second["ingest"]["added"] == 3 and second["ingest"]["embedded_tracks"] == 3
    for who in ("challenger_metrics", "champion_metrics"):
        assert second[who]["scored_by"]["how"].startswith("the run's head"), second[who]["scored_by"]
    assert second["challenger_metrics"]["holdout_tracks"] == second["champion_metrics"]["holdout_tracks"] > 0
