"""Benchmark the dataset's track index (a Delta Lake table): requests and time to open it, at growing sizes.

For 200, 2,000 and 20,000 one-track shards (``--sizes``), on a local disk and on the tests' S3
server (SeaweedFS on loopback), from the public surface only:

* **legacy open**: a dataset from before the index, read from every shard's footer (now in
  parallel, 16 at once: what an unconverted dataset costs each command);
* **convert**: ``genrecls convert`` (those footers once, and the index's first commit);
* **open**: ``Dataset(uri).tracks()`` on the converted dataset (what every command reads);
* **no-op ingest**: ``genrecls ingest`` again over the unchanged library (discovery, the lock,
  the index, the fence commit, the manifest: nothing to process);
* **train planning**: ``check_dataset`` + ``plan_training`` (no Ray);

and **train planning on a synthetic 1-million-track index** (rows only, 31,250 shard names; one
real shard for the footer check), on both stores.

Requests are counted, not estimated: on S3 by a counting HTTP proxy the bench puts between every
client (pyarrow, deltalake's object_store, boto3) and the server; on a local disk by ``strace``
attached to this process (file opens, stats and directory reads under the dataset's folder).
Counts do not depend on the machine's load; wall-clock times do: each result records the load
average and the CPU model, and times taken while other work runs are marked so.

    .venv/bin/python bench/index.py --quick     # 20 and 200 shards, 100,000 tracks: a smoke run
    .venv/bin/python bench/index.py             # 200, 2,000, 20,000 shards and 1,000,000 tracks

Writes ``bench/results/index.json`` (``index-quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from conftest import S3Server  # noqa: E402  (sets the test server's credentials in the environment)

from genrecls.core import quiet_environment  # noqa: E402

quiet_environment()

from _results import cpu_model, save  # noqa: E402  (bench/ is the script's folder)


# -- counting requests ------------------------------------------------------------------------
class CountingProxy:
    """A TCP proxy on loopback that forwards to the S3 server and counts the HTTP requests through it."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self.lock:
            self.counts = {}

    def total(self) -> dict[str, int]:
        with self.lock:
            return {**self.counts, "total": sum(self.counts.values())}

    def _accept(self) -> None:
        while True:
            client, _ = self.sock.accept()
            server = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._requests, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _requests(self, src, dst) -> None:
        """Client to server: forward bytes, parse each request's head (and skip its body) to count it."""
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = src.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, rest = buf.partition(b"\r\n\r\n")
                method = head.split(b" ", 1)[0].decode(errors="replace")
                with self.lock:
                    self.counts[method] = self.counts.get(method, 0) + 1
                m = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.I)
                length = int(m.group(1)) if m else 0
                chunked = re.search(rb"\r\ntransfer-encoding:\s*chunked", head, re.I) is not None
                dst.sendall(head + b"\r\n\r\n")
                buf = rest
                if chunked:
                    while True:  # chunk-size CRLF data CRLF ... 0 CRLF CRLF
                        while b"\r\n" not in buf:
                            buf += src.recv(65536)
                        line, _, buf = buf.partition(b"\r\n")
                        size = int(line.split(b";")[0], 16)
                        need = size + 2
                        while len(buf) < need:
                            buf += src.recv(65536)
                        dst.sendall(line + b"\r\n" + buf[:need])
                        buf = buf[need:]
                        if size == 0:
                            break
                else:  # the body: forwarded as it comes (not gathered: a 60 MB PUT would copy quadratically)
                    body, buf = buf[:length], buf[length:]
                    dst.sendall(body)
                    left = length - len(body)
                    while left > 0:
                        data = src.recv(min(65536, left))
                        if not data:
                            return
                        dst.sendall(data)
                        left -= len(data)
        except OSError:
            pass


