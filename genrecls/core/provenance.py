"""What every output records about how it was made: when (UTC timestamps) and with which libraries.

Datasets (``manifest.json``), runs (``run.json``), predictions (``classify.json``) and
registry entries all carry these two records, written by the functions here so that they
read the same everywhere.
"""

from __future__ import annotations

import functools
import time

__all__ = ["TIMESTAMP_FORMAT", "utc_timestamp", "library_versions"]

#: ISO 8601 in UTC, to the second: ``2026-12-02T00:17:04Z`` (also the CSV format of ``classified_at``)
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc_timestamp(seconds: float | None = None) -> str:
    """``seconds`` since the epoch (default: now) as an ISO 8601 UTC timestamp, e.g. ``2026-12-02T00:17:04Z``."""
    return time.strftime(TIMESTAMP_FORMAT, time.gmtime(seconds))


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries that shape features and models (recorded next to every output)."""
    return dict(_library_versions())


@functools.lru_cache(maxsize=1)
def _library_versions() -> dict[str, str]:
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for pkg in ("genrecls", "numpy", "librosa", "av", "soundfile", "soxr", "pyarrow", "ray", "scipy", "tensorflow", "tf-keras",
                "scikit-learn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        import av

        out["ffmpeg"] = ".".join(str(v) for v in av.library_versions["libavcodec"])  # the decoder
    except Exception:
        pass
    return out
