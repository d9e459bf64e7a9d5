"""Training: a data-parallel CNN genre classifier with Ray Train on the dataset's Parquet shards.

The driver (:func:`train`) checks the dataset and the configuration, splits the tracks
(:mod:`genrecls.split`), computes the input normalisation on the training split, and only
then starts Ray Train's ``TensorflowTrainer``.  Each worker runs :func:`train_func`:

* data enters through Ray Data: ``read_parquet`` on the shard files with the split's track
  ids pushed down into the scan, decoded to ``x`` (float16, (n_mels, n_frames)) and ``y``;
  the trainer splits it between workers (``streaming_split(equal=True)``) and each worker
  reads its share with ``get_dataset_shard`` and ``iter_batches`` (local shuffle buffer).
  Shards hold a few labels each (the ingest writes tracks in folder order), so rows are
  shuffled globally: once, when the decoded train/val splits are cached in the object store
  (``train.cache``, automatic when they take under a quarter of it), or every epoch
  (``random_shuffle``) when they stream from the shards again each epoch;
* ``MultiWorkerMirroredStrategy`` over tf-keras (see :mod:`genrecls.models`); every worker
  runs exactly the same number of steps per epoch (computed by the driver from the equal
  split; a worker that came up short would repeat its last batch rather than leave the
  others waiting in an all-reduce);
* the validation split is evaluated every epoch, per track (each worker sums its segments'
  probabilities per track, one all-reduce adds the workers' sums): the epoch exported is
  the one of highest validation **track** accuracy (ties: lower validation loss), and early
  stopping counts epochs without such an improvement (:mod:`genrecls.selection`); learning
  rate follows a cosine decay over ``train.epochs``; class weights inverse to the label frequencies and track weights
  (every training track counts the same, whatever its length); fixed seed;
* a checkpoint every epoch through ``ray.train.report`` (weights, optimizer state, best
  weights, history): a worker that dies makes Ray Train restart the group from the last
  checkpoint (``FailureConfig(max_failures)``), and ``train(..., resume=True)``
  (``genrecls train --resume RUN``) continues an interrupted run.

What a run folder holds when done::

    RUN/config.json          resolved configuration (features = the dataset's)
    RUN/splits.parquet       track_id, label, split (train/val/test), group
    RUN/normalisation.json   per-mel-band mean and std of the training split
    RUN/plan.json            labels, class weights, steps, counts, dataset (written before training)
    RUN/checkpoints/         Ray Train checkpoints (one per epoch, last two kept)
    RUN/model/, model.keras  the model (genrecls.inference.export_model), run.json
    RUN/history.json, curves.png, confusion_matrix.png, metrics.json, report.md
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .config import Config, ConfigError, FeatureConfig
from .dataset import FEATURES_KEY, TRACKS_KEY, Dataset, DatasetError
from .runtime import log, quiet_environment, ray_session
from .selection import TrackTally, is_better, validation_metrics
from .split import SplitError, assign_splits, split_counts, write_splits
from .storage import Location

__all__ = ["TrainingError", "REQUIRED_COLUMNS", "check_dataset", "plan_training", "train", "train_func",
           "learning_rate_at"]

REQUIRED_COLUMNS = ("track_id", "label", "segment_index", "mel")
#: below this stored size (training split), shuffle="auto" shuffles globally every epoch
GLOBAL_SHUFFLE_MAX_BYTES = 4 << 30
FOLDER_GROUP = "folder"


class TrainingError(RuntimeError):
    """Training could not finish (a worker failed more often than allowed, a bug...)."""


# --------------------------------------------------------------------------------------
# checks and plan (driver, before any worker starts)
# --------------------------------------------------------------------------------------
@dataclass
class DatasetCheck:
    dataset: Dataset
    features: FeatureConfig
    shard_paths: list[str]
    tracks: list[dict[str, Any]]  # track_id, label, n_segments, shard, path (+ group)
    labels: list[str]
    unlabelled: int
    stored_bytes: int
    columns: list[str]


def _shard_footer(ds: Dataset, name: str):
    import pyarrow.parquet as pq

    with ds.location.fs.open_input_file(ds.location.join("shards", name)) as f:
        md = pq.read_metadata(f)
        return md, md.schema.to_arrow_schema(), f.size()


def check_dataset(dataset: str | Dataset, cfg: Config | None = None) -> DatasetCheck:
    """Everything that can be wrong with a dataset before training, as a clear :class:`DatasetError`.

    Checks: the dataset exists and has segments; every shard has the columns training needs
    (and ``train.group_column``); every shard was written with the manifest's feature
    configuration; ``cfg.features``, when not the default, equals the dataset's; at least two
    labels.
    """
    cfg = cfg or Config()
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    manifest = ds.manifest()  # raises DatasetError when there is none
    features = ds.feature_config()
    if cfg.features != Config().features and cfg.features != features:
        diff = {k: (v, getattr(cfg.features, k)) for k, v in asdict(features).items() if getattr(cfg.features, k) != v}
        raise DatasetError(
            f"{ds.uri} was built with other feature settings than the configuration asks for "
            f"({', '.join(f'{k}: dataset {a!r}, asked {b!r}' for k, (a, b) in diff.items())}); "
            "training uses the dataset's features: drop the features section or re-ingest")
    names = ds.shard_names()
    if not names:
        raise DatasetError(f"{ds.uri} is empty: it holds no segments (no shards); ingest a library into it first")
    expected_size = features.n_mels * features.n_frames
    feature_json = json.dumps(asdict(features), sort_keys=True)
    tracks: list[dict[str, Any]] = []
    stored = 0
    columns: list[str] | None = None
    group = cfg.train.group_column
    for name in names:
        md, schema, size = _shard_footer(ds, name)
        stored += size
        missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
        if group and group != FOLDER_GROUP and group not in schema.names:
            missing.append(group)
        if missing:
            raise DatasetError(f"shard {name} of {ds.uri} lacks column(s) {missing} needed for training "
                               f"(it has {schema.names})" + (f"; train.group_column={group!r} must name a column or "
                                                             f"'{FOLDER_GROUP}'" if group in missing else ""))
        mel_type = schema.field("mel").type
        list_size = getattr(mel_type, "list_size", None)
        if list_size != expected_size:
            raise DatasetError(f"shard {name} stores mel as {mel_type}, but the dataset's features give "
                               f"{features.n_mels}x{features.n_frames} = {expected_size} values per segment: "
                               "mismatched feature configuration (a shard from another ingest?)")
        kv = md.metadata or {}
        if FEATURES_KEY in kv and json.dumps(json.loads(kv[FEATURES_KEY]), sort_keys=True) != feature_json:
            raise DatasetError(f"shard {name} was written with other feature settings than {ds.uri}'s manifest: "
                               "mismatched feature configuration; re-ingest into a fresh dataset")
        if TRACKS_KEY not in kv:
            raise DatasetError(f"shard {name} has no track list in its footer (not written by genrecls?)")
        for t in json.loads(kv[TRACKS_KEY]):
            tracks.append({"track_id": t["track_id"], "label": t.get("label"), "n_segments": int(t["n_segments"]),
                           "path": t.get("path", ""), "shard": name})
        columns = columns or list(schema.names)
    latest = {t["track_id"]: t for t in tracks}  # oldest shard first: the newest entry wins
    tracks = [t for t in latest.values() if t["n_segments"] > 0]
    if not tracks:
        raise DatasetError(f"{ds.uri} is empty: its shards hold no segments")
    if group == FOLDER_GROUP:
        for t in tracks:
            t["group"] = t["path"].rsplit("/", 1)[0] if "/" in t["path"] else ""
    elif group:
        import pyarrow.compute as pc
        import pyarrow.dataset as pads

        pds = pads.dataset(ds.shard_paths(), filesystem=ds.location.fs, format="parquet")
        table = pds.to_table(columns=["track_id", group], filter=pc.field("segment_index") == 0)
        groups = dict(zip(table.column("track_id").to_pylist(), table.column(group).to_pylist()))
        for t in tracks:
            t["group"] = groups.get(t["track_id"])
    labelled = [t for t in tracks if t["label"]]
    labels = sorted({t["label"] for t in labelled})
    if len(labels) < 2:
        what = f"only one label ({labels[0]!r}, {len(labelled)} tracks)" if labels else "no labelled track"
        raise DatasetError(f"{ds.uri} has {what}; a classifier needs at least two labels "
                           "(lay the library out as SOURCE/<label>/... or give a label column)")
    return DatasetCheck(ds, features, ds.shard_paths(), labelled, labels, len(tracks) - len(labelled), stored,
                        columns or [])


def check_model_input(model: str, check: DatasetCheck, dataset: str) -> None:
    """A model that needs a feature preset refuses a dataset of another one, naming the ingest to run."""
    from .models import MODEL_PRESETS, MODELS

    if model not in MODELS:
        raise ConfigError(f"train.model: unknown model {model!r}; known: {', '.join(MODELS)}")
    need = MODEL_PRESETS[model]
    if need and check.features.preset != need:
        raise DatasetError(
            f"the {model} model needs segments of the {need!r} feature preset, but {check.dataset.uri} holds "
            f"{check.features.preset!r} features ({check.features.n_mels}x{check.features.n_frames} at "
            f"{check.features.sample_rate} Hz); ingest the library again into a new dataset: "
            f"genrecls ingest SOURCE --out NEW_DATASET --set features.preset={need} "
            f"(or train a model for any log-mel input on it: --model default)")


@dataclass
class TrainPlan:
    """What the workers need, resolved by the driver; written to RUN/plan.json."""

    dataset: str
    shard_paths: list[str]
    features: dict[str, Any]
    labels: list[str]
    model: str
    workers: int
    cpus_per_worker: float
    use_gpu: bool
    epochs: int
    batch_size: int
    val_batch_size: int
    steps_per_epoch: int
    val_steps: int
    learning_rate: float
    seed: int
    augment: bool
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
    #: what the workers train on: "mel" (stored segments) or "embedding" (musicnn embeddings computed once)
    input: str = "mel"
    fine_tune: bool = False

    @property
    def mel_shape(self) -> tuple[int, int]:
        f = FeatureConfig(**self.features)
        return f.mel_shape

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        weights = d.pop("segment_weights")  # one number per track: summarised, not listed
        d["track_weights"] = weights is not None
        if weights:
            d["segment_weight_range"] = [min(weights.values()), max(weights.values())]
        return d


def _segments_per_split(tracks: list[dict[str, Any]], assignment: dict[str, str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {s: {"total": 0} for s in ("train", "val", "test")}
    for t in tracks:
        s = assignment[t["track_id"]]
        out[s][t["label"]] = out[s].get(t["label"], 0) + t["n_segments"]
        out[s]["total"] += t["n_segments"]
    return out


def plan_training(check: DatasetCheck, cfg: Config, *, splits: Any = None, cluster_cpus: float | None = None,
                  object_store_bytes: float | None = None, labels: list[str] | None = None) -> tuple[TrainPlan, Any]:
    """Split the tracks and size the epochs.  Returns (plan, split table).

    Raises :class:`SplitError` or :class:`DatasetError` for data that cannot be trained on
    (too few tracks of a label, too few segments for the workers).
    """
    t = cfg.train
    table = assign_splits(check.tracks, val_fraction=t.val_fraction, test_fraction=t.test_fraction, seed=t.seed,
                          group_column="group" if t.group_column else None, previous=splits)
    assignment = dict(zip(table.column("track_id").to_pylist(), table.column("split").to_pylist()))
    counts = split_counts(table)
    segs = _segments_per_split(check.tracks, assignment)
    labels = list(labels) if labels is not None else list(check.labels)
    unknown = sorted(set(check.labels) - set(labels))
    if unknown:
        raise DatasetError(f"the dataset has labels the run was started without: {unknown}; start a new run")
    missing_train = [l for l in labels if not counts["train"].get(l)]
    if missing_train:
        raise SplitError(f"label(s) {missing_train} have no track in the training split")
    for s in ("val", "test"):
        if not counts[s]["total"]:
            raise SplitError(f"the {s} split is empty; add tracks or raise train.{s}_fraction")
    workers = t.workers
    notes = []
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
    segment_weights = _segment_weights(check.tracks, assignment, t.class_weights) if t.track_weights else None
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
    shuffle = t.shuffle
    if shuffle == "auto":
        train_bytes = check.stored_bytes * (n_train / max(1, sum(segs[s]["total"] for s in segs)))
        shuffle = "global" if train_bytes <= GLOBAL_SHUFFLE_MAX_BYTES else "local"
    decoded = sum(segs[s]["total"] for s in ("train", "val")) * (check.features.n_mels * check.features.n_frames * 2 + 4)
    cache = t.cache == "on" or (t.cache == "auto" and object_store_bytes is not None and decoded <= object_store_bytes / 4)
    train_input = "embedding" if t.model == "musicnn" and not t.fine_tune else "mel"
    if train_input == "embedding":
        cache = True  # embeddings are computed once and kept: 400 bytes per segment
        notes.append("frozen musicnn backbone: each segment's embedding is computed once (a Ray Data actor) "
                     "and only the head trains")
    plan = TrainPlan(
        dataset=check.dataset.uri, shard_paths=check.shard_paths, features=asdict(check.features), labels=labels,
        model=t.model, workers=workers, cpus_per_worker=cpw, use_gpu=t.gpu, epochs=t.epochs, batch_size=batch,
        val_batch_size=val_batch, steps_per_epoch=steps, val_steps=val_steps, learning_rate=t.learning_rate,
        seed=t.seed, augment=t.augment, shuffle=shuffle, shuffle_buffer=t.shuffle_buffer, cache=cache,
        early_stopping_patience=t.early_stopping_patience, class_weights=class_weights,
        tracks_per_split=counts, segments_per_split=segs, unlabelled_tracks=check.unlabelled, notes=notes,
        segment_weights=segment_weights, input=train_input, fine_tune=t.fine_tune)
    return plan, table


def _segment_weights(tracks: list[dict[str, Any]], assignment: dict[str, str], by_label: bool) -> dict[str, float]:
    """Loss weight of one segment of each training track: every track weighs the same.

    A track of ``n`` segments gives each ``1 / n``; with ``by_label`` every label weighs the
    same too (divided by its number of tracks).  Scaled so that the mean weight per segment
    is 1 (the learning rate keeps its meaning).  Without it, a 14-minute track counts 40
    times a 20-second one, and the model learns the long tracks of a library rather than
    its labels.
    """
    train = [t for t in tracks if assignment.get(t["track_id"]) == "train" and t["n_segments"] > 0]
    per_label: dict[str, int] = {}
    for t in train:
        per_label[t["label"]] = per_label.get(t["label"], 0) + 1
    raw = {t["track_id"]: 1.0 / (t["n_segments"] * (per_label[t["label"]] if by_label else 1)) for t in train}
    total_segments = sum(t["n_segments"] for t in train)
    total_weight = sum(raw[t["track_id"]] * t["n_segments"] for t in train)
    scale = total_segments / total_weight if total_weight else 1.0
    return {k: v * scale for k, v in raw.items()}


# --------------------------------------------------------------------------------------
# Ray Data
# --------------------------------------------------------------------------------------
def _to_xy(batch, labels: list[str], shape: tuple[int, int], weights: dict[str, float] | None = None,
           track_index: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Shard rows (pyarrow) -> ``x`` float16 (n, n_mels, n_frames), ``y`` int32 label index
    and, with ``weights`` (track_id -> weight), ``w`` float32; with ``track_index`` (track_id ->
    index), ``t`` int32 (validation: segment probabilities are summed per track)."""
    mel = batch.column("mel").combine_chunks()
    x = mel.flatten().to_numpy(zero_copy_only=False).reshape(len(mel), *shape).astype(np.float16, copy=False)
    index = {l: i for i, l in enumerate(labels)}
    y = np.fromiter((index[l] for l in batch.column("label").to_pylist()), dtype=np.int32, count=len(mel))
    out = {"x": x, "y": y}
    if weights is not None:
        out["w"] = np.fromiter((weights[t] for t in batch.column("track_id").to_pylist()), dtype=np.float32, count=len(mel))
    if track_index is not None:
        out["t"] = np.fromiter((track_index[t] for t in batch.column("track_id").to_pylist()), dtype=np.int32, count=len(mel))
    return out


