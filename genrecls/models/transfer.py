"""Transfer learning on the pretrained MSD musicnn tagger: the ``musicnn`` model.

The classifier is the pretrained network of :mod:`genrecls.models.musicnn` up to its mid-level
features, then a trained head (dropout and one softmax ``Dense``).  The embedding a segment
gets (945 numbers) is

* the mean over time of the network's 753 mid-end features (``mean_pool``: its front-end
  timbral/temporal filters and the residual 1-D convolutions, before the tag-specific
  dense layers), and
* the mean and standard deviation over time of each of the 96 input mel bands (the
  ``linear`` baseline's statistics).

Chosen on the 23 validation tracks of the real-music development set (5 styles; a logistic
regression on each candidate at 5 strengths of L2, track = mean of its segments'
probabilities): the 200-d ``penultimate`` embedding 0.74-0.78, the 50 tags 0.74,
``mean_pool`` alone 0.78-0.83, ``mean_pool`` with ``max_pool`` 0.78-0.87, ``mean_pool``
with the band statistics 0.83-0.91 (the band statistics alone 0.70-0.78).  The penultimate
layer is trained for the 50 MSD tags and discards what separates styles the tags do not
name.

The model takes the stored segments as they are, (batch, 96, 187) ``log10(10000 S + 1)`` of
the ``musicnn`` feature preset, and transposes them to the network's time-first input inside
the model, so the exported run scores raw segments like every other model.

Two ways to train it (``train.fine_tune``):

* frozen backbone (the default): the backbone is a fixed function of the segment, so each
  segment's embedding is computed ONCE, by a Ray Data actor over the training and
  validation segments (:func:`embed_dataset`), kept in the object store, and the workers
  train only the head on 945-d rows, epoch after epoch.  An epoch then costs what a
  logistic regression on 945 numbers costs; the backbone runs once per segment in all.
* fine-tuning (``train.fine_tune=true``): the whole network trains on the log-mel
  segments every epoch (its batch norm layers keep their pretrained statistics); about the CPU cost of the
  backbone's forward and backward pass per segment and epoch.  Use a small
  ``train.learning_rate`` (1e-4) not to wreck the pretrained weights.

The head standardises the embedding with the training split's per-dimension mean and
standard deviation (computed by the driver on the embeddings, like the per-band
normalisation of the other models), then dropout and one softmax ``Dense`` (a logistic
regression on the embedding, as in the issue's baseline of 0.93).

The exported model always includes the backbone (:func:`build_musicnn_classifier` with the
head's weights set by :func:`head_weights_into`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["BACKBONE_LAYER", "EMBEDDING_DIM", "HEAD_LAYER", "build_backbone", "build_head", "build_musicnn_classifier",
           "head_weights_into", "embed_dataset", "Embedder"]

#: the network's layer whose output (mean over time of the mid-end features) is part of the embedding
BACKBONE_LAYER = "mean_pool"
#: size of the embedding the head is trained on: 753 pooled mid-end features + mean and std of 96 bands
EMBEDDING_DIM = 753 + 2 * 96
#: segments per call of a model holding the backbone (run.json "max_batch"; ~9 MB of activations per segment)
MAX_BATCH = 32
#: the head's one weighted layer (its name is the same in the head alone and in the full model)
HEAD_LAYER = "probabilities"
_HEAD_DROPOUT = 0.3
_HEAD_L2 = 1e-3


def build_backbone(*, trainable: bool = False):
    """The pretrained network from (batch, 96, 187) stored segments to the (batch, 945) embedding."""
    from genrecls.models.musicnn import MUSICNN_FEATURES, load_musicnn
    from genrecls.models.networks import keras, time_stats_class

    k = keras()
    net = load_musicnn()
    net.trainable = trainable
    n_mels, n_frames = MUSICNN_FEATURES["n_mels"], MUSICNN_FEATURES["patch_frames"]
    inputs = k.Input(shape=(n_mels, n_frames), name="mel")
    x = k.layers.Permute((2, 1), name="time_first")(inputs)  # stored mel-major; the network wants time first
    pooled = k.Model(net.inputs, net.get_layer(BACKBONE_LAYER).output, name="musicnn_backbone")
    # always in inference mode: batch norm keeps the pretrained statistics (and dropout is off) even when
    # fine-tuning, the usual way to fine-tune a network with batch norm on small batches
    features = pooled(x, training=False)
    bands = time_stats_class()(name="band_stats")(inputs)
    embedding = k.layers.Concatenate(name="embedding")([features, bands])
    return k.Model(inputs, embedding, name="musicnn_embedding")


def _head(k, x, n_labels: int, mean, std):
    """Standardise the embedding (training-split statistics), dropout, softmax."""
    mean_arr = np.zeros(EMBEDDING_DIM, np.float32) if mean is None else np.asarray(mean, np.float32).reshape(EMBEDDING_DIM)
    std_arr = np.ones(EMBEDDING_DIM, np.float32) if std is None else np.asarray(std, np.float32).reshape(EMBEDDING_DIM)
    std_arr = np.maximum(std_arr, 1e-3)
    x = k.layers.Normalization(mean=mean_arr.tolist(), variance=(std_arr ** 2).tolist(), name="head_standardise")(x)
    x = k.layers.Dropout(_HEAD_DROPOUT, name="head_dropout")(x)
    return k.layers.Dense(n_labels, activation="softmax", kernel_regularizer=k.regularizers.L2(_HEAD_L2),
                          name=HEAD_LAYER)(x)


def _compile(k, model, learning_rate: float):
    model.compile(optimizer=k.optimizers.Adam(learning_rate=learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def build_head(n_labels: int, *, learning_rate: float = 1e-3, mean=None, std=None, **_: Any):
    """The head alone, on (batch, 945) embeddings: what the workers train with a frozen backbone.

    ``mean``/``std``: per-dimension statistics of the training split's embeddings.
    """
    from genrecls.models.networks import keras

    k = keras()
    inputs = k.Input(shape=(EMBEDDING_DIM,), name="embedding")
    return _compile(k, k.Model(inputs, _head(k, inputs, n_labels, mean, std), name="musicnn_head"), learning_rate)


def build_musicnn_classifier(input_shape: tuple[int, int], n_labels: int, *, learning_rate: float = 1e-3,
                             fine_tune: bool = False, mean=None, std=None, **_: Any):
    """The whole classifier: stored (96, 187) segments -> pretrained embedding -> softmax head.

    ``mean``/``std``: the head's embedding standardisation (training-split statistics).
    """
    from genrecls.models.musicnn import MUSICNN_FEATURES
    from genrecls.models.networks import keras

    expected = (MUSICNN_FEATURES["n_mels"], MUSICNN_FEATURES["patch_frames"])
    if tuple(input_shape) != expected:
        raise ValueError(f"the musicnn model takes {expected[0]}x{expected[1]} segments (the musicnn feature preset), "
                         f"got {input_shape[0]}x{input_shape[1]}")
    k = keras()
    backbone = build_backbone(trainable=fine_tune)
    inputs = k.Input(shape=expected, name="mel")
    model = k.Model(inputs, _head(k, backbone(inputs), n_labels, mean, std), name="musicnn")
    return _compile(k, model, learning_rate)


def head_weights_into(model, head_weights: list[np.ndarray]) -> None:
    """Set the full classifier's head from the weights of a trained :func:`build_head` model."""
    model.get_layer(HEAD_LAYER).set_weights(head_weights)


