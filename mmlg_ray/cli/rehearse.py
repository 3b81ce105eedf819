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

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmlg_ray.cli import ArgumentParser, add_config_args, config_from_args
from mmlg_ray.errors import UserError, exits_cleanly

ROOT = Path(__file__).resolve().parents[2]  # the project's folder (a source checkout: cluster.yaml is there)


@exits_cleanly
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--output", required=True, help="local output folder of the rehearsed sweep")
    p.add_argument(
        "--cluster", default=None, help="Ray cluster launcher YAML (default: cluster.yaml here, else the project's own)"
    )
    p.add_argument("--max-per-type", type=int, default=2, help="fake nodes per worker type at most (fit this machine)")
    p.add_argument("--cpus-per-gpu", type=int, default=1, help="CPUs a fake node has for each GPU of its instance")
    p.add_argument("--idle-timeout-s", type=float, default=20.0, help="autoscaler idle timeout of the rehearsal")
    p.add_argument(
        "--job-timeout-s",
        type=float,
        default=3600.0,
        help="give up on the job after this long (a request no fake node can hold waits forever)",
    )
    p.add_argument(
        "--preempt-after-s", type=float, default=5.0, help="preempt a spot node once a trial has run on it this long"
    )
    p.add_argument(
        "--preempt",
        default="drain,kill",
        help="the preemptions to make, in order, each of a trial on a spot node: drain (the spot watcher drains "
        "the node on its interruption notice, then it is killed) or kill (killed without notice); none: no preemption",
    )
    p.add_argument("--notice-s", type=float, default=5.0, help="seconds from a drained node's notice to its kill")
    a = p.parse_args(argv)
    cfg = config_from_args(a)
    if a.cluster is None:
        a.cluster = "cluster.yaml" if Path("cluster.yaml").is_file() else str(ROOT / "cluster.yaml")
    if "://" in a.output:
        raise UserError(
            "--output", f"is {a.output}, a URI", "rehearse into a local folder (every fake node shares this disk)"
        )
    out = Path(a.output)
    if out.exists() and any(out.iterdir()):
        # the sweep would resume the results there and start no node: every check would fail
        raise UserError("--output", f"{a.output} already holds files", "give a new folder, or delete this one")
    modes = [] if a.preempt.strip() == "none" else [m.strip() for m in a.preempt.split(",")]
    if not set(modes) <= {"drain", "kill"}:
        raise UserError(
            "--preempt", f"is {a.preempt!r}", "give drain, kill or both comma-separated (drain,kill), or none"
        )
    if a.notice_s < 0:
        raise UserError("--notice-s", "must not be negative", "give the seconds from a notice to the reclaim, e.g. 5")
    if a.idle_timeout_s <= 0:
        raise UserError("--idle-timeout-s", "must be positive", "give seconds, e.g. 20")
    from mmlg_ray.engine import preflight

    preflight.sweep(cfg, a.output, output_field="--output", backend="ray")
    from mmlg_ray.distributed.rehearse import rehearse

    return rehearse(
        cfg,
        a.config,
        a.overrides,
        a.output,
        a.cluster,
        cpus_per_gpu=a.cpus_per_gpu,
        max_per_type=a.max_per_type,
        idle_timeout_s=a.idle_timeout_s,
        preempt_after_s=a.preempt_after_s,
        preempt=tuple(modes),
        notice_s=a.notice_s,
        job_timeout_s=a.job_timeout_s,
    )


if __name__ == "__main__":
    sys.exit(main())
