"""The ancestor (teacher) CLIP: an open_clip pretrained tag (clusters), a local checkpoint, or the
local default, a CLIP we pre-train on the packaged corpus and cache under a key of its config."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field

import torch

from mmlg_ray.atomic import atomic_path, write_json
from mmlg_ray.config import IN_MEMORY_KINDS, Config, ModelSpec
from mmlg_ray.errors import UserError
from mmlg_ray.method.learngene import state_fingerprint
from mmlg_ray.method.models import build_model

log = logging.getLogger("mmlg_ray")
HUB_HOST = "huggingface.co"


@dataclass
class Ancestor:
    spec: ModelSpec
    state: dict
    fingerprint: str
    source: str
    cost: dict = field(default_factory=dict)  # pre-training cost when we trained it ourselves
    meta: dict = field(
        default_factory=dict
    )  # the local ancestor's meta.json: cost, own retrieval on val ("tuxpaint_val")

    def model(self, device="cpu"):
        m = build_model(self.spec, "image_text")
        m.load_state_dict(self.state)
        return m.to(device).eval()


def hub_reachable(host: str = HUB_HOST, timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_state_file(path: str, field: str = "ancestor.checkpoint", mmap: bool = False) -> dict:
    """A .safetensors file or a torch checkpoint (weights_only=True), local or fsspec URI. Anything
    that is not weights is a UserError naming `field`. mmap=True (local torch files; preflight) maps
    the tensors instead of reading them."""
    import fsspec

    fix = "pass open_clip weights as .safetensors or a torch file of model.state_dict()"
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load as st_load

            with fsspec.open(path, "rb") as f:
                blob = f.read()
            try:
                state = st_load(blob)
            except Exception as e:  # safetensors raises several types for files that are not weights
                raise UserError(field, f"{path} is not a readable safetensors file ({type(e).__name__})", fix) from None
        else:
            try:
                if mmap and "://" not in path:
                    try:
                        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                    except RuntimeError as e:
                        if "mmap" not in str(e):  # a legacy (not zip) torch file cannot be mapped: read it
                            raise
                        state = torch.load(path, map_location="cpu", weights_only=True)
                else:
                    with fsspec.open(path, "rb") as f:
                        state = torch.load(f, map_location="cpu", weights_only=True)
            except OSError:
                raise
            except Exception as e:
                raise UserError(
                    field, f"{path} is not a loadable weights-only torch checkpoint " f"({type(e).__name__})", fix
                ) from None
    except OSError as e:  # missing, a folder, unreadable, a bucket that refuses us
        raise UserError(field, f"cannot read {path}: {e.strerror or type(e).__name__}", fix) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(
            field,
            f"{path} holds no state dict of tensors",
            "save model.state_dict() (or a .safetensors file) of an open_clip CLIP",
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def check_open_clip_source(a, network: bool = True) -> None:
    """ancestor.source=open_clip: the tag exists for the architecture and (`network`) its weights can be
    fetched from this machine; a dry run, which may price a cluster from a machine without that
    network, only warns."""
    import open_clip

    if a.pretrained not in open_clip.list_pretrained_tags_by_model(a.arch):
        raise UserError(
            "ancestor.pretrained",
            f"{a.pretrained!r} is not a pretrained tag of {a.arch}",
            f"one of {open_clip.list_pretrained_tags_by_model(a.arch)}",
        )
    if not hub_reachable():
        if not network:
            log.warning(
                "ancestor.pretrained: %s/%s cannot be downloaded on this machine (%s is unreachable); "
                "the cluster's nodes must reach it",
                a.arch,
                a.pretrained,
                HUB_HOST,
            )
            return
        raise UserError(
            "ancestor.pretrained",
            f"open_clip weights {a.arch}/{a.pretrained} cannot be downloaded "
            f"on this machine ({HUB_HOST} is unreachable)",
            "download them where the network allows and pass ancestor.source=checkpoint "
            "ancestor.checkpoint=/path/to/open_clip_model.safetensors",
        )


def get_ancestor(cfg: Config, device=None) -> Ancestor:
    a = cfg.ancestor
    spec = a.spec  # read from open_clip's own model config when ancestor.arch is set (mmlg_ray/config/base.py)
    if a.source == "open_clip":
        import open_clip

        check_open_clip_source(a)
        model = open_clip.create_model(a.arch, pretrained=a.pretrained, force_quick_gelu=spec.quick_gelu)
        state = {k: v for k, v in model.state_dict().items() if k != "attn_mask"}
        return Ancestor(
            spec,
            _match(state, spec, f"open_clip:{a.arch}/{a.pretrained}"),
            state_fingerprint(state),
            f"open_clip:{a.arch}/{a.pretrained}",
        )
    if a.source == "checkpoint":
        state = _match(load_state_file(os.path.expanduser(a.checkpoint)), spec, a.checkpoint)
        return Ancestor(spec, state, state_fingerprint(state), f"checkpoint:{a.checkpoint}")
    return local_ancestor(cfg, device)


def check_shapes(shapes: dict[str, tuple], own: dict[str, tuple], what: str, field: str = "ancestor.checkpoint"):
    """Tensor names and shapes of a checkpoint against those of the open_clip CLIP of the spec."""
    missing = [k for k in own if k not in shapes]
    bad = [k for k in own if k in shapes and tuple(shapes[k]) != tuple(own[k])]
    if missing or bad:
        raise UserError(
            field,
            f"{what} does not match ancestor.spec/arch " f"(missing {missing[:2]}, wrong shape {bad[:2]})",
            "set ancestor.arch (or ancestor.spec) to the checkpoint's architecture",
        )
    extra = [k for k in shapes if k not in own and k != "attn_mask"]
    if extra:
        raise UserError(
            field,
            f"{what} holds tensors the architecture lacks ({extra[:2]}): " "another architecture or flag set",
            "set ancestor.arch to the checkpoint's architecture",
        )


def _match(state: dict, spec: ModelSpec, what: str) -> dict:
    """The weights of an open_clip CLIP of `spec`, as fp32; a clear error when they do not fit."""
    model = build_model(spec, "image_text")
    own = {k: v for k, v in model.state_dict().items() if k != "attn_mask"}
    check_shapes({k: tuple(v.shape) for k, v in state.items()}, {k: tuple(v.shape) for k, v in own.items()}, what)
    return {k: state[k].float() for k in own}


def chance_mean_recall(captions: list[str], ks=(1, 5, 10)) -> float:
    """Expected mean recall (percent, R@1/5/10 both ways) of random embeddings on these pairs, exactly:
    a query with m correct items among n (identical captions count as correct, as in
    evaluate.retrieval_metrics) finds one in its top k with probability 1 - C(n-m, k) / C(n, k)."""
    from collections import Counter

    n = len(captions)
    count = Counter(captions)

    def p_hit(m, k):
        if k >= n:
            return 1.0
        miss = 1.0
        for i in range(k):  # C(n-m, k) / C(n, k) as a product
            miss *= max(0.0, (n - m - i) / (n - i))
        return 1.0 - miss

    per_k = [sum(p_hit(count[c], k) for c in captions) / n for k in ks]
    return 100.0 * sum(per_k) / len(per_k)  # i2t and t2i have the same chance


def own_retrieval(cfg: Config, state: dict, spec: ModelSpec, device=None) -> dict:
    """The ancestor's own image-text retrieval on the validation split of data.retrieval (local: Tux
    Paint, which no training stage sees): R@1/5/10 both ways, mean_recall, and its chance level."""
    from mmlg_ray.data import load_dataset
    from mmlg_ray.method.evaluate import embed, retrieval_metrics
    from mmlg_ray.method.train import resolve_device

    device = device or resolve_device(cfg.device)
    data = load_dataset(
        cfg.data.retrieval, "val", image_size=spec.image_size, cache_dir=cfg.cache_path, field_name="data.retrieval"
    )
    model = build_model(spec, "image_text")
    model.load_state_dict(state)
    model = model.to(device).eval()
    with torch.no_grad():
        e = embed(model, data, spec.image_size, spec.context_length, device, precision=cfg.precision)
    m = retrieval_metrics(e["image"], e["text"], e["captions"])
    m.update(set=data.name, split="val", pairs=len(e["captions"]), chance_mean_recall=chance_mean_recall(e["captions"]))
    m["over_chance"] = m["mean_recall"] / max(m["chance_mean_recall"], 1e-9)
    m["p_vs_chance"], m["permutations"] = permutation_p(e["image"], e["text"], e["captions"], m["mean_recall"])
    return m


def corpus_retrieval(
    cfg: Config, state: dict, spec: ModelSpec, device=None, max_pairs: int = 500, permutations: int = 199
) -> dict:
    """The ancestor's retrieval on the held-out test split of each in-memory part of its corpus (local: Fashion-MNIST's
    t10k, openclipart's 5%): what it learnt, measured on pairs no stage trains on, beside its transfer to a
    downstream set (own_retrieval). At most `max_pairs` pairs per part (a fixed random draw); streamed corpora
    are left out (nothing is read from a cluster's object store for this). Keys `<kind>_test`."""
    from mmlg_ray.data import load_dataset
    from mmlg_ray.method.evaluate import embed, retrieval_metrics
    from mmlg_ray.method.train import resolve_device

    c = cfg.data.corpus
    parts = c.parts if c.kind == "mixture" else [c]
    if any(p.kind not in IN_MEMORY_KINDS for p in parts):
        return {}
    device = device or resolve_device(cfg.device)
    model = build_model(spec, "image_text")
    model.load_state_dict(state)
    model = model.to(device).eval()
    out = {}
    for i, part in enumerate(parts):
        data = load_dataset(
            part,
            "test",
            image_size=spec.image_size,
            cache_dir=cfg.cache_path,
            field_name=f"data.corpus.parts[{i}]" if c.kind == "mixture" else "data.corpus",
        )
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:max_pairs].tolist()
        with torch.no_grad():
            e = embed(model, data.subset(idx), spec.image_size, spec.context_length, device, precision=cfg.precision)
        m = retrieval_metrics(e["image"], e["text"], e["captions"])
        m.update(set=data.name, split="test", pairs=len(idx), chance_mean_recall=chance_mean_recall(e["captions"]))
        m["over_chance"] = m["mean_recall"] / max(m["chance_mean_recall"], 1e-9)
        m["p_vs_chance"], m["permutations"] = permutation_p(
            e["image"], e["text"], e["captions"], m["mean_recall"], permutations
        )
        out[f"{part.kind}_test"] = m
    return out


