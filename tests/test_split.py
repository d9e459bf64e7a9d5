"""Split by track: stratified, no leakage of tracks or groups, stable as the library grows."""

import os
import random

import pyarrow as pa
import pytest

from genrecls.storage.location import Location
from genrecls.storage.split import (
    SplitError,
    as_mapping,
    assign_folds,
    assign_splits,
    split_counts,
    split_notes,
    write_splits,
)


def _tracks(per_label: dict[str, int], prefix: str = "t", groups: int | None = None) -> list[dict]:
    rows = []
    for label, n in per_label.items():
        for i in range(n):
            row = {"track_id": f"{prefix}-{label}-{i:03d}", "label": label}
            if groups:
                row["artist"] = f"{label}-artist-{i % groups}"
            rows.append(row)
    return rows


def _mapping(table: pa.Table) -> dict[str, str]:
    return dict(zip(table.column("track_id").to_pylist(), table.column("split").to_pylist()))


def test_stratified_by_label_and_every_track_on_exactly_one_side():
    rows = _tracks({"rock": 40, "jazz": 20, "metal": 8})
    table = assign_splits(rows, val_fraction=0.15, test_fraction=0.15, seed=0)
    assert table.num_rows == len(rows)
    assert len(set(table.column("track_id").to_pylist())) == len(rows)  # no track twice
    counts = split_counts(table)
    assert counts["test"]["rock"] == 6 and counts["val"]["rock"] == 6 and counts["train"]["rock"] == 28
    assert counts["test"]["jazz"] == 3 and counts["val"]["jazz"] == 3
    assert counts["test"]["metal"] == 1 and counts["val"]["metal"] == 1 and counts["train"]["metal"] == 6


def test_assignment_ignores_input_order_and_depends_on_seed():
    rows = _tracks({"a": 30, "b": 30})
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    assert _mapping(assign_splits(rows, seed=3)) == _mapping(assign_splits(shuffled, seed=3))
    assert _mapping(assign_splits(rows, seed=3)) != _mapping(assign_splits(rows, seed=4))


def test_no_group_in_two_splits_even_across_labels():
    rows = _tracks({"rock": 30, "jazz": 30}, groups=6)
    # an artist who also plays the other genre: the whole group still stays on one side
    rows.append({"track_id": "crossover", "label": "jazz", "artist": "rock-artist-0"})
    table = assign_splits(rows, seed=0, group_column="artist", val_fraction=0.2, test_fraction=0.2)
    side_of_group: dict[str, set[str]] = {}
    for g, s in zip(table.column("group").to_pylist(), table.column("split").to_pylist()):
        side_of_group.setdefault(g, set()).add(s)
    assert all(len(sides) == 1 for sides in side_of_group.values()), side_of_group
    assert {s for sides in side_of_group.values() for s in sides} == {"train", "val", "test"}


def test_known_tracks_keep_their_side_when_the_library_grows(tmp_path):
    old = _tracks({"rock": 25, "jazz": 12, "metal": 5})
    first = assign_splits(old, seed=7)
    loc = Location.parse(str(tmp_path))
    write_splits(first, loc)
    new = old + _tracks({"rock": 10, "jazz": 10, "metal": 4, "blues": 6}, prefix="new")
    second = assign_splits(new, seed=7, previous=str(tmp_path))  # a run folder holding splits.parquet
    before, after = _mapping(first), _mapping(second)
    assert all(after[t] == s for t, s in before.items())
    counts = split_counts(second)
    assert counts["test"]["blues"] >= 1 and counts["val"]["blues"] >= 1  # new label gets every split
    assert counts["test"]["rock"] == 5  # quotas refilled on the whole label: round(35 * 0.15)
    # without the previous assignment, hashing still keeps almost every known track in place
    again = _mapping(assign_splits(new, seed=7))
    moved = [t for t, s in before.items() if again[t] != s]
    assert len(moved) <= 0.25 * len(before), moved


