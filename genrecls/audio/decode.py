"""Decoding: any audio file FFmpeg reads, as mono float32 blocks at a target rate.

Files are decoded with FFmpeg's libraries through PyAV (the wheels bundle them): MP3 and
MP2, AAC/M4A/ALAC, FLAC, Ogg Vorbis and Opus, WAV/RF64/AIFF, WMA and more, recognised by
content, not by extension.  Memory is bounded whatever the track's length: packets are
decoded in order, mixed down to mono in blocks and resampled with a streaming soxr
resampler, so a 3-hour mix never sits in memory whole.

What a file's header says about its length is evidence, not a verdict.  Decodable audio
is kept; a disagreement becomes a *warning* (see :mod:`genrecls.storage.records`) appended to the
``warnings`` list the caller passes: a stream that ends before its header's length
(``truncated``, a failure instead with ``on_truncated="fail"``), frames that did not decode
and were skipped (``corrupt_frames``), an MP3 whose length is only a bitrate estimate
(``length_estimate``).  A file fails, with :class:`AudioError`, only when nothing in it
decodes, or it breaks a policy (silent, non-finite, past its deadline).

Only regular files are opened: a FIFO, socket or device is refused from its ``stat``.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soxr

from genrecls.core.errors import AudioError, not_regular_reason

__all__ = ["AudioError", "AudioWarning", "AudioInfo", "probe", "iter_mono_blocks", "read_mono", "check_regular_file",
           "audio_fingerprint", "new_audio_hash"]

#: a track whose peak stays below this (about -120 dBFS) is treated as silence
SILENCE_PEAK = 1e-6
#: decoded length below this share of an exact header length is a truncation
TRUNCATED_BELOW = 0.98
#: an estimated length off by more than this share is reported
ESTIMATE_TOLERANCE = 0.02
#: packets that fail to decode before the file is given up (a file of noise, not a damaged one)
MAX_BAD_PACKETS = 64

_BLOCK_FRAMES = 1 << 16

#: containers whose header declares the stream's length (FLAC STREAMINFO, an MP3 Xing/LAME/VBRI
#: frame count, MP4's moov, a WAV/AIFF data size): decoding less is evidence of a cut.  An Ogg
#: stream's length is FFmpeg's inference from its last page (wrong for chained streams); an
#: Ogg file cut short is known by its missing end-of-stream page instead.
_DECLARES_LENGTH = {"flac", "mp3", "mov", "wav", "aiff", "w64", "caf"}

# sample scale of FFmpeg's integer sample formats (planar or packed)
_INT_SCALE = {"s16": 1 / 32768, "s32": 1 / 2147483648, "u8": 1 / 128, "s64": 1 / 9223372036854775808}




@dataclass(frozen=True)
class AudioWarning:
    """Something off about a file whose audio is kept: a short ``kind`` and a ``reason``."""

    kind: str
    reason: str


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    channels: int
    #: the header's length in frames (0 if unknown); an estimate unless ``exact_length``
    frames: int
    #: FFmpeg's container (``mp3``, ``flac``, ``ogg``, ``wav``, ...)
    format: str
    #: FFmpeg's decoder (``mp3float``, ``flac``, ``vorbis``, ``opus``, ``pcm_s16le``, ...)
    codec: str
    exact_length: bool = True

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def check_regular_file(path: str | os.PathLike) -> int:
    """The file's size; raises :class:`AudioError` for anything that must not be opened.

    FIFOs, sockets and devices are refused from their ``stat`` (opening a FIFO blocks until
    a writer comes, which may be never).
    """
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise AudioError("missing", f"file does not exist: {p}") from None
    except OSError as exc:
        raise AudioError("unreadable", f"cannot stat file: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise AudioError("unreadable", "the path is a folder, not a file")
    reason = not_regular_reason(st)
    if reason:
        raise AudioError("not_regular", reason)
    if not os.access(p, os.R_OK):
        raise AudioError("unreadable", "permission denied (the file is not readable by this user)")
    if st.st_size == 0:
        raise AudioError("empty", "the file is empty (0 bytes)")
    return st.st_size


def _ffmpeg_message(exc: BaseException) -> str:
    msg = getattr(exc, "strerror", None) or str(exc)
    return str(msg).strip().rstrip(".")


def _open(path: str | Path):
    """Open a container with its first audio stream: ``(container, stream)``."""
    import av

    p = os.fspath(path)
    check_regular_file(p)
    try:
        container = av.open(p, mode="r", metadata_errors="ignore")
    except PermissionError:
        raise AudioError("unreadable", "permission denied (the file is not readable by this user)") from None
    except FileNotFoundError:
        raise AudioError("missing", f"file does not exist: {p}") from None
    except (av.error.InvalidDataError, av.error.EOFError) as exc:
        raise AudioError("undecodable", f"not a readable audio file: FFmpeg recognises no audio format in its "
                                        f"content ({_ffmpeg_message(exc)})") from None
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise AudioError("undecodable", f"not a readable audio file ({_ffmpeg_message(exc)})") from None
    if not container.streams.audio:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        container.close()
        raise AudioError("undecodable", f"not a readable audio file: it holds no audio stream ({', '.join(kinds)})")
    stream = container.streams.audio[0]
    ctx = stream.codec_context
    if not ctx.sample_rate or not ctx.channels:
        container.close()
        raise AudioError("undecodable", f"not a readable audio file: its audio header is invalid "
                                        f"(rate {ctx.sample_rate}, channels {ctx.channels})")
    ctx.thread_count = 1  # one decoder thread: the workers already run one task per CPU
    return container, stream


def _mp3_has_length_header(path: str) -> bool:
    """True if the first MP3 frame holds a Xing/Info/VBRI header (an exact frame count)."""
    with open(path, "rb") as f:
        head = f.read(10)
        offset = 0
        if head[:3] == b"ID3" and len(head) == 10:
            size = ((head[6] & 0x7F) << 21) | ((head[7] & 0x7F) << 14) | ((head[8] & 0x7F) << 7) | (head[9] & 0x7F)
            offset = 10 + size + (10 if head[5] & 0x10 else 0)
        f.seek(offset)
        data = f.read(16384)
    sync = next((i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] & 0xE0 == 0xE0), None)
    if sync is None:
        return False
    first = data[sync:sync + 200]
    return b"Xing" in first or b"Info" in first or b"VBRI" in first


def _container_cut_short(path: str, fmt: str) -> str | None:
    """Evidence in the container that the file was cut short, for formats whose length FFmpeg infers.

    An Ogg stream's last page carries the end-of-stream flag; a RIFF WAVE file's ``data``
    chunk states its size (0xFFFFFFFF or 0: written to a pipe, the length is unknown).
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if fmt == "ogg":
            f.seek(max(0, size - 65536))
            tail = f.read()
            at = tail.rfind(b"OggS")
            if at >= 0 and at + 5 < len(tail) and not tail[at + 5] & 0x04:
                return "the Ogg stream ends without its end-of-stream page (file cut short?)"
        elif fmt == "wav":
            head = f.read(12)
            if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            pos = 12
            while pos + 8 <= size:
                f.seek(pos)
                chunk = f.read(8)
                n = int.from_bytes(chunk[4:8], "little")
                if chunk[:4] == b"data":
                    if n in (0, 0xFFFFFFFF):
                        return None
                    if pos + 8 + n > size:
                        return (f"the WAV header declares {n} bytes of audio data, the file holds "
                                f"{size - pos - 8} (file cut short?)")
                    return None
                pos += 8 + n + (n & 1)
    return None


