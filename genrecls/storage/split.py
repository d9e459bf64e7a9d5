"""Train/validation/test assignment and cross-validation folds, stratified by label, groups whole.

Segments of one track never land on two sides: the unit of the split is the track (or,
with a group column such as an album or an album artist, the whole group: the "album
effect", tracks of one album sharing production and artist, would otherwise make every
accuracy optimistic).  Within each label the units are ordered by a keyed hash of their id
and the seed, and filled into the splits by quota in tracks: ``round(n * test_fraction)``
tracks go to test, ``round(n * val_fraction)`` to validation, the rest to train (at least
one of each when a label has three tracks or more; a group goes where at least half of it is
still lacking).  A label whose groups cannot fill test and validation is split by track (and
named).  So:

* the assignment depends only on the ids, the labels and the seed, never on file order;
* adding tracks moves a known track only when it sits at a quota boundary of its label;
  and with ``previous=`` (the assignment saved with an earlier run) a known track never
  moves: known tracks keep their side, new tracks fill each label's quotas, so a
  challenger is compared with the champion on the champion's holdout plus new tracks.

The split of a group follows its majority label; a group with tracks already assigned
keeps their (majority) side for its new tracks, and every known track keeps its own side (a
holdout assigned by track keeps its meaning once album tags group its tracks).

:func:`assign_folds` cuts the train and validation tracks of a frozen-backbone run into
cross-validation folds by the same units (:mod:`genrecls.models.selection`).

Examples
--------
>>> import pyarrow as pa
>>> tracks = pa.table({"track_id": [f"t{i}" for i in range(20)], "label": ["a", "b"] * 10})
>>> table = assign_splits(tracks, val_fraction=0.2, test_fraction=0.2, seed=0)
>>> sorted(set(table.column("split").to_pylist()))
['test', 'train', 'val']
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections import Counter, defaultdict
from typing import Any, Iterable, Mapping

import pyarrow as pa

__all__ = ["SPLITS", "SplitError", "album_group", "assign_splits", "assign_folds", "split_notes", "read_splits",
           "write_splits", "split_counts", "as_mapping"]

SPLITS = ("train", "val", "test")
#: schema metadata of an assignment: how it was made (split_notes)
SPLIT_NOTES_KEY = b"genrecls.split"


class SplitError(ValueError):
    """The tracks cannot be split as asked (too few tracks of a label, bad previous assignment...)."""


def _unit_hash(key: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big")


def _quota(n: int, fraction: float) -> int:
    return int(n * fraction + 0.5)


def _quotas(n: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    n_test = max(1, _quota(n, test_fraction))
    n_val = max(1, _quota(n, val_fraction))
    while n_test + n_val > n - 1 and (n_test > 1 or n_val > 1):  # keep at least one train unit
        if n_test >= n_val and n_test > 1:
            n_test -= 1
        else:
            n_val -= 1
    return {"test": n_test, "val": n_val, "train": n - n_test - n_val}


def as_mapping(assignment: Any) -> dict[str, str]:
    """A previous assignment as ``{track_id: split}`` from a mapping, a table or a Parquet path."""
    if assignment is None:
        return {}
    if isinstance(assignment, Mapping):
        out = {str(k): str(v) for k, v in assignment.items()}
    else:
        if isinstance(assignment, (str, bytes)) or hasattr(assignment, "__fspath__"):
            assignment = read_splits(assignment)
        if hasattr(assignment, "to_pydict"):
            d = assignment.to_pydict()
        elif hasattr(assignment, "to_dict"):  # pandas
            d = {c: list(assignment[c]) for c in assignment.columns}
        else:
            raise SplitError(f"splits: expected a mapping, a table or a Parquet path, got {type(assignment).__name__}")
        for col in ("track_id", "split"):
            if col not in d:
                raise SplitError(f"splits: the assignment has no {col!r} column (columns: {sorted(d)})")
        out = {str(t): str(s) for t, s in zip(d["track_id"], d["split"])}
    bad = sorted({s for s in out.values() if s not in SPLITS})
    if bad:
        raise SplitError(f"splits: unknown split name(s) {bad}; expected {list(SPLITS)}")
    return out


def album_group(path: str, album: str | None, album_artist: str | None, by: str = "album") -> str | None:
    """The group a track's split side and cross-validation fold follow (``train.group_by``), from its tags.

    ``album``: its album artist and album when it has both (an album spread over CD1/ and CD2/ is
    one), its folder and album when it has only the album (two "Greatest Hits" of two artists'
    folders stay apart); ``album_artist``: its album artist, else its album as above.  None (the
    track is its own unit) without an album tag, or with ``by="track"``.
    """
    if by == "album_artist" and album_artist:
        return f"artist\x1f{album_artist}"
    if by in ("album", "album_artist") and album:
        folder = posixpath.dirname(path or "")
        return f"album\x1f{album_artist}\x1f{album}" if album_artist else f"folder-album\x1f{folder}\x1f{album}"
    return None


def _rows(tracks: pa.Table | Iterable[Mapping[str, Any]], group_column: str | None) -> list[tuple[str, str, str]]:
    """(track id, label, unit) of every labelled track; the unit is ``group:<value>`` or ``track:<id>``."""
    rows = tracks.to_pylist() if isinstance(tracks, pa.Table) else list(tracks)
    labelled = []
    seen: set[str] = set()
    for r in rows:
        if "track_id" not in r or "label" not in r:
            raise SplitError("tracks need 'track_id' and 'label' columns")
        if r["label"] is None or r["label"] == "":
            continue
        tid = str(r["track_id"])
        if tid in seen:
            raise SplitError(f"track {tid} appears twice in the track list")
        seen.add(tid)
        if group_column is not None:
            if group_column not in r:
                raise SplitError(f"group column {group_column!r} is missing from the track list")
            group = r[group_column]
            group = f"track:{tid}" if group is None or group == "" else f"group:{group}"
        else:
            group = f"track:{tid}"
        labelled.append((tid, str(r["label"]), group))
    return labelled


def _units_by_label(labelled: list[tuple[str, str, str]]) -> tuple[dict[str, list[tuple[str, str]]], dict[str, list[str]]]:
    """Units (groups or single tracks) with their tracks, and each label's units (a unit's label: its majority)."""
    unit_tracks: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for tid, label, group in labelled:
        unit_tracks[group].append((tid, label))
    by_label: dict[str, list[str]] = defaultdict(list)
    for u, ts in unit_tracks.items():
        by_label[sorted(Counter(l for _, l in ts).items(), key=lambda kv: (-kv[1], kv[0]))[0][0]].append(u)
    return unit_tracks, by_label


def _fill(units: list[str], size: dict[str, int], known: dict[str, str], val_fraction: float, test_fraction: float,
          seed: int) -> dict[str, str]:
    """One label's new units into the splits by quota (in tracks); known units keep their side.

    In the order of their keyed hash, a unit goes to the first of test, validation, train whose
    quota still lacks at least half of its tracks (a single track: whenever the quota is not
    met), else to train; once every quota is met, by the hash itself.
    """
    n = sum(size[u] for u in units)
    quotas = _quotas(n, val_fraction, test_fraction)
    out = {u: known[u] for u in units if u in known}
    deficit = {s: quotas[s] - sum(size[u] for u in out if out[u] == s) for s in SPLITS}
    for u in sorted((u for u in units if u not in known), key=lambda u: (_unit_hash(u, seed), u)):
        for s in ("test", "val", "train"):
            if deficit[s] > 0 and (s == "train" or 2 * deficit[s] >= size[u]):
                out[u] = s
                deficit[s] -= size[u]
                break
        else:
            if deficit["test"] > 0 or deficit["val"] > 0:  # a group too large for what test/validation still lack
                out[u] = "train"
            else:  # every quota met by known units: fall back to the hash thresholds
                x = _unit_hash(u, seed) / 2.0 ** 64
                out[u] = "test" if x < test_fraction else ("val" if x < test_fraction + val_fraction else "train")
    return out


def assign_splits(tracks: pa.Table | Iterable[Mapping[str, Any]], *, val_fraction: float = 0.15,
                  test_fraction: float = 0.15, seed: int = 0, group_column: str | None = None,
                  previous: Any = None, small_labels: str = "error") -> pa.Table:
    """Assign every track to ``train``, ``val`` or ``test``.

    Parameters
    ----------
    tracks : table (or rows) with ``track_id``, ``label`` and, with ``group_column``, that column.
        Tracks without a label are not assigned.
    val_fraction, test_fraction : share of each label's tracks per split (whole groups: as near as they allow).
    seed : changes the assignment of new tracks; keep it fixed across retrainings.
    group_column : optional column whose values (an album, an artist) stay on one side; a track
        whose value is null is its own unit.  A label whose groups cannot fill every split
        (fewer than 3, or one holding so many of its tracks that test or validation stays
        empty) is split by track instead: the table's metadata names it (:func:`split_notes`).
    previous : an earlier assignment (mapping, table or Parquet path of ``track_id, split``);
        its tracks keep their side.
    small_labels : what happens to a label with fewer than 3 tracks: ``"error"`` (a
        :class:`SplitError`), or ``"train"`` (all of them go to train: the frozen head's
        cross-validation scores them; the label has no test track, named in the metadata).

    Returns
    -------
    pa.Table with ``track_id, label, split`` (and ``group``), sorted by track_id.

    Raises
    ------
    SplitError
        when a label has fewer than three tracks (one for each split), ``small_labels`` is
        ``"error"`` and no previous assignment covers it.
    """
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise SplitError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in (0, 1) with a sum < 1")
    if small_labels not in ("error", "train"):
        raise SplitError(f"small_labels must be 'error' or 'train', got {small_labels!r}")
    known = as_mapping(previous)
    labelled = _rows(tracks, group_column)
    unit_tracks, by_label = _units_by_label(labelled)
    unit_split: dict[str, str] = {}
    for u, ts in unit_tracks.items():
        sides = Counter(known[t] for t, _ in ts if t in known)
        if sides:
            unit_split[u] = sorted(sides.items(), key=lambda kv: (-kv[1], SPLITS.index(kv[0])))[0][0]
    by_track_labels: list[str] = []
    train_only: list[str] = []
    track_unit: dict[str, str] = {}  # tracks of labels split by track although grouped: their own unit
    for label, units in sorted(by_label.items()):
        if all(u in unit_split for u in units):
            continue
        size = {u: len(unit_tracks[u]) for u in units}
        n_tracks = sum(size.values())
        grouped = any(s > 1 for s in size.values())
        if n_tracks < 3 and not all(any(unit_split.get(u) == s for u in units) for s in SPLITS):
            if small_labels == "error":
                raise SplitError(
                    f"label {label!r} has {n_tracks} tracks; at least 3 are needed (one each for train, validation "
                    "and test)")
            train_only.append(label)
            unit_split.update({u: unit_split.get(u, "train") for u in units})
            continue
        got = _fill(units, size, unit_split, val_fraction, test_fraction, seed)
        known_here = any(u in unit_split for u in units)
        if grouped and not known_here and (len(units) < 3 or not all(
                any(got[u] == s for u in units) for s in ("test", "val"))):
            by_track_labels.append(label)
            singles = [f"track:{t}" for u in units for t, _ in unit_tracks[u]]
            for u in units:
                for t, _ in unit_tracks[u]:
                    track_unit[t] = f"track:{t}"
            got = _fill(singles, {u: 1 for u in singles}, {}, val_fraction, test_fraction, seed)
        unit_split.update(got)

    # a known track keeps its own side, whatever its group's majority (a fixed holdout keeps its meaning when tags
    # arrive later); a new track follows its group
    out = sorted(((tid, label, known.get(tid) or unit_split[track_unit.get(tid, group)], group)
                  for tid, label, group in labelled), key=lambda r: r[0])
    table = pa.table({
        "track_id": pa.array([r[0] for r in out], pa.string()),
        "label": pa.array([r[1] for r in out], pa.string()),
        "split": pa.array([r[2] for r in out], pa.string()),
        "group": pa.array([r[3].split(":", 1)[1] if r[3].startswith("group:") else None for r in out], pa.string()),
    })
    notes = {"grouped": group_column is not None, "labels_split_by_track": by_track_labels,
             "labels_without_test_tracks": train_only}
    return table.replace_schema_metadata({SPLIT_NOTES_KEY: json.dumps(notes).encode()})


def split_notes(table: pa.Table) -> dict[str, Any]:
    """What :func:`assign_splits` recorded about an assignment: ``grouped``, ``labels_split_by_track``
    (grouped, but too few or too large groups), ``labels_without_test_tracks`` (fewer than 3 tracks); {} if none."""
    raw = (table.schema.metadata or {}).get(SPLIT_NOTES_KEY)
    return json.loads(raw) if raw else {}


def assign_folds(tracks: pa.Table | Iterable[Mapping[str, Any]], *, folds: int = 5, seed: int = 0,
                 group_column: str | None = None, by_track_labels: Iterable[str] = ()) -> tuple[dict[str, int], dict[str, Any]]:
    """Cross-validation folds of labelled tracks: stratified by label, each group (album) whole in one fold.

    ``k = min(folds, the most units any label has)`` (a unit: a group, or a track without one).
    Within each label its units, largest first (ties: keyed hash), go to the fold that holds
    the fewest of that label's tracks, so every fold gets a share of each label that has at
    least ``k`` units; a label with fewer units than ``k`` is held out in as many folds as it
    has units (its tracks are scored by heads that still learn it from its other units).  A
    grouped label with a single group, or one group holding more than half of its tracks, or one
    of ``by_track_labels`` (the labels the split made by track) is folded by track; a label with
    a single track is never held out (it is in every fold's training: it gets no out-of-fold score).

    Returns ``({track_id: fold, -1 for never held out}, info)``; ``info``: ``folds``,
    ``requested``, ``labels_folded_by_track``, ``never_held_out`` (label -> tracks),
    ``tracks_per_fold``, ``grouped_tracks``, ``groups``.
    """
    if folds < 2:
        raise SplitError(f"cross-validation needs at least 2 folds, got {folds}")
    labelled = _rows(tracks, group_column)
    unit_tracks, by_label = _units_by_label(labelled)
    by_track: list[str] = []
    label_units: dict[str, list[tuple[str, list[str]]]] = {}
    for label, units in sorted(by_label.items()):
        members = [(u, [t for t, _ in unit_tracks[u]]) for u in units]
        n = sum(len(m) for _, m in members)
        if n >= 2 and any(len(m) > 1 for _, m in members) and (
                label in set(by_track_labels) or len(units) < 2 or 2 * max(len(m) for _, m in members) > n):
            by_track.append(label)
            members = [(f"track:{t}", [t]) for _, ts in members for t in ts]
        label_units[label] = members
    k = min(folds, max((len(m) for m in label_units.values()), default=0))
    if k < 2:
        raise SplitError("cross-validation needs a label with at least 2 tracks")
    fold_of: dict[str, int] = {}
    never: dict[str, int] = {}
    for label, members in label_units.items():
        if len(members) < 2:
            never[label] = sum(len(ts) for _, ts in members)
            fold_of.update({t: -1 for _, ts in members for t in ts})
            continue
        start = _unit_hash(f"label:{label}", seed) % k
        counts = [0] * k
        for u, ts in sorted(members, key=lambda m: (-len(m[1]), _unit_hash(m[0], seed), m[0])):
            f = min(range(k), key=lambda i: (counts[i], (i - start) % k))
            counts[f] += len(ts)
            fold_of.update({t: f for t in ts})
    grouped = {u for u, ts in unit_tracks.items() if u.startswith("group:")}
    info = {"folds": k, "requested": int(folds), "labels_folded_by_track": by_track, "never_held_out": never,
            "tracks_per_fold": [sum(1 for f in fold_of.values() if f == i) for i in range(k)],
            "grouped_tracks": sum(len(unit_tracks[u]) for u in grouped), "groups": len(grouped)}
    return fold_of, info


def split_counts(table: pa.Table) -> dict[str, dict[str, int]]:
    """Tracks per split and label: ``{split: {label: n, ..., "total": n}}``."""
    out: dict[str, dict[str, int]] = {s: {"total": 0} for s in SPLITS}
    for label, split in zip(table.column("label").to_pylist(), table.column("split").to_pylist()):
        out[split][label] = out[split].get(label, 0) + 1
        out[split]["total"] += 1
    return out


def write_splits(table: pa.Table, location, name: str = "splits.parquet") -> None:
    """Write an assignment atomically into a :class:`~genrecls.storage.location.Location`."""
    import pyarrow.parquet as pq

    location.write_atomic(name, lambda out: pq.write_table(table, out))


def read_splits(path) -> pa.Table:
    """Read an assignment: a Parquet file, or a run folder holding ``splits.parquet``."""
    import os

    import pyarrow.parquet as pq

    from genrecls.storage.location import Location

    p = os.fspath(path)
    loc = Location.parse(p)
    if loc.exists("splits.parquet"):
        loc = loc.child("splits.parquet")
    elif not loc.exists():
        raise FileNotFoundError(f"split assignment {p} does not exist")
    with loc.fs.open_input_file(loc.root) as f:
        return pq.read_table(f)
