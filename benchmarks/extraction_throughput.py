"""Extraction step throughput: Ray Train + DeepSpeed ZeRO (N workers) against the same steps in a
bare PyTorch loop in one process, measured in the same run. Run by hand (or `make bench`):

    .venv/bin/python benchmarks/extraction_throughput.py [--steps 30] [--warmup 5] [--repeats 3] [--set k=v ...]

Same work on both sides: the same model, global batch, steps, data and loss (pipeline.extract's loop,
and extract_on_ray's workers). Same cores: the bare loop runs with ray.num_workers x ray.cpus_per_worker
torch threads (--threads to change), each Ray worker with its ray.cpus_per_worker.

Each repeat runs both, in alternating order (bare first, then Ray first, ...), so a change of load
on a shared machine hits both. Per repeat:
  * in-loop: samples/s over the steps after the first --warmup ones (each step's own time: data,
    forward, backward, optimizer, logging; not the checkpoints between chunks);
  * end-to-end: from the call to the learngene file written (Ray: TorchTrainer start-up, DeepSpeed
    initialisation, checkpoints, ZeRO consolidation; the Ray instance itself is started before);
  * achieved FLOP/s: the cost model's analytic extraction FLOPs (student forward + backward, teacher
    forward; cost.extraction_flops) of the measured steps over their time, and MFU against the
    machine's peak measured here: the best of several large fp32 matmuls at the same thread count.
Prints the median and the min-max of every figure, the load average before and after, and the thread
counts. --json writes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def matmul_peak(threads: int, n: int = 2048, repeats: int = 8) -> float:
    """FLOP/s of the best of `repeats` n x n fp32 matmuls with `threads` torch threads."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        return 2 * n**3 / best
    finally:
        torch.set_num_threads(prev)


def bare_run(cfg, ancestor, out_path, threads: int) -> tuple[list[float], float]:
    """pipeline.extract's loop in this process with `threads` torch threads: (step seconds, end-to-end s)."""
    import torch

    from mmlg_ray.engine.pipeline import build_aux, corpus, extraction_cost, finish_extraction, _close
    from mmlg_ray.engine.pipeline import aux_spec
    from mmlg_ray.method.train import TorchEngine, extraction_step, run_loop

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        ecfg = cfg.learngene.extraction
        torch.manual_seed(cfg.seed)
        aux = build_aux(cfg, ancestor)
        teacher = ancestor.model(torch.device("cpu"))
        for p in teacher.parameters():
            p.requires_grad_(False)
        data = corpus(cfg)
        spec = aux.learngene.meta.model_spec
        engine = TorchEngine(aux, ecfg, precision=cfg.precision)
        batches = data.batches(ecfg.batch_size, spec.image_size, spec.context_length, seed=cfg.seed)
        step_fn = extraction_step(aux, teacher, ecfg.distill_weight, ecfg.distill_temperature, ecfg.feature_weight)
        try:
            res = run_loop(engine, batches, step_fn, ecfg.steps, log_every=ecfg.log_every, name="extract/bare")
        finally:
            _close(batches)
        cost = extraction_cost(
            aux_spec(cfg, ancestor.spec), ancestor.spec, res.steps, res.samples, res.seconds, 1, res.last
        )
        finish_extraction(aux, out_path, cost)
        return res.step_s, time.perf_counter() - t0
    finally:
        torch.set_num_threads(prev)


def ray_run(cfg, ancestor, out_path, storage: str, name: str) -> tuple[list[float], float]:
    from mmlg_ray.distributed.extract import extract_on_ray

    t0 = time.perf_counter()
    cost = extract_on_ray(cfg, ancestor, out_path, storage=storage, name=name, step_times=True)
    return cost["step_s"], time.perf_counter() - t0


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "all": xs}


