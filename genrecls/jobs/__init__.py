"""The jobs a user runs, peers above everything else: ingest, train, classify, retrain, inspect, demo.

Imports every lower layer; a job may call another job (retrain runs ingest and train).
"""

from genrecls.jobs.scoring import featurise_batch, Scorer, stream, DECODE_MAX_RETRIES
from genrecls.jobs.inspection import describe, inspect_dataset
from genrecls.jobs.ingest import TrackTask, IngestSummary, process_batch, ingest, format_summary as format_ingest_summary
from genrecls.jobs.classify import resolve_run, classify, format_summary as format_classify_summary
from genrecls.jobs.tagging import tag, undo, decide, read_journal, journal_index, journal_runs, format_summary as format_tag_summary, JOURNAL, IN_PROCESS_FILES, PREVIEW, LIBRARY_TMP_PREFIX, MODES
from genrecls.jobs.training import train, TrainingError, resume_inputs
from genrecls.jobs.retrain import retrain, dataset_snapshot, is_better, PROMOTED, KEPT, UNCHANGED
from genrecls.jobs.demo import run_demo

__all__ = [
    "featurise_batch",
    "Scorer",
    "stream",
    "DECODE_MAX_RETRIES",
    "describe",
    "inspect_dataset",
    "TrackTask",
    "IngestSummary",
    "process_batch",
    "ingest",
    "format_ingest_summary",
    "resolve_run",
    "classify",
    "format_classify_summary",
    "tag",
    "undo",
    "decide",
    "read_journal",
    "journal_index",
    "journal_runs",
    "format_tag_summary",
    "JOURNAL",
    "IN_PROCESS_FILES",
    "PREVIEW",
    "LIBRARY_TMP_PREFIX",
    "MODES",
    "train",
    "TrainingError",
    "resume_inputs",
    "retrain",
    "dataset_snapshot",
    "is_better",
    "PROMOTED",
    "KEPT",
    "UNCHANGED",
    "run_demo",
]
