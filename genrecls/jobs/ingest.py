"""The ingest job: a library of tracks -> Parquet shards of log-mel segments, with Ray tasks.

The driver discovers the tracks, skips those already in the dataset (same path, size and
modification time; or, when those changed, same content fingerprint), and sends batches
of tracks to Ray tasks, keeping a bounded number in flight.  Each task decodes, segments
and featurises its tracks and writes one shard atomically, plus a failures part for the
files it could not use.  A task whose worker dies is retried by Ray; a batch that keeps
killing its worker is split so that only the poisonous file is recorded as failed.

Re-running the same command is safe at any point: tracks land in a shard only whole,
shards appear only complete, and a track is in the dataset once the driver committed the
shard's tracks to the dataset's index (:mod:`genrecls.storage.index`; every
:data:`COMMIT_SHARDS` shards, the first ones sooner, at the end, and when the run is stopped): a killed run leaves
committed versions, each whole, and shards no version references, which no reader sees and
``genrecls vacuum`` deletes.  A changed track's new row replaces its old one in a commit; its
old rows stay in their shard (never rewritten) until vacuumed.

The embedding store (``DATASET/embeddings/``, :mod:`genrecls.storage.embeddings`).  When the
dataset's preset feeds the pretrained backbone (``musicnn``) and ``ingest.embeddings`` is
``auto``, each task also runs the backbone on the segments it has just computed (one
:class:`~genrecls.models.engine.BackboneEngine` per worker process, kept between tasks, its
threads set to the CPUs Ray gave the task: 1) and writes an embeddings part named as its
shard, right after the shard: every layer a head may be fit on, for each segment.  Tracks
already in the dataset that the store lacks (a dataset ingested before the store existed,
with ``embeddings = "off"``, or a run killed between a shard and its part) are embedded from
their stored segments by further tasks (no decoding).  The store is reconciled with the
dataset under its lock, before and after: entries of changed and pruned tracks leave it, a
track is in exactly one part.  A store computed by another backbone (other weights) or from
other features is refused before anything is done, both named.

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
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa

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
from genrecls.storage.embeddings import EmbeddingStore, EmbeddingWriter, embedding_schema, stored_embedding
from genrecls.storage.index import TrackEntry, entries_table
from genrecls.storage.location import Location, new_shard_name
from genrecls.storage.locks import folder_lock
from genrecls.storage.records import problem_rows, record_row, warning_row

__all__ = ["TrackTask", "EmbedSpec", "IngestSummary", "process_batch", "embed_stored", "embeddings_wanted", "ingest",
           "format_summary"]

#: tracks already in the dataset whose embeddings are computed in this process rather than by Ray tasks, at
#: most this many segments (about 12 s of the backbone on one core)
BACKFILL_IN_PROCESS_SEGMENTS = 1000
#: the driver commits the tracks of finished tasks to the index once this many shards wait (or this many
#: seconds passed since its last commit), at the end, and when the run is stopped
COMMIT_SHARDS = 64
COMMIT_SECONDS = 120.0


@dataclass(frozen=True)
class EmbedSpec:
    """What an ingest task needs to compute the store's embeddings: the runtime, its precision, the backbone's id."""

    engine: str
    precision: str
    backbone: str


def embeddings_wanted(cfg: Config) -> bool:
    """True when ingest computes the embedding store: ``ingest.embeddings="auto"`` and the dataset's preset is
    the one the pretrained backbone takes (``musicnn``)."""
    from genrecls.core.config import MODEL_PRESETS

    return cfg.ingest.embeddings == "auto" and cfg.features.preset == MODEL_PRESETS["musicnn"]


def _embed_schema(cfg: FeatureConfig, spec: EmbedSpec, backbone) -> Any:
    from genrecls.models.engine import BACKBONE_OUTPUTS

    return embedding_schema(BACKBONE_OUTPUTS, backbone=spec.backbone, features=cfg, engine=backbone.describe())


def _backbone_for(spec: EmbedSpec):
    """This process's backbone engine (kept between tasks); refuses weights other than the run's."""
    from genrecls.models.transfer import shared_backbone

    backbone = shared_backbone(spec.engine, spec.precision)
    if backbone.backbone_id() != spec.backbone:  # a cluster node with other weights installed
        raise DatasetError(f"this worker's musicnn weights are {backbone.backbone_id()}, the run's {spec.backbone}: "
                           "install the same genrecls on every node")
    return backbone


@dataclass(frozen=True)
class TrackTask:
    path: str
    rel_path: str
    label: str | None
    size: int
    mtime_ns: int
    known_fingerprint: str | None = None
    #: the stored track's audio fingerprint: a file whose bytes changed but whose audio packets did not (a person or
    #: genrecls edited its tags) is not decoded again, only its stat and tags are recorded
    known_audio_fingerprint: str | None = None
    #: the stored track's tags were never read (ingested before they were): an unchanged file's tags are read
    tags_missing: bool = False

    @property
    def track_id(self) -> str:
        from genrecls.audio.discovery import track_id_for

        return track_id_for(self.rel_path)


def process_batch(tasks: list[TrackTask], cfg: FeatureConfig, dataset_uri: str, shard_name: str,
                  decode: DecodeConfig | None = None, embed: EmbedSpec | None = None) -> dict[str, Any]:
    """Featurise a batch of tracks into one shard (and, with ``embed``, their embeddings into the part of the
    same name).  Runs inside a Ray task.

    Never raises for a bad file (each is returned as a failure row and written to the
    failures table; a file kept with a warning gets a row in the warnings table); raises :class:`~genrecls.storage.dataset.OutputError` if the dataset cannot be
    written, after deleting its partial shard.
    """
    tune_allocator()
    pause_point("ingest-task")
    with one_thread():
        backbone = _backbone_for(embed) if embed is not None else None  # before any file: a runtime error stops the run
        return _process_batch(tasks, cfg, dataset_uri, shard_name, decode, embed, backbone)


def _process_batch(tasks: list[TrackTask], cfg: FeatureConfig, dataset_uri: str, shard_name: str,
                   decode: DecodeConfig | None, embed: EmbedSpec | None = None, backbone=None) -> dict[str, Any]:
    from genrecls.audio.decode import audio_fingerprint
    from genrecls.audio.tags import read_track_tags
    from genrecls.models.transfer import embed_segments

    loc = Location.parse(dataset_uri)
    writer = ShardWriter(loc, shard_name, cfg)
    embedder = EmbeddingWriter(loc, shard_name, _embed_schema(cfg, embed, backbone)) if backbone is not None else None
    failures, warnings, unchanged, retagged = [], [], [], []
    audio_seconds = embed_seconds = 0.0
    embed_bytes = 0
    try:
        for t in tasks:
            buf = TrackBuffer(cfg)
            try:
                try:
                    fingerprint = fingerprint_file(t.path)
                    if t.known_fingerprint is not None and fingerprint == t.known_fingerprint:
                        unchanged.append((t.track_id, t.size, t.mtime_ns, fingerprint))
                        if t.tags_missing:
                            retagged.append({"track_id": t.track_id, "size": t.size, "mtime_ns": t.mtime_ns,
                                             **_tag_fields(read_track_tags(t.path))})
                        continue
                    if t.known_audio_fingerprint is not None and audio_fingerprint(t.path) == t.known_audio_fingerprint:
                        # the same audio, other tags: its rows and embeddings stay, its stat and tags are new
                        retagged.append({"track_id": t.track_id, "size": t.size, "mtime_ns": t.mtime_ns,
                                         **_tag_fields(read_track_tags(t.path))})
                        continue
                    stream = FeatureStream(t.path, cfg, decode)
                    for mels, starts in stream:
                        buf.append(mels, starts)
                except OutputError:
                    raise
                except Exception as exc:  # noqa: BLE001 - every problem with one file is recorded, never raised
                    failures.append(record_row(t.rel_path, t.label, *failure_of(exc), t.size, t.mtime_ns))
                    continue
                if embedder is not None:  # the stored (rounded) values, as training reads them
                    t_embed = time.perf_counter()
                    layers = embed_segments(backbone, buf.chunks(256), cfg.mel_shape)
                    embed_seconds += time.perf_counter() - t_embed
                writer.add_track(track_id=t.track_id, path=t.rel_path, label=t.label, fingerprint=fingerprint,
                                 size=t.size, mtime_ns=t.mtime_ns, duration=stream.duration, mels=buf,
                                 audio_fingerprint=stream.audio_fingerprint,
                                 **_tag_fields(read_track_tags(t.path)))  # a header read; never fails the file
                if embedder is not None:
                    embedder.add_track(t.track_id, fingerprint, layers)
                warned = warning_row(t.rel_path, t.label, stream.warnings, t.size, t.mtime_ns)
                if warned:
                    warnings.append(warned)
                audio_seconds += stream.duration
            finally:
                buf.close()
        shard_bytes = writer.close()
        if embedder is not None:  # after its shard: a run killed in between leaves tracks the next run embeds
            pause_point("ingest-embeddings")
            embed_bytes = embedder.close()
        Dataset(loc).write_failures(failures, name=shard_name)
        Dataset(loc).write_warnings(warnings, name=shard_name)
    except BaseException:
        writer.abort()
        if embedder is not None:
            embedder.abort()
        raise
    node = None
    ray = sys.modules.get("ray")  # in a Ray task; not imported for a run in the command's own process
    if ray is not None and ray.is_initialized():
        node = ray.get_runtime_context().get_node_id()
    return {"shard": shard_name if writer.n_tracks else None, "tracks": writer.n_tracks, "segments": writer.segments,
            "audio_seconds": audio_seconds, "failures": failures, "warnings": warnings, "unchanged": unchanged,
            "retagged": retagged,
            "shard_bytes": shard_bytes, "node": node, "pid": os.getpid(),
            "embedded_tracks": embedder.n_tracks if embedder is not None else 0,
            "embedded_segments": embedder.segments if embedder is not None else 0,
            "embed_seconds": embed_seconds, "embedding_bytes": embed_bytes,
            "engine": backbone.describe() if backbone is not None else None,
            # what the driver commits to the index once the shard (and its part) are whole
            "entries": writer.entries, "embedded": [e["track_id"] for e in embedder.entries] if embedder else []}


def _tag_fields(tags) -> dict[str, Any]:
    """A file's :class:`~genrecls.audio.tags.TrackTags` as index fields: album, album artist and the genres a person
    wrote, joined (``""``: none)."""
    from genrecls.audio.tags import TAG_SEPARATOR

    return {"album": tags.album, "album_artist": tags.album_artist, "genre_tag": TAG_SEPARATOR.join(tags.genres)}


def embed_stored(dataset_uri: str, shard: str, tracks: list[tuple[str, str]], part_name: str, cfg: FeatureConfig,
                 embed: EmbedSpec) -> dict[str, Any]:
    """Embed tracks already in the dataset from their stored segments (no decoding): ``tracks`` are
    (track_id, fingerprint) pairs of one shard; their embeddings go to a new part.  Runs inside a Ray task."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from genrecls.models.transfer import embed_segments
    from genrecls.storage.dataset import mel_array

    with one_thread():
        backbone = _backbone_for(embed)
        loc = Location.parse(dataset_uri)
        writer = EmbeddingWriter(loc, part_name, _embed_schema(cfg, embed, backbone))
        t0 = time.perf_counter()
        try:
            fingerprints = dict(tracks)
            pds = pads.dataset([loc.join("shards", shard)], filesystem=loc.fs, format="parquet")
            table = pds.to_table(columns=["track_id", "fingerprint", "segment_index", "mel"],
                                 filter=pc.field("track_id").isin(sorted(fingerprints)))
            ids = table.column("track_id").to_numpy(zero_copy_only=False)
            order = np.lexsort((table.column("segment_index").to_numpy(), ids))
            table = table.take(pa.array(order))
            ids = ids[order]
            starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, int)
            for a, b in zip(starts, np.r_[starts[1:], len(ids)]):
                tid = str(ids[a])
                rows = table.slice(int(a), int(b - a))
                if rows.column("fingerprint")[0].as_py() != fingerprints[tid]:
                    continue  # the track changed since it was planned: the next run embeds it
                mels = mel_array(rows.column("mel"), cfg.mel_shape, dtype=np.float16)
                writer.add_track(tid, fingerprints[tid], embed_segments(backbone, [mels], cfg.mel_shape))
            part_bytes = writer.close()
        except BaseException:
            writer.abort()
            raise
    return {"tracks": writer.n_tracks, "segments": writer.segments, "bytes": part_bytes,
            "embed_seconds": time.perf_counter() - t0, "engine": backbone.describe(),
            "part": part_name if writer.n_tracks else None, "entries": writer.entries}


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
    #: changed files whose audio is the one stored (their tags were edited): not decoded, stat and tags recorded
    retagged: int = 0
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
    #: the embedding store: "computed" (ingest.embeddings=auto on a musicnn dataset), "off", or why not
    embeddings: str = "off"
    #: tracks and segments embedded by this run (with the new tracks, and from stored segments)
    embedded_tracks: int = 0
    embedded_segments: int = 0
    #: of which tracks already in the dataset, embedded from their stored segments
    backfilled_tracks: int = 0
    #: seconds the backbone ran, summed over every task
    embed_seconds: float = 0.0
    #: bytes of embedding parts written
    embedding_bytes: int = 0
    #: what computed them (genrecls.models.engine.BackboneEngine.describe, of the first task)
    engine: dict[str, Any] | None = None
    #: tracks given another label in the index (same file, another label in a manifest or in its tags)
    relabelled: int = 0
    #: where labels came from ("folders" or "tags"), the dataset's labelled tracks and genres, and why the others
    #: are unlabelled (reason -> tracks); with tags and no vocabulary entry, the spellings merged into each label
    labels_from: str = "folders"
    labelled: int = 0
    genres: int = 0
    unlabelled: dict[str, int] = field(default_factory=dict)
    merged_spellings: dict[str, list[str]] = field(default_factory=dict)
    #: the index's version this run left (genrecls.storage.index), and its commits
    index_version: int | None = None
    commits: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _plan(found: Discovery, ds: Dataset, retry_failed: bool, by_tags: bool = False
          ) -> tuple[list[TrackTask], int, int, dict[str, Any]]:
    """What to do: the tracks to process, how many are unchanged, how many are known failures, and the
    tracks whose label alone changed (a manifest's; committed as a relabel, nothing re-read).

    ``by_tags``: labels come from the files' tags (:func:`_relabel_from_tags`, after the run), not from
    discovery: a known track's label is then no reason to re-read it."""
    index = ds.tracks()
    touched = ds.touched()
    known_failures = {} if retry_failed else {
        r["path"]: (r["size"], r["mtime_ns"]) for r in ds.failures().to_pylist()}
    todo, unchanged, known_failed = [], 0, 0
    relabel: dict[str, Any] = {}
    for t in found.tracks:
        e = index.get(t.track_id)
        if e is not None and e.path == t.rel_path and not (by_tags and e.genre_tag is None) and (
                (e.size, e.mtime_ns) == (t.size, t.mtime_ns) or touched.get(t.track_id) == (t.size, t.mtime_ns, e.fingerprint)):
            unchanged += 1
            if e.label != t.label and not by_tags:
                relabel[t.track_id] = t.label
            continue
        if e is None and known_failures.get(t.rel_path) == (t.size, t.mtime_ns):
            known_failed += 1
            continue
        same = e is not None and e.path == t.rel_path and (by_tags or e.label == t.label)
        todo.append(TrackTask(t.path, t.rel_path, t.label, t.size, t.mtime_ns, e.fingerprint if same else None,
                              e.audio_fingerprint if same else None, tags_missing=same and e.genre_tag is None))
    return todo, unchanged, known_failed, relabel


