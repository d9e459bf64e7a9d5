"""From a file to its segments' spectrograms: decode -> segment -> features, no Ray inside.

Shared unchanged by ingest (every segment, stored) and classification (at most K evenly
spaced segments, scored), so that both compute identical inputs for the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass

import numpy as np

from genrecls.audio.decode import (
    AudioError,
    AudioWarning,
    check_regular_file,
    iter_mono_blocks,
    new_audio_hash,
    probe,
)
from genrecls.audio.features import log_mel
from genrecls.audio.segments import iter_segments, segment_starts
from genrecls.core.config import DecodeConfig, FeatureConfig

__all__ = ["TrackFeatures", "FeatureStream", "feature_batch", "fingerprint_file", "track_features", "sampled_track_features",
           "tune_allocator", "one_thread"]

#: segments turned into spectrograms at once, at most (bounded memory)
FEATURE_BATCH = 16
#: target size of one batch's STFT frames: small enough to stay in cache (measured fastest)
_BATCH_FRAME_BYTES = 4 << 20

_ALLOCATOR_TUNED = False


def tune_allocator() -> None:
    """Keep freed memory for reuse in this (worker) process instead of returning it to the OS.

    glibc serves every allocation above 128 KiB-32 MiB (decoded blocks, STFT frames, row
    groups) with a fresh ``mmap`` and unmaps it on free, so each one page-faults anew: about
    5 000 faults per track, 15-20% of the CPU time of an ingest or classify decoding task
    (bench/ingest_parts.py, bench/classify.py).  Raising the mmap and trim thresholds lets the heap
    recycle those buffers.  Called once per worker process; a no-op off glibc.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return
    _ALLOCATOR_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 64 << 20)
        libc.mallopt(m_trim_threshold, 128 << 20)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def one_thread():
    """Run the block with one thread in each native pool: BLAS/OpenMP (threadpoolctl) and pyarrow's.

    Decoding holds one CPU per batch.  In the command's own process (a small run without
    Ray) and in any process started without ``OMP_NUM_THREADS``, NumPy's OpenBLAS has one
    thread per core, and the mel projection's small matrix products then keep a second
    thread spinning: 2.5 instead of 1.2 CPU-seconds for the same 16 tracks
    (bench/ingest_profile.py's notes).  Ray's own workers already start with
    ``OMP_NUM_THREADS=1``; there the caps change nothing but also guard against a cluster
    whose environment sets more.  The pools are restored on exit, so a caller's own process
    (a test, a notebook) keeps its settings.
    """
    from threadpoolctl import threadpool_limits

    try:
        import pyarrow as pa
    except ImportError:  # pragma: no cover - a dependency
        pa = None
    cpus = pa.cpu_count() if pa is not None else None
    with threadpool_limits(limits=1):
        if pa is not None:
            pa.set_cpu_count(1)
        try:
            yield
        finally:
            if pa is not None:
                pa.set_cpu_count(cpus)


