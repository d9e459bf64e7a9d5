"""``genrecls tag`` (issue 22): predicted genres written into real files of every format, with a journal and undo.

The library is the committed real-encoder fixtures of ``tests/data/tags`` (lame, ffmpeg's AAC,
WMA, AIFF and WAV, sox, flac, oggenc, opusenc: ``make_fixtures.py``), copied per test; the
predictions are rows of ``genrecls.storage.predictions``' schema written for them (plus the ``genres``
and ``uncertain`` columns of the calibration work where a test needs them).  Files are read back
with mutagen and with FFmpeg's metadata reader (PyAV), and decoded before and after with PyAV:
the samples must be identical.  Ray is the session's real local Ray; the kill test kills a real
``genrecls tag`` process and its worker with SIGKILL at a deterministic point.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import av
import mutagen
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mutagen.id3 import TCON

from genrecls.audio.discovery import track_id_for
from genrecls.audio.pipeline import fingerprint_file
from genrecls.audio.tags import PROVENANCE, open_tags, read_fields, read_provenance
from genrecls.jobs.tagging import (
    JOURNAL,
    LIBRARY_TMP_PREFIX,
    PREVIEW,
    decide,
    journal_runs,
    list_journals,
    read_journal,
    tag,
    undo,
)
from genrecls.storage.location import Location
from genrecls.storage.locks import folder_lock
from genrecls.storage.predictions import PARTS, PredictionStore, conform, prediction_columns, prediction_schema

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "data" / "tags"
LABELS = ["classical", "electronic", "jazz", "rock"]
#: the formats genrecls writes, by fixture extension
WRITABLE = ["mp3", "m4a", "aiff", "wav", "wma", "flac", "ogg", "opus"]
ID3 = {"mp3", "aiff", "wav"}
VOCAB = {"rock": "Rock", "jazz": "Jazz Fusion", "electronic": "Electronic", "classical": None}


# -- helpers --------------------------------------------------------------------------------
def library(tmp: Path, names: list[str] | None = None, copies: int = 1) -> Path:
    """Fixture files copied into ``tmp/lib`` (``copies`` > 1: ``lib/cN/<name>``, several folders)."""
    lib = tmp / "lib"
    names = names or sorted(p.name for p in FIXTURES.iterdir() if p.suffix not in (".py", ".json"))
    for c in range(copies):
        folder = lib / f"c{c}" if copies > 1 else lib
        folder.mkdir(parents=True, exist_ok=True)
        for n in names:
            shutil.copy(FIXTURES / n, folder / n)
    return lib


def write_predictions(out: Path | str, lib: Path, rows: dict[str, dict], model_id: str = "model-a") -> Path | str:
    """A predictions folder as ``genrecls classify`` writes it, for files as they are now.

    ``rows``: path -> ``genre`` (a label or ``"uncertain"``), optional ``confidence``,
    ``genres`` (the calibration work's list column) and ``top_genre``.
    """
    paths = sorted(rows)
    probs = np.full((len(paths), len(LABELS)), 0.1, np.float32)
    for i, p in enumerate(paths):
        top = rows[p].get("top_genre") or rows[p]["genre"]
        probs[i, LABELS.index(top)] = 0.7
    cols = prediction_columns(probs, LABELS, 3)
    stats = [os.stat(lib / p) if (lib / p).exists() else os.stat(FIXTURES / "plain.mp3") for p in paths]
    table = pa.table({
        "path": paths, "track_id": [track_id_for(p) for p in paths], **cols,
        "n_segments": pa.array([1] * len(paths), pa.int32()), "duration": [1.0] * len(paths),
        "size": pa.array([s.st_size for s in stats], pa.int64()),
        "mtime_ns": pa.array([s.st_mtime_ns for s in stats], pa.int64()),
        "model_id": [model_id] * len(paths),
        "classified_at": pa.array([dt.datetime.now(dt.timezone.utc)] * len(paths), pa.timestamp("ms", tz="UTC"))})
    table = conform(table, prediction_schema(LABELS, model_id))  # the answer columns (issue 21): null unless given
    table = table.set_column(table.schema.get_field_index("genre"), "genre",
                             pa.array([rows[p]["genre"] for p in paths], pa.string()))
    conf = [rows[p].get("confidence", 0.7) for p in paths]
    table = table.set_column(table.schema.get_field_index("confidence"), "confidence", pa.array(conf, pa.float32()))
    if any("genres" in r for r in rows.values()):
        table = table.set_column(table.schema.get_field_index("genres"), "genres",
                                 pa.array([rows[p].get("genres") for p in paths], pa.list_(pa.string())))
        table = table.set_column(table.schema.get_field_index("top_genre"), "top_genre",
                                 pa.array([rows[p].get("top_genre") for p in paths], pa.string()))
    store = PredictionStore(str(out))
    for name in store.part_names():
        store.loc.delete(PARTS, name)
    store.loc.write_atomic(f"{PARTS}/part-0.parquet", lambda f: pq.write_table(table, f))
    store.write_info(run="test", model_id=model_id, labels=LABELS, features={}, library=str(lib), last_run={})
    return out


def decode(path: Path) -> np.ndarray:
    """Every sample FFmpeg decodes, in the stream's own format."""
    with av.open(str(path)) as c:
        frames = [f.to_ndarray() for f in c.decode(audio=0)]
    return np.concatenate(frames, axis=-1)


def ffmpeg_genre(path: Path) -> str | None:
    """The genre FFmpeg's metadata reader shows (container or stream level)."""
    with av.open(str(path)) as c:
        meta = {**{k.lower(): v for k, v in c.streams.audio[0].metadata.items()},
                **{k.lower(): v for k, v in c.metadata.items()}}
    return meta.get("genre")


def fields(path: Path) -> tuple[str, dict]:
    fmt, audio = open_tags(str(path))
    return fmt, read_fields(fmt, audio)


def every_tag(path: Path) -> list[str]:
    """Every tag field mutagen reads in the file, as text (for 'nothing else changed' checks)."""
    f = mutagen.File(str(path))
    return sorted(f.tags.pprint().splitlines()) if f is not None and f.tags is not None else []


def report(summary: dict) -> dict[str, dict]:
    folder = Path(summary["report"]).parent
    return {r["path"]: r for r in pq.read_table(folder / "report.parquet").to_pylist()}


def snapshot(lib: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(lib).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(lib.rglob("*")) if p.is_file()}


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genrecls", "tag", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=timeout)


# -- the rule -------------------------------------------------------------------------------
def test_the_rule_keeps_a_persons_genre_and_replaces_only_its_own():
    ours = {"model": "m1", "genres": ["Rock"], "written": ["Rock"]}
    assert decide([], None, ["Rock"], "m1")[:2] == ("new", ["Rock"])
    assert decide(["Jazz"], None, ["Rock"], "m1")[0] == "tagged"
    assert decide(["Jazz"], None, ["Rock"], "m1", "overwrite")[:3] == ("overwrite", ["Rock"], ["Rock"])
    assert decide(["Jazz"], None, ["Rock", "jazz"], "m1", "add")[:3] == ("add", ["Jazz", "Rock"], ["Rock"])
    assert decide(["Jazz"], None, ["jazz"], "m1", "add")[0] == "up_to_date"
    assert decide(["Rock"], ours, ["Rock"], "m1")[0] == "up_to_date"
    assert decide(["Rock"], ours, ["Rock"], "m2")[0] == "provenance"
    assert decide(["Rock"], ours, ["Blues"], "m2")[:3] == ("replace_own", ["Blues"], ["Blues"])
    added = {"model": "m1", "genres": ["Rock"], "written": ["Jazz", "Rock"]}  # an earlier --add
    assert decide(["Jazz", "Rock"], added, ["Blues"], "m2")[:3] == ("replace_own", ["Jazz", "Blues"], ["Blues"])
    assert decide(["Bebop"], ours, ["Blues"], "m2")[0] == "edited"  # a person changed genrecls's genre
    assert decide([], ours, ["Blues"], "m2")[0] == "edited"  # ... or removed it
    assert decide(["Bebop"], ours, ["Blues"], "m2", "overwrite")[:2] == ("overwrite", ["Blues"])


# -- every format -----------------------------------------------------------------------------
def test_preview_then_every_format_tagged_read_by_mutagen_and_ffmpeg_with_identical_audio(ray_local, tmp_path):
    lib = library(tmp_path)
    rows = {p.name: {"genre": "rock", "genres": ["rock", "jazz", "classical"]} for p in lib.iterdir()}
    out = write_predictions(tmp_path / "pred", lib, rows)
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps(VOCAB))
    audio = {p.name: decode(p) for p in lib.iterdir() if p.suffix != ".aac"}
    os.chmod(lib / "plain.ogg", 0o640)
    owner = (1234, 5678) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    os.chown(lib / "plain.flac", *owner)  # as root, ownership can be given away: it must be kept
    modes = {p.name: p.stat().st_mode for p in lib.iterdir()}
    before = snapshot(lib)

    preview = tag(str(out), vocabulary=str(vocab), progress=False)
    assert snapshot(lib) == before, "a preview changed the library"
    table = report(preview)
    assert Path(preview["report"]) == out / PREVIEW / "report.csv" and (out / PREVIEW / "report.parquet").is_file()
    assert {p for p, r in table.items() if r["action"] == "would_write"} == {f"plain.{e}" for e in WRITABLE}
    assert table["plain.mp3"]["new"] == "Rock; Jazz Fusion" and table["plain.mp3"]["current"] is None
    assert {table[f"tagged.{e}"]["kind"] for e in WRITABLE} == {"tagged"}
    assert table["tagged.flac"]["current"] == "Jazz" and "--overwrite" in table["tagged.flac"]["reason"]
    assert table["plain.aac"]["kind"] == "unsupported" and table["plain.aac"]["reason"]
    assert table["info.wav"]["kind"] == "foreign_genre" and "RIFF INFO" in table["info.wav"]["reason"]
    assert not list(out.glob(f"{JOURNAL}/*"))

    summary = tag(str(out), apply=True, vocabulary=str(vocab), progress=False)
    assert summary["by_action"] == {"written": 8, "skip": 10} and summary["failed"] == 0
    for ext in WRITABLE:
        path = lib / f"plain.{ext}"
        fmt, f = fields(path)
        genre_field = {"mp3": "TCON", "aiff": "TCON", "wav": "TCON", "m4a": "©gen", "wma": "WM/Genre"}.get(ext, "GENRE")
        assert f[genre_field] == ["Rock", "Jazz Fusion"], (ext, f)  # multi-valued, best first, the user's names
        prov = read_provenance(fmt, f)
        assert prov["model"] == "model-a" and prov["confidence"] == pytest.approx(0.7)
        assert prov["genres"] == prov["written"] == ["Rock", "Jazz Fusion"]
        if ext in ID3:
            assert mutagen.File(str(path)).tags.version[:2] == (2, 4)
            assert f[f"TXXX:{PROVENANCE}"]
        seen = ffmpeg_genre(path)  # another tool sees the genre (FFmpeg shows the first ID3v2.4/MP4/ASF value)
        assert seen is not None and seen.startswith("Rock"), (ext, seen)
        np.testing.assert_array_equal(decode(path), audio[path.name], err_msg=ext)
        assert path.stat().st_mode == modes[path.name]  # the original's mode, kept by the renamed copy
    assert (os.stat(lib / "plain.flac").st_uid, os.stat(lib / "plain.flac").st_gid) == owner
    for name, (data, _) in before.items():
        if not name.startswith("plain.") or name == "plain.aac":
            assert (lib / name).read_bytes() == data, f"{name} was changed"
    assert not list(lib.glob(f"{LIBRARY_TMP_PREFIX}*"))
    journal = read_journal(out / JOURNAL / summary["run"])
    assert sorted(journal.column("path").to_pylist()) == sorted(f"plain.{e}" for e in WRITABLE)
    for row in journal.to_pylist():
        assert row["fingerprint_after"] == fingerprint_file(str(lib / row["path"])) != row["fingerprint_before"]
        assert row["fingerprint_before"] == fingerprint_file(str(FIXTURES / row["path"]))
        assert json.loads(row["old"]) == dict.fromkeys(json.loads(row["new"]))  # nothing there before
    info = json.loads((out / JOURNAL / summary["run"] / "run.json").read_text())
    assert info["finished"] and info["library"] == str(lib)

    again = tag(str(out), apply=True, vocabulary=str(vocab), progress=False)  # a re-run writes nothing
    assert again["by_action"].get("written", 0) == 0 and again["by_kind"]["up_to_date"] == 8


