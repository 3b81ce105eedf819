"""Learngene extraction on Ray Train with DeepSpeed ZeRO.

A TorchTrainer runs the core library's extraction step in `ray.num_workers` workers (gloo on CPU,
NCCL on GPU). DeepSpeed is initialized inside each worker with the ZeRO stage, offload and bf16
from the `ray.extraction` config. Every `checkpoint_every` steps each rank saves its ZeRO shard
and all report together, so Ray merges them into one checkpoint in the run's storage path; a run
started again with the same storage path and name resumes from the latest one. At the end the
driver consolidates the ZeRO state (DeepSpeed's zero_to_fp32) into the learngene safetensors file.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

from ..config import Config
from ..config import RayConfig
from .settings import storage_uri

log = logging.getLogger("mmlg_ray")
TAG = "latest_zero"


def deepspeed_config(rs: RayConfig, ecfg, world: int) -> dict:
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
        "bf16": {"enabled": bool(ex.bf16)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if ex.offload_optimizer:  # DeepSpeed's CPU Adam is required for optimizer offload
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": ecfg.lr, "weight_decay": ecfg.weight_decay}}
    return cfg


def _train_worker(config: dict):
    """Runs in every Ray Train worker."""
    import deepspeed  # imported in the worker, never at module top level
    import ray.train
    import torch

    from ..config import config_from_dict
    from ..pipeline import build_aux, corpus, setup_runtime
    from ..train import extraction_step, lr_lambda, param_groups, run_loop

    cfg = config_from_dict(config["cfg"])
    rs = cfg.ray
    setup_runtime(cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    ancestor = config["ancestor"]
    if not hasattr(ancestor, "state"):  # an ObjectRef
        ancestor = ray.get(ancestor)
    device = torch.device("cuda", torch.cuda.current_device()) if rs.use_gpu and torch.cuda.is_available() \
        else torch.device("cpu")
    ecfg = cfg.learngene.extraction
    aux = build_aux(cfg, ancestor, config["method"], fit=True)  # same seed + fit on every rank: identical start
    ds_cfg = deepspeed_config(rs, ecfg, world)
    kwargs = {}
    if "optimizer" not in ds_cfg:
        opt = torch.optim.AdamW(param_groups(aux, ecfg.weight_decay), lr=ecfg.lr)
        kwargs = dict(optimizer=opt, lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(ecfg)))
    engine, _, _, _ = deepspeed.initialize(model=aux, model_parameters=[p for p in aux.parameters()],
                                           config=ds_cfg, dist_init_required=False, **kwargs)
    teacher = ancestor.model(device)
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

    data = corpus(cfg)
    spec = aux.learngene.meta.model_spec
    bs = ds_cfg["train_micro_batch_size_per_gpu"]
    batches = data.batches(bs * world, spec.image_size, spec.context_length, seed=cfg.seed + 7919 * start,
                           rank=rank, world=world)  # global batch; each rank takes its slice
    dtype = torch.bfloat16 if rs.extraction.bf16 else None
    step_fn = extraction_step(engine, teacher, ecfg.distill_weight, ecfg.distill_temperature, ecfg.feature_weight)
    if dtype is not None:
        inner = step_fn

        def step_fn(batch):
            images, tokens, labels = batch
            return inner((images.to(dtype), tokens, labels))

    every = ecfg.checkpoint_every
    fail_at = int(config.get("fail_at_step") or 0)  # fault injection for tests: one crash, first attempt only
    t_prev = [time.perf_counter()]
    wall = [float(config.get("prior_wall_s", 0.0))]
    samples = [0]

    def report(step: int, metrics: dict, final: bool = False):
        now = time.perf_counter()
        wall[0] += now - t_prev[0]
        t_prev[0] = now
        out = {k: float(v) for k, v in metrics.items()}
        out.update(step=step, wall_s=wall[0], world=world)
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=TAG)
            (Path(tmp) / "progress.json").write_text(json.dumps({"step": step, "wall_s": wall[0]}))
            ray.train.report(out, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    # Every rank reports at exactly the same steps (multiples of `every`, and the last step).
    chunk_start = start
    last: dict = {}
    while chunk_start < ecfg.steps:
        chunk_end = min(ecfg.steps, (chunk_start // every + 1) * every)
        res = run_loop(engine, batches, step_fn, chunk_end, start_step=chunk_start,
                       log_every=min(ecfg.log_every, chunk_end - chunk_start), name=f"extract/rank{rank}",
                       device=device)
        samples[0] += res.samples * world
        last = res.last
        chunk_start = chunk_end
        report(chunk_end, {**last, "samples": samples[0], "resumed_from_step": start})
        if fail_at and start == 0 and chunk_end >= fail_at:
            raise RuntimeError(f"injected failure after step {chunk_end} (MMLG_FAIL_AT_STEP)")


def extract_on_ray(cfg: Config, ancestor, out_path, method: str | None = None, *, storage: str | None = None,
                   name: str | None = None) -> dict:
    """Run the extraction as a Ray Train job and write the learngene file. Returns its cost."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..pipeline import aux_spec, build_aux, extraction_cost, finish_extraction
    from .settings import ensure_ray, worker_resources

    ensure_ray(cfg)
    rs = cfg.ray
    method = method or cfg.learngene.method
    fp = cfg.fingerprint("ancestor", "data.corpus", "learngene", "seed", "ray.extraction", "ray.num_workers")
    out_path = Path(out_path)
    if storage is None:  # standalone: ray.storage_path, else beside the learngene file (lg.safetensors -> lg.ray/)
        storage = storage_uri(cfg, out_path.parent) if cfg.ray.storage_path else \
            str((out_path.parent / f"{out_path.stem}.ray").resolve())
    name = name or f"extract-{method}-{fp}"
    resources = worker_resources(rs)  # CPUs, a GPU, ray.worker_resources (e.g. on-demand nodes only)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "ancestor": ray.put(ancestor), "method": method,
                           "fail_at_step": os.environ.get("MMLG_FAIL_AT_STEP")},
        scaling_config=ScalingConfig(num_workers=rs.num_workers, use_gpu=rs.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            storage_path=storage, name=name,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=rs.max_failures)),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    driver_wall = time.perf_counter() - t0
    if result.error:
        raise result.error
    metrics = result.metrics or {}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    with result.checkpoint.as_directory() as d:
        state = get_fp32_state_dict_from_zero_checkpoint(d, tag=TAG)
        progress = json.loads((Path(d) / "progress.json").read_text())
    aux = build_aux(cfg, ancestor, method, fit=False)
    missing, unexpected = aux.load_state_dict(state, strict=False)
    if [m for m in missing if m != "clip.attn_mask"] or unexpected:
        raise RuntimeError(f"consolidated ZeRO state does not match the auxiliary CLIP: {missing[:3]} {unexpected[:3]}")
    spec = aux_spec(cfg, ancestor.spec)
    samples = progress["step"] * max(1, cfg.learngene.extraction.batch_size // rs.num_workers) * rs.num_workers
    cost = extraction_cost(spec, ancestor.spec, progress["step"], samples, progress["wall_s"], rs.num_workers,
                           metrics)
    cost.update(driver_wall_s=driver_wall, zero_stage=rs.extraction.zero_stage, backend="ray_train+deepspeed",
                resumed_from_step=int(metrics.get("resumed_from_step", 0)))
    finish_extraction(aux, out_path, cost)
    log.info("extraction %s: wrote %s (%d steps, %.1f device-s)", method, out_path, cost["steps"], cost["device_s"])
    return cost
