"""Inference: the trained-model contract shared by training, evaluation and classification.

A run folder holds the model twice, both free of pickles:

* ``RUN/model/``: a TensorFlow SavedModel whose ``serving_default`` signature takes
  ``mel`` (float32, shape (batch, n_mels, n_frames), raw log-mel dB exactly as stored in
  the dataset) and returns ``probabilities`` (float32, (batch, n_labels)).  Input
  normalisation lives inside the model.  TensorFlow Serving loads it as is.
* ``RUN/model.keras``: the same model for Keras (tf-keras), loaded with ``safe_mode=True``.

and ``RUN/run.json`` with ``model_id``, ``labels`` (the vocabulary, in output order) and
``features`` (the exact :class:`~genrecls.core.config.FeatureConfig`), so classification
computes identical inputs without the user re-typing anything.

Loading a model executes the TensorFlow graph stored in the run folder: only load runs
you trust (as with any SavedModel).

Track-level predictions aggregate segment probabilities by their **mean** (the same rule in
evaluation and classification: :func:`aggregate_tracks`).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict
from typing import Any, Sequence

import numpy as np

from genrecls.core.config import FeatureConfig
from genrecls.core.provenance import utc_timestamp
from genrecls.storage.location import Location

__all__ = ["RUN_FILE", "export_model", "read_run_info", "Predictor", "aggregate_tracks", "top_k"]

RUN_FILE = "run.json"


def _model_id(name: str, run_uri: str) -> str:
    h = hashlib.blake2b(f"{run_uri}:{time.time_ns()}".encode(), digest_size=4).hexdigest()
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{h}"


def export_model(model: Any, run: Location | str, *, labels: Sequence[str], features: FeatureConfig,
                 model_name: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Save a tf-keras model into a run folder (SavedModel + .keras) and write ``run.json``.

    The model must take raw log-mel dB of shape (batch, n_mels, n_frames) and output softmax
    probabilities over ``labels``.  Returns the run info written.
    """
    import tensorflow as tf

    loc = run if isinstance(run, Location) else Location.parse(run)
    loc.makedirs()
    n_mels, n_frames = features.mel_shape
    out_dim = int(model.outputs[0].shape[-1])
    if out_dim != len(labels):
        raise ValueError(f"the model has {out_dim} outputs but there are {len(labels)} labels")

    @tf.function(input_signature=[tf.TensorSpec([None, n_mels, n_frames], tf.float32, name="mel")])
    def serve(mel):
        return {"probabilities": model(mel, training=False)}

    if loc.is_local:
        import shutil
        import tempfile

        tmp = tempfile.mkdtemp(prefix=".tmp-model-", dir=loc.root)
        try:
            tf.saved_model.save(model, os.path.join(tmp, "model"), signatures={"serving_default": serve})
            model.save(os.path.join(tmp, "model.keras"))
            for name in ("model", "model.keras"):
                dest = loc.join(name)
                if os.path.isdir(dest):
                    shutil.rmtree(dest)
                elif os.path.exists(dest):
                    os.remove(dest)
                os.replace(os.path.join(tmp, name), dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:  # object store: write locally, then copy up
        import tempfile

        import pyarrow.fs as pafs

        with tempfile.TemporaryDirectory() as tmp:
            tf.saved_model.save(model, os.path.join(tmp, "model"), signatures={"serving_default": serve})
            model.save(os.path.join(tmp, "model.keras"))
            pafs.copy_files(tmp, loc.root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=loc.fs)
    info = {
        "format": "genrecls-run",
        "model_id": _model_id(model_name, loc.uri),
        "model_name": model_name,
        "labels": list(labels),
        "features": asdict(features),
        "created": utc_timestamp(),
        "input": {"name": "mel", "shape": [None, n_mels, n_frames], "dtype": "float32", "units": "dB"},
        "output": {"name": "probabilities", "aggregation": "mean of segment probabilities per track"},
        **(extra or {}),
    }
    loc.write_json(RUN_FILE, info)
    return info


def read_run_info(run: Location | str) -> dict[str, Any]:
    loc = run if isinstance(run, Location) else Location.parse(run)
    if not loc.exists(RUN_FILE):
        raise FileNotFoundError(f"{loc.uri} is not a genrecls run (no {RUN_FILE}); train one with 'genrecls train'")
    return loc.read_json(RUN_FILE)


class Predictor:
    """Loads a run's SavedModel once and scores batches of segments."""

    def __init__(self, run: Location | str):
        import tensorflow as tf

        loc = run if isinstance(run, Location) else Location.parse(run)
        self.info = read_run_info(loc)
        self.labels: list[str] = list(self.info["labels"])
        self.features = FeatureConfig(**self.info["features"]).validate()
        self.model_id: str = self.info["model_id"]
        #: segments per model call at most (run.json "max_batch"): the musicnn backbone's activations take
        #: ~9 MB per segment, so 256 at once would need over 2 GB
        self.max_batch: int = int(self.info.get("max_batch") or 0)
        if loc.is_local:
            self._model = tf.saved_model.load(loc.join("model"))
        else:
            import tempfile

            import pyarrow.fs as pafs

            self._tmp = tempfile.TemporaryDirectory()
            pafs.copy_files(loc.join("model"), os.path.join(self._tmp.name, "model"), source_filesystem=loc.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            self._model = tf.saved_model.load(os.path.join(self._tmp.name, "model"))
        self._fn = self._model.signatures["serving_default"]

    def predict(self, mels: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Probabilities (n, n_labels) for raw log-mel dB segments (n, n_mels, n_frames)."""
        import tensorflow as tf

        mels = np.asarray(mels, dtype=np.float32)
        expected = self.features.mel_shape
        if mels.ndim != 3 or tuple(mels.shape[1:]) != expected:
            raise ValueError(f"segments must have shape (n, {expected[0]}, {expected[1]}), got {mels.shape}")
        if mels.shape[0] == 0:
            return np.zeros((0, len(self.labels)), np.float32)
        if self.max_batch:
            batch_size = min(batch_size, self.max_batch)
        out = [self._fn(mel=tf.constant(mels[i:i + batch_size]))["probabilities"].numpy()
               for i in range(0, mels.shape[0], batch_size)]
        return np.concatenate(out).astype(np.float32)


def aggregate_tracks(track_ids: Sequence[str], probs: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Per-track probabilities: the mean of each track's segment probabilities.

    Returns (track ids in first-seen order, array (n_tracks, n_labels)).
    """
    probs = np.asarray(probs, dtype=np.float64)
    order: dict[str, int] = {}
    idx = np.empty(len(track_ids), np.int64)
    for i, t in enumerate(track_ids):
        idx[i] = order.setdefault(t, len(order))
    sums = np.zeros((len(order), probs.shape[1]))
    np.add.at(sums, idx, probs)
    counts = np.bincount(idx, minlength=len(order)).astype(np.float64)
    return list(order), (sums / counts[:, None]).astype(np.float32)


def top_k(probs: np.ndarray, labels: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """For each row, the k most probable labels with their probabilities, best first."""
    k = min(k, len(labels))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(labels[j], float(row[j])) for j in o] for row, o in zip(probs, order)]

