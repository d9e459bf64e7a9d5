"""A model registry in a folder (or URI): versions, the champion, promotion and rollback.

Layout::

    REGISTRY/
      champion.json               {"version": "v0003", "since": ..., "previous": [...]}  (atomic pointer)
      splits.parquet              the fixed split assignment (track_id, split) every version is held to
      versions/v0001/             a complete run folder (model/, model.keras, run.json, metrics.json...)
      versions/v0001/version.json metrics, dataset snapshot, configuration, library versions, time
      decisions/<time>-v0002.json one record per retrain decision (promoted / kept / failed)
      .lock / .lock.json          held by a retrain, ``models promote`` and ``models rollback``

A version exists once its ``version.json`` does: on a local disk the folder is written
under a temporary name and renamed; on an object store its files are uploaded first (each
appears whole, see :mod:`genrecls.storage.location`) and ``version.json`` last, so a half-uploaded
version is invisible and is cleared by the next retrain.  The champion pointer is replaced
in one write (a rename, or one PUT), so a retrain that dies leaves the registry as it was.
Every change of the champion holds the registry's lock, and is a compare-and-swap on the
pointer's own version besides (the lock's lease can expire under a stalled holder): on S3 a
``PUT`` with ``If-Match`` on the ETag it read (``If-None-Match: *`` for the first champion), on a
local disk a read-compare-rename under ``flock`` on ``.champion.lock``; a swap that lost the race
reads the pointer again and re-applies its change (promote, rollback), or fails when it was made
against a champion that is no longer the champion (retrain's promotion:
:class:`ChampionConflict`).  Stores with no conditional write through pyarrow (``gs://``) rely
on the lock alone.  ``version.json`` records the dataset's index version the version was trained
on (``dataset.version``).  ``classify --model REGISTRY`` uses the current champion.
"""

from __future__ import annotations

import time
from typing import Any

from genrecls.core.provenance import utc_timestamp
from genrecls.storage.location import Location
from genrecls.storage.locks import folder_lock

__all__ = ["RegistryError", "ChampionConflict", "Registry", "resolve_run", "is_registry"]

CHAMPION = "champion.json"
SPLITS = "splits.parquet"
CHAMPION_LOCK = ".champion.lock"
#: tries of a compare-and-swap of the champion pointer that keeps losing races
CAS_TRIES = 50
_ANY = object()


class RegistryError(ValueError):
    """A registry is missing, empty, or asked for a version it does not hold."""


class ChampionConflict(RegistryError):
    """The champion changed between reading it and replacing it (a promotion decided against another champion)."""


