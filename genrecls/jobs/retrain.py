"""Scheduled retraining: incremental ingest, a challenger, a fair comparison, promotion.

``retrain(source, dataset, registry)`` is safe to run from cron or any scheduler:

1. takes the registry's lock (a second retrain stops at once with a clear message); Ray starts at most
   once for the whole cycle (:func:`~genrecls.core.runtime.one_ray_session`), when a step first needs it;
2. ingests new and changed tracks incrementally and prunes vanished ones from the dataset (its
   embedding store too: only the new and changed tracks are embedded), and compacts the dataset
   when it has ``retrain.compact_shards`` small shards or more (``genrecls compact``);
3. if the dataset is unchanged since the champion was trained, stops (``unchanged``);
4. trains a challenger into a temporary folder, holding every known track to the split it
   had (the registry's ``splits.parquet``), so the holdout stays fixed as the library grows;
5. scores the champion and the challenger on the same holdout (from the dataset's stored embeddings and
   each run's head when both are frozen-backbone heads, so no backbone runs; else each exported
   model on the stored segments) and promotes the challenger
   only if it is **strictly** better: ``challenger > champion + retrain.min_improvement`` on
   ``retrain.metric`` (margin 0.0 by default: a tie keeps the champion);
6. records the decision.  A run that dies before the end leaves the registry unchanged.

The holdout is the test split of the current dataset (the registry's fixed assignment),
restricted to the tracks whose label **both** models know: when the library gains a label,
the champion cannot predict it, so its tracks are left out of both scores; the decision
records how many tracks were scored and how many were left out, per label.

Exit codes of the CLI (:mod:`genrecls.core.exitcodes`): 0 promoted (or first model), 3 champion
kept (or nothing new), 1 failed, 2 bad usage, 4 the registry is locked by another run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from typing import Any

from genrecls.core.config import Config
from genrecls.core.provenance import library_versions
from genrecls.core.runtime import RAY_STARTS, log, one_ray_session
from genrecls.jobs.ingest import ingest
from genrecls.storage.dataset import Dataset
from genrecls.storage.locks import folder_lock
from genrecls.storage.registry import Registry

__all__ = ["retrain", "dataset_snapshot", "is_better", "PROMOTED", "KEPT", "UNCHANGED"]

PROMOTED, KEPT, UNCHANGED = "promoted", "kept", "unchanged"


def dataset_snapshot(ds: Dataset) -> dict[str, Any]:
    """Counts and a fingerprint of a dataset's tracks (ids, content fingerprints, labels) and its index version
    (``genrecls evaluate`` re-reads exactly that version)."""
    tracks = ds.tracks()
    h = hashlib.blake2b(digest_size=16)
    for tid in sorted(tracks):
        e = tracks[tid]
        h.update(f"{tid}:{e.fingerprint}:{e.label}\n".encode())
    per_label: dict[str, int] = {}
    for e in tracks.values():
        per_label[e.label or ""] = per_label.get(e.label or "", 0) + 1
    return {"uri": ds.uri, "version": ds.version, "tracks": len(tracks),
            "segments": sum(e.n_segments for e in tracks.values()), "per_label": per_label, "fingerprint": h.hexdigest()}


def is_better(challenger: float, champion: float | None, margin: float) -> bool:
    """The promotion rule: no champion yet, or strictly better than the champion plus ``margin``."""
    return champion is None or challenger > champion + margin


def retrain(source: str, dataset: str, registry: str, cfg: Config | None = None, *, address: str | None = None,
            workers: int | None = None, force: bool = False, progress: bool = True, verbose: bool = False) -> dict[str, Any]:
    """Run one retraining cycle; returns the decision record (``decision`` is promoted/kept/unchanged)."""
    from genrecls.jobs import training

    cfg = (cfg or Config()).validate()
    reg = Registry(registry)
    t0, starts = time.monotonic(), RAY_STARTS[0]
    with folder_lock(reg.location, "genrecls retrain"), one_ray_session():  # Ray starts once, and only if needed
        ingest_summary = ingest(source, dataset, cfg, address=address, workers=workers, prune=True,
                                progress=progress, verbose=verbose)
        # every read of this cycle is of the version this ingest committed (one read of the index)
        ds = Dataset(dataset, version=ingest_summary.index_version)
        compaction = _maybe_compact(ds, cfg)
        if compaction is not None:
            ds = Dataset(dataset, version=compaction["version"])
        snapshot = dataset_snapshot(ds)
        champion = reg.champion()
        champion_info = reg.version_info(champion) if champion else None
        if champion_info and not force and champion_info.get("dataset", {}).get("fingerprint") == snapshot["fingerprint"]:
            decision = {"decision": UNCHANGED, "champion": champion, "challenger": None,
                        "reason": "the dataset has not changed since the champion was trained",
                        "dataset": snapshot, "ingest": ingest_summary.to_dict(), "ray_starts": RAY_STARTS[0] - starts}
            reg.record_decision(decision)
            return decision

        version = reg.next_version()
        tmp_parent = reg.location.join("versions") if reg.location.is_local else tempfile.gettempdir()
        os.makedirs(tmp_parent, exist_ok=True)
        if reg.location.is_local:  # what a killed retrain left behind (we hold the lock)
            for stale in os.listdir(tmp_parent):
                if stale.startswith(".tmp-"):
                    shutil.rmtree(os.path.join(tmp_parent, stale), ignore_errors=True)
        work = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=tmp_parent)
        try:
            run_dir = os.path.join(work, "run")
            result = training.train(ds, run_dir, cfg, address=address, workers=workers,
                                    splits=reg.splits_path(), progress=progress, verbose=verbose)
            holdout = _holdout(ds, os.path.join(run_dir, "splits.parquet"))
            champion_run = reg.version_location(champion).uri if champion else None
            scored, left_out = _common_holdout(ds, holdout, [run_dir] + ([champion_run] if champion_run else []))
            challenger_metrics, champion_metrics = _score_both(run_dir, champion_run, ds, scored, cfg)
            metric = cfg.retrain.metric
            margin = cfg.retrain.min_improvement
            new = float(challenger_metrics[metric])
            old = None if champion_metrics is None else float(champion_metrics[metric])
            better = is_better(new, old, margin)
            decision_name = PROMOTED if better else KEPT
            reason = (f"first model ({metric} {new:.4f})" if old is None else
                      f"{metric}: challenger {new:.4f} vs champion {old:.4f} on {len(scored)} holdout tracks "
                      f"(promoted only if > champion + {margin:.4f}) -> {decision_name}")
            holdout_record = {"tracks": len(scored), "left_out": sum(left_out.values()),
                              "left_out_per_label": left_out,
                              "rule": "test-split tracks whose label both models know"}
            info = {
                "model_id": result.get("model_id"),
                "metrics": challenger_metrics,
                "dataset": snapshot,
                "config": cfg.to_dict(),
                "versions": library_versions(),
                "decision": decision_name,
                "compared_with": {"version": champion, "metrics": champion_metrics},
                "holdout": holdout_record,
                "train_seconds": result.get("train_seconds"),
            }
            # the split assignment of every known track is kept forever: save it before registering
            _save_splits(reg, os.path.join(run_dir, "splits.parquet"))
            reg.add_version(run_dir, version, info)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if better:  # a compare-and-swap on the champion this cycle compared with (we hold the registry's lock)
            reg.set_champion(version, reason=reason, expected=champion)
        decision = {"decision": decision_name, "champion": version if better else champion,
                    "challenger": version, "previous_champion": champion, "reason": reason,
                    "challenger_metrics": challenger_metrics, "champion_metrics": champion_metrics,
                    "holdout": holdout_record, "min_improvement": margin,
                    "dataset": snapshot, "ingest": ingest_summary.to_dict(),
                    "seconds": round(time.monotonic() - t0, 1), "ray_starts": RAY_STARTS[0] - starts}
        reg.record_decision(decision)
        log.info(reason)
        return decision


def _maybe_compact(ds: Dataset, cfg: Config) -> dict[str, Any] | None:
    """Compact the dataset (its lock, one commit) when it has ``retrain.compact_shards`` small shards or more."""
    from genrecls.jobs.compact import compact

    if not cfg.retrain.compact_shards:
        return None
    half = cfg.retrain.compact_segments / 2
    per_shard: dict[str, int] = {}
    for e in ds.tracks().values():
        per_shard[e.shard] = per_shard.get(e.shard, 0) + e.n_segments
    small = sum(1 for n in per_shard.values() if n < half)
    if small < cfg.retrain.compact_shards:
        return None
    log.info("%s has %d small shards: compacting it", ds.uri, small)
    return compact(ds.uri, target_segments=cfg.retrain.compact_segments)


def _save_splits(reg: Registry, splits_file: str) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(splits_file)
    reg.location.write_atomic("splits.parquet", lambda out: pq.write_table(table, out, compression="zstd"))


def _holdout(ds: Dataset, splits_file: str) -> list[str]:
    """The fixed holdout: tracks of the current dataset assigned to ``test``."""
    from genrecls.storage.split import read_splits

    table = read_splits(splits_file)
    test = {t for t, s in zip(table.column("track_id").to_pylist(), table.column("split").to_pylist()) if s == "test"}
    holdout = sorted(t for t, e in ds.tracks().items() if t in test and e.label)
    if not holdout:
        raise ValueError(f"the holdout of {ds.uri} is empty: no labelled track is assigned to the test split")
    return holdout


def _common_holdout(ds: Dataset, holdout: list[str], runs: list[str]) -> tuple[list[str], dict[str, int]]:
    """The holdout tracks whose label every run knows, and how many were left out per label."""
    from genrecls.models.inference import read_run_info

    known = None
    for run in runs:
        labels = set(read_run_info(run)["labels"])
        known = labels if known is None else known & labels
    tracks = ds.tracks()
    scored = [t for t in holdout if tracks[t].label in known]
    left_out: dict[str, int] = {}
    for t in holdout:
        if tracks[t].label not in known:
            left_out[tracks[t].label] = left_out.get(tracks[t].label, 0) + 1
    if not scored:
        raise ValueError(f"no holdout track of {ds.uri} has a label that both the challenger and the champion know")
    return scored, dict(sorted(left_out.items()))


def _score_both(challenger: str, champion: str | None, ds: Dataset, holdout: list[str],
                cfg: Config) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Both models' metrics on the holdout, scored the same way: from the dataset's stored embeddings and each
    run's head (no backbone pass) when both are frozen-backbone heads on the store's backbone, else each
    exported model on the stored segments."""
    from genrecls.models.transfer import score_stored

    runs = [challenger] + ([champion] if champion else [])
    stored = [score_stored(r, ds, holdout) for r in runs]
    if all(m is not None for m in stored):
        for r, m in zip(runs, stored):
            m["model_id"] = _model_id(r)
            m["holdout_tracks"] = len(holdout)
        return stored[0], (stored[1] if champion else None)
    return _score(challenger, ds, holdout, cfg), (_score(champion, ds, holdout, cfg) if champion else None)


def _model_id(run: str) -> str | None:
    from genrecls.models.inference import read_run_info

    return read_run_info(run).get("model_id")


def _score(run: str, ds: Dataset, holdout: list[str], cfg: Config) -> dict[str, Any]:
    """Metrics of a run's model on the holdout (every track's label is one the model knows)."""
    from genrecls.models.evaluation import evaluate_predictor
    from genrecls.models.inference import Predictor

    predictor = Predictor(run, engine=cfg.inference.engine, precision=cfg.inference.precision)
    metrics = evaluate_predictor(predictor, ds, {"test": holdout})
    metrics["model_id"] = predictor.model_id
    metrics["holdout_tracks"] = len(holdout)
    metrics["scored_by"] = {"how": "the run's exported model on the stored segments", "engine": predictor.describe()}
    return metrics
