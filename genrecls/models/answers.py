"""The answers a library can use: calibrated confidence, ``uncertain``, several genres, the user's words.

:class:`AnswerRules` turns a track's scores (the mean of its segments' probabilities, in the
model's labels) into a prediction row's answer columns:

1. the run's :class:`~genrecls.models.calibration.Calibration` makes them probabilities
   (``prob_<label>``, ``top_k``, in the model's labels);
2. the :class:`~genrecls.models.vocabulary.Vocabulary` maps them onto the user's genres
   (sum for a softmax model, maximum for independent tags); without a file, the genres are
   the model's labels;
3. ``top_genre`` is the most probable genre, ``confidence`` its probability; ``genre`` is
   ``top_genre``, or the ``uncertain`` word when the answer falls below the threshold;
4. ``genres`` lists, best first and at most ``classify.max_genres``, ``genre`` and every other
   genre whose probability reaches that genre's own threshold (empty for an uncertain track:
   nothing is asserted); ``parent_genres`` every ancestor of those genres (the vocabulary's
   parents).

Every threshold is chosen on **validation tracks** (:func:`choose_rules`), or, for a frozen
head, on the **out-of-fold** scores of every training and validation track (issue 27), never
on test tracks, or set by hand:

* the calibration: temperature scaling, kept only when, fit on the other folds, it lowers the
  NLL of each fold's tracks (fit on the same tracks it always lowers theirs);
* the ``uncertain`` threshold: ``classify.min_confidence`` when set; else the lowest confidence
  at which the tracks it keeps reach ``classify.target_precision``
  (:func:`genrecls.models.calibration.precision_threshold`); when none does, the threshold of
  best estimated precision, and ``train``, ``classify`` and ``evaluate`` each say in one line
  that the target was not reached and what precision the answers are estimated to have
  (:func:`not_reached_line`); with ``classify.strict_precision`` every answer is then
  ``uncertain`` (answers only at a shown precision);
* each genre's threshold for ``genres``: the vocabulary's ``threshold`` when set; else the same
  rule, one genre against the rest; a genre with too few validation tracks to reach the
  target takes the ``uncertain`` threshold.

With no validation tracks: the pretrained tagger (independent tags) lists every genre whose
probability reaches its threshold (the vocabulary's, else ``classify.tag_threshold``) and is
uncertain when even its best genre does not; a run trained before calibration existed gets
the identity calibration and no threshold (``genre`` = top genre, ``genres`` = [top genre]).

The driver of a training run calls :func:`record_answers` after evaluating the exported
model: it chooses the rules, stores them in ``run.json`` (``answers``) with the validation
tracks' scores (``RUN/validation_tracks.parquet``, so that a vocabulary given later at
classify time is applied with thresholds chosen on the same tracks), and measures them on
the test tracks (:func:`evaluate_rules`).  ``genrecls classify`` calls :func:`rules_for_run`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from genrecls.core.config import ClassifyConfig
from genrecls.models.calibration import (
    ECE_BINS,
    Calibration,
    cross_fitted_nll,
    ece,
    ece_floor,
    nll,
    precision_recall_at,
    precision_threshold,
    reliability,
)
from genrecls.models.vocabulary import Vocabulary, identity_vocabulary, load_vocabulary
from genrecls.storage.location import Location

__all__ = [
    "ReviewRule",
    "review_rule",
    "LABELS_FILE",
    "VALIDATION_TRACKS",
    "AnswerRules",
    "answer_metrics_for_run",
    "choose_rules",
    "evaluate_rules",
    "format_answer_counts",
    "format_answers",
    "not_reached_line",
    "output_kind",
    "record_answers",
    "rules_for_run",
    "run_vocabulary",
    "track_scores_at_k",
    "vocabulary_path",
]

#: the validation tracks' scores a run keeps, beside run.json
VALIDATION_TRACKS = "validation_tracks.parquet"
#: the vocabulary a run was trained with (classify.labels), copied into the run
LABELS_FILE = "labels.toml"


def output_kind(info: dict[str, Any]) -> str:
    """``sigmoid`` for a run whose outputs are independent tags (the pretrained tagger), else ``softmax``."""
    kind = str((info.get("output") or {}).get("kind", ""))
    return "sigmoid" if "independent" in kind or "sigmoid" in kind else "softmax"


@dataclass(frozen=True)
class AnswerRules:
    """How track scores become the answer columns (see the module docstring); :meth:`to_dict` is its record."""

    kind: str
    calibration: Calibration
    vocabulary: Vocabulary
    uncertain_label: str = "uncertain"
    #: "global": uncertain below ``threshold``; "per_genre": uncertain when the top genre is below its own
    #: threshold; "none": never uncertain
    rule: str = "none"
    threshold: float | None = None
    #: False: no threshold reached the target precision on the validation (out-of-fold) tracks: ``threshold`` is the
    #: one of best estimated precision, or None (every answer uncertain) with ``classify.strict_precision``
    reached: bool = True
    genre_thresholds: dict[str, float | None] = field(default_factory=dict)
    max_genres: int = 3
    #: how each choice was made (sources, validation figures); not part of the decision
    chosen: dict[str, Any] = field(default_factory=dict)

    @property
    def genres(self) -> tuple[str, ...]:
        return self.vocabulary.genres

    def decision(self) -> dict[str, Any]:
        """Everything that decides an answer (what :attr:`answers_id` hashes)."""
        return {"kind": self.kind, "calibration": self.calibration.to_dict(),
                "vocabulary": None if self.vocabulary.is_identity else {
                    k: v for k, v in self.vocabulary.to_dict().items() if k in ("genres", "map", "parents")},
                "uncertain_label": self.uncertain_label, "rule": self.rule, "threshold": self.threshold,
                "reached": self.reached, "genre_thresholds": self.genre_thresholds, "max_genres": self.max_genres}

    @property
    def answers_id(self) -> str:
        """A short hash of :meth:`decision`: rows answered under other rules are answered again."""
        text = json.dumps(self.decision(), sort_keys=True, default=float)
        return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        vocab = None if self.vocabulary.is_identity else self.vocabulary.to_dict()
        return {**self.decision(), "vocabulary": vocab, "answers_id": self.answers_id, "chosen": self.chosen}

    # -- answering ---------------------------------------------------------------------
    def calibrate(self, scores: Any) -> np.ndarray:
        """Calibrated probabilities in the model's labels (what ``prob_<label>`` holds)."""
        return self.calibration.apply(scores)

    def genre_probabilities(self, probs: Any) -> np.ndarray:
        """Calibrated label probabilities mapped onto the genres (columns: :attr:`genres`)."""
        return self.vocabulary.apply(probs, self.kind)

    def answer(self, probs: Any) -> dict[str, list]:
        """The answer columns of calibrated label probabilities (tracks, labels).

        Returns lists: ``top_genre``, ``genre``, ``confidence``, ``genres``, ``parent_genres``
        (a track whose probabilities are all missing gets None and empty lists).
        """
        return self.answer_genres(self.genre_probabilities(probs))

    def answer_genres(self, q: np.ndarray) -> dict[str, list]:
        """The answer columns of genre probabilities (tracks, genres), e.g. an album's mean."""
        q = np.asarray(q, np.float64).reshape(-1, len(self.genres))
        out: dict[str, list] = {"top_genre": [], "genre": [], "confidence": [], "genres": [], "parent_genres": []}
        names = self.genres
        for row in q:
            if not len(names) or not np.isfinite(row).all():
                for k, v in (("top_genre", None), ("genre", None), ("confidence", None), ("genres", []),
                             ("parent_genres", [])):
                    out[k].append(v)
                continue
            order = np.argsort(-row, kind="stable")
            top = names[order[0]]
            conf = float(row[order[0]])
            uncertain = self._uncertain(top, conf)
            listed: list[str] = []
            if not uncertain:
                listed.append(top)
                for j in order[1:]:
                    if len(listed) >= self.max_genres:
                        break
                    t = self.genre_thresholds.get(names[j])
                    if t is not None and row[j] >= t and row[j] > 0:
                        listed.append(names[j])
            out["top_genre"].append(top)
            out["genre"].append(self.uncertain_label if uncertain else top)
            out["confidence"].append(conf)
            out["genres"].append(listed)
            out["parent_genres"].append(self.vocabulary.parent_genres(listed))
        return out

    def _uncertain(self, top: str, conf: float) -> bool:
        if self.rule == "global":  # (not reached: the threshold of best estimated precision, or None when strict)
            return self.threshold is None or conf < self.threshold
        if self.rule == "per_genre":
            t = self.genre_thresholds.get(top)
            return t is not None and conf < t
        return False