def test_overwrite_add_id3v23_and_a_persons_edit_across_reruns(ray_local, tmp_path):
    lib = library(tmp_path, [f"tagged.{e}" for e in WRITABLE] + ["plain.mp3", "plain.wav"])
    names = sorted(p.name for p in lib.iterdir())
    out = write_predictions(tmp_path / "pred", lib, {n: {"genre": "rock"} for n in names})
    def others(n: str) -> list[str]:  # every field but the genre and genrecls's provenance
        return [t for t in every_tag(lib / n) if "genre" not in t.lower() and not t.startswith(("TCON", "©gen"))]

    before = {n: others(n) for n in names}

    mtimes = {n: os.stat(lib / n).st_mtime_ns for n in names}
    added = tag(str(out), apply=True, mode="add", keep_mtime=True, progress=False)
    assert added["by_kind"] == {"add": 8, "new": 2}
    assert {n: os.stat(lib / n).st_mtime_ns for n in names} == mtimes  # --keep-mtime
    for n in names:
        fmt, f = fields(lib / n)
        expect = ["rock"] if n.startswith("plain") else ["Jazz", "rock"]
        genres = f["TCON"] if fmt in ID3 else f[{"mp4": "©gen", "asf": "WM/Genre"}.get(fmt, "GENRE")]
        if n == "tagged.mp3":  # lame's tag is ID3v2.3: it stays v2.3, values joined by the separator
            assert mutagen.File(str(lib / n)).tags.version[:2] == (2, 3) and genres == ["Jazz/rock"]
        else:
            assert genres == expect, (n, genres)
        assert others(n) == before[n], f"{n}: another field changed"

    # the prediction changes: genrecls replaces its own genre and keeps the person's
    write_predictions(out, lib, {n: {"genre": "electronic"} for n in names})
    # ... but the stat changed since: the rows above are of the files as genrecls left them, like a re-classify
    changed = tag(str(out), apply=True, mode="keep", progress=False)
    assert changed["by_kind"] == {"replace_own": 10}
    _, f = fields(lib / "tagged.flac")
    assert f["GENRE"] == ["Jazz", "electronic"]

    # a person edits genrecls's genre in one file; the library is classified again; re-runs keep the edit
    wav = mutagen.File(str(lib / "plain.wav"))
    wav.tags.delall("TCON")
    wav.tags.add(TCON(encoding=3, text=["Bebop"]))
    wav.save()
    write_predictions(out, lib, {n: {"genre": "rock"} for n in names})
    kept = tag(str(out), apply=True, progress=False)
    assert report(kept)["plain.wav"]["kind"] == "edited" and fields(lib / "plain.wav")[1]["TCON"] == ["Bebop"]
    over = tag(str(out), apply=True, mode="overwrite", id3v23=True, separator="; ", max_genres=2, progress=False)
    assert report(over)["plain.wav"]["kind"] == "overwrite"

    # ID3v2.3 with a separator, two genres: the calibration work's list column
    write_predictions(out, lib, {n: {"genre": "rock", "genres": ["rock", "jazz"]} for n in names})
    v23 = tag(str(out), apply=True, mode="overwrite", id3v23=True, separator="; ", progress=False)
    assert v23["failed"] == 0
    for n in ("plain.mp3", "plain.wav", "tagged.aiff", "tagged.mp3"):
        tags = mutagen.File(str(lib / n)).tags
        assert tags.version[:2] == (2, 3) and tags.getall("TCON")[0].text == ["rock; jazz"], n
        assert ffmpeg_genre(lib / n) == "rock; jazz"
    again = tag(str(out), apply=True, mode="overwrite", id3v23=True, separator="; ", progress=False)
    assert again["by_kind"] == {"up_to_date": 10}  # its own v2.3 genres read back through the separator


