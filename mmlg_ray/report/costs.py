"""Cost tables: each arm's compute (FLOPs, device-hours) including its share of the extraction and pre-training it used, Pareto fronts, comparisons with the baselines, the equal-accuracy table."""

from __future__ import annotations

import math

import pandas as pd

from mmlg_ray import cost as costmod
from mmlg_ray.report import stats
from mmlg_ray.config import Config, ModelSpec
from mmlg_ray.method.descend import descendant_spec
from mmlg_ray.method.learngene import Learngene, LearngeneMeta, aux_spec
from mmlg_ray.config import LEARNGENE_METHODS
from mmlg_ray.report.tables import CELL, MIN_SEEDS_TO_RANK, _human, normalize


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
