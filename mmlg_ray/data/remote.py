"""The streamed readers for clusters (local paths or fsspec URIs): image_folder_csv, oxford_pets, flickr30k, webdataset shards."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re


from mmlg_ray.config import DatasetConfig
from mmlg_ray.errors import UserError
from mmlg_ray.data.splits import SPLITS, _split_by_hash, grouped_split
from mmlg_ray.data.stream import StreamingPairs
from mmlg_ray.data.pairs import TEMPLATES


FILES_PER_UNIT = 64  # image-folder sets: records per unit of work (the shard of a folder set)


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
