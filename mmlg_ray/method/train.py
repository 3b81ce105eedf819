"""Training loops in plain PyTorch, device-agnostic: CLIP pre-training, learngene extraction,
descendant pre-training by cross-modal similarity matching (csm), and the shared step loop.

A loop drives an "engine" with .backward(loss) and .step(): `TorchEngine` here, a DeepSpeed engine
in the Ray Train layer. Progress is logged every `log_every` steps and handed to `on_log`, the
hook the distributed layer uses to report metrics and save checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mmlg_ray.method import precision as amp
from mmlg_ray.config import TrainConfig

log = logging.getLogger("mmlg_ray")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from mmlg_ray.errors import UserError

        raise UserError("device", "cuda requested but no CUDA device is visible", "use device=auto or cpu")
    return torch.device(name)


def param_groups(model: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (
            no_decay
            if p.ndim < 2 or "embedding" in n or "logit_scale" in n or n.startswith("coeff") or "coeff__" in n
            else decay
        ).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(groups, lr: float, device: torch.device | str | None = None) -> torch.optim.AdamW:
    """AdamW, fused (one pass over each tensor) where PyTorch has a fused kernel (CPU, CUDA). The unfused
    CPU default walks a text tower's 49408 x width token embedding in a dozen elementwise ops a step:
    36 ms against 4.7 ms fused at width 128 on one core (benchmarks/optimizer_step.py), most of a
    local trial's optimizer time."""
    dev = torch.device(device) if device is not None else None
    if dev is None:
        first = next((p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])), None)
        dev = first.device if first is not None else torch.device("cpu")
    return torch.optim.AdamW(groups, lr=lr, fused=dev.type in ("cpu", "cuda"))


def lr_lambda(tcfg: TrainConfig, total: int | None = None):
    total = total or tcfg.steps
    warm = min(tcfg.warmup_steps, max(total - 1, 0))

    def f(step):
        if step < warm:
            return (step + 1) / warm
        prog = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(prog, 1.0))) * 0.95 + 0.05

    return f


class TorchEngine:
    """AdamW + warm-up/cosine schedule with the DeepSpeed engine's backward/step interface.

    Mixed precision: forward passes run under `autocast()` (run_loop enters it around each loss)
    while the weights and optimizer stay fp32; fp16 adds dynamic loss scaling (a GradScaler that
    skips a step whose gradients overflow and lowers the scale). fp32 is plain PyTorch."""

    def __init__(
        self,
        model: nn.Module,
        tcfg: TrainConfig,
        total_steps: int | None = None,
        clip_grad: float = 1.0,
        precision: str = "fp32",
    ):
        self.module = model
        self.optimizer = adamw(param_groups(model, tcfg.weight_decay), tcfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(tcfg, total_steps))
        self.clip_grad = clip_grad
        self.precision = precision
        self.device = next(model.parameters()).device
        self.scaler = amp.grad_scaler(self.device, precision)
        amp.autocast(self.device, precision)  # an unsupported (device, precision) fails here, not mid-run

    def __call__(self, *args, **kw):
        return self.module(*args, **kw)

    def autocast(self) -> ContextManager:
        return amp.autocast(self.device, self.precision)

    def backward(self, loss):
        self.scaler.scale(loss).backward()

    def step(self):
        if self.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)  # fp16: skipped when the gradients hold inf/nan
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self):
        s = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler.is_enabled():
            s["scaler"] = self.scaler.state_dict()
        return s

    def load_state_dict(self, s):
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        if "scaler" in s and self.scaler.is_enabled():
            self.scaler.load_state_dict(s["scaler"])


@dataclass
class LoopResult:
    steps: int = 0
    samples: int = 0
    seconds: float = 0.0
    last: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    step_s: list = field(default_factory=list)  # seconds of each step (data, forward, backward, optimizer, logging)
    resumed_from: int = 0  # checkpointed_loop: the step this attempt began at


