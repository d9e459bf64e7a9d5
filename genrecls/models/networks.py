"""CNN genre classifiers by name, in tf-keras.

Every model takes raw log-mel dB segments of shape (batch, n_mels, n_frames), exactly as
stored in the dataset, and outputs softmax probabilities over the labels: whatever
normalisation a model needs lives inside it, so a run folder alone scores new audio.

``tutorial``
    The CNN of the tutorial genrecls starts from: three 3x3 ``Conv2D`` layers (16, 32, 64
    filters, ReLU) with a 2x2 ``MaxPooling2D`` between each, ``Flatten``, ``Dense(128)``,
    a softmax ``Dense``; RMSprop; unnormalised dB input.  Kept as the baseline.
``default``
    (The name is historical: the default of ``train.model`` is ``musicnn`` since the
    pretrained backbone measured best on real music; this is the best model trained from
    scratch.)  Per-mel-band input normalisation with statistics of the training split (a
    ``Normalization`` layer, stored in the model), SpecAugment-style time and frequency
    masking (:class:`SpecAugment`, active only in training), then four 1-D convolution
    blocks over time with the mel bands as channels (kernel 3, batch normalisation, ReLU,
    max pooling over time, dropout; 128-128-256-256 filters), global average and max
    pooling over time, dropout 0.5 and a softmax ``Dense``; Adam.  About 400 k weights
    against the tutorial's 12.9 M at the default 128x196 input, and about 4x cheaper per
    segment than ``cnn2d``.  Chosen by measurement on the real-music development set
    (5 styles, 109 training tracks): with 16 segments per track and 15 epochs both reached
    the same test track accuracy (0.74), ``default`` at 4x the segments per second, so
    in the same time it trains on every segment (0.78-0.83 in 12 epochs, against 0.70 for
    a logistic regression on mean/std-pooled mels).  ``bench/train.py`` has the figures.
``cnn2d``
    The same input stage, then four 2-D conv blocks (3x3 conv, batch normalisation, ReLU,
    2x2 max pooling, dropout; 16-32-64-128 filters), global average and max pooling,
    dropout and a softmax ``Dense``; Adam.  About 100 k weights.  The first default;
    kept for comparison.
``linear``
    The baseline: per-band normalisation, mean and standard deviation over time of every
    mel band, standardised, one softmax ``Dense`` (a logistic regression on pooled log-mel
    statistics).  What the CNNs must beat.
``musicnn`` (the default of ``train.model``)
    The pretrained MSD musicnn tagger (Pons and Serra 2019) as a frozen feature extractor:
    its pooled mid-level features (and band statistics) of each 187-frame patch, then a trained softmax head
    (:mod:`genrecls.models.transfer`); needs the ``musicnn`` feature preset.

Why tf-keras and not Keras 3: Keras 3 does not train under
``tf.distribute.MultiWorkerMirroredStrategy`` (keras-team/keras#20585), which Ray
Train's TensorflowTrainer uses; tf-keras (``TF_USE_LEGACY_KERAS=1``, set by
:func:`genrecls.core.runtime.worker_env`) does, and its models save as SavedModel and ``.keras``.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from typing import Any, Sequence

import numpy as np

__all__ = ["import_tensorflow", "set_tf_threads", "keras", "spec_augment_class", "time_stats_class", "build_tutorial",
           "build_default", "build_cnn2d", "build_linear", "model_summary", "load_keras_model"]


def import_tensorflow():
    """Import TensorFlow and tf-keras once, without their start-up noise on stderr.

    TensorFlow's C++ logging writes a few lines (``cudart_stub.cc``, ``cpu_feature_guard``,
    "All log messages before absl::InitializeLog()") straight to file descriptor 2 during
    import, whatever ``TF_CPP_MIN_LOG_LEVEL`` says.  The import runs with descriptor 2
    pointed at a temporary file, which is replayed only if the import fails.  Set
    ``GENRECLS_TF_VERBOSE=1`` to see everything.
    """
    if "tensorflow" in sys.modules and "tf_keras" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    if os.environ.get("GENRECLS_TF_VERBOSE") == "1":
        import tensorflow as tf
        import tf_keras  # noqa: F401

        return tf
    try:
        sys.stderr.flush()
    except Exception:
        pass
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            import tensorflow as tf
            import tf_keras  # noqa: F401

            tf.get_logger().setLevel("ERROR")
            tf.config.list_physical_devices()  # the CUDA probe logs here: keep it inside the redirect
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except Exception:
        pass
    return tf


def set_tf_threads(threads: int) -> None:
    """Let TensorFlow's kernels use ``threads`` threads (and at most 2 ops at once); 0 leaves its defaults.

    Only takes effect before TensorFlow runs its first op in this process; later calls are
    ignored (TensorFlow refuses to change its thread pools once they exist).
    """
    threads = int(threads)
    if threads <= 0:
        return
    tf = import_tensorflow()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    except RuntimeError:  # TensorFlow already initialised in this process
        pass


def keras():
    """The tf-keras module (imported quietly)."""
    import_tensorflow()
    import tf_keras

    return tf_keras


@functools.lru_cache(maxsize=None)
def spec_augment_class():
    """Define and register :class:`SpecAugment` on first use (keeps TensorFlow out of import time)."""
    tf = import_tensorflow()
    k = keras()

    @k.saving.register_keras_serializable(package="genrecls")
    class SpecAugment(k.layers.Layer):
        """Time and frequency masking (SpecAugment, Park et al. 2019), active only in training.

        Input (batch, n_mels, n_frames), normalised; each mask sets a random band of up to
        ``freq_width`` mels (or ``time_width`` frames) of each example to ``mask_value``.
        At inference (``training`` false) it is the identity.
        """

        def __init__(self, freq_masks: int = 2, freq_width: int = 8, time_masks: int = 2, time_width: int = 16,
                     mask_value: float = 0.0, **kwargs):
            super().__init__(**kwargs)
            self.freq_masks = int(freq_masks)
            self.freq_width = int(freq_width)
            self.time_masks = int(time_masks)
            self.time_width = int(time_width)
            self.mask_value = float(mask_value)

        def _masks(self, x, axis: int, count: int, width: int):
            batch = tf.shape(x)[0]
            size = tf.shape(x)[axis]
            keep = tf.ones_like(x, dtype=tf.bool)
            idx = tf.range(size)[None, :]
            for _ in range(count):
                w = tf.random.uniform([batch, 1], 0, width + 1, dtype=tf.int32)
                start = tf.cast(tf.random.uniform([batch, 1]) * tf.cast(tf.maximum(size - w + 1, 1), tf.float32), tf.int32)
                band = (idx >= start) & (idx < start + w)  # (batch, size)
                band = band[:, :, None] if axis == 1 else band[:, None, :]
                keep = keep & ~band
            return keep

        def call(self, inputs, training=None):
            def augmented():
                keep = tf.ones_like(inputs, dtype=tf.bool)
                if self.freq_masks and self.freq_width:
                    keep = keep & self._masks(inputs, 1, self.freq_masks, self.freq_width)
                if self.time_masks and self.time_width:
                    keep = keep & self._masks(inputs, 2, self.time_masks, self.time_width)
                return tf.where(keep, inputs, tf.cast(self.mask_value, inputs.dtype))

            if training is None:
                training = k.backend.learning_phase()
            if isinstance(training, (bool, int)):
                return augmented() if training else inputs
            return tf.cond(tf.cast(training, tf.bool), augmented, lambda: inputs)

        def get_config(self):
            return {**super().get_config(), "freq_masks": self.freq_masks, "freq_width": self.freq_width,
                    "time_masks": self.time_masks, "time_width": self.time_width, "mask_value": self.mask_value}

    return SpecAugment


def __getattr__(name: str):  # genrecls.models.networks.SpecAugment without importing TensorFlow at module import
    if name == "SpecAugment":
        return spec_augment_class()
    raise AttributeError(name)


def _pool_size(h: int, w: int) -> tuple[int, int]:
    return (2 if h >= 2 else 1, 2 if w >= 2 else 1)


def build_tutorial(input_shape: tuple[int, int], n_labels: int, *, learning_rate: float = 1e-3, **_: Any):
    """The tutorial's CNN: raw dB in, three convs with two poolings between them, Flatten, Dense head."""
    k = keras()
    h, w = input_shape
    inputs = k.Input(shape=(h, w), name="mel")
    x = k.layers.Reshape((h, w, 1))(inputs)
    x = k.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = k.layers.MaxPooling2D(_pool_size(h, w))(x)
    h, w = h // _pool_size(h, w)[0], w // _pool_size(h, w)[1]
    x = k.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = k.layers.MaxPooling2D(_pool_size(h, w))(x)
    x = k.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = k.layers.Flatten()(x)
    x = k.layers.Dense(128, activation="relu")(x)
    outputs = k.layers.Dense(n_labels, activation="softmax", name="probabilities")(x)
    model = k.Model(inputs, outputs, name="tutorial")
    model.compile(optimizer=k.optimizers.RMSprop(learning_rate=learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _normalised_input(input_shape: tuple[int, int], mean, std, augment: bool):
    """The model input, per-mel-band normalisation (training-split statistics) and SpecAugment."""
    k = keras()
    h, w = input_shape
    inputs = k.Input(shape=(h, w), name="mel")
    mean_arr = np.zeros(h, np.float32) if mean is None else np.asarray(mean, np.float32).reshape(h)
    std_arr = np.ones(h, np.float32) if std is None else np.asarray(std, np.float32).reshape(h)
    std_arr = np.maximum(std_arr, 1e-3)
    x = k.layers.Normalization(axis=1, mean=mean_arr.tolist(), variance=(std_arr ** 2).tolist(), name="normalise")(inputs)
    if augment:
        x = spec_augment_class()(freq_masks=2, freq_width=max(1, h // 8), time_masks=2,
                                  time_width=max(1, w // 8), name="spec_augment")(x)
    return inputs, x


def _pooled_head(inputs, x, n_labels: int, *, dropout: float, learning_rate: float, name: str, pools):
    """Global average and max pooling (``pools``: the two layer classes), dropout, softmax; compiled with Adam."""
    k = keras()
    x = k.layers.Concatenate()([pool()(x) for pool in pools])
    x = k.layers.Dropout(dropout)(x)
    outputs = k.layers.Dense(n_labels, activation="softmax", name="probabilities")(x)
    model = k.Model(inputs, outputs, name=name)
    model.compile(optimizer=k.optimizers.Adam(learning_rate=learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def build_default(input_shape: tuple[int, int], n_labels: int, *, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None, augment: bool = True, learning_rate: float = 1e-3,
                  filters: Sequence[int] = (128, 128, 256, 256), dropout: float = 0.5, **_: Any):
    """Normalised input, SpecAugment, 1-D convolutions over time with the mel bands as channels."""
    k = keras()
    h, w = input_shape
    inputs, x = _normalised_input(input_shape, mean, std, augment)
    x = k.layers.Permute((2, 1), name="time_major")(x)  # (frames, mels): each frame's spectrum is a vector
    for i, f in enumerate(filters):
        x = k.layers.Conv1D(f, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        x = k.layers.BatchNormalization(momentum=0.9, name=f"bn{i + 1}")(x)
        x = k.layers.Activation("relu")(x)
        if i < len(filters) - 1 and w >= 2:
            x = k.layers.MaxPooling1D(2)(x)
            w //= 2
        x = k.layers.Dropout(0.1)(x)
    return _pooled_head(inputs, x, n_labels, dropout=dropout, learning_rate=learning_rate, name="default",
                        pools=(k.layers.GlobalAveragePooling1D, k.layers.GlobalMaxPooling1D))


def build_cnn2d(input_shape: tuple[int, int], n_labels: int, *, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None, augment: bool = True, learning_rate: float = 1e-3,
                filters: Sequence[int] = (16, 32, 64, 128), dropout: float = 0.3, **_: Any):
    """Normalised input, SpecAugment, 2-D conv blocks with batch norm, global pooling, dropout."""
    k = keras()
    h, w = input_shape
    inputs, x = _normalised_input(input_shape, mean, std, augment)
    x = k.layers.Reshape((h, w, 1))(x)
    for i, f in enumerate(filters):
        x = k.layers.Conv2D(f, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        x = k.layers.BatchNormalization(momentum=0.9, name=f"bn{i + 1}")(x)
        x = k.layers.Activation("relu")(x)
        pool = _pool_size(h, w)
        if pool != (1, 1):
            x = k.layers.MaxPooling2D(pool)(x)
            h, w = h // pool[0], w // pool[1]
        x = k.layers.Dropout(0.1 * (i + 1) / len(filters))(x)
    return _pooled_head(inputs, x, n_labels, dropout=dropout, learning_rate=learning_rate, name="cnn2d",
                        pools=(k.layers.GlobalAveragePooling2D, k.layers.GlobalMaxPooling2D))


@functools.lru_cache(maxsize=None)
def time_stats_class():
    """Define and register :class:`TimeStats` on first use (keeps TensorFlow out of import time)."""
    tf = import_tensorflow()
    k = keras()

    @k.saving.register_keras_serializable(package="genrecls")
    class TimeStats(k.layers.Layer):
        """Mean and standard deviation over time of each mel band: (batch, n_mels, n_frames) -> (batch, 2 n_mels)."""

        def call(self, inputs):
            mean = tf.reduce_mean(inputs, axis=2)
            std = tf.sqrt(tf.maximum(tf.reduce_mean(tf.square(inputs), axis=2) - tf.square(mean), 0.0) + 1e-6)
            return tf.concat([mean, std], axis=1)

    return TimeStats


def build_linear(input_shape: tuple[int, int], n_labels: int, *, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, learning_rate: float = 1e-3, l2: float = 1e-3, **_: Any):
    """The baseline a CNN must beat: a logistic regression on pooled log-mel statistics.

    Per-band normalised input, the mean and standard deviation over time of each band
    (:class:`TimeStats`), standardised (batch normalisation, a fixed affine map at
    inference), one softmax ``Dense`` with L2; Adam.  (2 n_mels + 1) n_labels + 8 n_mels weights.
    """
    k = keras()
    inputs, x = _normalised_input(input_shape, mean, std, augment=False)
    x = time_stats_class()(name="time_stats")(x)
    x = k.layers.BatchNormalization(name="standardise")(x)
    outputs = k.layers.Dense(n_labels, activation="softmax", kernel_regularizer=k.regularizers.L2(l2),
                             name="probabilities")(x)
    model = k.Model(inputs, outputs, name="linear")
    model.compile(optimizer=k.optimizers.Adam(learning_rate=learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def model_summary(model) -> dict[str, Any]:
    """Name, weight count and layer names, for run.json and the report."""
    return {"name": model.name, "parameters": int(model.count_params()), "layers": [l.name for l in model.layers]}


def load_keras_model(path: str):
    """Load a run's ``model.keras`` (safe mode; registers genrecls' layers first)."""
    spec_augment_class()
    time_stats_class()
    k = keras()
    return k.models.load_model(path, safe_mode=True, compile=False)
