"""The embedding store (issue 19, part 1): computed by ingest, kept per segment, refused when it would mix.

Real audio (16 kHz WAV, the musicnn preset: 2 segments of 187 frames per 7-s track), the real
pretrained backbone on the inference engine, real Parquet; the store's own rules (validity,
reconcile, refusals) also on hand-written parts, without Ray.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pyarrow.parquet as pq
import pytest

from genrecls.core.config import Config, FeatureConfig, feature_preset
from genrecls.storage.dataset import Dataset, DatasetError, mel_array
from genrecls.storage.embeddings import EmbeddingStore, EmbeddingStoreError, EmbeddingWriter, embedding_schema
from genrecls.storage.location import Location

LAYERS = {"taggram": 50, "penultimate": 200, "max_pool": 753, "mean_pool": 753, "band_mean": 96, "band_std": 96}


def store_rows(dataset) -> list[tuple[str, str, int]]:
    """(track_id, fingerprint, segment_index) of every row the store's index serves, sorted (duplicates kept).

    (A part is never rewritten: rows of entries that left the index stay in their part until vacuum.)"""
    d = os.path.join(str(dataset), "embeddings")
    assert not [n for n in os.listdir(d) if n.startswith(".tmp-")]  # no partial file is ever visible
    store = EmbeddingStore(str(dataset))
    t = store.read(store.entries(), layers=[])
    return sorted(zip(*(t.column(c).to_pylist() for c in ("track_id", "fingerprint", "segment_index")))) if t.num_rows else []


def assert_store_matches_dataset(dataset) -> None:
    """Exactly one stored row per segment of every track in the dataset, with the track's current fingerprint."""
    tracks = Dataset(str(dataset)).tracks()
    expected = sorted((t, e.fingerprint, i) for t, e in tracks.items() for i in range(e.n_segments))
    assert store_rows(dataset) == expected


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """3 genres x 3 tracks x 7 s (16 kHz WAV): 2 musicnn segments each."""
    from genrecls.audio.sample_data import make_sample_collection

    root = tmp_path_factory.mktemp("emb") / "lib"
    make_sample_collection(str(root), genres=3, tracks_per_genre=3, seconds=7.0, sr=16000, formats=("wav",), seed=11)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, library, ray_local):
    """The library ingested with the defaults (musicnn preset, ingest.embeddings=auto), 3 tracks per task."""
    from genrecls.jobs.ingest import ingest

    out = tmp_path_factory.mktemp("emb-ds") / "ds"
    s = ingest(str(library), str(out), Config().override(["ingest.tracks_per_task=3"]), progress=False)
    assert (s.added, s.failed, s.embeddings, s.embedded_tracks, s.embedded_segments) == (9, 0, "computed", 9, 18)
    return out


def test_ingest_stores_every_layer_of_every_segment(dataset):
    from genrecls.models.engine import backbone_id

    assert_store_matches_dataset(dataset)
    names = sorted(os.listdir(dataset / "embeddings"))
    assert names == sorted(os.listdir(dataset / "shards"))  # one part per shard, the same name
    schema = pq.read_schema(dataset / "embeddings" / names[0])
    assert {f.name: f.type.list_size for f in schema if f.name in LAYERS} == LAYERS
    assert str(schema.field("mean_pool").type.value_type) == "halffloat"
    m = Dataset(str(dataset)).manifest()["embeddings"]
    assert m["backbone"] == backbone_id() and m["tracks"] == 9 and m["segments"] == 18 and m["layers"] == LAYERS
    assert m["last_engine"]["engine"] in ("openvino", "onnxruntime", "tensorflow")  # what computed it, recorded
    assert m["last_engine"]["threads"] == 1  # one CPU per Ray task, set explicitly on the runtime
    import duckdb  # users read it as they read the shards

    n = duckdb.sql(f"select count(*), min(len(penultimate)) from '{dataset}/embeddings/*.parquet'").fetchall()
    assert n == [(18, 200)]


