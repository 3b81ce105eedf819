"""Money: each stage's device-hours priced from the price table, the spend summary and the cost to reach a target score."""

from __future__ import annotations

import math

import pandas as pd

from mmlg_ray import cost as costmod
from mmlg_ray.report import stats
from mmlg_ray.config import Config
from mmlg_ray.config import LEARNGENE_METHODS
from mmlg_ray.report.tables import COLORS, normalize
from mmlg_ray.report.costs import _budget_of, _extraction_name, pretrain_share


# --------------------------------------------------------------------------- money
SPEND_STAGES = ("extraction", "pretrain", "finetune")


def _num(df: pd.DataFrame, col: str) -> pd.Series:
    return df[col].astype(float).fillna(0.0) if col in df else pd.Series(0.0, index=df.index)


def priced_dtype(cfg: Config, table: dict) -> str:
    """The precision the FLOPs-priced device-hours assume: the one the run's stages run in on
    report.device (cost.stage_dtypes: the config's `precision`, TF32 for fp32 on a GPU with tf32 on)."""
    return costmod.stage_dtypes(cfg, table=table)["finetune"]


def spend_table(trials: pd.DataFrame, stages: pd.DataFrame, cfg: Config, table: dict) -> pd.DataFrame:
    """What this sweep spent, per arm and stage (report_texts.yaml: sharing_rule): each stage's FLOPs (the run's count)
    and measured device-seconds, as device-hours and money on report.device at report.pricing;
    beside them the device-hours and money the cost model gives for the same FLOPs (priced_dtype).
    Fine-tuning sums every trial of the arm (search, seeds and errored: all were paid for), and the work
    its restarts threw away (`lost_device_s`: from the last checkpoint to the loss, also paid for); so
    does pre-training, where stages.parquet records it."""
    t = normalize(trials)
    dev, pricing, dtype = cfg.report.device, cfg.report.pricing, priced_dtype(cfg, table)
    lost = _num(stages, "lost_device_s")
    st = stages.assign(
        flops=_num(stages, "flops"),
        device_s=_num(stages, "device_s") + lost,
        lost=lost,
        name=stages["name"].astype(str),
    )
    rows = []

    def add(arm, method, stage, runs, flops, device_s, lost_s=0.0):
        h, ph = device_s / 3600, costmod.device_hours(flops, dev, dtype, table)
        rows.append(
            {
                "arm": arm,
                "method": method,
                "stage": stage,
                "runs": int(runs),
                "flops": float(flops),
                "device_s": float(device_s),
                "lost_device_s": float(lost_s),  # of device_s: thrown away by restarts
                "device_h": h,
                "money": costmod.money(h, dev, pricing, table),
                "plan_device_h": ph,
                "plan_money": costmod.money(ph, dev, pricing, table),
            }
        )

    anc = st[st.stage == "ancestor"]
    if len(anc):
        add("(ancestor)", "", "ancestor", len(anc), anc.flops.sum(), anc.device_s.sum())
    order = {m: i for i, m in enumerate(COLORS)}
    arms = t.drop_duplicates("arm").assign(_o=lambda d: d.method.map(order).fillna(99)).sort_values(["_o", "arm"])
    for r in arms.itertuples():
        if r.method in LEARNGENE_METHODS:
            g = st[(st.stage == "extraction") & (st.name == _extraction_name(r.method, r.extraction))]
            if len(g):
                add(r.arm, r.method, "extraction", len(g), g.flops.sum(), g.device_s.sum(), g.lost.sum())
        elif r.method in ("pt_ft", "csm"):
            pre = st[st.stage == "pretrain"]
            own = pre.name.str.split("/").str[0].str.split("@").str[0] == r.method
            if r.method == "pt_ft":
                own &= pre.name.map(_budget_of) == float(r.pt_budget)
            g = pre[own]
            if len(g):
                add(r.arm, r.method, "pretrain", len(g), g.flops.sum(), g.device_s.sum(), g.lost.sum())
        g = t[t.arm == r.arm]
        lost_ft = _num(g, "lost_device_s").sum()
        ft_s = _num(g, "finetune_device_s").sum() + lost_ft
        add(r.arm, r.method, "finetune", len(g), _num(g, "finetune_flops").sum(), ft_s, lost_ft)
    return pd.DataFrame(rows)


