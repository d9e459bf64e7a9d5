"""The failures and warnings tables: Parquet parts beside an output, newest row per path wins.

The kinds and reasons they hold are :mod:`genrecls.core.errors`'s.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from genrecls.storage.location import new_shard_name

__all__ = ["record_schema", "record_row", "warning_row", "problem_rows", "RecordTable", "Records"]



def record_schema() -> pa.Schema:
    """Schema of the failures and warnings tables."""
    return pa.schema([
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("size", pa.int64()),
        pa.field("mtime_ns", pa.int64()),
        pa.field("time", pa.timestamp("s", tz="UTC"), nullable=False),
    ])


def record_row(rel_path: str, label: str | None, kind: str, reason: str,
               size: int | None = None, mtime_ns: int | None = None) -> dict[str, Any]:
    """One row of a failures or warnings table."""
    return {"path": rel_path, "label": label, "kind": kind, "reason": reason, "size": size,
            "mtime_ns": mtime_ns, "time": dt.datetime.now(dt.timezone.utc).replace(microsecond=0)}


def warning_row(rel_path: str, label: str | None, warnings, size: int | None = None,
                mtime_ns: int | None = None) -> dict[str, Any] | None:
    """The one warnings-table row of a kept file (None without warnings): the first, most serious
    warning's kind, and every warning's reason."""
    if not warnings:
        return None
    return record_row(rel_path, label, warnings[0].kind, "; ".join(w.reason for w in warnings), size, mtime_ns)


def problem_rows(problems: Iterable[Any]) -> list[dict[str, Any]]:
    """Failure rows of the problems discovery found (:class:`genrecls.audio.discovery.Problem`: ``rel_path, label, kind, reason``)."""
    return [record_row(p.rel_path, p.label, p.kind, p.reason) for p in problems]




class RecordTable:
    """A failures or warnings table: Parquet parts in ``location/folder``, newest row per path wins.

    Parts are written atomically (:meth:`~genrecls.storage.location.Location.write_atomic`), so a
    reader sees a part whole or not at all.
    """

    def __init__(self, location, folder: str):
        self.location = location
        self.folder = folder

    def names(self) -> list[str]:
        return self.location.list(self.folder, suffix=".parquet")

    def read(self) -> pa.Table:
        """One row per path (the newest record wins)."""
        names = self.names()
        if not names:
            return record_schema().empty_table()
        tables = []
        for n in names:
            with self.location.fs.open_input_file(self.location.join(self.folder, n)) as f:
                tables.append(pq.read_table(f))
        table = pa.concat_tables(tables).cast(record_schema())
        rows = {}
        for row in table.to_pylist():  # names are time-ordered: later overrides earlier
            rows[row["path"]] = row
        return pa.Table.from_pylist(list(rows.values()), schema=record_schema())

    def write(self, rows: list[dict[str, Any]], name: str | None = None) -> None:
        if not rows:
            return
        table = pa.Table.from_pylist(rows, schema=record_schema())
        self.location.write_atomic(f"{self.folder}/{name or new_shard_name()}",
                                   lambda out: pq.write_table(table, out, compression="zstd"))

    def compact(self, keep) -> int:
        """Rewrite the table as one part holding the rows for which ``keep(row)`` is true."""
        names = self.names()
        if not names:
            return 0
        rows = [r for r in self.read().to_pylist() if keep(r)]
        if rows:
            self.write(rows)
        for n in names:
            self.location.delete(self.folder, n)
        return len(rows)

    def remove_temporaries(self) -> int:
        return self.location.remove_temporaries(self.folder)


class Records:
    """The failures and warnings tables of an output folder (a dataset or a predictions folder).

    ``location/failures/`` and ``location/warnings/``, each a :class:`RecordTable`.  A write
    that fails with an :class:`OSError` raises ``write_error(message)`` when given (a
    dataset's :class:`~genrecls.storage.dataset.OutputError`), else the ``OSError`` itself.
    """

    def __init__(self, location, write_error: Callable[[str], Exception] | None = None):
        self.location = location
        self.failure_table = RecordTable(location, "failures")
        self.warning_table = RecordTable(location, "warnings")
        self._write_error = write_error

    def failures(self) -> pa.Table:
        """One row per path that could not be used (the newest record wins)."""
        return self.failure_table.read()

    def warnings(self) -> pa.Table:
        """One row per path used although something is off (the newest record wins)."""
        return self.warning_table.read()

    def write_failures(self, rows: list[dict[str, Any]], name: str | None = None) -> None:
        self._write(self.failure_table, rows, name)

    def write_warnings(self, rows: list[dict[str, Any]], name: str | None = None) -> None:
        self._write(self.warning_table, rows, name)

    def _write(self, table: RecordTable, rows: list[dict[str, Any]], name: str | None) -> None:
        try:
            table.write(rows, name)
        except OSError as exc:
            if self._write_error is None:
                raise
            raise self._write_error(f"cannot write {table.folder}/ in {self.location.uri}: {exc}") from exc

    def compact_failures(self, live_paths: set[str], discovered_paths: set[str] | None = None) -> int:
        """Rewrite the failures table as one part: drop paths that now have rows (``live_paths``) or that vanished."""
        return self.failure_table.compact(
            lambda r: r["path"] not in live_paths and (discovered_paths is None or r["path"] in discovered_paths))

    def compact_warnings(self, live: dict[str, tuple[int, int]]) -> int:
        """Rewrite the warnings table as one part: only rows of files as they are now (``live``: path -> (size, mtime_ns))."""
        return self.warning_table.compact(lambda r: live.get(r["path"]) == (r["size"], r["mtime_ns"]))

    def remove_temporaries(self) -> int:
        return self.failure_table.remove_temporaries() + self.warning_table.remove_temporaries()
