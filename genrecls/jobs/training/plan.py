"""Checks and plan of a training run, on the driver, before anything starts (no Ray, no TensorFlow).

:func:`check_dataset` finds everything wrong with a dataset as a clear
:class:`~genrecls.storage.dataset.DatasetError`; :func:`plan_training` splits the tracks
(:mod:`genrecls.storage.split`), sizes the epochs for the workers and weighs the loss, giving a
frozen :class:`TrainPlan` (written to ``RUN/plan.json``).  What each Ray Train worker needs of
it is the smaller :class:`WorkerPlan` (:meth:`TrainPlan.for_workers`), which the worker
receives as it is: typed, picklable, nothing read back by string keys.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow.compute as pc

from genrecls.audio.features import check_same_features
from genrecls.core.config import Config, ConfigError, FeatureConfig
from genrecls.storage.dataset import FEATURES_KEY, Dataset, DatasetError
from genrecls.storage.split import SplitError, album_group, as_mapping, assign_splits, split_counts, split_notes

__all__ = ["TrainingError", "REQUIRED_COLUMNS", "FOLDER_GROUP", "DatasetCheck", "check_dataset", "check_model_input",
           "TrainPlan", "WorkerPlan", "plan_training", "segment_weights", "learning_rate_at", "labels_record"]

REQUIRED_COLUMNS = ("track_id", "label", "segment_index", "mel")


def labels_record(check: "DatasetCheck") -> dict[str, Any] | None:
    """Where the dataset's labels came from (its manifest's ``labels_from``: folders, or tags through a vocabulary),
    recorded in ``run.json`` so that the run's answers read the same vocabulary file the same way."""
    try:
        return check.dataset.manifest().get("labels_from")
    except (DatasetError, OSError, ValueError):
        return None
FOLDER_GROUP = "folder"


class TrainingError(RuntimeError):
    """Training could not finish (a worker failed more often than allowed, a bug...)."""


# --------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------
@dataclass
class DatasetCheck:
    dataset: Dataset
    features: FeatureConfig
    shard_paths: list[str]
    tracks: list[dict[str, Any]]  # track_id, label, n_segments, shard, path (+ group)
    labels: list[str]
    unlabelled: int
    #: the segments' bytes before compression (n_segments x the mel's size in the storage dtype)
    stored_bytes: int
    columns: list[str]
    #: the index version read (None: a dataset without an index, read from its footers)
    version: int | None = None


def _check_shard(ds: Dataset, name: str, features: FeatureConfig, group: str | None) -> tuple[int, list[str]]:
    """One shard's footer against what training needs: (its size in bytes, its columns)."""
    import pyarrow.parquet as pq

    with ds.location.fs.open_input_file(ds.location.join("shards", name)) as f:
        md = pq.read_metadata(f)
        size = f.size()
    schema = md.schema.to_arrow_schema()
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if group and group != FOLDER_GROUP and group not in schema.names:
        missing.append(group)
    if missing:
        raise DatasetError(f"shard {name} of {ds.uri} lacks column(s) {missing} needed for training "
                           f"(it has {schema.names})" + (f"; train.group_column={group!r} must name a column or "
                                                         f"'{FOLDER_GROUP}'" if group in missing else ""))
    expected_size = features.n_mels * features.n_frames
    mel_type = schema.field("mel").type
    if getattr(mel_type, "list_size", None) != expected_size:
        raise DatasetError(f"shard {name} stores mel as {mel_type}, but the dataset's features give "
                           f"{features.n_mels}x{features.n_frames} = {expected_size} values per segment: "
                           "mismatched feature configuration (a shard from another ingest?)")
    kv = md.metadata or {}
    if FEATURES_KEY in kv and json.loads(kv[FEATURES_KEY]) != json.loads(json.dumps(asdict(features))):
        raise DatasetError(f"shard {name} was written with other feature settings than {ds.uri}'s manifest: "
                           "mismatched feature configuration; re-ingest into a fresh dataset")
    return size, list(schema.names)


