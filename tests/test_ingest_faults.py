"""Faults during an ingest (issue 6), each on a real local Ray.

* a Ray worker process is killed while ingest tasks run: the dataset equals an undisturbed run's;
* the ingest driver (the CLI) is killed with SIGKILL half-way: the same command, run again,
  ends with exactly the undisturbed run's rows and no temporary file;
* two ingests start on the same output at once: one proceeds, the other stops (exit 2);
* the output folder is read-only, or its disk fills up: a clear error, no corrupt shard.

The undisturbed run is the session's ``sample_dataset``; rows are compared by content
(track_id, segment_index, path, label, start, the mel bytes), not by shard layout.
The CLI runs join the session's Ray (``--address``) so that no test pays a second Ray start.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from genrecls.jobs.ingest import ingest
from genrecls.storage.dataset import Dataset, OutputError


def content(out) -> list[tuple]:
    """The rows of the dataset's newest version, by content (readers go through the index)."""
    t = Dataset(str(out)).read_segments()
    mel = t.column("mel")
    return sorted((r["track_id"], r["segment_index"], r["path"], r["label"], r["start_seconds"],
                   hashlib.sha1(mel[i].values.to_numpy(zero_copy_only=False).tobytes()).hexdigest())
                  for i, r in enumerate(t.drop(["mel"]).to_pylist()))


def temporaries(out) -> list[str]:
    return [n for folder in ("shards", "failures") if os.path.isdir(os.path.join(out, folder))
            for n in os.listdir(os.path.join(out, folder)) if n.startswith(".tmp-")]


def task_processes() -> list[psutil.Process]:
    """Ray worker processes of this test session's Ray that are running an ingest task now."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.cmdline()[:1] and p.cmdline()[0].startswith("ray::process_batch"):
                found.append(p)
        except psutil.Error:
            pass
    return found


def cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "genrecls", "ingest", *args]


@pytest.fixture
def cluster_args(ray_local, small_cfg, tmp_path):
    """CLI flags: the small features, one or two tracks per task (many tasks), the session's Ray."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text(small_cfg.with_section(ingest={"tracks_per_task": 1}).to_json())
    address = ray_local.get_runtime_context().gcs_address
    return ["--config", str(cfg), "--address", address, "-q"]


def test_a_killed_worker_changes_nothing(sample_library, sample_dataset, small_cfg, ray_local, tmp_path, pauses):
    out = tmp_path / "ds"
    cfg = small_cfg.with_section(ingest={"tracks_per_task": 2})
    done: dict = {}
    pauses.arm("ingest-task")  # the first task to start waits there: its worker is certainly running it
    run = threading.Thread(target=lambda: done.update(s=ingest(str(sample_library), str(out), cfg, progress=False)))
    run.start()
    pid = pauses.wait("ingest-task", run.is_alive)
    assert pid != os.getpid(), "the ingest ran in the test process, not in a Ray task"
    assert psutil.Process(pid).cmdline()[0].startswith("ray::process_batch")
    os.kill(pid, signal.SIGKILL)  # SIGKILL a worker in the middle of an ingest task
    run.join(timeout=300)
    assert done["s"].failed == 0 and done["s"].added == 24
    assert content(out) == content(sample_dataset)
    assert not temporaries(out)


def test_a_killed_driver_then_the_same_command_gives_the_undisturbed_rows(sample_library, sample_dataset, cluster_args, tmp_path, pauses):
    out = tmp_path / "ds"
    args = cli([str(sample_library), "--out", str(out), *cluster_args])
    pauses.arm("ingest-shard-written")  # the driver waits there once its first shard is complete
    driver = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert pauses.wait("ingest-shard-written", driver) == driver.pid
    driver.send_signal(signal.SIGKILL)  # half-way: at the first complete shard
    driver.wait()
    # Ray stops the dead driver's tasks; wait until none runs any more
    while task_processes():
        time.sleep(0.1)
    # what readers see meanwhile: complete shards only (temporaries are hidden and not *.parquet)
    partial = Dataset(str(out))  # the committed versions: each whole
    assert 0 < len(partial.tracks()) < 24
    for e in partial.track_entries():
        assert pq.read_metadata(out / "shards" / e.shard).num_rows >= e.n_segments
    seen = partial.read_segments(columns=["track_id"]).column("track_id").to_pylist()
    assert {t: seen.count(t) for t in set(seen)} == {t: e.n_segments for t, e in partial.tracks().items()}
    # (shards the killed run wrote after its last commit are in no version: their rows are not in `seen`)
    assert all(n.endswith(".parquet") and not n.startswith(".") for n in pads.dataset(
        str(out / "shards"), format="parquet").files for n in [os.path.basename(n)])
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert content(out) == content(sample_dataset)
    assert not temporaries(out)
    assert Dataset(str(out)).manifest()["counts"]["tracks"] == 24


