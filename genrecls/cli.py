"""The ``genrecls`` command line: parses arguments and calls the library, nothing more.

Every command that runs work accepts ``--config FILE`` (TOML or JSON) and repeatable
``--set section.key=value`` overrides; dedicated flags (``--epochs``...) are shortcuts for
the same overrides.  Exit codes: the table in :mod:`genrecls.core.exitcodes`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

from genrecls import __version__
from genrecls.core.config import ENGINES, PRECISIONS
from genrecls.core.exitcodes import ExitCode

__all__ = ["main", "run_job"]

EXIT_OK, EXIT_FAILURES, EXIT_USAGE = ExitCode.OK, ExitCode.FAILURES, ExitCode.USAGE
EXIT_KEPT, EXIT_LOCKED = ExitCode.KEPT, ExitCode.LOCKED

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def command(name: str, help: str):
    """Register ``add_arguments`` and ``run`` functions for a sub-command."""

    def deco(fn_pair):
        add, run = fn_pair()
        COMMANDS[name] = (add, run, help)
        return fn_pair

    return deco


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="configuration file (TOML or JSON; a run's config.json works)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one configuration value (repeatable), e.g. --set features.n_mels=64")


def add_ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster to join (e.g. auto, ray://head:10001); default: start a local Ray")
    p.add_argument("--workers", type=int, help="CPUs (local Ray) or concurrent tasks (cluster) to use; default: all")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    p.add_argument("-v", "--verbose", action="store_true", help="show Ray and TensorFlow logs")


def add_answer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", metavar="FILE", help="your genre vocabulary (TOML: rename, merge, drop, aliases, parents; "
                   "classify.labels): genre, genres and parent_genres in its words; 'msd-tags-to-genres': the shipped "
                   "example for --model musicnn-tags; 'none': the model's own labels")


def answer_overrides(a: argparse.Namespace) -> list[str]:
    """``--labels FILE`` as a ``classify.labels`` override (a file's path made absolute: configs record it)."""
    from genrecls.models.vocabulary import EXAMPLE_VOCABULARIES

    if getattr(a, "labels", None) is None:
        return []
    shipped = a.labels.lower() == "none" or (a.labels in EXAMPLE_VOCABULARIES and not os.path.exists(a.labels))
    value = a.labels if shipped else os.path.abspath(a.labels)
    return [f"classify.labels={json.dumps(value)}"]


def add_label_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels-from", choices=["folders", "tags"], help="where a track's label comes from "
                   "(ingest.labels_from): its top folder (default) or the genre a person wrote in its tags; a track "
                   "with none is stored unlabelled")
    p.add_argument("--labels", metavar="FILE", help="with --labels-from tags: the vocabulary (TOML: genres, aliases, "
                   "drop, unlisted) mapping tag texts to labels (ingest.labels)")


def label_overrides(a: argparse.Namespace) -> list[str]:
    out = [f"ingest.labels_from={a.labels_from}"] if a.labels_from else []
    if a.labels:
        out.append(f"ingest.labels={json.dumps(a.labels if '://' in a.labels else os.path.abspath(a.labels))}")
    return out


def resolve_config(args: argparse.Namespace, extra: list[str] | None = None):
    from genrecls.core.config import load_config

    return load_config(getattr(args, "config", None), list(getattr(args, "overrides", []) or []) + list(extra or []))


