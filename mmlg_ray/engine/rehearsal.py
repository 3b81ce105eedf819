"""The autoscaling rehearsal's plain parts (no Ray here): the fake-multinode cluster config made from
cluster.yaml, the job overrides that make a config ask for cluster.yaml's node types, the timeline
table, and the checks a rehearsal must pass. mmlg_ray.distributed.rehearse runs the cluster.

On one machine Ray's `fake_multinode` provider starts real raylets as "nodes" when the autoscaler asks
for them. CPUs stand in for GPUs: a node type of N GPUs becomes N x cpus_per_gpu CPUs, and every job
setting that asks for a GPU is turned into the CPUs that stand in for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mmlg_ray.errors import UserError

# Ray's fake_multinode provider names its head node type this (node_provider.FAKE_HEAD_NODE_TYPE); a head
# type of any other name is taken for a worker type and launched as one. cluster.yaml's head type keeps
# its resources under this name.
FAKE_HEAD_TYPE = "ray.head.default"
# GPUs per instance type of cluster.yaml's node types (AWS's figures; a type not listed counts 1)
INSTANCE_GPUS = {
    "g5.xlarge": 1,
    "g5.2xlarge": 1,
    "g5.4xlarge": 1,
    "g5.8xlarge": 1,
    "g5.12xlarge": 4,
    "g5.24xlarge": 4,
    "g5.48xlarge": 8,
    "g6.xlarge": 1,
    "g6.2xlarge": 1,
    "g6.12xlarge": 4,
    "g4dn.xlarge": 1,
    "g4dn.2xlarge": 1,
    "g4dn.12xlarge": 4,
    "p3.2xlarge": 1,
    "p3.8xlarge": 4,
    "p4d.24xlarge": 8,
    "p5.48xlarge": 8,
}
PROVIDER = "mmlg_ray.distributed.fake_provider.PerNodeRuntimeEnvFakeProvider"
_BUILTIN = {"CPU", "GPU", "memory", "object_store_memory"}
# every launcher field: without one the autoscaler's monitor crashes with a KeyError
_LAUNCHER_FIELDS = {
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
}


@dataclass
class NodeTypeInfo:
    name: str  # cluster.yaml's name (the head's fake name is FAKE_HEAD_TYPE)
    custom: dict  # its custom resources, e.g. {"spot": 1}
    gpus: int
    spot: bool
    head: bool = False


@dataclass
class ClusterPlan:
    """What the rehearsal made of cluster.yaml."""

    config: dict  # the fake-multinode cluster config
    types: dict[str, NodeTypeInfo] = field(default_factory=dict)  # worker types by name
    head: NodeTypeInfo | None = None

    def ondemand_types(self) -> list[str]:
        return [n for n, t in self.types.items() if not t.spot]

    def spot_types(self) -> list[str]:
        return [n for n, t in self.types.items() if t.spot]

    def type_of(self, resources: dict) -> str | None:
        """The worker node type whose custom resources a node advertises (None: the head or unknown)."""
        for name, t in self.types.items():
            if t.custom and all(resources.get(k, 0) >= v for k, v in t.custom.items()):
                return name
        return None


def _is_spot(node_config: dict) -> bool:
    market = (node_config or {}).get("InstanceMarketOptions") or {}
    return str(market.get("MarketType", "")).lower() == "spot"


def fake_cluster(
    cluster: dict, *, gcs_address: str, cpus_per_gpu: int = 1, max_per_type: int = 2, idle_timeout_s: float = 20.0
) -> ClusterPlan:
    """A fake_multinode cluster config with cluster.yaml's node type names, custom resources, min/max
    workers (max capped at max_per_type to fit this machine) and head resources; CPUs for GPUs."""
    try:
        types = cluster["available_node_types"]
        head_name = cluster["head_node_type"]
        head = types[head_name]
    except (KeyError, TypeError) as e:
        raise UserError(
            "--cluster",
            f"has no {e} (available_node_types / head_node_type)",
            "give a Ray cluster launcher config such as cluster.yaml",
        ) from None
    if cpus_per_gpu < 1 or max_per_type < 1:
        raise UserError(
            "--cpus-per-gpu" if cpus_per_gpu < 1 else "--max-per-type",
            "must be at least 1",
            "give a positive whole number",
        )
    plan = ClusterPlan(config={})
    head_res = dict(head.get("resources") or {})
    plan.head = NodeTypeInfo(head_name, {k: v for k, v in head_res.items() if k not in _BUILTIN}, 0, False, True)
    fake_types: dict[str, Any] = {FAKE_HEAD_TYPE: {"resources": head_res, "node_config": {}, "max_workers": 0}}
    for name, t in types.items():
        if name == head_name:
            continue
        res = dict(t.get("resources") or {})
        nc = t.get("node_config") or {}
        gpus = int(res.get("GPU", INSTANCE_GPUS.get(nc.get("InstanceType", ""), 1)))
        custom = {k: v for k, v in res.items() if k not in _BUILTIN}
        if not custom:
            raise UserError(
                f"available_node_types.{name}.resources",
                "has no custom resource",
                'give each worker type a resource of its own (e.g. {"spot": 1}) so a job can ask for it',
            )
        info = NodeTypeInfo(name, custom, gpus, _is_spot(nc))
        plan.types[name] = info
        fake_types[name] = {
            "min_workers": int(t.get("min_workers", 0)),
            "max_workers": min(int(t.get("max_workers", max_per_type)), max_per_type),
            "resources": {**custom, "CPU": max(1, gpus) * cpus_per_gpu},
            "node_config": {},
        }
    total = sum(v["max_workers"] for k, v in fake_types.items() if k != FAKE_HEAD_TYPE)
    plan.config = {
        "cluster_name": f"{cluster.get('cluster_name', 'mmlg-ray')}-rehearsal",
        "max_workers": min(int(cluster.get("max_workers", total)), total),
        "upscaling_speed": cluster.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_s / 60.0,
        # Ray's fake_multinode provider, each node with a runtime-env folder of its own (fake_provider.py)
        "provider": {
            "type": "external",
            "module": PROVIDER,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "auth": {"ssh_user": "ubuntu"},
        "head_node_type": FAKE_HEAD_TYPE,
        "available_node_types": fake_types,
        **_LAUNCHER_FIELDS,
    }
    return plan


def job_overrides(cfg, plan: ClusterPlan, cpus_per_gpu: int = 1) -> list[str]:
    """--set arguments that make the job ask for cluster.yaml's node types as configs/paper_vitb16.yaml
    does (extraction on on-demand types, trials on spot types), with CPUs standing in for GPUs, and
    its storage on this machine's disk, which every fake node shares."""
    od, sp = plan.ondemand_types(), plan.spot_types()
    if not od or not sp:
        raise UserError(
            "--cluster",
            f"needs an on-demand and a spot worker type (has on-demand {od}, spot {sp})",
            "mark spot types with node_config.InstanceMarketOptions.MarketType: spot",
        )
    wres = dict(cfg.ray.worker_resources) or {k: 0.01 for k in plan.types[od[0]].custom}
    tres = dict(cfg.ray.tune.trial_resources) or {k: 0.01 for k in plan.types[sp[0]].custom}
    provided = {k for t in plan.types.values() for k in t.custom}
    for field_, res in (("ray.worker_resources", wres), ("ray.tune.trial_resources", tres)):
        missing = sorted(set(res) - provided)
        if missing:
            raise UserError(
                field_,
                f"asks for {missing}, which no worker type of the cluster config provides "
                f"(they provide {sorted(provided)})",
                "name a resource of a cluster.yaml worker type",
            )
    if cfg.ray.tune.trial_workers > 1:
        raise UserError(
            "ray.tune.trial_workers",
            f"is {cfg.ray.tune.trial_workers}; the rehearsal runs "
            "single-worker trials (a fake node stands in for one GPU node)",
            "--set ray.tune.trial_workers=1",
        )
    # each fake node has gpus x cpus_per_gpu CPUs and each extraction worker takes cpus_per_gpu of them
    slots = sum(plan.config["available_node_types"][n]["max_workers"] * max(1, plan.types[n].gpus) for n in od)
    if cfg.ray.num_workers > slots:
        raise UserError(
            "ray.num_workers",
            f"is {cfg.ray.num_workers}, more extraction workers than the "
            f"rehearsal's on-demand nodes hold ({slots})",
            f"--set ray.num_workers={slots}, or raise --max-per-type",
        )
    fmt = lambda d: "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"  # noqa: E731
    return [
        f"ray.worker_resources={fmt(wres)}",
        f"ray.tune.trial_resources={fmt(tres)}",
        "ray.use_gpu=false",
        "ray.tune.trial_gpus=0",
        f"ray.cpus_per_worker={cpus_per_gpu}",
        f"ray.tune.trial_cpus={cpus_per_gpu}",
        "ray.storage_shared=true",
        "ray.storage_path=null",
    ]