class Progress:
    """A progress log line (loss, throughput, time left) each time the loop logs, or, with
    `max_lines` set, only when the loop has gone another 1/max_lines of its steps (and at the end):
    the Ray workers set it (distributed.logs.quiet_worker), so a trial or a worker prints a few
    lines per loop whatever its log_every; 0 prints nothing."""

    max_lines: int | None = None  # process-wide default

    def __init__(
        self,
        name: str,
        total: int,
        start: int = 0,
        printer: Callable[[str], None] | None = None,
        max_lines: int | None = None,
    ):
        self.name, self.total, self.start = name, total, start
        self.t0 = time.perf_counter()
        self.printer = printer or log.info
        self.lines = max_lines if max_lines is not None else Progress.max_lines
        self.marks = 0  # 1/max_lines marks passed when it last printed

    def due(self, step: int) -> bool:
        if self.lines is None:
            return True
        if self.lines <= 0:
            return False
        mark = (step - self.start) * self.lines // max(1, self.total - self.start)
        if step >= self.total or mark > self.marks:
            self.marks = mark
            return True
        return False

    def __call__(self, step: int, metrics: dict):
        if not self.due(step):
            return
        done = step - self.start
        el = time.perf_counter() - self.t0
        rate = done / el if el > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        vals = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
        self.printer(f"[{self.name}] step {step}/{self.total} {vals} ({rate:.2f} step/s, eta {eta:.0f}s)")


def run_loop(
    engine,
    batches: Iterator,
    loss_fn: Callable,
    steps: int,
    *,
    start_step: int = 0,
    log_every: int = 25,
    on_log: Callable[[int, dict], None] | None = None,
    name: str = "train",
    device=None,
    autocast: Callable[[], ContextManager] | None = None,
    progress: Progress | None = None,
) -> LoopResult:
    """Generic step loop: loss_fn(batch) -> (loss, metrics dict), computed under `autocast()`
    (default: a TorchEngine's own mixed-precision context; none for other engines, e.g. DeepSpeed's,
    which casts the model itself). `progress`: the log lines of a longer run this loop is one chunk of."""
    if autocast is None:
        autocast = engine.autocast if isinstance(engine, TorchEngine) else contextlib.nullcontext
    res = LoopResult(steps=start_step)
    progress = progress or Progress(name, steps, start_step)
    t0 = time.perf_counter()
    acc: dict = {}
    n_acc = 0
    t_step = t0
    for step in range(start_step, steps):
        batch = next(batches)
        if device is not None:
            batch = tuple(b.to(device, non_blocking=True) if torch.is_tensor(b) else b for b in batch)
        with autocast():
            loss, metrics = loss_fn(batch)
        engine.backward(loss)
        engine.step()
        res.samples += int(batch[0].shape[0])
        for k, v in metrics.items():
            acc[k] = acc.get(k, 0.0) + float(v)
        n_acc += 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            m = {k: v / n_acc for k, v in acc.items()}
            m["step"] = step + 1
            res.last = m
            res.history.append(m)
            progress(step + 1, m)
            if on_log is not None:
                on_log(step + 1, m)
            acc, n_acc = {}, 0
        res.steps = step + 1
        now = time.perf_counter()  # on a GPU this times the host's side; the float(v) above syncs once per step
        res.step_s.append(now - t_step)
        t_step = now
    res.seconds = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------- losses
