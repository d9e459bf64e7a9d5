"""The classify stream: the Ray Data pipeline that turns tracks into predictions, and its stages.

Every track goes through two steps, run in one of two shapes (chosen on measurements:
``bench/classify.py``, ``bench/results/classify-width.json``)::

    input blocks of tracks (source, path, size, mtime_ns; the stored_* columns for tracks the
    dataset's embedding store serves, filled by genrecls.jobs.classify)
      -> featurise_batch   the model's input of each track: decode, segment, log-mel
                           (genrecls.audio.pipeline), at most K evenly spaced segments; or, for a
                           stored track, the same K segments' backbone layers read from the embedding
                           store (no decoding, no backbone); a bad file becomes a row with
                           error_kind/error_reason, never an exception
      -> Scorer            the model: the backbone on the inference engine for computed segments,
                           the head in NumPy (or a run's exported model), one row per track with
                           the prediction columns (genrecls.storage.predictions.prediction_columns)
      -> output blocks, consumed by the driver (genrecls.jobs.classify)

* **CPU (the default)**: one Ray task runs both steps for its tracks (:func:`classify_batch`),
  one task per CPU of the cluster, like ingest's tasks: the backbone, which costs several
  times decoding per segment, then runs on every CPU of every node, one engine thread per
  task (the CPUs Ray gave it), the engine made once per worker process and kept.
* **Model actors** (``--gpu``, or ``classify.actors`` > 0): CPU tasks featurise, a pool of
  long-lived actors score (one per GPU with ``--gpu``).  Ray Data puts an actor pool's
  function in its object store, so each actor start prints Ray's "constructor arguments in
  the object store" error line (ray-project/ray#57733): the CPU path has no actor.
* **In the command's process**: a small run on this machine (:func:`genrecls.jobs.classify`
  decides) calls :func:`classify_batch` on the same blocks without starting Ray.

The code here runs in Ray workers (the stages) or builds the pipeline in the driver
(:func:`stream`); it writes nothing.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from genrecls.audio.discovery import track_id_for
from genrecls.core.config import ClassifyConfig, DecodeConfig, FeatureConfig, InferenceConfig
from genrecls.core.runtime import quiet_ray_data
from genrecls.core.scheduling import slots, task_bounds
from genrecls.models.inference import aggregate_tracks
from genrecls.storage.location import Location
from genrecls.storage.predictions import prediction_columns, prediction_schema

__all__ = ["INPUT", "input_table", "featurise_batch", "Scorer", "classify_batch", "stream", "uses_actors",
           "DECODE_MAX_RETRIES", "TRACK_EMBEDDING_LAYER", "track_embedding_info", "stored_layers"]

#: columns of the stream's input blocks: the library's tracks; ``stored_part`` (null: compute the track) names the
#: embedding-store part holding the track's layers, with its content ``fingerprint``, ``stored_segments`` and
#: ``stored_duration``; ``album``, ``album_artist`` and ``genre_tag`` as the dataset knows them when ``tags_known``
#: (else they are read from the file)
INPUT = {"source": pa.string(), "path": pa.string(), "size": pa.int64(), "mtime_ns": pa.int64(),
         "stored_part": pa.string(), "fingerprint": pa.string(), "stored_segments": pa.int32(),
         "stored_duration": pa.float64(), "album": pa.string(), "album_artist": pa.string(), "genre_tag": pa.string(),
         "tags_known": pa.bool_()}
#: columns of the stream between the two steps and in its output, besides the predictions
_ERROR_COLUMNS = [pa.field(name, pa.string()) for name in ("error_kind", "error_reason", "warning_kind", "warning_reason")]
#: columns of a featurised batch: ``mels`` (computed segments, the features' dtype) or ``layers`` (a stored track's
#: segments' layers, float16, :func:`stored_layers` wide)
_FEATURISED = {"path": pa.string(), "track_id": pa.string(), "size": pa.int64(), "mtime_ns": pa.int64(),
               "duration": pa.float64(), "n_segments": pa.int32(), "mels": pa.large_binary(),
               "layers": pa.large_binary(), "album": pa.string(), "album_artist": pa.string(), "genre_tag": pa.string(),
               **{f.name: f.type for f in _ERROR_COLUMNS}}
#: at most this many input blocks, however large the library (bounds driver and scheduler overhead)
MAX_INPUT_BLOCKS = 4096
#: decoding tasks a worker process runs before it is replaced (bounds leaks of native decoders; the engine is
#: made again then: well under 1% of 100 tasks' time)
DECODE_MAX_CALLS = 100
#: retries of a decoding task whose worker process died (then its tracks are retried one by one)
DECODE_MAX_RETRIES = 2


def input_table(tracks: pa.Table) -> pa.Table:
    """``tracks`` (at least ``source, path, size, mtime_ns``) with every :data:`INPUT` column, in its order."""
    cols = [tracks.column(k).cast(t) if k in tracks.column_names else pa.nulls(tracks.num_rows, t) for k, t in INPUT.items()]
    return pa.Table.from_arrays(cols, names=list(INPUT))


def _stream_schema(labels: list[str], embedding: dict | None = None) -> pa.Schema:
    """The scorer's output: the prediction columns, the errors, where the scores came from, what scored (JSON)
    and where (the Ray node's id, null outside Ray, and the process)."""
    return pa.schema(list(prediction_schema(labels, embedding=embedding)) + _ERROR_COLUMNS
                     + [pa.field("from_store", pa.bool_()), pa.field("engine", pa.string()), pa.field("node", pa.string()),
                        pa.field("pid", pa.int64())])


#: the layer whose mean over a track's scored segments is its ``embedding`` column (frozen-backbone runs):
#: musicnn's 200-d penultimate layer, the same whichever embedding the run's head was fit on
TRACK_EMBEDDING_LAYER = "penultimate"


def track_embedding_info(info: dict) -> dict | None:
    """What a run's predictions hold in their ``embedding`` column (None: the run has no frozen-backbone head)."""
    head = info.get("head")
    if not head or not head.get("file"):
        return None
    return {"layer": TRACK_EMBEDDING_LAYER, "backbone": head.get("backbone"),
            "rule": "mean of the track's scored segments' embeddings", "dtype": "float32"}


def stored_layers(info: dict) -> tuple[str, ...]:
    """The backbone layers a frozen-backbone run scores a track from: its head's, then the track embedding's."""
    layers = list((info.get("head") or {}).get("layers") or [])
    return tuple(layers + ([TRACK_EMBEDDING_LAYER] if TRACK_EMBEDDING_LAYER not in layers else []))


# -- step 1: the model's input (CPU) --------------------------------------------------
def featurise_batch(batch: pa.Table, features: FeatureConfig, max_segments: int,
                    decode: DecodeConfig | None = None, watchdog_uri: str | None = None,
                    dataset_uri: str | None = None, layers: tuple[str, ...] = ()) -> pa.Table:
    """The model's input of a batch of tracks, one row per track.

    Input columns: :data:`INPUT`.  Output adds ``track_id``, ``duration``, ``n_segments``, and either
    ``mels`` (the computed segments (n, n_mels, n_frames) as bytes of ``features.dtype``) or, for a
    track with ``stored_part``, ``layers`` (the ``layers`` of the same evenly spaced segments read
    from the embedding store of ``dataset_uri``, float16 (n, sum of widths)); ``album``,
    ``album_artist`` and ``genre_tag`` (the genres a person wrote, joined by "; ": the dataset's,
    else the file's tags, a cheap header read; null without),
    ``error_kind`` / ``error_reason`` (set, with no segments, for a file that could not be used)
    and ``warning_kind`` / ``warning_reason`` (a file used although something is off; several
    joined with "; ").  A stored track whose part can no longer be read as planned (an ingest
    changed the dataset since) is decoded instead.  Never raises for a bad file.

    ``watchdog_uri``: a folder where a watchdog thread names a file whose decoding ran past
    :meth:`~genrecls.core.config.DecodeConfig.watchdog_seconds` (stuck in native code, out
    of reach of the in-task deadline) before it ends this worker process; Ray Data retries
    the batch, and the retry records that file as ``timed_out`` instead of decoding it again.
    """
    from genrecls.audio.pipeline import one_thread, tune_allocator
    from genrecls.core.hooks import pause_point

    tune_allocator()
    pause_point("classify-featurise")
    decode = decode or DecodeConfig()
    folder = Location.parse(watchdog_uri) if watchdog_uri else None
    stopped = {n[: -len(".json")]: n for n in folder.list(suffix=".json")} if folder is not None else {}
    with one_thread(), _Watchdog(folder) as watchdog:  # one CPU per decoding task (genrecls.audio.pipeline.one_thread)
        stored = _read_stored(batch, dataset_uri, layers, max_segments) if dataset_uri else {}
        return _featurise(batch, features, max_segments, decode, watchdog, stopped, stored)


def _read_stored(batch: pa.Table, dataset_uri: str, layers: tuple[str, ...], max_segments: int) -> dict[str, np.ndarray]:
    """path -> the stored layers (float16 (k, width)) of each stored track's K evenly spaced segments, for the
    tracks of ``batch`` whose part holds them with the planned fingerprint and number of segments."""
    from genrecls.audio.segments import evenly_spaced
    from genrecls.storage.embeddings import EmbeddingStore

    want: dict[str, dict[str, tuple[str, str, int]]] = {}
    for r in batch.select(["path", "stored_part", "fingerprint", "stored_segments"]).to_pylist():
        if r["stored_part"] is not None:
            want.setdefault(r["stored_part"], {})[track_id_for(r["path"])] = (r["path"], r["fingerprint"],
                                                                              int(r["stored_segments"] or 0))
    out: dict[str, np.ndarray] = {}
    store = EmbeddingStore(dataset_uri)
    for part, tracks in want.items():
        try:
            table = store.read_part(part, tracks, layers)
        except (OSError, ValueError):  # the part is gone (an ingest reconciled the store): decode those tracks
            continue
        ids = table.column("track_id").to_numpy(zero_copy_only=False)
        order = np.lexsort((table.column("segment_index").to_numpy(), ids))
        ids = ids[order]
        fps = table.column("fingerprint").take(pa.array(order)).to_pylist()
        values = np.concatenate([_layer_values(table.column(n)) for n in layers], axis=1)[order]
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, int)
        for a, b in zip(starts, np.r_[starts[1:], len(ids)]):
            path, fingerprint, n = tracks[str(ids[a])]
            if fps[a] != fingerprint or b - a != n:  # not the planned version of the track: decode it
                continue
            out[path] = values[a:b][evenly_spaced(n, max_segments)]
    return out


