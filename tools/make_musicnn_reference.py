"""Write tests/data/musicnn_reference.npz: the ORIGINAL musicnn network's outputs on generated audio.

Runs the TF1 graph code of the musicnn 0.1.0 wheel (``musicnn/models.py``, unchanged, under
``tf.compat.v1`` with eager execution disabled, restored from the wheel's ``MSD_musicnn``
checkpoint with ``tf.compat.v1.train.Saver`` as its ``extractor.py`` does) on the log-mel
patches of a deterministic synthetic signal, and stores the patches and the outputs.  It
imports nothing of genrecls, so the reference is independent of the port.

The input recipe is the original ``extractor.batch_data``: ``librosa.feature.melspectrogram(
y, sr=16000, hop_length=256, n_fft=512, n_mels=96).T``, then ``log10(10000 * x + 1)`` (in
float32: the original's float16 cast overflows under NumPy 2), cut into back-to-back
187-frame patches.

    /work/main/.venv/bin/pip download --no-deps musicnn==0.1.0 -d /tmp/musicnn-wheel
    /work/main/.venv/bin/python tools/make_musicnn_reference.py --wheel /tmp/musicnn-wheel/musicnn-0.1.0-py3-none-any.whl

Stored arrays: ``patches`` (2, 187, 96) float32, the network input; ``taggram`` (2, 50)
sigmoid outputs; ``penultimate`` (2, 200); ``max_pool`` and ``mean_pool`` (2, 753); and
``source`` (a string describing how they were made).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SR, N_FFT, HOP, N_MELS, N_FRAMES = 16000, 512, 256, 96, 187
SEED = 20191101


def synthetic_signal(seed: int = SEED) -> np.ndarray:
    """Two patches' worth (95 488 samples, 374 frames) of deterministic test audio at 16 kHz.

    First half: a three-note chord with harmonics, a plucked bass line, kick and hi-hat-like
    noise bursts at 120 BPM.  Second half: a rising chirp, amplitude-modulated band noise and
    a loud square-ish lead (loud enough that the original float16 cast would overflow).
    """
    rng = np.random.default_rng(seed)
    n = 2 * N_FRAMES * HOP - HOP
    t = np.arange(n) / SR
    half = n // 2
    y = np.zeros(n)
    # first half: harmony and drums
    for f0 in (220.0, 277.18, 329.63):
        for h in range(1, 6):
            y[:half] += 0.06 / h * np.sin(2 * np.pi * f0 * h * t[:half] + rng.uniform(0, 2 * np.pi))
    beat = SR // 2
    for start in range(0, half, beat):
        m = min(beat, half - start)
        tt = np.arange(m) / SR
        y[start:start + m] += 0.3 * np.exp(-tt * 5) * np.sin(2 * np.pi * 55.0 * (start // beat % 4 + 1) * tt)
        y[start:start + m] += 0.5 * np.exp(-tt * 30) * np.sin(2 * np.pi * 60.0 * tt * (1 + 2 * np.exp(-tt * 40)))
        hat = start + beat // 2
        if hat + 800 < half:
            y[hat:hat + 800] += 0.15 * rng.standard_normal(800) * np.exp(-np.arange(800) / 150)
    # second half: chirp, modulated noise, loud lead
    th = t[half:] - t[half]
    y[half:] += 0.2 * np.sin(2 * np.pi * (200 * th + 600 * th ** 2))
    noise = rng.standard_normal(n - half)
    noise = np.convolve(noise, np.hanning(9) / np.hanning(9).sum(), mode="same")
    y[half:] += 0.2 * noise * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * th))
    y[half:] += 0.6 * np.tanh(4 * np.sin(2 * np.pi * 440.0 * th)) * (th % 0.25 < 0.18)
    return (0.9 * y / np.abs(y).max()).astype(np.float32)


def original_patches(audio: np.ndarray) -> np.ndarray:
    """The original extractor's ``batch_data`` recipe on a signal, in float32."""
    import librosa

    rep = librosa.feature.melspectrogram(y=audio, sr=SR, hop_length=HOP, n_fft=N_FFT, n_mels=N_MELS).T
    rep = np.log10(np.float32(10000) * rep.astype(np.float32) + np.float32(1))
    starts = range(0, rep.shape[0] - N_FRAMES + 1, N_FRAMES)
    return np.stack([rep[s:s + N_FRAMES] for s in starts]).astype(np.float32)


def run_original(src: str, patches: np.ndarray, model: str = "MSD_musicnn") -> dict[str, np.ndarray]:
    """Outputs of the original graph (``musicnn.models.define_model``) restored from the checkpoint."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tf.compat.v1.layers needs tf-keras under TF >= 2.16
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, src)
    import tensorflow as tf

    tf.compat.v1.disable_eager_execution()
    from musicnn import models  # the wheel's own code

    tf.compat.v1.reset_default_graph()
    with tf.name_scope("model"):
        x = tf.compat.v1.placeholder(tf.float32, [None, N_FRAMES, N_MELS])
        is_training = tf.compat.v1.placeholder(tf.bool)
        y, timbral, temporal, cnn1, cnn2, cnn3, mean_pool, max_pool, penultimate = models.define_model(
            x, is_training, model, 50)
        normalized_y = tf.nn.sigmoid(y)
    with tf.compat.v1.Session() as sess:
        tf.compat.v1.train.Saver().restore(sess, os.path.join(src, "musicnn", model) + "/")
        taggram, pen, mx, mn = sess.run([normalized_y, penultimate, max_pool, mean_pool],
                                        feed_dict={x: patches, is_training: False})
    return {"taggram": taggram, "penultimate": pen, "max_pool": mx, "mean_pool": mn}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wheel", required=True, help="musicnn-0.1.0-py3-none-any.whl")
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "data", "musicnn_reference.npz"))
    args = ap.parse_args(argv)

    audio = synthetic_signal()
    patches = original_patches(audio)
    with tempfile.TemporaryDirectory() as src:
        with zipfile.ZipFile(args.wheel) as wheel:
            wheel.extractall(src)
        outputs = run_original(src, patches)
    import librosa
    import tensorflow as tf

    arrays = {"patches": patches, **{k: np.asarray(v, np.float32) for k, v in outputs.items()}}
    arrays["source"] = np.array(
        f"musicnn 0.1.0 MSD_musicnn, original TF1 graph (tf {tf.__version__}, librosa {librosa.__version__}, "
        f"numpy {np.__version__}); tools/make_musicnn_reference.py synthetic_signal(seed={SEED})")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(args.out + ".tmp", args.out)
    print(f"{args.out}: {os.path.getsize(args.out)} bytes; " + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