# -- sample-data ------------------------------------------------------------------------
@command("sample-data", "write a small synthetic labelled collection (MP3, WAV, FLAC, OGG)")
def _sample_data():
    def add(p):
        from genrecls.audio.sample_data import GENRES

        p.add_argument("out", help="folder to write OUT/<genre>/<track>.<ext> into")
        p.add_argument("--genres", type=int, default=4, help=f"number of genres (1-{len(GENRES)}, default 4)")
        p.add_argument("--tracks-per-genre", type=int, default=8, help="tracks per genre (default 8)")
        p.add_argument("--seconds", type=float, default=30.0, help="length of each track in seconds (default 30)")
        p.add_argument("--formats", default="mp3,wav,flac,ogg", help="comma-separated formats to rotate through")
        p.add_argument("--seed", type=int, default=0)

    def run(a):
        from genrecls.audio.sample_data import make_sample_collection

        paths = make_sample_collection(a.out, genres=a.genres, tracks_per_genre=a.tracks_per_genre, seconds=a.seconds,
                                       formats=tuple(x.strip() for x in a.formats.split(",") if x.strip()), seed=a.seed)
        print(f"wrote {len(paths)} tracks ({a.genres} genres x {a.tracks_per_genre}, {a.seconds:g} s each) to {a.out}")
        return EXIT_OK

    return add, run


# -- ingest -----------------------------------------------------------------------------
@command("ingest", "decode, segment and featurise a library into Parquet shards (Ray tasks)")
def _ingest():
    def add(p):
        p.add_argument("source", help="library folder laid out as SOURCE/<label>/**/<file> (or any tree, with "
                       "--labels-from tags), or a CSV/Parquet manifest (path[,label])")
        p.add_argument("--out", required=True, help="dataset folder or URI (s3://, gs://)")
        add_label_args(p)
        p.add_argument("--root", help="root for relative paths in a manifest (default: the manifest's folder)")
        p.add_argument("--strict", action="store_true", help="exit 1 if any file failed")
        p.add_argument("--retry-failed", action="store_true", help="retry files whose failure is recorded even if unchanged")
        p.add_argument("--prune", action="store_true", help="drop tracks that vanished from the source")
        add_config_args(p)
        add_ray_args(p)

    def run(a):
        from genrecls.jobs.ingest import format_summary, ingest

        extra = label_overrides(a)
        if a.strict:
            extra.append("ingest.strict=true")
        if a.retry_failed:
            extra.append("ingest.retry_failed=true")
        cfg = resolve_config(a, extra)
        summary = ingest(a.source, a.out, cfg, address=a.address, workers=a.workers, root=a.root,
                         prune=a.prune, progress=not a.quiet, verbose=a.verbose)
        print(format_summary(summary))
        if cfg.ingest.strict and summary.failed:
            print(f"--strict: {summary.failed} file(s) failed", file=sys.stderr)
            return EXIT_FAILURES
        return EXIT_OK

    return add, run


# -- inspect ----------------------------------------------------------------------------
@command("inspect", "show a dataset: tracks and segments per label, failures by reason, features")
def _inspect():
    def add(p):
        p.add_argument("dataset")
        p.add_argument("--json", action="store_true", help="print the manifest as JSON")

    def run(a):
        from genrecls.jobs.inspection import inspect_dataset

        print(inspect_dataset(a.dataset, as_json=a.json))
        return EXIT_OK

    return add, run


# -- the dataset's index: convert, compact, vacuum -----------------------------------------
@command("convert", "give a dataset written before the track index its index (once; read from its shards' footers)")
def _convert():
    def add(p):
        p.add_argument("dataset")

    def run(a):
        from genrecls.jobs.convert import convert, format_conversion

        print(format_conversion(convert(a.dataset)))
        return EXIT_OK

    return add, run


@command("compact", "merge a dataset's small shards and embedding parts into larger ones (one commit; no data changes)")
def _compact():
    def add(p):
        from genrecls.jobs.compact import DEFAULT_TARGET_SEGMENTS

        p.add_argument("dataset")
        p.add_argument("--target-segments", type=int, default=DEFAULT_TARGET_SEGMENTS,
                       help=f"segments per merged shard; shards under half of it are merged (default {DEFAULT_TARGET_SEGMENTS})")

    def run(a):
        from genrecls.jobs.compact import compact, format_compaction

        print(format_compaction(compact(a.dataset, target_segments=a.target_segments)))
        return EXIT_OK

    return add, run


