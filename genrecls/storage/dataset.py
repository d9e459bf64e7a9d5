"""Shard I/O: the on-disk dataset of log-mel segments.

Layout of a dataset folder (local path or URI)::

    DATASET/
      manifest.json           feature config, label vocabulary, counts, library versions
      config.json             the resolved configuration of the last ingest
      shards/part-*.parquet   one row per segment (zstd); each track lives in exactly one shard
      failures/part-*.parquet one row per file that could not be used, with its reason
      warnings/part-*.parquet one row per file kept although something is off (truncated, ...)
      touched/part-*.parquet  files whose stat changed but content did not (skipped without re-reading)
      .lock                   held while an ingest writes

Segment rows: ``track_id, path, label, segment_index, start_seconds, mel`` (a fixed-size
list of ``n_mels * n_frames`` values, row-major (mel, frame)), plus ``fingerprint``
(BLAKE2b of the file's bytes), ``size``, ``mtime_ns`` and ``duration_seconds`` of the
source file, and its ``album`` and ``album_artist`` tags (null without; shards written
before they were recorded lack both columns).  Each shard's schema metadata holds the feature configuration and the mel
shape; its Parquet footer lists the tracks it holds (so the dataset's track index is read
from footers, never from the data).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genrecls.core.config import FeatureConfig
from genrecls.storage.location import Location, new_shard_name
from genrecls.storage.records import Records, RecordTable, record_schema

__all__ = [
    "SCHEMA_VERSION",
    "DatasetError",
    "segment_schema",
    "failure_schema",
    "PartWriter",
    "ShardWriter",
    "TrackBuffer",
    "OutputError",
    "Dataset",

    "mel_array",
]

SCHEMA_VERSION = 1
TRACKS_KEY = b"genrecls.tracks"
FEATURES_KEY = b"genrecls.features"
SHAPE_KEY = b"genrecls.mel_shape"
VERSION_KEY = b"genrecls.schema_version"
ROW_GROUP_SEGMENTS = 256
SHARD_COMPRESSION = "zstd"
#: zstd level 1: 40% less CPU than level 3 for 5% larger float16 shards (bench/ingest_parts.py --profile)
SHARD_COMPRESSION_LEVEL = 1


def _writer_options(schema: pa.Schema) -> dict[str, Any]:
    """ParquetWriter settings of every shard (also used when a shard is rewritten)."""
    options = dict(compression=SHARD_COMPRESSION, compression_level=SHARD_COMPRESSION_LEVEL,
                   use_dictionary=["track_id", "path", "label", "fingerprint"],
                   write_statistics=["track_id", "segment_index", "label"])
    if schema.field("mel").type.value_type == pa.float32():
        # byte-stream split makes float32 spectrograms ~25% smaller; DuckDB reads it for FLOAT but
        # not for float16 (a fixed-size binary column in Parquet), so float16 stays plain
        options["use_byte_stream_split"] = ["mel.list.element"]
    return options


class DatasetError(ValueError):
    """A dataset is missing, malformed, or incompatible with what is asked of it."""


def _feature_json(cfg: FeatureConfig) -> str:
    from dataclasses import asdict

    return json.dumps(asdict(cfg), sort_keys=True)


def segment_schema(cfg: FeatureConfig) -> pa.Schema:
    n_mels, n_frames = cfg.mel_shape
    value_type = pa.float16() if cfg.dtype == "float16" else pa.float32()
    return pa.schema(
        [
            pa.field("track_id", pa.string(), nullable=False),
            pa.field("path", pa.string(), nullable=False),
            pa.field("label", pa.string()),
            pa.field("segment_index", pa.int32(), nullable=False),
            pa.field("start_seconds", pa.float64(), nullable=False),
            pa.field("mel", pa.list_(value_type, n_mels * n_frames), nullable=False,
                     metadata={b"shape": json.dumps([n_mels, n_frames]).encode(), b"order": b"mel,frame"}),
            pa.field("fingerprint", pa.string(), nullable=False),
            pa.field("size", pa.int64(), nullable=False),
            pa.field("mtime_ns", pa.int64(), nullable=False),
            pa.field("duration_seconds", pa.float64(), nullable=False),
            pa.field("album", pa.string()),
            pa.field("album_artist", pa.string()),
        ],
        metadata={
            FEATURES_KEY: _feature_json(cfg).encode(),
            SHAPE_KEY: json.dumps([n_mels, n_frames]).encode(),
            VERSION_KEY: str(SCHEMA_VERSION).encode(),
        },
    )


def failure_schema() -> pa.Schema:
    """Schema of the failures (and warnings) table: see :mod:`genrecls.storage.records`."""
    return record_schema()


def mel_array(column: pa.ChunkedArray | pa.Array, shape: tuple[int, int], dtype=np.float32) -> np.ndarray:
    """The ``mel`` column as an array of shape (rows, n_mels, n_frames)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(arr), *shape).astype(dtype, copy=False)


