"""Everything that is kept: locations and locks, atomic files, the dataset and its shards, its embedding store, failure
records, predictions, the model registry, the track split.

Imports only :mod:`genrecls.core`.
"""

from genrecls.storage.dataset import (
    SCHEMA_VERSION,
    Dataset,
    DatasetError,
    OutputError,
    PartWriter,
    ShardWriter,
    TrackBuffer,
    failure_schema,
    mel_array,
    segment_schema,
)
from genrecls.storage.embeddings import (
    EMBEDDINGS,
    EmbeddingEntry,
    EmbeddingStore,
    EmbeddingStoreError,
    EmbeddingWriter,
    embedding_schema,
    layer_array,
)
from genrecls.storage.location import TMP_PREFIX, AtomicFile, Location, new_shard_name
from genrecls.storage.locks import LEASE_SECONDS, LockedError, folder_lock, s3_client
from genrecls.storage.predictions import (
    CSV_NAME,
    INFO_NAME,
    LIST_COLUMNS,
    PARTS,
    PredictionStore,
    conform,
    prediction_columns,
    prediction_schema,
    read_predictions,
    top_k_type,
)
from genrecls.storage.records import Records, RecordTable, problem_rows, record_row, record_schema, warning_row
from genrecls.storage.registry import Registry, RegistryError, is_registry, resolve_run
from genrecls.storage.split import (
    SPLITS,
    SplitError,
    as_mapping,
    assign_splits,
    read_splits,
    split_counts,
    write_splits,
)

__all__ = [
    "Location",
    "AtomicFile",
    "TMP_PREFIX",
    "new_shard_name",
    "LockedError",
    "LEASE_SECONDS",
    "folder_lock",
    "s3_client",
    "record_schema",
    "record_row",
    "warning_row",
    "problem_rows",
    "RecordTable",
    "Records",
    "SCHEMA_VERSION",
    "DatasetError",
    "segment_schema",
    "failure_schema",
    "PartWriter",
    "ShardWriter",
    "TrackBuffer",
    "OutputError",
    "Dataset",
    "mel_array",
    "EMBEDDINGS",
    "EmbeddingStoreError",
    "EmbeddingEntry",
    "EmbeddingWriter",
    "EmbeddingStore",
    "embedding_schema",
    "layer_array",
    "SPLITS",
    "SplitError",
    "assign_splits",
    "read_splits",
    "write_splits",
    "split_counts",
    "as_mapping",
    "PARTS",
    "CSV_NAME",
    "INFO_NAME",
    "prediction_schema",
    "prediction_columns",
    "top_k_type",
    "LIST_COLUMNS",
    "conform",
    "PredictionStore",
    "read_predictions",
    "RegistryError",
    "Registry",
    "resolve_run",
    "is_registry",
]
