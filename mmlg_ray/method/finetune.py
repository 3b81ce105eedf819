"""Descendant fine-tuning and scoring, one task per modality:

  image       image classification (local: MNIST digits, a task the ancestor never saw): top-1 after
              fine-tuning, plus a linear probe of the initialized (not yet fine-tuned) features
  text        text classification (local: Tux Paint caption -> stamp category): accuracy, plus a
              linear probe of the initialized features
  image_text  image-text retrieval (local: Tux Paint stamps and captions): R@1/5/10 both ways, and
              zero-shot classification on classes and prompts no training stage saw (local: MNIST
              digits' test split with prompts of their own); its chance level is 1 / num_classes
              (10% for the digits)

Every task has train / validation / test splits, disjoint by content. Every evaluation scores the
validation split (`val_score`, `val_<metric>`: what search, early stopping and every "best" use) and
the test split (`score`, `<metric>`: what the report shows for the trials validation chose).
Every task reports a primary metric under "score" so sweeps and schedulers compare like with like.
Fine-tuning and evaluation run in the run's `precision` (see mmlg_ray.method.precision); metrics in fp32.
Task sets may be in memory (the local packaged sets) or streamed (webdataset shards, image folders):
evaluation makes one pass over the test set in batches and keeps only embeddings or logits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mmlg_ray.method import precision as amp
from mmlg_ray.config import Config, FinetuneConfig, ModelSpec
from mmlg_ray.data import Pairs, StreamingPairs, load_dataset
from mmlg_ray.method.evaluate import PROBE_MAX, accuracy, embed, linear_probe, retrieval_metrics, zeroshot_top1
from mmlg_ray.method.models import image_features, text_features
from mmlg_ray.method.train import Progress, TorchEngine, clip_loss, run_loop

TASK_NAMES = {"image": "image_classification", "text": "text_classification", "image_text": "retrieval"}
SCORE_KEY = {"image": "top1", "text": "accuracy", "image_text": "mean_recall"}


@dataclass
class TaskData:
    train: Pairs | StreamingPairs
    val: Pairs | StreamingPairs
    test: Pairs | StreamingPairs
    zeroshot: Pairs | StreamingPairs | None = None

    @property
    def skipped(self) -> int:
        """Bad samples the streamed sets of this task skipped so far (distinct)."""
        return sum(d.skipped for d in (self.train, self.val, self.test, self.zeroshot) if d is not None)


def load_task_data(cfg: Config, modality: str, image_size: int) -> TaskData:
    section = TASK_NAMES[modality]
    dcfg = getattr(cfg.data, section)
    kw = dict(image_size=image_size, cache_dir=cfg.cache_path, field_name=f"data.{section}")
    train, val, test = (load_dataset(dcfg, split, **kw) for split in ("train", "val", "test"))
    if modality != "image_text" and train.classnames is None:
        from mmlg_ray.errors import UserError

        raise UserError(
            f"data.{section}.kind",
            f"{dcfg.kind} has no class labels; a classification task needs them",
            "webdataset: .cls members and a dataset.json naming the classes (mmlg_ray.data.shards writes both)",
        )
    zs = None
    if modality == "image_text" and cfg.data.zeroshot is not None:
        zs = load_dataset(
            cfg.data.zeroshot, "test", image_size=image_size, cache_dir=cfg.cache_path, field_name="data.zeroshot"
        )
    return TaskData(train, val, test, zs)


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, modality: str, embed_dim: int, num_classes: int):
        super().__init__()
        self.backbone, self.modality = backbone, modality
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x):
        feats = (
            image_features(self.backbone, x, False)
            if self.modality == "image"
            else text_features(self.backbone, x, False)
        )
        return self.head(feats)


def _init_probe(model, modality, data: TaskData, spec: ModelSpec, device, seed, precision: str = "fp32") -> float:
    kw = dict(images=modality == "image", texts=modality == "text", precision=precision)
    tr = embed(model, data.train, spec.image_size, spec.context_length, device, limit=PROBE_MAX, **kw)
    te = embed(model, data.test, spec.image_size, spec.context_length, device, **kw)
    key = "image" if modality == "image" else "text"
    return linear_probe(tr[key], tr["labels"], te[key], te["labels"], len(data.train.classnames), seed=seed)


def _score(model, modality: str, split, spec: ModelSpec, device, precision: str) -> dict:
    """The task's metrics on one split: one pass in batches (in memory or streamed)."""
    if modality == "image_text":
        e = embed(model, split, spec.image_size, spec.context_length, device, precision=precision)
        return retrieval_metrics(e["image"], e["text"], e["captions"])
    logits, labels = [], []
    stream = split.eval_batches(512, spec.image_size, spec.context_length)
    try:
        for images, tokens, lab, _ in stream:
            x = images if modality == "image" else tokens
            with amp.autocast(device, precision):
                logits.append(model(x.to(device)).float().cpu())
            labels.append(lab)
    finally:
        if hasattr(stream, "close"):
            stream.close()
    return {SCORE_KEY[modality]: accuracy(torch.cat(logits), torch.cat(labels))}


def evaluate(model, modality: str, data: TaskData, spec: ModelSpec, device, precision: str = "fp32") -> dict:
    """Score on the validation split (`val_score`, `val_<metric>`) and on the test split (`score`
    and every metric of the task; zero-shot too for image-text)."""
    model.eval()
    key = SCORE_KEY[modality]
    with torch.no_grad():
        v = _score(model, modality, data.val, spec, device, precision)
        m = _score(model, modality, data.test, spec, device, precision)
        if modality == "image_text" and data.zeroshot is not None:
            m["zeroshot_top1"] = zeroshot_top1(
                model, data.zeroshot, spec.image_size, spec.context_length, device, precision=precision
            )
    m["score"] = m[key]
    m[f"val_{key}"] = m["val_score"] = v[key]
    model.train()
    return m


