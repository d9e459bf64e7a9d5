"""Answers a library can use (issue 21): calibration, 'uncertain', several genres, the user's vocabulary, albums.

The pure parts (genrecls.models.calibration, .vocabulary, .answers) are tested on NumPy arrays;
the classify side on real audio, a real exported model and the session's real local Ray.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from genrecls.core.config import ClassifyConfig, Config
from genrecls.models.answers import (
    LABELS_FILE,
    VALIDATION_TRACKS,
    choose_rules,
    evaluate_rules,
    format_answers,
    record_answers,
)
from genrecls.models.calibration import Calibration, ece, nll, precision_threshold
from genrecls.models.vocabulary import VocabularyError, example_vocabulary, load_vocabulary
from genrecls.storage.location import Location

REPO = Path(__file__).resolve().parents[1]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def overconfident(n: int, seed: int, labels: int = 4, sharpen: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Tracks whose true label is drawn from softmax(z), scored by a model that says softmax(3 z): over-confident."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.2, (n, labels))
    z[np.arange(n), rng.integers(0, labels, n)] += 1.5
    truth = np.array([rng.choice(labels, p=p) for p in softmax(z)])
    return softmax(sharpen * z), truth


# -- calibration --------------------------------------------------------------------------------------
def test_calibration_lowers_the_held_out_nll_of_an_over_confident_model():
    val, y_val = overconfident(300, seed=1)
    test, y_test = overconfident(300, seed=2)
    cal = Calibration.fit(val, y_val)
    assert cal.method == "temperature" and cal.temperature > 1.5  # it softens an over-confident model
    after = cal.apply(test)
    np.testing.assert_allclose(after.sum(axis=1), 1.0, atol=1e-9)
    assert (after.argmax(axis=1) == test.argmax(axis=1)).all()  # one parameter: the ranking never changes
    assert nll(after, y_test) < nll(test, y_test) - 0.1
    assert ece(after, y_test) < ece(test, y_test) / 2
    # an under-confident model (segment means pull towards uniform) is sharpened instead
    under = softmax(np.log(test) / 4)
    assert Calibration.fit(softmax(np.log(val) / 4), y_val).temperature < 1
    # identity: none asked for, independent tags, or a run that recorded none
    assert Calibration.fit(val, y_val, method="none").apply(under).tolist() == under.tolist()
    assert Calibration.fit(val, y_val, kind="sigmoid").method == "identity"
    assert Calibration.from_dict(None).apply(under).tolist() == under.tolist()


def test_a_validation_set_the_model_gets_all_right_does_not_make_it_infinitely_sure():
    p = softmax(np.array([[2.0, 0.0, 0.0]] * 20))
    cal = Calibration.fit(p, np.zeros(20, int))  # every track right: the likelihood alone would push T to 0
    assert 0.15 < cal.temperature < 1.0 and cal.apply(p)[0, 0] < 0.9999


def test_precision_threshold_keeps_the_most_tracks_that_reach_the_target():
    scores = np.array([0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91, 0.9, 0.6, 0.5])
    right = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1])
    got = precision_threshold(scores, right, 0.9)
    # 10 right of 10 kept: (10 + 1) / 12 = 0.917 and a mean score of 0.945 both reach 0.9; one more track does not
    assert got["reached"] and got["threshold"] == 0.9 and got["kept"] == 10 and got["precision"] == 1.0
    # a tie keeps every track of that score: no threshold can keep half of them
    tied = precision_threshold(np.array([0.95] * 10 + [0.9] * 2), np.array([1] * 10 + [1, 0]), 0.9)
    assert tied["threshold"] == 0.95 and tied["kept"] == 10
    # too few tracks to be sure: 5 right of 5 is (5 + 1) / 7 = 0.86 < 0.9
    few = precision_threshold(np.array([0.99] * 5), np.ones(5), 0.9)
    assert not few["reached"] and few["threshold"] is None and few["precision"] == 1.0
    # scores that do not promise the target (an uncalibrated mean of 0.6) are not trusted either
    assert not precision_threshold(np.full(40, 0.6), np.ones(40), 0.9)["reached"]


def calibrated(n: int, seed: int, labels: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Tracks whose true label is drawn from the very probabilities the model gives: calibrated already."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.2, (n, labels))
    z[np.arange(n), rng.integers(0, labels, n)] += 1.5
    p = softmax(z)
    return p, np.array([rng.choice(labels, p=row) for row in p])


def test_calibration_is_kept_only_when_it_lowers_the_nll_of_tracks_it_was_not_fit_on():
    labels = ["a", "b", "c", "d"]
    over, y_over = overconfident(150, seed=7)
    folds = np.arange(150) % 5
    rules = choose_rules(labels, ClassifyConfig(), val_scores=over, val_truth=[labels[i] for i in y_over],
                         val_folds=folds, chosen_on="out-of-fold tracks")
    c = rules.chosen["calibration"]
    assert rules.calibration.method == "temperature" and c["kept"] and c["nll_cross_fitted"] < c["val_nll_before"]
    assert len(c["fold_temperatures"]) == 5 and all(t > 1.5 for t in c["fold_temperatures"])
    # already calibrated scores: a temperature fit on 4 folds does not lower the 5th's NLL: skipped, and said so
    good, y_good = calibrated(150, seed=8)
    rules = choose_rules(labels, ClassifyConfig(), val_scores=good, val_truth=[labels[i] for i in y_good],
                         val_folds=folds, chosen_on="out-of-fold tracks")
    c = rules.chosen["calibration"]
    assert rules.calibration.method == "identity" and c["kept"] is False
    assert c["nll_cross_fitted"] >= c["val_nll_before"] and c["fitted_temperature"] != 1.0  # fit, then not kept
    assert rules.calibrate(good).tolist() == good.tolist()
    text = format_answers({"rules": rules.to_dict()})
    assert "calibration: none (temperature scaling, T = " in text and "not lower than" in text and "skipped" in text


def test_an_impossible_target_keeps_the_best_estimated_precision_and_says_so():
    labels = ["a", "b", "c", "d"]
    val, y = overconfident(120, seed=9)
    truth = [labels[i] for i in y]
    rules = choose_rules(labels, ClassifyConfig(target_precision=0.99), val_scores=val, val_truth=truth)
    u = rules.chosen["uncertain"]
    assert not rules.reached and rules.threshold == u["best_threshold"] and 0 < u["coverage"] < 1
    assert u["estimated_precision"] < 0.99 and "the best estimated precision on 120 validation tracks" in u["source"]
    answered = [g != "uncertain" for g in rules.answer(rules.calibrate(val))["genre"]]
    assert 0 < sum(answered) == u["kept"]  # it still answers: exactly the tracks at the best estimated precision
    line = [ln for ln in format_answers({"rules": rules.to_dict()}).splitlines() if "NOT reached" in ln]
    assert len(line) == 1 and f"confidence >= {rules.threshold:.3f}" in line[0] and "strict_precision" in line[0]
    strict = choose_rules(labels, ClassifyConfig(target_precision=0.99, strict_precision=True), val_scores=val,
                          val_truth=truth)
    assert strict.threshold is None and set(strict.answer(strict.calibrate(val))["genre"]) == {"uncertain"}
    assert "every answer is 'uncertain'" in format_answers({"rules": strict.to_dict()})
    # a reachable target: no such line
    easy = choose_rules(labels, ClassifyConfig(target_precision=0.6), val_scores=val, val_truth=truth)
    assert easy.reached and "NOT reached" not in format_answers({"rules": easy.to_dict()})


# -- the vocabulary -----------------------------------------------------------------------------------
LABELS = ["rock", "punk", "techno", "house", "swing", "electro swing", "hiphop", "female vocalists"]
VOCAB = """\
# merge, drop, aliases, parents
unlisted = "keep"
drop = ["female vocalists"]

