"""The tag job: write the predicted genres into the library's own files, safely, with a journal and undo.

``genrecls tag PREDICTIONS`` reads a predictions folder (``genrecls classify``'s output: the
library root in ``classify.json``, one row per track) and, per track, decides what to write
(:func:`decide`); with ``--apply`` it writes it.  The format-specific fields are
:mod:`genrecls.audio.tags`'s; this module is the job: planning on the driver, Ray tasks over the
library (the same scheduling, progress line, lock and Ctrl-C behaviour as ingest), the
journal, recovery after a kill, and undo.

Layout, next to the predictions::

    PREDICTIONS/
      tag-preview/              the last preview: report.parquet, report.csv, summary.json
      tag-journal/<RUN>/        one folder per --apply or --undo run (RUN: UTC time + random, sorted by time)
        run.json                what was asked, the library, the summary; "finished" once the run is complete
        part-*.parquet          journal rows of files written (several per run; journal.parquet once compacted)
        pending-*.parquet       rows of a group of files about to be renamed into place (transient)
        report.parquet, report.csv   one row per track: path, current genre, new genre, what was done and why

How one file is written, so that after ``kill -9`` at any instant every file is either old or
new and the journal says which:

1. the file is checked (unchanged since classification, its tags parse, genre rules), its
   bytes fingerprinted (BLAKE2b, :func:`genrecls.audio.pipeline.fingerprint_file`, as in ingest);
2. it is copied to a hidden temporary file in its own folder (``.genrecls-tag-*``), the
   copy is tagged by mutagen, given the original's mode, extended attributes, owner (where
   permitted) and, with ``--keep-mtime``, modification time, fsynced and fingerprinted;
3. once a group of files is prepared, one journal part holding their rows as *pending*
   (fingerprint before and after, old and new values) is written atomically;
4. each copy is renamed over its original (``rename(2)``: atomic), unless the original
   changed meanwhile; the folders are fsynced;
5. the group's rows are written as an applied part, and the pending part deleted.

A run killed between 3 and 5 leaves a pending part: the next run (or undo) resolves each
of its rows by the file's fingerprint (equal to *after*: written; equal to *before*: not
written; neither: changed by someone else since) before doing anything, deletes temporary
copies left in the library, and marks the killed run finished.  Files are never
half-written: a rename either happened or not.

Undo (``genrecls tag --undo PREDICTIONS/tag-journal/RUN``) writes each row's old values
back the same way, only where the file's fingerprint is still the one genrecls last wrote and
the fields still hold what RUN wrote; it is journaled as a run of its own.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import stat
import time
import uuid
from collections import Counter
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from genrecls.audio.pipeline import fingerprint_file
from genrecls.audio.tags import (
    ID3_FORMATS,
    TagError,
    current_genres,
    field,
    foreign_genre,
    id3_version,
    new_fields,
    open_tags,
    read_fields,
    read_provenance,
    touched,
    write_fields,
)
from genrecls.core.hooks import pause_point
from genrecls.core.progress import Progress, format_duration, format_table
from genrecls.core.provenance import library_versions, utc_timestamp
from genrecls.core.runtime import as_interrupted, log, ray_session
from genrecls.core.scheduling import slots, task_bounds
from genrecls.storage.location import Location
from genrecls.storage.locks import folder_lock
from genrecls.storage.predictions import INFO_NAME, PredictionStore, read_predictions

__all__ = ["tag", "undo", "list_journals", "format_journals", "decide", "read_journal", "journal_index", "journal_runs", "format_summary", "JOURNAL", "IN_PROCESS_FILES",
           "PREVIEW", "LIBRARY_TMP_PREFIX", "MODES"]

JOURNAL = "tag-journal"
PREVIEW = "tag-preview"
RUN_INFO = "run.json"
REPORT = "report"
#: prefix of the temporary copies in the library's folders (hidden: discovery skips them)
LIBRARY_TMP_PREFIX = ".genrecls-tag-"
#: what happens to a genre a person wrote: kept (default), replaced (--overwrite), added to (--add)
MODES = ("keep", "overwrite", "add")
#: at most this many files per Ray task (small runs are spread over every CPU: genrecls.core.scheduling)
TRACKS_PER_TASK = 64
#: a task renames its prepared copies in groups of at most this many files / bytes (bounds temporary disk space)
GROUP_FILES, GROUP_BYTES = 32, 256 << 20
#: at most this many Ray tasks, however large the library
MAX_TASKS = 4096
#: a run of at most this many files, with no cluster and no Ray running, is done in this process (no Ray start-up)
IN_PROCESS_FILES = 64

#: report kinds that write (or would write) a file
WRITE_KINDS = {"new": "no genre yet", "replace_own": "replaces the genre genrecls wrote earlier",
               "overwrite": "replaces a genre a person wrote (--overwrite)", "add": "adds to a person's genre (--add)",
               "provenance": "same genres, provenance updated to this model", "restore": "old values restored (undo)"}
#: report kinds that are failures (--strict exits 1 for them)
FAILED_KINDS = {"read_only", "permission", "unparseable", "not_regular", "error", "worker_crashed"}

_JOURNAL_SCHEMA = pa.schema([
    pa.field("entry_id", pa.string(), nullable=False),
    pa.field("run", pa.string()),
    pa.field("action", pa.string()),           # tag | undo
    pa.field("undoes", pa.string()),           # entry_id of the row an undo reverted
    pa.field("state", pa.string()),            # pending | applied
    pa.field("path", pa.string()),             # relative to the library root
    pa.field("format", pa.string()),
    pa.field("kind", pa.string()),             # why it was written (WRITE_KINDS)
    pa.field("fingerprint_before", pa.string()),
    pa.field("fingerprint_after", pa.string()),
    pa.field("size_before", pa.int64()),
    pa.field("mtime_ns_before", pa.int64()),
    pa.field("size_after", pa.int64()),
    pa.field("mtime_ns_after", pa.int64()),
    pa.field("basis_size", pa.int64()),        # the file's stat in the prediction row this write relied on
    pa.field("basis_mtime_ns", pa.int64()),
    pa.field("old", pa.string()),              # JSON {field: [values] | null}: every field touched, before
    pa.field("new", pa.string()),              # the same fields as read back after the write
    pa.field("id3_before", pa.string()),
    pa.field("id3_after", pa.string()),
    pa.field("model_id", pa.string()),
    pa.field("confidence", pa.float32()),
    pa.field("written_at", pa.timestamp("ms", tz="UTC")),
    pa.field("tmp", pa.string()),              # the temporary copy (absolute path; pending rows)
    pa.field("recovered", pa.bool_()),         # resolved by fingerprint after a killed run
])
_REPORT_SCHEMA = pa.schema([
    pa.field("path", pa.string()), pa.field("format", pa.string()), pa.field("action", pa.string()),
    pa.field("kind", pa.string()), pa.field("current", pa.string()), pa.field("new", pa.string()),
    pa.field("reason", pa.string()), pa.field("confidence", pa.float32()), pa.field("model_id", pa.string()),
])


# -- the rule -----------------------------------------------------------------------------
def _same(a: Iterable[str], b: Iterable[str]) -> bool:
    return [str(x).strip() for x in a] == [str(x).strip() for x in b]


def decide(current: list[str], prov: dict[str, Any] | None, new: list[str], model_id: str,
           mode: str = "keep") -> tuple[str, list[str], list[str], str]:
    """What to do with one file: ``(kind, genres to write, genrecls's share of them, reason)``.

    ``current``: the genres in the file; ``prov``: the provenance genrecls wrote there
    (``written``: the whole field as written, ``genres``: genrecls's own part of it); ``new``:
    the predicted genres; ``mode``: keep / overwrite / add a person's genre.  ``kind`` is a
    key of :data:`WRITE_KINDS` (write) or ``tagged``, ``edited``, ``up_to_date`` (skip).
    """
    shown = "; ".join(current)
    if prov is not None and _same(current, prov["written"]):  # genrecls's genre, as it wrote it
        ours = [str(g) for g in prov["genres"]]
        kept = [g for g in current if g not in ours]  # what a person had before an --add
        if mode == "overwrite" and kept:
            return "overwrite", list(new), list(new), f"replaces {shown!r} (with a person's genre) with --overwrite"
        folded = {g.casefold() for g in kept}
        target = kept + [g for g in new if g.casefold() not in folded]
        if _same(target, current):
            if prov.get("model") == model_id:
                return "up_to_date", current, ours, "already holds this prediction (written by genrecls)"
            return "provenance", target, [g for g in new if g in target], \
                f"same genres; provenance updated from model {prov.get('model')} to {model_id}"
        return "replace_own", target, [g for g in target if g not in kept], \
            f"replaces {shown!r}, written by genrecls (model {prov.get('model')}); the prediction changed"
    if not current and prov is None:
        return "new", list(new), list(new), "the file has no genre"
    who = "edited by a person since genrecls wrote it" if prov is not None else "a genre genrecls did not write"
    if mode == "overwrite":
        return "overwrite", list(new), list(new), f"replaces {shown!r} ({who}) with --overwrite"
    if mode == "add":
        folded = {g.casefold() for g in current}
        added = [g for g in new if g.casefold() not in folded]
        if not added:
            return "up_to_date", current, [], f"already holds the predicted genres ({shown!r})"
        return "add", list(current) + added, added, f"adds {'; '.join(added)!r} to {shown!r} ({who}) with --add"
    kind = "edited" if prov is not None else "tagged"
    return kind, current, [], f"{('no genre' if not current else repr(shown))}: {who}; --overwrite replaces it, --add adds to it"


# -- the journal --------------------------------------------------------------------------
def journal_runs(loc: Location) -> list[str]:
    """Names of the runs in ``PREDICTIONS/tag-journal/``, oldest first."""
    sel = pafs.FileSelector(loc.join(JOURNAL), allow_not_found=True, recursive=False)
    return sorted(i.base_name for i in loc.fs.get_file_info(sel) if i.type == pafs.FileType.Directory)


def _read_parts(loc: Location, names: list[str]) -> pa.Table:
    tables = []
    for n in names:
        with loc.fs.open_input_file(loc.join(n)) as f:
            tables.append(pq.read_table(f).cast(_JOURNAL_SCHEMA))
    return pa.concat_tables(tables) if tables else _JOURNAL_SCHEMA.empty_table()


def read_journal(run: str | os.PathLike | Location, pending: bool = False) -> pa.Table:
    """The journal rows of one run folder (applied writes, or with ``pending`` the rows still pending), oldest first."""
    loc = run if isinstance(run, Location) else Location.parse(run)
    names = loc.list(suffix=".parquet")
    if pending:
        names = [n for n in names if n.startswith("pending-")]
    else:
        names = [n for n in names if n.startswith("part-") or n == "journal.parquet"]
    table = _read_parts(loc, names)
    if not table.num_rows:
        return table
    # a part compacted into journal.parquet and not yet deleted (a kill in between) appears twice
    seen: set[str] = set()
    keep = []
    for e in table.column("entry_id").to_pylist():
        keep.append(e not in seen)
        seen.add(e)
    return table.filter(pa.array(keep)).sort_by([("written_at", "ascending"), ("entry_id", "ascending")])


def journal_index(predictions: str | os.PathLike | Location) -> dict[str, dict[str, Any]]:
    """path -> the latest applied journal row of every file genrecls tag or undo wrote (all runs)."""
    loc = predictions if isinstance(predictions, Location) else Location.parse(predictions)
    tables = [read_journal(loc.child(JOURNAL, r)) for r in journal_runs(loc)]
    table = pa.concat_tables(tables) if tables else _JOURNAL_SCHEMA.empty_table()
    out: dict[str, dict[str, Any]] = {}
    for row in table.sort_by([("written_at", "ascending"), ("entry_id", "ascending")]).to_pylist():
        out[row["path"]] = row
    return out


def _write_part(loc: Location, name: str, rows: list[dict[str, Any]]) -> None:
    table = pa.Table.from_pylist(rows, schema=_JOURNAL_SCHEMA)
    loc.write_atomic(name, lambda out: pq.write_table(table, out, compression="zstd"))


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_tmp(row: dict[str, Any], root: str) -> int:
    """Delete a pending row's temporary copy (its absolute path); 1 if it was there."""
    if not row.get("tmp"):
        return 0
    try:
        os.unlink(os.path.join(root, row["tmp"]))
        return 1
    except FileNotFoundError:
        return 0


def _resolve(row: dict[str, Any], root: str) -> str:
    """A pending row after a kill: ``applied`` (the file is the new one), ``not_applied`` (the old one) or ``unknown``."""
    path = os.path.join(root, row["path"])
    try:
        fp = fingerprint_file(path)
    except Exception:
        return "unknown"
    return "applied" if fp == row["fingerprint_after"] else "not_applied" if fp == row["fingerprint_before"] else "unknown"


def _recover_pending(run_loc: Location, root: str, names: list[str] | None = None) -> Counter[str]:
    """Resolve a run's pending parts (all, or ``names``) by fingerprint; returns counts by outcome."""
    counts: Counter[str] = Counter()
    done = set(run_loc.list(suffix=".parquet"))
    for name in names if names is not None else sorted(n for n in done if n.startswith("pending-")):
        final = "part-" + name[len("pending-"):]
        if final not in done:
            rows = _read_parts(run_loc, [name]).to_pylist()
            applied = []
            for row in rows:
                counts["temporaries_removed"] += _remove_tmp(row, root)
                outcome = _resolve(row, root)
                counts[outcome] += 1
                if outcome == "applied":
                    applied.append({**row, "state": "applied", "tmp": None, "recovered": True})
            if applied:
                _write_part(run_loc, final, applied)
        else:
            for row in _read_parts(run_loc, [name]).to_pylist():
                counts["temporaries_removed"] += _remove_tmp(row, root)
        run_loc.delete(name)
    return counts


def _remove_library_temporaries(root: str, folders: Iterable[str]) -> int:
    n = 0
    for folder in folders:
        try:
            entries = os.scandir(os.path.join(root, folder))
        except OSError:
            continue
        with entries:
            for e in entries:
                if e.name.startswith(LIBRARY_TMP_PREFIX) and e.is_file(follow_symlinks=False):
                    _remove(e.path)
                    n += 1
    return n


def _unfinished(loc: Location) -> list[str]:
    """Runs killed before they finished (their pending writes are settled by the next --apply or --undo)."""
    out = []
    for name in journal_runs(loc):
        try:
            if not loc.child(JOURNAL, name).read_json(RUN_INFO).get("finished"):
                out.append(name)
        except (FileNotFoundError, OSError, ValueError):
            continue
    return out


def _run_info(run_loc: Location) -> dict[str, Any]:
    """A journal run's info file; empty when a killed run left none (or half of one)."""
    try:
        return run_loc.read_json(RUN_INFO)
    except (FileNotFoundError, OSError, ValueError):
        return {}


def _recover(loc: Location, folders: Callable[[], set[str]]) -> dict[str, Any]:
    """Finish what killed runs left: resolve pending journal parts, delete temporary copies, mark them finished."""
    report: dict[str, Any] = {}
    dirs: set[str] | None = None
    for name in journal_runs(loc):
        run_loc = loc.child(JOURNAL, name)
        info = _run_info(run_loc)
        if info.get("finished"):
            continue
        root = info.get("library")
        if not root:  # killed before its run.json: it wrote nothing
            continue
        counts = _recover_pending(run_loc, root)
        dirs = folders() if dirs is None else dirs
        counts["temporaries_removed"] += _remove_library_temporaries(root, dirs)
        temps = counts["temporaries_removed"]
        _compact(run_loc)
        info.update(finished="recovered", recovered={**counts, "at": utc_timestamp()})
        run_loc.write_json(RUN_INFO, info)
        report[name] = info["recovered"]
        log.warning("recovered the interrupted run %s: %d write(s) completed, %d not made, %d changed since, "
                    "%d temporary file(s) removed", name, counts["applied"], counts["not_applied"], counts["unknown"], temps)
    return report


def _stat_moves(loc: Location) -> dict[str, list[tuple[tuple[int, int], tuple[int, int]]]]:
    """path -> every (stat before, stat after) of the writes genrecls tag and undo made to it, oldest first."""
    tables = [read_journal(loc.child(JOURNAL, r)) for r in journal_runs(loc)]
    table = pa.concat_tables(tables) if tables else _JOURNAL_SCHEMA.empty_table()
    moves: dict[str, list[tuple[tuple[int, int], tuple[int, int]]]] = {}
    for r in table.sort_by([("written_at", "ascending"), ("entry_id", "ascending")]).to_pylist():
        if r["size_before"] is not None and r["size_after"] is not None:
            moves.setdefault(r["path"], []).append(((r["size_before"], r["mtime_ns_before"]),
                                                    (r["size_after"], r["mtime_ns_after"])))
    return moves


def _record_stats(loc: Location, info: dict[str, Any]) -> dict[str, Any]:
    """Tell the predictions (and the dataset ``classify --dataset`` read) the new stat of every file genrecls wrote.

    Tags change, audio does not: a prediction row follows its file's writes
    (:meth:`~genrecls.storage.predictions.PredictionStore.restat`), so ``classify`` does not score it
    again; the dataset records each such file as touched
    (:meth:`~genrecls.storage.dataset.Dataset.record_touched`: unchanged content, its shards' rows
    and embeddings kept), so ``ingest`` does not decode it again.  Idempotent: it follows every
    journal, so a run killed before this step is caught up by the next.  A dataset locked by a
    running ingest is left as it is (one line says so: its next ingest reads those files again).
    """
    moves = _stat_moves(loc)
    if not moves:
        return {}
    out: dict[str, Any] = {"prediction_rows": PredictionStore(loc).restat(moves)}
    if info.get("dataset"):
        out["dataset_files"] = _record_in_dataset(str(info["dataset"]), str(info.get("library") or ""), moves)
    return out


def _record_in_dataset(uri: str, library: str, moves: dict[str, list[tuple[tuple[int, int], tuple[int, int]]]]) -> int:
    from genrecls.storage.dataset import Dataset, DatasetError
    from genrecls.storage.locks import LockedError
    from genrecls.storage.predictions import follow_moves

    try:
        ds = Dataset(uri)
        root = ds.library_root()
        if not root:
            return 0
        index, touched = ds.tracks(), ds.touched()
        by_path = {os.path.normpath(os.path.join(root, e.path)): e for e in index.values()}
        rows: dict[str, tuple[int, int, str]] = {}
        for path, mv in moves.items():
            e = by_path.get(os.path.normpath(os.path.join(library, path)))
            if e is None:
                continue
            t = touched.get(e.track_id)
            start = (t[0], t[1]) if t is not None and t[2] == e.fingerprint else (e.size, e.mtime_ns)
            end = follow_moves(start, mv)
            if end != start:
                rows[e.track_id] = (end[0], end[1], e.fingerprint)
        if rows:
            with folder_lock(ds.location, "genrecls tag"):
                ds.record_touched(rows)
        return len(rows)
    except LockedError as exc:
        log.warning("%s is busy (%s): its next ingest reads the files genrecls tag wrote again", uri, exc)
    except (DatasetError, OSError) as exc:
        log.warning("could not record the tagged files in %s (%s): its next ingest reads them again", uri, exc)
    return 0


def _compact(run_loc: Location) -> None:
    """The run's applied parts as one ``journal.parquet`` (readers dedupe a kill between write and deletes)."""
    names = [n for n in run_loc.list(suffix=".parquet") if n.startswith("part-")]
    if len(names) < 2 and not run_loc.exists("journal.parquet"):
        return
    table = read_journal(run_loc)
    run_loc.write_atomic("journal.parquet", lambda out: pq.write_table(table, out, compression="zstd"))
    for n in names:
        run_loc.delete(n)


# -- one task: examine, prepare, commit ----------------------------------------------------
class _Changed(Exception):
    pass


def _stat_key(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ino


def _row(item: dict[str, Any], action: str, kind: str, reason: str, *, fmt: str | None = None,
         current: list[str] | None = None, new: list[str] | None = None) -> dict[str, Any]:
    return {"path": item["path"], "format": fmt, "action": action, "kind": kind,
            "current": "; ".join(current) if current else None, "new": "; ".join(new) if new else None,
            "reason": reason, "confidence": item.get("confidence"), "model_id": item.get("model_id")}


def _os_failure(item: dict[str, Any], exc: OSError, what: str) -> dict[str, Any]:
    if isinstance(exc, FileNotFoundError):
        return _row(item, "skip", "missing", f"the file vanished ({what})")
    if isinstance(exc, PermissionError):
        return _row(item, "failed", "permission", f"permission denied ({what}): {exc.strerror or exc}")
    return _row(item, "failed", "error", f"{what}: {exc.strerror or exc}")


class _Task:
    """The work of one Ray task (or of the driver, for a small run): its files, its journal groups."""

    def __init__(self, ctx: dict[str, Any], batch: int):
        self.ctx, self.batch = ctx, batch
        self.run_loc = Location.parse(ctx["run_uri"]) if ctx.get("run_uri") else None
        self.rows: list[dict[str, Any]] = []
        self.group: list[dict[str, Any]] = []
        self.group_bytes = 0
        self.groups = 0
        self.renamed = 0

    # a write: the copy is prepared now, renamed into place with its group (commit)
    def prepare(self, item: dict[str, Any], st: os.stat_result, fmt: str, fields: dict[str, list | None],
                *, kind: str, reason: str, current: list[str], new: list[str], id3_target: str | None,
                extra: dict[str, Any], fingerprint: str | None = None) -> None:
        ctx = self.ctx
        src = os.path.realpath(item["abs"])  # a symlinked file is written at its target, the link stays
        folder, name = os.path.split(src)
        tmp = os.path.join(folder, f"{LIBRARY_TMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}")
        fp_before = fingerprint or fingerprint_file(src)  # undo computed it already (the stat below guards it)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            if _stat_key(os.stat(src)) != _stat_key(st):
                raise _Changed("the file changed while it was being copied")
            target_fields = extra["fields"]
            old = touched(fields, target_fields)
            version = write_fields(tmp, fmt, target_fields, separator=ctx["separator"], id3_version=id3_target)
            _, after_audio = open_tags(tmp)
            after = read_fields(fmt, after_audio)
            shutil.copystat(src, tmp)  # mode, access and modification times, extended attributes
            if not ctx["keep_mtime"]:
                os.utime(tmp)
            try:
                os.chown(tmp, st.st_uid, st.st_gid)
            except PermissionError:  # not ours to give away: keep at least the group, if we are in it
                try:
                    os.chown(tmp, -1, st.st_gid)
                except PermissionError:
                    pass
            _fsync(tmp)
            fp_after = fingerprint_file(tmp)
            st_after = os.stat(tmp)
        except BaseException:
            _remove(tmp)
            raise
        self.group.append({"item": item, "st": st, "tmp": tmp, "target": src, "fmt": fmt, "kind": kind, "reason": reason,
                           "current": current, "new": new, "journal": {
            "entry_id": f"{ctx['run']}-{self.batch:05d}-{len(self.rows) + len(self.group):05d}",
            "run": ctx["run"], "action": ctx["action"], "undoes": item.get("undoes"), "state": "pending",
            "path": item["path"], "format": fmt, "kind": kind, "fingerprint_before": fp_before,
            "fingerprint_after": fp_after, "size_before": st.st_size, "mtime_ns_before": st.st_mtime_ns,
            "size_after": st_after.st_size, "mtime_ns_after": st_after.st_mtime_ns,
            "basis_size": item.get("basis_size"), "basis_mtime_ns": item.get("basis_mtime_ns"),
            "old": json.dumps(old, ensure_ascii=False),
            "new": json.dumps(touched(after, target_fields), ensure_ascii=False),
            "id3_before": extra.get("id3_before"), "id3_after": version, "model_id": item.get("model_id"),
            "confidence": item.get("confidence"), "written_at": time.time_ns() // 1_000_000, "tmp": tmp,
            "recovered": False}})
        self.group_bytes += st.st_size
        if len(self.group) >= GROUP_FILES or self.group_bytes >= GROUP_BYTES:
            self.commit()

    def commit(self) -> None:
        """Journal the group as pending, rename each copy into place, journal what was applied."""
        if not self.group:
            return
        group, self.group, self.group_bytes = self.group, [], 0
        name = f"{self.batch:05d}-{self.groups:03d}-{uuid.uuid4().hex[:6]}.parquet"
        self.groups += 1
        try:
            _write_part(self.run_loc, f"pending-{name}", [g["journal"] for g in group])
        except BaseException:
            for g in group:
                _remove(g["tmp"])
            raise
        applied, folders = [], set()
        for g in group:
            item = g["item"]
            try:
                if _stat_key(os.stat(g["target"])) != _stat_key(g["st"]):
                    raise _Changed("the file changed while genrecls was tagging it")
                os.replace(g["tmp"], g["target"])
            except (OSError, _Changed) as exc:
                _remove(g["tmp"])
                self.rows.append(_os_failure(item, exc, "renaming the tagged copy into place") if isinstance(exc, OSError)
                                 else _row(item, "skip", "changed", str(exc), fmt=g["fmt"], current=g["current"]))
                continue
            folders.add(os.path.dirname(g["target"]))
            applied.append({**g["journal"], "state": "applied", "tmp": None})
            self.rows.append(_row(item, "written", g["kind"], g["reason"], fmt=g["fmt"], current=g["current"],
                                  new=g["new"]))
            self.renamed += 1
            self._maybe_pause()
        for folder in folders:
            _fsync(folder)  # the renames are on disk before the journal says so
        if applied:
            _write_part(self.run_loc, f"part-{name}", applied)
        self.run_loc.delete(f"pending-{name}")

    def _maybe_pause(self) -> None:
        """Tests: a deterministic point in the middle of a run, after this task's N-th rename (genrecls.core.hooks)."""
        pause_point(f"tag-renamed-{self.renamed}")


def _examine_tag(task: _Task, item: dict[str, Any]) -> None:
    """One file of a tag run: report it, and with ``apply`` prepare its write."""
    ctx = task.ctx
    path = item["abs"]
    if path is None:  # never looked at (a path outside the library)
        task.rows.append(_row(item, "skip", item["skip"], item["skip_reason"]))
        return
    try:
        st = os.stat(path)
    except OSError as exc:
        task.rows.append(_os_failure(item, exc, "stat") if not item.get("skip") else
                         _row(item, "skip", item["skip"], item["skip_reason"]))
        return
    if not stat.S_ISREG(st.st_mode):
        task.rows.append(_row(item, "failed", "not_regular", "not a regular file; genrecls never writes it"))
        return
    try:
        fmt, audio = open_tags(path)
        fields = read_fields(fmt, audio)
    except TagError as exc:
        task.rows.append(_row(item, "skip" if exc.kind == "unsupported" else "failed", exc.kind, exc.reason))
        return
    except OSError as exc:
        task.rows.append(_os_failure(item, exc, "reading the tags"))
        return
    version = id3_version(audio) if fmt in ID3_FORMATS else None
    prov = read_provenance(fmt, fields)
    sep = (prov or {}).get("sep") or ctx["separator"] if version == "2.3" else None
    current = current_genres(fmt, fields, sep)
    if item.get("skip"):  # decided from the prediction alone (uncertain, low confidence...)
        task.rows.append(_row(item, "skip", item["skip"], item["skip_reason"], fmt=fmt, current=current))
        return
    now = (st.st_size, st.st_mtime_ns)
    same = now == (item["basis_size"], item["basis_mtime_ns"]) or now == (item.get("j_size"), item.get("j_mtime_ns"))
    if not same and item.get("basis_fingerprint"):
        same = fingerprint_file(path) == item["basis_fingerprint"]
    if not same:
        task.rows.append(_row(item, "skip", "changed", (
            f"changed since classification (size {item['basis_size']} -> {st.st_size}, mtime "
            f"{utc_timestamp(item['basis_mtime_ns'] / 1e9)} -> {utc_timestamp(st.st_mtime_ns / 1e9)}); the prediction "
            "may be for other audio: re-run genrecls classify"), fmt=fmt, current=current))
        return
    kind, target, ours, reason = decide(current, prov, item["genres"], item["model_id"], ctx["mode"])
    if kind not in WRITE_KINDS:
        task.rows.append(_row(item, "skip", kind, reason, fmt=fmt, current=current, new=item["genres"]))
        return
    foreign = foreign_genre(path, fmt, fields)
    if foreign:
        task.rows.append(_row(item, "skip", "foreign_genre", (
            f"holds the genre {foreign!r} in a RIFF INFO chunk, which mutagen cannot change: an ID3 genre beside it "
            "would leave two disagreeing genres"), fmt=fmt, current=[foreign]))
        return
    if not ctx["apply"]:
        task.rows.append(_row(item, "would_write", kind, reason, fmt=fmt, current=current, new=target))
        return
    if not st.st_mode & stat.S_IWUSR or not os.access(path, os.W_OK):
        task.rows.append(_row(item, "failed", "read_only", f"the file is read-only (mode {stat.filemode(st.st_mode)}); "
                              "genrecls leaves it as it is", fmt=fmt, current=current, new=target))
        return
    id3_target = ("2.3" if ctx["id3v23"] or version == "2.3" else "2.4") if fmt in ID3_FORMATS else None
    provenance = {"v": 1, "model": item["model_id"], "genres": ours, "written": target, "at": utc_timestamp(),
                  "confidence": None if item.get("confidence") is None else round(float(item["confidence"]), 4)}
    if item.get("probabilities"):
        provenance["probabilities"] = {g: round(float(p), 4) for g, p in item["probabilities"].items() if p is not None}
    if id3_target == "2.3":
        provenance["sep"] = ctx["separator"]
    _prepare(task, item, st, fmt, fields, kind=kind, reason=reason, current=current, new=target,
             target_fields=new_fields(fmt, target, provenance), id3_before=version, id3_target=id3_target)


def _prepare(task: _Task, item: dict[str, Any], st: os.stat_result, fmt: str, fields: dict[str, list | None], *,
             kind: str, reason: str, current: list[str], new: list[str], target_fields: dict[str, list | None],
             id3_before: str | None, id3_target: str | None, fingerprint: str | None = None) -> None:
    try:
        task.prepare(item, st, fmt, fields, kind=kind, reason=reason, current=current, new=new, id3_target=id3_target,
                     extra={"fields": target_fields, "id3_before": id3_before}, fingerprint=fingerprint)
    except _Changed as exc:
        task.rows.append(_row(item, "skip", "changed", str(exc), fmt=fmt, current=current))
    except TagError as exc:
        task.rows.append(_row(item, "failed", "unparseable", exc.reason, fmt=fmt, current=current))
    except OSError as exc:
        task.rows.append(_os_failure(item, exc, "writing a tagged copy beside the file"))


def _examine_undo(task: _Task, item: dict[str, Any]) -> None:
    """One file of an undo run: restore the old values if the file is still as genrecls left it."""
    path = item["abs"]
    shown_old = _genre_text(item["old"], item["format"])
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            task.rows.append(_row(item, "failed", "not_regular", "not a regular file; genrecls never writes it"))
            return
        fp = fingerprint_file(path)
        if fp != item["expected_fingerprint"]:
            task.rows.append(_row(item, "skip", "changed", "changed since genrecls last wrote it (its fingerprint "
                                  "differs); not restored", fmt=item["format"], new=shown_old))
            return
        fmt, audio = open_tags(path)
        fields = read_fields(fmt, audio)
    except TagError as exc:
        task.rows.append(_row(item, "failed", exc.kind, exc.reason))
        return
    except OSError as exc:
        task.rows.append(_os_failure(item, exc, "reading the file"))
        return
    except Exception as exc:  # fingerprint_file's AudioError for a file that is no longer regular
        task.rows.append(_row(item, "failed", "error", f"{type(exc).__name__}: {exc}"))
        return
    current = _genre_text(fields, fmt)
    if fmt != item["format"] or any(field(fields, k) != v for k, v in item["new"].items()):
        task.rows.append(_row(item, "skip", "superseded", "its genre fields no longer hold what this run wrote (a "
                              "later genrecls run or a person changed them); undo that first", fmt=fmt,
                              current=current, new=shown_old))
        return
    if not task.ctx["apply"]:
        task.rows.append(_row(item, "would_write", "restore", WRITE_KINDS["restore"], fmt=fmt, current=current,
                              new=shown_old))
        return
    if not st.st_mode & stat.S_IWUSR or not os.access(path, os.W_OK):
        task.rows.append(_row(item, "failed", "read_only", "the file is read-only; not restored", fmt=fmt,
                              current=current, new=shown_old))
        return
    _prepare(task, item, st, fmt, fields, kind="restore", reason=f"undoes {item['undoes']}", current=current,
             new=shown_old, target_fields=item["old"], id3_before=id3_version(audio), id3_target=item.get("id3_restore"),
             fingerprint=fp)


def _genre_text(fields: dict[str, list | None], fmt: str) -> list[str]:
    return current_genres(fmt, fields) if fmt else []


def run_batch(items: list[dict[str, Any]], ctx: dict[str, Any], batch: int) -> dict[str, Any]:
    """A Ray task (or the driver, for a small run): examine every file, write and journal the changes."""
    task = _Task(ctx, batch)
    examine = _examine_undo if ctx["action"] == "undo" else _examine_tag
    for item in items:
        try:
            examine(task, item)
        except Exception as exc:  # a bug or an odd file: recorded, the run goes on
            task.rows.append(_row(item, "failed", "error", f"{type(exc).__name__}: {exc}"))
    task.commit()
    return {"rows": task.rows, "written": task.renamed, "pid": os.getpid()}


# -- the driver ---------------------------------------------------------------------------
def _new_run_name() -> str:
    """UTC time to the microsecond, then a random suffix: names sort in the order the runs started (two runs of
    one second too: journal_runs lists them oldest first)."""
    now = time.time_ns()
    return (time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 1_000_000_000)) + f".{now // 1000 % 1_000_000:06d}Z"
            + f"-{uuid.uuid4().hex[:6]}")


def _vocabulary(path: str | None) -> dict[str, str | None]:
    if not path:
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except ValueError as exc:
            raise ValueError(f"--vocabulary {path}: not JSON ({exc}); give an object {{\"label\": \"Genre name\"}}") from None
    if not isinstance(data, dict) or not all(isinstance(v, (str, type(None))) for v in data.values()):
        raise ValueError(f"--vocabulary {path}: give a JSON object mapping each label to a genre name (or null: never written)")
    return {str(k): v for k, v in data.items()}


def _latest_rows(table: pa.Table) -> list[dict[str, Any]]:
    """One prediction per path (the newest, should an interrupted classify have left two)."""
    if "classified_at" in table.column_names:
        table = table.sort_by([("path", "ascending"), ("classified_at", "ascending")])
    rows: dict[str, dict[str, Any]] = {}
    for r in table.to_pylist():
        rows[r["path"]] = r
    return list(rows.values())


def _plan(rows: list[dict[str, Any]], root: str, index: dict[str, dict[str, Any]], vocab: dict[str, str | None],
          max_genres: int, min_confidence: float | None) -> list[dict[str, Any]]:
    items = []
    for r in rows:
        item = {"path": r["path"], "abs": os.path.join(root, r["path"]), "basis_size": r.get("size"),
                "basis_mtime_ns": r.get("mtime_ns"), "basis_fingerprint": r.get("fingerprint"),
                "model_id": r.get("model_id"), "confidence": r.get("confidence"), "genres": []}
        j = index.get(r["path"])
        if j is not None and (j["basis_size"], j["basis_mtime_ns"]) == (r.get("size"), r.get("mtime_ns")):
            item["j_size"], item["j_mtime_ns"] = j["size_after"], j["mtime_ns_after"]  # the file as genrecls left it
        genre, conf = r.get("genre"), r.get("confidence")
        rel = os.path.normpath(r["path"])
        if os.path.isabs(rel) or rel == ".." or rel.startswith(".." + os.sep):
            item.update(abs=None, skip="outside_root", skip_reason="the path leads outside the library root")
            items.append(item)
            continue
        listed = [g for g in (r.get("genres") or []) if g and g != "uncertain"]
        top = r.get("top_genre")
        # uncertain: the word, or (classify.uncertain_label set to another word) an answer that is not the top genre
        uncertain = genre == "uncertain" or (top is not None and genre is not None and genre != top)
        if genre is None and not listed:
            item.update(skip="no_prediction", skip_reason="the prediction row holds no genre")
        elif uncertain:
            item.update(skip="uncertain", skip_reason="the model is uncertain" + (
                f" (its top genre {top!r} at confidence {conf:.3f})" if top and conf is not None else ""))
        elif min_confidence is not None and (conf is None or conf < min_confidence):
            item.update(skip="low_confidence", skip_reason=f"confidence {conf if conf is None else round(conf, 3)} is "
                        f"below --min-confidence {min_confidence}")
        else:
            names, seen = [], set()
            for label in listed or [genre]:
                name = vocab.get(label, label)
                if name and name.casefold() not in seen:
                    seen.add(name.casefold())
                    names.append(name)
            item["genres"] = names[:max_genres]
            item["probabilities"] = {vocab.get(g, g) or g: r.get(f"prob_{g}") for g in (listed or [genre])[:max_genres]
                                     if f"prob_{g}" in r}
            if not item["genres"]:
                item.update(skip="no_prediction", skip_reason="the vocabulary maps the predicted genres to nothing")
        items.append(item)
    return items


def _workers_run(items: list[dict[str, Any]], ctx: dict[str, Any], *, address, workers, progress, verbose,
                 summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Run the items as Ray tasks (or here, for a small run with no cluster), with the progress line."""
    import sys

    rows: list[dict[str, Any]] = []
    bar = Progress(len(items), "files", enabled=progress)

    def take(res: dict[str, Any], n: int) -> None:
        rows.extend(res["rows"])
        summary["written"] += res["written"]
        bar.update(done=n, failed=sum(r["action"] == "failed" for r in res["rows"]))

    ray = sys.modules.get("ray")
    local = (not address and not os.environ.get("RAY_ADDRESS") and not (ray is not None and ray.is_initialized())
             and len(items) <= IN_PROCESS_FILES)
    try:
        if local:
            for i, (a, b) in enumerate(task_bounds(len(items), TRACKS_PER_TASK, 1)):
                take(run_batch(items[a:b], ctx, i), b - a)
        elif items:
            with ray_session(address, workers, verbose=verbose, data=False):
                _ray_run(items, ctx, workers, take, summary)
    finally:
        bar.close()
    return rows


def _ray_run(items: list[dict[str, Any]], ctx: dict[str, Any], workers: int | None,
             take: Callable[[dict[str, Any], int], None], summary: dict[str, Any]) -> None:
    import ray
    from ray.exceptions import RayError, RayTaskError

    n_slots, max_inflight = slots(workers)
    remote = _remote_run_batch().options(num_cpus=1, max_retries=0, scheduling_strategy="SPREAD")
    ctx_ref = ray.put(ctx)
    queue = [(items[a:b], False) for a, b in reversed(task_bounds(len(items), TRACKS_PER_TASK, n_slots, MAX_TASKS))]
    inflight: dict[Any, tuple[list[dict[str, Any]], bool, int]] = {}
    batch = 0
    while queue or inflight:
        while queue and len(inflight) < max_inflight:
            chunk, retried = queue.pop()
            inflight[remote.remote(chunk, ctx_ref, batch)] = (chunk, retried, batch)
            batch += 1
        ready, _ = ray.wait(list(inflight), num_returns=1)
        for ref in ready:
            chunk, retried, b = inflight.pop(ref)
            try:
                take(ray.get(ref), len(chunk))
            except RayTaskError as exc:  # the task itself raised: the journal could not be written
                cause = getattr(exc, "cause", None)
                raise (cause if isinstance(cause, Exception) else exc) from None
            except RayError as exc:  # the worker died: settle its pending groups, retry the rest once
                run_loc = Location.parse(ctx["run_uri"])
                names = [n for n in run_loc.list(suffix=".parquet") if n.startswith(f"pending-{b:05d}-")]
                _recover_pending(run_loc, ctx["library"], names)
                done = {r["path"] for r in read_journal(run_loc).to_pylist()}
                rest = [it for it in chunk if it["path"] not in done]
                log.warning("a task on %d file(s) lost its worker (%s); %d written before, retrying %d",
                            len(chunk), type(exc).__name__, len(chunk) - len(rest), len(rest))
                rows = [_row(it, "written", "recovered", "written before its worker died (journal resolved by fingerprint)")
                        for it in chunk if it["path"] in done]
                summary["written"] += len(rows)
                if rest and not retried:
                    queue.append((rest, True))
                rows += [_row(it, "failed", "worker_crashed", f"the worker died twice while tagging ({type(exc).__name__})")
                         for it in rest if retried]
                take({"rows": rows, "written": 0}, len(chunk) - (len(rest) if not retried else 0))


@functools.lru_cache(maxsize=1)
def _remote_run_batch():
    """``run_batch`` as a Ray remote function, made once per process (Ray exports it once per job)."""
    import ray

    return ray.remote(run_batch)


def _write_report(loc: Location, rows: list[dict[str, Any]]) -> None:
    import pyarrow.csv as pacsv

    table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["path"]), schema=_REPORT_SCHEMA)
    loc.write_atomic(f"{REPORT}.parquet", lambda out: pq.write_table(table, out, compression="zstd"))
    loc.write_atomic(f"{REPORT}.csv", lambda out: pacsv.write_csv(table, out))


def _summarise(rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    summary["by_action"] = dict(Counter(r["action"] for r in rows))
    summary["by_kind"] = dict(Counter(r["kind"] for r in rows))
    summary["failed"] = sum(r["action"] == "failed" for r in rows)


def tag(predictions: str | os.PathLike, *, apply: bool = False, mode: str = "keep", max_genres: int = 3,
        min_confidence: float | None = None, id3v23: bool = False, separator: str = "/", keep_mtime: bool = False,
        vocabulary: str | None = None, address: str | None = None, workers: int | None = None,
        progress: bool = True, verbose: bool = False) -> dict[str, Any]:
    """Write the predicted genres of a predictions folder into the library's files (a preview unless ``apply``).

    Parameters
    ----------
    predictions : the folder ``genrecls classify`` wrote (its ``classify.json`` names the library)
    apply : write the files (else report what would be written, in ``PREDICTIONS/tag-preview/``)
    mode : a genre a person wrote is kept (``keep``), replaced (``overwrite``) or added to (``add``)
    max_genres : at most this many genres per file, best first
    min_confidence : skip predictions whose ``confidence`` is below this
    id3v23, separator : write ID3v2.3 (multiple genres joined by ``separator``) instead of v2.4
    keep_mtime : give each written file its modification time back
    vocabulary : a JSON file mapping the model's labels to the genre names to write (null: never written)

    Returns the run's summary (``by_kind``, ``by_action``, ``written``, ``failed``, the
    ``journal`` run folder with ``apply``, the ``report``).  Raises for run-level problems (no
    predictions, the folder locked by another ``tag`` or ``classify``); never for a bad file.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if max_genres < 1:
        raise ValueError(f"--max-genres must be at least 1, got {max_genres}")
    if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"--min-confidence must be between 0 and 1, got {min_confidence}")
    if not separator:
        raise ValueError("--separator must not be empty")
    vocab = _vocabulary(vocabulary)
    loc = Location.parse(predictions)
    if not loc.exists(INFO_NAME):
        raise FileNotFoundError(f"{loc.uri} holds no {INFO_NAME}: not a predictions folder written by genrecls classify")
    info = loc.read_json(INFO_NAME)
    root = str(info.get("library") or "")
    if not root or not os.path.isdir(root):
        raise FileNotFoundError(f"the library {root!r} named in {loc.uri}/{INFO_NAME} is not a folder on this machine")
    t0 = time.monotonic()
    run = _new_run_name()
    options = {"mode": mode, "max_genres": max_genres, "min_confidence": min_confidence, "id3v23": id3v23,
               "separator": separator, "keep_mtime": keep_mtime, "vocabulary": vocab or None}
    summary: dict[str, Any] = {"predictions": loc.uri, "library": root, "apply": apply, "run": run if apply else None,
                               "options": options, "written": 0, "files": 0}
    try:
        with folder_lock(loc, "genrecls tag"):
            table = read_predictions(loc)
            rows = _latest_rows(table)
            if apply:
                summary["recovered"] = _recover(loc, lambda: _folders(rows, loc))
            else:
                summary["interrupted_runs"] = _unfinished(loc)
            items = _plan(rows, root, journal_index(loc), vocab, max_genres, min_confidence)
            summary["files"] = len(items)
            out = loc.child(JOURNAL, run) if apply else loc.child(PREVIEW)
            ctx = {"action": "tag", "apply": apply, "run": run, "run_uri": out.uri if apply else None, "library": root,
                   "separator": separator, "id3v23": id3v23, "keep_mtime": keep_mtime, "mode": mode}
            _run(out, ctx, items, summary, info_extra={"model_id": info.get("model_id"), "options": options},
                 address=address, workers=workers, progress=progress, verbose=verbose)
            if apply:
                summary["recorded"] = _record_stats(loc, info)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: whatever was renamed is journaled; a re-run finishes
        stop = as_interrupted(exc)
        stop.kept = (f"every file written so far is journaled in {loc.uri}/{JOURNAL}/{run} (the next run settles "
                     "a group stopped half-way)" if apply else "the library was not changed (preview)")
        raise stop from None
    summary["wall_seconds"] = time.monotonic() - t0
    return summary


