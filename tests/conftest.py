"""Shared fixtures: a real local Ray (2 CPUs), generated audio libraries, an ingested dataset.

Nothing here mocks Ray, TensorFlow or the file system: fixtures write real audio files
with soundfile and run the real ingest on a real local Ray.
"""

from __future__ import annotations

import os

import pytest

from genrecls.runtime import quiet_environment

quiet_environment()

#: CPUs the test Ray may use (CI machines have 2 cores)
TEST_CPUS = int(os.environ.get("GENRECLS_TEST_CPUS", "2"))


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray for the whole session, limited to TEST_CPUS CPUs."""
    import ray

    from genrecls.runtime import runtime_env

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=TEST_CPUS, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR", runtime_env=runtime_env())
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_cfg():
    """Short segments so tests run fast: 1 s segments at 8 kHz, 32 mels (a custom preset), the 1-D CNN model."""
    from genrecls.config import Config

    return Config().with_section(features={
        "preset": "tutorial", "sample_rate": 8000, "segment_samples": 8000, "segment_hop": 8000, "n_fft": 512,
        "hop_length": 256, "n_mels": 32, "min_track_seconds": 0.5,
    }, train={"model": "default"})


@pytest.fixture(scope="session")
def sample_library(tmp_path_factory):
    """4 genres x 6 tracks of 6 s, rotating MP3/WAV/FLAC/OGG, 44.1 kHz stereo."""
    from genrecls.sample_data import make_sample_collection

    root = tmp_path_factory.mktemp("library")
    make_sample_collection(str(root), genres=4, tracks_per_genre=6, seconds=6.0, seed=1)
    return root


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory, sample_library, small_cfg, ray_local):
    """The sample library ingested with ``small_cfg`` (read-only: copy it before changing it)."""
    from genrecls.ingest import ingest

    out = tmp_path_factory.mktemp("dataset") / "ds"
    summary = ingest(str(sample_library), str(out), small_cfg, progress=False)
    assert summary.failed == 0, summary
    return out
