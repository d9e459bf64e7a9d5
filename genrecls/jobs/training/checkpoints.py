"""A run's checkpoints: one folder per epoch under ``RUN/checkpoints``, written by rank 0 (no Ray here).

Each checkpoint folder, ``RUN/checkpoints/epoch-NNNN/``, holds ``state.json`` (epoch,
history, the best epoch so far, early stopping, restarts, and the size of every other file)
and NumPy archives without pickles: ``weights.npz``, ``optimizer.npz`` and ``best.npz`` (the
weights of the best epoch so far).  Ray Train persists them (``ray.train.report``) and keeps
the last two; its own bookkeeping beside them (``checkpoint_manager_snapshot.json``,
``.validate_storage_marker``) is removed when the run finishes and before a resumed run
starts (:func:`remove_ray_state`): a resumed run continues from the last complete
checkpoint found here, whatever Ray recorded.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np

from genrecls.storage.location import Location

__all__ = ["CHECKPOINTS", "checkpoint_name", "write_checkpoint", "read_checkpoint_dir", "find_checkpoints",
           "read_checkpoint", "remove_ray_state", "RAY_STATE_FILES"]

#: the sub-folder of RUN that holds the checkpoints (Ray Train's run name under storage_path=RUN)
CHECKPOINTS = "checkpoints"
#: what Ray Train V2 keeps beside the checkpoints of a run (ray.train.v2._internal.constants)
RAY_STATE_FILES = ("checkpoint_manager_snapshot.json", ".validate_storage_marker")


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def _save_arrays(path: str, arrays: list[np.ndarray]) -> None:
    np.savez(path, **{f"a{i:04d}": a for i, a in enumerate(arrays)})


def _load_arrays(path: str) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return [z[k] for k in sorted(z.files)]


def write_checkpoint(folder: str, state: dict[str, Any], weights: list[np.ndarray], optimizer: list[np.ndarray],
                     best: list[np.ndarray] | None) -> None:
    """A checkpoint into a local folder; ``state.json`` last, with the sizes of the others."""
    _save_arrays(os.path.join(folder, "weights.npz"), weights)
    _save_arrays(os.path.join(folder, "optimizer.npz"), optimizer)
    if best is not None:
        _save_arrays(os.path.join(folder, "best.npz"), best)
    # sizes let a reader tell a complete checkpoint from one whose copy was cut short
    files = {n: os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)}
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump({**state, "files": files}, f)


def read_checkpoint_dir(folder: str) -> tuple[dict[str, Any], list[np.ndarray], list[np.ndarray], list[np.ndarray] | None]:
    """(state, weights, optimizer variables, best weights or None) of a local checkpoint folder."""
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    best_path = os.path.join(folder, "best.npz")
    best = _load_arrays(best_path) if os.path.exists(best_path) else None
    return (state, _load_arrays(os.path.join(folder, "weights.npz")), _load_arrays(os.path.join(folder, "optimizer.npz")),
            best)


def find_checkpoints(run: Location) -> list[tuple[int, str]]:
    """(epoch, path) of every complete checkpoint under RUN/checkpoints, oldest first."""
    import pyarrow.fs as pafs

    out = []
    sel = pafs.FileSelector(run.join(CHECKPOINTS), recursive=True, allow_not_found=True)
    for info in run.fs.get_file_info(sel):
        if info.type != pafs.FileType.File or info.base_name != "state.json":
            continue
        folder = info.path.rsplit("/", 1)[0]
        try:
            with run.fs.open_input_stream(info.path) as f:
                st = json.loads(f.read())
        except (OSError, ValueError):
            continue
        expected = st.get("files") or {"weights.npz": None, "optimizer.npz": None}
        sizes = {n: run.fs.get_file_info(f"{folder}/{n}") for n in expected}
        if any(i.type != pafs.FileType.File or (expected[n] is not None and i.size != expected[n])
               for n, i in sizes.items()):
            continue  # incomplete: its copy was cut short
        out.append((int(st["epoch"]), folder, info.mtime_ns or 0))
    out.sort(key=lambda e: (e[0], e[2]))
    return [(e, p) for e, p, _ in out]


def read_checkpoint(run: Location, path: str) -> tuple[dict[str, Any], list[np.ndarray]]:
    """(state, the weights to export: the best epoch's, else the last) of a checkpoint in a run."""
    import pyarrow.fs as pafs

    with run.fs.open_input_stream(path + "/state.json") as f:
        state = json.loads(f.read())
    name = "best.npz" if run.fs.get_file_info(path + "/best.npz").type == pafs.FileType.File else "weights.npz"
    with tempfile.TemporaryDirectory() as d:
        pafs.copy_files(path + "/" + name, os.path.join(d, name), source_filesystem=run.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return state, _load_arrays(os.path.join(d, name))


def remove_ray_state(run: Location, keep: int = 2) -> None:
    """Delete Ray Train's bookkeeping from RUN/checkpoints, and every checkpoint but the last ``keep``.

    Called before a resumed run starts (it continues from the last complete checkpoint, found
    by :func:`find_checkpoints`, not from Ray's record of an earlier attempt) and when a run
    has finished, so that the folder holds the checkpoints only.
    """
    for name in RAY_STATE_FILES:
        run.delete(CHECKPOINTS, name)
    found = find_checkpoints(run)
    for _, path in found[:-keep] if keep else found:
        run.fs.delete_dir(path)
