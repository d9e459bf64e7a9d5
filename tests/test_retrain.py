"""Scheduled retraining and the model registry, on a real local Ray with real training."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from genrecls.cli import main
from genrecls.jobs.retrain import KEPT, PROMOTED, UNCHANGED, retrain
from genrecls.storage.dataset import Dataset
from genrecls.storage.location import Location
from genrecls.storage.locks import LockedError, folder_lock
from genrecls.storage.registry import Registry, RegistryError, resolve_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def quick_cfg(small_cfg):
    return small_cfg.with_section(train={"epochs": 2, "workers": 1, "batch_size": 16, "early_stopping_patience": 0})


@pytest.fixture
def library(tmp_path, sample_library):
    lib = tmp_path / "lib"
    shutil.copytree(sample_library, lib)
    return lib


def test_retrain_refuses_to_overlap(tmp_path, library, quick_cfg, ray_local):
    reg_dir = str(tmp_path / "registry")
    with folder_lock(Location.parse(reg_dir), "genrecls retrain"):
        with pytest.raises(LockedError, match="in use by genrecls retrain"):
            retrain(str(library), str(tmp_path / "ds"), reg_dir, quick_cfg, progress=False)
        assert main(["retrain", str(library), "--dataset", str(tmp_path / "ds"), "--registry", reg_dir]) == 4
    assert not os.path.exists(tmp_path / "ds")  # the refused run touched nothing


def test_killed_retrain_leaves_registry_unchanged(tmp_path, library, small_cfg, pauses):
    """SIGKILL a retrain while it trains: no version, no champion, nothing visible; a re-run works."""
    reg_dir, ds = tmp_path / "registry", tmp_path / "ds"
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(small_cfg.with_section(train={"epochs": 3, "workers": 1, "early_stopping_patience": 0}).to_json())
    cmd = [sys.executable, "-m", "genrecls", "retrain", str(library), "--dataset", str(ds), "--registry", str(reg_dir),
           "--config", str(cfg_file), "-q"]
    pauses.arm("train-epoch-reported")  # the training worker waits there after its first epoch
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        pauses.wait("train-epoch-reported", proc)  # training certainly runs: kill everything now
        assert [n for n in os.listdir(reg_dir / "versions") if n.startswith(".tmp-")]
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
    assert reg.decisions()[-1]["ray_starts"] == 1  # one Ray for the cycle's ingest and training
    assert not [n for n in os.listdir(reg_dir / "versions") if n.startswith(".tmp-")]


# -- the promotion rule: strictly better, over an existing champion ---------------------------------
def test_the_promotion_rule_is_strict():
    from genrecls.jobs.retrain import is_better

    assert is_better(0.5, None, 0.0)  # no champion yet
    assert not is_better(0.75, 0.75, 0.0)  # a tie keeps the champion
    assert is_better(0.76, 0.75, 0.0)
    assert not is_better(0.80, 0.75, 0.05) and is_better(0.81, 0.75, 0.05)  # the margin is on top


def _constant_version(reg: Registry, tmp_path, features, labels: list[str], version: str) -> None:
    """A hand-made, deliberately useless champion: every segment -> ``labels[-1]`` (see conftest)."""
    from conftest import constant_run

    run = constant_run(tmp_path / f"hand-made-{version}", features, labels)
    reg.add_version(str(run), version, {"model_id": "constant", "metrics": {}, "decision": "hand-made",
                                        "dataset": {"fingerprint": "hand-made", "tracks": 0}})
    reg.promote(version, reason="a deliberately useless champion")


def test_retrain_promotes_a_better_challenger_keeps_a_worse_one_and_leaves_new_labels_out(
        tmp_path, library, quick_cfg, ray_local):
    """Better and worse are certain, without mocks.

    * The champion first is a hand-made constant model: 0.0 on any holdout by construction;
      the trained challenger replaces it.
    * Then the library gains a genre and the next challenger is trained with a learning rate
      of 1e-9 (its random initialisation): the trained champion is kept.  The champion does
      not know the new genre: both are scored on the tracks of the labels both know, and the
      decision says how many were left out.
    """
    from genrecls.audio.sample_data import make_sample_collection
    from genrecls.core.config import FeatureConfig
    from genrecls.storage.split import read_splits

    ds, reg_dir = str(tmp_path / "ds"), str(tmp_path / "registry")
    reg = Registry(reg_dir)
    known = sorted(os.listdir(library))
    features = FeatureConfig(**quick_cfg.to_dict()["features"]).validate()
    _constant_version(reg, tmp_path, features, known + ["zz-no-genre"], "v0001")
    cfg = quick_cfg.with_section(train={"epochs": 3})

    better = retrain(str(library), ds, reg_dir, cfg, progress=False)
    assert better["decision"] == PROMOTED and better["previous_champion"] == "v0001"
    assert better["champion_metrics"]["test_track_accuracy"] == 0.0
    assert better["challenger_metrics"]["test_track_accuracy"] > 0.0
    assert better["champion_metrics"]["holdout_tracks"] == better["challenger_metrics"]["holdout_tracks"] > 0
    assert better["holdout"]["left_out"] == 0
    assert reg.champion() == "v0002" and os.path.isfile(os.path.join(reg_dir, "splits.parquet"))
    assert resolve_run(reg_dir).endswith("versions/v0002")

    again = retrain(str(library), ds, reg_dir, cfg, progress=False)
    assert again["decision"] == UNCHANGED and reg.versions() == ["v0001", "v0002"]
    # nothing changed: the CLI says so with exit code 3
    assert main(["retrain", str(library), "--dataset", ds, "--registry", reg_dir, "--config",
                 _cfg_file(tmp_path, cfg), "-q"]) == 3

    extra = tmp_path / "extra"
    make_sample_collection(str(extra), genres=len(known) + 1, tracks_per_genre=6, seconds=6.0, seed=5)
    new_genre = next(g for g in sorted(os.listdir(extra)) if g not in known)
    shutil.copytree(extra / new_genre, library / new_genre)
    worse = retrain(str(library), ds, reg_dir, cfg.override(["train.learning_rate=1e-9", "train.epochs=1"]),
                    progress=False)
    assert worse["decision"] == KEPT and reg.champion() == "v0002"
    assert reg.versions() == ["v0001", "v0002", "v0003"] and reg.version_info("v0003")["decision"] == KEPT
    assert worse["ingest"]["added"] == 6 and worse["ingest"]["skipped_unchanged"] == 24
    # (a tie would be kept too: the rule is strict)
    assert worse["challenger_metrics"]["test_track_accuracy"] <= worse["champion_metrics"]["test_track_accuracy"]
    assert "promoted only if > champion + 0.0000" in worse["reason"]
    holdout = worse["holdout"]
    # every label has at least one test track (split quotas): the new genre's are left out of both
    assert holdout["left_out"] >= 1 and list(holdout["left_out_per_label"]) == [new_genre]
    assert worse["champion_metrics"]["holdout_tracks"] == worse["challenger_metrics"]["holdout_tracks"] == holdout["tracks"]
    splits = read_splits(os.path.join(reg_dir, "splits.parquet"))
    tracks = Dataset(ds).tracks()
    test_ids = [t for t, s in zip(splits.column("track_id").to_pylist(), splits.column("split").to_pylist())
                if s == "test" and t in tracks]
    assert holdout["tracks"] + holdout["left_out"] == len(test_ids)
    assert holdout["left_out"] == sum(1 for t in test_ids if tracks[t].label == new_genre)
    assert reg.version_info("v0003")["holdout"] == holdout
    assert [d["decision"] for d in reg.decisions()] == [PROMOTED, UNCHANGED, UNCHANGED, KEPT]

    # a registered version records the index version it was trained on, and evaluate re-reads exactly it
    import json

    from genrecls.models.evaluation import evaluate_run

    v2 = reg.version_info("v0002")["dataset"]["version"]
    assert isinstance(v2, int) and v2 < Dataset(ds).version  # the dataset moved on since (6 tracks added)
    again = evaluate_run(reg.version_location("v0002").uri)
    own = json.loads((tmp_path / "registry" / "versions" / "v0002" / "metrics.json").read_text())
    assert again["scope"]["dataset_version"] == v2
    assert (again["test_tracks"], again["test_track_accuracy"]) == (own["test_tracks"], own["test_track_accuracy"])

    # manual promotion and rollback through the CLI
    assert main(["models", "promote", reg_dir, "v0003"]) == 0 and reg.champion() == "v0003"
    assert main(["models", "rollback", reg_dir]) == 0 and reg.champion() == "v0002"
    assert main(["models", "list", reg_dir]) == 0
    with pytest.raises(RegistryError, match="no version"):
        reg.promote("v0042")


def _cfg_file(tmp_path, cfg) -> str:
    path = tmp_path / "cfg.json"
    path.write_text(cfg.to_json())
    return str(path)


def test_promote_and_rollback_take_the_registry_lock(tmp_path, capsys):
    reg_dir = str(tmp_path / "registry")
    with folder_lock(Location.parse(reg_dir), "genrecls retrain"):
        assert main(["models", "promote", reg_dir, "v0001"]) == 4
        assert main(["models", "rollback", reg_dir]) == 4
    err = capsys.readouterr().err
    assert err.count("is in use by genrecls retrain (pid") == 2


def champion_race(reg: Registry, versions: list[str]) -> None:
    """Every version promoted at once by its own thread, bypassing the registry's lock (as a holder whose lease
    expired would): the pointer's compare-and-swap must keep every promotion in the champion's history."""
    import threading

    barrier = threading.Barrier(len(versions))
    errors = []

    def promote(v):
        barrier.wait()
        try:
            reg.set_champion(v, reason=f"race {v}")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(v,)) for v in versions]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    current = reg.location.read_json("champion.json")
    assert sorted([current["version"], *current["previous"]]) == sorted(versions)  # no update lost


def fake_versions(reg: Registry, n: int) -> list[str]:
    versions = [f"v{i:04d}" for i in range(1, n + 1)]
    for v in versions:
        reg.location.write_json(f"versions/{v}/version.json", {"version": v, "dataset": {}})
    return versions


def test_the_champion_swap_loses_no_update_under_a_race(tmp_path):
    from genrecls.storage.registry import ChampionConflict

    reg = Registry(str(tmp_path / "registry"))
    versions = fake_versions(reg, 8)
    champion_race(reg, versions)
    with pytest.raises(ChampionConflict, match="not v0099 as when v0001 was compared"):
        reg.set_champion("v0001", reason="retrain", expected="v0099")
