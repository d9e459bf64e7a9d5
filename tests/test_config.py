"""Configuration: one typed object, validated once, with errors that name the parameter."""

from __future__ import annotations

import json

import pytest

from genrecls.core.config import (
    Config,
    ConfigError,
    FeatureConfig,
    IngestConfig,
    load_config,
)


def test_defaults_are_the_musicnn_model_and_its_preset_and_the_tutorial_preset_is_the_tutorials():
    from genrecls.core.config import feature_preset

    cfg = Config().validate()
    assert cfg.train.model == "musicnn" and cfg.features == feature_preset("musicnn")
    f = feature_preset("tutorial")
    assert (f.sample_rate, f.segment_samples, f.n_fft, f.hop_length, f.n_mels, f.dtype) == (22050, 100_000, 2048, 512, 128, "float16")
    assert f.n_frames == 196 and f.mel_shape == (128, 196)
    assert f.segment_seconds == pytest.approx(100_000 / 22050)
    assert cfg.ingest == IngestConfig()


def test_overrides_parse_values_by_type():
    cfg = Config().override(["features.n_mels=64", "features.fmax=8000", "features.fmax=null",
                             "features.tail=pad", "ingest.strict=yes", "ingest.tracks_per_task=8.0",
                             "features.min_track_seconds=0.25"])
    assert cfg.features.n_mels == 64 and cfg.features.fmax is None and cfg.features.tail == "pad"
    assert cfg.ingest.strict is True and cfg.ingest.tracks_per_task == 8
    assert cfg.features.min_track_seconds == 0.25


@pytest.mark.parametrize("override,message", [
    ("features.sample_rate=500", "features.sample_rate: must be >= 1000"),
    ("features.n_mels=5000", "features.n_mels: must be in"),
    ("features.fmax=20000", "features.fmax: must be in"),
    ("features.fmin=-1", "features.fmin"),
    ("features.hop_length=0", "features.hop_length"),
    ("features.segment_samples=100", "features.segment_samples: must be >= n_fft"),
    ("features.segment_hop=0", "features.segment_hop: must be >= 1"),
    ("features.max_segments_per_track=-1", "features.max_segments_per_track"),
    ("features.tail=keep", "features.tail: 'keep' is not one of"),
    ("features.short_track=skip", "features.short_track"),
    ("features.dtype=float64", "features.dtype"),
    ("features.resample_quality=best", "features.resample_quality"),
    ("features.top_db=0", "features.top_db: must be > 0"),
    ("features.n_mels=3.5", "features.n_mels: expected an integer"),
    ("features.n_mels=many", "features.n_mels: expected an integer"),
    ("ingest.tracks_per_task=0", "ingest.tracks_per_task: must be >= 1"),
    ("ingest.inflight_per_cpu=0", "ingest.inflight_per_cpu"),
    ("ingest.max_task_retries=-1", "ingest.max_task_retries"),
    ("ingest.strict=maybe", "ingest.strict: expected true or false"),
    ("ingest.embeddings=on", "ingest.embeddings: 'on' is not one of"),
    ("train.head_candidates=mean_pool+vibes", "train.head_candidates: unknown layer 'vibes' in 'mean_pool+vibes'"),
    ("train.head_candidates=bands+band_std", "train.head_candidates: 'bands+band_std' names a layer twice"),
    ("train.head_c=[0.1,0]", "train.head_c: must be one or more numbers > 0"),
    ("train.head_max_rows=-1", "train.head_max_rows"),
    ("classify.target_precision=0", "classify.target_precision: must be in (0, 1]"),
    ("classify.min_confidence=1.5", "classify.min_confidence: must be in [0, 1] or null"),
    ("classify.max_genres=0", "classify.max_genres: must be >= 1"),
    ("classify.group_by=artist", "classify.group_by: 'artist' is not one of"),
    ("classify.calibration=isotonic", "classify.calibration: 'isotonic' is not one of"),
    ("classify.uncertain_label= ", "classify.uncertain_label: must not be empty"),
    ("features.colour=blue", "features: unknown key(s) ['colour']"),
    ("sound.n_mels=3", "unknown configuration section 'sound'"),
    ("n_mels=3", "must look like section.key=value"),
    ("features.n_mels", "must look like section.key=value"),
])
def test_bad_values_name_the_parameter(override, message):
    with pytest.raises(ConfigError) as err:
        Config().override([override])
    assert message in str(err.value)


def test_a_config_file_in_toml_or_json_and_the_resolved_config_round_trip(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[features]\nn_mels = 64\nsample_rate = 16000\n\n[ingest]\ntracks_per_task = 4\n')
    cfg = load_config(toml, ["features.hop_length=256"])
    assert (cfg.features.n_mels, cfg.features.sample_rate, cfg.features.hop_length, cfg.ingest.tracks_per_task) == (64, 16000, 256, 4)
    resolved = tmp_path / "config.json"
    resolved.write_text(cfg.to_json())  # what every run writes next to its output
    assert load_config(resolved) == cfg
    assert json.loads(cfg.to_json())["features"]["n_mels"] == 64


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[features\nn_mels = 3")
    with pytest.raises(ConfigError, match="cannot parse configuration file"):
        load_config(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"features": {"n_mels": 0}}))
    with pytest.raises(ConfigError, match="features.n_mels"):
        load_config(wrong)
    with pytest.raises(ConfigError, match="unknown configuration section"):
        Config.from_dict({"feature": {}})
    with pytest.raises(ConfigError, match="must be a mapping"):
        Config.from_dict({"features": [1, 2]})


