"""The classify job: a library of tracks -> one genre prediction per track, as a streaming Ray job.

Data flow, read top to bottom::

    discover(LIBRARY) -> skip tracks already classified by this model -> Ray Data stream:
        map_batches(featurise_batch)   CPU tasks: decode, segment, log-mel (genrecls.pipeline),
                                       at most K evenly spaced segments per track
        map_batches(Scorer)            long-lived actors that load the model once and score
                                       segments in batches (on GPUs with --gpu); per-track
                                       probabilities are the mean of the segment probabilities
                                       (genrecls.inference.aggregate_tracks, the evaluation rule)
    -> the driver iterates the output stream and writes parts as they fill.

The library is never materialised: decoded audio and spectrograms only exist inside the
stream, whose in-flight size Ray Data bounds; the driver holds at most one part of
predictions (``classify.part_rows`` rows) plus the list of paths.

Features come from the run folder (``RUN/run.json``), never from the user, so the inputs
are computed exactly as for training and evaluation: the same decoding, segmentation and
log-mel code, and spectrograms rounded to the dataset's storage type (float16 by default)
before they reach the model, as the training shards are.

Output folder (local path or URI)::

    PREDICTIONS/
      parts/part-*.parquet     one row per track (written whole, atomically)
      failures/part-*.parquet  path, kind, reason of every file that could not be classified
      warnings/part-*.parquet  path, kind, reason of every file classified although something is off
      predictions.csv          with --csv: a CSV copy of all parts, written at the end
      config.json              the resolved configuration (features are the run's)
      classify.json            the model (run, model_id, labels), library and last summary
      .lock                    held while a classify writes

Prediction columns: ``path`` (POSIX, relative to the library root), ``track_id`` (as in
ingest), ``genre`` (top-1), ``confidence`` (its probability), ``prob_<genre>`` for every
genre of the model, ``top_k`` (list of {genre, probability}, best first), ``n_segments``
(segments scored), ``duration`` (seconds of the whole track), ``size`` and ``mtime_ns`` of the
file, ``model_id`` and ``classified_at`` (UTC).

Re-runs: a track already classified by the same model with the same path, size and
modification time is skipped, so a re-run adds only new or changed files, and a run killed
at any point and re-run ends with exactly one prediction per track (parts appear only
complete; a reconcile step at the end keeps one row per path, of the current model).  An
output folder holds the predictions of one model: run another model on it and every track
is classified again, the old rows being dropped at the end of the run.

Faults: a bad file is recorded in ``failures/`` (as ingest records it) and the job goes on.
A decoding task whose worker process dies is retried by Ray; a batch that keeps killing its
worker (a file that crashes a native decoder) is dropped after ``DECODE_MAX_RETRIES``
retries and its tracks are retried one by one, so that only the culprit is recorded, as
``worker_crashed``.  Model actors that die are restarted by Ray Data.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import FALLBACK_MAX_SEGMENTS, ClassifyConfig, Config, DecodeConfig, FeatureConfig
from .discovery import Discovery, discover, track_id_for
from .inference import RUN_FILE, aggregate_tracks, read_run_info
from .tagger import TAGGER_MODEL
from .progress import Progress, format_duration, format_table
from .runtime import as_interrupted, log, ray_session
from .storage import Location

__all__ = [
    "resolve_run",
    "prediction_schema",
    "prediction_columns",
    "featurise_batch",
    "Scorer",
    "classify",
    "read_predictions",
    "format_summary",
]

PARTS = "parts"
FAILURES = "failures"
CSV_NAME = "predictions.csv"
INFO_NAME = "classify.json"
LABELS_KEY = b"genrecls.labels"
MODEL_KEY = b"genrecls.model_id"
#: columns of the stream between the CPU stage and the model actors, besides the predictions
_ERROR_COLUMNS = [pa.field(name, pa.string()) for name in ("error_kind", "error_reason", "warning_kind", "warning_reason")]
#: at most this many input blocks, however large the library (bounds driver and scheduler overhead)
MAX_INPUT_BLOCKS = 4096
#: decoding tasks a worker process runs before it is replaced
DECODE_MAX_CALLS = 100
#: retries of a decoding task whose worker process died (then its tracks are retried one by one)
DECODE_MAX_RETRIES = 2


# -- the model ------------------------------------------------------------------------
def resolve_run(run: str | os.PathLike | Location) -> Location:
    """The run folder to load a model from.

    RUN is a run folder (``RUN/run.json`` + ``RUN/model/``) or a model registry folder, whose
    current champion is used (:func:`genrecls.registry.resolve_run`).  This is the one place
    that turns the user's RUN argument into a run folder.
    """
    loc = run if isinstance(run, Location) else Location.parse(run)
    if loc.exists(RUN_FILE):
        return loc
    from .registry import resolve_run as resolve_registry

    resolved = Location.parse(resolve_registry(loc.uri))
    if not resolved.exists(RUN_FILE):
        raise FileNotFoundError(f"{loc.uri} is neither a genrecls run (no {RUN_FILE}) nor a model registry with a "
                                "champion; train one with 'genrecls train' or 'genrecls retrain'")
    return resolved


# -- output tables --------------------------------------------------------------------
def _top_k_type() -> pa.DataType:
    return pa.list_(pa.struct([pa.field("genre", pa.string()), pa.field("probability", pa.float32())]))


def prediction_schema(labels: list[str], model_id: str = "") -> pa.Schema:
    """Schema of a predictions part for a model with these labels (in output order)."""
    return pa.schema(
        [
            pa.field("path", pa.string(), nullable=False),
            pa.field("track_id", pa.string(), nullable=False),
            pa.field("genre", pa.string()),
            pa.field("confidence", pa.float32()),
            *[pa.field(f"prob_{g}", pa.float32()) for g in labels],
            pa.field("top_k", _top_k_type()),
            pa.field("n_segments", pa.int32()),
            pa.field("duration", pa.float64()),
            pa.field("size", pa.int64()),
            pa.field("mtime_ns", pa.int64()),
            pa.field("model_id", pa.string()),
            pa.field("classified_at", pa.timestamp("ms", tz="UTC")),
        ],
        metadata={LABELS_KEY: json.dumps(list(labels)).encode(), MODEL_KEY: model_id.encode()},
    )


def _stream_schema(labels: list[str]) -> pa.Schema:
    return pa.schema(list(prediction_schema(labels)) + _ERROR_COLUMNS)


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
        offsets, pa.StructArray.from_arrays([top_genre, top_prob], names=["genre", "probability"]), type=_top_k_type())
    return cols


# -- stage 1: decode and featurise (CPU tasks) ---------------------------------------
def featurise_batch(batch: pa.Table, features: FeatureConfig, max_segments: int,
                    decode: DecodeConfig | None = None) -> pa.Table:
    """Decode a batch of tracks into one row per track holding its stacked segments.

    Input columns: ``source`` (path to read), ``path`` (relative path), ``size``,
    ``mtime_ns``.  Output adds ``track_id``, ``duration``, ``n_segments``, ``mels`` (the
    segments (n, n_mels, n_frames) as bytes of ``features.dtype``), ``error_kind`` /
    ``error_reason`` (set, with no segments, for a file that could not be used) and
    ``warning_kind`` / ``warning_reason`` (a file used although something is off; several
    joined with "; ").  Never raises for a bad file.
    """
    from .pipeline import one_thread, tune_allocator

    tune_allocator()
    with one_thread():  # one CPU per decoding task: no spinning BLAS threads (genrecls.pipeline.one_thread)
        return _featurise(batch, features, max_segments, decode)


def _featurise(batch: pa.Table, features: FeatureConfig, max_segments: int, decode: DecodeConfig | None) -> pa.Table:
    from .failures import failure_of
    from .pipeline import sampled_track_features

    dtype = np.float16 if features.dtype == "float16" else np.float32
    out: dict[str, list] = {k: [] for k in ("path", "track_id", "size", "mtime_ns", "duration", "n_segments",
                                           "mels", "error_kind", "error_reason", "warning_kind", "warning_reason")}
    for row in batch.to_pylist():
        mels, duration, kind, reason, warnings = b"", None, None, None, []
        try:
            feats = sampled_track_features(row["source"], features, max_segments, decode)
            mels = np.ascontiguousarray(feats.mels, dtype=dtype).tobytes()
            n, duration, warnings = int(feats.mels.shape[0]), float(feats.duration), feats.warnings
        except Exception as exc:  # recorded, never fatal for the batch
            kind, reason = failure_of(exc)
            n = 0
        out["warning_kind"].append(warnings[0].kind if warnings else None)  # the most serious (genrecls.failures)
        out["warning_reason"].append("; ".join(w.reason for w in warnings) or None)
        out["path"].append(row["path"])
        out["track_id"].append(track_id_for(row["path"]))
        out["size"].append(row["size"])
        out["mtime_ns"].append(row["mtime_ns"])
        out["duration"].append(duration)
        out["n_segments"].append(n)
        out["mels"].append(mels)
        out["error_kind"].append(kind)
        out["error_reason"].append(reason)
    return pa.table({
        "path": pa.array(out["path"], pa.string()),
        "track_id": pa.array(out["track_id"], pa.string()),
        "size": pa.array(out["size"], pa.int64()),
        "mtime_ns": pa.array(out["mtime_ns"], pa.int64()),
        "duration": pa.array(out["duration"], pa.float64()),
        "n_segments": pa.array(out["n_segments"], pa.int32()),
        "mels": pa.array(out["mels"], pa.large_binary()),
        "error_kind": pa.array(out["error_kind"], pa.string()),
        "error_reason": pa.array(out["error_reason"], pa.string()),
        "warning_kind": pa.array(out["warning_kind"], pa.string()),
        "warning_reason": pa.array(out["warning_reason"], pa.string()),
    })


# -- stage 2: score (long-lived model actors) -----------------------------------------
class Scorer:
    """A model actor: loads the run's SavedModel once, then scores batches of tracks.

    Called by Ray Data with a batch of :func:`featurise_batch` rows; returns one row per
    track with the prediction columns (failed tracks pass through with their error).
    """

    def __init__(self, run_uri: str, batch_size: int, top_k: int, threads: int = 0):
        from .runtime import quiet_environment

        # the worker environment (genrecls.runtime.WORKER_ENV) turns TensorFlow's oneDNN kernels on:
        # they halve the CPU cost of the CNN, and probabilities differ from the reference kernels
        # only at the 1e-6 level
        quiet_environment()
        import tensorflow as tf

        if threads > 0:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(min(threads, 2))
            except RuntimeError:  # TensorFlow already initialised in this process
                pass
        from .inference import Predictor

        self.predictor = Predictor(run_uri)
        self.labels = self.predictor.labels
        self.model_id = self.predictor.model_id
        self.shape = self.predictor.features.mel_shape
        self.dtype = np.float16 if self.predictor.features.dtype == "float16" else np.float32
        self.batch_size = batch_size
        self.top_k = top_k
        self.schema = _stream_schema(self.labels)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        errors = batch.column("error_kind").to_pylist()
        ok = [i for i in range(n) if errors[i] is None]
        probs = np.full((n, len(self.labels)), np.nan, np.float32)
        if ok:
            blobs = batch.column("mels").to_pylist()
            counts = batch.column("n_segments").to_pylist()
            mels = np.concatenate([np.frombuffer(blobs[i], dtype=self.dtype) for i in ok])
            mels = mels.reshape(-1, *self.shape).astype(np.float32)
            seg_probs = self.predictor.predict(mels, batch_size=self.batch_size)
            owners = [str(i) for i in ok for _ in range(counts[i])]
            ids, track_probs = aggregate_tracks(owners, seg_probs)
            probs[[int(t) for t in ids]] = track_probs
        cols = prediction_columns(np.nan_to_num(probs), self.labels, self.top_k)
        valid = pa.array([e is None for e in errors])
        now = dt.datetime.now(dt.timezone.utc)
        arrays = {name: batch.column(name) for name in ("path", "track_id", "n_segments", "duration", "size", "mtime_ns")}
        for name, arr in cols.items():  # predictions of failed tracks are null
            arrays[name] = pc.if_else(valid, arr, pa.nulls(n, arr.type))
        arrays["model_id"] = pa.array([self.model_id] * n, pa.string())
        arrays["classified_at"] = pa.array([now] * n, pa.timestamp("ms", tz="UTC"))
        arrays["error_kind"] = batch.column("error_kind")
        for name in ("error_reason", "warning_kind", "warning_reason"):
            arrays[name] = batch.column(name)
        return pa.table({f.name: arrays[f.name] for f in self.schema}, schema=self.schema)


# -- the driver -----------------------------------------------------------------------
class _Output:
    """The predictions folder: parts, failures, reconcile."""

    def __init__(self, loc: Location):
        from .dataset import Dataset

        self.loc = loc
        self.failures = Dataset(loc)  # the failures/ table works exactly as a dataset's

    def part_names(self) -> list[str]:
        return self.loc.list(PARTS, suffix=".parquet")

    def index(self, columns: Iterable[str] = ("path", "size", "mtime_ns", "model_id")) -> pa.Table:
        """Chosen columns of every prediction plus ``part`` and ``row`` (its row in the part), oldest part first."""
        columns = list(columns)
        types = {"size": pa.int64(), "mtime_ns": pa.int64()}
        tables = []
        for name in self.part_names():
            with self.loc.fs.open_input_file(self.loc.join(PARTS, name)) as f:
                t = pq.read_table(f, columns=columns)
            t = t.append_column("part", pa.array([name] * t.num_rows, pa.string()))
            tables.append(t.append_column("row", pa.array(np.arange(t.num_rows, dtype=np.int64))))
        if not tables:
            return pa.table({**{c: pa.array([], types.get(c, pa.string())) for c in columns},
                             "part": pa.array([], pa.string()), "row": pa.array([], pa.int64())})
        return pa.concat_tables(tables, promote_options="permissive")

    def write_part(self, tables: list[pa.Table], schema: pa.Schema) -> str:
        from .dataset import new_shard_name

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

    def write_csv(self) -> None:
        """All parts as one CSV (top_k as ``genre:probability;...``), streamed part by part."""
        import pyarrow.csv as pacsv

        names = self.part_names()

        def flat(table: pa.Table) -> pa.Table:
            tk = table.column("top_k").to_pylist()
            text = [None if v is None else ";".join(f"{e['genre']}:{e['probability']:.6f}" for e in v) for v in tk]
            table = table.set_column(table.schema.get_field_index("top_k"), "top_k", pa.array(text, pa.string()))
            return table.set_column(table.schema.get_field_index("classified_at"), "classified_at",
                                    pc.strftime(table.column("classified_at"), format="%Y-%m-%dT%H:%M:%SZ"))

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


def _track_table(found: Discovery) -> pa.Table:
    """The library's tracks: ``source`` (path to read), ``path`` (relative), ``size``, ``mtime_ns``."""
    return pa.table({
        "source": pa.array([t.path for t in found.tracks], pa.string()),
        "path": pa.array([t.rel_path for t in found.tracks], pa.string()),
        "size": pa.array([t.size for t in found.tracks], pa.int64()),
        "mtime_ns": pa.array([t.mtime_ns for t in found.tracks], pa.int64()),
    })


