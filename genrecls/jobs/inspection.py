"""``genrecls inspect``: what a dataset holds, as text a person reads.

Tracks and segments per label, failures and warnings by kind (with the first few paths
and reasons), and the feature configuration; the same report closes every ingest.
"""

from __future__ import annotations

import json
from collections import Counter

from genrecls.core.progress import format_table
from genrecls.storage.dataset import Dataset

__all__ = ["describe", "inspect_dataset", "labels_lines"]


def inspect_dataset(dataset: str | Dataset, *, as_json: bool = False) -> str:
    """The ``inspect`` command's output: :func:`describe`, or the manifest as JSON."""
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    return json.dumps(ds.manifest(), indent=2) if as_json else describe(ds)


def describe(ds: Dataset) -> str:
    """The ``inspect`` report: tracks and segments per label, failures and warnings by kind, features.

    Raises :class:`~genrecls.storage.dataset.DatasetError` when ``ds`` is not a dataset.
    """
    m = ds.manifest()
    per = m["counts"]["per_label"]
    rows = [(k or "(no label)", int(v["tracks"]), int(v["segments"]), f"{v['audio_seconds'] / 3600:.2f}") for k, v in per.items()]
    rows.append(("total", m["counts"]["tracks"], m["counts"]["segments"], f"{m['counts']['audio_seconds'] / 3600:.2f}"))
    out = [format_table(rows, ("label", "tracks", "segments", "hours"))]
    out += labels_lines(m.get("labels_from") or {})
    out += _records(ds.failures(), f"failures ({{n}}; the table is in {ds.uri}/failures/):", "reason",
                    lambda r: f"  {r['path']}: {r['reason']}")
    out += _records(ds.warnings(), f"kept with a warning ({{n}}; their audio is in the shards; the table is in "
                    f"{ds.uri}/warnings/):", "warning", lambda r: f"  {r['path']}: {r['kind']}: {r['reason']}")
    f = m["features"]
    out.append("")
    out.append(f"features: preset {f.get('preset', 'tutorial')}, {f['sample_rate']} Hz, segments of {f['segment_samples']} samples "
               f"({f['segment_samples'] / f['sample_rate']:.2f} s, hop {f['segment_hop']}), "
               f"log-mel {m['mel_shape'][0]}x{m['mel_shape'][1]} (n_fft {f['n_fft']}, hop {f['hop_length']}), "
               f"stored as {f['dtype']}; {m['counts']['shards']} shards")
    index = m.get("index") or {}
    out.append(f"index: version {index['version']} of the Delta Lake table in {ds.uri}/index/" if index.get("version")
               is not None else f"index: none yet (a dataset from before the index): run 'genrecls convert {ds.uri}'")
    e = m.get("embeddings")
    if e:
        engine = e.get("last_engine") or (e.get("engines") or [{}])[-1]
        tracks = m["counts"]["tracks"]
        out.append(f"embeddings: {e['tracks']} of {tracks} tracks ({e['segments']} segments) in {ds.uri}/embeddings/, "
                   f"backbone {e['backbone']}, layers " + ", ".join(f"{k} {v}" for k, v in e["layers"].items())
                   + f", {e.get('dtype', 'float16')}; computed by {engine.get('engine', '?')} {engine.get('precision', '?')}")
    else:
        out.append("embeddings: none stored (genrecls train computes the frozen backbone's itself)")
    return "\n".join(out)


def labels_lines(record: dict) -> list[str]:
    """Where a dataset's labels come from, how many tracks carry one, and why the others do not: the line a user
    checks first when labels come from tags ("65 labelled in 10 genres, 35 unlabelled: 30 without a genre tag,
    5 dropped by the vocabulary: Unknown"), then the spellings merged into one label."""
    if "labelled" not in record:
        return []
    why = record.get("unlabelled") or {}
    line = (f"labels from {record.get('source', 'folders')}"
            + (f" through {record['vocabulary']}" if record.get("vocabulary") else "")
            + f": {record['labelled']} labelled in {record.get('genres', 0)} genres, {sum(why.values())} unlabelled"
            + (": " + ", ".join(f"{n} {_WHY.get(k, k)}" for k, n in why.items()) if why else "")
            + (" (stored, never trained on)" if why else ""))
    out = [line]
    for label, spellings in (record.get("merged_spellings") or {}).items():
        out.append(f"  {label!r} also spelled {', '.join(map(repr, spellings))} (merged: they normalise alike)")
    return out


#: why a track is unlabelled, as the summary says it
_WHY = {"no genre tag": "without a genre tag"}


def _records(table, title: str, kind_header: str, line, shown: int = 10) -> list[str]:
    """A failures or warnings section: the count by kind, then the first ``shown`` rows."""
    if not table.num_rows:
        return []
    by_kind = Counter(table.column("kind").to_pylist())
    out = ["", title.replace("{n}", str(table.num_rows)),
           format_table(sorted(by_kind.items(), key=lambda kv: -kv[1]), (kind_header, "files"))]
    out += [line(r) for r in table.slice(0, shown).to_pylist()]
    if table.num_rows > shown:
        out.append(f"  ... and {table.num_rows - shown} more")
    return out