@command("vacuum", "delete the shards, parts and index files that no version of the retention period references")
def _vacuum():
    def add(p):
        from genrecls.jobs.vacuum import DEFAULT_RETENTION_HOURS

        p.add_argument("dataset")
        p.add_argument("--retention-hours", type=float, default=DEFAULT_RETENTION_HOURS,
                       help=f"keep every version committed in the last H hours (default {DEFAULT_RETENTION_HOURS:g})")
        p.add_argument("--keep-version", type=int, action="append", default=[], metavar="V",
                       help="keep the files of index version V too (e.g. a registry version's dataset.version); repeatable")
        p.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")

    def run(a):
        from genrecls.jobs.vacuum import format_vacuum, vacuum

        print(format_vacuum(vacuum(a.dataset, retention_hours=a.retention_hours, keep_versions=a.keep_version,
                                   dry_run=a.dry_run)))
        return EXIT_OK

    return add, run


# -- classify ---------------------------------------------------------------------------
@command("classify", "predict the genre of every track of a library with a trained run (streaming Ray job)")
def _classify():
    def add(p):
        p.add_argument("library", help="folder of audio (any depth; folder names are not used) or a CSV/Parquet manifest (path)")
        p.add_argument("--model", required=True, metavar="RUN", help="trained run folder (RUN/run.json, RUN/model/) or a model registry (its champion); the run's features are used; "
                       "'musicnn-tags': the pretrained musicnn tagger's top tags, no training needed")
        p.add_argument("--out", required=True, metavar="PREDICTIONS", help="predictions folder or URI; re-running adds only new or changed tracks")
        p.add_argument("--root", help="root for relative paths in a manifest (default: the manifest's folder)")
        p.add_argument("--csv", action="store_true", help="also write PREDICTIONS/predictions.csv")
        p.add_argument("--strict", action="store_true", help="exit 1 if any file could not be classified")
        p.add_argument("--retry-failed", action="store_true", help="retry files whose failure is recorded even if unchanged")
        p.add_argument("--prune", action="store_true", help="drop predictions of files no longer in the library")
        p.add_argument("--dataset", metavar="DATASET", help="score the tracks this dataset holds unchanged from its "
                       "embedding store (no decoding, no backbone); the others are computed (classify.dataset)")
        p.add_argument("--gpu", action="store_true", help="run the model actors on GPUs (classify.gpu)")
        p.add_argument("--actors", type=int, help="model actors (classify.actors; 0 = none on CPU: each task runs the "
                       "whole chain on its CPU; one per GPU with --gpu)")
        p.add_argument("--batch-size", type=int, help="segments per model call (classify.batch_size)")
        p.add_argument("--max-segments", type=int, help="score at most K evenly spaced segments per track, 0 = all (classify.max_segments)")
        p.add_argument("--top-k", type=int, help="genres listed in the top_k column (classify.top_k)")
        add_answer_args(p)
        p.add_argument("--group-by", choices=["album", "folder", "none"],
                       help="one genre per album (album_genre): 'album' (its tags, else its folder) or 'folder' (classify.group_by)")
        p.add_argument("--target-precision", type=float, metavar="P", help="the 'uncertain' threshold is chosen on the run's "
                       "validation tracks for this precision of the other answers (classify.target_precision, default 0.9)")
        p.add_argument("--min-confidence", type=float, metavar="X", help="the 'uncertain' threshold set by hand: a calibrated "
                       "probability, 0 = never uncertain (classify.min_confidence)")
        p.add_argument("--max-genres", type=int, metavar="N", help="at most N genres in the genres column (classify.max_genres)")
        p.add_argument("--strict-precision", action="store_true", help="answer only at a shown precision: when "
                       "classify.target_precision cannot be shown on the run's tracks, every answer is 'uncertain' "
                       "(classify.strict_precision; default: the answers of best estimated precision, and a line says so)")
        add_config_args(p)
        add_ray_args(p)

    def run(a):
        from genrecls.jobs.classify import classify, format_summary

        extra = [f"classify.{k}={v}" for k, v in (("actors", a.actors), ("batch_size", a.batch_size),
                                                  ("max_segments", a.max_segments), ("top_k", a.top_k),
                                                  ("group_by", a.group_by), ("target_precision", a.target_precision),
                                                  ("min_confidence", a.min_confidence), ("max_genres", a.max_genres))
                 if v is not None] + answer_overrides(a)
        if a.dataset is not None:  # a folder made absolute: config.json records it
            extra.append(f"classify.dataset={json.dumps(a.dataset if '://' in a.dataset else os.path.abspath(a.dataset))}")
        extra += [f"classify.{k}=true" for k, v in (("strict", a.strict), ("retry_failed", a.retry_failed),
                                                    ("gpu", a.gpu), ("strict_precision", a.strict_precision)) if v]
        cfg = resolve_config(a, extra)
        summary = classify(a.library, a.model, a.out, cfg, address=a.address, workers=a.workers, root=a.root,
                           csv=a.csv, prune=a.prune, progress=not a.quiet, verbose=a.verbose)
        print(format_summary(summary))
        failed = summary["failed"] + summary["skipped_known_failures"]
        if cfg.classify.strict and failed:
            print(f"--strict: {failed} file(s) could not be classified", file=sys.stderr)
            return EXIT_FAILURES
        return EXIT_OK

    return add, run