class OutputError(DatasetError):
    """The dataset cannot be written (disk full, read-only or unwritable folder): the run stops."""


#: a track's spectrograms beyond this many bytes wait in a local temporary file, not in memory
SPILL_BYTES = 64 << 20


class TrackBuffer:
    """One track's spectrograms in the storage dtype, kept until the track is complete.

    A track is written to a shard only once all of it decoded (a file that fails half-way
    leaves nothing behind).  Up to ``spill_bytes`` stay in memory; beyond that they go to
    a temporary file in the system temp folder, so a worker's memory stays bounded
    whatever the track's length (a 3-hour track is about 120 MB of float16 spectrograms).
    """

    def __init__(self, cfg: FeatureConfig, spill_bytes: int = SPILL_BYTES):
        self.dtype = np.dtype(np.float16 if cfg.dtype == "float16" else np.float32)
        self.row_values = cfg.n_mels * cfg.n_frames
        self.spill_bytes = spill_bytes
        self._parts: list[np.ndarray] = []
        self._bytes = 0
        self._spill = None
        self._spilled_rows = 0
        self.starts: list[float] = []

    def __len__(self) -> int:
        return len(self.starts)

    def append(self, mels: np.ndarray, starts: Iterable[float]) -> None:
        """Add a batch of spectrograms (k, n_mels, n_frames), any float dtype, and their start times."""
        rows = np.ascontiguousarray(mels, dtype=self.dtype).reshape(-1, self.row_values)
        starts = list(starts)
        if len(starts) != rows.shape[0]:
            raise ValueError(f"{rows.shape[0]} spectrograms but {len(starts)} start times")
        self.starts.extend(float(s) for s in starts)
        self._parts.append(rows)
        self._bytes += rows.nbytes
        if self._bytes > self.spill_bytes:
            self._spill_parts()

    def _spill_parts(self) -> None:
        import tempfile

        try:
            if self._spill is None:
                self._spill = tempfile.TemporaryFile(prefix="genrecls-track-")
            for part in self._parts:
                self._spill.write(memoryview(part).cast("B"))
                self._spilled_rows += part.shape[0]
        except OSError as exc:
            raise OutputError(f"cannot spill a long track's spectrograms to {tempfile.gettempdir()}: {exc}") from exc
        self._parts.clear()
        self._bytes = 0

    def chunks(self, rows: int) -> Iterable[np.ndarray]:
        """The spectrograms in order, as (<= rows, n_mels * n_frames) arrays."""
        if self._spill is not None:
            self._spill.flush()
            self._spill.seek(0)
            row_bytes = self.row_values * self.dtype.itemsize
            left = self._spilled_rows
            while left:
                k = min(rows, left)
                data = self._spill.read(k * row_bytes)
                yield np.frombuffer(data, dtype=self.dtype).reshape(k, self.row_values)
                left -= k
        for part in self._parts:
            for i in range(0, part.shape[0], rows):
                yield part[i:i + rows]

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        self._parts.clear()