class Embedder:
    """A Ray Data callable class: ``x`` (n, 96, 187) segments -> ``x`` (n, 945) embeddings, float16.

    Other columns (``y``, ``w``, ``t``) pass through.  One backbone per actor, loaded once.
    """

    def __init__(self, threads: int = 0):
        from genrecls.models.networks import import_tensorflow, set_tf_threads

        tf = import_tensorflow()
        set_tf_threads(int(threads) or (os.cpu_count() or 1))
        self._tf = tf
        self._model = build_backbone()
        self._fn = tf.function(lambda x: self._model(x, training=False), reduce_retracing=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = np.asarray(batch["x"], np.float32)
        # 16 segments per call: the timbral convolutions' activations take ~9 MB per segment
        parts = [self._fn(self._tf.constant(x[i:i + 16])).numpy() for i in range(0, len(x), 16)]
        out = dict(batch)
        out["x"] = (np.concatenate(parts) if parts else np.zeros((0, EMBEDDING_DIM), np.float32)).astype(np.float16)
        return out


def embed_dataset(ds, *, threads: int = 0, batch_size: int = 256):
    """A Ray Dataset of segments mapped to embeddings by one backbone actor (compute each once; materialise after)."""
    return ds.map_batches(Embedder, fn_constructor_kwargs={"threads": threads}, batch_size=batch_size,
                          batch_format="numpy", concurrency=1, num_cpus=1)
