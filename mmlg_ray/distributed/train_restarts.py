"""The extraction's restarts by cause, and the work they threw away, as Ray Train itself tells them apart.

Ray Train (v2) restarts a run after a failure decision. It charges max_preemption_failures (unbounded)
when its own `_is_preemption_failure` says so: a PreemptionError (a node of the run was seen draining,
e.g. the spot watcher's `ray drain-node` on the interruption notice, and its ranks exited or the drain's
deadline passed) or a worker group's error with a worker lost as preempted. Anything else spends
max_failures (a controller's error: controller_failure_limit). `TrainRestarts` is a controller callback
that sees each RestartingState (or ReschedulingState, a failure while starting the workers) with the
error behind it, classified by that same function, and every report (each comes with the run's
checkpoint, where a restart resumes). It runs in the run's controller actor, so it keeps its counts in the GCS's internal
key-value store, under a key of the driver's choosing, and the driver reads them after the run
(`read_restarts`): {"preemptions": n, "retries": n, "lost_device_s": s}."""

from __future__ import annotations

import json
import logging
import time

from ray.train.v2._internal.execution.callback import ControllerCallback, ReportCallback

from mmlg_ray.distributed.pretraining import NAMESPACE  # the key-value store namespace the pre-training uses


class TrainRestarts(ControllerCallback, ReportCallback):
    def __init__(self, key: str, devices: int):
        self.key, self.devices = key, devices
        self.counts = {"preemptions": 0, "retries": 0, "lost_device_s": 0.0}
        self._since: float | None = None  # the running attempt's start or last report

    def _put(self) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        try:  # never let a count turn into the controller's own error (Train would treat it as a failure)
            _internal_kv_put(self.key, json.dumps(self.counts), overwrite=True, namespace=NAMESPACE)
        except Exception as e:  # noqa: BLE001
            logging.getLogger("mmlg_ray").warning("extraction: restart count not kept (%s)", e)

    def _lose(self) -> None:
        if self._since is not None:
            self.counts["lost_device_s"] += max(0.0, time.time() - self._since) * self.devices
        self._since = None

    def after_report(self, training_report, metrics):
        self._since = time.time()

    def after_controller_state_update(self, previous_state, current_state):
        from ray.train.v2._internal.execution.controller.state import (
            ErroredState,
            ReschedulingState,
            RestartingState,
            RunningState,
        )
        from ray.train.v2._internal.execution.failure_handling.default import _is_preemption_failure

        if isinstance(current_state, RunningState) and not isinstance(previous_state, RunningState):
            self._since = time.time()
        elif isinstance(current_state, (RestartingState, ReschedulingState)):
            preempted = _is_preemption_failure(current_state.training_failed_error)
            self.counts["preemptions" if preempted else "retries"] += 1
            self._lose()
            self._put()
        elif isinstance(current_state, ErroredState):
            self._lose()
            self._put()


def read_restarts(key: str) -> dict:
    """The counts a run's TrainRestarts kept (zeros when it restarted never), and the key deleted."""
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get

    try:
        raw = _internal_kv_get(key, namespace=NAMESPACE)
        _internal_kv_del(key, namespace=NAMESPACE)
        counts = json.loads(raw) if raw else {}
    except Exception as e:  # noqa: BLE001 (a GCS hiccup must not hide how the run itself ended)
        logging.getLogger("mmlg_ray").warning("extraction: restart count not read (%s)", e)
        counts = {}
    return {
        "preemptions": int(counts.get("preemptions", 0)),
        "retries": int(counts.get("retries", 0)),
        "lost_device_s": float(counts.get("lost_device_s", 0.0)),
    }
