"""What each Ray Train worker runs: :func:`train_func` and its input pipeline.

A worker receives the :class:`~genrecls.jobs.training.plan.WorkerPlan` (typed, frozen) and:

* builds the model of the plan (:func:`build_model_for`, the same builder the export uses)
  under ``MultiWorkerMirroredStrategy`` over tf-keras (Keras 3 does not train under it:
  :mod:`genrecls.models.networks`);
* reads its share of the ``train`` and ``val`` Ray Datasets (``get_dataset_shard``): exactly
  ``plan.steps_per_epoch`` batches per epoch on every worker (the driver computed them from the
  equal split; a worker that came up short would repeat its last batch rather than leave the
  others waiting in an all-reduce), mixed by a local shuffle buffer;
* evaluates the validation split every epoch per track (each worker sums its segments'
  probabilities per track, one all-reduce adds the workers' sums) and keeps the epoch of
  highest validation **track** accuracy, ties to the lower loss (:mod:`genrecls.models.selection`);
  early stopping counts epochs without such an improvement; cosine learning-rate decay;
* reports a checkpoint every epoch (``ray.train.report``; rank 0 writes it,
  :mod:`genrecls.jobs.training.checkpoints`), and starts from the run's last complete checkpoint:
  after a worker died and Ray Train restarted the group, or when a run is resumed.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import numpy as np

from genrecls.core.hooks import pause_point
from genrecls.models.selection import TrackTally, is_better, validation_metrics

from .checkpoints import checkpoint_name, read_checkpoint_dir, write_checkpoint
from .plan import WorkerPlan, learning_rate_at

__all__ = ["train_func", "build_model_for", "model_with_weights"]


def build_model_for(plan: WorkerPlan, *, whole: bool = False):
    """The compiled model a plan trains (and exports): the named model on stored segments.

    (A frozen musicnn backbone's head is not trained here: :mod:`genrecls.jobs.training.head`.)
    """
    from genrecls.models.catalog import build_model

    return build_model(plan.model, plan.mel_shape, len(plan.labels), mean=plan.mean, std=plan.std,
                       augment=plan.augment, learning_rate=plan.learning_rate, fine_tune=plan.fine_tune)


def model_with_weights(plan: WorkerPlan, weights: list[np.ndarray]):
    """The whole classifier with trained weights."""
    model = build_model_for(plan, whole=True)
    model.set_weights(weights)
    return model


def _input_shape(plan: WorkerPlan) -> tuple[int, ...]:
    return tuple(plan.mel_shape)


def _epoch_generator(shard, *, steps: int, batch: int, buffer: int, seed: int | None, weights: np.ndarray | None,
                     stats: dict[str, Any], name: str = "train"):
    """Exactly ``steps`` batches from a worker's Ray Data shard; the rest of the epoch is drained.

    ``stats[name + "_wait"]`` adds up the seconds spent waiting for Ray Data (the input
    pipeline's share of the epoch, reported in the history).
    """
    key = f"{name}_wait"

    def gen():
        t = time.perf_counter()
        # read ahead by a shuffle buffer's worth: a split streamed from the shards then has its next blocks
        # read and decoded while the model trains on the current ones, not in turn with them
        prefetch = min(64, max(2, buffer // max(1, batch)))
        it = iter(shard.iter_batches(batch_size=batch, batch_format="numpy", drop_last=True, prefetch_batches=prefetch,
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


def _tf_dataset(tf, gen, shape: tuple[int, ...], weighted: bool):
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


def _set_threads(tf, plan: WorkerPlan, local_world_size: int) -> int:
    """TensorFlow threads: ``plan.threads``, else the node's cores shared by the workers on it (the Ray
    CPU reservation is smaller on purpose, to leave Ray Data room to schedule its read tasks)."""
    from genrecls.models.networks import set_tf_threads

    threads = plan.threads or max(1, (os.cpu_count() or 1) // max(1, local_world_size))
    set_tf_threads(threads)
    return threads


def _starting_checkpoint(run_uri: str):
    """The run's last complete checkpoint, or None for a new run.

    Read from the run folder itself rather than asked of Ray Train (``get_checkpoint``): Ray
    registers a checkpoint only when its controller next polls the workers (every 2 s), so a
    worker that dies just after persisting one would otherwise make the group start over.
    Every worker of a new group reads the same folder, written by the group before it.
    """
    import ray.train

    from genrecls.storage.location import Location

    from .checkpoints import find_checkpoints

    run = Location.parse(run_uri)
    found = find_checkpoints(run)
    return ray.train.Checkpoint(found[-1][1], filesystem=run.fs) if found else None


def train_func(plan: WorkerPlan, run_uri: str) -> None:
    """Ray Train worker loop (one per worker process); checkpoints go to ``run_uri``/checkpoints."""
    # TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, when imported; in a Ray Train worker that is when
    # ray.train.tensorflow is unpickled, before this function runs, so only the workers' runtime
    # environment (genrecls.core.runtime.worker_env) decides it.  It is recorded in the history: with "0"
    # the CNN steps run 2-3x slower on x86 CPUs.
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default")
    import ray.train

    from genrecls.models.networks import import_tensorflow, keras

    tf = import_tensorflow()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = _set_threads(tf, plan, ctx.get_local_world_size())
    keras().utils.set_random_seed(plan.seed)
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if world > 1 else tf.distribute.get_strategy()
    shape = _input_shape(plan)
    with strategy.scope():
        model = build_model_for(plan)
        model.optimizer.build(model.trainable_variables)
    # same initial weights everywhere (MWMS also broadcasts them); then each worker draws its own
    # augmentation masks and dropout
    tf.random.set_seed(plan.seed * 1009 + 1 + rank)

    state: dict[str, Any] = {"epoch": 0, "history": [], "best_val_loss": None, "best_val_track_accuracy": None,
                             "best_epoch": None, "wait": 0, "stopped": False, "restarts": []}
    best_weights = None
    ckpt = _starting_checkpoint(run_uri)
    if ckpt:
        with ckpt.as_directory() as d:
            state, weights_then, optimizer_then, best_weights = read_checkpoint_dir(d)
        model.set_weights(weights_then)
        for var, value in zip(model.optimizer.variables, optimizer_then):
            var.assign(value)
        state.pop("files", None)
        state.setdefault("best_val_track_accuracy", None)
        state.setdefault("restarts", []).append({"from_epoch": state["epoch"], "time": time.time(), "world_size": world})

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    class_weights = np.asarray(plan.class_weights, np.float32)
    epochs, steps, batch = plan.epochs, plan.steps_per_epoch, plan.batch_size
    n_labels, n_val_tracks = len(plan.labels), plan.val_tracks

    def all_workers_sum(vector: np.ndarray) -> np.ndarray:
        """The element-wise sum of every worker's array (one collective all-reduce; the same result everywhere)."""
        if world == 1:
            return vector
        value = tf.constant(vector)
        per_replica = strategy.experimental_distribute_values_from_function(lambda _: value)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()

    while state["epoch"] < epochs and not state["stopped"]:
        epoch = state["epoch"]
        lr = learning_rate_at(epoch, epochs, plan.learning_rate)
        model.optimizer.learning_rate.assign(lr)
        stats: dict[str, Any] = {}
        seed = plan.seed * 100_003 + epoch * 101 + rank
        train_gen = _epoch_generator(train_shard, steps=steps, batch=batch, buffer=plan.shuffle_buffer, seed=seed,
                                     weights=class_weights, stats=stats)
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
        weights_now = model.get_weights()  # collective under MWMS: every worker calls it
        if is_better(val, best):
            state["best_val_track_accuracy"], state["best_val_loss"] = val["val_track_accuracy"], val["val_loss"]
            state["best_epoch"], state["wait"] = epoch + 1, 0
            best_weights = weights_now
        else:
            state["wait"] += 1
        if plan.early_stopping_patience and state["wait"] >= plan.early_stopping_patience:
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
                  "threads": threads, "onednn": onednn}
        state["history"].append(record)
        state["epoch"] = epoch + 1
        optimizer_values = [v.numpy() for v in model.optimizer.variables]
        metrics = {**record, "best_epoch": state["best_epoch"], "best_val_loss": state["best_val_loss"],
                   "best_val_track_accuracy": state["best_val_track_accuracy"],
                   "stopped": state["stopped"], "epochs": epochs, "restarts": len(state.get("restarts", []))}
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                write_checkpoint(d, state, weights_now, optimizer_values, best_weights)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name(state["epoch"]),
                             delete_local_checkpoint_after_upload=False)  # the temporary folder goes with the block
        pause_point("train-epoch-reported")  # tests: a worker certainly in the middle of a run
