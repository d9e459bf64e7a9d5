"""A frozen-backbone ``musicnn`` run: every choice made by cross-validation, the head fit once (issues 20, 27).

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
2. **Cross-validation** of the training and validation tracks together (``train.cv_folds``
   folds, :func:`genrecls.storage.split.assign_folds`: stratified by label, albums whole, the
   split's grouping): every candidate embedding (``train.head_candidates``) at every strength
   (``train.head_c``) is fit on the other folds and scores each fold's tracks
   (:func:`genrecls.models.selection.cross_validate_candidate`; one Ray task per candidate).  A
   first round fits each track on ``train.cv_screen_segments`` evenly spaced segments; the
   ``train.cv_finalists`` best pairs are cross-validated again on every segment, and the best of
   them is chosen (:data:`~genrecls.models.selection.CV_HEAD_RULE`).  Its out-of-fold scores,
   every training and validation track's, choose classify's K, the calibration (kept only when
   it lowers the NLL of folds it was not fit on) and the thresholds
   (:func:`genrecls.models.answers.record_answers`).
3. **The final head**: the choice fit once on the training and validation tracks (``train.refit``,
   on by default; off: on the training split alone); the test tracks, never seen by 2 or 3,
   score it.  The report gives the test figures of the head fit on the training split alone too.
4. **Export**: ``RUN/model`` (SavedModel) and ``model.keras`` hold the backbone, the chosen
   layers, the standardisation and the head as Keras layers (stored segments in, as every
   model), ``RUN/head.npz`` the head alone (for classify's engine path), ``run.json`` the
   choice, every candidate's out-of-fold figures and the cross-validation's spread across folds.
   A few stored segments are scored by the exported model and compared with the head on their
   stored embeddings (``export_check``).

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

from .plan import DatasetCheck, TrainPlan, labels_record, segment_weights

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
    """Cross-validate, fit, export and evaluate a frozen-backbone head (see the module docstring); the run's summary."""
    import ray

    from genrecls.models.evaluation import TRACK_RULE, split_metrics
    from genrecls.models.selection import (
        CV_HEAD_RULE,
        accuracy_by_k,
        choose_head_cv,
        choose_k,
        finalists,
        fold_spread,
        softmax_probabilities,
        track_means,
    )
    from genrecls.models.transfer import LinearHead
    from genrecls.storage.split import assign_folds, split_notes

    timings: dict[str, float] = {}
    t0 = time.monotonic()
    labels = list(plan.labels)
    assignment = as_mapping(table)
    label_of = {t["track_id"]: t["label"] for t in check.tracks}
    ids = {s: sorted(t for t, v in assignment.items() if v == s and t in label_of) for s in ("train", "val", "test")}
    pool_ids = sorted(ids["train"] + ids["val"])
    caps = {"pool": cfg.train.head_max_rows, "test": cfg.train.head_max_rows}
    rows, emb = head_embeddings(check, pool_ids + ids["test"], engine=cfg.inference.engine,
                                precision=cfg.inference.precision, max_rows=caps,
                                groups={"pool": pool_ids, "test": ids["test"]}, cluster_cpus=cluster_cpus)
    timings["embeddings"] = time.monotonic() - t0
    say(f"embeddings of {emb['tracks']} tracks: {emb['stored_tracks']} from the store, {emb['computed_tracks']} computed "
        f"({timings['embeddings']:.1f} s)" + (f"; store not used: {emb['store_refused']}" if "store_refused" in emb else ""))

    def weight_of(tids, y):
        return _weights(tids, y, labels, label_of, cfg)

    pool = _split_rows(rows, pool_ids, label_of, labels, weight_of)
    test = _split_rows(rows, ids["test"], label_of, labels, weight_of)
    del rows

    # -- the folds: the training and validation tracks, albums whole, stratified by label
    group_of = {t["track_id"]: t.get("group") for t in check.tracks}
    fold_of, fold_info = assign_folds([{"track_id": t, "label": label_of[t], "group": group_of.get(t)}
                                       for t in pool.track_ids], folds=cfg.train.cv_folds, seed=cfg.train.seed,
                                      group_column="group",
                                      by_track_labels=split_notes(table).get("labels_split_by_track", []))
    folds = np.array([fold_of[t] for t in pool.track_ids], np.int64)
    k_folds = fold_info["folds"]

    # -- cross-validation: one Ray task per candidate, its strengths as a path, its folds in turn
    t1 = time.monotonic()
    candidates = [(c, head_candidate_layers(c)) for c in cfg.train.head_candidates]
    widths = {n: pool.layers[n].shape[1] for n in pool.layers}
    order = sorted(candidates, key=lambda c: -sum(widths[n] for n in c[1]))  # the largest first: they take longest
    fit = ray.remote(num_cpus=1, max_retries=1)(_cv_task)
    pool_ref, folds_ref = ray.put(pool), ray.put(folds)
    t = cfg.train
    n_pairs = len(candidates) * len(t.head_c)
    screen = t.cv_screen_segments if t.cv_screen_segments and t.cv_finalists < n_pairs else 0

    def cross_validate(grid: list[tuple[str, tuple[str, ...], list[float]]], rows_per_track: int) -> list[dict]:
        refs = {name: fit.remote(pool_ref, folds_ref, name, layers, cs, len(labels), t.track_weights, t.class_weights,
                                 rows_per_track) for name, layers, cs in grid}
        got = {name: ray.get(ref) for name, ref in refs.items()}
        return [r for name, _ in candidates if name in got for r in got[name]]

    first_round: list[dict] = []
    if screen:  # a cheap first round on a few segments per track; the finalists again on every segment
        first_round = cross_validate([(n, ls, list(t.head_c)) for n, ls in order], screen)
        final_pairs = finalists(first_round, t.cv_finalists)
        grid = [(n, ls, sorted(c for n2, c in final_pairs if n2 == n)) for n, ls in order
                if any(n2 == n for n2, _ in final_pairs)]
        records = cross_validate(grid, 0)
    else:
        records = cross_validate([(n, ls, list(t.head_c)) for n, ls in order], 0)
    chosen = choose_head_cv(records)
    timings["selection"] = time.monotonic() - t1
    n_oof = int((folds >= 0).sum())
    say(f"head chosen by {k_folds}-fold cross-validation on {len(pool.track_ids)} training + validation tracks: "
        f"{chosen['candidate']} ({chosen['dims']} dims), C={chosen['c']:g}, out-of-fold track accuracy "
        f"{chosen['oof_track_accuracy']:.3f} on {n_oof} tracks ("
        + (f"{len(first_round)} candidates on {screen} segments per track, the best {len(records)} on every segment"
           if screen else f"{len(records)} candidates") + f", x {k_folds} folds, {timings['selection']:.1f} s)")
    layers = tuple(chosen["layers"])

    def probs_of(split: HeadSplit, mean, std, w, b) -> np.ndarray:
        return softmax_probabilities((split.matrix(layers) - mean) / std, w, b)

    def rows_of(split: HeadSplit, mask=None):
        idx = split.track if mask is None else split.track[mask]
        tids = [split.track_ids[i] for i in idx]
        return tids, [label_of[t] for t in tids]

    # out-of-fold figures and classify's K: every track scored by the head fit without its fold
    scored_rows = folds[pool.track] >= 0
    oof_probs = chosen["oof"][scored_rows]
    ot, ol = rows_of(pool, scored_rows)
    oof_seg = pool.segment_index[scored_rows].tolist()
    metrics: dict[str, Any] = {"track_rule": TRACK_RULE, "labels": labels}
    metrics.update(split_metrics("oof", labels, ot, ol, oof_probs))
    by_k = accuracy_by_k(ot, oof_seg, ol, oof_probs, labels)
    metrics["oof_track_accuracy_by_k"] = by_k
    metrics["classify_max_segments"] = k = choose_k(by_k, metrics.get("oof_tracks", 0))
    tt, tl = rows_of(test)

    final_fit = ray.remote(num_cpus=1, max_retries=1)(_final_fit_task)

    def fit_on(split):  # a Ray task (one thread in every native pool), so that two fits run side by side
        return final_fit.remote(split, layers, chosen["c"], len(labels), t.track_weights, t.class_weights)

    # -- the final head: fit once on the training and validation tracks; the test tracks stay unseen
    t2 = time.monotonic()
    train_only = _subset(pool, set(ids["train"]))
    # the training split alone, for the record (the gain of fitting on the validation tracks too), beside the final fit
    before_ref = fit_on(train_only) if len(test) and len(train_only) else None
    final_ref = fit_on(pool_ref) if cfg.train.refit else None
    before = ray.get(before_ref) if before_ref is not None else None
    if cfg.train.refit:
        mean, std, w, b, fit_info = ray.get(final_ref)
        refit = {"done": True, "on": "training and validation tracks", "tracks": len(pool.track_ids),
                 "segments": len(pool), **fit_info}
    else:
        mean, std, w, b, fit_info = before if before is not None else ray.get(fit_on(train_only))
        refit = {"done": False, "on": "training tracks (train.refit=false)", "tracks": len(train_only.track_ids),
                 "segments": len(train_only), **fit_info}
    timings["refit"] = time.monotonic() - t2
    test_probs = probs_of(test, mean, std, w, b)
    metrics.update(split_metrics("test", labels, tt, tl, test_probs))
    if len(test):
        metrics["test_track_accuracy_at_classify_k"] = accuracy_by_k(tt, test.segment_index.tolist(), tl, test_probs,
                                                                     labels, ks=(k,))[0]["track_accuracy"]
        before_acc = split_metrics("test", labels, tt, tl, probs_of(test, *before[:4]))["test_track_accuracy"]
        refit.update({"test_track_accuracy_before": before_acc,
                      "test_track_accuracy_after": metrics["test_track_accuracy"],
                      "gain": metrics["test_track_accuracy"] - before_acc})
        metrics["test_track_accuracy_before_refit"] = before_acc
        say(f"test track accuracy {metrics['test_track_accuracy']:.3f} ({len(test.track_ids)} tracks never seen by any "
            f"choice; {before_acc:.3f} with the head fit on the training split alone)")
    else:
        say("no test track: every label has fewer than 3 tracks (the out-of-fold figures are the only estimate)")
    metrics["refit"] = refit

    # -- the cross-validation's record: the folds, the spread of the chosen head's figures across them
    truth = {t: labels.index(label_of[t]) for t in pool.track_ids}
    scores_all = track_means(chosen["oof"], pool.track, len(pool.track_ids))
    fold_acc = []
    for f in range(k_folds):
        members = np.flatnonzero(folds == f)
        if len(members):
            fold_acc.append(float(np.mean([scores_all[i].argmax() == truth[pool.track_ids[i]] for i in members])))
    cv = {"folds": k_folds, "requested_folds": cfg.train.cv_folds, "tracks": len(pool.track_ids), "oof_tracks": n_oof,
          "group": ("column " + repr(cfg.train.group_column)) if cfg.train.group_column else cfg.train.group_by,
          "groups": fold_info["groups"], "grouped_tracks": fold_info["grouped_tracks"],
          "labels_folded_by_track": fold_info["labels_folded_by_track"], "never_held_out": fold_info["never_held_out"],
          "tracks_per_fold": fold_info["tracks_per_fold"],
          "track_accuracy": {"oof": chosen["oof_track_accuracy"], **fold_spread(fold_acc)},
          "track_nll": chosen["oof_track_nll"], "rule": CV_HEAD_RULE}
    metrics["cross_validation"] = cv

    # -- export
    t3 = time.monotonic()
    selection = {"rule": CV_HEAD_RULE, "chosen": {k2: chosen[k2] for k2 in ("candidate", "layers", "dims", "c")},
                 "chosen_on": f"{k_folds}-fold cross-validation of the training and validation tracks",
                 "oof_track_accuracy": chosen["oof_track_accuracy"], "oof_track_nll": chosen["oof_track_nll"],
                 "oof_tracks": n_oof, "folds": k_folds,
                 "first_round": {"segments_per_track": screen, "finalists": len(records),
                                 "candidates": [_public(r) for r in first_round]} if screen else None,
                 "candidates": [_public(r) for r in records], "fit": "scikit-learn LogisticRegression (multinomial, "
                 "L-BFGS) on standardised segment embeddings, loss weights as train.class_weights/track_weights say"}
    head = LinearHead(labels=tuple(labels), layers=layers, mean=mean, std=std, weights=w, bias=b,
                      info={"candidate": chosen["candidate"], "c": chosen["c"], "backbone": emb["backbone"],
                            "fit_on": refit["on"], "dataset": check.dataset.uri})
    # classify's answer rules (calibration, 'uncertain', thresholds: genrecls.models.answers) are chosen on the
    # out-of-fold scores of every training and validation track, and measured on the test tracks with the final head
    scored = {"val": (ot, oof_seg, ol, oof_probs), "test": (tt, test.segment_index.tolist(), tl, test_probs)}
    info, summary_extra = _export(run, check, cfg, plan, head, metrics, selection, refit, emb, {"test": test, "val": pool},
                                  timings, scored, {t: f for t, f in fold_of.items() if f >= 0}, cv)
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
        "scope": {"dataset": check.dataset.uri, "tracks": "the run's training + validation tracks (out-of-fold) "
                  "and test split",
                  "oof": f"each training and validation track scored by the head fit on the other {k_folds - 1} folds",
                  "test": "the final head" + (" (fit on training and validation tracks)" if refit["done"] else "")},
    })
    run.write_json("metrics.json", metrics)
    from genrecls.models.plots import plot_confusion, plot_selection

    plot_selection(records, run, chosen=chosen, key="oof_track_accuracy",
                   title=f"{info['model_id']}: head selection ({k_folds}-fold cross-validation)")
    if metrics.get("test_confusion"):
        plot_confusion(metrics["test_confusion"]["matrix"], labels, run,
                       title=f"test confusion matrix ({metrics['test_tracks']} tracks)")
    wall = time.monotonic() - t_start
    summary = {"run": run.uri, "model_id": info["model_id"], "metrics": metrics, "history": [], "epochs_run": 0,
               "best_epoch": None, "stopped_early": False, "train_seconds": timings["selection"] + timings["refit"],
               "wall_seconds": wall, "restarts": [], "versions": info["versions"], "notes": plan.notes,
               "selection": selection, "refit": refit, "embeddings": emb, "cross_validation": cv, **summary_extra,
               "timings": {k2: round(v, 2) for k2, v in timings.items()}}
    from .report import format_head_report

    run.write_text("report.md", format_head_report(summary, plan, cfg, info))
    return summary


