"""The pipeline's stages as plain functions (no Ray): ancestor, extraction, descendant pre-training
(pt_ft / csm), and a trial (initialize + fine-tune + score). mmlg_ray.engine.job chains them, on an
in-process executor or the Ray layer's (mmlg_ray.distributed)."""

from __future__ import annotations

import itertools
import logging
import sys
import time
from pathlib import Path

import torch

from mmlg_ray import cost as costmod
from mmlg_ray.method import precision as amp
from mmlg_ray.config import Config, ModelSpec, TrainConfig
from mmlg_ray.method.descend import descendant_spec, init_descendant
from mmlg_ray.method.learngene import (
    EXTRACTION_MODES,
    AuxCLIP,
    ElasticPlan,
    Learngene,
    LearngeneMeta,
    aux_spec,
    save_learngene,
    split_state,
)
from mmlg_ray.method.learngene import shape_key as lg_shape_key
from mmlg_ray.method.models import build_model, towers_of
from mmlg_ray.method.pretrain import close_batches as _close
from mmlg_ray.method.pretrain import Checkpointing, checkpointed_loop, corpus, loop_cost, pretrain_clip
from mmlg_ray.engine.results import TrialRow
from mmlg_ray.method.train import TorchEngine, csm_step, extraction_step, resolve_device, run_loop

log = logging.getLogger("mmlg_ray")


def setup_runtime(cfg: Config | None = None, level=logging.INFO):
    from mmlg_ray.prebuild import venv_ninja_first

    venv_ninja_first()  # DeepSpeed's ops load with the ninja that built them (else they are compiled again)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("mmlg_ray").setLevel(level)
    if cfg is not None and cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg is not None:
        amp.set_tf32(cfg.tf32)


# --------------------------------------------------------------------------- extraction
def check_mode(mode: str) -> str:
    if mode not in EXTRACTION_MODES:
        from mmlg_ray.errors import UserError

        raise UserError("extraction mode", f"{mode!r} is not an extraction mode", f"one of {list(EXTRACTION_MODES)}")
    return mode


def elastic_plan(cfg: Config, ancestor_spec: ModelSpec) -> ElasticPlan:
    """The descendant shapes an elastic extraction distils: the grid's depths x widths, each built
    by descendant_spec exactly as the sweep builds that descendant."""
    g, ecfg = cfg.descendants.grid, cfg.learngene.extraction
    specs = {lg_shape_key(d, w): descendant_spec(ancestor_spec, d, w) for d in g.depth for w in g.width}
    return ElasticPlan(
        specs=specs,
        depths=list(g.depth),
        widths=list(g.width),
        count=ecfg.elastic_shapes,
        weight=ecfg.elastic_weight,
        seed=cfg.seed,
    )


def build_aux(cfg: Config, ancestor, method: str | None = None, fit: bool = True, mode: str = "fixed") -> AuxCLIP:
    """The auxiliary CLIP: learngene (warm-started by a least-squares fit to the ancestor's layers)
    plus the ancestor's non-layer tensors. mode=elastic adds the grid's descendant shapes."""
    method = method or cfg.learngene.method
    check_mode(mode)
    schedule = cfg.learngene.schedule if method == "mmlg" else "tleg"
    extraction = cfg.learngene.extraction.model_dump()
    plan = elastic_plan(cfg, ancestor.spec) if mode == "elastic" else None
    if plan is not None:
        extraction["elastic"] = plan.describe()
    meta = LearngeneMeta(
        method=method,
        schedule=schedule,
        spec=aux_spec(cfg, ancestor.spec).model_dump(),
        knots=cfg.learngene.learned_knots,
        ancestor_fingerprint=ancestor.fingerprint,
        extraction=extraction,
        extraction_mode=mode,
        shared=cfg.learngene.shared if method == "mmlg" else "all",
    )
    lg = Learngene(meta)
    if fit:
        err = lg.fit_to(ancestor.state, ancestor.spec)
        log.info("learngene %s: warm start fits the ancestor's layers to %.3f relative error", method, err)
    _, inherited = split_state(ancestor.state)
    return AuxCLIP(lg, inherited, shapes=plan.specs if plan is not None else None)


