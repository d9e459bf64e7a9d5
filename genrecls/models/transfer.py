"""Transfer learning on the pretrained MSD musicnn tagger: the ``musicnn`` model.

The classifier is the pretrained network of :mod:`genrecls.models.musicnn`, frozen, and a
linear head on one of its embeddings, chosen per run on validation tracks (issue 20: no one
embedding is right for every library).  The candidates (``train.head_candidates``) are the
backbone's layers, all computed in one pass (:class:`~genrecls.models.engine.BackboneEngine`)
and kept in the dataset's embedding store (:mod:`genrecls.storage.embeddings`): the 50 tags
(``taggram``), the 200-d ``penultimate`` layer, the max and mean over time of the 753 mid-end
features (``max_pool``, ``mean_pool``), the mean and standard deviation of each of the 96
input bands (``bands``), and concatenations of them (``mean_pool+bands`` is the 945-d
embedding of earlier versions).  Measured on the 5-style real development set, ``mean_pool``
with the bands beat ``penultimate`` on validation tracks (0.83-0.91 vs 0.74-0.78); on a
10-genre set ``penultimate`` beat it (0.95 vs 0.92).

The head (:class:`LinearHead`) standardises the chosen embedding (per-dimension mean and
standard deviation of the tracks it is fit on) and applies one softmax layer: a multinomial
logistic regression, fit by a convex solver (:func:`genrecls.models.selection.fit_linear`).
It lives twice in a run folder: inside ``RUN/model`` (:func:`build_head_classifier`: stored
segments in, backbone, chosen layers, standardisation, the head as Keras layers) and alone
in ``RUN/head.npz`` (:func:`save_head`, :func:`load_head`), so that the backbone can run on the
inference engine and the head in NumPy (:func:`head_probabilities`).

The model takes the stored segments as they are, (batch, 96, 187) ``log10(10000 S + 1)`` of
the ``musicnn`` feature preset, and transposes them to the network's time-first input inside
the model, so the exported run scores raw segments like every other model.

``train.fine_tune=true`` trains the whole network instead (:func:`build_musicnn_classifier`,
the 945-d embedding, dropout and a softmax layer, data-parallel with Ray Train): the backbone
runs forward and backward every epoch; use a small ``train.learning_rate`` (1e-4).

Computing embeddings where a job needs them (ingest's tasks, training's actors):
:func:`shared_backbone` (one engine per process, its threads from the CPUs Ray gave it) and
:func:`embed_segments`.
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["BACKBONE_LAYER", "EMBEDDING_DIM", "HEAD_LAYER", "HEAD_FILE", "build_backbone", "build_musicnn_classifier",
           "LinearHead", "head_probabilities", "head_embedding", "save_head", "load_head", "build_head_classifier",
           "shared_backbone", "embed_segments", "score_stored"]

#: the network's layer whose output (mean over time of the mid-end features) is part of the embedding
BACKBONE_LAYER = "mean_pool"
#: size of the embedding the head is trained on: 753 pooled mid-end features + mean and std of 96 bands
EMBEDDING_DIM = 753 + 2 * 96
#: segments per call of a model holding the backbone (run.json "max_batch"; ~9 MB of activations per segment)
MAX_BATCH = 32
#: the head's one weighted layer (its name is the same in the head alone and in the full model)
HEAD_LAYER = "probabilities"
#: the head alone in a run folder (NumPy arrays, no pickles)
HEAD_FILE = "head.npz"
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



# ---------------------------------------------------------------------------- the linear head

@dataclass(frozen=True)
class LinearHead:
    """A linear head on stored backbone layers: standardise, one softmax layer.

    ``layers`` are backbone outputs (:data:`genrecls.models.engine.BACKBONE_OUTPUTS` names) in
    the order their values are concatenated; ``mean``/``std`` (d,) standardise the
    concatenation; ``weights`` (d, n_labels) and ``bias`` (n_labels,) give the logits.
    ``info``: what :func:`save_head` keeps beside the arrays (the candidate's name, C, the
    backbone's id, what it was fit on...).
    """

    labels: tuple[str, ...]
    layers: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray
    bias: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dims(self) -> int:
        return int(self.weights.shape[0])


def head_embedding(layers: Mapping[str, np.ndarray], names: Iterable[str]) -> np.ndarray:
    """The concatenation of the named layers (each (n, width)), float32 (n, sum of widths)."""
    parts = [np.asarray(layers[n], np.float32) for n in names]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def head_probabilities(layers: Mapping[str, np.ndarray], head: LinearHead) -> np.ndarray:
    """Probabilities (n, n_labels) float32 of the head on backbone outputs (name -> (n, width) arrays,
    e.g. :class:`~genrecls.models.engine.BackboneEngine`'s or the embedding store's); what the run's
    exported model computes from the same layers."""
    x = head_embedding(layers, head.layers)
    if x.shape[1] != head.dims:
        raise ValueError(f"the head takes {head.dims} values ({'+'.join(head.layers)}), got {x.shape[1]}")
    z = ((x - head.mean) / head.std) @ head.weights + head.bias
    return _softmax(z.astype(np.float64)).astype(np.float32)


def save_head(head: LinearHead, run, name: str = HEAD_FILE) -> None:
    """Write the head alone into a run folder (a :class:`~genrecls.storage.location.Location` or path): NumPy
    arrays (``mean``, ``std``, ``weights``, ``bias``, ``labels``, ``layers``) and ``info`` as JSON, atomically."""
    from genrecls.storage.location import Location

    loc = run if isinstance(run, Location) else Location.parse(run)
    buf = io.BytesIO()
    np.savez_compressed(buf, mean=np.asarray(head.mean, np.float32), std=np.asarray(head.std, np.float32),
                        weights=np.asarray(head.weights, np.float32), bias=np.asarray(head.bias, np.float32),
                        labels=np.array(head.labels, dtype=np.str_), layers=np.array(head.layers, dtype=np.str_),
                        info=np.array(json.dumps(head.info, sort_keys=True, default=str), dtype=np.str_))
    data = buf.getvalue()
    loc.write_atomic(name, lambda out: out.write(data))


def load_head(run, name: str = HEAD_FILE) -> LinearHead:
    """The head a run folder keeps alone (:func:`save_head`); no pickles are loaded."""
    from genrecls.storage.location import Location

    loc = run if isinstance(run, Location) else Location.parse(run)
    if not loc.exists(name):
        raise FileNotFoundError(f"{loc.uri} has no {name} (not a frozen-backbone musicnn run)")
    with loc.fs.open_input_stream(loc.join(name)) as f:
        data = f.read()
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return LinearHead(labels=tuple(str(v) for v in z["labels"]), layers=tuple(str(v) for v in z["layers"]),
                          mean=z["mean"], std=z["std"], weights=z["weights"], bias=z["bias"],
                          info=json.loads(str(z["info"])))


def build_head_classifier(head: LinearHead):
    """The whole classifier of a head: stored (96, 187) segments -> the frozen backbone's chosen layers ->
    standardisation -> the head's softmax layer, as tf-keras layers (what ``RUN/model`` holds).

    Its output equals :func:`head_probabilities` on the backbone's outputs (float32 rounding aside).
    The band statistics enter as one (192,) block (:func:`~genrecls.models.networks.time_stats_class`:
    the mean of each band, then its standard deviation); a head on one of the two gets zero weights
    (and a neutral standardisation) on the other.
    """
    from genrecls.models.engine import BACKBONE_OUTPUTS
    from genrecls.models.musicnn import MUSICNN_FEATURES, load_musicnn
    from genrecls.models.networks import keras, time_stats_class

    k = keras()
    n_mels, n_frames = MUSICNN_FEATURES["n_mels"], MUSICNN_FEATURES["patch_frames"]
    blocks: list[str] = []
    for name in head.layers:
        block = "bands" if name in ("band_mean", "band_std") else name
        if block not in blocks:
            blocks.append(block)
    width = {b: 2 * BACKBONE_OUTPUTS["band_mean"] if b == "bands" else BACKBONE_OUTPUTS[b] for b in blocks}
    offset, at = {}, 0
    for b in blocks:
        offset[b] = at
        at += width[b]
    d, n_labels = at, len(head.labels)
    mean, std = np.zeros(d, np.float32), np.ones(d, np.float32)
    weights = np.zeros((d, n_labels), np.float32)
    src = 0
    for name in head.layers:  # each layer's rows of the head go to its place in the Keras embedding
        w = BACKBONE_OUTPUTS[name]
        dst = offset["bands"] + (w if name == "band_std" else 0) if name in ("band_mean", "band_std") else offset[name]
        mean[dst:dst + w] = head.mean[src:src + w]
        std[dst:dst + w] = head.std[src:src + w]
        weights[dst:dst + w] = head.weights[src:src + w]
        src += w
    inputs = k.Input(shape=(n_mels, n_frames), name="mel")
    net = load_musicnn()
    net.trainable = False
    outs = net(k.layers.Permute((2, 1), name="time_first")(inputs), training=False)
    parts = [time_stats_class()(name="band_stats")(inputs) if b == "bands" else k.layers.Identity(name=b)(outs[b])
             for b in blocks]
    x = parts[0] if len(parts) == 1 else k.layers.Concatenate(name="embedding")(parts)
    x = k.layers.Normalization(mean=mean.tolist(), variance=(std.astype(np.float64) ** 2).tolist(),
                               name="head_standardise")(x)
    out = k.layers.Dense(n_labels, activation="softmax", name=HEAD_LAYER)(x)
    model = k.Model(inputs, out, name="musicnn")
    model.get_layer(HEAD_LAYER).set_weights([weights, np.asarray(head.bias, np.float32)])
    return model


# ---------------------------------------------------------------------------- computing embeddings

@functools.lru_cache(maxsize=2)
def _engine(engine: str, precision: str, threads: int):
    from genrecls.models.engine import BackboneEngine

    return BackboneEngine(engine, precision, threads)


def shared_backbone(engine: str = "auto", precision: str = "auto", threads: int = 0):
    """This process's :class:`~genrecls.models.engine.BackboneEngine`, made once and kept (a Ray worker
    runs many tasks).  ``threads=0``: the CPUs Ray gave this task or actor
    (:func:`~genrecls.models.engine.available_threads`), set explicitly on the runtime."""
    from genrecls.models.engine import available_threads

    return _engine(engine, precision, int(threads) or available_threads())


def embed_segments(backbone, chunks: Iterable[np.ndarray], shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Every backbone layer of a track's segments, given as chunks of stored rows ((k, n_mels * n_frames)
    or (k, n_mels, n_frames), any float dtype): name -> (n, width) float32."""
    from genrecls.models.engine import BACKBONE_OUTPUTS

    parts: dict[str, list[np.ndarray]] = {}
    for chunk in chunks:
        x = np.asarray(chunk).reshape(-1, *shape)
        if not len(x):
            continue
        for name, v in backbone(x).items():
            parts.setdefault(name, []).append(v)
    if not parts:
        return {name: np.zeros((0, w), np.float32) for name, w in BACKBONE_OUTPUTS.items()}
    return {name: np.concatenate(v) for name, v in parts.items()}


