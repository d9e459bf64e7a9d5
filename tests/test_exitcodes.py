"""Every exit code of the one table (genrecls/exitcodes.py, docs/usage.md), from a real command."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from genrecls.cli import main
from genrecls.core.exitcodes import TABLE, ExitCode
from genrecls.storage.location import Location
from genrecls.storage.locks import folder_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_table_is_the_documented_table():
    doc = open(os.path.join(REPO, "docs", "usage.md")).read()
    for code, meaning in TABLE.items():
        assert f"| {int(code)} | {meaning} |" in doc, code
    assert set(TABLE) == set(ExitCode)


def test_0_success_and_2_bad_input(sample_dataset, tmp_path, capsys):
    assert main(["inspect", str(sample_dataset)]) == ExitCode.OK == 0
    assert main(["inspect", str(tmp_path / "nowhere")]) == ExitCode.USAGE == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("genrecls inspect: error:"), err


def test_1_failures_under_strict(tmp_path, small_cfg, ray_local, capsys):
    from genrecls.audio.sample_data import make_sample_collection

    lib = tmp_path / "lib"
    make_sample_collection(str(lib), genres=1, tracks_per_genre=1, seconds=2.0, formats=("wav",))
    genre = os.listdir(lib)[0]
    (lib / genre / "broken.mp3").write_bytes(b"not audio at all" * 100)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(small_cfg.to_json())
    argv = ["ingest", str(lib), "--out", str(tmp_path / "ds"), "--config", str(cfg), "-q"]
    assert main(argv + ["--strict"]) == ExitCode.FAILURES == 1
    assert "--strict: 1 file(s) failed" in capsys.readouterr().err


@pytest.fixture
def constant_registry(tmp_path, sample_library, sample_dataset, small_cfg):
    """A dataset copy and a registry whose champion (hand-made) was 'trained' on exactly it."""
    from conftest import constant_run

    from genrecls.core.config import FeatureConfig
    from genrecls.jobs.retrain import dataset_snapshot
    from genrecls.storage.dataset import Dataset
    from genrecls.storage.registry import Registry

    ds = tmp_path / "ds"
    shutil.copytree(sample_dataset, ds)
    features = FeatureConfig(**small_cfg.to_dict()["features"]).validate()
    run = constant_run(tmp_path / "run", features, sorted(os.listdir(sample_library)))
    reg = Registry(str(tmp_path / "registry"))
    # add_version moves the folder it is given: keep ``run`` for classify
    reg.add_version(str(shutil.copytree(run, tmp_path / "run-for-registry")), "v0001", {"model_id": "constant", "metrics": {}, "dataset": dataset_snapshot(Dataset(str(ds)))})
    reg.promote("v0001")
    return ds, reg, run


def test_3_retrain_kept_the_champion(constant_registry, sample_library, small_cfg, tmp_path, ray_local):
    ds, reg, _ = constant_registry
    cfg = tmp_path / "cfg.json"
    cfg.write_text(small_cfg.to_json())
    assert main(["retrain", str(sample_library), "--dataset", str(ds), "--registry", reg.uri, "--config", str(cfg),
                 "-q"]) == ExitCode.KEPT == 3
    assert reg.decisions()[-1]["decision"] == "unchanged"


def test_4_locked_from_every_command(constant_registry, sample_library, small_cfg, tmp_path, ray_local, capsys):
    ds, reg, run = constant_registry
    cfg = tmp_path / "cfg.json"
    cfg.write_text(small_cfg.to_json())
    common = ["--config", str(cfg), "-q"]
    for target, argv in [
        (str(ds), ["ingest", str(sample_library), "--out", str(ds), *common]),
        (str(tmp_path / "run2"), ["train", str(ds), "--out", str(tmp_path / "run2"), *common]),
        (str(tmp_path / "preds"), ["classify", str(sample_library), "--model", str(run), "--out",
                                   str(tmp_path / "preds"), *common]),
        (reg.uri, ["retrain", str(sample_library), "--dataset", str(ds), "--registry", reg.uri, *common]),
        (reg.uri, ["models", "promote", reg.uri, "v0001"]),
        (reg.uri, ["models", "rollback", reg.uri]),
    ]:
        with folder_lock(Location.parse(target), "genrecls test holder"):
            assert main(argv) == ExitCode.LOCKED == 4, argv
        err = capsys.readouterr().err
        assert f"locked: {Location.parse(target).uri} is in use by genrecls test holder (pid {os.getpid()}" in err, err


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, ExitCode.INTERRUPTED), (signal.SIGTERM, ExitCode.TERMINATED)],
                         ids=["130-SIGINT", "143-SIGTERM"])
def test_130_and_143_stopped(tmp_path, sig, code):
    out = tmp_path / "lib"
    proc = subprocess.Popen([sys.executable, "-m", "genrecls", "sample-data", str(out), "--genres", "2",
                             "--tracks-per-genre", "200", "--seconds", "5"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out.is_dir() and any(files for _, _, files in os.walk(out))):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "sample-data wrote nothing"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code == 128 + sig, err[-2000:]
    assert f"stopped by {signal.Signals(sig).name}" in err and "run the same command again to resume" in err