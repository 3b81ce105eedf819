"""Build (or rebuild) the report of a finished sweep: OUTPUT/report/{report.html, report.md, cost.parquet}.

    python jobs/report.py OUTPUT
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmlg_ray.cli import ArgumentParser  # noqa: E402
from mmlg_ray.errors import exits_cleanly  # noqa: E402


@exits_cleanly
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", help="output folder of a finished sweep (holds trials.parquet)")
    a = p.parse_args(argv)
    from mmlg_ray import preflight
    preflight.report(a.output)
    from mmlg_ray.report import build_report
    path = build_report(Path(a.output))
    print(f"wrote {path}/report.html, report.md, cost.parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