def _write_manifest(ds: Dataset, cfg: Config, source: str, root: str, versions: dict[str, str],
                    engine: dict[str, Any] | None = None, summary: IngestSummary | None = None) -> None:
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
        # the folder the tracks' paths are relative to (classify --dataset finds a library's files by it)
        "root": root,
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
        "embeddings": _store_record(ds, previous.get("embeddings"), engine),
        # where the labels come from; with tags, the vocabulary and why the other tracks are unlabelled
        "labels_from": _labels_record(cfg, summary, previous.get("labels_from")),
        "index": {"format": "delta", "folder": "index", "version": ds.version},
    }
    ds.location.write_json("manifest.json", manifest)


def _labels_record(cfg: Config, summary: IngestSummary | None, previous: dict[str, Any] | None) -> dict[str, Any]:
    record: dict[str, Any] = {"source": cfg.ingest.labels_from}
    if cfg.ingest.labels_from == "tags":
        path = cfg.ingest.labels
        record["vocabulary"] = os.path.abspath(path) if path and "://" not in path else path
    if summary is None:
        return {**(previous or {}), **record}
    return {**record, "labelled": summary.labelled, "genres": summary.genres, "unlabelled": summary.unlabelled,
            "merged_spellings": summary.merged_spellings}


def _store_record(ds: Dataset, previous: dict[str, Any] | None, engine: dict[str, Any] | None) -> dict[str, Any] | None:
    """The manifest's record of the embedding store: what it holds and what computed it (None: no store)."""
    try:
        d = EmbeddingStore(ds).describe()
    except DatasetError:  # a store another backbone wrote: refused before, recorded as it was
        return previous
    if d is None:
        return None
    d.pop("features", None)  # the dataset's own (checked per part)
    return {"folder": "embeddings", **d, "last_engine": engine or (previous or {}).get("last_engine")}


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
    vocab = _tag_vocabulary(cfg)  # a wrong vocabulary file stops here, before anything starts
    found = discover(source, root)
    if cfg.ingest.labels_from == "tags":  # the files' tags label them, not their folders
        found.tracks = [replace(t, label=None) for t in found.tracks]
        found.problems = [replace(p, label=None) for p in found.problems]
    loc = Location.parse(out)
    ds = Dataset(loc)
    summary = IngestSummary(dataset=loc.uri, discovered=len(found.tracks), ignored_files=found.ignored)
    versions = library_versions()
    try:
        with folder_lock(loc, "genrecls ingest"):
            pause_point("ingest-locked")
            _ingest_locked(found, source, ds, cfg, summary, versions, address=address, workers=workers,
                           prune=prune, progress=progress, verbose=verbose, vocab=vocab)
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
                   versions: dict[str, str], *, address, workers, prune, progress, verbose, vocab=None) -> None:
    loc = ds.location
    source_abs = os.path.abspath(source) if "://" not in source else source
    check_features_match(ds, cfg.features)
    with ds.writing("genrecls ingest"):  # converts a dataset from before the index; the session's fence
        store = EmbeddingStore(ds)
        embed = _embed_spec(cfg, store, summary)  # refuses a store of another backbone before anything is done
        repaired = ds.reconcile()
        repaired.update(_reconcile_store(ds, store))
        if repaired["temporaries_removed"] or repaired.get("store_temporaries_removed"):
            log.info("removed the temporary files of an interrupted run: %s", repaired)
        if not ds.exists():
            _write_manifest(ds, cfg, source_abs, found.root, versions)
        loc.write_text("config.json", cfg.to_json() + "\n")
        by_tags = cfg.ingest.labels_from == "tags"
        todo, summary.skipped_unchanged, summary.skipped_known_failures, relabel = _plan(
            found, ds, cfg.ingest.retry_failed, by_tags)
        if relabel:
            summary.relabelled = ds.relabel(relabel)
        vanished: set[str] = set()
        if prune:
            present = {t.track_id for t in found.tracks}
            vanished = {tid for tid in ds.tracks() if tid not in present}
        backfill = _backfill_plan(ds, store, todo, vanished) if embed is not None else []
        committer = _Committer(ds, cfg, embed, summary)
        try:
            if (todo or backfill) and runs_in_process(todo, cfg, address) and _backfill_segments(backfill) <= BACKFILL_IN_PROCESS_SEGMENTS:
                _run_in_process(todo, cfg, loc, summary, progress, embed, committer)
                _backfill_in_process(backfill, cfg, loc, summary, progress, embed, committer)
            elif todo or backfill:
                _prepare_backbone(embed)
                with ray_session(address, workers, verbose=verbose, data=False):
                    if todo:
                        _run_tasks(todo, cfg, loc, summary, workers, progress, embed, committer)
                    _backfill_tasks(backfill, cfg, loc, summary, workers, progress, embed, committer)
        except BaseException:
            try:  # keep what finished: one commit of the shards complete so far, the manifest matching it
                committer.flush()
                _write_manifest(ds, cfg, source_abs, found.root, versions, summary.engine)
            except Exception:
                pass
            raise
        committer.flush()
        problems = problem_rows(found.problems)
        ds.write_failures(problems)
        for p in found.problems:
            summary.failures_by_kind[p.kind] = summary.failures_by_kind.get(p.kind, 0) + 1
        summary.failed += len(problems)
        summary.pruned = len(vanished)
        if vanished:
            ds.reconcile(drop_track_ids=vanished)  # one commit; the pruned rows stay in their shards until vacuum
        _count_labels(ds, summary, vocab if by_tags else None)  # with tags: every track's label, one relabel commit
        live = {e.path for e in ds.tracks().values()}
        ds.compact_failures(live, {t.rel_path for t in found.tracks} | {p.rel_path for p in found.problems})
        ds.compact_warnings()
        _write_manifest(ds, cfg, source_abs, found.root, versions, summary.engine, summary)
        summary.index_version = ds.version


