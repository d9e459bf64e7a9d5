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

A frozen backbone's linear head is chosen by cross-validation (issue 27: one validation split of
10-25 tracks let the choice change between seeds and the thresholds fit a few dozen tracks):
the training and validation tracks are cut into k folds (:func:`genrecls.storage.split.assign_folds`,
albums whole), every candidate embedding at every strength is fit k times, each time on the
other folds, and scores the held-out fold's tracks (:func:`cross_validate_candidate`); every
labelled non-test track then has an out-of-fold score, on which :func:`choose_head_cv` picks the
head (:data:`CV_HEAD_RULE`) and the caller chooses K, the calibration and the thresholds.
:func:`fold_spread` gives a figure's spread across the folds.

Before issue 27 the head was chosen on the validation tracks (issue 20): every
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

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from genrecls.audio.segments import evenly_spaced

__all__ = ["TrackTally", "validation_metrics", "is_better", "K_CANDIDATES", "accuracy_by_k", "choose_k", "HEAD_RULE",
           "HeadSplit", "standardisation", "fit_linear", "softmax_probabilities", "track_metrics", "fit_candidate",
           "choose_head", "CV_HEAD_RULE", "row_weights", "track_means", "cross_validate_candidate", "choose_head_cv",
           "finalists", "fold_spread"]

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



# ---------------------------------------------------------------------------- cross-validation (issue 27)
#: how a frozen head is chosen by cross-validation
CV_HEAD_RULE = ("the highest out-of-fold track accuracy (every training and validation track scored by the head fit "
                "on the other folds; a track = the mean of its segments' probabilities); ties to the lower out-of-fold "
                "track log-loss, then to the fewer dimensions, then the smaller C (the stronger L2)")


def row_weights(track: np.ndarray, y: np.ndarray, n_labels: int, *, track_weights: bool = True,
                class_weights: bool = True) -> np.ndarray:
    """Each row's loss weight over exactly these rows (mean 1): every track the same (its rows share its weight),
    and with ``class_weights`` every label the same (:func:`genrecls.jobs.training.plan.segment_weights`'s rule)."""
    track = np.asarray(track, np.int64)
    y = np.asarray(y, np.int64)
    if not len(track):
        return np.zeros(0, np.float32)
    if track_weights:
        ids, inverse, rows = np.unique(track, return_inverse=True, return_counts=True)
        if class_weights:
            first = np.zeros(len(ids), np.int64)
            first[inverse] = y
            per_label = np.bincount(first, minlength=n_labels).astype(np.float64)
            raw = 1.0 / (rows[inverse] * per_label[y])
        else:
            raw = 1.0 / rows[inverse].astype(np.float64)
        return (raw * len(raw) / raw.sum()).astype(np.float32)
    if class_weights:
        n = np.bincount(y, minlength=n_labels).astype(np.float64)
        return (n.sum() / (n_labels * np.maximum(n, 1)))[y].astype(np.float32)
    return np.ones(len(track), np.float32)


def track_means(probs: np.ndarray, track: np.ndarray, n_tracks: int) -> np.ndarray:
    """Each track's mean segment probabilities (tracks, labels); NaN for a track without rows."""
    probs = np.asarray(probs, np.float64)
    sums = np.zeros((n_tracks, probs.shape[1]))
    np.add.at(sums, track, probs)
    counts = np.bincount(track, minlength=n_tracks).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None]


