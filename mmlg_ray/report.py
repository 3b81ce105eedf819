"""The cost-comparison report of a finished sweep: report.html (self-contained, plots embedded),
report.md (same content, plots beside it as PNG) and cost.parquet, under OUTPUT/report/.

    python jobs/report.py OUTPUT
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import cost as costmod
from .atomic import atomic_dir
from .config import Config, ModelSpec, config_from_dict, dump_config
from .descend import descendant_spec
from .errors import UserError
from .pipeline import aux_spec

LEARNGENE_METHODS = ("mmlg", "tleg")
MIN_SEEDS_TO_RANK = 3
COLORS = {"mmlg": "#d62728", "tleg": "#ff7f0e", "weight_selection": "#2ca02c", "heur_lg": "#9467bd",
          "scratch": "#7f7f7f", "pt_ft": "#1f77b4", "csm": "#8c564b"}


@dataclass
class Section:
    title: str
    md: str  # markdown body (tables, text)
    figure: str | None = None  # png file name


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


def final_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials that measure each cell: per cell, the best search trial (first seed) and the
    seeds-phase trials at its hyper-parameters; without phases (local backend) every trial."""
    if "phase" not in trials or trials.phase.isna().all():
        return trials
    keys = ["method", "modality", "depth", "width"]
    search = trials[trials.phase == "search"]
    best = search.loc[search.groupby(keys)["final_score"].idxmax()] if len(search) else search
    return pd.concat([best, trials[trials.phase == "seeds"]], ignore_index=True)


def cell_table(ft: pd.DataFrame) -> pd.DataFrame:
    g = ft.groupby(["task", "modality", "depth", "width", "method"])
    t = g.agg(params=("params", "first"), seeds=("seed", "nunique"), mean=("final_score", "mean"),
              std=("final_score", "std"), score_metric=("score_metric", "first")).reset_index()
    return t.sort_values(["task", "depth", "width", "mean"], ascending=[True, True, True, False])


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
    lg_layers = costmod.layer_params(max(ax.image_width, ax.text_width), max(
        ax.mlp_ratio_of(t) for t in ("image", "text"))) + sum(
        costmod.layer_params(ax.width(t), ax.mlp_ratio_of(t)) for t in ("image", "text"))
    lg_inherited = costmod.model_params(ax) - costmod.tower_params(ax, "image", True) - costmod.tower_params(
        ax, "text", True)
    tleg_layers = 2 * sum(costmod.layer_params(ax.width(t), ax.mlp_ratio_of(t)) for t in ("image", "text"))
    st = stages.copy()
    measured = {}
    for _, r in st.iterrows():
        key = r["stage"], str(r["name"]).split("/")[0]
        m = measured.setdefault(key, {"flops": 0.0, "device_s": 0.0})
        m["flops"] += float(r.get("flops", 0) or 0)
        m["device_s"] += float(r.get("device_s", 0) or 0)
    anc_params = costmod.model_params(anc_spec)
    rows = []

    def row(method, stored, pre_flops_analytic, src_key, note):
        meas = measured.get(src_key, {})
        rows.append({"method": method, "stored_params": int(stored), "pretrain_flops_analytic": float(pre_flops_analytic),
                     "pretrain_flops_measured": float(meas.get("flops", float("nan"))),
                     "pretrain_device_s_measured": float(meas.get("device_s", float("nan"))), "note": note})

    extraction_flops = costmod.extraction_flops(ax, anc_spec, samples)
    row("mmlg", lg_layers + lg_inherited, extraction_flops, ("extraction", "mmlg"),
        "learngene (shared + unimodal blocks) + inherited tensors; one extraction")
    row("tleg", tleg_layers + lg_inherited, extraction_flops, ("extraction", "tleg"),
        "per-tower A, B blocks + inherited tensors; one extraction")
    row("pt_ft", sum(costmod.model_params(s) for s in shapes.values()),
        sum(costmod.train_flops(s, "image_text", pre_samples) for s in shapes.values()), ("pretrain", "pt_ft"),
        f"one pre-trained CLIP per descendant shape ({len(shapes)} shapes)")
    row("csm", sum(costmod.model_params(s) for s in shapes.values()),
        sum(costmod.train_flops(s, "image_text", pre_samples) + costmod.forward_flops(anc_spec) * pre_samples
            for s in shapes.values()), ("pretrain", "csm"), "one distilled CLIP per descendant shape")
    for m in ("weight_selection", "heur_lg"):
        row(m, anc_params, 0.0, ("none", m), "reads the stored ancestor; no pre-training stage of its own")
    row("scratch", 0, 0.0, ("none", "scratch"), "nothing stored, nothing pre-trained")
    df = pd.DataFrame(rows)
    df["n_shapes"] = len(shapes)
    base = df.set_index("method").loc["pt_ft"]
    df["storage_vs_pt_ft"] = df.stored_params / base.stored_params
    df["pretrain_ratio_pt_ft_over_method_analytic"] = base.pretrain_flops_analytic / df.pretrain_flops_analytic.where(
        df.pretrain_flops_analytic > 0)
    df["pretrain_ratio_pt_ft_over_method_measured"] = base.pretrain_device_s_measured / \
        df.pretrain_device_s_measured.where(df.pretrain_device_s_measured > 0)
    present = set(trials.method) if len(trials) else set()
    return df[df.method.isin(present) | df.method.isin(["mmlg", "pt_ft"])].reset_index(drop=True)


