"""Streamed data on real (tiny) shards written from a packaged set: bad samples skipped and counted,
decoding in DataLoader worker processes, csm pre-training and Ray Data ingest on webdataset shards."""

import io
import os
import tarfile

import torch

from mmlg_ray.config import DatasetConfig
from mmlg_ray.data import iter_shard, load_dataset, write_webdataset

BAD = {"00000025.png": b"\x89PNG\r\n\x1a\n garbage, not an image", "00000030.txt": None}  # None: member removed


def _shards(tmp_path, cache_dir, n=60, per_shard=20, labels=True, bad=True):
    """fashion_mnist train samples as shards DIR/train-*.tar (+ 10 test samples in DIR/test-000000.tar and
    DIR/val-000000.tar);
    with `bad`, sample 25's image is garbage and sample 30 has no caption (in one shard)."""
    from mmlg_ray.data import Pairs

    fm = load_dataset(DatasetConfig(kind="fashion_mnist", max_samples=n), "train", image_size=16, cache_dir=cache_dir)
    if not labels:
        fm = Pairs(fm.name, fm.images, fm.captions)
    out = tmp_path / "shards"
    paths = write_webdataset(fm, out, per_shard, prefix="train")
    fm_test = load_dataset(
        DatasetConfig(kind="fashion_mnist", max_samples=10), "test", image_size=16, cache_dir=cache_dir
    )
    write_webdataset(fm_test if labels else Pairs(fm.name, fm_test.images, fm_test.captions), out, 10, prefix="test")
    write_webdataset(fm_test if labels else Pairs(fm.name, fm_test.images, fm_test.captions), out, 10, prefix="val")
    if bad:
        shard = paths[25 // per_shard]
        with tarfile.open(shard) as t:
            members = [(m.name, t.extractfile(m).read()) for m in t]
        with tarfile.open(shard, "w") as t:
            for name, data in members:
                data = BAD.get(name, data)
                if data is not None:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
    return out


def test_streamed_shards_skip_and_count_bad_samples(tmp_path, cache_dir):
    out = _shards(tmp_path, cache_dir)
    cfg = DatasetConfig(
        kind="webdataset",
        path=str(out / "*.tar"),
        test_shards=str(out / "test-*.tar"),
        val_shards=str(out / "val-*.tar"),
    )
    train = load_dataset(cfg, "train", image_size=16, cache_dir=cache_dir)
    assert [os.path.basename(s) for s in train.shards] == [f"train-00000{i}.tar" for i in range(3)]
    assert train.classnames[1] == "trouser"  # from dataset.json, written beside the shards

    # one ordered pass: every good sample once, the 2 bad ones skipped and counted, decoded off this process
    stream = train.eval_batches(16, 16, 16)
    batches = list(stream)
    assert sum(len(b[3]) for b in batches) == 58 and stream.skipped == 2 and train.skipped == 2
    images, tokens, labels, captions = batches[0]
    assert images.shape == (16, 3, 16, 16) and images.dtype == torch.float32 and tokens.shape == (16, 16)
    assert labels.dtype == torch.long and len(captions) == 16 and "a " in captions[0]
    assert stream.decoder_pids and os.getpid() not in stream.decoder_pids

    # endless training batches over two passes: fixed size, each bad sample counted once
    endless = load_dataset(cfg, "train", image_size=16, cache_dir=cache_dir).batches(8, 16, 16, seed=1)
    for _ in range(16):
        images, tokens, labels = next(endless)
        assert images.shape == (8, 3, 16, 16) and tokens.shape == (8, 16) and labels.shape == (8,)
    assert endless.skipped == 2 and os.getpid() not in endless.decoder_pids
    endless.close()

    # two ranks: disjoint shares, the shards split between them
    seen = []
    for rank in range(2):
        s = load_dataset(cfg, "train", image_size=16, cache_dir=cache_dir).batches(
            8, 16, 16, seed=3, rank=rank, world=2
        )
        seen.append({(round(float(x.sum()), 2)) for x in next(s)[0]})
        s.close()
    assert not seen[0] & seen[1]

    test = load_dataset(cfg, "test", image_size=16, cache_dir=cache_dir)
    assert sum(len(b[3]) for b in test.eval_batches(64, 16, 16)) == 10

    # a truncated shard: the samples before the cut are read, the rest is one counted error
    data = (out / "train-000000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    entries = list(iter_shard(str(tmp_path / "cut.tar")))
    assert 5 < len(entries) < 20 and all(e[2] is None for e in entries[:-1]) and "unreadable" in entries[-1][2]


def test_shards_cli_writes_labelled_sets(tmp_path, cache_dir):
    from mmlg_ray.data.shards import main

    out = tmp_path / "fm"
    assert (
        main(
            [
                "--dataset",
                "fashion_mnist",
                "--out",
                str(out),
                "--max-samples",
                "30",
                "--samples-per-shard",
                "16",
                "--cache-dir",
                str(cache_dir),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "dataset.json",
        "test-000000.tar",
        "test-000001.tar",
        "train-000000.tar",
        "train-000001.tar",
        "val-000000.tar",
        "val-000001.tar",
    ]
    with tarfile.open(out / "train-000000.tar") as t:
        assert t.getnames()[:3] == ["00000000.png", "00000000.txt", "00000000.cls"]
    from mmlg_ray.config import load_config
    from mmlg_ray.method.finetune import load_task_data

    cfg = load_config(
        None,
        [
            f"cache_dir={cache_dir}",
            "data.image_classification.kind=webdataset",
            f"data.image_classification.path={out}/train-*.tar",
            f"data.image_classification.test_shards={out}/test-*.tar",
            f"data.image_classification.val_shards={out}/val-*.tar",
        ],
    )
    task = load_task_data(cfg, "image", 16)  # a classification set from shards: labels and class names
    assert len(task.train.classnames) == 10 and len(task.test.shards) == 2 and len(task.val.shards) == 2
    assert not set(task.val.shards) & (set(task.train.shards) | set(task.test.shards))
    # fine-tuning and scoring take streamed train and test sets (the probe and each evaluation: one pass)
    from mmlg_ray.config import FinetuneConfig, ModelSpec
    from mmlg_ray.method.finetune import finetune
    from mmlg_ray.method.models import build_model

    spec = ModelSpec(
        image_depth=1,
        text_depth=1,
        image_width=64,
        text_width=64,
        image_size=16,
        patch_size=8,
        context_length=16,
        embed_dim=16,
    )
    fcfg = FinetuneConfig(steps=4, eval_every=2, batch_size=8, warmup_steps=1)
    summary = finetune(build_model(spec, "image"), "image", task, fcfg, spec, torch.device("cpu"))
    assert summary["steps"] == 4 and len(summary["history"]) == 2 and 0 <= summary["final"]["top1"] <= 100
    assert 0 <= summary["linear_probe_init"] <= 100 and task.skipped == 0


def test_csm_pretraining_on_webdataset(tiny_cfg, tiny_ancestor, tmp_path, cache_dir):
    """csm takes its anchors from the stream (first distinct captions, first images), never from a
    materialized set; the stage's cost carries the skipped samples."""
    from mmlg_ray.method.descend import descendant_spec
    from mmlg_ray.engine.pipeline import corpus, csm_anchors, pretrain_descendant

    out = _shards(tmp_path, cache_dir, labels=False)
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.data.corpus = DatasetConfig(
        kind="webdataset",
        path=str(out / "*.tar"),
        test_shards=str(out / "test-*.tar"),
        val_shards=str(out / "val-*.tar"),
        workers=1,
    )
    data = corpus(cfg)
    assert data.classnames is None and not hasattr(data, "captions")
    img, txt = csm_anchors(cfg, tiny_ancestor.model(torch.device("cpu")), data, torch.device("cpu"), n_images=20)
    fm = load_dataset(DatasetConfig(kind="fashion_mnist", max_samples=60), "train", image_size=16, cache_dir=cache_dir)
    # the corpus is the train and val shards (no stage reads a corpus's val split); val holds 10 test samples
    val = load_dataset(DatasetConfig(kind="fashion_mnist", max_samples=10), "test", image_size=16, cache_dir=cache_dir)
    good = {c for i, c in enumerate(fm.captions) if i not in (25, 30)} | set(val.captions)
    assert img.shape == (20, cfg.ancestor.spec.embed_dim) and txt.shape == (len(good), cfg.ancestor.spec.embed_dim)
    spec = descendant_spec(tiny_ancestor.spec, 1, 64)
    state, cost = pretrain_descendant(cfg, tiny_ancestor, "csm", spec, device=torch.device("cpu"))
    assert cost["steps"] == cfg.descendants.pretrain_steps and cost["skipped_samples"] == 2
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_streamed_corpus_extraction_on_ray(tiny_cfg, tiny_ancestor, ray_address, tmp_path, cache_dir):
    """Ray Data ingest: decoding tasks feed a 2-worker extraction; bad samples are dropped and counted."""
    from mmlg_ray.distributed.extract import extract_on_ray
    from mmlg_ray.method.learngene import load_learngene

    out = _shards(tmp_path, cache_dir, n=200, per_shard=50)
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.data.corpus = DatasetConfig(
        kind="webdataset",
        path=str(out / "*.tar"),
        test_shards=str(out / "test-*.tar"),
        val_shards=str(out / "val-*.tar"),
    )
    # 0.5 of the session's 2 CPUs for training, 0.25 per decoding task: room left beside what other tests hold
    cfg.ray.num_workers, cfg.ray.cpus_per_worker, cfg.ray.data_cpus = 2, 0.25, 0.25
    from test_train_actors import _run_actors, assert_no_run_actor_alive

    before = set(_run_actors())
    cost = extract_on_ray(cfg, tiny_ancestor, tmp_path / "lg.safetensors", storage=str(tmp_path / "ray"))
    assert_no_run_actor_alive(before)  # no actor outlives its stage: Train's controller, workers, data actors
    # 198 good rows, 99 per worker: 6 batches of 16 per pass; 12 steps read the corpus twice
    assert cost["steps"] == 12 and cost["skipped_samples"] == 2
    assert load_learngene(tmp_path / "lg.safetensors").meta.cost["skipped_samples"] == 2