def _layer_values(column: pa.ChunkedArray) -> np.ndarray:
    arr = column.combine_chunks()
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)


class _Watchdog:
    """Ends this worker process when one file's decoding runs past its budget, after naming the file.

    The in-task deadline (``decode.timeout_*``) stops a decoding between two packets; a
    decoder stuck inside native code never gets there.  This thread does what ingest's
    driver does with ``ray.cancel(force=True)``, from inside the task, since Ray Data gives
    the driver no handle on a task: it writes ``TRACK_ID.json`` into the watchdog folder,
    then ends the process.
    """

    def __init__(self, folder: Location | None):
        import threading

        self.folder = folder
        self.current: tuple[dict, float, float] | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="genrecls-decode-watchdog", daemon=True)

    def __enter__(self) -> "_Watchdog":
        if self.folder is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()

    def watch(self, row: dict | None, budget: float = 0.0) -> None:
        import time

        self.current = (row, time.monotonic() + budget, budget) if row is not None else None

    def _run(self) -> None:
        import json
        import os
        import time

        while not self.stop.wait(0.25):
            current = self.current
            if current is None or time.monotonic() < current[1]:
                continue
            row, _, budget = current
            reason = (f"decoding did not finish within {budget:.0f} s (twice its deadline, decode.timeout_seconds and "
                      "decode.timeout_seconds_per_mb, plus decode.watchdog_margin_seconds): the decoder is stuck; "
                      "its worker was stopped")
            try:
                self.folder.makedirs()
                self.folder.write_text(f"{track_id_for(row['path'])}.json", json.dumps(
                    {"path": row["path"], "size": row["size"], "mtime_ns": row["mtime_ns"], "reason": reason}))
            finally:  # unnamed (the store failed), the file ends up worker_crashed: never a hang
                os._exit(70)  # as ray.cancel(force=True) would: the native decoder cannot be interrupted


