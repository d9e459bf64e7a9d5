"""The embedding store: every segment's pretrained-backbone embeddings, computed once and kept in the dataset.

Layout (beside the shards)::

    DATASET/embeddings/part-*.parquet   one row per segment of the tracks its footer lists (zstd)

Row: ``track_id``, ``fingerprint`` (the track's content fingerprint, as in the shards),
``segment_index`` (the segment's position in its track, as in the shards), then one
fixed-size list column of float16 per backbone layer: with the musicnn backbone
``taggram`` (50), ``penultimate`` (200), ``max_pool`` (753), ``mean_pool`` (753),
``band_mean`` (96), ``band_std`` (96): every embedding a head may be fit on, so choosing one
never needs a second backbone pass.  float16 rounds each value by at most 2^-11 of itself
(4.9e-4), far below what the reduced-precision engines already differ from TensorFlow by.

What a stored embedding is keyed by: the track's content fingerprint and the segment
(row), the feature configuration and the backbone's identity (its name and a hash of its
weights: ``genrecls.models.engine.backbone_id``), both in each part's schema metadata
(``genrecls.features``, ``genrecls.backbone``; also ``genrecls.layers``, the widths, and
``genrecls.engine``, the runtime and precision that computed it).  A stored entry serves a
dataset track only while the track's fingerprint and number of segments are those it lists; a
store whose backbone or feature configuration differs from what is asked is refused with
both named (:meth:`EmbeddingStore.check`), never mixed.

Writes are the shards' (:mod:`genrecls.storage.location`): a part appears only complete,
on local disks and object stores alike; a footer lists the tracks it holds (``track_id``,
``fingerprint``, ``n_segments``), so the store's index is read from footers, never from the
data.  :meth:`EmbeddingStore.reconcile` (under the dataset's lock) keeps each live track in
exactly one part, the newest, and drops the entries of changed and pruned tracks: a killed
writer leaves no duplicate and no partial file.

Nothing here knows a model: the layers and their widths, the backbone's id and the engine's
description are given by the caller (:mod:`genrecls.jobs.ingest`, :mod:`genrecls.jobs.training`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genrecls.core.config import FeatureConfig
from genrecls.storage.dataset import TRACKS_KEY, DatasetError, OutputError, PartWriter
from genrecls.storage.location import Location

__all__ = ["EMBEDDINGS", "EmbeddingStoreError", "EmbeddingEntry", "EmbeddingWriter", "EmbeddingStore",
           "embedding_schema", "layer_array"]

#: the store's folder in a dataset
EMBEDDINGS = "embeddings"
STORE_VERSION = 1
BACKBONE_KEY = b"genrecls.backbone"
FEATURES_KEY = b"genrecls.features"
LAYERS_KEY = b"genrecls.layers"
ENGINE_KEY = b"genrecls.engine"
VERSION_KEY = b"genrecls.embeddings_version"
ROW_GROUP_SEGMENTS = 1024
#: float16 rounds to 11 significant bits; its largest finite value is 65504
VALUE_TYPE = pa.float16()
_KEY_COLUMNS = ("track_id", "fingerprint", "segment_index")


class EmbeddingStoreError(DatasetError):
    """The embedding store does not match what is asked of it (another backbone or feature configuration)."""


def _features_json(features: FeatureConfig | Mapping[str, Any]) -> dict[str, Any]:
    d = asdict(features) if isinstance(features, FeatureConfig) else dict(features)
    return json.loads(json.dumps(d, sort_keys=True))


def embedding_schema(layers: Mapping[str, int], *, backbone: str, features: FeatureConfig,
                     engine: Mapping[str, Any] | None = None) -> pa.Schema:
    """Schema of a part: the key columns, one float16 list per layer, what computed them in the metadata."""
    fields = [pa.field("track_id", pa.string(), nullable=False), pa.field("fingerprint", pa.string(), nullable=False),
              pa.field("segment_index", pa.int32(), nullable=False)]
    fields += [pa.field(name, pa.list_(VALUE_TYPE, int(width)), nullable=False) for name, width in layers.items()]
    return pa.schema(fields, metadata={
        BACKBONE_KEY: str(backbone).encode(),
        FEATURES_KEY: json.dumps(_features_json(features), sort_keys=True).encode(),
        LAYERS_KEY: json.dumps({k: int(v) for k, v in layers.items()}).encode(),
        ENGINE_KEY: json.dumps(dict(engine or {}), sort_keys=True, default=str).encode(),
        VERSION_KEY: str(STORE_VERSION).encode(),
    })


def _writer_options() -> dict[str, Any]:
    return dict(compression="zstd", compression_level=1, use_dictionary=["track_id", "fingerprint"],
                write_statistics=["track_id", "segment_index"])


def layer_array(column: pa.ChunkedArray | pa.Array, dtype=np.float32) -> np.ndarray:
    """A layer column as an array (rows, width)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = arr.type.list_size
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(arr), width).astype(dtype, copy=False)