def check_dataset(dataset: str | Dataset, cfg: Config | None = None) -> DatasetCheck:
    """Everything that can be wrong with a dataset before training, as a clear :class:`DatasetError`.

    Checks: the dataset exists and has segments; its newest shard has the columns training needs
    (and ``train.group_column``) and was written with the manifest's feature configuration (every
    shard is written by the same ingest code from the manifest's features, which ingest refuses to
    change: one footer, not one per shard); ``cfg.features``, when not the default, equals the
    dataset's; at least two labels.  The tracks are one version of the dataset's index
    (:meth:`Dataset.tracks`, read once: a ``Dataset`` given is used as it is).
    """
    cfg = cfg or Config()
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    ds.manifest()  # raises DatasetError when there is none
    features = ds.feature_config()
    if cfg.features != Config().features:
        check_same_features(features, cfg.features, subject=ds.uri, than="the configuration asks for",
                            remedy="training uses the dataset's features: drop the features section or re-ingest",
                            error=DatasetError)
    names = ds.shard_names()
    if not names:
        raise DatasetError(f"{ds.uri} is empty: it holds no segments (no shards); ingest a library into it first")
    group = cfg.train.group_column
    _, columns = _check_shard(ds, names[-1], features, group)
    rows = ds.rows()
    keep = pc.greater(rows.column("n_segments"), 0)
    rows = rows.filter(keep) if not pc.all(keep).as_py() else rows
    cols = {c: rows.column(c).to_pylist() for c in ("track_id", "label", "n_segments", "path", "shard", "album",
                                                    "album_artist")}
    tracks = [dict(zip(cols, vals)) for vals in zip(*cols.values())]
    if not tracks:
        raise DatasetError(f"{ds.uri} is empty: its shards hold no segments")
    itemsize = 2 if features.dtype == "float16" else 4
    stored = int(pc.sum(rows.column("n_segments")).as_py() or 0) * features.n_mels * features.n_frames * itemsize
    if group == FOLDER_GROUP:
        for t in tracks:
            t["group"] = t["path"].rsplit("/", 1)[0] if "/" in t["path"] else ""
    elif group:
        groups: dict[str, Any] = {}
        for batch in ds.iter_segments(columns=["track_id", group], filter=pc.field("segment_index") == 0):
            groups.update(zip(batch.column("track_id").to_pylist(), batch.column(group).to_pylist()))
        for t in tracks:
            t["group"] = groups.get(t["track_id"])
    elif cfg.train.group_by != "track":  # albums (or album artists) from the tags ingest recorded
        for t in tracks:
            t["group"] = album_group(t["path"], t["album"], t["album_artist"], cfg.train.group_by)
    labelled = [t for t in tracks if t["label"]]
    labels = sorted({t["label"] for t in labelled})
    if len(labels) < 2:
        what = f"only one label ({labels[0]!r}, {len(labelled)} tracks)" if labels else "no labelled track"
        raise DatasetError(f"{ds.uri} has {what}; a classifier needs at least two labels "
                           "(lay the library out as SOURCE/<label>/... or give a label column)")
    return DatasetCheck(ds, features, [ds.location.join("shards", n) for n in names], labelled, labels,
                        len(tracks) - len(labelled), stored, columns, ds.version)


def check_model_input(model: str, check: DatasetCheck) -> None:
    """A model that needs a feature preset refuses a dataset of another one, naming the ingest to run.

    (``model`` itself is a name the configuration has validated.)
    """
    from genrecls.core.config import MODEL_PRESETS

    need = MODEL_PRESETS[model]
    if need and check.features.preset != need:
        raise DatasetError(
            f"the {model} model needs segments of the {need!r} feature preset, but {check.dataset.uri} holds "
            f"{check.features.preset!r} features ({check.features.n_mels}x{check.features.n_frames} at "
            f"{check.features.sample_rate} Hz); ingest the library again into a new dataset: "
            f"genrecls ingest SOURCE --out NEW_DATASET --set features.preset={need} "
            f"(or train a model for any log-mel input on it: --model default)")


