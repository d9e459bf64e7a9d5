"""The ingest job end to end on a real local Ray: rows, metadata, increments, resume, manifests, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from genrecls.audio.discovery import track_id_for
from genrecls.audio.pipeline import fingerprint_file, track_features
from genrecls.audio.sample_data import make_sample_collection, synthesize, write_audio
from genrecls.core.config import Config, load_config
from genrecls.jobs.ingest import ingest
from genrecls.storage.dataset import (
    FEATURES_KEY,
    TRACKS_KEY,
    Dataset,
    DatasetError,
    mel_array,
)


def content(out) -> list[tuple]:
    """Every row of a dataset's newest version by content: (track_id, segment_index, path, label, start, sha1 of the
    mel bytes).  (Its shards may hold older rows of changed or pruned tracks: readers go through the index.)"""
    t = Dataset(str(out)).read_segments()
    mel = t.column("mel")
    rows = []
    for i, r in enumerate(t.drop(["mel"]).to_pylist()):
        values = mel[i].values.to_numpy(zero_copy_only=False)
        rows.append((r["track_id"], r["segment_index"], r["path"], r["label"], r["start_seconds"],
                     hashlib.sha1(values.tobytes()).hexdigest()))
    return sorted(rows)


def no_temporaries(out) -> bool:
    return not [n for folder in ("shards", "failures") if os.path.isdir(os.path.join(out, folder))
                for n in os.listdir(os.path.join(out, folder)) if n.startswith(".tmp-")]


@pytest.fixture
def small_library(tmp_path):
    root = tmp_path / "lib"
    make_sample_collection(str(root), genres=2, tracks_per_genre=3, seconds=3.0, seed=5)
    return root


def test_the_sample_dataset_rows_and_metadata(sample_dataset, sample_library, small_cfg):
    ds = Dataset(str(sample_dataset))
    m = ds.manifest()
    f = small_cfg.features
    assert m["counts"]["tracks"] == 24 and m["counts"]["segments"] == 24 * 6
    assert m["labels"] == ["classical", "electronic", "jazz", "rock"]
    assert m["features"] == json.loads(json.dumps(f.__dict__)) and m["mel_shape"] == [32, 32]
    assert m["counts"]["per_label"]["rock"] == {"tracks": 6, "segments": 36, "audio_seconds": pytest.approx(36.0, abs=0.01)}
    assert {"numpy", "pyarrow", "av", "ffmpeg", "soxr", "ray"} <= set(m["versions"])
    assert load_config(sample_dataset / "config.json").features == f  # the resolved config, reusable as is
    # shards: feature config in the schema metadata, the track list in the footer
    for path in ds.shard_paths():
        meta = pq.read_metadata(path)
        assert json.loads(pq.read_schema(path).metadata[FEATURES_KEY]) == json.loads(json.dumps(f.__dict__))
        footer = json.loads(meta.metadata[TRACKS_KEY])
        ids = set(pq.read_table(path, columns=["track_id"]).column("track_id").to_pylist())
        assert {t["track_id"] for t in footer} == ids
    # the track index agrees with the files
    table = ds.read_segments()
    assert table.num_rows == 144
    for e in ds.tracks().values():
        src = sample_library / e.path
        assert e.track_id == track_id_for(e.path) and e.label == e.path.split("/")[0]
        assert e.fingerprint == fingerprint_file(str(src)) and e.size == src.stat().st_size
        assert e.n_segments == 6 and e.duration_seconds == pytest.approx(6.0, abs=1e-3)
    rows = table.filter(pc.equal(table.column("path"), "jazz/jazz_003.wav")).sort_by("segment_index")
    assert rows.column("segment_index").to_pylist() == list(range(6))
    assert rows.column("start_seconds").to_pylist() == [float(i) for i in range(6)]
    # stored values are the pipeline's features, cast to float16
    expect = track_features(str(sample_library / "jazz" / "jazz_003.wav"), f).mels
    np.testing.assert_array_equal(mel_array(rows.column("mel"), f.mel_shape), expect.astype(np.float16).astype(np.float32))
    assert no_temporaries(sample_dataset) and ds.failures().num_rows == 0


def test_the_dataset_reads_with_pandas_polars_and_duckdb(sample_dataset):
    import duckdb
    import pandas as pd
    import polars as pl

    shards = str(sample_dataset / "shards")
    assert pd.read_parquet(shards).groupby("label").track_id.nunique().to_dict() == {
        "classical": 6, "electronic": 6, "jazz": 6, "rock": 6}
    assert pl.read_parquet(f"{shards}/*.parquet").select(pl.col("track_id").n_unique()).item() == 24
    assert duckdb.sql(f"select count(*), count(distinct track_id) from '{shards}/*.parquet'").fetchall() == [(144, 24)]


def test_rerun_changed_touched_new_and_pruned_files(small_library, small_cfg, ray_local, tmp_path):
    out = tmp_path / "ds"
    s1 = ingest(str(small_library), str(out), small_cfg, progress=False)
    assert (s1.added, s1.failed, s1.segments_added) == (6, 0, 18)
    first = content(out)
    # unchanged library: nothing to do, same rows
    s2 = ingest(str(small_library), str(out), small_cfg, progress=False)
    assert (s2.skipped_unchanged, s2.processed) == (6, 0)
    assert content(out) == first
    # touched but identical: fingerprinted, not re-processed, not duplicated
    touched = small_library / "rock" / "rock_000.mp3"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    s3 = ingest(str(small_library), str(out), small_cfg, progress=False)
    assert (s3.processed, s3.unchanged_content, s3.added) == (1, 1, 0)
    assert content(out) == first
    assert ingest(str(small_library), str(out), small_cfg, progress=False).processed == 0  # its new stat is kept
    # changed: re-processed, its old rows gone; a new file added
    changed = small_library / "electronic" / "electronic_000.wav"
    write_audio(str(changed), synthesize("electronic", 5.0, seed=99), 44100)
    write_audio(str(small_library / "rock" / "rock_new.flac"), synthesize("rock", 2.0, seed=7), 44100)
    s4 = ingest(str(small_library), str(out), small_cfg, progress=False)
    assert (s4.processed, s4.added, s4.unchanged_content, s4.skipped_unchanged) == (2, 2, 0, 5)
    rows = content(out)
    tid = track_id_for("electronic/electronic_000.wav")
    assert len([r for r in rows if r[0] == tid]) == 5  # the new 5 s version only
    assert len(rows) == 18 - 3 + 5 + 2
    assert len({(r[0], r[1]) for r in rows}) == len(rows)  # no duplicates
    assert Dataset(str(out)).tracks()[tid].fingerprint == fingerprint_file(str(changed))
    # a vanished file keeps its rows unless --prune
    gone = [p for p in (small_library / "electronic").iterdir()][0]
    gone_id = track_id_for(f"electronic/{gone.name}")
    os.remove(gone)
    ingest(str(small_library), str(out), small_cfg, progress=False)
    assert gone_id in {r[0] for r in content(out)}
    s6 = ingest(str(small_library), str(out), small_cfg, progress=False, prune=True)
    assert s6.pruned == 1 and gone_id not in {r[0] for r in content(out)}
    m = Dataset(str(out)).manifest()
    assert m["counts"]["tracks"] == 6 and m["counts"]["segments"] == len(content(out))
    assert no_temporaries(out)


def test_resume_after_an_interrupted_run(sample_dataset, sample_library, small_cfg, ray_local, tmp_path):
    """What a killed run leaves (tracks of shards it wrote but never committed, a half-written temporary) is
    completed exactly, and the orphan shards stay out of every version."""
    out = tmp_path / "ds"
    shutil.copytree(sample_dataset, out)
    ds = Dataset(str(out))
    lost = sorted(ds.tracks())[::2]  # their shards were written, their commit never happened
    ds.commit(delete=lost)
    (out / "shards" / f".tmp-0badc0de-{ds.shard_names()[0]}.partial").write_bytes(b"PAR1 half a shard")
    before = Dataset(str(out)).tracks()
    assert len(before) == 24 - len(lost)
    s = ingest(str(sample_library), str(out), small_cfg, progress=False)
    assert s.added == len(lost) and s.skipped_unchanged == len(before)
    assert content(out) == content(sample_dataset)  # nothing missing, nothing duplicated
    assert no_temporaries(out)


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_manifest_input(small_library, small_cfg, ray_local, tmp_path, kind):
    import pyarrow as pa

    files = sorted(str(p.relative_to(small_library)) for p in small_library.rglob("*.*"))
    paths = files[:4] + ["../../etc/passwd", "nowhere/missing.wav"]
    labels = ["a", "b", "a", None, "x", "y"]
    mpath = small_library / f"list.{kind}"
    if kind == "csv":
        mpath.write_text("path,label\n" + "".join(f"{p},{lab or ''}\n" for p, lab in zip(paths, labels)))
    else:
        pq.write_table(pa.table({"path": paths, "label": labels}), mpath)
    out = tmp_path / "ds"
    s = ingest(str(mpath), str(out), small_cfg, progress=False)
    assert (s.added, s.failed) == (4, 2)
    tracks = {e.path: e.label for e in Dataset(str(out)).tracks().values()}
    assert tracks == dict(zip(files[:4], ["a", "b", "a", None]))
    fails = {r["path"]: r["kind"] for r in Dataset(str(out)).failures().to_pylist()}
    assert fails == {"../../etc/passwd": "outside_root", "nowhere/missing.wav": "missing"}


def test_other_feature_settings_on_the_same_dataset_are_refused(sample_dataset, sample_library, small_cfg, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(sample_dataset, out)
    other = small_cfg.with_section(features={"n_mels": 16})
    with pytest.raises(DatasetError, match="n_mels: dataset 32, asked 16"):
        ingest(str(sample_library), str(out), other, progress=False)


def test_workers_limit_concurrency_on_a_bigger_cluster(ray_local):
    from genrecls.core.scheduling import slots

    cpus = int(ray_local.cluster_resources()["CPU"])
    assert slots(None, 2) == (cpus, 2 * cpus)  # every CPU, two tasks queued per CPU
    assert slots(1, 2) == (1, 1)  # --workers 1: exactly one task at a time
    assert slots(cpus + 5, 2) == (cpus, 2 * cpus)


def test_tasks_fill_whole_rounds_of_the_slots():
    from genrecls.core.scheduling import task_bounds

    for n, per_task, slots in [(600, 32, 2), (120, 32, 2), (101, 8, 3), (7, 4, 2), (33, 32, 1), (1, 32, 4)]:
        bounds = task_bounds(n, per_task, slots)
        assert [t for a, b in bounds for t in range(a, b)] == list(range(n))  # every track once, in order
        sizes = [b - a for a, b in bounds]
        assert max(sizes) <= per_task and max(sizes) - min(sizes) <= 1
        # no last round in which one task runs while the other slots have nothing left to do
        assert len(bounds) % slots == 0 or len(bounds) == n
    # classify's cap on its input blocks: tasks grow past per_task instead of outnumbering the cap
    bounds = task_bounds(10_000, 4, 2, max_tasks=100)
    assert len(bounds) == 100 and {b - a for a, b in bounds} == {100}
    assert task_bounds(0, 4, 2) == []


def test_decoding_runs_with_one_thread_per_native_pool():
    import pyarrow as pa
    from threadpoolctl import threadpool_info, threadpool_limits

    from genrecls.audio.pipeline import one_thread

    before = pa.cpu_count()
    pa.set_cpu_count(3)
    try:
        with threadpool_limits(limits=2):
            with one_thread():
                assert pa.cpu_count() == 1
                assert all(p["num_threads"] == 1 for p in threadpool_info())
            assert pa.cpu_count() == 3  # the caller's settings come back
            assert all(p["num_threads"] == 2 for p in threadpool_info())
    finally:
        pa.set_cpu_count(before)


def test_cli_ingest_strict_and_inspect(small_library, small_cfg, ray_local, tmp_path, capsys):
    from genrecls.cli import main

    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(small_cfg.to_json())
    (small_library / "rock" / "broken.wav").write_text("not audio")
    out = tmp_path / "ds"
    assert main(["ingest", str(small_library), "--out", str(out), "--config", str(cfg_file), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "7 tracks found" in printed and "6 added" in printed and "1 failed" in printed
    assert main(["ingest", str(small_library), "--out", str(out), "--config", str(cfg_file), "-q", "--strict",
                 "--retry-failed"]) == 1
    assert "--strict: 1 file(s) failed" in capsys.readouterr().err
    assert main(["inspect", str(out)]) == 0
    report = capsys.readouterr().out
    assert "electronic" in report and "undecodable" in report and "rock/broken.wav" in report
    assert "8000 Hz" in report and "log-mel 32x32" in report
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["tracks"] == 6
    # run-level problems: a clear message and exit code 2
    assert main(["ingest", str(tmp_path / "nope"), "--out", str(out), "-q"]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "m.csv"
    bad.write_text("file\nx.wav\n")
    assert main(["ingest", str(bad), "--out", str(tmp_path / "ds2"), "-q"]) == 2
    assert "no 'path' column" in capsys.readouterr().err


def test_default_features_end_to_end(ray_local, tmp_path):
    """The tutorial's defaults (22050 Hz, 100000-sample cuts, 128 x 196 log-mel, float16) on one real file."""
    root = tmp_path / "lib"
    os.makedirs(root / "rock")
    write_audio(str(root / "rock" / "song.mp3"), synthesize("rock", 14.0, seed=2), 44100)
    write_audio(str(root / "rock" / "one second.wav"), synthesize("rock", 1.0, seed=3), 44100)  # < one 4.5 s segment
    s = ingest(str(root), str(tmp_path / "ds"), Config().override(["features.preset=tutorial"]), progress=False)
    assert (s.added, s.segments_added, s.failed) == (2, 4, 0)
    ds = Dataset(str(tmp_path / "ds"))
    short = ds.tracks()[track_id_for("rock/one second.wav")]
    assert short.n_segments == 1 and short.duration_seconds == pytest.approx(1.0, abs=1e-3)  # padded, kept
    t = ds.read_segments(filter=pc.field("path") == "rock/song.mp3")
    assert t.schema.field("mel").type.list_size == 128 * 196
    assert str(t.schema.field("mel").type.value_type) == "halffloat"
    assert t.column("start_seconds").to_pylist() == pytest.approx([0, 100000 / 22050, 200000 / 22050])
    assert s.shard_bytes / s.segments_added < 128 * 196 * 2  # compressed below raw float16
