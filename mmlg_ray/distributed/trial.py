"""One Tune trial: initialize a descendant by its method, fine-tune it, report each evaluation with a checkpoint, and resume from the newest checkpoint after a restart (single process, or data-parallel in a TorchTrainer)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from mmlg_ray.engine.arms import Cell
from mmlg_ray.config import TuneSettings
from mmlg_ray.engine.job import trial_inputs

from mmlg_ray.distributed.checkpoints import candidates
from mmlg_ray.distributed.logs import quiet_worker, train_logging
from mmlg_ray.distributed.settings import trial_worker_resources


log = logging.getLogger("mmlg_ray")


EVAL_KEYS = {
    "score",
    "top1",
    "accuracy",
    "mean_recall",
    "zeroshot_top1",
    "step",
    "epoch",
    "train_loss",
    "val_score",
    "val_top1",
    "val_accuracy",
    "val_mean_recall",
}


# --------------------------------------------------------------------------- the trial
_TASK_DATA: dict = {}


CKPT_FILE = "finetune.pt"


def _load_checkpoint(ckpt) -> dict | None:
    """A fine-tuning snapshot from a Tune / Train checkpoint (None: start from step 0). A checkpoint
    since superseded (a tombstone: the saved experiment state was older than the trial) gives the
    newest full checkpoint beside it that loads (see .checkpoints)."""
    if ckpt is None:
        return None
    import torch
    from ray.tune import Checkpoint

    def load(path):
        with Checkpoint(path, filesystem=ckpt.filesystem).as_directory() as d:
            f = Path(d) / CKPT_FILE
            return torch.load(f, map_location="cpu", weights_only=True) if f.is_file() else None

    found = candidates(ckpt.filesystem, ckpt.path, CKPT_FILE)
    if found == [ckpt.path]:  # the checkpoint Tune registered: an error here fails the attempt (Tune retries)
        return load(ckpt.path)
    for path in found:
        log.info("checkpoint %s was superseded: trying %s", ckpt.path, path)
        try:
            return load(path)
        except Exception as e:  # noqa: BLE001 (one the killed run was still writing, never registered: try the next)
            log.warning("checkpoint %s does not load (%s): trying an older one", path, str(e).splitlines()[0])
    log.warning("no full checkpoint beside %s: starting from step 0", ckpt.path)
    return None


def _checkpoint_of(snapshot: dict, checkpoint_cls, d: str):
    """A Checkpoint (Tune's or Train's class) holding `snapshot` in folder `d`, which the report call
    persists to the run's storage path (local or s3://)."""
    import torch

    torch.save(snapshot, Path(d) / CKPT_FILE)
    return checkpoint_cls.from_directory(d)


