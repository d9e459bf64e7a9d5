"""How a job's tracks are cut into Ray tasks, and how many run at once: one rule for ingest and classify.

Ingest sends batches of tracks to Ray tasks; classify sends input blocks of tracks to Ray
Data's decoding tasks.  Both cut their list of tracks with :func:`task_bounds`, and both
use every CPU of the cluster unless ``--workers`` says fewer (:func:`slots`).
"""

from __future__ import annotations

import math

__all__ = ["cluster_cpus", "slots", "task_bounds"]


def cluster_cpus() -> int:
    """CPUs of the Ray cluster this process is connected to (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def slots(workers: int | None, inflight_per_cpu: int = 1) -> tuple[int, int]:
    """(concurrent tasks, tasks in flight): every CPU of the cluster, or ``workers`` of them.

    With every CPU, ``inflight_per_cpu`` tasks per CPU stay submitted so that no worker
    waits for the driver; with fewer workers than CPUs, exactly ``workers`` tasks are in
    flight, so that ``--workers`` limits concurrency on a shared cluster too.
    """
    cpus = cluster_cpus()
    if workers and workers < cpus:
        return workers, workers
    return cpus, cpus * inflight_per_cpu


def task_bounds(n: int, per_task: int, slots: int, max_tasks: int = 0) -> list[tuple[int, int]]:
    """``(start, end)`` of each task's share of ``n`` tracks, in order.

    At most ``per_task`` tracks a task, but small runs are spread over every slot (about two
    tasks each) rather than left to one fat task; the number of tasks is a whole number of
    rounds of ``slots`` with sizes evened out (no last task running alone while the other
    slots idle); ``max_tasks`` (0: no cap) bounds the count for huge libraries, tasks then
    growing past ``per_task``.
    """
    if n <= 0:
        return []
    slots = max(1, slots)
    size = max(1, min(per_task, math.ceil(n / (2 * slots))))
    if max_tasks:
        size = max(size, math.ceil(n / max_tasks))
    count = min(n, math.ceil(math.ceil(n / size) / slots) * slots)
    if max_tasks:
        count = min(count, max_tasks)
    bounds = [n * i // count for i in range(count + 1)]
    return list(zip(bounds, bounds[1:]))