@amp.in_float32
def clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, tokens: torch.Tensor | None = None):
    """Symmetric InfoNCE. Identical captions in a batch are all counted as positives."""
    logits = scale * img @ txt.t()
    if tokens is None:
        target = torch.arange(len(img), device=img.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    same = (tokens[:, None, :] == tokens[None, :, :]).all(-1).float()
    target = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


@amp.in_float32
def distill_loss(s_img, s_txt, s_scale, t_img, t_txt, t_scale, temperature: float = 1.0):
    """KL(teacher || student) of the softmaxed image-text similarity, both directions."""
    s = s_scale * s_img @ s_txt.t() / temperature
    t = t_scale * t_img @ t_txt.t() / temperature
    kl_i2t = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean")
    kl_t2i = F.kl_div(F.log_softmax(s.t(), 1), F.log_softmax(t.t(), 1), log_target=True, reduction="batchmean")
    return (kl_i2t + kl_t2i) / 2 * temperature**2


@amp.in_float32
def csm_loss(student_feat, teacher_feat, anchors, scale: float = 100.0, temperature: float = 1.0):
    """BeamCLIP's cross-modal similarity matching: match the teacher's softmaxed similarity of each
    sample to a fixed set of anchor embeddings from the other modality (both L2-normalized)."""
    s = scale * student_feat @ anchors.t() / temperature
    t = scale * teacher_feat @ anchors.t() / temperature
    return F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean")


@amp.in_float32
def feature_loss(s_img, s_txt, t_img, t_txt):
    """2 - cosine similarity of student and teacher embeddings (normalized), image + text."""
    return 2 - (s_img * t_img).sum(-1).mean() - (s_txt * t_txt).sum(-1).mean()


# --------------------------------------------------------------------------- loss functions for loops
def contrastive_step(model):
    def fn(batch):
        images, tokens, _ = batch
        img, txt, scale = model(images, tokens)
        loss = clip_loss(img, txt, scale, tokens)
        return loss, {"loss": loss.detach()}

    return fn


def extraction_step(
    aux,
    teacher,
    distill_weight: float,
    temperature: float,
    feature_weight: float,
    elastic=None,
    start_step: int = 0,
    gather=None,
):
    """The extraction loss: the auxiliary model's contrastive + distillation (+ feature) loss. With
    `elastic` (a learngene.ElasticPlan), each step also distils the descendant shapes the plan draws
    for that step, with the same loss against the same teacher outputs, averaged over the shapes and
    weighted by elastic.weight. `aux` is the AuxCLIP or an engine wrapping it (DeepSpeed's): the
    shapes run inside its forward. Steps are counted from `start_step` (a resumed run's first step),
    one per call, so the draw at step s is the same in a resumed run.

    `gather` (data-parallel workers: distributed.extract) concatenates tensors over the ranks, in rank order,
    with gradients flowing back to each rank's slice: the contrastive and distillation losses then see the
    whole global batch as their negatives, the same loss a single process computes on it."""
    step = [start_step]

    def student_loss(s_img, s_txt, s_scale, t_img, t_txt, t_scale, tokens):
        if gather is not None:
            s_img, s_txt, t_img, t_txt, tokens = gather(s_img, s_txt, t_img, t_txt, tokens)
        l_clip = clip_loss(s_img, s_txt, s_scale, tokens)
        l_kd = distill_loss(s_img, s_txt, s_scale, t_img, t_txt, t_scale, temperature)
        loss = l_clip + distill_weight * l_kd
        parts = {"clip": l_clip.detach(), "distill": l_kd.detach()}
        if feature_weight > 0:
            l_feat = feature_loss(s_img, s_txt, t_img, t_txt)
            loss = loss + feature_weight * l_feat
            parts["feature"] = l_feat.detach()
        return loss, parts

    def fn(batch):
        images, tokens, _ = batch
        with torch.no_grad():
            t_img, t_txt, t_scale = teacher(images, tokens)
        keys = elastic.at(step[0]) if elastic is not None else None
        step[0] += 1
        if keys is None:
            outs = [aux(images, tokens)]
        else:
            outs = list(aux(images, tokens, shapes=keys))
        loss, parts = student_loss(*outs[0], t_img, t_txt, t_scale, tokens)
        metrics = {"loss": None, **parts}
        if keys:
            shape_losses = []
            for key, out in zip(keys, outs[1:]):
                l, p = student_loss(*out, t_img, t_txt, t_scale, tokens)
                shape_losses.append(l)
                if key == elastic.smallest:
                    metrics["distill_smallest"] = p["distill"]
                if key == elastic.largest:
                    metrics["distill_largest"] = p["distill"]
            l_el = torch.stack(shape_losses).mean()
            loss = loss + elastic.weight * l_el
            metrics["elastic"] = l_el.detach()
        metrics["loss"] = loss.detach()
        return loss, metrics

    return fn


def csm_step(model, teacher, modality: str, image_anchors, text_anchors, temperature: float = 1.0):
    """Descendant pre-training signal for the csm baseline (towers per modality)."""
    from mmlg_ray.method.models import image_features, text_features

    def fn(batch):
        images, tokens, _ = batch
        with torch.no_grad():
            t_img, t_txt, _ = teacher(images, tokens)
        loss = 0.0
        metrics = {}
        s_img = s_txt = None
        if modality in ("image", "image_text"):
            s_img = image_features(model, images)
            li = csm_loss(s_img, t_img, text_anchors, temperature=temperature)
            loss = loss + li
            metrics["csm_image"] = li.detach()
        if modality in ("text", "image_text"):
            s_txt = text_features(model, tokens)
            lt = csm_loss(s_txt, t_txt, image_anchors, temperature=temperature)
            loss = loss + lt
            metrics["csm_text"] = lt.detach()
        if modality == "image_text":
            lc = clip_loss(s_img, s_txt, model.logit_scale.exp(), tokens)
            loss = loss + lc
            metrics["clip"] = lc.detach()
        metrics["loss"] = loss.detach()
        return loss, metrics

    return fn
