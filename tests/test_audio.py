"""Decoding: every format libsndfile writes, at many rates, channel counts and sample formats.

Files are real: written by soundfile into a temporary folder, then decoded by
genrecls.audio exactly as the ingest does (blocks, mono mix, streaming soxr resample).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf

from genrecls.audio.decode import AudioError, iter_mono_blocks, probe, read_mono
from genrecls.audio.sample_data import write_audio

FREQ = 440.0


def tone(sr: int, seconds: float, channels: int, amp: float = 0.3) -> np.ndarray:
    """A 440 Hz sine whose level differs per channel (so the mono mix is checkable)."""
    t = np.arange(int(sr * seconds)) / sr
    gains = np.linspace(1.0, 0.4, channels)
    return (amp * np.sin(2 * np.pi * FREQ * t)[:, None] * gains[None, :]).astype(np.float32)


def write(path, audio, sr, fmt, subtype):
    write_audio(str(path), audio, sr, fmt=fmt, subtype=subtype)
    return str(path)


def dominant_hz(y: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(y * np.hanning(y.size)))
    return float(np.argmax(spec) * sr / y.size)


# (format, subtype, extension, rates, channel counts); lossy codecs only at rates they support
MATRIX = [
    ("WAV", "PCM_16", "wav", (8000, 22050, 44100, 48000, 96000, 192000), (1, 2, 6)),
    ("WAV", "PCM_U8", "wav", (8000, 44100), (1, 2)),
    ("WAV", "PCM_24", "wav", (44100, 96000), (2, 6)),
    ("WAV", "FLOAT", "wav", (22050, 48000), (1, 2)),
    ("WAV", "DOUBLE", "wav", (44100,), (2,)),
    ("FLAC", "PCM_16", "flac", (8000, 44100, 192000), (1, 2, 6)),
    ("FLAC", "PCM_24", "flac", (96000,), (2,)),
    ("FLAC", "PCM_S8", "flac", (22050,), (1,)),
    ("MP3", "MPEG_LAYER_III", "mp3", (8000, 22050, 44100, 48000), (1, 2)),
    ("OGG", "VORBIS", "ogg", (22050, 44100, 96000), (1, 2, 6)),
    ("OGG", "OPUS", "opus", (8000, 48000), (1, 2)),
]
CASES = [(f, s, e, r, c) for f, s, e, rates, chans in MATRIX for r in rates for c in chans]


@pytest.mark.parametrize("fmt,subtype,ext,sr,channels", CASES,
                         ids=[f"{f}-{s}-{r}-{c}ch" for f, s, e, r, c in CASES])
def test_every_format_rate_and_layout_decodes_to_mono_at_the_target_rate(tmp_path, fmt, subtype, ext, sr, channels):
    seconds, target = 0.5, 8000
    path = write(tmp_path / f"t.{ext}", tone(sr, seconds, channels), sr, fmt, subtype)
    info = probe(path)
    decoded_rate = 48000 if subtype == "OPUS" else sr  # Opus always decodes at 48 kHz (its header's rate is a note)
    assert (info.sample_rate, info.channels) == (decoded_rate, channels)
    y = read_mono(path, sample_rate=target)
    assert y.dtype == np.float32 and y.ndim == 1
    # length: the resampled duration (lossy codecs add or trim up to one codec frame)
    slack = 0.03 * target if fmt in ("MP3", "OGG") else 2
    assert abs(y.size - seconds * target) <= slack, (y.size, seconds * target)
    assert abs(dominant_hz(y, target) - FREQ) < 2 * target / y.size
    # level: the mono mix is the mean of the channels' gains (lossy codecs within 10%)
    expected_rms = 0.3 / np.sqrt(2) * np.linspace(1.0, 0.4, channels).mean()
    mid = y[y.size // 4: 3 * y.size // 4]
    rms = float(np.sqrt(np.mean(mid ** 2)))
    tol = 0.12 if fmt in ("MP3", "OGG") or subtype in ("PCM_U8", "PCM_S8") else 0.01
    assert abs(rms - expected_rms) <= tol * expected_rms, (rms, expected_rms)


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "FLOAT"])
def test_mono_mix_is_the_exact_mean_of_the_channels(tmp_path, subtype):
    rng = np.random.default_rng(0)
    audio = (rng.uniform(-0.5, 0.5, (4000, 6))).astype(np.float32)
    path = write(tmp_path / "six.wav", audio, 8000, "WAV", subtype)
    stored, _ = sf.read(path, dtype="float32", always_2d=True)  # after quantisation
    y = read_mono(path, sample_rate=8000)  # same rate: no resampling
    np.testing.assert_allclose(y, stored.mean(axis=1), atol=1e-6)


def test_streamed_resampling_matches_one_shot_whatever_the_block_size(tmp_path):
    import soxr

    path = write(tmp_path / "a.flac", tone(44100, 3.0, 2), 44100, "FLAC", "PCM_24")
    stored, _ = sf.read(path, dtype="float32", always_2d=True)
    one_shot = soxr.resample(stored.mean(axis=1), 44100, 22050, quality="HQ")
    for block in (1000, 4096, 1 << 16):
        y = np.concatenate(list(iter_mono_blocks(path, sample_rate=22050, block_frames=block)))
        assert y.size == one_shot.size
        np.testing.assert_allclose(y, one_shot, atol=2e-4)


def test_blocks_stay_small_whatever_the_file_length(tmp_path):
    path = write(tmp_path / "long.wav", tone(48000, 20.0, 2), 48000, "WAV", "PCM_16")
    sizes = [b.size for b in iter_mono_blocks(path, sample_rate=8000, block_frames=8192)]
    assert sum(sizes) == pytest.approx(20.0 * 8000, abs=4)
    assert max(sizes) <= 2 * 8192 * 8000 / 48000  # a block or two (the flush), never the whole file
    assert len(sizes) > 100


def test_a_window_decodes_only_that_window(tmp_path):
    sr = 8000
    audio = np.random.default_rng(1).uniform(-0.5, 0.5, (sr * 3, 1)).astype(np.float32)
    path = write(tmp_path / "w.wav", audio, sr, "WAV", "FLOAT")
    part = read_mono(path, sample_rate=sr, start_frame=5000, max_frames=3000, check_silence=False)
    np.testing.assert_array_equal(part, audio[5000:8000, 0])


def test_probe_reports_the_header(tmp_path):
    path = write(tmp_path / "p.flac", tone(96000, 1.0, 6), 96000, "FLAC", "PCM_24")
    info = probe(path)
    assert (info.sample_rate, info.channels, info.frames, info.format, info.codec) == (96000, 6, 96000, "flac", "flac")
    assert info.exact_length
    assert info.duration == pytest.approx(1.0)


# -- bad files: each raises AudioError with a kind and a reason a person understands -----
def _kind(path, **kw):
    with pytest.raises(AudioError) as err:
        read_mono(path, sample_rate=8000, **kw)
    assert str(err.value)  # a reason, not just a kind
    return err.value.kind, str(err.value)


def test_missing_file(tmp_path):
    assert _kind(tmp_path / "nope.wav")[0] == "missing"


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.mp3"
    p.write_bytes(b"")
    kind, reason = _kind(p)
    assert kind == "empty" and "0 bytes" in reason


def test_text_named_wav_and_random_bytes_are_undecodable(tmp_path):
    (tmp_path / "notes.wav").write_text("this is not audio\n" * 50)
    (tmp_path / "noise.mp3").write_bytes(np.random.default_rng(0).bytes(100_000))
    for name in ("notes.wav", "noise.mp3"):
        kind, reason = _kind(tmp_path / name)
        assert kind == "undecodable" and "not a readable audio file" in reason


def test_an_m4a_header_without_audio_is_undecodable(tmp_path):
    p = tmp_path / "song.m4a"  # the start of an MP4 file and nothing after it
    p.write_bytes(b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00M4A mp42isom" + bytes(4000))
    kind, reason = _kind(p)
    assert kind == "undecodable" and "not a readable audio file" in reason


def test_aac_in_mp4_decodes(tmp_path):
    """M4A/AAC (most of a bought or ripped library) decodes through FFmpeg like any other format."""
    import av

    sr, seconds = 44100, 2.0
    audio = tone(sr, seconds, 2)
    path = tmp_path / "song.m4a"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=sr, layout="stereo")
        for i in range(0, audio.shape[0], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[i:i + 1024].T), format="fltp", layout="stereo")
            frame.sample_rate = sr
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    y = read_mono(path, sample_rate=8000)
    # AAC adds a priming frame and pads the last one: up to 2 x 1024 samples at 44.1 kHz with no edit list
    assert abs(y.size - seconds * 8000) <= 2 * 1024 * 8000 / sr + 2
    assert abs(dominant_hz(y, 8000) - FREQ) < 2 * 8000 / y.size


@pytest.mark.parametrize("ext", ["mp3", "flac", "ogg", "wav"])
def test_a_truncated_file_keeps_its_audio_with_a_warning_or_fails_by_policy(tmp_path, ext):
    from genrecls.audio.sample_data import synthesize

    full = tmp_path / f"full.{ext}"
    write_audio(str(full), synthesize("rock", 4.0, sr=44100, seed=2), 44100)
    data = full.read_bytes()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(data[: len(data) // 2])
    warnings = []
    y = read_mono(cut, sample_rate=8000, warnings=warnings)  # the default policy: keep what decodes
    assert 1.0 * 8000 < y.size < 3.0 * 8000  # about half of the 4 s
    assert [w.kind for w in warnings][:1] == ["truncated"], warnings
    assert "cut short" in warnings[0].reason or "breaks off" in warnings[0].reason
    kind, reason = _kind(cut, on_truncated="fail")
    assert kind == "truncated" and "on_truncated" in reason
    whole_warnings = []
    assert read_mono(str(full), sample_rate=8000, warnings=whole_warnings).size > 3.9 * 8000  # the whole file is fine
    assert whole_warnings == []


def test_wav_header_claiming_more_data_than_present(tmp_path):
    p = write(tmp_path / "h.wav", tone(8000, 1.0, 1), 8000, "WAV", "PCM_16")
    raw = bytearray(open(p, "rb").read())
    data_at = raw.index(b"data") + 4
    raw[data_at:data_at + 4] = (10 * 8000 * 2).to_bytes(4, "little")  # declares 10 s, holds 1 s
    open(p, "wb").write(raw)
    warnings = []
    assert read_mono(p, sample_rate=8000, warnings=warnings).size == 8000
    assert [w.kind for w in warnings] == ["truncated"] and "declares" in warnings[0].reason
    kind, reason = _kind(p, on_truncated="fail")
    assert kind == "truncated" and "declares" in reason


def test_wav_written_to_a_pipe_is_whole_audio(tmp_path):
    """RIFF and data sizes of 0xFFFFFFFF (what an encoder writing to a pipe leaves) mean 'unknown', not cut short."""
    p = write(tmp_path / "piped.wav", tone(8000, 2.0, 2), 8000, "WAV", "PCM_16")
    raw = bytearray(open(p, "rb").read())
    raw[4:8] = b"\xff\xff\xff\xff"
    data_at = raw.index(b"data") + 4
    raw[data_at:data_at + 4] = b"\xff\xff\xff\xff"
    open(p, "wb").write(raw)
    warnings = []
    assert read_mono(p, sample_rate=8000, warnings=warnings).size == 16000
    assert warnings == []


def test_fifo_is_refused_without_being_opened(tmp_path):
    fifo = tmp_path / "stream.wav"
    os.mkfifo(fifo)  # opening it would block until a writer comes
    kind, reason = _kind(fifo)
    assert kind == "not_regular" and "FIFO" in reason


def test_a_decode_past_its_deadline_stops(tmp_path):
    """Real decoding of a long track against a deadline that has already passed."""
    import time

    p = write(tmp_path / "long.flac", tone(44100, 30.0, 2), 44100, "FLAC", "PCM_16")
    kind, reason = _kind(p, deadline=time.monotonic() - 1.0)
    assert kind == "timed_out" and "deadline" in reason


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(tmp_path, bad):
    audio = tone(8000, 1.0, 1)
    audio[4000:4010] = bad
    p = write(tmp_path / "nan.wav", audio, 8000, "WAV", "FLOAT")
    kind, reason = _kind(p)
    assert kind == "non_finite" and "NaN or infinite" in reason


def test_pure_silence_is_recorded_but_quiet_audio_is_kept(tmp_path):
    silent = write(tmp_path / "silent.flac", np.zeros((8000, 2), np.float32), 8000, "FLAC", "PCM_24")
    kind, reason = _kind(silent)
    assert kind == "silent" and "silent" in reason
    quiet = write(tmp_path / "quiet.wav", tone(8000, 1.0, 1, amp=1e-4), 8000, "WAV", "FLOAT")  # -80 dBFS
    assert read_mono(quiet, sample_rate=8000).size == 8000


def test_full_scale_clipped_noise_is_valid_audio(tmp_path):
    noise = np.clip(np.random.default_rng(0).normal(0, 2.0, (16000, 2)), -1, 1).astype(np.float32)
    p = write(tmp_path / "clip.wav", noise, 16000, "WAV", "PCM_16")
    y = read_mono(p, sample_rate=8000)
    assert y.size == 8000 and np.isfinite(y).all()


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: file permissions do not block reads "
                    "(tests/test_bad_input.py checks this with dropped privileges)")
def test_unreadable_file(tmp_path):
    p = write(tmp_path / "locked.wav", tone(8000, 1.0, 1), 8000, "WAV", "PCM_16")
    os.chmod(p, 0)
    try:
        kind, reason = _kind(p)
        assert kind == "unreadable" and "permission denied" in reason
    finally:
        os.chmod(p, 0o644)


def test_classify_sampling_applies_the_same_truncation_rules(tmp_path):
    """K evenly spaced windows of a file cut short: its stream ends before the last window, so it is decoded
    whole and gets the warning (or, strict, the failure) that ingest gives it."""
    from genrecls.audio.pipeline import sampled_track_features
    from genrecls.core.config import DecodeConfig, FeatureConfig

    cfg = FeatureConfig(sample_rate=8000, segment_samples=8000, segment_hop=8000, n_fft=512, hop_length=256, n_mels=32)
    full = write(tmp_path / "full.flac", tone(44100, 30.0, 2), 44100, "FLAC", "PCM_16")
    data = open(full, "rb").read()
    cut = tmp_path / "cut.flac"
    cut.write_bytes(data[: len(data) // 2])
    whole = sampled_track_features(full, cfg, 4)
    assert len(whole.starts) == 4 and whole.warnings == []
    kept = sampled_track_features(str(cut), cfg, 4)
    assert [w.kind for w in kept.warnings] == ["truncated"] and 10 <= len(kept.starts) <= 20
    with pytest.raises(AudioError) as err:
        sampled_track_features(str(cut), cfg, 4, DecodeConfig(on_truncated="fail"))
    assert err.value.kind == "truncated"
