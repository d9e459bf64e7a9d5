"""``genrecls vacuum``: delete the files no retained version of a dataset references.

Shards and embedding parts are never rewritten: a changed, pruned or compacted track leaves the
index in a commit and its old rows stay where they are, so that a reader of an older version
reads all of it.  Vacuum (under the dataset's lock) deletes what no version within the retention
period (``--retention-hours``, default 168: a week, Delta's default) nor a version named by
``--keep-version`` references:

1. the index's own files, by Delta's vacuum (``deltalake``'s ``DeltaTable.vacuum``: files removed
   from the table longer ago than the retention, and files no version ever added);
2. shards and embedding parts that none of the index files kept by 1 names, and that are older
   than the retention (so a file written by a run that never committed it, a killed one, goes
   too, once it is that old).

A reader that opened a version older than the retention may then find its files gone; a version
a registry holds (``version.json``'s ``dataset.version``) stays re-readable by ``genrecls
evaluate`` when its version is named by ``--keep-version``.  ``--dry-run`` lists and deletes
nothing.
"""

from __future__ import annotations

import time
from typing import Any, Iterable

import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from genrecls.storage.dataset import Dataset
from genrecls.storage.embeddings import EMBEDDINGS
from genrecls.storage.index import INDEX, is_converted, storage_options, table_uri
from genrecls.storage.location import TMP_PREFIX, Location
from genrecls.storage.locks import folder_lock

__all__ = ["vacuum", "DEFAULT_RETENTION_HOURS", "format_vacuum"]

DEFAULT_RETENTION_HOURS = 168.0


def _files(loc: Location, folder: str) -> list[pafs.FileInfo]:
    sel = pafs.FileSelector(loc.join(folder), allow_not_found=True, recursive=False)
    return [i for i in loc.fs.get_file_info(sel) if i.type == pafs.FileType.File]


def _referenced(loc: Location, names: Iterable[str]) -> tuple[set[str], set[str]]:
    """Shards and parts named by the given index files."""
    shards: set[str] = set()
    parts: set[str] = set()
    for name in names:
        with loc.fs.open_input_file(loc.join(INDEX, name)) as f:
            t = pq.read_table(f, columns=[c for c in ("shard", "embedding_part")
                                          if c in pq.read_schema(f).names])
        shards.update(pc.unique(t.column("shard")).to_pylist())
        if "embedding_part" in t.column_names:
            parts.update(p for p in pc.unique(t.column("embedding_part")).to_pylist() if p)
    return shards, parts


def vacuum(dataset: str, *, retention_hours: float = DEFAULT_RETENTION_HOURS, keep_versions: Iterable[int] = (),
           dry_run: bool = False) -> dict[str, Any]:
    """Delete what no retained version references (see the module docstring); returns what was (or would be) deleted."""
    from deltalake import DeltaTable

    if retention_hours < 0:
        raise ValueError(f"--retention-hours must be >= 0, not {retention_hours}")
    loc = Location.parse(dataset)
    ds = Dataset(loc)
    ds.manifest()
    if not is_converted(loc):
        raise ValueError(f"{loc.uri} has no index yet: nothing is vacuumed before 'genrecls convert {dataset}'")
    keep = sorted({int(v) for v in keep_versions})
    with folder_lock(loc, "genrecls vacuum"):
        dt = DeltaTable(table_uri(loc), storage_options=storage_options(loc))
        hours = int(retention_hours) if float(retention_hours).is_integer() else retention_hours
        doomed = dt.vacuum(retention_hours=hours, dry_run=True, enforce_retention_duration=False,
                           keep_versions=keep or None)
        doomed_names = {d.rstrip("/").rsplit("/", 1)[-1] for d in doomed}
        kept_index = [i.base_name for i in _files(loc, INDEX)
                      if i.base_name.endswith(".parquet") and i.base_name not in doomed_names]
        shards, parts = _referenced(loc, kept_index)
        shards.update(ds.shard_names())  # the newest version's, whatever the listing says
        cutoff = time.time() - retention_hours * 3600
        gone: dict[str, list[str]] = {"shards": [], EMBEDDINGS: []}
        for folder, live in (("shards", shards), (EMBEDDINGS, parts)):
            for info in _files(loc, folder):
                name = info.base_name
                old = info.mtime is not None and info.mtime.timestamp() < cutoff
                if old and (name.startswith(TMP_PREFIX) or (name.endswith(".parquet") and name not in live)):
                    gone[folder].append(name)
        if not dry_run:
            for folder, names in gone.items():
                for name in names:
                    loc.delete(folder, name)
            dt.vacuum(retention_hours=hours, dry_run=False, enforce_retention_duration=False,
                      keep_versions=keep or None)
    return {"dataset": loc.uri, "version": dt.version(), "retention_hours": retention_hours, "kept_versions": keep,
            "dry_run": dry_run, "index_files": sorted(doomed_names), "shards": sorted(gone["shards"]),
            "embedding_parts": sorted(gone[EMBEDDINGS])}


def format_vacuum(r: dict[str, Any]) -> str:
    verb = "would delete" if r["dry_run"] else "deleted"
    keep = f", and versions {r['kept_versions']}" if r["kept_versions"] else ""
    return (f"{r['dataset']}: {verb} {len(r['shards'])} shard(s), {len(r['embedding_parts'])} embedding part(s) and "
            f"{len(r['index_files'])} index file(s) that no version of the last {r['retention_hours']:g} h{keep} "
            f"references (newest version {r['version']})")
