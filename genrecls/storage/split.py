"""Train/validation/test assignment by track, stratified by label, stable as the library grows.

Segments of one track never land on two sides: the unit of the split is the track (or,
with a group column such as an artist or an album folder, the whole group).  Within each
label the units are ordered by a keyed hash of their id and the seed, and filled into the
splits by quota: the first ``round(n * test_fraction)`` hashes go to test, the next
``round(n * val_fraction)`` to validation, the rest to train (at least one of each when a
label has three units or more).  So:

* the assignment depends only on the ids, the labels and the seed, never on file order;
* adding tracks moves a known track only when it sits at a quota boundary of its label;
  and with ``previous=`` (the assignment saved with an earlier run) a known track never
  moves: known tracks keep their side, new tracks fill each label's quotas, so a
  challenger is compared with the champion on the champion's holdout plus new tracks.

The split of a group follows its majority label; a group with tracks already assigned
keeps their (majority) side for its new tracks.

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
from collections import Counter, defaultdict
from typing import Any, Iterable, Mapping

import pyarrow as pa

__all__ = ["SPLITS", "SplitError", "assign_splits", "read_splits", "write_splits", "split_counts", "as_mapping"]

SPLITS = ("train", "val", "test")


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
    elif isinstance(assignment, pa.Table) and {"track_id", "split"} <= set(assignment.column_names) and all(
            pa.types.is_string(assignment.schema.field(c).type) for c in ("track_id", "split")):
        out = dict(zip(assignment.column("track_id").to_pylist(), assignment.column("split").to_pylist()))
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


def assign_splits(tracks: pa.Table | Iterable[Mapping[str, Any]], *, val_fraction: float = 0.15,
                  test_fraction: float = 0.15, seed: int = 0, group_column: str | None = None,
                  previous: Any = None) -> pa.Table:
    """Assign every track to ``train``, ``val`` or ``test``.

    Parameters
    ----------
    tracks : table (or rows) with ``track_id``, ``label`` and, with ``group_column``, that column.
        Tracks without a label are not assigned.
    val_fraction, test_fraction : share of each label's units (tracks or groups) per split.
    seed : changes the assignment of new tracks; keep it fixed across retrainings.
    group_column : optional column whose values (an artist, an album) stay on one side.
    previous : an earlier assignment (mapping, table or Parquet path of ``track_id, split``);
        its tracks keep their side.

    Returns
    -------
    pa.Table with ``track_id, label, split`` (and ``group``), sorted by track_id.

    Raises
    ------
    SplitError
        when a label has fewer than three units (one for each split) and no previous
        assignment covers it, or when fewer than two labels are left.
    """
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise SplitError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in (0, 1) with a sum < 1")
    rows = tracks.to_pylist() if isinstance(tracks, pa.Table) else list(tracks)
    known = as_mapping(previous)
    labelled = []
    seen: set[str] = set()
    if group_column is None:  # the usual case, a million tracks in a second: the same rules, list by list
        try:
            pairs = [(r["track_id"], r["label"]) for r in rows]
        except KeyError:
            raise SplitError("tracks need 'track_id' and 'label' columns") from None
        labelled = [(str(t), str(lab), f"track:{t}") for t, lab in pairs if lab is not None and lab != ""]
        if len({x[0] for x in labelled}) != len(labelled):
            for tid, _, _ in labelled:
                if tid in seen:
                    raise SplitError(f"track {tid} appears twice in the track list")
                seen.add(tid)
        rows = []
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

    # units: groups (or single tracks) with their majority label
    unit_label: dict[str, str] = {}
    unit_split: dict[str, str] = {}
    unit_tracks: dict[str, list[tuple[str, str]]] = defaultdict(list)
    if group_column is None:  # every track its own unit: no list, no vote (a million tracks plan in seconds)
        for tid, label, group in labelled:
            unit_label[group] = label
            if tid in known:
                unit_split[group] = known[tid]
    else:
        for tid, label, group in labelled:
            unit_tracks[group].append((tid, label))
    for u, ts in unit_tracks.items():
        if len(ts) == 1:  # a track of its own (the usual unit): no vote to count
            tid, unit_label[u] = ts[0]
            if tid in known:
                unit_split[u] = known[tid]
            continue
        unit_label[u] = sorted(Counter(l for _, l in ts).items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        sides = Counter(known[t] for t, _ in ts if t in known)
        if sides:
            unit_split[u] = sorted(sides.items(), key=lambda kv: (-kv[1], SPLITS.index(kv[0])))[0][0]

    by_label: dict[str, list[str]] = defaultdict(list)
    for u, label in unit_label.items():
        by_label[label].append(u)
    for label, units in sorted(by_label.items()):
        assigned = Counter(unit_split[u] for u in units if u in unit_split)
        blake, prefix = hashlib.blake2b, f"{seed}:"  # _unit_hash, inlined: a million calls
        new = [u for _, u in sorted((int.from_bytes(blake((prefix + u).encode(), digest_size=8).digest(), "big"), u)
                                    for u in units if u not in unit_split)]
        if not new:
            continue
        if len(units) < 3 and not all(assigned[s] for s in SPLITS):
            what = "groups" if group_column else "tracks"
            raise SplitError(
                f"label {label!r} has {len(units)} {what}{' (' + group_column + ')' if group_column else ''}; "
                f"at least 3 are needed (one each for train, validation and test)")
        quotas = _quotas(len(units), val_fraction, test_fraction)
        deficit = {s: max(0, quotas[s] - assigned[s]) for s in SPLITS}
        for u in new:
            for s in ("test", "val", "train"):
                if deficit[s] > 0:
                    unit_split[u] = s
                    deficit[s] -= 1
                    break
            else:  # every quota met by known units: fall back to the hash thresholds
                x = _unit_hash(u, seed) / 2.0 ** 64
                unit_split[u] = "test" if x < test_fraction else ("val" if x < test_fraction + val_fraction else "train")

    out = sorted(labelled)  # by track id (unique)
    table = pa.table({
        "track_id": pa.array([r[0] for r in out], pa.string()),
        "label": pa.array([r[1] for r in out], pa.string()),
        "split": pa.array([unit_split[r[2]] for r in out], pa.string()),
        "group": (pa.array([r[2].split(":", 1)[1] if r[2].startswith("group:") else None for r in out], pa.string())
                  if group_column is not None else pa.nulls(len(out), pa.string())),
    })
    return table


def split_counts(table: pa.Table) -> dict[str, dict[str, int]]:
    """Tracks per split and label: ``{split: {label: n, ..., "total": n}}``."""
    out: dict[str, dict[str, int]] = {s: {"total": 0} for s in SPLITS}
    counts = table.select(["split", "label"]).group_by(["split", "label"], use_threads=False).aggregate([([], "count_all")])
    for row in counts.to_pylist():
        out[row["split"]][row["label"]] = row["count_all"]
        out[row["split"]]["total"] += row["count_all"]
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