def _plan(tracks: pa.Table, output: _Output, model_id: str, retry_failed: bool) -> tuple[pa.Table, int, int]:
    """Tracks still to classify (in path order), and how many were skipped as done / as known failures."""
    keys = ["path", "size", "mtime_ns"]
    index = output.index()
    done = index.filter(pc.equal(index["model_id"], model_id)).select(keys)
    todo = tracks.join(done, keys=keys, join_type="left anti") if done.num_rows else tracks
    skipped = tracks.num_rows - todo.num_rows
    known = 0
    if not retry_failed:
        failed = output.failures.failures().select(keys).drop_null()
        if failed.num_rows and todo.num_rows:
            before = todo.num_rows
            todo = todo.join(failed, keys=keys, join_type="left anti")
            known = before - todo.num_rows
    return todo.sort_by("path").select(tracks.column_names), skipped, known


def _input_blocks(todo: pa.Table, tracks_per_task: int, cpus: int) -> list[pa.Table]:
    """Tracks cut into input blocks: small ones for small runs (every CPU busy), capped in number."""
    n = todo.num_rows
    size = max(1, min(tracks_per_task, math.ceil(n / max(1, 2 * cpus))))
    size = max(size, math.ceil(n / MAX_INPUT_BLOCKS))
    return [todo.take(pa.array(np.arange(i, min(i + size, n)))) for i in range(0, n, size)]


