"""Pre-training as Ray tasks, watched from the driver, with restarts told apart by cause.

Ray core retries a task whose worker or node was lost up to its `max_retries`, and does not tell a
preempted node from a failed one: measured here, a task on a node drained with the preemption reason,
then killed, spent a retry, and the GCS recorded the node's death as UNEXPECTED_TERMINATION (health
checks missed; only a drained node that was idle ends as AUTOSCALER_DRAIN_PREEMPTED). So the tasks run
with `max_retries=0` and the driver retries them, knowing drains the way Ray Train does
(ray.train.v2's PreemptionWatcher): it polls the GCS's draining nodes every `DRAIN_POLL_S` seconds.
- a task lost with a node seen draining (the spot watcher's `ray drain-node` on the interruption
  notice; the autoscaler drains only idle nodes) is submitted again without spending
  `ray.max_failures`: a preemption;
- a task lost with its worker or with a node that died any other way spends one of `ray.max_failures`:
  a retry;
- an error raised by the task's own code is not retried (as `retry_exceptions=False` had it).

Each new attempt resumes from the shape's checkpoint in the output store and writes the counts so far
into the shape's cost: `preemptions` and `retries` in stages.parquet."""

from __future__ import annotations

import logging
import re
import threading
import time

from mmlg_ray.errors import UserError

log = logging.getLogger("mmlg_ray")

RESTART_KINDS = ("preemptions", "retries")
_NODE_ID = re.compile(r"node ID: ([0-9a-f]{56})")
DRAIN_POLL_S = 2.0  # as Ray Train polls them


class DrainedNodes:
    """Every node the GCS has listed as draining since start(), polled every `poll_s` seconds in a daemon
    thread of the driver."""

    def __init__(self, poll_s: float = DRAIN_POLL_S):
        self.poll_s, self.seen = poll_s, set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mmlg-drained-nodes", daemon=True)

    def start(self) -> "DrainedNodes":
        self.poll()
        self._thread.start()
        return self

    def poll(self) -> None:
        import ray

        try:
            self.seen |= set(ray._private.state.state.get_draining_nodes())
        except Exception as e:  # noqa: BLE001 (a GCS hiccup: the next poll asks again)
            log.debug("draining nodes not read: %s", e)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def stop(self) -> None:
        self._stop.set()


def node_death_reason(node_id: str) -> str | None:
    """The GCS's name for why a dead node died (AUTOSCALER_DRAIN_PREEMPTED, UNEXPECTED_TERMINATION, ...);
    None while it is alive or unknown."""
    import ray
    from ray.core.generated import common_pb2

    node = next((n for n in ray.nodes() if n.get("NodeID") == node_id), None)
    if node is None or node.get("Alive", True):
        return None
    return common_pb2.NodeDeathInfo.Reason.Name(int(node.get("DeathReason", 0) or 0))


def restart_kind(err: BaseException, drained: set[str]) -> str | None:
    """How a task's error counts: "preemptions" (its node was seen draining, or died drained), "retries"
    (its worker or node lost any other way), None (the task's own error: not retried)."""
    from ray.exceptions import NodeDiedError, OutOfMemoryError, WorkerCrashedError

    if isinstance(err, NodeDiedError):
        m = _NODE_ID.search(str(err))
        if m and (m.group(1) in drained or node_death_reason(m.group(1)) == "AUTOSCALER_DRAIN_PREEMPTED"):
            return "preemptions"
        return "retries"
    if isinstance(err, (WorkerCrashedError, OutOfMemoryError)):
        return "retries"
    return None


class PretrainingWatch:
    """The pre-training tasks of a run: ready(name) for the searcher (polled at most once a second per
    shape), wait() at the end. `submit(name, restarts)` starts one attempt of a shape's task, passing
    the restarts counted so far ({"preemptions": n, "retries": n, "losses": [[submitted at, lost at],
    ...]}), and returns its ObjectRef."""

    def __init__(self, names: list[str], submit, names_of_cells: dict, max_failures: int, poll_s=DRAIN_POLL_S):
        self.submit, self.cells, self.max_failures = submit, names_of_cells, max_failures
        self.drained = DrainedNodes(poll_s).start()
        self.restarts = {n: dict.fromkeys(RESTART_KINDS, 0) for n in names}
        self.losses: dict[str, list[list[float]]] = {n: [] for n in names}  # [submitted at, lost at] per lost attempt
        self.submitted: dict[str, float] = {}
        self.refs = {n: self._submit(n) for n in names}
        self.done: dict = {}
        self.failed: dict = {}
        self.polled: dict[str, float] = {}

    def _submit(self, name: str):
        """One attempt, told the restarts so far and when each lost attempt was submitted and lost (from
        which, and its checkpoint, it charges the work they threw away: engine.pretraining)."""
        self.submitted[name] = time.time()
        return self.submit(name, {**self.restarts[name], "losses": [list(x) for x in self.losses[name]]})

    def _settle(self, name: str) -> bool:
        """Read a finished attempt: True when the shape is done (written, or failed for good), False when
        the attempt was lost and another one submitted."""
        import ray

        try:
            self.done[name] = ray.get(self.refs[name])
            return True
        except Exception as e:  # noqa: BLE001 (the task's error, or its worker / node lost)
            self.drained.poll()
            kind = restart_kind(e, self.drained.seen)
            n = self.restarts[name]
            if kind is None or (kind == "retries" and n["retries"] >= self.max_failures):
                cause = getattr(e, "cause", None)
                err = cause if isinstance(cause, UserError) else e
                log.error("pretrain %s failed: %s", name, str(err).strip().splitlines()[-1])
                self.failed[name] = err
                return True
            n[kind] += 1
            self.losses[name].append([self.submitted[name], time.time()])
            why = "its node was preempted" if kind == "preemptions" else "its worker or node was lost"
            spent = "" if kind == "preemptions" else f" ({n['retries']} of ray.max_failures={self.max_failures})"
            log.warning("pretrain %s: %s; started again from its checkpoint%s", name, why, spent)
            self.refs[name] = self._submit(name)
            return False

    def ready(self, name: str) -> bool:
        """The shape is written (or failed for good: its cells then fail on their missing input)."""
        import ray

        if name not in self.refs or name in self.done or name in self.failed:
            return True
        now = time.monotonic()
        if now - self.polled.get(name, 0) < 1.0:
            return False
        self.polled[name] = now
        finished, _ = ray.wait([self.refs[name]], timeout=0)
        return bool(finished) and self._settle(name)

    def wait(self) -> tuple[dict, list]:
        """Every shape's sidecar by name, and [(name, error)] of those that failed for good."""
        import ray

        while pending := [n for n in self.refs if n not in self.done and n not in self.failed]:
            finished, _ = ray.wait([self.refs[n] for n in pending], num_returns=1)
            for n in pending:
                if self.refs[n] in finished:
                    self._settle(n)
        self.drained.stop()
        return dict(self.done), list(self.failed.items())
