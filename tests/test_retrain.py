"""Scheduled retraining and the model registry, on a real local Ray with real training."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from genrecls.cli import main
from genrecls.registry import Registry, RegistryError, resolve_run
from genrecls.retrain import KEPT, PROMOTED, UNCHANGED, retrain
from genrecls.storage import LockedError, Location

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def quick_cfg(small_cfg):
    return small_cfg.with_section(train={"epochs": 2, "workers": 1, "batch_size": 16, "early_stopping_patience": 0})


@pytest.fixture
def library(tmp_path, sample_library):
    lib = tmp_path / "lib"
    shutil.copytree(sample_library, lib)
    return lib


def test_retrain_promotes_first_then_unchanged_then_keeps(tmp_path, library, quick_cfg, ray_local):
    from genrecls.sample_data import make_sample_collection

    ds, reg_dir = str(tmp_path / "ds"), str(tmp_path / "registry")
    first = retrain(str(library), ds, reg_dir, quick_cfg, progress=False)
    assert first["decision"] == PROMOTED and first["champion"] == "v0001"
    reg = Registry(reg_dir)
    assert reg.champion() == "v0001"
    info = reg.version_info("v0001")
    assert info["dataset"]["tracks"] == 24 and "test_track_accuracy" in info["metrics"]
    assert os.path.isfile(os.path.join(reg_dir, "splits.parquet"))
    assert resolve_run(reg_dir).endswith("versions/v0001")

    again = retrain(str(library), ds, reg_dir, quick_cfg, progress=False)
    assert again["decision"] == UNCHANGED and reg.versions() == ["v0001"]

    # 10% more tracks: the challenger is trained; an impossible margin keeps the champion
    extra = tmp_path / "extra"
    make_sample_collection(str(extra), genres=4, tracks_per_genre=1, seconds=6.0, seed=7)
    for genre in os.listdir(extra):
        for f in os.listdir(extra / genre):
            shutil.copy(extra / genre / f, library / genre / f"new_{f}")
    kept = retrain(str(library), ds, reg_dir, quick_cfg.override(["retrain.min_improvement=1.0"]), progress=False)
    assert kept["decision"] == KEPT
    assert kept["ingest"]["added"] == 4 and kept["ingest"]["skipped_unchanged"] == 24
    assert reg.champion() == "v0001" and reg.versions() == ["v0001", "v0002"]
    # both were scored on the same holdout
    assert kept["champion_metrics"]["holdout_tracks"] == kept["challenger_metrics"]["holdout_tracks"] > 0
    assert reg.version_info("v0002")["decision"] == KEPT
    assert [d["decision"] for d in reg.decisions()] == [PROMOTED, UNCHANGED, KEPT]

    # manual promotion and rollback through the CLI
    assert main(["models", "promote", reg_dir, "v0002"]) == 0 and reg.champion() == "v0002"
    assert main(["models", "rollback", reg_dir]) == 0 and reg.champion() == "v0001"
    assert main(["models", "list", reg_dir]) == 0
    with pytest.raises(RegistryError, match="no version"):
        reg.promote("v0042")


def test_retrain_refuses_to_overlap(tmp_path, library, quick_cfg, ray_local):
    reg_dir = str(tmp_path / "registry")
    with Location.parse(reg_dir).lock("genrecls retrain"):
        with pytest.raises(LockedError, match="in use by genrecls retrain"):
            retrain(str(library), str(tmp_path / "ds"), reg_dir, quick_cfg, progress=False)
        assert main(["retrain", str(library), "--dataset", str(tmp_path / "ds"), "--registry", reg_dir]) == 4
    assert not os.path.exists(tmp_path / "ds")  # the refused run touched nothing


def test_killed_retrain_leaves_registry_unchanged(tmp_path, library, small_cfg):
    """SIGKILL a retrain while it trains: no version, no champion, nothing visible; a re-run works."""
    reg_dir, ds = tmp_path / "registry", tmp_path / "ds"
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(small_cfg.with_section(train={"epochs": 30, "workers": 1, "early_stopping_patience": 0}).to_json())
    cmd = [sys.executable, "-m", "genrecls", "retrain", str(library), "--dataset", str(ds), "--registry", str(reg_dir),
           "--config", str(cfg_file), "--workers", "2", "-q"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        # wait until training has started (a temporary version folder exists), then kill everything
        while time.time() < deadline:
            versions = reg_dir / "versions"
            if versions.exists() and any(n.startswith(".tmp-") for n in os.listdir(versions)):
                time.sleep(3)
                break
            assert proc.poll() is None, "retrain ended before it could be killed"
            time.sleep(0.5)
        else:
            pytest.fail("training never started")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    reg = Registry(str(reg_dir))
    assert reg.versions() == [] and reg.champion() is None and reg.decisions() == []
    # the next run cleans up and finishes
    cfg_file.write_text(small_cfg.with_section(train={"epochs": 1, "workers": 1}).to_json())
    done = subprocess.run(cmd, cwd=REPO,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert reg.champion() == "v0001"
    assert not [n for n in os.listdir(reg_dir / "versions") if n.startswith(".tmp-")]
