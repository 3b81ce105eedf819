"""The report's plots, each returned as PNG bytes (matplotlib, Agg)."""

from __future__ import annotations

import io
import math

import pandas as pd

from mmlg_ray.report import stats
from mmlg_ray.config import LEARNGENE_METHODS
from mmlg_ray.report.tables import COLORS, _human
from mmlg_ray.report.spend import SPEND_STAGES
from mmlg_ray.report.costs import _budget_of, pareto, pretrain_share


def _log_x(ax):
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(_human))
    ax.xaxis.set_minor_formatter(NullFormatter())
    lo, hi = ax.get_xlim()
    if hi / lo < 10:  # less than a decade: a few plain ticks instead of none
        import numpy as np

        ax.set_xticks(np.geomspace(lo, hi, 4)[1:-1])


def _fig_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _ci_points(d: pd.DataFrame, by, cost: str | None = None) -> pd.DataFrame:
    """Per group of `by`: the mean test score over seeds with its bootstrap CI (stats.mean_ci; a
    single seed has no interval and is drawn without a bar), and the mean of `cost` if given."""
    rows = []
    for key, g in d.groupby(by):
        key = key if isinstance(key, tuple) else (key,)
        ci = stats.mean_ci(g.final_score.astype(float))
        r = dict(zip([by] if isinstance(by, str) else by, key))
        r.update(mean=ci["mean"], lo=ci["lo"], hi=ci["hi"], n=ci["n"], method=g.method.iloc[0])
        if cost:
            r["cost"] = float(g[cost].astype(float).mean())
        rows.append(r)
    return pd.DataFrame(rows)


def _legend_outside(ax):
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _marker(arm: str) -> str:
    """A point's marker: squares for a non-fixed extraction, one triangle or diamond per PT+FT budget."""
    if arm.startswith("pt_ft@"):
        return {0.25: "v", 0.5: "^", 1.0: "o", 2.0: "D", 4.0: "P"}.get(_budget_of(arm), "X")
    return "s" if "/" in arm else "o"


def _yerr(p: pd.DataFrame, col: str = "mean"):
    """matplotlib's asymmetric error bars from lo/hi columns (zero where there is no interval)."""
    lo = (p[col] - p.lo).where(p.lo.notna(), 0.0).clip(lower=0)
    hi = (p.hi - p[col]).where(p.hi.notna(), 0.0).clip(lower=0)
    return [lo.values, hi.values]


def plot_score_vs_params(ft: pd.DataFrame, task: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = ft[ft.task == task]
    fig, ax = plt.subplots(figsize=(8.4, 4.2))
    for arm, g in d.groupby("arm"):
        s = _ci_points(g, "params")
        m = g.method.iloc[0]
        ax.errorbar(
            s.params,
            s["mean"],
            yerr=_yerr(s),
            marker="o",
            capsize=3,
            label=arm,
            color=COLORS.get(m),
            linewidth=2.2 if m == "mmlg" else 1.2,
            **_arm_style(g),
        )
    _log_x(ax)
    ax.set_xlabel("descendant parameters")
    ax.set_ylabel(f"{d.score_metric.iloc[0]} (%)")
    ax.set_title(f"{task}: score vs size (mean, {stats.CONFIDENCE:.0%} CI over seeds)")
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return _fig_png(fig)


def plot_costs(ct: pd.DataFrame) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12.5, 3.8))
    d = ct.set_index("method")
    colors = [COLORS.get(m, "#333") for m in d.index]
    axes[0].bar(d.index, d.stored_params, color=colors)
    axes[0].set_title("stored parameters")
    x = range(len(d))
    axes[1].bar(
        [i - 0.2 for i in x], d.pretrain_flops_analytic, width=0.4, label="plan (config budget)", color="#bbbbbb"
    )
    axes[1].bar(
        [i + 0.2 for i in x],
        d.pretrain_flops_measured.fillna(0),
        width=0.4,
        label="run (samples actually processed)",
        color=colors,
    )
    axes[1].set_xticks(list(x), d.index)
    axes[1].set_title("pre-training compute (FLOPs)")
    axes[1].legend(fontsize=7)
    axes[2].bar(d.index, d.pretrain_device_s_measured.fillna(0), color=colors)
    axes[2].set_title("pre-training, measured device-seconds")
    for a in axes:
        a.tick_params(axis="x", rotation=45, labelsize=8)
        a.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _fig_png(fig)


