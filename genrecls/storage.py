"""Storage: local paths or any URI ``pyarrow.fs`` understands (``s3://``, ``gs://``, ``file://``).

Every output file is written under a hidden temporary name (``.tmp-<id>-<name>.partial``:
``pyarrow.dataset`` skips hidden files, and ``*.parquet`` globs in DuckDB and Polars, which
do match dot files, do not match the suffix) and renamed into place when complete.
On object stores the rename is a copy plus delete, still invisible to readers until done.
"""

from __future__ import annotations

import fcntl
import json
import os
import posixpath
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

__all__ = ["Location", "AtomicFile", "LockedError", "TMP_PREFIX"]

TMP_PREFIX = ".tmp-"


class LockedError(RuntimeError):
    """Another process holds the lock of an output folder."""


@dataclass(frozen=True)
class Location:
    """A folder on a local disk or an object store."""

    fs: pafs.FileSystem
    root: str  # path inside fs, no trailing slash
    uri: str

    @classmethod
    def parse(cls, uri_or_path: str | os.PathLike) -> "Location":
        s = os.fspath(uri_or_path)
        if "://" in s:
            fs, root = pafs.FileSystem.from_uri(s)
            if isinstance(fs, pafs.LocalFileSystem):
                root = os.path.abspath(root)
                return cls(fs, root.rstrip("/") or "/", root)
            return cls(fs, root.rstrip("/"), s.rstrip("/"))
        root = os.path.abspath(s)
        return cls(pafs.LocalFileSystem(), root, root)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def join(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def child(self, *parts: str) -> "Location":
        # a URI's query (``s3://b/x?endpoint_override=...``) stays at the end of the child's URI
        scheme, netloc, path, query, fragment = urlsplit(self.uri)
        if not scheme or not query:
            return Location(self.fs, self.join(*parts), posixpath.join(self.uri, *parts))
        uri = urlunsplit((scheme, netloc, posixpath.join(path or "/", *parts), query, fragment))
        return Location(self.fs, self.join(*parts), uri)

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.join(*parts)).type != pafs.FileType.NotFound

    def makedirs(self, *parts: str) -> None:
        self.fs.create_dir(self.join(*parts), recursive=True)

    def list(self, *parts: str, suffix: str = "", include_hidden: bool = False) -> list[str]:
        """Names (not paths) of files directly in a sub-folder, sorted."""
        sel = pafs.FileSelector(self.join(*parts), allow_not_found=True, recursive=False)
        names = []
        for info in self.fs.get_file_info(sel):
            if info.type != pafs.FileType.File:
                continue
            name = info.base_name
            if not include_hidden and name.startswith((".", "_")):
                continue
            if name.endswith(suffix):
                names.append(name)
        return sorted(names)

    def delete(self, *parts: str) -> None:
        try:
            self.fs.delete_file(self.join(*parts))
        except FileNotFoundError:
            pass

    def open_atomic(self, rel: str) -> "AtomicFile":
        """Open ``rel`` for writing under a temporary name; ``commit()`` renames it into place.

        Readers never see a partial file: until ``commit()`` the bytes live in a hidden
        ``.tmp-*`` file (removed by ``abort()``, or by :meth:`remove_temporaries` after a crash).
        """
        folder, name = posixpath.split(rel)
        if folder:
            self.makedirs(folder)
        # hidden (pyarrow.dataset skips it) and not matching '*.parquet' (DuckDB and Polars globs match dot files)
        tmp = posixpath.join(folder, f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{name}.partial")
        return AtomicFile(self, rel, tmp)

    def write_atomic(self, rel: str, writer: Callable[[Any], None]) -> None:
        """Write ``rel`` by calling ``writer(output_stream)`` on a temporary file, then rename it into place."""
        f = self.open_atomic(rel)
        try:
            writer(f.stream)
            f.commit()
        except BaseException:
            f.abort()
            raise

    def write_text(self, rel: str, text: str) -> None:
        self.write_atomic(rel, lambda out: out.write(text.encode()))

    def write_json(self, rel: str, data: Any) -> None:
        self.write_text(rel, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")

    def read_text(self, rel: str) -> str:
        with self.fs.open_input_stream(self.join(rel)) as f:
            return f.read().decode()

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_text(rel))

    def remove_temporaries(self, *parts: str) -> int:
        """Delete temporary files left in a sub-folder by a killed writer; returns how many."""
        sel = pafs.FileSelector(self.join(*parts), allow_not_found=True, recursive=False)
        n = 0
        for info in self.fs.get_file_info(sel):
            if info.type == pafs.FileType.File and info.base_name.startswith(TMP_PREFIX):
                self.fs.delete_file(info.path)
                n += 1
        return n

    @contextmanager
    def lock(self, what: str) -> Iterator[None]:
        """Hold an exclusive lock on this folder for ``what`` (an ingest, a retrain...).

        Local folders use ``flock`` (released by the kernel if the process dies).  On an
        object store there is no atomic lock primitive: the lock is advisory only (a lock
        file with the owner is written and removed) and concurrent writers must be avoided
        by the scheduler.
        """
        self.makedirs()
        owner = {"what": what, "pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if not self.is_local:
            self.write_json(".lock.json", owner)
            try:
                yield
            finally:
                self.delete(".lock.json")
            return
        path = self.join(".lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # The holder writes its details right after taking the lock: if we lost a
                # race by microseconds they may not be there yet, so look again briefly.
                info: dict = {}
                for _ in range(20):
                    try:
                        held = os.pread(fd, 4096, 0).decode(errors="replace").strip()
                        info = json.loads(held) if held else {}
                    except (OSError, ValueError):
                        info = {}
                    if info:
                        break
                    time.sleep(0.05)
                desc = f"{info.get('what', 'another genrecls process')} (pid {info.get('pid', '?')} on {info.get('host', '?')}, since {info.get('since', '?')})"
                raise LockedError(f"{self.uri} is in use by {desc}; wait for it to finish or stop it first") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(owner).encode(), 0)
            yield
        finally:
            os.close(fd)


class AtomicFile:
    """An output stream written under a temporary name and renamed into place on :meth:`commit`."""

    def __init__(self, location: Location, rel: str, tmp: str):
        self.location = location
        self.rel = rel
        self.tmp = tmp
        self.stream = location.fs.open_output_stream(location.join(tmp))
        self.done = False

    def commit(self) -> None:
        """Close the stream, make the bytes durable (local disks) and rename into place."""
        loc = self.location
        self.stream.close()
        if loc.is_local:
            fd = os.open(loc.join(self.tmp), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        loc.fs.move(loc.join(self.tmp), loc.join(self.rel))
        self.done = True

    def abort(self) -> None:
        """Close and delete the temporary file (best effort; never raises)."""
        if self.done:
            return
        self.done = True
        try:
            self.stream.close()
        except Exception:
            pass
        try:
            self.location.delete(self.tmp)
        except Exception:
            pass
