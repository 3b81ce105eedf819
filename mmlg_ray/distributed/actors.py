"""A Ray Train run's actors end with the run.

Ray 2.58's TrainController is an ordinary (non-detached, unnamed) actor that TorchTrainer.fit() creates
in this process (ray/train/v2/api/data_parallel_trainer.py, _initialize_and_run_controller); it lives
while a handle to it does, and it owns the run's RayTrainWorker actors, its DatasetManager and (through
that) Ray Data's SplitCoordinator, which die with it. fit() run in the main thread also installs a
SIGINT handler (_register_sigint_handler) whose closure holds that handle and is never uninstalled, so
the controller (and the data actors it owns) stayed alive after fit() returned, for as long as the
driver ran. `train_run_ends` puts the SIGINT handler back and ends that controller.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from contextlib import contextmanager

log = logging.getLogger("mmlg_ray")

# the actor classes a Train V2 run starts (the controller, its workers, its DatasetManager) and Ray
# Data's streaming_split coordinator, which the DatasetManager starts for a split dataset
RUN_CLASSES = ("TrainController", "RayTrainWorker", "DatasetManager", "SplitCoordinator")


def _job_actors(job_id: str, alive_only: bool = True) -> dict[str, str]:
    """actor id -> class name of the RUN_CLASSES actors of this job (alive ones only, or all), through
    Ray's State API."""
    from ray.util.state import list_actors

    filters = [("job_id", "=", job_id)] + ([("state", "=", "ALIVE")] if alive_only else [])
    return {
        a.actor_id: a.class_name
        for a in list_actors(filters=filters, limit=10_000, timeout=10, raise_on_missing_output=False)
        if a.class_name in RUN_CLASSES
    }


def _wait_dead(job_id: str, ids: set[str], timeout_s: float) -> dict[str, str]:
    """Polls until none of `ids` is alive (or `timeout_s` passes); returns the ones still alive."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = {i: c for i, c in _job_actors(job_id).items() if i in ids}
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.25)


@contextmanager
def train_run_ends(timeout_s: float = 30.0):
    """Around one TorchTrainer.fit() in this process: when the block ends (it returns or raises), the
    run's TrainController has exited and no actor it started (RUN_CLASSES) is alive.

    In the main thread, Ray Train's SIGINT handler is replaced by the one from before fit() (which also
    gives Ctrl-C back to this process: the handler otherwise asks the finished controller to abort and
    swallows the first two). That handler held the driver's last handle to the run's TrainController,
    so Ray ends the controller and the actors it owns (Ray's reference counting of non-detached actors;
    no private attribute is read). Then it waits, at most `timeout_s`, until the actors of RUN_CLASSES
    that this job started during the block are dead, and warns if any is not. Nothing else is touched:
    another run's actors are never ended here. Without Ray's State API (no dashboard) nothing is
    waited for."""
    import ray

    main = threading.current_thread() is threading.main_thread()
    before_handler = signal.getsignal(signal.SIGINT) if main else None
    job = ray.get_runtime_context().get_job_id()
    try:
        before = set(_job_actors(job))
    except Exception as e:  # the State API lives in the dashboard
        log.debug("ray: no State API (%s): the Train run's actors are ended but not waited for", e)
        before = None
    try:
        yield
    finally:
        try:
            _end_run(job, main, before_handler, before, timeout_s)
        except Exception as e:  # never hides the run's own outcome
            log.warning("ray: could not confirm that the Train run's actors ended: %s", e)


def _end_run(job: str, main: bool, before_handler, before: set[str] | None, timeout_s: float) -> None:
    import gc

    if main and signal.getsignal(signal.SIGINT) is not before_handler:
        # None: the handler was not installed from Python; Python's own then. Ray Train's handler held
        # the driver's last handle to the run's TrainController: replaced, the handle goes, and Ray ends a
        # non-detached actor whose handles are all gone (with the actors it owns)
        signal.signal(signal.SIGINT, before_handler if before_handler is not None else signal.default_int_handler)
        gc.collect()
    if before is None:
        return
    # the run's own actors: this job's, started during the run (the controller and what it owns)
    ours = set(_job_actors(job)) - before
    left = _wait_dead(job, ours, timeout_s)
    if left:
        log.warning(
            "ray: %d actor(s) of the Train run still alive %.0f s after it ended: %s",
            len(left),
            timeout_s,
            ", ".join(f"{c} {i}" for i, c in sorted(left.items())),
        )
