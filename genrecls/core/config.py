"""One typed configuration for every genrecls step.

The configuration is a tree of frozen dataclasses.  It can be loaded from a TOML or
JSON file, overridden from the command line with ``section.key=value`` pairs, and is
written (resolved) next to every output so that a result can be reproduced from its
folder alone.

Examples
--------
>>> cfg = Config().override(["features.n_mels=64", "train.epochs=3"])
>>> cfg.features.n_mels, cfg.train.epochs
(64, 3)
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "ConfigError",
    "HEAD_LAYERS",
    "HEAD_LAYER_GROUPS",
    "DEFAULT_HEAD_CANDIDATES",
    "DEFAULT_HEAD_C",
    "head_candidate_layers",
    "FeatureConfig",
    "DecodeConfig",
    "FEATURE_PRESETS",
    "MODEL_PRESETS",
    "DEFAULT_PRESET",
    "feature_preset",
    "IngestConfig",
    "TrainConfig",
    "ClassifyConfig",
    "InferenceConfig",
    "ENGINES",
    "PRECISIONS",
    "RetrainConfig",
    "Config",
    "load_config",
]


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


#: Named feature recipes.  Each is a complete model input: the values below are what a
#: model trained on it expects, so a dataset, a run and a classification agree on them.
#:
#: ``tutorial``: the tutorial genrecls starts from: 22050 Hz, 100000-sample cuts (about
#: 4.5 s), 128 Slaney mel bands of a 2048-point STFT with hop 512, in dB
#: (``librosa.power_to_db(S, ref=1.0, top_db=80)``).  Input of ``tutorial``, ``default``,
#: ``cnn2d`` and ``linear``.
#:
#: ``musicnn``: the recipe of the pretrained MSD musicnn tagger (Pons and Serra 2019):
#: 16 kHz, 512-point STFT, hop 256, 96 Slaney mel bands, ``log10(10000 * power + 1)`` (in
#: float32; the original casts to float16 first, which overflows under NumPy 2), 187-frame
#: patches.  A centred STFT gives ``1 + samples // hop`` frames, so 187 frames are
#: 186 * 256 = 47616 samples (2.976 s; 47616..47871 all give 187).  Segments do not
#: overlap (hop = length): the original extractor's default, and half the backbone cost of
#: 50 % overlap per track, whose patches are nearly the same audio.  Input of ``musicnn``.
FEATURE_PRESETS: dict[str, dict[str, Any]] = {
    "tutorial": {"sample_rate": 22050, "segment_samples": 100_000, "segment_hop": 100_000, "n_fft": 2048,
                 "hop_length": 512, "n_mels": 128, "fmin": 0.0, "fmax": None, "log_scale": "db", "top_db": 80.0},
    "musicnn": {"sample_rate": 16000, "segment_samples": 47_616, "segment_hop": 47_616, "n_fft": 512,
                "hop_length": 256, "n_mels": 96, "fmin": 0.0, "fmax": None, "log_scale": "log10_10000", "top_db": None},
}
#: what ``retrain.metric`` may name: the holdout's scalar scores (genrecls.models.evaluation.split_metrics on the
#: "test" group; higher is better for every one)
RETRAIN_METRICS = ("test_track_accuracy", "test_track_macro_f1", "test_macro_f1", "test_segment_accuracy",
                   "test_segment_macro_f1")
#: the models by name (``train.model``) and the feature preset each needs (None: any log-mel
#: input); their builders are :data:`genrecls.models.catalog.MODELS` (a test checks both agree)
MODEL_PRESETS: dict[str, str | None] = {"tutorial": None, "default": None, "cnn2d": None, "linear": None,
                                        "musicnn": "musicnn"}
#: the runtimes a network may run on where it is not trained (genrecls.models.engine), and the precisions
#: ("auto": the fastest the processor runs natively, e.g. bf16 with AMX/AVX-512; "fp32": full precision)
ENGINES = ("auto", "openvino", "onnxruntime", "tensorflow")
PRECISIONS = ("auto", "fp32")
#: train.shuffle's values ("local": the former name of "shards")
SHUFFLE_MODES = ("auto", "shards", "files", "global", "local")
#: the preset `genrecls ingest` writes when none is asked for: the input of train's default model
#: (musicnn, chosen on measurement: bench/results/train.json)
DEFAULT_PRESET = "musicnn"
#: the pretrained backbone's outputs a frozen-backbone head may be fit on, and their widths
#: (genrecls.models.engine.BACKBONE_OUTPUTS; a test checks both agree): the 50 tags, the
#: penultimate dense layer, the max and mean over time of the 753 mid-end features, and the mean
#: and standard deviation over time of each of the 96 input bands
HEAD_LAYERS: dict[str, int] = {"taggram": 50, "penultimate": 200, "max_pool": 753, "mean_pool": 753,
                               "band_mean": 96, "band_std": 96}
#: names that stand for several layers in a head candidate
HEAD_LAYER_GROUPS: dict[str, tuple[str, ...]] = {"bands": ("band_mean", "band_std")}
#: the embeddings a frozen-backbone head is chosen from on validation tracks (train.head_candidates): each a
#: layer or "+"-joined layers (issue 20: no one embedding is right for every library)
DEFAULT_HEAD_CANDIDATES = ("taggram", "bands", "penultimate", "penultimate+bands", "mean_pool", "max_pool",
                           "mean_pool+bands", "penultimate+mean_pool+bands", "mean_pool+max_pool")
#: inverse L2 strengths tried for the linear head (scikit-learn's C: smaller is stronger)
DEFAULT_HEAD_C = (0.01, 0.1, 1.0)


def head_candidate_layers(candidate: str) -> tuple[str, ...]:
    """The backbone layers of a head candidate, in order (``"mean_pool+bands"`` -> mean_pool, band_mean, band_std).

    Raises :class:`ConfigError` for an unknown name or a layer given twice.
    """
    layers: list[str] = []
    for part in str(candidate).split("+"):
        part = part.strip()
        if part in HEAD_LAYER_GROUPS:
            layers.extend(HEAD_LAYER_GROUPS[part])
        elif part in HEAD_LAYERS:
            layers.append(part)
        else:
            raise ConfigError(f"train.head_candidates: unknown layer {part!r} in {candidate!r}; known: "
                              f"{', '.join([*HEAD_LAYERS, *HEAD_LAYER_GROUPS])}")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"train.head_candidates: {candidate!r} names a layer twice")
    return tuple(layers)


#: the values that define a preset's model input (segment_hop only changes how many segments a track gives)
_RECIPE_KEYS = ("sample_rate", "segment_samples", "n_fft", "hop_length", "n_mels", "fmin", "fmax", "log_scale", "top_db")


@dataclass(frozen=True)
class FeatureConfig:
    """How audio becomes a log-mel spectrogram segment.

    The field defaults are the ``tutorial`` preset (the values of datasets written before
    presets existed); :func:`feature_preset` gives a preset's values, and the default
    configuration (``Config().features``) is :data:`DEFAULT_PRESET`.  ``preset`` is derived
    from the values: the name of the preset they match, or ``custom``.  To choose a preset,
    set ``features.preset`` in a configuration file or with ``--set``: every value of the
    preset is applied first, then the other ``features.*`` values given.
    """

    #: the preset these values match ("tutorial", "musicnn") or "custom"; derived, see the class docstring
    preset: str = "tutorial"
    sample_rate: int = 22050
    segment_samples: int = 100_000
    #: distance between segment starts in samples; equal to segment_samples means no overlap
    segment_hop: int = 100_000
    #: 0 means no cap on the number of segments taken from one track
    max_segments_per_track: int = 0
    #: what to do with the last, partial segment of a track
    tail: Literal["drop", "pad"] = "drop"
    #: a track shorter than one segment is padded with silence or recorded as too short
    short_track: Literal["pad", "fail"] = "pad"
    #: a track shorter than this (seconds) is recorded as too short, whatever `short_track` says
    min_track_seconds: float = 1.0
    n_fft: int = 2048
    hop_length: int = 512
    n_mels: int = 128
    fmin: float = 0.0
    fmax: float | None = None
    #: how mel power is compressed: "db" (10 log10(max(S, 1e-10)), floored top_db below the
    #: segment's peak) or "log10_10000" (log10(10000 S + 1), musicnn's; top_db is not used)
    log_scale: Literal["db", "log10_10000"] = "db"
    #: dB floor relative to the segment's peak (librosa.power_to_db's top_db); None disables it
    top_db: float | None = 80.0
    #: storage type of the spectrogram values in the Parquet shards
    dtype: Literal["float16", "float32"] = "float16"
    #: soxr quality used to resample to `sample_rate`
    resample_quality: Literal["HQ", "VHQ", "MQ", "LQ", "QQ"] = "HQ"

    def __post_init__(self) -> None:
        object.__setattr__(self, "preset", self.matching_preset())

    def matching_preset(self) -> str:
        """The name of the preset whose model input these values are, or ``custom``."""
        for name, values in FEATURE_PRESETS.items():
            keys = [k for k in _RECIPE_KEYS if not (k == "top_db" and values["log_scale"] != "db")]
            if all(getattr(self, k) == values[k] for k in keys):
                return name
        return "custom"

    def validate(self) -> "FeatureConfig":
        _check(self.sample_rate >= 1000, "features.sample_rate", "must be >= 1000 Hz")
        _check(self.segment_samples >= self.n_fft, "features.segment_samples", f"must be >= n_fft ({self.n_fft})")
        _check(self.segment_hop >= 1, "features.segment_hop", "must be >= 1")
        _check(self.max_segments_per_track >= 0, "features.max_segments_per_track", "must be >= 0 (0 = no cap)")
        _check(self.tail in ("drop", "pad"), "features.tail", "must be 'drop' or 'pad'")
        _check(self.short_track in ("pad", "fail"), "features.short_track", "must be 'pad' or 'fail'")
        _check(self.min_track_seconds >= 0, "features.min_track_seconds", "must be >= 0")
        _check(self.n_fft >= 16, "features.n_fft", "must be >= 16")
        _check(1 <= self.hop_length <= self.n_fft, "features.hop_length", "must be in [1, n_fft]")
        _check(1 <= self.n_mels <= self.n_fft // 2 + 1, "features.n_mels", "must be in [1, n_fft/2+1]")
        nyq = self.sample_rate / 2
        _check(0 <= self.fmin < nyq, "features.fmin", f"must be in [0, {nyq})")
        _check(self.fmax is None or self.fmin < self.fmax <= nyq, "features.fmax", f"must be in (fmin, {nyq}]")
        _check(self.top_db is None or self.top_db > 0, "features.top_db", "must be > 0 or null")
        _check(self.log_scale in ("db", "log10_10000"), "features.log_scale", "must be 'db' or 'log10_10000'")
        _check(self.dtype in ("float16", "float32"), "features.dtype", "must be 'float16' or 'float32'")
        _check(self.resample_quality in ("HQ", "VHQ", "MQ", "LQ", "QQ"), "features.resample_quality", "must be one of HQ, VHQ, MQ, LQ, QQ")
        return self

    @property
    def n_frames(self) -> int:
        """Frames per segment (librosa's centred STFT: 1 + segment_samples // hop_length)."""
        return 1 + self.segment_samples // self.hop_length

    @property
    def mel_shape(self) -> tuple[int, int]:
        """Shape of one stored spectrogram: (n_mels, n_frames)."""
        return (self.n_mels, self.n_frames)

    @property
    def segment_seconds(self) -> float:
        return self.segment_samples / self.sample_rate


def feature_preset(name: str, **overrides: Any) -> FeatureConfig:
    """A preset's feature configuration, with optional other values (e.g. ``dtype``, ``segment_hop``)."""
    if name not in FEATURE_PRESETS:
        raise ConfigError(f"features.preset: unknown preset {name!r}; known: {sorted(FEATURE_PRESETS)} (or 'custom')")
    return FeatureConfig(**{**FEATURE_PRESETS[name], **overrides}).validate()


def _features_from_dict(data: dict[str, Any]) -> dict[str, Any]:
    """A features section with its preset expanded: the preset's values, then the values given.

    No preset (or ``custom``) starts from :data:`DEFAULT_PRESET`.  The derived ``preset``
    key itself is dropped (the values decide it).
    """
    data = dict(data)
    name = data.pop("preset", None)
    if name in (None, "custom"):
        name = DEFAULT_PRESET
    if name not in FEATURE_PRESETS:
        raise ConfigError(f"features.preset: unknown preset {name!r}; known: {sorted(FEATURE_PRESETS)} (or 'custom')")
    return {**FEATURE_PRESETS[name], **data}


@dataclass(frozen=True)
class DecodeConfig:
    """How files are decoded, by ingest and classify alike (the same rules in both)."""

    #: a stream that ends before the length its header declares: keep its audio (with a warning) or fail the file
    on_truncated: Literal["keep", "fail"] = "keep"
    #: each file's decoding deadline is timeout_seconds + timeout_seconds_per_mb x its size in MB: a
    #: decode still running then is stopped and the file recorded as timed_out (decoding runs at
    #: 100s of MB a minute, so the default never stops a healthy file)
    timeout_seconds: float = 60.0
    timeout_seconds_per_mb: float = 10.0
    #: a decoding stuck in native code, which the in-task deadline cannot interrupt, is stopped by a
    #: watchdog (its worker process ends) once it runs past twice its deadline plus this margin;
    #: the file is recorded as timed_out and the rest of its batch goes on
    watchdog_margin_seconds: float = 60.0

    def validate(self) -> "DecodeConfig":
        _check(self.on_truncated in ("keep", "fail"), "decode.on_truncated", "must be 'keep' or 'fail'")
        _check(self.timeout_seconds > 0, "decode.timeout_seconds", "must be > 0")
        _check(self.timeout_seconds_per_mb >= 0, "decode.timeout_seconds_per_mb", "must be >= 0")
        _check(self.watchdog_margin_seconds >= 0, "decode.watchdog_margin_seconds", "must be >= 0")
        return self

    def deadline_seconds(self, size_bytes: int) -> float:
        """Seconds a file of ``size_bytes`` may take to decode."""
        return self.timeout_seconds + self.timeout_seconds_per_mb * size_bytes / 1e6

    def watchdog_seconds(self, sizes: list[int]) -> float:
        """Seconds files of these sizes may take together before a watchdog stops their process.

        Twice the sum of their decoding deadlines plus ``watchdog_margin_seconds``: a healthy
        decoding never comes near it (ingest's driver applies it to a whole task, which may
        also wait for another to finish; classify's decoding tasks to each file).
        """
        return self.watchdog_margin_seconds + 2.0 * sum(self.deadline_seconds(s) for s in sizes)


@dataclass(frozen=True)
class IngestConfig:
    """How the ingest job schedules work."""

    #: tracks per Ray task (and so per shard at most); small enough to spread work, large enough to amortise start-up
    tracks_per_task: int = 32
    #: tasks in flight per worker CPU; bounds driver memory whatever the library size
    inflight_per_cpu: int = 2
    #: a run on this machine (no cluster) whose files total at most this many MB runs in the
    #: command's own process, without starting Ray: its start-up costs more than two cores save
    #: on so little (0 = always use Ray)
    in_process_mb: float = 32.0
    #: Ray retries of a task whose worker process died
    max_task_retries: int = 3
    #: skip files whose failure is recorded and which have not changed since
    retry_failed: bool = False
    #: any failed track makes the run exit non-zero
    strict: bool = False
    #: the embedding store (DATASET/embeddings/): "auto" computes every segment's pretrained-backbone embeddings
    #: (every candidate layer) when the dataset's preset feeds the backbone (musicnn), so that training a
    #: frozen-backbone head runs no backbone pass; "off" never computes them.  The runtime and precision
    #: are [inference]'s
    embeddings: Literal["auto", "off"] = "auto"
    #: where a track's label comes from: "folders" (SOURCE/<label>/**, or a manifest's label column) or "tags" (the
    #: genre a person wrote in the file's tags, through the vocabulary ingest.labels; genres genrecls wrote are not a
    #: person's); a track with none is ingested all the same, unlabelled (stored, never trained on)
    labels_from: Literal["folders", "tags"] = "folders"
    #: with labels_from = "tags": the vocabulary file (TOML: genres, aliases, drop, unlisted) that maps tag texts to
    #: labels; null: every tag text is a label, spellings that normalise alike merged (the summary lists them)
    labels: str | None = None

    def validate(self) -> "IngestConfig":
        _check(self.tracks_per_task >= 1, "ingest.tracks_per_task", "must be >= 1")
        _check(self.inflight_per_cpu >= 1, "ingest.inflight_per_cpu", "must be >= 1")
        _check(self.in_process_mb >= 0, "ingest.in_process_mb", "must be >= 0 (0 = always use Ray)")
        _check(self.max_task_retries >= 0, "ingest.max_task_retries", "must be >= 0")
        _check(self.embeddings in ("auto", "off"), "ingest.embeddings", "must be 'auto' or 'off'")
        _check(self.labels_from in ("folders", "tags"), "ingest.labels_from", "must be 'folders' or 'tags'")
        _check(self.labels is None or bool(str(self.labels).strip()), "ingest.labels",
               "must name a vocabulary file or be null")
        return self


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained (``model`` is checked against :data:`MODEL_PRESETS`)."""

    #: musicnn (pretrained backbone + trained head; the most accurate on real music, bench/results/train.json),
    #: default (1-D CNN), cnn2d, tutorial, linear (pooled log-mel statistics); musicnn needs the musicnn preset
    model: str = "musicnn"
    #: musicnn only: train the whole pretrained network too (every epoch runs the backbone), not just a
    #: new head on embeddings computed once
    fine_tune: bool = False
    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 1e-3
    workers: int = 1
    gpu: bool = False
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    #: which tracks stay together on one side of the split and in one cross-validation fold: "album" (its album
    #: artist and album tags, or folder and album tag), "album_artist" (its album-artist tag, else its album), or
    #: "track"; a track without the tags is its own unit (genrecls.storage.split.album_group)
    group_by: Literal["album", "album_artist", "track"] = "album"
    #: optional column of the shards (e.g. artist) or "folder" whose groups stay on one side of the split; when
    #: set, it replaces group_by
    group_column: str | None = None
    class_weights: bool = True
    #: every training track weighs the same in the loss, whatever its length (a track's segments
    #: share its weight); with class_weights every label weighs the same too
    track_weights: bool = True
    early_stopping_patience: int = 6
    augment: bool = True
    shuffle_buffer: int = 2048
    max_failures: int = 2
    #: segment order each epoch when the split streams from the shards (train.cache off): "shards"
    #: (the shards' order shuffled every epoch, then each worker's shuffle buffer), "files" (the shards
    #: in file order, then the buffer), "global" (Ray Data random_shuffle of every row, every epoch:
    #: the best mix, the most costly), "auto" ("shards").  A cached split is shuffled row by row
    #: once, when it is cached, whatever this says.  "local" is the former name of "shards"
    shuffle: Literal["auto", "shards", "files", "global", "local"] = "auto"
    #: Ray CPUs reserved per training worker (0 = auto: leave one CPU of the cluster to Ray Data)
    cpus_per_worker: float = 0.0
    #: TensorFlow threads per training worker (0 = the node's cores shared by the workers on it)
    threads: int = 0
    #: keep the decoded train/val segments in Ray's object store after the first read ("auto": when
    #: they take under a quarter of it); "off" re-reads the Parquet shards every epoch
    cache: Literal["auto", "on", "off"] = "auto"
    #: frozen musicnn backbone: the embeddings the linear head is chosen from on validation tracks ("+" joins
    #: layers; "bands" = band_mean + band_std); see DEFAULT_HEAD_CANDIDATES
    head_candidates: tuple[str, ...] = DEFAULT_HEAD_CANDIDATES
    #: frozen musicnn backbone: the head's inverse L2 strengths tried (scikit-learn's C), chosen on validation tracks
    head_c: tuple[float, ...] = DEFAULT_HEAD_C
    #: frozen musicnn backbone: after the choice, fit the head again on training AND validation tracks (test
    #: tracks stay untouched)
    refit: bool = True
    #: frozen musicnn backbone: cross-validation folds of the training + validation tracks on which every choice is
    #: made (head, C, K, calibration, thresholds); fewer when even the largest label has fewer tracks (albums)
    cv_folds: int = 5
    #: a label with fewer labelled tracks than this is left out of training (named, with its count, in the plan and
    #: the report), or, with too_few = "refuse", the run stops before anything starts, naming it
    min_tracks_per_label: int = 1
    too_few: Literal["leave_out", "refuse"] = "leave_out"
    #: frozen musicnn backbone: the cross-validation's cheap first round fits each track on at most this many evenly
    #: spaced segments (its weight kept), and only the cv_finalists best (embedding, C) pairs are cross-validated again on
    #: every segment; 0: every pair on every segment (about 4x the time)
    cv_screen_segments: int = 8
    cv_finalists: int = 4
    #: frozen musicnn backbone: at most this many segments of a split go into the head's fit (each track then
    #: gives evenly spaced segments, all tracks alike; 0 = every segment): bounds the driver's memory
    head_max_rows: int = 100_000

    def validate(self) -> "TrainConfig":
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.learning_rate > 0, "train.learning_rate", "must be > 0")
        _check(self.workers >= 1, "train.workers", "must be >= 1")
        _check(0 < self.val_fraction < 1 and 0 < self.test_fraction < 1, "train.val_fraction/test_fraction", "must be in (0, 1)")
        _check(self.val_fraction + self.test_fraction < 1, "train.val_fraction + test_fraction", "must be < 1")
        _check(self.early_stopping_patience >= 0, "train.early_stopping_patience", "must be >= 0")
        _check(self.max_failures >= 0, "train.max_failures", "must be >= 0")
        _check(self.shuffle in SHUFFLE_MODES, "train.shuffle", f"must be one of {', '.join(map(repr, SHUFFLE_MODES))}")
        _check(self.cpus_per_worker >= 0, "train.cpus_per_worker", "must be >= 0 (0 = auto)")
        _check(self.threads >= 0, "train.threads", "must be >= 0 (0 = auto)")
        _check(self.cache in ("auto", "on", "off"), "train.cache", "must be 'auto', 'on' or 'off'")
        _check(self.shuffle_buffer >= 0, "train.shuffle_buffer", "must be >= 0")
        _check(self.model in MODEL_PRESETS, "train.model", f"unknown model {self.model!r}; known: {', '.join(MODEL_PRESETS)}")
        _check(len(self.head_candidates) >= 1, "train.head_candidates", "must name at least one embedding")
        _check(len(set(self.head_candidates)) == len(self.head_candidates), "train.head_candidates", "names a candidate twice")
        for candidate in self.head_candidates:
            head_candidate_layers(candidate)
        _check(len(self.head_c) >= 1 and all(c > 0 for c in self.head_c), "train.head_c", "must be one or more numbers > 0")
        _check(self.head_max_rows >= 0, "train.head_max_rows", "must be >= 0 (0 = every segment)")
        _check(self.group_by in ("album", "album_artist", "track"), "train.group_by",
               "must be 'album', 'album_artist' or 'track'")
        _check(2 <= self.cv_folds <= 20, "train.cv_folds", "must be in [2, 20]")
        _check(self.min_tracks_per_label >= 1, "train.min_tracks_per_label", "must be >= 1")
        _check(self.too_few in ("leave_out", "refuse"), "train.too_few", "must be 'leave_out' or 'refuse'")
        _check(self.cv_screen_segments >= 0, "train.cv_screen_segments", "must be >= 0 (0 = no first round)")
        _check(self.cv_finalists >= 1, "train.cv_finalists", "must be >= 1")
        return self


#: classify.max_segments for runs that did not choose one (trained before the choice was recorded)
FALLBACK_MAX_SEGMENTS = 10


@dataclass(frozen=True)
class ClassifyConfig:
    """How a library is classified."""

    #: score at most this many evenly spaced segments per track (0 = all; -1 = the K the run chose on its
    #: validation tracks, run.json "classify", else FALLBACK_MAX_SEGMENTS).  Fewer segments cost less on
    #: long tracks (a 10-min track costs ~1/11 of featurising it whole at K=10)
    max_segments: int = -1
    top_k: int = 3
    #: segments per model call
    batch_size: int = 256
    #: tracks per Ray task (small runs are spread over every CPU: genrecls.core.scheduling.task_bounds)
    tracks_per_task: int = 8
    #: model actors.  0 (default): on CPU none: each Ray task runs the whole chain for its tracks (decode,
    #: log-mel, the backbone on the inference engine, the head), one task per CPU of the cluster, so the backbone
    #: (several times decoding's cost per segment with the default musicnn model) runs on every CPU; with --gpu
    #: one actor per GPU.  N > 0: N long-lived model actors of actor_cpus CPUs each, fed by decoding tasks
    #: (bench/results/classify-width.json measures both)
    actors: int = 0
    gpu: bool = False
    #: CPUs reserved by each model actor (with --gpu or classify.actors > 0; Ray logical CPUs, also its engine
    #: threads, at least 1).  0 lets the actors share the decoding tasks' CPUs
    actor_cpus: float = 0.0
    #: a run on this machine (no cluster) whose files to decode total at most this many MB runs in the command's
    #: own process, without starting Ray (the nightly run of a few new files); 0 = always use Ray
    in_process_mb: float = 32.0
    #: a dataset (folder or URI) whose embedding store scores the library's tracks it holds, unchanged, with no
    #: decoding and no backbone (--dataset); null: every track is computed
    dataset: str | None = None
    #: tracks per output part written
    part_rows: int = 5000
    #: retry files whose failure is recorded even if unchanged
    retry_failed: bool = False
    strict: bool = False
    # -- the answers (genrecls.models.answers): every threshold is chosen on validation tracks --
    #: the user's genre vocabulary, a TOML file (genrecls.models.vocabulary): genre, genres and parent_genres
    #: in its words.  Set when training (train, retrain), the file is copied into the run and its thresholds are
    #: chosen in its words; classify then uses the run's copy unless this names another file ("none": the
    #: model's own labels)
    labels: str | None = None
    #: how a run's track scores become probabilities, fitted on its validation tracks: "temperature" or "none"
    calibration: Literal["temperature", "none"] = "temperature"
    #: the 'uncertain' threshold is the lowest confidence at which the validation tracks it keeps reach this precision
    target_precision: float = 0.9
    #: the 'uncertain' threshold set by hand (a calibrated probability; 0 = never uncertain); null: from target_precision
    min_confidence: float | None = None
    #: when no threshold shows classify.target_precision on the run's out-of-fold (or validation) tracks: false keeps
    #: the threshold of best estimated precision and says so; true answers 'uncertain' for every track (answers only
    #: at a shown precision)
    strict_precision: bool = False
    #: the genre of a track below the threshold (top_genre and the probabilities still say what the model thought)
    uncertain_label: str = "uncertain"
    #: at most this many genres in the genres column, best first
    max_genres: int = 3
    #: independent tags (--model musicnn-tags): a tag or genre is listed when its probability reaches this, unless the
    #: vocabulary gives it a threshold; a track whose best genre does not reach its threshold is uncertain
    tag_threshold: float = 0.2
    #: one genre per album (album_genre: the mean of its tracks' calibrated probabilities): "album" (the album and
    #: album-artist tags, else the folder), "folder", or "none"
    group_by: Literal["none", "album", "folder"] = "none"

    def validate(self) -> "ClassifyConfig":
        _check(self.max_segments >= -1, "classify.max_segments", "must be >= -1 (0 = all, -1 = the run's choice)")
        _check(self.top_k >= 1, "classify.top_k", "must be >= 1")
        _check(self.batch_size >= 1, "classify.batch_size", "must be >= 1")
        _check(self.tracks_per_task >= 1, "classify.tracks_per_task", "must be >= 1")
        _check(self.actors >= 0, "classify.actors", "must be >= 0")
        _check(self.actor_cpus >= 0, "classify.actor_cpus", "must be >= 0")
        _check(self.in_process_mb >= 0, "classify.in_process_mb", "must be >= 0 (0 = always use Ray)")
        _check(self.dataset is None or bool(str(self.dataset).strip()), "classify.dataset",
               "must name a dataset folder or URI, or be null")
        _check(self.part_rows >= 1, "classify.part_rows", "must be >= 1")
        _check(self.calibration in ("temperature", "none"), "classify.calibration", "must be 'temperature' or 'none'")
        _check(0 < self.target_precision <= 1, "classify.target_precision", "must be in (0, 1]")
        _check(self.min_confidence is None or 0 <= self.min_confidence <= 1, "classify.min_confidence",
               "must be in [0, 1] or null (chosen for classify.target_precision)")
        _check(bool(self.uncertain_label.strip()), "classify.uncertain_label", "must not be empty")
        _check(self.max_genres >= 1, "classify.max_genres", "must be >= 1")
        _check(0 <= self.tag_threshold <= 1, "classify.tag_threshold", "must be in [0, 1]")
        _check(self.group_by in ("none", "album", "folder"), "classify.group_by", "must be 'none', 'album' or 'folder'")
        _check(self.labels is None or bool(str(self.labels).strip()), "classify.labels",
               "must name a vocabulary file, 'none', or be null")
        return self


@dataclass(frozen=True)
class InferenceConfig:
    """Where a network runs without training: ingest's embeddings, classify, the tagger, evaluation."""

    #: "auto": OpenVINO, else ONNX Runtime, else TensorFlow (the first that loads and gives finite outputs;
    #: a named runtime that fails falls back to TensorFlow); the runtime used is recorded next to every output
    engine: str = "auto"
    #: "auto": the fastest precision the processor runs natively (bf16 on CPUs with AMX or AVX-512 BF16:
    #: the top genre agreed on every track measured, bench/results/engine.json); "fp32": full precision
    precision: str = "auto"

    def validate(self) -> "InferenceConfig":
        _check(self.engine in ENGINES, "inference.engine", f"must be one of {', '.join(map(repr, ENGINES))}")
        _check(self.precision in PRECISIONS, "inference.precision", f"must be one of {', '.join(map(repr, PRECISIONS))}")
        return self


@dataclass(frozen=True)
class RetrainConfig:
    """When a challenger replaces the champion."""

    #: the challenger must beat the champion's holdout track accuracy by at least this much
    min_improvement: float = 0.0
    metric: str = "test_track_accuracy"
    #: after its ingest, a cycle compacts the dataset (genrecls compact) when it has at least this many small
    #: shards (under half compact_segments segments); 0 never
    compact_shards: int = 256
    compact_segments: int = 8192

    def validate(self) -> "RetrainConfig":
        _check(-1 <= self.min_improvement <= 1, "retrain.min_improvement", "must be in [-1, 1]")
        _check(self.compact_shards >= 0, "retrain.compact_shards", "must be >= 0 (0: never compact)")
        _check(self.compact_segments >= 2, "retrain.compact_segments", "must be >= 2")
        _check(self.metric in RETRAIN_METRICS, "retrain.metric",
               f"unknown metric {self.metric!r}; known: {', '.join(RETRAIN_METRICS)}")
        return self


@dataclass(frozen=True)
class Config:
    features: FeatureConfig = field(default_factory=lambda: feature_preset(DEFAULT_PRESET))
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)

    def validate(self) -> "Config":
        for f in fields(self):
            getattr(self, f.name).validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        if not isinstance(data, dict):
            raise ConfigError("configuration must be a mapping of sections")
        sections = {f.name: f for f in fields(cls)}
        unknown = set(data) - set(sections)
        if unknown:
            raise ConfigError(f"unknown configuration section(s) {sorted(unknown)}; known: {sorted(sections)}")
        kwargs = {}
        hints = typing.get_type_hints(cls)
        for name in sections:
            kwargs[name] = _section_from_dict(hints[name], data.get(name, {}) or {}, name)
        return cls(**kwargs).validate()

    def override(self, pairs: list[str] | None) -> "Config":
        """Return a copy with ``section.key=value`` overrides applied (values parsed as JSON when they can be)."""
        data = self.to_dict()
        presets = [p for p in pairs or [] if p.split("=", 1)[0].strip() == "features.preset"]
        if presets:  # a preset replaces every feature value; the other features.* pairs then apply
            data["features"] = {"preset": _parse_value(presets[-1].split("=", 1)[1])}
        for pair in pairs or []:
            if "=" not in pair or "." not in pair.split("=", 1)[0]:
                raise ConfigError(f"override {pair!r} must look like section.key=value")
            key, raw = pair.split("=", 1)
            section, name = key.strip().split(".", 1)
            if section not in data:
                raise ConfigError(f"unknown configuration section {section!r} in {pair!r}; known: {sorted(data)}")
            data[section][name] = _parse_value(raw)
        return Config.from_dict(data)

    def with_section(self, **sections: Any) -> "Config":
        """Return a copy with whole sections or ``section={key: value}`` updates."""
        cfg = self
        for name, value in sections.items():
            current = getattr(cfg, name)
            if isinstance(value, dict):
                base = {} if "preset" in value else dataclasses.asdict(current)
                value = _section_from_dict(type(current), {**base, **value}, name)
            cfg = replace(cfg, **{name: value})
        return cfg.validate()


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _section_from_dict(cls: type, data: dict[str, Any], section: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{section}: must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    if cls is FeatureConfig:
        data = _features_from_dict(data)
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"{section}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        values[name] = _coerce(value, hints[name], f"{section}.{name}")
    return cls(**values)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or (origin is not None and type(None) in args):
        if value is None or value == "null":
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}: {value!r} is not one of {list(args)}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
        if as_float != int(as_float):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return int(as_float)
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if isinstance(value, str):  # --set train.head_c=0.1 or a comma-separated list
            value = [v for v in value.split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(v.strip() if isinstance(v, str) else v, args[0], name) for v in value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a configuration from TOML or JSON (or the defaults) and apply overrides.

    A file may hold any subset of the sections; missing values keep their defaults.
    A resolved ``config.json`` written by an earlier run is a valid input.
    """
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"configuration file {p} does not exist")
        text = p.read_text()
        try:
            data = tomllib.loads(text) if p.suffix.lower() == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot parse configuration file {p}: {exc}") from None
        cfg = Config.from_dict(data)
    return cfg.override(overrides).validate()
