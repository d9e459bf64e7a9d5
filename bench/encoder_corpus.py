#!/usr/bin/env python
"""A corpus of files made by the encoders real libraries come from, with FFmpeg's reference lengths.

Every test and bench of genrecls used to decode audio that soundfile itself wrote.  This
script makes the project's own synthetic music (:func:`genrecls.audio.sample_data.synthesize`),
writes it as a source WAV with soundfile and encodes it with the external tools Debian
ships (``apt-get install lame ffmpeg sox flac vorbis-tools opus-tools``): MP3 CBR/VBR/ABR
with and without the Xing/LAME frame, MPEG-2/2.5 low rates, ID3v1/ID3v2.3/ID3v2.4 with
large cover art, APE tags, junk before the first frame, MP2; WAV streamed to a pipe,
WAVE_FORMAT_EXTENSIBLE, RF64, BWF, LIST chunks after the data, W64; AIFF and AIFF-C; FLAC
with and without a seek table, streamed, and with ID3 tags; Ogg Vorbis, chained; Opus at
8, 16 and 48 kHz; mono, stereo and 5.1; and truncated copies (the first 60% of the bytes).

The few tags and chunks no installed tool writes (APEv2 on MP3, ID3 on FLAC, LIST after
the data) are added to an encoder's output in Python, as a tagger would; ``made_by`` in
the manifest says so.

Layout: ``OUT/<category>/<name>.<ext>`` with categories ``mp3 mp2 wav aiff flac ogg opus
truncated``, so ``genrecls ingest OUT --out DS`` reads the categories as labels.
``OUT/manifest.json`` describes every file: how it was made, whether it is ``intact`` or
``damaged``, the source signal (seconds, rate, channels) and FFmpeg's reference: the exact
decoded length (``ffmpeg -v error -i f -f f32le -ac 1 -``, samples counted at the stream's
native rate read by ffprobe) and ffprobe's format duration.

Usage::

    python bench/encoder_corpus.py                      # full corpus in /tmp/encoder-corpus
    python bench/encoder_corpus.py /some/dir --seconds 20
    python bench/encoder_corpus.py --fixtures           # the committed subset: tests/data/encoders

The fixtures are short (3 s) and small (a few MB in all); CI has no encoders, so tests only
read them.  Encoders are deterministic here except for what the tools stamp (ffmpeg's
version string); Ogg and Opus streams get fixed serial numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from genrecls.audio import synthesize  # noqa: E402

FIXTURES_DIR = os.path.join(REPO, "tests", "data", "encoders")
TOOLS = ("lame", "ffmpeg", "ffprobe", "sox", "flac", "oggenc", "opusenc")
#: fraction of the bytes a truncated copy keeps
CUT = 0.6


# -- building blocks -----------------------------------------------------------------------
@dataclass
class Job:
    """One file to make: where it goes, its source signal, and how it is made."""

    category: str
    name: str
    ext: str
    make: Callable[["Ctx"], None]
    rate: int = 44100
    channels: int = 2
    seconds: float | None = None  # None: the run's --seconds
    fixture: bool = False
    note: str = ""

    @property
    def rel(self) -> str:
        return f"{self.category}/{self.name}.{self.ext}"


@dataclass
class Ctx:
    """What a job's ``make`` sees: the source WAV, the output path, a scratch folder, a log."""

    src: str
    out: str
    tmp: str
    rel: str
    cover: str
    seconds: float
    rate: int
    channels: int
    steps: list[str] = field(default_factory=list)
    #: seconds of signal in the file when it is not ``seconds`` (chained streams)
    content_seconds: float | None = None

    def _show(self, arg: str) -> str:
        return arg.replace(self.src, "source.wav").replace(self.out, self.rel).replace(self.cover, "cover.jpg") \
                  .replace(self.tmp + os.sep, "")

    def sh(self, *args: str, stdout: str | None = None) -> None:
        """Run an encoder; ``stdout`` names a file its standard output is piped into."""
        shown = shlex.join(self._show(a) for a in args)
        if stdout is None:
            subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        else:  # through a real pipe, so the encoder cannot seek back to fix its header
            shown += f" | cat > {self._show(stdout)}"
            with open(stdout, "wb") as f:
                p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                shutil.copyfileobj(p.stdout, f)
                if p.wait() != 0:
                    raise subprocess.CalledProcessError(p.returncode, args)
        self.steps.append(shown)

    def py(self, description: str) -> None:
        self.steps.append(f"python: {description}")

    def source(self, rate: int, channels: int, seed: int, name: str) -> str:
        """Another source WAV (for chained streams)."""
        path = os.path.join(self.tmp, name)
        write_source(path, self.seconds, rate, channels, seed)
        return path

    def t(self, name: str) -> str:
        return os.path.join(self.tmp, name)


