"""Classification of a library as a streaming Ray job (issue 4) and its kill-and-resume fault (issue 6).

A real model is trained here (a tiny tf-keras CNN fitted on the ``sample_dataset`` segments)
and exported with :func:`genrecls.models.inference.export_model`; the library is real audio written
by the tests (MP3, WAV, FLAC, OGG) plus broken files; Ray is the session's real local Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from genrecls.audio.discovery import track_id_for
from genrecls.audio.sample_data import make_sample_collection, synthesize, write_audio
from genrecls.core.config import Config
from genrecls.jobs.classify import classify, resolve_run
from genrecls.models.inference import Predictor, aggregate_tracks, export_model
from genrecls.storage.dataset import Dataset, mel_array
from genrecls.storage.location import Location
from genrecls.storage.locks import LockedError, folder_lock
from genrecls.storage.predictions import CSV_NAME, PARTS, read_predictions

REPO = Path(__file__).resolve().parents[1]
GENRES = ["classical", "electronic", "jazz", "rock"]
BROKEN = {"broken/empty.mp3", "broken/noise.wav"}
#: a file cut short: its decodable third is classified, with a warning (decode.on_truncated = keep)
DAMAGED = {"broken/cut.flac"}
N_GOOD = 22  # tracks with a prediction (the damaged one included)
#: small batches so parts fill often: the kill test needs several parts
TEST_CLASSIFY = {"max_segments": 8, "batch_size": 24, "tracks_per_task": 2, "part_rows": 4, "top_k": 3}


def train_tiny_model(dataset: Path, run: Path, *, epochs: int = 12, seed: int = 0) -> dict:
    """Fit a small CNN on a dataset's segments (raw dB in, softmax out) and export it as a run."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tf_keras as keras

    ds = Dataset(str(dataset))
    features = ds.feature_config()
    table = ds.read_segments(columns=["label", "mel"])
    x = mel_array(table.column("mel"), features.mel_shape)
    labels = sorted(set(table.column("label").to_pylist()))
    y = np.array([labels.index(v) for v in table.column("label").to_pylist()])
    keras.utils.set_random_seed(seed)
    norm = keras.layers.Normalization(axis=None)
    norm.adapt(x)
    model = keras.Sequential([
        keras.Input(features.mel_shape),
        norm,
        keras.layers.Reshape((*features.mel_shape, 1)),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(len(labels), activation="softmax"),
    ])
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=16, shuffle=True, verbose=0)
    return export_model(model, str(run), labels=labels, features=features, model_name="tiny-test")