def test_undo_restores_every_field_exactly_and_is_journaled(ray_local, tmp_path):
    lib = library(tmp_path, [f"{k}.{e}" for k in ("plain", "tagged") for e in WRITABLE])
    names = sorted(p.name for p in lib.iterdir())
    out = write_predictions(tmp_path / "pred", lib, {n: {"genre": "rock"} for n in names})
    tags_before = {n: every_tag(lib / n) for n in names}
    audio = {n: decode(lib / n) for n in names}
    first = tag(str(out), apply=True, mode="overwrite", progress=False)
    assert first["by_action"]["written"] == 16
    # a person re-tags one file after the run: undo must leave it alone
    ogg = mutagen.File(str(lib / "tagged.ogg"))
    ogg["GENRE"] = ["Bossa Nova"]
    ogg.save()
    edited = every_tag(lib / "tagged.ogg")

    run = out / JOURNAL / first["run"]
    listed = list_journals(str(out))
    assert [(r["run"], r["action"], r["written"], r["undone_by"]) for r in listed] == [(first["run"], "tag", 16, None)]
    restored = undo(str(run / "journal.parquet"), progress=False)  # a file inside the run's folder names the run
    assert restored["by_action"] == {"written": 15, "skip": 1}
    assert [r["undone_by"] for r in list_journals(str(out))] == [restored["run"], None]
    rep = report(restored)
    assert rep["tagged.ogg"]["kind"] == "changed" and "fingerprint" in rep["tagged.ogg"]["reason"]
    assert every_tag(lib / "tagged.ogg") == edited
    for n in names:
        if n != "tagged.ogg":
            assert every_tag(lib / n) == tags_before[n], n  # every field, the genre and the rest, as before
        np.testing.assert_array_equal(decode(lib / n), audio[n], err_msg=n)
    undo_run = read_journal(out / JOURNAL / restored["run"])
    assert undo_run.num_rows == 15 and set(undo_run.column("action").to_pylist()) == {"undo"}
    assert set(undo_run.column("undoes").to_pylist()) <= set(read_journal(run).column("entry_id").to_pylist())
    twice = undo(str(run), progress=False)
    assert twice["already_undone"] == 15 and twice["files"] == 1  # only the file skipped before is tried again
    # the undo itself can be undone
    redo = undo(str(out / JOURNAL / restored["run"]), progress=False)
    assert redo["by_action"] == {"written": 15}
    assert fields(lib / "plain.flac")[1]["GENRE"] == ["rock"]