def test_stored_embeddings_equal_tensorflow_within_the_precision_tolerance(dataset):
    """Each layer against the TensorFlow network on the stored segments: max |store - tf| / max |tf| per layer,
    within float16 rounding (fp32 engines) or bf16's 8-bit mantissa (the native reduced precision)."""
    from genrecls.models.engine import band_stats
    from genrecls.models.musicnn import load_musicnn, predict

    ds = Dataset(str(dataset))
    store = EmbeddingStore(ds.location)
    table = store.read(store.index().values()).sort_by([("track_id", "ascending"), ("segment_index", "ascending")])
    seg = ds.read_segments(columns=["track_id", "segment_index", "mel"]).sort_by(
        [("track_id", "ascending"), ("segment_index", "ascending")])
    assert table.column("track_id").to_pylist() == seg.column("track_id").to_pylist()
    mels = mel_array(seg.column("mel"), (96, 187))
    ref = predict(load_musicnn(), np.ascontiguousarray(mels.transpose(0, 2, 1)), batch_size=16)
    ref["band_mean"], ref["band_std"] = band_stats(mels)
    precision = ds.manifest()["embeddings"]["last_engine"]["precision"]
    tol = 2e-3 if precision == "fp32" else 5e-2
    for name in LAYERS:
        stored = np.stack(table.column(name).to_numpy(zero_copy_only=False)).astype(np.float64)
        rel = np.abs(stored - ref[name]).max() / np.abs(ref[name]).max()
        assert rel < tol, (name, precision, rel)
    np.testing.assert_array_equal(np.stack(table.column("taggram").to_numpy(zero_copy_only=False)).argmax(1),
                                  ref["taggram"].argmax(1))


def test_a_changed_file_is_embedded_again_a_pruned_one_leaves_the_store(dataset, library, tmp_path, ray_local):
    from genrecls.audio.sample_data import synthesize, write_audio
    from genrecls.jobs.ingest import ingest

    lib, ds = tmp_path / "lib", tmp_path / "ds"
    shutil.copytree(library, lib)
    shutil.copytree(dataset, ds)
    genre = sorted(os.listdir(lib))[0]
    changed, gone = sorted(os.listdir(lib / genre))[:2]
    write_audio(str(lib / genre / changed), synthesize(genre, 10.0, sr=16000, seed=99), 16000)  # 3 segments now
    os.remove(lib / genre / gone)
    before = {r[0]: r[1] for r in store_rows(ds)}
    s = ingest(str(lib), str(ds), Config(), prune=True, progress=False)
    assert (s.added, s.pruned, s.embedded_tracks, s.embedded_segments, s.backfilled_tracks) == (1, 1, 1, 3, 0)
    assert_store_matches_dataset(ds)  # the old rows of the changed file are gone, so are the pruned file's
    after = {r[0]: r[1] for r in store_rows(ds)}
    assert len(after) == 8 and len(before) == 9
    assert sum(1 for t in after if after[t] != before.get(t)) == 1  # only the changed track has new rows
    again = ingest(str(lib), str(ds), Config(), prune=True, progress=False)
    assert again.embedded_tracks == 0 and again.processed == 0  # nothing to do: the store is complete


def test_a_dataset_without_a_store_gets_one_from_its_stored_segments(dataset, library, tmp_path, ray_local):
    """ingest.embeddings=off, then auto: the tracks already there are embedded from their shards, not decoded."""
    from genrecls.jobs.ingest import ingest

    ds = tmp_path / "ds"
    s = ingest(str(library), str(ds), Config().override(["ingest.embeddings=off"]), progress=False)
    assert s.embeddings == "off" and s.embedded_tracks == 0 and not (ds / "embeddings").exists()
    assert Dataset(str(ds)).manifest()["embeddings"] is None
    s = ingest(str(library), str(ds), Config(), progress=False)
    assert (s.processed, s.embedded_tracks, s.backfilled_tracks) == (0, 9, 9)
    assert_store_matches_dataset(ds)
    ours = EmbeddingStore(str(ds))
    theirs = EmbeddingStore(str(dataset))
    a = ours.read(ours.index().values()).sort_by([("track_id", "ascending"), ("segment_index", "ascending")])
    b = theirs.read(theirs.index().values()).sort_by([("track_id", "ascending"), ("segment_index", "ascending")])
    for name in LAYERS:  # the same values as embedding them during the ingest (same engine, same stored segments)
        np.testing.assert_allclose(np.stack(a.column(name).to_numpy(zero_copy_only=False)).astype(np.float32),
                                   np.stack(b.column(name).to_numpy(zero_copy_only=False)).astype(np.float32),
                                   rtol=2e-3, atol=2e-3)


