"""Connecting to Ray, resolving storage paths, and the resources each piece of work asks Ray for."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mmlg_ray.config import Config, RayConfig, TuneSettings

log = logging.getLogger("mmlg_ray")


def storage_uri(cfg: Config, out: str | os.PathLike) -> str:
    """Ray storage path: ray.storage_path, else OUTPUT/ray (absolute, or a URI as given)."""
    if cfg.ray.storage_path:
        s = cfg.ray.storage_path
    else:
        s = str(out).rstrip("/") + "/ray" if "://" in str(out) else str(Path(out) / "ray")
    return s if "://" in s else str(Path(os.path.expanduser(s)).resolve())


def storage_problem(storage: str, nodes: int, shared: bool) -> str | None:
    """Why `storage` cannot hold this run's checkpoints on a cluster of `nodes` nodes, or None: Ray
    Train and Tune workers write checkpoints to the storage path themselves, so on more than one node
    it must be a URI (s3://...) or a folder every node mounts (ray.storage_shared)."""
    if "://" in storage or shared or nodes <= 1:
        return None
    return (
        f"{storage} is a local folder, but this Ray cluster has {nodes} nodes: a checkpoint written on one "
        "node is not on another"
    )


def check_storage(cfg: Config, storage: str) -> None:
    """Refuse a node-local storage path on a multi-node cluster (an autoscaling cluster that starts
    with its head alone passes here: set ray.storage_path to a bucket there, as configs/ does)."""
    import ray

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    problem = storage_problem(storage, nodes, cfg.ray.storage_shared)
    if problem:
        from mmlg_ray.errors import UserError

        raise UserError(
            "ray.storage_path",
            problem,
            "put ray.storage_path (or the output) on s3://..., or on a "
            "folder every node mounts and set ray.storage_shared=true",
        )


def ensure_ray(cfg: Config) -> None:
    """Connect to the cluster this job runs in (ray job submit / RAY_ADDRESS / ray.address), or
    start a local Ray instance when there is none."""
    import ray

    from mmlg_ray import stopping
    from mmlg_ray.distributed.logs import driver_env

    driver_env()  # before Ray starts: this process's settings, and the ones a local instance inherits
    if ray.is_initialized():
        return
    try:
        _init(cfg)
    finally:
        stopping.reinstall()  # ray.init's fatal-signal handler would end the job on SIGTERM (exit 15)


def _init(cfg: Config) -> None:
    import ray

    from mmlg_ray.distributed.logs import RAY_ENV

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:  # a submitted job (its runtime env is the job's) or an explicit cluster
        ray.init(address=address, log_to_driver=True)
        return
    try:
        ray.init(address="auto", log_to_driver=True)
        log.info("ray: connected to the running cluster")
    except ConnectionError:
        # with its dashboard (on 127.0.0.1 only): Ray's State API lives there, and without it Ray Train's
        # placement-group cleaner warns "Failed to query Ray Train Controller actor state" every second
        # of every TorchTrainer run (and cannot clean up after a crashed controller)
        ray.init(
            runtime_env={"env_vars": dict(RAY_ENV)},
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=True,
        )
        log.info("ray: started a local Ray instance")


# What each piece of work asks Ray for. The custom resources of ray.worker_resources and
# ray.tune.trial_resources are how a job picks node types without naming them: cluster.yaml's
# on-demand GPU nodes advertise {"ondemand": 1}, its spot nodes {"spot": 1}.
def worker_resources(rs: RayConfig) -> dict[str, float]:
    """resources_per_worker of the extraction's TorchTrainer: ray.cpus_per_worker CPUs, one GPU with
    ray.use_gpu, and ray.worker_resources (e.g. {"ondemand": 0.01}: ZeRO extraction off spot nodes)."""
    res = {"CPU": rs.cpus_per_worker}
    if rs.use_gpu:
        res["GPU"] = 1
    return {**res, **rs.worker_resources}


def data_task_options(rs: RayConfig) -> dict:
    """Ray Data map_batches options of a corpus decoding task: ray.data_cpus CPUs, never a GPU, and
    ray.data_resources (e.g. a CPU node type's custom resource, to keep decoding off GPU nodes)."""
    opts = {"num_cpus": rs.data_cpus}
    return {**opts, "resources": dict(rs.data_resources)} if rs.data_resources else opts


def trial_resources(t: TuneSettings) -> dict[str, float]:
    """tune.with_resources of one trial: its CPUs and GPUs, or a sliver of CPU when it only drives a
    multi-worker TorchTrainer (whose workers hold the rest), plus ray.tune.trial_resources."""
    res = {"cpu": t.trial_cpus, "gpu": t.trial_gpus} if t.trial_workers <= 1 else {"cpu": 0.01}
    return {**res, **t.trial_resources}


def trial_worker_resources(t: TuneSettings) -> dict[str, float]:
    """resources_per_worker of a multi-worker trial's TorchTrainer, plus ray.tune.trial_resources."""
    res = {"CPU": t.trial_cpus}
    if t.trial_gpus > 0:
        res["GPU"] = t.trial_gpus
    return {**res, **t.trial_resources}


def pretrain_task_options(t: TuneSettings) -> dict:
    """ray.remote options of a pt_ft / csm pre-training task: a trial's CPUs, GPUs and custom resources."""
    opts = {"num_cpus": t.trial_cpus, "num_gpus": t.trial_gpus}
    return {**opts, "resources": dict(t.trial_resources)} if t.trial_resources else opts
