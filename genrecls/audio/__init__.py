"""Audio files: discovering a library, decoding, segments, log-mel features, the per-file pipeline,
sample data, and the genre tags inside the files (`tags`, through mutagen).

Imports only :mod:`genrecls.core`.
"""

from genrecls.audio.decode import AudioError, AudioWarning, AudioInfo, probe, iter_mono_blocks, read_mono, check_regular_file
from genrecls.audio.discovery import Track, Problem, Discovery, AUDIO_EXTENSIONS, discover, discover_folder, discover_manifest, track_id_for
from genrecls.audio.segments import Segment, Segmenter, iter_segments, segment_starts
from genrecls.audio.features import log_mel, log_mel_reference, mel_filters, mel_basis, mel_project, hann_window, AMIN, feature_differences, check_same_features
from genrecls.audio.pipeline import TrackFeatures, FeatureStream, feature_batch, fingerprint_file, track_features, sampled_track_features, tune_allocator, one_thread
from genrecls.audio.sample_data import GENRES, FORMATS, synthesize, write_audio, make_sample_collection
from genrecls.audio.tags import PROVENANCE, FORMATS as TAG_FORMATS, TagError, open_tags, genre_key, provenance_key, read_fields, current_genres, read_provenance, field, touched, new_fields, write_fields, id3_version, foreign_genre, ffmpeg_genre

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
    "PROVENANCE",
    "TAG_FORMATS",
    "TagError",
    "open_tags",
    "genre_key",
    "provenance_key",
    "read_fields",
    "current_genres",
    "read_provenance",
    "field",
    "touched",
    "new_fields",
    "write_fields",
    "id3_version",
    "foreign_genre",
    "ffmpeg_genre",
]