SIGNAL_GENRES = ("rock", "jazz", "electronic", "classical", "reggae", "blues")


def signal_genre(seed: int) -> str:
    return SIGNAL_GENRES[seed % len(SIGNAL_GENRES)]


def signal(seconds: float, rate: int, channels: int, seed: int) -> np.ndarray:
    """The project's synthetic music, as (frames, channels) float32; 5.1 built from the stereo mix."""
    st = synthesize(signal_genre(seed), seconds, sr=rate, seed=seed)
    left, right = st[:, 0], st[:, 1]
    if channels == 1:
        out = ((left + right) / 2)[:, None]
    elif channels == 2:
        out = st
    elif channels == 6:  # L R C LFE Ls Rs
        d = max(1, rate // 100)  # 10 ms delay for the surrounds
        lfe = np.convolve((left + right) / 2, np.ones(64) / 64, mode="same")
        out = np.stack([left, right, (left + right) / 2, lfe,
                        np.concatenate([np.zeros(d), left[:-d]]) * 0.5,
                        np.concatenate([np.zeros(d), right[:-d]]) * 0.5], axis=1)
    else:
        raise ValueError(f"channels must be 1, 2 or 6, not {channels}")
    return (0.9 * out / max(1e-9, float(np.abs(out).max()))).astype(np.float32)


def write_source(path: str, seconds: float, rate: int, channels: int, seed: int) -> None:
    # WAVE_FORMAT_EXTENSIBLE for more than 2 channels: flac and opusenc refuse a plain 5.1 WAV
    sf.write(path, signal(seconds, rate, channels, seed), rate, subtype="PCM_16",
             format="WAVEX" if channels > 2 else "WAV")


def make_cover(path: str, kbytes: int, tmp: str) -> None:
    """A real JPEG (ffmpeg's mjpeg encoder) of seeded grey noise, about ``kbytes`` KB."""
    side = int(np.sqrt(kbytes * 1024 / 0.7))  # noise at -q:v 2 costs about 0.7 byte a pixel
    raw = os.path.join(tmp, "noise.gray")
    np.random.default_rng(7).integers(0, 256, size=(side, side), dtype=np.uint8).tofile(raw)
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "gray", "-s", f"{side}x{side}",
                    "-i", raw, "-frames:v", "1", "-q:v", "2", path], check=True)


# -- tags and chunks no installed tool writes ----------------------------------------------
def _syncsafe(n: int) -> bytes:
    return bytes([(n >> 21) & 0x7F, (n >> 14) & 0x7F, (n >> 7) & 0x7F, n & 0x7F])


def id3v23(title: str, padding: int = 256) -> bytes:
    """A minimal ID3v2.3 tag (TIT2 and TPE1 frames, then padding)."""
    frames = b""
    for fid, text in (("TIT2", title), ("TPE1", "genrecls corpus")):
        data = b"\x00" + text.encode("latin-1")
        frames += fid.encode() + struct.pack(">I", len(data)) + b"\x00\x00" + data
    body = frames + b"\x00" * padding
    return b"ID3\x03\x00\x00" + _syncsafe(len(body)) + body


def id3v1(title: str) -> bytes:
    return b"TAG" + title.encode("latin-1")[:30].ljust(30, b"\x00") + b"genrecls corpus".ljust(30, b"\x00") \
        + b"\x00" * 30 + b"2026" + b"\x00" * 30 + b"\x0c"


def apev2(items: dict[str, str]) -> bytes:
    """An APEv2 tag with header and footer (as foobar2000 and mp3gain write at the end of an MP3)."""
    body = b"".join(struct.pack("<II", len(v.encode()), 0) + k.encode() + b"\x00" + v.encode() for k, v in items.items())
    size = len(body) + 32

    def frame(is_header: bool) -> bytes:
        flags = 0x80000000 | (0x20000000 if is_header else 0)
        return b"APETAGEX" + struct.pack("<IIII", 2000, size, len(items), flags) + b"\x00" * 8

    return frame(True) + body + frame(False)


