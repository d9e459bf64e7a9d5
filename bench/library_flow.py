"""Benchmark the library that teaches itself (issue 28): labels from a person's genre tags, fill, review.

The library: the real development set (default ``/work/realset``, 5 styles) laid out as people keep
music, ``LIB/<Artist>/<Album>/<NN> <title>.<ext>``: each style's tracks cut into albums of up to 8
tracks, each album by its own artist, every album re-encoded by one real encoder in turn (lame MP3
V2, ffmpeg AAC 160k in M4A, flac, oggenc q5, opusenc 128k), with album, artist and title tags;
70% of each style's albums carry a genre tag in one of several spellings (a few ``Unknown``), the
others none.  The flow, whole commands as a user runs them::

    genrecls ingest LIB --out DS --labels-from tags --labels VOCAB
    genrecls train DS --out RUN --labels VOCAB
    genrecls classify LIB --model RUN --out PRED --dataset DS
    genrecls tag PRED --apply

Then, against the answer key: the share of the untagged files that got a genre tag (target at least
80%), the share of written tags that are right (at least 90%), person-written tags changed (0),
files whose decoded audio changed (0: every file decoded to PCM before and after), and whether
classify decoded any stored file.  ``--clips`` runs the same flow on 100 clips of 30 s (each
command's time).  Records the CPU and the load around each command.

    .venv/bin/python bench/library_flow.py                # the real set, full tracks
    .venv/bin/python bench/library_flow.py --clips 100    # 100 clips of 30 s

Writes ``bench/results/library-flow.json`` (``library-flow-clips.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from _results import cpu_model, genrecls_command, load, save  # noqa: E402  (bench/ is the script's folder)

#: each style's tag spellings (the first is the vocabulary's genre name) and its artist's name
STYLES = {
    "orchestral_wesnoth": ("Orchestral", ["Orchestral", "orchestral", "Orchestra", "Symphonic"]),
    "electronic_warzone2100": ("Electronic", ["Electronic", "electronic", "Electronica", "ELECTRONIC"]),
    "game_supertux": ("Chiptune", ["Chiptune", "chiptune", "Chip-tune", "8-bit"]),
    "game_hedgewars": ("Game", ["Game", "Video Game Music", "game", "VGM"]),
    "metal_fretsonfire": ("Metal", ["Metal", "metal", "Heavy Metal", "METAL"]),
}
ENCODERS = ("mp3", "m4a", "flac", "ogg", "opus")
ALBUM_TRACKS = 8


def command(args: list[str], what: str, log: str) -> dict:
    """A whole genrecls command, quiet; any exit but 0 stops the bench."""
    return genrecls_command([*args, "-q"], what, log)


def encode(src: str, dst: str, codec: str, start: float | None = None, seconds: float | None = None) -> None:
    """``src`` (any format, optionally a window) -> ``dst`` by the real encoder of ``codec``."""
    cut = (["-ss", str(start)] if start else []) + (["-t", str(seconds)] if seconds else [])
    wav = dst + ".wav"
    subprocess.run(["ffmpeg", "-v", "error", "-y", *cut, "-i", src, "-ar", "44100", "-ac", "2", wav], check=True)
    try:
        if codec == "mp3":
            cmd = ["lame", "--quiet", "-V2", wav, dst]
        elif codec == "m4a":
            cmd = ["ffmpeg", "-v", "error", "-y", "-i", wav, "-c:a", "aac", "-b:a", "160k", dst]
        elif codec == "flac":
            cmd = ["flac", "--silent", "-f", "-o", dst, wav]
        elif codec == "ogg":
            cmd = ["oggenc", "--quiet", "-q", "5", "-o", dst, wav]
        else:
            cmd = ["opusenc", "--quiet", "--bitrate", "128", wav, dst]
        subprocess.run(cmd, check=True)
    finally:
        os.remove(wav)


def write_tags(path: str, genre: str | None, album: str, artist: str, title: str) -> None:
    """A person's tags, by mutagen (MP4 atoms for M4A; genrecls.audio.write_person_tags for the rest)."""
    from genrecls.audio import write_person_tags

    if path.endswith(".m4a"):
        from mutagen.mp4 import MP4

        f = MP4(path)
        for key, value in (("\xa9gen", genre), ("\xa9alb", album), ("\xa9ART", artist), ("aART", artist),
                           ("\xa9nam", title)):
            if value:
                f[key] = [value]
        f.save()
    else:
        write_person_tags(path, genre=[genre] if genre else None, album=album, artist=artist, title=title)


