"""The classify stream: the Ray Data pipeline that turns tracks into predictions, and its two stages.

::

    input blocks of tracks (source, path, size, mtime_ns)
      -> map_batches(featurise_batch)  CPU tasks: decode, segment, log-mel (genrecls.audio.pipeline),
                                       at most K evenly spaced segments per track; a bad file
                                       becomes a row with error_kind/error_reason, never an exception
      -> map_batches(Scorer)           long-lived model actors: score the segments in batches,
                                       one row per track with the prediction columns
                                       (genrecls.storage.predictions.prediction_columns)
      -> output blocks, consumed by the driver (genrecls.jobs.classify)

The code here runs in Ray workers (the stages) or builds the pipeline in the driver
(:func:`stream`); it writes nothing.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Iterator

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

__all__ = ["featurise_batch", "Scorer", "stream", "DECODE_MAX_RETRIES", "TRACK_EMBEDDING_LAYER", "track_embedding_info"]

#: columns of the stream between the CPU stage and the model actors, besides the predictions
_ERROR_COLUMNS = [pa.field(name, pa.string()) for name in ("error_kind", "error_reason", "warning_kind", "warning_reason")]
#: columns of a featurised batch (the output of the CPU stage)
_FEATURISED = {"path": pa.string(), "track_id": pa.string(), "size": pa.int64(), "mtime_ns": pa.int64(),
               "duration": pa.float64(), "n_segments": pa.int32(), "mels": pa.large_binary(),
               "album": pa.string(), "album_artist": pa.string(), **{f.name: f.type for f in _ERROR_COLUMNS}}
#: at most this many input blocks, however large the library (bounds driver and scheduler overhead)
MAX_INPUT_BLOCKS = 4096
#: decoding tasks a worker process runs before it is replaced
DECODE_MAX_CALLS = 100
#: retries of a decoding task whose worker process died (then its tracks are retried one by one)
DECODE_MAX_RETRIES = 2


def _stream_schema(labels: list[str], embedding: dict | None = None) -> pa.Schema:
    """The model actors' output: the prediction columns, the errors, and the engine that scored (JSON)."""
    return pa.schema(list(prediction_schema(labels, embedding=embedding)) + _ERROR_COLUMNS
                     + [pa.field("engine", pa.string())])


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


