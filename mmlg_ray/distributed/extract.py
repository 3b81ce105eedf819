"""Learngene extraction on Ray Train with DeepSpeed ZeRO.

A TorchTrainer runs the core library's extraction step in `ray.num_workers` workers (gloo on CPU,
NCCL on GPU). DeepSpeed is initialized inside each worker with the ZeRO stage and offload from the
`ray.extraction` config and the top-level `precision`: bf16 and fp16 (dynamic loss scaling) are
DeepSpeed's own mixed-precision modes (low-precision model, fp32 master weights in the optimizer);
the inputs and the frozen teacher are cast to the same dtype. The optimizer is always ours: AdamW
over train.param_groups (no weight decay on norms, biases, embeddings, logit scale, coefficients)
with the warm-up + cosine LambdaLR of train.lr_lambda, DeepSpeedCPUAdam over the same groups when
the optimizer is offloaded, so every ZeRO stage and offload keeps the schedule and the exclusions.
Every `checkpoint_every` steps each rank saves its ZeRO shard and all report together, so Ray
merges them into one checkpoint in the run's storage path; a run started again with the same
storage path and name resumes from the latest one. At the end the driver consolidates the ZeRO
state (DeepSpeed's zero_to_fp32: the fp32 master weights) into the learngene safetensors file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from mmlg_ray.config import Config
from mmlg_ray.config import RayConfig
from mmlg_ray import storage as stor
from mmlg_ray.errors import UserError
from mmlg_ray.distributed.settings import storage_uri

if TYPE_CHECKING:  # torch is imported in the workers, never at this module's top level
    import torch

log = logging.getLogger("mmlg_ray")
TAG = "latest_zero"


def deepspeed_config(rs: RayConfig, ecfg, world: int, precision: str = "fp32") -> dict:
    ex = rs.extraction
    zero: dict = {"stage": ex.zero_stage, "contiguous_gradients": True, "overlap_comm": False}
    if ex.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ex.offload_params and ex.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu"}
    cfg = {
        "train_micro_batch_size_per_gpu": max(1, ecfg.batch_size // world),
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if precision == "fp16":  # dynamic loss scaling (loss_scale 0), DeepSpeed's usual defaults
        cfg["fp16"].update(loss_scale=0, initial_scale_power=16, loss_scale_window=1000, hysteresis=2, min_loss_scale=1)
    return cfg


def check_precision(cfg: Config) -> None:
    """DeepSpeed has no fp16 mode on CPU: refuse it before any work starts."""
    if cfg.precision == "fp16" and not cfg.ray.use_gpu:
        raise UserError(
            "precision",
            "fp16 extraction runs DeepSpeed's fp16 mode, which needs GPU workers",
            "use precision=bf16 on CPU workers, or ray.use_gpu=true",
        )


def build_optimizer(model, ecfg, rs: RayConfig):
    """(optimizer, LambdaLR) over the project's parameter groups and schedule, for DeepSpeed. With
    the optimizer offloaded it is DeepSpeed's CPU Adam (AdamW mode; its C++ op is built on first use,
    or ahead by mmlg_ray.prebuild), which DeepSpeed requires there."""
    import torch

    from mmlg_ray.method.train import adamw, lr_lambda, param_groups

    groups = param_groups(model, ecfg.weight_decay)
    if rs.extraction.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # imported in the worker, never at module top level

        opt = DeepSpeedCPUAdam(groups, lr=ecfg.lr, weight_decay=ecfg.weight_decay, adamw_mode=True)
    else:
        opt = adamw(groups, ecfg.lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(ecfg))


def make_engine(cfg: Config, model, world: int):
    """The DeepSpeed engine for `model` (torch.distributed must be initialized). Returns
    (engine, DeepSpeed config)."""
    import deepspeed  # imported in the worker, never at module top level

    ds_cfg = deepspeed_config(cfg.ray, cfg.learngene.extraction, world, cfg.precision)
    opt, sched = build_optimizer(model, cfg.learngene.extraction, cfg.ray)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters()],
        optimizer=opt,
        lr_scheduler=sched,
        config=ds_cfg,
        dist_init_required=False,
    )
    return engine, ds_cfg


def _train_worker(config: dict):
    """Runs in every Ray Train worker."""
    import ray.train
    import torch

    from mmlg_ray.config import config_from_dict
    from mmlg_ray.engine.pipeline import build_aux, elastic_plan, setup_runtime
    from mmlg_ray.method.precision import dtype_of
    from mmlg_ray.method.train import Progress, extraction_step, run_loop
    from mmlg_ray.distributed.data import corpus_batches
    from mmlg_ray.distributed.logs import captured_output, quiet_worker

    cfg = config_from_dict(config["cfg"])
    rs = cfg.ray
    setup_runtime(cfg)
    # this worker's CPUs, not cfg.threads (the driver's, or a bare loop's): N workers x cfg.threads threads
    # on N x cpus_per_worker cores oversubscribe them, and every step waits on the slowest thread
    torch.set_num_threads(max(1, int(rs.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    quiet_worker(rank)
    torch.manual_seed(cfg.seed)
    ancestor = config["ancestor"]
    if not hasattr(ancestor, "state"):  # an ObjectRef
        ancestor = ray.get(ancestor)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if rs.use_gpu and torch.cuda.is_available()
        else torch.device("cpu")
    )
    ecfg = cfg.learngene.extraction
    mode = config.get("mode", "fixed")
    # same seed + fit on every rank: identical start
    aux = build_aux(cfg, ancestor, config["method"], fit=True, mode=mode)
    plan = elastic_plan(cfg, ancestor.spec) if mode == "elastic" else None  # every rank draws the same shapes
    import deepspeed  # noqa: F401  (imported before the capture: its logger's handler binds sys.stdout then)

    with captured_output("deepspeed.initialize", stderr=False):  # "DeepSpeed ...shm_comm_op built successfully"
        engine, ds_cfg = make_engine(cfg, aux, world)
    dtype = dtype_of(cfg.precision)
    # the frozen teacher runs in the student's precision (DeepSpeed casts the student to `dtype`)
    teacher = ancestor.model(device).to(dtype)
    for p in teacher.parameters():
        p.requires_grad_(False)

    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag=TAG)
            progress = json.loads((Path(d) / "progress.json").read_text())
            start, config["prior_wall_s"] = progress["step"], progress["wall_s"]
        log.info("extraction: rank %d resumed from step %d", rank, start)

    spec = aux.learngene.meta.model_spec
    bs = ds_cfg["train_micro_batch_size_per_gpu"]
    batches = corpus_batches(
        cfg, spec.image_size, spec.context_length, bs, rank, world, seed=cfg.seed + 7919 * start
    )  # this rank's bs of every global batch
    # elastic: the sampled shapes run inside the engine's forward (ZeRO-3 gathers what they read there)
    step_fn = extraction_step(
        engine,
        teacher,
        ecfg.distill_weight,
        ecfg.distill_temperature,
        ecfg.feature_weight,
        elastic=plan,
        start_step=start,
        gather=gather_global_batch if world > 1 else None,
    )
    if dtype != torch.float32:
        inner = step_fn

        def step_fn(batch):  # images in the engine's dtype; tokens stay integer
            images, tokens, labels = batch
            return inner((images.to(dtype), tokens, labels))

    every = ecfg.checkpoint_every
    fail_at = int(config.get("fail_at_step") or 0)  # fault injection for tests: one crash, first attempt only
    t_prev = [time.perf_counter()]
    wall = [float(config.get("prior_wall_s", 0.0))]
    samples = [0]
    step_s: list[float] = []  # each step's seconds (this attempt's), reported with step_times

    def report(step: int, metrics: dict, final: bool = False):
        now = time.perf_counter()
        wall[0] += now - t_prev[0]
        t_prev[0] = now
        out = {k: float(v) for k, v in metrics.items()}
        out.update(step=step, wall_s=wall[0], world=world, lr=float(engine.get_lr()[0]))
        if config.get("step_times"):
            out["step_s"] = list(step_s)
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=TAG)
            if rank == 0:  # one writer: every rank's files merge into one checkpoint folder
                (Path(tmp) / "progress.json").write_text(json.dumps({"step": step, "wall_s": wall[0]}))
            ray.train.report(out, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    # Every rank reports at exactly the same steps (multiples of `every`, and the last step).
    chunk_start = start
    last: dict = {}
    lines = Progress(f"extract/rank{rank}", ecfg.steps, start)  # across the checkpoint chunks
    while chunk_start < ecfg.steps:
        chunk_end = min(ecfg.steps, (chunk_start // every + 1) * every)
        res = run_loop(
            engine,
            batches,
            step_fn,
            chunk_end,
            start_step=chunk_start,
            log_every=min(ecfg.log_every, chunk_end - chunk_start),
            name=f"extract/rank{rank}",
            device=device,
            progress=lines,
        )
        samples[0] += res.samples * world
        step_s.extend(res.step_s)
        last = res.last
        chunk_start = chunk_end
        report(chunk_end, {**last, "samples": samples[0], "resumed_from_step": start})
        if fail_at and start == 0 and chunk_end >= fail_at:
            # Ray Train commits a checkpoint once a poll has seen every rank's report of it. A rank that raised
            # while another still uploaded its shard (slower to S3 from another node) ended the attempt with
            # the checkpoint uncommitted: the retry began at step 0 and failed here again. So every rank's
            # report is queued first (the barrier), then a poll round (every 2 s) sees them all before any
            # rank's error (the polls of one round run at slightly different moments)
            if world > 1:
                import torch.distributed as dist

                dist.barrier()
                time.sleep(5.0)
            raise RuntimeError(f"injected failure after step {chunk_end} (MMLG_FAIL_AT_STEP)")


def gather_global_batch(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor: this rank's slice of a global batch (batch first) -> the global batch (ranks in order), as
    open_clip's gather_with_grad: the functional all-gather's backward reduce-scatters (sums) every rank's
    gradient of each slice back to its rank. Each rank computes the same loss on the global batch; its gradient
    through its own slice is then world x the single-process one, and DeepSpeed's mean over the ranks makes it
    exactly the gradient one process gets on the whole batch (tests/test_global_batch.py). Tensors of one dtype
    travel in one collective (the step's features and the teacher's: one all-gather, one reduce-scatter)."""
    import torch
    import torch.distributed as dist
    from torch.distributed._functional_collectives import all_gather_single  # torch's replacement for

    groups: dict = {}  # torch.distributed.nn's all_gather
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    out: list = [None] * len(tensors)
    for idx in groups.values():
        flat = [tensors[i].reshape(len(tensors[i]), -1) for i in idx]
        cols = [f.shape[1] for f in flat]
        full = all_gather_single(torch.cat(flat, 1).contiguous(), 0, dist.group.WORLD)
        for i, part in zip(idx, full.split(cols, 1)):
            out[i] = part.reshape(len(part), *tensors[i].shape[1:])
    return out