# --------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerPlan:
    """What every Ray Train worker reads: the model to build, the epochs to run, how to weigh and stop."""

    model: str
    labels: tuple[str, ...]
    mel_shape: tuple[int, int]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    augment: bool
    learning_rate: float
    seed: int
    epochs: int
    steps_per_epoch: int
    batch_size: int
    shuffle_buffer: int
    class_weights: tuple[float, ...]
    early_stopping_patience: int
    #: validation tracks (the rows of the workers' per-track probability sums)
    val_tracks: int
    #: "mel" (stored segments; "embedding": a frozen musicnn backbone, whose head genrecls.jobs.training.head fits
    #: without Ray Train workers)
    input: str
    fine_tune: bool
    #: TensorFlow threads per worker (0: the node's cores shared by the workers on it)
    threads: int


@dataclass(frozen=True)
class TrainPlan:
    """What the driver resolved before training; written to RUN/plan.json."""

    dataset: str
    shard_paths: list[str]
    features: dict[str, Any]
    labels: list[str]
    model: str
    workers: int
    #: Ray CPUs reserved per worker (the driver's scheduling; the workers never read it)
    cpus_per_worker: float
    threads: int
    use_gpu: bool
    epochs: int
    batch_size: int
    val_batch_size: int
    steps_per_epoch: int
    val_steps: int
    learning_rate: float
    seed: int
    augment: bool
    #: the per-epoch order of a streamed split ("shards", "files", "global"; see train.shuffle)
    shuffle: str
    shuffle_buffer: int
    cache: bool
    early_stopping_patience: int
    class_weights: list[float]
    tracks_per_split: dict[str, dict[str, int]]
    segments_per_split: dict[str, dict[str, int]]
    unlabelled_tracks: int
    notes: list[str] = field(default_factory=list)
    mean: list[float] | None = None
    std: list[float] | None = None
    #: loss weight of each segment of each training track (train.track_weights), else None
    segment_weights: dict[str, float] | None = None
    #: what is trained on: "mel" (stored segments, Ray Train) or "embedding" (a frozen musicnn backbone's stored
    #: embeddings: a linear head, genrecls.jobs.training.head)
    input: str = "mel"
    fine_tune: bool = False
    #: the dataset's index version the plan was made on (None: a dataset without an index)
    dataset_version: int | None = None
    #: track_id -> (its shard, its label) in that version (readers keep only those rows); not in plan.json
    track_rows: dict[str, tuple[str, str]] | None = None

    @property
    def mel_shape(self) -> tuple[int, int]:
        return FeatureConfig(**self.features).mel_shape

    def for_workers(self) -> WorkerPlan:
        return WorkerPlan(
            model=self.model, labels=tuple(self.labels), mel_shape=self.mel_shape,
            mean=None if self.mean is None else tuple(self.mean), std=None if self.std is None else tuple(self.std),
            augment=self.augment, learning_rate=self.learning_rate, seed=self.seed, epochs=self.epochs,
            steps_per_epoch=self.steps_per_epoch, batch_size=self.batch_size, shuffle_buffer=self.shuffle_buffer,
            class_weights=tuple(self.class_weights), early_stopping_patience=self.early_stopping_patience,
            val_tracks=self.tracks_per_split["val"]["total"], input=self.input, fine_tune=self.fine_tune,
            threads=self.threads)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("track_rows")  # the index's, per track
        weights = d.pop("segment_weights")  # one number per track: summarised, not listed
        d["track_weights"] = weights is not None
        if weights:
            d["segment_weight_range"] = [min(weights.values()), max(weights.values())]
        return d


def _segments_per_split(tracks: list[dict[str, Any]], assignment: dict[str, str]) -> dict[str, dict[str, int]]:
    import pyarrow as pa

    out: dict[str, dict[str, int]] = {s: {"total": 0} for s in ("train", "val", "test")}
    table = pa.table({"split": [assignment[t["track_id"]] for t in tracks], "label": [t["label"] for t in tracks],
                      "n": pa.array([t["n_segments"] for t in tracks], pa.int64())})
    for row in table.group_by(["split", "label"], use_threads=False).aggregate([("n", "sum")]).to_pylist():
        out[row["split"]][row["label"]] = row["n_sum"]
        out[row["split"]]["total"] += row["n_sum"]
    return out