# -- tag --------------------------------------------------------------------------------
@command("tag", "write the predicted genres into the library's files (a preview unless --apply), or undo a run")
def _tag():
    def add(p):
        p.add_argument("predictions", nargs="?", help="predictions folder written by 'genrecls classify' (its classify.json names the library)")
        p.add_argument("--apply", action="store_true", help="write the files (default: only report what would be written)")
        mode = p.add_mutually_exclusive_group()
        mode.add_argument("--overwrite", action="store_true", help="replace a genre a person wrote (default: keep it)")
        mode.add_argument("--add", action="store_true", help="add the predicted genres to a genre a person wrote")
        p.add_argument("--max-genres", type=int, default=3, metavar="N", help="at most N genres per file, best first (default 3)")
        p.add_argument("--min-confidence", type=float, metavar="X", help="skip predictions whose confidence is below X")
        p.add_argument("--id3v23", action="store_true", help="write ID3v2.3 tags (MP3, AIFF, WAV) instead of v2.4")
        p.add_argument("--separator", default="/", metavar="S", help="joins several genres in an ID3v2.3 tag (default '/')")
        p.add_argument("--keep-mtime", action="store_true", help="give each written file its modification time back")
        p.add_argument("--vocabulary", metavar="FILE", help="JSON object mapping the model's labels to the genre names to write (null: never)")
        p.add_argument("--undo", metavar="JOURNAL", help="restore what a run wrote: PREDICTIONS/tag-journal/RUN (or a file in it)")
        p.add_argument("--list-journals", action="store_true", help="list the tag and undo runs of PREDICTIONS (which can be undone)")
        p.add_argument("--strict", action="store_true", help="exit 1 if any file failed (read-only, unparseable...)")
        add_ray_args(p)

    def run(a):
        from genrecls.jobs.tagging import format_journals, format_summary, list_journals, tag, undo

        if a.list_journals:
            if not a.predictions:
                raise ValueError("--list-journals needs PREDICTIONS")
            print(format_journals(list_journals(a.predictions)))
            return EXIT_OK
        if bool(a.predictions) == bool(a.undo):
            raise ValueError("give PREDICTIONS (tag) or --undo JOURNAL (undo), not both or neither")
        common = dict(address=a.address, workers=a.workers, progress=not a.quiet, verbose=a.verbose)
        if a.undo:
            summary = undo(a.undo, keep_mtime=a.keep_mtime, **common)
        else:
            summary = tag(a.predictions, apply=a.apply, mode="overwrite" if a.overwrite else "add" if a.add else "keep",
                          max_genres=a.max_genres, min_confidence=a.min_confidence, id3v23=a.id3v23,
                          separator=a.separator, keep_mtime=a.keep_mtime, vocabulary=a.vocabulary, **common)
        print(format_summary(summary))
        if a.strict and summary["failed"]:
            print(f"--strict: {summary['failed']} file(s) failed", file=sys.stderr)
            return EXIT_FAILURES
        return EXIT_OK

    return add, run


