"""Classify at the machine's full width and from the embedding store (issue 26).

Real audio (16 kHz WAV written here, and the committed real-encoder files), a real ingest with
the pretrained backbone on the inference engine, a real frozen-backbone run trained on it, real
Ray (the session's 2-CPU local Ray, and the CLI's own), real Parquet.  Whether a file was
decoded is read from what ran, or shown by overwriting a file's bytes with noise while keeping
its size and modification time: only a run that never decodes it can still score it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from genrecls.core.config import Config
from genrecls.jobs.classify import classify
from genrecls.storage.dataset import Dataset
from genrecls.storage.predictions import read_predictions

REPO = Path(__file__).resolve().parents[1]
ENCODERS = REPO / "tests" / "data" / "encoders"
#: a quick head: one candidate, one strength (the choice itself is test_head's)
TRAIN = ["train.head_candidates=[\"penultimate\"]", "train.head_c=[0.1]", "ingest.tracks_per_task=3"]


def cfg(*more: str) -> Config:
    return Config().override([*TRAIN, *more])


def by_path(table) -> dict[str, dict]:
    return {r["path"]: r for r in table.to_pylist()}


def probs(row: dict) -> np.ndarray:
    return np.array([v for k, v in sorted(row.items()) if k.startswith("prob_")], np.float64)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """3 genres x 4 tracks x 7 s (16 kHz WAV): 2 musicnn segments each."""
    from genrecls.audio.sample_data import make_sample_collection

    root = tmp_path_factory.mktemp("store") / "lib"
    make_sample_collection(str(root), genres=3, tracks_per_genre=4, seconds=7.0, sr=16000, formats=("wav",), seed=5)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, library, ray_local):
    from genrecls.jobs.ingest import ingest

    out = tmp_path_factory.mktemp("store-ds") / "ds"
    s = ingest(str(library), str(out), cfg(), progress=False)
    assert (s.added, s.failed, s.embeddings) == (12, 0, "computed")
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory, dataset, ray_local):
    from genrecls.jobs.training import train

    out = tmp_path_factory.mktemp("store-run") / "run"
    train(str(dataset), str(out), cfg(), progress=False)
    return out


@pytest.fixture(scope="module")
def computed(tmp_path_factory, library, run, ray_local):
    """The library classified without a dataset: every track decoded and its backbone run (Ray tasks)."""
    out = tmp_path_factory.mktemp("store-pred") / "computed"
    summary = classify(str(library), str(run), str(out), cfg(), progress=False)
    assert summary["classified"] == 12 and summary["from_store"] == 0
    return summary, by_path(read_predictions(out))


def test_classify_runs_the_whole_chain_in_every_cpu_task(library, run, ray_local, tmp_path, pauses):
    """Given 2 CPUs, two processes run the backbone at once (each held inside its task while the other
    arrives), one engine thread each, as the run's summary reads back."""
    out = tmp_path / "pred"
    pauses.arm("classify-featurise")
    done: dict = {}
    worker = threading.Thread(target=lambda: done.update(s=classify(str(library), str(run), str(out), cfg(),
                                                                    progress=False)))
    worker.start()
    try:
        first = pauses.wait("classify-featurise", worker.is_alive)
        pauses.arm("classify-featurise")  # a second task reaches it while the first is held: another process
        second = pauses.wait("classify-featurise", worker.is_alive)
        assert first != second and os.getpid() not in (first, second)
    finally:
        pauses.reset()
        worker.join(timeout=600)
    s = done["s"]
    assert s["classified"] == 12 and s["ran"] == "ray tasks" and s["processes"] >= 2
    assert s["engine"]["engine"] != "none" and s["engine"]["threads"] == 1  # the CPU Ray gave each task


