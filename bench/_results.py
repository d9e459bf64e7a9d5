"""What the benches share: the load average, the results file written atomically, the fixed split."""

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


def fixed_split(folder: str, dataset: str, cfg, *, again: bool = False) -> str:
    """FOLDER/splits.parquet: the product's assignment with seed 0, the split every fixed-split run uses.

    Written once (``again``: anew, for a folder that may have served another dataset).
    """
    from genrecls.jobs.training import check_dataset
    from genrecls.storage import Location, assign_splits, write_splits

    if again or not os.path.exists(os.path.join(folder, "splits.parquet")):
        check = check_dataset(dataset, cfg)
        t = cfg.train
        table = assign_splits(check.tracks, val_fraction=t.val_fraction, test_fraction=t.test_fraction, seed=0)
        loc = Location.parse(folder)
        loc.makedirs()
        write_splits(table, loc)
    return folder