def _actors(ccfg: ClassifyConfig) -> int:
    import ray

    if ccfg.actors:
        return ccfg.actors
    if ccfg.gpu:
        return int(ray.cluster_resources().get("GPU", 0))
    return 1


def _quiet_ray_data_console() -> None:
    """Ray Data installs its own INFO console handler on import; keep the console to errors.

    Its session log file (``logs/ray-data/ray-data.log``) still gets everything.
    """
    import logging

    from ray._private.log import PlainRayHandler

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, PlainRayHandler):
            handler.setLevel(logging.ERROR)


def _stream(todo: pa.Table, run: Location, features: FeatureConfig, ccfg: ClassifyConfig, decode: DecodeConfig,
            workers: int | None, tracks_per_task: int, verbose: bool = False) -> Iterator[pa.Table]:
    """Build the Ray Data pipeline and yield its output blocks as they are produced."""
    import ray
    import ray.data

    if not verbose:
        try:
            _quiet_ray_data_console()
        except ImportError:  # another Ray version: its console stays as Ray configures it
            pass
    if ccfg.gpu and int(ray.cluster_resources().get("GPU", 0)) < 1:
        raise ValueError("classify.gpu: the Ray cluster has no GPU; drop --gpu or join a cluster with GPUs")
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    decoders = min(cpus, workers) if workers else None
    blocks = _input_blocks(todo, tracks_per_task, decoders or cpus)
    ds = ray.data.from_arrow(blocks)
    # a block whose decoding worker keeps dying (a file that crashes a native decoder) is
    # dropped after DECODE_MAX_RETRIES retries instead of being retried forever; the driver
    # then retries its tracks one by one.  Past 1% of the blocks it is a run-level problem.
    ds.context.max_errored_blocks = max(16, len(blocks) // 100)
    # max_calls recycles decoding workers now and then (bounds leaks of native decoders) and, as
    # the two stages' remote arguments then differ, keeps Ray Data from fusing decoding into
    # the model actors, which would serialise it behind the actor pool
    ds = ds.map_batches(
        featurise_batch, fn_kwargs={"features": features, "max_segments": ccfg.max_segments, "decode": decode},
        batch_size=tracks_per_task, batch_format="pyarrow", num_cpus=1, max_calls=DECODE_MAX_CALLS,
        max_retries=DECODE_MAX_RETRIES, compute=ray.data.TaskPoolStrategy(size=decoders) if decoders else None,
        udf_modifying_row_count=False)
    per_track = max(1, ccfg.max_segments or 10)
    threads = max(1, math.ceil(ccfg.actor_cpus)) if not ccfg.gpu else 0
    ds = ds.map_batches(
        Scorer, fn_constructor_kwargs={"run_uri": run.uri, "batch_size": ccfg.batch_size, "top_k": ccfg.top_k,
                                       "threads": threads},
        batch_size=max(1, ccfg.batch_size // per_track), batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=_actors(ccfg)),
        num_cpus=ccfg.actor_cpus, num_gpus=1 if ccfg.gpu else None, udf_modifying_row_count=False)
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1)


def _record_rows(table: pa.Table, kind: str, reason: str) -> list[dict[str, Any]]:
    """Failure or warning rows (``kind``, ``reason``: the columns holding them) of a block's tracks."""
    from .failures import record_row

    return [record_row(r["path"], None, r[kind], r[reason], r["size"], r["mtime_ns"])
            for r in table.select(["path", kind, reason, "size", "mtime_ns"]).to_pylist() if r[kind] is not None]


def classify(library: str | os.PathLike, run: str | os.PathLike | Location, out: str | os.PathLike,
             cfg: Config | None = None, *, address: str | None = None, workers: int | None = None,
             root: str | None = None, csv: bool = False, prune: bool = False, progress: bool = True,
             verbose: bool = False) -> dict[str, Any]:
    """Classify every track of a library folder or manifest with a trained run.

    Parameters
    ----------
    library : a folder (any depth; folder names are not used) or a CSV/Parquet manifest with a ``path`` column
    run : a run folder (``RUN/run.json`` and ``RUN/model/``) or a model registry, see :func:`resolve_run`
    out : the predictions folder or URI (created; re-using it resumes and adds new tracks)
    cfg : the configuration; its ``classify`` section is used, features always come from the run
    address, workers : Ray cluster to join, CPUs of a local Ray (or decoding tasks on a cluster)
    root : base of relative paths in a manifest (default: the manifest's folder)
    csv : also write ``predictions.csv`` at the end
    prune : drop predictions of files no longer in the library
    progress, verbose : show the progress line; show Ray and TensorFlow logs

    Returns
    -------
    dict
        The run's summary: counts (``discovered``, ``skipped_done``, ``skipped_known_failures``,
        ``classified``, ``failed``), ``failures_by_kind``, ``tracks_total`` and
        ``genre_distribution`` of the whole predictions folder, throughput figures.

    Raises for run-level problems (no such library or run, output locked by another
    classify, no GPU with ``gpu``); never for a bad file.

    Examples
    --------
    >>> summary = classify("music/", "runs/main", "predictions/")  # doctest: +SKIP
    >>> summary["genre_distribution"]  # doctest: +SKIP
    {'rock': 812, 'jazz': 301, ...}
    """
    from .failures import record_row
    from .ingest import library_versions

    cfg = (cfg or Config()).validate()
    t0 = time.monotonic()
    if str(run) == TAGGER_MODEL:  # the pretrained tagger, no training: written once as a run folder
        from .models import import_tensorflow
        from .tagger import tagger_run

        import_tensorflow()
        run = tagger_run(Location.parse(out))
    run_loc = resolve_run(run)
    info = read_run_info(run_loc)
    labels, model_id = list(info["labels"]), str(info["model_id"])
    if cfg.classify.max_segments < 0:  # K chosen on the run's validation tracks (genrecls.selection)
        cfg = cfg.with_section(classify={"max_segments": int((info.get("classify") or {}).get(
            "max_segments", FALLBACK_MAX_SEGMENTS))})
    ccfg = cfg.classify
    features = FeatureConfig(**info["features"]).validate()
    if cfg.features != features and cfg.features != Config().features:
        log.warning("classify uses the feature settings stored in the run %s; the configured features are ignored", run_loc.uri)
    resolved = cfg.with_section(features=features)
    found = discover(library, root)
    tracks = _track_table(found)
    loc = Location.parse(out)
    output = _Output(loc)
    schema = prediction_schema(labels, model_id)
    summary: dict[str, Any] = {
        "predictions": loc.uri, "library": found.root, "run": run_loc.uri, "model_id": model_id, "labels": labels,
        "discovered": len(found.tracks), "ignored_files": found.ignored, "skipped_done": 0,
        "skipped_known_failures": 0, "classified": 0, "warned": 0, "failed": 0, "failures_by_kind": {}, "segments": 0,
        "audio_seconds": 0.0, "parts_written": 0, "rows_superseded": 0, "max_segments": ccfg.max_segments,
    }
    try:
        with loc.lock("genrecls classify"):
            removed = sum(loc.remove_temporaries(folder) for folder in (PARTS, FAILURES, "warnings")) + loc.remove_temporaries()
            if removed:
                log.info("removed %d temporary file(s) left by an interrupted run", removed)
            loc.write_text("config.json", resolved.to_json() + "\n")
            todo, summary["skipped_done"], summary["skipped_known_failures"] = _plan(tracks, output, model_id, ccfg.retry_failed)
            kinds: Counter[str] = Counter()
            if todo.num_rows:
                with ray_session(address, workers, verbose=verbose):
                    bar = Progress(todo.num_rows, "tracks", enabled=progress)
                    pending: list[pa.Table] = []
                    pending_fail: list[dict[str, Any]] = []
                    pending_warn: list[dict[str, Any]] = []
                    seen: set[str] = set()
                    rows = 0

                    def flush() -> None:
                        nonlocal rows
                        if pending:
                            output.write_part(pending, schema)
                            summary["parts_written"] += 1
                        output.failures.write_failures(pending_fail)
                        output.failures.write_warnings(pending_warn)
                        pending.clear()
                        pending_fail.clear()
                        pending_warn.clear()
                        rows = 0

                    def consume(block: pa.Table) -> None:
                        nonlocal rows
                        seen.update(block.column("path").to_pylist())
                        bad = pc.is_valid(block.column("error_kind"))
                        good, failed = block.filter(pc.invert(bad)), block.filter(bad)
                        if good.num_rows:
                            pending.append(good)
                            warned = _record_rows(good, "warning_kind", "warning_reason")
                            pending_warn.extend(warned)
                            summary["warned"] += len(warned)
                            rows += good.num_rows
                            summary["segments"] += int(pc.sum(good.column("n_segments")).as_py() or 0)
                        if failed.num_rows:
                            fr = _record_rows(failed, "error_kind", "error_reason")
                            pending_fail.extend(fr)
                            kinds.update(r["kind"] for r in fr)
                        seconds = float(pc.sum(good.column("duration")).as_py() or 0.0)
                        summary["classified"] += good.num_rows
                        summary["failed"] += failed.num_rows
                        summary["audio_seconds"] += seconds
                        bar.update(done=block.num_rows, failed=failed.num_rows, audio_seconds=seconds)
                        if rows >= ccfg.part_rows:
                            flush()

                    try:
                        for block in _stream(todo, run_loc, features, ccfg, cfg.decode, workers, ccfg.tracks_per_task,
                                             verbose):
                            consume(block)
                    except KeyboardInterrupt:
                        flush()  # keep what was scored before the stop
                        raise
                    lost = todo.filter(pc.invert(pc.is_in(todo["path"], value_set=pa.array(list(seen), pa.string()))))
                    if lost.num_rows:  # blocks dropped after their worker kept dying: isolate the culprit
                        log.warning("%d track(s) were lost with crashed workers; retrying them one by one", lost.num_rows)
                        for block in _stream(lost, run_loc, features, ccfg, cfg.decode, workers, 1, verbose):
                            consume(block)
                        for r in lost.filter(pc.invert(pc.is_in(lost["path"], value_set=pa.array(list(seen), pa.string())))).to_pylist():
                            pending_fail.append(record_row(
                                r["path"], None, "worker_crashed", "the worker process died while decoding this file "
                                f"(retried {DECODE_MAX_RETRIES} times); it may crash the audio decoder", r["size"], r["mtime_ns"]))
                            kinds["worker_crashed"] += 1
                            summary["failed"] += 1
                            bar.update(done=1, failed=1)
                    flush()
                    bar.close()
            problems = [record_row(p.rel_path, p.label, p.kind, p.reason) for p in found.problems]
            output.failures.write_failures(problems)
            kinds.update(p.kind for p in found.problems)
            summary["failed"] += len(problems)
            summary["failures_by_kind"] = dict(kinds)
            summary["rows_superseded"] = output.reconcile(model_id, tracks, drop_missing=prune)
            final = output.index(columns=("path", "genre", "size", "mtime_ns"))
            live = {r["path"]: (r["size"], r["mtime_ns"]) for r in final.select(["path", "size", "mtime_ns"]).to_pylist()}
            output.failures.warning_table.compact(lambda r: live.get(r["path"]) == (r["size"], r["mtime_ns"]))
            output.failures.compact_failures(set(live),
                                             set(tracks.column("path").to_pylist()) | {p.rel_path for p in found.problems})
            summary["tracks_total"] = final.num_rows
            summary["failures_total"] = output.failures.failures().num_rows
            counts = {d["values"]: d["counts"] for d in pc.value_counts(final["genre"]).to_pylist()} if final.num_rows else {}
            summary["genre_distribution"] = {g: counts.get(g, 0) for g in sorted(labels, key=lambda g: (-counts.get(g, 0), g))}
            if csv:
                output.write_csv()
                summary["csv"] = loc.join(CSV_NAME) if loc.is_local else loc.child(CSV_NAME).uri
            summary["wall_seconds"] = time.monotonic() - t0
            summary["tracks_per_second"] = (summary["classified"] + summary["failed"]) / max(summary["wall_seconds"], 1e-9)
            summary["audio_seconds_per_second"] = summary["audio_seconds"] / max(summary["wall_seconds"], 1e-9)
            loc.write_json(INFO_NAME, {
                "format": "genrecls-predictions", "run": run_loc.uri, "model_id": model_id, "labels": labels,
                "features": asdict(features), "library": found.root,
                "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "last_run": summary,
                "versions": library_versions()})
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: parts written so far stay; a re-run adds the rest
        stop = as_interrupted(exc)
        stop.kept = f"{summary['classified']} track(s) classified by this run are kept in {loc.uri}"
        raise stop from None
    return summary


def read_predictions(out: str | os.PathLike, columns: Iterable[str] | None = None) -> pa.Table:
    """All predictions of a predictions folder as one table (for tests and small libraries)."""
    import pyarrow.dataset as pads

    loc = Location.parse(out)
    names = loc.list(PARTS, suffix=".parquet")
    if not names:
        raise FileNotFoundError(f"{loc.uri} holds no predictions (no {PARTS}/*.parquet)")
    ds = pads.dataset([loc.join(PARTS, n) for n in names], filesystem=loc.fs, format="parquet")
    return ds.to_table(columns=list(columns) if columns is not None else None)


def format_summary(summary: dict[str, Any]) -> str:
    """The closing report of a classify run: counts, throughput, the library's genre distribution."""
    s = summary
    lines = [f"predictions {s['predictions']} (model {s['model_id']})",
             f"{s['discovered']} tracks found, {s['skipped_done']} already classified by this model, "
             f"{s['skipped_known_failures']} known failures skipped; {s['classified']} classified ({s['warned']} with a warning), {s['failed']} failed"
             + (f"; {s['ignored_files']} non-audio files ignored" if s.get("ignored_files") else "")]
    if s["classified"]:
        lines.append(f"{s['audio_seconds'] / 3600:.2f} h of audio in {format_duration(s['wall_seconds'])}: "
                     f"{s['tracks_per_second']:.1f} tracks/s, {s['audio_seconds_per_second']:.0f}x real time, "
                     f"{s['segments']} segments scored (at most {s['max_segments'] or 'all'} per track)")
    total = max(s["tracks_total"], 1)
    rows = [(g, n, f"{100 * n / total:.1f}%") for g, n in s["genre_distribution"].items()]
    rows.append(("total", s["tracks_total"], "100%" if s["tracks_total"] else "0%"))
    lines += ["", "genre distribution of the library:", format_table(rows, ("genre", "tracks", "share"))]
    if s["failures_total"]:
        lines.append(f"\n{s['failures_total']} file(s) could not be classified (table in {s['predictions']}/{FAILURES}/)"
                     + (": " + ", ".join(f"{k} {v}" for k, v in sorted(s["failures_by_kind"].items())) if s["failures_by_kind"] else ""))
    if s.get("csv"):
        lines.append(f"CSV copy: {s['csv']}")
    return "\n".join(lines)
