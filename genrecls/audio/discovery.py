"""Discovery: which tracks a library holds, with stable ids, labels and file stats.

A library is either a folder laid out as ``SOURCE/<label>/**/<file>`` (the label is the
top folder's name; files directly in SOURCE have no label) or a CSV/Parquet manifest
with a ``path`` column and an optional ``label`` column.

* Hidden (``.``) and ``_``-prefixed files and folders are skipped.
* Files with an audio extension are tracks; files with a well-known non-audio extension
  (images, text, playlists...) are ignored and counted; anything else is tried as audio
  (FFmpeg recognises a file by content), so nothing is silently lost.
* Symlinked folders are followed once; a symlink loop is recorded, not followed.
* Paths are confined to the root: a manifest entry outside it is recorded as a failure.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from genrecls.core.errors import not_regular_reason

__all__ = [
    "Track",
    "Problem",
    "Discovery",
    "AUDIO_EXTENSIONS",
    "discover",
    "discover_folder",
    "discover_manifest",
    "track_id_for",
]

AUDIO_EXTENSIONS = {
    ".mp3", ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".aif", ".aiff", ".aifc", ".au", ".snd",
    ".caf", ".w64", ".rf64", ".m4a", ".mp4", ".aac", ".wma", ".ape",
}
IGNORED_EXTENSIONS = {
    ".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".txt", ".nfo", ".cue", ".log", ".m3u", ".m3u8",
    ".pls", ".pdf", ".json", ".xml", ".md", ".html", ".ini", ".db", ".sfv", ".md5", ".accurip", ".csv",
    ".parquet", ".lrc", ".doc", ".docx", ".rtf", ".url", ".torrent",
}


def track_id_for(rel_path: str) -> str:
    """Stable id of a track: BLAKE2b of its NFC-normalised POSIX path relative to the library root."""
    norm = unicodedata.normalize("NFC", rel_path.replace(os.sep, "/"))
    return hashlib.blake2b(norm.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()


@dataclass(frozen=True)
class Track:
    path: str  # absolute (or as given) path to read
    rel_path: str  # POSIX path relative to the library root, as stored
    label: str | None
    size: int
    mtime_ns: int

    @property
    def track_id(self) -> str:
        return track_id_for(self.rel_path)


@dataclass(frozen=True)
class Problem:
    """Something found during discovery that is recorded as a failure."""

    rel_path: str
    label: str | None
    kind: str
    reason: str


@dataclass
class Discovery:
    root: str
    tracks: list[Track] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    ignored: int = 0  # non-audio files skipped on purpose

    @property
    def labels(self) -> list[str]:
        return sorted({t.label for t in self.tracks if t.label is not None})


def _hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def _stat_problem(rel_path: str, label: str | None, entry: os.DirEntry, exc: OSError) -> Problem:
    if exc.errno == errno.ELOOP:
        return Problem(rel_path, label, "symlink_loop", "symbolic link loop (the link points back to itself); not followed")
    if exc.errno == errno.ENOENT and entry.is_symlink():
        return Problem(rel_path, label, "missing", "broken symbolic link (its target does not exist)")
    return Problem(rel_path, label, "unreadable", f"cannot stat file: {exc.strerror or exc}")


def _add_file(found: Discovery, path: str, rel_path: str, label: str | None, st: os.stat_result) -> None:
    """A track, or a problem for a FIFO, socket or device (found by stat, never opened)."""
    reason = not_regular_reason(st)
    if reason:
        found.problems.append(Problem(rel_path, label, "not_regular", reason))
    else:
        found.tracks.append(Track(path, rel_path, label, st.st_size, st.st_mtime_ns))


def discover_folder(source: str | os.PathLike) -> Discovery:
    root = os.path.abspath(os.fspath(source))
    if not os.path.exists(root):
        raise FileNotFoundError(f"source folder {root} does not exist")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"source {root} is not a folder (give a folder or a .csv/.parquet manifest)")
    found = Discovery(root=root)
    seen_dirs: set[tuple[int, int]] = set()

    prefix = root.rstrip(os.sep) + os.sep

    def rel(p: str) -> str:
        if p.startswith(prefix) and os.sep == "/":  # the walk's own paths: a slice (relpath costs 0.1 ms a file)
            return p[len(prefix):]
        return Path(os.path.relpath(p, root)).as_posix()

    def walk(folder: str, label: str | None) -> int:
        """Returns the number of candidate files found under folder."""
        try:
            st = os.stat(folder)
        except OSError as exc:
            found.problems.append(Problem(rel(folder), label, "unreadable", f"cannot read folder: {exc.strerror or exc}"))
            return 0
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:
            found.problems.append(Problem(rel(folder), label, "symlink_loop", "folder already visited (symlink loop or duplicate link); not followed"))
            return 0
        seen_dirs.add(key)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            found.problems.append(Problem(rel(folder), label, "unreadable", f"cannot list folder: {exc.strerror or exc}"))
            return 0
        count = 0
        for entry in entries:
            if _hidden(entry.name):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                count += walk(entry.path, label if label is not None else entry.name)
                continue
            try:
                st = entry.stat(follow_symlinks=True)
            except OSError as exc:
                found.problems.append(_stat_problem(rel(entry.path), label, entry, exc))
                count += 1
                continue
            ext = os.path.splitext(entry.name)[1].lower()
            if ext in IGNORED_EXTENSIONS:
                found.ignored += 1
                continue
            _add_file(found, entry.path, rel(entry.path), label, st)
            count += 1
        return count

    try:
        top = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise PermissionError(f"cannot list source folder {root}: {exc.strerror or exc}") from None
    seen_dirs.add((os.stat(root).st_dev, os.stat(root).st_ino))
    for entry in top:
        if _hidden(entry.name):
            continue
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
        except OSError:
            is_dir = False  # a link loop: reported by the stat below
        if is_dir:
            if walk(entry.path, entry.name) == 0:
                found.problems.append(Problem(rel(entry.path), entry.name, "empty_label", f"label folder {entry.name!r} holds no audio files"))
        else:
            ext = os.path.splitext(entry.name)[1].lower()
            if ext in IGNORED_EXTENSIONS:
                found.ignored += 1
                continue
            try:
                st = entry.stat(follow_symlinks=True)
            except OSError as exc:
                found.problems.append(_stat_problem(rel(entry.path), None, entry, exc))
                continue
            _add_file(found, entry.path, rel(entry.path), None, st)
    return found


def discover_manifest(manifest: str | os.PathLike, root: str | os.PathLike | None = None) -> Discovery:
    """Tracks listed in a CSV or Parquet manifest with columns ``path`` and optionally ``label``.

    Relative paths are resolved against ``root`` (default: the manifest's folder); any path
    that resolves outside ``root`` is recorded as a failure, never read.
    """
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    mpath = os.path.abspath(os.fspath(manifest))
    if not os.path.isfile(mpath):
        raise FileNotFoundError(f"manifest {mpath} does not exist")
    base = os.path.abspath(os.fspath(root)) if root is not None else os.path.dirname(mpath)
    if mpath.lower().endswith(".parquet"):
        try:
            table = pq.read_table(mpath)
        except Exception as exc:
            raise ValueError(f"cannot read manifest {mpath} as Parquet: {exc}") from None
    else:
        try:
            table = pacsv.read_csv(mpath)
        except Exception as exc:
            raise ValueError(f"cannot read manifest {mpath} as CSV: {exc}") from None
    if "path" not in table.column_names:
        raise ValueError(f"manifest {mpath} has no 'path' column (columns: {table.column_names}); it needs path and optionally label")
    paths = [None if p is None else str(p) for p in table.column("path").to_pylist()]
    labels = table.column("label").to_pylist() if "label" in table.column_names else [None] * len(paths)
    found = Discovery(root=base)
    real_base = os.path.realpath(base)
    seen: set[str] = set()
    for i, (p, label) in enumerate(zip(paths, labels), start=2):
        label = None if label is None or (isinstance(label, float) and label != label) else str(label).strip() or None
        if not p:
            found.problems.append(Problem(f"<manifest row {i}>", label, "bad_manifest", "empty path"))
            continue
        full = p if os.path.isabs(p) else os.path.join(base, p)
        real = os.path.realpath(full)
        if os.path.commonpath([real, real_base]) != real_base:
            found.problems.append(Problem(p, label, "outside_root", f"path resolves outside the library root {base}; not read"))
            continue
        relp = Path(os.path.relpath(real, real_base)).as_posix()
        if relp in seen:
            continue
        seen.add(relp)
        try:
            st = os.stat(real)
        except FileNotFoundError:
            found.problems.append(Problem(relp, label, "missing", "file listed in the manifest does not exist"))
            continue
        except OSError as exc:
            found.problems.append(Problem(relp, label, "unreadable", f"cannot stat file: {exc.strerror or exc}"))
            continue
        if stat.S_ISDIR(st.st_mode):
            found.problems.append(Problem(relp, label, "unreadable", "the path is a folder, not a file"))
            continue
        _add_file(found, real, relp, label, st)
    return found


def discover(source: str | os.PathLike, root: str | os.PathLike | None = None) -> Discovery:
    """A folder or a manifest (``.csv``/``.parquet``)."""
    s = os.fspath(source)
    if os.path.isfile(s) and s.lower().endswith((".csv", ".parquet")):
        return discover_manifest(s, root)
    return discover_folder(s)