def _tag_vocabulary(cfg: Config):
    """The vocabulary that maps genre tags to labels (``ingest.labels``; None: tag texts as they are)."""
    if cfg.ingest.labels_from != "tags":
        if cfg.ingest.labels:
            raise DatasetError("ingest.labels (--labels) maps genre tags to labels: give --labels-from tags too")
        return None
    from genrecls.models.vocabulary import load_tag_vocabulary

    return load_tag_vocabulary(cfg.ingest.labels)


def _count_labels(ds: Dataset, summary: IngestSummary, vocab) -> None:
    """The summary's labelled and unlabelled tracks (and why); with ``vocab`` (labels from tags) every track's label
    is first made anew from the genres a person wrote in it: one relabel commit of those that changed (a new
    vocabulary, a new majority spelling, a track ingested or re-tagged by this run)."""
    tracks = ds.tracks()
    if vocab is not None:
        from genrecls.models.vocabulary import labels_from_tags

        labels, why, merged = labels_from_tags({t: e.genre_tag for t, e in tracks.items()}, vocab)
        summary.relabelled += ds.relabel(labels)
        summary.labels_from, summary.merged_spellings = "tags", merged
        summary.unlabelled = dict(Counter(why.values()).most_common())
        tracks = ds.tracks()
    else:
        summary.unlabelled = {"not in a label folder (or no label in the manifest)": n for n in
                              [sum(e.label is None for e in tracks.values())] if n}
    summary.labelled = sum(e.label is not None for e in tracks.values())
    summary.genres = len({e.label for e in tracks.values() if e.label is not None})


