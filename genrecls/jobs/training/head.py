"""A frozen-backbone ``musicnn`` run: a linear head chosen on validation tracks, then refit (issue 20).

The driver (:func:`genrecls.jobs.training.train`) hands a frozen-backbone plan here instead of
to Ray Train.  Everything runs in the run's Ray session:

1. **Embeddings** of every segment of the training, validation and test tracks come from the
   dataset's embedding store (``DATASET/embeddings/``, :mod:`genrecls.storage.embeddings`),
   read by Ray tasks (a few parts each); no backbone runs for them.  Tracks the store lacks (a dataset ingested
   with ``ingest.embeddings = "off"`` or before the store existed, tracks added by an ingest
   running now) and every track when the store was computed by another backbone or from other
   features (refused, named in the report) are embedded here, from their stored segments, by
   Ray tasks (one :class:`~genrecls.models.engine.BackboneEngine` per worker process, its
   threads the CPUs Ray gave the task, ``inference.engine`` and ``inference.precision``).  They are used, not stored: ``train`` holds the run's lock,
   not the dataset's, so it never writes the dataset folder (another ingest may be writing it,
   it may be read-only); ``genrecls ingest`` on the dataset fills the store from the shards
   (no decoding), and the next ``train`` reads it.
2. **Selection on validation tracks** (:mod:`genrecls.models.selection`): every candidate
   embedding (``train.head_candidates``) at every strength (``train.head_c``) is fit on the
   training tracks (a multinomial logistic regression after standardisation, L-BFGS; one Ray
   task per candidate, its strengths as a warm-started path) and scored per validation track;
   the best, ties to the simpler.  Classify's K is chosen on the same validation
   probabilities, as for every model.
3. **Refit** (``train.refit``, on by default): the choice is fit again on the training and
   validation tracks together; the test tracks, never seen by 2 or 3, score it.  The report
   gives the test figures of the model before the refit too: the gain of the refit alone.
4. **Export**: ``RUN/model`` (SavedModel) and ``model.keras`` hold the backbone, the chosen
   layers, the standardisation and the head as Keras layers (stored segments in, as every
   model), ``RUN/head.npz`` the head alone (for classify's engine path), ``run.json`` the
   choice and every candidate's validation figures.  A few stored segments are scored by the
   exported model and compared with the head on their stored embeddings (``export_check``).

The training rows: every segment of each track, unless a split holds more than
``train.head_max_rows``: each of its tracks then gives at most the same number of evenly
spaced segments (bounding the driver's memory; each track keeps its weight).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from genrecls.core.config import Config, head_candidate_layers
from genrecls.core.runtime import log
from genrecls.models.selection import HeadSplit
from genrecls.storage.dataset import DatasetError, mel_array
from genrecls.storage.embeddings import EmbeddingStore, EmbeddingStoreError
from genrecls.storage.location import Location
from genrecls.storage.split import as_mapping

from .plan import DatasetCheck, TrainPlan, segment_weights

__all__ = ["train_head", "rows_per_track", "head_embeddings"]

_KEYS = ("track_id", "segment_index")
#: segments scored by the exported model to check it against the head on stored embeddings
EXPORT_CHECK_SEGMENTS = 8


# ---------------------------------------------------------------------------- reading the embeddings

def rows_per_track(n_segments: list[int], max_rows: int) -> int:
    """The most segments each track may give so that the split holds at most ``max_rows`` rows (0: all)."""
    total = sum(n_segments)
    if max_rows <= 0 or total <= max_rows:
        return 0
    lo, hi = 1, max(n_segments)
    while lo < hi:  # the largest k with sum(min(n, k)) <= max_rows (at least 1)
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in n_segments) <= max_rows:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _kept_indices(n: int, k: int) -> np.ndarray:
    from genrecls.models.selection import _pick

    return np.arange(n) if k <= 0 else _pick(n, k)


def _read_parts(dataset_uri: str, parts: dict[str, list[str]], keep: dict[str, list[int]] | None,
                layers: list[str]) -> pa.Table:
    """A Ray task: the rows of the given tracks from the given parts of the store (part -> track ids)."""
    from genrecls.audio.pipeline import one_thread

    with one_thread():
        store = EmbeddingStore(dataset_uri)
        tables = [_select_rows(store.read_part(name, ids, layers), keep) for name, ids in parts.items()]
        return pa.concat_tables([t for t in tables if t.num_rows]) if any(t.num_rows for t in tables) else tables[0]


def _embed_rows(dataset_uri: str, shard: str, track_ids: list[str], keep: dict[str, list[int]] | None,
                engine: str, precision: str, shape: tuple[int, int]) -> tuple[pa.Table, dict[str, Any]]:
    """A Ray task: every backbone layer of the given tracks' stored segments (one shard), as the store would keep
    them; the engine is this worker's (:func:`~genrecls.models.transfer.shared_backbone`, threads from Ray's CPUs)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from genrecls.audio.pipeline import one_thread
    from genrecls.models.engine import BACKBONE_OUTPUTS
    from genrecls.models.transfer import shared_backbone

    with one_thread():
        backbone = shared_backbone(engine, precision)
        loc = Location.parse(dataset_uri)
        pds = pads.dataset([loc.join("shards", shard)], filesystem=loc.fs, format="parquet")
        rows = pds.to_table(columns=["track_id", "segment_index", "mel"], filter=pc.field("track_id").isin(track_ids))
        rows = _select_rows(rows, keep)
        mels = mel_array(rows.column("mel"), tuple(shape), dtype=np.float16)
        out = backbone(mels)
        cols = {"track_id": rows.column("track_id"), "segment_index": rows.column("segment_index")}
        for name, width in BACKBONE_OUTPUTS.items():
            cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(out[name].astype(np.float16).reshape(-1)), width)
        return pa.table(cols), backbone.describe()