def _folders(rows: list[dict[str, Any]], loc: Location) -> set[str]:
    """The library folders genrecls tag may have left temporary copies in (predicted and journaled paths)."""
    paths = {r["path"] for r in rows}
    for name in journal_runs(loc):
        run_loc = loc.child(JOURNAL, name)
        paths.update(read_journal(run_loc).column("path").to_pylist())
        paths.update(read_journal(run_loc, pending=True).column("path").to_pylist())
    return {os.path.dirname(p) for p in paths}


def _run(out: Location, ctx: dict[str, Any], items: list[dict[str, Any]], summary: dict[str, Any], *,
         info_extra: dict[str, Any], address, workers, progress, verbose) -> None:
    """Plan written, tasks run, report and summary written (``run.json`` says finished only at the end)."""
    apply = ctx["apply"]
    info = {"format": "genrecls-tag-journal", "run": ctx["run"], "action": ctx["action"], "library": ctx["library"],
            "predictions": summary["predictions"], "started": utc_timestamp(), "finished": False,
            "versions": library_versions(), **info_extra}
    out.makedirs()
    if apply:
        out.write_json(RUN_INFO, info)
    rows = _workers_run(items, ctx, address=address, workers=workers, progress=progress, verbose=verbose,
                        summary=summary)
    _summarise(rows, summary)
    _write_report(out, rows)
    summary["report"] = out.child(f"{REPORT}.csv").uri
    if apply:
        _compact(out)
        summary["journal"] = out.uri
        out.write_json(RUN_INFO, {**info, "finished": utc_timestamp(), "summary": summary})
    else:
        out.write_json("summary.json", summary)


