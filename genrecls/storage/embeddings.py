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
``fingerprint``, ``n_segments``).  The store's index is the dataset's (:mod:`genrecls.storage.index`):
each track's row names the part that holds its embeddings and what computed them
(``embedding_*`` columns), committed with the track or later (an ingest that embeds stored
segments); a part is never rewritten, and an entry of a changed or pruned track leaves with the
track's row.  The same schema keys are in each part's metadata, so a part read alone says what
it holds.

Nothing here knows a model: the layers and their widths, the backbone's id and the engine's
description are given by the caller (:mod:`genrecls.jobs.ingest`, :mod:`genrecls.jobs.training`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from genrecls.core.config import FeatureConfig
from genrecls.storage.dataset import (
    BACKBONE_KEY,
    ENGINE_KEY,
    FEATURES_KEY,
    LAYERS_KEY,
    DatasetError,
    PartWriter,
)
from genrecls.storage.location import Location

if TYPE_CHECKING:
    from genrecls.storage.dataset import Dataset
    from genrecls.storage.index import StoredEmbedding

__all__ = ["EMBEDDINGS", "EmbeddingStoreError", "EmbeddingEntry", "EmbeddingWriter", "EmbeddingStore",
           "embedding_schema", "layer_array", "stored_embedding"]

#: the store's folder in a dataset
EMBEDDINGS = "embeddings"
STORE_VERSION = 1
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
    """A dataset's embedding store (``DATASET/embeddings/``): its parts, and its index (the dataset's index's
    ``embedding_*`` columns: which part holds each track's rows, and what computed them).

    ``EmbeddingStore(dataset)`` reads the index of the :class:`~genrecls.storage.dataset.Dataset` given
    (the same version, read once for both), or of the newest version for a location.
    """

    def __init__(self, dataset: "Dataset | Location | str"):
        from genrecls.storage.dataset import Dataset

        self.dataset = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
        self.location = self.dataset.location

    @property
    def uri(self) -> str:
        return self.location.child(EMBEDDINGS).uri

    # -- the store's index ----------------------------------------------------------------
    def _stored(self) -> pa.Table:
        rows = self.dataset.rows()
        return rows.filter(pc.is_valid(rows.column("embedding_part"))) if rows.num_rows else rows

    def part_names(self) -> list[str]:
        """The parts this version of the dataset references (sorted)."""
        stored = self._stored()
        return sorted(pc.unique(stored.column("embedding_part")).to_pylist()) if stored.num_rows else []

    def part_paths(self, names: Iterable[str] | None = None) -> list[str]:
        return [self.location.join(EMBEDDINGS, n) for n in (self.part_names() if names is None else names)]

    def exists(self) -> bool:
        return bool(self._stored().num_rows)

    def describe(self) -> dict[str, Any] | None:
        """What the store holds: ``backbone``, ``features``, ``layers`` (name -> width), ``engines`` (every
        distinct description of what computed it), ``parts``, ``tracks`` and ``segments``; None when empty.

        Raises :class:`EmbeddingStoreError` when its entries disagree on the backbone, the feature
        configuration or the layers (naming two parts that differ): they are never mixed.
        """
        stored = self._stored()
        if not stored.num_rows:
            return None
        cols = {c: stored.column(f"embedding_{c}").to_pylist() for c in ("part", "backbone", "features", "layers", "engine")}
        first = None
        engines: list[dict[str, Any]] = []
        seen: set[tuple[str, str, str]] = set()
        for part, backbone, features, layers, engine in zip(*cols.values()):
            raw = (backbone, features, layers)
            if raw in seen and first is not None:
                continue
            seen.add(raw)
            key = (backbone, json.loads(features), json.loads(layers))
            if first is None:
                first = (part, key)
            elif key != first[1]:
                what = ("backbone" if key[0] != first[1][0] else "feature configuration" if key[1] != first[1][1]
                        else "layers")
                raise EmbeddingStoreError(
                    f"{self.uri} mixes two {what}s: {first[0]} ({_short(first[1], what)}) and {part} "
                    f"({_short(key, what)}); embeddings of different backbones or features are never mixed: "
                    f"delete {self.uri} and run genrecls ingest again to compute them anew")
        for raw in dict.fromkeys(cols["engine"]):
            engine = json.loads(raw or "{}")
            if engine and engine not in engines:
                engines.append(engine)
        backbone, features, layers = first[1]
        return {"backbone": backbone, "features": features, "layers": layers, "engines": engines,
                "dtype": "float16", "parts": len(set(cols["part"])), "tracks": stored.num_rows,
                "segments": int(pc.sum(stored.column("n_segments")).as_py() or 0)}

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
        """Every track's entry (one per track: the index keeps the one that serves it)."""
        stored = self._stored()
        cols = [stored.column(c).to_pylist() for c in ("track_id", "fingerprint", "n_segments", "embedding_part")]
        return [EmbeddingEntry(*vals) for vals in zip(*cols)]

    def index(self) -> dict[str, EmbeddingEntry]:
        """track_id -> its entry."""
        return {e.track_id: e for e in self.entries()}

    def valid_for(self, tracks: Mapping[str, tuple[str, int]]) -> dict[str, EmbeddingEntry]:
        """The entries that serve the given tracks (track_id -> (fingerprint, n_segments)): those with the
        track's fingerprint and number of segments."""
        out: dict[str, EmbeddingEntry] = {}
        for e in self.entries():
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
    def reconcile(self, live: Mapping[str, tuple[str, int]] | None = None) -> dict[str, int]:
        """Remove temporary files a killed writer left (local disks).  Nothing else is needed: the index
        holds one entry per track, the one that serves it, and an entry of a changed or pruned track leaves
        with its row.  Returns counts of what it did."""
        return {"temporaries_removed": self.location.remove_temporaries(EMBEDDINGS), "parts_rewritten": 0,
                "entries_dropped": 0}


def stored_embedding(part: str, backbone: str, features: FeatureConfig | Mapping[str, Any], layers: Mapping[str, int],
                     engine: Mapping[str, Any] | None) -> "StoredEmbedding":
    """The index's record of a track embedded into ``part`` (see :class:`~genrecls.storage.index.StoredEmbedding`)."""
    from genrecls.storage.index import StoredEmbedding

    return StoredEmbedding(part=part, backbone=str(backbone), features=json.dumps(_features_json(features), sort_keys=True),
                           layers=json.dumps({k: int(v) for k, v in layers.items()}),
                           engine=json.dumps(dict(engine or {}), sort_keys=True, default=str))


def _short(key: tuple[str, dict, dict], what: str) -> str:
    if what == "backbone":
        return f"backbone {key[0]}"
    if what == "layers":
        return f"layers {key[2]}"
    f = key[1]
    return f"preset {f.get('preset')}, {f.get('n_mels')} mels, {f.get('sample_rate')} Hz, segment {f.get('segment_samples')}"
