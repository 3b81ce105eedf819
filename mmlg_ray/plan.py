"""The plan of a sweep before anything runs: stages, trials, parameter counts, FLOPs, device-hours
and money (analytic; `jobs/sweep.py --dry-run` prints it)."""
from __future__ import annotations

from dataclasses import dataclass, field

from . import cost
from .config import Config, ModelSpec
from .descend import descendant_spec
from .models import towers_of
from .pipeline import aux_spec, cells, elastic_plan, learngene_arms, needs_pretraining, pretrain_name


@dataclass
class Plan:
    stages: list[dict] = field(default_factory=list)
    descendants: list[dict] = field(default_factory=list)
    n_trials: int = 0
    total_flops: float = 0.0
    device: str = ""
    pricing: str = ""
    device_hours: float = 0.0
    money: float = 0.0


def ancestor_spec_of(cfg: Config) -> ModelSpec:
    return cfg.ancestor.spec  # config.py reads it from open_clip's model config when ancestor.arch is set


def make_plan(cfg: Config) -> Plan:
    table = cost.price_table(cfg.report)
    rc = cfg.report
    anc = ancestor_spec_of(cfg)
    p = Plan(device=rc.device, pricing=rc.pricing)

    def add_stage(stage, name, flops, extra=None):
        h = cost.device_hours(flops, rc.device, rc.dtype, table)
        p.stages.append({"stage": stage, "name": name, "flops": flops, "device_hours": h,
                         "money": cost.money(h, rc.device, rc.pricing, table), **(extra or {})})

    if cfg.ancestor.source == "local":
        pc = cfg.ancestor.pretrain
        add_stage("ancestor", "pre-train local CLIP (skipped when cached)",
                  cost.train_flops(anc, "image_text", pc.steps * pc.batch_size), {"params": cost.model_params(anc)})
    ec = cfg.learngene.extraction
    samples = ec.steps * ec.batch_size
    for m, mode in learngene_arms(cfg):
        f = cost.extraction_flops(aux_spec(cfg, anc), anc, samples)
        if mode == "elastic":  # the sampled descendant shapes' forward and backward passes too
            f += elastic_plan(cfg, anc).train_flops(ec.steps, ec.batch_size)
        add_stage("extraction", m if mode == "fixed" else f"{m}/{mode}", f)
    pre_steps = cfg.descendants.pretrain_steps or ec.steps
    for method, spec, budget in needs_pretraining(cfg, anc):
        n = max(1, round(pre_steps * budget)) * ec.batch_size
        f = cost.train_flops(spec, "image_text", n)
        if method == "csm":
            f += cost.forward_flops(anc) * n
        add_stage("pretrain", pretrain_name(method, spec, budget), f, {"params": cost.model_params(spec)})
    fc = cfg.descendants.finetune
    n_seeds = len(cfg.descendants.seeds)
    per_cell = cfg.ray.tune.num_samples + max(0, n_seeds - 1)
    for c in cells(cfg):
        spec = descendant_spec(anc, c.depth, c.width)
        f = cost.train_flops(spec, c.modality, fc.steps * fc.batch_size)
        towers = towers_of(c.modality)
        p.descendants.append({
            "method": c.arm, "modality": c.modality, "depth": c.depth, "width": c.width,
            "image": f"{spec.image_depth}x{spec.image_width}" if "image" in towers else "-",
            "text": f"{spec.text_depth}x{spec.text_width}" if "text" in towers else "-",
            "params": cost.model_params(spec, c.modality), "finetune_flops": f, "trials": per_cell})
        p.n_trials += per_cell
        p.total_flops += f * per_cell
    p.total_flops += sum(s["flops"] for s in p.stages)
    p.device_hours = cost.device_hours(p.total_flops, rc.device, rc.dtype, table)
    p.money = cost.money(p.device_hours, rc.device, rc.pricing, table)
    return p


def format_plan(p: Plan) -> str:
    lines = ["Plan (analytic; nothing is trained)", "", "Stages:"]
    for s in p.stages:
        lines.append(f"  {s['stage']:<11} {s['name']:<46} {s['flops']:>10.3g} FLOPs  "
                     f"{s['device_hours']:>8.3g} {p.device}-h  ${s['money']:.2f}")
    lines += ["", f"Descendants ({len(p.descendants)} grid cells, {p.n_trials} trials):",
              f"  {'method':<17}{'modality':<11}{'image':>8}{'text':>8}{'params':>12}{'FLOPs/trial':>13}{'trials':>7}"]
    for d in p.descendants:
        lines.append(f"  {d['method']:<17}{d['modality']:<11}{d['image']:>8}{d['text']:>8}{d['params']:>12,}"
                     f"{d['finetune_flops']:>13.3g}{d['trials']:>7}")
    lines += ["", f"Total: {p.total_flops:.3g} training FLOPs = {p.device_hours:.3g} {p.device} device-hours "
              f"= ${p.money:.2f} ({p.pricing})"]
    return "\n".join(lines)
