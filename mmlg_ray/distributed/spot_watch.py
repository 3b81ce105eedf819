"""The spot-notice watcher: on a spot worker, poll the instance metadata (IMDSv2) for the two-minute
interruption notice and drain this Ray node with the preemption reason and the deadline.

Why: a node that Ray knows is being preempted (drained with DRAIN_NODE_REASON_PREEMPTION) makes the
actors it loses fail as *preempted* (RayActorError.preempted). Ray Tune then retries the trial without
counting a failure (ray/tune/experiment/trial.py, _handle_ray_actor_error), and Ray Train charges the
restart to FailureConfig.max_preemption_failures (unbounded by default), not to max_failures
(ray/train/v2/_internal/execution/failure_handling/default.py). A reclaim nobody announced is a plain
node death, and spends ray.max_failures like a bug would.

cluster.yaml starts it on every worker after `ray start`; it exits at once on an on-demand instance
(`instance-life-cycle` is not `spot`) and after its one drain. `ray drain-node` is a developer command
that Ray hides from `ray --help` and exempts from its API-stability promise: tests/test_spot_watch.py
runs it against the Ray the tests run. The metadata it reads:

  PUT /latest/api/token                        a session token (IMDSv2; IMDSv1 is disabled in cluster.yaml)
  GET /latest/meta-data/instance-life-cycle    spot | on-demand
  GET /latest/meta-data/spot/instance-action   404 until the notice: {"action": "terminate", "time": ...}

    python -m mmlg_ray.distributed.spot_watch [--address ADDR] [--node-id HEX] [--poll-s 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger("mmlg_ray.spot_watch")
IMDS = "http://169.254.169.254"
REASON = "DRAIN_NODE_REASON_PREEMPTION"


@dataclass(frozen=True)
class Notice:
    action: str  # terminate | stop | hibernate
    time: str  # when AWS acts, ISO 8601 UTC
    deadline_s: int  # seconds left, at least 1
    drained: bool = False  # watch(): the drain command succeeded


def parse_notice(body: str, now: float) -> Notice:
    """The instance-action document -> the notice, with the seconds left until its time."""
    doc = json.loads(body)
    when = datetime.strptime(doc["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    return Notice(str(doc["action"]), doc["time"], max(1, int(when - now)))


def drain_command(notice: Notice, address: str, node_id: str | None, ray_cli: str = "ray") -> list[str]:
    cmd = [
        ray_cli,
        "drain-node",
        f"--address={address}",
        f"--reason={REASON}",
        f"--reason-message=spot interruption notice: {notice.action} at {notice.time}",
        f"--deadline-remaining-seconds={notice.deadline_s}",
    ]
    return cmd + ([f"--node-id={node_id}"] if node_id else [])


class Imds:
    """IMDSv2: every read carries a session token, fetched again when it is refused (401)."""

    def __init__(self, base: str = IMDS, timeout_s: float = 2.0):
        self.base, self.timeout_s, self._token = base.rstrip("/"), timeout_s, None
        self._open = urllib.request.build_opener(urllib.request.ProxyHandler({})).open  # never via HTTP(S)_PROXY

    def _fetch_token(self) -> str:
        req = urllib.request.Request(
            f"{self.base}/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"}
        )
        with self._open(req, timeout=self.timeout_s) as r:
            return r.read().decode()

    def get(self, path: str) -> str | None:
        """The document at `path`, or None where there is none (404)."""
        for attempt in (0, 1):
            if self._token is None:
                self._token = self._fetch_token()
            req = urllib.request.Request(f"{self.base}{path}", headers={"X-aws-ec2-metadata-token": self._token})
            try:
                with self._open(req, timeout=self.timeout_s) as r:
                    return r.read().decode()
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    return None
                if e.code == 401 and attempt == 0:  # the token expired: a new one, once
                    self._token = None
                    continue
                raise
        return None


def own_node_id(address: str) -> str:
    """This machine's Ray node: a driver started here connects to the local raylet."""
    import ray

    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        return ray.get_runtime_context().get_node_id()
    finally:
        ray.shutdown()


def _patiently(what: str, fn, attempts: int = 30, wait_s: float = 2.0):
    """fn(), tried again on any error for about a minute: at boot the metadata service or the GCS may
    not answer yet, and a watcher that died then would leave the node unwatched for its whole life."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - logged, and the last one raised
            if i == attempts - 1:
                raise
            log.warning("spot watch: %s failed (%s); trying again", what, e)
            time.sleep(wait_s)


def drain(cmd: list[str], notice: Notice, clock=time.time, wait_s: float = 2.0) -> bool:
    """Run the drain, again on failure, until it works or the notice's deadline is near; each
    failure logged with Ray's own message."""
    give_up = clock() + max(notice.deadline_s - 10, 1)
    while True:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode == 0:
            return True
        log.error("spot watch: drain failed (exit %d): %s", r.returncode, (r.stderr or r.stdout).strip()[-500:])
        if clock() + wait_s >= give_up:
            return False
        time.sleep(wait_s)


def watch(
    imds: Imds,
    address: str,
    node_id: str | None = None,
    poll_s: float = 5.0,
    ray_cli: str = "ray",
    clock=time.time,
    max_polls: int | None = None,
) -> Notice | None:
    """Poll until the notice, then drain this node once. Returns the notice (None: not a spot
    instance, or max_polls reached). Start-up reads are retried for about a minute; a poll that
    fails, or a notice that does not parse, is logged and polled again."""
    life = _patiently("reading the instance life cycle", lambda: imds.get("/latest/meta-data/instance-life-cycle"))
    if (life or "").strip() != "spot":
        log.info("spot watch: not a spot instance (%s); nothing to watch", (life or "?").strip())
        return None
    node_id = node_id or _patiently("finding this node's Ray id", lambda: own_node_id(address))
    log.info("spot watch: watching for the interruption notice of node %s", node_id)
    polls = 0
    while max_polls is None or polls < max_polls:
        polls += 1
        try:
            body = imds.get("/latest/meta-data/spot/instance-action")
            notice = parse_notice(body, clock()) if body else None
        except Exception as e:  # noqa: BLE001 - the service hiccups, or an odd document: poll again
            log.warning("spot watch: no notice read (%s)", e)
            notice = None
        if notice is not None:
            cmd = drain_command(notice, address, node_id, ray_cli)
            log.warning("spot watch: %s at %s (%d s left): draining node %s", notice.action, notice.time,
                        notice.deadline_s, node_id)  # fmt: skip
            if drain(cmd, notice, clock):
                log.warning("spot watch: node %s drained", node_id)
                return dataclasses.replace(notice, drained=True)
            return notice
        time.sleep(poll_s)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmlg_ray.distributed.spot_watch", description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default="auto", help="the cluster's GCS address (default: this node's)")
    p.add_argument("--node-id", default=None, help="the node to drain (default: this machine's)")
    p.add_argument("--imds", default=IMDS, help="the instance metadata service's base URL")
    p.add_argument("--poll-s", type=float, default=5.0, help="seconds between polls (AWS: a notice comes 2 min ahead)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ray_cli = str(Path(sys.executable).with_name("ray"))  # the venv's, whatever PATH holds
    watch(Imds(a.imds), a.address, a.node_id, a.poll_s, ray_cli=ray_cli)
    return 0


if __name__ == "__main__":
    sys.exit(main())
