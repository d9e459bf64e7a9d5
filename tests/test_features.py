"""Features: genrecls' batched float32 log-mel against librosa itself.

Stated tolerance (genrecls/features.py): at most 2e-3 dB from librosa on every bin, both
on the same samples (log_mel vs log_mel_reference) and end to end (FeatureStream on a
file vs librosa.load(sr=22050) + melspectrogram + power_to_db on the same file).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from genrecls.audio.features import (
    AMIN,
    hann_window,
    log_mel,
    log_mel_reference,
    mel_basis,
    mel_filters,
)
from genrecls.audio.sample_data import synthesize, write_audio
from genrecls.core.config import FeatureConfig

TOL_DB = 2e-3

SMALL = dict(sample_rate=8000, segment_samples=8000, segment_hop=8000, n_fft=512, hop_length=256, n_mels=32)


def music(cfg: FeatureConfig, n: int, genre: str = "rock", seed: int = 0) -> np.ndarray:
    """n segments of synthetic music at the configuration's rate."""
    import soxr

    seconds = n * cfg.segment_samples / cfg.sample_rate + 0.1
    y = soxr.resample(synthesize(genre, seconds, sr=44100, seed=seed).mean(axis=1), 44100, cfg.sample_rate)
    return y[: n * cfg.segment_samples].reshape(n, cfg.segment_samples).astype(np.float32)


