"""The jobs a user runs, peers above everything else: ingest, train, classify, retrain, inspect, demo, and the
dataset's upkeep: convert, compact, vacuum.

Imports every lower layer; a job may call another job (retrain runs ingest and train).
"""

from genrecls.jobs.classify import classify, resolve_run
from genrecls.jobs.classify import format_summary as format_classify_summary
from genrecls.jobs.compact import compact, format_compaction
from genrecls.jobs.convert import convert, format_conversion
from genrecls.jobs.demo import run_demo
from genrecls.jobs.ingest import (
    EmbedSpec,
    IngestSummary,
    TrackTask,
    embed_stored,
    embeddings_wanted,
    ingest,
    process_batch,
)
from genrecls.jobs.ingest import format_summary as format_ingest_summary
from genrecls.jobs.inspection import describe, inspect_dataset
from genrecls.jobs.retrain import KEPT, PROMOTED, UNCHANGED, dataset_snapshot, is_better, retrain
from genrecls.jobs.scoring import (
    DECODE_MAX_RETRIES,
    TRACK_EMBEDDING_LAYER,
    Scorer,
    featurise_batch,
    stream,
    track_embedding_info,
)
from genrecls.jobs.tagging import (
    IN_PROCESS_FILES,
    JOURNAL,
    LIBRARY_TMP_PREFIX,
    MODES,
    PREVIEW,
    decide,
    journal_index,
    journal_runs,
    read_journal,
    tag,
    undo,
)
from genrecls.jobs.tagging import format_summary as format_tag_summary
from genrecls.jobs.training import TrainingError, resume_inputs, train
from genrecls.jobs.vacuum import format_vacuum, vacuum

__all__ = [
    "compact",
    "format_compaction",
    "convert",
    "format_conversion",
    "vacuum",
    "format_vacuum",
    "featurise_batch",
    "Scorer",
    "stream",
    "DECODE_MAX_RETRIES",
    "TRACK_EMBEDDING_LAYER",
    "track_embedding_info",
    "describe",
    "inspect_dataset",
    "TrackTask",
    "EmbedSpec",
    "IngestSummary",
    "process_batch",
    "embed_stored",
    "embeddings_wanted",
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
