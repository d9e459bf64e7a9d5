"""Exclusive locks on output folders (a dataset, a run, predictions, a registry).

One run at a time may write a folder; a second one stops at once with
:class:`LockedError`, whose message names the holder.  How the lock excludes:

* **local disks**: ``flock`` on ``FOLDER/.lock``; the kernel releases it when the holder
  dies, so a killed run never leaves a stale lock.
* **S3** (``s3://``: AWS S3, and S3-compatible servers with conditional writes, such as
  MinIO and SeaweedFS; a server that answers 501 gets the candidates lease below):
  ``FOLDER/.lock.json`` is created with ``PUT ... If-None-Match: *``, which the store
  performs atomically: of two runs exactly one gets 200, the other 412.  The object is a
  *lease*: it names its owner (a random token, pid, host, start time) and an expiry time,
  ``lease_seconds`` ahead, that the holder pushes forward every quarter lease
  (``PUT ... If-Match: <its etag>``).  A lease past its expiry was left by a dead run and is
  taken over with ``If-Match`` on the stale object's etag (one taker wins).  It is
  released with ``DELETE ... If-Match: <its etag>``, so a run never deletes a lock it does
  not own.  A run that finds its lease lost (taken over after a stall longer than the
  lease) fails at the end rather than report success.
* **other object stores** (``gs://``...; pyarrow has no conditional write): a lease by
  *candidates*: each run writes ``FOLDER/.locks/<token>.json`` (owner and expiry), then
  lists ``.locks/``.  Alone, it holds the lock; otherwise it deletes its own candidate and,
  if a live candidate is still there a moment later, stops (locked), else tries again.
  With a strongly consistent listing (S3 and GCS have one) two runs can never both be
  alone; an expired candidate is ignored and removed.  It is renewed and released only by
  its owner, like the S3 lease.

The expiry compares the holder's clock with the reader's: keep the nodes' clocks in sync
(NTP) to well under the lease (300 s by default).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import posixpath
import random
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import pyarrow.fs as pafs

from genrecls.core.provenance import utc_timestamp
from genrecls.storage.location import Location

__all__ = ["LockedError", "LEASE_SECONDS", "folder_lock", "s3_client", "error_code", "CONFLICT_CODES"]

log = logging.getLogger("genrecls")

#: how long an object-store lock outlives its holder's last renewal
LEASE_SECONDS = 300.0
LOCAL_LOCK, S3_LOCK, CANDIDATES = ".lock", ".lock.json", ".locks"


class LockedError(RuntimeError):
    """Another process holds the lock of an output folder (or this run lost its lease)."""


def _owner(what: str) -> dict[str, Any]:
    return {"what": what, "pid": os.getpid(), "host": socket.gethostname(),
            "since": utc_timestamp()}


def _locked(uri: str, info: dict[str, Any]) -> LockedError:
    desc = (f"{info.get('what', 'another genrecls process')} (pid {info.get('pid', '?')} on "
            f"{info.get('host', '?')}, since {info.get('since', '?')})")
    lease = ""
    if "expires" in info:
        until = utc_timestamp(float(info["expires"]))
        lease = (f"; its lease runs to {until} and is renewed while it runs "
                 "(a lock left by a killed run is taken over once its lease expires)")
    return LockedError(f"{uri} is in use by {desc}{lease}; wait for it to finish or stop it first")


@contextmanager
def folder_lock(loc: Location, what: str, *, lease_seconds: float = LEASE_SECONDS,
                protocol: str | None = None) -> Iterator[None]:
    """Hold the exclusive lock of ``loc`` for ``what`` (e.g. ``"genrecls ingest"``).

    ``protocol`` (``"flock"``, ``"conditional"``, ``"candidates"``) is chosen from the file
    system when not given; tests name it to exercise the candidates lease on S3.
    """
    loc.makedirs()
    protocol = protocol or ("flock" if loc.is_local else
                            "conditional" if isinstance(loc.fs, pafs.S3FileSystem) else "candidates")
    if protocol == "flock":
        with _flock(loc, what):
            yield
        return
    lease = (_ConditionalLease if protocol == "conditional" else _CandidateLease)(loc, what, lease_seconds)
    try:
        lease.acquire()
    except Exception as exc:
        if protocol != "conditional" or _code(exc) not in ("NotImplemented", "501"):
            raise
        log.warning("%s: the store has no conditional writes; using a lease of candidates", loc.uri)
        lease = _CandidateLease(loc, what, lease_seconds)
        lease.acquire()
    try:
        yield
    finally:
        lease.release()
    if lease.lost:
        raise LockedError(f"{loc.uri}: this run lost its lock ({lease.lost}); another run may have written "
                          "the folder meanwhile: re-run the command")


@contextmanager
def _flock(loc: Location, what: str) -> Iterator[None]:
    fd = os.open(loc.join(LOCAL_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
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
            raise _locked(loc.uri, info) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_owner(what)).encode(), 0)
        yield
    finally:
        os.close(fd)


# -- S3: conditional writes ------------------------------------------------------------------
_CLIENTS: dict[tuple, Any] = {}


def s3_client(fs: pafs.S3FileSystem) -> Any:
    """A boto3 S3 client for the same endpoint, region and credentials as ``fs``.

    pyarrow cannot send ``If-None-Match``/``If-Match``; boto3 can.  Settings given in the
    URI (``endpoint_override``, ``scheme``, keys) are taken from ``fs``; the rest comes from
    the same environment both read (``AWS_*`` variables, profiles, instance roles).
    """
    import boto3
    from botocore.config import Config as BotoConfig

    opts = fs.__reduce__()[1][0]
    endpoint = opts.get("endpoint_override") or None
    if endpoint and "://" not in endpoint:
        endpoint = f"{opts.get('scheme') or 'https'}://{endpoint}"
    key = (endpoint, fs.region, opts.get("access_key"), opts.get("secret_key"), opts.get("session_token"))
    if key not in _CLIENTS:
        style = "path" if endpoint and not opts.get("force_virtual_addressing") else "auto"
        _CLIENTS[key] = boto3.session.Session().client(
            "s3", endpoint_url=endpoint, region_name=fs.region or None,
            aws_access_key_id=opts.get("access_key") or None, aws_secret_access_key=opts.get("secret_key") or None,
            aws_session_token=opts.get("session_token") or None,
            config=BotoConfig(s3={"addressing_style": style}, retries={"mode": "standard", "max_attempts": 3}))
    return _CLIENTS[key]


def _code(exc: Exception) -> str:
    resp = getattr(exc, "response", None) or {}
    return str(resp.get("Error", {}).get("Code") or resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or "")


#: answers to a conditional request that mean "someone else changed or removed the object"
_CONFLICT = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404"}
CONFLICT_CODES = frozenset(_CONFLICT)
error_code = _code


class _Lease:
    """What both object-store leases share: owner token, renewal thread, loss detection."""

    def __init__(self, loc: Location, what: str, lease_seconds: float):
        self.loc, self.lease_seconds = loc, float(lease_seconds)
        self.owner = {**_owner(what), "token": uuid.uuid4().hex, "lease_seconds": self.lease_seconds}
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def body(self) -> bytes:
        return json.dumps({**self.owner, "expires": time.time() + self.lease_seconds}).encode()

    def _start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="genrecls-lock-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_seconds / 4):
            try:
                self.renew()
            except Exception as exc:  # a transient store error: try again next period
                log.warning("could not renew the lock of %s: %s", self.loc.uri, exc)
            if self.lost:
                log.error("%s: lost the lock: %s", self.loc.uri, self.lost)
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost:
            try:
                self.delete()
            except Exception as exc:  # never hide the run's own outcome; the lease expires anyway
                log.warning("could not release the lock of %s: %s", self.loc.uri, exc)

    def renew(self) -> None: ...
    def delete(self) -> None: ...


class _ConditionalLease(_Lease):
    def __init__(self, loc: Location, what: str, lease_seconds: float):
        super().__init__(loc, what, lease_seconds)
        self.client = s3_client(loc.fs)
        self.bucket, _, prefix = loc.join(S3_LOCK).partition("/")
        self.key = prefix
        self.etag: str | None = None

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except Exception as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return None, None
            raise
        try:
            info = json.loads(r["Body"].read())
        except ValueError:
            info = {}
        return info, r["ETag"]

    def _put(self, **condition: str) -> str:
        return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self.body(),
                                      ContentType="application/json", **condition)["ETag"]

    def acquire(self) -> None:
        held: dict[str, Any] | None = None
        for _ in range(5):
            try:
                self.etag = self._put(IfNoneMatch="*")
                break
            except Exception as exc:
                if _code(exc) not in _CONFLICT:
                    raise
            held, etag = self._read()
            if held is None:
                continue  # released between our two requests: try again
            if float(held.get("expires", 0)) > time.time():
                raise _locked(self.loc.uri, held)
            try:  # a dead run's lease: take it over unless another run does first
                self.etag = self._put(IfMatch=etag)
                log.warning("%s: took over the expired lock of %s (pid %s on %s)", self.loc.uri,
                            held.get("what"), held.get("pid"), held.get("host"))
                break
            except Exception as exc:
                if _code(exc) not in _CONFLICT:
                    raise
        else:
            raise _locked(self.loc.uri, held or {})
        self._start_renewing()

    def renew(self) -> None:
        try:
            self.etag = self._put(IfMatch=self.etag)
        except Exception as exc:
            if _code(exc) not in _CONFLICT:
                raise
            held, _ = self._read()
            self.lost = f"taken over by {(held or {}).get('what', 'another run')}" if held else "its lock object was deleted"

    def delete(self) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except Exception as exc:
            code = _code(exc)
            if code in _CONFLICT:
                self.lost = "it was taken over after its lease expired"
                return  # not ours any more: leave it to its owner
            if code not in ("NotImplemented", "501", "InvalidArgument", "400"):
                raise
            # a store without conditional deletes: delete only what still names our token
            held, _ = self._read()
            if held and held.get("token") == self.owner["token"]:
                self.client.delete_object(Bucket=self.bucket, Key=self.key)


# -- other object stores: candidates ---------------------------------------------------------
class _CandidateLease(_Lease):
    def __init__(self, loc: Location, what: str, lease_seconds: float):
        super().__init__(loc, what, lease_seconds)
        self.name = f"{time.time_ns():020d}-{self.owner['token']}.json"
        self.folder = loc.join(CANDIDATES)
        self.path = posixpath.join(self.folder, self.name)

    def _write(self) -> None:
        with self.loc.fs.open_output_stream(self.path) as out:  # one small object: a single PUT
            out.write(self.body())

    def _live_others(self) -> list[dict[str, Any]]:
        others = []
        sel = pafs.FileSelector(self.folder, allow_not_found=True)
        for info in self.loc.fs.get_file_info(sel):
            if info.type != pafs.FileType.File or info.base_name == self.name:
                continue
            try:
                with self.loc.fs.open_input_stream(info.path) as f:
                    held = json.loads(f.read())
            except (FileNotFoundError, ValueError):
                continue  # released meanwhile, or still being written
            if float(held.get("expires", 0)) > time.time():
                others.append(held)
            else:  # a dead run's candidate
                try:
                    self.loc.fs.delete_file(info.path)
                except FileNotFoundError:
                    pass
        return sorted(others, key=lambda h: h.get("since", ""))

    def acquire(self) -> None:
        self.loc.fs.create_dir(self.folder, recursive=True)
        others: list[dict[str, Any]] = []
        for attempt in range(8):
            self._write()
            others = self._live_others()
            if not others:
                self._start_renewing()
                return
            self.loc.fs.delete_file(self.path)
            # a holder stays; runs that collided with us back off too: look again after a pause
            time.sleep(random.uniform(0.1, 0.5) * (attempt + 1))
            others = self._live_others()
            if others:
                raise _locked(self.loc.uri, others[0])
        raise _locked(self.loc.uri, others[0] if others else {})

    def renew(self) -> None:
        if self.loc.fs.get_file_info(self.path).type == pafs.FileType.NotFound:
            self.lost = "its candidate was removed as expired"
            return
        self._write()
        # a holder frozen between that check and this write has just put back a candidate a
        # successor had removed: a contender backs off within a listing, a holder stays
        if self._live_others():
            time.sleep(0.5)
            if self._live_others():
                self.loc.fs.delete_file(self.path)
                self.lost = "another run took the lock after this run's lease expired"

    def delete(self) -> None:
        if self.loc.fs.get_file_info(self.path).type == pafs.FileType.NotFound:
            self.lost = "its candidate was removed as expired"
            return
        self.loc.fs.delete_file(self.path)
