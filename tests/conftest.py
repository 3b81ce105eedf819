"""Shared fixtures: tiny real models on the real packaged data; one session-wide cache."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(2)
# the venv's ninja first on PATH for every process the tests start (subprocess jobs, the session's Ray and
# its workers), as the product's entry points and Ray workers have it: another ninja on PATH rebuilds
# DeepSpeed's prebuilt ops (CPU Adam: ~50 s) in whatever process loads one
from mmlg_ray.config import as_overrides  # noqa: E402
from mmlg_ray.prebuild import venv_ninja_first  # noqa: E402

venv_ninja_first()

# the fast lane (`make test-fast`: -m "not slow") leaves out every test that starts Ray or runs a sweep:
# those asking for the session's Ray (ray_address) or a module's finished sweep (test_pipeline's
# local_run, test_report's finished) are marked here, the rest by hand
SLOW_FIXTURES = {"ray_address", "local_run", "finished"}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: starts Ray or runs a sweep in a subprocess (make test-fast leaves it out)"
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# the suite's sizes: configs/tiny.yaml (a micro ancestor, a 12-step extraction, one 20-step trial), as overrides
TINY = as_overrides("tiny")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def _tiny_sets(cache_dir):
    return TINY + [f"cache_dir={cache_dir}"]


@pytest.fixture(scope="session")
def tiny_cfg(_tiny_sets):
    from mmlg_ray.config import load_config

    return load_config(None, _tiny_sets)


@pytest.fixture(scope="session")
def tiny_ancestor(tiny_cfg):
    """The tiny ancestor, pre-trained once per session into the session's cache."""
    from mmlg_ray.method.ancestor import get_ancestor

    return get_ancestor(tiny_cfg, torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny_overrides(_tiny_sets, tiny_ancestor):
    """TINY and the session's cache, for a job run from the command line; the ancestor is in the cache
    by then, so no job (in a subprocess or not) pre-trains it a second time."""
    return _tiny_sets


@pytest.fixture(scope="session")
def tiny_learngene_path(tiny_cfg, tiny_ancestor, tmp_path_factory):
    from mmlg_ray.engine.pipeline import extract

    path = tmp_path_factory.mktemp("lg") / "mmlg.safetensors"
    extract(tiny_cfg, tiny_ancestor, path, device=torch.device("cpu"))
    return path


@pytest.fixture(scope="session")
def seed_learngene(tiny_cfg, tiny_learngene_path):
    """seed(out, sets): the session's mmlg learngene copied into a sweep's output folder, under the name
    that sweep's config gives it, so that a sweep testing its trials (not its extraction) reuses it, as
    any rerun would, instead of extracting again on Ray Train (~30 s). Refused when the sweep's
    extraction settings differ from the session's (the copy would then stand for another learngene)."""
    import shutil

    from mmlg_ray.config import load_config
    from mmlg_ray.engine.pipeline import extraction_fingerprint, learngene_path
    from mmlg_ray.method.learngene import load_learngene

    assert load_learngene(tiny_learngene_path).meta.method == "mmlg"

    def seed(out, sets: list[str]):
        cfg = load_config(None, sets)
        assert extraction_fingerprint(cfg) == extraction_fingerprint(tiny_cfg), "not the session's extraction"
        dst = learngene_path(cfg, out, "mmlg")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tiny_learngene_path, dst)
        return dst

    return seed


@pytest.fixture(scope="session")
def s3():
    """A real S3-compatible server for the session: moto's server mode on 127.0.0.1 (a free port), with
    one bucket. Its address and test credentials are exported as the AWS_* variables that pyarrow (so
    the product, Ray Train and Ray Tune) and boto3 read; Ray's worker processes inherit the environment
    of the process that starts Ray, so `ray_address` starts Ray after this."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    bucket = "mmlg-test"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)

    def keys(prefix: str) -> list[str]:
        """Every object under `prefix` of the bucket, listed through the S3 API."""
        out = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    yield SimpleNamespace(endpoint=env["AWS_ENDPOINT_URL"], bucket=bucket, env=env, client=client, keys=keys)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="session")
def ray_address(s3):
    """One local Ray instance for the whole test session (2 CPUs, as on a laptop / CI box), with its
    dashboard on 127.0.0.1 as every Ray the job meets has it (Ray's State API: Ray Train's
    placement-group cleaner warns every second without it). Started after the S3 server, so its
    workers reach it."""
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=False,
        runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", **s3.env}},
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
