"""The cost-comparison report of a finished sweep: report.html (self-contained, plots embedded),
report.md (same content, plots beside it as PNG) and its tables as Parquet, under OUTPUT/report/.
Sections are built from results and the cost model (SECTIONS) and rendered by mmlg_ray.report.render.

    python jobs/report.py OUTPUT
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mmlg_ray import cost as costmod
from mmlg_ray.report import stats
from mmlg_ray.engine.arms import arm_name  # noqa: F401 (re-exported: tables and tests name arms through it)
from mmlg_ray.atomic import atomic_dir
from mmlg_ray.config import Config, ModelSpec, config_from_dict, dump_config
from mmlg_ray.method.descend import descendant_spec
from mmlg_ray.errors import UserError
from mmlg_ray.method.learngene import Learngene, LearngeneMeta, aux_spec
from mmlg_ray.report.render import Bullets, Code, Figure, Para, Section, Table, render_html, render_md

LEARNGENE_METHODS = ("mmlg", "tleg")
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
SEED_NOTE = (
    "A seed varies fine-tuning only (data order, task head, scratch init); the ancestor, the learngenes "
    "and the pre-trained shapes are shared across seeds, so intervals and tests cover fine-tuning "
    "variance, not the variance of pre-training or extraction."
)


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


# --------------------------------------------------------------------------- cost accounting
def cost_table(trials: pd.DataFrame, stages: pd.DataFrame, cfg: Config, anc_spec: ModelSpec) -> pd.DataFrame:
    """Per method: stored parameters and pre-training compute for the sweep's descendant set,
    analytic and measured side by side (DESIGN section 3)."""
    g = cfg.descendants.grid
    shapes = {}
    for d in g.depth:
        for w in g.width:
            s = descendant_spec(anc_spec, d, w)
            shapes[(s.image_depth, s.image_width, s.text_depth, s.text_width)] = s
    ec = cfg.learngene.extraction
    samples = ec.steps * ec.batch_size
    pre_samples = (cfg.descendants.pretrain_steps or ec.steps) * ec.batch_size
    ax = aux_spec(cfg, anc_spec)
    lg = cfg.learngene
    # the learngene files' own tensor sets (shared block or not, learned-schedule knots, layer-scale gammas)
    lg_layers, tleg_layers = (
        sum(
            math.prod(shape)
            for shape in Learngene.tensor_shapes(
                LearngeneMeta(
                    method=m,
                    schedule=lg.schedule if m == "mmlg" else "tleg",
                    spec=ax.model_dump(),
                    knots=lg.learned_knots,
                    shared=lg.shared if m == "mmlg" else "all",
                )
            ).values()
        )
        for m in ("mmlg", "tleg")
    )
    lg_inherited = (
        costmod.model_params(ax) - costmod.tower_params(ax, "image", True) - costmod.tower_params(ax, "text", True)
    )
    measured = {}
    for _, r in stages.iterrows():
        key = _stage_key(r["stage"], r["name"])
        if key is None:
            continue
        m = measured.setdefault(key, {"flops": 0.0, "device_s": 0.0})
        m["flops"] += float(r.get("flops", 0) or 0)
        m["device_s"] += float(r.get("device_s", 0) or 0)
    anc_params = costmod.model_params(anc_spec)
    rows = []

    def row(method, stored, pre_flops_analytic, src_key, note):
        meas = measured.get(src_key, {})
        rows.append(
            {
                "method": method,
                "stored_params": int(stored),
                "pretrain_flops_analytic": float(pre_flops_analytic),
                "pretrain_flops_measured": float(meas.get("flops", float("nan"))),
                "pretrain_device_s_measured": float(meas.get("device_s", float("nan"))),
                "note": note,
            }
        )

    extraction_flops = costmod.extraction_flops(ax, anc_spec, samples)
    row(
        "mmlg",
        lg_layers + lg_inherited,
        extraction_flops,
        ("extraction", "mmlg"),
        "learngene (shared + unimodal blocks"
        + (", the MLP half per tower" if lg.shared == "attention" else "")
        + ") + inherited tensors; one extraction",
    )
    row(
        "tleg",
        tleg_layers + lg_inherited,
        extraction_flops,
        ("extraction", "tleg"),
        "per-tower A, B blocks + inherited tensors; one extraction",
    )
    for lgm, stored in (("mmlg", lg_layers + lg_inherited), ("tleg", tleg_layers + lg_inherited)):
        for key in measured:
            if key[0] == "extraction" and key[1].startswith(lgm + "/"):
                row(
                    key[1],
                    stored,
                    float("nan"),
                    key,
                    "the same learngene tensors, extracted with "
                    f"{key[1].split('/', 1)[1]} extraction (extra descendant shapes distilled at each step: "
                    "its FLOPs are the run's count, no plan figure)",
                )
    row(
        "pt_ft",
        sum(costmod.model_params(s) for s in shapes.values()),
        sum(costmod.train_flops(s, "image_text", pre_samples) for s in shapes.values()),
        ("pretrain", "pt_ft"),
        f"one pre-trained CLIP per descendant shape ({len(shapes)} shapes)",
    )
    row(
        "csm",
        sum(costmod.model_params(s) for s in shapes.values()),
        sum(
            costmod.train_flops(s, "image_text", pre_samples) + costmod.forward_flops(anc_spec) * pre_samples
            for s in shapes.values()
        ),
        ("pretrain", "csm"),
        "one distilled CLIP per descendant shape",
    )
    for m in ("weight_selection", "heur_lg"):
        row(m, anc_params, 0.0, ("none", m), "reads the stored ancestor; no pre-training stage of its own")
    row("scratch", 0, 0.0, ("none", "scratch"), "nothing stored, nothing pre-trained")
    df = pd.DataFrame(rows)
    df["n_shapes"] = len(shapes)
    base = df.set_index("method").loc["pt_ft"]
    df["storage_vs_pt_ft"] = df.stored_params / base.stored_params
    df["pretrain_ratio_pt_ft_over_method_analytic"] = base.pretrain_flops_analytic / df.pretrain_flops_analytic.where(
        df.pretrain_flops_analytic > 0
    )
    df["pretrain_ratio_pt_ft_over_method_measured"] = (
        base.pretrain_device_s_measured / df.pretrain_device_s_measured.where(df.pretrain_device_s_measured > 0)
    )
    t = normalize(trials) if len(trials) else trials
    present = (set(t.method) | {_extraction_name(m, e) for m, e in zip(t.method, t.extraction)}) if len(t) else set()
    return df[df.method.isin(present) | df.method.isin(["mmlg", "pt_ft"])].reset_index(drop=True)


def _budget_of(name: str) -> float:
    import re

    m = re.search(r"@([0-9]*\.?[0-9]+)x?(?:/|$)", str(name))
    return float(m.group(1)) if m else 1.0


def _stage_key(stage: str, name: str):
    """The cost table's key of a stages.parquet row: extractions by their full name (mmlg, mmlg/elastic);
    pre-training by method, at the extraction's sample budget only (1x; the ladder's other budgets are
    the equal-accuracy section's business)."""
    if stage == "extraction":
        return stage, str(name)
    if stage == "pretrain":
        return (stage, str(name).split("/")[0].split("@")[0]) if _budget_of(name) == 1.0 else None
    return stage, str(name).split("/")[0]


