"""The predictions store: the folder ``genrecls classify`` writes, beside :mod:`genrecls.storage.dataset`.

Layout (local path or URI)::

    PREDICTIONS/
      parts/part-*.parquet     one row per track (written whole, atomically)
      failures/part-*.parquet  path, kind, reason of every file that could not be classified
      warnings/part-*.parquet  path, kind, reason of every file classified although something is off
      predictions.csv          with --csv: a CSV copy of all parts, written at the end
      config.json              the resolved configuration (features are the run's)
      classify.json            the model (run, model_id, labels), library and last summary
      .lock                    held while a classify writes
      .watchdog/TRACK_ID.json  during a run: a file whose decoder got stuck and was stopped (cleared at the end)

Prediction columns (:func:`prediction_schema`): ``path`` (POSIX, relative to the library
root), ``track_id`` (as in ingest), ``genre`` (the answer: the top genre, or the uncertain
word below the run's threshold), ``confidence`` (the top genre's calibrated probability),
``top_genre`` (what the model thought, even when uncertain), ``genres`` (list: every genre
clearing its own threshold, best first), ``parent_genres`` (list: their ancestors in the
user's vocabulary), ``prob_<label>`` for every label of the model (calibrated), ``top_k``
(list of {genre, probability} in the model's labels, best first), ``n_segments`` (segments
scored), ``duration`` (seconds of the whole track), ``size`` and ``mtime_ns`` of the file,
``album`` and ``album_artist`` (the file's tags, null without), ``genre_tag`` (the genres a person wrote in
the file's tags, joined by "; "; genres genrecls wrote are not a person's; null without), ``album_genre`` and
``album_confidence`` (with ``classify.group_by``: the answer for the track's album or folder),
``model_id``, ``answers_id`` (the rules that gave the answer columns:
:class:`genrecls.models.answers.AnswerRules`) and ``classified_at`` (UTC); for a
frozen-backbone ``musicnn`` run also ``embedding``: the track's embedding, the mean of its
scored segments' pretrained-backbone layer named in the schema's ``genrecls.embedding`` metadata
(the ``penultimate`` layer, 200 numbers, with the backbone's id).  The answer
columns are the answers module's; this module stores them.

Parts written before a column existed lack it: readers (:func:`read_predictions`,
:meth:`PredictionStore.index`, the CSV) see it as null.

A folder holds the predictions of one model and one row per path once :meth:`PredictionStore.reconcile`
ran: parts appear only complete, and reconcile drops rows of other models, of older
versions of a file, and older duplicates.  The failures and warnings tables are the same
as a dataset's (:class:`genrecls.storage.records.Records`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from genrecls.core.provenance import TIMESTAMP_FORMAT, library_versions, utc_timestamp
from genrecls.storage.location import Location, new_shard_name
from genrecls.storage.records import Records

__all__ = ["PARTS", "CSV_NAME", "INFO_NAME", "LIST_COLUMNS", "prediction_schema", "prediction_columns", "top_k_type",
           "conform", "PredictionStore", "read_predictions", "follow_moves"]

PARTS = "parts"
CSV_NAME = "predictions.csv"
INFO_NAME = "classify.json"
WATCHDOG = ".watchdog"
FORMAT = "genrecls-predictions"
LABELS_KEY = b"genrecls.labels"
MODEL_KEY = b"genrecls.model_id"
EMBEDDING_KEY = b"genrecls.embedding"


def top_k_type() -> pa.DataType:
    return pa.list_(pa.struct([pa.field("genre", pa.string()), pa.field("probability", pa.float32())]))


#: columns a list of genres (written to the CSV as ``a;b``)
LIST_COLUMNS = ("genres", "parent_genres")


def prediction_schema(labels: list[str], model_id: str = "", embedding: dict[str, Any] | None = None) -> pa.Schema:
    """Schema of a predictions part for a model with these labels (in output order).

    ``embedding`` (what the ``embedding`` column holds: ``layer``, ``backbone``, ``rule``...) adds that
    column, a list of float32 per track, and records the description in the schema metadata.
    """
    extra = [pa.field("embedding", pa.list_(pa.float32()))] if embedding else []
    meta = {EMBEDDING_KEY: json.dumps(embedding, sort_keys=True).encode()} if embedding else {}
    return pa.schema(
        [
            pa.field("path", pa.string(), nullable=False),
            pa.field("track_id", pa.string(), nullable=False),
            pa.field("genre", pa.string()),
            pa.field("confidence", pa.float32()),
            pa.field("top_genre", pa.string()),
            pa.field("genres", pa.list_(pa.string())),
            pa.field("parent_genres", pa.list_(pa.string())),
            *[pa.field(f"prob_{g}", pa.float32()) for g in labels],
            pa.field("top_k", top_k_type()),
            pa.field("n_segments", pa.int32()),
            pa.field("duration", pa.float64()),
            pa.field("size", pa.int64()),
            pa.field("mtime_ns", pa.int64()),
            pa.field("album", pa.string()),
            pa.field("album_artist", pa.string()),
            pa.field("genre_tag", pa.string()),
            pa.field("album_genre", pa.string()),
            pa.field("album_confidence", pa.float32()),
            pa.field("model_id", pa.string()),
            pa.field("answers_id", pa.string()),
            pa.field("classified_at", pa.timestamp("ms", tz="UTC")),
            *extra,
        ],
        metadata={LABELS_KEY: json.dumps(list(labels)).encode(), MODEL_KEY: model_id.encode(), **meta},
    )


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns, in its order: columns it lacks (an older part) are null, others dropped."""
    cols = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
            for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def prediction_columns(probs: np.ndarray, labels: list[str], k: int) -> dict[str, Any]:
    """Top-1 genre, its confidence, one probability column per genre and the top-k, as Arrow arrays.

    ``probs`` is (n_tracks, n_labels) per-track probabilities (rows sum to 1).
    """
    probs = np.asarray(probs, np.float32).reshape(-1, len(labels))
    k = min(k, len(labels))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    names = np.asarray(labels, dtype=object)
    best = order[:, 0] if len(probs) else np.zeros(0, np.int64)
    cols: dict[str, Any] = {
        "genre": pa.array(names[best].tolist() if len(probs) else [], pa.string()),
        "confidence": pa.array(probs[np.arange(len(probs)), best], pa.float32()),
    }
    for j, g in enumerate(labels):
        cols[f"prob_{g}"] = pa.array(probs[:, j], pa.float32())
    top_genre = pa.array(names[order].reshape(-1).tolist(), pa.string())
    top_prob = pa.array(np.take_along_axis(probs, order, axis=1).reshape(-1), pa.float32())
    offsets = pa.array(np.arange(0, len(probs) * k + 1, k, dtype=np.int32))
    cols["top_k"] = pa.ListArray.from_arrays(
        offsets, pa.StructArray.from_arrays([top_genre, top_prob], names=["genre", "probability"]), type=top_k_type())
    return cols