def timeline_frame(samples: list[dict], types: list[str]) -> pd.DataFrame:
    """One row per sample and worker node type: t_s, node_type, nodes (alive), event ('' or what happened:
    an event of one node type is on that type's row, a cluster-wide one on every row of its sample)."""
    rows = []
    for s in samples:
        for nt in types:
            ev = [e for e in s.get("events", []) if e.get("node_type") in (None, nt)]
            rows.append(
                {
                    "t_s": round(float(s["t_s"]), 2),
                    "node_type": nt,
                    "nodes": int(s["nodes"].get(nt, 0)),
                    "event": "; ".join(e["text"] for e in ev),
                }
            )
    return pd.DataFrame(rows, columns=["t_s", "node_type", "nodes", "event"])


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def check_rehearsal(
    timeline: pd.DataFrame,
    placements: pd.DataFrame,
    plan: ClusterPlan,
    *,
    job_status: str,
    trials: pd.DataFrame | None,
    expected_trials: int,
    preemptions: list[dict],
    preempt_modes: list[str],
    scaled_down: bool,
) -> list[Check]:
    """The rehearsal's verdicts. placements: one row per observed piece of work (kind: 'extraction' or
    'trial', node_type) as the State API showed it while the job ran."""
    checks = []
    first = timeline[timeline.t_s == timeline.t_s.min()]
    peak = timeline.groupby("node_type").nodes.max()
    started_from_zero = bool(len(first)) and int(first.nodes.sum()) == 0 and int(peak.sum()) > 0
    checks.append(
        Check(
            "workers start from zero",
            started_from_zero,
            f"{int(first.nodes.sum()) if len(first) else '?'} worker nodes at the start, peak "
            + ", ".join(f"{k} {v}" for k, v in peak.items()),
        )
    )
    ext = placements[placements.kind == "extraction"] if len(placements) else placements
    ext_types = sorted(set(ext.node_type)) if len(ext) else []
    ok = bool(ext_types) and set(ext_types) <= set(plan.ondemand_types())
    checks.append(
        Check(
            "extraction only on on-demand node types",
            ok,
            f"extraction workers seen on {ext_types or 'no node'} (on-demand: {plan.ondemand_types()}; the job asks "
            "by ray.worker_resources)",
        )
    )
    tr = placements[placements.kind == "trial"] if len(placements) else placements
    tr_types = sorted(set(tr.node_type)) if len(tr) else []
    ok = bool(tr_types) and set(tr_types) <= set(plan.types) and bool(set(tr_types) & set(plan.spot_types()))
    checks.append(Check("trials on spot node types", ok, f"trials seen on {tr_types or 'no node'}"))
    done = [p["mode"] for p in preemptions]
    for mode, name in (("drain", "drained on its spot notice"), ("kill", "killed without notice")):
        if mode in preempt_modes:
            n = done.count(mode)
            want = preempt_modes.count(mode)
            hit = [f"{p['node_type']} …{p['node_id'][-5:]}" for p in preemptions if p["mode"] == mode]
            detail = f"{n} of {want}: " + (", ".join(hit) if hit else "no trial ran on a spot node long enough")
            checks.append(Check(f"a spot node {name}, then reclaimed mid-trial", n == want, detail))
    checks.append(Check("the job succeeded", job_status == "SUCCEEDED", f"job status {job_status}"))
    if trials is None:
        checks.append(Check("every trial exactly once in trials.parquet", False, "no trials.parquet"))
    else:
        dup = int(trials.duplicated(["phase", "trial_id"]).sum())
        n = len(trials)
        # an errored row would be a trial (the preempted one, say) that ran out of retries
        err = int((trials.status == "error").sum()) if "status" in trials else 0
        checks.append(
            Check(
                "every trial exactly once in trials.parquet, none errored",
                dup == 0 and n == expected_trials and err == 0,
                f"{n} rows for {expected_trials} planned trials, {dup} duplicated, {err} errored",
            )
        )
        if preemptions and {"preemptions", "retries"} <= set(trials.columns):
            # Tune's count: a trial lost with a drained node restarts as preempted, one killed without notice
            # as failed (spending ray.max_failures)
            pre, ret = int(trials.preemptions.sum()), int(trials.retries.sum())
            checks.append(
                Check(
                    "trials.parquet counts each restart by its cause",
                    (pre, ret) == (done.count("drain"), done.count("kill")),
                    f"{pre} preemptions and {ret} retries, for {done.count('drain')} drained and "
                    f"{done.count('kill')} killed nodes",
                )
            )
    ts = timeline.t_s.drop_duplicates().sort_values()
    gap = float(ts.diff().max()) if len(ts) > 1 else float("inf")
    checks.append(Check("the cluster sampled at least every 5 s", gap <= 5.0, f"longest gap {gap:.1f} s"))
    last = timeline[timeline.t_s == timeline.t_s.max()]
    checks.append(
        Check(
            "back to zero worker nodes after the idle timeout",
            scaled_down and int(last.nodes.sum()) == 0,
            f"{int(last.nodes.sum()) if len(last) else '?'} worker nodes at the end",
        )
    )
    return checks