def undo(journal: str | os.PathLike, *, keep_mtime: bool = False, apply: bool = True, address: str | None = None,
         workers: int | None = None, progress: bool = True, verbose: bool = False) -> dict[str, Any]:
    """Restore the old values of every field a ``genrecls tag`` run (its journal folder) wrote.

    A file is restored only if it is still as genrecls last left it (fingerprint) and its
    fields still hold what that run wrote; others are skipped with a reason.  The undo is
    itself a journaled run (``tag-journal/<NEW RUN>``), so it can be undone in turn.
    """
    run_loc = _run_folder(Location.parse(journal))
    if not run_loc.exists(RUN_INFO):
        hint = ""
        if run_loc.exists(INFO_NAME) or (run_loc.root.rstrip("/").endswith(JOURNAL)):
            base = run_loc if run_loc.exists(INFO_NAME) else Location.parse(os.path.dirname(run_loc.root))
            names = journal_runs(base)
            hint = f"; give one run: {', '.join(f'{base.uri}/{JOURNAL}/{n}' for n in names[-5:]) or 'none yet'}"
        raise FileNotFoundError(f"{run_loc.uri} is not a genrecls tag journal (no {RUN_INFO}){hint}")
    undone_run = run_loc.root.rstrip("/").rsplit("/", 1)[-1]
    loc = _grandparent(run_loc)
    t0 = time.monotonic()
    run = _new_run_name()
    summary: dict[str, Any] = {"predictions": loc.uri, "undoes": undone_run, "apply": apply, "run": run, "written": 0,
                               "files": 0, "options": {"keep_mtime": keep_mtime}}
    try:
        with folder_lock(loc, "genrecls tag"):
            info = run_loc.read_json(RUN_INFO)
            root = info["library"]
            summary["library"] = root
            summary["recovered"] = _recover(loc, lambda: _folders([], loc))
            index = journal_index(loc)
            undone = {r["undoes"] for name in journal_runs(loc) for r in read_journal(loc.child(JOURNAL, name)).to_pylist()
                      if r["action"] == "undo"}
            items = []
            for r in read_journal(run_loc).to_pylist():
                if r["entry_id"] in undone:
                    continue
                latest = index.get(r["path"], r)
                items.append({"path": r["path"], "abs": os.path.join(root, r["path"]), "format": r["format"],
                              "undoes": r["entry_id"], "old": json.loads(r["old"]), "new": json.loads(r["new"]),
                              "expected_fingerprint": latest["fingerprint_after"], "id3_restore": r["id3_before"],
                              "basis_size": r["basis_size"], "basis_mtime_ns": r["basis_mtime_ns"],
                              "model_id": r["model_id"], "confidence": r["confidence"]})
            summary["files"] = len(items)
            summary["already_undone"] = len(undone & {r for r in read_journal(run_loc).column("entry_id").to_pylist()})
            out = loc.child(JOURNAL, run)
            ctx = {"action": "undo", "apply": apply, "run": run, "run_uri": out.uri, "library": root,
                   "separator": "/", "id3v23": False, "keep_mtime": keep_mtime, "mode": "keep"}
            _run(out, ctx, items, summary, info_extra={"undoes": undone_run, "options": summary["options"]},
                 address=address, workers=workers, progress=progress, verbose=verbose)
            if apply:
                summary["recorded"] = _record_stats(loc, loc.read_json(INFO_NAME) if loc.exists(INFO_NAME) else {})
    except KeyboardInterrupt as exc:
        stop = as_interrupted(exc)
        stop.kept = f"every file restored so far is journaled in {loc.uri}/{JOURNAL}/{run}"
        raise stop from None
    summary["wall_seconds"] = time.monotonic() - t0
    return summary