class _Committer:
    """Commits what finished tasks wrote (their shards' tracks, their parts' embeddings, unchanged files' new
    stats) to the dataset's index, a batch of tasks per commit: after 1 shard, then 2, 4... up to every
    :data:`COMMIT_SHARDS` shards (or :data:`COMMIT_SECONDS`), and at the end (:meth:`flush`)."""

    def __init__(self, ds: Dataset, cfg: Config, embed: EmbedSpec | None, summary: IngestSummary):
        self.ds, self.cfg, self.embed, self.summary = ds, cfg, embed, summary
        self.rows: list[TrackEntry] = []
        self.stored: dict[str, Any] = {}
        self.touched: dict[str, tuple[int, int, str]] = {}
        #: files whose audio is the stored one but whose tags (and stat) changed, or whose tags were never read
        self.retagged: dict[str, dict[str, Any]] = {}
        self.backfilled: dict[str, tuple[Any, str, int]] = {}
        self.shards = 0
        self.since = time.monotonic()
        #: shards before the next commit: 1, 2, 4... up to COMMIT_SHARDS (the first shards are kept early)
        self.threshold = 1

    def _stored(self, part: str, engine: dict[str, Any] | None):
        from genrecls.models.engine import BACKBONE_OUTPUTS

        return stored_embedding(part, self.embed.backbone, self.cfg.features, BACKBONE_OUTPUTS, engine)

    def add(self, res: dict[str, Any]) -> None:
        """A task's result (:func:`process_batch`)."""
        self.touched.update({tid: (size, mtime, fp) for tid, size, mtime, fp in res["unchanged"]})
        self.retagged.update({r["track_id"]: {k: v for k, v in r.items() if k != "track_id"}
                              for r in res.get("retagged", [])})
        if res["shard"]:
            self.rows += [TrackEntry(shard=res["shard"], **e) for e in res.get("entries", [])]
            if res.get("embedded"):
                how = self._stored(res["shard"], res.get("engine"))
                self.stored.update({tid: how for tid in res["embedded"]})
            self.shards += 1
        self.maybe_flush()

    def add_backfill(self, res: dict[str, Any]) -> None:
        """A result of :func:`embed_stored`: its part's tracks get their embedding entry."""
        if res.get("part"):
            how = self._stored(res["part"], res.get("engine"))
            self.backfilled.update({e["track_id"]: (how, e["fingerprint"], e["n_segments"]) for e in res["entries"]})
            self.shards += 1
        self.maybe_flush()

    def maybe_flush(self) -> None:
        if len(self.retagged) >= COMMIT_SHARDS * 32:  # a library re-tagged wholesale: commit as it goes
            self.flush()
        if self.shards >= self.threshold or (self.shards and time.monotonic() - self.since >= COMMIT_SECONDS):
            self.flush()

    def flush(self) -> None:
        """One commit of everything waiting (nothing when nothing waits)."""
        if self.rows:
            self.ds.commit(upsert=entries_table(self.rows, self.stored), operation="ingest")
            self.summary.commits += 1
        if self.backfilled:
            tracks = self.ds.tracks()
            update = {}
            for tid, (how, fp, n) in self.backfilled.items():
                e = tracks.get(tid)
                if e is not None and (e.fingerprint, e.n_segments) == (fp, n):  # not changed since it was planned
                    update[tid] = {f"embedding_{k}": v for k, v in asdict(how).items()}
            if update:
                self.ds.commit(update=update, operation="embed stored segments")
                self.summary.commits += 1
        if self.touched and self.ds.record_touched(self.touched):
            self.summary.commits += 1
        if self.retagged:
            tracks = self.ds.tracks()
            update = {tid: v for tid, v in self.retagged.items() if tid in tracks}
            if update:
                self.ds.commit(update=update, operation="retagged")
                self.summary.commits += 1
        self.rows, self.stored, self.backfilled, self.touched, self.retagged = [], {}, {}, {}, {}
        if self.shards:
            self.threshold = min(2 * self.threshold, COMMIT_SHARDS)
        self.shards = 0
        self.since = time.monotonic()


