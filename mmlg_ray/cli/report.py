"""Build (or rebuild) the report of a finished sweep: OUTPUT/report/{report.html, report.md, cost.parquet}.

python jobs/report.py OUTPUT          # a folder, or a URI such as s3://bucket/run
"""

from __future__ import annotations

import argparse
import sys

from mmlg_ray.cli import ArgumentParser
from mmlg_ray.errors import exits_cleanly


@exits_cleanly
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", help="output folder or URI (s3://...) of a finished sweep (holds trials.parquet)")
    a = p.parse_args(argv)
    from mmlg_ray.engine import preflight
    from mmlg_ray import storage

    if not storage.is_uri(a.output):
        preflight.report(a.output)
    from mmlg_ray.report import build_output_report

    html = build_output_report(a.output)
    print(f"wrote {html}, report.md, cost.parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
