"""Named points where a test can hold a process, so that a test racing a process waits on an event.

A test that must act while a run is at a known place (holding its lock, with one shard
written, inside a decoding task) cannot learn that from the clock.  Code marks such places
with :func:`pause_point`; it costs one environment lookup and does nothing unless
``GENRECLS_PAUSE_DIR`` names a folder.  There, a point is *armed* by a file ``NAME.arm``:
the first process to reach the point claims it (an atomic rename to ``NAME.PID.paused``)
and waits until ``NAME.PID.go`` exists; every other process passes.  The test waits for
the ``.paused`` file (the event; it may rename it to mark it seen), acts (kills the process, starts a rival, sends a signal),
and releases it with the ``.go`` file.  Signals still reach a paused process: its handlers
run between the short waits.
"""

from __future__ import annotations

import os
import time

__all__ = ["PAUSE_DIR_ENV", "pause_point"]

PAUSE_DIR_ENV = "GENRECLS_PAUSE_DIR"


def pause_point(name: str) -> None:
    """Hold this process at ``name`` if a test armed it (see the module docstring); otherwise return at once."""
    folder = os.environ.get(PAUSE_DIR_ENV)
    if not folder:
        return
    paused = os.path.join(folder, f"{name}.{os.getpid()}.paused")
    try:
        os.rename(os.path.join(folder, f"{name}.arm"), paused)
    except OSError:  # not armed, or another process claimed it
        return
    go = paused[: -len(".paused")] + ".go"
    while not os.path.exists(go):
        time.sleep(0.01)
