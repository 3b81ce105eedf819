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
from mmlg_ray.errors import JobFailed, exits_cleanly


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

    # every bad path, file or data set is reported now, before Ray starts, a folder is made or a node
    # boots: a dry run checks what the real run checks, then prints its plan
    field = "--output" if a.output else "output_dir"
    preflight.sweep(cfg, out, output_field=field, backend=a.backend, dry_run=a.dry_run)
    if a.dry_run:
        from mmlg_ray.engine.plan import format_plan, make_plan

        print(format_plan(make_plan(cfg, backend=a.backend)))
        return 0
    from mmlg_ray.cli import run_sweep
    from mmlg_ray.stopping import sigterm_as_ctrl_c

    if a.backend == "local":
        from mmlg_ray.engine.job import LocalExecutor as Executor
    else:
        from mmlg_ray.distributed.sweep import RayExecutor as Executor
    try:
        with sigterm_as_ctrl_c():  # `ray job stop` stops the sweep as Ctrl-C does: its state is saved
            path = run_sweep(cfg, out, Executor(), resume=a.resume, fresh=a.fresh)
    except KeyboardInterrupt:  # stopped outside Tune's graceful stop (a stage before or after the trials)
        raise JobFailed("the job was stopped (Ctrl-C or SIGTERM); rerun with --resume to continue it") from None
    print(f"results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