[genres.Rock]
from = ["rock", "punk"]

[genres.Electronic]
from = ["techno"]

[genres."Tech-House"]
from = ["house"]
parents = ["Techno", "House"]

[genres.Techno]
parents = ["Electronic"]

[genres.House]
aliases = ["House music"]
parents = ["Electronic"]

[genres."Electro Swing"]
from = ["electro swing"]
parents = ["Swing", "Electronic"]

[genres.Swing]
from = ["swing"]
threshold = 0.2

[genres."Hip-Hop"]
aliases = ["Hip Hop", "rap"]
"""


def vocab_file(tmp_path: Path, text: str = VOCAB, name: str = "labels.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_vocabulary_merges_drops_aliases_and_rolls_up_to_several_parents(tmp_path):
    v = load_vocabulary(vocab_file(tmp_path), LABELS)
    assert v.genres == ("Rock", "Electronic", "Tech-House", "Electro Swing", "Swing", "Hip-Hop")
    assert {lab: v.genre_of(lab) for lab in LABELS} == {
        "rock": "Rock", "punk": "Rock", "techno": "Electronic", "house": "Tech-House", "swing": "Swing",
        "electro swing": "Electro Swing", "hiphop": "Hip-Hop",  # by the genre's name: letters and digits, case ignored
        "female vocalists": None}
    assert v.ancestors("Tech-House") == ["Techno", "House", "Electronic"]
    assert v.parent_genres(["Electro Swing"]) == ["Swing", "Electronic"]
    p = np.array([[0.3, 0.25, 0.0, 0.0, 0.1, 0.05, 0.0, 0.3]])
    np.testing.assert_allclose(v.apply(p, "softmax"), [[0.55, 0.0, 0.0, 0.05, 0.1, 0.0]])  # merged: summed
    np.testing.assert_allclose(v.apply(p, "sigmoid"), [[0.3, 0.0, 0.0, 0.05, 0.1, 0.0]])  # independent tags: maximum
    # the answer columns, in the user's words
    rules = choose_rules(LABELS, ClassifyConfig(min_confidence=0.4), vocabulary=v)
    probs = np.array([[0.05, 0.02, 0.03, 0.0, 0.25, 0.6, 0.0, 0.05],   # Electro Swing, and Swing over its own 0.2
                      [0.3, 0.3, 0.1, 0.1, 0.0, 0.0, 0.1, 0.1],        # Rock = rock + punk = 0.6
                      [0.1, 0.0, 0.3, 0.3, 0.0, 0.0, 0.0, 0.3]])       # best genre 0.3: uncertain
    a = rules.answer(probs)
    assert a["genre"] == ["Electro Swing", "Rock", "uncertain"]
    assert a["top_genre"] == ["Electro Swing", "Rock", "Electronic"]
    assert a["confidence"] == pytest.approx([0.6, 0.6, 0.3])
    assert a["genres"] == [["Electro Swing", "Swing"], ["Rock"], []]
    assert a["parent_genres"] == [["Electronic"], [], []]
    tech = rules.answer(np.array([[0, 0, 0, 0.9, 0, 0, 0, 0.1]]))
    assert tech["genres"] == [["Tech-House"]] and tech["parent_genres"] == [["Techno", "House", "Electronic"]]
    # unlisted = "drop": a label no genre names is no genre
    only = load_vocabulary(vocab_file(tmp_path, VOCAB.replace('unlisted = "keep"', 'unlisted = "drop"') + "\n", "d.toml"),
                           LABELS + ["polka"])
    assert only.genre_of("polka") is None
    assert load_vocabulary(vocab_file(tmp_path, VOCAB, "k.toml"), LABELS + ["polka"]).genre_of("polka") == "polka"


@pytest.mark.parametrize("text, line, message", [
    (VOCAB.replace('from = ["rock", "punk"]', 'from = [\n  "rock",\n  "pumk",\n]'), 8,
     "unknown label 'pumk' in genres.Rock.from: the model has no such label (did you mean 'punk'?)"),
    (VOCAB.replace('parents = ["Electronic"]\n\n[genres.House]', 'parents = ["Electronic", "Tech-House"]\n\n[genres.House]'),
     16, "a cycle of parents: Tech-House -> Techno -> Tech-House"),
    (VOCAB + '\n[genres.Punk]\nfrom = ["punk"]\n', 34, "label 'punk' is in two genres: 'Rock' (line 6) and 'Punk'"),
    (VOCAB.replace("threshold = 0.2", "treshold = 0.2"), 28, "unknown key 'treshold' in genres.Swing"),
    (VOCAB.replace("threshold = 0.2", "threshold = 2"), 28, "genres.Swing.threshold must be a number in [0, 1]"),
    (VOCAB.replace('parents = ["Swing", "Electronic"]', 'parents = ["Swnig", "Electronic"]'), 24,
     "unknown parent 'Swnig' of 'Electro Swing'"),
    (VOCAB.replace('from = ["techno"]', 'from = ["techno"'), 11, "not valid TOML: Unclosed array"),
    (VOCAB.replace('drop = ["female vocalists"]', 'drop = ["female vocalists", "rock"]'), 6,
     "label 'rock' is both dropped (line 3) and taken by genre 'Rock'"),
    (VOCAB.replace('aliases = ["Hip Hop", "rap"]', 'aliases = ["Hip Hop", "swing"]'), 31, "'swing' names two genres"),
    (VOCAB + '\n[genres.Uncertain]\nfrom = ["female vocalists"]\n', 33, "is the word of the uncertain answer"),
    (VOCAB + '\n[genres.Polka]\n', 33, "genre 'Polka' takes no label of the model and is no genre's parent"),
    ("colour = 1\n" + VOCAB, 1, "unknown key 'colour'"),
])
def test_a_wrong_vocabulary_file_is_refused_with_its_line(tmp_path, text, line, message):
    path = vocab_file(tmp_path, text)
    with pytest.raises(VocabularyError) as err:
        load_vocabulary(path, LABELS, reserved=("uncertain",))
    assert f"{path}: line {line}:" in str(err.value), str(err.value)
    assert message in str(err.value), str(err.value)


def test_the_shipped_example_maps_the_tagger_tags(tmp_path):
    from genrecls.models.musicnn import MSD_TAGS

    v = load_vocabulary(example_vocabulary(), MSD_TAGS, reserved=("uncertain",))
    assert {"Rock", "Metal", "Electronic", "House", "Jazz", "Blues", "Hip-Hop", "Classical"} <= set(v.genres)
    assert v.genre_of("heavy metal") == "Metal" and v.genre_of("Hip-Hop") == "Hip-Hop"
    assert v.genre_of("female vocalists") is None and v.genre_of("80s") is None  # not genres: dropped
    assert v.ancestors("House") == ["Electronic", "Dance"] and v.ancestors("Metal") == ["Rock"]
    rules = choose_rules(MSD_TAGS, ClassifyConfig(), kind="sigmoid", vocabulary=v)
    p = np.zeros((2, len(MSD_TAGS)))
    p[0, MSD_TAGS.index("heavy metal")], p[0, MSD_TAGS.index("metal")], p[0, MSD_TAGS.index("rock")] = 0.3, 0.6, 0.25
    p[1, MSD_TAGS.index("jazz")] = 0.15  # below classify.tag_threshold (0.2): uncertain
    a = rules.answer(p)
    assert a["genre"] == ["Metal", "uncertain"] and a["top_genre"] == ["Metal", "Jazz"]
    assert a["confidence"] == pytest.approx([0.6, 0.15])  # a merge of independent tags: the maximum
    assert a["genres"] == [["Metal", "Rock"], []] and a["parent_genres"] == [[], []]


def test_a_run_without_calibration_answers_its_top_genre():
    rules = choose_rules(["a", "b", "c"], ClassifyConfig())  # no validation tracks recorded
    a = rules.answer(np.array([[0.2, 0.5, 0.3], [0.34, 0.33, 0.33]]))
    assert rules.calibration.method == "identity" and rules.rule == "none"
    assert a["genre"] == a["top_genre"] == ["b", "a"] and a["genres"] == [["b"], ["a"]]


# -- choices on validation tracks, never on test tracks ------------------------------------------------
def scored_split(probs: np.ndarray, truth: np.ndarray, labels: list[str], prefix: str, segments: int = 3):
    """What evaluate_predictor keeps for a split: each track as ``segments`` identical segments."""
    tids = [f"{prefix}{i}" for i in range(len(truth)) for _ in range(segments)]
    index = [j for _ in range(len(truth)) for j in range(segments)]
    labs = [labels[t] for t in truth for _ in range(segments)]
    return tids, index, labs, np.repeat(probs, segments, axis=0)


def record(tmp_path: Path, name: str, val, test, labels, ccfg: ClassifyConfig):
    run = Location.parse(str(tmp_path / name))
    run.makedirs()
    info = {"labels": labels, "model_id": name, "classify": {"max_segments": 0}}
    metrics = record_answers(run, info, {"val": scored_split(*val, labels, "v"), "test": scored_split(*test, labels, "t")},
                             ccfg)
    return info, metrics, run


def test_thresholds_come_from_validation_tracks_only(tmp_path):
    labels = ["blues", "jazz", "rock", "metal"]
    val = overconfident(200, seed=3)
    test = overconfident(120, seed=4)
    info, metrics, run = record(tmp_path, "a", val, test, labels, ClassifyConfig())
    shuffled = (test[0], np.random.default_rng(0).permutation(test[1]))  # other test labels
    info2, metrics2, run2 = record(tmp_path, "b", val, shuffled, labels, ClassifyConfig())
    chosen = {k: v for k, v in info["answers"].items()}
    assert {k: v for k, v in info2["answers"].items()} == chosen  # the test labels changed nothing chosen
    assert pq.read_table(run.join(VALIDATION_TRACKS)).equals(pq.read_table(run2.join(VALIDATION_TRACKS)))
    assert metrics["answers"]["test"] != metrics2["answers"]["test"]  # only what is measured on them
    other_val = (val[0], np.random.default_rng(1).permutation(val[1]))
    info3, _, _ = record(tmp_path, "c", other_val, test, labels, ClassifyConfig())
    assert info3["answers"]["calibration"] != chosen["calibration"]  # the validation labels do decide
    # what was chosen, and what the test tracks say of it
    a = info["answers"]
    assert a["calibration"]["method"] == "temperature" and a["rule"] == "global" and a["reached"]
    assert a["chosen"]["uncertain"]["source"].startswith("classify.target_precision")
    t = metrics["answers"]["test"]
    assert t["ece_after"] < t["ece_before"] and t["nll_after"] < t["nll_before"]
    assert t["answered_precision"] >= 0.85 and 0 < t["coverage"] < 1 and t["uncertain"] == t["tracks"] - t["answered"]
    assert set(t["genres"]) == set(labels) and all("precision" in v and "recall" in v for v in t["genres"].values())
    assert (Path(run.root) / "reliability.png").stat().st_size > 1000
    text = format_answers(metrics["answers"])
    for needle in ("test ECE (15 bins):", "before", "after", "coverage", "precision", "threshold from"):
        assert needle in text, text
    # the rules a classify re-chooses from the stored validation tracks are the recorded ones
    from genrecls.models.answers import rules_for_run

    again = rules_for_run(run, info, ClassifyConfig())
    assert again.to_dict() == {k: v for k, v in info["answers"].items() if k not in ("k", "validation_tracks", "labels_file")}


def test_a_vocabulary_given_when_training_is_kept_in_the_run_and_its_thresholds_chosen_in_its_words(tmp_path):
    labels = ["techno", "house", "rock", "punk"]
    path = vocab_file(tmp_path, '[genres.Electronic]\nfrom = ["techno", "house"]\n[genres.Rock]\nfrom = ["rock", "punk"]\n')
    val, test = overconfident(200, seed=5), overconfident(100, seed=6)
    info, metrics, run = record(tmp_path, "r", val, test, labels, ClassifyConfig(labels=str(path)))
    assert run.read_text(LABELS_FILE) == path.read_text()
    assert info["answers"]["vocabulary"]["genres"] == ["Electronic", "Rock"]
    assert set(metrics["answers"]["test"]["genres"]) == {"Electronic", "Rock"}
    # two broad genres are easier than four labels: more tracks answered at the same precision
    _, plain_metrics, _ = record(tmp_path, "p", val, test, labels, ClassifyConfig())
    assert metrics["answers"]["test"]["coverage"] >= plain_metrics["answers"]["test"]["coverage"]


def test_evaluate_rules_reports_precision_and_coverage_of_the_answers():
    labels = ["a", "b"]
    rules = choose_rules(labels, ClassifyConfig(min_confidence=0.7, calibration="none"))
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.1, 0.9], [0.75, 0.25]])
    got = evaluate_rules(rules, probs, ["a", "b", "a", "b", "b"], labels)
    assert (got["answered"], got["uncertain"], got["coverage"]) == (4, 1, 0.8)
    assert got["answered_precision"] == 0.5  # 0.9 a right, 0.8 a wrong, 0.9 b right, 0.75 a wrong


# -- classify: the answer columns on real audio ------------------------------------------------------
GENRES = ["classical", "electronic", "jazz", "rock"]
TEST_CLASSIFY = {"max_segments": 4, "batch_size": 24, "tracks_per_task": 4, "top_k": 2}


@pytest.fixture(scope="module")
def answered_run(sample_dataset, tmp_path_factory):
    """A real exported model with answer rules chosen on half of the dataset's tracks, as training records them."""
    from test_classify import train_tiny_model

    from genrecls.models.evaluation import evaluate_predictor
    from genrecls.models.inference import Predictor
    from genrecls.storage.dataset import Dataset

    run = tmp_path_factory.mktemp("answers") / "run"
    info = train_tiny_model(sample_dataset, run, epochs=4)
    ds = Dataset(str(sample_dataset))
    tracks = sorted(ds.tracks())
    scored: dict = {}
    metrics = evaluate_predictor(Predictor(str(run)), ds, {"val": tracks[::2], "test": tracks[1::2]}, keep=scored)
    loc = Location.parse(str(run))
    info["classify"] = {"max_segments": metrics["classify_max_segments"]}
    record_answers(loc, info, scored, ClassifyConfig(target_precision=0.6))
    loc.write_json("run.json", info)
    return run


