"""Why a file could not be used, or was used with a caveat: the kinds, their reasons, :class:`AudioError`.

The tables that record them are :mod:`genrecls.storage.records`'s.

Ingest and classify both record every file they could not use as a *failure* (a row with
a short ``kind`` and a ``reason`` a person understands), and every file they used although
something about it is off as a *warning* (the audio is kept; the row says what is off).
Both tables have the same schema and live in a folder of Parquet parts beside the output
(``failures/`` and ``warnings/``); the newest row of a path wins.

Failure kinds
-------------
=================  ==========================================================================
``missing``        the file does not exist (vanished, or a broken link)
``unreadable``     permission denied, an I/O error, or a folder where a file was expected
``not_regular``    a FIFO, socket or device: never opened (opening a FIFO blocks forever)
``empty``          0 bytes, or no audio frames
``undecodable``    FFmpeg recognises no audio in its content, or no frame of it decodes
``truncated``      the stream ends before its header says (only with ``decode.on_truncated = "fail"``)
``timed_out``      decoding ran past the file's deadline (``decode.timeout_*``)
``non_finite``     NaN or infinite samples
``silent``         the whole track is digital silence
``too_short``      shorter than ``features.min_track_seconds`` or than one segment with ``short_track = "fail"``
``symlink_loop``   a link that points back to a folder already visited
``outside_root``   a manifest entry that resolves outside the library root (never read)
``bad_manifest``   a manifest row without a path
``empty_label``    a label folder without audio files
``worker_crashed`` the decoding process died on this file, also when retried alone
``error``          anything unforeseen (a bug): the exception and where it was raised
=================  ==========================================================================

Warning kinds (the audio is kept)
---------------------------------
=================  ==========================================================================
``truncated``      the stream ends before the length its header declares (FLAC STREAMINFO,
                   an MP3 Xing/LAME/VBRI frame count, a WAV data size), or breaks off with a
                   decoding error: what decoded is kept
``corrupt_frames`` some frames did not decode and were skipped; the rest is kept
``length_estimate`` the header's length is only an estimate (an MP3 without a Xing/LAME/VBRI
                   header) and differs from what decoded by more than 2%
=================  ==========================================================================
"""

from __future__ import annotations

import os
import stat
import traceback

__all__ = ["FAILURE_KINDS", "WARNING_KINDS", "AudioError", "not_regular_reason", "failure_of"]

FAILURE_KINDS = (
    "missing", "unreadable", "not_regular", "empty", "undecodable", "truncated", "timed_out", "non_finite",
    "silent", "too_short", "symlink_loop", "outside_root", "bad_manifest", "empty_label", "worker_crashed", "error",
)
WARNING_KINDS = ("truncated", "corrupt_frames", "length_estimate")


class AudioError(Exception):
    """A track that cannot be used, with a reason (message) and a short ``kind``."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind

    @property
    def reason(self) -> str:
        return f"{self.kind}: {self}"


def not_regular_reason(st: os.stat_result) -> str | None:
    """Why a path that is no folder must not be opened (FIFO, socket, device), or None for a regular file."""
    if stat.S_ISREG(st.st_mode):
        return None
    what = ("a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
            else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
    return f"{what}, not a regular file: not opened"


def failure_of(exc: BaseException) -> tuple[str, str]:
    """``(kind, reason)`` recorded for a file whose processing raised ``exc``."""
    if isinstance(exc, AudioError):
        return exc.kind, str(exc)
    if isinstance(exc, PermissionError):
        return "unreadable", "permission denied (the file is not readable by this user)"
    if isinstance(exc, FileNotFoundError):
        return "missing", "the file vanished during the run"
    if isinstance(exc, IsADirectoryError):
        return "unreadable", "the path is a folder, not a file"
    if isinstance(exc, OSError):
        return "unreadable", f"I/O error while reading the file: {exc.strerror or exc}"
    if isinstance(exc, MemoryError):
        return "error", "out of memory while processing this file"
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" (at {os.path.basename(where.filename)}:{where.lineno})" if where else ""
    return "error", f"unexpected {type(exc).__name__}: {exc}{at}"
