"""Discovery: folder layouts, manifests, stable ids, and the problems found on the way."""

from __future__ import annotations

import os
import unicodedata

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genrecls.audio.discovery import (
    discover,
    discover_folder,
    discover_manifest,
    track_id_for,
)


def touch(path, data: bytes = b"RIFF....") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def by_rel(found):
    return {t.rel_path: t for t in found.tracks}


def test_folder_layout_labels_and_skips(tmp_path):
    root = tmp_path / "lib"
    touch(root / "rock" / "a.mp3")
    touch(root / "rock" / "live" / "2001" / "b.flac")  # nested: label is the top folder
    touch(root / "jazz" / "c.ogg")
    touch(root / "jazz" / "cover.jpg")  # well-known non-audio: ignored, counted
    touch(root / "jazz" / "notes.txt")
    touch(root / "jazz" / "mystery.bin")  # unknown extension: tried as audio (decoded by content)
    touch(root / "jazz" / ".hidden.wav")
    touch(root / "jazz" / "_scratch.wav")
    touch(root / "_drafts" / "d.wav")
    touch(root / ".git" / "e.wav")
    touch(root / "loose.wav")  # directly in the root: no label
    found = discover(str(root))
    tracks = by_rel(found)
    assert sorted(tracks) == ["jazz/c.ogg", "jazz/mystery.bin", "loose.wav", "rock/a.mp3", "rock/live/2001/b.flac"]
    assert tracks["rock/live/2001/b.flac"].label == "rock"
    assert tracks["loose.wav"].label is None
    assert found.labels == ["jazz", "rock"]
    assert found.ignored == 2
    assert found.problems == []
    t = tracks["rock/a.mp3"]
    st = os.stat(root / "rock" / "a.mp3")
    assert (t.size, t.mtime_ns, t.path) == (st.st_size, st.st_mtime_ns, str(root / "rock" / "a.mp3"))


def test_track_ids_are_stable_and_unicode_normalised(tmp_path):
    nfc = unicodedata.normalize("NFC", "Beyoncé/Café del Mar – 01.flac")
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfc != nfd
    assert track_id_for(nfc) == track_id_for(nfd) == track_id_for(nfc)
    assert track_id_for("a/b.mp3") != track_id_for("a/c.mp3")
    assert len(track_id_for("x")) == 16


def test_non_ascii_and_spaces_in_names(tmp_path):
    root = tmp_path / "lib"
    touch(root / "musique du monde" / "Ça va très bien — 東京 01.wav")
    found = discover_folder(str(root))
    (t,) = found.tracks
    assert t.rel_path == "musique du monde/Ça va très bien — 東京 01.wav"
    assert t.label == "musique du monde"


def test_symlink_loops_are_recorded_not_followed(tmp_path):
    root = tmp_path / "lib"
    touch(root / "rock" / "a.wav")
    os.symlink("..", root / "rock" / "up")  # folder loop back to the root
    os.symlink("self.wav", root / "rock" / "self.wav")  # a link to itself
    os.symlink("nowhere.wav", root / "rock" / "broken.wav")  # a dangling link
    found = discover_folder(str(root))
    assert [t.rel_path for t in found.tracks] == ["rock/a.wav"]
    kinds = {p.rel_path: p.kind for p in found.problems}
    assert kinds == {"rock/up": "symlink_loop", "rock/self.wav": "symlink_loop", "rock/broken.wav": "missing"}
    assert all(p.reason for p in found.problems)


def test_a_linked_folder_is_followed_once(tmp_path):
    root = tmp_path / "lib"
    touch(tmp_path / "elsewhere" / "x.wav")
    os.makedirs(root / "rock")
    os.symlink(tmp_path / "elsewhere", root / "rock" / "more")
    os.symlink(tmp_path / "elsewhere", root / "rock" / "again")
    found = discover_folder(str(root))
    assert [t.rel_path for t in found.tracks] == ["rock/again/x.wav"]  # sorted: 'again' before 'more'
    assert [(p.rel_path, p.kind) for p in found.problems] == [("rock/more", "symlink_loop")]


def test_a_label_folder_with_no_audio_is_recorded(tmp_path):
    root = tmp_path / "lib"
    touch(root / "rock" / "a.wav")
    touch(root / "polka" / "cover.png")
    os.makedirs(root / "opera" / "empty")
    found = discover_folder(str(root))
    problems = sorted((p.rel_path, p.kind, p.label) for p in found.problems)
    assert problems == [("opera", "empty_label", "opera"), ("polka", "empty_label", "polka")]
    assert "holds no audio" in found.problems[0].reason


def test_a_source_that_does_not_exist_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover(str(tmp_path / "nope"))
    f = touch(tmp_path / "file.wav")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        discover(f)


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_manifest_input(tmp_path, kind):
    root = tmp_path / "lib"
    touch(root / "a" / "one.wav")
    touch(root / "b" / "two.flac")
    touch(tmp_path / "outside.wav")
    rows = {
        "path": ["a/one.wav", str(root / "b" / "two.flac"), "../outside.wav", "a/../../outside.wav",
                 "missing.wav", "a/one.wav", ""],
        "label": ["pop", "jazz", "x", "x", "y", "pop", "z"],
    }
    manifest = tmp_path / f"list.{kind}"
    if kind == "csv":
        manifest.write_text("path,label\n" + "\n".join(f"{p},{lab}" for p, lab in zip(rows["path"], rows["label"])) + "\n")
    else:
        pq.write_table(pa.table(rows), manifest)
    found = discover(str(manifest), root=str(root))
    assert [(t.rel_path, t.label) for t in found.tracks] == [("a/one.wav", "pop"), ("b/two.flac", "jazz")]
    kinds = sorted((p.rel_path, p.kind) for p in found.problems)
    assert ("../outside.wav", "outside_root") in kinds and ("a/../../outside.wav", "outside_root") in kinds
    assert ("missing.wav", "missing") in kinds
    assert any(k == "bad_manifest" for _, k in kinds)  # the empty path
    assert all("outside the library root" in p.reason for p in found.problems if p.kind == "outside_root")


def test_manifest_paths_default_to_the_manifests_folder_and_label_is_optional(tmp_path):
    touch(tmp_path / "songs" / "a.wav")
    (tmp_path / "m.csv").write_text("path\nsongs/a.wav\n")
    found = discover(str(tmp_path / "m.csv"))
    assert [(t.rel_path, t.label) for t in found.tracks] == [("songs/a.wav", None)]


def test_manifest_symlink_escaping_the_root_is_refused(tmp_path):
    root = tmp_path / "lib"
    touch(tmp_path / "secret" / "s.wav")
    os.makedirs(root)
    os.symlink(tmp_path / "secret", root / "link")
    (root / "m.csv").write_text("path\nlink/s.wav\n")
    found = discover_manifest(str(root / "m.csv"))
    assert found.tracks == [] and [p.kind for p in found.problems] == ["outside_root"]


def test_manifest_without_a_path_column_is_a_clear_error(tmp_path):
    (tmp_path / "m.csv").write_text("file,label\na.wav,rock\n")
    with pytest.raises(ValueError, match="no 'path' column.*file, label|no 'path' column"):
        discover(str(tmp_path / "m.csv"))
    pq.write_table(pa.table({"label": ["x"]}), tmp_path / "m.parquet")
    with pytest.raises(ValueError, match="no 'path' column"):
        discover(str(tmp_path / "m.parquet"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="cannot read manifest"):
        discover(str(tmp_path / "bad.parquet"))
    with pytest.raises(FileNotFoundError):
        discover_manifest(str(tmp_path / "none.csv"))