def extraction_fingerprint(cfg: Config, mode: str = "fixed", *more: str) -> str:
    """The cache key of an extraction: what its learngene depends on. Fixed mode ignores the
    elastic settings (its key is what it was before they existed); elastic adds the mode and the
    grid's depths and widths, whose shapes it distils."""
    check_mode(mode)
    sections = ("ancestor", "data.corpus", "learngene", "seed", "precision") + more
    if mode == "fixed":
        dumped = cfg.model_dump(mode="json")
        for name in ("elastic_weight", "elastic_shapes"):
            del dumped["learngene"]["extraction"][name]
        return _fingerprint_of(dumped, sections)
    return cfg.fingerprint(*sections, "descendants.grid.depth", "descendants.grid.width")


def _fingerprint_of(dumped: dict, sections) -> str:
    """Config.fingerprint over an edited dump of the config."""
    import hashlib
    import json

    from mmlg_ray.config import dig, drop_defaults_added_later

    for ds in (dumped.get("data") or {}).values():
        if isinstance(ds, dict):
            ds.pop("workers", None)
            ds.pop("prefetch", None)
    drop_defaults_added_later(dumped)
    picked = {s: dig(dumped, s) for s in sections}
    if picked.get("precision") == "fp32":
        del picked["precision"]
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def learngene_name(cfg: Config, method: str, mode: str = "fixed") -> str:
    """The learngene's file inside an output folder (local or URI), keyed by what it depends on:
    learngenes/<method>-<key>.safetensors (fixed), learngenes/<method>-elastic-<key>.safetensors."""
    fp = extraction_fingerprint(cfg, mode)
    return (
        f"learngenes/{method}-{fp}.safetensors" if mode == "fixed" else f"learngenes/{method}-{mode}-{fp}.safetensors"
    )


def learngene_path(cfg: Config, out_dir: Path, method: str, mode: str = "fixed") -> Path:
    return Path(out_dir) / learngene_name(cfg, method, mode)