def make_ray_dataset(plan: TrainPlan, track_ids: list[str], *, shuffle_files: bool = False,
                     weights: dict[str, float] | None = None, track_index: dict[str, int] | None = None):
    """A Ray Dataset of ``x``/``y`` rows for the given tracks (the track filter is pushed into the Parquet scan);
    with ``weights`` (track_id -> loss weight of each segment) a ``w`` column too."""
    import ray.data
    from ray.data.expressions import col

    loc = Location.parse(plan.dataset)
    kwargs: dict[str, Any] = {}
    if not loc.is_local:
        kwargs["filesystem"] = loc.fs
    if shuffle_files:
        from ray.data import FileShuffleConfig

        kwargs["shuffle"] = FileShuffleConfig(seed=plan.seed)
    ctx = ray.data.DataContext.get_current()
    v2 = getattr(ctx, "use_datasource_v2", None)
    if v2:  # the file list is known: Ray 2.5x's V2 reader adds a ListFiles stage costing seconds per epoch
        ctx.use_datasource_v2 = False
    try:
        ds = ray.data.read_parquet(plan.shard_paths, columns=["track_id", "label", "mel"], **kwargs)
    finally:
        if v2:
            ctx.use_datasource_v2 = v2
    ds = ds.filter(expr=col("track_id").is_in(sorted(track_ids)))
    return ds.map_batches(_to_xy, batch_format="pyarrow", batch_size=None,
                          fn_kwargs={"labels": plan.labels, "shape": plan.mel_shape, "weights": weights,
                                     "track_index": track_index})