@pytest.fixture(scope="module")
def tagged_library(sample_library, tmp_path_factory):
    """Two folders of the sample library; two electronic tracks carry album tags of one album across the folders."""
    from mutagen.flac import FLAC

    root = tmp_path_factory.mktemp("answers-lib") / "lib"
    for genre in ("electronic", "jazz"):
        shutil.copytree(Path(sample_library) / genre, root / genre)
    flacs = sorted((root / "electronic").glob("*.flac")) + sorted((root / "jazz").glob("*.flac"))
    for path in flacs[:1] + flacs[-1:]:  # one electronic, one jazz track: the same album of one artist
        f = FLAC(path)
        f["album"], f["albumartist"] = "Mixed Album", "Someone"
        f.save()
    return root


def classify_cfg(small_cfg, **classify) -> Config:
    return small_cfg.with_section(classify={**TEST_CLASSIFY, **classify})


def test_classify_answers_in_the_users_words_with_albums_and_re_answers_without_decoding(
        answered_run, tagged_library, small_cfg, ray_local, tmp_path):
    from genrecls.jobs.classify import classify, format_summary
    from genrecls.storage.predictions import read_predictions

    info = json.loads((answered_run / "run.json").read_text())
    assert info["answers"]["calibration"]["method"] == "temperature"
    path = vocab_file(tmp_path, '[genres.Instrumental]\nfrom = ["classical", "jazz"]\n'
                                '[genres.Electronic]\nfrom = ["electronic"]\nparents = ["Instrumental"]\n'
                                '[genres.Guitar]\nfrom = ["rock"]\n')
    out = tmp_path / "pred"
    summary = classify(str(tagged_library), str(answered_run), str(out),
                       classify_cfg(small_cfg, labels=str(path), group_by="album"), csv=True, progress=False)
    rows = {r["path"]: r for r in read_predictions(out).to_pylist()}
    assert summary["classified"] == len(rows) == 12
    for r in rows.values():
        assert r["top_genre"] in ("Instrumental", "Electronic", "Guitar")
        assert r["genre"] in (r["top_genre"], "uncertain")
        assert r["genres"] == ([] if r["genre"] == "uncertain" else [r["genre"]] + r["genres"][1:])
        assert r["parent_genres"] == (["Instrumental"] if "Electronic" in r["genres"] and "Instrumental" not in r["genres"]
                                      else [])
        probs = [r[f"prob_{g}"] for g in GENRES]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)  # calibrated, still in the model's labels
        merged = {"Instrumental": r["prob_classical"] + r["prob_jazz"], "Electronic": r["prob_electronic"],
                  "Guitar": r["prob_rock"]}
        assert r["confidence"] == pytest.approx(merged[r["top_genre"]], abs=1e-5)  # a merge sums a softmax's labels
        assert r["answers_id"] == summary["answers"]["answers_id"]
    # albums: the two tagged tracks are one album across two folders; the others group by folder
    tagged = [p for p, r in rows.items() if r["album"] == "Mixed Album"]
    assert len(tagged) == 2 and {rows[p]["album_artist"] for p in tagged} == {"Someone"}
    assert summary["albums"] == 3
    for folder in ("electronic", "jazz"):
        members = [r for p, r in rows.items() if p.startswith(folder + "/") and p not in tagged]
        assert len({r["album_genre"] for r in members}) == 1
        q = np.mean([[r["prob_classical"] + r["prob_jazz"], r["prob_electronic"], r["prob_rock"]] for r in members], axis=0)
        assert members[0]["album_confidence"] == pytest.approx(q.max(), abs=1e-5)
    # the summary and the CSV count uncertain tracks; genre lists are "a;b" in the CSV
    uncertain = sum(r["genre"] == "uncertain" for r in rows.values())
    assert summary["uncertain_total"] == uncertain == summary["genre_distribution"].get("uncertain", 0)
    assert f"{uncertain} uncertain track(s)" in format_summary(summary)
    csv = pacsv.read_csv(out / "predictions.csv").to_pylist()
    assert sum(r["genre"] == "uncertain" for r in csv) == uncertain
    assert {r["path"]: r["genres"] or "" for r in csv} == {p: ";".join(r["genres"]) for p, r in rows.items()}
    # another vocabulary on the same folder: every row answered again from its stored probabilities, nothing decoded
    text = format_summary(summary)
    assert f"answered {12 - uncertain}, uncertain {uncertain} of the 12 track(s) this run classified" in text, text
    assert "NOT reached" not in text
    # (and the target precision no track can show, 0.999: said in one line, the best estimated precision kept)
    again = classify(str(tagged_library), str(answered_run), str(out),
                     classify_cfg(small_cfg, labels="none", target_precision=0.999), progress=False)
    assert again["classified"] == 0 and again["skipped_done"] == 12 and again["rows_answered_again"] == 12
    text = format_summary(again)
    assert "answered 0, uncertain 0 of the 0 track(s) this run classified; in the library: answered" in text, text
    assert len([ln for ln in text.splitlines() if "target precision 0.999 NOT reached: answers kept at confidence >="
                in ln]) == 1, text
    rows2 = {r["path"]: r for r in read_predictions(out).to_pylist()}
    for p, r in rows2.items():
        assert r["top_genre"] in GENRES and r["album_genre"] is None  # no group_by this time
        assert [r[f"prob_{g}"] for g in GENRES] == [rows[p][f"prob_{g}"] for g in GENRES]
    assert json.loads((out / "classify.json").read_text())["answers"]["answers_id"] == again["answers"]["answers_id"]


