"""The dataset's track index: a Delta Lake table (``DATASET/index/``), read and committed through ``deltalake``.

One row per track of the dataset: every field of :class:`TrackEntry` (its columns are derived
from the dataclass, so a field added there is a column here), then the track's entry in the
embedding store (``embedding_part``, and what computed it: ``embedding_backbone``,
``embedding_features``, ``embedding_layers``, ``embedding_engine``; null when the store lacks the
track).  The spectrogram shards and the embedding parts stay plain Parquet files beside the
table (Delta has no float16 type); the table says which of their rows are the dataset.

**Versions.**  Every change is one commit of the table (Delta's transaction log,
``index/_delta_log/``): a reader opens one version and reads exactly it, whatever is committed
meanwhile.  Shards and parts are never rewritten under their key: a changed or pruned track
leaves the index in a commit and its old rows stay in their file until ``genrecls vacuum``
deletes files no retained version references.  So a reader that opened version v reads all of
v while an ingest commits v+1.

**Commits.**  A commit writes new index files (Parquet, zstd, sorted by track id) and adds and
removes files in one log entry: the files holding a changed row are rewritten without it (copy
on write); small files are folded together when there are more than :data:`MAX_FILES` (so that
opening the index is a bounded number of requests however many commits it had; the log is
checkpointed every :data:`CHECKPOINT_INTERVAL` commits).  On S3 the log entry is created with a
conditional PUT (``If-None-Match: *``, deltalake's default since 1.0: no lock service, no
``AWS_S3_ALLOW_UNSAFE_RENAME``); on local disks with an exclusive create.

**The fence.**  Writers hold the dataset's lock (:mod:`genrecls.storage.locks`), and a writer
session starts with a commit of its own (a Delta app transaction ``genrecls.writer``, its
epoch): every later commit of the session is made on the version the session last saw, with no
retry, so a commit that lost a race, or one by a run whose lease expired and was taken over (the
new holder committed its fence), fails with :class:`CommitConflict` and changes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import time
import typing
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from genrecls.storage.location import Location
from genrecls.storage.locks import LockedError

__all__ = ["INDEX", "TrackEntry", "StoredEmbedding", "index_schema", "IndexSnapshot", "IndexWriter", "CommitConflict",
           "IndexError_", "storage_options", "table_uri", "is_converted", "TRACK_COLUMNS", "EMBEDDING_COLUMNS",
           "entries_table", "embedding_of", "track_of"]

log = logging.getLogger("genrecls")

#: the table's folder in a dataset
INDEX = "index"
#: the app id of a writer session's fence (Delta ``txn`` action); its version is the session's epoch
WRITER_APP = "genrecls.writer"
#: files in the table before a commit folds the small ones together
MAX_FILES = 16
#: an index file of at least this many rows is left alone by the folding (about 60 MB of index)
TARGET_ROWS = 1_000_000
#: the log is checkpointed every this many commits (opening reads at most this many JSON entries)
CHECKPOINT_INTERVAL = 10
#: threads reading index files at once
READ_THREADS = 8


@dataclass(frozen=True)
class TrackEntry:
    """A track of the dataset, as its index holds it (its rows are in ``shards/<shard>``)."""

    track_id: str
    path: str
    label: str | None
    fingerprint: str
    size: int
    mtime_ns: int
    n_segments: int
    duration_seconds: float
    shard: str
    #: the file's album and album-artist tags (None: none, or not read: a track ingested before they were)
    album: str | None = None
    album_artist: str | None = None
    #: the genres a person wrote in the file's tags, joined by "; " ("": none; None: not read); genres genrecls
    #: wrote are not a person's (genrecls.audio.tags.person_genres)
    genre_tag: str | None = None
    #: the file's audio fingerprint (BLAKE2b of its audio packets, genrecls.audio.decode.audio_fingerprint): a
    #: file whose bytes changed but whose audio did not (its tags were edited) is not decoded again
    audio_fingerprint: str | None = None


@dataclass(frozen=True)
class StoredEmbedding:
    """A track's entry in the embedding store: its part and what computed it (columns ``embedding_<name>``)."""

    part: str
    backbone: str
    features: str  # JSON
    layers: str  # JSON
    engine: str  # JSON


