"""The report's run sections: the plan against the run, provenance, the rehearsal, the stage timeline."""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform

import pandas as pd

from mmlg_ray import cost as costmod
from mmlg_ray.config import dump_config
from mmlg_ray.method.descend import descendant_spec
from mmlg_ray.report.texts import para, section
from mmlg_ray.report.render import Bullets, Code, Figure, Section, Table
from mmlg_ray.report.tables import ARM_KEYS, CELL, _human, normalize
from mmlg_ray.report.sections import ReportData
from mmlg_ray.report.spend import _num, priced_dtype
from mmlg_ray.report.plots import plot_timeline


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
    return [section("plan", [para("plan"), Bullets(words), Table(table)])]


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
    return [section("provenance", [Bullets(prov), Code(dump_config(d.cfg).strip(), "yaml")])]


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
        para(
            "rehearsal",
            every=tl.t_s.drop_duplicates().diff().median(),
            idle=summary.get("idle_timeout_s", float("nan")),
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
    return [section("rehearsal", blocks)]


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
    blocks = [para("timeline", trials=len(trials), shapes=len(pre), wall=tl.end_s.max())]
    if len(pre) and len(trials):
        early = trials[(trials.start_s < pre.end_s.max()) & trials.what.str.contains("needs none")]
        blocks.append(para("timeline_early", early=len(early), last=pre.end_s.max()))
    d.tables["timeline"] = tl[["stage", "name", "what", "start_s", "end_s"]]
    return [section("timeline", blocks + [Figure("timeline.png", plot_timeline(tl), "what ran when")])]