def _declared_frames(container, stream) -> int:
    rate = stream.codec_context.sample_rate
    if stream.duration and stream.time_base:
        return int(round(float(stream.duration * stream.time_base) * rate))
    if container.duration:
        return int(round(container.duration / 1_000_000 * rate))
    return 0


def _info(container, stream, path: str) -> AudioInfo:
    ctx = stream.codec_context
    fmt = container.format.name.split(",")[0]
    exact = not (fmt == "mp3" and not _mp3_has_length_header(path))
    return AudioInfo(ctx.sample_rate, ctx.channels, _declared_frames(container, stream), fmt, ctx.name, exact)


def probe(path: str | Path) -> AudioInfo:
    """Read a file's header: rate, channels, declared frames, container and codec.  Raises :class:`AudioError`."""
    container, stream = _open(path)
    with container:
        return _info(container, stream, os.fspath(path))


def _planar(frame) -> np.ndarray:
    """A decoded frame as float32 (channels, samples)."""
    a = frame.to_ndarray()
    fmt = frame.format
    if not fmt.is_planar:
        a = a.reshape(-1, len(frame.layout.channels)).T
    name = fmt.name.rstrip("p")
    if a.dtype == np.float32:
        return a
    if name in _INT_SCALE:
        out = a.astype(np.float32)
        if name == "u8":
            out -= 128.0
        out *= np.float32(_INT_SCALE[name])
        return out
    return a.astype(np.float32)


