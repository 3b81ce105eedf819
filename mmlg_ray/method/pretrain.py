"""Contrastive pre-training of a CLIP on the corpus (the local ancestor's and pt_ft's pre-training)
and the corpus itself: the layer below the pipeline and the ancestor, which both use it."""

from __future__ import annotations

import torch

from mmlg_ray import cost as costmod
from mmlg_ray.config import Config, ModelSpec, TrainConfig
from mmlg_ray.data import load_dataset
from mmlg_ray.method.models import build_model
from mmlg_ray.method.train import TorchEngine, contrastive_step, resolve_device, run_loop


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
def pretrain_clip(
    cfg: Config, spec: ModelSpec, tcfg: TrainConfig, seed: int = 0, name: str = "pretrain", device=None, data=None
) -> tuple[dict, dict]:
    """Contrastive pre-training of a CLIP of `spec` on the corpus, in cfg.precision (fp32 master
    weights). Returns (state dict, cost)."""
    device = device or resolve_device(cfg.device)
    torch.manual_seed(seed)
    model = build_model(spec, "image_text").to(device)
    data = data or corpus(cfg)
    engine = TorchEngine(model, tcfg, precision=cfg.precision)
    batches = data.batches(tcfg.batch_size, spec.image_size, spec.context_length, seed=seed)
    try:
        res = run_loop(
            engine, batches, contrastive_step(model), tcfg.steps, log_every=tcfg.log_every, name=name, device=device
        )
    finally:
        close_batches(batches)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k != "attn_mask"}
    c = {
        "steps": res.steps,
        "samples": res.samples,
        "wall_s": res.seconds,
        "device_s": res.seconds,
        "flops": costmod.train_flops(spec, "image_text", res.samples),
        "final_loss": res.last.get("loss"),
        "precision": cfg.precision,
        "skipped_samples": data.skipped,
    }
    return state, c


def close_batches(batches):
    """Stop a streamed set's loader workers (in-memory batches are plain generators)."""
    if hasattr(batches, "close"):
        batches.close()