def _embed_spec(cfg: Config, store: EmbeddingStore, summary: IngestSummary) -> EmbedSpec | None:
    """What the tasks need to fill the embedding store, or None (not wanted: ``summary.embeddings`` says why).

    Raises :class:`~genrecls.storage.embeddings.EmbeddingStoreError` when the store was computed by another
    backbone or from other features (both named): they are never mixed.
    """
    if cfg.ingest.embeddings == "off":
        summary.embeddings = "off"
        return None
    if not embeddings_wanted(cfg):
        summary.embeddings = f"not computed: the {cfg.features.preset!r} preset does not feed the musicnn backbone"
        return None
    from genrecls.models.engine import BACKBONE_OUTPUTS, backbone_id

    spec = EmbedSpec(cfg.inference.engine, cfg.inference.precision, backbone_id())
    store.check(spec.backbone, cfg.features, BACKBONE_OUTPUTS)
    summary.embeddings = "computed"
    return spec


def _prepare_backbone(embed: EmbedSpec | None) -> None:
    """Convert the backbone for the inference runtimes once, here, rather than in every worker at once
    (cached: a file check after the first time on this machine)."""
    if embed is None or embed.engine == "tensorflow":
        return
    try:
        from genrecls.models.engine import backbone_onnx

        backbone_onnx()
    except Exception as exc:  # noqa: BLE001  (the workers try again, and fall back to TensorFlow, recorded)
        log.warning("could not convert the backbone for the inference runtimes: %s", exc)


