"""End-to-end smoke test of the ingest on the shared fixtures."""

import pyarrow.dataset as pads

from genrecls.dataset import Dataset


def test_sample_dataset_has_every_track(sample_dataset, small_cfg):
    ds = Dataset(str(sample_dataset))
    m = ds.manifest()
    assert m["counts"]["tracks"] == 24
    assert m["labels"] == ["classical", "electronic", "jazz", "rock"]
    # 6 s tracks, 1 s segments without overlap, tail dropped -> 6 segments each
    table = pads.dataset(str(sample_dataset / "shards"), format="parquet").to_table(columns=["track_id", "segment_index"])
    assert table.num_rows == 24 * 6
    assert len(set(table.column("track_id").to_pylist())) == 24
