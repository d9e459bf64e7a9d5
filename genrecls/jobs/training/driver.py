"""The driver of a training run: checks, Ray Train V2's ``TensorflowTrainer``, export and report.

:func:`train` checks the dataset and the configuration and plans the run without Ray
(:mod:`genrecls.jobs.training.plan`), so bad input fails before anything starts; then, holding the
run folder's lock, it builds the input datasets (:mod:`genrecls.jobs.training.data`), computes the
normalisation on the training split, and starts the trainer: ``plan.workers`` workers running
:func:`genrecls.jobs.training.worker.train_func` on the typed plan.  Ray Train (V2) persists a
checkpoint every epoch into ``RUN/checkpoints`` (its ``storage_path`` is RUN, its run name
``checkpoints``; last two kept) and restarts the worker group when a worker dies
(``FailureConfig(max_failures)``); the workers start from the run's last complete
checkpoint, so the group goes on from there, and ``train(..., resume=True)`` (``genrecls
train --resume RUN``) continues an interrupted run the same way.  Ray's own
bookkeeping there is removed when the run finishes
(:func:`genrecls.jobs.training.checkpoints.remove_ray_state`).  The best epoch's weights are then
exported and scored on the validation and test tracks.

What a run folder holds when done::

    RUN/config.json          resolved configuration (features = the dataset's)
    RUN/splits.parquet       track_id, label, split (train/val/test), group
    RUN/normalisation.json   per-mel-band mean and std of the training split
    RUN/plan.json            labels, class weights, steps, counts, dataset (written before training)
    RUN/checkpoints/epoch-NNNN/  the last two epochs: state.json, weights.npz, optimizer.npz, best.npz
    RUN/model/, model.keras  the model (genrecls.models.inference.export_model), run.json
    RUN/history.json, curves.png, confusion_matrix.png, metrics.json, report.md
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from dataclasses import asdict, replace
from typing import Any

import numpy as np

from genrecls.core.config import Config, ConfigError
from genrecls.core.runtime import (
    Interrupted,
    handle_stop_signals,
    log,
    quiet_environment,
    ray_session,
)
from genrecls.storage.dataset import Dataset, DatasetError
from genrecls.storage.location import Location
from genrecls.storage.locks import folder_lock
from genrecls.storage.split import as_mapping, write_splits

from .checkpoints import (
    CHECKPOINTS,
    find_checkpoints,
    read_checkpoint,
    remove_ray_state,
)
from .data import normalisation_stats, prepare_datasets
from .plan import (
    DatasetCheck,
    TrainingError,
    TrainPlan,
    check_dataset,
    check_model_input,
    labels_record,
    plan_training,
)
from .report import format_report

__all__ = ["train", "resume_inputs"]


def resume_inputs(run_dir: str, *, dataset: str | None = None, config_file: str | None = None,
                  overrides: list[str] | None = None) -> tuple[str, Config]:
    """The dataset and configuration to continue the run in ``run_dir`` (a folder or URI) with.

    The dataset is ``dataset`` or the run's own (``RUN/plan.json``); the configuration is
    ``config_file`` or the run's ``RUN/config.json``, then ``overrides`` (``section.key=value``).
    """
    from genrecls.core.config import load_config

    run = Location.parse(run_dir)
    if not run.exists("plan.json"):
        raise FileNotFoundError(f"{run.uri} holds no run to resume (no plan.json); start one with "
                                f"'genrecls train DATASET --out {run_dir}'")
    if config_file:
        cfg = load_config(config_file, overrides)
    elif run.exists("config.json"):
        cfg = Config.from_dict(run.read_json("config.json")).override(overrides).validate()
    else:
        cfg = load_config(None, overrides)
    return dataset or run.read_json("plan.json")["dataset"], cfg


def _epoch_line(r: dict[str, Any], total_epochs: int, best_epoch: int | None, stopped: bool) -> str:
    return (f"epoch {r.get('epoch')}/{total_epochs}: loss {r.get('loss', float('nan')):.4f} "
            f"acc {r.get('accuracy', float('nan')):.3f}  val_loss {r.get('val_loss', float('nan')):.4f} "
            f"val_acc {r.get('val_accuracy', float('nan')):.3f}  val_track_acc {r.get('val_track_accuracy', float('nan')):.3f}  "
            f"lr {r.get('lr', 0):.2e}  {r.get('epoch_seconds', 0):.1f} s, {r.get('segments_per_s', 0):.0f} segments/s"
            + ("  (best)" if best_epoch == r.get("epoch") else "") + ("  early stop" if stopped else ""))


class _EpochPrinter(threading.Thread):
    """Prints each epoch's line on stderr as its checkpoint appears (Ray Train's callbacks run in its
    controller actor, whose output the quiet driver does not show)."""

    def __init__(self, run: Location, total_epochs: int, after_epoch: int, interval: float = 2.0):
        super().__init__(daemon=True, name="genrecls-epochs")
        self.location, self.total, self.printed, self.interval = run, total_epochs, after_epoch, interval
        self.done = threading.Event()

    def poll(self) -> None:
        found = find_checkpoints(self.location)
        if not found or found[-1][0] <= self.printed:
            return
        with self.location.fs.open_input_stream(found[-1][1] + "/state.json") as f:
            state = json.loads(f.read())
        for r in state["history"]:
            if r["epoch"] > self.printed:
                last = r["epoch"] == state["epoch"]
                print(_epoch_line(r, self.total, state.get("best_epoch"), bool(last and state.get("stopped"))),
                      file=sys.stderr, flush=True)
                self.printed = r["epoch"]

    def run(self) -> None:  # noqa: D102 (threading.Thread)
        while not self.done.wait(self.interval):
            try:
                self.poll()
            except (OSError, ValueError, KeyError):  # a checkpoint being written; the next poll sees it
                pass

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=10)
        try:
            self.poll()
        except (OSError, ValueError, KeyError):
            pass


def _kept(run: Location) -> str:
    found = find_checkpoints(run)
    return (f"{run.uri} keeps its checkpoints up to epoch {found[-1][0] if found else 0}; "
            f"continue it with genrecls train --resume {run.uri}")


def _run_trainer(plan: TrainPlan, run: Location, datasets: dict[str, Any], max_failures: int, progress: bool,
                 first_epoch: int) -> None:
    """Ray Train V2's TensorflowTrainer on the plan; raises TrainingError when it fails."""
    import functools

    from genrecls.models.networks import import_tensorflow

    from .backend import TensorflowWorkers
    from .worker import train_func

    import_tensorflow()  # ray.train.tensorflow imports TensorFlow: do it quietly first
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
        TrainingFailedError,
    )
    from ray.train.tensorflow import TensorflowTrainer
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    trainer = TensorflowTrainer(
        train_loop_per_worker=functools.partial(train_func, plan.for_workers(), run.uri),
        scaling_config=ScalingConfig(num_workers=plan.workers, use_gpu=plan.use_gpu,
                                     resources_per_worker={"CPU": plan.cpus_per_worker}),
        run_config=RunConfig(name=CHECKPOINTS, storage_path=run.root, storage_filesystem=run.fs,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
        tensorflow_config=TensorflowWorkers(),  # Ray's own imports TensorFlow in the run's controller
    )
    if not isinstance(trainer, DataParallelTrainer):  # RAY_TRAIN_V2_ENABLED=0 in the environment
        raise TrainingError("Ray Train V2 is disabled in this environment (RAY_TRAIN_V2_ENABLED=0); unset it")
    # an object store is listed less often: each poll lists RUN/checkpoints and reads a state.json
    printer = _EpochPrinter(run, plan.epochs, first_epoch, 2.0 if run.is_local else 10.0) if progress else None
    if printer:
        printer.start()
    sigint = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit()
    except TrainingFailedError as exc:
        raise TrainingError(f"training failed: {type(exc).__name__}: {exc}") from exc
    except SystemExit:  # Ray Train's SIGINT handler aborts the run, then calls sys.exit(0)
        raise Interrupted("SIGINT", kept=_kept(run)) from None
    finally:
        # fit() installs Ray Train's own SIGINT handler (abort the run); the command's comes back
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not sigint:
            handle_stop_signals()
        if printer:
            printer.stop()


def train(dataset: "str | Dataset", run_dir: str, cfg: Config | None = None, *, address: str | None = None,
          workers: int | None = None, resume: bool = False, splits: Any = None, progress: bool = True,
          verbose: bool = False) -> dict[str, Any]:
    """Train a genre classifier on a dataset; write everything into ``run_dir``.

    Parameters
    ----------
    dataset : dataset folder or URI written by ``genrecls ingest`` (its newest version), or a
        :class:`~genrecls.storage.dataset.Dataset` (the version it reads: what retrain just committed).
    run_dir : the run folder or URI to create (or, with ``resume``, to continue).
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

    if resume and isinstance(dataset, str) and run.exists("plan.json"):
        version = run.read_json("plan.json").get("dataset_version")
        if version is not None:  # the version the run started on, if it is still there
            from genrecls.storage.dataset import Dataset

            dataset = Dataset(dataset, version=version)
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
    check_model_input(cfg.train.model, check)
    # a first plan without Ray: every data error surfaces before anything starts
    plan, table = plan_training(check, cfg, splits=splits, labels=labels)
    _check_vocabulary(cfg, plan.labels, labels_record(check))  # a wrong classify.labels file too
    run.makedirs()
    with folder_lock(run, "genrecls train"):
        with ray_session(address, None, verbose=verbose):
            import ray

            resources = ray.cluster_resources()
            if cfg.train.gpu and resources.get("GPU", 0) < cfg.train.workers:
                raise ConfigError(f"train.gpu: {cfg.train.workers} workers need {cfg.train.workers} GPUs; "
                                  f"the cluster has {resources.get('GPU', 0):g}")
            plan, table = plan_training(check, cfg, splits=splits, cluster_cpus=float(resources.get("CPU", 0)),
                                        object_store_bytes=float(resources.get("object_store_memory", 0)) or None,
                                        labels=labels)
            assignment = as_mapping(table)
            ids = {s: sorted(t for t, v in assignment.items() if v == s) for s in ("train", "val", "test")}
            run.write_text("config.json", cfg.with_section(train={"workers": plan.workers}).to_json() + "\n")
            write_splits(table, run)
            done = find_checkpoints(run) if resume else []
            state = read_checkpoint(run, done[-1][1])[0] if done else None
            finished = bool(state and (state.get("stopped") or state["epoch"] >= plan.epochs))
            if state:
                log.info("resuming %s from epoch %d", run.uri, state["epoch"])
            timings["start"] = time.monotonic() - t_start
            tps, sps = plan.tracks_per_split, plan.segments_per_split
            say(f"{check.dataset.uri}: {len(plan.labels)} labels; train/val/test = {tps['train']['total']}/"
                f"{tps['val']['total']}/{tps['test']['total']} tracks ({sps['train']['total']}/{sps['val']['total']}/"
                f"{sps['test']['total']} segments); model {plan.model}, "
                + ("frozen backbone: a linear head, every choice by cross-validation of the training + validation "
                   "tracks" if plan.input == "embedding" else
                   f"{plan.workers} worker(s), data "
                   + ('cached after one read' if plan.cache else f'streamed from the shards every epoch ({plan.shuffle} order)')))
            if plan.input == "embedding":  # a frozen backbone: a linear head chosen by cross-validation, no Ray Train
                from .head import train_head

                run.write_json("plan.json", plan.to_dict())
                summary = train_head(check, cfg, plan, run, table, say=say, cluster_cpus=float(resources.get("CPU", 1)),
                                     t_start=t_start)
                summary["timings"] = {"start": round(timings["start"], 2), **summary["timings"]}
                summary["wall_seconds"] = time.monotonic() - t_start
                return summary
            datasets, stats_source = prepare_datasets(plan, ids) if not finished else ({}, None)
            plan = _with_normalisation(plan, run, stats_source, keep=resume)
            run.write_json("plan.json", plan.to_dict())
            timings["data"] = time.monotonic() - t_start - timings["start"]
            if not finished:
                say(f"starting {plan.workers} Ray Train worker(s)" + (f", resuming from epoch {state['epoch']}" if state else ""))
                remove_ray_state(run)  # the workers start from done[-1], not from Ray's record of an earlier attempt
                t_fit = time.monotonic()
                _run_trainer(plan, run, datasets, cfg.train.max_failures, progress, state["epoch"] if state else 0)
                timings["trainer"] = time.monotonic() - t_fit
        found = find_checkpoints(run)
        if not found:
            raise TrainingError(f"training finished without a checkpoint in {run.uri}/{CHECKPOINTS}")
        state, best = read_checkpoint(run, found[-1][1])
        if not (state.get("stopped") or state["epoch"] >= plan.epochs):  # Ray Train's SIGINT handler aborted it
            raise Interrupted("SIGINT", kept=_kept(run))
        remove_ray_state(run)
        say(f"exporting the best epoch ({state.get('best_epoch')}) and evaluating it on the validation and test tracks")
        t_finish = time.monotonic()
        summary = _finish(run, check, cfg, plan, state, best, table, time.monotonic() - t_start)
        timings["export_and_evaluation"] = time.monotonic() - t_finish
        summary["timings"] = {k: round(v, 2) for k, v in timings.items()}
        summary["wall_seconds"] = time.monotonic() - t_start
        return summary


def _with_normalisation(plan: TrainPlan, run: Location, stats_source, *, keep: bool) -> TrainPlan:
    """The plan with the input normalisation: the run's own when resuming, else computed on the training split
    (and written to RUN/normalisation.json)."""
    if keep and run.exists("normalisation.json"):
        norm = run.read_json("normalisation.json")
    elif plan.model == "musicnn":  # fine-tuning: the network's own input batch norm
        norm = {"mean": None, "std": None, "note": "none: the musicnn backbone's own input batch norm"}
        run.write_json("normalisation.json", norm)
    else:
        mean, std, n = normalisation_stats(stats_source)
        norm = {"mean": mean.tolist(), "std": std.tolist(), "axis": "mel band", "units": "dB",
                "computed_on": "train split", "values": n}
        run.write_json("normalisation.json", norm)
    return replace(plan, mean=norm["mean"], std=norm["std"])


def _finish(run: Location, check: DatasetCheck, cfg: Config, plan: TrainPlan, state: dict[str, Any],
            best: list[np.ndarray], table, wall: float) -> dict[str, Any]:
    """Export the best weights, evaluate per segment and per track, write figures and report."""
    from genrecls.models.evaluation import evaluate_predictor
    from genrecls.models.inference import Predictor, export_model
    from genrecls.models.networks import import_tensorflow, model_summary
    from genrecls.models.plots import plot_confusion, plot_curves

    from .worker import model_with_weights

    import_tensorflow()
    model = model_with_weights(plan.for_workers(), best)
    history = state["history"]
    versions = _versions()
    info = export_model(model, run, labels=plan.labels, features=check.features, model_name=plan.model, extra={
        "dataset": check.dataset.uri, "dataset_version": check.version, "labels_from": labels_record(check),
        "normalisation": {"file": "normalisation.json", "axis": "mel band",
                                                        "inside_model": plan.model not in ("tutorial", "musicnn")},
        "best_epoch": state.get("best_epoch"), "epochs_run": state["epoch"], "versions": versions,
        "model": model_summary(model), "splits": "splits.parquet", "config": "config.json",
        **({"max_batch": _max_batch()} if plan.model == "musicnn" else {})})
    run.write_json("history.json", history)
    plot_curves(history, run, title=f"{info['model_id']} ({plan.model})")
    predictor = Predictor(run, engine=cfg.inference.engine, precision=cfg.inference.precision)
    assignment = as_mapping(table)
    groups = {s: [t for t, v in assignment.items() if v == s] for s in ("val", "test")}
    scored: dict[str, tuple] = {}
    metrics = evaluate_predictor(predictor, check.dataset, groups, keep=scored)
    metrics["engine"] = predictor.describe()  # what scored: the runtime classify uses with the same settings
    if "classify_max_segments" in metrics:  # classify's K, chosen on the validation tracks (genrecls.models.selection)
        info["classify"] = {"max_segments": metrics["classify_max_segments"], "chosen_on": "validation tracks",
                            "val_track_accuracy_by_k": metrics["val_track_accuracy_by_k"]}
        run.write_json("run.json", info)
    # calibration, 'uncertain' and per-genre thresholds, chosen on the validation tracks (genrecls.models.answers)
    metrics.update(_answers(run, info, scored, cfg))
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


def _check_vocabulary(cfg: Config, labels: list[str], labels_from: dict[str, Any] | None = None) -> None:
    """Refuse a wrong vocabulary file (classify.labels) before training rather than after."""
    if cfg.classify.labels is not None and str(cfg.classify.labels).lower() != "none":
        from genrecls.models.answers import vocabulary_path
        from genrecls.models.vocabulary import load_vocabulary

        load_vocabulary(vocabulary_path(cfg.classify.labels), labels, reserved=(cfg.classify.uncertain_label,),
                        tag_labels=(labels_from or {}).get("source") == "tags")


def _answers(run: Location, info: dict[str, Any], scored: dict[str, tuple], cfg: Config) -> dict[str, Any]:
    """Choose the answer rules on the validation tracks, record them in run.json, measure them on the test tracks."""
    from genrecls.models.answers import record_answers

    out = record_answers(run, info, scored, cfg.classify)
    run.write_json("run.json", info)
    return out


def _max_batch() -> int:
    from genrecls.models.transfer import MAX_BATCH

    return MAX_BATCH


def _versions() -> dict[str, str]:
    from genrecls.core.provenance import library_versions

    return library_versions()