def _reconcile_store(ds: Dataset, store: EmbeddingStore) -> dict[str, int]:
    """Temporary files of a killed run in the store's folder go (its index is the dataset's: nothing else)."""
    if not store.location.exists("embeddings"):
        return {"store_temporaries_removed": 0}
    return {"store_temporaries_removed": store.reconcile()["temporaries_removed"]}


def _backfill_plan(ds: Dataset, store: EmbeddingStore, todo: list[TrackTask],
                   vanished: set[str]) -> list[tuple[str, list[tuple[str, str]], int]]:
    """Tracks in the dataset that stay (not re-processed, not pruned) and that the store lacks, by shard:
    (shard, [(track_id, fingerprint)], segments)."""
    index = ds.tracks()
    redo = {t.track_id for t in todo}
    wanted = {tid: (e.fingerprint, e.n_segments) for tid, e in index.items() if tid not in redo and tid not in vanished}
    have = store.valid_for(wanted)
    by_shard: dict[str, list[tuple[str, str]]] = defaultdict(list)
    segments: dict[str, int] = defaultdict(int)
    for tid in sorted(set(wanted) - set(have)):
        e = index[tid]
        by_shard[e.shard].append((tid, e.fingerprint))
        segments[e.shard] += e.n_segments
    return [(shard, tracks, segments[shard]) for shard, tracks in sorted(by_shard.items())]


