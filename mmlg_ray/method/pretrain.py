"""Contrastive pre-training of a CLIP on the corpus (the local ancestor's and pt_ft's pre-training)
and the corpus itself: the layer below the pipeline and the ancestor, which both use it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from mmlg_ray import cost as costmod
from mmlg_ray.config import Config, ModelSpec, TrainConfig
from mmlg_ray.data import load_dataset
from mmlg_ray.method.models import build_model
from mmlg_ray.method.train import LoopResult, Progress, TorchEngine, contrastive_step, resolve_device, run_loop

log = logging.getLogger("mmlg_ray")


def corpus(cfg: Config):
    """The pre-training / extraction corpus, its train and validation splits: in memory for the packaged kinds and a
    `mixture` of them (local default: Fashion-MNIST + openclipart, concatenated as uint8 3 x S x S
    images at the ancestor's image size), streamed otherwise. Tux Paint is never part of it: it is a
    downstream task that no training stage before fine-tuning sees."""
    # train + val: no stage reads the corpus's validation split, so nothing of it is held back
    return load_dataset(
        cfg.data.corpus,
        "trainval",
        image_size=cfg.ancestor.spec.image_size,
        cache_dir=cfg.cache_path,
        field_name="data.corpus",
    )


# --------------------------------------------------------------------------- pre-training (CLIP loss)
@dataclass
class Checkpointing:
    """Periodic checkpoints of a training loop, wherever the caller keeps them: every `every` steps
    `save(snapshot)` writes one (model, optimizer and schedule, step, samples and seconds so far);
    `load()` returns the latest, or None. `after_save(step, start)`: tests' fault injection."""

    every: int
    load: Callable[[], dict | None]
    save: Callable[[dict], None]
    after_save: Callable[[int, int], None] | None = None


def checkpointed_loop(
    engine: TorchEngine,
    batches_at: Callable[[int], object],
    loss_fn: Callable,
    steps: int,
    ckpt: Checkpointing | None,
    *,
    log_every: int,
    name: str,
    device=None,
) -> LoopResult:
    """run_loop over `steps`, continued from `ckpt`'s latest snapshot when there is one and saving one
    every `ckpt.every` steps (not after the last). `batches_at(start)`: the batches from step `start`
    (a resumed run draws a stream of its own from there, as the extraction's does). The result counts
    the steps, samples and seconds of every attempt; `resumed_from` says where this one began."""
    model, start, total = engine.module, 0, LoopResult()
    snap = ckpt.load() if ckpt else None
    if snap and not _fits(model, snap):
        log.warning("%s: its checkpoint holds another model's tensors; starting from step 0", name)
        snap = None
    if snap:
        model.load_state_dict(snap["model"])
        engine.load_state_dict(snap["engine"])
        start = total.steps = int(snap["step"])
        total.samples, total.seconds = int(snap["samples"]), float(snap["seconds"])
        log.info("%s: resumed from its checkpoint at step %d", name, start)
    total.resumed_from = start
    batches, step = batches_at(start), start
    progress = Progress(name, steps, start)
    try:
        while step < steps:
            end = min(steps, (step // ckpt.every + 1) * ckpt.every) if ckpt else steps
            res = run_loop(
                engine, batches, loss_fn, end, start_step=step, log_every=log_every, name=name, device=device,
                progress=progress,
            )  # fmt: skip
            step = total.steps = res.steps
            total.samples += res.samples
            total.seconds += res.seconds
            total.last = res.last or total.last
            total.history += res.history
            if ckpt and step < steps:
                ckpt.save(
                    {
                        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                        "engine": engine.state_dict(),
                        "step": step,
                        "samples": total.samples,
                        "seconds": total.seconds,
                    }
                )
                if ckpt.after_save is not None:
                    ckpt.after_save(step, start)
    finally:
        close_batches(batches)
    return total


def _fits(model, snap: dict) -> bool:
    """The snapshot holds this model's tensors, name for name and shape for shape (checked before any is
    copied: a failed load_state_dict would leave the model half overwritten)."""
    try:
        own, saved = model.state_dict(), snap["model"]
        engine = snap["engine"]["optimizer"]
    except (KeyError, TypeError):
        return False
    return (
        isinstance(engine, dict)
        and set(own) == set(saved)
        and all(tuple(own[k].shape) == tuple(saved[k].shape) for k in own)
    )


def pretrain_clip(
    cfg: Config,
    spec: ModelSpec,
    tcfg: TrainConfig,
    seed: int = 0,
    name: str = "pretrain",
    device=None,
    data=None,
    checkpoint: Checkpointing | None = None,
) -> tuple[dict, dict]:
    """Contrastive pre-training of a CLIP of `spec` on the corpus, in cfg.precision (fp32 master
    weights), resumed from `checkpoint`'s latest and checkpointed by it. Returns (state dict, cost)."""
    device = device or resolve_device(cfg.device)
    torch.manual_seed(seed)
    model = build_model(spec, "image_text").to(device)
    data = data or corpus(cfg)
    engine = TorchEngine(model, tcfg, precision=cfg.precision)

    def batches_at(start):
        return data.batches(tcfg.batch_size, spec.image_size, spec.context_length, seed=seed + 7919 * start)

    res = checkpointed_loop(
        engine, batches_at, contrastive_step(model), tcfg.steps, checkpoint, log_every=tcfg.log_every, name=name,
        device=device,
    )  # fmt: skip
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k != "attn_mask"}
    return state, loop_cost(cfg, res, costmod.train_flops(spec, "image_text", res.samples), data, engine)


def loop_cost(cfg: Config, res: LoopResult, flops, data, engine: TorchEngine) -> dict:
    """A pre-training's cost: every attempt's steps, samples and seconds (a resumed run's too)."""
    return {
        "steps": res.steps,
        "samples": res.samples,
        "wall_s": res.seconds,
        "device_s": res.seconds,
        "flops": flops,
        "final_loss": res.last.get("loss"),
        "final_lr": float(engine.optimizer.param_groups[0]["lr"]),
        "precision": cfg.precision,
        "skipped_samples": data.skipped,
        "resumed_from_step": res.resumed_from,
    }


def close_batches(batches):
    """Stop a streamed set's loader workers (in-memory batches are plain generators)."""
    if hasattr(batches, "close"):
        batches.close()
