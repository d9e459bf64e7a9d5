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

Functions here are NumPy only: the worker (:mod:`genrecls.jobs.training`) runs the model and
sums across workers; the driver calls :func:`choose_k` on the exported model's scores.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["TrackTally", "validation_metrics", "is_better", "K_CANDIDATES", "accuracy_by_k", "choose_k"]

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
    """Indices of at most ``k`` evenly spaced segments of ``n`` (classify's rule, genrecls.audio.segments.segment_starts)."""
    if k <= 0 or n <= k:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, k)).astype(int))


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