def _run_folder(loc: Location) -> Location:
    """A journal run folder given as itself or as a file inside it (``.../RUN/journal.parquet``, ``run.json``...)."""
    if loc.exists(RUN_INFO) or not loc.is_local or not os.path.isfile(loc.root):
        return loc
    parent = Location.parse(os.path.dirname(loc.root))
    return parent if parent.exists(RUN_INFO) else loc


def list_journals(predictions: str | os.PathLike) -> list[dict[str, Any]]:
    """Every tag and undo run of a predictions folder, oldest first: its folder, what it did, how many files it
    wrote, whether it finished, and which later run undid it (None: it can be undone with its folder)."""
    loc = Location.parse(predictions)
    if not loc.exists(INFO_NAME):
        raise FileNotFoundError(f"{loc.uri} holds no {INFO_NAME}: not a predictions folder written by genrecls classify")
    runs = []
    undone_by: dict[str, str] = {}
    for name in journal_runs(loc):
        run_loc = loc.child(JOURNAL, name)
        info = _run_info(run_loc)
        rows = read_journal(run_loc)
        runs.append({"run": name, "folder": run_loc.uri, "action": info.get("action", "?"),
                     "finished": info.get("finished"), "written": rows.num_rows, "model_id": info.get("model_id"),
                     "undoes": info.get("undoes"), "started": info.get("started")})
        if info.get("undoes"):
            undone_by.setdefault(info["undoes"], name)
    for r in runs:
        r["undone_by"] = undone_by.get(r["run"])
    return runs


