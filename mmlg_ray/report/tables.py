"""The results as tables: trials normalized, the final trials of each arm (selected on validation), each cell's scores with confidence intervals; number formats."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from mmlg_ray.report import stats
from mmlg_ray.config import Config, config_from_dict
from mmlg_ray.errors import UserError


MIN_SEEDS_TO_RANK = 3


COLORS = {
    "mmlg": "#d62728",
    "tleg": "#ff7f0e",
    "weight_selection": "#2ca02c",
    "heur_lg": "#9467bd",
    "scratch": "#7f7f7f",
    "pt_ft": "#1f77b4",
    "csm": "#8c564b",
}


def load_results(out: Path):
    out = Path(out)
    for name in ("trials.parquet", "stages.parquet"):
        if not (out / name).is_file():
            raise UserError("OUTPUT", f"{out} has no {name}", "pass the output folder of a finished sweep")
    trials = pd.read_parquet(out / "trials.parquet")
    stages = pd.read_parquet(out / "stages.parquet")
    hist = pd.read_parquet(out / "history.parquet") if (out / "history.parquet").is_file() else pd.DataFrame()
    cfg_path = out / "config.yaml"
    if cfg_path.is_file():
        import yaml

        cfg = config_from_dict(yaml.safe_load(cfg_path.read_text()))
    else:
        cfg = Config()
    meta = json.loads((out / "ancestor.json").read_text()) if (out / "ancestor.json").is_file() else {}
    return trials, stages, hist, cfg, meta


CELL = ["modality", "depth", "width"]  # a grid cell's shape; an arm is (method, extraction, pt_budget)


ARM_KEYS = ["method", "extraction", "pt_budget"]


def normalize(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials with the columns this report reads; folders written before validation splits, extraction
    modes and pre-training ladders lack some: arm = method, extraction = "", pt_budget = 1.0 for
    pt_ft/csm else 0.0, val_score = NaN."""
    t = trials.copy()
    if "extraction" not in t:
        t["extraction"] = ""
    t["extraction"] = t["extraction"].fillna("").astype(str)
    default_budget = t["method"].map(lambda m: 1.0 if m in ("pt_ft", "csm") else 0.0)
    t["pt_budget"] = (
        t["pt_budget"].astype(float).fillna(default_budget) if "pt_budget" in t else default_budget.astype(float)
    )
    if "arm" not in t:
        t["arm"] = t["method"]
    t["arm"] = t["arm"].where(t["arm"].notna() & (t["arm"].astype(str) != ""), t["method"]).astype(str)
    for c in ("val_score", "best_val_score"):
        if c not in t:
            t[c] = float("nan")
    for c in ("pretrain_flops", "pretrain_device_s", "finetune_flops"):
        if c not in t:
            t[c] = 0.0
    return t


def selection_split(trials: pd.DataFrame) -> str:
    """How final_trials chose each cell's search trial: "val", "test" (old results without val_score),
    "mixed", or "none" (no search phase: every trial ran the configured hyper-parameters)."""
    t = normalize(trials)
    if "phase" not in t or t.phase.isna().all():
        return "none"
    search = t[(t.phase == "search") & _ok(t)]
    if search.empty:
        return "none"
    has = search.groupby(ARM_KEYS + CELL, dropna=False).val_score.apply(lambda v: v.notna().any())
    return "val" if has.all() else "test" if not has.any() else "mixed"


def _ok(t: pd.DataFrame) -> pd.Series:
    ok = t.task.notna() if "task" in t else pd.Series(True, index=t.index)
    if "status" in t:
        ok &= ~t.status.isin(["error", "superseded", "running"])
    return ok


def final_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials that measure each cell: per cell (arm x shape) the search trial with the best
    validation score (never the test score; errored trials excluded) and the seeds-phase trials at its
    hyper-parameters; without phases (local backend) every trial. A cell whose search trials carry no
    val_score (results from before validation splits) falls back to the test score: selection_split
    says so and the report prints it."""
    t = normalize(trials)
    t = t[_ok(t)]
    if "phase" not in t or t.phase.isna().all():
        return t.reset_index(drop=True)
    search = t[t.phase == "search"]
    seeds = t[t.phase == "seeds"]
    picks = []
    for key, g in search.groupby(ARM_KEYS + CELL, dropna=False):
        if "status" in g and (g.status == "finished").any():  # as the sweep chose: a trial ASHA cut short only
            g = g[g.status == "finished"]  # when none ran its whole budget
        # the sweep's own choice where its seed re-runs say it (on tied validation scores the order of
        # the rows could pick another trial than the one the seeds re-ran)
        s = (
            seeds[(seeds[ARM_KEYS + CELL] == pd.Series(key, index=ARM_KEYS + CELL)).all(axis=1)]
            if len(seeds)
            else seeds
        )
        if len(s) and g.val_score.notna().any():
            same = g[(g.lr == s.lr.iloc[0]) & (g.weight_decay == s.weight_decay.iloc[0])]
            g = same if len(same) else g
        col = "val_score" if g.val_score.notna().any() else "final_score"
        picks.append(g[col].astype(float).idxmax())
    best = search.loc[picks]
    return pd.concat([best, t[t.phase == "seeds"]], ignore_index=True)


def cell_table(ft: pd.DataFrame, confidence: float = stats.CONFIDENCE) -> pd.DataFrame:
    """Per task, shape and arm: parameters, seeds, mean test score with its bootstrap CI, std, and the
    mean validation score."""
    rows = []
    for key, g in ft.groupby(["task", "modality", "depth", "width", "arm"]):
        ci = stats.mean_ci(g.final_score, confidence)
        rows.append(
            {
                "task": key[0],
                "modality": key[1],
                "depth": key[2],
                "width": key[3],
                "arm": key[4],
                "method": g.method.iloc[0],
                "params": g.params.iloc[0],
                "n": ci["n"],
                "mean": ci["mean"],
                "ci_lo": ci["lo"],
                "ci_hi": ci["hi"],
                "std": float(g.final_score.std()),
                "val_mean": float(g.val_score.mean()),
                "score_metric": g.score_metric.iloc[0],
            }
        )
    t = pd.DataFrame(rows)
    return t.sort_values(["task", "depth", "width", "mean"], ascending=[True, True, True, False]) if len(t) else t


def _fmt(v, fmt=".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return format(v, fmt)


def _ci(lo, hi, fmt=".3g") -> str:
    return "" if math.isnan(lo) or math.isnan(hi) else f"[{_fmt(lo, fmt)}, {_fmt(hi, fmt)}]"


# --------------------------------------------------------------------------- plots
def _human(x, _pos=None) -> str:
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"