def test_changed_read_only_vanished_unparseable_uncertain_files_are_recorded_and_the_run_goes_on(ray_local, tmp_path):
    lib = library(tmp_path, ["plain.mp3", "plain.flac", "plain.ogg", "plain.opus", "plain.m4a", "plain.wav"])
    (lib / "broken.flac").write_bytes(b"fLaC" + b"\x00\x00\x00\x22" + bytes(range(200)))  # a STREAMINFO cut short
    rows = {n: {"genre": "rock"} for n in ("plain.mp3", "plain.flac", "plain.ogg", "broken.flac")}
    rows["plain.opus"] = {"genre": "uncertain", "top_genre": "jazz", "confidence": 0.4, "genres": []}
    rows["plain.m4a"] = {"genre": "jazz", "confidence": 0.3}
    rows["plain.wav"] = {"genre": "rock"}
    (tmp_path / "escape.mp3").write_bytes((FIXTURES / "plain.mp3").read_bytes())
    rows["../escape.mp3"] = {"genre": "rock"}  # a predictions file pointing outside the library is never followed
    out = write_predictions(tmp_path / "pred", lib, rows)
    # after classification: one file re-encoded (other audio), one read-only, one gone
    shutil.copy(FIXTURES / "tagged.mp3", lib / "plain.mp3")
    os.chmod(lib / "plain.flac", 0o444)
    (lib / "plain.wav").unlink()
    before = snapshot(lib)
    summary = tag(str(out), apply=True, min_confidence=0.5, progress=False)
    rep = report(summary)
    assert {p: r["kind"] for p, r in rep.items()} == {
        "plain.mp3": "changed", "plain.flac": "read_only", "plain.ogg": "new", "broken.flac": "unparseable",
        "plain.opus": "uncertain", "plain.m4a": "low_confidence", "plain.wav": "missing", "../escape.mp3": "outside_root"}
    assert "changed since classification" in rep["plain.mp3"]["reason"]
    assert "jazz" in rep["plain.opus"]["reason"] and "0.5" in rep["plain.m4a"]["reason"]
    assert summary["failed"] == 2
    after = snapshot(lib)
    assert {n for n in before if before[n] != after.get(n)} == {"plain.ogg"}
    assert oct(os.stat(lib / "plain.flac").st_mode & 0o777) == "0o444"
    # the CLI: --strict exits 1 for the failures, a second tag on the locked predictions exits 4
    res = cli(str(out), "--apply", "--strict", "-q", "--min-confidence", "0.5", env={"RAY_ADDRESS": ""})
    assert res.returncode == 1 and "--strict: 2 file(s) failed" in res.stderr, res.stderr[-2000:]
    with folder_lock(Location.parse(str(out)), "genrecls tag"):
        res = cli(str(out), "-q", env={"RAY_ADDRESS": ""})
    assert res.returncode == 4 and "locked" in res.stderr and "genrecls tag" in res.stderr
    res = cli(str(tmp_path), "-q")
    assert res.returncode == 2 and "classify.json" in res.stderr


