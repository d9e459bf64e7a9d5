"""The bottom layer: configuration, exit codes, failure kinds, progress, provenance, the Ray session and scheduling.

It imports nothing else of genrecls; every other layer may import it.
"""

from genrecls.core.config import (
    DEFAULT_HEAD_C,
    DEFAULT_HEAD_CANDIDATES,
    DEFAULT_PRESET,
    FEATURE_PRESETS,
    HEAD_LAYER_GROUPS,
    HEAD_LAYERS,
    MODEL_PRESETS,
    ClassifyConfig,
    Config,
    ConfigError,
    DecodeConfig,
    FeatureConfig,
    IngestConfig,
    RetrainConfig,
    TrainConfig,
    feature_preset,
    head_candidate_layers,
    load_config,
)
from genrecls.core.errors import FAILURE_KINDS, WARNING_KINDS, AudioError, failure_of, not_regular_reason
from genrecls.core.exitcodes import TABLE, ExitCode
from genrecls.core.hooks import PAUSE_DIR_ENV, pause_point
from genrecls.core.progress import Progress, format_duration, format_table
from genrecls.core.provenance import TIMESTAMP_FORMAT, library_versions, utc_timestamp
from genrecls.core.runtime import (
    Interrupted,
    RayStartError,
    as_interrupted,
    handle_stop_signals,
    log,
    quiet_environment,
    quiet_ray_data,
    ray_session,
    runtime_env,
    worker_env,
    worker_setup,
)
from genrecls.core.scheduling import cluster_cpus, slots, task_bounds

__all__ = [
    "PAUSE_DIR_ENV",
    "pause_point",
    "FAILURE_KINDS",
    "WARNING_KINDS",
    "AudioError",
    "not_regular_reason",
    "failure_of",
    "ExitCode",
    "TABLE",
    "ConfigError",
    "FeatureConfig",
    "DecodeConfig",
    "FEATURE_PRESETS",
    "MODEL_PRESETS",
    "DEFAULT_PRESET",
    "feature_preset",
    "IngestConfig",
    "TrainConfig",
    "ClassifyConfig",
    "RetrainConfig",
    "Config",
    "load_config",
    "HEAD_LAYERS",
    "HEAD_LAYER_GROUPS",
    "DEFAULT_HEAD_CANDIDATES",
    "DEFAULT_HEAD_C",
    "head_candidate_layers",
    "Progress",
    "format_duration",
    "format_table",
    "TIMESTAMP_FORMAT",
    "utc_timestamp",
    "library_versions",
    "cluster_cpus",
    "slots",
    "task_bounds",
    "quiet_environment",
    "ray_session",
    "worker_env",
    "worker_setup",
    "runtime_env",
    "log",
    "Interrupted",
    "as_interrupted",
    "handle_stop_signals",
    "RayStartError",
    "quiet_ray_data",
]
