"""The main job: ancestor -> learngene extraction(s) -> descendant sweep -> Parquet tables -> report.

    ray job submit --working-dir . -- python jobs/sweep.py --config configs/local.yaml
    python jobs/sweep.py --config configs/local.yaml [--set k=v ...] [--output DIR] [--resume] [--dry-run]

--backend ray (default) runs extraction on Ray Train + DeepSpeed ZeRO and the sweep on Ray Tune
(connecting to the cluster it was submitted to, or starting a local Ray instance);
--backend local runs every stage in this process, one trial after another.
"""

import sys

from mmlg_ray.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main())
