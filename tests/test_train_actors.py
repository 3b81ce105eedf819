"""No actor outlives its stage: when extract_on_ray returns (or raises), Ray Train's controller, its
workers, the data actors it made for a streamed corpus (DatasetManager, Ray Data's SplitCoordinator)
and the corpus's skip counter are no longer alive."""

import time

import pytest

from test_stream import _shards

# the classes Ray 2.58's Train V2 starts for a run (ray/train/v2/...: TrainController,
# RayTrainWorker, DatasetManager), Ray Data's streaming_split coordinator, and the stage's own
# counter of a streamed corpus's bad samples (mmlg_ray.distributed.data.SkipCounter)
RUN_CLASSES = {"TrainController", "RayTrainWorker", "DatasetManager", "SplitCoordinator", "SkipCounter"}


def _run_actors(before: set[str] | None = None) -> dict[str, tuple[str, str]]:
    """actor id -> (class, state) of every actor of RUN_CLASSES this job holds, dead ones included, except `before`'s."""
    import ray
    from ray.util.state import list_actors

    job = ray.get_runtime_context().get_job_id()
    return {
        a.actor_id: (a.class_name, a.state)
        for a in list_actors(filters=[("job_id", "=", job)], limit=10_000, raise_on_missing_output=False)
        if a.class_name in RUN_CLASSES and a.actor_id not in (before or ())
    }


def assert_no_run_actor_alive(before: set[str]) -> None:
    """Polls (10 s at most: actor death is asynchronous) until none of the Train run's actors started
    since `before` is alive; the run must have started them (so the check means something)."""
    returned = time.monotonic()
    while True:
        run = _run_actors(before)
        alive = sorted(c for c, state in run.values() if state != "DEAD")
        if not alive or time.monotonic() > returned + 10:
            break
        time.sleep(0.5)
    assert {"TrainController", "RayTrainWorker", "DatasetManager", "SkipCounter"} <= {c for c, _ in run.values()}
    assert not alive, f"alive {time.monotonic() - returned:.1f} s after extract_on_ray returned: {alive}"


def test_no_train_actor_outlives_a_failed_extraction(
    tiny_cfg, tiny_ancestor, ray_address, tmp_path, cache_dir, monkeypatch
):
    """A run that raises (a worker crash, no retry allowed). A run that returns: test_stream's
    streamed extraction makes the same check."""
    import ray.train

    from mmlg_ray.config import DatasetConfig
    from mmlg_ray.distributed.extract import extract_on_ray

    shards = _shards(tmp_path, cache_dir, n=60, per_shard=30, bad=False)
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.data.corpus = DatasetConfig(
        kind="webdataset",
        path=str(shards / "*.tar"),
        test_shards=str(shards / "test-*.tar"),
        val_shards=str(shards / "val-*.tar"),
    )
    cfg.ray.num_workers, cfg.ray.cpus_per_worker, cfg.ray.data_cpus = 2, 0.25, 0.25
    cfg.ray.extraction.zero_stage = 2
    cfg.ray.max_failures = 0
    cfg.learngene.extraction.steps = 6
    cfg.learngene.extraction.checkpoint_every = 6
    before = set(_run_actors())
    monkeypatch.setenv("MMLG_FAIL_AT_STEP", "6")
    with pytest.raises(ray.train.TrainingFailedError):
        extract_on_ray(cfg, tiny_ancestor, tmp_path / "lg.safetensors", storage=str(tmp_path / "ray"))
    assert_no_run_actor_alive(before)