class Strace:
    """strace attached to this process: file-system calls under ``root`` while the block runs."""

    CALLS = "openat,newfstatat,statx,getdents64,unlinkat,renameat,renameat2,mkdirat,access,faccessat2,readlinkat"

    def __init__(self, root: str):
        self.root = root
        self.out = tempfile.mktemp(prefix="genrecls-strace-")

    def __enter__(self):
        self.proc = subprocess.Popen(["strace", "-f", "--seccomp-bpf", "-qq", "-e", f"trace={self.CALLS}", "-o", self.out,
                                      "-p", str(os.getpid())], stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attached (a bench, not a test: nothing decides on this clock)
        return self

    def __exit__(self, *exc):
        time.sleep(0.2)
        self.proc.terminate()
        self.proc.wait()
        counts: dict[str, int] = {}
        with open(self.out) as f:
            for line in f:
                if self.root not in line:
                    continue
                m = re.search(r"(\w+)\(", line)
                name = m.group(1) if m else "?"
                counts[name] = counts.get(name, 0) + 1
        os.unlink(self.out)
        self.counts = {**counts, "total": sum(counts.values())}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- a synthetic dataset: N one-track shards and a library of N small files ----------------------
def small_config():
    from genrecls.core import Config

    return Config().with_section(features={
        "preset": "tutorial", "sample_rate": 8000, "segment_samples": 8000, "segment_hop": 8000, "n_fft": 512,
        "hop_length": 256, "n_mels": 8, "min_track_seconds": 0.5}, train={"model": "default", "workers": 1})


LABELS = ["blues", "jazz", "rock", "soul"]


def library(lib: str, n: int) -> list[tuple[str, str, int, int]]:
    """``n`` small files under ``lib`` (4 labels; never decoded: they stay unchanged): (path, label, size, mtime_ns)."""
    files = []
    for i in range(n):
        rel = f"{LABELS[i % 4]}/track-{i:06d}.wav"
        path = os.path.join(lib, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"RIFF" + i.to_bytes(4, "little") + b"WAVE" + b"\0" * 64)
        st = os.stat(path)
        files.append((rel, LABELS[i % 4], st.st_size, st.st_mtime_ns))
    return files


def build(uri: str, lib: str, n: int, cfg) -> None:
    """A library of ``n`` files (4 labels; never decoded: they are unchanged) and a dataset from before the
    index whose ``n`` shards hold one track each, with the files' stats."""
    from dataclasses import asdict

    import numpy as np

    from genrecls.audio import track_id_for
    from genrecls.storage import Location, ShardWriter

    files = library(lib, n)
    loc = Location.parse(uri)
    loc.makedirs()
    mel = np.zeros((1, *cfg.features.mel_shape), np.float32)

    def shard(i: int) -> None:
        rel, label, size, mtime = files[i]
        for attempt in range(5):  # a loaded machine's loopback server can time out a request: write it again
            try:
                w = ShardWriter(loc, f"part-{i:020d}-bench.parquet", cfg.features)
                w.add_track(track_id=track_id_for(rel), path=rel, label=label, fingerprint=f"fp{i}", size=size,
                            mtime_ns=mtime, duration=1.0, mels=mel, starts=[0.0])
                w.close()
                return
            except OSError:
                if attempt == 4:
                    raise
                time.sleep(1.0)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(shard, range(n)))
    loc.write_json("manifest.json", {"format": "genrecls-dataset", "features": asdict(cfg.features),
                                     "mel_shape": list(cfg.features.mel_shape), "labels": LABELS,
                                     "counts": {"tracks": n}})


def build_index_only(uri: str, lib: str, n: int, cfg) -> None:
    """The library of :func:`build` and its dataset's index committed directly (no shard but the newest one,
    whose footer train's check reads): what opening, a no-op ingest and planning read, in seconds to build."""
    from dataclasses import asdict

    import numpy as np

    from genrecls.audio import track_id_for
    from genrecls.storage import Dataset, Location, ShardWriter, TrackEntry, entries_table

    entries = [TrackEntry(track_id_for(rel), rel, label, f"fp{i}", size, mtime, 1, 1.0, f"part-{i:020d}-bench.parquet")
               for i, (rel, label, size, mtime) in enumerate(library(lib, n))]
    loc = Location.parse(uri)
    loc.makedirs()
    loc.write_json("manifest.json", {"format": "genrecls-dataset", "features": asdict(cfg.features),
                                     "mel_shape": list(cfg.features.mel_shape), "labels": LABELS,
                                     "counts": {"tracks": n}})
    Dataset(loc).commit(upsert=entries_table(entries), operation="bench")
    e = entries[-1]
    w = ShardWriter(loc, e.shard, cfg.features)
    w.add_track(track_id=e.track_id, path=e.path, label=e.label, fingerprint=e.fingerprint, size=e.size,
                mtime_ns=e.mtime_ns, duration=1.0, mels=np.zeros((1, *cfg.features.mel_shape)), starts=[0.0])
    w.close()


