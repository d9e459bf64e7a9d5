"""Audio in: discovering a library, decoding, segments, log-mel features, the per-file pipeline, sample data.

Imports only :mod:`genrecls.core`.
"""

from genrecls.audio.decode import (
    AudioError,
    AudioInfo,
    AudioWarning,
    check_regular_file,
    iter_mono_blocks,
    probe,
    read_mono,
)
from genrecls.audio.discovery import (
    AUDIO_EXTENSIONS,
    Discovery,
    Problem,
    Track,
    discover,
    discover_folder,
    discover_manifest,
    track_id_for,
)
from genrecls.audio.features import (
    AMIN,
    check_same_features,
    feature_differences,
    hann_window,
    log_mel,
    log_mel_reference,
    mel_basis,
    mel_filters,
    mel_project,
)
from genrecls.audio.pipeline import (
    FeatureStream,
    TrackFeatures,
    feature_batch,
    fingerprint_file,
    one_thread,
    sampled_track_features,
    track_features,
    tune_allocator,
)
from genrecls.audio.sample_data import FORMATS, GENRES, make_sample_collection, synthesize, write_audio
from genrecls.audio.segments import Segment, Segmenter, iter_segments, segment_starts

__all__ = [
    "AudioError",
    "AudioWarning",
    "AudioInfo",
    "probe",
    "iter_mono_blocks",
    "read_mono",
    "check_regular_file",
    "Track",
    "Problem",
    "Discovery",
    "AUDIO_EXTENSIONS",
    "discover",
    "discover_folder",
    "discover_manifest",
    "track_id_for",
    "Segment",
    "Segmenter",
    "iter_segments",
    "segment_starts",
    "log_mel",
    "log_mel_reference",
    "mel_filters",
    "mel_basis",
    "mel_project",
    "hann_window",
    "AMIN",
    "feature_differences",
    "check_same_features",
    "TrackFeatures",
    "FeatureStream",
    "feature_batch",
    "fingerprint_file",
    "track_features",
    "sampled_track_features",
    "tune_allocator",
    "one_thread",
    "GENRES",
    "FORMATS",
    "synthesize",
    "write_audio",
    "make_sample_collection",
]