def prepare_datasets(plan: TrainPlan, ids: dict[str, list[str]]) -> tuple[dict[str, Any], Any]:
    """The ``train`` and ``val`` Ray Datasets handed to the trainer, and the one to compute statistics on.

    Cached (``plan.cache``): read and decode once, shuffle the rows once globally, keep the
    blocks in the object store; each epoch then only reorders the blocks (plus each
    worker's local shuffle buffer).  Not cached: every epoch streams the shards
    again, shuffled globally (``random_shuffle``) or by file order plus the local buffer.
    """
    train = make_ray_dataset(plan, ids["train"], shuffle_files=plan.shuffle == "local", weights=plan.segment_weights)
    val = make_ray_dataset(plan, ids["val"], track_index=val_track_index(ids["val"]))
    if plan.input == "embedding":  # the frozen backbone runs once per segment, here; the epochs reuse its output
        from .transfer import embed_dataset

        train = embed_dataset(train).random_shuffle(seed=plan.seed).materialize()
        val = embed_dataset(val).materialize()
        return {"train": train.randomize_block_order(seed=plan.seed), "val": val}, train
    if plan.cache:
        # a real row shuffle once: shards hold a few labels each (ingest order), every block must mix them
        train = train.random_shuffle(seed=plan.seed).materialize()
        val = val.materialize()
        return {"train": train.randomize_block_order(seed=plan.seed), "val": val}, train
    epoch_train = train.random_shuffle(seed=plan.seed) if plan.shuffle == "global" else train
    return {"train": epoch_train, "val": val}, train


def val_track_index(val_ids: list[str]) -> dict[str, int]:
    """Row of each validation track in the workers' per-track sums (sorted track ids)."""
    return {t: i for i, t in enumerate(sorted(val_ids))}


