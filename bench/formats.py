"""Compare table formats for the dataset's track index on genrecls's own data: Delta Lake, Apache Iceberg, Lance.

What the index needs (issue 29): a versioned table that standard tools read, with atomic
commits on an object store and no service beside it; and the question whether the spectrogram
shards themselves (float16 fixed-size lists) could live in the table.  On a genrecls dataset
(its shards' float16 ``mel`` column, and its index's rows replicated to ``--tracks`` synthetic
tracks), for each format:

* **float16 shards**: can the format store the shard's ``mel`` column as it is (float16)?
* **index**: write the index (one table of ``--tracks`` rows; Lance ``--lance-tracks``: its writer's memory
  grew with the rows here), its bytes on disk and files,
  read it whole, change one track's label (a commit), and what the format needs beside the
  files (a catalog).

Needs the three libraries, which genrecls itself does not (only deltalake is a dependency):
``pip install deltalake pylance 'pyiceberg[sql-sqlite,pyarrow]'``; run it with a Python that has
them and pyarrow (genrecls is not imported, so any venv works)::

    python bench/formats.py DATASET [--tracks 200000] [--lance-tracks 20000]

Writes ``bench/results/formats.json``.  Wall-clock figures record the load average: read them
as ratios on a shared machine.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t0, 3)


def folder_bytes(path: str) -> tuple[int, int]:
    files = [f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(f)]
    return sum(os.path.getsize(f) for f in files), len(files)


def index_rows(dataset: str, n: int) -> pa.Table:
    """The dataset's index rows (its ``index/`` files), replicated with new track ids to ``n`` rows."""
    files = [f for f in glob.glob(os.path.join(dataset, "index", "*.parquet"))]
    base = pa.concat_tables([pq.read_table(f) for f in files]) if files else None
    if base is None or not base.num_rows:
        raise SystemExit(f"{dataset} has no index rows (ingest something into it first)")
    reps = -(-n // base.num_rows)
    t = pa.concat_tables([base] * reps).slice(0, n)
    ids = pa.array([f"{i:016x}" for i in np.random.default_rng(0).permutation(n)], pa.string())
    shards = pa.array([f"part-{i // 32:020d}-synthetic.parquet" for i in range(n)], pa.string())
    t = t.set_column(t.schema.get_field_index("track_id"), "track_id", ids)
    return t.set_column(t.schema.get_field_index("shard"), "shard", shards)


def shard_table(dataset: str) -> pa.Table:
    f = sorted(glob.glob(os.path.join(dataset, "shards", "*.parquet")))[0]
    return pq.read_table(f)


def delta(work: str, index: pa.Table, shard: pa.Table) -> dict:
    from deltalake import DeltaTable, write_deltalake

    out: dict = {"library": "deltalake " + __import__("deltalake").__version__, "needs": "nothing but the files"}
    try:
        write_deltalake(os.path.join(work, "delta-shard"), shard)
        out["float16_shard"] = "stored"
    except Exception as exc:  # noqa: BLE001
        out["float16_shard"] = f"refused: {type(exc).__name__}: {str(exc)[:160]}"
    path = os.path.join(work, "delta-index")
    _, out["write_seconds"] = timed(lambda: write_deltalake(path, index))
    out["bytes"], out["files"] = folder_bytes(path)
    t, out["read_seconds"] = timed(lambda: DeltaTable(path).to_pyarrow_table())
    assert t.num_rows == index.num_rows
    one = index.column("track_id")[0].as_py()
    _, out["relabel_one_seconds"] = timed(lambda: DeltaTable(path).update({"label": "'relabelled'"},
                                                                          predicate=f"track_id = '{one}'"))
    out["bytes_after_relabel"], out["files_after_relabel"] = folder_bytes(path)
    return out


def iceberg(work: str, index: pa.Table, shard: pa.Table) -> dict:
    import pyiceberg
    from pyiceberg.catalog.sql import SqlCatalog

    out: dict = {"library": "pyiceberg " + pyiceberg.__version__,
                 "needs": "a catalog (here SqlCatalog on SQLite; in production a REST/Glue/Hive service)"}
    cat = SqlCatalog("bench", uri=f"sqlite:///{work}/iceberg-catalog.db", warehouse=f"file://{work}/iceberg")
    cat.create_namespace("genrecls")
    try:
        t = cat.create_table("genrecls.shard", schema=shard.schema)
        t.append(shard)
        back = cat.load_table("genrecls.shard")
        out["float16_shard"] = (f"converted: the table's mel is {back.schema().find_field('mel').field_type} "
                                f"(read back as {back.scan().to_arrow().schema.field('mel').type}); Iceberg has no "
                                "half-precision type")
    except Exception as exc:  # noqa: BLE001
        out["float16_shard"] = f"refused: {type(exc).__name__}: {str(exc)[:160]}"
    schema = pa.schema([f.with_nullable(True) for f in index.schema])
    t = cat.create_table("genrecls.index", schema=schema)
    _, out["write_seconds"] = timed(lambda: t.append(index.cast(schema)))
    out["bytes"], out["files"] = folder_bytes(os.path.join(work, "iceberg", "genrecls", "index"))
    r, out["read_seconds"] = timed(lambda: cat.load_table("genrecls.index").scan().to_arrow())
    assert r.num_rows == index.num_rows
    one = index.column("track_id")[0].as_py()

    def relabel():  # pyiceberg has no row update: overwrite the rows matching a filter with new ones
        from pyiceberg.expressions import EqualTo

        tab = cat.load_table("genrecls.index")
        row = tab.scan(row_filter=EqualTo("track_id", one)).to_arrow()
        row = row.set_column(row.schema.get_field_index("label"), "label", pa.array(["relabelled"], pa.string()))
        tab.overwrite(row.cast(schema), overwrite_filter=EqualTo("track_id", one))

    _, out["relabel_one_seconds"] = timed(relabel)
    out["bytes_after_relabel"], out["files_after_relabel"] = folder_bytes(os.path.join(work, "iceberg", "genrecls", "index"))
    return out


def lance_(work: str, index: pa.Table, shard: pa.Table) -> dict:
    import resource

    import lance

    out: dict = {"library": "pylance " + lance.__version__,
                 "needs": "nothing but the files; its own file format (not Parquet: standard Parquet readers "
                          "do not read it)"}
    try:
        lance.write_dataset(shard, os.path.join(work, "lance-shard"))
        back = lance.dataset(os.path.join(work, "lance-shard")).to_table()
        out["float16_shard"] = f"stored ({back.schema.field('mel').type})"
    except Exception as exc:  # noqa: BLE001
        out["float16_shard"] = f"refused: {type(exc).__name__}: {str(exc)[:160]}"
    path = os.path.join(work, "lance-index")
    _, out["write_seconds"] = timed(lambda: lance.write_dataset(index, path))
    out["bytes"], out["files"] = folder_bytes(path)
    t, out["read_seconds"] = timed(lambda: lance.dataset(path).to_table())
    assert t.num_rows == index.num_rows
    one = index.column("track_id")[0].as_py()
    _, out["relabel_one_seconds"] = timed(lambda: lance.dataset(path).update({"label": "'relabelled'"},
                                                                             where=f"track_id = '{one}'"))
    out["bytes_after_relabel"], out["files_after_relabel"] = folder_bytes(path)
    out["max_rss_mb_of_the_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", help="a genrecls dataset (with its index/)")
    p.add_argument("--tracks", type=int, default=200_000)
    p.add_argument("--lance-tracks", type=int, default=20_000,
                   help="Lance's index size (pylance 14 held 770 MB writing 20,000 rows and exhausted 24 GB at 200,000)")
    a = p.parse_args()
    index = index_rows(a.dataset, a.tracks)
    shard = shard_table(a.dataset)
    work = tempfile.mkdtemp(prefix="genrecls-formats-")
    results = {"tracks": a.tracks, "index_columns": index.schema.names, "shard_mel_type": str(shard.schema.field("mel").type),
               "load_at_start": [round(x, 2) for x in os.getloadavg()],
               "cpu": next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True,
                            text=True).stdout.splitlines() if ln.startswith("Model name")), "?"),
               "plain_parquet_bytes": None, "formats": {}}
    pq.write_table(index, os.path.join(work, "plain.parquet"), compression="zstd")
    results["plain_parquet_bytes"] = os.path.getsize(os.path.join(work, "plain.parquet"))
    try:
        for name, fn in (("delta", delta), ("iceberg", iceberg), ("lance", lance_)):
            rows = index if name != "lance" else index.slice(0, min(a.lance_tracks, index.num_rows))
            try:
                results["formats"][name] = {"tracks": rows.num_rows, **fn(work, rows, shard)}
            except Exception as exc:  # noqa: BLE001
                results["formats"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(name, json.dumps(results["formats"][name], indent=1)[:1200], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "formats.json.tmp"), "w") as f:
        json.dump(results, f, indent=2)
    os.replace(os.path.join(HERE, "results", "formats.json.tmp"), os.path.join(HERE, "results", "formats.json"))


if __name__ == "__main__":
    main()
