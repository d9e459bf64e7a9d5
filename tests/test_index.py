"""The dataset's track index (a Delta Lake table): commits, versions, the fence, relabel, conversion, compaction,
vacuum; on hand-written shards on a local disk, no Ray (the S3 cases are in tests/test_s3.py)."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest

from genrecls.core.config import FeatureConfig
from genrecls.storage.dataset import TRACKS_KEY, Dataset, ShardWriter
from genrecls.storage.index import CommitConflict, IndexWriter, TrackEntry, entries_table, index_schema
from genrecls.storage.location import Location, new_shard_name
from genrecls.storage.locks import LockedError

CFG = FeatureConfig(sample_rate=8000, segment_samples=8000, segment_hop=8000, n_fft=512, hop_length=256,
                    n_mels=8, min_track_seconds=0.5).validate()


def shard(root, tracks, name=None) -> tuple[str, list[TrackEntry]]:
    """A shard of (track_id, label, n_segments, seed) tracks; returns its name and index entries."""
    name = name or new_shard_name()
    w = ShardWriter(Location.parse(str(root)), name, CFG)
    for tid, label, n, seed in tracks:
        m = np.random.default_rng(seed).uniform(-80, 0, (n, *CFG.mel_shape)).astype(np.float32)
        w.add_track(track_id=tid, path=f"{label}/{tid}.wav", label=label, fingerprint=f"fp-{tid}-{seed}", size=10 + n,
                    mtime_ns=seed, duration=float(n), mels=m, starts=[float(i) for i in range(n)])
    w.close()
    return name, [TrackEntry(shard=name, **t) for t in w.entries]


def dataset(root, index: bool = True) -> Dataset:
    """A dataset folder with a manifest and (``index``) an empty index, as an ingest starts one."""
    loc = Location.parse(str(root))
    loc.makedirs()
    loc.write_json("manifest.json", {"features": json.loads(json.dumps(CFG.__dict__))})
    if index:
        with Dataset(loc).writing("test"):
            pass
    return Dataset(loc)


def rows(ds: Dataset) -> list[tuple]:
    t = ds.read_segments(columns=["track_id", "segment_index", "label", "mel"])
    return sorted(zip(t.column("track_id").to_pylist(), t.column("segment_index").to_pylist(),
                      t.column("label").to_pylist(), [np.asarray(m, np.float16).tobytes() for m in t.column("mel").to_pylist()]))


def test_columns_are_derived_from_the_dataclass_and_label_is_nullable():
    schema = index_schema()
    assert schema.names[:9] == ["track_id", "path", "label", "fingerprint", "size", "mtime_ns", "n_segments",
                                "duration_seconds", "shard"]
    assert schema.field("label").nullable and not schema.field("track_id").nullable
    assert [n for n in schema.names if n.startswith("embedding_")] == [
        "embedding_part", "embedding_backbone", "embedding_features", "embedding_layers", "embedding_engine"]


def test_commits_versions_and_a_changed_track_read_from_its_own_shard(tmp_path):
    ds = dataset(tmp_path)
    a, first = shard(tmp_path, [("t1", "rock", 3, 1), ("t2", "rock", 2, 2), ("t3", "jazz", 2, 3)])
    with ds.writing("test"):
        v1 = ds.commit(upsert=entries_table(first))
    b, changed = shard(tmp_path, [("t2", "rock", 4, 22)])  # t2 changed: its new rows in a new shard
    with ds.writing("test"):
        v2 = ds.commit(upsert=entries_table(changed), delete=["t3"])  # and t3 pruned, in the same commit
    old, new = Dataset(str(tmp_path), version=v1), Dataset(str(tmp_path))
    assert new.version == v2 > v1
    assert {t: (e.shard, e.n_segments) for t, e in new.tracks().items()} == {"t1": (a, 3), "t2": (b, 4)}
    assert sorted((r[0], r[1]) for r in rows(new)) == [("t1", i) for i in range(3)] + [("t2", i) for i in range(4)]
    assert sorted((r[0], r[1]) for r in rows(old)) == ([("t1", i) for i in range(3)] + [("t2", i) for i in range(2)]
                                                       + [("t3", i) for i in range(2)])
    assert sorted(os.listdir(tmp_path / "shards")) == sorted([a, b])  # no shard was rewritten or deleted
    assert new.shard_names() == sorted([a, b]) and old.shard_names() == [a]


def test_relabel_is_one_commit_and_rewrites_no_shard(tmp_path):
    ds = dataset(tmp_path)
    name, entries = shard(tmp_path, [("t1", "rock", 2, 1), ("t2", "jazz", 2, 2)])
    with ds.writing("test"):
        ds.commit(upsert=entries_table(entries))
    before = os.stat(tmp_path / "shards" / name)
    v = ds.version
    assert Dataset(str(tmp_path)).relabel({"t1": None, "t2": "jazz", "nope": "x"}) == 1
    now = Dataset(str(tmp_path))
    assert now.version == v + 2  # the one-off session's fence, then the relabel
    assert now.tracks()["t1"].label is None and now.tracks()["t2"].label == "jazz"
    assert {r[0]: r[2] for r in rows(now)} == {"t1": None, "t2": "jazz"}  # readers take the index's label
    assert os.stat(tmp_path / "shards" / name).st_mtime_ns == before.st_mtime_ns
    assert pq.read_table(tmp_path / "shards" / name, columns=["label"]).column("label").to_pylist()[0] == "rock"
    assert Dataset(str(tmp_path), version=v).tracks()["t1"].label == "rock"


def test_two_writers_one_commit_wins_the_other_fails_cleanly(tmp_path):
    ds = dataset(tmp_path)
    name, entries = shard(tmp_path, [("t1", "rock", 2, 1)])
    a = IndexWriter(ds.location, "writer a").open()
    b = IndexWriter(ds.location, "writer b").open()  # b's fence: a's session is stale from here on
    with pytest.raises(CommitConflict, match="another writer committed .* writer b") as err:
        a.commit(upsert=entries_table(entries))
    assert isinstance(err.value, LockedError)  # exit code 4 at the command line
    assert not Dataset(str(tmp_path)).tracks()
    assert sorted(os.listdir(tmp_path / "index")) == ["_delta_log"]  # the refused commit left no index file
    b.commit(upsert=entries_table(entries))
    assert list(Dataset(str(tmp_path)).tracks()) == ["t1"]
    # two commits racing from one version: exactly one lands
    c, d = IndexWriter(ds.location, "c").open(), None
    d = IndexWriter(ds.location, "d")
    d.snapshot, d.epoch = c.snapshot, c.epoch  # both on the same version, as two runs that read it at once
    barrier, results = threading.Barrier(2), []

    def go(w, tid):
        barrier.wait()
        try:
            w.commit(update={"t1": {"label": tid}})
            results.append("ok")
        except CommitConflict:
            results.append("conflict")

    threads = [threading.Thread(target=go, args=(w, t)) for w, t in ((c, "x"), (d, "y"))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(results) == ["conflict", "ok"]


def test_a_dataset_from_before_the_index_is_read_with_a_warning_then_converted(tmp_path, caplog):
    ds = dataset(tmp_path, index=False)
    old, _ = shard(tmp_path, [("t1", "rock", 2, 1), ("t2", "rock", 2, 2)], name="part-00000000000000000001-a.parquet")
    new, _ = shard(tmp_path, [("t2", "rock", 3, 5)], name="part-00000000000000000002-b.parquet")  # t2 re-ingested
    loc = ds.location
    loc.write_atomic("touched/part-1.parquet", lambda out: pq.write_table(
        entries_table([]).select(["track_id", "size", "mtime_ns", "fingerprint"]).from_pylist(
            [{"track_id": "t1", "size": 99, "mtime_ns": 7, "fingerprint": "fp-t1-1"}]), out))
    with caplog.at_level("WARNING", logger="genrecls"):
        legacy = Dataset(str(tmp_path))
        assert {t: (e.shard, e.size) for t, e in legacy.tracks().items()} == {"t1": (old, 99), "t2": (new, 13)}
    assert "run 'genrecls convert" in caplog.text and legacy.version is None
    expected = rows(legacy)
    from genrecls.cli import main

    assert main(["convert", str(tmp_path)]) == 0
    converted = Dataset(str(tmp_path))
    assert converted.version is not None and rows(converted) == expected
    assert converted.tracks() == legacy.tracks() and not os.listdir(tmp_path / "touched")
    assert main(["convert", str(tmp_path)]) == 0  # a second time: nothing to do


def test_compaction_keeps_every_tracks_rows_identical(tmp_path):
    from genrecls.jobs.compact import compact

    ds = dataset(tmp_path)
    names = []
    with ds.writing("test"):
        for i in range(5):
            name, entries = shard(tmp_path, [(f"t{i}a", "rock", 2, i), (f"t{i}b", "jazz", 1 + i, 10 + i)])
            names.append(name)
            ds.commit(upsert=entries_table(entries))
        changed, entries = shard(tmp_path, [("t0a", "rock", 3, 99)])  # a dead row of t0a stays in names[0]
        ds.commit(upsert=entries_table(entries))
    before = Dataset(str(tmp_path))
    expected, v = rows(before), before.version
    r = compact(str(tmp_path), target_segments=12)
    after = Dataset(str(tmp_path))
    assert r["shards_merged"] >= 2 and len(after.shard_names()) < len(before.shard_names())
    assert rows(after) == expected
    assert {t: e.fingerprint for t, e in after.tracks().items()} == {t: e.fingerprint for t, e in before.tracks().items()}
    assert rows(Dataset(str(tmp_path), version=v)) == expected  # the old version still reads from the old shards
    for name in after.shard_names():  # a merged shard's footer lists exactly the tracks it holds
        footer = json.loads(pq.read_metadata(tmp_path / "shards" / name).metadata[TRACKS_KEY])
        assert pq.read_metadata(tmp_path / "shards" / name).num_rows == sum(t["n_segments"] for t in footer)


def test_vacuum_never_deletes_a_file_a_retained_version_references(tmp_path):
    from genrecls.jobs.vacuum import vacuum

    ds = dataset(tmp_path)
    a, first = shard(tmp_path, [("t1", "rock", 2, 1), ("t2", "jazz", 2, 2)])
    orphan, _ = shard(tmp_path, [("t9", "rock", 1, 9)])  # written by a killed run, never committed
    with ds.writing("test"):
        v1 = ds.commit(upsert=entries_table(first))
        b, moved = shard(tmp_path, [("t1", "rock", 2, 1), ("t2", "jazz", 2, 2)])
        ds.commit(upsert=entries_table(moved))  # both tracks now in b: a is referenced by v1 only
    at_v1 = rows(Dataset(str(tmp_path), version=v1))
    r = vacuum(str(tmp_path), retention_hours=1)  # everything is younger than an hour: all retained
    assert not r["shards"] and sorted(os.listdir(tmp_path / "shards")) == sorted([a, b, orphan])
    assert rows(Dataset(str(tmp_path), version=v1)) == at_v1
    r = vacuum(str(tmp_path), retention_hours=0, keep_versions=[v1])  # v1 named: its files stay
    assert r["shards"] == [orphan] and sorted(os.listdir(tmp_path / "shards")) == sorted([a, b])
    assert rows(Dataset(str(tmp_path), version=v1)) == at_v1
    r = vacuum(str(tmp_path), retention_hours=0)
    assert r["shards"] == [a] and os.listdir(tmp_path / "shards") == [b]
    assert rows(Dataset(str(tmp_path))) == at_v1  # the newest version reads the same rows from b


def test_record_touched_updates_the_stat_in_one_commit(tmp_path):
    ds = dataset(tmp_path)
    _, entries = shard(tmp_path, [("t1", "rock", 2, 1), ("t2", "rock", 2, 2)])
    with ds.writing("test"):
        v = ds.commit(upsert=entries_table(entries))
        assert ds.record_touched({"t1": (123, 456, "fp-t1-1"), "t2": (5, 6, "another-fingerprint")}) == 1
        assert ds.version == v + 1 and ds.record_touched({"t1": (123, 456, "fp-t1-1")}) == 0
    t = Dataset(str(tmp_path)).tracks()
    assert (t["t1"].size, t["t1"].mtime_ns) == (123, 456) and (t["t2"].size, t["t2"].mtime_ns) == (12, 2)
    assert Dataset(str(tmp_path)).touched() == {}


def test_retrain_compacts_a_dataset_of_many_small_shards(tmp_path):
    from genrecls.core.config import Config
    from genrecls.jobs.retrain import _maybe_compact

    ds = dataset(tmp_path)
    with ds.writing("test"):
        for i in range(3):
            ds.commit(upsert=entries_table(shard(tmp_path, [(f"t{i}", "rock", 2, i)])[1]))
    before = Dataset(str(tmp_path))
    cfg = Config().override(["retrain.compact_shards=4", "retrain.compact_segments=12"])
    assert _maybe_compact(before, cfg) is None  # 3 small shards: under the threshold
    done = _maybe_compact(before, cfg.override(["retrain.compact_shards=3"]))
    after = Dataset(str(tmp_path), version=done["version"])
    assert done["shards_merged"] == 3 and len(after.shard_names()) == 1 and rows(after) == rows(before)


def test_a_table_without_a_newer_column_gains_it_and_its_old_rows_read_null(tmp_path):
    """A field added to TrackEntry (or StoredEmbedding) becomes a column: the next writer adds it to the table
    (Delta's ALTER TABLE ADD COLUMN), and rows written before it read it as null."""
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    ds = dataset(tmp_path, index=False)
    _, entries = shard(tmp_path, [("t1", "rock", 2, 1)])
    old = entries_table(entries).drop_columns(["embedding_engine"])  # a table from before that column
    write_deltalake(str(tmp_path / "index"), old.cast(pa.schema([f.with_nullable(f.name != "track_id")
                                                                  for f in old.schema])))
    with ds.writing("test"):
        pass
    assert "embedding_engine" in DeltaTable(str(tmp_path / "index")).schema().to_arrow().names
    row = Dataset(str(tmp_path)).rows().to_pylist()[0]
    assert row["track_id"] == "t1" and row["embedding_engine"] is None
