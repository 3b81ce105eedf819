"""The autoscaling rehearsal: cluster.yaml's node types on this machine (Ray's fake_multinode provider,
CPUs standing in for GPUs), the main job submitted with `ray job submit` as on a cluster, spot nodes
preempted mid-trial (one drained by the spot watcher on its interruption notice, then killed; one killed
without notice), and the cluster watched until it is back to its head alone.

    python jobs/rehearse.py --config configs/local.yaml --output runs/rehearsal [--set k=v ...]

Writes OUTPUT/cluster_timeline.parquet (t_s, node_type, nodes, event), cluster_timeline.png,
rehearsal.json (events, checks) next to the sweep's own results, and rebuilds the report with the
timeline. Exits 1 when a check fails: workers start from zero, extraction only on on-demand types,
trials on spot types, each preemption made, the job succeeds despite them with every trial once and its
restarts counted by cause, scale-down.
"""

import sys

from mmlg_ray.cli.rehearse import main

if __name__ == "__main__":
    sys.exit(main())
