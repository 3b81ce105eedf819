"""What MM-LG saves against pre-training + fine-tuning every descendant shape (PT+FT), as analysis.
Run by hand:

    .venv/bin/python benchmarks/cost_savings.py                                  # paper scale, analytic
    .venv/bin/python benchmarks/cost_savings.py --results runs/study_cpu         # + a finished local sweep
    .venv/bin/python benchmarks/cost_savings.py --calibrate                      # + utilisation of this machine

Definitions (one accounting, the one the report and the plan use, mmlg_ray/cost/):
  storage ratio  = MM-LG's stored parameters (learngene layer blocks + inherited non-layer tensors)
                   / the parameters of the pre-trained CLIPs PT+FT stores (one per descendant shape;
                   a shape's image, text and image_text descendants share it)
  compute ratio  = PT+FT's pre-training / MM-LG's extraction (frozen teacher's forward included),
                   each pre-training or extraction counted once. A ratio of FLOPs is only ever compared
                   with a ratio of FLOPs, a ratio of device-seconds with one of device-seconds.
  budget         = pre-training samples per shape / extraction samples (descendants.pretrain_steps).

Sections: (1) local measured next to local analytic and paper-scale analytic; (2) sensitivity of the
savings to the number of shapes, the pre-training budget, the price and the utilisation; (3) which of
the paper's figures (~25% storage and ~2.8x compute for MM-LG) this accounting reproduces together.
Nothing here searches descendant sets for the paper's numbers: the sets are the configs' own grids.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path


from mmlg_ray import cost
from mmlg_ray.config import ModelSpec, load_config
from mmlg_ray.method.descend import descendant_spec
from mmlg_ray.method.learngene import aux_spec
from mmlg_ray.engine.plan import ancestor_spec_of

ROOT = Path(__file__).resolve().parents[1]
PAPER = {"storage": 0.25, "compute": 2.8}  # MM-LG's claims against PT+FT


def learngene_params(ax: ModelSpec) -> dict:
    """MM-LG's stored parameters: shared + per-tower layer blocks, and the inherited non-layer
    tensors (of which the token embedding)."""
    r = {t: ax.mlp_ratio_of(t) for t in ("image", "text")}
    blocks = cost.layer_params(max(ax.width(t) for t in r), max(r.values())) + sum(
        cost.layer_params(ax.width(t), r[t]) for t in r
    )
    inherited = cost.model_params(ax) - sum(cost.tower_params(ax, t, True) for t in r)
    return {
        "blocks": blocks,
        "inherited": inherited,
        "token_embedding": ax.vocab_size * ax.text_width,
        "stored": blocks + inherited,
    }


def study(cfg, shapes=None, budget: float | None = None) -> dict:
    """Analytic storage and compute of MM-LG and PT+FT for cfg's grid (or `shapes`, a list of
    (depth, width)) at `budget` (default: the config's)."""
    anc = ancestor_spec_of(cfg)
    ax = aux_spec(cfg, anc)
    g, ec = cfg.descendants.grid, cfg.learngene.extraction
    shapes = shapes or list(itertools.product(g.depth, g.width))
    budget = budget if budget is not None else (cfg.descendants.pretrain_steps or ec.steps) / ec.steps
    specs = [descendant_spec(anc, d, w) for d, w in shapes]
    samples = ec.steps * ec.batch_size
    lg = learngene_params(ax)
    pt_params = sum(cost.model_params(s) for s in specs)
    pt_flops = sum(cost.train_flops(s, "image_text", round(budget * samples)) for s in specs)
    ext_flops = cost.extraction_flops(ax, anc, samples)
    return {
        "anc": anc,
        "ax": ax,
        "lg": lg,
        "n_shapes": len(specs),
        "budget": budget,
        "pt_params": pt_params,
        "pt_flops": pt_flops,
        "ext_flops": ext_flops,
        "storage": lg["stored"] / pt_params,
        "compute": pt_flops / ext_flops,
        "flops_per_param": pt_flops / pt_params,
    }


def money_of(flops: float, cfg, device=None, pricing=None, utilization=None, table=None) -> tuple[float, float]:
    """(device-hours, USD) of `flops` run in cfg's precision on the report's device."""
    table = table or cost.price_table(cfg.report)
    device = device or cfg.report.device
    dt = cost.stage_dtypes(cfg, device, table)["pretrain"]
    h = cost.device_hours(flops, device, dt, table, utilization)
    return h, cost.money(h, device, pricing or cfg.report.pricing, table)


# --------------------------------------------------------------------------- (1) side by side
def measured(results: Path) -> dict | None:
    """Measured compute of a finished sweep: device-seconds and FLOPs of the mmlg extraction and of
    the pt_ft pre-trainings at the sweep's 1x budget (each stage once)."""
    import pandas as pd
    import yaml

    import warnings

    from mmlg_ray.config import config_from_dict

    with warnings.catch_warnings():  # an earlier run's config.yaml may carry the retired report.dtype
        warnings.simplefilter("ignore")
        cfg = config_from_dict(yaml.safe_load((results / "config.yaml").read_text()))
    st = pd.read_parquet(results / "stages.parquet")
    ext = st[(st.stage == "extraction") & (st.name == "mmlg")]
    pt = st[(st.stage == "pretrain") & st.name.str.startswith("pt_ft/") & st.name.str.endswith("@1x")]
    if ext.empty or pt.empty:
        return None
    table = cost.price_table(cfg.report)
    dev, dt = cfg.report.device, cost.stage_dtypes(cfg, cfg.report.device, table)["extraction"]
    peak = cost.peak_flops(dev, dt, table)
    predicted = {
        n: cost.device_hours(f, dev, dt, table) * 3600 for n, f in (("ext", ext.flops.sum()), ("pt", pt.flops.sum()))
    }
    return {
        "cfg": cfg,
        "n_shapes": len(pt),
        "ext_flops": float(ext.flops.sum()),
        "pt_flops": float(pt.flops.sum()),
        "ext_s": float(ext.device_s.sum()),
        "pt_s": float(pt.device_s.sum()),
        "predicted_s": predicted,
        "util_ext": float(ext.flops.sum()) / float(ext.device_s.sum()) / peak,
        "util_pt": float(pt.flops.sum()) / float(pt.device_s.sum()) / peak,
        "device": dev,
        "dtype": dt,
    }


def side_by_side(paper_cfg, local_cfg, results: Path | None):
    P, L = study(paper_cfg), study(local_cfg)
    M = measured(results) if results else None
    cols = ["local analytic", "local measured", "paper-scale analytic"]
    print("(1) Local measured, local analytic and paper-scale analytic, side by side")
    if M is not None:
        L = study(M["cfg"], budget=1.0)
        print(f"    local: {results} ({M['n_shapes']} shapes at budget 1x, device '{M['device']}', {M['dtype']})")
    else:
        print("    local: configs/local.yaml's grid (no --results given: no measured column)")
    print(
        f"    paper scale: {paper_cfg.ancestor.arch or 'ancestor'}, {P['n_shapes']} shapes, budget {P['budget']:g}x, "
        f"{paper_cfg.report.device} {paper_cfg.precision}"
    )
    na = "n/a"

    def line(name, loc, meas, pap):
        print(f"    {name:<52}{loc:>18}{meas:>18}{pap:>22}")

    line("", *cols)
    line("ancestor parameters", f"{cost.model_params(L['anc']):,}", na, f"{cost.model_params(P['anc']):,}")
    line("MM-LG stored parameters", f"{L['lg']['stored']:,}", "(exact count)", f"{P['lg']['stored']:,}")
    line(
        "  of which the token embedding",
        f"{L['lg']['token_embedding'] / L['lg']['stored']:.0%}",
        na,
        f"{P['lg']['token_embedding'] / P['lg']['stored']:.0%}",
    )
    line("PT+FT stored parameters (one CLIP per shape)", f"{L['pt_params']:,}", "(exact count)", f"{P['pt_params']:,}")
    line("storage ratio MM-LG / PT+FT", f"{L['storage']:.1%}", na, f"{P['storage']:.1%}")
    line(
        "extraction FLOPs (teacher included)",
        f"{L['ext_flops']:.3g}",
        f"{M['ext_flops']:.3g}" if M else na,
        f"{P['ext_flops']:.3g}",
    )
    line(
        "PT+FT pre-training FLOPs (each shape once, 1x)",
        f"{L['pt_flops']:.3g}",
        f"{M['pt_flops']:.3g}" if M else na,
        f"{P['pt_flops']:.3g}",
    )
    line(
        "compute ratio, FLOPs: PT+FT / MM-LG",
        f"{L['compute']:.2f}x",
        f"{M['pt_flops'] / M['ext_flops']:.2f}x" if M else na,
        f"{P['compute']:.2f}x",
    )
    if M:
        pr = M["predicted_s"]
        line("extraction device-seconds (predicted | measured)", f"{pr['ext']:.0f}", f"{M['ext_s']:.0f}", na)
        line("PT+FT device-seconds (predicted | measured)", f"{pr['pt']:.0f}", f"{M['pt_s']:.0f}", na)
        line(
            "compute ratio, device-seconds: PT+FT / MM-LG",
            f"{pr['pt'] / pr['ext']:.2f}x",
            f"{M['pt_s'] / M['ext_s']:.2f}x",
            na,
        )
        line("utilisation implied (extraction | pre-training)", na, f"{M['util_ext']:.2f} | {M['util_pt']:.2f}", na)
    ph, pm = money_of(P["ext_flops"], paper_cfg)
    qh, qm = money_of(P["pt_flops"], paper_cfg)
    line(f"extraction / PT+FT device-hours ({paper_cfg.report.device})", na, na, f"{ph:,.1f} / {qh:,.1f}")
    line(f"extraction / PT+FT money ({paper_cfg.report.pricing})", na, na, f"${pm:,.0f} / ${qm:,.0f}")
    print("    A run records the analytic FLOPs of the samples it ran, so its FLOP column equals the analytic one when")
    print("    every step ran; what it measures is device-seconds.")
    print("    The predicted device-seconds assume the table's utilisation for the device; the measured ones say what")
    print("    it was (last row). The predicted ratio of device-seconds equals the FLOP ratio only when both stages")
    print("    run at the same dtype and utilisation; the measured one differs by how well each stage uses the device.")
    return P


# --------------------------------------------------------------------------- (2) sensitivity
def sensitivity(cfg):
    g = cfg.descendants.grid
    grid = list(itertools.product(g.depth, g.width))
    base = study(cfg)
    table = cost.price_table(cfg.report)
    dev = cfg.report.device
    print(
        "\n(2) Sensitivity of MM-LG's savings against PT+FT (paper preset; pre-training only, fine-tuning is the same"
    )
    print("    for both methods and left out). Shapes: the grid's first k shapes in grid order (not chosen).")
    print(f"    {'varied':<28}{'value':>12}{'storage':>10}{'compute':>10}{'PT+FT - MM-LG':>16}{'saved':>12}")

    def row(name, value, s, h_saved, m_saved):
        print(
            f"    {name:<28}{value:>12}{s['storage']:>9.1%}{s['compute']:>9.2f}x{h_saved:>13,.0f} h{m_saved:>11,.0f}$"
        )

    for k in sorted({1, 3, 6, len(grid)}):
        s = study(cfg, shapes=grid[:k])
        h, m = money_of(s["pt_flops"] - s["ext_flops"], cfg)
        row("number of shapes", k, s, h, m)
    for b in (0.25, 0.5, 1.0, 2.0, 4.0):
        s = study(cfg, budget=b)
        h, m = money_of(s["pt_flops"] - s["ext_flops"], cfg)
        row("pre-training budget", f"{b:g}x", s, h, m)
    d = base["pt_flops"] - base["ext_flops"]
    for pricing in ("spot", "on_demand"):
        h, m = money_of(d, cfg, pricing=pricing)
        row("price", f"{pricing} ${table[dev][pricing]}", base, h, m)
    for u in (0.2, 0.4, 0.6):
        h, m = money_of(d, cfg, utilization=u)
        row("utilisation", f"{u:g}", base, h, m)
    print("    Price and utilisation scale the hours and money saved but leave both ratios unchanged (every stage runs")
    print(
        "    in the same precision); the number of shapes moves both ratios; the budget moves only the compute ratio."
    )
    return base


# --------------------------------------------------------------------------- (3) the paper's figures
def paper_figures(base):
    s, c, fpp = base["storage"], base["compute"], base["flops_per_param"]
    stored, ext = base["lg"]["stored"], base["ext_flops"]
    # a descendant set with the preset's mix of shapes, scaled in number until storage is 25%:
    # PT+FT's parameters are stored / 0.25, its FLOPs those parameters x the preset's FLOPs per parameter
    c_at_25 = (stored / PAPER["storage"]) * fpp / ext
    b_needed = PAPER["compute"] / c_at_25
    print("\n(3) The paper's MM-LG figures under this accounting")
    print(
        f"    preset grid ({base['n_shapes']} shapes, budget {base['budget']:g}x): storage {s:.1%} (paper ~25%), "
        f"compute {c:.2f}x (paper ~2.8x)"
    )
    print(
        f"    Storage depends only on the descendant set. A set with the preset's mix of shapes whose storage ratio "
        f"is 25% has {stored / PAPER['storage'] / 1e6:.0f}M PT+FT parameters, and at the preset's budget a compute "
        f"ratio of {c_at_25:.2f}x."
    )
    both = abs(c_at_25 - PAPER["compute"]) / PAPER["compute"] < 0.15
    if both:
        print("    So ~25% storage and ~2.8x compute hold together at the preset's budget.")
    else:
        print(
            f"    So ~25% storage and ~2.8x compute cannot both hold at equal per-shape pre-training budget: together "
            f"they need PT+FT to pre-train each shape on {b_needed:.2f}x the preset's samples per shape "
            f"({b_needed * base['budget']:.2f}x the extraction's). Either figure alone is reproducible (a set for "
            "the storage, a budget for the compute); both together only with that budget, which the paper's text "
            "would have to state."
        )


# --------------------------------------------------------------------------- calibration
def calibrate(cfg, device: str = "cpu"):
    spec = ancestor_spec_of(cfg)
    m = cost.measure_training_step(spec, batch=32, precision=cfg.precision, device=device, warmup=2, repeats=5)
    table = cost.price_table(cfg.report)
    dt = cost.stage_dtypes(cfg, cfg.report.device, table)["pretrain"]
    c = cost.calibrate_utilization(m["analytic_flops"], m["median_s"], cfg.report.device, dt, table)
    print(
        f"\nCalibration on this machine ({device}, {cfg.precision}): one training step of the local ancestor "
        f"(batch 32): median {m['median_s'] * 1e3:.0f} ms (min {m['min_s'] * 1e3:.0f}, max {m['max_s'] * 1e3:.0f}, "
        f"{m['repeats']} repeats after 2 warm-up)"
    )
    print(
        f"    FLOPs: analytic {m['analytic_flops']:.3g}, torch flop counter {m['counted_flops']:.3g}; achieved "
        f"{c['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s = utilisation {c['utilization']:.2f} of "
        f"{cfg.report.device}'s {dt} peak {c['peak_flops_per_s'] / 1e12:g} TFLOP/s "
        f"(table: {table[cfg.report.device]['utilization']}); put it in report.prices to use it"
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs/paper_vitb16.yaml"), help="the paper-scale preset")
    p.add_argument("--local-config", default=str(ROOT / "configs/local.yaml"))
    p.add_argument("--results", default=None, help="a finished sweep's output folder (measured column)")
    p.add_argument("--calibrate", action="store_true", help="measure a training step here and the utilisation")
    a = p.parse_args(argv)
    paper_cfg, local_cfg = load_config(a.config), load_config(a.local_config)
    side_by_side(paper_cfg, local_cfg, Path(a.results) if a.results else None)
    base = sensitivity(paper_cfg)
    paper_figures(base)
    if a.calibrate:
        calibrate(local_cfg)


if __name__ == "__main__":
    main()