def spend_summary(spend: pd.DataFrame) -> pd.DataFrame:
    """One row per arm: device-hours per stage, measured and from FLOPs, and the totals in money."""
    rows = []
    for arm, g in spend.groupby("arm", sort=False):
        r = {"arm": arm}
        for kind, h, m in (("measured", "device_h", "money"), ("plan", "plan_device_h", "plan_money")):
            for stage in SPEND_STAGES + ("ancestor",):
                x = g[g.stage == stage]
                if len(x):
                    r[f"{stage} h ({kind})"] = float(x[h].sum())
            r[f"total h ({kind})"] = float(g[h].sum())
            r[f"total $ ({kind})"] = float(g[m].sum())
        rows.append(r)
    df = pd.DataFrame(rows)
    cols = (
        ["arm"]
        + [f"{s} h ({k})" for k in ("measured", "plan") for s in SPEND_STAGES + ("ancestor",) if f"{s} h ({k})" in df]
        + [f"total {u} ({k})" for k in ("measured", "plan") for u in ("h", "$")]
    )
    return df[cols]


def _stage_whole(ft: pd.DataFrame, stages: pd.DataFrame) -> pd.Series:
    """Device-seconds of the whole stage behind each descendant (unshared): its learngene's extraction
    for mmlg/tleg, its shape's pre-training for pt_ft/csm, nothing for the others."""
    ext = (
        stages[stages.stage == "extraction"]
        .groupby(stages["name"].astype(str))
        .apply(lambda g: _num(g, "device_s").sum())
        if len(stages)
        else pd.Series(dtype=float)
    )
    lg = [
        float(ext.get(_extraction_name(m, e), 0.0)) if m in LEARNGENE_METHODS else 0.0
        for m, e in zip(ft.method, ft.extraction)
    ]
    return pd.Series(lg, index=ft.index) + _num(ft, "pretrain_device_s")


TARGET_FRACTION = 0.9


def cost_to_target(
    ft: pd.DataFrame, stages: pd.DataFrame, cfg: Config, table: dict
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The target rule (report_texts.yaml: target_rule). Returns (per task, target and arm: the cheapest cell reaching it; the cells with
    their score CI and money; {task: {target name: score}})."""
    dev, pricing = cfg.report.device, cfg.report.pricing
    d = ft.assign(
        _share=pretrain_share(ft, stages, "device_s"),
        _whole=_stage_whole(ft, stages),
        _ft=_num(ft, "finetune_device_s"),
    )
    rows = []
    for key, g in d.groupby(["task", "arm", "modality", "depth", "width"]):
        ci = stats.mean_ci(g.final_score.astype(float))
        alone = (g._ft.mean() + g._whole.mean()) / 3600
        shared = (g._ft.mean() + g._share.mean()) / 3600
        rows.append(
            dict(
                zip(["task", "arm", "modality", "depth", "width"], key),
                method=g.method.iloc[0],
                score_metric=g.score_metric.iloc[0],
                mean=ci["mean"],
                lo=ci["lo"],
                hi=ci["hi"],
                n=ci["n"],
                device_h_alone=alone,
                money_alone=costmod.money(alone, dev, pricing, table),
                device_h_shared=shared,
                money_shared=costmod.money(shared, dev, pricing, table),
            )
        )
    cells = pd.DataFrame(rows)
    targets, out = {}, []
    for task, c in cells.groupby("task"):
        tg = {}
        if (c.method == "scratch").any():
            tg["scratch's best"] = float(c[c.method == "scratch"]["mean"].max())
        tg[f"{TARGET_FRACTION:.0%} of the best"] = TARGET_FRACTION * float(c["mean"].max())
        targets[task] = tg
        for name, v in tg.items():
            block = []
            for arm, a in c.groupby("arm"):
                ok = a[a["mean"] >= v]
                r = {"task": task, "target": name, "target_score": v, "arm": arm, "reached": len(ok) > 0}
                if len(ok):
                    b = ok.sort_values(["money_alone", "mean"], ascending=[True, False]).iloc[0]
                    r.update(
                        {
                            k: b[k]
                            for k in (
                                "modality",
                                "depth",
                                "width",
                                "mean",
                                "lo",
                                "hi",
                                "n",
                                "device_h_alone",
                                "money_alone",
                                "device_h_shared",
                                "money_shared",
                            )
                        }
                    )
                    r["surely"] = bool(not math.isnan(b.lo) and b.lo >= v)
                block.append(r)
            b = pd.DataFrame(block)
            b["cheapest"] = False
            if b.reached.any():
                b.loc[b[b.reached].money_alone.astype(float).idxmin(), "cheapest"] = True
            out.append(b.sort_values(["reached", "money_alone"], ascending=[False, True], na_position="last"))
    res = pd.concat(out, ignore_index=True) if out else pd.DataFrame()
    return res, cells, targets
