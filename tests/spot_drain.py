"""Run by tests/test_spot_watch.py in a subprocess (the test session has its own ray.init): a Ray
cluster of a head and two 1-CPU worker nodes on this machine, an actor and a task on each worker. The
spot watcher reads the notice from the metadata service at the URL given and drains the first worker;
then each worker in turn is killed outright (what AWS does when its two minutes are up) and a fresh
one of its kind joins. The tasks are watched as the sweep watches its pre-training
(mmlg_ray.distributed.pretraining.PretrainingWatch, max_failures=1). Prints one line, RESULT and JSON:
the notice, how each actor's loss was reported, and each task's restarts by cause (Ray's own logs go
to stdout too).

    python tests/spot_drain.py IMDS_URL
"""

import dataclasses
import json
import os
import sys
import time
from pathlib import Path


def main(url: str) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray.cluster_utils import Cluster
    from ray.exceptions import RayActorError

    from mmlg_ray.distributed import spot_watch as W
    from mmlg_ray.distributed.pretraining import PretrainingWatch, note_attempt

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        spot = cluster.add_node(num_cpus=1, resources={"spot": 1})
        control = cluster.add_node(num_cpus=1, resources={"control": 1})
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()

        @ray.remote(num_cpus=0, max_restarts=0)
        class Worker:
            def node(self):
                return ray.get_runtime_context().get_node_id()

        a = Worker.options(resources={"spot": 0.01}).remote()
        b = Worker.options(resources={"control": 0.01}).remote()
        node_a = ray.get(a.node.remote())
        ray.get(b.node.remote())

        # a pre-training-like task on each worker: runs until its first node is gone, then returns at once
        @ray.remote(num_cpus=0, max_retries=0)
        def shape(restarts, first_nodes):
            note_attempt(restarts)  # as the pre-training task does first
            here = ray.get_runtime_context().get_node_id()
            while here in first_nodes:
                time.sleep(0.2)
            return {"node": here, "restarts": restarts}

        first = [node_a, ray.get(b.node.remote())]
        kinds = {"on_spot": "spot", "on_control": "control"}
        watch = PretrainingWatch(
            list(kinds), lambda n, r: shape.options(resources={kinds[n]: 0.01}).remote(r, first), {}, 1, poll_s=0.2
        )
        time.sleep(2)  # both tasks running
        ray_cli = str(Path(sys.executable).with_name("ray"))
        notice = W.watch(W.Imds(url), cluster.address, node_id=node_a, poll_s=0.2, ray_cli=ray_cli, max_polls=50)

        def lost(actor, node) -> tuple[str, bool | None, str]:
            cluster.remove_node(node, allow_graceful=False)  # the instance is gone: no goodbye
            deadline, last = time.time() + 60, None
            while time.time() < deadline:
                try:
                    ray.get(actor.node.remote(), timeout=10)
                except RayActorError as e:
                    return type(e).__name__, e.preempted, str(e)
                except Exception as e:  # noqa: BLE001 - a timeout while the GCS notices: ask again
                    last = e
                time.sleep(0.5)
            return f"no error ({last!r})", None, ""

        err_a, pre_a, msg_a = lost(a, spot)
        _, pre_b, _ = lost(b, control)
        cluster.add_node(num_cpus=1, resources={"spot": 1})  # the autoscaler's replacements
        cluster.add_node(num_cpus=1, resources={"control": 1})
        done, failed = watch.wait()
        print(
            "RESULT "
            + json.dumps(
                {
                    "notice": dataclasses.asdict(notice) if notice else None,
                    "message": msg_a,
                    "actor_error": err_a,
                    "preempted": pre_a,
                    "control_preempted": pre_b,
                    "tasks": {n: {k: d["restarts"][k] for k in ("preemptions", "retries")} for n, d in done.items()},
                    "losses": {n: len(d["restarts"]["losses"]) for n, d in done.items()},
                    "moved": all(d["node"] not in first for d in done.values()),
                    "failed": [n for n, _ in failed],
                }
            )
        )
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