_ARROW = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}


def _columns(cls, prefix: str = "") -> list[pa.Field]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        t = hints[f.name]
        args = [a for a in typing.get_args(t) if a is not type(None)]
        base = args[0] if args else t
        if base not in _ARROW:
            raise TypeError(f"{cls.__name__}.{f.name}: no index column for type {t}")
        out.append(pa.field(prefix + f.name, _ARROW[base], nullable=f.name != "track_id"))
    return out


#: the index's columns of a track (every TrackEntry field) and of its embedding entry
TRACK_COLUMNS = [f.name for f in _columns(TrackEntry)]
EMBEDDING_COLUMNS = [f.name for f in _columns(StoredEmbedding, "embedding_")]


def index_schema() -> pa.Schema:
    """The table's schema: TrackEntry's fields, then StoredEmbedding's (``embedding_*``); all nullable but
    ``track_id`` (Delta adds only nullable columns to a table)."""
    return pa.schema(_columns(TrackEntry) + _columns(StoredEmbedding, "embedding_"))


class IndexError_(ValueError):
    """The index cannot be read (a version vacuumed away, a table of another program)."""


class CommitConflict(LockedError):
    """A commit lost a race: another writer committed the dataset since this session's last version.

    Nothing of the refused commit is visible (its new index files are deleted; shards and parts
    it named stay unreferenced until ``genrecls vacuum``)."""


def table_uri(loc: Location) -> str:
    """The table's URI for deltalake (no query string; the endpoint goes in :func:`storage_options`)."""
    import pyarrow.fs as pafs

    if loc.is_local:
        return loc.join(INDEX)
    if isinstance(loc.fs, pafs.S3FileSystem):
        return f"s3://{loc.join(INDEX)}"
    if isinstance(loc.fs, pafs.GcsFileSystem):
        return f"gs://{loc.join(INDEX)}"
    return f"{loc.uri.split('://', 1)[0]}://{loc.join(INDEX)}"


def storage_options(loc: Location) -> dict[str, str] | None:
    """deltalake's options for the dataset's store: endpoint, scheme and keys given in the URI; the rest
    (credentials, region) from the same environment as pyarrow's (``AWS_*``, profiles, instance roles)."""
    import pyarrow.fs as pafs

    if not isinstance(loc.fs, pafs.S3FileSystem):
        return None
    opts = loc.fs.__reduce__()[1][0]
    out: dict[str, str] = {}
    endpoint = opts.get("endpoint_override") or os.environ.get("AWS_ENDPOINT_URL_S3")
    if endpoint:
        scheme = opts.get("scheme") or "https"
        out["AWS_ENDPOINT_URL"] = endpoint if "://" in endpoint else f"{scheme}://{endpoint}"
        if out["AWS_ENDPOINT_URL"].startswith("http://"):
            out["AWS_ALLOW_HTTP"] = "true"
    if loc.fs.region:
        out["AWS_REGION"] = loc.fs.region
    for key, name in (("access_key", "AWS_ACCESS_KEY_ID"), ("secret_key", "AWS_SECRET_ACCESS_KEY"),
                      ("session_token", "AWS_SESSION_TOKEN")):
        if opts.get(key):
            out[name] = opts[key]
    return out


def is_converted(loc: Location) -> bool:
    """True when the dataset has its index table (``index/_delta_log/``)."""
    return loc.exists(INDEX, "_delta_log")


