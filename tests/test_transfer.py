"""The musicnn model: feature preset check, a frozen-backbone run (embeddings computed once), the export.

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


def test_frozen_backbone_run_trains_the_head_on_embeddings_and_exports_the_whole_network(musicnn_dataset, musicnn_cfg, tmp_path):
    from genrecls.jobs.training import train
    from genrecls.models.inference import Predictor
    from genrecls.models.networks import import_tensorflow
    from genrecls.models.transfer import build_backbone

    run = tmp_path / "run"
    summary = train(musicnn_dataset, str(run), musicnn_cfg, workers=1, progress=False)
    plan = json.load(open(run / "plan.json"))
    assert plan["input"] == "embedding" and plan["cache"] is True
    info = json.load(open(run / "run.json"))
    assert info["model_name"] == "musicnn" and info["input"]["shape"] == [None, 96, 187]
    assert info["model"]["parameters"] > 450_000  # the backbone (to its mid-end features) is inside the exported model
    history = summary["history"]
    assert len(history) == 10 and all(h["val_track_accuracy"] is not None for h in history)
    best = max(h["val_track_accuracy"] for h in history)
    assert history[summary["best_epoch"] - 1]["val_track_accuracy"] == best  # selected on validation tracks
    # the export scores raw stored segments, and its embedding part is the pretrained network unchanged
    ds = Dataset(musicnn_dataset)
    table = ds.read_segments(columns=["track_id", "mel"])
    mels = mel_array(table.column("mel"), (96, 187))[:6]
    probs = Predictor(str(run)).predict(mels)
    assert probs.shape == (6, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    import_tensorflow()
    from genrecls.models.musicnn import load_musicnn, predict

    ref = predict(load_musicnn(), np.transpose(mels, (0, 2, 1)))["mean_pool"]
    ours = build_backbone()(mels, training=False).numpy()
    assert ours.shape == (6, 753 + 192)
    np.testing.assert_allclose(ours[:, :753], ref, atol=1e-4)  # the pretrained network's pooled features
    np.testing.assert_allclose(ours[:, 753:849], mels.mean(axis=2), atol=1e-4)  # then each band's mean and std
    np.testing.assert_allclose(ours[:, 849:], mels.std(axis=2), atol=1e-3)
    # the workers' per-track validation tally and the exported model's evaluation agree (within one track:
    # the export runs the backbone in float32 on the stored segments, the head saw float16 embeddings)
    m = summary["metrics"]
    assert abs(m["val_track_accuracy"] - best) <= 1 / m["val_tracks"] + 1e-9
    # the synthetic genres are distinct: the pretrained embedding separates them on held-out tracks
    held_out = (m["val_track_accuracy"] * m["val_tracks"] + m["test_track_accuracy"] * m["test_tracks"]) / (m["val_tracks"] + m["test_tracks"])
    assert held_out >= 0.7, m
    by_k = {r["k"]: r["track_accuracy"] for r in m["val_track_accuracy_by_k"]}  # K chosen on the validation tracks
    assert by_k[m["classify_max_segments"]] == max(by_k.values())
    assert json.load(open(run / "run.json"))["classify"]["max_segments"] == m["classify_max_segments"]
    assert os.path.exists(run / "report.md")


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
    cfg = musicnn_cfg.override(["train.fine_tune=true", "train.epochs=2", "train.learning_rate=1e-4"])
    summary = train(musicnn_dataset, str(run), cfg, workers=1, progress=False)
    assert json.load(open(run / "plan.json"))["input"] == "mel" and len(summary["history"]) == 2
    model = load_keras_model(str(run / "model.keras"))
    tuned = model.get_layer("musicnn_embedding").get_layer("musicnn_backbone").get_layer("timbral_74").get_weights()[0]
    pretrained = load_musicnn().get_layer("timbral_74").get_weights()[0]
    assert tuned.shape == pretrained.shape and not np.allclose(tuned, pretrained)