def _select_rows(batch: pa.Table, keep: dict[str, list[int]] | None) -> pa.Table:
    """The kept segments of each capped track (``keep``: track -> segment indices; other tracks keep all)."""
    if keep is None or not batch.num_rows:
        return batch
    ids = batch.column("track_id").to_pylist()
    seg = batch.column("segment_index").to_pylist()
    sets = {t: set(keep[t]) for t in set(ids) if t in keep}
    mask = np.array([t not in sets or s in sets[t] for t, s in zip(ids, seg)], bool)
    return batch if mask.all() else batch.filter(pa.array(mask))


def head_embeddings(check: DatasetCheck, track_ids: list[str], *, engine: str = "auto", precision: str = "auto",
                    max_rows: dict[str, int] | None = None, groups: dict[str, list[str]] | None = None,
                    cluster_cpus: float = 1.0) -> tuple[pa.Table, dict[str, Any]]:
    """Every backbone layer of the tracks' segments, read by Ray tasks: from the dataset's embedding store where
    it serves a track, else computed from the stored segments (not written back).

    ``groups`` with ``max_rows`` (group name -> at most this many rows) caps each group's rows
    (:func:`rows_per_track`).  Returns a table (``track_id``, ``segment_index``, one float16 list
    column per layer) and a record: what was read, computed, and why.
    """
    import ray

    from genrecls.models.engine import BACKBONE_OUTPUTS, backbone_id

    ds = check.dataset
    index = ds.tracks()
    want = {t: (index[t].fingerprint, index[t].n_segments) for t in track_ids}
    keep: dict[str, list[int]] | None = None
    caps: dict[str, int] = {}
    for name, ids in (groups or {}).items():
        k = rows_per_track([want[t][1] for t in ids], (max_rows or {}).get(name, 0))
        caps[name] = k
        if k:
            keep = keep or {}
            keep.update({t: _kept_indices(want[t][1], k).tolist() for t in ids if want[t][1] > k})
    store = EmbeddingStore(ds)
    bid = backbone_id()
    record: dict[str, Any] = {"store": store.uri, "backbone": bid, "rows_per_track_cap": caps}
    valid = {}
    try:
        described = store.check(bid, check.features, BACKBONE_OUTPUTS)
        valid = store.valid_for(want) if described else {}
        record["store_engines"] = (described or {}).get("engines", [])
    except EmbeddingStoreError as exc:
        record["store_refused"] = str(exc)
        log.warning("the embedding store is not used: %s", exc)
    missing = sorted(set(want) - set(valid))
    record.update({"tracks": len(want), "stored_tracks": len(valid), "computed_tracks": len(missing)})
    keep_ref = ray.put(keep)
    tables = []
    t0 = time.monotonic()
    if valid:
        by_part: dict[str, list[str]] = {}
        for t, e in valid.items():
            by_part.setdefault(e.part, []).append(t)
        names = sorted(by_part)
        n_tasks = max(1, min(len(names), 2 * max(1, int(cluster_cpus))))
        read = ray.remote(num_cpus=1, max_retries=2)(_read_parts)
        refs = [read.remote(ds.uri, {n: by_part[n] for n in names[i::n_tasks]}, keep_ref, list(BACKBONE_OUTPUTS))
                for i in range(n_tasks)]
        tables += [t for t in ray.get(refs) if t.num_rows]
    record["read_seconds"] = round(time.monotonic() - t0, 2)
    stored_rows = sum(t.num_rows for t in tables)
    t0 = time.monotonic()
    if missing:
        per_shard: dict[str, list[str]] = {}
        for t in missing:
            per_shard.setdefault(index[t].shard, []).append(t)
        embed = ray.remote(num_cpus=1, max_retries=2)(_embed_rows)
        shape = tuple(check.features.mel_shape)
        refs = [embed.remote(ds.uri, shard, ids[i:i + 16], keep_ref, engine, precision, shape)
                for shard, ids in sorted(per_shard.items()) for i in range(0, len(ids), 16)]
        engines: list[dict[str, Any]] = []
        for table, engine_used in ray.get(refs):
            if table.num_rows:
                tables.append(table)
            if engine_used not in engines:
                engines.append(engine_used)
        record["computed_engines"] = engines
        record["computed_segments"] = int(sum(t.num_rows for t in tables) - stored_rows)
    record["compute_seconds"] = round(time.monotonic() - t0, 2)
    schema = pa.schema([pa.field("track_id", pa.string()), pa.field("segment_index", pa.int32())]
                       + [pa.field(n, pa.list_(pa.float16(), w)) for n, w in BACKBONE_OUTPUTS.items()])
    tables = [t.select(schema.names).cast(schema) for t in tables]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    got = set(table.column("track_id").to_pylist())
    lost = sorted(set(want) - got)
    if lost:
        raise DatasetError(f"{len(lost)} track(s) of the run have no segment in {ds.uri} (changed since the run "
                           f"started? e.g. {lost[0]}); train again")
    return table, record


