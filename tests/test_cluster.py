"""genrecls on a cluster (issue 5) and its safety rules (issue 6).

* ``cluster.yaml`` and ``cluster-local.yaml`` pass Ray's own cluster-config schema (the
  checks ``ray up`` runs before it touches a cloud) and keep the dashboard on loopback.
* A real two-node Ray on this machine, started like a real one: ``ray start --head`` plus
  ``ray start --address`` (dashboard on 127.0.0.1, token authentication with a token of the
  test's own).  Ingest runs on it from a separate driver process and its tasks demonstrably
  run on both nodes; training runs on it; ``jobs/ingest.py`` is submitted with
  ``ray job submit`` and reaches SUCCEEDED with its shards on a ``file://`` URI.
* No code execution from data: the package source never loads pickles.

The Ray processes of these tests run in process groups of their own with a dedicated
``--temp-dir``; the test process never connects to them (the session's ``ray_local`` may
live in this process) and teardown signals exactly those groups, never ``ray stop`` (which
stops every Ray on the machine).
"""

from __future__ import annotations

import ast
import copy
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import yaml

from genrecls.core.runtime import worker_env
from genrecls.storage.dataset import Dataset

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: start-up of two Ray nodes with a dashboard on 2 busy cores takes 20-90 s
START_TIMEOUT = 240
RUN_TIMEOUT = 420


