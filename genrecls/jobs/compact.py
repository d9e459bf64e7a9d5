"""``genrecls compact``: merge a dataset's small shards (and embedding parts) into larger ones, as one commit.

Incremental ingests write a shard per task: many small shards after many small runs.  Compaction
copies the rows of the tracks of small shards (shards whose tracks in the index hold fewer than
half ``--target-segments`` segments), byte for byte value for value, into new shards of up to
``--target-segments`` segments each, and commits the tracks' new shards to the index in one
commit; the embedding store's small parts likewise.  No track's data changes (its rows are
copied, not recomputed), no shard is rewritten under its key: the old shards stay, still read
by older versions, until ``genrecls vacuum`` deletes them.  A shard that also holds rows of
tracks that left the index (changed or pruned since) counts as small by its live tracks, so
compaction also drops dead rows from what readers scan.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from genrecls.core.runtime import log
from genrecls.storage.dataset import TRACKS_KEY, Dataset, OutputError, _writer_options
from genrecls.storage.embeddings import EMBEDDINGS
from genrecls.storage.embeddings import _writer_options as _part_options
from genrecls.storage.location import Location, new_shard_name
from genrecls.storage.locks import folder_lock

__all__ = ["compact", "compact_locked", "format_compaction", "DEFAULT_TARGET_SEGMENTS"]

#: segments per compacted shard (about 300 MB of musicnn-preset float16 spectrograms before compression)
DEFAULT_TARGET_SEGMENTS = 8192
#: shards copied at once
COPY_THREADS = 4


def compact(dataset: str, *, target_segments: int = DEFAULT_TARGET_SEGMENTS) -> dict[str, Any]:
    """Hold the dataset's lock and compact it (:func:`compact_locked`)."""
    loc = Location.parse(dataset)
    ds = Dataset(loc)
    ds.manifest()  # a dataset, or DatasetError
    with folder_lock(loc, "genrecls compact"):
        with ds.writing("genrecls compact"):
            return compact_locked(ds, target_segments=target_segments)


def _groups(sizes: list[tuple[str, int]], target: int) -> list[list[str]]:
    """Consecutive small files (name, live segments) packed into groups of at most ``target`` segments."""
    small = [(n, s) for n, s in sizes if s < target / 2]
    groups: list[list[str]] = []
    current: list[str] = []
    total = 0
    for name, n in small:
        if current and total + n > target:
            groups.append(current)
            current, total = [], 0
        current.append(name)
        total += n
    if current:
        groups.append(current)
    return [g for g in groups if len(g) > 1]


def _copy(loc: Location, folder: str, sources: dict[str, list[str]], name: str, options_of,
          footer: list[dict[str, Any]]) -> int:
    """Copy the rows of the given tracks of each source file (name -> track ids) into ``folder/name``."""
    schema = None
    writer = None
    out = loc.open_atomic(f"{folder}/{name}")
    try:
        for source, ids in sources.items():
            keep = pa.array(sorted(ids), pa.string())
            with loc.fs.open_input_file(loc.join(folder, source)) as f:
                pf = pq.ParquetFile(f)
                if writer is None:
                    schema = pf.schema_arrow
                    writer = pq.ParquetWriter(out.stream, schema, **options_of(schema))
                for i in range(pf.num_row_groups):
                    t = pf.read_row_group(i)
                    t = t.filter(pc.is_in(t.column("track_id"), keep))
                    if t.num_rows:
                        writer.write_table(t.cast(schema), row_group_size=max(t.num_rows, 1))
        writer.add_key_value_metadata({TRACKS_KEY.decode(): json.dumps(footer)})
        writer.close()
        out.commit()
    except BaseException as exc:
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass
        out.abort()
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {folder}/{name} in {loc.uri}: {exc}") from exc
        raise
    return loc.fs.get_file_info(loc.join(folder, name)).size


def compact_locked(ds: Dataset, *, target_segments: int = DEFAULT_TARGET_SEGMENTS) -> dict[str, Any]:
    """Compact the shards and embedding parts of ``ds`` (its writer session is open); one commit."""
    if target_segments < 2:
        raise ValueError(f"--target-segments must be at least 2, not {target_segments}")
    loc = ds.location
    tracks = ds.tracks()
    rows = ds.rows()
    by_shard: dict[str, list[str]] = {}
    for e in tracks.values():
        by_shard.setdefault(e.shard, []).append(e.track_id)
    sizes = sorted((s, sum(tracks[t].n_segments for t in ids)) for s, ids in by_shard.items())
    shard_groups = _groups(sizes, target_segments)
    parts = rows.filter(pc.is_valid(rows.column("embedding_part"))) if rows.num_rows else rows
    by_part: dict[str, list[str]] = {}
    for tid, part in zip(parts.column("track_id").to_pylist(), parts.column("embedding_part").to_pylist()):
        by_part.setdefault(part, []).append(tid)
    part_sizes = sorted((p, sum(tracks[t].n_segments for t in ids)) for p, ids in by_part.items())
    part_groups = _groups(part_sizes, target_segments)
    update: dict[str, dict[str, Any]] = {}
    jobs = []
    for group in shard_groups:
        name = new_shard_name()
        ids = [t for s in group for t in by_shard[s]]
        footer = [{k: getattr(tracks[t], k) for k in ("track_id", "path", "label", "fingerprint", "size", "mtime_ns",
                                                       "n_segments", "duration_seconds")} for t in ids]
        jobs.append(("shards", {s: by_shard[s] for s in group}, name, _writer_options, footer))
        for t in ids:
            update.setdefault(t, {})["shard"] = name
    for group in part_groups:
        name = new_shard_name()
        ids = [t for p in group for t in by_part[p]]
        footer = [{"track_id": t, "fingerprint": tracks[t].fingerprint, "n_segments": tracks[t].n_segments} for t in ids]
        jobs.append((EMBEDDINGS, {p: by_part[p] for p in group}, name, lambda schema: _part_options(), footer))
        for t in ids:
            update.setdefault(t, {})["embedding_part"] = name
    written = 0
    if jobs:
        with ThreadPoolExecutor(min(COPY_THREADS, len(jobs))) as pool:
            written = sum(pool.map(lambda j: _copy(loc, *j), jobs))
        ds.commit(update=update, operation="compact")
        log.info("compacted %d shard(s) into %d and %d embedding part(s) into %d", sum(map(len, shard_groups)),
                 len(shard_groups), sum(map(len, part_groups)), len(part_groups))
    return {"dataset": ds.uri, "version": ds.version, "shards_merged": sum(map(len, shard_groups)),
            "shards_written": len(shard_groups), "parts_merged": sum(map(len, part_groups)),
            "parts_written": len(part_groups), "tracks_moved": len(update), "bytes_written": written,
            "shards": len(ds.shard_names()), "target_segments": target_segments}


def format_compaction(r: dict[str, Any]) -> str:
    if not r["shards_merged"] and not r["parts_merged"]:
        return (f"{r['dataset']}: nothing to compact ({r['shards']} shards; a shard is small under "
                f"{r['target_segments'] // 2} segments)")
    return (f"{r['dataset']}: {r['shards_merged']} small shard(s) merged into {r['shards_written']}, "
            f"{r['parts_merged']} embedding part(s) into {r['parts_written']} ({r['tracks_moved']} tracks, "
            f"{r['bytes_written'] / 1e6:.1f} MB written); index version {r['version']}, {r['shards']} shards; "
            "the old files stay for readers of older versions until 'genrecls vacuum'")