class PredictionStore:
    """A predictions folder: its parts, its failures and warnings tables, and the rules that keep it whole.

    Every write is atomic (:meth:`~genrecls.storage.location.Location.write_atomic`); the caller holds
    the folder's lock while writing (``genrecls classify`` does).
    """

    def __init__(self, location: str | os.PathLike | Location):
        self.loc = location if isinstance(location, Location) else Location.parse(location)
        #: failures/ and warnings/, the same tables as a dataset's (genrecls.storage.records)
        self.records = Records(self.loc)

    @property
    def uri(self) -> str:
        return self.loc.uri

    def watchdog(self) -> Location:
        """The folder where classify's decoding tasks name the files their watchdog stopped (genrecls.jobs.scoring)."""
        return self.loc.child(WATCHDOG)

    def clear_watchdog(self) -> None:
        """Forget the stopped files of an earlier run: a new run tries them again."""
        for name in self.loc.list(WATCHDOG, include_hidden=True):
            self.loc.delete(WATCHDOG, name)

    def remove_temporaries(self) -> int:
        """Delete what an interrupted writer left (``.tmp-*`` files); returns how many."""
        return self.loc.remove_temporaries(PARTS) + self.records.remove_temporaries() + self.loc.remove_temporaries()

    def part_names(self) -> list[str]:
        return self.loc.list(PARTS, suffix=".parquet")

    def index(self, columns: Iterable[str] = ("path", "size", "mtime_ns", "model_id"),
              types: dict[str, pa.DataType] | None = None) -> pa.Table:
        """Chosen columns of every prediction plus ``part`` and ``row`` (its row in the part), oldest part first.

        A column a part lacks (written before it existed) is null there, of type ``types[column]``
        (default: a string; ``size`` and ``mtime_ns`` are integers, ``prob_*`` and ``*confidence`` floats).
        """
        columns = list(columns)
        types = {"size": pa.int64(), "mtime_ns": pa.int64(), **(types or {})}

        def kind(c: str) -> pa.DataType:
            if c in types:
                return types[c]
            if c.startswith("prob_") or c.endswith("confidence"):
                return pa.float32()
            return pa.list_(pa.string()) if c in LIST_COLUMNS else pa.string()

        schema = pa.schema([pa.field(c, kind(c)) for c in columns])
        tables = []
        for name in self.part_names():
            with self.loc.fs.open_input_file(self.loc.join(PARTS, name)) as f:
                present = set(pq.read_schema(f).names)
                t = pq.read_table(f, columns=[c for c in columns if c in present])
            t = conform(t, schema)
            t = t.append_column("part", pa.array([name] * t.num_rows, pa.string()))
            tables.append(t.append_column("row", pa.array(np.arange(t.num_rows, dtype=np.int64))))
        if not tables:
            return pa.table({**{c: pa.array([], kind(c)) for c in columns},
                             "part": pa.array([], pa.string()), "row": pa.array([], pa.int64())})
        return pa.concat_tables(tables)

    def read_part(self, name: str) -> pa.Table:
        with self.loc.fs.open_input_file(self.loc.join(PARTS, name)) as f:
            return pq.read_table(f)

    def replace_part(self, name: str, table: pa.Table) -> None:
        """Write ``table`` over the part ``name`` (atomic replace; the caller holds the folder's lock)."""
        self.loc.write_atomic(f"{PARTS}/{name}", lambda out: pq.write_table(table, out, compression="zstd"))

    def write_part(self, tables: list[pa.Table], schema: pa.Schema) -> str:
        """Write ``tables`` (rows of :func:`prediction_schema` ``schema``, extra columns dropped) as one new part."""
        table = pa.concat_tables(tables).select(schema.names).cast(schema)
        name = new_shard_name()
        self.loc.write_atomic(f"{PARTS}/{name}", lambda out: pq.write_table(table, out, compression="zstd"))
        return name

    def reconcile(self, model_id: str, tracks: pa.Table, drop_missing: bool) -> int:
        """Keep exactly one prediction per path: the newest one by this model of the file as it is now.

        ``tracks`` holds the library's ``path, size, mtime_ns``.  Rows of other models, of an
        older version of a file (other size or mtime) and older duplicates are removed by
        rewriting their parts in place (atomic replace); with ``drop_missing``, rows of paths
        not in ``tracks`` (vanished files) too.  Returns the number of rows removed.
        """
        index = self.index()
        if not index.num_rows:
            return 0
        index = index.append_column("g", pa.array(np.arange(index.num_rows, dtype=np.int64)))
        now = tracks.select(["path", "size", "mtime_ns"]).rename_columns(["path", "now_size", "now_mtime"])
        j = index.join(now, keys="path", join_type="left outer")
        same = pc.and_(pc.equal(j["size"], j["now_size"]), pc.equal(j["mtime_ns"], j["now_mtime"]))
        stat_ok = pc.if_else(pc.is_valid(j["now_size"]), pc.fill_null(same, False), not drop_missing)
        ok = pc.and_(pc.equal(j["model_id"], model_id), stat_ok)
        winners = j.filter(ok).group_by("path").aggregate([("g", "max")]).column("g_max")
        stale = index.filter(pc.invert(pc.is_in(index["g"], value_set=winners)))
        by_part: dict[str, list[int]] = {}
        for part, row in zip(stale.column("part").to_pylist(), stale.column("row").to_pylist()):
            by_part.setdefault(part, []).append(row)
        for part, rows in by_part.items():
            self._rewrite_without(part, rows)
        return stale.num_rows

    def restat(self, moves: dict[str, list[tuple[tuple[int, int], tuple[int, int]]]]) -> int:
        """Give the rows of files whose tags genrecls rewrote their files' new size and modification time.

        ``moves``: path -> every (stat before, stat after) of the writes ``genrecls tag`` and its undo
        made, oldest first (their journal).  A row whose stat is one a write started from follows
        the writes (:func:`follow_moves`): its audio is the one it was classified on, so classify
        leaves it alone.  Parts are rewritten (atomically) only where a row changed; returns how
        many rows changed.  The caller holds the folder's lock.
        """
        index = self.index()
        changed: dict[str, dict[int, tuple[int, int]]] = {}
        for path, size, mtime, part, row in zip(*(index[c].to_pylist() for c in ("path", "size", "mtime_ns", "part",
                                                                                "row"))):
            if path in moves and size is not None:
                new = follow_moves((size, mtime), moves[path])
                if new != (size, mtime):
                    changed.setdefault(part, {})[row] = new
        for part, rows in changed.items():
            table = self.read_part(part)
            size, mtime = table.column("size").to_pylist(), table.column("mtime_ns").to_pylist()
            for r, (a, b) in rows.items():
                size[r], mtime[r] = a, b
            table = table.set_column(table.schema.get_field_index("size"), "size", pa.array(size, pa.int64()))
            table = table.set_column(table.schema.get_field_index("mtime_ns"), "mtime_ns", pa.array(mtime, pa.int64()))
            self.replace_part(part, table)
        return sum(len(r) for r in changed.values())

    def _rewrite_without(self, part: str, rows: list[int]) -> None:
        path = self.loc.join(PARTS, part)
        with self.loc.fs.open_input_file(path) as f:
            table = pq.read_table(f)
        mask = np.ones(table.num_rows, bool)
        mask[rows] = False
        if not mask.any():
            self.loc.delete(PARTS, part)
            return
        kept = table.filter(pa.array(mask))
        self.loc.write_atomic(f"{PARTS}/{part}", lambda out: pq.write_table(kept, out, compression="zstd"))

    def schema(self) -> pa.Schema | None:
        """The schema of every part together (columns of newer parts included; None without parts)."""
        schemas = []
        for name in self.part_names():
            with self.loc.fs.open_input_file(self.loc.join(PARTS, name)) as f:
                schemas.append(pq.read_schema(f))
        return _unify(schemas) if schemas else None

    def write_csv(self) -> None:
        """All parts as one CSV (top_k as ``genre:probability;...``, genre lists as ``a;b``; without ``embedding``),
        streamed part by part."""
        import pyarrow.csv as pacsv

        names = self.part_names()
        unified = self.schema()

        def flat(table: pa.Table) -> pa.Table:
            table = conform(table, unified)
            tk = table.column("top_k").to_pylist()
            text = [None if v is None else ";".join(f"{e['genre']}:{e['probability']:.6f}" for e in v) for v in tk]
            table = table.set_column(table.schema.get_field_index("top_k"), "top_k", pa.array(text, pa.string()))
            if "embedding" in table.column_names:  # a track's embedding stays in the Parquet parts
                table = table.drop_columns(["embedding"])
            for col in LIST_COLUMNS:
                if col in table.column_names:
                    joined = [None if v is None else ";".join(v) for v in table.column(col).to_pylist()]
                    table = table.set_column(table.schema.get_field_index(col), col, pa.array(joined, pa.string()))
            return table.set_column(table.schema.get_field_index("classified_at"), "classified_at",
                                    pc.strftime(table.column("classified_at"), format=TIMESTAMP_FORMAT))

        def write(out):
            writer, schema = None, None
            for name in names:
                with self.loc.fs.open_input_file(self.loc.join(PARTS, name)) as f:
                    table = flat(pq.read_table(f))
                if writer is None:
                    schema = table.schema
                    writer = pacsv.CSVWriter(out, schema)
                writer.write_table(table.select(schema.names).cast(schema))
            if writer is None:
                out.write(b"")
            else:
                writer.close()

        self.loc.write_atomic(CSV_NAME, write)

    def todo(self, tracks: pa.Table, model_id: str, retry_failed: bool) -> tuple[pa.Table, int, int]:
        """The tracks still to classify (in path order), and how many were skipped as done / as known failures.

        ``tracks`` holds the library's ``path, size, mtime_ns`` (other columns are kept).  A
        track is done when a prediction by ``model_id`` exists for the file as it is now; a
        known failure when the failures table holds the file as it is now.
        """
        keys = ["path", "size", "mtime_ns"]
        index = self.index()
        done = index.filter(pc.equal(index["model_id"], model_id)).select(keys)
        todo = tracks.join(done, keys=keys, join_type="left anti") if done.num_rows else tracks
        skipped = tracks.num_rows - todo.num_rows
        known = 0
        if not retry_failed:
            failed = self.records.failures().select(keys).drop_null()
            if failed.num_rows and todo.num_rows:
                before = todo.num_rows
                todo = todo.join(failed, keys=keys, join_type="left anti")
                known = before - todo.num_rows
        return todo.sort_by("path").select(tracks.column_names), skipped, known

    def compact_records(self, discovered_paths: set[str]) -> pa.Table:
        """Rewrite failures/ and warnings/ as one part each, for files as they are now; returns the live predictions.

        A failure row goes once its path has a prediction or left the library
        (``discovered_paths``); a warning row once its file changed.  The returned table
        holds ``path, genre, size, mtime_ns`` of every prediction kept by :meth:`reconcile`.
        """
        live = self.index(columns=("path", "genre", "size", "mtime_ns"))
        stats = {r["path"]: (r["size"], r["mtime_ns"]) for r in live.select(["path", "size", "mtime_ns"]).to_pylist()}
        self.records.compact_warnings(stats)
        self.records.compact_failures(set(stats), discovered_paths)
        return live

    def write_info(self, *, run: str, model_id: str, labels: list[str], features: dict[str, Any], library: str,
                   last_run: dict[str, Any], **extra: Any) -> None:
        """``classify.json``: the model the folder's predictions come from, the library, the last run's summary
        (and ``extra`` entries, e.g. the answer rules)."""
        self.loc.write_json(INFO_NAME, {
            "format": FORMAT, "run": run, "model_id": model_id, "labels": labels, "features": features,
            "library": library, "updated": utc_timestamp(), "last_run": last_run, "versions": library_versions(), **extra})

    def csv_uri(self) -> str:
        return self.loc.join(CSV_NAME) if self.loc.is_local else self.loc.child(CSV_NAME).uri