def test_journal_and_reports_on_s3(s3_server, ray_local, tmp_path):
    """PREDICTIONS on an S3-compatible server: journal parts, reports and undo go there; the library is local."""
    lib = library(tmp_path, ["plain.mp3", "tagged.flac", "plain.m4a"])
    uri = s3_server.uri(s3_server.bucket("tagjournal"), "pred")
    write_predictions(uri, lib, {n: {"genre": "rock"} for n in ("plain.mp3", "tagged.flac", "plain.m4a")})
    summary = tag(uri, apply=True, mode="overwrite", progress=False)
    assert summary["by_action"] == {"written": 3} and summary["journal"].startswith("s3://")
    keys = s3_server.keys("tagjournal", f"pred/{JOURNAL}/{summary['run']}/")
    assert {k.rsplit("/", 1)[1] for k in keys} >= {"run.json", "report.parquet", "report.csv"}
    assert read_journal(summary["journal"]).num_rows == 3
    restored = undo(summary["journal"], progress=False)
    assert restored["by_action"] == {"written": 3}
    assert fields(lib / "tagged.flac")[1]["GENRE"] == ["Jazz"] and not fields(lib / "plain.mp3")[1]["TCON"]


def _check_old_or_new(lib: Path, originals: dict[str, str], out: Path) -> tuple[set[str], dict]:
    """Every file is its old bytes or a journaled new version; returns the new ones and the killed run's pending rows."""
    runs = journal_runs(Location.parse(str(out)))
    assert len(runs) == 1
    run = out / JOURNAL / runs[0]
    pending = {r["path"]: r for r in read_journal(run, pending=True).to_pylist()}
    applied = {r["path"]: r for r in read_journal(run).to_pylist()}
    new = set()
    for path, fp in originals.items():
        now = fingerprint_file(str(lib / path))
        row = pending.get(path) or applied.get(path)
        if now == fp:
            assert row is None or row["fingerprint_before"] == fp
        else:  # written: the journal holds it, with this very fingerprint
            assert row is not None and row["fingerprint_after"] == now, path
            new.add(path)
    return new, pending


