"""Building the report: the section list, loading a run's results and writing report.html, report.md and the tables under OUTPUT/report/ (atomically)."""

from __future__ import annotations

from pathlib import Path


from mmlg_ray import cost as costmod
from mmlg_ray.atomic import atomic_dir
from mmlg_ray.config import ModelSpec
from mmlg_ray.errors import UserError
from mmlg_ray.report.render import render_html, render_md
from mmlg_ray.report.sections import (
    ReportData,
    sec_cells,
    sec_cost_to_target,
    sec_equal_accuracy,
    sec_pareto,
    sec_pretraining,
    sec_reading,
    sec_scores,
    sec_spend,
)
from mmlg_ray.report.tables import final_trials, load_results
from mmlg_ray.report.provenance import sec_plan, sec_provenance, sec_rehearsal, sec_timeline
from mmlg_ray.report.costs import total_cost_per_trial


SECTIONS = [
    sec_reading,
    sec_scores,
    sec_spend,
    sec_cost_to_target,
    sec_pretraining,
    sec_pareto,
    sec_cells,
    sec_equal_accuracy,
    sec_timeline,
    sec_rehearsal,
    sec_plan,
    sec_provenance,
]


def load_report_data(out_dir) -> ReportData:
    out = Path(out_dir)
    trials, stages, hist, cfg, anc_meta = load_results(out)
    if trials.empty:
        raise UserError("OUTPUT", f"{out}/trials.parquet holds no trials", "run the sweep first")
    anc_spec = ModelSpec(**anc_meta["spec"]) if "spec" in anc_meta else cfg.ancestor.spec
    # errored trials are listed in trials.parquet, never scored or plotted (final_trials drops them)
    ft = final_trials(trials).copy()
    ft["total_flops"] = total_cost_per_trial(ft, stages)
    return ReportData(out, trials, stages, hist, cfg, anc_meta, anc_spec, ft, costmod.price_table(cfg.report))


def build_report(out_dir, sections=None) -> Path:
    """OUTPUT/report/: report.html (self-contained), report.md with its PNGs, and the tables the
    sections left (cost.parquet, spend.parquet, cost_to_target.parquet, ...)."""
    d = load_report_data(out_dir)
    secs = [s for build in (sections or SECTIONS) for s in build(d)]
    with atomic_dir(d.out / "report") as tmp:
        for s in secs:
            for f in s.figures:
                (tmp / f.name).write_bytes(f.png)
        for name, df in d.tables.items():
            if len(df):
                df.to_parquet(tmp / f"{name}.parquet", index=False)
        (tmp / "report.md").write_text(render_md(secs))
        (tmp / "report.html").write_text(render_html(secs))
    return d.out / "report"


def build_output_report(out) -> str:
    """build_report for an output folder that may be a URI (an OutputDir, or a local path): its tables
    and run files are fetched to the staging folder, the report is built there and uploaded to
    OUTPUT/report/. Returns where report.html is."""
    from mmlg_ray.storage import OutputDir

    od = out if isinstance(out, OutputDir) else OutputDir(out)
    for name in (
        "trials.parquet",
        "stages.parquet",
        "history.parquet",
        "timeline.parquet",
        "config.yaml",
        "ancestor.json",
    ):
        od.fetch(name)
    build_report(od.local)
    od.push("report")
    return od.uri("report/report.html")
