"""Model selection on validation TRACKS: which epoch is kept, when training stops, and classify's K.

A track's prediction is the mean of its segments' probabilities (the rule evaluation and
classification use), so the epoch kept is the one whose validation **track accuracy** is
highest, not the one of lowest segment loss: on the real-music set, the lowest validation
loss picked early, overconfident epochs (track accuracy 0.61-0.78 over three seeds where
the last epoch gave 0.74-0.78).  Ties go to the lower validation loss.  Early stopping
counts the epochs since the last improvement by the same rule.

The number of segments classify scores per track (K, ``classify.max_segments``) is chosen
on the validation tracks too (:func:`choose_k`: the most accurate K, ties to the one nearest
10), never on the test tracks.

A frozen backbone's linear head is chosen on the validation tracks too (issue 20): every
candidate embedding (``train.head_candidates``) at every L2 strength (``train.head_c``) is fit
on the training tracks (:func:`fit_candidate`, a convex solver: scikit-learn's multinomial
logistic regression) and scored per validation track; :func:`choose_head` takes the best
(:data:`HEAD_RULE`: ties to the simpler head).  The caller then fits the choice again on the
training and validation tracks together (the refit); the test tracks are never given to
any function here.

Functions here are NumPy (and scikit-learn) only: the worker (:mod:`genrecls.jobs.training`) runs the model and
sums across workers; the driver calls :func:`choose_k` on the exported model's scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from genrecls.audio.segments import evenly_spaced

__all__ = ["TrackTally", "validation_metrics", "is_better", "K_CANDIDATES", "accuracy_by_k", "choose_k", "HEAD_RULE",
           "HeadSplit", "standardisation", "fit_linear", "softmax_probabilities", "track_metrics", "fit_candidate",
           "choose_head"]

#: K values tried on the validation tracks (0 = every segment)
K_CANDIDATES = (1, 2, 4, 6, 10, 16, 0)


class TrackTally:
    """Running sums of segment probabilities per validation track, and of the segment loss.

    ``vector()`` packs everything into one float32 array so that workers can add theirs up
    with one all-reduce; :func:`validation_metrics` reads the sum back.
    """

    def __init__(self, n_tracks: int, n_labels: int):
        self.n_tracks, self.n_labels = int(n_tracks), int(n_labels)
        self.sums = np.zeros((self.n_tracks, self.n_labels), np.float64)
        self.counts = np.zeros(self.n_tracks, np.float64)
        self.truth = np.full(self.n_tracks, -1.0)  # label index of each track (-1: none seen here)
        self.loss = 0.0
        self.correct = 0.0
        self.segments = 0.0

    def add(self, probs: np.ndarray, y: np.ndarray, t: np.ndarray) -> None:
        probs = np.asarray(probs, np.float64)
        y = np.asarray(y, np.int64)
        t = np.asarray(t, np.int64)
        np.add.at(self.sums, t, probs)
        np.add.at(self.counts, t, 1.0)
        self.truth[t] = y
        self.loss += float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0)).sum())
        self.correct += float((probs.argmax(axis=1) == y).sum())
        self.segments += float(len(y))

    def vector(self) -> np.ndarray:
        """Everything as one array; summing the arrays of all workers sums the tallies (truth: +1 shifted max)."""
        truth = np.zeros((self.n_tracks, self.n_labels))
        seen = self.truth >= 0
        truth[np.flatnonzero(seen), self.truth[seen].astype(np.int64)] = 1.0
        return np.concatenate([self.sums.ravel(), self.counts, truth.ravel(),
                               [self.loss, self.correct, self.segments]]).astype(np.float32)


def validation_metrics(vector: np.ndarray, n_tracks: int, n_labels: int) -> dict[str, float]:
    """``val_loss``, ``val_accuracy`` (segments) and ``val_track_accuracy`` from a (summed) tally vector."""
    v = np.asarray(vector, np.float64)
    a = n_tracks * n_labels
    sums = v[:a].reshape(n_tracks, n_labels)
    counts = v[a:a + n_tracks]
    truth = v[a + n_tracks:2 * a + n_tracks].reshape(n_tracks, n_labels)
    loss, correct, segments = v[-3:]
    scored = counts > 0
    pred = sums[scored].argmax(axis=1)
    true = truth[scored].argmax(axis=1)
    return {"val_loss": float(loss / max(segments, 1.0)), "val_accuracy": float(correct / max(segments, 1.0)),
            "val_track_accuracy": float((pred == true).mean()) if scored.any() else 0.0,
            "val_tracks_scored": int(scored.sum())}


def is_better(metrics: dict[str, float], best: dict[str, float] | None) -> bool:
    """The selection rule: higher validation track accuracy; on a tie, validation loss lower by > 1e-4."""
    if best is None or best.get("val_track_accuracy") is None:
        return True
    acc, best_acc = metrics["val_track_accuracy"], best["val_track_accuracy"]
    if acc > best_acc + 1e-9:
        return True
    return abs(acc - best_acc) <= 1e-9 and metrics["val_loss"] < best["val_loss"] - 1e-4


def _pick(n: int, k: int) -> np.ndarray:
    """Indices of at most ``k`` evenly spaced segments of ``n`` (classify's rule: :func:`genrecls.audio.segments.evenly_spaced`)."""
    return evenly_spaced(n, k)


def accuracy_by_k(track_ids: Sequence[str], segment_index: Sequence[int], labels: Sequence[str], probs: np.ndarray,
                  vocab: Sequence[str], ks: Sequence[int] = K_CANDIDATES) -> list[dict[str, Any]]:
    """Track accuracy when each track is scored on K evenly spaced segments, for each K."""
    probs = np.asarray(probs, np.float64)
    by_track: dict[str, list[int]] = {}
    truth: dict[str, str] = {}
    for i, t in enumerate(track_ids):
        by_track.setdefault(t, []).append(i)
        truth.setdefault(t, labels[i])
    order = {t: sorted(idx, key=lambda i: segment_index[i]) for t, idx in by_track.items()}
    out = []
    for k in ks:
        correct = 0
        segments = 0
        for t, idx in order.items():
            rows = [idx[j] for j in _pick(len(idx), k)]
            segments += len(rows)
            correct += int(vocab[int(probs[rows].mean(axis=0).argmax())] == truth[t])
        out.append({"k": int(k), "segments": segments, "track_accuracy": correct / max(1, len(order))})
    return out


def choose_k(by_k: list[dict[str, Any]], tracks: int, prior: int = 10) -> int:
    """K for classify: the best validation track accuracy; among equally accurate Ks, the one nearest ``prior``.

    Validation sets are small (tens of tracks), so many Ks tie; a tie keeps ``prior`` (10,
    the cost/accuracy balance measured on held-out real tracks by bench/classify.py) or the
    K nearest to it (on a log scale; 0 = every segment counts as the farthest), and only a
    K that gets strictly more validation tracks right moves the choice.  ``tracks`` (the
    number of validation tracks) is for callers' records.
    """
    if not by_k:
        return prior
    best = max(r["track_accuracy"] for r in by_k)
    tied = [r["k"] for r in by_k if r["track_accuracy"] >= best - 1e-9]
    return min(tied, key=lambda k: (float("inf") if k <= 0 else abs(np.log(k / prior)), k))


# ---------------------------------------------------------------------------- the frozen backbone's linear head
#: how a head is chosen among the candidates and strengths
HEAD_RULE = ("the highest validation track accuracy (a track = the mean of its segments' probabilities); ties to the "
             "fewer dimensions, then the smaller C (the stronger L2)")


@dataclass
class HeadSplit:
    """One split's rows for fitting or scoring a head: every stored layer of each segment.

    ``layers``: name -> (n, width) arrays (float16 as stored, or float32); ``y``: label index;
    ``track``: the row's track, an index into ``track_ids``; ``segment_index``: its position in
    the track; ``weights``: its loss weight (the tracks' and labels' balance, see
    :func:`genrecls.jobs.training.plan.segment_weights`).
    """

    layers: dict[str, np.ndarray]
    y: np.ndarray
    track: np.ndarray
    track_ids: list[str]
    segment_index: np.ndarray
    weights: np.ndarray

    def __len__(self) -> int:
        return int(len(self.y))

    def matrix(self, names: Sequence[str]) -> np.ndarray:
        """The concatenation of the named layers, float32 (n, d)."""
        parts = [np.asarray(self.layers[n], np.float32) for n in names]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    @staticmethod
    def join(a: "HeadSplit", b: "HeadSplit") -> "HeadSplit":
        """Two splits' rows as one (e.g. training and validation tracks for the refit)."""
        return HeadSplit(layers={k: np.concatenate([a.layers[k], b.layers[k]]) for k in a.layers},
                         y=np.concatenate([a.y, b.y]), track=np.concatenate([a.track, b.track + len(a.track_ids)]),
                         track_ids=list(a.track_ids) + list(b.track_ids),
                         segment_index=np.concatenate([a.segment_index, b.segment_index]),
                         weights=np.concatenate([a.weights, b.weights]))


def standardisation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and standard deviation of the rows a head is fit on (a constant dimension gets 1)."""
    mean = x.mean(axis=0, dtype=np.float64)
    std = np.sqrt(np.maximum((np.square(x, dtype=np.float64)).mean(axis=0) - mean * mean, 0.0))
    std = np.where(std < 1e-6, 1.0, std)
    return mean.astype(np.float32), std.astype(np.float32)


def fit_linear(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None, c: float, n_labels: int, *,
               model=None, max_iter: int = 300, tol: float = 1e-4) -> tuple[np.ndarray, np.ndarray, dict[str, Any], Any]:
    """A multinomial logistic regression on standardised rows (scikit-learn, L-BFGS): the head's convex fit.

    The loss is ``c`` times the weighted sum of the rows' cross-entropies plus half the
    squared norm of the weights.  ``model``: a previous result's estimator, to start from its
    solution (a path over ``c``).  Returns ``(weights (d, n_labels), bias (n_labels,), info,
    estimator)``; labels absent from ``y`` get zero weights and a bias of -30.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if model is None:
        model = LogisticRegression(C=float(c), solver="lbfgs", max_iter=max_iter, tol=tol, warm_start=True)
    else:
        model.set_params(C=float(c))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y, sample_weight=weights)
    classes = [int(v) for v in model.classes_]
    coef, intercept = np.asarray(model.coef_, np.float64), np.asarray(model.intercept_, np.float64)
    if len(classes) == 2 and coef.shape[0] == 1:  # binary: the logit of the second class against the first
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.array([0.0, intercept[0]])
    w = np.zeros((x.shape[1], n_labels), np.float32)
    b = np.full(n_labels, -30.0, np.float32)
    w[:, classes] = coef.T
    b[classes] = intercept
    n_iter = int(np.max(model.n_iter_))
    return w, b, {"iterations": n_iter, "converged": n_iter < max_iter}, model