def _run_cell_trial(
    config: dict, ctx: dict, report, rank: int = 0, world: int = 1, wrap=None, get_checkpoint=None, checkpoint_cls=None
):
    """Initialize, fine-tune and score one descendant. `report(metrics, checkpoint=None)` gets every
    evaluation but the last, each with a checkpoint of the fine-tuning state (rank 0's; None on the
    others), then the final row (every rank calls it equally often). A trial restarted after a
    worker loss or a driver restart continues from `get_checkpoint()`'s step, not from step 0."""
    import shutil

    import torch

    from mmlg_ray.config import config_from_dict
    from mmlg_ray.method.descend import descendant_spec
    from mmlg_ray.method.finetune import load_task_data
    from mmlg_ray.engine.pipeline import run_trial, setup_runtime

    cfg = config_from_dict(ctx["cfg"])
    setup_runtime(cfg)
    quiet_worker(rank)
    torch.set_num_threads(max(1, int(cfg.ray.tune.trial_cpus)))
    cell = Cell.of(config["cell"])
    total = cfg.descendants.finetune.steps
    anc, learngenes, pretrained = trial_inputs(ctx, cell)  # by reference, through the node-local cache
    resume = _load_checkpoint(get_checkpoint() if get_checkpoint else None)
    if resume is not None:
        log.info("trial %s: resuming from its checkpoint at step %d", config["cell"], resume["step"])
    # fault injection (tests): SIGKILL at this step, first attempt only, of the trials whose config matches
    # MMLG_KILL_TRIAL_WHERE (a JSON object of config fields; empty: every trial)
    where = ctx.get("kill_trial_where") or {}
    kill_at = int(ctx.get("kill_trial_at_step") or 0) if all(config.get(k) == v for k, v in where.items()) else 0

    def on_eval(step, metrics, snapshot):
        if step >= total:
            return
        tmp = tempfile.mkdtemp(prefix="mmlg-ft-") if checkpoint_cls is not None and rank == 0 else None
        try:
            ckpt, report_ = None, dict(metrics)
            if tmp:
                snap = snapshot()
                ckpt = _checkpoint_of(snap, checkpoint_cls, tmp)
                # the history so far rides along: a trial that ends cut short or errored gets its row's
                # history from its last report, whatever Tune's result files kept (see .checkpoints)
                report_["history_json"] = json.dumps(snap["history"])
            report(report_, checkpoint=ckpt)  # persisted to the run's storage path before it returns
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        if kill_at and resume is None and step >= kill_at:
            import signal

            log.warning("trial %s: killing its own process at step %d (MMLG_KILL_TRIAL_AT_STEP)", config["cell"], step)
            os.kill(os.getpid(), signal.SIGKILL)

    spec = descendant_spec(anc.spec, cell.depth, cell.width)
    key = (json.dumps(ctx["cfg"]["data"], sort_keys=True), cell.modality, spec.image_size)
    if key not in _TASK_DATA:  # a reused trial actor keeps its task data
        _TASK_DATA[key] = load_task_data(cfg, cell.modality, spec.image_size)
    data = _TASK_DATA[key]
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if cfg.ray.tune.trial_gpus > 0 and torch.cuda.is_available()
        else torch.device("cpu")
    )
    row = run_trial(
        cfg,
        cell,
        int(config["seed"]),
        lr=config["lr"],
        weight_decay=config["weight_decay"],
        ancestor=anc,
        learngenes=learngenes,
        pretrained=pretrained,
        task_data=data,
        on_eval=on_eval,
        device=device,
        rank=rank,
        world=world,
        wrap=wrap,
        resume=resume,
    )
    final = {k: float(v) for k, v in row.history[-1].items()}
    final.update(row.record())
    final.update(final_report=True, phase=config["phase"], history_json=json.dumps(row.history))
    report(final)


def _ddp_worker(loop_config: dict):
    """A fine-tuning worker of a multi-worker trial (TorchTrainer inside the Tune trial). Its
    checkpoints are the TorchTrainer run's (storage/ft-<trial id>): a worker loss restarts the
    workers from the latest one, and so does a restarted trial (same run name and storage path)."""
    import ray.train
    import ray.train.torch

    ctx = loop_config["ctx"]
    if not isinstance(ctx, dict):
        import ray

        ctx = ray.get(ctx)
    tc = ray.train.get_context()
    _run_cell_trial(
        loop_config["config"],
        ctx,
        lambda m, checkpoint=None: ray.train.report(m, checkpoint=checkpoint),
        rank=tc.get_world_rank(),
        world=tc.get_world_size(),
        wrap=ray.train.torch.prepare_model,
        get_checkpoint=ray.train.get_checkpoint,
        checkpoint_cls=ray.train.Checkpoint,
    )


def trial_fn(config: dict, ctx=None):
    """One Tune trial: initialize a descendant by its method, fine-tune it, report each evaluation
    with a checkpoint. With ray.tune.trial_workers > 1 the fine-tuning runs data-parallel in a
    TorchTrainer whose rank-0 metrics reach Tune (and its scheduler) through TuneReportCallback."""
    from ray import tune

    if "job" in config:  # a follow-up seeds round: the grid value is the whole trial spec
        config = {**config, **config["job"]}
    tcfg = ctx["cfg"]["ray"]["tune"]
    if tcfg["trial_workers"] <= 1:
        _run_cell_trial(
            config,
            ctx,
            lambda m, checkpoint=None: tune.report(m, checkpoint=checkpoint),
            get_checkpoint=tune.get_checkpoint,
            checkpoint_cls=tune.Checkpoint,
        )
        return
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = trial_worker_resources(TuneSettings.model_validate(tcfg))
    trainer = TorchTrainer(
        _ddp_worker,
        train_loop_config={"config": config, "ctx": ray.put(ctx)},
        scaling_config=ScalingConfig(
            num_workers=tcfg["trial_workers"], use_gpu=tcfg["trial_gpus"] > 0, resources_per_worker=res
        ),
        run_config=RunConfig(
            name=f"ft-{tune.get_context().get_trial_id()}",
            storage_path=ctx.get("storage"),
            callbacks=[TuneReportCallback()],
            # Ray Train's own run: it keeps its latest two (it deletes older ones itself, and restores
            # from its own run state, not Tune's)
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=ctx["cfg"]["ray"]["max_failures"]),
            logging_config=train_logging(),
        ),
    )
    trainer.fit()