# -- cluster.yaml -----------------------------------------------------------------------------
def _prepared(path: Path) -> dict:
    """The file as ``ray up`` checks it: merged with the provider's defaults, then validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(config)
    return config


@pytest.mark.parametrize("name, provider", [("cluster.yaml", "aws"), ("cluster-local.yaml", "local")])
def test_cluster_config_passes_rays_schema(name, provider):
    config = _prepared(REPO / name)
    assert config["provider"]["type"] == provider
    assert config["head_node_type"] in config["available_node_types"]
    head = " ".join(config["head_start_ray_commands"])
    # the dashboard and job API stay on the head's loopback; token auth on every node
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for cmd in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[cmd] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), cmd
    # genrecls is installed on every node, from the working copy mounted there
    assert "~/genrecls" in config["file_mounts"]
    assert any("pip install" in c and "~/genrecls" in c for c in config["setup_commands"])


def test_cluster_yaml_node_types_and_security_group():
    config = _prepared(REPO / "cluster.yaml")
    types = config["available_node_types"]
    assert types["head"]["resources"]["CPU"] == 0  # the head runs drivers, not tasks
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(t["max_workers"] >= t.get("min_workers", 0) for t in workers)
    assert sum(t.get("min_workers", 0) for t in workers) <= config["max_workers"]
    # no inbound rule of our own: nothing beyond SSH and intra-cluster traffic is opened
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        ranges = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
        assert "0.0.0.0/0" not in ranges, rule
    # a GPU type that overrides the setup commands still installs genrecls
    for t in workers:
        if "worker_setup_commands" in t:
            assert any("~/genrecls" in c for c in t["worker_setup_commands"])


def test_schema_check_rejects_a_broken_config():
    """The validation above can fail: Ray's schema catches a wrong type and an unknown key."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    good = yaml.safe_load((REPO / "cluster.yaml").read_text())
    bad = copy.deepcopy(good)
    bad["available_node_types"]["cpu_worker"]["resources"] = {"CPU": "eight"}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(good)
    bad["available_node_types"]["cpu_worker"]["min_wrokers"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


# -- a two-node Ray started with `ray start` ------------------------------------------------------
def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class RayProcesses:
    """A head and ``nodes - 1`` more nodes on this machine, each a ``ray start --block`` process.

    Each node's processes share the process group of its ``ray start`` (started with
    ``start_new_session``); :meth:`stop` terminates exactly those groups and any descendant
    that left them.  Token authentication with a fresh token: only processes given
    :attr:`env` can talk to this cluster, and it never mistakes another Ray on the machine
    for its own.
    """

    def __init__(self, nodes: int = 2, cpus_per_node: int = 2, auth: bool = True):
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        # short: Ray's unix socket paths live under it and are limited to ~107 bytes
        self.temp_dir = tempfile.mkdtemp(prefix="grc-", dir="/tmp")
        self.token = secrets.token_hex(32)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH"))}
        env.update(worker_env())
        env.update(RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token) if auth else env.update(RAY_AUTH_MODE="disabled")
        # Ray Data 2.60 reads Parquet footers with 32 one-CPU actors per read by default: on a
        # cluster of a few CPUs that is a new worker process per actor, minutes on 2 cores,
        # and it can stall the listing (ray-project/ray#65406).  Small clusters want a few.
        env.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "2")
        self.env = env
        self.procs: list[subprocess.Popen] = []
        self.gcs_port = self.dashboard_port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(os.path.join(self.temp_dir, f"{name}.log"), "wb")
        self.procs.append(subprocess.Popen([str(BIN / "ray"), "start", "--block", *args], env=self.env,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        log.close()

    def get(self, path: str):
        """GET a dashboard API path with this cluster's token."""
        req = urllib.request.Request(self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def alive_nodes(self) -> int:
        try:
            nodes = self.get("/nodes?view=summary")["data"]["summary"]
        except (OSError, ValueError, KeyError):
            return 0
        return sum(1 for n in nodes if n.get("raylet", {}).get("state") == "ALIVE")

    def _wait(self, what: str, ok, deadline: float) -> None:
        while time.monotonic() < deadline:
            if ok():
                return
            dead = [p.args[3:5] for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a Ray node exited while waiting for {what}: {dead}\n{self.logs()}")
            time.sleep(1.0)
        raise TimeoutError(f"Ray did not reach '{what}' in time\n{self.logs()}")

    def start(self, timeout: float = START_TIMEOUT) -> "RayProcesses":
        deadline = time.monotonic() + timeout
        self.gcs_port, self.dashboard_port, client, *more = _free_ports(3 + 2 * self.nodes)
        common = [f"--num-cpus={self.cpus_per_node}", "--object-store-memory=150000000", "--disable-usage-stats",
                  f"--temp-dir={self.temp_dir}"]
        self._spawn("head", ["--head", f"--port={self.gcs_port}", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                             f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={more[0]}",
                             f"--metrics-export-port={more[1]}", *common])
        self._wait("the dashboard answers", lambda: self.alive_nodes() >= 1, deadline)
        for i in range(1, self.nodes):
            self._spawn(f"node{i}", [f"--address={self.address}", f"--dashboard-agent-listen-port={more[2 * i]}",
                                     f"--metrics-export-port={more[2 * i + 1]}", *common])
        self._wait(f"{self.nodes} nodes alive", lambda: self.alive_nodes() >= self.nodes, deadline)
        return self

    def logs(self, tail: int = 3000) -> str:
        out = []
        for name in sorted(os.listdir(self.temp_dir)) if os.path.isdir(self.temp_dir) else []:
            if name.endswith(".log"):
                out.append(f"--- {name}\n" + Path(self.temp_dir, name).read_text(errors="replace")[-tail:])
        return "\n".join(out)

    def stop(self, grace: float = 8.0) -> None:
        import psutil

        family = []
        for p in self.procs:
            try:
                family += psutil.Process(p.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=30)
        _, alive = psutil.wait_procs(family, timeout=5)
        for proc in alive:  # a descendant that left the group: ours, killed by its id
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def run(self, args: list[str], timeout: float = RUN_TIMEOUT, **kw) -> subprocess.CompletedProcess:
        """Run a command with this cluster's environment (its token, never another RAY_ADDRESS)."""
        return subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def two_nodes():
    # 3 logical CPUs per node: a training worker of 2 CPUs fits a node only once (so the two
    # workers land on different nodes) and leaves a CPU per node for Ray Data
    cluster = RayProcesses(nodes=2, cpus_per_node=3)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory, small_cfg):
    path = tmp_path_factory.mktemp("cluster-cfg") / "config.json"
    cfg = small_cfg.with_section(train={"epochs": 1, "batch_size": 16, "workers": 2, "cpus_per_worker": 2,
                                        "early_stopping_patience": 0})
    path.write_text(cfg.to_json())
    return path


#: a driver process of its own; it first waits until its own view of the cluster has every
#: CPU, so that the ingest plans for (and spreads its tasks over) both nodes
INGEST_DRIVER = """
import json, sys, time
import ray
from genrecls.core.config import load_config
from genrecls.jobs.ingest import ingest
from genrecls.core.runtime import worker_env
source, out, config, address, cpus = sys.argv[1:6]
ray.init(address=address, log_to_driver=False, logging_level="ERROR", runtime_env={"env_vars": worker_env()})
deadline = time.monotonic() + 60
while ray.cluster_resources().get("CPU", 0) < float(cpus) and time.monotonic() < deadline:
    time.sleep(0.5)
summary = ingest(source, out, load_config(config), address=address, progress=False)
print("SUMMARY " + json.dumps(summary.to_dict()))
"""


def _summary(proc: subprocess.CompletedProcess) -> dict:
    lines = [l for l in proc.stdout.splitlines() if l.startswith("SUMMARY ")]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("SUMMARY "):])


@pytest.fixture(scope="module")
def cluster_dataset(two_nodes, sample_library, cfg_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cluster-ingest") / "ds"
    proc = two_nodes.run([sys.executable, "-c", INGEST_DRIVER, str(sample_library), str(out), str(cfg_file),
                          two_nodes.address, str(two_nodes.nodes * two_nodes.cpus_per_node)])
    return out, _summary(proc)


def test_ingest_tasks_run_on_both_nodes(cluster_dataset, sample_library):
    out, summary = cluster_dataset
    n_tracks = sum(1 for p in Path(sample_library).rglob("*") if p.is_file())
    assert summary["failed"] == 0 and summary["added"] == n_tracks
    assert len(summary["nodes"]) >= 2, f"ingest tasks ran on {summary['nodes']} only"
    ds = Dataset(str(out))
    assert len(ds.tracks()) == n_tracks
    # every segment of every track is stored exactly once, whichever node wrote its shard
    table = pads.dataset(str(out / "shards"), format="parquet").to_table(columns=["track_id", "segment_index"])
    pairs = list(zip(table.column("track_id").to_pylist(), table.column("segment_index").to_pylist()))
    assert len(pairs) == len(set(pairs)) == ds.manifest()["counts"]["segments"]


TRAIN_DRIVER = """
import json, sys
from genrecls.core.config import load_config
from genrecls.jobs import training
dataset, run, config, address = sys.argv[1:5]
cfg = load_config(config)
result = training.train(dataset, run, cfg, address=address, workers=cfg.train.workers, progress=False)
print("SUMMARY " + json.dumps(result, default=str))
"""


def test_training_runs_on_the_two_node_cluster(two_nodes, cluster_dataset, cfg_file, tmp_path):
    try:
        import genrecls.jobs.training  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"genrecls.training cannot be imported yet ({exc})")
    from genrecls.models.inference import read_run_info

    dataset, _ = cluster_dataset
    run = tmp_path / "run"
    proc = two_nodes.run([sys.executable, "-c", TRAIN_DRIVER, str(dataset), str(run), str(cfg_file), two_nodes.address])
    result = _summary(proc)
    info = read_run_info(str(run))
    assert info["labels"] == Dataset(str(dataset)).manifest()["labels"]
    assert (run / "model").is_dir() and result["epochs_run"] == 1
    # the two Ray Train workers (2 CPUs each, 3 per node) ran on different nodes
    actors = two_nodes.get("/api/v0/actors?limit=10000&detail=1")["data"]["result"]["result"]
    workers = [a for a in actors if "TrainWorker" in (a.get("class_name") or "")]
    assert len({a["node_id"] for a in workers}) == 2, [(a.get("class_name"), a.get("node_id")) for a in workers]


def test_classify_scores_on_both_nodes(two_nodes, sample_library, small_cfg, tmp_path, pauses):
    """Classify's CPU tasks (decode, features, model) spread over the cluster: four of them held at once inside
    their tasks (3 CPUs per node) must span both nodes, and the summary reads back the nodes that scored."""
    from conftest import constant_run

    run = constant_run(tmp_path / "run", small_cfg.features, ["a", "b"])
    cfg = tmp_path / "cfg.json"
    cfg.write_text(small_cfg.to_json())
    out = tmp_path / "pred"
    pauses.arm("classify-featurise")
    proc = subprocess.Popen([sys.executable, "-m", "genrecls", "classify", str(sample_library), "--model", str(run),
                             "--out", str(out), "--config", str(cfg), "--address", two_nodes.address, "-q"],
                            env=two_nodes.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        held = [pauses.wait("classify-featurise", proc)]
        for _ in range(3):  # each further task that reaches the point while the others are held: a new process
            pauses.arm("classify-featurise")
            held.append(pauses.wait("classify-featurise", proc))
        assert len(set(held)) == 4
    finally:
        pauses.reset()
    stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, f"{stdout[-3000:]}\n{stderr[-3000:]}"
    last = json.loads((out / "classify.json").read_text())["last_run"]
    n_tracks = sum(1 for p in Path(sample_library).rglob("*") if p.is_file())
    assert last["classified"] == n_tracks and last["ran"] == "ray tasks"
    assert len(last["nodes"]) == 2, last["nodes"]


def test_ray_job_submit_runs_jobs_ingest(two_nodes, sample_library, cfg_file, tmp_path):
    """``ray job submit --working-dir`` with jobs/ingest.py; output on a ``file://`` URI."""
    out = tmp_path / "job-ds"
    job_id = f"genrecls-test-{secrets.token_hex(4)}"
    # the working dir upload honours .gitignore (.venv, caches); .git and tests are not needed
    runtime_env = {"excludes": [".git", "tests", "bench/results", "*.log"]}
    submit = two_nodes.run([
        str(BIN / "ray"), "job", "submit", "--address", two_nodes.dashboard, "--submission-id", job_id,
        "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
        sys.executable, "jobs/ingest.py", str(sample_library), "--out", f"file://{out}", "--config", str(cfg_file),
        "--quiet"])
    assert submit.returncode == 0, f"{submit.stdout[-4000:]}\n{submit.stderr[-4000:]}\n{two_nodes.logs()}"
    job = two_nodes.get(f"/api/jobs/{job_id}")  # the job API, as `ray job status` reads it
    assert job["status"] == "SUCCEEDED" and job["entrypoint"].endswith("--quiet"), job
    # the job's own output: the CLI's summary, printed by the driver on the head
    assert "tracks found" in submit.stdout and "0 failed" in submit.stdout, submit.stdout[-3000:]
    n_tracks = sum(1 for p in Path(sample_library).rglob("*") if p.is_file())
    ds = Dataset(f"file://{out}")
    assert ds.uri == str(out)
    assert len(ds.tracks()) == n_tracks and ds.shard_names()
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
    assert json.loads((out / "config.json").read_text())["features"]["sample_rate"] == 8000


# -- storage URIs ---------------------------------------------------------------------------------
def test_ingest_to_a_file_uri_equals_ingest_to_a_path(ray_local, sample_library, small_cfg, sample_dataset, tmp_path):
    from genrecls.jobs.ingest import ingest

    out = tmp_path / "uri-ds"
    summary = ingest(str(sample_library), f"file://{out}", small_cfg, progress=False)
    assert summary.failed == 0 and summary.dataset == str(out)
    by_uri, by_path = Dataset(f"file://{out}"), Dataset(str(sample_dataset))
    key = lambda e: (e.path, e.label, e.fingerprint, e.n_segments)
    assert sorted(map(key, by_uri.tracks().values())) == sorted(map(key, by_path.tracks().values()))
    # a second run through the URI finds everything in place
    again = ingest(str(sample_library), f"file://{out}", small_cfg, progress=False)
    assert again.processed == 0 and again.skipped_unchanged == summary.added


# -- jobs/ ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ingest", "train", "classify", "retrain"])
def test_job_entry_points_call_the_cli(name):
    """Each jobs/<name>.py is the CLI sub-command of the same name, nothing more."""
    from genrecls.cli import COMMANDS

    path = REPO / "jobs" / f"{name}.py"
    if not path.exists():
        pytest.skip(f"jobs/{name}.py is not written yet")
    tree = ast.parse(path.read_text())
    assert ast.get_docstring(tree) and "ray job submit" in ast.get_docstring(tree)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", getattr(n.func, "id", None)) == "run_job"]
    assert [c.args[0].value for c in calls] == [name]
    if name not in COMMANDS:
        pytest.skip(f"the '{name}' sub-command is not registered yet")
    proc = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert proc.returncode == 0 and f"genrecls {name}" in proc.stdout, proc.stderr


# -- no code execution from data --------------------------------------------------------------------
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}
UNSAFE_CALLS = {"read_pickle", "load_pickle", "unsafe_load", "full_load", "eval", "exec"}


def unsafe_loading(source: str, filename: str = "<source>") -> list[str]:
    """Places in Python source that could execute code from data: pickle-family imports and
    loads, ``safe_mode=False``, ``allow_pickle=True``, ``yaml.load`` without a safe loader,
    ``eval``/``exec``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in UNSAFE_CALLS:
                found.append(f"{where}: {name}(...)")
            if name == "load" and isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", "") == "yaml":
                if not any(k.arg == "Loader" and "Safe" in ast.unparse(k.value) for k in node.keywords):
                    found.append(f"{where}: yaml.load without SafeLoader")
            for k in node.keywords:
                if k.arg == "safe_mode" and isinstance(k.value, ast.Constant) and k.value.value is False:
                    found.append(f"{where}: safe_mode=False")
                if k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False):
                    found.append(f"{where}: allow_pickle={ast.unparse(k.value)}")
    return found


def test_the_scanner_finds_unsafe_loading():
    bad = ("import pickle\nfrom dill import loads\nimport numpy as np, yaml\n"
           "m = keras.models.load_model(p, safe_mode=False)\nx = np.load(p, allow_pickle=True)\n"
           "df = pd.read_pickle(p)\ny = yaml.load(s)\neval(s)\n")
    found = unsafe_loading(bad)
    for what in ("import pickle", "from dill", "safe_mode=False", "allow_pickle=True", "read_pickle",
                 "yaml.load without SafeLoader", "eval("):
        assert any(what in f for f in found), (what, found)
    assert unsafe_loading("import numpy as np\nx = np.load(p)\ny = yaml.load(s, Loader=yaml.SafeLoader)\n"
                          "m = keras.models.load_model(p, safe_mode=True)\n") == []


def test_package_never_loads_pickles():
    """Datasets, runs and registries are Parquet, JSON, SavedModel and .keras (safe_mode) only."""
    files = sorted((REPO / "genrecls").rglob("*.py")) + sorted((REPO / "jobs").glob("*.py"))
    assert len(files) > 10
    found = [f for path in files for f in unsafe_loading(path.read_text(), str(path.relative_to(REPO)))]
    assert found == []


def test_an_embedded_rays_workers_never_take_another_ray_for_theirs(ray_local, two_nodes):
    """Ray Train's placement-group cleaner (a detached actor) asks the state API whether the run's
    controller is alive, and removes the run's placement group when it is not found.  The embedded Ray
    runs no dashboard; while another Ray runs on the machine (here the module's cluster), a worker of the
    embedded Ray must never ask it: Ray then either connects to "the latest" instance (a user's ``ray
    start``), does not find our controller there and the cleaner kills a live run's workers, or raises
    "several Ray instances" in the cleaner's thread."""
    from ray.train.v2._internal.state.util import is_actor_alive
    from ray.util.state.exception import RayStateApiException

    @ray_local.remote(num_cpus=0)
    class Alive:
        def ping(self) -> bool:
            return True

    @ray_local.remote(num_cpus=0)
    def cleaners_view(actor_id: str):
        try:
            return is_actor_alive(actor_id, timeout=10)  # what the cleaner calls, from one of our workers
        except RayStateApiException:
            return "unknown"  # the cleaner keeps monitoring

    ours = Alive.remote()
    try:
        assert ray_local.get(ours.ping.remote()) and two_nodes.alive_nodes() == 2
        assert ray_local.get(cleaners_view.remote(ours._actor_id.hex())) == "unknown"
    finally:
        ray_local.kill(ours)