def _cpus_per_worker(t, workers: int, cluster_cpus: float | None) -> float:
    if t.cpus_per_worker > 0:
        cpw = float(t.cpus_per_worker)
    else:
        total = float(cluster_cpus or os.cpu_count() or 1)
        spare = (total - 1) / workers
        cpw = float(math.floor(spare)) if spare >= 1 else round(max(spare, 0.0), 3)
        if cpw < 0.1:
            cpw = round(min(1.0, total / workers) * 0.5, 3)
    if cluster_cpus is not None and not t.gpu and cpw * workers > cluster_cpus + 1e-9:
        raise ConfigError(f"train.workers: {workers} workers x {cpw} CPUs do not fit the cluster's {cluster_cpus:g} CPUs")
    return cpw


def resolve_shuffle(setting: str) -> str:
    """train.shuffle as the plan records it: "auto" and the former "local" are "shards" (bench/train.py)."""
    return {"auto": "shards", "local": "shards"}.get(setting, setting)


def plan_training(check: DatasetCheck, cfg: Config, *, splits: Any = None, cluster_cpus: float | None = None,
                  object_store_bytes: float | None = None, labels: list[str] | None = None) -> tuple[TrainPlan, Any]:
    """Split the tracks and size the epochs.  Returns (plan, split table).

    Raises :class:`SplitError` or :class:`DatasetError` for data that cannot be trained on
    (too few tracks of a label, too few segments for the workers).
    """
    t = cfg.train
    frozen = t.model == "musicnn" and not t.fine_tune  # cross-validated on train + validation: no val split needed
    fixed = labels is not None  # a resumed run's labels: none is left out
    left_out: dict[str, str] = {}  # label -> why
    if not fixed:  # labels with too few tracks: left out (named), or refused
        counts_all = Counter(tr["label"] for tr in check.tracks)
        few = {lab: n for lab, n in sorted(counts_all.items()) if n < t.min_tracks_per_label}
        check = _leave_out(check, few, t)
        left_out.update({lab: f"{n} track{'s' if n != 1 else ''}, under train.min_tracks_per_label "
                              f"({t.min_tracks_per_label})" for lab, n in few.items()})

    def split(check):
        table = assign_splits(check.tracks, val_fraction=t.val_fraction, test_fraction=t.test_fraction, seed=t.seed,
                              group_column="group" if any("group" in r for r in check.tracks) else None,
                              previous=splits, small_labels="train" if frozen else "error")
        return table, split_counts(table)

    table, counts = split(check)
    missing_train = [lab for lab in check.labels if not counts["train"].get(lab)]
    if missing_train and not fixed:  # e.g. a label's only track sits in an album of another label's, on the test side
        extra = {lab: sum(1 for tr in check.tracks if tr["label"] == lab) for lab in missing_train}
        why = "no track of it lands in the training split (its tracks' albums went to the test side)"
        check = _leave_out(check, extra, t, why=why)
        left_out.update({lab: f"{n} track{'s' if n != 1 else ''}: {why}" for lab, n in extra.items()})
        table, counts = split(check)
    assignment = as_mapping(table)
    segs = _segments_per_split(check.tracks, assignment)
    labels = list(labels) if labels is not None else list(check.labels)
    unknown = sorted(set(check.labels) - set(labels))
    if unknown:
        raise DatasetError(f"the dataset has labels the run was started without: {unknown}; start a new run")
    missing_train = [lab for lab in labels if not counts["train"].get(lab)]
    if missing_train:
        raise SplitError(f"label(s) {missing_train} have no track in the training split")
    for s in ("val", "test"):
        if not counts[s]["total"] and not frozen:
            raise SplitError(f"the {s} split is empty; add tracks or raise train.{s}_fraction")
    workers = t.workers
    notes = grouping_notes(check.tracks, table, t)
    if left_out:
        notes.insert(0, "left out of training, too few labelled tracks: " + "; ".join(
            f"{lab!r} ({why})" for lab, why in left_out.items()) + " (train.too_few = \"refuse\" stops instead)")
    n_train, n_val = segs["train"]["total"], segs["val"]["total"]
    per_worker = n_train // workers
    if per_worker < 1:
        raise DatasetError(f"{n_train} training segments cannot feed {workers} workers; use fewer workers")
    batch = t.batch_size
    if per_worker < batch:
        notes.append(f"batch size lowered from {batch} to {per_worker}: each of {workers} workers gets {per_worker} training segments")
        batch = per_worker
    steps = per_worker // batch
    val_per_worker = n_val // workers
    if val_per_worker < 1 and frozen:  # (no Ray Train workers: the val split only joins the cross-validation)
        val_per_worker = 1
    if val_per_worker < 1:
        raise DatasetError(f"{n_val} validation segments cannot be split between {workers} workers; use fewer workers")
    val_batch = min(batch, val_per_worker)
    val_steps = val_per_worker // val_batch
    dropped = n_train - steps * batch * workers
    if dropped:
        notes.append(f"{dropped} of {n_train} training segments are left out of each epoch (equal steps on every worker; "
                     "which ones changes with the shuffle)")
    if t.class_weights:
        n = np.array([segs["train"].get(l, 0) for l in labels], dtype=np.float64)
        w = n.sum() / (len(labels) * np.maximum(n, 1))
        class_weights = [float(v) for v in w]
    else:
        class_weights = [1.0] * len(labels)
    weights = segment_weights(check.tracks, assignment, t.class_weights) if t.track_weights else None
    cpw = _cpus_per_worker(t, workers, cluster_cpus)
    decoded = sum(segs[s]["total"] for s in ("train", "val")) * (check.features.n_mels * check.features.n_frames * 2 + 4)
    cache = t.cache == "on" or (t.cache == "auto" and object_store_bytes is not None and decoded <= object_store_bytes / 4)
    train_input = "embedding" if frozen else "mel"
    if train_input == "embedding":
        cache = True  # (not Ray Train's input: the head's rows are read once)
        notes = [n for n in notes if not n.startswith(("batch size lowered", f"{dropped} of"))]  # no batches, no epochs
        notes.append(f"frozen musicnn backbone: the segments' embeddings come from the dataset's embedding store "
                     f"(those it lacks are computed, once); every choice (head, C, K, calibration, thresholds) is made "
                     f"by {t.cv_folds}-fold cross-validation on the training + validation tracks, then the head is fit "
                     "on all of them (genrecls.jobs.training.head)")
    else:
        notes.append("the validation split chooses the epoch, K, the calibration and the thresholds (a network trained "
                     "from scratch is not cross-validated: one training per fold would cost k trainings)")
    plan = TrainPlan(
        dataset=check.dataset.uri, shard_paths=check.shard_paths, features=asdict(check.features), labels=labels,
        model=t.model, workers=workers, cpus_per_worker=cpw, threads=t.threads, use_gpu=t.gpu, epochs=t.epochs,
        batch_size=batch, val_batch_size=val_batch, steps_per_epoch=steps, val_steps=val_steps,
        learning_rate=t.learning_rate, seed=t.seed, augment=t.augment, shuffle=resolve_shuffle(t.shuffle),
        shuffle_buffer=t.shuffle_buffer, cache=cache, early_stopping_patience=t.early_stopping_patience,
        class_weights=class_weights, tracks_per_split=counts, segments_per_split=segs,
        unlabelled_tracks=check.unlabelled, notes=notes, segment_weights=weights, input=train_input,
        fine_tune=t.fine_tune, dataset_version=check.version,
        track_rows=dict(zip([tr["track_id"] for tr in check.tracks],
                            zip([tr["shard"] for tr in check.tracks], [tr["label"] for tr in check.tracks]))))
    return plan, table