def _subset(split: HeadSplit, keep_ids: set[str]) -> HeadSplit:
    """The rows of some of a split's tracks (track indices renumbered)."""
    keep_tracks = [i for i, t in enumerate(split.track_ids) if t in keep_ids]
    new_index = np.full(len(split.track_ids), -1, np.int64)
    new_index[keep_tracks] = np.arange(len(keep_tracks))
    rows = new_index[split.track] >= 0
    return HeadSplit(layers={n: v[rows] for n, v in split.layers.items()}, y=split.y[rows],
                     track=new_index[split.track[rows]], track_ids=[split.track_ids[i] for i in keep_tracks],
                     segment_index=split.segment_index[rows], weights=split.weights[rows])


def _final_fit_task(split: HeadSplit, layers, c: float, n_labels: int, track_weights: bool,
                    class_weights: bool) -> tuple:
    """A Ray task: the chosen head fit on every row of ``split`` (one thread in every native pool, as
    :func:`_cv_task`); ``(mean, std, weights, bias, info)``."""
    from genrecls.audio.pipeline import one_thread
    from genrecls.models.selection import fit_linear, row_weights, standardisation

    with one_thread():
        x = split.matrix(layers)
        mean, std = standardisation(x)
        w8 = row_weights(split.track, split.y, n_labels, track_weights=track_weights, class_weights=class_weights)
        w, b, fit_info, _ = fit_linear((x - mean) / std, split.y, w8, c, n_labels)
        return mean, std, w, b, fit_info