def test_predictions_written_before_the_answer_columns_still_load_classify_and_tag(
        answered_run, tagged_library, small_cfg, ray_local, tmp_path):
    """An older predictions folder (parts without the answer columns, by a run without calibration) loads,
    takes new tracks, gets its old rows answered, and is tagged."""
    from conftest import constant_run

    from genrecls.jobs.classify import classify
    from genrecls.jobs.tagging import tag
    from genrecls.storage.dataset import Dataset
    from genrecls.storage.predictions import read_predictions

    lib = tmp_path / "lib"
    shutil.copytree(tagged_library / "jazz", lib / "jazz")
    old_run = constant_run(tmp_path / "old-run", small_cfg.features, GENRES)  # no answers in its run.json
    assert "answers" not in json.loads((old_run / "run.json").read_text())
    out = tmp_path / "pred"
    first = classify(str(lib), str(old_run), str(out), classify_cfg(small_cfg), progress=False)
    assert first["answers"]["calibration"]["method"] == "identity" and first["answers"]["rule"] == "none"
    old_columns = ["path", "track_id", "genre", "confidence", *[f"prob_{g}" for g in GENRES], "top_k", "n_segments",
                   "duration", "size", "mtime_ns", "model_id", "classified_at"]
    for part in (out / "parts").glob("*.parquet"):  # as the version before issue 21 wrote them
        pq.write_table(pq.read_table(part).select(old_columns), part)
    assert "genres" not in pq.read_schema(next((out / "parts").glob("*.parquet"))).names
    shutil.copytree(tagged_library / "electronic", lib / "electronic")
    second = classify(str(lib), str(old_run), str(out), classify_cfg(small_cfg), csv=True, progress=False)
    assert second["skipped_done"] == 6 and second["classified"] == 6 and second["rows_answered_again"] == 6
    rows = read_predictions(out).to_pylist()
    assert len(rows) == 12
    for r in rows:  # identity calibration, no thresholds: the top genre, alone
        assert r["genre"] == r["top_genre"] == "rock" and r["genres"] == ["rock"] and r["confidence"] > 0.99
    assert pacsv.read_csv(out / "predictions.csv").num_rows == 12
    # an old part next to a new one, as a reader finds it when the answer pass has not run (a killed classify)
    part = min((out / "parts").glob("*.parquet"))
    pq.write_table(pq.read_table(part).select(old_columns), part)
    mixed = read_predictions(out)
    assert mixed.num_rows == 12 and mixed.column("genres").null_count == 6
    preview = tag(str(out), apply=False, progress=False)
    assert preview["files"] == 12 and (out / "tag-preview" / "report.parquet").exists()
    assert Dataset  # imported for parity with the other tests' fixtures