def test_stored_tracks_are_scored_from_the_store_as_if_computed(library, dataset, run, computed, tmp_path):
    """--dataset scores every stored track from its stored layers: the same answers as computing them, and a
    file whose bytes are now noise (size and modification time kept) is not even opened for decoding."""
    lib = tmp_path / "lib"
    shutil.copytree(library, lib)
    victim = sorted(lib.rglob("*.wav"))[0]
    st = victim.stat()
    victim.write_bytes(np.random.default_rng(0).bytes(st.st_size))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    # the dataset's tracks are found by their absolute path: a copy of the library is another library
    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)
    manifest = json.loads((ds / "manifest.json").read_text())
    (ds / "manifest.json").write_text(json.dumps({**manifest, "root": str(lib)}))
    out = tmp_path / "pred"
    s = classify(str(lib), str(run), str(out), cfg(f"classify.dataset={json.dumps(str(ds))}"), progress=False)
    assert s["classified"] == 12 and s["failed"] == 0 and s["from_store"] == 12
    assert s["store"]["used"] and s["store"]["stored"] == 12 and s["store"]["computed"] == 0
    assert s["engine"]["engine"] == "none"  # no backbone ran
    stored, (_, reference) = by_path(read_predictions(out)), computed
    assert set(stored) == set(reference)
    for path, row in stored.items():
        ref = reference[path]
        assert row["top_genre"] == ref["top_genre"] and row["n_segments"] == ref["n_segments"]
        # float16 layers against the engine's float32 ones
        assert np.abs(probs(row) - probs(ref)).max() < 2e-3, path
        assert np.allclose(row["embedding"], ref["embedding"], rtol=1e-2, atol=1e-2)


def test_changed_and_new_files_are_computed_the_rest_read_from_the_store(library, dataset, run, computed, tmp_path):
    from genrecls.audio.sample_data import synthesize, write_audio

    lib = tmp_path / "lib"
    shutil.copytree(library, lib)
    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)
    manifest = json.loads((ds / "manifest.json").read_text())
    (ds / "manifest.json").write_text(json.dumps({**manifest, "root": str(lib)}))
    changed = sorted(lib.rglob("*.wav"))[1]
    write_audio(str(changed), synthesize("rock", 7.0, seed=42), 16000)  # other audio, a new stat
    (lib / "new").mkdir()
    write_audio(str(lib / "new" / "n.wav"), synthesize("jazz", 7.0, seed=43), 16000)
    out = tmp_path / "pred"
    s = classify(str(lib), str(run), str(out), cfg(f"classify.dataset={json.dumps(str(ds))}"), progress=False)
    assert s["classified"] == 13 and s["from_store"] == 11
    assert s["store"]["computed_why"] == {"changed since it was ingested": 1, "not in the dataset": 1}
    rows = by_path(read_predictions(out))
    rel = changed.relative_to(lib).as_posix()
    assert rows[rel]["size"] == changed.stat().st_size  # scored as it is now, not as stored
    assert np.abs(probs(rows[rel]) - probs(computed[1][rel])).max() > 1e-3  # not the stored track's answer


@pytest.mark.parametrize("other", ["backbone", "features"])
def test_a_store_of_another_backbone_or_features_is_named_and_not_used(other, library, dataset, run, small_cfg,
                                                                       tmp_path, caplog):
    from dataclasses import asdict

    from genrecls.models.engine import BACKBONE_OUTPUTS, backbone_id
    from genrecls.storage.embeddings import stored_embedding

    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)
    features = Dataset(str(ds)).feature_config()
    how = (stored_embedding("part-x.parquet", "other-backbone-0000", features, BACKBONE_OUTPUTS, {})
           if other == "backbone" else stored_embedding("part-x.parquet", backbone_id(), small_cfg.features,
                                                        BACKBONE_OUTPUTS, {}))
    entry = {f"embedding_{k}": v for k, v in asdict(how).items() if k != "part"}
    Dataset(str(ds)).commit(update={t: entry for t in Dataset(str(ds)).tracks()})  # the store's every entry
    s = classify(str(library), str(run), str(tmp_path / "p"), cfg(f"classify.dataset={json.dumps(str(ds))}"),
                 progress=False)
    named = "other-backbone-0000" if other == "backbone" else "another feature configuration"
    assert not s["store"]["used"] and named in s["store"]["reason"], s["store"]
    assert s["classified"] == 12 and s["from_store"] == 0  # computed, never mixed
    assert any(named in r.getMessage() for r in caplog.records)