def _leave_out(check: DatasetCheck, labels: dict[str, int], t, why: str | None = None) -> DatasetCheck:
    """``check`` without the tracks of ``labels`` (label -> its tracks), or a refusal naming them
    (``train.too_few = "refuse"``), or when fewer than two labels would be left."""
    if not labels:
        return check
    named = ", ".join(f"{lab!r} ({n} track{'s' if n != 1 else ''})" for lab, n in labels.items())
    reason = why or f"fewer labelled tracks than train.min_tracks_per_label ({t.min_tracks_per_label})"
    if t.too_few == "refuse":
        raise DatasetError(f"label(s) {named}: {reason}; add tracks, lower train.min_tracks_per_label, or set "
                           "train.too_few = \"leave_out\" to train without them")
    tracks = [tr for tr in check.tracks if tr["label"] not in labels]
    kept = sorted({tr["label"] for tr in tracks})
    if len(kept) < 2:
        raise DatasetError(f"{check.dataset.uri}: after leaving out {named} ({reason}) fewer than two labels are left; "
                           "a classifier needs at least two")
    return replace(check, tracks=tracks, labels=kept, unlabelled=check.unlabelled + len(check.tracks) - len(tracks))


def grouping_notes(tracks: list[dict[str, Any]], table, t) -> list[str]:
    """What the split was made by (albums, a column, tracks) and which labels it could not keep grouped."""
    notes = []
    grouped = [r for r in tracks if r.get("group")]
    info = split_notes(table)
    if t.group_column:
        notes.append(f"split by train.group_column={t.group_column!r}: {len(grouped)} of {len(tracks)} tracks in "
                     f"{len({r['group'] for r in grouped})} groups, each on one side")
    elif t.group_by == "track":
        notes.append("split by track (train.group_by=track): tracks of one album may sit on both sides")
    elif not grouped:
        notes.append(f"split by track: no track carries an album{' artist' if t.group_by == 'album_artist' else ''} "
                     "tag in the dataset (tags are read by ingest; a dataset ingested before they were recorded has "
                     "none)")
    else:
        what = "album artist (else album)" if t.group_by == "album_artist" else "album"
        notes.append(f"split by {what} (train.group_by={t.group_by}): {len(grouped)} of {len(tracks)} tracks in "
                     f"{len({r['group'] for r in grouped})} groups, each on one side; tracks without tags by track")
    if info.get("labels_split_by_track"):
        notes.append(f"label(s) {info['labels_split_by_track']} split by track: too few groups (or one too large) "
                     "to fill test and validation with whole groups")
    if info.get("labels_without_test_tracks"):
        notes.append(f"label(s) {info['labels_without_test_tracks']} have fewer than 3 tracks: all of them train "
                     "(scored out-of-fold only), none is a test track")
    return notes