def _cv_task(pool: HeadSplit, folds: np.ndarray, candidate: str, layers, cs, n_labels: int, track_weights: bool,
             class_weights: bool, rows_per_track: int = 0) -> list[dict[str, Any]]:
    """A Ray task: one candidate's strengths across every fold (:func:`~genrecls.models.selection.cross_validate_candidate`),
    with one thread in every native pool: the task holds one CPU, and BLAS threads of two tasks on two cores would
    fight (OpenBLAS spins: 10x the CPU time, measured on the real set)."""
    from genrecls.audio.pipeline import one_thread
    from genrecls.models.selection import cross_validate_candidate

    with one_thread():
        return cross_validate_candidate(pool, folds, candidate, layers, cs, n_labels, track_weights=track_weights,
                                        class_weights=class_weights, fit_rows_per_track=rows_per_track)


def _public(r: dict[str, Any]) -> dict[str, Any]:
    """A candidate's record without its arrays (run.json, history.json)."""
    return {k: v for k, v in r.items() if k not in ("mean", "std", "weights", "bias", "oof")}


def _export(run: Location, check: DatasetCheck, cfg: Config, plan: TrainPlan, head, metrics: dict[str, Any],
            selection: dict[str, Any], refit: dict[str, Any], emb: dict[str, Any], splits: dict[str, HeadSplit],
            timings: dict[str, float], scored: dict[str, tuple], folds: dict[str, int],
            cv: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
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
        "dataset": check.dataset.uri, "dataset_version": check.version, "labels_from": labels_record(check),
        "normalisation": {"file": "normalisation.json", "axis": "embedding dimension", "inside_model": True},
        "best_epoch": None, "epochs_run": 0, "versions": versions, "model": model_summary(model),
        "splits": "splits.parquet", "config": "config.json", "max_batch": MAX_BATCH,
        "head": head_record, "selection": selection, "refit": refit, "embeddings": embeddings,
        "cross_validation": cv,
        "classify": {"max_segments": metrics["classify_max_segments"], "chosen_on": "out-of-fold tracks",
                     "oof_track_accuracy_by_k": metrics["oof_track_accuracy_by_k"]}})
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

    metrics.update(record_answers(run, info, scored, cfg.classify, folds=folds))
    cv["answers"] = (metrics.get("answers") or {}).get("oof")
    run.write_json("run.json", info)
    return info, {"export_check": check_record}
