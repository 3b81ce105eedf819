"""The main job on Ray: `RayExecutor` runs mmlg_ray.engine.job's stages on Ray Train (extraction), Ray tasks
(pre-training) and Ray Tune (trials).

The trials are one Tune experiment, `sweep-<experiment fingerprint>`, driven by the core's SweepPlan
(mmlg_ray.engine.search) through a Tune Searcher (`PlanSearcher`: which trial runs next: common random
candidates per shape, then Optuna TPE per cell, then each cell's seed re-runs once its search has
ended) and a Tune TrialScheduler (`PlanScheduler`: asynchronous successive halving per cell, on the
validation score; seed re-runs are never cut). The plan's state is its trial records, saved with
Tune's searcher checkpoint; the rungs are rebuilt from them on restore.

Pre-training runs as Ray tasks while the trials that need no pre-trained shape already run; a pt_ft
or csm cell starts once its shape is written. Each task writes its shape to the output store itself.

A resumed run (--resume) restores the experiment (errored trials retried, unfinished ones continued).
A restored Tune run never takes new trials, so seed re-runs that the restored run cannot add (a cell
whose search trials had all errored, or whose best trial changed) run as a follow-up Tune experiment
named by its own trial list, `seeds-<fingerprint>-<digest>`, listed in `rounds-<fingerprint>.json`
under the storage path: itself restorable, never re-run once done. A seed re-run at hyper-parameters
its cell no longer chooses is kept in trials.parquet as `superseded`.

Modules: `trial` (one trial), `tune` (the Tune side), `checkpoints` (trial checkpoints).
"""

from __future__ import annotations

import os

from mmlg_ray.config import Config
from mmlg_ray.errors import UserError
from mmlg_ray.engine.job import Executor, PretrainJob, _Done, pretrain_and_write
from mmlg_ray import storage as stor

from mmlg_ray.distributed.logs import quiet_worker
from mmlg_ray.distributed.settings import pretrain_task_options
from mmlg_ray.distributed.pretraining import PretrainingWatch
from mmlg_ray.distributed.tune import check_baked, previous_state, run_tune

# An experiment that an earlier version saved names these classes and the trainable by their old home,
# this module (Tune pickles them into tuner.pkl); the names keep such an experiment restorable.
from mmlg_ray.distributed.trial import trial_fn  # noqa: E402, F401
from mmlg_ray.distributed.tune import PlanScheduler, PlanSearcher  # noqa: E402, F401


# --------------------------------------------------------------------------- the executor
def _pretrain_task(cfg_json, ancestor_ref, job: PretrainJob, restarts=None, fail=False, hold_s=0.0, kill_at=0):
    from mmlg_ray.method.ancestor import Ancestor
    from mmlg_ray.engine.artifacts import load
    from mmlg_ray.config import ModelSpec, config_from_dict
    from mmlg_ray.engine.pipeline import setup_runtime
    from safetensors.torch import load_file

    from mmlg_ray.distributed.pretraining import note_attempt

    note_attempt(restarts)  # where and when this attempt runs, for the driver's count of a loss
    if fail:  # fault injection for tests (MMLG_FAIL_PRETRAIN), like extraction's MMLG_FAIL_AT_STEP
        raise RuntimeError(f"injected failure of pre-training {job.name} (MMLG_FAIL_PRETRAIN)")
    cfg = config_from_dict(cfg_json)
    setup_runtime(cfg)
    quiet_worker()
    spec, fpr, source, ref = ancestor_ref
    state = load(ref, "ancestor", lambda p: load_file(str(p)), cfg.cache_path) if ref and job.method == "csm" else {}
    anc = Ancestor(ModelSpec(**spec), state, fpr, source)
    return pretrain_and_write(cfg, anc, job, hold_s=hold_s, kill_at=kill_at, restarts=restarts)


