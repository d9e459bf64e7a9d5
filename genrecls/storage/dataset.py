"""Shard I/O: the on-disk dataset of log-mel segments.

Layout of a dataset folder (local path or URI)::

    DATASET/
      manifest.json           feature config, label vocabulary, counts, library versions, the index's version
      config.json             the resolved configuration of the last ingest
      index/                  the track index: a Delta Lake table, one row per track (genrecls.storage.index)
      shards/part-*.parquet   one row per segment (zstd); the index names each track's shard
      failures/part-*.parquet one row per file that could not be used, with its reason
      warnings/part-*.parquet one row per file kept although something is off (truncated, ...)
      .lock                   held while an ingest writes

Segment rows: ``track_id, path, label, segment_index, start_seconds, mel`` (a fixed-size
list of ``n_mels * n_frames`` values, row-major (mel, frame)), plus ``fingerprint``
(BLAKE2b of the file's bytes), ``size``, ``mtime_ns`` and ``duration_seconds`` of the
source file.  Each shard's schema metadata holds the feature configuration and the mel
shape; its Parquet footer lists the tracks it was written with.  A shard is never rewritten:
the index says which of its rows are the dataset (a changed or pruned track leaves the index
in a commit; its old rows stay until ``genrecls vacuum``).  A dataset from before the index
(no ``index/``) is read from its footers, as then, until converted.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import fields, replace
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from genrecls.core.config import FeatureConfig
from genrecls.storage.index import TRACK_COLUMNS, IndexError_, IndexSnapshot, IndexWriter, TrackEntry, is_converted
from genrecls.storage.location import Location, new_shard_name  # noqa: F401 (re-exported)
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
    "TrackEntry",
    "Dataset",
    "legacy_rows",
    "read_footers",

    "mel_array",
]

SCHEMA_VERSION = 1
TRACKS_KEY = b"genrecls.tracks"
FEATURES_KEY = b"genrecls.features"
SHAPE_KEY = b"genrecls.mel_shape"
VERSION_KEY = b"genrecls.schema_version"
#: an embedding part's footer (genrecls.storage.embeddings): what computed it
BACKBONE_KEY = b"genrecls.backbone"
LAYERS_KEY = b"genrecls.layers"
ENGINE_KEY = b"genrecls.engine"
ROW_GROUP_SEGMENTS = 256
SHARD_COMPRESSION = "zstd"
#: zstd level 1: 40% less CPU than level 3 for 5% larger float16 shards (bench/ingest_parts.py --profile)
SHARD_COMPRESSION_LEVEL = 1

log = logging.getLogger("genrecls")


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

    @property
    def entries(self) -> list[dict[str, Any]]:
        """The track list of the footer (what the driver commits to the index once the part is whole)."""
        return list(self._tracks)

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
                  starts: Iterable[float] | None = None, **about: Any) -> None:
        """Add every segment of one track (``mels`` as an array with ``starts``, or a :class:`TrackBuffer`).

        ``about``: the track's other index fields (:class:`~genrecls.storage.index.TrackEntry`'s ``album``,
        ``album_artist``, ``genre_tag``, ``audio_fingerprint``...): in the footer's track list and the index,
        not in the segment rows."""
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
                                  buf.starts[first:first + k], first)
                first += k

        self._add(batches(), {
            "track_id": track_id, "path": path, "label": label, "fingerprint": fingerprint,
            "size": size, "mtime_ns": mtime_ns, "n_segments": n, "duration_seconds": duration, **about,
        })

    def _batch(self, track_id, path, label, fingerprint, size, mtime_ns, duration, rows, starts, first) -> pa.RecordBatch:
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
            ],
            schema=self.schema,
        )


#: a legacy dataset's leftover "touched" table (before the index held every track's stat)
TOUCHED = "touched"
#: footers read at once when a dataset without an index is read (or converted)
FOOTER_THREADS = 16


class Dataset:
    """A dataset folder: its manifest, its track index (one version of ``index/``), its segments and failures.

    ``Dataset(uri)`` reads the newest version of the index when first asked (once: every read of
    this object is of that version); ``Dataset(uri, version=v)`` reads version ``v`` (what a run
    was trained on).  A dataset written before the index existed has no ``index/``: it is read
    from its shards' footers as before, with a warning, until ``genrecls convert`` (or the next
    ``genrecls ingest``) converts it.  Writes (:meth:`writing`, :meth:`relabel`,
    :meth:`record_touched`, :meth:`reconcile`) are commits of the index; the caller holds the
    dataset's lock.
    """

    def __init__(self, location: Location | str, version: int | None = None):
        self.location = location if isinstance(location, Location) else Location.parse(location)
        self._asked_version = version
        self._snapshot = None  # genrecls.storage.index.IndexSnapshot, or None for a dataset without an index
        self._legacy_rows: pa.Table | None = None
        self._tracks: dict[str, TrackEntry] | None = None
        self._tracks_of: Any = None  # the rows self._tracks was built from
        self._writer = None  # genrecls.storage.index.IndexWriter while this object writes
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

    def library_root(self) -> str | None:
        """The library folder the tracks' paths are relative to (the manifest's ``root``; for datasets written
        before it was recorded: the ingest's source folder, or a manifest's folder; None when unknown)."""
        import os

        manifest = self.manifest()
        if manifest.get("root"):
            return str(manifest["root"])
        source = manifest.get("source")
        if not source or "://" in str(source):
            return None
        return str(source) if os.path.isdir(source) else os.path.dirname(str(source))

    def feature_config(self) -> FeatureConfig:
        return FeatureConfig(**self.manifest()["features"]).validate()

    # -- the index ----------------------------------------------------------------------
    def converted(self) -> bool:
        """True when the dataset has its index table (else it is read from its shards' footers)."""
        return self._snapshot is not None or self._writer is not None or is_converted(self.location)

    def _open(self) -> None:
        if self._snapshot is not None or self._legacy_rows is not None:
            return
        if self._asked_version is not None or is_converted(self.location):
            try:
                self._snapshot = IndexSnapshot.load(self.location, self._asked_version)
            except IndexError_ as exc:
                raise DatasetError(str(exc)) from exc
            return
        if self.location.exists("shards") and self.location.list("shards", suffix=".parquet"):
            log.warning("%s has no index table (a dataset from before the index): its tracks are read from every "
                        "shard's footer; run 'genrecls convert %s' once (or the next ingest converts it)",
                        self.uri, self.uri)
        self._legacy_rows = legacy_rows(self.location)

    def rows(self) -> pa.Table:
        """The index of this object's version: one row per track (``genrecls.storage.index.index_schema``)."""
        if self._writer is not None:
            return self._writer.snapshot.rows
        self._open()
        return self._snapshot.rows if self._snapshot is not None else self._legacy_rows

    @property
    def version(self) -> int | None:
        """The index version this object reads (None: a dataset without an index, or none yet)."""
        if self._writer is not None:
            return self._writer.version
        self._open()
        return self._snapshot.version if self._snapshot is not None else None

    def refresh(self) -> None:
        """Read the newest version on the next access (this object read one version until now)."""
        self._snapshot = self._legacy_rows = self._tracks = self._tracks_of = None
        self._asked_version = None

    def tracks(self) -> dict[str, TrackEntry]:
        """The track index: track_id -> entry (this object's version)."""
        rows = self.rows()
        if self._tracks is None or self._tracks_of is not rows:
            cols = [rows.column(c).to_pylist() for c in TRACK_COLUMNS]
            self._tracks = {vals[0]: TrackEntry(*vals) for vals in zip(*cols)}
            self._tracks_of = rows
        return self._tracks

    def track_entries(self) -> list[TrackEntry]:
        """Every track of the index (one entry per track)."""
        return list(self.tracks().values())

    def track_table(self) -> pa.Table:
        """The track index as a table (one row per track; TrackEntry's columns)."""
        return self.rows().select(TRACK_COLUMNS)

    # -- shards -----------------------------------------------------------------------
    def shard_names(self) -> list[str]:
        """The shards this version references (sorted; older shards may stay until ``genrecls vacuum``)."""
        rows = self.rows()
        return sorted(pc.unique(rows.column("shard")).to_pylist()) if rows.num_rows else []

    def shard_paths(self) -> list[str]:
        return [self.location.join("shards", n) for n in self.shard_names()]

    def iter_segments(self, columns: list[str] | None = None, track_ids: Iterable[str] | None = None,
                      filter=None, batch_rows: int = 1024) -> Iterator[pa.RecordBatch]:
        """The segment rows of this version (of ``track_ids``, default every track), batch by batch: only
        rows of each track's own shard (an older shard may hold rows of a track that changed since), with
        ``label``, ``size`` and ``mtime_ns`` from the index (a relabel or a new stat changes no shard)."""
        import pyarrow.dataset as pads

        tracks = self.tracks()
        ids = set(tracks) if track_ids is None else {t for t in track_ids if t in tracks}
        shards = sorted({tracks[t].shard for t in ids})
        if not shards:
            return
        names = list(columns) if columns is not None else segment_schema(self.feature_config()).names
        read = list(dict.fromkeys(["track_id", *[c for c in names if c not in _FROM_INDEX]]))
        pds = pads.dataset([self.location.join("shards", s) for s in shards], filesystem=self.location.fs,
                           format="parquet")
        flt = pc.field("track_id").isin(sorted(ids))
        if filter is not None:
            flt = flt & filter
        for tagged in pds.scanner(columns=read, filter=flt, batch_size=batch_rows).scan_batches():
            batch = tagged.record_batch
            if not batch.num_rows:
                continue
            shard = tagged.fragment.path.rsplit("/", 1)[-1]
            tids = batch.column("track_id").to_pylist()
            mask = [tracks[t].shard == shard for t in tids]
            if not all(mask):
                batch = batch.filter(pa.array(mask))
                tids = [t for t, m in zip(tids, mask) if m]
                if not batch.num_rows:
                    continue
            cols = []
            for c in names:
                if c in _FROM_INDEX:
                    cols.append(pa.array([getattr(tracks[t], c) for t in tids], _FROM_INDEX[c]))
                else:
                    cols.append(batch.column(c))
            yield pa.RecordBatch.from_arrays(cols, names=names)

    def read_segments(self, columns: list[str] | None = None, filter=None) -> pa.Table:
        """Every segment row of this version (see :meth:`iter_segments`), as one table."""
        batches = list(self.iter_segments(columns, filter=filter))
        if not batches:
            schema = segment_schema(self.feature_config())
            return schema.empty_table() if columns is None else schema.empty_table().select(columns)
        return pa.Table.from_batches(batches)

    # -- writing: commits of the index (the caller holds the dataset's lock) ------------------
    @contextmanager
    def writing(self, what: str) -> Iterator["Dataset"]:
        """A writer session on the index while the block runs: a dataset without an index is converted
        first (one commit: its footers' index), then the session's fence is committed; every write of this
        object is then a commit fenced on the session's last version (a lost race raises
        :class:`~genrecls.storage.index.CommitConflict`)."""
        if self._writer is not None:
            yield self
            return
        writer = IndexWriter(self.location, what)
        if not is_converted(self.location):
            initial = legacy_rows(self.location) if self.location.exists("shards") else None
            writer.open(initial=initial, operation="convert")
            self._retire_touched()
        else:
            writer.open()
        self._writer = writer
        self._tracks = self._tracks_of = None
        try:
            yield self
        finally:
            self._writer = None
            self._snapshot = writer.snapshot
            self._legacy_rows = None
            self._asked_version = writer.version

    def commit(self, *, upsert: pa.Table | None = None, update: Mapping[str, Mapping[str, Any]] | None = None,
               delete: Iterable[str] = (), operation: str = "write") -> int | None:
        """One commit of the index (see :meth:`genrecls.storage.index.IndexWriter.commit`); returns the version."""
        if self._writer is None:
            with self.writing(f"genrecls {operation}"):
                return self.commit(upsert=upsert, update=update, delete=delete, operation=operation)
        try:
            return self._writer.commit(upsert=upsert, update=update, delete=delete, operation=operation)
        except OSError as exc:
            raise OutputError(f"cannot write the index of {self.uri}: {exc}") from exc

    def _retire_touched(self) -> None:
        """A converted dataset's index holds every stat: the old touched table goes."""
        for n in self.location.list(TOUCHED, suffix=".parquet"):
            self.location.delete(TOUCHED, n)

    def relabel(self, labels: Mapping[str, str | None]) -> int:
        """Give tracks another label (None: unlabelled, stored but never trained on), in one commit: no shard
        is rewritten (readers take labels from the index).  Unknown tracks are ignored; returns how many
        tracks changed."""
        tracks = self.tracks()
        change = {t: {"label": lab} for t, lab in labels.items() if t in tracks and tracks[t].label != lab}
        if change:
            self.commit(update=change, operation="relabel")
        return len(change)

    def touched(self) -> dict[str, tuple[int, int, str]]:
        """track_id -> (size, mtime_ns, fingerprint) of files seen unchanged under a new stat that the index
        does not hold yet: only a dataset without an index keeps such a table (``touched/``); with the
        index, :meth:`record_touched` commits the new stat into the track's row."""
        if self.converted():
            return {}
        return _read_touched(self.location)

    def record_touched(self, rows: Mapping[str, tuple[int, int, str]]) -> int:
        """The files of these tracks now have this stat (size, mtime_ns) and their content is the stored one
        (fingerprint): one commit updating the tracks' size and mtime (none when nothing changes).  Returns
        how many tracks changed.  ``genrecls tag`` records the files it wrote so (their tags changed, not the
        audio the shards and the embedding store hold)."""
        tracks = self.tracks()
        change = {t: {"size": int(v[0]), "mtime_ns": int(v[1])} for t, v in rows.items()
                  if t in tracks and tracks[t].fingerprint == v[2] and (tracks[t].size, tracks[t].mtime_ns) != tuple(v[:2])}
        if change:
            self.commit(update=change, operation="touched")
        return len(change)

    def reconcile(self, drop_track_ids: Iterable[str] = ()) -> dict[str, int]:
        """Remove temporary files a killed writer left (local disks) and, in one commit, the given tracks.

        No shard is rewritten: a dropped track's rows stay in their shard until ``genrecls vacuum``.
        """
        removed_tmp = self.location.remove_temporaries("shards") + self.records.remove_temporaries()
        drop = [t for t in set(drop_track_ids) if t in self.tracks()]
        if drop:
            self.commit(delete=drop, operation="prune")
        return {"temporaries_removed": removed_tmp, "tracks_dropped": len(drop), "rows_superseded": 0}

    def _write(self, rel: str, writer) -> None:
        try:
            self.location.write_atomic(rel, writer)
        except OSError as exc:
            raise OutputError(f"cannot write {rel} in {self.uri}: {exc}") from exc

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

    def compact_failures(self, live_paths: set[str], discovered_paths: set[str] | None = None) -> int:
        """Rewrite the failures table as one part: drop paths that now have rows or that vanished."""
        return self.records.compact_failures(live_paths, discovered_paths)

    def compact_warnings(self) -> int:
        """Rewrite the warnings table as one part: only rows of the tracks' current versions."""
        return self.records.compact_warnings({e.path: (e.size, e.mtime_ns) for e in self.tracks().values()})


#: columns a reader takes from the index, not from the shard (a commit changes them without rewriting a shard)
_FROM_INDEX = {"label": pa.string(), "size": pa.int64(), "mtime_ns": pa.int64()}


def _read_touched(loc: Location) -> dict[str, tuple[int, int, str]]:
    out: dict[str, tuple[int, int, str]] = {}
    for n in loc.list(TOUCHED, suffix=".parquet"):
        with loc.fs.open_input_file(loc.join(TOUCHED, n)) as f:
            for r in pq.read_table(f).to_pylist():  # names are time-ordered: later overrides earlier
                out[r["track_id"]] = (r["size"], r["mtime_ns"], r["fingerprint"])
    return out


def read_footers(loc: Location, folder: str, names: list[str]) -> list[tuple[str, dict[bytes, bytes]]]:
    """(name, footer key-value metadata) of Parquet files in ``folder``, read in parallel (an object store
    answers each in two round trips)."""
    def one(name: str) -> tuple[str, dict[bytes, bytes]]:
        with loc.fs.open_input_file(loc.join(folder, name)) as f:
            return name, dict(pq.read_metadata(f).metadata or {})

    if len(names) <= 1:
        return [one(n) for n in names]
    with ThreadPoolExecutor(min(FOOTER_THREADS, len(names))) as pool:
        return list(pool.map(one, names))


def legacy_rows(loc: Location) -> pa.Table:
    """The index of a dataset written before the index existed, from its footers (in parallel): every
    shard's track list (the newest shard of a track wins), the touched table's stats, and the embedding
    store's entries that serve each track (the newest part with the track's fingerprint and segments)."""
    from genrecls.storage.index import StoredEmbedding, entries_table

    latest: dict[str, TrackEntry] = {}
    for name, meta in read_footers(loc, "shards", loc.list("shards", suffix=".parquet")):  # names sort by time
        raw = meta.get(TRACKS_KEY)
        if raw is None:
            raise DatasetError(f"shard {name} has no track list in its footer (not written by genrecls?)")
        for t in json.loads(raw):
            latest[t["track_id"]] = TrackEntry(shard=name, **{k: t[k] for k in _FOOTER_FIELDS},
                                               **{k: t[k] for k in _OPTIONAL_FIELDS if k in t})
    for tid, (size, mtime, fp) in _read_touched(loc).items():
        e = latest.get(tid)
        if e is not None and e.fingerprint == fp:
            latest[tid] = replace(e, size=size, mtime_ns=mtime)
    stored: dict[str, StoredEmbedding] = {}
    for name, meta in read_footers(loc, "embeddings", loc.list("embeddings", suffix=".parquet")):
        if TRACKS_KEY not in meta or BACKBONE_KEY not in meta:
            raise DatasetError(f"{loc.uri}/embeddings/{name} is not an embedding part written by genrecls "
                               "(no track list or backbone in its footer); remove it")
        how = StoredEmbedding(part=name, backbone=meta[BACKBONE_KEY].decode(),
                              features=json.dumps(json.loads(meta[FEATURES_KEY]), sort_keys=True),
                              layers=json.dumps(json.loads(meta[LAYERS_KEY])),
                              engine=json.dumps(json.loads(meta.get(ENGINE_KEY, b"{}") or b"{}"), sort_keys=True))
        for t in json.loads(meta[TRACKS_KEY]):
            e = latest.get(t["track_id"])
            if e is not None and (e.fingerprint, e.n_segments) == (t["fingerprint"], t["n_segments"]):
                stored[e.track_id] = how
    return entries_table(sorted(latest.values(), key=lambda e: e.track_id), stored)


#: what a shard footer lists of each track (TrackEntry but its shard)
_FOOTER_FIELDS = ("track_id", "path", "label", "fingerprint", "size", "mtime_ns", "n_segments", "duration_seconds")
#: the footer's fields that shards written before them lack (TrackEntry's defaults then)
_OPTIONAL_FIELDS = tuple(f.name for f in fields(TrackEntry) if f.name not in _FOOTER_FIELDS and f.name != "shard")