def _rest_of_run(lib: Path, out: Path, originals: dict[str, str], audio: dict[str, np.ndarray], new: set[str]) -> None:
    """The same command again: settles the killed run, writes only what is left; everything tagged once."""
    again = tag(str(out), apply=True, progress=False)
    (name, rec), = again["recovered"].items()
    assert rec["applied"] == len(new) and rec["temporaries_removed"] >= 1
    assert again["by_kind"] == {"new": len(originals) - len(new), "up_to_date": len(new)}
    assert not [p for p in lib.rglob("*") if p.name.startswith(LIBRARY_TMP_PREFIX)]
    written = pa.concat_tables([read_journal(out / JOURNAL / r) for r in journal_runs(Location.parse(str(out)))])
    assert sorted(written.column("path").to_pylist()) == sorted(originals)  # each file journaled exactly once
    assert not list((out / JOURNAL).rglob("pending-*"))
    for path in originals:
        assert fields(lib / path)[1]["GENRE" if path.endswith((".flac", ".ogg", ".opus")) else "TCON"] == ["rock"]
        np.testing.assert_array_equal(decode(lib / path), audio[path], err_msg=path)


def _kill_library(tmp_path: Path) -> tuple[Path, Path, dict[str, str], dict[str, np.ndarray]]:
    lib = library(tmp_path, ["plain.mp3", "plain.flac", "plain.ogg", "plain.opus"], copies=3)
    paths = sorted(p.relative_to(lib).as_posix() for p in lib.rglob("*.*"))
    out = write_predictions(tmp_path / "pred", lib, {p: {"genre": "rock"} for p in paths})
    originals = {p: fingerprint_file(str(lib / p)) for p in paths}
    audio = {p: decode(lib / p) for p in paths}
    return lib, out, originals, audio


