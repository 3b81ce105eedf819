"""What one suggestion of the sweep's search (mmlg_ray.engine.search.SweepPlan) costs the driver, at N and 4N trials.

    .venv/bin/python benchmarks/plan_scale.py

A paper-scale grid (252 cells x (4 search + 2 seed) trials = 1,512) and four times that, drained with
64 trials at once: total seconds, milliseconds per suggestion, missing() (the end-of-run check) and the
size of the plan's state (saved with every Tune experiment checkpoint). Linear growth: per call flat."""

import json
import time
from mmlg_ray.engine.arms import Cell
from mmlg_ray.engine.search import FINISHED, SearchSettings, SweepPlan


def run(ncells: int) -> None:
    cells = [Cell("image", d, 1, "scratch") for d in range(ncells)]
    settings = SearchSettings(
        num_samples=4,
        startup=4,
        seeds=[0, 1, 2],
        lr=(1e-4, 3e-3),
        weight_decay=(0, 0.2),
        grace_period=1,
        reduction_factor=2,
        max_t=10,
        max_concurrent=64,
    )
    plan = SweepPlan(cells, settings)
    n, calls, live = 0, 0, []
    t0 = time.perf_counter()
    while True:
        job = plan.next_trial(f"t{n}")
        calls += 1
        if job == FINISHED:
            break
        if job is None or len(live) >= 64:  # 64 trials at once: the oldest ends
            t = live.pop(0)
            plan.observe(t, 1, 0.5)
            plan.complete(t, "finished", 0.5)
            continue
        live.append(f"t{n}")
        n += 1
    dt = time.perf_counter() - t0
    t1 = time.perf_counter()
    plan.missing()
    m = time.perf_counter() - t1
    print(
        ncells,
        "cells,",
        n,
        "trials:",
        f"total {dt:.2f}s per call {1e3 * dt / calls:.2f} ms missing {m * 1e3:.0f} ms "
        f"state {len(json.dumps(plan.state())) / 1e3:.0f} kB",
    )


if __name__ == "__main__":
    run(252)
    run(1008)
