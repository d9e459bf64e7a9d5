"""Calibration and thresholds of track probabilities: pure NumPy and SciPy, no TensorFlow.

A track's probabilities are the mean of its segments' softmax outputs
(:func:`genrecls.models.inference.aggregate_tracks`).  That mean is a score, not a
probability: averaging segments that disagree pulls it towards uniform (under-confident),
and a head trained to convergence is often over-confident.  This module turns scores into
probabilities that mean what they say and chooses the thresholds an answer needs, always on
**validation tracks**:

* :class:`Calibration`: temperature scaling of the track scores, ``softmax(log(p) / T)``
  (Guo et al. 2017: one parameter, so it cannot change which genre comes first and cannot
  overfit a validation set of tens of tracks).  ``T`` minimises the validation negative
  log-likelihood plus a weak log-normal prior on ``T`` (:data:`LOG_T_PRIOR_SD`), so that a
  validation set the model gets entirely right does not drive ``T`` to 0 (infinitely
  confident).  Independent tag probabilities (sigmoids, the pretrained tagger) have no
  labels to be calibrated on: their calibration is the identity.
* :func:`nll`, :func:`ece`, :func:`reliability`: the negative log-likelihood, the expected
  calibration error (top-label, equal-width bins) and the reliability diagram's data;
  :func:`ece_floor`: the ECE a *perfectly* calibrated model would still show on the same
  number of tracks (the sampling noise: with 15 bins, about 0.2 on 23 tracks, 0.11 on 100,
  0.035 on 1000, in a simulation of a 5-genre model of accuracy 0.7).
* :func:`precision_threshold`: the lowest score threshold whose kept tracks reach a target
  precision on validation (or out-of-fold) tracks (the rule of the ``uncertain`` answer and of
  the per-genre thresholds), or, when none does, the one of best estimated precision.
* :func:`cross_fitted_nll`: whether temperature scaling lowers the NLL of tracks it was not
  fit on by more than its standard error (a calibration is kept only then: fit on the same
  tracks it always lowers theirs).

Examples
--------
>>> import numpy as np
>>> p = np.array([[0.6, 0.4], [0.7, 0.3], [0.55, 0.45]])
>>> cal = Calibration.fit(p, np.array([0, 0, 1]))
>>> np.allclose(cal.apply(p).sum(axis=1), 1.0)
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ECE_BINS",
    "LOG_T_PRIOR_SD",
    "Calibration",
    "cross_fitted_nll",
    "ece",
    "ece_floor",
    "nll",
    "precision_recall_at",
    "precision_threshold",
    "reliability",
]

#: bins of the expected calibration error and of the reliability diagram (Guo et al. 2017 use 15)
ECE_BINS = 15
#: standard deviation of the Gaussian prior on log T (T within e^{+-2} = 0.14..7.4 at two standard deviations)
LOG_T_PRIOR_SD = 1.0
#: T is searched in [1/T_LIMIT, T_LIMIT]
T_LIMIT = 20.0
_EPS = 1e-12


def _as_probs(probs: Any) -> np.ndarray:
    p = np.asarray(probs, np.float64)
    if p.ndim != 2:
        raise ValueError(f"probabilities must be a 2-D array (tracks, labels), got shape {p.shape}")
    return p


def _softmax_t(probs: np.ndarray, temperature: float) -> np.ndarray:
    z = np.log(np.clip(probs, _EPS, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(probs: Any, y: Any) -> float:
    """Mean negative log-likelihood of the true labels ``y`` (indices) under ``probs`` (rows: tracks)."""
    p = _as_probs(probs)
    y = np.asarray(y, np.int64)
    if not len(y):
        return float("nan")
    return float(-np.log(np.clip(p[np.arange(len(y)), y], _EPS, 1.0)).mean())


@dataclass(frozen=True)
class Calibration:
    """How a run's track scores become probabilities: ``identity`` or ``temperature`` (``softmax(log p / T)``).

    ``kind`` is ``softmax`` (rows sum to 1; a genre classifier) or ``sigmoid`` (independent
    tags: always the identity).  :meth:`to_dict` / :meth:`from_dict` are its ``run.json`` form.
    """

    method: str = "identity"
    temperature: float = 1.0
    kind: str = "softmax"

    @classmethod
    def fit(cls, probs: Any, y: Any, *, method: str = "temperature", kind: str = "softmax",
            prior_sd: float = LOG_T_PRIOR_SD) -> Calibration:
        """Fit on validation tracks: ``probs`` (tracks, labels) track scores, ``y`` their true label indices."""
        from scipy.optimize import minimize_scalar

        if method not in ("temperature", "none", "identity"):
            raise ValueError(f"calibration method must be 'temperature' or 'none', got {method!r}")
        if kind == "sigmoid" or method in ("none", "identity"):
            return cls("identity", 1.0, kind)
        p = _as_probs(probs)
        y = np.asarray(y, np.int64)
        if not len(y):
            return cls("identity", 1.0, kind)
        logp = np.log(np.clip(p, _EPS, 1.0))
        rows = np.arange(len(y))

        def objective(log_t: float) -> float:
            z = logp / np.exp(log_t)
            z = z - z.max(axis=1, keepdims=True)
            lse = np.log(np.exp(z).sum(axis=1))
            return float((lse - z[rows, y]).sum() + 0.5 * (log_t / prior_sd) ** 2)

        res = minimize_scalar(objective, bounds=(-np.log(T_LIMIT), np.log(T_LIMIT)), method="bounded",
                              options={"xatol": 1e-6})
        return cls("temperature", float(np.exp(res.x)), kind)

    def apply(self, probs: Any) -> np.ndarray:
        """Calibrated probabilities of track scores (tracks, labels); the identity keeps them as they are."""
        p = _as_probs(probs)
        if self.method == "identity" or self.kind == "sigmoid" or not p.size:
            return p.copy()
        return _softmax_t(p, self.temperature)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "temperature": self.temperature, "kind": self.kind}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Calibration:
        """The calibration a ``run.json`` records; none recorded (a run from before calibration) is the identity."""
        if not data:
            return cls()
        return cls(str(data.get("method", "identity")), float(data.get("temperature", 1.0)),
                   str(data.get("kind", "softmax")))


def cross_fitted_nll(probs: Any, y: Any, folds: Any, *, prior_sd: float = LOG_T_PRIOR_SD) -> dict[str, Any]:
    """Whether temperature scaling lowers the NLL of tracks it was not fit on: per fold, ``T`` fit on the other
    folds' tracks and applied to the fold's.

    ``lowers`` only when the mean lowering per track is more than its standard error (the tracks'
    own differences, paired): a lowering of 0.001 on 130 tracks is noise, and a temperature that
    sharpens on noise raises the NLL of the tracks that come next (issue 27: 0.62 -> 0.70 on test
    tracks with T chosen on 23 validation tracks).

    Returns ``{"nll_before", "nll_cross_fitted", "lowering", "lowering_se", "lowers", "folds",
    "fold_nll_before", "fold_nll_after", "fold_temperatures"}``; ``lowers`` is False when fewer than
    2 folds hold tracks.
    """
    p = _as_probs(probs)
    y = np.asarray(y, np.int64)
    f = np.asarray(folds, np.int64)
    ids = [int(v) for v in np.unique(f) if v >= 0]
    out: dict[str, Any] = {"nll_before": nll(p, y), "nll_cross_fitted": None, "lowers": False, "folds": len(ids),
                           "fold_nll_before": [], "fold_nll_after": [], "fold_temperatures": []}
    if len(ids) < 2:
        return out
    after = np.empty(len(y))
    for v in ids:
        held = f == v
        cal = Calibration.fit(p[~held], y[~held], prior_sd=prior_sd)
        q = cal.apply(p[held])
        after[held] = -np.log(np.clip(q[np.arange(held.sum()), y[held]], _EPS, 1.0))
        out["fold_nll_before"].append(nll(p[held], y[held]))
        out["fold_nll_after"].append(float(after[held].mean()))
        out["fold_temperatures"].append(cal.temperature)
    scored = f >= 0
    before = -np.log(np.clip(p[scored][np.arange(int(scored.sum())), y[scored]], _EPS, 1.0))
    gain = before - after[scored]
    out["nll_before"] = float(before.mean())
    out["nll_cross_fitted"] = float(after[scored].mean())
    out["lowering"] = float(gain.mean())
    out["lowering_se"] = float(gain.std(ddof=1) / np.sqrt(len(gain))) if len(gain) > 1 else float("inf")
    out["lowers"] = bool(out["lowering"] > out["lowering_se"])
    return out


def _top(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    conf = probs.max(axis=1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(axis=1) == y).astype(np.float64) if len(probs) else np.zeros(0)
    return conf, correct


def _binned(conf: np.ndarray, correct: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin: count, sum of confidence, sum of correct (equal-width bins over [0, 1], the last one closed)."""
    idx = np.clip((conf * bins).astype(np.int64), 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    return count, np.bincount(idx, conf, minlength=bins), np.bincount(idx, correct, minlength=bins)


def ece(probs: Any, y: Any, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top label: ``sum_b n_b / n |accuracy_b - confidence_b|``."""
    p = _as_probs(probs)
    y = np.asarray(y, np.int64)
    if not len(y):
        return float("nan")
    _, conf_sum, corr_sum = _binned(*_top(p, y), bins)
    return float(np.abs(corr_sum - conf_sum).sum() / len(y))


def ece_floor(probs: Any, bins: int = ECE_BINS, draws: int = 2000, seed: int = 0) -> float:
    """The mean ECE of a perfectly calibrated model with these top-label confidences, on this many tracks.

    Each draw makes every track right with probability equal to its confidence; what ECE
    then measures is sampling noise alone.  An ECE near this floor cannot be told from a
    perfect calibration on so few tracks.
    """
    p = _as_probs(probs)
    if not len(p):
        return float("nan")
    conf = p.max(axis=1)
    rng = np.random.default_rng(seed)
    idx = np.clip((conf * bins).astype(np.int64), 0, bins - 1)
    hits = (rng.random((draws, len(conf))) < conf).astype(np.float64)
    out = np.empty(draws)
    conf_sum = np.bincount(idx, conf, minlength=bins)
    for d in range(draws):
        out[d] = np.abs(np.bincount(idx, hits[d], minlength=bins) - conf_sum).sum()
    return float(out.mean() / len(conf))


def reliability(probs: Any, y: Any, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """The reliability diagram's data: per non-empty bin its bounds, tracks, mean confidence and accuracy."""
    p = _as_probs(probs)
    y = np.asarray(y, np.int64)
    count, conf_sum, corr_sum = _binned(*_top(p, y), bins)
    return [{"lower": b / bins, "upper": (b + 1) / bins, "tracks": int(count[b]),
             "confidence": float(conf_sum[b] / count[b]), "accuracy": float(corr_sum[b] / count[b])}
            for b in range(bins) if count[b]]


def precision_threshold(scores: Any, correct: Any, target: float, *, expected: bool = True) -> dict[str, Any]:
    """The lowest threshold ``t`` whose kept tracks (``score >= t``) reach precision ``target`` on these tracks.

    Two estimates of the kept tracks' precision must both reach ``target``: the observed one,
    smoothed as ``(right + 1) / (kept + 2)`` (Laplace: 9 right of 9 kept is not yet proof of
    0.9, 18 of 18 is), and, with ``expected``, the mean of the kept scores (what calibrated
    probabilities promise).  The smoothing keeps a small validation set, whose raw precision
    is optimistic half the time, from choosing a threshold that the test tracks then miss.
    The smaller of the two is the kept tracks' ``estimated_precision``.  When no threshold
    reaches the target, ``best_threshold`` is the one whose kept tracks show the best precision:
    the highest lower bound (Wilson score, one standard error) of their observed precision, so
    that a handful of tracks all right does not beat many mostly right (``estimated_precision``
    is then the smoothed precision of those tracks).

    Returns ``{"threshold", "reached", "precision", "estimated_precision", "coverage", "kept",
    "tracks", "target", "best_threshold"}``; ``threshold`` is None and ``reached`` False when no
    threshold reaches the target; ``best_threshold`` is then the threshold of the best shown
    precision (``precision``, ``estimated_precision``, ``coverage`` and ``kept`` are its figures),
    and equals ``threshold`` otherwise.
    """
    s = np.asarray(scores, np.float64).ravel()
    c = np.asarray(correct, np.float64).ravel()
    n = len(s)
    out: dict[str, Any] = {"threshold": None, "reached": False, "precision": None, "estimated_precision": None,
                           "coverage": 0.0, "kept": 0, "tracks": int(n), "target": float(target), "best_threshold": None}
    if not n:
        return out
    order = np.argsort(-s, kind="stable")
    s, c = s[order], c[order]
    kept = np.arange(1, n + 1, dtype=np.float64)
    right = np.cumsum(c)
    smoothed = (right + 1.0) / (kept + 2.0)
    promised = np.cumsum(s) / kept
    estimate = np.minimum(smoothed, promised) if expected else smoothed
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # a threshold keeps every track of equal score
    ok = estimate[ends] >= target - 1e-12
    if ok.any():
        i = ends[np.flatnonzero(ok)[-1]]
        out.update(threshold=float(s[i]), reached=True)
        est = float(estimate[i])
    else:  # the precision best shown: the highest lower bound (Wilson, one standard error) of the kept tracks'
        # precision; a few tracks all right show less than many mostly right (5 of 5: 0.71; 25 of 30: 0.76)
        z2 = 1.0
        p_hat = right / kept
        lower = (p_hat + z2 / (2 * kept) - np.sqrt(z2 * (p_hat * (1 - p_hat) / kept + z2 / (4 * kept ** 2)))) / (
            1 + z2 / kept)
        best = lower[ends].max()
        i = ends[np.flatnonzero(lower[ends] >= best - 1e-12)[-1]]  # the most tracks at the best bound
        est = float(smoothed[i])
    out.update(precision=float(right[i] / kept[i]), estimated_precision=est, coverage=float(kept[i] / n),
               kept=int(kept[i]), best_threshold=float(s[i]))
    return out


def precision_recall_at(scores: Any, positive: Any, threshold: float | None) -> dict[str, Any]:
    """Precision and recall of the decision ``score >= threshold`` against ``positive`` (None: never decided)."""
    s = np.asarray(scores, np.float64).ravel()
    pos = np.asarray(positive, bool).ravel()
    chosen = s >= threshold if threshold is not None else np.zeros(len(s), bool)
    tp = float((chosen & pos).sum())
    return {"precision": tp / chosen.sum() if chosen.sum() else None,
            "recall": tp / pos.sum() if pos.sum() else None, "chosen": int(chosen.sum()), "positives": int(pos.sum())}
