"""Model selection on validation tracks (genrecls.models.selection) and the linear baseline model, without Ray."""

from __future__ import annotations

import numpy as np
import pytest

from genrecls.models.selection import (
    TrackTally,
    accuracy_by_k,
    choose_k,
    is_better,
    validation_metrics,
)


def test_track_tallies_of_two_workers_sum_to_the_whole_split():
    rng = np.random.default_rng(0)
    n_tracks, n_labels, n = 5, 3, 60
    t = rng.integers(0, n_tracks, n)
    truth = np.array([0, 1, 2, 1, 0])
    y = truth[t]
    probs = rng.dirichlet(np.ones(n_labels), n)
    whole = TrackTally(n_tracks, n_labels)
    whole.add(probs, y, t)
    a, b = TrackTally(n_tracks, n_labels), TrackTally(n_tracks, n_labels)
    a.add(probs[:25], y[:25], t[:25])
    b.add(probs[25:], y[25:], t[25:])
    m = validation_metrics(a.vector() + b.vector(), n_tracks, n_labels)
    assert m == pytest.approx(validation_metrics(whole.vector(), n_tracks, n_labels))
    # the rule itself: a track is right when the argmax of its MEAN segment probability is its label
    expected = np.mean([probs[t == i].mean(axis=0).argmax() == truth[i] for i in range(n_tracks)])
    assert m["val_track_accuracy"] == pytest.approx(expected)
    assert m["val_accuracy"] == pytest.approx((probs.argmax(1) == y).mean())
    assert m["val_loss"] == pytest.approx(-np.log(probs[np.arange(n), y]).mean(), rel=1e-5)


def test_the_epoch_kept_is_the_best_track_accuracy_then_the_lower_loss():
    assert is_better({"val_track_accuracy": 0.5, "val_loss": 9.0}, None)
    best = {"val_track_accuracy": 0.8, "val_loss": 0.5}
    assert is_better({"val_track_accuracy": 0.85, "val_loss": 2.0}, best)  # loss worse, tracks better: kept
    assert not is_better({"val_track_accuracy": 0.75, "val_loss": 0.1}, best)  # loss better, tracks worse: not kept
    assert is_better({"val_track_accuracy": 0.8, "val_loss": 0.4}, best)
    assert not is_better({"val_track_accuracy": 0.8, "val_loss": 0.49995}, best)


def test_k_is_the_number_of_segments_with_the_best_validation_accuracy():
    # track A (truth a): its first and last segments say "b", the middle three "a"; track B: every segment "b".
    # K segments are taken evenly spaced as classify takes them: K=1 -> the first, K=2 -> first and last
    probs = np.array([[0.2, 0.8], [0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.3, 0.7],
                      [0.1, 0.9], [0.2, 0.8]])
    tids = ["A"] * 5 + ["B"] * 2
    index = [0, 1, 2, 3, 4, 0, 1]
    labels = ["a"] * 5 + ["b"] * 2
    by_k = accuracy_by_k(tids, index, labels, probs, ["a", "b"], ks=(1, 2, 0))
    assert [r["track_accuracy"] for r in by_k] == [0.5, 0.5, 1.0]
    assert [r["segments"] for r in by_k] == [2, 4, 7]
    assert choose_k(by_k, 2) == 0  # only every segment gets A right
    by_k = [{"k": 1, "track_accuracy": 0.5}, {"k": 2, "track_accuracy": 0.9}, {"k": 4, "track_accuracy": 0.9},
            {"k": 0, "track_accuracy": 0.9}]
    assert choose_k(by_k, 10) == 4  # ties: the K nearest 10 (the prior)
    assert choose_k(by_k + [{"k": 10, "track_accuracy": 0.9}], 10) == 10
    assert choose_k([{"k": 10, "track_accuracy": 0.8}, {"k": 16, "track_accuracy": 0.85}], 10) == 16


def test_linear_model_pools_mean_and_std_over_time_and_saves_safely(tmp_path):
    from genrecls.models.catalog import build_model
    from genrecls.models.networks import load_keras_model, model_summary

    x = np.random.default_rng(1).normal(size=(4, 16, 20)).astype(np.float32) * 3 + 1
    model = build_model("linear", (16, 20), 3)
    stats = model.get_layer("time_stats")(x).numpy()
    np.testing.assert_allclose(stats[:, :16], x.mean(axis=2), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats[:, 16:], x.std(axis=2), rtol=1e-3, atol=1e-3)
    assert model_summary(model)["parameters"] == 2 * 16 * 3 + 3 + 4 * 32  # a logistic regression (dense) and its standardisation
    model.save(str(tmp_path / "m.keras"))
    again = load_keras_model(str(tmp_path / "m.keras"))
    np.testing.assert_allclose(again(x, training=False).numpy(), model(x, training=False).numpy(), atol=1e-6)