def _extraction_name(method: str, extraction: str) -> str:
    """The stages.parquet name of the extraction an arm's learngene came from."""
    return method if extraction in ("", "fixed") else f"{method}/{extraction}"


def pretrain_share(ft: pd.DataFrame, stages: pd.DataFrame, col: str = "flops") -> pd.Series:
    """Each descendant's share of the pre-training behind it (DESIGN section 3: a stage's cost is
    shared equally by the descendants that use it). mmlg/tleg: its extraction's cost over the
    (modality, depth, width) cells of that arm; pt_ft/csm: the pre-trained shape's cost (the row's
    pretrain_flops or pretrain_device_s) over the modalities that use that shape at that budget.
    col: "flops" or "device_s"."""
    ext = {}
    for _, r in stages[stages.stage == "extraction"].iterrows():
        ext[str(r["name"])] = ext.get(str(r["name"]), 0.0) + float(r.get(col, 0) or 0)
    names = [_extraction_name(m, e) for m, e in zip(ft.method, ft.extraction)]
    n_cells = ft.assign(_n=names).groupby("_n")[CELL].apply(lambda d: len(d.drop_duplicates()))
    lg = pd.Series(
        [
            ext.get(n, 0.0) / max(1, int(n_cells.get(n, 1))) if m in LEARNGENE_METHODS else 0.0
            for n, m in zip(names, ft.method)
        ],
        index=ft.index,
        dtype=float,
    )
    own = ft["pretrain_flops" if col == "flops" else "pretrain_device_s"].astype(float).fillna(0.0)
    n_mod = ft.groupby(["arm", "depth", "width"]).modality.transform("nunique").clip(lower=1)
    return lg + own / n_mod


def total_cost_per_trial(ft: pd.DataFrame, stages: pd.DataFrame) -> pd.Series:
    """Training FLOPs that produced each descendant: fine-tuning + its share of the pre-training behind
    it (pretrain_share: its own shape's pre-training for pt_ft/csm, its learngene's extraction for
    mmlg/tleg, each shared equally by the descendants that use it)."""
    return ft.finetune_flops.astype(float) + pretrain_share(ft, stages, "flops")


