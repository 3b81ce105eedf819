"""Short computed notes the sections print: how to read the results, fixed against elastic learngenes, the equal-accuracy blocks."""

from __future__ import annotations

import math

import pandas as pd

from mmlg_ray.report import stats
from mmlg_ray.engine.arms import arm_name  # noqa: F401 (re-exported: tables and tests name arms through it)
from mmlg_ray.report.render import Bullets, Para, Table
from mmlg_ray.report.tables import MIN_SEEDS_TO_RANK, SEED_NOTE, _ci, _human, selection_split
from mmlg_ray.report.costs import _off_ladder, equal_accuracy_sentence


def reading_note(trials: pd.DataFrame, ft: pd.DataFrame) -> list:
    sel = selection_split(trials)
    if sel == "val":
        first = Para(
            "Every score in this report is a test score (final_score) of a trial chosen on the validation "
            "split: per cell (arm x shape), the search trial with the best validation score, then the "
            "other seeds at its hyper-parameters. The test split chose nothing. Every arm of a shape "
            "was searched on the same hyper-parameter candidates (common random numbers) until each "
            "cell's own Optuna TPE took over (ray.tune.startup_samples), so arms of a shape differ in "
            "their initialization, not in their draw.",
            lead="Selection on validation.",
        )
    elif sel in ("test", "mixed"):
        first = Para(
            "These results predate validation splits "
            f"({'no' if sel == 'test' else 'some'} search trials carry a val_score), so "
            + ("each" if sel == "test" else "such a")
            + " cell's search trial was chosen by its test "
            "score, and the scores below are optimistic. Rerun the sweep to select on validation.",
            lead="Note: selection used the test split.",
        )
    else:
        first = Para(
            "Every trial ran the configured hyper-parameters: nothing was selected, and every score "
            "is a test score (final_score).",
            lead="No hyper-parameter search.",
        )
    return [
        first,
        Para(SEED_NOTE, lead="What a seed varies."),
        Para(
            f"Means over seeds with {stats.CONFIDENCE:.0%} bootstrap intervals (scipy.stats.bootstrap, BCa, "
            f"percentile where BCa degenerates, {stats.N_RESAMPLES} resamples, seeded); every plotted score "
            "carries that interval as an error bar (a cell with one seed has none). Methods are ranked only "
            f"with at least {MIN_SEEDS_TO_RANK} seeds a side, by Welch t-tests Holm-corrected within a "
            "family of comparisons.",
            lead="Statistics.",
        ),
        Para(
            "Costs are single measurements or exact counts (a stage runs once; FLOPs are counted, not "
            "sampled): they carry no interval.",
            lead="Costs.",
        ),
    ]


def fixed_vs_elastic(ft: pd.DataFrame, method: str = "mmlg") -> list:
    """Blocks: per modality, width and depth, the fixed and elastic extraction's test mean with its CI."""
    d = ft[ft.method == method]
    modes = sorted({e or "fixed" for e in d.extraction})
    if not {"fixed", "elastic"} <= set(modes):
        have = ", ".join(modes) or "none"
        return [Para(f"(this sweep ran {method} with {have} extraction only: no comparison)")]
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
        Para(
            f"{method} test scores by extraction mode: fixed is the paper's rule (the learngene trained at the "
            "auxiliary model's shape only), elastic also distils sampled descendant shapes at each step. The "
            "verdicts (Holm-corrected) are in the section above."
        ),
        Table(pd.DataFrame(rows)),
    ]


_BOUND = {"crossing": "", "never": "> ", "always": "<= "}


def equal_accuracy_blocks(eq: pd.DataFrame) -> list:
    if eq.empty:
        return [Para("(needs both PT+FT (pt_ft) and a learngene method (mmlg or tleg) in the same cells: none here)")]
    head = (
        f"For each cell, PT+FT pre-trains the descendant's shape along a ladder of budgets (multiples of the "
        f"extraction's sample budget); the ladder's points are (pre-training FLOPs, mean test score). The fit is "
        f"an {stats.FIT}. Where that fit meets the learngene arm's mean test score is what PT+FT must spend to "
        f"equal it. Compute saved at equal accuracy = that compute minus the arm's own pre-training compute; "
        f"the ratio is PT+FT's over the arm's. Compute is per descendant: a learngene's extraction is shared "
        f"equally by the cells it serves, a pre-trained shape by the modalities that use it (DESIGN section 3). "
        f"Intervals: {stats.CONFIDENCE:.0%} percentile interval of the crossing over {stats.N_RESAMPLES} "
        f"resamples of each arm's seeds (the ladder's budgets and the arm independently); a bound off the ladder "
        f"is written as such. Beside it, the same crossing in measured device-seconds (point estimate)."
    )
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
    return [Para(head), Bullets(items), Table(show)]
