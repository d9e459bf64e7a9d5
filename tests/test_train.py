"""Training with Ray Train on real local Ray, real Parquet shards and real TensorFlow.

One 2-worker run of the default model on an easy generated set is shared by the artefact,
accuracy, evaluation and worker-failure tests: a RayTrainWorker process is killed (SIGKILL)
after its first checkpoint and the run must still finish.  The resume test kills a real
driver process after its first checkpoint and continues the run.  Bad input is checked without
Ray: it must fail before any worker starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import Pauses

from genrecls.core.config import ConfigError, FeatureConfig, load_config
from genrecls.core.hooks import PAUSE_DIR_ENV
from genrecls.storage.dataset import (
    TRACKS_KEY,
    Dataset,
    DatasetError,
    ShardWriter,
)
from genrecls.storage.location import Location
from genrecls.storage.split import SplitError

EPOCHS = 3


@pytest.fixture(scope="module")
def easy_cfg(small_cfg):
    """small_cfg's features with half-overlapping segments (15 per 8 s track), a small fast run."""
    return small_cfg.with_section(features={"segment_hop": 4000}).with_section(train={
        "epochs": EPOCHS, "batch_size": 16, "learning_rate": 3e-3, "workers": 2, "early_stopping_patience": 0})


@pytest.fixture(scope="module")
def easy_dataset(tmp_path_factory, easy_cfg, ray_local):
    """4 genres x 10 tracks x 8 s (8 kHz WAV) ingested: 600 segments, 8 test tracks."""
    from genrecls.audio.sample_data import make_sample_collection
    from genrecls.jobs.ingest import ingest

    root = tmp_path_factory.mktemp("easy")
    make_sample_collection(str(root / "lib"), genres=4, tracks_per_genre=10, seconds=8.0, sr=8000,
                           formats=("wav",), seed=3)
    summary = ingest(str(root / "lib"), str(root / "ds"), easy_cfg, progress=False)
    assert summary.failed == 0 and summary.added == 40
    return str(root / "ds")


def _wait_for_checkpoint(run: str, min_epoch: int, timeout: float, proc=None):
    from genrecls.jobs.training import find_checkpoints

    deadline = time.monotonic() + timeout
    loc = Location.parse(run)
    while time.monotonic() < deadline:
        found = find_checkpoints(loc) if loc.exists("checkpoints") else []
        if found and found[-1][0] >= min_epoch:
            return found[-1]
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the training process ended early (exit {proc.returncode})")
        time.sleep(0.3)
    raise AssertionError(f"no checkpoint of epoch >= {min_epoch} in {run} after {timeout} s")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, easy_dataset, easy_cfg):
    """The shared 2-worker run, during which a RayTrainWorker process is killed after the first checkpoint."""
    import psutil

    from genrecls.jobs.training import train

    run = str(tmp_path_factory.mktemp("trained") / "run")
    killed: list[int] = []
    errors: list[BaseException] = []

    pauses = Pauses(os.environ[PAUSE_DIR_ENV])
    pauses.arm("train-epoch-reported")  # the first worker to report an epoch waits there: certainly mid-run

    def killer():
        try:
            pid = pauses.wait("train-epoch-reported", timeout=600)
            name = psutil.Process(pid).cmdline()[0]
            assert "RayTrainWorker" in name, name  # only ever a training worker of this run
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except BaseException as exc:  # surfaced by the test below
            errors.append(exc)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary = train(easy_dataset, run, easy_cfg.with_section(train={"max_failures": 2}), progress=False)
    thread.join(timeout=10)
    pauses.reset()
    return run, {**summary, "killed": killed, "killer_errors": errors}