def softmax_probabilities(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    z = (x @ w + b).astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def track_metrics(probs: np.ndarray, split: HeadSplit) -> dict[str, float]:
    """Validation figures of a split's segment probabilities: track accuracy (mean of segment probabilities),
    segment accuracy, mean segment cross-entropy."""
    n_tracks = len(split.track_ids)
    sums = np.zeros((n_tracks, probs.shape[1]))
    np.add.at(sums, split.track, probs)
    truth = np.full(n_tracks, -1)
    truth[split.track] = split.y
    seen = np.bincount(split.track, minlength=n_tracks) > 0
    rows = np.arange(len(split.y))
    return {"track_accuracy": float((sums[seen].argmax(axis=1) == truth[seen]).mean()) if seen.any() else 0.0,
            "segment_accuracy": float((probs.argmax(axis=1) == split.y).mean()) if len(split.y) else 0.0,
            "loss": float(-np.log(np.clip(probs[rows, split.y], 1e-7, 1.0)).mean()) if len(split.y) else 0.0}


def fit_candidate(train: HeadSplit, val: HeadSplit, candidate: str, layers: Sequence[str], cs: Sequence[float],
                  n_labels: int) -> list[dict[str, Any]]:
    """Fit one candidate embedding on the training rows at every strength (weakest L2 last, each fit starting
    from the previous one) and score each on the validation tracks.

    Returns one record per C: ``candidate``, ``layers``, ``dims``, ``c``, ``val_track_accuracy``,
    ``val_segment_accuracy``, ``val_loss``, ``iterations``, ``converged``, ``fit_seconds``, and the fit
    itself (``mean``, ``std``, ``weights``, ``bias``: arrays, for the caller to keep or drop).
    """
    import time

    x = train.matrix(layers)
    mean, std = standardisation(x)
    x = (x - mean) / std
    xv = (val.matrix(layers) - mean) / std
    out = []
    model = None
    for c in sorted(float(v) for v in cs):
        t0 = time.perf_counter()
        w, b, info, model = fit_linear(x, train.y, train.weights, c, n_labels, model=model)
        m = track_metrics(softmax_probabilities(xv, w, b), val)
        out.append({"candidate": candidate, "layers": list(layers), "dims": int(x.shape[1]), "c": c,
                    "val_track_accuracy": m["track_accuracy"], "val_segment_accuracy": m["segment_accuracy"],
                    "val_loss": m["loss"], **info, "fit_seconds": round(time.perf_counter() - t0, 3),
                    "mean": mean, "std": std, "weights": w, "bias": b})
    return out


def choose_head(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The record :data:`HEAD_RULE` picks: the best validation track accuracy, ties to the simpler head."""
    if not records:
        raise ValueError("no head candidate was fit")
    best = max(r["val_track_accuracy"] for r in records)
    tied = [r for r in records if r["val_track_accuracy"] >= best - 1e-9]
    return min(tied, key=lambda r: (r["dims"], r["c"]))
