"""Cost per method: each arm's compute and its share of the extraction and pre-training stages it used, from the measured stages."""

from __future__ import annotations


from mmlg_ray.cost.prices import _entry, device_hours, money, price_table, run_dtype


# --------------------------------------------------------------------------- cost per method
# Who pays for what (DESIGN section 3). A stage's cost is counted ONCE, for the arm that uses it:
#   extraction "mmlg" (or "mmlg/elastic")  -> that learngene arm, shared by all its cells and trials;
#   pretrain "pt_ft/<shape>@<b>x"          -> arm pt_ft@<b>x; one pre-trained shape serves that arm's
#                                             image, text and image_text descendants of the shape;
#   pretrain "csm/<shape>@1x"              -> arm csm, likewise;
#   fine-tuning                            -> the trial's arm (every trial counted: search + seeds).
# The ancestor is shown separately and counted by ANCESTOR_RULE:
#   "sunk"   (default) excluded from every method: it exists before the study (open_clip weights, or
#            a cached local pre-training) and every method compared reads the same one;
#   "charge" split equally among the arms that read it (all but scratch and pt_ft), e.g. to price a
#            study that must pre-train its own ancestor.
ANCESTOR_RULES = ("sunk", "charge")


ANCESTOR_FREE = ("scratch", "pt_ft")  # arms (by method) that never read the ancestor


def stage_arm(stage: str, name: str) -> str | None:
    """The arm (as trials.parquet's `arm` names it) a stages.parquet row serves; None for the ancestor."""
    name = str(name)
    if stage == "extraction":
        return name
    if stage == "pretrain":
        method, _, rest = name.partition("/")
        budget = float(rest.rsplit("@", 1)[1].rstrip("x")) if "@" in rest else 1.0
        return f"pt_ft@{budget:g}x" if method == "pt_ft" else method
    return None


def _arm_of(t) -> "object":
    """trials' arm column (older tables: rebuilt from method / extraction / pt_budget)."""
    if "arm" in t:
        return t["arm"].astype(str)
    ext = t["extraction"].fillna("").astype(str) if "extraction" in t else [""] * len(t)
    bud = t["pt_budget"].astype(float) if "pt_budget" in t else [1.0] * len(t)
    return [
        f"{m}/{e}" if m in ("mmlg", "tleg") and e == "elastic" else f"pt_ft@{b:g}x" if m == "pt_ft" else m
        for m, e, b in zip(t["method"], ext, bud)
    ]


def _precisions(stages, default: str) -> list[str]:
    """Each stages row's recorded precision; `default` (the run's) where none was recorded."""
    if "precision" not in stages:
        return [default] * len(stages)
    return [p if p in ("fp32", "bf16", "fp16") else default for p in stages["precision"]]


