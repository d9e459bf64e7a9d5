"""Decoding: any file libsndfile reads, as mono float32 blocks at a target rate.

Memory is bounded whatever the track's length: the file is read in blocks, mixed down
to mono and resampled with a streaming soxr resampler, so a 3-hour mix never sits in
memory whole.  Every problem with a file is raised as :class:`AudioError` with a
reason a person understands and a short machine-readable ``kind``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

__all__ = ["AudioError", "AudioInfo", "probe", "iter_mono_blocks", "read_mono", "UNSUPPORTED_EXTENSIONS"]

#: containers libsndfile cannot read; recorded as unsupported with this reason
UNSUPPORTED_EXTENSIONS = {
    ".m4a": "AAC/ALAC in an MP4 container",
    ".mp4": "MP4 container",
    ".aac": "raw AAC",
    ".wma": "Windows Media Audio",
    ".ape": "Monkey's Audio",
    ".alac": "ALAC",
}

#: a track whose peak stays below this (about -120 dBFS) is treated as silence
SILENCE_PEAK = 1e-6

_BLOCK_FRAMES = 1 << 16


class AudioError(Exception):
    """A track that cannot be used, with a reason (message) and a short ``kind``."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind

    @property
    def reason(self) -> str:
        return f"{self.kind}: {self}"


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    channels: int
    frames: int
    format: str
    subtype: str

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def _open(path: str | Path) -> sf.SoundFile:
    p = os.fspath(path)
    ext = os.path.splitext(p)[1].lower()
    try:
        size = os.path.getsize(p)
    except FileNotFoundError:
        raise AudioError("missing", f"file does not exist: {p}") from None
    except OSError as exc:
        raise AudioError("unreadable", f"cannot stat file: {exc.strerror or exc}") from None
    if not os.access(p, os.R_OK):
        raise AudioError("unreadable", "permission denied (the file is not readable by this user)")
    if size == 0:
        raise AudioError("empty", "the file is empty (0 bytes)")
    try:
        return sf.SoundFile(p)
    except sf.LibsndfileError as exc:
        if ext in UNSUPPORTED_EXTENSIONS:
            raise AudioError(
                "unsupported",
                f"{UNSUPPORTED_EXTENSIONS[ext]} ({ext}) is not decodable by libsndfile; convert it to FLAC/OGG/MP3",
            ) from None
        raise AudioError("undecodable", f"not a readable audio file: its content is not a format libsndfile "
                                        f"recognises ({_libsndfile_message(exc)})") from None
    except PermissionError:
        raise AudioError("unreadable", "permission denied (the file is not readable by this user)") from None
    except OSError as exc:
        raise AudioError("unreadable", f"cannot open file: {exc}") from None
    except RuntimeError as exc:  # older soundfile versions
        raise AudioError("undecodable", f"not a readable audio file ({exc})") from None


def _libsndfile_message(exc: Exception) -> str:
    msg = str(getattr(exc, "error_string", None) or exc).strip().rstrip(".")
    if "does not exist or is not a regular file" in msg:  # what libsndfile says when mpg123 finds no frame
        return "no valid audio frames found"
    return msg


def _check_header(f: sf.SoundFile) -> None:
    if f.samplerate <= 0 or f.channels <= 0:
        raise AudioError("undecodable", f"invalid header (rate {f.samplerate}, channels {f.channels})")
    log = getattr(f, "extra_info", "") or ""
    if "Last page lacks an end-of-stream bit" in log:
        raise AudioError("truncated", "the Ogg stream ends without its end-of-stream page (file cut short)")
    if f.format in ("WAV", "WAVEX", "RF64", "W64") and "(should be" in log:
        raise AudioError("truncated", "the WAV header declares more audio data than the file holds")


def probe(path: str | Path) -> AudioInfo:
    """Read a file's header: rate, channels, frames, format.  Raises :class:`AudioError`."""
    with _open(path) as f:
        _check_header(f)
        return AudioInfo(f.samplerate, f.channels, f.frames, f.format, f.subtype)


