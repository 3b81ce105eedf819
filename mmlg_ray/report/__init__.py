"""The cost-comparison report of a finished sweep: report.html (self-contained, plots embedded),
report.md (same content, plots beside it as PNG) and its tables as Parquet, under OUTPUT/report/.

    python jobs/report.py OUTPUT

Layers, lowest first: `stats` (confidence intervals, tests), `tables` (results), `costs` (compute per
arm), `spend` (money), `plots`, `notes`; `sections` and `provenance` turn them into sections, which
`render` writes through the templates in mmlg_ray/templates; `build` runs it all.
"""

from mmlg_ray.report import stats
from mmlg_ray.report.build import SECTIONS, build_output_report, build_report, load_report_data
from mmlg_ray.report.costs import pretrain_share
from mmlg_ray.report.sections import ReportData
from mmlg_ray.report.tables import final_trials, normalize, selection_split

__all__ = [
    "SECTIONS",
    "ReportData",
    "build_output_report",
    "build_report",
    "final_trials",
    "load_report_data",
    "normalize",
    "pretrain_share",
    "selection_split",
    "stats",
]
