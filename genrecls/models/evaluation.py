"""Evaluation: segment- and track-level metrics of a trained run, with scikit-learn.

A track's prediction is the label of highest **mean segment probability**
(:func:`genrecls.models.inference.aggregate_tracks`, the rule classification uses too).
Metrics per split (``val``, ``test``): segment accuracy and macro F1, track accuracy and
macro F1, per-class precision/recall/F1 over tracks, and the per-track confusion matrix.

Segments are read from the dataset's Parquet shards in bounded batches (only the tracks
asked for, filtered in the scan) and scored by the exported SavedModel through
:class:`genrecls.models.inference.Predictor`, so an evaluation measures exactly the model that
classification will load.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from genrecls.audio.features import check_same_features
from genrecls.core.progress import format_table
from genrecls.models.inference import Predictor, aggregate_tracks, read_run_info
from genrecls.storage.dataset import Dataset, DatasetError, mel_array
from genrecls.storage.location import Location

__all__ = ["EvaluationError", "score_segments", "split_metrics", "evaluate_predictor", "evaluate_run", "format_metrics"]

TRACK_RULE = "track label = argmax of the mean of its segment probabilities"


class EvaluationError(ValueError):
    """A run cannot be evaluated on the data given."""


def score_segments(predictor: Predictor, dataset: Dataset, track_ids: Iterable[str],
                   batch_rows: int = 512, *, segment_index: list[int] | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """Probabilities of every segment of the given tracks.

    Returns (segment track ids, segment labels, probabilities (n, n_labels)); rows in shard order.
    With ``segment_index`` (a list), each row's position in its track is appended to it.
    """
    ids = sorted(set(track_ids))
    if not ids:
        return [], [], np.zeros((0, len(predictor.labels)), np.float32)
    shape = predictor.features.mel_shape
    tids: list[str] = []
    labels: list[str] = []
    probs = []
    columns = ["track_id", "label", "mel"] + (["segment_index"] if segment_index is not None else [])
    for batch in dataset.iter_segments(columns, track_ids=ids, batch_rows=batch_rows):
        if batch.num_rows == 0:
            continue
        if segment_index is not None:
            segment_index.extend(batch.column("segment_index").to_pylist())
        tids.extend(batch.column("track_id").to_pylist())
        labels.extend(batch.column("label").to_pylist())
        probs.append(predictor.predict(mel_array(batch.column("mel"), shape)))
    return tids, labels, (np.concatenate(probs) if probs else np.zeros((0, len(predictor.labels)), np.float32))


def split_metrics(prefix: str, vocab: Sequence[str], seg_tracks: Sequence[str], seg_labels: Sequence[str],
                  probs: np.ndarray) -> dict[str, Any]:
    """Segment and track metrics of one split, keys prefixed (``test_track_accuracy``...)."""
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    vocab = list(vocab)
    index = {l: i for i, l in enumerate(vocab)}
    out: dict[str, Any] = {}
    if len(seg_tracks) == 0:
        out.update({f"{prefix}_segments": 0, f"{prefix}_tracks": 0})
        return out
    y_seg = np.array([index[l] for l in seg_labels])
    p_seg = probs.argmax(axis=1)
    order, track_probs = aggregate_tracks(seg_tracks, probs)
    first_label = {}
    for t, l in zip(seg_tracks, seg_labels):
        first_label.setdefault(t, l)
    y_trk = np.array([index[first_label[t]] for t in order])
    p_trk = track_probs.argmax(axis=1)
    labels_idx = list(range(len(vocab)))
    prec, rec, f1, support = precision_recall_fscore_support(y_trk, p_trk, labels=labels_idx, zero_division=0)
    present = [i for i in labels_idx if support[i] > 0]
    out.update({
        f"{prefix}_segments": int(len(y_seg)),
        f"{prefix}_tracks": int(len(y_trk)),
        f"{prefix}_segment_accuracy": float(accuracy_score(y_seg, p_seg)),
        f"{prefix}_segment_macro_f1": float(f1_score(y_seg, p_seg, labels=sorted(set(y_seg)), average="macro", zero_division=0)),
        f"{prefix}_track_accuracy": float(accuracy_score(y_trk, p_trk)),
        f"{prefix}_macro_f1": float(f1_score(y_trk, p_trk, labels=present, average="macro", zero_division=0)),
        f"{prefix}_per_class": {
            vocab[i]: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]), "tracks": int(support[i])}
            for i in labels_idx},
        f"{prefix}_confusion": {"labels": vocab,
                                "matrix": confusion_matrix(y_trk, p_trk, labels=labels_idx).tolist(),
                                "rows": "true label", "columns": "predicted label", "unit": "tracks"},
    })
    out[f"{prefix}_track_macro_f1"] = out[f"{prefix}_macro_f1"]  # explicit alias: macro F1 is over tracks
    return out


def evaluate_predictor(predictor: Predictor, dataset: Dataset, splits: dict[str, Sequence[str]],
                       keep: dict[str, tuple] | None = None) -> dict[str, Any]:
    """Metrics for each named group of tracks (``{"val": [...], "test": [...]}``).

    On the ``val`` group also: track accuracy when each track is scored on K evenly spaced
    segments (``val_track_accuracy_by_k``) and the K classify should use
    (``classify_max_segments``, :func:`genrecls.models.selection.choose_k`): chosen on validation
    tracks, never on test tracks.  Once K is chosen, every later group also gets its track
    accuracy at that K (``test_track_accuracy_at_classify_k``: what ``genrecls classify``
    gives with the run's default K, beside ``test_track_accuracy`` on every segment).

    ``keep``: a dict that receives, per group, what was scored (segment track ids, segment
    indices, labels, probabilities), for the answers (:func:`genrecls.models.answers.record_answers`).
    """
    from genrecls.models.selection import accuracy_by_k, choose_k

    metrics: dict[str, Any] = {"track_rule": TRACK_RULE, "labels": list(predictor.labels)}
    for name, ids in splits.items():
        index: list[int] = []
        tids, labels, probs = score_segments(predictor, dataset, ids, segment_index=index)
        if keep is not None:
            keep[name] = (tids, index, labels, probs)
        metrics.update(split_metrics(name, predictor.labels, tids, labels, probs))
        if not tids:
            continue
        if name == "val":
            by_k = accuracy_by_k(tids, index, labels, probs, predictor.labels)
            metrics["val_track_accuracy_by_k"] = by_k
            metrics["classify_max_segments"] = choose_k(by_k, metrics["val_tracks"])
        elif "classify_max_segments" in metrics:
            at_k = accuracy_by_k(tids, index, labels, probs, predictor.labels, ks=(metrics["classify_max_segments"],))
            metrics[f"{name}_track_accuracy_at_classify_k"] = at_k[0]["track_accuracy"]
    return metrics


def evaluate_run(run: str | Location, dataset: str | Location | None = None, *, all_tracks: bool = False,
                 engine: str = "auto", precision: str = "auto") -> dict[str, Any]:
    """Score a run folder's model.

    Parameters
    ----------
    run : a run folder written by :func:`genrecls.jobs.training.train`.
    dataset : None to re-score the run's own validation and test splits (on the dataset it
        was trained on, at the index version it was trained on: ``run.json``'s ``dataset_version``);
        or another dataset (its newest version).  On another dataset the ``test`` figures cover
        every labelled track the run neither trained nor validated on (matched by
        ``track_id``; tracks whose label the model does not know are left out and counted),
        or every labelled track with ``all_tracks=True``.
    all_tracks : score every labelled track of ``dataset`` (even tracks the run trained on).
    engine, precision : the inference engine's runtime and precision (``inference.*``), as classify runs it.

    Returns
    -------
    dict of metrics (``test_track_accuracy``... and ``scope``, which says what was scored).
    """
    from genrecls.storage.split import as_mapping, read_splits

    loc = run if isinstance(run, Location) else Location.parse(run)
    info = read_run_info(loc)
    if not loc.exists("splits.parquet"):
        raise EvaluationError(f"{loc.uri} has no splits.parquet; is it a run written by 'genrecls train'?")
    assignment = read_splits(loc.uri)
    assigned = as_mapping(assignment)
    own = dataset is None
    if own:
        dataset = info.get("dataset")
        if not dataset:
            raise EvaluationError(f"{loc.uri} does not record its dataset; pass one")
    if own and info.get("dataset_version") is not None and not isinstance(dataset, Dataset):
        # exactly the version the run was trained on (readable while genrecls vacuum keeps it)
        ds = Dataset(dataset, version=int(info["dataset_version"]))
    else:
        ds = Dataset(dataset) if not isinstance(dataset, Dataset) else dataset
    if not ds.exists():
        raise DatasetError(f"{ds.uri} is not a genrecls dataset (no manifest.json)"
                           + (" (the run's dataset moved or was deleted? pass --dataset)" if own else ""))
    predictor = Predictor(loc, engine=engine, precision=precision)
    check_same_features(predictor.features, ds.feature_config(), subject=ds.uri, than="the run",
                        names=("run", "dataset"), remedy="re-ingest it with the run's config.json", error=EvaluationError)
    tracks = ds.tracks()
    vocab = set(predictor.labels)
    scope: dict[str, Any] = {"dataset": ds.uri, "dataset_version": ds.version, "track_rule": TRACK_RULE}
    if own and not all_tracks:
        groups = {s: [t for t, e in tracks.items() if assigned.get(t) == s and e.label in vocab] for s in ("val", "test")}
        scope["tracks"] = "the run's validation and test splits"
    else:
        labelled = {t: e for t, e in tracks.items() if e.label}
        unknown = [t for t, e in labelled.items() if e.label not in vocab]
        if all_tracks:
            chosen = [t for t, e in labelled.items() if e.label in vocab]
            scope["tracks"] = "every labelled track of the dataset (including tracks the run trained on)"
            scope["seen_by_run"] = sum(1 for t in chosen if assigned.get(t) in ("train", "val"))
        else:
            chosen = [t for t, e in labelled.items() if e.label in vocab and assigned.get(t) not in ("train", "val")]
            scope["tracks"] = "every labelled track the run did not train or validate on"
            scope["excluded_seen"] = sum(1 for t, e in labelled.items() if e.label in vocab and assigned.get(t) in ("train", "val"))
        scope["excluded_unknown_label"] = len(unknown)
        if unknown:
            scope["unknown_labels"] = sorted({labelled[t].label for t in unknown})
        groups = {"test": chosen}
    if not any(groups.values()):
        raise EvaluationError(f"no track of {ds.uri} can be scored ({scope['tracks']}): nothing matches the run's labels "
                              f"{sorted(vocab)}")
    scored: dict[str, tuple] = {}
    metrics = evaluate_predictor(predictor, ds, groups, keep=scored)
    metrics["scope"] = scope
    metrics["model_id"] = info.get("model_id")
    metrics["engine"] = predictor.describe()
    if info.get("cross_validation"):  # the run's out-of-fold figures, as training recorded them
        metrics["cross_validation"] = info["cross_validation"]
    if info.get("answers"):  # the run's answer rules, as classify applies them, on these test tracks
        from genrecls.models.answers import answer_metrics_for_run

        metrics.update(answer_metrics_for_run(loc, info, {"test": scored.get("test", ([],))}))
        if (info.get("cross_validation") or {}).get("answers"):
            metrics["answers"]["oof"] = info["cross_validation"]["answers"]
    return metrics


def run_metrics(run: str | Location, dataset: str | Location | None = None, *, rescore: bool = False,
                all_tracks: bool = False, engine: str = "auto", precision: str = "auto") -> dict[str, Any]:
    """A run's metrics (``genrecls evaluate``): those it recorded, or scored anew.

    With ``dataset``, ``rescore`` or ``all_tracks`` the model is scored again
    (:func:`evaluate_run`); otherwise ``RUN/metrics.json`` is read (a run that did not
    finish has none: the message says how to resume it).
    """
    loc = run if isinstance(run, Location) else Location.parse(run)
    if dataset or rescore or all_tracks:
        return evaluate_run(loc, dataset, all_tracks=all_tracks, engine=engine, precision=precision)
    if not loc.exists("metrics.json"):
        raise FileNotFoundError(f"{loc.uri} has no metrics.json (not a finished run?); "
                                "resume it with 'genrecls train DATASET --resume RUN'")
    return loc.read_json("metrics.json")


def write_metrics(path: str, metrics: dict[str, Any]) -> None:
    """Write ``metrics`` as JSON to the local file ``path`` (atomically)."""
    import os

    Location.parse(os.path.dirname(os.path.abspath(path))).write_json(os.path.basename(path), metrics)


def format_metrics(metrics: dict[str, Any]) -> str:
    """The metrics as text: a summary table per split and per-class precision/recall."""
    lines = []
    splits = [s for s in ("train", "val", "oof", "test") if f"{s}_tracks" in metrics]
    rows = []
    for s in splits:
        if not metrics.get(f"{s}_tracks"):
            rows.append((s, 0, 0, "-", "-", "-"))
            continue
        rows.append((s, metrics[f"{s}_tracks"], metrics[f"{s}_segments"],
                     f"{metrics[f'{s}_segment_accuracy']:.3f}", f"{metrics[f'{s}_track_accuracy']:.3f}",
                     f"{metrics[f'{s}_macro_f1']:.3f}"))
    lines.append(format_table(rows, ("split", "tracks", "segments", "segment acc", "track acc", "track macro F1")))
    for s in splits:
        per = metrics.get(f"{s}_per_class")
        if not per:
            continue
        lines.append("")
        lines.append(f"{s} per class (tracks):")
        lines.append(format_table([(l, v["tracks"], f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}")
                                   for l, v in per.items()], ("label", "tracks", "precision", "recall", "F1")))
    cv = metrics.get("cross_validation")
    if cv:  # a frozen head's choices, made by cross-validation (genrecls.models.selection)
        acc = cv.get("track_accuracy") or {}
        lines.append("")
        lines.append(f"cross-validation: {cv['folds']} folds of {cv['tracks']} training + validation tracks "
                     f"({cv.get('oof_tracks', cv['tracks'])} scored out-of-fold; grouped by {cv.get('group')}: "
                     f"{cv.get('grouped_tracks', 0)} tracks in {cv.get('groups', 0)} groups); out-of-fold track accuracy "
                     f"{acc.get('oof', float('nan')):.3f}"
                     + (f", across folds {acc['min']:.3f}-{acc['max']:.3f} (mean {acc['mean']:.3f}, sd {acc['sd']:.3f})"
                        if acc.get("min") is not None else ""))
    if metrics.get("answers"):  # calibration, uncertain and per-genre thresholds (genrecls.models.answers)
        from genrecls.models.answers import format_answers

        lines.append("")
        lines.append(format_answers(metrics["answers"]))
    scope = metrics.get("scope")
    lines.append("")
    lines.append(metrics.get("track_rule", TRACK_RULE))
    if scope:
        lines.append(f"scored: {scope.get('tracks')} of {scope.get('dataset')}")
        for k in ("excluded_seen", "excluded_unknown_label", "seen_by_run"):
            if scope.get(k):
                lines.append(f"  {k.replace('_', ' ')}: {scope[k]}" + (f" {scope['unknown_labels']}" if k == "excluded_unknown_label" else ""))
    return "\n".join(lines)