def _to_mono(block: np.ndarray) -> np.ndarray:
    """Mix a (channels, frames) block down to mono (a fresh, contiguous array)."""
    channels = block.shape[0]
    if channels == 1:
        return np.ascontiguousarray(block[0])
    mono = block[0] + block[1]
    for c in range(2, channels):
        mono += block[c]
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
    on_truncated: str = "keep",
    deadline: float | None = None,
    warnings: list[AudioWarning] | None = None,
    packet_hash: Any = None,
) -> Iterator[np.ndarray]:
    """Yield mono float32 blocks of ``path`` resampled to ``sample_rate``.

    Parameters
    ----------
    path : file to decode (format recognised from content, not extension)
    sample_rate : output rate in Hz
    quality : soxr quality recipe
    block_frames : source frames mixed and resampled per step (memory bound)
    start_frame, max_frames : decode only a window of the file (in source frames; seeks)
    check_silence : raise ``AudioError('silent')`` at the end if the whole track was silent
    on_truncated : ``"keep"`` the audio of a stream that ends before its header's length (a
        warning), or ``"fail"`` the file
    deadline : ``time.monotonic()`` value past which decoding stops with ``AudioError('timed_out')``
    warnings : a list that receives an :class:`AudioWarning` for each problem the audio survives
    packet_hash : a hash object (:func:`new_audio_hash`) fed every demuxed packet of a whole-file decode: its
        hex digest is then :func:`audio_fingerprint`'s, at no extra read

    Raises
    ------
    AudioError
        with kinds ``missing``, ``unreadable``, ``not_regular``, ``empty``, ``undecodable``,
        ``truncated``, ``timed_out``, ``non_finite`` or ``silent``; the blocks already yielded
        must then be discarded.
    """
    import av

    p = os.fspath(path)
    started = time.monotonic()
    container, stream = _open(p)
    with container:
        info = _info(container, stream, p)
        src_rate = info.sample_rate
        skip = 0  # source frames to drop before the window starts
        if start_frame:
            try:
                container.seek(int(start_frame / src_rate / stream.time_base), stream=stream, backward=True)
            except av.FFmpegError as exc:
                raise AudioError("undecodable", f"the file is not seekable ({_ffmpeg_message(exc)})") from None
            skip = None  # known from the first frame's timestamp
        resampler = None if src_rate == sample_rate else soxr.ResampleStream(
            src_rate, sample_rate, 1, dtype="float32", quality=quality)
        state = {"decoded": 0, "peak": 0.0}
        pending: list[np.ndarray] = []
        pending_frames = 0
        bad_packets, first_error, broke_off = 0, None, None
        remaining = max_frames

        def emit(last: bool) -> np.ndarray | None:
            nonlocal pending, pending_frames
            if not pending:
                mono = np.zeros(0, np.float32)
            else:
                block = pending[0] if len(pending) == 1 else np.concatenate(pending, axis=1)
                mono = _to_mono(block)
            pending, pending_frames = [], 0
            if mono.size:
                block_peak = max(float(mono.max()), -float(mono.min()))  # no |x| temporary; NaN propagates
                if not np.isfinite(block_peak):
                    raise AudioError("non_finite", "the audio holds NaN or infinite samples "
                                                   f"(near {state['decoded'] / src_rate:.1f} s)")
                state["peak"] = max(state["peak"], block_peak)
                state["decoded"] += mono.size
            out = mono if resampler is None else resampler.resample_chunk(mono, last=last)
            return out if out.size else None

        done = False
        packets = container.demux(stream)
        while not done:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except (av.FFmpegError, OSError) as exc:  # the container breaks off
                broke_off = exc
                break
            if packet_hash is not None and packet.size:
                packet_hash.update(bytes(packet))
            if deadline is not None and time.monotonic() > deadline:
                raise AudioError("timed_out", f"decoding ran past this file's deadline "
                                              f"({deadline - started:.1f} s; decode.timeout_seconds and "
                                              f"decode.timeout_seconds_per_mb set it) after "
                                              f"{state['decoded'] / src_rate:.1f} s of audio")
            try:
                frames = packet.decode()
            except av.FFmpegError as exc:
                bad_packets += 1
                first_error = first_error or exc
                if bad_packets >= MAX_BAD_PACKETS and state["decoded"] + pending_frames == 0:
                    break
                continue
            for frame in frames:
                a = _planar(frame)
                if skip is None:  # first frame after a seek: drop what lies before the window
                    pos = int(round(float(frame.pts * frame.time_base) * src_rate)) if frame.pts is not None else start_frame
                    skip = max(0, start_frame - pos)
                if skip:
                    drop = min(skip, a.shape[1])
                    a, skip = a[:, drop:], skip - drop
                    if not a.shape[1]:
                        continue
                if remaining is not None:
                    a = a[:, :remaining]
                    remaining -= a.shape[1]
                pending.append(a)
                pending_frames += a.shape[1]
                if remaining is not None and remaining <= 0:
                    done = True
                    break
                if pending_frames >= block_frames:
                    out = emit(last=False)
                    if out is not None:
                        yield out
        tail = emit(last=True)
        if tail is not None:
            yield tail

        decoded = state["decoded"]
        whole = start_frame == 0 and max_frames is None
        if decoded == 0 and not whole:
            return  # a window past the end of the stream
        if decoded == 0:
            if first_error is not None or broke_off is not None:
                err = first_error or broke_off
                raise AudioError("undecodable", f"not a readable audio file: no frame of its {info.codec} stream "
                                                f"decodes ({_ffmpeg_message(err)})")
            raise AudioError("empty", "the file holds no audio frames")
        notes: list[AudioWarning] = []
        truncated = None
        if broke_off is not None:
            truncated = (f"the stream breaks off after {decoded / src_rate:.1f} s "
                         f"({_ffmpeg_message(broke_off)}); the audio before it is kept")
        elif (whole and info.exact_length and info.format in _DECLARES_LENGTH and info.frames
              and decoded < info.frames * TRUNCATED_BELOW):
            truncated = (f"the stream ends early: decoded {decoded / src_rate:.1f} s of the "
                         f"{info.frames / src_rate:.1f} s its header declares (file cut short?)")
        elif whole and info.format in ("ogg", "wav"):
            truncated = _container_cut_short(p, info.format)
        if truncated:
            if on_truncated == "fail":
                raise AudioError("truncated", truncated + " (decode.on_truncated = fail)")
            notes.append(AudioWarning("truncated", truncated))
        if bad_packets and not (truncated and bad_packets == 1):  # one bad last packet is part of the cut
            notes.append(AudioWarning("corrupt_frames", f"{bad_packets} packet(s) did not decode and were skipped "
                                                        f"({_ffmpeg_message(first_error)})"))
        if whole and not info.exact_length and info.frames and abs(decoded - info.frames) > ESTIMATE_TOLERANCE * info.frames:
            notes.append(AudioWarning("length_estimate", f"the MP3 has no Xing/LAME/VBRI header: its length estimate "
                                                         f"({info.frames / src_rate:.1f} s) differs from the "
                                                         f"{decoded / src_rate:.1f} s decoded"))
        if check_silence and whole and state["peak"] < SILENCE_PEAK:
            raise AudioError("silent", f"the track is silent (peak {state['peak']:.1e}, below -120 dBFS)")
        if warnings is not None:
            warnings.extend(notes)