def follow_moves(stat: tuple[int, int], moves: list[tuple[tuple[int, int], tuple[int, int]]]) -> tuple[int, int]:
    """A file's (size, mtime_ns) after the writes ``moves`` (each (stat before, stat after), oldest first), for a
    file that had ``stat``: each write that started from the stat reached so far moves it on; a write that
    started elsewhere (the file changed in between) stops nothing but applies to another version."""
    for before, after in moves:
        if tuple(stat) == tuple(before):
            stat = tuple(after)
    return tuple(stat)


def read_predictions(out: str | os.PathLike | Location, columns: Iterable[str] | None = None) -> pa.Table:
    """All predictions of a predictions folder as one table (for tests and small libraries)."""
    import pyarrow.dataset as pads

    loc = out if isinstance(out, Location) else Location.parse(out)
    names = loc.list(PARTS, suffix=".parquet")
    if not names:
        raise FileNotFoundError(f"{loc.uri} holds no predictions (no {PARTS}/*.parquet)")
    schema = PredictionStore(loc).schema()  # parts of an older version lack newer columns: null there
    ds = pads.dataset([loc.join(PARTS, n) for n in names], filesystem=loc.fs, format="parquet", schema=schema)
    return ds.to_table(columns=list(columns) if columns is not None else None)


def _unify(schemas: list[pa.Schema]) -> pa.Schema:
    """The parts' schemas as one: every column of any part, in the newest part's order first."""
    newest = max(schemas, key=len)
    fields = list(newest)
    names = set(newest.names)
    for s in schemas:
        for f in s:
            if f.name not in names:
                fields.append(f)
                names.add(f.name)
    return pa.schema(fields, metadata=newest.metadata)
