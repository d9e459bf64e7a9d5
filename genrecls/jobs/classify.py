"""The classify job: a library of tracks -> one genre prediction per track, as a streaming Ray job.

Data flow, read top to bottom::

    discover(LIBRARY) -> skip tracks already classified by this model -> Ray Data stream
    (genrecls.jobs.scoring):
        map_batches(featurise_batch)   CPU tasks: decode, segment, log-mel (genrecls.audio.pipeline),
                                       at most K evenly spaced segments per track
        map_batches(Scorer)            long-lived actors that load the model once and score
                                       segments in batches (on GPUs with --gpu); per-track
                                       probabilities are the mean of the segment probabilities
                                       (genrecls.models.inference.aggregate_tracks, the evaluation rule)
    -> the driver iterates the output stream and writes parts as they fill (_Writer) into
       the predictions store (genrecls.storage.predictions).

The library is never materialised: decoded audio and spectrograms only exist inside the
stream, whose in-flight size Ray Data bounds; the driver holds at most one part of
predictions (``classify.part_rows`` rows) plus the list of paths.

Features come from the run folder (``RUN/run.json``), never from the user, so the inputs
are computed exactly as for training and evaluation: the same decoding, segmentation and
log-mel code, and spectrograms rounded to the dataset's storage type (float16 by default)
before they reach the model, as the training shards are.

The output folder, its columns and the rules that keep one prediction per track are the
predictions store's (:mod:`genrecls.storage.predictions`).  :func:`classify` resolves the model
and the library, takes the folder's lock and runs :func:`_classify_locked`, the body.

Answers: before anything starts, the driver resolves the run's answer rules
(:func:`genrecls.models.answers.rules_for_run`: calibration, the user's vocabulary,
``uncertain`` and per-genre thresholds, chosen on the run's validation tracks), so a wrong
vocabulary file is refused at once; the model actors apply them to each track.  After the
stream, one pass over the folder (:func:`_answer_pass`) answers again the rows answered
under other rules (an earlier run with another ``--labels``, or parts written before the
answer columns existed) from their stored probabilities, without decoding anything, and,
with ``classify.group_by``, gives every row its album's answer.

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
``worker_crashed``.  A decoder stuck in native code (past twice its deadline) is stopped by
the decoding task's watchdog, which names the file in ``PREDICTIONS/.watchdog/``; the retried
batch records it as ``timed_out`` and decodes the rest.  Model actors that die are restarted
by Ray Data.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import sys
import time
from collections import Counter
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from genrecls.audio.discovery import Discovery, discover
from genrecls.core.config import FALLBACK_MAX_SEGMENTS, ClassifyConfig, Config, FeatureConfig
from genrecls.core.hooks import pause_point
from genrecls.core.progress import Progress, format_duration, format_table
from genrecls.core.runtime import as_interrupted, log, ray_session
from genrecls.jobs.scoring import (
    DECODE_MAX_RETRIES,
    input_table,
    local_stream,
    stored_layers,
    stream,
    track_embedding_info,
    uses_actors,
)
from genrecls.models.answers import AnswerRules, rules_for_run
from genrecls.models.inference import RUN_FILE, read_run_info
from genrecls.models.tagger import TAGGER_MODEL
from genrecls.storage.location import Location
from genrecls.storage.locks import folder_lock
from genrecls.storage.predictions import PredictionStore, conform, prediction_schema
from genrecls.storage.records import problem_rows, record_row

__all__ = ["resolve_run", "classify", "format_summary", "runs_in_process", "plan_from_store"]


# -- the model ------------------------------------------------------------------------
def resolve_run(run: str | os.PathLike | Location) -> Location:
    """The run folder to load a model from.

    RUN is a run folder (``RUN/run.json`` + ``RUN/model/``) or a model registry folder, whose
    current champion is used (:func:`genrecls.storage.registry.resolve_run`).  This is the one place
    that turns the user's RUN argument into a run folder.
    """
    loc = run if isinstance(run, Location) else Location.parse(run)
    if loc.exists(RUN_FILE):
        return loc
    from genrecls.storage.registry import resolve_run as resolve_registry

    resolved = Location.parse(resolve_registry(loc.uri))
    if not resolved.exists(RUN_FILE):
        raise FileNotFoundError(f"{loc.uri} is neither a genrecls run (no {RUN_FILE}) nor a model registry with a "
                                "champion; train one with 'genrecls train' or 'genrecls retrain'")
    return resolved


# -- the driver -----------------------------------------------------------------------
def _track_table(found: Discovery) -> pa.Table:
    """The library's tracks: ``source`` (path to read), ``path`` (relative), ``size``, ``mtime_ns``."""
    return pa.table({
        "source": pa.array([t.path for t in found.tracks], pa.string()),
        "path": pa.array([t.rel_path for t in found.tracks], pa.string()),
        "size": pa.array([t.size for t in found.tracks], pa.int64()),
        "mtime_ns": pa.array([t.mtime_ns for t in found.tracks], pa.int64()),
    })