def test_two_ingests_on_the_same_output(sample_library, sample_dataset, cluster_args, tmp_path, pauses):
    """A holds the lock (at the pause point right after taking it); B, started then, exits 4; A finishes."""
    out = tmp_path / "ds"
    args = cli([str(sample_library), "--out", str(out), *cluster_args])
    pauses.arm("ingest-locked")
    a = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid = pauses.wait("ingest-locked", a)
    try:
        b = subprocess.run(args, capture_output=True, text=True, timeout=300)
    finally:
        pauses.release("ingest-locked", pid)
    out_a, err_a = a.communicate(timeout=300)
    assert (a.returncode, b.returncode) == (0, 4), (err_a[-2000:], b.stderr[-2000:])  # 4: locked
    assert f"is in use by genrecls ingest (pid {a.pid}" in b.stderr and "wait for it to finish" in b.stderr
    assert content(out) == content(sample_dataset)
    assert not temporaries(out)


def _mount_tmpfs(path, options: str) -> None:
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); "
                    "the full-disk and read-only cases need one")


def _umount(path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_read_only_output_is_a_clear_error(sample_library, small_cfg, ray_local, tmp_path, capsys):
    from genrecls.cli import main

    out = tmp_path / "ro"
    if os.geteuid() == 0:
        _mount_tmpfs(out, "ro,size=1m")  # root writes through permissions: a read-only mount it cannot
    else:
        os.makedirs(out)
        os.chmod(out, 0o555)
    try:
        with pytest.raises(OutputError, match="cannot write the dataset at .*(Read-only|Permission denied)"):
            ingest(str(sample_library), str(out / "ds"), small_cfg, progress=False)
        cfg = tmp_path / "cfg.json"
        cfg.write_text(small_cfg.to_json())
        assert main(["ingest", str(sample_library), "--out", str(out), "--config", str(cfg), "-q"]) == 2
        assert "error: cannot write the dataset" in capsys.readouterr().err
        assert os.listdir(out) == []
    finally:
        if os.geteuid() == 0:
            _umount(out)
        else:
            os.chmod(out, 0o755)


def test_a_full_disk_is_a_clear_error_and_leaves_no_corrupt_shard(sample_library, small_cfg, ray_local, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a small tmpfs, which needs root")
    out = tmp_path / "full"
    _mount_tmpfs(out, "size=96k")
    try:
        with pytest.raises(OutputError, match="No space left on device"):
            ingest(str(sample_library), str(out), small_cfg, progress=False)
        assert not temporaries(out)
        ds = Dataset(str(out))
        for name in ds.shard_names():  # whatever was committed is whole
            meta = pq.read_metadata(out / "shards" / name)
            assert meta.num_rows == sum(t["n_segments"] for t in json.loads(meta.metadata[b"genrecls.tracks"]))
    finally:
        _umount(out)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_ends_the_run_with_one_line_and_the_same_command_resumes(sig, sample_library, sample_dataset,
                                                                               small_cfg, tmp_path, pauses):
    """Ctrl-C or SIGTERM to the CLI (its own embedded Ray, as a user runs it): one line, no C++ dumps, resumable."""
    out = tmp_path / "ds"
    cfg = tmp_path / "cfg.json"
    # in_process_mb 0: an embedded Ray even for this small library (the path whose core worker printed C++ dumps)
    cfg.write_text(small_cfg.with_section(ingest={"tracks_per_task": 1, "in_process_mb": 0}).to_json())
    args = cli([str(sample_library), "--out", str(out), "--config", str(cfg), "--workers", "1", "-q"])
    pauses.arm("ingest-shard-written")  # the driver waits there once its first shard is complete
    driver = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert pauses.wait("ingest-shard-written", driver) == driver.pid
    driver.send_signal(sig)
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 128 + sig, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines == [lines[-1]], stderr[-3000:]  # one line, nothing else (no stack dump, no traceback)
    assert lines[-1].startswith(f"genrecls ingest: stopped by {signal.Signals(sig).name}: ")
    assert "kept in" in lines[-1] and "run the same command again to resume" in lines[-1]
    kept = Dataset(str(out))
    assert 0 < len(kept.tracks()) < 24 and not temporaries(out)
    assert kept.manifest()["counts"]["tracks"] == len(kept.tracks())  # the manifest matches the shards
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert content(out) == content(sample_dataset)


def test_a_small_run_on_this_machine_skips_ray_and_gives_the_same_rows(sample_library, sample_dataset, small_cfg,
                                                                        tmp_path):
    """Under ingest.in_process_mb (the sample library is ~12 MB) no Ray starts: same shards' rows, far less start-up."""
    out = tmp_path / "ds"
    cfg = tmp_path / "cfg.json"
    cfg.write_text(small_cfg.to_json())
    code = ("import sys; from genrecls.cli import main; rc = main(sys.argv[1:]); "
            "assert 'ray' not in sys.modules, 'Ray was imported'; sys.exit(rc)")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code, "ingest", str(sample_library), "--out", str(out),
                           "--config", str(cfg), "-q"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert content(out) == content(sample_dataset)
    assert Dataset(str(out)).manifest()["counts"]["tracks"] == 24
