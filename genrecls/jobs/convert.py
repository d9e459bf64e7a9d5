"""``genrecls convert``: give a dataset written before the track index its index, once.

A dataset from before the index (``DATASET/index/`` missing) keeps its track list in its shards'
footers, and its embedding store's in its parts'.  Conversion reads every footer once (in
parallel), resolves them as the old reader did (the newest shard of a track wins; the
``touched/`` table's stats apply; the newest embedding part with the track's fingerprint and
segments serves it), and commits the result as the index's first version, under the dataset's
lock; the old ``touched/`` table is then deleted (the index holds every stat).  Nothing else
changes: no shard is rewritten or moved.  Until then every command still reads such a dataset
from its footers, with a warning; ``genrecls ingest`` converts it first thing.
"""

from __future__ import annotations

from typing import Any

from genrecls.storage.dataset import Dataset
from genrecls.storage.index import is_converted
from genrecls.storage.location import Location
from genrecls.storage.locks import folder_lock

__all__ = ["convert", "format_conversion"]


def convert(dataset: str) -> dict[str, Any]:
    loc = Location.parse(dataset)
    ds = Dataset(loc)
    manifest = ds.manifest()
    with folder_lock(loc, "genrecls convert"):
        if is_converted(loc):
            return {"dataset": loc.uri, "converted": False, "version": Dataset(loc).version,
                    "tracks": len(Dataset(loc).tracks())}
        with ds.writing("genrecls convert"):
            tracks = len(ds.tracks())
            manifest["index"] = {"format": "delta", "folder": "index", "version": ds.version}
            loc.write_json("manifest.json", manifest)
        return {"dataset": loc.uri, "converted": True, "version": ds.version, "tracks": tracks,
                "shards": len(ds.shard_names())}


def format_conversion(r: dict[str, Any]) -> str:
    if not r["converted"]:
        return f"{r['dataset']} already has its index (version {r['version']}, {r['tracks']} tracks): nothing to do"
    return (f"{r['dataset']}: index created from {r['shards']} shards' footers: {r['tracks']} tracks, "
            f"version {r['version']}")