def test_a_model_on_spectrograms_says_so_and_computes(library, sample_dataset, small_cfg, tmp_path):
    from conftest import constant_run

    labels = ["a", "b"]
    cnn = constant_run(tmp_path / "cnn", small_cfg.features, labels)
    s = classify(str(library), str(cnn), str(tmp_path / "p"),
                 small_cfg.override([f"classify.dataset={json.dumps(str(sample_dataset))}"]), progress=False)
    assert not s["store"]["used"] and "scores spectrograms" in s["store"]["reason"]
    assert s["classified"] == 12 and s["from_store"] == 0


def test_files_genrecls_tagged_are_neither_decoded_nor_embedded_again(run, tmp_path):
    """Real-encoder files (lame, ffmpeg, flac, oggenc, opusenc): ingest, classify from the store, tag --apply;
    then classify and ingest again leave every tagged file alone (their audio did not change)."""
    lib = tmp_path / "lib"
    picks = ["mp3/lame_vbr_v2_xing.mp3", "mp3/id3v24_cover.mp3", "flac/flac_seektable.flac",
             "ogg/oggenc_mono_22k.ogg", "opus/opusenc_48k_stereo.opus", "wav/" + sorted(
                 p.name for p in (ENCODERS / "wav").iterdir())[0]]
    for i, rel in enumerate(picks):
        dst = lib / ("a", "b", "c")[i % 3] / Path(rel).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ENCODERS / rel, dst)
    ds, pred = tmp_path / "ds", tmp_path / "pred"
    env = {**os.environ, "RAY_ADDRESS": ""}

    def cli(*args: str) -> subprocess.CompletedProcess:
        res = subprocess.run([sys.executable, "-m", "genrecls", *args, "-q"], capture_output=True, text=True,
                             cwd=REPO, env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert not res.stderr.strip(), res.stderr[-3000:]  # a healthy run: no line from Ray or any library
        return res

    cli("ingest", str(lib), "--out", str(ds))
    cli("classify", str(lib), "--model", str(run), "--out", str(pred), "--dataset", str(ds))
    first = json.loads((pred / "classify.json").read_text())["last_run"]
    assert first["from_store"] == first["classified"] == len(picks)
    cli("tag", str(pred), "--apply")
    again = cli("classify", str(lib), "--model", str(run), "--out", str(pred), "--dataset", str(ds))
    last = json.loads((pred / "classify.json").read_text())["last_run"]
    assert last["skipped_done"] == len(picks) and last["classified"] == 0, again.stdout
    res = cli("ingest", str(lib), "--out", str(ds))
    assert f"{len(picks)} tracks found, {len(picks)} already in the dataset" in res.stdout, res.stdout
    assert "0 processed" in res.stdout
    # a new predictions folder with --dataset also takes the tagged files from the store
    cli("classify", str(lib), "--model", str(run), "--out", str(tmp_path / "pred2"), "--dataset", str(ds))
    fresh = json.loads((tmp_path / "pred2" / "classify.json").read_text())["last_run"]
    assert fresh["from_store"] == len(picks)


def test_one_clip_runs_in_the_commands_own_process(run, library, tmp_path):
    """A classify of one new file starts no Ray: the engine gets the process's CPUs."""
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy2(sorted(library.rglob("*.wav"))[0], one / "clip.wav")
    res = subprocess.run([sys.executable, "-m", "genrecls", "classify", str(one), "--model", str(run), "--out",
                          str(tmp_path / "p"), "-q"], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "RAY_ADDRESS": ""}, timeout=300)
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr[-3000:]
    last = json.loads((tmp_path / "p" / "classify.json").read_text())["last_run"]
    assert last["ran"] == "in this process" and last["processes"] == 1 and last["classified"] == 1
    assert last["engine"]["threads"] == len(os.sched_getaffinity(0))
