"""Features: log-mel spectrograms of fixed-length segments, batched, in float32.

:func:`log_mel` computes, for a batch of segments, exactly what

    librosa.power_to_db(
        librosa.feature.melspectrogram(y=segment, sr=sr, n_fft=n_fft, hop_length=hop,
                                       n_mels=n_mels, fmin=fmin, fmax=fmax),
        ref=1.0, amin=1e-10, top_db=top_db)

computes for one (centred STFT with zero padding, periodic Hann window, power 2,
Slaney-normalised mel filters), but on a whole batch at once in float32 with the mel
basis and window cached.  It agrees with librosa to within 1e-3 dB on typical audio
(tests/test_features.py checks it); it is about twice as fast as librosa per segment.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.fft

from .config import FeatureConfig

__all__ = ["log_mel", "log_mel_reference", "mel_basis", "AMIN"]

AMIN = 1e-10


@lru_cache(maxsize=8)
def mel_basis(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None) -> np.ndarray:
    """Transposed Slaney mel filter bank, shape (n_fft//2+1, n_mels), float32 (cached)."""
    import librosa

    basis = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
    return np.ascontiguousarray(basis.T.astype(np.float32))


@lru_cache(maxsize=8)
def _window(n_fft: int) -> np.ndarray:
    import scipy.signal

    return scipy.signal.get_window("hann", n_fft, fftbins=True).astype(np.float32)


def log_mel(segments: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """Log-mel spectrograms in dB of a batch of segments.

    Parameters
    ----------
    segments : array of shape (n, segment_samples) or (segment_samples,), float
    cfg : feature configuration

    Returns
    -------
    np.ndarray of shape (n, n_mels, n_frames) (or (n_mels, n_frames)), float32
    """
    x = np.asarray(segments, dtype=np.float32)
    single = x.ndim == 1
    if single:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"segments must be 1-D or 2-D, got shape {x.shape}")
    n_fft, hop = cfg.n_fft, cfg.hop_length
    half = n_fft // 2
    padded = np.pad(x, ((0, 0), (half, half)), mode="constant")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft, axis=1)[:, ::hop]
    spec = scipy.fft.rfft(frames * _window(n_fft), axis=-1, workers=1)
    power = spec.real * spec.real
    power += spec.imag * spec.imag
    mel = power @ mel_basis(cfg.sample_rate, n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)  # (n, frames, mels)
    np.maximum(mel, AMIN, out=mel)
    db = np.log10(mel, out=mel)
    db *= np.float32(10.0)
    if cfg.top_db is not None:
        floor = db.max(axis=(1, 2), keepdims=True) - np.float32(cfg.top_db)
        np.maximum(db, floor, out=db)
    out = np.ascontiguousarray(db.transpose(0, 2, 1))
    return out[0] if single else out


def log_mel_reference(segment: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """The same spectrogram computed by librosa itself (slow; for tests and the tutorial baseline)."""
    import librosa

    S = librosa.feature.melspectrogram(
        y=np.asarray(segment, dtype=np.float32), sr=cfg.sample_rate, n_fft=cfg.n_fft,
        hop_length=cfg.hop_length, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax,
    )
    return librosa.power_to_db(S, ref=1.0, amin=AMIN, top_db=cfg.top_db).astype(np.float32)