def feature_batch(cfg: FeatureConfig) -> int:
    """Segments per :func:`log_mel` call: about 4 MiB of STFT frames (2 default segments)."""
    per_segment = cfg.n_frames * cfg.n_fft * 4
    return max(1, min(FEATURE_BATCH, _BATCH_FRAME_BYTES // per_segment))


@dataclass
class TrackFeatures:
    mels: np.ndarray  # (n_segments, n_mels, n_frames) float32
    starts: list[float]  # start of each segment in seconds
    duration: float  # seconds of audio decoded (whole track for ingest)
    warnings: list[AudioWarning]  # what is off about the file, its audio kept


def fingerprint_file(path: str, chunk: int = 1 << 20) -> str:
    """BLAKE2b-128 of the file's bytes: the content fingerprint stored with every track."""
    h = hashlib.blake2b(digest_size=16)
    check_regular_file(path)  # never open a FIFO or a device
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


class FeatureStream:
    """The spectrograms of one track, batch by batch as decoding goes (bounded memory).

    Iterating yields ``(mels, starts)``: float32 arrays of shape (k, n_mels, n_frames) and
    the k segment start times in seconds.  Once the iteration has ended, ``duration`` holds
    the seconds of audio decoded, ``segments`` the number of segments, ``warnings`` what is
    off about the file although its audio is kept (:class:`~genrecls.audio.decode.AudioWarning`)
    and ``audio_fingerprint`` the file's :func:`~genrecls.audio.decode.audio_fingerprint`, hashed
    from the packets as they were decoded (None when decoding stopped early: a segment cap).
    ``decode`` sets the truncation policy and the file's deadline (from its size).

    Raises :class:`AudioError` during the iteration for any unusable file (including at
    the very end: a silent or truncated track is only known once it is decoded); the
    batches already yielded must then be discarded.

    Examples
    --------
    >>> stream = FeatureStream("song.flac", cfg)          # doctest: +SKIP
    >>> for mels, starts in stream: ...                   # doctest: +SKIP
    >>> stream.duration, stream.segments                  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike, cfg: FeatureConfig, decode: DecodeConfig | None = None):
        self.path = path
        self.cfg = cfg
        self.decode = decode or DecodeConfig()
        self.duration = 0.0
        self.segments = 0
        self.warnings: list[AudioWarning] = []
        self.audio_fingerprint: str | None = None

    def __iter__(self):
        cfg = self.cfg
        samples = 0
        packets = new_audio_hash()
        blocks = iter_mono_blocks(self.path, **decode_options(self.path, cfg, self.decode), warnings=self.warnings,
                                  packet_hash=packets)
        whole = False

        def counted():
            nonlocal samples, whole
            try:
                for b in blocks:
                    samples += b.size
                    yield b
                whole = True
            finally:
                blocks.close()

        batch = feature_batch(cfg)
        pending, starts = [], []
        for seg in iter_segments(counted(), cfg):
            pending.append(seg.samples)
            starts.append(seg.start_sample / cfg.sample_rate)
            if len(pending) >= batch:
                self.segments += len(pending)
                yield log_mel(pending, cfg), starts
                pending, starts = [], []
        if pending:
            self.segments += len(pending)
            yield log_mel(pending, cfg), starts
        self.duration = samples / cfg.sample_rate
        self.audio_fingerprint = packets.hexdigest() if whole else None
        if self.segments == 0:
            raise AudioError("too_short", "the track produced no segment")


def decode_options(path: str | os.PathLike, cfg: FeatureConfig, decode: DecodeConfig) -> dict:
    """Keyword arguments of :func:`~genrecls.audio.decode.iter_mono_blocks` for one file: rate, policy, deadline."""
    deadline = time.monotonic() + decode.deadline_seconds(check_regular_file(path))
    return {"sample_rate": cfg.sample_rate, "quality": cfg.resample_quality, "on_truncated": decode.on_truncated,
            "deadline": deadline}


def track_features(path: str | os.PathLike, cfg: FeatureConfig, decode: DecodeConfig | None = None) -> TrackFeatures:
    """All segments of a track (up to ``cfg.max_segments_per_track``), decoded in blocks, in memory.

    Raises :class:`AudioError` with a recorded reason for any unusable file.  Ingest uses
    :class:`FeatureStream` instead, which never holds a long track's float32 spectrograms.
    """
    stream = FeatureStream(path, cfg, decode)
    mels, starts = [], []
    for m, s in stream:
        mels.append(m)
        starts.extend(s)
    return TrackFeatures(np.concatenate(mels), starts, stream.duration, stream.warnings)


def sampled_track_features(path: str | os.PathLike, cfg: FeatureConfig, max_segments: int,
                           decode: DecodeConfig | None = None) -> TrackFeatures:
    """At most ``max_segments`` evenly spaced segments, decoding only those windows (seeking).

    With ``max_segments <= 0`` or a track short enough, this is the same as
    :func:`track_features` (every segment).  A header whose length is only an estimate (an
    MP3 without a Xing/LAME/VBRI header) is not sampled, and a stream that ends before the
    last window (a file cut short) is decoded whole: either way the track's warnings and the
    truncation policy are those of :func:`track_features`.
    """
    decode = decode or DecodeConfig()
    info = probe(path)
    if not info.exact_length:  # the windows' places would be guesses: decode it all (a warning may be due)
        return track_features(path, cfg, decode)
    seg_src = int(np.ceil(cfg.segment_samples * info.sample_rate / cfg.sample_rate))
    hop_src = cfg.segment_hop * info.sample_rate / cfg.sample_rate
    n_full = 0 if info.frames < seg_src else 1 + int((info.frames - seg_src) // hop_src)
    if max_segments <= 0 or n_full <= max_segments:
        return track_features(path, cfg, decode)
    starts_src = segment_starts(info.frames, info.sample_rate, cfg, max_segments)
    # decode a little more than a segment so the resampler's delay is filled
    window = seg_src + int(0.05 * info.sample_rate)
    options = decode_options(path, cfg, decode)  # one deadline for all the windows
    segments, kept_starts = [], []
    for start in starts_src:
        blocks = list(iter_mono_blocks(path, **options, start_frame=start, max_frames=window, check_silence=False))
        audio = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
        if audio.size < cfg.segment_samples // 2:  # past the real end of the stream
            continue
        seg = np.zeros(cfg.segment_samples, np.float32)
        part = audio[: cfg.segment_samples]
        seg[: part.size] = part
        segments.append(seg)
        kept_starts.append(start)
    if len(segments) < len(starts_src):  # the stream ends before its header says: decode it whole, so that
        return track_features(path, cfg, decode)  # the truncation rules (a warning, or decode.on_truncated) apply
    batch = feature_batch(cfg)
    mels = np.concatenate([log_mel(np.stack(segments[i:i + batch]), cfg)
                           for i in range(0, len(segments), batch)])
    peak_db = float(mels.max())
    if peak_db <= 10 * np.log10(1e-10) + 1e-3:
        raise AudioError("silent", "the sampled segments are silent")
    return TrackFeatures(mels, [s / info.sample_rate for s in kept_starts], info.duration, [])
