"""Run by tests/test_two_nodes.py in a subprocess (the test session has its own ray.init): a Ray cluster
of two nodes on this machine (ray.cluster_utils.Cluster: a head of 1 CPU and a second node of 1 CPU),
the main job on it with its output on the S3 server named by AWS_ENDPOINT_URL, then only that
cluster shut down. Prints one JSON line: the nodes, and the node of every extraction worker.

    python tests/two_node_sweep.py OUTPUT_URI '["override=value", ...]'
"""

import json
import os
import sys


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
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        cfg = load_config(None, overrides)
        run_sweep(cfg, out_uri, RayExecutor())
        workers = [
            a
            for a in list_actors(address=cluster.address, detail=True, limit=10000)
            if a.class_name == "RayTrainWorker"
        ]
        print(json.dumps({"nodes": nodes, "train_worker_nodes": sorted(a.node_id for a in workers)}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