# -- one 2-worker run (with a worker killed half-way) ------------------------------------
def test_two_worker_run_leaves_every_artefact(trained, easy_dataset):
    run, summary = trained
    for name in ("model/saved_model.pb", "model.keras", "run.json", "config.json", "splits.parquet", "plan.json",
                 "normalisation.json", "history.json", "curves.png", "confusion_matrix.png", "metrics.json", "report.md"):
        assert os.path.exists(os.path.join(run, name)), name
    info = json.load(open(os.path.join(run, "run.json")))
    assert info["labels"] == ["classical", "electronic", "jazz", "rock"]
    assert info["features"] == Dataset(easy_dataset).manifest()["features"]
    assert info["versions"]["tf-keras"] and info["versions"]["ray"]
    cfg = load_config(os.path.join(run, "config.json"))  # the resolved config is a valid input
    assert cfg.train.workers == 2 and cfg.features == FeatureConfig(**info["features"])
    plan = json.load(open(os.path.join(run, "plan.json")))
    assert plan["workers"] == 2 and plan["steps_per_epoch"] >= 5
    norm = json.load(open(os.path.join(run, "normalisation.json")))
    assert len(norm["mean"]) == 32 and all(s > 0 for s in norm["std"])
    history = json.load(open(os.path.join(run, "history.json")))
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    assert all(h["short_batches"] == 0 for h in history)  # equal steps on both workers
    assert history[-1]["loss"] < history[0]["loss"]
    for png in ("curves.png", "confusion_matrix.png"):
        assert open(os.path.join(run, png), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    m = json.load(open(os.path.join(run, "metrics.json")))
    for key in ("test_segment_accuracy", "test_track_accuracy", "test_macro_f1", "val_segment_accuracy",
                "val_track_accuracy", "val_macro_f1"):
        assert 0.0 <= m[key] <= 1.0, key
    assert set(m["test_per_class"]) == set(info["labels"])
    assert {"precision", "recall"} <= set(m["test_per_class"]["jazz"])
    assert m["tracks_per_split"]["test"]["total"] == m["test_tracks"] == 8
    assert sum(m["tracks_per_split"][s]["total"] for s in ("train", "val", "test")) == 40
    assert np.sum(m["test_confusion"]["matrix"]) == 8
    report = open(os.path.join(run, "report.md")).read()
    assert "test" in report and "mean of its segment probabilities" in report
    # issue 21: calibration and thresholds chosen on the validation tracks, measured on the test tracks
    answers = info["answers"]
    cal = answers["chosen"]["calibration"]  # kept only when, fit on other validation tracks, it lowers their NLL
    assert cal["tracks"] == m["val_tracks"] and (answers["calibration"]["method"] == "temperature") == cal["kept"]
    assert cal["nll_cross_fitted"] is not None and "a network trained from scratch is not cross-validated" in report
    assert answers["rule"] == "global" and answers["validation_tracks"] == "validation_tracks.parquet"
    assert m["answers"]["test"]["tracks"] == 8 and {"ece_before", "ece_after", "coverage"} <= set(m["answers"]["test"])
    assert "test ECE (15 bins)" in report and "![reliability diagram" in report
    assert open(os.path.join(run, "reliability.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert_only_the_documented_run_files(run)


#: what docs/training.md says a finished run folder holds (Runs, predictions, registry), and the local lock file
RUN_FILES = {"model", "model.keras", "model.onnx", "run.json", "config.json", "splits.parquet", "plan.json",
             "normalisation.json", "history.json", "metrics.json", "report.md", "curves.png", "confusion_matrix.png",
             "checkpoints", "validation_tracks.parquet", "reliability.png", "labels.toml", ".lock"}
#: entries a run holds only sometimes: the lock (local disks), the vocabulary (trained with classify.labels)
OPTIONAL_RUN_FILES = {".lock", "labels.toml"}
CHECKPOINT_FILES = {"state.json", "weights.npz", "optimizer.npz", "best.npz"}


def assert_only_the_documented_run_files(run: str) -> None:
    """No pickle anywhere, no Ray Train state: only the documented entries, checkpoints of the last two epochs."""
    import re

    readme = open(os.path.join(os.path.dirname(__file__), "..", "docs", "training.md")).read()
    start = readme.index("RUN/                        written by genrecls train")
    section = readme[start:readme.index("PREDICTIONS/", start)]
    for name in RUN_FILES - {".lock"}:
        assert name in section, f"{name} is not in docs/training.md's run folder listing"
    for dirpath, _, files in os.walk(run):
        assert not [f for f in files if f.endswith((".pkl", ".pickle"))], (dirpath, files)
    assert set(os.listdir(run)) <= RUN_FILES and set(os.listdir(run)) >= RUN_FILES - OPTIONAL_RUN_FILES, sorted(os.listdir(run))
    epochs = sorted(os.listdir(os.path.join(run, "checkpoints")))
    assert 1 <= len(epochs) <= 2 and all(re.fullmatch(r"epoch-\d{4}", e) for e in epochs), epochs
    for e in epochs:
        assert set(os.listdir(os.path.join(run, "checkpoints", e))) <= CHECKPOINT_FILES
        assert {"state.json", "weights.npz"} <= set(os.listdir(os.path.join(run, "checkpoints", e)))


def test_default_model_separates_the_easy_set(trained):
    _, summary = trained
    m = summary["metrics"]
    # chance is 0.25; a broken pipeline (shuffled labels, lost normalisation, untrained weights)
    # stays far below this on 8 + 8 held-out tracks
    assert m["test_track_accuracy"] >= 0.75, m
    assert m["val_track_accuracy"] >= 0.75, m
    assert m["test_segment_accuracy"] >= 0.7, m


def test_no_track_leaks_between_splits(trained, easy_dataset):
    run, _ = trained
    splits = pq.read_table(os.path.join(run, "splits.parquet"))
    ids = splits.column("track_id").to_pylist()
    assert len(ids) == len(set(ids)) == 40
    by_split = {s: {t for t, v in zip(ids, splits.column("split").to_pylist()) if v == s} for s in ("train", "val", "test")}
    assert not (by_split["train"] & by_split["val"]) and not (by_split["train"] & by_split["test"])
    assert not (by_split["val"] & by_split["test"])
    # segments per split in the plan are exactly those of the split's tracks
    tracks = Dataset(easy_dataset).tracks()
    plan = json.load(open(os.path.join(run, "plan.json")))
    for s, members in by_split.items():
        assert plan["segments_per_split"][s]["total"] == sum(tracks[t].n_segments for t in members)


def test_exported_model_and_evaluation_agree(trained, easy_dataset, capsys):
    from genrecls.cli import main
    from genrecls.models.evaluation import evaluate_run

    run, summary = trained
    again = evaluate_run(run)  # re-score the run's own splits through the SavedModel
    for key in ("test_track_accuracy", "test_segment_accuracy", "val_track_accuracy"):
        assert again[key] == pytest.approx(summary["metrics"][key]), key
    other = evaluate_run(run, easy_dataset)  # "another" dataset: tracks the run did not train/validate on
    assert other["test_tracks"] == 8 and other["scope"]["excluded_seen"] == 32
    every = evaluate_run(run, easy_dataset, all_tracks=True)
    assert every["test_tracks"] == 40 and every["scope"]["seen_by_run"] == 32
    assert main(["evaluate", run]) == 0
    out = capsys.readouterr().out
    assert "track acc" in out and "test" in out and "per class" in out
    assert "test ECE (15 bins)" in out and "coverage" in out and "threshold from" in out  # issue 21
    assert again["answers"]["test"]["ece_after"] == pytest.approx(summary["metrics"]["answers"]["test"]["ece_after"])


def test_a_run_folder_is_never_overwritten(trained, easy_dataset, easy_cfg):
    from genrecls.jobs.training import train

    run, _ = trained
    with pytest.raises(FileExistsError, match="already holds a training run"):
        train(easy_dataset, run, easy_cfg, progress=False)


# -- interruptions ----------------------------------------------------------------------
def test_killed_worker_restarts_from_the_last_checkpoint(trained):
    """FailureConfig restarts the worker group from the last checkpoint; the run still finishes."""
    from genrecls.models.inference import Predictor

    run, summary = trained
    assert not summary["killer_errors"], summary["killer_errors"]
    assert summary["killed"], "no worker was killed"
    assert summary["epochs_run"] == EPOCHS and [h["epoch"] for h in summary["history"]] == list(range(1, EPOCHS + 1))
    assert len(summary["restarts"]) >= 1 and summary["restarts"][0]["from_epoch"] >= 1
    assert summary["restarts"][0]["world_size"] == 2
    assert summary["history"][-1]["pid"] != summary["killed"][0]  # later epochs ran in a new worker process
    probs = Predictor(run).predict(np.zeros((2, 32, 32), np.float32) - 40)
    assert probs.shape == (2, 4) and np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    assert "restarts from a checkpoint: " in open(os.path.join(run, "report.md")).read()


def test_resume_continues_an_interrupted_run(easy_dataset, easy_cfg, ray_local, tmp_path, capfd, pauses):
    """A driver killed after its first checkpoint; ``--resume`` picks up from that epoch."""
    from genrecls.jobs.training import train

    run = str(tmp_path / "run")
    address = ray_local.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "genrecls", "train", easy_dataset, "--out", run, "--address", address,
           "--workers", "1", "--epochs", "2", "--model", "tutorial", "-q",
           "--set", "train.early_stopping_patience=0", "--set", "train.batch_size=16"]
    for k, v in asdict(easy_cfg.features).items():
        cmd += ["--set", f"features.{k}={json.dumps(v)}"]
    pauses.arm("train-epoch-reported")  # the worker waits there once epoch 1 is reported
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        pauses.wait("train-epoch-reported", proc)
        epoch, _ = _wait_for_checkpoint(run, 1, timeout=300, proc=proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole session we started, nothing else
        proc.wait()
    assert epoch < 2 and not os.path.exists(os.path.join(run, "metrics.json"))
    first = json.load(open(os.path.join(_wait_for_checkpoint(run, 1, 5)[1], "state.json")))["history"][0]
    cfg = load_config(os.path.join(run, "config.json"))
    assert cfg.train.model == "tutorial" and cfg.train.epochs == 2
    capfd.readouterr()
    summary = train(easy_dataset, run, cfg, resume=True, progress=True)
    err = capfd.readouterr().err
    assert "resuming from epoch 1" in err and "epoch 2/2: loss " in err and "epoch 1/2:" not in err, err
    assert summary["epochs_run"] == 2
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert summary["history"][0] == first  # the interrupted run's epochs are kept, not redone
    assert summary["restarts"] and summary["restarts"][0]["from_epoch"] >= 1
    assert os.path.exists(os.path.join(run, "model", "saved_model.pb"))
    assert json.load(open(os.path.join(run, "run.json")))["model_name"] == "tutorial"


# -- bad input: clear errors before any worker starts -----------------------------------
def _fake_dataset(path, features: FeatureConfig, labels: list[str], *, drop: str | None = None,
                  shard_features: FeatureConfig | None = None) -> str:
    """A dataset written directly with ShardWriter (random spectrograms, no audio, no Ray)."""
    loc = Location.parse(str(path))
    loc.makedirs()
    loc.write_json("manifest.json", {"format": "genrecls-dataset", "features": asdict(features),
                                     "labels": sorted(set(labels)), "counts": {}})
    rng = np.random.default_rng(0)
    sf = shard_features or features
    if labels:
        writer = ShardWriter(loc, "part-0.parquet", sf)
        for i, label in enumerate(labels):
            writer.add_track(track_id=f"t{i:03d}", path=f"{label}/t{i}.wav", label=label, fingerprint="f", size=1,
                             mtime_ns=1, duration=3.0, mels=rng.normal(-40, 10, (3, *sf.mel_shape)), starts=[0, 1, 2])
        writer.close()
        if drop:
            file = loc.join("shards", "part-0.parquet")
            pf = pq.ParquetFile(file)
            meta = pf.metadata.metadata
            table = pf.read().drop_columns([drop])
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), TRACKS_KEY: meta[TRACKS_KEY]})
            pq.write_table(table, file)
    return str(path)