def _beside(path, suffix: str) -> str:
    """`dir/name.ext` -> `dir/name<suffix>`, for a local path (made absolute) or a URI."""
    if stor.is_uri(path):
        head, _, tail = str(path).rstrip("/").rpartition("/")
        return f"{head}/{tail.rsplit('.', 1)[0] if '.' in tail else tail}{suffix}"
    p = Path(os.path.expanduser(str(path)))
    return str((p.parent / f"{p.stem}{suffix}").resolve())


def extract_on_ray(
    cfg: Config,
    ancestor,
    out_path,
    method: str | None = None,
    *,
    storage: str | None = None,
    name: str | None = None,
    mode: str = "fixed",
    step_times: bool = False,
) -> dict:
    """Run the extraction as a Ray Train job and write the learngene file (a local path or a URI).
    Returns its cost. Every rank's ZeRO checkpoints go to `storage`; the driver reads the last one
    back from there (never from a worker's disk) and consolidates it into the file. mode=elastic
    also distils the grid's descendant shapes at every step (pipeline.extract's loss). step_times: the
    cost also holds rank 0's seconds of every step (`step_s`, benchmarks/extraction_throughput.py)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mmlg_ray.method.learngene import aux_spec
    from mmlg_ray.engine.pipeline import (
        build_aux,
        check_mode,
        elastic_plan,
        extraction_cost,
        extraction_fingerprint,
        finish_extraction,
    )
    from mmlg_ray.distributed.actors import train_run_ends
    from mmlg_ray.distributed.data import skipped_count, trainer_datasets
    from mmlg_ray.distributed.logs import train_logging
    from mmlg_ray.distributed.settings import check_storage, ensure_ray, worker_resources
    from mmlg_ray.distributed.train_restarts import TrainRestarts, read_restarts

    rs = cfg.ray
    check_precision(cfg)
    ensure_ray(cfg)
    method = method or cfg.learngene.method
    check_mode(mode)
    fp = extraction_fingerprint(cfg, mode, "ray.extraction", "ray.num_workers")
    if storage is None:  # standalone: ray.storage_path, else beside the learngene file (lg.safetensors -> lg.ray/)
        storage = storage_uri(cfg, "") if cfg.ray.storage_path else _beside(out_path, ".ray")
    check_storage(cfg, storage)  # workers write their ZeRO shards there: shared by every node
    name = name or (f"extract-{method}-{fp}" if mode == "fixed" else f"extract-{method}-{mode}-{fp}")
    resources = worker_resources(rs)  # CPUs, a GPU, ray.worker_resources (e.g. on-demand nodes only)
    datasets, data_kw, skips = trainer_datasets(cfg, ancestor)  # a streamed corpus only
    restarts_key = f"train-restarts-{name}-{uuid.uuid4().hex[:8]}"
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "ancestor": ray.put(ancestor),
            "method": method,
            "mode": mode,
            "step_times": step_times,
            "fail_at_step": os.environ.get("MMLG_FAIL_AT_STEP"),
        },
        scaling_config=ScalingConfig(num_workers=rs.num_workers, use_gpu=rs.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            storage_path=storage,
            name=name,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=rs.max_failures),
            logging_config=train_logging(),
            callbacks=[TrainRestarts(restarts_key, rs.num_workers)],  # restarts by cause, lost work
        ),
        datasets=datasets,
        **data_kw,
    )
    t0 = time.perf_counter()
    try:
        with train_run_ends():  # returned or raised: the run's controller, workers and data actors are gone
            result = trainer.fit()
            driver_wall = time.perf_counter() - t0  # the run only, not the wait for its actors to end
    except BaseException:
        if skips is not None:  # the corpus's skip counter too (skipped_count ends it on success)
            ray.kill(skips)
        raise
    finally:
        restarts = read_restarts(restarts_key)  # read (and the key deleted) however the run ended
        if restarts["preemptions"] or restarts["retries"]:
            log.warning("extraction %s: restarted after %s", method, restarts)
    skipped = skipped_count(skips)
    if result.error:
        raise result.error
    metrics = result.metrics or {}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mmlg_ray.distributed.logs import captured_output

    with result.checkpoint.as_directory() as d:
        with captured_output("DeepSpeed's zero_to_fp32"):  # its progress prints, shown only if it fails
            state = get_fp32_state_dict_from_zero_checkpoint(d, tag=TAG)
        progress = json.loads((Path(d) / "progress.json").read_text())
    aux = build_aux(cfg, ancestor, method, fit=False, mode=mode)
    missing, unexpected = aux.load_state_dict(state, strict=False)
    if [m for m in missing if m != "clip.attn_mask"] or unexpected:
        raise RuntimeError(f"consolidated ZeRO state does not match the auxiliary CLIP: {missing[:3]} {unexpected[:3]}")
    spec = aux_spec(cfg, ancestor.spec)
    samples = progress["step"] * max(1, cfg.learngene.extraction.batch_size // rs.num_workers) * rs.num_workers
    plan = elastic_plan(cfg, ancestor.spec) if mode == "elastic" else None
    cost = extraction_cost(
        spec, ancestor.spec, progress["step"], samples, progress["wall_s"], rs.num_workers, metrics, elastic=plan
    )
    cost.update(
        driver_wall_s=driver_wall,
        zero_stage=rs.extraction.zero_stage,
        backend="ray_train+deepspeed",
        precision=cfg.precision,
        final_lr=metrics.get("lr"),
        resumed_from_step=int(metrics.get("resumed_from_step", 0)),
        **restarts,  # Ray Train's restarts by cause, and the device-seconds they threw away
    )
    if step_times:
        cost["step_s"] = list(metrics.get("step_s") or [])
    cost["skipped_samples"] = skipped  # corrupt / incomplete samples of a streamed corpus, dropped by the reader
    with stor.writing(out_path) as local:  # the driver writes the file (a URI: uploaded once complete)
        finish_extraction(aux, local, cost)
    log.info(
        "extraction %s%s: wrote %s (%d steps, %.1f device-s)",
        method,
        "/elastic" if plan else "",
        out_path,
        cost["steps"],
        cost["device_s"],
    )
    return cost
