"""The synthetic sample collection: layout, formats, determinism, and genres that really differ."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf

from genrecls.audio.sample_data import (
    GENRES,
    make_sample_collection,
    synthesize,
    write_audio,
)


def test_layout_formats_and_audio(tmp_path):
    paths = make_sample_collection(str(tmp_path), genres=3, tracks_per_genre=4, seconds=1.5, seed=3)
    assert len(paths) == 12
    names = sorted(os.path.relpath(p, tmp_path) for p in paths)
    assert names[:4] == ["electronic/electronic_000.wav", "electronic/electronic_001.flac",
                         "electronic/electronic_002.ogg", "electronic/electronic_003.mp3"]  # formats rotate
    assert sorted(os.listdir(tmp_path)) == ["electronic", "jazz", "rock"]
    assert {os.path.splitext(p)[1] for p in paths} == {".mp3", ".wav", ".flac", ".ogg"}
    for p in paths:
        info = sf.info(p)
        assert (info.samplerate, info.channels) == (44100, 2)
        assert info.duration == pytest.approx(1.5, abs=0.06)  # MP3/Vorbis frames round a little
        assert not any(n.startswith(".tmp-") for n in os.listdir(os.path.dirname(p)))


def test_existing_files_are_kept_and_synthesis_is_deterministic(tmp_path):
    (p,) = make_sample_collection(str(tmp_path), genres=1, tracks_per_genre=1, seconds=1.0, formats=("wav",))
    mtime = os.stat(p).st_mtime_ns
    make_sample_collection(str(tmp_path), genres=1, tracks_per_genre=1, seconds=1.0, formats=("wav",))
    assert os.stat(p).st_mtime_ns == mtime
    a, b = synthesize("jazz", 2.0, seed=11), synthesize("jazz", 2.0, seed=11)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, synthesize("jazz", 2.0, seed=12))
    assert a.dtype == np.float32 and a.shape == (88200, 2) and np.abs(a).max() <= 1.0


def test_genres_are_distinct_enough_to_learn():
    """Nearest centroid on mean log-mel spectra tells the ten genres apart on held-out tracks."""
    import soxr

    from genrecls.audio.features import log_mel
    from genrecls.core.config import FeatureConfig

    cfg = FeatureConfig(sample_rate=8000, segment_samples=16000, segment_hop=16000, n_fft=512, hop_length=256,
                        n_mels=32).validate()

    def embed(genre, seed):
        y = soxr.resample(synthesize(genre, 2.0, seed=seed).mean(axis=1), 44100, 8000)[:16000]
        return log_mel(y.astype(np.float32), cfg).mean(axis=1)

    genres = list(GENRES)
    centroids = np.stack([np.mean([embed(g, s) for s in (1, 2)], axis=0) for g in genres])
    hits = 0
    for i, g in enumerate(genres):
        e = embed(g, 3)
        hits += int(np.argmin(((centroids - e) ** 2).sum(axis=1)) == i)
    assert hits >= 8, f"only {hits}/10 held-out tracks nearest to their own genre"


@pytest.mark.parametrize("kwargs,message", [
    (dict(genres=0), "genres must be between 1 and"),
    (dict(genres=len(GENRES) + 1), "genres must be between 1 and"),
    (dict(tracks_per_genre=0), "tracks_per_genre must be >= 1"),
    (dict(seconds=0), "seconds must be > 0"),
    (dict(formats=("aac",)), "unknown formats ['aac']"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError) as err:
        make_sample_collection(str(tmp_path), **kwargs)
    assert message in str(err.value)


def test_write_audio_errors_and_unknown_genre(tmp_path):
    with pytest.raises(ValueError, match="unknown audio extension 'xyz'"):
        write_audio(str(tmp_path / "a.xyz"), np.zeros(10, np.float32), 8000)
    with pytest.raises(ValueError, match="unknown genre 'polka'"):
        synthesize("polka", 1.0)


def test_cli_sample_data(tmp_path, capsys):
    from genrecls.cli import main

    assert main(["sample-data", str(tmp_path / "s"), "--genres", "2", "--tracks-per-genre", "1", "--seconds", "1",
                 "--formats", "flac"]) == 0
    assert "wrote 2 tracks" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "s")) == ["electronic", "rock"]