def _split_rows(table: pa.Table, ids: list[str], label_of: dict[str, str], labels: list[str],
                weight_of: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> HeadSplit:
    """The rows of one split's tracks as a HeadSplit (sorted by track and segment; non-finite rows dropped)."""
    import pyarrow.compute as pc

    from genrecls.models.engine import BACKBONE_OUTPUTS
    from genrecls.storage.embeddings import layer_array

    sub = table.filter(pc.is_in(table.column("track_id"), pa.array(sorted(ids), pa.string())))
    tids = sub.column("track_id").to_numpy(zero_copy_only=False).astype(str)
    seg = sub.column("segment_index").to_numpy().astype(np.int64)
    order = np.lexsort((seg, tids))
    tids, seg = tids[order], seg[order]
    layers = {n: layer_array(sub.column(n), np.float16)[order] for n in BACKBONE_OUTPUTS}
    finite = np.ones(len(tids), bool)
    for v in layers.values():
        finite &= np.isfinite(v).all(axis=1)
    if not finite.all():
        log.warning("%d segment(s) with non-finite embeddings left out", int((~finite).sum()))
        tids, seg = tids[finite], seg[finite]
        layers = {n: v[finite] for n, v in layers.items()}
    track_ids = sorted(set(tids.tolist()))
    pos = {t: i for i, t in enumerate(track_ids)}
    track = np.fromiter((pos[t] for t in tids), np.int64, count=len(tids))
    index = {l: i for i, l in enumerate(labels)}
    y = np.fromiter((index[label_of[t]] for t in tids), np.int64, count=len(tids))
    return HeadSplit(layers=layers, y=y, track=track, track_ids=track_ids, segment_index=seg,
                     weights=weight_of(tids, y))


def _weights(tids: np.ndarray, y: np.ndarray, labels: list[str], label_of: dict[str, str], cfg: Config) -> np.ndarray:
    """Each row's loss weight: every track the same (train.track_weights), every label the same (train.class_weights),
    counted over the rows actually fit; mean 1."""
    if not len(tids):
        return np.zeros(0, np.float32)
    t = cfg.train
    if t.track_weights:
        counts: dict[str, int] = {}
        for v in tids.tolist():
            counts[v] = counts.get(v, 0) + 1
        tracks = [{"track_id": k, "label": label_of[k], "n_segments": n} for k, n in counts.items()]
        w = segment_weights(tracks, {k: "train" for k in counts}, t.class_weights)
        return np.fromiter((w[v] for v in tids.tolist()), np.float32, count=len(tids))
    if t.class_weights:
        n = np.bincount(y, minlength=len(labels)).astype(np.float64)
        per = n.sum() / (len(labels) * np.maximum(n, 1))
        return per[y].astype(np.float32)
    return np.ones(len(tids), np.float32)


# ---------------------------------------------------------------------------- the run

def train_head(check: DatasetCheck, cfg: Config, plan: TrainPlan, run: Location, table, *,
               say: Callable[[str], None], cluster_cpus: float, t_start: float) -> dict[str, Any]:
    """Choose, refit, export and evaluate a frozen-backbone head (see the module docstring); the run's summary."""
    import ray

    from genrecls.models.evaluation import TRACK_RULE, split_metrics
    from genrecls.models.selection import (
        HEAD_RULE,
        accuracy_by_k,
        choose_head,
        choose_k,
        fit_linear,
        softmax_probabilities,
        standardisation,
    )
    from genrecls.models.transfer import LinearHead

    timings: dict[str, float] = {}
    t0 = time.monotonic()
    labels = list(plan.labels)
    assignment = as_mapping(table)
    label_of = {t["track_id"]: t["label"] for t in check.tracks}
    ids = {s: sorted(t for t, v in assignment.items() if v == s and t in label_of) for s in ("train", "val", "test")}
    caps = {"train": cfg.train.head_max_rows, "val": cfg.train.head_max_rows, "test": cfg.train.head_max_rows}
    rows, emb = head_embeddings(check, ids["train"] + ids["val"] + ids["test"], engine=cfg.inference.engine,
                                precision=cfg.inference.precision, max_rows=caps, groups=ids, cluster_cpus=cluster_cpus)
    timings["embeddings"] = time.monotonic() - t0
    say(f"embeddings of {emb['tracks']} tracks: {emb['stored_tracks']} from the store, {emb['computed_tracks']} computed "
        f"({timings['embeddings']:.1f} s)" + (f"; store not used: {emb['store_refused']}" if "store_refused" in emb else ""))

    def weight_of(tids, y):
        return _weights(tids, y, labels, label_of, cfg)

    splits = {s: _split_rows(rows, ids[s], label_of, labels, weight_of) for s in ("train", "val", "test")}
    del rows
    train, val, test = splits["train"], splits["val"], splits["test"]

    # -- selection on the validation tracks: one Ray task per candidate, its strengths as a path
    t1 = time.monotonic()
    candidates = [(c, head_candidate_layers(c)) for c in cfg.train.head_candidates]
    widths = {n: train.layers[n].shape[1] for n in train.layers}
    order = sorted(candidates, key=lambda c: -sum(widths[n] for n in c[1]))  # the largest first: they take longest
    fit = ray.remote(num_cpus=1, max_retries=1)(_fit_task)
    train_ref, val_ref = ray.put(train), ray.put(val)
    refs = {name: fit.remote(train_ref, val_ref, name, layers, cfg.train.head_c, len(labels)) for name, layers in order}
    results = {name: ray.get(ref) for name, ref in refs.items()}
    del train_ref, val_ref
    records = [r for name, _ in candidates for r in results[name]]
    chosen = choose_head(records)
    timings["selection"] = time.monotonic() - t1
    say(f"head chosen on {len(val.track_ids)} validation tracks: {chosen['candidate']} ({chosen['dims']} dims), "
        f"C={chosen['c']:g}, validation track accuracy {chosen['val_track_accuracy']:.3f} "
        f"({len(records)} fits, {timings['selection']:.1f} s)")
    layers = tuple(chosen["layers"])

    def probs_of(split: HeadSplit, mean, std, w, b) -> np.ndarray:
        return softmax_probabilities((split.matrix(layers) - mean) / std, w, b)

    def rows_of(split: HeadSplit):
        tids = [split.track_ids[i] for i in split.track]
        return tids, [label_of[t] for t in tids]

    # validation figures and classify's K: the model fit on the training tracks alone
    val_probs = probs_of(val, chosen["mean"], chosen["std"], chosen["weights"], chosen["bias"])
    vt, vl = rows_of(val)
    metrics: dict[str, Any] = {"track_rule": TRACK_RULE, "labels": labels}
    metrics.update(split_metrics("val", labels, vt, vl, val_probs))
    by_k = accuracy_by_k(vt, val.segment_index.tolist(), vl, val_probs, labels)
    metrics["val_track_accuracy_by_k"] = by_k
    metrics["classify_max_segments"] = k = choose_k(by_k, metrics["val_tracks"])
    tt, tl = rows_of(test)
    before = probs_of(test, chosen["mean"], chosen["std"], chosen["weights"], chosen["bias"])
    before_metrics = split_metrics("test", labels, tt, tl, before)

    # -- the refit: the choice on training and validation tracks together; the test tracks stay unseen
    t2 = time.monotonic()
    if cfg.train.refit:
        both = HeadSplit.join(train, val)
        both.weights = _weights(np.array([both.track_ids[i] for i in both.track]), both.y, labels, label_of, cfg)
        x = both.matrix(layers)
        mean, std = standardisation(x)
        w, b, fit_info, _ = fit_linear((x - mean) / std, both.y, both.weights, chosen["c"], len(labels))
        del x, both
        refit = {"done": True, "on": "training and validation tracks", "tracks": len(train.track_ids) + len(val.track_ids),
                 "segments": len(train) + len(val), **fit_info}
    else:
        mean, std, w, b = chosen["mean"], chosen["std"], chosen["weights"], chosen["bias"]
        refit = {"done": False, "on": "training tracks (train.refit=false)", "tracks": len(train.track_ids),
                 "segments": len(train)}
    timings["refit"] = time.monotonic() - t2
    test_probs = probs_of(test, mean, std, w, b)
    metrics.update(split_metrics("test", labels, tt, tl, test_probs))
    metrics["test_track_accuracy_at_classify_k"] = accuracy_by_k(tt, test.segment_index.tolist(), tl, test_probs, labels,
                                                                 ks=(k,))[0]["track_accuracy"]
    refit.update({"test_track_accuracy_before": before_metrics["test_track_accuracy"],
                  "test_track_accuracy_after": metrics["test_track_accuracy"],
                  "gain": metrics["test_track_accuracy"] - before_metrics["test_track_accuracy"],
                  "test_macro_f1_before": before_metrics["test_macro_f1"]})
    metrics["test_track_accuracy_before_refit"] = before_metrics["test_track_accuracy"]
    metrics["refit"] = refit
    say(f"test track accuracy {metrics['test_track_accuracy']:.3f} ({len(test.track_ids)} tracks; "
        f"{before_metrics['test_track_accuracy']:.3f} before the refit)")

    # -- export
    t3 = time.monotonic()
    selection = {"rule": HEAD_RULE, "chosen": {k2: chosen[k2] for k2 in ("candidate", "layers", "dims", "c")},
                 "val_track_accuracy": chosen["val_track_accuracy"], "val_tracks": len(val.track_ids),
                 "candidates": [_public(r) for r in records], "fit": "scikit-learn LogisticRegression (multinomial, "
                 "L-BFGS) on standardised segment embeddings, loss weights as train.class_weights/track_weights say"}
    head = LinearHead(labels=tuple(labels), layers=layers, mean=mean, std=std, weights=w, bias=b,
                      info={"candidate": chosen["candidate"], "c": chosen["c"], "backbone": emb["backbone"],
                            "fit_on": refit["on"], "dataset": check.dataset.uri})
    # classify's answer rules (calibration, 'uncertain', thresholds: genrecls.models.answers) are chosen on the
    # validation tracks' scores of the head fit without them, and measured on the test tracks with the final head
    scored = {"val": (vt, val.segment_index.tolist(), vl, val_probs), "test": (tt, test.segment_index.tolist(), tl, test_probs)}
    info, summary_extra = _export(run, check, cfg, plan, head, metrics, selection, refit, emb, splits, timings, scored)
    timings["export"] = time.monotonic() - t3
    metrics.update({
        "model_id": info["model_id"], "model": plan.model, "dataset": check.dataset.uri,
        "tracks_per_split": plan.tracks_per_split, "segments_per_split": plan.segments_per_split,
        "best_epoch": None, "epochs_run": 0, "train_accuracy_last_epoch": None,
        "head": selection["chosen"],
        # what scored: the backbone's layers as stored (or computed here) and the head in NumPy
        "engine": {**((emb.get("store_engines") or emb.get("computed_engines") or [{}])[0]),
                   "embeddings": "stored" if not emb["computed_tracks"] else
                   ("computed in this run" if not emb["stored_tracks"] else "stored and computed in this run"),
                   "head": "numpy"},
        "scope": {"dataset": check.dataset.uri, "tracks": "the run's validation and test splits",
                  "val": "the head fit on the training tracks (before the refit)",
                  "test": "the final head" + (" (refit on training and validation tracks)" if refit["done"] else "")},
    })
    run.write_json("metrics.json", metrics)
    from genrecls.models.plots import plot_confusion, plot_selection

    plot_selection(records, run, chosen=chosen, title=f"{info['model_id']}: head selection on validation tracks")
    plot_confusion(metrics["test_confusion"]["matrix"], labels, run,
                   title=f"test confusion matrix ({metrics['test_tracks']} tracks)")
    wall = time.monotonic() - t_start
    summary = {"run": run.uri, "model_id": info["model_id"], "metrics": metrics, "history": [], "epochs_run": 0,
               "best_epoch": None, "stopped_early": False, "train_seconds": timings["selection"] + timings["refit"],
               "wall_seconds": wall, "restarts": [], "versions": info["versions"], "notes": plan.notes,
               "selection": selection, "refit": refit, "embeddings": emb, **summary_extra,
               "timings": {k2: round(v, 2) for k2, v in timings.items()}}
    from .report import format_head_report

    run.write_text("report.md", format_head_report(summary, plan, cfg, info))
    return summary


def _fit_task(train: HeadSplit, val: HeadSplit, candidate: str, layers, cs, n_labels: int) -> list[dict[str, Any]]:
    """A Ray task: one candidate's path of strengths (:func:`~genrecls.models.selection.fit_candidate`), with one
    thread in every native pool: the task holds one CPU, and BLAS threads of two tasks on two cores would fight
    (OpenBLAS spins: 10x the CPU time, measured on the real set)."""
    from genrecls.audio.pipeline import one_thread
    from genrecls.models.selection import fit_candidate

    with one_thread():
        return fit_candidate(train, val, candidate, layers, cs, n_labels)


def _public(r: dict[str, Any]) -> dict[str, Any]:
    """A candidate's record without its arrays (run.json, history.json)."""
    return {k: v for k, v in r.items() if k not in ("mean", "std", "weights", "bias")}


def _export(run: Location, check: DatasetCheck, cfg: Config, plan: TrainPlan, head, metrics: dict[str, Any],
            selection: dict[str, Any], refit: dict[str, Any], emb: dict[str, Any], splits: dict[str, HeadSplit],
            timings: dict[str, float], scored: dict[str, tuple]) -> tuple[dict[str, Any], dict[str, Any]]:
    """RUN/model, model.keras, model.onnx, head.npz, run.json (with the answer rules), normalisation.json,
    history.json; the export check.  Adds the answer rules' figures to ``metrics``."""
    from dataclasses import replace

    from genrecls.core.provenance import library_versions
    from genrecls.models.inference import Predictor, export_model
    from genrecls.models.networks import import_tensorflow, model_summary
    from genrecls.models.transfer import HEAD_FILE, MAX_BATCH, build_head_classifier, head_probabilities, save_head

    import_tensorflow()
    model = build_head_classifier(head)
    versions = library_versions()
    embeddings = {"backbone": emb["backbone"], "tracks": emb["tracks"], "from_store": emb["stored_tracks"],
                  "computed": emb["computed_tracks"], "store": emb["store"],
                  "store_engines": emb.get("store_engines", []), "computed_engines": emb.get("computed_engines", []),
                  "rows_per_track_cap": emb.get("rows_per_track_cap", {}),
                  **({"store_refused": emb["store_refused"]} if "store_refused" in emb else {})}
    head_record = {"file": HEAD_FILE, "candidate": head.info["candidate"], "layers": list(head.layers),
                   "dims": head.dims, "c": head.info["c"], "backbone": emb["backbone"], "fit_on": refit["on"],
                   "function": "genrecls.models.transfer.head_probabilities(layers, load_head(RUN))"}
    info = export_model(model, run, labels=head.labels, features=check.features, model_name=plan.model, extra={
        "dataset": check.dataset.uri, "dataset_version": check.version,
        "normalisation": {"file": "normalisation.json", "axis": "embedding dimension", "inside_model": True},
        "best_epoch": None, "epochs_run": 0, "versions": versions, "model": model_summary(model),
        "splits": "splits.parquet", "config": "config.json", "max_batch": MAX_BATCH,
        "head": head_record, "selection": selection, "refit": refit, "embeddings": embeddings,
        "classify": {"max_segments": metrics["classify_max_segments"], "chosen_on": "validation tracks",
                     "val_track_accuracy_by_k": metrics["val_track_accuracy_by_k"]}})
    head = replace(head, info={**head.info, "model_id": info["model_id"], "labels_order": "output order"})
    save_head(head, run)
    run.write_json("normalisation.json", {"mean": head.mean.tolist(), "std": head.std.tolist(),
                                          "axis": "embedding dimension", "layers": list(head.layers),
                                          "units": f"musicnn {head.info['candidate']} embedding",
                                          "computed_on": refit["on"], "values": refit["segments"]})
    run.write_json("history.json", [_public(r) for r in selection["candidates"]])
    # the export check: stored segments through the exported model against the head on their stored embeddings
    t = time.monotonic()
    split = splits["test"] if len(splits["test"]) else splits["val"]
    pick = np.linspace(0, len(split) - 1, min(EXPORT_CHECK_SEGMENTS, len(split))).round().astype(int)
    check_record: dict[str, Any] = {"segments": int(len(pick))}
    if len(pick):
        want = {(split.track_ids[split.track[i]], int(split.segment_index[i])): i for i in pick}
        import pyarrow.compute as pc

        seg = check.dataset.read_segments(columns=["track_id", "segment_index", "mel"],
                                          filter=pc.field("track_id").isin(sorted({k[0] for k in want})))
        keys = list(zip(seg.column("track_id").to_pylist(), seg.column("segment_index").to_pylist()))
        rows = [j for j, key in enumerate(keys) if key in want]
        mels = mel_array(seg.take(pa.array(rows)).column("mel"), check.features.mel_shape)
        predictor = Predictor(run, engine=cfg.inference.engine, precision=cfg.inference.precision)
        exported = predictor.predict(mels)
        check_record["engine"] = predictor.describe()
        stored = head_probabilities({n: v[[want[keys[j]] for j in rows]] for n, v in split.layers.items()}, head)
        diff = float(np.abs(exported - stored).max())
        check_record.update({"max_abs_difference": diff,
                             "top_label_equal": int((exported.argmax(1) == stored.argmax(1)).sum()),
                             "what": "the exported model (model.onnx on the inference engine) on stored segments vs "
                                     "the head on their stored embeddings"})
        if diff > 0.1:
            log.warning("the exported model and the head on stored embeddings differ by %.3f", diff)
    timings["export_check"] = time.monotonic() - t
    info["export_check"] = check_record
    from genrecls.models.answers import record_answers

    metrics.update(record_answers(run, info, scored, cfg.classify))
    run.write_json("run.json", info)
    return info, {"export_check": check_record}