class Registry:
    def __init__(self, location: Location | str):
        self.location = location if isinstance(location, Location) else Location.parse(location)

    @property
    def uri(self) -> str:
        return self.location.uri

    # -- versions ---------------------------------------------------------------------
    def versions(self) -> list[str]:
        from pyarrow import fs as pafs

        sel = pafs.FileSelector(self.location.join("versions"), allow_not_found=True)
        names = [i.base_name for i in self.location.fs.get_file_info(sel)
                 if i.type == pafs.FileType.Directory and i.base_name.startswith("v")]
        return sorted(n for n in names if self.location.exists("versions", n, "version.json"))

    def next_version(self) -> str:
        existing = [int(v[1:]) for v in self.versions() if v[1:].isdigit()]
        return f"v{(max(existing) + 1) if existing else 1:04d}"

    def version_location(self, version: str) -> Location:
        return self.location.child("versions", version)

    def version_info(self, version: str) -> dict[str, Any]:
        if not self.location.exists("versions", version, "version.json"):
            raise RegistryError(f"{self.uri} has no version {version!r}; versions: {self.versions() or 'none'}")
        return self.location.read_json(f"versions/{version}/version.json")

    def add_version(self, run_dir: str, version: str, info: dict[str, Any]) -> Location:
        """Move a finished local run folder into the registry as ``version`` (atomic on a local disk)."""
        import os
        import shutil

        import pyarrow.fs as pafs

        info = {**info, "version": version, "registered": utc_timestamp()}
        with open(os.path.join(run_dir, "version.json"), "w") as f:
            import json

            json.dump(info, f, indent=2, default=str)
        dest = self.version_location(version)
        if self.location.is_local:
            os.makedirs(self.location.join("versions"), exist_ok=True)
            if os.path.exists(dest.root):
                raise RegistryError(f"version {version} already exists in {self.uri}")
            shutil.move(run_dir, dest.root)  # a rename within one file system
        else:
            # version.json is copied last: a version without it is invisible (see versions())
            tmp_info = os.path.join(run_dir, "version.json")
            os.remove(tmp_info)
            # what a retrain killed mid-upload left under this (invisible) version: we hold the lock
            dest.fs.delete_dir_contents(dest.root, missing_dir_ok=True)
            pafs.copy_files(run_dir, dest.root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dest.fs)
            dest.write_json("version.json", info)
        return dest

    def update_version(self, version: str, **fields: Any) -> None:
        info = self.version_info(version)
        info.update(fields)
        self.location.write_json(f"versions/{version}/version.json", info)

    # -- champion ---------------------------------------------------------------------
    def champion(self) -> str | None:
        if not self.location.exists(CHAMPION):
            return None
        return self.location.read_json(CHAMPION)["version"]

    def champion_location(self) -> Location:
        v = self.champion()
        if v is None:
            raise RegistryError(f"{self.uri} has no champion yet; run 'genrecls retrain' or 'genrecls models promote'")
        return self.version_location(v)

    def promote(self, version: str, reason: str = "manual promotion") -> None:
        """Make ``version`` the champion, holding the registry's lock (``models promote``)."""
        with folder_lock(self.location, "genrecls models promote"):
            self.set_champion(version, reason)

    def rollback(self) -> str:
        """Make the previous champion the champion again, holding the registry's lock; returns it."""
        with folder_lock(self.location, "genrecls models rollback"):
            def change(current):
                if current is None:
                    raise RegistryError(f"{self.uri} has no champion to roll back from")
                previous = current.get("previous", [])
                if not previous:
                    raise RegistryError(f"{self.uri}: champion {current['version']} has no previous champion to "
                                        "roll back to")
                return {"version": previous[0], "since": utc_timestamp(),
                        "reason": f"rollback from {current['version']}", "previous": previous[1:]}

            return self._swap(change)["version"]

    def set_champion(self, version: str, reason: str, expected: Any = _ANY) -> None:
        """Replace the champion pointer (one atomic write, a compare-and-swap); the caller holds the registry's lock.

        The old champion is remembered for rollback.  ``expected`` (a version, or None for no
        champion): replace it only if the champion is still that one, else :class:`ChampionConflict`.
        """
        self.version_info(version)  # must exist

        def change(current):
            now = current["version"] if current else None
            if expected is not _ANY and now != expected:
                raise ChampionConflict(f"{self.uri}: the champion is {now}, not {expected} as when {version} was "
                                       f"compared with it: {version} is not promoted (promote it by hand if wanted)")
            previous = ([current["version"]] + current.get("previous", [])) if current else []
            previous = [v for v in previous if v != version][:50]
            return {"version": version, "since": utc_timestamp(), "reason": reason, "previous": previous}

        self._swap(change)

    # -- the pointer's compare-and-swap ---------------------------------------------------
    def _swap(self, change) -> dict[str, Any]:
        """Apply ``change(current) -> new`` to champion.json as a compare-and-swap, again on a lost race."""
        import pyarrow.fs as pafs

        if self.location.is_local:
            return self._swap_local(change)
        if isinstance(self.location.fs, pafs.S3FileSystem):
            return self._swap_s3(change)
        new = change(self._read() if self.location.exists(CHAMPION) else None)
        self.location.write_json(CHAMPION, new)
        return new

    def _read(self) -> dict[str, Any]:
        return self.location.read_json(CHAMPION)

    def _swap_local(self, change) -> dict[str, Any]:
        import fcntl
        import os

        self.location.makedirs()
        fd = os.open(self.location.join(CHAMPION_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held for one read and one rename
            new = change(self._read() if self.location.exists(CHAMPION) else None)
            self.location.write_json(CHAMPION, new)
            return new
        finally:
            os.close(fd)

    def _swap_s3(self, change) -> dict[str, Any]:
        import json

        from genrecls.storage.locks import CONFLICT_CODES, error_code, s3_client

        client = s3_client(self.location.fs)
        bucket, _, key = self.location.join(CHAMPION).partition("/")
        for _ in range(CAS_TRIES):
            try:
                r = client.get_object(Bucket=bucket, Key=key)
                current, condition = json.loads(r["Body"].read()), {"IfMatch": r["ETag"]}
            except Exception as exc:
                if error_code(exc) not in ("NoSuchKey", "404"):
                    raise
                current, condition = None, {"IfNoneMatch": "*"}
            new = change(current)
            body = (json.dumps(new, indent=2, sort_keys=True, default=str) + "\n").encode()
            try:
                client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json", **condition)
                return new
            except Exception as exc:
                if error_code(exc) not in CONFLICT_CODES:
                    raise
        raise RegistryError(f"{self.uri}: the champion kept changing under {CAS_TRIES} tries to replace it")

    # -- decisions --------------------------------------------------------------------
    def record_decision(self, decision: dict[str, Any]) -> None:
        decision = {**decision, "time": utc_timestamp()}
        name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{time.time_ns() % 10**9:09d}-{decision.get('challenger') or 'none'}.json"
        self.location.write_json(f"decisions/{name}", decision)

    def decisions(self) -> list[dict[str, Any]]:
        return [self.location.read_json(f"decisions/{n}") for n in self.location.list("decisions", suffix=".json")]

    # -- splits -----------------------------------------------------------------------
    def splits_path(self) -> str | None:
        """The registry's split assignment as a path or URI (scheme and query kept), if any."""
        return self.location.child(SPLITS).uri if self.location.exists(SPLITS) else None

    def table(self) -> list[dict[str, Any]]:
        """One row per version for ``models list``."""
        champ = self.champion()
        rows = []
        for v in self.versions():
            info = self.version_info(v)
            m = info.get("metrics", {})
            rows.append({
                "version": v, "champion": v == champ, "model_id": info.get("model_id"),
                "created": info.get("registered"), "tracks": (info.get("dataset") or {}).get("tracks"),
                "test_track_accuracy": m.get("test_track_accuracy"), "macro_f1": m.get("test_track_macro_f1", m.get("macro_f1")),
                "decision": info.get("decision"),
            })
        return rows

    def format_table(self) -> str:
        """``models list``: one line per version, the champion starred."""
        from genrecls.core.progress import format_table

        rows = self.table()
        if not rows:
            return f"{self.location.uri}: no versions yet"
        fmt = lambda x: "" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))  # noqa: E731
        return format_table([("*" if r["champion"] else "", r["version"], fmt(r["test_track_accuracy"]), fmt(r["macro_f1"]),
                              fmt(r["tracks"]), fmt(r["decision"]), fmt(r["created"])) for r in rows],
                            ("", "version", "track_acc", "macro_f1", "tracks", "decision", "registered"))


def is_registry(path: str) -> bool:
    loc = Location.parse(path)
    return loc.exists(CHAMPION) or loc.exists("versions")


def resolve_run(path: str) -> str:
    """A run folder for ``path``: the path itself, or the champion's folder when it is a registry."""
    loc = Location.parse(path)
    if loc.exists("run.json"):
        return path
    if is_registry(path):
        return Registry(loc).champion_location().uri
    return path
