"""Ray and logging set-up shared by every command: quiet by default, one place to start Ray.

``ray_session`` joins a cluster (``address``), reuses a Ray already initialised in this
process (tests, notebooks), or starts an embedded local Ray limited to ``workers`` CPUs.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from typing import Iterator

__all__ = ["quiet_environment", "ray_session", "one_ray_session", "RAY_STARTS", "worker_env", "worker_setup", "runtime_env", "log", "Interrupted",
           "as_interrupted", "handle_stop_signals", "RayStartError", "quiet_ray_data"]

log = logging.getLogger("genrecls")

#: environment every Ray worker gets: quiet TensorFlow, legacy tf-keras (see genrecls.models.networks)
WORKER_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "TF_USE_LEGACY_KERAS": "1",
    "TF_ENABLE_ONEDNN_OPTS": "1",  # oneDNN kernels: the CNN runs 2-3x faster on x86 CPUs
    "PYTHONWARNINGS": "ignore",
    "RAY_DEDUP_LOGS": "1",
    # Ray Train's controller polls its workers this often (default 2 s): the end of a run, a report
    # and a dead worker are seen within a quarter second; each poll is one small RPC per worker
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
}


class RayStartError(RuntimeError):
    """The embedded local Ray could not be started."""


class Interrupted(KeyboardInterrupt):
    """The command was stopped by SIGINT (Ctrl-C) or SIGTERM; ``kept`` says what its output keeps."""

    def __init__(self, signal_name: str = "SIGINT", kept: str = ""):
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.kept = kept

    @property
    def exit_code(self) -> int:
        from genrecls.core.exitcodes import ExitCode

        return ExitCode.TERMINATED if self.signal_name == "SIGTERM" else ExitCode.INTERRUPTED


_last_signal: str | None = None


def _raise_interrupted(signum, frame) -> None:
    global _last_signal
    _last_signal = signal.Signals(signum).name
    raise Interrupted(_last_signal)


def as_interrupted(exc: KeyboardInterrupt) -> Interrupted:
    """``exc`` as :class:`Interrupted`, naming the signal received.

    Ray's blocking calls (``ray.wait``, ``ray.get``) turn any exception raised by a signal
    handler into a plain ``KeyboardInterrupt``; the handler remembers which signal came.
    """
    return exc if isinstance(exc, Interrupted) else Interrupted(_last_signal or "SIGINT")


def handle_stop_signals() -> None:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread, so every command cleans up the same way.

    Called at start-up and again after ``ray.init``: Ray's core worker installs its own
    SIGTERM handler in the driver, which prints C++ stack dumps and kills the process without
    letting the command leave its output consistent.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_interrupted)


def worker_env() -> dict[str, str]:
    return dict(WORKER_ENV)


def worker_setup() -> None:
    """Runs once when a Ray worker process starts (``worker_process_setup_hook``).

    Imports pandas and pyarrow single-threaded up front: Ray Data's threaded map tasks
    otherwise may import pandas lazily from two threads at once, which left one worker with
    a half-initialised module ("module 'pandas' has no attribute 'core'").
    """
    import pandas  # noqa: F401
    import pandas.core.frame  # noqa: F401
    import pyarrow  # noqa: F401


#: The state API address given to the workers of an embedded Ray, which runs no dashboard: a closed port.
#: Without it, Ray's state API in a worker looks for "the latest" Ray instance on the machine; Ray Train's
#: placement-group cleaner (a detached actor polling whether the run's controller is alive) then asks
#: another Ray on the same machine (a `ray start` cluster, another command's Ray), does not find the
#: controller there, takes it for dead and removes the run's placement group: the training workers are
#: killed mid-epoch.  With a closed port each poll fails, which the cleaner takes as "keep monitoring".
NO_STATE_API = "http://127.0.0.1:0"


def runtime_env(embedded: bool = False) -> dict:
    """The runtime environment of every genrecls Ray job: quiet env vars and the setup hook.

    ``embedded``: the job's Ray is a local one this process started (no dashboard): its workers'
    state API points nowhere rather than at another Ray on the machine (:data:`NO_STATE_API`).
    """
    env = worker_env()
    if embedded:
        env["RAY_API_SERVER_ADDRESS"] = NO_STATE_API
    return {"env_vars": env, "worker_process_setup_hook": "genrecls.core.runtime.worker_setup"}


def quiet_environment(verbose: bool = False) -> None:
    """Tame TensorFlow, Ray and friends before they are imported."""
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")
    # an embedded local Ray inherits this process's environment (a cluster's nodes do not): its
    # own machine is never preempted, so Ray Train starts no preemption-watcher actor there
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    for name in ("ray", "ray.data", "ray.train", "tensorflow", "absl", "numba", "filelock"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        warnings.filterwarnings("ignore")


#: Ray instances this process started (an embedded local Ray or a connection to a cluster), for the records
RAY_STARTS = [0]

#: open :func:`one_ray_session` contexts (innermost last): whether a Ray was started inside each
_SHARED: list[dict[str, bool]] = []


@contextmanager
def one_ray_session() -> Iterator[None]:
    """Inside this context, every :func:`ray_session` shares one Ray: the first that needs Ray starts it (with
    the runtime environment of a Ray Data job, which serves plain tasks too), the others reuse it, and it
    shuts down when this context ends.  A command that runs several jobs (``retrain``: ingest, then
    training) starts Ray once, and not at all when no job needs it."""
    _SHARED.append({"started": False})
    try:
        yield
    finally:
        if _SHARED.pop()["started"]:
            import ray

            ray.shutdown()


@contextmanager
def ray_session(address: str | None = None, workers: int | None = None, *, verbose: bool = False,
                data: bool = True) -> Iterator[None]:
    """Connect to Ray for the duration of a command.

    Parameters
    ----------
    address : a Ray cluster address (``auto``, ``ray://host:10001``, ``host:6379``); None starts
        an embedded local Ray unless one is already initialised in this process.
    workers : CPUs the embedded local Ray may use (default: all cores).
    data : the job runs Ray Data, whose workers need :func:`worker_setup`.  Without it (ingest's
        plain tasks), an embedded local Ray gets no runtime environment at all: its workers
        inherit this process's environment (set by :func:`quiet_environment`), so the workers
        Ray starts with the node serve the tasks, with no ``setup_worker.py`` step per worker
        and no pandas import in each.
    """
    import ray

    quiet_environment(verbose)
    if ray.is_initialized():
        yield
        return
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or None
    data = data or bool(_SHARED)  # a shared Ray may serve a Ray Data job later
    env = runtime_env(embedded=not address) if data else {"env_vars": worker_env()}
    if not address and not data:
        env = None
    kwargs = dict(
        logging_level=logging.INFO if verbose else logging.ERROR,
        log_to_driver=verbose,
        runtime_env=env,
    )
    if address:
        ray.init(address=address, **kwargs)
    else:
        # "local": always a new embedded Ray, even if `ray start` runs a cluster on this machine
        try:
            ray.init(address="local", num_cpus=workers or os.cpu_count(), include_dashboard=False, **kwargs)
        except Exception as exc:  # e.g. "The current node timed out during startup" on an overloaded machine
            raise RayStartError(f"the embedded Ray did not start ({exc}); nothing was changed, run the same "
                                "command again") from None
    RAY_STARTS[0] += 1
    handle_stop_signals()
    quiet_ray_data(verbose)
    if _SHARED:  # one_ray_session shuts it down
        _SHARED[-1]["started"] = True
        yield
        return
    try:
        yield
    finally:
        ray.shutdown()


def quiet_ray_data(verbose: bool = False) -> None:
    """Keep Ray Data (and Ray Train's loggers) to errors on the console, unless ``verbose``.

    Ray Data configures its loggers when imported and installs its own INFO console handler;
    its session log file (``logs/ray-data/ray-data.log``) still gets everything.  Its
    progress bars and execution-start lines follow ``verbose`` (genrecls draws its own
    progress line).  Call it after ``ray.init`` in the driver: :func:`ray_session` does.
    """
    try:
        import ray.data
    except ImportError:  # Ray without Ray Data
        return
    if not verbose:
        for name in ("ray.data", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            from ray._private.log import PlainRayHandler
        except ImportError:  # another Ray version: its console handler stays as Ray configures it
            PlainRayHandler = None
        for handler in logging.getLogger("ray.data").handlers if PlainRayHandler else ():
            if isinstance(handler, PlainRayHandler):
                handler.setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    for knob in ("enable_progress_bars", "print_on_execution_start"):
        try:
            setattr(ctx, knob, verbose)
        except Exception:  # older/newer Ray without this knob
            pass