# -- retrain ----------------------------------------------------------------------------

@command("retrain", "scheduled retraining: ingest new tracks, train a challenger, promote only a better one")
def _retrain():
    def add(p):
        p.add_argument("source", help="the library (folder or manifest), as for ingest")
        p.add_argument("--dataset", required=True, help="dataset folder/URI kept up to date incrementally")
        p.add_argument("--registry", required=True, help="model registry folder/URI")
        p.add_argument("--force", action="store_true", help="train a challenger even if the dataset is unchanged")
        p.add_argument("--min-improvement", type=float, help="challenger must beat the champion by this much (retrain.min_improvement)")
        p.add_argument("--epochs", type=int, help="train.epochs")
        p.add_argument("--labels-from", choices=["folders", "tags"], help="where labels come from (ingest.labels_from): "
                       "folder names, or the genres a person wrote in the files' tags (mapped through --labels)")
        add_answer_args(p)
        add_config_args(p)
        add_ray_args(p)

    def run(a):
        from genrecls.jobs.retrain import PROMOTED, retrain

        extra = answer_overrides(a)
        if a.labels_from:
            extra.append(f"ingest.labels_from={a.labels_from}")
            if a.labels_from == "tags" and a.labels and a.labels.lower() != "none":  # one file: tags -> labels, answers
                extra.append(f"ingest.labels={json.dumps(os.path.abspath(a.labels))}")
        if a.min_improvement is not None:
            extra.append(f"retrain.min_improvement={a.min_improvement}")
        if a.epochs is not None:
            extra.append(f"train.epochs={a.epochs}")
        cfg = resolve_config(a, extra)
        d = retrain(a.source, a.dataset, a.registry, cfg, address=a.address, workers=a.workers,
                    force=a.force, progress=not a.quiet, verbose=a.verbose)
        print(f"{d['decision']}: {d['reason']}")
        print(f"champion: {d['champion']}")
        return EXIT_OK if d["decision"] == PROMOTED else EXIT_KEPT

    return add, run


# -- models -----------------------------------------------------------------------------
@command("models", "list the versions of a model registry, promote one, or roll back")
def _models():
    def add(p):
        p.add_argument("action", choices=["list", "promote", "rollback"])
        p.add_argument("registry", help="model registry folder/URI")
        p.add_argument("version", nargs="?", help="version to promote (e.g. v0003)")
        p.add_argument("--json", action="store_true", help="list as JSON")

    def run(a):
        from genrecls.storage.registry import Registry

        reg = Registry(a.registry)
        if a.action == "list":
            print(json.dumps(reg.table(), indent=2, default=str) if a.json else reg.format_table())
            return EXIT_OK
        if a.action == "promote":
            if not a.version:
                raise ValueError("models promote needs a VERSION (see 'genrecls models list')")
            reg.promote(a.version, reason="manual promotion")
            print(f"champion: {a.version}")
            return EXIT_OK
        print(f"champion: {reg.rollback()}")
        return EXIT_OK

    return add, run


