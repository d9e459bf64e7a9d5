"""A run's human-readable report (``RUN/report.md``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from genrecls.core.config import Config, FeatureConfig

from .plan import TrainPlan

__all__ = ["format_report", "format_head_report"]


def format_report(summary: dict[str, Any], plan: TrainPlan, cfg: Config, info: dict[str, Any]) -> str:
    """A human-readable report of a run (report.md)."""
    from genrecls.core.progress import format_duration, format_table
    from genrecls.models.evaluation import format_metrics

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
    order = "cached after one read, rows shuffled once" if plan.cache else f"streamed from the shards every epoch, order {plan.shuffle}"
    lines.append(f"- training: {plan.workers} Ray Train worker(s) x {plan.cpus_per_worker:g} CPU{' + GPU' if plan.use_gpu else ''}, "
                 f"batch {plan.batch_size} per worker, {plan.steps_per_epoch} steps per epoch, {summary['epochs_run']} of "
                 f"{plan.epochs} epochs{' (early stop)' if summary['stopped_early'] else ''}, best epoch {summary['best_epoch']} "
                 "(highest validation track accuracy), "
                 f"learning rate {plan.learning_rate:g} with cosine decay, input {order}, seed {plan.seed}, "
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
    lines += ["", ("## Split (stratified by label; the validation split chooses the epoch, K, the calibration and the "
                   "thresholds: a network trained from scratch is not cross-validated)"), ""]
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
    if (m.get("answers") or {}).get("test", {}).get("reliability_after") is not None:
        lines += ["![reliability diagram (test tracks, before and after calibration)](reliability.png)", ""]
    lines += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in summary["versions"].items()), ""]
    return "\n".join(lines)


def format_head_report(summary: dict[str, Any], plan: TrainPlan, cfg: Config, info: dict[str, Any]) -> str:
    """The report of a frozen-backbone musicnn run: the cross-validated choices, the final fit, metrics."""
    from genrecls.core.progress import format_duration, format_table
    from genrecls.models.evaluation import format_metrics

    m, sel, refit, emb = summary["metrics"], summary["selection"], summary["refit"], summary["embeddings"]
    cv = summary["cross_validation"]
    chosen = sel["chosen"]
    f = FeatureConfig(**plan.features)
    lines = [f"# Training run {summary['model_id']}", ""]
    lines.append(f"- dataset: `{plan.dataset}` ({sum(plan.tracks_per_split[s]['total'] for s in plan.tracks_per_split)} "
                 f"labelled tracks, {len(plan.labels)} labels{f', {plan.unlabelled_tracks} unlabelled tracks ignored' if plan.unlabelled_tracks else ''})")
    lines.append(f"- model: `musicnn` ({info['model']['parameters']:,} weights in the export): the pretrained MSD musicnn "
                 f"backbone `{emb['backbone']}`, frozen, and a linear head (standardisation, one softmax layer) on its "
                 f"`{chosen['candidate']}` embedding ({chosen['dims']} values per segment), C = {chosen['c']:g}; input "
                 f"{plan.mel_shape[0]}x{plan.mel_shape[1]} log10(10000 mel + 1) (preset {f.preset})")
    engines = [f"{e.get('engine')} {e.get('precision')}" for e in emb.get("store_engines", []) + emb.get("computed_engines", [])]
    lines.append(f"- embeddings: {emb['tracks']} tracks, {emb['stored_tracks']} read from the dataset's embedding store, "
                 f"{emb['computed_tracks']} computed in this run (not stored){'; computed by ' + ', '.join(dict.fromkeys(engines)) if engines else ''}"
                 + (f"; the store was not used: {emb['store_refused']}" if emb.get("store_refused") else ""))
    acc = cv["track_accuracy"]
    spread = (f" (folds {acc['min']:.3f}-{acc['max']:.3f}, sd {acc['sd']:.3f})" if acc.get("min") is not None else "")
    lines.append(f"- cross-validation: every choice (the embedding and C, classify's K, the calibration, the "
                 f"'uncertain' and per-genre thresholds) is made on the out-of-fold scores of the {cv['tracks']} training "
                 f"and validation tracks, {cv['folds']} folds ({cv['tracks_per_fold']} tracks held out; "
                 f"train.cv_folds={cv['requested_folds']}), each scored by the head fit on the other folds; the test "
                 f"tracks never reach any choice. Out-of-fold track accuracy of the chosen head {acc['oof']:.3f}{spread}")
    folded = (f"by {cv['group']}: {cv['grouped_tracks']} tracks in {cv['groups']} groups, each group in one fold"
              if cv["groups"] else f"by track (no album tags; train.group_by={cfg.train.group_by})")
    lines.append(f"- folds and split {folded}" + (f"; folded by track: {cv['labels_folded_by_track']}"
                                                   if cv["labels_folded_by_track"] else "")
                 + (f"; never held out (one track, no out-of-fold score): {cv['never_held_out']}"
                    if cv["never_held_out"] else ""))
    lines.append(f"- selection: {len(sel['candidates'])} candidates ({len(cfg.train.head_candidates)} embeddings x "
                 f"{len(cfg.train.head_c)} strengths), each fit {cv['folds']} times; rule: {sel['rule']}; {sel['fit']}")
    if refit["done"]:
        lines.append(f"- final head: fit once on the training and validation tracks ({refit['tracks']} tracks, "
                     f"{refit['segments']} segments); the test tracks were never seen"
                     + (f". Test track accuracy {refit['test_track_accuracy_after']:.3f} ({refit['test_track_accuracy_before']:.3f} "
                        f"with the head fit on the training split alone: gain of the refit alone {refit['gain']:+.3f})"
                        if "gain" in refit else ""))
    else:
        lines.append("- final head: fit on the training split alone (train.refit=false)")
    lines.append(f"- classify's K: {m['classify_max_segments']} segments per track (0 = all), chosen on the out-of-fold "
                 "scores")
    t = summary["timings"]
    lines.append(f"- time: {format_duration(summary['wall_seconds'])} in all: embeddings {t.get('embeddings', 0):.1f} s, "
                 f"cross-validation {t.get('selection', 0):.1f} s, final fit {t.get('refit', 0):.1f} s, export "
                 f"{t.get('export', 0):.1f} s")
    chk = summary.get("export_check") or {}
    if chk.get("segments"):
        lines.append(f"- export check: {chk['segments']} stored segments through RUN/model vs the head on their stored "
                     f"embeddings: largest probability difference {chk['max_abs_difference']:.2e}, top label equal on "
                     f"{chk['top_label_equal']}")
    for note in plan.notes:
        lines.append(f"- note: {note}")
    lines += ["", "## Split (the test tracks are the holdout; train and validation tracks are cross-validated together)",
              ""]
    rows = []
    for label in plan.labels + ["total"]:
        rows.append((label, *[plan.tracks_per_split[s].get(label, 0) for s in ("train", "val", "test")],
                     *[plan.segments_per_split[s].get(label, 0) for s in ("train", "val", "test")]))
    lines += ["```", format_table(rows, ("label", "train tracks", "val tracks", "test tracks", "train segs", "val segs", "test segs")), "```"]
    lines += ["", f"## Head selection ({cv['folds']}-fold cross-validation, out-of-fold tracks)", "", "```", format_table(
        [(r["candidate"], r["dims"], f"{r['c']:g}", f"{r['oof_track_accuracy']:.3f}",
          f"{min(r['fold_track_accuracy']):.3f}-{max(r['fold_track_accuracy']):.3f}" if r["fold_track_accuracy"] else "-",
          f"{r['oof_track_nll']:.4f}", r["iterations"], f"{r['fit_seconds']:.1f}",
          "chosen" if (r["candidate"], r["c"]) == (chosen["candidate"], chosen["c"]) else "")
         for r in sel["candidates"]],
        ("embedding", "dims", "C", "oof track acc", "across folds", "oof track NLL", "iterations", "seconds", "")),
        "```", ""]
    lines += ["## Metrics", "", "```", format_metrics(m), "```", ""]
    lines += ["![head selection](curves.png)", ""]
    if m.get("test_confusion"):
        lines += ["![confusion matrix (test tracks)](confusion_matrix.png)", ""]
    if (m.get("answers") or {}).get("test", {}).get("reliability_after") is not None:
        lines += ["![reliability diagram (test tracks, before and after calibration)](reliability.png)", ""]
    lines += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in summary["versions"].items()), ""]
    return "\n".join(lines)