def method_costs(
    trials,
    stages,
    *,
    device: str,
    pricing: str = "on_demand",
    table: dict | None = None,
    precision: str = "fp32",
    tf32: bool = False,
    ancestor: str = "sunk",
):
    """Per arm: the stages it uses, each counted once, plus all its trials' fine-tuning; the
    ancestor as its own row, counted by `ancestor` (ANCESTOR_RULES). Returns a DataFrame, one row
    per arm (sorted) and a last row "ancestor", with
      n_trials, n_cells, shared_stages, shared_flops, shared_device_s, finetune_flops,
      finetune_device_s, ancestor_flops, ancestor_device_s, total_flops, total_device_s,
      device_hours (measured device-seconds / 3600), money (at `pricing`),
      device_hours_analytic, money_analytic (the FLOPs at the dtype each stage ran in: a stages row's
      `precision` column when present, else `precision`; at the table's utilisation),
      counted (False for a sunk ancestor row).
    The arms' totals plus a counted ancestor add up to every stage and trial exactly once.
    trials: trials.parquet rows (arm or method/extraction/pt_budget; modality, depth, width;
    finetune_flops, finetune_device_s). stages: stages.parquet rows (stage, name, flops, device_s).
    Device-seconds include the work restarts threw away (`lost_device_s` of trials and stages, when
    present): it was paid for."""
    import pandas as pd

    if ancestor not in ANCESTOR_RULES:
        raise ValueError(f"ancestor rule {ancestor!r}: one of {ANCESTOR_RULES}")
    table = table or price_table()
    on_gpu = "tf32" in _entry(device, table)["peak_tflops"]
    t = trials.copy()
    t["_arm"] = list(_arm_of(t)) if len(t) else []
    s = stages.copy()
    for c in ("flops", "device_s", "lost_device_s"):
        s[c] = s[c].astype(float).fillna(0.0) if c in s else 0.0
    s["device_s"] += s.lost_device_s  # work thrown away by restarts was paid for too
    s["_arm"] = [stage_arm(a, b) for a, b in zip(s["stage"], s["name"])] if len(s) else []
    prec = _precisions(s, precision)
    s["_hours"] = [device_hours(f, device, run_dtype(p, tf32, on_gpu), table) for f, p in zip(s.flops, prec)]
    ft_dtype = run_dtype(precision, tf32, on_gpu)
    anc = s[s._arm.isna()]
    arms = sorted(set(t["_arm"]) | set(s._arm.dropna()))
    readers = [a for a in arms if a.split("@")[0].split("/")[0] not in ANCESTOR_FREE]
    rows = []
    for a in arms:
        mine, st = t[t._arm == a], s[s._arm == a]
        cells = mine[[c for c in ("modality", "depth", "width") if c in mine]].drop_duplicates()
        share = 1 / len(readers) if ancestor == "charge" and a in readers else 0.0
        ff = float(mine["finetune_flops"].astype(float).sum()) if "finetune_flops" in mine else 0.0
        fd = sum(
            float(mine[c].astype(float).fillna(0.0).sum()) for c in ("finetune_device_s", "lost_device_s") if c in mine
        )
        r = {
            "method": a,
            "n_trials": len(mine),
            "n_cells": len(cells),
            "shared_stages": len(st),
            "shared_flops": float(st.flops.sum()),
            "shared_device_s": float(st.device_s.sum()),
            "finetune_flops": ff,
            "finetune_device_s": fd,
            "ancestor_flops": share * float(anc.flops.sum()),
            "ancestor_device_s": share * float(anc.device_s.sum()),
            "_ah": float(st._hours.sum()) + device_hours(ff, device, ft_dtype, table) + share * float(anc._hours.sum()),
            "counted": True,
        }
        rows.append(r)
    rows.append(
        {
            "method": "ancestor",
            "n_trials": 0,
            "n_cells": 0,
            "shared_stages": len(anc),
            "shared_flops": float(anc.flops.sum()),
            "shared_device_s": float(anc.device_s.sum()),
            "finetune_flops": 0.0,
            "finetune_device_s": 0.0,
            "ancestor_flops": 0.0,
            "ancestor_device_s": 0.0,
            "_ah": float(anc._hours.sum()),
            "counted": False,
        }
    )
    df = pd.DataFrame(rows)
    df["total_flops"] = df.shared_flops + df.finetune_flops + df.ancestor_flops
    df["total_device_s"] = df.shared_device_s + df.finetune_device_s + df.ancestor_device_s
    df["device_hours"] = df.total_device_s / 3600
    df["money"] = [money(h, device, pricing, table) for h in df.device_hours]
    df["device_hours_analytic"] = df.pop("_ah")
    df["money_analytic"] = [money(h, device, pricing, table) for h in df.device_hours_analytic]
    return df


def stage_costs(
    stages,
    *,
    device: str,
    pricing: str = "on_demand",
    table: dict | None = None,
    precision: str = "fp32",
    tf32: bool = False,
):
    """stages.parquet with the arm each row serves (None: the ancestor), its compute dtype, measured
    device-hours and money, and analytic device-hours and money at that dtype."""
    table = table or price_table()
    on_gpu = "tf32" in _entry(device, table)["peak_tflops"]
    s = stages.copy()
    prec = _precisions(s, precision)
    s["arm"] = [stage_arm(a, b) for a, b in zip(s["stage"], s["name"])]
    s["dtype"] = [run_dtype(p, tf32, on_gpu) for p in prec]
    dev_s = s["device_s"].astype(float).fillna(0.0) if "device_s" in s else 0.0 * s.index
    s["device_hours"] = dev_s / 3600
    s["money"] = [money(h, device, pricing, table) for h in s.device_hours]
    s["device_hours_analytic"] = [device_hours(float(f or 0), device, d, table) for f, d in zip(s.flops, s.dtype)]
    s["money_analytic"] = [money(h, device, pricing, table) for h in s.device_hours_analytic]
    return s