def extract(
    cfg: Config, ancestor, out_path, method: str | None = None, device=None, data=None, mode: str = "fixed"
) -> dict:
    """Stage 1 in one process: train the learngene through the auxiliary CLIP, write the file. In
    bf16 / fp16 the student and the teacher both run under autocast; the learngene stays fp32.
    mode=elastic: each step also distils descendant shapes of the grid (see ElasticPlan)."""
    device = device or resolve_device(cfg.device)
    ecfg = cfg.learngene.extraction
    torch.manual_seed(cfg.seed)
    aux = build_aux(cfg, ancestor, method, mode=mode).to(device)
    plan = elastic_plan(cfg, ancestor.spec) if mode == "elastic" else None
    teacher = ancestor.model(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    data = data or corpus(cfg)
    spec = aux.learngene.meta.model_spec
    engine = TorchEngine(aux, ecfg, precision=cfg.precision)
    batches = data.batches(ecfg.batch_size, spec.image_size, spec.context_length, seed=cfg.seed)
    step_fn = extraction_step(
        aux, teacher, ecfg.distill_weight, ecfg.distill_temperature, ecfg.feature_weight, elastic=plan
    )
    name = aux.learngene.meta.method + ("/elastic" if plan is not None else "")
    try:
        res = run_loop(
            engine, batches, step_fn, ecfg.steps, log_every=ecfg.log_every, name=f"extract/{name}", device=device
        )
    finally:
        _close(batches)
    cost = extraction_cost(spec, ancestor.spec, res.steps, res.samples, res.seconds, 1, res.last, elastic=plan)
    cost["precision"] = cfg.precision
    cost["skipped_samples"] = data.skipped  # corrupt / incomplete samples of a streamed corpus
    finish_extraction(aux, out_path, cost)
    return cost


def extraction_cost(
    aux_spec_: ModelSpec,
    teacher_spec: ModelSpec,
    steps,
    samples,
    seconds,
    n_devices,
    last,
    elastic: ElasticPlan | None = None,
):
    """An extraction's cost. Elastic: the FLOPs also count the training (forward + backward) of every
    descendant shape each step distilled (the teacher's forward is shared)."""
    flops = costmod.extraction_flops(aux_spec_, teacher_spec, samples)
    extra = elastic.train_flops(steps, samples / max(steps, 1)) if elastic is not None and steps else 0
    return {
        "steps": steps,
        "samples": samples,
        "wall_s": seconds,
        "device_s": seconds * n_devices,
        "devices": n_devices,
        "flops": flops + extra,
        "elastic_flops": extra,
        "extraction_mode": "elastic" if elastic is not None else "fixed",
        "final_loss": (last or {}).get("loss"),
        "final_elastic_loss": (last or {}).get("elastic"),
        "final_distill_smallest": (last or {}).get("distill_smallest"),
    }


def finish_extraction(aux: AuxCLIP, out_path, cost: dict):
    aux = aux.cpu()
    aux.learngene.meta.cost = cost
    return save_learngene(out_path, aux.learngene, aux.inherited_state())


# --------------------------------------------------------------------------- descendant pre-training
def pretrain_descendant(
    cfg: Config,
    ancestor,
    method: str,
    spec: ModelSpec,
    device=None,
    data=None,
    budget: float = 1.0,
    checkpoint: Checkpointing | None = None,
):
    """pt_ft: contrastive pre-training of this descendant shape; csm: cross-modal similarity
    matching against the ancestor. Same corpus and batch as the extraction, `budget` times its steps
    (descendants.pretrain_steps, when set, replaces the extraction's steps as the 1x budget).
    `checkpoint`: resumed from its latest snapshot, and saved to it as it goes."""
    device = device or resolve_device(cfg.device)
    ecfg = cfg.learngene.extraction
    steps = max(1, round((cfg.descendants.pretrain_steps or ecfg.steps) * budget))
    tcfg = TrainConfig(
        steps=steps,
        batch_size=ecfg.batch_size,
        lr=ecfg.lr,
        weight_decay=ecfg.weight_decay,
        warmup_steps=ecfg.warmup_steps,
        log_every=ecfg.log_every,
    )
    data = data or corpus(cfg)
    name = f"pretrain/{method}/d{spec.image_depth}w{spec.image_width}@{budget:g}x"
    if method == "pt_ft":
        return pretrain_clip(cfg, spec, tcfg, seed=cfg.seed, name=name, device=device, data=data, checkpoint=checkpoint)
    torch.manual_seed(cfg.seed)
    model = build_model(spec, "image_text").to(device)
    teacher = ancestor.model(device)
    anchors_img, anchors_txt = csm_anchors(cfg, teacher, data, device)
    engine = TorchEngine(model, tcfg, precision=cfg.precision)

    def batches_at(start):
        return data.batches(tcfg.batch_size, spec.image_size, spec.context_length, seed=cfg.seed + 7919 * start)

    step_fn = csm_step(model, teacher, "image_text", anchors_img, anchors_txt)
    res = checkpointed_loop(
        engine, batches_at, step_fn, steps, checkpoint, log_every=tcfg.log_every, name=name, device=device
    )
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k != "attn_mask"}
    flops = costmod.train_flops(spec, "image_text", res.samples) + costmod.forward_flops(ancestor.spec) * res.samples
    return state, loop_cost(cfg, res, flops, data, engine)


@torch.no_grad()
def csm_anchors(cfg: Config, teacher, data, device, n_images: int = 256, n_texts: int = 1024):
    """The fixed anchor sets: teacher text embeddings of the corpus's class prompts (or else its
    first `n_texts` distinct captions) and teacher image embeddings of its first `n_images` images,
    read in one ordered pass that stops as soon as both are collected, so a streamed corpus is never
    read whole (and an in-memory one gives the same anchors as its stream would). Computed in
    cfg.precision, kept as float32."""
    from mmlg_ray.data import tokenize_captions

    spec = cfg.ancestor.spec
    prompts = [t.format(c) for c in data.classnames for t in data.templates] if data.classnames else None
    captions: dict[str, None] = {}
    images, n_img = [], 0
    stream = data.eval_batches(256, spec.image_size, spec.context_length)
    try:
        for x, _, _, caps in stream:
            if n_img < n_images:
                images.append(x[: n_images - n_img])
                n_img += len(images[-1])
            if prompts is None:
                captions.update(dict.fromkeys(caps))
            if n_img >= n_images and (prompts is not None or len(captions) >= n_texts):
                break
    finally:
        _close(stream)
    if not images:
        from mmlg_ray.errors import UserError

        raise UserError("data.corpus", "csm found no readable sample in the corpus", "check data.corpus.path")
    prompts = prompts or list(captions)[:n_texts]
    with amp.autocast(device, cfg.precision):
        txt = teacher.encode_text(tokenize_captions(prompts, spec.context_length).to(device), normalize=True)
        img = torch.cat([teacher.encode_image(x.to(device), normalize=True) for x in images])
    return img.float(), txt.float()