def format_journals(runs: list[dict[str, Any]]) -> str:
    """The runs of :func:`list_journals` as a table, and how to undo one."""
    if not runs:
        return "no genrecls tag run has written this library yet"
    rows = [(r["run"], r["action"] + (f" of {r['undoes']}" if r["undoes"] else ""), r["written"],
             "yes" if r["finished"] else "no (settled by the next run)", r["undone_by"] or "-") for r in runs]
    last = next((r for r in reversed(runs) if r["written"] and not r["undone_by"]), None)
    out = format_table(rows, ("run", "action", "files written", "finished", "undone by"))
    if last is not None:
        out += f"\n\nundo the latest: genrecls tag --undo {last['folder']}"
    return out


def _grandparent(loc: Location) -> Location:
    """PREDICTIONS of PREDICTIONS/tag-journal/RUN (a URI keeps its query, e.g. an S3 endpoint)."""
    from urllib.parse import urlsplit, urlunsplit

    if loc.is_local:
        return Location.parse(os.path.dirname(os.path.dirname(loc.root)))
    scheme, netloc, path, query, fragment = urlsplit(loc.uri)
    return Location.parse(urlunsplit((scheme, netloc, path.rstrip("/").rsplit("/", 2)[0], query, fragment)))


def format_summary(summary: dict[str, Any]) -> str:
    """The closing report of a tag (or undo) run: what was (or would be) written and why the rest was skipped."""
    s = summary
    kinds = s.get("by_kind", {})
    by_action = s.get("by_action", {})
    if s.get("undoes"):
        head = f"undo of {s['undoes']} in {s['predictions']}: {s['files']} file(s) journaled"
        if s.get("already_undone"):
            head += f" ({s['already_undone']} already undone)"
    else:
        head = f"{'tag' if s['apply'] else 'preview (nothing written; --apply writes)'}: {s['files']} prediction(s) in {s['predictions']}"
    done = by_action.get("written", 0) if s["apply"] else by_action.get("would_write", 0)
    lines = [head, f"{'written' if s['apply'] else 'would write'}: {done}; skipped: {by_action.get('skip', 0)}; "
                   f"failed: {by_action.get('failed', 0)}"]
    rows = [(k, n, WRITE_KINDS.get(k, _SKIP_TEXT.get(k, ""))) for k, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))]
    if rows:
        lines += ["", format_table(rows, ("kind", "files", "meaning"))]
    for name, rec in (s.get("recovered") or {}).items():
        lines.append(f"recovered the interrupted run {name}: {rec.get('applied', 0)} write(s) completed, "
                     f"{rec.get('not_applied', 0)} not made")
    if s.get("interrupted_runs"):
        lines.append(f"interrupted run(s) {', '.join(s['interrupted_runs'])}: the next --apply settles them first; "
                     "files they wrote may show as changed in this preview")
    if s.get("report"):
        lines.append(f"\nreport (path, current genre, new genre, why): {s['report']}")
    if s.get("journal"):
        lines.append(f"journal: {s['journal']} (undo: genrecls tag --undo {s['journal']})")
    rec = s.get("recorded") or {}
    if rec.get("prediction_rows") or rec.get("dataset_files"):
        lines.append(f"new file stats recorded (their audio is unchanged): {rec.get('prediction_rows', 0)} prediction(s), "
                     "so classify does not score them again"
                     + (f"; {rec['dataset_files']} track(s) of the dataset, so ingest does not decode them again"
                        if rec.get("dataset_files") else ""))
    if s.get("wall_seconds") and s["files"]:
        lines.append(f"{s['files']} file(s) in {format_duration(s['wall_seconds'])}: "
                     f"{s['files'] / max(s['wall_seconds'], 1e-9):.1f} files/s")
    return "\n".join(lines)


_SKIP_TEXT = {
    "tagged": "a genre genrecls did not write (kept; --overwrite, --add)",
    "edited": "a genre a person changed after genrecls wrote it (kept)",
    "up_to_date": "already holds this prediction",
    "uncertain": "the model is uncertain",
    "low_confidence": "below --min-confidence",
    "no_prediction": "no genre to write",
    "outside_root": "a path outside the library (never written)",
    "missing": "the file is gone",
    "changed": "changed since classification (or since genrecls wrote it): not tagged",
    "superseded": "a later write changed the fields (undo it first)",
    "unsupported": "a format genrecls does not write",
    "foreign_genre": "a WAV genre in RIFF INFO that mutagen cannot change",
    "read_only": "read-only file",
    "permission": "permission denied",
    "unparseable": "tags mutagen cannot parse",
    "not_regular": "not a regular file",
    "error": "an unexpected error (see the report)",
    "worker_crashed": "the worker died on this file",
    "recovered": "written before its worker died",
}