def normalisation_stats(train_ds) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-mel-band mean and std (dB) of a dataset of ``x`` rows, and the number of values per band."""
    n, s, ss = 0, None, None
    for b in train_ds.iter_batches(batch_size=1024, batch_format="numpy"):
        x = b["x"].astype(np.float64)
        if x.ndim == 2:  # embeddings: one value per dimension
            x = x[:, :, None]
        n += x.shape[0] * x.shape[2]
        bs, bss = x.sum(axis=(0, 2)), np.einsum("imt,imt->m", x, x)
        s = bs if s is None else s + bs
        ss = bss if ss is None else ss + bss
    if not n or s is None:
        raise DatasetError("the training split holds no segment")
    mean = s / n
    var = np.maximum(ss / n - mean * mean, 0.0)
    return mean.astype(np.float32), np.sqrt(var).astype(np.float32), int(n)


# --------------------------------------------------------------------------------------
# the worker
# --------------------------------------------------------------------------------------
def learning_rate_at(epoch: int, epochs: int, base: float, floor: float = 0.05) -> float:
    """Cosine decay from ``base`` (epoch 0) to ``floor * base`` (last epoch)."""
    if epochs <= 1:
        return base
    return float(base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * epoch / (epochs - 1)))))


def _epoch_generator(shard, *, steps: int, batch: int, buffer: int, seed: int | None, weights: np.ndarray | None,
                     stats: dict[str, Any], name: str = "train"):
    """Exactly ``steps`` batches from a worker's Ray Data shard; the rest of the epoch is drained.

    ``stats[name + "_wait"]`` adds up the seconds spent waiting for Ray Data (the input
    pipeline's share of the epoch, reported in the history).
    """
    key = f"{name}_wait"

    def gen():
        t = time.perf_counter()
        it = iter(shard.iter_batches(batch_size=batch, batch_format="numpy", drop_last=True, prefetch_batches=2,
                                     local_shuffle_buffer_size=buffer or None,
                                     local_shuffle_seed=seed if buffer else None))
        last = None
        for i in range(steps):
            b = next(it, None)
            if b is None:  # never with equal splits; repeating keeps the workers in step
                stats["short"] = stats.get("short", 0) + 1
                b = last
            last = b
            if i == steps - 1:
                for _ in it:  # finish the epoch so that the next one starts cleanly
                    stats["drained"] = stats.get("drained", 0) + 1
            stats[key] = stats.get(key, 0.0) + time.perf_counter() - t
            x, y = b["x"], b["y"].astype(np.int32)
            if "w" in b:  # per-track weights (they include the label balance)
                yield x, y, b["w"].astype(np.float32, copy=False)
            elif weights is not None:
                yield x, y, weights[y]
            else:
                yield x, y
            t = time.perf_counter()

    return gen


def _tf_dataset(tf, gen, shape: tuple[int, int], weighted: bool):
    spec = [tf.TensorSpec([None, *shape], tf.float16), tf.TensorSpec([None], tf.int32)]
    if weighted:
        spec.append(tf.TensorSpec([None], tf.float32))
    ds = tf.data.Dataset.from_generator(gen, output_signature=tuple(spec))
    ds = ds.map(lambda x, *rest: (tf.cast(x, tf.float32), *rest), num_parallel_calls=1)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    options.threading.private_threadpool_size = 1
    # no tf.data prefetch: Ray Data already prefetches batches, and with one here the iterator's
    # teardown at the end of every model.fit blocked for 18-20 s on the real-music set (py-spy)
    return ds.with_options(options)


def _validation_tally(tf, model, shard, *, batch: int, n_tracks: int, n_labels: int, stats: dict[str, Any]) -> TrackTally:
    """Probabilities of every validation segment of this worker's share, summed per track.

    The model is called directly (no ``predict``), so no collective runs while workers
    iterate shares of different lengths.
    """
    tally = TrackTally(n_tracks, n_labels)
    t = time.perf_counter()
    for b in shard.iter_batches(batch_size=batch, batch_format="numpy", prefetch_batches=2):
        stats["val_wait"] = stats.get("val_wait", 0.0) + time.perf_counter() - t
        probs = model(tf.constant(b["x"], tf.float32), training=False).numpy()
        tally.add(probs, b["y"], b["t"])
        t = time.perf_counter()
    return tally


def _save_arrays(path: str, arrays: list[np.ndarray]) -> None:
    np.savez(path, **{f"a{i:04d}": a for i, a in enumerate(arrays)})


def _load_arrays(path: str) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return [z[k] for k in sorted(z.files)]


def train_func(config: dict[str, Any]) -> None:
    """Ray Train worker loop (one per worker process)."""
    import tempfile

    # TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, when imported; in a Ray Train worker that is when
    # ray.train.tensorflow is unpickled, before this function runs, so only the workers' runtime
    # environment (genrecls.runtime.worker_env) decides it.  It is recorded in the history: with "0"
    # the CNN steps run 2-3x slower on x86 CPUs.
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default")
    import ray.train

    from .models import build_model, import_tensorflow, keras

    tf = import_tensorflow()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # TensorFlow threads: the node's cores shared by the workers on it (the Ray CPU reservation is
    # smaller on purpose, to leave Ray Data room to schedule its read tasks)
    threads = config.get("threads") or max(1, (os.cpu_count() or 1) // max(1, ctx.get_local_world_size()))
    try:
        tf.config.threading.set_intra_op_parallelism_threads(int(threads))
        tf.config.threading.set_inter_op_parallelism_threads(min(2, int(threads)))
    except RuntimeError:  # TensorFlow already initialised in this process
        pass
    k = keras()
    k.utils.set_random_seed(int(config["seed"]))
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if world > 1 else tf.distribute.get_strategy()
    shape = tuple(config["mel_shape"])
    with strategy.scope():
        if config.get("input") == "embedding":  # frozen musicnn backbone: the head alone, on embeddings
            from .transfer import EMBEDDING_DIM, build_head

            shape = (EMBEDDING_DIM,)
            model = build_head(len(config["labels"]), learning_rate=config["learning_rate"], mean=config["mean"],
                               std=config["std"])
        else:
            model = build_model(config["model"], shape, len(config["labels"]), mean=config["mean"], std=config["std"],
                                augment=config["augment"], learning_rate=config["learning_rate"],
                                fine_tune=config.get("fine_tune", False))
        model.optimizer.build(model.trainable_variables)
    # same initial weights everywhere (MWMS also broadcasts them); then each worker draws its own
    # augmentation masks and dropout
    tf.random.set_seed(int(config["seed"]) * 1009 + 1 + rank)

    state: dict[str, Any] = {"epoch": 0, "history": [], "best_val_loss": None, "best_val_track_accuracy": None,
                             "best_epoch": None, "wait": 0, "stopped": False, "restarts": []}
    best_weights = None
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            with open(os.path.join(d, "state.json")) as f:
                state = json.load(f)
            model.set_weights(_load_arrays(os.path.join(d, "weights.npz")))
            for var, value in zip(model.optimizer.variables, _load_arrays(os.path.join(d, "optimizer.npz"))):
                var.assign(value)
            if os.path.exists(os.path.join(d, "best.npz")):
                best_weights = _load_arrays(os.path.join(d, "best.npz"))
        state.setdefault("best_val_track_accuracy", None)
        state.setdefault("restarts", []).append({"from_epoch": state["epoch"], "time": time.time(), "world_size": world})

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    weights = np.asarray(config["class_weights"], np.float32)
    epochs, steps = config["epochs"], config["steps_per_epoch"]
    batch = config["batch_size"]
    patience = config["early_stopping_patience"]
    n_labels, n_val_tracks = len(config["labels"]), int(config["val_tracks"])

    def all_workers_sum(vector: np.ndarray) -> np.ndarray:
        """The element-wise sum of every worker's array (one collective all-reduce; the same result everywhere)."""
        if world == 1:
            return vector
        value = tf.constant(vector)
        per_replica = strategy.experimental_distribute_values_from_function(lambda _: value)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()

    while state["epoch"] < epochs and not state["stopped"]:
        epoch = state["epoch"]
        lr = learning_rate_at(epoch, epochs, config["learning_rate"])
        model.optimizer.learning_rate.assign(lr)
        stats: dict[str, Any] = {}
        seed = int(config["seed"]) * 100_003 + epoch * 101 + rank
        train_gen = _epoch_generator(train_shard, steps=steps, batch=batch, buffer=config["shuffle_buffer"], seed=seed,
                                     weights=weights, stats=stats)
        if world > 1:
            train_data = strategy.distribute_datasets_from_function(lambda _: _tf_dataset(tf, train_gen, shape, True))
        else:
            train_data = _tf_dataset(tf, train_gen, shape, True)
        t0 = time.perf_counter()
        hist = model.fit(train_data, epochs=1, steps_per_epoch=steps, verbose=0)
        train_seconds = time.perf_counter() - t0
        logs = {key: float(v[-1]) for key, v in hist.history.items()}
        # validation: every segment of this worker's share, probabilities summed per track, summed over workers
        t_val = time.perf_counter()
        tally = _validation_tally(tf, model, val_shard, batch=max(256, batch), n_tracks=n_val_tracks,
                                  n_labels=n_labels, stats=stats)
        val = validation_metrics(all_workers_sum(tally.vector()), n_val_tracks, n_labels)
        val_seconds = time.perf_counter() - t_val
        epoch_seconds = time.perf_counter() - t0
        best = None if state["best_epoch"] is None else {"val_track_accuracy": state["best_val_track_accuracy"],
                                                          "val_loss": state["best_val_loss"]}
        improved = is_better(val, best)
        weights_now = model.get_weights()  # collective under MWMS: every worker calls it
        if improved:
            state["best_val_track_accuracy"], state["best_val_loss"] = val["val_track_accuracy"], val["val_loss"]
            state["best_epoch"], state["wait"] = epoch + 1, 0
            best_weights = weights_now
        else:
            state["wait"] += 1
        if patience and state["wait"] >= patience:
            state["stopped"] = True
        record = {"epoch": epoch + 1, "loss": logs.get("loss"), "accuracy": logs.get("accuracy"),
                  "val_loss": val["val_loss"], "val_accuracy": val["val_accuracy"],
                  "val_track_accuracy": val["val_track_accuracy"], "val_tracks_scored": val["val_tracks_scored"], "lr": lr,
                  "train_seconds": round(train_seconds, 3), "epoch_seconds": round(epoch_seconds, 3),
                  "segments_per_s": round(steps * batch * world / max(train_seconds, 1e-9), 2),
                  "short_batches": stats.get("short", 0), "drained_batches": stats.get("drained", 0),
                  "train_data_wait_seconds": round(stats.get("train_wait", 0.0), 3),
                  "val_seconds": round(val_seconds, 3),
                  "val_data_wait_seconds": round(stats.get("val_wait", 0.0), 3),
                  "pid": os.getpid(),  # of rank 0, which writes the checkpoint
                  "threads": int(threads), "onednn": onednn}
        state["history"].append(record)
        state["epoch"] = epoch + 1
        optimizer_values = [v.numpy() for v in model.optimizer.variables]
        with tempfile.TemporaryDirectory() as d:
            _save_arrays(os.path.join(d, "weights.npz"), weights_now)
            _save_arrays(os.path.join(d, "optimizer.npz"), optimizer_values)
            if best_weights is not None:
                _save_arrays(os.path.join(d, "best.npz"), best_weights)
            # sizes let a reader tell a complete checkpoint from one whose copy was cut short
            files = {n: os.path.getsize(os.path.join(d, n)) for n in os.listdir(d)}
            with open(os.path.join(d, "state.json"), "w") as f:
                json.dump({**state, "files": files}, f)
            metrics = {**record, "best_epoch": state["best_epoch"], "best_val_loss": state["best_val_loss"],
                       "best_val_track_accuracy": state["best_val_track_accuracy"],
                       "stopped": state["stopped"], "epochs": epochs, "restarts": len(state.get("restarts", []))}
            checkpoint = ray.train.Checkpoint.from_directory(d) if rank == 0 else None
            ray.train.report(metrics, checkpoint=checkpoint)


# --------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------
def _epoch_printer(total_epochs: int, enabled: bool):
    from ray.tune import Callback

    class EpochPrinter(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if not enabled:
                return
            r = result
            line = (f"epoch {r.get('epoch')}/{total_epochs}: loss {r.get('loss', float('nan')):.4f} "
                    f"acc {r.get('accuracy', float('nan')):.3f}  val_loss {r.get('val_loss', float('nan')):.4f} "
                    f"val_acc {r.get('val_accuracy', float('nan')):.3f}  val_track_acc {r.get('val_track_accuracy', float('nan')):.3f}  "
                    f"lr {r.get('lr', 0):.2e}  "
                    f"{r.get('epoch_seconds', 0):.1f} s, {r.get('segments_per_s', 0):.0f} segments/s"
                    + ("  (best)" if r.get("best_epoch") == r.get("epoch") else "")
                    + ("  early stop" if r.get("stopped") else ""))
            print(line, file=sys.stderr, flush=True)

    return EpochPrinter()


def _find_checkpoints(run: Location) -> list[tuple[int, str]]:
    """(epoch, path) of every complete checkpoint under RUN/checkpoints, oldest first."""
    import pyarrow.fs as pafs

    out = []
    sel = pafs.FileSelector(run.join("checkpoints"), recursive=True, allow_not_found=True)
    for info in run.fs.get_file_info(sel):
        if info.type == pafs.FileType.File and info.base_name == "state.json" and "/checkpoint_" in info.path:
            folder = info.path.rsplit("/", 1)[0]
            try:
                with run.fs.open_input_stream(info.path) as f:
                    st = json.loads(f.read())
            except (OSError, ValueError):
                continue
            expected = st.get("files") or {"weights.npz": None, "optimizer.npz": None}
            sizes = {n: run.fs.get_file_info(f"{folder}/{n}") for n in expected}
            if any(i.type != pafs.FileType.File or (expected[n] is not None and i.size != expected[n])
                   for n, i in sizes.items()):
                continue  # incomplete: its copy was cut short
            out.append((int(st["epoch"]), folder, info.mtime_ns or 0))
    out.sort(key=lambda e: (e[0], e[2]))
    return [(e, p) for e, p, _ in out]


def _checkpoint_uri(run: Location, path: str) -> str:
    if run.is_local:
        return path
    scheme = run.uri.split("://", 1)[0]
    return f"{scheme}://{path}"


def _read_checkpoint(run: Location, path: str) -> tuple[dict[str, Any], list[np.ndarray] | None]:
    import tempfile

    import pyarrow.fs as pafs

    with run.fs.open_input_stream(path + "/state.json") as f:
        state = json.loads(f.read())
    name = "best.npz" if run.fs.get_file_info(path + "/best.npz").type == pafs.FileType.File else "weights.npz"
    with tempfile.TemporaryDirectory() as d:
        pafs.copy_files(path + "/" + name, os.path.join(d, name), source_filesystem=run.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return state, _load_arrays(os.path.join(d, name))


def _quiet_ray_data_logs(verbose: bool = False) -> None:
    """Ray Data configures its own loggers on import (INFO); keep them at ERROR unless verbose."""
    import logging

    import ray.data

    if not verbose:
        for name in ("ray.data", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    try:
        ctx.print_on_execution_start = verbose
    except Exception:
        pass


def _run_trainer(plan: TrainPlan, run: Location, datasets: dict[str, Any], resume_from: str | None,
                 max_failures: int, progress: bool) -> Any:
    from .models import import_tensorflow

    import_tensorflow()  # ray.train.tensorflow imports TensorFlow: do it quietly first
    from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    resources = {"CPU": plan.cpus_per_worker}
    worker_config = {
        "model": plan.model, "labels": plan.labels, "mel_shape": list(plan.mel_shape), "mean": plan.mean,
        "std": plan.std, "augment": plan.augment, "learning_rate": plan.learning_rate, "seed": plan.seed,
        "epochs": plan.epochs, "steps_per_epoch": plan.steps_per_epoch, "val_steps": plan.val_steps,
        "batch_size": plan.batch_size, "val_batch_size": plan.val_batch_size, "shuffle_buffer": plan.shuffle_buffer,
        "class_weights": plan.class_weights, "early_stopping_patience": plan.early_stopping_patience,
        "val_tracks": plan.tracks_per_split["val"]["total"], "input": plan.input, "fine_tune": plan.fine_tune,
        "cpus_per_worker": plan.cpus_per_worker,
    }
    trainer = TensorflowTrainer(
        train_loop_per_worker=train_func,
        train_loop_config=worker_config,
        scaling_config=ScalingConfig(num_workers=plan.workers, use_gpu=plan.use_gpu, resources_per_worker=resources,
                                     trainer_resources={"CPU": 0}),
        run_config=RunConfig(name=f"attempt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                             storage_path=run.join("checkpoints") if run.is_local else run.child("checkpoints").uri,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=[_epoch_printer(plan.epochs, progress)], verbose=0),
        datasets=datasets,
        resume_from_checkpoint=Checkpoint(resume_from) if resume_from else None,
    )
    return trainer.fit()


def _versions() -> dict[str, str]:
    from .ingest import library_versions

    return library_versions()


def train(dataset: str, run_dir: str, cfg: Config | None = None, *, address: str | None = None,
          workers: int | None = None, resume: bool = False, splits: Any = None, progress: bool = True,
          verbose: bool = False) -> dict[str, Any]:
    """Train a genre classifier on a dataset; write everything into ``run_dir``.

    Parameters
    ----------
    dataset : dataset folder or URI written by ``genrecls ingest``.
    run_dir : the run folder to create (or, with ``resume``, to continue).
    cfg : configuration (``train`` section; features come from the dataset).
    address : Ray cluster to join; None starts a local Ray (or uses one already initialised).
    workers : training workers (overrides ``cfg.train.workers``).
    resume : continue the run in ``run_dir`` from its last checkpoint (its splits, labels and
        normalisation are kept); a finished run is only re-exported and re-evaluated.
    splits : a fixed assignment (mapping, table, Parquet path or run folder of ``track_id, split``):
        its tracks keep their side, new tracks are assigned (e.g. a champion's holdout).
    progress : print one line per epoch on stderr.

    Returns
    -------
    dict with ``run``, ``model_id``, ``metrics`` (as in metrics.json), ``history``, ``epochs_run``,
    ``best_epoch``, ``train_seconds``, ``restarts``.

    Raises
    ------
    DatasetError, SplitError, ConfigError
        for bad input, before any worker starts.
    TrainingError
        when training failed (a worker failed more than ``train.max_failures`` times...).
    """
    quiet_environment(verbose)
    cfg = (cfg or Config()).validate()
    if workers is not None:
        cfg = cfg.with_section(train={"workers": int(workers)})
    run = Location.parse(run_dir)
    t_start = time.monotonic()
    timings: dict[str, float] = {}

    def say(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    check = check_dataset(dataset, cfg)
    cfg = cfg.with_section(features=check.features)
    if resume:
        if not run.exists("plan.json"):
            raise FileNotFoundError(f"{run.uri} holds no run to resume (no plan.json); start one with 'genrecls train DATASET --out {run_dir}'")
        old_plan = run.read_json("plan.json")
        if old_plan["features"] != asdict(check.features):
            raise DatasetError(f"cannot resume {run.uri}: {check.dataset.uri} has other feature settings than the run")
        if old_plan["model"] != cfg.train.model:
            cfg = cfg.with_section(train={"model": old_plan["model"]})
        splits = run.child("splits.parquet").uri
        labels = old_plan["labels"]
    else:
        if run.exists("plan.json") or run.exists("run.json"):
            raise FileExistsError(f"{run.uri} already holds a training run; pass --resume to continue it "
                                  "or choose another --out")
        labels = None
    check_model_input(cfg.train.model, check, dataset)
    # a first plan without Ray: every data error surfaces before anything starts
    plan, table = plan_training(check, cfg, splits=splits, labels=labels)
    run.makedirs()
    with run.lock("genrecls train"):
        with ray_session(address, None, verbose=verbose):
            import ray

            _quiet_ray_data_logs(verbose)
            cluster_cpus = float(ray.cluster_resources().get("CPU", 0))
            store = float(ray.cluster_resources().get("object_store_memory", 0)) or None
            if cfg.train.gpu and ray.cluster_resources().get("GPU", 0) < cfg.train.workers:
                raise ConfigError(f"train.gpu: {cfg.train.workers} workers need {cfg.train.workers} GPUs; "
                                  f"the cluster has {ray.cluster_resources().get('GPU', 0):g}")
            plan, table = plan_training(check, cfg, splits=splits, cluster_cpus=cluster_cpus, object_store_bytes=store,
                                        labels=labels)
            assignment = dict(zip(table.column("track_id").to_pylist(), table.column("split").to_pylist()))
            ids = {s: sorted(t for t, v in assignment.items() if v == s) for s in ("train", "val", "test")}
            resolved = cfg.with_section(train={"workers": plan.workers})
            run.write_text("config.json", resolved.to_json() + "\n")
            write_splits(table, run)
            done = _find_checkpoints(run) if resume else []
            resume_from = _checkpoint_uri(run, done[-1][1]) if done else None
            finished = False
            if done:
                st, _ = _read_checkpoint(run, done[-1][1])
                finished = st.get("stopped") or st["epoch"] >= plan.epochs
                log.info("resuming %s from epoch %d", run.uri, st["epoch"])
            timings["start"] = time.monotonic() - t_start
            tps, sps = plan.tracks_per_split, plan.segments_per_split
            say(f"{check.dataset.uri}: {len(plan.labels)} labels; train/val/test = {tps['train']['total']}/"
                f"{tps['val']['total']}/{tps['test']['total']} tracks ({sps['train']['total']}/{sps['val']['total']}/"
                f"{sps['test']['total']} segments); model {plan.model}, {plan.workers} worker(s), "
                f"data {'cached after one read' if plan.cache else 'streamed from the shards every epoch'}")
            datasets, stats_source = prepare_datasets(plan, ids) if not finished else ({}, None)
            if resume and run.exists("normalisation.json"):
                norm = run.read_json("normalisation.json")
            elif plan.model == "musicnn" and plan.input != "embedding":  # fine-tuning: the network's own input batch norm
                norm = {"mean": None, "std": None, "note": "none: the musicnn backbone's own input batch norm"}
                run.write_json("normalisation.json", norm)
            elif plan.input == "embedding":  # the head standardises the embedding
                mean, std, n = normalisation_stats(stats_source)
                norm = {"mean": mean.tolist(), "std": std.tolist(), "axis": "embedding dimension",
                        "units": "musicnn embedding", "computed_on": "train split", "values": n}
                run.write_json("normalisation.json", norm)
            else:
                mean, std, n = normalisation_stats(stats_source)
                norm = {"mean": mean.tolist(), "std": std.tolist(), "axis": "mel band", "units": "dB",
                        "computed_on": "train split", "values": n}
                run.write_json("normalisation.json", norm)
            plan.mean, plan.std = norm["mean"], norm["std"]
            run.write_json("plan.json", plan.to_dict())
            timings["data"] = time.monotonic() - t_start - timings["start"]
            if not finished:
                say(f"starting {plan.workers} Ray Train worker(s)"
                    + (f", resuming from epoch {st['epoch']}" if done else ""))
                t_fit = time.monotonic()
                result = _run_trainer(plan, run, datasets, resume_from, cfg.train.max_failures, progress)
                timings["trainer"] = time.monotonic() - t_fit
                if result.error is not None:
                    raise TrainingError(f"training failed: {type(result.error).__name__}: {result.error}") from result.error
        found = _find_checkpoints(run)
        if not found:
            raise TrainingError(f"training finished without a checkpoint in {run.uri}/checkpoints")
        state, best = _read_checkpoint(run, found[-1][1])
        say(f"exporting the best epoch ({state.get('best_epoch')}) and evaluating it on the validation and test tracks")
        t_finish = time.monotonic()
        summary = _finish(run, check, cfg, plan, state, best, table, time.monotonic() - t_start)
        timings["export_and_evaluation"] = time.monotonic() - t_finish
        summary["timings"] = {k: round(v, 2) for k, v in timings.items()}
        summary["wall_seconds"] = time.monotonic() - t_start
        return summary


def _finish(run: Location, check: DatasetCheck, cfg: Config, plan: TrainPlan, state: dict[str, Any],
            best: list[np.ndarray], table, wall: float) -> dict[str, Any]:
    """Export the best weights, evaluate per segment and per track, write figures and report."""
    from .evaluation import evaluate_predictor
    from .inference import Predictor, export_model
    from .models import build_model, import_tensorflow, model_summary
    from .plots import plot_confusion, plot_curves

    import_tensorflow()
    model = build_model(plan.model, plan.mel_shape, len(plan.labels), mean=plan.mean, std=plan.std,
                        augment=plan.augment, learning_rate=plan.learning_rate, fine_tune=plan.fine_tune)
    if plan.input == "embedding":  # the trained head onto the pretrained backbone: the export scores raw segments
        from .transfer import head_weights_into

        head_weights_into(model, best)
    else:
        model.set_weights(best)
    history = state["history"]
    versions = _versions()
    info = export_model(model, run, labels=plan.labels, features=check.features, model_name=plan.model, extra={
        "dataset": check.dataset.uri, "normalisation": {"file": "normalisation.json", "axis": "mel band",
                                                        "inside_model": plan.model not in ("tutorial", "musicnn")},
        "best_epoch": state.get("best_epoch"), "epochs_run": state["epoch"], "versions": versions,
        "model": model_summary(model), "splits": "splits.parquet", "config": "config.json",
        **({"max_batch": _max_batch()} if plan.model == "musicnn" else {})})
    run.write_json("history.json", history)
    plot_curves(history, run, title=f"{info['model_id']} ({plan.model})")
    predictor = Predictor(run)
    assignment = dict(zip(table.column("track_id").to_pylist(), table.column("split").to_pylist()))
    groups = {s: [t for t, v in assignment.items() if v == s] for s in ("val", "test")}
    metrics = evaluate_predictor(predictor, check.dataset, groups)
    if "classify_max_segments" in metrics:  # classify's K, chosen on the validation tracks (genrecls.selection)
        info["classify"] = {"max_segments": metrics["classify_max_segments"], "chosen_on": "validation tracks",
                            "val_track_accuracy_by_k": metrics["val_track_accuracy_by_k"]}
        run.write_json("run.json", info)
    metrics.update({
        "model_id": info["model_id"], "model": plan.model, "dataset": check.dataset.uri,
        "tracks_per_split": plan.tracks_per_split, "segments_per_split": plan.segments_per_split,
        "best_epoch": state.get("best_epoch"), "epochs_run": state["epoch"],
        "train_accuracy_last_epoch": history[-1]["accuracy"] if history else None,
        "scope": {"dataset": check.dataset.uri, "tracks": "the run's validation and test splits"},
    })
    run.write_json("metrics.json", metrics)
    plot_confusion(metrics["test_confusion"]["matrix"], plan.labels, run,
                   title=f"test confusion matrix ({metrics['test_tracks']} tracks)")
    train_seconds = sum(h["epoch_seconds"] for h in history)
    summary = {"run": run.uri, "model_id": info["model_id"], "metrics": metrics, "history": history,
               "epochs_run": state["epoch"], "best_epoch": state.get("best_epoch"), "stopped_early": state.get("stopped"),
               "train_seconds": train_seconds, "wall_seconds": wall, "restarts": state.get("restarts", []),
               "versions": versions, "notes": plan.notes}
    run.write_text("report.md", format_report(summary, plan, cfg, info))
    return summary


def _max_batch() -> int:
    from .transfer import MAX_BATCH

    return MAX_BATCH


def format_report(summary: dict[str, Any], plan: TrainPlan, cfg: Config, info: dict[str, Any]) -> str:
    """A human-readable report of a run (report.md)."""
    from .evaluation import format_metrics
    from .progress import format_duration, format_table

    m = summary["metrics"]
    h = summary["history"]
    lines = [f"# Training run {summary['model_id']}", ""]
    lines.append(f"- dataset: `{plan.dataset}` ({sum(plan.tracks_per_split[s]['total'] for s in plan.tracks_per_split)} "
                 f"labelled tracks, {len(plan.labels)} labels{f', {plan.unlabelled_tracks} unlabelled tracks ignored' if plan.unlabelled_tracks else ''})")
    f = FeatureConfig(**plan.features)
    scale = "log-mel dB" if f.log_scale == "db" else "log10(10000 mel + 1)"
    if plan.model == "tutorial":
        lines.append(f"- model: `tutorial` ({info['model']['parameters']:,} weights); raw dB input as in the tutorial")
    elif plan.model == "musicnn":
        lines.append(f"- model: `musicnn` ({info['model']['parameters']:,} weights): the pretrained MSD musicnn backbone "
                     f"({'fine-tuned' if plan.fine_tune else 'frozen; each segment embedded once, only the head trained'}) "
                     f"and a softmax head; input {plan.mel_shape[0]}x{plan.mel_shape[1]} {scale} (preset {f.preset})")
    else:
        lines.append(f"- model: `{plan.model}` ({info['model']['parameters']:,} weights); input {plan.mel_shape[0]}x{plan.mel_shape[1]} "
                     f"{scale} (preset {f.preset}), normalised per mel band inside the model with training-split statistics")
    lines.append(f"- training: {plan.workers} Ray Train worker(s) x {plan.cpus_per_worker:g} CPU{' + GPU' if plan.use_gpu else ''}, "
                 f"batch {plan.batch_size} per worker, {plan.steps_per_epoch} steps per epoch, {summary['epochs_run']} of "
                 f"{plan.epochs} epochs{' (early stop)' if summary['stopped_early'] else ''}, best epoch {summary['best_epoch']} "
                 "(highest validation track accuracy), "
                 f"learning rate {plan.learning_rate:g} with cosine decay, shuffle {plan.shuffle}, seed {plan.seed}, "
                 f"class weights {'on' if cfg.train.class_weights else 'off'}, track weights {'on' if plan.segment_weights else 'off'}, augmentation {'on' if plan.augment and plan.model != 'tutorial' else 'off'}")
    sps = [r["segments_per_s"] for r in h[1:]] or [r["segments_per_s"] for r in h]
    lines.append(f"- time: {format_duration(summary['train_seconds'])} in epochs, {format_duration(summary['wall_seconds'])} in all; "
                 f"median {float(np.median(sps)) if sps else 0:.0f} training segments/s")
    if summary["restarts"]:
        lines.append(f"- restarts from a checkpoint: {len(summary['restarts'])} "
                     f"(at epochs {', '.join(str(r['from_epoch']) for r in summary['restarts'])})")
    for note in plan.notes:
        lines.append(f"- note: {note}")
    if h and h[-1].get("onednn") == "0":
        lines.append("- note: the workers ran TensorFlow with oneDNN disabled (TF_ENABLE_ONEDNN_OPTS=0 in their "
                     "environment): convolutions run 2-3x slower on x86 CPUs than with it enabled")
    lines += ["", "## Split (by track, stratified by label)", ""]
    rows = []
    for label in plan.labels + ["total"]:
        rows.append((label, *[plan.tracks_per_split[s].get(label, 0) for s in ("train", "val", "test")],
                     *[plan.segments_per_split[s].get(label, 0) for s in ("train", "val", "test")]))
    lines += ["```", format_table(rows, ("label", "train tracks", "val tracks", "test tracks", "train segs", "val segs", "test segs")), "```"]
    lines += ["", "## Metrics", "", "```", format_metrics(m), "```", ""]
    lines += ["## Per epoch", "", "```", format_table(
        [(r["epoch"], f"{r['loss']:.4f}", f"{r['accuracy']:.3f}", f"{r['val_loss']:.4f}", f"{r['val_accuracy']:.3f}",
          f"{r.get('val_track_accuracy', float('nan')):.3f}", f"{r['lr']:.2e}", f"{r['epoch_seconds']:.1f}") for r in h],
        ("epoch", "loss", "acc", "val loss", "val acc", "val track acc", "lr", "seconds")), "```", ""]
    lines += ["![learning curves](curves.png)", "", "![confusion matrix (test tracks)](confusion_matrix.png)", ""]
    lines += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in summary["versions"].items()), ""]
    return "\n".join(lines)