def test_tag_skips_uncertain_answers_whatever_the_word(answered_run, tagged_library, small_cfg, ray_local, tmp_path):
    from genrecls.jobs.classify import classify
    from genrecls.jobs.tagging import tag

    out = tmp_path / "pred"
    summary = classify(str(tagged_library / "jazz"), str(answered_run), str(out),
                       classify_cfg(small_cfg, min_confidence=1.0, uncertain_label="no idea"), progress=False)
    assert summary["uncertain_total"] == 6
    report = tag(str(out), apply=False, progress=False)
    rows = pq.read_table(out / "tag-preview" / "report.parquet").to_pylist()
    assert report["files"] == 6 and {r["kind"] for r in rows} == {"uncertain"}
    assert all("the model is uncertain" in r["reason"] for r in rows)


def test_album_tags_are_read_from_every_format(tmp_path):
    from mutagen.id3 import ID3, TALB, TPE2

    from genrecls.audio.sample_data import synthesize, write_audio
    from genrecls.audio.tags import album_tags

    audio = synthesize("jazz", 1.0, sr=22050, seed=1)
    for ext in ("mp3", "flac", "ogg", "wav"):
        write_audio(str(tmp_path / f"t.{ext}"), audio, 22050)
    assert album_tags(str(tmp_path / "t.flac")) == (None, None)
    tags = ID3()
    tags.add(TALB(encoding=3, text=["Blue"]))
    tags.add(TPE2(encoding=3, text=["Miles"]))
    tags.save(str(tmp_path / "t.mp3"))
    assert album_tags(str(tmp_path / "t.mp3")) == ("Blue", "Miles")
    from mutagen.oggvorbis import OggVorbis

    f = OggVorbis(str(tmp_path / "t.ogg"))
    f["ALBUM"] = "Kind of"
    f.save()
    assert album_tags(str(tmp_path / "t.ogg")) == ("Kind of", None)
    (tmp_path / "junk.mp3").write_bytes(b"\0" * 100)
    assert album_tags(str(tmp_path / "junk.mp3")) == (None, None) and album_tags(str(tmp_path / "none.mp3")) == (None, None)