def plot_pareto(ft: pd.DataFrame, task: str) -> tuple[bytes, pd.DataFrame]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = ft[ft.task == task]
    pts = _ci_points(d, ["arm", "depth", "width"], cost="total_flops").rename(columns={"mean": "score"})
    front = pareto(pts, "cost", "score")
    fig, ax = plt.subplots(figsize=(8.4, 4.2))
    for arm, g in pts.groupby("arm"):
        ax.errorbar(
            g.cost,
            g.score,
            yerr=_yerr(g, "score"),
            label=arm,
            color=COLORS.get(g.method.iloc[0]),
            markersize=6,
            marker=_marker(arm),
            linestyle="none",
            capsize=2,
            elinewidth=1,
        )
    ax.plot(front.cost, front.score, "k--", linewidth=1, label="Pareto frontier")
    for _, r in front.iterrows():
        ax.annotate(
            f"{r.arm} d{r.depth} w{r.width}", (r.cost, r.score), fontsize=7, xytext=(4, 4), textcoords="offset points"
        )
    _log_x(ax)
    ax.set_xlabel("total training FLOPs behind the descendant")
    ax.set_ylabel("score (%)")
    ax.set_title(f"{task}: score vs total cost (mean, {stats.CONFIDENCE:.0%} CI)")
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return _fig_png(fig), front


def _arm_style(g: pd.DataFrame) -> dict:
    """Line style of an arm: dashed for a non-fixed extraction, fainter for smaller pt_ft budgets."""
    m, e, b = g.method.iloc[0], g.extraction.iloc[0], float(g.pt_budget.iloc[0])
    if m in LEARNGENE_METHODS and e not in ("", "fixed"):
        return {"linestyle": "--"}
    if m == "pt_ft" and b != 1.0:
        return {"alpha": max(0.35, min(1.0, 0.5 + 0.25 * math.log2(b))) if b > 0 else 0.35, "linestyle": ":"}
    return {}