# --------------------------------------------------------------------------- cells and trials
from mmlg_ray.engine.arms import LEARNGENE_METHODS, PRETRAINED_METHODS, Cell, arm_name, parse_arm  # noqa: E402,F401


def arms(cfg: Config) -> list[tuple[str, str, float]]:
    """(method, extraction, pt_budget) of every arm the grid compares, in the grid's method order."""
    g, out = cfg.descendants.grid, []
    for m in g.method:
        if m in LEARNGENE_METHODS:
            out += [(m, e, 0.0) for e in g.extraction]
        elif m == "pt_ft":
            out += [(m, "", b) for b in cfg.descendants.pt_budgets]
        else:
            out.append((m, "", 1.0 if m == "csm" else 0.0))
    return out


def learngene_arms(cfg: Config) -> list[tuple[str, str]]:
    """(method, extraction mode) of every learngene the grid needs."""
    return [(m, e) for m, e, _ in arms(cfg) if m in LEARNGENE_METHODS]


def cells(cfg: Config) -> list[Cell]:
    g = cfg.descendants.grid
    return [
        Cell(mod, d, w, m, e, b) for mod, d, w, (m, e, b) in itertools.product(g.modality, g.depth, g.width, arms(cfg))
    ]


def shape_key(spec: ModelSpec) -> str:
    return f"i{spec.image_depth}x{spec.image_width}-t{spec.text_depth}x{spec.text_width}"


# TrialRow fields set only when a trial ends (or by the executor): never in an evaluation's report
AT_THE_END = (
    "ended_at",
    "val_score",
    "linear_probe_init",
    "status",
    "error",
    "trial_id",
    "candidate",
    "epochs",
    "phase",
    "stopped_early",
)


def run_trial(
    cfg: Config,
    cell: Cell,
    seed: int,
    *,
    lr: float | None = None,
    weight_decay: float | None = None,
    ancestor=None,
    learngenes: dict | None = None,
    pretrained: dict | None = None,
    task_data=None,
    device=None,
    on_eval=None,
    rank: int = 0,
    world: int = 1,
    wrap=None,
    resume: dict | None = None,
) -> dict:
    """Initialize one descendant by its method, fine-tune it, score it. Returns its row (a TrialRow).
    `on_eval(step, row_so_far, snapshot)` is called at every evaluation (snapshot() gives a
    fine-tuning checkpoint); `resume=` such a checkpoint continues the trial from its step."""
    from mmlg_ray.method.finetune import SCORE_KEY, TASK_NAMES, finetune, load_task_data

    device = device or resolve_device(cfg.device)
    fcfg = cfg.descendants.finetune.model_copy(
        update={k: v for k, v in (("lr", lr), ("weight_decay", weight_decay)) if v is not None}
    )
    spec = descendant_spec(ancestor.spec, cell.depth, cell.width)
    pre = (pretrained or {}).get((cell.method, shape_key(spec), cell.pt_budget)) if cell.pretrained_key else None
    model = init_descendant(
        cell.method,
        cell.modality,
        spec,
        seed=seed,
        learngene=(learngenes or {}).get(cell.learngene_key),
        ancestor_state=ancestor.state,
        ancestor_spec=ancestor.spec,
        pretrained_state=pre[0] if pre else None,
        heur_lg_layers=cfg.descendants.heur_lg_layers,
    )
    n_params = sum(p.numel() for p in model.parameters())
    data = task_data or load_task_data(cfg, cell.modality, spec.image_size)
    towers = towers_of(cell.modality)
    row = TrialRow(
        trial=f"{cell.tag}-s{seed}",
        cell=cell.key,
        method=cell.method,
        arm=cell.arm,
        extraction=cell.extraction,
        pt_budget=cell.pt_budget,
        modality=cell.modality,
        task=TASK_NAMES[cell.modality],
        dataset=data.test.name,
        depth=cell.depth,
        width=cell.width,
        image_depth=spec.image_depth if "image" in towers else 0,
        text_depth=spec.text_depth if "text" in towers else 0,
        image_width=spec.image_width if "image" in towers else 0,
        text_width=spec.text_width if "text" in towers else 0,
        heads=spec.heads("image" if "image" in towers else "text"),
        params=n_params,
        seed=seed,
        lr=fcfg.lr,
        weight_decay=fcfg.weight_decay,
        score_metric=SCORE_KEY[cell.modality],
        workers=world,
        pretrain_wall_s=pre[1]["wall_s"] if pre else 0.0,
        pretrain_device_s=pre[1]["device_s"] if pre else 0.0,
        pretrain_flops=pre[1]["flops"] if pre else 0,
        started_at=time.time(),  # wall clock of this attempt's start: the job's stage timeline
        resumed_from_step=int(resume["step"]) if resume else 0,
    )
    t0 = time.perf_counter()
    prior = float(resume["seconds"]) if resume else 0.0
    # what every evaluation's report carries: the trial's description, not what is known only at its end
    described = {k: v for k, v in row.record().items() if not k.startswith(("final_", "best_")) and k not in AT_THE_END}

    def running(step, metrics, snapshot):  # every evaluation carries the trial's description and cost so far
        if on_eval is not None:
            el = prior + time.perf_counter() - t0
            on_eval(
                step,
                {
                    **described,
                    "steps": step,
                    "finetune_wall_s": el,
                    "finetune_device_s": el * world,
                    "skipped_samples": data.skipped,
                    "finetune_flops": costmod.train_flops(spec, cell.modality, step * fcfg.batch_size),
                    **metrics,
                },
                snapshot,
            )

    summary = finetune(
        model,
        cell.modality,
        data,
        fcfg,
        spec,
        device,
        seed=seed,
        on_eval=running,
        rank=rank,
        world=world,
        wrap=wrap,
        precision=cfg.precision,
        resume=resume,
    )
    return row.with_(
        skipped_samples=data.skipped,
        epochs=len(summary["history"]),
        steps=summary["steps"],
        finetune_wall_s=summary["seconds"],
        finetune_device_s=summary["seconds"] * world,
        finetune_flops=costmod.train_flops(spec, cell.modality, summary["samples"]),
        linear_probe_init=summary.get("linear_probe_init", float("nan")),
        ended_at=time.time(),
        # linear_probe_init is a column of its own (the same at every evaluation), as for a trial cut short
        final={k: v for k, v in summary["final"].items() if k not in ("step", "epoch", "linear_probe_init")},
        val_score=float(summary["final"].get("val_score", float("nan"))),  # selection reads this, never test
        best={  # the evaluation with the best validation score
            k: v for k, v in summary["best"].items() if k not in ("epoch", "train_loss", "linear_probe_init")
        },
        history=summary["history"],
    )