def test_kill_9_in_the_middle_leaves_every_file_old_or_new_and_the_rerun_finishes(ray_local, tmp_path, pauses):
    lib, out, originals, audio = _kill_library(tmp_path)
    address = ray_local.get_runtime_context().gcs_address
    pauses.arm("tag-renamed-3")  # the first task to rename its third file waits there
    proc = subprocess.Popen([sys.executable, "-m", "genrecls", "tag", str(out), "--apply", "--address", address,
                             "--workers", "1", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        worker = pauses.wait("tag-renamed-3", proc)
    finally:
        proc.kill()  # kill -9 of the command, then of the Ray worker in the middle of its renames
        proc.communicate()
    try:
        os.kill(worker, signal.SIGKILL)
    except ProcessLookupError:  # Ray already stopped the workers of the dead driver's job
        pass
    assert proc.returncode == -signal.SIGKILL
    new, pending = _check_old_or_new(lib, originals, out)
    assert len(new) == 3 and new <= set(pending)  # exactly the three renames made, each journaled as pending
    assert [p for p in lib.rglob("*") if p.name.startswith(LIBRARY_TMP_PREFIX)]  # its prepared copies, hidden
    _rest_of_run(lib, out, originals, audio, new)


def test_sigterm_stops_with_one_line_and_the_same_command_finishes(tmp_path, pauses):
    """No Ray here (a small run is done in the command's own process): SIGTERM lands in the middle of a group."""
    lib, out, originals, audio = _kill_library(tmp_path)
    pauses.arm("tag-renamed-2")
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "genrecls", "tag", str(out), "--apply", "-q"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    assert pauses.wait("tag-renamed-2", proc) == proc.pid
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    last = [ln for ln in stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("genrecls tag: stopped by SIGTERM: ") and "run the same command again" in last
    new, _ = _check_old_or_new(lib, originals, out)
    assert len(new) == 2
    _rest_of_run(lib, out, originals, audio, new)