def _to_mono(block: np.ndarray) -> np.ndarray:
    """Mix a (frames, channels) block down to mono.

    Summing columns one by one is about 15x faster than ``block.mean(axis=1)`` on an
    interleaved stereo block (the reduction over a short, strided axis is slow).
    """
    channels = block.shape[1]
    if channels == 1:
        return block[:, 0].copy()
    mono = block[:, 0] + block[:, 1]
    for c in range(2, channels):
        mono += block[:, c]
    mono *= np.float32(1.0 / channels)
    return mono


def iter_mono_blocks(
    path: str | Path,
    *,
    sample_rate: int,
    quality: str = "HQ",
    block_frames: int = _BLOCK_FRAMES,
    start_frame: int = 0,
    max_frames: int | None = None,
    check_silence: bool = True,
) -> Iterator[np.ndarray]:
    """Yield mono float32 blocks of ``path`` resampled to ``sample_rate``.

    Parameters
    ----------
    path : file to decode (format recognised from content, not extension)
    sample_rate : output rate in Hz
    quality : soxr quality recipe
    block_frames : frames read from the file per step (memory bound)
    start_frame, max_frames : decode only a window of the file (in source frames)
    check_silence : raise ``AudioError('silent')`` at the end if the whole track was silent

    Raises
    ------
    AudioError
        with kinds ``missing``, ``unreadable``, ``empty``, ``unsupported``, ``undecodable``,
        ``truncated``, ``non_finite`` or ``silent``; the blocks already yielded must be discarded.
    """
    with _open(path) as f:
        _check_header(f)
        src_rate = f.samplerate
        declared = f.frames
        if start_frame:
            if not f.seekable():
                raise AudioError("undecodable", "the file is not seekable")
            f.seek(start_frame)
        resampler = None if src_rate == sample_rate else soxr.ResampleStream(
            src_rate, sample_rate, 1, dtype="float32", quality=quality
        )
        decoded = 0
        peak = 0.0
        remaining = max_frames
        while True:
            n = block_frames if remaining is None else min(block_frames, remaining)
            if n <= 0:
                break
            try:
                block = f.read(n, dtype="float32", always_2d=True)
            except sf.LibsndfileError as exc:
                detail = _libsndfile_message(exc)
                if declared > decoded:
                    raise AudioError(
                        "truncated",
                        f"the stream breaks off after {decoded / src_rate:.1f} s of the {declared / src_rate:.1f} s "
                        f"the header declares (file cut short or corrupt: {detail})") from None
                raise AudioError("undecodable", f"decoding failed after {decoded / src_rate:.1f} s ({detail})") from None
            got = block.shape[0]
            last = got < n or (remaining is not None and remaining - got <= 0)
            if got:
                mono = _to_mono(block)
                block_peak = max(float(mono.max()), -float(mono.min()))  # no |x| temporary; NaN propagates
                if not np.isfinite(block_peak):
                    raise AudioError("non_finite", f"the audio holds NaN or infinite samples (near {decoded / src_rate:.1f} s)")
                peak = max(peak, block_peak)
                decoded += got
                if remaining is not None:
                    remaining -= got
                out = mono if resampler is None else resampler.resample_chunk(mono, last=last)
                if out.size:
                    yield out
            elif resampler is not None:
                tail = resampler.resample_chunk(np.zeros(0, np.float32), last=True)
                if tail.size:
                    yield tail
            if last or got == 0:
                break
        if decoded == 0:
            raise AudioError("empty", "the file holds no audio frames")
        whole = start_frame == 0 and max_frames is None
        # MP3 (Xing/LAME header or bitrate estimate) and FLAC (STREAMINFO) declare their length;
        # a stream that ends cleanly but early was cut short.  OGG and WAV are checked in _check_header.
        if whole and declared > 0 and decoded < declared * 0.98 and f.format in ("MP3", "MPEG", "FLAC"):
            raise AudioError(
                "truncated",
                f"the stream ends early: decoded {decoded / src_rate:.1f} s of the {declared / src_rate:.1f} s the header declares",
            )
        if check_silence and whole and peak < SILENCE_PEAK:
            raise AudioError("silent", f"the track is silent (peak {peak:.1e}, below -120 dBFS)")


def read_mono(path: str | Path, *, sample_rate: int, quality: str = "HQ", **kwargs) -> np.ndarray:
    """Decode a whole file to one mono array (for short files and tests)."""
    blocks = list(iter_mono_blocks(path, sample_rate=sample_rate, quality=quality, **kwargs))
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
