"""Extraction step throughput: Ray Train + DeepSpeed ZeRO (N workers) against the same steps in a
bare PyTorch loop in one process, measured in the same run. Run by hand:

    .venv/bin/python benchmarks/extraction_throughput.py [--steps 60] [--set k=v ...]

Prints samples/s of each and their ratio: in-loop (steady state, what ZeRO + gloo cost per step)
and end-to-end (including Ray Train's worker start-up and DeepSpeed initialisation).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    from mmlg_ray.ancestor import get_ancestor
    from mmlg_ray.cli import add_config_args, config_from_args
    from mmlg_ray.distributed.extract import extract_on_ray
    from mmlg_ray.pipeline import extract, setup_runtime

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--steps", type=int, default=60)
    a = p.parse_args(argv)
    a.overrides += [f"learngene.extraction.steps={a.steps}", f"learngene.extraction.checkpoint_every={a.steps}",
                    f"learngene.extraction.log_every={a.steps}"]
    cfg = config_from_args(a)
    setup_runtime(cfg)
    anc = get_ancestor(cfg)
    bs = cfg.learngene.extraction.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        bare = extract(cfg, anc, Path(tmp) / "bare.safetensors")
        bare_e2e = time.perf_counter() - t0
        t0 = time.perf_counter()
        ray_cost = extract_on_ray(cfg, anc, Path(tmp) / "ray.safetensors", storage=str(Path(tmp) / "ray"),
                                  name="bench")
        ray_e2e = time.perf_counter() - t0
    n = a.steps * bs
    rows = [
        ("bare PyTorch, 1 process", bare["wall_s"], bare_e2e),
        (f"Ray Train + DeepSpeed ZeRO-{cfg.ray.extraction.zero_stage}, {cfg.ray.num_workers} workers",
         ray_cost["wall_s"], ray_e2e),
    ]
    print(f"\nextraction throughput: {a.steps} steps x {bs} samples (global batch), "
          f"{cfg.ancestor.spec.image_depth}+{cfg.ancestor.spec.text_depth} layers x {cfg.ancestor.spec.image_width}")
    print(f"{'':<44}{'in-loop samples/s':>18}{'end-to-end samples/s':>22}")
    for name, loop_s, e2e_s in rows:
        print(f"{name:<44}{n / loop_s:>18.1f}{n / e2e_s:>22.1f}")
    print(f"ratio Ray/bare: in-loop {bare['wall_s'] / ray_cost['wall_s']:.2f}x, "
          f"end-to-end {bare_e2e / ray_e2e:.2f}x")


if __name__ == "__main__":
    main()