# -- stage 1: decode and featurise (CPU tasks) ---------------------------------------
def featurise_batch(batch: pa.Table, features: FeatureConfig, max_segments: int,
                    decode: DecodeConfig | None = None, watchdog_uri: str | None = None) -> pa.Table:
    """Decode a batch of tracks into one row per track holding its stacked segments.

    Input columns: ``source`` (path to read), ``path`` (relative path), ``size``,
    ``mtime_ns``.  Output adds ``track_id``, ``duration``, ``n_segments``, ``mels`` (the
    segments (n, n_mels, n_frames) as bytes of ``features.dtype``), ``album`` and
    ``album_artist`` (the file's tags, a cheap header read; null without), ``error_kind`` /
    ``error_reason`` (set, with no segments, for a file that could not be used) and
    ``warning_kind`` / ``warning_reason`` (a file used although something is off; several
    joined with "; ").  Never raises for a bad file.

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
        return _featurise(batch, features, max_segments, decode, watchdog, stopped)


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
               watchdog: _Watchdog, stopped: dict[str, str]) -> pa.Table:
    import json

    from genrecls.audio.pipeline import sampled_track_features
    from genrecls.audio.tags import album_tags
    from genrecls.core.errors import failure_of
    from genrecls.core.hooks import pause_point

    dtype = np.float16 if features.dtype == "float16" else np.float32
    out: dict[str, list] = {k: [] for k in _FEATURISED}
    for row in batch.to_pylist():
        mels, duration, kind, reason, warnings, n, album = b"", None, None, None, [], 0, (None, None)
        tid = track_id_for(row["path"])
        try:
            if tid in stopped:  # a watchdog stopped an earlier try of this batch on this file
                kind, reason = "timed_out", json.loads(watchdog.folder.read_text(stopped[tid]))["reason"]
            else:
                watchdog.watch(row, decode.watchdog_seconds([row["size"]]))
                pause_point("classify-decode-track")  # tests: a decoder that never returns
                feats = sampled_track_features(row["source"], features, max_segments, decode)
                mels = np.ascontiguousarray(feats.mels, dtype=dtype).tobytes()
                n, duration, warnings = int(feats.mels.shape[0]), float(feats.duration), feats.warnings
                album = album_tags(row["source"])  # for classify.group_by = "album"; never raises
        except Exception as exc:  # recorded, never fatal for the batch
            kind, reason = failure_of(exc)
        finally:
            watchdog.watch(None)
        values = {"path": row["path"], "track_id": tid, "size": row["size"],
                  "mtime_ns": row["mtime_ns"], "duration": duration, "n_segments": n, "mels": mels,
                  "album": album[0], "album_artist": album[1], "error_kind": kind, "error_reason": reason,
                  "warning_kind": warnings[0].kind if warnings else None,  # the most serious (genrecls.storage.records)
                  "warning_reason": "; ".join(w.reason for w in warnings) or None}
        for k, v in values.items():
            out[k].append(v)
    return pa.table({k: pa.array(out[k], t) for k, t in _FEATURISED.items()})


# -- stage 2: score (long-lived model actors) -----------------------------------------
class Scorer:
    """A model actor: loads the run's model once on the inference engine, then scores batches of tracks.

    Called by Ray Data with a batch of :func:`featurise_batch` rows; returns one row per
    track with the prediction columns (failed tracks pass through with their error).  The
    track scores (mean of the segments' probabilities) are calibrated and answered by
    ``rules`` (:class:`genrecls.models.answers.AnswerRules`, chosen by the driver; None: the
    run's own rules with the default settings).

    A frozen-backbone ``musicnn`` run (``RUN/head.npz``) runs the backbone on the engine
    (:class:`~genrecls.models.engine.BackboneEngine`, once per segment), its head in NumPy
    (:func:`~genrecls.models.transfer.head_probabilities`), and also returns each track's
    ``embedding`` (:func:`track_embedding_info`); any other run is its ``model.onnx``
    (:class:`~genrecls.models.inference.Predictor`).
    """

    def __init__(self, run_uri: str, batch_size: int, top_k: int, threads: int = 0, engine: str = "auto",
                 precision: str = "auto", rules=None):
        import json

        from genrecls.core.runtime import quiet_environment
        from genrecls.models.inference import read_run_info

        quiet_environment()
        info = read_run_info(run_uri)
        self.embedding = track_embedding_info(info)
        self.head = self.backbone = self.predictor = None
        if self.embedding is not None:
            from genrecls.models.transfer import load_head, shared_backbone

            self.head = load_head(run_uri)
            # one engine per actor, its threads set explicitly (0: the CPUs Ray gave this actor)
            self.backbone = shared_backbone(engine, precision, threads)
            if self.backbone.backbone_id() != self.embedding["backbone"]:
                raise ValueError(f"{run_uri}'s head was fit on the backbone {self.embedding['backbone']}, this genrecls "
                                 f"has {self.backbone.backbone_id()}: classify with the genrecls that trained it")
            self.engine = json.dumps({**self.backbone.describe(), "head": "numpy (head.npz)"}, sort_keys=True)
        else:
            from genrecls.models.inference import Predictor

            self.predictor = Predictor(run_uri, engine=engine, precision=precision, threads=threads)
            self.engine = json.dumps(self.predictor.describe(), sort_keys=True)
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

    def _score(self, mels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Segment probabilities, and with a head the segments' track-embedding layer."""
        if self.head is None:
            return self.predictor.predict(mels, batch_size=self.batch_size), None
        from genrecls.models.transfer import head_probabilities

        step = min(self.batch_size, self.max_batch or self.batch_size)
        probs, emb = [], []
        for i in range(0, len(mels), step):
            out = self.backbone(mels[i:i + step])
            probs.append(head_probabilities(out, self.head))
            emb.append(out[self.embedding["layer"]])
        return np.concatenate(probs), np.concatenate(emb)

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
            seg_probs, seg_emb = self._score(mels)
            owners = [str(i) for i in ok for _ in range(counts[i])]
            ids, track_probs = aggregate_tracks(owners, seg_probs)
            probs[[int(t) for t in ids]] = track_probs
            if seg_emb is not None:  # the same rule: the mean over the track's scored segments
                _, track_emb = aggregate_tracks(owners, seg_emb)
                embeddings = [None] * n
                for t, v in zip(ids, track_emb):
                    embeddings[int(t)] = v.tolist()
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
                                                        "album", "album_artist")}
        for name, arr in cols.items():  # predictions of failed tracks are null
            arrays[name] = pc.if_else(valid, arr, pa.nulls(n, arr.type))
        arrays["album_genre"] = pa.nulls(n, pa.string())  # the classify driver's album pass fills them
        arrays["album_confidence"] = pa.nulls(n, pa.float32())
        arrays["model_id"] = pa.array([self.model_id] * n, pa.string())
        arrays["classified_at"] = pa.array([now] * n, pa.timestamp("ms", tz="UTC"))
        arrays["error_kind"] = batch.column("error_kind")
        for name in ("error_reason", "warning_kind", "warning_reason"):
            arrays[name] = batch.column(name)
        if self.embedding is not None:
            arrays["embedding"] = pa.array(embeddings if ok else [None] * n, pa.list_(pa.float32()))
        arrays["engine"] = pa.array([self.engine] * n, pa.string())
        return pa.table({f.name: arrays[f.name] for f in self.schema}, schema=self.schema)