# -- demo -------------------------------------------------------------------------------
@command("demo", "the whole flow on a generated artist/album library: labels from its tags, train, classify, fill")
def _demo():
    def add(p):
        p.add_argument("out", nargs="?", default="demo", help="folder for the demo's library, dataset, run and predictions (default ./demo)")
        p.add_argument("--genres", type=int, default=4)
        p.add_argument("--artists-per-genre", type=int, default=3, help="artists (one album each) per genre (default 3)")
        p.add_argument("--tracks-per-album", type=int, default=4)
        p.add_argument("--seconds", type=float, default=20.0)
        add_config_args(p)
        add_ray_args(p)

    def run(a):
        from genrecls.jobs.demo import run_demo

        run_demo(a.out, genres=a.genres, artists_per_genre=a.artists_per_genre, tracks_per_album=a.tracks_per_album,
                 seconds=a.seconds, workers=a.workers, cfg=resolve_config(a), progress=not a.quiet)
        return EXIT_OK

    return add, run


# -- train ------------------------------------------------------------------------------
@command("train", "train a CNN genre classifier on a dataset with Ray Train (data-parallel workers)")
def _train():
    def add(p):
        p.add_argument("dataset", nargs="?", help="dataset folder or URI written by 'genrecls ingest' "
                       "(with --resume: default the run's dataset)")
        p.add_argument("--out", metavar="RUN", help="run folder to create (model, metrics, figures, report)")
        p.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last checkpoint "
                       "(its config.json is the base configuration; --epochs etc. still apply)")
        p.add_argument("--model", help="model name (train.model): musicnn (pretrained backbone; needs the musicnn "
                       "feature preset), default (1-D CNN), cnn2d, tutorial, linear (baseline)")
        p.add_argument("--epochs", type=int, help="train.epochs")
        p.add_argument("--batch-size", type=int, help="segments per worker and step (train.batch_size)")
        p.add_argument("--learning-rate", type=float, help="train.learning_rate")
        p.add_argument("--seed", type=int, help="train.seed (split, initialisation, shuffling)")
        p.add_argument("--gpu", action="store_true", help="one GPU per worker (train.gpu)")
        p.add_argument("--splits", metavar="RUN_OR_PARQUET",
                       help="keep this track->split assignment for the tracks it knows (a run folder or splits.parquet)")
        p.add_argument("--workers", type=int, help="data-parallel training workers (train.workers)")
        p.add_argument("--address", help="Ray cluster to join (e.g. auto, ray://head:10001); default: start a local Ray")
        p.add_argument("-q", "--quiet", action="store_true", help="no per-epoch lines")
        p.add_argument("-v", "--verbose", action="store_true", help="show Ray and TensorFlow logs")
        add_answer_args(p)
        add_config_args(p)

    def run(a):
        from genrecls.jobs.training import TrainingError, resume_inputs, train
        from genrecls.models.evaluation import format_metrics
        from genrecls.storage.location import Location

        if not a.out and not a.resume:
            raise ValueError("give --out RUN (a new run) or --resume RUN (continue one)")
        if a.out and a.resume and Location.parse(a.out).uri != Location.parse(a.resume).uri:
            raise ValueError("--out and --resume name different runs; give one of them")
        run_dir = a.resume or a.out
        extra = [f"train.{k}={v}" for k, v in (("model", a.model), ("epochs", a.epochs), ("batch_size", a.batch_size),
                                                ("learning_rate", a.learning_rate), ("seed", a.seed)) if v is not None]
        if a.gpu:
            extra.append("train.gpu=true")
        extra += answer_overrides(a)
        if a.resume:
            dataset, cfg = resume_inputs(a.resume, dataset=a.dataset, config_file=a.config,
                                         overrides=list(a.overrides or []) + extra)
        elif a.dataset is None:
            raise ValueError("give the DATASET to train on")
        else:
            dataset, cfg = a.dataset, resolve_config(a, extra)
        try:
            summary = train(dataset, run_dir, cfg, address=a.address, workers=a.workers, resume=bool(a.resume),
                            splits=a.splits, progress=not a.quiet, verbose=a.verbose)
        except FileExistsError as exc:
            print(f"genrecls train: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except TrainingError as exc:
            print(f"genrecls train: {exc}", file=sys.stderr)
            return EXIT_FAILURES
        print(format_metrics(summary["metrics"]))
        print(f"\nrun {summary['model_id']} written to {summary['run']} ({summary['epochs_run']} epochs, best "
              f"{summary['best_epoch']}; report.md, metrics.json, curves.png, confusion_matrix.png)")
        return EXIT_OK

    return add, run


# -- evaluate ---------------------------------------------------------------------------
@command("evaluate", "print a run's metrics, or re-score its model on a dataset")
def _evaluate():
    def add(p):
        p.add_argument("run", help="run folder written by 'genrecls train'")
        p.add_argument("--dataset", help="re-score on this dataset: every labelled track the run did not train or "
                       "validate on (or every track with --all-tracks)")
        p.add_argument("--rescore", action="store_true", help="re-score the run's own validation and test splits")
        p.add_argument("--all-tracks", action="store_true", help="score every labelled track of the dataset, "
                       "including tracks the run trained on")
        p.add_argument("--json", action="store_true", help="print the metrics as JSON")
        p.add_argument("--output", metavar="FILE", help="also write the metrics as JSON to FILE")
        p.add_argument("--engine", default="auto", choices=ENGINES, help="inference runtime when re-scoring (default auto)")
        p.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="inference precision when re-scoring: auto (native reduced precision) or fp32")
        p.add_argument("-v", "--verbose", action="store_true")

    def run(a):
        from genrecls.models.evaluation import (
            format_metrics,
            run_metrics,
            write_metrics,
        )

        metrics = run_metrics(a.run, a.dataset, rescore=a.rescore, all_tracks=a.all_tracks, engine=a.engine,
                              precision=a.precision)
        if a.output:
            write_metrics(a.output, metrics)
        print(json.dumps(metrics, indent=2) if a.json else format_metrics(metrics))
        return EXIT_OK

    return add, run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genrecls", description="Music genre classification at library scale, with Ray.")
    parser.add_argument("--version", action="version", version=f"genrecls {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (add, run, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        add(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from genrecls.core.runtime import (
        RayStartError,
        as_interrupted,
        handle_stop_signals,
        quiet_environment,
    )

    quiet_environment(verbose="-v" in (argv or sys.argv) or "--verbose" in (argv or sys.argv))
    handle_stop_signals()
    parser = build_parser()
    args = parser.parse_args(argv)
    from genrecls.core.config import ConfigError
    from genrecls.storage.dataset import DatasetError
    from genrecls.storage.locks import LockedError

    try:
        return args._run(args)
    except LockedError as exc:
        print(f"genrecls {args.command}: locked: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except (ConfigError, DatasetError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError) as exc:
        print(f"genrecls {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RayStartError as exc:
        print(f"genrecls {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURES
    except KeyboardInterrupt as exc:
        stop = as_interrupted(exc)
        kept = f"{stop.kept}; " if stop.kept else ""
        print(f"genrecls {args.command}: stopped by {stop.signal_name}: {kept}run the same command again to resume",
              file=sys.stderr)
        return stop.exit_code


def run_job(name: str, argv: list[str] | None = None) -> int:
    """Run the sub-command ``name`` on the Ray cluster this process runs in (``jobs/<name>.py``).

    The same code as ``genrecls NAME ...``, joining the cluster with ``--address auto``
    (which reads ``RAY_ADDRESS``, set by ``ray job submit``, or finds the cluster started on
    this machine) unless ``argv`` names another ``--address``.  Returns the sub-command's
    exit code; 2 with a clear message when there is no cluster to join.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--address" or a.startswith("--address=") for a in args):
        args += ["--address", "auto"]
    # genrecls's ray.init sets a few worker env vars; a job submitted with env_vars of its
    # own may name the same keys, which Ray refuses to merge unless told to let ours win.
    os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    try:
        return main([name, *args])
    except ConnectionError as exc:
        print(f"jobs/{name}.py: no Ray cluster to join ({exc}); submit it with "
              f"'ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/{name}.py ...' "
              f"or pass --address HOST:6379", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
