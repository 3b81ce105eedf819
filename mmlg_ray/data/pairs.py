"""In-memory image-caption pairs (`Pairs`), the CLIP input transform and caption tokenizing."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from mmlg_ray.errors import UserError


MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)


STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


FASHION_CLASSES = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


MNIST_CLASSES = [str(i) for i in range(10)]


# MNIST's own prompts, none of them a corpus template: the local zero-shot set
MNIST_TEMPLATES = [
    "a handwritten digit {}.",
    "the number {}.",
    "a white digit {} written on black.",
    "a scan of the handwritten number {}.",
]


TEMPLATES = [
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a grayscale picture of a {}.",
    "a {} on a plain background.",
    "a small photo of the {}.",
    "a product photo of a {}.",
    "an image of a {}.",
]


def to_input(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> normalized float (N, 3, S, S), C in {1, 3}."""
    x = images.float().div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return (x - MEAN.to(x.device)) / STD.to(x.device)


_TOKEN_CACHE: dict = {}


def tokenize_captions(captions: list[str], context_length: int) -> torch.Tensor:
    """Tokenize with open_clip's tokenizer, each distinct caption once."""
    from mmlg_ray.method.models import tokenize

    uniq = sorted(set(captions))
    key = (context_length, hashlib.sha1("\x00".join(uniq).encode()).hexdigest())
    if key not in _TOKEN_CACHE:
        _TOKEN_CACHE.clear()
        _TOKEN_CACHE[key] = (uniq, tokenize(uniq, context_length))
    uniq, toks = _TOKEN_CACHE[key]
    pos = {c: i for i, c in enumerate(uniq)}
    return toks[torch.tensor([pos[c] for c in captions], dtype=torch.long)]


@dataclass
class Pairs:
    """In-memory image-caption pairs; labels/classnames where the set has classes."""

    name: str
    images: torch.Tensor  # uint8 (N, C, H, W)
    captions: list[str]
    labels: torch.Tensor | None = None
    classnames: list[str] | None = None
    templates: list[str] = field(default_factory=lambda: list(TEMPLATES))

    streamed = False
    skipped = 0  # in memory: decoded up front, nothing to skip

    def __len__(self):
        return len(self.captions)

    def subset(self, idx) -> "Pairs":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Pairs(
            self.name,
            self.images[idx],
            [self.captions[i] for i in idx.tolist()],
            None if self.labels is None else self.labels[idx],
            self.classnames,
            self.templates,
        )

    def batches(
        self,
        batch_size: int,
        image_size: int,
        context_length: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        skip: int = 0,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Endless shuffled (images, tokens, labels) batches. `batch_size` is the global batch: rank r
        of `world` gets batch_size / world samples of each step, disjoint from the other ranks'.
        `skip` batches are passed over first (cheaply: only their indices are drawn), so a run resumed
        at step s with skip=s draws exactly the batches an uninterrupted run would have."""
        tokens = tokenize_captions(self.captions, context_length)
        g = torch.Generator().manual_seed(seed)  # same permutation on every rank; each takes its slice
        n = len(self)
        bs = max(1, min(batch_size // world, n // world)) if n >= world else n
        while True:
            perm = torch.randperm(n, generator=g)[rank::world]
            starts = range(0, len(perm) - bs + 1, bs)
            if skip >= len(starts) > 0:  # a whole epoch passed over
                skip -= len(starts)
                continue
            for i in starts[skip:]:
                idx = perm[i : i + bs]
                yield (
                    to_input(self.images[idx], image_size),
                    tokens[idx],
                    None if self.labels is None else self.labels[idx],
                )
            skip = 0

    def eval_batches(self, batch_size: int, image_size: int, context_length: int):
        """One ordered pass: (images, tokens, labels-or-None, captions) batches."""
        tokens = tokenize_captions(self.captions, context_length)
        for i in range(0, len(self), batch_size):
            yield (
                to_input(self.images[i : i + batch_size], image_size),
                tokens[i : i + batch_size],
                None if self.labels is None else self.labels[i : i + batch_size],
                self.captions[i : i + batch_size],
            )


def need_path(path: str, field_name: str, package: str | None = None) -> Path:
    p = Path(os.path.expanduser(path))
    if not p.exists():
        fix = f"install it: sudo apt-get install {package}" if package else "point it at an existing path"
        raise UserError(field_name, f"data set path {str(p)!r} does not exist", fix)
    return p