class RayExecutor(Executor):
    name = "ray"

    def check(self, cfg, od):
        from mmlg_ray.distributed.extract import check_precision
        from mmlg_ray.distributed.logs import check_logging

        if {"mmlg", "tleg"} & set(cfg.descendants.grid.method):
            check_precision(cfg)
        check_logging(cfg, od.target)

    def check_resume(self, cfg, storage, fp):
        check_baked(cfg, storage, fp)

    def storage(self, cfg, od):
        from mmlg_ray.distributed.settings import storage_uri

        return storage_uri(cfg, od.target)

    def previous_state(self, storage, fp):
        return previous_state(storage, fp)

    def open(self, cfg, od, storage, resume):
        from mmlg_ray.distributed.settings import check_storage, ensure_ray

        ensure_ray(cfg)
        check_storage(cfg, storage)
        check_artifact_root(cfg, od.target)

    def extract(self, cfg, anc, uri, method, mode, storage):
        from mmlg_ray.distributed.extract import extract_on_ray

        extract_on_ray(cfg, anc, uri, method=method, storage=storage, mode=mode)

    def start_pretraining(self, cfg, anc, anc_ref, jobs, wait):
        import ray
        from mmlg_ray.engine.pipeline import cells, shape_key
        from mmlg_ray.method.descend import descendant_spec

        if not jobs:
            return _Done({}, [])
        # max_retries=0: the driver retries a lost task itself, telling a preempted node from a failed one
        # (mmlg_ray.distributed.pretraining)
        remote = ray.remote(**pretrain_task_options(cfg.ray.tune), max_retries=0, retry_exceptions=False)(
            _pretrain_task
        )
        inject = os.environ.get("MMLG_FAIL_PRETRAIN", "")  # "method/shape" of a shape whose task must fail
        a = (anc.spec.model_dump(), anc.fingerprint, anc.source, anc_ref.to_json() if anc_ref else None)
        cfg_json = cfg.model_dump(mode="json")
        hold = float(os.environ.get("MMLG_HOLD_PRETRAIN_S") or 0)  # tests: each shape takes this much longer
        # tests: each shape's first attempt kills its own process after its checkpoint at this step (a lost
        # node, as far as Ray knows): the task is retried and resumes from that checkpoint
        kill_at = int(os.environ.get("MMLG_KILL_PRETRAIN_AT_STEP") or 0)
        by_name = {j.name: j for j in jobs}

        def submit(name: str, restarts: dict):
            j = by_name[name]
            fail = inject in (f"{j.method}/{shape_key(j.spec)}", j.name)
            return remote.options(name=f"pretrain {name}").remote(
                cfg_json, a, j, restarts, fail=fail, hold_s=hold, kill_at=kill_at
            )

        by_key = {(j.method, shape_key(j.spec), j.budget): j.name for j in jobs}
        cell_names = {}
        for c in cells(cfg):
            if c.pretrained_key:
                k = (c.method, shape_key(descendant_spec(anc.spec, c.depth, c.width)), c.pt_budget)
                if k in by_key:
                    cell_names[c.key] = by_key[k]
        watch = PretrainingWatch(list(by_name), submit, cell_names, cfg.ray.max_failures)
        if wait:
            done, failed = watch.wait()
            return _Done(done, failed)
        return watch

    def run_trials(self, cfg, plan, ctx, pretraining, fp, storage, od):
        return run_tune(cfg, plan, ctx, pretraining, fp, storage, od)


def check_artifact_root(cfg: Config, target) -> None:
    """Trials and pre-training tasks read and write stage artifacts in the output store itself: on
    a multi-node cluster it must be a URI or a folder every node mounts."""
    import ray

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if stor.is_uri(target) or cfg.ray.storage_shared or nodes <= 1:
        return
    raise UserError(
        "--output",
        f"the output {target} is a local folder, but this Ray cluster has {nodes} nodes: "
        "trials on other nodes read the stage artifacts from it",
        "put --output (or output_dir) on " "s3://..., or on a folder every node mounts and set ray.storage_shared=true",
    )
