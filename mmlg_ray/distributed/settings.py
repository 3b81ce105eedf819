"""Connecting to Ray and resolving storage paths."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ..config import Config

log = logging.getLogger("mmlg_ray")
def storage_uri(cfg: Config, out: str | os.PathLike) -> str:
    """Ray storage path: ray.storage_path, else OUTPUT/ray (absolute, or a URI as given)."""
    if cfg.ray.storage_path:
        s = cfg.ray.storage_path
    else:
        s = str(out).rstrip("/") + "/ray" if "://" in str(out) else str(Path(out) / "ray")
    return s if "://" in s else str(Path(os.path.expanduser(s)).resolve())


def ensure_ray(cfg: Config) -> None:
    """Connect to the cluster this job runs in (ray job submit / RAY_ADDRESS / ray.address), or
    start a local Ray instance when there is none."""
    import ray
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:  # a submitted job (its runtime env is the job's) or an explicit cluster
        ray.init(address=address, log_to_driver=True)
        return
    try:
        ray.init(address="auto", log_to_driver=True)
        log.info("ray: connected to the running cluster")
    except ConnectionError:
        ray.init(runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}},
                 include_dashboard=False, log_to_driver=True)
        log.info("ray: started a local Ray instance")