def _featurise(batch: pa.Table, features: FeatureConfig, max_segments: int, decode: DecodeConfig,
               watchdog: _Watchdog, stopped: dict[str, str], stored: dict[str, np.ndarray]) -> pa.Table:
    import json

    from genrecls.audio.pipeline import sampled_track_features
    from genrecls.audio.tags import read_track_tags
    from genrecls.core.errors import failure_of
    from genrecls.core.hooks import pause_point

    dtype = np.float16 if features.dtype == "float16" else np.float32
    out: dict[str, list] = {k: [] for k in _FEATURISED}
    for row in batch.to_pylist():
        mels = layers = b""
        duration, kind, reason, warnings, n = None, None, None, [], 0
        tags = (row.get("album"), row.get("album_artist"), row.get("genre_tag"))
        tid = track_id_for(row["path"])
        try:
            if row["path"] in stored:  # scored from the embedding store: nothing to decode
                values = stored[row["path"]]
                layers, n, duration = np.ascontiguousarray(values, np.float16).tobytes(), len(values), row["stored_duration"]
                if not row.get("tags_known"):
                    tags = _tags(read_track_tags(row["source"]))  # never raises
            elif tid in stopped:  # a watchdog stopped an earlier try of this batch on this file
                kind, reason = "timed_out", json.loads(watchdog.folder.read_text(stopped[tid]))["reason"]
            else:
                watchdog.watch(row, decode.watchdog_seconds([row["size"]]))
                pause_point("classify-decode-track")  # tests: a decoder that never returns
                feats = sampled_track_features(row["source"], features, max_segments, decode)
                mels = np.ascontiguousarray(feats.mels, dtype=dtype).tobytes()
                n, duration, warnings = int(feats.mels.shape[0]), float(feats.duration), feats.warnings
                tags = _tags(read_track_tags(row["source"]))  # group_by = "album", review.csv; never raises
        except Exception as exc:  # recorded, never fatal for the batch
            kind, reason = failure_of(exc)
        finally:
            watchdog.watch(None)
        values = {"path": row["path"], "track_id": tid, "size": row["size"],
                  "mtime_ns": row["mtime_ns"], "duration": duration, "n_segments": n, "mels": mels, "layers": layers,
                  "album": tags[0], "album_artist": tags[1], "genre_tag": tags[2], "error_kind": kind, "error_reason": reason,
                  "warning_kind": warnings[0].kind if warnings else None,  # the most serious (genrecls.storage.records)
                  "warning_reason": "; ".join(w.reason for w in warnings) or None}
        for k, v in values.items():
            out[k].append(v)
    return pa.table({k: pa.array(out[k], t) for k, t in _FEATURISED.items()})