def _track_figures(scores: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean negative log-likelihood) of track scores against their true label indices."""
    if not len(truth):
        return float("nan"), float("nan")
    p = np.clip(scores[np.arange(len(truth)), truth], 1e-7, 1.0)
    return float((scores.argmax(axis=1) == truth).mean()), float(-np.log(p).mean())


def cross_validate_candidate(pool: HeadSplit, fold_of_track: np.ndarray, candidate: str, layers: Sequence[str],
                             cs: Sequence[float], n_labels: int, *, track_weights: bool = True,
                             class_weights: bool = True, fit_rows_per_track: int = 0) -> list[dict[str, Any]]:
    """One candidate embedding at every strength, cross-validated: out-of-fold segment probabilities and figures.

    ``fold_of_track``: each of ``pool``'s tracks' fold (-1: never held out, always fit on).  For
    each fold, the rows of the other folds are standardised and fit at every strength (the
    weakest L2 last; each fit starts from the previous strength's solution, and from the
    previous fold's at the same strength), and the fold's rows are scored.  ``fit_rows_per_track``
    (> 0) fits each track on at most that many evenly spaced segments, its rows sharing the
    track's weight and the weights scaled to the total of every row, so that C keeps its
    meaning (scoring always uses every row): the cheap first round of :func:`finalists`.

    Returns one record per C: ``candidate``, ``layers``, ``dims``, ``c``, ``oof_track_accuracy``,
    ``oof_track_nll`` (uncalibrated track scores), ``oof_tracks``, ``fold_track_accuracy`` (per fold),
    ``iterations`` (largest), ``converged`` (every fit), ``fit_seconds``, and ``oof`` (float32
    (rows, labels) out-of-fold segment probabilities, NaN for rows never held out).
    """
    import time

    folds = np.asarray(fold_of_track, np.int64)
    row_fold = folds[pool.track]
    k = int(folds.max()) + 1 if len(folds) else 0
    x_all = pool.matrix(layers)
    cs = sorted(float(v) for v in cs)
    oof = {c: np.full((len(pool), n_labels), np.nan, np.float32) for c in cs}
    info = {c: {"iterations": 0, "converged": True, "fit_seconds": 0.0} for c in cs}
    models: dict[float, Any] = {}
    keep = np.ones(len(pool), bool)
    if fit_rows_per_track > 0:  # at most this many evenly spaced rows of each track in a fit
        keep[:] = False
        order = np.lexsort((pool.segment_index, pool.track))
        starts = np.r_[0, np.flatnonzero(np.diff(pool.track[order])) + 1, len(order)]
        for a, b in itertools.pairwise(starts):
            keep[order[a:b][_pick(b - a, fit_rows_per_track)]] = True
    for f in range(k):
        fit = (row_fold != f) & keep
        held = row_fold == f
        if not held.any():
            continue
        x = x_all[fit]
        mean, std = standardisation(x)
        x = (x - mean) / std
        xh = (x_all[held] - mean) / std
        # the same total weight as every row of these tracks would have: C means what it means in the final fit
        w = row_weights(pool.track[fit], pool.y[fit], n_labels, track_weights=track_weights,
                        class_weights=class_weights) * (float((row_fold != f).sum()) / max(1, int(fit.sum())))
        previous = None
        for c in cs:
            t0 = time.perf_counter()
            start = models.get(c, previous)
            if start is not None and c not in models:  # the path: a copy of the previous strength's solution
                import copy

                start = copy.deepcopy(start)
            wts, b, fit_info, model = fit_linear(x, pool.y[fit], w, c, n_labels, model=start)
            models[c] = previous = model
            oof[c][held] = softmax_probabilities(xh, wts, b)
            info[c]["iterations"] = max(info[c]["iterations"], fit_info["iterations"])
            info[c]["converged"] = info[c]["converged"] and fit_info["converged"]
            info[c]["fit_seconds"] += time.perf_counter() - t0
    n_tracks = len(pool.track_ids)
    truth = np.full(n_tracks, -1)
    truth[pool.track] = pool.y
    scored = folds >= 0
    out = []
    for c in cs:
        scores = track_means(oof[c], pool.track, n_tracks)
        acc, loss = _track_figures(scores[scored], truth[scored])
        per_fold = [_track_figures(scores[folds == f], truth[folds == f])[0] for f in range(k) if (folds == f).any()]
        out.append({"candidate": candidate, "layers": list(layers), "dims": int(x_all.shape[1]), "c": c,
                    "oof_track_accuracy": acc, "oof_track_nll": loss, "oof_tracks": int(scored.sum()),
                    "fold_track_accuracy": per_fold, "iterations": info[c]["iterations"],
                    "converged": info[c]["converged"], "fit_seconds": round(info[c]["fit_seconds"], 3), "oof": oof[c]})
    return out


def finalists(records: Sequence[dict[str, Any]], n: int) -> list[tuple[str, float]]:
    """The ``n`` (candidate, C) pairs a cheap first round ranks best (:func:`choose_head_cv`'s order): the only ones
    cross-validated again on every segment."""
    ranked = sorted(records, key=lambda r: (-round(r["oof_track_accuracy"], 9), round(r["oof_track_nll"], 9),
                                            r["dims"], r["c"]))
    return [(r["candidate"], r["c"]) for r in ranked[:n]]


def choose_head_cv(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The record :data:`CV_HEAD_RULE` picks: the best out-of-fold track accuracy, ties to the lower out-of-fold
    log-loss, then to the simpler head."""
    if not records:
        raise ValueError("no head candidate was cross-validated")
    best = max(r["oof_track_accuracy"] for r in records)
    tied = [r for r in records if r["oof_track_accuracy"] >= best - 1e-9]
    return min(tied, key=lambda r: (round(r["oof_track_nll"], 9), r["dims"], r["c"]))


def fold_spread(values: Sequence[float | None]) -> dict[str, Any]:
    """A figure's spread across folds: the folds' values, their mean, standard deviation, min and max."""
    v = [float(x) for x in values if x is not None and np.isfinite(x)]
    if not v:
        return {"folds": [], "mean": None, "sd": None, "min": None, "max": None}
    return {"folds": [round(x, 4) for x in v], "mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1
            else 0.0, "min": min(v), "max": max(v)}
