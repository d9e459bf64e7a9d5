"""Benchmark classify at full width and from the store (issue 26): whole commands, as a user runs them.

The clips: 30-s excerpts of a real library (default ``/work/realset``, the 5-style real set; each
track gives clips from several offsets), encoded to 44.1 kHz stereo MP3 by ffmpeg's LAME (what
real libraries hold).  A default model (``genrecls train``, the musicnn frozen head) is trained on
80 clips of other tracks than the measured ones.  Every command is a fresh process timed from its
start to its exit (Python and Ray start-up included); methods are interleaved round by round,
medians of ``--rounds``; the 1-minute load average is recorded around each command, and the CPU.

1. **width**: on 100 clips (50 min), ``genrecls ingest`` with the embedding store (the same decode,
   features and backbone per segment), ``ingest`` without it, ``classify`` (the default: the whole
   chain in each CPU task), and ``classify --set classify.actors=2`` (decoding tasks + a pool of model
   actors: the alternative design).  Target: classify at least 0.9 of ingest-with-store's throughput.
2. **workers**: on 200 clips (100 min), ``classify --workers 1`` and ``--workers 2``, and one clip
   with each (Ray forced: ``classify.in_process_mb=0``), so the steady state is the long run minus the
   one-clip run.  Target: 2 workers at least 1.7x one.
3. **store**: ``classify --dataset DS`` (DS: the 100 clips ingested) against computing, on the same
   100 clips; the same top genre on at least 98%.  Target: at least 5x faster.  Then 10,000 stored
   tracks: the 100 clips hard-linked 100 times under other paths, their dataset entries and stored
   embeddings copied for each link (real embeddings of real audio; the tracks repeat), classified
   from the store; computing them is the 100-clip computed run's steady-state rate times 100 (not
   run: 83 h of audio).  Target: at least 50x.
4. **one clip**: ``classify`` of one new 30-s clip with the default model, whole command (it runs
   in the command's own process); also with Ray forced.  Target: at most 5 s.
5. **tagged**: ``genrecls tag --apply`` on the 100 clips' predictions (made with ``--dataset``),
   then ``classify`` and ``ingest`` again: the number of files each decodes.  Target: 0.

    .venv/bin/python bench/classify_width.py                  # everything (about 30 min on 2 cores)
    .venv/bin/python bench/classify_width.py --quick          # a smoke run: few clips, one round

Writes ``bench/results/classify-width.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from _results import cpu_model, genrecls_command, load, save  # noqa: E402  (bench/ is the script's folder)

AUDIO = (".wav", ".mp3", ".flac", ".ogg", ".opus")


def command(args: list[str], what: str, log: str) -> dict:
    """A whole genrecls command, quiet; exit 3 (e.g. nothing new) is not a failure."""
    return genrecls_command([*args, "-q"], what, log, ok=(0, 3))


def duration(path: str) -> float:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", path],
                         capture_output=True, text=True).stdout.strip()
    return float(out or 0)


def make_clips(source: str, work: str, n_train: int, n_test: int) -> tuple[str, str]:
    """``work/train/<style>/*.mp3`` (n_train clips) and ``work/test/<style>/*.mp3`` (n_test clips, of other
    tracks): 30-s excerpts at offsets 30, 90, 150... s of each track, LAME VBR V2, 44.1 kHz stereo."""
    styles = sorted(d for d in os.listdir(source) if os.path.isdir(os.path.join(source, d)))
    tracks = {s: sorted(f for f in os.listdir(os.path.join(source, s)) if f.lower().endswith(AUDIO)) for s in styles}
    jobs: list[tuple[str, str, float]] = []
    for part, count, pick in (("train", n_train, lambda i: i % 3 == 0), ("test", n_test, lambda i: i % 3 != 0)):
        per = -(-count // len(styles))
        made = 0
        for s in styles:
            files = [f for i, f in enumerate(tracks[s]) if pick(i)]
            clips = [(f, off) for off in (30.0, 90.0, 150.0, 210.0, 270.0, 330.0) for f in files]
            taken = 0
            for f, off in clips:
                if taken == per or made == count:
                    break
                src = os.path.join(source, s, f)
                if duration(src) < off + 30:
                    continue
                jobs.append((src, os.path.join(work, part, s, f"{os.path.splitext(f)[0]}_{int(off)}.mp3"), off))
                taken += 1
                made += 1
    for src, dst, off in jobs:
        if not os.path.exists(dst):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            subprocess.run(["ffmpeg", "-v", "error", "-y", "-ss", str(off), "-t", "30", "-i", src, "-ar", "44100",
                            "-ac", "2", "-c:a", "libmp3lame", "-q:a", "2", dst], check=True)
    return os.path.join(work, "train"), os.path.join(work, "test")


def subset(folder: str, dst: str, n: int) -> str:
    """``dst``: hard links to the first ``n`` files of ``folder`` (sorted), keeping their sub-folders."""
    files = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)
    shutil.rmtree(dst, ignore_errors=True)
    for rel in files[:n]:
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        os.link(os.path.join(folder, rel), os.path.join(dst, rel))
    return dst


def fresh(path: str) -> str:
    shutil.rmtree(path, ignore_errors=True)
    return path


def last_run(pred: str) -> dict:
    with open(os.path.join(pred, "classify.json")) as f:
        return json.load(f)["last_run"]


def median(runs: list[dict]) -> float:
    return round(statistics.median(r["seconds"] for r in runs), 2)


def top_genres(pred: str) -> dict[str, str]:
    import pyarrow.parquet as pq

    t = pq.read_table(os.path.join(pred, "parts"), columns=["path", "top_genre"])
    return dict(zip(t.column("path").to_pylist(), t.column("top_genre").to_pylist()))


def build_stored_copies(ds: str, lib: str, out_ds: str, out_lib: str, copies: int) -> int:
    """``out_lib/c<k>/...``: hard links of ``lib``'s files, ``copies`` times; ``out_ds``: a dataset whose shards and
    embedding store hold each link as a track (the original track's rows, under the link's path and id)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from genrecls.audio import track_id_for
    from genrecls.storage import Dataset, EmbeddingStore, Location

    src = Dataset(ds)
    shutil.rmtree(out_lib, ignore_errors=True)
    shutil.rmtree(out_ds, ignore_errors=True)
    os.makedirs(os.path.join(out_ds, "shards"))
    os.makedirs(os.path.join(out_ds, "embeddings"))
    manifest = src.manifest()
    entries = list(src.tracks().values())
    for k in range(copies):
        for e in entries:
            dst = os.path.join(out_lib, f"c{k:03d}", e.path)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.link(os.path.join(lib, e.path), dst)
    # one shard and one embedding part per copy: the original rows, renamed
    store = EmbeddingStore(ds)
    emb = store.read(store.index().values())
    for folder, table, kind in (("shards", src.read_segments(), "shard"), ("embeddings", emb, "part")):
        schema_meta = None
        with open(os.path.join(ds, folder, sorted(os.listdir(os.path.join(ds, folder)))[0]), "rb") as f:
            schema_meta = pq.read_schema(f).metadata
        for k in range(copies):
            ids = table.column("track_id").to_pylist()
            old = {e.track_id: e for e in entries}
            new_ids = [track_id_for(f"c{k:03d}/{old[t].path}") for t in ids]
            t = table.set_column(table.schema.get_field_index("track_id"), "track_id", pa.array(new_ids, pa.string()))
            if "path" in t.column_names:
                t = t.set_column(t.schema.get_field_index("path"), "path",
                                 pa.array([f"c{k:03d}/{old[i].path}" for i in ids], pa.string()))
            footer = []
            for e in entries:
                row = {"track_id": track_id_for(f"c{k:03d}/{e.path}"), "fingerprint": e.fingerprint,
                       "n_segments": e.n_segments}
                if kind == "shard":
                    row.update(path=f"c{k:03d}/{e.path}", label=e.label, size=e.size, mtime_ns=e.mtime_ns,
                               duration_seconds=e.duration_seconds)
                footer.append(row)
            meta = {**(schema_meta or {}), b"genrecls.tracks": json.dumps(footer).encode()}
            pq.write_table(t.replace_schema_metadata(meta), os.path.join(out_ds, folder, f"part-{k:05d}.parquet"),
                           compression="zstd")
    with open(os.path.join(out_ds, "manifest.json"), "w") as f:
        json.dump({**manifest, "root": out_lib, "source": out_lib}, f)
    n = len(Dataset(out_ds).tracks())
    assert n == copies * len(entries) and Location.parse(out_ds).exists("manifest.json")
    del np
    return n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few clips, one round: a smoke run")
    p.add_argument("--source", default="/work/realset", help="the real library (SOURCE/<style>/<file>)")
    p.add_argument("--work", default="/tmp/bench-data/classify-width")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip", action="append", default=[], choices=["width", "workers", "store", "one", "tagged"])
    p.add_argument("--out", default=os.path.join(HERE, "results", "classify-width.json"))
    a = p.parse_args()
    n_train, n_test, n_long, copies = (80, 100, 200, 100) if not a.quick else (15, 10, 20, 5)
    rounds = 1 if a.quick else a.rounds
    if a.quick:
        a.out = a.out.replace(".json", "-quick.json")
    work = a.work + ("-quick" if a.quick else "")
    os.makedirs(work, exist_ok=True)
    log = os.path.join(work, "commands.log")
    train_clips, all_test = make_clips(a.source, os.path.join(work, "clips"), n_train, n_long)
    test = subset(all_test, os.path.join(work, "test100"), n_test)
    one = subset(all_test, os.path.join(work, "one"), 1)
    results: dict = {"quick": a.quick, "cpu": cpu_model(), "cpus": os.cpu_count(), "load_at_start": load(),
                     "clips": {"train": n_train, "test": n_test, "long": n_long, "seconds": 30, "format": "mp3 lame V2"},
                     "log": log}
    t_all = time.monotonic()
    run = os.path.join(work, "run")
    if not os.path.exists(os.path.join(run, "run.json")):
        command(["ingest", train_clips, "--out", fresh(os.path.join(work, "train-ds"))], "ingest training clips", log)
        command(["train", os.path.join(work, "train-ds"), "--out", fresh(run)], "train the default model", log)
    runs: dict[str, list[dict]] = {}
    figures: dict = {}
    add = lambda key, r: runs.setdefault(key, []).append(r)  # noqa: E731

    if "width" not in a.skip:
        print("width (100 clips):", flush=True)
        for i in range(rounds):
            add("ingest_store", command(["ingest", test, "--out", fresh(f"{work}/w-ds")], "ingest, store on", log))
            add("ingest_off", command(["ingest", test, "--out", fresh(f"{work}/w-ds-off"), "--set",
                                       "ingest.embeddings=off"], "ingest, store off", log))
            add("classify", command(["classify", test, "--model", run, "--out", fresh(f"{work}/w-pred")], "classify", log))
            if i == 0:
                figures["classify_ran"] = {k: last_run(f"{work}/w-pred").get(k) for k in ("ran", "processes", "engine")}
            add("classify_actors", command(["classify", test, "--model", run, "--out", fresh(f"{work}/w-pred-a"),
                                            "--set", "classify.actors=2"], "classify, 2 model actors", log))
        m = {k: median(runs[k]) for k in ("ingest_store", "ingest_off", "classify", "classify_actors")}
        figures["width"] = {"median_seconds": m,
                            "classify_vs_ingest_store": round(m["ingest_store"] / m["classify"], 3),
                            "classify_vs_ingest_off": round(m["ingest_off"] / m["classify"], 3),
                            "actors_vs_ingest_store": round(m["ingest_store"] / m["classify_actors"], 3),
                            "target_0.9": m["ingest_store"] / m["classify"] >= 0.9}

    if "workers" not in a.skip:
        long = subset(all_test, os.path.join(work, "test200"), n_long)
        print(f"workers ({n_long} clips):", flush=True)
        force = ["--set", "classify.in_process_mb=0"]
        for _ in range(rounds):
            for w in ("1", "2"):
                add(f"long_w{w}", command(["classify", long, "--model", run, "--out", fresh(f"{work}/l-pred"),
                                           "--workers", w], f"classify {n_long} clips, --workers {w}", log))
                add(f"one_w{w}", command(["classify", one, "--model", run, "--out", fresh(f"{work}/o-pred"),
                                          "--workers", w, *force], f"classify 1 clip (Ray), --workers {w}", log))
        m = {k: median(runs[k]) for k in ("long_w1", "long_w2", "one_w1", "one_w2")}
        steady1, steady2 = m["long_w1"] - m["one_w1"], m["long_w2"] - m["one_w2"]
        figures["workers"] = {"median_seconds": m, "whole_speedup": round(m["long_w1"] / m["long_w2"], 3),
                              "steady_speedup": round(steady1 / steady2, 3), "target_1.7": steady1 / steady2 >= 1.7}

    if "store" not in a.skip:
        print("store (100 clips):", flush=True)
        ds = f"{work}/s-ds"
        if not os.path.exists(os.path.join(ds, "manifest.json")):
            command(["ingest", test, "--out", ds], "ingest the 100 clips (the dataset)", log)
        for _ in range(rounds):
            add("store_computed", command(["classify", test, "--model", run, "--out", fresh(f"{work}/s-pred-c")],
                                          "classify, computed", log))
            add("store_read", command(["classify", test, "--model", run, "--out", fresh(f"{work}/s-pred-s"),
                                       "--dataset", ds], "classify --dataset", log))
        a_top, b_top = top_genres(f"{work}/s-pred-c"), top_genres(f"{work}/s-pred-s")
        same = sum(a_top[k] == b_top.get(k) for k in a_top) / max(1, len(a_top))
        stored = last_run(f"{work}/s-pred-s")
        m = {k: median(runs[k]) for k in ("store_computed", "store_read")}
        figures["store"] = {"median_seconds": m, "speedup": round(m["store_computed"] / m["store_read"], 2),
                            "same_top_genre": round(same, 4), "from_store": stored["from_store"],
                            "target_5x": m["store_computed"] >= 5 * m["store_read"], "target_98pct": same >= 0.98}
        print(f"10,000 stored tracks ({copies} copies):", flush=True)
        big_ds, big_lib = f"{work}/s-ds-10k", f"{work}/lib-10k"
        n_big = build_stored_copies(ds, test, big_ds, big_lib, copies)
        for _ in range(rounds):
            add("store_10k", command(["classify", big_lib, "--model", run, "--out", fresh(f"{work}/s-pred-10k"),
                                      "--dataset", big_ds], f"classify --dataset, {n_big} stored tracks", log))
        big = last_run(f"{work}/s-pred-10k")
        computed_rate = m["store_computed"] / n_test  # whole command per clip, start-up included: generous to computing
        m10 = median(runs["store_10k"])
        figures["store_10k"] = {"tracks": n_big, "median_seconds": m10, "from_store": big["from_store"],
                                "computed_seconds_estimated": round(computed_rate * n_big, 1),
                                "speedup_estimated": round(computed_rate * n_big / m10, 1),
                                "target_50x": computed_rate * n_big >= 50 * m10, "ran": big.get("ran")}

    if "one" not in a.skip:
        print("one clip:", flush=True)
        other = subset(all_test, os.path.join(work, "one-b"), 2)
        os.remove(sorted(os.path.join(d, f) for d, _, fs in os.walk(other) for f in fs)[0])
        ran = None
        for i in range(rounds):
            add("one_default", command(["classify", other, "--model", run, "--out", fresh(f"{work}/one-pred")],
                                       "classify 1 clip", log))
            ran = ran or last_run(f"{work}/one-pred").get("ran")
            add("one_ray", command(["classify", other, "--model", run, "--out", fresh(f"{work}/one-pred"), "--set",
                                    "classify.in_process_mb=0"], "classify 1 clip, Ray forced", log))
        figures["one_clip"] = {"median_seconds": median(runs["one_default"]), "ray_forced": median(runs["one_ray"]),
                               "ran": ran,
                               "target_5s": median(runs["one_default"]) <= 5.0}

    if "tagged" not in a.skip:
        print("tagged files:", flush=True)
        lib = f"{work}/tag-lib"
        shutil.rmtree(lib, ignore_errors=True)
        shutil.copytree(test, lib)  # tag writes the files: a copy
        tds, tpred = fresh(f"{work}/tag-ds"), fresh(f"{work}/tag-pred")
        command(["ingest", lib, "--out", tds], "ingest", log)
        command(["classify", lib, "--model", run, "--out", tpred, "--dataset", tds], "classify --dataset", log)
        command(["tag", tpred, "--apply"], "tag --apply", log)
        add("tagged_classify", command(["classify", lib, "--model", run, "--out", tpred, "--dataset", tds],
                                       "classify again", log))
        again = last_run(tpred)
        from genrecls.storage import Dataset

        before = len(Dataset(tds).tracks())
        add("tagged_ingest", command(["ingest", lib, "--out", tds], "ingest again", log))
        figures["tagged"] = {"files": n_test, "classify_decoded": again["classified"] - again["from_store"],
                             "classify_skipped_done": again["skipped_done"],
                             "ingest_tracks_after": len(Dataset(tds).tracks()), "ingest_tracks_before": before}
        with open(log) as f:
            tail = f.read().rsplit("$ ingest again", 1)[-1]
        figures["tagged"]["ingest_line"] = next((ln for ln in tail.splitlines() if "tracks found" in ln), None)

    results.update({"runs": runs, "figures": figures, "total_seconds": round(time.monotonic() - t_all, 1),
                    "load_at_end": load()})
    save(results, a.out)
    print(json.dumps(figures, indent=1, default=str)[:4000])
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
