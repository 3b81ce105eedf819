"""Streamed sets (`StreamingPairs`): tar shards and file lists read by DataLoader workers, split across ranks and loader workers, bad samples skipped and counted; writing WebDataset shards."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from mmlg_ray.data.pairs import Pairs, TEMPLATES, to_input, tokenize_captions

log = logging.getLogger("mmlg_ray")


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


CAPTION_EXTS = ("txt", "caption")


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
