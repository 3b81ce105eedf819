"""Evaluation: classification top-1 (fine-tuned and linear probe), zero-shot classification,
image-text retrieval R@1/5/10 in both directions, text classification accuracy.

Embeddings are computed under the run's `precision` (autocast) and returned as float32, so every
metric is computed in fp32."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import precision as amp
from .data import Pairs, to_input, tokenize_captions
from .models import image_features, text_features


@torch.no_grad()
def embed_images(model, pairs: Pairs, image_size: int, device, bs: int = 256, precision: str = "fp32") -> torch.Tensor:
    model.eval()
    with amp.autocast(device, precision):
        out = [image_features(model, to_input(pairs.images[i:i + bs], image_size).to(device)).float().cpu()
               for i in range(0, len(pairs), bs)]
    return torch.cat(out)


@torch.no_grad()
def embed_texts(model, texts: list[str], context_length: int, device, bs: int = 256,
                precision: str = "fp32") -> torch.Tensor:
    model.eval()
    toks = tokenize_captions(texts, context_length)
    with amp.autocast(device, precision):
        out = [text_features(model, toks[i:i + bs].to(device)).float().cpu() for i in range(0, len(texts), bs)]
    return torch.cat(out)


def retrieval_metrics(img: torch.Tensor, txt: torch.Tensor, captions: list[str] | None = None,
                      ks=(1, 5, 10)) -> dict:
    """One caption per image. A retrieved item counts as correct when its caption text equals the
    query's (Tux Paint has a few identical captions, e.g. colour variants of one stamp)."""
    sim = img @ txt.t()
    n = len(img)
    if captions is None:
        match = torch.eye(n, dtype=torch.bool)
    else:
        ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        cid = torch.tensor([ids[c] for c in captions])
        match = cid[:, None] == cid[None, :]
    out = {}
    for direction, s in (("i2t", sim), ("t2i", sim.t())):
        order = s.argsort(dim=1, descending=True)
        hits = match.gather(1, order)  # hits[i, r]: the r-th retrieved item is correct for query i
        first = hits.float().argmax(1)
        for k in ks:
            out[f"{direction}_r{k}"] = float((first < k).float().mean() * 100)
    out["mean_recall"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks) / (2 * len(ks))
    return out


@torch.no_grad()
def zeroshot_top1(model, pairs: Pairs, image_size: int, context_length: int, device, precision: str = "fp32") -> float:
    """Classify by the nearest class-prompt embedding (mean over the set's templates)."""
    classes = []
    for name in pairs.classnames:
        f = embed_texts(model, [t.format(name) for t in pairs.templates], context_length, device, precision=precision)
        classes.append(F.normalize(f.mean(0), dim=-1))
    cls = torch.stack(classes)
    img = embed_images(model, pairs, image_size, device, precision=precision)
    pred = (img @ cls.t()).argmax(1)
    return float((pred == pairs.labels).float().mean() * 100)


def linear_probe(train_x, train_y, test_x, test_y, num_classes: int, epochs: int = 100,
                 lr: float = 0.01, wd: float = 1e-4, seed: int = 0) -> float:
    """Top-1 of a logistic-regression head on frozen features (full-batch Adam)."""
    g = torch.Generator().manual_seed(seed)
    mu, sd = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True) + 1e-6
    xtr, xte = (train_x - mu) / sd, (test_x - mu) / sd
    w = (torch.randn(xtr.shape[1], num_classes, generator=g) * 0.01).requires_grad_()
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr, weight_decay=wd)
    with torch.enable_grad():
        for _ in range(epochs):
            opt.zero_grad()
            F.cross_entropy(xtr @ w + b, train_y).backward()
            opt.step()
    with torch.no_grad():
        return float(((xte @ w + b).argmax(1) == test_y).float().mean() * 100)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean() * 100)