BAD_INPUT = {
    "no dataset": (lambda p, f: str(p / "nothing-here"), DatasetError, "not a genrecls dataset"),
    "empty": (lambda p, f: _fake_dataset(p / "ds", f, []), DatasetError, "is empty"),
    "one label": (lambda p, f: _fake_dataset(p / "ds", f, ["rock"] * 6), DatasetError, r"only one label \('rock'"),
    "missing column": (lambda p, f: _fake_dataset(p / "ds", f, ["rock", "jazz"] * 4, drop="label"), DatasetError,
                       r"lacks column\(s\) \['label'\]"),
    "mismatched shard": (lambda p, f: _fake_dataset(p / "ds", f, ["rock", "jazz"] * 4,
                                                    shard_features=FeatureConfig(**{**asdict(f), "n_mels": 16})),
                         DatasetError, "mismatched feature configuration"),
    "too few tracks": (lambda p, f: _fake_dataset(p / "ds", f, ["rock"] * 6 + ["jazz"] * 2), SplitError,
                       r"label 'jazz' has 2 tracks; at least 3"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_fails_before_any_worker(case, tmp_path, small_cfg):
    from genrecls.jobs.training import train

    make, error, message = BAD_INPUT[case]
    dataset = make(tmp_path, small_cfg.features)
    run = tmp_path / "run"
    t0 = time.monotonic()
    with pytest.raises(error, match=message):
        train(dataset, str(run), small_cfg, workers=2, progress=False)
    assert time.monotonic() - t0 < 10
    assert not run.exists()  # nothing started, nothing written


def test_config_that_contradicts_the_dataset_is_refused(tmp_path, small_cfg):
    from genrecls.jobs.training import train

    ds = _fake_dataset(tmp_path / "ds", small_cfg.features, ["rock", "jazz", "pop"] * 3)
    with pytest.raises(DatasetError, match="other feature settings.*n_mels: dataset 32, asked 64"):
        train(ds, str(tmp_path / "run"), small_cfg.with_section(features={"n_mels": 64}), progress=False)
    with pytest.raises(ConfigError, match="unknown model 'resnet'"):
        train(ds, str(tmp_path / "run"), small_cfg.with_section(train={"model": "resnet"}), progress=False)
    with pytest.raises(DatasetError, match=r"lacks column\(s\) \['artist'\]"):
        train(ds, str(tmp_path / "run"), small_cfg.with_section(train={"group_column": "artist"}), progress=False)
    with pytest.raises(FileNotFoundError, match="no run to resume"):
        train(ds, str(tmp_path / "run"), small_cfg, resume=True, progress=False)
    assert not (tmp_path / "run").exists()


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, small_cfg, capsys):
    from genrecls.cli import main

    ds = _fake_dataset(tmp_path / "ds", small_cfg.features, ["rock"] * 5)
    assert main(["train", ds, "--out", str(tmp_path / "run"), "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "genrecls train: error:" in err and "only one label" in err


def test_evaluate_refuses_a_dataset_with_other_features(trained, tmp_path, small_cfg):
    from genrecls.models.evaluation import EvaluationError, evaluate_run

    run, _ = trained
    other = _fake_dataset(tmp_path / "other", small_cfg.features, ["rock", "jazz"] * 3)  # segment_hop differs
    with pytest.raises(EvaluationError, match="other feature settings than the run.*segment_hop"):
        evaluate_run(run, other)


def test_track_weights_give_every_track_and_label_the_same_weight():
    from genrecls.jobs.training import segment_weights as _segment_weights

    tracks = [{"track_id": "a1", "label": "a", "n_segments": 100}, {"track_id": "a2", "label": "a", "n_segments": 2},
              {"track_id": "b1", "label": "b", "n_segments": 10}, {"track_id": "v", "label": "b", "n_segments": 50},
              {"track_id": "e", "label": "b", "n_segments": 0}]
    split = {"a1": "train", "a2": "train", "b1": "train", "v": "val", "e": "train"}
    n = {t["track_id"]: t["n_segments"] for t in tracks}
    w = _segment_weights(tracks, split, by_label=True)
    assert set(w) == {"a1", "a2", "b1"}  # training tracks with segments only
    per_track = {t: w[t] * n[t] for t in w}
    assert per_track["a1"] == pytest.approx(per_track["a2"])  # a 100-segment track counts as a 2-segment one
    assert per_track["a1"] + per_track["a2"] == pytest.approx(per_track["b1"])  # and each label the same
    assert sum(per_track.values()) == pytest.approx(112)  # mean weight per segment 1
    w = _segment_weights(tracks, split, by_label=False)
    assert w["a1"] * 100 == pytest.approx(w["b1"] * 10) == pytest.approx(112 / 3)