def segment_weights(tracks: list[dict[str, Any]], assignment: dict[str, str], by_label: bool) -> dict[str, float]:
    """Loss weight of one segment of each training track: every track weighs the same.

    A track of ``n`` segments gives each ``1 / n``; with ``by_label`` every label weighs the
    same too (divided by its number of tracks).  Scaled so that the mean weight per segment
    is 1 (the learning rate keeps its meaning).  Without it, a 14-minute track counts 40
    times a 20-second one, and the model learns the long tracks of a library rather than
    its labels.
    """
    from collections import Counter

    train = [(t["track_id"], t["label"], t["n_segments"]) for t in tracks
             if t["n_segments"] > 0 and assignment.get(t["track_id"]) == "train"]
    per_label = Counter(label for _, label, _ in train)
    if by_label:
        raw = [(tid, n, 1.0 / (n * per_label[label])) for tid, label, n in train]
    else:
        raw = [(tid, n, 1.0 / (n * 1)) for tid, _, n in train]
    total_segments = sum(n for _, n, _ in raw)
    total_weight = sum(w * n for _, n, w in raw)
    scale = total_segments / total_weight if total_weight else 1.0
    return {tid: w * scale for tid, _, w in raw}


def learning_rate_at(epoch: int, epochs: int, base: float, floor: float = 0.05) -> float:
    """Cosine decay from ``base`` (epoch 0) to ``floor * base`` (last epoch)."""
    if epochs <= 1:
        return base
    return float(base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * epoch / (epochs - 1)))))
