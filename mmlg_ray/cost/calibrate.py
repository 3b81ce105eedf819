"""Calibration: counted FLOPs of a real step, step timing, and the utilization that turns FLOPs into device-hours."""

from __future__ import annotations


from mmlg_ray.config import ModelSpec
from mmlg_ray.cost.prices import peak_flops
from mmlg_ray.cost.flops import train_flops


# --------------------------------------------------------------------------- calibration
def counted_flops(fn) -> int:
    """FLOPs torch actually dispatches in one call of fn() (torch.utils.flop_counter: matmuls,
    convolutions and attention; elementwise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def time_step(fn, *, warmup: int = 2, repeats: int = 5, sync=None) -> dict:
    """Seconds per call of fn() after `warmup` calls: median and spread (min, max) over `repeats`.
    sync: called after each call (e.g. torch.cuda.synchronize) so GPU time is counted."""
    import statistics
    import time

    for _ in range(warmup):
        fn()
    if sync:
        sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        ts.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "repeats": repeats}


def calibrate_utilization(
    flops_per_step: float, seconds_per_step: float, device: str, dtype: str, table: dict | None = None
) -> dict:
    """Achieved FLOP/s of a measured step and the utilisation it implies against the table's peak of
    (device, dtype): the number to put in the table (or report.prices) for that device. Honest only
    if the step was measured on that device in that dtype, at the model size the plan prices."""
    achieved = flops_per_step / seconds_per_step
    peak = peak_flops(device, dtype, table)
    return {"achieved_flops_per_s": achieved, "peak_flops_per_s": peak, "utilization": achieved / peak}


def measure_training_step(
    spec: ModelSpec, batch: int = 8, precision: str = "fp32", device: str = "cpu", warmup: int = 2, repeats: int = 5
) -> dict:
    """One CLIP training step (forward, contrastive loss, backward, AdamW) of `spec` on random data,
    timed (time_step) and counted twice: the analytic model's train_flops and torch's flop counter.
    Returns both counts, the timing, and achieved FLOP/s by the analytic count."""
    import torch

    from mmlg_ray.method import precision as amp
    from mmlg_ray.method.models import build_model
    from mmlg_ray.method.train import adamw, clip_loss

    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model(spec, "image_text").to(dev).train()
    opt = adamw(list(model.parameters()), 1e-4, dev)
    x = torch.randn(batch, 3, spec.image_size, spec.image_size, device=dev)
    t = torch.randint(1, spec.vocab_size - 1, (batch, spec.context_length), device=dev)

    def step():
        with amp.autocast(dev, precision):
            img, txt, scale = model(x, t)
        clip_loss(img.float(), txt.float(), scale.float()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    counted = counted_flops(step)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    tm = time_step(step, warmup=warmup, repeats=repeats, sync=sync)
    analytic = train_flops(spec, "image_text", batch)
    return {
        "batch": batch,
        "precision": precision,
        "device": device,
        "analytic_flops": analytic,
        "counted_flops": counted,
        **tm,
        "achieved_flops_per_s": analytic / tm["median_s"],
    }