def test_cli_refuses_a_wrong_labels_file_naming_the_line(answered_run, tagged_library, tmp_path):
    bad = vocab_file(tmp_path, '[genres.Jazz]\nfrom = ["jazz"]\n\n[genres.Rock]\nfrom = ["rokk"]\n')
    res = subprocess.run([sys.executable, "-m", "genrecls", "classify", str(tagged_library), "--model", str(answered_run),
                          "--out", str(tmp_path / "pred"), "--labels", str(bad), "-q"],
                         check=False, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 2, res.stderr
    assert f"{bad}: line 5: unknown label 'rokk'" in res.stderr and "did you mean 'rock'" in res.stderr
    assert not (tmp_path / "pred" / "parts").exists()  # refused before anything started


def test_training_refuses_a_wrong_labels_file_before_it_starts(sample_dataset, small_cfg, tmp_path):
    from genrecls.jobs.training import train

    bad = vocab_file(tmp_path, '[genres.Jazz]\nfrom = ["jazz"]\n\n[genres.Rock]\nparents = ["Jazz", "Rock"]\n')
    with pytest.raises(VocabularyError, match=r"line 5: a cycle of parents: Rock -> Rock"):
        train(str(sample_dataset), str(tmp_path / "run"), small_cfg.with_section(classify={"labels": str(bad)}),
              progress=False)
    assert not (tmp_path / "run").exists()  # nothing was written, no worker started


def test_the_tagger_answers_in_the_shipped_vocabulary_with_no_training(tmp_path, ray_local):
    """`classify --model musicnn-tags --labels msd-tags-to-genres`: broad genres, per-genre thresholds, parents."""
    from genrecls.audio.sample_data import make_sample_collection
    from genrecls.jobs.classify import classify
    from genrecls.models.musicnn import MSD_TAGS
    from genrecls.storage.predictions import read_predictions

    lib = tmp_path / "lib"
    make_sample_collection(str(lib), genres=2, tracks_per_genre=1, seconds=7.0, sr=22050, formats=("flac",), seed=4)
    v = load_vocabulary(example_vocabulary(), MSD_TAGS)
    summary = classify(str(lib), "musicnn-tags", str(tmp_path / "pred"),
                       Config().override(["classify.labels=msd-tags-to-genres", "classify.max_genres=2"]), progress=False)
    a = summary["answers"]
    assert a["rule"] == "per_genre" and a["calibration"]["method"] == "identity" and a["vocabulary"] == example_vocabulary()
    rows = read_predictions(tmp_path / "pred").to_pylist()
    assert len(rows) == 2
    for r in rows:
        assert r["top_genre"] in v.genres and r["genre"] in (r["top_genre"], "uncertain")
        tags = {g: r[f"prob_{g}"] for g in MSD_TAGS}
        assert r["confidence"] == pytest.approx(max(tags[t] for t in v.members(r["top_genre"])))  # a merge: the maximum
        if r["genre"] == "uncertain":
            assert r["confidence"] < 0.2 and r["genres"] == []
        else:
            assert r["confidence"] >= 0.2 and r["genres"][0] == r["genre"] and len(r["genres"]) <= 2
            assert r["parent_genres"] == v.parent_genres(r["genres"])