def build_library(source: str, lib: str, clips: int, tagged: float, seed: int) -> dict[str, dict]:
    """The artist/album library and its answer key (relative path -> style, tag written, album)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    key_path = os.path.join(lib, ".answer-key.json")
    if os.path.exists(key_path):
        with open(key_path) as f:
            return json.load(f)
    shutil.rmtree(lib, ignore_errors=True)
    truth: dict[str, dict] = {}
    n_files = 0
    per_style = -(-clips // len(STYLES)) if clips else 0
    for s_i, (style, (name, spellings)) in enumerate(STYLES.items()):
        folder = os.path.join(source, style)
        tracks = sorted(f for f in os.listdir(folder) if not f.startswith("."))
        if clips:
            tracks = [(t, off) for off in (30.0, 90.0, 150.0) for t in tracks][:per_style]
        else:
            tracks = [(t, None) for t in tracks]
        albums = [tracks[i:i + ALBUM_TRACKS] for i in range(0, len(tracks), ALBUM_TRACKS)]
        n_tag = max(1, round(tagged * len(albums)))
        chosen = set(rng.permutation(len(albums))[:n_tag].tolist())
        for a_i, album_tracks in enumerate(albums):
            artist = f"{name} Artist {a_i + 1:02d}"
            album = f"{name} Album {a_i + 1:02d}"
            codec = ENCODERS[(s_i + a_i) % len(ENCODERS)]
            tag = None
            if a_i in chosen:
                tag = "Unknown" if (a_i % 9 == 8) else spellings[int(rng.integers(len(spellings)))]
            for t_i, (track, off) in enumerate(album_tracks):
                title = os.path.splitext(track)[0] + (f" at {int(off)} s" if off else "")
                rel = f"{artist}/{album}/{t_i + 1:02d} {title}.{codec}"
                dst = os.path.join(lib, rel)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                encode(os.path.join(folder, track), dst, codec, off, 30.0 if clips else None)
                write_tags(dst, tag, album, artist, title)
                truth[rel] = {"style": style, "genre": name, "tag": tag, "album": album}
                n_files += 1
    with open(key_path, "w") as f:
        json.dump(truth, f)
    return truth


def vocabulary(path: str) -> str:
    lines = ['# the genres of this library and how its tags spell them', 'drop = ["Unknown"]', ""]
    for name, spellings in STYLES.values():
        lines += [f'[genres."{name}"]', "aliases = [" + ", ".join(f'"{s}"' for s in spellings[1:]) + "]", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def audio_digest(path: str) -> str:
    """BLAKE2b of the file's decoded PCM (ffmpeg, native rate and channels, s16); "undecodable: ..." for a
    file ffmpeg cannot decode (a 30-s clip cut past the end of a shorter track holds no audio frame)."""
    done = subprocess.run(["ffmpeg", "-v", "error", "-i", path, "-map", "0:a:0", "-f", "s16le", "-"],
                          capture_output=True)
    if done.returncode:
        return "undecodable: " + done.stderr.decode(errors="replace").strip().splitlines()[-1][-120:]
    return hashlib.blake2b(done.stdout, digest_size=16).hexdigest()


def genre_tags(path: str) -> list[str]:
    from genrecls.audio import current_genres, open_tags, read_fields

    fmt, audio = open_tags(path)
    return current_genres(fmt, read_fields(fmt, audio))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="/work/realset")
    p.add_argument("--clips", type=int, default=0, help="N clips of 30 s instead of the full tracks")
    p.add_argument("--tagged", type=float, default=0.7, help="share of each style's albums with a genre tag")
    p.add_argument("--work", default="/tmp/bench-data/library-flow")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    name = "library-flow" + ("-clips" if a.clips else "")
    out_json = a.out or os.path.join(HERE, "results", f"{name}.json")
    work = os.path.join(a.work, "clips" if a.clips else "full")
    os.makedirs(work, exist_ok=True)
    log = os.path.join(work, "commands.log")
    t0 = time.monotonic()
    lib = os.path.join(work, "lib")
    truth = build_library(a.source, lib, a.clips, a.tagged, a.seed)
    build_s = time.monotonic() - t0
    vocab = vocabulary(os.path.join(work, "genres.toml"))
    ds, run, pred = (os.path.join(work, n) for n in ("ds", "run", "pred"))
    for d in (ds, run, pred):
        shutil.rmtree(d, ignore_errors=True)
    before_audio = {rel: audio_digest(os.path.join(lib, rel)) for rel in truth}
    before_tags = {rel: genre_tags(os.path.join(lib, rel)) for rel in truth}
    results: dict = {"cpu": cpu_model(), "cpus": os.cpu_count(), "load_at_start": load(), "files": len(truth),
                     "build_seconds": round(build_s, 1), "log": log, "source": a.source, "clips": a.clips,
                     "tagged_albums_share": a.tagged,
                     "encoders": {c: sum(r.endswith("." + c) for r in truth) for c in ENCODERS}}
    runs = {
        "ingest": command(["ingest", lib, "--out", ds, "--labels-from", "tags", "--labels", vocab], "ingest", log),
        "train": command(["train", ds, "--out", run, "--labels", vocab], "train", log),
        "classify": command(["classify", lib, "--model", run, "--out", pred, "--dataset", ds], "classify --dataset", log),
        "tag": command(["tag", pred, "--apply"], "tag --apply", log),
    }
    with open(os.path.join(pred, "classify.json")) as f:
        last = json.load(f)["last_run"]
    untagged = [r for r, t in truth.items() if t["tag"] is None]
    person = [r for r, t in truth.items() if t["tag"] is not None]
    after_tags = {rel: genre_tags(os.path.join(lib, rel)) for rel in truth}
    undecodable = sorted(r for r, d in before_audio.items() if d.startswith("undecodable"))
    filled = [r for r in untagged if after_tags[r]]
    decodable_untagged = [r for r in untagged if r not in undecodable]
    right = [r for r in filled if after_tags[r] and after_tags[r][0] == truth[r]["genre"]]
    changed_person = [r for r in person if after_tags[r] != before_tags[r]]
    changed_audio = [r for r in truth if audio_digest(os.path.join(lib, r)) != before_audio[r]]
    review = os.path.join(pred, "review.csv")
    n_review = max(0, sum(1 for _ in open(review)) - 1) if os.path.exists(review) else None
    figures = {
        "untagged_files": len(untagged), "filled": len(filled), "filled_share": round(len(filled) / max(1, len(untagged)), 3),
        "undecodable_files": len(undecodable), "undecodable": undecodable[:20],
        "filled_share_of_decodable": round(len(filled) / max(1, len(decodable_untagged)), 3),
        "written_right": len(right), "written_right_share": round(len(right) / max(1, len(filled)), 3),
        "person_tags_changed": len(changed_person), "files_with_changed_audio": len(changed_audio),
        "classify_from_store": last.get("from_store"), "classify_decoded": last["classified"] - last.get("from_store", 0),
        "review_rows": n_review,
        "target_filled_0.8": len(filled) >= 0.8 * len(untagged),
        "target_right_0.9": len(right) >= 0.9 * max(1, len(filled)),
        "target_person_0": not changed_person, "target_audio_0": not changed_audio,
        "seconds": {k: v["seconds"] for k, v in runs.items()},
    }
    results.update({"runs": runs, "figures": figures, "total_seconds": round(time.monotonic() - t0, 1),
                    "load_at_end": load()})
    save(results, out_json)
    print(json.dumps(figures, indent=1))
    print(f"wrote {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