def _record_rows(table: pa.Table, kind: str, reason: str) -> list[dict[str, Any]]:
    """Failure or warning rows (``kind``, ``reason``: the columns holding them) of a block's tracks."""
    return [record_row(r["path"], None, r[kind], r[reason], r["size"], r["mtime_ns"])
            for r in table.select(["path", kind, reason, "size", "mtime_ns"]).to_pylist() if r[kind] is not None]


class _Writer:
    """Takes the stream's output blocks: counts them in the summary and writes them to the store.

    Predictions wait until ``part_rows`` of them fill a part; failure and warning rows are
    written with each part, so a stopped run keeps what :meth:`flush` wrote.
    """

    def __init__(self, store: PredictionStore, schema: pa.Schema, part_rows: int, summary: dict[str, Any], bar: Progress,
                 uncertain_label: str = "uncertain"):
        self.store, self.schema, self.part_rows, self.uncertain_label = store, schema, part_rows, uncertain_label
        self.summary, self.bar = summary, bar
        self.kinds: Counter[str] = Counter()
        self.seen: set[str] = set()
        #: (node, pid) of every process that scored a block
        self.workers: set[tuple[str | None, int | None]] = set()
        self._parts: list[pa.Table] = []
        self._failures: list[dict[str, Any]] = []
        self._warnings: list[dict[str, Any]] = []
        self._rows = 0

    def add(self, block: pa.Table) -> None:
        s = self.summary
        if block.num_rows:  # what scored (classify.json): the runtime of computed tracks, else the store's head
            engine = json.loads(block.column("engine")[0].as_py())
            if "engine" not in s or (s["engine"].get("engine") == "none" and engine.get("engine") != "none"):
                s["engine"] = engine
            self.workers.update(zip(block.column("node").to_pylist(), block.column("pid").to_pylist()))
            s["from_store"] += int(pc.sum(pc.fill_null(block.column("from_store"), False)).as_py() or 0)
        block = block.drop_columns(["engine", "from_store", "node", "pid"])
        self.seen.update(block.column("path").to_pylist())
        bad = pc.is_valid(block.column("error_kind"))
        good, failed = block.filter(pc.invert(bad)), block.filter(bad)
        if good.num_rows:
            self._parts.append(good)
            warned = _record_rows(good, "warning_kind", "warning_reason")
            self._warnings.extend(warned)
            s["warned"] += len(warned)
            self._rows += good.num_rows
            s["segments"] += int(pc.sum(good.column("n_segments")).as_py() or 0)
            s["uncertain"] += int(pc.sum(pc.equal(good.column("genre"), self.uncertain_label)).as_py() or 0)
        for row in _record_rows(failed, "error_kind", "error_reason"):
            self.fail(row, count=False)
        seconds = float(pc.sum(good.column("duration")).as_py() or 0.0)
        s["classified"] += good.num_rows
        s["failed"] += failed.num_rows
        s["audio_seconds"] += seconds
        self.bar.update(done=block.num_rows, failed=failed.num_rows, audio_seconds=seconds)
        if self._rows >= self.part_rows:
            self.flush()

    def fail(self, row: dict[str, Any], count: bool = True) -> None:
        """Record a track that could not be classified (``count``: not yet in the summary and progress line)."""
        self._failures.append(row)
        self.kinds[row["kind"]] += 1
        if count:
            self.summary["failed"] += 1
            self.bar.update(done=1, failed=1)

    def flush(self) -> None:
        if self._parts:
            self.store.write_part(self._parts, self.schema)
            self.summary["parts_written"] += 1
        self.store.records.write_failures(self._failures)
        self.store.records.write_warnings(self._warnings)
        wrote, self._parts, self._failures, self._warnings, self._rows = bool(self._parts), [], [], [], 0
        if wrote:
            pause_point("classify-part-written")


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
        ``classified``, ``failed``, ``uncertain``), ``failures_by_kind``, ``tracks_total``,
        ``uncertain_total`` and ``genre_distribution`` of the whole predictions folder (the
        uncertain word included), ``answers`` (the rules applied), throughput figures.

    Raises for run-level problems (no such library or run, output locked by another
    classify, no GPU with ``gpu``); never for a bad file.

    Examples
    --------
    >>> summary = classify("music/", "runs/main", "predictions/")  # doctest: +SKIP
    >>> summary["genre_distribution"]  # doctest: +SKIP
    {'rock': 812, 'jazz': 301, ...}
    """
    cfg = (cfg or Config()).validate()
    t0 = time.monotonic()
    run_loc, info, cfg = _model(run, out, cfg)
    labels, model_id = list(info["labels"]), str(info["model_id"])
    rules = rules_for_run(run_loc, info, cfg.classify)  # a wrong vocabulary file stops here, before anything starts
    found = discover(library, root)
    store = PredictionStore(out)
    summary: dict[str, Any] = {
        "predictions": store.uri, "library": found.root, "run": run_loc.uri, "model_id": model_id, "labels": labels,
        "discovered": len(found.tracks), "ignored_files": found.ignored, "skipped_done": 0,
        "skipped_known_failures": 0, "classified": 0, "warned": 0, "failed": 0, "failures_by_kind": {}, "segments": 0,
        "audio_seconds": 0.0, "parts_written": 0, "rows_superseded": 0, "max_segments": cfg.classify.max_segments,
        "uncertain": 0, "answers": _answers_brief(rules), "group_by": cfg.classify.group_by, "from_store": 0,
    }
    try:
        with folder_lock(store.loc, "genrecls classify"):
            _classify_locked(found, run_loc, info, store, cfg, summary, address=address, workers=workers, csv=csv,
                             prune=prune, progress=progress, verbose=verbose, rules=rules)
            summary["wall_seconds"] = time.monotonic() - t0
            summary["tracks_per_second"] = (summary["classified"] + summary["failed"]) / max(summary["wall_seconds"], 1e-9)
            summary["audio_seconds_per_second"] = summary["audio_seconds"] / max(summary["wall_seconds"], 1e-9)
            # dataset: genrecls tag records the new stat of the files it writes there (their audio is unchanged)
            store.write_info(run=run_loc.uri, model_id=model_id, labels=labels, features=asdict(cfg.features),
                             library=found.root, last_run=summary, answers=rules.to_dict(), dataset=cfg.classify.dataset)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: parts written so far stay; a re-run adds the rest
        stop = as_interrupted(exc)
        stop.kept = f"{summary['classified']} track(s) classified by this run are kept in {store.uri}"
        raise stop from None
    return summary


def _model(run: str | os.PathLike | Location, out: str | os.PathLike, cfg: Config) -> tuple[Location, dict[str, Any], Config]:
    """The run folder, its ``run.json``, and the configuration resolved against it (its features, its K)."""
    if str(run) == TAGGER_MODEL:  # the pretrained tagger, no training: written once as a run folder
        from genrecls.models.networks import import_tensorflow
        from genrecls.models.tagger import tagger_run

        import_tensorflow()
        run = tagger_run(Location.parse(out))
    run_loc = resolve_run(run)
    info = read_run_info(run_loc)
    if cfg.classify.max_segments < 0:  # K chosen on the run's validation tracks (genrecls.models.selection)
        cfg = cfg.with_section(classify={"max_segments": int((info.get("classify") or {}).get(
            "max_segments", FALLBACK_MAX_SEGMENTS))})
    features = FeatureConfig(**info["features"]).validate()
    if cfg.features != features and cfg.features != Config().features:
        log.warning("classify uses the feature settings stored in the run %s; the configured features are ignored", run_loc.uri)
    return run_loc, info, cfg.with_section(features=features)


def _answers_brief(rules: AnswerRules) -> dict[str, Any]:
    """The answer rules as the summary shows them."""
    return {"answers_id": rules.answers_id, "calibration": rules.calibration.to_dict(), "rule": rules.rule,
            "threshold": rules.threshold, "reached": rules.reached, "uncertain_label": rules.uncertain_label,
            "vocabulary": rules.vocabulary.source, "genres": list(rules.genres), "max_genres": rules.max_genres,
            "target_precision": rules.chosen.get("target_precision"),
            "uncertain_source": (rules.chosen.get("uncertain") or {}).get("source")}


def album_key(path: str, album: str | None, album_artist: str | None, group_by: str) -> str:
    """The group a track's album answer is computed over (``classify.group_by``).

    ``folder``: the track's folder.  ``album``: its album-artist and album tags when it has
    both (an album spread over CD1/ and CD2/ is one album), its folder and album tag when it
    has only the album (two albums of one folder stay apart, two "Greatest Hits" of two
    artists' folders too), else its folder.
    """
    folder = posixpath.dirname(path)
    if group_by == "album" and album:
        return f"album\x1f{album_artist}\x1f{album}" if album_artist else f"folder-album\x1f{folder}\x1f{album}"
    return f"folder\x1f{folder}"


def _answer_pass(store: PredictionStore, rules: AnswerRules, labels: list[str], model_id: str, group_by: str,
                 embedding: dict[str, Any] | None = None) -> dict[str, Any]:
    """Answer again, from their stored probabilities, the rows answered under other rules; with ``group_by``,
    give every row its album's answer.  Parts are rewritten (atomically) only where something changed.

    A row's ``prob_<label>`` columns are the run's calibrated probabilities (rows of parts
    written before calibration hold the uncalibrated ones of a run that had none: the same
    thing), so nothing is decoded or scored again.
    """
    probs_cols = [f"prob_{g}" for g in labels]
    index = store.index(columns=["path", "answers_id", "album", "album_artist", "album_genre", "album_confidence",
                                 *probs_cols])
    out = {"rows_answered_again": 0, "albums": 0, "parts_rewritten": 0}
    if not index.num_rows:
        return out
    stale = np.asarray(pc.fill_null(pc.not_equal(index["answers_id"], rules.answers_id), True).to_pylist(), bool)
    had_album = np.asarray(pc.is_valid(index["album_genre"]).to_pylist(), bool)
    if not stale.any() and group_by == "none" and not had_album.any():
        return out
    probs = np.column_stack([np.asarray(pc.fill_null(index[c], 0.0).to_numpy(zero_copy_only=False), np.float64)
                             for c in probs_cols]) if probs_cols else np.zeros((index.num_rows, 0))
    fresh = rules.answer(probs[stale]) if stale.any() else None
    album_genre = [None] * index.num_rows
    album_conf: list[float | None] = [None] * index.num_rows
    if group_by != "none":
        q = rules.genre_probabilities(probs)
        keys = [album_key(p, a, aa, group_by) for p, a, aa in zip(index["path"].to_pylist(), index["album"].to_pylist(),
                                                                   index["album_artist"].to_pylist())]
        groups: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            groups.setdefault(k, []).append(i)
        names = list(groups)
        means = np.stack([q[groups[k]].mean(axis=0) for k in names]) if names else np.zeros((0, len(rules.genres)))
        ans = rules.answer_genres(means)
        for k, g, c in zip(names, ans["genre"], ans["confidence"]):
            for i in groups[k]:
                album_genre[i], album_conf[i] = g, c
        out["albums"] = len(names)
    old_genre, old_conf = index["album_genre"].to_pylist(), index["album_confidence"].to_pylist()
    album_changed = np.asarray([g != og or (c is None) != (oc is None) or (c is not None and abs(c - oc) > 1e-6)
                                for g, c, og, oc in zip(album_genre, album_conf, old_genre, old_conf)], bool)
    fresh_at = {int(i): n for n, i in enumerate(np.flatnonzero(stale))}
    parts = index["part"].to_pylist()
    rows = index["row"].to_pylist()
    by_part: dict[str, list[int]] = {}
    for i, part in enumerate(parts):
        by_part.setdefault(part, []).append(i)
    schema = prediction_schema(labels, model_id, embedding=embedding)  # a frozen head's track embeddings are kept
    for part, members in by_part.items():
        if not (stale[members].any() or album_changed[members].any()):
            continue
        table = conform(store.read_part(part), schema)
        cols = {name: table.column(name).to_pylist() for name in ("genre", "confidence", "top_genre", "genres",
                                                                  "parent_genres", "answers_id")}
        a_genre, a_conf = table.column("album_genre").to_pylist(), table.column("album_confidence").to_pylist()
        for i in members:
            r = rows[i]
            if stale[i]:
                n = fresh_at[i]
                for name in ("genre", "confidence", "top_genre", "genres", "parent_genres"):
                    cols[name][r] = fresh[name][n]
                cols["answers_id"][r] = rules.answers_id
            a_genre[r], a_conf[r] = album_genre[i], album_conf[i]
        for name, values in [*cols.items(), ("album_genre", a_genre), ("album_confidence", a_conf)]:
            table = table.set_column(schema.get_field_index(name), schema.field(name),
                                     pa.array(values, schema.field(name).type))
        store.replace_part(part, table)
        out["parts_rewritten"] += 1
    out["rows_answered_again"] = int(stale.sum())
    return out


def _classify_locked(found: Discovery, run_loc: Location, info: dict[str, Any], store: PredictionStore, cfg: Config,
                     summary: dict[str, Any], *, address, workers, csv, prune, progress, verbose,
                     rules: AnswerRules) -> None:
    """The body of a classify run, under the output folder's lock: plan, stream, record, reconcile."""
    ccfg, labels, model_id = cfg.classify, list(info["labels"]), str(info["model_id"])
    if track_embedding_info(info):  # what the predictions' embedding column holds (classify.json's last_run)
        summary["embedding"] = track_embedding_info(info)
    removed = store.remove_temporaries()
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run", removed)
    store.loc.write_text("config.json", cfg.to_json() + "\n")
    store.clear_watchdog()
    tracks = _track_table(found)
    todo, summary["skipped_done"], summary["skipped_known_failures"] = store.todo(tracks, model_id, ccfg.retry_failed)
    todo = input_table(todo)
    dataset, layers = None, ()
    if ccfg.dataset:
        todo, dataset = plan_from_store(todo, found.root, ccfg.dataset, run_loc, info, summary)
        layers = stored_layers(info) if dataset else ()
    kinds: Counter[str] = Counter()
    if todo.num_rows:
        local = runs_in_process(todo, ccfg, address)
        summary["ran"] = "in this process" if local else "model actors" if uses_actors(ccfg) else "ray tasks"
        with contextlib.nullcontext() if local else ray_session(address, workers, verbose=verbose):
            bar = Progress(todo.num_rows, "tracks", enabled=progress)
            writer = _Writer(store, prediction_schema(labels, model_id, embedding=track_embedding_info(info)),
                             ccfg.part_rows, summary, bar, rules.uncertain_label)

            def scored(tracks: pa.Table, per_task: int):
                if local:
                    return local_stream(tracks, run_loc, cfg.features, ccfg, cfg.decode, cfg.inference, rules=rules,
                                        dataset=dataset, layers=layers)
                return stream(tracks, run_loc, cfg.features, ccfg, cfg.decode, workers, per_task, verbose,
                              store.watchdog(), cfg.inference, rules=rules, dataset=dataset, layers=layers)

            try:
                for block in scored(todo, ccfg.tracks_per_task):
                    writer.add(block)
            except KeyboardInterrupt:
                writer.flush()  # keep what was scored before the stop
                raise
            lost = todo.filter(pc.invert(pc.is_in(todo["path"], value_set=pa.array(list(writer.seen), pa.string()))))
            if lost.num_rows:  # blocks dropped after their worker kept dying: isolate the culprit
                log.warning("%d track(s) were lost with crashed workers; retrying them one by one", lost.num_rows)
                for block in scored(lost, 1):
                    writer.add(block)
                for r in lost.filter(pc.invert(pc.is_in(lost["path"], value_set=pa.array(list(writer.seen), pa.string())))).to_pylist():
                    writer.fail(record_row(
                        r["path"], None, "worker_crashed", "the worker process died while decoding this file "
                        f"(retried {DECODE_MAX_RETRIES} times); it may crash the audio decoder", r["size"], r["mtime_ns"]))
            writer.flush()
            store.clear_watchdog()
            bar.close()
            kinds = writer.kinds
            summary["processes"] = len({pid for _, pid in writer.workers})
            summary["nodes"] = sorted({node for node, _ in writer.workers if node})
    problems = problem_rows(found.problems)
    store.records.write_failures(problems)
    kinds.update(p.kind for p in found.problems)
    summary["failed"] += len(problems)
    summary["failures_by_kind"] = dict(kinds)
    summary["rows_superseded"] = store.reconcile(model_id, tracks, drop_missing=prune)
    summary.update(_answer_pass(store, rules, labels, model_id, ccfg.group_by, track_embedding_info(info)))
    summary["review"] = _review(store, run_loc, info, rules, labels)
    final = store.compact_records(set(tracks.column("path").to_pylist()) | {p.rel_path for p in found.problems})
    summary["tracks_total"] = final.num_rows
    summary["failures_total"] = store.records.failures().num_rows
    counts = {d["values"]: d["counts"] for d in pc.value_counts(final["genre"]).to_pylist()} if final.num_rows else {}
    names = list(dict.fromkeys([*rules.genres, *(g for g in counts if g is not None)]))
    summary["uncertain_total"] = counts.get(rules.uncertain_label, 0)
    summary["genre_distribution"] = {g: counts.get(g, 0) for g in sorted(names, key=lambda g: (-counts.get(g, 0), g))}
    if csv:
        store.write_csv()
        summary["csv"] = store.csv_uri()


# -- review: the genres people wrote that the model contradicts --------------------------
#: the review list beside the predictions
REVIEW_CSV = "review.csv"


def _review(store: PredictionStore, run_loc: Location, info: dict[str, Any], rules: AnswerRules,
            labels: list[str]) -> dict[str, Any]:
    """``PREDICTIONS/review.csv``: every track whose genre tag (a person's) the model contradicts with confidence
    (:class:`~genrecls.models.answers.ReviewRule`), most confident first; nothing is changed in those files."""
    import pyarrow.csv as pacsv

    from genrecls.audio.tags import TAG_SEPARATOR
    from genrecls.models.answers import LABELS_FILE, labels_from_tags, review_rule
    from genrecls.models.vocabulary import load_tag_vocabulary, normalise_name

    rule = review_rule(run_loc, info, rules)
    probs_cols = [f"prob_{g}" for g in labels]
    index = store.index(columns=["path", "genre_tag", "album", "album_artist", *probs_cols])
    genres = list(rules.genres)
    by_name = {normalise_name(g): g for g in genres}
    tags = None
    if labels_from_tags(info) and run_loc.exists(LABELS_FILE):  # the tag spellings of the run's own vocabulary
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write(run_loc.read_text(LABELS_FILE))
        try:
            tags = load_tag_vocabulary(f.name)
        finally:
            os.unlink(f.name)

    def genre_of(text: str) -> str | None:
        label = tags.label_of(text)[0] if tags is not None else text
        return by_name.get(normalise_name(label)) if label else None

    rows = []
    tagged = index.filter(pc.is_valid(index["genre_tag"])) if index.num_rows else index
    if tagged.num_rows:
        probs = np.column_stack([np.asarray(pc.fill_null(tagged[c], 0.0).to_numpy(zero_copy_only=False), np.float64)
                                 for c in probs_cols])
        q = rules.genre_probabilities(probs)
        for i, r in enumerate(tagged.select(["path", "genre_tag", "album", "album_artist"]).to_pylist()):
            values = [v for v in (r["genre_tag"] or "").split(TAG_SEPARATOR) if v.strip()]
            mapped = next(((v, g) for v in values for g in [genre_of(v)] if g is not None), None)
            if mapped is None or not np.isfinite(q[i]).all():
                continue
            top = genres[int(np.argmax(q[i]))]
            p_tag, conf = float(q[i, genres.index(mapped[1])]), float(q[i].max())
            if rule.flags(p_tag, top, mapped[1], conf):
                rows.append({"path": r["path"], "tagged": mapped[0], "tagged_genre": mapped[1],
                             "tagged_probability": round(p_tag, 4), "predicted_genre": top, "confidence": round(conf, 4),
                             "album": r["album"], "album_artist": r["album_artist"]})
    rows.sort(key=lambda r: (-r["confidence"], r["path"]))
    schema = pa.schema([("path", pa.string()), ("tagged", pa.string()), ("tagged_genre", pa.string()),
                        ("tagged_probability", pa.float64()), ("predicted_genre", pa.string()),
                        ("confidence", pa.float64()), ("album", pa.string()), ("album_artist", pa.string())])
    table = pa.Table.from_pylist(rows, schema=schema)
    store.loc.write_atomic(REVIEW_CSV, lambda out: pacsv.write_csv(table, out))
    return {"rows": len(rows), "tagged_tracks": tagged.num_rows, "file": store.loc.child(REVIEW_CSV).uri,
            "low": rule.low, "high": rule.high, "rule": rule.how, "first": rows[:5]}


# -- small runs ---------------------------------------------------------------------------
#: a run scoring at most this many segments from the store (and little to compute) needs no Ray: reading
#: and scoring them in this process costs less than starting it
IN_PROCESS_STORED_SEGMENTS = 200_000


def runs_in_process(todo: pa.Table, ccfg: ClassifyConfig, address: str | None) -> bool:
    """True for a small run on this machine: Ray's start-up would cost more than its parallelism brings.

    Only without a cluster (no ``address``, none in ``RAY_ADDRESS``, no Ray already running in this
    process), on the CPU path (no ``--gpu``, no model actors), when the files to decode total at
    most ``classify.in_process_mb`` and the stored tracks' segments at most
    :data:`IN_PROCESS_STORED_SEGMENTS`: the nightly run of a few new files, or a library
    already in the dataset.
    """
    if address or os.environ.get("RAY_ADDRESS") or uses_actors(ccfg):
        return False
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return False
    stored = pc.is_valid(todo["stored_part"])
    computed_bytes = pc.sum(todo.filter(pc.invert(stored))["size"]).as_py() or 0
    stored_segments = pc.sum(todo.filter(stored)["stored_segments"]).as_py() or 0
    return computed_bytes <= ccfg.in_process_mb * 1e6 and stored_segments <= IN_PROCESS_STORED_SEGMENTS


# -- scoring from the embedding store ----------------------------------------------------
def plan_from_store(todo: pa.Table, library_root: str, dataset_uri: str, run_loc: Location, info: dict[str, Any],
                    summary: dict[str, Any]) -> tuple[pa.Table, str | None]:
    """Mark the tracks the dataset's embedding store serves (their ``stored_*`` columns), and return the
    dataset's URI to read them from (None: the store is not used, and ``summary["store"]`` says why).

    A library track is served when the dataset holds the same file (the same absolute path) as it is
    now (its size and modification time, or the stat a ``genrecls tag`` run recorded for it) and the
    store holds that version's embeddings (fingerprint and number of segments), computed by the run's
    backbone from the run's features.  Everything else is decoded and computed as without a dataset.
    A store of another backbone or features, or a run whose model takes spectrograms, is named once
    and not used; never mixed.
    """
    from genrecls.storage.dataset import Dataset
    from genrecls.storage.embeddings import EmbeddingStore, EmbeddingStoreError

    ds = Dataset(dataset_uri)
    record: dict[str, Any] = {"dataset": ds.uri, "used": False, "stored": 0, "computed": todo.num_rows}
    summary["store"] = record
    embedding = track_embedding_info(info)
    if embedding is None:
        record["reason"] = (f"the run's model ({info.get('model_name', info['model_id'])}) scores spectrograms, not "
                            "the stored backbone layers: every track is decoded and scored")
        log.warning("--dataset: %s", record["reason"])
        return todo, None
    store = EmbeddingStore(ds.location)
    try:
        described = store.check(embedding["backbone"], FeatureConfig(**info["features"]))
    except EmbeddingStoreError as exc:
        record["reason"] = f"not used: {exc}"
        log.warning("--dataset: %s", record["reason"])
        return todo, None
    if described is None:
        record["reason"] = f"{store.uri} holds no embeddings (ingest with ingest.embeddings=auto fills it)"
        log.warning("--dataset: %s", record["reason"])
        return todo, None
    root = ds.library_root()
    index, touched = ds.tracks(), ds.touched()
    by_path = {os.path.normpath(os.path.join(root, e.path)): e for e in index.values()} if root else {}
    ok = {}  # todo row -> the dataset's entry of the same file, as it is now
    reasons: Counter[str] = Counter()
    for i, (path, size, mtime) in enumerate(zip(todo["path"].to_pylist(), todo["size"].to_pylist(),
                                                todo["mtime_ns"].to_pylist())):
        e = by_path.get(os.path.normpath(os.path.join(library_root, path)))
        if e is None:
            reasons["not in the dataset"] += 1
        elif (size, mtime) == (e.size, e.mtime_ns) or touched.get(e.track_id) == (size, mtime, e.fingerprint):
            ok[i] = e
        else:
            reasons["changed since it was ingested"] += 1
    valid = store.valid_for({e.track_id: (e.fingerprint, e.n_segments) for e in ok.values()})
    n = todo.num_rows
    cols = {"stored_part": [None] * n, "fingerprint": [None] * n, "stored_segments": [None] * n,
            "stored_duration": [None] * n, "album": [None] * n, "album_artist": [None] * n, "genre_tag": [None] * n,
            "tags_known": [None] * n}
    for i, e in ok.items():
        hit = valid.get(e.track_id)
        if hit is None:
            reasons["no stored embeddings"] += 1
            continue
        for k, v in (("stored_part", hit.part), ("fingerprint", e.fingerprint), ("stored_segments", e.n_segments),
                     ("stored_duration", e.duration_seconds), ("album", e.album), ("album_artist", e.album_artist),
                     ("genre_tag", e.genre_tag or None), ("tags_known", e.genre_tag is not None)):
            cols[k][i] = v
    for k, v in cols.items():
        todo = todo.set_column(todo.schema.get_field_index(k), k, pa.array(v, todo.schema.field(k).type))
    stored = sum(v is not None for v in cols["stored_part"])
    record.update({"used": True, "stored": stored, "computed": n - stored, "computed_why": dict(reasons),
                   "backbone": described["backbone"]})
    return todo, ds.uri


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
    st = s.get("store")
    if st and (st.get("stored") or st.get("computed") or not st.get("used")):
        if st.get("used"):
            why = ", ".join(f"{n} {k}" for k, n in sorted(st.get("computed_why", {}).items()))
            lines.append(f"{st['stored']} track(s) scored from the embedding store of {st['dataset']} (no decoding), "
                         f"{st['computed']} decoded and computed" + (f" ({why})" if why else ""))
        else:
            lines.append(f"--dataset {st['dataset']}: {st['reason']}")
    if s.get("ran"):
        e = s.get("engine") or {}
        engine = f"{e.get('engine')} {e.get('precision', '')}".strip() if e.get("engine", "none") != "none" else "no backbone"
        nodes = len(s.get("nodes") or [])
        lines.append(f"scored {s['ran']}: {s.get('processes', 0)} process(es)" + (f" on {nodes} node(s)" if nodes else "")
                     + f", {engine}" + (f", {e['threads']} engine thread(s) each" if e.get("threads") else ""))
    total = max(s["tracks_total"], 1)
    dist = s["genre_distribution"]
    shown = {g: n for g, n in dist.items() if n} if len(dist) > 12 else dist  # the tagger's 50 tags: only those given
    rows = [(g, n, f"{100 * n / total:.1f}%") for g, n in shown.items()]
    if len(shown) < len(dist):
        rows.append((f"({len(dist) - len(shown)} other genres)", 0, "0.0%"))
    rows.append(("total", s["tracks_total"], "100%" if s["tracks_total"] else "0%"))
    lines += ["", "genre distribution of the library:", format_table(rows, ("genre", "tracks", "share"))]
    from genrecls.models.answers import format_answer_counts

    a = s.get("answers") or {}
    if a:
        word = a.get("uncertain_label", "uncertain")
        lines += format_answer_counts(s)  # answered / uncertain, and the line when the target precision was not shown
        if a.get("rule") == "global" and a.get("reached", True) and a.get("threshold") is not None:
            why = f"confidence below {a['threshold']:.3f} ({a.get('uncertain_source')}"
            why += f", target precision {a['target_precision']})" if "target_precision" in str(a.get("uncertain_source")) else ")"
        elif a.get("rule") == "global" and a.get("threshold") is not None:
            why = f"confidence below {a['threshold']:.3f} (target precision not reached: the best estimated precision)"
        elif a.get("rule") == "global":
            why = (f"every track: no threshold reached precision {a.get('target_precision')} on the run's tracks "
                   "(classify.strict_precision); set classify.min_confidence or lower classify.target_precision")
        elif a.get("rule") == "per_genre":
            why = "the best genre below its own threshold (classify.tag_threshold or the vocabulary's)"
        else:
            why = "never (the run recorded no validation tracks: identity calibration, no thresholds)"
        lines.append(f"{s.get('uncertain_total', 0)} {word} track(s) in the library ({s.get('uncertain', 0)} of this run's): "
                     f"{why}")
        cal = a.get("calibration") or {}
        lines.append(f"calibration: {cal.get('method')}" + (f" (T = {cal['temperature']:.3f})" if cal.get("method") == "temperature" else "")
                     + (f"; genres in the words of {a['vocabulary']}" if a.get("vocabulary") else ""))
    if s.get("group_by", "none") != "none":
        lines.append(f"album_genre: one answer for each of {s.get('albums', 0)} {'albums' if s['group_by'] == 'album' else 'folders'}")
    rv = s.get("review") or {}
    if rv.get("rows"):
        lines.append(f"\nreview: the model contradicts the genre a person wrote in {rv['rows']} of {rv['tagged_tracks']} "
                     f"tagged track(s) (its probability under {rv['low']:.3f}, another genre answered at "
                     f"{rv['high']:.3f} or more; nothing was changed): {rv['file']}, most confident first")
        for r in rv["first"]:
            lines.append(f"  {r['path']}: tagged {r['tagged']!r} ({r['tagged_probability']:.2f}), the model hears "
                         f"{r['predicted_genre']} ({r['confidence']:.2f})")
    elif rv.get("tagged_tracks"):
        lines.append(f"review: no tag of the {rv['tagged_tracks']} tagged track(s) is contradicted ({rv['file']} is empty)")
    if s["failures_total"]:
        lines.append(f"\n{s['failures_total']} file(s) could not be classified (table in {s['predictions']}/failures/)"
                     + (": " + ", ".join(f"{k} {v}" for k, v in sorted(s["failures_by_kind"].items())) if s["failures_by_kind"] else ""))
    if s.get("csv"):
        lines.append(f"CSV copy: {s['csv']}")
    return "\n".join(lines)