def needs_pretraining(cfg: Config, ancestor_spec: ModelSpec) -> list[tuple[str, ModelSpec, float]]:
    """(method, shape, budget) of every pre-training the grid needs: pt_ft at each budget of its
    ladder, csm at 1x, for each descendant shape."""
    out = {}
    g = cfg.descendants.grid
    for method, _, budget in arms(cfg):
        if method in PRETRAINED_METHODS:
            for d, w in itertools.product(g.depth, g.width):
                spec = descendant_spec(ancestor_spec, d, w)
                out[(method, shape_key(spec), budget)] = (method, spec, budget)
    return list(out.values())


def pretrain_name(method: str, spec: ModelSpec, budget: float) -> str:
    """A pre-trained shape's name in stages.parquet and in its artifact's file name."""
    return f"{method}/{shape_key(spec)}@{budget:g}x"


def _cost_cols(c: dict) -> dict:
    c = c or {}
    return {
        "steps": int(c.get("steps", 0) or 0),
        "samples": int(c.get("samples", 0) or 0),
        "wall_s": float(c.get("wall_s", 0.0) or 0.0),
        "device_s": float(c.get("device_s", 0.0) or 0.0),
        "flops": float(c.get("flops", 0) or 0),
        "skipped_samples": int(c.get("skipped_samples", 0) or 0),
        "resumed_from_step": int(c.get("resumed_from_step", 0) or 0),  # restarted: the checkpoint step it went on from
        "preemptions": int(c.get("preemptions", 0) or 0),  # attempts lost with a preempted node (Ray's pre-training)
        "retries": int(c.get("retries", 0) or 0),  # attempts lost with a worker or node otherwise (ray.max_failures)
        "lost_device_s": float(c.get("lost_device_s", 0.0) or 0.0),  # the work those attempts threw away
        "precision": str(c.get("precision") or ""),
    }  # the stage's precision ("": not recorded), priced by cost
