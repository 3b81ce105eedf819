"""Run by tests/test_two_nodes.py in a subprocess (the test session has its own ray.init): a Ray cluster
of two nodes on this machine that share no disk, the main job on it with its output on the S3 server
named by AWS_ENDPOINT_URL, then only that cluster shut down. The head (ray.cluster_utils.Cluster, 1 CPU)
sees this machine's files; the second node (`ray start`, 1 CPU, custom resource `nodisk`) runs in a
mount namespace of its own with a private tmpfs over /tmp, where the cache folder, the test's
folders and the head's Ray session live: a read of the head's disk fails there, as on a cloud node.
With MMLG_TWO_NODES_SHARED_DISK set (where `unshare --mount` is not allowed) the second node is a plain
`ray start` sharing the disk. Prints one JSON line: the nodes, the second node's id, and the node of
every extraction worker.

    python tests/two_node_sweep.py OUTPUT_URI '["override=value", ...]'
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def main(out_uri: str, overrides: list[str]) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from mmlg_ray.config import load_config
    from mmlg_ray.cli import run_sweep
    from mmlg_ray.distributed.sweep import RayExecutor

    # the dashboard (on a free port) serves Ray's state API, which says where each actor ran
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True, "dashboard_port": 0}
    )
    second = None
    try:
        cache = os.path.realpath(load_config(None, overrides).cache_path)
        # what a cloud node has on its own disk: the code and the venv (a clone in /tmp, as CI's may be,
        # would vanish under the tmpfs), bound back in place from a descriptor opened before the mount
        keep = [p for p in {ROOT, os.path.realpath(sys.prefix)} if p.startswith("/tmp/")]
        keep = [p for p in keep if not any(p != q and p.startswith(q + "/") for q in keep)]
        opens = " && ".join(f"exec {3 + i}<{shlex.quote(p)}" for i, p in enumerate(keep))
        binds = "".join(
            f" && mkdir -p {shlex.quote(p)} && mount --no-canonicalize --bind /proc/$$/fd/{3 + i} {shlex.quote(p)}"
            for i, p in enumerate(keep)
        )
        mounts = (opens + " && " if opens else "") + "mount -t tmpfs tmpfs /tmp" + binds
        if not cache.startswith("/tmp/"):
            mounts += f" && mkdir -p {shlex.quote(cache)} && mount -t tmpfs tmpfs {shlex.quote(cache)}"
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        ray_start = f"exec {shlex.quote(ray_cli)} start --address={cluster.address} --num-cpus=1 --resources='{{\"nodisk\": 1}}' --disable-usage-stats --block"
        if os.environ.get("MMLG_TWO_NODES_SHARED_DISK"):  # no private mounts allowed here: a plain second node
            second = subprocess.Popen(["sh", "-c", ray_start])
        else:
            unshare = ["unshare", "--mount", "--propagation", "private"]
            second = subprocess.Popen([*unshare, "sh", "-c", f"{mounts} && {ray_start}"])
        ray.init(address=cluster.address, log_to_driver=False)
        deadline = time.time() + 120
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            if time.time() > deadline or second.poll() is not None:
                raise RuntimeError(f"the second node did not join (ray start exited {second.poll()})")
            time.sleep(0.5)
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        (nodisk,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "nodisk" in n["Resources"]]
        # a file this process writes in /tmp is not there for a task on the second node
        with tempfile.NamedTemporaryFile(dir="/tmp", prefix="mmlg-two-nodes-") as marker:
            sees = ray.get(ray.remote(resources={"nodisk": 0.01})(os.path.exists).remote(marker.name))
        cfg = load_config(None, overrides)
        run_sweep(cfg, out_uri, RayExecutor())
        workers = [
            a
            for a in list_actors(address=cluster.address, detail=True, limit=10000)
            if a.class_name == "RayTrainWorker"
        ]
        trials = [
            a for a in list_actors(address=cluster.address, detail=True, limit=10000) if a.class_name == "ImplicitFunc"
        ]
        print(
            json.dumps(
                {
                    "nodes": nodes,
                    "nodisk": nodisk,
                    "nodisk_sees_the_heads_tmp": sees,
                    "train_worker_nodes": sorted(a.node_id for a in workers),
                    "trial_nodes": sorted({a.node_id for a in trials}),
                }
            ),
            flush=True,
        )
    finally:
        ray.shutdown()
        if second is not None and second.poll() is None:
            second.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes
            try:
                second.wait(60)
            except subprocess.TimeoutExpired:
                second.kill()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