@pytest.mark.parametrize("kw", [
    {},
    SMALL,
    dict(n_mels=64, fmin=40.0, fmax=8000.0),
    dict(sample_rate=16000, n_fft=1024, hop_length=256, n_mels=96, segment_samples=32000, segment_hop=32000),
])
def test_filter_bank_and_window_equal_librosas(kw):
    import librosa
    import scipy.signal

    cfg = FeatureConfig(**kw).validate()
    ref = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax)
    ours = mel_filters(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(mel_basis(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax), ref.T)
    np.testing.assert_array_equal(hann_window(cfg.n_fft),
                                  scipy.signal.get_window("hann", cfg.n_fft, fftbins=True).astype(np.float32))


@pytest.mark.parametrize("genre", ["rock", "classical", "electronic"])
@pytest.mark.parametrize("kw", [{}, SMALL], ids=["defaults", "small"])
def test_log_mel_matches_librosa_on_the_same_samples(genre, kw):
    cfg = FeatureConfig(**kw)
    segs = music(cfg, 3, genre)
    ours = log_mel(segs, cfg)
    ref = np.stack([log_mel_reference(s, cfg) for s in segs])
    assert ours.shape == ref.shape == (3, *cfg.mel_shape) and ours.dtype == np.float32
    err = np.abs(ours - ref)
    assert err.max() < TOL_DB, err.max()
    assert err.mean() < TOL_DB / 20


def test_log_mel_without_top_db_matches_librosa_above_80_db_below_the_peak():
    cfg = replace(FeatureConfig(), top_db=None)
    segs = music(cfg, 2, "jazz")
    ours, ref = log_mel(segs, cfg), np.stack([log_mel_reference(s, cfg) for s in segs])
    loud = ref > ref.max(axis=(1, 2), keepdims=True) - 80
    assert np.abs(ours - ref)[loud].max() < TOL_DB


def test_features_of_a_file_match_librosa_load_and_melspectrogram(tmp_path):
    """End to end: decode (mono mix + streaming soxr) and features vs the tutorial's librosa calls."""
    import librosa

    from genrecls.audio.pipeline import track_features

    path = str(tmp_path / "song.flac")
    write_audio(path, synthesize("hiphop", 14.0, sr=44100, seed=5), 44100, fmt="FLAC", subtype="PCM_24")
    cfg = FeatureConfig()
    ours = track_features(path, cfg)
    y, sr = librosa.load(path, sr=22050)
    n = len(y) // cfg.segment_samples
    ref = np.stack([librosa.power_to_db(librosa.feature.melspectrogram(y=y[i * 100_000:(i + 1) * 100_000], sr=sr))
                    for i in range(n)])
    assert ours.mels.shape == ref.shape == (3, 128, 196)
    assert ours.starts == pytest.approx([0.0, 100_000 / 22050, 200_000 / 22050])
    assert ours.duration == pytest.approx(14.0, abs=1e-3)
    assert np.abs(ours.mels - ref).max() < TOL_DB


def test_a_batch_equals_its_segments_one_by_one():
    cfg = FeatureConfig(**SMALL)
    segs = music(cfg, 5, "metal")
    batch = log_mel(segs, cfg)
    for i, s in enumerate(segs):
        np.testing.assert_allclose(log_mel(s, cfg), batch[i], atol=1e-4)


def test_shapes_and_errors():
    cfg = FeatureConfig(**SMALL)
    assert log_mel(np.zeros(8000, np.float32), cfg).shape == (32, 32)
    assert log_mel(np.zeros((3, 8000)), cfg).shape == (3, 32, 32)  # float64 input accepted
    with pytest.raises(ValueError, match="1-D or 2-D"):
        log_mel(np.zeros((2, 2, 8000)), cfg)
    segs = music(cfg, 3, "reggae")
    np.testing.assert_array_equal(log_mel(list(segs), cfg), log_mel(segs, cfg))  # a list is stacked on the fly
    with pytest.raises(ValueError, match="of one length"):
        log_mel([segs[0], segs[1][:4000]], cfg)


def test_silence_is_the_amin_floor():
    cfg = FeatureConfig(**SMALL)
    out = log_mel(np.zeros((2, 8000), np.float32), cfg)
    np.testing.assert_allclose(out, 10 * np.log10(AMIN), atol=1e-4)


def test_top_db_floor_is_per_segment():
    cfg = FeatureConfig(**SMALL)
    segs = music(cfg, 2)
    segs[1] = segs[0] * 1e-3  # the same audio, 60 dB quieter
    out = log_mel(segs, cfg)
    for m in out:
        assert m.min() >= m.max() - 80 - 1e-3
    assert out[0].max() - out[1].max() == pytest.approx(60, abs=0.5)


def test_float16_storage_error_is_below_three_hundredths_of_a_db():
    cfg = FeatureConfig()
    mels = log_mel(music(cfg, 2, "ambient"), cfg)
    assert -101 < mels.min() and mels.max() < 128  # the range float16 stores with steps <= 1/16 dB
    err = np.abs(mels.astype(np.float16).astype(np.float32) - mels)
    assert err.max() <= 0.0313


# -- presets ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tutorial", "musicnn"])
def test_each_preset_matches_a_plain_librosa_computation_of_its_recipe(name):
    """The preset's values, written out here by hand, and its features against librosa + NumPy."""
    import librosa

    from genrecls.core.config import feature_preset

    cfg = feature_preset(name)
    recipe = {"tutorial": (22050, 2048, 512, 128, 100_000, (128, 196)),
              "musicnn": (16000, 512, 256, 96, 47_616, (96, 187))}[name]
    assert (cfg.sample_rate, cfg.n_fft, cfg.hop_length, cfg.n_mels, cfg.segment_samples, cfg.mel_shape) == recipe
    assert cfg.preset == name
    segs = music(cfg, 3, "jazz")
    ours = log_mel(segs, cfg)
    S = np.stack([librosa.feature.melspectrogram(y=s, sr=recipe[0], n_fft=recipe[1], hop_length=recipe[2],
                                                 n_mels=recipe[3]) for s in segs])
    if name == "musicnn":
        ref = np.log10(10000.0 * S.astype(np.float32) + 1.0)  # musicnn's formula, in float32
        tol = 1e-4
    else:
        ref = np.stack([librosa.power_to_db(s, ref=1.0, top_db=80.0) for s in S])
        tol = TOL_DB
    assert ours.shape == ref.shape == (3, *recipe[5]) and ours.dtype == np.float32
    assert np.isfinite(ours).all()
    err = np.abs(ours - ref)
    assert err.max() < tol, err.max()
    np.testing.assert_allclose(log_mel(segs[1], cfg), ours[1], atol=1e-5)  # batch == single


def test_musicnn_scale_is_finite_where_a_float16_cast_would_overflow():
    from genrecls.core.config import feature_preset

    cfg = feature_preset("musicnn")
    loud = np.clip(music(cfg, 1, "rock") * 50, -1, 1)  # clipped full-scale audio: mel power far above 6.5
    ours = log_mel(loud, cfg)
    assert np.isfinite(ours).all() and ours.max() > 4


def test_one_feature_mismatch_rule_names_every_differing_setting():
    """ingest, evaluation and training share genrecls.audio.features.check_same_features and its message."""
    from genrecls.audio.features import check_same_features, feature_differences
    from genrecls.core.config import FeatureConfig

    have, want = FeatureConfig(n_mels=32), FeatureConfig(n_mels=64, segment_hop=50_000)
    assert feature_differences(have, want) == {"n_mels": (32, 64), "segment_hop": (100_000, 50_000)}
    check_same_features(have, FeatureConfig(n_mels=32), subject="d", remedy="r")  # the same features: no error

    class Mismatch(Exception):
        pass

    with pytest.raises(Mismatch) as err:
        check_same_features(have, want, subject="s3://b/ds", than="the run", names=("run", "dataset"),
                            remedy="re-ingest it", error=Mismatch)
    assert str(err.value) == ("s3://b/ds was built with other feature settings than the run (segment_hop: run 100000, "
                              "dataset 50000, n_mels: run 32, dataset 64); re-ingest it")
