"""The training input as Ray Datasets, built on the driver and handed to the trainer.

The shards the plan's index version names are read with ``read_parquet`` (only ``track_id`` and
``mel``, with each row's file; the split's track ids pushed into the scan); a row is kept only
when its file is its track's shard in the index (an older shard keeps the rows of a track that
changed since, until ``genrecls vacuum``), and its label is the index's (a relabel rewrites no
shard).  Rows are decoded to ``x`` (float16, (n_mels, n_frames)), ``y``
(label index) and, for training, ``w`` (the segment's loss weight) or, for validation, ``t``
(the track's row in the per-track sums).  The trainer splits each dataset between the workers
(``streaming_split(equal=True)``); each worker reads its share with ``get_dataset_shard``
(:mod:`genrecls.jobs.training.worker`).

Order.  Shards hold a few labels each (ingest writes tracks in folder order), so a batch of
consecutive rows would hold a few labels too.  A **cached** split (``plan.cache``: it takes
under a quarter of the object store, or ``train.cache=on``) is read and decoded once,
shuffled row by row once (``random_shuffle``) and kept in the object store; each epoch then
reorders its blocks, and each worker's shuffle buffer mixes within them.  A **streamed**
split is read from the shards again every epoch, in the order ``plan.shuffle`` says:
``shards`` (the shards' order shuffled anew every epoch, then the workers' shuffle buffers),
``files`` (the shards in file order, then the buffers) or ``global`` (a full
``random_shuffle`` every epoch: all-to-all, the costliest).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from genrecls.storage.dataset import DatasetError
from genrecls.storage.location import Location

from .plan import TrainPlan

__all__ = ["make_ray_dataset", "prepare_datasets", "val_track_index", "normalisation_stats"]


def _to_xy(batch, labels: list[str], shape: tuple[int, int], weights: dict[str, float] | None = None,
           track_index: dict[str, int] | None = None, tracks: dict[str, tuple[str, str]] | None = None
           ) -> dict[str, np.ndarray]:
    """Shard rows (pyarrow) -> ``x`` float16 (n, n_mels, n_frames), ``y`` int32 label index
    and, with ``weights`` (track_id -> weight), ``w`` float32; with ``track_index`` (track_id ->
    index), ``t`` int32 (validation: segment probabilities are summed per track).  With ``tracks``
    (track_id -> (its shard, its label) in the index) a row read from another file than its
    track's shard is dropped, and the label is the index's (the batch then has a ``path`` column:
    each row's file)."""
    ids = batch.column("track_id").to_pylist()
    if tracks is not None:
        files = batch.column("path").to_pylist()
        keep = [f.rsplit("/", 1)[-1] == tracks[t][0] for t, f in zip(ids, files)]
        if not all(keep):
            batch = batch.filter(np.array(keep, bool))
            ids = [t for t, k in zip(ids, keep) if k]
        row_labels = [tracks[t][1] for t in ids]
    else:
        row_labels = batch.column("label").to_pylist()
    mel = batch.column("mel").combine_chunks()
    x = mel.flatten().to_numpy(zero_copy_only=False).reshape(len(mel), *shape).astype(np.float16, copy=False)
    index = {l: i for i, l in enumerate(labels)}
    y = np.fromiter((index[l] for l in row_labels), dtype=np.int32, count=len(mel))
    out = {"x": x, "y": y}
    if weights is not None or track_index is not None:
        if weights is not None:
            out["w"] = np.fromiter((weights[t] for t in ids), dtype=np.float32, count=len(mel))
        if track_index is not None:
            out["t"] = np.fromiter((track_index[t] for t in ids), dtype=np.int32, count=len(mel))
    return out


def make_ray_dataset(plan: TrainPlan, track_ids: list[str], *, shuffle_files: bool = False,
                     weights: dict[str, float] | None = None, track_index: dict[str, int] | None = None):
    """A Ray Dataset of ``x``/``y`` rows for the given tracks (the track filter is pushed into the Parquet scan);
    with ``weights`` (track_id -> loss weight of each segment) a ``w`` column too; with ``shuffle_files``
    the shards are read in a new order every time the dataset is executed (every epoch)."""
    import ray.data
    from ray.data.expressions import col

    loc = Location.parse(plan.dataset)
    kwargs: dict[str, Any] = {}
    if not loc.is_local:
        kwargs["filesystem"] = loc.fs
    if shuffle_files:
        from ray.data import FileShuffleConfig

        kwargs["shuffle"] = FileShuffleConfig(seed=plan.seed, reseed_after_execution=True)
    ctx = ray.data.DataContext.get_current()
    v2 = getattr(ctx, "use_datasource_v2", None)
    if v2:  # the file list is known: Ray 2.5x's V2 reader adds a ListFiles stage costing seconds per epoch
        ctx.use_datasource_v2 = False
    tracks = None
    if plan.track_rows is not None:
        tracks = {t: plan.track_rows[t] for t in track_ids}
        kwargs["include_paths"] = True
    try:
        ds = ray.data.read_parquet(plan.shard_paths, columns=["track_id", "mel"] if tracks else
                                   ["track_id", "label", "mel"], **kwargs)
    finally:
        if v2:
            ctx.use_datasource_v2 = v2
    ds = ds.filter(expr=col("track_id").is_in(sorted(track_ids)))
    return ds.map_batches(_to_xy, batch_format="pyarrow", batch_size=None,
                          fn_kwargs={"labels": plan.labels, "shape": plan.mel_shape, "weights": weights,
                                     "track_index": track_index, "tracks": tracks})


def prepare_datasets(plan: TrainPlan, ids: dict[str, list[str]]) -> tuple[dict[str, Any], Any]:
    """The ``train`` and ``val`` Ray Datasets handed to the trainer, and the one to compute statistics on."""
    streamed_order = plan.shuffle if not plan.cache else None
    train = make_ray_dataset(plan, ids["train"], shuffle_files=streamed_order == "shards", weights=plan.segment_weights)
    val = make_ray_dataset(plan, ids["val"], track_index=val_track_index(ids["val"]))
    if plan.cache:
        # a real row shuffle once: shards hold a few labels each (ingest order), every block must mix them
        train = train.random_shuffle(seed=plan.seed).materialize()
        val = val.materialize()
        return {"train": train.randomize_block_order(seed=plan.seed), "val": val}, train
    epoch_train = train.random_shuffle(seed=plan.seed) if streamed_order == "global" else train
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