def main(argv=None):
    from mmlg_ray.method.ancestor import get_ancestor
    from mmlg_ray.cli import add_config_args, config_from_args
    from mmlg_ray.cost import extraction_flops
    from mmlg_ray.distributed.settings import ensure_ray
    from mmlg_ray.engine.pipeline import aux_spec, setup_runtime

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--steps", type=int, default=30, help="measured steps per run (after the warm-up)")
    p.add_argument("--warmup", type=int, default=5, help="steps run first and left out of the in-loop figures")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the bare loop (default: ray.num_workers x ray.cpus_per_worker)",
    )
    p.add_argument("--json", default=None, help="write every number to this file")
    a = p.parse_args(argv)
    total = a.warmup + a.steps
    # one checkpoint, at the end (as a run whose checkpoint_every is at least its steps); one log line
    a.overrides += [
        f"learngene.extraction.steps={total}",
        f"learngene.extraction.checkpoint_every={total}",
        f"learngene.extraction.log_every={total}",
    ]
    cfg = config_from_args(a)
    setup_runtime(cfg)
    rs = cfg.ray
    threads = a.threads or max(1, int(rs.num_workers * rs.cpus_per_worker))
    anc = get_ancestor(cfg)
    ensure_ray(cfg)  # started once, outside every timing
    bs = cfg.learngene.extraction.batch_size
    flops_step = extraction_flops(aux_spec(cfg, anc.spec), anc.spec, bs)  # per global batch
    load_before = os.getloadavg()
    peak_before = matmul_peak(threads)

    runs: dict[str, list] = {"bare": [], "ray": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            order = ("bare", "ray") if r % 2 == 0 else ("ray", "bare")
            for kind in order:
                out = Path(tmp) / f"{kind}{r}.safetensors"
                steps_s, e2e = (
                    bare_run(cfg, anc, out, threads)
                    if kind == "bare"
                    else ray_run(cfg, anc, out, str(Path(tmp) / "ray"), f"bench{r}")
                )
                loop = sum(steps_s[a.warmup :])
                runs[kind].append(
                    {
                        "in_loop_s": loop,
                        "e2e_s": e2e,
                        "warmup_s": sum(steps_s[: a.warmup]),
                        "step_s_median": statistics.median(steps_s[a.warmup :]),
                    }
                )
                print(
                    f"repeat {r} {kind}: in-loop {a.steps * bs / loop:.1f} samples/s, "
                    f"end-to-end {total * bs / e2e:.1f} samples/s, load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
    peak = max(peak_before, matmul_peak(threads))
    load_after = os.getloadavg()

    def figures(kind):
        rr = runs[kind]
        return {
            "in_loop_samples_s": spread([a.steps * bs / x["in_loop_s"] for x in rr]),
            "e2e_samples_s": spread([total * bs / x["e2e_s"] for x in rr]),
            "flop_s": spread([a.steps * flops_step / x["in_loop_s"] for x in rr]),
            "mfu": spread([a.steps * flops_step / x["in_loop_s"] / peak for x in rr]),
            "runs": rr,
        }

    res = {
        "bare": figures("bare"),
        "ray": figures("ray"),
        "ratio_in_loop": spread([b["in_loop_s"] / r["in_loop_s"] for b, r in zip(runs["bare"], runs["ray"])]),
        "ratio_e2e": spread([b["e2e_s"] / r["e2e_s"] for b, r in zip(runs["bare"], runs["ray"])]),
        "threads_bare": threads,
        "workers": rs.num_workers,
        "threads_per_worker": int(rs.cpus_per_worker),
        "zero_stage": rs.extraction.zero_stage,
        "steps": a.steps,
        "warmup": a.warmup,
        "repeats": a.repeats,
        "global_batch": bs,
        "flops_per_step": flops_step,
        "matmul_peak_flop_s": peak,
        "load_before": load_before,
        "load_after": load_after,
        "cpus": os.cpu_count(),
    }
    s = cfg.ancestor.spec
    print(
        f"\nextraction throughput: {a.steps} steps (+{a.warmup} warm-up) x {bs} samples (global batch), "
        f"{s.image_depth}+{s.text_depth} layers x {s.image_width}, {a.repeats} repeats, median [min-max]"
    )
    print(
        f"threads: bare {threads}; Ray {rs.num_workers} workers x {int(rs.cpus_per_worker)}. "
        f"{flops_step / 1e9:.2f} GFLOP per step; fp32 matmul peak at {threads} threads "
        f"{peak / 1e9:.1f} GFLOP/s"
    )
    print(
        f"load average (1, 5, 15 min): before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
        f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f} on {os.cpu_count()} CPUs"
    )

    def fmt(d, scale=1.0, f="{:.1f}"):
        return f"{f.format(d['median'] * scale)} [{f.format(d['min'] * scale)}-{f.format(d['max'] * scale)}]"

    print(f"{'':<40}{'in-loop samples/s':>22}{'end-to-end samples/s':>24}{'GFLOP/s':>22}{'MFU %':>20}")
    for kind, name in (
        ("bare", f"bare PyTorch, 1 process, {threads} threads"),
        ("ray", f"Ray Train + DeepSpeed ZeRO-{rs.extraction.zero_stage}, {rs.num_workers} workers"),
    ):
        f = res[kind]
        print(
            f"{name:<40}{fmt(f['in_loop_samples_s']):>22}{fmt(f['e2e_samples_s']):>24}"
            f"{fmt(f['flop_s'], 1e-9):>22}{fmt(f['mfu'], 100):>20}"
        )
    print(
        f"ratio Ray/bare: in-loop {fmt(res['ratio_in_loop'], f='{:.2f}')}x, "
        f"end-to-end {fmt(res['ratio_e2e'], f='{:.2f}')}x"
    )
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