def _actors(ccfg: ClassifyConfig) -> int:
    import ray

    if ccfg.actors:
        return ccfg.actors
    if ccfg.gpu:
        return int(ray.cluster_resources().get("GPU", 0))
    return 1


def stream(todo: pa.Table, run: Location, features: FeatureConfig, ccfg: ClassifyConfig, decode: DecodeConfig,
           workers: int | None, tracks_per_task: int, verbose: bool = False,
           watchdog: Location | None = None, inference: InferenceConfig | None = None,
           rules=None) -> Iterator[pa.Table]:
    """Build the Ray Data pipeline and yield its output blocks as they are produced.

    ``watchdog``: the folder where decoding tasks name the files their watchdog stopped
    (see :func:`featurise_batch`); None: no watchdog.  ``inference``: the runtime and precision
    of the model actors (each output block says in its ``engine`` column which ran).  ``rules``:
    the answer rules (:class:`genrecls.models.answers.AnswerRules`) the model actors apply.
    """
    inference = inference or InferenceConfig()
    import ray
    import ray.data

    quiet_ray_data(verbose)  # also when Ray was started before this job (a notebook, the tests)
    if ccfg.gpu and int(ray.cluster_resources().get("GPU", 0)) < 1:
        raise ValueError("classify.gpu: the Ray cluster has no GPU; drop --gpu or join a cluster with GPUs")
    decoders, _ = slots(workers)
    blocks = [todo.take(pa.array(np.arange(a, b))) for a, b in
              task_bounds(todo.num_rows, tracks_per_task, decoders, max_tasks=MAX_INPUT_BLOCKS)]
    ds = ray.data.from_arrow(blocks)
    # a block whose decoding worker keeps dying (a file that crashes a native decoder) is
    # dropped after DECODE_MAX_RETRIES retries instead of being retried forever; the driver
    # then retries its tracks one by one.  Past 1% of the blocks it is a run-level problem.
    ds.context.max_errored_blocks = max(16, len(blocks) // 100)
    # max_calls recycles decoding workers now and then (bounds leaks of native decoders) and, as
    # the two stages' remote arguments then differ, keeps Ray Data from fusing decoding into
    # the model actors, which would serialise it behind the actor pool
    ds = ds.map_batches(
        featurise_batch, fn_kwargs={"features": features, "max_segments": ccfg.max_segments, "decode": decode,
                                    "watchdog_uri": watchdog.uri if watchdog is not None else None},
        batch_size=tracks_per_task, batch_format="pyarrow", num_cpus=1, max_calls=DECODE_MAX_CALLS,
        max_retries=DECODE_MAX_RETRIES, compute=ray.data.TaskPoolStrategy(size=decoders) if workers else None,
        udf_modifying_row_count=False)
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
