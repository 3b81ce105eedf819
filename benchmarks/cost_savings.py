"""Storage and pre-training cost of MM-LG against pre-training + fine-tuning every descendant (PT+FT),
analytic at paper scale, and (with --results) measured on a finished sweep. Run by hand:

    .venv/bin/python benchmarks/cost_savings.py [--config configs/paper_vitb16.yaml]
    .venv/bin/python benchmarks/cost_savings.py --results runs/local

Storage ratio  = (learngene + inherited non-layer tensors) / sum of the PT+FT descendants' parameters
Compute ratio  = sum over descendant sizes of pre-training FLOPs / extraction FLOPs (teacher included)
Both depend on the descendant set and on the pre-training budget per size relative to the extraction
budget; the script says which sets and budgets give the paper's figures.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmlg_ray import cost  # noqa: E402
from mmlg_ray.config import ModelSpec, load_config  # noqa: E402
from mmlg_ray.descend import descendant_spec  # noqa: E402
from mmlg_ray.learngene import aux_spec  # noqa: E402
from mmlg_ray.plan import ancestor_spec_of  # noqa: E402

PAPER = {"MM-LG storage": 0.25, "MM-LG compute": 2.8, "TLEG storage": 1 / 19, "TLEG compute": 5.0}


def learngene_params(ax: ModelSpec, shared: bool = True, towers=("image", "text")) -> tuple[int, int]:
    """(layer-block parameters, inherited non-layer parameters) of a learngene."""
    r = {t: ax.mlp_ratio_of(t) for t in towers}
    if shared:
        blocks = cost.layer_params(max(ax.width(t) for t in towers), max(r.values())) + sum(
            cost.layer_params(ax.width(t), r[t]) for t in towers)
    else:
        blocks = 2 * sum(cost.layer_params(ax.width(t), r[t]) for t in towers)
    modality = "image_text" if len(towers) == 2 else towers[0]
    inherited = cost.model_params(ax, modality) - sum(cost.tower_params(ax, t, True) for t in towers)
    return blocks, inherited


def ratios(anc: ModelSpec, ax: ModelSpec, depths, widths, budget: float = 1.0, modality="image_text",
           shared=True):
    """storage ratio, compute ratio (PT+FT / extraction) for one descendant set; `budget` = pre-training
    samples per descendant size / extraction samples."""
    towers = ("image", "text") if modality == "image_text" else (modality,)
    shapes = [descendant_spec(anc, d, w) for d, w in itertools.product(depths, widths)]
    blocks, inh = learngene_params(ax, shared, towers)
    pt_params = sum(cost.model_params(s, modality) for s in shapes)
    pt_flops = budget * sum(cost.train_flops(s, modality, 1) for s in shapes)
    ext = cost.train_flops(ax, modality, 1) + cost.forward_flops(anc, modality)
    return (blocks + inh) / pt_params, pt_flops / ext, len(shapes)


def analytic(cfg_path: str):
    cfg = load_config(cfg_path)
    anc = ancestor_spec_of(cfg)
    ax = aux_spec(cfg, anc)
    g = cfg.descendants.grid
    print(f"Ancestor: image {anc.image_depth}x{anc.image_width}, text {anc.text_depth}x{anc.text_width} "
          f"({cost.model_params(anc) / 1e6:.1f}M params); auxiliary model depths {ax.image_depth}/{ax.text_depth}")
    blocks, inh = learngene_params(ax)
    print(f"MM-LG learngene: {blocks / 1e6:.1f}M layer-block params + {inh / 1e6:.1f}M inherited = "
          f"{(blocks + inh) / 1e6:.1f}M stored\n")
    s, c, n = ratios(anc, ax, g.depth, g.width)
    print(f"Preset descendant set (depths {g.depth} x widths {g.width} = {n} image-text CLIPs), equal budget "
          f"(each size pre-trained on as many samples as the extraction):")
    print(f"  MM-LG storage {s * 100:.1f}% of PT+FT (paper ~25%);  PT+FT pre-training = {c:.2f}x the extraction "
          f"(paper ~2.8x)\n")
    print("Which descendant sets give the paper's figures (equal budget per size):")
    print(f"  {'depths':<26}{'widths':<18}{'n':>4}{'storage':>10}{'compute':>10}")
    cands = []
    depth_sets = [[12], [6, 12], [6, 9, 12], [6, 8, 10, 12], list(range(4, 13, 2)), list(range(6, 13)),
                  list(range(1, 13))]
    width_sets = [[anc.image_width], [anc.image_width // 2, anc.image_width],
                  [anc.image_width // 2, anc.image_width * 3 // 4, anc.image_width]]
    for ds, ws in itertools.product(depth_sets, width_sets):
        s_, c_, n_ = ratios(anc, ax, ds, ws)
        cands.append((abs(s_ - 0.25) / 0.25 + abs(c_ - 2.8) / 2.8, ds, ws, n_, s_, c_))
    for _, ds, ws, n_, s_, c_ in sorted(cands)[:6]:
        print(f"  {str(ds):<26}{str(ws):<18}{n_:>4}{s_ * 100:>9.1f}%{c_:>9.2f}x")
    best = min(cands)
    need = 2.8 / ratios(anc, ax, g.depth, g.width)[1]
    print(f"  closest: depths {best[1]} x widths {best[2]}; for the preset set, a pre-training budget of "
          f"{need:.2f}x the extraction's samples per size gives 2.8x\n")
    # TLEG: ViT only, per-tower learngene, descendants of several depths at full width
    ts, tc, tn = ratios(anc, ax, list(range(6, 13)), [anc.image_width], modality="image", shared=False)
    print(f"TLEG (image tower only, depths 6..12 at full width, {tn} ViTs, equal budget): storage {1 / ts:.1f}x less "
          f"(paper ~19x), pre-training {tc:.2f}x less (paper ~5x)")
    ts2, tc2, tn2 = ratios(anc, ax, list(range(1, 13)), [anc.image_width], modality="image", shared=False)
    print(f"TLEG (depths 1..12, {tn2} ViTs): storage {1 / ts2:.1f}x less, pre-training {tc2:.2f}x less")


def measured(results: str):
    import pandas as pd
    import yaml
    from mmlg_ray.config import config_from_dict
    out = Path(results)
    cfg = config_from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    stages = pd.read_parquet(out / "stages.parquet")
    anc = ancestor_spec_of(cfg)
    ax = aux_spec(cfg, anc)
    g = cfg.descendants.grid
    ext = stages[(stages.stage == "extraction") & (stages.name == "mmlg")]
    pt = stages[(stages.stage == "pretrain") & stages.name.str.startswith("pt_ft/")]
    if ext.empty or pt.empty:
        print(f"{results}: needs an mmlg extraction and pt_ft pre-training stages")
        return
    table = cost.price_table(cfg.report)
    print(f"\nMeasured on {results} (descendant set: depths {g.depth} x widths {g.width}; "
          f"device '{cfg.report.device}' for predicted seconds):")
    ec = cfg.learngene.extraction
    pre_steps = cfg.descendants.pretrain_steps or ec.steps
    s_an, c_an, n = ratios(anc, ax, g.depth, g.width, budget=pre_steps / ec.steps)
    rows = [("extraction (mmlg)", float(ext.flops.iloc[0]), float(ext.device_s.iloc[0]))]
    rows += [(f"pre-train {r['name']}", float(r.flops), float(r.device_s)) for _, r in pt.iterrows()]
    print(f"  {'stage':<36}{'FLOPs':>11}{'predicted s':>13}{'measured s':>12}{'rel. error':>11}")
    for name, f, ds in rows:
        pred = cost.device_hours(f, cfg.report.device, cfg.report.dtype, table) * 3600
        print(f"  {name:<36}{f:>11.3g}{pred:>13.1f}{ds:>12.1f}{(pred - ds) / ds * 100:>10.0f}%")
    c_meas = float(pt.device_s.sum()) / float(ext.device_s.iloc[0])
    print(f"  compute ratio PT+FT / MM-LG: analytic {c_an:.3f}x, measured (device-seconds) {c_meas:.3f}x, "
          f"relative error of the analytic model {(c_an - c_meas) / c_meas * 100:+.0f}%")
    print(f"  storage: MM-LG {s_an * 100:.1f}% of PT+FT (exact parameter counts; nothing to measure)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs/paper_vitb16.yaml"))
    p.add_argument("--results", default=None, help="a finished sweep's output folder")
    a = p.parse_args(argv)
    analytic(a.config)
    if a.results:
        measured(a.results)


if __name__ == "__main__":
    main()