def plot_timeline(timeline: pd.DataFrame, path: str | Path | None = None):
    """Nodes over time per node type, events marked: a PNG at path (returned), or its bytes without one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.4))
    if timeline.empty:
        timeline = pd.DataFrame({"t_s": [0.0], "node_type": ["(no sample)"], "nodes": [0], "event": [""]})
    for nt, g in timeline.groupby("node_type", sort=False):
        ax.step(g.t_s, g.nodes, where="post", label=nt)
    ev = timeline[timeline.event != ""].drop_duplicates(["t_s", "event"])
    ymax = max(1, int(timeline.nodes.max()))
    tmax = float(timeline.t_s.max()) if len(timeline) else 1.0
    for i, (_, r) in enumerate(ev.drop_duplicates("t_s").iterrows()):
        ax.axvline(r.t_s, color="grey", ls=":", lw=1)
        right = r.t_s > 0.6 * tmax  # labels near the right edge run leftwards
        ax.text(r.t_s, ymax + 0.15 + 0.35 * (i % 3), r.event, fontsize=7, ha="right" if right else "left")
    ax.set_ylim(-0.1, ymax + 1.4)
    ax.set_xlabel("seconds since the head started")
    ax.set_ylabel("alive worker nodes")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_title("Cluster rehearsal: worker nodes per node type")
    fig.tight_layout()
    if path is None:
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        return buf.getvalue()
    from mmlg_ray.atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
