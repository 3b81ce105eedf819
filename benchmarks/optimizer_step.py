"""What one AdamW step costs on a descendant's text tower, per implementation, on one CPU thread.

    .venv/bin/python benchmarks/optimizer_step.py [--width 128] [--repeats 20]

A text tower carries open_clip's token embedding (49408 x width), so every fine-tuning and pre-training
step updates it whole. PyTorch's CPU default (the for-loop AdamW) walks it in a dozen elementwise passes;
foreach batches them; fused does one pass. The project uses fused where PyTorch has it
(mmlg_ray.method.train.adamw). Gradient clipping is timed apart. Measured 2026-12-07 on the 2-core CPU machine,
width 128: for-loop 35.9 ms, foreach 14.9 ms, fused 4.7 ms per step (clipping 2.5-2.8 ms each).
"""

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(1)
    for name, kw in (("for-loop (CPU default)", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        torch.manual_seed(0)
        emb = torch.nn.Parameter(torch.randn(49408, a.width))
        w = torch.nn.Parameter(torch.randn(a.width, 4 * a.width))
        opt = torch.optim.AdamW(
            [{"params": [w], "weight_decay": 0.05}, {"params": [emb], "weight_decay": 0.0}], lr=1e-3, **kw
        )
        g_emb, g_w = torch.randn_like(emb) * 1e-3, torch.randn_like(w)
        clip = step = 0.0
        for i in range(5 + a.repeats):
            emb.grad, w.grad = g_emb.clone(), g_w.clone()
            t0 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_([w, emb], 1.0)
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if i >= 5:  # after warm-up
                clip, step = clip + t1 - t0, step + t2 - t1
        print(f"{name:24s} step {1e3 * step / a.repeats:6.1f} ms   clip {1e3 * clip / a.repeats:4.1f} ms")


if __name__ == "__main__":
    main()
