"""The musicnn port: outputs against the original network, preprocessing against librosa, packaging.

``tests/data/musicnn_reference.npz`` holds log-mel patches of generated audio and the outputs
of the ORIGINAL musicnn 0.1.0 TF1 graph on them (made by ``tools/make_musicnn_reference.py``,
which imports nothing of genrecls).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from genrecls.models import musicnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "tests", "data", "musicnn_reference.npz")


def _reference_tool():
    spec = importlib.util.spec_from_file_location(
        "make_musicnn_reference", os.path.join(ROOT, "tools", "make_musicnn_reference.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def reference():
    with np.load(REFERENCE, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def model():
    return musicnn.load_musicnn()


def test_port_matches_original_network(model, reference):
    out = musicnn.predict(model, reference["patches"], batch_size=1)
    assert set(out) == {"taggram", "penultimate", "max_pool", "mean_pool"}
    assert out["taggram"].shape == (2, 50) and out["taggram"].dtype == np.float32
    assert out["penultimate"].shape == (2, 200)
    assert out["max_pool"].shape == out["mean_pool"].shape == (2, 753)
    for key in ("taggram", "penultimate"):
        diff = np.abs(out[key] - reference[key]).max()
        assert diff <= 1e-4, f"{key}: max abs difference {diff}"
    # the pooled mid-end features reach ~120: compare them relative to their size
    for key in ("max_pool", "mean_pool"):
        np.testing.assert_allclose(out[key], reference[key], rtol=1e-5, atol=1e-4, err_msg=key)
    # the reference is not trivial: the two patches get different tags
    assert np.abs(reference["taggram"][0] - reference["taggram"][1]).max() > 0.05


def test_batched_and_any_length_inputs_agree(model, reference):
    batched = musicnn.predict(model, reference["patches"], batch_size=64)
    flexible = musicnn.predict(musicnn.load_musicnn(n_frames=None), reference["patches"])
    single = musicnn.predict(model, reference["patches"][1:], batch_size=1)
    for key in ("taggram", "penultimate"):
        assert np.abs(batched[key] - reference[key]).max() <= 1e-4
        assert np.abs(flexible[key] - reference[key]).max() <= 1e-4
        assert np.abs(single[key][0] - reference[key][1]).max() <= 1e-4
    empty = musicnn.predict(model, np.zeros((0, 187, 96), np.float32))
    assert empty["taggram"].shape == (0, 50) and empty["penultimate"].shape == (0, 200)


def test_preprocessing_reproduces_the_reference_input(reference):
    """The fixture's patches came from the original recipe on tools' synthetic signal."""
    audio = _reference_tool().synthetic_signal()
    patches = musicnn.musicnn_log_mel(audio)
    assert patches.shape == (2, 187, 96) and patches.dtype == np.float32
    assert np.abs(patches - reference["patches"]).max() <= 1e-4


def test_preprocessing_matches_plain_librosa():
    import librosa

    rng = np.random.default_rng(3)
    t = np.arange(16000 * 7) / 16000  # 438 frames: 2 patches
    audio = (0.5 * np.sin(2 * np.pi * 330 * t) * (1 + np.sin(2 * np.pi * 2 * t))
             + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    f = musicnn.MUSICNN_FEATURES
    mel = librosa.feature.melspectrogram(
        y=audio, sr=f["sample_rate"], n_fft=f["n_fft"], hop_length=f["hop_length"], n_mels=f["n_mels"],
        fmin=f["fmin"], fmax=f["fmax"], window=f["window"], center=f["center"], pad_mode=f["pad_mode"],
        power=f["power"], htk=f["htk"], norm=f["mel_norm"]).T
    expected = np.log10(f["log_multiplier"] * mel.astype(np.float64) + 1)

    frames = musicnn.log_mel_frames(audio)
    assert frames.shape == expected.shape == (1 + audio.size // 256, 96)
    assert mel.max() > 7  # loud enough that the original's float16 cast would overflow to inf
    assert np.isfinite(frames).all()
    assert np.abs(frames - expected).max() <= 1e-4

    patches = musicnn.musicnn_log_mel(audio)
    assert patches.shape == (1 + (frames.shape[0] - 187) // 187, 187, 96)
    np.testing.assert_array_equal(patches[1], frames[187:374])
    overlapping = musicnn.musicnn_log_mel(audio, hop_frames=93)
    np.testing.assert_array_equal(overlapping[1], frames[93:280])

    # a standalone segment of patch_samples samples has exactly one patch's frames
    seg = audio[: f["patch_samples"]]
    assert musicnn.log_mel_frames(seg).shape == (f["patch_frames"], 96)
    # another rate is resampled to 16 kHz first
    assert musicnn.log_mel_frames(np.zeros(22050 * 2, np.float32), sample_rate=22050).shape == (126, 96)


def test_short_and_bad_audio():
    short = np.full(16000, 0.1, np.float32)  # 1 s: 63 frames
    assert musicnn.musicnn_log_mel(short).shape == (0, 187, 96)
    padded = musicnn.musicnn_log_mel(short, pad_short=True)
    assert padded.shape == (1, 187, 96)
    np.testing.assert_array_equal(padded[0, 63:126], padded[0, :63])
    assert musicnn.musicnn_log_mel(np.zeros(0, np.float32), pad_short=True).shape == (0, 187, 96)
    with pytest.raises(ValueError, match="1-D"):
        musicnn.musicnn_log_mel(np.zeros((2, 16000), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        musicnn.musicnn_log_mel(np.array([0.0, np.nan] * 30000, np.float32))
    with pytest.raises(ValueError, match="floating"):
        musicnn.musicnn_log_mel(np.zeros(60000, np.int16))
    with pytest.raises(ValueError, match="hop_frames"):
        musicnn.musicnn_log_mel(np.zeros(60000, np.float32), hop_frames=0)


def test_tags_and_top_tags():
    assert len(musicnn.MSD_TAGS) == len(set(musicnn.MSD_TAGS)) == 50
    assert len(musicnn.MTT_TAGS) == len(set(musicnn.MTT_TAGS)) == 50
    assert musicnn.MSD_TAGS[:3] == ("rock", "pop", "alternative") and musicnn.MSD_TAGS[-1] == "happy"
    taggram = np.zeros((3, 50), np.float32)
    taggram[:, 9] = [0.9, 0.6, 0.9]  # jazz: mean 0.8
    taggram[0, 0] = 0.9  # rock once: mean 0.3
    assert musicnn.top_tags(taggram, 2) == [("jazz", pytest.approx(0.8)), ("rock", pytest.approx(0.3))]
    assert musicnn.top_tags(taggram[1], 1) == [("jazz", pytest.approx(0.6))]
    with pytest.raises(ValueError, match="taggram"):
        musicnn.top_tags(np.zeros(40), 3)
    with pytest.raises(ValueError, match="k must"):
        musicnn.top_tags(np.zeros(50), 0)


def test_weights_ship_inside_the_installed_package(tmp_path):
    """`pip install .` (not editable) installs the weights and the licence; they load from there."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "genrecls"), src / "genrecls",
                    ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("genrecls-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "genrecls/weights/msd_musicnn.npz" in names and "genrecls/weights/LICENSE-musicnn" in names
    target = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(target), str(wheel)], check=True)
    probe = ("import numpy as np, genrecls.models.musicnn as m; p = m.weights_path(); "
             "f = np.load(p); print(p); print(len([k for k in f.files if not k.startswith('meta/')]))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, env=env,
                         cwd=tmp_path).stdout.split()
    assert out[0] == str(target / "genrecls" / "weights" / "msd_musicnn.npz")
    assert int(out[1]) == 64  # 11 BN x 4 + 10 conv/dense x 2 arrays
    notice = (target / "genrecls" / "weights" / "LICENSE-musicnn").read_text()
    assert "ISC licence" in notice and "Permission to use, copy, modify" in notice


def test_weights_file_fits_the_model_strictly(model, tmp_path):
    with np.load(musicnn.weights_path(), allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    assert sum(v.size for k, v in arrays.items() if not k.startswith("meta/")) == model.count_params() == 792079
    assert all(v.dtype == np.float32 for k, v in arrays.items() if not k.startswith("meta/"))
    broken = dict(arrays)
    broken["logits/kernel"] = broken["logits/kernel"][:, :40]
    np.savez(tmp_path / "bad.npz", **broken)
    with pytest.raises(ValueError, match="logits/kernel"):
        musicnn.load_weights(musicnn.build_musicnn(), tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="variant"):
        musicnn.weights_path("GTZAN_musicnn")
