"""Storage: local paths or any URI ``pyarrow.fs`` understands (``s3://``, ``gs://``, ``file://``).

Readers never see a partial file:

* **local disks**: a file is written under a hidden temporary name
  (``.tmp-<id>-<name>.partial``: ``pyarrow.dataset`` skips hidden files, and ``*.parquet``
  globs in DuckDB and Polars, which do match dot files, do not match the suffix), flushed
  to disk (``fsync``) and renamed into place.
* **object stores**: there is no rename (a "move" is a copy then a delete, and the copy is
  listed before the delete), so nothing is written under a temporary name there.  The
  bytes are first written to a local spool file; only a complete file is uploaded, straight
  to its final key, as one PUT (small objects) or a multipart upload.  The store makes the
  object visible only when the PUT or the ``CompleteMultipartUpload`` succeeds: a writer
  that fails before that uploads nothing, and one killed mid-upload leaves an incomplete
  multipart upload that no listing or GET shows (a bucket lifecycle rule
  ``AbortIncompleteMultipartUpload`` reclaims its parts).  An object replaced by a new PUT
  is atomically replaced: readers get the old or the new bytes, never a mix.

Locks: :mod:`genrecls.storage.locks`.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

__all__ = ["Location", "AtomicFile", "TMP_PREFIX", "new_shard_name"]

TMP_PREFIX = ".tmp-"


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
        """Open ``rel`` for writing; ``commit()`` makes it appear whole, ``abort()`` leaves nothing.

        Local disks: a hidden ``.tmp-*`` file renamed into place (removed by ``abort()``, or
        by :meth:`remove_temporaries` after a crash).  Object stores: a local spool file
        uploaded to the final key on ``commit()`` (see the module's docstring).
        """
        folder, name = posixpath.split(rel)
        if folder and self.is_local:
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
        """Delete temporary files left in a sub-folder by a killed writer; returns how many.

        Only local disks have any: an object store is never written under a temporary name (see the
        module's docstring), so nothing is listed there (a listing of ``shards/`` is one request per
        1,000 shards)."""
        if not self.is_local:
            return 0
        sel = pafs.FileSelector(self.join(*parts), allow_not_found=True, recursive=False)
        n = 0
        for info in self.fs.get_file_info(sel):
            if info.type == pafs.FileType.File and info.base_name.startswith(TMP_PREFIX):
                self.fs.delete_file(info.path)
                n += 1
        return n


class AtomicFile:
    """An output stream that appears at ``rel`` only on :meth:`commit`, whole."""

    def __init__(self, location: Location, rel: str, tmp: str):
        self.location = location
        self.rel = rel
        self.done = False
        if location.is_local:
            self.tmp = tmp
            self.spool = None
            self.stream = location.fs.open_output_stream(location.join(tmp))
        else:  # object stores: no temporary object, a local spool file
            import tempfile

            fd, self.spool = tempfile.mkstemp(prefix="genrecls-upload-", suffix=f"-{posixpath.basename(rel)}")
            os.close(fd)
            self.tmp = None
            self.stream = pa.OSFile(self.spool, "wb")

    def commit(self) -> None:
        """Close the stream; local disks: ``fsync`` and rename; object stores: upload whole."""
        loc = self.location
        self.stream.close()
        if loc.is_local:
            fd = os.open(loc.join(self.tmp), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            loc.fs.move(loc.join(self.tmp), loc.join(self.rel))
        else:
            try:
                # one call into Arrow: a single PUT, or a multipart upload completed only
                # after every part arrived
                pafs.copy_files(self.spool, loc.join(self.rel), source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=loc.fs)
            finally:
                os.unlink(self.spool)
        self.done = True

    def abort(self) -> None:
        """Close and delete the temporary or spool file (best effort; never raises)."""
        if self.done:
            return
        self.done = True
        try:
            self.stream.close()
        except Exception:
            pass
        try:
            if self.spool is not None:
                os.unlink(self.spool)
            else:
                self.location.delete(self.tmp)
        except Exception:
            pass


def new_shard_name(prefix: str = "part") -> str:
    """Time-ordered unique shard name: a later shard sorts after an earlier one."""
    return f"{prefix}-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