def total_cost_per_trial(ft: pd.DataFrame, stages: pd.DataFrame) -> pd.Series:
    """Training FLOPs that produced each descendant: fine-tuning + its own pre-training (pt_ft, csm)
    + an equal share of its learngene's extraction (mmlg, tleg)."""
    n_desc = ft[ft.method.isin(LEARNGENE_METHODS)].groupby("method")[["modality", "depth", "width"]].apply(
        lambda d: len(d.drop_duplicates()))
    ext = {str(r["name"]): float(r["flops"]) for _, r in stages[stages.stage == "extraction"].iterrows()}
    share = ft.method.map(lambda m: ext.get(m, 0.0) / max(1, int(n_desc.get(m, 1))) if m in ext else 0.0)
    return ft.finetune_flops.astype(float) + ft.pretrain_flops.astype(float) + share


def pareto(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    pts = points.sort_values([x, y], ascending=[True, False])
    best, keep = -math.inf, []
    for i, r in pts.iterrows():
        if r[y] > best:
            keep.append(i)
            best = r[y]
    return pts.loc[keep]


# --------------------------------------------------------------------------- significance
def compare_to_baselines(ft: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """MM-LG against every other method in each cell: mean difference, Welch t-test when each side
    has >= MIN_SEEDS_TO_RANK seeds; otherwise the verdict says there are too few seeds."""
    from scipy import stats
    out = []
    for key, cell in ft.groupby(["task", "depth", "width"]):
        mm = cell[cell.method == "mmlg"].final_score
        if mm.empty:
            continue
        for m, other in cell[cell.method != "mmlg"].groupby("method"):
            o = other.final_score
            n = min(len(mm), len(o))
            diff = mm.mean() - o.mean()
            if n < MIN_SEEDS_TO_RANK:
                verdict, p = f"too few seeds (n={n}) to tell", float("nan")
            else:
                p = float(stats.ttest_ind(mm, o, equal_var=False).pvalue)
                verdict = ("mmlg better" if diff > 0 else "mmlg worse") if p < 0.05 else "no significant difference"
            out.append({"task": key[0], "depth": key[1], "width": key[2], "vs": m, "mmlg_mean": mm.mean(),
                        "other_mean": o.mean(), "diff": diff, "n": n, "p_value": p, "verdict": verdict})
    df = pd.DataFrame(out)
    n_min = int(ft.groupby(["method", "modality", "depth", "width"]).seed.nunique().min()) if len(ft) else 0
    note = (f"Each cell holds {n_min} seed(s); at least {MIN_SEEDS_TO_RANK} per method are needed for a Welch "
            "t-test, so differences below are not ranked." if n_min < MIN_SEEDS_TO_RANK else
            f"Welch t-tests over {n_min}+ seeds per method; p < 0.05 counts as a difference.")
    return df, note


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


def plot_score_vs_params(ft: pd.DataFrame, task: str) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    d = ft[ft.task == task]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for m, g in d.groupby("method"):
        s = g.groupby("params").final_score.agg(["mean", "std"]).reset_index()
        ax.errorbar(s.params, s["mean"], yerr=s["std"].fillna(0), marker="o", capsize=3, label=m,
                    color=COLORS.get(m), linewidth=2.2 if m == "mmlg" else 1.2)
    _log_x(ax)
    ax.set_xlabel("descendant parameters")
    ax.set_ylabel(f"{d.score_metric.iloc[0]} (%)")
    ax.set_title(f"{task}: score vs size (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
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
    axes[1].bar([i - 0.2 for i in x], d.pretrain_flops_analytic, width=0.4, label="plan (config budget)",
                color="#bbbbbb")
    axes[1].bar([i + 0.2 for i in x], d.pretrain_flops_measured.fillna(0), width=0.4,
                label="run (samples actually processed)", color=colors)
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
    pts = d.groupby(["method", "depth", "width"]).agg(score=("final_score", "mean"),
                                                     cost=("total_flops", "mean")).reset_index()
    front = pareto(pts, "cost", "score")
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for m, g in pts.groupby("method"):
        ax.scatter(g.cost, g.score, label=m, color=COLORS.get(m), s=36)
    ax.plot(front.cost, front.score, "k--", linewidth=1, label="Pareto frontier")
    for _, r in front.iterrows():
        ax.annotate(f"{r.method} d{r.depth} w{r.width}", (r.cost, r.score), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    _log_x(ax)
    ax.set_xlabel("total training FLOPs behind the descendant")
    ax.set_ylabel("score (%)")
    ax.set_title(f"{task}: score vs total cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _fig_png(fig), front


# --------------------------------------------------------------------------- assembly
def _md_table(df: pd.DataFrame, floatfmt: str = ".3g") -> str:
    if df.empty:
        return "_(none)_"
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, float):
                cells.append("" if math.isnan(v) else format(v, floatfmt))
            elif isinstance(v, int) and abs(v) >= 10000:
                cells.append(f"{v:,}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def software_versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in ("mmlg_ray", "torch", "open_clip_torch", "ray", "deepspeed", "optuna", "pyarrow", "pandas"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def build_report(out_dir) -> Path:
    out = Path(out_dir)
    trials, stages, hist, cfg, anc_meta = load_results(out)
    if trials.empty:
        raise UserError("OUTPUT", f"{out}/trials.parquet holds no trials", "run the sweep first")
    anc_spec = ModelSpec(**anc_meta["spec"]) if "spec" in anc_meta else cfg.ancestor.spec
    ok = trials.task.notna()
    if "status" in trials:  # errored trials are listed in trials.parquet, never scored or plotted
        ok &= trials.status != "error"
    ft = final_trials(trials[ok]).copy()
    ft["total_flops"] = total_cost_per_trial(ft, stages)
    sections: list[Section] = []
    figures: dict[str, bytes] = {}

    # 1. scores
    for task in sorted(ft.task.unique()):
        name = f"score_vs_params_{task}.png"
        figures[name] = plot_score_vs_params(ft, task)
        sections.append(Section(f"Score against descendant size: {task}",
                                f"Test set: {ft[ft.task == task].dataset.iloc[0]}; metric: "
                                f"{ft[ft.task == task].score_metric.iloc[0]}.", name))
    # 2. costs
    ct = cost_table(trials, stages, cfg, anc_spec)
    figures["costs.png"] = plot_costs(ct)
    mm = ct.set_index("method")
    lines = []
    if "mmlg" in mm.index and "pt_ft" in mm.index:
        r = mm.loc["mmlg"]
        ra, rm = r.pretrain_ratio_pt_ft_over_method_analytic, r.pretrain_ratio_pt_ft_over_method_measured
        lines.append(
            f"**MM-LG against PT+FT on this descendant set:** MM-LG stores {r.storage_vs_pt_ft * 100:.1f}% of the "
            f"parameters PT+FT stores (paper: ~25%). Pre-training all {int(mm.loc['pt_ft'].get('n_shapes', 0)) or ''} "
            f"descendant shapes costs {ra:.2f}x the extraction analytically"
            + (f" and {rm:.2f}x in measured device-seconds" if not math.isnan(rm) else "")
            + " (paper: ~2.8x)" + ("; here the extraction costs more than PT+FT, because the descendant set is "
                                    "small next to the ancestor" if ra < 1 else "")
            + ". The ratio grows with the number of descendant sizes: PT+FT pays per size, MM-LG once.")
    show = ct[["method", "stored_params", "storage_vs_pt_ft", "pretrain_flops_analytic", "pretrain_flops_measured",
               "pretrain_device_s_measured", "pretrain_ratio_pt_ft_over_method_analytic",
               "pretrain_ratio_pt_ft_over_method_measured"]].rename(columns={
                   "stored_params": "stored params", "storage_vs_pt_ft": "storage / PT+FT",
                   "pretrain_flops_analytic": "pre-train FLOPs (plan)", "pretrain_flops_measured": "pre-train FLOPs (run)",
                   "pretrain_device_s_measured": "pre-train device-s (measured)",
                   "pretrain_ratio_pt_ft_over_method_analytic": "PT+FT / method (FLOPs)",
                   "pretrain_ratio_pt_ft_over_method_measured": "PT+FT / method (device-s)"})
    notes = "\n".join(f"- {r.method}: {r.note}" for r in ct.itertuples())
    sections.append(Section("Pre-training compute and storage against PT+FT",
                            "\n\n".join(lines + [_md_table(show), notes]), "costs.png"))
    # 3. Pareto
    for task in sorted(ft.task.unique()):
        png, front = plot_pareto(ft, task)
        name = f"pareto_{task}.png"
        figures[name] = png
        names = ", ".join(f"{r.method} (depth {r.depth}, width {r.width})" for _, r in front.iterrows())
        sections.append(Section(f"Pareto frontier, score against total cost: {task}",
                                f"On the frontier: {names}. Total cost = fine-tuning FLOPs + the descendant's own "
                                "pre-training (pt_ft, csm) + an equal share of its learngene's extraction "
                                "(mmlg, tleg).", name))
    # 4. per cell
    ctab = cell_table(ft)
    sections.append(Section("Mean score and spread over seeds, per grid cell", _md_table(ctab)))
    comp, note = compare_to_baselines(ft)
    sections.append(Section("MM-LG against each baseline", note + "\n\n" + _md_table(comp)))
    # 5. provenance
    lg = stages[stages.stage == "extraction"]
    lg_fps = []
    from .learngene import load_learngene
    for _, r in lg.iterrows():
        try:
            lg_fps.append(f"{r['name']}: {load_learngene(r['artifact']).meta.tensors_sha256}")
        except Exception:
            lg_fps.append(f"{r['name']}: (artifact not readable from here: {r.get('artifact')})")
    prov = [f"- ancestor: `{anc_meta.get('source', '?')}`, fingerprint `{anc_meta.get('fingerprint', '?')}`",
            "- learngene sha256: " + ("; ".join(f"`{x}`" for x in lg_fps) or "none"),
            f"- trials: {len(trials)} ({len(ft)} measuring the cells); built "
            f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
            "- software: " + ", ".join(f"{k} {v}" for k, v in software_versions().items()),
            "", "```yaml", dump_config(cfg).strip(), "```"]
    sections.append(Section("Provenance: config, fingerprints, software", "\n".join(prov)))
    costs_out = ct.copy()

    with atomic_dir(out / "report") as tmp:
        for name, png in figures.items():
            (tmp / name).write_bytes(png)
        costs_out.to_parquet(tmp / "cost.parquet", index=False)
        (tmp / "report.md").write_text(render_md(sections))
        (tmp / "report.html").write_text(render_html(sections, figures))
    return out / "report"


def build_output_report(out) -> str:
    """build_report for an output folder that may be a URI (an OutputDir, or a local path): its tables
    and run files are fetched to the staging folder, the report is built there and uploaded to
    OUTPUT/report/. Returns where report.html is."""
    from .storage import OutputDir
    od = out if isinstance(out, OutputDir) else OutputDir(out)
    for name in ("trials.parquet", "stages.parquet", "history.parquet", "config.yaml", "ancestor.json"):
        od.fetch(name)
    build_report(od.local)
    od.push("report")
    return od.uri("report/report.html")


def render_md(sections: list[Section]) -> str:
    parts = ["# mmlg_ray sweep report", ""]
    for s in sections:
        parts += [f"## {s.title}", "", s.md, ""]
        if s.figure:
            parts += [f"![{s.title}]({s.figure})", ""]
    return "\n".join(parts)


def _md_to_html(md: str) -> str:
    """Enough markdown for our own output: tables, paragraphs, bullet lists, code blocks, bold."""
    out, lines, i = [], md.splitlines(), 0
    while i < len(lines):
        ln = lines[i]
        if ln.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append("<pre>" + html.escape("\n".join(lines[i + 1:j])) + "</pre>")
            i = j + 1
            continue
        if ln.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(lines[i])
                i += 1
            head = [c.strip() for c in rows[0].strip("|").split("|")]
            body = [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]
            t = "<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"
            for r in body:
                t += "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
            out.append(t + "</tbody></table>")
            continue
        if ln.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(lines[i][2:])
                i += 1
            out.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in items) + "</ul>")
            continue
        if ln.strip():
            out.append(f"<p>{_inline(ln)}</p>")
        i += 1
    return "\n".join(out)


def _inline(text: str) -> str:
    import re
    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    t = re.sub(r"`(.+?)`", r"<code>\1</code>", t)
    return re.sub(r"_\((.+?)\)_", r"<i>(\1)</i>", t)


def render_html(sections: list[Section], figures: dict[str, bytes]) -> str:
    css = ("body{font-family:system-ui,sans-serif;max-width:1180px;margin:24px auto;padding:0 16px;color:#222}"
           "h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}"
           "table{border-collapse:collapse;font-size:12px;margin:8px 0;display:block;overflow-x:auto}"
           "th,td{border:1px solid #ddd;padding:3px 7px;text-align:right}th{background:#f4f4f4}"
           "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
           "pre{background:#f7f7f7;padding:8px;font-size:11px;overflow-x:auto}nav a{margin-right:12px}")
    toc = "".join(f'<a href="#s{i}">{html.escape(s.title.split(":")[0])}</a>' for i, s in enumerate(sections)
                  if not s.title.endswith(tuple(f": {t}" for t in ("retrieval", "text_classification"))))
    body = [f"<!doctype html><html><head><meta charset='utf-8'><title>mmlg_ray sweep report</title>"
            f"<style>{css}</style></head><body><h1>mmlg_ray sweep report</h1><nav>{toc}</nav>"]
    for i, s in enumerate(sections):
        body.append(f'<h2 id="s{i}">{html.escape(s.title)}</h2>')
        body.append(_md_to_html(s.md))
        if s.figure:
            b64 = base64.b64encode(figures[s.figure]).decode()
            body.append(f'<img alt="{html.escape(s.title)}" src="data:image/png;base64,{b64}">')
    body.append("</body></html>")
    return "\n".join(body)