def million(uri: str, n: int, cfg) -> None:
    """An index of ``n`` synthetic tracks (32 per shard name; rows only) and one real shard."""
    from dataclasses import asdict

    import numpy as np
    import pyarrow as pa

    from genrecls.storage import Dataset, Location, ShardWriter

    loc = Location.parse(uri)
    loc.makedirs()
    loc.write_json("manifest.json", {"features": asdict(cfg.features)})
    ids = [f"{i:016x}" for i in np.random.default_rng(0).permutation(n)]
    shards = [f"part-{i // 32:020d}-synthetic.parquet" for i in range(n)]
    rows = pa.table({"track_id": ids, "path": [f"genre{i % 10}/t{i}.mp3" for i in range(n)],
                     "label": [f"genre{i % 10}" for i in range(n)], "fingerprint": ids,
                     "size": np.full(n, 5_000_000), "mtime_ns": np.arange(n), "n_segments": np.full(n, 80),
                     "duration_seconds": np.full(n, 240.0), "shard": shards})
    Dataset(loc).commit(upsert=rows, operation="bench")
    w = ShardWriter(loc, shards[-1], cfg.features)  # the one footer the check reads (not in the index)
    w.add_track(track_id="x", path="x", label="x", fingerprint="x", size=1, mtime_ns=1, duration=1.0,
                mels=np.zeros((1, *cfg.features.mel_shape)), starts=[0.0])
    w.close()


# -- the measurements -----------------------------------------------------------------------------
def measure(name: str, fn, where: str, counter, root: str) -> dict:
    """Wall seconds, this process's CPU seconds (what the single-threaded parts take on an idle core; the
    threads reading files add to it), and the requests counted."""
    if where == "s3":
        counter.reset()
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        counts = counter.total()
    else:
        with Strace(root) as s:
            c0, t0 = time.process_time(), time.perf_counter()
            out = fn()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        counts = s.counts
    return {"what": name, "seconds": round(wall, 3), "cpu_seconds": round(cpu, 3), "requests": counts, "result": out}


def run_size(n: int, where: str, base: str, server, proxy, cfg, index_only: bool = False) -> list[dict]:
    from genrecls.jobs import ingest
    from genrecls.jobs.training import check_dataset, plan_training
    from genrecls.storage import Dataset

    lib = os.path.join(base, f"lib-{n}")
    if where == "s3":
        bucket = f"bench-{n}-{int(time.time())}"
        server.bucket(bucket)
        uri = f"s3://{bucket}/ds?endpoint_override=127.0.0.1:{proxy.port}&scheme=http"
        root = "/ds/"
    else:
        uri = root = os.path.join(base, f"ds-{n}")
    t0 = time.perf_counter()
    (build_index_only if index_only else build)(uri, lib, n, cfg)
    built = time.perf_counter() - t0
    out = []

    def legacy():
        return len(Dataset(uri).tracks())

    def convert():
        from genrecls.jobs import convert as run

        return run(uri)["version"]

    def open_index():
        return len(Dataset(uri).tracks())

    def noop_ingest():
        s = ingest(lib, uri, cfg, progress=False)
        assert s.processed == 0 and s.skipped_unchanged == n, s
        return s.index_version

    def plan():
        check = check_dataset(uri, cfg)
        return plan_training(check, cfg)[0].tracks_per_split["train"]["total"]

    steps = [("legacy open (footers, 16 at once)", legacy), ("convert", convert)] if not index_only else []
    for name, fn in steps + [("open", open_index), ("no-op ingest", noop_ingest), ("no-op ingest again", noop_ingest),
                             ("train planning", plan)]:
        r = measure(name, fn, where, proxy, root)
        r.update({"shards": n, "where": where, "load": load(), "index_only": index_only})
        print(f"{where:5} {n:6d} shards  {name:34} {r['seconds']:8.3f} s ({r['cpu_seconds']:7.3f} s CPU) "
              f"{r['requests']['total']:7d} requests", flush=True)
        out.append(r)
    out.append({"what": "build (not measured)", "shards": n, "where": where, "seconds": round(built, 1)})
    shutil.rmtree(lib, ignore_errors=True)
    return out


