"""Benchmark the embedding store (issue 19, part 1): whole commands, as a user or cron runs them.

On a real library (``--source``; ``/tmp/game-music`` was 5 styles, 155 tracks, 9.8 h; ``/work/realset`` is the
5-style real set), 90% of its tracks
first (every tenth track of each label held back, hard links), then all of them:

1. **today** (``--today REPO``: a checkout of genrecls before the store, e.g. ``git worktree add
   /tmp/genrecls-today 68ad242``; its commands run with ``PYTHONPATH=REPO``): ``genrecls ingest``
   then ``genrecls train`` (default model) on the 90% library.
2. **now**: ``genrecls ingest`` (embeddings on, the default) and ``genrecls train`` on the same
   library; also ``genrecls ingest --set ingest.embeddings=off`` into another dataset (the cost
   of the store inside ingest).  Ingest's throughput is audio time over wall time (x real time).
3. **retrain**: ``genrecls retrain`` on the 90% library from nothing (the first cycle: ingest +
   train), then again after the held-back 10% joined the library (the scheduled cycle).

   A third ``retrain`` with no new audio: what a cycle costs whatever the new files (start-up, a no-op
   ingest and, when the champion was kept, the training and scoring again), subtracted from both for the
   issue-26 figure (target 0.15): the new files' share of the work.

Targets: a scheduled retrain after 10% new tracks at most 0.25 of the first cycle; ``train``
on stored embeddings at least 10x faster than today's ``train``; the first cycle (ingest +
train) no slower than today's.  Each command is timed from its start to its exit (Python
start-up, Ray start-up included); the load average is recorded before and after each.

    .venv/bin/python bench/store.py --quick                         # a small synthetic library: a smoke run
    .venv/bin/python bench/store.py --today /tmp/genrecls-today     # the real library, today vs now

Writes ``bench/results/store.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from _results import genrecls_command, load, save  # noqa: E402  (bench/ is the script's folder)

AUDIO = (".wav", ".mp3", ".flac", ".ogg", ".opus", ".m4a", ".aac", ".aiff", ".wma")


def split_library(source: str, work: str) -> tuple[str, list[tuple[str, str]]]:
    """``work/lib``: hard links to 90% of ``source``'s tracks (every tenth of each label held back), and the
    (source, destination) pairs of the held-back 10%."""
    lib = os.path.join(work, "lib")
    shutil.rmtree(lib, ignore_errors=True)
    held = []
    for label in sorted(os.listdir(source)):
        folder = os.path.join(source, label)
        if not os.path.isdir(folder):
            continue
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(AUDIO))
        os.makedirs(os.path.join(lib, label), exist_ok=True)
        for i, f in enumerate(files):
            pair = (os.path.join(folder, f), os.path.join(lib, label, f))
            if i % 10 == 9:
                held.append(pair)
            else:
                _link(*pair)
    return lib, held


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def command(args: list[str], repo: str, what: str, log: str) -> dict:
    """``python -m genrecls ARGS`` with ``repo`` on PYTHONPATH (today's checkout or this one); any exit recorded."""
    return {"args": args, "repo": repo, **genrecls_command(args, what, log, ok=None, pythonpath=repo)}


def audio_hours(dataset: str) -> float:
    with open(os.path.join(dataset, "manifest.json")) as f:
        return json.load(f)["counts"]["audio_seconds"] / 3600


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small synthetic 16 kHz library: a smoke run")
    p.add_argument("--source", default="/tmp/game-music", help="the real library (SOURCE/<label>/<file>)")
    p.add_argument("--today", help="a genrecls checkout before the store (today's commands); omitted: not run")
    p.add_argument("--work", default="/tmp/bench-data/store")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra --set for every command")
    p.add_argument("--out", default=os.path.join(HERE, "results", "store.json"))
    a = p.parse_args()
    work = os.path.join(a.work, "quick" if a.quick else "real")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    source = a.source
    if a.quick:
        sys.path.insert(0, REPO)
        from genrecls.audio import make_sample_collection

        source = os.path.join(work, "source")
        make_sample_collection(source, genres=3, tracks_per_genre=10, seconds=20.0, sr=16000, formats=("wav",), seed=8)
        a.out = a.out.replace(".json", "-quick.json")
    log = os.path.join(work, "commands.log")
    lib, held = split_library(source, work)
    extra = [x for o in a.overrides for x in ("--set", o)]
    results: dict = {"quick": a.quick, "source": source, "held_back_tracks": len(held), "today_repo": a.today,
                     "log": log, "cpus": os.cpu_count(), "load_at_start": load()}
    t_all = time.monotonic()
    runs: dict[str, dict] = {}
    if a.today:
        print("today:", flush=True)
        runs["today_ingest"] = command(["ingest", lib, "--out", f"{work}/today-ds", "-q", *extra], a.today, "ingest", log)
        runs["today_train"] = command(["train", f"{work}/today-ds", "--out", f"{work}/today-run", "-q", *extra], a.today,
                                      "train", log)
    print("now:", flush=True)
    runs["ingest"] = command(["ingest", lib, "--out", f"{work}/ds", "-q", *extra], REPO, "ingest (embeddings on)", log)
    runs["train"] = command(["train", f"{work}/ds", "--out", f"{work}/run", "-q", *extra], REPO,
                            "train (stored embeddings)", log)
    runs["ingest_off"] = command(["ingest", lib, "--out", f"{work}/ds-off", "-q", "--set", "ingest.embeddings=off",
                                  *extra], REPO, "ingest (embeddings off)", log)
    print("retrain:", flush=True)
    reg = ["--dataset", f"{work}/r-ds", "--registry", f"{work}/reg", "-q", *extra]
    runs["retrain_first"] = command(["retrain", lib, *reg], REPO, "retrain, first cycle (from nothing)", log)
    for src, dst in held:
        _link(src, dst)
    runs["retrain_10pct"] = command(["retrain", lib, *reg], REPO, "retrain after 10% new tracks", log)
    # the cost of a cycle whatever the new files: the same command once more with no new audio.  The champion
    # was kept, so the dataset differs from its training data and the cycle trains and scores again: start-up,
    # a no-op ingest, the head's cross-validated fit on the stored embeddings, the holdout scoring of both
    runs["retrain_unchanged"] = command(["retrain", lib, *reg], REPO, "retrain again, no new audio", log)
    hours = audio_hours(f"{work}/ds")
    r = {k: v["seconds"] for k, v in runs.items()}
    figures = {
        "audio_hours_90pct": round(hours, 3),
        "ingest_x_real_time": round(hours * 3600 / r["ingest"], 1),
        "ingest_off_x_real_time": round(hours * 3600 / r["ingest_off"], 1),
        "store_cost_in_ingest": round(r["ingest"] / r["ingest_off"], 2),
        "first_cycle_seconds": round(r["ingest"] + r["train"], 1),
        "retrain_ratio": round(r["retrain_10pct"] / r["retrain_first"], 3),
        "target_retrain_0.25": r["retrain_10pct"] <= 0.25 * r["retrain_first"],
        "retrain_fixed_seconds": r["retrain_unchanged"],
        "retrain_ratio_fixed_subtracted": round((r["retrain_10pct"] - r["retrain_unchanged"])
                                                / (r["retrain_first"] - r["retrain_unchanged"]), 3),
        "target_retrain_0.15_fixed_subtracted": (r["retrain_10pct"] - r["retrain_unchanged"])
        <= 0.15 * (r["retrain_first"] - r["retrain_unchanged"]),
    }
    if a.today:
        figures.update({
            "today_first_cycle_seconds": round(r["today_ingest"] + r["today_train"], 1),
            "train_speedup_vs_today": round(r["today_train"] / r["train"], 1),
            "target_train_10x": r["today_train"] >= 10 * r["train"],
            "target_first_cycle_no_slower": r["ingest"] + r["train"] <= r["today_ingest"] + r["today_train"],
        })
    for name in ("r-ds", "ds"):
        with open(os.path.join(work, name, "manifest.json")) as f:
            figures[f"{name}_embeddings"] = json.load(f).get("embeddings")
    decisions = sorted(os.listdir(os.path.join(work, "reg", "decisions")))
    records = []
    for name in decisions:
        with open(os.path.join(work, "reg", "decisions", name)) as f:
            records.append(json.load(f))
    last = records[1]  # the 10% cycle
    figures["retrain_unchanged_decision"] = records[-1].get("decision")
    figures["retrain_10pct_embedded_tracks"] = last.get("ingest", {}).get("embedded_tracks")
    figures["retrain_10pct_scored_by"] = (last.get("challenger_metrics") or {}).get("scored_by")
    results.update({"runs": runs, "figures": figures, "total_seconds": round(time.monotonic() - t_all, 1),
                    "load_at_end": load()})
    save(results, a.out)
    print(json.dumps(figures, indent=1, default=str)[:3000])
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