def append_riff_chunk(path: str, chunk_id: bytes, payload: bytes) -> None:
    """Append a chunk after the data chunk and fix the RIFF size, as a tagger does."""
    with open(path, "r+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() % 2:
            f.write(b"\x00")
        f.write(chunk_id + struct.pack("<I", len(payload)) + payload + (b"\x00" if len(payload) % 2 else b""))
        end = f.tell()
        f.seek(4)
        f.write(struct.pack("<I", end - 8))


def list_info(fields: dict[bytes, str]) -> bytes:
    out = b"INFO"
    for key, value in fields.items():
        v = value.encode("latin-1") + b"\x00"
        out += key + struct.pack("<I", len(v)) + v + (b"\x00" if len(v) % 2 else b"")
    return out


def prepend(path: str, data: bytes) -> None:
    with open(path, "rb") as f:
        body = f.read()
    with open(path, "wb") as f:
        f.write(data + body)


def append(path: str, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


# -- the catalogue -------------------------------------------------------------------------
FF = ("ffmpeg", "-v", "error", "-y")
LAME = ("lame", "--quiet", "--noreplaygain")


def lame(*opts: str) -> Callable[[Ctx], None]:
    def make(c: Ctx) -> None:
        c.sh(*LAME, *opts, c.src, c.out)
    return make


def ffmpeg(*opts: str) -> Callable[[Ctx], None]:
    def make(c: Ctx) -> None:
        c.sh(*FF, "-i", c.src, *opts, c.out)
    return make


def ffmpeg_pipe(*opts: str) -> Callable[[Ctx], None]:
    def make(c: Ctx) -> None:
        c.sh(*FF, "-i", c.src, *opts, "-", stdout=c.out)
    return make


def mp3_id3_cover(version: str) -> Callable[[Ctx], None]:
    def make(c: Ctx) -> None:
        bare = c.t("bare.mp3")
        c.sh(*LAME, "-V", "4", c.src, bare)
        c.sh(*FF, "-i", bare, "-i", c.cover, "-map", "0:a", "-map", "1:v", "-c", "copy", "-id3v2_version", version,
             "-metadata", "title=Cover test", "-metadata", "artist=genrecls corpus",
             "-metadata:s:v", "title=Album cover", "-metadata:s:v", "comment=Cover (front)", c.out)
    return make


def mp3_lame_cover(c: Ctx) -> None:
    c.sh(*LAME, "-b", "128", "--add-id3v2", "--tt", "Cover via lame", "--ti", c.cover, c.src, c.out)


def mp3_lame_cover_noxing(c: Ctx) -> None:
    c.sh(*LAME, "-b", "128", "-t", "--add-id3v2", "--tt", "Cover via lame", "--ti", c.cover, c.src, c.out)


def mp3_ape(c: Ctx) -> None:
    c.sh(*LAME, "-V", "2", "--id3v1-only", "--tt", "APE test", c.src, c.out)
    with open(c.out, "rb") as f:
        data = f.read()
    body, v1 = data[:-128], data[-128:]  # APEv2 goes before the ID3v1 tag, as mp3gain writes it
    with open(c.out, "wb") as f:
        f.write(body + apev2({"Title": "APE test", "MP3GAIN_MINMAX": "098,210", "REPLAYGAIN_TRACK_GAIN": "-3.1 dB"}) + v1)
    c.py("APEv2 tag (header+footer, 3 items) inserted before the ID3v1 tag")


def mp3_junk(with_id3: bool, *lame_opts: str) -> Callable[[Ctx], None]:
    def make(c: Ctx) -> None:
        c.sh(*LAME, "-b", "160", *lame_opts, c.src, c.out)
        junk = np.random.default_rng(11).integers(0, 256, 3000, dtype=np.uint8).tobytes()
        if with_id3:
            prepend(c.out, id3v23("junk after tag") + junk)
            c.py("prepended an ID3v2.3 tag followed by 3000 random bytes before the first frame")
        else:
            prepend(c.out, junk)
            c.py("prepended 3000 random bytes before the first frame")
    return make


def wav_list_after(c: Ctx) -> None:
    c.sh(*FF, "-i", c.src, "-fflags", "+bitexact", c.out)
    append_riff_chunk(c.out, b"LIST", list_info({b"INAM": "List after data", b"IART": "genrecls corpus",
                                                 b"ICMT": "chunk written after the data, as taggers do"}))
    c.py("appended a LIST/INFO chunk after the data chunk and fixed the RIFF size")


def wav_id3_chunk(c: Ctx) -> None:
    c.sh("sox", c.src, c.out)
    append_riff_chunk(c.out, b"id3 ", id3v23("id3 chunk in a wav"))
    c.py("appended an 'id3 ' chunk (ID3v2.3) after the data chunk and fixed the RIFF size")


def wav_sox_stream(c: Ctx) -> None:
    raw = c.t("source.raw")
    c.sh("sox", c.src, "-t", "raw", raw)
    c.sh("sox", "-t", "raw", "-r", str(c.rate), "-e", "signed", "-b", "16", "-c", str(c.channels), raw,
         "-t", "wav", "-", stdout=c.out)


def flac_id3(c: Ctx) -> None:
    c.sh("flac", "-s", "-f", "-o", c.out, c.src)
    prepend(c.out, id3v23("ID3 on FLAC"))
    append(c.out, id3v1("ID3 on FLAC"))
    c.py("prepended an ID3v2.3 tag and appended an ID3v1 tag, as some taggers do")


def flac_24bit(c: Ctx) -> None:
    s24 = c.t("source24.wav")
    c.sh("sox", c.src, "-b", "24", s24)
    c.sh("flac", "-s", "-f", "-o", c.out, s24)


def ogg_chained(second_rate: int | None = None) -> Callable[[Ctx], None]:
    def make(c: Ctx) -> None:
        a, b = c.t("a.ogg"), c.t("b.ogg")
        other = c.source(second_rate or c.rate, c.channels, seed=99, name="second.wav")
        c.sh("oggenc", "-Q", "-q", "3", "--serial", "1001", "-o", a, c.src)
        c.sh("oggenc", "-Q", "-q", "3", "--serial", "2002", "-o", b, other)
        c.content_seconds = 2 * c.seconds
        with open(c.out, "wb") as f:
            for part in (a, b):
                with open(part, "rb") as p:
                    f.write(p.read())
        c.py("cat a.ogg b.ogg > out (two logical streams chained; the second is another signal"
             + (f" at {second_rate} Hz)" if second_rate else " of the same length)"))
    return make


def oggenc(*opts: str) -> Callable[[Ctx], None]:
    def make(c: Ctx) -> None:
        c.sh("oggenc", "-Q", "--serial", "4242", *opts, "-o", c.out, c.src)
    return make


def opusenc(*opts: str) -> Callable[[Ctx], None]:
    def make(c: Ctx) -> None:
        c.sh("opusenc", "--quiet", "--serial", "4343", *opts, c.src, c.out)
    return make


def catalogue(short: float) -> list[Job]:
    """Every variant; ``fixture=True`` marks the committed subset."""
    J = Job
    return [
        # MP3: lame CBR/VBR/ABR with and without the Xing/Info frame (-t)
        J("mp3", "lame_cbr128_info", "mp3", lame("-b", "128"), fixture=True, note="CBR with Xing 'Info' + LAME tag"),
        J("mp3", "lame_cbr128_noxing", "mp3", lame("-b", "128", "-t"), fixture=True, note="CBR, no Xing/Info frame"),
        J("mp3", "lame_vbr_v2_xing", "mp3", lame("-V", "2"), fixture=True, note="VBR with Xing + LAME tag"),
        J("mp3", "lame_vbr_v2_noxing", "mp3", lame("-V", "2", "-t"), fixture=True, note="VBR, no Xing: length unknown"),
        J("mp3", "lame_abr160_xing", "mp3", lame("--abr", "160")),
        J("mp3", "lame_abr160_noxing", "mp3", lame("--abr", "160", "-t")),
        J("mp3", "lame_cbr320_joint", "mp3", lame("-b", "320", "-m", "j")),
        J("mp3", "lame_cbr64_mono_short_info", "mp3", lame("-b", "64"), channels=1, seconds=short,
          note="short 44.1 kHz mono CBR, as in the issue's sample library"),
        J("mp3", "lame_cbr64_mono_short_noxing", "mp3", lame("-b", "64", "-t"), channels=1, seconds=short, fixture=True,
          note="short 44.1 kHz mono CBR without Info frame"),
        J("mp3", "lame_cbr64_mono_short_noxing_id3v2", "mp3",
          lame("-b", "64", "-t", "--add-id3v2", "--pad-id3v2-size", "4096", "--tt", "Short sample", "--ta", "genrecls"),
          channels=1, seconds=short, fixture=True,
          note="short mono CBR, no Info frame, a 4 KB ID3v2 tag: a frame-count estimate from the file size overshoots"),
        J("mp3", "lame_vbr_mono_short", "mp3", lame("-V", "5"), channels=1, seconds=short),
        J("mp3", "ffmpeg_libmp3lame_noxing", "mp3", ffmpeg("-c:a", "libmp3lame", "-b:a", "192k", "-write_xing", "0")),
        J("mp3", "ffmpeg_libmp3lame_vbr", "mp3", ffmpeg("-c:a", "libmp3lame", "-q:a", "3")),
        J("mp3", "ffmpeg_libshine_cbr", "mp3", ffmpeg("-c:a", "libshine", "-b:a", "128k")),
        J("mp3", "ffmpeg_stream_pipe", "mp3", ffmpeg_pipe("-c:a", "libmp3lame", "-b:a", "128k", "-f", "mp3"),
          note="written to a pipe: the muxer cannot fill in its Xing frame"),
        # MPEG-2 (16-24 kHz) and MPEG-2.5 (8-12 kHz)
        J("mp3", "mpeg2_24k_cbr64", "mp3", lame("-b", "64"), rate=24000),
        J("mp3", "mpeg2_22k_vbr_noxing", "mp3", lame("-V", "6", "-t"), rate=22050, fixture=True),
        J("mp3", "mpeg2_16k_cbr32_mono", "mp3", lame("-b", "32"), rate=16000, channels=1),
        J("mp3", "mpeg25_8k_cbr16_mono", "mp3", lame("-b", "16"), rate=8000, channels=1, fixture=True,
          note="144-byte frames: lame writes no Info frame"),
        J("mp3", "mpeg25_11k_cbr24_noxing", "mp3", lame("-b", "24", "-t"), rate=11025, channels=1),
        J("mp3", "mpeg25_12k_vbr", "mp3", lame("-V", "7"), rate=12000),
        # tags and junk
        J("mp3", "id3v1_only", "mp3", lame("-b", "128", "--id3v1-only", "--tt", "ID3v1 only", "--ta", "genrecls")),
        J("mp3", "id3v23_cover", "mp3", mp3_id3_cover("3"), note="ID3v2.3 with a large APIC cover (ffmpeg)"),
        J("mp3", "id3v24_cover", "mp3", mp3_id3_cover("4"), fixture=True, note="ID3v2.4 with a large APIC cover (ffmpeg)"),
        J("mp3", "id3v23_cover_lame", "mp3", mp3_lame_cover, note="lame --ti: ID3v2.3 cover"),
        J("mp3", "id3v23_cover_lame_noxing", "mp3", mp3_lame_cover_noxing, note="lame -t --ti: cover, no Info frame"),
        J("mp3", "apev2_id3v1", "mp3", mp3_ape, fixture=True, note="APEv2 + ID3v1 at the end"),
        J("mp3", "junk_before_first_frame", "mp3", mp3_junk(False, "-t"), fixture=True,
          note="no Info frame, so every decoder decodes every frame"),
        J("mp3", "junk_before_info_frame", "mp3", mp3_junk(False),
          note="the junk hides the Info/LAME frame from FFmpeg, which then keeps encoder delay and padding "
               "(and decodes the Info frame as silence); mpg123 finds it"),
        J("mp3", "id3_then_junk", "mp3", mp3_junk(True)),
        # MP2
        J("mp2", "ffmpeg_mp2_48k_192k", "mp2", ffmpeg("-c:a", "mp2", "-b:a", "192k"), rate=48000, fixture=True),
        J("mp2", "ffmpeg_twolame_44k", "mp2", ffmpeg("-c:a", "libtwolame", "-b:a", "160k")),
        J("mp2", "ffmpeg_mp2_22k_mpeg2", "mp2", ffmpeg("-c:a", "mp2", "-b:a", "64k"), rate=22050, channels=1),
        # WAV and relatives
        J("wav", "ffmpeg_pipe_ffffffff", "wav", ffmpeg_pipe("-f", "wav"), rate=16000, channels=1, fixture=True,
          note="RIFF and data sizes 0xFFFFFFFF"),
        J("wav", "sox_pipe_7ffff000", "wav", wav_sox_stream, rate=16000, channels=1,
          note="sox writing to a pipe: sizes 0x7FFFF000-ish"),
        J("wav", "ffmpeg_extensible_s24", "wav", ffmpeg("-c:a", "pcm_s24le"), rate=16000, channels=1, fixture=True,
          note="24-bit: ffmpeg writes WAVE_FORMAT_EXTENSIBLE"),
        J("wav", "ffmpeg_extensible_51", "wav", ffmpeg("-c:a", "pcm_s16le"), rate=22050, channels=6,
          note="5.1: WAVE_FORMAT_EXTENSIBLE with a channel mask"),
        J("wav", "ffmpeg_rf64", "wav", ffmpeg("-rf64", "always"), rate=16000, channels=1, fixture=True),
        J("wav", "ffmpeg_bwf_bext", "wav", ffmpeg("-write_bext", "1", "-metadata", "description=genrecls corpus",
                                                  "-metadata", "originator=genrecls", "-metadata",
                                                  "origination_date=2026-12-01"), rate=16000, channels=1, fixture=True),
        J("wav", "list_after_data", "wav", wav_list_after, rate=16000, channels=1, fixture=True),
        J("wav", "id3_chunk_after_data", "wav", wav_id3_chunk, rate=16000, channels=1),
        J("wav", "ffmpeg_float32", "wav", ffmpeg("-c:a", "pcm_f32le"), rate=22050),
        J("wav", "ffmpeg_u8_mono", "wav", ffmpeg("-c:a", "pcm_u8"), rate=11025, channels=1),
        J("wav", "ffmpeg_w64", "w64", ffmpeg("-f", "w64"), rate=16000),
        # AIFF
        J("aiff", "ffmpeg_aiff", "aiff", ffmpeg(), rate=16000, channels=1, fixture=True),
        J("aiff", "sox_aiff", "aiff", lambda c: c.sh("sox", c.src, c.out), rate=22050),
        J("aiff", "ffmpeg_aifc_float", "aifc", ffmpeg("-c:a", "pcm_f32be"), rate=16000, channels=1, fixture=True,
          note="AIFF-C 'fl32'"),
        J("aiff", "ffmpeg_aifc_sowt", "aifc", ffmpeg("-c:a", "pcm_s16le", "-f", "aiff"), rate=16000,
          note="AIFF-C 'sowt' (little-endian, as macOS writes)"),
        J("aiff", "sox_aifc", "aifc", lambda c: c.sh("sox", c.src, c.out), rate=22050, channels=1),
        # FLAC
        J("flac", "flac_seektable", "flac", lambda c: c.sh("flac", "-s", "-f", "-o", c.out, c.src), rate=22050,
          channels=1, fixture=True),
        J("flac", "flac_no_seektable", "flac", lambda c: c.sh("flac", "-s", "-f", "--no-seektable", "-o", c.out, c.src),
          rate=22050, channels=1, fixture=True),
        J("flac", "flac_id3", "flac", flac_id3, rate=22050, channels=1, fixture=True),
        J("flac", "ffmpeg_flac", "flac", ffmpeg("-c:a", "flac")),
        J("flac", "ffmpeg_flac_pipe", "flac", ffmpeg_pipe("-c:a", "flac", "-f", "flac"), rate=22050, channels=1,
          fixture=True, note="streamed FLAC: STREAMINFO total samples 0 (length unknown)"),
        J("flac", "flac_24bit_96k", "flac", flac_24bit, rate=96000),
        J("flac", "flac_51", "flac", lambda c: c.sh("flac", "-s", "-f", "-o", c.out, c.src), rate=16000, channels=6,
          fixture=True),
        J("flac", "sox_flac", "flac", lambda c: c.sh("sox", c.src, c.out), rate=44100),
        # Ogg Vorbis
        J("ogg", "oggenc_q4", "ogg", oggenc("-q", "4")),
        J("ogg", "oggenc_mono_22k", "ogg", oggenc("-q", "0"), rate=22050, channels=1, fixture=True),
        J("ogg", "oggenc_chained", "ogg", ogg_chained(), rate=22050, channels=1, fixture=True,
          note="two logical streams, same rate"),
        J("ogg", "oggenc_chained_two_rates", "ogg", ogg_chained(second_rate=22050), rate=44100, channels=1,
          note="two logical streams: 44.1 kHz then 22.05 kHz"),
        J("ogg", "oggenc_51", "ogg", oggenc("-q", "2"), rate=22050, channels=6),
        J("ogg", "ffmpeg_libvorbis", "ogg", ffmpeg("-c:a", "libvorbis", "-q:a", "3")),
        J("ogg", "sox_vorbis", "ogg", lambda c: c.sh("sox", c.src, "-C", "3", c.out)),
        # Opus
        J("opus", "opusenc_8k_mono", "opus", opusenc("--bitrate", "12"), rate=8000, channels=1, fixture=True),
        J("opus", "opusenc_16k_mono", "opus", opusenc("--bitrate", "24"), rate=16000, channels=1),
        J("opus", "opusenc_48k_stereo", "opus", opusenc("--bitrate", "64"), rate=48000, fixture=True),
        J("opus", "opusenc_51", "opus", opusenc("--bitrate", "96"), rate=48000, channels=6, fixture=True),
        J("opus", "ffmpeg_libopus_44k", "opus", ffmpeg("-c:a", "libopus", "-b:a", "64k")),
        J("opus", "opusenc_44k_in_ogg_ext", "ogg", opusenc("--bitrate", "48"),
          note="Opus in a file named .ogg"),
    ]


#: intact variants whose truncated copies are committed as fixtures
FIXTURE_CUTS = ("mp3/lame_cbr128_info.mp3", "mp3/lame_vbr_v2_noxing.mp3", "flac/flac_seektable.flac",
                "ogg/oggenc_mono_22k.ogg", "wav/list_after_data.wav", "opus/opusenc_48k_stereo.opus")


# -- FFmpeg's reference ---------------------------------------------------------------------
def _clean(text: str) -> str | None:
    """FFmpeg's messages without the object addresses (``[flac @ 0x55d4...]``), so manifests are reproducible."""
    return re.sub(r" @ 0x[0-9a-f]+\]", "]", text.strip())[:300] or None


def ffmpeg_reference(path: str) -> dict:
    """What FFmpeg makes of a file: does it decode, how many samples at the native rate, ffprobe's duration."""
    ref: dict = {}
    probe = subprocess.run(["ffprobe", "-v", "error", "-print_format", "json", "-show_format", "-show_streams",
                            "-select_streams", "a:0", path], capture_output=True, text=True)
    try:
        info = json.loads(probe.stdout or "{}")
    except json.JSONDecodeError:
        info = {}
    stream = (info.get("streams") or [{}])[0]
    fmt = info.get("format") or {}
    rate = int(stream.get("sample_rate") or 0)
    ref.update(codec=stream.get("codec_name"), format_name=fmt.get("format_name"), sample_rate=rate,
               channels=stream.get("channels"),
               format_duration=float(fmt["duration"]) if fmt.get("duration") not in (None, "N/A") else None,
               probe_error=_clean(probe.stderr))
    dec = subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-i", path, "-f", "f32le", "-ac", "1", "-"],
                         capture_output=True)
    samples = len(dec.stdout) // 4
    ref.update(decodes=samples > 0, exit_code=dec.returncode, samples=samples,
               seconds=samples / rate if rate else None,
               decode_errors=_clean(dec.stderr.decode(errors="replace")))
    return ref


# -- driver -----------------------------------------------------------------------------------
def check_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        sys.exit(f"missing encoders: {' '.join(missing)} (apt-get install lame ffmpeg sox flac vorbis-tools opus-tools)")


def tool_versions() -> dict[str, str]:
    cmds = {"lame": ["lame", "--version"], "ffmpeg": ["ffmpeg", "-version"], "sox": ["sox", "--version"],
            "flac": ["flac", "--version"], "oggenc": ["oggenc", "--version"], "opusenc": ["opusenc", "--version"]}
    out = {}
    for name, cmd in cmds.items():
        r = subprocess.run(cmd, capture_output=True, text=True)
        out[name] = ((r.stdout or r.stderr).strip().splitlines() or ["?"])[0]
    return out


def truncate_copy(src: str, dst: str, fraction: float) -> int:
    with open(src, "rb") as f:
        data = f.read()
    keep = int(len(data) * fraction)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst, "wb") as f:
        f.write(data[:keep])
    return keep


