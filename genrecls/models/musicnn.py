"""The pretrained musicnn tagger (Pons and Serra, 2019) in tf-keras, with its weights shipped.

A port of the ``MSD_musicnn`` network of the ``musicnn`` 0.1.0 package (ISC licence; the
weights, converted once by ``tools/convert_musicnn.py``, are in
``genrecls/weights/msd_musicnn.npz`` with the licence notice beside them; nothing is
downloaded at run time).  Its outputs match the original TF1 graph to within 1e-4
(``tests/test_musicnn.py`` against ``tests/data/musicnn_reference.npz``, made by
``tools/make_musicnn_reference.py``).  No Ray in here.

Public API (stable; other modules build on it)
----------------------------------------------
``MUSICNN_FEATURES`` : dict
    The input recipe, as data: ``sample_rate`` 16000, ``n_fft`` 512, ``hop_length`` 256,
    ``n_mels`` 96, ``fmin`` 0, ``fmax`` 8000, ``window`` "hann", ``center`` True,
    ``pad_mode`` "constant", ``power`` 2.0, ``htk`` False, ``mel_norm`` "slaney",
    ``log_multiplier`` 10000.0 (``log10(log_multiplier * mel_power + 1)``),
    ``patch_frames`` 187, ``patch_samples`` 47616 (a standalone segment of this many samples
    has exactly 187 centred frames), ``patch_hop_samples`` 47872 (187 * 256, the spacing of
    the original's non-overlapping patches).
``log_compress(mel_power) -> float32 array``
    ``log10(10000 * mel_power + 1)`` in float32, any shape.  The one place of that rule.
``mel_power(audio, *, sample_rate=16000) -> (n_frames, 96) float32``
    Mel power spectrogram of a whole 1-D signal, time first, ``n_frames = 1 + len // 256``.
``log_mel_frames(audio, *, sample_rate=16000) -> (n_frames, 96) float32``
    ``log_compress(mel_power(audio))``: the original's ``audio_rep``.
``musicnn_log_mel(audio, *, sample_rate=16000, hop_frames=187, pad_short=False)
-> (n_patches, 187, 96) float32``
    The network's input: :func:`log_mel_frames` cut into 187-frame patches every
    ``hop_frames`` frames (the original's ``batch_data``).  Audio shorter than one patch
    gives ``(0, 187, 96)``, or with ``pad_short`` one patch of its frames repeated.
``MSD_TAGS``, ``MTT_TAGS`` : tuple of 50 str
    Tag names, in the order of the taggram.
``build_musicnn(*, n_frames=187, n_tags=50, name="musicnn") -> keras.Model``
    The architecture, untrained.  Input ``(batch, n_frames, 96)`` float32 log-mel patches
    (time first; ``n_frames=None`` accepts any length >= 1).  Outputs, a dict:
    ``"taggram"`` (batch, 50) sigmoid tag probabilities; ``"penultimate"`` (batch, 200)
    the embedding (the 200-unit dense layer after ReLU and batch norm, the original's
    ``penultimate`` feature); ``"max_pool"`` and ``"mean_pool"`` (batch, 753) the
    temporal pooling of the mid-end features.  Layer names fixed for fine-tuning:
    ``input_bn``, ``timbral_74``/``timbral_77`` (+``_bn``), ``temporal_128``/``_64``/``_32``
    (+``_bn``), ``frontend`` (concatenation, 561 channels), ``midend_1..3`` (+``_bn``),
    ``midend`` (753 channels), ``pool_bn``, ``penultimate_dense``, ``penultimate``,
    ``logits``, ``taggram``.
``load_musicnn(variant="MSD_musicnn", *, n_frames=187) -> keras.Model``
    :func:`build_musicnn` with the shipped weights.  Inference mode is the caller's
    ``training=False`` (batch norm then uses the stored statistics, dropout is off).
``predict(model, patches, *, batch_size=64) -> dict[str, np.ndarray]``
    Runs ``model`` on ``(n, frames, 96)`` patches in batches (``training=False``); float32
    arrays keyed as the model's outputs; ``n = 0`` gives empty arrays.
``top_tags(taggram, k=5, *, tags=MSD_TAGS) -> list[tuple[str, float]]``
    The ``k`` most likely tags with their probability, highest first; a 2-D taggram
    (patches, 50) is averaged over patches first (a track's tags).
``weights_path(variant="MSD_musicnn") -> pathlib.Path``
    The shipped weights file (inside the installed package).
``load_weights(model, path)``
    Sets a :func:`build_musicnn` model's weights from a converted ``.npz``, strictly.
``VARIANTS``
    Variant name -> weights file name; ``MSD_musicnn`` ships.  ``MTT_musicnn`` (MagnaTagATune
    tags, :data:`MTT_TAGS`) loads if converted with ``tools/convert_musicnn.py --variant
    MTT_musicnn``; it is not shipped.

Preprocessing notes
-------------------
The original (``musicnn/extractor.py``) calls ``librosa.feature.melspectrogram(y, sr=16000,
hop_length=256, n_fft=512, n_mels=96)`` with librosa's defaults: power spectrum (power 2),
periodic Hann window, centred frames, Slaney mel scale (``htk=False``) with Slaney-normalised
filters, fmin 0, fmax 8 kHz; it then casts to float16 and computes ``log10(10000 * x + 1)``.
Here everything stays float32: under NumPy 2 the float16 product overflows to inf for mel
power above ~6.5.  Centring pads with zeros (librosa >= 0.10's default ``pad_mode``; the
librosa of 2019 that trained musicnn reflected instead, which changes only a signal's first
and last frame).  The original resampled with librosa.load (resampy); ``sample_rate`` other
than 16 kHz is resampled here with soxr (HQ), as genrecls reads audio.

Per-segment computation: a 187-frame patch is frames ``[187 i, 187 i + 187)`` of the whole
signal's spectrogram.  Computing it from the standalone segment of ``patch_samples`` samples
starting at sample ``i * patch_hop_samples`` gives the same frame centres; only the two edge
frames differ (zero padding instead of the neighbouring audio).
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "MUSICNN_FEATURES", "MSD_TAGS", "MTT_TAGS", "VARIANTS",
    "log_compress", "mel_power", "log_mel_frames", "musicnn_log_mel",
    "build_musicnn", "load_musicnn", "load_weights", "predict", "top_tags", "weights_path",
]

MUSICNN_FEATURES: dict[str, Any] = dict(
    sample_rate=16000,
    n_fft=512,
    hop_length=256,
    n_mels=96,
    fmin=0.0,
    fmax=8000.0,
    window="hann",
    center=True,
    pad_mode="constant",
    power=2.0,
    htk=False,
    mel_norm="slaney",
    log_multiplier=10000.0,
    patch_frames=187,
    patch_samples=186 * 256,
    patch_hop_samples=187 * 256,
)

MSD_TAGS: tuple[str, ...] = (
    "rock", "pop", "alternative", "indie", "electronic", "female vocalists", "dance", "00s",
    "alternative rock", "jazz", "beautiful", "metal", "chillout", "male vocalists", "classic rock",
    "soul", "indie rock", "Mellow", "electronica", "80s", "folk", "90s", "chill", "instrumental",
    "punk", "oldies", "blues", "hard rock", "ambient", "acoustic", "experimental",
    "female vocalist", "guitar", "Hip-Hop", "70s", "party", "country", "easy listening", "sexy",
    "catchy", "funk", "electro", "heavy metal", "Progressive rock", "60s", "rnb", "indie pop",
    "sad", "House", "happy",
)

MTT_TAGS: tuple[str, ...] = (
    "guitar", "classical", "slow", "techno", "strings", "drums", "electronic", "rock", "fast",
    "piano", "ambient", "beat", "violin", "vocal", "synth", "female", "indian", "opera", "male",
    "singing", "vocals", "no vocals", "harpsichord", "loud", "quiet", "flute", "woman",
    "male vocal", "no vocal", "pop", "soft", "sitar", "solo", "man", "classic", "choir", "voice",
    "new age", "dance", "male voice", "female vocal", "beats", "harp", "cello", "no voice",
    "weird", "country", "metal", "female voice", "choral",
)

#: variant -> (weights file in genrecls/weights, tag names)
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "MSD_musicnn": ("msd_musicnn.npz", MSD_TAGS),
    "MTT_musicnn": ("mtt_musicnn.npz", MTT_TAGS),
}

_N_MELS = MUSICNN_FEATURES["n_mels"]
_PATCH = MUSICNN_FEATURES["patch_frames"]
#: frames per STFT block in :func:`mel_power` (bounds memory on hour-long signals: ~8 MiB)
_BLOCK_FRAMES = 4096


# ---------------------------------------------------------------------------- preprocessing

def log_compress(mel_power: np.ndarray) -> np.ndarray:
    """``log10(10000 * mel_power + 1)`` in float32 (musicnn's input scaling), any shape.

    The original casts to float16 first; that overflows under NumPy 2, so it is not copied.
    """
    x = np.asarray(mel_power, dtype=np.float32)
    out = x * np.float32(MUSICNN_FEATURES["log_multiplier"])
    return np.log10(out + np.float32(1.0), out=out)


def _as_signal(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    x = np.asarray(audio)
    if x.ndim != 1:
        raise ValueError(f"audio must be a 1-D mono signal, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"audio must be floating point samples in [-1, 1], got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise ValueError("audio contains NaN or infinite samples")
    if int(sample_rate) != sample_rate or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    target = MUSICNN_FEATURES["sample_rate"]
    if sample_rate != target and x.size:
        import soxr

        x = soxr.resample(x, int(sample_rate), target, quality="HQ").astype(np.float32, copy=False)
    return x


def mel_power(audio: np.ndarray, *, sample_rate: int = 16000) -> np.ndarray:
    """Mel power spectrogram of a whole signal, time first, float32.

    What ``librosa.feature.melspectrogram(y=audio, sr=16000, n_fft=512, hop_length=256,
    n_mels=96).T`` computes (centred frames, zero padding, periodic Hann window, power 2,
    Slaney mel filters), in float32 and in blocks of frames so long signals stay small.

    Parameters
    ----------
    audio : 1-D float array, mono samples
    sample_rate : its rate; other than 16000 it is resampled to 16 kHz first (soxr HQ)

    Returns
    -------
    np.ndarray of shape (1 + n_samples // 256, 96), float32 (at 16 kHz)
    """
    import scipy.fft

    from genrecls.audio.features import hann_window, mel_filters

    x = _as_signal(audio, sample_rate)
    n_fft, hop = MUSICNN_FEATURES["n_fft"], MUSICNN_FEATURES["hop_length"]
    n_frames = 1 + x.size // hop
    padded = np.zeros(x.size + n_fft, np.float32)
    padded[n_fft // 2: n_fft // 2 + x.size] = x
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop][:n_frames]
    fb_t = np.ascontiguousarray(
        mel_filters(MUSICNN_FEATURES["sample_rate"], n_fft, _N_MELS,
                    MUSICNN_FEATURES["fmin"], MUSICNN_FEATURES["fmax"]).T)
    window = hann_window(n_fft)
    out = np.empty((n_frames, _N_MELS), np.float32)
    for start in range(0, n_frames, _BLOCK_FRAMES):
        block = frames[start: start + _BLOCK_FRAMES] * window
        spec = scipy.fft.rfft(block, axis=-1, workers=1, overwrite_x=True)
        power = np.square(spec.real) + np.square(spec.imag)
        np.matmul(power, fb_t, out=out[start: start + len(block)])
    return out


def log_mel_frames(audio: np.ndarray, *, sample_rate: int = 16000) -> np.ndarray:
    """musicnn's log-mel spectrogram of a whole signal: (1 + n_samples // 256, 96), float32."""
    return log_compress(mel_power(audio, sample_rate=sample_rate))


def musicnn_log_mel(audio: np.ndarray, *, sample_rate: int = 16000, hop_frames: int = _PATCH,
                    pad_short: bool = False) -> np.ndarray:
    """The network's input: 187-frame log-mel patches of a signal, (n_patches, 187, 96) float32.

    Patches start every ``hop_frames`` frames (187: back to back, as the original's default;
    less: overlapping); a trailing part shorter than a patch is dropped, as in the original.

    Parameters
    ----------
    audio : 1-D float array, mono samples
    sample_rate : its rate (resampled to 16 kHz if different)
    hop_frames : frames between patch starts, >= 1
    pad_short : if the signal has fewer than 187 frames (about 2.98 s), return one patch of
        its frames repeated (musicnn's training did the same, "repeat-pad") instead of none

    Returns
    -------
    np.ndarray of shape (n_patches, 187, 96), float32, C-contiguous;
    ``n_patches = 1 + (n_frames - 187) // hop_frames`` (0 if the signal is too short).

    Examples
    --------
    >>> musicnn_log_mel(np.zeros(16000 * 6, np.float32)).shape
    (2, 187, 96)
    """
    if not isinstance(hop_frames, (int, np.integer)) or hop_frames < 1:
        raise ValueError(f"hop_frames must be an integer >= 1, got {hop_frames!r}")
    frames = log_mel_frames(audio, sample_rate=sample_rate)
    n = frames.shape[0]
    if n < _PATCH:
        if not pad_short or (n == 1 and not np.asarray(audio).size):
            return np.zeros((0, _PATCH, _N_MELS), np.float32)
        reps = math.ceil(_PATCH / n)
        return np.ascontiguousarray(np.tile(frames, (reps, 1))[None, :_PATCH])
    starts = range(0, n - _PATCH + 1, int(hop_frames))
    return np.stack([frames[s: s + _PATCH] for s in starts])


# ---------------------------------------------------------------------------- the network

def build_musicnn(*, n_frames: int | None = _PATCH, n_tags: int = 50, name: str = "musicnn"):
    """The musicnn architecture (``build_musicnn`` of the original ``models.py``), untrained.

    Front end on the batch-normalised (time, 96) input: timbral convolutions of 7x38 and 7x67
    (time x frequency, 204 filters each, time padded by 3 on both sides, valid in frequency)
    and temporal convolutions of 128x1, 64x1 and 32x1 (51 filters, 'same' padding); each
    ReLU, batch norm and max over frequency; concatenated (561 channels).  Mid end: three
    7-wide 1-D convolutions over time of 64 filters ('same'), ReLU and batch norm, the 2nd
    and 3rd with residual connections, densely concatenated with the front end (753).  Back
    end: max and mean over time, interleaved per channel as the original flattens them
    (1506), batch norm, dropout 0.5, Dense(200, ReLU), batch norm (the embedding), dropout
    0.5, Dense(n_tags) and a sigmoid.  See the module docstring for inputs, outputs, names.
    """
    from genrecls.models.networks import keras

    k = keras()
    L = k.layers
    if n_frames is not None and (not isinstance(n_frames, (int, np.integer)) or n_frames < 1):
        raise ValueError(f"n_frames must be a positive integer or None, got {n_frames!r}")

    inp = L.Input(shape=(n_frames, _N_MELS), dtype="float32", name="log_mel")
    x = L.Reshape((-1, _N_MELS, 1), name="expand")(inp)
    x = L.BatchNormalization(name="input_bn")(x)

    def freq_max(t, label):
        width, channels = t.shape[2], t.shape[3]
        t = L.MaxPooling2D(pool_size=(1, width), strides=(1, width), name=f"{label}_pool")(t)
        return L.Reshape((-1, channels), name=f"{label}_squeeze")(t)

    def block(t, filters, kernel, padding, label):
        t = L.Conv2D(filters, kernel, padding=padding, activation="relu", name=label)(t)
        t = L.BatchNormalization(name=f"{label}_bn")(t)
        return freq_max(t, label)

    padded = L.ZeroPadding2D(((3, 3), (0, 0)), name="timbral_pad")(x)
    front = [
        block(padded, 204, (7, int(0.4 * _N_MELS)), "valid", "timbral_74"),
        block(padded, 204, (7, int(0.7 * _N_MELS)), "valid", "timbral_77"),
        block(x, 51, (128, 1), "same", "temporal_128"),
        block(x, 51, (64, 1), "same", "temporal_64"),
        block(x, 51, (32, 1), "same", "temporal_32"),
    ]
    frontend = L.Concatenate(axis=-1, name="frontend")(front)

    def mid(t, label):
        t = L.Conv1D(64, 7, padding="same", activation="relu", name=label)(t)
        return L.BatchNormalization(name=f"{label}_bn")(t)

    cnn1 = mid(frontend, "midend_1")
    cnn2 = L.Add(name="midend_res_2")([mid(cnn1, "midend_2"), cnn1])
    cnn3 = L.Add(name="midend_res_3")([mid(cnn2, "midend_3"), cnn2])
    midend = L.Concatenate(axis=-1, name="midend")([frontend, cnn1, cnn2, cnn3])
    channels = midend.shape[-1]

    max_pool = L.GlobalMaxPooling1D(name="max_pool")(midend)
    mean_pool = L.GlobalAveragePooling1D(name="mean_pool")(midend)
    pooled = L.Concatenate(axis=-1, name="pool_pairs")([
        L.Reshape((channels, 1), name="max_pool_col")(max_pool),
        L.Reshape((channels, 1), name="mean_pool_col")(mean_pool),
    ])
    flat = L.Flatten(name="pool_flat")(pooled)  # [max_0, mean_0, max_1, mean_1, ...] as the original
    flat = L.BatchNormalization(name="pool_bn")(flat)
    flat = L.Dropout(0.5, name="pool_dropout")(flat)
    dense = L.Dense(200, activation="relu", name="penultimate_dense")(flat)
    penultimate = L.BatchNormalization(name="penultimate")(dense)
    logits = L.Dense(n_tags, name="logits")(L.Dropout(0.5, name="penultimate_dropout")(penultimate))
    taggram = L.Activation("sigmoid", name="taggram", dtype="float32")(logits)
    return k.Model(inp, {"taggram": taggram, "penultimate": penultimate,
                         "max_pool": max_pool, "mean_pool": mean_pool}, name=name)


def weights_path(variant: str = "MSD_musicnn") -> Path:
    """Path of a variant's weights file inside the installed ``genrecls`` package."""
    if variant not in VARIANTS:
        raise ValueError(f"musicnn variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    return Path(str(resources.files("genrecls").joinpath("weights", VARIANTS[variant][0])))


def load_weights(model, path: str | Path) -> None:
    """Set ``model``'s weights from a converted ``.npz`` (keys ``<layer>/<weight>``), strictly.

    Every weight of the model must be in the file with its shape, and every array of the
    file must be used; otherwise ``ValueError`` names the differences.
    """
    with np.load(path, allow_pickle=False) as f:
        stored = {key: f[key] for key in f.files if not key.startswith("meta/")}
    used = set()
    problems = []
    for layer in model.layers:
        if not layer.weights:
            continue
        values = []
        for w in layer.weights:
            key = f"{layer.name}/{w.name.split('/')[-1].split(':')[0]}"
            if key not in stored:
                problems.append(f"missing {key}")
                continue
            if tuple(stored[key].shape) != tuple(w.shape):
                problems.append(f"{key}: file {stored[key].shape}, model {tuple(w.shape)}")
                continue
            values.append(stored[key])
            used.add(key)
        if len(values) == len(layer.weights):
            layer.set_weights(values)
    unused = sorted(set(stored) - used)
    if unused:
        problems.append(f"unused in the file: {', '.join(unused)}")
    if problems:
        raise ValueError(f"musicnn weights {path} do not fit the model: " + "; ".join(problems))


def load_musicnn(variant: str = "MSD_musicnn", *, n_frames: int | None = _PATCH):
    """The pretrained network with its shipped weights (see :func:`build_musicnn`)."""
    path = weights_path(variant)
    if not path.is_file():
        raise FileNotFoundError(
            f"musicnn weights for {variant} not found at {path}; convert them with "
            f"tools/convert_musicnn.py --variant {variant}")
    model = build_musicnn(n_frames=n_frames, n_tags=len(VARIANTS[variant][1]), name=variant.lower())
    load_weights(model, path)
    return model


def predict(model, patches: np.ndarray, *, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Run ``model`` on log-mel patches in batches, in inference mode.

    Parameters
    ----------
    model : a model of :func:`build_musicnn` / :func:`load_musicnn`
    patches : array (n, frames, 96), float32
    batch_size : patches per call

    Returns
    -------
    dict of float32 arrays, the model's outputs, each with n rows.
    """
    x = np.asarray(patches, dtype=np.float32)
    if x.ndim != 3 or x.shape[2] != _N_MELS:
        raise ValueError(f"patches must have shape (n, frames, {_N_MELS}), got {x.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if len(x) == 0:
        return {name: np.zeros((0,) + tuple(t.shape[1:]), np.float32) for name, t in model.output.items()}
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(x), batch_size):
        out = model(x[start: start + batch_size], training=False)
        for name, value in out.items():
            parts.setdefault(name, []).append(np.asarray(value, dtype=np.float32))
    return {name: np.concatenate(values) for name, values in parts.items()}


def top_tags(taggram: np.ndarray, k: int = 5, *, tags: Sequence[str] = MSD_TAGS) -> list[tuple[str, float]]:
    """The ``k`` most likely tags, highest first, as ``(tag, probability)``.

    ``taggram`` is one patch's tag probabilities (50,) or a track's (n_patches, 50), which is
    averaged over patches first.  Ties keep the tag order.

    Examples
    --------
    >>> p = np.zeros(50); p[9] = 0.8; p[0] = 0.3
    >>> top_tags(p, 2)
    [('jazz', 0.8), ('rock', 0.3)]
    """
    t = np.asarray(taggram, dtype=np.float64)
    if t.ndim == 2:
        if len(t) == 0:
            raise ValueError("taggram has no patches")
        t = t.mean(axis=0)
    if t.ndim != 1 or t.shape[0] != len(tags):
        raise ValueError(f"taggram must have shape ({len(tags)},) or (n, {len(tags)}), got {np.shape(taggram)}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    order = np.argsort(-t, kind="stable")[:k]
    return [(tags[i], float(t[i])) for i in order]
