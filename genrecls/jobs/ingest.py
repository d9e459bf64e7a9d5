"""The ingest job: a library of tracks -> Parquet shards of log-mel segments, with Ray tasks.

The driver discovers the tracks, skips those already in the dataset (same path, size and
modification time; or, when those changed, same content fingerprint), and sends batches
of tracks to Ray tasks, keeping a bounded number in flight.  Each task decodes, segments
and featurises its tracks and writes one shard atomically, plus a failures part for the
files it could not use.  A task whose worker dies is retried by Ray; a batch that keeps
killing its worker is split so that only the poisonous file is recorded as failed.

Re-running the same command is safe at any point: tracks land in a shard only whole,
shards appear only complete, and a reconcile step keeps each track in exactly one shard.

A bad file never stops the run (it becomes a row of the failures table, with a reason);
a dataset that cannot be written (read-only, disk full) stops it with
:class:`~genrecls.storage.dataset.OutputError` after removing partial files.  A worker's memory
is bounded whatever a track's length: audio is decoded in blocks, a track's spectrograms
beyond 64 MB wait in a temporary file (:class:`~genrecls.storage.dataset.TrackBuffer`), and shards
are written row group by row group.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from genrecls.audio.discovery import Discovery, discover
from genrecls.audio.features import check_same_features
from genrecls.audio.pipeline import (
    FeatureStream,
    fingerprint_file,
    one_thread,
    tune_allocator,
)
from genrecls.core.config import Config, DecodeConfig, FeatureConfig
from genrecls.core.errors import failure_of
from genrecls.core.hooks import pause_point
from genrecls.core.progress import Progress, format_duration
from genrecls.core.provenance import library_versions, utc_timestamp
from genrecls.core.runtime import as_interrupted, log, ray_session
from genrecls.core.scheduling import slots, task_bounds
from genrecls.jobs.inspection import describe
from genrecls.storage.dataset import (
    Dataset,
    DatasetError,
    OutputError,
    ShardWriter,
    TrackBuffer,
)
from genrecls.storage.location import Location, new_shard_name
from genrecls.storage.locks import folder_lock
from genrecls.storage.records import problem_rows, record_row, warning_row

__all__ = ["TrackTask", "IngestSummary", "process_batch", "ingest", "format_summary"]


@dataclass(frozen=True)
class TrackTask:
    path: str
    rel_path: str
    label: str | None
    size: int
    mtime_ns: int
    known_fingerprint: str | None = None

    @property
    def track_id(self) -> str:
        from genrecls.audio.discovery import track_id_for

        return track_id_for(self.rel_path)


def process_batch(tasks: list[TrackTask], cfg: FeatureConfig, dataset_uri: str, shard_name: str,
                  decode: DecodeConfig | None = None) -> dict[str, Any]:
    """Featurise a batch of tracks into one shard.  Runs inside a Ray task.

    Never raises for a bad file (each is returned as a failure row and written to the
    failures table; a file kept with a warning gets a row in the warnings table); raises :class:`~genrecls.storage.dataset.OutputError` if the dataset cannot be
    written, after deleting its partial shard.
    """
    tune_allocator()
    pause_point("ingest-task")
    with one_thread():
        return _process_batch(tasks, cfg, dataset_uri, shard_name, decode)


def _process_batch(tasks: list[TrackTask], cfg: FeatureConfig, dataset_uri: str, shard_name: str,
                   decode: DecodeConfig | None) -> dict[str, Any]:
    loc = Location.parse(dataset_uri)
    writer = ShardWriter(loc, shard_name, cfg)
    failures, warnings, unchanged = [], [], []
    audio_seconds = 0.0
    try:
        for t in tasks:
            buf = TrackBuffer(cfg)
            try:
                try:
                    fingerprint = fingerprint_file(t.path)
                    if t.known_fingerprint is not None and fingerprint == t.known_fingerprint:
                        unchanged.append((t.track_id, t.size, t.mtime_ns, fingerprint))
                        continue
                    stream = FeatureStream(t.path, cfg, decode)
                    for mels, starts in stream:
                        buf.append(mels, starts)
                except OutputError:
                    raise
                except Exception as exc:  # noqa: BLE001 - every problem with one file is recorded, never raised
                    failures.append(record_row(t.rel_path, t.label, *failure_of(exc), t.size, t.mtime_ns))
                    continue
                writer.add_track(track_id=t.track_id, path=t.rel_path, label=t.label, fingerprint=fingerprint,
                                 size=t.size, mtime_ns=t.mtime_ns, duration=stream.duration, mels=buf)
                warned = warning_row(t.rel_path, t.label, stream.warnings, t.size, t.mtime_ns)
                if warned:
                    warnings.append(warned)
                audio_seconds += stream.duration
            finally:
                buf.close()
        shard_bytes = writer.close()
        Dataset(loc).write_failures(failures, name=shard_name)
        Dataset(loc).write_warnings(warnings, name=shard_name)
    except BaseException:
        writer.abort()
        raise
    node = None
    ray = sys.modules.get("ray")  # in a Ray task; not imported for a run in the command's own process
    if ray is not None and ray.is_initialized():
        node = ray.get_runtime_context().get_node_id()
    return {"shard": shard_name if writer.n_tracks else None, "tracks": writer.n_tracks, "segments": writer.segments,
            "audio_seconds": audio_seconds, "failures": failures, "warnings": warnings, "unchanged": unchanged,
            "shard_bytes": shard_bytes, "node": node, "pid": os.getpid()}


@dataclass
class IngestSummary:
    dataset: str
    discovered: int = 0
    ignored_files: int = 0
    skipped_unchanged: int = 0
    skipped_known_failures: int = 0
    processed: int = 0
    added: int = 0
    unchanged_content: int = 0
    failed: int = 0
    #: tracks kept although something is off (truncated, corrupt frames, an estimated length)
    warned: int = 0
    pruned: int = 0
    segments_added: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    shards_written: int = 0
    shard_bytes: int = 0
    failures_by_kind: dict[str, int] = field(default_factory=dict)
    warnings_by_kind: dict[str, int] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)
    worker_pids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _plan(found: Discovery, ds: Dataset, retry_failed: bool) -> tuple[list[TrackTask], int, int]:
    index = ds.tracks()
    touched = ds.touched()
    known_failures = {} if retry_failed else {
        r["path"]: (r["size"], r["mtime_ns"]) for r in ds.failures().to_pylist()}
    todo, unchanged, known_failed = [], 0, 0
    for t in found.tracks:
        e = index.get(t.track_id)
        if e is not None and e.path == t.rel_path and e.label == t.label and (
                (e.size, e.mtime_ns) == (t.size, t.mtime_ns) or touched.get(t.track_id) == (t.size, t.mtime_ns, e.fingerprint)):
            unchanged += 1
            continue
        if e is None and known_failures.get(t.rel_path) == (t.size, t.mtime_ns):
            known_failed += 1
            continue
        known = e.fingerprint if e is not None and e.label == t.label else None
        todo.append(TrackTask(t.path, t.rel_path, t.label, t.size, t.mtime_ns, known))
    return todo, unchanged, known_failed


def _write_manifest(ds: Dataset, cfg: Config, source: str, versions: dict[str, str]) -> None:
    tracks = ds.tracks()
    per_label: dict[str, dict[str, float]] = defaultdict(lambda: {"tracks": 0, "segments": 0, "audio_seconds": 0.0})
    for e in tracks.values():
        d = per_label[e.label if e.label is not None else ""]
        d["tracks"] += 1
        d["segments"] += e.n_segments
        d["audio_seconds"] += e.duration_seconds
    previous = ds.manifest() if ds.exists() else {}
    manifest = {
        "format": "genrecls-dataset",
        "schema_version": 1,
        "created": previous.get("created", utc_timestamp()),
        "updated": utc_timestamp(),
        "source": source,
        "features": asdict(cfg.features),
        "mel_shape": list(cfg.features.mel_shape),
        "labels": sorted(k for k in per_label if k),
        "counts": {
            "tracks": len(tracks),
            "segments": sum(e.n_segments for e in tracks.values()),
            "audio_seconds": round(sum(e.duration_seconds for e in tracks.values()), 3),
            "shards": len(ds.shard_names()),
            "failures": ds.failures().num_rows,
            "warnings": ds.warnings().num_rows,
            "per_label": {k: dict(v) for k, v in sorted(per_label.items())},
        },
        "versions": versions,
    }
    ds.location.write_json("manifest.json", manifest)


def check_features_match(ds: Dataset, cfg: FeatureConfig) -> None:
    """Raise :class:`DatasetError` when the dataset at ``ds`` was built with other features than ``cfg``."""
    if ds.exists():
        check_same_features(ds.feature_config(), cfg, subject=ds.uri, error=DatasetError,
                            remedy="use the same settings or another --out")


def ingest(source: str, out: str, cfg: Config | None = None, *, address: str | None = None,
           workers: int | None = None, root: str | None = None, prune: bool = False,
           progress: bool = True, verbose: bool = False) -> IngestSummary:
    """Ingest a library folder or manifest into the dataset at ``out``.

    Returns an :class:`IngestSummary`.  Raises for run-level problems (missing source,
    dataset locked or built with other features); never for a bad file.
    """
    cfg = (cfg or Config()).validate()
    t0 = time.monotonic()
    found = discover(source, root)
    loc = Location.parse(out)
    ds = Dataset(loc)
    summary = IngestSummary(dataset=loc.uri, discovered=len(found.tracks), ignored_files=found.ignored)
    versions = library_versions()
    try:
        with folder_lock(loc, "genrecls ingest"):
            pause_point("ingest-locked")
            _ingest_locked(found, source, ds, cfg, summary, versions, address=address, workers=workers,
                           prune=prune, progress=progress, verbose=verbose)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the dataset was left consistent (see _ingest_locked)
        stop = as_interrupted(exc)
        try:
            total = len(ds.tracks())
        except Exception:
            total = None
        stop.kept = (f"{summary.added} track(s) added by this run are kept in {loc.uri}"
                     + (f" ({total} in all)" if total is not None else ""))
        raise stop from None
    except OutputError:
        raise
    except OSError as exc:  # the dataset folder cannot be created, locked or written
        raise OutputError(f"cannot write the dataset at {loc.uri}: {exc.strerror or exc}") from exc
    summary.wall_seconds = time.monotonic() - t0
    return summary


def _ingest_locked(found: Discovery, source: str, ds: Dataset, cfg: Config, summary: IngestSummary,
                   versions: dict[str, str], *, address, workers, prune, progress, verbose) -> None:
    loc = ds.location
    source_abs = os.path.abspath(source) if "://" not in source else source
    check_features_match(ds, cfg.features)
    repaired = ds.reconcile()
    if repaired["temporaries_removed"] or repaired["rows_superseded"]:
        log.info("repaired an interrupted run: %s", repaired)
    if not ds.exists():
        _write_manifest(ds, cfg, source_abs, versions)
    loc.write_text("config.json", cfg.to_json() + "\n")
    todo, summary.skipped_unchanged, summary.skipped_known_failures = _plan(found, ds, cfg.ingest.retry_failed)
    try:
        if todo and runs_in_process(todo, cfg, address):
            _run_in_process(todo, cfg, loc, summary, progress)
        elif todo:
            with ray_session(address, workers, verbose=verbose, data=False):
                _run_tasks(todo, cfg, loc, summary, workers, progress)
    except BaseException:
        try:  # leave the dataset as readers expect it: no temporaries, manifest matching the shards
            ds.reconcile()
            _write_manifest(ds, cfg, source_abs, versions)
        except Exception:
            pass
        raise
    problems = problem_rows(found.problems)
    ds.write_failures(problems)
    for p in found.problems:
        summary.failures_by_kind[p.kind] = summary.failures_by_kind.get(p.kind, 0) + 1
    summary.failed += len(problems)
    vanished: set[str] = set()
    if prune:
        present = {t.track_id for t in found.tracks}
        vanished = {tid for tid in ds.tracks() if tid not in present}
        summary.pruned = len(vanished)
    ds.reconcile(drop_track_ids=vanished)
    if ds.location.exists("touched"):
        ds.record_touched({})  # forget entries of tracks re-processed or pruned since
    live = {e.path for e in ds.tracks().values()}
    ds.compact_failures(live, {t.rel_path for t in found.tracks} | {p.rel_path for p in found.problems})
    ds.compact_warnings()
    _write_manifest(ds, cfg, source_abs, versions)


class _Tally:
    """Adds each batch's result to the run's summary and progress line (Ray tasks or in-process alike)."""

    def __init__(self, todo: list[TrackTask], summary: IngestSummary, show_progress: bool):
        self.summary = summary
        self.bar = Progress(len(todo), "tracks", enabled=show_progress)
        self.kinds: Counter[str] = Counter(summary.failures_by_kind)
        self.warned: Counter[str] = Counter()
        self.nodes: set[str] = set()
        self.pids: set[int] = set()
        self.touched: dict[str, tuple[int, int, str]] = {}

    def add(self, batch: list[TrackTask], res: dict[str, Any]) -> None:
        s = self.summary
        s.processed += len(batch)
        s.added += res["tracks"]
        s.unchanged_content += len(res["unchanged"])
        self.touched.update({tid: (size, mtime, fp) for tid, size, mtime, fp in res["unchanged"]})
        s.failed += len(res["failures"])
        s.segments_added += res["segments"]
        s.audio_seconds += res["audio_seconds"]
        s.shard_bytes += res["shard_bytes"]
        s.shards_written += 1 if res["shard"] else 0
        self.kinds.update(f["kind"] for f in res["failures"])
        self.warned.update(w["kind"] for w in res["warnings"])
        s.warned += len(res["warnings"])
        if res["node"]:
            self.nodes.add(res["node"])
        if res["pid"]:
            self.pids.add(res["pid"])
        self.bar.update(done=len(batch), failed=len(res["failures"]), audio_seconds=res["audio_seconds"])
        if res["shard"]:
            pause_point("ingest-shard-written")

    def finish(self, loc: Location) -> None:
        if self.touched:
            Dataset(loc).record_touched(self.touched)

    def close(self) -> None:
        self.bar.close()
        s = self.summary
        s.failures_by_kind = dict(self.kinds)
        s.warnings_by_kind = dict(self.warned)
        s.nodes = sorted(self.nodes)
        s.worker_pids = sorted(self.pids)


def runs_in_process(todo: list[TrackTask], cfg: Config, address: str | None) -> bool:
    """True for a small run on this machine: Ray's start-up would cost more than its parallelism brings.

    Only without a cluster (no ``address``, none in ``RAY_ADDRESS``, no Ray already running in
    this process) and when the files to process total at most ``ingest.in_process_mb``.
    """
    if address or os.environ.get("RAY_ADDRESS"):
        return False
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return False
    return sum(t.size for t in todo) <= cfg.ingest.in_process_mb * 1e6


def _run_in_process(todo: list[TrackTask], cfg: Config, loc: Location, summary: IngestSummary,
                    show_progress: bool) -> None:
    """The same batches and shards as the Ray tasks, one after another in this process."""
    tally = _Tally(todo, summary, show_progress)
    try:
        size = cfg.ingest.tracks_per_task
        for batch in (todo[i:i + size] for i in range(0, len(todo), size)):
            tally.add(batch, process_batch(batch, cfg.features, loc.uri, new_shard_name(), cfg.decode))
        tally.finish(loc)
    finally:
        tally.close()


def _run_tasks(todo: list[TrackTask], cfg: Config, loc: Location, summary: IngestSummary,
               workers: int | None, show_progress: bool) -> None:
    import ray
    from ray.exceptions import RayError, RayTaskError

    n_slots, max_inflight = slots(workers, cfg.ingest.inflight_per_cpu)
    remote = _remote_process_batch().options(num_cpus=1, max_retries=cfg.ingest.max_task_retries,
                                             retry_exceptions=False, scheduling_strategy="SPREAD")
    single = _remote_process_batch().options(num_cpus=1, max_retries=1, retry_exceptions=False)
    inflight: dict[Any, list[TrackTask]] = {}
    tally = _Tally(todo, summary, show_progress)
    cfg_ref, decode_ref = ray.put(cfg.features), ray.put(cfg.decode)
    uri = loc.uri
    queue = [todo[a:b] for a, b in reversed(task_bounds(len(todo), cfg.ingest.tracks_per_task, n_slots))]
    # the watchdog: a task still running long past its files' decoding deadlines is stuck in native code
    # that the in-task deadline cannot interrupt; it is stopped and its files are retried one by one
    due: dict[Any, float] = {}
    stopped: set[Any] = set()
    try:
        while queue or inflight:
            while queue and len(inflight) < max_inflight:
                batch = queue.pop()
                fn = single if isinstance(batch, _Isolated) else remote
                ref = fn.remote(batch, cfg_ref, uri, new_shard_name(), decode_ref)
                inflight[ref] = batch
                due[ref] = time.monotonic() + task_budget(batch, cfg.decode)
            wait = max(0.0, min(due.values()) - time.monotonic())
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=wait)
            if not ready:
                now = time.monotonic()
                for ref in [r for r, d in due.items() if d <= now and r not in stopped]:
                    log.warning("a task on %d track(s) ran past its deadline; stopping it", len(inflight[ref]))
                    stopped.add(ref)
                    due[ref] = now + 30.0  # time for the stop to land before the next look
                    ray.cancel(ref, force=True)
                continue
            for ref in ready:
                batch = inflight.pop(ref)
                due.pop(ref)
                timed_out = ref in stopped
                stopped.discard(ref)
                try:
                    res = ray.get(ref)
                except RayError as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(exc, RayTaskError) and isinstance(cause, DatasetError):
                        raise cause from None  # OutputError in the task: the dataset cannot be written
                    if len(batch) > 1:
                        log.warning("a task failed on a batch of %d tracks (%s); retrying them one by one",
                                    len(batch), type(exc).__name__)
                        for t in batch:
                            queue.append(_Isolated([t]))
                        continue
                    res = _crashed(batch[0], exc, cfg, loc, timed_out)
                tally.add(batch, res)
        tally.finish(loc)
    # Interrupted or the output failed: the tasks still running are not cancelled one by one (ray.cancel
    # racing a task's completion crashes the driver's core worker in Ray 2.60: "Tried to complete task that
    # was not pending"); they end with the embedded Ray's shutdown or, on a cluster, with this driver's job.
    # A task stopped half-way leaves only a temporary file, which the next run's reconcile removes.
    finally:
        tally.close()


@functools.lru_cache(maxsize=1)
def _remote_process_batch():
    """``process_batch`` as a Ray remote function, made once per process (Ray exports it once per job)."""
    import ray

    return ray.remote(process_batch)


def task_budget(batch: list[TrackTask], decode: DecodeConfig) -> float:
    """Seconds after its submission at which a task is stopped by the driver's watchdog (DecodeConfig.watchdog_seconds)."""
    return decode.watchdog_seconds([t.size for t in batch])