# ---------------------------------------------------------------------------- scoring from the store

def score_stored(run, dataset, track_ids: Iterable[str], *, prefix: str = "test") -> dict[str, Any] | None:
    """A frozen-backbone run's metrics on the given tracks, from the dataset's embedding store and the run's
    head alone (no backbone pass): :func:`genrecls.models.evaluation.split_metrics` of ``prefix``.

    None when that cannot be done exactly: the run has no head (another model, or an older run),
    the store was computed by another backbone or from other features than the run's, or it
    lacks one of the tracks (then score with the exported model).
    """
    from genrecls.core.config import FeatureConfig
    from genrecls.models.evaluation import split_metrics
    from genrecls.models.inference import read_run_info
    from genrecls.storage.dataset import Dataset
    from genrecls.storage.embeddings import EmbeddingStore, EmbeddingStoreError

    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    try:
        head = load_head(run)
        info = read_run_info(run)
    except FileNotFoundError:
        return None
    store = EmbeddingStore(ds)
    try:
        described = store.check(head.info.get("backbone", ""), FeatureConfig(**info["features"]))
    except EmbeddingStoreError:
        return None
    if described is None:
        return None
    index = ds.tracks()
    ids = sorted(set(track_ids))
    if any(t not in index for t in ids):
        return None
    valid = store.valid_for({t: (index[t].fingerprint, index[t].n_segments) for t in ids})
    if len(valid) != len(ids):
        return None
    table = store.read(valid.values(), head.layers)
    from genrecls.storage.embeddings import layer_array

    probs = head_probabilities({n: layer_array(table.column(n)) for n in head.layers}, head)
    tids = table.column("track_id").to_pylist()
    metrics = split_metrics(prefix, list(head.labels), tids, [index[t].label for t in tids], probs)
    metrics["scored_by"] = {"how": "the run's head (head.npz) on the dataset's stored embeddings",
                            "backbone": described["backbone"], "engines": described["engines"]}
    return metrics