def test_a_store_of_another_backbone_or_features_is_refused_never_mixed(dataset, library, tmp_path, capsys):
    from genrecls.cli import main
    from genrecls.jobs.ingest import ingest
    from genrecls.models.engine import backbone_id
    from genrecls.storage.embeddings import stored_embedding

    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)
    loc = Location.parse(str(ds))
    other = "msd_musicnn-000000000000"
    w = EmbeddingWriter(loc, "part-99999999999999999999-other.parquet",
                        embedding_schema(LAYERS, backbone=other, features=feature_preset("musicnn")))
    first = sorted(Dataset(loc).tracks())[0]
    w.add_track(first, Dataset(loc).tracks()[first].fingerprint, {k: np.zeros((2, v)) for k, v in LAYERS.items()})
    w.close()
    how = stored_embedding("part-99999999999999999999-other.parquet", other, feature_preset("musicnn"), LAYERS, {})
    as_columns = {f"embedding_{k}": v for k, v in asdict(how).items()}
    Dataset(loc).commit(update={first: as_columns})  # one track's entry from another backbone
    with pytest.raises(EmbeddingStoreError, match=f"mixes two backbones.*{other}"):
        ingest(str(library), str(ds), Config(), progress=False)
    Dataset(loc).commit(update={t: as_columns for t in Dataset(loc).tracks()})  # the whole store: another backbone
    with pytest.raises(EmbeddingStoreError, match=f"backbone {other}, but this genrecls computes them with {backbone_id()}"):
        ingest(str(library), str(ds), Config(), progress=False)
    assert main(["ingest", str(library), "--out", str(ds), "-q"]) == 2  # bad input: the message says what to do
    assert f"delete {ds}/embeddings" in capsys.readouterr().err
    assert {e.part for e in EmbeddingStore(str(ds)).entries()} == {how.part}  # nothing was mixed in
    # another feature configuration (e.g. 4-s segments) is named too
    features = FeatureConfig(**{**asdict(feature_preset("musicnn")), "segment_hop": 20000})
    Dataset(loc).commit(update={t: {"embedding_features": stored_embedding("p", other, features, LAYERS, {}).features}
                                for t in Dataset(loc).tracks()})
    with pytest.raises(EmbeddingStoreError, match="segment_hop: stored 20000, asked 47616"):
        EmbeddingStore(str(ds)).check(other, feature_preset("musicnn"))


def test_a_killed_ingest_resumes_with_no_duplicate_embedding(library, tmp_path, pauses):
    """The CLI (a small run: in its own process) is killed with one shard and its embeddings written and a second
    shard written whose embeddings are not (kill -9 at the point between them); the same command then leaves
    exactly one stored row per segment: the second shard's tracks embedded from their stored segments."""
    from genrecls.jobs.ingest import ingest

    ds = tmp_path / "ds"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = [sys.executable, "-m", "genrecls", "ingest", str(library), "--out", str(ds), "-q",
            "--set", "ingest.tracks_per_task=3"]
    pauses.arm("ingest-shard-written")  # the first batch's shard and part are complete
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        pid = pauses.wait("ingest-shard-written", proc)
        pauses.arm("ingest-embeddings")  # the next batch stops between its shard and its part
        pauses.release("ingest-shard-written", pid)
        assert pauses.wait("ingest-embeddings", proc) == proc.pid
        assert len(os.listdir(ds / "shards")) == 2 and len([n for n in os.listdir(ds / "embeddings")
                                                             if not n.startswith(".")]) == 1
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # what was committed: the first batch (its shard and part); the second shard is in no version
    assert len(Dataset(str(ds)).tracks()) == 3 and len(EmbeddingStore(str(ds)).entries()) == 3
    s = ingest(str(library), str(ds), Config().override(["ingest.tracks_per_task=3"]), progress=False)
    assert s.backfilled_tracks == 0 and s.added == 6  # the second batch again (its orphan is vacuum's), the third
    assert_store_matches_dataset(ds)