def test_with_section_updates_and_validates():
    cfg = Config().with_section(features={"n_mels": 32, "n_fft": 512, "hop_length": 256})
    assert cfg.features.mel_shape == (32, 1 + 47_616 // 256) and cfg.features.preset == "custom"
    with pytest.raises(ConfigError, match="features.n_mels"):
        Config().with_section(features={"n_mels": 0})
    assert Config().with_section(features=FeatureConfig(n_mels=16)).features.n_mels == 16


def test_feature_presets_are_complete_and_derived_from_the_values():
    from genrecls.core.config import (
        DEFAULT_PRESET,
        FEATURE_PRESETS,
        FeatureConfig,
        feature_preset,
    )

    assert Config().features.preset == DEFAULT_PRESET
    m = Config().override(["features.dtype=float32", "features.preset=musicnn"])  # preset first, then the others
    assert m.features == feature_preset("musicnn", dtype="float32")
    assert (m.features.sample_rate, m.features.n_mels, m.features.mel_shape, m.features.log_scale) == (16000, 96, (96, 187), "log10_10000")
    assert Config.from_dict({"features": {"preset": "musicnn"}}).features.preset == "musicnn"
    assert Config.from_dict(m.to_dict()).features == m.features  # a resolved config.json round-trips
    assert m.override(["features.preset=tutorial"]).features == feature_preset("tutorial")
    assert m.override(["features.n_mels=64"]).features.preset == "custom"  # changed input: no longer the preset
    assert m.override(["features.segment_hop=24000"]).features.preset == "musicnn"  # overlap keeps the input
    assert FeatureConfig().preset == "tutorial"  # datasets written before presets: the tutorial's values
    assert set(FEATURE_PRESETS) == {"tutorial", "musicnn"}
    with pytest.raises(ConfigError, match="features.preset: unknown preset 'vgg'"):
        Config().override(["features.preset=vgg"])
    with pytest.raises(ConfigError, match="features.log_scale"):
        Config().override(["features.log_scale=ln"])


def test_model_and_retrain_metric_are_checked_against_the_names_that_exist():
    """A typo fails when the configuration loads, naming every valid value (not a KeyError after training)."""
    import numpy as np

    from genrecls.core.config import MODEL_PRESETS as MODELS
    from genrecls.core.config import RETRAIN_METRICS
    from genrecls.models.catalog import MODELS as BUILDERS
    from genrecls.models.evaluation import split_metrics

    assert list(BUILDERS) == list(MODELS)  # the names the configuration accepts are the builders that exist

    with pytest.raises(ConfigError) as err:
        Config().override(["train.model=resnet"])
    assert str(err.value).startswith("train.model: unknown model 'resnet'; known: ")
    assert all(name in str(err.value) for name in MODELS) and "cnn2d" in str(err.value)
    for name in MODELS:
        assert Config().override([f"train.model={name}"]).train.model == name
    with pytest.raises(ConfigError) as err:
        Config().override(["retrain.metric=test_track_acuracy"])
    assert str(err.value).startswith("retrain.metric: unknown metric 'test_track_acuracy'; known: ")
    assert all(name in str(err.value) for name in RETRAIN_METRICS)
    # every name retrain may compare is a number that the holdout's scoring really produces
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], np.float32)
    scores = split_metrics("test", ["a", "b"], ["t1", "t2", "t2"], ["a", "b", "b"], probs)
    for name in RETRAIN_METRICS:
        assert isinstance(scores[name], float), name
        assert Config().override([f"retrain.metric={name}"]).retrain.metric == name
    with pytest.raises(ConfigError, match="train.shuffle"):
        Config().override(["train.shuffle=random"])
    with pytest.raises(ConfigError, match="train.threads: must be >= 0"):
        Config().override(["train.threads=-1"])


def test_head_layer_names_are_the_backbones():
    """What train.head_candidates accepts is what genrecls.models.engine's backbone gives."""
    from genrecls.core.config import HEAD_LAYERS, head_candidate_layers
    from genrecls.models.engine import BACKBONE_OUTPUTS

    assert HEAD_LAYERS == BACKBONE_OUTPUTS
    assert head_candidate_layers("penultimate+mean_pool+bands") == ("penultimate", "mean_pool", "band_mean", "band_std")
    cfg = Config().override(["train.head_candidates=taggram, mean_pool+bands", "train.head_c=0.5"])
    assert cfg.train.head_candidates == ("taggram", "mean_pool+bands") and cfg.train.head_c == (0.5,)
    assert Config.from_dict(json.loads(cfg.to_json())) == cfg  # lists in a config file or a run's config.json