def _backfill_segments(plan) -> int:
    return sum(n for _, _, n in plan)


def _backfill_batches(plan, per_task: int) -> list[tuple[str, list[tuple[str, str]]]]:
    return [(shard, tracks[i:i + per_task]) for shard, tracks, _ in plan for i in range(0, len(tracks), per_task)]


def _add_backfill(summary: IngestSummary, res: dict[str, Any]) -> None:
    summary.backfilled_tracks += res["tracks"]
    summary.embedded_tracks += res["tracks"]
    summary.embedded_segments += res["segments"]
    summary.embed_seconds += res["embed_seconds"]
    summary.embedding_bytes += res["bytes"]
    summary.engine = summary.engine or res["engine"]


def _backfill_in_process(plan, cfg: Config, loc: Location, summary: IngestSummary, show_progress: bool,
                         embed: EmbedSpec | None, committer: "_Committer") -> None:
    if not plan:
        return
    bar = Progress(len(plan), "shards embedded", enabled=show_progress)
    try:
        for shard, tracks in _backfill_batches(plan, cfg.ingest.tracks_per_task):
            res = embed_stored(loc.uri, shard, tracks, new_shard_name(), cfg.features, embed)
            _add_backfill(summary, res)
            committer.add_backfill(res)
            bar.update(done=1)
    finally:
        bar.close()


def _backfill_tasks(plan, cfg: Config, loc: Location, summary: IngestSummary, workers: int | None,
                    show_progress: bool, embed: EmbedSpec | None, committer: "_Committer") -> None:
    """Embed stored segments of tracks the store lacks, one Ray task per batch of a shard's tracks."""
    if not plan:
        return
    import ray
    from ray.exceptions import RayTaskError

    batches = _backfill_batches(plan, cfg.ingest.tracks_per_task)
    log.info("embedding %d track(s) already in the dataset from their stored segments", sum(len(t) for _, t in batches))
    n_slots, max_inflight = slots(workers, cfg.ingest.inflight_per_cpu)
    remote = ray.remote(embed_stored).options(num_cpus=1, max_retries=cfg.ingest.max_task_retries,
                                              retry_exceptions=False, scheduling_strategy="SPREAD")
    cfg_ref, spec_ref = ray.put(cfg.features), ray.put(embed)
    bar = Progress(len(batches), "batches embedded", enabled=show_progress)
    queue = list(reversed(batches))
    inflight: set[Any] = set()
    try:
        while queue or inflight:
            while queue and len(inflight) < max_inflight:
                shard, tracks = queue.pop()
                inflight.add(remote.remote(loc.uri, shard, tracks, new_shard_name(), cfg_ref, spec_ref))
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                inflight.discard(ref)
                try:
                    res = ray.get(ref)
                except RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    raise (cause if isinstance(cause, DatasetError) else exc) from None
                _add_backfill(summary, res)
                committer.add_backfill(res)
                bar.update(done=1)
    finally:
        bar.close()