def test_previous_assignment_from_a_table_or_mapping():
    rows = _tracks({"a": 10, "b": 10})
    fixed = {"t-a-000": "test", "t-b-000": "test", "t-a-001": "val"}
    table = assign_splits(rows, seed=0, previous=fixed)
    got = _mapping(table)
    assert all(got[t] == s for t, s in fixed.items())
    assert as_mapping(table) == got


def test_too_few_tracks_for_a_split_is_a_clear_error():
    with pytest.raises(SplitError, match=r"label 'metal' has 2 tracks; at least 3"):
        assign_splits(_tracks({"rock": 10, "metal": 2}), seed=0)


def test_bad_previous_assignment_and_fractions():
    rows = _tracks({"a": 5, "b": 5})
    with pytest.raises(SplitError, match="unknown split name"):
        assign_splits(rows, previous={"t-a-000": "holdout"})
    with pytest.raises(SplitError, match="sum < 1"):
        assign_splits(rows, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(SplitError, match="group column 'artist' is missing"):
        assign_splits(rows, group_column="artist")


def test_unlabelled_tracks_are_not_assigned():
    rows = _tracks({"a": 5, "b": 5}) + [{"track_id": "x", "label": None}]
    assert "x" not in _mapping(assign_splits(rows))


# -- albums and cross-validation folds (issue 27) ------------------------------------------------------
def _albums(labels=("rock", "jazz", "pop"), albums: int = 5, size: int = 10, singles: int = 4) -> list[dict]:
    """Each label: ``albums`` albums of ``size`` tracks, and ``singles`` tracks without tags."""
    rows = []
    for label in labels:
        for a in range(albums):
            rows += [{"track_id": f"{label}-{a}-{i}", "label": label, "group": f"{label}-album-{a}"} for i in range(size)]
        rows += [{"track_id": f"{label}-single-{i}", "label": label, "group": None} for i in range(singles)]
    return rows


def _whole(rows: list[dict], side: dict) -> bool:
    seen: dict[str, set] = {}
    for r in rows:
        if r["group"] is not None and r["track_id"] in side:
            seen.setdefault(r["group"], set()).add(side[r["track_id"]])
    return all(len(v) == 1 for v in seen.values())


def test_albums_of_ten_tracks_stay_whole_in_the_split_and_in_the_folds():
    rows = _albums()
    table = assign_splits(rows, seed=0, group_column="group")
    side = _mapping(table)
    assert _whole(rows, side)
    counts = split_counts(table)
    for label in ("rock", "jazz", "pop"):  # 54 tracks: quotas of 8 filled by an album of 10 (and a single or none)
        assert 8 <= counts["test"][label] <= 12 and 8 <= counts["val"][label] <= 12
    assert split_notes(table) == {"grouped": True, "labels_split_by_track": [], "labels_without_test_tracks": []}
    pool = [r for r in rows if side[r["track_id"]] != "test"]
    folds, info = assign_folds(pool, folds=5, seed=0, group_column="group")
    assert _whole(pool, folds) and set(folds.values()) == set(range(5)) and info["folds"] == 5
    assert info["groups"] == 12 and info["grouped_tracks"] == 120 and info["never_held_out"] == {}
    # a label of one album (or one album holding most of its tracks) is split and folded by track, and named
    one = _albums(("rock", "jazz"), albums=3, size=4, singles=0) + _albums(("solo",), albums=1, size=10, singles=0)
    table = assign_splits(one, seed=0, group_column="group")
    assert split_notes(table)["labels_split_by_track"] == ["solo"]
    assert {s for t, s in _mapping(table).items() if t.startswith("solo")} == {"train", "val", "test"}
    folds, info = assign_folds(one, folds=5, seed=0, group_column="group", by_track_labels=["solo"])
    assert info["labels_folded_by_track"] == ["solo"] and len({folds[f"solo-0-{i}"] for i in range(10)}) == 5


@pytest.mark.parametrize("n, test, folds_held", [(2, 0, 2), (5, 1, 4), (8, 1, 5)])
def test_small_libraries_keep_every_track_in_the_cross_validation(n, test, folds_held):
    """2, 5 and 8 tracks per genre, and one genre of a single track (a frozen head's split: small_labels='train')."""
    rows = _tracks({"a": n, "b": n, "c": 1})
    table = assign_splits(rows, seed=0, small_labels="train")
    counts = split_counts(table)
    assert counts["test"].get("a", 0) == counts["test"].get("b", 0) == test and counts["train"]["c"] == 1
    assert "c" in split_notes(table)["labels_without_test_tracks"]
    pool = [r for r in rows if _mapping(table)[r["track_id"]] != "test"]
    folds, info = assign_folds(pool, folds=5, seed=1)
    assert info["folds"] == min(5, n - test) and info["never_held_out"] == {"c": 1} and folds["t-c-000"] == -1
    for label in ("a", "b"):  # each of its tracks in a fold of its own while there are folds enough
        assert len({folds[r["track_id"]] for r in pool if r["label"] == label}) == folds_held
    with pytest.raises(SplitError, match="has [12] tracks; at least 3"):
        assign_splits(rows, seed=0)  # a network trained from scratch needs its validation split
    with pytest.raises(SplitError, match="at least 2 tracks"):
        assign_folds(_tracks({"a": 1, "b": 1}), folds=5)


def test_a_holdout_assigned_by_track_keeps_its_meaning_when_album_tags_arrive():
    """Known tracks keep their own side although their album now groups them; a new track of an album follows it."""
    rows = _albums(("rock", "jazz"), albums=4, size=5, singles=0)
    by_track = assign_splits([{k: v for k, v in r.items() if k != "group"} for r in rows], seed=2)
    before = _mapping(by_track)
    new = rows + [{"track_id": "rock-0-new", "label": "rock", "group": "rock-album-0"}]
    after = _mapping(assign_splits(new, seed=2, group_column="group", previous=by_track))
    assert all(after[t] == s for t, s in before.items())
    sides = [before[f"rock-0-{i}"] for i in range(5)]
    assert after["rock-0-new"] == max(("train", "val", "test"), key=sides.count)  # its album's majority (ties: train first)


def test_album_tags_written_with_mutagen_reach_the_split(tmp_path, small_cfg):
    """Real files with real album tags: ingest records them per track, and the split keeps each album on one side."""
    from mutagen.flac import FLAC

    from genrecls.audio.sample_data import make_sample_collection
    from genrecls.jobs.ingest import ingest
    from genrecls.jobs.training import check_dataset, plan_training
    from genrecls.storage.dataset import Dataset

    paths = sorted(make_sample_collection(str(tmp_path / "lib"), genres=2, tracks_per_genre=12, seconds=1.0, sr=8000,
                                          formats=("flac",), seed=3))
    album = {}
    for i, path in enumerate(paths):  # three albums of four tracks per genre; the last one's artist missing
        f = FLAC(path)
        f["album"] = f"Album {i // 4}"
        if i % 12 < 8:
            f["albumartist"] = f"Artist {i // 12}"
        f.save()
        album[os.path.basename(path)] = f"Album {i // 4}"
    ingest(str(tmp_path / "lib"), str(tmp_path / "ds"), small_cfg, progress=False)
    entries = Dataset(str(tmp_path / "ds")).tracks().values()
    assert {os.path.basename(e.path): e.album for e in entries} == album
    assert sum(e.album_artist is not None for e in entries) == 16
    check = check_dataset(str(tmp_path / "ds"), small_cfg)
    plan, table = plan_training(check, small_cfg)
    side = {os.path.basename(next(t["path"] for t in check.tracks if t["track_id"] == tid)): s
            for tid, s in _mapping(table).items()}
    by_album: dict[str, set] = {}
    for name, s in side.items():
        by_album.setdefault(album[name], set()).add(s)
    assert all(len(v) == 1 for v in by_album.values()) and len(by_album) == 6
    assert any("split by album (train.group_by=album): 24 of 24 tracks in 6 groups" in n for n in plan.notes), plan.notes
    plan_t, _ = plan_training(check, small_cfg.with_section(train={"group_by": "track"}))
    assert any("split by track (train.group_by=track)" in n for n in plan_t.notes)
