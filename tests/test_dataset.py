"""Shards: round trip of rows and metadata, streaming writes, atomicity, failures (the index: tests/test_index.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genrecls.core.config import FeatureConfig
from genrecls.storage.dataset import (
    FEATURES_KEY,
    SHAPE_KEY,
    TRACKS_KEY,
    Dataset,
    OutputError,
    ShardWriter,
    TrackBuffer,
    failure_schema,
    mel_array,
    new_shard_name,
)
from genrecls.storage.location import Location
from genrecls.storage.records import record_row as failure_row

CFG = FeatureConfig(sample_rate=8000, segment_samples=8000, segment_hop=8000, n_fft=512, hop_length=256,
                    n_mels=32, min_track_seconds=0.5).validate()
SHAPE = CFG.mel_shape  # (32, 32)


def mels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-100, 40, (n, *SHAPE)).astype(np.float32)


def write_shard(root, name, tracks, cfg=CFG, spill_bytes=None) -> int:
    """tracks: list of (track_id, label, n_segments, seed)."""
    w = ShardWriter(Location.parse(str(root)), name, cfg)
    for tid, label, n, seed in tracks:
        buf = TrackBuffer(cfg, spill_bytes=spill_bytes if spill_bytes is not None else 64 << 20)
        m = mels(n, seed)
        for i in range(0, n, 3):  # arrives in batches, as from FeatureStream
            buf.append(m[i:i + 3], [k * 1.0 for k in range(i, min(i + 3, n))])
        w.add_track(track_id=tid, path=f"{label}/{tid}.wav", label=label, fingerprint=f"fp-{tid}", size=100 + n,
                    mtime_ns=7, duration=float(n), mels=buf)
        buf.close()
    return w.close()


def test_round_trip_rows_values_and_metadata(tmp_path):
    size = write_shard(tmp_path, "part-a.parquet", [("t1", "rock", 5, 1), ("t2", "jazz", 1, 2), ("t3", None, 300, 3)],
                       spill_bytes=10_000)  # t3 spills to a temporary file on the way
    path = tmp_path / "shards" / "part-a.parquet"
    assert size == os.path.getsize(path) > 0
    pf = pq.ParquetFile(path)
    meta = pf.schema_arrow.metadata
    assert FeatureConfig(**json.loads(meta[FEATURES_KEY])) == CFG
    assert json.loads(meta[SHAPE_KEY]) == list(SHAPE)
    assert json.loads(pf.schema_arrow.field("mel").metadata[b"shape"]) == list(SHAPE)
    assert pf.schema_arrow.field("mel").type == pa.list_(pa.float16(), 32 * 32)
    footer = json.loads(pf.metadata.metadata[TRACKS_KEY])
    assert [(t["track_id"], t["n_segments"], t["label"]) for t in footer] == [("t1", 5, "rock"), ("t2", 1, "jazz"), ("t3", 300, None)]
    assert pf.metadata.num_row_groups >= 2  # streamed: row groups written as they filled
    table = pf.read()
    assert table.num_rows == 306
    for tid, n, seed in (("t1", 5, 1), ("t2", 1, 2), ("t3", 300, 3)):
        rows = table.filter(pa.compute.equal(table.column("track_id"), tid))
        assert rows.column("segment_index").to_pylist() == list(range(n))
        assert rows.column("start_seconds").to_pylist() == [float(k) for k in range(n)]
        assert set(rows.column("fingerprint").to_pylist()) == {f"fp-{tid}"}
        got = mel_array(rows.column("mel"), SHAPE)
        np.testing.assert_array_equal(got, mels(n, seed).astype(np.float16).astype(np.float32))


def test_float32_storage(tmp_path):
    cfg = FeatureConfig(**{**CFG.__dict__, "dtype": "float32"})
    write_shard(tmp_path, "part-b.parquet", [("t1", "x", 2, 9)], cfg=cfg)
    t = pq.read_table(tmp_path / "shards" / "part-b.parquet")
    assert t.schema.field("mel").type.value_type == pa.float32()
    np.testing.assert_array_equal(mel_array(t.column("mel"), SHAPE), mels(2, 9))
    import duckdb  # float32 is written with byte-stream split: DuckDB must still read it

    got = duckdb.sql(f"select mel from '{tmp_path}/shards/*.parquet' order by segment_index").fetchall()
    np.testing.assert_array_equal(np.array([r[0] for r in got], np.float32).reshape(2, *SHAPE), mels(2, 9))


def test_dataset_is_readable_by_pyarrow_pandas_polars_and_duckdb(tmp_path):
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as pads

    write_shard(tmp_path, new_shard_name(), [("t1", "rock", 4, 1), ("t2", "jazz", 2, 2)])
    write_shard(tmp_path, new_shard_name(), [("t3", "rock", 3, 3)])
    (tmp_path / "shards" / ".tmp-1234-part-x.parquet.partial").write_bytes(b"half a shard")  # what a crash leaves
    shards = str(tmp_path / "shards")
    assert pads.dataset(shards, format="parquet").count_rows() == 9
    df = pd.read_parquet(shards)
    assert df.groupby("label").size().to_dict() == {"jazz": 2, "rock": 7}
    assert len(df.mel.iloc[0]) == 32 * 32
    pl_df = pl.read_parquet(f"{shards}/*.parquet")
    assert pl_df.height == 9 and pl_df.schema["mel"].shape == (32 * 32,)
    con = duckdb.connect()
    rows = con.sql(f"select label, count(*), min(len(mel)) from '{shards}/*.parquet' group by label order by label").fetchall()
    assert rows == [("jazz", 2, 1024), ("rock", 7, 1024)]


def test_an_empty_shard_writes_nothing_and_abort_leaves_nothing(tmp_path):
    loc = Location.parse(str(tmp_path))
    assert ShardWriter(loc, "part-e.parquet", CFG).close() == 0
    w = ShardWriter(loc, "part-f.parquet", CFG)
    w.add_track(track_id="t", path="p", label="l", fingerprint="f", size=1, mtime_ns=1, duration=1.0,
                mels=mels(600, 1), starts=list(range(600)))  # enough rows to open the temporary file
    assert any(n.startswith(".tmp-") for n in os.listdir(tmp_path / "shards"))
    w.abort()
    assert os.listdir(tmp_path / "shards") == []


def test_an_unwritable_shard_folder_raises_output_error_and_leaves_no_file(tmp_path):
    (tmp_path / "shards").write_text("a file where the folder should be")
    w = ShardWriter(Location.parse(str(tmp_path)), "part-g.parquet", CFG)
    w.add_track(track_id="t", path="p", label="l", fingerprint="f", size=1, mtime_ns=1, duration=1.0,
                mels=mels(2, 1), starts=[0.0, 1.0])
    with pytest.raises(OutputError, match="cannot write shard part-g.parquet"):
        w.close()
    assert sorted(os.listdir(tmp_path)) == ["shards"]


def test_track_buffer_spills_and_reads_back_in_order():
    buf = TrackBuffer(CFG, spill_bytes=5000)  # ~2 rows in memory
    m = mels(23, 4)
    for i in range(0, 23, 4):
        buf.append(m[i:i + 4], range(i, min(i + 4, 23)))
    assert buf._spill is not None and len(buf) == 23
    got = np.concatenate(list(buf.chunks(5)))
    np.testing.assert_array_equal(got, m.astype(np.float16).reshape(23, -1))
    assert all(c.shape[0] <= 5 for c in buf.chunks(5))
    buf.close()
    with pytest.raises(ValueError, match="start times"):
        TrackBuffer(CFG).append(m[:2], [0.0])


def test_failures_table_newest_record_wins_and_compacts(tmp_path):
    ds = Dataset(str(tmp_path))
    assert ds.failures().num_rows == 0 and ds.failures().schema == failure_schema()
    ds.write_failures([failure_row("a.wav", "x", "silent", "the track is silent"),
                       failure_row("b.wav", "x", "empty", "the file is empty (0 bytes)")], name="part-1.parquet")
    ds.write_failures([failure_row("a.wav", "x", "non_finite", "NaN")], name="part-2.parquet")
    rows = {r["path"]: r["kind"] for r in ds.failures().to_pylist()}
    assert rows == {"a.wav": "non_finite", "b.wav": "empty"}
    # b.wav was fixed (now has rows) and c.wav vanished: both leave the table
    ds.write_failures([failure_row("c.wav", None, "empty", "x")], name="part-3.parquet")
    kept = ds.compact_failures(live_paths={"b.wav"}, discovered_paths={"a.wav", "b.wav"})
    assert kept == 1 and len(ds.failure_names()) == 1
    assert [r["path"] for r in ds.failures().to_pylist()] == ["a.wav"]


def test_shard_names_sort_by_time():
    names = [new_shard_name() for _ in range(50)]
    assert names == sorted(names) and len(set(names)) == 50


def test_manifest_errors_are_clear(tmp_path):
    from genrecls.storage.dataset import DatasetError

    with pytest.raises(DatasetError, match="not a genrecls dataset"):
        Dataset(str(tmp_path)).manifest()
