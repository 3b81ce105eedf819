"""The report's result sections, one function each, from ReportData (the loaded run)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mmlg_ray import cost as costmod
from mmlg_ray.report import stats
from mmlg_ray.config import Config, ModelSpec
from mmlg_ray.report.texts import para, section, words
from mmlg_ray.report.render import Bullets, Figure, Para, Section, Table
from mmlg_ray.report.spend import TARGET_FRACTION, cost_to_target, priced_dtype, spend_summary, spend_table
from mmlg_ray.report.tables import _ci, cell_table
from mmlg_ray.report.costs import compare_to_baselines, cost_table, equal_accuracy_table
from mmlg_ray.report.notes import equal_accuracy_blocks, fixed_vs_elastic, reading_note
from mmlg_ray.report.plots import (
    plot_costs,
    plot_equal_accuracy,
    plot_pareto,
    plot_score_vs_money,
    plot_score_vs_params,
    plot_spend,
)


@dataclass
class ReportData:
    """What a section builder reads: the run's tables and config, the validation-chosen trials (ft),
    the price table, and `tables`, where a builder leaves DataFrames to be written as
    OUTPUT/report/<name>.parquet."""

    out: Path
    trials: pd.DataFrame
    stages: pd.DataFrame
    hist: pd.DataFrame
    cfg: Config
    anc_meta: dict
    anc_spec: ModelSpec
    ft: pd.DataFrame
    prices: dict
    tables: dict = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return sorted(self.ft.task.unique())

    def rate(self) -> str:
        rc = self.cfg.report
        return (
            f"{rc.device} at ${costmod.money(1.0, rc.device, rc.pricing, self.prices):.3g} per device-hour "
            f"({rc.pricing})"
        )


def sec_reading(d: ReportData) -> list[Section]:
    return [section("reading", reading_note(d.trials, d.ft))]


def sec_scores(d: ReportData) -> list[Section]:
    out = []
    for task in d.tasks:
        t = d.ft[d.ft.task == task]
        out.append(
            section(
                "scores",
                [
                    para(
                        "scores", dataset=t.dataset.iloc[0], metric=t.score_metric.iloc[0], confidence=stats.CONFIDENCE
                    ),
                    Figure(
                        f"score_vs_params_{task}.png", plot_score_vs_params(d.ft, task), f"score against size, {task}"
                    ),
                ],
                group="scores_group",
                task=task,
            )
        )
    return out


def sec_spend(d: ReportData) -> list[Section]:
    spend = spend_table(d.trials, d.stages, d.cfg, d.prices)
    summary = spend_summary(spend)
    d.tables["spend"] = spend
    dtype = priced_dtype(d.cfg, d.prices)
    long = spend.rename(
        columns={
            "flops": "FLOPs (run)",
            "device_s": "device-s (measured)",
            "device_h": "device-h (measured)",
            "money": "$ (measured)",
            "plan_device_h": f"device-h (FLOPs at {dtype})",
            "plan_money": "$ (from FLOPs)",
        }
    )
    return [
        section(
            "spend",
            [
                para("spend", rate=d.rate(), dtype=dtype),
                para("sharing_rule"),
                Figure(
                    "spend.png",
                    plot_spend(summary[summary.arm != "(ancestor)"], d.cfg.report.device),
                    "device-hours per arm and stage",
                ),
                Table(summary, "Per arm: device-hours by stage and totals"),
                Table(long.drop(columns=["method"]), "Per arm and stage (runs: stage runs, or trials for finetune)"),
            ],
        )
    ]


def sec_cost_to_target(d: ReportData) -> list[Section]:
    res, cells, targets = cost_to_target(d.ft, d.stages, d.cfg, d.prices)
    d.tables["cost_to_target"] = res
    blocks = [para("target_rule", fraction=TARGET_FRACTION)]
    for task in d.tasks:
        r = res[res.task == task]
        for name, v in targets.get(task, {}).items():
            x = r[r.target == name]
            best = x[x.cheapest]
            if len(best):
                b = best.iloc[0]
                blocks.append(
                    para(
                        "target_reached",
                        task=task,
                        name=name,
                        value=v,
                        arm=b.arm,
                        depth=int(b.depth),
                        width=int(b.width),
                        mean=b["mean"],
                        ci=_ci(b.lo, b.hi),
                        alone=b.money_alone,
                        hours=b.device_h_alone,
                        shared=b.money_shared,
                    )
                )
            else:
                blocks.append(para("target_missed", task=task, name=name, value=v))
        show = r.assign(
            **{
                "95% CI": [_ci(a, b) if ok else "" for a, b, ok in zip(r.get("lo", []), r.get("hi", []), r.reached)],
                "shape": [
                    f"d{int(a)} w{int(b)}" if ok else "not reached"
                    for a, b, ok in zip(r.get("depth", []), r.get("width", []), r.reached)
                ],
            }
        )
        cols = [
            "target",
            "target_score",
            "arm",
            "shape",
            "mean",
            "95% CI",
            "n",
            "surely",
            "device_h_alone",
            "money_alone",
            "device_h_shared",
            "money_shared",
            "cheapest",
        ]
        show = show[[c for c in cols if c in show]].rename(
            columns={
                "target_score": "target score",
                "mean": "test mean",
                "device_h_alone": "device-h alone",
                "money_alone": "$ alone",
                "device_h_shared": "device-h in sweep",
                "money_shared": "$ in sweep",
            }
        )
        blocks += [
            Figure(
                f"score_vs_money_{task}.png",
                plot_score_vs_money(cells, targets.get(task, {}), task),
                f"score against money, {task}",
            ),
            Table(show, f"{task}: the cheapest shape per arm"),
        ]
    return [section("cost_to_target", blocks)]


def sec_pretraining(d: ReportData) -> list[Section]:
    ct = cost_table(d.trials, d.stages, d.cfg, d.anc_spec)
    d.tables["cost"] = ct
    mm = ct.set_index("method")
    blocks = []
    if "mmlg" in mm.index and "pt_ft" in mm.index:
        r = mm.loc["mmlg"]
        ra, rm = r.pretrain_ratio_pt_ft_over_method_analytic, r.pretrain_ratio_pt_ft_over_method_measured
        blocks.append(
            para(
                "mmlg_vs_pt_ft",
                storage=r.storage_vs_pt_ft * 100,
                shapes=int(mm.loc["pt_ft"].get("n_shapes", 0)) or "",
                analytic=ra,
                measured=words("mmlg_vs_pt_ft_measured", ratio=rm) if not math.isnan(rm) else "",
                why=words("mmlg_vs_pt_ft_small") if ra < 1 else "",
            )
        )
    show = ct[
        [
            "method",
            "stored_params",
            "storage_vs_pt_ft",
            "pretrain_flops_analytic",
            "pretrain_flops_measured",
            "pretrain_device_s_measured",
            "pretrain_ratio_pt_ft_over_method_analytic",
            "pretrain_ratio_pt_ft_over_method_measured",
        ]
    ].rename(
        columns={
            "stored_params": "stored params",
            "storage_vs_pt_ft": "storage / PT+FT",
            "pretrain_flops_analytic": "pre-train FLOPs (plan)",
            "pretrain_flops_measured": "pre-train FLOPs (run)",
            "pretrain_device_s_measured": "pre-train device-s (measured)",
            "pretrain_ratio_pt_ft_over_method_analytic": "PT+FT / method (FLOPs)",
            "pretrain_ratio_pt_ft_over_method_measured": "PT+FT / method (device-s)",
        }
    )
    blocks += [
        Table(show),
        Bullets([f"{r.method}: {r.note}" for r in ct.itertuples()]),
        para("exact_counts"),
        Figure("costs.png", plot_costs(ct), "storage and pre-training compute"),
    ]
    return [section("pretraining", blocks)]


def sec_pareto(d: ReportData) -> list[Section]:
    out = []
    for task in d.tasks:
        png, front = plot_pareto(d.ft, task)
        names = ", ".join(f"{r.arm} (depth {r.depth}, width {r.width})" for _, r in front.iterrows())
        out.append(
            section(
                "pareto",
                [
                    para("pareto", names=names, confidence=stats.CONFIDENCE),
                    Figure(f"pareto_{task}.png", png, f"Pareto frontier, {task}"),
                ],
                group="pareto_group",
                task=task,
            )
        )
    return out


def sec_cells(d: ReportData) -> list[Section]:
    ctab = cell_table(d.ft)
    show = (
        ctab.assign(**{"95% CI": [_ci(a, b) for a, b in zip(ctab.ci_lo, ctab.ci_hi)]})[
            ["task", "depth", "width", "arm", "params", "n", "mean", "95% CI", "std", "val_mean", "score_metric"]
        ].rename(columns={"mean": "test mean", "val_mean": "val mean"})
        if len(ctab)
        else ctab
    )
    comp, note = compare_to_baselines(d.ft)
    if len(comp):
        d.tables["comparisons"] = comp
        comp_show = comp.assign(**{"diff 95% CI": [_ci(a, b) for a, b in zip(comp.diff_lo, comp.diff_hi)]})[
            [
                "task",
                "depth",
                "width",
                "arm",
                "vs",
                "family",
                "arm_mean",
                "vs_mean",
                "diff",
                "diff 95% CI",
                "n_arm",
                "n_vs",
                "p_welch",
                "p_holm",
                "p_bh",
                "verdict",
            ]
        ]
    else:
        comp_show = comp
    return [
        section("cells", [para("cells", confidence=stats.CONFIDENCE), Table(show)]),
        section("comparisons", [Para(note.replace("*", ""), key="comparisons_verdict"), Table(comp_show)]),
        section("fixed_vs_elastic", fixed_vs_elastic(d.ft)),
    ]


def sec_equal_accuracy(d: ReportData) -> list[Section]:
    eq, eq_res = equal_accuracy_table(d.ft, d.stages)
    if len(eq):
        d.tables["equal_accuracy"] = eq
    blocks = [para("equal_accuracy")]
    blocks += equal_accuracy_blocks(eq)
    if eq_res:
        blocks.append(
            Figure(
                "equal_accuracy.png",
                plot_equal_accuracy(d.ft, d.stages, eq_res),
                "PT+FT's ladder against each learngene arm",
            )
        )
    return [section("equal_accuracy", blocks)]
