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

from .atomic import atomic_path, write_json
from .config import Config, ModelSpec
from .errors import UserError
from .learngene import state_fingerprint
from .models import build_model, spec_from_open_clip_cfg

log = logging.getLogger("mmlg_ray")
HUB_HOST = "huggingface.co"


@dataclass
class Ancestor:
    spec: ModelSpec
    state: dict
    fingerprint: str
    source: str
    cost: dict = field(default_factory=dict)  # pre-training cost when we trained it ourselves

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


def load_state_file(path: str) -> dict:
    """A .safetensors file or a torch checkpoint (weights_only=True), local or fsspec URI."""
    import fsspec
    if path.endswith(".safetensors"):
        from safetensors.torch import load as st_load
        with fsspec.open(path, "rb") as f:
            state = st_load(f.read())
    else:
        with fsspec.open(path, "rb") as f:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:
                raise UserError("ancestor.checkpoint", f"{path} is not a loadable weights-only torch checkpoint "
                                f"({type(e).__name__})", "save a state_dict or a .safetensors file") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _spec_for_arch(arch: str) -> ModelSpec:
    import open_clip
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise UserError("ancestor.arch", f"{arch!r} is not an open_clip architecture",
                        "see open_clip.list_models(), e.g. ViT-B-16")
    if "timm_model_name" in cfg["vision_cfg"] or "hf_model_name" in cfg["text_cfg"]:
        raise UserError("ancestor.arch", f"{arch!r} is not a plain ViT + transformer CLIP", "use a ViT-* architecture")
    return spec_from_open_clip_cfg(cfg)


def get_ancestor(cfg: Config, device=None) -> Ancestor:
    a = cfg.ancestor
    if a.source == "open_clip":
        import open_clip
        spec = _spec_for_arch(a.arch)
        if a.pretrained not in open_clip.list_pretrained_tags_by_model(a.arch):
            raise UserError("ancestor.pretrained", f"{a.pretrained!r} is not a pretrained tag of {a.arch}",
                            f"one of {open_clip.list_pretrained_tags_by_model(a.arch)}")
        if not hub_reachable():
            raise UserError("ancestor.pretrained", f"open_clip weights {a.arch}/{a.pretrained} cannot be downloaded "
                            f"on this machine ({HUB_HOST} is unreachable)",
                            "download them where the network allows and pass ancestor.source=checkpoint "
                            "ancestor.checkpoint=/path/to/open_clip_model.safetensors")
        model = open_clip.create_model(a.arch, pretrained=a.pretrained)
        state = {k: v for k, v in model.state_dict().items() if k != "attn_mask"}
        return Ancestor(spec, state, state_fingerprint(state), f"open_clip:{a.arch}/{a.pretrained}")
    if a.source == "checkpoint":
        spec = _spec_for_arch(a.arch) if a.arch else a.spec
        state = load_state_file(os.path.expanduser(a.checkpoint))
        model = build_model(spec, "image_text")
        own = {k: v for k, v in model.state_dict().items() if k != "attn_mask"}
        missing = [k for k in own if k not in state]
        bad = [k for k in own if k in state and state[k].shape != own[k].shape]
        if missing or bad:
            raise UserError("ancestor.checkpoint", f"{a.checkpoint} does not match ancestor.spec/arch "
                            f"(missing {missing[:2]}, wrong shape {bad[:2]})", "set ancestor.spec or ancestor.arch to its shape")
        state = {k: state[k].float() for k in own}
        return Ancestor(spec, state, state_fingerprint(state), f"checkpoint:{a.checkpoint}")
    return local_ancestor(cfg, device)


def local_ancestor(cfg: Config, device=None) -> Ancestor:
    """Pre-train (or reuse from the cache) the local default ancestor on data.corpus."""
    from safetensors.torch import load_file, save_file
    key = cfg.fingerprint("ancestor.spec", "ancestor.pretrain", "data.corpus", "seed", "precision")
    folder = cfg.cache_path / "ancestors" / key
    weights, meta_path = folder / "model.safetensors", folder / "meta.json"
    if weights.is_file() and meta_path.is_file():
        state = load_file(str(weights))
        meta = json.loads(meta_path.read_text())
        log.info("ancestor: reusing cached pre-trained CLIP %s", folder)
        return Ancestor(cfg.ancestor.spec, state, meta["fingerprint"], f"local:{key}", meta.get("cost", {}))
    from .pipeline import pretrain_clip
    log.info("ancestor: pre-training the local default CLIP on %s (cached at %s)", cfg.data.corpus.kind, folder)
    state, cost = pretrain_clip(cfg, cfg.ancestor.spec, cfg.ancestor.pretrain, seed=cfg.seed, name="ancestor",
                                device=device)
    fp = state_fingerprint(state)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(weights) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    write_json(meta_path, {"fingerprint": fp, "cost": cost, "spec": cfg.ancestor.spec.model_dump(),
                           "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return Ancestor(cfg.ancestor.spec, state, fp, f"local:{key}", cost)