def _tags(t) -> tuple[str | None, str | None, str | None]:
    """A file's :class:`~genrecls.audio.tags.TrackTags` as the stream's album, album_artist, genre_tag."""
    from genrecls.audio.tags import TAG_SEPARATOR

    return t.album, t.album_artist, TAG_SEPARATOR.join(t.genres) or None


# -- step 2: score ----------------------------------------------------------------------
class Scorer:
    """The run's model, loaded once per process: scores featurised batches of tracks.

    Called with a batch of :func:`featurise_batch` rows; returns one row per track with the
    prediction columns (failed tracks pass through with their error).  The track scores
    (mean of the segments' probabilities) are calibrated and answered by ``rules``
    (:class:`genrecls.models.answers.AnswerRules`, chosen by the driver; None: the run's own
    rules with the default settings).

    A frozen-backbone ``musicnn`` run (``RUN/head.npz``) runs its head in NumPy
    (:func:`~genrecls.models.transfer.head_probabilities`) on the backbone's layers: read from
    the embedding store for a stored track, computed on the inference engine
    (:class:`~genrecls.models.engine.BackboneEngine`, once per segment, made when the first
    computed segment comes) otherwise; it also returns each track's ``embedding``
    (:func:`track_embedding_info`).  Any other run is its ``model.onnx``
    (:class:`~genrecls.models.inference.Predictor`).  ``threads`` 0: the CPUs Ray gave this task
    or actor (in the command's own process: its CPUs).
    """

    def __init__(self, run_uri: str, batch_size: int, top_k: int, threads: int = 0, engine: str = "auto",
                 precision: str = "auto", rules=None):
        from genrecls.core.runtime import quiet_environment
        from genrecls.models.inference import read_run_info

        quiet_environment()
        info = read_run_info(run_uri)
        self.run_uri, self.threads, self.engine_name, self.precision = run_uri, threads, engine, precision
        self.embedding = track_embedding_info(info)
        self.head = self._backbone = self._predictor = None
        if self.embedding is not None:
            from genrecls.models.transfer import load_head

            self.head = load_head(run_uri)
            self.layers = stored_layers(info)
        from genrecls.core.config import FeatureConfig

        features = FeatureConfig(**info["features"])
        self.labels = list(info["labels"])
        self.model_id = info["model_id"]
        self.max_batch = int(info.get("max_batch") or 0)
        self.shape = features.mel_shape
        self.dtype = np.float16 if features.dtype == "float16" else np.float32
        self.batch_size = batch_size
        self.top_k = top_k
        self.schema = _stream_schema(self.labels, self.embedding)
        if rules is None:
            from genrecls.core.config import ClassifyConfig
            from genrecls.models.answers import rules_for_run

            rules = rules_for_run(Location.parse(run_uri), info, ClassifyConfig())
        self.rules = rules

    # what computes: made on first use (a batch scored from the store alone never loads a runtime)
    def _model(self):
        if self.head is not None:
            if self._backbone is None:
                from genrecls.models.transfer import shared_backbone

                # one engine per process, its threads set explicitly (0: the CPUs Ray gave this task or actor)
                self._backbone = shared_backbone(self.engine_name, self.precision, self.threads)
                if self._backbone.backbone_id() != self.embedding["backbone"]:
                    raise ValueError(f"{self.run_uri}'s head was fit on the backbone {self.embedding['backbone']}, "
                                     f"this genrecls has {self._backbone.backbone_id()}: classify with the genrecls "
                                     "that trained it")
            return self._backbone
        if self._predictor is None:
            from genrecls.models.inference import Predictor

            self._predictor = Predictor(self.run_uri, engine=self.engine_name, precision=self.precision,
                                        threads=self.threads)
        return self._predictor

    def describe(self, computed: bool) -> dict[str, Any]:
        """What scored a batch: the runtime (when a segment was computed) and the head."""
        if self.head is None:
            return self._model().describe()
        if not computed:
            return {"engine": "none", "head": "numpy (head.npz)", "layers": "embedding store"}
        return {**self._model().describe(), "head": "numpy (head.npz)"}

    def _score(self, mels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Segment probabilities, and with a head the segments' track-embedding layer."""
        if self.head is None:
            return self._model().predict(mels, batch_size=self.batch_size), None
        backbone = self._model()
        step = min(self.batch_size, self.max_batch or self.batch_size)
        outs = [backbone(mels[i:i + step]) for i in range(0, len(mels), step)]
        return self._head({name: np.concatenate([o[name] for o in outs]) for name in outs[0]})

    def _head(self, layers: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        from genrecls.models.transfer import head_probabilities

        return head_probabilities(layers, self.head), np.asarray(layers[self.embedding["layer"]], np.float32)

    def _stored(self, blobs: list[bytes]) -> dict[str, np.ndarray]:
        """Stored tracks' layer blocks (:func:`featurise_batch`'s ``layers``) as name -> (segments, width) float32."""
        from genrecls.core.config import HEAD_LAYERS

        values = np.concatenate([np.frombuffer(b, np.float16) for b in blobs])
        widths = [HEAD_LAYERS[n] for n in self.layers]
        values = values.reshape(-1, sum(widths)).astype(np.float32)
        bounds = np.cumsum([0, *widths])
        return {n: values[:, a:b] for n, a, b in zip(self.layers, bounds, bounds[1:])}

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        errors = batch.column("error_kind").to_pylist()
        from_store = [e is None and len(b) > 0 for e, b in zip(errors, batch.column("layers").to_pylist())]
        probs = np.full((n, len(self.labels)), np.nan, np.float32)
        embeddings: list[list[float] | None] = [None] * n
        counts = batch.column("n_segments").to_pylist()
        for stored in (False, True):
            rows = [i for i in range(n) if errors[i] is None and from_store[i] == stored]
            if not rows:
                continue
            if stored:
                seg_probs, seg_emb = self._head(self._stored([batch.column("layers")[i].as_py() for i in rows]))
            else:
                mels = np.concatenate([np.frombuffer(batch.column("mels")[i].as_py(), dtype=self.dtype) for i in rows])
                seg_probs, seg_emb = self._score(mels.reshape(-1, *self.shape).astype(np.float32))
            owners = [str(i) for i in rows for _ in range(counts[i])]
            ids, track_probs = aggregate_tracks(owners, seg_probs)
            probs[[int(t) for t in ids]] = track_probs
            if seg_emb is not None:  # the same rule: the mean over the track's scored segments
                _, track_emb = aggregate_tracks(owners, seg_emb)
                for t, v in zip(ids, track_emb):
                    embeddings[int(t)] = v.tolist()
        computed = any(e is None and not s for e, s in zip(errors, from_store))
        return self._table(batch, probs, embeddings, errors, from_store, computed)

    def _table(self, batch: pa.Table, probs: np.ndarray, embeddings: list, errors: list, from_store: list,
               computed: bool) -> pa.Table:
        import json

        n = batch.num_rows
        probs = self.rules.calibrate(np.nan_to_num(probs))  # prob_<label>: calibrated probabilities
        cols = prediction_columns(probs, self.labels, self.top_k)
        ans = self.rules.answer(probs)  # genre, confidence... in the user's genres
        cols.update({"genre": pa.array(ans["genre"], pa.string()), "confidence": pa.array(ans["confidence"], pa.float32()),
                     "top_genre": pa.array(ans["top_genre"], pa.string()),
                     "genres": pa.array(ans["genres"], pa.list_(pa.string())),
                     "parent_genres": pa.array(ans["parent_genres"], pa.list_(pa.string())),
                     "answers_id": pa.array([self.rules.answers_id] * n, pa.string())})
        valid = pa.array([e is None for e in errors])
        now = dt.datetime.now(dt.timezone.utc)
        arrays = {name: batch.column(name) for name in ("path", "track_id", "n_segments", "duration", "size", "mtime_ns",
                                                        "album", "album_artist", "genre_tag")}
        for name, arr in cols.items():  # predictions of failed tracks are null
            arrays[name] = pc.if_else(valid, arr, pa.nulls(n, arr.type))
        arrays["album_genre"] = pa.nulls(n, pa.string())  # the classify driver's album pass fills them
        arrays["album_confidence"] = pa.nulls(n, pa.float32())
        arrays["model_id"] = pa.array([self.model_id] * n, pa.string())
        arrays["classified_at"] = pa.array([now] * n, pa.timestamp("ms", tz="UTC"))
        for name in ("error_kind", "error_reason", "warning_kind", "warning_reason"):
            arrays[name] = batch.column(name)
        if self.embedding is not None:
            arrays["embedding"] = pa.array(embeddings, pa.list_(pa.float32()))
        arrays["from_store"] = pa.array(from_store, pa.bool_())
        arrays["engine"] = pa.array([json.dumps(self.describe(computed), sort_keys=True)] * n, pa.string())
        arrays["node"] = pa.array([_node_id()] * n, pa.string())
        arrays["pid"] = pa.array([os.getpid()] * n, pa.int64())
        return pa.table({f.name: arrays[f.name] for f in self.schema}, schema=self.schema)


def _node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return None


#: this process's scorers (a Ray worker runs many tasks: the model is loaded once), by what they were made with
_SCORERS: dict[tuple, Scorer] = {}


def _process_scorer(run_uri: str, batch_size: int, top_k: int, threads: int, engine: str, precision: str,
                    rules) -> Scorer:
    key = (run_uri, batch_size, top_k, threads, engine, precision, getattr(rules, "answers_id", None))
    if key not in _SCORERS:
        if len(_SCORERS) >= 2:  # another run in the same process (a notebook): keep memory bounded
            _SCORERS.clear()
        _SCORERS[key] = Scorer(run_uri, batch_size, top_k, threads, engine, precision, rules)
    return _SCORERS[key]


def classify_batch(batch: pa.Table, *, features: FeatureConfig, max_segments: int, decode: DecodeConfig | None = None,
                   watchdog_uri: str | None = None, dataset_uri: str | None = None, layers: tuple[str, ...] = (),
                   run_uri: str, batch_size: int, top_k: int, threads: int = 0, engine: str = "auto",
                   precision: str = "auto", rules=None) -> pa.Table:
    """Both steps on one batch of tracks in this process: :func:`featurise_batch`, then this process's
    :class:`Scorer` (made once, kept).  What each CPU task runs, and a small run in the command's own process."""
    featurised = featurise_batch(batch, features, max_segments, decode, watchdog_uri, dataset_uri, layers)
    scorer = _process_scorer(run_uri, batch_size, top_k, threads, engine, precision, rules)
    return scorer(featurised)


# -- the pipeline -----------------------------------------------------------------------
def uses_actors(ccfg: ClassifyConfig) -> bool:
    """True when scoring runs in model actors (``--gpu`` or ``classify.actors`` > 0), not in the CPU tasks."""
    return bool(ccfg.gpu or ccfg.actors)


def _actors(ccfg: ClassifyConfig) -> int:
    import ray

    if ccfg.actors:
        return ccfg.actors
    return int(ray.cluster_resources().get("GPU", 0))


def input_blocks(todo: pa.Table, per_task: int, n_slots: int) -> list[pa.Table]:
    """The stream's input blocks: stored tracks (cheap: no decoding, no backbone) in blocks of up to 32 tasks'
    worth of one part's tracks, then the tracks to compute cut as ingest cuts its tasks
    (:func:`~genrecls.core.scheduling.task_bounds`), spread over ``n_slots``."""
    todo = input_table(todo)
    stored_mask = pc.is_valid(todo["stored_part"])
    stored = todo.filter(stored_mask).sort_by([("stored_part", "ascending"), ("path", "ascending")])
    computed = todo.filter(pc.invert(stored_mask))
    blocks = []
    if stored.num_rows:
        parts = stored.column("stored_part").to_pylist()
        start = 0
        for i in range(1, stored.num_rows + 1):  # a block: one part's tracks, at most 32 tasks' worth
            if i == stored.num_rows or parts[i] != parts[start] or i - start >= 32 * per_task:
                blocks.append(stored.slice(start, i - start))
                start = i
    max_blocks = max(1, MAX_INPUT_BLOCKS - len(blocks))
    blocks += [computed.take(pa.array(np.arange(a, b)))
               for a, b in task_bounds(computed.num_rows, per_task, n_slots, max_tasks=max_blocks)]
    return blocks


def stream(todo: pa.Table, run: Location, features: FeatureConfig, ccfg: ClassifyConfig, decode: DecodeConfig,
           workers: int | None, tracks_per_task: int, verbose: bool = False,
           watchdog: Location | None = None, inference: InferenceConfig | None = None,
           rules=None, dataset: str | None = None, layers: tuple[str, ...] = ()) -> Iterator[pa.Table]:
    """Build the Ray Data pipeline and yield its output blocks as they are produced.

    ``todo``: the tracks (:data:`INPUT` columns; stored tracks with ``stored_part``, read from the
    embedding store of ``dataset``: its ``layers``).  ``watchdog``: the folder where decoding tasks
    name the files their watchdog stopped (see :func:`featurise_batch`); None: no watchdog.
    ``inference``: the runtime and precision (each output block says in its ``engine`` column which
    ran).  ``rules``: the answer rules (:class:`genrecls.models.answers.AnswerRules`) applied.
    """
    inference = inference or InferenceConfig()
    import ray
    import ray.data

    quiet_ray_data(verbose)  # also when Ray was started before this job (a notebook, the tests)
    if ccfg.gpu and int(ray.cluster_resources().get("GPU", 0)) < 1:
        raise ValueError("classify.gpu: the Ray cluster has no GPU; drop --gpu or join a cluster with GPUs")
    decoders, _ = slots(workers)
    blocks = input_blocks(todo, tracks_per_task, decoders)
    ds = ray.data.from_arrow(blocks)
    # a block whose decoding worker keeps dying (a file that crashes a native decoder) is
    # dropped after DECODE_MAX_RETRIES retries instead of being retried forever; the driver
    # then retries its tracks one by one.  Past 1% of the blocks it is a run-level problem.
    ds.context.max_errored_blocks = max(16, len(blocks) // 100)
    step1 = {"features": features, "max_segments": ccfg.max_segments, "decode": decode,
             "watchdog_uri": watchdog.uri if watchdog is not None else None, "dataset_uri": dataset, "layers": layers}
    model = {"run_uri": run.uri, "batch_size": ccfg.batch_size, "top_k": ccfg.top_k, "engine": inference.engine,
             "precision": inference.precision, "rules": rules}
    # one input block is one task; max_calls recycles the worker processes now and then (bounds leaks of
    # native decoders); every CPU of the cluster runs one task (or --workers of them)
    tasks = dict(batch_size=None, batch_format="pyarrow", num_cpus=1, max_calls=DECODE_MAX_CALLS,
                 max_retries=DECODE_MAX_RETRIES, compute=ray.data.TaskPoolStrategy(size=decoders) if workers else None,
                 udf_modifying_row_count=False)
    if not uses_actors(ccfg):  # the whole chain in each CPU task: the backbone on every CPU
        ds = ds.map_batches(classify_batch, fn_kwargs={**step1, **model, "threads": 0}, **tasks)
    else:
        # the remote arguments of the two stages differ, so Ray Data does not fuse decoding into the
        # model actors, which would serialise it behind the actor pool
        ds = ds.map_batches(featurise_batch, fn_kwargs=step1, **tasks)
        per_track = max(1, ccfg.max_segments or 10)
        threads = max(1, math.ceil(ccfg.actor_cpus)) if not ccfg.gpu else 0
        ds = ds.map_batches(
            Scorer, fn_constructor_kwargs={"run_uri": run.uri, "batch_size": ccfg.batch_size, "top_k": ccfg.top_k,
                                           "threads": threads, "engine": inference.engine,
                                           "precision": inference.precision, "rules": rules},
            batch_size=max(1, ccfg.batch_size // per_track), batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=_actors(ccfg)),
            num_cpus=ccfg.actor_cpus, num_gpus=1 if ccfg.gpu else None, udf_modifying_row_count=False)
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1)


def local_stream(todo: pa.Table, run: Location, features: FeatureConfig, ccfg: ClassifyConfig, decode: DecodeConfig,
                 inference: InferenceConfig | None = None, rules=None, dataset: str | None = None,
                 layers: tuple[str, ...] = ()) -> Iterator[pa.Table]:
    """The same blocks scored in this process, one after another (no Ray): a small run.  The engine gets
    every CPU of this process; decoding one."""
    inference = inference or InferenceConfig()
    for block in input_blocks(todo, ccfg.tracks_per_task, 1):
        yield classify_batch(block, features=features, max_segments=ccfg.max_segments, decode=decode,
                             dataset_uri=dataset, layers=layers, run_uri=run.uri, batch_size=ccfg.batch_size,
                             top_k=ccfg.top_k, engine=inference.engine, precision=inference.precision, rules=rules)