def _delta():
    import deltalake

    return deltalake


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns: a column it lacks (a file written before the column
    existed) is null; one the schema lacks is dropped."""
    cols = []
    for f in schema:
        if f.name in table.column_names:
            cols.append(table.column(f.name).cast(f.type))
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


@dataclass
class _File:
    path: str  # relative to index/
    rows: pa.Table


class IndexSnapshot:
    """One version of the index, read whole (its files in parallel): the dataset as readers see it."""

    def __init__(self, loc: Location, version: int | None, files: list[_File], table: Any = None):
        self.location = loc
        self.version = version
        self.files = files
        self._dt = table
        self._rows: pa.Table | None = None

    @classmethod
    def load(cls, loc: Location, version: int | None = None) -> "IndexSnapshot":
        dl = _delta()
        try:
            dt = dl.DeltaTable(table_uri(loc), version=version, storage_options=storage_options(loc))
        except Exception as exc:  # noqa: BLE001 - deltalake raises its own TableNotFoundError, OSError...
            what = f"version {version} of " if version is not None else ""
            raise IndexError_(f"cannot open {what}the index of {loc.uri} ({type(exc).__name__}: {exc})"
                              + ("; a version older than the vacuum's retention may be gone" if version is not None
                                 else "")) from exc
        return cls(loc, dt.version(), _read_files(loc, _active_paths(dt)), dt)

    @property
    def rows(self) -> pa.Table:
        """Every row, one per track, in the current schema (sorted by track id within each file)."""
        if self._rows is None:
            schema = index_schema()
            tables = [f.rows for f in self.files if f.rows.num_rows]
            self._rows = pa.concat_tables(tables) if tables else schema.empty_table()
        return self._rows


def _active_paths(dt) -> list[str]:
    actions = dt.get_add_actions(flatten=True)
    return actions.column("path").to_pylist() if actions.num_rows else []


def _read_files(loc: Location, paths: list[str]) -> list[_File]:
    schema = index_schema()

    def read(path: str) -> _File:
        with loc.fs.open_input_file(loc.join(INDEX, path)) as f:
            return _File(path, _conform(pq.read_table(f), schema))

    if len(paths) <= 1:
        return [read(p) for p in paths]
    with ThreadPoolExecutor(min(READ_THREADS, len(paths))) as pool:  # an object store answers each in round trips
        return list(pool.map(read, paths))


def _index_file_name() -> str:
    return f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"


class IndexWriter:
    """A writer session on the index (the caller holds the dataset's lock): a fence, then fenced commits.

    :meth:`open` creates the table when there is none (``initial`` rows: a converted dataset's
    index) and commits the session's fence; :meth:`commit` adds, replaces, updates and deletes
    rows in one commit made on the last version this session saw (no retry: see
    :class:`CommitConflict`).  :attr:`snapshot` is the version the session last committed.
    """

    def __init__(self, loc: Location, what: str):
        self.location = loc
        self.what = what
        self.token = uuid.uuid4().hex
        self.snapshot: IndexSnapshot | None = None
        self.epoch: int | None = None

    @property
    def version(self) -> int | None:
        return None if self.snapshot is None else self.snapshot.version

    # -- opening ------------------------------------------------------------------------------
    def open(self, initial: pa.Table | None = None, operation: str = "fence") -> "IndexWriter":
        dl = _delta()
        uri, opts = table_uri(self.location), storage_options(self.location)
        if not is_converted(self.location):
            schema = index_schema()
            try:
                dl.DeltaTable.create(uri, schema, mode="error", name="genrecls-track-index",
                                     description="genrecls: one row per track of the dataset (shards/ hold the rows)",
                                     configuration={"delta.checkpointInterval": str(CHECKPOINT_INTERVAL)},
                                     storage_options=opts,
                                     commit_properties=self._properties("create"))
            except Exception as exc:  # noqa: BLE001
                if not is_converted(self.location):
                    raise
                raise CommitConflict(f"{self.location.uri}: another writer created the index meanwhile ({exc})") from exc
        snap = IndexSnapshot.load(self.location)
        self.snapshot = snap
        self._evolve(snap)
        previous = snap._dt.transaction_version(WRITER_APP) or 0
        self.epoch = previous + 1
        if initial is not None and initial.num_rows:
            self.commit(upsert=initial, operation=operation, fence=True)
        else:
            self._commit([], [], self.snapshot.files, operation, fence=True)
        return self

    def _evolve(self, snap: IndexSnapshot) -> None:
        """Add the columns the table lacks (a field added to TrackEntry since it was created)."""
        have = set(snap._dt.schema().to_arrow().names)
        missing = [f for f in index_schema() if f.name not in have]
        if not missing:
            return
        from deltalake import Field, Schema

        fields_ = Schema.from_arrow(pa.schema(missing)).fields
        snap._dt.alter.add_columns(list(fields_) if not isinstance(fields_, Field) else [fields_],
                                   commit_properties=self._properties("add columns", retries=0))
        self.snapshot = IndexSnapshot.load(self.location, snap.version + 1)

    def _properties(self, operation: str, retries: int = 0, epoch: int | None = None):
        from deltalake import CommitProperties, Transaction

        meta = {"genrecls.operation": operation, "genrecls.writer": self.token, "genrecls.what": self.what,
                "genrecls.pid": str(os.getpid())}
        apps = [Transaction(WRITER_APP, epoch, int(time.time() * 1000))] if epoch is not None else None
        return CommitProperties(custom_metadata=meta, max_commit_retries=retries, app_transactions=apps)

    # -- committing ---------------------------------------------------------------------------
    def commit(self, *, upsert: pa.Table | None = None, update: Mapping[str, Mapping[str, Any]] | None = None,
               delete: Iterable[str] = (), operation: str = "write", fold: bool | None = None,
               fence: bool = False) -> int:
        """One commit: ``upsert`` rows replace the rows of their tracks (or add them), ``update`` sets some
        columns of existing rows (track_id -> {column: value}; unknown tracks are ignored), ``delete``
        removes tracks.  Returns the new version.  ``fold`` (default: when there are more than
        :data:`MAX_FILES` files) rewrites every small file into the new one."""
        assert self.snapshot is not None, "open() first"
        schema = index_schema()
        upsert = _conform(upsert, schema) if upsert is not None and upsert.num_rows else None
        update = {k: dict(v) for k, v in (update or {}).items()}
        delete = set(delete)
        replaced = set(upsert.column("track_id").to_pylist()) if upsert is not None else set()
        touched = replaced | delete | set(update)
        keep: list[pa.Table] = []
        removed: list[_File] = []
        kept_files: list[_File] = []
        for f in self.snapshot.files:
            if touched and f.rows.num_rows and pc.any(pc.is_in(f.rows.column("track_id"),
                                                                pa.array(sorted(touched), pa.string()))).as_py():
                removed.append(f)
                keep.append(_apply(f.rows, replaced | delete, update))
            else:
                kept_files.append(f)
        if fold is None:
            fold = len(kept_files) + 1 > MAX_FILES
        if fold:  # the small files first; every file under TARGET_ROWS when that is not enough
            for limit in (TARGET_ROWS // 16, TARGET_ROWS):
                small = [f for f in kept_files if f.rows.num_rows < limit]
                kept_files = [f for f in kept_files if f.rows.num_rows >= limit]
                removed += small
                keep += [f.rows for f in small]
                if len(kept_files) + 1 <= MAX_FILES // 2:
                    break
        new_rows = [t for t in keep + ([upsert] if upsert is not None else []) if t.num_rows]
        if not removed and not new_rows:
            return self.snapshot.version  # nothing to change
        table = pa.concat_tables(new_rows).sort_by("track_id") if new_rows else schema.empty_table()
        added = [_File(_index_file_name(), table.slice(i, TARGET_ROWS))
                 for i in range(0, table.num_rows, TARGET_ROWS)] if table.num_rows else []
        return self._commit(added, removed, kept_files, operation, fence)

    def _commit(self, added: list[_File], removed: list[_File], kept: list[_File], operation: str,
                fence: bool = False) -> int:
        from deltalake.exceptions import CommitFailedError
        from deltalake.transaction import AddAction, RemoveAction

        loc = self.location
        now = int(time.time() * 1000)
        actions: list[Any] = []
        written: list[str] = []
        try:
            for f in added:
                def write(out, rows=f.rows):
                    pq.write_table(rows, out, compression="zstd", row_group_size=128 * 1024)

                loc.write_atomic(f"{INDEX}/{f.path}", write)
                written.append(f.path)
                size = loc.fs.get_file_info(loc.join(INDEX, f.path)).size
                actions.append(AddAction(f.path, size, {}, now, True, json.dumps({"numRecords": f.rows.num_rows})))
            for f in removed:
                actions.append(RemoveAction(f.path, True, now, None, {}))
            base = self.snapshot._dt
            base.create_write_transaction(actions, "append", index_schema(),
                                          commit_properties=self._properties(operation, 0, self.epoch if fence else None))
        except CommitFailedError as exc:
            for p in written:
                loc.delete(INDEX, p)
            raise self._conflict() from exc
        except BaseException:
            for p in written:
                loc.delete(INDEX, p)
            raise
        version = self.snapshot.version + 1
        dt = _delta().DeltaTable(table_uri(loc), version=version, storage_options=storage_options(loc))
        self.snapshot = IndexSnapshot(loc, version, kept + added, dt)
        return version

    def _conflict(self) -> CommitConflict:
        who = ""
        try:
            dt = _delta().DeltaTable(table_uri(self.location), storage_options=storage_options(self.location))
            info = dt.history(1)[0]
            who = (f" (version {dt.version()} by {info.get('genrecls.what', 'another writer')}, pid "
                   f"{info.get('genrecls.pid', '?')})")
        except Exception:  # noqa: BLE001 - only the message's detail
            pass
        return CommitConflict(
            f"{self.location.uri}: another writer committed the dataset's index since this run's version "
            f"{self.snapshot.version}{who}: this run's lock must have been taken over (its lease expired) or the "
            "dataset was written without its lock; nothing of this commit was kept: re-run the command")


def _apply(rows: pa.Table, drop: set[str], update: Mapping[str, Mapping[str, Any]]) -> pa.Table:
    """``rows`` without the tracks in ``drop``, with ``update`` applied (track_id -> {column: value})."""
    if drop:
        rows = rows.filter(pc.invert(pc.is_in(rows.column("track_id"), pa.array(sorted(drop), pa.string()))))
    if not update or not rows.num_rows:
        return rows
    ids = rows.column("track_id").to_pylist()
    hit = [i for i, t in enumerate(ids) if t in update]
    if not hit:
        return rows
    cols = {}
    for name in {c for v in update.values() for c in v}:
        values = rows.column(name).to_pylist()
        for i in hit:
            if name in update[ids[i]]:
                values[i] = update[ids[i]][name]
        cols[name] = pa.array(values, rows.schema.field(name).type)
    for name, arr in cols.items():
        rows = rows.set_column(rows.schema.get_field_index(name), name, arr)
    return rows


def entries_table(entries: Iterable[TrackEntry], embeddings: Mapping[str, StoredEmbedding] | None = None) -> pa.Table:
    """Index rows of the given tracks (with their embedding entries, track_id -> StoredEmbedding)."""
    entries = list(entries)
    embeddings = embeddings or {}
    cols: dict[str, list[Any]] = {c: [getattr(e, c) for e in entries] for c in TRACK_COLUMNS}
    for f in fields(StoredEmbedding):
        cols[f"embedding_{f.name}"] = [getattr(embeddings[e.track_id], f.name) if e.track_id in embeddings else None
                                       for e in entries]
    return pa.Table.from_pydict(cols, schema=index_schema())


def embedding_of(row: Mapping[str, Any]) -> StoredEmbedding | None:
    if row.get("embedding_part") is None:
        return None
    return StoredEmbedding(**{f.name: row[f"embedding_{f.name}"] for f in fields(StoredEmbedding)})


def track_of(row: Mapping[str, Any]) -> TrackEntry:
    return TrackEntry(**{c: row[c] for c in TRACK_COLUMNS})
