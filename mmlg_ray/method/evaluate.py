"""Evaluation: classification top-1 (fine-tuned and linear probe), zero-shot classification,
image-text retrieval R@1/5/10 in both directions, text classification accuracy.

Embeddings are computed under the run's `precision` (autocast) and returned as float32, so every
metric is computed in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmlg_ray.method import precision as amp
from mmlg_ray.data import tokenize_captions
from mmlg_ray.method.models import image_features, text_features

PROBE_MAX = 20000  # linear probe: at most this many training samples are embedded


@torch.no_grad()
def embed(
    model,
    data,
    image_size: int,
    context_length: int,
    device,
    *,
    images: bool = True,
    texts: bool = True,
    limit: int | None = None,
    bs: int = 256,
    precision: str = "fp32",
) -> dict:
    """One ordered pass over a set, in memory (Pairs) or streamed (StreamingPairs), in batches: the
    image and/or text embeddings (N x embed_dim, fp32), labels (or None) and captions of its first
    `limit` samples. Only the embeddings are kept, never the decoded images."""
    model.eval()
    img, txt, labels, caps = [], [], [], []
    stream = data.eval_batches(bs, image_size, context_length)
    try:
        for x, tok, lab, cap in stream:
            if limit is not None and len(caps) + len(cap) > limit:
                k = limit - len(caps)
                x, tok, lab, cap = x[:k], tok[:k], None if lab is None else lab[:k], cap[:k]
            with amp.autocast(device, precision):
                if images:
                    img.append(image_features(model, x.to(device)).float().cpu())
                if texts:
                    txt.append(text_features(model, tok.to(device)).float().cpu())
            labels.append(lab)
            caps.extend(cap)
            if limit is not None and len(caps) >= limit:
                break
    finally:
        if hasattr(stream, "close"):
            stream.close()
    return {
        "image": torch.cat(img) if img else None,
        "text": torch.cat(txt) if txt else None,
        "labels": None if not labels or any(v is None for v in labels) else torch.cat(labels),
        "captions": caps,
    }


@torch.no_grad()
def embed_texts(
    model, texts: list[str], context_length: int, device, bs: int = 256, precision: str = "fp32"
) -> torch.Tensor:
    model.eval()
    toks = tokenize_captions(texts, context_length)
    with amp.autocast(device, precision):
        out = [text_features(model, toks[i : i + bs].to(device)).float().cpu() for i in range(0, len(texts), bs)]
    return torch.cat(out)


def retrieval_metrics(img: torch.Tensor, txt: torch.Tensor, captions: list[str] | None = None, ks=(1, 5, 10)) -> dict:
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
def zeroshot_top1(model, data, image_size: int, context_length: int, device, precision: str = "fp32") -> float:
    """Classify by the nearest class-prompt embedding (mean over the set's templates); one pass over
    the set's images (in memory or streamed)."""
    classes = []
    for name in data.classnames:
        f = embed_texts(model, [t.format(name) for t in data.templates], context_length, device, precision=precision)
        classes.append(F.normalize(f.mean(0), dim=-1))
    cls = torch.stack(classes)
    e = embed(model, data, image_size, context_length, device, texts=False, precision=precision)
    pred = (e["image"] @ cls.t()).argmax(1)
    return float((pred == e["labels"]).float().mean() * 100)


def linear_probe(
    train_x,
    train_y,
    test_x,
    test_y,
    num_classes: int,
    epochs: int = 100,
    lr: float = 0.01,
    wd: float = 1e-4,
    seed: int = 0,
) -> float:
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