class _Tally:
    """Adds each batch's result to the run's summary and progress line (Ray tasks or in-process alike)."""

    def __init__(self, todo: list[TrackTask], summary: IngestSummary, show_progress: bool, committer: "_Committer"):
        self.summary = summary
        self.committer = committer
        self.bar = Progress(len(todo), "tracks", enabled=show_progress)
        self.kinds: Counter[str] = Counter(summary.failures_by_kind)
        self.warned: Counter[str] = Counter()
        self.nodes: set[str] = set()
        self.pids: set[int] = set()

    def add(self, batch: list[TrackTask], res: dict[str, Any]) -> None:
        s = self.summary
        s.processed += len(batch)
        s.added += res["tracks"]
        s.unchanged_content += len(res["unchanged"])
        s.retagged += len([r for r in res.get("retagged", []) if r["track_id"] not in {u[0] for u in res["unchanged"]}])
        s.failed += len(res["failures"])
        s.segments_added += res["segments"]
        s.audio_seconds += res["audio_seconds"]
        s.shard_bytes += res["shard_bytes"]
        s.shards_written += 1 if res["shard"] else 0
        s.embedded_tracks += res.get("embedded_tracks", 0)
        s.embedded_segments += res.get("embedded_segments", 0)
        s.embed_seconds += res.get("embed_seconds", 0.0)
        s.embedding_bytes += res.get("embedding_bytes", 0)
        s.engine = s.engine or res.get("engine")
        self.kinds.update(f["kind"] for f in res["failures"])
        self.warned.update(w["kind"] for w in res["warnings"])
        s.warned += len(res["warnings"])
        if res["node"]:
            self.nodes.add(res["node"])
        if res["pid"]:
            self.pids.add(res["pid"])
        self.bar.update(done=len(batch), failed=len(res["failures"]), audio_seconds=res["audio_seconds"])
        self.committer.add(res)
        if res["shard"]:
            pause_point("ingest-shard-written")

    def finish(self) -> None:
        self.committer.flush()

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
                    show_progress: bool, embed: EmbedSpec | None, committer: "_Committer") -> None:
    """The same batches and shards as the Ray tasks, one after another in this process."""
    if not todo:
        return
    tally = _Tally(todo, summary, show_progress, committer)
    try:
        size = cfg.ingest.tracks_per_task
        for batch in (todo[i:i + size] for i in range(0, len(todo), size)):
            tally.add(batch, process_batch(batch, cfg.features, loc.uri, new_shard_name(), cfg.decode, embed))
        tally.finish()
    finally:
        tally.close()


def _run_tasks(todo: list[TrackTask], cfg: Config, loc: Location, summary: IngestSummary,
               workers: int | None, show_progress: bool, embed: EmbedSpec | None, committer: "_Committer") -> None:
    import ray
    from ray.exceptions import RayError, RayTaskError

    n_slots, max_inflight = slots(workers, cfg.ingest.inflight_per_cpu)
    remote = _remote_process_batch().options(num_cpus=1, max_retries=cfg.ingest.max_task_retries,
                                             retry_exceptions=False, scheduling_strategy="SPREAD")
    single = _remote_process_batch().options(num_cpus=1, max_retries=1, retry_exceptions=False)
    inflight: dict[Any, list[TrackTask]] = {}
    tally = _Tally(todo, summary, show_progress, committer)
    cfg_ref, decode_ref, embed_ref = ray.put(cfg.features), ray.put(cfg.decode), ray.put(embed)
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
                ref = fn.remote(batch, cfg_ref, uri, new_shard_name(), decode_ref, embed_ref)
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
        tally.finish()
    # Interrupted or the output failed: the tasks still running are not cancelled one by one (ray.cancel
    # racing a task's completion crashes the driver's core worker in Ray 2.60: "Tried to complete task that
    # was not pending"); they end with the embedded Ray's shutdown or, on a cluster, with this driver's job.
    # A task stopped half-way leaves only a temporary file, which the next run's reconcile removes, or a
    # shard no commit references (invisible to readers; genrecls vacuum deletes it).
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
        + (f"{summary.retagged} re-tagged (same audio: not decoded), " if summary.retagged else "")
        + f"{summary.failed} failed"
        + (f", {summary.pruned} pruned" if summary.pruned else "")
        + (f"; {summary.ignored_files} non-audio files ignored" if summary.ignored_files else ""))
    if summary.audio_seconds:
        lines.append(f"{summary.audio_seconds / 3600:.2f} h of audio in {format_duration(summary.wall_seconds)} "
                     f"({summary.audio_seconds / max(summary.wall_seconds, 1e-9):.0f}x real time), "
                     f"{summary.segments_added} segments, {summary.shards_written} shards, "
                     f"{summary.shard_bytes / max(summary.segments_added, 1) / 1024:.1f} KiB per segment")
    if summary.embedded_segments:
        e = summary.engine or {}
        lines.append(f"embeddings: {summary.embedded_tracks} tracks ({summary.embedded_segments} segments"
                     + (f", {summary.backfilled_tracks} tracks from their stored segments" if summary.backfilled_tracks else "")
                     + f") by {e.get('engine', '?')} {e.get('precision', '?')}, "
                     f"{1000 * summary.embed_seconds / summary.embedded_segments:.1f} ms per segment per task, "
                     f"{summary.embedding_bytes / summary.embedded_segments / 1024:.1f} KiB per segment")
    elif summary.embeddings != "computed":
        lines.append(f"embeddings: {summary.embeddings}")
    lines.append("")
    lines.append(describe(ds))
    return "\n".join(lines)
