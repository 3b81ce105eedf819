"""Pre-training as Ray tasks, watched from the driver, with restarts told apart by cause.

Ray core (2.58) retries a task lost with its node without spending `max_retries` only when the GCS has
recorded that node's death as AUTOSCALER_DRAIN_PREEMPTED, which it does for a node drained for
preemption that dies at or after the drain's deadline. A spot node killed before its deadline, or
whose death the owner learns of first, spends a retry: measured here, a task on a node drained with the
preemption reason and killed seconds later spent its retry, and the GCS recorded the death as
UNEXPECTED_TERMINATION (missed health checks). So the tasks run with `max_retries=0` (which also turns
Ray's own path off) and the driver retries them, knowing drains the way Ray Train does (its
PreemptionWatcher polls the same GCS list, every 5 s): it polls the GCS's draining nodes every
`DRAIN_POLL_S` seconds, and each attempt records the node it runs on (`note_attempt`).
- a task lost with its worker or its node, where that node was seen draining (the spot watcher's
  `ray drain-node` on the interruption notice; the autoscaler drains only idle nodes) or died as
  AUTOSCALER_DRAIN_PREEMPTED, is submitted again without spending `ray.max_failures`: a preemption;
- a task lost with its worker or with a node that died any other way spends one of `ray.max_failures`:
  a retry;
- an error raised by the task's own code is not retried (as `retry_exceptions=False` had it).

A lost attempt is submitted again as soon as the watch's thread sees it (every poll), not only when
the sweep asks whether a shape is ready. Each new attempt resumes from the shape's checkpoint in the
output store and writes the counts so far into the shape's cost: `preemptions` and `retries` in
stages.parquet, with the work the lost attempts threw away (engine.pretraining.lost_seconds)."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid

from mmlg_ray.errors import UserError

log = logging.getLogger("mmlg_ray")

RESTART_KINDS = ("preemptions", "retries")
_NODE_ID = re.compile(r"node ID: ([0-9a-f]{56})")
DRAIN_POLL_S = 2.0
NAMESPACE = "mmlg_ray"  # of the GCS's internal key-value store


def note_attempt(restarts: dict | None) -> None:
    """Called by the task first: record where and when this attempt runs, under the key the driver gave
    (restarts["attempt_key"]), so that the driver can tell what a lost worker's node was and charge the
    work lost from when the attempt really started (not from its submission)."""
    key = (restarts or {}).get("attempt_key")
    if not key:
        return
    import ray
    from ray.experimental.internal_kv import _internal_kv_put

    try:
        rec = {"node": ray.get_runtime_context().get_node_id(), "started_at": time.time()}
        _internal_kv_put(key, json.dumps(rec), overwrite=True, namespace=NAMESPACE)
    except Exception as e:  # noqa: BLE001 (the record only sharpens the driver's count)
        log.warning("pretrain: attempt not recorded (%s)", e)


def _read_attempt(key: str) -> dict:
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get

    try:
        raw = _internal_kv_get(key, namespace=NAMESPACE)
        _internal_kv_del(key, namespace=NAMESPACE)
        return json.loads(raw) if raw else {}
    except Exception:  # noqa: BLE001 (a GCS hiccup: the loss is classified without it)
        return {}


class DrainedNodes:
    """Every node the GCS has listed as draining since start(), polled every `poll_s` seconds in a daemon
    thread of the driver, which also calls `on_poll` (if given) after each poll."""

    def __init__(self, poll_s: float = DRAIN_POLL_S, on_poll=None):
        self.poll_s, self.seen, self.on_poll = poll_s, set(), on_poll
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
            if self.on_poll is not None:
                try:
                    self.on_poll()
                except Exception as e:  # noqa: BLE001 (the driver's own wait() settles it then)
                    log.warning("pretrain: watching the tasks failed once (%s)", e)

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


def restart_kind(err: BaseException, drained: set[str], node: str | None = None) -> str | None:
    """How a task's error counts: "preemptions" (lost with its worker or node, where that node was seen
    draining or died drained for preemption), "retries" (lost any other way), None (the task's own error:
    not retried). node: where the attempt ran, when it recorded it (note_attempt)."""
    from ray.exceptions import NodeDiedError, OutOfMemoryError, WorkerCrashedError

    if isinstance(err, NodeDiedError):
        m = _NODE_ID.search(str(err))
        node = m.group(1) if m else node
    elif not isinstance(err, (WorkerCrashedError, OutOfMemoryError)):
        return None
    if node and (node in drained or node_death_reason(node) == "AUTOSCALER_DRAIN_PREEMPTED"):
        return "preemptions"
    return "retries"


class PretrainingWatch:
    """The pre-training tasks of a run: ready(name) for the searcher, wait() at the end, close() when the
    run stops without waiting. `submit(name, restarts)` starts one attempt of a shape's task, passing the
    restarts counted so far ({"preemptions": n, "retries": n, "losses": [[started at, lost at], ...],
    "attempt_key": k}), and returns its ObjectRef; the task calls note_attempt(restarts) first."""

    def __init__(self, names: list[str], submit, names_of_cells: dict, max_failures: int, poll_s=DRAIN_POLL_S):
        self.submit, self.cells, self.max_failures = submit, names_of_cells, max_failures
        self.restarts = {n: dict.fromkeys(RESTART_KINDS, 0) for n in names}
        self.losses: dict[str, list[list[float]]] = {n: [] for n in names}  # [started at, lost at] per loss
        self.attempt: dict[str, tuple[str, float]] = {}  # name -> (attempt key, submitted at)
        self.done: dict = {}
        self.failed: dict = {}
        self._lock = threading.RLock()
        self.refs = {n: self._submit(n) for n in names}
        self.drained = DrainedNodes(poll_s, on_poll=self._settle_finished)
        self.drained.start()

    def _submit(self, name: str):
        key = f"pretrain-attempt-{uuid.uuid4().hex}"
        self.attempt[name] = (key, time.time())
        losses = [list(x) for x in self.losses[name]]
        return self.submit(name, {**self.restarts[name], "losses": losses, "attempt_key": key})

    def _pending(self) -> list[str]:
        return [n for n in self.refs if n not in self.done and n not in self.failed]

    def _settle(self, name: str) -> None:
        """Read a finished attempt: the shape is done (written, or failed for good), or the attempt was
        lost and another one submitted."""
        import ray

        try:
            self.done[name] = ray.get(self.refs[name])
            _read_attempt(self.attempt[name][0])
        except Exception as e:  # noqa: BLE001 (the task's error, or its worker / node lost)
            lost_at = time.time()
            key, submitted = self.attempt[name]
            rec = _read_attempt(key)
            self.drained.poll()
            kind = restart_kind(e, self.drained.seen, rec.get("node"))
            n = self.restarts[name]
            if kind is None or (kind == "retries" and n["retries"] >= self.max_failures):
                cause = getattr(e, "cause", None)
                err = cause if isinstance(cause, UserError) else e
                log.error("pretrain %s failed: %s", name, str(err).strip().splitlines()[-1])
                self.failed[name] = err
                return
            n[kind] += 1
            # from when the attempt started (its submission when it never recorded a start: an upper bound)
            self.losses[name].append([float(rec.get("started_at", submitted)), lost_at])
            why = "its node was preempted" if kind == "preemptions" else "its worker or node was lost"
            spent = "" if kind == "preemptions" else f" ({n['retries']} of ray.max_failures={self.max_failures})"
            log.warning("pretrain %s: %s; started again from its checkpoint%s", name, why, spent)
            self.refs[name] = self._submit(name)

    def _settle_finished(self) -> None:
        """Settle every finished attempt (the watch's thread, each poll; ready() and wait() too)."""
        import ray

        with self._lock:
            pending = self._pending()
            if not pending:
                self.drained.stop()
                return
            finished, _ = ray.wait([self.refs[n] for n in pending], num_returns=len(pending), timeout=0)
            for n in pending:
                if self.refs[n] in finished:
                    self._settle(n)

    def ready(self, name: str) -> bool:
        """The shape is written (or failed for good: its cells then fail on their missing input)."""
        with self._lock:
            if name not in self.refs or name in self.done or name in self.failed:
                return True
        return False  # the watch's thread settles finished attempts every poll

    def wait(self) -> tuple[dict, list]:
        """Every shape's sidecar by name, and [(name, error)] of those that failed for good."""
        import ray

        while True:
            with self._lock:
                pending = self._pending()
                refs = [self.refs[n] for n in pending]
            if not pending:
                break
            ray.wait(refs, num_returns=1)
            self._settle_finished()
        self.close()
        return dict(self.done), list(self.failed.items())

    def close(self) -> None:
        """Stop the watch's thread (the run ends without waiting for its tasks: interrupted)."""
        self.drained.stop()