class EmbeddingWriter(PartWriter):
    """Writes one part (``embeddings/NAME``) of embedding rows; see :class:`~genrecls.storage.dataset.PartWriter`."""

    def __init__(self, location: Location, name: str, schema: pa.Schema):
        super().__init__(location, EMBEDDINGS, name, schema, _writer_options(), f"{EMBEDDINGS}/{name}",
                         ROW_GROUP_SEGMENTS)
        self.layers = {f.name: f.type.list_size for f in schema if f.name not in _KEY_COLUMNS}

    def add_track(self, track_id: str, fingerprint: str, layers: Mapping[str, np.ndarray]) -> None:
        """Add every segment of one track: ``layers`` maps each layer of the schema to an array (n, width)."""
        missing = [k for k in self.layers if k not in layers]
        if missing:
            raise ValueError(f"track {track_id}: no values for layer(s) {missing}")
        n = len(next(iter(layers.values())))
        cols = []
        for name, width in self.layers.items():
            v = np.asarray(layers[name])
            if v.shape != (n, width):
                raise ValueError(f"track {track_id}: layer {name} has shape {v.shape}, expected ({n}, {width})")
            cols.append(pa.FixedSizeListArray.from_arrays(pa.array(v.astype(np.float16).reshape(-1), VALUE_TYPE), width))
        if n == 0:
            raise ValueError(f"track {track_id} has no segment")
        batch = pa.RecordBatch.from_arrays(
            [pa.array([track_id] * n, pa.string()), pa.array([fingerprint] * n, pa.string()),
             pa.array(np.arange(n, dtype=np.int32)), *cols], schema=self.schema)
        self._add([batch], {"track_id": track_id, "fingerprint": fingerprint, "n_segments": int(n)})


@dataclass(frozen=True)
class EmbeddingEntry:
    track_id: str
    fingerprint: str
    n_segments: int
    part: str