def pareto(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    pts = points.sort_values([x, y], ascending=[True, False])
    best, keep = -math.inf, []
    for i, r in pts.iterrows():
        if r[y] > best:
            keep.append(i)
            best = r[y]
    return pts.loc[keep]


# --------------------------------------------------------------------------- significance
def compare_to_baselines(
    ft: pd.DataFrame, confidence: float = stats.CONFIDENCE, alpha: float = 0.05
) -> tuple[pd.DataFrame, str]:
    """MM-LG (each extraction mode) against every other arm in each cell (task, depth, width): mean
    test-score difference with its independent two-sample bootstrap CI, Welch's t-test, and the p-values
    corrected over every comparison in the table (Holm, family-wise; Benjamini-Hochberg beside it).
    Verdicts use Holm-corrected p < alpha only, and only where each side has >= MIN_SEEDS_TO_RANK seeds."""
    out = []
    done = set()
    for key, cell in ft.groupby(["task", "modality", "depth", "width"]):
        for arm in sorted(cell[cell.method == "mmlg"].arm.unique()):
            a = cell[cell.arm == arm].final_score.astype(float)
            for other, og in cell[cell.arm != arm].groupby("arm"):
                if (key, frozenset((arm, other))) in done:
                    continue
                done.add((key, frozenset((arm, other))))
                b = og.final_score.astype(float)
                d = stats.diff_ci(a, b, confidence)
                n = min(len(a), len(b))
                out.append(
                    {
                        "task": key[0],
                        "depth": key[2],
                        "width": key[3],
                        "arm": arm,
                        "vs": other,
                        "arm_mean": a.mean(),
                        "vs_mean": b.mean(),
                        "diff": d["diff"],
                        "diff_lo": d["lo"],
                        "diff_hi": d["hi"],
                        "n_arm": len(a),
                        "n_vs": len(b),
                        "p_welch": stats.welch_p(a, b) if n >= MIN_SEEDS_TO_RANK else float("nan"),
                    }
                )
    df = pd.DataFrame(out)
    if df.empty:
        return df, "No MM-LG trials to compare."
    # two families, each Holm-corrected on its own: the primary one is the paper's question (MM-LG with
    # the paper's fixed extraction against each baseline as the paper runs it: PT+FT at the extraction's
    # budget, TLEG fixed); the rest (elastic extraction, the other PT+FT budgets) is exploratory
    primary = {"tleg", "weight_selection", "heur_lg", "scratch", "pt_ft@1x", "csm"}
    df["family"] = ["primary" if a == "mmlg" and v in primary else "exploratory" for a, v in zip(df.arm, df.vs)]
    df["p_holm"] = float("nan")
    df["p_bh"] = float("nan")
    for fam, idx in df.groupby("family").groups.items():
        df.loc[idx, "p_holm"] = stats.holm(df.loc[idx, "p_welch"])
        df.loc[idx, "p_bh"] = stats.bh(df.loc[idx, "p_welch"])

    def verdict(r):
        n = min(r.n_arm, r.n_vs)
        if n < MIN_SEEDS_TO_RANK:
            return f"too few seeds (n={n}) to tell"
        if math.isnan(r.p_holm):
            return "not testable (no spread on either side)"
        if r.p_holm < alpha:
            return f"{r.arm} better" if r["diff"] > 0 else f"{r.arm} worse"
        return "no significant difference"

    df["verdict"] = df.apply(verdict, axis=1)
    n_tested = int(df.p_welch.notna().sum())
    n_min = int(ft.groupby(["arm"] + CELL).seed.nunique().min()) if len(ft) else 0
    note = (
        f"Differences are MM-LG minus the other arm, in test-score points, with a {confidence:.0%} bootstrap "
        f"interval (independent two-sample, scipy.stats.bootstrap). Welch t-tests where each side has at "
        f"least {MIN_SEEDS_TO_RANK} seeds ({n_tested} of {len(df)} comparisons); p-values Holm-corrected within "
        "each of two families: *primary* (MM-LG with fixed extraction against each baseline as the paper runs "
        "it: tleg, weight_selection, heur_lg, scratch, pt_ft@1x, csm; every cell) and *exploratory* (elastic "
        "extraction, the other PT+FT budgets); p_bh: Benjamini-Hochberg within the same family, for reference. "
        f"A verdict is a difference only where the Holm-corrected p < {alpha}."
    )
    if n_min < MIN_SEEDS_TO_RANK:
        note += (
            f" Some cells hold only {n_min} seed(s): at least {MIN_SEEDS_TO_RANK} per arm are needed to "
            "rank, so those differences are not ranked."
        )
    return df, note


def equal_accuracy_table(
    ft: pd.DataFrame, stages: pd.DataFrame, confidence: float = stats.CONFIDENCE, n_resamples: int = stats.N_RESAMPLES
) -> tuple[pd.DataFrame, dict]:
    """Per cell and learngene arm (mmlg, mmlg/elastic, tleg, ...): the pre-training compute at which
    PT+FT's ladder of budgets reaches the arm's mean test score (stats.equal_accuracy), against the
    arm's own share of its extraction. Compute per descendant as pretrain_share counts it. Returns the
    table and {(task, depth, width, arm): EqualAccuracy} for the plot."""
    ft = ft.assign(_flops=pretrain_share(ft, stages, "flops"), _dev=pretrain_share(ft, stages, "device_s"))
    rows, res = [], {}
    for key, cell in ft.groupby(["task", "modality", "depth", "width"]):
        pt = cell[cell.method == "pt_ft"]
        if pt.empty:
            continue
        steps = [(b, g) for b, g in pt.groupby("pt_budget")]
        ladder = [(float(g._flops.mean()), g.final_score.astype(float).values) for _, g in steps]
        ladder_dev = [(float(g._dev.mean()), g.final_score.astype(float).values) for _, g in steps]
        for arm, a in cell[cell.method.isin(LEARNGENE_METHODS)].groupby("arm"):
            own, own_dev = float(a._flops.mean()), float(a._dev.mean())
            ea = stats.equal_accuracy(ladder, a.final_score.astype(float).values, own, confidence, n_resamples, seed=0)
            res[(key[0], key[2], key[3], arm)] = ea
            c_dev, kind_dev = (
                stats.crossing([c for c, _ in ladder_dev], [s.mean() for _, s in ladder_dev], ea.target)
                if all(c > 0 for c, _ in ladder_dev)
                else (float("nan"), "undefined")
            )
            rows.append(
                {
                    "task": key[0],
                    "modality": key[1],
                    "depth": key[2],
                    "width": key[3],
                    "arm": arm,
                    "arm_score": ea.target,
                    "n_arm": len(a),
                    "budgets": ", ".join(f"{b:g}x" for b, _ in steps),
                    "ladder_scores": ", ".join(f"{m:.3g}" for _, m, _ in ea.ladder),
                    "kind": ea.kind,
                    "pt_ft_flops": ea.compute,
                    "pt_ft_flops_lo": ea.lo,
                    "pt_ft_flops_hi": ea.hi,
                    "arm_flops": own,
                    "saved_flops": ea.saved,
                    "ratio": ea.ratio,
                    "ratio_lo": ea.lo / own if own > 0 else float("nan"),
                    "ratio_hi": ea.hi / own if own > 0 else float("nan"),
                    "frac_never": ea.frac_never,
                    "frac_always": ea.frac_always,
                    "pt_ft_device_s": c_dev,
                    "kind_device_s": kind_dev,
                    "arm_device_s": own_dev,
                    "ratio_device_s": c_dev / own_dev if own_dev > 0 else float("nan"),
                }
            )
    return pd.DataFrame(rows), res


def equal_accuracy_sentence(r) -> str:
    """One line per row of equal_accuracy_table, in words."""
    h = _human
    if r.kind == "never":
        return (
            f"PT+FT does not reach it within the ladder (> {h(r.pt_ft_flops)} FLOPs); {r.arm} spends "
            f"{h(r.arm_flops)}: saves more than {h(r.saved_flops)} FLOPs (> {r.ratio:.3g}x)"
        )
    if r.kind == "always":
        return (
            f"PT+FT beats it at every budget (already at {h(r.pt_ft_flops)} FLOPs, the smallest); "
            f"{r.arm} spends {h(r.arm_flops)}: saves at most {h(r.saved_flops)} FLOPs"
        )
    if r.kind != "crossing":
        return "undefined (no ladder or no score)"
    word = "saves" if r.saved_flops >= 0 else "costs more by"
    return (
        f"PT+FT reaches it at {h(r.pt_ft_flops)} FLOPs ({stats.CONFIDENCE:.0%} interval "
        f"{_off_ladder(r.pt_ft_flops_lo, True)} to {_off_ladder(r.pt_ft_flops_hi, True)}); {r.arm} spends "
        f"{h(r.arm_flops)}: {word} {h(abs(r.saved_flops))} FLOPs (PT+FT needs {r.ratio:.3g}x)"
    )


def _off_ladder(v: float, words: bool = False) -> str:
    """An interval bound of the crossing: -inf = PT+FT reaches the score below the ladder's smallest
    budget, +inf = it does not reach it within the ladder."""
    if math.isinf(v):
        return (
            ("below the ladder" if words else "below ladder")
            if v < 0
            else ("beyond the ladder" if words else "beyond ladder")
        )
    return _human(v)


# --------------------------------------------------------------------------- plots
def _human(x, _pos=None) -> str:
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


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


# --------------------------------------------------------------------------- money
SPEND_STAGES = ("extraction", "pretrain", "finetune")
SHARING_RULE = (
    "A stage that serves several descendants is counted once per method: one extraction serves "
    "every cell of its learngene arm; one pre-training per shape (and budget) serves PT+FT's image, "
    "text and image-text descendants of that shape. The ancestor serves every method that reads it "
    "(the learngene methods, weight_selection, heur_lg, csm): its cost is on its own row and charged "
    "to none of them."
)


def _num(df: pd.DataFrame, col: str) -> pd.Series:
    return df[col].astype(float).fillna(0.0) if col in df else pd.Series(0.0, index=df.index)


def priced_dtype(cfg: Config, table: dict) -> str:
    """The precision the FLOPs-priced device-hours assume: the one the run's stages run in on
    report.device (cost.stage_dtypes: the config's `precision`, TF32 for fp32 on a GPU with tf32 on)."""
    return costmod.stage_dtypes(cfg, table=table)["finetune"]


def spend_table(trials: pd.DataFrame, stages: pd.DataFrame, cfg: Config, table: dict) -> pd.DataFrame:
    """What this sweep spent, per arm and stage (SHARING_RULE): each stage's FLOPs (the run's count)
    and measured device-seconds, as device-hours and money on report.device at report.pricing;
    beside them the device-hours and money the cost model gives for the same FLOPs (priced_dtype).
    Fine-tuning sums every trial of the arm (search, seeds and errored: all were paid for)."""
    t = normalize(trials)
    dev, pricing, dtype = cfg.report.device, cfg.report.pricing, priced_dtype(cfg, table)
    st = stages.assign(flops=_num(stages, "flops"), device_s=_num(stages, "device_s"), name=stages["name"].astype(str))
    rows = []

    def add(arm, method, stage, runs, flops, device_s):
        h, ph = device_s / 3600, costmod.device_hours(flops, dev, dtype, table)
        rows.append(
            {
                "arm": arm,
                "method": method,
                "stage": stage,
                "runs": int(runs),
                "flops": float(flops),
                "device_s": float(device_s),
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
                add(r.arm, r.method, "extraction", len(g), g.flops.sum(), g.device_s.sum())
        elif r.method in ("pt_ft", "csm"):
            pre = st[st.stage == "pretrain"]
            own = pre.name.str.split("/").str[0].str.split("@").str[0] == r.method
            if r.method == "pt_ft":
                own &= pre.name.map(_budget_of) == float(r.pt_budget)
            g = pre[own]
            if len(g):
                add(r.arm, r.method, "pretrain", len(g), g.flops.sum(), g.device_s.sum())
        g = t[t.arm == r.arm]
        add(r.arm, r.method, "finetune", len(g), _num(g, "finetune_flops").sum(), _num(g, "finetune_device_s").sum())
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
TARGET_RULE = (
    f"Targets per task: the scratch baseline's best cell (its highest mean test score over the "
    f"shapes it ran), and {TARGET_FRACTION:.0%} of the best mean test score of any arm and shape. An arm reaches a target "
    "with the cheapest shape whose mean test score (over seeds, of the validation-chosen trials) is at "
    "least the target; its confidence interval is beside it, and 'surely' means the interval's lower "
    "bound reaches the target too. Cheapest = least money for one descendant alone: its fine-tuning "
    "(mean over its seeds) plus the whole stage behind it (the extraction, or its shape's pre-training; "
    "the ancestor is charged to no method), as a team pays who needs just this one model; the 'in this "
    "sweep' column charges only its share of that stage (SHARING). Money = measured device-hours x the "
    "price of report.device."
)


def cost_to_target(
    ft: pd.DataFrame, stages: pd.DataFrame, cfg: Config, table: dict
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """TARGET_RULE. Returns (per task, target and arm: the cheapest cell reaching it; the cells with
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


# --------------------------------------------------------------------------- assembly
def software_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in (
        "mmlg_ray",
        "torch",
        "open_clip_torch",
        "ray",
        "deepspeed",
        "optuna",
        "pyarrow",
        "pandas",
        "jinja2",
        "matplotlib",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


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
    return [Section("How the scores were chosen and what a seed varies", reading_note(d.trials, d.ft))]


def sec_scores(d: ReportData) -> list[Section]:
    out = []
    for task in d.tasks:
        t = d.ft[d.ft.task == task]
        out.append(
            Section(
                f"Score against descendant size: {task}",
                [
                    Para(
                        f"Test set: {t.dataset.iloc[0]}; metric: {t.score_metric.iloc[0]} (test scores of the trials chosen "
                        f"as the first section says; error bars: {stats.CONFIDENCE:.0%} bootstrap CI of the mean over "
                        "seeds)."
                    ),
                    Figure(
                        f"score_vs_params_{task}.png", plot_score_vs_params(d.ft, task), f"score against size, {task}"
                    ),
                ],
                group="Score against descendant size",
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
        Section(
            "Device-hours and money per method and stage",
            [
                Para(
                    f"What this sweep spent, per arm (a method with its extraction mode or pre-training budget) and stage, "
                    f"priced on {d.rate()}. Measured: device-seconds the stages and trials recorded (wall time x devices, "
                    f"evaluation passes included). From FLOPs: the run's FLOP count through the cost model at {dtype} "
                    "(peak x utilization from the price table), what a plan would have said for the same work. "
                    "Measured money is right only when the run ran on report.device's device type.",
                    lead="Spend.",
                ),
                Para(SHARING_RULE, lead="Shared stages."),
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
    blocks = [Para(TARGET_RULE.replace("(SHARING)", "(the shared-stage rule of the section above)"), lead="Rule.")]
    for task in d.tasks:
        r = res[res.task == task]
        for name, v in targets.get(task, {}).items():
            x = r[r.target == name]
            best = x[x.cheapest]
            if len(best):
                b = best.iloc[0]
                blocks.append(
                    Para(
                        f"cheapest: {b.arm} at depth {int(b.depth)}, width {int(b.width)} "
                        f"({b['mean']:.3g}, CI {_ci(b.lo, b.hi)}), ${b.money_alone:.3g} alone "
                        f"({b.device_h_alone:.3g} device-h), ${b.money_shared:.3g} in this sweep.",
                        lead=f"{task}, target {name} = {v:.3g}:",
                    )
                )
            else:
                blocks.append(Para("no arm reaches it.", lead=f"{task}, target {name} = {v:.3g}:"))
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
    return [Section("Cost to reach a target score", blocks)]


def sec_pretraining(d: ReportData) -> list[Section]:
    ct = cost_table(d.trials, d.stages, d.cfg, d.anc_spec)
    d.tables["cost"] = ct
    mm = ct.set_index("method")
    blocks = []
    if "mmlg" in mm.index and "pt_ft" in mm.index:
        r = mm.loc["mmlg"]
        ra, rm = r.pretrain_ratio_pt_ft_over_method_analytic, r.pretrain_ratio_pt_ft_over_method_measured
        blocks.append(
            Para(
                f"MM-LG stores {r.storage_vs_pt_ft * 100:.1f}% of the parameters PT+FT stores (paper: ~25%). Pre-training "
                f"all {int(mm.loc['pt_ft'].get('n_shapes', 0)) or ''} descendant shapes costs {ra:.2f}x the extraction "
                "analytically"
                + (f" and {rm:.2f}x in measured device-seconds" if not math.isnan(rm) else "")
                + " (paper: ~2.8x)"
                + (
                    "; here the extraction costs more than PT+FT, because the descendant set is "
                    "small next to the ancestor"
                    if ra < 1
                    else ""
                )
                + ". The ratio grows with the number of descendant sizes: PT+FT pays per size, MM-LG once.",
                lead="MM-LG against PT+FT on this descendant set:",
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
        Para(
            "Bars are exact counts (parameters, FLOPs) and single measurements (device-seconds): no "
            "interval applies."
        ),
        Figure("costs.png", plot_costs(ct), "storage and pre-training compute"),
    ]
    return [Section("Pre-training compute and storage against PT+FT", blocks)]


def sec_pareto(d: ReportData) -> list[Section]:
    out = []
    for task in d.tasks:
        png, front = plot_pareto(d.ft, task)
        names = ", ".join(f"{r.arm} (depth {r.depth}, width {r.width})" for _, r in front.iterrows())
        out.append(
            Section(
                f"Pareto frontier, score against total cost: {task}",
                [
                    Para(
                        f"On the frontier (by mean score): {names}. Total cost = fine-tuning FLOPs + the descendant's share "
                        "of the pre-training behind it: its shape's pre-training (pt_ft, csm; shared by the modalities that "
                        "use that shape) or its learngene's extraction (mmlg, tleg; shared by the cells it serves). Error "
                        f"bars: {stats.CONFIDENCE:.0%} CI of the mean score over seeds."
                    ),
                    Figure(f"pareto_{task}.png", png, f"Pareto frontier, {task}"),
                ],
                group="Pareto frontier, score against total cost",
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
        Section(
            "Mean score and spread over seeds, per grid cell",
            [
                Para(
                    f"Test scores (mean over seeds, {stats.CONFIDENCE:.0%} bootstrap CI of the mean, n seeds) of the "
                    "validation-chosen trials; val mean is their validation score."
                ),
                Table(show),
            ],
        ),
        Section("MM-LG against each baseline", [Para(note.replace("*", "")), Table(comp_show)]),
        Section("Fixed against elastic extraction, at every width", fixed_vs_elastic(d.ft)),
    ]


def sec_equal_accuracy(d: ReportData) -> list[Section]:
    eq, eq_res = equal_accuracy_table(d.ft, d.stages)
    if len(eq):
        d.tables["equal_accuracy"] = eq
    blocks = [
        Para(
            "The learngene arm's own compute is its extraction's cost shared equally by the descendants it "
            "initialized in this sweep, so that side of the saving shrinks as a sweep grows more sizes from one "
            "extraction (the unshared extraction cost is in the cost table above); PT+FT's side is its ladder, "
            "measured per shape. The ancestor's own pre-training is counted on neither side."
        )
    ]
    blocks += equal_accuracy_blocks(eq)
    if eq_res:
        blocks.append(
            Figure(
                "equal_accuracy.png",
                plot_equal_accuracy(d.ft, d.stages, eq_res),
                "PT+FT's ladder against each learngene arm",
            )
        )
    return [Section("Savings at equal accuracy", blocks)]


def plan_against_run(d: ReportData) -> tuple[list[str], pd.DataFrame]:
    """The dry-run plan's assumptions in words, and a table of what it would count against what ran."""
    t, cfg = normalize(d.trials), d.cfg
    fc, tune = cfg.descendants.finetune, cfg.ray.tune
    n_seeds = len(cfg.descendants.seeds)
    n_cells = t.groupby(ARM_KEYS + CELL, dropna=False).ngroups
    per_cell = tune.num_samples + max(0, n_seeds - 1)
    full, cache = 0.0, {}
    for key, n in t.groupby(["modality", "depth", "width"]).size().items():
        try:
            spec = cache.setdefault(key[1:], descendant_spec(d.anc_spec, int(key[1]), int(key[2])))
            full += costmod.train_flops(spec, key[0], fc.steps * fc.batch_size) * n
        except Exception:  # a shape the current ancestor spec cannot grow (old results): no full budget
            full = float("nan")
    ran = float(_num(t, "finetune_flops").sum())
    stopped = int(t.stopped_early.fillna(False).astype(bool).sum()) if "stopped_early" in t else 0
    searched = "phase" in t and t.phase.notna().any()
    dtype = priced_dtype(cfg, d.prices)
    try:
        dev = d.prices[cfg.report.device]
        peak = f"{dev['peak_tflops'][dtype]:g} TFLOP/s peak x {dev['utilization']:g} utilization"
    except (KeyError, TypeError):
        peak = "the price table's peak x utilization"
    words = [
        f"Trials: the plan counts every grid cell as ray.tune.num_samples ({tune.num_samples}) search trials plus "
        f"the other {max(0, n_seeds - 1)} seed(s) on the Ray backend: {n_cells} x {per_cell} = {n_cells * per_cell} "
        f"trials here; the local backend runs each cell once per seed ({n_cells * n_seeds}). This run: "
        f"{len(t)} trials ({'Ray backend, with a search phase' if searched else 'no search phase'}).",
        f"Fine-tuning: the plan charges each trial its full budget (descendants.finetune.steps {fc.steps} x batch "
        f"{fc.batch_size}), an upper bound: ASHA (grace_period {tune.grace_period}, reduction_factor "
        f"{tune.reduction_factor}) stops trials early on the Ray backend. This run: {_human(ran)} of "
        f"{_human(full) if not math.isnan(full) else '?'} full-budget fine-tuning FLOPs"
        + (f" ({ran / full:.0%})" if full and not math.isnan(full) else "")
        + f"; {stopped} trial(s) stopped early.",
        "Evaluation: excluded. The plan's FLOPs and every FLOP column of this report count training only (forward + "
        "backward = 3 forward passes, teacher forward passes included in extraction); the validation passes every "
        f"eval_every ({fc.eval_every}) steps and the final test pass are not counted. Measured device-seconds "
        "include them.",
        f"Precision: the plan and this report price each stage at the precision it runs in (precision "
        f"{cfg.precision}, tf32 {cfg.tf32}): {dtype} on {cfg.report.device}, at {peak}.",
        "The ancestor: priced on its own row (its pre-training when it is the local ancestor, nothing when it is a "
        "downloaded checkpoint); report.ancestor is "
        + (f"'{cfg.report.ancestor}': " if hasattr(cfg.report, "ancestor") else "")
        + (
            "charged to no method (a sunk cost every method shares)."
            if getattr(cfg.report, "ancestor", "sunk") == "sunk"
            else "split equally among the methods that read it in the plan; this report's spend table still shows it "
            "on its own row."
        ),
    ]
    table = pd.DataFrame(
        [
            {"quantity": "trials", "plan": n_cells * per_cell, "run": len(t)},
            {"quantity": "fine-tuning FLOPs", "plan": full, "run": ran},
            {"quantity": "trials stopped early", "plan": 0, "run": stopped},
        ]
    )
    return words, table


def sec_plan(d: ReportData) -> list[Section]:
    words, table = plan_against_run(d)
    return [
        Section(
            "What the dry-run plan assumes, against what ran",
            [Para("`jobs/sweep.py --dry-run` prices a sweep before it runs. Its rules:"), Bullets(words), Table(table)],
        )
    ]


def sec_provenance(d: ReportData) -> list[Section]:
    lg = d.stages[d.stages.stage == "extraction"]
    lg_fps = []
    from mmlg_ray.method.learngene import load_learngene

    for _, r in lg.iterrows():
        try:
            lg_fps.append(f"{r['name']}: {load_learngene(r['artifact']).meta.tensors_sha256}")
        except Exception:
            lg_fps.append(f"{r['name']}: (artifact not readable from here: {r.get('artifact')})")
    m = d.anc_meta
    prov = [
        f"ancestor: {m.get('source', '?')}, fingerprint {m.get('fingerprint', '?')}",
        *[
            f"the ancestor's own retrieval on {v.get('set', k)} ("
            + (
                "validation split, a downstream set no training stage sees"
                if k.endswith("_val")
                else "held-out test split of its own corpus"
            )
            + f", {v.get('pairs', '?')} pairs, before any fine-tuning): mean recall "
            f"{v.get('mean_recall', float('nan')):.1f} against a chance level of {v.get('chance_mean_recall', float('nan')):.1f} "
            f"({v.get('over_chance', float('nan')):.2f}x chance; one-sided permutation test against chance, "
            f"{v.get('permutations', '?')} random pairings: p = {v.get('p_vs_chance', float('nan')):.3g})"
            for k, v in (m.get("own_retrieval") or {}).items()
        ],
        "learngene sha256: " + ("; ".join(lg_fps) or "none"),
        f"trials: {len(d.trials)} ({len(d.ft)} measuring the cells); built "
        f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "software: " + ", ".join(f"{k} {v}" for k, v in software_versions().items()),
    ]
    return [
        Section("Provenance: config, fingerprints, software", [Bullets(prov), Code(dump_config(d.cfg).strip(), "yaml")])
    ]


# The report's sections, in order: each builder reads ReportData and returns its sections (none when it
# has nothing to show). To add one, write `def sec_x(d: ReportData) -> list[Section]` and insert it here;
# the table of contents follows.
def sec_rehearsal(d: ReportData) -> list[Section]:
    """A rehearsed sweep (jobs/rehearse.py): worker nodes per node type over time, events marked, and the
    rehearsal's checks."""
    path = d.out / "cluster_timeline.parquet"
    if not path.exists():
        return []
    from mmlg_ray.engine import rehearsal

    tl = pd.read_parquet(path)
    try:
        summary = json.loads((d.out / "rehearsal.json").read_text())
    except (OSError, ValueError):
        summary = {}
    blocks = [
        Para(
            "cluster.yaml's node types as fake nodes on one machine (Ray's fake_multinode provider, CPUs "
            "standing in for GPUs), the job submitted with ray job submit, one spot node preempted "
            "mid-sweep (every process of it killed at once). Nodes are sampled every "
            f"{tl.t_s.drop_duplicates().diff().median():.0f} s; the idle timeout was "
            f"{summary.get('idle_timeout_s', float('nan')):.0f} s.",
            lead="What ran.",
        ),
        Figure("cluster_timeline.png", rehearsal.plot_timeline(tl), "worker nodes per node type over time"),
    ]
    types = set(tl.node_type)
    ev = (
        tl[tl.event != ""]
        .groupby(["t_s", "event"], sort=True)
        .node_type.agg(lambda x: "all" if set(x) == types else ", ".join(sorted(set(x))))
        .reset_index()
    )
    if len(ev):
        blocks.append(Table(ev[["t_s", "node_type", "event"]], "Events (node_type: the type it concerns, or all)"))
    if summary.get("checks"):
        blocks.append(
            Table(
                pd.DataFrame(summary["checks"]),
                f"The rehearsal's checks: {summary.get('wall_s', '?')} "
                f"s wall, {summary.get('trials', '?')} of {summary.get('expected_trials', '?')} trials",
            )
        )
    return [Section("Cluster rehearsal: autoscaling and preemption", blocks)]


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


def sec_timeline(d: ReportData) -> list[Section]:
    """When each stage, pre-training task and trial ran: trials that need no pre-trained shape start
    while the shapes pre-train; a pt_ft / csm trial starts once its shape is written."""
    path = d.out / "timeline.parquet"
    if not path.exists():
        return []
    tl = pd.read_parquet(path)
    if tl.empty:
        return []
    pre = tl[tl.stage == "pretrain"]
    trials = tl[tl.stage == "trial"]
    lines = [
        f"{len(trials)} trials, {len(pre)} shapes pre-trained in this run, over "
        f"{tl.end_s.max():.0f} s of wall clock."
    ]
    if len(pre) and len(trials):
        early = trials[(trials.start_s < pre.end_s.max()) & trials.what.str.contains("needs none")]
        lines.append(
            f"{len(early)} trials of methods that need no pre-trained shape started before the last "
            f"shape was written (at {pre.end_s.max():.0f} s)."
        )
    d.tables["timeline"] = tl[["stage", "name", "what", "start_s", "end_s"]]
    return [
        Section("Stage timeline", [Para(" ".join(lines)), Figure("timeline.png", plot_timeline(tl), "what ran when")])
    ]


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
