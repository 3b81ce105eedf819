"""Short computed notes the sections print: how to read the results, fixed against elastic learngenes, the equal-accuracy blocks."""

from __future__ import annotations

import math

import pandas as pd

from mmlg_ray.report import stats
from mmlg_ray.report.render import Bullets, Table
from mmlg_ray.report.texts import para
from mmlg_ray.report.tables import MIN_SEEDS_TO_RANK, _ci, _human, selection_split
from mmlg_ray.report.costs import _off_ladder, equal_accuracy_sentence


def reading_note(trials: pd.DataFrame, ft: pd.DataFrame) -> list:
    sel = selection_split(trials)
    if sel == "val":
        first = para("selection_val")
    elif sel in ("test", "mixed"):
        first = para(
            "selection_test", some="no" if sel == "test" else "some", which="each" if sel == "test" else "such a"
        )
    else:
        first = para("selection_none")
    return [
        first,
        para("seed_note"),
        para("statistics", confidence=stats.CONFIDENCE, resamples=stats.N_RESAMPLES, min_seeds=MIN_SEEDS_TO_RANK),
        para("costs_exact"),
    ]


def fixed_vs_elastic(ft: pd.DataFrame, method: str = "mmlg") -> list:
    """Blocks: per modality, width and depth, the fixed and elastic extraction's test mean with its CI."""
    d = ft[ft.method == method]
    modes = sorted({e or "fixed" for e in d.extraction})
    if not {"fixed", "elastic"} <= set(modes):
        have = ", ".join(modes) or "none"
        return [para("fixed_vs_elastic_none", method=method, have=have)]
    rows = []
    for (mod, w, dep), g in d.groupby(["modality", "width", "depth"]):
        r = {"modality": mod, "width": w, "depth": dep}
        vals = {}
        for mode in ("fixed", "elastic"):
            x = g[g.extraction.replace("", "fixed") == mode].final_score.astype(float)
            ci = stats.mean_ci(x)
            vals[mode] = x
            r[f"{mode} mean"] = ci["mean"]
            r[f"{mode} 95% CI"] = _ci(ci["lo"], ci["hi"])
            r[f"{mode} n"] = ci["n"]
        dd = stats.diff_ci(vals["elastic"], vals["fixed"])
        r["elastic - fixed"] = dd["diff"]
        r["diff 95% CI"] = _ci(dd["lo"], dd["hi"])
        rows.append(r)
    return [
        para("fixed_vs_elastic", method=method),
        Table(pd.DataFrame(rows)),
    ]


_BOUND = {"crossing": "", "never": "> ", "always": "<= "}


def equal_accuracy_blocks(eq: pd.DataFrame) -> list:
    if eq.empty:
        return [para("equal_accuracy_none")]
    head = para("equal_accuracy_method", fit=stats.FIT, confidence=stats.CONFIDENCE, resamples=stats.N_RESAMPLES)
    items = [
        f"{r.task} d{r.depth} w{r.width}, {r.arm} (test {r.arm_score:.3g}, n={r.n_arm}): "
        + equal_accuracy_sentence(r)
        + "."
        for r in eq.itertuples()
    ]

    def bound(v, kind):
        if kind == "never":
            return f"> {_human(v)}"
        if kind == "always":
            return f"<= {_human(v)}"
        return _human(v) if not math.isnan(v) else ""

    def interval(lo, hi):
        if math.isnan(lo) or math.isnan(hi):
            return ""
        return f"[{_off_ladder(lo)}, {_off_ladder(hi)}]"

    show = pd.DataFrame(
        {
            "task": eq.task,
            "depth": eq.depth,
            "width": eq.width,
            "arm": eq.arm,
            "arm test": eq.arm_score,
            "PT+FT ladder (budgets: scores)": [f"{b}: {s}" for b, s in zip(eq.budgets, eq.ladder_scores)],
            "PT+FT FLOPs at equal accuracy": [bound(v, k) for v, k in zip(eq.pt_ft_flops, eq.kind)],
            "95% interval": [interval(a, b) for a, b in zip(eq.pt_ft_flops_lo, eq.pt_ft_flops_hi)],
            "arm FLOPs": [_human(v) for v in eq.arm_flops],
            "saved FLOPs": [
                _BOUND.get(k, "") + _human(v) if k in _BOUND and not math.isnan(v) else ""
                for v, k in zip(eq.saved_flops, eq.kind)
            ],
            "ratio": [
                _BOUND.get(k, "") + f"{v:.3g}x" if k in _BOUND and not math.isnan(v) else ""
                for v, k in zip(eq.ratio, eq.kind)
            ],
            "ratio (device-s)": [
                _BOUND.get(k, "") + f"{v:.3g}x" if k in _BOUND and not math.isnan(v) else ""
                for v, k in zip(eq.ratio_device_s, eq.kind_device_s)
            ],
        }
    )
    return [head, Bullets(items), Table(show)]