def new_audio_hash():
    """The hash an audio fingerprint is made with (BLAKE2b-128 of the audio stream's packets)."""
    import hashlib

    return hashlib.blake2b(digest_size=16, person=b"genrecls-audio")


def audio_fingerprint(path: str | Path) -> str:
    """BLAKE2b-128 of the compressed audio packets of a file's audio stream, demuxed but not decoded.

    Tags live outside the packets (ID3, APE and Vorbis comments, MP4 atoms, FLAC metadata blocks,
    RIFF chunks), so editing them leaves this fingerprint as it was while the file's bytes (and its
    :func:`~genrecls.audio.pipeline.fingerprint_file`) change: ingest tells a re-tagged file from
    new audio without decoding it.  Measured on the committed real-encoder files (lame, ffmpeg,
    flac, oggenc, opusenc; MP3, FLAC, Ogg Vorbis, Opus, WAV, AIFF): equal before and after a genre
    tag was written, but for a WAV cut inside its data chunk (a tag chunk appended to it reads as
    audio: the file then counts as changed, and is decoded again, which is safe).  Raises
    :class:`AudioError` for a file FFmpeg cannot open.
    """
    import av

    h = new_audio_hash()
    container, stream = _open(os.fspath(path))
    with container:
        try:
            for packet in container.demux(stream):
                if packet.size:
                    h.update(bytes(packet))
        except (av.FFmpegError, OSError) as exc:
            raise AudioError("undecodable", f"the container breaks off ({_ffmpeg_message(exc)})") from None
    return h.hexdigest()


def read_mono(path: str | Path, *, sample_rate: int, quality: str = "HQ", **kwargs) -> np.ndarray:
    """Decode a whole file to one mono array (for short files and tests)."""
    blocks = list(iter_mono_blocks(path, sample_rate=sample_rate, quality=quality, **kwargs))
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
