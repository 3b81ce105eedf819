"""Build (or rebuild) the report of a finished sweep: OUTPUT/report/{report.html, report.md, cost.parquet}.

python jobs/report.py OUTPUT          # a folder, or a URI such as s3://bucket/run
"""

import sys

from mmlg_ray.cli.report import main

if __name__ == "__main__":
    sys.exit(main())
