"""Splits by content: a stable hash of a sample's key (or group) picks train, val or test, so the splits stay disjoint across runs and machines."""

from __future__ import annotations

import hashlib

import torch

from mmlg_ray.errors import UserError


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
