"""The main job: ancestor -> learngene extraction(s) -> descendant sweep -> Parquet tables -> report.

    ray job submit --working-dir . -- python jobs/sweep.py --config configs/local.yaml
    python jobs/sweep.py --config configs/local.yaml [--set k=v ...] [--output DIR] [--resume] [--dry-run]

--backend ray (default) runs extraction on Ray Train + DeepSpeed ZeRO and the sweep on Ray Tune
(connecting to the cluster it was submitted to, or starting a local Ray instance);
--backend local runs every stage in this process, one trial after another.
"""

from __future__ import annotations

import argparse
import sys

from mmlg_ray.cli import ArgumentParser, add_config_args, config_from_args
from mmlg_ray.errors import exits_cleanly


@exits_cleanly
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--output", default=None, help="output folder or URI (default: output_dir from the config)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep from the output folder")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start this experiment over: delete its earlier Tune state (stage artifacts are kept)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan and its predicted cost for --backend (assumptions listed); train nothing",
    )
    p.add_argument("--backend", choices=["ray", "local"], default="ray")
    a = p.parse_args(argv)
    cfg = config_from_args(a)
    out = a.output or cfg.output_dir
    from mmlg_ray.engine import preflight

    if a.dry_run:
        from mmlg_ray.engine.plan import format_plan, make_plan

        preflight.prices(cfg)
        print(format_plan(make_plan(cfg, backend=a.backend)))
        return 0
    # every bad path, file or data set is reported now, before Ray starts or a folder is made
    preflight.sweep(cfg, out, output_field="--output" if a.output else "output_dir", backend=a.backend)
    from mmlg_ray.cli import run_sweep

    if a.backend == "local":
        from mmlg_ray.engine.job import LocalExecutor as Executor
    else:
        from mmlg_ray.distributed.sweep import RayExecutor as Executor
    path = run_sweep(cfg, out, Executor(), resume=a.resume, fresh=a.fresh)
    print(f"results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
