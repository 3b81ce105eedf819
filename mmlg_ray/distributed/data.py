"""Streamed corpus ingest for Ray Train: a Ray Data pipeline that reads and decodes the corpus in
Ray tasks (CPUs and no GPU, never on the training thread; ray.data_resources can pin them to a CPU
node type where the cluster has one), split across the Train workers, consumed with
iter_torch_batches and prefetch.

  units (shards / chunks of image files)   ray.data.from_items, one block per unit
    -> map_batches(_decode_units)           core reader + decoder (mmlg_ray.data): resize, tokenize;
                                            bad samples dropped here and counted by a SkipCounter actor
    -> TorchTrainer(datasets={"corpus": ds}, dataset_config=DataConfig(["corpus"]))
    -> ray.train.get_dataset_shard("corpus").iter_torch_batches(...)   endless, epoch after epoch

Why not ray.data.read_webdataset: its reader raises on a truncated or unreadable tar, which fails
the read task and with it the whole dataset (DataContext.max_errored_blocks would drop whole blocks
uncounted), and it opens paths with pyarrow file systems where the rest of the product takes fsspec
URIs. Reading units with the core reader gives one parser, the same skip-and-count rule in both
backends, and image folders through the same path.

Bad rows are dropped before the split, not flagged for the workers to filter: DataConfig splits
with equal=True, so every worker gets the same number of good rows per epoch and all of them reach
the next epoch's barrier at the same step (filtering in the workers could leave one waiting for the
next epoch while another waits for it in an all-reduce).
"""

from __future__ import annotations

import json
import logging
import random

from mmlg_ray.config import Config
from mmlg_ray.data import BadSample, decode_sample, is_streamed, read_unit, to_input, tokenize_captions

log = logging.getLogger("mmlg_ray")
ROWS_PER_BATCH = 64  # rows per output batch of a decoding task


class SkipCounter:
    """A Ray actor (num_cpus=0): the distinct bad samples the decoding tasks met. Tasks run again each
    epoch, so samples are keyed by id and counted once."""

    def __init__(self):
        self.ids: dict[str, str] = {}

    def add(self, bad: list):
        for key, why in bad:
            if key not in self.ids and len(self.ids) < 5:
                log.warning("corpus: skipping %s: %s", key, why)
            self.ids.setdefault(key, why)

    def count(self) -> int:
        return len(self.ids)


def new_skip_counter():
    import ray

    return ray.remote(num_cpus=0)(SkipCounter).remote()


def _decode_units(batch: dict, image_size: int, context_length: int, counter, rows: int = ROWS_PER_BATCH):
    """Ray Data UDF: read each unit with the core reader, decode, resize, tokenize; yield batches of
    uint8 images and tokens; report the bad samples to the counter."""
    import numpy as np

    images, caps, bad = [], [], []

    def out():
        b = {"image": np.stack(images), "tokens": tokenize_captions(caps, context_length).numpy()}
        images.clear()
        caps.clear()
        return b

    for unit in batch["unit"]:
        for key, parts, err in read_unit(json.loads(str(unit))):
            if err is None:
                try:
                    img, cap, _ = decode_sample(parts, image_size)
                    images.append(img.numpy())
                    caps.append(cap)
                except BadSample as e:
                    err = str(e)
            if err is not None:
                bad.append((key, err))
            if len(caps) >= rows:
                yield out()
    if bad:
        counter.add.remote(bad)
    if caps:
        yield out()


def corpus_dataset(cfg: Config, image_size: int, context_length: int, counter):
    """The corpus as a Ray Dataset of decoded rows {image: uint8 (3, S, S), tokens: int64 (ctx,)}."""
    import ray

    from mmlg_ray.method.pretrain import corpus
    from mmlg_ray.distributed.settings import data_task_options

    data = corpus(cfg)  # a StreamingPairs: its index only (shard names / file lists), nothing decoded
    units = list(data.units)
    random.Random(cfg.seed).shuffle(units)
    ds = ray.data.from_items([{"unit": json.dumps(u)} for u in units], override_num_blocks=len(units))
    ds = ds.map_batches(
        _decode_units,
        batch_size=1,
        batch_format="numpy",
        **data_task_options(cfg.ray),
        fn_kwargs={"image_size": image_size, "context_length": context_length, "counter": counter},
    )
    if cfg.data.corpus.max_samples:
        ds = ds.limit(cfg.data.corpus.max_samples)
    return ds


def trainer_datasets(cfg: Config, ancestor) -> tuple[dict, dict, object]:
    """The extraction TorchTrainer's `datasets` and extra keyword arguments for the corpus, decoded
    at the auxiliary model's input size, and the skip counter; nothing for an in-memory corpus,
    which each worker slices itself."""
    if not is_streamed(cfg.data.corpus):
        return {}, {}, None
    from ray.train import DataConfig

    from mmlg_ray.method.learngene import aux_spec

    spec = aux_spec(cfg, ancestor.spec)
    counter = new_skip_counter()
    ds = corpus_dataset(cfg, spec.image_size, spec.context_length, counter)
    _warn_if_no_cpu_left(cfg)
    return {"corpus": ds}, {"dataset_config": DataConfig(datasets_to_split=["corpus"])}, counter


def _warn_if_no_cpu_left(cfg: Config):
    """Decoding tasks that find no free CPU wait, and the training workers with them: say so up front
    (an autoscaling cluster may still add nodes, so this is a warning)."""
    import ray

    free = ray.available_resources().get("CPU", 0)
    left = free - cfg.ray.num_workers * cfg.ray.cpus_per_worker
    if left < cfg.ray.data_cpus:
        log.warning(
            "corpus: %.2f free CPUs are left beside the training workers, and each decoding task needs "
            "ray.data_cpus=%.2f: unless the cluster scales up, decoding (and training) waits; lower "
            "ray.cpus_per_worker or ray.data_cpus",
            max(left, 0.0),
            cfg.ray.data_cpus,
        )


def skipped_count(counter) -> int:
    if counter is None:
        return 0
    import ray

    n = ray.get(counter.count.remote())
    ray.kill(counter)
    return n


def corpus_batches(
    cfg: Config, image_size: int, context_length: int, batch_size: int, rank: int, world: int, seed: int
):
    """In a Ray Train worker: endless (images, tokens, None) batches of `batch_size` (this rank's share).
    A streamed corpus comes from this worker's Ray Data shard, decoded by Ray tasks and normalized
    here on the training device; a local packaged corpus is in memory and sliced per rank."""
    if not is_streamed(cfg.data.corpus):
        from mmlg_ray.method.pretrain import corpus

        return corpus(cfg).batches(batch_size * world, image_size, context_length, seed=seed, rank=rank, world=world)
    import ray.train

    return _endless(
        ray.train.get_dataset_shard("corpus"),
        batch_size,
        image_size,
        cfg.data.corpus.prefetch,
        cfg.data.corpus.shuffle_buffer,
        seed,
    )


def _endless(shard, batch_size: int, image_size: int, prefetch: int, shuffle_buffer: int, seed: int):
    epoch = 0
    while True:
        n = 0
        for b in shard.iter_torch_batches(
            batch_size=batch_size,
            drop_last=True,
            prefetch_batches=prefetch,
            local_shuffle_buffer_size=shuffle_buffer if shuffle_buffer > 1 else None,
            local_shuffle_seed=seed + epoch,
        ):
            n += 1
            yield to_input(b["image"], image_size), b["tokens"], None
        if n == 0:
            raise RuntimeError(
                f"corpus: a pass gave this worker less than one batch of {batch_size}; "
                "use more data or a smaller learngene.extraction.batch_size"
            )
        epoch += 1