def _indices(labels: Sequence[str], truth: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(rows whose true label is a model label, their label indices)."""
    index = {lab: i for i, lab in enumerate(labels)}
    rows = [i for i, t in enumerate(truth) if t in index]
    return np.asarray(rows, np.int64), np.asarray([index[truth[i]] for i in rows], np.int64)


def choose_rules(labels: Sequence[str], ccfg: ClassifyConfig, *, kind: str = "softmax",
                 vocabulary: Vocabulary | None = None, val_scores: Any = None,
                 val_truth: Sequence[str] | None = None, val_folds: Sequence[int] | None = None,
                 chosen_on: str = "validation tracks") -> AnswerRules:
    """The answer rules of a model, every choice made on its validation (or out-of-fold) tracks.

    Parameters
    ----------
    labels : the model's labels (output order)
    ccfg : ``classify.calibration``, ``target_precision``, ``strict_precision``, ``min_confidence``,
        ``uncertain_label``, ``max_genres``, ``tag_threshold``
    kind : ``softmax`` (a genre classifier) or ``sigmoid`` (independent tags)
    vocabulary : the user's genres (None: the model's labels)
    val_scores, val_truth : the tracks' scores (tracks, labels; mean segment probabilities,
        uncalibrated) and true labels; None when there are none (the tagger, a run from before
        calibration)
    val_folds : each track's cross-validation fold (a frozen head's out-of-fold tracks); None:
        folds of the tracks in turn.  The calibration is kept only when, fit on the other folds,
        it lowers each fold's NLL overall (:func:`~genrecls.models.calibration.cross_fitted_nll`)
    chosen_on : what the tracks are, for the record ("out-of-fold tracks", "validation tracks")

    When no threshold shows ``target_precision``, the ``uncertain`` threshold is the one of best
    estimated precision (and the rules say so: ``reached`` False); with ``strict_precision``
    every answer is then ``uncertain``.
    """
    labels = list(labels)
    vocab = vocabulary or identity_vocabulary(labels)
    chosen: dict[str, Any] = {"target_precision": ccfg.target_precision, "chosen_on": chosen_on,
                              "strict_precision": bool(ccfg.strict_precision)}
    has_val = val_scores is not None and val_truth is not None and len(val_truth) > 0 and kind == "softmax"
    calibration = Calibration(kind=kind)
    if has_val:
        scores = np.asarray(val_scores, np.float64).reshape(-1, len(labels))
        rows, y = _indices(labels, list(val_truth))
        scores = scores[rows]
        folds = (np.asarray(val_folds, np.int64)[rows] if val_folds is not None
                 else np.arange(len(y)) % max(2, min(5, len(y))))
        fitted = Calibration.fit(scores, y, method=ccfg.calibration, kind=kind)
        record: dict[str, Any] = {"chosen_on": chosen_on, "tracks": len(y), "val_nll_before": nll(scores, y)}
        if fitted.method == "temperature":
            check = cross_fitted_nll(scores, y, folds)
            calibration = fitted if check["lowers"] else Calibration(kind=kind)
            record.update({"kept": check["lowers"], "fitted_temperature": fitted.temperature,
                           "nll_cross_fitted": check["nll_cross_fitted"], "lowering": check["lowering"],
                           "lowering_se": check["lowering_se"], "folds": check["folds"],
                           "fold_temperatures": check["fold_temperatures"],
                           "rule": "kept only when, fit on the other folds, it lowers the NLL of each fold's tracks "
                                   "by more than the standard error of that lowering"})
        cal = calibration.apply(scores)
        record["val_nll_after"] = nll(cal, y)
        chosen["calibration"] = record
        q = vocab.apply(cal, kind)
        g_truth = np.asarray([vocab.label_genre[j] for j in y], np.int64)
        keep = g_truth >= 0  # tracks of dropped labels say nothing about the genres
        q, g_truth = q[keep], g_truth[keep]
        chosen["tracks"] = len(g_truth)
    thresholds: dict[str, float | None] = {}
    genre_chosen: dict[str, dict[str, Any]] = {}
    # the uncertain answer
    reached, threshold = True, None
    if ccfg.min_confidence is not None:
        rule, threshold = "global", float(ccfg.min_confidence)
        chosen["uncertain"] = {"source": "classify.min_confidence", "threshold": threshold}
    elif has_val and len(g_truth):
        got = precision_threshold(q.max(axis=1), q.argmax(axis=1) == g_truth, ccfg.target_precision)
        rule, threshold, reached = "global", got["threshold"], got["reached"]
        chosen["uncertain"] = {"source": f"classify.target_precision on {chosen_on}", **got}
        if not reached and not ccfg.strict_precision:
            threshold = got["best_threshold"]
            chosen["uncertain"]["source"] = (
                f"confidence >= {threshold:.3f}, the best estimated precision on {len(g_truth)} {chosen_on}: "
                f"{got['estimated_precision']:.2f} ({got['kept']} of {len(g_truth)} kept)")
        elif not reached:
            chosen["uncertain"]["source"] = (f"classify.strict_precision: {ccfg.target_precision:g} is not shown on "
                                             f"{len(g_truth)} {chosen_on}, so every answer is uncertain")
    elif kind == "sigmoid":
        rule = "per_genre"
        chosen["uncertain"] = {"source": "per-genre thresholds (independent tags: no validation tracks)"}
    else:
        rule = "none"
        chosen["uncertain"] = {"source": "none: the run recorded no validation tracks (trained before calibration)"}
    # each genre's own threshold
    for j, g in enumerate(vocab.genres):
        if g in vocab.thresholds:
            thresholds[g] = vocab.thresholds[g]
            genre_chosen[g] = {"source": "vocabulary file"}
        elif has_val and len(g_truth):
            got = precision_threshold(q[:, j], g_truth == j, ccfg.target_precision)
            if got["reached"]:
                thresholds[g] = got["threshold"]
                genre_chosen[g] = {"source": chosen_on, **got}
            else:
                thresholds[g] = threshold
                genre_chosen[g] = {"source": f"the uncertain threshold (too few {chosen_on} of this genre to reach "
                                   "the target alone)", **got}
            pos = g_truth == j
            genre_chosen[g]["val_tracks"] = int(pos.sum())
        elif kind == "sigmoid":
            thresholds[g] = float(ccfg.tag_threshold)
            genre_chosen[g] = {"source": "classify.tag_threshold"}
        else:
            thresholds[g] = None
            genre_chosen[g] = {"source": "none"}
    chosen["genres"] = genre_chosen
    return AnswerRules(kind=kind, calibration=calibration, vocabulary=vocab, uncertain_label=ccfg.uncertain_label,
                       rule=rule, threshold=threshold, reached=reached, genre_thresholds=thresholds,
                       max_genres=ccfg.max_genres, chosen=chosen)


def evaluate_rules(rules: AnswerRules, scores: Any, truth: Sequence[str], labels: Sequence[str],
                   bins: int = ECE_BINS) -> dict[str, Any]:
    """The rules measured on labelled tracks (the test tracks): calibration, uncertain answers, per-genre listing.

    ``scores``: the tracks' uncalibrated scores (tracks, labels); ``truth``: their labels.
    ECE and NLL are in the model's labels (where calibration acts); the answers in the
    vocabulary's genres (a track of a dropped label is left out of those).
    """
    labels = list(labels)
    scores = np.asarray(scores, np.float64).reshape(-1, len(labels))
    rows, y = _indices(labels, list(truth))
    scores = scores[rows]
    out: dict[str, Any] = {"tracks": len(y), "bins": bins}
    if not len(y):
        return out
    cal = rules.calibrate(scores)
    if rules.kind == "softmax":
        out.update({"ece_before": ece(scores, y, bins), "ece_after": ece(cal, y, bins), "nll_before": nll(scores, y),
                    "nll_after": nll(cal, y), "ece_floor": ece_floor(cal, bins),
                    "reliability_before": reliability(scores, y, bins), "reliability_after": reliability(cal, y, bins)})
    vocab = rules.vocabulary
    g_truth = np.asarray([vocab.label_genre[j] for j in y], np.int64)
    keep = g_truth >= 0
    q = rules.genre_probabilities(cal)[keep]
    g_truth = g_truth[keep]
    ans = rules.answer_genres(q)
    names = list(rules.genres)
    answered = np.asarray([g != rules.uncertain_label for g in ans["genre"]], bool)
    right = np.asarray([g == names[t] for g, t in zip(ans["genre"], g_truth)], bool)
    out.update({"answer_tracks": len(g_truth), "answered": int(answered.sum()),
                "uncertain": int((~answered).sum()),
                "coverage": float(answered.mean()) if len(answered) else None,
                "answered_precision": float(right[answered].mean()) if answered.any() else None,
                "accuracy_of_top_genre": float(np.mean([t == names[g] for t, g in zip(ans["top_genre"], g_truth)]))
                if len(g_truth) else None})
    per: dict[str, Any] = {}
    for j, g in enumerate(names):
        listed = np.asarray([g in gs for gs in ans["genres"]], bool)
        pr = precision_recall_at(listed.astype(float), g_truth == j, 0.5)
        per[g] = {"threshold": rules.genre_thresholds.get(g), "tracks": int((g_truth == j).sum()),
                  "listed": pr["chosen"], "precision": pr["precision"], "recall": pr["recall"]}
    out["genres"] = per
    out["several_genres"] = int(sum(len(gs) > 1 for gs in ans["genres"]))
    return out


def track_scores_at_k(track_ids: Sequence[str], segment_index: Sequence[int], labels: Sequence[str], probs: Any,
                      k: int) -> tuple[list[str], list[str], np.ndarray]:
    """Track scores as classify computes them: the mean of K evenly spaced segments (0: all).

    Returns (track ids, their labels, scores (tracks, n_labels)), tracks in first-seen order.
    """
    from genrecls.models.selection import _pick  # classify's rule for which K segments (one definition)

    probs = np.asarray(probs, np.float64)
    rows: dict[str, list[int]] = {}
    truth: dict[str, str] = {}
    for i, t in enumerate(track_ids):
        rows.setdefault(t, []).append(i)
        truth.setdefault(t, labels[i])
    ids = list(rows)
    out = np.zeros((len(ids), probs.shape[1] if probs.ndim == 2 else 0))
    for n, t in enumerate(ids):
        idx = sorted(rows[t], key=lambda i: segment_index[i])
        out[n] = probs[[idx[j] for j in _pick(len(idx), k)]].mean(axis=0)
    return ids, [truth[t] for t in ids], out


# -- a run's rules ----------------------------------------------------------------------------
def run_vocabulary(run: Location, labels: Sequence[str], ccfg: ClassifyConfig,
                   tag_labels: bool = False) -> Vocabulary | None:
    """The vocabulary to answer in: ``classify.labels`` (a file; ``"none"``: the model's labels), else the run's own.

    ``tag_labels``: the run's labels came from genre tags (:func:`labels_from_tags`: the file's ``from`` and
    ``drop`` then name tag spellings, see :func:`~genrecls.models.vocabulary.load_vocabulary`)."""
    reserved = (ccfg.uncertain_label,)
    if ccfg.labels is not None:
        if str(ccfg.labels).lower() == "none":
            return None
        return load_vocabulary(vocabulary_path(ccfg.labels), labels, reserved=reserved, tag_labels=tag_labels)
    if run.exists(LABELS_FILE):
        return load_vocabulary(f"{run.uri}/{LABELS_FILE}", labels, text=run.read_text(LABELS_FILE), reserved=reserved,
                               tag_labels=tag_labels)
    return None


def labels_from_tags(info: dict[str, Any]) -> bool:
    """True for a run whose labels came from genre tags (its dataset's ``labels_from``, recorded in ``run.json``)."""
    return (info.get("labels_from") or {}).get("source") == "tags"


def vocabulary_path(value: str) -> str:
    """``classify.labels`` as a file: a path, or the name of a shipped example (``msd-tags-to-genres``)."""
    import os

    from genrecls.models.vocabulary import EXAMPLE_VOCABULARIES, example_vocabulary

    if not os.path.exists(value) and value in EXAMPLE_VOCABULARIES:
        return example_vocabulary(value)
    return value


def _read_validation(run: Location, labels: Sequence[str]) -> tuple[np.ndarray, list[str], list[int] | None, str] | None:
    import pyarrow.parquet as pq

    if not run.exists(VALIDATION_TRACKS):
        return None
    with run.fs.open_input_file(run.join(VALIDATION_TRACKS)) as f:
        table = pq.read_table(f)
    meta = table.schema.metadata or {}
    stored = json.loads(meta.get(b"genrecls.labels", b"[]"))
    if list(stored) != list(labels):
        return None
    scores = np.asarray(table.column("scores").to_pylist(), np.float64).reshape(-1, len(labels))
    folds = table.column("fold").to_pylist() if "fold" in table.column_names else None
    chosen_on = meta.get(b"genrecls.tracks", b"validation tracks").decode()
    return scores, table.column("label").to_pylist(), folds, chosen_on


def _write_validation(run: Location, ids: list[str], truth: list[str], scores: np.ndarray, labels: Sequence[str],
                      folds: list[int] | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"track_id": pa.array(ids, pa.string()), "label": pa.array(truth, pa.string()),
               "scores": pa.array([list(map(float, r)) for r in scores], pa.list_(pa.float64()))}
    if folds is not None:
        columns["fold"] = pa.array(folds, pa.int32())
    table = pa.table(columns)
    what = ("mean of classify's K segment probabilities, uncalibrated" + (
        ", each track scored by the head fit without its fold (out-of-fold)" if folds is not None else ""))
    table = table.replace_schema_metadata({b"genrecls.labels": json.dumps(list(labels)).encode(),
                                           b"genrecls.scores": what.encode(),
                                           b"genrecls.tracks": (b"out-of-fold tracks" if folds is not None
                                                                else b"validation tracks")})
    run.write_atomic(VALIDATION_TRACKS, lambda out: pq.write_table(table, out, compression="zstd"))


def rules_for_run(run: Location, info: dict[str, Any], ccfg: ClassifyConfig) -> AnswerRules:
    """The answer rules ``genrecls classify`` applies with a run: chosen on its validation tracks when it kept them."""
    labels = list(info["labels"])
    vocab = run_vocabulary(run, labels, ccfg, labels_from_tags(info))
    kind = output_kind(info)
    val = _read_validation(run, labels) if kind == "softmax" else None
    if val is None:
        return choose_rules(labels, ccfg, kind=kind, vocabulary=vocab)
    return choose_rules(labels, ccfg, kind=kind, vocabulary=vocab, val_scores=val[0], val_truth=val[1],
                        val_folds=val[2], chosen_on=val[3])


def record_answers(run: Location, info: dict[str, Any], scored: dict[str, tuple], ccfg: ClassifyConfig, *,
                   folds: dict[str, int] | None = None) -> dict[str, Any]:
    """After training: choose the rules on the validation (or out-of-fold) tracks, keep them in the run, measure them
    on the test tracks.

    ``scored``: per split (``val``, ``test``) what :func:`genrecls.models.evaluation.evaluate_predictor`
    kept (segment track ids, segment indices, labels, probabilities); a frozen head's ``val``
    is every training and validation track's out-of-fold probabilities, and ``folds`` their
    folds (track -> fold).  Updates ``info`` (the caller writes ``run.json``), writes
    ``RUN/validation_tracks.parquet``, ``RUN/labels.toml`` (with ``classify.labels``) and
    ``RUN/reliability.png``; returns ``{"answers": ...}`` for the metrics (with ``folds``:
    ``oof``, the rules on the out-of-fold tracks and their spread across folds).
    """
    labels = list(info["labels"])
    k = int((info.get("classify") or {}).get("max_segments", 0))
    if ccfg.labels is not None and str(ccfg.labels).lower() != "none":  # checked before training (the driver)
        with open(vocabulary_path(ccfg.labels), encoding="utf-8") as f:
            run.write_text(LABELS_FILE, f.read())
    vocab = run_vocabulary(run, labels, ccfg, labels_from_tags(info))
    kind = output_kind(info)
    if "val" not in scored or not scored["val"][0]:
        rules = choose_rules(labels, ccfg, kind=kind, vocabulary=vocab)
    else:
        ids, truth, scores = track_scores_at_k(*scored["val"], k)
        fold_list = [int(folds[t]) for t in ids] if folds is not None else None
        _write_validation(run, ids, truth, scores, labels, fold_list)
        rules = choose_rules(labels, ccfg, kind=kind, vocabulary=vocab, val_scores=scores, val_truth=truth,
                             val_folds=fold_list, chosen_on="out-of-fold tracks" if folds is not None
                             else "validation tracks")
    info["answers"] = {**rules.to_dict(), "k": k, "validation_tracks": VALIDATION_TRACKS,
                       "labels_file": LABELS_FILE if vocab is not None else None}
    out: dict[str, Any] = {"rules": _brief(rules)}
    if folds is not None and scored.get("val") and scored["val"][0]:
        out["oof"] = _fold_figures(rules, scores, truth, fold_list, labels)
    if "test" in scored and scored["test"][0]:
        _, truth, scores = track_scores_at_k(*scored["test"], k)
        out["test"] = evaluate_rules(rules, scores, truth, labels)
        if "reliability_before" in out["test"]:
            from genrecls.models.plots import plot_reliability

            plot_reliability(out["test"]["reliability_before"], out["test"]["reliability_after"], run,
                             ece_before=out["test"]["ece_before"], ece_after=out["test"]["ece_after"],
                             title=f"test tracks ({out['test']['tracks']}), K={k or 'all'}")
    return {"answers": out}


def answer_metrics_for_run(run: Location, info: dict[str, Any], scored: dict[str, tuple],
                           ccfg: ClassifyConfig | None = None) -> dict[str, Any]:
    """A run's rules (as classify applies them) measured on re-scored tracks (``genrecls evaluate --dataset``).

    ``ccfg``: the settings to choose them with; None: the run's own (its ``config.json``), in the
    vocabulary the run keeps (``RUN/labels.toml``), if any.
    """
    if ccfg is None:
        ccfg = ClassifyConfig()
        if run.exists("config.json"):
            from dataclasses import replace

            from genrecls.core.config import Config, ConfigError

            try:
                ccfg = replace(Config.from_dict(run.read_json("config.json")).classify, labels=None)
            except ConfigError:  # a configuration of another version: the defaults
                pass
    labels = list(info["labels"])
    k = int((info.get("classify") or {}).get("max_segments", 0))
    rules = rules_for_run(run, info, ccfg)
    out: dict[str, Any] = {"rules": _brief(rules)}
    if "test" in scored and scored["test"][0]:
        _, truth, scores = track_scores_at_k(*scored["test"], k)
        out["test"] = evaluate_rules(rules, scores, truth, labels)
    return {"answers": out}


def _fold_figures(rules: AnswerRules, scores: np.ndarray, truth: list[str], folds: list[int],
                  labels: Sequence[str]) -> dict[str, Any]:
    """The rules on the out-of-fold tracks, pooled and per fold (their spread): top-genre accuracy, NLL before and
    after calibration, answered precision and coverage.  (The thresholds were chosen on these tracks: their
    precision here is what they were chosen for; the test tracks measure it.)"""
    from genrecls.models.selection import fold_spread

    f = np.asarray(folds, np.int64)
    pooled = evaluate_rules(rules, scores, truth, labels)
    per = [evaluate_rules(rules, scores[f == v], [truth[i] for i in np.flatnonzero(f == v)], labels)
           for v in sorted(set(f.tolist()))]
    out = {"tracks": pooled.get("tracks", 0), "folds": len(per)}
    for key in ("accuracy_of_top_genre", "nll_before", "nll_after", "answered_precision", "coverage"):
        out[key] = {"pooled": pooled.get(key), **fold_spread([p.get(key) for p in per])}
    out["answered"], out["uncertain"] = pooled.get("answered"), pooled.get("uncertain")
    return out


def _brief(rules: AnswerRules) -> dict[str, Any]:
    d = rules.to_dict()
    return {k: d[k] for k in ("kind", "calibration", "uncertain_label", "rule", "threshold", "reached",
                              "genre_thresholds", "max_genres", "answers_id", "chosen")} | {
        "vocabulary": (d["vocabulary"] or {}).get("source")}


def _f(x: Any, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _spread(d: dict[str, Any] | None, fmt: str = ".3f") -> str:
    """``0.870 (folds 0.80-0.93, sd 0.05)`` of a pooled figure and its spread across folds."""
    if not d or d.get("pooled") is None:
        return "-"
    if d.get("min") is None:
        return format(d["pooled"], fmt)
    return f"{d['pooled']:{fmt}} (folds {d['min']:{fmt}}-{d['max']:{fmt}}, sd {d['sd']:{fmt}})"


def not_reached_line(answers: dict[str, Any]) -> str | None:
    """The one line that says the target precision was not reached and what precision the answers are estimated to
    have (None when it was reached, or nothing was chosen for it).

    ``answers``: a rules record (:meth:`AnswerRules.to_dict` or its brief), or classify's summary of them
    (``reached``, ``threshold``, ``target_precision``, ``uncertain_source``).
    """
    if answers.get("rule") != "global" or answers.get("reached", True):
        return None
    chosen = answers.get("chosen") or {}
    target = answers.get("target_precision", chosen.get("target_precision"))
    source = answers.get("uncertain_source") or (chosen.get("uncertain") or {}).get("source", "")
    if answers.get("threshold") is None:
        return (f"target precision {target} NOT reached: every answer is {answers.get('uncertain_label', 'uncertain')!r}"
                f" ({source}); lower classify.target_precision, or set classify.strict_precision=false to keep the "
                "answers of best estimated precision")
    return (f"target precision {target} NOT reached: answers kept at {source}; set classify.strict_precision=true to "
            "answer only at a shown precision")


def format_answer_counts(summary: dict[str, Any]) -> list[str]:
    """Lines of a classify summary: how many tracks were answered and how many ``uncertain`` (this run's and the
    library's), and the not-reached line when the target precision was not shown."""
    a = summary.get("answers") or {}
    word = a.get("uncertain_label", "uncertain")
    run_uncertain = int(summary.get("uncertain", 0) or 0)
    classified = int(summary.get("classified", 0) or 0)
    total = int(summary.get("tracks_total", 0) or 0)
    lib_uncertain = int(summary.get("uncertain_total", 0) or 0)
    lines = [(f"answered {classified - run_uncertain}, {word} {run_uncertain} of the {classified} track(s) this run "
              f"classified; in the library: answered {total - lib_uncertain}, {word} {lib_uncertain} of {total}")]
    line = not_reached_line(a)
    if line:
        lines.append(line)
    return lines


def format_answers(answers: dict[str, Any]) -> str:
    """The answers section of ``genrecls evaluate`` (and report.md): choices made on validation or out-of-fold tracks,
    measured on test tracks, and (cross-validated runs) the out-of-fold figures with their spread across folds."""
    from genrecls.core.progress import format_table

    r = answers.get("rules") or {}
    t = answers.get("test") or {}
    oof = answers.get("oof") or {}
    chosen = r.get("chosen") or {}
    where = chosen.get("chosen_on", "validation tracks")
    lines = [f"answers (choices made on {where}, measured on test tracks):"]
    cal = r.get("calibration") or {}
    cc = chosen.get("calibration") or {}
    if cal.get("method") == "temperature":
        lines.append(f"  calibration: temperature scaling, T = {cal['temperature']:.3f} ({where} NLL "
                     f"{_f(cc.get('val_nll_before'))} -> {_f(cc.get('val_nll_after'))}, {cc.get('tracks', '?')} tracks"
                     + (f"; fit on the other folds: {_f(cc.get('nll_cross_fitted'))}" if cc.get("nll_cross_fitted")
                        is not None else "") + ")")
    elif cc.get("kept") is False:
        lines.append(f"  calibration: none (temperature scaling, T = {cc.get('fitted_temperature', 0):.3f}, fit on the "
                     f"other folds gives NLL {_f(cc.get('nll_cross_fitted'))}, not lower than "
                     f"{_f(cc.get('val_nll_before'))} uncalibrated on the {cc.get('tracks', '?')} {where} by more than "
                     f"its standard error {_f(cc.get('lowering_se'))}: skipped)")
    else:
        lines.append(f"  calibration: identity ({'independent tags' if r.get('kind') == 'sigmoid' else 'none recorded'})")
    if "ece_before" in t:
        lines.append(f"  test ECE ({t['bins']} bins): {t['ece_before']:.3f} before, {t['ece_after']:.3f} after; NLL "
                     f"{t['nll_before']:.3f} -> {t['nll_after']:.3f}; a perfectly calibrated model would show "
                     f"{t['ece_floor']:.3f} on these {t['tracks']} tracks (sampling noise)")
    u = chosen.get("uncertain") or {}
    word = r.get("uncertain_label", "uncertain")
    if r.get("rule") == "global":
        if r.get("reached", True) and r.get("threshold") is not None:
            how = (f"chosen for precision {u.get('target', chosen.get('target_precision')):.2f} on {where} "
                   f"(there: precision {_f(u.get('precision'))}, coverage {_f(u.get('coverage'))})"
                   if "target" in u else "set by hand (classify.min_confidence)")
            lines.append(f"  {word!r} below confidence {r['threshold']:.3f}, {how}")
        else:
            lines.append("  " + (not_reached_line({**r, "target_precision": chosen.get("target_precision")}) or ""))
    elif r.get("rule") == "per_genre":
        lines.append(f"  {word!r} when the best genre is below its own threshold")
    else:
        lines.append(f"  no {word!r} answer (no validation tracks recorded)")
    if oof:
        lines.append(f"  out-of-fold ({oof['tracks']} tracks, {oof['folds']} folds; the thresholds were chosen on them): "
                     f"top genre right {_spread(oof.get('accuracy_of_top_genre'))}; NLL "
                     f"{_spread(oof.get('nll_before'))} -> {_spread(oof.get('nll_after'))}; answered precision "
                     f"{_spread(oof.get('answered_precision'))}, coverage {_spread(oof.get('coverage'))}")
    if t.get("answer_tracks"):
        lines.append(f"  test: {t['answered']} of {t['answer_tracks']} tracks answered (coverage {_f(t['coverage'])}), "
                     f"precision {_f(t['answered_precision'])}; {t['uncertain']} {word}; top genre right on "
                     f"{_f(t['accuracy_of_top_genre'])}; {t.get('several_genres', 0)} tracks with several genres")
    per = t.get("genres")
    if per:
        rows = [(g, _f(v["threshold"]), v["tracks"], v["listed"], _f(v["precision"]), _f(v["recall"]),
                 ((chosen.get("genres") or {}).get(g) or {}).get("source", "")[:40]) for g, v in per.items()]
        lines.append(format_table(rows, ("genre", "threshold", "test tracks", "listed", "precision", "recall",
                                         "threshold from")))
    if r.get("vocabulary"):
        lines.append(f"  genres in the words of {r['vocabulary']}")
    return "\n".join(lines)


# -- review: the tags a person wrote that the model contradicts -------------------------------------
#: the share of the validation (out-of-fold) tracks whose own genre may fall under the review's low threshold
REVIEW_RATE = 0.02
#: the low threshold stays within these bounds, however few the validation tracks
REVIEW_BOUNDS = (0.01, 0.2)


@dataclass(frozen=True)
class ReviewRule:
    """When a person's genre tag is listed for review: its genre's probability below ``low`` while another genre is
    answered (its confidence at least ``high``, the answer threshold).  ``how``: how both were chosen."""

    low: float
    high: float
    how: str

    def flags(self, tagged_p: float, top: str, tagged: str, confidence: float) -> bool:
        return top != tagged and tagged_p < self.low and confidence >= self.high


def review_rule(run: Location, info: dict[str, Any], rules: AnswerRules) -> ReviewRule:
    """The review thresholds of a run, chosen on the tracks its answers were chosen on (out-of-fold, or validation).

    ``low``: the probability under which at most :data:`REVIEW_RATE` of those tracks put their own genre
    (within :data:`REVIEW_BOUNDS`): a tag whose genre gets less is as unlikely as the model's rarest misses
    of a right label.  ``high``: the answer threshold (the ``uncertain`` one; 0.5 with none).
    """
    high = rules.threshold if rules.threshold is not None else 0.5
    val = _read_validation(run, list(info["labels"])) if output_kind(info) == "softmax" else None
    lo, hi = REVIEW_BOUNDS
    if val is None or not len(val[0]):
        return ReviewRule(hi / 2, high, f"no validation tracks kept: the low threshold is {hi / 2}")
    q = rules.genre_probabilities(rules.calibrate(val[0]))
    genres = list(rules.genres)
    own = [rules.vocabulary.genre_of(t) if t in rules.vocabulary.labels else None for t in val[1]]
    p_own = np.array([q[i, genres.index(g)] for i, g in enumerate(own) if g in genres])
    if not len(p_own):
        return ReviewRule(hi / 2, high, "no validation track of a known genre: the low threshold is " f"{hi / 2}")
    low = float(np.clip(np.quantile(p_own, REVIEW_RATE), lo, hi))
    return ReviewRule(low, high, f"low {low:.3f}: at most {REVIEW_RATE:.0%} of the {len(p_own)} {val[3]} put their own "
                                 f"genre under it (bounds {lo}-{hi}); high {high:.3f}: the answer threshold")