def _crashed(t: TrackTask, exc: Exception, cfg: Config, loc: Location, timed_out: bool = False) -> dict[str, Any]:
    """Record a track whose task kept failing on its own (its worker died, a bug, or the watchdog stopped it)."""
    from ray.exceptions import RayTaskError

    if timed_out:
        kind = "timed_out"
        reason = (f"decoding did not finish within {task_budget([t], cfg.decode):.0f} s (its deadline, "
                  "decode.timeout_seconds and decode.timeout_seconds_per_mb, twice over): the decoder is stuck; "
                  "its worker was stopped")
    elif isinstance(exc, RayTaskError):
        cause = getattr(exc, "cause", None)
        reason = f"processing this file failed: {type(cause).__name__ if cause else 'error'}: {cause}"
        kind = "error"
    else:
        kind = "worker_crashed"
        reason = (f"the worker process died while processing this file ({type(exc).__name__}); "
                  f"tried {cfg.ingest.max_task_retries + 1} times in its batch and twice alone")
    row = record_row(t.rel_path, t.label, kind, reason, t.size, t.mtime_ns)
    Dataset(loc).write_failures([row])
    return {"shard": None, "tracks": 0, "segments": 0, "audio_seconds": 0.0, "failures": [row], "warnings": [],
            "unchanged": [], "shard_bytes": 0, "node": None, "pid": None}