def permutation_p(
    img: torch.Tensor, txt: torch.Tensor, captions: list[str], observed: float, permutations: int = 999, seed: int = 0
) -> tuple[float, int]:
    """One-sided permutation test of "this retrieval is no better than chance": the same embeddings with the
    images paired to the captions at random, `permutations` times; p = (1 + #{mean recall >= observed}) /
    (1 + permutations). The smallest p it can give is 1 / (1 + permutations)."""
    from mmlg_ray.method.evaluate import retrieval_metrics

    g = torch.Generator().manual_seed(seed)
    hits = sum(
        retrieval_metrics(img[torch.randperm(len(img), generator=g)], txt, captions)["mean_recall"] >= observed
        for _ in range(permutations)
    )
    return (1 + hits) / (1 + permutations), permutations


def local_ancestor(cfg: Config, device=None) -> Ancestor:
    """Pre-train (or reuse from the cache) the local default ancestor on data.corpus; its own retrieval
    on data.retrieval's validation split is measured once and kept in meta.json (`<kind>_val`, e.g. tuxpaint_val)."""
    from safetensors.torch import load_file, save_file

    key = cfg.fingerprint("ancestor.spec", "ancestor.pretrain", "data.corpus", "seed", "precision")
    folder = cfg.cache_path / "ancestors" / key
    weights, meta_path = folder / "model.safetensors", folder / "meta.json"
    if weights.is_file() and meta_path.is_file():
        state = load_file(str(weights))
        meta = json.loads(meta_path.read_text())
        log.info("ancestor: reusing cached pre-trained CLIP %s", folder)
        _own_retrieval_into(cfg, meta, state, device, meta_path)
        return Ancestor(cfg.ancestor.spec, state, meta["fingerprint"], f"local:{key}", meta.get("cost", {}), meta)
    from mmlg_ray.method.pretrain import pretrain_clip

    log.info(
        "ancestor: pre-training the local default CLIP on %s (cached at %s)", "+".join(cfg.data.corpus.kinds()), folder
    )
    state, cost = pretrain_clip(
        cfg, cfg.ancestor.spec, cfg.ancestor.pretrain, seed=cfg.seed, name="ancestor", device=device
    )
    fp = state_fingerprint(state)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(weights) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    meta = {
        "fingerprint": fp,
        "cost": cost,
        "spec": cfg.ancestor.spec.model_dump(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    _own_retrieval_into(cfg, meta, state, device, None)
    write_json(meta_path, meta)
    return Ancestor(cfg.ancestor.spec, state, fp, f"local:{key}", cost, meta)


def _own_retrieval_into(cfg: Config, meta: dict, state: dict, device, meta_path) -> None:
    """meta[f"{data.retrieval.kind}_val"]: the ancestor's own validation retrieval on the downstream set, and
    meta["corpus_test"]: its retrieval on its corpus's held-out test split (measured once; an older cache entry
    without them gets them on first reuse)."""
    key = f"{cfg.data.retrieval.kind}_val"
    if isinstance(meta.get(key), dict) and "p_vs_chance" in meta[key] and "corpus_test" in meta:
        return
    meta["corpus_test"] = corpus_retrieval(cfg, state, cfg.ancestor.spec, device)
    for k, c in meta["corpus_test"].items():
        log.info(
            "ancestor: %s retrieval over %d held-out pairs of its corpus: mean recall %.1f (chance %.1f, %.1fx, "
            "permutation p %.3g)",
            k,
            c["pairs"],
            c["mean_recall"],
            c["chance_mean_recall"],
            c["over_chance"],
            c["p_vs_chance"],
        )
    m = own_retrieval(cfg, state, cfg.ancestor.spec, device)
    meta[key] = m
    log.info(
        "ancestor: own %s val retrieval over %d pairs: mean recall %.1f (chance %.1f, %.1fx, permutation "
        "p %.3g), R@1 i2t %.1f t2i %.1f",
        m["set"],
        m["pairs"],
        m["mean_recall"],
        m["chance_mean_recall"],
        m["over_chance"],
        m["p_vs_chance"],
        m["i2t_r1"],
        m["t2i_r1"],
    )
    if meta_path is not None:
        write_json(meta_path, meta)