def build(out: str, *, seconds: float, short: float, fixtures: bool, cover_kb: int, only: str | None = None) -> dict:
    check_tools()
    jobs = [j for j in catalogue(short) if (j.fixture or not fixtures) and (only is None or only in j.rel)]
    cut_list = set(FIXTURE_CUTS) if fixtures else {j.rel for j in jobs}
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    entries, not_made = [], []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="corpus-") as scratch:
        cover = os.path.join(scratch, "cover.jpg")
        make_cover(cover, cover_kb, scratch)
        for i, job in enumerate(jobs):
            secs = job.seconds if job.seconds is not None else seconds
            if fixtures:
                secs = min(secs, seconds)
            tmp = os.path.join(scratch, f"job{i}")
            os.makedirs(tmp)
            src = os.path.join(tmp, "source.wav")
            seed = zlib.crc32(job.name.encode()) % 1000
            write_source(src, secs, job.rate, job.channels, seed=seed)
            dst = os.path.join(out, job.rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            ctx = Ctx(src=src, out=dst, tmp=tmp, rel=job.rel, cover=cover, seconds=secs, rate=job.rate,
                      channels=job.channels)
            try:
                job.make(ctx)
            except (subprocess.CalledProcessError, OSError) as exc:
                err = getattr(exc, "stderr", b"") or b""
                not_made.append({"path": job.rel, "why": f"{exc} {err.decode(errors='replace').strip()[:300]}",
                                 "steps": ctx.steps})
                if os.path.exists(dst):
                    os.remove(dst)
                print(f"  could not make {job.rel}: {exc}", file=sys.stderr)
                continue
            source = {"seconds": ctx.content_seconds or secs, "sample_rate": job.rate, "channels": job.channels,
                      "signal": f"genrecls.sample_data.synthesize({signal_genre(seed)!r}, {secs}, sr={job.rate}, "
                                f"seed={seed}) as {job.channels} channel(s), 16-bit WAV"}
            entries.append({"path": job.rel, "category": job.category, "state": "intact", "made_by": ctx.steps,
                            "note": job.note, "source": source, "bytes": os.path.getsize(dst),
                            "ffmpeg": ffmpeg_reference(dst)})
            if job.rel in cut_list:
                rel = f"truncated/{job.category}_{job.name}_cut{int(CUT * 100)}.{job.ext}"
                kept = truncate_copy(dst, os.path.join(out, rel), CUT)
                entries.append({"path": rel, "category": "truncated", "state": "damaged",
                                "made_by": [f"first {int(CUT * 100)}% ({kept} bytes) of {job.rel}"],
                                "note": f"truncated copy of {job.rel}", "source": source, "bytes": kept,
                                "ffmpeg": ffmpeg_reference(os.path.join(out, rel))})
            print(f"  {job.rel:48s} {os.path.getsize(dst) / 1024:8.1f} KB", file=sys.stderr)
    manifest = {
        "about": "Files made by real encoders from genrecls.audio.sample_data signals; ffmpeg.seconds is FFmpeg's decoded "
                 "length (samples of `ffmpeg -v error -i f -f f32le -ac 1 -` at ffprobe's sample_rate).",
        "made_with": "python bench/encoder_corpus.py" + (" --fixtures" if fixtures else f" --seconds {seconds}"),
        "tools": tool_versions(),
        "seconds": seconds,
        "cut_fraction": CUT,
        "files": entries,
        "not_made": not_made,
    }
    if not fixtures:  # the committed manifest stays byte-identical when rebuilt
        manifest["build_seconds"] = round(time.monotonic() - t0, 1)
    tmp_manifest = os.path.join(out, ".manifest.json.tmp")
    with open(tmp_manifest, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    os.replace(tmp_manifest, os.path.join(out, "manifest.json"))
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", help="output folder (default /tmp/encoder-corpus; with --fixtures "
                                           "tests/data/encoders)")
    ap.add_argument("--fixtures", action="store_true", help="only the committed subset: 3 s files, a 150 KB cover")
    ap.add_argument("--seconds", type=float, default=None, help="length of each source signal (default 12; 3 with "
                                                                 "--fixtures)")
    ap.add_argument("--short", type=float, default=3.7, help="length of the short-file variants (default 3.7)")
    ap.add_argument("--cover-kb", type=int, default=None, help="cover art size (default 500; 150 with --fixtures)")
    ap.add_argument("--only", help="only variants whose path contains this string (for debugging)")
    ap.add_argument("--clean", action="store_true", help="empty the output folder first")
    args = ap.parse_args(argv)
    out = args.out or (FIXTURES_DIR if args.fixtures else "/tmp/encoder-corpus")
    seconds = args.seconds or (3.0 if args.fixtures else 12.0)
    cover_kb = args.cover_kb or (150 if args.fixtures else 500)
    if args.clean and os.path.isdir(out):
        shutil.rmtree(out)
    m = build(out, seconds=seconds, short=args.short, fixtures=args.fixtures, cover_kb=cover_kb, only=args.only)
    files = m["files"]
    total = sum(e["bytes"] for e in files)
    print(f"{len(files)} files ({sum(e['state'] == 'intact' for e in files)} intact, "
          f"{sum(e['state'] == 'damaged' for e in files)} truncated), {total / 1e6:.1f} MB in {out}; "
          f"{len(m['not_made'])} variants could not be made")
    for e in files:
        ff = e["ffmpeg"]
        secs = f"{ff['seconds']:.3f}" if ff["seconds"] is not None else "-"
        print(f"  {e['path']:56s} {e['state']:7s} ffmpeg {secs:>8s} s"
              f"{'' if ff['decodes'] else '  (ffmpeg decodes nothing)'}")
    for n in m["not_made"]:
        print(f"  NOT MADE {n['path']}: {n['why']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