class _Isolated(list):
    """A one-track batch retried on its own after its batch kept killing workers."""

    isolated = True


def format_summary(summary: IngestSummary, ds: Dataset | None = None) -> str:
    """The closing report of an ingest: what this run did, then the dataset's :func:`~genrecls.jobs.inspection.describe`."""
    ds = ds if ds is not None else Dataset(summary.dataset)
    lines = [f"dataset {summary.dataset}"]
    lines.append(
        f"{summary.discovered} tracks found, {summary.skipped_unchanged} already in the dataset, "
        f"{summary.skipped_known_failures} known failures skipped, {summary.processed} processed: "
        f"{summary.added} added ({summary.warned} with a warning), {summary.unchanged_content} unchanged content, "
        f"{summary.failed} failed"
        + (f", {summary.pruned} pruned" if summary.pruned else "")
        + (f"; {summary.ignored_files} non-audio files ignored" if summary.ignored_files else ""))
    if summary.audio_seconds:
        lines.append(f"{summary.audio_seconds / 3600:.2f} h of audio in {format_duration(summary.wall_seconds)} "
                     f"({summary.audio_seconds / max(summary.wall_seconds, 1e-9):.0f}x real time), "
                     f"{summary.segments_added} segments, {summary.shards_written} shards, "
                     f"{summary.shard_bytes / max(summary.segments_added, 1) / 1024:.1f} KiB per segment")
    lines.append("")
    lines.append(describe(ds))
    return "\n".join(lines)
