"""From a file to its segments' spectrograms: decode -> segment -> features, no Ray inside.

Shared unchanged by ingest (every segment, stored) and classification (at most K evenly
spaced segments, scored), so that both compute identical inputs for the model.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from .audio import AudioError, iter_mono_blocks, probe
from .config import FeatureConfig
from .features import log_mel
from .segments import iter_segments, segment_starts

__all__ = ["TrackFeatures", "fingerprint_file", "track_features", "sampled_track_features"]

#: segments turned into spectrograms at once (bounded memory, good cache use)
FEATURE_BATCH = 16


@dataclass
class TrackFeatures:
    mels: np.ndarray  # (n_segments, n_mels, n_frames) float32
    starts: list[float]  # start of each segment in seconds
    duration: float  # seconds of audio decoded (whole track for ingest)


def fingerprint_file(path: str, chunk: int = 1 << 20) -> str:
    """BLAKE2b-128 of the file's bytes: the content fingerprint stored with every track."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _features_of(segments, cfg: FeatureConfig) -> tuple[np.ndarray, list[float]]:
    mels, starts, pending = [], [], []

    def flush():
        if pending:
            mels.append(log_mel(np.stack(pending), cfg))
            pending.clear()

    for seg in segments:
        pending.append(seg.samples)
        starts.append(seg.start_sample / cfg.sample_rate)
        if len(pending) >= FEATURE_BATCH:
            flush()
    flush()
    if not mels:
        raise AudioError("too_short", "the track produced no segment")
    return np.concatenate(mels), starts


def track_features(path: str | os.PathLike, cfg: FeatureConfig) -> TrackFeatures:
    """All segments of a track (up to ``cfg.max_segments_per_track``), decoded in blocks.

    Raises :class:`AudioError` with a recorded reason for any unusable file.
    """
    total = [0]

    def counted(blocks):
        for b in blocks:
            total[0] += b.size
            yield b

    blocks = iter_mono_blocks(path, sample_rate=cfg.sample_rate, quality=cfg.resample_quality)
    mels, starts = _features_of(iter_segments(counted(blocks), cfg), cfg)
    return TrackFeatures(mels, starts, total[0] / cfg.sample_rate)


def sampled_track_features(path: str | os.PathLike, cfg: FeatureConfig, max_segments: int) -> TrackFeatures:
    """At most ``max_segments`` evenly spaced segments, decoding only those windows (seeking).

    With ``max_segments <= 0`` or a track short enough, this is the same as
    :func:`track_features` (every segment).
    """
    info = probe(path)
    seg_src = int(np.ceil(cfg.segment_samples * info.sample_rate / cfg.sample_rate))
    hop_src = cfg.segment_hop * info.sample_rate / cfg.sample_rate
    n_full = 0 if info.frames < seg_src else 1 + int((info.frames - seg_src) // hop_src)
    if max_segments <= 0 or n_full <= max_segments:
        return track_features(path, cfg)
    starts_src = segment_starts(info.frames, info.sample_rate, cfg, max_segments)
    # decode a little more than a segment so the resampler's delay is filled
    window = seg_src + int(0.05 * info.sample_rate)
    segments = []
    for start in starts_src:
        audio = np.concatenate(list(iter_mono_blocks(
            path, sample_rate=cfg.sample_rate, quality=cfg.resample_quality,
            start_frame=start, max_frames=window, check_silence=False)))
        seg = np.zeros(cfg.segment_samples, np.float32)
        part = audio[: cfg.segment_samples]
        seg[: part.size] = part
        segments.append(seg)
    mels = np.concatenate([log_mel(np.stack(segments[i:i + FEATURE_BATCH]), cfg)
                           for i in range(0, len(segments), FEATURE_BATCH)])
    peak_db = float(mels.max())
    if peak_db <= 10 * np.log10(1e-10) + 1e-3:
        raise AudioError("silent", "the sampled segments are silent")
    return TrackFeatures(mels, [s / info.sample_rate for s in starts_src], info.duration)