def finetune(
    model: nn.Module,
    modality: str,
    data: TaskData,
    fcfg: FinetuneConfig,
    spec: ModelSpec,
    device,
    seed: int = 0,
    on_eval: Callable[[int, dict], None] | None = None,
    linear_probe_init: bool | None = None,
    rank: int = 0,
    world: int = 1,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    precision: str = "fp32",
    resume: dict | None = None,
) -> dict:
    """Fine-tune without constraints, evaluating every `eval_every` steps. Returns a summary dict:
    final metrics, best metrics (at the evaluation with the best validation score), history (one dict per evaluation), steps, samples, seconds,
    resumed_from_step. `precision` (fp32, bf16, fp16) applies to the fine-tuning and to every evaluation.

    Checkpoints: `on_eval(step, metrics, snapshot)` gets, with every evaluation, a `snapshot()` that
    returns everything needed to continue (weights with the task head, optimizer, schedule, loss
    scale, history, counters); `resume=` such a snapshot continues from its step. An in-memory
    training set then draws the batches an uninterrupted run would have drawn (a preemption does not
    change a seed's result on CPU); a streamed one is reshuffled from a seed derived from that step.

    Data-parallel use: `wrap` (e.g. DistributedDataParallel) wraps the trained module, each of
    `world` ranks takes its own slice of every batch (batch_size / world)."""
    torch.manual_seed(seed)
    model = model.to(device)
    summary: dict = {}
    if resume is not None:
        if "linear_probe_init" in resume:
            summary["linear_probe_init"] = resume["linear_probe_init"]
    elif (fcfg.linear_probe if linear_probe_init is None else linear_probe_init) and modality != "image_text":
        summary["linear_probe_init"] = _init_probe(model, modality, data, spec, device, seed, precision)
    if modality != "image_text":
        model = Classifier(model, modality, spec.embed_dim, len(data.train.classnames)).to(device)
    model.train()
    trained = wrap(model) if wrap is not None else model
    engine = TorchEngine(trained, fcfg, precision=precision)
    history: list[dict] = []
    best: dict = {}
    samples = 0
    step = 0
    prior_s = 0.0
    if resume is not None:
        model.load_state_dict(resume["model"])
        engine.load_state_dict(resume["engine"])
        history, best = list(resume["history"]), dict(resume["best"])
        step, samples, prior_s = int(resume["step"]), int(resume["samples"]), float(resume["seconds"])
    start = step
    bs = max(1, fcfg.batch_size // world) * world
    if isinstance(data.train, Pairs):  # in memory: the very batches an uninterrupted run draws after `start`
        batches = data.train.batches(
            bs, spec.image_size, spec.context_length, seed=seed, rank=rank, world=world, skip=start
        )
    else:  # streamed: reshuffled from a seed of its own (replaying a stream up to `start` would re-read it)
        batches = data.train.batches(
            bs, spec.image_size, spec.context_length, seed=seed + 7919 * start, rank=rank, world=world
        )

    if modality == "image_text":

        def loss_fn(batch):
            images, tokens, _ = batch
            img, txt, scale = trained(images, tokens)
            loss = clip_loss(img, txt, scale, tokens)
            return loss, {"loss": loss.detach()}
    else:

        def loss_fn(batch):
            images, tokens, labels = batch
            logits = trained(images if modality == "image" else tokens)
            loss = F.cross_entropy(logits, labels)
            return loss, {"loss": loss.detach()}

    t0 = time.perf_counter()

    def snapshot() -> dict:
        snap = {
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "engine": engine.state_dict(),
            "history": history,
            "best": best,
            "step": step,
            "samples": samples,
            "seconds": prior_s + time.perf_counter() - t0,
        }
        if "linear_probe_init" in summary:
            snap["linear_probe_init"] = summary["linear_probe_init"]
        return snap

    progress = Progress(f"finetune/{modality}", fcfg.steps, start)  # a line per evaluation, or fewer
    try:
        while step < fcfg.steps:
            chunk = min(fcfg.eval_every, fcfg.steps - step)
            res = run_loop(
                engine,
                batches,
                loss_fn,
                step + chunk,
                start_step=step,
                log_every=max(chunk, 1),
                name=f"finetune/{modality}",
                device=device,
                progress=progress,
            )
            samples += res.samples * world
            step = res.steps
            metrics = evaluate(model, modality, data, spec, device, precision)
            metrics.update(step=step, epoch=len(history) + 1, train_loss=res.last.get("loss", float("nan")))
            if "linear_probe_init" in summary:
                metrics["linear_probe_init"] = summary["linear_probe_init"]
            history.append(metrics)
            if not best or metrics["val_score"] > best["val_score"]:  # chosen on validation, never on test
                best = dict(metrics)
            if on_eval is not None:
                on_eval(step, metrics, snapshot)
    finally:
        if hasattr(batches, "close"):  # a streamed set's loader workers
            batches.close()
    summary.update(
        final=history[-1],
        best=best,
        history=history,
        steps=step,
        samples=samples,
        seconds=prior_s + time.perf_counter() - t0,
        resumed_from_step=start,
    )
    return summary
