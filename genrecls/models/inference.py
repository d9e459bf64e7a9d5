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
    """Save a tf-keras model into a run folder (SavedModel, .keras and ONNX) and write ``run.json``.

    The model must take raw log-mel dB of shape (batch, n_mels, n_frames) and output softmax
    probabilities over ``labels``.  ``model.onnx`` is the same classifier for any ONNX runtime
    (input ``mel``, output ``probabilities``), the file :class:`Predictor` runs on the inference
    engine.  Returns the run info written.
    """
    import tensorflow as tf

    from genrecls.models.engine import export_onnx

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
            onnx = export_onnx(model, os.path.join(tmp, "model.onnx"), input_shape=(n_mels, n_frames))
            for name in ("model", "model.keras", "model.onnx"):
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
            onnx = export_onnx(model, os.path.join(tmp, "model.onnx"), input_shape=(n_mels, n_frames))
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
        "onnx": {"file": "model.onnx", "input": "mel", "output": "probabilities", "opset": onnx["opset"],
                 "converter": onnx["converter"]},
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
    """Loads a run's classifier once, on the inference engine, and scores batches of segments.

    The engine (:class:`genrecls.models.engine.RunEngine`) runs ``RUN/model.onnx`` on OpenVINO
    or ONNX Runtime at ``precision``, and a run without it (trained before it was exported)
    on its SavedModel with TensorFlow; :meth:`describe` says which ran.  ``threads`` 0: the
    CPUs Ray gave this worker, else this process's.
    """

    def __init__(self, run: Location | str, *, engine: str = "auto", precision: str = "auto", threads: int = 0):
        from genrecls.models.engine import RunEngine

        loc = run if isinstance(run, Location) else Location.parse(run)
        self.info = read_run_info(loc)
        self.labels: list[str] = list(self.info["labels"])
        self.features = FeatureConfig(**self.info["features"]).validate()
        self.model_id: str = self.info["model_id"]
        #: segments per model call at most (run.json "max_batch"): the musicnn backbone's activations take
        #: ~9 MB per segment, so 256 at once would need over 2 GB
        self.max_batch: int = int(self.info.get("max_batch") or 0)
        if loc.is_local:
            root = loc.root
        else:
            import tempfile

            import pyarrow.fs as pafs

            self._tmp = tempfile.TemporaryDirectory()
            root = self._tmp.name
            for name in ("model", "model.onnx"):
                if loc.exists(name):
                    pafs.copy_files(loc.join(name), os.path.join(root, name), source_filesystem=loc.fs,
                                    destination_filesystem=pafs.LocalFileSystem())
        self._engine = RunEngine(root, input_shape=self.features.mel_shape, engine=engine, precision=precision,
                                 threads=threads, batch_size=self.max_batch or 64, model_id=self.model_id,
                                 n_labels=len(self.labels))

    def describe(self) -> dict[str, Any]:
        """The runtime, precision, device and threads that score (recorded next to every output)."""
        return self._engine.describe()

    def predict(self, mels: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Probabilities (n, n_labels) for raw log-mel segments (n, n_mels, n_frames)."""
        mels = np.asarray(mels, dtype=np.float32)
        expected = self.features.mel_shape
        if mels.ndim != 3 or tuple(mels.shape[1:]) != expected:
            raise ValueError(f"segments must have shape (n, {expected[0]}, {expected[1]}), got {mels.shape}")
        if mels.shape[0] == 0:
            return np.zeros((0, len(self.labels)), np.float32)
        if self.max_batch:
            batch_size = min(batch_size, self.max_batch)
        out = [self._engine.predict(mels[i:i + batch_size]) for i in range(0, mels.shape[0], batch_size)]
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