def run_million(n: int, where: str, base: str, server, proxy, cfg) -> dict:
    from genrecls.jobs.training import check_dataset, plan_training

    if where == "s3":
        bucket = f"bench-million-{int(time.time())}"
        server.bucket(bucket)
        uri, root = f"s3://{bucket}/ds?endpoint_override=127.0.0.1:{proxy.port}&scheme=http", "/ds/"
    else:
        uri = root = os.path.join(base, "million")
    million(uri, n, cfg)

    def plan():
        t0 = time.perf_counter()
        check = check_dataset(uri, cfg)
        t1 = time.perf_counter()
        plan_training(check, cfg)
        return {"check_seconds": round(t1 - t0, 3), "plan_seconds": round(time.perf_counter() - t1, 3)}

    r = measure("train planning, synthetic index", plan, where, proxy, root)
    r.update({"tracks": n, "where": where, "load": load()})
    print(f"{where:5} {n} tracks: train planning {r['seconds']:.2f} s, {r['cpu_seconds']:.2f} s CPU ({r['result']}), "
          f"{r['requests']['total']} requests", flush=True)
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sizes", type=int, nargs="*")
    p.add_argument("--tracks", type=int, help="tracks of the synthetic index (default 1,000,000; --quick 100,000)")
    p.add_argument("--where", nargs="*", default=["local", "s3"])
    p.add_argument("--no-million", action="store_true", help="skip the synthetic 1M-track planning")
    p.add_argument("--index-only", action="store_true",
                   help="commit the index directly (no shards to write, no legacy open or convert measured)")
    p.add_argument("--merge", action="store_true", help="replace these sizes' and stores' rows in the results file")
    a = p.parse_args()
    sizes = a.sizes if a.sizes is not None else ([20, 200] if a.quick else [200, 2000, 20000])
    tracks = a.tracks or (100_000 if a.quick else 1_000_000)
    cfg = small_config()
    base = tempfile.mkdtemp(prefix="genrecls-bench-index-")
    server = proxy = None
    path = os.path.join(HERE, "results", "index-quick.json" if a.quick else "index.json")
    results: dict = {"quick": a.quick, "cpu": cpu_model(), "cpus": os.cpu_count(), "load_at_start": load(),
                     "server": "SeaweedFS (weed mini) on 127.0.0.1, through a counting proxy",
                     "sizes": [], "million": []}
    if a.merge and os.path.exists(path):  # runs of some sizes or stores, one file
        with open(path) as f:
            old = json.load(f)
        keep = lambda r: not (r.get("where") in a.where and r.get("shards") in sizes  # noqa: E731
                              and (not a.index_only or r.get("what") not in ("legacy open (footers, 16 at once)",
                                                                               "convert", "build (not measured)")))
        results["sizes"] = [r for r in old.get("sizes", []) if keep(r)]
        results["million"] = [r for r in old.get("million", []) if r.get("where") not in a.where or a.no_million]
        results["runs"] = old.get("runs", []) + [old.get("load_at_start")]
    try:
        if "s3" in a.where:
            server = S3Server(__import__("pathlib").Path(base) / "s3")
            (server.root).mkdir()
            server.start()
            proxy = CountingProxy(server.port)
            server_port = server.port
            server.port = proxy.port  # buckets are made through the proxy too (not counted: reset before each)
            assert server_port
        for where in a.where:
            for n in sizes:
                results["sizes"] += run_size(n, where, base, server, proxy, cfg, a.index_only)
                save(results, path)
            if not a.no_million:
                results["million"].append(run_million(tracks, where, base, server, proxy, cfg))
                save(results, path)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)
    results["load_at_end"] = load()
    results["note"] = ("wall-clock figures were taken while other work shared the 2 cores unless the load averages "
                       "say otherwise; request counts do not depend on load")
    save(results, path)


if __name__ == "__main__":
    main()