@pytest.fixture(scope="module")
def trained_run(sample_dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "run"
    train_tiny_model(sample_dataset, run)
    return run


@pytest.fixture(scope="module")
def library(sample_library, tmp_path_factory):
    """Training tracks at their dataset paths, unseen tracks two folders deep, a long track, broken files."""
    root = tmp_path_factory.mktemp("classify") / "lib"
    for genre in GENRES:  # two tracks per genre that the model was trained on (evaluation check)
        for src in sorted((Path(sample_library) / genre).iterdir())[:2]:
            (root / genre).mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / genre / src.name)
    make_sample_collection(str(root / "unseen" / "deep"), genres=4, tracks_per_genre=3, seconds=6.0, seed=11)
    (root / "long").mkdir()
    write_audio(str(root / "long" / "rock_long.flac"), synthesize("rock", 20.0, seed=99), 44100)
    (root / "broken").mkdir()
    (root / "broken" / "empty.mp3").write_bytes(b"")
    (root / "broken" / "noise.wav").write_bytes(np.random.default_rng(0).bytes(50_000))
    good = (root / "unseen" / "deep" / "jazz" / "jazz_000.flac").read_bytes()
    (root / "broken" / "cut.flac").write_bytes(good[: len(good) // 3])
    (root / "broken" / "notes.txt").write_text("not audio; ignored")
    return root


def good_paths(root: Path) -> set[str]:
    paths = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.suffix != ".txt"}
    return paths - BROKEN


def classify_cfg(small_cfg) -> Config:
    return small_cfg.with_section(classify=TEST_CLASSIFY)


@pytest.fixture(scope="module")
def first(library, trained_run, small_cfg, ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("predictions") / "pred"
    summary = classify(str(library), str(trained_run), str(out), classify_cfg(small_cfg), progress=False)
    return summary, out


def test_one_row_per_good_track_failures_for_broken_ones(first, library, trained_run):
    summary, out = first
    table = read_predictions(out)
    rows = table.to_pylist()
    paths = [r["path"] for r in rows]
    assert Counter(paths).most_common(1)[0][1] == 1
    assert set(paths) == good_paths(library)
    assert summary["classified"] == len(rows) == summary["tracks_total"] == N_GOOD
    # broken files: recorded with a reason, the job went on
    fails = pq.read_table(out / "failures").to_pylist()
    assert {f["path"] for f in fails} == BROKEN
    kinds = {f["path"]: f["kind"] for f in fails}
    assert kinds["broken/empty.mp3"] == "empty" and kinds["broken/noise.wav"] == "undecodable"
    assert all(f["reason"] for f in fails)
    assert summary["failed"] == 2 and sum(summary["failures_by_kind"].values()) == 2
    # the damaged file: classified from the audio it holds, with a warning saying what is off
    warnings = pq.read_table(out / "warnings").to_pylist()
    assert [(w["path"], w["kind"]) for w in warnings] == [("broken/cut.flac", "truncated")]
    assert "header declares" in warnings[0]["reason"] and summary["warned"] == 1
    # the engine that scored is recorded next to the predictions (the run's model.onnx on a runtime, or TensorFlow)
    info = json.loads((out / "classify.json").read_text())
    assert info["last_run"]["engine"] == summary["engine"]
    assert summary["engine"]["engine"] in ("openvino", "onnxruntime", "tensorflow") and summary["engine"]["threads"] >= 1
    # probabilities sum to 1, top-1 and top-k agree with them
    labels = Predictor(str(trained_run)).labels
    assert labels == GENRES
    probs = np.array([[r[f"prob_{g}"] for g in labels] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    for r, p in zip(rows, probs):
        assert r["genre"] == labels[int(np.argmax(p))]
        assert r["confidence"] == pytest.approx(p.max())
        assert [e["genre"] for e in r["top_k"]] == [labels[j] for j in np.argsort(-p, kind="stable")[:3]]
        assert [e["probability"] for e in r["top_k"]] == pytest.approx(sorted(p, reverse=True)[:3])
        assert r["track_id"] == track_id_for(r["path"])
        assert r["model_id"] == summary["model_id"] and r["classified_at"] is not None
    # long tracks are scored on at most max_segments evenly spaced segments
    by_path = {r["path"]: r for r in rows}
    assert by_path["long/rock_long.flac"]["n_segments"] == TEST_CLASSIFY["max_segments"]
    assert by_path["long/rock_long.flac"]["duration"] == pytest.approx(20.0, abs=0.05)
    assert {r["n_segments"] for p, r in by_path.items() if not p.startswith(("long/", "broken/"))} == {6}
    # unseen tracks of a separable set: mostly right (chance is 25%)
    unseen = [r for r in rows if r["path"].startswith("unseen/")] + [by_path["long/rock_long.flac"]]
    truth = [r["path"].split("/")[2] if r["path"].startswith("unseen/") else "rock" for r in unseen]
    accuracy = np.mean([r["genre"] == t for r, t in zip(unseen, truth)])
    assert accuracy >= 0.75, (accuracy, [(r["path"], r["genre"]) for r in unseen])
    assert sum(summary["genre_distribution"].values()) == N_GOOD
    assert (out / "config.json").is_file() and (out / "classify.json").is_file()
    assert Config.from_dict(__import__("json").loads((out / "config.json").read_text())).features.n_mels == 32


def test_predictions_equal_the_evaluation_rule_on_dataset_segments(first, sample_dataset, trained_run):
    """Same decoding and features as ingest: classify == mean of the model's probabilities on stored segments."""
    _, out = first
    table = read_predictions(out)
    labels = GENRES
    mine = {r["track_id"]: [r[f"prob_{g}"] for g in labels] for r in table.to_pylist() if r["path"].split("/")[0] in GENRES}
    assert len(mine) == 8
    ds = Dataset(str(sample_dataset))
    seg = ds.read_segments(columns=["track_id", "mel"])
    keep = [i for i, t in enumerate(seg.column("track_id").to_pylist()) if t in mine]
    seg = seg.take(keep)
    probs = Predictor(str(trained_run)).predict(mel_array(seg.column("mel"), ds.feature_config().mel_shape))
    ids, track_probs = aggregate_tracks(seg.column("track_id").to_pylist(), probs)
    for tid, p in zip(ids, track_probs):
        np.testing.assert_allclose(mine[tid], p, atol=1e-5)


def test_rerun_adds_nothing_then_only_new_or_changed_files(first, library, trained_run, small_cfg, tmp_path):
    _, out = first
    lib, out2 = tmp_path / "lib", tmp_path / "pred"
    shutil.copytree(library, lib)  # copy2 keeps sizes and mtimes: the same tracks to classify
    shutil.copytree(out, out2)
    cfg = classify_cfg(small_cfg)
    before = read_predictions(out2)
    again = classify(str(lib), str(trained_run), str(out2), cfg, progress=False)
    assert again["classified"] == 0 and again["failed"] == 0
    assert again["skipped_done"] == N_GOOD and again["skipped_known_failures"] == 2
    assert read_predictions(out2).sort_by("path").equals(before.sort_by("path"))
    # two new files and one changed file: only those are classified
    (lib / "new" / "sub").mkdir(parents=True)
    write_audio(str(lib / "new" / "sub" / "a.ogg"), synthesize("jazz", 4.0, seed=501), 44100)
    write_audio(str(lib / "new" / "b.wav"), synthesize("classical", 4.0, seed=502), 44100)
    changed = lib / "unseen" / "deep" / "rock" / "rock_001.wav"
    write_audio(str(changed), synthesize("rock", 5.0, seed=503), 44100)
    gone = next((lib / "unseen" / "deep" / "classical").iterdir())
    gone.unlink()  # and one file removed: --prune drops its prediction
    third = classify(str(lib), str(trained_run), str(out2), cfg, prune=True, progress=False)
    assert third["classified"] == 3 and third["skipped_done"] == N_GOOD - 2  # less the changed and the removed
    table = read_predictions(out2)
    paths = table.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == N_GOOD + 1 == third["tracks_total"]
    assert gone.relative_to(lib).as_posix() not in paths
    row = {r["path"]: r for r in table.to_pylist()}["unseen/deep/rock/rock_001.wav"]
    assert row["mtime_ns"] == changed.stat().st_mtime_ns and row["n_segments"] == 5
    assert third["rows_superseded"] == 2  # the changed file's old row and the removed file's row


def test_another_model_reclassifies_and_replaces_the_old_predictions(first, library, sample_dataset, small_cfg, tmp_path):
    _, out = first
    lib, out2 = tmp_path / "lib", tmp_path / "pred"
    shutil.copytree(library / "unseen" / "deep" / "jazz", lib / "unseen" / "deep" / "jazz")
    shutil.copytree(out, out2)
    other = train_tiny_model(sample_dataset, tmp_path / "run2", epochs=1)
    summary = classify(str(lib), str(tmp_path / "run2"), str(out2), classify_cfg(small_cfg), progress=False)
    assert summary["skipped_done"] == 0 and summary["classified"] == 3
    table = read_predictions(out2)
    assert sorted(table.column("path").to_pylist()) == sorted(f"unseen/deep/jazz/{p.name}" for p in lib.rglob("*.*"))
    assert set(table.column("model_id").to_pylist()) == {other["model_id"]}
    assert summary["rows_superseded"] == N_GOOD  # an output folder holds the predictions of one model


def test_killed_half_way_and_rerun_with_a_worker_killed_every_track_has_one_prediction(library, trained_run, small_cfg, ray_local, tmp_path, pauses):
    out = tmp_path / "pred"
    address = ray_local.get_runtime_context().gcs_address
    sets = [f"classify.{k}={v}" for k, v in TEST_CLASSIFY.items()]
    cmd = [sys.executable, "-m", "genrecls", "classify", str(library), "--model", str(trained_run), "--out", str(out),
           "--address", address, "-q"] + [x for s in sets for x in ("--set", s)]
    pauses.arm("classify-part-written")  # the driver waits there once its first part is written
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        assert pauses.wait("classify-part-written", proc) == proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done_before = read_predictions(out).num_rows
    assert 0 < done_before < N_GOOD, "the run was not stopped half-way"
    # the re-run loses a decoding worker too: SIGKILL of the Ray worker held inside its first decoding task
    pauses.arm("classify-featurise")
    done: dict = {}
    run = threading.Thread(target=lambda: done.update(s=classify(str(library), str(trained_run), str(out),
                                                                 classify_cfg(small_cfg), progress=False)))
    run.start()
    pid = pauses.wait("classify-featurise", run.is_alive)
    assert pid != os.getpid() and "classify_batch" in " ".join(psutil.Process(pid).cmdline()[:1])
    os.kill(pid, signal.SIGKILL)
    run.join(timeout=600)
    summary = done["s"]
    assert summary["skipped_done"] == done_before and summary["classified"] == N_GOOD - done_before
    paths = read_predictions(out).column("path").to_pylist()
    assert sorted(paths) == sorted(good_paths(library))  # every track exactly once
    assert not [p for p in (out / PARTS).iterdir() if p.name.startswith(".tmp-")]
    assert {f["path"] for f in pq.read_table(out / "failures").to_pylist()} == BROKEN


def test_job_script_strict_and_csv(first, library, trained_run, ray_local, tmp_path):
    """jobs/classify.py runs the CLI on the cluster it is in; --strict exits 1 for broken files; --csv."""
    _, out = first
    out2 = tmp_path / "pred"
    shutil.copytree(out, out2)
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    res = subprocess.run([sys.executable, str(REPO / "jobs" / "classify.py"), str(library), "--model", str(trained_run),
                          "--out", str(out2), "--csv", "--strict", "-q"], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300)
    assert res.returncode == 1, res.stderr
    assert "--strict: 2 file(s)" in res.stderr and "genre distribution" in res.stdout
    csv = pacsv.read_csv(out2 / CSV_NAME)
    parquet = read_predictions(out2)
    assert csv.num_rows == parquet.num_rows == N_GOOD
    assert sorted(csv.column("path").to_pylist()) == sorted(parquet.column("path").to_pylist())
    assert {f"prob_{g}" for g in GENRES} <= set(csv.column_names)
    first_row = csv.slice(0, 1).to_pylist()[0]
    assert first_row["top_k"].split(";")[0].split(":")[0] == first_row["genre"]


def test_run_level_errors_are_clear(library, trained_run, small_cfg, ray_local, tmp_path):
    out = tmp_path / "pred"
    with folder_lock(Location.parse(str(out)), "another classify"):
        with pytest.raises(LockedError, match="another classify"):
            classify(str(library), str(trained_run), str(out), classify_cfg(small_cfg), progress=False)
    with pytest.raises(FileNotFoundError, match="neither a genrecls run"):
        resolve_run(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        classify(str(tmp_path / "nowhere"), str(trained_run), str(out), progress=False)
    gpu = classify_cfg(small_cfg).with_section(classify={"gpu": True})
    if not ray_local.cluster_resources().get("GPU"):
        with pytest.raises(ValueError, match="no GPU"):
            classify(str(library), str(trained_run), str(out), gpu, progress=False)


def test_sigterm_stops_classify_with_one_line_and_the_same_command_finishes(library, trained_run, small_cfg, tmp_path,
                                                                            pauses):
    """SIGTERM to the CLI (its own embedded Ray): parts scored so far stay, one line, the re-run adds the rest."""
    out = tmp_path / "pred"
    sets = [f"classify.{k}={v}" for k, v in TEST_CLASSIFY.items()]
    cmd = [sys.executable, "-m", "genrecls", "classify", str(library), "--model", str(trained_run), "--out", str(out),
           "--workers", "1", "-q"] + [x for s in sets for x in ("--set", s)]
    pauses.arm("classify-part-written")  # the driver waits there once its first part is written
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert pauses.wait("classify-part-written", proc) == proc.pid
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    # the stop is one line, and the only one: no line of Ray's (the CPU path has no actor whose constructor
    # arguments sit in the object store: ray-project/ray#57733)
    assert len(lines) == 1 and lines[0].startswith("genrecls classify: stopped by SIGTERM: "), stderr[-3000:]
    assert "kept in" in lines[-1] and "run the same command again to resume" in lines[-1]
    done_before = read_predictions(out).num_rows
    assert 0 < done_before < N_GOOD, "the run was not stopped half-way"
    assert not [p for p in (out / PARTS).iterdir() if p.name.startswith(".tmp-")]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(read_predictions(out).column("path").to_pylist()) == sorted(good_paths(library))


def test_a_decoder_stuck_in_native_code_is_stopped_by_the_watchdog(library, trained_run, small_cfg, ray_local,
                                                                     tmp_path, pauses):
    """A decoding that never returns (held at a pause point, where the in-task deadline cannot reach it):
    the task's watchdog names the file and ends the worker; the retried batch records the file as
    timed_out and classifies the rest of the batch."""
    lib = tmp_path / "lib"
    lib.mkdir()
    names = sorted(p.name for p in (library / "unseen" / "deep" / "jazz").iterdir())
    for name in names:
        shutil.copy2(library / "unseen" / "deep" / "jazz" / name, lib / name)
    out = tmp_path / "pred"
    # one batch of every file; the watchdog's budget: twice a 5-s deadline, no margin
    cfg = classify_cfg(small_cfg).with_section(
        classify={"tracks_per_task": len(names)},
        decode={"timeout_seconds": 5.0, "timeout_seconds_per_mb": 0.0, "watchdog_margin_seconds": 0.0})
    pauses.arm("classify-decode-track")  # the first file a decoding task reaches never returns
    summary = classify(str(lib), str(trained_run), str(out), cfg, progress=False)
    fails = pq.read_table(out / "failures").to_pylist()
    assert [f["kind"] for f in fails] == ["timed_out"], fails
    assert "did not finish within 10 s" in fails[0]["reason"] and "its worker was stopped" in fails[0]["reason"]
    stuck = fails[0]["path"]
    assert sorted(read_predictions(out).column("path").to_pylist()) == sorted(set(names) - {stuck})
    assert summary["failures_by_kind"] == {"timed_out": 1}
    held = [int(p.name.split(".")[-2]) for p in pauses.folder.glob("classify-decode-track.*.paused")]
    assert len(held) == 1 and not psutil.pid_exists(held[0])  # the stuck worker process was ended
    assert not list((out / ".watchdog").glob("*"))  # cleared at the end of the run
