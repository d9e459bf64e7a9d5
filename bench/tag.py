#!/usr/bin/env python
"""Benchmark of ``genrecls tag``: files tagged per second, next to classify's tracks per second, and its safety.

1. **A library of real-encoder files**: the project's own synthetic music
   (:func:`genrecls.audio.sample_data.synthesize`, ``--seconds`` long, 4 min by default: the real
   set's tracks average 3.9 min) encoded once per format by lame (MP3 V2), ffmpeg (AAC in M4A,
   160 kb/s), flac, oggenc (q5) and opusenc (128 kb/s), then copied into a library of ``--files``
   files; a predictions folder is written for it (rows of ``genrecls.storage.predictions``' schema, as
   ``genrecls classify`` writes them), every file untagged: every file is written.
2. **Throughput, the whole command from outside** (``genrecls tag PRED --apply -q``, its
   own embedded Ray on ``--cpus`` CPUs): files/s end to end; the same on a library a quarter
   the size, and the steady-state rate ``(N - N/4) / (T_N - T_N/4)``, which cancels
   start-up (Python imports, Ray).  Also the preview (reads every file's tags), the re-run
   (nothing left to write) and the undo.  Compared with classify's end-to-end tracks/s on
   real tracks of about the same length (``bench/results/classify-musicnn*.json``).
3. **Safety**: after the run, every file's compressed audio packets (PyAV demuxer) equal its
   source encode's, and one file per format decodes to exactly the source's samples; after
   undo every tag field mutagen reads equals the field before.  Then a run on ``--kill-files``
   files is killed with SIGKILL (its whole process group: the command and its embedded Ray)
   after ``--kill-after`` renames (the pause point ``tag-renamed-N``, genrecls.core.hooks), every file is
   checked to be exactly the old or exactly a journaled new version, and the same command
   finishes the rest.

The load average and the other processes using CPU are recorded around each timing.  Run
``python bench/tag.py`` (a few minutes on 2 cores) or ``--quick``; writes ``bench/results/tag.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _results import load, save  # noqa: E402

from genrecls.audio import fingerprint_file, synthesize, track_id_for  # noqa: E402
from genrecls.core import PAUSE_DIR_ENV  # noqa: E402
from genrecls.jobs import IN_PROCESS_FILES, JOURNAL, LIBRARY_TMP_PREFIX, journal_runs, read_journal  # noqa: E402
from genrecls.storage import PARTS, Location, PredictionStore, prediction_columns, prediction_schema  # noqa: E402

LABELS = ["classical", "electronic", "jazz", "rock"]
ENCODES = {  # extension -> encoder command (source WAV, output)
    "mp3": ["lame", "--quiet", "-V", "2", "{src}", "{out}"],
    "m4a": ["ffmpeg", "-v", "error", "-y", "-i", "{src}", "-c:a", "aac", "-b:a", "160k", "{out}"],
    "flac": ["flac", "--silent", "--force", "-o", "{out}", "{src}"],
    "ogg": ["oggenc", "--quiet", "-q", "5", "-o", "{out}", "{src}"],
    "opus": ["opusenc", "--quiet", "--bitrate", "128", "{src}", "{out}"],
}


def encode(work: Path, seconds: float) -> dict[str, Path]:
    """One encode per format of a synthetic track (cached in ``work``)."""
    import soundfile as sf

    folder = work / f"encodes-{int(seconds)}s"
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "source.wav"
    if not src.exists():
        sf.write(str(src), synthesize("rock", seconds, seed=3), 44100, subtype="PCM_16")
    out = {}
    for ext, cmd in ENCODES.items():
        path = folder / f"track.{ext}"
        if not path.exists():
            subprocess.run([a.format(src=src, out=path) for a in cmd], check=True)
        out[ext] = path
    return out


def build_library(root: Path, encodes: dict[str, Path], n: int) -> list[str]:
    """``n`` copies of the encodes, 50 files a folder (real files: each tag write copies its own bytes)."""
    shutil.rmtree(root, ignore_errors=True)
    exts = list(encodes)
    paths = []
    for i in range(n):
        ext = exts[i % len(exts)]
        rel = f"artist{i // 50:03d}/track{i:05d}.{ext}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(encodes[ext], root / rel)
        paths.append(rel)
    return paths


def write_predictions(out: Path, lib: Path, paths: list[str]) -> None:
    """A predictions folder for the library, as ``genrecls classify`` writes it (one part)."""
    shutil.rmtree(out, ignore_errors=True)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(len(LABELS)), size=len(paths)).astype(np.float32)
    stats = [os.stat(lib / p) for p in paths]
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "path": paths, "track_id": [track_id_for(p) for p in paths], **prediction_columns(probs, LABELS, 3),
        "n_segments": pa.array([80] * len(paths), pa.int32()), "duration": [240.0] * len(paths),
        "size": pa.array([s.st_size for s in stats], pa.int64()),
        "mtime_ns": pa.array([s.st_mtime_ns for s in stats], pa.int64()), "model_id": ["bench-model"] * len(paths),
        "classified_at": pa.array([dt.datetime.now(dt.timezone.utc)] * len(paths), pa.timestamp("ms", tz="UTC")),
    }).cast(prediction_schema(LABELS, "bench-model"))
    (out / PARTS).mkdir(parents=True)
    pq.write_table(table, out / PARTS / "part-0.parquet")
    PredictionStore(out).write_info(run="bench", model_id="bench-model", labels=LABELS, features={}, library=str(lib),
                                    last_run={})


def others() -> list[dict]:
    """Processes outside this benchmark using CPU now (a 1-s sample): what else loads the machine."""
    import psutil

    mine = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
    procs = [p for p in psutil.process_iter(["pid", "name", "cmdline"]) if p.pid not in mine]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(1.0)
    busy = []
    for p in procs:
        try:
            cpu = p.cpu_percent(None)
        except psutil.Error:
            continue
        if cpu >= 10:
            busy.append({"pid": p.pid, "cpu_percent": round(cpu), "command": " ".join((p.info["cmdline"] or [p.info["name"]])[:3])[:80]})
    return sorted(busy, key=lambda b: -b["cpu_percent"])[:8]


def run_cli(args: list[str], cpus: int, env: dict | None = None) -> tuple[float, subprocess.CompletedProcess, float, float]:
    """``genrecls tag ARGS --workers CPUS -q``, timed from outside; (seconds, result, load before, load after)."""
    before = load()
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "genrecls", "tag", *args, "--workers", str(cpus), "-q"],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "RAY_ADDRESS": "", **(env or {})})
    wall = time.monotonic() - t0
    if res.returncode != 0:
        raise RuntimeError(f"genrecls tag {' '.join(args)} exited {res.returncode}:\n{res.stderr[-3000:]}")
    return wall, res, before, load()


def packets(path: Path) -> str:
    """BLAKE2b of the file's compressed audio packets (PyAV's demuxer): equal packets decode to equal samples."""
    import av

    h = hashlib.blake2b(digest_size=16)
    with av.open(str(path)) as c:
        for packet in c.demux(audio=0):
            if packet.size:
                h.update(bytes(packet))
    return h.hexdigest()


def decode(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as c:
        return np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=-1)


def every_tag(path: Path) -> list[str]:
    import mutagen

    f = mutagen.File(str(path))
    return sorted(f.tags.pprint().splitlines()) if f is not None and f.tags is not None else []


def kill_check(work: Path, encodes: dict[str, Path], n: int, after: int, cpus: int) -> dict:
    """Kill -9 the whole command (and its embedded Ray) after ``after`` renames; every file old or new; re-run finishes."""
    lib, pred = work / "kill-lib", work / "kill-pred"
    paths = build_library(lib, encodes, n)
    write_predictions(pred, lib, paths)
    os.sync()
    original = {p: fingerprint_file(str(lib / p)) for p in paths}
    pauses = work / "kill-pauses"  # genrecls.core.hooks: the first task to rename its N-th file waits there
    shutil.rmtree(pauses, ignore_errors=True)
    pauses.mkdir()
    (pauses / f"tag-renamed-{after}.arm").write_text("")
    env = {**os.environ, "RAY_ADDRESS": "", PAUSE_DIR_ENV: str(pauses)}
    proc = subprocess.Popen([sys.executable, "-m", "genrecls", "tag", str(pred), "--apply", "--workers", str(cpus), "-q"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 600
    while not list(pauses.glob("*.paused")):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the run did not reach its pause point: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    # SIGKILL to the command and every process of its embedded Ray at once, as a power cut would: Ray puts its
    # workers in process groups of their own, so they are found as the command's descendants
    import psutil

    victims = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(victims, timeout=30)
    proc.wait()
    loc = Location.parse(str(pred))
    (run,) = journal_runs(loc)
    journal = {r["path"]: r for r in read_journal(loc.child(JOURNAL, run), pending=True).to_pylist()}
    journal.update({r["path"]: r for r in read_journal(loc.child(JOURNAL, run)).to_pylist()})
    old = new = neither = 0
    for p in paths:
        fp = fingerprint_file(str(lib / p))
        if fp == original[p]:
            old += 1
        elif p in journal and journal[p]["fingerprint_after"] == fp:
            new += 1
        else:
            neither += 1
    temps = len([t for t in lib.rglob(f"{LIBRARY_TMP_PREFIX}*")])
    wall, res, _, _ = run_cli([str(pred), "--apply"], cpus)
    tagged = sum(1 for p in paths if any(t.lower().startswith(("genre=", "tcon=", "©gen=")) for t in every_tag(lib / p)))
    written = sum(read_journal(loc.child(JOURNAL, r)).num_rows for r in journal_runs(loc))
    result = {"files": n, "killed_after_renames": after, "after_kill": {"old": old, "new": new, "half_written": neither,
              "temporary_copies_left": temps}, "rerun": {"wall_s": round(wall, 2), "files_tagged": tagged,
              "journal_rows": written, "temporary_copies_left": len(list(lib.rglob(f"{LIBRARY_TMP_PREFIX}*")))}}
    shutil.rmtree(lib)
    shutil.rmtree(pred)
    return result


def classify_reference() -> dict:
    """Classify's end-to-end tracks/s on the real set (15 tracks, 3.9 min average), from its bench results."""
    out = {}
    for name in ("classify-musicnn.json", "classify-musicnn-k10.json"):
        try:
            d = json.loads((REPO / "bench" / "results" / name).read_text())
            real = d["throughput"]["real"]["1x"]
            out[name] = {"tracks_per_s": real["classify"]["tracks_per_s"], "minutes_per_track":
                         round(real["audio_hours"] * 60 / real["tracks"], 2), "max_segments": d["config"]["max_segments"]}
        except (OSError, KeyError, ValueError):
            continue
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=400, help="library size for the timing (default 400; a quarter of it must "
                    "exceed genrecls.jobs.tagging.IN_PROCESS_FILES so that both runs use Ray)")
    ap.add_argument("--seconds", type=float, default=240.0, help="length of each track (default 240 s)")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--kill-files", type=int, default=100, help="files of the kill check (over IN_PROCESS_FILES: Ray runs)")
    ap.add_argument("--kill-after", type=int, default=12, help="renames before the kill")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "genrecls-bench-tag"))
    ap.add_argument("--quick", action="store_true", help="280 files of 10 s, an 80-file kill check")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "tag.json"))
    a = ap.parse_args()
    if a.quick:
        a.files, a.seconds, a.kill_files, a.kill_after = 280, 10.0, 80, 5
    if a.files // 4 <= IN_PROCESS_FILES or a.kill_files <= IN_PROCESS_FILES:
        ap.error(f"--files / 4 and --kill-files must exceed {IN_PROCESS_FILES} (smaller runs skip Ray)")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t_bench = time.monotonic()
    results: dict = {"quick": a.quick, "cpus": a.cpus, "machine_cpus": os.cpu_count(), "files": a.files,
                     "seconds_per_track": a.seconds, "load_average_start": list(os.getloadavg()), "other_processes_start": others()}
    encodes = encode(work, a.seconds)
    results["encodes"] = {ext: {"bytes": p.stat().st_size, "made_by": " ".join(ENCODES[ext][:1])} for ext, p in encodes.items()}
    source_packets = {ext: packets(p) for ext, p in encodes.items()}
    source_audio = {ext: decode(p) for ext, p in encodes.items()}
    timings = {}
    for label, n in (("quarter", max(1, a.files // 4)), ("full", a.files)):
        lib, pred = work / f"lib-{label}", work / f"pred-{label}"
        paths = build_library(lib, encodes, n)
        write_predictions(pred, lib, paths)
        os.sync()  # the copies on disk, as a library is: the first fsync of the run must not flush them
        size = sum((lib / p).stat().st_size for p in paths)
        before_tags = {p: every_tag(lib / p) for p in paths} if label == "full" else {}
        entry = {"files": n, "bytes": size}
        if label == "full":
            wall, _, l0, l1 = run_cli([str(pred)], a.cpus)
            entry["preview"] = {"wall_s": round(wall, 2), "files_per_s": round(n / wall, 1), "load": [l0, l1]}
        print(f"{label}: {n} files, {size / 1e6:.0f} MB; tagging...", flush=True)
        wall, res, l0, l1 = run_cli([str(pred), "--apply"], a.cpus)
        entry["apply"] = {"wall_s": round(wall, 2), "files_per_s": round(n / wall, 2), "mb_per_s": round(size / 1e6 / wall, 1),
                          "load": [l0, l1]}
        if label == "full":
            entry["other_processes_during"] = others()
            changed = [p for p in paths if packets(lib / p) != source_packets[p.rsplit(".", 1)[1]]]
            decoded = {}
            for ext in encodes:  # one file per format fully decoded
                p = next(q for q in paths if q.endswith(ext))
                decoded[ext] = bool(np.array_equal(decode(lib / p), source_audio[ext]))
            tagged = sum(1 for p in paths if every_tag(lib / p) != before_tags[p])
            entry["safety"] = {"files_whose_audio_packets_changed": len(changed), "decoded_equal_per_format": decoded,
                               "files_with_new_tags": tagged,
                               "temporary_copies_left": len(list(lib.rglob(f"{LIBRARY_TMP_PREFIX}*")))}
            wall, _, l0, l1 = run_cli([str(pred), "--apply"], a.cpus)
            entry["rerun_nothing_left"] = {"wall_s": round(wall, 2), "files_per_s": round(n / wall, 1), "load": [l0, l1]}
            loc = Location.parse(str(pred))
            first = journal_runs(loc)[0]
            wall, _, l0, l1 = run_cli(["--undo", str(pred / JOURNAL / first)], a.cpus)
            restored = sum(1 for p in paths if every_tag(lib / p) == before_tags[p])
            entry["undo"] = {"wall_s": round(wall, 2), "files_per_s": round(n / wall, 2), "load": [l0, l1],
                             "files_with_every_field_restored": restored,
                             "files_whose_audio_packets_changed": sum(
                                 1 for p in paths if packets(lib / p) != source_packets[p.rsplit(".", 1)[1]])}
        timings[label] = entry
        shutil.rmtree(lib)
        shutil.rmtree(pred)
    q, f = timings["quarter"], timings["full"]
    steady = (f["files"] - q["files"]) / max(f["apply"]["wall_s"] - q["apply"]["wall_s"], 1e-9)
    results["timings"] = timings
    results["steady_state_files_per_s"] = round(steady, 2)
    results["startup_s"] = round(q["apply"]["wall_s"] - q["files"] / steady, 2)
    results["classify_reference"] = classify_reference()
    ref = max((r["tracks_per_s"] for r in results["classify_reference"].values()), default=None)
    if ref:
        results["tag_over_fastest_classify"] = {"end_to_end": round(f["apply"]["files_per_s"] / ref, 1),
                                                "steady_state": round(steady / ref, 1)}
    print("kill -9 check...", flush=True)
    results["kill"] = kill_check(work, encodes, a.kill_files, a.kill_after, a.cpus)
    results["load_average_end"] = list(os.getloadavg())
    results["other_processes_end"] = others()
    results["bench_wall_s"] = round(time.monotonic() - t_bench, 1)
    save(results, a.out)
    print(json.dumps({k: results[k] for k in ("steady_state_files_per_s", "startup_s", "tag_over_fastest_classify", "kill")
                      if k in results}, indent=1))
    print(f"full run: {f['apply']}, safety {f['safety']}, undo {f['undo']}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