class PartWriter:
    """Writes one Parquet part of tracks, streaming: a track is added whole, or not at all.

    Rows go to a hidden temporary file as row groups fill (memory holds one row group and
    one track); :meth:`close` adds the track list to the footer and renames the file into
    place.  Any error while writing aborts the part (its temporary file is deleted) and is
    raised as :class:`OutputError`.  Subclasses build the rows (:class:`ShardWriter`,
    :class:`genrecls.storage.embeddings.EmbeddingWriter`).
    """

    def __init__(self, location: Location, folder: str, name: str, schema: pa.Schema, options: dict[str, Any],
                 what: str, row_group_rows: int):
        self.location = location
        self.folder = folder
        self.name = name
        self.schema = schema
        self._options = options
        self._row_group_rows = row_group_rows
        self._what = what  # how errors name the part
        self._tracks: list[dict[str, Any]] = []
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._file = None
        self._writer = None
        self.segments = 0

    @property
    def n_tracks(self) -> int:
        return len(self._tracks)

    def _add(self, batches: Iterable[pa.RecordBatch], entry: dict[str, Any]) -> None:
        """Queue a track's rows (flushing full row groups), then record it in the footer's track list."""
        n = 0
        try:
            for batch in batches:
                self._pending.append(batch)
                self._pending_rows += batch.num_rows
                n += batch.num_rows
                if self._pending_rows >= self._row_group_rows:
                    self._flush()
        except OSError as exc:
            self.abort()
            raise self._error(exc) from exc
        self.segments += n
        self._tracks.append(entry)

    def _error(self, exc: Exception) -> OutputError:
        return OutputError(f"cannot write {self._what} in {self.location.uri}: {exc}")

    def _flush(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            self._file = self.location.open_atomic(f"{self.folder}/{self.name}")
            self._writer = pq.ParquetWriter(self._file.stream, self.schema, **self._options)
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self._pending.clear()
        self._pending_rows = 0

    def close(self) -> int:
        """Finish the part and rename it into place; returns its size in bytes (0 if it held no track)."""
        if not self._tracks:
            self.abort()
            return 0
        try:
            self._flush()
            self._writer.add_key_value_metadata({TRACKS_KEY.decode(): json.dumps(self._tracks)})
            self._writer.close()
            self._file.commit()
            return self.location.fs.get_file_info(self.location.join(self.folder, self.name)).size
        except OSError as exc:
            self.abort()
            raise self._error(exc) from exc

    def abort(self) -> None:
        """Drop everything written so far (the temporary file is deleted)."""
        self._pending.clear()
        self._pending_rows = 0
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:
                pass
            self._writer = None
        if self._file is not None:
            self._file.abort()
            self._file = None


class ShardWriter(PartWriter):
    """Writes one shard (``shards/NAME``) of segment rows; see :class:`PartWriter`."""

    def __init__(self, location: Location, name: str, cfg: FeatureConfig):
        schema = segment_schema(cfg)
        super().__init__(location, "shards", name, schema, _writer_options(schema), f"shard {name}",
                         ROW_GROUP_SEGMENTS)
        self.cfg = cfg

    def add_track(self, *, track_id: str, path: str, label: str | None, fingerprint: str, size: int,
                  mtime_ns: int, duration: float, mels: "np.ndarray | TrackBuffer",
                  starts: Iterable[float] | None = None, album: str | None = None,
                  album_artist: str | None = None) -> None:
        """Add every segment of one track (``mels`` as an array with ``starts``, or a :class:`TrackBuffer`);
        ``album``, ``album_artist``: its tags (None without), kept per track for album-aware splits."""
        if isinstance(mels, TrackBuffer):
            buf = mels
        else:
            buf = TrackBuffer(self.cfg, spill_bytes=1 << 62)
            buf.append(mels, starts if starts is not None else [])
        n = len(buf)
        if n == 0:
            raise ValueError(f"track {path!r} has no segment")

        def batches():
            first = 0
            for chunk in buf.chunks(ROW_GROUP_SEGMENTS):
                k = chunk.shape[0]
                yield self._batch(track_id, path, label, fingerprint, size, mtime_ns, duration, chunk,
                                  buf.starts[first:first + k], first, album, album_artist)
                first += k

        self._add(batches(), {
            "track_id": track_id, "path": path, "label": label, "fingerprint": fingerprint,
            "size": size, "mtime_ns": mtime_ns, "n_segments": n, "duration_seconds": duration,
            "album": album, "album_artist": album_artist,
        })

    def _batch(self, track_id, path, label, fingerprint, size, mtime_ns, duration, rows, starts, first,
               album=None, album_artist=None) -> pa.RecordBatch:
        n = rows.shape[0]
        values = pa.array(rows.reshape(-1), type=self.schema.field("mel").type.value_type)
        return pa.RecordBatch.from_arrays(
            [
                pa.array([track_id] * n, pa.string()),
                pa.array([path] * n, pa.string()),
                pa.array([label] * n, pa.string()),
                pa.array(np.arange(first, first + n, dtype=np.int32)),
                pa.array(np.asarray(starts, dtype=np.float64)),
                pa.FixedSizeListArray.from_arrays(values, self.cfg.n_mels * self.cfg.n_frames),
                pa.array([fingerprint] * n, pa.string()),
                pa.array(np.full(n, size, np.int64)),
                pa.array(np.full(n, mtime_ns, np.int64)),
                pa.array(np.full(n, duration, np.float64)),
                pa.array([album] * n, pa.string()),
                pa.array([album_artist] * n, pa.string()),
            ],
            schema=self.schema,
        )


@dataclass(frozen=True)
class TrackEntry:
    track_id: str
    path: str
    label: str | None
    fingerprint: str
    size: int
    mtime_ns: int
    n_segments: int
    duration_seconds: float
    shard: str
    #: the file's album and album-artist tags (None: none, or a shard written before they were recorded)
    album: str | None = None
    album_artist: str | None = None


class Dataset:
    """A dataset folder: read its manifest, its track index, its segments and failures."""

    def __init__(self, location: Location | str):
        self.location = location if isinstance(location, Location) else Location.parse(location)
        #: shard name -> track list read from its footer (shards are immutable but for rewrite_without)
        self._footers: dict[str, list[dict[str, Any]]] = {}
        #: the failures and warnings tables (genrecls.storage.records); a write that fails raises OutputError
        self.records = Records(self.location, OutputError)

    @property
    def uri(self) -> str:
        return self.location.uri

    # -- manifest ---------------------------------------------------------------------
    def exists(self) -> bool:
        return self.location.exists("manifest.json")

    def manifest(self) -> dict[str, Any]:
        if not self.exists():
            raise DatasetError(f"{self.uri} is not a genrecls dataset (no manifest.json); run 'genrecls ingest' first")
        return self.location.read_json("manifest.json")

    def feature_config(self) -> FeatureConfig:
        return FeatureConfig(**self.manifest()["features"]).validate()

    # -- shards -----------------------------------------------------------------------
    def shard_names(self) -> list[str]:
        return self.location.list("shards", suffix=".parquet")

    def shard_paths(self) -> list[str]:
        return [self.location.join("shards", n) for n in self.shard_names()]

    def _read_footer_tracks(self, name: str) -> list[dict[str, Any]]:
        cached = self._footers.get(name)
        if cached is not None:
            return cached
        with self.location.fs.open_input_file(self.location.join("shards", name)) as f:
            meta = pq.read_metadata(f).metadata or {}
        raw = meta.get(TRACKS_KEY)
        if raw is None:
            raise DatasetError(f"shard {name} has no track list in its footer (not written by genrecls?)")
        tracks = json.loads(raw)
        self._footers[name] = tracks
        return tracks

    def track_entries(self) -> list[TrackEntry]:
        """Every (track, shard) pair recorded in shard footers, oldest shard first."""
        entries = []
        for name in self.shard_names():
            for t in self._read_footer_tracks(name):
                entries.append(TrackEntry(shard=name, **t))
        return entries

    def tracks(self) -> dict[str, TrackEntry]:
        """The current track index: track_id -> newest entry."""
        return {e.track_id: e for e in self.track_entries()}

    def track_table(self) -> pa.Table:
        """The track index as a table (one row per track)."""
        entries = list(self.tracks().values())
        cols = ["track_id", "path", "label", "fingerprint", "size", "mtime_ns", "n_segments", "duration_seconds", "shard",
                "album", "album_artist"]
        return pa.table({c: [getattr(e, c) for e in entries] for c in cols})

    def read_segments(self, columns: list[str] | None = None, filter=None) -> pa.Table:
        import pyarrow.dataset as pads

        paths = self.shard_paths()
        if not paths:
            return segment_schema(self.feature_config()).empty_table()
        ds = pads.dataset(paths, filesystem=self.location.fs, format="parquet")
        return ds.to_table(columns=columns, filter=filter)

    def rewrite_without(self, shard: str, drop_track_ids: set[str]) -> None:
        """Rewrite a shard without some tracks (atomic replace, row group by row group); deletes it if nothing is left."""
        import pyarrow.compute as pc

        path = self.location.join("shards", shard)
        drop = pa.array(sorted(drop_track_ids), pa.string())
        with self.location.fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            meta = dict(pf.metadata.metadata or {})
            tracks = [t for t in json.loads(meta[TRACKS_KEY]) if t["track_id"] not in drop_track_ids]
            if not tracks:
                self.location.delete("shards", shard)
                self._footers.pop(shard, None)
                return
            schema = pf.schema_arrow

            def write(out):
                with pq.ParquetWriter(out, schema, **_writer_options(schema)) as w:
                    for i in range(pf.num_row_groups):
                        table = pf.read_row_group(i)
                        table = table.filter(pc.invert(pc.is_in(table.column("track_id"), drop)))
                        if table.num_rows:
                            w.write_table(table, row_group_size=max(table.num_rows, 1))
                    w.add_key_value_metadata({TRACKS_KEY.decode(): json.dumps(tracks)})

            self._write(f"shards/{shard}", write)
        self._footers[shard] = tracks

    def _write(self, rel: str, writer) -> None:
        try:
            self.location.write_atomic(rel, writer)
        except OSError as exc:
            raise OutputError(f"cannot write {rel} in {self.uri}: {exc}") from exc

    def reconcile(self, drop_track_ids: Iterable[str] = ()) -> dict[str, int]:
        """Make every track live in exactly one shard (the newest) and drop the given tracks.

        Run under the dataset lock before and after an ingest.  It repairs what a killed
        run can leave: temporary files, and a changed track whose old rows were not yet
        removed.  Returns counts of what it did.
        """
        removed_tmp = self.location.remove_temporaries("shards") + self.records.remove_temporaries()
        drop = set(drop_track_ids)
        latest: dict[str, str] = {}
        by_shard: dict[str, set[str]] = defaultdict(set)
        for e in self.track_entries():  # oldest shard first: the last one seen wins
            latest[e.track_id] = e.shard
            by_shard[e.shard].add(e.track_id)
        stale: dict[str, set[str]] = defaultdict(set)
        for shard, ids in by_shard.items():
            for tid in ids:
                if tid in drop or latest[tid] != shard:
                    stale[shard].add(tid)
        for shard, ids in stale.items():
            self.rewrite_without(shard, ids)
        return {"temporaries_removed": removed_tmp, "shards_rewritten": len(stale),
                "rows_superseded": sum(len(v) for v in stale.values())}

    # -- failures and warnings (genrecls.storage.records) --------------------------------------
    @property
    def failure_table(self) -> RecordTable:
        return self.records.failure_table

    @property
    def warning_table(self) -> RecordTable:
        return self.records.warning_table

    def failure_names(self) -> list[str]:
        return self.failure_table.names()

    def failures(self) -> pa.Table:
        """The current failures table: one row per path (the newest record wins)."""
        return self.records.failures()

    def warnings(self) -> pa.Table:
        """Files kept with a warning (their audio is in the shards): one row per path, the newest wins."""
        return self.records.warnings()

    def write_failures(self, rows: list[dict[str, Any]], name: str | None = None) -> None:
        self.records.write_failures(rows, name)

    def write_warnings(self, rows: list[dict[str, Any]], name: str | None = None) -> None:
        self.records.write_warnings(rows, name)

    # -- touched files -----------------------------------------------------------------
    # A file whose size or modification time changed but whose content did not keeps its
    # rows; its new stat is recorded here (track_id, size, mtime_ns, fingerprint) so that the
    # next run skips it without reading it again.
    def touched(self) -> dict[str, tuple[int, int, str]]:
        """track_id -> (size, mtime_ns, fingerprint) of files seen unchanged under a new stat."""
        out: dict[str, tuple[int, int, str]] = {}
        for n in self.location.list("touched", suffix=".parquet"):
            with self.location.fs.open_input_file(self.location.join("touched", n)) as f:
                for r in pq.read_table(f).to_pylist():  # names are time-ordered: later overrides earlier
                    out[r["track_id"]] = (r["size"], r["mtime_ns"], r["fingerprint"])
        return out

    def record_touched(self, rows: dict[str, tuple[int, int, str]]) -> None:
        """Rewrite the touched table as one part: ``rows`` merged over the current one, for live tracks only."""
        names = self.location.list("touched", suffix=".parquet")
        merged = {**self.touched(), **rows}
        index = self.tracks()
        keep = {tid: v for tid, v in merged.items()
                if tid in index and index[tid].fingerprint == v[2] and (index[tid].size, index[tid].mtime_ns) != v[:2]}
        if keep == self.touched() and len(names) <= 1:
            return
        if keep:
            table = pa.table({"track_id": list(keep), "size": [v[0] for v in keep.values()],
                              "mtime_ns": [v[1] for v in keep.values()], "fingerprint": [v[2] for v in keep.values()]})
            self._write(f"touched/{new_shard_name()}", lambda out: pq.write_table(table, out, compression="zstd"))
        for n in names:
            self.location.delete("touched", n)

    def compact_failures(self, live_paths: set[str], discovered_paths: set[str] | None = None) -> int:
        """Rewrite the failures table as one part: drop paths that now have rows or that vanished."""
        return self.records.compact_failures(live_paths, discovered_paths)

    def compact_warnings(self) -> int:
        """Rewrite the warnings table as one part: only rows of the tracks' current versions."""
        return self.records.compact_warnings({e.path: (e.size, e.mtime_ns) for e in self.tracks().values()})
