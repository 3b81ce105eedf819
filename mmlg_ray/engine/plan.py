"""The plan of a sweep before anything runs: stages, trials, parameter counts, FLOPs, device-hours
and money (analytic; `jobs/sweep.py --dry-run` prints it).

Each stage is priced at the dtype it runs in (cost.stage_dtypes: the top-level `precision`, TF32
for fp32 on a GPU with `tf32: true`). A pre-trained shape (pt_ft, csm) is one stage shared by its
arm's image, text and image_text descendants; an extraction is one stage shared by all its arm's
cells; per method, each is counted once (cost.method_costs). The ancestor is shown apart and counted
by report.ancestor. The plan's assumptions are listed with it (Plan.assumptions)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmlg_ray import cost
from mmlg_ray.config import Config, ModelSpec
from mmlg_ray.method.descend import descendant_spec
from mmlg_ray.method.learngene import aux_spec
from mmlg_ray.method.models import towers_of
from mmlg_ray.engine.pipeline import cells, elastic_plan, learngene_arms, needs_pretraining, pretrain_name

BACKENDS = ("ray", "local")


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
    backend: str = "ray"
    dtypes: dict = field(default_factory=dict)  # stage -> the dtype it is priced at
    head_instance: str = ""
    head_hours: float = 0.0  # the head node's hours (ray backend): a lower bound
    head_money: float = 0.0
    methods: list[dict] = field(default_factory=list)  # per arm, shared stages counted once (cost.method_costs)
    assumptions: list[str] = field(default_factory=list)


def ancestor_spec_of(cfg: Config) -> ModelSpec:
    return cfg.ancestor.spec  # mmlg_ray/config/base.py reads it from open_clip's model config when ancestor.arch is set


def trials_per_cell(cfg: Config, backend: str = "ray") -> int:
    """The search's num_samples at the first seed, then one trial per further seed (both backends
    run the same search, mmlg_ray.engine.search)."""
    return cfg.ray.tune.num_samples + max(0, len(cfg.descendants.seeds) - 1)


def make_plan(cfg: Config, backend: str = "ray") -> Plan:
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: one of {BACKENDS}")
    import pandas as pd

    prices = cost.load_prices(cfg.report)
    table = {k: v.model_dump() for k, v in prices.devices.items()}
    rc = cfg.report
    anc = ancestor_spec_of(cfg)
    dtypes = cost.stage_dtypes(cfg, rc.device, table)
    p = Plan(device=rc.device, pricing=rc.pricing, backend=backend, dtypes=dtypes)
    # parallel devices per stage (ray): extraction on num_workers, pre-training and trials max_concurrent at once
    par = {
        "ancestor": 1,
        "extraction": cfg.ray.num_workers if backend == "ray" else 1,
        "pretrain": cfg.ray.tune.max_concurrent if backend == "ray" else 1,
        "finetune": cfg.ray.tune.max_concurrent * cfg.ray.tune.trial_workers if backend == "ray" else 1,
    }
    wall = 0.0

    def hours(flops, stage):
        return cost.device_hours(flops, rc.device, dtypes[stage], table)

    def add_stage(stage, name, flops, extra=None):
        nonlocal wall
        h = hours(flops, stage)
        wall += h / par[stage]
        p.stages.append(
            {
                "stage": stage,
                "name": name,
                "flops": flops,
                "dtype": dtypes[stage],
                "device_hours": h,
                "money": cost.money(h, rc.device, rc.pricing, table),
                **(extra or {}),
            }
        )

    if cfg.ancestor.source == "local":
        pc = cfg.ancestor.pretrain
        add_stage(
            "ancestor",
            "pre-train local CLIP (skipped when cached)",
            cost.train_flops(anc, "image_text", pc.steps * pc.batch_size),
            {"params": cost.model_params(anc)},
        )
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
    per_cell = trials_per_cell(cfg, backend)
    trial_rows = []
    ft_flops = 0.0
    for c in cells(cfg):
        spec = descendant_spec(anc, c.depth, c.width)
        f = cost.train_flops(spec, c.modality, fc.steps * fc.batch_size)
        towers = towers_of(c.modality)
        p.descendants.append(
            {
                "method": c.arm,
                "modality": c.modality,
                "depth": c.depth,
                "width": c.width,
                "image": f"{spec.image_depth}x{spec.image_width}" if "image" in towers else "-",
                "text": f"{spec.text_depth}x{spec.text_width}" if "text" in towers else "-",
                "params": cost.model_params(spec, c.modality),
                "finetune_flops": f,
                "trials": per_cell,
            }
        )
        trial_rows += [
            {
                "arm": c.arm,
                "modality": c.modality,
                "depth": c.depth,
                "width": c.width,
                "finetune_flops": f,
                "finetune_device_s": 0.0,
            }
        ] * per_cell
        p.n_trials += per_cell
        ft_flops += f * per_cell
    ft_hours = hours(ft_flops, "finetune")
    wall += ft_hours / par["finetune"]
    p.total_flops = ft_flops + sum(s["flops"] for s in p.stages)
    p.device_hours = ft_hours + sum(s["device_hours"] for s in p.stages)
    p.money = cost.money(p.device_hours, rc.device, rc.pricing, table)
    if backend == "ray" and prices.head is not None:
        p.head_instance, p.head_hours = prices.head.instance, wall
        p.head_money = wall * prices.head.on_demand
    mc = cost.method_costs(
        pd.DataFrame(trial_rows),
        pd.DataFrame(
            [{"stage": s["stage"], "name": s["name"], "flops": s["flops"], "device_s": 0.0} for s in p.stages],
            columns=["stage", "name", "flops", "device_s"],
        ),
        device=rc.device,
        pricing=rc.pricing,
        table=table,
        precision=cfg.precision,
        tf32=dtypes["finetune"] == "tf32",
        ancestor=rc.ancestor,
    )
    p.methods = mc[
        [
            "method",
            "n_cells",
            "n_trials",
            "shared_stages",
            "shared_flops",
            "finetune_flops",
            "ancestor_flops",
            "total_flops",
            "device_hours_analytic",
            "money_analytic",
            "counted",
        ]
    ].to_dict("records")
    p.assumptions = assumptions(cfg, backend, dtypes, prices, per_cell)
    return p


def assumptions(cfg: Config, backend: str, dtypes: dict, prices, per_cell: int) -> list[str]:
    rc, dev = cfg.report, cfg.report.device
    d = prices.devices[dev]
    dt = sorted(set(dtypes.values()))
    out = [
        f"backend={backend}: "
        + (
            f"extraction on Ray Train ({cfg.ray.num_workers} workers), trials on Ray Tune: "
            f"{cfg.ray.tune.num_samples} search trials per cell at the first seed + one trial "
            f"per further seed = {per_cell} trials per cell"
            if backend == "ray"
            else f"every stage in one process, the same search one trial at a time = {per_cell} "
            "trials per cell, no head node"
        ),
        "ASHA upper bound: every trial runs all its fine-tuning steps (ASHA stopping trials early only lowers the "
        "cost)"
        if backend == "ray"
        else "no ASHA (local backend): every trial runs all its steps",
        "evaluation excluded: validation/test passes, linear probes and zero-shot scoring are not counted "
        "(forward passes only; small next to training at these step counts)",
        f"precision: every stage runs in precision={cfg.precision}"
        + (f" (tf32={cfg.tf32})" if cfg.precision == "fp32" else "")
        + f" -> priced at the {'/'.join(dt)} peak of "
        f"{dev}: {'/'.join(f'{d.peak_tflops[x]:g}' for x in dt)} TFLOP/s x utilisation {d.utilization:g} "
        "(an assumption until calibrated: cost.calibrate_utilization)",
        "FLOPs: forward + backward = 3 x forward (multiply-add = 2), attention included; optimizer, data loading "
        "and communication not counted",
        f"price: {prices.provider} {prices.region}, {d.instance} ({d.gpus_per_instance} device(s)) {rc.pricing} "
        f"${getattr(d, rc.pricing)}/device-hour (table dated {d.price_date}; {prices.checked})",
        "shared stages: one extraction per learngene arm and one pre-training per (method, shape, budget), each "
        "counted once and shared by the descendants that use it (image, text and image_text of a shape share one "
        "pre-training)",
        f"ancestor: report.ancestor={rc.ancestor}: "
        + (
            "shown apart and excluded from every method (sunk: it exists before the study)"
            if rc.ancestor == "sunk"
            else "split equally among the methods that read it (all but scratch and pt_ft)"
        )
        + {
            "open_clip": f" ; open_clip's {cfg.ancestor.arch} weights ({cfg.ancestor.pretrained}) are downloaded: "
            "no ancestor pre-training is run or priced",
            "checkpoint": f" ; its weights are read from ancestor.checkpoint ({cfg.ancestor.checkpoint}): no "
            "ancestor pre-training is run or priced",
        }.get(cfg.ancestor.source, " ; its pre-training is run (when not cached) and in the total"),
    ]
    if backend == "ray" and prices.head is not None:
        out.append(
            f"head node {prices.head.instance} on-demand ${prices.head.on_demand}/h for the run's wall-clock, "
            "at least the sum over stages of stage device-hours / devices used at once (extraction "
            f"{cfg.ray.num_workers}, pre-training and trials {cfg.ray.tune.max_concurrent}): a lower bound"
        )
    return out


def format_plan(p: Plan) -> str:
    lines = [f"Plan (analytic; nothing is trained; backend={p.backend})", "", "Stages:"]
    for s in p.stages:
        lines.append(
            f"  {s['stage']:<11} {s['name']:<46} {s['flops']:>10.3g} FLOPs  {s['dtype']:>5}  "
            f"{s['device_hours']:>8.3g} {p.device}-h  ${s['money']:.2f}"
        )
    lines += [
        "",
        f"Descendants ({len(p.descendants)} grid cells, {p.n_trials} trials):",
        f"  {'method':<17}{'modality':<11}{'image':>8}{'text':>8}{'params':>12}{'FLOPs/trial':>13}{'trials':>7}",
    ]
    for d in p.descendants:
        lines.append(
            f"  {d['method']:<17}{d['modality']:<11}{d['image']:>8}{d['text']:>8}{d['params']:>12,}"
            f"{d['finetune_flops']:>13.3g}{d['trials']:>7}"
        )
    if p.methods:
        lines += [
            "",
            "Per method (each shared stage counted once; fine-tuning of all its trials):",
            f"  {'method':<17}{'cells':>6}{'trials':>7}{'stages':>7}{'stage FLOPs':>13}{'FT FLOPs':>11}"
            f"{'device-h':>10}{'money':>11}",
        ]
        for m in p.methods:
            note = "" if m["counted"] else "  (ancestor: shown apart, not in any method)"
            lines.append(
                f"  {m['method']:<17}{m['n_cells']:>6}{m['n_trials']:>7}{m['shared_stages']:>7}"
                f"{m['shared_flops']:>13.3g}{m['finetune_flops']:>11.3g}{m['device_hours_analytic']:>10.4g}"
                f"{'$' + format(m['money_analytic'], ',.2f'):>11}{note}"
            )
    lines += [
        "",
        f"Total: {p.total_flops:.3g} training FLOPs = {p.device_hours:.4g} {p.device} device-hours "
        f"= ${p.money:,.2f} ({p.pricing})",
    ]
    if p.head_instance:
        lines.append(
            f"Head node (cluster.yaml's; none on a local Ray instance): {p.head_instance} >= "
            f"{p.head_hours:.3g} h = ${p.head_money:,.2f} (on-demand); "
            f"with it: ${p.money + p.head_money:,.2f}"
        )
    lines += ["", "Assumptions:"] + [f"  - {a}" for a in p.assumptions]
    return "\n".join(lines)
