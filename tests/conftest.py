"""Shared fixtures: tiny real models on the real packaged data; one session-wide cache."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(2)

TINY = [
    "ancestor.spec.image_depth=2", "ancestor.spec.text_depth=2",
    "ancestor.spec.image_width=128", "ancestor.spec.text_width=64",
    "ancestor.spec.embed_dim=32", "ancestor.spec.image_size=16", "ancestor.spec.patch_size=8",
    "ancestor.spec.context_length=16",
    "ancestor.pretrain.steps=30", "ancestor.pretrain.batch_size=64", "ancestor.pretrain.log_every=10",
    "data.corpus.max_samples=4000", "data.zeroshot.max_samples=300",
    "learngene.extraction.steps=12", "learngene.extraction.batch_size=32", "learngene.extraction.log_every=6",
    "learngene.extraction.checkpoint_every=6",
    "descendants.grid.modality=[image]", "descendants.grid.depth=[2]", "descendants.grid.width=[64]",
    "descendants.grid.method=[mmlg]", "descendants.seeds=[0]",
    "descendants.finetune.steps=20", "descendants.finetune.eval_every=10", "descendants.finetune.batch_size=32",
    "descendants.pretrain_steps=10",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_overrides(cache_dir):
    return TINY + [f"cache_dir={cache_dir}"]


@pytest.fixture(scope="session")
def tiny_cfg(tiny_overrides):
    from mmlg_ray.config import load_config
    return load_config(None, tiny_overrides)


@pytest.fixture(scope="session")
def tiny_ancestor(tiny_cfg):
    from mmlg_ray.ancestor import get_ancestor
    return get_ancestor(tiny_cfg, torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny_learngene_path(tiny_cfg, tiny_ancestor, tmp_path_factory):
    from mmlg_ray.pipeline import extract
    path = tmp_path_factory.mktemp("lg") / "mmlg.safetensors"
    extract(tiny_cfg, tiny_ancestor, path, device=torch.device("cpu"))
    return path


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray instance for the whole test session (2 CPUs, as on a laptop / CI box), with its
    dashboard on 127.0.0.1 as every Ray the job meets has it (Ray's State API: Ray Train's
    placement-group cleaner warns every second without it)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