class EmbeddingStore:
    """A dataset's embedding store (``DATASET/embeddings/``): its parts, their footers, what computed them."""

    def __init__(self, dataset: Location | str):
        self.location = dataset if isinstance(dataset, Location) else Location.parse(dataset)
        #: part name -> (track list, schema metadata); parts are immutable but for :meth:`_rewrite_without`
        self._footers: dict[str, tuple[list[dict[str, Any]], dict[bytes, bytes]]] = {}

    @property
    def uri(self) -> str:
        return self.location.child(EMBEDDINGS).uri

    # -- parts and footers -------------------------------------------------------------
    def part_names(self) -> list[str]:
        return self.location.list(EMBEDDINGS, suffix=".parquet")

    def part_paths(self, names: Iterable[str] | None = None) -> list[str]:
        return [self.location.join(EMBEDDINGS, n) for n in (self.part_names() if names is None else names)]

    def exists(self) -> bool:
        return bool(self.part_names())

    def _footer(self, name: str) -> tuple[list[dict[str, Any]], dict[bytes, bytes]]:
        cached = self._footers.get(name)
        if cached is not None:
            return cached
        with self.location.fs.open_input_file(self.location.join(EMBEDDINGS, name)) as f:
            md = pq.read_metadata(f)
        meta = dict(md.metadata or {})
        if TRACKS_KEY not in meta or BACKBONE_KEY not in meta:
            raise EmbeddingStoreError(f"{self.uri}/{name} is not an embedding part written by genrecls "
                                      "(no track list or backbone in its footer); remove it")
        out = (json.loads(meta[TRACKS_KEY]), meta)
        self._footers[name] = out
        return out

    def _read_footers(self, names: list[str]) -> None:
        todo = [n for n in names if n not in self._footers]
        if len(todo) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(8, len(todo))) as pool:  # an object store answers each in a round trip
                list(pool.map(self._footer, todo))

    def describe(self) -> dict[str, Any] | None:
        """What the store holds: ``backbone``, ``features``, ``layers`` (name -> width), ``engines`` (every
        distinct description of what computed it), ``parts``, ``tracks`` and ``segments``; None when empty.

        Raises :class:`EmbeddingStoreError` when its parts disagree on the backbone, the feature
        configuration or the layers (naming two parts that differ): they are never mixed.
        """
        names = self.part_names()
        if not names:
            return None
        self._read_footers(names)
        first = None
        engines: list[dict[str, Any]] = []
        tracks = segments = 0
        for name in names:
            entries, meta = self._footer(name)
            key = (meta[BACKBONE_KEY].decode(), json.loads(meta[FEATURES_KEY]), json.loads(meta[LAYERS_KEY]))
            if first is None:
                first = (name, key)
            elif key != first[1]:
                what = ("backbone" if key[0] != first[1][0] else "feature configuration" if key[1] != first[1][1]
                        else "layers")
                raise EmbeddingStoreError(
                    f"{self.uri} mixes two {what}s: {first[0]} ({_short(first[1], what)}) and {name} "
                    f"({_short(key, what)}); embeddings of different backbones or features are never mixed: "
                    f"delete {self.uri} and run genrecls ingest again to compute them anew")
            engine = json.loads(meta.get(ENGINE_KEY, b"{}") or b"{}")
            if engine and engine not in engines:
                engines.append(engine)
            tracks += len(entries)
            segments += sum(e["n_segments"] for e in entries)
        backbone, features, layers = first[1]
        return {"backbone": backbone, "features": features, "layers": layers, "engines": engines,
                "dtype": "float16", "parts": len(names), "tracks": tracks, "segments": segments}

    def check(self, backbone: str, features: FeatureConfig, layers: Mapping[str, int] | None = None) -> dict[str, Any] | None:
        """Refuse a store computed by another backbone or from other features than asked (both named).

        Returns :meth:`describe` (None for an empty store, which anything may fill).
        """
        d = self.describe()
        if d is None:
            return None
        if d["backbone"] != backbone:
            raise EmbeddingStoreError(
                f"{self.uri} holds embeddings of the backbone {d['backbone']}, but this genrecls computes them with "
                f"{backbone} (other weights): embeddings of two backbones are never mixed; delete {self.uri} and run "
                f"genrecls ingest again to compute them with {backbone} (or set ingest.embeddings=off)")
        want = _features_json(features)
        if d["features"] != want:
            diff = ", ".join(f"{k}: stored {d['features'].get(k)!r}, asked {want.get(k)!r}"
                             for k in sorted(set(want) | set(d["features"])) if d["features"].get(k) != want.get(k))
            raise EmbeddingStoreError(
                f"{self.uri} holds embeddings of segments of another feature configuration ({diff}); they are never "
                f"mixed: delete {self.uri} and run genrecls ingest again")
        if layers is not None and d["layers"] != {k: int(v) for k, v in layers.items()}:
            raise EmbeddingStoreError(f"{self.uri} holds the layers {d['layers']}, not {dict(layers)}: delete it and "
                                      "run genrecls ingest again")
        return d

    def entries(self) -> list[EmbeddingEntry]:
        """Every (track, part) pair recorded in the parts' footers, oldest part first."""
        names = self.part_names()
        self._read_footers(names)
        return [EmbeddingEntry(part=name, **t) for name in names for t in self._footer(name)[0]]

    def index(self) -> dict[str, EmbeddingEntry]:
        """track_id -> its newest entry."""
        return {e.track_id: e for e in self.entries()}

    def valid_for(self, tracks: Mapping[str, tuple[str, int]]) -> dict[str, EmbeddingEntry]:
        """The entries that serve the given tracks (track_id -> (fingerprint, n_segments)): the newest entry
        with the track's fingerprint and number of segments, whichever part holds it."""
        out: dict[str, EmbeddingEntry] = {}
        for e in self.entries():  # oldest first: a later valid entry wins
            want = tracks.get(e.track_id)
            if want is not None and (e.fingerprint, e.n_segments) == (want[0], int(want[1])):
                out[e.track_id] = e
        return out

    # -- reading ------------------------------------------------------------------------
    def read(self, entries: Iterable[EmbeddingEntry], layers: Iterable[str] | None = None) -> pa.Table:
        """The rows of the given entries (each from its own part), with the key columns and ``layers``
        (default: every layer), in part order."""
        by_part: dict[str, list[str]] = defaultdict(list)
        for e in entries:
            by_part[e.part].append(e.track_id)
        tables = []
        for name in sorted(by_part):
            tables.append(self.read_part(name, by_part[name], layers))
        if not tables:
            return pa.table({})
        return pa.concat_tables(tables)

    def read_part(self, name: str, track_ids: Iterable[str], layers: Iterable[str] | None = None) -> pa.Table:
        """One part's rows of the given tracks."""
        import pyarrow.compute as pc

        ids = pa.array(sorted(set(track_ids)), pa.string())
        with self.location.fs.open_input_file(self.location.join(EMBEDDINGS, name)) as f:
            pf = pq.ParquetFile(f)
            cols = list(_KEY_COLUMNS) + (list(layers) if layers is not None else
                                         [n for n in pf.schema_arrow.names if n not in _KEY_COLUMNS])
            parts = []
            for i in range(pf.num_row_groups):
                t = pf.read_row_group(i, columns=cols)
                t = t.filter(pc.is_in(t.column("track_id"), ids))
                if t.num_rows:
                    parts.append(t)
            return pa.concat_tables(parts) if parts else pf.schema_arrow.empty_table().select(cols)

    # -- keeping it consistent (under the dataset's lock) ------------------------------
    def reconcile(self, live: Mapping[str, tuple[str, int]]) -> dict[str, int]:
        """Keep exactly the entries that serve a live track (track_id -> (fingerprint, n_segments)), one each.

        Drops temporary files a killed writer left, entries of tracks that are gone (pruned) or
        changed (another fingerprint), and older duplicates (a track embedded again); a part
        left with nothing is deleted.  Returns counts of what it did.
        """
        removed = self.location.remove_temporaries(EMBEDDINGS)
        keep = self.valid_for(live)
        drop: dict[str, set[str]] = defaultdict(set)
        entries = self.entries()
        for e in entries:
            k = keep.get(e.track_id)
            if k is None or k.part != e.part:
                drop[e.part].add(e.track_id)
        for part, ids in drop.items():
            self._rewrite_without(part, ids)
        return {"temporaries_removed": removed, "parts_rewritten": len(drop),
                "entries_dropped": sum(len(v) for v in drop.values())}

    def _rewrite_without(self, name: str, drop: set[str]) -> None:
        import pyarrow.compute as pc

        path = self.location.join(EMBEDDINGS, name)
        with self.location.fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            meta = dict(pf.metadata.metadata or {})
            tracks = [t for t in json.loads(meta[TRACKS_KEY]) if t["track_id"] not in drop]
            if not tracks:
                self.location.delete(EMBEDDINGS, name)
                self._footers.pop(name, None)
                return
            schema = pf.schema_arrow
            ids = pa.array(sorted(drop), pa.string())

            def write(out):
                with pq.ParquetWriter(out, schema, **_writer_options()) as w:
                    for i in range(pf.num_row_groups):
                        t = pf.read_row_group(i)
                        t = t.filter(pc.invert(pc.is_in(t.column("track_id"), ids)))
                        if t.num_rows:
                            w.write_table(t, row_group_size=max(t.num_rows, 1))
                    w.add_key_value_metadata({TRACKS_KEY.decode(): json.dumps(tracks)})

            try:
                self.location.write_atomic(f"{EMBEDDINGS}/{name}", write)
            except OSError as exc:
                raise OutputError(f"cannot write {EMBEDDINGS}/{name} in {self.location.uri}: {exc}") from exc
        self._footers.pop(name, None)


def _short(key: tuple[str, dict, dict], what: str) -> str:
    if what == "backbone":
        return f"backbone {key[0]}"
    if what == "layers":
        return f"layers {key[2]}"
    f = key[1]
    return f"preset {f.get('preset')}, {f.get('n_mels')} mels, {f.get('sample_rate')} Hz, segment {f.get('segment_samples')}"