def test_the_store_index_serves_a_track_only_with_its_fingerprint_and_never_mixes_backbones(tmp_path):
    """The store's rules without Ray: its entries are the index's; a changed fingerprint does not serve."""
    from genrecls.storage.embeddings import stored_embedding
    from genrecls.storage.index import TrackEntry, entries_table

    loc = Location.parse(str(tmp_path / "ds"))
    loc.makedirs()
    features = feature_preset("musicnn")
    w = EmbeddingWriter(loc, "part-1.parquet", embedding_schema(LAYERS, backbone="b-1", features=features))
    for tid, fp, n in [("a", "fa", 2), ("c", "fc", 1)]:
        w.add_track(tid, fp, {k: np.full((n, v), 1.0) for k, v in LAYERS.items()})
    w.close()
    how = stored_embedding("part-1.parquet", "b-1", features, LAYERS, {"engine": "test"})
    entries = [TrackEntry(t, f"x/{t}.wav", "x", fp, 1, 1, n, 1.0, "s.parquet") for t, fp, n in
               [("a", "fa", 2), ("c", "fc", 1), ("d", "fd", 3)]]
    ds = Dataset(loc)
    ds.commit(upsert=entries_table(entries, {"a": how, "c": how}))
    store = EmbeddingStore(Dataset(loc))
    assert sorted((e.track_id, e.part) for e in store.entries()) == [("a", "part-1.parquet"), ("c", "part-1.parquet")]
    assert set(store.valid_for({"a": ("fa", 2), "c": ("fc-changed", 1), "d": ("fd", 3)})) == {"a"}
    d = store.describe()
    assert (d["tracks"], d["segments"], d["backbone"], d["engines"]) == (2, 3, "b-1", [{"engine": "test"}])
    assert store.read(store.entries(), ["taggram"]).num_rows == 3
    with pytest.raises(EmbeddingStoreError, match="backbone b-1, but this genrecls computes them with b-2"):
        store.check("b-2", features)
    with pytest.raises(DatasetError):  # an EmbeddingStoreError is a DatasetError: exit code 2 at the CLI
        store.check("b-2", features)
    other = stored_embedding("part-2.parquet", "b-2", features, LAYERS, {})
    Dataset(loc).commit(update={"d": {f"embedding_{k}": v for k, v in other.__dict__.items()}})
    with pytest.raises(EmbeddingStoreError, match="mixes two backbones"):
        EmbeddingStore(str(tmp_path / "ds")).describe()


def test_parts_are_written_in_row_groups_of_the_stores_own_size(tmp_path):
    """An embedding part fills row groups of ROW_GROUP_SEGMENTS (1024) rows, not the shards' 256: tracks go in
    whole, so the 300-row tracks flush once the pending rows reach 1024 (1200), then the rest at close."""
    from genrecls.storage.dataset import ROW_GROUP_SEGMENTS as SHARD_ROWS
    from genrecls.storage.embeddings import ROW_GROUP_SEGMENTS

    assert (ROW_GROUP_SEGMENTS, SHARD_ROWS) == (1024, 256)
    loc = Location.parse(str(tmp_path / "ds"))
    loc.makedirs()
    w = EmbeddingWriter(loc, "part-0.parquet", embedding_schema({"penultimate": 4}, backbone="b-1",
                                                                features=feature_preset("musicnn")))
    for i in range(5):
        w.add_track(f"t{i}", "f", {"penultimate": np.full((300, 4), float(i))})
    w.close()
    meta = pq.ParquetFile(tmp_path / "ds" / "embeddings" / "part-0.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [1200, 300]