def plot_equal_accuracy(ft: pd.DataFrame, stages: pd.DataFrame, res: dict) -> bytes:
    """One panel per cell: PT+FT's ladder (mean test score ± CI against pre-training FLOPs per
    descendant), its isotonic fit, each learngene arm at its own compute, and the crossing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = sorted({k[:3] for k in res})
    ncol = min(4, len(cells))
    nrow = math.ceil(len(cells) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 2.9 * nrow), squeeze=False)
    ft = ft.assign(_flops=pretrain_share(ft, stages, "flops"))
    for ax, (task, depth, width) in zip(axes.flat, cells):
        pt = ft[(ft.task == task) & (ft.depth == depth) & (ft.width == width) & (ft.method == "pt_ft")]
        lad = []
        for _, g in pt.groupby("pt_budget"):
            ci = stats.mean_ci(g.final_score)
            lad.append((float(g._flops.mean()), ci["mean"], ci["lo"], ci["hi"]))
        lad.sort()
        x = np.array([p[0] for p in lad])
        y = np.array([p[1] for p in lad])
        lo = np.array([p[2] if not math.isnan(p[2]) else p[1] for p in lad])
        hi = np.array([p[3] if not math.isnan(p[3]) else p[1] for p in lad])
        ax.errorbar(
            x,
            y,
            yerr=[y - lo, hi - y],
            marker="o",
            color=COLORS["pt_ft"],
            capsize=2,
            linewidth=0,
            elinewidth=1,
            label="PT+FT ladder (mean, 95% CI)",
        )
        ax.plot(
            x,
            stats.isotonic(y, [len(pt[pt.pt_budget == b]) for b in sorted(pt.pt_budget.unique())]) if len(x) > 1 else y,
            color=COLORS["pt_ft"],
            linewidth=1,
            label="isotonic fit",
        )
        for (t, d, w, arm), ea in res.items():
            if (t, d, w) != (task, depth, width):
                continue
            col = COLORS.get(arm.split("/")[0], "#333")
            ax.axhline(ea.target, color=col, linestyle="--" if "/" in arm else "-", linewidth=0.8, alpha=0.7)
            if ea.own_compute > 0:
                a = ft[(ft.task == task) & (ft.depth == depth) & (ft.width == width) & (ft.arm == arm)]
                ci = stats.mean_ci(a.final_score)
                err = [[ea.target - ci["lo"]], [ci["hi"] - ea.target]] if not math.isnan(ci["lo"]) else None
                ax.errorbar(
                    [ea.own_compute],
                    [ea.target],
                    yerr=err,
                    color=col,
                    marker="D" if "/" in arm else "*",
                    markersize=6 if "/" in arm else 11,
                    zorder=5,
                    capsize=2,
                    linestyle="none",
                    label=f"{arm} (own compute, score, 95% CI)",
                )
            if ea.kind == "crossing":
                ax.axvline(ea.compute, color=col, linestyle=":", linewidth=1)
        _log_x(ax)
        ax.set_title(f"{task} d{depth} w{width}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.set_xlabel("pre-training FLOPs per descendant", fontsize=7)
        ax.set_ylabel("test score (%)", fontsize=7)
    for ax in list(axes.flat)[len(cells) :]:
        ax.axis("off")
    handles = {}
    for ax in axes.flat:
        for h, lbl in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lbl, h)
    fig.tight_layout()
    fig.legend(list(handles.values()), list(handles), fontsize=7, loc="upper center", ncol=3, bbox_to_anchor=(0.5, 0.0))
    return _fig_png(fig)


def plot_spend(summary: pd.DataFrame, device: str) -> bytes:
    """Per arm, device-hours by stage: measured (left) and priced from the run's FLOP counts (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12.5, 0.9 + 0.42 * max(2, len(summary))), sharey=True)
    shades = {"extraction": "#d62728", "pretrain": "#1f77b4", "finetune": "#bbbbbb"}
    y = range(len(summary))
    for ax, kind, title in (
        (axes[0], "measured", "measured device-hours"),
        (axes[1], "plan", f"device-hours from FLOPs on {device}"),
    ):
        left = [0.0] * len(summary)
        for stage in SPEND_STAGES:
            col = f"{stage} h ({kind})"
            if col not in summary:
                continue
            v = summary[col].fillna(0.0).tolist()
            ax.barh(list(y), v, left=left, color=shades[stage], label=stage)
            left = [a + b for a, b in zip(left, v)]
        money = summary[f"total $ ({kind})"].tolist()
        for yi, (x, m) in enumerate(zip(left, money)):
            ax.annotate(f"${m:.3g}", (x, yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.15)
    axes[0].set_yticks(list(y), summary.arm.tolist(), fontsize=8)
    axes[0].invert_yaxis()
    fig.tight_layout()
    h, lbl = axes[1].get_legend_handles_labels()
    fig.legend(h, lbl, fontsize=7, loc="upper center", ncol=len(lbl), bbox_to_anchor=(0.5, 0.0))
    return _fig_png(fig)


def plot_score_vs_money(cells: pd.DataFrame, targets: dict, task: str) -> bytes:
    """One task: each cell's mean test score (95% CI over seeds) against the money one descendant of
    it costs on its own; the targets as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = cells[cells.task == task]
    fig, ax = plt.subplots(figsize=(8.4, 4.2))
    for arm, g in d.groupby("arm"):
        ax.errorbar(
            g.money_alone,
            g["mean"],
            yerr=_yerr(g),
            marker=_marker(arm),
            linestyle="none",
            capsize=2,
            color=COLORS.get(g.method.iloc[0]),
            label=arm,
        )
    for (name, v), ls in zip(targets.items(), ("--", ":", "-.")):
        ax.axhline(v, color="#444", linestyle=ls, linewidth=1, label=f"target: {name} ({v:.3g})")
    if len(d) and (d.money_alone > 0).all():
        _log_x(ax)
    ax.set_xlabel("$ per descendant, alone (fine-tuning + the whole stage behind it)")
    ax.set_ylabel(f"{d.score_metric.iloc[0] if len(d) else 'score'} (%)")
    ax.set_title(f"{task}: score vs money (mean, {stats.CONFIDENCE:.0%} CI)")
    ax.grid(alpha=0.3)
    _legend_outside(ax)
    return _fig_png(fig)


def plot_timeline(tl: pd.DataFrame) -> bytes:
    """A bar per piece of work over the job's wall clock: the driver's stages, each pre-trained shape,
    each trial (coloured by phase and by whether its cell needs a pre-trained shape)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = {"ancestor": 0, "extraction": 1, "pretrain": 2, "trial": 3}
    tl = tl.assign(o=tl.stage.map(order).fillna(4)).sort_values(["o", "start_s"]).reset_index(drop=True)
    kinds = list(dict.fromkeys(tl.what))
    colours = dict(zip(kinds, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.12 * len(tl) + 1.2)))
    for i, r in tl.iterrows():
        ax.barh(i, max(r.end_s - r.start_s, 0.2), left=r.start_s, color=colours[r.what], height=0.8)
    ax.set_yticks([])
    ax.invert_yaxis()
    ax.set_xlabel("seconds from the job's start")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=colours[k], label=k) for k in kinds], fontsize=7, loc="lower right")
    fig.tight_layout()
    return _fig_png(fig)
