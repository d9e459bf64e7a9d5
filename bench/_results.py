"""What every bench records beside its figures: the load average, and the results file written atomically."""

from __future__ import annotations

import json
import os


def load() -> float:
    """The 1-minute load average, rounded."""
    return round(os.getloadavg()[0], 2)


def save(results: dict, path: str) -> None:
    """Write ``results`` as JSON to ``path`` through a temporary file, so a reader never sees half of it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)
